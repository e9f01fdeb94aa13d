//! Declarative ingest jobs (`pipelines/*.toml`), merged with command-line flags.

use std::path::{Path, PathBuf};

use blipdex_core::{Error, Result};
use serde::Deserialize;

/// One ingest job. Every field can come from a TOML job file; CLI flags override it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestJob {
    /// Folders (or single files) to index, walked recursively.
    #[serde(default)]
    pub roots: Vec<PathBuf>,
    /// Glob patterns a file's path must match (any of them) to be indexed; empty = all images.
    #[serde(default)]
    pub include: Vec<String>,
    /// Glob patterns that exclude a file (e.g. `**/.thumbnails/**`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Index directory.
    pub index: Option<PathBuf>,
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
        for r in &mut job.roots {
            if r.is_relative() {
                *r = base.join(&*r);
            }
        }
        if let Some(i) = &mut job.index {
            if i.is_relative() {
                *i = base.join(&*i);
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
