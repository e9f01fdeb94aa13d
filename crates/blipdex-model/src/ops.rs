//! Fused CPU kernels for the hot elementwise steps between matmuls. Each computes exactly what
//! the unfused candle ops compute (same f32 operations in the same order), so outputs are
//! bit-identical; other devices and dtypes take the unfused path.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Activation, Linear};
use rayon::prelude::*;

/// `gelu_erf(x + bias)` over the last dimension, in parallel (candle's `gelu_erf` runs on one
/// thread; for ViT-g's MLP it is the largest elementwise pass of a forward).
struct BiasGeluErf;

impl CustomOp2 for BiasGeluErf {
    fn name(&self) -> &'static str {
        "bias-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("bias-gelu-erf: f32 only");
        };
        let (Some((x0, x1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("bias-gelu-erf: contiguous inputs only");
        };
        let (x, b) = (&x[x0..x1], &b[b0..b1]);
        let n = b.len();
        if n == 0 || l1.dims().last() != Some(&n) {
            candle_core::bail!("bias-gelu-erf: bias of {n} for input {:?}", l1.dims());
        }
        let mut out = vec![0f32; x.len()];
        // ~64k elements per task: big enough to amortize scheduling.
        let rows = (65_536 / n).max(1);
        out.par_chunks_mut(rows * n)
            .zip(x.par_chunks(rows * n))
            .for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_exact_mut(n).zip(xs.chunks_exact(n)) {
                    for ((o, &x), &b) in orow.iter_mut().zip(xrow).zip(b) {
                        let v = x + b;
                        *o = (libm::erff(v * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * v;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `act(linear(xs))`, fused on CPU f32 for the exact GELU.
pub fn linear_act(linear: &Linear, act: Activation, xs: &Tensor) -> Result<Tensor> {
    match (act, linear.bias()) {
        (Activation::Gelu, Some(bias))
            if xs.device().is_cpu() && xs.dtype() == DType::F32 && bias.dtype() == DType::F32 =>
        {
            let y = Linear::new(linear.weight().clone(), None).forward(xs)?;
            y.contiguous()?
                .apply_op2_no_bwd(&bias.contiguous()?, &BiasGeluErf)
        }
        _ => act.forward(&linear.forward(xs)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_equals_unfused_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (3, 5, 40), &dev)? * 3.0)?;
        let w = Tensor::randn(0f32, 0.3, (70, 40), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 70, &dev)?;
        let lin = Linear::new(w, Some(b));
        let fused = linear_act(&lin, Activation::Gelu, &x)?;
        let plain = Activation::Gelu.forward(&lin.forward(&x)?)?;
        let d = (fused - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }
}
