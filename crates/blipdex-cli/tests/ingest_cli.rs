//! `blipdex ingest` + `blipdex search` on a real folder with the tiny fixture model.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn run_json(args: &[&str]) -> Result<Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args(args)
        .output()?;
    let stderr = String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.success(), "{args:?}: {stderr}");
    let stdout = String::from_utf8(o.stdout)?;
    let last = stdout.lines().last().context("no output")?;
    Ok(serde_json::from_str(last)?)
}

fn s(p: &Path) -> Result<&str> {
    p.to_str().context("utf-8 path")
}

/// `blipdex search --json` on `index` with `model`, plus `extra` flags.
fn search(index: &Path, model: &Path, query: &str, extra: &[&str]) -> Result<Value> {
    let mut args = vec![
        "search",
        "--index",
        s(index)?,
        "--model",
        s(model)?,
        "--query",
        query,
        "--json",
    ];
    args.extend_from_slice(extra);
    run_json(&args)
}

/// A folder like a user's: nested dirs, a duplicate, a truncated JPEG, text named .jpg, an empty file.
fn make_folder(root: &Path) -> Result<()> {
    let photos = fixtures().join("photos");
    std::fs::create_dir_all(root.join("nested/deeper"))?;
    for e in std::fs::read_dir(&photos)? {
        let e = e?;
        std::fs::copy(e.path(), root.join(e.file_name()))?;
    }
    std::fs::copy(
        photos.join("rocket.jpg"),
        root.join("nested/deeper/rocket-copy.jpg"),
    )?;
    let jpeg = std::fs::read(photos.join("astronaut.jpg"))?;
    std::fs::write(root.join("nested/truncated.jpg"), &jpeg[..jpeg.len() / 2])?;
    std::fs::write(root.join("nested/notes.jpg"), "not an image")?;
    std::fs::write(root.join("empty.png"), "")?;
    std::fs::write(root.join("readme.txt"), "skipped: not an image extension")?;
    Ok(())
}

#[test]
fn ingest_search_rerank_and_resync() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let folder = tmp.path().join("photos");
    let index = tmp.path().join("index");
    make_folder(&folder)?;
    let model = fixtures().join("models/itm-a");
    let ingest = [
        "ingest",
        "--index",
        s(&index)?,
        "--model",
        s(&model)?,
        "--batch-size",
        "2",
        "--commit-every",
        "2",
        s(&folder)?,
        "--json",
    ];

    let first = run_json(&ingest)?;
    ensure!(first["files"] == 9, "{first}");
    ensure!(first["indexed"] == 5, "{first}");
    ensure!(first["duplicates"] == 1, "{first}");
    ensure!(first["rejected"] == 3, "{first}");
    ensure!(first["unchanged"] == 0 && first["removed"] == 0, "{first}");
    let rejects = std::fs::read_to_string(index.join("rejects.jsonl"))?;
    for name in ["truncated.jpg", "notes.jpg", "empty.png"] {
        ensure!(rejects.contains(name), "rejects lack {name}: {rejects}");
    }

    // A re-run is a no-op: nothing embedded, nothing written.
    let manifest_before = std::fs::read(index.join("manifest.json"))?;
    let again = run_json(&ingest)?;
    ensure!(
        again["indexed"] == 0 && again["unchanged"] == 6 && again["commits"] == 0,
        "{again}"
    );
    ensure!(
        std::fs::read(index.join("manifest.json"))? == manifest_before,
        "re-run rewrote the manifest"
    );

    // --exact ITC scores equal transformers' for each fixture photo and text; rerank = ITM.
    let golden =
        candle_core::safetensors::load(fixtures().join("golden/itm-a.safetensors"), &Device::Cpu)?;
    let itc = golden["itc_scores"].to_vec2::<f32>()?;
    let itm = golden["itm_logits"].to_vec3::<f32>()?;
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("golden/itm-a.json"),
    )?)?;
    let photos: Vec<&str> = meta["photos"]
        .as_array()
        .context("photos")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let texts: Vec<&str> = meta["texts"]
        .as_array()
        .context("texts")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for (j, text) in texts.iter().enumerate().take(3) {
        let out = search(
            &index,
            &model,
            text,
            &["--top-k", "5", "--exact", "--rerank", "5"],
        )?;
        let hits = out["hits"].as_array().context("hits")?;
        ensure!(hits.len() == 5, "{out}");
        for h in hits {
            let path = h["path"].as_str().context("path")?;
            let name = Path::new(path)
                .file_name()
                .and_then(|n| n.to_str())
                .context("name")?;
            let i = photos
                .iter()
                .position(|p| *p == name || (name == "rocket-copy.jpg" && *p == "rocket.jpg"))
                .with_context(|| format!("unexpected hit {path}"))?;
            // Lossless photos decode to transformers' exact pixels: parity within 1e-4. JPEGs
            // go through another decoder than Pillow's (a few levels apart), so their scores
            // differ by the model's response to that, not by a model error.
            let (itc_tol, itm_tol) = if name.ends_with(".jpg") {
                (5e-3, 2e-2)
            } else {
                (1e-4, 1e-4)
            };
            let got = h["itc_score"].as_f64().context("itc")? as f32;
            ensure!(
                (got - itc[i][j]).abs() <= itc_tol,
                "{name} / {text}: itc {got} vs {}",
                itc[i][j]
            );
            let l = &itm[i][j];
            let want = 1.0 / (1.0 + (l[0] - l[1]).exp());
            let got = h["itm_score"].as_f64().context("itm")? as f32;
            ensure!(
                (got - want).abs() <= itm_tol,
                "{name} / {text}: itm {got} vs {want}"
            );
        }
        let ranked: Vec<f64> = hits
            .iter()
            .filter_map(|h| h["itm_score"].as_f64())
            .collect();
        ensure!(
            ranked.windows(2).all(|w| w[0] >= w[1]),
            "not ordered by ITM: {ranked:?}"
        );
        // ANN finds the same top hit on this small index.
        let ann = search(&index, &model, text, &[])?;
        let exact = search(&index, &model, text, &["--exact"])?;
        ensure!(
            ann["hits"][0]["image_id"] == exact["hits"][0]["image_id"],
            "{ann} vs {exact}"
        );
    }

    // The server's query through the CLI: pages of a reranked ranking are slices of it
    // (neither overlap nor skip), and filters apply before the page.
    let ids = |v: &Value| -> Vec<u64> {
        v["hits"]
            .as_array()
            .map(|h| h.iter().filter_map(|h| h["image_id"].as_u64()).collect())
            .unwrap_or_default()
    };
    let text = texts[0];
    let reranked = search(
        &index,
        &model,
        text,
        &["--top-k", "5", "--exact", "--rerank", "5"],
    )?;
    let page = ["--top-k", "2", "--offset", "2", "--exact", "--rerank", "5"];
    let second = search(&index, &model, text, &page)?;
    ensure!(
        ids(&second) == ids(&reranked)[2..4],
        "{second} vs {reranked}"
    );
    let nested = folder.join("nested");
    let prefix = ["--top-k", "5", "--exact", "--path-prefix", s(&nested)?];
    let inside = search(&index, &model, text, &prefix)?;
    // Only the rocket (its copy lives under nested/deeper) has a path there.
    ensure!(ids(&inside).len() == 1, "{inside}");
    let exact = search(&index, &model, text, &["--top-k", "5", "--exact"])?;
    let floor = exact["hits"][1]["itc_score"].as_f64().context("score")?;
    let floor_s = format!("{floor}");
    let above = ["--top-k", "5", "--exact", "--min-score", floor_s.as_str()];
    let kept = search(&index, &model, text, &above)?;
    ensure!(ids(&kept) == ids(&exact)[..2], "{kept} vs {exact}");

    // A deleted photo disappears; its duplicate's twin keeps the image alive.
    std::fs::remove_file(folder.join("camera_gray.png"))?;
    std::fs::remove_file(folder.join("rocket.jpg"))?;
    let third = run_json(&ingest)?;
    ensure!(third["removed"] == 2 && third["indexed"] == 0, "{third}");
    let all = search(&index, &model, "photo", &["--top-k", "10", "--exact"])?;
    let paths: Vec<&str> = all["hits"]
        .as_array()
        .context("hits")?
        .iter()
        .filter_map(|h| h["path"].as_str())
        .collect();
    ensure!(paths.len() == 4, "{paths:?}");
    ensure!(
        !paths.iter().any(|p| p.ends_with("camera_gray.png")),
        "{paths:?}"
    );
    ensure!(
        paths.iter().any(|p| p.ends_with("rocket-copy.jpg")),
        "{paths:?}"
    );

    // Another checkpoint may not search (or write into) this index.
    let other = fixtures().join("models/itm-b");
    let o = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args([
            "search",
            "--index",
            s(&index)?,
            "--model",
            s(&other)?,
            "--query",
            "x",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("holds embeddings of model"),
        "{err}"
    );
    Ok(())
}

/// kill -9 in the middle of a bulk ingest, then resume: every image once, committed work kept.
#[test]
fn kill_9_mid_ingest_then_resume() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let folder = tmp.path().join("bulk");
    let index = tmp.path().join("index");
    std::fs::create_dir_all(&folder)?;
    // Distinct bytes per file: the fixture JPEG with a different trailer after its EOI marker.
    let jpeg = std::fs::read(fixtures().join("photos/rocket.jpg"))?;
    let n = 240;
    for i in 0..n {
        let mut bytes = jpeg.clone();
        bytes.extend_from_slice(format!("copy {i}").as_bytes());
        std::fs::write(folder.join(format!("img{i:04}.jpg")), bytes)?;
    }
    let model = fixtures().join("models/itm-a");
    let args = [
        "ingest",
        "--index",
        s(&index)?,
        "--model",
        s(&model)?,
        "--batch-size",
        "4",
        "--commit-every",
        "8",
        "--decode-threads",
        "1",
        s(&folder)?,
        "--json",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // Wait for a couple of image commits (generation 1 is the empty index), then kill.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while blipdex_store::Store::read_generation(&index).unwrap_or(0) < 3
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill()?; // SIGKILL
    let status = child.wait()?;
    ensure!(
        !status.success(),
        "the ingest finished before the kill: nothing was tested (make the input larger)"
    );
    // What the killed run committed: at least its first two batches, not everything.
    let committed = blipdex_store::Store::open_readonly(&index)?.len();
    ensure!(
        (16..n).contains(&committed),
        "{committed} images committed when the kill landed"
    );

    // The resume keeps every committed image (none re-embedded) and embeds exactly the rest:
    // the kill cost at most the uncommitted batch, and nothing is doubled.
    let resumed = run_json(&args)?;
    let indexed = resumed["indexed"].as_u64().context("indexed")? as usize;
    let unchanged = resumed["unchanged"].as_u64().context("unchanged")? as usize;
    ensure!(
        unchanged == committed && indexed == n - committed,
        "{resumed} after {committed} committed"
    );
    let all = search(&index, &model, "rocket", &["--top-k", "1000", "--exact"])?;
    let hits = all["hits"].as_array().context("hits")?;
    let paths: std::collections::HashSet<&str> =
        hits.iter().filter_map(|h| h["path"].as_str()).collect();
    let ids: std::collections::HashSet<u64> =
        hits.iter().filter_map(|h| h["image_id"].as_u64()).collect();
    ensure!(
        hits.len() == n && paths.len() == n && ids.len() == n,
        "{} hits",
        hits.len()
    );
    Ok(())
}

/// A phone photo stored rotated with EXIF Orientation=6 embeds like its upright twin.
#[test]
fn exif_rotated_photo_embeds_like_its_upright_twin() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let index = tmp.path().join("index");
    let folder = fixtures().join("photos-exif");
    let model = fixtures().join("models/itm-a");
    let out = run_json(&[
        "ingest",
        "--index",
        s(&index)?,
        "--model",
        s(&model)?,
        s(&folder)?,
        "--json",
    ])?;
    ensure!(out["indexed"] == 2, "{out}");
    let store = blipdex_store::Store::open_readonly(&index)?;
    let embeds_of = |name: &str| -> Result<Vec<f32>> {
        let row = store
            .iter()
            .find(|r| r.path.ends_with(name))
            .context("row")?;
        Ok(store.embeds(row.image_id).context("embeds")?.to_vec())
    };
    let upright = embeds_of("upright.jpg")?;
    let rotated = embeds_of("rotated_exif6.jpg")?;
    // The same file read without EXIF (as `embed` and transformers do) is the control.
    let raw_path = tmp.path().join("raw.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args([
            "embed",
            "--model",
            s(&model)?,
            "--output",
            s(&raw_path)?,
            "--image",
        ])
        .arg(folder.join("rotated_exif6.jpg"))
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let raw = candle_core::safetensors::load(&raw_path, &Device::Cpu)?["image_embeds"]
        .flatten_all()?
        .to_vec1::<f32>()?;
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (twin, control) = (max_diff(&upright, &rotated), max_diff(&upright, &raw));
    eprintln!("EXIF twin max diff {twin:.4}, unrotated control {control:.4}");
    // Only JPEG re-encoding separates the twins (≤ 3 levels); the unrotated read is far off.
    ensure!(twin * 4.0 < control, "twin {twin} vs unrotated {control}");
    Ok(())
}

/// `--caption-model` stores a caption per image (the one `blipdex caption` makes of that file)
/// and `--vision-cache` one state file per image; `search --json` shows the captions and reranks
/// from the cache alone once the photos are gone.
#[test]
fn ingest_with_captions_and_vision_cache() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let folder = tmp.path().join("photos");
    let index = tmp.path().join("index");
    make_folder(&folder)?;
    let model = fixtures().join("models/itm-a");
    let caption_model = fixtures().join("models/caption-a");
    let out = run_json(&[
        "ingest",
        "--index",
        s(&index)?,
        "--model",
        s(&model)?,
        "--caption-model",
        s(&caption_model)?,
        "--vision-cache",
        "f16",
        s(&folder)?,
        "--json",
    ])?;
    ensure!(out["indexed"] == 5 && out["captioned"] == 5, "{out}");
    let entries = walk_files(&index.join("vision-cache"))?;
    ensure!(entries == 5, "{entries} vision cache files");

    // Each stored caption is the captioner's own for that file.
    let hits = search(&index, &model, "a rocket", &["--top-k", "5"])?;
    let hits = hits["hits"].as_array().context("hits")?.clone();
    ensure!(hits.len() == 5, "{hits:?}");
    let mut caption = Command::new(env!("CARGO_BIN_EXE_blipdex"));
    caption.args(["caption", "--model", s(&caption_model)?, "--json"]);
    for h in &hits {
        caption.args(["--image", h["path"].as_str().context("path")?]);
    }
    let o = caption.output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: std::collections::HashMap<String, String> = String::from_utf8(o.stdout)?
        .lines()
        .map(|l| -> Result<(String, String)> {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok((
                v["image"].as_str().context("image")?.to_string(),
                v["text"].as_str().context("text")?.to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    for h in &hits {
        let path = h["path"].as_str().context("path")?;
        ensure!(
            want.get(path).is_some_and(|w| h["caption"] == w.as_str()),
            "{path}: stored {} vs captioner {:?}",
            h["caption"],
            want.get(path)
        );
    }

    // With the photos gone, reranking can only read the vision cache: every hit still gets
    // an ITM score and no error.
    std::fs::remove_dir_all(&folder)?;
    let hits = search(
        &index,
        &model,
        "a rocket",
        &["--top-k", "5", "--rerank", "5"],
    )?;
    let hits = hits["hits"].as_array().context("hits")?;
    ensure!(hits.len() == 5, "{hits:?}");
    for h in hits {
        ensure!(h["itm_score"].is_f64() && h.get("error").is_none(), "{h}");
    }
    Ok(())
}

fn walk_files(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            n += walk_files(&e.path())?;
        } else if e.path().extension().is_some_and(|x| x == "safetensors") {
            n += 1;
        }
    }
    Ok(n)
}

/// The quickstart's first command: `serve --ingest PHOTOS` indexes the folder (with
/// `--caption-model`, storing a caption per image as `ingest` does), serves it (metrics show the
/// images), and SIGTERM stops it cleanly.
#[test]
fn serve_ingests_then_serves_and_stops_on_sigterm() -> Result<()> {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir()?;
    let index = tmp.path().join("index");
    let free = |_: ()| -> Result<String> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(l.local_addr()?.to_string())
    };
    let (grpc, metrics) = (free(())?, free(())?);
    let mut child = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args([
            "serve",
            "--ingest",
            s(&fixtures().join("photos"))?,
            "--index",
            s(&index)?,
            "--model",
            s(&fixtures().join("models/itm-a"))?,
            "--caption-model",
            s(&fixtures().join("models/caption-a"))?,
            "--listen",
            &grpc,
            "--metrics-listen",
            &metrics,
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Whole sample lines: the HELP text of a metric may contain "<name> 1" too.
    let ready = |body: &str| {
        let has = |line: &str| body.lines().any(|l| l.trim() == line);
        has("blipdex_model_loaded 1") && has("blipdex_index_images 5")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut body = String::new();
    while std::time::Instant::now() < deadline {
        body.clear();
        if let Ok(mut c) = std::net::TcpStream::connect(&metrics) {
            c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            c.read_to_string(&mut body)?;
            if ready(&body) {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let loaded = ready(&body);
    // SIGTERM: graceful shutdown, exit status 0.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let status = child.wait()?;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    ensure!(
        loaded,
        "server never reported 5 loaded images: {body}\n{stderr}"
    );
    ensure!(status.success(), "exit {status:?} after SIGTERM: {stderr}");
    ensure!(stderr.contains("5 new"), "{stderr}");
    let store = blipdex_store::Store::open_readonly(&index)?;
    let captioned = store.iter().filter(|r| r.caption.is_some()).count();
    ensure!(
        captioned == 5,
        "{captioned} of 5 images captioned at ingest"
    );
    Ok(())
}

/// An ingest that fails on a full disk still lists what it rejected before the failure, and
/// the index keeps its last committed generation. Needs root for a small tmpfs; without it the
/// test says so and passes vacuously, unless BLIPDEX_REQUIRE_TMPFS is set.
#[test]
fn full_disk_ingest_still_lists_its_rejects() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt)?;
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        ensure!(
            std::env::var_os("BLIPDEX_REQUIRE_TMPFS").is_none(),
            "BLIPDEX_REQUIRE_TMPFS is set but a tmpfs cannot be mounted here"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return Ok(());
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    // One undecodable file first, then more distinct photos (trailing bytes change the hash,
    // not the pixels) than 256 KiB of commits of one image each can hold.
    let photos = tmp.path().join("photos");
    std::fs::create_dir(&photos)?;
    std::fs::write(photos.join("000-junk.jpg"), b"not a jpeg")?;
    let rocket = std::fs::read(fixtures().join("photos/rocket.jpg"))?;
    for i in 0..300u32 {
        let mut bytes = rocket.clone();
        bytes.extend_from_slice(&i.to_le_bytes());
        std::fs::write(photos.join(format!("r{i:03}.jpg")), bytes)?;
    }
    let index = mnt.join("index");
    let out = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args([
            "ingest",
            "--commit-every",
            "1",
            "--index",
            s(&index)?,
            "--model",
        ])
        .arg(fixtures().join("models/itm-a"))
        .arg(&photos)
        .env_remove("RUST_LOG")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "256 KiB never filled up: {stderr}");
    ensure!(stderr.contains("No space left"), "{stderr}");
    let rejects = std::fs::read_to_string(index.join("rejects.jsonl"))
        .with_context(|| format!("no rejects.jsonl after the failure: {stderr}"))?;
    ensure!(rejects.contains("000-junk.jpg"), "{rejects}");
    let store = blipdex_store::Store::open_readonly(&index)?;
    ensure!(!store.is_empty(), "not even one commit fit");
    Ok(())
}

/// A model that cannot serve the index stops `serve` with one clear error, printed once.
#[test]
fn serve_start_up_error_is_printed_once() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let index = tmp.path().join("index");
    run_json(&[
        "ingest",
        "--json",
        "--index",
        s(&index)?,
        "--model",
        s(&fixtures().join("models/itm-a"))?,
        s(&fixtures().join("photos"))?,
    ])?;
    let out = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args(["serve", "--index", s(&index)?, "--model"])
        .arg(fixtures().join("models/itm-b"))
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{stderr}");
    ensure!(
        stderr.matches("holds embeddings of model").count() == 1,
        "printed other than once:\n{stderr}"
    );
    Ok(())
}

/// Every option of every command says what it does in `--help` (not only its env/default).
#[test]
fn every_option_has_a_description() -> Result<()> {
    let mut missing = Vec::new();
    for cmd in ["ingest", "search", "serve", "caption", "embed"] {
        let out = Command::new(env!("CARGO_BIN_EXE_blipdex"))
            .args([cmd, "--help"])
            .output()?;
        let help = String::from_utf8(out.stdout)?;
        let lines: Vec<&str> = help.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if !t.starts_with("--") || t.starts_with("--help") {
                continue;
            }
            // The description follows the flag on its line (after two spaces) or on the next
            // line, before any [env: ...] / [default: ...].
            let same = t.split_once("  ").map_or("", |(_, d)| d.trim());
            let next = lines.get(i + 1).map_or("", |n| n.trim());
            let described = |d: &str| !d.is_empty() && !d.starts_with('[') && !d.starts_with('-');
            if !(described(same) || (same.is_empty() && described(next))) {
                missing.push(format!("{cmd} {t}"));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "options without a description: {missing:#?}"
    );
    Ok(())
}

/// The pipeline file's `include`, `exclude` and `f16_embeddings` are flags too.
#[test]
fn include_exclude_and_f16_are_flags() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let index = tmp.path().join("index");
    let photos = fixtures().join("photos");
    let pngs = std::fs::read_dir(&photos)?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "png"))
        })
        .count();
    ensure!(pngs >= 2, "fixture photos changed: {pngs} PNGs");
    run_json(&[
        "ingest",
        "--json",
        "--f16-embeddings",
        "--include",
        "**/*.png",
        "--exclude",
        "**/camera_gray.png",
        "--index",
        s(&index)?,
        "--model",
        s(&fixtures().join("models/itm-a"))?,
        s(&photos)?,
    ])?;
    let store = blipdex_store::Store::open_readonly(&index)?;
    ensure!(store.dtype() == blipdex_store::Dtype::F16);
    ensure!(
        store.len() == pngs - 1,
        "{} images, {pngs} PNGs",
        store.len()
    );
    ensure!(store
        .iter()
        .all(|r| r.path.ends_with(".png") && !r.path.ends_with("camera_gray.png")));
    Ok(())
}

/// `--progress json`: machine-readable progress lines on stderr, the last one complete.
#[test]
fn json_progress_lines() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args(["ingest", "--progress", "json", "--index"])
        .arg(tmp.path().join("index"))
        .arg("--model")
        .arg(fixtures().join("models/itm-a"))
        .arg(fixtures().join("photos"))
        .env_remove("RUST_LOG")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("progress").is_some())
        .collect();
    ensure!(lines.len() >= 2, "{stderr}");
    let last = &lines[lines.len() - 1]["progress"];
    ensure!(last["total"] == 5 && last["done"] == 5, "{last}");
    ensure!(lines[0]["progress"]["done"] == 0, "{stderr}");
    Ok(())
}

/// Content hash → (sorted paths, embeddings) of every live image: what an index holds,
/// whatever ids it gave.
type Contents = std::collections::BTreeMap<String, (Vec<String>, Vec<f32>)>;

fn contents(index: &Path) -> Result<Contents> {
    let store = blipdex_store::Store::open_readonly(index)?;
    let mut out = std::collections::BTreeMap::new();
    for row in store.iter() {
        let mut paths = row.paths.clone();
        paths.sort();
        let e = store.embeds(row.image_id).context("embeddings")?;
        out.insert(row.content_hash, (paths, e));
    }
    Ok(out)
}

/// Workers (`--shard I/N`; one of them started twice at once, as engines do with speculative
/// tasks) and then `index merge`: the same images, paths and embeddings as one ingest of the
/// same folder; a second merge changes nothing.
#[test]
fn sharded_workers_then_merge_equal_one_ingest() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let folder = tmp.path().join("photos");
    std::fs::create_dir_all(folder.join("copies"))?;
    for e in std::fs::read_dir(fixtures().join("photos"))? {
        let e = e?;
        std::fs::copy(e.path(), folder.join(e.file_name()))?;
        // Identical bytes under another name: duplicates, across shards for some.
        std::fs::copy(e.path(), folder.join("copies").join(e.file_name()))?;
    }
    let model = fixtures().join("models/itm-a");
    let (single, sharded) = (tmp.path().join("single"), tmp.path().join("sharded"));
    let ingest = |index: &Path, extra: &[&str]| -> Result<Value> {
        let mut args = vec![
            "ingest",
            "--index",
            s(index)?,
            "--model",
            s(&model)?,
            "--batch-size",
            "2",
            s(&folder)?,
            "--json",
        ];
        args.extend_from_slice(extra);
        run_json(&args)
    };
    let one = ingest(&single, &[])?;

    let bin = env!("CARGO_BIN_EXE_blipdex");
    let twice: Vec<_> = (0..2)
        .map(|_| {
            Command::new(bin)
                .args(["ingest", "--index", s(&sharded)?, "--model", s(&model)?])
                .args(["--shard", "0/2", s(&folder)?, "--json"])
                .output()
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    for o in &twice {
        ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let other = ingest(&sharded, &["--shard", "1/2"])?;
    let first: Value = serde_json::from_slice(twice[0].stdout.as_slice())?;
    ensure!(
        first["indexed"].as_u64().context("indexed")?
            + other["indexed"].as_u64().context("indexed")?
            >= one["indexed"].as_u64().context("indexed")?,
        "{first} {other} {one}"
    );

    // A reader opened before the merge keeps its generation; the merge's two commits (one per
    // part) happen in its staging copy and reach the index as one generation.
    let empty = blipdex_store::Store::read_generation(&sharded).ok();
    let merged = run_json(&["index", "merge", "--index", s(&sharded)?])?;
    ensure!(
        merged["parts"] == 2 && merged["images"] == one["indexed"] && merged["commits"] == 2,
        "{merged} vs {one}"
    );
    ensure!(
        !sharded.join("merge-staging").exists(),
        "the staging copy is removed"
    );
    ensure!(empty.is_none(), "no index before the merge");
    let (got, want) = (contents(&sharded)?, contents(&single)?);
    ensure!(
        got.keys().eq(want.keys()),
        "images: {:?} vs {:?}",
        got.keys(),
        want.keys()
    );
    for (hash, (paths, e)) in &want {
        let (gp, ge) = &got[hash];
        ensure!(gp == paths, "{hash}: paths {gp:?} vs {paths:?}");
        let worst = e
            .iter()
            .zip(ge)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Batches are made up differently (f32 sums round a little differently).
        ensure!(worst <= 1e-5, "{hash}: embeddings differ by {worst}");
    }
    let again = run_json(&["index", "merge", "--index", s(&sharded)?])?;
    ensure!(
        again["added"] == 0 && again["updated"] == 0 && again["commits"] == 0,
        "{again}"
    );

    // The merged index searches like the single one (ids aside).
    let score = |v: &Value| -> Vec<f64> {
        v["hits"]
            .as_array()
            .map(|h| h.iter().filter_map(|h| h["itc_score"].as_f64()).collect())
            .unwrap_or_default()
    };
    let a = search(&single, &model, "a rocket", &["--exact", "--top-k", "5"])?;
    let b = search(&sharded, &model, "a rocket", &["--exact", "--top-k", "5"])?;
    let (sa, sb) = (score(&a), score(&b));
    let close = sa.iter().zip(&sb).all(|(x, y)| (x - y).abs() <= 1e-5);
    ensure!(
        close && sa.len() == sb.len() && !sa.is_empty(),
        "{a} vs {b}"
    );

    // A worker's shard spec must be well formed.
    let o = Command::new(bin)
        .args(["ingest", "--index", s(&sharded)?, "--model", s(&model)?])
        .args(["--shard", "2/2", s(&folder)?])
        .output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("below the shard count"),
        "{err}"
    );
    Ok(())
}
