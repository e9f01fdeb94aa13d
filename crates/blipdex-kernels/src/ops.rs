//! CPU kernels around candle's matmuls.
//!
//! - Elementwise: candle evaluates GELU (erf form) and the softmax exponential one scalar libm
//!   call at a time; on the base-size ViT they cost about a fifth of the forward pass. These run
//!   in place on the fresh matmul outputs (no allocation, one pass), vectorized by pulp's runtime
//!   dispatch (AVX-512 / AVX2 where the CPU has them) and split over rows with rayon.
//! - Few-row products (decoding): streaming GEMVs (over packed panels or stored rows) instead
//!   of a GEMM's packing.
//! - Weight layout, fixed at load ([`Linear`]): packed for [`sgemm`] where it runs (AVX-512F or
//!   AVX2 + FMA, as [`CpuGemm`] says; the vision, Q-Former and OPT linears); elsewhere Wᵀ
//!   row-major for the vision and Q-Former.
//! - Half precision on the CPU: bf16/f16 weights stay bf16/f16 in the packed panels and the
//!   streaming GEMV (widened in registers, f32 sums); bf16/f16 activations reaching these
//!   kernels are widened, run through the f32 kernels and rounded back once ([`to_dtype`]).
//!
//! Other devices and dtypes take candle's own ops, except on CUDA, where the bias adds and
//! layout copies go through `cuda_kernels`.
//! Accuracy (checked in the tests below against f64): erf ≤ 5e-7 absolute, exp ≤ 2.5 ulp; both
//! far inside the 1e-4 parity tolerance against transformers.

use std::sync::Arc;

use candle_core::{
    CpuStorage, DType, Device, InplaceOp1, InplaceOp2, Layout, Module, Result, Tensor, D,
};
use candle_nn::Activation;
use rayon::prelude::*;

use crate::layout::{AttentionSpec, Part};
use crate::profile::span;
use crate::sgemm::{self, Isa};

/// Elements per rayon task: enough to amortize the split, small enough to balance two cores.
const CHUNK: usize = 16 * 1024;

/// Which kernels run a model's ops, and the dispatch to them: attention (fused where a kernel
/// takes it, the unfused ops otherwise), residual add + layer norm, softmax, layout copies,
/// products against stored weights. A model takes one from its load options and copies it into
/// its layers (each [`Linear`] holds its own); nothing here reads the environment. Each op is a
/// [`profile`](crate::profile) span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    /// blipdex's CUDA kernels (bias + activation, softmax, residual add, layout copies) and
    /// cuBLASLt linears; `false`: candle's own CUDA ops (for comparison). No effect elsewhere.
    pub cuda: bool,
    /// The fused CUDA attention of a `flash-attn` build (sm_80+); `false`: the unfused ops.
    pub cuda_flash: bool,
    /// Which of blipdex's CPU GEMMs runs the linears and the fused attention on the CPU.
    pub cpu_gemm: CpuGemm,
}

impl Default for Kernels {
    fn default() -> Self {
        Self {
            cuda: true,
            cuda_flash: true,
            cpu_gemm: CpuGemm::Auto,
        }
    }
}

/// Which CPU GEMM runs a model's linears and its fused CPU attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuGemm {
    /// The best of blipdex's GEMMs this CPU runs ([`Isa::detect`]), else candle's matmul.
    #[default]
    Auto,
    /// This instruction set's kernels; candle's matmul where the CPU lacks it.
    Isa(Isa),
    /// candle's matmul (the gemm crate) and the unfused attention, to compare.
    Off,
}

impl CpuGemm {
    /// The instruction set that runs, `None` for candle's matmul.
    pub fn isa(self) -> Option<Isa> {
        match self {
            CpuGemm::Auto => Isa::detect(),
            CpuGemm::Isa(isa) => isa.available().then_some(isa),
            CpuGemm::Off => None,
        }
    }
}

impl std::str::FromStr for CpuGemm {
    type Err = String;

    /// `auto`, `off`, or an instruction set (`avx512`, `avx2`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(CpuGemm::Auto),
            "off" => Ok(CpuGemm::Off),
            other => other
                .parse::<Isa>()
                .map(CpuGemm::Isa)
                .map_err(|_| format!("{other:?}: use auto, avx512, avx2 or off")),
        }
    }
}

impl std::fmt::Display for CpuGemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CpuGemm::Auto => f.write_str("auto"),
            CpuGemm::Isa(isa) => f.write_str(isa.name()),
            CpuGemm::Off => f.write_str("off"),
        }
    }
}

/// The vector instructions of the pulp loops (layer norm, bias + GELU, softmax, the GEMV, the
/// fused attention's softmax): the best the CPU has, capped at AVX2 + FMA when the AVX2 GEMM was
/// chosen, so that `--cpu-gemm avx2` runs, and its tests exercise, what an AVX2-only CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Simd {
    avx2_only: bool,
}

impl Simd {
    pub(crate) fn dispatch<Op: pulp::WithSimd>(self, op: Op) -> Op::Output {
        #[cfg(target_arch = "x86_64")]
        if self.avx2_only {
            if let Some(v3) = pulp::x86::V3::try_new() {
                return pulp::Simd::vectorize(v3, op);
            }
        }
        pulp::Arch::new().dispatch(op)
    }
}

impl Kernels {
    /// See [`Simd`].
    pub(crate) fn simd(self) -> Simd {
        Simd {
            avx2_only: self.cpu_gemm.isa() == Some(Isa::Avx2),
        }
    }

    /// Multi-head attention, `softmax(scale · q·kᵀ + mask) · v` per head, heads merged into
    /// `[B, Tq, dim]`: fused where a kernel takes the inputs (see [`fused_attention`]), else
    /// the heads split out of q, k and v and [`Kernels::attention_heads`].
    pub fn attention(
        self,
        q: Part<'_>,
        k: Part<'_>,
        v: Part<'_>,
        spec: AttentionSpec<'_>,
    ) -> Result<Tensor> {
        span(spec.name, q.src.device(), || {
            if let Some(out) = fused_attention(self, q, k, v, spec)? {
                return Ok(out);
            }
            let heads = |p| self.split_heads(p, spec.heads, spec.dim);
            self.attention_heads(&heads(q)?, &heads(k)?, &heads(v)?, spec.scale, spec.mask)
        })
    }

    /// [`Kernels::attention`]'s fused kernels alone: `None` where none takes the inputs (the
    /// caller then runs [`Kernels::attention_heads`] on heads it may keep, as a KV cache does).
    pub fn fused_attention(
        self,
        q: Part<'_>,
        k: Part<'_>,
        v: Part<'_>,
        spec: AttentionSpec<'_>,
    ) -> Result<Option<Tensor>> {
        fused_attention(self, q, k, v, spec)
    }

    /// [`Kernels::attention`] over a fused `[B, T, 3·D]` q/k/v projection, unmasked.
    pub fn self_attention(
        self,
        name: &'static str,
        qkv: &Tensor,
        heads: usize,
        scale: f64,
    ) -> Result<Tensor> {
        let dim = qkv.dim(D::Minus1)? / 3;
        let part = |offset| Part { src: qkv, offset };
        let spec = AttentionSpec {
            name,
            heads,
            dim,
            scale,
            mask: None,
        };
        self.attention(part(0), part(dim), part(2 * dim), spec)
    }

    /// Columns `offset..offset + dim` of a `[B, T, width]` tensor as contiguous heads
    /// `[B, heads, T, dim / heads]`: one copy (a view while the columns fall on whole heads).
    pub fn split_heads(self, p: Part<'_>, heads: usize, dim: usize) -> Result<Tensor> {
        let (b, t, width) = p.src.dims3()?;
        if heads == 0 || !dim.is_multiple_of(heads) {
            candle_core::bail!("attention: {dim} columns do not split into {heads} heads");
        }
        let hd = dim / heads;
        let x = if width.is_multiple_of(hd) && p.offset.is_multiple_of(hd) {
            p.src
                .reshape((b, t, width / hd, hd))?
                .narrow(2, p.offset / hd, heads)?
        } else {
            p.src.narrow(2, p.offset, dim)?.reshape((b, t, heads, hd))?
        };
        span("attention.split_heads", p.src.device(), || {
            contiguous(self, &x.transpose(1, 2)?)
        })
    }

    /// Unfused attention over per-head `[B, H, T, hd]` tensors, heads merged into
    /// `[B, Tq, H·hd]`, as transformers' eager attention: q·kᵀ, scaled, plus the mask, softmax
    /// (in the mask's dtype, the result back in q's), times v. Unmasked, the scale is applied
    /// inside the softmax.
    pub fn attention_heads(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, h, tq, hd) = q.dims4()?;
        let dev = q.device();
        let scores = span("attention.qk", dev, || q.matmul(&k.t()?))?;
        let probs = span("attention.softmax", dev, || match mask {
            Some(m) => {
                let scores = if scale == 1.0 {
                    scores
                } else {
                    (scores * scale)?
                };
                let scores = scores.to_dtype(m.dtype())?.broadcast_add(m)?;
                scaled_softmax_last_dim(self, scores, 1.0)?.to_dtype(q.dtype())
            }
            None => scaled_softmax_last_dim(self, scores, scale),
        })?;
        let out = span("attention.av", dev, || probs.matmul(v))?;
        span("attention.merge_heads", dev, || {
            contiguous(self, &out.transpose(1, 2)?)?.reshape((b, tq, h * hd))
        })
    }

    /// `ln(x + residual)`, returning the sum (the next residual) and its normalization. On the
    /// CPU in f32 one vectorized pass per row (see [`add_layer_norm`]); elsewhere the add (in
    /// place on CUDA) then candle's layer norm. `x` must be fresh (a matmul output). Timed as
    /// `name`.
    pub fn add_layer_norm(
        self,
        name: &'static str,
        x: Tensor,
        residual: &Tensor,
        ln: &candle_nn::LayerNorm,
    ) -> Result<(Tensor, Tensor)> {
        span(name, &x.device().clone(), || {
            add_layer_norm(self, x, residual, ln)
        })
    }

    /// `ln(x)`: on the CPU in f32 the vectorized pass of [`Kernels::add_layer_norm`] without
    /// the add; elsewhere candle's layer norm.
    pub fn layer_norm(self, x: &Tensor, ln: &candle_nn::LayerNorm) -> Result<Tensor> {
        layer_norm(self, x, ln)
    }

    /// `x + y` for a fresh `x` (a matmul output nobody else holds) and `y` of the same shape:
    /// in place on CUDA (candle's add is a third the bandwidth there), candle's add elsewhere.
    pub fn add(self, x: Tensor, y: &Tensor) -> Result<Tensor> {
        add_fresh(self, x, y)
    }

    /// `softmax(x * scale)` over the last dimension, in place when it can be. `x` must be a
    /// fresh tensor nobody else holds (a matmul output or a masked sum).
    pub fn softmax(self, x: Tensor, scale: f64) -> Result<Tensor> {
        span("softmax", &x.device().clone(), || {
            scaled_softmax_last_dim(self, x, scale)
        })
    }

    /// `x.contiguous()`; on CUDA through blipdex's row copy kernel (candle's strided copy spends
    /// its time on 64-bit index division: see `cuda`).
    pub fn contiguous(self, x: &Tensor) -> Result<Tensor> {
        contiguous(self, x)
    }

    /// x·Wᵀ for x `[.., K]` and a stored `[N, K]` weight (a tied embedding): see [`matmul_t`].
    pub fn matmul_t(self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        matmul_t(self, x, w)
    }
}

/// A linear layer `y = x·Wᵀ + b` whose weight is laid out once, at load, for the product that
/// runs it (see [`Linear::prepared`]).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    kern: Kernels,
    /// Its profiling span, if it has one of its own (else its time is its caller's).
    name: Option<&'static str>,
}

#[derive(Clone, Debug)]
enum Weight {
    /// `[out, in]`, possibly the transposed view of an `[in, out]` buffer.
    Tensor(Tensor),
    /// Packed for [`sgemm`] (x86-64 with AVX-512F or AVX2 + FMA, on the CPU); the tensor is
    /// dropped.
    Packed(Arc<sgemm::PackedB>),
}

impl Linear {
    /// The weight as stored (`[out, in]`), nothing re-laid out.
    pub fn new(weight: Tensor, bias: Option<Tensor>, kern: Kernels) -> Self {
        Self {
            weight: Weight::Tensor(weight),
            bias,
            kern,
            name: None,
        }
    }

    /// The same layer, timed as `name` by [`crate::profile`].
    pub fn named(self, name: &'static str) -> Self {
        Self {
            name: Some(name),
            ..self
        }
    }

    /// Laid out for the device's product: packed for [`sgemm`] (blipdex's GEMM) on a CPU that
    /// runs it (see [`CpuGemm`]); on other CPUs Wᵀ row-major for gemm (which packs that layout
    /// much faster for image-sized inputs: up to 1.8× on one image's products); on other
    /// devices as stored. Replaces the checkpoint-layout buffer: one copy of the weight.
    pub fn prepared(weight: Tensor, bias: Option<Tensor>, kern: Kernels) -> Result<Self> {
        if !matches!(weight.device(), Device::Cpu) || weight.rank() != 2 {
            return Ok(Self::new(weight, bias, kern));
        }
        match Self::packed(&weight, kern)? {
            Some(packed) => Ok(Self {
                weight: Weight::Packed(packed),
                ..Self::new(weight, bias, kern)
            }),
            None => Ok(Self::new(transpose_f32(&weight)?.t()?, bias, kern)),
        }
    }

    /// For layers that run both few-row products (decoding) and prompt-sized ones: packed for
    /// [`sgemm`] where [`Linear::prepared`] packs (its GEMV streams the panels as fast as the
    /// stored rows), otherwise as stored, the layout of [`matmul_t`]'s streaming GEMV.
    pub fn packed_or_stored(weight: Tensor, bias: Option<Tensor>, kern: Kernels) -> Result<Self> {
        Ok(match Self::packed(&weight, kern)? {
            Some(packed) => Self {
                weight: Weight::Packed(packed),
                ..Self::new(weight, bias, kern)
            },
            None => Self::new(weight, bias, kern),
        })
    }

    /// The `[out, in]` weight packed for [`sgemm`] with `kern`'s CPU GEMM, in its dtype (bf16
    /// and f16: half the bytes, widened in registers, f32 sums). `None` on other CPUs.
    fn packed(weight: &Tensor, kern: Kernels) -> Result<Option<Arc<sgemm::PackedB>>> {
        let Some(isa) = kern.cpu_gemm.isa() else {
            return Ok(None);
        };
        if !matches!(weight.device(), Device::Cpu) || weight.rank() != 2 {
            return Ok(None);
        }
        let (n, k) = weight.dims2()?;
        let w = weight.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        // Wᵀ: element (k, n) at n·K + k.
        Ok(match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((lo, hi))) => {
                sgemm::PackedB::pack_for(isa, sgemm::MatRef::new(&v[lo..hi], k, n, 1, k))
                    .map(Arc::new)
            }
            (candle_core::Storage::Cpu(CpuStorage::BF16(v)), Some((lo, hi))) => {
                let bits: &[u16] = bytemuck::cast_slice(&v[lo..hi]);
                sgemm::PackedB::pack_bf16_for(isa, sgemm::MatRef::new(bits, k, n, 1, k))
                    .map(Arc::new)
            }
            (candle_core::Storage::Cpu(CpuStorage::F16(v)), Some((lo, hi))) => {
                let bits: &[u16] = bytemuck::cast_slice(&v[lo..hi]);
                sgemm::PackedB::pack_f16_for(isa, sgemm::MatRef::new(bits, k, n, 1, k))
                    .map(Arc::new)
            }
            _ => None,
        })
    }

    /// The weight's dtype.
    pub fn dtype(&self) -> DType {
        match &self.weight {
            Weight::Tensor(w) => w.dtype(),
            Weight::Packed(p) => p.dtype(),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Bytes the weight holds, packed or not.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Tensor(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Packed(p) => p.size_in_bytes(),
        }
    }

    /// Whether the weight is packed for blipdex's GEMM.
    pub fn is_packed(&self) -> bool {
        matches!(self.weight, Weight::Packed(_))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.name {
            Some(name) => span(name, x.device(), || linear(self, x)),
            None => linear(self, x),
        }
    }
}

impl Linear {
    /// `act(self(x))`, with the bias add and an erf GELU fused into one in-place pass.
    pub fn forward_act(&self, act: Activation, x: &Tensor) -> Result<Tensor> {
        match self.name {
            Some(name) => span(name, x.device(), || linear_act(self, act, x)),
            None => linear_act(self, act, x),
        }
    }
}

/// candle_nn's `linear` (checkpoint names `weight`, `bias`), [`Linear::prepared`].
pub fn linear_kn(
    in_dim: usize,
    out_dim: usize,
    vb: candle_nn::VarBuilder,
    kern: Kernels,
) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::prepared(weight, Some(bias), kern)
}

/// `w.t().contiguous()` for a contiguous f32 matrix, in 64-column tiles over rayon (candle's
/// strided copy of a transpose is single-threaded and cache-hostile: +2 s at load for ViT-base).
fn transpose_f32(w: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let tiled = {
        let (storage, layout) = w.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((lo, hi))) if n * k > 0 => {
                Some(transpose_tiles(&v[lo..hi], n, k))
            }
            _ => None,
        }
    };
    match tiled {
        Some(dst) => Tensor::from_vec(dst, (k, n), w.device()),
        None => w.t()?.contiguous(),
    }
}

/// [n, k] row-major → [k, n]; each task owns TILE output rows (= TILE input columns).
fn transpose_tiles(src: &[f32], n: usize, k: usize) -> Vec<f32> {
    const TILE: usize = 64;
    let mut dst = vec![0f32; n * k];
    dst.par_chunks_mut(TILE * n)
        .enumerate()
        .for_each(|(t, block)| {
            let j0 = t * TILE;
            let rows = block.len() / n;
            for (i, src_row) in src.chunks_exact(k).enumerate() {
                for (dj, v) in src_row[j0..j0 + rows].iter().enumerate() {
                    block[dj * n + i] = *v;
                }
            }
        });
    dst
}

/// `act(linear(x))`, with the bias add and an erf GELU fused into one in-place pass.
fn linear_act(lin: &Linear, act: Activation, x: &Tensor) -> Result<Tensor> {
    match (act, &lin.weight) {
        (Activation::Gelu, Weight::Packed(w)) => {
            // GELU on the f32 sums, one rounding to a half-precision input's dtype after it.
            let y = bias_gelu_erf(lin.kern, packed_linear_f32(w, lin.bias(), x)?, None)?;
            to_dtype(&y, x.dtype())
        }
        (Activation::Gelu, Weight::Tensor(w)) => {
            let y = matmul_t(lin.kern, x, w)?;
            bias_gelu_erf(lin.kern, y, lin.bias())
        }
        (act, _) => act.forward(&linear(lin, x)?),
    }
}

/// `gelu_erf(x + bias)` (bias broadcast over the last dimension), in place when it can be.
/// `x` must be a fresh tensor nobody else holds (a matmul output).
fn bias_gelu_erf(kern: Kernels, x: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let in_place = match bias {
        Some(b) => bias_in_place(kern, &x, b),
        None => fast_path(&x),
    };
    if in_place {
        match bias {
            Some(b) => x.inplace_op2(
                b,
                &BiasAct {
                    gelu: true,
                    simd: kern.simd(),
                },
            )?,
            None => x.inplace_op1(&GeluErf(kern.simd()))?,
        }
        return Ok(x);
    }
    let x = match bias {
        Some(b) => x.broadcast_add(b)?,
        None => x,
    };
    x.gelu_erf()
}

/// `softmax(x * scale)` over the last dimension, in place when it can be.
/// `x` must be a fresh tensor nobody else holds (a matmul output or a masked sum).
fn scaled_softmax_last_dim(kern: Kernels, x: Tensor, scale: f64) -> Result<Tensor> {
    if fast_path(&x) {
        x.inplace_op1(&ScaledSoftmax(scale as f32, kern.simd()))?;
        return Ok(x);
    }
    #[cfg(feature = "cuda")]
    if kern.cuda
        && crate::cuda::kernels_enabled(&x)
        && x.is_contiguous()
        && crate::cuda::softmax_supported(x.dtype(), x.dims())
    {
        x.inplace_op1(&ScaledSoftmax(scale as f32, kern.simd()))?;
        return Ok(x);
    }
    let x = if scale == 1.0 { x } else { (x * scale)? };
    candle_nn::ops::softmax_last_dim(&x.contiguous()?)
}

/// `x.contiguous()`; on CUDA through blipdex's row copy kernel (candle's strided copy spends its
/// time on 64-bit index division: see `cuda_kernels`).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn contiguous(kern: Kernels, x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kern.cuda
        && crate::cuda::kernels_enabled(x)
        && !x.is_contiguous()
        && crate::cuda::contiguous_supported(x.dtype(), x.layout())
    {
        return x.apply_op1_no_bwd(&crate::cuda::Contiguous);
    }
    x.contiguous()
}

/// Whether the in-place bias kernels take `x` and `bias`: CPU f32, or CUDA in f32/f16/bf16.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn bias_in_place(kern: Kernels, x: &Tensor, bias: &Tensor) -> bool {
    if fast_path(x) {
        return bias.dtype() == DType::F32 && bias.rank() == 1;
    }
    #[cfg(feature = "cuda")]
    if kern.cuda && crate::cuda::kernels_enabled(x) && x.is_contiguous() && bias.is_contiguous() {
        return crate::cuda::bias_supported(x.dtype(), x.dims(), bias.dtype(), bias.dims());
    }
    false
}

/// `x + y` for a fresh `x` (a matmul output nobody else holds) and `y` of the same shape: in
/// place on CUDA (candle's add is a third the bandwidth there), candle's add elsewhere.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn add_fresh(kern: Kernels, x: Tensor, y: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kern.cuda && crate::cuda::kernels_enabled(&x) && crate::cuda::add_supported(&x, y) {
        x.inplace_op2(y, &AddInPlace)?;
        return Ok(x);
    }
    x + y
}

/// `ln(x + residual)`, returning the sum (the next residual) and its normalization. On the CPU
/// in f32 one vectorized pass per row, split over rayon, the row kept in L1 between the sum, the
/// mean, the variance (two-pass, as PyTorch) and the output: candle's layer norm reads each row
/// with a scalar loop into a zero-filled output, then the residual add is another pass.
/// Elsewhere: [`add_fresh`] then candle's layer norm. `x` must be fresh (a matmul output).
fn add_layer_norm(
    kern: Kernels,
    x: Tensor,
    residual: &Tensor,
    ln: &candle_nn::LayerNorm,
) -> Result<(Tensor, Tensor)> {
    let simd = kern.simd();
    if let Some(out) = cpu_layer_norm(simd, &x, Some(residual), ln)? {
        return Ok(out);
    }
    if let Some(ln) = widened_layer_norm(&x, ln)? {
        let f32 = |t: &Tensor| to_dtype(t, DType::F32);
        if let Some((h, n)) = cpu_layer_norm(simd, &f32(&x)?, Some(&f32(residual)?), &ln)? {
            return Ok((to_dtype(&h, x.dtype())?, to_dtype(&n, x.dtype())?));
        }
    }
    let h = add_fresh(kern, x, residual)?;
    let n = ln.forward(&h)?;
    Ok((h, n))
}

/// `ln(x)`: on the CPU in f32 the same pass as [`add_layer_norm`], else candle's.
fn layer_norm(kern: Kernels, x: &Tensor, ln: &candle_nn::LayerNorm) -> Result<Tensor> {
    let simd = kern.simd();
    if let Some((_, n)) = cpu_layer_norm(simd, x, None, ln)? {
        return Ok(n);
    }
    if let Some(ln) = widened_layer_norm(x, ln)? {
        if let Some((_, n)) = cpu_layer_norm(simd, &to_dtype(x, DType::F32)?, None, &ln)? {
            return to_dtype(&n, x.dtype());
        }
    }
    ln.forward(x)
}

/// `ln` with its parameters in `dtype`.
pub fn layer_norm_in(ln: &candle_nn::LayerNorm, dtype: DType) -> Result<candle_nn::LayerNorm> {
    let w = ln.weight().to_dtype(dtype)?;
    Ok(match (ln.bias(), ln.remove_mean()) {
        (Some(b), true) => candle_nn::LayerNorm::new(w, b.to_dtype(dtype)?, ln.eps()),
        (None, true) => candle_nn::LayerNorm::new_no_bias(w, ln.eps()),
        (None, false) => candle_nn::LayerNorm::rms_norm(w, ln.eps()),
        (Some(_), false) => candle_core::bail!("layer_norm_in: an RMS norm with a bias"),
    })
}

/// A bf16/f16 input on the CPU: the layer norm in f32 (as PyTorch computes half-precision
/// layer norms on the CPU), its parameters widened; `None` otherwise.
fn widened_layer_norm(
    x: &Tensor,
    ln: &candle_nn::LayerNorm,
) -> Result<Option<candle_nn::LayerNorm>> {
    if !half_on_cpu(x) || ln.bias().is_none() || !ln.remove_mean() {
        return Ok(None);
    }
    layer_norm_in(ln, DType::F32).map(Some)
}

/// `x.to_dtype(dtype)`; bf16 ↔ f32 on the CPU split over rayon in loops that vectorize
/// (candle's is one scalar loop on one thread), with the same results as `half` (round to
/// nearest even, NaN kept quiet).
pub fn to_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    let converted = {
        let (storage, layout) = x.storage_and_layout();
        match (&*storage, layout.contiguous_offsets(), dtype) {
            (candle_core::Storage::Cpu(CpuStorage::BF16(v)), Some((lo, hi)), DType::F32) => {
                let src: &[u16] = bytemuck::cast_slice(&v[lo..hi]);
                // collect_into_vec writes the vector's spare capacity: no zero fill first.
                let mut out = Vec::new();
                src.par_iter()
                    .with_min_len(CHUNK)
                    .map(|s| f32::from_bits(u32::from(*s) << 16))
                    .collect_into_vec(&mut out);
                Some(Tensor::from_vec(out, x.dims(), &Device::Cpu))
            }
            (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((lo, hi)), DType::BF16) => {
                let mut out = Vec::new();
                v[lo..hi]
                    .par_iter()
                    .with_min_len(CHUNK)
                    .map(|s| half::bf16::from_bits(bf16_bits(*s)))
                    .collect_into_vec(&mut out);
                Some(Tensor::from_vec(out, x.dims(), &Device::Cpu))
            }
            _ => None,
        }
    };
    match converted {
        Some(t) => t,
        None => x.to_dtype(dtype),
    }
}

/// f32 → bf16 bits, rounded to nearest even; NaN stays a (quiet) NaN.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
    let nan = ((x >> 16) | 0x40) as u16;
    if x & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// bf16 or f16 on the CPU: the fused f32 kernels take a widened copy, rounded back once.
fn half_on_cpu(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && matches!(x.dtype(), DType::BF16 | DType::F16)
}

fn cpu_layer_norm(
    simd: Simd,
    x: &Tensor,
    residual: Option<&Tensor>,
    ln: &candle_nn::LayerNorm,
) -> Result<Option<(Tensor, Tensor)>> {
    let d = x.dim(D::Minus1)?;
    let Some(b) = ln.bias() else {
        return Ok(None);
    };
    let usable = fast_path(x)
        && residual.is_none_or(|r| fast_path(r) && r.dims() == x.dims())
        && ln.remove_mean()
        && [ln.weight(), b]
            .iter()
            .all(|p| fast_path(p) && p.dims() == [d]);
    if !usable || d == 0 {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let rs = residual.map(|r| r.storage_and_layout());
    let (ws, wl) = ln.weight().storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let xv = cpu_f32(&xs, xl.contiguous_offsets())?;
    let rv = match &rs {
        Some((s, l)) => Some(cpu_f32(s, l.contiguous_offsets())?),
        None => None,
    };
    let wv = cpu_f32(&ws, wl.contiguous_offsets())?;
    let bv = cpu_f32(&bs, bl.contiguous_offsets())?;
    let n = xv.len();
    let mut sum = if rv.is_some() {
        sgemm::zeroed(n)
    } else {
        Vec::new()
    };
    let mut out = sgemm::zeroed(n);
    let rows_per_task = (CHUNK / d).max(1);
    let eps = ln.eps() as f32;
    let task = |(i, (out, sum)): (usize, (&mut [f32], &mut [f32]))| {
        let lo = i * rows_per_task * d;
        let x = &xv[lo..lo + out.len()];
        let r = rv.map(|r| &r[lo..lo + out.len()]);
        simd.dispatch(NormRows {
            x,
            residual: r,
            sum,
            out,
            weight: wv,
            bias: bv,
            d,
            eps,
        })
    };
    if rv.is_some() {
        out.par_chunks_mut(rows_per_task * d)
            .zip(sum.par_chunks_mut(rows_per_task * d))
            .enumerate()
            .for_each(task);
    } else {
        out.par_chunks_mut(rows_per_task * d)
            .map(|o| (o, &mut [][..]))
            .enumerate()
            .for_each(task);
    }
    drop((xs, rs, ws, bs));
    let dims = x.dims();
    let out = Tensor::from_vec(out, dims, x.device())?;
    let sum = match residual {
        Some(_) => Tensor::from_vec(sum, dims, x.device())?,
        None => x.clone(),
    };
    Ok(Some((sum, out)))
}

/// Rows of [`cpu_layer_norm`]: `sum = x + residual` (when there is one), `out = ln(sum)`.
struct NormRows<'a> {
    x: &'a [f32],
    residual: Option<&'a [f32]>,
    sum: &'a mut [f32],
    out: &'a mut [f32],
    weight: &'a [f32],
    bias: &'a [f32],
    d: usize,
    eps: f32,
}

impl pulp::WithSimd for NormRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let d = self.d;
        for (i, out) in self.out.chunks_exact_mut(d).enumerate() {
            let x = &self.x[i * d..(i + 1) * d];
            let row: &[f32] = match self.residual {
                Some(r) => {
                    let sum = &mut self.sum[i * d..(i + 1) * d];
                    for ((s, a), b) in sum.iter_mut().zip(x).zip(&r[i * d..(i + 1) * d]) {
                        *s = a + b;
                    }
                    sum
                }
                None => x,
            };
            let mean = lane_sum(row, |v| v) / d as f32;
            let var = lane_sum(row, |v| (v - mean) * (v - mean)) / d as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for (((o, v), w), b) in out.iter_mut().zip(row).zip(self.weight).zip(self.bias) {
                *o = (v - mean) * inv * w + b;
            }
        }
    }
}

/// Σ f(v) with lane-wise partial sums, so the loop vectorizes.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|v| f(*v)).sum::<f32>()
}

#[cfg(feature = "cuda")]
struct AddInPlace;

#[cfg(feature = "cuda")]
impl InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "blipdex-add"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("blipdex-add is a CUDA op")
    }

    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        l: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> Result<()> {
        crate::cuda::add(s, l, y, yl)
    }
}

/// Most input rows for which [`matmul_t`] streams the weight itself (decoding: one row per beam).
pub const GEMV_MAX_ROWS: usize = 8;

/// `linear(x)` = x·Wᵀ + b: on CUDA one cuBLASLt call with the bias in its epilogue where it
/// applies; otherwise [`matmul_t`] with the bias added in place (CPU f32, CUDA kernels).
fn linear(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let w = match &lin.weight {
        Weight::Packed(packed) => return packed_linear(packed, lin.bias(), x),
        Weight::Tensor(w) => w,
    };
    #[cfg(feature = "cuda")]
    if lin.kern.cuda {
        if let Some(y) = crate::cuda::lt_linear(x, w, lin.bias())? {
            return Ok(y);
        }
    }
    let y = matmul_t(lin.kern, x, w)?;
    match lin.bias() {
        Some(b) if bias_in_place(lin.kern, &y, b) => {
            let op = BiasAct {
                gelu: false,
                simd: lin.kern.simd(),
            };
            y.inplace_op2(b, &op)?;
            Ok(y)
        }
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

thread_local! {
    /// [`fused_attention`]'s per-task score matrix.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Multi-head attention, `softmax(scale · q·kᵀ + mask) · v` per head, heads merged into
/// `[B, Tq, dim]`. On CPUs that run [`sgemm`] (see [`CpuGemm`]), f32: one task per (image,
/// head), the Tq × Tk scores made, masked, normalized and used inside that core's cache, q, k
/// and v read straight out of the projections (no head split copies, no batched score tensor
/// through memory). `None` elsewhere: the caller runs the unfused ops. On CUDA, built with `--features flash-attn`,
/// unmasked: blipdex's fused CUDA kernels (`cuda_flash`).
fn fused_attention(
    kern: Kernels,
    q: Part<'_>,
    k: Part<'_>,
    v: Part<'_>,
    spec: AttentionSpec<'_>,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "flash-attn")]
    if kern.cuda && kern.cuda_flash {
        if let Some(out) = crate::cuda_flash::flash_attention(q, k, v, &spec)? {
            return Ok(Some(out));
        }
    }
    if [q, k, v].iter().any(|p| half_on_cpu(p.src)) {
        // Widened only where the f32 path below runs: elsewhere the copies would be wasted.
        if kern.cpu_gemm.isa().is_none() {
            return Ok(None);
        }
        return widened_attention(kern, q, k, v, spec);
    }
    let AttentionSpec {
        heads, dim, scale, ..
    } = spec;
    let (b, tq, _) = q.src.dims3()?;
    let (bk, tk, _) = k.src.dims3()?;
    let (bv, tv, _) = v.src.dims3()?;
    let usable = |p: &Part<'_>| {
        fast_path(p.src) && p.src.rank() == 3 && p.offset + dim <= p.src.dim(2).unwrap_or(0)
    };
    // The mask's row stride: Tk per query, or 0 for one row shared by all queries.
    let mask_rows = match spec.mask {
        None => Some(0),
        Some(m) if !fast_path(m) => None,
        Some(m) => match m.dims() {
            [mb, 1, mq, mk] if *mb == b && *mk == tk && *mq == tq => Some(tk),
            [mb, 1, 1, mk] if *mb == b && *mk == tk => Some(0),
            _ => None,
        },
    };
    let Some(mask_rs) = mask_rows else {
        return Ok(None);
    };
    let Some(isa) = kern.cpu_gemm.isa() else {
        return Ok(None);
    };
    if heads == 0
        || !dim.is_multiple_of(heads)
        || (bk, bv, tv) != (b, b, tk)
        || ![q, k, v].iter().all(usable)
    {
        return Ok(None);
    }
    let hd = dim / heads;
    let guards = [q, k, v].map(|p| p.src.storage_and_layout());
    let mut data: [&[f32]; 3] = [&[]; 3];
    for (d, (storage, layout)) in data.iter_mut().zip(&guards) {
        match cpu_f32(storage, layout.contiguous_offsets()) {
            Ok(v) => *d = v,
            Err(_) => return Ok(None),
        }
    }
    let mask_guard = spec.mask.map(|m| m.storage_and_layout());
    let mask: Option<&[f32]> = match &mask_guard {
        None => None,
        Some((storage, layout)) => match cpu_f32(storage, layout.contiguous_offsets()) {
            Ok(v) => Some(v),
            Err(_) => return Ok(None),
        },
    };
    // Floats of the mask per image.
    let mask_img = if mask_rs == 0 { tk } else { tq * tk };
    let scale = scale as f32;
    let head = |task: usize| -> Option<Vec<f32>> {
        let (img, h) = (task / heads, task % heads);
        // Rows of image `img`, head `h` of part i: (data, row stride).
        let at = |i: usize, p: Part<'_>, t: usize| {
            let width = p.src.dim(2).unwrap_or(0);
            (&data[i][img * t * width + p.offset + h * hd..], width)
        };
        let (qd, qs) = at(0, q, tq);
        let (kd, ks) = at(1, k, tk);
        let (vd, vs) = at(2, v, tk);
        let view = sgemm::MatRef::new;
        let kt = sgemm::PackedB::pack_serial_for(isa, view(kd, hd, tk, 1, ks))?;
        let vp = sgemm::PackedB::pack_serial_for(isa, view(vd, tk, hd, vs, 1))?;
        let mut out = vec![0f32; tq * hd];
        // The scores are fully written by the product: a reused buffer, not a zeroed one.
        let done = SCORES.with_borrow_mut(|scores| {
            scores.resize(scores.len().max(tq * tk), 0.0);
            let scores = &mut scores[..tq * tk];
            if !sgemm::matmul_serial(view(qd, tq, hd, qs, 1), &kt, scores, tk) {
                return false;
            }
            let softmax_scale = match mask {
                // As transformers: scaled, then masked, then normalized.
                Some(mask) => {
                    let mask = &mask[img * mask_img..(img + 1) * mask_img];
                    for (i, row) in scores.chunks_exact_mut(tk).enumerate() {
                        let m = &mask[i * mask_rs..i * mask_rs + tk];
                        row.iter_mut().zip(m).for_each(|(s, m)| *s = *s * scale + m);
                    }
                    1.0
                }
                None => scale,
            };
            kern.simd().dispatch(Rows {
                xs: scores,
                n: tk,
                op: RowOp::Softmax(softmax_scale),
            });
            let probs = sgemm::MatRef::row_major(scores, tq, tk);
            sgemm::matmul_serial(probs, &vp, &mut out, hd)
        });
        done.then_some(out)
    };
    let per_head: Option<Vec<Vec<f32>>> = (0..b * heads).into_par_iter().map(head).collect();
    drop(guards);
    drop(mask_guard);
    let Some(per_head) = per_head else {
        return Ok(None);
    };
    let mut merged = sgemm::zeroed(b * tq * dim);
    merged
        .par_chunks_mut(tq * dim)
        .zip(per_head.par_chunks(heads))
        .for_each(|(dst, heads_out)| {
            for (h, o) in heads_out.iter().enumerate() {
                for (row, src) in dst.chunks_exact_mut(dim).zip(o.chunks_exact(hd)) {
                    row[h * hd..(h + 1) * hd].copy_from_slice(src);
                }
            }
        });
    Ok(Some(Tensor::from_vec(
        merged,
        (b, tq, dim),
        q.src.device(),
    )?))
}

/// [`fused_attention`] of bf16/f16 inputs on the CPU: on f32 copies (one per distinct tensor),
/// the output rounded back to q's dtype once (PyTorch's CPU attention also sums in f32).
fn widened_attention(
    kern: Kernels,
    q: Part<'_>,
    k: Part<'_>,
    v: Part<'_>,
    spec: AttentionSpec<'_>,
) -> Result<Option<Tensor>> {
    let mut wide: Vec<(candle_core::TensorId, Tensor)> = Vec::with_capacity(3);
    let mut widen = |t: &Tensor| -> Result<Tensor> {
        if let Some((_, w)) = wide.iter().find(|(id, _)| *id == t.id()) {
            return Ok(w.clone());
        }
        let w = to_dtype(t, DType::F32)?;
        wide.push((t.id(), w.clone()));
        Ok(w)
    };
    let (qs, ks, vs) = (widen(q.src)?, widen(k.src)?, widen(v.src)?);
    let mask = spec.mask.map(|m| m.to_dtype(DType::F32)).transpose()?;
    let part = |src, p: Part<'_>| Part {
        src,
        offset: p.offset,
    };
    let spec = AttentionSpec {
        mask: mask.as_ref(),
        ..spec
    };
    fused_attention(kern, part(&qs, q), part(&ks, k), part(&vs, v), spec)?
        .map(|out| to_dtype(&out, q.src.dtype()))
        .transpose()
}

/// x·Wᵀ + b through [`sgemm`], in x's dtype (a bf16 or f16 input is widened and the f32 result
/// rounded back once, as PyTorch's CPU linear accumulates half-precision products in f32).
fn packed_linear(w: &sgemm::PackedB, bias: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
    to_dtype(&packed_linear_f32(w, bias, x)?, x.dtype())
}

/// [`packed_linear`] before the rounding: f32 whatever x's dtype.
fn packed_linear_f32(w: &sgemm::PackedB, bias: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
    let (k, n) = (w.k(), w.n());
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == k => *last = n,
        _ => candle_core::bail!("linear: input {:?} does not end in {k} features", x.dims()),
    }
    let x = to_dtype(x, DType::F32)?.contiguous()?;
    let bias = bias
        .map(|b| b.to_dtype(DType::F32)?.contiguous())
        .transpose()?;
    let (xs, xl) = x.storage_and_layout();
    let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
    let xv = cpu_f32(&xs, xl.contiguous_offsets())?;
    let bv = match &bias_guard {
        Some((s, l)) => Some(cpu_f32(s, l.contiguous_offsets())?),
        None => None,
    };
    let a = sgemm::MatRef::row_major(xv, xv.len() / k.max(1), k);
    let y = if a.rows <= GEMV_MAX_ROWS {
        sgemm::gemv_packed(a, w, bv)
    } else {
        sgemm::matmul_packed(a, w, bv)
    };
    let y = y.ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "linear: blipdex's GEMM refused {}x{k} · {k}x{n} (bias {:?})",
            a.rows,
            bv.map(<[f32]>::len)
        ))
    })?;
    Tensor::from_vec(y, dims, &Device::Cpu)
}

fn cpu_f32(s: &candle_core::Storage, range: Option<(usize, usize)>) -> Result<&[f32]> {
    match (s, range) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((lo, hi))) => Ok(&v[lo..hi]),
        _ => candle_core::bail!("linear: packed weights need a contiguous f32 CPU input"),
    }
}

/// x·Wᵀ for x `[.., K]` and W `[N, K]`. With a few rows (token-by-token decoding) on the CPU in
/// f32, the weight is streamed once through dot products split over rayon: the matmul is memory
/// bound there, and gemm's packing for a 1-row product costs more than the product itself.
/// Otherwise x's leading dimensions are flattened into rows: one GEMM of B·T rows, as PyTorch's
/// `F.linear` does, rather than candle_nn's B batched GEMMs of T rows against a broadcast weight
/// (which pads each 257-row image to whole tiles on a GPU and repacks W per image on the CPU).
fn matmul_t(kern: Kernels, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kern.cuda {
        if let Some(y) = crate::cuda::lt_linear(x, w, None)? {
            return Ok(y);
        }
    }
    // A narrowed view (the last position of each sequence) is fine for gemm but not for candle's
    // MKL matmul; a copy of a few rows is free next to the product.
    let x = &x.contiguous()?;
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == k => *last = n,
        _ => return x.broadcast_matmul(&w.t()?),
    }
    let streamable = |t: &Tensor| matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16);
    // f32 activations against half-precision rows (a tied lm_head where bf16/f16 weights
    // compute in f32) have no candle matmul: they stream at any row count.
    let mixed = x.dtype() == DType::F32 && matches!(w.dtype(), DType::BF16 | DType::F16);
    if (rows <= GEMV_MAX_ROWS || mixed)
        && matches!(x.device(), Device::Cpu)
        && x.elem_count() > 0
        && streamable(x)
        && streamable(w)
        && w.is_contiguous()
    {
        // bf16/f16 rows (a half-precision tied lm_head) are widened as they stream; f32 sums.
        let y = to_dtype(x, DType::F32)?.apply_op2_no_bwd(w, &Gemv(kern.simd()))?;
        return to_dtype(&y.reshape(dims)?, x.dtype());
    }
    x.reshape((rows, k))?.matmul(&w.t()?)?.reshape(dims)
}

struct Gemv(Simd);

impl candle_core::CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "blipdex-gemv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (n, k) = l2.shape().dims2()?;
        let (x, w) = match (s1, l1.contiguous_offsets(), l2.contiguous_offsets()) {
            (CpuStorage::F32(x), Some((a, b)), Some(w)) => (&x[a..b], w),
            _ => candle_core::bail!("{}: needs a contiguous f32 input", self.name()),
        };
        let m = x.len() / k.max(1);
        // Output transposed, [N, M]: each task then writes one contiguous block.
        let mut yt = vec![0f32; n * m];
        const ROWS_PER_TASK: usize = 32;
        fn stream<W: Widen>(simd: Simd, x: &[f32], w: &[W], yt: &mut [f32], k: usize, m: usize) {
            yt.par_chunks_mut(ROWS_PER_TASK * m)
                .zip(w.par_chunks(ROWS_PER_TASK * k))
                .for_each(|(yt, w)| simd.dispatch(Dots { x, w, yt, k }));
        }
        let simd = self.0;
        match (s2, w) {
            (CpuStorage::F32(w), (c, d)) => stream(simd, x, &w[c..d], &mut yt, k, m),
            (CpuStorage::BF16(w), (c, d)) => stream(simd, x, &w[c..d], &mut yt, k, m),
            (CpuStorage::F16(w), (c, d)) => stream(simd, x, &w[c..d], &mut yt, k, m),
            _ => candle_core::bail!("{}: needs f32, bf16 or f16 weights", self.name()),
        }
        let y = if m == 1 {
            yt
        } else {
            let mut y = vec![0f32; n * m];
            for (j, row) in yt.chunks_exact(m).enumerate() {
                for (i, v) in row.iter().enumerate() {
                    y[i * n + j] = *v;
                }
            }
            y
        };
        Ok((CpuStorage::F32(y), candle_core::Shape::from((m, n))))
    }
}

/// A weight element the streaming GEMV reads: f32, or bf16 / f16 widened (exactly) to f32.
trait Widen: Copy + Send + Sync {
    /// `rows` as f32: themselves, or widened into `buf` (four rows at a time: L1-resident).
    fn as_f32<'a>(rows: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
}

impl Widen for f32 {
    #[inline(always)]
    fn as_f32<'a>(rows: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        rows
    }
}

impl Widen for half::bf16 {
    #[inline(always)]
    fn as_f32<'a>(rows: &'a [half::bf16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.resize(rows.len(), 0.0);
        for (d, s) in buf.iter_mut().zip(rows) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
        buf
    }
}

impl Widen for half::f16 {
    #[inline(always)]
    fn as_f32<'a>(rows: &'a [half::f16], buf: &'a mut Vec<f32>) -> &'a [f32] {
        // vcvtph2ps: element by element, f16 → f32 is a scalar bit dance (2.4× slower on the
        // lm_head).
        buf.resize(rows.len(), 0.0);
        sgemm::widen_f16(bytemuck::cast_slice(rows), buf);
        buf
    }
}

/// yt[j·m + i] = x_i · w_j for a block of weight rows.
struct Dots<'a, W> {
    x: &'a [f32],
    w: &'a [W],
    yt: &'a mut [f32],
    k: usize,
}

impl<W: Widen> pulp::WithSimd for Dots<'_, W> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let (k, m) = (self.k, self.x.len() / self.k);
        let mut wr = self.w.chunks_exact(4 * k);
        let mut yr = self.yt.chunks_exact_mut(4 * m);
        let mut scratch = Vec::new();
        for (w4, y4) in (&mut wr).zip(&mut yr) {
            let w4 = W::as_f32(w4, &mut scratch);
            let (w0, rest) = w4.split_at(k);
            let (w1, rest) = rest.split_at(k);
            let (w2, w3) = rest.split_at(k);
            for (i, xi) in self.x.chunks_exact(k).enumerate() {
                let d = dot4(xi, [w0, w1, w2, w3]);
                for (r, v) in d.into_iter().enumerate() {
                    y4[r * m + i] = v;
                }
            }
        }
        for (wj, yj) in wr
            .remainder()
            .chunks_exact(k)
            .zip(yr.into_remainder().chunks_exact_mut(m))
        {
            let wj = W::as_f32(wj, &mut scratch);
            for (xi, y) in self.x.chunks_exact(k).zip(yj.iter_mut()) {
                *y = dot4(xi, [wj, wj, wj, wj])[0];
            }
        }
    }
}

/// Four dot products sharing the loads of `x`: four independent FMA chains hide their latency,
/// and the horizontal sums are paid once per four weight rows.
#[inline(always)]
fn dot4(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
    let (mut a0, mut a1, mut a2, mut a3) =
        ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let xc = x.chunks_exact(LANES);
    let tail = xc.remainder();
    let [w0, w1, w2, w3] = w;
    let it = xc
        .zip(w0.chunks_exact(LANES))
        .zip(w1.chunks_exact(LANES))
        .zip(w2.chunks_exact(LANES))
        .zip(w3.chunks_exact(LANES));
    for ((((x, c0), c1), c2), c3) in it {
        for l in 0..LANES {
            a0[l] = x[l].mul_add(c0[l], a0[l]);
            a1[l] = x[l].mul_add(c1[l], a1[l]);
            a2[l] = x[l].mul_add(c2[l], a2[l]);
            a3[l] = x[l].mul_add(c3[l], a3[l]);
        }
    }
    let n = x.len() - tail.len();
    let mut out = [0f32; 4];
    for ((o, a), wr) in out.iter_mut().zip([a0, a1, a2, a3]).zip(w) {
        let mut t = 0f32;
        for (xv, wv) in tail.iter().zip(&wr[n..]) {
            t = xv.mul_add(*wv, t);
        }
        *o = a.iter().sum::<f32>() + t;
    }
    out
}

/// CPU, f32, contiguous and non-empty (the kernels split their input into non-empty chunks).
fn fast_path(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && x.is_contiguous()
        && x.elem_count() > 0
}

fn contiguous_f32<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let (lo, hi) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: needs a contiguous tensor")))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[lo..hi]),
        _ => candle_core::bail!("{op}: needs f32"),
    }
}

struct GeluErf(Simd);

impl InplaceOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "blipdex-gelu-erf"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let xs = contiguous_f32(s, l, self.name())?;
        xs.par_chunks_mut(CHUNK).for_each(|c| {
            let n = c.len();
            self.0.dispatch(Rows {
                xs: c,
                n,
                op: RowOp::BiasGelu(&[]),
            })
        });
        Ok(())
    }
}

/// `x = x + bias` (`gelu: false`) or `gelu_erf(x + bias)`, in place.
struct BiasAct {
    gelu: bool,
    simd: Simd,
}

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        if self.gelu {
            "blipdex-bias-gelu-erf"
        } else {
            "blipdex-bias-add"
        }
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout, b: &CpuStorage, bl: &Layout) -> Result<()> {
        let op = if self.gelu {
            RowOp::BiasGelu
        } else {
            RowOp::Bias
        };
        with_bias(self.simd, s, l, b, bl, self.name(), op)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        l: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        crate::cuda::bias_act(s, l, b, bl, self.gelu)
    }
}

/// Runs a per-row op that takes the bias `[n]` over x's rows, split over rayon.
fn with_bias<'b>(
    simd: Simd,
    s: &mut CpuStorage,
    l: &Layout,
    b: &'b CpuStorage,
    bl: &Layout,
    name: &str,
    op: fn(&'b [f32]) -> RowOp<'b>,
) -> Result<()> {
    let n = l.dims().last().copied().unwrap_or(1);
    let bias = match (b, bl.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((lo, hi))) if hi - lo == n => &v[lo..hi],
        _ => candle_core::bail!("{name}: bias must be contiguous f32 [{n}]"),
    };
    let xs = contiguous_f32(s, l, name)?;
    let rows_per_task = (CHUNK / n.max(1)).max(1);
    xs.par_chunks_mut(rows_per_task * n).for_each(|c| {
        simd.dispatch(Rows {
            xs: c,
            n,
            op: op(bias),
        })
    });
    Ok(())
}

struct ScaledSoftmax(f32, Simd);

impl InplaceOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "blipdex-scaled-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let n = l.dims().last().copied().unwrap_or(1);
        let scale = self.0;
        let xs = contiguous_f32(s, l, self.name())?;
        let rows_per_task = (CHUNK / n).max(1);
        xs.par_chunks_mut(rows_per_task * n).for_each(|c| {
            self.1.dispatch(Rows {
                xs: c,
                n,
                op: RowOp::Softmax(scale),
            })
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        crate::cuda::softmax(s, l, self.0)
    }
}

/// One task's rows, handed to pulp: `with_simd` is compiled once per instruction set (AVX-512,
/// AVX2+FMA, scalar) and everything it calls is `inline(always)`, so the loops vectorize there.
struct Rows<'a> {
    xs: &'a mut [f32],
    n: usize,
    op: RowOp<'a>,
}

enum RowOp<'a> {
    /// gelu_erf(x + bias[j]); an empty bias means none.
    BiasGelu(&'a [f32]),
    /// x + bias[j].
    Bias(&'a [f32]),
    Softmax(f32),
}

impl pulp::WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        match self.op {
            RowOp::BiasGelu([]) => {
                for x in self.xs.iter_mut() {
                    *x = gelu_erf(*x);
                }
            }
            RowOp::BiasGelu(bias) => {
                for row in self.xs.chunks_exact_mut(self.n) {
                    for (x, b) in row.iter_mut().zip(bias) {
                        *x = gelu_erf(*x + *b);
                    }
                }
            }
            RowOp::Bias(bias) => {
                for row in self.xs.chunks_exact_mut(self.n) {
                    for (x, b) in row.iter_mut().zip(bias) {
                        *x += *b;
                    }
                }
            }
            RowOp::Softmax(scale) => {
                for row in self.xs.chunks_exact_mut(self.n) {
                    softmax_row(row, scale);
                }
            }
        }
    }
}

const LANES: usize = 16;

/// softmax(row * scale) in place. Lane-wise accumulators so the reductions vectorize.
#[inline(always)]
fn softmax_row(row: &mut [f32], scale: f32) {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            // Not f32::max: its NaN rule keeps LLVM from vectorizing the loop (scalar vmaxss,
            // ~40% of the softmax); a NaN score gives a NaN row either way.
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut max = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in chunks.remainder() {
        max = max.max(x);
    }
    if max == f32::NEG_INFINITY {
        // A fully masked row: candle and PyTorch give NaN (0/0); keep that.
        row.fill(f32::NAN);
        return;
    }
    let mut s = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let e = exp((c[i] - max) * scale);
            c[i] = e;
            s[i] += e;
        }
    }
    let mut sum: f32 = s.iter().sum();
    for x in chunks.into_remainder() {
        let e = exp((*x - max) * scale);
        *x = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// 0.5·x·(1 + erf(x/√2)), PyTorch's `gelu` (approximate="none").
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf as a rational function of x² on [-4, 4] (|erf| rounds to 1 beyond), the float
/// approximation of Eigen/XLA: branch-free, so it vectorizes. Max abs error ≈ 4e-7.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_4e-5);
    p = p.mul_add(x2, -7.349_906_3e-4);
    p = p.mul_add(x2, -2.954_600_1e-3);
    p = p.mul_add(x2, -1.609_603_3e-2);
    let mut q = -1.456_607_2e-5_f32;
    q = q.mul_add(x2, -2.133_740_6e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329e-3);
    q = q.mul_add(x2, -1.426_474e-2);
    x * p / q
}

/// e^x, Cephes' expf: x = n·ln2 + r, a degree-6 polynomial for e^r, 2^n built in the exponent
/// bits. Branch-free; inputs below ln(f32::MIN_POSITIVE) ≈ -87.34 return 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Below ln(f32::MIN_POSITIVE) the result is 0, not a subnormal: masked scores (f32::MIN)
    // then give exact zeros, and the products that read them never take the CPU's slow
    // subnormal path (7× on OPT's causal prompt attention).
    let underflow = x < -87.336_54;
    let x = x.clamp(-87.336_54, 88.722_83);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    // n ∈ [-126, 128]: 2^n is a normal float (n = 128 only at the clamp, where y < 1).
    // n as an integer without `as i32`: Rust's saturating float→int cast does not vectorize
    // (a scalar convert and two compares per lane, most of the softmax's time). 1.5·2²³ + n is
    // exact for |n| < 2²², and its low mantissa bits are n.
    let n = ((n + 12_582_912.0).to_bits() as i32).wrapping_sub(0x4B40_0000);
    let pow2 = f32::from_bits(((n + 127).clamp(1, 254) as u32) << 23);
    if underflow {
        0.0
    } else {
        y * pow2
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layout::merged_dims;

    /// The default dispatch (every kernel on).
    pub(crate) const K: Kernels = Kernels {
        cuda: true,
        cuda_flash: true,
        cpu_gemm: CpuGemm::Auto,
    };

    /// The dispatch with each of blipdex's CPU GEMMs this CPU runs, then with none (candle's
    /// matmul): a test looping over these runs every CPU path the machine has, and says which.
    /// `BLIPDEX_REQUIRE_CPU_GEMM=avx512,avx2` makes a missing one a failure.
    pub(crate) fn each_cpu_gemm(test: &str) -> Vec<Kernels> {
        let have: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
        if let Ok(want) = std::env::var("BLIPDEX_REQUIRE_CPU_GEMM") {
            for name in want.split(',').filter(|n| !n.is_empty()) {
                let isa: Isa = name.parse().expect("BLIPDEX_REQUIRE_CPU_GEMM: avx512,avx2");
                assert!(
                    have.contains(&isa),
                    "BLIPDEX_REQUIRE_CPU_GEMM: no {name} on this CPU"
                );
            }
        }
        let names: Vec<&str> = have.iter().map(|i| i.name()).collect();
        eprintln!(
            "{test}: CPU GEMM paths run: {} and candle's matmul",
            names.join(", ")
        );
        let mut out: Vec<Kernels> = have
            .into_iter()
            .map(|isa| Kernels {
                cpu_gemm: CpuGemm::Isa(isa),
                ..K
            })
            .collect();
        out.push(Kernels {
            cpu_gemm: CpuGemm::Off,
            ..K
        });
        out
    }

    /// The weight as the transposed view of a contiguous `[in, out]` buffer (gemm's layout).
    fn relaid_out(k: Kernels, weight: Tensor, bias: Option<Tensor>) -> Result<Linear> {
        Ok(Linear::new(transpose_f32(&weight)?.t()?, bias, k))
    }

    /// [`fused_attention`] of a fused `[B, T, 3·D]` q/k/v projection.
    fn fused_self_attention(
        k: Kernels,
        qkv: &Tensor,
        heads: usize,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        let dim = qkv.dim(D::Minus1)? / 3;
        let part = |offset| Part { src: qkv, offset };
        let spec = AttentionSpec {
            name: "test",
            heads,
            dim,
            scale,
            mask: None,
        };
        fused_attention(k, part(0), part(dim), part(2 * dim), spec)
    }
    use candle_core::IndexOp;

    fn erf64(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.26 is too coarse for a reference; integrate instead:
        // erf(x) = 2/√π ∫0^x e^{-t²} dt, Simpson with 20k steps (error < 1e-12 on [-6, 6]).
        let n = 20_000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// Says which CPU GEMM paths this machine's tests run (`cargo test -- --nocapture` shows
    /// it); fails where `BLIPDEX_REQUIRE_CPU_GEMM` names one the CPU lacks.
    #[test]
    fn cpu_gemm_paths() {
        let paths = each_cpu_gemm("cpu_gemm_paths");
        assert_eq!(paths.last().map(|k| k.cpu_gemm), Some(CpuGemm::Off));
        for k in &paths[..paths.len() - 1] {
            let isa = k.cpu_gemm.isa().expect("an available ISA");
            assert_eq!(k.cpu_gemm, CpuGemm::Isa(isa));
        }
        assert_eq!(CpuGemm::Auto.isa(), Isa::detect());
        for s in ["auto", "off", "avx2", "avx512"] {
            assert_eq!(
                s.parse::<CpuGemm>().map(|c| c.to_string()),
                Ok(s.to_string())
            );
        }
        assert!("sse2".parse::<CpuGemm>().is_err());
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        let mut worst = 0f64;
        for i in -600..=600 {
            let x = i as f32 / 100.0;
            let e = (erf(x) as f64 - erf64(x as f64)).abs();
            worst = worst.max(e);
        }
        assert!(worst < 5e-7, "erf max abs error {worst}");
        for i in -600..=600 {
            let x = i as f32 / 100.0;
            let want = 0.5 * x as f64 * (1.0 + erf64(x as f64 / std::f64::consts::SQRT_2));
            let got = gelu_erf(x) as f64;
            assert!(
                (got - want).abs() <= 2e-6 * want.abs().max(1.0),
                "gelu({x})"
            );
        }
    }

    #[test]
    fn exp_is_within_two_ulp() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(
                (got - want).abs() <= 2.5 * f32::EPSILON as f64 * want,
                "exp({x}) = {got}, want {want}"
            );
        }
        // Never subnormal: zero below the normal range, normal above it.
        for x in [-87.34f32, -90.0, -200.0, f32::MIN, f32::NEG_INFINITY] {
            assert_eq!(exp(x), 0.0, "exp({x})");
        }
        for i in 0..=1000 {
            let x = -87.336_54 + i as f32 * 1e-3;
            assert!(exp(x).is_normal(), "exp({x}) = {:e}", exp(x));
        }
    }

    /// Largest |a − b| of two f32 tensors (also `cuda_flash`'s tests').
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// `--cpu-gemm avx2` caps the pulp loops at AVX2 (8 f32 lanes) too; the others run the
    /// CPU's best.
    #[test]
    fn simd_follows_the_chosen_gemm() {
        struct Lanes;
        impl pulp::WithSimd for Lanes {
            type Output = usize;
            fn with_simd<S: pulp::Simd>(self, _: S) -> usize {
                S::F32_LANES
            }
        }
        let best = pulp::Arch::new().dispatch(Lanes);
        for k in each_cpu_gemm("simd_follows_the_chosen_gemm") {
            let want = if k.cpu_gemm == CpuGemm::Isa(Isa::Avx2) {
                8
            } else {
                best
            };
            assert_eq!(k.simd().dispatch(Lanes), want, "{:?}", k.cpu_gemm);
        }
    }

    #[test]
    fn fused_ops_equal_candles_ops() -> anyhow::Result<()> {
        for k in each_cpu_gemm("fused_ops_equal_candles_ops") {
            fused_ops_equal_candles_ops_with(k)?;
        }
        Ok(())
    }

    fn fused_ops_equal_candles_ops_with(kern: Kernels) -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // Odd row lengths exercise the remainders; 3 × 1000 rows span several rayon tasks.
        for n in [1usize, 7, 16, 33, 257] {
            let x = (Tensor::randn(0f32, 3.0, (3, 1000, n), &dev)?).contiguous()?;
            let bias = Tensor::randn(0f32, 1.0, n, &dev)?;

            let want = x.broadcast_add(&bias)?.gelu_erf()?;
            let got = bias_gelu_erf(kern, x.copy()?, Some(&bias))?;
            let d = max_abs_diff(&got, &want)?;
            assert!(d < 1e-5, "bias+gelu n={n}: {d}");

            let want = candle_nn::ops::softmax_last_dim(&(&x * 0.125)?)?;
            let got = scaled_softmax_last_dim(kern, x.copy()?, 0.125)?;
            let d = max_abs_diff(&got, &want)?;
            assert!(d < 1e-6, "softmax n={n}: {d}");
        }
        // Strided input takes candle's path and still agrees.
        let x = Tensor::randn(0f32, 1.0, (40, 30), &dev)?.t()?;
        let want = candle_nn::ops::softmax_last_dim(&x.contiguous()?)?;
        let got = scaled_softmax_last_dim(kern, x, 1.0)?;
        let d = max_abs_diff(&got, &want)?;
        assert!(d < 1e-6, "strided softmax: {d}");
        Ok(())
    }

    #[test]
    fn gemv_equals_candles_matmul() -> anyhow::Result<()> {
        for k in each_cpu_gemm("gemv_equals_candles_matmul") {
            gemv_equals_candles_matmul_with(k)?;
        }
        Ok(())
    }

    fn gemv_equals_candles_matmul_with(kern: Kernels) -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // kern with and without a remainder after the 64-wide blocks; N across several tasks.
        for (m, k, n) in [
            (1usize, 768usize, 1000usize),
            (3, 100, 77),
            (8, 64, 33),
            (1, 5, 2),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, 1, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            let want = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
            let got = linear(&Linear::new(w.clone(), Some(b), kern), &x)?;
            assert_eq!(got.dims(), want.dims());
            let d = max_abs_diff(&got, &want)?;
            assert!(d < 1e-4, "gemv m={m} k={k} n={n}: {d}");
            // bf16 rows (a bf16 tied lm_head) streamed and widened, f32 and bf16 inputs.
            let wb = w.to_dtype(DType::BF16)?;
            let want = x.broadcast_matmul(&wb.to_dtype(DType::F32)?.t()?)?;
            let d = max_abs_diff(&matmul_t(kern, &x, &wb)?, &want)?;
            assert!(d < 1e-4, "bf16 gemv m={m} k={k} n={n}: {d}");
            let xb = x.to_dtype(DType::BF16)?;
            let want = xb
                .to_dtype(DType::F32)?
                .broadcast_matmul(&wb.to_dtype(DType::F32)?.t()?)?;
            assert_rounding_of(&matmul_t(kern, &xb, &wb)?, &want, "bf16 x bf16 gemv")?;
            // f16 rows against f32 activations stream at any row count (there is no candle
            // matmul for the mix).
            let wh = w.to_dtype(DType::F16)?;
            let want = x.broadcast_matmul(&wh.to_dtype(DType::F32)?.t()?)?;
            let d = max_abs_diff(&matmul_t(kern, &x, &wh)?, &want)?;
            assert!(d < 1e-4, "f16 gemv m={m} k={k} n={n}: {d}");
        }
        // More rows than GEMV_MAX_ROWS go through candle's matmul unchanged.
        let x = Tensor::randn(0f32, 1.0, (GEMV_MAX_ROWS + 1, 16), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 16), &dev)?;
        let d = max_abs_diff(&matmul_t(kern, &x, &w)?, &x.matmul(&w.t()?)?)?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    /// Image-sized inputs: leading dimensions flattened into one GEMM, bias added in place, with
    /// checkpoint-layout and relaid-out weights; the same values as candle_nn's batched Linear.
    #[test]
    fn linear_flattens_rows_like_candles_linear() -> anyhow::Result<()> {
        each_cpu_gemm("linear_flattens_rows_like_candles_linear")
            .into_iter()
            .try_for_each(linear_flattens_rows_like_candles_linear_with)
    }

    fn linear_flattens_rows_like_candles_linear_with(k: Kernels) -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for dims in [
            vec![3usize, 257, 48],
            vec![2, 3, 20, 48],
            vec![GEMV_MAX_ROWS + 1, 48],
            // Few rows (decoding): the streaming GEMVs, on stored and on packed weights.
            vec![1, 48],
            vec![2, 3, 48],
            vec![1, GEMV_MAX_ROWS, 48],
        ] {
            let x = Tensor::randn(0f32, 1.0, dims.as_slice(), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (37, 48), &dev)?;
            let b = Tensor::randn(0f32, 1.0, 37, &dev)?;
            for bias in [Some(b.clone()), None] {
                let want = candle_nn::Linear::new(w.clone(), bias.clone()).forward(&x)?;
                // As stored, gemm's layout, and packed for sgemm (on CPUs with AVX-512F).
                for l in [
                    Linear::new(w.clone(), bias.clone(), k),
                    relaid_out(k, w.clone(), bias.clone())?,
                    Linear::prepared(w.clone(), bias.clone(), k)?,
                    Linear::packed_or_stored(w.clone(), bias.clone(), k)?,
                ] {
                    let got = linear(&l, &x)?;
                    assert_eq!(got.dims(), want.dims());
                    let d = max_abs_diff(&got, &want)?;
                    assert!(d < 1e-4, "{dims:?} bias={}: {d}", bias.is_some());
                    let act = linear_act(&l, Activation::Gelu, &x)?;
                    let d = max_abs_diff(&act, &want.gelu_erf()?)?;
                    assert!(d < 1e-4, "{dims:?} gelu bias={}: {d}", bias.is_some());
                }
            }
            assert_eq!(
                Linear::prepared(w.clone(), None, k)?.is_packed(),
                k.cpu_gemm.isa().is_some()
            );
            assert_eq!(
                Linear::packed_or_stored(w.clone(), None, k)?.is_packed(),
                k.cpu_gemm.isa().is_some()
            );
        }
        // A width that does not match the weight is an error, not a silent reshape.
        let x = Tensor::zeros((2, 5, 47), DType::F32, &dev)?;
        let w = Tensor::zeros((37, 48), DType::F32, &dev)?;
        assert!(matmul_t(k, &x, &w).is_err());
        Ok(())
    }

    /// `got` (bf16 or f16) equals `want` (f32, computed from the same inputs widened) rounded
    /// to got's dtype, up to one step of it (2⁻⁷ relative for bf16, 2⁻¹⁰ for f16) where the f32
    /// sums' order moved a value across a rounding boundary. The absolute floor covers values
    /// near zero, where the vectorized erf's 5e-7 (times |x| ≤ ~5 in GELU's tail) is more.
    fn assert_rounding_of(got: &Tensor, want: &Tensor, what: &str) -> anyhow::Result<()> {
        let step = match got.dtype() {
            DType::BF16 => 1.0 / 128.0,
            DType::F16 => 1.0 / 1024.0,
            other => anyhow::bail!("{what}: {other:?} is not half precision"),
        };
        assert_eq!(got.dims(), want.dims(), "{what}: dims");
        let g = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let w = want.flatten_all()?.to_vec1::<f32>()?;
        for (i, (g, w)) in g.iter().zip(&w).enumerate() {
            assert!(
                (g - w).abs() <= w.abs() * step + 1e-5,
                "{what} [{i}]: {g} vs {w}"
            );
        }
        Ok(())
    }

    /// The parallel conversions give `half`'s (candle's) results bit for bit: rounding ties to
    /// even, overflow to infinity, NaN, subnormals, signed zeros, and random bit patterns.
    #[test]
    fn bf16_conversions_equal_halfs() -> anyhow::Result<()> {
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x0000_8001),
            f32::MIN_POSITIVE,
        ];
        let mut state = 0x9e37_79b9_u32;
        vals.extend((0..100_000).map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            f32::from_bits(state)
        }));
        let x = Tensor::from_vec(vals.clone(), vals.len(), &Device::Cpu)?;
        let got: Vec<u16> = to_dtype(&x, DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want: Vec<u16> = vals
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        assert_eq!(got, want);
        let back = to_dtype(&to_dtype(&x, DType::BF16)?, DType::F32)?.to_vec1::<f32>()?;
        let want: Vec<u32> = want
            .iter()
            .map(|b| half::bf16::from_bits(*b).to_f32().to_bits())
            .collect();
        assert_eq!(back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
        Ok(())
    }

    #[test]
    #[ignore = "timing, run by hand: cargo test --release -p blipdex-model conversion_and_gemv_speed -- --ignored --nocapture"]
    fn conversion_and_gemv_speed() -> anyhow::Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2056, 3072), &Device::Cpu)?;
        let xb = x.to_dtype(DType::BF16)?;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let y = to_dtype(&x, DType::BF16)?;
            let a = t.elapsed();
            let t = std::time::Instant::now();
            let z = to_dtype(&xb, DType::F32)?;
            let b = t.elapsed();
            let t = std::time::Instant::now();
            let y2 = x.to_dtype(DType::BF16)?;
            let c = t.elapsed();
            let t = std::time::Instant::now();
            let z2 = xb.to_dtype(DType::F32)?;
            let d = t.elapsed();
            drop((y, z, y2, z2));
            eprintln!("f32->bf16 {a:?} bf16->f32 {b:?}; candle {c:?} {d:?}");
        }
        // The tied lm_head's streaming GEMV (OPT vocabulary × 768), f32 and bf16 rows.
        let w = Tensor::randn(0f32, 1.0, (50272, 768), &Device::Cpu)?;
        let wb = w.to_dtype(DType::BF16)?;
        let wh = w.to_dtype(DType::F16)?;
        let x = Tensor::randn(0f32, 1.0, (1, 768), &Device::Cpu)?;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            std::hint::black_box(matmul_t(K, &x, &w)?);
            let a = t.elapsed();
            let t = std::time::Instant::now();
            std::hint::black_box(matmul_t(K, &x, &wb)?);
            let b = t.elapsed();
            let t = std::time::Instant::now();
            std::hint::black_box(matmul_t(K, &x, &wh)?);
            let c = t.elapsed();
            eprintln!("lm_head gemv: f32 rows {a:?}, bf16 rows {b:?}, f16 rows {c:?}");
        }
        Ok(())
    }

    /// bf16 and f16 on the CPU: weights packed in their dtype (half the bytes), inputs
    /// widened, the f32 kernels' result rounded once: linear (GEMM and GEMV rows), linear +
    /// GELU, attention and the residual layer norm against the same ops in f32 on the widened
    /// inputs.
    #[test]
    fn half_precision_runs_the_f32_kernels_on_widened_inputs() -> anyhow::Result<()> {
        each_cpu_gemm("half_precision_runs_the_f32_kernels_on_widened_inputs")
            .into_iter()
            .try_for_each(half_precision_runs_the_f32_kernels_on_widened_inputs_with)
    }

    fn half_precision_runs_the_f32_kernels_on_widened_inputs_with(
        k: Kernels,
    ) -> anyhow::Result<()> {
        if k.cpu_gemm.isa().is_none() {
            // candle's own half-precision ops: not this contract (they round as they go).
            return Ok(());
        }
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            let half = |t: Tensor| t.to_dtype(dtype);
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let w = half(Tensor::randn(0f32, 1.0, (37, 48), &dev)?)?;
            let b = half(Tensor::randn(0f32, 1.0, 37, &dev)?)?;
            let l = Linear::prepared(w.clone(), Some(b.clone()), k)?;
            let l32 = Linear::prepared(f32(&w)?, Some(f32(&b)?), k)?;
            assert_eq!(l.is_packed(), k.cpu_gemm.isa().is_some());
            if l.is_packed() {
                assert_eq!(l.dtype(), dtype);
                assert_eq!(2 * l.weight_bytes(), l32.weight_bytes());
            }
            let reference = candle_nn::Linear::new(f32(&w)?, Some(f32(&b)?));
            for dims in [vec![3usize, 257, 48], vec![1, 48], vec![2, 3, 48]] {
                let x = half(Tensor::randn(0f32, 1.0, dims.as_slice(), &dev)?)?;
                let want = reference.forward(&f32(&x)?)?;
                let what = format!("{dtype:?} linear {dims:?} ({})", k.cpu_gemm);
                assert_rounding_of(&linear(&l, &x)?, &want, &what)?;
                let act = linear_act(&l, Activation::Gelu, &x)?;
                assert_rounding_of(&act, &want.gelu_erf()?, &format!("gelu {what}"))?;
            }
            let (bsz, t, heads, hd) = (2usize, 257usize, 3usize, 16usize);
            let qkv = half(Tensor::randn(0f32, 1.0, (bsz, t, 3 * heads * hd), &dev)?)?;
            let want = attention_reference(&f32(&qkv)?, heads, 0.25)?;
            match fused_self_attention(k, &qkv, heads, 0.25)? {
                Some(got) => assert_rounding_of(&got, &want, "attention")?,
                None => assert!(
                    k.cpu_gemm.isa().is_none(),
                    "fused path refused where the CPU GEMM runs"
                ),
            }
            let d = 48;
            let ln = candle_nn::LayerNorm::new(
                half(Tensor::randn(1f32, 0.1, d, &dev)?)?,
                half(Tensor::randn(0f32, 0.1, d, &dev)?)?,
                1e-6,
            );
            let ln32 = layer_norm_in(&ln, DType::F32)?;
            let x = half(Tensor::randn(0f32, 1.0, (2, 7, d), &dev)?)?;
            let r = half(Tensor::randn(0f32, 1.0, (2, 7, d), &dev)?)?;
            let sum = (f32(&x)? + f32(&r)?)?;
            let (h, n) = add_layer_norm(k, x.clone(), &r, &ln)?;
            assert_rounding_of(&h, &sum, "residual sum")?;
            assert_rounding_of(&n, &ln32.forward(&sum)?, "add + layer norm")?;
            let n = layer_norm(k, &x, &ln)?;
            assert_rounding_of(&n, &ln32.forward(&f32(&x)?)?, "layer norm")?;
        }
        Ok(())
    }

    /// The unfused reference: head split, q·kᵀ, softmax, ·v, heads merged (candle's ops).
    fn attention_reference(qkv: &Tensor, heads: usize, scale: f64) -> anyhow::Result<Tensor> {
        let (b, t, d3) = qkv.dims3()?;
        let hd = d3 / 3 / heads;
        let x = qkv
            .reshape((b, t, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (
            x.i(0)?.contiguous()?,
            x.i(1)?.contiguous()?,
            x.i(2)?.contiguous()?,
        );
        let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
        Ok(p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, heads * hd))?)
    }

    #[test]
    fn fused_attention_matches_unfused_ops() -> anyhow::Result<()> {
        each_cpu_gemm("fused_attention_matches_unfused_ops")
            .into_iter()
            .try_for_each(fused_attention_matches_unfused_ops_with)
    }

    fn fused_attention_matches_unfused_ops_with(kern: Kernels) -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // Sequence lengths off the 14-row and 32-column tiles, head sizes 64 / 12 / 1.
        for (b, t, heads, hd) in [
            (2usize, 257usize, 3usize, 64usize),
            (1, 5, 5, 12),
            (3, 40, 2, 1),
        ] {
            let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * heads * hd), &dev)?;
            let scale = (hd as f64).powf(-0.5);
            let want = attention_reference(&qkv, heads, scale)?;
            match fused_self_attention(kern, &qkv, heads, scale)? {
                Some(got) => {
                    assert_eq!(got.dims(), want.dims());
                    let d = max_abs_diff(&got, &want)?;
                    assert!(d < 1e-5, "b={b} t={t} heads={heads} hd={hd}: {d}");
                }
                None => assert!(
                    kern.cpu_gemm.isa().is_none(),
                    "fused path refused where the CPU GEMM runs"
                ),
            }
        }
        // Cross-attention: 32 queries over 257 keys, k and v side by side in one projection.
        let (b, tq, tk, heads, hd) = (2usize, 32usize, 257usize, 4usize, 16usize);
        let dim = heads * hd;
        let q = Tensor::randn(0f32, 1.0, (b, tq, dim), &dev)?;
        let kv = Tensor::randn(0f32, 1.0, (b, tk, 2 * dim), &dev)?;
        let split = |x: &Tensor, t: usize| -> anyhow::Result<Tensor> {
            Ok(x.reshape((b, t, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (qh, kh, vh) = (
            split(&q, tq)?,
            split(&kv.narrow(2, 0, dim)?, tk)?,
            split(&kv.narrow(2, dim, dim)?, tk)?,
        );
        let p = candle_nn::ops::softmax_last_dim(&(qh.matmul(&kh.t()?)? * 0.25)?)?;
        let want = p.matmul(&vh)?.transpose(1, 2)?.reshape((b, tq, dim))?;
        let part = |src, offset| Part { src, offset };
        let spec = AttentionSpec {
            name: "test",
            heads,
            dim,
            scale: 0.25,
            mask: None,
        };
        match fused_attention(kern, part(&q, 0), part(&kv, 0), part(&kv, dim), spec)? {
            Some(got) => {
                let d = max_abs_diff(&got, &want)?;
                assert!(d < 1e-5, "cross-attention: {d}");
            }
            None => assert!(
                kern.cpu_gemm.isa().is_none(),
                "fused path refused where the CPU GEMM runs"
            ),
        }
        // Masks as OPT's prompt pass (causal, left padding: [B, 1, T, T], f32::MIN where
        // masked) and the Q-Former's text (padding only: [B, 1, 1, T]): scaled, masked, then
        // normalized, as transformers.
        let (b, t, heads, hd) = (2usize, 19usize, 3usize, 8usize);
        let dim = heads * hd;
        let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * dim), &dev)?;
        let pad = [0usize, 4];
        let causal: Vec<f32> = (0..b * t * t)
            .map(|i| {
                let (img, q, k) = (i / (t * t), i / t % t, i % t);
                if k <= q && k >= pad[img] {
                    0.0
                } else {
                    f32::MIN
                }
            })
            .collect();
        let padding: Vec<f32> = (0..b * t)
            .map(|i| if i % t >= pad[i / t] { 0.0 } else { f32::MIN })
            .collect();
        for mask in [
            Tensor::from_vec(causal, (b, 1, t, t), &dev)?,
            Tensor::from_vec(padding, (b, 1, 1, t), &dev)?,
        ] {
            let split = |i: usize| -> anyhow::Result<Tensor> {
                Ok(qkv
                    .narrow(2, i * dim, dim)?
                    .reshape((b, t, heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (qh, kh, vh) = (split(0)?, split(1)?, split(2)?);
            let scores = (qh.matmul(&kh.t()?)? * 0.5)?.broadcast_add(&mask)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?;
            let want = p.matmul(&vh)?.transpose(1, 2)?.reshape((b, t, dim))?;
            let spec = AttentionSpec {
                name: "test",
                heads,
                dim,
                scale: 0.5,
                mask: Some(&mask),
            };
            let (q, k, v) = (part(&qkv, 0), part(&qkv, dim), part(&qkv, 2 * dim));
            match fused_attention(kern, q, k, v, spec)? {
                Some(got) => {
                    let d = max_abs_diff(&got, &want)?;
                    assert!(d < 1e-5, "mask {:?}: {d}", mask.dims());
                }
                None => assert!(
                    kern.cpu_gemm.isa().is_none(),
                    "fused path refused where the CPU GEMM runs"
                ),
            }
            // A mask of another shape is left to the caller.
            let wrong = mask.narrow(3, 0, t - 1)?.contiguous()?;
            let spec = AttentionSpec {
                name: "test",
                mask: Some(&wrong),
                ..spec
            };
            assert!(fused_attention(kern, q, k, v, spec)?.is_none());
        }
        // Half precision on the CPU runs widened and comes back in its dtype; not a whole
        // number of heads: left to the caller.
        let qkv = Tensor::zeros((1, 4, 3 * 8), DType::F16, &dev)?;
        match fused_self_attention(kern, &qkv, 2, 1.0)? {
            Some(out) => assert_eq!(out.dtype(), DType::F16),
            None => assert!(
                kern.cpu_gemm.isa().is_none(),
                "fused path refused where the CPU GEMM runs"
            ),
        }
        let qkv = Tensor::zeros((1, 4, 3 * 8), DType::F32, &dev)?;
        assert!(fused_self_attention(kern, &qkv, 3, 1.0)?.is_none());
        Ok(())
    }

    fn layer_norm_f64(x: &Tensor, ln: &candle_nn::LayerNorm) -> anyhow::Result<Vec<f64>> {
        let d = x.dim(D::Minus1)?;
        let w = ln.weight().to_vec1::<f32>()?;
        let b = ln
            .bias()
            .map(|b| b.to_vec1::<f32>())
            .transpose()?
            .unwrap_or_default();
        let mut out = Vec::new();
        for row in x.flatten_all()?.to_vec1::<f32>()?.chunks(d) {
            let mean = row.iter().map(|v| *v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + ln.eps()).sqrt();
            for (j, v) in row.iter().enumerate() {
                out.push((*v as f64 - mean) * inv * w[j] as f64 + b[j] as f64);
            }
        }
        Ok(out)
    }

    #[test]
    fn add_layer_norm_matches_f64() -> anyhow::Result<()> {
        for k in each_cpu_gemm("add_layer_norm_matches_f64") {
            add_layer_norm_matches_f64_with(k)?;
        }
        Ok(())
    }

    fn add_layer_norm_matches_f64_with(kern: Kernels) -> anyhow::Result<()> {
        let dev = Device::Cpu;
        // Widths with and without a remainder after 16 lanes; rows across several tasks.
        for (rows, d) in [(3usize, 768usize), (50, 37), (1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (rows, 1, d), &dev)?;
            let r = (Tensor::randn(0f32, 1.0, (rows, 1, d), &dev)? + 3.0)?;
            let w = Tensor::randn(0f32, 1.0, d, &dev)?;
            let b = Tensor::randn(0f32, 1.0, d, &dev)?;
            let ln = candle_nn::LayerNorm::new(w, b, 1e-6);
            let want_h = (&x + &r)?;
            let (h, n) = add_layer_norm(kern, x.copy()?, &r, &ln)?;
            assert_eq!(max_abs_diff(&h, &want_h)?, 0.0);
            // Against f64 (candle's own E[x²] − mean² loses digits on rows with a large mean).
            for (got, input) in [(n, &want_h), (layer_norm(kern, &r, &ln)?, &r)] {
                let want = layer_norm_f64(input, &ln)?;
                let got = got.flatten_all()?.to_vec1::<f32>()?;
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 2e-5,
                        "rows={rows} d={d}: {g} vs {w}"
                    );
                }
            }
        }
        // A non-contiguous residual takes candle's path, same values.
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
        let r = Tensor::randn(0f32, 1.0, (6, 4), &dev)?.t()?;
        let ln = candle_nn::LayerNorm::new(
            Tensor::ones(6, DType::F32, &dev)?,
            Tensor::zeros(6, DType::F32, &dev)?,
            1e-5,
        );
        let (h, n) = add_layer_norm(kern, x.copy()?, &r, &ln)?;
        assert_eq!(max_abs_diff(&h, &(&x + &r)?)?, 0.0);
        assert!(max_abs_diff(&n, &ln.forward(&(&x + &r)?)?)? < 1e-5);
        Ok(())
    }

    /// The CUDA copy kernel's index walk (`copy_rows` in cuda_kernels.rs), on the host.
    fn copy_rows_like_the_kernel(src: &[f32], start: usize, v: &[(usize, usize)]) -> Vec<f32> {
        let (cols, cs) = v[v.len() - 1];
        let rows: usize = v[..v.len() - 1].iter().map(|(d, _)| d).product();
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let (mut rem, mut off) = (r, 0);
            for &(d, s) in v[..v.len() - 1].iter().rev() {
                off += (rem % d) * s;
                rem /= d;
            }
            out.extend((0..cols).map(|c| src[start + off + c * cs]));
        }
        out
    }

    #[test]
    fn merged_views_copy_what_candle_copies() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let base = Tensor::arange(0f32, 2. * 5. * 3. * 4. * 6., &dev)?.reshape((2, 5, 3, 4, 6))?;
        let views = [
            base.clone(),                                  // contiguous: one dimension
            base.permute((2, 0, 3, 1, 4))?.i(1)?,          // a q/k/v head split
            base.reshape((2, 5, 12, 6))?.transpose(1, 2)?, // the Q-Former split / merge
            base.permute((0, 2, 4, 1, 3))?,                // last dimension strided
            base.narrow(1, 1, 3)?.narrow(4, 2, 1)?,        // offset, size-1 dimension
            base.i((1, 2, 0, 3))?.narrow(0, 4, 1)?,        // one element
        ];
        for (i, v) in views.iter().enumerate() {
            let merged = merged_dims(v.dims(), v.stride());
            let (storage, layout) = v.storage_and_layout();
            let src = match &*storage {
                candle_core::Storage::Cpu(CpuStorage::F32(s)) => s.clone(),
                _ => anyhow::bail!("f32 CPU storage expected"),
            };
            let got = copy_rows_like_the_kernel(&src, layout.start_offset(), &merged);
            let want = v.flatten_all()?.to_vec1::<f32>()?;
            anyhow::ensure!(got == want, "view {i} {:?}: {merged:?}", v.dims());
        }
        assert_eq!(merged_dims(&[2, 3, 4], &[12, 4, 1]), [(24, 1)]);
        assert_eq!(merged_dims(&[3, 1, 4], &[1, 7, 3]), [(3, 1), (4, 3)]);
        assert_eq!(merged_dims(&[1, 1], &[5, 1]), [(1, 1)]);
        Ok(())
    }

    #[test]
    fn relayout_keeps_values_and_results() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        for (n, k) in [(70usize, 130usize), (3, 200), (64, 64)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let t = transpose_f32(&w)?;
            assert_eq!(t.dims(), &[k, n]);
            assert_eq!(max_abs_diff(&t, &w.t()?.contiguous()?)?, 0.0);
            let lin = Linear::new(w.clone(), None, K);
            let re = relaid_out(K, w.clone(), None)?;
            let Weight::Tensor(rw) = &re.weight else {
                anyhow::bail!("relaid out weight should stay a tensor")
            };
            assert_eq!(rw.dims(), w.dims());
            assert_eq!(max_abs_diff(rw, &w)?, 0.0);
            let x = Tensor::randn(0f32, 1.0, (2, 5, k), &dev)?;
            assert!(max_abs_diff(&re.forward(&x)?, &lin.forward(&x)?)? < 1e-4);
        }
        Ok(())
    }

    #[test]
    fn masked_rows_match_candle() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(
            &[[1f32, f32::NEG_INFINITY, 2.0], [f32::MIN, 0.0, f32::MIN]],
            &dev,
        )?;
        let want = candle_nn::ops::softmax_last_dim(&x)?.to_vec2::<f32>()?;
        let got = scaled_softmax_last_dim(K, x.copy()?, 1.0)?.to_vec2::<f32>()?;
        for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() < 1e-7, "{got:?} vs {want:?}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod attention_timing {
    use super::tests::K;
    use super::*;

    #[test]
    #[ignore = "timing, by hand"]
    fn attention_parts() {
        let (t, hd) = (257usize, 64usize);
        let d3 = 3 * 768;
        let qkv: Vec<f32> = (0..t * d3)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let reps = 200;
        let mut scores = vec![0f32; t * t];
        let mut out = vec![0f32; t * hd];
        let (mut p_k, mut p_v, mut qk, mut sm, mut av) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for _ in 0..reps {
            let c = std::time::Instant::now();
            let kt =
                sgemm::PackedB::pack_serial(sgemm::MatRef::new(&qkv[768..], hd, t, 1, d3)).unwrap();
            p_k += c.elapsed().as_secs_f64();
            let c = std::time::Instant::now();
            let vp = sgemm::PackedB::pack_serial(sgemm::MatRef::new(&qkv[1536..], t, hd, d3, 1))
                .unwrap();
            p_v += c.elapsed().as_secs_f64();
            let c = std::time::Instant::now();
            assert!(sgemm::matmul_serial(
                sgemm::MatRef::new(&qkv, t, hd, d3, 1),
                &kt,
                &mut scores,
                t
            ));
            qk += c.elapsed().as_secs_f64();
            let c = std::time::Instant::now();
            pulp::Arch::new().dispatch(Rows {
                xs: &mut scores,
                n: t,
                op: RowOp::Softmax(0.125),
            });
            sm += c.elapsed().as_secs_f64();
            let c = std::time::Instant::now();
            assert!(sgemm::matmul_serial(
                sgemm::MatRef::new(&scores, t, t, t, 1),
                &vp,
                &mut out,
                hd
            ));
            av += c.elapsed().as_secs_f64();
        }
        let us = |x: f64| x / reps as f64 * 1e6;
        let gf = |x: f64| 2.0 * (t * t * hd) as f64 / (x / reps as f64) / 1e9;
        eprintln!(
            "per head (one thread): pack k {:.1} us, pack v {:.1} us, qk {:.1} us ({:.0} GFLOP/s), softmax {:.1} us, av {:.1} us ({:.0} GFLOP/s)",
            us(p_k), us(p_v), us(qk), gf(qk), us(sm), us(av), gf(av)
        );
    }

    /// OPT-125m's prompt pass (32 queries + BOS, 12 heads): causal, f32::MIN where masked.
    #[test]
    #[ignore = "timing, by hand"]
    fn opt_prompt_attention() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let (t, d) = (33usize, 768usize);
        let q = Tensor::randn(0f32, 1.0, (1, t, d), &dev)?;
        let causal: Vec<f32> = (0..t * t)
            .map(|i| if i % t <= i / t { 0.0 } else { f32::MIN })
            .collect();
        let mask = Tensor::from_vec(causal, (1, 1, t, t), &dev)?;
        let part = |src| Part { src, offset: 0 };
        let spec = AttentionSpec {
            name: "test",
            heads: 12,
            dim: d,
            scale: 1.0,
            mask: Some(&mask),
        };
        let (mut best, mut sum) = (f64::MAX, 0.0);
        for _ in 0..50 {
            let c = std::time::Instant::now();
            assert!(fused_attention(K, part(&q), part(&q), part(&q), spec)?.is_some());
            best = best.min(c.elapsed().as_secs_f64());
            sum += c.elapsed().as_secs_f64();
        }
        eprintln!(
            "fused masked attention 33 tokens: best {:.1} us, mean {:.1} us",
            best * 1e6,
            sum / 50.0 * 1e6
        );
        Ok(())
    }
}
