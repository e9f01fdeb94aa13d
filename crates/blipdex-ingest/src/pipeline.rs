//! The ingest pipeline: walk → (unchanged? skip) → read + hash + decode + resize on a pool of
//! threads → dedup by content hash → model batches → atomic commits of `commit_every` images.
//! Queues are bounded, so memory stays flat however large the collection is.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use blipdex_core::{Error, Result};
use blipdex_model::image::{ImageConfig, ImageProcessor};
use blipdex_model::{Blip2, ModelFiles};
use blipdex_store::{Batch, Dtype, ImageRecord, Store, StoreOptions};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::job::IngestJob;
use crate::walk::{canonical_root, walk, FileEntry, Filters};

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
    /// Time spent in the model alone (vision + Q-Former + projection).
    pub model_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reject {
    pub path: String,
    pub reason: String,
}

/// Output of a decode worker.
struct Decoded {
    entry: FileEntry,
    hash: String,
    result: Result<(Vec<f32>, u32, u32)>,
}

struct Queued {
    entry: FileEntry,
    hash: String,
    pixels: Vec<f32>,
    width: u32,
    height: u32,
    extra_paths: Vec<String>,
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs one ingest job with an already loaded retrieval model.
pub fn ingest(job: &IngestJob, model: &Blip2, files: &ModelFiles) -> Result<IngestSummary> {
    job.validate()?;
    let start = Instant::now();
    let index = job
        .index
        .clone()
        .ok_or_else(|| Error::InvalidArgument("no --index".into()))?;
    if model.retrieval.is_none() {
        return Err(Error::Unsupported(format!(
            "{} has no ITC heads; ingest needs a retrieval checkpoint (Blip2ForImageTextRetrieval)",
            files.name
        )));
    }
    let roots = job
        .roots
        .iter()
        .map(|r| canonical_root(r))
        .collect::<Result<Vec<_>>>()?;
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
    let mut store = Store::create_or_open(&index, options)?;

    let (entries, problems) = walk(&roots, &filters);
    let mut summary = IngestSummary {
        files: entries.len(),
        ..Default::default()
    };
    let mut rejects: Vec<Reject> = problems
        .into_iter()
        .map(|p| Reject {
            path: path_string(&p.path),
            reason: p.reason,
        })
        .collect();

    // Paths still valid after this run; every other indexed path under the roots is removed.
    let mut keep: HashSet<String> = HashSet::new();
    let mut todo = Vec::new();
    for e in entries {
        let p = path_string(&e.path);
        match store.by_path(&p) {
            Some(row) if !row.deleted && row.file_size == e.size && row.mtime_ns == e.mtime_ns => {
                summary.unchanged += 1;
                keep.insert(p);
            }
            _ => todo.push(e),
        }
    }

    let processor = ImageProcessor::new(ImageConfig::from_model_dir(&files.dir)?)
        .with_max_pixels(job.max_image_pixels)
        .with_exif_orientation(true);
    let (h, w) = (processor.config.height, processor.config.width);
    let threads = match job.decode_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let progress = Progress::new(todo.len());

    let result = std::thread::scope(|scope| -> Result<()> {
        let (work_tx, work_rx) = crossbeam_channel::bounded::<FileEntry>(threads * 4);
        let (done_tx, done_rx) =
            crossbeam_channel::bounded::<Decoded>(job.batch_size * 2 + threads);
        for _ in 0..threads {
            let (work_rx, done_tx, processor) = (work_rx.clone(), done_tx.clone(), &processor);
            scope.spawn(move || {
                for entry in work_rx {
                    let decoded = decode(processor, entry);
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
            let (pixels, width, height) = match d.result {
                Ok(v) => v,
                Err(e) => {
                    rejects.push(Reject {
                        path: p,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            keep.insert(p.clone());
            if let Some(row) = store.by_content_hash(&d.hash).filter(|r| !r.deleted) {
                let id = row.image_id;
                if row.paths.contains(&p) && row.path != p {
                    // A known duplicate copy: the row's size/mtime are the primary path's, so
                    // copies are re-hashed each run; identical bytes mean nothing to write.
                    summary.unchanged += 1;
                } else if row.paths.contains(&p) {
                    // Same bytes, new mtime (touched/copied over): refresh metadata, keep embeddings.
                    let embeds = store.embeds(id).map(<[f32]>::to_vec).unwrap_or_default();
                    let mut rec = record(&d.entry, &d.hash, width, height, embeds);
                    rec.paths = row.paths.clone();
                    rec.path = row.path.clone();
                    rec.caption = row.caption.clone();
                    state.batch.add(rec);
                    summary.unchanged += 1;
                } else {
                    state.batch.add_path(id, p);
                    summary.duplicates += 1;
                }
            } else if let Some(i) = state.queued_hash.get(&d.hash) {
                state.queue[*i].extra_paths.push(p);
                summary.duplicates += 1;
            } else if let Some(embeds) = state.batched_hash.get(&d.hash) {
                let mut rec = record(&d.entry, &d.hash, width, height, embeds.clone());
                rec.paths = vec![p];
                state.batch.add(rec);
                summary.duplicates += 1;
            } else {
                state.queued_hash.insert(d.hash.clone(), state.queue.len());
                state.queue.push(Queued {
                    entry: d.entry,
                    hash: d.hash,
                    pixels,
                    width,
                    height,
                    extra_paths: Vec::new(),
                });
            }
            if state.queue.len() >= job.batch_size {
                summary.model_seconds += state.embed_queue(model, h, w)?;
            }
            if state.adds >= job.commit_every {
                summary.indexed += state.adds;
                store.commit(std::mem::take(&mut state.batch))?;
                summary.commits += 1;
                state.adds = 0;
                state.batched_hash.clear();
            }
        }
        summary.model_seconds += state.embed_queue(model, h, w)?;
        summary.indexed += state.adds;

        // Files gone from the roots (or now unreadable) stop being searchable.
        for row in store.iter().filter(|r| !r.deleted) {
            for p in &row.paths {
                if roots.iter().any(|r| Path::new(p).starts_with(r)) && !keep.contains(p) {
                    state.batch.remove_path(p.clone());
                    summary.removed += 1;
                }
            }
        }
        if !state.batch.is_empty() {
            store.commit(std::mem::take(&mut state.batch))?;
            summary.commits += 1;
        }
        Ok(())
    });
    progress.finish();
    result?;

    summary.rejected = rejects.len();
    write_rejects(&index, &rejects)?;
    summary.seconds = start.elapsed().as_secs_f64();
    summary.images_per_s = if summary.seconds > 0.0 {
        summary.indexed as f64 / summary.seconds
    } else {
        0.0
    };
    Ok(summary)
}

/// What the current (uncommitted) round holds.
#[derive(Default)]
struct Round {
    queue: Vec<Queued>,
    queued_hash: HashMap<String, usize>,
    /// Embeddings added to `batch` but not yet committed, for duplicates arriving meanwhile.
    batched_hash: HashMap<String, Vec<f32>>,
    batch: Batch,
    adds: usize,
}

impl Round {
    /// Embeds the queued images in one forward pass and moves them into the batch.
    fn embed_queue(&mut self, model: &Blip2, h: usize, w: usize) -> Result<f64> {
        if self.queue.is_empty() {
            return Ok(0.0);
        }
        let t0 = Instant::now();
        let n = self.queue.len();
        let mut data = Vec::with_capacity(n * 3 * h * w);
        for q in &self.queue {
            data.extend_from_slice(&q.pixels);
        }
        let tensor_err = |e: candle_core::Error| Error::Tensor(e.to_string());
        let px = Tensor::from_vec(data, (n, 3, h, w), &Device::Cpu).map_err(tensor_err)?;
        let vision = model.get_image_features(&px)?;
        let embeds = model.image_embeds(&model.get_qformer_features(&vision)?)?;
        let flat: Vec<f32> = embeds
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1())
            .map_err(tensor_err)?;
        let per = flat.len() / n;
        for (q, e) in self.queue.drain(..).zip(flat.chunks_exact(per)) {
            let mut rec = record(&q.entry, &q.hash, q.width, q.height, e.to_vec());
            rec.paths.extend(q.extra_paths);
            self.batched_hash.insert(q.hash, e.to_vec());
            self.batch.add(rec);
            self.adds += 1;
        }
        self.queued_hash.clear();
        Ok(t0.elapsed().as_secs_f64())
    }
}

fn record(entry: &FileEntry, hash: &str, width: u32, height: u32, embeds: Vec<f32>) -> ImageRecord {
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
    }
}

/// Read once, hash those bytes, decode the same bytes: what is embedded is what was hashed.
fn decode(processor: &ImageProcessor, entry: FileEntry) -> Decoded {
    let bytes = match std::fs::read(&entry.path) {
        Ok(b) => b,
        Err(e) => {
            let err = Error::io(&entry.path, e);
            return Decoded {
                entry,
                hash: String::new(),
                result: Err(err),
            };
        }
    };
    let hash = blake3::hash(&bytes).to_hex().to_string();
    let what = path_string(&entry.path);
    let result = processor.load_bytes(&bytes, &what).and_then(|img| {
        let (w, h) = img.dimensions();
        Ok((processor.preprocess(&img)?, w, h))
    });
    Decoded {
        entry,
        hash,
        result,
    }
}

/// `<index>/rejects.jsonl`: one JSON object per file this run could not index, replaced atomically.
fn write_rejects(index: &Path, rejects: &[Reject]) -> Result<()> {
    let path = index.join("rejects.jsonl");
    let tmp: PathBuf = index.join(".rejects.jsonl.tmp");
    let mut text = String::new();
    for r in rejects {
        text.push_str(
            &serde_json::to_string(r).map_err(|e| Error::InvalidArgument(e.to_string()))?,
        );
        text.push('\n');
    }
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

/// A progress bar on a terminal, periodic log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    done: std::cell::Cell<usize>,
    last_log: std::cell::Cell<Instant>,
    start: Instant,
}

impl Progress {
    fn new(total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} images, {per_sec}, ETA {eta}",
            ) {
                b.set_style(style);
            }
            b
        });
        Self {
            bar,
            total,
            done: 0.into(),
            last_log: Instant::now().into(),
            start: Instant::now(),
        }
    }

    fn tick(&self) {
        self.done.set(self.done.get() + 1);
        if let Some(b) = &self.bar {
            b.inc(1);
        } else if self.last_log.get().elapsed().as_secs() >= 10 {
            self.last_log.set(Instant::now());
            let rate = self.done.get() as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                "ingest: {}/{} files, {rate:.1} images/s",
                self.done.get(),
                self.total
            );
            eprintln!(
                "ingest: {}/{} files, {rate:.1} images/s",
                self.done.get(),
                self.total
            );
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
