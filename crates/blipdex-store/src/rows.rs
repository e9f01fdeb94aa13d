//! Row files (`shard-<gen>.rows`): the memory-mapped twin of one Parquet shard.
//!
//! Parquet is the source of truth, but decoding it is what made start-up slow (every embedding
//! of every shard was decoded into RAM at open). A row file holds the same rows in fixed-width,
//! little-endian sections that a reader maps and indexes without decoding anything: opening an
//! index maps these files and reads only their `image_id` and `flags` sections. Row files are
//! derived: a writable open rebuilds a missing or damaged one from its shard.
//!
//! ```text
//! header (128 bytes)   magic "BLPXROWS", version, dtype (0 f32, 1 f16), Q, E, rows,
//!                      the offset of each section below, the file length; at byte 96 where
//!                      the vectors are (u32: 0 here, 1 in the shard), at 104 the shard's length
//! ids      [rows] u64  image_id
//! flags    [rows] u8   bit 0: deleted (as committed; patches override)
//! fixed    [rows] 64 B width u32, height u32, file_size u64, mtime i64, ingested_at i64,
//!                      content hash (32 bytes of BLAKE3)
//! str_off  [rows+1] u64, offsets into `strings`
//! strings  per row: path, paths, caption (u32 lengths, UTF-8 bytes), then the EXIF metadata:
//!          a byte (1: read; absent or 0: never read), a byte of which fields follow (bit 0
//!          taken_at i64, 1 offset i16, 2 make, 3 model, 4 latitude and longitude f64)
//! vectors  either [rows][Q][E] f32 or f16 in the store's dtype (the Parquet column's values),
//!          or [rows] u64: where each row's values start in the shard file itself
//! ```
//!
//! Shards written since version 2 store their embeddings PLAIN and uncompressed, so the vectors
//! are kept once, in the Parquet file, and read in place from its mapping through the offsets
//! (checked against the values when the row file is written, bounds-checked at open). Older
//! shards (zstd-compressed pages) keep a copy here; `blipdex index compact` rewrites them.
//! Sections start on 64-byte boundaries; vectors in a shard may be unaligned (see [`Vectors`]).

use std::fs::File;
use std::path::Path;

use blipdex_core::{Error, Result};
use memmap2::Mmap;

use crate::fsutil;
use crate::shard::{self, Layout};
use crate::types::{Dtype, ImageRow, PhotoMeta};

#[cfg(target_endian = "big")]
compile_error!("blipdex row and index files are little-endian and mapped in place");

const MAGIC: &[u8; 8] = b"BLPXROWS";
/// 2: vectors may live in the shard. Version 1 files (vectors always here) are still read.
const VERSION: u32 = 2;
const HEADER: usize = 128;
const FIXED: usize = 64;
pub(crate) const ALIGN: usize = 64;
/// Flag bit: the row was committed deleted.
const DELETED: u8 = 1;

pub(crate) fn align(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// The row file that belongs to a shard (`shard-X.parquet` -> `shard-X.rows`).
pub(crate) fn rows_name(shard: &str) -> String {
    let stem = shard.strip_suffix(".parquet").unwrap_or(shard);
    format!("{stem}.rows")
}

/// An image's values as the row file stores them (the mutable ones as committed).
pub(crate) struct RowFields {
    pub path: String,
    pub paths: Vec<String>,
    pub caption: Option<String>,
    pub meta: Option<PhotoMeta>,
}

fn hash_bytes(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

pub(crate) fn hash_hex(b: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for x in b {
        s.push(HEX[(x >> 4) as usize] as char);
        s.push(HEX[(x & 15) as usize] as char);
    }
    s
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

struct Offsets {
    ids: usize,
    flags: usize,
    fixed: usize,
    str_off: usize,
    strings: usize,
    strings_len: usize,
    vectors: usize,
    len: usize,
}

fn offsets(rows: usize, strings_len: usize, vec_bytes: usize) -> Offsets {
    let ids = HEADER;
    let flags = align(ids + rows * 8);
    let fixed = align(flags + rows);
    let str_off = align(fixed + rows * FIXED);
    let strings = align(str_off + (rows + 1) * 8);
    let vectors = align(strings + strings_len);
    Offsets {
        ids,
        flags,
        fixed,
        str_off,
        strings,
        strings_len,
        vectors,
        len: vectors + vec_bytes,
    }
}

/// Where a row file says its vectors are.
enum VectorsAt<'a> {
    /// In the row file: these values (rows * Q * E), stored in the store's dtype.
    Here(&'a [f32]),
    /// In the shard file (of this length), each row's values starting at its offset.
    InShard { offsets: &'a [u64], len: u64 },
}

/// Writes the row file of the shard `dir/shard`, just written or read back with these `rows`
/// and `embeds` (rows * Q * E values): pointing into the shard where it stores the values in
/// place, holding a copy otherwise.
pub(crate) fn write_for_shard(
    dir: &Path,
    shard: &str,
    layout: &Layout<'_>,
    rows: &[ImageRow],
    embeds: &[f32],
) -> Result<()> {
    let path = dir.join(shard);
    let found = match shard::embeds_offsets(&path, layout, rows.len())? {
        Some(offsets) => {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let map = fsutil::map(&file).map_err(|e| Error::io(&path, e))?;
            holds_values(&map, &offsets, layout.dtype, embeds).then(|| (offsets, map.len() as u64))
        }
        None => None,
    };
    let at = match &found {
        Some((offsets, len)) => VectorsAt::InShard { offsets, len: *len },
        None => VectorsAt::Here(embeds),
    };
    let (q, e) = (layout.num_query, layout.dim);
    write(dir, &rows_name(shard), layout.dtype, q, e, rows, at)
}

/// Whether `map` holds exactly `embeds` (in `dtype`) at the rows' `offsets`.
fn holds_values(map: &[u8], offsets: &[u64], dtype: Dtype, embeds: &[f32]) -> bool {
    if offsets.is_empty() {
        return embeds.is_empty();
    }
    let qe = embeds.len() / offsets.len();
    let row_bytes = qe * dtype.bytes();
    let mut halves = vec![half::f16::ZERO; if dtype == Dtype::F16 { qe } else { 0 }];
    offsets
        .iter()
        .zip(embeds.chunks_exact(qe))
        .all(|(&off, want)| {
            let Some(got) = usize::try_from(off)
                .ok()
                .and_then(|a| map.get(a..a.checked_add(row_bytes)?))
            else {
                return false;
            };
            match dtype {
                Dtype::F32 => got == bytemuck::cast_slice::<f32, u8>(want),
                Dtype::F16 => {
                    use half::slice::HalfFloatSliceExt;
                    halves.convert_from_f32_slice(want);
                    got == bytemuck::cast_slice::<half::f16, u8>(&halves)
                }
            }
        })
}

/// Writes `rows` and their vectors durably as `dir/name`.
fn write(
    dir: &Path,
    name: &str,
    dtype: Dtype,
    q: usize,
    e: usize,
    rows: &[ImageRow],
    at: VectorsAt<'_>,
) -> Result<()> {
    let mut strings = Vec::new();
    let mut str_off = Vec::with_capacity(rows.len() + 1);
    for r in rows {
        str_off.push(strings.len() as u64);
        put_str(&mut strings, &r.path);
        strings.extend_from_slice(&(r.paths.len() as u32).to_le_bytes());
        for p in &r.paths {
            put_str(&mut strings, p);
        }
        match &r.caption {
            Some(c) => {
                strings.push(1);
                put_str(&mut strings, c);
            }
            None => strings.push(0),
        }
        put_meta(&mut strings, r.meta.as_ref());
    }
    str_off.push(strings.len() as u64);
    let (in_shard, shard_len, vec_bytes) = match at {
        VectorsAt::Here(embeds) => {
            debug_assert_eq!(embeds.len(), rows.len() * q * e);
            (0u32, 0u64, embeds.len() * dtype.bytes())
        }
        VectorsAt::InShard { offsets, len } => {
            debug_assert_eq!(offsets.len(), rows.len());
            (1, len, offsets.len() * 8)
        }
    };
    let o = offsets(rows.len(), strings.len(), vec_bytes);
    let target = dir.join(name);
    fsutil::write_durable(dir, name, |f| {
        let mut w = fsutil::Sections::new(f, &target);
        let mut h = Vec::with_capacity(HEADER);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&(if dtype == Dtype::F16 { 1u32 } else { 0 }).to_le_bytes());
        h.extend_from_slice(&(q as u32).to_le_bytes());
        h.extend_from_slice(&(e as u32).to_le_bytes());
        for v in [
            rows.len(),
            o.ids,
            o.flags,
            o.fixed,
            o.str_off,
            o.strings,
            o.strings_len,
            o.vectors,
            o.len,
        ] {
            h.extend_from_slice(&(v as u64).to_le_bytes());
        }
        h.extend_from_slice(&in_shard.to_le_bytes());
        h.resize(104, 0);
        h.extend_from_slice(&shard_len.to_le_bytes());
        h.resize(HEADER, 0);
        w.put(&h)?;
        let ids: Vec<u64> = rows.iter().map(|r| r.image_id).collect();
        w.put(bytemuck::cast_slice(&ids))?;
        w.at(o.flags)?;
        let flags: Vec<u8> = rows
            .iter()
            .map(|r| if r.deleted { DELETED } else { 0 })
            .collect();
        w.put(&flags)?;
        w.at(o.fixed)?;
        for r in rows {
            let mut b = [0u8; FIXED];
            b[0..4].copy_from_slice(&r.width.to_le_bytes());
            b[4..8].copy_from_slice(&r.height.to_le_bytes());
            b[8..16].copy_from_slice(&r.file_size.to_le_bytes());
            b[16..24].copy_from_slice(&r.mtime_ns.to_le_bytes());
            b[24..32].copy_from_slice(&r.ingested_at_ns.to_le_bytes());
            b[32..64].copy_from_slice(&hash_bytes(&r.content_hash));
            w.put(&b)?;
        }
        w.at(o.str_off)?;
        w.put(bytemuck::cast_slice(&str_off))?;
        w.at(o.strings)?;
        w.put(&strings)?;
        w.at(o.vectors)?;
        match (at, dtype) {
            (VectorsAt::InShard { offsets, .. }, _) => w.put(bytemuck::cast_slice(offsets))?,
            (VectorsAt::Here(embeds), Dtype::F32) => {
                for c in embeds.chunks(1 << 16) {
                    w.put(bytemuck::cast_slice(c))?;
                }
            }
            (VectorsAt::Here(embeds), Dtype::F16) => {
                use half::slice::HalfFloatSliceExt;
                let mut buf = vec![half::f16::ZERO; 1 << 16];
                for c in embeds.chunks(1 << 16) {
                    let out = &mut buf[..c.len()];
                    out.convert_from_f32_slice(c);
                    w.put(bytemuck::cast_slice(out))?;
                }
            }
        }
        w.finish()
    })
}

const TAKEN: u8 = 1;
const OFFSET: u8 = 2;
const MAKE: u8 = 4;
const MODEL: u8 = 8;
const GPS: u8 = 16;

fn put_meta(buf: &mut Vec<u8>, meta: Option<&PhotoMeta>) {
    let Some(m) = meta else {
        buf.push(0);
        return;
    };
    buf.push(1);
    let gps = m.location();
    let mut bits = 0;
    for (on, bit) in [
        (m.taken_at.is_some(), TAKEN),
        (m.taken_offset_min.is_some(), OFFSET),
        (m.camera_make.is_some(), MAKE),
        (m.camera_model.is_some(), MODEL),
        (gps.is_some(), GPS),
    ] {
        if on {
            bits |= bit;
        }
    }
    buf.push(bits);
    if let Some(t) = m.taken_at {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    if let Some(o) = m.taken_offset_min {
        buf.extend_from_slice(&o.to_le_bytes());
    }
    for s in [&m.camera_make, &m.camera_model].into_iter().flatten() {
        put_str(buf, s);
    }
    if let Some((lat, lon)) = gps {
        buf.extend_from_slice(&lat.to_le_bytes());
        buf.extend_from_slice(&lon.to_le_bytes());
    }
}

/// The metadata record after the caption; `None` when the row has none (files written before
/// blipdex read EXIF end after the caption).
fn get_meta(c: &mut Cursor<'_>) -> Option<Option<PhotoMeta>> {
    if c.0.is_empty() {
        return Some(None);
    }
    if c.take(1)?[0] == 0 {
        return Some(None);
    }
    let bits = c.take(1)?[0];
    let has = |b: u8| bits & b != 0;
    let mut m = PhotoMeta::default();
    if has(TAKEN) {
        m.taken_at = Some(i64::from_le_bytes(c.take(8)?.try_into().ok()?));
    }
    if has(OFFSET) {
        m.taken_offset_min = Some(i16::from_le_bytes(c.take(2)?.try_into().ok()?));
    }
    if has(MAKE) {
        m.camera_make = Some(c.string()?);
    }
    if has(MODEL) {
        m.camera_model = Some(c.string()?);
    }
    if has(GPS) {
        m.gps_lat = Some(f64::from_le_bytes(c.take(8)?.try_into().ok()?));
        m.gps_lon = Some(f64::from_le_bytes(c.take(8)?.try_into().ok()?));
    }
    Some(Some(m))
}

/// Reads the length-prefixed records of the strings section.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (x, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(x)
    }

    fn u32(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize)
    }

    fn string(&mut self) -> Option<String> {
        let n = self.u32()?;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// One mapped row file.
pub(crate) struct RowsFile {
    pub name: String,
    dir: std::path::PathBuf,
    map: Mmap,
    /// The shard's mapping, where the vectors are read from there.
    shard: Option<Mmap>,
    rows: usize,
    dtype: Dtype,
    qe: usize,
    o: Offsets,
}

/// An image's Q*E values as stored (the store's dtype, little-endian). In a row file they are
/// aligned and read in place; in a shard they may not be, and are then copied a vector at a
/// time into the caller's buffer (L1-sized) before scoring.
#[derive(Clone, Copy)]
pub(crate) struct Vectors<'a> {
    bytes: &'a [u8],
    dtype: Dtype,
}

impl<'a> Vectors<'a> {
    pub(crate) fn new(bytes: &'a [u8], dtype: Dtype) -> Self {
        Self { bytes, dtype }
    }

    /// As f32: borrowed when stored as aligned f32, else copied or widened into `buf`.
    pub fn as_f32<'b>(&'b self, buf: &'b mut Vec<f32>) -> &'b [f32] {
        if self.dtype == Dtype::F32 {
            if let Ok(v) = bytemuck::try_cast_slice(self.bytes) {
                return v;
            }
        }
        buf.resize(self.bytes.len() / self.dtype.bytes(), 0.0);
        crate::kernels::widen(self.bytes, self.dtype, buf);
        buf
    }

    /// max over the Q vectors of dot(vector, t), with the arg-max: the ITC score. Vectors that
    /// are not aligned f32 are widened one at a time into `buf` (stays in L1), not all 32 first.
    pub fn max_sim(&self, t: &[f32], buf: &mut Vec<f32>) -> (f32, u16) {
        if self.dtype == Dtype::F32 {
            if let Ok(v) = bytemuck::try_cast_slice(self.bytes) {
                return crate::kernels::max_sim(v, t);
            }
        }
        crate::kernels::max_sim_widened(self.bytes, self.dtype, t, buf)
    }

    /// As f32: borrowed when stored as aligned f32, copied or widened otherwise.
    pub fn to_cow(self) -> std::borrow::Cow<'a, [f32]> {
        if self.dtype == Dtype::F32 {
            if let Ok(v) = bytemuck::try_cast_slice(self.bytes) {
                return std::borrow::Cow::Borrowed(v);
            }
        }
        std::borrow::Cow::Owned(self.to_vec())
    }

    pub fn to_vec(self) -> Vec<f32> {
        let mut buf = Vec::new();
        self.as_f32(&mut buf).to_vec()
    }
}

impl RowsFile {
    /// Maps the row file of `dir/shard` (and the shard, if the vectors are there) and checks it
    /// against what the manifest says it holds.
    pub fn open(
        dir: &Path,
        shard: &str,
        dtype: Dtype,
        q: usize,
        e: usize,
        rows: u64,
    ) -> Result<Self> {
        let name = &rows_name(shard);
        let path = dir.join(name);
        let bad = |r: String| Error::store(dir, format!("{name}: {r}"));
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let map = fsutil::map(&file).map_err(|e| Error::io(&path, e))?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad("not a blipdex row file (bad magic or truncated)".into()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(map[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(map[i..i + 8].try_into().unwrap_or_default());
        if !(1..=VERSION).contains(&u32_at(8)) {
            return Err(bad(format!(
                "row file version {}, this build reads 1 to {VERSION}",
                u32_at(8)
            )));
        }
        let in_shard = match u32_at(96) {
            0 => false,
            1 => true,
            x => return Err(bad(format!("unknown vectors location {x} (corrupt file)"))),
        };
        let file_dtype = if u32_at(12) == 1 {
            Dtype::F16
        } else {
            Dtype::F32
        };
        if file_dtype != dtype || u32_at(16) as usize != q || u32_at(20) as usize != e {
            return Err(bad(format!(
                "holds {}x{} {} vectors, the manifest says {q}x{e} {dtype}",
                u32_at(16),
                u32_at(20),
                file_dtype
            )));
        }
        let n = u64_at(24);
        if n != rows {
            return Err(bad(format!("holds {n} rows, the manifest says {rows}")));
        }
        let rows = rows as usize;
        let strings_len = u64_at(24 + 6 * 8) as usize;
        let row_bytes = q * e * dtype.bytes();
        let vec_bytes = if in_shard { rows * 8 } else { rows * row_bytes };
        let want = offsets(rows, strings_len, vec_bytes);
        let stored = [
            want.ids,
            want.flags,
            want.fixed,
            want.str_off,
            want.strings,
            want.strings_len,
            want.vectors,
            want.len,
        ];
        for (i, w) in stored.iter().enumerate() {
            if u64_at(32 + i * 8) != *w as u64 {
                return Err(bad("inconsistent section offsets (corrupt file)".into()));
            }
        }
        if map.len() != want.len {
            return Err(bad(format!(
                "is {} bytes, its header says {} (truncated or overwritten)",
                map.len(),
                want.len
            )));
        }
        let shard = if in_shard {
            let path = dir.join(shard);
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            let smap = fsutil::map(&file).map_err(|e| Error::io(&path, e))?;
            if smap.len() as u64 != u64_at(104) {
                return Err(bad(format!(
                    "points into {shard} as a file of {} bytes; it has {} (replaced or truncated)",
                    u64_at(104),
                    smap.len()
                )));
            }
            // Bounds-checked once here, so `vectors` can slice without checks failing later.
            let fits = (0..rows).all(|i| {
                let at = u64_at(want.vectors + i * 8);
                at.checked_add(row_bytes as u64)
                    .is_some_and(|end| end <= smap.len() as u64)
            });
            if !fits {
                return Err(bad(format!(
                    "vector offsets beyond the end of {shard} (corrupt file)"
                )));
            }
            Some(smap)
        } else {
            None
        };
        Ok(Self {
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            map,
            shard,
            rows,
            dtype,
            qe: q * e,
            o: want,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.map[at..at + 8].try_into().unwrap_or_default())
    }

    pub fn id(&self, i: usize) -> u64 {
        self.u64_at(self.o.ids + i * 8)
    }

    pub fn committed_deleted(&self, i: usize) -> bool {
        self.map[self.o.flags + i] & DELETED != 0
    }

    pub fn content_hash(&self, i: usize) -> [u8; 32] {
        let at = self.o.fixed + i * FIXED + 32;
        self.map[at..at + 32].try_into().unwrap_or_default()
    }

    fn bad(&self, r: &str) -> Error {
        Error::store(&self.dir, format!("{}: {r} (corrupt row file)", self.name))
    }

    /// The row's path, paths and caption as committed.
    pub fn fields(&self, i: usize) -> Result<RowFields> {
        let a = self.u64_at(self.o.str_off + i * 8) as usize;
        let b = self.u64_at(self.o.str_off + (i + 1) * 8) as usize;
        if a > b || b > self.o.strings_len {
            return Err(self.bad("string offsets out of range"));
        }
        let mut c = Cursor(&self.map[self.o.strings + a..self.o.strings + b]);
        let bad = || self.bad("string record overruns its row or is not UTF-8");
        let path = c.string().ok_or_else(bad)?;
        let n = c.u32().ok_or_else(bad)?;
        let mut paths = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            paths.push(c.string().ok_or_else(bad)?);
        }
        let caption = match c.take(1).ok_or_else(bad)?[0] {
            0 => None,
            _ => Some(c.string().ok_or_else(bad)?),
        };
        let meta = get_meta(&mut c).ok_or_else(bad)?;
        Ok(RowFields {
            path,
            paths,
            caption,
            meta,
        })
    }

    /// The whole row as committed.
    pub fn row(&self, i: usize) -> Result<ImageRow> {
        let f = self.fields(i)?;
        let at = self.o.fixed + i * FIXED;
        let m = &self.map[at..at + FIXED];
        let u32_at = |j: usize| u32::from_le_bytes(m[j..j + 4].try_into().unwrap_or_default());
        let u64_at = |j: usize| u64::from_le_bytes(m[j..j + 8].try_into().unwrap_or_default());
        Ok(ImageRow {
            image_id: self.id(i),
            path: f.path,
            paths: f.paths,
            content_hash: hash_hex(&self.content_hash(i)),
            width: u32_at(0),
            height: u32_at(4),
            file_size: u64_at(8),
            mtime_ns: u64_at(16) as i64,
            caption: f.caption,
            meta: f.meta,
            deleted: self.committed_deleted(i),
            ingested_at_ns: u64_at(24) as i64,
        })
    }

    pub fn vectors(&self, i: usize) -> Vectors<'_> {
        let n = self.qe * self.dtype.bytes();
        let bytes = match &self.shard {
            Some(shard) => {
                let at = self.u64_at(self.o.vectors + i * 8) as usize;
                &shard[at..at + n]
            }
            None => {
                let at = self.o.vectors + i * n;
                &self.map[at..at + n]
            }
        };
        Vectors::new(bytes, self.dtype)
    }

    /// Whether the vectors are read from the shard (else from this file).
    pub fn vectors_in_shard(&self) -> bool {
        self.shard.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_records_round_trip_and_old_rows_have_none() {
        let full = PhotoMeta {
            taken_at: Some(-86_400),
            taken_offset_min: Some(-330),
            camera_make: Some("Nikon".into()),
            camera_model: Some(String::new()),
            gps_lat: Some(-33.86),
            gps_lon: Some(151.2),
        };
        for meta in [None, Some(PhotoMeta::default()), Some(full)] {
            let mut buf = Vec::new();
            put_meta(&mut buf, meta.as_ref());
            let mut c = Cursor(&buf);
            assert_eq!(get_meta(&mut c), Some(meta));
            assert!(c.0.is_empty());
        }
        // A row written before metadata ends after its caption.
        assert_eq!(get_meta(&mut Cursor(&[])), Some(None));
        // A truncated record is corrupt, not "no metadata".
        let mut buf = Vec::new();
        put_meta(
            &mut buf,
            Some(&PhotoMeta {
                taken_at: Some(1),
                ..Default::default()
            }),
        );
        assert_eq!(get_meta(&mut Cursor(&buf[..buf.len() - 1])), None);
    }
}
