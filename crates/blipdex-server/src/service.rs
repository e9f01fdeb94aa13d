//! The `blipdex.v1.Retrieval` handlers: validate, queue for the model thread, await the reply.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use blipdex_model::CaptionRequest as EngineCaptionRequest;
use blipdex_search::filter::{format_offset, format_wall_clock};
use blipdex_search::{
    dedup_ids, Answer, CaptionOutcome, CaptionSource, Near, PhotoFilter, Query, SearchParams,
    SortBy,
};
use tonic::codegen::http::{self, HeaderValue};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::auth::BearerAuth;
use crate::pb::retrieval_server::{Retrieval, RetrievalServer};
use crate::pb::{self, SearchOptions};
use crate::{status_from, Shared};

/// Hits per page when a request leaves `top_k` at 0.
pub const DEFAULT_TOP_K: usize = 10;

pub(crate) type RetrievalService =
    OversizedIsInvalid<InterceptedService<RetrievalServer<Handlers>, BearerAuth>>;

pub(crate) fn retrieval_service(
    shared: Arc<Shared>,
    token: Option<&str>,
    max_message_bytes: usize,
) -> RetrievalService {
    let auth = BearerAuth::new(token, shared.metrics.clone());
    let server = RetrievalServer::new(Handlers { shared })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    OversizedIsInvalid {
        inner: InterceptedService::new(server, auth),
        limit: max_message_bytes,
    }
}

pub(crate) struct Handlers {
    shared: Arc<Shared>,
}

impl Handlers {
    async fn submit(&self, rpc: &'static str, query: Query) -> Result<Answer, Status> {
        self.shared
            .submit(rpc, query)
            .await
            .map_err(|e| status_from(&e))
    }

    async fn timed<T>(
        &self,
        rpc: &'static str,
        f: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let r = f.await;
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        let secs = start.elapsed().as_secs_f64();
        self.shared.metrics.observe(rpc, code, secs);
        match &r {
            Err(s) if s.code() == tonic::Code::Internal => {
                tracing::error!(rpc, seconds = secs, "{}", s.message());
            }
            Err(s) => tracing::debug!(rpc, seconds = secs, code = ?s.code(), "{}", s.message()),
            Ok(_) => tracing::debug!(rpc, seconds = secs, "ok"),
        }
        r.map(Response::new)
    }
}

fn search_params(top_k: u32, options: Option<SearchOptions>) -> Result<SearchParams, Status> {
    let o = options.unwrap_or_default();
    let photo = PhotoFilter::parse(
        &o.taken_after,
        &o.taken_before,
        &o.camera,
        o.near.map(|n| Near {
            lat: n.lat,
            lon: n.lon,
            radius_km: n.radius_km,
        }),
        o.has_location,
    )
    .map_err(|e| status_from(&e))?;
    let sort = match pb::SortBy::try_from(o.sort) {
        Ok(pb::SortBy::Score) => SortBy::Score,
        Ok(pb::SortBy::DateDesc) => SortBy::DateDesc,
        Ok(pb::SortBy::DateAsc) => SortBy::DateAsc,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "sort is {}; use SORT_BY_SCORE, SORT_BY_DATE_DESC or SORT_BY_DATE_ASC",
                o.sort
            )))
        }
    };
    let mut p = SearchParams {
        top_k: if top_k == 0 {
            DEFAULT_TOP_K
        } else {
            top_k as usize
        },
        offset: o.offset as usize,
        exact: o.exact,
        path_prefix: (!o.path_prefix.is_empty()).then_some(o.path_prefix),
        min_score: o.min_score,
        photo,
        sort,
        ..SearchParams::default()
    };
    if o.ef != 0 {
        p.ef = o.ef as usize;
    }
    Ok(p)
}

fn found(a: Answer) -> Result<pb::SearchResponse, Status> {
    match a {
        Answer::Hits { hits, generation } => Ok(pb::SearchResponse {
            hits: hits.into_iter().map(hit).collect(),
            generation,
        }),
        Answer::Caption(_) => Err(Status::internal("a search was answered with a caption")),
    }
}

fn hit(h: blipdex_search::Hit) -> pb::Hit {
    let photo = h.photo.unwrap_or_default();
    pb::Hit {
        taken_at: photo.taken_at.map(format_wall_clock).unwrap_or_default(),
        taken_offset: photo
            .taken_offset_min
            .map(format_offset)
            .unwrap_or_default(),
        latitude: photo.location().map(|l| l.0),
        longitude: photo.location().map(|l| l.1),
        camera_make: photo.camera_make.unwrap_or_default(),
        camera_model: photo.camera_model.unwrap_or_default(),
        image_id: h.image_id,
        path: h.path,
        itc_score: h.itc_score,
        itm_score: h.itm_score,
        caption: h.caption.unwrap_or_default(),
        other_paths: h.other_paths,
        content_hash: h.content_hash,
        width: h.width,
        height: h.height,
        error: h.error.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Retrieval for Handlers {
    async fn search_text(
        &self,
        request: Request<pb::SearchTextRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        self.timed("SearchText", async {
            let r = request.into_inner();
            let query = Query::text(
                r.query,
                search_params(r.top_k, r.options)?,
                r.rerank_top_n as usize,
                r.with_captions,
            );
            found(self.submit("SearchText", query).await?)
        })
        .await
    }

    async fn search_image(
        &self,
        request: Request<pb::SearchImageRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        self.timed("SearchImage", async {
            let r = request.into_inner();
            let params = search_params(r.top_k, r.options)?;
            let query = match (r.image_id, r.image.is_empty()) {
                (Some(image_id), true) => Query::Similar {
                    image_id,
                    params,
                    with_captions: r.with_captions,
                },
                (Some(_), false) => {
                    return Err(Status::invalid_argument(
                        "both image and image_id are set; send one of them",
                    ))
                }
                (None, _) => Query::Image {
                    image: r.image,
                    params,
                    with_captions: r.with_captions,
                },
            };
            found(self.submit("SearchImage", query).await?)
        })
        .await
    }

    async fn rerank(
        &self,
        request: Request<pb::RerankRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        self.timed("Rerank", async {
            let r = request.into_inner();
            let query = Query::Rerank {
                text: r.query,
                ids: dedup_ids(&r.image_ids),
                with_captions: r.with_captions,
            };
            found(self.submit("Rerank", query).await?)
        })
        .await
    }

    async fn caption(
        &self,
        request: Request<pb::CaptionRequest>,
    ) -> Result<Response<pb::CaptionResponse>, Status> {
        self.timed("Caption", async {
            let r = request.into_inner();
            let source = match r.source {
                Some(pb::caption_request::Source::ImageId(id)) => CaptionSource::ImageId(id),
                Some(pb::caption_request::Source::Image(bytes)) => CaptionSource::Bytes(bytes),
                None => {
                    return Err(Status::invalid_argument(
                        "no image: set image_id (an indexed image) or image (encoded bytes)",
                    ))
                }
            };
            let request = EngineCaptionRequest {
                prompt: r.prompt,
                max_new_tokens: r.max_new_tokens.map(|n| n as usize),
                min_new_tokens: r.min_new_tokens.map(|n| n as usize),
                num_beams: r.num_beams.map(|n| n as usize),
            };
            let c: CaptionOutcome = match self
                .submit("Caption", Query::Caption { source, request })
                .await?
            {
                Answer::Caption(c) => c,
                Answer::Hits { .. } => {
                    return Err(Status::internal("a caption was answered with hits"))
                }
            };
            Ok(pb::CaptionResponse {
                text: c.generated.text,
                token_ids: c.generated.token_ids,
                cached: c.cached,
            })
        })
        .await
    }

    async fn get_stats(
        &self,
        _request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        self.timed("GetStats", async {
            let (s, queue_depth) = self.shared.stats().await.map_err(|e| status_from(&e))?;
            Ok(pb::GetStatsResponse {
                images: s.images as u64,
                deleted: s.dead_rows as u64,
                generation: s.generation,
                model: s.model,
                model_fingerprint: s.model_fingerprint,
                caption_model: s.caption_model.unwrap_or_default(),
                captions_stored: s.captions_stored as u64,
                captions_pending: s.captions_pending as u64,
                index_bytes: s.index_bytes,
                hnsw_points: s.hnsw_points as u64,
                vision_cache_entries: s.vision_cache_entries as u64,
                queue_depth: queue_depth as u64,
                queue_capacity: self.shared.limits.queue_depth as u64,
                server_version: env!("CARGO_PKG_VERSION").to_string(),
            })
        })
        .await
    }
}

/// tonic refuses a request over `max_decoding_message_size` with OUT_OF_RANGE before any
/// handler runs; clients are promised INVALID_ARGUMENT with a message that says what to do,
/// so this wrapper rewrites that status (no handler of this service returns OUT_OF_RANGE).
#[derive(Clone)]
pub(crate) struct OversizedIsInvalid<S> {
    inner: S,
    limit: usize,
}

impl<S: NamedService> NamedService for OversizedIsInvalid<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for OversizedIsInvalid<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move {
            let mut resp = fut.await?;
            let out_of_range = resp
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == b"11");
            if out_of_range {
                let headers = resp.headers_mut();
                headers.insert("grpc-status", HeaderValue::from_static("3"));
                let msg = format!(
                    "the request message is over the server's limit of {limit} bytes \
                     (--max-message-bytes); send a smaller image (downscale or re-encode it)"
                );
                if let Ok(v) = HeaderValue::from_str(&msg) {
                    headers.insert("grpc-message", v);
                }
            }
            Ok(resp)
        })
    }
}
