//! Tensor kernels under candle, with no model in them: what a transformer's forward pass spends
//! its time on, faster than candle's generic ops on the machines blipdex runs on.
//!
//! - [`Linear`]: `y = x·Wᵀ + b` with the weight laid out once, at load, for the product that
//!   runs it: packed for blipdex's GEMM ([`sgemm`]) on x86-64 CPUs that have it, Wᵀ row-major
//!   for candle's matmul elsewhere on the CPU, one cuBLASLt call with the bias in its epilogue
//!   on CUDA. [`Linear::forward_act`] fuses the activation.
//! - [`Kernels`]: the dispatch layer for the rest of a layer: attention (fused where it can be,
//!   the unfused ops otherwise), residual add + layer norm, softmax, layout copies. It is a
//!   value a model takes from its load options and copies into its layers; which kernels run is
//!   decided there, never by reading the environment.
//! - [`profile`]: opt-in per-op timings; the dispatch layer records the spans.
//!
//! Module graph (no cycles): `ops` (dispatch and the fused CPU ops) → `sgemm`, `cuda`,
//! `cuda_flash`, `layout`; `cuda_flash` → `cuda`, `layout`; `cuda` → `layout`.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "flash-attn")]
mod cuda_flash;
mod layout;
mod ops;
pub mod profile;
pub mod sgemm;

pub use layout::{merged_dims, AttentionSpec, Part};
pub use ops::{layer_norm_in, linear_kn, to_dtype, CpuGemm, Kernels, Linear, GEMV_MAX_ROWS};
pub use sgemm::Isa;
