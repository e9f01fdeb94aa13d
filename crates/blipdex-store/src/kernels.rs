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
}
