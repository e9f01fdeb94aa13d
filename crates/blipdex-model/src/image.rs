//! Image preprocessing as transformers' BLIP image processor does it (PIL backend,
//! `BlipImageProcessorPil`): convert to RGB (transparency composited over white), bicubic resize to
//! the model's square input, rescale by 1/255, normalize with the CLIP mean/std, CHW `f32` out.
//!
//! Parity notes (measured against transformers 5.23 / Pillow 13):
//! * Lossless inputs (PNG, GIF, BMP, TIFF, lossless WebP) decode to the same pixels as Pillow; the
//!   alpha compositing reproduces `PIL.Image.alpha_composite` bit for bit.
//! * JPEG is decoded by zune-jpeg, Pillow uses libjpeg-turbo: their IDCT/upsampling differ by a
//!   level or two on some pixels, so JPEG inputs are close but not identical.
//! * The bicubic resize is a port of Pillow's resampling code and is bit-identical to it.
//! * 16-bit images keep the high byte of each sample, as Pillow's PNG decoder does. For 16-bit
//!   *grayscale* Pillow then clips the `I;16` values to 255 when converting to RGB (an all-white
//!   image); we deliberately keep the high byte instead.
//! * EXIF orientation is ignored by default, as transformers ignores it.
//! * The first frame of animated GIF/WebP is used, as Pillow does.

use std::io::Cursor;
use std::path::Path;

use blipdex_core::{Error, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

thread_local! {
    /// One RGB buffer per thread for [`ImageProcessor::recycle`].
    static SPARE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Pillow's decompression-bomb limit: `Image.MAX_IMAGE_PIXELS` is 89_478_485 pixels and Pillow
/// raises `DecompressionBombError` (rather than only warning) above twice that, i.e. above
/// 178_956_970 pixels. Images with more pixels than this are refused before their pixels are
/// decoded.
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// OpenAI CLIP normalization constants used by all BLIP-2 checkpoints (the values transformers
/// writes, rounded to `f32` exactly as numpy's `np.array(mean, dtype=float32)` does).
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// PIL's `Image.Resampling.BICUBIC`, the only resampling filter supported.
const PIL_BICUBIC: i64 = 3;

/// Preprocessing settings of a BLIP/BLIP-2 image processor.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    pub height: usize,
    pub width: usize,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f32,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// Read for completeness; images are always converted to RGB since the vision encoder needs
    /// three channels (transformers with `do_convert_rgb: false` only differs on non-RGB inputs,
    /// where it would produce a tensor the model cannot take).
    pub do_convert_rgb: bool,
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self::blip2_default()
    }
}

impl ImageConfig {
    /// Defaults of BLIP-2 checkpoints (224x224, CLIP mean/std, rescale 1/255).
    pub fn blip2_default() -> Self {
        Self {
            height: 224,
            width: 224,
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
        }
    }

    /// Read from a model directory the way transformers does: `processor_config.json` if it holds
    /// an `"image_processor"` object (transformers 5 layout), else `preprocessor_config.json`
    /// (older layout, keys at top level). Falls back to [`ImageConfig::blip2_default`] with a
    /// warning if neither exists.
    ///
    /// `size` may be `{"height", "width"}`, `{"shortest_edge"}` (treated as a square, since the
    /// vision encoder needs a fixed input size) or a plain integer (square). `resample` must be 3
    /// (bicubic) or absent. Keys set to `null` take their default.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let processor = dir.join("processor_config.json");
        if processor.is_file() {
            let text = read_text(&processor)?;
            let value = parse_json(&text, &processor.display().to_string())?;
            if let Some(inner) = value.get("image_processor") {
                return Self::from_json_value(inner, &processor.display().to_string());
            }
        }
        let preprocessor = dir.join("preprocessor_config.json");
        if preprocessor.is_file() {
            let text = read_text(&preprocessor)?;
            return Self::from_json_str(&text, &preprocessor.display().to_string());
        }
        tracing::warn!(
            dir = %dir.display(),
            "no preprocessor_config.json nor processor_config.json with an \"image_processor\" \
             entry; using BLIP-2 defaults (224x224, bicubic, CLIP mean/std)"
        );
        Ok(Self::blip2_default())
    }

    /// Parse an image-processor config from JSON text. Accepts both layouts: keys at the top
    /// level (`preprocessor_config.json`) or nested under `"image_processor"`
    /// (`processor_config.json`). `what` names the source in error messages.
    pub fn from_json_str(json: &str, what: &str) -> Result<Self> {
        let value = parse_json(json, what)?;
        match value.get("image_processor") {
            Some(inner) => Self::from_json_value(inner, what),
            None => Self::from_json_value(&value, what),
        }
    }

    fn from_json_value(value: &serde_json::Value, what: &str) -> Result<Self> {
        let bad = |reason: String| Error::bad_model(what, reason);
        let obj = value
            .as_object()
            .ok_or_else(|| bad("the image processor config is not a JSON object".into()))?;
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let get_bool = |key: &str, default: bool| -> Result<bool> {
            match get(key) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad(format!("\"{key}\" must be true or false, found {v}"))),
            }
        };
        let get_triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            let Some(v) = get(key) else {
                return Ok(default);
            };
            if let Some(x) = v.as_f64() {
                return Ok([x as f32; 3]);
            }
            let arr = v
                .as_array()
                .filter(|a| a.len() == 3)
                .ok_or_else(|| bad(format!("\"{key}\" must be a list of 3 numbers, found {v}")))?;
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(arr) {
                *o = x.as_f64().ok_or_else(|| {
                    bad(format!("\"{key}\" must be a list of 3 numbers, found {v}"))
                })? as f32;
            }
            Ok(out)
        };

        let mut cfg = Self::blip2_default();
        if let Some(size) = get("size") {
            let (h, w) = parse_size(size).map_err(|reason| bad(reason.to_string()))?;
            cfg.height = h;
            cfg.width = w;
        }
        if let Some(r) = get("resample") {
            if r.as_i64() != Some(PIL_BICUBIC) {
                return Err(bad(format!(
                    "\"resample\" is {r}, but only 3 (PIL bicubic, what BLIP-2 uses) is \
                     supported; set it to 3 or remove it"
                )));
            }
        }
        if get_bool("do_center_crop", false)? {
            return Err(bad(
                "\"do_center_crop\": true is not supported by the BLIP image \
                 processor port; set it to false"
                    .into(),
            ));
        }
        if get_bool("do_pad", false)? {
            return Err(bad(
                "\"do_pad\": true is not supported by the BLIP image processor port; set it to false".into(),
            ));
        }
        cfg.do_resize = get_bool("do_resize", cfg.do_resize)?;
        cfg.do_rescale = get_bool("do_rescale", cfg.do_rescale)?;
        cfg.do_normalize = get_bool("do_normalize", cfg.do_normalize)?;
        cfg.do_convert_rgb = get_bool("do_convert_rgb", cfg.do_convert_rgb)?;
        if let Some(v) = get("rescale_factor") {
            let f = v
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| bad(format!("\"rescale_factor\" must be a number, found {v}")))?;
            cfg.rescale_factor = f as f32;
        }
        cfg.image_mean = get_triple("image_mean", cfg.image_mean)?;
        cfg.image_std = get_triple("image_std", cfg.image_std)?;
        if cfg.image_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(bad(format!(
                "\"image_std\" must be finite and non-zero, found {:?}",
                cfg.image_std
            )));
        }
        if cfg.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(bad(format!(
                "\"image_mean\" must be finite, found {:?}",
                cfg.image_mean
            )));
        }
        Ok(cfg)
    }
}

impl ImageConfig {
    /// `rescale_factor` as the `f64` that transformers multiplies by. A factor of the form `1/n`
    /// (1/255 in every BLIP-2 checkpoint) is recovered exactly, so that rescaling is bit-identical
    /// to numpy's `uint8 * (1/255)` in `f64` followed by the cast to `f32`.
    pub fn rescale_factor_f64(&self) -> f64 {
        let f = f64::from(self.rescale_factor);
        if f > 0.0 {
            let n = (1.0 / f).round();
            if n >= 1.0 && ((1.0 / n) as f32) == self.rescale_factor {
                return 1.0 / n;
            }
        }
        f
    }
}

/// `size` → (height, width).
fn parse_size(size: &serde_json::Value) -> std::result::Result<(usize, usize), String> {
    let dim = |v: &serde_json::Value| v.as_u64().filter(|&d| d > 0 && d <= 65_535);
    if let Some(s) = dim(size) {
        return Ok((s as usize, s as usize));
    }
    let err = || {
        format!(
            "\"size\" must be {{\"height\": H, \"width\": W}}, {{\"shortest_edge\": S}} or a \
             positive integer, found {size}"
        )
    };
    let obj = size.as_object().ok_or_else(err)?;
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    match (field("height"), field("width"), field("shortest_edge")) {
        (Some(h), Some(w), _) => Ok((
            dim(h).ok_or_else(err)? as usize,
            dim(w).ok_or_else(err)? as usize,
        )),
        (None, None, Some(s)) => {
            let s = dim(s).ok_or_else(err)? as usize;
            tracing::warn!(
                shortest_edge = s,
                "image processor size is {{\"shortest_edge\": {s}}}; resizing to {s}x{s} since \
                 the vision encoder needs a fixed input size"
            );
            Ok((s, s))
        }
        _ => Err(err()),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn parse_json(text: &str, what: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text)
        .map_err(|e| Error::bad_model(what, format!("invalid JSON ({e}); fix or re-download it")))
}

/// Loads images and turns them into the vision encoder's `pixel_values`.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: ImageConfig,
    /// Images with more pixels than this are refused before decoding (see [`DEFAULT_MAX_PIXELS`]).
    pub max_pixels: u64,
    /// Rotate/flip by the EXIF orientation tag. Off by default: transformers ignores EXIF.
    pub apply_exif_orientation: bool,
    /// How JPEGs are decoded before the resize ([`DecodeMode::Exact`] by default).
    pub decode: DecodeMode,
}

/// How [`ImageProcessor`] decodes JPEGs for the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeMode {
    /// Every pixel at full size, then the Pillow-exact resize: transformers' numbers (`embed`'s
    /// parity contract).
    #[default]
    Exact,
    /// JPEGs decoded in the DCT domain at the smallest scale (1/2, 1/4 or 1/8) that still leaves
    /// at least twice the model's input size on both sides, then the same antialiased resize.
    /// The resize of a 12 MP photo reads a sixteenth of the pixels and the IDCT shrinks with
    /// the scale; the entropy decoding stays. Close to, not equal to, [`DecodeMode::Exact`]
    /// (the measured deviation is in the README). Other formats and JPEGs too small to shrink
    /// decode exactly.
    Fast,
}

impl std::str::FromStr for DecodeMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "exact" => Ok(Self::Exact),
            "fast" => Ok(Self::Fast),
            other => Err(format!("unknown decode mode {other:?} (use exact or fast)")),
        }
    }
}

impl std::fmt::Display for DecodeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Exact => "exact",
            Self::Fast => "fast",
        })
    }
}

/// A decoded image and the size it has on disk (after EXIF orientation). [`DecodeMode::Fast`]
/// may decode fewer pixels than that.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub image: RgbImage,
    pub width: u32,
    pub height: u32,
}

impl ImageProcessor {
    /// A processor with [`DEFAULT_MAX_PIXELS`] and EXIF orientation off (parity with transformers).
    pub fn new(config: ImageConfig) -> Self {
        Self {
            config,
            max_pixels: DEFAULT_MAX_PIXELS,
            apply_exif_orientation: false,
            decode: DecodeMode::Exact,
        }
    }

    /// Set how JPEGs are decoded (builder style).
    pub fn with_decode(mut self, decode: DecodeMode) -> Self {
        self.decode = decode;
        self
    }

    /// Set the pixel limit (builder style).
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    /// Enable or disable EXIF orientation (builder style).
    pub fn with_exif_orientation(mut self, apply: bool) -> Self {
        self.apply_exif_orientation = apply;
        self
    }

    /// Read and decode an image file to RGB (see [`ImageProcessor::load_bytes`]).
    pub fn load_file(&self, path: &Path) -> Result<RgbImage> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        self.load_bytes(&bytes, &path.display().to_string())
    }

    /// Decode an encoded image (JPEG, PNG, GIF, WebP, BMP, TIFF; format sniffed from the bytes) to
    /// RGB. The dimensions in the header are checked against `max_pixels` before any pixel is
    /// decoded. Transparency is composited over opaque white exactly as transformers'
    /// `convert_to_rgb` does (`PIL.Image.alpha_composite` over white, then `convert("RGB")`).
    /// `what` names the image in errors. With [`DecodeMode::Fast`] the image may be smaller
    /// than on disk (see [`ImageProcessor::load`]).
    pub fn load_bytes(&self, bytes: &[u8], what: &str) -> Result<RgbImage> {
        Ok(self.load(bytes, what)?.image)
    }

    /// [`ImageProcessor::load_bytes`] with the image's size on disk (after EXIF orientation),
    /// which a [`DecodeMode::Fast`] decode does not show.
    pub fn load(&self, bytes: &[u8], what: &str) -> Result<Loaded> {
        let bad = |reason: String| Error::BadImage {
            what: what.to_string(),
            reason,
        };
        if bytes.is_empty() {
            return Err(bad("the file is empty".into()));
        }
        let reader = |limits: image::Limits| -> Result<ImageReader<Cursor<&[u8]>>> {
            let mut r = ImageReader::new(Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| bad(e.to_string()))?;
            if r.format().is_none() {
                return Err(bad(
                    "unrecognised image format (supported: JPEG, PNG, GIF, WebP, BMP, TIFF)".into(),
                ));
            }
            r.limits(limits);
            Ok(r)
        };

        // Pass 1: header only, no allocation limits, so that the pixel count can be checked.
        let (width, height) = reader(image::Limits::no_limits())?
            .into_dimensions()
            .map_err(|e| bad(describe_image_error(&e)))?;
        self.check_pixels(width, height, what)?;
        if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_has_end_marker(bytes) {
            // zune-jpeg fills a truncated scan with grey; Pillow refuses it ("image file is
            // truncated"), and so do we rather than index a half-grey photo.
            return Err(bad(
                "truncated JPEG (no end-of-image marker); re-copy or re-export the file".into(),
            ));
        }
        if self.decode == DecodeMode::Fast && bytes.starts_with(&[0xFF, 0xD8]) {
            if let Some(loaded) = self.load_jpeg_scaled(bytes, width, height) {
                return Ok(loaded);
            }
        }

        // Pass 2: decode. Allow enough memory for the largest image under the limit (16-bit RGBA).
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(
            self.max_pixels
                .saturating_mul(8)
                .saturating_add(64 << 20)
                .max(512 << 20),
        );
        let mut decoder = reader(limits)?
            .into_decoder()
            .map_err(|e| bad(describe_image_error(&e)))?;
        let orientation = if self.apply_exif_orientation {
            decoder.orientation().unwrap_or_else(|e| {
                tracing::warn!(image = what, error = %e, "ignoring unreadable EXIF orientation");
                image::metadata::Orientation::NoTransforms
            })
        } else {
            image::metadata::Orientation::NoTransforms
        };
        let mut img = if decoder.color_type() == image::ColorType::Rgb8 {
            // Into this thread's recycled buffer (see `recycle`), not a fresh allocation.
            let (w, h) = decoder.dimensions();
            let mut buf = SPARE.with(|s| std::mem::take(&mut *s.borrow_mut()));
            buf.resize(
                usize::try_from(decoder.total_bytes()).unwrap_or(usize::MAX),
                0,
            );
            decoder
                .read_image(&mut buf)
                .map_err(|e| bad(describe_image_error(&e)))?;
            let rgb = RgbImage::from_raw(w, h, buf).ok_or_else(|| {
                bad(format!(
                    "the decoder's {w}x{h} RGB buffer has the wrong size"
                ))
            })?;
            DynamicImage::ImageRgb8(rgb)
        } else {
            DynamicImage::from_decoder(decoder).map_err(|e| bad(describe_image_error(&e)))?
        };
        img.apply_orientation(orientation);
        if img.width() == 0 || img.height() == 0 {
            return Err(bad(format!(
                "the image has no pixels ({}x{})",
                img.width(),
                img.height()
            )));
        }
        let (width, height) = (img.width(), img.height());
        Ok(Loaded {
            image: to_rgb_like_pil(img),
            width,
            height,
        })
    }

    /// [`DecodeMode::Fast`]'s JPEG decode, or `None` where the exact path must run: no scale
    /// leaves twice the input size, a pixel format other than 8-bit RGB/grey (CMYK, 12-bit),
    /// or any decoding error (the exact decoder then names the problem in its own words).
    fn load_jpeg_scaled(&self, bytes: &[u8], width: u32, height: u32) -> Option<Loaded> {
        let cfg = &self.config;
        let need = u32::try_from(2 * cfg.width.max(cfg.height)).ok()?;
        let (w16, h16) = (u16::try_from(width).ok()?, u16::try_from(height).ok()?);
        // jpeg-decoder's scale() accepts a size reached on either side; pick the scale that
        // keeps both sides, as the IDCT sizes it (ceil(side * s / 8)).
        let scaled = |side: u32, s: u32| (side * s).div_ceil(8);
        let s = [1, 2, 4]
            .into_iter()
            .find(|&s| scaled(width, s) >= need && scaled(height, s) >= need)?;
        let mut decoder = jpeg_decoder::Decoder::new(bytes);
        decoder.read_info().ok()?;
        let info = decoder.info()?;
        if (info.width, info.height) != (w16, h16) {
            return None;
        }
        let (ow, oh) = decoder
            .scale(scaled(width, s) as u16, scaled(height, s) as u16)
            .ok()?;
        let (ow, oh) = (u32::from(ow), u32::from(oh));
        if ow < need || oh < need || ow >= width {
            return None;
        }
        let pixels = decoder.decode().ok()?;
        let image = match info.pixel_format {
            jpeg_decoder::PixelFormat::RGB24 => RgbImage::from_raw(ow, oh, pixels)?,
            jpeg_decoder::PixelFormat::L8 => {
                let rgb = pixels.iter().flat_map(|&v| [v; 3]).collect();
                RgbImage::from_raw(ow, oh, rgb)?
            }
            _ => return None,
        };
        let mut img = DynamicImage::ImageRgb8(image);
        let (mut width, mut height) = (width, height);
        if self.apply_exif_orientation {
            let orientation = decoder
                .exif_data()
                .and_then(image::metadata::Orientation::from_exif_chunk)
                .unwrap_or(image::metadata::Orientation::NoTransforms);
            use image::metadata::Orientation::{
                Rotate270, Rotate270FlipH, Rotate90, Rotate90FlipH,
            };
            if matches!(
                orientation,
                Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH
            ) {
                (width, height) = (height, width);
            }
            img.apply_orientation(orientation);
        }
        Some(Loaded {
            image: img.into_rgb8(),
            width,
            height,
        })
    }

    /// Hands a decoded image's buffer back for the next decode on this thread. A camera photo's
    /// RGB buffer (36 MB at 12 MP) is above glibc's largest mmap threshold, so a fresh one is
    /// mapped and faulted in page by page on every decode; a decode loop (ingest's workers,
    /// `bench decode`) that recycles its images skips that.
    pub fn recycle(image: RgbImage) {
        SPARE.with(|s| {
            let mut spare = s.borrow_mut();
            let buf = image.into_raw();
            if buf.capacity() > spare.capacity() {
                *spare = buf;
            }
        });
    }

    fn check_pixels(&self, width: u32, height: u32, what: &str) -> Result<()> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels == 0 {
            return Err(Error::BadImage {
                what: what.to_string(),
                reason: format!("the header says the image is {width}x{height}, which is empty"),
            });
        }
        if pixels > self.max_pixels {
            return Err(Error::ImageTooLarge {
                what: what.to_string(),
                width: width.into(),
                height: height.into(),
                pixels,
                limit: self.max_pixels,
            });
        }
        Ok(())
    }

    /// Resize (bicubic, as Pillow), rescale and normalize an RGB image. Returns CHW `f32` values,
    /// `3 * height * width` of them. With `do_resize` off the image must already have the
    /// configured size.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let (h, w) = (cfg.height, cfg.width);
        let (tw, th) = (
            u32::try_from(w).map_err(|_| bad_size(cfg))?,
            u32::try_from(h).map_err(|_| bad_size(cfg))?,
        );
        if tw == 0 || th == 0 {
            return Err(bad_size(cfg));
        }
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot preprocess an empty {}x{} image",
                img.width(),
                img.height()
            )));
        }
        let resized;
        let src: &RgbImage = if (img.width(), img.height()) == (tw, th) {
            // Pillow returns a copy when the size already matches: no filtering.
            img
        } else if cfg.do_resize {
            resized = resize_bicubic(img, tw, th)?;
            &resized
        } else {
            return Err(Error::InvalidArgument(format!(
                "the image is {}x{} but the processor has do_resize=false and expects {}x{}; \
                 resize the image or enable do_resize",
                img.width(),
                img.height(),
                tw,
                th
            )));
        };

        // transformers: rescale = (uint8 as f64 * factor) as f32, normalize = (x - mean) / std
        // in f32. Precompute per channel and per byte value: identical results, less work.
        let plane = h * w;
        let mut out = vec![0f32; 3 * plane];
        let factor = cfg.rescale_factor_f64();
        for c in 0..3 {
            let mut lut = [0f32; 256];
            for (v, slot) in lut.iter_mut().enumerate() {
                let mut x = if cfg.do_rescale {
                    (v as f64 * factor) as f32
                } else {
                    v as f32
                };
                if cfg.do_normalize {
                    x = (x - cfg.image_mean[c]) / cfg.image_std[c];
                }
                *slot = x;
            }
            let dst = &mut out[c * plane..(c + 1) * plane];
            for (o, px) in dst.iter_mut().zip(src.pixels()) {
                *o = lut[px.0[c] as usize];
            }
        }
        Ok(out)
    }

    /// [`ImageProcessor::load_file`] followed by [`ImageProcessor::preprocess`].
    pub fn pixel_values_from_file(&self, path: &Path) -> Result<Vec<f32>> {
        let img = self.load_file(path)?;
        self.preprocess(&img)
    }

    /// [`ImageProcessor::load_bytes`] followed by [`ImageProcessor::preprocess`].
    pub fn pixel_values_from_bytes(&self, bytes: &[u8], what: &str) -> Result<Vec<f32>> {
        let img = self.load_bytes(bytes, what)?;
        self.preprocess(&img)
    }

    /// `pixel_values` `[N, 3, H, W]` on the CPU of images preprocessed by this processor (the
    /// model moves them to its device).
    pub fn stack<'a>(&self, rows: impl IntoIterator<Item = &'a [f32]>) -> Result<Tensor> {
        let (h, w) = (self.config.height, self.config.width);
        let mut data = Vec::new();
        let mut n = 0;
        for r in rows {
            if r.len() != 3 * h * w {
                return Err(Error::Internal(format!(
                    "preprocessed image of {} values, expected 3x{h}x{w}",
                    r.len()
                )));
            }
            data.extend_from_slice(r);
            n += 1;
        }
        Tensor::from_vec(data, (n, 3, h, w), &Device::Cpu).map_err(|e| Error::Tensor(e.to_string()))
    }

    /// [`ImageProcessor::preprocess`] of each image, stacked (see [`ImageProcessor::stack`]).
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        let rows = images
            .iter()
            .map(|img| self.preprocess(img))
            .collect::<Result<Vec<_>>>()?;
        self.stack(rows.iter().map(Vec::as_slice))
    }
}

fn bad_size(cfg: &ImageConfig) -> Error {
    Error::InvalidArgument(format!(
        "image processor target size {}x{} is invalid",
        cfg.width, cfg.height
    ))
}

fn describe_image_error(e: &image::ImageError) -> String {
    match e {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the file is truncated (unexpected end of data); re-download or re-export it"
                .to_string()
        }
        image::ImageError::Limits(l) => format!(
            "decoder memory limit exceeded ({l}); lower the resolution or raise \
             --max-image-pixels"
        ),
        image::ImageError::Unsupported(u) => {
            format!("{u}; convert the image to JPEG or PNG")
        }
        other => format!("{other}; the file may be corrupt, re-export it as JPEG or PNG"),
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling (`Resample.c`): 32 bits minus 8 for the
/// value minus 2 for the negative lobes / overshoot.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (`bicubic_filter`, a = -0.5), support 2.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, and the fixed-point weights of the inputs from there.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `0..in_size`.
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C casts truncate toward zero; `as` does the same (and saturates at 0 for negatives).
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(n) {
            let w = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *slot = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + n];
        for (dst, &w) in row.iter_mut().zip(&k[..n]) {
            let w = if ww != 0.0 { w / ww } else { w };
            let scaled = w * f64::from(1u32 << PRECISION_BITS);
            *dst = if w < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow's `ImagingResampleHorizontal_8bpc` on RGB rows `row0..row0 + rows` of `src`.
///
/// The same integer sums as Pillow's loop, so the same bytes whatever their order: each row is
/// split into three planes of i32 first, so that every output channel is one contiguous dot
/// product, which the compiler vectorizes in the AVX2 or AVX-512 build `pulp` picks at run
/// time (downscaling a 12 MP photo to 224 px is ~70 taps per output value).
fn resample_horizontal(
    src: &[u8],
    src_w: usize,
    row0: usize,
    rows: usize,
    c: &Coeffs,
    out_w: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; out_w * rows * 3];
    pulp::Arch::new().dispatch(Horizontal {
        src: &src[row0 * src_w * 3..(row0 + rows) * src_w * 3],
        src_w,
        c,
        out: &mut out,
        out_w,
    });
    out
}

struct Horizontal<'a> {
    src: &'a [u8],
    src_w: usize,
    c: &'a Coeffs,
    out: &'a mut [u8],
    out_w: usize,
}

impl pulp::WithSimd for Horizontal<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let Horizontal {
            src,
            src_w,
            c,
            out,
            out_w,
        } = self;
        let mut planes = vec![0i32; 3 * src_w];
        for (in_row, out_row) in src
            .chunks_exact(src_w * 3)
            .zip(out.chunks_exact_mut(out_w * 3))
        {
            let (r, gb) = planes.split_at_mut(src_w);
            let (g, b) = gb.split_at_mut(src_w);
            for (((px, r), g), b) in in_row.chunks_exact(3).zip(r).zip(g).zip(b) {
                *r = i32::from(px[0]);
                *g = i32::from(px[1]);
                *b = i32::from(px[2]);
            }
            for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
                let (xmin, n) = c.bounds[xx];
                let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
                for (ch, o) in px.iter_mut().enumerate() {
                    let p = &planes[ch * src_w + xmin..ch * src_w + xmin + n];
                    *o = clip8(dot(k, p));
                }
            }
        }
    }
}

/// Pillow's rounding start plus the weighted sum (wrapping, as C's int arithmetic; the true
/// sum of a normalized filter over bytes fits in an i32 anyway).
#[inline(always)]
fn dot(k: &[i32], p: &[i32]) -> i32 {
    k.iter()
        .zip(p)
        .fold(1i32 << (PRECISION_BITS - 1), |ss, (&w, &v)| {
            ss.wrapping_add(w.wrapping_mul(v))
        })
}

/// Pillow's `ImagingResampleVertical_8bpc` on RGB columns `col0..col0 + cols` of `src`;
/// `c.bounds` are rows of `src`. Accumulated tap by tap over a whole output row (the same
/// integer sums, vectorized across the row, cache-friendly).
fn resample_vertical(
    src: &[u8],
    src_w: usize,
    col0: usize,
    cols: usize,
    c: &Coeffs,
    out_h: usize,
) -> Vec<u8> {
    let mut out = vec![0u8; cols * 3 * out_h];
    pulp::Arch::new().dispatch(Vertical {
        src,
        src_w,
        col0,
        cols,
        c,
        out: &mut out,
    });
    out
}

struct Vertical<'a> {
    src: &'a [u8],
    src_w: usize,
    col0: usize,
    cols: usize,
    c: &'a Coeffs,
    out: &'a mut [u8],
}

impl pulp::WithSimd for Vertical<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let Vertical {
            src,
            src_w,
            col0,
            cols,
            c,
            out,
        } = self;
        let stride = cols * 3;
        let mut acc = vec![0i32; stride];
        for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
            let (ymin, n) = c.bounds[yy];
            let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
            acc.fill(1i32 << (PRECISION_BITS - 1));
            for (j, &wt) in k.iter().enumerate() {
                let start = ((ymin + j) * src_w + col0) * 3;
                for (a, &p) in acc.iter_mut().zip(&src[start..start + stride]) {
                    *a = a.wrapping_add(i32::from(p).wrapping_mul(wt));
                }
            }
            for (o, &a) in out_row.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
    }
}

/// Whether a JPEG's entropy-coded data is followed by an EOI marker. Inside scan data a 0xFF byte
/// is always followed by 0x00 (stuffing) or a restart marker, so `FF D9` after the first SOS is
/// the real end of the image, even when other data (e.g. a motion-photo trailer) follows it.
fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).position(|w| w == [0xFF, 0xDA]) else {
        return false;
    };
    bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Bicubic resize, a port of Pillow's `Image.resize(size, Image.BICUBIC)` on an RGB image
/// (`ImagingResample`): Catmull-Rom kernel (a = -0.5) whose support is scaled by the shrink factor
/// (antialiasing), weights in 22-bit fixed point, two separable passes each rounded and clamped
/// to uint8. Results are bit-identical to Pillow 13's.
///
/// Pass order matters for the rounding. Pillow 13 (the version checked against) runs the vertical
/// pass first when `max(h - out_h, 0) > 2 * max(w - out_w, 0)` and the horizontal pass first
/// otherwise; this rule was established by matching its output on thousands of random shapes
/// (older Pillow always ran the horizontal pass first). Only the rows/columns the second pass
/// reads are computed in the first, as Pillow does.
///
/// (`fast_image_resize`'s Catmull-Rom uses the same kernel but 16-bit weights and its own pass
/// order; it differed from Pillow by up to 11 uint8 levels near sharp edges, so it is not used.)
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot resize a {in_w}x{in_h} image to {out_w}x{out_h}"
        )));
    }
    let src = img.as_raw();
    let out = match (out_w != in_w, out_h != in_h) {
        (false, false) => src.clone(),
        (true, false) => {
            let horiz = precompute_coeffs(in_w, out_w);
            resample_horizontal(src, in_w, 0, in_h, &horiz, out_w)
        }
        (false, true) => {
            let vert = precompute_coeffs(in_h, out_h);
            resample_vertical(src, in_w, 0, in_w, &vert, out_h)
        }
        (true, true) => {
            let mut horiz = precompute_coeffs(in_w, out_w);
            let mut vert = precompute_coeffs(in_h, out_h);
            let vertical_first = in_h.saturating_sub(out_h) > 2 * in_w.saturating_sub(out_w);
            if vertical_first {
                let (first, last) = span(&horiz.bounds, in_w);
                horiz.bounds.iter_mut().for_each(|b| b.0 -= first);
                let tmp = resample_vertical(src, in_w, first, last - first, &vert, out_h);
                resample_horizontal(&tmp, last - first, 0, out_h, &horiz, out_w)
            } else {
                let (first, last) = span(&vert.bounds, in_h);
                vert.bounds.iter_mut().for_each(|b| b.0 -= first);
                let tmp = resample_horizontal(src, in_w, first, last - first, &horiz, out_w);
                resample_vertical(&tmp, out_w, 0, out_w, &vert, out_h)
            }
        }
    };
    RgbImage::from_raw(width, height, out).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "internal error: resize to {width}x{height} produced a buffer of the wrong size"
        ))
    })
}

/// First and one-past-last input index used by any output pixel.
fn span(bounds: &[(usize, usize)], in_size: usize) -> (usize, usize) {
    let first = bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let last = bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(in_size);
    (first, last.max(first))
}

/// `PIL.Image.alpha_composite(white, rgba)` for one channel value, bit-exact with Pillow's
/// integer implementation (`AlphaComposite.c`, 7 extra bits of precision, rounded divisions)
/// specialised to an opaque white destination.
#[inline]
fn over_white(src: u8, alpha: u8) -> u8 {
    const ALPHA_BITS: u32 = 7;
    if alpha == 0 {
        return 255;
    }
    let a = u32::from(alpha);
    // dst alpha is 255: outa255 = a*255 + 255*(255-a) = 255*255, so
    // coef1 = a*255*255*2^7 / (255*255) = a*2^7 exactly.
    let coef1 = a << ALPHA_BITS;
    let coef2 = (255 << ALPHA_BITS) - coef1;
    let tmp = u32::from(src) * coef1 + 255 * coef2 + (0x80 << ALPHA_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> ALPHA_BITS) as u8
}

fn composite_rgba(width: u32, height: u32, rgba: &[u8]) -> RgbImage {
    let mut out = Vec::with_capacity(width as usize * height as usize * 3);
    for px in rgba.chunks_exact(4) {
        let a = px[3];
        out.extend_from_slice(&[
            over_white(px[0], a),
            over_white(px[1], a),
            over_white(px[2], a),
        ]);
    }
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

/// transformers' `convert_to_rgb` on the PIL image Pillow would have opened.
fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let hi = |v: u16| (v >> 8) as u8; // Pillow's 16-bit PNG rawmodes keep the high byte
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma8(l) => DynamicImage::ImageLuma8(l).to_rgb8(),
        DynamicImage::ImageRgba8(rgba) => composite_rgba(w, h, rgba.as_raw()),
        DynamicImage::ImageLumaA8(la) => {
            let rgba: Vec<u8> = la
                .as_raw()
                .chunks_exact(2)
                .flat_map(|p| [p[0], p[0], p[0], p[1]])
                .collect();
            composite_rgba(w, h, &rgba)
        }
        DynamicImage::ImageRgb16(rgb) => {
            let raw: Vec<u8> = rgb.as_raw().iter().map(|&v| hi(v)).collect();
            RgbImage::from_raw(w, h, raw).unwrap_or_else(|| RgbImage::new(w, h))
        }
        DynamicImage::ImageLuma16(l) => {
            let raw: Vec<u8> = l.as_raw().iter().flat_map(|&v| [hi(v); 3]).collect();
            RgbImage::from_raw(w, h, raw).unwrap_or_else(|| RgbImage::new(w, h))
        }
        DynamicImage::ImageRgba16(rgba) => {
            let raw: Vec<u8> = rgba.as_raw().iter().map(|&v| hi(v)).collect();
            composite_rgba(w, h, &raw)
        }
        DynamicImage::ImageLumaA16(la) => {
            let rgba: Vec<u8> = la
                .as_raw()
                .chunks_exact(2)
                .flat_map(|p| [hi(p[0]), hi(p[0]), hi(p[0]), hi(p[1])])
                .collect();
            composite_rgba(w, h, &rgba)
        }
        DynamicImage::ImageRgb32F(rgb) => DynamicImage::ImageRgb32F(rgb).to_rgb8(),
        other => {
            if other.color().has_alpha() {
                composite_rgba(w, h, other.to_rgba8().as_raw())
            } else {
                other.to_rgb8()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    // Pillow's loops as they were ported first (scalar), the reference the vectorized
    // passes must equal byte for byte.
    /// Pillow's `ImagingResampleHorizontal_8bpc` on RGB rows `row0..row0 + rows` of `src`.
    fn scalar_horizontal(
        src: &[u8],
        src_w: usize,
        row0: usize,
        rows: usize,
        c: &Coeffs,
        out_w: usize,
    ) -> Vec<u8> {
        let mut out = vec![0u8; out_w * rows * 3];
        for (y, out_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
            let in_row = &src[(row0 + y) * src_w * 3..(row0 + y + 1) * src_w * 3];
            for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
                let (xmin, n) = c.bounds[xx];
                let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (&w, p) in k
                    .iter()
                    .zip(in_row[xmin * 3..(xmin + n) * 3].chunks_exact(3))
                {
                    ss[0] += i32::from(p[0]) * w;
                    ss[1] += i32::from(p[1]) * w;
                    ss[2] += i32::from(p[2]) * w;
                }
                px.copy_from_slice(&[clip8(ss[0]), clip8(ss[1]), clip8(ss[2])]);
            }
        }
        out
    }

    /// Pillow's `ImagingResampleVertical_8bpc` on RGB columns `col0..col0 + cols` of `src`;
    /// `c.bounds` are rows of `src`.
    fn scalar_vertical(
        src: &[u8],
        src_w: usize,
        col0: usize,
        cols: usize,
        c: &Coeffs,
        out_h: usize,
    ) -> Vec<u8> {
        let stride = cols * 3;
        let mut out = vec![0u8; stride * out_h];
        let mut acc = vec![0i32; stride];
        for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
            let (ymin, n) = c.bounds[yy];
            let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
            // Integer sums: accumulating tap by tap gives Pillow's exact result, cache-friendly.
            acc.fill(1i32 << (PRECISION_BITS - 1));
            for (j, &wt) in k.iter().enumerate() {
                let start = ((ymin + j) * src_w + col0) * 3;
                for (a, &p) in acc.iter_mut().zip(&src[start..start + stride]) {
                    *a += i32::from(p) * wt;
                }
            }
            for (o, &a) in out_row.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
        out
    }

    use super::*;

    /// Speed of the vectorized passes against the scalar port on a 12 MP photo's shapes
    /// (run: `cargo test --release -p blipdex-model --lib resize_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn resize_speed() {
        let (w, h, out) = (4000usize, 3000usize, 224usize);
        let src: Vec<u8> = (0..w * h * 3)
            .map(|i| ((i * 2_654_435_761) >> 13) as u8)
            .collect();
        let hc = precompute_coeffs(w, out);
        let vc = precompute_coeffs(h, out);
        let time = |f: &dyn Fn() -> Vec<u8>| {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                std::hint::black_box(f());
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
            best
        };
        let hv = time(&|| resample_horizontal(&src, w, 0, h, &hc, out));
        let hs = time(&|| scalar_horizontal(&src, w, 0, h, &hc, out));
        let tmp = resample_horizontal(&src, w, 0, h, &hc, out);
        let vv = time(&|| resample_vertical(&tmp, out, 0, out, &vc, out));
        let vs = time(&|| scalar_vertical(&tmp, out, 0, out, &vc, out));
        println!(
            "12 MP -> 224: horizontal pass {hv:.1} ms (scalar {hs:.1}), vertical {vv:.2} ms \
             (scalar {vs:.2}); {:?}",
            pulp::Arch::new()
        );
    }

    /// The vectorized passes equal the scalar port byte for byte: many sizes up and down,
    /// offsets into the source, random bytes (extremes included) and flat images.
    #[test]
    fn vectorized_resample_passes_equal_the_scalar_port() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut byte = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        };
        let sizes = [
            (1, 1),
            (3, 7),
            (17, 5),
            (64, 224),
            (224, 224),
            (301, 224),
            (1000, 224),
            (4000, 224),
            (225, 3),
            (97, 96),
        ];
        let mut ran = std::collections::BTreeSet::new();
        for &(n_in, n_out) in &sizes {
            let c = precompute_coeffs(n_in, n_out);
            let (rows, row0) = (3, 2);
            for fill in [None, Some(0u8), Some(255u8)] {
                let src: Vec<u8> = (0..n_in * (rows + row0) * 3)
                    .map(|_| fill.unwrap_or_else(&mut byte))
                    .collect();
                let want = scalar_horizontal(&src, n_in, row0, rows, &c, n_out);
                assert_eq!(
                    resample_horizontal(&src, n_in, row0, rows, &c, n_out),
                    want,
                    "horizontal {n_in} -> {n_out}, fill {fill:?}"
                );
                for path in PATHS {
                    let mut out = vec![0u8; n_out * rows * 3];
                    let op = Horizontal {
                        src: &src[row0 * n_in * 3..(row0 + rows) * n_in * 3],
                        src_w: n_in,
                        c: &c,
                        out: &mut out,
                        out_w: n_out,
                    };
                    if run_on(path, op) {
                        ran.insert(path);
                        assert_eq!(out, want, "horizontal {n_in} -> {n_out} on {path:?}");
                    }
                }
                // Vertical: n_in rows of a 9-pixel-wide image, columns 2..7.
                let src: Vec<u8> = (0..n_in * 9 * 3)
                    .map(|_| fill.unwrap_or_else(&mut byte))
                    .collect();
                let want = scalar_vertical(&src, 9, 2, 5, &c, n_out);
                assert_eq!(
                    resample_vertical(&src, 9, 2, 5, &c, n_out),
                    want,
                    "vertical {n_in} -> {n_out}, fill {fill:?}"
                );
                for path in PATHS {
                    let mut out = vec![0u8; 5 * 3 * n_out];
                    let op = Vertical {
                        src: &src,
                        src_w: 9,
                        col0: 2,
                        cols: 5,
                        c: &c,
                        out: &mut out,
                    };
                    if run_on(path, op) {
                        assert_eq!(out, want, "vertical {n_in} -> {n_out} on {path:?}");
                    }
                }
            }
        }
        println!("resize paths tested on this CPU: {ran:?}");
        // As for the GEMM: CI names the path its machines must run (a missing one fails).
        if let Ok(want) = std::env::var("BLIPDEX_REQUIRE_CPU_GEMM") {
            let need = match want.as_str() {
                "avx512" => Some(SimdPath::Avx512),
                "avx2" => Some(SimdPath::Avx2),
                _ => None,
            };
            if let Some(need) = need {
                assert!(
                    ran.contains(&need),
                    "{need:?} required but not run: {ran:?}"
                );
            }
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum SimdPath {
        Scalar,
        Avx2,
        Avx512,
    }

    const PATHS: [SimdPath; 3] = [SimdPath::Scalar, SimdPath::Avx2, SimdPath::Avx512];

    /// Runs `op` compiled for `path`, if this CPU has it (dispatch alone would test only the
    /// widest path here).
    fn run_on<Op: pulp::WithSimd<Output = ()>>(path: SimdPath, op: Op) -> bool {
        use pulp::Simd;
        match path {
            SimdPath::Scalar => {
                pulp::Scalar::new().vectorize(op);
                true
            }
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => pulp::x86::V3::try_new()
                .map(|s| Simd::vectorize(s, op))
                .is_some(),
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => pulp::x86::V4::try_new()
                .map(|s| Simd::vectorize(s, op))
                .is_some(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "blipdex-image-test-{}-{tag}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    fn encode(img: &DynamicImage, format: image::ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, format).expect("encode test image");
        buf.into_inner()
    }

    fn white_normalized(cfg: &ImageConfig) -> [f32; 3] {
        std::array::from_fn(|c| (1.0 - cfg.image_mean[c]) / cfg.image_std[c])
    }

    const PREPROCESSOR_JSON: &str = r#"{
        "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "BlipImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "Blip2Processor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 320}
    }"#;

    #[test]
    fn parses_top_level_layout() {
        let cfg = ImageConfig::from_json_str(PREPROCESSOR_JSON, "preprocessor_config.json")
            .expect("parse");
        assert_eq!((cfg.height, cfg.width), (384, 320));
        assert_eq!(cfg.image_mean, OPENAI_CLIP_MEAN);
        assert_eq!(cfg.image_std, OPENAI_CLIP_STD);
        assert_eq!(cfg.rescale_factor, 1.0 / 255.0);
        assert_eq!(cfg.rescale_factor_f64(), 1.0 / 255.0);
        assert!(cfg.do_resize && cfg.do_rescale && cfg.do_normalize && cfg.do_convert_rgb);
    }

    #[test]
    fn parses_nested_layout_and_variants() {
        let json = r#"{"processor_class": "Blip2Processor", "num_query_tokens": 32,
            "image_processor": {"size": {"shortest_edge": 364}, "do_normalize": false,
                "image_mean": 0.5, "image_std": [0.5, 0.5, 0.5], "do_rescale": null,
                "rescale_factor": 0.5}}"#;
        let cfg = ImageConfig::from_json_str(json, "processor_config.json").expect("parse");
        assert_eq!((cfg.height, cfg.width), (364, 364));
        assert!(!cfg.do_normalize);
        assert!(cfg.do_rescale, "null keeps the default");
        assert_eq!(cfg.image_mean, [0.5; 3]);
        assert_eq!(cfg.rescale_factor, 0.5);
        assert_eq!(cfg.rescale_factor_f64(), 0.5);

        let cfg = ImageConfig::from_json_str(r#"{"size": 224}"#, "x").expect("int size");
        assert_eq!((cfg.height, cfg.width), (224, 224));
        let cfg = ImageConfig::from_json_str("{}", "x").expect("empty object");
        assert_eq!(cfg, ImageConfig::blip2_default());
    }

    #[test]
    fn rejects_bad_configs() {
        for (json, needle) in [
            (r#"{"size": {"longest_edge": 224}}"#, "size"),
            (r#"{"size": {"height": 224}}"#, "size"),
            (r#"{"size": {"height": 0, "width": 224}}"#, "size"),
            (r#"{"size": "big"}"#, "size"),
            (r#"{"resample": 2}"#, "resample"),
            (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
            (r#"{"image_std": [0.5, 0.0, 0.5]}"#, "image_std"),
            (r#"{"do_resize": "yes"}"#, "do_resize"),
            (r#"{"do_center_crop": true}"#, "do_center_crop"),
            (r#"[1, 2]"#, "not a JSON object"),
            (r#"{"size": "#, "invalid JSON"),
        ] {
            let err = ImageConfig::from_json_str(json, "cfg.json").expect_err(json);
            let msg = err.to_string();
            assert!(matches!(err, Error::BadModel { .. }), "{json}: {msg}");
            assert!(
                msg.contains(needle) && msg.contains("cfg.json"),
                "{json}: {msg}"
            );
        }
    }

    #[test]
    fn reads_model_dir_with_transformers_priority() {
        let dir = temp_dir("cfg");
        // Neither file: defaults.
        assert_eq!(
            ImageConfig::from_model_dir(&dir).expect("defaults"),
            ImageConfig::blip2_default()
        );
        std::fs::write(dir.join("preprocessor_config.json"), PREPROCESSOR_JSON).expect("write");
        let cfg = ImageConfig::from_model_dir(&dir).expect("preprocessor");
        assert_eq!((cfg.height, cfg.width), (384, 320));
        // processor_config.json without "image_processor" is ignored.
        std::fs::write(
            dir.join("processor_config.json"),
            r#"{"num_query_tokens": 32}"#,
        )
        .expect("write");
        let cfg = ImageConfig::from_model_dir(&dir).expect("fallthrough");
        assert_eq!((cfg.height, cfg.width), (384, 320));
        // ... but wins when it has one.
        std::fs::write(
            dir.join("processor_config.json"),
            r#"{"image_processor": {"size": {"height": 224, "width": 224}}}"#,
        )
        .expect("write");
        let cfg = ImageConfig::from_model_dir(&dir).expect("nested");
        assert_eq!((cfg.height, cfg.width), (224, 224));
        std::fs::write(dir.join("processor_config.json"), "{not json").expect("write");
        let err = ImageConfig::from_model_dir(&dir).expect_err("bad json");
        assert!(err.to_string().contains("processor_config.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn alpha_composite_matches_pillow() {
        // Values from PIL.Image.alpha_composite(white, (s, s, s, a)).convert("RGB").
        for (s, a, want) in [
            (0u8, 1u8, 254u8),
            (0, 128, 127),
            (100, 128, 177),
            (200, 77, 238),
            (17, 254, 18),
            (255, 3, 255),
            (0, 255, 0),
            (9, 127, 132),
        ] {
            assert_eq!(over_white(s, a), want, "src {s} alpha {a}");
        }
        for v in 0..=255u8 {
            assert_eq!(over_white(v, 255), v, "opaque is identity");
            assert_eq!(over_white(v, 0), 255, "transparent is white");
        }
    }

    #[test]
    fn transparent_pixels_become_white() {
        let mut img = image::RgbaImage::new(4, 3);
        img.put_pixel(1, 1, image::Rgba([10, 20, 30, 255]));
        img.put_pixel(2, 1, image::Rgba([10, 20, 30, 128]));
        let bytes = encode(&DynamicImage::ImageRgba8(img), image::ImageFormat::Png);
        let p = ImageProcessor::new(ImageConfig::blip2_default());
        let rgb = p.load_bytes(&bytes, "mem.png").expect("decode");
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 1).0, [10, 20, 30]);
        assert_eq!(
            rgb.get_pixel(2, 1).0,
            [
                over_white(10, 128),
                over_white(20, 128),
                over_white(30, 128)
            ]
        );

        // A fully transparent image normalizes to (1 - mean) / std everywhere.
        let clear = DynamicImage::ImageRgba8(image::RgbaImage::new(300, 200));
        let bytes = encode(&clear, image::ImageFormat::Png);
        let pv = p
            .pixel_values_from_bytes(&bytes, "clear.png")
            .expect("preprocess");
        let white = white_normalized(&p.config);
        assert_eq!(pv.len(), 3 * 224 * 224);
        for c in 0..3 {
            assert!(pv[c * 224 * 224..(c + 1) * 224 * 224]
                .iter()
                .all(|&v| v == white[c]));
        }

        // Grayscale + alpha behaves the same way.
        let la = DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_pixel(
            2,
            2,
            image::LumaA([0, 0]),
        ));
        let rgb = p
            .load_bytes(&encode(&la, image::ImageFormat::Png), "la.png")
            .expect("decode");
        assert!(rgb.pixels().all(|px| px.0 == [255, 255, 255]));
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }

    /// A PNG whose header claims `w`x`h` but that holds almost no data.
    fn png_header_only(w: u32, h: u32) -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png_chunk(&mut png, b"IHDR", &ihdr);
        png_chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
        png_chunk(&mut png, b"IEND", &[]);
        png
    }

    #[test]
    fn refuses_huge_images_before_decoding() {
        let p = ImageProcessor::new(ImageConfig::blip2_default());
        let err = p
            .load_bytes(&png_header_only(100_000, 100_000), "bomb.png")
            .expect_err("bomb");
        match err {
            Error::ImageTooLarge {
                what,
                width,
                height,
                pixels,
                limit,
            } => {
                assert_eq!(what, "bomb.png");
                assert_eq!((width, height), (100_000, 100_000));
                assert_eq!(pixels, 10_000_000_000);
                assert_eq!(limit, DEFAULT_MAX_PIXELS);
            }
            other => panic!("expected ImageTooLarge, got {other}"),
        }
        // Under the limit, the same kind of file is reported as truncated/corrupt instead.
        let err = p
            .load_bytes(&png_header_only(64, 64), "short.png")
            .expect_err("no data");
        assert!(matches!(err, Error::BadImage { .. }), "{err}");
        // The limit is configurable.
        let small = ImageProcessor::new(ImageConfig::blip2_default()).with_max_pixels(99);
        let img = DynamicImage::ImageRgb8(RgbImage::new(10, 10));
        let err = small
            .load_bytes(&encode(&img, image::ImageFormat::Bmp), "ten.bmp")
            .expect_err("100 > 99");
        assert!(
            matches!(err, Error::ImageTooLarge { pixels: 100, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--max-image-pixels"), "{err}");
    }

    #[test]
    fn reports_unreadable_input() {
        let p = ImageProcessor::new(ImageConfig::blip2_default());
        for (bytes, what) in [
            (&b""[..], "empty"),
            (&b"definitely not an image"[..], "text"),
            (&b"\x89PNG\r\n\x1a\n\0\0"[..], "png signature only"),
        ] {
            let err = p.load_bytes(bytes, what).expect_err(what);
            assert!(
                matches!(&err, Error::BadImage { what: w, .. } if w == what),
                "{what}: {err}"
            );
        }
        // Truncated in the middle of the pixel data.
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, (x ^ y) as u8])
        }));
        for format in [image::ImageFormat::Png, image::ImageFormat::Jpeg] {
            let bytes = encode(&img, format);
            let err = p
                .load_bytes(&bytes[..bytes.len() / 2], "half")
                .expect_err("truncated");
            assert!(matches!(err, Error::BadImage { .. }), "{format:?}: {err}");
        }

        let missing = std::env::temp_dir().join("blipdex-definitely-missing-image.png");
        let err = p.load_file(&missing).expect_err("missing");
        assert!(
            matches!(&err, Error::Io { path, .. } if path == &missing),
            "{err}"
        );
    }

    #[test]
    fn output_shape_and_range() {
        let p = ImageProcessor::new(ImageConfig::blip2_default());
        let (lo, hi): (Vec<f32>, Vec<f32>) = (0..3)
            .map(|c| {
                let cfg = &p.config;
                (
                    -cfg.image_mean[c] / cfg.image_std[c],
                    (1.0 - cfg.image_mean[c]) / cfg.image_std[c],
                )
            })
            .unzip();
        // Upscale, downscale, non-square, one dimension unchanged, already at size.
        for (w, h) in [
            (50, 37),
            (640, 480),
            (300, 224),
            (224, 224),
            (1, 1),
            (3, 900),
        ] {
            let img = RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([
                    (x * 37 % 256) as u8,
                    (y * 91 % 256) as u8,
                    ((x + y) % 2 * 255) as u8,
                ])
            });
            let pv = p.preprocess(&img).expect("preprocess");
            assert_eq!(pv.len(), 3 * 224 * 224, "{w}x{h}");
            for c in 0..3 {
                for &v in &pv[c * 224 * 224..(c + 1) * 224 * 224] {
                    assert!(v.is_finite() && v >= lo[c] && v <= hi[c], "{w}x{h}: {v}");
                }
            }
        }
        // At the target size the pixels pass through unfiltered.
        let img = RgbImage::from_fn(224, 224, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let pv = p.preprocess(&img).expect("preprocess");
        let cfg = &p.config;
        let expect = |v: u8, c: usize| {
            ((f64::from(v) / 255.0) as f32 - cfg.image_mean[c]) / cfg.image_std[c]
        };
        assert_eq!(pv[5 * 224 + 9], expect(9, 0));
        assert_eq!(pv[224 * 224 + 5 * 224 + 9], expect(5, 1));
        assert_eq!(pv[2 * 224 * 224], expect(7, 2));
    }

    #[test]
    fn resize_preserves_constant_images_and_respects_do_resize() {
        for (w, h) in [(10, 10), (500, 20), (20, 500), (640, 480)] {
            let img = RgbImage::from_pixel(w, h, image::Rgb([3, 128, 250]));
            let out = resize_bicubic(&img, 224, 224).expect("resize");
            assert!(out.pixels().all(|p| p.0 == [3, 128, 250]), "{w}x{h}");
        }
        let cfg = ImageConfig {
            do_resize: false,
            ..ImageConfig::blip2_default()
        };
        let p = ImageProcessor::new(cfg);
        let err = p
            .preprocess(&RgbImage::new(100, 100))
            .expect_err("wrong size");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(p.preprocess(&RgbImage::new(224, 224)).is_ok());
    }

    #[test]
    fn decodes_grayscale_palette_and_16_bit() {
        let p = ImageProcessor::new(ImageConfig::blip2_default());
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_fn(5, 4, |x, _| {
            image::Luma([x as u8 * 50])
        }));
        let rgb = p
            .load_bytes(&encode(&gray, image::ImageFormat::Png), "gray.png")
            .expect("gray");
        assert_eq!(rgb.get_pixel(3, 2).0, [150, 150, 150]);

        let deep = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
            3,
            3,
            image::Rgb([0x12ff_u16, 0xab00, 0xffff]),
        ));
        let rgb = p
            .load_bytes(&encode(&deep, image::ImageFormat::Png), "deep.png")
            .expect("16-bit");
        assert_eq!(
            rgb.get_pixel(1, 1).0,
            [0x12, 0xab, 0xff],
            "high byte, as Pillow"
        );

        let gif = DynamicImage::ImageRgba8(image::RgbaImage::from_fn(6, 6, |x, _| {
            if x < 3 {
                image::Rgba([200, 10, 10, 255])
            } else {
                image::Rgba([0, 0, 0, 0])
            }
        }));
        let rgb = p
            .load_bytes(&encode(&gif, image::ImageFormat::Gif), "t.gif")
            .expect("gif");
        assert_eq!(rgb.get_pixel(0, 0).0, [200, 10, 10]);
        assert_eq!(rgb.get_pixel(5, 5).0, [255, 255, 255]);
    }

    /// A photo-like test picture: smooth gradients, a textured patch and hard edges.
    fn scene(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let texture = ((x * 7 + y * 13) % 29) as f32 * 2.0;
            let edge = if (x / 97 + y / 61) % 2 == 0 {
                60.0
            } else {
                0.0
            };
            image::Rgb([
                (fx * 180.0 + edge) as u8,
                (fy * 150.0 + texture) as u8,
                ((1.0 - fx) * 120.0 + fy * 60.0 + edge * 0.5) as u8,
            ])
        })
    }

    /// An APP1 segment holding an EXIF orientation tag, inserted after SOI.
    fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        let mut tiff = b"II*\0\x08\0\0\0\x01\0".to_vec();
        tiff.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0]);
        tiff.extend_from_slice(&orientation.to_le_bytes());
        tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    fn jpeg(img: &RgbImage) -> Vec<u8> {
        encode(
            &DynamicImage::ImageRgb8(img.clone()),
            image::ImageFormat::Jpeg,
        )
    }

    #[test]
    fn fast_decode_keeps_twice_the_input_size_and_stays_close() {
        let exact = ImageProcessor::new(ImageConfig::blip2_default());
        let fast = exact.clone().with_decode(DecodeMode::Fast);
        // (source size, the scale's expected output): 1/4 leaves 500x375 < 448, so 1/2 is used;
        // a 1/8 fits 4000x4000; 1/2 of a 1000-pixel side is 500; 800 px cannot shrink.
        for ((w, h), decoded) in [
            ((4000, 3000), (1000, 750)),
            ((4000, 4000), (500, 500)),
            ((2001, 1000), (1001, 500)),
            ((800, 1200), (800, 1200)),
        ] {
            let bytes = jpeg(&scene(w, h));
            let a = exact.load(&bytes, "a.jpg").expect("exact");
            let b = fast.load(&bytes, "a.jpg").expect("fast");
            assert_eq!((a.width, a.height), (w, h));
            assert_eq!(
                (b.width, b.height),
                (w, h),
                "the size on disk, not the decoded one"
            );
            assert_eq!(b.image.dimensions(), decoded, "{w}x{h}");
            let (pa, pb) = (
                exact.preprocess(&a.image).expect("exact px"),
                fast.preprocess(&b.image).expect("fast px"),
            );
            if decoded == (w, h) {
                assert_eq!(pa, pb, "nothing to shrink: the exact path's values");
                continue;
            }
            // Pixel difference after the resize to 224, in uint8 levels.
            let (ra, rb) = (
                resize_bicubic(&a.image, 224, 224).expect("resize"),
                resize_bicubic(&b.image, 224, 224).expect("resize"),
            );
            let diffs: Vec<u32> = ra
                .as_raw()
                .iter()
                .zip(rb.as_raw())
                .map(|(&x, &y)| u32::from(x.abs_diff(y)))
                .collect();
            let mean = diffs.iter().sum::<u32>() as f64 / diffs.len() as f64;
            let max = diffs.iter().copied().max().unwrap_or(0);
            eprintln!("{w}x{h} fast vs exact after the resize: mean {mean:.3}, max {max} levels");
            assert!(
                mean < 1.0 && max <= 12,
                "{w}x{h}: mean {mean:.3}, max {max}"
            );
        }
    }

    #[test]
    fn fast_decode_applies_exif_orientation_and_grey() {
        let p = ImageProcessor::new(ImageConfig::blip2_default())
            .with_exif_orientation(true)
            .with_decode(DecodeMode::Fast);
        let bytes = with_orientation(&jpeg(&scene(2000, 1000)), 6);
        let exact = p
            .clone()
            .with_decode(DecodeMode::Exact)
            .load(&bytes, "r.jpg")
            .expect("exact");
        let fast = p.load(&bytes, "r.jpg").expect("fast");
        assert_eq!((exact.width, exact.height), (1000, 2000));
        assert_eq!(
            (fast.width, fast.height),
            (1000, 2000),
            "rotated 90°: sides swap"
        );
        assert_eq!(fast.image.dimensions(), (500, 1000));
        // The same corner comes out on top: compare the means of the top rows.
        let top = |img: &RgbImage, rows: u32| {
            let w = img.width();
            let px: Vec<u32> = (0..rows)
                .flat_map(|y| (0..w).map(move |x| (x, y)))
                .map(|(x, y)| u32::from(img.get_pixel(x, y).0[0]))
                .collect();
            px.iter().sum::<u32>() as f64 / px.len() as f64
        };
        let (te, tf) = (top(&exact.image, 40), top(&fast.image, 20));
        assert!(
            (te - tf).abs() < 2.0,
            "top rows: exact {te:.1}, fast {tf:.1}"
        );

        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_fn(1800, 1800, |x, y| {
            image::Luma([((x + y) / 15) as u8])
        }));
        let loaded = p
            .load(&encode(&grey, image::ImageFormat::Jpeg), "g.jpg")
            .expect("grey");
        assert_eq!(loaded.image.dimensions(), (450, 450));
        assert!(loaded
            .image
            .pixels()
            .all(|px| px.0[0] == px.0[1] && px.0[1] == px.0[2]));
    }

    #[test]
    fn fast_decode_refuses_what_the_exact_path_refuses() {
        let p = ImageProcessor::new(ImageConfig::blip2_default())
            .with_decode(DecodeMode::Fast)
            .with_max_pixels(4000 * 3000 - 1);
        let bytes = jpeg(&scene(4000, 3000));
        let err = p.load(&bytes, "big.jpg").expect_err("over the pixel limit");
        assert!(matches!(err, Error::ImageTooLarge { .. }), "{err}");

        let p = p.with_max_pixels(DEFAULT_MAX_PIXELS);
        let err = p
            .load(&bytes[..bytes.len() / 2], "cut.jpg")
            .expect_err("truncated");
        assert!(err.to_string().contains("truncated"), "{err}");
        // Garbage inside the scan (end marker kept): whatever the fast decoder makes of it, the
        // outcome is the exact path's or a clean error, never a panic or a read past the data.
        let mut bad = bytes.clone();
        let sos = bad.windows(2).position(|w| w == [0xFF, 0xDA]).expect("SOS");
        for (i, b) in bad[sos + 600..sos + 5000].iter_mut().enumerate() {
            *b = (i * 37 % 251) as u8;
        }
        let _ = p.load(&bad, "garbled.jpg");
        let png = encode(
            &DynamicImage::ImageRgb8(scene(1200, 900)),
            image::ImageFormat::Png,
        );
        let loaded = p.load(&png, "p.png").expect("png");
        assert_eq!(
            loaded.image.dimensions(),
            (1200, 900),
            "only JPEGs shrink in decoding"
        );
    }

    #[test]
    fn a_recycled_buffer_decodes_like_a_fresh_one() {
        let p = ImageProcessor::new(ImageConfig::blip2_default());
        let (big, small) = (jpeg(&scene(900, 700)), jpeg(&scene(300, 200)));
        let fresh_small = p.load_bytes(&small, "s.jpg").expect("small");
        let fresh_big = p.load_bytes(&big, "b.jpg").expect("big");
        // The big image's buffer, stale pixels and all, serves the small decode, then the big one.
        ImageProcessor::recycle(fresh_big.clone());
        assert_eq!(p.load_bytes(&small, "s.jpg").expect("small"), fresh_small);
        ImageProcessor::recycle(fresh_small.clone());
        assert_eq!(p.load_bytes(&big, "b.jpg").expect("big"), fresh_big);
    }
}
