//! The retrieval engine on a real folder indexed with the tiny fixture checkpoints: search
//! filters and pages, image search, ITM from the vision cache vs recomputed, captions stored at
//! ingest and written back on demand, hot refresh.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use blipdex_ingest::{ingest_with, IngestJob, IngestModels, IngestSummary};
use blipdex_model::image::{DecodeMode, ImageConfig, ImageProcessor};
use blipdex_model::opt::LinearStorage;
use blipdex_model::vision_cache;
use blipdex_model::{CaptionRequest, Captioner, LoadOptions, ModelFiles, Retriever};
use blipdex_search::{CaptionSource, Engine, EngineOptions, SearchParams};
use blipdex_store::Store;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn files(name: &str) -> Result<ModelFiles> {
    Ok(ModelFiles::from_dir(&fixtures().join("models").join(name))?)
}

fn copy_photos(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("sub"))?;
    for e in std::fs::read_dir(fixtures().join("photos"))? {
        let e = e?;
        let name = e.file_name();
        let dest = if name.to_string_lossy().ends_with(".png") {
            dir.join("sub").join(&name)
        } else {
            dir.join(&name)
        };
        std::fs::copy(e.path(), dest)?;
    }
    Ok(())
}

fn run_ingest(
    root: &Path,
    index: &Path,
    captioner: Option<&Captioner>,
    vision_cache: Option<&str>,
) -> Result<IngestSummary> {
    run_ingest_decoding(root, index, captioner, vision_cache, None)
}

fn run_ingest_decoding(
    root: &Path,
    index: &Path,
    captioner: Option<&Captioner>,
    vision_cache: Option<&str>,
    decode: Option<DecodeMode>,
) -> Result<IngestSummary> {
    let f = files("itm-a")?;
    let model = Retriever::load(&f, &LoadOptions::default())?;
    let job = IngestJob {
        roots: vec![root.to_path_buf()],
        index: Some(index.to_path_buf()),
        model: Some(f.dir.to_string_lossy().into_owned()),
        batch_size: 2,
        vision_cache: vision_cache.map(str::to_string),
        decode,
        ..Default::default()
    };
    Ok(ingest_with(
        &job,
        IngestModels {
            retrieval: &model,
            captioner,
        },
    )?)
}

fn engine(index: &Path, caption: bool) -> Result<Engine> {
    let mut opts = EngineOptions::new(index, files("itm-a")?);
    if caption {
        opts.caption_model = Some(files("caption-a")?);
    }
    Ok(Engine::load(&opts)?)
}

fn captioner() -> Result<Captioner> {
    Ok(Captioner::load(
        &files("caption-a")?,
        &LoadOptions::default(),
        LinearStorage::Float,
    )?)
}

/// What `blipdex caption` gives for one file (the captioner is tested token-exact against
/// transformers in the model crate).
fn caption_of(c: &Captioner, path: &Path) -> Result<String> {
    let img = c.processor.load_file(path)?;
    let px = c.pixel_values(&[img])?;
    let g = c.generate(&px, &CaptionRequest::default())?;
    Ok(g.first().context("one caption")?.text.clone())
}

#[test]
fn captions_and_vision_cache_at_ingest_serve_rerank() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (root, index) = (tmp.path().join("photos"), tmp.path().join("index"));
    copy_photos(&root)?;
    let cap = captioner()?;
    let s = run_ingest(&root, &index, Some(&cap), Some("f32"))?;
    ensure!(s.indexed == 5 && s.captioned == 5, "{s:?}");

    // Every image has the caption the captioner gives its file, and a cache entry of the
    // vision tower's shape.
    let store = Store::open_readonly(&index)?;
    let cache = vision_cache::cache_dir(&index);
    let eng = engine(&index, false)?;
    let retrieval = eng.model();
    let processor = ImageProcessor::new(ImageConfig::from_model_dir(&files("itm-a")?.dir)?)
        .with_exif_orientation(true);
    for row in store.iter() {
        let want = caption_of(&cap, Path::new(&row.path))?;
        ensure!(
            row.caption.as_deref() == Some(want.as_str()),
            "{}: {:?} vs {want}",
            row.path,
            row.caption
        );
        let px = candle_core::Tensor::from_vec(
            processor.pixel_values_from_file(Path::new(&row.path))?,
            (1, 3, processor.config.height, processor.config.width),
            &candle_core::Device::Cpu,
        )?;
        let fresh = retrieval.get_image_features(&px)?.squeeze(0)?;
        let cached = vision_cache::read(&cache, &row.content_hash, (fresh.dim(0)?, fresh.dim(1)?))?
            .context("cache entry written at ingest")?;
        let d = (fresh - cached)?.abs()?.max_all()?.to_scalar::<f32>()?;
        ensure!(d == 0.0, "f32 cache differs from the vision tower by {d}");
    }

    // ITM from the cache alone (the photos moved away: nothing to recompute from) == ITM
    // recomputed from the files (cache removed), pair for pair, and batched requests == one
    // at a time.
    let ids: Vec<u64> = store.iter().map(|r| r.image_id).collect();
    let snap = eng.store();
    let queries = ["a rocket on a launch pad", "a cat"];
    let reqs: Vec<(&str, &[u64])> = queries.iter().map(|q| (*q, ids.as_slice())).collect();
    let away = tmp.path().join("photos-away");
    std::fs::rename(&root, &away)?;
    let from_cache = eng.itm_many(&snap, &reqs)?;
    std::fs::rename(&away, &root)?;
    std::fs::remove_dir_all(&cache)?;
    let eng2 = engine(&index, false)?;
    for (qi, q) in queries.iter().enumerate() {
        let alone = eng2.itm_many(&eng2.store(), &[(*q, ids.as_slice())])?;
        for (a, b) in from_cache[qi].iter().zip(&alone[0]) {
            let (a, b) = (
                a.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?,
                b.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?,
            );
            ensure!((a - b).abs() <= 1e-5, "{q}: cached {a} vs recomputed {b}");
        }
    }

    // Re-running is a no-op: nothing re-embedded or re-captioned.
    let again = run_ingest(&root, &index, Some(&cap), Some("f32"))?;
    ensure!(
        again.indexed == 0 && again.captioned == 0 && again.unchanged == 5,
        "{again:?}"
    );

    // A deleted photo's cache entry goes with it.
    let gone = store
        .iter()
        .find(|r| r.path.ends_with("rocket.jpg"))
        .context("rocket")?;
    let hash = gone.content_hash.clone();
    std::fs::remove_file(&gone.path)?;
    let s = run_ingest(&root, &index, Some(&cap), Some("f32"))?;
    ensure!(s.removed == 1, "{s:?}");
    ensure!(vision_cache::entry_path(&cache, &hash).is_some_and(|p| !p.exists()));
    Ok(())
}

#[test]
fn f16_vision_cache_is_close_to_recompute() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (root, index) = (tmp.path().join("photos"), tmp.path().join("index"));
    copy_photos(&root)?;
    run_ingest(&root, &index, None, Some("f16"))?;
    let eng = engine(&index, false)?;
    let snap = eng.store();
    let ids: Vec<u64> = snap.iter().map(|r| r.image_id).collect();
    let q = "a photo of a cup of coffee";
    // From the cache alone: the photos moved away, nothing to recompute from.
    let away = tmp.path().join("photos-away");
    std::fs::rename(&root, &away)?;
    let cached = eng.itm_many(&snap, &[(q, &ids)])?;
    std::fs::rename(&away, &root)?;
    std::fs::remove_dir_all(vision_cache::cache_dir(&index))?;
    let eng2 = engine(&index, false)?;
    let fresh = eng2.itm_many(&eng2.store(), &[(q, &ids)])?;
    let mut worst = 0f32;
    for (a, b) in cached[0].iter().zip(&fresh[0]) {
        let (a, b) = (
            a.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?,
            b.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        worst = worst.max((a - b).abs());
    }
    // f16 keeps ~3 significant digits of each state; the stated tolerance is 2e-3, and the
    // rounding must show (a recompute would give exactly the fresh scores).
    ensure!(worst <= 2e-3, "f16 cache moves ITM by {worst}");
    ensure!(
        worst > 0.0,
        "the f16 cache gave exactly the f32 scores: was it read?"
    );
    Ok(())
}

#[test]
fn captions_backfill_and_write_back() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (root, index) = (tmp.path().join("photos"), tmp.path().join("index"));
    copy_photos(&root)?;
    run_ingest(&root, &index, None, None)?;

    // On demand: generated once, then cached; the plain caption is written back to the index.
    let eng = engine(&index, true)?;
    let snap = eng.store();
    let row = snap.iter().next().context("a row")?.clone();
    let want = caption_of(&captioner()?, Path::new(&row.path))?;
    let items = vec![(
        CaptionSource::ImageId(row.image_id),
        CaptionRequest::default(),
    )];
    let first = eng.caption_many(&snap, &items).pop().context("one")??;
    ensure!(
        !first.cached && first.generated.text == want,
        "{first:?} vs {want}"
    );
    let second = eng.caption_many(&snap, &items).pop().context("one")??;
    ensure!(
        second.cached && second.generated == first.generated,
        "{second:?}"
    );
    // By bytes: the same image gives the same caption.
    let bytes = std::fs::read(&row.path)?;
    let by_bytes = eng
        .caption_many(
            &snap,
            &[(CaptionSource::Bytes(bytes), CaptionRequest::default())],
        )
        .pop()
        .context("one")??;
    ensure!(by_bytes.generated.text == want);
    ensure!(eng.flush_captions()? == 1);
    let reread = Store::open_readonly(&index)?;
    ensure!(reread.get(row.image_id).and_then(|r| r.caption.clone()) == Some(want.clone()));
    ensure!(
        eng.store().generation() == reread.generation(),
        "engine refreshed after flush"
    );
    // Served from the store after a restart.
    let eng2 = engine(&index, true)?;
    let again = eng2
        .caption_many(&eng2.store(), &items)
        .pop()
        .context("one")??;
    ensure!(again.cached && again.generated.text == want);

    // Ingest with a caption model captions the 4 images that still have none.
    let s = run_ingest(&root, &index, Some(&captioner()?), None)?;
    ensure!(s.captioned == 4 && s.indexed == 0, "{s:?}");
    let s = run_ingest(&root, &index, Some(&captioner()?), None)?;
    ensure!(s.captioned == 0, "{s:?}");

    // Errors: unknown id, no caption model, bad bytes.
    let e = eng.caption_many(
        &snap,
        &[(CaptionSource::ImageId(999), CaptionRequest::default())],
    );
    ensure!(matches!(e[0], Err(blipdex_core::Error::NotFound(_))));
    let no_cap = engine(&index, false)?;
    let e = no_cap.caption_many(&snap, &items);
    ensure!(matches!(e[0], Err(blipdex_core::Error::Unsupported(_))));
    let e = eng.caption_many(
        &snap,
        &[(
            CaptionSource::Bytes(b"junk".to_vec()),
            CaptionRequest::default(),
        )],
    );
    ensure!(
        matches!(e[0], Err(blipdex_core::Error::BadImage { .. })),
        "{:?}",
        e[0]
    );
    Ok(())
}

#[test]
fn search_filters_pages_images_and_refresh() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (root, index) = (tmp.path().join("photos"), tmp.path().join("index"));
    copy_photos(&root)?;
    run_ingest(&root, &index, None, None)?;
    let eng = engine(&index, false)?;
    let snap = eng.store();
    let t = eng
        .embed_texts(&["a grey photo of a man with a camera"])?
        .remove(0);

    // Exact and ANN agree on a tiny index; both equal the store's brute force.
    let all = SearchParams {
        top_k: 5,
        ..Default::default()
    };
    let exact = eng.search_text(
        &snap,
        &t,
        &SearchParams {
            exact: true,
            ..all.clone()
        },
    )?;
    let ann = eng.search_text(&snap, &t, &all)?;
    let brute = snap.search_exact(&t, 5)?;
    ensure!(exact.len() == 5 && ann.len() == 5);
    for ((a, b), c) in exact.iter().zip(&ann).zip(&brute) {
        ensure!(a.image_id == b.image_id && a.image_id == c.image_id && a.itc_score == c.score);
    }
    // The graph holds several points per image: a small ef still yields top_k images.
    let narrow = eng.search_text(
        &snap,
        &t,
        &SearchParams {
            ef: 1,
            ..all.clone()
        },
    )?;
    ensure!(narrow.len() == 5, "{narrow:?}");
    // Pages are slices of the full list.
    let page = eng.search_text(
        &snap,
        &t,
        &SearchParams {
            top_k: 2,
            offset: 2,
            ..all.clone()
        },
    )?;
    ensure!(page
        .iter()
        .map(|h| h.image_id)
        .eq(exact[2..4].iter().map(|h| h.image_id)));
    // Path prefix and minimum score.
    let prefix = root.join("sub").to_string_lossy().into_owned();
    let sub = eng.search_text(
        &snap,
        &t,
        &SearchParams {
            path_prefix: Some(prefix.clone()),
            ..all.clone()
        },
    )?;
    ensure!(
        sub.len() == 2 && sub.iter().all(|h| h.path.starts_with(&prefix)),
        "{sub:?}"
    );
    let cut = exact[2].itc_score;
    let top = eng.search_text(
        &snap,
        &t,
        &SearchParams {
            min_score: Some(cut),
            ..all.clone()
        },
    )?;
    ensure!(top.len() == 3 && top.iter().all(|h| h.itc_score >= cut));
    // Absurd requests are refused.
    ensure!(eng
        .search_text(
            &snap,
            &t,
            &SearchParams {
                top_k: 1_000_000,
                ..all.clone()
            }
        )
        .is_err());
    ensure!(eng.embed_texts(&["  "]).is_err());

    // Batched text embeddings == one at a time.
    let qs = [
        "a rocket",
        "a cat on a sofa with a much longer description",
        "coffee",
    ];
    let batched = eng.embed_texts(&qs)?;
    for (q, b) in qs.iter().zip(&batched) {
        let one = eng.embed_texts(&[q])?.remove(0);
        let d = one
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        ensure!(d <= 1e-5, "{q}: batched differs by {d}");
    }

    // Image → image: every photo finds itself first, with similarity 1.
    for row in snap.iter() {
        let bytes = std::fs::read(&row.path)?;
        let q = eng.embed_images(&[&bytes])?.remove(0);
        for exact in [false, true] {
            let hits = eng.search_image(
                &snap,
                &q,
                &SearchParams {
                    top_k: 3,
                    exact,
                    ..Default::default()
                },
            )?;
            ensure!(hits[0].image_id == row.image_id, "{}: {hits:?}", row.path);
            ensure!(
                (hits[0].itc_score - 1.0).abs() < 1e-4 && hits[1].itc_score < hits[0].itc_score
            );
        }
    }

    // Rerank puts ITM order first; unknown ids are NOT_FOUND; a changed file is a per-hit error.
    let mut hits = exact.clone();
    eng.rerank(&snap, "a rocket", &mut hits, 3)?;
    ensure!(hits[..3]
        .windows(2)
        .all(|w| w[0].itm_score >= w[1].itm_score));
    ensure!(hits[3..].iter().all(|h| h.itm_score.is_none()));
    ensure!(matches!(
        eng.hits_for_ids(&snap, &[12345]),
        Err(blipdex_core::Error::NotFound(_))
    ));
    let victim = snap
        .iter()
        .find(|r| r.path.ends_with("astronaut.jpg"))
        .context("astronaut")?;
    std::fs::write(&victim.path, b"overwritten")?;
    // (A fresh engine: states already in the LRU describe the indexed bytes and stay usable.)
    let cold = engine(&index, false)?;
    let r = cold.itm_many(&cold.store(), &[("x", &[victim.image_id])])?;
    let msg = r[0][0]
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    ensure!(msg.contains("changed since it was indexed"), "{msg}");

    // A later ingest is picked up by refresh; the old snapshot stays usable.
    let more = tmp.path().join("more");
    std::fs::create_dir_all(&more)?;
    image_variant(&fixtures().join("photos/rocket.jpg"), &more.join("new.png"))?;
    run_ingest(&more, &index, None, None)?;
    ensure!(eng.refresh()?, "new generation picked up");
    ensure!(eng.store().len() == snap.len() + 1 && snap.len() == 5);
    ensure!(!eng.refresh()?, "no change, no reload");
    Ok(())
}

/// An index deleted and built again in the same place (another identity, a lower generation) is
/// picked up by refresh; a deleted one keeps the served snapshot, and a caption flush neither
/// re-creates it nor drops the queued captions.
#[test]
fn replaced_and_deleted_index() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (root, index) = (tmp.path().join("photos"), tmp.path().join("index"));
    copy_photos(&root)?;
    run_ingest(&root, &index, None, None)?;
    // Two more commits, so that the served generation is above the new index's.
    for i in 0..2 {
        let more = tmp.path().join(format!("more{i}"));
        std::fs::create_dir_all(&more)?;
        let src = fixtures().join("photos/rocket.jpg");
        let mut img = image::open(&src)?.to_rgb8();
        if let Some(p) = img.get_pixel_mut_checked(1, i) {
            p.0 = [p.0[0].wrapping_add(7), p.0[1], p.0[2]];
        }
        img.save(more.join("r.png"))?;
        run_ingest(&more, &index, None, None)?;
    }
    let eng = engine(&index, true)?;
    let old = eng.store();
    ensure!(old.len() == 7, "{}", old.len());

    // Deleted: refresh fails, the snapshot stays, a flush creates nothing and keeps the caption.
    let row = old.iter().next().context("a row")?.clone();
    let items = vec![(
        CaptionSource::ImageId(row.image_id),
        CaptionRequest::default(),
    )];
    eng.caption_many(&old, &items).pop().context("one")??;
    ensure!(eng.stats().captions_pending == 1);
    std::fs::remove_dir_all(&index)?;
    ensure!(eng.refresh().is_err(), "refresh of a deleted index");
    ensure!(eng.store().len() == 7 && eng.store().generation() == old.generation());
    ensure!(eng.flush_captions().is_err(), "flush into a deleted index");
    ensure!(!index.exists(), "the flush re-created the deleted index");
    ensure!(
        eng.stats().captions_pending == 1,
        "the queued caption was dropped"
    );

    // Built again in its place with two photos: a lower generation, picked up anyway.
    let two = tmp.path().join("two");
    std::fs::create_dir_all(&two)?;
    for name in ["rocket.jpg", "astronaut.jpg"] {
        std::fs::copy(fixtures().join("photos").join(name), two.join(name))?;
    }
    run_ingest(&two, &index, None, None)?;
    let fresh = Store::open_readonly(&index)?;
    ensure!(fresh.generation() < old.generation() && fresh.index_id() != old.index_id());
    ensure!(eng.refresh()?, "replaced index picked up");
    ensure!(eng.store().len() == 2 && eng.store().index_id() == fresh.index_id());
    ensure!(!eng.refresh()?, "no change, no reload");
    // The queued caption goes where its image is, if it is in the new index.
    let n = eng.flush_captions()?;
    let has = fresh.by_content_hash(&row.content_hash).is_some();
    ensure!(
        n == usize::from(has) && eng.stats().captions_pending == 0,
        "{n} {has}"
    );
    Ok(())
}

/// A new image (one pixel changed) so it is not a duplicate of an indexed one.
fn image_variant(src: &Path, dest: &Path) -> Result<()> {
    let mut img = image::open(src)?.to_rgb8();
    if let Some(p) = img.get_pixel_mut_checked(0, 0) {
        p.0[0] = p.0[0].wrapping_add(1);
    }
    img.save_with_format(dest, image::ImageFormat::Png)?;
    Ok(())
}

/// A file name that is not UTF-8 (Unix names are bytes) is kept exactly: re-ingest sees it
/// unchanged, reranking and captions read the file back, and people see an escaped name.
#[cfg(unix)]
#[test]
fn non_utf8_file_names_round_trip() -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir()?;
    let (root, index) = (tmp.path().join("photos"), tmp.path().join("index"));
    std::fs::create_dir_all(&root)?;
    let name = std::ffi::OsStr::from_bytes(b"bad\xff\xfe.png");
    std::fs::copy(fixtures().join("photos/camera_gray.png"), root.join(name))?;
    std::fs::copy(
        fixtures().join("photos/rocket.jpg"),
        root.join("rocket.jpg"),
    )?;
    let s = run_ingest(&root, &index, None, None)?;
    ensure!(s.indexed == 2 && s.rejected == 0, "{s:?}");
    let again = run_ingest(&root, &index, None, None)?;
    ensure!(again.unchanged == 2 && again.removed == 0, "{again:?}");

    let eng = engine(&index, true)?;
    let snap = eng.store();
    let row = snap
        .iter()
        .find(|r| !r.path.ends_with("rocket.jpg"))
        .context("the non-UTF-8 image")?;
    let ids = [row.image_id];
    let itm = eng.itm_many(&snap, &[("a camera", &ids)])?;
    ensure!(itm[0][0].is_ok(), "{:?}", itm[0][0]);
    let hits = eng.hits_for_ids(&snap, &ids)?;
    let shown = format!("{}/bad\\xff\\xfe.png", root.canonicalize()?.display());
    ensure!(hits[0].path == shown, "{} vs {shown}", hits[0].path);
    let caption = eng.caption_many(
        &snap,
        &[(
            CaptionSource::ImageId(row.image_id),
            CaptionRequest::default(),
        )],
    );
    ensure!(caption[0].is_ok(), "{:?}", caption[0]);
    Ok(())
}

/// An index built before blipdex read EXIF (rows without metadata) gets every photo's metadata
/// on the next ingest, by patch: nothing is decoded for pixels or embedded again (no new row,
/// embeddings and ingest times unchanged); the run after that writes nothing.
#[test]
fn exif_metadata_backfilled_without_reembedding() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(&photos)?;
    for e in std::fs::read_dir(fixtures().join("photos-meta"))? {
        let e = e?;
        if e.file_name() != "expected.json" {
            std::fs::copy(e.path(), photos.join(e.file_name()))?;
        }
    }
    let fresh = tmp.path().join("fresh");
    run_ingest(&photos, &fresh, None, None)?;
    let fresh = Store::open_readonly(&fresh)?;
    ensure!(
        fresh.iter().all(|r| r.meta.is_some()),
        "fresh ingest lacks metadata"
    );
    ensure!(
        fresh
            .iter()
            .filter_map(|r| r.meta)
            .filter(|m| m.taken_at.is_some())
            .count()
            >= 5,
        "the fixtures' dates were not read"
    );

    // The same rows as an older blipdex wrote them: no metadata.
    let old = tmp.path().join("old");
    {
        let opts = blipdex_store::StoreOptions::new(
            fresh.model_fingerprint(),
            fresh.num_query(),
            fresh.dim(),
        );
        let mut w = Store::create_or_open(&old, opts)?;
        let mut b = blipdex_store::Batch::new();
        for r in fresh.iter() {
            b.add(blipdex_store::ImageRecord {
                embeds: fresh.embeds(r.image_id).context("embeds")?,
                path: r.path,
                paths: r.paths,
                content_hash: r.content_hash,
                width: r.width,
                height: r.height,
                file_size: r.file_size,
                mtime_ns: r.mtime_ns,
                caption: None,
                meta: None,
            });
        }
        w.commit(b)?;
    }
    let before = Store::open_readonly(&old)?;
    ensure!(before.iter().all(|r| r.meta.is_none()));

    let summary = run_ingest(&photos, &old, None, None)?;
    assert_eq!(summary.indexed, 0, "{summary:?}");
    assert_eq!(summary.unchanged, fresh.len(), "{summary:?}");
    assert_eq!(summary.model_seconds, 0.0, "{summary:?}");
    assert_eq!(summary.commits, 1, "{summary:?}");
    let after = Store::open_readonly(&old)?;
    assert_eq!(
        after.total_rows(),
        before.total_rows(),
        "rows were rewritten"
    );
    for r in after.iter() {
        let want = fresh
            .by_content_hash(&r.content_hash)
            .context("same photo")?;
        assert_eq!(r.meta, want.meta, "{}", r.path);
        let was = before.get(r.image_id).context("same id")?;
        assert_eq!(
            r.ingested_at_ns, was.ingested_at_ns,
            "{} re-embedded",
            r.path
        );
        assert_eq!(after.embeds(r.image_id), before.embeds(r.image_id));
    }
    let again = run_ingest(&photos, &old, None, None)?;
    assert_eq!(
        (again.commits, again.unchanged),
        (0, fresh.len()),
        "{again:?}"
    );
    Ok(())
}

/// A 4000x3000 camera-sized JPEG stored rotated (EXIF orientation 6), as phones write them.
fn camera_jpeg() -> Result<Vec<u8>> {
    let img = image::RgbImage::from_fn(4000, 3000, |x, y| {
        let edge = if (x / 173 + y / 101) % 2 == 0 { 70 } else { 0 };
        image::Rgb([
            (x * 180 / 4000 + edge) as u8,
            (y * 150 / 3000 + (x * 7 + y * 13) % 31) as u8,
            (200 - x * 120 / 4000 + edge / 2) as u8,
        ])
    });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&img)?;
    // An APP1 EXIF segment after SOI: one IFD entry, Orientation (0x0112) = 6.
    let mut app1 =
        b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x06\0\0\0\0\0\0\0".to_vec();
    let len = u16::try_from(app1.len() + 2)?.to_be_bytes();
    app1.splice(0..0, [0xFF, 0xE1, len[0], len[1]]);
    jpeg.splice(2..2, app1);
    Ok(jpeg)
}

#[test]
fn fast_decode_ingest_keeps_sizes_and_stays_close() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("photos");
    copy_photos(&root)?;
    std::fs::write(root.join("camera.jpg"), camera_jpeg()?)?;
    let mut stores = Vec::new();
    for (mode, want) in [
        (None, "exact"),
        (Some(DecodeMode::Exact), "exact"),
        (Some(DecodeMode::Fast), "fast"),
    ] {
        let index = tmp.path().join(format!("index-{want}-{}", stores.len()));
        let s = run_ingest_decoding(&root, &index, None, None, mode)?;
        ensure!(s.indexed == 6 && s.decode == want, "{mode:?}: {s:?}");
        stores.push(Store::open_readonly(&index)?);
    }
    // (path, width, height, embeddings) of every image, by path.
    type Row = (String, u32, u32, Vec<f32>);
    let by_path = |st: &Store| -> Result<Vec<Row>> {
        let mut rows: Vec<_> = st
            .iter()
            .map(|r| {
                let e = st.embeds(r.image_id).context("embeds")?;
                Ok((r.path, r.width, r.height, e))
            })
            .collect::<Result<_>>()?;
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(rows)
    };
    let (default, exact, fast) = (
        by_path(&stores[0])?,
        by_path(&stores[1])?,
        by_path(&stores[2])?,
    );
    ensure!(
        default == exact,
        "on the CPU the default is the exact decode"
    );
    let dim = stores[0].dim();
    let mut worst = 1f32;
    for (e, f) in exact.iter().zip(&fast) {
        ensure!(
            (&e.0, e.1, e.2) == (&f.0, f.1, f.2),
            "paths and sizes on disk"
        );
        if !e.0.ends_with(".jpg") {
            ensure!(e.3 == f.3, "{}: only JPEGs decode differently", e.0);
            continue;
        }
        if e.0.ends_with("camera.jpg") {
            ensure!((e.1, e.2) == (3000, 4000), "rotated size {}x{}", e.1, e.2);
        }
        // The tiny checkpoint's 64-pixel input lets even the fixture JPEGs shrink in decoding.
        ensure!(e.3 != f.3, "{}: decoded the same way twice", e.0);
        for (a, b) in e.3.chunks(dim).zip(f.3.chunks(dim)) {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            worst = worst.min(dot / norm(a) / norm(b));
        }
    }
    eprintln!("fast vs exact decode: lowest query-vector cosine {worst}");
    ensure!(worst > 0.999, "query vector cosine {worst}");
    Ok(())
}
