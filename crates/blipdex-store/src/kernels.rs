//! Dot-product kernels written so LLVM vectorizes them on the baseline target (SSE2) and wider
//! ones: lane-wise accumulators need no float reassociation. The hot loops are also compiled a
//! second time with AVX2 and picked at run time ([`max_sim`], [`scan_i8`]); both versions do the
//! same operations in the same order (no FMA contraction), so they return identical bits.

const LANES: usize = 16;

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ac, ar) = a.split_at(a.len() - a.len() % LANES);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// Which kernel build runs here (for test and benchmark output).
pub fn kernel_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        return "avx2";
    }
    "baseline"
}

/// Defines `$name`, which runs `$generic` compiled for AVX2 (as `$avx`) where the CPU has it:
/// the same operations in the same order, so the same bits, 2x wider.
macro_rules! dispatch_avx2 {
    ($(#[$m:meta])* fn $name:ident / $avx:ident = $generic:ident($($a:ident: $t:ty),*) -> $r:ty) => {
        $(#[$m])*
        pub(crate) fn $name($($a: $t),*) -> $r {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                #[allow(unsafe_code)]
                // SAFETY: the CPU has AVX2 (checked above), the only requirement of `$avx`.
                return unsafe { $avx($($a),*) };
            }
            $generic($($a),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx($($a: $t),*) -> $r {
            $generic($($a),*)
        }
    };
}

dispatch_avx2! {
    /// [`dot`], in the AVX2 build where the CPU has it.
    fn dot_dispatch / dot_avx2 = dot(a: &[f32], b: &[f32]) -> f32
}

dispatch_avx2! {
    /// max over the `q` rows of `vectors` (`[q][e]`) of dot(row, t), with the arg-max.
    fn max_sim / max_sim_avx2 = max_sim_generic(vectors: &[f32], t: &[f32]) -> (f32, u16)
}

dispatch_avx2! {
    /// [`max_sim`] on little-endian f32 values of any alignment (a Parquet page's), read in
    /// place: the same bits as `max_sim` on an aligned copy, without the copy (which halved
    /// the rescoring's throughput).
    fn max_sim_f32_bytes / max_sim_f32_bytes_avx2 = max_sim_f32_bytes_generic(bytes: &[u8], t: &[f32]) -> (f32, u16)
}

dispatch_avx2! {
    /// Scores int8 entries (`codes`: n x E, one `scales` each) against the quantized query
    /// `tq` (scale `ts`): pushes `(scale * ts * dot, row)` for the entries whose row passes
    /// `keep`; returns how many it pushed.
    fn scan_i8 / scan_i8_avx2 = scan_i8_generic(
        codes: &[i8],
        scales: &[f32],
        rows: &[u32],
        tq: &[i8],
        ts: f32,
        keep: &dyn Fn(usize) -> bool,
        out: &mut Vec<(f32, u32)>
    ) -> usize
}

dispatch_avx2! {
    /// For each row of `vs` (n x E), the row of `centres` (nlist x E) with the largest dot
    /// product (the first on ties): what [`dot`] against every centre gives, bit for bit.
    fn nearest_rows / nearest_rows_avx2 = nearest_rows_generic(centres: &[f32], vs: &[f32], e: usize) -> Vec<u32>
}

/// [`dot`] of one vector `c` with four others at once: each value of `c` is loaded once for
/// four products. Each of the four sums is accumulated exactly as `dot(c, v[k])` does.
#[inline(always)]
fn dot4(c: &[f32], v: [&[f32]; 4]) -> [f32; 4] {
    // Written like `dot` (zipped chunks, one accumulator array per product) so that LLVM
    // vectorizes it: indexed slices of an array of slices stayed scalar.
    let n = c.len() - c.len() % LANES;
    let mut acc = [[0f32; LANES]; 4];
    for ((((x, y0), y1), y2), y3) in c[..n]
        .chunks_exact(LANES)
        .zip(v[0][..n].chunks_exact(LANES))
        .zip(v[1][..n].chunks_exact(LANES))
        .zip(v[2][..n].chunks_exact(LANES))
        .zip(v[3][..n].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[0][i] += x[i] * y0[i];
            acc[1][i] += x[i] * y1[i];
            acc[2][i] += x[i] * y2[i];
            acc[3][i] += x[i] * y3[i];
        }
    }
    let mut out = [0f32; 4];
    for ((o, a), vk) in out.iter_mut().zip(&acc).zip(&v) {
        let mut s: f32 = a.iter().sum();
        for (x, y) in c[n..].iter().zip(&vk[n..]) {
            s += x * y;
        }
        *o = s;
    }
    out
}

#[inline(always)]
fn nearest_rows_generic(centres: &[f32], vs: &[f32], e: usize) -> Vec<u32> {
    // Blocks of centres small enough to stay in L2 while every vector passes over them: one
    // trip through memory per block rather than one per vector (thousands of lists are MBs).
    const BLOCK: usize = 64;
    let mut best = vec![(f32::NEG_INFINITY, 0u32); vs.len() / e];
    for (b, block) in centres.chunks(BLOCK * e).enumerate() {
        let base = (b * BLOCK) as u32;
        let mut quads = vs.chunks_exact(4 * e);
        let mut done = 0;
        for quad in quads.by_ref() {
            let v = [
                &quad[..e],
                &quad[e..2 * e],
                &quad[2 * e..3 * e],
                &quad[3 * e..],
            ];
            for (j, c) in block.chunks_exact(e).enumerate() {
                for (k, s) in dot4(c, v).into_iter().enumerate() {
                    let x = &mut best[done + k];
                    if s > x.0 {
                        *x = (s, base + j as u32);
                    }
                }
            }
            done += 4;
        }
        for (k, v) in quads.remainder().chunks_exact(e).enumerate() {
            for (j, c) in block.chunks_exact(e).enumerate() {
                let s = dot(c, v);
                let x = &mut best[done + k];
                if s > x.0 {
                    *x = (s, base + j as u32);
                }
            }
        }
    }
    best.into_iter().map(|b| b.1).collect()
}

/// Runs `f` compiled for AVX2 where the CPU has it. `f` must be `#[inline(always)]` code (and
/// call only such code) for the AVX2 build to reach its loops; results are the same bits.
#[inline(always)]
pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        #[allow(unsafe_code)]
        // SAFETY: the CPU has AVX2 (checked above), the only requirement of this function.
        return unsafe { call_avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn call_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Writes the little-endian `dtype` values in `bytes` (any alignment) into `out` as f32.
pub(crate) fn widen(bytes: &[u8], dtype: crate::Dtype, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    debug_assert_eq!(bytes.len(), out.len() * dtype.bytes());
    match dtype {
        crate::Dtype::F32 => bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes),
        crate::Dtype::F16 => match bytemuck::try_cast_slice::<u8, half::f16>(bytes) {
            Ok(h) => h.convert_to_f32_slice(out),
            Err(_) => {
                // Unaligned: through an aligned stack chunk (a memcpy), then the F16C widening.
                const CHUNK: usize = 256;
                let mut tmp = [half::f16::ZERO; CHUNK];
                for (b, o) in bytes.chunks(CHUNK * 2).zip(out.chunks_mut(CHUNK)) {
                    let t = &mut tmp[..o.len()];
                    bytemuck::cast_slice_mut::<half::f16, u8>(t).copy_from_slice(b);
                    t.convert_to_f32_slice(o);
                }
            }
        },
    }
}

/// [`max_sim`] on vectors stored as `dtype` bytes (f16, or f32 that is not aligned): f32 is read
/// in place, f16 widened a vector at a time into `buf` just before its dot product (it stays in
/// L1); equal to `max_sim` on the widened vectors, bit for bit.
pub(crate) fn max_sim_widened(
    bytes: &[u8],
    dtype: crate::Dtype,
    t: &[f32],
    buf: &mut Vec<f32>,
) -> (f32, u16) {
    if dtype == crate::Dtype::F32 {
        return max_sim_f32_bytes(bytes, t);
    }
    let e = t.len();
    buf.resize(e, 0.0);
    let mut best = f32::NEG_INFINITY;
    let mut arg = 0u16;
    for (i, v) in bytes.chunks_exact(e * dtype.bytes()).enumerate() {
        widen(v, dtype, buf);
        let s = dot_dispatch(buf, t);
        if s > best {
            best = s;
            arg = i as u16;
        }
    }
    (best, arg)
}

/// [`dot`] of little-endian f32 bytes (any alignment) with `b`: the same operations in the same
/// order, so the same bits as `dot` on the decoded values.
#[inline(always)]
fn dot_le_bytes(a: &[u8], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), 4 * b.len());
    let f = |x: &[u8]| f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    let mut acc = [0f32; LANES];
    let n = b.len() - b.len() % LANES;
    for (x, y) in a[..4 * n]
        .chunks_exact(4 * LANES)
        .zip(b[..n].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] += f(&x[4 * i..4 * i + 4]) * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[4 * n..].chunks_exact(4).zip(&b[n..]) {
        s += f(x) * y;
    }
    s
}

/// The largest score and its position (the first on ties): the max over an image's vectors.
#[inline(always)]
fn arg_max(scores: impl Iterator<Item = f32>) -> (f32, u16) {
    let mut best = f32::NEG_INFINITY;
    let mut arg = 0u16;
    for (i, s) in scores.enumerate() {
        if s > best {
            best = s;
            arg = i as u16;
        }
    }
    (best, arg)
}

#[inline(always)]
fn max_sim_f32_bytes_generic(bytes: &[u8], t: &[f32]) -> (f32, u16) {
    arg_max(bytes.chunks_exact(4 * t.len()).map(|v| dot_le_bytes(v, t)))
}

#[inline(always)]
pub(crate) fn max_sim_generic(vectors: &[f32], t: &[f32]) -> (f32, u16) {
    arg_max(vectors.chunks_exact(t.len()).map(|v| dot(v, t)))
}

/// Scalar-quantizes `v` into `out` (same length): `v ~ scale * out`, symmetric, round to
/// nearest. Returns the scale (0 for a zero vector).
pub(crate) fn quantize_i8(v: &[f32], out: &mut [i8]) -> f32 {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if amax == 0.0 || !amax.is_finite() {
        out.fill(0);
        return 0.0;
    }
    let inv = 127.0 / amax;
    for (o, x) in out.iter_mut().zip(v) {
        *o = (x * inv).round().clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
}

/// Integer dot product of two int8 vectors. Written as 16-bit products summed in 32 bits, the
/// shape LLVM lowers to `pmaddwd` (SSE2 and wider), so it is exact and about twice the
/// throughput of widening to f32.
#[inline(always)]
pub(crate) fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    debug_assert_eq!(a.len(), b.len());
    const L: usize = 32;
    let mut acc = [0i32; L];
    let (ac, ar) = a.split_at(a.len() - a.len() % L);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(L).zip(bc.chunks_exact(L)) {
        for i in 0..L {
            acc[i] += (x[i] as i16 * y[i] as i16) as i32;
        }
    }
    let mut s: i32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += *x as i32 * *y as i32;
    }
    s
}

#[inline(always)]
pub(crate) fn scan_i8_generic(
    codes: &[i8],
    scales: &[f32],
    rows: &[u32],
    tq: &[i8],
    ts: f32,
    keep: &dyn Fn(usize) -> bool,
    out: &mut Vec<(f32, u32)>,
) -> usize {
    let e = tq.len();
    let before = out.len();
    for ((code, &scale), &r) in codes.chunks_exact(e).zip(scales).zip(rows) {
        if keep(r as usize) {
            out.push((dot_i8(code, tq) as f32 * scale * ts, r));
        }
    }
    out.len() - before
}

#[inline(always)]
pub(crate) fn normalize(v: &mut [f32]) {
    let n = dot(v, v).sqrt();
    if n > 0.0 {
        for x in v {
            *x /= n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive() {
        for len in [1usize, 15, 16, 17, 256, 300] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - naive).abs() < 1e-4, "len {len}");
            // The same bits from unaligned little-endian bytes.
            let mut odd = vec![0u8; 4 * len + 1];
            odd[1..].copy_from_slice(bytemuck::cast_slice(&a));
            assert_eq!(dot_le_bytes(&odd[1..], &b).to_bits(), dot(&a, &b).to_bits());
        }
    }

    /// Every kernel build the CPU can run gives the same bits as the baseline build.
    #[test]
    fn runtime_selected_kernels_equal_baseline() {
        eprintln!("store kernels: {} path selected at run time", kernel_path());
        if std::env::var_os("BLIPDEX_REQUIRE_AVX2").is_some() {
            assert_eq!(
                kernel_path(),
                "avx2",
                "BLIPDEX_REQUIRE_AVX2 is set but AVX2 is missing"
            );
        }
        let e = 256;
        let v: Vec<f32> = (0..32 * e)
            .map(|i| ((i * 7919) as f32 * 0.001).sin())
            .collect();
        let t: Vec<f32> = (0..e).map(|i| (i as f32 * 0.37).cos() * 0.06).collect();
        let a = max_sim(&v, &t);
        let b = max_sim_generic(&v, &t);
        assert_eq!((a.0.to_bits(), a.1), (b.0.to_bits(), b.1));
        assert_eq!(
            dot_dispatch(&v[..e], &t).to_bits(),
            dot(&v[..e], &t).to_bits()
        );
        let c = with_avx2(|| max_sim_generic(&v, &t));
        assert_eq!((a.0.to_bits(), a.1), (c.0.to_bits(), c.1));
        // f16 vectors widened one at a time score as the widened matrix does, and so do f32
        // and f16 vectors at an odd address (as in a shard file).
        let h: Vec<half::f16> = v.iter().map(|x| half::f16::from_f32(*x)).collect();
        let wide: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
        let g = max_sim_generic(&wide, &t);
        let hb: &[u8] = bytemuck::cast_slice(&h);
        let f = max_sim_widened(hb, crate::Dtype::F16, &t, &mut Vec::new());
        assert_eq!((f.0.to_bits(), f.1), (g.0.to_bits(), g.1));
        let mut odd = vec![0u8; hb.len() + 1];
        odd[1..].copy_from_slice(hb);
        let f = max_sim_widened(&odd[1..], crate::Dtype::F16, &t, &mut Vec::new());
        assert_eq!((f.0.to_bits(), f.1), (g.0.to_bits(), g.1));
        let vb: &[u8] = bytemuck::cast_slice(&v);
        let mut odd = vec![0u8; vb.len() + 1];
        odd[1..].copy_from_slice(vb);
        let f = max_sim_widened(&odd[1..], crate::Dtype::F32, &t, &mut Vec::new());
        assert_eq!((f.0.to_bits(), f.1), (a.0.to_bits(), a.1));
        let f = max_sim_f32_bytes_generic(&odd[1..], &t);
        assert_eq!((f.0.to_bits(), f.1), (a.0.to_bits(), a.1));
        let mut out = vec![0f32; v.len()];
        widen(&odd[1..], crate::Dtype::F32, &mut out);
        assert_eq!(out, v);
        // Blocked nearest centre: the first best by `dot`, on every path; 7 vectors (a group of
        // four and a remainder) against 150 centres (blocks of 64 and a partial one).
        let centres: Vec<f32> = (0..150 * e)
            .map(|i| ((i * 104_729) as f32 * 0.0007).cos())
            .collect();
        let vs = &v[..7 * e];
        let naive: Vec<u32> = vs
            .chunks_exact(e)
            .map(|x| {
                let mut best = (f32::NEG_INFINITY, 0u32);
                for (j, c) in centres.chunks_exact(e).enumerate() {
                    let s = dot(c, x);
                    if s > best.0 {
                        best = (s, j as u32);
                    }
                }
                best.1
            })
            .collect();
        assert_eq!(nearest_rows(&centres, vs, e), naive);
        assert_eq!(nearest_rows_generic(&centres, vs, e), naive);
        assert!(naive.iter().any(|&j| j >= 64), "{naive:?}");
        let codes: Vec<i8> = (0..40 * e)
            .map(|i| ((i * 31 % 255) as i32 - 127) as i8)
            .collect();
        let scales: Vec<f32> = (0..40).map(|i| 0.001 * (i + 1) as f32).collect();
        let rows: Vec<u32> = (0..40).collect();
        let tq: Vec<i8> = (0..e)
            .map(|i| ((i * 17 % 255) as i32 - 127) as i8)
            .collect();
        let keep = |r: usize| !r.is_multiple_of(3);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        assert_eq!(
            scan_i8(&codes, &scales, &rows, &tq, 0.01, &keep, &mut x),
            26
        );
        scan_i8_generic(&codes, &scales, &rows, &tq, 0.01, &keep, &mut y);
        assert_eq!(x.len(), 26);
        assert_eq!(
            x.iter().map(|p| (p.0.to_bits(), p.1)).collect::<Vec<_>>(),
            y.iter().map(|p| (p.0.to_bits(), p.1)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn dot_i8_is_exact_and_quantization_bounded() {
        for len in [1usize, 31, 32, 33, 256, 300] {
            let a: Vec<i8> = (0..len)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let b: Vec<i8> = (0..len)
                .map(|i| ((i * 91 % 255) as i32 - 127) as i8)
                .collect();
            let naive: i32 = a.iter().zip(&b).map(|(x, y)| *x as i32 * *y as i32).sum();
            assert_eq!(dot_i8(&a, &b), naive, "len {len}");
        }
        let v: Vec<f32> = (0..256).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut q = vec![0i8; 256];
        let s = quantize_i8(&v, &mut q);
        let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, c) in v.iter().zip(&q) {
            assert!((x - s * *c as f32).abs() <= amax / 254.0 + 1e-7);
        }
        assert!(q.iter().any(|c| c.abs() == 127));
        let mut z = vec![1i8; 4];
        assert_eq!(quantize_i8(&[0.0; 4], &mut z), 0.0);
        assert_eq!(z, vec![0; 4]);
    }
}
