//! `blipdex caption`: captions / answers from a BLIP-2 OPT checkpoint (`Blip2ForConditionalGeneration`),
//! token for token what transformers' `generate` gives.

use anyhow::{bail, Context};
use blipdex_model::opt::LinearStorage;
use blipdex_model::{CaptionRequest, Captioner};

use clap::{Args, ValueEnum};

use crate::args::{ImageInputArgs, ModelArgs};

/// How to store the language model's decoder weights.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantize {
    /// GGML Q8_0: about half the memory of f16 for the decoder's Linear layers.
    Q8,
}

impl Quantize {
    /// The language model's Linear storage for an optional `--quantize`.
    pub fn storage(q: Option<Quantize>) -> LinearStorage {
        match q {
            Some(Quantize::Q8) => LinearStorage::Q8,
            None => LinearStorage::Float,
        }
    }
}

#[derive(Args, Debug)]
pub struct CaptionArgs {
    /// Checkpoint (a Blip2ForConditionalGeneration with an OPT language model, e.g.
    /// Salesforce/blip2-opt-2.7b). --dtype applies to the language model too.
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: ImageInputArgs,
    /// Prompt for every image, e.g. "Question: what is in the photo? Answer:". Without it: a caption.
    #[arg(long, env = "BLIPDEX_PROMPT")]
    pub prompt: Option<String>,
    /// Most tokens to generate (default: generation_config.json, else transformers' 20).
    #[arg(long, env = "BLIPDEX_MAX_NEW_TOKENS")]
    pub max_new_tokens: Option<usize>,
    /// Fewest tokens to generate before EOS is allowed.
    #[arg(long, env = "BLIPDEX_MIN_NEW_TOKENS")]
    pub min_new_tokens: Option<usize>,
    /// Beam search with this many beams (1: greedy; default from generation_config.json).
    #[arg(long, env = "BLIPDEX_NUM_BEAMS")]
    pub num_beams: Option<usize>,
    /// Store the language model's decoder Linear weights quantized.
    #[arg(long, env = "BLIPDEX_QUANTIZE", value_enum)]
    pub quantize: Option<Quantize>,
    /// One JSON object per line: {"image": <file, or index into --pixel-values>, "token_ids": [...], "text": "..."}.
    #[arg(long, env = "BLIPDEX_JSON")]
    pub json: bool,
}

/// One image's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    /// The file, or the row of --pixel-values.
    pub image: serde_json::Value,
    /// New tokens up to and including EOS (the prompt is not repeated).
    pub token_ids: Vec<u32>,
    /// Decoded with special tokens skipped, stripped.
    pub text: String,
    /// Why this image could not be captioned (unreadable or not an image); the others still are.
    pub error: Option<String>,
}

pub fn run(args: &CaptionArgs) -> anyhow::Result<()> {
    let captions = captions(args)?;
    let mut failed = 0;
    for c in &captions {
        match (&c.error, args.json) {
            (Some(why), true) => {
                println!("{}", serde_json::json!({"image": c.image, "error": why}));
                failed += 1;
            }
            (Some(why), false) => {
                eprintln!("{}: {why}", display(&c.image));
                failed += 1;
            }
            (None, true) => println!(
                "{}",
                serde_json::json!({"image": c.image, "token_ids": c.token_ids, "text": c.text})
            ),
            (None, false) => println!("{}\t{}", display(&c.image), c.text),
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} images could not be captioned (see above); the others were",
            captions.len()
        );
    }
    Ok(())
}

fn display(image: &serde_json::Value) -> String {
    match image {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Everything `run` prints, without printing it.
pub fn captions(args: &CaptionArgs) -> anyhow::Result<Vec<Caption>> {
    if args.input.is_empty() {
        bail!("nothing to caption: give --image or --pixel-values");
    }
    let files = args.model.resolve()?;
    let opts = args.model.load_options()?;
    let captioner = Captioner::load(&files, &opts, Quantize::storage(args.quantize))?;
    let req = CaptionRequest {
        prompt: args.prompt.clone().unwrap_or_default(),
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        num_beams: args.num_beams,
    };
    // Validate the decoding settings before any image is read.
    captioner.generation_for(&req)?;

    // One unreadable image among many is reported, not a reason to caption none.
    let loaded = args
        .input
        .load_lenient(&files.dir)?
        .context("nothing to caption: give --image or --pixel-values")?;
    // In the order the images were given.
    let mut out: Vec<(usize, Caption)> = loaded
        .failed
        .into_iter()
        .map(|(at, image, why)| {
            let c = Caption {
                image,
                token_ids: Vec::new(),
                text: String::new(),
                error: Some(why),
            };
            (at, c)
        })
        .collect();
    if let Some(pixel_values) = &loaded.pixel_values {
        let batch_size = args.input.batch_size();
        let n = pixel_values.dim(0)?;
        for start in (0..n).step_by(batch_size) {
            let len = batch_size.min(n - start);
            let rows = captioner.generate(&pixel_values.narrow(0, start, len)?, &req)?;
            for (i, g) in rows.into_iter().enumerate() {
                let c = Caption {
                    image: loaded.names[start + i].clone(),
                    token_ids: g.token_ids,
                    text: g.text,
                    error: None,
                };
                out.push((loaded.rows[start + i], c));
            }
        }
    }
    out.sort_by_key(|(at, _)| *at);
    let out: Vec<Caption> = out.into_iter().map(|(_, c)| c).collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blipdex_model::caption::trim_after_eos;
    use clap::Parser;
    use std::path::PathBuf;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: CaptionArgs,
    }

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn parse(extra: &[&str]) -> CaptionArgs {
        let mut argv = vec!["caption".to_string()];
        argv.extend(extra.iter().map(|s| s.to_string()));
        Cli::try_parse_from(argv).expect("arguments parse").args
    }

    fn golden_case(name: &str, case: &str) -> serde_json::Value {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("golden/{name}.json")))
                .expect("golden json"),
        )
        .expect("golden json parses");
        meta["generation"]
            .as_array()
            .and_then(|cases| cases.iter().find(|c| c["name"] == case))
            .cloned()
            .expect("golden case")
    }

    fn ids(v: &serde_json::Value) -> Vec<u32> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Golden pixel values → the same tokens and text as transformers (greedy and a prompt).
    #[test]
    fn captions_match_transformers() {
        for (name, case, extra) in [
            ("caption-a", "greedy", vec![]),
            (
                "caption-b",
                "greedy_prompt",
                vec![
                    "--prompt",
                    "Question: what is in the photo? Answer:",
                    "--max-new-tokens",
                    "10",
                ],
            ),
            (
                "caption-a",
                "beam",
                vec!["--num-beams", "3", "--batch-size", "2"],
            ),
        ] {
            let model = fixtures().join("models").join(name);
            let px = fixtures().join(format!("golden/{name}.safetensors"));
            let mut argv = vec![
                "--model",
                model.to_str().expect("utf-8 path"),
                "--pixel-values",
                px.to_str().expect("utf-8 path"),
            ];
            argv.extend(extra);
            let got = captions(&parse(&argv)).expect("captions");
            let want = golden_case(name, case);
            let eos = ids(&serde_json::json!([2]));
            let cases = want["new_tokens"].as_array().map_or(0, Vec::len);
            assert!(cases > 0, "{name} {case}: no golden captions");
            assert_eq!(got.len(), cases, "{name} {case}: one caption per image");
            for (i, c) in got.iter().enumerate() {
                let want_ids = ids(&want["new_tokens"][i]);
                assert_eq!(
                    c.token_ids,
                    trim_after_eos(&want_ids, &eos),
                    "{name} {case} image {i}"
                );
                assert_eq!(
                    c.text,
                    want["texts"][i].as_str().expect("text"),
                    "{name} {case} image {i}"
                );
                assert_eq!(c.image, serde_json::json!(i));
            }
        }
    }

    /// A bad file among good ones: the good ones are captioned, the bad one reported.
    #[test]
    fn one_bad_image_does_not_stop_the_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("junk.jpg");
        std::fs::write(&junk, b"not a jpeg").expect("write");
        let model = fixtures().join("models/caption-a");
        let good = fixtures().join("photos/rocket.jpg");
        let args = parse(&[
            "--model",
            model.to_str().expect("utf-8"),
            "--image",
            junk.to_str().expect("utf-8"),
            "--image",
            good.to_str().expect("utf-8"),
            "--max-new-tokens",
            "3",
        ]);
        let got = captions(&args).expect("captions");
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].error.is_some(),
            "given first, reported first: {got:?}"
        );
        let ok = got
            .iter()
            .find(|c| c.error.is_none())
            .expect("the good one");
        assert!(ok.image.as_str().is_some_and(|s| s.ends_with("rocket.jpg")));
        assert!(!ok.token_ids.is_empty());
        let bad = got.iter().find(|c| c.error.is_some()).expect("the bad one");
        assert!(bad.image.as_str().is_some_and(|s| s.ends_with("junk.jpg")));
        assert!(
            bad.error.as_deref().is_some_and(|e| e.contains("junk.jpg")),
            "{bad:?}"
        );
        assert!(run(&args).is_err(), "a failed image makes the run fail");
    }

    #[test]
    fn missing_tokenizer_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = fixtures().join("models/caption-a");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
        }
        let px = fixtures().join("golden/caption-a.safetensors");
        let args = parse(&[
            "--model",
            dir.path().to_str().expect("utf-8"),
            "--pixel-values",
            px.to_str().expect("utf-8"),
        ]);
        let e = captions(&args).expect_err("no tokenizer files");
        assert!(format!("{e:#}").contains("tokenizer"), "{e:#}");
    }

    #[test]
    fn retrieval_checkpoint_is_a_clear_error() {
        let model = fixtures().join("models/itm-a");
        let px = fixtures().join("golden/itm-a.safetensors");
        let args = parse(&[
            "--model",
            model.to_str().expect("utf-8"),
            "--pixel-values",
            px.to_str().expect("utf-8"),
        ]);
        let e = captions(&args).expect_err("no language model");
        assert!(format!("{e:#}").contains("no language model"), "{e:#}");
    }
}
