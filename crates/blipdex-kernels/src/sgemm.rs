//! f32 GEMM for x86-64 CPUs with AVX-512F or AVX2 + FMA + F16C (the default build's linears).
//!
//! The BLIS/Goto scheme, faster than gemm (candle's CPU matmul) on the ViT's products and on
//! few-row products (figures in docs/benchmarks.md), with the roles laid out for row-major
//! outputs: the output's columns are the vector dimension, its rows the broadcast dimension,
//! the whole micro-tile's accumulators in registers. Per instruction set ([`Isa`]):
//! - AVX-512F: MR = 14 rows × NR = 32 columns (two zmm), 28 of the 32 zmm registers.
//! - AVX2 + FMA: MR = 6 rows × NR = 16 columns (two ymm), 12 of the 16 ymm registers (the
//!   other 4: two B rows, one broadcast of A, one spare). On L1 panels it runs at 99% of the
//!   register-only FMA peak, as AVX-512F's 14 × 32 does; 4 × 24 measured the same, 5 × 16 96%,
//!   3 × 32 (spilling) half. 6 rows pad A less.
//!
//! - A (activations) is packed once, whole, into MR-row panels per KC slice of K (384 for
//!   AVX-512F, 768 for AVX2); a micro-panel (MR × KC) stays in L1 while the kernel walks a
//!   block of B.
//! - B (weights) is packed once (at load) into NR-column panels for one [`Isa`]; a thread walks
//!   a KC × NB block of them (≤ 576 KiB for AVX-512F, ≤ 192 KiB for AVX2: the L2 of Zen 2/3
//!   is 512 KiB, of Intel's AVX2 clients 256 KiB) from its core's L2.
//! - The two cores take whole column blocks of the output: no shared writes, one barrier.
//! - The first K slice writes the output (with the bias), later ones accumulate: the output is
//!   never zero-filled.
//!
//! Other CPUs (neither) keep candle's matmul.

// The micro-kernel is SIMD intrinsics on raw pointers into packed buffers, and the column
// blocks of one output are written from several threads; each unsafe block says why it holds.
#![allow(unsafe_code)]

use rayon::prelude::*;

/// Rows of an AVX-512F micro-tile (broadcast from A); see [`Isa::mr`].
pub const MR: usize = Isa::Avx512.mr();
/// Columns of an AVX-512F micro-tile (two 16-lane vectors of B); see [`Isa::nr`].
pub const NR: usize = Isa::Avx512.nr();
/// Output floats per row block (4 MiB).
#[cfg(target_arch = "x86_64")]
const C_BLOCK_FLOATS: usize = 1 << 20;

/// The instruction set a product runs on. A [`PackedB`] is laid out for one (its panels' width
/// differs) and every product on it uses that one. [`Isa::detect`] picks the best this CPU has;
/// a caller may choose a lower one that is [`Isa::available`] (to compare, or to measure).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F: 14 × 32 tiles in zmm registers.
    Avx512,
    /// AVX2 + FMA + F16C (Haswell and later, AMD Zen): 6 × 16 tiles in ymm registers.
    Avx2,
}

impl Isa {
    /// Every instruction set, best first.
    pub const ALL: [Isa; 2] = [Isa::Avx512, Isa::Avx2];

    /// The best instruction set this CPU runs, `None` where it runs none (candle's matmul then).
    pub fn detect() -> Option<Isa> {
        Self::ALL.into_iter().find(|isa| isa.available())
    }

    /// Whether this CPU runs this instruction set's kernels.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512 => has!("avx512f"),
                Isa::Avx2 => has!("avx2") && has!("fma") && has!("f16c"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// Its name, as [`std::str::FromStr`] reads it: `avx512` or `avx2`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
        }
    }

    /// Rows of a micro-tile (A's panels).
    pub const fn mr(self) -> usize {
        match self {
            Isa::Avx512 => 14,
            Isa::Avx2 => 6,
        }
    }

    /// Columns of a micro-tile (B's panels).
    pub const fn nr(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 => 16,
        }
    }

    /// K slice: one A micro-panel stays in L1 (32 KiB) beside the B stream: 14 × 384 f32 =
    /// 21 KiB (AVX-512F), 6 × 768 f32 = 18 KiB (AVX2). A 6 × 16 tile does 2.3× less work per
    /// call than a 14 × 32 one, so its prologue and epilogue (the C tile's loads and stores)
    /// weigh more: 768 (one slice for K = 768) measured 3–8% faster than 384 on Zen 4, on par
    /// with AVX-512F's path there.
    #[cfg(target_arch = "x86_64")]
    const fn kc(self) -> usize {
        match self {
            Isa::Avx512 => 384,
            Isa::Avx2 => 768,
        }
    }

    /// Widest column block of B a thread walks: KC × NB f32 in L2 (576 KiB of 1 MiB for
    /// AVX-512F; 192 KiB for AVX2, whose CPUs include Zen 2/3 with 512 KiB of L2 and Intel
    /// clients with 256 KiB; 96 and 128 measured the same).
    #[cfg(target_arch = "x86_64")]
    const fn nb_max(self) -> usize {
        match self {
            Isa::Avx512 => 384,
            Isa::Avx2 => 64,
        }
    }

    /// Rows of A one pass of the GEMV takes against a panel (its accumulators in registers).
    #[cfg(target_arch = "x86_64")]
    const fn gemv_rows(self) -> usize {
        match self {
            Isa::Avx512 => 8,
            Isa::Avx2 => 6,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = String;

    /// `avx512` (or `avx512f`), `avx2`; any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "avx512" | "avx512f" | "avx-512" => Ok(Isa::Avx512),
            "avx2" => Ok(Isa::Avx2),
            _ => Err(format!("unknown instruction set {s:?} (avx512, avx2)")),
        }
    }
}

/// A strided matrix view (f32 unless said otherwise): element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T = f32> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    pub fn new(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A contiguous row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// Whether this CPU runs [`matmul_packed`] and [`gemv_packed`] (on some [`Isa`]).
pub fn available() -> bool {
    Isa::detect().is_some()
}

/// B of a product, packed once (a linear's weight, at load) for one [`Isa`]: `n.div_ceil(nr)`
/// panels of `k × nr` (nr = [`Isa::nr`] consecutive columns of B per row of the panel, zero
/// past `n`), so that any K slice of a panel is one contiguous run for the kernel.
#[derive(Debug)]
pub struct PackedB {
    data: Panels,
    k: usize,
    n: usize,
    isa: Isa,
}

/// The panels' element type. bf16 and f16 (weights loaded with `--dtype bf16|f16`) halve the
/// bytes the kernels stream; they are widened to f32 in registers (exactly), so the products
/// still accumulate in f32. A bf16 panel row interleaves its two nr/2-column halves (`[c0, c16,
/// c1, c17, …]` for nr = 32): one nr-element load then gives both halves as f32 with one shift
/// (the low halves of its 32-bit lanes) and one mask (the high halves). f16 rows are in order
/// (`vcvtph2ps` widens a vector at a time).
#[derive(Debug)]
enum Panels {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
}

impl PackedB {
    /// Packs over rayon (weights at load), for [`Isa::detect`]; `None` when the CPU runs no
    /// [`Isa`] or `b` is out of bounds.
    pub fn pack(b: MatRef<'_>) -> Option<Self> {
        Self::pack_for(Isa::detect()?, b)
    }

    /// Packs on the calling thread (inside a task that is already one of several), for
    /// [`Isa::detect`].
    pub fn pack_serial(b: MatRef<'_>) -> Option<Self> {
        Self::pack_serial_for(Isa::detect()?, b)
    }

    /// Packs a bf16 B (as its raw bits) over rayon, keeping it bf16, for [`Isa::detect`].
    pub fn pack_bf16(b: MatRef<'_, u16>) -> Option<Self> {
        Self::pack_bf16_for(Isa::detect()?, b)
    }

    /// Packs an f16 B (as its raw bits) over rayon, keeping it f16, for [`Isa::detect`].
    pub fn pack_f16(b: MatRef<'_, u16>) -> Option<Self> {
        Self::pack_f16_for(Isa::detect()?, b)
    }

    /// [`PackedB::pack`] for `isa`; `None` where the CPU lacks it.
    pub fn pack_for(isa: Isa, b: MatRef<'_>) -> Option<Self> {
        Self::pack_with(isa, b, true)
    }

    /// [`PackedB::pack_serial`] for `isa`; `None` where the CPU lacks it.
    pub fn pack_serial_for(isa: Isa, b: MatRef<'_>) -> Option<Self> {
        Self::pack_with(isa, b, false)
    }

    /// [`PackedB::pack_bf16`] for `isa`; `None` where the CPU lacks it.
    pub fn pack_bf16_for(isa: Isa, b: MatRef<'_, u16>) -> Option<Self> {
        let panels = pack_panels(b, isa, true, true)?;
        Some(Self::of(Panels::Bf16(panels), b, isa))
    }

    /// [`PackedB::pack_f16`] for `isa`; `None` where the CPU lacks it.
    pub fn pack_f16_for(isa: Isa, b: MatRef<'_, u16>) -> Option<Self> {
        let panels = pack_panels(b, isa, true, false)?;
        Some(Self::of(Panels::F16(panels), b, isa))
    }

    fn pack_with(isa: Isa, b: MatRef<'_>, parallel: bool) -> Option<Self> {
        let panels = pack_panels(b, isa, parallel, false)?;
        Some(Self::of(Panels::F32(panels), b, isa))
    }

    /// `data`, the panels of `b` for `isa`.
    fn of<T>(data: Panels, b: MatRef<'_, T>, isa: Isa) -> Self {
        Self {
            data,
            k: b.rows,
            n: b.cols,
            isa,
        }
    }

    /// Rows of B (the product's inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of B (the product's output width).
    pub fn n(&self) -> usize {
        self.n
    }

    /// The instruction set it was packed for, which every product on it uses.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The panels' element type.
    pub fn dtype(&self) -> candle_core::DType {
        match self.data {
            Panels::F32(_) => candle_core::DType::F32,
            Panels::Bf16(_) => candle_core::DType::BF16,
            Panels::F16(_) => candle_core::DType::F16,
        }
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        match &self.data {
            Panels::F32(v) => std::mem::size_of_val(v.as_slice()),
            Panels::Bf16(v) | Panels::F16(v) => std::mem::size_of_val(v.as_slice()),
        }
    }

    /// Rows `p0..p0 + kc` of panel `q`, as the bytes the kernels read.
    #[cfg(target_arch = "x86_64")]
    fn panel_bytes(&self, q: usize, p0: usize, kc: usize) -> &[u8] {
        let nr = self.isa.nr();
        let (start, len) = (q * self.k * nr + p0 * nr, kc * nr);
        match &self.data {
            Panels::F32(v) => bytemuck::cast_slice(&v[start..start + len]),
            Panels::Bf16(v) | Panels::F16(v) => bytemuck::cast_slice(&v[start..start + len]),
        }
    }
}

/// B's panels for `isa`: row `kk` of panel `q` holds columns `q·nr..` of B's row `kk`
/// (interleaved as [`Panels::Bf16`] says when `interleave`); zero past `n`. `None` where the
/// CPU lacks `isa` or `b` is out of bounds.
fn pack_panels<T: Copy + Default + Send + Sync>(
    b: MatRef<'_, T>,
    isa: Isa,
    parallel: bool,
    interleave: bool,
) -> Option<Vec<T>> {
    let (k, n, nr) = (b.rows, b.cols, isa.nr());
    if !isa.available() || !b.in_bounds() {
        return None;
    }
    let half = nr / 2;
    let mut data = Vec::with_capacity(n.div_ceil(nr) * nr * k);
    hugepage_hint(&mut data);
    data.resize(n.div_ceil(nr) * nr * k, T::default());
    let pack_panel = |(q, panel): (usize, &mut [T])| {
        let c0 = q * nr;
        let w = nr.min(n - c0);
        for (kk, row) in panel.chunks_exact_mut(nr).enumerate() {
            let base = kk * b.rs + c0 * b.cs;
            if interleave {
                for j in 0..w {
                    let slot = if j < half { 2 * j } else { 2 * (j - half) + 1 };
                    row[slot] = b.data[base + j * b.cs];
                }
            } else if b.cs == 1 {
                row[..w].copy_from_slice(&b.data[base..base + w]);
            } else {
                for (j, v) in row[..w].iter_mut().enumerate() {
                    *v = b.data[base + j * b.cs];
                }
            }
        }
    };
    if k > 0 && parallel {
        data.par_chunks_mut(k * nr).enumerate().for_each(pack_panel);
    } else if k > 0 {
        data.chunks_mut(k * nr).enumerate().for_each(pack_panel);
    }
    Some(data)
}

/// `a · b (+ bias)`, row-major `[a.rows, b.cols]`, B packed on the way for `isa` (the tests'
/// entry: the model's weights are packed at load). `None` when the CPU lacks `isa` or the
/// shapes disagree.
#[cfg(test)]
fn matmul(isa: Isa, a: MatRef<'_>, b: MatRef<'_>, bias: Option<&[f32]>) -> Option<Vec<f32>> {
    if b.rows != a.cols {
        return None;
    }
    matmul_packed(a, &PackedB::pack_for(isa, b)?, bias)
}

/// `a · B (+ bias)` for a B packed beforehand, on B's [`Isa`].
pub fn matmul_packed(a: MatRef<'_>, b: &PackedB, bias: Option<&[f32]>) -> Option<Vec<f32>> {
    let (m, k, n) = (a.rows, a.cols, b.n);
    if !b.isa.available() || b.k != k || !a.in_bounds() || bias.is_some_and(|b| b.len() != n) {
        return None;
    }
    if m == 0 || n == 0 || k == 0 {
        let mut out = vec![0f32; m * n];
        if let Some(bias) = bias {
            out.chunks_exact_mut(n.max(1))
                .for_each(|row| row.copy_from_slice(bias));
        }
        return Some(out);
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(match b.data {
            Panels::F32(_) => x86::matmul::<{ x86::F32 }>(a, b, bias),
            Panels::Bf16(_) => x86::matmul::<{ x86::BF16 }>(a, b, bias),
            Panels::F16(_) => x86::matmul::<{ x86::F16 }>(a, b, bias),
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// `a · B (+ bias)` for a few rows of `a` (decoding: one row per sequence), on B's [`Isa`], B
/// streamed once per [`Isa::gemv_rows`] rows straight from its packed panels, the panels split
/// over rayon. Memory bound: no A packing, no zero-padded rows. `None` when the CPU lacks the
/// instruction set or the shapes disagree.
pub fn gemv_packed(a: MatRef<'_>, b: &PackedB, bias: Option<&[f32]>) -> Option<Vec<f32>> {
    let (m, k, n) = (a.rows, a.cols, b.n);
    if !b.isa.available() || b.k != k || !a.in_bounds() || bias.is_some_and(|b| b.len() != n) {
        return None;
    }
    let nr = b.isa.nr();
    // A's rows contiguous (a few KiB): the kernel reads them k after k.
    let mut x = Vec::with_capacity(m * k);
    for i in 0..m {
        x.extend((0..k).map(|p| a.data[i * a.rs + p * a.cs]));
    }
    let panels = n.div_ceil(nr);
    // Panel-major output ([panel][row][nr]), each task writing its own panels; then row-major.
    let mut tiles = vec![0f32; panels * m * nr];
    if m > 0 && k > 0 {
        #[cfg(target_arch = "x86_64")]
        tiles
            .par_chunks_mut(m * nr)
            .enumerate()
            // The same bytes of B per task on either instruction set.
            .with_min_len(GEMV_PANELS_PER_TASK * NR / nr)
            .for_each(|(q, tile)| {
                let panel = b.panel_bytes(q, 0, k);
                match b.data {
                    Panels::F32(_) => x86::gemv_panel::<{ x86::F32 }>(b.isa, &x, k, panel, tile),
                    Panels::Bf16(_) => x86::gemv_panel::<{ x86::BF16 }>(b.isa, &x, k, panel, tile),
                    Panels::F16(_) => x86::gemv_panel::<{ x86::F16 }>(b.isa, &x, k, panel, tile),
                }
            });
    }
    let mut out = vec![0f32; m * n];
    for (q, tile) in tiles.chunks_exact(m.max(1) * nr).enumerate() {
        let c0 = q * nr;
        let w = nr.min(n - c0);
        for (row, t) in out.chunks_exact_mut(n).zip(tile.chunks_exact(nr)) {
            let dst = &mut row[c0..c0 + w];
            dst.copy_from_slice(&t[..w]);
            if let Some(bias) = bias {
                dst.iter_mut().zip(&bias[c0..]).for_each(|(d, b)| *d += b);
            }
        }
    }
    Some(out)
}

/// AVX-512F panels (k × 32 floats each) per rayon task of [`gemv_packed`]: 768 × 32 f32 is
/// 96 KiB, a few microseconds of DRAM traffic, so several per task keep the split's overhead
/// small (AVX2 panels are half as wide: twice as many per task).
const GEMV_PANELS_PER_TASK: usize = 4;

/// `c = a · B` on the calling thread, on B's [`Isa`], into the `a.rows × B.n` block at the start
/// of `c` with row stride `ldc` (for callers that already run one task per core). False when
/// the CPU lacks the instruction set or the shapes disagree.
pub fn matmul_serial(a: MatRef<'_>, b: &PackedB, c: &mut [f32], ldc: usize) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.n);
    let fits = m == 0 || n == 0 || ((m - 1) * ldc + n <= c.len() && ldc >= n);
    if !b.isa.available() || b.k != k || !a.in_bounds() || !fits {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            row[..n].fill(0.0);
        }
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    {
        match b.data {
            Panels::F32(_) => x86::matmul_serial::<{ x86::F32 }>(a, b, c, ldc),
            Panels::Bf16(_) => x86::matmul_serial::<{ x86::BF16 }>(a, b, c, ldc),
            Panels::F16(_) => x86::matmul_serial::<{ x86::F16 }>(a, b, c, ldc),
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f16 bits → f32, a vector at a time with `vcvtph2ps` on [`Isa::detect`] (`half`'s slice
/// conversion calls a function per 8 values: 2.3× slower on a streamed lm_head). Exact, so the
/// same on every instruction set.
pub fn widen_f16(src: &[u16], dst: &mut [f32]) {
    widen_f16_for(Isa::detect(), src, dst);
}

/// [`widen_f16`] on `isa` (scalar where `None` or not available).
pub fn widen_f16_for(isa: Option<Isa>, src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen_f16: lengths");
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = isa.filter(|isa| isa.available()) {
        // SAFETY: the instruction set was detected; the lengths are equal (asserted).
        unsafe { x86::widen_f16(isa, src, dst) };
        return;
    }
    let _ = isa;
    for (d, s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(*s).to_f32();
    }
}

/// Asks for transparent huge pages under a large buffer before it is first written: an output
/// tile touches 14 rows, up to 14 pages; with 4 KiB pages the TLB misses cost ~15% on 2056 ×
/// 3072 outputs (measured; the kernel's default THP mode is `madvise`).
pub(crate) fn hugepage_hint<T>(out: &mut Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = out.as_mut_ptr() as usize;
        let end = start + out.capacity() * std::mem::size_of::<T>();
        let (lo, hi) = (start.div_ceil(HUGE) * HUGE, end / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside the vector's allocation, which this thread owns;
            // MADV_HUGEPAGE changes only how the kernel backs it, never its contents. A
            // failure (THP disabled) leaves 4 KiB pages, which is fine.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
}

/// `vec![0.0; len]` on transparent huge pages where the allocation spans them.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    hugepage_hint(&mut v);
    v.resize(len, 0.0);
    v
}

/// Column blocks of width a multiple of `isa`'s NR, at most its NB wide, their count a
/// multiple of the thread count so both cores get the same work.
#[cfg(target_arch = "x86_64")]
fn column_blocks(n: usize, threads: usize, isa: Isa) -> Vec<(usize, usize)> {
    let (nr, threads) = (isa.nr(), threads.max(1));
    let panels = n.div_ceil(nr);
    let mut count = n.div_ceil(isa.nb_max()).max(1);
    count = count.div_ceil(threads) * threads;
    count = count.min(panels).max(1);
    let per = panels.div_ceil(count) * nr;
    (0..n)
        .step_by(per)
        .map(|j0| (j0, per.min(n - j0)))
        .collect()
}

/// Packs A's columns `p0..p0 + kc` into `m_pad / mr` panels of `kc × mr` (column i of a
/// panel = row i of A), zero rows past the matrix; mr = [`Isa::mr`].
#[cfg(target_arch = "x86_64")]
fn pack_a(
    isa: Isa,
    a: MatRef<'_>,
    (p0, kc): (usize, usize),
    m_pad: usize,
    dst: &mut Vec<f32>,
    parallel: bool,
) {
    let (m, mr) = (a.rows, isa.mr());
    if dst.len() < m_pad * kc {
        *dst = zeroed(m_pad * kc);
    }
    let pack = |(panel, dst): (usize, &mut [f32])| {
        let r0 = panel * mr;
        let rows = mr.min(m.saturating_sub(r0));
        if rows == mr && a.cs == 1 {
            let row = |i: usize| {
                let row = (r0 + i) * a.rs + p0;
                &a.data[row..row + kc]
            };
            match isa {
                Isa::Avx512 => x86::pack_panel(isa, &std::array::from_fn::<_, 14, _>(row), dst),
                Isa::Avx2 => x86::pack_panel(isa, &std::array::from_fn::<_, 6, _>(row), dst),
            }
            return;
        }
        dst.fill(0.0);
        for i in 0..rows {
            let row = (r0 + i) * a.rs;
            if a.cs == 1 {
                let src = &a.data[row + p0..row + p0 + kc];
                for (d, v) in dst[i..].iter_mut().step_by(mr).zip(src) {
                    *d = *v;
                }
            } else {
                for (kk, d) in dst[i..].iter_mut().step_by(mr).enumerate() {
                    *d = a.data[row + (p0 + kk) * a.cs];
                }
            }
        }
    };
    let dst = &mut dst[..m_pad * kc];
    if parallel {
        dst.par_chunks_mut(mr * kc).enumerate().for_each(pack);
    } else {
        dst.chunks_mut(mr * kc).enumerate().for_each(pack);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::cell::RefCell;

    use rayon::prelude::*;

    use super::{column_blocks, hugepage_hint, pack_a, Isa, MatRef, PackedB, C_BLOCK_FLOATS};

    /// The output, written by several threads at disjoint column blocks.
    #[derive(Clone, Copy)]
    struct OutPtr(*mut f32);
    // SAFETY: each thread writes only its own column block of the output (see `matmul`).
    unsafe impl Send for OutPtr {}
    unsafe impl Sync for OutPtr {}

    impl OutPtr {
        /// The element `offset` floats in (a method, so closures capture the `Sync` wrapper).
        fn at(self, offset: usize) -> *mut f32 {
            self.0.wrapping_add(offset)
        }
    }

    /// How many panel rows ahead the kernels prefetch their B stream from L2.
    const PREFETCH_ROWS: usize = 16;

    /// The panels' element type, as the kernels' const parameter.
    pub(super) const F32: u8 = 0;
    pub(super) const BF16: u8 = 1;
    pub(super) const F16: u8 = 2;

    /// Bytes of one panel row: NR elements.
    const fn row_bytes(kind: u8, nr: usize) -> usize {
        if kind == F32 {
            4 * nr
        } else {
            2 * nr
        }
    }

    /// A micro-kernel: `C[mr × nr]` (row stride ldc) = or += A-panel · B-panel (+ bias when it
    /// is not null), for kc steps of k. Arguments: kc, A panel, B panel, C, ldc, mr, nr,
    /// accumulate, bias.
    type Kernel =
        unsafe fn(usize, *const f32, *const u8, *mut f32, usize, usize, usize, bool, *const f32);

    /// `isa`'s micro-kernel for panels of type KIND.
    fn kernel_for<const KIND: u8>(isa: Isa) -> Kernel {
        match isa {
            Isa::Avx512 => avx512::kernel::<KIND>,
            Isa::Avx2 => avx2::kernel::<KIND>,
        }
    }

    /// [`super::widen_f16`]; `src` and `dst` of one length, `isa` detected.
    pub(super) unsafe fn widen_f16(isa: Isa, src: &[u16], dst: &mut [f32]) {
        match isa {
            Isa::Avx512 => avx512::widen_f16(src, dst),
            Isa::Avx2 => avx2::widen_f16(src, dst),
        }
    }

    thread_local! {
        static A_PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        /// A column block of f16 panels widened to f32 (see `block`).
        static B_WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// The thread's A buffer, or a fresh one where it is in use (a rayon task run by a thread
    /// waiting inside its own product).
    fn with_a_pack<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
        A_PACK.with(|cell| match cell.try_borrow_mut() {
            Ok(mut ap) => f(&mut ap),
            Err(_) => f(&mut Vec::new()),
        })
    }

    pub(super) fn matmul<const KIND: u8>(
        a: MatRef<'_>,
        b: &PackedB,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let (m, n, mr) = (a.rows, b.n, b.isa.mr());
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        hugepage_hint(&mut out);
        let c = OutPtr(out.as_mut_ptr());
        let blocks = column_blocks(n, rayon::current_num_threads(), b.isa);
        // Row blocks keep each block's output (written by the first K slice, re-read by the
        // next) in L3; a whole large output (2056 × 3072 f32 = 25 MB) would go out to DRAM.
        let mb = (C_BLOCK_FLOATS / n).max(mr) / mr * mr;
        with_a_pack(|ap| {
            for r_first in (0..m).step_by(mb) {
                let rows = mb.min(m - r_first);
                let a = MatRef {
                    data: &a.data[r_first * a.rs..],
                    rows,
                    ..a
                };
                let c = OutPtr(c.at(r_first * n));
                block::<KIND>(a, b, bias, (c, n), &blocks, ap, true);
            }
        });
        // SAFETY: k > 0, so the first K slice wrote every element of every column block of
        // every row block, and those cover the m × n output.
        unsafe { out.set_len(m * n) };
        out
    }

    /// The caller checked that the `a.rows × b.n` block with row stride `ldc` fits in `c`.
    pub(super) fn matmul_serial<const KIND: u8>(
        a: MatRef<'_>,
        b: &PackedB,
        c: &mut [f32],
        ldc: usize,
    ) {
        let c = OutPtr(c.as_mut_ptr());
        with_a_pack(|ap| block::<KIND>(a, b, None, (c, ldc), &[(0, b.n)], ap, false));
    }

    /// `c = a · B (+ bias)` for one block of rows: K slices in turn, each slice's column blocks
    /// over rayon when `parallel`. `c` is the output and its row stride.
    fn block<const KIND: u8>(
        a: MatRef<'_>,
        b: &PackedB,
        bias: Option<&[f32]>,
        (c, ldc): (OutPtr, usize),
        blocks: &[(usize, usize)],
        ap: &mut Vec<f32>,
        parallel: bool,
    ) {
        let (m, k, isa) = (a.rows, a.cols, b.isa);
        let (mr, nr, kc_max) = (isa.mr(), isa.nr(), isa.kc());
        let m_pad = m.div_ceil(mr) * mr;
        // f16 panels are read widened (see `columns`).
        let kernel = kernel_for::<KIND>(isa);
        let wide_kernel = kernel_for::<F32>(isa);
        for p0 in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - p0);
            pack_a(isa, a, (p0, kc), m_pad, ap, parallel);
            let ap = &ap[..m_pad * kc];
            let first = p0 == 0;
            // The tiles of one column block, B's panel for column c0 at `panel_of(c0)`: KIND's
            // panels, or f32 ones (`widened`).
            let tiles = |j0: usize, nb: usize, panel_of: &dyn Fn(usize) -> *const u8, widened| {
                let kernel = if widened { wide_kernel } else { kernel };
                for (panel, a_panel) in ap.chunks_exact(mr * kc).enumerate() {
                    let r0 = panel * mr;
                    let rows = mr.min(m - r0);
                    for c0 in (j0..j0 + nb).step_by(nr) {
                        let cols = nr.min(j0 + nb - c0);
                        let (a_ptr, b_ptr, c_ptr) =
                            (a_panel.as_ptr(), panel_of(c0), c.at(r0 * ldc + c0));
                        let bias = match (first, bias) {
                            (true, Some(bias)) => bias[c0..].as_ptr(),
                            _ => std::ptr::null(),
                        };
                        // SAFETY: the kernel's instruction set was detected (the callers check
                        // `isa.available()`); the panels hold kc·mr floats and kc rows of nr
                        // elements of B's type (f32 when widened); the tile's rows r0..r0+rows
                        // and columns c0..c0+cols lie inside the output block (checked by the
                        // callers), in this task's column block; the bias holds n - c0 ≥ cols
                        // floats past c0.
                        unsafe {
                            kernel(kc, a_ptr, b_ptr, c_ptr, ldc, rows, cols, !first, bias);
                        }
                    }
                }
            };
            let columns = |&(j0, nb): &(usize, usize)| {
                if KIND != F16 {
                    let panel_of = |c0: usize| b.panel_bytes(c0 / nr, p0, kc).as_ptr();
                    return tiles(j0, nb, &panel_of, false);
                }
                // f16 panels are widened once per K slice and column block into an f32 copy
                // (≤ 576 KiB, in L2) that every row panel then reads: widening in the kernel,
                // two vcvtph2ps per k step took FMA-port slots (0.8× f32's GEMM).
                B_WIDE.with_borrow_mut(|wide| {
                    wide.resize(nb.div_ceil(nr) * kc * nr, 0.0);
                    for (i, dst) in wide.chunks_exact_mut(kc * nr).enumerate() {
                        let src: &[u16] = bytemuck::cast_slice(b.panel_bytes(j0 / nr + i, p0, kc));
                        // SAFETY: the instruction set was detected; kc·nr values each.
                        unsafe { widen_f16(isa, src, dst) };
                    }
                    let panel_of = |c0: usize| wide[(c0 - j0) * kc..].as_ptr() as *const u8;
                    tiles(j0, nb, &panel_of, true);
                });
            };
            if parallel {
                blocks.par_iter().for_each(columns);
            } else {
                blocks.iter().for_each(columns);
            }
        }
    }

    /// `tile[i·nr + j] = Σ_p x[i·k + p] · panel[p·nr + j]` for the rows of `x` (`tile.len() /
    /// nr` of them), up to [`Isa::gemv_rows`] at a time against one pass over the panel (the
    /// next pass finds it in L1 or L2). `isa` detected (`gemv_packed` checks).
    pub(super) fn gemv_panel<const KIND: u8>(
        isa: Isa,
        x: &[f32],
        k: usize,
        panel: &[u8],
        tile: &mut [f32],
    ) {
        let (nr, step) = (isa.nr(), isa.gemv_rows());
        assert!(
            panel.len() == k * row_bytes(KIND, nr) && tile.len() * k == x.len() * nr,
            "gemv_panel: shapes"
        );
        for (xs, out) in x.chunks(step * k).zip(tile.chunks_mut(step * nr)) {
            // SAFETY: the instruction set was detected (`gemv_packed` checks); xs holds `rows`
            // rows of k floats, out `rows` × nr, the panel k × nr (asserted above).
            unsafe {
                match isa {
                    Isa::Avx512 => avx512::gemv::<KIND>(xs, k, panel, out),
                    Isa::Avx2 => avx2::gemv::<KIND>(xs, k, panel, out),
                }
            }
        }
    }

    /// One whole A panel for `isa` (R = its MR rows): `dst[kk * R + i] = src[i][kk]`.
    pub(super) fn pack_panel<const R: usize>(isa: Isa, src: &[&[f32]; R], dst: &mut [f32]) {
        assert_eq!(R, isa.mr(), "pack_panel: rows");
        let kc = dst.len() / R;
        assert!(
            src.iter().all(|s| s.len() == kc),
            "pack_panel: ragged panel"
        );
        // SAFETY: only called under the products (the instruction set detected); the
        // transposes read src[i][kk..kk+16 (AVX-512F) or 8 (AVX2)] with kk + 16 (8) ≤ kc and
        // write dst[(kk+j)·R .. +R] with kk + j < kc, for kk below the returned k.
        let full = unsafe {
            match isa {
                Isa::Avx512 => avx512::transpose_blocks(&src[..], dst.as_mut_ptr(), kc),
                Isa::Avx2 => avx2::transpose_blocks(&src[..], dst.as_mut_ptr(), kc),
            }
        };
        for kk in full..kc {
            for (i, s) in src.iter().enumerate() {
                dst[kk * R + i] = s[kk];
            }
        }
    }

    /// Single-thread GFLOP/s of `isa`'s micro-kernel on L1-resident panels (the ceiling).
    #[cfg(test)]
    pub(super) fn kernel_peak<const KIND: u8>(isa: Isa) -> f64 {
        let (kc, mr, nr) = (64, isa.mr(), isa.nr());
        let a = vec![0.5f32; kc * mr];
        let b = vec![0u8; kc * row_bytes(KIND, nr)];
        let mut c = vec![0f32; mr * nr];
        let kernel = kernel_for::<KIND>(isa);
        let reps = 200_000 * 14 * 32 / (mr * nr);
        let t = std::time::Instant::now();
        for _ in 0..reps {
            // SAFETY: test-only, callers check `isa.available()`; panels and tile sized as the
            // kernel reads them.
            unsafe {
                kernel(
                    kc,
                    a.as_ptr(),
                    b.as_ptr(),
                    c.as_mut_ptr(),
                    nr,
                    mr,
                    nr,
                    true,
                    std::ptr::null(),
                );
            }
        }
        std::hint::black_box(&c);
        2.0 * (reps * kc * mr * nr) as f64 / t.elapsed().as_secs_f64() / 1e9
    }

    /// Single-thread GFLOP/s of `isa`'s FMAs alone, 12 independent chains in registers (the
    /// hardware's peak, which [`kernel_peak`] approaches).
    #[cfg(test)]
    pub(super) fn fma_peak(isa: Isa) -> f64 {
        let iters = 20_000_000;
        let t = std::time::Instant::now();
        // SAFETY: test-only, callers check `isa.available()`.
        let lanes = unsafe {
            match isa {
                Isa::Avx512 => avx512::fma_chains(iters),
                Isa::Avx2 => avx2::fma_chains(iters),
            }
        };
        2.0 * (iters * 12 * lanes) as f64 / t.elapsed().as_secs_f64() / 1e9
    }

    /// AVX-512F: 14 × 32 tiles.
    mod avx512 {
        use std::arch::x86_64::*;

        use super::{row_bytes, BF16, F16, F32, PREFETCH_ROWS};

        const MR: usize = super::Isa::Avx512.mr();
        const NR: usize = super::Isa::Avx512.nr();

        /// [`super::widen_f16`]; `src` and `dst` of one length.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
            let full = src.len() / 16 * 16;
            for i in (0..full).step_by(16) {
                let v = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(v));
            }
            for i in full..src.len() {
                dst[i] = half::f16::from_bits(src[i]).to_f32();
            }
        }

        /// `iters` rounds of 12 independent FMAs; returns the lanes per FMA.
        #[cfg(test)]
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn fma_chains(iters: usize) -> usize {
            let mut acc = [_mm512_setzero_ps(); 12];
            let (a, b) = (_mm512_set1_ps(0.999), _mm512_set1_ps(0.001));
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, a, b);
                }
            }
            std::hint::black_box(&acc);
            16
        }

        /// One panel row (NR columns) as two f32 vectors: columns 0..16 and 16..32.
        #[inline(always)]
        unsafe fn load_row<const KIND: u8>(b: *const u8) -> (__m512, __m512) {
            if KIND == F16 {
                let b = b as *const __m256i;
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(b)),
                    _mm512_cvtph_ps(_mm256_loadu_si256(b.add(1))),
                )
            } else if KIND == BF16 {
                // The halves are interleaved (see `Panels`): bf16 → f32 is the bits moved up 16.
                let v = _mm512_loadu_si512(b as *const __m512i);
                let hi = _mm512_and_si512(v, _mm512_set1_epi32(0xffff_0000_u32 as i32));
                (
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                    _mm512_castsi512_ps(hi),
                )
            } else {
                let b = b as *const f32;
                (_mm512_loadu_ps(b), _mm512_loadu_ps(b.add(16)))
            }
        }

        /// [`super::gemv_panel`] for 1..=8 rows.
        pub(super) unsafe fn gemv<const KIND: u8>(x: &[f32], k: usize, b: &[u8], out: &mut [f32]) {
            match x.len() / k {
                1 => gemv_rows::<1, KIND>(x, k, b, out),
                2 => gemv_rows::<2, KIND>(x, k, b, out),
                3 => gemv_rows::<3, KIND>(x, k, b, out),
                4 => gemv_rows::<4, KIND>(x, k, b, out),
                5 => gemv_rows::<5, KIND>(x, k, b, out),
                6 => gemv_rows::<6, KIND>(x, k, b, out),
                7 => gemv_rows::<7, KIND>(x, k, b, out),
                _ => gemv_rows::<8, KIND>(x, k, b, out),
            }
        }

        /// [`gemv`] for exactly `M` rows, the 2·M accumulators in registers.
        #[target_feature(enable = "avx512f")]
        unsafe fn gemv_rows<const M: usize, const KIND: u8>(
            x: &[f32],
            k: usize,
            panel: &[u8],
            out: &mut [f32],
        ) {
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            let (xp, mut b) = (x.as_ptr(), panel.as_ptr());
            for p in 0..k {
                let (b0, b1) = load_row::<KIND>(b);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xi = _mm512_set1_ps(*xp.add(i * k + p));
                    acc[0] = _mm512_fmadd_ps(xi, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(xi, b1, acc[1]);
                }
                b = b.add(row_bytes(KIND, NR));
            }
            let o = out.as_mut_ptr();
            for (i, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.add(i * NR), acc[0]);
                _mm512_storeu_ps(o.add(i * NR + 16), acc[1]);
            }
        }

        /// `dst[kk * MR + i] = src[i][kk]` for kk below the returned multiple of 16, 16 k at
        /// a time through a 16 × 16 register transpose (rows 14 and 15 zero), stored 14 lanes
        /// per k.
        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn transpose_blocks(src: &[&[f32]], dst: *mut f32, kc: usize) -> usize {
            const LANES: __mmask16 = (1 << MR) - 1;
            let full = kc / 16 * 16;
            let pd = _mm512_castps_pd;
            let ps = _mm512_castpd_ps;
            for kk in (0..full).step_by(16) {
                let mut r = [_mm512_setzero_ps(); 16];
                for (r, s) in r.iter_mut().zip(src) {
                    *r = _mm512_loadu_ps(s.as_ptr().add(kk));
                }
                // Within 128-bit lanes: t[2i], t[2i+1] interleave rows 2i and 2i+1.
                let mut t = [_mm512_setzero_ps(); 16];
                for i in 0..8 {
                    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
                }
                // u[4i + c], lane L: column 4L + c of rows 4i..4i+4.
                let mut u = [_mm512_setzero_ps(); 16];
                for i in 0..4 {
                    let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
                    u[4 * i] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
                    u[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
                    u[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
                    u[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
                }
                for c in 0..4 {
                    let x0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
                    let x1 = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
                    let y0 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
                    let y1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
                    for (col, v) in [
                        (c, _mm512_shuffle_f32x4::<0x88>(x0, y0)),
                        (8 + c, _mm512_shuffle_f32x4::<0xDD>(x0, y0)),
                        (4 + c, _mm512_shuffle_f32x4::<0x88>(x1, y1)),
                        (12 + c, _mm512_shuffle_f32x4::<0xDD>(x1, y1)),
                    ] {
                        _mm512_mask_storeu_ps(dst.add((kk + col) * MR), LANES, v);
                    }
                }
            }
            full
        }

        /// [`super::Kernel`] on 14 × 32 tiles.
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn kernel<const KIND: u8>(
            kc: usize,
            a: *const f32,
            b: *const u8,
            c: *mut f32,
            ldc: usize,
            mr: usize,
            nr: usize,
            accumulate: bool,
            bias: *const f32,
        ) {
            // The tile's rows are far apart (whole output rows): fetch them while the k loop
            // runs.
            for i in 0..MR {
                if i < mr {
                    _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + 16) as *const i8);
                }
            }
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            let (mut a, mut b) = (a, b);
            for _ in 0..kc {
                let ahead = b.add(PREFETCH_ROWS * row_bytes(KIND, NR)) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                if KIND == F32 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(64));
                }
                let (b0, b1) = load_row::<KIND>(b);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*a.add(i));
                    acc[0] = _mm512_fmadd_ps(ai, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(ai, b1, acc[1]);
                }
                a = a.add(MR);
                b = b.add(row_bytes(KIND, NR));
            }
            let m0: __mmask16 = if nr >= 16 { 0xffff } else { (1u16 << nr) - 1 };
            let m1: __mmask16 = if nr >= 32 {
                0xffff
            } else if nr > 16 {
                (1u16 << (nr - 16)) - 1
            } else {
                0
            };
            let (bias0, bias1) = if bias.is_null() {
                (_mm512_setzero_ps(), _mm512_setzero_ps())
            } else {
                (
                    _mm512_maskz_loadu_ps(m0, bias),
                    _mm512_maskz_loadu_ps(m1, bias.add(16)),
                )
            };
            for (i, acc) in acc.iter().enumerate() {
                if i < mr {
                    let row = c.add(i * ldc);
                    let (mut v0, mut v1) = (acc[0], acc[1]);
                    if accumulate {
                        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                    } else {
                        v0 = _mm512_add_ps(v0, bias0);
                        v1 = _mm512_add_ps(v1, bias1);
                    }
                    _mm512_mask_storeu_ps(row, m0, v0);
                    _mm512_mask_storeu_ps(row.add(16), m1, v1);
                }
            }
        }
    }

    /// AVX2 + FMA + F16C: 6 × 16 tiles, 12 accumulators of the 16 ymm registers.
    mod avx2 {
        use std::arch::x86_64::*;

        use super::{row_bytes, BF16, F16, PREFETCH_ROWS};

        const MR: usize = super::Isa::Avx2.mr();
        const NR: usize = super::Isa::Avx2.nr();
        /// How many panel rows ahead the GEMV prefetches (2 KiB of f32 panel).
        const GEMV_PREFETCH_ROWS: usize = 32;

        /// [`super::widen_f16`]; `src` and `dst` of one length.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
            let full = src.len() / 8 * 8;
            for i in (0..full).step_by(8) {
                let v = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(v));
            }
            for i in full..src.len() {
                dst[i] = half::f16::from_bits(src[i]).to_f32();
            }
        }

        /// `iters` rounds of 12 independent FMAs; returns the lanes per FMA.
        #[cfg(test)]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn fma_chains(iters: usize) -> usize {
            let mut acc = [_mm256_setzero_ps(); 12];
            let (a, b) = (_mm256_set1_ps(0.999), _mm256_set1_ps(0.001));
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, a, b);
                }
            }
            std::hint::black_box(&acc);
            8
        }

        /// One panel row (NR columns) as two f32 vectors: columns 0..8 and 8..16.
        #[inline(always)]
        unsafe fn load_row<const KIND: u8>(b: *const u8) -> (__m256, __m256) {
            if KIND == F16 {
                let b = b as *const __m128i;
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(b)),
                    _mm256_cvtph_ps(_mm_loadu_si128(b.add(1))),
                )
            } else if KIND == BF16 {
                // The halves are interleaved (see `Panels`): bf16 → f32 is the bits moved up 16.
                let v = _mm256_loadu_si256(b as *const __m256i);
                let hi = _mm256_and_si256(v, _mm256_set1_epi32(0xffff_0000_u32 as i32));
                (
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                    _mm256_castsi256_ps(hi),
                )
            } else {
                let b = b as *const f32;
                (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)))
            }
        }

        /// [`super::gemv_panel`] for 1..=6 rows. Few rows are few FMA chains, each waiting on
        /// the FMA's latency (4–5 cycles, 2 per cycle): `U` steps of k go to separate
        /// accumulators (≥ 8 chains), summed at the end.
        pub(super) unsafe fn gemv<const KIND: u8>(x: &[f32], k: usize, b: &[u8], out: &mut [f32]) {
            match x.len() / k {
                1 => gemv_rows::<1, 4, KIND>(x, k, b, out),
                2 => gemv_rows::<2, 2, KIND>(x, k, b, out),
                3 => gemv_rows::<3, 2, KIND>(x, k, b, out),
                4 => gemv_rows::<4, 1, KIND>(x, k, b, out),
                5 => gemv_rows::<5, 1, KIND>(x, k, b, out),
                _ => gemv_rows::<6, 1, KIND>(x, k, b, out),
            }
        }

        /// [`gemv`] for exactly `M` rows, the 2·M·U accumulators in registers.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn gemv_rows<const M: usize, const U: usize, const KIND: u8>(
            x: &[f32],
            k: usize,
            panel: &[u8],
            out: &mut [f32],
        ) {
            let mut acc = [[[_mm256_setzero_ps(); 2]; M]; U];
            let (xp, mut b) = (x.as_ptr(), panel.as_ptr());
            let step = |acc: &mut [[__m256; 2]; M], b: *const u8, p: usize| {
                let (b0, b1) = load_row::<KIND>(b);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xi = _mm256_broadcast_ss(&*xp.add(i * k + p));
                    acc[0] = _mm256_fmadd_ps(xi, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(xi, b1, acc[1]);
                }
            };
            let full = k / U * U;
            for p in (0..full).step_by(U) {
                for (u, acc) in acc.iter_mut().enumerate() {
                    // With 3 or more rows the FMAs keep up with L3: fetch the panel ahead
                    // (4×768×3072 f32: 36 → 50 GFLOP/s on one Zen 4 core; 8 rows: 47 → 70).
                    if M >= 3 {
                        let ahead = b.add(GEMV_PREFETCH_ROWS * row_bytes(KIND, NR));
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                    step(acc, b, p + u);
                    b = b.add(row_bytes(KIND, NR));
                }
            }
            for p in full..k {
                step(&mut acc[0], b, p);
                b = b.add(row_bytes(KIND, NR));
            }
            let o = out.as_mut_ptr();
            for i in 0..M {
                let (mut v0, mut v1) = (acc[0][i][0], acc[0][i][1]);
                for acc in &acc[1..] {
                    v0 = _mm256_add_ps(v0, acc[i][0]);
                    v1 = _mm256_add_ps(v1, acc[i][1]);
                }
                _mm256_storeu_ps(o.add(i * NR), v0);
                _mm256_storeu_ps(o.add(i * NR + 8), v1);
            }
        }

        /// `dst[kk * MR + i] = src[i][kk]` for kk below the returned multiple of 8, 8 k at a
        /// time through an 8 × 8 register transpose (rows 6 and 7 zero), stored 6 lanes per k
        /// (4 + 2: never past the panel's end, which may be another thread's).
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn transpose_blocks(src: &[&[f32]], dst: *mut f32, kc: usize) -> usize {
            let full = kc / 8 * 8;
            for kk in (0..full).step_by(8) {
                let mut r = [_mm256_setzero_ps(); 8];
                for (r, s) in r.iter_mut().zip(src) {
                    *r = _mm256_loadu_ps(s.as_ptr().add(kk));
                }
                // t[2i] lanes: rows 2i, 2i+1 at k 0, 1 | 4, 5; t[2i+1]: k 2, 3 | 6, 7.
                let mut t = [_mm256_setzero_ps(); 8];
                for i in 0..4 {
                    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
                }
                // s[4h + j]: rows 4h..4h+4 at k j | k j + 4.
                let mut s = [_mm256_setzero_ps(); 8];
                for h in 0..2 {
                    let (lo, hi) = (t[4 * h], t[4 * h + 2]);
                    s[4 * h] = _mm256_shuffle_ps::<0x44>(lo, hi);
                    s[4 * h + 1] = _mm256_shuffle_ps::<0xEE>(lo, hi);
                    let (lo, hi) = (t[4 * h + 1], t[4 * h + 3]);
                    s[4 * h + 2] = _mm256_shuffle_ps::<0x44>(lo, hi);
                    s[4 * h + 3] = _mm256_shuffle_ps::<0xEE>(lo, hi);
                }
                for j in 0..4 {
                    for (col, v) in [
                        (j, _mm256_permute2f128_ps::<0x20>(s[j], s[4 + j])),
                        (j + 4, _mm256_permute2f128_ps::<0x31>(s[j], s[4 + j])),
                    ] {
                        let d = dst.add((kk + col) * MR);
                        _mm_storeu_ps(d, _mm256_castps256_ps128(v));
                        let hi = _mm_castps_pd(_mm256_extractf128_ps::<1>(v));
                        _mm_store_sd(d.add(4) as *mut f64, hi);
                    }
                }
            }
            full
        }

        /// [`super::Kernel`] on 6 × 16 tiles.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn kernel<const KIND: u8>(
            kc: usize,
            a: *const f32,
            b: *const u8,
            c: *mut f32,
            ldc: usize,
            mr: usize,
            nr: usize,
            accumulate: bool,
            bias: *const f32,
        ) {
            // The tile's rows are far apart (whole output rows): fetch them while the k loop
            // runs (64 bytes a row, on at most two lines).
            for i in 0..MR {
                if i < mr {
                    _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + NR - 1) as *const i8);
                }
            }
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let (mut a, mut b) = (a, b);
            for _ in 0..kc {
                // One row is at most 64 bytes: one new line per row.
                _mm_prefetch::<_MM_HINT_T0>(b.add(PREFETCH_ROWS * row_bytes(KIND, NR)) as *const i8);
                let (b0, b1) = load_row::<KIND>(b);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = _mm256_broadcast_ss(&*a.add(i));
                    acc[0] = _mm256_fmadd_ps(ai, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(ai, b1, acc[1]);
                }
                a = a.add(MR);
                b = b.add(row_bytes(KIND, NR));
            }
            // Lane masks of the tile's columns (all set when nr = 16).
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nr as i32), lanes);
            let m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(nr as i32 - 8), lanes);
            let full = nr == NR;
            let load = |p: *const f32, m: __m256i| {
                if full {
                    _mm256_loadu_ps(p)
                } else {
                    _mm256_maskload_ps(p, m)
                }
            };
            let (bias0, bias1) = if bias.is_null() {
                (_mm256_setzero_ps(), _mm256_setzero_ps())
            } else {
                (load(bias, m0), load(bias.add(8), m1))
            };
            for (i, acc) in acc.iter().enumerate() {
                if i < mr {
                    let row = c.add(i * ldc);
                    let (mut v0, mut v1) = (acc[0], acc[1]);
                    if accumulate {
                        v0 = _mm256_add_ps(v0, load(row, m0));
                        v1 = _mm256_add_ps(v1, load(row.add(8), m1));
                    } else {
                        v0 = _mm256_add_ps(v0, bias0);
                        v1 = _mm256_add_ps(v1, bias1);
                    }
                    if full {
                        _mm256_storeu_ps(row, v0);
                        _mm256_storeu_ps(row.add(8), v1);
                    } else {
                        _mm256_maskstore_ps(row, m0, v0);
                        _mm256_maskstore_ps(row.add(8), m1, v1);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The instruction sets this CPU runs, printed: every test runs on each of them. (On a CPU
    /// with AVX-512F, the AVX2-only case — `detect()` picking AVX2, kernels.rs on it — runs
    /// under emulation: `qemu-x86_64 -cpu Haswell-v4 <the test binary>`.)
    fn isas(test: &str) -> Vec<Isa> {
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
        eprintln!("{test}: on {isas:?} (of {:?})", Isa::ALL);
        isas
    }

    fn naive(a: MatRef<'_>, b: MatRef<'_>, bias: Option<&[f32]>) -> Vec<f64> {
        let mut out = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = bias.map_or(0.0, |b| b[j] as f64);
                for p in 0..a.cols {
                    s += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                }
                out[i * b.cols + j] = s;
            }
        }
        out
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn isa_detection_and_names() {
        let best = Isa::detect();
        eprintln!("detected: {best:?}");
        assert_eq!(available(), best.is_some());
        // The best one: AVX-512F where the CPU has it, AVX2 otherwise.
        if let Some(best) = best {
            assert!(best.available());
            assert_eq!(best == Isa::Avx512, Isa::Avx512.available());
        }
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>(), Ok(isa));
            assert_eq!(isa.to_string(), isa.name());
            // A packing for a missing instruction set is refused, never run.
            let b = MatRef::row_major(&[1.0f32; 6], 2, 3);
            assert_eq!(PackedB::pack_for(isa, b).is_some(), isa.available());
            if let Some(p) = PackedB::pack_for(isa, b) {
                assert_eq!(p.isa(), isa);
            }
        }
        assert_eq!("AVX512F".parse::<Isa>(), Ok(Isa::Avx512));
        assert!("sse2".parse::<Isa>().is_err());
        assert_eq!((MR, NR), (Isa::Avx512.mr(), Isa::Avx512.nr()));
        if let Some(best) = best {
            let p = PackedB::pack(MatRef::row_major(&[1.0f32; 6], 2, 3)).expect("pack");
            assert_eq!(p.isa(), best);
        }
    }

    #[test]
    fn matches_f64_reference_on_edge_shapes_and_layouts() {
        // Rows and columns off the tile sizes (14 × 32 and 6 × 16), K across slices (384 and
        // 768), both B layouts, with and without bias.
        for isa in isas("matches_f64_reference_on_edge_shapes_and_layouts") {
            for &(m, k, n) in &[
                (1, 1, 1),
                (13, 7, 31),
                (15, 385, 33),
                (5, 257, 17),
                (7, 513, 15),
                (29, 800, 70),
                (9, 1600, 20),
                (257, 64, 800),
            ] {
                let av = values(m * k, 1);
                let bv = values(k * n, 2);
                let bias = values(n, 3);
                let a = MatRef::row_major(&av, m, k);
                for b in [MatRef::row_major(&bv, k, n), MatRef::new(&bv, k, n, 1, k)] {
                    for bias in [None, Some(bias.as_slice())] {
                        let got = matmul(isa, a, b, bias).expect("available");
                        let what = format!("{isa} {m}x{k}x{n} b.cs={}", b.cs);
                        assert_close(&got, &naive(a, b, bias), k, &what);
                    }
                }
            }
        }
    }

    #[test]
    fn gemv_matches_f64_reference() {
        for isa in isas("gemv_matches_f64_reference") {
            // 1..=8 rows (one pass over B on AVX-512F, two past 6 on AVX2), 9 and 17 in
            // several; columns off the panels and more panels than one task takes; strided and
            // transposed A; with and without bias.
            for &(m, k, n) in &[
                (1, 1, 1),
                (3, 7, 45),
                (7, 20, 17),
                (8, 385, 70),
                (9, 64, 300),
                (17, 33, 32),
            ] {
                let av = values(m * k * 2, 4);
                let bv = values(k * n, 5);
                let bias = values(n, 6);
                let bp = PackedB::pack_for(isa, MatRef::row_major(&bv, k, n)).expect("pack");
                let b = MatRef::row_major(&bv, k, n);
                for a in [
                    MatRef::row_major(&av, m, k),
                    MatRef::new(&av, m, k, 2 * k, 1),
                    MatRef::new(&av, m, k, 1, m),
                ] {
                    for bias in [None, Some(bias.as_slice())] {
                        let got = gemv_packed(a, &bp, bias).expect("available");
                        assert_eq!(got.len(), m * n);
                        let what = format!("{isa} gemv {m}x{k}x{n}");
                        assert_close(&got, &naive(a, b, bias), k, &what);
                    }
                }
            }
            let bp = PackedB::pack_for(isa, MatRef::row_major(&[0.0; 6], 2, 3)).expect("pack");
            assert!(gemv_packed(MatRef::row_major(&[0.0; 3], 1, 3), &bp, None).is_none());
            assert!(
                gemv_packed(MatRef::row_major(&[0.0; 2], 1, 2), &bp, Some(&[0.0; 2])).is_none()
            );
            // No rows: an empty product.
            assert_eq!(
                gemv_packed(MatRef::row_major(&[], 0, 2), &bp, None),
                Some(vec![])
            );
        }
    }

    /// bf16 and f16 panels: the GEMM, the GEMV and the serial product against the f64 product
    /// of the widened values (widening is exact, the sums are f32 as for f32 panels), on shapes
    /// off the tiles, with strided B, bias and several K slices.
    #[test]
    fn half_panels_match_f64_reference_of_widened_values() {
        type Pack = fn(Isa, MatRef<'_, u16>) -> Option<PackedB>;
        /// dtype, f32 → bits, bits → f32, packing.
        type Kind = (candle_core::DType, fn(f32) -> u16, fn(u16) -> f32, Pack);
        let kinds: [Kind; 2] = [
            (
                candle_core::DType::BF16,
                |v| half::bf16::from_f32(v).to_bits(),
                |b| half::bf16::from_bits(b).to_f32(),
                PackedB::pack_bf16_for,
            ),
            (
                candle_core::DType::F16,
                |v| half::f16::from_f32(v).to_bits(),
                |b| half::f16::from_bits(b).to_f32(),
                PackedB::pack_f16_for,
            ),
        ];
        for isa in isas("half_panels_match_f64_reference_of_widened_values") {
            for (dtype, narrow, widen, pack) in kinds {
                for &(m, k, n) in &[
                    (1, 1, 1),
                    (3, 7, 45),
                    (7, 9, 13),
                    (15, 385, 33),
                    (29, 800, 70),
                ] {
                    let av = values(m * k, 11);
                    let bits: Vec<u16> = values(k * n, 12).into_iter().map(narrow).collect();
                    let widened: Vec<f32> = bits.iter().map(|b| widen(*b)).collect();
                    let bias = values(n, 13);
                    let a = MatRef::row_major(&av, m, k);
                    for (rs, cs) in [(n, 1), (1, k)] {
                        let packed = pack(isa, MatRef::new(&bits, k, n, rs, cs)).expect("bounds");
                        assert_eq!((packed.dtype(), packed.isa()), (dtype, isa));
                        let nr = isa.nr();
                        assert_eq!(packed.size_in_bytes(), n.div_ceil(nr) * nr * k * 2);
                        let want_b = MatRef::new(&widened, k, n, rs, cs);
                        for bias in [None, Some(bias.as_slice())] {
                            let want = naive(a, want_b, bias);
                            let what = format!("{isa} {dtype:?} {m}x{k}x{n} cs={cs}");
                            let got = matmul_packed(a, &packed, bias).expect("available");
                            assert_close(&got, &want, k, &what);
                            let got = gemv_packed(a, &packed, bias).expect("available");
                            assert_close(&got, &want, k, &format!("gemv {what}"));
                        }
                        let mut c = vec![0f32; m * n];
                        assert!(matmul_serial(a, &packed, &mut c, n));
                        assert_close(&c, &naive(a, want_b, None), k, "half serial");
                    }
                }
                // Out-of-bounds views are refused, as for f32.
                assert!(pack(isa, MatRef::row_major(&[0u16; 5], 2, 3)).is_none());
            }
            // widen_f16 on this instruction set: exact, any length (vector and scalar tails).
            let bits: Vec<u16> = values(37, 14)
                .into_iter()
                .map(|v| half::f16::from_f32(v * 1e3).to_bits())
                .collect();
            let mut got = vec![0f32; bits.len()];
            widen_f16_for(Some(isa), &bits, &mut got);
            let want: Vec<f32> = bits
                .iter()
                .map(|b| half::f16::from_bits(*b).to_f32())
                .collect();
            assert_eq!(got, want, "{isa} widen_f16");
        }
    }

    fn assert_close(got: &[f32], want: &[f64], k: usize, what: &str) {
        let tol = 1e-6 * (k as f64).sqrt() * 4.0;
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() <= tol, "{what} [{i}]: {g} vs {w}");
        }
    }

    #[test]
    fn strided_inputs_serial_output_and_row_blocks() {
        for isa in isas("strided_inputs_serial_output_and_row_blocks") {
            // A as a transposed view (column stride ≠ 1), into an output with row stride > n:
            // the gap columns stay untouched.
            let (m, k, n, ldc) = (17, 45, 40, 43);
            let at = values(k * m, 4);
            let bv = values(k * n, 5);
            let a = MatRef::new(&at, m, k, 1, m);
            let b = MatRef::row_major(&bv, k, n);
            let packed = PackedB::pack_serial_for(isa, b).expect("in bounds");
            let mut c = vec![7.0f32; m * ldc];
            assert!(matmul_serial(a, &packed, &mut c, ldc));
            let want = naive(a, b, None);
            for (i, row) in c.chunks_exact(ldc).enumerate() {
                assert_close(&row[..n], &want[i * n..(i + 1) * n], k, "serial");
                assert!(
                    row[n..].iter().all(|v| *v == 7.0),
                    "{isa} row {i} wrote past n"
                );
            }
            assert_close(
                &matmul(isa, a, b, None).expect("avail"),
                &want,
                k,
                "strided A",
            );
            // An output too small for the block, or a K that disagrees, is refused.
            assert!(!matmul_serial(a, &packed, &mut c[..m * ldc - 4], ldc));
            let a_short = MatRef { cols: k - 1, ..a };
            assert!(matmul_packed(a_short, &packed, None).is_none());
            // A row-major A with a row stride past its width, K across slices, serial.
            let (m, k, n, lda) = (11, 600, 21, 611);
            let av = values(m * lda, 8);
            let bv = values(k * n, 9);
            let a = MatRef::new(&av, m, k, lda, 1);
            let b = MatRef::row_major(&bv, k, n);
            let packed = PackedB::pack_serial_for(isa, b).expect("in bounds");
            let mut c = vec![0f32; m * n];
            assert!(matmul_serial(a, &packed, &mut c, n));
            assert_close(&c, &naive(a, b, None), k, &format!("{isa} lda"));
            // More output than one row block (C_BLOCK_FLOATS): several blocks, same result.
            let (m, k, n) = (300, 20, 4000);
            let av = values(m * k, 6);
            let bv = values(k * n, 7);
            let a = MatRef::row_major(&av, m, k);
            let b = MatRef::row_major(&bv, k, n);
            assert!(m * n > C_BLOCK_FLOATS);
            assert_close(
                &matmul(isa, a, b, None).expect("available"),
                &naive(a, b, None),
                k,
                &format!("{isa} blocks"),
            );
        }
    }

    #[test]
    #[ignore = "timing, run by hand: cargo test --release -p blipdex-model sgemm_speed -- --ignored --nocapture"]
    fn sgemm_speed() {
        let isas = isas("sgemm_speed");
        for &isa in &isas {
            // Best of a few: a shared machine's other work only ever slows a run down.
            let best = |f: &dyn Fn() -> f64| (0..5).map(|_| f()).fold(0.0, f64::max);
            eprintln!(
                "{isa} one thread: FMA peak {:.0} GFLOP/s; kernel peak {:.0} (bf16 B: {:.0})",
                best(&|| x86::fma_peak(isa)),
                best(&|| x86::kernel_peak::<{ x86::F32 }>(isa)),
                best(&|| x86::kernel_peak::<{ x86::BF16 }>(isa)),
            );
        }
        // ViT-base at batch 8 (qkv, fc1, fc2), one image (fc1), the Q-Former's queries, OPT's
        // prompt pass (32 queries + BOS), a GEMV (4 rows: through `gemv_packed`).
        let shapes = [
            (2056, 768, 2304),
            (2056, 768, 3072),
            (2056, 3072, 768),
            (257, 768, 3072),
            (4, 768, 3072),
            (256, 768, 768),
            (256, 3072, 768),
            (33, 768, 3072),
        ];
        for &(m, k, n) in &shapes {
            let av = values(m * k, 1);
            let bv = values(k * n, 2);
            let a = MatRef::row_major(&av, m, k);
            let b = MatRef::row_major(&bv, k, n);
            let narrow = |f: fn(f32) -> u16| bv.iter().map(|v| f(*v)).collect::<Vec<u16>>();
            let bits = narrow(|v| half::bf16::from_f32(v).to_bits());
            let hbits = narrow(|v| half::f16::from_f32(v).to_bits());
            // Per instruction set: f32, bf16, f16 panels.
            let packed: Vec<[PackedB; 3]> = isas
                .iter()
                .map(|&isa| {
                    [
                        PackedB::pack_for(isa, b).expect("pack"),
                        PackedB::pack_bf16_for(isa, MatRef::row_major(&bits, k, n)).expect("pack"),
                        PackedB::pack_f16_for(isa, MatRef::row_major(&hbits, k, n)).expect("pack"),
                    ]
                })
                .collect();
            let ta =
                candle_core::Tensor::from_slice(&av, (m, k), &candle_core::Device::Cpu).unwrap();
            let tb =
                candle_core::Tensor::from_slice(&bv, (k, n), &candle_core::Device::Cpu).unwrap();
            let gemv = m <= 8;
            let run = |bp: &PackedB| {
                if gemv {
                    gemv_packed(a, bp, None)
                } else {
                    matmul_packed(a, bp, None)
                }
            };
            let mut best = vec![[f64::MAX; 3]; isas.len()];
            let mut pack_best = vec![f64::MAX; isas.len()];
            let mut candle = f64::MAX;
            let mut ap = Vec::new();
            // Interleaved, best of many: this VM's speed drifts by tens of percent.
            let reps = if gemv { 200 } else { 15 };
            for _ in 0..reps {
                for (i, &isa) in isas.iter().enumerate() {
                    for (best, bp) in best[i].iter_mut().zip(&packed[i]) {
                        let t = std::time::Instant::now();
                        std::hint::black_box(run(bp));
                        *best = best.min(t.elapsed().as_secs_f64());
                    }
                    let t = std::time::Instant::now();
                    let kc = isa.kc();
                    for p0 in (0..k).step_by(kc) {
                        let m_pad = m.div_ceil(isa.mr()) * isa.mr();
                        pack_a(isa, a, (p0, kc.min(k - p0)), m_pad, &mut ap, true);
                    }
                    pack_best[i] = pack_best[i].min(t.elapsed().as_secs_f64());
                }
                let t = std::time::Instant::now();
                std::hint::black_box(ta.matmul(&tb).unwrap());
                candle = candle.min(t.elapsed().as_secs_f64());
            }
            let gf = |t: f64| 2.0 * (m * k * n) as f64 / t / 1e9;
            let mut line = format!("{m}x{k}x{n}:");
            for (i, isa) in isas.iter().enumerate() {
                let [f, bf, h] = best[i];
                line += &format!(
                    " {isa} {:.0} GFLOP/s ({:.2} ms; bf16 B {:.0}, f16 B {:.0}; pack_a {:.2} ms);",
                    gf(f),
                    f * 1e3,
                    gf(bf),
                    gf(h),
                    pack_best[i] * 1e3
                );
            }
            // gemm picks its AVX-512 kernels where the CPU has them (this workspace enables
            // `x86-v4`); its AVX2 ones need a candle built without that feature.
            eprintln!("{line} candle {:.0}", gf(candle));
        }
        // Decoding: one row against weights too large for the caches (a 12-layer decoder's
        // worth, cycled), as GB/s of weights streamed.
        for &isa in &isas {
            for bf16 in [false, true] {
                for &(k, n) in &[(768, 768), (768, 3072), (3072, 768)] {
                    let copies = (256 << 20) / (k * n * 4);
                    let pack = |i: usize| {
                        let v = values(k * n, i as u64);
                        if bf16 {
                            let bits: Vec<u16> = v
                                .iter()
                                .map(|v| half::bf16::from_f32(*v).to_bits())
                                .collect();
                            PackedB::pack_bf16_for(isa, MatRef::row_major(&bits, k, n)).unwrap()
                        } else {
                            PackedB::pack_for(isa, MatRef::row_major(&v, k, n)).unwrap()
                        }
                    };
                    let packed: Vec<_> = (0..copies).map(pack).collect();
                    let xv = values(k, 9);
                    let x = MatRef::row_major(&xv, 1, k);
                    let mut best = f64::MAX;
                    for _ in 0..5 {
                        let t = std::time::Instant::now();
                        for bp in &packed {
                            std::hint::black_box(gemv_packed(x, bp, None));
                        }
                        best = best.min(t.elapsed().as_secs_f64() / copies as f64);
                    }
                    let gbs = packed[0].size_in_bytes() as f64 / best / 1e9;
                    let what = if bf16 { "bf16" } else { "f32" };
                    eprintln!(
                        "{isa} gemv {what} 1x{k}x{n}: {:.3} ms, {gbs:.1} GB/s",
                        best * 1e3
                    );
                }
            }
        }
    }
}
