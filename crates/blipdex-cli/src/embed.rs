//! `blipdex embed`: the model's tensors for given images and texts, as transformers names them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use blipdex_model::caption::LanguageHead;
use blipdex_model::opt::LinearStorage;
use blipdex_model::tokenizer::TextTokenizer;
use blipdex_model::Blip2;
use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::args::{ImageInputArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: ImageInputArgs,
    /// Text to embed (repeatable).
    #[arg(long = "text", env = "BLIPDEX_TEXTS")]
    pub texts: Vec<String>,
    /// Also compute ITM logits for every image × text pair.
    #[arg(long, env = "BLIPDEX_ITM")]
    pub itm: bool,
    /// Where to write the tensors (safetensors, f32).
    #[arg(long, env = "BLIPDEX_OUTPUT")]
    pub output: PathBuf,
}

pub fn run(args: &EmbedArgs) -> anyhow::Result<()> {
    if args.input.is_empty() && args.texts.is_empty() {
        bail!("nothing to embed: give --image, --pixel-values or --text");
    }
    if args.itm && (args.texts.is_empty() || args.input.is_empty()) {
        bail!("--itm needs both images (--image or --pixel-values) and --text");
    }
    let (files, model) = args.model.load()?;
    // A captioning checkpoint (Blip2Model / Blip2ForConditionalGeneration) has OPT instead of
    // the retrieval heads: export what transformers' Blip2Model gives for it.
    let language = if model.retrieval.is_none() {
        Some(LanguageHead::load(
            &files,
            &args.model.load_options()?,
            LinearStorage::Float,
        )?)
    } else {
        None
    };
    let mut out: HashMap<String, Tensor> = HashMap::new();

    let pixel_values = args.input.load(&files.dir)?.map(|(px, _)| px);

    let mut vision = None;
    if let Some(px) = &pixel_values {
        let (v, q) = image_features(&model, px, args.input.batch_size())?;
        out.insert("pixel_values".into(), px.clone());
        if model.retrieval.is_some() {
            out.insert("image_embeds".into(), model.image_embeds(&q)?);
        }
        if let Some(lm) = &language {
            out.insert(
                "language_model_inputs".into(),
                lm.language_model_inputs(&q)?,
            );
        }
        out.insert("qformer_last_hidden_state".into(), q);
        vision = Some(v);
    }

    if let Some(v) = &vision {
        out.insert("vision_last_hidden_state".into(), v.clone());
    }
    if !args.texts.is_empty() {
        let tokenizer = TextTokenizer::from_model_dir(&files.dir)?;
        let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
        let dev = model.device();
        let Some(heads) = &model.retrieval else {
            let lm = language.as_ref().context("no language model")?;
            let enc = tokenizer.encode_batch(&texts, Some(lm.config().max_position_embeddings))?;
            let ids = to_tensor(&enc.input_ids, dev)?;
            let mask = to_tensor(&enc.attention_mask, dev)?;
            out.insert("text_features".into(), lm.text_features(&ids, &mask)?);
            return save(out, &args.output);
        };
        let enc = tokenizer.encode_batch(&texts, Some(heads.embeddings.max_positions()))?;
        let ids = to_tensor(&enc.input_ids, dev)?;
        let mask = to_tensor(&enc.attention_mask, dev)?;
        let text_embeds = model.text_embeds(&ids, &mask)?;
        if let Some(image_embeds) = out.get("image_embeds") {
            out.insert(
                "itc_scores".into(),
                Blip2::itc_scores(image_embeds, &text_embeds)?,
            );
        }
        if args.itm {
            if let Some(v) = &vision {
                out.insert("itm_logits".into(), model.itm_logits(v, &ids, &mask)?);
            }
        }
        out.insert("text_embeds".into(), text_embeds);
    }

    save(out, &args.output)
}

/// Writes the tensors as f32 on the CPU, named as given.
fn save(out: HashMap<String, Tensor>, path: &Path) -> anyhow::Result<()> {
    let out = out
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    candle_core::safetensors::save(&out, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let mut names: Vec<_> = out
        .iter()
        .map(|(k, t)| format!("{k} {:?}", t.dims()))
        .collect();
    names.sort();
    eprintln!("wrote {}: {}", path.display(), names.join(", "));
    Ok(())
}

/// Vision states and Q-Former features, `batch` images at a time.
fn image_features(model: &Blip2, px: &Tensor, batch: usize) -> anyhow::Result<(Tensor, Tensor)> {
    let n = px.dim(0)?;
    let (mut vs, mut qs) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(batch) {
        let chunk = px.narrow(0, start, batch.min(n - start))?;
        let v = model.get_image_features(&chunk)?;
        qs.push(model.get_qformer_features(&v)?);
        vs.push(v);
    }
    Ok((Tensor::cat(&vs, 0)?, Tensor::cat(&qs, 0)?))
}

fn to_tensor(rows: &[Vec<u32>], dev: &Device) -> anyhow::Result<Tensor> {
    let l = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), l), dev)?)
}
