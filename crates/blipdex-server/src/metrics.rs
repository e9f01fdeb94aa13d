//! Prometheus metrics and a minimal HTTP responder for them (`GET /metrics`).

use std::future::Future;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The server's metrics, in their own registry (several servers may run in one process).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `blipdex_requests_total{rpc, code}`.
    pub requests: IntCounterVec,
    /// `blipdex_request_seconds{rpc}`.
    pub latency: HistogramVec,
    /// Jobs the model thread took in one turn.
    pub batch_jobs: Histogram,
    /// Items per engine call in one turn: `kind` = text, image, itm_pairs, caption.
    pub batch_items: HistogramVec,
    /// Seconds one model-thread turn took.
    pub batch_seconds: Histogram,
    /// Jobs waiting for a model thread, by `lane` (search, caption).
    pub queue_depth: IntGaugeVec,
    pub queue_capacity: IntGauge,
    /// Requests refused because the queue was full.
    pub rejected: IntCounterVec,
    /// 1 once the model is loaded.
    pub model_loaded: IntGauge,
    pub index_images: IntGauge,
    pub index_generation: IntGauge,
    pub captions_flushed: prometheus::IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "blipdex_requests_total",
                "gRPC requests by method and status code",
            ),
            &["rpc", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("blipdex_request_seconds", "gRPC request latency by method")
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0,
                ]),
            &["rpc"],
        )?;
        let sizes = vec![
            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
        ];
        let batch_jobs = Histogram::with_opts(
            HistogramOpts::new(
                "blipdex_batch_jobs",
                "requests served by one model-thread turn (dynamic batch size)",
            )
            .buckets(sizes.clone()),
        )?;
        let batch_items = HistogramVec::new(
            HistogramOpts::new(
                "blipdex_batch_items",
                "items per batched engine call (text embeddings, images, ITM pairs, captions)",
            )
            .buckets(sizes),
            &["kind"],
        )?;
        let batch_seconds = Histogram::with_opts(
            HistogramOpts::new("blipdex_batch_seconds", "duration of one model-thread turn")
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 18)?),
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "blipdex_queue_depth",
                "requests waiting for a model thread, by lane",
            ),
            &["lane"],
        )?;
        let queue_capacity = IntGauge::new(
            "blipdex_queue_capacity",
            "most requests that may wait in each lane (--queue-depth)",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "blipdex_rejected_total",
                "requests refused with RESOURCE_EXHAUSTED because the queue was full",
            ),
            &["rpc"],
        )?;
        let model_loaded = IntGauge::new("blipdex_model_loaded", "1 once the models are loaded")?;
        let index_images = IntGauge::new("blipdex_index_images", "live images in the index")?;
        let index_generation = IntGauge::new(
            "blipdex_index_generation",
            "generation of the index snapshot being served",
        )?;
        let captions_flushed = prometheus::IntCounter::new(
            "blipdex_captions_flushed_total",
            "captions written back to the index",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(batch_jobs.clone()))?;
        registry.register(Box::new(batch_items.clone()))?;
        registry.register(Box::new(batch_seconds.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(queue_capacity.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(model_loaded.clone()))?;
        registry.register(Box::new(index_images.clone()))?;
        registry.register(Box::new(index_generation.clone()))?;
        registry.register(Box::new(captions_flushed.clone()))?;
        Ok(Self {
            registry,
            requests,
            latency,
            batch_jobs,
            batch_items,
            batch_seconds,
            queue_depth,
            queue_capacity,
            rejected,
            model_loaded,
            index_images,
            index_generation,
            captions_flushed,
        })
    }

    /// Records one finished RPC.
    pub fn observe(&self, rpc: &str, code: tonic::Code, seconds: f64) {
        self.requests
            .with_label_values(&[rpc, code_name(code)])
            .inc();
        self.latency.with_label_values(&[rpc]).observe(seconds);
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        buf
    }
}

/// The canonical upper-case name of a status code (as in the gRPC spec).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` (and `GET /` too) on `listener` until `shutdown` resolves. Anything
/// else gets 404; a client that sends no request line within 5 s is dropped.
pub async fn serve_metrics(
    metrics: Metrics,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = respond(stream, &metrics).await {
                tracing::debug!("metrics client: {e}");
            }
        });
    }
}

async fn respond(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "slow client"))??;
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        )
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            b"not found; metrics are at GET /metrics\n".to_vec(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}
