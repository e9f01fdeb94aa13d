//! The gRPC service over loopback with a tonic client, on indexes built from the fixture photos
//! with the tiny fixture checkpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use blipdex_ingest::IngestJob;
use blipdex_model::{LoadOptions, ModelFiles, Retriever};
use blipdex_search::{Engine, EngineOptions, SearchParams};
use blipdex_server::pb::retrieval_client::RetrievalClient;
use blipdex_server::pb::{
    caption_request, CaptionRequest, GetStatsRequest, RerankRequest, SearchImageRequest,
    SearchOptions, SearchResponse, SearchTextRequest,
};
use blipdex_server::{Limits, Metrics, Server, ServerConfig};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn itm_model() -> ModelFiles {
    ModelFiles::resolve(&fixtures().join("models/itm-a").to_string_lossy(), None)
        .expect("itm-a fixture")
}

fn caption_model() -> ModelFiles {
    ModelFiles::resolve(&fixtures().join("models/caption-a").to_string_lossy(), None)
        .expect("caption-a fixture")
}

fn photo(name: &str) -> PathBuf {
    fixtures().join("photos").join(name)
}

const PHOTOS: [&str; 5] = [
    "astronaut.jpg",
    "camera_gray.png",
    "chelsea_alpha.png",
    "coffee_palette.gif",
    "rocket.jpg",
];

/// Copies `names` into `folder` and ingests `folder` into `index` with the fixture model.
fn ingest(folder: &Path, index: &Path, names: &[&str]) -> Result<()> {
    std::fs::create_dir_all(folder)?;
    for n in names {
        std::fs::copy(photo(n), folder.join(n))?;
    }
    let files = itm_model();
    let model = Retriever::load(&files, &LoadOptions::default())?;
    let job = IngestJob {
        roots: vec![folder.to_path_buf()],
        index: Some(index.to_path_buf()),
        model: Some(files.name.clone()),
        batch_size: 2,
        ..IngestJob::default()
    };
    let summary = blipdex_ingest::ingest(&job, &model)?;
    ensure!(summary.rejected == 0, "{summary:?}");
    Ok(())
}

struct Index {
    _tmp: tempfile::TempDir,
    folder: PathBuf,
    index: PathBuf,
}

fn index_of(names: &[&str]) -> Result<Index> {
    let tmp = tempfile::tempdir()?;
    let folder = tmp.path().join("photos");
    let index = tmp.path().join("index");
    ingest(&folder, &index, names)?;
    Ok(Index {
        _tmp: tmp,
        folder,
        index,
    })
}

fn engine_options(index: &Path, with_captions: bool) -> EngineOptions {
    let mut o = EngineOptions::new(index, itm_model());
    if with_captions {
        o.caption_model = Some(caption_model());
    }
    o
}

fn quick_config() -> ServerConfig {
    ServerConfig {
        refresh_every: Some(Duration::from_millis(100)),
        caption_flush_every: None,
        ..ServerConfig::default()
    }
}

struct Running {
    addr: SocketAddr,
    metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    async fn start(server: Server) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let metrics = server.metrics();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let r = server
                .run(listener, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = &r {
                eprintln!("server stopped: {e:#}");
            }
            r
        });
        Ok(Self {
            addr,
            metrics,
            stop: Some(stop),
            task,
        })
    }

    /// Starts a server and waits until health says SERVING.
    async fn serving(config: ServerConfig, engine: EngineOptions) -> Result<Self> {
        let r = Self::start(Server::new(config, engine)?).await?;
        r.wait_serving().await?;
        Ok(r)
    }

    async fn channel(&self) -> Result<Channel> {
        let connected = Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await;
        match connected {
            Ok(c) => Ok(c),
            Err(e) if self.task.is_finished() => {
                anyhow::bail!("cannot connect ({e:?}): the server stopped")
            }
            Err(e) => Err(anyhow::Error::new(e).context("cannot connect")),
        }
    }

    async fn client(&self) -> Result<RetrievalClient<Channel>> {
        Ok(RetrievalClient::new(self.channel().await?).max_decoding_message_size(64 << 20))
    }

    async fn health(&self, service: &str) -> Result<ServingStatus> {
        let mut h = HealthClient::new(self.channel().await?);
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        Ok(r.status())
    }

    async fn wait_serving(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.health("").await? == ServingStatus::Serving {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "server never became SERVING");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await?
    }
}

fn text(query: &str, top_k: u32) -> SearchTextRequest {
    SearchTextRequest {
        query: query.into(),
        top_k,
        ..Default::default()
    }
}

fn exact() -> Option<SearchOptions> {
    Some(SearchOptions {
        exact: true,
        ..Default::default()
    })
}

fn code_of<T: std::fmt::Debug>(r: std::result::Result<T, tonic::Status>) -> tonic::Status {
    match r {
        Ok(v) => panic!("expected an error status, got {v:?}"),
        Err(s) => s,
    }
}

fn file_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// The server still answers a normal query.
async fn still_serving(client: &mut RetrievalClient<Channel>) -> Result<()> {
    let r = client.search_text(text("a rocket", 3)).await?.into_inner();
    ensure!(r.hits.len() == 3, "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_matches_the_engine() -> Result<()> {
    let ix = index_of(&PHOTOS)?;
    let server = Running::serving(quick_config(), engine_options(&ix.index, true)).await?;
    let mut client = server.client().await?;
    let opts = engine_options(&ix.index, false);
    let engine = blocking(move || Engine::load(&opts)).await?;
    let store = engine.store();

    // SearchText: the same hits and scores as the engine (what `blipdex search` prints), for
    // several queries sent at once so that the server batches their embeddings.
    let queries = [
        "a rocket on the launch pad",
        "a cat",
        "a man with a camera",
        "coffee",
    ];
    let mut calls = Vec::new();
    for q in queries {
        let mut c = client.clone();
        calls.push(tokio::spawn(async move {
            c.search_text(SearchTextRequest {
                options: exact(),
                ..text(q, 5)
            })
            .await
        }));
    }
    for (q, call) in queries.iter().zip(calls) {
        let got = call.await??.into_inner();
        let t = engine.embed_texts(&[q])?.remove(0);
        let want = engine.search_text(
            &store,
            &t,
            &SearchParams {
                top_k: 5,
                exact: true,
                ..Default::default()
            },
        )?;
        ensure!(got.hits.len() == want.len(), "{q}: {got:?} vs {want:?}");
        for (g, w) in got.hits.iter().zip(&want) {
            ensure!(
                g.image_id == w.image_id && g.path == w.path,
                "{q}: {g:?} vs {w:?}"
            );
            ensure!(
                (g.itc_score - w.itc_score).abs() < 1e-5,
                "{q}: {} vs {}",
                g.itc_score,
                w.itc_score
            );
            ensure!(g.itm_score.is_none() && g.error.is_empty(), "{g:?}");
        }
        ensure!(got.generation == store.generation());
    }
    // The HNSW path scores exactly too.
    let ann = client.search_text(text("a cat", 5)).await?.into_inner();
    let t = engine.embed_texts(&["a cat"])?.remove(0);
    let want = engine.search_text(&store, &t, &SearchParams::default())?;
    for (g, w) in ann.hits.iter().zip(&want) {
        ensure!(g.image_id == w.image_id && (g.itc_score - w.itc_score).abs() < 1e-5);
    }

    // Filters and pagination.
    let page2 = client
        .search_text(SearchTextRequest {
            options: Some(SearchOptions {
                exact: true,
                offset: 2,
                ..Default::default()
            }),
            ..text("a cat", 2)
        })
        .await?
        .into_inner();
    let all = client
        .search_text(SearchTextRequest {
            options: exact(),
            ..text("a cat", 5)
        })
        .await?
        .into_inner();
    ensure!(
        page2.hits.iter().map(|h| h.image_id).collect::<Vec<_>>()
            == all.hits[2..4]
                .iter()
                .map(|h| h.image_id)
                .collect::<Vec<_>>()
    );
    let prefix = format!("{}/rocket", ix.folder.canonicalize()?.display());
    let only = client
        .search_text(SearchTextRequest {
            options: Some(SearchOptions {
                path_prefix: prefix,
                ..Default::default()
            }),
            ..text("a cat", 5)
        })
        .await?
        .into_inner();
    ensure!(
        only.hits.len() == 1 && file_name(&only.hits[0].path) == "rocket.jpg",
        "{only:?}"
    );
    let min = all.hits[1].itc_score;
    let above = client
        .search_text(SearchTextRequest {
            options: Some(SearchOptions {
                min_score: Some(min),
                exact: true,
                ..Default::default()
            }),
            ..text("a cat", 5)
        })
        .await?
        .into_inner();
    ensure!(above.hits.len() == 2, "{above:?}");

    // SearchText with ITM rerank: the engine's rerank of the same hits.
    let reranked = client
        .search_text(SearchTextRequest {
            rerank_top_n: 3,
            options: exact(),
            ..text("a cat", 5)
        })
        .await?
        .into_inner();
    let mut want = engine.search_text(
        &store,
        &t,
        &SearchParams {
            top_k: 5,
            exact: true,
            ..Default::default()
        },
    )?;
    engine.rerank(&store, "a cat", &mut want, 3)?;
    for (g, w) in reranked.hits.iter().zip(&want) {
        ensure!(g.image_id == w.image_id, "{reranked:?} vs {want:?}");
        match (g.itm_score, w.itm_score) {
            (Some(a), Some(b)) => ensure!((a - b).abs() < 1e-5, "{a} vs {b}"),
            (None, None) => {}
            other => anyhow::bail!("itm mismatch {other:?}"),
        }
    }
    ensure!(reranked.hits[..3].iter().all(|h| h.itm_score.is_some()));
    ensure!(reranked.hits[3..].iter().all(|h| h.itm_score.is_none()));
    // Pages of a reranked search are slices of the one reranked ranking.
    let page = client
        .search_text(SearchTextRequest {
            rerank_top_n: 3,
            options: Some(SearchOptions {
                offset: 2,
                exact: true,
                ..Default::default()
            }),
            ..text("a cat", 2)
        })
        .await?
        .into_inner();
    ensure!(
        page.hits
            .iter()
            .map(|h| h.image_id)
            .eq(want[2..4].iter().map(|h| h.image_id)),
        "{page:?} vs {want:?}"
    );

    // SearchImage: every indexed photo finds itself first, with similarity 1.
    for name in PHOTOS {
        let bytes = std::fs::read(photo(name))?;
        let r = client
            .search_image(SearchImageRequest {
                image: bytes,
                top_k: 3,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(file_name(&r.hits[0].path) == name, "{name}: {r:?}");
        ensure!((r.hits[0].itc_score - 1.0).abs() < 1e-4, "{name}: {r:?}");
        ensure!(r.hits[1].itc_score < r.hits[0].itc_score);
    }

    // Rerank of given ids: ITM probabilities, ordered, with ITC scores of the same text.
    let ids: Vec<u64> = all.hits.iter().map(|h| h.image_id).collect();
    let r = client
        .rerank(RerankRequest {
            query: "a cat".into(),
            image_ids: ids.clone(),
            with_captions: false,
        })
        .await?
        .into_inner();
    ensure!(r.hits.len() == ids.len());
    let probs: Vec<f32> = r.hits.iter().map(|h| h.itm_score.unwrap_or(-1.0)).collect();
    ensure!(probs.iter().all(|p| (0.0..=1.0).contains(p)), "{probs:?}");
    ensure!(probs.windows(2).all(|w| w[0] >= w[1]), "{probs:?}");
    let itc: HashMap<u64, f32> = all.hits.iter().map(|h| (h.image_id, h.itc_score)).collect();
    for h in &r.hits {
        ensure!((itc[&h.image_id] - h.itc_score).abs() < 1e-5, "{h:?}");
    }
    let itm = engine.itm_many(&store, &[("a cat", &ids)])?.remove(0);
    for (id, p) in ids.iter().zip(itm) {
        let got = r
            .hits
            .iter()
            .find(|h| h.image_id == *id)
            .and_then(|h| h.itm_score);
        ensure!(got.is_some_and(|g| (g - p.as_ref().copied().unwrap_or(-9.0)).abs() < 1e-5));
    }
    let missing = code_of(
        client
            .rerank(RerankRequest {
                query: "a cat".into(),
                image_ids: vec![ids[0], 987_654],
                with_captions: false,
            })
            .await,
    );
    ensure!(missing.code() == Code::NotFound, "{missing:?}");
    ensure!(missing.message().contains("987654"), "{missing:?}");

    // Caption by id and by bytes.
    let c = client
        .caption(CaptionRequest {
            source: Some(caption_request::Source::ImageId(ids[0])),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(
        !c.text.is_empty() && !c.token_ids.is_empty() && !c.cached,
        "{c:?}"
    );
    let c2 = client
        .caption(CaptionRequest {
            source: Some(caption_request::Source::Image(std::fs::read(photo(
                "rocket.jpg",
            ))?)),
            num_beams: Some(2),
            max_new_tokens: Some(8),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(
        !c2.token_ids.is_empty() && c2.token_ids.len() <= 8,
        "{c2:?}"
    );
    // The same tokens as the captioner in this process on the same bytes (that captioner is
    // token-exact with transformers on the golden cases, in the model crate's tests).
    let local = blipdex_model::Captioner::load(
        &caption_model(),
        &LoadOptions::default(),
        blipdex_model::opt::LinearStorage::Float,
    )?;
    let img = local
        .processor
        .load_bytes(&std::fs::read(photo("rocket.jpg"))?, "rocket.jpg")?;
    let request = blipdex_model::CaptionRequest {
        num_beams: Some(2),
        max_new_tokens: Some(8),
        ..Default::default()
    };
    let want = local.generate(&local.pixel_values(&[img])?, &request)?;
    ensure!(
        want.len() == 1 && c2.token_ids == want[0].token_ids && c2.text == want[0].text,
        "{c2:?} vs {want:?}"
    );

    // GetStats.
    let s = client.get_stats(GetStatsRequest {}).await?.into_inner();
    ensure!(s.images == 5 && s.deleted == 0, "{s:?}");
    ensure!(s.model_fingerprint == store.model_fingerprint(), "{s:?}");
    ensure!(
        s.caption_model.contains("caption-a") && s.index_bytes > 0,
        "{s:?}"
    );
    ensure!(
        s.queue_capacity == Limits::default().queue_depth as u64,
        "{s:?}"
    );
    ensure!(s.generation == store.generation());

    // Metrics, over HTTP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let maddr = listener.local_addr()?;
    let (mstop, mstopped) = oneshot::channel::<()>();
    let mtask = tokio::spawn(blipdex_server::serve_metrics(
        server.metrics.clone(),
        listener,
        async {
            let _ = mstopped.await;
        },
    ));
    let body = http_get(maddr, "/metrics").await?;
    for needle in [
        "HTTP/1.1 200 OK",
        r#"blipdex_requests_total{code="OK",rpc="SearchText"}"#,
        r#"blipdex_requests_total{code="NOT_FOUND",rpc="Rerank"}"#,
        r#"blipdex_request_seconds_bucket{rpc="SearchImage""#,
        "blipdex_batch_jobs_count",
        r#"blipdex_batch_items_count{kind="text"}"#,
        r#"blipdex_batch_items_count{kind="itm_pairs"}"#,
        "blipdex_queue_depth",
    ] {
        ensure!(body.contains(needle), "metrics lack {needle}:\n{body}");
    }
    // Whole sample lines: a metric's HELP text may contain "<name> 1" as well.
    for line in ["blipdex_model_loaded 1", "blipdex_index_images 5"] {
        ensure!(
            body.lines().any(|l| l.trim() == line),
            "metrics lack the sample line {line}:\n{body}"
        );
    }
    ensure!(http_get(maddr, "/nope").await?.starts_with("HTTP/1.1 404"));
    let _ = mstop.send(());
    mtask.await??;

    // Reflection lists the service (what grpcurl uses without a proto file).
    let services = reflection_services(server.channel().await?).await?;
    for s in ["blipdex.v1.Retrieval", "grpc.health.v1.Health"] {
        ensure!(services.iter().any(|x| x == s), "{services:?}");
    }
    server.stop().await
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

async fn reflection_services(channel: Channel) -> Result<Vec<String>> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut c = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::once(req))
        .await?
        .into_inner();
    let msg = stream.message().await?.context("no reflection answer")?;
    match msg.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => anyhow::bail!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captions_are_cached_and_written_back_to_the_index() -> Result<()> {
    let ix = index_of(&["rocket.jpg", "astronaut.jpg", "camera_gray.png"])?;
    let server = Running::serving(quick_config(), engine_options(&ix.index, true)).await?;
    let mut client = server.client().await?;
    let hits = client
        .search_text(text("a rocket", 3))
        .await?
        .into_inner()
        .hits;
    let id = hits[0].image_id;
    ensure!(hits.iter().all(|h| h.caption.is_empty()), "{hits:?}");

    let by_id = |id| CaptionRequest {
        source: Some(caption_request::Source::ImageId(id)),
        ..Default::default()
    };
    let first = client.caption(by_id(id)).await?.into_inner();
    ensure!(
        !first.cached && !first.text.is_empty() && !first.token_ids.is_empty(),
        "{first:?}"
    );
    let again = client.caption(by_id(id)).await?.into_inner();
    ensure!(
        again.cached && again.text == first.text,
        "{again:?} vs {first:?}"
    );

    // A photo that is not in the index.
    let bytes = std::fs::read(photo("chelsea_alpha.png"))?;
    let by_bytes = || CaptionRequest {
        source: Some(caption_request::Source::Image(bytes.clone())),
        ..Default::default()
    };
    let b1 = client.caption(by_bytes()).await?.into_inner();
    let b2 = client.caption(by_bytes()).await?.into_inner();
    ensure!(!b1.cached && b2.cached && b1.text == b2.text && b1.token_ids == b2.token_ids);

    let unknown = code_of(client.caption(by_id(424_242)).await);
    ensure!(unknown.code() == Code::NotFound, "{unknown:?}");
    let none = code_of(client.caption(CaptionRequest::default()).await);
    ensure!(none.code() == Code::InvalidArgument, "{none:?}");
    let beams = code_of(
        client
            .caption(CaptionRequest {
                num_beams: Some(0),
                ..by_id(id)
            })
            .await,
    );
    ensure!(beams.code() == Code::InvalidArgument, "{beams:?}");

    // with_captions fills every hit (the one captioned above keeps its caption).
    let with = client
        .search_text(SearchTextRequest {
            with_captions: true,
            ..text("a rocket", 3)
        })
        .await?
        .into_inner();
    ensure!(with.hits.iter().all(|h| !h.caption.is_empty()), "{with:?}");
    let same = with.hits.iter().find(|h| h.image_id == id).context("hit")?;
    ensure!(same.caption == first.text);

    // Shutdown writes the captions into the index.
    server.stop().await?;
    let store = blipdex_store::Store::open_readonly(&ix.index)?;
    let row = store.get(id).context("row")?;
    ensure!(
        row.caption.as_deref() == Some(first.text.as_str()),
        "{row:?}"
    );
    ensure!(store.iter().filter(|r| r.caption.is_some()).count() == 3);

    // A restarted server serves them from the index without running the model.
    let server = Running::serving(quick_config(), engine_options(&ix.index, true)).await?;
    let mut client = server.client().await?;
    let stored = client.caption(by_id(id)).await?.into_inner();
    ensure!(stored.cached && stored.text == first.text, "{stored:?}");
    let hits = client
        .search_text(text("a rocket", 3))
        .await?
        .into_inner()
        .hits;
    ensure!(hits.iter().all(|h| !h.caption.is_empty()), "{hits:?}");
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_the_server_keeps_serving() -> Result<()> {
    let ix = index_of(&PHOTOS)?;
    let config = ServerConfig {
        limits: Limits {
            max_message_bytes: 256 << 10,
            ..Limits::default()
        },
        ..quick_config()
    };
    let server = Running::serving(config, engine_options(&ix.index, false)).await?;
    let mut client = server.client().await?;
    still_serving(&mut client).await?;

    let expect = |s: tonic::Status, code: Code, words: &str| -> Result<()> {
        ensure!(s.code() == code, "expected {code:?}: {s:?}");
        ensure!(s.message().contains(words), "{words:?} not in {s:?}");
        Ok(())
    };
    for q in ["", "   \n"] {
        let s = code_of(client.search_text(text(q, 3)).await);
        expect(s, Code::InvalidArgument, "query is empty")?;
        still_serving(&mut client).await?;
    }
    let long = "x".repeat(5000);
    expect(
        code_of(client.search_text(text(&long, 3)).await),
        Code::InvalidArgument,
        "at most 4096",
    )?;
    expect(
        code_of(client.search_text(text("a cat", 1_000_000)).await),
        Code::InvalidArgument,
        "top_k",
    )?;
    expect(
        code_of(
            client
                .search_text(SearchTextRequest {
                    rerank_top_n: 5000,
                    ..text("a cat", 3)
                })
                .await,
        ),
        Code::InvalidArgument,
        "rerank_top_n",
    )?;
    expect(
        code_of(
            client
                .search_text(SearchTextRequest {
                    options: Some(SearchOptions {
                        min_score: Some(f32::NAN),
                        ..Default::default()
                    }),
                    ..text("a cat", 3)
                })
                .await,
        ),
        Code::InvalidArgument,
        "min_score",
    )?;
    still_serving(&mut client).await?;

    let image = |bytes: Vec<u8>| SearchImageRequest {
        image: bytes,
        top_k: 3,
        ..Default::default()
    };
    expect(
        code_of(client.search_image(image(Vec::new())).await),
        Code::InvalidArgument,
        "image is empty",
    )?;
    expect(
        code_of(
            client
                .search_image(image(b"not an image at all".to_vec()))
                .await,
        ),
        Code::InvalidArgument,
        "cannot decode",
    )?;
    let jpeg = std::fs::read(photo("rocket.jpg"))?;
    let truncated = jpeg[..jpeg.len() / 3].to_vec();
    let s = code_of(client.search_image(image(truncated)).await);
    ensure!(s.code() == Code::InvalidArgument, "{s:?}");
    expect(
        code_of(client.search_image(image(png_bomb(100_000, 100_000))).await),
        Code::InvalidArgument,
        "--max-image-pixels",
    )?;
    still_serving(&mut client).await?;
    // Over the message size limit: refused by the transport, the connection stays usable.
    expect(
        code_of(client.search_image(image(vec![0u8; 512 << 10])).await),
        Code::InvalidArgument,
        "--max-message-bytes",
    )?;
    still_serving(&mut client).await?;
    // Good and bad requests batched together: only the bad one fails.
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut c = client.clone();
        let bytes = if i % 2 == 0 {
            jpeg.clone()
        } else {
            b"garbage".to_vec()
        };
        calls.push(tokio::spawn(
            async move { c.search_image(image(bytes)).await },
        ));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let r = call.await?;
        if i % 2 == 0 {
            ensure!(file_name(&r?.into_inner().hits[0].path) == "rocket.jpg");
        } else {
            ensure!(code_of(r).code() == Code::InvalidArgument);
        }
    }

    expect(
        code_of(
            client
                .rerank(RerankRequest {
                    query: "a cat".into(),
                    image_ids: Vec::new(),
                    with_captions: false,
                })
                .await,
        ),
        Code::InvalidArgument,
        "image_ids is empty",
    )?;
    expect(
        code_of(
            client
                .rerank(RerankRequest {
                    query: String::new(),
                    image_ids: vec![0],
                    with_captions: false,
                })
                .await,
        ),
        Code::InvalidArgument,
        "query is empty",
    )?;
    // No caption model: FAILED_PRECONDITION that says how to get one.
    let caption = CaptionRequest {
        source: Some(caption_request::Source::ImageId(0)),
        ..Default::default()
    };
    expect(
        code_of(client.caption(caption).await),
        Code::FailedPrecondition,
        "--caption-model",
    )?;
    expect(
        code_of(
            client
                .search_text(SearchTextRequest {
                    with_captions: true,
                    ..text("a cat", 3)
                })
                .await,
        ),
        Code::FailedPrecondition,
        "--caption-model",
    )?;
    still_serving(&mut client).await?;
    let s = client.get_stats(GetStatsRequest {}).await?.into_inner();
    ensure!(s.caption_model.is_empty() && s.images == 5, "{s:?}");
    server.stop().await
}

/// Sends bytes as they are (to send what no generated client would).
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> std::result::Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> std::result::Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// The value of one sample line of the metrics text, 0 when absent.
fn sample(metrics: &Metrics, line_start: &str) -> f64 {
    String::from_utf8_lossy(&metrics.render())
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A request that is not valid protobuf for its message (here a query that is not UTF-8) is
/// the client's error, INVALID_ARGUMENT, and is counted like every other request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_argument_and_counted() -> Result<()> {
    let ix = index_of(&["rocket.jpg"])?;
    let server = Running::serving(quick_config(), engine_options(&ix.index, false)).await?;
    let counted = r#"blipdex_requests_total{code="INVALID_ARGUMENT",rpc="SearchText"}"#;
    let before = sample(&server.metrics, counted);
    let mut raw = tonic::client::Grpc::new(server.channel().await?);
    raw.ready().await?;
    // Field 1 (query, a string), two bytes that are not UTF-8.
    let bad = vec![0x0a, 0x02, 0xff, 0xfe];
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/blipdex.v1.Retrieval/SearchText");
    let s = code_of(raw.unary(tonic::Request::new(bad), path, RawCodec).await);
    ensure!(
        s.code() == Code::InvalidArgument && s.message().contains("SearchTextRequest"),
        "{s:?}"
    );
    ensure!(
        s.metadata().get("x-blipdex-undecodable").is_none(),
        "internal mark leaked: {s:?}"
    );
    ensure!(sample(&server.metrics, counted) == before + 1.0);
    let mut client = server.client().await?;
    still_serving_n(&mut client, 1).await?;
    server.stop().await
}

/// A PNG header claiming `w`×`h` pixels, with no pixel data.
fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend(kind);
        out.extend(data);
        out.extend(crc.finalize().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    // zlib of nothing: the decoder reaches the pixel data (and the size check) first.
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_the_model_is_loaded() -> Result<()> {
    let ix = index_of(&["rocket.jpg", "astronaut.jpg"])?;
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let opts = engine_options(&ix.index, false);
    let server = Server::with_loader(quick_config(), move || {
        let _ = wait.recv();
        Engine::load(&opts)
    })?;
    let server = Running::start(server).await?;
    for service in ["", "blipdex.v1.Retrieval"] {
        ensure!(server.health(service).await? == ServingStatus::NotServing);
    }
    let mut client = server.client().await?;
    let s = code_of(client.search_text(text("a rocket", 1)).await);
    ensure!(
        s.code() == Code::Unavailable && s.message().contains("loading"),
        "{s:?}"
    );
    go.send(())?;
    server.wait_serving().await?;
    ensure!(server.health("blipdex.v1.Retrieval").await? == ServingStatus::Serving);
    still_serving_n(&mut client, 2).await?;
    server.stop().await?;

    // A model that cannot load: the server stops with the reason.
    let server = Server::with_loader(quick_config(), || {
        Err(blipdex_core::Error::bad_model("broken", "no weights"))
    })?;
    let err = Running::start(server)
        .await?
        .task
        .await?
        .expect_err("load failure must stop the server");
    ensure!(format!("{err:#}").contains("no weights"), "{err:#}");
    Ok(())
}

async fn still_serving_n(client: &mut RetrievalClient<Channel>, n: usize) -> Result<()> {
    let r = client.search_text(text("a rocket", 5)).await?.into_inner();
    ensure!(r.hits.len() == n, "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_picks_up_a_later_ingest() -> Result<()> {
    let ix = index_of(&["astronaut.jpg", "camera_gray.png", "chelsea_alpha.png"])?;
    let server = Running::serving(quick_config(), engine_options(&ix.index, false)).await?;
    let mut client = server.client().await?;
    let before = client.get_stats(GetStatsRequest {}).await?.into_inner();
    ensure!(before.images == 3);
    let rocket = std::fs::read(photo("rocket.jpg"))?;
    let r = client
        .search_image(SearchImageRequest {
            image: rocket.clone(),
            top_k: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(file_name(&r.hits[0].path) != "rocket.jpg");

    // Ingest two more photos into the same index while the server runs, querying meanwhile:
    // every answer comes from a complete generation.
    let (folder, index) = (ix.folder.clone(), ix.index.clone());
    let ingesting = tokio::task::spawn_blocking(move || {
        ingest(&folder, &index, &["rocket.jpg", "coffee_palette.gif"])
    });
    while !ingesting.is_finished() {
        let s = client.search_text(text("a rocket", 10)).await?.into_inner();
        ensure!(s.hits.len() == 3 || s.hits.len() == 5, "{s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ingesting.await??;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = client.get_stats(GetStatsRequest {}).await?.into_inner();
        if s.images == 5 {
            ensure!(s.generation > before.generation);
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "new photos never showed up: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client
        .search_image(SearchImageRequest {
            image: rocket,
            top_k: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(file_name(&r.hits[0].path) == "rocket.jpg", "{r:?}");
    still_serving_n(&mut client, 5).await?;
    server.stop().await
}

/// "A query sees one committed generation": a writer commits five generations one image at a
/// time, each only after a client has been answered from the one before, while the client
/// keeps querying. Every answer holds exactly the images of the generation it names, and the
/// client sees every generation (so the check runs against each one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_comes_from_one_committed_generation() -> Result<()> {
    const COMMITS: usize = 5;
    let ix = index_of(&["astronaut.jpg", "camera_gray.png", "chelsea_alpha.png"])?;
    let server = Running::serving(quick_config(), engine_options(&ix.index, false)).await?;
    let mut client = server.client().await?;
    let first = client.get_stats(GetStatsRequest {}).await?.into_inner();
    // generation -> images it holds, filled by the writer before it commits nothing else.
    let counts = std::sync::Arc::new(std::sync::Mutex::new(HashMap::from([(
        first.generation,
        3usize,
    )])));
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<u64>();
    let index = ix.index.clone();
    let writer_counts = counts.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut store = blipdex_store::Store::open_writable(&index)?;
        let model = store.iter().next().context("an image")?;
        let embeds = store.embeds(model.image_id).context("embeddings")?;
        let mut waiting_for = first.generation;
        for i in 0..COMMITS {
            // Until the client was answered from the previous generation.
            let deadline = Instant::now() + Duration::from_secs(30);
            while seen_rx.recv_timeout(Duration::from_millis(50)).ok() != Some(waiting_for) {
                ensure!(
                    Instant::now() < deadline,
                    "generation {waiting_for} never served"
                );
            }
            let mut batch = blipdex_store::Batch::new();
            let path = format!("/copies/{i}.jpg");
            batch.add(blipdex_store::ImageRecord {
                path: path.clone(),
                paths: vec![path],
                content_hash: blipdex_store::content_hash_bytes(format!("copy {i}").as_bytes()),
                embeds: embeds.clone(),
                ..model_record(&model)
            });
            // The count is known before the generation can be served.
            let next = store.generation() + 1;
            writer_counts
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .insert(next, 4 + i);
            let info = store.commit(batch)?;
            ensure!(info.generation == next, "{} != {next}", info.generation);
            waiting_for = next;
        }
        Ok(())
    });
    let mut generations = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while generations.len() < COMMITS + 1 {
        ensure!(Instant::now() < deadline, "saw only {generations:?}");
        let mut q = text("a photo", 100);
        q.options = exact();
        let r = client.search_text(q).await?.into_inner();
        let want = counts
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .get(&r.generation)
            .copied();
        ensure!(
            want == Some(r.hits.len()),
            "generation {} answered with {} hits, it holds {want:?}",
            r.generation,
            r.hits.len()
        );
        generations.insert(r.generation);
        let _ = seen_tx.send(r.generation);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await??;
    server.stop().await
}

/// The fields of a new record copied from an existing row (the test's copies differ in path
/// and content hash only).
fn model_record(row: &blipdex_store::ImageRow) -> blipdex_store::ImageRecord {
    blipdex_store::ImageRecord {
        path: row.path.clone(),
        paths: row.paths.clone(),
        content_hash: row.content_hash.clone(),
        width: row.width,
        height: row.height,
        file_size: row.file_size,
        mtime_ns: row.mtime_ns,
        embeds: Vec::new(),
        caption: None,
        meta: row.meta.clone(),
    }
}

/// Shutdown (what SIGTERM triggers in `run_until_signal`) with requests in flight and captions
/// pending: every request queued before it is answered, and the pending captions are in the
/// index afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_flushes_captions() -> Result<()> {
    const REQUESTS: usize = 200;
    let ix = index_of(&["rocket.jpg", "astronaut.jpg"])?;
    let config = ServerConfig {
        limits: Limits {
            max_batch: 1,
            ..Limits::default()
        },
        // Captions are written at shutdown only.
        caption_flush_every: None,
        ..quick_config()
    };
    let server = Running::serving(config, engine_options(&ix.index, true)).await?;
    let mut client = server.client().await?;
    let ids: Vec<u64> = client
        .search_text(text("a rocket", 2))
        .await?
        .into_inner()
        .hits
        .iter()
        .map(|h| h.image_id)
        .collect();
    ensure!(ids.len() == 2);
    for &id in &ids {
        client
            .caption(CaptionRequest {
                source: Some(caption_request::Source::ImageId(id)),
                ..Default::default()
            })
            .await?;
    }
    let stats = client.get_stats(GetStatsRequest {}).await?.into_inner();
    ensure!(stats.captions_pending == 2, "{stats:?}");

    // Many captions of distinct prompts (none cached), one per model turn: a queue that takes
    // a while to drain.
    let bytes = std::fs::read(photo("rocket.jpg"))?;
    let mut calls = Vec::new();
    for i in 0..REQUESTS {
        let mut c = client.clone();
        let request = CaptionRequest {
            source: Some(caption_request::Source::Image(bytes.clone())),
            prompt: format!("Question: what is in photo {i}? Answer:"),
            ..Default::default()
        };
        calls.push(tokio::spawn(async move { c.caption(request).await }));
    }
    let queued = || {
        server
            .metrics
            .queue_depth
            .with_label_values(&["caption"])
            .get()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while queued() < 5 {
        ensure!(Instant::now() < deadline, "the caption queue never filled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let waiting = queued();
    let index = ix.index.clone();
    let server_metrics = server.metrics.clone();
    server.stop().await?;
    let (mut answered, mut refused) = (0, Vec::new());
    for call in calls {
        match call.await? {
            Ok(r) => {
                ensure!(!r.into_inner().token_ids.is_empty());
                answered += 1;
            }
            Err(status) => refused.push(status.code()),
        }
    }
    let handled = |code: &str| {
        server_metrics
            .requests
            .with_label_values(&["Caption", code])
            .get()
    };
    println!(
        "shutdown with {waiting} queued: {answered} answered, {} refused by the client's \
         transport",
        refused.len()
    );
    // Every request the server took was answered: the queued ones drained, none failed on the
    // server's side. The client's refusals are streams it opened after the server's GOAWAY,
    // which never reached a handler (a client retries those on another connection).
    ensure!(
        answered >= waiting as usize,
        "{answered} answered, {waiting} were queued at shutdown"
    );
    ensure!(
        handled("OK") == answered as u64 + 2,
        "the server answered {} requests OK, the client got {answered} + 2",
        handled("OK")
    );
    for code in [
        "CANCELLED",
        "INTERNAL",
        "UNAVAILABLE",
        "RESOURCE_EXHAUSTED",
        "UNKNOWN",
    ] {
        ensure!(
            handled(code) == 0,
            "{} requests ended {code} on the server",
            handled(code)
        );
    }
    let store = blipdex_store::Store::open_readonly(&index)?;
    for id in ids {
        let row = store.get(id).context("row")?;
        ensure!(
            row.caption.as_deref().is_some_and(|c| !c.is_empty()),
            "caption of {id} not flushed at shutdown: {row:?}"
        );
    }
    Ok(())
}

/// A caption flush waits (seconds) for a writer lock someone else holds; a new generation
/// committed meanwhile must still be served at once: reload never waits behind a flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_does_not_wait_behind_a_caption_flush() -> Result<()> {
    let ix = index_of(&["rocket.jpg", "astronaut.jpg"])?;
    let config = ServerConfig {
        caption_flush_every: Some(Duration::from_millis(100)),
        ..quick_config()
    };
    let server = Running::serving(config, engine_options(&ix.index, true)).await?;
    let mut client = server.client().await?;
    let hits = client
        .search_text(text("a rocket", 2))
        .await?
        .into_inner()
        .hits;
    let (a, b) = (hits[0].image_id, hits[1].image_id);
    // The writer lock held here, as an ingest would, then a caption queued for write-back (in
    // this order: a flush finds nothing to write before the caption exists, so it never holds
    // the lock when this test takes it).
    let index = ix.index.clone();
    let mut writer = blocking(move || blipdex_store::Store::open_writable(&index)).await?;
    let by_id = CaptionRequest {
        source: Some(caption_request::Source::ImageId(a)),
        ..Default::default()
    };
    client.caption(by_id).await?;
    let before = client.get_stats(GetStatsRequest {}).await?.into_inner();
    // Flush ticks now wait for the lock, up to 5 s each.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (writer, info) = blocking(move || {
        let info = writer.set_caption(b, "set by the ingest");
        (writer, info)
    })
    .await;
    let generation = info?.generation;
    let committed = Instant::now();
    loop {
        let s = client.get_stats(GetStatsRequest {}).await?.into_inner();
        if s.generation == generation {
            break;
        }
        ensure!(
            s.generation == before.generation && committed.elapsed() < Duration::from_secs(2),
            "generation {generation} not served after {:?}: {s:?}",
            committed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once the lock is free the queued caption is written.
    drop(writer);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = client.get_stats(GetStatsRequest {}).await?.into_inner();
        if s.captions_pending == 0 && s.generation > generation {
            break;
        }
        ensure!(Instant::now() < deadline, "caption never written: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_auth_on_and_off() -> Result<()> {
    let ix = index_of(&["rocket.jpg", "astronaut.jpg"])?;
    let config = ServerConfig {
        auth_token: Some("s3cret-token".into()),
        ..quick_config()
    };
    let server = Running::serving(config, engine_options(&ix.index, false)).await?;
    let channel = server.channel().await?;
    let mut anonymous = RetrievalClient::new(channel.clone());
    let s = code_of(anonymous.search_text(text("a rocket", 1)).await);
    ensure!(
        s.code() == Code::Unauthenticated && s.message().contains("missing"),
        "{s:?}"
    );
    for bad in [
        "Bearer wrong",
        "Basic s3cret-token",
        "Bearer s3cret-token-and-more",
    ] {
        let mut req = tonic::Request::new(text("a rocket", 1));
        req.metadata_mut().insert("authorization", bad.parse()?);
        let s = code_of(anonymous.search_text(req).await);
        ensure!(s.code() == Code::Unauthenticated, "{bad}: {s:?}");
    }
    // Two authorization headers, even with the right token first, are refused.
    let mut req = tonic::Request::new(text("a rocket", 1));
    req.metadata_mut()
        .append("authorization", "Bearer s3cret-token".parse()?);
    req.metadata_mut()
        .append("authorization", "Bearer wrong".parse()?);
    let s = code_of(anonymous.search_text(req).await);
    ensure!(
        s.code() == Code::Unauthenticated && s.message().contains("more than one"),
        "{s:?}"
    );
    let token: tonic::metadata::MetadataValue<_> = "Bearer s3cret-token".parse()?;
    let mut authed = RetrievalClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", token.clone());
        Ok(r)
    });
    let r = authed.search_text(text("a rocket", 1)).await?.into_inner();
    ensure!(r.hits.len() == 1);
    authed.get_stats(GetStatsRequest {}).await?;
    // Health stays open for load balancers.
    ensure!(server.health("").await? == ServingStatus::Serving);
    server.stop().await?;

    // Without a token configured, no metadata is needed.
    let server = Running::serving(quick_config(), engine_options(&ix.index, false)).await?;
    let mut client = server.client().await?;
    still_serving_n(&mut client, 2).await?;
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_with_the_given_certificate() -> Result<()> {
    let ix = index_of(&["rocket.jpg", "astronaut.jpg"])?;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let (cert, key) = (ck.cert.pem(), ck.key_pair.serialize_pem());
    let config = ServerConfig {
        tls: Some(blipdex_server::TlsPem {
            cert: cert.clone().into_bytes(),
            key: key.into_bytes(),
        }),
        ..quick_config()
    };
    let server = Running::start(Server::new(config, engine_options(&ix.index, false))?).await?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", server.addr))?
        .tls_config(tls)?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while health
        .check(HealthCheckRequest::default())
        .await?
        .into_inner()
        .status()
        != ServingStatus::Serving
    {
        ensure!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut client = RetrievalClient::new(channel);
    still_serving_n(&mut client, 2).await?;
    // Plaintext is refused.
    let plain = Channel::from_shared(format!("http://{}", server.addr))?
        .connect()
        .await;
    if let Ok(plain) = plain {
        ensure!(RetrievalClient::new(plain)
            .search_text(text("a rocket", 1))
            .await
            .is_err());
    }
    server.stop().await
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// `n` concurrent SearchText calls; (latencies of the successes, status codes of the failures).
async fn burst(client: &RetrievalClient<Channel>, n: usize) -> Result<(Vec<Duration>, Vec<Code>)> {
    let words = [
        "a rocket",
        "a cat",
        "coffee",
        "an astronaut",
        "a camera man",
        "a red cup",
    ];
    let mut calls = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = client.clone();
        let q = format!("{} number {i}", words[i % words.len()]);
        calls.push(tokio::spawn(async move {
            let start = Instant::now();
            let r = c.search_text(text(&q, 5)).await;
            (start.elapsed(), r.map(|r| r.into_inner()))
        }));
    }
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for call in calls {
        let (t, r) = call.await?;
        match r {
            Ok(SearchResponse { hits, .. }) => {
                ensure!(hits.len() == 5);
                ok.push(t);
            }
            Err(s) => failed.push(s.code()),
        }
    }
    Ok((ok, failed))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_hundreds_of_concurrent_searches() -> Result<()> {
    const CONCURRENT: usize = 300;
    const ROUNDS: usize = 4;
    let ix = index_of(&PHOTOS)?;
    let server = Running::serving(quick_config(), engine_options(&ix.index, false)).await?;
    let client = server.client().await?;
    // Warm-up round: allocator pools, connection windows, caches.
    let (ok, failed) = burst(&client, CONCURRENT).await?;
    ensure!(failed.is_empty() && ok.len() == CONCURRENT, "{failed:?}");
    let rss_before = rss_kib();
    let start = Instant::now();
    let mut lat = Vec::new();
    for _ in 0..ROUNDS {
        let (ok, failed) = burst(&client, CONCURRENT).await?;
        ensure!(
            failed.is_empty(),
            "with the default queue none may fail: {failed:?}"
        );
        lat.extend(ok);
    }
    let wall = start.elapsed();
    let rss_after = rss_kib();
    lat.sort();
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let batches = server.metrics.batch_jobs.get_sample_count();
    let mean_batch = server.metrics.batch_jobs.get_sample_sum() / batches.max(1) as f64;
    println!(
        "load: {} SearchText calls ({CONCURRENT} concurrent x {ROUNDS}) in {:.2}s = {:.0}/s; \
         p50 {:.1} ms, p99 {:.1} ms; {batches} model batches, mean {mean_batch:.1} requests; \
         RSS {} -> {} MiB",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        rss_before / 1024,
        rss_after / 1024
    );
    // What holds whatever the timing: every request answered, with its hits. The figures above
    // (rate, latency, batching, this process's RSS, which other tests share) are printed, not
    // asserted; batching is tested without timing in the worker's unit test.
    ensure!(lat.len() == CONCURRENT * ROUNDS);
    server.stop().await?;

    // A tiny queue sheds load with RESOURCE_EXHAUSTED instead of queueing without bound, and
    // the server answers normally afterwards.
    let config = ServerConfig {
        limits: Limits {
            queue_depth: 2,
            max_batch: 1,
            ..Limits::default()
        },
        ..quick_config()
    };
    let server = Running::serving(config, engine_options(&ix.index, false)).await?;
    let mut client = server.client().await?;
    let (ok, failed) = burst(&client, 200).await?;
    // How many are refused depends on timing (the model may keep up); what is refused is
    // refused as RESOURCE_EXHAUSTED, every request gets one of the two answers, and the server
    // answers normally afterwards.
    ensure!(
        failed.iter().all(|c| *c == Code::ResourceExhausted),
        "{failed:?}"
    );
    ensure!(ok.len() + failed.len() == 200);
    println!(
        "tiny queue: {} ok, {} RESOURCE_EXHAUSTED",
        ok.len(),
        failed.len()
    );
    still_serving(&mut client).await?;
    server.stop().await
}

/// EXIF filters and "more like this" over gRPC: the same parsing and rules as the HTTP API
/// (one implementation in blipdex-search), hits carry the metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exif_filters_and_more_like_this() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let folder = tmp.path().join("photos");
    let index = tmp.path().join("index");
    std::fs::create_dir_all(&folder)?;
    for n in [
        "oslo_nikon.jpg",
        "sydney_iphone.jpg",
        "no_exif.jpg",
        "date_no_gps.jpg",
    ] {
        std::fs::copy(fixtures().join("photos-meta").join(n), folder.join(n))?;
    }
    ingest(&folder, &index, &[])?;
    let server = Running::serving(quick_config(), engine_options(&index, false)).await?;
    let mut client = server.client().await?;
    let search = |options: SearchOptions| SearchTextRequest {
        options: Some(options),
        ..text("a photo", 10)
    };
    let names_of = |r: &SearchResponse| -> Vec<String> {
        let mut v: Vec<String> = r
            .hits
            .iter()
            .map(|h| file_name(&h.path).to_string())
            .collect();
        v.sort();
        v
    };
    let located = client
        .search_text(search(SearchOptions {
            has_location: Some(true),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(names_of(&located), ["oslo_nikon.jpg", "sydney_iphone.jpg"]);
    let oslo = located
        .hits
        .iter()
        .find(|h| h.path.ends_with("oslo_nikon.jpg"))
        .context("oslo")?;
    assert!(
        oslo.latitude.is_some_and(|l| (l - 59.9139).abs() < 1e-9),
        "{oslo:?}"
    );
    assert!(
        oslo.camera_model.contains("D750") && oslo.taken_at.starts_with("2019-"),
        "{oslo:?}"
    );
    let south = client
        .search_text(search(SearchOptions {
            near: Some(blipdex_server::pb::GeoCircle {
                lat: -33.87,
                lon: 151.21,
                radius_km: 20.0,
            }),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert_eq!(names_of(&south), ["sydney_iphone.jpg"]);
    let nikon_newest = client
        .search_text(search(SearchOptions {
            camera: "nikon".into(),
            sort: blipdex_server::pb::SortBy::DateDesc as i32,
            ..Default::default()
        }))
        .await?
        .into_inner();
    let order: Vec<&str> = nikon_newest
        .hits
        .iter()
        .map(|h| file_name(&h.path))
        .collect();
    assert_eq!(order, ["oslo_nikon.jpg", "date_no_gps.jpg"]);
    // The same without a query: browsing, unscored; a blank query in score order is refused.
    let browsed = client
        .search_text(SearchTextRequest {
            query: String::new(),
            ..search(SearchOptions {
                camera: "nikon".into(),
                sort: blipdex_server::pb::SortBy::DateDesc as i32,
                ..Default::default()
            })
        })
        .await?
        .into_inner();
    let order: Vec<&str> = browsed.hits.iter().map(|h| file_name(&h.path)).collect();
    assert_eq!(order, ["oslo_nikon.jpg", "date_no_gps.jpg"]);
    assert!(browsed.hits.iter().all(|h| h.itc_score == 0.0));
    let refused = client
        .search_text(SearchTextRequest {
            query: " ".into(),
            ..search(SearchOptions::default())
        })
        .await
        .expect_err("blank query in score order");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // More like this, by id.
    let first = located.hits[0].image_id;
    let like = client
        .search_image(SearchImageRequest {
            image_id: Some(first),
            top_k: 4,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(like.hits[0].image_id, first);
    assert!((like.hits[0].itc_score - 1.0).abs() < 1e-5);

    // Refusals.
    for (what, options) in [
        (
            "date",
            SearchOptions {
                taken_before: "31/12/2019".into(),
                ..Default::default()
            },
        ),
        (
            "sort",
            SearchOptions {
                sort: 7,
                ..Default::default()
            },
        ),
    ] {
        let s = code_of(client.search_text(search(options)).await);
        assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
    }
    let s = code_of(
        client
            .search_image(SearchImageRequest {
                image_id: Some(first),
                image: vec![1, 2, 3],
                ..Default::default()
            })
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = code_of(
        client
            .search_image(SearchImageRequest {
                image_id: Some(999_999),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    server.stop().await
}
