//! The Ray launcher (`pipelines/ray_ingest.py`) on a real local Ray cluster: a head and a second
//! node started with `ray start` on 127.0.0.1, photos and index in an S3-compatible server (moto)
//! on 127.0.0.1, two shards, one worker killed -9 after its first commit and retried by Ray, then
//! the merge; the index in the bucket equals one ingest of the same photos, scores included.
//! `ray` and `moto` are pip-installed into `target/` when missing.

mod common;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::{contents, copy_under, python_with, repo, s, Moto};
use serde_json::Value;

/// `ray start`/`ray stop` of this test's cluster; stopped on drop, whatever happened.
struct Cluster {
    py: String,
    deps: PathBuf,
    /// The object store's settings, for every node's workers.
    env: Vec<(&'static str, String)>,
}

impl Cluster {
    fn ray(&self, args: &[&str]) -> Result<()> {
        let o = Command::new(&self.py)
            .arg(self.deps.join("bin/ray"))
            .args(args)
            .env("PYTHONPATH", &self.deps)
            .env("RAY_AUTH_MODE", "disabled")
            .envs(self.env.clone())
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

#[test]
fn ray_driver_retries_a_killed_shard_and_merges() -> Result<()> {
    let (py, deps) = python_with("pydeps", "ray", "ray")?;
    let moto = Moto::start()?;
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
    moto.upload_album(&folder)?;
    let photos = "s3://photos/album";
    let model = repo().join("tests/fixtures/models/itm-a");
    let bin = env!("CARGO_BIN_EXE_blipdex");
    let single = tmp.path().join("single");
    let one = moto.blipdex(&[
        "ingest",
        "--index",
        s(&single)?,
        "--model",
        s(&model)?,
        photos,
        "--json",
    ])?;
    ensure!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );

    let port = free_port()?.to_string();
    let address = format!("127.0.0.1:{port}");
    let cluster = Cluster {
        py,
        deps,
        env: moto.env(),
    };
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

    let index = "s3://idx/ray";
    let cache = tmp.path().join("node-cache");
    let out = Command::new(&cluster.py)
        .arg(repo().join("pipelines/ray_ingest.py"))
        .args([
            "--address",
            &address,
            "--shards",
            "2",
            "--index",
            index,
            "--cache-dir",
            s(&cache)?,
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
        .args(["--decode-threads", "1", photos])
        .env("PYTHONPATH", &cluster.deps)
        .env("RAY_AUTH_MODE", "disabled")
        .envs(moto.env())
        .output()?;
    ensure!(
        out.status.success(),
        "driver: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = last_json(&out.stdout)?;
    // The kill landed mid-shard (after the first commit) and Ray's retry finished the part.
    let killed = cache.join(".killed-shard-00001-of-00002");
    ensure!(killed.is_file(), "shard 1 was not killed: {summary}");
    ensure!(summary["merge"]["parts"] == 2, "{summary}");
    ensure!(summary["merge"]["images"] == 24, "{summary}");
    // What the bucket holds, read by a fresh machine: the images, paths and scores of one ingest.
    let reader = tmp.path().join("reader");
    let (a, b) = (
        moto.scores(index, &reader)?,
        moto.scores(s(&single)?, &reader)?,
    );
    ensure!(
        contents(&copy_under(&reader)?)? == contents(&single)?,
        "the merged index differs from one ingest"
    );
    ensure!(a.len() == 24 && a.len() == b.len(), "{a:?} {b:?}");
    for ((pa, sa), (pb, sb)) in a.iter().zip(&b) {
        ensure!(
            pa == pb && (sa - sb).abs() <= 1e-5,
            "{pa} {sa} vs {pb} {sb}"
        );
    }
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
