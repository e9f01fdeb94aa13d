//! The Ray launcher (`pipelines/ray_ingest.py`) on a real local Ray cluster: a head and a second
//! node started with `ray start` on 127.0.0.1, two shards, one worker killed -9 after its first
//! commit and retried by Ray, then the merge; the result equals one ingest of the same photos.
//! `ray` is pip-installed into `target/pydeps` when missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn s(p: &Path) -> Result<&str> {
    p.to_str().context("utf-8 path")
}

/// python3 with `ray` importable through PYTHONPATH=target/pydeps (installed there if needed).
fn python() -> Result<(String, PathBuf)> {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let deps = repo().join("target/pydeps");
    let imports = || {
        Command::new(&py)
            .args(["-c", "import ray"])
            .env("PYTHONPATH", &deps)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !imports() {
        let st = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&deps)
            .arg("ray")
            .status()?;
        ensure!(
            st.success() && imports(),
            "pip install ray into {deps:?} failed"
        );
    }
    Ok((py, deps))
}

/// `ray start`/`ray stop` of this test's cluster; stopped on drop, whatever happened.
struct Cluster {
    py: String,
    deps: PathBuf,
}

impl Cluster {
    fn ray(&self, args: &[&str]) -> Result<()> {
        let o = Command::new(&self.py)
            .arg(self.deps.join("bin/ray"))
            .args(args)
            .env("PYTHONPATH", &self.deps)
            .env("RAY_AUTH_MODE", "disabled")
            .output()?;
        ensure!(
            o.status.success(),
            "ray {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.ray(&["stop", "--force"]);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn last_json(out: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(out);
    let last = text.lines().last().context("no output")?;
    Ok(serde_json::from_str(last)?)
}

/// Content hash → sorted paths of every live image.
fn contents(index: &Path) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
    let store = blipdex_store::Store::open_readonly(index)?;
    Ok(store
        .iter()
        .map(|r| {
            let mut p = r.paths.clone();
            p.sort();
            (r.content_hash, p)
        })
        .collect())
}

#[test]
fn ray_driver_retries_a_killed_shard_and_merges() -> Result<()> {
    let (py, deps) = python()?;
    let tmp = tempfile::tempdir()?;
    let folder = tmp.path().join("photos");
    std::fs::create_dir_all(&folder)?;
    // Distinct bytes per file (a trailer after the JPEG's end): many commits per shard.
    let jpeg = std::fs::read(repo().join("tests/fixtures/photos/rocket.jpg"))?;
    for i in 0..24 {
        let mut bytes = jpeg.clone();
        bytes.extend_from_slice(format!("copy {i}").as_bytes());
        std::fs::write(folder.join(format!("img{i:03}.jpg")), bytes)?;
    }
    let model = repo().join("tests/fixtures/models/itm-a");
    let bin = env!("CARGO_BIN_EXE_blipdex");
    let single = tmp.path().join("single");
    let one = Command::new(bin)
        .args(["ingest", "--index", s(&single)?, "--model", s(&model)?])
        .args([s(&folder)?, "--json"])
        .output()?;
    ensure!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );

    let port = free_port()?.to_string();
    let address = format!("127.0.0.1:{port}");
    let cluster = Cluster { py, deps };
    let head = [
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        &port,
        "--num-cpus",
        "1",
        "--include-dashboard",
        "false",
        "--disable-usage-stats",
    ];
    cluster.ray(&head)?;
    cluster.ray(&["start", "--address", &address, "--num-cpus", "1"])?;

    let index = tmp.path().join("index");
    let out = Command::new(&cluster.py)
        .arg(repo().join("pipelines/ray_ingest.py"))
        .args([
            "--address",
            &address,
            "--shards",
            "2",
            "--index",
            s(&index)?,
        ])
        .args(["--blipdex", bin, "--kill-after-first-commit", "1", "--"])
        .args([
            "--model",
            s(&model)?,
            "--batch-size",
            "1",
            "--commit-every",
            "1",
        ])
        .args(["--decode-threads", "1", s(&folder)?])
        .env("PYTHONPATH", &cluster.deps)
        .env("RAY_AUTH_MODE", "disabled")
        .output()?;
    ensure!(
        out.status.success(),
        "driver: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = last_json(&out.stdout)?;
    // The kill landed mid-shard (after the first commit) and Ray's retry finished the part.
    let killed = index.join("parts/.killed-shard-00001-of-00002");
    ensure!(killed.is_file(), "shard 1 was not killed: {summary}");
    ensure!(summary["merge"]["parts"] == 2, "{summary}");
    ensure!(summary["merge"]["images"] == 24, "{summary}");
    ensure!(
        contents(&index)? == contents(&single)?,
        "the merged index differs from one ingest"
    );
    ensure!(
        summary["ray_overhead_per_shard_s"].as_f64().is_some(),
        "{summary}"
    );
    eprintln!(
        "ray: 2 shards in {:.1} s, Ray's overhead per shard {:.2} s",
        summary["shards_wall_s"].as_f64().unwrap_or(0.0),
        summary["ray_overhead_per_shard_s"].as_f64().unwrap_or(0.0)
    );
    drop(cluster);
    Ok(())
}
