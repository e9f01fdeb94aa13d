//! `photo_meta` on the photos of tests/fixtures/photos-meta against the expected.json that
//! tests/fixtures/generate.py (`--only photos-meta`) wrote with them, and on the other fixture
//! photos, which must not trip it up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blipdex_ingest::exif::photo_meta;
use blipdex_model::image::{ImageConfig, ImageProcessor};
use blipdex_store::PhotoMeta;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The photos of a fixture folder, by file name (expected.json left out).
fn photos(dir: &str) -> BTreeMap<String, Vec<u8>> {
    let dir = fixtures().join(dir);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x != "json"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read photo"))
        })
        .collect()
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9,
        _ => false,
    }
}

#[test]
fn photo_meta_reads_what_the_generator_wrote() {
    let text = std::fs::read_to_string(fixtures().join("photos-meta/expected.json"))
        .expect("read expected.json");
    let expected: BTreeMap<String, PhotoMeta> =
        serde_json::from_str(&text).expect("expected.json holds PhotoMeta per file");
    let photos = photos("photos-meta");
    assert_eq!(
        photos.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "photos-meta/ and expected.json disagree; re-run tests/fixtures/generate.py --only photos-meta"
    );
    for (name, bytes) in &photos {
        let got = photo_meta(bytes);
        let want = &expected[name];
        let exact = |m: &PhotoMeta| PhotoMeta {
            gps_lat: None,
            gps_lon: None,
            ..m.clone()
        };
        assert_eq!(exact(&got), exact(want), "{name}");
        assert!(
            close(got.gps_lat, want.gps_lat) && close(got.gps_lon, want.gps_lon),
            "{name}: got {:?}, want {:?}",
            got.location(),
            want.location()
        );
    }
    // The set covers what it is meant to: every hemisphere, and photos without metadata.
    let places: Vec<_> = expected.values().filter_map(PhotoMeta::location).collect();
    for (north, east) in [(true, true), (true, false), (false, true), (false, false)] {
        assert!(
            places
                .iter()
                .any(|&(lat, lon)| (lat > 0.0) == north && (lon > 0.0) == east),
            "no photo with north={north} east={east}"
        );
    }
    assert!(
        expected
            .values()
            .filter(|m| **m == PhotoMeta::default())
            .count()
            >= 3
    );
}

#[test]
fn corrupt_exif_gives_no_metadata_and_the_photo_still_decodes() {
    let bytes = std::fs::read(fixtures().join("photos-meta/corrupt_exif.jpg")).expect("read");
    assert!(
        bytes.windows(6).any(|w| w == b"Exif\0\0"),
        "the fixture lost its EXIF block"
    );
    assert_eq!(photo_meta(&bytes), PhotoMeta::default());
    // Ingest decodes it with EXIF orientation on: the bad block must not cost the photo.
    let processor = ImageProcessor::new(ImageConfig::default()).with_exif_orientation(true);
    let img = processor
        .load_bytes(&bytes, "corrupt_exif.jpg")
        .expect("decodes");
    assert_eq!(img.dimensions(), (64, 48));
}

#[test]
fn every_metadata_photo_decodes_for_ingest() {
    let processor = ImageProcessor::new(ImageConfig::default()).with_exif_orientation(true);
    for (name, bytes) in photos("photos-meta") {
        let img = processor
            .load_bytes(&bytes, &name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.dimensions(), (64, 48), "{name}");
    }
}

#[test]
fn the_other_fixture_photos_do_not_trip_it_up() {
    for dir in ["photos", "photos-exif"] {
        for (name, bytes) in photos(dir) {
            let meta = photo_meta(&bytes);
            assert_eq!(meta.location(), None, "{dir}/{name}");
            assert_eq!(meta.taken_at, None, "{dir}/{name}");
            // Truncated copies too: a half-copied file must not panic either.
            for cut in [2, 20, bytes.len() / 2] {
                let _ = photo_meta(&bytes[..cut.min(bytes.len())]);
            }
        }
    }
}
