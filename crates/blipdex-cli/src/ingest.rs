//! `blipdex ingest`: flags (or a pipeline file) → one ingest job.

use std::path::PathBuf;

use anyhow::Context;
use blipdex_ingest::{IngestJob, IngestModels, ProgressMode, Shard};
use blipdex_model::opt::LinearStorage;
use blipdex_model::{Captioner, LoadOptions, ModelFiles, Retriever};
use clap::Args;

use crate::args::{parse_device, parse_dtype};

#[derive(Args, Debug)]
pub struct IngestArgs {
    /// Folders (or files) to index, object-store prefixes (s3://bucket/photos, gs://, az://,
    /// file://) and listing files (.txt, .csv, .tsv, .parquet: one path or URL per line/row).
    #[arg(env = "BLIPDEX_PATHS", value_delimiter = ',')]
    pub paths: Vec<PathBuf>,
    /// Index directory (created if missing), or an object-store prefix (s3://bucket/index,
    /// gs://, az://, file://), worked on in a local copy under --cache-dir.
    #[arg(long, env = "BLIPDEX_INDEX")]
    pub index: Option<PathBuf>,
    #[command(flatten)]
    pub remote: crate::args::RemoteArgs,
    /// The column of a CSV/TSV or Parquet listing holding the paths or URLs [default: url].
    #[arg(long, env = "BLIPDEX_LISTING_COLUMN")]
    pub listing_column: Option<String>,
    /// Retrieval checkpoint: directory or hub repo id.
    #[arg(long, env = "BLIPDEX_MODEL")]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit) of --model [default: main].
    #[arg(long, env = "BLIPDEX_REVISION")]
    pub revision: Option<String>,
    /// A TOML ingest job (see pipelines/); flags override its keys.
    #[arg(long, env = "BLIPDEX_PIPELINE")]
    pub pipeline: Option<PathBuf>,
    /// Images per forward pass of the model [default: 8].
    #[arg(long, env = "BLIPDEX_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Images per atomic commit: the most work a crash can cost [default: 256].
    #[arg(long, env = "BLIPDEX_COMMIT_EVERY")]
    pub commit_every: Option<usize>,
    /// Threads that read, hash, decode and resize images [default: 0 = one per core].
    #[arg(long, env = "BLIPDEX_DECODE_THREADS")]
    pub decode_threads: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "BLIPDEX_DEVICE")]
    pub device: Option<String>,
    /// Vision tower precision: f32, f16, bf16.
    #[arg(long, env = "BLIPDEX_DTYPE")]
    pub dtype: Option<String>,
    /// Reject images with more pixels than this (decompression-bomb guard) [default: 178956970].
    #[arg(long, env = "BLIPDEX_MAX_IMAGE_PIXELS")]
    pub max_image_pixels: Option<u64>,
    /// How JPEGs are decoded: exact (every pixel, then the Pillow-exact resize: transformers'
    /// numbers) or fast (a reduced DCT scale keeping twice the model's input size) [default: fast
    /// on a GPU, exact on the CPU].
    #[arg(long, env = "BLIPDEX_DECODE")]
    pub decode: Option<blipdex_model::image::DecodeMode>,
    /// Glob a file's path must match to be indexed (repeatable: any of them); replaces the
    /// pipeline file's `include`.
    #[arg(long, env = "BLIPDEX_INCLUDE", value_delimiter = ',')]
    pub include: Vec<String>,
    /// Glob that excludes a file, e.g. '**/.thumbnails/**' (repeatable); replaces the pipeline
    /// file's `exclude`.
    #[arg(long, env = "BLIPDEX_EXCLUDE", value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Store embeddings as f16 on disk (half the size; scores change by ~1e-3). Only when the
    /// index is created; an existing index keeps its precision.
    #[arg(long, env = "BLIPDEX_F16_EMBEDDINGS")]
    pub f16_embeddings: bool,
    /// Also store a caption per image, made by this captioning checkpoint.
    #[arg(long, env = "BLIPDEX_CAPTION_MODEL")]
    pub caption_model: Option<String>,
    /// Keep each new image's vision encoder states (f16 or f32) in <index>/vision-cache, so
    /// `search --rerank` and the server's ITM skip the vision tower (ViT-g: 0.72 MB/image in f16).
    #[arg(long, env = "BLIPDEX_VISION_CACHE")]
    pub vision_cache: Option<String>,
    /// Print the final summary as one JSON line.
    #[arg(long, env = "BLIPDEX_JSON")]
    pub json: bool,
    /// Progress on stderr: auto (a bar on a terminal, a line every 10 s otherwise), json (one
    /// {"progress": {done, total, images_per_s, elapsed_s}} line a second and at the end), none.
    #[arg(long, env = "BLIPDEX_PROGRESS", value_parser = ["auto", "json", "none"])]
    pub progress: Option<String>,
    /// Worker mode: ingest shard I of N (0-based, e.g. 3/16) into <index>/parts/, for
    /// `blipdex index merge`. Without it, a Slurm array task (SLURM_ARRAY_TASK_ID /
    /// SLURM_ARRAY_TASK_COUNT) is a worker of its array.
    #[arg(long, env = "BLIPDEX_SHARD")]
    pub shard: Option<String>,
    /// Worker count when the engine gives each worker only its index: the shard is then
    /// JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs) of N.
    #[arg(long, env = "BLIPDEX_SHARDS")]
    pub shards: Option<u32>,
}

impl IngestArgs {
    fn job(&self) -> anyhow::Result<IngestJob> {
        let mut job = match &self.pipeline {
            Some(p) => IngestJob::from_toml_file(p)?,
            None => IngestJob::default(),
        };
        if !self.paths.is_empty() {
            job.roots = self.paths.clone();
        }
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = &self.$field { job.$field = v.clone().into(); }
            )*};
        }
        set!(
            index,
            model,
            revision,
            batch_size,
            commit_every,
            decode_threads,
            device,
            dtype
        );
        set!(
            max_image_pixels,
            decode,
            caption_model,
            vision_cache,
            listing_column
        );
        if !self.include.is_empty() {
            job.include = self.include.clone();
        }
        if !self.exclude.is_empty() {
            job.exclude = self.exclude.clone();
        }
        job.f16_embeddings |= self.f16_embeddings;
        job.remote = self.remote.options();
        if self.remote.cache_dir.is_some() || job.cache_dir.is_none() {
            // Needed only for an index on object storage, where its absence is reported.
            job.cache_dir = self.remote.cache_dir().ok();
        }
        let shard = Shard::resolve(self.shard.as_deref(), self.shards, |k| {
            std::env::var(k).ok()
        })?;
        if shard.is_some() {
            job.shard = shard;
        }
        job.progress = match self.progress.as_deref() {
            Some("json") => ProgressMode::Json,
            Some("none") => ProgressMode::None,
            Some(_) => ProgressMode::Auto,
            None => job.progress,
        };
        Ok(job)
    }
}

pub fn run(args: &IngestArgs) -> anyhow::Result<()> {
    let job = args.job()?;
    let summary = run_job(&job)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "indexed {} new images ({:.1}/s), {} captioned, {} duplicates, {} unchanged, \
             {} rejected, {} removed in {:.1}s",
            summary.indexed,
            summary.images_per_s,
            summary.captioned,
            summary.duplicates,
            summary.unchanged,
            summary.rejected,
            summary.removed,
            summary.seconds
        );
        if summary.rejected > 0 {
            if let Some(index) = &job.index {
                println!(
                    "rejected files and reasons: {}",
                    index.join("rejects.jsonl").display()
                );
            }
        }
    }
    Ok(())
}

/// Loads the job's models and runs it.
pub fn run_job(job: &IngestJob) -> anyhow::Result<blipdex_ingest::IngestSummary> {
    job.validate()?;
    let spec = job.model.as_deref().context("no --model")?;
    let files = ModelFiles::resolve(spec, job.revision.as_deref())?;
    let opts = LoadOptions {
        device: parse_device(&job.device)?,
        dtype: parse_dtype(&job.dtype)?,
        ..LoadOptions::default()
    };
    let retriever = Retriever::load(&files, &opts)?;
    let captioner = match job.caption_model.as_deref() {
        Some(spec) => {
            let cf = ModelFiles::resolve(spec, None)?;
            Some(Captioner::load(&cf, &opts, LinearStorage::Float)?)
        }
        None => None,
    };
    Ok(blipdex_ingest::ingest_with(
        job,
        IngestModels {
            retrieval: &retriever,
            captioner: captioner.as_ref(),
        },
    )?)
}
