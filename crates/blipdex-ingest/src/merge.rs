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
use blipdex_remote::{mirror, Remote};

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
    /// On object storage: the folder below the part's prefix holding the upload this marks
    /// complete (each upload has its own, so a retried or duplicated worker never mixes its
    /// files with another's; the last `DONE` written wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempt: Option<String>,
}

/// Marks the part in `dir` finished at `generation` (atomically: a temporary file renamed).
pub(crate) fn mark_done(dir: &Path, shard: Shard, generation: u64) -> Result<()> {
    let done = Done {
        shard: shard.to_string(),
        generation,
        attempt: None,
    };
    let text = serde_json::to_vec(&done).map_err(|e| Error::Internal(e.to_string()))?;
    blipdex_store::write_atomic(dir, "DONE", &text)
}

/// A worker starting on its part: the part is not finished until this run says so.
pub(crate) fn unmark_done(dir: &Path) -> Result<()> {
    let path = dir.join("DONE");
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// [`unmark_done`] of a part on object storage.
pub(crate) fn unmark_done_remote(index: &Remote, shard: Shard) -> Result<()> {
    index
        .child(&format!("parts/{}", shard.part_name()))
        .delete("DONE")
}

/// Where a worker builds its part of the index at `index` below the cache folder `cache`
/// (kept between runs on one machine, so a rerun resumes it).
pub fn worker_part_dir(cache: &Path, index: &Remote, shard: Shard) -> PathBuf {
    blipdex_remote::cache_dir_for(cache, &index.url())
        .join("parts")
        .join(shard.part_name())
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

/// Publishes a finished part (a local store, `DONE` written) of the index at `index`: uploads
/// it whole below `parts/<shard>/<attempt>/`, then writes `parts/<shard>/DONE` naming that
/// attempt. A worker killed mid-upload leaves an attempt no `DONE` names, which merges ignore.
pub(crate) fn publish_part(local: &Path, index: &Remote, shard: Shard) -> Result<()> {
    let done_path = local.join("DONE");
    let text = std::fs::read(&done_path).map_err(|e| Error::io(&done_path, e))?;
    let mut done: Done = serde_json::from_slice(&text)
        .map_err(|e| Error::store(local, format!("corrupt DONE: {e}")))?;
    let attempt = attempt_id();
    let part = index.child(&format!("parts/{}", shard.part_name()));
    let dest = part.child(&attempt);
    mirror::push(local, &dest, false)?;
    let rejects = local.join("rejects.jsonl");
    if rejects.is_file() {
        dest.upload("rejects.jsonl", &rejects)?;
    }
    done.attempt = Some(attempt);
    let text = serde_json::to_vec(&done).map_err(|e| Error::Internal(e.to_string()))?;
    part.put("DONE", text)?;
    tracing::info!("part {} published at {}", shard, dest.url());
    Ok(())
}

/// A name no other upload of the same part will draw (time, process and a counter).
fn attempt_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = format!("{nanos}-{}-{n}", std::process::id());
    let hex = blake3::hash(seed.as_bytes()).to_hex();
    format!("attempt-{}", &hex.as_str()[..16])
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
            parts.push((p.display().to_string(), p));
        } else {
            summary.unfinished.push(p.display().to_string());
        }
    }
    merge_parts(index, &parts, &dir.display().to_string(), summary)
}

/// [`merge`] for an index on object storage, through local copies under `cache`: the finished
/// parts and the index are pulled, merged locally and published as one new generation.
pub fn merge_remote(index: &Remote, cache: &Path) -> Result<MergeSummary> {
    index.probe()?;
    // The parts' copies live only for this merge.
    let merge_parts_dir = blipdex_remote::cache_dir_for(cache, &index.url()).join("merge-parts");
    let parts_remote = index.child("parts");
    let mut summary = MergeSummary::default();
    let mut parts = Vec::new();
    for name in parts_remote.list_folders()? {
        let part = parts_remote.child(&name);
        let Some(text) = part.get_opt("DONE")? else {
            summary.unfinished.push(part.url());
            continue;
        };
        let corrupt = |why: String| {
            Error::store(
                part.url(),
                format!("{why}; run its worker again (`blipdex ingest --shard ...`)"),
            )
        };
        let done: Done =
            serde_json::from_slice(&text).map_err(|e| corrupt(format!("corrupt DONE: {e}")))?;
        let attempt = done
            .attempt
            .filter(|a| !a.is_empty() && !a.contains(['/', '\\']) && a != "." && a != "..")
            .ok_or_else(|| corrupt("DONE names no upload (attempt)".into()))?;
        let upload = part.child(&attempt);
        let local = merge_parts_dir.join(&name).join(&attempt);
        // A part that cannot be read as an index is the worker's to redo; a network or
        // permission failure is not (it says so itself).
        let pulled = mirror::pull(&upload, &local).map_err(|e| match e {
            Error::Store { reason, .. } => {
                corrupt(format!("the upload {} is corrupt: {reason}", upload.url()))
            }
            Error::ObjectStore {
                kind: blipdex_core::ObjectStoreErrorKind::NotFound,
                reason,
                ..
            } => corrupt(format!(
                "the upload {} is incomplete: {reason}",
                upload.url()
            )),
            other => other,
        })?;
        if pulled.is_none() {
            return Err(corrupt(format!(
                "DONE names the upload {} but it holds no manifest.json",
                upload.url()
            )));
        }
        parts.push((upload.url(), local));
    }
    let main = mirror::copy_dir(cache, index, mirror::Role::Writer);
    mirror::pull_for_writing(index, &main)?;
    let summary = merge_parts(&main, &parts, &parts_remote.url(), summary)?;
    mirror::push(&main, index, false)?;
    if let Err(e) = std::fs::remove_dir_all(&merge_parts_dir) {
        tracing::warn!("{}: not removed ({e})", merge_parts_dir.display());
    }
    Ok(summary)
}

/// Merges the parts (each a name for messages and a local store directory) into `index`.
fn merge_parts(
    index: &Path,
    parts: &[(String, PathBuf)],
    parts_location: &str,
    mut summary: MergeSummary,
) -> Result<MergeSummary> {
    if parts.is_empty() {
        return Err(Error::NotFound(format!(
            "no finished parts under {parts_location}: run `blipdex ingest --shard I/N` workers \
             first{}",
            if summary.unfinished.is_empty() {
                String::new()
            } else {
                format!(" ({} still unfinished)", summary.unfinished.len())
            }
        )));
    }
    let open_part = |name: &String, part_dir: &PathBuf| {
        Store::open_readonly(part_dir).map_err(|e| match e {
            Error::Store { reason, .. } if name != &part_dir.display().to_string() => Error::store(
                name,
                format!("{reason} (local copy {})", part_dir.display()),
            ),
            other => other,
        })
    };
    let (first_name, first_dir) = &parts[0];
    let first = open_part(first_name, first_dir)?;
    let options = StoreOptions::new(first.model_fingerprint(), first.num_query(), first.dim())
        .with_dtype(first.dtype());
    drop(first);
    // The index's writer lock, held until the merged generation is in place.
    let main = Store::create_or_open(index, options.clone())?;
    let staging = stage(index)?;
    let mut store = Store::create_or_open(&staging, options)?;
    for (name, part_dir) in parts {
        let part = open_part(name, part_dir)?;
        check_compatible(&store, &part)?;
        merge_part(&mut store, &part, &mut summary)?;
        summary.parts += 1;
    }
    summary.images = store.len();
    drop(store);
    publish(&staging, index)?;
    drop(main);
    if let Err(e) = std::fs::remove_dir_all(&staging) {
        tracing::warn!("{}: not removed ({e})", staging.display());
    }
    Ok(summary)
}

/// Folder inside the index where a merge builds its generation.
const STAGING: &str = "merge-staging";

/// A copy of the committed index in `<index>/merge-staging` (the caller holds the index's
/// writer lock), made of hard links (the store's
/// files are never modified, so sharing them is safe), for the merge to commit to while
/// readers keep seeing the index as it was.
fn stage(index: &Path) -> Result<PathBuf> {
    let staging = index.join(STAGING);
    // Left by a merge that was killed: never published, so garbage.
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let manifest = std::fs::read(index.join(blipdex_store::MANIFEST))
        .map_err(|e| Error::io(index.join(blipdex_store::MANIFEST), e))?;
    let files = blipdex_store::manifest_info(&manifest, index)?.files;
    for f in &files {
        link_or_copy(&index.join(f), &staging.join(f))?;
    }
    blipdex_store::write_atomic(&staging, blipdex_store::MANIFEST, &manifest)?;
    Ok(staging)
}

/// Moves the merged generation from `staging` into `index` (under its writer lock): the files
/// the index lacks are linked in, then the manifest is replaced in one atomic rename, the
/// commit point of the whole merge. A kill before that leaves the index as it was (the linked
/// files are orphans its next writer removes).
fn publish(staging: &Path, index: &Path) -> Result<()> {
    let manifest = std::fs::read(staging.join(blipdex_store::MANIFEST))
        .map_err(|e| Error::io(staging.join(blipdex_store::MANIFEST), e))?;
    for f in blipdex_store::manifest_info(&manifest, staging)?.files {
        let dest = index.join(&f);
        if !dest.exists() {
            link_or_copy(&staging.join(&f), &dest)?;
        }
    }
    // Fsyncs the directory too, which makes the links durable with it.
    blipdex_store::write_atomic(index, blipdex_store::MANIFEST, &manifest)
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| Error::io(to, e))
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
                    meta: row.meta,
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
