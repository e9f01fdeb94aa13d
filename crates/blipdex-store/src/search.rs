//! Exact max-sim search and the exact rescoring of ANN candidates.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use rayon::prelude::*;

use crate::kernels::max_sim;
use crate::state::State;
use crate::types::Hit;

/// Hit ordered so that "greater" means "ranks first": higher score, then lower image id (ties
/// broken deterministically so exact and ANN agree on equal scores).
#[derive(Clone, Copy, Debug)]
struct Ranked(Hit);

impl PartialEq for Ranked {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0
            .score
            .total_cmp(&o.0.score)
            .then_with(|| o.0.image_id.cmp(&self.0.image_id))
    }
}

/// The k best hits seen so far (a min-heap of the kept ones).
#[derive(Clone)]
pub(crate) struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Ranked>>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    #[inline]
    pub fn push(&mut self, h: Hit) {
        if self.k == 0 {
            return;
        }
        let r = Ranked(h);
        if self.heap.len() < self.k {
            self.heap.push(Reverse(r));
        } else if let Some(Reverse(worst)) = self.heap.peek() {
            if r > *worst {
                self.heap.pop();
                self.heap.push(Reverse(r));
            }
        }
    }

    pub fn merge(mut self, other: TopK) -> TopK {
        for Reverse(r) in other.heap {
            self.push(r.0);
        }
        self
    }

    pub fn into_sorted(self) -> Vec<Hit> {
        // into_sorted_vec is ascending in Reverse order, i.e. best first.
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(r)| r.0)
            .collect()
    }
}

fn hit(state: &State, row: usize, t: &[f32], buf: &mut Vec<f32>) -> Hit {
    let v = state.vectors(row);
    let (score, query) = v.max_sim(t, buf);
    Hit {
        image_id: state.row_image(row),
        score,
        query,
    }
}

/// Rows per parallel task: 64 rows of 32x256 f32 are 2 MiB, enough to amortize scheduling.
const ROW_CHUNK: usize = 64;

pub(crate) fn exact(state: &State, t: &[f32], k: usize) -> Vec<Hit> {
    let rows = state.rows();
    (0..rows.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .fold(
            || (TopK::new(k), Vec::new()),
            |(mut top, mut buf), c| {
                for r in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(rows) {
                    if state.is_live(r) {
                        top.push(hit(state, r, t, &mut buf));
                    }
                }
                (top, buf)
            },
        )
        .map(|(top, _)| top)
        .reduce(|| TopK::new(k), TopK::merge)
        .into_sorted()
}

/// Many queries at once: each row is streamed from memory once per block of queries, which
/// makes the scan compute-bound instead of memory-bound.
pub(crate) fn exact_batch(state: &State, ts: &[f32], k: usize) -> Vec<Vec<Hit>> {
    // Large enough that a benchmark's 1000 queries read the vectors a few times, not 30.
    const QBLOCK: usize = 256;
    let e = state.e;
    let nq = ts.len() / e;
    let rows = state.rows();
    let mut out = Vec::with_capacity(nq);
    for qb in (0..nq).step_by(QBLOCK) {
        let qn = QBLOCK.min(nq - qb);
        let block = &ts[qb * e..(qb + qn) * e];
        let tops = (0..rows.div_ceil(ROW_CHUNK))
            .into_par_iter()
            .fold(
                || (vec![TopK::new(k); qn], Vec::new()),
                |(mut tops, mut buf), c| {
                    for r in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(rows) {
                        if state.is_live(r) {
                            let id = state.row_image(r);
                            let v = state.vectors(r);
                            let v = v.as_f32(&mut buf);
                            for (i, t) in block.chunks_exact(e).enumerate() {
                                let (score, query) = max_sim(v, t);
                                tops[i].push(Hit {
                                    image_id: id,
                                    score,
                                    query,
                                });
                            }
                        }
                    }
                    (tops, buf)
                },
            )
            .map(|(tops, _)| tops)
            .reduce(
                || vec![TopK::new(k); qn],
                |a, b| a.into_iter().zip(b).map(|(x, y)| x.merge(y)).collect(),
            );
        out.extend(tops.into_iter().map(TopK::into_sorted));
    }
    out
}

/// Exact max-sim over candidate rows (already filtered to live ones).
pub(crate) fn rescore(state: &State, rows: &[u32], t: &[f32], k: usize) -> Vec<Hit> {
    let mut top = TopK::new(k);
    let mut buf = Vec::new();
    for &r in rows {
        top.push(hit(state, r as usize, t, &mut buf));
    }
    top.into_sorted()
}
