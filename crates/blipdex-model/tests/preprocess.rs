//! Image preprocessing of real photos against transformers' Pillow path at the real BLIP-2 input
//! size (224 px). Golden: transformers' resized uint8 output (before rescale/normalize), written
//! by tests/fixtures/generate.py. Tolerance in normalized units: mean ≤ 0.006, max ≤ 0.12 (JPEG
//! decoders differ by a few levels); lossless formats must match exactly, byte for byte (the
//! resize is a port of Pillow's fixed-point resampling).

mod common;

use anyhow::{ensure, Context, Result};
use blipdex_model::image::{ImageConfig, ImageProcessor};
use common::*;

#[test]
fn photos_resize_like_pillow_at_224() -> Result<()> {
    let meta = golden_meta("itm-a")?;
    let photos = meta["photos"].as_array().context("photos")?;
    let mut cfg = ImageConfig::blip2_default();
    cfg.do_rescale = false;
    cfg.do_normalize = false;
    let processor = ImageProcessor::new(cfg.clone());
    let std = ImageConfig::blip2_default().image_std;
    for photo in photos {
        let photo = photo.as_str().context("name")?;
        let got = processor.pixel_values_from_file(&fixtures().join("photos").join(photo))?;
        let stem = photo.rsplit_once('.').map_or(photo, |(s, _)| s);
        let want = image::open(fixtures().join(format!("golden/resized224/{stem}.png")))?.to_rgb8();
        ensure!(want.dimensions() == (cfg.width as u32, cfg.height as u32));
        let (w, h) = (cfg.width, cfg.height);
        ensure!(got.len() == 3 * w * h, "{photo}: {} values", got.len());
        let (mut sum, mut max, mut max_levels) = (0f64, 0f32, 0f32);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let g = got[c * h * w + y * w + x];
                    let p = want.get_pixel(x as u32, y as u32)[c] as f32;
                    let levels = (g - p).abs();
                    let norm = levels / 255.0 / std[c];
                    sum += norm as f64;
                    max = max.max(norm);
                    max_levels = max_levels.max(levels);
                }
            }
        }
        let mean = (sum / (3 * w * h) as f64) as f32;
        eprintln!("{photo}: mean {mean:.5} max {max:.4} (normalized), max {max_levels} levels");
        ensure!(
            mean <= 0.006 && max <= 0.12,
            "{photo}: mean {mean} max {max}"
        );
        if !photo.ends_with(".jpg") {
            ensure!(
                max_levels == 0.0,
                "{photo}: lossless input differs from Pillow by {max_levels} levels"
            );
        }
    }
    Ok(())
}

/// The checkpoint's own processor settings, on the fixture photos, against transformers'
/// normalized pixel_values.
#[test]
fn checkpoint_processor_matches_golden_pixel_values() -> Result<()> {
    for name in ["itm-a", "itm-b"] {
        let g = golden(name)?;
        let want = get(&g, "pixel_values")?;
        let processor = ImageProcessor::new(ImageConfig::from_model_dir(&model_dir(name))?);
        let meta = golden_meta(name)?;
        for (i, photo) in meta["photos"]
            .as_array()
            .context("photos")?
            .iter()
            .enumerate()
        {
            let photo = photo.as_str().context("name")?;
            let got = processor.pixel_values_from_file(&fixtures().join("photos").join(photo))?;
            let want_i = want.get(i)?;
            let got = candle_core::Tensor::from_vec(got, want_i.dims(), &candle_core::Device::Cpu)?;
            let (mean, max) = (mean_abs_diff(&got, &want_i)?, max_abs_diff(&got, &want_i)?);
            eprintln!("{name} {photo}: mean {mean:.5} max {max:.4}");
            ensure!(
                mean <= 0.006 && max <= 0.12,
                "{name} {photo}: mean {mean} max {max}"
            );
        }
    }
    Ok(())
}
