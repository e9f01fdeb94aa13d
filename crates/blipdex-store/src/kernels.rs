//! Dot-product kernels written so LLVM vectorizes them on the baseline target (SSE2) and wider
//! ones (`-C target-cpu=native`): lane-wise accumulators need no float reassociation.

const LANES: usize = 16;

#[inline]
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

/// max over the `q` rows of `vectors` (`[q][e]`) of dot(row, t), with the arg-max.
#[inline]
pub(crate) fn max_sim(vectors: &[f32], t: &[f32]) -> (f32, u16) {
    let mut best = f32::NEG_INFINITY;
    let mut arg = 0u16;
    for (i, v) in vectors.chunks_exact(t.len()).enumerate() {
        let s = dot(v, t);
        if s > best {
            best = s;
            arg = i as u16;
        }
    }
    (best, arg)
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
#[inline]
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
        }
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
