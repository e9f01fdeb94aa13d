//! A whole captioning checkpoint (`Blip2ForConditionalGeneration`): its own vision tower and
//! Q-Former, the OPT language head, tokenizer, image processor and generation defaults. Used by
//! `blipdex caption`, captions at ingest and the server.

use candle_core::Tensor;

use blipdex_core::{Error, Result};

use crate::caption::{trim_after_eos, GenerationConfig, LanguageHead};
use crate::image::{ImageConfig, ImageProcessor};
use crate::opt::LinearStorage;
use crate::tokenizer::TextTokenizer;
use crate::{Blip2, LoadOptions, ModelFiles};
use ::image::RgbImage;

/// One generated caption / answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// New tokens up to and including EOS (the prompt is not repeated).
    pub token_ids: Vec<u32>,
    /// Decoded with special tokens skipped, stripped.
    pub text: String,
}

/// Per-request decoding overrides on top of the checkpoint's generation defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CaptionRequest {
    /// e.g. "Question: what is in the photo? Answer:"; empty = a plain caption.
    pub prompt: String,
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub num_beams: Option<usize>,
}

pub struct Captioner {
    pub files: ModelFiles,
    pub model: Blip2,
    pub head: LanguageHead,
    pub tokenizer: TextTokenizer,
    pub processor: ImageProcessor,
    /// The checkpoint's defaults (generation_config.json, else transformers').
    pub generation: GenerationConfig,
}

impl Captioner {
    /// Loads the language side first so that a retrieval-only checkpoint fails with a message
    /// that says captions need a `Blip2ForConditionalGeneration` checkpoint.
    pub fn load(files: &ModelFiles, opts: &LoadOptions, storage: LinearStorage) -> Result<Self> {
        let head = LanguageHead::load(files, opts, storage)?;
        let tokenizer = TextTokenizer::from_model_dir(&files.dir).map_err(|e| {
            Error::bad_model(
                &files.name,
                format!("captions need the checkpoint's OPT tokenizer: {e}"),
            )
        })?;
        let generation = GenerationConfig::from_model_dir(&files.dir, head.config())?;
        let model = Blip2::load(files, opts)?;
        let processor = ImageProcessor::new(ImageConfig::from_model_dir(&files.dir)?)
            .with_exif_orientation(true);
        Ok(Self {
            files: files.clone(),
            model,
            head,
            tokenizer,
            processor,
            generation,
        })
    }

    /// Decompression-bomb guard for images this captioner decodes.
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.processor = self.processor.with_max_pixels(max_pixels);
        self
    }

    /// The generation config for `req`, validated.
    pub fn generation_for(&self, req: &CaptionRequest) -> Result<GenerationConfig> {
        let mut gen = self.generation.clone();
        if let Some(n) = req.max_new_tokens {
            gen.max_new_tokens = Some(n);
        }
        if let Some(n) = req.min_new_tokens {
            gen.min_new_tokens = Some(n);
        }
        if let Some(n) = req.num_beams {
            gen.num_beams = n;
        }
        gen.validate().map_err(Error::InvalidArgument)?;
        Ok(gen)
    }

    /// Prompt token ids (no special tokens; BOS is added by the language head).
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            Ok(Vec::new())
        } else {
            self.tokenizer.encode_no_special(prompt)
        }
    }

    /// Pixel values [N, 3, H, W] for `images`, with this checkpoint's processor.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.processor.pixel_values(images)
    }

    /// Captions for a batch of pixel values, one prompt for all; each row trimmed after its
    /// EOS (what the image would have generated alone).
    pub fn generate(&self, pixel_values: &Tensor, req: &CaptionRequest) -> Result<Vec<Generated>> {
        let gen = self.generation_for(req)?;
        let prompt = self.prompt_ids(&req.prompt)?;
        let n = pixel_values
            .dim(0)
            .map_err(|e| Error::Tensor(e.to_string()))?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let vision = self.model.get_image_features(pixel_values)?;
        let q = self.model.get_qformer_features(&vision)?;
        let rows = self.head.generate(&q, &vec![prompt; n], &gen)?;
        rows.iter()
            .map(|row| {
                let token_ids = trim_after_eos(row, &gen.eos_token_ids).to_vec();
                let text = self.tokenizer.decode(&token_ids, true)?.trim().to_string();
                Ok(Generated { token_ids, text })
            })
            .collect()
    }
}
