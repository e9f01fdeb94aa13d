//! Recursive discovery of image files under the ingest roots.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use blipdex_core::{Error, Result};
use globset::{Glob, GlobSet, GlobSetBuilder};

/// Extensions of the formats the `image` crate decodes for us (lower case).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "png", "gif", "webp", "bmp", "tif", "tiff",
];

#[derive(Debug, Clone)]
pub struct FileEntry {
    /// Absolute path (below a canonicalized root), or an object's URL (`s3://bucket/key`).
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    /// Where to read an object-store entry's bytes; `None` for a local file.
    pub object: Option<ObjectSource>,
    /// Named by a listing without its size or mtime (an immutable object: see
    /// [`crate::listing`]); `size` is known once read.
    pub listed: bool,
}

/// An object to read for a [`FileEntry`].
#[derive(Debug, Clone)]
pub struct ObjectSource {
    pub remote: blipdex_remote::Remote,
    pub key: object_store::path::Path,
}

impl FileEntry {
    /// The file's bytes.
    pub fn read(&self) -> Result<Vec<u8>> {
        match &self.object {
            Some(o) => o.remote.get_key(&o.key),
            None => std::fs::read(&self.path).map_err(|e| Error::io(&self.path, e)),
        }
    }
}

/// The image objects below an object-store prefix, with the same filters as [`walk`] (the globs
/// match the object's URL). The listing fails as a whole (a missing bucket, wrong credentials):
/// there is nothing to index then.
pub fn list_objects(remote: &blipdex_remote::Remote, filters: &Filters) -> Result<Vec<FileEntry>> {
    Ok(remote
        .list()?
        .into_iter()
        .filter_map(|o| {
            let path = PathBuf::from(remote.url_of_key(&o.key));
            filters.wants(&path).then(|| FileEntry {
                path,
                size: o.size,
                mtime_ns: o.mtime_ns,
                object: Some(ObjectSource {
                    remote: remote.clone(),
                    key: o.key,
                }),
                listed: false,
            })
        })
        .collect())
}

/// What the walk could not read (permission denied, a symlink loop, ...), reported as rejects.
#[derive(Debug, Clone)]
pub struct WalkProblem {
    pub path: PathBuf,
    pub reason: String,
}

pub struct Filters {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl Filters {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self> {
        let build = |pats: &[String]| -> Result<GlobSet> {
            let mut b = GlobSetBuilder::new();
            for p in pats {
                b.add(
                    Glob::new(p).map_err(|e| Error::InvalidArgument(format!("glob {p:?}: {e}")))?,
                );
            }
            b.build().map_err(|e| Error::InvalidArgument(e.to_string()))
        };
        Ok(Self {
            include: if include.is_empty() {
                None
            } else {
                Some(build(include)?)
            },
            exclude: build(exclude)?,
        })
    }

    /// A file a listing names: the globs only (a listing names its files, extension or not).
    pub fn wants_listed(&self, path: &Path) -> bool {
        !self.exclude.is_match(path) && self.include.as_ref().is_none_or(|i| i.is_match(path))
    }

    fn wants(&self, path: &Path) -> bool {
        let ext_ok = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        ext_ok
            && !self.exclude.is_match(path)
            && self.include.as_ref().is_none_or(|i| i.is_match(path))
    }
}

/// A file's modification time in nanoseconds since the epoch (0 when the OS has none).
pub(crate) fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Canonical absolute form of a root, so that the same folder given two ways is one folder.
pub fn canonical_root(root: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(root).map_err(|e| Error::io(root, e))
}

/// Walks `roots` (already canonical) and returns the image files in a stable order, plus what
/// could not be walked. Symlinks are followed; walkdir detects cycles, which end up as problems.
pub fn walk(roots: &[PathBuf], filters: &Filters) -> (Vec<FileEntry>, Vec<WalkProblem>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for root in roots {
        for entry in walkdir::WalkDir::new(root)
            .follow_links(true)
            .sort_by_file_name()
        {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let path = e
                        .path()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| root.clone());
                    let reason = if e.loop_ancestor().is_some() {
                        "symlink cycle; not followed".to_string()
                    } else {
                        e.to_string()
                    };
                    problems.push(WalkProblem { path, reason });
                    continue;
                }
            };
            if !filters.wants(entry.path()) {
                continue;
            }
            let kind = entry.file_type();
            if !kind.is_file() {
                // Named like a photo but not one: say so rather than skip it silently.
                let reason = if kind.is_dir() {
                    "a directory named like an image: its contents are walked, it is not indexed"
                } else {
                    "not a regular file (a FIFO, socket or device): not read"
                };
                problems.push(WalkProblem {
                    path: entry.path().to_path_buf(),
                    reason: reason.into(),
                });
                continue;
            }
            // Overlapping roots must not yield a file twice.
            if !seen.insert(entry.path().to_path_buf()) {
                continue;
            }
            match entry.metadata() {
                Ok(m) => files.push(FileEntry {
                    path: entry.path().to_path_buf(),
                    size: m.len(),
                    mtime_ns: mtime_ns(&m),
                    object: None,
                    listed: false,
                }),
                Err(e) => problems.push(WalkProblem {
                    path: entry.path().to_path_buf(),
                    reason: e.to_string(),
                }),
            }
        }
    }
    (files, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_extension_and_globs() -> Result<()> {
        let f = Filters::new(&[], &["**/skip/**".into()])?;
        assert!(f.wants(Path::new("/a/b.JPG")));
        assert!(!f.wants(Path::new("/a/b.txt")));
        assert!(!f.wants(Path::new("/a/skip/b.png")));
        let f = Filters::new(&["**/keep/*".into()], &[])?;
        assert!(f.wants(Path::new("/x/keep/b.png")));
        assert!(!f.wants(Path::new("/x/other/b.png")));
        assert!(Filters::new(&["[".into()], &[]).is_err());
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn things_named_like_images_that_are_not_files_are_reported() -> std::io::Result<()> {
        let d = tempfile::tempdir()?;
        std::fs::create_dir(d.path().join("album.jpg"))?;
        std::fs::write(d.path().join("album.jpg/inside.png"), b"x")?;
        let _socket = std::os::unix::net::UnixListener::bind(d.path().join("sock.jpg"))?;
        let (files, problems) = walk(
            &[d.path().to_path_buf()],
            &Filters::new(&[], &[]).expect("filters"),
        );
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(files[0].path.ends_with("album.jpg/inside.png"));
        let reason = |name: &str| {
            problems
                .iter()
                .find(|p| p.path.ends_with(name))
                .map(|p| p.reason.clone())
                .unwrap_or_default()
        };
        assert!(reason("album.jpg").contains("directory"), "{problems:?}");
        assert!(
            reason("sock.jpg").contains("not a regular file"),
            "{problems:?}"
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        Ok(())
    }

    #[test]
    fn symlink_cycles_terminate() -> std::io::Result<()> {
        let d = tempfile::tempdir()?;
        std::fs::create_dir(d.path().join("a"))?;
        std::fs::write(d.path().join("a/x.png"), b"not really")?;
        std::os::unix::fs::symlink(d.path(), d.path().join("a/loop"))?;
        let f = Filters::new(&[], &[]).map_err(std::io::Error::other)?;
        let root = std::fs::canonicalize(d.path())?;
        let (files, problems) = walk(&[root], &f);
        assert_eq!(files.len(), 1);
        assert!(
            problems.iter().any(|p| p.reason.contains("cycle")),
            "{problems:?}"
        );
        Ok(())
    }
}
