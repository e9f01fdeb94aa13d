//! Flags shared by the subcommands that load a model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use blipdex_core::Error;
use blipdex_model::image::{ImageConfig, ImageProcessor, DEFAULT_MAX_PIXELS};
use blipdex_model::{Blip2, CpuGemm, Kernels, LoadOptions, ModelFiles};
use candle_core::{DType, Device, Tensor};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};

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
    /// On CUDA, blipdex's own kernels (layout copies, bias + GELU, softmax, residual adds) and
    /// cuBLASLt linears; off: candle's CUDA ops, for comparison (true/false, 1/0).
    #[arg(long, env = "BLIPDEX_CUDA_KERNELS", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub cuda_kernels: bool,
    /// On CUDA in a `--features flash-attn` build (sm_80+), the fused attention kernels; off: the
    /// unfused ops (true/false, 1/0).
    #[arg(long, env = "BLIPDEX_CUDA_FLASH", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub cuda_flash: bool,
    /// On the CPU, which of blipdex's GEMMs runs the linears and the fused attention: auto (the
    /// best this CPU has), avx512, avx2, or off (candle's matmul and unfused attention).
    #[arg(long, env = "BLIPDEX_CPU_GEMM", default_value = "auto")]
    pub cpu_gemm: CpuGemm,
}

impl ModelArgs {
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        if let CpuGemm::Isa(isa) = self.cpu_gemm {
            if !isa.available() {
                bail!("--cpu-gemm {isa}: this CPU does not have it; use auto, avx2 or off");
            }
        }
        Ok(LoadOptions {
            device: parse_device(&self.device)?,
            dtype: parse_dtype(&self.dtype)?,
            kernels: Kernels {
                cuda: self.cuda_kernels,
                cuda_flash: self.cuda_flash,
                cpu_gemm: self.cpu_gemm,
            },
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

/// Image inputs of `embed` and `caption`: files to decode, or preprocessed pixel values.
#[derive(Args, Debug, Clone)]
pub struct ImageInputArgs {
    /// Image file (repeatable). Any format the `image` crate reads.
    #[arg(long = "image", env = "BLIPDEX_IMAGES", value_delimiter = ',')]
    pub images: Vec<PathBuf>,
    /// Read preprocessed `pixel_values` [N,3,H,W] from a safetensors file instead of decoding images.
    #[arg(long, env = "BLIPDEX_PIXEL_VALUES", conflicts_with = "images")]
    pub pixel_values: Option<PathBuf>,
    /// Images per forward pass.
    #[arg(long, env = "BLIPDEX_BATCH_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    /// Refuse images with more pixels than this (decompression-bomb guard).
    #[arg(long, env = "BLIPDEX_MAX_IMAGE_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
}

impl ImageInputArgs {
    pub fn is_empty(&self) -> bool {
        self.images.is_empty() && self.pixel_values.is_none()
    }

    pub fn batch_size(&self) -> usize {
        usize::try_from(self.batch_size).unwrap_or(usize::MAX)
    }

    /// The pixel values [N,3,H,W] (f32, CPU) and a name per image (its file, or its row in
    /// --pixel-values); `None` when no image was given. Images are preprocessed with the
    /// checkpoint's processor settings found in `model_dir`. One unreadable image fails all.
    pub fn load(
        &self,
        model_dir: &Path,
    ) -> anyhow::Result<Option<(Tensor, Vec<serde_json::Value>)>> {
        Ok(self
            .load_images(model_dir, true)?
            .and_then(|l| l.pixel_values.map(|px| (px, l.names))))
    }

    /// Like [`Self::load`], but an image file that cannot be read or decoded is set aside with
    /// its reason instead of failing the others.
    pub fn load_lenient(&self, model_dir: &Path) -> anyhow::Result<Option<Loaded>> {
        self.load_images(model_dir, false)
    }

    fn load_images(&self, model_dir: &Path, strict: bool) -> anyhow::Result<Option<Loaded>> {
        if let Some(path) = &self.pixel_values {
            let px = read_pixel_values(path)?;
            let names: Vec<serde_json::Value> =
                (0..px.dim(0)?).map(serde_json::Value::from).collect();
            return Ok(Some(Loaded {
                pixel_values: Some(px),
                rows: (0..names.len()).collect(),
                names,
                failed: Vec::new(),
            }));
        }
        if self.images.is_empty() {
            return Ok(None);
        }
        let processor = ImageProcessor::new(ImageConfig::from_model_dir(model_dir)?)
            .with_max_pixels(self.max_image_pixels);
        let (h, w) = (processor.config.height, processor.config.width);
        let mut data = Vec::with_capacity(self.images.len() * 3 * h * w);
        let (mut names, mut rows, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        for (i, path) in self.images.iter().enumerate() {
            let name = serde_json::Value::from(path.display().to_string());
            match processor.pixel_values_from_file(path) {
                Ok(px) => {
                    data.extend(px);
                    names.push(name);
                    rows.push(i);
                }
                Err(e) if !strict => failed.push((i, name, e.to_string())),
                Err(e) => return Err(e.into()),
            }
        }
        let pixel_values = if names.is_empty() {
            None
        } else {
            Some(Tensor::from_vec(
                data,
                (names.len(), 3, h, w),
                &Device::Cpu,
            )?)
        };
        Ok(Some(Loaded {
            pixel_values,
            names,
            rows,
            failed,
        }))
    }
}

/// Images given on the command line, preprocessed.
pub struct Loaded {
    /// [N,3,H,W] of the images that could be read; `None` when none could.
    pub pixel_values: Option<Tensor>,
    /// One per row of `pixel_values`.
    pub names: Vec<serde_json::Value>,
    /// The position among the given images of each row of `pixel_values`.
    pub rows: Vec<usize>,
    /// (position, image, why) of each image that could not be read or decoded.
    pub failed: Vec<(usize, serde_json::Value, String)>,
}

/// `pixel_values` [N,3,H,W] (any float dtype) from a safetensors file, as f32.
fn read_pixel_values(path: &Path) -> anyhow::Result<Tensor> {
    let file = path.display().to_string();
    if !path.is_file() {
        bail!(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")
        ));
    }
    let bad = |reason: String| Error::BadTensor {
        file: file.clone(),
        name: "pixel_values".into(),
        reason,
    };
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
    let t = tensors.get("pixel_values").ok_or_else(|| {
        bad(format!(
            "missing; the file holds {:?}",
            tensors.keys().collect::<Vec<_>>()
        ))
    })?;
    match t.dims() {
        [n, 3, h, w] if *n > 0 && *h > 0 && *w > 0 => {}
        d => bail!(bad(format!("shape {d:?}, expected [N, 3, H, W]"))),
    }
    if !t.dtype().is_float() {
        bail!(bad(format!("dtype {:?}, expected a float type", t.dtype())));
    }
    Ok(t.to_dtype(DType::F32)?)
}

/// Object storage: where local copies live and how requests are retried.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteArgs {
    /// Local copies of indexes on object storage (and workers' parts before upload)
    /// [default: $XDG_CACHE_HOME/blipdex, else ~/.cache/blipdex].
    #[arg(long, env = "BLIPDEX_CACHE_DIR")]
    pub cache_dir: Option<std::path::PathBuf>,
    /// Retries of a failed object-store request (network errors, 5xx, throttling).
    #[arg(long, env = "BLIPDEX_OBJECT_STORE_RETRIES", default_value_t = 5)]
    pub object_store_retries: usize,
    /// Seconds after a request's first attempt when no retry starts any more.
    #[arg(
        long,
        env = "BLIPDEX_OBJECT_STORE_RETRY_TIMEOUT_S",
        default_value_t = 120
    )]
    pub object_store_retry_timeout_s: u64,
}

impl RemoteArgs {
    pub fn options(&self) -> blipdex_remote::RemoteOptions {
        blipdex_remote::RemoteOptions {
            max_retries: self.object_store_retries,
            retry_timeout: std::time::Duration::from_secs(self.object_store_retry_timeout_s),
        }
    }

    /// `--cache-dir`, or the user's cache folder.
    pub fn cache_dir(&self) -> anyhow::Result<std::path::PathBuf> {
        if let Some(d) = &self.cache_dir {
            return Ok(d.clone());
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache"))
            })
            .ok_or_else(|| {
                anyhow::anyhow!("no cache folder: give --cache-dir (or set HOME or XDG_CACHE_HOME)")
            })?;
        Ok(base.join("blipdex"))
    }

    /// The local directory to open for `index`: itself, or a fresh copy of the index at that
    /// object-store URL (pulled now), with the remote it came from.
    pub fn local_index(
        &self,
        index: &str,
    ) -> anyhow::Result<(std::path::PathBuf, Option<blipdex_remote::Remote>)> {
        if !blipdex_remote::is_url(index) {
            return Ok((index.into(), None));
        }
        let remote = blipdex_remote::Remote::open(index, &self.options())?;
        // A missing bucket or credential is named as such, not as "no index here".
        remote.probe()?;
        let local = blipdex_remote::mirror::copy_dir(
            &self.cache_dir()?,
            &remote,
            blipdex_remote::mirror::Role::Reader,
        );
        match blipdex_remote::mirror::pull(&remote, &local)? {
            Some(s) => tracing::info!(
                "{} generation {} copied to {} ({} files fetched)",
                remote.url(),
                s.generation,
                local.display(),
                s.copied
            ),
            None => anyhow::bail!(
                "{} holds no blipdex index (no manifest.json): build one with `blipdex ingest \
                 --index {}` or run `blipdex index merge` after the workers",
                remote.url(),
                remote.url()
            ),
        }
        Ok((local, Some(remote)))
    }
}
