//! Thumbnails of indexed photos, for the HTTP server's result pages: rendered on first request
//! and cached in the index directory, so that a page of results does not decode a page of
//! full-size photos every time it is shown.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use blipdex_core::{paths, Error, Result};
use blipdex_model::image::{resize_bicubic, ImageProcessor};
use image::codecs::jpeg::JpegEncoder;

use crate::{images, Engine};

/// Smallest thumbnail edge: below it nothing is recognisable.
const MIN_SIZE: u32 = 32;
/// Largest thumbnail edge: above it a "thumbnail" costs as much as the photo to render and store.
const MAX_SIZE: u32 = 1024;
/// Small files with no visible artefacts at thumbnail sizes.
const JPEG_QUALITY: u8 = 85;
/// The cache, inside the index directory (beside the vision cache).
const THUMBNAILS_DIR: &str = "thumbnails";
const JPEG_TYPE: &str = "image/jpeg";

/// A rendered thumbnail and what an HTTP response needs to cache it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    /// Strong entity tag, quoted: `"<first 16 hex digits of the content hash>-<size>"`. Derived
    /// from the indexed bytes, so a photo re-ingested with new content gets a new tag.
    pub etag: String,
    pub content_type: &'static str,
}

impl Engine {
    /// A JPEG thumbnail of an indexed image (longest side `size` px, smaller photos are not
    /// enlarged; EXIF orientation applied), rendered once and cached on disk under
    /// `<index>/thumbnails/`.
    ///
    /// The cache is named by the indexed bytes' content hash and the size, so a cache hit is the
    /// thumbnail of exactly what was indexed and is served without reading the photo again: a
    /// photo deleted or changed since ingest keeps serving its thumbnail until the index drops
    /// or re-ingests it. A miss reads the photo back: `Error::NotFound` when no copy is left,
    /// `Error::FileChanged` when its bytes changed. An index directory that cannot be written
    /// (a read-only mirror) only costs the caching.
    pub fn thumbnail(&self, image_id: u64, size: u32) -> Result<Thumbnail> {
        check_size(size)?;
        let row = self
            .store()
            .get(image_id)
            .filter(|r| !r.deleted)
            .ok_or_else(|| Error::NotFound(format!("image id {image_id} is not in the index")))?;
        let hash = &row.content_hash;
        let path = cache_path(&self.index, hash, size).ok_or_else(|| {
            Error::store(
                &self.index,
                format!("image id {image_id} has a malformed content hash {hash:?}"),
            )
        })?;
        let thumbnail = |bytes| Thumbnail {
            bytes,
            etag: etag(hash, size),
            content_type: JPEG_TYPE,
        };
        if let Some(bytes) = read_cached(&path) {
            return Ok(thumbnail(bytes));
        }
        let photo = images::read_verified(&row.paths, hash, &self.objects)?;
        let processor = self.retriever.processor.clone().with_exif_orientation(true);
        let bytes = render(&processor, &photo, size, &paths::display(&row.path))?;
        if let Err(e) = write_cached(&path, &bytes) {
            tracing::debug!(path = %path.display(), error = %e, "thumbnail not cached");
        }
        Ok(thumbnail(bytes))
    }
}

fn check_size(size: u32) -> Result<()> {
    if (MIN_SIZE..=MAX_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "thumbnail size {size} is out of range; ask for {MIN_SIZE} to {MAX_SIZE} pixels"
        )))
    }
}

/// `<index>/thumbnails/<hash[..2]>/<hash>-<size>.jpg`; `None` for a hash that is not hex (never a
/// path outside the cache).
fn cache_path(index: &Path, hash: &str, size: u32) -> Option<PathBuf> {
    let valid = hash.len() >= 16 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| {
        index
            .join(THUMBNAILS_DIR)
            .join(&hash[..2])
            .join(format!("{hash}-{size}.jpg"))
    })
}

fn etag(hash: &str, size: u32) -> String {
    format!("\"{}-{size}\"", &hash[..hash.len().min(16)])
}

/// The longest side brought down to `size` (never up), the aspect ratio kept to the pixel.
fn fit(width: u32, height: u32, size: u32) -> (u32, u32) {
    let longest = width.max(height);
    if longest <= size {
        return (width, height);
    }
    let scale = |side: u32| {
        let scaled =
            (u64::from(side) * u64::from(size) + u64::from(longest) / 2) / u64::from(longest);
        u32::try_from(scaled.max(1)).unwrap_or(size)
    };
    (scale(width), scale(height))
}

/// Decodes (pixel limit and EXIF orientation as `processor` says), shrinks and encodes.
fn render(processor: &ImageProcessor, photo: &[u8], size: u32, what: &str) -> Result<Vec<u8>> {
    let img = processor.load_bytes(photo, what)?;
    let (w, h) = fit(img.width(), img.height(), size);
    let small = if (w, h) == img.dimensions() {
        img
    } else {
        resize_bicubic(&img, w, h)?
    };
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
        .encode_image(&small)
        .map_err(|e| Error::Internal(format!("encoding a {w}x{h} thumbnail as JPEG: {e}")))?;
    Ok(out)
}

/// A cached thumbnail, if there is a whole one. Files are not fsynced (a cache is not worth a
/// disk flush per thumbnail), so one cut short by a crash is told by its missing end marker and
/// rendered again.
fn read_cached(path: &Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.starts_with(&[0xFF, 0xD8]) && bytes.ends_with(&[0xFF, 0xD9]) => {
            Some(bytes)
        }
        Ok(_) => {
            tracing::debug!(path = %path.display(), "damaged cached thumbnail; rendering it again");
            None
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cached thumbnail unreadable");
            None
        }
    }
}

/// Writes through a temporary file in the same directory and renames it into place, so that a
/// concurrent request never reads half a thumbnail (two renders of the same one write the same
/// bytes; the last rename wins).
fn write_cached(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("cache path has no directory"))?;
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = std::fs::File::create_new(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use blipdex_model::image::ImageConfig;

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/photos-exif")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn decode(jpeg: &[u8]) -> image::RgbImage {
        image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)
            .expect("a JPEG")
            .to_rgb8()
    }

    #[test]
    fn cache_files_are_named_by_hash_and_size_only() {
        let p = cache_path(Path::new("/idx"), HASH, 256).expect("hex hash");
        assert_eq!(
            p,
            Path::new("/idx/thumbnails/01").join(format!("{HASH}-256.jpg"))
        );
        assert_ne!(p, cache_path(Path::new("/idx"), HASH, 128).expect("hex"));
        assert_eq!(cache_path(Path::new("/idx"), "../../etc/passwd", 256), None);
        assert_eq!(cache_path(Path::new("/idx"), "0123", 256), None);
        assert_eq!(etag(HASH, 256), "\"0123456789abcdef-256\"");
        assert_ne!(etag(HASH, 256), etag(&HASH.replace('0', "f"), 256));
    }

    #[test]
    fn sizes_outside_the_range_are_refused() {
        for ok in [32, 256, 1024] {
            check_size(ok).expect("in range");
        }
        for bad in [0, 31, 1025, u32::MAX] {
            let e = check_size(bad).expect_err("out of range");
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            assert!(e.to_string().contains("32 to 1024"), "{e}");
        }
    }

    #[test]
    fn the_longest_side_shrinks_to_the_size() {
        assert_eq!(fit(192, 128, 96), (96, 64));
        assert_eq!(fit(128, 192, 96), (64, 96));
        assert_eq!(fit(4000, 3000, 256), (256, 192));
        assert_eq!(fit(100, 50, 256), (100, 50), "never enlarged");
        assert_eq!(fit(10_000, 3, 32), (32, 1), "at least a pixel");
    }

    #[test]
    fn oriented_photos_render_upright() {
        let processor = ImageProcessor::new(ImageConfig::default()).with_exif_orientation(true);
        // upright.jpg is 192x128; rotated_exif6.jpg stores it 128x192 with Orientation=6.
        let upright =
            decode(&render(&processor, &fixture("upright.jpg"), 96, "upright").expect("render"));
        let rotated = decode(
            &render(&processor, &fixture("rotated_exif6.jpg"), 96, "rotated").expect("render"),
        );
        assert_eq!(upright.dimensions(), (96, 64));
        assert_eq!(rotated.dimensions(), (96, 64));
        // Same picture: the mean absolute difference stays at JPEG noise.
        let diff: u64 = upright
            .as_raw()
            .iter()
            .zip(rotated.as_raw())
            .map(|(a, b)| u64::from(a.abs_diff(*b)))
            .sum();
        let mean = diff as f64 / upright.as_raw().len() as f64;
        assert!(mean < 8.0, "mean difference {mean}");
        // Without orientation the stored (sideways) shape comes out.
        let plain = ImageProcessor::new(ImageConfig::default());
        let sideways =
            decode(&render(&plain, &fixture("rotated_exif6.jpg"), 96, "rotated").expect("render"));
        assert_eq!(sideways.dimensions(), (64, 96));
    }

    #[test]
    fn undecodable_bytes_are_bad_images() {
        let processor = ImageProcessor::new(ImageConfig::default());
        let e = render(&processor, b"not a photo", 64, "x").expect_err("garbage");
        assert!(matches!(e, Error::BadImage { .. }), "{e}");
    }

    #[test]
    fn the_cache_round_trips_and_tolerates_a_read_only_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = cache_path(dir.path(), HASH, 64).expect("path");
        assert_eq!(read_cached(&path), None);
        let processor = ImageProcessor::new(ImageConfig::default());
        let jpeg = render(&processor, &fixture("upright.jpg"), 64, "upright").expect("render");
        write_cached(&path, &jpeg).expect("write");
        assert_eq!(read_cached(&path).as_deref(), Some(jpeg.as_slice()));
        let leftovers = std::fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
        // A file cut short (a crash before the data reached the disk) is not served.
        std::fs::write(&path, &jpeg[..jpeg.len() / 2]).expect("truncate");
        assert_eq!(read_cached(&path), None);
        // Writing where a directory cannot be made fails softly (the caller only logs it).
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"x").expect("write");
        let under_a_file = cache_path(&blocked, HASH, 64).expect("path");
        assert!(write_cached(&under_a_file, &jpeg).is_err());
    }
}
