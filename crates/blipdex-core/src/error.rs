use std::path::PathBuf;

/// One error type for the whole library stack. Every variant says what went wrong and, where a
/// user can act, what to do; the server maps each variant to exactly one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the user named does not exist or cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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

    /// The embedded store is unusable: corrupt or unreadable files, a locked directory, an
    /// unknown image id, a failed commit.
    #[error("index {dir}: {reason}")]
    Store { dir: PathBuf, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
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
