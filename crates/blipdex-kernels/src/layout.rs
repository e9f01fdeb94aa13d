//! Shapes shared by the CPU and CUDA kernels: attention's inputs and strided views.

use candle_core::Tensor;

/// One of attention's q, k, v: columns `offset..offset + dim` of a `[B, T, width]` tensor (a
/// fused projection's output holds several side by side).
#[derive(Clone, Copy)]
pub struct Part<'a> {
    pub src: &'a Tensor,
    pub offset: usize,
}

impl<'a> Part<'a> {
    /// The whole of `src` (offset 0).
    pub fn whole(src: &'a Tensor) -> Self {
        Self { src, offset: 0 }
    }
}

/// How attention combines its q, k, v.
#[derive(Clone, Copy)]
pub struct AttentionSpec<'a> {
    /// The profiling span's name (see [`crate::profile`]).
    pub name: &'static str,
    pub heads: usize,
    /// Width of q, k and v (`heads` × head size).
    pub dim: usize,
    /// Applied to q·kᵀ before the mask.
    pub scale: f64,
    /// Additive mask `[B, 1, Tq, Tk]`, or `[B, 1, 1, Tk]` for every query alike. The softmax
    /// runs in the mask's dtype (an f32 mask keeps fully masked rows finite in f16).
    pub mask: Option<&'a Tensor>,
}

/// A strided view as (size, stride) pairs, outermost first: size-1 dimensions dropped and a
/// dimension merged into the one before it when that one steps exactly over it. The CUDA copy
/// kernel walks these (fewer dimensions, fewer divisions per row); `[(1, 1)]` for one element.
pub fn merged_dims(dims: &[usize], strides: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (&d, &s) in dims.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        match out.last_mut() {
            Some((pd, ps)) if *ps == s * d => {
                *pd *= d;
                *ps = s;
            }
            _ => out.push((d, s)),
        }
    }
    if out.is_empty() {
        out.push((1, 1));
    }
    out
}
