//! Public value types: options, records going in, rows and hits coming out.

use serde::{Deserialize, Serialize};

/// Element type of the `image_embeds` column on disk. Search always runs on f32 in memory;
/// f16 halves the Parquet size at a precision cost of about 1e-3 per score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    F16,
}

impl Dtype {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
        })
    }
}

/// Parameters of the ANN index: how many vectors stand for an image, and the hnsw_rs graph over
/// the IVF list centroids (the coarse quantizer). Fixed when the store is created; later opens
/// use the values recorded in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Graph degree M (hnsw_rs `max_nb_connection`; layer 0 keeps 2M). At most 256.
    pub max_nb_connection: usize,
    /// Beam width while inserting.
    pub ef_construction: usize,
    /// How many vectors per image go into the index: 1 = the normalized mean of the Q query
    /// vectors, Q = every query vector, in between = that many k-means centroids of them
    /// (clamped to Q). Candidates are always rescored exactly (max over all Q), so this trades
    /// index size and build time against how far the graph's ordering is from the max-sim
    /// ordering.
    pub vectors_per_image: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        // Chosen from the measurements in the crate docs (`blipdex bench search` at 100k images): 4
        // centroids keep multi-subject images findable, where the mean alone loses them.
        Self {
            max_nb_connection: 16,
            ef_construction: 100,
            vectors_per_image: 4,
        }
    }
}

/// Images rescored exactly per query by [`crate::Store::search_ann`] (see the crate docs for
/// the recall it gives).
pub const DEFAULT_EF: usize = 192;

/// Index lists probed per query by default.
pub const DEFAULT_NPROBE: usize = 16;

/// How hard [`crate::Store::search_ann_with`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnSearch {
    /// Candidate images rescored exactly (at least k).
    pub ef: usize,
    /// Index lists whose entries are scored.
    pub nprobe: usize,
}

impl Default for AnnSearch {
    fn default() -> Self {
        Self {
            ef: DEFAULT_EF,
            nprobe: DEFAULT_NPROBE,
        }
    }
}

/// What the ANN index holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnInfo {
    /// Rows covered (superseded and deleted rows too; they are filtered at query time).
    pub rows: usize,
    /// Index entries: rows * vectors_per_image.
    pub points: usize,
    pub vectors_per_image: usize,
    /// IVF lists (centroids).
    pub lists: usize,
    /// Segment files a query visits.
    pub segments: usize,
    /// Rows the centroids were trained on.
    pub trained_rows: usize,
}

/// How to create or open a writable store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Identifies the model whose embeddings the store holds (e.g. `repo@revision` or a weights
    /// hash). Opening an existing store with another fingerprint is an error.
    pub fingerprint: String,
    /// Q: query vectors per image (32 for BLIP-2).
    pub num_query: usize,
    /// E: embedding dimension (256 for BLIP-2).
    pub dim: usize,
    /// On-disk dtype of the embeddings; applies when the store is created, an existing store
    /// keeps its own.
    pub dtype: Dtype,
    /// HNSW parameters; apply when the store is created.
    pub hnsw: HnswParams,
}

impl StoreOptions {
    pub fn new(fingerprint: impl Into<String>, num_query: usize, dim: usize) -> Self {
        Self {
            fingerprint: fingerprint.into(),
            num_query,
            dim,
            dtype: Dtype::F32,
            hnsw: HnswParams::default(),
        }
    }

    pub fn with_dtype(mut self, dtype: Dtype) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn with_hnsw(mut self, hnsw: HnswParams) -> Self {
        self.hnsw = hnsw;
        self
    }
}

/// What a photo's EXIF block says about it, read at ingest. Every field is optional: most
/// screenshots and edited files carry none of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhotoMeta {
    /// When the photo was taken (`DateTimeOriginal`, else `DateTimeDigitized`), as the camera's
    /// clock showed it: seconds from 1970-01-01T00:00:00 to that wall-clock time, no time zone
    /// applied (most cameras record none). Filters compare wall-clock times.
    pub taken_at: Option<i64>,
    /// `OffsetTimeOriginal` (or `OffsetTimeDigitized`): the clock's offset east of UTC, in
    /// minutes, when the camera recorded one; `taken_at - offset * 60` is then the UTC instant.
    pub taken_offset_min: Option<i16>,
    /// `Make` and `Model`, trimmed of padding.
    pub camera_make: Option<String>,
    pub camera_model: Option<String>,
    /// `GPSLatitude`/`GPSLongitude` in signed decimal degrees (south and west negative).
    pub gps_lat: Option<f64>,
    pub gps_lon: Option<f64>,
}

impl PhotoMeta {
    /// "Make Model", without repeating a make that the model already starts with
    /// ("Canon Canon EOS 5D" reads "Canon EOS 5D").
    pub fn camera(&self) -> Option<String> {
        match (self.camera_make.as_deref(), self.camera_model.as_deref()) {
            (None, None) => None,
            (Some(m), None) | (None, Some(m)) => Some(m.to_string()),
            (Some(make), Some(model)) => {
                let first = make.split_whitespace().next().unwrap_or(make);
                if model.to_lowercase().starts_with(&first.to_lowercase()) {
                    Some(model.to_string())
                } else {
                    Some(format!("{make} {model}"))
                }
            }
        }
    }

    /// Both coordinates, when the photo has a location.
    pub fn location(&self) -> Option<(f64, f64)> {
        Some((self.gps_lat?, self.gps_lon?))
    }
}

/// One image to add. Image identity is its content: adding a record whose `content_hash` is
/// already live in the store updates that image (same `image_id`) instead of adding a second one.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    /// Primary path.
    pub path: String,
    /// Every path known to hold these bytes; `path` is added if missing.
    pub paths: Vec<String>,
    /// Lowercase hex BLAKE3 of the file bytes (see [`crate::content_hash_file`]).
    pub content_hash: String,
    pub width: u32,
    pub height: u32,
    pub file_size: u64,
    /// Modification time of `path`, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Q*E unit vectors, row-major `[Q][E]` (the model's normalized `image_embeds`).
    pub embeds: Vec<f32>,
    pub caption: Option<String>,
    /// What the photo's EXIF says; `None` = not read (an image keeps the metadata it has).
    pub meta: Option<PhotoMeta>,
}

/// The current metadata of one image (embeddings via [`crate::Store::embeds`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRow {
    pub image_id: u64,
    pub path: String,
    pub paths: Vec<String>,
    pub content_hash: String,
    pub width: u32,
    pub height: u32,
    pub file_size: u64,
    pub mtime_ns: i64,
    pub caption: Option<String>,
    /// EXIF metadata; `None` for images indexed before blipdex read it (the next ingest adds
    /// it without re-embedding them), `Some` with empty fields for photos without EXIF.
    pub meta: Option<PhotoMeta>,
    pub deleted: bool,
    /// When the row holding this image's embeddings was committed, ns since the Unix epoch.
    pub ingested_at_ns: i64,
}

/// One search result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub image_id: u64,
    /// ITC score: max over the image's Q query vectors of dot(q, text).
    pub score: f32,
    /// Which query vector gave the max.
    pub query: u16,
}

/// Where a commit's time went (for ingest progress logs and the benchmark).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitTimings {
    /// Planning, writing and fsyncing the Parquet files and the manifest.
    pub data: std::time::Duration,
    /// Computing, assigning and writing the new rows' index entries (one segment).
    pub index_insert: std::time::Duration,
    /// Index maintenance: merging segments, or retraining the centroids and rebuilding every
    /// row's entries (see the crate docs for how often).
    pub index_merge: std::time::Duration,
}

/// What [`crate::Store::commit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// Manifest generation after the commit (compare with [`crate::Store::read_generation`]).
    pub generation: u64,
    /// One id per [`crate::Batch::add`], in call order.
    pub ids: Vec<u64>,
    /// Always true since store format v2, where the index is part of every commit.
    pub index_persisted: bool,
    pub timings: CommitTimings,
}
