//! Flash attention on CUDA tensor cores for the vision tower's self-attention in f16 / bf16
//! (`flash_attention.cu`): one kernel per layer in place of the head split copies, the two
//! batched matmuls (whose 257-wide score rows get cuBLAS's unaligned sm75 kernels on an H100),
//! the softmax and the head merge copy.
//!
//! Opt-in (`BLIPDEX_CUDA_FLASH=1`) until it has been measured on a GPU: its code is tested on the
//! CPU with the warp instructions emulated (tests/flash_emulation.rs), and on a GPU by this
//! module's test against candle's unfused ops (`scripts/gpu-check.sh` runs it).
// Kernel launches are unsafe by nature; the block says why it holds.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

const MODULE: &str = "blipdex_flash";
const SRC: &str = include_str!("flash_attention.cu");

/// Padded head sizes the kernel is instantiated for (`flash_{f16,bf16}_{HDP}`).
const HEAD_DIMS: [usize; 4] = [32, 64, 96, 128];
/// Queries per block (the kernel's FLASH_BQ).
const QUERIES_PER_BLOCK: usize = 64;

static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    // mma.sync m16n8k16 with f32 accumulators and bf16 inputs: sm_80 and newer.
    crate::cuda_kernels::compiled(&PTX, dev, SRC, "blipdex's flash attention kernels", 8)
}

/// Whether `BLIPDEX_CUDA_FLASH=1` asks for the flash kernel.
fn requested() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("BLIPDEX_CUDA_FLASH").is_ok_and(|v| v == "1"))
}

/// The kernel's padded head size for `hd`, if it has one.
fn padded_head_dim(hd: usize) -> Option<usize> {
    HEAD_DIMS.into_iter().find(|&p| hd <= p)
}

/// Whether [`FlashSelfAttention`] takes a fused `[B, T, 3·D]` q/k/v projection of this dtype,
/// dims and start offset with `heads` heads: f16/bf16, an even head size of at most 128 (the
/// kernel reads element pairs), grid and offsets within its 32-bit arithmetic.
fn supported(dtype: DType, dims: &[usize], start: usize, heads: usize) -> bool {
    let &[b, t, d3] = dims else {
        return false;
    };
    let hd = match (d3 % 3, heads) {
        (0, h) if h > 0 && (d3 / 3).is_multiple_of(h) => d3 / 3 / h,
        _ => return false,
    };
    matches!(dtype, DType::F16 | DType::BF16)
        && hd > 0
        && hd.is_multiple_of(2)
        && padded_head_dim(hd).is_some()
        && start.is_multiple_of(2)
        && t > 0
        && b * heads < i32::MAX as usize
        && t.div_ceil(QUERIES_PER_BLOCK) <= 65_535
        && b * t * d3 < u32::MAX as usize
}

/// `softmax(scale · q·kᵀ) · v` per head of a fused, contiguous `[B, T, 3·D]` projection on CUDA,
/// heads merged into `[B, T, D]`, when flash attention is requested and applies; `None` (the
/// caller runs the unfused ops) otherwise. A GPU older than sm_80, or NVRTC failing, gives one
/// warning and `None` from then on.
pub fn flash_self_attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Option<Tensor>> {
    if !requested()
        || !crate::cuda_kernels::enabled(qkv)
        || !qkv.is_contiguous()
        || !supported(qkv.dtype(), qkv.dims(), qkv.layout().start_offset(), heads)
    {
        return Ok(None);
    }
    let candle_core::Device::Cuda(dev) = qkv.device() else {
        return Ok(None);
    };
    if let Err(e) = ptx(dev) {
        static WARNED: OnceLock<()> = OnceLock::new();
        WARNED.get_or_init(|| tracing::warn!("{e}; attention runs unfused"));
        return Ok(None);
    }
    qkv.apply_op1_no_bwd(&FlashSelfAttention {
        heads,
        scale: scale as f32,
    })
    .map(Some)
}

/// The flash kernel on a fused q/k/v projection (see [`flash_self_attention`]).
pub struct FlashSelfAttention {
    pub heads: usize,
    pub scale: f32,
}

impl candle_core::CustomOp1 for FlashSelfAttention {
    fn name(&self) -> &'static str {
        "blipdex-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("blipdex-flash-attention is a CUDA kernel")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((lo, hi)) = l.contiguous_offsets() else {
            candle_core::bail!("flash attention needs a contiguous q/k/v projection");
        };
        if !supported(s.dtype(), l.dims(), lo, self.heads) {
            candle_core::bail!(
                "flash attention: no kernel for {:?} {:?} with {} heads",
                s.dtype(),
                l.dims(),
                self.heads
            );
        }
        let (b, t, d3) = l.shape().dims3()?;
        let d = d3 / 3;
        let hd = d / self.heads;
        let hdp = padded_head_dim(hd).unwrap_or(128);
        let dev = s.device().clone();
        let (sfx, bf) = match s.dtype() {
            DType::F16 => ("f16", false),
            _ => ("bf16", true),
        };
        let f = dev.get_or_load_custom_func(&format!("flash_{sfx}_{hdp}"), MODULE, ptx(&dev)?)?;
        let cfg = LaunchConfig {
            grid_dim: (
                (b * self.heads) as u32,
                t.div_ceil(QUERIES_PER_BLOCK) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (tq, heads, hd32, rs, o_rs) =
            (t as u32, self.heads as u32, hd as u32, d3 as u32, d as u32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        macro_rules! launch {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?;
                let (q, k, v) = (
                    src.slice(lo..hi),
                    src.slice(lo + d..hi),
                    src.slice(lo + 2 * d..hi),
                );
                // SAFETY: the kernel writes every element of out (B·T rows of D).
                let out = unsafe { dev.alloc::<$t>(b * t * d)? };
                let mut builder = f.builder();
                builder.arg(&q).arg(&k).arg(&v).arg(&out);
                builder.arg(&tq).arg(&tq).arg(&heads).arg(&hd32);
                builder.arg(&rs).arg(&rs).arg(&o_rs).arg(&scale_log2);
                // SAFETY: reads stay within the B·T rows of 3·D elements checked above (the
                // k and v views start D and 2·D in), writes within out; element pairs are
                // 4-byte aligned (even start offset, head size and row strides).
                unsafe { builder.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = if bf { launch!(bf16) } else { launch!(f16) };
        Ok((out, Shape::from((b, t, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp, D};

    /// Head split, q·kᵀ, softmax, ·v, heads merged, in candle's ops and qkv's dtype.
    fn unfused(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
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
        p.matmul(&v)?.transpose(1, 2)?.reshape((b, t, heads * hd))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(D::Minus1)?
            .to_scalar::<f32>()
    }

    /// The kernel on a GPU against candle's unfused ops in f32 on the same half-precision inputs,
    /// next to candle's unfused ops in half precision (the path blipdex takes without it).
    /// Built only with `--features cuda`, and then needs a CUDA device of sm_80 or newer.
    #[test]
    fn flash_attention_matches_unfused_ops() -> anyhow::Result<()> {
        let dev = Device::new_cuda(0)?;
        // Base ViT (257 tokens, head size 64), ViT-g's head size 88, off-tile and tiny sequences,
        // every padded head size, a start offset inside the buffer.
        for dtype in [DType::F16, DType::BF16] {
            for (b, t, heads, hd) in [
                (2usize, 257usize, 3usize, 64usize),
                (1, 70, 2, 88),
                (1, 5, 3, 8),
                (2, 130, 1, 128),
                (1, 65, 2, 16),
                (3, 64, 4, 32),
            ] {
                let d3 = 3 * heads * hd;
                let qkv = (Tensor::randn(0f32, 1.0, (b + 1, t, d3), &dev)? * 1.5)?
                    .to_dtype(dtype)?
                    .narrow(0, 1, b)?;
                let scale = (hd as f64).powf(-0.5);
                let want = unfused(&qkv.to_dtype(DType::F32)?, heads, scale)?;
                let got = qkv.apply_op1_no_bwd(&FlashSelfAttention {
                    heads,
                    scale: scale as f32,
                })?;
                assert_eq!(got.dims(), want.dims());
                assert_eq!(got.dtype(), dtype);
                let e_flash = max_abs_diff(&got, &want)?;
                let e_half = max_abs_diff(&unfused(&qkv, heads, scale)?, &want)?;
                println!(
                    "{dtype:?} b={b} t={t} heads={heads} hd={hd}: flash {e_flash:.2e}, unfused {e_half:.2e}"
                );
                // As the emulated kernel's test: a few units in the last place of outputs of order 1.
                let tol = if dtype == DType::BF16 { 2e-2 } else { 3e-3 };
                assert!(
                    e_flash <= tol,
                    "{dtype:?} b={b} t={t} heads={heads} hd={hd}: {e_flash} > {tol}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn supported_shapes() {
        assert!(supported(DType::F16, &[64, 257, 2304], 0, 12));
        assert!(supported(DType::BF16, &[32, 257, 3 * 1408], 0, 16)); // ViT-g: head size 88
        assert!(!supported(DType::F32, &[64, 257, 2304], 0, 12));
        assert!(!supported(DType::F16, &[64, 257, 2304], 1, 12)); // odd start: unaligned pairs
        assert!(!supported(DType::F16, &[1, 5, 3 * 9], 0, 3)); // odd head size
        assert!(!supported(DType::F16, &[1, 5, 3 * 160], 0, 1)); // head size over 128
        assert!(!supported(DType::F16, &[1, 5, 3 * 64], 0, 5)); // heads do not divide D
    }
}
