//! Helpers shared by the parity tests: fixture paths, golden tensors, tolerance checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use blipdex_model::{Blip2, LoadOptions, ModelFiles};
use candle_core::{DType, Device, Tensor};

pub const F32_TOL: f32 = 1e-4;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn golden(name: &str) -> Result<HashMap<String, Tensor>> {
    let p = fixtures()
        .join("golden")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).with_context(|| format!("{}", p.display()))
}

pub fn golden_meta(name: &str) -> Result<serde_json::Value> {
    let p = fixtures().join("golden").join(format!("{name}.json"));
    Ok(serde_json::from_str(&std::fs::read_to_string(&p)?)?)
}

pub fn load(name: &str) -> Result<Blip2> {
    let files = ModelFiles::resolve(model_dir(name).to_str().context("path")?, None)?;
    Ok(Blip2::load(&files, &LoadOptions::default())?)
}

pub fn get<'a>(g: &'a HashMap<String, Tensor>, k: &str) -> Result<&'a Tensor> {
    g.get(k)
        .with_context(|| format!("golden tensor {k} missing"))
}

/// Golden token ids (int64) as the u32 tensor the model takes.
pub fn ids(g: &HashMap<String, Tensor>, k: &str) -> Result<Tensor> {
    Ok(get(g, k)?.to_dtype(DType::U32)?)
}

/// |a - b| elementwise, flattened, after checking the shapes agree.
fn abs_diff(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    ensure!(
        a.dims() == b.dims(),
        "shape {:?} != {:?}",
        a.dims(),
        b.dims()
    );
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(abs_diff(a, b)?.max(0)?.to_scalar::<f32>()?)
}

pub fn mean_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(abs_diff(a, b)?.mean(0)?.to_scalar::<f32>()?)
}

pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) -> Result<f32> {
    let d = max_abs_diff(got, want).with_context(|| what.to_string())?;
    ensure!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
    Ok(d)
}
