//! `blipdex serve`: the gRPC retrieval service (`blipdex.v1.Retrieval`, health, reflection,
//! Prometheus metrics) over an index.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use blipdex_model::image::DEFAULT_MAX_PIXELS;
use blipdex_model::ModelFiles;
use blipdex_search::{Engine, EngineOptions};
use blipdex_server::{Limits, ServerConfig};
use clap::Args;

use crate::args::ModelArgs;
use crate::caption::Quantize;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Index directory (built by `blipdex ingest` with --model), or an object-store prefix
    /// (s3://bucket/index): copied to --cache-dir at start, then every --refresh-ms.
    #[arg(long, env = "BLIPDEX_INDEX")]
    pub index: String,
    #[command(flatten)]
    pub remote: crate::args::RemoteArgs,
    /// The retrieval checkpoint that built the index (e.g. Salesforce/blip2-itm-vit-g).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Captioning checkpoint for the Caption RPC and `with_captions` (e.g.
    /// Salesforce/blip2-opt-2.7b); without it those answer FAILED_PRECONDITION.
    #[arg(long, env = "BLIPDEX_CAPTION_MODEL")]
    pub caption_model: Option<String>,
    /// Hub revision of --caption-model.
    #[arg(long, env = "BLIPDEX_CAPTION_REVISION")]
    pub caption_revision: Option<String>,
    /// Store the caption model's decoder Linear weights quantized.
    #[arg(long, env = "BLIPDEX_QUANTIZE", value_enum)]
    pub quantize: Option<Quantize>,
    /// gRPC address.
    #[arg(long, env = "BLIPDEX_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Prometheus metrics address (GET /metrics); none by default.
    #[arg(long, env = "BLIPDEX_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// HTTP address of the JSON API (/api/v1, described at /openapi.json) and the search page
    /// (/), e.g. 127.0.0.1:8080; none by default. Same limits and token as gRPC.
    #[arg(long, env = "BLIPDEX_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Largest request message in bytes (an image sent for search or captioning); larger ones
    /// are refused with INVALID_ARGUMENT.
    #[arg(long, env = "BLIPDEX_MAX_MESSAGE_BYTES", default_value_t = 16 << 20,
          value_parser = clap::value_parser!(u64).range(1024..=(1u64 << 31)))]
    pub max_message_bytes: u64,
    /// Refuse images with more pixels than this (decompression-bomb guard).
    #[arg(long, env = "BLIPDEX_MAX_IMAGE_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
    /// Requests that may wait for the model; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "BLIPDEX_QUEUE_DEPTH", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub queue_depth: u64,
    /// Most requests batched into one model call.
    #[arg(long, env = "BLIPDEX_MAX_BATCH", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_batch: u64,
    /// How long the model waits for more requests to batch after the first (milliseconds).
    #[arg(long, env = "BLIPDEX_BATCH_WAIT_MS", default_value_t = 2)]
    pub batch_wait_ms: u64,
    /// Name of the environment variable holding the bearer token clients must send
    /// (`authorization: Bearer <token>`). When that variable is unset, there is no auth.
    #[arg(
        long,
        env = "BLIPDEX_AUTH_TOKEN_ENV",
        default_value = "BLIPDEX_AUTH_TOKEN"
    )]
    pub auth_token_env: String,
    /// TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "BLIPDEX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, env = "BLIPDEX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often to look for what a later `blipdex ingest` committed (milliseconds; 0 = never).
    #[arg(long, env = "BLIPDEX_REFRESH_MS", default_value_t = 2000)]
    pub refresh_ms: u64,
    /// How often to write generated captions to the index (milliseconds; 0 = only at shutdown).
    #[arg(long, env = "BLIPDEX_CAPTION_FLUSH_MS", default_value_t = 30_000)]
    pub caption_flush_ms: u64,
    /// Memory for cached vision states used by ITM reranking (MiB).
    #[arg(long, env = "BLIPDEX_VISION_CACHE_MB", default_value_t = 512)]
    pub vision_cache_mb: usize,
    /// Before serving, ingest these folders into --index with --model (created if missing,
    /// incremental): one command from photos to a running service.
    #[arg(long, env = "BLIPDEX_INGEST", value_delimiter = ',')]
    pub ingest: Vec<PathBuf>,
    /// Logs as one JSON object per line (RUST_LOG filters; default info).
    #[arg(long, env = "BLIPDEX_LOG_JSON")]
    pub log_json: bool,
}

fn every(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

impl ServeArgs {
    fn auth_token(&self) -> anyhow::Result<Option<String>> {
        match std::env::var(&self.auth_token_env) {
            Ok(t) if t.trim().is_empty() => bail!(
                "{} is set but empty; set a token or unset it to serve without auth",
                self.auth_token_env
            ),
            Ok(t) => Ok(Some(t.trim().to_string())),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => bail!("{}: {e}", self.auth_token_env),
        }
    }

    /// The server settings; reads the token and TLS files.
    pub fn config(&self) -> anyhow::Result<ServerConfig> {
        Ok(ServerConfig {
            limits: Limits {
                max_message_bytes: usize::try_from(self.max_message_bytes)
                    .context("--max-message-bytes")?,
                queue_depth: usize::try_from(self.queue_depth).context("--queue-depth")?,
                max_batch: usize::try_from(self.max_batch).context("--max-batch")?,
                batch_wait: Duration::from_millis(self.batch_wait_ms),
            },
            auth_token: self.auth_token()?,
            tls: blipdex_server::tls_from_paths(self.tls_cert.clone(), self.tls_key.clone())?,
            refresh_every: every(self.refresh_ms),
            caption_flush_every: every(self.caption_flush_ms),
        })
    }

    /// Resolves the checkpoints (downloads them from the hub if needed) and loads the engine;
    /// runs on the server's model thread so health answers while this takes time.
    fn loader(
        &self,
        index: PathBuf,
        persist_captions: bool,
    ) -> anyhow::Result<impl FnOnce() -> blipdex_core::Result<Engine> + Send> {
        let load = self.model.load_options()?;
        let (model, revision) = (self.model.model.clone(), self.model.revision.clone());
        let caption = self.caption_model.clone();
        let caption_revision = self.caption_revision.clone();
        let storage = Quantize::storage(self.quantize);
        let max_image_pixels = self.max_image_pixels;
        let vision_lru_bytes = self.vision_cache_mb.saturating_mul(1 << 20);
        Ok(move || {
            let files = ModelFiles::resolve(&model, revision.as_deref())?;
            let mut opts = EngineOptions::new(index, files);
            opts.load = load;
            opts.caption_model = caption
                .map(|c| ModelFiles::resolve(&c, caption_revision.as_deref()))
                .transpose()?;
            opts.caption_storage = storage;
            opts.max_image_pixels = max_image_pixels;
            opts.vision_lru_bytes = vision_lru_bytes;
            opts.persist_captions = persist_captions;
            Engine::load(&opts)
        })
    }
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    if !args.ingest.is_empty() {
        let job = blipdex_ingest::IngestJob {
            roots: args.ingest.clone(),
            index: Some(PathBuf::from(&args.index)),
            cache_dir: args.remote.cache_dir().ok(),
            remote: args.remote.options(),
            model: Some(args.model.model.clone()),
            revision: args.model.revision.clone(),
            device: args.model.device.clone(),
            dtype: args.model.dtype.clone(),
            max_image_pixels: args.max_image_pixels,
            // As `blipdex ingest --caption-model` does: every new image gets its caption stored.
            caption_model: args.caption_model.clone(),
            ..Default::default()
        };
        let s = crate::ingest::run_job(&job)?;
        eprintln!(
            "ingested {}: {} new, {} unchanged, {} duplicates, {} rejected, {} removed",
            args.index, s.indexed, s.unchanged, s.duplicates, s.rejected, s.removed
        );
    }
    let (index, remote) = args.remote.local_index(&args.index)?;
    if !index.join("manifest.json").is_file() {
        bail!(
            "{} is not a blipdex index (no manifest.json); build one with `blipdex ingest --index {} --model {} <photos>`",
            args.index,
            args.index,
            args.model.model
        );
    }
    let mut config = args.config()?;
    if let Some(remote) = remote {
        // The local copy follows the remote index; the server's own reload picks each new
        // generation up from the copy. Captions are not written into a copy.
        config.caption_flush_every = None;
        if let Some(every) = config.refresh_every {
            follow(remote, index.clone(), every);
        }
    }
    let loader = args.loader(index, config.caption_flush_every.is_some())?;
    blipdex_server::run_until_signal(
        blipdex_server::Endpoints {
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            http_listen: args.http_listen,
            log_json: args.log_json,
        },
        config,
        loader,
    )
}

/// Pulls each new generation of `remote` into `local`, every `every`, for the life of the
/// process (a failed pull is logged and retried at the next tick: the server keeps serving
/// what it has).
fn follow(remote: blipdex_remote::Remote, local: PathBuf, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("blipdex-index-pull".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            match blipdex_remote::mirror::pull(&remote, &local) {
                Ok(Some(s)) if s.changed => tracing::info!(
                    "{}: generation {} copied ({} files fetched)",
                    remote.url(),
                    s.generation,
                    s.copied
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("{}: cannot copy the index: {e}", remote.url()),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("index pull thread not started ({e}): serving the copy made at start");
    }
}
