//! Checkpoint loading: the hub cache path, dtypes, and errors for wrong model directories.

mod common;

use anyhow::{ensure, Result};
use blipdex_model::{Blip2, LoadOptions, ModelFiles};
use candle_core::{DType, Device};
use common::*;

/// Lays the fixture checkpoint out as hf-hub's cache does (refs/main → snapshots/<commit>/...).
fn fake_hub_cache(home: &std::path::Path, repo: &str, src: &std::path::Path) -> Result<()> {
    let repo_dir = home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo_dir.join("refs"))?;
    std::fs::write(repo_dir.join("refs/main"), commit)?;
    let snap = repo_dir.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        std::fs::copy(entry.path(), snap.join(entry.file_name()))?;
    }
    Ok(())
}

/// Environment variables are process-wide and other tests of this binary run beside this one:
/// the hub resolution runs in a child process (`hub_child`) that gets HF_HOME and
/// HF_HUB_OFFLINE at its start; no test changes the environment of the others.
#[test]
fn hub_repo_ids_resolve_through_the_offline_cache() -> Result<()> {
    let home = tempfile::tempdir()?;
    fake_hub_cache(home.path(), "tiny/itm-b", &model_dir("itm-b"))?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "hub_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `hub_repo_ids_resolve_through_the_offline_cache`'s child: resolves repo ids through the
/// fake cache its parent made.
#[test]
#[ignore = "run by hub_repo_ids_resolve_through_the_offline_cache in a child process"]
fn hub_child() -> Result<()> {
    ensure!(
        std::env::var_os("HF_HOME").is_some(),
        "run by its parent test, which sets HF_HOME"
    );
    let files = ModelFiles::resolve("tiny/itm-b", None)?;
    ensure!(files.weights.len() > 1, "sharded weights expected");
    let model = Blip2::load(&files, &LoadOptions::default())?;
    let g = golden("itm-b")?;
    let v = model.get_image_features(get(&g, "pixel_values")?)?;
    assert_close(
        "vision via hub cache",
        &v,
        get(&g, "vision_last_hidden_state")?,
        F32_TOL,
    )?;

    let err = ModelFiles::resolve("tiny/not-cached", None)
        .unwrap_err()
        .to_string();
    ensure!(
        err.contains("HF_HUB_OFFLINE") && err.contains("tiny/not-cached"),
        "{err}"
    );
    let err = ModelFiles::resolve("tiny/itm-b", Some("v2"))
        .unwrap_err()
        .to_string();
    ensure!(err.contains("config.json"), "{err}");
    Ok(())
}

/// Half precision runs the vision tower in f16/bf16 (the Q-Former stays f32). Stated tolerance
/// against the f32 golden on the fixture: ITC scores within 5e-3 (bf16) and 1e-3 (f16).
#[test]
fn half_precision_stays_close_to_f32() -> Result<()> {
    let g = golden("itm-a")?;
    let files = ModelFiles::from_dir(&model_dir("itm-a"))?;
    for (dtype, tol) in [(DType::F16, 1e-3f32), (DType::BF16, 5e-3)] {
        if cfg!(feature = "mkl") && dtype == DType::BF16 {
            // candle's MKL matmul has no bf16; Blip2::load says so (checked below).
            let err = Blip2::load(
                &files,
                &LoadOptions {
                    device: Device::Cpu,
                    dtype,
                    ..LoadOptions::default()
                },
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
            ensure!(
                err.contains("bf16"),
                "bf16 + mkl must be refused clearly: {err:?}"
            );
            continue;
        }
        let model = Blip2::load(
            &files,
            &LoadOptions {
                device: Device::Cpu,
                dtype,
                ..LoadOptions::default()
            },
        )?;
        let v = model.get_image_features(get(&g, "pixel_values")?)?;
        ensure!(v.dtype() == dtype);
        let q = model.get_qformer_features(&v)?;
        ensure!(q.dtype() == DType::F32, "Q-Former must run in f32");
        let e = model.image_embeds(&q)?;
        let t = model.text_embeds(&ids(&g, "input_ids")?, &ids(&g, "attention_mask")?)?;
        let itc = Blip2::itc_scores(&e, &t)?;
        let d = max_abs_diff(&itc, get(&g, "itc_scores")?)?;
        eprintln!("{dtype:?}: itc max abs diff vs f32 golden {d:.2e}");
        ensure!(d <= tol, "{dtype:?}: {d} > {tol}");
    }
    Ok(())
}

#[test]
fn wrong_model_directories_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let err = ModelFiles::from_dir(dir.path()).unwrap_err().to_string();
    ensure!(err.contains("config.json"), "{err}");

    std::fs::copy(
        model_dir("itm-a").join("config.json"),
        dir.path().join("config.json"),
    )?;
    let err = ModelFiles::from_dir(dir.path()).unwrap_err().to_string();
    ensure!(err.contains("model.safetensors"), "{err}");

    // Weights of another checkpoint: the shape mismatch names the tensor.
    std::fs::copy(
        model_dir("itm-b").join("model.safetensors.index.json"),
        dir.path().join("model.safetensors.index.json"),
    )?;
    for e in std::fs::read_dir(model_dir("itm-b"))? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with("model-") {
            std::fs::copy(e.path(), dir.path().join(e.file_name()))?;
        }
    }
    let files = ModelFiles::from_dir(dir.path())?;
    let err = match Blip2::load(&files, &LoadOptions::default()) {
        Ok(_) => anyhow::bail!("mismatched weights loaded"),
        Err(e) => e.to_string(),
    };
    ensure!(err.contains("weights do not fit config.json"), "{err}");

    // A missing shard is named.
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)?;
    let first_shard = text
        .split('"')
        .find(|s| s.starts_with("model-") && s.ends_with(".safetensors"))
        .unwrap_or_default()
        .to_string();
    std::fs::remove_file(dir.path().join(&first_shard))?;
    let err = ModelFiles::from_dir(dir.path()).unwrap_err().to_string();
    ensure!(err.contains(&first_shard), "{err}");
    Ok(())
}
