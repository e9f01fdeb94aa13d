//! A whole retrieval checkpoint (`Blip2ForImageTextRetrieval`): the model with its ITC/ITM
//! heads, the tokenizer and the image processor — what ingest, search, serve and the CLI embed
//! and score with. The retrieval side's counterpart of [`Captioner`](crate::Captioner).

use candle_core::{DType, Tensor};
use image::RgbImage;

use blipdex_core::{Error, Result};

use crate::image::{ImageConfig, ImageProcessor};
use crate::tokenizer::TextTokenizer;
use crate::{Blip2, LoadOptions, ModelFiles};

pub struct Retriever {
    pub files: ModelFiles,
    pub model: Blip2,
    pub tokenizer: TextTokenizer,
    /// The checkpoint's processor, EXIF orientation applied (photos as people see them).
    pub processor: ImageProcessor,
    /// Longest text the Q-Former's position table takes.
    max_text_len: usize,
}

fn terr(e: candle_core::Error) -> Error {
    Error::Tensor(e.to_string())
}

impl Retriever {
    /// Loads a checkpoint with retrieval heads; any other is refused with what to use instead.
    pub fn load(files: &ModelFiles, opts: &LoadOptions) -> Result<Self> {
        let model = Blip2::load(files, opts)?;
        Self::new(files, model)
    }

    /// Wraps a loaded model (with retrieval heads) with its checkpoint's tokenizer and processor.
    pub fn new(files: &ModelFiles, model: Blip2) -> Result<Self> {
        let heads = model.retrieval.as_ref().ok_or_else(|| {
            Error::Unsupported(format!(
                "{} has no ITC/ITM heads; indexing and search need a Blip2ForImageTextRetrieval \
                 checkpoint such as Salesforce/blip2-itm-vit-g",
                files.name
            ))
        })?;
        let max_text_len = heads.embeddings.max_positions();
        let tokenizer = TextTokenizer::from_model_dir(&files.dir)?;
        let processor = ImageProcessor::new(ImageConfig::from_model_dir(&files.dir)?)
            .with_exif_orientation(true);
        Ok(Self {
            files: files.clone(),
            model,
            tokenizer,
            processor,
            max_text_len,
        })
    }

    /// Decompression-bomb guard for the images this retriever decodes.
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.processor = self.processor.with_max_pixels(max_pixels);
        self
    }

    /// Token ids and attention mask `[M, L]` of `texts` on the model's device, truncated to
    /// the Q-Former's positions.
    pub fn tokenize(&self, texts: &[&str]) -> Result<(Tensor, Tensor)> {
        let enc = self
            .tokenizer
            .encode_batch(texts, Some(self.max_text_len))?;
        let n = enc.input_ids.len();
        let len = enc.input_ids.first().map_or(0, Vec::len);
        let dev = self.model.device();
        let ids = Tensor::from_vec(enc.input_ids.concat(), (n, len), dev).map_err(terr)?;
        let mask = Tensor::from_vec(enc.attention_mask.concat(), (n, len), dev).map_err(terr)?;
        Ok((ids, mask))
    }

    /// ITC text embeddings (unit vectors of length E), one per text, in one batch.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let (ids, mask) = self.tokenize(texts)?;
        let e = self.model.text_embeds(&ids, &mask)?;
        e.to_dtype(DType::F32)
            .and_then(|t| t.to_vec2())
            .map_err(terr)
    }

    /// The vision tower's states `[N, 1 + P, Dv]` (what ITM and the vision cache keep) and the
    /// ITC embeddings (Q×E values per image, `[Q][E]`) of `pixel_values`, in one batch.
    pub fn embed_pixels(&self, pixel_values: &Tensor) -> Result<(Tensor, Vec<Vec<f32>>)> {
        let n = pixel_values.dim(0).map_err(terr)?;
        let vision = self.model.get_image_features(pixel_values)?;
        let e = self
            .model
            .image_embeds(&self.model.get_qformer_features(&vision)?)?;
        let flat: Vec<f32> = e
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all()?.to_vec1())
            .map_err(terr)?;
        let per = flat.len() / n.max(1);
        let rows = flat.chunks_exact(per.max(1)).map(<[f32]>::to_vec).collect();
        Ok((vision, rows))
    }

    /// ITC embeddings of decoded images (see [`Retriever::embed_pixels`]).
    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.embed_pixels(&self.processor.pixel_values(images)?)?.1)
    }
}
