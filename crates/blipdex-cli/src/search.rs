//! `blipdex search`: ITC search (ANN or exact) with optional ITM reranking.

use std::path::PathBuf;

use anyhow::{bail, Context};
use blipdex_model::image::{ImageConfig, ImageProcessor};
use blipdex_model::tokenizer::TextTokenizer;
use blipdex_model::Blip2;
use blipdex_store::Store;
use candle_core::{Device, Tensor};
use clap::Args;
use serde::Serialize;

use crate::args::ModelArgs;

/// Most results one query may ask for.
const MAX_TOP_K: usize = 10_000;

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[arg(long, env = "BLIPDEX_INDEX")]
    pub index: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, env = "BLIPDEX_QUERY")]
    pub query: String,
    #[arg(long, env = "BLIPDEX_TOP_K", default_value_t = 10)]
    pub top_k: usize,
    /// Rerank the first N hits by ITM match probability (recomputed from the image files).
    #[arg(long, env = "BLIPDEX_RERANK", default_value_t = 0)]
    pub rerank: usize,
    /// Brute-force ITC over every image instead of the HNSW index.
    #[arg(long, env = "BLIPDEX_EXACT")]
    pub exact: bool,
    /// HNSW search breadth (larger = better recall, slower).
    #[arg(long, env = "BLIPDEX_EF", default_value_t = blipdex_store::DEFAULT_EF)]
    pub ef: usize,
    #[arg(long, env = "BLIPDEX_JSON")]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct HitOut {
    image_id: u64,
    path: String,
    itc_score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    itm_score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    caption: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn run(args: &SearchArgs) -> anyhow::Result<()> {
    if args.query.trim().is_empty() {
        bail!("empty --query");
    }
    if args.top_k == 0 || args.top_k > MAX_TOP_K {
        bail!("--top-k must be between 1 and {MAX_TOP_K}");
    }
    let store = Store::open_readonly(&args.index)?;
    let files = args.model.resolve()?;
    let fingerprint = files.fingerprint()?;
    if fingerprint != store.model_fingerprint() {
        bail!(
            "index {} was built with model {} but --model {} is {fingerprint}; \
             search with the checkpoint that built the index, or re-ingest",
            args.index.display(),
            store.model_fingerprint(),
            files.name
        );
    }
    let model = Blip2::load(&files, &args.model.load_options()?)?;
    let heads = model
        .retrieval
        .as_ref()
        .context("the checkpoint has no retrieval heads")?;
    let tokenizer = TextTokenizer::from_model_dir(&files.dir)?;
    let enc = tokenizer.encode_batch(
        &[args.query.as_str()],
        Some(heads.embeddings.max_positions()),
    )?;
    let dev = model.device();
    let len = enc.input_ids[0].len();
    let ids = Tensor::from_vec(enc.input_ids[0].clone(), (1, len), dev)?;
    let mask = Tensor::from_vec(enc.attention_mask[0].clone(), (1, len), dev)?;
    let text = model.text_embeds(&ids, &mask)?;
    let t: Vec<f32> = text.flatten_all()?.to_vec1()?;

    let k = args.top_k.max(args.rerank);
    let hits = if args.exact {
        store.search_exact(&t, k)?
    } else {
        store.search_ann(&t, k, args.ef)?
    };
    let mut out: Vec<HitOut> = hits
        .iter()
        .filter_map(|h| {
            store.get(h.image_id).map(|row| HitOut {
                image_id: h.image_id,
                path: row.path.clone(),
                itc_score: h.score,
                itm_score: None,
                caption: row.caption.clone(),
                error: None,
            })
        })
        .collect();

    if args.rerank > 0 {
        let processor = ImageProcessor::new(ImageConfig::from_model_dir(&files.dir)?)
            .with_exif_orientation(true);
        let n = args.rerank.min(out.len());
        for hit in out.iter_mut().take(n) {
            match itm_score(&model, &processor, &store, hit, &ids, &mask) {
                Ok(p) => hit.itm_score = Some(p),
                Err(e) => hit.error = Some(format!("{e:#}")),
            }
        }
        // Reranked hits first, by match probability; the rest keep their ITC order.
        let (mut head, tail): (Vec<_>, Vec<_>) =
            out.into_iter().enumerate().partition(|(i, _)| *i < n);
        head.sort_by(|a, b| {
            b.1.itm_score
                .unwrap_or(f32::NEG_INFINITY)
                .total_cmp(&a.1.itm_score.unwrap_or(f32::NEG_INFINITY))
        });
        out = head.into_iter().chain(tail).map(|(_, h)| h).collect();
    }
    out.truncate(args.top_k);

    if args.json {
        println!("{}", serde_json::json!({ "hits": out }));
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

/// ITM needs the vision states, which the index does not keep: recompute them from the file,
/// after checking that it still holds the bytes that were indexed.
fn itm_score(
    model: &Blip2,
    processor: &ImageProcessor,
    store: &Store,
    hit: &HitOut,
    ids: &Tensor,
    mask: &Tensor,
) -> anyhow::Result<f32> {
    let row = store
        .get(hit.image_id)
        .context("image vanished from the index")?;
    let path = row
        .paths
        .iter()
        .find(|p| std::path::Path::new(p).is_file())
        .with_context(|| format!("no copy of {} exists any more", row.path))?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
    if blake3::hash(&bytes).to_hex().as_str() != row.content_hash {
        bail!("{path} changed since it was indexed; re-run ingest");
    }
    let img = processor.load_bytes(&bytes, path)?;
    let (h, w) = (processor.config.height, processor.config.width);
    let px = Tensor::from_vec(processor.preprocess(&img)?, (1, 3, h, w), &Device::Cpu)?;
    let vision = model.get_image_features(&px)?;
    let logits = model.itm_logits(&vision, ids, mask)?;
    let p = Blip2::itm_probability(&logits)?;
    Ok(p.flatten_all()?.to_vec1::<f32>()?[0])
}
