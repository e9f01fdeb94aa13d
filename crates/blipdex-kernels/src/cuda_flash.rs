//! Fused attention on CUDA (`flash_attention.cu`), FlashAttention-2's scheme: the vision tower's
//! self-attention in f16 / bf16 on tensor cores, the Q-Former's self- and cross-attention in f32 on
//! CUDA cores. One kernel per layer in place of the head split copies, the two batched matmuls
//! (whose 257-wide score rows get cuBLAS's unaligned sm75 kernels on an H100 in f16), the softmax
//! and the head merge copy.
//!
//! Behind the `flash-attn` feature until it has been measured on a GPU (then on by default in such
//! a build; `Kernels::cuda_flash = false`, the CLI's `--cuda-flash false`, turns it off): the
//! kernels' code is tested on the CPU with the warp instructions emulated
//! (tests/flash_emulation.rs), and on a GPU by this module's test against candle's unfused ops
//! (`scripts/gpu-check.sh` runs it).
// Kernel launches are unsafe by nature; the block says why it holds.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use crate::layout::{AttentionSpec, Part};

const MODULE: &str = "blipdex_flash";
const SRC: &str = include_str!("flash_attention.cu");

static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    // mma.sync m16n8k16 with f32 accumulators and bf16 inputs: sm_80 and newer.
    crate::cuda::compiled(&PTX, dev, SRC, "blipdex's flash attention kernels", 8)
}

/// The kernel for a dtype and head size: its name and queries per block.
/// Halves: head sizes padded to 32, 64, 96 or 128 (even sizes: the kernel reads element pairs);
/// f32: up to 96 (its shared memory holds whole rows).
fn kernel(dtype: DType, hd: usize) -> Option<(String, usize)> {
    let padded = hd.div_ceil(32) * 32;
    match dtype {
        DType::F16 | DType::BF16 if hd.is_multiple_of(2) && (1..=128).contains(&hd) => {
            let sfx = if dtype == DType::F16 { "f16" } else { "bf16" };
            Some((format!("flash_{sfx}_{padded}"), 64))
        }
        DType::F32 if (1..=96).contains(&hd) => Some((format!("attention_f32_{padded}"), 32)),
        _ => None,
    }
}

/// What [`FlashAttention`] needs of q, k, v (`[B, T, width]` tensors, each part `dim` columns
/// from its offset): one dtype, contiguous, the same batch, k and v of one length and row width
/// (the kernel takes one stride for both), the kernel's head sizes, and for halves even start
/// offsets and widths (4-byte element pairs).
fn supported(parts: [(&[usize], usize, usize); 3], dtype: DType, heads: usize, dim: usize) -> bool {
    let [(qd, qs, qo), (kd, ks, ko), (vd, vs, vo)] = parts;
    let (&[b, tq, wq], &[bk, tk, wk], &[bv, tv, wv]) = (qd, kd, vd) else {
        return false;
    };
    if heads == 0 || !dim.is_multiple_of(heads) {
        return false;
    }
    let Some((_, rows)) = kernel(dtype, dim / heads) else {
        return false;
    };
    let pairs = dtype == DType::F32
        || [qs + qo, ks + ko, vs + vo, wq, wk]
            .iter()
            .all(|x| x.is_multiple_of(2));
    (bk, bv, tv, wv) == (b, b, tk, wk)
        && qo + dim <= wq
        && ko + dim <= wk
        && vo + dim <= wk
        && tq > 0
        && tk > 0
        && pairs
        && b * heads < i32::MAX as usize
        && tq.div_ceil(rows) <= 65_535
        && [b * tq * wq, b * tk * wk]
            .iter()
            .all(|&n| n < u32::MAX as usize)
}

/// `softmax(scale · q·kᵀ) · v` per head on CUDA, heads merged into `[B, Tq, dim]`, when the fused
/// kernels are requested and apply (no mask; see [`supported`]); `None` (the caller runs the
/// unfused ops) otherwise. A GPU older than sm_80, or NVRTC failing, gives one warning and `None`
/// from then on.
pub fn flash_attention(
    q: Part<'_>,
    k: Part<'_>,
    v: Part<'_>,
    spec: &AttentionSpec<'_>,
) -> Result<Option<Tensor>> {
    let parts = [q, k, v];
    let dtype = q.src.dtype();
    if spec.mask.is_some()
        || parts
            .iter()
            .any(|p| p.src.dtype() != dtype || !p.src.is_contiguous() || !p.src.device().is_cuda())
        || !supported(
            parts.map(|p| (p.src.dims(), p.src.layout().start_offset(), p.offset)),
            dtype,
            spec.heads,
            spec.dim,
        )
    {
        return Ok(None);
    }
    let candle_core::Device::Cuda(dev) = q.src.device() else {
        return Ok(None);
    };
    if let Err(e) = ptx(dev) {
        static WARNED: OnceLock<()> = OnceLock::new();
        WARNED.get_or_init(|| tracing::warn!("{e}; attention runs unfused"));
        return Ok(None);
    }
    let op = FlashAttention {
        heads: spec.heads,
        dim: spec.dim,
        scale: spec.scale as f32,
        offsets: parts.map(|p| p.offset),
    };
    q.src.apply_op3_no_bwd(k.src, v.src, &op).map(Some)
}

/// The fused kernels on q, k, v given as tensors and column offsets (see [`flash_attention`]).
pub struct FlashAttention {
    pub heads: usize,
    /// Width of q, k and v (`heads` × head size).
    pub dim: usize,
    pub scale: f32,
    /// Column offsets of q, k and v in their tensors.
    pub offsets: [usize; 3],
}

impl FlashAttention {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        inputs: [(&CudaStorage, &Layout); 3],
    ) -> Result<(CudaStorage, Shape)> {
        let [(qs, ql), (ks, kl), (vs, vl)] = inputs;
        let ranges = inputs.map(|(_, l)| l.contiguous_offsets());
        let [Some((qlo, qhi)), Some((klo, khi)), Some((vlo, vhi))] = ranges else {
            candle_core::bail!("flash attention needs contiguous q, k, v");
        };
        let parts = std::array::from_fn(|i| {
            let l = inputs[i].1;
            (l.dims(), l.start_offset(), self.offsets[i])
        });
        let [qo, ko, vo] = self.offsets;
        if !supported(parts, qs.dtype(), self.heads, self.dim) {
            candle_core::bail!(
                "flash attention: no kernel for {:?} q {:?}, k {:?}, v {:?} with {} heads",
                qs.dtype(),
                ql.dims(),
                kl.dims(),
                vl.dims(),
                self.heads
            );
        }
        let (b, tq, wq) = ql.shape().dims3()?;
        let (_, tk, wk) = kl.shape().dims3()?;
        let hd = self.dim / self.heads;
        let Some((name, rows)) = kernel(qs.dtype(), hd) else {
            candle_core::bail!("flash attention: no kernel for head size {hd}");
        };
        let dev = qs.device().clone();
        let f = dev.get_or_load_custom_func(&name, MODULE, ptx(&dev)?)?;
        let cfg = LaunchConfig {
            grid_dim: ((b * self.heads) as u32, tq.div_ceil(rows) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // The half kernels fold log2(e) into the scale (they use exp2).
        let scale = match qs.dtype() {
            DType::F32 => self.scale,
            _ => self.scale * std::f32::consts::LOG2_E,
        };
        let u = |x: usize| x as u32;
        let (q, k, v) = (
            qs.as_cuda_slice::<T>()?.slice(qlo + qo..qhi),
            ks.as_cuda_slice::<T>()?.slice(klo + ko..khi),
            vs.as_cuda_slice::<T>()?.slice(vlo + vo..vhi),
        );
        // SAFETY: the kernel writes every element of out (B·Tq rows of dim).
        let out = unsafe { dev.alloc::<T>(b * tq * self.dim)? };
        let mut builder = f.builder();
        builder.arg(&q).arg(&k).arg(&v).arg(&out);
        let (tq32, tk32, heads, hd32) = (u(tq), u(tk), u(self.heads), u(hd));
        let (q_rs, kv_rs, o_rs) = (u(wq), u(wk), u(self.dim));
        builder.arg(&tq32).arg(&tk32).arg(&heads).arg(&hd32);
        builder.arg(&q_rs).arg(&kv_rs).arg(&o_rs).arg(&scale);
        // The half kernels load 16-byte chunks where every row of q, k and v starts on one.
        let vec = u32::from(
            [qlo + qo, klo + ko, vlo + vo, wq, wk, hd]
                .iter()
                .all(|x| x.is_multiple_of(8)),
        );
        if qs.dtype() != DType::F32 {
            builder.arg(&vec);
        }
        // SAFETY: each part's reads stay within its B·T rows of its width (offset + dim ≤ width,
        // checked in `supported`), writes within out; half-precision pairs are 4-byte aligned
        // (even offsets and widths), chunks 16-byte aligned where vec (offsets and widths
        // multiples of 8 on candle's 256-byte aligned allocations).
        unsafe { builder.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((b, tq, self.dim)),
        ))
    }
}

impl candle_core::CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "blipdex-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("blipdex-flash-attention is a CUDA kernel")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if ks.dtype() != qs.dtype() || vs.dtype() != qs.dtype() {
            candle_core::bail!("flash attention: q, k, v of different dtypes");
        }
        let inputs = [(qs, ql), (ks, kl), (vs, vl)];
        match qs.dtype() {
            DType::F16 => self.launch::<f16>(inputs),
            DType::BF16 => self.launch::<bf16>(inputs),
            DType::F32 => self.launch::<f32>(inputs),
            d => candle_core::bail!("flash attention: no {d:?} kernel"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::max_abs_diff;
    use candle_core::Device;

    /// `[B, T, heads·hd]` → `[B, heads, T, hd]`.
    fn split(x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        x.reshape((b, t, heads, d / heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// The unfused ops in candle, in the inputs' dtype: head split, q·kᵀ, softmax, ·v, merge.
    fn unfused(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
        let (b, tq, d) = q.dims3()?;
        let (q, k, v) = (split(q, heads)?, split(k, heads)?, split(v, heads)?);
        let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
        p.matmul(&v)?.transpose(1, 2)?.reshape((b, tq, d))
    }

    /// The kernels on a GPU against candle's unfused ops in f32 on the same inputs (for halves,
    /// next to candle's unfused half-precision ops, the path blipdex takes without them). Built
    /// only with `--features flash-attn`, and then needs a CUDA device of sm_80 or newer.
    #[test]
    fn flash_attention_matches_unfused_ops() -> anyhow::Result<()> {
        let dev = Device::new_cuda(0)?;
        // (dtype, batch, Tq, Tk, heads, head size, self-attention): the base ViT (257 tokens,
        // head size 64), ViT-g's head size 88, off-tile and tiny sequences, every padded head
        // size, both load widths; the Q-Former's f32 self- (32 queries) and cross-attention (over
        // 257 keys).
        let cases = [
            (
                DType::F16,
                2usize,
                257usize,
                257usize,
                3usize,
                64usize,
                true,
            ),
            (DType::BF16, 2, 257, 257, 3, 64, true),
            (DType::F16, 1, 70, 70, 2, 88, true),
            (DType::BF16, 1, 5, 5, 3, 8, true),
            (DType::F16, 2, 130, 130, 1, 128, true),
            (DType::BF16, 3, 65, 65, 4, 32, true),
            (DType::F16, 1, 65, 65, 2, 12, true), // element pairs, not 16-byte chunks
            (DType::F16, 2, 32, 257, 2, 64, false),
            (DType::F32, 2, 32, 32, 3, 64, true),
            (DType::F32, 2, 32, 257, 2, 64, false),
            (DType::F32, 1, 45, 70, 2, 96, false),
            (DType::F32, 1, 33, 33, 3, 24, true),
        ];
        for (dtype, b, tq, tk, heads, hd, fused) in cases {
            let d = heads * hd;
            let scale = (hd as f64).powf(-0.5);
            // Inputs rounded to the dtype once; a leading batch row dropped, so the tensors start
            // inside their buffers.
            let randn = |t: usize, w: usize| -> Result<Tensor> {
                (Tensor::randn(0f32, 1.0, (b + 1, t, w), &dev)? * 1.5)?
                    .to_dtype(dtype)?
                    .narrow(0, 1, b)
            };
            let (qsrc, kvsrc) = if fused {
                let qkv = randn(tq, 3 * d)?;
                (qkv.clone(), qkv)
            } else {
                (randn(tq, d)?, randn(tk, 2 * d)?)
            };
            let (qo, ko, vo) = if fused { (0, d, 2 * d) } else { (0, 0, d) };
            let part = |x: &Tensor, o| x.narrow(2, o, d);
            let (q, k, v) = (part(&qsrc, qo)?, part(&kvsrc, ko)?, part(&kvsrc, vo)?);
            let f32s = |x: &Tensor| x.to_dtype(DType::F32);
            let want = unfused(&f32s(&q)?, &f32s(&k)?, &f32s(&v)?, heads, scale)?;
            let op = FlashAttention {
                heads,
                dim: d,
                scale: scale as f32,
                offsets: [qo, ko, vo],
            };
            let got = qsrc.apply_op3_no_bwd(&kvsrc, &kvsrc, &op)?;
            assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
            let e_flash = max_abs_diff(&f32s(&got)?, &want)?;
            let e_unfused = max_abs_diff(&f32s(&unfused(&q, &k, &v, heads, scale)?)?, &want)?;
            let case = format!("{dtype:?} b={b} tq={tq} tk={tk} heads={heads} hd={hd}");
            println!("{case}: fused {e_flash:.2e}, unfused {e_unfused:.2e}");
            // As the emulated kernels' test: halves a few units in the last place of outputs of
            // order 1; f32 within the unfused f32 ops' own error.
            let tol = match dtype {
                DType::BF16 => 2e-2,
                DType::F16 => 3e-3,
                _ => 1e-5,
            };
            assert!(e_flash <= tol, "{case}: {e_flash} > {tol}");
        }
        Ok(())
    }

    #[test]
    fn supported_shapes() {
        let fused = |dims: &'static [usize], start, d| {
            [(dims, start, 0), (dims, start, d), (dims, start, 2 * d)]
        };
        let vit: &[usize] = &[64, 257, 2304];
        assert!(supported(fused(vit, 0, 768), DType::F16, 12, 768));
        assert!(supported(
            fused(&[32, 257, 3 * 1408], 0, 1408),
            DType::BF16,
            16,
            1408
        )); // ViT-g: 88
        assert!(!supported(fused(vit, 1, 768), DType::F16, 12, 768)); // odd start: unaligned pairs
        assert!(supported(fused(vit, 1, 768), DType::F32, 12, 768));
        assert!(!supported(fused(&[1, 5, 27], 0, 9), DType::F16, 3, 9)); // odd head size
        assert!(!supported(fused(&[1, 5, 480], 0, 160), DType::F16, 1, 160)); // head size over 128
        assert!(!supported(fused(&[1, 5, 384], 0, 128), DType::F32, 1, 128)); // f32: up to 96
        assert!(!supported(fused(&[1, 5, 192], 0, 64), DType::F16, 5, 64)); // heads do not divide
                                                                            // The Q-Former's cross-attention: q apart, k and v side by side.
        let (q, kv): (&[usize], &[usize]) = (&[64, 32, 768], &[64, 257, 1536]);
        assert!(supported(
            [(q, 0, 0), (kv, 0, 0), (kv, 0, 768)],
            DType::F32,
            12,
            768
        ));
        let other: &[usize] = &[64, 256, 1536];
        assert!(!supported(
            [(q, 0, 0), (kv, 0, 0), (other, 0, 768)],
            DType::F32,
            12,
            768
        ));
        assert!(!supported(
            [(q, 0, 0), (kv, 0, 800), (kv, 0, 768)],
            DType::F32,
            12,
            768
        )); // past the row
    }
}
