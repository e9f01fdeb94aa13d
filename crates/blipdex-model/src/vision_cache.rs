//! On-disk cache of vision encoder states (`get_image_features`, [1+P, Dv] per image), keyed by
//! the image's content hash. ITM reranking needs these states; recomputing them is a full ViT
//! pass per image, reading them back is a file read. ViT-g at 224 px: 257 x 1408 values,
//! 0.72 MB per image in f16, 1.45 MB in f32.
//!
//! Layout: `<index>/vision-cache/<hash[0..2]>/<hash>.safetensors`, one tensor `vision_states`.
//! Files are written to a temporary name and renamed, so a reader never sees half a file; an
//! entry is content-addressed, so one written for an image whose commit then failed is still
//! correct when that image is committed later.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use blipdex_core::{Error, Result};

/// Directory name under the index.
pub const VISION_CACHE_DIR: &str = "vision-cache";
const KEY: &str = "vision_states";

/// Precision of cached states. f16 halves the size; ITM probabilities then differ from a
/// recompute by ~1e-3 (the ViT-g checkpoints run in f16 anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDtype {
    F16,
    F32,
}

impl CacheDtype {
    pub fn dtype(self) -> DType {
        match self {
            CacheDtype::F16 => DType::F16,
            CacheDtype::F32 => DType::F32,
        }
    }
}

impl FromStr for CacheDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            other => Err(Error::InvalidArgument(format!(
                "vision cache precision must be f16 or f32, got {other:?}"
            ))),
        }
    }
}

/// The cache directory of an index.
pub fn cache_dir(index: &Path) -> PathBuf {
    index.join(VISION_CACHE_DIR)
}

fn valid_hash(hash: &str) -> bool {
    hash.len() >= 8 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where the states of the image with `hash` live. `None` for a hash that is not hex (never a
/// path outside the cache).
pub fn entry_path(dir: &Path, hash: &str) -> Option<PathBuf> {
    valid_hash(hash).then(|| dir.join(&hash[..2]).join(format!("{hash}.safetensors")))
}

fn terr(e: candle_core::Error) -> Error {
    Error::Tensor(e.to_string())
}

/// Writes one image's states ([1+P, Dv] or [1, 1+P, Dv]) atomically.
pub fn write(dir: &Path, hash: &str, states: &Tensor, dtype: CacheDtype) -> Result<()> {
    let path = entry_path(dir, hash)
        .ok_or_else(|| Error::InvalidArgument(format!("bad content hash {hash:?}")))?;
    let parent = path.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let states = match states.rank() {
        3 => states.squeeze(0).map_err(terr)?,
        _ => states.clone(),
    };
    let t = states
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(dtype.dtype()))
        .map_err(terr)?;
    let tmp = parent.join(format!(".tmp-{hash}-{}", std::process::id()));
    let map = HashMap::from([(KEY.to_string(), t)]);
    candle_core::safetensors::save(&map, &tmp)
        .map_err(|e| Error::io(&tmp, std::io::Error::other(e.to_string())))?;
    // Durable before it becomes visible under its final name.
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
}

/// Reads one image's states as [1+P, Dv] (stored dtype). `Ok(None)` when there is no entry;
/// an unreadable entry or one of another shape than `expect` is an error the caller can treat
/// as a miss.
pub fn read(dir: &Path, hash: &str, expect: (usize, usize)) -> Result<Option<Tensor>> {
    let Some(path) = entry_path(dir, hash) else {
        return Ok(None);
    };
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |reason: String| Error::BadTensor {
        file: path.display().to_string(),
        name: KEY.into(),
        reason,
    };
    let mut map =
        candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| bad(e.to_string()))?;
    let t = map
        .remove(KEY)
        .ok_or_else(|| bad("missing; delete the file to rebuild it".into()))?;
    if t.dims() != [expect.0, expect.1] {
        return Err(bad(format!(
            "shape {:?}, expected [{}, {}]; delete the file to rebuild it",
            t.dims(),
            expect.0,
            expect.1
        )));
    }
    Ok(Some(t))
}

/// Removes an entry if present.
pub fn remove(dir: &Path, hash: &str) -> Result<()> {
    match entry_path(dir, hash) {
        Some(p) => match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&p, e)),
        },
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_inputs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .and_then(|t| t.reshape((1, 3, 4)))
            .expect("tensor");
        let hash = "ab".repeat(32);
        write(dir.path(), &hash, &t, CacheDtype::F32).expect("write");
        let back = read(dir.path(), &hash, (3, 4))
            .expect("read")
            .expect("present");
        let diff = (back - t.squeeze(0).expect("squeeze"))
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(diff, 0.0);
        assert!(read(dir.path(), &hash, (3, 5)).is_err(), "shape is checked");
        assert!(read(dir.path(), &"cd".repeat(32), (3, 4))
            .expect("miss")
            .is_none());
        assert!(entry_path(dir.path(), "../../etc/passwd").is_none());
        remove(dir.path(), &hash).expect("remove");
        assert!(read(dir.path(), &hash, (3, 4)).expect("gone").is_none());
    }
}
