//! `blipdex search`: ITC search (ANN or exact) with optional ITM reranking.

use std::path::PathBuf;

use anyhow::{bail, Context};
use blipdex_search::{Engine, EngineOptions, SearchParams};
use clap::Args;

use crate::args::ModelArgs;

/// Most results one query may ask for.
const MAX_TOP_K: usize = 10_000;

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// Index directory (built by `blipdex ingest`).
    #[arg(long, env = "BLIPDEX_INDEX")]
    pub index: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to look for, in words (at most 4096 bytes).
    #[arg(long, env = "BLIPDEX_QUERY")]
    pub query: String,
    /// Hits to return.
    #[arg(long, env = "BLIPDEX_TOP_K", default_value_t = 10)]
    pub top_k: usize,
    /// Rerank the first N hits by ITM match probability (recomputed from the image files).
    #[arg(long, env = "BLIPDEX_RERANK", default_value_t = 0)]
    pub rerank: usize,
    /// Brute-force ITC over every image instead of the ANN index.
    #[arg(long, env = "BLIPDEX_EXACT")]
    pub exact: bool,
    /// ANN search breadth: images rescored exactly (larger = better recall, slower).
    #[arg(long, env = "BLIPDEX_EF", default_value_t = blipdex_store::DEFAULT_EF)]
    pub ef: usize,
    /// Print one JSON object: {"hits": [{image_id, path, itc_score, and itm_score, caption or
    /// error where present}]}.
    #[arg(long, env = "BLIPDEX_JSON")]
    pub json: bool,
}

pub fn run(args: &SearchArgs) -> anyhow::Result<()> {
    if args.query.trim().is_empty() {
        bail!("empty --query");
    }
    if args.top_k == 0 || args.top_k > MAX_TOP_K {
        bail!("--top-k must be between 1 and {MAX_TOP_K}");
    }
    let files = args.model.resolve()?;
    let mut opts = EngineOptions::new(&args.index, files);
    opts.load = args.model.load_options()?;
    let engine = Engine::load(&opts)?;
    let store = engine.store();
    let t = engine
        .embed_texts(&[args.query.as_str()])?
        .pop()
        .context("no text embedding")?;
    let params = SearchParams {
        top_k: args.top_k.max(args.rerank),
        exact: args.exact,
        ef: args.ef,
        ..Default::default()
    };
    let mut out = engine.search_text(&store, &t, &params)?;
    engine.rerank(&store, &args.query, &mut out, args.rerank)?;
    out.truncate(args.top_k);

    if args.json {
        let hits: Vec<serde_json::Value> = out
            .iter()
            .map(|h| {
                let mut v = serde_json::json!({
                    "image_id": h.image_id,
                    "path": h.path,
                    "itc_score": h.itc_score,
                });
                for (k, val) in [
                    ("itm_score", h.itm_score.map(serde_json::Value::from)),
                    ("caption", h.caption.clone().map(serde_json::Value::from)),
                    ("error", h.error.clone().map(serde_json::Value::from)),
                ] {
                    if let Some(val) = val {
                        v[k] = val;
                    }
                }
                v
            })
            .collect();
        println!("{}", serde_json::json!({ "hits": hits }));
    } else {
        for (rank, h) in out.iter().enumerate() {
            let itm = h
                .itm_score
                .map(|p| format!("  itm {p:.4}"))
                .unwrap_or_default();
            let err = h
                .error
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default();
            println!("{:>3}. {:.4}{itm}  {}{err}", rank + 1, h.itc_score, h.path);
        }
    }
    Ok(())
}
