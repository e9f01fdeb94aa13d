//! Durable file operations. Every file the manifest names is fsynced under its final name before
//! the manifest that names it is renamed into place, so a crash leaves either the old or the new
//! manifest and every file either one references.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use blipdex_core::{Error, Result};

/// Prefix of every temporary file; anything with it is garbage on the next writable open.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

pub(crate) fn write_err(path: &Path, e: impl std::fmt::Display) -> Error {
    let dir = path.parent().unwrap_or(path);
    Error::store(dir, format!("cannot write {}: {e}", path.display()))
}

pub(crate) fn tmp_path(dir: &Path, final_name: &str) -> PathBuf {
    // The pid keeps two crashed attempts apart; cleanup removes them all anyway.
    dir.join(format!("{TMP_PREFIX}{}-{final_name}", std::process::id()))
}

/// Makes renames and unlinks in `dir` durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    // Directories cannot be opened for fsync on every platform; where they cannot, renames are
    // as durable as that platform allows.
    #[cfg(unix)]
    {
        let f = File::open(dir).map_err(|e| write_err(dir, e))?;
        f.sync_all().map_err(|e| write_err(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes `tmp` via `fill`, fsyncs it and renames it to `dir/final_name` (no dir fsync: callers
/// batch that).
pub(crate) fn write_durable(
    dir: &Path,
    final_name: &str,
    fill: impl FnOnce(&mut File) -> Result<()>,
) -> Result<()> {
    let tmp = tmp_path(dir, final_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| write_err(&tmp, e))?;
        fill(&mut f)?;
        f.flush().map_err(|e| write_err(&tmp, e))?;
        f.sync_all().map_err(|e| write_err(&tmp, e))?;
        drop(f);
        let dst = dir.join(final_name);
        fs::rename(&tmp, &dst).map_err(|e| write_err(&dst, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Atomically replaces `dir/final_name` with `bytes` (tmp + fsync + rename + dir fsync).
pub(crate) fn replace_atomic(dir: &Path, final_name: &str, bytes: &[u8]) -> Result<()> {
    let tmp_target = dir.join(final_name);
    write_durable(dir, final_name, |f| {
        f.write_all(bytes).map_err(|e| write_err(&tmp_target, e))
    })?;
    fsync_dir(dir)
}

/// Maps a committed file read-only.
#[allow(unsafe_code)]
pub(crate) fn map(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the store maps only files that were fsynced and renamed into place before a
    // manifest named them, and it never writes, truncates or renames over such a file: a
    // committed name is never reused (new files get new generation numbers), and a file is
    // deleted only once no manifest names it (unlinking keeps a live mapping valid on unix).
    // Another program truncating the file underneath would break this, as it would for any
    // mapped database file.
    unsafe { memmap2::Mmap::map(file) }
}

/// Writes a file made of sections at fixed offsets, zero-padded in between (the row and index
/// files' layout).
pub(crate) struct Sections<'f> {
    w: std::io::BufWriter<&'f mut File>,
    pos: usize,
    path: PathBuf,
}

impl<'f> Sections<'f> {
    pub fn new(f: &'f mut File, path: &Path) -> Self {
        Self {
            w: std::io::BufWriter::with_capacity(1 << 20, f),
            pos: 0,
            path: path.to_path_buf(),
        }
    }

    pub fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.w
            .write_all(bytes)
            .map_err(|e| write_err(&self.path, e))?;
        self.pos += bytes.len();
        Ok(())
    }

    /// Pads with zeros up to `offset` (where the next section starts).
    pub fn at(&mut self, offset: usize) -> Result<()> {
        debug_assert!(offset >= self.pos);
        let pad = vec![0u8; offset.saturating_sub(self.pos)];
        self.put(&pad)
    }

    pub fn finish(mut self) -> Result<()> {
        self.w.flush().map_err(|e| write_err(&self.path, e))
    }
}
