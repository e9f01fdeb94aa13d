//! Ingest, workers, merge and search on an S3-compatible server: `moto` in server mode on
//! 127.0.0.1 (pip-installed into `target/pydeps-moto` when missing), photos and index both in
//! buckets. A worker killed -9 mid-shard and a half-uploaded attempt leave nothing merged that
//! is incomplete; after the rerun and the merge, search answers as one ingest of the same
//! photos does. Bad input: a missing bucket, an unreachable endpoint, a corrupt part.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{contents, copy_under, repo, s, Moto};
use serde_json::Value;

fn ok(o: &Output) -> Result<Value> {
    ensure!(
        o.status.success(),
        "blipdex failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    Ok(serde_json::from_str(
        text.lines().last().context("no output")?,
    )?)
}

fn failed(o: &Output) -> Result<String> {
    ensure!(!o.status.success(), "expected a failure");
    Ok(String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn workers_on_s3_killed_and_retried_merge_to_one_ingest() -> Result<()> {
    let moto = Moto::start()?;
    let tmp = tempfile::tempdir()?;
    let folder = tmp.path().join("photos");
    std::fs::create_dir_all(&folder)?;
    // The fixture photos, each several times with distinct bytes (a trailer after the image's
    // end), plus one pair of identical files: a duplicate that may land in two shards.
    let fixtures = [
        "rocket.jpg",
        "astronaut.jpg",
        "camera_gray.png",
        "chelsea_alpha.png",
    ];
    for i in 0..16 {
        let name = fixtures[i % fixtures.len()];
        let mut bytes = std::fs::read(repo().join("tests/fixtures/photos").join(name))?;
        bytes.extend_from_slice(format!("copy {i}").as_bytes());
        let ext = name.rsplit('.').next().unwrap_or("jpg");
        std::fs::write(folder.join(format!("img{i:03}.{ext}")), bytes)?;
    }
    std::fs::copy(folder.join("img004.jpg"), folder.join("again.jpg"))?;
    moto.upload_album(&folder)?;
    let model = repo().join("tests/fixtures/models/itm-a");
    let model = s(&model)?;
    let photos = "s3://photos/album";
    let index = "s3://idx/main";

    // One machine, a local index: the reference.
    let single = tmp.path().join("single");
    let one = ok(&moto.blipdex(&[
        "ingest",
        "--index",
        s(&single)?,
        "--model",
        model,
        photos,
        "--json",
    ])?)?;
    ensure!(one["indexed"] == 16 && one["duplicates"] == 1, "{one}");

    // Worker 0 completes; worker 1 is killed -9 right after its first commit.
    let worker = |shard: &str, cache: &Path| -> Result<Command> {
        let mut c = Command::new(env!("CARGO_BIN_EXE_blipdex"));
        c.args([
            "ingest", "--index", index, "--shard", shard, "--model", model,
        ])
        .args([
            "--cache-dir",
            s(cache)?,
            "--batch-size",
            "1",
            "--commit-every",
            "1",
        ])
        .args(["--decode-threads", "1", "--json", photos])
        .envs(moto.env());
        Ok(c)
    };
    let (cache0, cache1) = (tmp.path().join("node0"), tmp.path().join("node1"));
    let w0 = worker("0/2", &cache0)?.output()?;
    ok(&w0)?;
    let mut w1 = worker("1/2", &cache1)?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let killed = loop {
        let committed = std::fs::read_dir(&cache1)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path().join("parts/shard-00001-of-00002/manifest.json"))
            .filter_map(|m| std::fs::read(m).ok())
            .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
            .any(|m| m["generation"].as_u64().unwrap_or(0) >= 2);
        if committed {
            w1.kill()?;
            w1.wait()?;
            break true;
        }
        if w1.try_wait()?.is_some() || Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    ensure!(
        killed,
        "worker 1 finished before its kill: the test needs a kill mid-shard"
    );
    ensure!(
        !moto
            .keys("idx", "main/parts/shard-00001-of-00002/DONE")?
            .iter()
            .any(|k| k.ends_with("/DONE")),
        "a killed worker must not mark its part done"
    );
    // A worker killed mid-upload: an attempt with some files and no DONE.
    moto.boto(
        "s3.put_object(Bucket='idx', Key='main/parts/shard-00001-of-00002/attempt-0000dead/\
         shard-0000000001.parquet', Body=b'half an upload')",
    )?;
    let cache_merge = tmp.path().join("merger");
    let merge = |cache: &Path| -> Result<Output> {
        moto.blipdex(&["index", "merge", "--index", index, "--cache-dir", s(cache)?])
    };
    let partial = ok(&merge(&cache_merge)?)?;
    ensure!(partial["parts"] == 1, "only the finished part: {partial}");
    ensure!(
        partial["unfinished"].as_array().map(Vec::len) == Some(1),
        "{partial}"
    );

    // The retried worker resumes its part from its local copy and publishes it.
    ok(&worker("1/2", &cache1)?.output()?)?;
    let merged = ok(&merge(&cache_merge)?)?;
    ensure!(merged["parts"] == 2 && merged["images"] == 16, "{merged}");
    let again = ok(&merge(&tmp.path().join("other-merger"))?)?;
    ensure!(
        again["added"] == 0 && again["updated"] == 0 && again["images"] == 16,
        "merging again changes nothing: {again}"
    );

    // A fresh machine reads the merged index from the bucket: the same images, paths and
    // scores as the one-machine ingest.
    let reader = tmp.path().join("reader");
    let remote_scores = moto.scores(index, &reader)?;
    let local_scores = moto.scores(s(&single)?, &reader)?;
    // One hit per image (the duplicate pair is one image).
    ensure!(remote_scores.len() == 16, "{remote_scores:?}");
    ensure!(remote_scores.len() == local_scores.len());
    for ((pa, sa), (pb, sb)) in remote_scores.iter().zip(&local_scores) {
        ensure!(
            pa == pb && (sa - sb).abs() <= 1e-5,
            "{pa} {sa} vs {pb} {sb}"
        );
    }
    ensure!(contents(&copy_under(&reader)?)? == contents(&single)?);
    // ITM reranking reads the photos back from the bucket (no vision cache here).
    let reranked = ok(&moto.blipdex(&[
        "search",
        "--index",
        index,
        "--cache-dir",
        s(&reader)?,
        "--model",
        model,
        "--query",
        "a rocket",
        "--top-k",
        "3",
        "--rerank",
        "3",
        "--json",
    ])?)?;
    let hits = reranked["hits"].as_array().context("hits")?;
    ensure!(hits.len() == 3, "{reranked}");
    for h in hits {
        ensure!(h["itm_score"].is_f64() && h.get("error").is_none(), "{h}");
    }

    // A corrupt part: its shard file replaced by junk. The merge names the upload and
    // publishes nothing.
    let done = moto.boto(
        "print(s3.get_object(Bucket='idx', Key='main/parts/shard-00000-of-00002/DONE')['Body'].read().decode())",
    )?;
    let attempt = serde_json::from_str::<Value>(done.trim())?["attempt"]
        .as_str()
        .context("attempt")?
        .to_string();
    let shard_key = moto
        .keys(
            "idx",
            &format!("main/parts/shard-00000-of-00002/{attempt}/shard-"),
        )?
        .into_iter()
        .find(|k| k.ends_with(".parquet"))
        .context("a shard of the part")?;
    let before = moto.keys("idx", "main/manifest.json")?;
    let manifest_before =
        moto.boto("print(s3.get_object(Bucket='idx', Key='main/manifest.json')['ETag'])")?;
    moto.boto(&format!(
        "s3.put_object(Bucket='idx', Key='{shard_key}', Body=b'not parquet at all')"
    ))?;
    let err = failed(&merge(&tmp.path().join("third-merger"))?)?;
    ensure!(err.contains(&attempt), "the error names the upload: {err}");
    ensure!(before.len() == 1);
    let manifest_after =
        moto.boto("print(s3.get_object(Bucket='idx', Key='main/manifest.json')['ETag'])")?;
    ensure!(manifest_before == manifest_after, "nothing was published");

    // A listing on object storage (img2dataset's CSV with a url column) naming three objects:
    // indexed once, then taken as immutable (not read again).
    moto.boto(
        "s3.put_object(Bucket='photos', Key='lists/part-0.csv', Body=b'url,caption\\n\
         s3://photos/album/img000.jpg,a\\ns3://photos/album/img001.jpg,b\\n\
         s3://photos/album/img002.png,c\\n')",
    )?;
    let listed_index = tmp.path().join("listed");
    let listed = |extra: &[&str]| -> Result<Value> {
        let mut args = vec![
            "ingest",
            "--index",
            s(&listed_index)?,
            "--model",
            model,
            "--json",
        ];
        args.extend_from_slice(extra);
        ok(&moto.blipdex(&args)?)
    };
    let first = listed(&["s3://photos/lists/part-0.csv"])?;
    ensure!(first["indexed"] == 3 && first["rejected"] == 0, "{first}");
    let second = listed(&["s3://photos/lists/part-0.csv"])?;
    ensure!(
        second["unchanged"] == 3 && second["indexed"] == 0,
        "{second}"
    );

    // Bad locations fail before any work, naming the thing.
    let err = failed(&moto.blipdex(&[
        "ingest",
        "--index",
        s(&tmp.path().join("never"))?,
        "--model",
        model,
        "s3://no-such-bucket/photos",
    ])?)?;
    ensure!(
        err.contains("s3://no-such-bucket/photos") && err.contains("does not exist"),
        "{err}"
    );
    ensure!(!tmp.path().join("never/manifest.json").exists());
    let started = Instant::now();
    let dead = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args([
            "ingest",
            "--index",
            "s3://idx/other",
            "--model",
            model,
            photos,
        ])
        .args(["--object-store-retries", "1"])
        .envs(moto.env())
        .env("AWS_ENDPOINT", "http://127.0.0.1:9")
        .output()?;
    let err = failed(&dead)?;
    ensure!(err.contains("cannot reach"), "{err}");
    ensure!(started.elapsed() < Duration::from_secs(60));
    Ok(())
}

/// Refused credentials: a server that checks signatures (moto with authentication on from the
/// first request) and keys it does not know.
#[test]
fn refused_credentials_fail_before_any_work() -> Result<()> {
    let moto = Moto::start_with(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")])?;
    let tmp = tempfile::tempdir()?;
    let model = repo().join("tests/fixtures/models/itm-a");
    let index = tmp.path().join("index");
    let out = moto.blipdex(&[
        "ingest",
        "--index",
        s(&index)?,
        "--model",
        s(&model)?,
        "s3://photos/album",
    ])?;
    let err = failed(&out)?;
    ensure!(
        err.contains("s3://photos/album") && err.contains("credentials"),
        "{err}"
    );
    ensure!(!index.join("manifest.json").exists(), "nothing written");
    Ok(())
}

/// The `blipdex_index_images` sample of a server's /metrics, if it answers.
fn served_images(metrics: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(metrics).ok()?;
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    c.read_to_string(&mut body).ok()?;
    let loaded = body.lines().any(|l| l.trim() == "blipdex_model_loaded 1");
    let images = body
        .lines()
        .find_map(|l| l.trim().strip_prefix("blipdex_index_images "))
        .and_then(|v| v.trim().parse().ok());
    images.filter(|_| loaded)
}

/// `serve --index s3://...` answers from a local copy and follows what a later ingest publishes
/// (an ingest of its own, not a worker: pulled, extended and pushed back).
#[test]
fn serve_follows_an_index_on_s3() -> Result<()> {
    let moto = Moto::start()?;
    let tmp = tempfile::tempdir()?;
    let photos = repo().join("tests/fixtures/photos");
    moto.boto(&format!(
        "s3.create_bucket(Bucket='photos')\ns3.create_bucket(Bucket='idx')\n\
         for n in ['rocket.jpg', 'astronaut.jpg', 'camera_gray.png']:\n\
         \x20   s3.upload_file('{0}/' + n, 'photos', 'album/' + n)\n",
        s(&photos)?
    ))?;
    let model = repo().join("tests/fixtures/models/itm-a");
    let ingest = || -> Result<Value> {
        ok(&moto.blipdex(&[
            "ingest",
            "--index",
            "s3://idx/main",
            "--cache-dir",
            s(&tmp.path().join("ingester"))?,
            "--model",
            s(&model)?,
            "s3://photos/album",
            "--json",
        ])?)
    };
    ensure!(ingest()?["indexed"] == 3);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let mut server = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args(["serve", "--index", "s3://idx/main", "--model", s(&model)?])
        .args(["--cache-dir", s(&tmp.path().join("server"))?])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", &metrics])
        .args(["--refresh-ms", "200"])
        .envs(moto.env())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let wait_for = |n: u64| -> bool {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if served_images(&metrics) == Some(n) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    };
    let first = wait_for(3);
    let mut second = false;
    if first {
        moto.boto(&format!(
            "for n in ['chelsea_alpha.png', 'coffee_palette.gif']:\n\
             \x20   s3.upload_file('{0}/' + n, 'photos', 'album/' + n)\n",
            s(&photos)?
        ))?;
        ensure!(ingest()?["indexed"] == 2);
        second = wait_for(5);
    }
    let _ = server.kill();
    let _ = server.wait();
    ensure!(
        first,
        "the server did not serve the 3 images of the bucket's index"
    );
    ensure!(
        second,
        "the server did not pick up the generation a later ingest published"
    );
    Ok(())
}

/// The shipped Kubernetes Indexed Job and Slurm array script, through their environment
/// contract: each engine's variables pick the shard, each worker publishes its part to the
/// bucket, and the merge of both parts holds every photo once.
#[test]
fn kubernetes_and_slurm_entry_points() -> Result<()> {
    let moto = Moto::start()?;
    let tmp = tempfile::tempdir()?;
    let photos = repo().join("tests/fixtures/photos");
    moto.upload_album(&photos)?;
    let model = repo().join("tests/fixtures/models/itm-a");
    let merged = |index: &str| -> Result<Value> {
        ok(&moto.blipdex(&[
            "index",
            "merge",
            "--index",
            index,
            "--cache-dir",
            s(&tmp.path().join(format!("merge-{}", index.len())))?,
        ])?)
    };

    // Kubernetes: the container's args from the manifest, run as pods 0 and 1 of 2, with the
    // manifest's bucket and checkpoint replaced by the test's.
    let yaml = std::fs::read_to_string(repo().join("pipelines/k8s-indexed-job.yaml"))?;
    let start = yaml.find("args: [").context("args in the manifest")? + "args: ".len();
    let end = start + yaml[start..].find(']').context("end of args")? + 1;
    let args: Vec<String> = serde_json::from_str(&yaml[start..end])?;
    let cache = tmp.path().join("pod-cache");
    let args: Vec<String> = args
        .into_iter()
        .map(|a| match a.as_str() {
            "16" => "2".into(),
            "s3://my-bucket/blipdex-index" => "s3://idx/k8s".into(),
            "s3://my-bucket/photos" => "s3://photos/album".into(),
            "/cache" => cache.display().to_string(),
            "/models/blip2-itm-vit-g" => model.display().to_string(),
            "cuda" => "cpu".into(),
            "f16" => "f32".into(),
            _ => a,
        })
        .collect();
    for pod in 0..2 {
        let o = Command::new(env!("CARGO_BIN_EXE_blipdex"))
            .args(&args)
            .envs(moto.env())
            .env("JOB_COMPLETION_INDEX", pod.to_string())
            .output()?;
        ensure!(
            o.status.success(),
            "pod {pod}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let parts = moto.keys("idx", "k8s/parts/")?;
    for shard in ["shard-00000-of-00002", "shard-00001-of-00002"] {
        ensure!(
            parts.contains(&format!("k8s/parts/{shard}/DONE")),
            "{shard} not published: {parts:?}"
        );
    }
    let m = merged("s3://idx/k8s")?;
    ensure!(m["parts"] == 2 && m["images"] == 5, "{m}");

    // Slurm: array tasks 1 and 2 of `--array=1-2`, through the shipped script.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_blipdex"))
        .parent()
        .context("binary folder")?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for task in 1..=2 {
        let o = Command::new("bash")
            .arg(repo().join("pipelines/slurm-array.sh"))
            .args(["s3://photos/album", "s3://idx/slurm"])
            .envs(moto.env())
            .env("PATH", &path)
            .env("SLURM_ARRAY_TASK_ID", task.to_string())
            .env("SLURM_ARRAY_TASK_MIN", "1")
            .env("SLURM_ARRAY_TASK_COUNT", "2")
            .env("BLIPDEX_MODEL", &model)
            .env("BLIPDEX_DEVICE", "cpu")
            .env("BLIPDEX_DTYPE", "f32")
            .env("BLIPDEX_CACHE_DIR", tmp.path().join("slurm-cache"))
            .output()?;
        ensure!(
            o.status.success(),
            "task {task}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let m = merged("s3://idx/slurm")?;
    ensure!(m["parts"] == 2 && m["images"] == 5, "{m}");
    Ok(())
}
