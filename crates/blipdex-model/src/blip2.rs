//! The BLIP-2 model as blipdex uses it: the shared image side (`vision_model`, `query_tokens`,
//! `qformer`) plus whichever heads the checkpoint carries. Retrieval checkpoints
//! (`Blip2ForImageTextRetrieval`) add the Q-Former text embeddings, the ITC projections and the
//! ITM head.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use blipdex_core::{Error, Result};

use crate::config::Blip2Config;
use crate::loading::ModelFiles;
use crate::qformer::{Blip2QFormerModel, Blip2TextEmbeddings};
use crate::vision::Blip2VisionModel;
use blipdex_kernels::profile::span;
use blipdex_kernels::{Kernels, Linear};

/// Pairs per Q-Former pass in ITM, bounding memory whatever N×M is.
const ITM_CHUNK: usize = 64;

pub(crate) fn terr(e: candle_core::Error) -> Error {
    Error::Tensor(e.to_string())
}

/// Where and in which precision the vision tower runs. The Q-Former always runs in f32.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// Which kernels run the model (blipdex's CUDA kernels, the fused CUDA attention).
    pub kernels: Kernels,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            kernels: Kernels::default(),
        }
    }
}

/// `Blip2ForImageTextRetrieval`'s heads.
pub struct RetrievalHeads {
    pub embeddings: Blip2TextEmbeddings,
    pub vision_projection: Linear,
    pub text_projection: Linear,
    pub itm_head: Linear,
}

impl RetrievalHeads {
    fn new(cfg: &Blip2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.set_dtype(DType::F32);
        let h = cfg.qformer_config.hidden_size;
        let e = cfg.image_text_hidden_size;
        let linear = |i, o, name| blipdex_kernels::linear_kn(i, o, vb.pp(name), cfg.kernels);
        Ok(Self {
            embeddings: Blip2TextEmbeddings::new(&cfg.qformer_config, vb.pp("embeddings"))?,
            vision_projection: linear(h, e, "vision_projection")?.named("itc_projection"),
            text_projection: linear(h, e, "text_projection")?.named("text_projection"),
            itm_head: linear(h, 2, "itm_head")?.named("itm_head"),
        })
    }
}

/// A checkpoint's `config.json`, its towers set to run on the load options' kernels.
pub(crate) fn read_config(files: &ModelFiles, opts: &LoadOptions) -> Result<Blip2Config> {
    Blip2Config::from_json_with(&files.read_config()?, opts.kernels).map_err(|e| {
        Error::bad_model(
            &files.name,
            format!("config.json is not a BLIP-2 config: {e}"),
        )
    })
}

pub struct Blip2 {
    pub config: Blip2Config,
    pub vision_model: Blip2VisionModel,
    pub query_tokens: Tensor,
    pub qformer: Blip2QFormerModel,
    pub retrieval: Option<RetrievalHeads>,
    device: Device,
}

impl Blip2 {
    pub fn load(files: &ModelFiles, opts: &LoadOptions) -> Result<Self> {
        if cfg!(feature = "mkl") && opts.device.is_cpu() && opts.dtype == DType::BF16 {
            return Err(Error::Unsupported(
                "bf16 on the CPU is not available in a `--features mkl` build (candle's MKL matmul \
                 has no bf16): use --dtype f32 or f16, or a build without mkl"
                    .into(),
            ));
        }
        let config = read_config(files, opts)?;
        let vb = open_weights(files, opts)?;
        Self::new(config, vb).map_err(|e| {
            Error::bad_model(&files.name, format!("weights do not fit config.json: {e}"))
        })
    }

    pub fn new(config: Blip2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let device = vb.device().clone();
        let vision_model = Blip2VisionModel::new(&config.vision_config, vb.pp("vision_model"))?;
        let query_tokens = vb.clone().set_dtype(DType::F32).get(
            (
                1,
                config.num_query_tokens,
                config.qformer_config.hidden_size,
            ),
            "query_tokens",
        )?;
        let qformer = Blip2QFormerModel::new(&config.qformer_config, vb.pp("qformer"))?;
        let wants_retrieval = config
            .architectures
            .iter()
            .any(|a| a == "Blip2ForImageTextRetrieval");
        let retrieval = if wants_retrieval || vb.contains_tensor("itm_head.weight") {
            Some(RetrievalHeads::new(&config, vb.clone())?)
        } else {
            None
        };
        Ok(Self {
            config,
            vision_model,
            query_tokens,
            qformer,
            retrieval,
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The vision input size the checkpoint was trained at (H, W).
    pub fn image_size(&self) -> (usize, usize) {
        self.config.vision_config.image_size.hw()
    }

    fn heads(&self) -> Result<&RetrievalHeads> {
        self.retrieval.as_ref().ok_or_else(|| {
            Error::Unsupported(
                "this checkpoint has no retrieval heads (ITC/ITM); use a Blip2ForImageTextRetrieval \
                 checkpoint such as Salesforce/blip2-itm-vit-g"
                    .into(),
            )
        })
    }

    /// `Blip2Model.get_image_features`: vision `last_hidden_state` [N, 1+P, Dv], in the model dtype.
    /// Inputs of another size than the checkpoint's get an interpolated position grid.
    pub fn get_image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let px = pixel_values
            .to_device(&self.device)
            .and_then(|p| p.to_dtype(self.vision_model.dtype()))
            .map_err(terr)?;
        self.vision_model.forward(&px).map_err(terr)
    }

    /// `Blip2Model.get_qformer_features` from vision states: [N, Q, Dq], f32.
    pub fn get_qformer_features(&self, vision_states: &Tensor) -> Result<Tensor> {
        let run = || -> candle_core::Result<Tensor> {
            let n = vision_states.dim(0)?;
            let q = self.query_tokens.expand((
                n,
                self.query_tokens.dim(1)?,
                self.query_tokens.dim(2)?,
            ))?;
            span("qformer", vision_states.device(), || {
                self.qformer
                    .forward(&q, q.dim(1)?, None, Some(vision_states))
            })
        };
        run().map_err(terr)
    }

    /// ITC image side: `normalize(vision_projection(qformer_features))` [N, Q, E].
    pub fn image_embeds(&self, qformer_features: &Tensor) -> Result<Tensor> {
        let heads = self.heads()?;
        heads
            .vision_projection
            .forward(qformer_features)
            .and_then(|p| l2_normalize(&p))
            .map_err(terr)
    }

    /// ITC text side: text-only Q-Former pass, `[CLS]` output, projected and normalized: [M, E].
    /// `input_ids`/`attention_mask` are [M, L] u32 without image placeholder tokens.
    pub fn text_embeds(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let heads = self.heads()?;
        let run = || -> candle_core::Result<Tensor> {
            let emb = heads.embeddings.forward(input_ids)?;
            let h = self.qformer.forward(&emb, 0, Some(attention_mask), None)?;
            let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
            l2_normalize(&heads.text_projection.forward(&cls)?)
        };
        run().map_err(terr)
    }

    /// ITC score: for each image and text the max over the Q query vectors of their cosine: [N, M].
    pub fn itc_scores(image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        let run = || -> candle_core::Result<Tensor> {
            let (n, q, e) = image_embeds.dims3()?;
            let m = text_embeds.dim(0)?;
            image_embeds
                .reshape((n * q, e))?
                .matmul(&text_embeds.t()?)?
                .reshape((n, q, m))?
                .max(1)
        };
        run().map_err(terr)
    }

    /// ITM logits [N, M, 2] ([not-match, match]) for every image × text pair: queries + text in
    /// one Q-Former pass with cross-attention to the vision states, `itm_head` averaged over the
    /// query positions.
    pub fn itm_logits(
        &self,
        vision_states: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let n = vision_states.dim(0).map_err(terr)?;
        let m = input_ids.dim(0).map_err(terr)?;
        let pairs: Vec<(u32, u32)> = (0..n * m)
            .map(|p| ((p / m) as u32, (p % m) as u32))
            .collect();
        self.itm_logits_pairs(vision_states, input_ids, attention_mask, &pairs)?
            .reshape((n, m, 2))
            .map_err(terr)
    }

    /// ITM logits [P, 2] for the given (image row, text row) pairs only, e.g. the pairs of many
    /// concurrent rerank requests batched together.
    pub fn itm_logits_pairs(
        &self,
        vision_states: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        pairs: &[(u32, u32)],
    ) -> Result<Tensor> {
        let heads = self.heads()?;
        let run = || -> candle_core::Result<Tensor> {
            let nq = self.query_tokens.dim(1)?;
            let hq = self.query_tokens.dim(2)?;
            if pairs.is_empty() {
                return Tensor::zeros((0, 2), DType::F32, &self.device);
            }
            let text = heads.embeddings.forward(input_ids)?; // [M, L, H]
            let vision = vision_states.to_dtype(DType::F32)?;
            let mut out = Vec::with_capacity(pairs.len().div_ceil(ITM_CHUNK));
            for chunk in pairs.chunks(ITM_CHUNK) {
                let len = chunk.len();
                let img_idx = Tensor::from_iter(chunk.iter().map(|p| p.0), &self.device)?;
                let txt_idx = Tensor::from_iter(chunk.iter().map(|p| p.1), &self.device)?;
                let v = vision.index_select(&img_idx, 0)?;
                let t = text.index_select(&txt_idx, 0)?;
                let tm = attention_mask.index_select(&txt_idx, 0)?;
                let q = self.query_tokens.expand((len, nq, hq))?;
                let embeds = Tensor::cat(&[&q, &t], 1)?;
                let qmask = Tensor::ones((len, nq), tm.dtype(), &self.device)?;
                let mask = Tensor::cat(&[&qmask, &tm], 1)?;
                let h = self.qformer.forward(&embeds, nq, Some(&mask), Some(&v))?;
                let logits = heads.itm_head.forward(&h.narrow(1, 0, nq)?)?.mean(1)?;
                out.push(logits);
            }
            Tensor::cat(&out, 0)
        };
        run().map_err(terr)
    }

    /// ITM match probability softmax(logits)[..., 1]: [N, M].
    pub fn itm_probability(logits: &Tensor) -> Result<Tensor> {
        candle_nn::ops::softmax_last_dim(logits)
            .and_then(|p| p.narrow(D::Minus1, 1, 1))
            .and_then(|p| p.squeeze(D::Minus1))
            .map_err(terr)
    }
}

fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    // torch.nn.functional.normalize: x / max(||x||, 1e-12)
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// Every weight file (single or sharded) behind one VarBuilder, read tensor by tensor as the
/// model asks for them ([`crate::weights`]: one resident copy, no memory map).
pub fn open_weights<'a>(files: &ModelFiles, opts: &LoadOptions) -> Result<VarBuilder<'a>> {
    for w in &files.weights {
        std::fs::metadata(w).map_err(|e| Error::io(w, e))?;
    }
    let backend = crate::weights::SafetensorsFiles::open(&files.weights).map_err(|e| {
        Error::bad_model(&files.name, format!("cannot read safetensors weights: {e}"))
    })?;
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        opts.dtype,
        opts.device.clone(),
    ))
}
