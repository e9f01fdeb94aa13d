//! The retrieval engine behind `blipdex search` and `blipdex serve`: a loaded retrieval
//! checkpoint (and optionally a captioning one) over an index directory.
//!
//! Every method is blocking and takes `&self`; the server calls them from its model thread(s),
//! never from the async runtime. The index is a snapshot ([`Engine::store`]) swapped atomically
//! by [`Engine::refresh`] when a later ingest commits, so a query never sees a half-written state.

pub mod filter;
mod images;
mod query;
mod thumbs;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use blipdex_core::{paths, Error, Result};
use blipdex_model::opt::LinearStorage;
use blipdex_model::vision_cache;
use blipdex_model::{
    Blip2, CaptionRequest, Captioner, Generated, LoadOptions, ModelFiles, Retriever,
};
use blipdex_store::{Batch, PhotoMeta, Store};
use candle_core::Tensor;
use serde::Serialize;

pub use filter::{Near, PhotoFilter, SortBy};
pub use images::image_similarity;
pub use query::{dedup_ids, Answer, BatchSizes, Query, IMAGE_CHUNK, MAX_BEAMS, MAX_NEW_TOKENS};
pub use thumbs::Thumbnail;

/// Most results one query may ask for (`offset + top_k`); larger requests are refused.
pub const MAX_RESULTS: usize = 10_000;
/// Longest query text, in bytes (the tokenizer truncates to the model's positions anyway).
pub const MAX_QUERY_BYTES: usize = 4096;
/// Most image ids one rerank or caption request may name.
pub const MAX_RERANK: usize = 1000;
/// Images per caption batch.
const CAPTION_CHUNK: usize = 8;
/// Up to this many photos passing an EXIF filter, a text search scores each of them exactly
/// (about 8k multiply-adds each at 32x256); more, and the ANN ranking is filtered instead.
const EXACT_TEXT_MATCHES: usize = 20_000;
/// The same for image queries, whose exact score costs Q times more (32x32x256).
const EXACT_IMAGE_MATCHES: usize = 2_000;
/// Most hits one search may ask captions for.
pub const MAX_CAPTIONED_HITS: usize = 100;
/// Captions kept in memory (per image and request).
const CAPTION_CACHE_ENTRIES: usize = 10_000;

/// What [`Engine::load`] needs.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub index: PathBuf,
    /// The retrieval checkpoint (`Blip2ForImageTextRetrieval`) that built the index.
    pub model: ModelFiles,
    pub load: LoadOptions,
    /// A captioning checkpoint (`Blip2ForConditionalGeneration`), for on-demand captions.
    pub caption_model: Option<ModelFiles>,
    pub caption_storage: LinearStorage,
    /// Decompression-bomb guard for images sent in requests and read for reranking.
    pub max_image_pixels: u64,
    /// Budget of the in-memory LRU of vision states used by ITM reranking.
    pub vision_lru_bytes: usize,
    /// Write generated captions into the index ([`Engine::flush_captions`]). Off for a local
    /// copy of an index on object storage: the copy is replaced by each pull, so captions stay
    /// in this process's memory.
    pub persist_captions: bool,
}

impl EngineOptions {
    pub fn new(index: impl Into<PathBuf>, model: ModelFiles) -> Self {
        Self {
            index: index.into(),
            model,
            load: LoadOptions::default(),
            caption_model: None,
            caption_storage: LinearStorage::Float,
            max_image_pixels: blipdex_model::image::DEFAULT_MAX_PIXELS,
            vision_lru_bytes: 512 << 20,
            persist_captions: true,
        }
    }
}

/// Search settings shared by text and image queries.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchParams {
    pub top_k: usize,
    /// Skip this many of the best results (pagination).
    pub offset: usize,
    /// Brute force over every image instead of the ANN index.
    pub exact: bool,
    /// ANN search breadth: images rescored exactly.
    pub ef: usize,
    /// Only images with a path starting with this.
    pub path_prefix: Option<String>,
    /// Only results scoring at least this.
    pub min_score: Option<f32>,
    /// Only photos whose EXIF metadata passes.
    pub photo: PhotoFilter,
    pub sort: SortBy,
}

impl Default for SearchParams {
    fn default() -> Self {
        Self {
            top_k: 10,
            offset: 0,
            exact: false,
            ef: blipdex_store::DEFAULT_EF,
            path_prefix: None,
            min_score: None,
            photo: PhotoFilter::default(),
            sort: SortBy::Score,
        }
    }
}

impl SearchParams {
    pub fn validate(&self) -> Result<()> {
        if self.top_k == 0 {
            return Err(Error::InvalidArgument("top_k must be at least 1".into()));
        }
        if self.offset.saturating_add(self.top_k) > MAX_RESULTS {
            return Err(Error::InvalidArgument(format!(
                "offset + top_k must be at most {MAX_RESULTS}, got {} + {}",
                self.offset, self.top_k
            )));
        }
        if self.ef == 0 || self.ef > 100_000 {
            return Err(Error::InvalidArgument(format!(
                "ef must be between 1 and 100000, got {}",
                self.ef
            )));
        }
        if self.min_score.is_some_and(|s| !s.is_finite()) {
            return Err(Error::InvalidArgument("min_score must be finite".into()));
        }
        self.photo.validate()
    }

    fn filtered(&self) -> bool {
        self.path_prefix.is_some() || self.min_score.is_some()
    }

    /// Whether the candidates come from a scan of the metadata (EXIF filters, date order)
    /// rather than from the ANN index.
    fn scans_metadata(&self) -> bool {
        !self.photo.is_empty() || self.sort != SortBy::Score
    }

    /// The live images that pass the EXIF and path filters (before any score), with their
    /// metadata: one pass over the snapshot's metadata table, paths read only for those.
    fn matching(&self, store: &Store) -> Result<Vec<(u64, Option<PhotoMeta>)>> {
        Ok(store
            .photos()?
            .iter()
            .filter(|(id, m)| self.photo.matches(m.as_ref()) && self.keeps(store, *id, f32::MAX))
            .cloned()
            .collect())
    }

    /// Scores `matching` with `score`, keeps those at or above `min_score`, orders them by
    /// `sort` and cuts the page.
    fn rank_matching(
        &self,
        matching: Vec<(u64, Option<PhotoMeta>)>,
        score: impl Fn(u64) -> Option<f32>,
    ) -> Vec<(u64, f32)> {
        let mut scored: Vec<(u64, f32, Option<i64>)> = matching
            .into_iter()
            .filter_map(|(id, m)| {
                let s = score(id)?;
                self.min_score
                    .is_none_or(|min| s >= min)
                    .then(|| (id, s, m.and_then(|m| m.taken_at)))
            })
            .collect();
        let by_score = |a: &(u64, f32, Option<i64>), b: &(u64, f32, Option<i64>)| {
            b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
        };
        match self.sort {
            SortBy::Score => scored.sort_by(by_score),
            // Undated photos last, whichever the direction.
            SortBy::DateDesc => scored.sort_by(|a, b| {
                (b.2.is_some(), b.2)
                    .cmp(&(a.2.is_some(), a.2))
                    .then_with(|| by_score(a, b))
            }),
            SortBy::DateAsc => scored.sort_by(|a, b| {
                (a.2.is_none(), a.2)
                    .cmp(&(b.2.is_none(), b.2))
                    .then_with(|| by_score(a, b))
            }),
        }
        scored
            .into_iter()
            .skip(self.offset)
            .take(self.top_k)
            .map(|(id, s, _)| (id, s))
            .collect()
    }

    fn keeps(&self, store: &Store, id: u64, score: f32) -> bool {
        if self.min_score.is_some_and(|m| score < m) {
            return false;
        }
        match &self.path_prefix {
            None => true,
            Some(prefix) => store.get(id).is_some_and(|r| {
                r.paths
                    .iter()
                    .any(|p| paths::display(p).starts_with(prefix.as_str()))
            }),
        }
    }
}

/// One result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub image_id: u64,
    pub path: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_paths: Vec<String>,
    pub content_hash: String,
    pub width: u32,
    pub height: u32,
    /// ITC max-sim score for text queries; the image similarity for image queries.
    pub itc_score: f32,
    /// ITM match probability, on reranked hits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub itm_score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// Why this hit has no `itm_score` / caption although one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the photo's EXIF says (absent when it was never read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub photo: Option<PhotoMeta>,
}

/// What to caption.
#[derive(Debug, Clone)]
pub enum CaptionSource {
    ImageId(u64),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionOutcome {
    pub generated: Generated,
    /// Served from the store or the cache without running the model.
    pub cached: bool,
}

/// Index and model facts for `GetStats` / logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    pub images: usize,
    /// Rows held but not live (deleted or superseded; what compaction reclaims).
    pub dead_rows: usize,
    pub generation: u64,
    pub model: String,
    pub model_fingerprint: String,
    pub caption_model: Option<String>,
    pub captions_stored: usize,
    pub captions_pending: usize,
    pub index_bytes: u64,
    pub hnsw_points: usize,
    pub vision_cache_entries: usize,
}

struct VisionLru {
    cache: lru::LruCache<String, Tensor>,
}

pub struct Engine {
    index: PathBuf,
    fingerprint: String,
    retriever: Retriever,
    store: RwLock<Arc<Store>>,
    vision_lru: Mutex<VisionLru>,
    vision_shape: (usize, usize),
    captioner: Option<Captioner>,
    /// (content hash, request) → generated; default-request captions also go to `pending`.
    caption_cache: Mutex<lru::LruCache<(String, CaptionRequest), Generated>>,
    /// Default captions not yet written to the store.
    pending: Mutex<HashMap<String, String>>,
    persist_captions: bool,
    /// Where photos indexed from object storage are read back.
    objects: images::Objects,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn terr(e: candle_core::Error) -> Error {
    Error::Tensor(e.to_string())
}

impl Engine {
    /// Opens the index, checks that `opts.model` built it, loads the model(s).
    pub fn load(opts: &EngineOptions) -> Result<Self> {
        let store = Store::open_readonly(&opts.index)?;
        let fingerprint = opts.model.fingerprint()?;
        if fingerprint != store.model_fingerprint() {
            return Err(Error::ModelMismatch {
                dir: opts.index.clone(),
                stored: store.model_fingerprint().to_string(),
                requested: format!("{} ({fingerprint})", opts.model.name),
            });
        }
        let retriever =
            Retriever::load(&opts.model, &opts.load)?.with_max_pixels(opts.max_image_pixels);
        let (h, w) = (
            retriever.processor.config.height,
            retriever.processor.config.width,
        );
        let vc = &retriever.model.config.vision_config;
        let (ph, pw) = vc.patch_size.hw();
        let vision_shape = ((h / ph.max(1)) * (w / pw.max(1)) + 1, vc.hidden_size);
        let per_entry = (vision_shape.0 * vision_shape.1 * 4).max(1);
        let cap = std::num::NonZeroUsize::new((opts.vision_lru_bytes / per_entry).max(1))
            .unwrap_or(std::num::NonZeroUsize::MIN);
        let captioner = opts
            .caption_model
            .as_ref()
            .map(|f| {
                Captioner::load(f, &opts.load, opts.caption_storage)
                    .map(|c| c.with_max_pixels(opts.max_image_pixels))
            })
            .transpose()?;
        Ok(Self {
            index: opts.index.clone(),
            fingerprint,
            retriever,
            store: RwLock::new(Arc::new(store)),
            vision_lru: Mutex::new(VisionLru {
                cache: lru::LruCache::new(cap),
            }),
            vision_shape,
            captioner,
            caption_cache: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(CAPTION_CACHE_ENTRIES)
                    .unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            pending: Mutex::new(HashMap::new()),
            persist_captions: opts.persist_captions,
            objects: images::Objects::default(),
        })
    }

    pub fn model(&self) -> &Blip2 {
        &self.retriever.model
    }

    /// The retrieval checkpoint: model, tokenizer, processor.
    pub fn retriever(&self) -> &Retriever {
        &self.retriever
    }

    pub fn has_captioner(&self) -> bool {
        self.captioner.is_some()
    }

    /// The current snapshot of the index.
    pub fn store(&self) -> Arc<Store> {
        self.store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Picks up what a later ingest committed, and an index deleted and built again in the same
    /// place (another identity, usually a lower generation): reopens the index when the
    /// manifest on disk is not the one being served. Queries running meanwhile keep the
    /// snapshot they started with. Returns whether a new snapshot was installed. A missing index
    /// is an error and the current snapshot stays.
    pub fn refresh(&self) -> Result<bool> {
        let serving = self.store().version();
        if Store::read_version(&self.index)? == serving {
            return Ok(false);
        }
        let fresh = Store::open_readonly(&self.index)?;
        if fresh.model_fingerprint() != self.fingerprint {
            return Err(Error::ModelMismatch {
                dir: self.index.clone(),
                stored: fresh.model_fingerprint().to_string(),
                requested: self.fingerprint.clone(),
            });
        }
        let mut guard = self.store.write().unwrap_or_else(PoisonError::into_inner);
        let replaced = fresh.index_id() != guard.index_id();
        // Two refreshes may race (the maintenance loop's and a caption flush's): the later
        // generation of the same index wins; another index, or a lower generation that is what
        // the disk holds now (a restored copy), replaces what is served.
        let install = replaced
            || fresh.generation() > guard.generation()
            || Store::read_version(&self.index).is_ok_and(|v| v == fresh.version());
        if !install || fresh.version() == guard.version() {
            return Ok(false);
        }
        if replaced || fresh.generation() < guard.generation() {
            tracing::warn!(
                dir = %self.index.display(),
                was_generation = guard.generation(),
                generation = fresh.generation(),
                images = fresh.len(),
                "the index was replaced; serving the new one"
            );
        } else {
            tracing::info!(
                generation = fresh.generation(),
                images = fresh.len(),
                "index reloaded"
            );
        }
        *guard = Arc::new(fresh);
        Ok(true)
    }

    /// The rules a query text must meet (non-blank, at most [`MAX_QUERY_BYTES`]).
    pub fn check_query(q: &str) -> Result<()> {
        if q.trim().is_empty() {
            return Err(Error::InvalidArgument(
                "query is empty; send the text to search for (or, to browse by date without \
                 one, sort by date_desc or date_asc)"
                    .into(),
            ));
        }
        if q.len() > MAX_QUERY_BYTES {
            return Err(Error::InvalidArgument(format!(
                "query is {} bytes; at most {MAX_QUERY_BYTES} are accepted, shorten it",
                q.len()
            )));
        }
        Ok(())
    }

    /// ITC text embeddings (unit vectors of length E), one per text, in one batch.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        for t in texts {
            Self::check_query(t)?;
        }
        self.retriever.embed_texts(texts)
    }

    /// Decodes and preprocesses request bytes with the retrieval checkpoint's processor.
    fn pixels(&self, bytes: &[&[u8]]) -> Result<Tensor> {
        let p = &self.retriever.processor;
        let rows = bytes
            .iter()
            .enumerate()
            .map(|(i, b)| p.pixel_values_from_bytes(b, &format!("#{i} in the request")))
            .collect::<Result<Vec<_>>>()?;
        p.stack(rows.iter().map(Vec::as_slice))
    }

    /// ITC image embeddings (Q×E values, `[Q][E]`) of encoded images, in one batch.
    pub fn embed_images(&self, images: &[&[u8]]) -> Result<Vec<Vec<f32>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.retriever.embed_pixels(&self.pixels(images)?)?.1)
    }

    /// Text → images by ITC (max over each image's Q vectors of the cosine; exact scores also
    /// for ANN results).
    pub fn search_text(&self, store: &Store, t: &[f32], p: &SearchParams) -> Result<Vec<Hit>> {
        Ok(self.hits(store, rank_text(store, t, p)?.into_iter()))
    }

    /// Every live image the filters keep, in `p.sort`'s date order (see [`browse`]).
    pub fn browse(&self, store: &Store, p: &SearchParams) -> Result<Vec<Hit>> {
        Ok(self.hits(store, browse(store, p)?.into_iter()))
    }

    /// Image → images: for each of the query's Q vectors, its best cosine over the candidate's
    /// Q vectors, averaged over the query's vectors (1.0 for identical embeddings). Candidates
    /// come from the ANN index, searched with every query vector, and are rescored exactly.
    pub fn search_image(
        &self,
        store: &Store,
        embeds: &[f32],
        p: &SearchParams,
    ) -> Result<Vec<Hit>> {
        Ok(self.hits(store, rank_image(store, embeds, p)?.into_iter()))
    }

    fn hits(&self, store: &Store, scored: impl Iterator<Item = (u64, f32)>) -> Vec<Hit> {
        scored
            .filter_map(|(id, score)| {
                let row = store.get(id)?;
                Some(Hit {
                    image_id: id,
                    path: paths::display(&row.path).into_owned(),
                    other_paths: row
                        .paths
                        .iter()
                        .filter(|p| **p != row.path)
                        .map(|p| paths::display(p).into_owned())
                        .collect(),
                    content_hash: row.content_hash.clone(),
                    width: row.width,
                    height: row.height,
                    itc_score: score,
                    itm_score: None,
                    caption: row
                        .caption
                        .clone()
                        .or_else(|| lock(&self.pending).get(&row.content_hash).cloned()),
                    error: None,
                    photo: row.meta,
                })
            })
            .collect()
    }

    /// Hits for explicit image ids (scores zero), e.g. for `Rerank`. Unknown or deleted ids
    /// are NOT_FOUND.
    pub fn hits_for_ids(&self, store: &Store, ids: &[u64]) -> Result<Vec<Hit>> {
        if ids.len() > MAX_RERANK {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_RERANK} image ids per request, got {}",
                ids.len()
            )));
        }
        for id in ids {
            if store.get(*id).is_none_or(|r| r.deleted) {
                return Err(Error::NotFound(format!(
                    "image id {id} is not in the index"
                )));
            }
        }
        Ok(self.hits(store, ids.iter().map(|id| (*id, 0.0))))
    }

    /// The vision states [1+P, Dv] of indexed images: in-memory LRU, then the on-disk cache
    /// written at ingest, then recomputed from the file (its content hash verified). Per-image
    /// errors (file gone or changed) do not fail the others.
    pub fn vision_states(&self, store: &Store, ids: &[u64]) -> Vec<Result<Tensor>> {
        let mut out: Vec<Option<Result<Tensor>>> = (0..ids.len()).map(|_| None).collect();
        let mut todo: Vec<(usize, String, Vec<u8>)> = Vec::new();
        let disk = vision_cache::cache_dir(&self.index);
        for (i, id) in ids.iter().enumerate() {
            let Some(row) = store.get(*id).filter(|r| !r.deleted) else {
                out[i] = Some(Err(Error::NotFound(format!(
                    "image id {id} is not in the index"
                ))));
                continue;
            };
            let hash = row.content_hash.clone();
            if let Some(t) = lock(&self.vision_lru).cache.get(&hash) {
                out[i] = Some(Ok(t.clone()));
                continue;
            }
            match vision_cache::read(&disk, &hash, self.vision_shape) {
                Ok(Some(t)) => {
                    let t = t.to_dtype(self.model().vision_model.dtype()).map_err(terr);
                    if let Ok(t) = &t {
                        lock(&self.vision_lru).cache.put(hash, t.clone());
                    }
                    out[i] = Some(t);
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("vision cache entry unusable, recomputing: {e}"),
            }
            match images::read_verified(&row.paths, &row.content_hash, &self.objects) {
                Ok(bytes) => todo.push((i, hash, bytes)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        // Recompute the misses in one batch; a file that no longer decodes fails alone.
        let mut decoded = Vec::new();
        for (i, hash, bytes) in todo {
            match self.pixels(&[&bytes]) {
                Ok(px) => decoded.push((i, hash, px)),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        // Chunks bound the vision tower's activations (ViT-g: ~0.5 GB per 16 images).
        for chunk in decoded.chunks(IMAGE_CHUNK) {
            let run = || -> Result<Tensor> {
                let px = Tensor::cat(&chunk.iter().map(|d| &d.2).collect::<Vec<_>>(), 0)
                    .map_err(terr)?;
                self.model().get_image_features(&px)
            };
            match run() {
                Ok(states) => {
                    for (row, (i, hash, _)) in chunk.iter().enumerate() {
                        let t = states.get(row).map_err(terr);
                        if let Ok(t) = &t {
                            lock(&self.vision_lru).cache.put(hash.clone(), t.clone());
                        }
                        out[*i] = Some(t);
                    }
                }
                Err(e) => {
                    for (i, _, _) in chunk {
                        out[*i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(Error::Internal("vision state not computed".into()))))
            .collect()
    }

    /// ITM match probabilities for many (query, image ids) requests in one Q-Former batch.
    /// Outer error: a bad query; inner: that image's problem (missing file, ...).
    pub fn itm_many(
        &self,
        store: &Store,
        requests: &[(&str, &[u64])],
    ) -> Result<Vec<Vec<Result<f32>>>> {
        for (q, ids) in requests {
            Self::check_query(q)?;
            if ids.len() > MAX_RERANK {
                return Err(Error::InvalidArgument(format!(
                    "at most {MAX_RERANK} images per rerank, got {}",
                    ids.len()
                )));
            }
        }
        let mut unique: Vec<u64> = Vec::new();
        let mut seen: HashSet<u64> = HashSet::new();
        for (_, ids) in requests {
            for id in *ids {
                if seen.insert(*id) {
                    unique.push(*id);
                }
            }
        }
        let texts: Vec<&str> = requests.iter().map(|r| r.0).collect();
        let (ids_t, mask) = self.retriever.tokenize(&texts)?;
        // Per (request, image): the probability or that image's error. Images go through in
        // chunks, so memory is bounded by the chunk, not by the number of ids.
        let mut prob: HashMap<(usize, u64), Result<f32>> = HashMap::new();
        for chunk in unique.chunks(IMAGE_CHUNK) {
            let states = self.vision_states(store, chunk);
            let mut row_of: HashMap<u64, u32> = HashMap::new();
            let mut ok = Vec::new();
            for (id, s) in chunk.iter().zip(states) {
                match s {
                    Ok(t) => {
                        row_of.insert(*id, ok.len() as u32);
                        ok.push(t);
                    }
                    Err(e) => {
                        for (ti, (_, ids)) in requests.iter().enumerate() {
                            if ids.contains(id) {
                                prob.insert((ti, *id), Err(e.clone()));
                            }
                        }
                    }
                }
            }
            let mut pairs = Vec::new();
            let mut keys = Vec::new();
            for (ti, (_, ids)) in requests.iter().enumerate() {
                for id in *ids {
                    if let Some(r) = row_of.get(id) {
                        if !keys.contains(&(ti, *id)) {
                            pairs.push((*r, ti as u32));
                            keys.push((ti, *id));
                        }
                    }
                }
            }
            if pairs.is_empty() {
                continue;
            }
            let vision = Tensor::stack(&ok, 0).map_err(terr)?;
            let logits = self
                .model()
                .itm_logits_pairs(&vision, &ids_t, &mask, &pairs)?;
            let p: Vec<f32> = Blip2::itm_probability(&logits)?.to_vec1().map_err(terr)?;
            for (k, v) in keys.into_iter().zip(p) {
                prob.insert(k, Ok(v));
            }
        }
        let mut out = Vec::with_capacity(requests.len());
        for (ti, (_, ids)) in requests.iter().enumerate() {
            out.push(
                ids.iter()
                    .map(|id| match prob.get(&(ti, *id)) {
                        Some(Ok(v)) => Ok(*v),
                        Some(Err(e)) => Err(e.clone()),
                        None => Err(Error::Internal("ITM pair lost".into())),
                    })
                    .collect(),
            );
        }
        Ok(out)
    }

    /// Scores the first `n` hits by ITM probability and puts them first, ordered by it; the
    /// rest keep their order. A hit whose image cannot be read gets `error` and sorts last
    /// among the reranked.
    pub fn rerank(&self, store: &Store, query: &str, hits: &mut [Hit], n: usize) -> Result<()> {
        let n = n.min(hits.len());
        if n == 0 {
            return Ok(());
        }
        let ids: Vec<u64> = hits[..n].iter().map(|h| h.image_id).collect();
        let scores = self
            .itm_many(store, &[(query, &ids)])?
            .pop()
            .unwrap_or_default();
        query::apply_itm(hits, n, &scores);
        Ok(())
    }

    fn captioner(&self) -> Result<&Captioner> {
        self.captioner.as_ref().ok_or_else(|| {
            Error::Unsupported(
                "no caption model is loaded; start the server with --caption-model \
                 (e.g. Salesforce/blip2-opt-2.7b)"
                    .into(),
            )
        })
    }

    /// Captions many sources at once (one model batch per distinct request). The plain caption
    /// (default request) of an indexed image is served from the store when it has one, and new
    /// ones are queued for [`Engine::flush_captions`]; every result is cached in memory.
    pub fn caption_many(
        &self,
        store: &Store,
        items: &[(CaptionSource, CaptionRequest)],
    ) -> Vec<Result<CaptionOutcome>> {
        let captioner = match self.captioner() {
            Ok(c) => c,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut out: Vec<Option<Result<CaptionOutcome>>> = (0..items.len()).map(|_| None).collect();
        // (request) → [(item index, content hash, bytes)]
        let mut groups: HashMap<&CaptionRequest, Vec<Pending>> = HashMap::new();
        for (i, (src, req)) in items.iter().enumerate() {
            if let Err(e) = captioner.generation_for(req) {
                out[i] = Some(Err(e));
                continue;
            }
            let (hash, bytes, stored) = match src {
                CaptionSource::ImageId(id) => {
                    let Some(row) = store.get(*id).filter(|r| !r.deleted) else {
                        out[i] = Some(Err(Error::NotFound(format!(
                            "image id {id} is not in the index"
                        ))));
                        continue;
                    };
                    (row.content_hash.clone(), None, row.caption.clone())
                }
                CaptionSource::Bytes(b) => (blake3::hash(b).to_hex().to_string(), Some(b), None),
            };
            let plain = *req == CaptionRequest::default();
            if plain {
                // The store keeps the text only: token ids are empty for these.
                if let Some(text) = stored {
                    out[i] = Some(Ok(CaptionOutcome {
                        generated: Generated {
                            token_ids: Vec::new(),
                            text,
                        },
                        cached: true,
                    }));
                    continue;
                }
            }
            if let Some(g) = lock(&self.caption_cache).get(&(hash.clone(), req.clone())) {
                // e.g. captioned by bytes first: an indexed image still gets its caption stored.
                if plain && matches!(src, CaptionSource::ImageId(_)) {
                    lock(&self.pending).insert(hash.clone(), g.text.clone());
                }
                out[i] = Some(Ok(CaptionOutcome {
                    generated: g.clone(),
                    cached: true,
                }));
                continue;
            }
            let bytes = match bytes {
                Some(b) => b.clone(),
                None => {
                    let row = match src {
                        CaptionSource::ImageId(id) => store.get(*id),
                        CaptionSource::Bytes(_) => None,
                    };
                    match row
                        .map(|r| images::read_verified(&r.paths, &r.content_hash, &self.objects))
                    {
                        Some(Ok(b)) => b,
                        Some(Err(e)) => {
                            out[i] = Some(Err(e));
                            continue;
                        }
                        None => {
                            out[i] = Some(Err(Error::NotFound("image vanished".into())));
                            continue;
                        }
                    }
                }
            };
            groups.entry(req).or_default().push((i, hash, bytes));
        }
        let chunks = groups.into_iter().flat_map(|(req, members)| {
            let mut members = members.into_iter().peekable();
            std::iter::from_fn(move || {
                members.peek()?;
                Some((
                    req,
                    members.by_ref().take(CAPTION_CHUNK).collect::<Vec<_>>(),
                ))
            })
        });
        for (req, members) in chunks {
            let mut imgs = Vec::new();
            let mut idx = Vec::new();
            for (i, hash, bytes) in members {
                match captioner.processor.load_bytes(
                    &bytes,
                    &format!("with content hash {}", &hash[..12.min(hash.len())]),
                ) {
                    Ok(img) => {
                        imgs.push(img);
                        idx.push((i, hash));
                    }
                    Err(e) => out[i] = Some(Err(e)),
                }
            }
            if imgs.is_empty() {
                continue;
            }
            let result = captioner
                .pixel_values(&imgs)
                .and_then(|px| captioner.generate(&px, req));
            match result {
                Ok(gens) => {
                    for ((i, hash), g) in idx.into_iter().zip(gens) {
                        lock(&self.caption_cache).put((hash.clone(), req.clone()), g.clone());
                        if *req == CaptionRequest::default()
                            && matches!(items[i].0, CaptionSource::ImageId(_))
                        {
                            lock(&self.pending).insert(hash, g.text.clone());
                        }
                        out[i] = Some(Ok(CaptionOutcome {
                            generated: g,
                            cached: false,
                        }));
                    }
                }
                Err(e) => {
                    for (i, _) in idx {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(Error::Internal("caption not computed".into()))))
            .collect()
    }

    /// Writes queued plain captions into the index so they survive a restart. Needs the index's
    /// writer lock: while an ingest holds it, nothing is written and the captions stay queued
    /// (returns 0). Returns how many were written. Without [`EngineOptions::persist_captions`]
    /// nothing is written: the captions stay queued, in memory, and answer later requests.
    pub fn flush_captions(&self) -> Result<usize> {
        if !self.persist_captions {
            return Ok(0);
        }
        let pending: Vec<(String, String)> = lock(&self.pending)
            .iter()
            .map(|(h, c)| (h.clone(), c.clone()))
            .collect();
        if pending.is_empty() {
            return Ok(0);
        }
        // An ingest may hold the writer lock: wait a little (it commits in seconds), else keep
        // the captions queued for the next flush. Never creates an index: one deleted under a
        // running server stays deleted, and the captions stay queued.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut writer = loop {
            match Store::open_writable(&self.index) {
                Ok(w) => break w,
                Err(Error::Locked { .. }) => {
                    if std::time::Instant::now() >= deadline {
                        tracing::info!(
                            "index is being written; {} captions stay queued",
                            pending.len()
                        );
                        return Ok(0);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        };
        if writer.model_fingerprint() != self.fingerprint {
            return Err(Error::ModelMismatch {
                dir: self.index.clone(),
                stored: writer.model_fingerprint().to_string(),
                requested: self.fingerprint.clone(),
            });
        }
        let mut batch = Batch::new();
        let mut written = Vec::new();
        for (hash, caption) in &pending {
            if let Some(row) = writer.by_content_hash(hash) {
                if row.caption.is_none() {
                    batch.set_caption(row.image_id, Some(caption.clone()));
                }
            }
            written.push(hash.clone());
        }
        let n = batch.len();
        if !batch.is_empty() {
            writer.commit(batch)?;
        }
        drop(writer);
        {
            let mut p = lock(&self.pending);
            for h in written {
                p.remove(&h);
            }
        }
        self.refresh()?;
        Ok(n)
    }

    /// What the current snapshot's photos hold (cameras, dates, locations).
    pub fn facets(&self) -> Result<filter::Facets> {
        filter::facets(&self.store())
    }

    pub fn stats(&self) -> Stats {
        let store = self.store();
        Stats {
            images: store.len(),
            dead_rows: store.total_rows().saturating_sub(store.len()),
            generation: store.generation(),
            model: self.retriever.files.name.clone(),
            model_fingerprint: self.fingerprint.clone(),
            caption_model: self.captioner.as_ref().map(|c| c.files.name.clone()),
            captions_stored: store.iter().filter(|r| r.caption.is_some()).count(),
            captions_pending: lock(&self.pending).len(),
            index_bytes: dir_bytes(&self.index),
            hnsw_points: store.ann_info().points,
            vision_cache_entries: lock(&self.vision_lru).cache.len(),
        }
    }
}

/// Browsing without a query: the page of every live image the filters keep, in `p.sort`'s
/// date order (undated last, then by id), each with score 0. One scan of the snapshot's
/// metadata table, as a filtered search's.
pub fn browse(store: &Store, p: &SearchParams) -> Result<Vec<(u64, f32)>> {
    check_browse(p)?;
    Ok(p.rank_matching(p.matching(store)?, |_| Some(0.0)))
}

/// The rules of [`browse`]: valid parameters, a date order, no `min_score`.
pub(crate) fn check_browse(p: &SearchParams) -> Result<()> {
    p.validate()?;
    if p.sort == SortBy::Score {
        return Err(Error::InvalidArgument(
            "browsing without a query needs a date order: sort by date_desc or date_asc, or \
             send a query"
                .into(),
        ));
    }
    if p.min_score.is_some() {
        return Err(Error::InvalidArgument(
            "min_score needs a query to score against; leave it out when browsing".into(),
        ));
    }
    Ok(())
}

/// Text → (image id, ITC score) for the page `p` asks for: EXIF filters first (scoring every
/// matching photo exactly when few match), else the ANN ranking (or an exact scan), filtered.
/// What [`Engine::search_text`] turns into hits; usable on a bare [`Store`] (benchmarks).
pub fn rank_text(store: &Store, t: &[f32], p: &SearchParams) -> Result<Vec<(u64, f32)>> {
    p.validate()?;

    let mut allowed = None;
    if p.scans_metadata() {
        let matching = p.matching(store)?;
        if p.exact || p.sort != SortBy::Score || matching.len() <= EXACT_TEXT_MATCHES {
            let ranked = p.rank_matching(matching, |id| store.itc_score(id, t));
            return Ok(ranked);
        }
        // Many photos pass: the ANN ranking, filtered (and scanned if it falls short).
        allowed = Some(matching.into_iter().map(|m| m.0).collect::<HashSet<u64>>());
    }
    let allowed = allowed.as_ref();
    let keeps =
        |id: u64, score: f32| p.keeps(store, id, score) && allowed.is_none_or(|a| a.contains(&id));
    let filtered = p.filtered() || allowed.is_some();
    let need = p.offset + p.top_k;
    let scored = if p.exact {
        let all = store.search_exact(t, if filtered { store.len() } else { need })?;
        all.into_iter()
            .filter(|h| keeps(h.image_id, h.score))
            .take(need)
            .map(|h| (h.image_id, h.score))
            .collect()
    } else {
        let fetch = if filtered {
            ((need * 4).max(100) * sparsity(store, allowed)).min(store.len().max(1))
        } else {
            need
        };
        // Each image has several graph points: ask for enough points to cover `fetch`
        // distinct images.
        let per_image = store.hnsw_params().vectors_per_image.max(1);
        let raw = store.search_ann(t, fetch, p.ef.max(fetch.saturating_mul(per_image)))?;
        if raw.len() < fetch.min(store.len()) {
            // The graph yielded too few live images (e.g. many deleted rows): scan.
            let exact = SearchParams {
                exact: true,
                ..p.clone()
            };
            return rank_text(store, t, &exact);
        }
        let maybe_more = raw.len() == fetch && raw.len() < store.len();
        let last = raw.last().map(|h| h.score);
        let kept: Vec<(u64, f32)> = raw
            .into_iter()
            .filter(|h| keeps(h.image_id, h.score))
            .map(|h| (h.image_id, h.score))
            .collect();
        let short = kept.len() < need
            && maybe_more
            && (p.path_prefix.is_some()
                || allowed.is_some()
                || p.min_score.is_none_or(|m| last >= Some(m)));
        if short {
            // The filter threw away too much of the graph's candidates: scan everything.
            let exact = SearchParams {
                exact: true,
                ..p.clone()
            };
            return rank_text(store, t, &exact);
        }
        kept.into_iter().take(need).collect::<Vec<_>>()
    };
    Ok(scored.into_iter().skip(p.offset).collect())
}

/// Image embeddings (Q×E) → (image id, similarity) for the page `p` asks for; what
/// [`Engine::search_image`] turns into hits.
pub fn rank_image(store: &Store, embeds: &[f32], p: &SearchParams) -> Result<Vec<(u64, f32)>> {
    p.validate()?;
    let (q, e) = (store.num_query(), store.dim());
    if embeds.len() != q * e {
        return Err(Error::InvalidArgument(format!(
            "an image query must be {q}x{e} values, got {}",
            embeds.len()
        )));
    }
    let mut allowed = None;
    if p.scans_metadata() {
        let matching = p.matching(store)?;
        if p.exact || p.sort != SortBy::Score || matching.len() <= EXACT_IMAGE_MATCHES {
            let ranked = p.rank_matching(matching, |id| {
                Some(image_similarity(embeds, &store.embeds(id)?, e))
            });
            return Ok(ranked);
        }
        allowed = Some(matching.into_iter().map(|m| m.0).collect::<HashSet<u64>>());
    }
    let filtered = p.filtered() || allowed.is_some();
    let need = p.offset + p.top_k;
    let candidates: Vec<u64> = if p.exact {
        store.iter().map(|r| r.image_id).collect()
    } else {
        // Filters are applied to the candidates; ask for more of them when filtering.
        let fetch = if filtered {
            (need * 4).max(100) * sparsity(store, allowed.as_ref())
        } else {
            need
        }
        .min(store.len().max(1));
        let per_image = store.hnsw_params().vectors_per_image.max(1);
        let mut set = HashSet::new();
        for v in embeds.chunks_exact(e) {
            for h in store.search_ann(v, fetch, p.ef.max(fetch.saturating_mul(per_image)))? {
                set.insert(h.image_id);
            }
        }
        set.into_iter().collect()
    };
    let searched = candidates.len();
    let mut scored: Vec<(u64, f32)> = candidates
        .into_iter()
        .filter(|id| allowed.as_ref().is_none_or(|a| a.contains(id)))
        .filter_map(|id| {
            let c = store.embeds(id)?;
            let s = image_similarity(embeds, &c, e);
            p.keeps(store, id, s).then_some((id, s))
        })
        .collect();
    if allowed.is_some() && scored.len() < need && searched < store.len() {
        // The metadata filter threw away too many of the graph's candidates: score every
        // matching photo.
        let exact = SearchParams {
            exact: true,
            ..p.clone()
        };
        return rank_image(store, embeds, &exact);
    }
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(need);
    Ok(scored.into_iter().skip(p.offset).collect())
}

/// How many times more ANN candidates a filter that keeps only `allowed` of the images needs
/// to leave as many hits as an unfiltered search.
fn sparsity(store: &Store, allowed: Option<&HashSet<u64>>) -> usize {
    allowed.map_or(1, |a| store.len().div_ceil(a.len().max(1)).max(1))
}

/// An image waiting for a caption: (item index, content hash, encoded bytes).
type Pending = (usize, String, Vec<u8>);

fn dir_bytes(dir: &Path) -> u64 {
    fn walk(p: &Path, total: &mut u64, depth: usize) {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() && depth < 3 => walk(&e.path(), total, depth + 1),
                Ok(m) if m.is_file() => *total += m.len(),
                _ => {}
            }
        }
    }
    let mut total = 0;
    walk(dir, &mut total, 0);
    total
}
