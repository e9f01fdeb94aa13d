//! Serde mirrors of transformers' `configuration_blip_2.py`. Field names and defaults follow
//! the Python classes so that any `config.json` of a BLIP-2 checkpoint deserializes as-is.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Blip2VisionConfig {
    #[serde(default = "vision_defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "vision_defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "vision_defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "vision_defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "vision_defaults::image_size")]
    pub image_size: SizeSpec,
    #[serde(default = "vision_defaults::patch_size")]
    pub patch_size: SizeSpec,
    #[serde(default = "vision_defaults::hidden_act")]
    /// `gelu` deserializes to the exact (erf) GELU, as PyTorch's `nn.GELU()`.
    pub hidden_act: candle_nn::Activation,
    #[serde(default = "vision_defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "vision_defaults::qkv_bias")]
    pub qkv_bias: bool,
    /// Not in `config.json`: which kernels run this tower (one of the load options).
    #[serde(skip)]
    pub kernels: blipdex_kernels::Kernels,
}

mod vision_defaults {
    use super::SizeSpec;
    pub fn hidden_size() -> usize {
        1408
    }
    pub fn intermediate_size() -> usize {
        6144
    }
    pub fn num_hidden_layers() -> usize {
        39
    }
    pub fn num_attention_heads() -> usize {
        16
    }
    pub fn image_size() -> SizeSpec {
        SizeSpec::Square(224)
    }
    pub fn patch_size() -> SizeSpec {
        SizeSpec::Square(14)
    }
    pub fn hidden_act() -> candle_nn::Activation {
        candle_nn::Activation::Gelu
    }
    pub fn layer_norm_eps() -> f64 {
        1e-6
    }
    pub fn qkv_bias() -> bool {
        true
    }
}

/// `image_size` / `patch_size` may be an int or a `[h, w]` pair in transformers configs.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SizeSpec {
    Square(usize),
    Pair([usize; 2]),
}

impl SizeSpec {
    pub fn hw(&self) -> (usize, usize) {
        match *self {
            SizeSpec::Square(s) => (s, s),
            SizeSpec::Pair([h, w]) => (h, w),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Blip2QFormerConfig {
    #[serde(default = "qformer_defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "qformer_defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "qformer_defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "qformer_defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "qformer_defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "vision_defaults::hidden_act")]
    /// `gelu` deserializes to the exact (erf) GELU, as PyTorch's `nn.GELU()`.
    pub hidden_act: candle_nn::Activation,
    #[serde(default = "qformer_defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "qformer_defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "qformer_defaults::cross_attention_frequency")]
    pub cross_attention_frequency: usize,
    /// Overwritten with the vision hidden size, as `Blip2Config.__post_init__` does.
    #[serde(default = "vision_defaults::hidden_size")]
    pub encoder_hidden_size: usize,
    #[serde(default)]
    pub use_qformer_text_input: bool,
    /// Not in `config.json`: which kernels run this tower (one of the load options).
    #[serde(skip)]
    pub kernels: blipdex_kernels::Kernels,
}

mod qformer_defaults {
    pub fn vocab_size() -> usize {
        30522
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn max_position_embeddings() -> usize {
        512
    }
    pub fn layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn cross_attention_frequency() -> usize {
        2
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Blip2Config {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vision_config: Blip2VisionConfig,
    pub qformer_config: Blip2QFormerConfig,
    /// The language model's config (OPT/T5); kept raw until a captioning model parses it.
    #[serde(default)]
    pub text_config: Option<serde_json::Value>,
    #[serde(default = "top_defaults::num_query_tokens")]
    pub num_query_tokens: usize,
    #[serde(default = "top_defaults::image_text_hidden_size")]
    pub image_text_hidden_size: usize,
    #[serde(default, alias = "image_token_id")]
    pub image_token_index: Option<u32>,
    /// Not in `config.json`: which kernels run the model (one of the load options), copied
    /// into each tower's config.
    #[serde(skip)]
    pub kernels: blipdex_kernels::Kernels,
}

mod top_defaults {
    pub fn num_query_tokens() -> usize {
        32
    }
    pub fn image_text_hidden_size() -> usize {
        256
    }
}

impl Blip2Config {
    /// Parse `config.json`, applying `Blip2Config.__post_init__`'s fix-ups and sanity checks.
    pub fn from_json_str(s: &str) -> Result<Self, String> {
        Self::from_json_with(s, blipdex_kernels::Kernels::default())
    }

    /// [`Blip2Config::from_json_str`], the towers to run on `kernels`.
    pub fn from_json_with(s: &str, kernels: blipdex_kernels::Kernels) -> Result<Self, String> {
        let mut cfg: Blip2Config = serde_json::from_str(s).map_err(|e| e.to_string())?;
        if let Some(mt) = &cfg.model_type {
            if mt != "blip-2" && mt != "blip_2" {
                return Err(format!("model_type is {mt:?}, expected \"blip-2\""));
            }
        }
        cfg.qformer_config.encoder_hidden_size = cfg.vision_config.hidden_size;
        cfg.kernels = kernels;
        cfg.vision_config.kernels = kernels;
        cfg.qformer_config.kernels = kernels;
        let v = &cfg.vision_config;
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(format!(
                "vision hidden_size {} is not a multiple of num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        let q = &cfg.qformer_config;
        if q.num_attention_heads == 0 || !q.hidden_size.is_multiple_of(q.num_attention_heads) {
            return Err(format!(
                "qformer hidden_size {} is not a multiple of num_attention_heads {}",
                q.hidden_size, q.num_attention_heads
            ));
        }
        if q.cross_attention_frequency == 0 {
            return Err("qformer cross_attention_frequency must be at least 1".into());
        }
        let (ph, pw) = v.patch_size.hw();
        if ph == 0 || pw == 0 {
            return Err("vision patch_size must be positive".into());
        }
        Ok(cfg)
    }
}
