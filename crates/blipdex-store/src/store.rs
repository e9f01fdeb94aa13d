//! [`Store`]: open, read, search and commit.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use blipdex_core::{Error, Result};
use fs2::FileExt;
use rayon::prelude::*;

use crate::ann::{Ann, AnnInfo};
use crate::fsutil::{self, TMP_PREFIX};
use crate::manifest::{FileRef, HnswDump, Manifest, MANIFEST};
use crate::search;
use crate::shard::{self, Layout, Patch};
use crate::state::State;
use crate::types::{
    CommitInfo, CommitTimings, Dtype, Hit, HnswParams, ImageRecord, ImageRow, StoreOptions,
};

const LOCK: &str = "LOCK";
/// Prefixes of the files the manifest owns; unreferenced ones are orphans.
const OWNED_PREFIXES: [&str; 3] = ["shard-", "patch-", "hnsw-"];
/// How far an embedding's squared norm may be from 1 (f16 round trips and model numerics stay
/// well inside; an unnormalized vector does not).
const NORM_TOLERANCE: f32 = 0.02;
/// Rows per shard written by [`Store::compact`].
const COMPACT_SHARD_ROWS: usize = 16384;

/// A change to the store, applied atomically by [`Store::commit`]. Operations apply in call order.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    ops: Vec<Op>,
    adds: usize,
}

#[derive(Debug, Clone)]
enum Op {
    Add(Box<ImageRecord>),
    AddPath(u64, String),
    RemovePath(String),
    Delete(u64),
    SetCaption(u64, Option<String>),
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an image; returns its index in [`CommitInfo::ids`]. If an image with the same
    /// `content_hash` is live (committed or added earlier in this batch), that image gets a new
    /// row with these embeddings and metadata, keeps its id and gains the record's paths.
    /// A path can belong to one live image only: the record's paths are taken away from any
    /// other image, and an image left without paths is deleted.
    pub fn add(&mut self, record: ImageRecord) -> usize {
        self.ops.push(Op::Add(Box::new(record)));
        self.adds += 1;
        self.adds - 1
    }

    /// Adds a path (e.g. a new copy of identical bytes) to a live image; taken from any other owner.
    pub fn add_path(&mut self, image_id: u64, path: impl Into<String>) {
        self.ops.push(Op::AddPath(image_id, path.into()));
    }

    /// Forgets a path (the file vanished); an image left without paths is deleted. Unknown
    /// paths are ignored, so a rescan can repeat this safely.
    pub fn remove_path(&mut self, path: impl Into<String>) {
        self.ops.push(Op::RemovePath(path.into()));
    }

    pub fn mark_deleted(&mut self, image_id: u64) {
        self.ops.push(Op::Delete(image_id));
    }

    /// Sets (or with `None` clears) an image's caption; works on deleted images too.
    pub fn set_caption(&mut self, image_id: u64, caption: Option<String>) {
        self.ops.push(Op::SetCaption(image_id, caption));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// An index directory opened for reading (and, from [`Store::create_or_open`], writing).
///
/// Everything committed is held in memory: metadata, the f32 embeddings (Q*E*4 bytes per row)
/// and the HNSW graph. Searching takes `&self` and is safe from many threads.
pub struct Store {
    dir: PathBuf,
    manifest: Manifest,
    state: State,
    ann: Ann,
    /// Held (flock) while writable; dropping the store releases it, so does a crash.
    lock: Option<File>,
    /// Set when a manifest write failed in a way that leaves its outcome unknown; the store
    /// must be reopened before it commits again.
    poisoned: bool,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn validate_options(dir: &Path, o: &StoreOptions) -> Result<()> {
    let bad = |r: String| {
        Err(Error::InvalidArgument(format!(
            "store {}: {r}",
            dir.display()
        )))
    };
    if o.fingerprint.trim().is_empty() {
        return bad("the model fingerprint is empty".into());
    }
    if o.num_query == 0 || o.dim == 0 || o.num_query > u16::MAX as usize {
        return bad(format!("bad embedding shape {}x{}", o.num_query, o.dim));
    }
    let h = &o.hnsw;
    if !(2..=256).contains(&h.max_nb_connection) || h.ef_construction == 0 {
        return bad(format!(
            "HNSW max_nb_connection must be in 2..=256 and ef_construction > 0, got {} and {}",
            h.max_nb_connection, h.ef_construction
        ));
    }
    if h.vectors_per_image == 0 {
        return bad("HNSW vectors_per_image must be at least 1".into());
    }
    Ok(())
}

/// Lowercase hex BLAKE3 of `bytes`, the store's `content_hash` format.
pub fn content_hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Lowercase hex BLAKE3 of a file's bytes (streamed).
pub fn content_hash_file(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().to_hex().to_string())
}

fn is_hex_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Store {
    /// Opens `dir` for writing, creating the directory and an empty store if needed. Takes the
    /// directory's writer lock, checks the model fingerprint and shape, and deletes files no
    /// committed manifest references (leftovers of an interrupted commit).
    pub fn create_or_open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        validate_options(&dir, &options)?;
        fs::create_dir_all(&dir).map_err(|e| fsutil::write_err(&dir, e))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| fsutil::write_err(&lock_path, e))?;
        if lock.try_lock_exclusive().is_err() {
            return Err(Error::store(
                &dir,
                "another process has it open for writing (one writer at a time; readers use \
                 Store::open_readonly)",
            ));
        }
        let manifest = match Manifest::read(&dir)? {
            Some(m) => {
                let shape = |fp: &str, q: usize, e: usize| format!("{fp} ({q}x{e} embeddings)");
                if m.model_fingerprint != options.fingerprint
                    || m.num_query != options.num_query
                    || m.dim != options.dim
                {
                    return Err(Error::ModelMismatch {
                        dir,
                        stored: shape(&m.model_fingerprint, m.num_query, m.dim),
                        requested: shape(&options.fingerprint, options.num_query, options.dim),
                    });
                }
                m
            }
            None => {
                let mut hnsw = options.hnsw;
                hnsw.vectors_per_image = hnsw.vectors_per_image.min(options.num_query);
                let m = Manifest::new(
                    &options.fingerprint,
                    options.num_query,
                    options.dim,
                    options.dtype,
                    hnsw,
                );
                m.write(&dir)?;
                m
            }
        };
        remove_orphans(&dir, &manifest)?;
        let (state, ann) = load(&dir, &manifest)?;
        let mut store = Self {
            dir,
            manifest,
            state,
            ann,
            lock: Some(lock),
            poisoned: false,
        };
        if !store.index_persisted() {
            // The dump lagged (a failed or interrupted dump): persist the caught-up graph now
            // so the next start-up does not insert those rows again.
            store.persist_index();
        }
        Ok(store)
    }

    /// Opens the committed state of `dir` for reading only (no lock, no cleanup; a writer may
    /// be committing meanwhile). To pick up later commits, poll [`Store::read_generation`] and
    /// open again when it differs from [`Store::generation`].
    pub fn open_readonly(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let mut attempt = 0;
        loop {
            let manifest = Manifest::read(&dir)?
                .ok_or_else(|| Error::store(&dir, format!("no {MANIFEST}: not a blipdex index")))?;
            match load(&dir, &manifest) {
                Ok((state, ann)) => {
                    return Ok(Self {
                        dir,
                        manifest,
                        state,
                        ann,
                        lock: None,
                        poisoned: false,
                    })
                }
                Err(e) => {
                    // A concurrent commit may have replaced files we were about to read.
                    attempt += 1;
                    let now = Manifest::read(&dir)?.map(|m| m.generation);
                    if attempt >= 5 || now == Some(manifest.generation) {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// The generation of the manifest currently in `dir` (cheap: reads only the manifest).
    pub fn read_generation(dir: impl AsRef<Path>) -> Result<u64> {
        let dir = dir.as_ref();
        Manifest::read(dir)?
            .map(|m| m.generation)
            .ok_or_else(|| Error::store(dir, format!("no {MANIFEST}: not a blipdex index")))
    }

    /// Generation of the manifest this store reflects; bumped by every manifest write.
    pub fn generation(&self) -> u64 {
        self.manifest.generation
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model_fingerprint(&self) -> &str {
        &self.manifest.model_fingerprint
    }

    /// Q: query vectors per image.
    pub fn num_query(&self) -> usize {
        self.manifest.num_query
    }

    /// E: embedding dimension.
    pub fn dim(&self) -> usize {
        self.manifest.dim
    }

    pub fn dtype(&self) -> Dtype {
        self.manifest.dtype
    }

    pub fn hnsw_params(&self) -> HnswParams {
        self.manifest.hnsw_params
    }

    pub fn is_writable(&self) -> bool {
        self.lock.is_some()
    }

    /// Live (not deleted) images.
    pub fn len(&self) -> usize {
        self.state.live
    }

    pub fn is_empty(&self) -> bool {
        self.state.live == 0
    }

    /// Rows held, superseded and deleted ones included (what [`Store::compact`] shrinks).
    pub fn total_rows(&self) -> usize {
        self.state.rows()
    }

    /// Next id the store will assign; ids are never reused.
    pub fn next_image_id(&self) -> u64 {
        self.manifest.next_image_id
    }

    /// An image's current metadata, deleted images included.
    pub fn get(&self, image_id: u64) -> Option<&ImageRow> {
        self.state.meta(image_id)
    }

    /// An image's Q*E embeddings (`[Q][E]`, f32), deleted images included.
    pub fn embeds(&self, image_id: u64) -> Option<&[f32]> {
        let e = self.state.images.get(&image_id)?;
        Some(self.state.row_embeds(e.row))
    }

    /// The live image with these bytes.
    pub fn by_content_hash(&self, content_hash: &str) -> Option<&ImageRow> {
        self.state
            .by_hash
            .get(content_hash)
            .and_then(|id| self.state.meta(*id))
    }

    /// The live image that `path` belongs to. For incremental ingest a file is unchanged when
    /// this returns a row whose `path` is it and whose `file_size` and `mtime_ns` match.
    pub fn by_path(&self, path: &str) -> Option<&ImageRow> {
        self.state
            .by_path
            .get(path)
            .and_then(|id| self.state.meta(*id))
    }

    /// Live images in commit order.
    pub fn iter(&self) -> impl Iterator<Item = &ImageRow> + '_ {
        self.state
            .row_live
            .iter()
            .enumerate()
            .filter(|(_, live)| **live)
            .filter_map(|(r, _)| self.state.meta(self.state.row_image[r]))
    }

    fn check_query(&self, t: &[f32]) -> Result<()> {
        if t.len() != self.dim() || t.iter().any(|x| !x.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "a text embedding must be {} finite floats, got {} values",
                self.dim(),
                t.len()
            )));
        }
        Ok(())
    }

    /// The k live images with the highest ITC score for the unit text embedding `t` (len E),
    /// by brute force over every image. Best first; equal scores by ascending id.
    pub fn search_exact(&self, t: &[f32], k: usize) -> Result<Vec<Hit>> {
        self.check_query(t)?;
        Ok(search::exact(&self.state, t, k))
    }

    /// [`Store::search_exact`] for many queries (`ts` holds n*E values); much faster per query
    /// than one call each, since every image is read from memory once per 32 queries.
    pub fn search_exact_batch(&self, ts: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        if !ts.len().is_multiple_of(self.dim()) {
            return Err(Error::InvalidArgument(format!(
                "{} values are not a whole number of {}-dim text embeddings",
                ts.len(),
                self.dim()
            )));
        }
        for t in ts.chunks_exact(self.dim()) {
            self.check_query(t)?;
        }
        Ok(search::exact_batch(&self.state, ts, k))
    }

    /// Approximate top-k: the HNSW graph yields the `max(ef, k)` nearest graph points among
    /// live images, their images are rescored exactly (max over all Q vectors) and the best k
    /// returned. Scores are exact; only membership is approximate. Larger `ef` = better recall.
    pub fn search_ann(&self, t: &[f32], k: usize, ef: usize) -> Result<Vec<Hit>> {
        self.check_query(t)?;
        if k == 0 || self.state.live == 0 {
            return Ok(Vec::new());
        }
        let live = &self.state.row_live;
        let keep = |r: usize| live.get(r).copied().unwrap_or(false);
        let rows = self
            .ann
            .candidates(t, ef.max(k), k.min(self.state.live), &keep);
        Ok(search::rescore(&self.state, &rows, t, k))
    }

    /// What the HNSW graph holds and how much of it came from the dump at open.
    pub fn ann_info(&self) -> AnnInfo {
        self.ann.info()
    }

    fn layout(&self) -> Layout<'_> {
        layout(&self.manifest)
    }

    fn check_writable(&self) -> Result<()> {
        if self.lock.is_none() {
            return Err(Error::store(
                &self.dir,
                "opened read-only; use Store::create_or_open to write",
            ));
        }
        if self.poisoned {
            return Err(Error::store(
                &self.dir,
                "an earlier manifest write failed midway; reopen the store before committing again",
            ));
        }
        Ok(())
    }

    /// Applies `batch` atomically: after a crash at any point the store holds either none or
    /// all of it. Returns the ids of the added images. Adds HNSW points for new rows and dumps
    /// the graph (so the cost of a commit grows with the index; commit in batches).
    pub fn commit(&mut self, batch: Batch) -> Result<CommitInfo> {
        self.check_writable()?;
        let started = Instant::now();
        let mut timings = CommitTimings::default();
        let now = now_ns();
        let plan = Plan::run(&self.state, &self.manifest, batch, now)?;
        let ids = plan.ids.clone();
        let (rows, mut embeds, patches) = plan.finish(&self.state, now);
        if self.manifest.dtype == Dtype::F16 {
            // Hold in memory exactly what the file holds, so results do not change on reopen.
            for x in &mut embeds {
                *x = half::f16::from_f32(*x).to_f32();
            }
        }
        if rows.is_empty() && patches.is_empty() {
            return Ok(CommitInfo {
                generation: self.manifest.generation,
                ids,
                index_persisted: self.index_persisted(),
                timings,
            });
        }

        // 1. Data files under fresh names, fsynced, renamed; then the manifest (commit point).
        let generation = self.manifest.generation + 1;
        let mut next = self.manifest.clone();
        next.generation = generation;
        next.next_image_id = self
            .manifest
            .next_image_id
            .max(rows.iter().map(|r| r.image_id + 1).max().unwrap_or(0));
        let mut written = Vec::new();
        let result = (|| {
            let layout = self.layout();
            if !rows.is_empty() {
                let name = format!("shard-{generation:010}.parquet");
                shard::write_shard(&self.dir, &name, &layout, &rows, &embeds)?;
                written.push(name.clone());
                next.shards.push(FileRef {
                    file: name,
                    generation,
                    rows: rows.len() as u64,
                });
                next.rows += rows.len() as u64;
            }
            if !patches.is_empty() {
                let name = format!("patch-{generation:010}.parquet");
                shard::write_patch(&self.dir, &name, &layout, &patches)?;
                written.push(name.clone());
                next.patches.push(FileRef {
                    file: name,
                    generation,
                    rows: patches.len() as u64,
                });
            }
            fsutil::fsync_dir(&self.dir)
        })();
        if let Err(e) = result {
            self.remove_files(&written);
            return Err(e);
        }
        if let Err(e) = self.write_manifest(next) {
            if !self.poisoned {
                self.remove_files(&written);
            }
            return Err(e);
        }

        // 2. The same change in memory, in replay order (rows, then patches).
        let added = !rows.is_empty();
        self.state.embeds.extend_from_slice(&embeds);
        for r in rows {
            self.state.push_row(r);
        }
        for p in &patches {
            self.state.apply_patch(p);
        }

        // 3. The index: insert the new rows, dump, point the manifest at the dump.
        timings.data = started.elapsed();
        if added {
            let t = Instant::now();
            self.ann
                .catch_up(&self.state.embeds, self.state.q, self.state.e);
            timings.index_insert = t.elapsed();
            let t = Instant::now();
            self.persist_index();
            timings.index_dump = t.elapsed();
        }
        Ok(CommitInfo {
            generation: self.manifest.generation,
            ids,
            index_persisted: self.index_persisted(),
            timings,
        })
    }

    /// Marks images deleted in one commit (unknown ids are an error, nothing is committed).
    pub fn mark_deleted(&mut self, image_ids: &[u64]) -> Result<CommitInfo> {
        let mut b = Batch::new();
        for &id in image_ids {
            b.mark_deleted(id);
        }
        self.commit(b)
    }

    /// Sets one caption in one commit; batch many with [`Batch::set_caption`].
    pub fn set_caption(&mut self, image_id: u64, caption: &str) -> Result<CommitInfo> {
        let mut b = Batch::new();
        b.set_caption(image_id, Some(caption.to_owned()));
        self.commit(b)
    }

    /// Rewrites the store as fresh shards holding only the live images (patches applied,
    /// superseded and deleted rows dropped, ids kept) and rebuilds the HNSW graph. Needs the
    /// graph's build time; run it when many rows are dead.
    pub fn compact(&mut self) -> Result<CommitInfo> {
        self.check_writable()?;
        let started = Instant::now();
        let q = self.state.q;
        let e = self.state.e;
        let live_rows: Vec<usize> = (0..self.state.rows())
            .filter(|&r| self.state.row_live[r])
            .collect();
        let generation = self.manifest.generation + 1;
        let mut next = self.manifest.clone();
        next.generation = generation;
        next.shards.clear();
        next.patches.clear();
        next.rows = live_rows.len() as u64;
        next.hnsw = None;
        let mut state = State::new(q, e, live_rows.len());
        state.embeds.reserve_exact(live_rows.len() * q * e);
        let mut written = Vec::new();
        let result = (|| {
            let layout = self.layout();
            for (i, chunk) in live_rows.chunks(COMPACT_SHARD_ROWS).enumerate() {
                let rows: Vec<ImageRow> = chunk
                    .iter()
                    .filter_map(|&r| self.state.meta(self.state.row_image[r]).cloned())
                    .collect();
                let mut embeds = Vec::with_capacity(chunk.len() * q * e);
                for &r in chunk {
                    embeds.extend_from_slice(self.state.row_embeds(r));
                }
                let name = format!("shard-{generation:010}-{i:05}.parquet");
                shard::write_shard(&self.dir, &name, &layout, &rows, &embeds)?;
                written.push(name.clone());
                next.shards.push(FileRef {
                    file: name,
                    generation,
                    rows: rows.len() as u64,
                });
                state.embeds.extend_from_slice(&embeds);
                for r in rows {
                    state.push_row(r);
                }
            }
            fsutil::fsync_dir(&self.dir)
        })();
        if let Err(e) = result {
            self.remove_files(&written);
            return Err(e);
        }
        let data = started.elapsed();
        let t = Instant::now();
        let mut ann = Ann::new(&next.hnsw_params, state.rows());
        ann.catch_up(&state.embeds, q, e);
        let index_insert = t.elapsed();
        let old_files = self.manifest.referenced_files();
        if let Err(e) = self.write_manifest(next) {
            if !self.poisoned {
                self.remove_files(&written);
            }
            return Err(e);
        }
        self.state = state;
        self.ann = ann;
        self.remove_files(&old_files);
        let t = Instant::now();
        self.persist_index();
        Ok(CommitInfo {
            generation: self.manifest.generation,
            ids: Vec::new(),
            index_persisted: self.index_persisted(),
            timings: CommitTimings {
                data,
                index_insert,
                index_dump: t.elapsed(),
            },
        })
    }

    fn index_persisted(&self) -> bool {
        let rows = self.state.rows() as u64;
        rows == 0 || self.manifest.hnsw.as_ref().is_some_and(|h| h.rows == rows)
    }

    /// Writes `next` as the manifest. On failure, works out whether it got renamed into place
    /// anyway: if so the commit stands; if unknown, the store is poisoned.
    fn write_manifest(&mut self, next: Manifest) -> Result<()> {
        match next.write(&self.dir) {
            Ok(()) => {
                self.manifest = next;
                Ok(())
            }
            Err(e) => match Manifest::read(&self.dir) {
                Ok(Some(m)) if m == next => {
                    tracing::warn!(
                        "manifest fsync failed after its rename, keeping the commit: {e}"
                    );
                    self.manifest = next;
                    Ok(())
                }
                Ok(Some(m)) if m == self.manifest => Err(e),
                _ => {
                    self.poisoned = true;
                    Err(e)
                }
            },
        }
    }

    /// Dumps the in-memory graph and records it in a new manifest; failures only cost a
    /// catch-up at the next open, so they are logged rather than returned.
    fn persist_index(&mut self) {
        if self.state.rows() == 0 || self.check_writable().is_err() {
            return;
        }
        let generation = self.manifest.generation + 1;
        let base = format!("hnsw-{generation:010}");
        let name = match self.ann.dump(&self.dir, &base) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("{e}; the next open catches the index up from the shards");
                self.remove_files(
                    &HnswDump {
                        basename: base,
                        rows: 0,
                    }
                    .files(),
                );
                return;
            }
        };
        let dump = HnswDump {
            basename: name,
            rows: self.ann.rows() as u64,
        };
        let mut next = self.manifest.clone();
        next.generation = generation;
        let old = next.hnsw.replace(dump.clone());
        if let Err(e) = fsutil::fsync_dir(&self.dir).and_then(|()| self.write_manifest(next)) {
            tracing::warn!("{e}; the next open catches the index up from the shards");
            if !self.poisoned && self.manifest.hnsw.as_ref() != Some(&dump) {
                self.remove_files(&dump.files());
            }
            return;
        }
        if let Some(old) = old {
            self.remove_files(&old.files());
        }
    }

    fn remove_files(&self, names: &[String]) {
        for n in names {
            let _ = fs::remove_file(self.dir.join(n));
        }
        let _ = fsutil::fsync_dir(&self.dir);
    }
}

fn layout(m: &Manifest) -> Layout<'_> {
    Layout {
        fingerprint: &m.model_fingerprint,
        num_query: m.num_query,
        dim: m.dim,
        dtype: m.dtype,
    }
}

/// Deletes temp files and owned files the manifest does not reference.
fn remove_orphans(dir: &Path, m: &Manifest) -> Result<()> {
    let keep: std::collections::HashSet<String> = m.referenced_files().into_iter().collect();
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let orphan = name.starts_with(TMP_PREFIX)
            || (OWNED_PREFIXES.iter().any(|p| name.starts_with(p)) && !keep.contains(&name));
        if orphan && entry.file_type().is_ok_and(|t| t.is_file()) {
            tracing::info!(
                "removing {name}: not part of committed generation {}",
                m.generation
            );
            fs::remove_file(entry.path()).map_err(|e| fsutil::write_err(&entry.path(), e))?;
            removed = true;
        }
    }
    if removed {
        fsutil::fsync_dir(dir)?;
    }
    Ok(())
}

/// Replays the manifest's files into memory and brings the graph up to date.
fn load(dir: &Path, m: &Manifest) -> Result<(State, Ann)> {
    let layout = layout(m);
    let qe = m.num_query * m.dim;
    if m.shards.iter().map(|f| f.rows).sum::<u64>() != m.rows {
        return Err(Error::store(
            dir,
            "shard row counts do not add up to the manifest's",
        ));
    }
    // Replay order: by generation, a commit's shard before its patch (stable sorts keep the
    // manifest's order within a generation).
    let mut shards: Vec<&FileRef> = m.shards.iter().collect();
    shards.sort_by_key(|f| f.generation);
    let mut events: Vec<(u64, u8, &FileRef)> = m
        .shards
        .iter()
        .map(|f| (f.generation, 0u8, f))
        .chain(m.patches.iter().map(|f| (f.generation, 1u8, f)))
        .collect();
    events.sort_by_key(|(g, kind, _)| (*g, *kind));

    // Decode shards in parallel, each straight into its slice of the embedding matrix (Parquet
    // list decoding is the slow part of start-up; no second copy of the matrix).
    let mut embeds = vec![0f32; m.rows as usize * qe];
    let mut slices = Vec::with_capacity(shards.len());
    let mut rest = embeds.as_mut_slice();
    for f in &shards {
        let (a, b) = rest.split_at_mut(f.rows as usize * qe);
        slices.push(a);
        rest = b;
    }
    let metas: Vec<Result<Vec<ImageRow>>> = shards
        .par_iter()
        .zip(slices)
        .map(|(f, out)| {
            let rows = shard::read_shard(&dir.join(&f.file), &layout, out)?;
            if rows.len() as u64 != f.rows {
                return Err(Error::store(
                    dir,
                    format!(
                        "{} has {} rows, the manifest says {}",
                        f.file,
                        rows.len(),
                        f.rows
                    ),
                ));
            }
            Ok(rows)
        })
        .collect();

    let mut state = State::new(m.num_query, m.dim, m.rows as usize);
    state.embeds = embeds;
    let mut metas = metas.into_iter();
    for (_, kind, f) in events {
        if kind == 0 {
            let rows = metas
                .next()
                .ok_or_else(|| Error::store(dir, "shard bookkeeping mismatch"))??;
            for r in rows {
                if r.image_id >= m.next_image_id {
                    return Err(Error::store(
                        dir,
                        format!(
                            "{} holds image id {} >= next id {}",
                            f.file, r.image_id, m.next_image_id
                        ),
                    ));
                }
                state.push_row(r);
            }
        } else {
            for p in shard::read_patch(&dir.join(&f.file), &layout)? {
                if !state.apply_patch(&p) {
                    return Err(Error::store(
                        dir,
                        format!("{} patches unknown image {}", f.file, p.image_id),
                    ));
                }
            }
        }
    }
    if state.rows() as u64 != m.rows {
        return Err(Error::store(
            dir,
            format!(
                "shards hold {} rows, the manifest says {}",
                state.rows(),
                m.rows
            ),
        ));
    }
    let params = m.hnsw_params;
    let mut ann = match &m.hnsw {
        Some(d) if d.rows <= m.rows => {
            match Ann::load(dir, &d.basename, &params, d.rows as usize) {
                Ok(a) => a,
                Err(e) => {
                    // A commit may have replaced the dump after we read the manifest: then let
                    // the caller reopen at the new generation instead of rebuilding.
                    if Manifest::read(dir)?.map(|x| x.generation) != Some(m.generation) {
                        return Err(e);
                    }
                    tracing::warn!("{e}; rebuilding the HNSW graph from the shards");
                    Ann::new(&params, state.rows())
                }
            }
        }
        _ => Ann::new(&params, state.rows()),
    };
    ann.catch_up(&state.embeds, state.q, state.e);
    Ok((state, ann))
}

/// Works out a batch against the committed state without touching it.
struct Plan<'s> {
    st: &'s State,
    q: usize,
    e: usize,
    meta: HashMap<u64, ImageRow>,
    /// Overlay of the live-lookup maps: `None` = no longer live here.
    hash: HashMap<String, Option<u64>>,
    path: HashMap<String, Option<u64>>,
    /// Images that get a new row, in first-add order, and their embeddings.
    new_rows: Vec<u64>,
    new_embeds: HashMap<u64, Vec<f32>>,
    next_id: u64,
    ids: Vec<u64>,
}

impl<'s> Plan<'s> {
    fn run(st: &'s State, m: &Manifest, batch: Batch, now: i64) -> Result<Self> {
        let mut p = Plan {
            st,
            q: m.num_query,
            e: m.dim,
            meta: HashMap::new(),
            hash: HashMap::new(),
            path: HashMap::new(),
            new_rows: Vec::new(),
            new_embeds: HashMap::new(),
            next_id: m.next_image_id,
            ids: Vec::with_capacity(batch.adds),
        };
        for (i, op) in batch.ops.into_iter().enumerate() {
            match op {
                Op::Add(rec) => p.add(*rec, now, i)?,
                Op::AddPath(id, path) => {
                    let mut meta = p.live(id, i)?;
                    if !meta.paths.contains(&path) {
                        p.take_path(&path, id);
                        meta = p.live(id, i)?;
                        meta.paths.push(path);
                        p.put(meta);
                    }
                }
                Op::RemovePath(path) => {
                    if let Some(owner) = p.owner_of_path(&path) {
                        p.release_path(owner, &path);
                    }
                }
                Op::Delete(id) => {
                    let mut meta = p.known(id, i)?;
                    meta.deleted = true;
                    p.put(meta);
                }
                Op::SetCaption(id, caption) => {
                    let mut meta = p.known(id, i)?;
                    meta.caption = caption;
                    p.put(meta);
                }
            }
        }
        Ok(p)
    }

    fn get(&self, id: u64) -> Option<ImageRow> {
        self.meta
            .get(&id)
            .cloned()
            .or_else(|| self.st.meta(id).cloned())
    }

    fn known(&self, id: u64, op: usize) -> Result<ImageRow> {
        self.get(id).ok_or_else(|| {
            Error::InvalidArgument(format!("batch operation {op}: no image with id {id}"))
        })
    }

    fn live(&self, id: u64, op: usize) -> Result<ImageRow> {
        let m = self.known(id, op)?;
        if m.deleted {
            return Err(Error::InvalidArgument(format!(
                "batch operation {op}: image {id} is deleted"
            )));
        }
        Ok(m)
    }

    fn owner_of_path(&self, p: &str) -> Option<u64> {
        match self.path.get(p) {
            Some(v) => *v,
            None => self.st.by_path.get(p).copied(),
        }
    }

    fn owner_of_hash(&self, h: &str) -> Option<u64> {
        match self.hash.get(h) {
            Some(v) => *v,
            None => self.st.by_hash.get(h).copied(),
        }
    }

    /// Records `new` as the image's state, keeping the lookup overlay in step.
    fn put(&mut self, new: ImageRow) {
        let id = new.image_id;
        if let Some(old) = self.get(id) {
            if !old.deleted {
                if self.owner_of_hash(&old.content_hash) == Some(id) {
                    self.hash.insert(old.content_hash.clone(), None);
                }
                for p in &old.paths {
                    if self.owner_of_path(p) == Some(id) {
                        self.path.insert(p.clone(), None);
                    }
                }
            }
        }
        if !new.deleted {
            self.hash.insert(new.content_hash.clone(), Some(id));
            for p in &new.paths {
                self.path.insert(p.clone(), Some(id));
            }
        }
        self.meta.insert(id, new);
    }

    fn release_path(&mut self, owner: u64, p: &str) {
        let Some(mut m) = self.get(owner) else {
            return;
        };
        m.paths.retain(|x| x != p);
        if m.paths.is_empty() {
            m.deleted = true;
        } else if m.path == p {
            m.path.clone_from(&m.paths[0]);
        }
        self.put(m);
    }

    /// Takes `p` from whichever other live image holds it.
    fn take_path(&mut self, p: &str, new_owner: u64) {
        if let Some(owner) = self.owner_of_path(p) {
            if owner != new_owner {
                self.release_path(owner, p);
            }
        }
    }

    fn add(&mut self, rec: ImageRecord, now: i64, op: usize) -> Result<()> {
        let bad = |r: String| {
            Err(Error::InvalidArgument(format!(
                "batch operation {op} ({}): {r}",
                rec.path
            )))
        };
        if rec.path.is_empty() {
            return bad("empty path".into());
        }
        if !is_hex_hash(&rec.content_hash) {
            return bad(format!(
                "content_hash must be 64 lowercase hex digits (BLAKE3), got {:?}",
                rec.content_hash
            ));
        }
        if rec.embeds.len() != self.q * self.e {
            return bad(format!(
                "{} embedding values, the store holds {}x{} per image",
                rec.embeds.len(),
                self.q,
                self.e
            ));
        }
        for (i, v) in rec.embeds.chunks_exact(self.e).enumerate() {
            let n2: f32 = v.iter().map(|x| x * x).sum();
            if !n2.is_finite() || (n2 - 1.0).abs() > NORM_TOLERANCE {
                return bad(format!(
                    "query vector {i} has norm {}; image embeddings must be unit vectors",
                    n2.sqrt()
                ));
            }
        }
        let mut paths = vec![rec.path.clone()];
        for p in &rec.paths {
            if !p.is_empty() && !paths.contains(p) {
                paths.push(p.clone());
            }
        }
        let (id, caption) = match self.owner_of_hash(&rec.content_hash) {
            Some(id) => {
                let old = self.get(id);
                if let Some(old) = &old {
                    for p in &old.paths {
                        if !paths.contains(p) {
                            paths.push(p.clone());
                        }
                    }
                }
                (id, rec.caption.clone().or(old.and_then(|o| o.caption)))
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                (id, rec.caption.clone())
            }
        };
        for p in &paths {
            self.take_path(p, id);
        }
        self.put(ImageRow {
            image_id: id,
            path: rec.path,
            paths,
            content_hash: rec.content_hash,
            width: rec.width,
            height: rec.height,
            file_size: rec.file_size,
            mtime_ns: rec.mtime_ns,
            caption,
            deleted: false,
            ingested_at_ns: now,
        });
        if !self.new_embeds.contains_key(&id) {
            self.new_rows.push(id);
        }
        self.new_embeds.insert(id, rec.embeds);
        self.ids.push(id);
        Ok(())
    }

    /// New shard rows (with their embeddings) and patches for images that only changed.
    fn finish(mut self, st: &State, now: i64) -> (Vec<ImageRow>, Vec<f32>, Vec<Patch>) {
        let mut rows = Vec::with_capacity(self.new_rows.len());
        let mut embeds = Vec::with_capacity(self.new_rows.len() * self.q * self.e);
        for id in &self.new_rows {
            if let (Some(m), Some(e)) = (self.meta.remove(id), self.new_embeds.get(id)) {
                rows.push(m);
                embeds.extend_from_slice(e);
            }
        }
        let mut patches: Vec<Patch> = self
            .meta
            .into_values()
            .filter(|m| {
                st.meta(m.image_id).is_none_or(|old| {
                    old.path != m.path
                        || old.paths != m.paths
                        || old.caption != m.caption
                        || old.deleted != m.deleted
                })
            })
            .map(|m| Patch {
                image_id: m.image_id,
                path: m.path,
                paths: m.paths,
                caption: m.caption,
                deleted: m.deleted,
                updated_at_ns: now,
            })
            .collect();
        patches.sort_by_key(|p| p.image_id);
        (rows, embeds, patches)
    }
}
