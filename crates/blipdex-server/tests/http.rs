//! The HTTP/JSON API over loopback with a plain HTTP client (ureq), on an index of the EXIF
//! fixture photos (`tests/fixtures/photos-meta`, whose metadata the generator lists in
//! `expected.json`) built with the tiny fixture checkpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use base64::Engine as _;
use blipdex_ingest::IngestJob;
use blipdex_model::{LoadOptions, ModelFiles, Retriever};
use blipdex_search::{Answer, Engine, EngineOptions, Query, SearchParams};
use blipdex_server::{Limits, Server, ServerConfig};
use serde_json::{json, Value};

const TOKEN: &str = "s3cret-token";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model(name: &str) -> ModelFiles {
    ModelFiles::resolve(
        &fixtures().join("models").join(name).to_string_lossy(),
        None,
    )
    .expect("fixture checkpoint")
}

/// file name -> what its EXIF holds, as the fixture generator wrote it.
fn expected() -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(fixtures().join("photos-meta/expected.json"))
        .expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

struct Album {
    _tmp: tempfile::TempDir,
    folder: PathBuf,
    index: PathBuf,
}

/// The EXIF fixture photos plus one photo without any (astronaut.jpg), ingested.
fn album() -> Result<Album> {
    let tmp = tempfile::tempdir()?;
    let folder = tmp.path().join("photos");
    let index = tmp.path().join("index");
    std::fs::create_dir_all(&folder)?;
    for name in expected().keys() {
        std::fs::copy(fixtures().join("photos-meta").join(name), folder.join(name))?;
    }
    std::fs::copy(
        fixtures().join("photos/astronaut.jpg"),
        folder.join("astronaut.jpg"),
    )?;
    let files = model("itm-a");
    let retriever = Retriever::load(&files, &LoadOptions::default())?;
    let job = IngestJob {
        roots: vec![folder.clone()],
        index: Some(index.clone()),
        model: Some(files.name.clone()),
        batch_size: 4,
        ..IngestJob::default()
    };
    let summary = blipdex_ingest::ingest(&job, &retriever)?;
    ensure!(summary.rejected == 0, "{summary:?}");
    Ok(Album {
        _tmp: tmp,
        folder,
        index,
    })
}

/// A server with the HTTP API (and a token), stopped on drop.
struct Running {
    rt: tokio::runtime::Runtime,
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    fn start(index: &Path, limits: Limits) -> Result<Self> {
        let rt = tokio::runtime::Runtime::new()?;
        let mut engine = EngineOptions::new(index, model("itm-a"));
        engine.caption_model = Some(model("caption-a"));
        let config = ServerConfig {
            limits,
            auth_token: Some(TOKEN.into()),
            refresh_every: Some(Duration::from_millis(100)),
            caption_flush_every: None,
            ..ServerConfig::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (base, task) = rt.block_on(async {
            let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let base = format!("http://{}", http.local_addr()?);
            let server = Server::new(config, engine)?.with_http(http);
            let task = tokio::spawn(server.run(grpc, async {
                let _ = stopped.await;
            }));
            anyhow::Ok((base, task))
        })?;
        let r = Self {
            rt,
            base,
            stop: Some(stop),
            task: Some(task),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, body) = r.call("GET", "/api/v1/health", None, false)?;
            ensure!(code == 200, "health answered {code}: {body}");
            if body["status"] == "serving" {
                return Ok(r);
            }
            ensure!(Instant::now() < deadline, "never serving: {body}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn request(&self, method: &str, path: &str, auth: bool) -> ureq::Request {
        let r =
            ureq::request(method, &format!("{}{path}", self.base)).timeout(Duration::from_secs(60));
        if auth {
            r.set("Authorization", &format!("Bearer {TOKEN}"))
        } else {
            r
        }
    }

    /// (status, JSON body) of a call; error statuses are answers too.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        auth: bool,
    ) -> Result<(u16, Value)> {
        let req = self.request(method, path, auth);
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e).context(format!("{method} {path}")),
        };
        let code = resp.status();
        let text = resp.into_string()?;
        let v = serde_json::from_str(&text).with_context(|| format!("not JSON: {text:?}"))?;
        Ok((code, v))
    }

    fn post(&self, path: &str, body: Value) -> Result<Value> {
        let (code, v) = self.call("POST", path, Some(body.clone()), true)?;
        ensure!(code == 200, "POST {path} {body} answered {code}: {v}");
        Ok(v)
    }

    /// (status, headers we check, body bytes) of a GET with extra headers.
    fn get_bytes(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Option<String>, Vec<u8>)> {
        let mut req = self.request("GET", path, true);
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.into()),
        };
        let code = resp.status();
        let etag = resp.header("etag").map(str::to_owned);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut bytes)?;
        Ok((code, etag, bytes))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = self.rt.block_on(t);
        }
    }
}

fn names(v: &Value) -> Vec<String> {
    v["hits"]
        .as_array()
        .map(|hits| {
            hits.iter()
                .map(|h| {
                    Path::new(h["path"].as_str().unwrap_or(""))
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn set(v: &Value) -> BTreeSet<String> {
    names(v).into_iter().collect()
}

/// Every filter returns exactly the photos whose EXIF (as the generator wrote it) matches,
/// whatever the text; the date orders sort by it; hits carry the metadata.
#[test]
fn filters_return_exactly_the_matching_photos() -> Result<()> {
    let album = album()?;
    let server = Running::start(&album.index, Limits::default())?;
    let exp = expected();
    let all: BTreeSet<String> = exp
        .keys()
        .cloned()
        .chain(["astronaut.jpg".to_string()])
        .collect();
    let matching = |f: &dyn Fn(&Value) -> bool| -> BTreeSet<String> {
        exp.iter()
            .filter(|(_, m)| f(m))
            .map(|(n, _)| n.clone())
            .collect()
    };
    let search = |filters: Value| -> Result<Value> {
        server.post(
            "/api/v1/search/text",
            json!({"query": "a photo", "top_k": 100, "filters": filters}),
        )
    };
    let everything = search(json!({}))?;
    assert_eq!(set(&everything), all);

    // 2019, by the camera's clock: 2019-01-01T00:00:00 is 1546300800 s, 2020-01-01 1577836800.
    let in_2019 = matching(&|m| {
        m["taken_at"]
            .as_i64()
            .is_some_and(|t| (1_546_300_800..1_577_836_800).contains(&t))
    });
    assert!(
        !in_2019.is_empty() && in_2019.len() < exp.len(),
        "{in_2019:?}"
    );
    let got = search(json!({"taken_after": "2019-01-01", "taken_before": "2019-12-31"}))?;
    assert_eq!(set(&got), in_2019);
    // One side only; a time of day.
    let since_2020 = matching(&|m| m["taken_at"].as_i64().is_some_and(|t| t >= 1_577_836_800));
    let got = search(json!({"taken_after": "2020-01-01T00:00:00"}))?;
    assert_eq!(set(&got), since_2020);

    let camera = |m: &Value| {
        format!(
            "{} {}",
            m["camera_make"].as_str().unwrap_or(""),
            m["camera_model"].as_str().unwrap_or("")
        )
        .to_lowercase()
    };
    for c in ["iphone", "NIKON", "eos r6"] {
        let want = matching(&|m| camera(m).contains(&c.to_lowercase()));
        assert!(!want.is_empty(), "no fixture photo from {c}");
        let got = search(json!({"camera": c}))?;
        assert_eq!(set(&got), want, "camera {c}");
    }

    let located = matching(&|m| m["gps_lat"].is_f64());
    let got = search(json!({"has_location": true}))?;
    assert_eq!(set(&got), located);
    let got = search(json!({"has_location": false}))?;
    let unlocated: BTreeSet<String> = all.difference(&located).cloned().collect();
    assert_eq!(set(&got), unlocated);
    // Every hemisphere is among the fixtures.
    let quadrants: BTreeSet<(bool, bool)> = exp
        .values()
        .filter_map(|m| Some((m["gps_lat"].as_f64()? > 0.0, m["gps_lon"].as_f64()? > 0.0)))
        .collect();
    assert_eq!(quadrants.len(), 4, "{quadrants:?}");
    // Within 50 km of each located photo: that photo alone (the fixtures' places are far apart).
    for (name, m) in &exp {
        let (Some(lat), Some(lon)) = (m["gps_lat"].as_f64(), m["gps_lon"].as_f64()) else {
            continue;
        };
        let got = search(json!({"near": {"lat": lat + 0.1, "lon": lon - 0.1, "radius_km": 50}}))?;
        assert_eq!(names(&got), vec![name.clone()], "near {name}");
    }
    // Combined with the path prefix and a score cut: still exact.
    let prefix = album.folder.join("s").to_string_lossy().into_owned();
    let got = search(json!({"has_location": true, "path_prefix": prefix}))?;
    let want: BTreeSet<String> = located
        .iter()
        .filter(|n| n.starts_with('s'))
        .cloned()
        .collect();
    assert_eq!(set(&got), want);

    // Newest first, undated last; oldest first.
    let dated: Vec<(i64, String)> = {
        let mut v: Vec<(i64, String)> = exp
            .iter()
            .filter_map(|(n, m)| Some((m["taken_at"].as_i64()?, n.clone())))
            .collect();
        v.sort();
        v
    };
    let got = search(json!({"sort": "date_desc"}))?;
    let order = names(&got);
    let newest: Vec<String> = dated.iter().rev().map(|d| d.1.clone()).collect();
    assert_eq!(order[..newest.len()], newest[..]);
    assert_eq!(order.len(), all.len());
    let got = search(json!({"sort": "date_asc", "taken_after": "2000-01-01"}))?;
    let oldest: Vec<String> = dated.iter().map(|d| d.1.clone()).collect();
    assert_eq!(names(&got), oldest);
    // Paging over the date order: pages neither overlap nor skip.
    let mut paged = Vec::new();
    for offset in (0..all.len()).step_by(3) {
        let page = server.post(
            "/api/v1/search/text",
            json!({"query": "a photo", "top_k": 3, "offset": offset, "filters": {"sort": "date_desc"}}),
        )?;
        paged.extend(names(&page));
    }
    assert_eq!(paged, order);

    // Browsing: no query, a date order: every photo the filters keep, by date, unscored.
    let browse = |top_k: usize, offset: usize, filters: Value| -> Result<Value> {
        server.post(
            "/api/v1/search/text",
            json!({"query": "", "top_k": top_k, "offset": offset, "filters": filters}),
        )
    };
    let got = browse(100, 0, json!({"sort": "date_desc"}))?;
    let browsed = names(&got);
    assert_eq!(browsed[..newest.len()], newest[..]);
    assert_eq!(set(&got), all);
    let scores: Vec<f64> = got["hits"]
        .as_array()
        .context("hits")?
        .iter()
        .filter_map(|h| h["itc_score"].as_f64())
        .collect();
    assert!(
        scores.len() == all.len() && scores.iter().all(|s| *s == 0.0),
        "{scores:?}"
    );
    let got = browse(
        100,
        0,
        json!({"sort": "date_asc", "taken_after": "2000-01-01"}),
    )?;
    assert_eq!(names(&got), oldest);
    let mut paged = Vec::new();
    for offset in (0..all.len()).step_by(4) {
        paged.extend(names(&browse(4, offset, json!({"sort": "date_desc"}))?));
    }
    assert_eq!(paged, browsed);

    // Hits carry the metadata, as the generator wrote it.
    let oslo = everything["hits"]
        .as_array()
        .and_then(|h| {
            h.iter().find(|h| {
                h["path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("oslo_nikon.jpg"))
            })
        })
        .context("oslo hit")?;
    let m = &exp["oslo_nikon.jpg"];
    assert_eq!(oslo["latitude"], m["gps_lat"]);
    assert_eq!(oslo["longitude"], m["gps_lon"]);
    assert_eq!(oslo["camera_model"], m["camera_model"]);
    let t = m["taken_at"].as_i64().context("oslo date")?;
    let shown = oslo["taken_at"].as_str().context("taken_at")?;
    assert_eq!(
        blipdex_search::filter::parse_wall_clock(
            shown,
            blipdex_search::filter::DayEnd::Start,
            "t"
        )?,
        t
    );

    // The facets count what the fixtures hold.
    let (code, f) = server.call("GET", "/api/v1/facets", None, true)?;
    assert_eq!(code, 200, "{f}");
    assert_eq!(f["images"], all.len());
    assert_eq!(f["with_location"], located.len());
    let iphones = matching(&|m| camera(m).contains("iphone"));
    let listed: u64 = f["cameras"]
        .as_array()
        .context("cameras")?
        .iter()
        .filter(|c| {
            c["camera"]
                .as_str()
                .is_some_and(|c| c.to_lowercase().contains("iphone"))
        })
        .map(|c| c["images"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(listed as usize, iphones.len());
    Ok(())
}

/// The HTTP API answers what the engine answers in-process (one implementation), for text and
/// image searches, "more like this", rerank and captions; thumbnails are cached JPEGs with
/// ETags; stats and the OpenAPI document.
#[test]
fn operations_match_the_engine() -> Result<()> {
    let album = album()?;
    let server = Running::start(&album.index, Limits::default())?;
    let engine = Engine::load(&{
        let mut o = EngineOptions::new(&album.index, model("itm-a"));
        o.caption_model = Some(model("caption-a"));
        o
    })?;
    let hits_of = |q: Query| -> Result<Vec<(u64, f32)>> {
        match engine.answer_one(q)? {
            Answer::Hits { hits, .. } => {
                Ok(hits.iter().map(|h| (h.image_id, h.itc_score)).collect())
            }
            Answer::Caption(_) => anyhow::bail!("caption"),
        }
    };
    let pairs = |v: &Value| -> Vec<(u64, f32)> {
        v["hits"]
            .as_array()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h["image_id"].as_u64().unwrap_or(u64::MAX),
                            h["itc_score"].as_f64().unwrap_or(f64::NAN) as f32,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let params = SearchParams {
        top_k: 5,
        offset: 2,
        ..SearchParams::default()
    };
    let got = server.post(
        "/api/v1/search/text",
        json!({"query": "a red rocket", "top_k": 5, "offset": 2}),
    )?;
    let want = hits_of(Query::Text {
        text: "a red rocket".into(),
        params: params.clone(),
        rerank_top_n: 0,
        with_captions: false,
    })?;
    assert_eq!(pairs(&got), want);
    assert!(got["generation"].as_u64().is_some_and(|g| g > 0));

    // More like this: the image itself first, at similarity 1.
    let first = want[0].0;
    let got = server.post(
        "/api/v1/search/image",
        json!({"image_id": first, "top_k": 4}),
    )?;
    let p = pairs(&got);
    assert_eq!(p[0].0, first);
    assert!((p[0].1 - 1.0).abs() < 1e-5, "{p:?}");
    // An upload of the same file: the same ranking as the engine's, the file first.
    let row = engine.store().get(first).context("row")?;
    let bytes = std::fs::read(&row.path)?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let got = server.post(
        "/api/v1/search/image",
        json!({"image": format!("data:image/jpeg;base64,{b64}"), "top_k": 4}),
    )?;
    let want = hits_of(Query::Image {
        image: bytes,
        params: SearchParams {
            top_k: 4,
            ..SearchParams::default()
        },
        with_captions: false,
    })?;
    assert_eq!(pairs(&got), want);
    assert_eq!(want[0].0, first);

    // Rerank: ITM probabilities, as the engine computes them.
    let ids: Vec<u64> = p.iter().map(|x| x.0).collect();
    let got = server.post(
        "/api/v1/rerank",
        json!({"query": "a red rocket", "image_ids": ids}),
    )?;
    let want = match engine.answer_one(Query::Rerank {
        text: "a red rocket".into(),
        ids: ids.clone(),
        with_captions: false,
    })? {
        Answer::Hits { hits, .. } => hits,
        Answer::Caption(_) => anyhow::bail!("caption"),
    };
    let got_itm: Vec<(u64, f64)> = got["hits"]
        .as_array()
        .context("hits")?
        .iter()
        .map(|h| {
            (
                h["image_id"].as_u64().unwrap_or(0),
                h["itm_score"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect();
    let want_itm: Vec<(u64, f64)> = want
        .iter()
        .map(|h| (h.image_id, f64::from(h.itm_score.unwrap_or(-2.0))))
        .collect();
    assert_eq!(got_itm.len(), want_itm.len());
    for (g, w) in got_itm.iter().zip(&want_itm) {
        assert_eq!(g.0, w.0);
        assert!((g.1 - w.1).abs() < 1e-6, "{g:?} {w:?}");
    }

    // A caption, as the engine generates it.
    let got = server.post("/api/v1/caption", json!({"image_id": first}))?;
    let want = match engine.answer_one(Query::Caption {
        source: blipdex_search::CaptionSource::ImageId(first),
        request: Default::default(),
    })? {
        Answer::Caption(c) => c.generated.text,
        Answer::Hits { .. } => anyhow::bail!("hits"),
    };
    assert_eq!(got["text"], want);
    assert!(!want.is_empty());

    // Thumbnails: a JPEG whose longest side is the size asked, cached under the index; the
    // ETag answers 304.
    let path = format!("/api/v1/thumbnails/{first}?size=64");
    let (code, etag, body) = server.get_bytes(&path, &[])?;
    assert_eq!(code, 200);
    let img = image::load_from_memory_with_format(&body, image::ImageFormat::Jpeg)?;
    assert_eq!(
        img.width().max(img.height()),
        64.min(row.width.max(row.height))
    );
    let etag = etag.context("etag")?;
    let (code, _, body) = server.get_bytes(&path, &[("If-None-Match", &etag)])?;
    assert_eq!((code, body.len()), (304, 0));
    assert!(
        walk_has_jpeg(&album.index.join("thumbnails")),
        "no cached thumbnail"
    );

    // Stats.
    let (code, s) = server.call("GET", "/api/v1/stats", None, true)?;
    assert_eq!(code, 200, "{s}");
    assert_eq!(s["images"], engine.store().len());
    assert_eq!(s["model_fingerprint"], engine.store().model_fingerprint());

    // The OpenAPI document names every route (it is validated against the OpenAPI schema by
    // the CLI's HTTP test).
    let (code, doc) = server.call("GET", "/openapi.json", None, false)?;
    assert_eq!(code, 200);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    for p in [
        "/api/v1/search/text",
        "/api/v1/search/image",
        "/api/v1/rerank",
        "/api/v1/caption",
        "/api/v1/stats",
        "/api/v1/facets",
        "/api/v1/thumbnails/{image_id}",
        "/api/v1/health",
    ] {
        assert!(
            doc["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
    Ok(())
}

fn walk_has_jpeg(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let p = e.path();
            if p.is_dir() {
                walk_has_jpeg(&p)
            } else {
                p.extension().is_some_and(|x| x == "jpg")
            }
        })
    })
}

/// Bad input gets the right status and a JSON error body, and the server keeps serving.
#[test]
fn bad_requests_get_json_errors() -> Result<()> {
    let album = album()?;
    let limits = Limits {
        max_message_bytes: 64 << 10,
        ..Limits::default()
    };
    let server = Running::start(&album.index, limits)?;
    let error = |code: u16, body: &Value, want_code: u16, want: &str| {
        assert_eq!(code, want_code, "{body}");
        assert_eq!(body["error"]["code"], want, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.len() > 10),
            "{body}"
        );
    };
    // No token, a wrong one; health and the page stay open.
    let (c, b) = server.call(
        "POST",
        "/api/v1/search/text",
        Some(json!({"query": "x"})),
        false,
    )?;
    error(c, &b, 401, "UNAUTHENTICATED");
    let r = ureq::post(&format!("{}/api/v1/stats", server.base))
        .set("Authorization", "Bearer wrong")
        .call();
    match r {
        Err(ureq::Error::Status(401, resp)) => {
            assert_eq!(resp.header("www-authenticate"), Some("Bearer"));
            let b: Value = serde_json::from_str(&resp.into_string()?)?;
            assert_eq!(b["error"]["code"], "UNAUTHENTICATED");
        }
        other => panic!("wrong token: {other:?}"),
    }
    let (c, _, _) =
        server.get_bytes("/api/v1/thumbnails/0", &[("Authorization", "Bearer wrong")])?;
    assert_eq!(c, 401);
    let page = ureq::get(&format!("{}/", server.base)).call()?;
    assert!(page.content_type().starts_with("text/html"));

    let raw = |body: &str, content_type: &str| -> Result<(u16, Value)> {
        let r = server
            .request("POST", "/api/v1/search/text", true)
            .set("Content-Type", content_type)
            .send_string(body);
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.into()),
        };
        let code = resp.status();
        Ok((code, serde_json::from_str(&resp.into_string()?)?))
    };
    let (c, b) = raw("{\"query\": ", "application/json")?;
    error(c, &b, 400, "INVALID_ARGUMENT");
    let (c, b) = raw("{\"query\": 5}", "application/json")?;
    error(c, &b, 400, "INVALID_ARGUMENT");
    let (c, b) = raw("{\"query\": \"x\", \"topk\": 5}", "application/json")?;
    error(c, &b, 400, "INVALID_ARGUMENT");
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("topk")),
        "{b}"
    );
    let (c, b) = raw("{\"query\": \"x\"}", "text/plain")?;
    error(c, &b, 415, "UNSUPPORTED_MEDIA_TYPE");
    // A body over the limit (an image upload of 200 KiB against 64 KiB).
    let huge = "A".repeat(200 << 10);
    let (c, b) = server.call(
        "POST",
        "/api/v1/search/image",
        Some(json!({"image": huge})),
        true,
    )?;
    error(c, &b, 413, "PAYLOAD_TOO_LARGE");
    // Values the engine refuses: the same rules as gRPC.
    for (path, body) in [
        ("/api/v1/search/text", json!({"query": "  "})),
        (
            "/api/v1/search/text",
            json!({"query": "", "filters": {"sort": "date_desc", "min_score": 0.1}}),
        ),
        (
            "/api/v1/search/text",
            json!({"query": "", "rerank_top_n": 5, "filters": {"sort": "date_desc"}}),
        ),
        ("/api/v1/search/text", json!({"query": "x", "top_k": 20000})),
        (
            "/api/v1/search/text",
            json!({"query": "x", "filters": {"taken_after": "last week"}}),
        ),
        (
            "/api/v1/search/text",
            json!({"query": "x", "filters": {"sort": "random"}}),
        ),
        (
            "/api/v1/search/text",
            json!({"query": "x", "filters": {"near": {"lat": 95, "lon": 0, "radius_km": 1}}}),
        ),
        ("/api/v1/search/image", json!({"image": "not base64!"})),
        ("/api/v1/search/image", json!({"image": "aGVsbG8="})),
        ("/api/v1/search/image", json!({})),
        (
            "/api/v1/caption",
            json!({"image_id": 0, "image": "aGVsbG8="}),
        ),
        ("/api/v1/rerank", json!({"query": "x", "image_ids": []})),
    ] {
        let (c, b) = server.call("POST", path, Some(body.clone()), true)?;
        assert_eq!(c, 400, "{path} {body}: {b}");
        assert_eq!(b["error"]["code"], "INVALID_ARGUMENT", "{path} {body}: {b}");
    }
    // Unknown ids, routes and path tricks.
    let (c, b) = server.call(
        "POST",
        "/api/v1/search/image",
        Some(json!({"image_id": 999_999})),
        true,
    )?;
    error(c, &b, 404, "NOT_FOUND");
    let (c, b) = server.call(
        "POST",
        "/api/v1/caption",
        Some(json!({"image_id": 999_999})),
        true,
    )?;
    error(c, &b, 404, "NOT_FOUND");
    let (c, b) = server.call("GET", "/api/v1/thumbnails/999999", None, true)?;
    error(c, &b, 404, "NOT_FOUND");
    let (c, b) = server.call("GET", "/api/v1/nothing-here", None, true)?;
    error(c, &b, 404, "NOT_FOUND");
    let (c, b) = server.call(
        "GET",
        "/api/v1/thumbnails/..%2F..%2Fetc%2Fpasswd",
        None,
        true,
    )?;
    error(c, &b, 400, "INVALID_ARGUMENT");
    let (c, b) = server.call("GET", "/api/v1/thumbnails/1?size=5000", None, true)?;
    error(c, &b, 400, "INVALID_ARGUMENT");
    // A traversal in a filter is only a prefix that matches nothing.
    let got = server.post(
        "/api/v1/search/text",
        json!({"query": "x", "filters": {"path_prefix": "../../../etc/passwd"}}),
    )?;
    assert_eq!(names(&got), Vec::<String>::new());

    // Thumbnails of a photo deleted since ingest (404) and of one changed since (409), before
    // either was cached.
    let store = blipdex_store::Store::open_readonly(&album.index)?;
    let by_name = |n: &str| {
        store
            .iter()
            .find(|r| r.path.ends_with(n))
            .map(|r| r.image_id)
            .context(n.to_string())
    };
    let gone = by_name("no_exif.jpg")?;
    std::fs::remove_file(album.folder.join("no_exif.jpg"))?;
    let (c, b) = server.call("GET", &format!("/api/v1/thumbnails/{gone}"), None, true)?;
    error(c, &b, 404, "NOT_FOUND");
    let changed = by_name("oslo_nikon.jpg")?;
    std::fs::copy(
        fixtures().join("photos/rocket.jpg"),
        album.folder.join("oslo_nikon.jpg"),
    )?;
    let (c, b) = server.call("GET", &format!("/api/v1/thumbnails/{changed}"), None, true)?;
    error(c, &b, 409, "FILE_CHANGED");

    // Still serving.
    let got = server.post(
        "/api/v1/search/text",
        json!({"query": "a photo", "top_k": 3}),
    )?;
    assert_eq!(names(&got).len(), 3);
    Ok(())
}
