//! The HNSW candidate generator (hnsw_rs) over per-image representative vectors.
//!
//! Graph point `row * m + j` is representative `j` of row `row` (rows in replay order, see
//! `state`), so every point maps back to one row without a side table, superseded rows included
//! (they are filtered like deleted ones). Candidates are rescored exactly by the caller.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use blipdex_core::{Error, Result};
use hnsw_rs::prelude::{AnnT, Distance, Hnsw, HnswIo};
use rayon::prelude::*;

use crate::fsutil;
use crate::kernels::{dot, normalize};
use crate::types::HnswParams;

/// hnsw_rs keeps 16 layers and refuses to reload dumps made with another count.
const MAX_LAYER: usize = 16;

/// `1 - dot(a, b)` on unit vectors. Ours rather than anndists' `DistDot`, whose scalar path
/// asserts `dot <= 1` (rounding breaks that on unit vectors) and does not vectorize.
#[derive(Debug, Default, Clone, Copy)]
pub struct DotDist;

impl Distance<f32> for DotDist {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        // hnsw_rs asserts distances >= 0; identical unit vectors round to -1e-7.
        (1.0 - dot(va, vb)).max(0.0)
    }
}

/// The `m` vectors that stand for an image's `q` query vectors in the graph: all of them when
/// m == q, their normalized mean when m == 1, else normalized k-means centroids (deterministic:
/// farthest-point seeding from vector 0, a few Lloyd steps on cosine).
pub(crate) fn representatives(vectors: &[f32], q: usize, e: usize, m: usize) -> Vec<f32> {
    debug_assert_eq!(vectors.len(), q * e);
    if m >= q {
        return vectors.to_vec();
    }
    let row = |i: usize| &vectors[i * e..(i + 1) * e];
    if m == 1 {
        let mut c = vec![0f32; e];
        for i in 0..q {
            for (a, b) in c.iter_mut().zip(row(i)) {
                *a += b;
            }
        }
        normalize(&mut c);
        return c;
    }
    // Farthest-point seeding: each new centre is the vector least similar to the chosen ones.
    let mut centres: Vec<f32> = row(0).to_vec();
    let mut best_sim: Vec<f32> = (0..q).map(|i| dot(row(i), row(0))).collect();
    for _ in 1..m {
        let far = (0..q)
            .min_by(|&a, &b| best_sim[a].total_cmp(&best_sim[b]))
            .unwrap_or(0);
        centres.extend_from_slice(row(far));
        let c = centres.len() / e - 1;
        for (i, s) in best_sim.iter_mut().enumerate() {
            *s = s.max(dot(row(i), &centres[c * e..(c + 1) * e]));
        }
    }
    let mut assign = vec![0usize; q];
    for _ in 0..4 {
        for (i, a) in assign.iter_mut().enumerate() {
            *a = (0..m)
                .max_by(|&x, &y| {
                    dot(row(i), &centres[x * e..(x + 1) * e])
                        .total_cmp(&dot(row(i), &centres[y * e..(y + 1) * e]))
                })
                .unwrap_or(0);
        }
        let mut sums = vec![0f32; m * e];
        let mut counts = vec![0usize; m];
        for i in 0..q {
            counts[assign[i]] += 1;
            for (s, v) in sums[assign[i] * e..(assign[i] + 1) * e]
                .iter_mut()
                .zip(row(i))
            {
                *s += v;
            }
        }
        for c in 0..m {
            // An empty cluster keeps its previous centre.
            if counts[c] > 0 {
                let s = &mut sums[c * e..(c + 1) * e];
                normalize(s);
                centres[c * e..(c + 1) * e].copy_from_slice(s);
            }
        }
    }
    centres
}

/// What the in-memory HNSW graph holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnInfo {
    /// Rows in the graph (superseded and deleted rows too; they are filtered at query time).
    pub rows: usize,
    /// Graph points: rows * vectors_per_image.
    pub points: usize,
    pub vectors_per_image: usize,
    /// Rows that came from the hnsw_rs dump at open; the rest were inserted since.
    pub reloaded_rows: usize,
}

pub(crate) struct Ann {
    hnsw: Hnsw<'static, f32, DotDist>,
    per_image: usize,
    /// Rows inserted so far: always a prefix of the replay order.
    rows: usize,
    /// Rows that came from the reloaded dump rather than insertion.
    reloaded: usize,
}

fn panic_msg(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

impl Ann {
    pub fn new(params: &HnswParams, expected_rows: usize) -> Self {
        let hnsw = Hnsw::new(
            params.max_nb_connection,
            (expected_rows * params.vectors_per_image).max(1024),
            MAX_LAYER,
            params.ef_construction,
            DotDist,
        );
        Self {
            hnsw,
            per_image: params.vectors_per_image,
            rows: 0,
            reloaded: 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn info(&self) -> AnnInfo {
        AnnInfo {
            rows: self.rows,
            points: self.hnsw.get_nb_point(),
            vectors_per_image: self.per_image,
            reloaded_rows: self.reloaded,
        }
    }

    /// Inserts rows `self.rows..embeds.len() / (q*e)` (in parallel).
    pub fn catch_up(&mut self, embeds: &[f32], q: usize, e: usize) {
        let qe = q * e;
        let total = embeds.len() / qe;
        if total <= self.rows {
            return;
        }
        let m = self.per_image;
        let start = self.rows;
        // Bounded chunks keep the representatives' memory small when m == q.
        for chunk_start in (start..total).step_by(4096) {
            let chunk_end = (chunk_start + 4096).min(total);
            let reps: Vec<Vec<f32>> = (chunk_start..chunk_end)
                .into_par_iter()
                .map(|r| representatives(&embeds[r * qe..(r + 1) * qe], q, e, m))
                .collect();
            let items: Vec<(&[f32], usize)> = reps
                .iter()
                .enumerate()
                .flat_map(|(i, v)| {
                    v.chunks_exact(e)
                        .enumerate()
                        .map(move |(j, x)| (x, (chunk_start + i) * m + j))
                })
                .collect();
            self.hnsw.parallel_insert_slice(&items);
        }
        self.rows = total;
    }

    /// Candidate rows, best first: distinct rows that pass `keep` among the `ef` nearest graph
    /// points, at least `min_rows` of them when the graph has that many.
    pub fn candidates(
        &self,
        t: &[f32],
        ef: usize,
        min_rows: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<usize> {
        let m = self.per_image;
        let distinct = |found: Vec<hnsw_rs::prelude::Neighbour>| {
            let mut rows: Vec<usize> = Vec::with_capacity(found.len());
            for n in found {
                let r = n.d_id / m;
                // Points of one row are usually adjacent in the result; a linear scan of the
                // short list beats hashing.
                if keep(r) && !rows.contains(&r) {
                    rows.push(r);
                }
            }
            rows
        };
        // hnsw_rs's filtered search gives up its early exit, so filter afterwards and fall
        // back to the filtered search only when dead rows crowded out the live ones.
        let rows = distinct(self.hnsw.search(t, ef, ef));
        if rows.len() >= min_rows {
            return rows;
        }
        let filter = |id: &usize| keep(*id / m);
        distinct(self.hnsw.search_filter(t, ef, ef, Some(&filter)))
    }

    /// Dumps with hnsw_rs `file_dump` into `dir` and fsyncs; returns the basename used.
    pub fn dump(&self, dir: &Path, basename: &str) -> Result<String> {
        let res = catch_unwind(AssertUnwindSafe(|| self.hnsw.file_dump(dir, basename)));
        let name = match res {
            Ok(Ok(name)) => name,
            Ok(Err(e)) => return Err(Error::store(dir, format!("HNSW dump failed: {e}"))),
            Err(p) => {
                return Err(Error::store(
                    dir,
                    format!("HNSW dump failed: {}", panic_msg(p)),
                ))
            }
        };
        for ext in ["hnsw.graph", "hnsw.data"] {
            fsutil::fsync_file(&dir.join(format!("{name}.{ext}")))?;
        }
        Ok(name)
    }

    /// Reloads a dump made by [`Ann::dump`] holding `rows` rows.
    pub fn load(dir: &Path, basename: &str, params: &HnswParams, rows: usize) -> Result<Self> {
        // hnsw_rs ties the graph's lifetime to its loader (for its optional mmap mode, unused
        // here); leaking the small loader (a path and a few words) lets the store own the graph.
        let io: &'static HnswIo = Box::leak(Box::new(HnswIo::new(dir, basename)));
        let res = catch_unwind(AssertUnwindSafe(|| {
            io.load_hnsw_with_dist::<f32, DotDist>(DotDist)
        }));
        let mut hnsw = match res {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                return Err(Error::store(
                    dir,
                    format!("cannot reload HNSW {basename}: {e}"),
                ))
            }
            Err(p) => {
                return Err(Error::store(
                    dir,
                    format!("cannot reload HNSW {basename}: {}", panic_msg(p)),
                ))
            }
        };
        // hnsw_rs turns this on at reload; keep insertion after a reload as before it.
        hnsw.set_extend_candidates(false);
        let want = rows * params.vectors_per_image;
        if hnsw.get_nb_point() != want {
            return Err(Error::store(
                dir,
                format!(
                    "HNSW {basename} holds {} points, the manifest says {want}",
                    hnsw.get_nb_point()
                ),
            ));
        }
        Ok(Self {
            hnsw,
            per_image: params.vectors_per_image,
            rows,
            reloaded: rows,
        })
    }
}
