//! What a query means, for every front end alike (`blipdex search`, the gRPC server, tests):
//! text → ITC ranking → ITM rerank of the first N of the whole ranking → the page → captions of
//! the page's hits. [`Engine::answer`] runs a batch of queries the way a model wants them
//! (every text embedded in one call, images in chunks, every ITM pair in one Q-Former batch,
//! every caption in one call), so the server only queues requests and converts messages.

use std::collections::HashSet;

use blipdex_core::{Error, Result};
use blipdex_model::CaptionRequest;

use crate::{CaptionOutcome, CaptionSource, Engine, Hit, SearchParams, SortBy};
use crate::{MAX_CAPTIONED_HITS, MAX_QUERY_BYTES, MAX_RERANK, MAX_RESULTS};

/// Most images one vision-tower forward pass takes for image queries (bounds activations).
pub const IMAGE_CHUNK: usize = 16;
/// Most new tokens one caption request may ask for.
pub const MAX_NEW_TOKENS: usize = 512;
/// Most beams one caption request may ask for.
pub const MAX_BEAMS: usize = 16;

/// One question for the engine.
#[derive(Debug, Clone)]
pub enum Query {
    /// Images for a text, by ITC (max over each image's query vectors of the cosine). With
    /// `rerank_top_n`, the first N of the whole ranking are reordered by ITM match probability
    /// before the page (`params.offset`, `params.top_k`) is cut, so pages neither overlap nor
    /// skip items.
    Text {
        text: String,
        params: SearchParams,
        rerank_top_n: usize,
        with_captions: bool,
    },
    /// Browsing: every live image the filters keep, in the date order `params.sort` names (a
    /// text search's blank query with a date order, see [`Query::text`]). Unscored: scores
    /// are 0, and `min_score` is refused.
    Browse {
        params: SearchParams,
        with_captions: bool,
    },
    /// Images like an image (encoded bytes).
    Image {
        image: Vec<u8>,
        params: SearchParams,
        with_captions: bool,
    },
    /// Images like an indexed image ("more like this"), by its stored embeddings: its file
    /// is not read, so this works while the photo is offline.
    Similar {
        image_id: u64,
        params: SearchParams,
        with_captions: bool,
    },
    /// ITM match probabilities of a text against chosen images (distinct ids, in order).
    Rerank {
        text: String,
        ids: Vec<u64>,
        with_captions: bool,
    },
    /// One caption.
    Caption {
        source: CaptionSource,
        request: CaptionRequest,
    },
}

/// What a [`Query`] gets back.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Ranked hits and the index generation they come from.
    Hits {
        hits: Vec<Hit>,
        generation: u64,
    },
    Caption(CaptionOutcome),
}

/// How many items each model stage of one [`Engine::answer`] call ran (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchSizes {
    pub texts: usize,
    pub images: usize,
    pub itm_pairs: usize,
    pub captions: usize,
}

impl Query {
    /// What a text search request means: [`Query::Text`], or [`Query::Browse`] for a blank
    /// text sorted by date without reranking (a blank text otherwise stays a `Text` query,
    /// which [`Query::validate`] refuses with what to send).
    pub fn text(
        text: String,
        params: SearchParams,
        rerank_top_n: usize,
        with_captions: bool,
    ) -> Query {
        if text.trim().is_empty() && params.sort != SortBy::Score && rerank_top_n == 0 {
            Query::Browse {
                params,
                with_captions,
            }
        } else {
            Query::Text {
                text,
                params,
                rerank_top_n,
                with_captions,
            }
        }
    }

    /// Whether answering generates captions (slow: the server queues such queries apart).
    pub fn generates_captions(&self) -> bool {
        match self {
            Query::Text { with_captions, .. }
            | Query::Browse { with_captions, .. }
            | Query::Image { with_captions, .. }
            | Query::Similar { with_captions, .. }
            | Query::Rerank { with_captions, .. } => *with_captions,
            Query::Caption { .. } => true,
        }
    }

    /// The rules a query must meet before it is queued: limits, non-empty inputs, and a
    /// caption model where captions are asked for.
    pub fn validate(&self, has_captioner: bool) -> Result<()> {
        if self.generates_captions() && !has_captioner {
            return Err(Error::Unsupported(
                "no caption model is loaded; start the server with --caption-model (e.g. \
                 Salesforce/blip2-opt-2.7b) or leave captions off"
                    .into(),
            ));
        }
        match self {
            Query::Text {
                text,
                params,
                rerank_top_n,
                with_captions,
            } => {
                Engine::check_query(text)?;
                params.validate()?;
                if *rerank_top_n > MAX_RERANK {
                    return Err(Error::InvalidArgument(format!(
                        "rerank_top_n is {rerank_top_n}; at most {MAX_RERANK}"
                    )));
                }
                if params.offset + params.top_k.max(*rerank_top_n) > MAX_RESULTS {
                    return Err(Error::InvalidArgument(format!(
                        "offset + max(top_k, rerank_top_n) must be at most {MAX_RESULTS}"
                    )));
                }
                check_captioned(*with_captions, params.top_k)
            }
            Query::Browse {
                params,
                with_captions,
            } => {
                crate::check_browse(params)?;
                check_captioned(*with_captions, params.top_k)
            }
            Query::Image {
                image,
                params,
                with_captions,
            } => {
                check_image(image)?;
                params.validate()?;
                check_captioned(*with_captions, params.top_k)
            }
            Query::Similar {
                params,
                with_captions,
                ..
            } => {
                params.validate()?;
                check_captioned(*with_captions, params.top_k)
            }
            Query::Rerank {
                text,
                ids,
                with_captions,
            } => {
                Engine::check_query(text)?;
                if ids.is_empty() {
                    return Err(Error::InvalidArgument(
                        "image_ids is empty; send the ids (Hit.image_id) of the images to score"
                            .into(),
                    ));
                }
                if ids.len() > MAX_RERANK {
                    return Err(Error::InvalidArgument(format!(
                        "{} image ids; at most {MAX_RERANK} per request, split the request",
                        ids.len()
                    )));
                }
                check_captioned(*with_captions, ids.len())
            }
            Query::Caption { source, request } => {
                if let CaptionSource::Bytes(b) = source {
                    check_image(b)?;
                }
                check_caption_request(request)
            }
        }
    }
}

fn check_image(image: &[u8]) -> Result<()> {
    if image.is_empty() {
        return Err(Error::InvalidArgument(
            "image is empty; send the encoded bytes of a JPEG, PNG, GIF, WebP, BMP or TIFF file"
                .into(),
        ));
    }
    Ok(())
}

fn check_captioned(with_captions: bool, hits: usize) -> Result<()> {
    if with_captions && hits > MAX_CAPTIONED_HITS {
        return Err(Error::InvalidArgument(format!(
            "captions are generated for at most {MAX_CAPTIONED_HITS} hits per search, got \
             {hits}; lower top_k"
        )));
    }
    Ok(())
}

fn check_caption_request(r: &CaptionRequest) -> Result<()> {
    if r.prompt.len() > MAX_QUERY_BYTES {
        return Err(Error::InvalidArgument(format!(
            "prompt is {} bytes; at most {MAX_QUERY_BYTES}",
            r.prompt.len()
        )));
    }
    if let Some(n) = r.max_new_tokens {
        if n == 0 || n > MAX_NEW_TOKENS {
            return Err(Error::InvalidArgument(format!(
                "max_new_tokens is {n}; use 1 to {MAX_NEW_TOKENS}"
            )));
        }
    }
    if let Some(n) = r.num_beams {
        if n == 0 || n > MAX_BEAMS {
            return Err(Error::InvalidArgument(format!(
                "num_beams is {n}; use 1 to {MAX_BEAMS}"
            )));
        }
    }
    if let (Some(min), Some(max)) = (r.min_new_tokens, r.max_new_tokens) {
        if min > max {
            return Err(Error::InvalidArgument(format!(
                "min_new_tokens ({min}) is over max_new_tokens ({max})"
            )));
        }
    }
    if r.min_new_tokens.is_some_and(|n| n > MAX_NEW_TOKENS) {
        return Err(Error::InvalidArgument(format!(
            "min_new_tokens must be at most {MAX_NEW_TOKENS}"
        )));
    }
    Ok(())
}

/// Distinct image ids, in order (a Rerank scores each image once).
pub fn dedup_ids(ids: &[u64]) -> Vec<u64> {
    let mut seen = HashSet::new();
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

/// Per-query state while a batch is answered.
struct Work {
    query: Query,
    /// Index into the text batch (Text, Rerank).
    text: Option<usize>,
    /// Index into the image batch (Image).
    image: Option<usize>,
    hits: Vec<Hit>,
    /// How many of the first hits to score by ITM (all of them for Rerank).
    itm_n: usize,
    caption: Option<Result<CaptionOutcome>>,
    error: Option<Error>,
}

impl Engine {
    /// Answers one query (see [`Engine::answer`]).
    pub fn answer_one(&self, query: Query) -> Result<Answer> {
        self.answer(vec![query])
            .0
            .pop()
            .unwrap_or_else(|| Err(Error::Internal("no answer".into())))
    }

    /// Answers a batch of validated queries against one snapshot of the index, an answer per
    /// query in order. A model call that fails for the batch is retried query by query, so
    /// one bad input fails only its own query.
    pub fn answer(&self, queries: Vec<Query>) -> (Vec<Result<Answer>>, BatchSizes) {
        let store = self.store();
        let mut sizes = BatchSizes::default();
        let mut work: Vec<Work> = queries
            .into_iter()
            .map(|query| Work {
                query,
                text: None,
                image: None,
                hits: Vec::new(),
                itm_n: 0,
                caption: None,
                error: None,
            })
            .collect();

        // 1. Text embeddings, one batch.
        let mut texts: Vec<&str> = Vec::new();
        let mut text_owner = Vec::new();
        for (i, w) in work.iter().enumerate() {
            if let Query::Text { text, .. } | Query::Rerank { text, .. } = &w.query {
                texts.push(text);
                text_owner.push(i);
            }
        }
        sizes.texts = texts.len();
        let text_embeds = if texts.is_empty() {
            Vec::new()
        } else {
            batch_or_each(&texts, |t| self.embed_texts(t))
        };
        // 2. Image embeddings, in chunks.
        let mut images: Vec<&[u8]> = Vec::new();
        let mut image_owner = Vec::new();
        for (i, w) in work.iter().enumerate() {
            if let Query::Image { image, .. } = &w.query {
                images.push(image);
                image_owner.push(i);
            }
        }
        sizes.images = images.len();
        let image_embeds: Vec<Result<Vec<f32>>> = images
            .chunks(IMAGE_CHUNK)
            .flat_map(|chunk| batch_or_each(chunk, |t| self.embed_images(t)))
            .collect();
        for (k, i) in text_owner.into_iter().enumerate() {
            work[i].text = Some(k);
        }
        for (k, i) in image_owner.into_iter().enumerate() {
            work[i].image = Some(k);
        }

        // 3. The rankings (cheap: the store snapshot is in memory).
        for w in &mut work {
            let lost = || Error::Internal("embedding lost".into());
            let embedding = |batch: &[Result<Vec<f32>>], k: Option<usize>| {
                k.and_then(|k| batch.get(k).cloned())
                    .unwrap_or_else(|| Err(lost()))
            };
            let ranked = match &w.query {
                Query::Text {
                    params,
                    rerank_top_n,
                    ..
                } => embedding(&text_embeds, w.text).and_then(|t| {
                    // Reranking: the first N of the whole ranking, the page cut afterwards.
                    let mut p = params.clone();
                    if *rerank_top_n > 0 {
                        p.top_k = (p.offset + p.top_k).max(*rerank_top_n);
                        p.offset = 0;
                    }
                    w.itm_n = *rerank_top_n;
                    self.search_text(&store, &t, &p)
                }),
                Query::Browse { params, .. } => self.browse(&store, params),
                Query::Image { params, .. } => embedding(&image_embeds, w.image)
                    .and_then(|v| self.search_image(&store, &v, params)),
                Query::Similar {
                    image_id, params, ..
                } => match store.get(*image_id).filter(|r| !r.deleted) {
                    Some(_) => store
                        .embeds(*image_id)
                        .ok_or_else(|| {
                            Error::NotFound(format!("image id {image_id} has no embeddings"))
                        })
                        .and_then(|v| self.search_image(&store, &v, params)),
                    None => Err(Error::NotFound(format!(
                        "image id {image_id} is not in the index"
                    ))),
                },
                Query::Rerank { ids, .. } => embedding(&text_embeds, w.text).and_then(|t| {
                    let mut hits = self.hits_for_ids(&store, ids)?;
                    for h in &mut hits {
                        h.itc_score = store.itc_score(h.image_id, &t).unwrap_or(0.0);
                    }
                    w.itm_n = hits.len();
                    Ok(hits)
                }),
                Query::Caption { .. } => Ok(Vec::new()),
            };
            match ranked {
                Ok(hits) => w.hits = hits,
                Err(e) => w.error = Some(e),
            }
            w.itm_n = w.itm_n.min(w.hits.len());
        }

        // 4. ITM, one batch over every query.
        let mut itm_requests: Vec<(&str, Vec<u64>)> = Vec::new();
        let mut itm_owner = Vec::new();
        for (i, w) in work.iter().enumerate() {
            if w.error.is_some() || w.itm_n == 0 {
                continue;
            }
            if let Query::Text { text, .. } | Query::Rerank { text, .. } = &w.query {
                let ids = w.hits[..w.itm_n].iter().map(|h| h.image_id).collect();
                itm_requests.push((text, ids));
                itm_owner.push(i);
            }
        }
        sizes.itm_pairs = itm_requests.iter().map(|r| r.1.len()).sum();
        if !itm_requests.is_empty() {
            let reqs: Vec<(&str, &[u64])> = itm_requests
                .iter()
                .map(|(q, ids)| (*q, ids.as_slice()))
                .collect();
            let scores = batch_or_each(&reqs, |r| self.itm_many(&store, r));
            for (k, i) in itm_owner.into_iter().enumerate() {
                let w = &mut work[i];
                match scores.get(k) {
                    Some(Ok(row)) => apply_itm(&mut w.hits, w.itm_n, row),
                    Some(Err(e)) => w.error = Some(e.clone()),
                    None => w.error = Some(Error::Internal("ITM scores lost".into())),
                }
            }
        }
        // The page of reranked text searches (ranked from the top above).
        for w in &mut work {
            if let Query::Text {
                params,
                rerank_top_n,
                ..
            } = &w.query
            {
                if *rerank_top_n > 0 {
                    let page = w.hits.drain(..).skip(params.offset).take(params.top_k);
                    w.hits = page.collect();
                }
                w.hits.truncate(params.top_k);
            }
        }

        // 5. Captions, one call: Caption queries and the hits of captioned searches.
        let mut items: Vec<(CaptionSource, CaptionRequest)> = Vec::new();
        // (work index, Some(hit index) for a hit, None for a Caption query)
        let mut item_owner: Vec<(usize, Option<usize>)> = Vec::new();
        for (i, w) in work.iter_mut().enumerate() {
            if w.error.is_some() {
                continue;
            }
            match &mut w.query {
                Query::Caption { source, request } => {
                    let source = std::mem::replace(source, CaptionSource::ImageId(0));
                    items.push((source, request.clone()));
                    item_owner.push((i, None));
                }
                Query::Text { with_captions, .. }
                | Query::Browse { with_captions, .. }
                | Query::Image { with_captions, .. }
                | Query::Similar { with_captions, .. }
                | Query::Rerank { with_captions, .. }
                    if *with_captions =>
                {
                    if let Err(e) = check_captioned(true, w.hits.len()) {
                        w.error = Some(e);
                        continue;
                    }
                    for (h, hit) in w.hits.iter().enumerate() {
                        if hit.caption.is_none() {
                            let source = CaptionSource::ImageId(hit.image_id);
                            items.push((source, CaptionRequest::default()));
                            item_owner.push((i, Some(h)));
                        }
                    }
                }
                _ => {}
            }
        }
        sizes.captions = items.len();
        if !items.is_empty() {
            let results = self.caption_many(&store, &items);
            for (r, (i, hit)) in results.into_iter().zip(item_owner) {
                let w = &mut work[i];
                match hit {
                    Some(h) => {
                        if let Some(hit) = w.hits.get_mut(h) {
                            match r {
                                Ok(c) => hit.caption = Some(c.generated.text),
                                Err(e) => {
                                    hit.error.get_or_insert_with(|| e.to_string());
                                }
                            }
                        }
                    }
                    None => w.caption = Some(r),
                }
            }
        }

        // 6. The answers.
        let generation = store.generation();
        let answers = work
            .into_iter()
            .map(|w| match (w.error, w.query) {
                (Some(e), _) => Err(e),
                (None, Query::Caption { .. }) => w
                    .caption
                    .unwrap_or_else(|| Err(Error::Internal("caption not computed".into())))
                    .map(Answer::Caption),
                (None, _) => Ok(Answer::Hits {
                    hits: w.hits,
                    generation,
                }),
            })
            .collect();
        (answers, sizes)
    }
}

/// Runs `f` on all of `inputs` at once; when the batch fails as a whole (one bad input fails
/// the model's batch call), runs each input alone so only the bad one gets the error.
fn batch_or_each<I: Copy, O>(inputs: &[I], f: impl Fn(&[I]) -> Result<Vec<O>>) -> Vec<Result<O>> {
    let short = || Error::Internal("the engine returned a short batch".into());
    match f(inputs) {
        Ok(out) if out.len() == inputs.len() => out.into_iter().map(Ok).collect(),
        Ok(_) => inputs.iter().map(|_| Err(short())).collect(),
        Err(_) if inputs.len() > 1 => inputs
            .iter()
            .map(|one| match f(std::slice::from_ref(one)) {
                Ok(mut v) if v.len() == 1 => v.pop().ok_or_else(short),
                Ok(_) => Err(short()),
                Err(e) => Err(e),
            })
            .collect(),
        Err(e) => vec![Err(e)],
    }
}

/// Puts ITM scores on the first `n` hits and orders those by them: hits whose image could not
/// be scored get `error` and sort last among the reranked; the rest keep their order.
pub(crate) fn apply_itm(hits: &mut [Hit], n: usize, scores: &[Result<f32>]) {
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
