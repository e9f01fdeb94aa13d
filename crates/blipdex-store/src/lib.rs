//! The blipdex embedded store: BLIP-2 image embeddings and metadata in Parquet shards under an
//! atomically replaced manifest, memory-mapped for reading, with exact and approximate (IVF,
//! hnsw_rs coarse quantizer) text-to-image search.
//!
//! # Use
//!
//! ```no_run
//! use blipdex_store::{Batch, ImageRecord, Store, StoreOptions};
//! # fn main() -> blipdex_core::Result<()> {
//! let mut store = Store::create_or_open("index", StoreOptions::new("Salesforce/blip2-itm-vit-g@main", 32, 256))?;
//! let mut batch = Batch::new();
//! # let (path, bytes, embeds): (String, Vec<u8>, Vec<f32>) = Default::default();
//! batch.add(ImageRecord {
//!     path: path.clone(),
//!     paths: vec![path],
//!     content_hash: blipdex_store::content_hash_bytes(&bytes),
//!     width: 640,
//!     height: 480,
//!     file_size: bytes.len() as u64,
//!     mtime_ns: 0,
//!     embeds, // Q*E unit vectors from the model
//!     caption: None,
//!     meta: None,
//! });
//! let ids = store.commit(batch)?.ids;
//!
//! let reader = Store::open_readonly("index")?; // e.g. in the server
//! # let text_embedding = vec![0f32; 256];
//! let hits = reader.search_ann(&text_embedding, 10, blipdex_store::DEFAULT_EF)?;
//! # Ok(()) }
//! ```
//!
//! # On disk
//!
//! ```text
//! index/
//!   manifest.json                  the commit point (below)
//!   LOCK                           flock'd by the one writer
//!   shard-<gen>.parquet            image rows added by commit <gen>: the source of truth
//!   shard-<gen>.rows               the same rows, fixed-width and memory-mapped (derived)
//!   patch-<gen>.parquet            changed mutable fields of earlier rows, from commit <gen>
//!   ivf-<gen>.centroids            IVF list centroids, trained at commit <gen> (derived)
//!   ivf-<gen>-<i>.seg              IVF entries of a contiguous range of rows (derived)
//!   .tmp-*                         in-flight writes; garbage after a crash
//! ```
//!
//! Shard schema (Parquet, zstd, Arrow schema embedded; key-value metadata
//! `blipdex.model_fingerprint`, `blipdex.num_query`, `blipdex.dim`, `blipdex.kind`):
//!
//! | column | type |
//! |---|---|
//! | `image_id` | uint64, assigned by the store, never reused |
//! | `path` | utf8, primary path (the one `file_size`/`mtime` describe); a path that is not UTF-8 in `blipdex_core::paths`' escaped form |
//! | `paths` | `list<utf8>`, every path holding identical bytes |
//! | `content_hash` | utf8, lowercase hex BLAKE3 of the bytes |
//! | `width`, `height` | uint32 |
//! | `file_size` | uint64 |
//! | `mtime` | timestamp[ns, UTC] |
//! | `image_embeds` | `fixed_size_list<float32 or float16, Q*E>`, `[Q][E]` row-major, byte-stream-split encoded |
//! | `caption` | utf8, nullable |
//! | `deleted` | bool |
//! | `ingested_at` | timestamp[ns, UTC] |
//! | `model_fingerprint` | utf8 |
//!
//! Patch files hold `image_id, path, paths, caption, deleted, updated_at`: the complete new
//! values of an image's mutable fields.
//!
//! `manifest.json` holds the format version (2), `generation` (bumped by every manifest write),
//! `index_id` (drawn when the store is created and kept by every write, so that a reader tells a
//! later generation from an index deleted and built again in the same place),
//! `model_fingerprint`, `num_query` (Q), `dim` (E), `dtype`, `next_image_id`, the total row
//! count, the shard and patch files (each with the generation that added it and its row count),
//! the index parameters, and the IVF state: the centroid file, its list count and the rows it
//! was trained on, and the segments with the row range and entry count of each. Every name in
//! it must be a plain file name with one of the store's prefixes (anything else is refused as a
//! corrupt manifest, so a damaged manifest can never make the store open or delete a file
//! outside the directory), and Q and E are at most 65536.
//!
//! The row files and the IVF files are derived from the Parquet shards: a writable open that
//! finds one missing, truncated or foreign (checked: magic, version, shape, row count, section
//! offsets, file length) rebuilds it and says so in a warning; a reader names the file in its
//! error. Their layouts are documented in `rows.rs` and `ivf.rs`: little-endian sections on
//! 64-byte boundaries, read in place through a memory map.
//!
//! The vectors are stored once, in the shard: its `image_embeds` pages are PLAIN and
//! uncompressed, so each row's Q*E values are contiguous bytes of the Parquet file, located
//! through its offset index when the row file is written and compared there with the values
//! written; the row file records those offsets and the shard's length (both checked at open).
//! zstd saved 7% of f16 embeddings and 13% of byte-stream-split f32, for a second, decoded copy.
//! Shards from earlier releases (compressed pages) get a row file holding a copy of the vectors
//! instead; compaction rewrites them.
//!
//! # What a reader holds in memory
//!
//! Opening maps every row file and segment and reads only two small sections of each row file
//! (the image ids and deleted flags) and the patch files: nothing is decoded from Parquet and no
//! graph is rebuilt, so start-up does not depend on the size of the embeddings. What stays in
//! anonymous memory is per image: 4 bytes of image-id -> row map and one live bit per row; plus
//! the patched fields of images changed since their row was written (deletes, moves, captions
//! from `serve`: compaction folds them into shards), the IVF centroids (nlist x E f32, a few MB)
//! and the hnsw_rs graph over them. The path and hash lookups a writer needs (about 150 bytes
//! per image) are built on first use. Vectors, strings and index entries are read from the page
//! cache; searching touches the IVF entries of the probed lists and the vectors of the images it
//! rescores, so the page cache a fast search wants is the IVF files plus, ideally, the shards'
//! embedding pages (Q*E*4 bytes per image in f32, half that in f16: for millions of images on
//! one machine, create the index with `dtype` f16).
//!
//! # Updates: append-only rows plus patch files
//!
//! Files are never modified. The current state is a replay in generation order, a commit's
//! shard before its patch file:
//!
//! * a shard row makes that row the image's current one (a later row for the same `image_id`
//!   supersedes an earlier one, e.g. when identical bytes are added again with new embeddings);
//! * a patch row overwrites the image's `path`, `paths`, `caption` and `deleted`.
//!
//! So deleting, captioning or moving an image writes a few bytes, not its 32 KiB of embeddings.
//! A shard's `caption`/`deleted` columns are as of its commit; to read current state outside
//! Rust, take the last row per `image_id` over the manifest's shards (in manifest order) and
//! overwrite its mutable fields from the last patch row for that `image_id` whose file's
//! generation is not older than the row's (a commit never holds both a row and a patch for one
//! image). [`Store::compact`] rewrites everything as fresh shards without patches, superseded
//! or deleted rows.
//!
//! Image identity is content: one live image per `content_hash`, one live image per path. An
//! added record whose path belonged to another image takes it away (a file changed in place);
//! an image left without paths is deleted. Incremental ingest: [`Store::by_path`] with the same
//! `file_size` and `mtime_ns` = unchanged; else hash, and [`Store::by_content_hash`] finds
//! moved/copied files ([`Batch::add_path`]) without re-embedding.
//!
//! # Crash safety
//!
//! One writer per directory (an flock on `LOCK`, released by the OS on a crash). A commit:
//!
//! 1. writes each new file (shard, its row file, patch file, the new rows' IVF segment or the
//!    segment that merges them with others, new centroids and segments when it retrains) as
//!    `.tmp-*`, fsyncs it and renames it to its final name (a name with this commit's
//!    generation, never an existing committed name), then fsyncs the directory;
//! 2. writes the new manifest as `.tmp-*`, fsyncs, renames it over `manifest.json` and fsyncs
//!    the directory: the commit point, for the data and the index together;
//! 3. removes the files only the previous manifest named (merged segments, old centroids).
//!
//! A kill at any point leaves the old or the new manifest, and both name only complete,
//! fsynced files; readers never see rows the index does not cover. Files the manifest does
//! not name (temp files, files of an uncommitted generation, replaced segments) are deleted by
//! the next writable open. Rows are keyed by `image_id`, so a replay can neither lose nor
//! double an image. Readers never lock: they read the manifest once and retry if a concurrent
//! commit removed a file they needed; a file they have mapped stays readable after its unlink.
//!
//! A store written by blipdex before format v2 (all rows decoded into RAM at open, an hnsw_rs
//! dump) is refused by readers with a message naming `blipdex index upgrade`; a writable open
//! upgrades it in place: it builds each shard's row file (kept if the upgrade is interrupted),
//! then the IVF index, and switches with one manifest write.
//!
//! # Search
//!
//! Score of an image for a unit text embedding t: max over its Q unit query vectors q of
//! dot(q, t) (BLIP-2's ITC score), computed on the stored values of the Parquet column.
//! [`Store::search_exact`] scans every live image in parallel.
//! [`Store::search_ann`] asks the IVF index for candidates and rescores them exactly, so every
//! returned score is exact; only membership is approximate. Deleted and superseded rows stay
//! in the index and are skipped while scanning; [`Store::compact`] drops them.
//!
//! ## The ANN index
//!
//! Each image is represented by `vectors_per_image` = m k-means centroids of its Q query vectors
//! ([`HnswParams`]; m = 4 by default: a second subject in a photo keeps its own centroid, where
//! the mean of all 32 loses it). Each representative is stored int8-quantized in the inverted
//! list of its nearest IVF centroid (about 2 sqrt(N*m) lists). A query finds the `nprobe`
//! nearest centroids (an AVX2 scan up to 8192 lists, hnsw_rs above), scores every live entry of
//! those lists with an integer dot product, and rescores the best `ef` distinct images exactly.
//! Defaults: `nprobe` = [`DEFAULT_NPROBE`], `ef` = [`DEFAULT_EF`].
//!
//! Why this shape (measured: figures in the README's index section and `blipdex bench
//! search`): the hnsw_rs graph over the representatives (the format before v2) kept ~1.8 KB of
//! RAM per graph point plus the f32 embeddings for rescoring in memory, and re-dumped the whole
//! graph at every commit; hnsw_rs can map a dump's vectors but not its neighbour lists. An
//! inverted file keeps its entries in immutable, mapped segments that a commit appends to, so
//! memory, start-up and commit cost stop growing with the index; hnsw_rs stays the graph
//! library, as the coarse quantizer over a few thousand centroids.
//!
//! Segments: a commit writes one segment for its rows; eight segments of one size class
//! (entries counted in powers of 8) merge into one, so a query visits at most 7 per class
//! and each entry is copied O(log8 N) times. The centroids are trained on up to 2^18
//! representatives sampled evenly over the rows, and retrained, with every row's entries
//! rebuilt, each time the index has grown fourfold since the last training: the total rebuild
//! work over an index's life is under 1.4 times its size, and between trainings the lists are
//! at most about twice their ideal length.

mod fsutil;
mod ivf;
mod kernels;
mod manifest;
mod rows;
mod search;
mod shard;
mod state;
mod store;
pub mod synth;
mod types;

/// Writes `dir/name` durably and atomically (a fsynced temporary file renamed over it, then the
/// directory fsynced): readers see the old bytes or the new, never a part.
pub fn write_atomic(dir: &std::path::Path, name: &str, bytes: &[u8]) -> blipdex_core::Result<()> {
    fsutil::replace_atomic(dir, name, bytes)
}

pub use ivf::DotDist;
pub use kernels::kernel_path;
pub use manifest::{is_store_file, manifest_info, ManifestInfo, MANIFEST};
pub use store::{content_hash_bytes, content_hash_file, Batch, IndexVersion, Store};
pub use types::{
    AnnInfo, AnnSearch, CommitInfo, CommitTimings, Dtype, Hit, HnswParams, ImageRecord, ImageRow,
    PhotoMeta, StoreOptions, DEFAULT_EF, DEFAULT_NPROBE,
};
