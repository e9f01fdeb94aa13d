//! The ANN index: an inverted file (IVF) over per-image representative vectors, with hnsw_rs as
//! its coarse quantizer.
//!
//! Every row contributes `m` representatives (k-means centroids of its Q query vectors, see
//! [`representatives`]). Each representative is assigned to the nearest of `nlist` list
//! centroids and stored, int8-quantized with one f32 scale, in that list. A query probes the
//! `nprobe` lists whose centroids are nearest to the text embedding (hnsw_rs over the
//! centroids), scores every live entry there with an integer dot product, and hands the best
//! distinct rows to the caller, who rescores them exactly on the row files.
//!
//! Entries live in immutable segment files, each covering a contiguous range of rows: a commit
//! writes one segment for its own rows (cost O(rows committed)), and segments of one size
//! class are merged eight at a time (each entry is rewritten O(log8 N) times, a plain copy).
//! The centroids are trained on a sample of the index and retrained when it has grown fourfold,
//! which rebuilds the entries of every row: amortized, fewer than 1.4 rebuilds per row.
//!
//! ```text
//! ivf-<gen>.centroids  magic "BLPXCENT", version, E, nlist; [nlist][E] f32
//! ivf-<gen>-<i>.seg    magic "BLPXIVFS", version, E, nlist, centroids generation, row range,
//!                      entries; offsets [nlist+1] u64; rows [n] u32; scales [n] f32;
//!                      codes [n][E] i8 (entries grouped by list)
//! ```

use std::fs::File;
use std::io::Write;
use std::path::Path;

use blipdex_core::{Error, Result};
use hnsw_rs::prelude::{Distance, Hnsw};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::kernels::{dot, dot_dispatch, normalize, quantize_i8, scan_i8, with_avx2};
use crate::rows::align;
use crate::types::HnswParams;

/// hnsw_rs keeps at most this many layers.
const MAX_LAYER: usize = 16;
/// Above this many lists the centroids are searched with hnsw_rs; below, a brute-force scan
/// (AVX2) is faster: at 2048 lists hnsw_rs with a beam of 64 visits nearly every point of so
/// small a graph, and took about 13× the scan's time per query.
pub(crate) const GRAPH_MIN_LISTS: usize = 8192;
/// Segments of one size class merged at once; bounds the segments a query visits.
pub(crate) const MERGE_FANOUT: usize = 8;
/// Centroids are retrained when the index holds this many times the rows they were trained on.
pub(crate) const RETRAIN_GROWTH: u64 = 4;
/// Lloyd iterations when training the centroids.
const TRAIN_ITERS: usize = 4;
/// Training sample: this many representatives per list, at most `MAX_SAMPLE`.
pub(crate) const SAMPLE_PER_LIST: usize = 32;
pub(crate) const MAX_SAMPLE: usize = 1 << 17;
/// Vectors assigned to lists together (a cache block of the brute-force assignment).
const ASSIGN_BATCH: usize = 64;

/// hnsw_rs beam when assigning a vector to its list (the nearest centroid): approximate
/// assignment costs a little list quality, not correctness (every entry is still scored).
const ASSIGN_EF: usize = 24;
/// Smallest hnsw_rs beam when probing for a query.
const PROBE_EF: usize = 64;
/// A query probes at least as many lists as hold this many entries on average (a fraction of a
/// millisecond of scanning), so small indexes are searched exhaustively whatever `nprobe` says.
const MIN_SCAN_ENTRIES: usize = 8192;
/// Rows per segment when all entries are rebuilt (bounds the writer's memory while it does).
pub(crate) const REBUILD_CHUNK_ROWS: usize = 1 << 18;

const CENT_MAGIC: &[u8; 8] = b"BLPXCENT";
const SEG_MAGIC: &[u8; 8] = b"BLPXIVFS";
const VERSION: u32 = 1;
const HEADER: usize = 128;

/// `1 - dot(a, b)` on unit vectors. Ours rather than anndists' `DistDot`, whose scalar path
/// asserts `dot <= 1` (rounding breaks that on unit vectors) and does not vectorize.
#[derive(Debug, Default, Clone, Copy)]
pub struct DotDist;

impl Distance<f32> for DotDist {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        // hnsw_rs asserts distances >= 0; identical unit vectors round to -1e-7.
        (1.0 - dot_dispatch(va, vb)).max(0.0)
    }
}

/// The `m` vectors that stand for an image's `q` query vectors in the index: all of them when
/// m == q, their normalized mean when m == 1, else normalized k-means centroids (deterministic:
/// farthest-point seeding from vector 0, a few Lloyd steps on cosine).
pub(crate) fn representatives(vectors: &[f32], q: usize, e: usize, m: usize) -> Vec<f32> {
    with_avx2(|| representatives_generic(vectors, q, e, m))
}

#[inline(always)]
fn representatives_generic(vectors: &[f32], q: usize, e: usize, m: usize) -> Vec<f32> {
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
        lloyd_update((0..q).map(row), &assign, &mut centres, e);
    }
    centres
}

/// The update step of spherical k-means: each centre becomes the normalized sum of the vectors
/// assigned to it (in order); a centre nothing was assigned to keeps its place.
#[inline(always)]
fn lloyd_update<'a>(
    vectors: impl Iterator<Item = &'a [f32]>,
    assign: &[usize],
    centres: &mut [f32],
    e: usize,
) {
    let k = centres.len() / e;
    let mut sums = vec![0f32; k * e];
    let mut counts = vec![0usize; k];
    for (v, &a) in vectors.zip(assign) {
        counts[a] += 1;
        for (s, x) in sums[a * e..(a + 1) * e].iter_mut().zip(v) {
            *s += x;
        }
    }
    for c in 0..k {
        if counts[c] > 0 {
            let s = &mut sums[c * e..(c + 1) * e];
            normalize(s);
            centres[c * e..(c + 1) * e].copy_from_slice(s);
        }
    }
}

/// How many lists for an index of `reps` representatives: about 2 sqrt(reps), so that a list
/// holds about sqrt(reps) / 2 entries (4M representatives: ~4000 lists of ~1000).
pub(crate) fn nlist_for(reps: u64) -> usize {
    ((2.0 * (reps as f64).sqrt()).round() as usize).clamp(1, 1 << 16)
}

/// The coarse quantizer: the list centroids, searched with hnsw_rs when there are many.
pub(crate) struct Coarse {
    e: usize,
    centroids: Vec<f32>,
    graph: Option<Hnsw<'static, f32, DotDist>>,
}

impl Coarse {
    pub fn new(centroids: Vec<f32>, e: usize, params: &HnswParams) -> Self {
        Self::with_graph_above(centroids, e, params, GRAPH_MIN_LISTS)
    }

    /// As [`Coarse::new`], with the graph used above `graph_min` lists (tests use small ones).
    pub fn with_graph_above(
        centroids: Vec<f32>,
        e: usize,
        params: &HnswParams,
        graph_min: usize,
    ) -> Self {
        let nlist = centroids.len() / e;
        let graph = (nlist > graph_min).then(|| {
            let g = Hnsw::new(
                params.max_nb_connection,
                nlist,
                MAX_LAYER,
                params.ef_construction,
                DotDist,
            );
            let items: Vec<(&[f32], usize)> = centroids.chunks_exact(e).zip(0..).collect();
            g.parallel_insert_slice(&items);
            g
        });
        Self {
            e,
            centroids,
            graph,
        }
    }

    pub fn nlist(&self) -> usize {
        self.centroids.len() / self.e
    }

    fn brute(&self, t: &[f32], n: usize) -> Vec<usize> {
        let mut s: Vec<(f32, usize)> = with_avx2(|| {
            self.centroids
                .chunks_exact(self.e)
                .map(|c| dot(c, t))
                .zip(0..)
                .collect()
        });
        let n = n.min(s.len());
        if n < s.len() {
            s.select_nth_unstable_by(n, |a, b| b.0.total_cmp(&a.0));
            s.truncate(n);
        }
        s.sort_by(|a, b| b.0.total_cmp(&a.0));
        s.into_iter().map(|x| x.1).collect()
    }

    fn search(&self, t: &[f32], n: usize, ef: usize) -> Vec<usize> {
        match &self.graph {
            Some(g) => g.search(t, n, ef).into_iter().map(|x| x.d_id).collect(),
            None => self.brute(t, n),
        }
    }

    /// The `n` lists nearest to `t`, nearest first (approximate when the graph is used).
    pub fn probe(&self, t: &[f32], n: usize) -> Vec<usize> {
        self.search(t, n, (2 * n).max(PROBE_EF))
    }

    /// The list each vector of `vs` (n x E) belongs to (approximate when the graph is used).
    pub fn nearest(&self, vs: &[f32]) -> Vec<u32> {
        match &self.graph {
            Some(_) => vs
                .chunks_exact(self.e)
                .map(|v| {
                    self.search(v, 1, ASSIGN_EF)
                        .first()
                        .map_or(0, |&l| l as u32)
                })
                .collect(),
            None => crate::kernels::nearest_rows(&self.centroids, vs, self.e),
        }
    }
}

/// Trains `nlist` unit centroids on `samples` (n x E): spherical k-means, seeded with evenly
/// spaced samples (deterministic), assignments through [`Coarse`].
pub(crate) fn train(samples: &[f32], e: usize, nlist: usize, params: &HnswParams) -> Vec<f32> {
    let n = samples.len() / e;
    let nlist = nlist.clamp(1, n.max(1));
    let mut centroids: Vec<f32> = (0..nlist)
        .flat_map(|i| {
            samples[(i * n / nlist) * e..(i * n / nlist + 1) * e]
                .iter()
                .copied()
        })
        .collect();
    for _ in 0..TRAIN_ITERS {
        let coarse = Coarse::new(centroids.clone(), e, params);
        let assign: Vec<usize> = samples
            .par_chunks(ASSIGN_BATCH * e)
            .flat_map_iter(|vs| coarse.nearest(vs).into_iter().map(|l| l as usize))
            .collect();
        lloyd_update(samples.chunks_exact(e), &assign, &mut centroids, e);
    }
    centroids
}

fn header(magic: &[u8; 8], fields: &[u64]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(magic);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    for f in fields {
        h.extend_from_slice(&f.to_le_bytes());
    }
    h.resize(HEADER, 0);
    h
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default())
}

pub(crate) fn write_centroids(dir: &Path, name: &str, e: usize, centroids: &[f32]) -> Result<()> {
    let nlist = centroids.len() / e;
    let mut bytes = header(CENT_MAGIC, &[e as u64, nlist as u64]);
    bytes.extend_from_slice(bytemuck::cast_slice(centroids));
    let target = dir.join(name);
    fsutil::write_durable(dir, name, |f| {
        f.write_all(&bytes)
            .map_err(|e| fsutil::write_err(&target, e))
    })
}

pub(crate) fn read_centroids(dir: &Path, name: &str, e: usize, nlist: usize) -> Result<Vec<f32>> {
    let path = dir.join(name);
    let b = std::fs::read(&path).map_err(|err| Error::io(&path, err))?;
    let bad = |r: &str| Error::store(dir, format!("{name}: {r}"));
    if b.len() < HEADER || &b[..8] != CENT_MAGIC {
        return Err(bad("not a blipdex centroid file (bad magic or truncated)"));
    }
    if u64_at(&b, 16) != e as u64 || u64_at(&b, 24) != nlist as u64 {
        return Err(bad("holds other dimensions than the manifest says"));
    }
    if b.len() != HEADER + nlist * e * 4 {
        return Err(bad("truncated or overwritten"));
    }
    let c: Vec<f32> = b[HEADER..]
        .chunks_exact(4)
        .map(|x| f32::from_le_bytes(x.try_into().unwrap_or_default()))
        .collect();
    if c.iter().any(|x| !x.is_finite()) {
        return Err(bad("holds non-finite values"));
    }
    Ok(c)
}

/// Index entries in memory: one per representative, not yet grouped by list.
#[derive(Default)]
pub(crate) struct Entries {
    pub lists: Vec<u32>,
    pub rows: Vec<u32>,
    pub scales: Vec<f32>,
    pub codes: Vec<i8>,
}

impl Entries {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn append(&mut self, o: Entries) {
        self.extend(o);
    }

    fn extend(&mut self, o: Entries) {
        self.lists.extend(o.lists);
        self.rows.extend(o.rows);
        self.scales.extend(o.scales);
        self.codes.extend(o.codes);
    }
}

/// Row r's Q*E vectors as f32: borrowed where they are stored so, else widened.
pub(crate) type RowVectors<'v> = dyn Fn(usize) -> std::borrow::Cow<'v, [f32]> + Sync + 'v;

/// The entries of rows `rows` (their representatives, assigned and quantized); `vectors(r)`
/// gives row r's Q*E f32 vectors.
pub(crate) fn entries_for<'v>(
    rows: std::ops::Range<usize>,
    q: usize,
    e: usize,
    m: usize,
    coarse: &Coarse,
    vectors: &RowVectors<'v>,
) -> Entries {
    // Rows in small groups, so that their representatives are assigned to lists together.
    let per_task = ASSIGN_BATCH.div_ceil(m.clamp(1, q)).max(1);
    let (start, end) = (rows.start, rows.end);
    (0..(end - start).div_ceil(per_task))
        .into_par_iter()
        .fold(Entries::default, |mut acc, t| {
            let group = start + t * per_task..(start + (t + 1) * per_task).min(end);
            let mut reps = Vec::new();
            let mut owners = Vec::new();
            for r in group {
                let rv = representatives(&vectors(r), q, e, m);
                owners.extend(std::iter::repeat_n(r as u32, rv.len() / e));
                reps.extend(rv);
            }
            let lists = coarse.nearest(&reps);
            for ((rep, list), r) in reps.chunks_exact(e).zip(lists).zip(owners) {
                let mut code = vec![0i8; e];
                acc.scales.push(quantize_i8(rep, &mut code));
                acc.lists.push(list);
                acc.rows.push(r);
                acc.codes.extend(code);
            }
            acc
        })
        .reduce(Entries::default, |mut a, b| {
            a.extend(b);
            a
        })
}

/// One segment as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SegmentRef {
    pub file: String,
    /// Rows `row_start..row_end` (replay order) have their entries here.
    pub row_start: u64,
    pub row_end: u64,
    pub entries: u64,
}

/// The IVF state the manifest records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IvfRef {
    pub centroids: String,
    /// Generation that trained the centroids; every segment names it.
    pub centroids_generation: u64,
    pub nlist: usize,
    /// Rows the index held when the centroids were trained.
    pub trained_rows: u64,
    pub segments: Vec<SegmentRef>,
}

impl IvfRef {
    pub fn files(&self) -> Vec<String> {
        std::iter::once(self.centroids.clone())
            .chain(self.segments.iter().map(|s| s.file.clone()))
            .collect()
    }
}

struct SegOffsets {
    lists: usize,
    rows: usize,
    scales: usize,
    codes: usize,
    len: usize,
}

fn seg_offsets(nlist: usize, n: usize, e: usize) -> SegOffsets {
    let lists = HEADER;
    let rows = align(lists + (nlist + 1) * 8);
    let scales = align(rows + n * 4);
    let codes = align(scales + n * 4);
    SegOffsets {
        lists,
        rows,
        scales,
        codes,
        len: codes + n * e,
    }
}

/// Writes `entries` grouped by list as segment `dir/name`; returns its manifest record.
pub(crate) fn write_segment(
    dir: &Path,
    name: &str,
    e: usize,
    nlist: usize,
    centroids_generation: u64,
    row_range: (u64, u64),
    entries: &Entries,
) -> Result<SegmentRef> {
    let n = entries.len();
    // Counting sort by list; within a list, by row (stable), so scans walk rows in order.
    let mut counts = vec![0u64; nlist + 1];
    for &l in &entries.lists {
        counts[l as usize + 1] += 1;
    }
    for i in 1..=nlist {
        counts[i] += counts[i - 1];
    }
    let mut order = vec![0usize; n];
    let mut next = counts.clone();
    let mut by_row: Vec<usize> = (0..n).collect();
    by_row.sort_by_key(|&i| entries.rows[i]);
    for i in by_row {
        let l = entries.lists[i] as usize;
        order[next[l] as usize] = i;
        next[l] += 1;
    }
    let o = seg_offsets(nlist, n, e);
    let target = dir.join(name);
    fsutil::write_durable(dir, name, |f| {
        let mut w = fsutil::Sections::new(f, &target);
        w.put(&header(
            SEG_MAGIC,
            &[
                e as u64,
                nlist as u64,
                centroids_generation,
                row_range.0,
                row_range.1,
                n as u64,
            ],
        ))?;
        w.put(bytemuck::cast_slice(&counts))?;
        w.at(o.rows)?;
        let rows: Vec<u32> = order.iter().map(|&i| entries.rows[i]).collect();
        w.put(bytemuck::cast_slice(&rows))?;
        w.at(o.scales)?;
        let scales: Vec<f32> = order.iter().map(|&i| entries.scales[i]).collect();
        w.put(bytemuck::cast_slice(&scales))?;
        w.at(o.codes)?;
        for &i in &order {
            w.put(bytemuck::cast_slice(&entries.codes[i * e..(i + 1) * e]))?;
        }
        w.finish()
    })?;
    Ok(SegmentRef {
        file: name.to_owned(),
        row_start: row_range.0,
        row_end: row_range.1,
        entries: n as u64,
    })
}

/// One mapped segment.
pub(crate) struct Segment {
    map: Mmap,
    nlist: usize,
    e: usize,
    o: SegOffsets,
}

impl Segment {
    pub fn open(dir: &Path, r: &SegmentRef, e: usize, ivf: &IvfRef) -> Result<Self> {
        let path = dir.join(&r.file);
        let bad = |why: &str| Error::store(dir, format!("{}: {why}", r.file));
        let file = File::open(&path).map_err(|err| Error::io(&path, err))?;
        let map = fsutil::map(&file).map_err(|err| Error::io(&path, err))?;
        if map.len() < HEADER || &map[..8] != SEG_MAGIC {
            return Err(bad("not a blipdex index segment (bad magic or truncated)"));
        }
        let fields: Vec<u64> = (0..6).map(|i| u64_at(&map, 16 + i * 8)).collect();
        if fields
            != [
                e as u64,
                ivf.nlist as u64,
                ivf.centroids_generation,
                r.row_start,
                r.row_end,
                r.entries,
            ]
        {
            return Err(bad("its header does not match the manifest"));
        }
        let n = r.entries as usize;
        let o = seg_offsets(ivf.nlist, n, e);
        if map.len() != o.len {
            return Err(bad("truncated or overwritten"));
        }
        let s = Self {
            map,
            nlist: ivf.nlist,
            e,
            o,
        };
        let offs = s.offsets();
        if offs[0] != 0 || offs[ivf.nlist] != n as u64 || offs.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad("corrupt list offsets"));
        }
        Ok(s)
    }

    fn offsets(&self) -> &[u64] {
        bytemuck::cast_slice(&self.map[self.o.lists..self.o.lists + (self.nlist + 1) * 8])
    }

    fn rows(&self) -> &[u32] {
        bytemuck::cast_slice(&self.map[self.o.rows..self.o.rows + self.n() * 4])
    }

    fn n(&self) -> usize {
        self.offsets()[self.nlist] as usize
    }

    fn scales(&self) -> &[f32] {
        bytemuck::cast_slice(&self.map[self.o.scales..self.o.scales + self.n() * 4])
    }

    fn codes(&self) -> &[i8] {
        bytemuck::cast_slice(&self.map[self.o.codes..self.o.codes + self.n() * self.e])
    }

    /// Scores list `l`'s entries against the quantized query; pushes (approx score, row).
    fn scan(
        &self,
        l: usize,
        tq: &[i8],
        tscale: f32,
        keep: &dyn Fn(usize) -> bool,
        out: &mut Vec<(f32, u32)>,
    ) {
        let offs = self.offsets();
        let (a, b) = (offs[l] as usize, offs[l + 1] as usize);
        scan_i8(
            &self.codes()[a * self.e..b * self.e],
            &self.scales()[a..b],
            &self.rows()[a..b],
            tq,
            tscale,
            keep,
            out,
        );
    }

    /// Every entry, for merging.
    fn entries(&self) -> Entries {
        let offs = self.offsets();
        let mut lists = Vec::with_capacity(self.n());
        for l in 0..self.nlist {
            lists.extend(std::iter::repeat_n(
                l as u32,
                (offs[l + 1] - offs[l]) as usize,
            ));
        }
        Entries {
            lists,
            rows: self.rows().to_vec(),
            scales: self.scales().to_vec(),
            codes: self.codes().to_vec(),
        }
    }
}

/// Every segment's entries, concatenated (for a merge).
pub(crate) fn merged_entries(segments: &[&Segment]) -> Entries {
    let mut out = Entries::default();
    for s in segments {
        out.extend(s.entries());
    }
    out
}

/// The size class of a segment: segments of one class are merged together.
pub(crate) fn level(entries: u64) -> u32 {
    let mut l = 0;
    let mut x = entries.max(1);
    while x >= MERGE_FANOUT as u64 {
        x /= MERGE_FANOUT as u64;
        l += 1;
    }
    l
}

/// How many trailing segments to merge now (0 = none): `MERGE_FANOUT` of the newest size class.
pub(crate) fn merge_tail(segments: &[SegmentRef]) -> usize {
    let Some(last) = segments.last() else {
        return 0;
    };
    let lv = level(last.entries);
    let same = segments
        .iter()
        .rev()
        .take_while(|s| level(s.entries) == lv)
        .count();
    if same >= MERGE_FANOUT {
        same
    } else {
        0
    }
}

/// The open IVF: coarse quantizer plus mapped segments.
pub(crate) struct Ivf {
    pub coarse: Coarse,
    pub segments: Vec<Segment>,
    /// The manifest records of `segments`, in the same order.
    pub refs: Vec<SegmentRef>,
    pub centroids_generation: u64,
}

impl Ivf {
    /// Distinct rows passing `keep`, best approximate score first: the best `want` of them
    /// among the entries of the `nprobe` lists nearest to `t`.
    pub fn candidates(
        &self,
        t: &[f32],
        nprobe: usize,
        want: usize,
        keep: &dyn Fn(usize) -> bool,
    ) -> Vec<u32> {
        let e = t.len();
        let mut tq = vec![0i8; e];
        let tscale = quantize_i8(t, &mut tq);
        let nlist = self.coarse.nlist().max(1);
        let per_list = (self.entries() / nlist).max(1);
        let nprobe = nprobe
            .max(MIN_SCAN_ENTRIES.div_ceil(per_list))
            .clamp(1, nlist);
        let lists = self.coarse.probe(t, nprobe);
        let mut found: Vec<(f32, u32)> = Vec::new();
        for s in &self.segments {
            for &l in &lists {
                if l < s.nlist {
                    s.scan(l, &tq, tscale, keep, &mut found);
                }
            }
        }
        // A row has up to m entries: keep enough for `want` distinct rows, then dedup.
        let cut = want.saturating_mul(4).max(want);
        if found.len() > cut {
            found.select_nth_unstable_by(cut, |a, b| b.0.total_cmp(&a.0));
            found.truncate(cut);
        }
        found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut rows: Vec<u32> = Vec::with_capacity(want);
        let mut seen = std::collections::HashSet::with_capacity(want * 2);
        for (_, r) in found {
            if seen.insert(r) {
                rows.push(r);
                if rows.len() == want {
                    break;
                }
            }
        }
        rows
    }

    pub fn entries(&self) -> usize {
        self.segments.iter().map(Segment::n).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hnsw_rs coarse quantizer finds what the brute-force scan finds.
    #[test]
    fn graph_probe_agrees_with_brute_force() {
        let e = 32;
        let n = 600;
        let mut rng = 12345u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let mut c: Vec<f32> = (0..n * e).map(|_| next()).collect();
        for v in c.chunks_exact_mut(e) {
            normalize(v);
        }
        let p = HnswParams::default();
        let graph = Coarse::with_graph_above(c.clone(), e, &p, 100);
        let brute = Coarse::with_graph_above(c.clone(), e, &p, n);
        assert!(graph.graph.is_some() && brute.graph.is_none());
        let (mut top1, mut overlap) = (0, 0);
        for _ in 0..100 {
            let mut t: Vec<f32> = (0..e).map(|_| next()).collect();
            normalize(&mut t);
            let (g, b) = (graph.probe(&t, 16), brute.probe(&t, 16));
            top1 += usize::from(g[0] == b[0]);
            overlap += g.iter().filter(|x| b.contains(x)).count();
        }
        assert!(top1 >= 95, "top-1 agreement {top1}/100");
        assert!(overlap >= 1500, "top-16 overlap {overlap}/1600");
    }
}
