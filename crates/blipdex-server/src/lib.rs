//! The blipdex gRPC retrieval service (`blipdex.v1.Retrieval`, see
//! `proto/blipdex/v1/retrieval.proto`), with `grpc.health.v1` and server reflection.
//!
//! The model runs on one dedicated thread fed by a bounded queue (see [`worker`]): concurrent
//! requests are batched dynamically, and a full queue answers RESOURCE_EXHAUSTED instead of
//! growing memory. The engine loads on that thread too, so health answers NOT_SERVING while the
//! checkpoint loads and SERVING once it is ready.
//!
//! ```no_run
//! # async fn demo(engine: blipdex_search::EngineOptions) -> anyhow::Result<()> {
//! let config = blipdex_server::ServerConfig::default();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! blipdex_server::serve(config, engine, listener, blipdex_server::shutdown_signal()).await
//! # }
//! ```

mod auth;
mod codec;
pub mod http;
pub mod metrics;
mod service;
mod worker;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use anyhow::Context;
use blipdex_core::{Error, ObjectStoreErrorKind};
use blipdex_search::{Engine, EngineOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::Status;
use tonic_health::ServingStatus;

pub use metrics::{serve_metrics, Metrics};

/// Generated `blipdex.v1` messages, server and client.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("blipdex.v1");

    /// The encoded `FileDescriptorSet` of `blipdex/v1/retrieval.proto` (served by reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("blipdex_v1_descriptor");
}

/// The fully qualified name of the retrieval service (for health checks).
pub const SERVICE_NAME: &str = "blipdex.v1.Retrieval";

/// Queue, batching and message limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request message accepted (bytes); larger ones get INVALID_ARGUMENT.
    pub max_message_bytes: usize,
    /// Requests that may wait for the model; more get RESOURCE_EXHAUSTED.
    pub queue_depth: usize,
    /// Most requests the model thread serves in one batch.
    pub max_batch: usize,
    /// How long the model thread waits for more requests after the first of a batch.
    pub batch_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 << 20,
            queue_depth: 1024,
            max_batch: 64,
            batch_wait: Duration::from_millis(2),
        }
    }
}

/// PEM-encoded certificate chain and private key for TLS.
#[derive(Clone)]
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsPem { .. }")
    }
}

impl TlsPem {
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Self> {
        Ok(Self {
            cert: std::fs::read(cert)
                .with_context(|| format!("cannot read --tls-cert {}", cert.display()))?,
            key: std::fs::read(key)
                .with_context(|| format!("cannot read --tls-key {}", key.display()))?,
        })
    }
}

/// How the server runs (the engine is given separately: see [`Server::new`]).
#[derive(Clone)]
pub struct ServerConfig {
    pub limits: Limits,
    /// Bearer token every Retrieval call must carry (`authorization: Bearer <token>`); `None`
    /// = no authentication. Health and reflection stay open.
    pub auth_token: Option<String>,
    pub tls: Option<TlsPem>,
    /// How often to look for index generations committed by a later ingest; `None` = never.
    pub refresh_every: Option<Duration>,
    /// How often to write generated captions back to the index; `None` = only at shutdown.
    pub caption_flush_every: Option<Duration>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("limits", &self.limits)
            .field("auth", &self.auth_token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("refresh_every", &self.refresh_every)
            .field("caption_flush_every", &self.caption_flush_every)
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            auth_token: None,
            tls: None,
            refresh_every: Some(Duration::from_secs(2)),
            caption_flush_every: Some(Duration::from_secs(30)),
        }
    }
}

/// Maps every engine error to exactly one gRPC status; the message says what is wrong and,
/// where the client or operator can act, what to do.
pub fn status_from(e: &Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument(_) | Error::BadImage { .. } | Error::ImageTooLarge { .. } => {
            Status::invalid_argument(msg)
        }
        Error::NotFound(_) => Status::not_found(msg),
        Error::Unsupported(_) | Error::FileChanged { .. } => Status::failed_precondition(msg),
        Error::ModelMismatch { .. } => Status::failed_precondition(format!(
            "{msg}; restart the server with the model that built the index"
        )),
        Error::Overloaded(_) => Status::resource_exhausted(msg),
        Error::Unavailable(_) => Status::unavailable(msg),
        // The index's object store, seen from the server: its own configuration, not the client's.
        Error::ObjectStore { kind, .. } => match kind {
            ObjectStoreErrorKind::NotFound => Status::not_found(msg),
            ObjectStoreErrorKind::Unavailable => Status::unavailable(format!("{msg}; retry later")),
            ObjectStoreErrorKind::Denied | ObjectStoreErrorKind::Config => Status::internal(
                format!("{msg}; this is a server-side failure, see the server log"),
            ),
        },
        // The disk, the index being rewritten or the hub: transient, worth a retry.
        Error::Io { .. } | Error::Store { .. } | Error::Hub { .. } | Error::Locked { .. } => {
            Status::unavailable(format!("{msg}; retry later"))
        }
        Error::BadModel { .. }
        | Error::BadTensor { .. }
        | Error::Tokenizer(_)
        | Error::Tensor(_)
        | Error::Internal(_) => Status::internal(format!(
            "{msg}; this is a server-side failure, see the server log"
        )),
    }
}

/// The overall ("") and the Retrieval service's health move together.
async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        () = term => tracing::info!("SIGTERM: shutting down"),
    }
}

type Loader = Box<dyn FnOnce() -> blipdex_core::Result<Engine> + Send>;

/// State shared by the handlers, the maintenance tasks and `Server::run`.
pub(crate) struct Shared {
    pub engine: OnceLock<Arc<Engine>>,
    /// `None` once shutting down (the model threads end when their queues are closed).
    pub jobs: RwLock<Option<worker::Queues>>,
    pub metrics: Metrics,
    pub limits: Limits,
}

impl Shared {
    /// The engine, once loaded.
    pub(crate) fn engine(&self) -> blipdex_core::Result<Arc<Engine>> {
        self.engine.get().cloned().ok_or_else(|| {
            Error::Unavailable(
                "the model is still loading; retry when the health check reports SERVING".into(),
            )
        })
    }

    /// The engine's stats (off the runtime: it walks the index directory) and how many
    /// requests wait in the queues.
    pub(crate) async fn stats(&self) -> blipdex_core::Result<(blipdex_search::Stats, usize)> {
        let engine = self.engine()?;
        let stats = tokio::task::spawn_blocking(move || engine.stats())
            .await
            .map_err(|e| Error::Internal(format!("stats task failed: {e}")))?;
        let queue_depth = self
            .jobs
            .read()
            .ok()
            .and_then(|j| j.as_ref().map(|q| q.search.len() + q.caption.len()))
            .unwrap_or(0);
        Ok((stats, queue_depth))
    }

    /// Validates `query`, queues it on its lane without waiting (a full queue is
    /// [`Error::Overloaded`]) and awaits the engine's answer. Every transport goes through here.
    pub(crate) async fn submit(
        &self,
        rpc: &'static str,
        query: blipdex_search::Query,
    ) -> blipdex_core::Result<blipdex_search::Answer> {
        use crossbeam_channel::TrySendError;
        let engine = self.engine()?;
        query.validate(engine.has_captioner())?;
        // Queries that caption wait behind caption generation, the others never do.
        let lane = if query.generates_captions() {
            worker::Lane::Caption
        } else {
            worker::Lane::Search
        };
        let (tx, rx) = oneshot::channel();
        {
            let jobs = self.jobs.read().map_err(|_| {
                Error::Internal("the job queue is poisoned; restart the server".into())
            })?;
            let Some(sender) = jobs.as_ref().map(|q| q.lane(lane)) else {
                return Err(Error::Unavailable(
                    "the server is shutting down; retry elsewhere".into(),
                ));
            };
            match sender.try_send(worker::Job { query, reply: tx }) {
                Ok(()) => self
                    .metrics
                    .queue_depth
                    .with_label_values(&[lane.name()])
                    .set(sender.len() as i64),
                Err(TrySendError::Full(_)) => {
                    self.metrics.rejected.with_label_values(&[rpc]).inc();
                    return Err(Error::Overloaded(format!(
                        "{} {} requests are already waiting for the model (--queue-depth); \
                         retry with backoff",
                        self.limits.queue_depth,
                        lane.name()
                    )));
                }
                Err(TrySendError::Disconnected(_)) => {
                    return Err(Error::Unavailable(
                        "the model thread has stopped; the server is shutting down".into(),
                    ));
                }
            }
        }
        rx.await.map_err(|_| {
            Error::Internal(
                "the model failed while serving this request (see the server log); retry".into(),
            )
        })?
    }
}

/// A configured server; [`Server::run`] serves it on a listener.
pub struct Server {
    config: ServerConfig,
    metrics: Metrics,
    loader: Loader,
    http: Option<TcpListener>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server that loads `Engine::load(&engine)` in the background once it runs.
    pub fn new(config: ServerConfig, engine: EngineOptions) -> anyhow::Result<Self> {
        Self::with_loader(config, move || Engine::load(&engine))
    }

    /// A server whose engine comes from `loader`, run on the model thread once the server
    /// runs (e.g. resolving hub checkpoints first, or a test that controls when loading ends).
    pub fn with_loader(
        config: ServerConfig,
        loader: impl FnOnce() -> blipdex_core::Result<Engine> + Send + 'static,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            config,
            metrics: Metrics::new()?,
            loader: Box::new(loader),
            http: None,
        })
    }

    /// Also serves the HTTP/JSON API and the search page (see [`http`]) on `listener`, with
    /// the same queue, limits and token as gRPC; it stops with the gRPC server.
    pub fn with_http(mut self, listener: TcpListener) -> Self {
        self.http = Some(listener);
        self
    }

    /// The server's metrics (serve them with [`serve_metrics`]).
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Serves until `shutdown` resolves (or the engine fails to load), then drains in-flight
    /// requests, stops the model thread and writes pending captions to the index.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let Server {
            config,
            metrics,
            loader,
            http,
        } = self;
        let limits = config.limits.clone();
        let queue_depth = limits.queue_depth.max(1);
        metrics.queue_capacity.set(queue_depth as i64);
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;

        let (search_tx, search_rx) = crossbeam_channel::bounded::<worker::Job>(queue_depth);
        let (caption_tx, caption_rx) = crossbeam_channel::bounded::<worker::Job>(queue_depth);
        let shared = Arc::new(Shared {
            engine: OnceLock::new(),
            jobs: RwLock::new(Some(worker::Queues {
                search: search_tx,
                caption: caption_tx,
            })),
            metrics: metrics.clone(),
            limits: limits.clone(),
        });

        // The model thread: load, report, then serve the queue until it closes.
        let (loaded_tx, loaded_rx) = oneshot::channel::<worker::Loaded>();
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let batch = worker::BatchLimits {
            max_batch: limits.max_batch,
            batch_wait: limits.batch_wait,
        };
        let thread_metrics = metrics.clone();
        let model_thread = std::thread::Builder::new()
            .name("blipdex-model".into())
            .spawn(move || {
                let _log = tracing::dispatcher::set_default(&dispatch);
                let start = std::time::Instant::now();
                let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(loader));
                let engine = match loaded {
                    Ok(Ok(engine)) => Arc::new(engine),
                    Ok(Err(e)) => {
                        let _ = loaded_tx.send(Err(e.to_string()));
                        return;
                    }
                    Err(_) => {
                        let _ = loaded_tx.send(Err("loading the model panicked".into()));
                        return;
                    }
                };
                tracing::info!(seconds = start.elapsed().as_secs_f64(), "model loaded");
                // The caption lane gets its own thread when there is a caption model.
                let captions = if engine.has_captioner() {
                    let (engine, metrics) = (engine.clone(), thread_metrics.clone());
                    let dispatch = tracing::dispatcher::get_default(Clone::clone);
                    std::thread::Builder::new()
                        .name("blipdex-caption".into())
                        .spawn(move || {
                            let _log = tracing::dispatcher::set_default(&dispatch);
                            worker::run(
                                &engine,
                                &caption_rx,
                                worker::Lane::Caption,
                                batch,
                                &metrics,
                            );
                        })
                        .map_err(|e| tracing::error!("cannot start the caption thread: {e}"))
                        .ok()
                } else {
                    drop(caption_rx);
                    None
                };
                if loaded_tx.send(Ok(engine.clone())).is_err() {
                    return;
                }
                worker::run(
                    &engine,
                    &search_rx,
                    worker::Lane::Search,
                    batch,
                    &thread_metrics,
                );
                if let Some(t) = captions {
                    let _ = t.join();
                }
            })
            .context("cannot start the model thread")?;

        // Stop: the caller's shutdown, or a failed load.
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let load_error: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
        let loader_task = {
            let shared = shared.clone();
            let health = health.clone();
            let load_error = load_error.clone();
            tokio::spawn(async move {
                match loaded_rx.await {
                    Ok(Ok(engine)) => {
                        let stats = engine.store();
                        shared.metrics.index_images.set(stats.len() as i64);
                        shared
                            .metrics
                            .index_generation
                            .set(stats.generation() as i64);
                        let _ = shared.engine.set(engine);
                        shared.metrics.model_loaded.set(1);
                        set_health(&health, ServingStatus::Serving).await;
                        tracing::info!("serving");
                    }
                    Ok(Err(e)) => {
                        // Returned by `run` (and printed once by the CLI), not logged here too.
                        let _ = load_error.set(e);
                        let _ = stop_tx.send(());
                    }
                    Err(_) => {
                        let _ = load_error.set("the model thread ended while loading".into());
                        let _ = stop_tx.send(());
                    }
                }
            })
        };
        let maintenance = tokio::spawn(maintain(
            shared.clone(),
            config.refresh_every,
            config.caption_flush_every,
        ));

        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &config.tls {
            builder = with_tls(builder, tls)?;
        }
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("reflection service")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("reflection service")?;
        let retrieval = service::retrieval_service(
            shared.clone(),
            config.auth_token.as_deref(),
            limits.max_message_bytes,
        );
        let local = listener.local_addr().ok();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
            if let Ok(s) = &s {
                // Small unary messages: don't let Nagle hold them back.
                let _ = s.set_nodelay(true);
            }
            s
        });
        let (http_stop_tx, mut http_stop) = tokio::sync::watch::channel(false);
        let http_task = match http {
            Some(listener) => {
                let addr = listener.local_addr().ok();
                let app = http::router(
                    shared.clone(),
                    config.auth_token.as_deref(),
                    limits.max_message_bytes,
                );
                tracing::info!(addr = ?addr, "HTTP API and search page listening");
                Some(tokio::spawn(async move {
                    let stopped = async move {
                        let _ = http_stop.wait_for(|stop| *stop).await;
                    };
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await
                }))
            }
            None => None,
        };
        let stopping = {
            let health = health.clone();
            async move {
                tokio::select! {
                    () = shutdown => {}
                    // A dropped sender (the engine loaded) is no reason to stop.
                    Ok(()) = stop_rx => {}
                }
                set_health(&health, ServingStatus::NotServing).await;
                let _ = http_stop_tx.send(true);
                tracing::info!("shutting down: draining in-flight requests");
            }
        };
        tracing::info!(
            addr = ?local,
            tls = config.tls.is_some(),
            auth = config.auth_token.is_some(),
            "listening"
        );
        // Requests that do not decode never reach a handler: count them here (see codec.rs).
        let count_undecodable = {
            let metrics = shared.metrics.clone();
            move |mut res: tonic::codegen::http::Response<tonic::body::Body>| {
                if let Some(rpc) = res.headers_mut().remove(codec::UNDECODABLE) {
                    metrics.observe(
                        rpc.to_str().unwrap_or("unknown"),
                        tonic::Code::InvalidArgument,
                        0.0,
                    );
                }
                res
            }
        };
        let served = builder
            .layer(tower::util::MapResponseLayer::new(count_undecodable))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(retrieval)
            .serve_with_incoming_shutdown(incoming, stopping)
            .await;

        if let Some(t) = http_task {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("HTTP server: {e}"),
                Err(e) => tracing::warn!("HTTP server task: {e}"),
            }
        }
        // Close the queues: the model threads finish what is queued, then end.
        if let Ok(mut jobs) = shared.jobs.write() {
            jobs.take();
        }
        maintenance.abort();
        loader_task.abort();
        if let Some(engine) = shared.engine.get().cloned() {
            let joined = tokio::task::spawn_blocking(move || {
                let _ = model_thread.join();
                engine.flush_captions()
            })
            .await;
            match joined {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => {
                    metrics.captions_flushed.inc_by(n as u64);
                    tracing::info!("wrote {n} captions to the index");
                }
                Ok(Err(e)) => tracing::warn!("cannot write captions to the index: {e}"),
                Err(e) => tracing::warn!("caption flush task: {e}"),
            }
        }
        served.context("gRPC server")?;
        if let Some(e) = load_error.get() {
            anyhow::bail!("cannot load the model: {e}");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

#[cfg(feature = "tls")]
fn with_tls(
    builder: tonic::transport::Server,
    tls: &TlsPem,
) -> anyhow::Result<tonic::transport::Server> {
    let identity = tonic::transport::Identity::from_pem(&tls.cert, &tls.key);
    builder
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
        .context("bad --tls-cert/--tls-key")
}

#[cfg(not(feature = "tls"))]
fn with_tls(
    _builder: tonic::transport::Server,
    _tls: &TlsPem,
) -> anyhow::Result<tonic::transport::Server> {
    anyhow::bail!(
        "this blipdex was built without TLS; rebuild blipdex-server with the `tls` feature"
    )
}

/// Picks up new index generations and writes captions back, on their intervals. The two run
/// independently: a flush can wait seconds for an ingest's writer lock, and a reload must never
/// wait behind it.
async fn maintain(shared: Arc<Shared>, refresh: Option<Duration>, flush: Option<Duration>) {
    tokio::join!(
        every(shared.clone(), refresh, Tick::Refresh),
        every(shared, flush, Tick::Flush)
    );
}

async fn every(shared: Arc<Shared>, period: Option<Duration>, what: Tick) {
    let Some(period) = period else { return };
    let mut timer = interval(period);
    // A lasting failure (a deleted index, a full disk) is logged when it starts and when it
    // changes, not at every tick.
    let mut last_error: Option<String> = None;
    loop {
        timer.tick().await;
        let Some(engine) = shared.engine.get().cloned() else {
            continue;
        };
        let metrics = shared.metrics.clone();
        let done = tokio::task::spawn_blocking(move || match what {
            Tick::Refresh => engine.refresh().map(|changed| {
                if changed {
                    let s = engine.store();
                    metrics.index_images.set(s.len() as i64);
                    metrics.index_generation.set(s.generation() as i64);
                }
            }),
            Tick::Flush => engine.flush_captions().map(|n| {
                if n > 0 {
                    metrics.captions_flushed.inc_by(n as u64);
                    tracing::info!("wrote {n} captions to the index");
                }
            }),
        })
        .await;
        match done {
            Ok(Ok(())) => {
                if let Some(was) = last_error.take() {
                    tracing::info!("{} works again (it failed with: {was})", what.name());
                }
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!("{}: {msg}", what.doing());
                    last_error = Some(msg);
                }
            }
            Err(e) => tracing::warn!("maintenance task: {e}"),
        }
    }
}

#[derive(Clone, Copy)]
enum Tick {
    Refresh,
    Flush,
}

impl Tick {
    fn doing(self) -> &'static str {
        match self {
            Tick::Refresh => "cannot pick up the index's new generation",
            Tick::Flush => "cannot write captions to the index",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Tick::Refresh => "index reload",
            Tick::Flush => "caption write-back",
        }
    }
}

fn interval(every: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(every.max(Duration::from_millis(10)));
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

/// Loads the engine (in the background; health says NOT_SERVING until it is ready) and serves
/// `config` on `listener` until `shutdown` resolves. See [`Server`].
pub async fn serve(
    config: ServerConfig,
    engine: EngineOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    Server::new(config, engine)?.run(listener, shutdown).await
}

/// The default decompression-bomb guard (pixels) for images in requests.
pub fn default_max_image_pixels() -> u64 {
    blipdex_model::image::DEFAULT_MAX_PIXELS
}

/// Reads `--tls-cert`/`--tls-key`: both or neither.
pub fn tls_from_paths(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> anyhow::Result<Option<TlsPem>> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(c), Some(k)) => Ok(Some(TlsPem::from_files(&c, &k)?)),
        _ => anyhow::bail!("--tls-cert and --tls-key go together: give both or neither"),
    }
}

/// A log subscriber for the server: `RUST_LOG` filters (default `info`), to stderr, as text or
/// one JSON object per line. Install it with `tracing::dispatcher::set_default` on every thread
/// that logs (the runtime's `on_thread_start`), or globally.
pub fn log_dispatch(json: bool) -> tracing::Dispatch {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        tracing::Dispatch::new(builder.json().flatten_event(true).finish())
    } else {
        tracing::Dispatch::new(builder.finish())
    }
}

/// Where [`run_until_signal`] listens and how it logs.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub listen: std::net::SocketAddr,
    /// Prometheus `GET /metrics`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The HTTP/JSON API and the search page.
    pub http_listen: Option<std::net::SocketAddr>,
    /// Logs as JSON lines instead of text.
    pub log_json: bool,
}

/// What `blipdex serve` runs: its own runtime and log subscriber, the gRPC server on
/// `endpoints.listen` and metrics on `endpoints.metrics_listen`, until SIGTERM or Ctrl-C; then
/// a graceful shutdown that writes pending captions to the index.
pub fn run_until_signal(
    endpoints: Endpoints,
    config: ServerConfig,
    loader: impl FnOnce() -> blipdex_core::Result<Engine> + Send + 'static,
) -> anyhow::Result<()> {
    // This subscriber on every thread of the server, whatever the process installed globally.
    let dispatch = log_dispatch(endpoints.log_json);
    let _main_log = tracing::dispatcher::set_default(&dispatch);
    let thread_dispatch = dispatch.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blipdex-rt")
        .on_thread_start(move || {
            // Kept for the thread's whole life.
            std::mem::forget(tracing::dispatcher::set_default(&thread_dispatch));
        })
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut server = Server::with_loader(config, loader)?;
        if let Some(addr) = endpoints.http_listen {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on --http-listen {addr}"))?;
            server = server.with_http(listener);
        }
        let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
        if let Some(addr) = endpoints.metrics_listen {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on --metrics-listen {addr}"))?;
            tracing::info!("metrics at http://{addr}/metrics");
            let metrics = server.metrics();
            tokio::spawn(async move {
                let stopped = async {
                    let _ = metrics_stopped.await;
                };
                if let Err(e) = serve_metrics(metrics, listener, stopped).await {
                    tracing::warn!("metrics endpoint: {e}");
                }
            });
        }
        let listener = TcpListener::bind(endpoints.listen)
            .await
            .with_context(|| format!("cannot listen on --listen {}", endpoints.listen))?;
        let result = server.run(listener, shutdown_signal()).await;
        let _ = stop_metrics.send(());
        result
    })
}
