//! CUDA kernels for the layout copies and bias adds of every transformer layer.
//!
//! candle's generic strided kernels (`contiguous()` of a permuted view, `broadcast_add` of a
//! bias) compute each element's source offset with 64-bit division per dimension, and on an
//! H100 that integer work, not memory, bounds them. These walk the innermost dimension with a
//! warp's lanes and decompose the row index once per row in 32-bit arithmetic; the bias adds
//! run in place on the matmul output, with GELU (erf form) fused where it follows, and the
//! attention softmax takes its scale and runs in place in one kernel.
//! Compiled once per process with NVRTC for the device's compute capability.
//!
//! The linears of more than a few rows go through cuBLASLt (bias in its epilogue): candle's
//! `cublasGemmStridedBatchedEx` gets sm80-era kernels on an H100, about 3× slower than the sm90
//! kernels cuBLASLt picks for the same product (as PyTorch's `addmm` does).
// Kernel launches and uninitialized device buffers are unsafe by nature; each block says why it holds.
#![allow(unsafe_code)]

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys as lt_sys};
use candle_core::cuda_backend::cudarc::driver::{
    sys::CUdevice_attribute, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

const MODULE: &str = "blipdex_kernels";

const SRC: &str = r#"
typedef unsigned short u16;
typedef unsigned int u32;

struct F32 {
  typedef float T;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
struct F16 {
  typedef u16 T;
  static __device__ __forceinline__ float load(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
  }
  static __device__ __forceinline__ u16 store(float f) {
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
  }
};
struct BF16 {
  typedef u16 T;
  static __device__ __forceinline__ float load(u16 h) { return __uint_as_float(((u32)h) << 16); }
  // Round to nearest even, as torch and candle do; NaN stays NaN.
  static __device__ __forceinline__ u16 store(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

// x[r, c] = act(x[r, c] + b[c]) in place, rows x cols contiguous.
template <class D, bool GELU>
__device__ __forceinline__ void bias_act(typename D::T *x, const typename D::T *b, u32 rows, u32 cols) {
  for (u32 r = blockIdx.y; r < rows; r += gridDim.y) {
    typename D::T *row = x + (size_t)r * cols;
    for (u32 c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += blockDim.x * gridDim.x) {
      float v = D::load(row[c]) + D::load(b[c]);
      if (GELU) v = 0.5f * v * (1.0f + erff(v * 0.7071067811865475f));
      row[c] = D::store(v);
    }
  }
}

#define BIAS(NAME, D, GELU) \
  extern "C" __global__ void NAME(D::T *x, const D::T *b, u32 rows, u32 cols) { bias_act<D, GELU>(x, b, rows, cols); }
BIAS(bias_f32, F32, false)
BIAS(bias_gelu_f32, F32, true)
BIAS(bias_f16, F16, false)
BIAS(bias_gelu_f16, F16, true)
BIAS(bias_bf16, BF16, false)
BIAS(bias_gelu_bf16, BF16, true)

// x += y elementwise, in place (the residual adds).
template <class D>
__device__ __forceinline__ void add_in_place(typename D::T *x, const typename D::T *y, u32 n) {
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
    x[i] = D::store(D::load(x[i]) + D::load(y[i]));
}

#define ADD(NAME, D) \
  extern "C" __global__ void NAME(D::T *x, const D::T *y, u32 n) { add_in_place<D>(x, y, n); }
ADD(add_f32, F32)
ADD(add_f16, F16)
ADD(add_bf16, BF16)

// x[r, :] = softmax(x[r, :] * scale) in place, in f32 arithmetic (one rounding, as torch's
// half softmax): one warp per row.
template <class D>
__device__ __forceinline__ void softmax_rows(typename D::T *x, u32 rows, u32 cols, float scale) {
  for (u32 r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y) {
    typename D::T *row = x + (size_t)r * cols;
    float m = __int_as_float(0xff800000);
    for (u32 c = threadIdx.x; c < cols; c += 32) m = fmaxf(m, D::load(row[c]) * scale);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float s = 0.0f;
    for (u32 c = threadIdx.x; c < cols; c += 32) s += expf(D::load(row[c]) * scale - m);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float inv = 1.0f / s;
    for (u32 c = threadIdx.x; c < cols; c += 32) row[c] = D::store(expf(D::load(row[c]) * scale - m) * inv);
  }
}

#define SOFTMAX(NAME, D) \
  extern "C" __global__ void NAME(D::T *x, u32 rows, u32 cols, float scale) { softmax_rows<D>(x, rows, cols, scale); }
SOFTMAX(softmax_f32, F32)
SOFTMAX(softmax_f16, F16)
SOFTMAX(softmax_bf16, BF16)

// out (contiguous) = in viewed with dims/strides (elements, rank <= 6). One warp row per
// output row of the last dimension: the row's source offset is decomposed once per row.
struct View { u32 rank; u32 dims[6]; u32 strides[6]; };

template <class T>
__device__ __forceinline__ void copy_rows(const T *in, T *out, View v, u32 rows) {
  const u32 cols = v.dims[v.rank - 1], cs = v.strides[v.rank - 1];
  for (u32 r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y) {
    u32 rem = r, off = 0;
    for (int d = (int)v.rank - 2; d >= 0; d--) {
      off += (rem % v.dims[d]) * v.strides[d];
      rem /= v.dims[d];
    }
    const T *src = in + off;
    T *dst = out + (size_t)r * cols;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c * cs];
  }
}

extern "C" __global__ void copy_rows_u16(const u16 *in, u16 *out, View v, u32 rows) { copy_rows<u16>(in, out, v, rows); }
extern "C" __global__ void copy_rows_u32(const u32 *in, u32 *out, View v, u32 rows) { copy_rows<u32>(in, out, v, rows); }
"#;

/// Most blocks of a launch; the kernels loop over the rest. A block per row (hundreds of
/// thousands of tiny blocks) is bound by block scheduling, not memory: 4× slower on an H100.
const MAX_BLOCKS: usize = 2048;

/// PTX for the first device's compute capability (an error is kept: NVRTC is not retried).
static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    compiled(&PTX, dev, SRC, "blipdex's CUDA kernels", 0)
}

/// `src` compiled by NVRTC for the device's compute capability, once per process into `cell` (an
/// error is kept there too: NVRTC is not retried); refused below compute capability `min_major`.
pub(crate) fn compiled(
    cell: &'static OnceLock<std::result::Result<String, String>>,
    dev: &CudaDevice,
    src: &str,
    what: &str,
    min_major: i32,
) -> Result<&'static str> {
    let ptx = cell.get_or_init(|| {
        let ctx = dev.cuda_stream().context().clone();
        let cc = |a| ctx.attribute(a).map_err(|e| e.to_string());
        let major = cc(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = cc(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        if major < min_major {
            return Err(format!(
                "{what} need compute capability {min_major}.0 or newer (this GPU: {major}.{minor})"
            ));
        }
        let opts = CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            ..Default::default()
        };
        compile_ptx_with_opts(src, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile {what}: {e}"))
    });
    ptx.as_ref()
        .map(String::as_str)
        .map_err(|e| candle_core::Error::Cuda(e.clone().into()))
}

/// Kernels name their dtype; `None` for the ones they do not cover.
fn suffix(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// Whether [`bias_act`] takes `x` (`[.., n]`, contiguous, on CUDA) and `bias` (`[n]`).
pub fn bias_supported(
    x_dtype: DType,
    x_dims: &[usize],
    bias_dtype: DType,
    bias_dims: &[usize],
) -> bool {
    suffix(x_dtype).is_some()
        && bias_dtype == x_dtype
        && bias_dims.len() == 1
        && x_dims.last() == bias_dims.first()
        && x_dims.iter().product::<usize>() > 0
        && x_dims.iter().product::<usize>() < u32::MAX as usize
}

/// `x = act(x + bias)` in place (the `cuda_fwd` of kernels' BiasAdd / BiasGeluErf).
pub fn bias_act(
    x: &mut CudaStorage,
    xl: &Layout,
    b: &CudaStorage,
    bl: &Layout,
    gelu: bool,
) -> Result<()> {
    let (Some((lo, hi)), Some((blo, bhi))) = (xl.contiguous_offsets(), bl.contiguous_offsets())
    else {
        candle_core::bail!("bias add on CUDA needs contiguous tensors");
    };
    let cols = bhi - blo;
    if cols == 0 || (hi - lo) % cols != 0 {
        candle_core::bail!("bias of {cols} does not divide {} elements", hi - lo);
    }
    let rows = (hi - lo) / cols;
    let dev = x.device().clone();
    let sfx = suffix(x.dtype()).ok_or_else(|| {
        candle_core::Error::Msg(format!("bias add on CUDA: no {:?} kernel", x.dtype()))
    })?;
    let name = format!("bias{}_{sfx}", if gelu { "_gelu" } else { "" });
    let f = dev.get_or_load_custom_func(&name, MODULE, ptx(&dev)?)?;
    let cfg = LaunchConfig {
        grid_dim: (
            cols.div_ceil(256).min(8) as u32,
            rows.min(MAX_BLOCKS) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows, cols) = (rows as u32, cols as u32);
    macro_rules! launch {
        ($t:ty) => {{
            let bs = b.as_cuda_slice::<$t>()?.slice(blo..bhi);
            let xs = x.as_cuda_slice_mut::<$t>()?;
            let mut xs = xs.slice_mut(lo..hi);
            let mut builder = f.builder();
            builder.arg(&mut xs).arg(&bs).arg(&rows).arg(&cols);
            // SAFETY: the kernel touches rows·cols elements of x and cols of b, both checked above.
            unsafe { builder.launch(cfg) }.w()?;
        }};
    }
    match x.dtype() {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(f16),
        _ => launch!(bf16),
    }
    Ok(())
}

/// Whether [`add`] takes `x` and `y`: same dtype and shape, both contiguous.
pub fn add_supported(x: &Tensor, y: &Tensor) -> bool {
    suffix(x.dtype()).is_some()
        && x.dtype() == y.dtype()
        && x.dims() == y.dims()
        && x.is_contiguous()
        && y.is_contiguous()
        && x.elem_count() > 0
        && x.elem_count() < u32::MAX as usize
}

/// `x += y` in place (kernels' AddInPlace).
pub fn add(x: &mut CudaStorage, xl: &Layout, y: &CudaStorage, yl: &Layout) -> Result<()> {
    let (Some((lo, hi)), Some((ylo, yhi))) = (xl.contiguous_offsets(), yl.contiguous_offsets())
    else {
        candle_core::bail!("add on CUDA needs contiguous tensors");
    };
    if hi - lo != yhi - ylo {
        candle_core::bail!("add on CUDA: {:?} vs {:?}", xl.dims(), yl.dims());
    }
    let n = hi - lo;
    let dev = x.device().clone();
    let sfx = suffix(x.dtype()).ok_or_else(|| {
        candle_core::Error::Msg(format!("add on CUDA: no {:?} kernel", x.dtype()))
    })?;
    let f = dev.get_or_load_custom_func(&format!("add_{sfx}"), MODULE, ptx(&dev)?)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).min(MAX_BLOCKS * 4) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n32 = n as u32;
    macro_rules! launch {
        ($t:ty) => {{
            let ys = y.as_cuda_slice::<$t>()?.slice(ylo..yhi);
            let xs = x.as_cuda_slice_mut::<$t>()?;
            let mut xs = xs.slice_mut(lo..hi);
            let mut builder = f.builder();
            builder.arg(&mut xs).arg(&ys).arg(&n32);
            // SAFETY: n elements of each, checked above.
            unsafe { builder.launch(cfg) }.w()?;
        }};
    }
    match x.dtype() {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(f16),
        _ => launch!(bf16),
    }
    Ok(())
}

/// Whether [`softmax`] takes a tensor of this dtype and shape (contiguous, on CUDA).
pub fn softmax_supported(dtype: DType, dims: &[usize]) -> bool {
    let n: usize = dims.iter().product();
    suffix(dtype).is_some() && n > 0 && n < u32::MAX as usize
}

/// `x = softmax(x * scale)` over the last dimension, in place (kernels' ScaledSoftmax).
pub fn softmax(x: &mut CudaStorage, l: &Layout, scale: f32) -> Result<()> {
    let Some((lo, hi)) = l.contiguous_offsets() else {
        candle_core::bail!("softmax on CUDA needs a contiguous tensor");
    };
    let cols = l.dims().last().copied().unwrap_or(1).max(1);
    let rows = (hi - lo) / cols;
    let dev = x.device().clone();
    let sfx = suffix(x.dtype()).ok_or_else(|| {
        candle_core::Error::Msg(format!("softmax on CUDA: no {:?} kernel", x.dtype()))
    })?;
    let f = dev.get_or_load_custom_func(&format!("softmax_{sfx}"), MODULE, ptx(&dev)?)?;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(8).min(MAX_BLOCKS) as u32, 1, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let (rows, cols) = (rows as u32, cols as u32);
    macro_rules! launch {
        ($t:ty) => {{
            let xs = x.as_cuda_slice_mut::<$t>()?;
            let mut xs = xs.slice_mut(lo..hi);
            let mut builder = f.builder();
            builder.arg(&mut xs).arg(&rows).arg(&cols).arg(&scale);
            // SAFETY: the kernel touches the rows·cols elements of x's contiguous range.
            unsafe { builder.launch(cfg) }.w()?;
        }};
    }
    match x.dtype() {
        DType::F32 => launch!(f32),
        DType::F16 => launch!(f16),
        _ => launch!(bf16),
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy)]
struct View {
    rank: u32,
    dims: [u32; 6],
    strides: [u32; 6],
}

// SAFETY: plain old data, laid out as the kernel's `View`.
unsafe impl DeviceRepr for View {}

/// The view of `l` the copy kernel takes: rank 1..=6 after merging dimensions that are already
/// contiguous with each other, every offset within u32. `None` when it does not fit.
fn view_of(l: &Layout) -> Option<View> {
    let dims = crate::layout::merged_dims(l.dims(), l.stride());
    let span: usize = dims.iter().map(|(d, s)| (d - 1) * s).sum::<usize>() + l.start_offset();
    if dims.len() > 6 || span >= u32::MAX as usize || l.shape().elem_count() >= u32::MAX as usize {
        return None;
    }
    let mut v = View {
        rank: dims.len() as u32,
        dims: [1; 6],
        strides: [0; 6],
    };
    for (i, (d, s)) in dims.into_iter().enumerate() {
        v.dims[i] = d as u32;
        v.strides[i] = s as u32;
    }
    Some(v)
}

/// Whether [`Contiguous`] takes a tensor of this dtype and layout.
pub fn contiguous_supported(dtype: DType, l: &Layout) -> bool {
    suffix(dtype).is_some() && l.shape().elem_count() > 0 && view_of(l).is_some()
}

/// `x.contiguous()` through the row copy kernel.
pub struct Contiguous;

impl candle_core::CustomOp1 for Contiguous {
    fn name(&self) -> &'static str {
        "blipdex-contiguous"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("blipdex-contiguous is a CUDA kernel")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let v = view_of(l).ok_or_else(|| {
            candle_core::Error::Msg(format!("blipdex-contiguous: {l:?} does not fit u32"))
        })?;
        let n = l.shape().elem_count();
        let cols = v.dims[v.rank as usize - 1] as usize;
        let rows = (n / cols) as u32;
        let dev = s.device().clone();
        let cfg = LaunchConfig {
            grid_dim: ((rows as usize).div_ceil(8).min(MAX_BLOCKS) as u32, 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        fn run<T: CudaDType + DeviceRepr>(
            s: &CudaStorage,
            l: &Layout,
            dev: &CudaDevice,
            name: &str,
            v: View,
            rows: u32,
            cfg: LaunchConfig,
        ) -> Result<CudaStorage> {
            let f = dev.get_or_load_custom_func(name, MODULE, ptx(dev)?)?;
            let src = s.as_cuda_slice::<T>()?.slice(l.start_offset()..);
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<T>(l.shape().elem_count())? };
            let mut builder = f.builder();
            builder.arg(&src).arg(&out).arg(&v).arg(&rows);
            // SAFETY: reads stay within the view's span (checked in view_of), writes within out.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        let out = match s.dtype() {
            DType::F32 => run::<f32>(s, l, &dev, "copy_rows_u32", v, rows, cfg)?,
            DType::F16 => run::<f16>(s, l, &dev, "copy_rows_u16", v, rows, cfg)?,
            DType::BF16 => run::<bf16>(s, l, &dev, "copy_rows_u16", v, rows, cfg)?,
            d => candle_core::bail!("blipdex-contiguous: no {d:?} kernel"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// Whether blipdex's CUDA kernels can run on `x`: it is on CUDA and the NVRTC kernels compiled
/// (where NVRTC is missing or fails, candle's own kernels run instead, slower, same results,
/// and a warning says why, once). Whether they are wanted is the caller's `Kernels::cuda`.
pub fn kernels_enabled(x: &Tensor) -> bool {
    let candle_core::Device::Cuda(dev) = x.device() else {
        return false;
    };
    match ptx(dev) {
        Ok(_) => true,
        Err(e) => {
            static WARNED: OnceLock<()> = OnceLock::new();
            WARNED.get_or_init(|| tracing::warn!("{e}; using candle's CUDA kernels instead"));
            false
        }
    }
}

/// Fewest rows for cuBLASLt: its per-call heuristic query costs more than it saves on the
/// few-row products of token-by-token decoding.
const LT_MIN_ROWS: usize = 16;

/// A cuBLASLt handle, its workspace and the algorithm chosen for each product shape (the
/// heuristic query costs more than a small product).
struct Lt {
    handle: lt_sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algos: Mutex<std::collections::HashMap<LtKey, lt_sys::cublasLtMatmulAlgo_t>>,
}

/// (dtype, m, n, k, with bias)
type LtKey = (u32, u64, u64, u64, bool);

// SAFETY: the handle is used only on the device's one stream; cuBLASLt handles are thread safe.
unsafe impl Send for Lt {}
// SAFETY: as above.
unsafe impl Sync for Lt {}

/// cuBLASLt's recommended workspace on Hopper (4 MiB before it suffices, but one size is simpler).
const LT_WORKSPACE: usize = 32 << 20;

type LtHandle = (DeviceId, Arc<Lt>);

/// One cuBLASLt handle per device, made on first use and kept for the process.
fn blas_lt(dev: &CudaDevice) -> Result<Arc<Lt>> {
    static HANDLES: OnceLock<Mutex<Vec<LtHandle>>> = OnceLock::new();
    let mut hs = HANDLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((_, h)) = hs.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(h.clone());
    }
    let handle = lt::create_handle().map_err(cublas_err)?;
    // SAFETY: scratch space, never read before cuBLASLt writes it.
    let workspace = unsafe { dev.alloc::<u8>(LT_WORKSPACE)? };
    let h = Arc::new(Lt {
        handle,
        workspace,
        algos: Mutex::default(),
    });
    hs.push((dev.id(), h.clone()));
    Ok(h)
}

fn cublas_err(e: lt::CublasError) -> candle_core::Error {
    candle_core::Error::Cuda(format!("cuBLASLt: {e:?}").into())
}

/// Descriptors of one product, destroyed on drop (also on the error paths).
struct LtDescs {
    layouts: [lt_sys::cublasLtMatrixLayout_t; 3],
    desc: lt_sys::cublasLtMatmulDesc_t,
}

impl Drop for LtDescs {
    fn drop(&mut self) {
        // SAFETY: created below and used only while self lives.
        unsafe {
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// `D [m, n] = op(A)·B (+ bias [m])`, column-major: A stored `[k, m]` (transposed), B `[k, n]`.
/// Accumulates in f32 (IEEE, no TF32), as torch's default `addmm` does.
///
/// # Safety
/// The pointers must hold the matrices described, on the stream of `dev`.
#[allow(clippy::too_many_arguments)]
unsafe fn lt_matmul(
    lt_h: &Lt,
    dev: &CudaDevice,
    dtype: lt_sys::cudaDataType_t,
    (m, n, k): (u64, u64, u64),
    a: u64,
    b: u64,
    d: u64,
    bias: Option<u64>,
) -> Result<()> {
    use lt_sys::cublasLtMatmulDescAttributes_t as A;
    let layouts = [
        lt::create_matrix_layout(dtype, k, m, k as i64).map_err(cublas_err)?,
        lt::create_matrix_layout(dtype, k, n, k as i64).map_err(cublas_err)?,
        lt::create_matrix_layout(dtype, m, n, m as i64).map_err(cublas_err)?,
    ];
    let desc = lt::create_matmul_desc(
        lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        lt_sys::cudaDataType_t::CUDA_R_32F,
    );
    let descs = LtDescs {
        layouts,
        desc: desc.map_err(cublas_err)?,
    };
    let set = |attr: A, v: *const std::ffi::c_void, size: usize| {
        lt::set_matmul_desc_attribute(descs.desc, attr, v, size).map_err(cublas_err)
    };
    let (ta, tb) = (1i32, 0i32);
    set(
        A::CUBLASLT_MATMUL_DESC_TRANSA,
        (&ta as *const i32).cast(),
        4,
    )?;
    set(
        A::CUBLASLT_MATMUL_DESC_TRANSB,
        (&tb as *const i32).cast(),
        4,
    )?;
    if let Some(ptr) = &bias {
        let epi = lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
        set(
            A::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&epi as *const lt_sys::cublasLtEpilogue_t).cast(),
            std::mem::size_of::<lt_sys::cublasLtEpilogue_t>(),
        )?;
        set(
            A::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            (ptr as *const u64).cast(),
            std::mem::size_of::<u64>(),
        )?;
    }
    let key = (dtype as u32, m, n, k, bias.is_some());
    let cached = lt_h
        .algos
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .copied();
    let algo = match cached {
        Some(a) => a,
        None => {
            let pref = lt::create_matmul_pref().map_err(cublas_err)?;
            let size = LT_WORKSPACE;
            let found = lt::set_matmul_pref_attribute(
                pref,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&size as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
            .and_then(|()| {
                lt::get_matmul_algo_heuristic(
                    lt_h.handle,
                    descs.desc,
                    layouts[0],
                    layouts[1],
                    layouts[2],
                    layouts[2],
                    pref,
                )
            });
            let _ = lt::destroy_matmul_pref(pref);
            let algo = found.map_err(cublas_err)?.algo;
            lt_h.algos
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, algo);
            algo
        }
    };
    let stream = dev.cuda_stream();
    let (ws, _guard) = lt_h.workspace.device_ptr(&stream);
    let (alpha, beta) = (1f32, 0f32);
    lt::matmul(
        lt_h.handle,
        descs.desc,
        (&alpha as *const f32).cast(),
        (&beta as *const f32).cast(),
        a as *const _,
        layouts[0],
        b as *const _,
        layouts[1],
        d as *const _,
        layouts[2],
        d as *mut _,
        layouts[2],
        &algo,
        ws as *mut _,
        LT_WORKSPACE,
        stream.cu_stream() as *mut _,
    )
    .map_err(cublas_err)
}

/// `x·Wᵀ (+ bias)` through cuBLASLt when it applies (CUDA, f32/f16/bf16, at least LT_MIN_ROWS rows,
/// dimensions multiples of 8 as its tensor-core kernels want); `None` otherwise.
pub fn lt_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let Ok((n, k)) = w.dims2() else {
        return Ok(None);
    };
    let dtype = x.dtype();
    let rows = x.elem_count() / k.max(1);
    let fits = x.device().is_cuda()
        && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        && w.dtype() == dtype
        && w.is_contiguous()
        && x.dims().last() == Some(&k)
        && rows >= LT_MIN_ROWS
        && k % 8 == 0
        && n % 8 == 0
        && bias.is_none_or(|b| b.dtype() == dtype && b.dims() == [n] && b.is_contiguous());
    if !fits {
        return Ok(None);
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    let x2 = x.contiguous()?.reshape((rows, k))?;
    let y = match bias {
        Some(b) => x2.apply_op3_no_bwd(w, b, &LtLinear)?,
        None => x2.apply_op2_no_bwd(w, &LtLinear)?,
    };
    Ok(Some(y.reshape(dims)?))
}

/// `x [rows, k] · W [n, k]ᵀ (+ b [n])` in one cuBLASLt call.
struct LtLinear;

impl LtLinear {
    fn run(
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, k) = xl.shape().dims2()?;
        let (n, wk) = wl.shape().dims2()?;
        let offsets = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("cuBLASLt linear: non-contiguous input".into())
            })
        };
        let ((xlo, xhi), (wlo, whi)) = (offsets(xl)?, offsets(wl)?);
        let blo = bias.map(|(_, bl)| offsets(bl)).transpose()?;
        if wk != k || blo.is_some_and(|(lo, hi)| hi - lo != n) {
            candle_core::bail!("cuBLASLt linear: x {:?}, w {:?}", xl.dims(), wl.dims());
        }
        let dev = xs.device().clone();
        let lt_h = blas_lt(&dev)?;
        let stream = dev.cuda_stream();
        macro_rules! run {
            ($t:ty, $cuda:ident) => {{
                let x = xs.as_cuda_slice::<$t>()?.slice(xlo..xhi);
                let w = ws.as_cuda_slice::<$t>()?.slice(wlo..whi);
                let b = match (bias, blo) {
                    (Some((bs, _)), Some((lo, hi))) => {
                        Some(bs.as_cuda_slice::<$t>()?.slice(lo..hi))
                    }
                    _ => None,
                };
                // SAFETY: cuBLASLt writes all rows·n outputs.
                let mut out = unsafe { dev.alloc::<$t>(rows * n)? };
                {
                    let (xp, _gx) = x.device_ptr(&stream);
                    let (wp, _gw) = w.device_ptr(&stream);
                    let bp = b.as_ref().map(|b| b.device_ptr(&stream));
                    let (op, _go) = out.device_ptr_mut(&stream);
                    // Column-major: yᵀ [n, rows] = W [n, k] · xᵀ [k, rows]; the bias runs along n.
                    // SAFETY: shapes and contiguous ranges checked above; all on candle's stream.
                    unsafe {
                        lt_matmul(
                            &lt_h,
                            &dev,
                            lt_sys::cudaDataType_t::$cuda,
                            (n as u64, rows as u64, k as u64),
                            wp,
                            xp,
                            op,
                            bp.as_ref().map(|(p, _)| *p),
                        )?
                    };
                }
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match xs.dtype() {
            DType::F32 => run!(f32, CUDA_R_32F),
            DType::F16 => run!(f16, CUDA_R_16F),
            DType::BF16 => run!(bf16, CUDA_R_16BF),
            d => candle_core::bail!("cuBLASLt linear: no {d:?} path"),
        };
        Ok((out, Shape::from((rows, n))))
    }
}

impl candle_core::CustomOp2 for LtLinear {
    fn name(&self) -> &'static str {
        "blipdex-lt-linear"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("blipdex-lt-linear is a CUDA op")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::run(xs, xl, ws, wl, None)
    }
}

impl candle_core::CustomOp3 for LtLinear {
    fn name(&self) -> &'static str {
        "blipdex-lt-linear"
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
        candle_core::bail!("blipdex-lt-linear is a CUDA op")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::run(xs, xl, ws, wl, Some((bs, bl)))
    }
}
