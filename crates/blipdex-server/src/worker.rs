//! The model threads: one loads the engine, then serves the `search` lane; with a caption
//! model a second thread serves the `caption` lane (Caption requests and `with_captions`
//! searches), so slow caption generation never holds up plain searches. Each lane is a bounded
//! queue served in dynamic batches, off the async runtime.
//!
//! Each turn takes the first queued job, then whatever else arrives within `batch_wait` (up to
//! `max_batch` jobs), and runs
//! - every text that needs an embedding (SearchText queries, Rerank queries) in ONE
//!   `Engine::embed_texts` call,
//! - every SearchImage image in `Engine::embed_images` calls of up to 16 images,
//! - every ITM pair (SearchText reranks and Rerank requests) in ONE `Engine::itm_many` call,
//! - every caption (Caption requests and `with_captions` hits) in ONE `Engine::caption_many`
//!   call (which batches per distinct generation request).
//!
//! A failing batch is retried item by item so one bad input fails only its own request.
//! Replies go back through oneshot channels; a panic in the engine fails the turn's requests
//! with INTERNAL and the thread keeps serving.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blipdex_core::Error;
use blipdex_model::CaptionRequest;
use blipdex_search::{CaptionOutcome, CaptionSource, Engine, Hit, SearchParams};
use blipdex_store::Store;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use tokio::sync::oneshot;
use tonic::Status;

use crate::metrics::Metrics;
use crate::status_from;

/// Most images one vision-tower forward pass takes (memory bound for big checkpoints).
const IMAGE_CHUNK: usize = 16;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, Status>>;

/// Hits and the index generation they come from.
#[derive(Debug)]
pub(crate) struct Found {
    pub hits: Vec<Hit>,
    pub generation: u64,
}

/// One queued request. Inputs are validated by the handler before they are queued.
pub(crate) enum Job {
    SearchText {
        query: String,
        params: SearchParams,
        rerank_top_n: usize,
        with_captions: bool,
        reply: Reply<Found>,
    },
    SearchImage {
        image: Vec<u8>,
        params: SearchParams,
        with_captions: bool,
        reply: Reply<Found>,
    },
    Rerank {
        query: String,
        ids: Vec<u64>,
        with_captions: bool,
        reply: Reply<Found>,
    },
    Caption {
        source: CaptionSource,
        request: CaptionRequest,
        reply: Reply<CaptionOutcome>,
    },
}

impl Job {
    fn fail(self, status: Status) {
        match self {
            Job::SearchText { reply, .. }
            | Job::SearchImage { reply, .. }
            | Job::Rerank { reply, .. } => {
                let _ = reply.send(Err(status));
            }
            Job::Caption { reply, .. } => {
                let _ = reply.send(Err(status));
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub max_batch: usize,
    pub batch_wait: Duration,
}

/// Which queue and model thread a job goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    Search,
    Caption,
}

impl Lane {
    pub fn name(self) -> &'static str {
        match self {
            Lane::Search => "search",
            Lane::Caption => "caption",
        }
    }
}

/// The senders of both lanes.
pub(crate) struct Queues {
    pub search: crossbeam_channel::Sender<Job>,
    pub caption: crossbeam_channel::Sender<Job>,
}

impl Queues {
    pub fn lane(&self, lane: Lane) -> &crossbeam_channel::Sender<Job> {
        match lane {
            Lane::Search => &self.search,
            Lane::Caption => &self.caption,
        }
    }
}

/// Serves one lane's jobs until every sender is dropped.
pub(crate) fn run(
    engine: &Engine,
    rx: &Receiver<Job>,
    lane: Lane,
    limits: BatchLimits,
    metrics: &Metrics,
) {
    let max_batch = limits.max_batch.max(1);
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + limits.batch_wait;
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => {
                    jobs.push(j);
                    continue;
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => break,
                Err(crossbeam_channel::TryRecvError::Empty) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(j) => jobs.push(j),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics
            .queue_depth
            .with_label_values(&[lane.name()])
            .set(rx.len() as i64);
        metrics.batch_jobs.observe(jobs.len() as f64);
        let start = Instant::now();
        // Only this turn's jobs are lost to a panic: their reply senders are dropped, so
        // their handlers answer INTERNAL.
        let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            process(engine, jobs, metrics);
        }));
        if turn.is_err() {
            tracing::error!("the model panicked; the affected requests failed with INTERNAL");
        }
        metrics.batch_seconds.observe(start.elapsed().as_secs_f64());
    }
    tracing::debug!(lane = lane.name(), "model thread: queue closed");
}

/// Per-request state while a turn is processed.
struct Work {
    job: Job,
    /// Index into the text batch (SearchText, Rerank).
    text: Option<usize>,
    /// Index into the image batch (SearchImage).
    image: Option<usize>,
    hits: Vec<Hit>,
    /// How many of the first hits to score by ITM (all of them for Rerank).
    itm_n: usize,
    error: Option<Status>,
}

fn process(engine: &Engine, jobs: Vec<Job>, metrics: &Metrics) {
    let store = engine.store();
    let mut work: Vec<Work> = jobs
        .into_iter()
        .map(|job| Work {
            job,
            text: None,
            image: None,
            hits: Vec::new(),
            itm_n: 0,
            error: None,
        })
        .collect();

    // 1. Text embeddings, one batch.
    let mut texts: Vec<&str> = Vec::new();
    let mut text_owner: Vec<usize> = Vec::new();
    for (i, w) in work.iter().enumerate() {
        if let Job::SearchText { query, .. } | Job::Rerank { query, .. } = &w.job {
            texts.push(query);
            text_owner.push(i);
        }
    }
    let text_embeds = if texts.is_empty() {
        Vec::new()
    } else {
        metrics
            .batch_items
            .with_label_values(&["text"])
            .observe(texts.len() as f64);
        batch_or_each(&texts, |t| engine.embed_texts(t))
    };
    // 2. Image embeddings, one batch.
    let mut images: Vec<&[u8]> = Vec::new();
    let mut image_owner: Vec<usize> = Vec::new();
    for (i, w) in work.iter().enumerate() {
        if let Job::SearchImage { image, .. } = &w.job {
            images.push(image);
            image_owner.push(i);
        }
    }
    let image_embeds = if images.is_empty() {
        Vec::new()
    } else {
        metrics
            .batch_items
            .with_label_values(&["image"])
            .observe(images.len() as f64);
        // Vision-tower activations grow with the batch: bound them.
        images
            .chunks(IMAGE_CHUNK)
            .flat_map(|chunk| batch_or_each(chunk, |t| engine.embed_images(t)))
            .collect()
    };
    for (k, i) in text_owner.iter().enumerate() {
        work[*i].text = Some(k);
    }
    for (k, i) in image_owner.iter().enumerate() {
        work[*i].image = Some(k);
    }

    // 3. Search (cheap: the store snapshot is in memory).
    for w in &mut work {
        let result = match &w.job {
            Job::SearchText {
                params,
                rerank_top_n,
                ..
            } => w.text.and_then(|k| text_embeds.get(k)).map(|e| match e {
                Ok(t) => {
                    // Rerank the first N of the whole ranking, then cut the page, so pages
                    // neither overlap nor skip items.
                    let mut p = params.clone();
                    if *rerank_top_n > 0 {
                        p.top_k = (p.offset + p.top_k).max(*rerank_top_n);
                        p.offset = 0;
                    }
                    w.itm_n = *rerank_top_n;
                    engine
                        .search_text(&store, t, &p)
                        .map_err(|e| status_from(&e))
                }
                Err(s) => Err(s.clone()),
            }),
            Job::SearchImage { params, .. } => {
                w.image.and_then(|k| image_embeds.get(k)).map(|e| match e {
                    Ok(v) => engine
                        .search_image(&store, v, params)
                        .map_err(|e| status_from(&e)),
                    Err(s) => Err(s.clone()),
                })
            }
            Job::Rerank { ids, .. } => Some(
                engine
                    .hits_for_ids(&store, ids)
                    .map_err(|e| status_from(&e))
                    .and_then(|mut hits| {
                        let k = w.text.ok_or_else(|| Status::internal("rerank text lost"))?;
                        let t = text_embeds
                            .get(k)
                            .ok_or_else(|| Status::internal("rerank text lost"))?
                            .as_ref()
                            .map_err(Clone::clone)?;
                        for h in &mut hits {
                            h.itc_score = itc(&store, h.image_id, t);
                        }
                        w.itm_n = hits.len();
                        Ok(hits)
                    }),
            ),
            Job::Caption { .. } => None,
        };
        match result {
            Some(Ok(hits)) => w.hits = hits,
            Some(Err(s)) => w.error = Some(s),
            None if matches!(w.job, Job::Caption { .. }) => {}
            None => w.error = Some(Status::internal("embedding lost")),
        }
        w.itm_n = w.itm_n.min(w.hits.len());
    }

    // 4. ITM, one batch over every request.
    let mut itm_requests: Vec<(&str, Vec<u64>)> = Vec::new();
    let mut itm_owner: Vec<usize> = Vec::new();
    for (i, w) in work.iter().enumerate() {
        if w.error.is_some() || w.itm_n == 0 {
            continue;
        }
        if let Job::SearchText { query, .. } | Job::Rerank { query, .. } = &w.job {
            itm_requests.push((
                query,
                w.hits[..w.itm_n].iter().map(|h| h.image_id).collect(),
            ));
            itm_owner.push(i);
        }
    }
    if !itm_requests.is_empty() {
        let pairs: usize = itm_requests.iter().map(|r| r.1.len()).sum();
        metrics
            .batch_items
            .with_label_values(&["itm_pairs"])
            .observe(pairs as f64);
        let reqs: Vec<(&str, &[u64])> = itm_requests
            .iter()
            .map(|(q, ids)| (*q, ids.as_slice()))
            .collect();
        let scores = batch_or_each(&reqs, |r| engine.itm_many(&store, r));
        for (k, i) in itm_owner.into_iter().enumerate() {
            let w = &mut work[i];
            match scores.get(k) {
                Some(Ok(row)) => apply_itm(&mut w.hits, w.itm_n, row),
                Some(Err(s)) => w.error = Some(s.clone()),
                None => w.error = Some(Status::internal("ITM scores lost")),
            }
        }
    }

    // The page of reranked text searches (searched from the top above).
    for w in &mut work {
        if let Job::SearchText {
            params,
            rerank_top_n,
            ..
        } = &w.job
        {
            if *rerank_top_n > 0 {
                let page: Vec<Hit> = w
                    .hits
                    .drain(..)
                    .skip(params.offset)
                    .take(params.top_k)
                    .collect();
                w.hits = page;
            }
        }
    }

    // 5. Captions, one call: Caption requests and hits of `with_captions` searches.
    let mut items: Vec<(CaptionSource, CaptionRequest)> = Vec::new();
    // (work index, Some(hit index) for a hit, None for a Caption request)
    let mut item_owner: Vec<(usize, Option<usize>)> = Vec::new();
    for (i, w) in work.iter_mut().enumerate() {
        if w.error.is_some() {
            continue;
        }
        match &mut w.job {
            Job::Caption {
                source, request, ..
            } => {
                let source = std::mem::replace(source, CaptionSource::ImageId(0));
                items.push((source, request.clone()));
                item_owner.push((i, None));
            }
            Job::SearchText { with_captions, .. }
            | Job::SearchImage { with_captions, .. }
            | Job::Rerank { with_captions, .. }
                if *with_captions =>
            {
                if !engine.has_captioner() {
                    w.error = Some(status_from(&Error::Unsupported(
                        "with_captions needs a caption model; start the server with \
                         --caption-model (e.g. Salesforce/blip2-opt-2.7b) or leave \
                         with_captions off"
                            .into(),
                    )));
                    continue;
                }
                if let Job::SearchText { params, .. } = &w.job {
                    // Only the hits that will be returned.
                    w.hits.truncate(params.top_k);
                }
                if w.hits.len() > blipdex_search::MAX_CAPTIONED_HITS {
                    w.error = Some(status_from(&Error::InvalidArgument(format!(
                        "with_captions allows at most {} hits per search, got {}; lower top_k",
                        blipdex_search::MAX_CAPTIONED_HITS,
                        w.hits.len()
                    ))));
                    continue;
                }
                for (h, hit) in w.hits.iter().enumerate() {
                    if hit.caption.is_none() {
                        items.push((
                            CaptionSource::ImageId(hit.image_id),
                            CaptionRequest::default(),
                        ));
                        item_owner.push((i, Some(h)));
                    }
                }
            }
            _ => {}
        }
    }
    let mut caption_of: Vec<Option<Result<CaptionOutcome, Status>>> =
        (0..work.len()).map(|_| None).collect();
    if !items.is_empty() {
        metrics
            .batch_items
            .with_label_values(&["caption"])
            .observe(items.len() as f64);
        let results = engine.caption_many(&store, &items);
        for (r, (i, hit)) in results.into_iter().zip(item_owner) {
            match hit {
                Some(h) => {
                    if let Some(hit) = work[i].hits.get_mut(h) {
                        match r {
                            Ok(c) => hit.caption = Some(c.generated.text),
                            Err(e) => {
                                hit.error.get_or_insert_with(|| e.to_string());
                            }
                        }
                    }
                }
                None => caption_of[i] = Some(r.map_err(|e| status_from(&e))),
            }
        }
    }

    // 6. Replies.
    let generation = store.generation();
    for (i, w) in work.into_iter().enumerate() {
        let Work {
            job, hits, error, ..
        } = w;
        if let Some(s) = error {
            job.fail(s);
            continue;
        }
        match job {
            Job::SearchText { params, reply, .. } => {
                let mut hits = hits;
                hits.truncate(params.top_k);
                let _ = reply.send(Ok(Found { hits, generation }));
            }
            Job::SearchImage { reply, .. } | Job::Rerank { reply, .. } => {
                let _ = reply.send(Ok(Found { hits, generation }));
            }
            Job::Caption { reply, .. } => {
                let r = caption_of[i]
                    .take()
                    .unwrap_or_else(|| Err(Status::internal("caption not computed")));
                let _ = reply.send(r);
            }
        }
    }
}

/// Runs `f` on all of `inputs` at once; when the batch fails as a whole (one bad input fails
/// the engine's batch call), runs each input alone so only the bad one gets the error.
fn batch_or_each<I: Copy, O>(
    inputs: &[I],
    f: impl Fn(&[I]) -> blipdex_core::Result<Vec<O>>,
) -> Vec<Result<O, Status>> {
    match f(inputs) {
        Ok(out) if out.len() == inputs.len() => out.into_iter().map(Ok).collect(),
        Ok(_) => inputs
            .iter()
            .map(|_| Err(Status::internal("the engine returned a short batch")))
            .collect(),
        Err(_) if inputs.len() > 1 => inputs
            .iter()
            .map(|one| match f(std::slice::from_ref(one)) {
                Ok(mut v) if v.len() == 1 => v.pop().ok_or_else(|| Status::internal("lost")),
                Ok(_) => Err(Status::internal("the engine returned a short batch")),
                Err(e) => Err(status_from(&e)),
            })
            .collect(),
        Err(e) => vec![Err(status_from(&e))],
    }
}

/// ITC score of an indexed image for a text embedding: the max over its query vectors of the
/// cosine (all vectors are unit length), as `Engine::search_text` scores.
fn itc(store: &Store, id: u64, t: &[f32]) -> f32 {
    let Some(e) = store.embeds(id) else {
        return 0.0;
    };
    if t.is_empty() {
        return 0.0;
    }
    e.chunks_exact(t.len())
        .map(|q| q.iter().zip(t).map(|(a, b)| a * b).sum::<f32>())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Puts ITM scores on the first `n` hits and orders those by them (as `Engine::rerank`):
/// hits whose image could not be scored get `error` and sort last among the reranked.
fn apply_itm(hits: &mut [Hit], n: usize, scores: &[blipdex_core::Result<f32>]) {
    let n = n.min(hits.len());
    for (h, s) in hits[..n].iter_mut().zip(scores) {
        match s {
            Ok(p) => h.itm_score = Some(*p),
            Err(e) => h.error = Some(e.to_string()),
        }
    }
    hits[..n].sort_by(|a, b| {
        b.itm_score
            .unwrap_or(f32::NEG_INFINITY)
            .total_cmp(&a.itm_score.unwrap_or(f32::NEG_INFINITY))
    });
}

/// Distinct image ids, in order (duplicates in a Rerank request are scored once each).
pub(crate) fn dedup_ids(ids: &[u64]) -> Vec<u64> {
    let mut seen = HashSet::new();
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

/// Where loading the engine ends up.
pub(crate) type Loaded = Result<Arc<Engine>, String>;
