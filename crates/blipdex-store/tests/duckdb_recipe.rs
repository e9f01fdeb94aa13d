//! The README's recipes for reading an index outside Rust, run as written: its DuckDB statement
//! (the current state of every image: shard rows superseded by later rows, patches applied,
//! deleted images dropped) and its pyarrow read, against a real index, compared with what the
//! store itself serves. Python's `duckdb` and `pyarrow` are pip-installed into
//! `target/pydeps` when missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blipdex_store::{Batch, Store, StoreOptions};
use common::Synth;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The README's first code block in `lang`.
fn readme_block(lang: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let fence = format!("```{lang}\n");
    let start = readme.find(&fence).expect("such a block in the README") + fence.len();
    let len = readme[start..].find("```").expect("the block's end");
    readme[start..start + len].to_string()
}

/// A python3 that imports duckdb and pyarrow (installing them into target/pydeps if needed),
/// and the PYTHONPATH that makes it so.
fn python() -> (String, String) {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let deps = repo().join("target/pydeps");
    let path = deps.to_string_lossy().into_owned();
    let imports = |p: &str| {
        Command::new(&py)
            .args(["-c", "import duckdb, pyarrow"])
            .env("PYTHONPATH", p)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !imports(&path) {
        let st = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&deps)
            .args(["duckdb", "pyarrow"])
            .status()
            .expect("run pip");
        assert!(
            st.success(),
            "pip install duckdb pyarrow into {path} failed"
        );
        assert!(
            imports(&path),
            "duckdb/pyarrow still not importable from {path}"
        );
    }
    (py, path)
}

fn run_python(script: &str, index: &Path) -> serde_json::Value {
    let (py, path) = python();
    let out = Command::new(py)
        .args(["-c", script])
        .arg(index)
        .env("PYTHONPATH", path)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the script")
}

/// An index whose current state needs every rule: superseded rows, path and caption patches,
/// deletes (by patch and by a path gone), an image re-added in a later shard.
fn build(dir: &Path) -> Store {
    let s = Synth::new(2, 8, 4, 7);
    let mut store = Store::create_or_open(dir, StoreOptions::new("fp", 2, 8)).unwrap();
    let mut b = Batch::new();
    for i in 0..6 {
        let mut r = s.record(i);
        // EXIF read at ingest for some; 4 gets it later by patch; 1 never.
        r.meta = i.is_multiple_of(2).then(|| s.photo(i));
        b.add(r);
    }
    store.commit(b).unwrap();
    let mut b = Batch::new();
    b.set_meta(3, s.photo(3));
    store.commit(b).unwrap();
    store.set_caption(1, "a cat on a blanket").unwrap();
    // Superseded by image 5's later row (re-added below): a patch older than the current row.
    store.set_caption(5, "replaced by the later row").unwrap();
    store.mark_deleted(&[2]).unwrap();
    let mut b = Batch::new();
    b.add_path(3, "/elsewhere/three.jpg");
    b.remove_path(s.record(3).path);
    b.remove_path(s.record(4).path);
    let mut copy = s.record(0);
    copy.path = "/backup/zero.jpg".into();
    copy.paths = vec![copy.path.clone()];
    copy.caption = Some("given again".into());
    b.add(copy);
    b.add(s.record(6));
    let mut five = s.record(5);
    five.path = "/backup/five.jpg".into();
    five.paths = vec![five.path.clone()];
    b.add(five);
    store.commit(b).unwrap();
    store.set_caption(0, "captioned after its new row").unwrap();
    store
}

#[test]
fn readme_duckdb_statement_gives_the_stores_current_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = build(dir.path());
    let want: Vec<serde_json::Value> = store
        .iter()
        .map(|r| {
            let m = r.meta.unwrap_or_default();
            serde_json::json!([
                r.image_id,
                r.path,
                r.paths,
                r.caption,
                r.content_hash,
                m.taken_at,
                m.camera_make,
                m.camera_model,
                m.gps_lat,
                m.gps_lon
            ])
        })
        .collect();
    let mut want = want;
    want.sort_by_key(|v| v[0].as_u64());
    assert_eq!(want.len(), 5, "images 0, 1, 3, 5, 6 are live");
    let script = format!(
        r#"
import json, sys, duckdb
index = sys.argv[1].rstrip('/') + '/'
sql = {sql:?}.replace("'index/", "'" + index)
rows = duckdb.sql(sql).fetchall()
import calendar
when = lambda t: None if t is None else calendar.timegm(t.timetuple())
out = [[r[0], r[1], list(r[2]), r[3], r[4], when(r[5]), r[6], r[7], r[8], r[9]] for r in rows]
print(json.dumps(out))
"#,
        sql = readme_block("sql")
    );
    let got = run_python(&script, dir.path());
    assert_eq!(got, serde_json::Value::Array(want));
}

#[test]
fn readme_pyarrow_read_works_without_pandas() {
    let dir = tempfile::tempdir().unwrap();
    let store = build(dir.path());
    let script = format!(
        "import json, sys\nimport pyarrow.parquet as pq\nindex = sys.argv[1]\n{}\n\
         print(json.dumps(sorted({{r['image_id'] for r in rows}})))",
        readme_block("python").replace("'index/", "index + '/")
    );
    let got = run_python(&script, dir.path());
    // Every row ever written (superseded ones too): the shard files' rows.
    let mut ids: Vec<u64> = store.iter().map(|r| r.image_id).collect();
    ids.extend([2, 4]);
    ids.sort_unstable();
    assert_eq!(got, serde_json::json!(ids));
}
