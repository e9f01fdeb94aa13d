//! Reading indexed files back and comparing two images' query vectors.

use std::collections::HashMap;
use std::sync::Mutex;

use blipdex_core::{paths, Error, Result};
use blipdex_remote::{Remote, RemoteOptions};

/// The object stores that indexed photos in buckets are read from (for reranking and
/// captions), one per `scheme://bucket`, opened on first use.
#[derive(Default)]
pub(crate) struct Objects {
    by_root: Mutex<HashMap<String, Remote>>,
    opts: RemoteOptions,
}

impl Objects {
    /// The object's bytes; `None` when it is gone.
    fn read(&self, url: &str) -> Result<Option<Vec<u8>>> {
        let (root, key) = Remote::split_url(url)
            .ok_or_else(|| Error::InvalidArgument(format!("{url}: not an object URL")))?;
        let remote = {
            let mut by_root = self
                .by_root
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match by_root.get(root) {
                Some(r) => r.clone(),
                None => {
                    let r = Remote::open(root, &self.opts)?;
                    by_root.insert(root.to_string(), r.clone());
                    r
                }
            }
        };
        // `remote` is the bucket itself: the key is relative to it.
        remote.get_opt(key)
    }
}

/// The bytes of the first existing copy among `stored` (paths as the store keeps them, local
/// or object URLs) whose BLAKE3 hash is `content_hash`. A file that changed since it was
/// indexed is refused: its embedding no longer describes it.
pub(crate) fn read_verified(
    stored: &[String],
    content_hash: &str,
    objects: &Objects,
) -> Result<Vec<u8>> {
    let mut changed = None;
    for s in stored {
        let bytes = if blipdex_remote::is_url(s) {
            match objects.read(s)? {
                Some(b) => b,
                None => continue,
            }
        } else {
            let p = paths::decode(s);
            if !p.is_file() {
                continue;
            }
            std::fs::read(&p).map_err(|e| Error::io(&p, e))?
        };
        if blake3::hash(&bytes).to_hex().as_str() == content_hash {
            return Ok(bytes);
        }
        changed = Some(paths::display(s).into_owned());
    }
    Err(match changed {
        Some(path) => Error::FileChanged { path },
        None => Error::NotFound(format!(
            "no copy of the indexed image exists any more (was {}); re-run blipdex ingest",
            stored.first().map_or("?".into(), |s| paths::display(s))
        )),
    })
}

/// Image-to-image similarity of two sets of unit query vectors (`[Q][E]` each): for every
/// vector of `a`, its best cosine among `b`'s, averaged over `a`. Identical embeddings score
/// 1.0, the maximum, so the same photo ranks first.
pub fn image_similarity(a: &[f32], b: &[f32], e: usize) -> f32 {
    let mut total = 0.0f32;
    let mut n = 0usize;
    for qa in a.chunks_exact(e) {
        let best = b
            .chunks_exact(e)
            .map(|qb| qa.iter().zip(qb).map(|(x, y)| x * y).sum::<f32>())
            .fold(f32::NEG_INFINITY, f32::max);
        total += best;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        total / n as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_sets_score_one_and_others_less() {
        let a = [1.0, 0.0, 0.0, 1.0];
        assert!((image_similarity(&a, &a, 2) - 1.0).abs() < 1e-6);
        let b = [1.0, 0.0, 0.6, 0.8];
        let s = image_similarity(&a, &b, 2);
        assert!(s < 1.0 && s > 0.0, "{s}");
    }

    #[test]
    fn changed_and_missing_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.jpg");
        std::fs::write(&p, b"one").expect("write");
        let path = p.to_string_lossy().into_owned();
        let hash = blake3::hash(b"one").to_hex().to_string();
        assert_eq!(
            read_verified(std::slice::from_ref(&path), &hash, &Objects::default()).expect("same"),
            b"one"
        );
        std::fs::write(&p, b"two").expect("write");
        let e = read_verified(std::slice::from_ref(&path), &hash, &Objects::default())
            .expect_err("changed");
        assert!(
            e.to_string().contains("changed since it was indexed"),
            "{e}"
        );
        std::fs::remove_file(&p).expect("rm");
        let e = read_verified(&[path], &hash, &Objects::default()).expect_err("missing");
        assert!(matches!(e, Error::NotFound(_)), "{e}");
    }
}
