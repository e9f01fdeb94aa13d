//! The HTTP/JSON front end (axum) beside gRPC: the same operations, validation, limits, queue
//! and bearer token (requests go through [`Shared::submit`], as the gRPC handlers' do), plus
//! thumbnails, metadata facets, the OpenAPI document at `/openapi.json` and the search page at
//! `/`. Messages are converted here; what a query means is `blipdex_search`'s.
//!
//! Errors are a status code and `{"error": {"code": "...", "message": "..."}}`, the code named
//! as in gRPC (see [`http_status`], the one mapping from engine errors to HTTP).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query as UrlQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use blipdex_core::{Error, ObjectStoreErrorKind};
use blipdex_model::CaptionRequest as EngineCaptionRequest;
use blipdex_search::filter::{format_offset, format_wall_clock};
use blipdex_search::{
    dedup_ids, Answer, CaptionSource, Near, PhotoFilter, Query, SearchParams, SortBy,
};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use crate::service::DEFAULT_TOP_K;
use crate::Shared;

/// Default longest side of a thumbnail, in pixels.
const DEFAULT_THUMB: u32 = 256;

#[derive(Clone)]
struct Http {
    shared: Arc<Shared>,
    token: Option<Arc<[u8]>>,
}

/// The routes, with the body limit of `max_message_bytes` (plus base64's third for uploads).
pub(crate) fn router(shared: Arc<Shared>, token: Option<&str>, max_message_bytes: usize) -> Router {
    let state = Http {
        shared,
        token: token.map(|t| Arc::from(t.as_bytes())),
    };
    let body_limit = max_message_bytes.saturating_add(max_message_bytes / 3) + (64 << 10);
    let api = Router::new()
        .route("/search/text", post(search_text))
        .route("/search/image", post(search_image))
        .route("/rerank", post(rerank))
        .route("/caption", post(caption))
        .route("/stats", get(stats))
        .route("/facets", get(facets))
        .route("/thumbnails/{image_id}", get(thumbnail))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route("/health", get(health));
    Router::new()
        .nest("/api/v1", api)
        .route("/openapi.json", get(openapi))
        .route("/", get(page))
        .route("/static/app.js", get(app_js))
        .route("/static/style.css", get(style_css))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(body_limit, refuse_oversized))
        .with_state(state)
}

/// Most bytes of an oversized upload read (and dropped) before it is refused.
const DRAIN_MAX: u64 = 64 << 20;

/// An upload whose Content-Length is over the limit gets its 413 after its body is read and
/// dropped (up to [`DRAIN_MAX`]): answering while the client still sends closes a socket with
/// unread data, the kernel resets the connection, and the client sees a reset, not the 413.
/// (Bodies without a length meet [`DefaultBodyLimit`] in the handlers' extractor.)
async fn refuse_oversized(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => {
            if n <= DRAIN_MAX {
                let mut body = req.into_body().into_data_stream();
                while let Some(Ok(_)) = tokio_stream::StreamExt::next(&mut body).await {}
            }
            too_large().into_response()
        }
        _ => next.run(req).await,
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        "the request body is over the server's limit (--max-message-bytes); send a smaller \
         image (downscale or re-encode it)",
    )
}

// ---- errors ----

/// An error as the HTTP API answers it.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

#[derive(Serialize, ToSchema)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
struct ErrorDetail {
    /// The gRPC status name of the same error (INVALID_ARGUMENT, NOT_FOUND, ...), or
    /// FILE_CHANGED / PAYLOAD_TOO_LARGE / UNSUPPORTED_MEDIA_TYPE where HTTP says more.
    code: String,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = http_status(&e);
        let mut message = e.to_string();
        match status {
            StatusCode::INTERNAL_SERVER_ERROR => {
                message.push_str("; this is a server-side failure, see the server log")
            }
            StatusCode::SERVICE_UNAVAILABLE if !matches!(e, Error::Unavailable(_)) => {
                message.push_str("; retry later")
            }
            _ => {}
        }
        Self::new(status, code, message)
    }
}

/// The HTTP status and code name of every engine error (the gRPC mapping is
/// [`crate::status_from`]; they agree except where HTTP has a closer code: a changed file is
/// 409 Conflict).
pub fn http_status(e: &Error) -> (StatusCode, &'static str) {
    match e {
        Error::InvalidArgument(_) | Error::BadImage { .. } | Error::ImageTooLarge { .. } => {
            (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT")
        }
        Error::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        Error::FileChanged { .. } => (StatusCode::CONFLICT, "FILE_CHANGED"),
        Error::Unsupported(_) | Error::ModelMismatch { .. } => {
            (StatusCode::PRECONDITION_FAILED, "FAILED_PRECONDITION")
        }
        Error::Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
        Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Error::ObjectStore { kind, .. } => match kind {
            ObjectStoreErrorKind::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            ObjectStoreErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            ObjectStoreErrorKind::Denied | ObjectStoreErrorKind::Config => {
                (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL")
            }
        },
        Error::Io { .. } | Error::Store { .. } | Error::Hub { .. } | Error::Locked { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
        }
        Error::BadModel { .. }
        | Error::BadTensor { .. }
        | Error::Tokenizer(_)
        | Error::Tensor(_)
        | Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
    }
}

/// `Json<T>` whose rejections (malformed JSON, wrong types, unknown fields, a body over the
/// limit, no JSON content type) answer in the API's error format.
struct ApiJson<T>(T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(r) => Err(match r.status() {
                StatusCode::PAYLOAD_TOO_LARGE => too_large(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UNSUPPORTED_MEDIA_TYPE",
                    "send the body as JSON with Content-Type: application/json",
                ),
                _ => ApiError::invalid(format!("bad JSON body: {}", r.body_text())),
            }),
        }
    }
}

// ---- messages ----

/// Filters and order shared by the searches (all optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Filters {
    /// Only images with a path starting with this (any of their paths).
    path_prefix: Option<String>,
    /// Only hits scoring at least this.
    min_score: Option<f32>,
    /// Taken at or after this time of the camera's clock: `2024-05-01` or `2024-05-01T12:30:00`.
    taken_after: Option<String>,
    /// Taken before this time; a date alone includes that whole day.
    taken_before: Option<String>,
    /// Case-insensitive part of "make model".
    camera: Option<String>,
    near: Option<NearJson>,
    /// Only photos with (true) or without (false) a GPS location.
    has_location: Option<bool>,
    /// `score` (default), `date_desc` (newest first) or `date_asc`.
    sort: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NearJson {
    lat: f64,
    lon: f64,
    radius_km: f64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TextSearch {
    /// At most 4096 bytes. Empty with a date sort (`filters.sort`) and no rerank: browse, every
    /// photo the filters keep by date, scores 0 (`filters.min_score` is then refused).
    query: String,
    /// Hits per page (default 10); offset + top_k at most 10000.
    top_k: Option<u32>,
    offset: Option<u32>,
    /// Rerank the first N ITC hits by ITM match probability (at most 1000).
    rerank_top_n: Option<u32>,
    /// Captions for the page's hits (needs a caption model; at most 100 hits).
    with_captions: Option<bool>,
    /// Score every image instead of searching the ANN index.
    exact: Option<bool>,
    /// ANN search breadth (images rescored exactly).
    ef: Option<u32>,
    filters: Option<Filters>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ImageSearch {
    /// "More like this": an indexed image as the query (its stored embeddings).
    image_id: Option<u64>,
    /// Or an encoded image, base64 (a `data:` URL is accepted).
    image: Option<String>,
    top_k: Option<u32>,
    offset: Option<u32>,
    with_captions: Option<bool>,
    exact: Option<bool>,
    ef: Option<u32>,
    filters: Option<Filters>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RerankJson {
    query: String,
    /// At most 1000 indexed image ids.
    image_ids: Vec<u64>,
    with_captions: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CaptionJson {
    /// An indexed image, or
    image_id: Option<u64>,
    /// an encoded image, base64 (a `data:` URL is accepted).
    image: Option<String>,
    /// e.g. "Question: what is in the photo? Answer:"; absent = a plain caption.
    prompt: Option<String>,
    max_new_tokens: Option<u32>,
    num_beams: Option<u32>,
    min_new_tokens: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
struct HitJson {
    image_id: u64,
    path: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    other_paths: Vec<String>,
    content_hash: String,
    width: u32,
    height: u32,
    itc_score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    itm_score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    caption: Option<String>,
    /// Why an asked-for itm_score or caption is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// When the photo was taken, by the camera's clock (`2019-06-01T12:30:00`).
    #[serde(skip_serializing_if = "Option::is_none")]
    taken_at: Option<String>,
    /// The clock's UTC offset (`+02:00`), when the camera recorded one.
    #[serde(skip_serializing_if = "Option::is_none")]
    taken_offset: Option<String>,
    /// "Make Model" for display.
    #[serde(skip_serializing_if = "Option::is_none")]
    camera: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    camera_make: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    camera_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latitude: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    longitude: Option<f64>,
    /// `GET` this for a JPEG thumbnail.
    thumbnail: String,
}

#[derive(Debug, Serialize, ToSchema)]
struct SearchResult {
    hits: Vec<HitJson>,
    /// The index generation the hits come from.
    generation: u64,
}

#[derive(Debug, Serialize, ToSchema)]
struct CaptionResult {
    text: String,
    /// Generated token ids (empty when the caption came from the index).
    token_ids: Vec<u32>,
    /// Served without running the model.
    cached: bool,
}

#[derive(Debug, Serialize, ToSchema)]
struct StatsJson {
    images: u64,
    deleted: u64,
    generation: u64,
    model: String,
    model_fingerprint: String,
    caption_model: Option<String>,
    captions_stored: u64,
    captions_pending: u64,
    index_bytes: u64,
    vision_cache_entries: u64,
    queue_depth: u64,
    queue_capacity: u64,
    server_version: String,
}

#[derive(Debug, Serialize, ToSchema)]
struct CameraCount {
    camera: String,
    images: u64,
}

#[derive(Debug, Serialize, ToSchema)]
struct FacetsJson {
    images: u64,
    /// Most photos first.
    cameras: Vec<CameraCount>,
    taken_min: Option<String>,
    taken_max: Option<String>,
    with_date: u64,
    with_location: u64,
    /// Images whose EXIF was never read (the next ingest reads it).
    not_read: u64,
}

#[derive(Debug, Serialize, ToSchema)]
struct HealthJson {
    /// `loading` until the model is ready, then `serving`.
    status: &'static str,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ThumbQuery {
    /// Longest side in pixels, 32..=1024 (default 256).
    size: Option<u32>,
}

fn params(
    top_k: Option<u32>,
    offset: Option<u32>,
    exact: Option<bool>,
    ef: Option<u32>,
    filters: Option<Filters>,
) -> Result<SearchParams, ApiError> {
    let f = filters.unwrap_or_default();
    let photo = PhotoFilter::parse(
        f.taken_after.as_deref().unwrap_or(""),
        f.taken_before.as_deref().unwrap_or(""),
        f.camera.as_deref().unwrap_or(""),
        f.near.map(|n| Near {
            lat: n.lat,
            lon: n.lon,
            radius_km: n.radius_km,
        }),
        f.has_location,
    )?;
    let sort: SortBy = f.sort.as_deref().unwrap_or("").parse()?;
    let mut p = SearchParams {
        top_k: match top_k {
            None | Some(0) => DEFAULT_TOP_K,
            Some(k) => k as usize,
        },
        offset: offset.unwrap_or(0) as usize,
        exact: exact.unwrap_or(false),
        path_prefix: f.path_prefix.filter(|p| !p.is_empty()),
        min_score: f.min_score,
        photo,
        sort,
        ..SearchParams::default()
    };
    if let Some(ef) = ef.filter(|&e| e != 0) {
        p.ef = ef as usize;
    }
    Ok(p)
}

fn decode_base64(s: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    let data = match s.strip_prefix("data:") {
        Some(url) => url.split_once(',').map_or("", |(_, d)| d),
        None => s,
    };
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| {
            ApiError::invalid(format!(
                "{field} is not base64 ({e}); send the file's bytes base64-encoded"
            ))
        })
}

/// The image a request names: an indexed one by id, or uploaded bytes (base64), not both.
fn image_source(image_id: Option<u64>, image: Option<String>) -> Result<CaptionSource, ApiError> {
    match (image_id, image) {
        (Some(id), None) => Ok(CaptionSource::ImageId(id)),
        (None, Some(b64)) => Ok(CaptionSource::Bytes(decode_base64(&b64, "image")?)),
        _ => Err(ApiError::invalid(
            "send one of image_id (an indexed image) or image (base64 bytes)",
        )),
    }
}

fn hit(h: blipdex_search::Hit) -> HitJson {
    let photo = h.photo.unwrap_or_default();
    HitJson {
        thumbnail: format!("/api/v1/thumbnails/{}", h.image_id),
        image_id: h.image_id,
        path: h.path,
        other_paths: h.other_paths,
        content_hash: h.content_hash,
        width: h.width,
        height: h.height,
        itc_score: h.itc_score,
        itm_score: h.itm_score,
        caption: h.caption,
        error: h.error,
        taken_at: photo.taken_at.map(format_wall_clock),
        taken_offset: photo.taken_offset_min.map(format_offset),
        camera: photo.camera(),
        latitude: photo.location().map(|l| l.0),
        longitude: photo.location().map(|l| l.1),
        camera_make: photo.camera_make,
        camera_model: photo.camera_model,
    }
}

impl Http {
    /// Runs `query` through the shared queue, timing it under `rpc` in the metrics.
    async fn answer(&self, rpc: &'static str, query: Query) -> Result<Answer, ApiError> {
        let start = Instant::now();
        let r = self.shared.submit(rpc, query).await;
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(e) => crate::status_from(e).code(),
        };
        self.shared
            .metrics
            .observe(rpc, code, start.elapsed().as_secs_f64());
        if let Err(e) = &r {
            if http_status(e).0 == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::error!(rpc, "{e}");
            }
        }
        Ok(r?)
    }

    async fn search(
        &self,
        rpc: &'static str,
        query: Query,
    ) -> Result<Json<SearchResult>, ApiError> {
        match self.answer(rpc, query).await? {
            Answer::Hits { hits, generation } => Ok(Json(SearchResult {
                hits: hits.into_iter().map(hit).collect(),
                generation,
            })),
            Answer::Caption(_) => {
                Err(Error::Internal("a search was answered with a caption".into()).into())
            }
        }
    }
}

// ---- handlers ----

/// Refuses `/api/v1` requests without the server's bearer token (when it has one).
async fn authorize(State(st): State<Http>, req: Request, next: Next) -> Response {
    if let Some(token) = &st.token {
        let values = req.headers().get_all(header::AUTHORIZATION);
        if let Err(why) = crate::auth::check(token, values.iter().map(HeaderValue::as_bytes)) {
            st.shared
                .metrics
                .requests
                .with_label_values(&["auth", "UNAUTHENTICATED"])
                .inc();
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                format!(
                    "{why}; send the header `Authorization: Bearer <token>` with the server's \
                     token (BLIPDEX_AUTH_TOKEN)"
                ),
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// Text → images, ranked by ITC (optionally reranked by ITM).
#[utoipa::path(post, path = "/api/v1/search/text", request_body = TextSearch,
    responses((status = 200, body = SearchResult), (status = "4XX", body = ErrorBody),
        (status = "5XX", body = ErrorBody)))]
async fn search_text(
    State(st): State<Http>,
    ApiJson(r): ApiJson<TextSearch>,
) -> Result<Json<SearchResult>, ApiError> {
    let query = Query::text(
        r.query,
        params(r.top_k, r.offset, r.exact, r.ef, r.filters)?,
        r.rerank_top_n.unwrap_or(0) as usize,
        r.with_captions.unwrap_or(false),
    );
    st.search("http:SearchText", query).await
}

/// Image → images: an uploaded image, or an indexed one ("more like this").
#[utoipa::path(post, path = "/api/v1/search/image", request_body = ImageSearch,
    responses((status = 200, body = SearchResult), (status = "4XX", body = ErrorBody),
        (status = "5XX", body = ErrorBody)))]
async fn search_image(
    State(st): State<Http>,
    ApiJson(r): ApiJson<ImageSearch>,
) -> Result<Json<SearchResult>, ApiError> {
    let params = params(r.top_k, r.offset, r.exact, r.ef, r.filters)?;
    let with_captions = r.with_captions.unwrap_or(false);
    let query = match image_source(r.image_id, r.image)? {
        CaptionSource::ImageId(image_id) => Query::Similar {
            image_id,
            params,
            with_captions,
        },
        CaptionSource::Bytes(image) => Query::Image {
            image,
            params,
            with_captions,
        },
    };
    st.search("http:SearchImage", query).await
}

/// ITM match probability of a text with each given image.
#[utoipa::path(post, path = "/api/v1/rerank", request_body = RerankJson,
    responses((status = 200, body = SearchResult), (status = "4XX", body = ErrorBody),
        (status = "5XX", body = ErrorBody)))]
async fn rerank(
    State(st): State<Http>,
    ApiJson(r): ApiJson<RerankJson>,
) -> Result<Json<SearchResult>, ApiError> {
    let query = Query::Rerank {
        text: r.query,
        ids: dedup_ids(&r.image_ids),
        with_captions: r.with_captions.unwrap_or(false),
    };
    st.search("http:Rerank", query).await
}

/// A caption (or an answer to a prompt) for an indexed image or uploaded bytes.
#[utoipa::path(post, path = "/api/v1/caption", request_body = CaptionJson,
    responses((status = 200, body = CaptionResult), (status = "4XX", body = ErrorBody),
        (status = "5XX", body = ErrorBody)))]
async fn caption(
    State(st): State<Http>,
    ApiJson(r): ApiJson<CaptionJson>,
) -> Result<Json<CaptionResult>, ApiError> {
    let source = image_source(r.image_id, r.image)?;
    let request = EngineCaptionRequest {
        prompt: r.prompt.unwrap_or_default(),
        max_new_tokens: r.max_new_tokens.map(|n| n as usize),
        min_new_tokens: r.min_new_tokens.map(|n| n as usize),
        num_beams: r.num_beams.map(|n| n as usize),
    };
    match st
        .answer("http:Caption", Query::Caption { source, request })
        .await?
    {
        Answer::Caption(c) => Ok(Json(CaptionResult {
            text: c.generated.text,
            token_ids: c.generated.token_ids,
            cached: c.cached,
        })),
        Answer::Hits { .. } => {
            Err(Error::Internal("a caption was answered with hits".into()).into())
        }
    }
}

/// Index and model facts.
#[utoipa::path(get, path = "/api/v1/stats",
    responses((status = 200, body = StatsJson), (status = "4XX", body = ErrorBody),
        (status = "5XX", body = ErrorBody)))]
async fn stats(State(st): State<Http>) -> Result<Json<StatsJson>, ApiError> {
    let (s, queue_depth) = st.shared.stats().await?;
    Ok(Json(StatsJson {
        images: s.images as u64,
        deleted: s.dead_rows as u64,
        generation: s.generation,
        model: s.model,
        model_fingerprint: s.model_fingerprint,
        caption_model: s.caption_model,
        captions_stored: s.captions_stored as u64,
        captions_pending: s.captions_pending as u64,
        index_bytes: s.index_bytes,
        vision_cache_entries: s.vision_cache_entries as u64,
        queue_depth: queue_depth as u64,
        queue_capacity: st.shared.limits.queue_depth as u64,
        server_version: env!("CARGO_PKG_VERSION").to_string(),
    }))
}

/// What the photos hold, for filter forms: cameras, date range, locations.
#[utoipa::path(get, path = "/api/v1/facets",
    responses((status = 200, body = FacetsJson), (status = "4XX", body = ErrorBody),
        (status = "5XX", body = ErrorBody)))]
async fn facets(State(st): State<Http>) -> Result<Json<FacetsJson>, ApiError> {
    let engine = st.shared.engine()?;
    let f = tokio::task::spawn_blocking(move || engine.facets())
        .await
        .map_err(|e| Error::Internal(format!("facets task failed: {e}")))??;
    Ok(Json(FacetsJson {
        images: f.images as u64,
        cameras: f
            .cameras
            .into_iter()
            .map(|(camera, n)| CameraCount {
                camera,
                images: n as u64,
            })
            .collect(),
        taken_min: f.taken_min.map(format_wall_clock),
        taken_max: f.taken_max.map(format_wall_clock),
        with_date: f.with_date as u64,
        with_location: f.with_location as u64,
        not_read: f.not_read as u64,
    }))
}

/// A JPEG thumbnail of an indexed image (EXIF orientation applied), rendered once and cached.
#[utoipa::path(get, path = "/api/v1/thumbnails/{image_id}",
    params(("image_id" = u64, Path, description = "Hit.image_id"),
        ("size" = Option<u32>, Query, description = "longest side, 32..=1024 (default 256)")),
    responses((status = 200, content_type = "image/jpeg", description = "the thumbnail"),
        (status = 304, description = "If-None-Match matched"),
        (status = 404, body = ErrorBody, description = "unknown image, or its file is gone"),
        (status = 409, body = ErrorBody, description = "the file changed since it was indexed"),
        (status = "4XX", body = ErrorBody), (status = "5XX", body = ErrorBody)))]
async fn thumbnail(
    State(st): State<Http>,
    Path(image_id): Path<String>,
    q: Result<UrlQuery<ThumbQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id: u64 = image_id.parse().map_err(|_| {
        ApiError::invalid(format!(
            "{image_id:?} is not an image id (Hit.image_id, a number)"
        ))
    })?;
    let UrlQuery(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let size = q.size.unwrap_or(DEFAULT_THUMB);
    let engine = st.shared.engine()?;
    let start = Instant::now();
    let r = tokio::task::spawn_blocking(move || engine.thumbnail(id, size))
        .await
        .map_err(|e| Error::Internal(format!("thumbnail task failed: {e}")))?;
    let code = match &r {
        Ok(_) => tonic::Code::Ok,
        Err(e) => crate::status_from(e).code(),
    };
    st.shared
        .metrics
        .observe("http:Thumbnail", code, start.elapsed().as_secs_f64());
    let t = r?;
    let etag =
        HeaderValue::from_str(&t.etag).map_err(|e| Error::Internal(format!("bad etag: {e}")))?;
    let cache = HeaderValue::from_static("private, max-age=86400");
    let matched = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim() == t.etag || v.trim() == "*");
    if matched {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag), (header::CACHE_CONTROL, cache)],
        )
            .into_response());
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(t.content_type),
            ),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, cache),
        ],
        t.bytes,
    )
        .into_response())
}

/// `serving` once the model is loaded (open, like gRPC health).
#[utoipa::path(get, path = "/api/v1/health", responses((status = 200, body = HealthJson)))]
async fn health(State(st): State<Http>) -> Json<HealthJson> {
    Json(HealthJson {
        status: if st.shared.engine.get().is_some() {
            "serving"
        } else {
            "loading"
        },
    })
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "blipdex",
        description = "Text-to-image search over a BLIP-2 index: the HTTP/JSON face of the \
                       blipdex.v1.Retrieval gRPC service. With a server token, every /api/v1 \
                       route but /health needs `Authorization: Bearer <token>`."
    ),
    paths(
        search_text,
        search_image,
        rerank,
        caption,
        stats,
        facets,
        thumbnail,
        health
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        Filters,
        NearJson,
        TextSearch,
        ImageSearch,
        RerankJson,
        CaptionJson,
        HitJson,
        SearchResult,
        CaptionResult,
        StatsJson,
        CameraCount,
        FacetsJson,
        HealthJson
    ))
)]
struct ApiDoc;

/// The OpenAPI document (3.1) of these routes.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        openapi_json(),
    )
        .into_response()
}

// ---- the page ----

/// Only the page's own scripts, styles and images (thumbnails, dropped files as blobs).
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("../static/index.html"),
    )
}

async fn app_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../static/app.js"),
    )
}

async fn style_css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("../static/style.css"),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "no such route; the API is under /api/v1 (see /openapi.json)",
    )
}
