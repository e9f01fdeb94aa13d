//! The filtered rankings on a bare synthetic store (no model): every path of
//! `blipdex_search::rank_text` / `rank_image` (few matches scored exactly; many matches through
//! the ANN ranking, filtered; date orders) must give exactly the top-k of a brute-force scan of
//! the photos that match.

use blipdex_search::{browse, rank_image, rank_text, PhotoFilter, SearchParams, SortBy};
use blipdex_store::synth::Synth;
use blipdex_store::{Batch, ImageRecord, PhotoMeta, Store, StoreOptions};

const Q: usize = 4;
const E: usize = 16;

/// Brute force: every live image passing `f`, scored by `score`, best first (ties by id).
fn truth(store: &Store, f: &PhotoFilter, score: impl Fn(u64) -> f32, k: usize) -> Vec<u64> {
    let mut v: Vec<(u64, f32)> = store
        .iter()
        .filter(|r| f.matches(r.meta.as_ref()))
        .map(|r| (r.image_id, score(r.image_id)))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter().take(k).map(|x| x.0).collect()
}

fn ids(v: &[(u64, f32)]) -> Vec<u64> {
    v.iter().map(|x| x.0).collect()
}

#[test]
fn filtered_rankings_equal_brute_force_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let s = Synth::new(Q, E, 50, 3);
    let n = 24_000u64;
    let mut store = Store::create_or_open(dir.path(), StoreOptions::new("fp", Q, E)).unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(6000) {
        let mut b = Batch::new();
        for &i in chunk {
            // Every image but every 8th has a location (21,000: the ANN path for text);
            // `Synth::photo` spreads cameras (1% each) and dates.
            let mut m: PhotoMeta = s.photo(i);
            if i.is_multiple_of(8) {
                m.gps_lat = None;
                m.gps_lon = None;
            } else {
                m.gps_lat = Some(10.0);
                m.gps_lon = Some(20.0);
            }
            b.add(ImageRecord {
                meta: Some(m),
                ..s.record(i)
            });
        }
        store.commit(b).unwrap();
    }
    let located = PhotoFilter {
        has_location: Some(true),
        ..Default::default()
    };
    let camera = PhotoFilter {
        camera: Some("model-042".into()),
        ..Default::default()
    };
    let k = 10;
    for qi in 0..5u64 {
        let t = s.text(qi);
        for (what, f) in [
            ("located, ANN path", &located),
            ("camera, exact path", &camera),
        ] {
            let p = SearchParams {
                top_k: k,
                photo: f.clone(),
                ..SearchParams::default()
            };
            let got = rank_text(&store, &t, &p).unwrap();
            let want = truth(&store, f, |id| store.itc_score(id, &t).unwrap(), k);
            assert_eq!(ids(&got), want, "text, {what}, query {qi}");
        }
        // Image queries: "located" is over the exact limit for them too.
        let e = store.embeds(qi * 7 + 1).unwrap();
        for (what, f) in [
            ("located, ANN path", &located),
            ("camera, exact path", &camera),
        ] {
            let p = SearchParams {
                top_k: k,
                photo: f.clone(),
                ..SearchParams::default()
            };
            let got = rank_image(&store, &e, &p).unwrap();
            let want = truth(
                &store,
                f,
                |id| blipdex_search::image_similarity(&e, &store.embeds(id).unwrap(), E),
                k,
            );
            assert_eq!(ids(&got), want, "image, {what}, query {qi}");
        }
    }
    // Date order: every camera match, newest first, paged.
    let p = SearchParams {
        top_k: 7,
        offset: 3,
        photo: camera.clone(),
        sort: SortBy::DateDesc,
        ..SearchParams::default()
    };
    let got = ids(&rank_text(&store, &s.text(0), &p).unwrap());
    let mut dated: Vec<(i64, u64)> = store
        .iter()
        .filter(|r| camera.matches(r.meta.as_ref()))
        .map(|r| (r.meta.and_then(|m| m.taken_at).unwrap(), r.image_id))
        .collect();
    dated.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let want: Vec<u64> = dated.iter().skip(3).take(7).map(|d| d.1).collect();
    assert_eq!(got, want);

    // Browsing (no query): every match in date order, undated last, ties by id, scores 0.
    for (filter, what) in [(PhotoFilter::default(), "everything"), (camera, "camera")] {
        for sort in [SortBy::DateDesc, SortBy::DateAsc] {
            let p = SearchParams {
                top_k: 50,
                offset: 20,
                photo: filter.clone(),
                sort,
                ..SearchParams::default()
            };
            let got = browse(&store, &p).unwrap();
            assert!(got.iter().all(|h| h.1 == 0.0), "browse scores");
            let mut all: Vec<(Option<i64>, u64)> = store
                .iter()
                .filter(|r| filter.matches(r.meta.as_ref()))
                .map(|r| (r.meta.and_then(|m| m.taken_at), r.image_id))
                .collect();
            all.sort_by(|a, b| {
                let date = match sort {
                    SortBy::DateAsc => (a.0.is_none(), a.0).cmp(&(b.0.is_none(), b.0)),
                    _ => (b.0.is_some(), b.0).cmp(&(a.0.is_some(), a.0)),
                };
                date.then(a.1.cmp(&b.1))
            });
            let want: Vec<u64> = all.iter().skip(20).take(50).map(|d| d.1).collect();
            assert_eq!(ids(&got), want, "browse {what} {sort:?}");
        }
    }
    let refused = |p: SearchParams| browse(&store, &p).is_err();
    assert!(
        refused(SearchParams::default()),
        "score order without a query"
    );
    assert!(refused(SearchParams {
        sort: SortBy::DateDesc,
        min_score: Some(0.1),
        ..SearchParams::default()
    }));
}
