//! Search benchmark on seeded synthetic BLIP-2-shaped embeddings; prints one JSON object.
//!
//! ```sh
//! cargo run --release -p blipdex-store --example bench_search -- --images 100000
//! ```
//!
//! Flags (defaults): --images 100000 --queries 1000 --q 32 --e 256 --centres 1000
//! --image-noise 1.0 --query-noise 0.5 --text-noise 1.0 --aspects 0 --vectors-per-image 4 --m 16
//! --ef-construction 100 (HnswParams::default()) --ef 64,128,192,256 --k 10 --batch 10000 --dtype f32 --dir PATH
//! (default: a temp dir, removed at the end) --seed 1 --truth-file PATH (caches the exact top-k)
//! --phase search (reuse an index built by an earlier run with the same --dir)
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::Instant;

use blipdex_store::{Batch, Dtype, HnswParams, Store, StoreOptions};
use common::{recall, Synth};
use rayon::prelude::*;
use serde_json::json;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opt: HashMap<String, String> = HashMap::new();
    for pair in args.chunks(2) {
        let key = pair[0].trim_start_matches("--").to_string();
        opt.insert(key, pair.get(1).cloned().unwrap_or_default());
    }
    let get = |k: &str, d: &str| opt.get(k).cloned().unwrap_or_else(|| d.to_string());
    let num = |k: &str, d: &str| get(k, d).parse::<usize>().unwrap();
    let flt = |k: &str, d: &str| get(k, d).parse::<f32>().unwrap();

    let n = num("images", "100000");
    let nq = num("queries", "1000");
    let (q, e) = (num("q", "32"), num("e", "256"));
    let k = num("k", "10");
    let batch = num("batch", "10000");
    let efs: Vec<usize> = get("ef", "64,128,192,256")
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let d = HnswParams::default();
    let params = HnswParams {
        max_nb_connection: num("m", &d.max_nb_connection.to_string()),
        ef_construction: num("ef-construction", &d.ef_construction.to_string()),
        vectors_per_image: num("vectors-per-image", &d.vectors_per_image.to_string()),
    };
    let dtype = if get("dtype", "f32") == "f16" {
        Dtype::F16
    } else {
        Dtype::F32
    };
    let mut synth = Synth::new(q, e, num("centres", "1000"), num("seed", "1") as u64);
    synth.image_noise = flt("image-noise", "1.0");
    synth.query_noise = flt("query-noise", "0.5");
    synth.text_noise = flt("text-noise", "1.0");
    synth.aspects = num("aspects", "0");

    let tmp = tempfile::tempdir().unwrap();
    let dir = opt
        .get("dir")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().join("index"));
    let stats_path = dir.with_extension("ingest.json");
    if opt.get("phase").map(String::as_str) != Some("search") {
        let _ = std::fs::remove_dir_all(&dir);
        let stats = ingest_phase(&dir, &synth, n, batch, dtype, params);
        std::fs::write(&stats_path, serde_json::to_vec(&stats).unwrap()).unwrap();
        // Search in a fresh process, so its RSS is what a server starting on this index uses.
        let mut child_args = args.clone();
        child_args.extend([
            "--phase".into(),
            "search".into(),
            "--dir".into(),
            dir.display().to_string(),
        ]);
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(child_args)
            .status()
            .unwrap();
        assert!(status.success());
        return;
    }
    let ingest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats_path).unwrap()).unwrap();
    let rss_before_open = rss_kib("VmRSS:");
    let t = Instant::now();
    let store = Store::open_readonly(&dir).unwrap();
    let open_s = t.elapsed().as_secs_f64();
    let rss_open = rss_kib("VmRSS:");
    assert_eq!(store.ann_info().reloaded_rows, n);

    let ts: Vec<f32> = (0..nq as u64)
        .into_par_iter()
        .flat_map_iter(|i| synth.text(i))
        .collect();
    let ids = |h: &[blipdex_store::Hit]| h.iter().map(|x| x.image_id).collect::<Vec<_>>();
    // The exact top-k only depends on the data, so runs that vary the index can share it.
    let truth_file = opt.get("truth-file").map(std::path::PathBuf::from);
    let cached: Option<Vec<Vec<u64>>> = truth_file
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    let (truth, exact_batch_qps) = match cached {
        Some(t) if t.len() == nq => (t, None),
        _ => {
            let t = Instant::now();
            let truth: Vec<Vec<u64>> = store
                .search_exact_batch(&ts, k)
                .unwrap()
                .iter()
                .map(|h| ids(h))
                .collect();
            let qps = nq as f64 / t.elapsed().as_secs_f64();
            if let Some(p) = &truth_file {
                std::fs::write(p, serde_json::to_vec(&truth).unwrap()).unwrap();
            }
            (truth, Some(qps))
        }
    };
    let single = 5.min(nq);
    let t = Instant::now();
    for t1 in ts.chunks_exact(e).take(single) {
        assert_eq!(store.search_exact(t1, k).unwrap().len(), k.min(n));
    }
    let exact_single_ms = t.elapsed().as_secs_f64() * 1e3 / single as f64;

    let mut ann = Vec::new();
    for &ef in &efs {
        // Throughput: all cores, queries spread by rayon; latency measured per query meanwhile.
        let t = Instant::now();
        let res: Vec<(Vec<blipdex_store::Hit>, f64)> = ts
            .par_chunks_exact(e)
            .map(|t1| {
                let s = Instant::now();
                let r = store.search_ann(t1, k, ef).unwrap();
                (r, s.elapsed().as_secs_f64() * 1e3)
            })
            .collect();
        let wall = t.elapsed().as_secs_f64();
        let mut lat: Vec<f64> = res.iter().map(|r| r.1).collect();
        lat.sort_by(f64::total_cmp);
        // Single-thread latency, unloaded.
        let mut lat1: Vec<f64> = ts
            .chunks_exact(e)
            .take(200)
            .map(|t1| {
                let s = Instant::now();
                store.search_ann(t1, k, ef).unwrap();
                s.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        lat1.sort_by(f64::total_cmp);
        let rec: f64 = res
            .iter()
            .zip(&truth)
            .map(|(r, t)| recall(t, &ids(&r.0)))
            .sum::<f64>()
            / nq as f64;
        ann.push(json!({
            "ef": ef,
            "recall_at_k": rec,
            "qps": nq as f64 / wall,
            "p50_ms": percentile(&lat, 0.5),
            "p99_ms": percentile(&lat, 0.99),
            "p50_ms_1thread": percentile(&lat1, 0.5),
            "p99_ms_1thread": percentile(&lat1, 0.99),
        }));
        eprintln!("{}", ann.last().unwrap());
    }

    let out = json!({
        "images": n,
        "queries": nq,
        "k": k,
        "q": q,
        "e": e,
        "dtype": dtype.to_string(),
        "threads": rayon::current_num_threads(),
        "synthetic": {"centres": synth.n_centres(), "image_noise": synth.image_noise, "query_noise": synth.query_noise, "text_noise": synth.text_noise, "aspects": synth.aspects},
        "hnsw": {"m": params.max_nb_connection, "ef_construction": params.ef_construction, "vectors_per_image": params.vectors_per_image},
        "ingest": ingest,
        "open_readonly_s": open_s,
        "ram": {
            "reader_bytes_per_image": (rss_open.saturating_sub(rss_before_open)) as f64 * 1024.0 / n as f64,
            "embeddings_bytes_per_image": q * e * 4,
            "reader_peak_rss_mib": rss_kib("VmHWM:") as f64 / 1024.0,
        },
        "exact": {"batch_qps": exact_batch_qps, "single_query_ms": exact_single_ms},
        "ann": ann,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}

fn ingest_phase(
    dir: &std::path::Path,
    synth: &Synth,
    n: usize,
    batch: usize,
    dtype: Dtype,
    params: HnswParams,
) -> serde_json::Value {
    let (q, e) = (synth.q, synth.e);
    let rss_start = rss_kib("VmRSS:");
    // Ingest in commits of `batch` images, as an ingest job would.
    let mut store = Store::create_or_open(
        dir,
        StoreOptions::new("bench/synthetic", q, e)
            .with_dtype(dtype)
            .with_hnsw(params),
    )
    .unwrap();
    let (mut t_gen, mut t_data, mut t_insert, mut t_dump) = (0.0, 0.0, 0.0, 0.0);
    let ingest = Instant::now();
    for start in (0..n).step_by(batch) {
        let t = Instant::now();
        let recs: Vec<_> = (start..(start + batch).min(n))
            .into_par_iter()
            .map(|i| synth.record(i as u64))
            .collect();
        t_gen += t.elapsed().as_secs_f64();
        let mut b = Batch::new();
        for r in recs {
            b.add(r);
        }
        let info = store.commit(b).unwrap();
        t_data += info.timings.data.as_secs_f64();
        t_insert += info.timings.index_insert.as_secs_f64();
        t_dump += info.timings.index_dump.as_secs_f64();
        eprintln!(
            "committed {} images, generation {}: {:?}",
            (start + batch).min(n),
            info.generation,
            info.timings
        );
    }
    let ingest_s = ingest.elapsed().as_secs_f64() - t_gen;
    let writer_rss = rss_kib("VmRSS:");
    drop(store);
    let mut disk: HashMap<&str, u64> = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = if name.starts_with("shard-") {
            "parquet"
        } else if name.starts_with("hnsw-") {
            "hnsw"
        } else {
            "other"
        };
        *disk.entry(kind).or_default() += entry.metadata().unwrap().len();
    }
    json!({
        "seconds": ingest_s,
        "parquet_and_manifest_s": t_data,
        "hnsw_insert_s": t_insert,
        "hnsw_dump_s": t_dump,
        "commits": n.div_ceil(batch),
        "writer_rss_mib": (writer_rss.saturating_sub(rss_start)) as f64 / 1024.0,
        "disk_bytes_per_image": {
            "parquet": *disk.get("parquet").unwrap_or(&0) as f64 / n as f64,
            "hnsw": *disk.get("hnsw").unwrap_or(&0) as f64 / n as f64,
        },
    })
}
