//! The committed state: the replay of every shard (through its mapped row file) and patch file
//! in commit order. Row `r` is the r-th row over all shards in replay order (superseded rows
//! included); the IVF entries and the live bitmap are indexed by it.
//!
//! What stays in RAM is small and fixed per image: the image-id -> row map (4 bytes per id),
//! one live bit per row, the patched fields of images changed since their row was written, and,
//! once a writer asks for them, the path and content-hash lookups. Rows, strings and vectors are
//! read from the mapped row files on demand.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use blipdex_core::{Error, Result};

use crate::rows::{RowsFile, Vectors};
use crate::shard::Patch;
use crate::types::{ImageRow, PhotoMeta};

const NO_ROW: u32 = u32::MAX;

/// An image's mutable fields as the latest patch left them.
struct Mutable {
    path: String,
    paths: Vec<String>,
    caption: Option<String>,
    meta: Option<PhotoMeta>,
    deleted: bool,
}

/// Live images by content hash and by path (built on first use: readers rarely need them).
#[derive(Default)]
struct Lookups {
    by_hash: HashMap<[u8; 32], u64>,
    by_path: HashMap<String, u64>,
}

pub(crate) struct State {
    dir: PathBuf,
    pub q: usize,
    pub e: usize,
    files: Vec<RowsFile>,
    /// First row of each file, then the total.
    starts: Vec<usize>,
    /// Image id -> its current row (`NO_ROW`: never committed).
    id_row: Vec<u32>,
    overlay: HashMap<u64, Mutable>,
    live_bits: Vec<u64>,
    pub live: usize,
    lookups: OnceLock<Lookups>,
    /// Every live image's id and EXIF metadata (built on the first filtered search; a
    /// change drops it).
    photos: OnceLock<Vec<(u64, Option<PhotoMeta>)>>,
}

pub(crate) fn hash_key(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl State {
    pub fn new(dir: &Path, q: usize, e: usize) -> Self {
        Self {
            dir: dir.to_path_buf(),
            q,
            e,
            files: Vec::new(),
            starts: vec![0],
            id_row: Vec::new(),
            overlay: HashMap::new(),
            live_bits: Vec::new(),
            live: 0,
            lookups: OnceLock::new(),
            photos: OnceLock::new(),
        }
    }

    pub fn rows(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    fn locate(&self, row: usize) -> (&RowsFile, usize) {
        let f = self.starts.partition_point(|&s| s <= row) - 1;
        (&self.files[f], row - self.starts[f])
    }

    pub fn row_image(&self, row: usize) -> u64 {
        let (f, i) = self.locate(row);
        f.id(i)
    }

    /// Row files that hold a copy of their shard's vectors (shards from before format 2.1).
    pub fn files_with_vector_copies(&self) -> usize {
        self.files.iter().filter(|f| !f.vectors_in_shard()).count()
    }

    pub fn vectors(&self, row: usize) -> Vectors<'_> {
        let (f, i) = self.locate(row);
        f.vectors(i)
    }

    pub fn is_live(&self, row: usize) -> bool {
        self.live_bits
            .get(row / 64)
            .is_some_and(|w| w >> (row % 64) & 1 == 1)
    }

    fn set_live(&mut self, row: usize, on: bool) {
        let w = &mut self.live_bits[row / 64];
        if on {
            *w |= 1 << (row % 64);
        } else {
            *w &= !(1 << (row % 64));
        }
    }

    pub fn current_row(&self, id: u64) -> Option<usize> {
        match self.id_row.get(usize::try_from(id).ok()?) {
            Some(&r) if r != NO_ROW => Some(r as usize),
            _ => None,
        }
    }

    fn deleted(&self, id: u64, row: usize) -> bool {
        match self.overlay.get(&id) {
            Some(m) => m.deleted,
            None => {
                let (f, i) = self.locate(row);
                f.committed_deleted(i)
            }
        }
    }

    /// An image's current metadata, deleted images included.
    pub fn meta(&self, id: u64) -> Result<Option<ImageRow>> {
        let Some(row) = self.current_row(id) else {
            return Ok(None);
        };
        let (f, i) = self.locate(row);
        let mut m = f.row(i)?;
        if let Some(o) = self.overlay.get(&id) {
            m.path.clone_from(&o.path);
            m.paths.clone_from(&o.paths);
            m.caption.clone_from(&o.caption);
            m.meta.clone_from(&o.meta);
            m.deleted = o.deleted;
        }
        Ok(Some(m))
    }

    fn paths_of(&self, id: u64, row: usize) -> Result<Vec<String>> {
        match self.overlay.get(&id) {
            Some(m) => Ok(m.paths.clone()),
            None => {
                let (f, i) = self.locate(row);
                Ok(f.fields(i)?.paths)
            }
        }
    }

    fn hash_of(&self, row: usize) -> [u8; 32] {
        let (f, i) = self.locate(row);
        f.content_hash(i)
    }

    /// Takes a live image out of the live set (bit, count, lookups).
    fn unindex(&mut self, id: u64) -> Result<()> {
        let Some(row) = self.current_row(id) else {
            return Ok(());
        };
        if !self.is_live(row) {
            return Ok(());
        }
        self.set_live(row, false);
        self.live -= 1;
        if self.lookups.get().is_some() {
            let hash = self.hash_of(row);
            let paths = self.paths_of(id, row)?;
            if let Some(l) = self.lookups.get_mut() {
                if l.by_hash.get(&hash) == Some(&id) {
                    l.by_hash.remove(&hash);
                }
                for p in &paths {
                    if l.by_path.get(p) == Some(&id) {
                        l.by_path.remove(p);
                    }
                }
            }
        }
        Ok(())
    }

    fn index(&mut self, id: u64) -> Result<()> {
        let Some(row) = self.current_row(id) else {
            return Ok(());
        };
        if self.deleted(id, row) {
            return Ok(());
        }
        self.set_live(row, true);
        self.live += 1;
        if self.lookups.get().is_some() {
            let hash = self.hash_of(row);
            let paths = self.paths_of(id, row)?;
            if let Some(l) = self.lookups.get_mut() {
                l.by_hash.insert(hash, id);
                for p in paths {
                    l.by_path.insert(p, id);
                }
            }
        }
        Ok(())
    }

    /// Appends a mapped row file: each row becomes its image's current row (superseding any
    /// earlier one, and any patch of it), with the fields it was committed with.
    pub fn push_file(&mut self, file: RowsFile, next_image_id: u64) -> Result<()> {
        self.photos = OnceLock::new();
        let base = self.rows();
        let total = base + file.rows();
        if total >= NO_ROW as usize {
            return Err(Error::store(
                &self.dir,
                format!("{}: more than {} rows in one index", file.name, NO_ROW - 1),
            ));
        }
        for i in 0..file.rows() {
            let id = file.id(i);
            if id >= next_image_id {
                return Err(Error::store(
                    &self.dir,
                    format!(
                        "{} holds image id {id} >= the manifest's next id {next_image_id}",
                        file.name
                    ),
                ));
            }
        }
        self.live_bits.resize(total.div_ceil(64), 0);
        self.starts.push(total);
        self.files.push(file);
        let f = self.files.len() - 1;
        for i in 0..self.files[f].rows() {
            let id = self.files[f].id(i);
            self.unindex(id)?;
            self.overlay.remove(&id);
            let slot = id as usize;
            if slot >= self.id_row.len() {
                self.id_row.resize(slot + 1, NO_ROW);
            }
            self.id_row[slot] = (base + i) as u32;
            self.index(id)?;
        }
        Ok(())
    }

    /// Applies a patch; false when it names an image no shard holds (a corrupt store).
    pub fn apply_patch(&mut self, p: &Patch) -> Result<bool> {
        self.photos = OnceLock::new();
        if self.current_row(p.image_id).is_none() {
            return Ok(false);
        }
        self.unindex(p.image_id)?;
        self.overlay.insert(
            p.image_id,
            Mutable {
                path: p.path.clone(),
                paths: p.paths.clone(),
                caption: p.caption.clone(),
                meta: p.meta.clone(),
                deleted: p.deleted,
            },
        );
        self.index(p.image_id)?;
        Ok(true)
    }

    fn lookups(&self) -> Result<&Lookups> {
        if let Some(l) = self.lookups.get() {
            return Ok(l);
        }
        let mut l = Lookups::default();
        for row in 0..self.rows() {
            if !self.is_live(row) {
                continue;
            }
            let id = self.row_image(row);
            l.by_hash.insert(self.hash_of(row), id);
            for p in self.paths_of(id, row)? {
                l.by_path.insert(p, id);
            }
        }
        Ok(self.lookups.get_or_init(|| l))
    }

    /// Builds the path and hash lookups now (a writer needs them for every commit).
    pub fn build_lookups(&self) -> Result<()> {
        self.lookups().map(|_| ())
    }

    /// The live image with these bytes (lowercase hex BLAKE3).
    pub fn by_hash(&self, hex: &str) -> Result<Option<u64>> {
        let Some(k) = hash_key(hex) else {
            return Ok(None);
        };
        Ok(self.lookups()?.by_hash.get(&k).copied())
    }

    /// The live image `path` belongs to.
    pub fn by_path(&self, path: &str) -> Result<Option<u64>> {
        Ok(self.lookups()?.by_path.get(path).copied())
    }

    /// Every live image's id and EXIF metadata, in replay order (read once, then kept until
    /// the state changes).
    pub fn photos(&self) -> Result<&[(u64, Option<PhotoMeta>)]> {
        if let Some(p) = self.photos.get() {
            return Ok(p);
        }
        let mut out = Vec::with_capacity(self.live);
        for row in self.live_rows() {
            let id = self.row_image(row);
            let meta = match self.overlay.get(&id) {
                Some(m) => m.meta.clone(),
                None => {
                    let (f, i) = self.locate(row);
                    f.fields(i)?.meta
                }
            };
            out.push((id, meta));
        }
        Ok(self.photos.get_or_init(|| out))
    }

    /// Rows of the live images, in replay order.
    pub fn live_rows(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.rows()).filter(|&r| self.is_live(r))
    }
}
