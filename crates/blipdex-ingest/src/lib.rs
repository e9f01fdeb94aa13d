//! `blipdex ingest`: walk photo folders, decode and embed new or changed images, and commit
//! them to the store in atomic batches so that a crash loses at most the uncommitted batch.

pub mod exif;
pub mod job;
pub mod listing;
pub mod merge;
pub mod pipeline;
pub mod walk;

pub use job::{IngestJob, ProgressMode, Shard};
pub use merge::{merge, merge_remote, MergeSummary};
pub use pipeline::{ingest, ingest_with, IngestModels, IngestSummary};
