//! Object storage for blipdex: photo inputs under an `s3://`, `gs://`, `az://` or `file://`
//! prefix, and indexes and workers' parts kept there.
//!
//! blipdex's store is a directory of immutable files named by generation plus one
//! `manifest.json`, the commit point (see `blipdex_store`). That shape carries over to an object
//! store without a format of its own: every process that reads or writes an index on object
//! storage works on a local copy (a cache directory) and moves whole files.
//!
//! * [`mirror::pull`] copies the committed index at a prefix into a local directory: the files
//!   the remote manifest names that the copy lacks, then the manifest, written last and
//!   atomically, so a server reading the copy reloads from one complete generation to the next.
//! * [`mirror::push`] publishes a local index: the files the remote lacks, then the manifest (a
//!   single PUT, atomic on every object store), then it deletes remote files that neither the
//!   new nor the replaced manifest names. Keeping the replaced generation's files lets a reader
//!   that read the older manifest finish its copy; one that fell two generations behind finds a
//!   file gone, reads the manifest again and copies the newer generation.
//!
//! One writer at a time per index prefix (one `blipdex index merge` or one non-worker ingest):
//! object stores have no flock, and two writers would each publish a generation the other does
//! not contain. Workers never write the index itself: each writes its own part (see
//! `blipdex_ingest::merge`).
//!
//! Credentials come from each cloud's usual environment variables, read by `object_store`'s
//! `from_env` builders (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`,
//! `AWS_REGION`, `AWS_ENDPOINT` and `AWS_ALLOW_HTTP` for S3-compatible servers, web identity
//! and instance metadata; `GOOGLE_SERVICE_ACCOUNT`/`GOOGLE_APPLICATION_CREDENTIALS`;
//! `AZURE_STORAGE_ACCOUNT_NAME`/`AZURE_STORAGE_ACCOUNT_KEY` and the other `AZURE_*` keys).
//! `~/.aws/credentials` profiles are not read: export the profile's keys (e.g. `eval
//! "$(aws configure export-credentials --format env)"`).
//!
//! The API is blocking (each [`Remote`] runs its requests on a small runtime of its own), for
//! the ingest's decode threads and the CLI; call it from a plain thread, not from async code.

pub mod mirror;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blipdex_core::{Error, ObjectStoreErrorKind, Result};
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use tokio::io::AsyncWriteExt;

/// URL schemes blipdex reads as object-store locations.
pub const SCHEMES: &[&str] = &[
    "s3", "s3a", "gs", "az", "abfs", "abfss", "azure", "adl", "file",
];

/// Whether `s` names an object-store location (`scheme://...` with a scheme of [`SCHEMES`])
/// rather than a local path.
pub fn is_url(s: &str) -> bool {
    s.split_once("://")
        .is_some_and(|(scheme, _)| SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()))
}

/// How requests to object stores are retried.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Retries of a failed request (network errors, 5xx, throttling), with exponential backoff.
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            max_retries: 5,
            retry_timeout: Duration::from_secs(120),
        }
    }
}

/// A local directory or an object-store prefix.
#[derive(Debug, Clone)]
pub enum Location {
    Local(PathBuf),
    Remote(Remote),
}

impl Location {
    /// `s3://bucket/prefix` and the other [`SCHEMES`] are remote; anything else is a local path.
    pub fn parse(s: &str, opts: &RemoteOptions) -> Result<Self> {
        if is_url(s) {
            Remote::open(s, opts).map(Location::Remote)
        } else {
            Ok(Location::Local(PathBuf::from(s)))
        }
    }

    /// How the location reads in messages: the path or the URL.
    pub fn display(&self) -> String {
        match self {
            Location::Local(p) => p.display().to_string(),
            Location::Remote(r) => r.url().to_string(),
        }
    }
}

struct Base {
    store: Arc<dyn ObjectStore>,
    /// `scheme://bucket` (`file://` for the local file system): a key's URL is `root/key`.
    root: String,
    /// Always `Some` until dropped.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Base {
    /// Without blocking: a `Remote` may be dropped by async code (an engine held by a server),
    /// where a runtime's ordinary drop would panic.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A prefix of an object store (`s3://bucket/photos`), with blocking calls on the objects
/// below it. Cheap to clone; children share the connection pool.
#[derive(Clone)]
pub struct Remote {
    base: Arc<Base>,
    prefix: ObjPath,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url())
    }
}

/// An object found by [`Remote::list`].
#[derive(Debug, Clone)]
pub struct Object {
    pub key: ObjPath,
    /// The key below the listed prefix, `/`-separated.
    pub relative: String,
    pub size: u64,
    pub mtime_ns: i64,
}

impl Remote {
    /// Connects to the store that `url` names (no request is made: see [`Remote::probe`]).
    pub fn open(url: &str, opts: &RemoteOptions) -> Result<Self> {
        let config_err = |reason: String| Error::ObjectStore {
            url: url.to_string(),
            kind: ObjectStoreErrorKind::Config,
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| config_err("not a URL (scheme://bucket/prefix)".into()))?;
        let scheme = scheme.to_ascii_lowercase();
        let retry = RetryConfig {
            max_retries: opts.max_retries,
            retry_timeout: opts.retry_timeout,
            ..RetryConfig::default()
        };
        let built: std::result::Result<
            (Arc<dyn ObjectStore>, String, String),
            object_store::Error,
        > = match scheme.as_str() {
            "file" => {
                let path = Path::new(rest);
                if !path.is_absolute() {
                    return Err(config_err(
                        "a file:// URL needs an absolute path (file:///data/photos)".into(),
                    ));
                }
                let fs = object_store::local::LocalFileSystem::new();
                Ok((Arc::new(fs), "file://".into(), rest.to_string()))
            }
            _ => {
                let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(config_err("no bucket or container in the URL".into()));
                }
                let root = format!("{scheme}://{bucket}");
                let store: std::result::Result<Arc<dyn ObjectStore>, _> = match scheme.as_str() {
                    "s3" | "s3a" => object_store::aws::AmazonS3Builder::from_env()
                        .with_url(url)
                        .with_retry(retry)
                        .build()
                        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
                    "gs" => object_store::gcp::GoogleCloudStorageBuilder::from_env()
                        .with_url(url)
                        .with_retry(retry)
                        .build()
                        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
                    _ => object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_url(url)
                        .with_retry(retry)
                        .build()
                        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
                };
                store.map(|s| (s, root, key.to_string()))
            }
        };
        let (store, root, key) = built.map_err(|e| map_err(url, e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blipdex-object-store")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("object-store runtime: {e}")))?;
        Ok(Self {
            base: Arc::new(Base {
                store,
                root,
                rt: Some(rt),
            }),
            prefix: raw_key(key.trim_matches('/')),
        })
    }

    /// The prefix's URL, without a trailing slash.
    pub fn url(&self) -> String {
        self.url_of_key(&self.prefix)
    }

    /// The URL of `relative` below the prefix.
    pub fn url_of(&self, relative: &str) -> String {
        self.url_of_key(&self.key(relative))
    }

    /// The URL of an object's key.
    pub fn url_of_key(&self, key: &ObjPath) -> String {
        if key.as_ref().is_empty() {
            self.base.root.clone()
        } else {
            format!("{}/{}", self.base.root, key)
        }
    }

    /// The prefix `relative` below this one (`/`-separated).
    pub fn child(&self, relative: &str) -> Remote {
        Remote {
            base: self.base.clone(),
            prefix: self.key(relative),
        }
    }

    /// The key of `relative` below the prefix (`""`: the prefix itself, as an object). Keys are
    /// taken as written (`Photos [2019]/a b.jpg` is that key), as listings return them.
    pub fn key(&self, relative: &str) -> ObjPath {
        let relative = relative.trim_matches('/');
        if relative.is_empty() {
            self.prefix.clone()
        } else if self.prefix.as_ref().is_empty() {
            raw_key(relative)
        } else {
            raw_key(&format!("{}/{relative}", self.prefix))
        }
    }

    fn prefix_opt(&self) -> Option<&ObjPath> {
        (!self.prefix.as_ref().is_empty()).then_some(&self.prefix)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match &self.base.rt {
            Some(rt) => rt.block_on(f),
            None => unreachable!("the runtime lives as long as the Remote"),
        }
    }

    /// One cheap request that fails the way real work would: a missing bucket, wrong
    /// credentials or an unreachable endpoint, before any work starts.
    pub fn probe(&self) -> Result<()> {
        self.block_on(self.base.store.list_with_delimiter(self.prefix_opt()))
            .map(|_| ())
            .map_err(|e| map_err(&self.url(), e))
    }

    /// `scheme://bucket` of a URL (the store it names), and the key in it.
    pub fn split_url(url: &str) -> Option<(&str, &str)> {
        let (scheme, rest) = url.split_once("://")?;
        if scheme.eq_ignore_ascii_case("file") {
            return Some((&url[..scheme.len() + 4], rest.trim_start_matches('/')));
        }
        let slash = rest.find('/').unwrap_or(rest.len());
        Some((
            &url[..scheme.len() + 3 + slash],
            rest[slash..].trim_start_matches('/'),
        ))
    }

    /// Every object below the prefix, in key order.
    pub fn list(&self) -> Result<Vec<Object>> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let metas: Vec<object_store::ObjectMeta> = self
            .block_on(async {
                let mut out = Vec::new();
                let mut stream = self.base.store.list(prefix);
                while let Some(m) = stream.next().await {
                    out.push(m?);
                }
                Ok::<_, object_store::Error>(out)
            })
            .map_err(|e| map_err(&self.url(), e))?;
        let mut objects: Vec<Object> = metas
            .into_iter()
            .filter_map(|m| {
                let relative = m
                    .location
                    .prefix_match(&self.prefix)?
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/");
                Some(Object {
                    relative,
                    size: m.size,
                    mtime_ns: m.last_modified.timestamp_nanos_opt().unwrap_or(0),
                    key: m.location,
                })
            })
            .collect();
        objects.sort_by(|a, b| a.key.as_ref().cmp(b.key.as_ref()));
        Ok(objects)
    }

    /// The names of the "folders" directly below the prefix.
    pub fn list_folders(&self) -> Result<Vec<String>> {
        let listed = self.list_level()?;
        Ok(names(listed.common_prefixes.iter()))
    }

    /// The names of the objects directly below the prefix (not in its "folders").
    pub fn list_files(&self) -> Result<Vec<String>> {
        let listed = self.list_level()?;
        Ok(names(listed.objects.iter().map(|o| &o.location)))
    }

    fn list_level(&self) -> Result<object_store::ListResult> {
        self.block_on(self.base.store.list_with_delimiter(self.prefix_opt()))
            .map_err(|e| map_err(&self.url(), e))
    }

    /// The bytes of the object at `key` (a key from [`Remote::list`]).
    pub fn get_key(&self, key: &ObjPath) -> Result<Vec<u8>> {
        self.block_on(async { self.base.store.get(key).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| map_err(&self.url_of_key(key), e))
    }

    /// The bytes of `relative`, or `None` when there is no such object.
    pub fn get_opt(&self, relative: &str) -> Result<Option<Vec<u8>>> {
        match self.get_key(&self.key(relative)) {
            Ok(b) => Ok(Some(b)),
            Err(Error::ObjectStore {
                kind: ObjectStoreErrorKind::NotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `bytes` as `relative` (one PUT: the object appears whole or not at all).
    pub fn put(&self, relative: &str, bytes: Vec<u8>) -> Result<()> {
        let key = self.key(relative);
        self.block_on(self.base.store.put(&key, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| map_err(&self.url_of_key(&key), e))
    }

    /// Uploads the file at `path` as `relative` (multipart when large; the object appears only
    /// when the upload completes).
    pub fn upload(&self, relative: &str, path: &Path) -> Result<()> {
        let key = self.key(relative);
        let url = self.url_of_key(&key);
        self.block_on(async {
            let mut file = tokio::fs::File::open(path)
                .await
                .map_err(|e| Error::io(path, e))?;
            let mut w = object_store::buffered::BufWriter::new(self.base.store.clone(), key);
            let copied = tokio::io::copy(&mut file, &mut w).await;
            match copied {
                Ok(_) => w.shutdown().await.map_err(|e| io_err(&url, e)),
                Err(e) => {
                    let _ = w.abort().await;
                    Err(io_err(&url, e))
                }
            }
        })
    }

    /// Downloads `relative` to `dest` (through a temporary file beside it, renamed when complete).
    pub fn download(&self, relative: &str, dest: &Path) -> Result<()> {
        let key = self.key(relative);
        let url = self.url_of_key(&key);
        let dir = dest.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".tmp-download-{}",
            dest.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ));
        let result = self.block_on(async {
            let mut stream = self
                .base
                .store
                .get(&key)
                .await
                .map_err(|e| map_err(&url, e))?
                .into_stream();
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| Error::io(&tmp, e))?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| map_err(&url, e))?;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| Error::io(&tmp, e))?;
            }
            file.sync_all().await.map_err(|e| Error::io(&tmp, e))
        });
        match result {
            Ok(()) => std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Deletes `relative` (no error when it is already gone).
    pub fn delete(&self, relative: &str) -> Result<()> {
        let key = self.key(relative);
        match self.block_on(self.base.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_err(&self.url_of_key(&key), e)),
        }
    }
}

/// A key exactly as written; one that is not a valid key as it stands (an empty segment, `..`)
/// is escaped the way `object_store` escapes path parts.
fn raw_key(key: &str) -> ObjPath {
    ObjPath::parse(key).unwrap_or_else(|_| ObjPath::from(key))
}

/// The last part of each path, sorted.
fn names<'a>(paths: impl Iterator<Item = &'a ObjPath>) -> Vec<String> {
    let mut v: Vec<String> = paths
        .filter_map(|p| p.filename().map(str::to_string))
        .collect();
    v.sort();
    v
}

fn io_err(url: &str, e: std::io::Error) -> Error {
    // object_store's BufWriter reports its own errors as io::Error wrapping object_store::Error.
    match e
        .into_inner()
        .map(|inner| inner.downcast::<object_store::Error>())
    {
        Some(Ok(os)) => map_err(url, *os),
        Some(Err(other)) => Error::ObjectStore {
            url: url.to_string(),
            kind: ObjectStoreErrorKind::Unavailable,
            reason: other.to_string(),
        },
        None => Error::ObjectStore {
            url: url.to_string(),
            kind: ObjectStoreErrorKind::Unavailable,
            reason: "upload failed".into(),
        },
    }
}

/// One `object_store` error as blipdex's, with what to do about it.
pub fn map_err(url: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    let (kind, hint) = match &e {
        E::NotFound { .. } => (
            ObjectStoreErrorKind::NotFound,
            "check the bucket and the prefix",
        ),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => (
            ObjectStoreErrorKind::Denied,
            "check the credentials in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
             GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY) and their permissions",
        ),
        E::InvalidPath { .. }
        | E::UnknownConfigurationKey { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. } => (ObjectStoreErrorKind::Config, "check the URL"),
        _ => generic_kind(&e),
    };
    Error::ObjectStore {
        url: url.to_string(),
        kind,
        reason: format!("{e}; {hint}"),
    }
}

/// `object_store` reports some HTTP failures (a missing bucket on a listing, a refused
/// signature) as `Generic`, and keeps the error type that holds the status private; its text
/// ("non-2xx status code: 404 Not Found") is the only place the status shows.
fn generic_kind(e: &object_store::Error) -> (ObjectStoreErrorKind, &'static str) {
    let text = e.to_string();
    let status = text
        .split_once("status code: ")
        .and_then(|(_, rest)| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(404) => (
            ObjectStoreErrorKind::NotFound,
            "the bucket or container does not exist: check the URL",
        ),
        Some(401 | 403) => (
            ObjectStoreErrorKind::Denied,
            "check the credentials in the environment and their permissions",
        ),
        Some(_) => (
            ObjectStoreErrorKind::Unavailable,
            "the object store failed the request; retry later",
        ),
        None => (
            ObjectStoreErrorKind::Unavailable,
            "cannot reach the object store (check the endpoint, e.g. AWS_ENDPOINT, and the \
             network); retry later",
        ),
    }
}

/// Where a local copy of the index at `url` lives below `base`: one folder per URL.
pub fn cache_dir_for(base: &Path, url: &str) -> PathBuf {
    let h = blake3::hash(url.trim_end_matches('/').as_bytes()).to_hex();
    base.join(&h.as_str()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        assert!(is_url("s3://bucket/photos"));
        assert!(is_url("GS://bucket"));
        assert!(is_url("file:///data"));
        assert!(!is_url("/data/photos"));
        assert!(!is_url("photos"));
        assert!(
            !is_url("http://example.com/x"),
            "plain HTTP is not a store we list"
        );
        assert!(!is_url("weird:name"));
        assert_eq!(
            Remote::split_url("s3://b/dir/x.jpg"),
            Some(("s3://b", "dir/x.jpg"))
        );
        assert_eq!(Remote::split_url("gs://b"), Some(("gs://b", "")));
        assert_eq!(
            Remote::split_url("file:///data/x.jpg"),
            Some(("file:///", "data/x.jpg"))
        );
    }

    #[test]
    fn file_urls_list_get_put_download() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let root = dir.path().join("bucket");
        std::fs::create_dir_all(root.join("a/b")).map_err(|e| Error::io(&root, e))?;
        std::fs::write(root.join("a/b/one.jpg"), b"1").map_err(|e| Error::io(&root, e))?;
        std::fs::write(root.join("a/two.jpg"), b"22").map_err(|e| Error::io(&root, e))?;
        let url = format!("file://{}", root.display());
        let r = Remote::open(&url, &RemoteOptions::default())?;
        r.probe()?;
        let listed = r.list()?;
        let rel: Vec<&str> = listed.iter().map(|o| o.relative.as_str()).collect();
        assert_eq!(rel, ["a/b/one.jpg", "a/two.jpg"]);
        assert_eq!(listed[1].size, 2);
        assert!(listed[1].mtime_ns > 0);
        assert_eq!(r.url_of("a/two.jpg"), format!("{url}/a/two.jpg"));
        assert_eq!(r.child("a").list_folders()?, ["b"]);
        assert_eq!(r.child("a").list_files()?, ["two.jpg"]);
        // Keys as written, brackets and spaces included.
        let odd = "Photos [2019]/a b #1.jpg";
        r.put(odd, b"odd".to_vec())?;
        let listed = r.child("Photos [2019]").list()?;
        assert_eq!(listed.len(), 1);
        assert_eq!(r.get_key(&listed[0].key)?, b"odd");
        assert_eq!(r.get_opt(odd)?.as_deref(), Some(&b"odd"[..]));
        assert_eq!(r.get_opt("a/two.jpg")?.as_deref(), Some(&b"22"[..]));
        assert_eq!(r.get_opt("a/none.jpg")?, None);
        r.put("c/new.bin", b"xyz".to_vec())?;
        let dest = dir.path().join("copy.bin");
        r.download("c/new.bin", &dest)?;
        assert_eq!(
            std::fs::read(&dest).map_err(|e| Error::io(&dest, e))?,
            b"xyz"
        );
        r.delete("c/new.bin")?;
        r.delete("c/new.bin")?;
        let missing = r.download("c/new.bin", &dest).unwrap_err();
        assert!(
            matches!(
                missing,
                Error::ObjectStore {
                    kind: ObjectStoreErrorKind::NotFound,
                    ..
                }
            ),
            "{missing}"
        );
        assert!(missing.to_string().contains("c/new.bin"), "{missing}");
        Ok(())
    }
}
