//! Listing files as ingest input, as img2dataset and clip-retrieval write them: a text file with
//! one path or URL a line, or a CSV/TSV or Parquet file with a column of them (`url` by
//! default). The listing itself may be local or on object storage.
//!
//! Entries are object-store URLs (`s3://bucket/key`, any bucket) or local paths (relative ones
//! relative to a local listing's folder). An object named by a listing is taken as immutable:
//! no request is made per entry before its bytes are read (a HEAD per object would cost as much
//! as the listing is meant to save), and an entry indexed by an earlier run is not read again.
//! A listing only adds: an entry that a later listing no longer names stays indexed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use blipdex_core::{Error, Result};
use blipdex_remote::{is_url, Remote, RemoteOptions};

use crate::walk::{mtime_ns, FileEntry, Filters, ObjectSource, WalkProblem};

/// Extensions of listing files.
const LISTING_EXTENSIONS: &[&str] = &["txt", "csv", "tsv", "parquet"];

/// Whether an ingest root is a listing: a name ending in `.txt`, `.csv`, `.tsv` or `.parquet`
/// that is a file (locally) or an object URL.
pub fn is_listing(root: &Path) -> bool {
    let ext_ok = root
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| LISTING_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
    ext_ok && (crate::job::is_url(root) || root.is_file())
}

/// One object store per `scheme://bucket`, opened once (or failed once). Not probed with a
/// listing: a listing's buckets may allow reading objects only, and each entry's read says what
/// is wrong with it.
#[derive(Default)]
pub struct Stores {
    by_root: HashMap<String, Result<Remote>>,
}

impl Stores {
    fn get(&mut self, root: &str, opts: &RemoteOptions) -> Result<&Remote> {
        self.by_root
            .entry(root.to_string())
            .or_insert_with(|| Remote::open(root, opts))
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// The entries of the listing at `listing` (`column`: the CSV/Parquet column of paths or
/// URLs), filtered by the job's globs (not by extension: a listing names its files).
pub fn read_listing(
    listing: &Path,
    column: &str,
    filters: &Filters,
    opts: &RemoteOptions,
    stores: &mut Stores,
) -> Result<(Vec<FileEntry>, Vec<WalkProblem>)> {
    let name = listing.to_string_lossy().into_owned();
    let (bytes, base) = if crate::job::is_url(listing) {
        let (root, key) = Remote::split_url(&name)
            .ok_or_else(|| Error::InvalidArgument(format!("listing {name}: not a URL")))?;
        let remote = stores.get(root, opts)?;
        (remote.get_key(&remote.key(key))?, None)
    } else {
        let bytes = std::fs::read(listing).map_err(|e| Error::io(listing, e))?;
        // Entries relative to the listing's folder, stored as absolute paths (the same however
        // the listing was named on the command line, so workers shard alike).
        let canonical = std::fs::canonicalize(listing).map_err(|e| Error::io(listing, e))?;
        (bytes, canonical.parent().map(Path::to_path_buf))
    };
    let ext = listing
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let bad = |why: String| Error::InvalidArgument(format!("listing {name}: {why}"));
    let items = match ext.as_str() {
        "txt" => String::from_utf8(bytes)
            .map_err(|_| bad("not UTF-8 text".into()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect(),
        "csv" | "tsv" => {
            read_csv(&bytes, if ext == "tsv" { b'\t' } else { b',' }, column).map_err(bad)?
        }
        _ => read_parquet(bytes, column).map_err(bad)?,
    };
    let mut files = Vec::with_capacity(items.len());
    let mut problems = Vec::new();
    for item in items {
        if is_url(&item) {
            let Some((root, key)) = Remote::split_url(&item) else {
                continue;
            };
            let path = PathBuf::from(&item);
            if !filters.wants_listed(&path) {
                continue;
            }
            match stores.get(root, opts) {
                Ok(remote) => files.push(FileEntry {
                    path,
                    size: 0,
                    mtime_ns: 0,
                    object: Some(ObjectSource {
                        remote: remote.clone(),
                        key: remote.key(key),
                    }),
                    listed: true,
                }),
                // The whole bucket is unusable (missing, denied): every entry in it is refused,
                // each with the reason.
                Err(e) => problems.push(WalkProblem {
                    path,
                    reason: e.to_string(),
                }),
            }
        } else {
            let p = PathBuf::from(&item);
            let path = match (&base, p.is_relative()) {
                (Some(b), true) => b.join(p),
                _ => p,
            };
            if !filters.wants_listed(&path) {
                continue;
            }
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => files.push(FileEntry {
                    size: m.len(),
                    mtime_ns: mtime_ns(&m),
                    path,
                    object: None,
                    listed: false,
                }),
                Ok(_) => problems.push(WalkProblem {
                    path,
                    reason: "not a regular file".into(),
                }),
                Err(e) => problems.push(WalkProblem {
                    path,
                    reason: format!("listed in {name}: {e}"),
                }),
            }
        }
    }
    Ok((files, problems))
}

fn read_csv(bytes: &[u8], delimiter: u8, column: &str) -> std::result::Result<Vec<String>, String> {
    let mut r = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_reader(bytes);
    let headers = r.headers().map_err(|e| e.to_string())?.clone();
    let i = headers.iter().position(|h| h == column).ok_or_else(|| {
        format!(
            "no column {column:?} (columns: {}); give --listing-column",
            headers.iter().collect::<Vec<_>>().join(", ")
        )
    })?;
    let mut out = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| e.to_string())?;
        if let Some(v) = rec.get(i).map(str::trim).filter(|v| !v.is_empty()) {
            out.push(v.to_string());
        }
    }
    Ok(out)
}

fn read_parquet(bytes: Vec<u8>, column: &str) -> std::result::Result<Vec<String>, String> {
    use arrow::array::{Array, LargeStringArray, StringArray, StringViewArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ProjectionMask;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .map_err(|e| e.to_string())?;
    let fields = builder.parquet_schema().columns();
    let i = fields
        .iter()
        .position(|c| c.path().string() == column)
        .ok_or_else(|| {
            format!(
                "no column {column:?} (columns: {}); give --listing-column",
                fields
                    .iter()
                    .map(|c| c.path().string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let mask = ProjectionMask::leaves(builder.parquet_schema(), [i]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let col = batch.column(0);
        let any = col.as_any();
        let mut push = |v: Option<&str>| {
            if let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) {
                out.push(v.to_string());
            }
        };
        if let Some(a) = any.downcast_ref::<StringArray>() {
            a.iter().for_each(&mut push);
        } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
            a.iter().for_each(&mut push);
        } else if let Some(a) = any.downcast_ref::<StringViewArray>() {
            a.iter().for_each(&mut push);
        } else {
            return Err(format!(
                "column {column:?} holds {}, not strings",
                col.data_type()
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters() -> Filters {
        Filters::new(&[], &[]).expect("filters")
    }

    #[test]
    fn text_csv_and_parquet_listings() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let io = |e| Error::io(d.path(), e);
        std::fs::write(d.path().join("a.jpg"), b"x").map_err(io)?;
        std::fs::write(d.path().join("b.png"), b"yy").map_err(io)?;
        let txt = d.path().join("list.txt");
        std::fs::write(&txt, "# photos\na.jpg\n\n  b.png  \nmissing.jpg\n").map_err(io)?;
        assert!(is_listing(&txt));
        let opts = RemoteOptions::default();
        let mut stores = Stores::default();
        let (files, problems) = read_listing(&txt, "url", &filters(), &opts, &mut stores)?;
        let names: Vec<_> = files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(names, [d.path().join("a.jpg"), d.path().join("b.png")]);
        assert_eq!(files[1].size, 2);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].path.ends_with("missing.jpg"));

        let csv = d.path().join("list.csv");
        std::fs::write(&csv, "caption,url\n\"a, photo\",a.jpg\nother,b.png\n").map_err(io)?;
        let (files, _) = read_listing(&csv, "url", &filters(), &opts, &mut stores)?;
        assert_eq!(files.len(), 2);
        let err = read_listing(&csv, "uri", &filters(), &opts, &mut stores).unwrap_err();
        assert!(
            err.to_string().contains("caption, url"),
            "names the columns: {err}"
        );

        // Parquet with a URL column on object storage (file://) and a local path.
        let bucket = d.path().join("bucket");
        std::fs::create_dir_all(&bucket).map_err(io)?;
        std::fs::write(bucket.join("c.jpg"), b"zzz").map_err(io)?;
        let url = format!("file://{}/c.jpg", bucket.display());
        let pq = d.path().join("list.parquet");
        {
            use arrow::array::{ArrayRef, StringArray};
            let col: ArrayRef = std::sync::Arc::new(StringArray::from(vec![
                Some(url.as_str()),
                None,
                Some("a.jpg"),
            ]));
            let batch = arrow::record_batch::RecordBatch::try_from_iter([("url", col)])
                .map_err(|e| Error::Internal(e.to_string()))?;
            let f = std::fs::File::create(&pq).map_err(io)?;
            let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None)
                .map_err(|e| Error::Internal(e.to_string()))?;
            w.write(&batch)
                .and_then(|_| w.close().map(|_| ()))
                .map_err(|e| Error::Internal(e.to_string()))?;
        }
        let (files, problems) = read_listing(&pq, "url", &filters(), &opts, &mut stores)?;
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path, PathBuf::from(&url));
        assert!(files[0].listed);
        assert_eq!(files[0].read()?, b"zzz");
        assert_eq!(files[1].path, d.path().join("a.jpg"));
        Ok(())
    }
}
