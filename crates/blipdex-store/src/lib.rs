//! The blipdex embedded store: BLIP-2 image embeddings and metadata in Parquet shards under an
//! atomically replaced manifest, with exact and HNSW (hnsw_rs) text-to-image search.
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
//! });
//! let ids = store.commit(batch)?.ids;
//!
//! let reader = Store::open_readonly("index")?; // e.g. in the server
//! # let text_embedding = vec![0f32; 256];
//! let hits = reader.search_ann(&text_embedding, 10, 200)?;
//! # Ok(()) }
//! ```
//!
//! # On disk
//!
//! ```text
//! index/
//!   manifest.json                  the commit point (below)
//!   LOCK                           flock'd by the one writer
//!   shard-<gen>.parquet            image rows added by commit <gen>
//!   patch-<gen>.parquet            changed mutable fields of earlier rows, from commit <gen>
//!   hnsw-<gen>.hnsw.{graph,data}   hnsw_rs dump of the graph
//!   .tmp-*                         in-flight writes; garbage after a crash
//! ```
//!
//! Shard schema (Parquet, zstd, Arrow schema embedded; key-value metadata
//! `blipdex.model_fingerprint`, `blipdex.num_query`, `blipdex.dim`, `blipdex.kind`):
//!
//! | column | type |
//! |---|---|
//! | `image_id` | uint64, assigned by the store, never reused |
//! | `path` | utf8, primary path (the one `file_size`/`mtime` describe) |
//! | `paths` | list<utf8>, every path holding identical bytes |
//! | `content_hash` | utf8, lowercase hex BLAKE3 of the bytes |
//! | `width`, `height` | uint32 |
//! | `file_size` | uint64 |
//! | `mtime` | timestamp[ns, UTC] |
//! | `image_embeds` | fixed_size_list<float32 (or float16), Q*E>, [Q][E] row-major, byte-stream-split encoded |
//! | `caption` | utf8, nullable |
//! | `deleted` | bool |
//! | `ingested_at` | timestamp[ns, UTC] |
//! | `model_fingerprint` | utf8 |
//!
//! Patch files hold `image_id, path, paths, caption, deleted, updated_at`: the complete new
//! values of an image's mutable fields.
//!
//! `manifest.json` holds the format version, `generation` (bumped by every manifest write),
//! `model_fingerprint`, `num_query` (Q), `dim` (E), `dtype`, `next_image_id`, the total row
//! count, the shard and patch files (each with the generation that added it and its row count),
//! the HNSW parameters, and the HNSW dump's basename with the number of rows it covers.
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
//! Rust, take the last row per `image_id` over the manifest's shards and apply the last patch
//! row per `image_id` with a higher generation. [`Store::compact`] rewrites everything as fresh
//! shards without patches, superseded or deleted rows.
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
//! 1. writes each new Parquet file as `.tmp-*`, fsyncs it, renames it to its final name
//!    (`shard-<gen>`, never an existing committed name) and fsyncs the directory;
//! 2. writes the new manifest as `.tmp-*`, fsyncs, renames it over `manifest.json` and fsyncs
//!    the directory: the commit point;
//! 3. inserts the new rows into the in-memory HNSW graph, dumps it (hnsw_rs `file_dump`) under
//!    a new basename, fsyncs the files, and writes another manifest naming the dump; then
//!    removes the previous dump.
//!
//! A kill at any point leaves the old or the new manifest, and both name only complete,
//! fsynced files. Files the manifest does not name (temp files, shards of an uncommitted
//! generation, superseded dumps) are deleted by the next writable open. If the newest rows are
//! not in the dump (a crash between 2 and 3), opening inserts just those rows into the
//! reloaded graph: no rebuild at start-up. Rows are keyed by `image_id`, so a replay can neither
//! lose nor double an image. Readers never lock: they read the manifest once and retry if a
//! concurrent commit removed a file they needed.
//!
//! # Search
//!
//! Score of an image for a unit text embedding t: max over its Q unit query vectors q of
//! dot(q, t) (BLIP-2's ITC score). [`Store::search_exact`] scans every live image in parallel
//! (rayon). [`Store::search_ann`] asks the HNSW graph for the `ef` nearest points among live
//! rows, rescores their images exactly and returns the best k, so returned scores are always
//! exact.
//!
//! The graph holds `vectors_per_image` representatives per image ([`HnswParams`]): the
//! normalized mean of the Q vectors (1, default), k-means centroids, or all Q vectors (point id
//! `row * m + j`). Measured with `examples/bench_search.rs` (seeded synthetic 32x256 data: 1000
//! cluster centres, each query vector = centre + noise, text = noisy centre; 2-core machine,
//! recall@10 vs exact):
//!
//! BENCH_TABLE
//!
//! RAM per image: Q*E*4 bytes of f32 embeddings (32 KiB for BLIP-2) plus the graph (about
//! vectors_per_image * (E*4 + ~600) bytes with hnsw_rs at M=16).

mod ann;
mod fsutil;
mod kernels;
mod manifest;
mod search;
mod shard;
mod state;
mod store;
mod types;

pub use ann::{AnnInfo, DotDist};
pub use store::{content_hash_bytes, content_hash_file, Batch, Store};
pub use types::{
    CommitInfo, CommitTimings, Dtype, Hit, HnswParams, ImageRecord, ImageRow, StoreOptions,
};
