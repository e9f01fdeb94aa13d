//! BLIP-2 in candle, ported from transformers' `modeling_blip_2.py`.

pub mod blip2;
pub mod caption;
pub mod captioner;
pub mod config;
pub mod image;
pub mod layers;
pub mod loading;
pub mod opt;
pub mod qformer;
pub mod retriever;
pub mod tokenizer;
pub mod vision;
pub mod vision_cache;
pub mod weights;

pub use blip2::{Blip2, LoadOptions};
pub use blipdex_kernels::{CpuGemm, Kernels};
pub use captioner::{CaptionRequest, Captioner, Generated};
pub use config::Blip2Config;
pub use loading::ModelFiles;
pub use retriever::Retriever;
