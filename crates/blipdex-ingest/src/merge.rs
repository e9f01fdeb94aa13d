//! Ingest spread over many workers, then one index.
//!
//! A worker (`ingest --shard I/N`) writes its shard of the input as a *part*: a complete
//! blipdex store under `<index>/parts/shard-IIIII-of-NNNNN/`, committed in atomic batches like
//! any ingest (a killed worker started again resumes; two started at once take turns on the
//! part's lock and the second finds everything unchanged), and marked finished by `DONE`
//! (JSON: the shard and the part's generation), written atomically after its last commit.
//!
//! [`merge`] folds every finished part into the index at `<index>`: an image new to the index
//! is added with its embeddings, as the part stored them (no model runs); one it already holds
//! (same content hash: a duplicate across shards, or a part merged before) only gains the
//! paths and the caption it lacks, so merging again changes nothing and image ids stay unique.
//! Each part goes in as atomic commits of at most [`MERGE_BATCH`] images, so a merge killed
//! midway leaves a consistent index and a rerun completes it; a server reading the index picks
//! up each commit as it does an ingest's. Paths that a part no longer holds (files deleted
//! since an earlier merge) are not removed from the index by a merge.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use blipdex_core::{Error, Result};
use blipdex_store::{Batch, ImageRecord, Store, StoreOptions};
use serde::{Deserialize, Serialize};

use crate::job::Shard;

/// Most images of one merge commit (the embeddings of a commit are held in memory: 32 KB per
/// image for ViT-g in f32).
pub const MERGE_BATCH: usize = 4096;

/// Where the workers' parts of `index` live.
pub fn parts_dir(index: &Path) -> PathBuf {
    index.join("parts")
}

/// `DONE` of a finished part.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Done {
    shard: String,
    generation: u64,
}

/// Marks the part in `dir` finished at `generation` (atomically: a temporary file renamed).
pub(crate) fn mark_done(dir: &Path, shard: Shard, generation: u64) -> Result<()> {
    let done = Done {
        shard: shard.to_string(),
        generation,
    };
    let tmp = dir.join(".DONE.tmp");
    let text = serde_json::to_string(&done).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    let path = dir.join("DONE");
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

/// What one merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MergeSummary {
    /// Finished parts merged.
    pub parts: usize,
    /// Part directories without `DONE` (a worker still running or never finished): skipped.
    pub unfinished: Vec<String>,
    /// Images new to the index.
    pub added: usize,
    /// Images the index held that gained paths or a caption.
    pub updated: usize,
    /// Images the index held already as they are.
    pub unchanged: usize,
    pub commits: usize,
    /// The index's image count after the merge.
    pub images: usize,
}

/// Folds every finished part under `<index>/parts` into the index at `index` (created from the
/// parts' model fingerprint and shapes when missing).
pub fn merge(index: &Path) -> Result<MergeSummary> {
    let dir = parts_dir(index);
    let mut names: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    names.sort();
    let mut summary = MergeSummary::default();
    let mut parts = Vec::new();
    for p in names {
        if p.join("DONE").is_file() {
            parts.push(p);
        } else {
            summary.unfinished.push(p.display().to_string());
        }
    }
    if parts.is_empty() {
        return Err(Error::NotFound(format!(
            "no finished parts under {}: run `blipdex ingest --shard I/N` workers first{}",
            dir.display(),
            if summary.unfinished.is_empty() {
                String::new()
            } else {
                format!(" ({} still unfinished)", summary.unfinished.len())
            }
        )));
    }
    let mut main: Option<Store> = None;
    for part_dir in &parts {
        let part = Store::open_readonly(part_dir)?;
        let store = match &mut main {
            Some(s) => s,
            None => main.insert(Store::create_or_open(
                index,
                StoreOptions::new(part.model_fingerprint(), part.num_query(), part.dim())
                    .with_dtype(part.dtype()),
            )?),
        };
        check_compatible(store, &part)?;
        merge_part(store, &part, &mut summary)?;
        summary.parts += 1;
    }
    summary.images = main.map_or(0, |s| s.len());
    Ok(summary)
}

fn check_compatible(main: &Store, part: &Store) -> Result<()> {
    if part.model_fingerprint() != main.model_fingerprint() {
        return Err(Error::ModelMismatch {
            dir: part.dir().to_path_buf(),
            stored: part.model_fingerprint().to_string(),
            requested: format!("the index's {}", main.model_fingerprint()),
        });
    }
    if (part.num_query(), part.dim(), part.dtype()) != (main.num_query(), main.dim(), main.dtype())
    {
        return Err(Error::InvalidArgument(format!(
            "part {} holds {}x{} {} embeddings, the index {}x{} {}: ingest every shard with the \
             same settings",
            part.dir().display(),
            part.num_query(),
            part.dim(),
            part.dtype(),
            main.num_query(),
            main.dim(),
            main.dtype()
        )));
    }
    Ok(())
}

fn merge_part(main: &mut Store, part: &Store, summary: &mut MergeSummary) -> Result<()> {
    let mut batch = Batch::new();
    let mut in_batch = 0;
    // Content hashes added by this batch (not yet visible through `main`).
    let mut pending: HashSet<String> = HashSet::new();
    for row in part.iter() {
        if row.deleted {
            continue;
        }
        match main.by_content_hash(&row.content_hash) {
            Some(have) => {
                let missing: Vec<&String> = row
                    .paths
                    .iter()
                    .filter(|p| !have.paths.contains(p))
                    .collect();
                let caption = row.caption.as_ref().filter(|_| have.caption.is_none());
                if missing.is_empty() && caption.is_none() {
                    summary.unchanged += 1;
                    continue;
                }
                for p in missing {
                    batch.add_path(have.image_id, p.clone());
                }
                if let Some(c) = caption {
                    batch.set_caption(have.image_id, Some(c.clone()));
                }
                summary.updated += 1;
            }
            None if pending.contains(&row.content_hash) => summary.unchanged += 1,
            None => {
                let embeds = part.embeds(row.image_id).ok_or_else(|| {
                    Error::Internal(format!(
                        "part {} lists image {} without embeddings",
                        part.dir().display(),
                        row.image_id
                    ))
                })?;
                pending.insert(row.content_hash.clone());
                batch.add(ImageRecord {
                    path: row.path,
                    paths: row.paths,
                    content_hash: row.content_hash,
                    width: row.width,
                    height: row.height,
                    file_size: row.file_size,
                    mtime_ns: row.mtime_ns,
                    embeds,
                    caption: row.caption,
                });
                summary.added += 1;
            }
        }
        in_batch += 1;
        if in_batch >= MERGE_BATCH {
            main.commit(std::mem::take(&mut batch))?;
            summary.commits += 1;
            in_batch = 0;
            pending.clear();
        }
    }
    if !batch.is_empty() {
        main.commit(batch)?;
        summary.commits += 1;
    }
    Ok(())
}
