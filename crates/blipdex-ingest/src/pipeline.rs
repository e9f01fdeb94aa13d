//! The ingest pipeline: walk → (unchanged? skip) → read + hash + decode + resize on a pool of
//! threads → dedup by content hash → model batches → atomic commits of `commit_every` images.
//! Queues are bounded, so memory stays flat however large the collection is.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use blipdex_core::{paths, Error, Result};
use blipdex_model::image::{DecodeMode, ImageProcessor};
use blipdex_model::vision_cache::{self, CacheDtype};
use blipdex_model::{CaptionRequest, Captioner, Retriever};

use crate::merge::parts_dir;
use blipdex_store::{Batch, Dtype, ImageRecord, PhotoMeta, Store, StoreOptions};
use candle_core::Tensor;
use serde::Serialize;

use crate::job::{is_url, IngestJob, ProgressMode};
use crate::listing;
use crate::walk::{canonical_root, list_objects, walk, FileEntry, Filters};
use blipdex_remote::{mirror, Remote};

/// The final report; `--json` prints it as one line.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct IngestSummary {
    /// Image files found under the roots.
    pub files: usize,
    /// Newly embedded images.
    pub indexed: usize,
    /// Files whose bytes were already indexed (under another path).
    pub duplicates: usize,
    /// Files unchanged since the last run (not re-embedded).
    pub unchanged: usize,
    /// Files that could not be indexed; reasons in `<index>/rejects.jsonl`.
    pub rejected: usize,
    /// Paths gone from the roots since the last run (no longer returned by search).
    pub removed: usize,
    pub commits: usize,
    pub seconds: f64,
    pub images_per_s: f64,
    /// Time spent in the model alone (vision + Q-Former + projection, and captions).
    pub model_seconds: f64,
    /// Captions generated (new images and earlier ones that had none).
    pub captioned: usize,
    /// How JPEGs were decoded: `exact` or `fast`.
    pub decode: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reject {
    pub path: String,
    pub reason: String,
}

/// The models an ingest runs.
#[derive(Clone, Copy)]
pub struct IngestModels<'a> {
    /// The retrieval checkpoint whose ITC embeddings are stored.
    pub retrieval: &'a Retriever,
    /// Stores a caption per image when given.
    pub captioner: Option<&'a Captioner>,
}

/// One decoded image, preprocessed for each model.
struct Pixels {
    retrieval: Vec<f32>,
    /// For the captioner when its preprocessing differs from the retrieval model's.
    caption: Option<Vec<f32>>,
    width: u32,
    height: u32,
    meta: PhotoMeta,
}

/// Output of a decode worker.
struct Decoded {
    entry: FileEntry,
    hash: String,
    /// The pixels; `None` for an unchanged image that was read only for its EXIF metadata.
    result: Result<Option<Pixels>>,
    meta: PhotoMeta,
}

/// What a decode worker does with a file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Hash, EXIF and pixels.
    Full,
    /// Hash and EXIF only: an image indexed before blipdex read EXIF (nothing is re-embedded).
    MetaOnly,
}

struct Queued {
    entry: FileEntry,
    hash: String,
    pixels: Pixels,
    extra_paths: Vec<String>,
}

/// An image indexed earlier that still needs a caption.
struct CaptionOnly {
    image_id: u64,
    pixels: Pixels,
}

/// A path as the store keeps it: exact bytes (see `blipdex_core::paths`).
fn path_string(p: &Path) -> String {
    paths::encode(p)
}

/// A path as people read it (rejects, messages).
fn shown(p: &Path) -> String {
    paths::display(&paths::encode(p)).into_owned()
}

/// Runs one ingest job with an already loaded retrieval checkpoint (no captions).
pub fn ingest(job: &IngestJob, retrieval: &Retriever) -> Result<IngestSummary> {
    ingest_with(
        job,
        IngestModels {
            retrieval,
            captioner: None,
        },
    )
}

/// Runs one ingest job with already loaded models. An index on object storage is worked on in
/// a local copy under the job's `cache_dir`: pulled first, then published (files first, the
/// manifest last); a worker's part is uploaded whole when it is complete (see
/// [`crate::merge`]).
pub fn ingest_with(job: &IngestJob, models: IngestModels<'_>) -> Result<IngestSummary> {
    job.validate()?;
    let index = job
        .index
        .clone()
        .ok_or_else(|| Error::InvalidArgument("no --index".into()))?;
    if !is_url(&index) {
        // A worker writes its shard as a part of the index, a complete store of its own.
        let dir = match job.shard {
            Some(shard) => parts_dir(&index).join(shard.part_name()),
            None => index,
        };
        return ingest_into(job, models, &dir);
    }
    let url = index.to_str().unwrap_or_default();
    let remote = Remote::open(url, &job.remote)?;
    // A missing bucket or credential, for the index or an input prefix, fails here, before
    // anything is copied or read.
    remote.probe()?;
    for r in job
        .roots
        .iter()
        .filter(|r| is_url(r) && !listing::is_listing(r))
    {
        Remote::open(r.to_str().unwrap_or_default(), &job.remote)?.probe()?;
    }
    let cache = job.cache_dir.as_deref().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "--index {url} is on object storage: give --cache-dir for its local copy"
        ))
    })?;
    match job.shard {
        Some(shard) => {
            let local = crate::merge::worker_part_dir(cache, &remote, shard);
            // Until this run publishes its part, the shard is not finished (a merge meanwhile
            // reports it unfinished rather than taking an older upload).
            crate::merge::unmark_done_remote(&remote, shard)?;
            let summary = ingest_into(job, models, &local)?;
            crate::merge::publish_part(&local, &remote, shard)?;
            Ok(summary)
        }
        None => {
            let local = mirror::copy_dir(cache, &remote, mirror::Role::Writer);
            mirror::pull_for_writing(&remote, &local)?;
            let summary = ingest_into(job, models, &local)?;
            mirror::push(&local, &remote, false)?;
            let rejects = local.join("rejects.jsonl");
            if rejects.is_file() {
                remote.upload("rejects.jsonl", &rejects)?;
            }
            Ok(summary)
        }
    }
}

/// Runs one ingest job into the local index directory `index`.
fn ingest_into(job: &IngestJob, models: IngestModels<'_>, index: &Path) -> Result<IngestSummary> {
    let retriever = models.retrieval;
    let (model, files) = (&retriever.model, &retriever.files);
    let cache = job
        .vision_cache
        .as_deref()
        .map(str::parse::<CacheDtype>)
        .transpose()?;
    let start = Instant::now();
    let index = index.to_path_buf();
    if job.shard.is_some() {
        crate::merge::unmark_done(&index)?;
    }
    // Every root as paths below it will read (canonical folders, object-store URLs), and the
    // object-store ones, each checked with one request before any work.
    let mut roots = Vec::new();
    let mut local_roots = Vec::new();
    let mut remotes = Vec::new();
    let mut listings = Vec::new();
    for r in &job.roots {
        if listing::is_listing(r) {
            listings.push(r.clone());
        } else if is_url(r) {
            let remote = Remote::open(r.to_str().unwrap_or_default(), &job.remote)?;
            remote.probe()?;
            roots.push(PathBuf::from(remote.url()));
            remotes.push(remote);
        } else {
            let c = canonical_root(r)?;
            roots.push(c.clone());
            local_roots.push(c);
        }
    }
    let filters = Filters::new(&job.include, &job.exclude)?;

    let cfg = &model.config;
    let mut options = StoreOptions::new(
        files.fingerprint()?,
        cfg.num_query_tokens,
        cfg.image_text_hidden_size,
    );
    if job.f16_embeddings {
        options = options.with_dtype(Dtype::F16);
    }
    std::fs::create_dir_all(&index).map_err(|e| Error::io(&index, e))?;
    let mut store = open_writer(&index, options)?;

    let (mut entries, mut problems) = walk(&local_roots, &filters);
    for remote in &remotes {
        entries.extend(list_objects(remote, &filters)?);
    }
    let mut stores = listing::Stores::default();
    for l in &listings {
        let (listed, trouble) =
            listing::read_listing(l, &job.listing_column, &filters, &job.remote, &mut stores)?;
        entries.extend(listed);
        problems.extend(trouble);
    }
    // A file named twice (two listings, a listing and a folder) is one file.
    let mut seen = HashSet::new();
    entries.retain(|e| seen.insert(e.path.clone()));
    if let Some(shard) = job.shard {
        // By the path below its root; a listed file by its whole path or URL.
        entries.retain(|e| {
            let rel = roots
                .iter()
                .find_map(|r| e.path.strip_prefix(r).ok())
                .unwrap_or(&e.path);
            shard.takes(rel)
        });
    }
    let mut summary = IngestSummary {
        files: entries.len(),
        ..Default::default()
    };
    let mut rejects: Vec<Reject> = problems
        .into_iter()
        .map(|p| Reject {
            path: shown(&p.path),
            reason: p.reason,
        })
        .collect();

    // Paths still valid after this run; every other indexed path under the roots is removed.
    let mut keep: HashSet<String> = HashSet::new();
    let mut todo = Vec::new();
    for e in entries {
        let p = path_string(&e.path);
        match store.by_path(&p) {
            Some(row)
                if !row.deleted
                    && (e.listed || (row.file_size == e.size && row.mtime_ns == e.mtime_ns))
                    && (models.captioner.is_none() || row.caption.is_some()) =>
            {
                if row.meta.is_some() {
                    summary.unchanged += 1;
                    keep.insert(p);
                } else {
                    todo.push((e, Read::MetaOnly));
                }
            }
            _ => todo.push((e, Read::Full)),
        }
    }

    let decode_mode = job.decode.unwrap_or(if retriever.model.device().is_cuda() {
        DecodeMode::Fast
    } else {
        DecodeMode::Exact
    });
    summary.decode = decode_mode.to_string();
    let processor = retriever
        .processor
        .clone()
        .with_max_pixels(job.max_image_pixels)
        .with_decode(decode_mode);
    // The captioner decodes the same image; preprocess twice only if its settings differ.
    let caption_processor = models
        .captioner
        .filter(|c| c.processor.config != processor.config)
        .map(|c| c.processor.clone());
    // A fast decode keeps twice the largest input side of either model.
    let mut loader = processor.clone();
    if let Some(c) = &caption_processor {
        loader.config.width = loader.config.width.max(c.config.width);
        loader.config.height = loader.config.height.max(c.config.height);
    }
    let processors = Processors {
        loader: &loader,
        retrieval: &processor,
        caption: caption_processor.as_ref(),
    };
    let embedder = Embedder {
        retriever,
        processor: &processor,
        captioner: models.captioner,
        cache: cache.map(|d| (vision_cache::cache_dir(&index), d)),
    };
    let threads = match job.decode_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let progress = Progress::new(todo.len(), job.progress);

    let result = std::thread::scope(|scope| -> Result<()> {
        let (work_tx, work_rx) = crossbeam_channel::bounded::<(FileEntry, Read)>(threads * 4);
        let (done_tx, done_rx) =
            crossbeam_channel::bounded::<Decoded>(job.batch_size * 2 + threads);
        for _ in 0..threads {
            let (work_rx, done_tx, processors) = (work_rx.clone(), done_tx.clone(), &processors);
            scope.spawn(move || {
                for (entry, read) in work_rx {
                    let decoded = decode(processors, entry, read);
                    if done_tx.send(decoded).is_err() {
                        break;
                    }
                }
            });
        }
        drop((work_rx, done_tx));
        let todo = std::mem::take(&mut todo);
        scope.spawn(move || {
            for e in todo {
                if work_tx.send(e).is_err() {
                    break;
                }
            }
        });

        let mut state = Round::default();
        for d in done_rx {
            progress.tick();
            let p = path_string(&d.entry.path);
            let path = p.clone();
            let d = if matches!(d.result, Ok(None)) {
                let row = store.by_content_hash(&d.hash).filter(|r| !r.deleted);
                if let Some(row) = row.filter(|r| r.paths.contains(&p)) {
                    if row.meta.is_none() {
                        state.batch.set_meta(row.image_id, d.meta);
                        state.updates += 1;
                    }
                    summary.unchanged += 1;
                    keep.insert(p);
                    continue;
                }
                // Its bytes changed under an unchanged size and mtime: index it afresh.
                decode(&processors, d.entry, Read::Full)
            } else {
                d
            };
            let meta = d.meta;
            let pixels = match d.result {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) => {
                    rejects.push(Reject {
                        path: shown(&d.entry.path),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            let (width, height) = (pixels.width, pixels.height);
            if store.by_path(&p).is_some_and(|r| r.content_hash != d.hash) {
                state.replaced = true;
            }
            keep.insert(p.clone());
            if let Some(row) = store.by_content_hash(&d.hash).filter(|r| !r.deleted) {
                let id = row.image_id;
                if models.captioner.is_some()
                    && row.caption.is_none()
                    && !state.caption_only.iter().any(|c| c.image_id == id)
                {
                    state.caption_only.push(CaptionOnly {
                        image_id: id,
                        pixels,
                    });
                }
                if row.paths.contains(&p) && row.path != p {
                    // A known duplicate copy: the row's size/mtime are the primary path's, so
                    // copies are re-hashed each run; identical bytes mean nothing to write.
                    summary.unchanged += 1;
                } else if row.paths.contains(&p) {
                    // Same bytes, new mtime (touched/copied over): refresh metadata, keep embeddings.
                    let embeds = store.embeds(id).unwrap_or_default();
                    let mut rec = record(&d.entry, &d.hash, width, height, &meta, embeds);
                    rec.paths = row.paths.clone();
                    rec.path = row.path.clone();
                    rec.caption = row.caption.clone();
                    state.batch.add(rec);
                    state.updates += 1;
                    summary.unchanged += 1;
                } else {
                    state.batch.add_path(id, p);
                    summary.duplicates += 1;
                }
                if row.meta.is_none() && !(row.paths.contains(&path) && row.path == path) {
                    // Indexed before blipdex read EXIF: the same bytes, the same metadata.
                    state.batch.set_meta(id, meta);
                }
            } else if let Some(i) = state.queued_hash.get(&d.hash) {
                state.queue[*i].extra_paths.push(p);
                summary.duplicates += 1;
            } else if let Some(embeds) = state.batched_hash.get(&d.hash) {
                let mut rec = record(&d.entry, &d.hash, width, height, &meta, embeds.clone());
                rec.paths = vec![p];
                state.batch.add(rec);
                summary.duplicates += 1;
            } else {
                state.queued_hash.insert(d.hash.clone(), state.queue.len());
                state.queue.push(Queued {
                    entry: d.entry,
                    hash: d.hash,
                    pixels,
                    extra_paths: Vec::new(),
                });
            }
            if state.queue.len() >= job.batch_size {
                summary.model_seconds += state.embed_queue(&embedder, &mut summary)?;
            }
            if state.caption_only.len() >= job.batch_size {
                summary.model_seconds += state.caption_existing(&embedder, &mut summary)?;
            }
            if state.adds + state.updates >= job.commit_every {
                summary.indexed += state.adds;
                store.commit(std::mem::take(&mut state.batch))?;
                summary.commits += 1;
                state.adds = 0;
                state.updates = 0;
                state.batched_hash.clear();
            }
        }
        summary.model_seconds += state.embed_queue(&embedder, &mut summary)?;
        summary.model_seconds += state.caption_existing(&embedder, &mut summary)?;
        summary.indexed += state.adds;

        // Files gone from the roots (or now unreadable) stop being searchable.
        for row in store.iter().filter(|r| !r.deleted) {
            for p in &row.paths {
                if roots.iter().any(|r| paths::decode(p).starts_with(r)) && !keep.contains(p) {
                    state.batch.remove_path(p.clone());
                    summary.removed += 1;
                }
            }
        }
        if !state.batch.is_empty() {
            store.commit(std::mem::take(&mut state.batch))?;
            summary.commits += 1;
        }
        if summary.removed > 0 || state.replaced {
            if let Some((dir, _)) = &embedder.cache {
                collect_cache_garbage(dir, &store);
            }
        }
        Ok(())
    });
    progress.finish();
    summary.rejected = rejects.len();
    if let Err(e) = result {
        // What was rejected before the failure is still worth a list (best effort: the failure
        // may be the full disk; a failed commit has freed its own files by now).
        if let Err(w) = write_rejects(&index, &rejects) {
            tracing::warn!("{} rejected files not listed: {w}", rejects.len());
        }
        return Err(e);
    }
    write_rejects(&index, &rejects)?;
    if let Some(shard) = job.shard {
        // The part is complete: `index merge` takes it (a rerun only refreshes it).
        crate::merge::mark_done(&index, shard, store.generation())?;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    summary.images_per_s = if summary.seconds > 0.0 {
        summary.indexed as f64 / summary.seconds
    } else {
        0.0
    };
    Ok(summary)
}

/// Opens the index for writing. A running `blipdex serve` briefly takes the writer lock to
/// store captions; wait for it (a minute at most) instead of failing the ingest.
fn open_writer(index: &Path, options: StoreOptions) -> Result<Store> {
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let mut said = false;
    loop {
        match Store::create_or_open(index, options.clone()) {
            Err(Error::Locked { .. }) if Instant::now() < deadline => {
                if !said {
                    tracing::info!(
                        "index {} is being written by another process (an ingest, or a server \
                         storing captions); waiting up to 60 s for it",
                        index.display()
                    );
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

/// The model side of the pipeline.
struct Embedder<'a> {
    retriever: &'a Retriever,
    /// The retrieval checkpoint's processor with the job's pixel limit.
    processor: &'a ImageProcessor,
    captioner: Option<&'a Captioner>,
    /// Where and how to keep vision states for reranking.
    cache: Option<(PathBuf, CacheDtype)>,
}

fn tensor_err(e: candle_core::Error) -> Error {
    Error::Tensor(e.to_string())
}

impl Embedder<'_> {
    /// Plain captions for preprocessed images; `retrieval_px` is reused when the captioner
    /// preprocesses like the retrieval model.
    fn captions(&self, pixels: &[&Pixels], retrieval_px: Option<&Tensor>) -> Result<Vec<String>> {
        let Some(c) = self.captioner else {
            return Ok(Vec::new());
        };
        let px = match (
            pixels.first().and_then(|p| p.caption.as_ref()),
            retrieval_px,
        ) {
            (None, Some(t)) => t.clone(),
            (None, None) => self
                .processor
                .stack(pixels.iter().map(|p| p.retrieval.as_slice()))?,
            (Some(_), _) => c
                .processor
                .stack(pixels.iter().filter_map(|p| p.caption.as_deref()))?,
        };
        Ok(c.generate(&px, &CaptionRequest::default())?
            .into_iter()
            .map(|g| g.text)
            .collect())
    }
}

/// What the current (uncommitted) round holds.
#[derive(Default)]
struct Round {
    queue: Vec<Queued>,
    queued_hash: HashMap<String, usize>,
    /// Embeddings added to `batch` but not yet committed, for duplicates arriving meanwhile.
    batched_hash: HashMap<String, Vec<f32>>,
    caption_only: Vec<CaptionOnly>,
    batch: Batch,
    adds: usize,
    /// Metadata refreshes and captions of existing images in `batch` (they count toward a
    /// commit too, so a crash never loses more than `commit_every` of them).
    updates: usize,
    /// Some image lost a path this run (its cache entry may be garbage now).
    replaced: bool,
}

impl Round {
    /// Embeds the queued images in one forward pass and moves them into the batch.
    fn embed_queue(&mut self, m: &Embedder<'_>, summary: &mut IngestSummary) -> Result<f64> {
        if self.queue.is_empty() {
            return Ok(0.0);
        }
        let t0 = Instant::now();
        let n = self.queue.len();
        let px = m
            .processor
            .stack(self.queue.iter().map(|q| q.pixels.retrieval.as_slice()))?;
        let (vision, embeds) = m.retriever.embed_pixels(&px)?;
        if let Some((dir, dtype)) = &m.cache {
            for (i, q) in self.queue.iter().enumerate() {
                let states = vision.get(i).map_err(tensor_err)?;
                // A cache entry is an optimization: a full disk must not stop the ingest.
                if let Err(e) = vision_cache::write(dir, &q.hash, &states, *dtype) {
                    tracing::warn!("vision cache entry not written (rerank will recompute): {e}");
                }
            }
        }
        let pixels: Vec<&Pixels> = self.queue.iter().map(|q| &q.pixels).collect();
        let mut captions = m.captions(&pixels, Some(&px))?.into_iter();
        summary.captioned += captions.len();
        if embeds.len() != n {
            return Err(Error::Internal(format!(
                "{} embeddings for {n} images",
                embeds.len()
            )));
        }
        for (q, e) in self.queue.drain(..).zip(embeds) {
            let mut rec = record(
                &q.entry,
                &q.hash,
                q.pixels.width,
                q.pixels.height,
                &q.pixels.meta,
                e.clone(),
            );
            rec.paths.extend(q.extra_paths);
            rec.caption = captions.next();
            self.batched_hash.insert(q.hash, e);
            self.batch.add(rec);
            self.adds += 1;
        }
        self.queued_hash.clear();
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Captions images indexed earlier without one.
    fn caption_existing(&mut self, m: &Embedder<'_>, summary: &mut IngestSummary) -> Result<f64> {
        if self.caption_only.is_empty() {
            return Ok(0.0);
        }
        let t0 = Instant::now();
        let pixels: Vec<&Pixels> = self.caption_only.iter().map(|c| &c.pixels).collect();
        let captions = m.captions(&pixels, None)?;
        summary.captioned += captions.len();
        for (c, text) in self.caption_only.drain(..).zip(captions) {
            self.batch.set_caption(c.image_id, Some(text));
            self.updates += 1;
        }
        Ok(t0.elapsed().as_secs_f64())
    }
}

/// Removes vision-cache entries of images no longer live. Best effort: a leftover entry only
/// costs disk space (entries are content-addressed, never wrong).
fn collect_cache_garbage(dir: &Path, store: &Store) {
    let live: HashSet<String> = store.iter().map(|r| r.content_hash).collect();
    let Ok(subdirs) = std::fs::read_dir(dir) else {
        return;
    };
    for sub in subdirs.flatten() {
        let Ok(entries) = std::fs::read_dir(sub.path()) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                // Left by a crash mid-write.
                let _ = std::fs::remove_file(e.path());
            } else if let Some(hash) = name.strip_suffix(".safetensors") {
                if !live.contains(hash) {
                    if let Err(err) = vision_cache::remove(dir, hash) {
                        tracing::warn!("cannot remove stale vision cache entry: {err}");
                    }
                }
            }
        }
    }
}

fn record(
    entry: &FileEntry,
    hash: &str,
    width: u32,
    height: u32,
    meta: &PhotoMeta,
    embeds: Vec<f32>,
) -> ImageRecord {
    let p = path_string(&entry.path);
    ImageRecord {
        path: p.clone(),
        paths: vec![p],
        content_hash: hash.to_string(),
        width,
        height,
        file_size: entry.size,
        mtime_ns: entry.mtime_ns,
        embeds,
        caption: None,
        meta: Some(meta.clone()),
    }
}

/// The decode workers' processors.
struct Processors<'a> {
    /// Decodes (its size decides a fast decode's scale: the larger of the two models' inputs).
    loader: &'a ImageProcessor,
    retrieval: &'a ImageProcessor,
    /// The captioner's, where its settings differ from the retrieval model's.
    caption: Option<&'a ImageProcessor>,
}

/// Read once, hash those bytes, decode the same bytes: what is embedded is what was hashed.
fn decode(p: &Processors<'_>, mut entry: FileEntry, read: Read) -> Decoded {
    let bytes = match entry.read() {
        Ok(b) => b,
        Err(err) => {
            return Decoded {
                entry,
                hash: String::new(),
                result: Err(err),
                meta: PhotoMeta::default(),
            };
        }
    };
    let hash = blake3::hash(&bytes).to_hex().to_string();
    if entry.listed {
        entry.size = bytes.len() as u64;
    }
    let meta = crate::exif::photo_meta(&bytes);
    let what = shown(&entry.path);
    let result = match read {
        Read::MetaOnly => Ok(None),
        Read::Full => p.loader.load(&bytes, &what).and_then(|img| {
            let retrieval = p.retrieval.preprocess(&img.image)?;
            let caption = p.caption.map(|c| c.preprocess(&img.image)).transpose()?;
            ImageProcessor::recycle(img.image);
            Ok(Some(Pixels {
                retrieval,
                caption,
                width: img.width,
                height: img.height,
                meta: meta.clone(),
            }))
        }),
    };
    Decoded {
        entry,
        hash,
        result,
        meta,
    }
}

/// `<index>/rejects.jsonl`: one JSON object per file this run could not index, replaced atomically.
fn write_rejects(index: &Path, rejects: &[Reject]) -> Result<()> {
    let mut text = String::new();
    for r in rejects {
        // A reason on one line (decoders' messages may hold newlines): `jq -r .reason` output
        // and grep stay one line per file.
        let r = Reject {
            path: r.path.clone(),
            reason: r.reason.split_whitespace().collect::<Vec<_>>().join(" "),
        };
        text.push_str(
            &serde_json::to_string(&r).map_err(|e| Error::InvalidArgument(e.to_string()))?,
        );
        text.push('\n');
    }
    blipdex_store::write_atomic(index, "rejects.jsonl", text.as_bytes())
}

/// A progress bar on a terminal, periodic log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    mode: ProgressMode,
    total: usize,
    done: std::cell::Cell<usize>,
    last_log: std::cell::Cell<Instant>,
    start: Instant,
}

impl Progress {
    fn new(total: usize, mode: ProgressMode) -> Self {
        let terminal = mode == ProgressMode::Auto && std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} images, {per_sec}, ETA {eta}",
            ) {
                b.set_style(style);
            }
            b
        });
        let p = Self {
            bar,
            mode,
            total,
            done: 0.into(),
            last_log: Instant::now().into(),
            start: Instant::now(),
        };
        p.json_line();
        p
    }

    fn tick(&self) {
        self.done.set(self.done.get() + 1);
        let every = match self.mode {
            ProgressMode::Json => 1,
            _ => 10,
        };
        if let Some(b) = &self.bar {
            b.inc(1);
        } else if self.last_log.get().elapsed().as_secs() >= every {
            self.last_log.set(Instant::now());
            match self.mode {
                ProgressMode::Json => self.json_line(),
                ProgressMode::Auto => {
                    let rate = self.done.get() as f64 / self.elapsed();
                    eprintln!(
                        "ingest: {}/{} files, {rate:.1} images/s",
                        self.done.get(),
                        self.total
                    );
                }
                ProgressMode::None => {}
            }
        }
    }

    fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64().max(1e-9)
    }

    fn json_line(&self) {
        if self.mode == ProgressMode::Json {
            let line = serde_json::json!({"progress": {
                "done": self.done.get(),
                "total": self.total,
                "images_per_s": self.done.get() as f64 / self.elapsed(),
                "elapsed_s": self.elapsed(),
            }});
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        self.json_line();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_reasons_are_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rejects = [
            Reject {
                path: "a\nb.jpg".into(),
                reason: "bad\nheader:\r\n  truncated".into(),
            },
            Reject {
                path: "c.jpg".into(),
                reason: "empty".into(),
            },
        ];
        write_rejects(dir.path(), &rejects).expect("write");
        let text = std::fs::read_to_string(dir.path().join("rejects.jsonl")).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["reason"], "bad header: truncated");
        // The path is kept exactly: it names the file.
        assert_eq!(lines[0]["path"], "a\nb.jpg");
    }
}
