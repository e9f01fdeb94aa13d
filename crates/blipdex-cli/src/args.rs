//! Flags shared by the subcommands that load a model.

use anyhow::{bail, Context};
use blipdex_model::{Blip2, LoadOptions, ModelFiles};
use candle_core::{DType, Device};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint: a local directory in Hugging Face layout or a hub repo id.
    #[arg(long, env = "BLIPDEX_MODEL")]
    pub model: String,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long, env = "BLIPDEX_REVISION")]
    pub revision: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "BLIPDEX_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Precision of the vision tower: f32, f16 or bf16 (the Q-Former always runs in f32).
    #[arg(long, env = "BLIPDEX_DTYPE", default_value = "f32")]
    pub dtype: String,
}

impl ModelArgs {
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions {
            device: parse_device(&self.device)?,
            dtype: parse_dtype(&self.dtype)?,
        })
    }

    pub fn resolve(&self) -> anyhow::Result<ModelFiles> {
        Ok(ModelFiles::resolve(&self.model, self.revision.as_deref())?)
    }

    pub fn load(&self) -> anyhow::Result<(ModelFiles, Blip2)> {
        let files = self.resolve()?;
        let model = Blip2::load(&files, &self.load_options()?)?;
        Ok((files, model))
    }
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" | "fp16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown --dtype {other:?}: use f32, f16 or bf16"),
    })
}

pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("bad --device {s:?}: use cpu, cuda or cuda:N"))?,
        None => bail!("unknown --device {s:?}: use cpu, cuda or cuda:N"),
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("--device {s}: this blipdex was built without CUDA; rebuild with `cargo build --release --features cuda`");
    }
    Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))
}
