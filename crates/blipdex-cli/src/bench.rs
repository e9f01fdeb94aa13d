//! `blipdex bench`: throughput of the model paths and of search, for side-by-side comparison
//! with PyTorch (`scripts/bench/compare.py`). With `--json` the last line is one JSON object.

use std::time::Instant;

use anyhow::Context;
use blipdex_model::caption::GenerationConfig;
use blipdex_model::{Blip2, Captioner};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::args::ModelArgs;
use crate::caption::Quantize;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Vision encoder + Q-Former + ITC projection on random pixels: images/s.
    Embed(EmbedBench),
    /// Batch-1 greedy captions of exactly --max-new-tokens tokens (EOS ignored): tokens/s.
    Caption(CaptionBench),
    /// Exact and ANN search on a synthetic index: queries/s, latency, recall.
    Search(crate::bench_search::SearchBench),
    /// Decode + Pillow-exact resize of photo files on one thread, as ingest's decode workers
    /// run it: images/s per core, for the decode and the resize apart.
    Decode(DecodeBench),
}

#[derive(Args, Debug)]
pub struct DecodeBench {
    /// Image files to decode (each once per run).
    #[arg(required = true)]
    pub files: Vec<std::path::PathBuf>,
    /// Output side (BLIP-2's processors resize to 224x224).
    #[arg(long, env = "BLIPDEX_BENCH_SIZE", default_value_t = 224)]
    pub size: u32,
    /// exact (full-size decode) or fast (JPEGs decoded at a reduced DCT scale), as `ingest --decode`.
    #[arg(long, env = "BLIPDEX_DECODE", default_value = "exact")]
    pub decode: blipdex_model::image::DecodeMode,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Args, Debug)]
pub struct Common {
    /// Timed runs after one warm-up; the best is reported.
    #[arg(long, env = "BLIPDEX_ITERS", default_value_t = 3)]
    pub iters: usize,
    /// Compute threads (default: all cores).
    #[arg(long, env = "BLIPDEX_THREADS")]
    pub threads: Option<usize>,
    #[arg(long, env = "BLIPDEX_JSON")]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EmbedBench {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, env = "BLIPDEX_BATCH_SIZE", default_value_t = 8)]
    pub batch_size: usize,
    /// Also time the vision tower alone ("vision_s"): the rest is Q-Former + projection.
    #[arg(long, env = "BLIPDEX_BENCH_BREAKDOWN")]
    pub breakdown: bool,
    /// After the timed runs, one more pass with the device synchronized around each op
    /// ("profile_ms": [op, total ms, calls] in order of first use; slower than the timed runs).
    #[arg(long, env = "BLIPDEX_BENCH_PROFILE")]
    pub profile: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct CaptionBench {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, env = "BLIPDEX_MAX_NEW_TOKENS", default_value_t = 20)]
    pub max_new_tokens: usize,
    #[arg(long, env = "BLIPDEX_QUANTIZE", value_enum)]
    pub quantize: Option<Quantize>,
    /// As `bench embed --profile`: one more caption with the device synchronized around each op
    /// (the decoder's prompt pass and its steps apart).
    #[arg(long, env = "BLIPDEX_BENCH_PROFILE")]
    pub profile: bool,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.command {
        BenchCommand::Embed(a) => embed(a),
        BenchCommand::Caption(a) => caption(a),
        BenchCommand::Search(a) => crate::bench_search::run(a),
        BenchCommand::Decode(a) => decode(a),
    }
}

/// Compute threads for candle (read from RAYON_NUM_THREADS when its pool starts).
fn set_threads(threads: Option<usize>) -> usize {
    if let Some(t) = threads.filter(|t| *t > 0) {
        // Before any model code runs: no other thread reads the environment yet.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        // MKL's OpenMP pool (the `mkl` feature) reads its own variable.
        std::env::set_var("OMP_NUM_THREADS", t.to_string());
    }
    candle_core::utils::get_num_threads()
}

/// Peak resident memory of this process, MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Seeded uniform pixels in the normalized range, as the processor would give.
fn random_pixels(n: usize, h: usize, w: usize) -> anyhow::Result<Tensor> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<f32> = (0..n * 3 * h * w)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    Ok(Tensor::from_vec(data, (n, 3, h, w), &Device::Cpu)?)
}

/// Best of `iters` timed runs after one warm-up, seconds.
fn best_of(iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// With `on`, one more run of `f` with per-op spans recorded: [op, total ms, calls] in order of
/// first use, then the run's total.
fn profiled(
    on: bool,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Option<Vec<serde_json::Value>>> {
    if !on {
        return Ok(None);
    }
    blipdex_kernels::profile::enable(true);
    let t = Instant::now();
    let r = f();
    let total = t.elapsed().as_secs_f64();
    blipdex_kernels::profile::enable(false);
    r?;
    let mut ops: Vec<_> = blipdex_kernels::profile::take()
        .into_iter()
        .map(|(name, s, calls)| json!([name, s * 1e3, calls]))
        .collect();
    ops.push(json!(["total", total * 1e3, 1]));
    Ok(Some(ops))
}

fn report(json: bool, v: serde_json::Value) {
    if json {
        println!("{v}");
    } else if let Some(m) = v.as_object() {
        for (k, val) in m {
            println!("{k:>20}: {val}");
        }
    }
}

fn embed(a: &EmbedBench) -> anyhow::Result<()> {
    let threads = set_threads(a.common.threads);
    let files = a.model.resolve()?;
    let t = Instant::now();
    let model = Blip2::load(&files, &a.model.load_options()?)?;
    let load_s = t.elapsed().as_secs_f64();
    model
        .retrieval
        .as_ref()
        .context("bench embed needs a retrieval checkpoint (ITC heads)")?;
    let (h, w) = model.image_size();
    // On the model's device up front, as the PyTorch side has it: the timed loop is the model alone.
    let px = random_pixels(a.batch_size, h, w)?.to_device(model.device())?;
    let run = || -> anyhow::Result<()> {
        let vision = model.get_image_features(&px)?;
        let e = model.image_embeds(&model.get_qformer_features(&vision)?)?;
        e.flatten_all()?.to_vec1::<f32>()?;
        Ok(())
    };
    let best = best_of(a.common.iters, run)?;
    let profile_ms = profiled(a.profile, run)?;
    let vision_s = if a.breakdown {
        Some(best_of(a.common.iters, || {
            model.get_image_features(&px)?;
            Ok(model.device().synchronize()?)
        })?)
    } else {
        None
    };
    report(
        a.common.json,
        json!({
            "bench": "embed",
            "vision_s": vision_s,
            "profile_ms": profile_ms,
            "model": files.name,
            "device": a.model.device,
            "dtype": a.model.dtype,
            // Which CPU GEMM ran the linears (on the CPU): an ISA, or candle's matmul.
            "cpu_gemm": a.model.cpu_gemm.isa().map_or("candle", |i| i.name()),
            "threads": threads,
            "batch_size": a.batch_size,
            "image_size": [h, w],
            "best_batch_s": best,
            "images_per_s": a.batch_size as f64 / best,
            "load_s": load_s,
            "peak_rss_mib": peak_rss_mib(),
        }),
    );
    Ok(())
}

fn caption(a: &CaptionBench) -> anyhow::Result<()> {
    anyhow::ensure!(a.max_new_tokens > 0, "--max-new-tokens must be at least 1");
    let threads = set_threads(a.common.threads);
    let files = a.model.resolve()?;
    let storage = Quantize::storage(a.quantize);
    let t = Instant::now();
    let c = Captioner::load(&files, &a.model.load_options()?, storage)?;
    let load_s = t.elapsed().as_secs_f64();
    let (h, w) = (c.processor.config.height, c.processor.config.width);
    let px = random_pixels(1, h, w)?.to_device(c.model.device())?;
    // Exactly T new tokens: EOS is forbidden until T, and T is the limit.
    let gen = GenerationConfig {
        max_new_tokens: Some(a.max_new_tokens),
        min_new_tokens: Some(a.max_new_tokens),
        num_beams: 1,
        ..c.generation.clone()
    };
    let mut produced = 0;
    let mut run = || -> anyhow::Result<()> {
        let vision = c.model.get_image_features(&px)?;
        let q = c.model.get_qformer_features(&vision)?;
        let rows = c.head.generate(&q, &[Vec::new()], &gen)?;
        produced = rows.first().map_or(0, Vec::len);
        Ok(())
    };
    let best = best_of(a.common.iters, &mut run)?;
    let profile_ms = profiled(a.profile, &mut run)?;
    anyhow::ensure!(
        produced == a.max_new_tokens,
        "generated {produced} tokens, expected {}",
        a.max_new_tokens
    );
    report(
        a.common.json,
        json!({
            "bench": "caption",
            "model": files.name,
            "device": a.model.device,
            "dtype": a.model.dtype,
            // Which CPU GEMM ran the linears (on the CPU): an ISA, or candle's matmul.
            "cpu_gemm": a.model.cpu_gemm.isa().map_or("candle", |i| i.name()),
            "quantize": a.quantize.map(|_| "q8"),
            "threads": threads,
            "new_tokens": a.max_new_tokens,
            "best_caption_s": best,
            "profile_ms": profile_ms,
            "tokens_per_s": a.max_new_tokens as f64 / best,
            "captions_per_s": 1.0 / best,
            "load_s": load_s,
            "peak_rss_mib": peak_rss_mib(),
        }),
    );
    Ok(())
}

/// Best-of-`iters` seconds for decoding every file and for resizing every decoded image, on
/// this thread (the unit of ingest's decode pool), after one warm-up run.
fn decode(a: &DecodeBench) -> anyhow::Result<()> {
    use blipdex_model::image::{resize_bicubic, ImageConfig, ImageProcessor};
    let mut config = ImageConfig::blip2_default();
    (config.width, config.height) = (a.size as usize, a.size as usize);
    let processor = ImageProcessor::new(config)
        .with_exif_orientation(true)
        .with_decode(a.decode);
    let files: Vec<(String, Vec<u8>)> = a
        .files
        .iter()
        .map(|p| {
            Ok((
                p.display().to_string(),
                std::fs::read(p).with_context(|| p.display().to_string())?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    // CPU seconds of the whole process: the fast path's decoder may hand its IDCT to helper
    // threads, and a rate per core must count them.
    #[allow(unsafe_code)]
    let cpu = || {
        // SAFETY: rusage is plain data (all-zero is valid) and getrusage writes one of them.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        secs(ru.ru_utime) + secs(ru.ru_stime)
    };
    let mut best = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let (mut pixels, mut decoded) = (0u64, 0u64);
    for _ in 0..=a.common.iters.max(1) {
        let (mut dec, mut res) = (0.0, 0.0);
        (pixels, decoded) = (0, 0);
        let cpu0 = cpu();
        for (name, bytes) in &files {
            let t = Instant::now();
            let img = processor.load(bytes, name)?;
            dec += t.elapsed().as_secs_f64();
            pixels += u64::from(img.width) * u64::from(img.height);
            decoded += u64::from(img.image.width()) * u64::from(img.image.height());
            let t = Instant::now();
            let out = resize_bicubic(&img.image, a.size, a.size)?;
            res += t.elapsed().as_secs_f64();
            std::hint::black_box(out);
            ImageProcessor::recycle(img.image);
        }
        let used = cpu() - cpu0;
        if dec + res < best.0 + best.1 {
            best = (dec, res, used);
        }
    }
    // How far the fast decode moves the model's input: |exact - fast| of the resized pixels.
    let vs_exact = if a.decode == blipdex_model::image::DecodeMode::Fast {
        let exact = processor
            .clone()
            .with_decode(blipdex_model::image::DecodeMode::Exact);
        let (mut sum, mut max, mut count) = (0u64, 0u8, 0u64);
        for (name, bytes) in &files {
            let x = resize_bicubic(&exact.load_bytes(bytes, name)?, a.size, a.size)?;
            let y = resize_bicubic(&processor.load_bytes(bytes, name)?, a.size, a.size)?;
            for (p, q) in x.as_raw().iter().zip(y.as_raw()) {
                let d = p.abs_diff(*q);
                (sum, max, count) = (sum + u64::from(d), max.max(d), count + 1);
            }
        }
        json!({"mean_abs_levels": sum as f64 / count.max(1) as f64, "max_abs_levels": max})
    } else {
        serde_json::Value::Null
    };
    let n = files.len() as f64;
    let out = json!({
        "bench": "decode",
        "vs_exact": vs_exact,
        "decode": a.decode.to_string(),
        "files": files.len(),
        "megapixels_per_image": pixels as f64 / n / 1e6,
        "decoded_megapixels_per_image": decoded as f64 / n / 1e6,
        "size": a.size,
        "decode_ms_per_image": best.0 * 1e3 / n,
        "resize_ms_per_image": best.1 * 1e3 / n,
        "images_per_s_per_core": n / best.2.max(best.0 + best.1),
        "cpu_s_per_wall_s": best.2 / (best.0 + best.1),
    });
    if a.common.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
