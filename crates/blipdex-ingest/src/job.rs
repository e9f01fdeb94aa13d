//! Declarative ingest jobs (`pipelines/*.toml`), merged with command-line flags.

use std::path::{Path, PathBuf};

use blipdex_core::{Error, Result};
use serde::Deserialize;

/// One ingest job. Every field can come from a TOML job file; CLI flags override it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestJob {
    /// Folders (or single files) to index, walked recursively; object-store prefixes
    /// (`s3://bucket/photos`, `gs://`, `az://`, `file://`), listed; and listing files
    /// (`.txt`, `.csv`, `.tsv`, `.parquet`, local or on object storage) naming paths or URLs.
    #[serde(default)]
    pub roots: Vec<PathBuf>,
    /// The column of a CSV/TSV or Parquet listing that holds the paths or URLs.
    #[serde(default = "defaults::listing_column")]
    pub listing_column: String,
    /// Glob patterns a file's path must match (any of them) to be indexed; empty = all images.
    #[serde(default)]
    pub include: Vec<String>,
    /// Glob patterns that exclude a file (e.g. `**/.thumbnails/**`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Index directory, or an object-store prefix (worked on in a local copy under `cache_dir`).
    pub index: Option<PathBuf>,
    /// Where local copies of object-store indexes (and a worker's part, before its upload)
    /// live. Needed when `index` is an object-store prefix.
    pub cache_dir: Option<PathBuf>,
    /// Retries of object-store requests (set by the caller, not the job file).
    #[serde(skip)]
    pub remote: blipdex_remote::RemoteOptions,
    /// Retrieval checkpoint (directory or hub repo id).
    pub model: Option<String>,
    pub revision: Option<String>,
    #[serde(default = "defaults::device")]
    pub device: String,
    #[serde(default = "defaults::dtype")]
    pub dtype: String,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Images per atomic commit: the most work a crash can cost.
    #[serde(default = "defaults::commit_every")]
    pub commit_every: usize,
    /// Threads that read, hash, decode and resize images (0 = one per core).
    #[serde(default)]
    pub decode_threads: usize,
    #[serde(default = "defaults::max_image_pixels")]
    pub max_image_pixels: u64,
    /// How JPEGs are decoded: `exact` (full size, transformers' numbers) or `fast` (a reduced
    /// DCT scale that keeps twice the model's input size). Unset: fast on a GPU, where the
    /// decoding bounds the rate, exact on the CPU, where the model does (README: "Decoding").
    pub decode: Option<blipdex_model::image::DecodeMode>,
    /// Store embeddings as f16 on disk (half the size; scores change by ~1e-3).
    #[serde(default)]
    pub f16_embeddings: bool,
    /// Captioning checkpoint: also store a caption per image (and add missing ones to images
    /// indexed earlier).
    pub caption_model: Option<String>,
    /// Keep each new image's vision encoder states in `<index>/vision-cache` ("f16" or "f32")
    /// so ITM reranking reads them instead of re-running the vision tower.
    pub vision_cache: Option<String>,
    /// How progress is shown on stderr.
    #[serde(default)]
    pub progress: ProgressMode,
    /// Worker mode: this run takes one shard of the input ("I/N") and writes it as a part of
    /// the index (`<index>/parts/`), for `blipdex index merge` to fold in.
    #[serde(default)]
    pub shard: Option<Shard>,
}

/// Whether a root or index names an object-store location rather than a local path.
pub fn is_url(p: &Path) -> bool {
    p.to_str().is_some_and(blipdex_remote::is_url)
}

/// One worker's share of an ingest spread over N workers: the files whose path (relative to
/// its root) hashes to `index` modulo `count`. Deterministic, so a retried or duplicated worker
/// takes the same files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    pub fn new(index: u32, count: u32) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(Error::InvalidArgument(format!(
                "shard {index}/{count}: the shard index must be below the shard count (0-based)"
            )));
        }
        Ok(Self { index, count })
    }

    /// Whether this shard takes the file at `relative` (its path below its root).
    pub fn takes(&self, relative: &Path) -> bool {
        let h = blake3::hash(blipdex_core::paths::encode(relative).as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&h.as_bytes()[..8]);
        u64::from_le_bytes(first) % u64::from(self.count) == u64::from(self.index)
    }

    /// The part directory's name: `shard-IIIII-of-NNNNN`.
    pub fn part_name(&self) -> String {
        format!("shard-{:05}-of-{:05}", self.index, self.count)
    }
}

impl Shard {
    /// The shard of this worker, from `--shard I/N` (`flag`), else from what the engine that
    /// started it says: `JOB_COMPLETION_INDEX` (Kubernetes Indexed Jobs) with `--shards N`, or
    /// `SLURM_ARRAY_TASK_ID` less `SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT` (Slurm job
    /// arrays). `env` reads the environment (the caller's: nothing here reads it). `None`: not
    /// a worker.
    pub fn resolve(
        flag: Option<&str>,
        shards: Option<u32>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Shard>> {
        if let Some(s) = flag {
            return s.parse().map(Some);
        }
        let num = |name: &str| -> Result<Option<u32>> {
            env(name)
                .map(|v| {
                    v.trim().parse::<u32>().map_err(|_| {
                        Error::InvalidArgument(format!("{name}={v:?} is not a shard number"))
                    })
                })
                .transpose()
        };
        if let Some(n) = shards {
            let i = num("JOB_COMPLETION_INDEX")?.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--shards {n} without a shard index: give --shard I/{n}, or run as a \
                     Kubernetes Indexed Job (JOB_COMPLETION_INDEX)"
                ))
            })?;
            return Shard::new(i, n).map(Some);
        }
        match (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            (Some(id), Some(count)) => {
                let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                let i = id.checked_sub(min).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"
                    ))
                })?;
                Shard::new(i, count).map(Some)
            }
            _ => Ok(None),
        }
    }
}

impl std::str::FromStr for Shard {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "shard {s:?}: write it I/N, e.g. 3/16 for the fourth of 16 workers (0-based)"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        Self::new(
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        )
    }
}

impl TryFrom<String> for Shard {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// How an ingest shows its progress on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgressMode {
    /// A bar on a terminal, a line every 10 s otherwise.
    #[default]
    Auto,
    /// One JSON object a line, every second and at the end:
    /// `{"progress": {"done", "total", "images_per_s", "elapsed_s"}}` (`done` counts files read).
    Json,
    /// Nothing.
    None,
}

mod defaults {
    pub fn device() -> String {
        "cpu".into()
    }
    pub fn dtype() -> String {
        "f32".into()
    }
    pub fn listing_column() -> String {
        "url".into()
    }
    pub fn batch_size() -> usize {
        8
    }
    pub fn commit_every() -> usize {
        256
    }
    pub fn max_image_pixels() -> u64 {
        blipdex_model::image::DEFAULT_MAX_PIXELS
    }
}

impl Default for IngestJob {
    fn default() -> Self {
        // An empty TOML table holds every default.
        toml::from_str("").unwrap_or_else(|_| unreachable!("defaults parse"))
    }
}

impl IngestJob {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut job: IngestJob = toml::from_str(&text)
            .map_err(|e| Error::InvalidArgument(format!("pipeline {}: {e}", path.display())))?;
        // Relative paths in a job file are relative to the file, not to where blipdex runs.
        let base = path.parent().unwrap_or(Path::new("."));
        let local_relative = |p: &Path| p.is_relative() && !is_url(p);
        for r in &mut job.roots {
            if local_relative(r) {
                *r = base.join(&*r);
            }
        }
        for p in job.index.iter_mut().chain(&mut job.cache_dir) {
            if local_relative(p) {
                *p = base.join(&*p);
            }
        }
        Ok(job)
    }

    pub fn validate(&self) -> Result<()> {
        if self.roots.is_empty() {
            return Err(Error::InvalidArgument(
                "no folders to ingest: give PATH arguments or `roots` in the pipeline file".into(),
            ));
        }
        if self.index.is_none() {
            return Err(Error::InvalidArgument(
                "no index directory: give --index".into(),
            ));
        }
        if self.model.is_none() {
            return Err(Error::InvalidArgument("no model: give --model".into()));
        }
        if let Some(v) = &self.vision_cache {
            v.parse::<blipdex_model::vision_cache::CacheDtype>()?;
        }
        if self.batch_size == 0 || self.commit_every == 0 {
            return Err(Error::InvalidArgument(
                "batch_size and commit_every must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses() -> Result<()> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/photos.toml");
        let job = IngestJob::from_toml_file(&p)?;
        assert!(!job.roots.is_empty());
        assert!(
            job.roots[0].is_absolute()
                || job.roots[0].starts_with(p.parent().unwrap_or(Path::new("")))
        );
        assert!(!job.exclude.is_empty());
        Ok(())
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<IngestJob>("rootz = ['x']")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rootz"), "{err}");
    }

    #[test]
    fn defaults() {
        let j = IngestJob::default();
        assert_eq!(j.batch_size, 8);
        assert!(j.validate().is_err());
    }
}

#[cfg(test)]
mod shard_tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn shards_partition_the_input() {
        let n = 5;
        let shards: Vec<Shard> = (0..n).map(|i| Shard::new(i, n).expect("shard")).collect();
        let mut per = vec![0usize; n as usize];
        for f in 0..1000 {
            let rel = PathBuf::from(format!("dir{}/img_{f}.jpg", f % 7));
            let takers: Vec<usize> = (0..n as usize).filter(|&i| shards[i].takes(&rel)).collect();
            assert_eq!(takers.len(), 1, "{rel:?}");
            per[takers[0]] += 1;
        }
        // A hash, not a stripe: each of 5 shards gets about a fifth.
        assert!(per.iter().all(|&c| (150..250).contains(&c)), "{per:?}");
    }

    #[test]
    fn shard_comes_from_the_flag_or_the_engine() {
        let none = env(&[]);
        assert_eq!(Shard::resolve(None, None, &none).ok(), Some(None));
        let s = Shard::resolve(Some("3/16"), None, &none).expect("flag");
        assert_eq!(s, Some(Shard::new(3, 16).expect("shard")));
        for bad in ["16/16", "3", "a/4", "1/0"] {
            assert!(Shard::resolve(Some(bad), None, &none).is_err(), "{bad}");
        }
        // Kubernetes Indexed Job: the index from the environment, the count from --shards.
        let k8s = env(&[("JOB_COMPLETION_INDEX", "2")]);
        assert_eq!(
            Shard::resolve(None, Some(4), &k8s).expect("k8s"),
            Some(Shard::new(2, 4).expect("shard"))
        );
        assert!(Shard::resolve(None, Some(4), &none).is_err());
        assert!(Shard::resolve(None, Some(2), &k8s).is_err(), "index 2 of 2");
        // Slurm array --array=1-8: ids 1..=8, min 1, count 8.
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "8"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
        ]);
        assert_eq!(
            Shard::resolve(None, None, &slurm).expect("slurm"),
            Some(Shard::new(7, 8).expect("shard"))
        );
        // The flag wins over the engine's variables.
        assert_eq!(
            Shard::resolve(Some("0/2"), None, &slurm).expect("flag"),
            Some(Shard::new(0, 2).expect("shard"))
        );
        let bad = env(&[
            ("SLURM_ARRAY_TASK_ID", "x"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ]);
        assert!(Shard::resolve(None, None, &bad).is_err());
    }
}
