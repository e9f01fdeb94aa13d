//! `Blip2VisionModel`: EVA-style ViT with a fused, key-bias-free qkv projection.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, LayerNormConfig, VarBuilder};

use blipdex_kernels::profile::span;
use blipdex_kernels::{layer_norm_in, linear_kn, to_dtype, Kernels, Linear};

use crate::config::Blip2VisionConfig;
use crate::layers::Mlp;

pub struct Blip2VisionEmbeddings {
    class_embedding: Tensor,
    /// Conv2d weight `[D, 3, ph, pw]` flattened to `[D, 3*ph*pw]`: with kernel == stride the
    /// convolution is a matmul over non-overlapping patches.
    patch_embedding: Linear,
    position_embedding: Tensor,
    patch: (usize, usize),
    /// Side of the square position grid the checkpoint was trained on.
    grid: usize,
    kern: Kernels,
}

impl Blip2VisionEmbeddings {
    pub fn new(cfg: &Blip2VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let (ph, pw) = cfg.patch_size.hw();
        let (ih, iw) = cfg.image_size.hw();
        let num_positions = (ih / ph) * (iw / pw) + 1;
        let class_embedding = vb.get((1, 1, d), "class_embedding")?;
        let patch_weight = vb
            .get((d, 3, ph, pw), "patch_embedding.weight")?
            .reshape((d, 3 * ph * pw))?;
        let patch_bias = Some(vb.get(d, "patch_embedding.bias")?);
        let patch_embedding = Linear::prepared(patch_weight, patch_bias, cfg.kernels)?;
        let position_embedding = vb.get((1, num_positions, d), "position_embedding")?;
        let grid = ((num_positions - 1) as f64).sqrt().round() as usize;
        Ok(Self {
            class_embedding,
            patch_embedding,
            position_embedding,
            patch: (ph, pw),
            grid,
            kern: cfg.kernels,
        })
    }

    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let (ph, pw) = self.patch;
        let (gh, gw) = (h / ph, w / pw);
        if gh == 0 || gw == 0 || c != 3 {
            candle_core::bail!(
                "pixel_values {:?} is smaller than one {ph}x{pw} patch or not RGB",
                pixel_values.dims()
            );
        }
        let dtype = self.class_embedding.dtype();
        // Conv2d drops a remainder that does not fill a patch; so do we.
        let x = pixel_values
            .to_dtype(dtype)?
            .narrow(2, 0, gh * ph)?
            .narrow(3, 0, gw * pw)?
            .reshape((b, c, gh, ph, gw, pw))?
            .permute((0, 2, 4, 1, 3, 5))?;
        let x = self
            .kern
            .contiguous(&x)?
            .reshape((b * gh * gw, c * ph * pw))?;
        let patches = self
            .patch_embedding
            .forward(&x)?
            .reshape((b, gh * gw, ()))?;
        let d = patches.dim(2)?;
        let class = self.class_embedding.expand((b, 1, d))?;
        let embeddings = Tensor::cat(&[&class, &patches], 1)?;
        let pos = self.position_embedding_for(gh, gw)?;
        embeddings.broadcast_add(&pos)
    }

    /// transformers' `interpolate_pos_encoding`: bicubic (A = -0.75, align_corners = False)
    /// resampling of the patch position grid when the input grid differs from the trained one.
    fn position_embedding_for(&self, gh: usize, gw: usize) -> Result<Tensor> {
        if gh == self.grid && gw == self.grid {
            return Ok(self.position_embedding.clone());
        }
        let pe = &self.position_embedding;
        let d = pe.dim(2)?;
        let dtype = pe.dtype();
        let class_pos = pe.i((.., 0..1, ..))?;
        let g = self.grid;
        // [g*g, D] -> [D, g, g] (channels first, like the NCHW tensor torch interpolates)
        let grid = pe
            .i((0, 1.., ..))?
            .to_dtype(DType::F32)?
            .reshape((g, g, d))?
            .permute((2, 0, 1))?
            .contiguous()?;
        let dev = pe.device();
        let wy = bicubic_matrix(g, gh, dev)?; // [gh, g]
        let wx = bicubic_matrix(g, gw, dev)?; // [gw, g]
                                              // out[c] = Wy · grid[c] · Wxᵀ
        let rows = wy.broadcast_left(d)?.matmul(&grid)?; // [D, gh, g]
        let out = rows.matmul(&wx.t()?.broadcast_left(d)?)?; // [D, gh, gw]
        let out = out
            .permute((1, 2, 0))?
            .reshape((1, gh * gw, d))?
            .to_dtype(dtype)?;
        Tensor::cat(&[&class_pos, &out], 1)
    }
}

/// Interpolation matrix `[out, in]` of PyTorch's `upsample_bicubic2d` along one axis
/// (align_corners = False, cubic convolution with A = -0.75, indices clamped at the border).
pub(crate) fn bicubic_matrix(input: usize, output: usize, dev: &Device) -> Result<Tensor> {
    const A: f64 = -0.75;
    let cc1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cc2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = input as f32 / output as f32;
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        // torch computes the source coordinate in float (opmath) precision.
        let src = scale * (o as f32 + 0.5) - 0.5;
        let i0 = src.floor();
        let t = (src - i0) as f64;
        let w = [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)];
        for (k, wk) in w.iter().enumerate() {
            let idx = (i0 as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            m[o * input + idx] += *wk as f32;
        }
    }
    Tensor::from_vec(m, (output, input), dev)
}

pub struct Blip2Attention {
    qkv: Linear,
    projection: Linear,
    num_heads: usize,
    scale: f64,
    kern: Kernels,
}

impl Blip2Attention {
    pub fn new(cfg: &Blip2VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let qkv_w = vb.get((3 * d, d), "qkv.weight")?;
        // HF stores the fused bias [q, 0, v]; LAVIS stores q_bias / v_bias separately.
        let bias = if vb.contains_tensor("qkv.bias") {
            Some(vb.get(3 * d, "qkv.bias")?)
        } else if vb.contains_tensor("q_bias") {
            let q = vb.get(d, "q_bias")?;
            let v = vb.get(d, "v_bias")?;
            Some(Tensor::cat(&[&q, &q.zeros_like()?, &v], 0)?)
        } else if cfg.qkv_bias {
            candle_core::bail!("missing {} (qkv.bias or q_bias/v_bias)", vb.prefix())
        } else {
            None
        };
        let head_dim = d / cfg.num_attention_heads;
        let kern = cfg.kernels;
        Ok(Self {
            qkv: Linear::prepared(qkv_w, bias, kern)?.named("vision.qkv"),
            projection: linear_kn(d, d, vb.pp("projection"), kern)?.named("vision.proj"),
            num_heads: cfg.num_attention_heads,
            scale: (head_dim as f64).powf(-0.5),
            kern,
        })
    }
}

impl Module for Blip2Attention {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let qkv = self.qkv.forward(xs)?;
        let out = self
            .kern
            .self_attention("vision.attention", &qkv, self.num_heads, self.scale)?;
        self.projection.forward(&out)
    }
}

/// `Blip2MLP`.
pub type Blip2Mlp = Mlp<Linear>;

fn blip2_mlp(cfg: &Blip2VisionConfig, vb: VarBuilder) -> Result<Blip2Mlp> {
    let d = cfg.hidden_size;
    Ok(Mlp {
        fc1: linear_kn(d, cfg.intermediate_size, vb.pp("fc1"), cfg.kernels)?
            .named("vision.fc1_act"),
        fc2: linear_kn(cfg.intermediate_size, d, vb.pp("fc2"), cfg.kernels)?.named("vision.fc2"),
        act: cfg.hidden_act,
    })
}

pub struct Blip2EncoderLayer {
    self_attn: Blip2Attention,
    layer_norm1: LayerNorm,
    mlp: Blip2Mlp,
    layer_norm2: LayerNorm,
}

impl Blip2EncoderLayer {
    pub fn new(cfg: &Blip2VisionConfig, vb: VarBuilder) -> Result<Self> {
        let ln = LayerNormConfig::from(cfg.layer_norm_eps);
        Ok(Self {
            self_attn: Blip2Attention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: layer_norm(cfg.hidden_size, ln, vb.pp("layer_norm1"))?,
            mlp: blip2_mlp(cfg, vb.pp("mlp"))?,
            layer_norm2: layer_norm(cfg.hidden_size, ln, vb.pp("layer_norm2"))?,
        })
    }
}

impl Blip2EncoderLayer {
    /// One layer on the residual stream `h`, given `x = layer_norm1(h)`: the new stream and
    /// `next` of it (the next layer's layer_norm1, or post_layernorm after the last). Each
    /// residual add is fused with the layer norm that reads it.
    fn forward(&self, h: &Tensor, x: &Tensor, next: &LayerNorm) -> Result<(Tensor, Tensor)> {
        let kern = self.self_attn.kern;
        let a = self.self_attn.forward(x)?;
        let (h, x) = kern.add_layer_norm("vision.add_norm", a, h, &self.layer_norm2)?;
        let m = self.mlp.forward(&x)?;
        kern.add_layer_norm("vision.add_norm", m, &h, next)
    }
}

pub struct Blip2VisionModel {
    embeddings: Blip2VisionEmbeddings,
    layers: Vec<Blip2EncoderLayer>,
    post_layernorm: LayerNorm,
    /// The checkpoint's dtype as loaded: that of the returned states.
    dtype: DType,
}

impl Blip2VisionModel {
    pub fn new(cfg: &Blip2VisionConfig, vb: VarBuilder) -> Result<Self> {
        let embeddings = Blip2VisionEmbeddings::new(cfg, vb.pp("embeddings"))?;
        let vb_l = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Blip2EncoderLayer::new(cfg, vb_l.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let post_layernorm = layer_norm(
            cfg.hidden_size,
            LayerNormConfig::from(cfg.layer_norm_eps),
            vb.pp("post_layernorm"),
        )?;
        let mut model = Self {
            embeddings,
            layers,
            post_layernorm,
            dtype: vb.dtype(),
        };
        let half = matches!(vb.dtype(), DType::BF16 | DType::F16);
        if half && model.embeddings.patch_embedding.is_packed() {
            model.compute_in_f32()?;
        }
        Ok(model)
    }

    /// bf16/f16 weights packed for the CPU's GEMM are widened in registers and summed in f32;
    /// the activations between the ops then stay f32 too (embeddings, layer norms), rounded to
    /// the checkpoint's dtype once at the end: a CPU without half-precision arithmetic gains
    /// nothing from half-precision activations and would pay a conversion on both sides of
    /// every op (bf16: 0.90× f32's speed that way; 0.98× computing in f32).
    fn compute_in_f32(&mut self) -> Result<()> {
        let e = &mut self.embeddings;
        e.class_embedding = e.class_embedding.to_dtype(DType::F32)?;
        e.position_embedding = e.position_embedding.to_dtype(DType::F32)?;
        for l in &mut self.layers {
            l.layer_norm1 = layer_norm_in(&l.layer_norm1, DType::F32)?;
            l.layer_norm2 = layer_norm_in(&l.layer_norm2, DType::F32)?;
        }
        self.post_layernorm = layer_norm_in(&self.post_layernorm, DType::F32)?;
        Ok(())
    }

    /// The dtype of the returned states (the checkpoint's as loaded).
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

impl Module for Blip2VisionModel {
    /// `pixel_values` [B, 3, H, W] → `last_hidden_state` [B, 1 + P, D] (after post_layernorm).
    fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let dev = pixel_values.device();
        let mut h = span("vision.embeddings", dev, || {
            self.embeddings.forward(pixel_values)
        })?;
        let first = self
            .layers
            .first()
            .map_or(&self.post_layernorm, |l| &l.layer_norm1);
        let mut x = span("vision.layer_norm", dev, || {
            self.embeddings.kern.layer_norm(&h, first)
        })?;
        for (i, layer) in self.layers.iter().enumerate() {
            let next = self
                .layers
                .get(i + 1)
                .map_or(&self.post_layernorm, |l| &l.layer_norm1);
            (h, x) = layer.forward(&h, &x, next)?;
        }
        to_dtype(&x, self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_identity_and_rows_sum_to_one() -> Result<()> {
        let dev = Device::Cpu;
        let id = bicubic_matrix(5, 5, &dev)?.to_vec2::<f32>()?;
        for (i, row) in id.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert_eq!(*v, if i == j { 1.0 } else { 0.0 });
            }
        }
        for (i, o) in [(4usize, 7usize), (8, 3), (16, 37)] {
            for row in bicubic_matrix(i, o, &dev)?.to_vec2::<f32>()? {
                let s: f32 = row.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{s}");
            }
        }
        Ok(())
    }
}
