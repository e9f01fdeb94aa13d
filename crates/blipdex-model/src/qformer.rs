//! `Blip2QFormerModel` and the retrieval checkpoint's `Blip2TextEmbeddings`. Always run in f32,
//! as transformers keeps the Q-Former and query tokens in f32 whatever the model dtype.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{
    embedding, layer_norm, Activation, Embedding, LayerNorm, LayerNormConfig, VarBuilder,
};

use blipdex_kernels::profile::span;
use blipdex_kernels::{linear_kn, AttentionSpec, Kernels, Linear, Part};

use crate::config::Blip2QFormerConfig;

/// Turns a `[B, L]` 0/1 padding mask into the additive `[B, 1, 1, L]` mask of transformers
/// (0 where attended, the dtype's lowest value where masked).
pub fn additive_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?;
    let masked = ((keep - 1.0)? * -(f32::MIN as f64))?;
    masked.reshape((b, 1, 1, l))
}

pub struct Blip2QFormerMultiHeadAttention {
    /// Self-attention: query, key and value in one `[3H, H]` product of the hidden states.
    /// Cross-attention: the query alone.
    query: Linear,
    /// Cross-attention: key and value of the vision states in one `[2H, E]` product.
    key_value: Option<Linear>,
    num_heads: usize,
    head_size: usize,
    kern: Kernels,
}

/// `query`/`key`/`value` of one attention block fused along the output dimension: one GEMM
/// where transformers runs two or three (more rows per product on the CPU, more tiles per
/// launch on a GPU; each output is the same dot product).
fn fused_linear(
    cfg: &Blip2QFormerConfig,
    vb: &VarBuilder,
    names: &[&str],
    in_dim: usize,
    out_dim: usize,
) -> Result<Linear> {
    let mut ws = Vec::with_capacity(names.len());
    let mut bs = Vec::with_capacity(names.len());
    for name in names {
        let vb = vb.pp(name);
        ws.push(vb.get((out_dim, in_dim), "weight")?);
        bs.push(vb.get(out_dim, "bias")?);
    }
    Linear::prepared(
        Tensor::cat(&ws, 0)?,
        Some(Tensor::cat(&bs, 0)?),
        cfg.kernels,
    )
}

impl Blip2QFormerMultiHeadAttention {
    fn new(cfg: &Blip2QFormerConfig, is_cross_attention: bool, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let (query, key_value) = if is_cross_attention {
            (
                linear_kn(h, h, vb.pp("query"), cfg.kernels)?,
                Some(fused_linear(
                    cfg,
                    &vb,
                    &["key", "value"],
                    cfg.encoder_hidden_size,
                    h,
                )?),
            )
        } else {
            (
                fused_linear(cfg, &vb, &["query", "key", "value"], h, h)?,
                None,
            )
        };
        Ok(Self {
            query,
            key_value,
            num_heads: cfg.num_attention_heads,
            head_size: h / cfg.num_attention_heads,
            kern: cfg.kernels,
        })
    }

    /// `states` is the key/value source of cross-attention (the vision encoder's output);
    /// self-attention takes keys and values from `hidden` itself and ignores it. `mask` is
    /// additive, broadcastable to the scores.
    fn forward(&self, hidden: &Tensor, states: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = hidden.dim(2)?;
        let q = self.query.forward(hidden)?;
        let kv = match &self.key_value {
            None => None,
            Some(kv) => Some(kv.forward(states)?),
        };
        let part = |src, offset| Part { src, offset };
        let (q, k, v) = match &kv {
            None => (part(&q, 0), part(&q, h), part(&q, 2 * h)),
            Some(kv) => (part(&q, 0), part(kv, 0), part(kv, h)),
        };
        let spec = AttentionSpec {
            name: "qformer.attention",
            heads: self.num_heads,
            dim: h,
            scale: (self.head_size as f64).powf(-0.5),
            mask,
        };
        self.kern.attention(q, k, v, spec)
    }
}

/// BERT's `dense → residual → LayerNorm` block (`*SelfOutput` and `*Output`).
pub struct Blip2QFormerOutput {
    dense: Linear,
    layer_norm: LayerNorm,
    kern: Kernels,
}

impl Blip2QFormerOutput {
    fn new(cfg: &Blip2QFormerConfig, in_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dense: linear_kn(in_dim, cfg.hidden_size, vb.pp("dense"), cfg.kernels)?,
            layer_norm: layer_norm(
                cfg.hidden_size,
                LayerNormConfig::from(cfg.layer_norm_eps),
                vb.pp("LayerNorm"),
            )?,
            kern: cfg.kernels,
        })
    }

    fn forward(&self, hidden: &Tensor, input: &Tensor) -> Result<Tensor> {
        let dense = self.dense.forward(hidden)?;
        Ok(self
            .kern
            .add_layer_norm("qformer.add_norm", dense, input, &self.layer_norm)?
            .1)
    }
}

pub struct Blip2QFormerAttention {
    attention: Blip2QFormerMultiHeadAttention,
    output: Blip2QFormerOutput,
}

impl Blip2QFormerAttention {
    fn new(cfg: &Blip2QFormerConfig, is_cross_attention: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attention: Blip2QFormerMultiHeadAttention::new(
                cfg,
                is_cross_attention,
                vb.pp("attention"),
            )?,
            output: Blip2QFormerOutput::new(cfg, cfg.hidden_size, vb.pp("output"))?,
        })
    }

    fn forward(&self, hidden: &Tensor, states: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let attn = self.attention.forward(hidden, states, mask)?;
        self.output.forward(&attn, hidden)
    }
}

/// `intermediate(_query)` + `output(_query)`: the FFN of one token stream.
pub struct Blip2QFormerFeedForward {
    intermediate: Linear,
    act: Activation,
    output: Blip2QFormerOutput,
}

impl Blip2QFormerFeedForward {
    fn new(cfg: &Blip2QFormerConfig, vb: VarBuilder, suffix: &str) -> Result<Self> {
        let intermediate = linear_kn(
            cfg.hidden_size,
            cfg.intermediate_size,
            vb.pp(format!("intermediate{suffix}")).pp("dense"),
            cfg.kernels,
        )?;
        Ok(Self {
            intermediate,
            act: cfg.hidden_act,
            output: Blip2QFormerOutput::new(
                cfg,
                cfg.intermediate_size,
                vb.pp(format!("output{suffix}")),
            )?,
        })
    }
}

impl Module for Blip2QFormerFeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.intermediate.forward_act(self.act, xs)?;
        self.output.forward(&h, xs)
    }
}

pub struct Blip2QFormerLayer {
    attention: Blip2QFormerAttention,
    crossattention: Option<Blip2QFormerAttention>,
    ffn_text: Option<Blip2QFormerFeedForward>,
    ffn_query: Blip2QFormerFeedForward,
}

impl Blip2QFormerLayer {
    fn new(cfg: &Blip2QFormerConfig, layer_idx: usize, vb: VarBuilder) -> Result<Self> {
        let crossattention = if layer_idx.is_multiple_of(cfg.cross_attention_frequency) {
            Some(Blip2QFormerAttention::new(
                cfg,
                true,
                vb.pp("crossattention"),
            )?)
        } else {
            None
        };
        // The text FFN exists when the checkpoint was trained with text input (retrieval).
        let ffn_text =
            if cfg.use_qformer_text_input || vb.contains_tensor("intermediate.dense.weight") {
                Some(Blip2QFormerFeedForward::new(cfg, vb.clone(), "")?)
            } else {
                None
            };
        Ok(Self {
            attention: Blip2QFormerAttention::new(cfg, false, vb.pp("attention"))?,
            crossattention,
            ffn_text,
            ffn_query: Blip2QFormerFeedForward::new(cfg, vb, "_query")?,
        })
    }

    fn text_ffn(&self) -> Result<&Blip2QFormerFeedForward> {
        self.ffn_text.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(
                "this Q-Former has no text path (use_qformer_text_input is false)".into(),
            )
        })
    }

    fn forward(
        &self,
        hidden: &Tensor,
        mask: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
        query_length: usize,
    ) -> Result<Tensor> {
        let dev = hidden.device();
        let attn = span("qformer.self_attention", dev, || {
            self.attention.forward(hidden, hidden, mask)
        })?;
        if query_length == 0 {
            return self.text_ffn()?.forward(&attn);
        }
        let mut query = attn.narrow(1, 0, query_length)?;
        if let Some(cross) = &self.crossattention {
            let enc = encoder_hidden_states.ok_or_else(|| {
                candle_core::Error::Msg("cross-attention layer needs the vision states".into())
            })?;
            // The vision states are never padded: no mask, as in transformers.
            query = span("qformer.cross_attention", dev, || {
                cross.forward(&query, enc, None)
            })?;
        }
        let query_out = span("qformer.ffn", dev, || self.ffn_query.forward(&query))?;
        let total = attn.dim(1)?;
        if total > query_length {
            let text = attn.narrow(1, query_length, total - query_length)?;
            let text_out = self.text_ffn()?.forward(&text)?;
            Tensor::cat(&[&query_out, &text_out], 1)
        } else {
            Ok(query_out)
        }
    }
}

pub struct Blip2QFormerModel {
    layernorm: LayerNorm,
    layers: Vec<Blip2QFormerLayer>,
}

impl Blip2QFormerModel {
    pub fn new(cfg: &Blip2QFormerConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.set_dtype(DType::F32);
        let layernorm = layer_norm(
            cfg.hidden_size,
            LayerNormConfig::from(cfg.layer_norm_eps),
            vb.pp("layernorm"),
        )?;
        let vb_l = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Blip2QFormerLayer::new(cfg, i, vb_l.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layernorm, layers })
    }

    /// `query_embeds` [B, L, H]: the query tokens, optionally followed by text embeddings;
    /// the first `query_length` positions are queries. `attention_mask` [B, L] (1 = attend).
    pub fn forward(
        &self,
        query_embeds: &Tensor,
        query_length: usize,
        attention_mask: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut h = self
            .layernorm
            .forward(&query_embeds.to_dtype(DType::F32)?)?;
        let mask = attention_mask.map(additive_mask).transpose()?;
        let enc = encoder_hidden_states
            .map(|e| e.to_dtype(DType::F32))
            .transpose()?;
        for layer in &self.layers {
            h = layer.forward(&h, mask.as_ref(), enc.as_ref(), query_length)?;
        }
        Ok(h)
    }
}

/// `Blip2TextEmbeddings`: word + absolute position embeddings (positions start at 0).
pub struct Blip2TextEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    max_positions: usize,
}

impl Blip2TextEmbeddings {
    pub fn new(cfg: &Blip2QFormerConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.set_dtype(DType::F32);
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `input_ids` [B, L] (u32) → [B, L, H].
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, l) = input_ids.dims2()?;
        if l > self.max_positions {
            candle_core::bail!(
                "text of {l} tokens is longer than the {} positions of the Q-Former",
                self.max_positions
            );
        }
        let pos = Tensor::arange(0u32, l as u32, input_ids.device())?;
        self.word_embeddings
            .forward(input_ids)?
            .broadcast_add(&self.position_embeddings.forward(&pos)?)
    }
}
