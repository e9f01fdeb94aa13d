//! Copying a committed index between a local directory and an object-store prefix, whole
//! files at a time, the manifest last (see the crate's documentation for the protocol).
//!
//! A local copy is either a reader's (only [`pull`] writes it) or a writer's (a store that
//! ingest or merge commits to, then [`push`]es): [`copy_dir`] keeps the two apart, so that a
//! server's pulls never race a writer's commits on the same host.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use blipdex_core::{Error, ObjectStoreErrorKind, Result};
use blipdex_store::{is_store_file, manifest_info, write_atomic, ManifestInfo, MANIFEST};
use fs2::FileExt;

use crate::Remote;

/// Whose local copy of an index on object storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `search` and `serve`: written by [`pull`] only.
    Reader,
    /// `ingest` and `index merge`: a store committed to, then published by [`push`].
    Writer,
}

/// The local copy of the index at `remote` for `role`, below the cache folder `cache`.
pub fn copy_dir(cache: &Path, remote: &Remote, role: Role) -> PathBuf {
    crate::cache_dir_for(cache, &remote.url()).join(match role {
        Role::Reader => "read",
        Role::Writer => "write",
    })
}

/// What a [`pull`] or [`push`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub generation: u64,
    pub index_id: String,
    /// Files copied (the rest were there already).
    pub copied: usize,
    /// Whether the destination's manifest changed.
    pub changed: bool,
}

/// How often [`pull`] starts over when a file of the manifest it read is gone (a writer
/// published twice while it copied).
const PULL_ATTEMPTS: usize = 3;

/// The local manifest; an unreadable one counts as none (the next pull replaces it).
fn read_local_manifest(dir: &Path) -> Result<Option<(Vec<u8>, ManifestInfo)>> {
    let path = dir.join(MANIFEST);
    match std::fs::read(&path) {
        Ok(bytes) => match manifest_info(&bytes, dir) {
            Ok(info) => Ok(Some((bytes, info))),
            Err(e) => {
                tracing::warn!("{e}: the copy is replaced");
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Makes `local` a copy of the index committed at `remote`: the files it lacks, then the
/// manifest (atomically). `Ok(None)` when `remote` holds no index. A copy of another index
/// (a different `index_id`: the remote one was rebuilt) loses its manifest first, so a reader
/// sees no index for a moment rather than a mix of the two. Pulls into one folder take turns.
pub fn pull(remote: &Remote, local: &Path) -> Result<Option<Synced>> {
    std::fs::create_dir_all(local).map_err(|e| Error::io(local, e))?;
    let lock_path = local.join(".pull-lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    lock.lock_exclusive()
        .map_err(|e| Error::io(&lock_path, e))?;
    let origin = Path::new(&remote.url()).to_path_buf();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let Some(bytes) = remote.get_opt(MANIFEST)? else {
            return Ok(None);
        };
        let info = manifest_info(&bytes, &origin)?;
        let have = read_local_manifest(local)?;
        if have.as_ref().is_some_and(|(b, _)| *b == bytes) {
            return Ok(Some(Synced {
                generation: info.generation,
                index_id: info.index_id,
                copied: 0,
                changed: false,
            }));
        }
        // File names repeat across indexes (`shard-<generation>`): only a file the local
        // manifest names, of the same index, is known to hold what the remote one does.
        let reusable: HashSet<&String> = match &have {
            Some((_, h)) if !h.index_id.is_empty() && h.index_id == info.index_id => {
                h.files.iter().collect()
            }
            Some(_) => {
                let m = local.join(MANIFEST);
                std::fs::remove_file(&m).map_err(|e| Error::io(&m, e))?;
                HashSet::new()
            }
            None => HashSet::new(),
        };
        let mut copied = 0;
        let mut gone = None;
        for f in &info.files {
            let dest = local.join(f);
            if reusable.contains(f) && dest.is_file() {
                continue;
            }
            match remote.download(f, &dest) {
                Ok(()) => copied += 1,
                Err(Error::ObjectStore {
                    kind: ObjectStoreErrorKind::NotFound,
                    url,
                    ..
                }) if attempt < PULL_ATTEMPTS => {
                    gone = Some(url);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(url) = gone {
            tracing::info!("{url} is gone (a newer generation was published); copying that one");
            continue;
        }
        write_atomic(local, MANIFEST, &bytes)?;
        // Keep the replaced generation's files (a reader between reading the old manifest and
        // opening its files would fail); drop anything older.
        let keep: HashSet<&String> = info
            .files
            .iter()
            .chain(have.iter().flat_map(|(_, h)| &h.files))
            .collect();
        if let Ok(entries) = std::fs::read_dir(local) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if is_store_file(&name) && !keep.contains(&name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        return Ok(Some(Synced {
            generation: info.generation,
            index_id: info.index_id,
            copied,
            changed: true,
        }));
    }
}

/// A writer's copy before it works: a copy of the remote index, or, when the remote holds none
/// (never built, or deleted), an empty folder (a stale copy would bring deleted images back).
pub fn pull_for_writing(remote: &Remote, local: &Path) -> Result<Option<Synced>> {
    let pulled = pull(remote, local)?;
    if pulled.is_none() && local.join(MANIFEST).exists() {
        tracing::info!(
            "{} holds no index: the local copy {} is dropped",
            remote.url(),
            local.display()
        );
        std::fs::remove_dir_all(local).map_err(|e| Error::io(local, e))?;
        std::fs::create_dir_all(local).map_err(|e| Error::io(local, e))?;
    }
    Ok(pulled)
}

/// Publishes the index committed in `local` at `remote`: uploads every file the remote's
/// current manifest does not name (a name it does not name may hold another attempt's bytes,
/// so it is never trusted), then the manifest, then deletes (best effort) remote files named
/// by neither the new nor the replaced manifest. Refuses to replace another index (a
/// different `index_id`) unless `replace` is set.
pub fn push(local: &Path, remote: &Remote, replace: bool) -> Result<Synced> {
    let (bytes, info) = read_local_manifest(local)?
        .ok_or_else(|| Error::store(local, "no manifest.json: nothing committed to publish"))?;
    let origin = Path::new(&remote.url()).to_path_buf();
    let previous = match remote.get_opt(MANIFEST)? {
        Some(b) if b == bytes => {
            return Ok(Synced {
                generation: info.generation,
                index_id: info.index_id,
                copied: 0,
                changed: false,
            })
        }
        Some(b) => Some(manifest_info(&b, &origin)?),
        None => None,
    };
    if let Some(p) = &previous {
        if p.index_id != info.index_id && !replace {
            return Err(Error::store(
                local,
                format!(
                    "{} holds another index (id {:?}, generation {}) than this copy (id {:?}); \
                     it was rebuilt or replaced meanwhile: start again from it",
                    remote.url(),
                    p.index_id,
                    p.generation,
                    info.index_id
                ),
            ));
        }
    }
    let committed: HashSet<&String> = previous
        .iter()
        .filter(|p| p.index_id == info.index_id)
        .flat_map(|p| &p.files)
        .collect();
    let mut copied = 0;
    for f in &info.files {
        if committed.contains(f) {
            continue;
        }
        remote.upload(f, &local.join(f))?;
        copied += 1;
    }
    remote.put(MANIFEST, bytes)?;
    let keep: HashSet<&String> = info
        .files
        .iter()
        .chain(previous.iter().flat_map(|p| &p.files))
        .collect();
    // Published: what follows only frees space, and a failure is left for the next push.
    match remote.list_files() {
        Ok(names) => {
            for name in names {
                if is_store_file(&name) && !keep.contains(&name) {
                    if let Err(e) = remote.delete(&name) {
                        tracing::warn!("{}: not deleted ({e}); the next push retries", name);
                    }
                }
            }
        }
        Err(e) => tracing::warn!("{}: old files not listed ({e})", remote.url()),
    }
    Ok(Synced {
        generation: info.generation,
        index_id: info.index_id,
        copied,
        changed: true,
    })
}
