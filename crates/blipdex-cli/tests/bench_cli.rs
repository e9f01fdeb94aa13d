//! `blipdex bench embed|caption --json`: the last line is the result that scripts/bench/compare.py reads.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

fn model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
        .display()
        .to_string()
}

fn bench(args: &[&str]) -> Result<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .arg("bench")
        .args(args)
        .args(["--iters", "1", "--threads", "1", "--json"])
        .env_remove("RUST_LOG")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().context("no output")?;
    serde_json::from_str(last).with_context(|| format!("not JSON: {last}"))
}

/// A fixture model's `config.json`.
fn config(name: &str) -> Result<Value> {
    let path = PathBuf::from(model(name)).join("config.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// (total ms, calls) of `op` in a `--profile` result.
fn profiled(v: &Value, op: &str) -> Result<(f64, u64)> {
    let row = v["profile_ms"]
        .as_array()
        .context("profile_ms")?
        .iter()
        .find(|r| r[0] == op)
        .with_context(|| format!("{op} missing in {v}"))?;
    Ok((
        row[1].as_f64().context("ms")?,
        row[2].as_u64().context("calls")?,
    ))
}

fn positive(v: &Value, key: &str) -> Result<f64> {
    let x = v[key]
        .as_f64()
        .with_context(|| format!("{key} missing in {v}"))?;
    ensure!(x > 0.0 && x.is_finite(), "{key} = {x}");
    Ok(x)
}

#[test]
fn embed_reports_throughput_memory_and_the_vision_share() -> Result<()> {
    let v = bench(&[
        "embed",
        "--model",
        &model("itm-a"),
        "--batch-size",
        "3",
        "--breakdown",
    ])?;
    let best = positive(&v, "best_batch_s")?;
    let ips = positive(&v, "images_per_s")?;
    ensure!((ips * best - 3.0).abs() < 1e-6, "{v}");
    positive(&v, "vision_s")?;
    positive(&v, "peak_rss_mib")?;
    ensure!(
        v["batch_size"] == 3 && v["image_size"] == serde_json::json!([64, 64]),
        "{v}"
    );

    let v = bench(&["embed", "--model", &model("itm-a")])?;
    ensure!(
        v["vision_s"].is_null(),
        "vision_s only with --breakdown: {v}"
    );
    Ok(())
}

#[test]
fn embed_profile_covers_every_layer_and_sums_below_the_pass() -> Result<()> {
    let cfg = config("itm-a")?;
    let layers = cfg["vision_config"]["num_hidden_layers"]
        .as_u64()
        .context("vision layers")?;
    let v = bench(&["embed", "--model", &model("itm-a"), "--profile"])?;
    let ops = v["profile_ms"].as_array().context("profile_ms")?;
    let get = |name: &str| profiled(&v, name);
    // On CPUs that run blipdex's GEMM the attention is fused; elsewhere separate ops inside
    // the attention's span, the softmax among them.
    let fused = blipdex_kernels::sgemm::available();
    let qformer_layers = cfg["qformer_config"]["num_hidden_layers"]
        .as_u64()
        .context("qformer layers")?;
    // Cross-attention in layers 0, f, 2f, … (transformers' default frequency is 2).
    let cross_layers = qformer_layers.div_ceil(
        cfg["qformer_config"]["cross_attention_frequency"]
            .as_u64()
            .unwrap_or(2),
    );
    for (name, calls) in [
        ("vision.embeddings", 1),
        ("vision.qkv", layers),
        ("vision.attention", layers),
        ("vision.fc2", layers),
        ("vision.layer_norm", 1),
        ("vision.add_norm", 2 * layers),
        ("qformer", 1),
        ("qformer.self_attention", qformer_layers),
        ("qformer.cross_attention", cross_layers),
        ("qformer.ffn", qformer_layers),
        ("itc_projection", 1),
    ] {
        ensure!(
            get(name)?.1 == calls,
            "{name}: {:?} calls, want {calls}",
            get(name)?
        );
    }
    if !fused {
        ensure!(get("attention.softmax")?.1 >= layers, "{v}");
    }
    let (total, _) = get("total")?;
    let spans: f64 = ops
        .iter()
        // The Q-Former's own spans lie inside "qformer", the unfused attention's inside
        // "vision.attention" or the Q-Former's.
        .filter(|r| r[0] != "total")
        .filter(|r| {
            !r[0]
                .as_str()
                .is_some_and(|n| n.starts_with("qformer.") || n.starts_with("attention."))
        })
        .filter_map(|r| r[1].as_f64())
        .sum();
    ensure!(
        spans > 0.0 && spans <= total,
        "spans {spans} ms, pass {total} ms"
    );

    let v = bench(&["embed", "--model", &model("itm-a")])?;
    ensure!(
        v["profile_ms"].is_null(),
        "profile only with --profile: {v}"
    );
    Ok(())
}

/// `bench caption` of 7 new tokens on caption-a (plus `extra` flags), its rate checked against
/// its time: exactly 7 tokens per caption.
fn caption_of_7(extra: &[&str]) -> Result<Value> {
    let model = model("caption-a");
    let mut args = vec!["caption", "--model", &model, "--max-new-tokens", "7"];
    args.extend_from_slice(extra);
    let v = bench(&args)?;
    let best = positive(&v, "best_caption_s")?;
    let tps = positive(&v, "tokens_per_s")?;
    ensure!((tps * best - 7.0).abs() < 1e-6, "{v}");
    Ok(v)
}

#[test]
fn caption_generates_exactly_the_asked_tokens() -> Result<()> {
    let v = caption_of_7(&[])?;
    ensure!(v["new_tokens"] == 7, "{v}");
    positive(&v, "peak_rss_mib")?;
    Ok(())
}

/// `--dtype bf16|f16` on the CPU (half-precision weights, f32 arithmetic) end to end.
#[test]
fn half_precision_benchmarks_run_end_to_end() -> Result<()> {
    for dtype in ["bf16", "f16"] {
        let v = bench(&["embed", "--model", &model("itm-a"), "--dtype", dtype])?;
        positive(&v, "images_per_s")?;
        ensure!(v["dtype"] == dtype, "{v}");
        let v = caption_of_7(&["--dtype", dtype])?;
        ensure!(v["dtype"] == dtype, "{v}");
    }
    Ok(())
}

#[test]
fn caption_profile_splits_the_prompt_pass_from_the_steps() -> Result<()> {
    let layers = config("caption-a")?["text_config"]["num_hidden_layers"]
        .as_u64()
        .context("decoder layers")?;
    let v = bench(&[
        "caption",
        "--model",
        &model("caption-a"),
        "--max-new-tokens",
        "5",
        "--profile",
    ])?;
    let get = |name: &str| profiled(&v, name);
    // One prompt pass, then a step per further token; the logits of each from the last position.
    ensure!(get("opt.prompt_pass")?.1 == 1, "{v}");
    ensure!(get("opt.step")?.1 == 4, "{v}");
    ensure!(get("opt.lm_head")?.1 == 5, "{v}");
    // Every decoder layer in each of the 5 passes.
    for op in ["opt.qkv", "opt.attention", "opt.out_proj", "opt.mlp"] {
        ensure!(get(op)?.1 == 5 * layers, "{op}: {v}");
    }
    let (total, _) = get("total")?;
    let decoder = get("opt.prompt_pass")?.0 + get("opt.step")?.0;
    ensure!(decoder > 0.0 && decoder <= total, "{v}");
    ensure!(
        get("vision.qkv")?.0 > 0.0 && get("language_projection")?.1 == 1,
        "{v}"
    );
    Ok(())
}

#[test]
fn a_caption_checkpoint_is_not_an_embed_benchmark() -> Result<()> {
    let e = bench(&["embed", "--model", &model("caption-a")]).expect_err("no ITC heads");
    ensure!(format!("{e:#}").contains("retrieval"), "{e:#}");
    Ok(())
}
