//! `manifest.json`: the single source of truth of what is committed.

use std::path::Path;

use blipdex_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::ivf::IvfRef;
use crate::rows::rows_name;
use crate::types::{Dtype, HnswParams};

/// The commit point's file name.
pub const MANIFEST: &str = "manifest.json";
pub(crate) const FORMAT: &str = "blipdex-store";
/// v2: memory-mapped row files beside the shards and an IVF index; v1 (all rows decoded into
/// RAM, an hnsw_rs dump over per-image vectors) is upgraded by a writable open.
pub(crate) const FORMAT_VERSION: u32 = 2;
pub(crate) const FORMAT_V1: u32 = 1;
/// Largest Q and E a manifest may declare (BLIP-2: 32 x 256), so that a damaged manifest cannot
/// make the store allocate absurd amounts.
const MAX_DIM: usize = 1 << 16;

/// Whether `name` has one of the prefixes of the files a manifest names.
pub fn is_store_file(name: &str) -> bool {
    ["shard-", "patch-", "hnsw-", "ivf-"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// What a manifest commits, for copying an index file by file (object-store mirrors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestInfo {
    pub generation: u64,
    /// See [`Manifest::index_id`]: differs between an index and one rebuilt in its place.
    pub index_id: String,
    /// Every file the manifest names (checked: plain names of the store's kinds).
    pub files: Vec<String>,
}

/// Reads a manifest's bytes (`origin` names the index in errors).
pub fn manifest_info(bytes: &[u8], origin: &Path) -> Result<ManifestInfo> {
    let m = Manifest::parse(bytes, origin)?;
    Ok(ManifestInfo {
        generation: m.generation,
        files: m.referenced_files(),
        index_id: m.index_id,
    })
}

/// One committed Parquet file (image shard or patch file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileRef {
    pub file: String,
    /// Generation of the commit that added it; replay order.
    pub generation: u64,
    pub rows: u64,
}

/// The persisted HNSW graph (hnsw_rs `file_dump`), covering the first `rows` rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HnswDump {
    /// hnsw_rs basename: the files are `<basename>.hnsw.graph` and `<basename>.hnsw.data`.
    pub basename: String,
    /// Rows (in replay order, superseded ones included) inserted into the dumped graph.
    pub rows: u64,
}

impl HnswDump {
    pub fn files(&self) -> [String; 2] {
        [
            format!("{}.hnsw.graph", self.basename),
            format!("{}.hnsw.data", self.basename),
        ]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// Bumped by every manifest write; a server polls it to hot-reload.
    pub generation: u64,
    /// Drawn when the store is created and kept by every later write, so that a reader can tell
    /// a replaced index (deleted and built again in the same place) from a later generation of
    /// the one it serves. Empty in stores created before it existed.
    #[serde(default)]
    pub index_id: String,
    pub model_fingerprint: String,
    pub num_query: usize,
    pub dim: usize,
    pub dtype: Dtype,
    pub next_image_id: u64,
    /// Total rows over all shards (superseded rows included).
    pub rows: u64,
    pub shards: Vec<FileRef>,
    pub patches: Vec<FileRef>,
    pub hnsw_params: HnswParams,
    /// v1 only: the hnsw_rs dump (deleted by the upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hnsw: Option<HnswDump>,
    /// The IVF index over every row (None only while the store has no rows).
    #[serde(default)]
    pub ivf: Option<IvfRef>,
}

/// 128 bits that differ between any two stores ever created (time, process, address, count).
fn new_index_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNT.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(&(&COUNT as *const AtomicU64 as usize).to_le_bytes());
    h.finalize().to_hex()[..32].to_string()
}

impl Manifest {
    pub fn new(
        fingerprint: &str,
        num_query: usize,
        dim: usize,
        dtype: Dtype,
        hnsw: HnswParams,
    ) -> Self {
        Self {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            generation: 0,
            index_id: new_index_id(),
            model_fingerprint: fingerprint.into(),
            num_query,
            dim,
            dtype,
            next_image_id: 0,
            rows: 0,
            shards: Vec::new(),
            patches: Vec::new(),
            hnsw_params: hnsw,
            hnsw: None,
            ivf: None,
        }
    }

    /// The row file of every shard, in manifest order.
    pub fn rows_files(&self) -> Vec<String> {
        self.shards.iter().map(|f| rows_name(&f.file)).collect()
    }

    /// Every file name the manifest keeps alive.
    pub fn referenced_files(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .shards
            .iter()
            .chain(&self.patches)
            .map(|f| f.file.clone())
            .collect();
        // Row files count as referenced for v1 manifests too, so an interrupted upgrade keeps
        // the ones it already built.
        v.extend(self.rows_files());
        if let Some(h) = &self.hnsw {
            v.extend(h.files());
        }
        if let Some(i) = &self.ivf {
            v.extend(i.files());
        }
        v
    }

    /// Every name the manifest holds must be a plain file name of the store's own kinds, so
    /// that a damaged or hostile manifest can never make the store read or delete a file
    /// outside its directory.
    fn check_names(&self, dir: &Path) -> Result<()> {
        for name in self.referenced_files() {
            let plain = !name.is_empty()
                && name != "."
                && name != ".."
                && !name.contains(['/', '\\', '\0'])
                && is_store_file(&name);
            if !plain {
                return Err(Error::store(
                    dir,
                    format!(
                        "corrupt {MANIFEST}: {name:?} is not a file name of this index \
                         (restore the manifest from a backup or re-ingest)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads `dir/manifest.json`; `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        Self::parse(&bytes, dir).map(Some)
    }

    /// A manifest's bytes, checked as [`Manifest::read`] checks them; `dir` names the index in
    /// errors.
    pub fn parse(bytes: &[u8], dir: &Path) -> Result<Self> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| Error::store(dir, format!("corrupt {MANIFEST}: {e}")))?;
        if m.format != FORMAT
            || !(m.format_version == FORMAT_VERSION || m.format_version == FORMAT_V1)
        {
            return Err(Error::store(
                dir,
                format!(
                    "{MANIFEST} is format {} v{}, this build reads {FORMAT} v{FORMAT_VERSION}",
                    m.format, m.format_version
                ),
            ));
        }
        if m.num_query == 0 || m.dim == 0 || m.num_query > MAX_DIM || m.dim > MAX_DIM {
            return Err(Error::store(
                dir,
                format!(
                    "corrupt {MANIFEST}: embedding shape {}x{} (each must be 1..={MAX_DIM})",
                    m.num_query, m.dim
                ),
            ));
        }
        m.check_names(dir)?;
        Ok(m)
    }

    /// Atomically replaces the manifest (the commit point).
    pub fn write(&self, dir: &Path) -> Result<()> {
        debug_assert_eq!(self.format_version, FORMAT_VERSION);
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::store(dir, format!("cannot serialize manifest: {e}")))?;
        fsutil::replace_atomic(dir, MANIFEST, &bytes)
    }
}
