//! OPT, the language model of the BLIP-2 caption checkpoints, ported from transformers'
//! `models/opt/modeling_opt.py` (`OPTForCausalLM`). Inference only, with a KV cache for
//! generation and an optional Q8_0 store for the decoder's Linear weights.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Activation, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use blipdex_kernels::profile::span;
use blipdex_kernels::{layer_norm_in, to_dtype, AttentionSpec, Kernels, Linear, Part};

use crate::layers::{LinearAct, Mlp};

/// transformers' `nn.LayerNorm` default; OPTConfig has no eps field.
const LAYER_NORM_EPS: f64 = 1e-5;
/// `OPTLearnedPositionalEmbedding.offset`: the position table has two extra leading rows.
const POSITION_OFFSET: usize = 2;

/// `eos_token_id` may be one id or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Serde mirror of transformers' `OPTConfig` (field names and defaults as in Python).
#[derive(Debug, Clone, Deserialize)]
pub struct OptConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "opt_defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "opt_defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "opt_defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "opt_defaults::ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "opt_defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "opt_defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "opt_defaults::yes")]
    pub do_layer_norm_before: bool,
    /// Kept for checkpoints fine-tuned before transformers 4.20.1: no decoder final_layer_norm.
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Defaults to `hidden_size` (see [`OptConfig::word_embed_proj_dim`]).
    #[serde(default, rename = "word_embed_proj_dim")]
    pub word_embed_proj_dim_raw: Option<usize>,
    #[serde(default = "opt_defaults::activation_function")]
    pub activation_function: Activation,
    #[serde(default = "opt_defaults::yes")]
    pub enable_bias: bool,
    #[serde(default = "opt_defaults::yes")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(default = "opt_defaults::pad_token_id")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "opt_defaults::bos_token_id")]
    pub bos_token_id: Option<u32>,
    #[serde(default = "opt_defaults::eos_token_id")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default = "opt_defaults::yes")]
    pub tie_word_embeddings: bool,
    /// Not in `config.json`: which kernels run the model (one of the load options).
    #[serde(skip)]
    pub kernels: Kernels,
}

mod opt_defaults {
    use super::TokenIds;
    pub fn vocab_size() -> usize {
        50272
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn ffn_dim() -> usize {
        3072
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn yes() -> bool {
        true
    }
    pub fn activation_function() -> candle_nn::Activation {
        candle_nn::Activation::Relu
    }
    pub fn pad_token_id() -> Option<u32> {
        Some(1)
    }
    pub fn bos_token_id() -> Option<u32> {
        Some(2)
    }
    pub fn eos_token_id() -> Option<TokenIds> {
        Some(TokenIds::One(2))
    }
}

impl OptConfig {
    /// Parse and check an OPT config (`text_config` of a BLIP-2 config, or an OPT `config.json`).
    pub fn from_value(v: &serde_json::Value) -> Result<Self, String> {
        let cfg: OptConfig = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        match cfg.model_type.as_deref() {
            Some("opt") | None => {}
            Some(other) => {
                return Err(format!(
                "the language model is {other:?}; blipdex captions with OPT language models only"
            ))
            }
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            ));
        }
        if cfg.num_hidden_layers == 0 || cfg.vocab_size == 0 || cfg.max_position_embeddings == 0 {
            return Err(
                "num_hidden_layers, vocab_size and max_position_embeddings must be positive".into(),
            );
        }
        Ok(cfg)
    }

    pub fn word_embed_proj_dim(&self) -> usize {
        self.word_embed_proj_dim_raw.unwrap_or(self.hidden_size)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
}

/// How the decoder's Linear weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearStorage {
    /// The VarBuilder's dtype (f32/f16/bf16).
    #[default]
    Float,
    /// GGML Q8_0 (8.5 bits per weight). Weights whose input size is not a multiple of 32 (the
    /// Q8_0 block) stay in float.
    Q8,
}

/// A Linear layer whose weight is either a float tensor or a Q8_0 matrix.
#[derive(Debug, Clone)]
enum OptLinear {
    Float(Linear),
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

impl OptLinear {
    fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        storage: LinearStorage,
        kern: Kernels,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        if storage == LinearStorage::Q8 && in_dim.is_multiple_of(GgmlDType::Q8_0.block_size()) {
            let q = QTensor::quantize(&weight, GgmlDType::Q8_0)?;
            return Ok(Self::Quantized {
                weight: QMatMul::from_qtensor(q)?,
                bias,
            });
        }
        Ok(Self::Float(Linear::packed_or_stored(weight, bias, kern)?))
    }

    fn is_quantized(&self) -> bool {
        // QMatMul dequantizes at load when CANDLE_DEQUANTIZE_ALL is set.
        matches!(
            self,
            Self::Quantized {
                weight: QMatMul::QTensor(_),
                ..
            }
        )
    }

    fn weight_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Self::Float(l) => l.weight_bytes(),
            Self::Quantized { weight, .. } => match weight {
                QMatMul::QTensor(q) => q.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => dense(t),
            },
        }
    }
}

impl LinearAct for OptLinear {
    fn forward_act(&self, act: Activation, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Float(l) => l.forward_act(act, xs),
            Self::Quantized { .. } => act.forward(&self.forward(xs)?),
        }
    }
}

impl Module for OptLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Float(l) => l.forward(xs),
            Self::Quantized { weight, bias } => {
                // Quantized matmuls take f32 activations on every backend; the result goes back
                // to the model dtype.
                let dtype = xs.dtype();
                let y = weight
                    .forward(&xs.to_dtype(DType::F32)?.contiguous()?)?
                    .to_dtype(dtype)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

fn layer_norm(cfg: &OptConfig, size: usize, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    if cfg.layer_norm_elementwise_affine {
        Ok(LayerNorm::new(
            vb.get(size, "weight")?,
            vb.get(size, "bias")?,
            LAYER_NORM_EPS,
        ))
    } else {
        // No parameters in the checkpoint: PyTorch's non-affine LayerNorm.
        let ones = Tensor::ones(size, vb.dtype(), vb.device())?;
        Ok(LayerNorm::new_no_bias(ones, LAYER_NORM_EPS))
    }
}

/// Keys and values of every layer seen so far: [B, heads, T, head_dim] each.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions cached.
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims().get(2).copied().unwrap_or(0))
    }

    /// Keep / reorder the batch rows (beam search): row `i` becomes old row `index[i]`.
    pub fn select_rows(&mut self, index: &Tensor) -> candle_core::Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(index, 0)?;
            *v = v.index_select(index, 0)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct OptAttention {
    q_proj: OptLinear,
    k_proj: OptLinear,
    v_proj: OptLinear,
    out_proj: OptLinear,
    num_heads: usize,
    head_dim: usize,
    scaling: f64,
    kern: Kernels,
}

impl OptAttention {
    fn new(cfg: &OptConfig, storage: LinearStorage, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let lin =
            |name: &str| OptLinear::new(h, h, cfg.enable_bias, storage, cfg.kernels, vb.pp(name));
        Ok(Self {
            q_proj: lin("q_proj")?,
            k_proj: lin("k_proj")?,
            v_proj: lin("v_proj")?,
            out_proj: lin("out_proj")?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            scaling: (cfg.head_dim() as f64).powf(-0.5),
            kern: cfg.kernels,
        })
    }

    /// `mask`: additive f32 [B, 1, T, past + T].
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let dev = x.device();
        let (q, k, v) = span("opt.qkv", dev, || {
            // As transformers: the query is scaled after its projection (bias included).
            let q = (self.q_proj.forward(x)? * self.scaling)?;
            Ok((q, self.k_proj.forward(x)?, self.v_proj.forward(x)?))
        })?;
        let heads = |x: Tensor| {
            x.reshape((b, t, self.num_heads, self.head_dim))?
                .transpose(1, 2)
        };
        let out = match cache.as_ref() {
            // The prompt pass: over [B, T, D] (fused where a kernel runs it); the cache keeps
            // the per-head layout the steps read.
            None => {
                let spec = AttentionSpec {
                    name: "opt.attention",
                    heads: self.num_heads,
                    dim: self.num_heads * self.head_dim,
                    scale: 1.0,
                    mask: Some(mask),
                };
                let kern = self.kern;
                let (kh, vh) = (
                    kern.contiguous(&heads(k.clone())?)?,
                    kern.contiguous(&heads(v.clone())?)?,
                );
                let out = span(spec.name, dev, || {
                    let parts = (Part::whole(&q), Part::whole(&k), Part::whole(&v));
                    match kern.fused_attention(parts.0, parts.1, parts.2, spec)? {
                        Some(out) => Ok(out),
                        // The heads the cache keeps serve the unfused ops too: split once.
                        None => {
                            let qh = kern.contiguous(&heads(q.clone())?)?;
                            kern.attention_heads(&qh, &kh, &vh, 1.0, Some(mask))
                        }
                    }
                })?;
                *cache = Some((kh, vh));
                out
            }
            Some((pk, pv)) => {
                let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
                let k = Tensor::cat(&[pk, &k], 2)?;
                let v = Tensor::cat(&[pv, &v], 2)?;
                let out = span("opt.attention", dev, || {
                    self.kern
                        .attention_heads(&self.kern.contiguous(&q)?, &k, &v, 1.0, Some(mask))
                })?;
                *cache = Some((k, v));
                out
            }
        };
        span("opt.out_proj", dev, || self.out_proj.forward(&out))
    }
}

#[derive(Debug, Clone)]
struct OptDecoderLayer {
    self_attn: OptAttention,
    self_attn_layer_norm: LayerNorm,
    /// `fc1`, `activation_function`, `fc2`.
    mlp: Mlp<OptLinear>,
    final_layer_norm: LayerNorm,
    do_layer_norm_before: bool,
}

impl OptDecoderLayer {
    fn new(cfg: &OptConfig, storage: LinearStorage, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, f, bias) = (cfg.hidden_size, cfg.ffn_dim, cfg.enable_bias);
        Ok(Self {
            self_attn: OptAttention::new(cfg, storage, vb.pp("self_attn"))?,
            self_attn_layer_norm: layer_norm(cfg, h, vb.pp("self_attn_layer_norm"))?,
            mlp: Mlp {
                fc1: OptLinear::new(h, f, bias, storage, cfg.kernels, vb.pp("fc1"))?,
                fc2: OptLinear::new(f, h, bias, storage, cfg.kernels, vb.pp("fc2"))?,
                act: cfg.activation_function,
            },
            final_layer_norm: layer_norm(cfg, h, vb.pp("final_layer_norm"))?,
            do_layer_norm_before: cfg.do_layer_norm_before,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let dev = x.device();
        let norm = |ln: &LayerNorm, x: &Tensor| span("opt.add_norm", dev, || ln.forward(x));
        // Pre-LN (125m, 1.3b, 2.7b, ...) or post-LN (350m).
        let h = if self.do_layer_norm_before {
            norm(&self.self_attn_layer_norm, x)?
        } else {
            x.clone()
        };
        let mut x = (x + self.self_attn.forward(&h, mask, cache)?)?;
        if !self.do_layer_norm_before {
            x = norm(&self.self_attn_layer_norm, &x)?;
        }
        let h = if self.do_layer_norm_before {
            norm(&self.final_layer_norm, &x)?
        } else {
            x.clone()
        };
        let h = span("opt.mlp", dev, || self.mlp.forward(&h))?;
        let mut x = (x + h)?;
        if !self.do_layer_norm_before {
            x = norm(&self.final_layer_norm, &x)?;
        }
        Ok(x)
    }
}

/// `OPTDecoder`: token + learned position embeddings, the layers, the final LayerNorm and the
/// optional projections between `word_embed_proj_dim` and `hidden_size`.
#[derive(Debug, Clone)]
pub struct OptDecoder {
    embed_tokens: Embedding,
    embed_positions: Tensor,
    project_in: Option<OptLinear>,
    project_out: Option<OptLinear>,
    final_layer_norm: Option<LayerNorm>,
    layers: Vec<OptDecoderLayer>,
    max_positions: usize,
    /// The activations' dtype: the checkpoint's as loaded, or f32 (see
    /// [`OptForCausalLM::compute_in_f32`]).
    compute: DType,
}

impl OptDecoder {
    fn new(cfg: &OptConfig, storage: LinearStorage, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, w) = (cfg.hidden_size, cfg.word_embed_proj_dim());
        let embed_tokens = Embedding::new(vb.get((cfg.vocab_size, w), "embed_tokens.weight")?, w);
        let embed_positions = vb.get(
            (cfg.max_position_embeddings + POSITION_OFFSET, h),
            "embed_positions.weight",
        )?;
        let (project_in, project_out) = if w != h {
            (
                Some(OptLinear::new(
                    w,
                    h,
                    false,
                    storage,
                    cfg.kernels,
                    vb.pp("project_in"),
                )?),
                Some(OptLinear::new(
                    h,
                    w,
                    false,
                    storage,
                    cfg.kernels,
                    vb.pp("project_out"),
                )?),
            )
        } else {
            (None, None)
        };
        let final_layer_norm = if cfg.do_layer_norm_before && !cfg.remove_final_layer_norm {
            Some(layer_norm(cfg, h, vb.pp("final_layer_norm"))?)
        } else {
            None
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| OptDecoderLayer::new(cfg, storage, vb.pp(format!("layers.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            final_layer_norm,
            layers,
            max_positions: cfg.max_position_embeddings,
            compute: vb.dtype(),
        })
    }

    /// `attention_mask`: [B, past + T] of 0/1 (any integer or float dtype) covering the cached
    /// positions and the new ones. Returns the last hidden state [B, T, word_embed_proj_dim].
    pub fn forward(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = inputs_embeds.dims3()?;
        let past = cache.seq_len();
        let mask = attention_mask
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        if mask.len() != b || mask.iter().any(|r| r.len() != past + t) {
            candle_core::bail!(
                "attention mask is {}x{}, expected {b}x{} (cached {past} + new {t})",
                mask.len(),
                mask.first().map_or(0, Vec::len),
                past + t
            );
        }
        let dev = inputs_embeds.device();
        let positions = self.position_ids(&mask, past)?;
        let positions = Tensor::from_vec(positions, b * t, dev)?;
        let pos_embeds = self
            .embed_positions
            .index_select(&positions, 0)?
            .reshape((b, t, ()))?;
        let additive = causal_padding_mask(&mask, past, t, dev)?;

        let mut x = match &self.project_in {
            Some(p) => p.forward(inputs_embeds)?,
            None => inputs_embeds.clone(),
        };
        let pos_embeds = pos_embeds.to_dtype(x.dtype())?;
        x = (x + pos_embeds)?;
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(&x, &additive, kv)?;
        }
        if let Some(ln) = &self.final_layer_norm {
            x = ln.forward(&x)?;
        }
        if let Some(p) = &self.project_out {
            x = p.forward(&x)?;
        }
        Ok(x)
    }

    /// transformers' `(cumsum(mask) * mask - 1)[:, past:] + 2`: left padding safe; padded
    /// positions get row 1 of the table.
    fn position_ids(&self, mask: &[Vec<f32>], past: usize) -> candle_core::Result<Vec<u32>> {
        let mut out = Vec::with_capacity(mask.len() * (mask.first().map_or(0, Vec::len) - past));
        for row in mask {
            let mut cum = 0usize;
            for (j, &m) in row.iter().enumerate() {
                let on = m != 0.0;
                cum += usize::from(on);
                if j >= past {
                    let idx = if on {
                        cum - 1 + POSITION_OFFSET
                    } else {
                        POSITION_OFFSET - 1
                    };
                    if idx >= self.max_positions + POSITION_OFFSET {
                        candle_core::bail!(
                            "sequence of {cum} tokens is longer than the model's max_position_embeddings ({})",
                            self.max_positions
                        );
                    }
                    out.push(idx as u32);
                }
            }
        }
        Ok(out)
    }

    pub fn embed_tokens(&self) -> &Embedding {
        &self.embed_tokens
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }
}

/// Additive f32 mask [B, 1, T, past + T]: 0 where query `i` (absolute position past + i) may see
/// key `j` (j <= past + i and not padding), the f32 minimum elsewhere (as transformers).
fn causal_padding_mask(
    mask: &[Vec<f32>],
    past: usize,
    t: usize,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let s = past + t;
    let mut data = Vec::with_capacity(mask.len() * t * s);
    for row in mask {
        for i in 0..t {
            data.extend(row.iter().enumerate().map(|(j, &m)| {
                if j <= past + i && m != 0.0 {
                    0.0
                } else {
                    f32::MIN
                }
            }));
        }
    }
    Tensor::from_vec(data, (mask.len(), 1, t, s), dev)
}

#[derive(Debug, Clone)]
enum LmHead {
    /// Tied to `embed_tokens` (transformers' default; the checkpoint omits `lm_head.weight`).
    Tied(Tensor),
    Linear(Linear),
}

/// `OPTForCausalLM`: the decoder plus the (usually tied) output projection to the vocabulary.
#[derive(Debug, Clone)]
pub struct OptForCausalLM {
    pub config: OptConfig,
    pub decoder: OptDecoder,
    lm_head: LmHead,
    storage: LinearStorage,
}

impl OptForCausalLM {
    /// `vb` points at the `OPTForCausalLM` (keys `model.decoder.*` and `lm_head.weight`).
    /// `lm_head.weight` is used when the checkpoint has it and the embeddings are not tied;
    /// otherwise the head is `embed_tokens`, as transformers ties them.
    pub fn new(
        cfg: &OptConfig,
        storage: LinearStorage,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let decoder = OptDecoder::new(cfg, storage, vb.pp("model.decoder"))?;
        let lm_head = if !cfg.tie_word_embeddings && vb.contains_tensor("lm_head.weight") {
            LmHead::Linear(Linear::new(
                vb.get(
                    (cfg.vocab_size, cfg.word_embed_proj_dim()),
                    "lm_head.weight",
                )?,
                None,
                cfg.kernels,
            ))
        } else if !cfg.tie_word_embeddings {
            candle_core::bail!(
                "tie_word_embeddings is false but the checkpoint has no lm_head.weight"
            );
        } else {
            LmHead::Tied(decoder.embed_tokens.embeddings().clone())
        };
        Ok(Self {
            config: cfg.clone(),
            decoder,
            lm_head,
            storage,
        })
    }

    /// Token embeddings [.., word_embed_proj_dim] of `ids` (u32), in the activations' dtype.
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let e = self.decoder.embed_tokens.forward(ids)?;
        to_dtype(&e, self.decoder.compute)
    }

    /// bf16/f16 Linear weights packed for the CPU's GEMM are widened in registers and summed
    /// in f32: the activations between them (embeddings, layer norms, attention, KV cache) then
    /// run in f32 too instead of being rounded and widened again around every op (the vision
    /// tower does the same). The weights (Linears, token embeddings, tied head) stay in half
    /// precision. True when it switched; false (nothing changed) for other dtypes and CPUs.
    pub fn compute_in_f32(&mut self) -> candle_core::Result<bool> {
        let half = |dtype| matches!(dtype, DType::BF16 | DType::F16);
        let packed_half = self.linears().first().is_some_and(|l| match l {
            OptLinear::Float(l) => l.is_packed() && half(l.dtype()),
            OptLinear::Quantized { .. } => false,
        });
        if !packed_half || !half(self.decoder.compute) {
            return Ok(false);
        }
        let f32 = |ln: &LayerNorm| layer_norm_in(ln, DType::F32);
        let d = &mut self.decoder;
        d.embed_positions = d.embed_positions.to_dtype(DType::F32)?;
        if let Some(ln) = &d.final_layer_norm {
            d.final_layer_norm = Some(f32(ln)?);
        }
        for l in &mut d.layers {
            l.self_attn_layer_norm = f32(&l.self_attn_layer_norm)?;
            l.final_layer_norm = f32(&l.final_layer_norm)?;
        }
        d.compute = DType::F32;
        Ok(true)
    }

    /// Logits [.., vocab] of decoder hidden states.
    pub fn lm_head(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        match &self.lm_head {
            LmHead::Tied(w) => self.config.kernels.matmul_t(hidden, w),
            LmHead::Linear(l) => l.forward(hidden),
        }
    }

    /// Logits [B, T, vocab] of the whole input.
    pub fn forward(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let h = self.decoder.forward(inputs_embeds, attention_mask, cache)?;
        self.lm_head(&h)
    }

    /// f32 logits [B, vocab] of the last position only (what generation needs).
    pub fn forward_last(
        &self,
        inputs_embeds: &Tensor,
        attention_mask: &Tensor,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        let dev = inputs_embeds.device();
        // The prompt pass and the one-token steps apart: their costs differ in kind.
        let name = if cache.seq_len() == 0 {
            "opt.prompt_pass"
        } else {
            "opt.step"
        };
        span(name, dev, || {
            let h = self.decoder.forward(inputs_embeds, attention_mask, cache)?;
            let t = h.dim(1)?;
            let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
            span("opt.lm_head", dev, || {
                self.lm_head(&last)?.to_dtype(DType::F32)
            })
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.decoder.num_layers())
    }

    pub fn storage(&self) -> LinearStorage {
        self.storage
    }

    fn linears(&self) -> Vec<&OptLinear> {
        let mut all: Vec<&OptLinear> = Vec::new();
        for l in &self.decoder.layers {
            all.extend([
                &l.self_attn.q_proj,
                &l.self_attn.k_proj,
                &l.self_attn.v_proj,
                &l.self_attn.out_proj,
            ]);
            all.extend([&l.mlp.fc1, &l.mlp.fc2]);
        }
        all.extend(self.decoder.project_in.iter());
        all.extend(self.decoder.project_out.iter());
        all
    }

    /// How many decoder Linear layers hold Q8_0 weights, of how many.
    pub fn quantized_linears(&self) -> (usize, usize) {
        let all = self.linears();
        (all.iter().filter(|l| l.is_quantized()).count(), all.len())
    }

    /// Bytes held by the decoder's Linear weights (biases, norms and embeddings not counted).
    pub fn linear_weight_bytes(&self) -> usize {
        self.linears().iter().map(|l| l.weight_bytes()).sum()
    }
}
