//! Every model output against transformers' golden tensors (f32, max abs diff ≤ 1e-4).

mod common;

use anyhow::{Context, Result};
use blipdex_kernels::Isa;
use blipdex_model::{Blip2, CpuGemm, Kernels, LoadOptions, ModelFiles};
use candle_core::{Device, Tensor};
use common::*;

/// Runs the whole retrieval model on the golden inputs and compares every output.
fn check_against_golden(model_name: &str, golden_name: &str) -> Result<()> {
    check_with(model_name, golden_name, &LoadOptions::default())
}

fn check_with(model_name: &str, golden_name: &str, opts: &LoadOptions) -> Result<()> {
    let g = golden(golden_name)?;
    let files = ModelFiles::resolve(model_dir(model_name).to_str().context("path")?, None)?;
    let model = Blip2::load(&files, opts)?;
    let px = get(&g, "pixel_values")?;
    let input_ids = ids(&g, "input_ids")?;
    let mask = ids(&g, "attention_mask")?;

    let vision = model.get_image_features(px)?;
    let d1 = assert_close(
        "vision_last_hidden_state",
        &vision,
        get(&g, "vision_last_hidden_state")?,
        F32_TOL,
    )?;
    let q = model.get_qformer_features(&vision)?;
    let d2 = assert_close(
        "qformer_last_hidden_state",
        &q,
        get(&g, "qformer_last_hidden_state")?,
        F32_TOL,
    )?;
    let image_embeds = model.image_embeds(&q)?;
    let d3 = assert_close(
        "image_embeds",
        &image_embeds,
        get(&g, "image_embeds")?,
        F32_TOL,
    )?;
    let text_embeds = model.text_embeds(&input_ids, &mask)?;
    let d4 = assert_close(
        "text_embeds",
        &text_embeds,
        get(&g, "text_embeds")?,
        F32_TOL,
    )?;
    let itc = Blip2::itc_scores(&image_embeds, &text_embeds)?;
    let d5 = assert_close("itc_scores", &itc, get(&g, "itc_scores")?, F32_TOL)?;
    let itm = model.itm_logits(&vision, &input_ids, &mask)?;
    let d6 = assert_close("itm_logits", &itm, get(&g, "itm_logits")?, F32_TOL)?;
    eprintln!(
        "{model_name}: max abs diff vision {d1:.1e} qformer {d2:.1e} image_embeds {d3:.1e} \
         text_embeds {d4:.1e} itc {d5:.1e} itm {d6:.1e}"
    );
    Ok(())
}

#[test]
fn itm_a_matches_transformers() -> Result<()> {
    check_against_golden("itm-a", "itm-a")
}

/// Each CPU GEMM path this machine runs, and candle's matmul with the unfused attention (the
/// ops the CUDA path shares): every output within the same tolerance.
#[test]
fn every_cpu_gemm_path_matches_transformers() -> Result<()> {
    let paths = Isa::ALL
        .into_iter()
        .filter(|i| i.available())
        .map(CpuGemm::Isa)
        .chain([CpuGemm::Off]);
    for cpu_gemm in paths {
        let opts = LoadOptions {
            kernels: Kernels {
                cpu_gemm,
                ..Kernels::default()
            },
            ..LoadOptions::default()
        };
        eprintln!("cpu gemm {cpu_gemm}:");
        check_with("itm-a", "itm-a", &opts)?;
        check_with("itm-b", "itm-b", &opts)?;
    }
    Ok(())
}

/// Other shapes: 3 vision layers × 5 heads, 48 px / 12 px patches, 2 Q-Former layers that all
/// cross-attend, 6 queries, image_token_index set, sharded weights.
#[test]
fn itm_b_matches_transformers() -> Result<()> {
    check_against_golden("itm-b", "itm-b")
}

/// The same weights with the vision attention bias stored LAVIS-style (q_bias / v_bias).
#[test]
fn lavis_bias_layout_matches_transformers() -> Result<()> {
    check_against_golden("itm-a-lavis", "itm-a")
}

#[test]
fn sharded_checkpoint_matches_transformers() -> Result<()> {
    check_against_golden("itm-a-sharded", "itm-a")
}

#[test]
fn sharded_equals_single_file_exactly() -> Result<()> {
    let g = golden("itm-a")?;
    let px = get(&g, "pixel_values")?;
    let a = load("itm-a")?.get_image_features(px)?;
    let b = load("itm-a-sharded")?.get_image_features(px)?;
    assert_eq!(max_abs_diff(&a, &b)?, 0.0);
    Ok(())
}

/// Inputs of another (here non-square) size interpolate the position grid bicubically.
#[test]
fn interpolated_position_grid_matches_transformers() -> Result<()> {
    for name in ["itm-a", "itm-b"] {
        let g = golden(name)?;
        let model = load(name)?;
        let v = model.get_image_features(get(&g, "interp_pixel_values")?)?;
        let d = assert_close(
            name,
            &v,
            get(&g, "interp_vision_last_hidden_state")?,
            F32_TOL,
        )?;
        eprintln!("{name}: interpolated grid max abs diff {d:.1e}");
    }
    Ok(())
}

#[test]
fn batched_equals_one_by_one() -> Result<()> {
    let g = golden("itm-b")?;
    let model = load("itm-b")?;
    let px = get(&g, "pixel_values")?;
    let input_ids = ids(&g, "input_ids")?;
    let mask = ids(&g, "attention_mask")?;
    let vision = model.get_image_features(px)?;
    let image_embeds = model.image_embeds(&model.get_qformer_features(&vision)?)?;
    let text_embeds = model.text_embeds(&input_ids, &mask)?;
    let itm = model.itm_logits(&vision, &input_ids, &mask)?;

    for i in 0..px.dim(0)? {
        let v = model.get_image_features(&px.narrow(0, i, 1)?)?;
        let e = model.image_embeds(&model.get_qformer_features(&v)?)?;
        assert_close("image_embeds[i]", &e, &image_embeds.narrow(0, i, 1)?, 1e-5)?;
    }
    let mask_rows = mask.to_vec2::<u32>()?;
    for (j, row) in mask_rows.iter().enumerate() {
        // One text alone, without any padding.
        let len = row.iter().filter(|&&m| m == 1).count();
        let one_ids = input_ids.narrow(0, j, 1)?.narrow(1, 0, len)?;
        let one_mask = Tensor::ones((1, len), candle_core::DType::U32, &Device::Cpu)?;
        let t = model.text_embeds(&one_ids, &one_mask)?;
        assert_close("text_embeds[j]", &t, &text_embeds.narrow(0, j, 1)?, 1e-5)?;
        let m = model.itm_logits(&vision.narrow(0, 1, 1)?, &one_ids, &one_mask)?;
        assert_close(
            "itm[1, j]",
            &m.squeeze(0)?,
            &itm.narrow(0, 1, 1)?.squeeze(0)?.narrow(0, j, 1)?,
            1e-5,
        )?;
    }
    Ok(())
}

#[test]
fn itm_probability_is_softmax_of_match_logit() -> Result<()> {
    let logits = Tensor::new(&[[[0.0f32, 0.0], [1.0, 3.0]]], &Device::Cpu)?;
    let p = Blip2::itm_probability(&logits)?.to_vec2::<f32>()?;
    assert!((p[0][0] - 0.5).abs() < 1e-6);
    assert!((p[0][1] - 1.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
    Ok(())
}
