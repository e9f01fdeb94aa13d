//! Copying a committed index between a local directory and an object-store prefix, whole
//! files at a time, the manifest last (see the crate's documentation for the protocol).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use blipdex_core::{Error, ObjectStoreErrorKind, Result};
use blipdex_store::{is_store_file, manifest_info, ManifestInfo, MANIFEST};

use crate::Remote;

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

fn read_local_manifest(dir: &Path) -> Result<Option<(Vec<u8>, ManifestInfo)>> {
    let path = dir.join(MANIFEST);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let info = manifest_info(&bytes, dir)?;
            Ok(Some((bytes, info)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Makes `local` a copy of the index committed at `remote`: the files it lacks, then the
/// manifest (atomically). `Ok(None)` when `remote` holds no index. A copy of another index
/// (a different `index_id`: the remote one was rebuilt) is replaced file by file.
pub fn pull(remote: &Remote, local: &Path) -> Result<Option<Synced>> {
    std::fs::create_dir_all(local).map_err(|e| Error::io(local, e))?;
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
        // File names repeat across indexes (`shard-<generation>`): only a copy of the same
        // index may keep what it has.
        let same_index = have
            .as_ref()
            .is_some_and(|(_, h)| !h.index_id.is_empty() && h.index_id == info.index_id);
        let mut copied = 0;
        let mut gone = None;
        for f in &info.files {
            let dest = local.join(f);
            if same_index && dest.is_file() {
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
        let tmp = local.join(".tmp-manifest.json");
        std::fs::write(&tmp, &bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, local.join(MANIFEST)).map_err(|e| Error::io(local, e))?;
        // Keep the replaced generation's files (a reader may have mapped them: unlinking is
        // safe for it, but a reader between reading the old manifest and opening its files
        // would fail); drop anything older.
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

/// Publishes the index committed in `local` at `remote`: uploads the files the remote lacks
/// (or holds with another size), then the manifest, then deletes remote files named by neither
/// the new nor the replaced manifest. Refuses to replace another index (a different
/// `index_id`) unless `replace` is set.
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
    let listed: HashMap<String, u64> = remote
        .list()?
        .into_iter()
        .filter(|o| !o.relative.contains('/'))
        .map(|o| (o.relative, o.size))
        .collect();
    let same_index = previous
        .as_ref()
        .is_some_and(|p| p.index_id == info.index_id);
    let mut copied = 0;
    for f in &info.files {
        let path = local.join(f);
        let size = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if same_index && listed.get(f) == Some(&size) {
            continue;
        }
        remote.upload(f, &path)?;
        copied += 1;
    }
    remote.put(MANIFEST, bytes)?;
    let keep: HashSet<&String> = info
        .files
        .iter()
        .chain(previous.iter().flat_map(|p| &p.files))
        .collect();
    for name in listed.keys() {
        if is_store_file(name) && !keep.contains(name) {
            remote.delete(name)?;
        }
    }
    Ok(Synced {
        generation: info.generation,
        index_id: info.index_id,
        copied,
        changed: true,
    })
}
