//! The `blipdex embed` contract, run as a user runs it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn blipdex(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()?)
}

fn load(p: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(p, &Device::Cpu).with_context(|| p.display().to_string())
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(
        a.dims() == b.dims(),
        "shape {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar()?)
}

fn mean_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.mean(0)?.to_scalar()?)
}

fn golden_texts(name: &str) -> Result<Vec<String>> {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join(format!("golden/{name}.json")),
    )?)?;
    Ok(meta["texts"]
        .as_array()
        .context("texts")?
        .iter()
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect())
}

fn photos(name: &str) -> Result<Vec<String>> {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join(format!("golden/{name}.json")),
    )?)?;
    Ok(meta["photos"]
        .as_array()
        .context("photos")?
        .iter()
        .filter_map(|p| p.as_str())
        .map(|p| fixtures().join("photos").join(p).display().to_string())
        .collect())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `blipdex embed` on the golden pixel values of fixture `name` with its golden texts plus
/// `extra` flags; returns the written tensors and the golden ones.
fn embed_golden(
    name: &str,
    extra: &[&str],
) -> Result<(HashMap<String, Tensor>, HashMap<String, Tensor>)> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out.safetensors");
    let golden_path = fixtures().join(format!("golden/{name}.safetensors"));
    let model = fixtures().join(format!("models/{name}"));
    let mut args = vec![
        "embed".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--pixel-values".into(),
        golden_path.display().to_string(),
        "--output".into(),
        out.display().to_string(),
    ];
    for t in golden_texts(name)? {
        args.push("--text".into());
        args.push(t);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = blipdex(&args)?;
    ensure!(o.status.success(), "{name}: {}", stderr(&o));
    Ok((load(&out)?, load(&golden_path)?))
}

/// From transformers' own pixel values, every output tensor within 1e-4 of transformers.
#[test]
fn embed_pixel_values_matches_transformers() -> Result<()> {
    for name in ["itm-a", "itm-b"] {
        let (got, want) = embed_golden(name, &["--itm", "--batch-size", "2"])?;
        // The input is echoed to the output as it was given (an export check, not parity).
        let echoed = got
            .get("pixel_values")
            .context("output lacks pixel_values")?;
        ensure!(max_abs(echoed, want.get("pixel_values").context("px")?)? == 0.0);
        for k in [
            "vision_last_hidden_state",
            "qformer_last_hidden_state",
            "image_embeds",
            "text_embeds",
            "itc_scores",
            "itm_logits",
        ] {
            let g = got
                .get(k)
                .with_context(|| format!("{name}: output lacks {k}"))?;
            ensure!(g.dtype() == DType::F32, "{k} is {:?}", g.dtype());
            let d = max_abs(g, want.get(k).context(k)?)?;
            ensure!(d <= 1e-4, "{name} {k}: max abs diff {d:e}");
        }
    }
    Ok(())
}

/// A captioning checkpoint: `Blip2Model`'s outputs (get_qformer_features, the projected queries,
/// get_text_features) within 1e-4 of transformers.
#[test]
fn embed_captioning_checkpoint_matches_transformers() -> Result<()> {
    let name = "caption-a";
    let (got, want) = embed_golden(name, &[])?;
    for k in [
        "vision_last_hidden_state",
        "qformer_last_hidden_state",
        "language_model_inputs",
        "text_features",
    ] {
        let g = got.get(k).with_context(|| format!("output lacks {k}"))?;
        let d = max_abs(g, want.get(k).context(k)?)?;
        ensure!(d <= 1e-4, "{name} {k}: max abs diff {d:e}");
    }
    ensure!(!got.contains_key("image_embeds") && !got.contains_key("itc_scores"));
    Ok(())
}

/// Real photos through the whole CLI: preprocessing within the Pillow tolerance, every tensor
/// present with the checkpoint's shapes.
#[test]
fn embed_photos_preprocess_like_pillow() -> Result<()> {
    for name in ["itm-a", "itm-b"] {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("out.safetensors");
        let model = fixtures().join(format!("models/{name}"));
        let photos = photos(name)?;
        let mut args = vec![
            "embed".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--output".into(),
            out.display().to_string(),
            "--text".into(),
            "a photo".into(),
        ];
        for p in &photos {
            args.push("--image".into());
            args.push(p.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = blipdex(&args)?;
        ensure!(o.status.success(), "{name}: {}", stderr(&o));
        let got = load(&out)?;
        let want = load(&fixtures().join(format!("golden/{name}.safetensors")))?;
        let (g, w) = (&got["pixel_values"], &want["pixel_values"]);
        for (i, photo) in photos.iter().enumerate() {
            let (gi, wi) = (g.get(i)?, w.get(i)?);
            let (mean, max) = (mean_abs(&gi, &wi)?, max_abs(&gi, &wi)?);
            eprintln!("{name} {photo}: mean {mean:.4} max {max:.4}");
            ensure!(
                mean <= 0.006 && max <= 0.12,
                "{photo}: mean {mean} max {max}"
            );
        }
        let n = photos.len();
        ensure!(got["itc_scores"].dims() == [n, 1]);
        ensure!(got["image_embeds"].dims()[0] == n);
        ensure!(!got.contains_key("itm_logits"), "itm_logits without --itm");
    }
    Ok(())
}

fn assert_fails(args: &[&str], needles: &[&str]) -> Result<()> {
    let o = blipdex(args)?;
    let err = stderr(&o);
    ensure!(!o.status.success(), "{args:?} should fail");
    ensure!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        ensure!(err.contains(n), "{args:?}: message lacks {n:?}: {err}");
    }
    Ok(())
}

#[test]
fn bad_inputs_fail_with_a_clear_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("o.safetensors");
    let out = out.to_str().context("utf8")?;
    let model_path = fixtures().join("models/itm-a");
    let model = model_path.to_str().context("utf8")?;

    // A missing image file.
    let missing = dir.path().join("nope.jpg");
    assert_fails(
        &[
            "embed",
            "--model",
            model,
            "--image",
            missing.to_str().context("p")?,
            "--output",
            out,
        ],
        &["nope.jpg"],
    )?;

    // A text file named .jpg, and a truncated JPEG.
    let fake = dir.path().join("fake.jpg");
    std::fs::write(&fake, "this is not an image")?;
    assert_fails(
        &[
            "embed",
            "--model",
            model,
            "--image",
            fake.to_str().context("p")?,
            "--output",
            out,
        ],
        &["fake.jpg"],
    )?;
    let jpeg = std::fs::read(fixtures().join("photos/astronaut.jpg"))?;
    let truncated = dir.path().join("truncated.jpg");
    std::fs::write(&truncated, &jpeg[..jpeg.len() / 3])?;
    assert_fails(
        &[
            "embed",
            "--model",
            model,
            "--image",
            truncated.to_str().context("p")?,
            "--output",
            out,
        ],
        &["truncated.jpg"],
    )?;

    // Not a BLIP-2 checkpoint directory.
    let empty = tempfile::tempdir()?;
    assert_fails(
        &[
            "embed",
            "--model",
            empty.path().to_str().context("p")?,
            "--text",
            "x",
            "--output",
            out,
        ],
        &["config.json"],
    )?;
    let not_blip = tempfile::tempdir()?;
    std::fs::write(
        not_blip.path().join("config.json"),
        r#"{"model_type": "bert"}"#,
    )?;
    std::fs::copy(
        model_path.join("model.safetensors"),
        not_blip.path().join("model.safetensors"),
    )?;
    assert_fails(
        &[
            "embed",
            "--model",
            not_blip.path().to_str().context("p")?,
            "--text",
            "x",
            "--output",
            out,
        ],
        &["BLIP-2"],
    )?;

    // --pixel-values without the tensor, and with a mis-shaped one.
    let other = dir.path().join("other.safetensors");
    let t = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?;
    candle_core::safetensors::save(&HashMap::from([("images".to_string(), t)]), &other)?;
    assert_fails(
        &[
            "embed",
            "--model",
            model,
            "--pixel-values",
            other.to_str().context("p")?,
            "--output",
            out,
        ],
        &["pixel_values", "other.safetensors"],
    )?;
    let bad_shape = dir.path().join("bad.safetensors");
    let t = Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu)?;
    candle_core::safetensors::save(
        &HashMap::from([("pixel_values".to_string(), t)]),
        &bad_shape,
    )?;
    assert_fails(
        &[
            "embed",
            "--model",
            model,
            "--pixel-values",
            bad_shape.to_str().context("p")?,
            "--output",
            out,
        ],
        &["pixel_values", "shape"],
    )?;

    // Nothing asked for.
    assert_fails(
        &["embed", "--model", model, "--output", out],
        &["nothing to embed"],
    )?;
    Ok(())
}

/// A mistyped local path that is also a valid repo id (`models/itm-x` next to `models/`) is
/// named as a missing directory, not only as a hub failure.
#[test]
fn mistyped_local_model_path_says_no_such_directory() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::create_dir(tmp.path().join("models"))?;
    let out = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args([
            "embed",
            "--model",
            "models/itm-x",
            "--text",
            "a cat",
            "--output",
            "o.safetensors",
        ])
        .current_dir(tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", tmp.path().join("hf"))
        .env_remove("RUST_LOG")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{err}");
    ensure!(
        err.contains("models/itm-x")
            && err.contains("no such directory")
            && err.contains("repo id"),
        "{err}"
    );
    Ok(())
}
