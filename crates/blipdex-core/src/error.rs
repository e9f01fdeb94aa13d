use std::path::PathBuf;
use std::sync::Arc;

/// One error type for the whole library stack. Every variant says what went wrong and, where a
/// user can act, what to do; the server maps each variant to exactly one gRPC status.
///
/// `Clone`, because one failure often answers many callers (a batch of queries, the images of
/// one failed forward pass). Callers act on the variant, never on the message text.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A file the user named does not exist or cannot be read.
    /// (The OS error is in the message and deliberately not a `source()`: a report that
    /// prints the chain would name it twice.)
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: Arc<std::io::Error>,
    },

    /// The bytes are not an image we can decode (corrupt, truncated, unknown format).
    #[error("cannot decode image {what}: {reason}")]
    BadImage { what: String, reason: String },

    /// The image would decode to more pixels than allowed (decompression-bomb guard).
    #[error(
        "image {what} is {width}x{height} = {pixels} pixels, over the limit of {limit}; \
         raise --max-image-pixels if this image is legitimate"
    )]
    ImageTooLarge {
        what: String,
        width: u64,
        height: u64,
        pixels: u64,
        limit: u64,
    },

    /// The model directory or repo does not hold a usable checkpoint of the expected kind.
    #[error("model {model}: {reason}")]
    BadModel { model: String, reason: String },

    /// The Hugging Face Hub (or its cache) could not provide a file.
    #[error("cannot fetch {file} of {repo} from the Hugging Face Hub: {reason}")]
    Hub {
        repo: String,
        file: String,
        reason: String,
    },

    /// A tensor file is missing a tensor or holds one of the wrong shape or dtype.
    #[error("tensor {name} in {file}: {reason}")]
    BadTensor {
        file: String,
        name: String,
        reason: String,
    },

    /// The request is malformed (empty text, bad argument combination, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The checkpoint lacks the part needed for the request (e.g. no ITM head).
    #[error("unsupported by this checkpoint: {0}")]
    Unsupported(String),

    /// Tokenizer failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A failure inside the tensor library; not the user's fault.
    #[error("internal tensor error: {0}")]
    Tensor(String),

    /// An invariant of blipdex itself does not hold: a bug, never the input's fault.
    #[error("internal error (a bug in blipdex, please report it): {0}")]
    Internal(String),

    /// An index directory holds embeddings of another model (or other dimensions) than the one
    /// asked for. Embeddings of two models must never mix, so this is never silently fixed.
    #[error(
        "index {dir} holds embeddings of model {stored}, but {requested} was requested; \
         use that model or a separate index directory"
    )]
    ModelMismatch {
        dir: PathBuf,
        stored: String,
        requested: String,
    },

    /// An indexed file no longer holds the bytes that were indexed (its embedding is stale).
    #[error("{path} changed since it was indexed; re-run blipdex ingest")]
    FileChanged { path: String },

    /// A thing the request names (an image id, ...) does not exist.
    #[error("not found: {0}")]
    NotFound(String),

    /// Too much work is queued; retry later (the server's bounded queue is full).
    #[error("overloaded: {0}")]
    Overloaded(String),

    /// The service cannot answer now (the model is still loading, or the server is stopping);
    /// retry later or elsewhere.
    #[error("unavailable: {0}")]
    Unavailable(String),

    /// Another process holds the index's writer lock (one writer at a time). Transient: an
    /// ingest or a caption flush commits and lets go; readers are never blocked by it.
    #[error(
        "index {dir} is open for writing by another process (one writer at a time); wait for it \
         to finish, or stop it"
    )]
    Locked { dir: PathBuf },

    /// The embedded store is unusable: corrupt or unreadable files, an unknown image id, a
    /// failed commit.
    #[error("index {dir}: {reason}")]
    Store { dir: PathBuf, reason: String },

    /// An object store (S3, GCS, Azure) refused or failed a request: `kind` says whether to fix
    /// the location, the credentials or retry later.
    #[error("{url}: {reason}")]
    ObjectStore {
        url: String,
        kind: ObjectStoreErrorKind,
        reason: String,
    },
}

/// What an object-store failure asks of the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectStoreErrorKind {
    /// The bucket, container or object does not exist.
    NotFound,
    /// Missing, wrong or insufficient credentials.
    Denied,
    /// The endpoint could not be reached or kept failing (network, timeouts, 5xx).
    Unavailable,
    /// A malformed URL or configuration.
    Config,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            cause: Arc::new(source),
        }
    }

    pub fn bad_model(model: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self::BadModel {
            model: model.to_string(),
            reason: reason.into(),
        }
    }

    pub fn store(dir: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Store {
            dir: dir.into(),
            reason: reason.into(),
        }
    }
}
