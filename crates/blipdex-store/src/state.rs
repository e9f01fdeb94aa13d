//! The in-memory view of a committed store: the replay of every shard and patch file in commit
//! order. Row `r` is the r-th row over all shards in manifest order (superseded rows included);
//! the ANN graph and the embedding matrix are indexed by it.

use std::collections::HashMap;

use crate::shard::Patch;
use crate::types::ImageRow;

pub(crate) struct Entry {
    pub row: usize,
    pub meta: ImageRow,
}

pub(crate) struct State {
    pub q: usize,
    pub e: usize,
    /// Row -> image id.
    pub row_image: Vec<u64>,
    /// Row-major `[row][q][e]` f32 (filled by the loader, extended by commits).
    pub embeds: Vec<f32>,
    /// True when the row is its image's current row and the image is not deleted.
    pub row_live: Vec<bool>,
    /// Every image ever committed (deleted ones too), with its current row.
    pub images: HashMap<u64, Entry>,
    /// Live images only.
    pub by_hash: HashMap<String, u64>,
    /// Every path of every live image.
    pub by_path: HashMap<String, u64>,
    pub live: usize,
}

impl State {
    pub fn new(q: usize, e: usize, expected_rows: usize) -> Self {
        Self {
            q,
            e,
            row_image: Vec::with_capacity(expected_rows),
            embeds: Vec::new(),
            row_live: Vec::with_capacity(expected_rows),
            images: HashMap::with_capacity(expected_rows),
            by_hash: HashMap::with_capacity(expected_rows),
            by_path: HashMap::with_capacity(expected_rows),
            live: 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.row_image.len()
    }

    pub fn row_embeds(&self, row: usize) -> &[f32] {
        let qe = self.q * self.e;
        &self.embeds[row * qe..(row + 1) * qe]
    }

    fn unindex(&mut self, id: u64) {
        let Some(old) = self.images.get(&id) else {
            return;
        };
        if old.meta.deleted {
            return;
        }
        self.row_live[old.row] = false;
        self.live -= 1;
        if self.by_hash.get(&old.meta.content_hash) == Some(&id) {
            self.by_hash.remove(&old.meta.content_hash);
        }
        for p in &old.meta.paths {
            if self.by_path.get(p) == Some(&id) {
                self.by_path.remove(p);
            }
        }
    }

    fn index(&mut self, id: u64) {
        let Some(cur) = self.images.get(&id) else {
            return;
        };
        if cur.meta.deleted {
            return;
        }
        self.row_live[cur.row] = true;
        self.live += 1;
        self.by_hash.insert(cur.meta.content_hash.clone(), id);
        for p in &cur.meta.paths {
            self.by_path.insert(p.clone(), id);
        }
    }

    /// Appends a row whose embeddings are already at the end of `self.embeds`; it becomes the
    /// image's current row (superseding any earlier one).
    pub fn push_row(&mut self, meta: ImageRow) {
        let id = meta.image_id;
        let row = self.row_image.len();
        self.row_image.push(id);
        self.row_live.push(false);
        self.unindex(id);
        self.images.insert(id, Entry { row, meta });
        self.index(id);
    }

    /// Applies a patch; false when it names an image no shard holds (a corrupt store).
    pub fn apply_patch(&mut self, p: &Patch) -> bool {
        if !self.images.contains_key(&p.image_id) {
            return false;
        }
        self.unindex(p.image_id);
        if let Some(entry) = self.images.get_mut(&p.image_id) {
            entry.meta.path.clone_from(&p.path);
            entry.meta.paths.clone_from(&p.paths);
            entry.meta.caption.clone_from(&p.caption);
            entry.meta.deleted = p.deleted;
        }
        self.index(p.image_id);
        true
    }

    pub fn meta(&self, id: u64) -> Option<&ImageRow> {
        self.images.get(&id).map(|e| &e.meta)
    }
}
