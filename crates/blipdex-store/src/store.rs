//! [`Store`]: open, read, search and commit.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use blipdex_core::{Error, Result};
use fs2::FileExt;
use rayon::prelude::*;

use crate::fsutil::{self, TMP_PREFIX};
use crate::ivf::{self, Coarse, Entries, Ivf, IvfRef, RowVectors, Segment, SegmentRef};
use crate::manifest::{FileRef, Manifest, FORMAT_V1, FORMAT_VERSION, MANIFEST};
use crate::rows::{self, rows_name, RowsFile};
use crate::search;
use crate::shard::{self, Layout, Patch};
use crate::state::State;
use crate::types::{
    AnnInfo, AnnSearch, CommitInfo, CommitTimings, Dtype, Hit, HnswParams, ImageRecord, ImageRow,
    PhotoMeta, StoreOptions,
};

const LOCK: &str = "LOCK";
/// Prefixes of the files the manifest owns; unreferenced ones are orphans (`hnsw-`: v1 dumps).
const OWNED_PREFIXES: [&str; 4] = ["shard-", "patch-", "ivf-", "hnsw-"];
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
    SetMeta(u64, PhotoMeta),
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

    /// Sets an image's EXIF metadata (e.g. read for an image indexed before blipdex read it).
    pub fn set_meta(&mut self, image_id: u64, meta: PhotoMeta) {
        self.ops.push(Op::SetMeta(image_id, meta));
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
/// Opening maps the row files and the index segments and reads only each row's image id and
/// deleted flag: what stays in RAM is a few bytes per image (see `state`), the IVF centroids
/// and their hnsw_rs graph. Searching takes `&self` and is safe from many threads.
pub struct Store {
    dir: PathBuf,
    manifest: Manifest,
    state: State,
    ivf: Option<Ivf>,
    /// Held (flock) while writable; dropping the store releases it, so does a crash.
    lock: Option<File>,
    /// Set when a manifest write failed in a way that leaves its outcome unknown; the store
    /// must be reopened before it commits again.
    poisoned: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("generation", &self.manifest.generation)
            .field("rows", &self.state.rows())
            .finish()
    }
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

/// Which index a directory holds and how far it is: a later commit moves `generation`; deleting
/// the index and building another in its place changes `index_id` (and usually lowers the
/// generation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexVersion {
    pub index_id: String,
    pub generation: u64,
}

fn not_an_index(dir: &Path) -> Error {
    Error::store(dir, format!("no {MANIFEST}: not a blipdex index"))
}

impl Store {
    /// Opens `dir` for writing, creating the directory and an empty store if needed. Takes the
    /// directory's writer lock, checks the model fingerprint and shape, deletes files no
    /// committed manifest references (leftovers of an interrupted commit), rebuilds derived
    /// files that are missing or damaged from the Parquet shards, and upgrades a v1 store in
    /// place (one atomic manifest write; an interrupted upgrade resumes at the next open).
    pub fn create_or_open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Self> {
        Self::open_inner(dir.as_ref(), options, true)
    }

    fn open_inner(dir: &Path, options: StoreOptions, create: bool) -> Result<Self> {
        let dir = dir.to_path_buf();
        validate_options(&dir, &options)?;
        if create {
            fs::create_dir_all(&dir).map_err(|e| fsutil::write_err(&dir, e))?;
        } else if !dir.join(MANIFEST).is_file() {
            return Err(not_an_index(&dir));
        }
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| match e.kind() {
                // Deleted since the check above: still not an index to write to.
                std::io::ErrorKind::NotFound if !create => not_an_index(&dir),
                _ => fsutil::write_err(&lock_path, e),
            })?;
        if lock.try_lock_exclusive().is_err() {
            return Err(Error::Locked { dir });
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
            None if !create => return Err(not_an_index(&dir)),
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
        let upgrading = manifest.format_version == FORMAT_V1;
        if upgrading {
            tracing::info!(
                "upgrading index {} from store format v1 to v{FORMAT_VERSION} (row files and \
                 the IVF index are built from the Parquet shards once)",
                dir.display()
            );
        }
        let mut store = Self {
            state: load_state(&dir, &manifest, Repair::RowFiles { quiet: upgrading })?,
            dir,
            manifest,
            ivf: None,
            lock: Some(lock),
            poisoned: false,
        };
        let ivf_ok = !upgrading
            && match open_ivf(&store.dir, &store.manifest) {
                Ok(ivf) => {
                    store.ivf = ivf;
                    true
                }
                Err(e) => {
                    tracing::warn!("{e}; rebuilding the IVF index from the row files");
                    false
                }
            };
        if !ivf_ok || (store.ivf.is_none() && store.state.rows() > 0) {
            store.rebuild_index()?;
        }
        Ok(store)
    }

    /// Opens an existing store for writing with the model and shape its manifest records (for
    /// maintenance: upgrade, compaction; and a server's caption write-back); never creates one,
    /// not even when the directory is deleted while it opens.
    pub fn open_writable(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let m = Manifest::read(dir)?.ok_or_else(|| not_an_index(dir))?;
        let options = StoreOptions::new(&m.model_fingerprint, m.num_query, m.dim)
            .with_dtype(m.dtype)
            .with_hnsw(m.hnsw_params);
        Self::open_inner(dir, options, false)
    }

    /// The store format version of the index in `dir` (2 for this build; 1 needs an upgrade).
    pub fn read_format_version(dir: impl AsRef<Path>) -> Result<u32> {
        let dir = dir.as_ref();
        Manifest::read(dir)?
            .map(|m| m.format_version)
            .ok_or_else(|| not_an_index(dir))
    }

    /// Opens the committed state of `dir` for reading only (no lock, no cleanup; a writer may
    /// be committing meanwhile). To pick up later commits, poll [`Store::read_generation`] and
    /// open again when it differs from [`Store::generation`].
    pub fn open_readonly(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let mut attempt = 0;
        loop {
            let manifest = Manifest::read(&dir)?.ok_or_else(|| not_an_index(&dir))?;
            if manifest.format_version == FORMAT_V1 {
                return Err(Error::store(
                    &dir,
                    format!(
                        "written by an earlier blipdex (store format v1); upgrade it once with \
                         `blipdex index upgrade --index {}` (any `blipdex ingest` into it \
                         upgrades it too)",
                        dir.display()
                    ),
                ));
            }
            let opened = load_state(&dir, &manifest, Repair::No)
                .and_then(|state| Ok((state, open_ivf(&dir, &manifest)?)));
            match opened {
                Ok((state, ivf)) => {
                    return Ok(Self {
                        dir,
                        manifest,
                        state,
                        ivf,
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
        Ok(Self::read_version(dir)?.generation)
    }

    /// Which index `dir` holds now and at which generation (cheap: reads only the manifest).
    /// A server compares it with [`Store::version`] to pick up later commits and replacements.
    pub fn read_version(dir: impl AsRef<Path>) -> Result<IndexVersion> {
        let dir = dir.as_ref();
        Manifest::read(dir)?
            .map(|m| IndexVersion {
                index_id: m.index_id,
                generation: m.generation,
            })
            .ok_or_else(|| not_an_index(dir))
    }

    /// Generation of the manifest this store reflects; bumped by every manifest write.
    pub fn generation(&self) -> u64 {
        self.manifest.generation
    }

    /// The identity drawn when the store was created (empty for stores older than it).
    pub fn index_id(&self) -> &str {
        &self.manifest.index_id
    }

    /// This snapshot's identity and generation.
    pub fn version(&self) -> IndexVersion {
        IndexVersion {
            index_id: self.manifest.index_id.clone(),
            generation: self.manifest.generation,
        }
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

    /// Parquet shards (image data files) in the current generation.
    pub fn shards(&self) -> usize {
        self.manifest.shards.len()
    }

    /// Next id the store will assign; ids are never reused.
    pub fn next_image_id(&self) -> u64 {
        self.manifest.next_image_id
    }

    fn logged<T>(&self, r: Result<Option<T>>) -> Option<T> {
        r.unwrap_or_else(|e| {
            tracing::error!("index {}: {e}", self.dir.display());
            None
        })
    }

    /// An image's current metadata, deleted images included. (A damaged row file is logged
    /// and reads as absent.)
    pub fn get(&self, image_id: u64) -> Option<ImageRow> {
        self.logged(self.state.meta(image_id))
    }

    /// An image's Q*E embeddings (`[Q][E]`, as f32), deleted images included: exactly the
    /// values of its Parquet row (f16 stores widen them).
    pub fn embeds(&self, image_id: u64) -> Option<Vec<f32>> {
        let row = self.state.current_row(image_id)?;
        Some(self.state.vectors(row).to_vec())
    }

    /// An image's ITC score for the unit text embedding `t` (len E): the max over its query
    /// vectors of the dot product, by the kernel the searches score with (deleted images
    /// included). `None` for an unknown id or a `t` of the wrong length.
    pub fn itc_score(&self, image_id: u64, t: &[f32]) -> Option<f32> {
        if t.len() != self.dim() {
            return None;
        }
        let row = self.state.current_row(image_id)?;
        Some(self.state.vectors(row).max_sim(t, &mut Vec::new()).0)
    }

    /// The live image with these bytes.
    pub fn by_content_hash(&self, content_hash: &str) -> Option<ImageRow> {
        let id = self.logged(self.state.by_hash(content_hash))?;
        self.get(id)
    }

    /// The live image that `path` belongs to. For incremental ingest a file is unchanged when
    /// this returns a row whose `path` is it and whose `file_size` and `mtime_ns` match.
    pub fn by_path(&self, path: &str) -> Option<ImageRow> {
        let id = self.logged(self.state.by_path(path))?;
        self.get(id)
    }

    /// Every live image's id and EXIF metadata, in commit order: what metadata filters scan.
    /// Read from the row files on first use and kept with this snapshot (about 100 bytes per
    /// image), so later filtered searches scan memory.
    pub fn photos(&self) -> Result<&[(u64, Option<PhotoMeta>)]> {
        self.state.photos()
    }

    /// Live images in commit order.
    pub fn iter(&self) -> impl Iterator<Item = ImageRow> + '_ {
        self.state
            .live_rows()
            .filter_map(|r| self.get(self.state.row_image(r)))
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

    /// Approximate top-k with the default number of probed lists: see
    /// [`Store::search_ann_with`]; `ef` is the number of candidate images rescored exactly.
    pub fn search_ann(&self, t: &[f32], k: usize, ef: usize) -> Result<Vec<Hit>> {
        self.search_ann_with(
            t,
            k,
            AnnSearch {
                ef,
                ..AnnSearch::default()
            },
        )
    }

    /// Approximate top-k: the IVF index scores every live entry of the `nprobe` lists nearest
    /// to `t`, the best `max(ef, k)` images are rescored exactly (max over all Q vectors, read
    /// from the row files) and the best k returned. Scores are exact; only membership is
    /// approximate. Larger `ef` and `nprobe` = better recall.
    pub fn search_ann_with(&self, t: &[f32], k: usize, s: AnnSearch) -> Result<Vec<Hit>> {
        self.check_query(t)?;
        if k == 0 || self.state.live == 0 {
            return Ok(Vec::new());
        }
        let Some(ivf) = &self.ivf else {
            return Ok(search::exact(&self.state, t, k));
        };
        let rows = self.state.rows();
        let keep = |r: usize| r < rows && self.state.is_live(r);
        let cand = ivf.candidates(t, s.nprobe, s.ef.max(k), &keep);
        Ok(search::rescore(&self.state, &cand, t, k))
    }

    /// What the ANN index holds.
    /// Shards whose row file keeps a second copy of their vectors, because the shard was written
    /// with compressed embedding pages (before blipdex stored them in place);
    /// [`Store::compact`] rewrites them.
    pub fn shards_with_vector_copies(&self) -> usize {
        self.state.files_with_vector_copies()
    }

    pub fn ann_info(&self) -> AnnInfo {
        let (lists, entries, segments) = self.ivf.as_ref().map_or((0, 0, 0), |i| {
            (i.coarse.nlist(), i.entries(), i.segments.len())
        });
        AnnInfo {
            rows: self.state.rows(),
            points: entries,
            vectors_per_image: self.manifest.hnsw_params.vectors_per_image,
            lists,
            segments,
            trained_rows: self
                .manifest
                .ivf
                .as_ref()
                .map_or(0, |i| i.trained_rows as usize),
        }
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
    /// all of it. Returns the ids of the added images. The commit writes the new rows' Parquet
    /// shard, their row file and one index segment (cost proportional to the batch, plus the
    /// occasional segment merge or retraining, see `ivf`), then the manifest.
    pub fn commit(&mut self, batch: Batch) -> Result<CommitInfo> {
        self.check_writable()?;
        let started = Instant::now();
        let mut timings = CommitTimings::default();
        let now = now_ns();
        self.state.build_lookups()?;
        let plan = Plan::run(&self.state, &self.manifest, batch, now)?;
        let ids = plan.ids.clone();
        let (rows, mut embeds, patches) = plan.finish(&self.state, now)?;
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
                index_persisted: true,
                timings,
            });
        }

        // 1. Data files under fresh names, fsynced, renamed.
        let generation = self.manifest.generation + 1;
        let mut next = self.manifest.clone();
        next.generation = generation;
        next.next_image_id = self
            .manifest
            .next_image_id
            .max(rows.iter().map(|r| r.image_id + 1).max().unwrap_or(0));
        let mut written = Vec::new();
        let base = self.state.rows();
        let result = (|| {
            let layout = self.layout();
            if !rows.is_empty() {
                let name = format!("shard-{generation:010}.parquet");
                shard::write_shard(&self.dir, &name, &layout, &rows, &embeds)?;
                written.push(name.clone());
                rows::write_for_shard(&self.dir, &name, &layout, &rows, &embeds)?;
                written.push(rows_name(&name));
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
            timings.data = started.elapsed();
            // 2. The index entries of the new rows (a new segment, merges, or retraining).
            if !rows.is_empty() {
                let added = &embeds;
                let qe = self.state.q * self.state.e;
                let vectors = |r: usize| {
                    if r >= base {
                        Cow::Borrowed(&added[(r - base) * qe..(r - base + 1) * qe])
                    } else {
                        self.state.vectors(r).to_cow()
                    }
                };
                self.index_rows(
                    &mut next,
                    base,
                    base + rows.len(),
                    &vectors,
                    &mut written,
                    &mut timings,
                )?;
            }
            fsutil::fsync_dir(&self.dir)
        })();
        // 3. The manifest: the commit point.
        let replaced = self.install(next, &written, result)?;

        // 4. The same change in memory, in replay order (rows, then patches), then the index.
        let applied = (|| {
            if let Some(f) = self
                .manifest
                .shards
                .last()
                .filter(|f| f.generation == generation)
            {
                let file = open_rows(&self.dir, &self.manifest, f)?;
                self.state.push_file(file, self.manifest.next_image_id)?;
            }
            for p in &patches {
                self.state.apply_patch(p)?;
            }
            self.reopen_ivf()
        })();
        if let Err(e) = applied {
            // The commit stands on disk; this process's view is stale.
            self.poisoned = true;
            return Err(e);
        }
        self.remove_files(&replaced);
        Ok(CommitInfo {
            generation: self.manifest.generation,
            ids,
            index_persisted: true,
            timings,
        })
    }

    /// Writes the index entries of rows `start..end` into `next`: a new segment, then merges;
    /// or, when the centroids are missing or the index outgrew them, new centroids and the
    /// entries of every row.
    fn index_rows<'v>(
        &self,
        next: &mut Manifest,
        start: usize,
        end: usize,
        vectors: &RowVectors<'v>,
        written: &mut Vec<String>,
        timings: &mut CommitTimings,
    ) -> Result<()> {
        let (q, e) = (self.state.q, self.state.e);
        let m = next.hnsw_params.vectors_per_image;
        let g = next.generation;
        let retrain = match &next.ivf {
            None => true,
            Some(i) => end as u64 >= ivf::RETRAIN_GROWTH * i.trained_rows.max(1),
        };
        let t = Instant::now();
        if retrain {
            let r = build_index(&self.dir, next, end, vectors, written)?;
            next.ivf = Some(r);
            timings.index_merge += t.elapsed();
            return Ok(());
        }
        let (Some(cur), Some(open)) = (next.ivf.clone(), self.ivf.as_ref()) else {
            return Err(Error::store(
                &self.dir,
                "index state lost; reopen the store",
            ));
        };
        let mut entries = ivf::entries_for(start..end, q, e, m, &open.coarse, vectors);
        timings.index_insert += t.elapsed();
        let t = Instant::now();
        // The new entries form one segment; if that completes a size class, the class merges
        // into it, which may complete the next class, and so on (all in one written segment).
        let n_old = cur.segments.len();
        let mut segs = cur.segments.clone();
        segs.push(SegmentRef {
            file: format!("ivf-{g:010}-0.seg"),
            row_start: start as u64,
            row_end: end as u64,
            entries: entries.len() as u64,
        });
        let mut first = n_old;
        loop {
            let tail = ivf::merge_tail(&segs);
            if tail == 0 {
                break;
            }
            let f = segs.len() - tail;
            let merged = SegmentRef {
                file: format!("ivf-{g:010}-0.seg"),
                row_start: segs[f].row_start,
                row_end: end as u64,
                entries: segs[f..].iter().map(|x| x.entries).sum(),
            };
            segs.truncate(f);
            segs.push(merged);
            first = first.min(f);
        }
        let merging = first < n_old;
        if merging {
            let mapped: Vec<&Segment> = open.segments[first..].iter().collect();
            let mut all = ivf::merged_entries(&mapped);
            all.append(entries);
            entries = all;
        }
        let last = segs.len() - 1;
        segs[last] = ivf::write_segment(
            &self.dir,
            &segs[last].file.clone(),
            e,
            cur.nlist,
            cur.centroids_generation,
            (segs[last].row_start, end as u64),
            &entries,
        )?;
        written.push(segs[last].file.clone());
        if merging {
            timings.index_merge += t.elapsed();
        } else {
            timings.index_insert += t.elapsed();
        }
        next.ivf = Some(IvfRef {
            segments: segs,
            ..cur
        });
        Ok(())
    }

    /// Rebuilds the whole IVF index (new centroids, every row's entries) in one commit.
    fn rebuild_index(&mut self) -> Result<()> {
        self.check_writable()?;
        let mut next = self.manifest.clone();
        next.generation += 1;
        next.format_version = FORMAT_VERSION;
        next.hnsw = None;
        let mut written = Vec::new();
        let rows = self.state.rows();
        let state = &self.state;
        let vectors = |r: usize| state.vectors(r).to_cow();
        let built = if rows == 0 {
            Ok(None)
        } else {
            build_index(&self.dir, &next, rows, &vectors, &mut written).map(Some)
        };
        let built = built.and_then(|b| fsutil::fsync_dir(&self.dir).map(|()| b));
        let prepared = built.map(|b| next.ivf = b);
        let replaced = self.install(next, &written, prepared)?;
        self.reopen_ivf()?;
        self.remove_files(&replaced);
        Ok(())
    }

    /// Maps the manifest's IVF files, keeping the coarse quantizer and the segments already
    /// mapped when the centroids did not change.
    fn reopen_ivf(&mut self) -> Result<()> {
        let Some(r) = self.manifest.ivf.clone() else {
            self.ivf = None;
            return Ok(());
        };
        match self.ivf.take() {
            Some(old) if old.centroids_generation == r.centroids_generation => {
                let mut by_name: HashMap<String, Segment> = old
                    .refs
                    .into_iter()
                    .map(|s| s.file)
                    .zip(old.segments)
                    .collect();
                let mut segments = Vec::with_capacity(r.segments.len());
                for s in &r.segments {
                    segments.push(match by_name.remove(&s.file) {
                        Some(seg) => seg,
                        None => Segment::open(&self.dir, s, self.state.e, &r)?,
                    });
                }
                self.ivf = Some(Ivf {
                    coarse: old.coarse,
                    segments,
                    refs: r.segments.clone(),
                    centroids_generation: r.centroids_generation,
                });
            }
            _ => self.ivf = open_ivf(&self.dir, &self.manifest)?,
        }
        Ok(())
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
    /// superseded and deleted rows dropped, ids kept) and rebuilds the index over them.
    pub fn compact(&mut self) -> Result<CommitInfo> {
        self.check_writable()?;
        let started = Instant::now();
        let (q, e) = (self.state.q, self.state.e);
        let live: Vec<usize> = self.state.live_rows().collect();
        let generation = self.manifest.generation + 1;
        let mut next = self.manifest.clone();
        next.generation = generation;
        next.shards.clear();
        next.patches.clear();
        next.rows = live.len() as u64;
        next.ivf = None;
        let mut written = Vec::new();
        let mut timings = CommitTimings::default();
        let result = (|| {
            let layout = self.layout();
            for (i, chunk) in live.chunks(COMPACT_SHARD_ROWS).enumerate() {
                let mut rows = Vec::with_capacity(chunk.len());
                let mut embeds = Vec::with_capacity(chunk.len() * q * e);
                for &r in chunk {
                    let id = self.state.row_image(r);
                    let meta = self.state.meta(id)?.ok_or_else(|| {
                        Error::store(&self.dir, format!("image {id} vanished during compaction"))
                    })?;
                    rows.push(meta);
                    embeds.extend(self.state.vectors(r).to_vec());
                }
                let name = format!("shard-{generation:010}-{i:05}.parquet");
                shard::write_shard(&self.dir, &name, &layout, &rows, &embeds)?;
                written.push(name.clone());
                rows::write_for_shard(&self.dir, &name, &layout, &rows, &embeds)?;
                written.push(rows_name(&name));
                next.shards.push(FileRef {
                    file: name,
                    generation,
                    rows: rows.len() as u64,
                });
            }
            timings.data = started.elapsed();
            let t = Instant::now();
            if !live.is_empty() {
                let state = &self.state;
                let vectors = |r: usize| state.vectors(live[r]).to_cow();
                next.ivf = Some(build_index(
                    &self.dir,
                    &next,
                    live.len(),
                    &vectors,
                    &mut written,
                )?);
            }
            timings.index_insert = t.elapsed();
            fsutil::fsync_dir(&self.dir)
        })();
        let replaced = self.install(next, &written, result)?;
        let reloaded = load_state(&self.dir, &self.manifest, Repair::No).and_then(|s| {
            self.state = s;
            self.state.build_lookups()?;
            self.ivf = None;
            self.reopen_ivf()
        });
        if let Err(e) = reloaded {
            self.poisoned = true;
            return Err(e);
        }
        self.remove_files(&replaced);
        Ok(CommitInfo {
            generation: self.manifest.generation,
            ids: Vec::new(),
            index_persisted: true,
            timings,
        })
    }

    /// The end of every commit: if preparing it failed, removes the files it wrote; else
    /// writes `next` (the commit point) and returns the files only the previous manifest named.
    fn install(
        &mut self,
        next: Manifest,
        written: &[String],
        prepared: Result<()>,
    ) -> Result<Vec<String>> {
        if let Err(e) = prepared {
            self.remove_files(written);
            return Err(e);
        }
        let replaced = replaced_files(&self.manifest, &next);
        if let Err(e) = self.write_manifest(next) {
            if !self.poisoned {
                self.remove_files(written);
            }
            return Err(e);
        }
        Ok(replaced)
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

/// Files `old` references that `new` does not (deleted once `new` is committed).
fn replaced_files(old: &Manifest, new: &Manifest) -> Vec<String> {
    let keep: std::collections::HashSet<String> = new.referenced_files().into_iter().collect();
    old.referenced_files()
        .into_iter()
        .filter(|f| !keep.contains(f))
        .collect()
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

fn open_rows(dir: &Path, m: &Manifest, f: &FileRef) -> Result<RowsFile> {
    RowsFile::open(dir, &f.file, m.dtype, m.num_query, m.dim, f.rows)
}

/// Writes a shard's row file anew from its Parquet rows (upgrade, or repair of a damaged one).
fn rebuild_rows(dir: &Path, m: &Manifest, f: &FileRef) -> Result<()> {
    let qe = m.num_query * m.dim;
    let n = usize::try_from(f.rows)
        .ok()
        .filter(|n| n.checked_mul(qe).is_some_and(|x| x < 1 << 40))
        .ok_or_else(|| {
            Error::store(
                dir,
                format!("corrupt {MANIFEST}: {} rows in {}", f.rows, f.file),
            )
        })?;
    let mut embeds = vec![0f32; n * qe];
    let rows = shard::read_shard(&dir.join(&f.file), &layout(m), &mut embeds)?;
    if rows.len() != n {
        return Err(Error::store(
            dir,
            format!("{} has {} rows, the manifest says {n}", f.file, rows.len()),
        ));
    }
    rows::write_for_shard(dir, &f.file, &layout(m), &rows, &embeds)?;
    fsutil::fsync_dir(dir)
}

/// What [`load_state`] does with a row file it cannot use.
#[derive(Clone, Copy)]
enum Repair {
    /// Fail, naming the file (readers).
    No,
    /// Rebuild it from its shard (writers), with a warning unless `quiet` (an upgrade).
    RowFiles { quiet: bool },
}

/// Replays the manifest's row files and patches (maps files; reads ids, flags and patches).
fn load_state(dir: &Path, m: &Manifest, repair: Repair) -> Result<State> {
    if m.shards.iter().map(|f| f.rows).sum::<u64>() != m.rows {
        return Err(Error::store(
            dir,
            "shard row counts do not add up to the manifest's",
        ));
    }
    // Replay order: by generation, a commit's shard before its patch (stable sorts keep the
    // manifest's order within a generation).
    let mut events: Vec<(u64, u8, &FileRef)> = m
        .shards
        .iter()
        .map(|f| (f.generation, 0u8, f))
        .chain(m.patches.iter().map(|f| (f.generation, 1u8, f)))
        .collect();
    events.sort_by_key(|(g, kind, _)| (*g, *kind));
    let mut state = State::new(dir, m.num_query, m.dim);
    for (_, kind, f) in events {
        if kind == 0 {
            let file = match (open_rows(dir, m, f), repair) {
                (Ok(file), _) => file,
                (Err(e), Repair::No) => return Err(e),
                (Err(e), Repair::RowFiles { quiet }) => {
                    if !quiet {
                        tracing::warn!("{e}; rebuilding {} from {}", rows_name(&f.file), f.file);
                    }
                    rebuild_rows(dir, m, f)?;
                    open_rows(dir, m, f)?
                }
            };
            state.push_file(file, m.next_image_id)?;
        } else {
            for p in shard::read_patch(&dir.join(&f.file), &layout(m))? {
                if !state.apply_patch(&p)? {
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
    Ok(state)
}

/// Maps the manifest's IVF index, checking that it covers exactly the committed rows.
fn open_ivf(dir: &Path, m: &Manifest) -> Result<Option<Ivf>> {
    let Some(r) = &m.ivf else {
        return if m.rows == 0 {
            Ok(None)
        } else {
            Err(Error::store(
                dir,
                format!("{MANIFEST} names no index for its rows"),
            ))
        };
    };
    let bad = |why: String| Error::store(dir, format!("corrupt {MANIFEST}: {why}"));
    if r.nlist == 0 || r.nlist > 1 << 16 {
        return Err(bad(format!("{} index lists", r.nlist)));
    }
    let mut at = 0;
    for s in &r.segments {
        if s.row_start != at || s.row_end < s.row_start || s.entries > 1 << 40 {
            return Err(bad(format!(
                "index segment {} does not follow row {at}",
                s.file
            )));
        }
        at = s.row_end;
    }
    if at != m.rows {
        return Err(bad(format!(
            "the index covers {at} rows, the shards hold {}",
            m.rows
        )));
    }
    let c = ivf::read_centroids(dir, &r.centroids, m.dim, r.nlist)?;
    let coarse = Coarse::new(c, m.dim, &m.hnsw_params);
    let segments = r
        .segments
        .iter()
        .map(|s| Segment::open(dir, s, m.dim, r))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(Ivf {
        coarse,
        segments,
        refs: r.segments.clone(),
        centroids_generation: r.centroids_generation,
    }))
}

/// Trains centroids on a sample of rows `0..rows` and writes every row's entries, as of
/// `next.generation`.
fn build_index<'v>(
    dir: &Path,
    next: &Manifest,
    rows: usize,
    vectors: &RowVectors<'v>,
    written: &mut Vec<String>,
) -> Result<IvfRef> {
    let (q, e) = (next.num_query, next.dim);
    let m = next.hnsw_params.vectors_per_image.clamp(1, q);
    let g = next.generation;
    let reps = rows * m;
    let nlist = ivf::nlist_for(reps as u64);
    let want = (nlist * ivf::SAMPLE_PER_LIST)
        .min(ivf::MAX_SAMPLE)
        .min(reps);
    let sample_rows = want.div_ceil(m).clamp(1, rows);
    let samples: Vec<f32> = (0..sample_rows)
        .into_par_iter()
        .flat_map_iter(|i| ivf::representatives(&vectors(i * rows / sample_rows), q, e, m))
        .collect();
    let centroids = ivf::train(&samples, e, nlist, &next.hnsw_params);
    let nlist = centroids.len() / e;
    let cname = format!("ivf-{g:010}.centroids");
    ivf::write_centroids(dir, &cname, e, &centroids)?;
    written.push(cname.clone());
    let coarse = Coarse::new(centroids, e, &next.hnsw_params);
    let mut segments = Vec::new();
    for (i, start) in (0..rows).step_by(ivf::REBUILD_CHUNK_ROWS).enumerate() {
        let end = (start + ivf::REBUILD_CHUNK_ROWS).min(rows);
        let entries: Entries = ivf::entries_for(start..end, q, e, m, &coarse, vectors);
        let name = format!("ivf-{g:010}-r{i:04}.seg");
        segments.push(ivf::write_segment(
            dir,
            &name,
            e,
            nlist,
            g,
            (start as u64, end as u64),
            &entries,
        )?);
        written.push(name);
    }
    Ok(IvfRef {
        centroids: cname,
        centroids_generation: g,
        nlist,
        trained_rows: rows as u64,
        segments,
    })
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
                        p.take_path(&path, id)?;
                        meta = p.live(id, i)?;
                        meta.paths.push(path);
                        p.put(meta)?;
                    }
                }
                Op::RemovePath(path) => {
                    if let Some(owner) = p.owner_of_path(&path)? {
                        p.release_path(owner, &path)?;
                    }
                }
                Op::Delete(id) => {
                    let mut meta = p.known(id, i)?;
                    meta.deleted = true;
                    p.put(meta)?;
                }
                Op::SetCaption(id, caption) => {
                    let mut meta = p.known(id, i)?;
                    meta.caption = caption;
                    p.put(meta)?;
                }
                Op::SetMeta(id, photo) => {
                    let mut meta = p.known(id, i)?;
                    meta.meta = Some(photo);
                    p.put(meta)?;
                }
            }
        }
        Ok(p)
    }

    fn get(&self, id: u64) -> Result<Option<ImageRow>> {
        match self.meta.get(&id) {
            Some(m) => Ok(Some(m.clone())),
            None => self.st.meta(id),
        }
    }

    fn known(&self, id: u64, op: usize) -> Result<ImageRow> {
        self.get(id)?.ok_or_else(|| {
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

    fn owner_of_path(&self, p: &str) -> Result<Option<u64>> {
        match self.path.get(p) {
            Some(v) => Ok(*v),
            None => self.st.by_path(p),
        }
    }

    fn owner_of_hash(&self, h: &str) -> Result<Option<u64>> {
        match self.hash.get(h) {
            Some(v) => Ok(*v),
            None => self.st.by_hash(h),
        }
    }

    /// Records `new` as the image's state, keeping the lookup overlay in step.
    fn put(&mut self, new: ImageRow) -> Result<()> {
        let id = new.image_id;
        if let Some(old) = self.get(id)? {
            if !old.deleted {
                if self.owner_of_hash(&old.content_hash)? == Some(id) {
                    self.hash.insert(old.content_hash.clone(), None);
                }
                for p in &old.paths {
                    if self.owner_of_path(p)? == Some(id) {
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
        Ok(())
    }

    fn release_path(&mut self, owner: u64, p: &str) -> Result<()> {
        let Some(mut m) = self.get(owner)? else {
            return Ok(());
        };
        m.paths.retain(|x| x != p);
        if m.paths.is_empty() {
            m.deleted = true;
        } else if m.path == p {
            m.path.clone_from(&m.paths[0]);
        }
        self.put(m)
    }

    /// Takes `p` from whichever other live image holds it.
    fn take_path(&mut self, p: &str, new_owner: u64) -> Result<()> {
        if let Some(owner) = self.owner_of_path(p)? {
            if owner != new_owner {
                self.release_path(owner, p)?;
            }
        }
        Ok(())
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
        let (id, caption, meta) = match self.owner_of_hash(&rec.content_hash)? {
            Some(id) => {
                let old = self.get(id)?;
                if let Some(old) = &old {
                    for p in &old.paths {
                        if !paths.contains(p) {
                            paths.push(p.clone());
                        }
                    }
                }
                let (old_caption, old_meta) = old.map(|o| (o.caption, o.meta)).unwrap_or_default();
                (
                    id,
                    rec.caption.clone().or(old_caption),
                    rec.meta.clone().or(old_meta),
                )
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                (id, rec.caption.clone(), rec.meta.clone())
            }
        };
        for p in &paths {
            self.take_path(p, id)?;
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
            meta,
            deleted: false,
            ingested_at_ns: now,
        })?;
        if !self.new_embeds.contains_key(&id) {
            self.new_rows.push(id);
        }
        self.new_embeds.insert(id, rec.embeds);
        self.ids.push(id);
        Ok(())
    }

    /// New shard rows (with their embeddings) and patches for images that only changed.
    fn finish(mut self, st: &State, now: i64) -> Result<(Vec<ImageRow>, Vec<f32>, Vec<Patch>)> {
        let mut rows = Vec::with_capacity(self.new_rows.len());
        let mut embeds = Vec::with_capacity(self.new_rows.len() * self.q * self.e);
        for id in &self.new_rows {
            if let (Some(m), Some(e)) = (self.meta.remove(id), self.new_embeds.get(id)) {
                rows.push(m);
                embeds.extend_from_slice(e);
            }
        }
        let mut changed = Vec::with_capacity(self.meta.len());
        for m in self.meta.into_values() {
            let differs = st.meta(m.image_id)?.is_none_or(|old| {
                old.path != m.path
                    || old.paths != m.paths
                    || old.caption != m.caption
                    || old.meta != m.meta
                    || old.deleted != m.deleted
            });
            if differs {
                changed.push(m);
            }
        }
        let mut patches: Vec<Patch> = changed
            .into_iter()
            .map(|m| Patch {
                image_id: m.image_id,
                path: m.path,
                paths: m.paths,
                caption: m.caption,
                meta: m.meta,
                deleted: m.deleted,
                updated_at_ns: now,
            })
            .collect();
        patches.sort_by_key(|p| p.image_id);
        Ok((rows, embeds, patches))
    }
}
