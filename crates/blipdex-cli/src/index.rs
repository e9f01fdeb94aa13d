//! `blipdex index`: maintenance of an index directory that needs no model.

use std::path::PathBuf;

use blipdex_store::Store;
use clap::{Args, Subcommand};
use serde_json::json;

#[derive(Args, Debug)]
pub struct IndexArgs {
    #[command(subcommand)]
    pub command: IndexCommand,
}

#[derive(Subcommand, Debug)]
pub enum IndexCommand {
    /// Upgrade an index written by an earlier blipdex to this build's store format, in place:
    /// builds the row files and the ANN index from the Parquet shards, then switches in one
    /// atomic manifest write (an interrupted upgrade resumes where it stopped).
    Upgrade(IndexDir),
    /// Rewrite the index without deleted or superseded rows and retrain its ANN index.
    Compact(IndexDir),
    /// Print what the index holds (rows, live images, format, ANN index).
    Info(IndexDir),
    /// Fold the finished parts of `ingest --shard I/N` workers (<index>/parts/) into the index:
    /// new images added with their embeddings, duplicates across shards become one image with
    /// all its paths. Idempotent; a server reading the index picks each commit up.
    Merge(MergeArgs),
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The index: a directory, or an object-store prefix (s3://bucket/index) whose parts and
    /// index are merged in a local copy and published as one new generation.
    #[arg(long, env = "BLIPDEX_INDEX")]
    pub index: String,
    #[command(flatten)]
    pub remote: crate::args::RemoteArgs,
}

#[derive(Args, Debug)]
pub struct IndexDir {
    /// The index directory.
    #[arg(long, env = "BLIPDEX_INDEX")]
    pub index: PathBuf,
}

fn info(store: &Store) -> serde_json::Value {
    let a = store.ann_info();
    json!({
        "index": store.dir().display().to_string(),
        "generation": store.generation(),
        "model_fingerprint": store.model_fingerprint(),
        "images": store.len(),
        "rows": store.total_rows(),
        "dtype": store.dtype().to_string(),
        "shards": store.shards(),
        // Written before vectors were read in place from the shards: `blipdex index compact`.
        "shards_with_vector_copies": store.shards_with_vector_copies(),
        "ann": {"lists": a.lists, "segments": a.segments, "entries": a.points, "vectors_per_image": a.vectors_per_image, "trained_rows": a.trained_rows},
    })
}

pub fn run(args: &IndexArgs) -> anyhow::Result<()> {
    match &args.command {
        IndexCommand::Upgrade(d) => {
            let before = Store::read_format_version(&d.index)?;
            let store = Store::open_writable(&d.index)?;
            let mut v = info(&store);
            v["upgraded_from_format"] = before.into();
            v["format"] = Store::read_format_version(&d.index)?.into();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        IndexCommand::Compact(d) => {
            let mut store = Store::open_writable(&d.index)?;
            let rows = store.total_rows();
            let c = store.compact()?;
            let mut v = info(&store);
            v["rows_before"] = rows.into();
            v["seconds"] = (c.timings.data + c.timings.index_insert)
                .as_secs_f64()
                .into();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        IndexCommand::Merge(d) => {
            let summary = if blipdex_remote::is_url(&d.index) {
                let remote = blipdex_remote::Remote::open(&d.index, &d.remote.options())?;
                blipdex_ingest::merge_remote(&remote, &d.remote.cache_dir()?)?
            } else {
                blipdex_ingest::merge(std::path::Path::new(&d.index))?
            };
            println!("{}", serde_json::to_string(&summary)?);
        }
        IndexCommand::Info(d) => {
            let store = Store::open_readonly(&d.index)?;
            let mut v = info(&store);
            v["format"] = Store::read_format_version(&d.index)?.into();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}
