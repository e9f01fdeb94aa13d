//! `blipdex bench search`: exact and ANN search on a seeded synthetic index of BLIP-2-shaped
//! embeddings (clustered 32x256 unit vectors; see `blipdex_store::synth`). Builds the index
//! (in commits of ingest's default size), then searches it in a fresh process so the reported
//! memory is what a reader opening that index uses. Prints one JSON object (pretty unless --json).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context};
use blipdex_search::{PhotoFilter, SearchParams};
use blipdex_store::synth::{recall, Synth};
use blipdex_store::{AnnSearch, Batch, Dtype, HnswParams, ImageRecord, Store, StoreOptions};
use clap::Args;
use rayon::prelude::*;
use serde_json::json;

#[derive(Args, Debug, Clone)]
pub struct SearchBench {
    #[arg(long, env = "BLIPDEX_BENCH_IMAGES", default_value_t = 100_000)]
    pub images: usize,
    #[arg(long, env = "BLIPDEX_BENCH_QUERIES", default_value_t = 1000)]
    pub queries: usize,
    /// Query vectors per image.
    #[arg(long, env = "BLIPDEX_BENCH_Q", default_value_t = 32)]
    pub q: usize,
    /// Embedding size.
    #[arg(long, env = "BLIPDEX_BENCH_E", default_value_t = 256)]
    pub e: usize,
    #[arg(long, env = "BLIPDEX_BENCH_CENTRES", default_value_t = 1000)]
    pub centres: usize,
    #[arg(long, env = "BLIPDEX_BENCH_IMAGE_NOISE", default_value_t = 1.0)]
    pub image_noise: f32,
    #[arg(long, env = "BLIPDEX_BENCH_QUERY_NOISE", default_value_t = 0.5)]
    pub query_noise: f32,
    #[arg(long, env = "BLIPDEX_BENCH_TEXT_NOISE", default_value_t = 1.0)]
    pub text_noise: f32,
    /// Query vectors per image drawn around a second subject.
    #[arg(long, env = "BLIPDEX_BENCH_ASPECTS", default_value_t = 0)]
    pub aspects: usize,
    #[arg(long, env = "BLIPDEX_BENCH_VECTORS_PER_IMAGE", default_value_t = HnswParams::default().vectors_per_image)]
    pub vectors_per_image: usize,
    #[arg(long, env = "BLIPDEX_BENCH_M", default_value_t = HnswParams::default().max_nb_connection)]
    pub m: usize,
    #[arg(long, env = "BLIPDEX_BENCH_EF_CONSTRUCTION", default_value_t = HnswParams::default().ef_construction)]
    pub ef_construction: usize,
    /// Candidate images rescored exactly per query, to measure.
    #[arg(
        long,
        env = "BLIPDEX_BENCH_EF",
        value_delimiter = ',',
        default_value = "64,128,192"
    )]
    pub ef: Vec<usize>,
    /// Index lists probed per query, to measure (every ef with every nprobe).
    #[arg(
        long,
        env = "BLIPDEX_BENCH_NPROBE",
        value_delimiter = ',',
        default_value = "16,32,64"
    )]
    pub nprobe: Vec<usize>,
    #[arg(long, env = "BLIPDEX_BENCH_K", default_value_t = 10)]
    pub k: usize,
    /// Images per commit while building (ingest's default `commit_every`).
    #[arg(long, env = "BLIPDEX_BENCH_BATCH", default_value_t = 256)]
    pub batch: usize,
    /// f32 or f16 embeddings on disk.
    #[arg(long, env = "BLIPDEX_BENCH_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Index directory (default: a temporary one, removed at the end).
    #[arg(long, env = "BLIPDEX_BENCH_DIR")]
    pub dir: Option<PathBuf>,
    #[arg(long, env = "BLIPDEX_BENCH_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Caches the exact top-k, so runs varying only the index share it.
    #[arg(long, env = "BLIPDEX_BENCH_TRUTH_FILE")]
    pub truth_file: Option<PathBuf>,
    /// Internal: only search an index built by an earlier run with the same --dir.
    #[arg(long, hide = true)]
    pub search_only: bool,
    #[arg(long, env = "BLIPDEX_JSON")]
    pub json: bool,
}

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

fn params(a: &SearchBench) -> HnswParams {
    HnswParams {
        max_nb_connection: a.m,
        ef_construction: a.ef_construction,
        vectors_per_image: a.vectors_per_image,
    }
}

fn synth(a: &SearchBench) -> Synth {
    let mut s = Synth::new(a.q, a.e, a.centres, a.seed);
    s.image_noise = a.image_noise;
    s.query_noise = a.query_noise;
    s.text_noise = a.text_noise;
    s.aspects = a.aspects;
    s
}

pub fn run(a: &SearchBench) -> anyhow::Result<()> {
    ensure!(
        a.images > 0 && a.queries > 0 && a.k > 0 && a.batch > 0,
        "sizes must be positive"
    );
    let dtype = match a.dtype.as_str() {
        "f32" => Dtype::F32,
        "f16" => Dtype::F16,
        other => anyhow::bail!("--dtype must be f32 or f16, got {other:?}"),
    };
    let synth = synth(a);
    let tmp = tempfile::tempdir()?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().join("index"));
    let stats_path = dir.with_extension("build.json");
    if !a.search_only {
        let _ = std::fs::remove_dir_all(&dir);
        let stats = build(&dir, &synth, a.images, a.batch, dtype, params(a))?;
        std::fs::write(&stats_path, serde_json::to_vec(&stats)?)?;
        // Search in a fresh process, so its RSS is what a server starting on this index uses.
        let mut args: Vec<String> = std::env::args().skip(1).collect();
        args.push("--search-only".into());
        if a.dir.is_none() {
            args.extend(["--dir".into(), dir.display().to_string()]);
        }
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(args)
            .status()?;
        ensure!(status.success(), "the search phase failed");
        return Ok(());
    }
    let build_stats: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&stats_path)
            .with_context(|| format!("{} (run without --search-only)", stats_path.display()))?,
    )?;
    let out = search(a, &dir, &synth, dtype, build_stats)?;
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

fn search(
    a: &SearchBench,
    dir: &Path,
    synth: &Synth,
    dtype: Dtype,
    build_stats: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let (n, nq, e, k) = (a.images, a.queries, a.e, a.k);
    let ts: Vec<f32> = (0..nq as u64)
        .into_par_iter()
        .flat_map_iter(|i| synth.text(i))
        .collect();
    let anon_before_open = rss_kib("RssAnon:");
    let t = Instant::now();
    let store = Store::open_readonly(dir)?;
    let open_s = t.elapsed().as_secs_f64();
    store.search_ann(&ts[..e], k, blipdex_store::DEFAULT_EF)?;
    let first_answer_s = t.elapsed().as_secs_f64();
    let anon_open = rss_kib("RssAnon:");
    ensure!(
        store.len() == n,
        "the index holds {} images, not {n}",
        store.len()
    );
    let info = store.ann_info();
    let ids = |h: &[blipdex_store::Hit]| h.iter().map(|x| x.image_id).collect::<Vec<_>>();
    let cached: Option<Vec<Vec<u64>>> = a
        .truth_file
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    let (truth, exact_batch_qps) = match cached {
        Some(t) if t.len() == nq => (t, None),
        _ => {
            let t = Instant::now();
            let truth: Vec<Vec<u64>> = store
                .search_exact_batch(&ts, k)?
                .iter()
                .map(|h| ids(h))
                .collect();
            let qps = nq as f64 / t.elapsed().as_secs_f64();
            if let Some(p) = &a.truth_file {
                std::fs::write(p, serde_json::to_vec(&truth)?)?;
            }
            (truth, Some(qps))
        }
    };
    let single = 5.min(nq);
    let t = Instant::now();
    for t1 in ts.chunks_exact(e).take(single) {
        ensure!(store.search_exact(t1, k)?.len() == k.min(n));
    }
    let exact_single_ms = t.elapsed().as_secs_f64() * 1e3 / single as f64;

    let mut ann = Vec::new();
    for (&nprobe, &ef) in a
        .nprobe
        .iter()
        .flat_map(|p| a.ef.iter().map(move |f| (p, f)))
    {
        let s = AnnSearch { ef, nprobe };
        // Throughput: all cores, queries spread by rayon; latency measured per query meanwhile.
        let t = Instant::now();
        let res = ts
            .par_chunks_exact(e)
            .map(|t1| {
                let t0 = Instant::now();
                let r = store.search_ann_with(t1, k, s)?;
                Ok((r, t0.elapsed().as_secs_f64() * 1e3))
            })
            .collect::<blipdex_core::Result<Vec<_>>>()?;
        let wall = t.elapsed().as_secs_f64();
        let mut lat: Vec<f64> = res.iter().map(|r| r.1).collect();
        lat.sort_by(f64::total_cmp);
        // Single-thread latency, unloaded.
        let mut lat1 = Vec::new();
        for t1 in ts.chunks_exact(e).take(200) {
            let t0 = Instant::now();
            store.search_ann_with(t1, k, s)?;
            lat1.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        lat1.sort_by(f64::total_cmp);
        let rec: f64 = res
            .iter()
            .zip(&truth)
            .map(|(r, t)| recall(t, &ids(&r.0)))
            .sum::<f64>()
            / nq as f64;
        let row = json!({
            "nprobe": nprobe,
            "ef": ef,
            "recall_at_k": rec,
            "qps": nq as f64 / wall,
            "p50_ms": percentile(&lat, 0.5),
            "p99_ms": percentile(&lat, 0.99),
            "p50_ms_1thread": percentile(&lat1, 0.5),
            "p99_ms_1thread": percentile(&lat1, 0.99),
        });
        eprintln!("{row}");
        ann.push(row);
    }
    let filters = filtered_searches(&store, &ts, e, k)?;
    let p = params(a);
    Ok(json!({
        "bench": "search",
        "images": n,
        "queries": nq,
        "k": k,
        "q": a.q,
        "e": e,
        "dtype": dtype.to_string(),
        "threads": rayon::current_num_threads(),
        "store_kernels": blipdex_store::kernel_path(),
        "synthetic": {"centres": synth.n_centres(), "image_noise": synth.image_noise, "query_noise": synth.query_noise, "text_noise": synth.text_noise, "aspects": synth.aspects},
        "index": {"vectors_per_image": p.vectors_per_image, "coarse_hnsw_m": p.max_nb_connection, "coarse_hnsw_ef_construction": p.ef_construction, "lists": info.lists, "segments": info.segments, "entries": info.points, "trained_rows": info.trained_rows},
        "build": build_stats,
        "open_readonly_s": open_s,
        "open_to_first_answer_s": first_answer_s,
        "ram": {
            "reader_anon_bytes_per_image_at_open": (anon_open.saturating_sub(anon_before_open)) as f64 * 1024.0 / n as f64,
            "reader_anon_bytes_per_image_after_queries": (rss_kib("RssAnon:").saturating_sub(anon_before_open)) as f64 * 1024.0 / n as f64,
            "reader_rss_mib_incl_page_cache_of_maps": rss_kib("VmRSS:") as f64 / 1024.0,
            "reader_peak_rss_mib": rss_kib("VmHWM:") as f64 / 1024.0,
        },
        "exact": {"batch_qps": exact_batch_qps, "single_query_ms": exact_single_ms},
        "ann": ann,
        "filters": filters,
    }))
}

/// Text searches under EXIF filters of known selectivity (see `Synth::photo`), through the
/// engine's ranking (`blipdex_search::rank_text`): the time to read the metadata table (once
/// per snapshot), the mean time per query, and whether each answer is the exact filtered top-k.
fn filtered_searches(
    store: &Store,
    ts: &[f32],
    e: usize,
    k: usize,
) -> anyhow::Result<serde_json::Value> {
    let day = 86_400;
    let cases = [
        (
            "camera, 1%",
            PhotoFilter {
                camera: Some("model-007".into()),
                ..Default::default()
            },
        ),
        (
            "date range, 1%",
            PhotoFilter {
                taken_after: Some(1_262_304_000 + 1000 * day),
                taken_before: Some(1_262_304_000 + 1036 * day + day / 2),
                ..Default::default()
            },
        ),
        (
            "has location, 50%",
            PhotoFilter {
                has_location: Some(true),
                ..Default::default()
            },
        ),
    ];
    let queries: Vec<&[f32]> = ts.chunks_exact(e).take(20).collect();
    // The metadata table is read from the row files once per snapshot, by the first filtered
    // search.
    let t = Instant::now();
    let images = store.photos()?.len();
    let table_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut out = vec![json!({"metadata_table_ms": table_ms, "images": images})];
    for (name, photo) in cases {
        let p = SearchParams {
            top_k: k,
            photo,
            ..SearchParams::default()
        };
        let exact = SearchParams {
            exact: true,
            ..p.clone()
        };
        let matching = store
            .photos()?
            .iter()
            .filter(|(_, m)| p.photo.matches(m.as_ref()))
            .count();
        let t = Instant::now();
        let mut answers = Vec::new();
        for q in &queries {
            answers.push(blipdex_search::rank_text(store, q, &p)?);
        }
        let mean_ms = t.elapsed().as_secs_f64() * 1e3 / queries.len() as f64;
        let mut rec = 0.0;
        for (q, got) in queries.iter().zip(&answers) {
            ensure!(got.len() == k.min(matching), "{name}: {} hits", got.len());
            let truth = blipdex_search::rank_text(store, q, &exact)?;
            let ids = |v: &[(u64, f32)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
            rec += recall(&ids(&truth), &ids(got));
        }
        let row = json!({
            "filter": name,
            "matching_images": matching,
            "query_ms": mean_ms,
            "recall_at_k_vs_exact": rec / queries.len() as f64,
        });
        eprintln!("{row}");
        out.push(row);
    }
    Ok(json!(out))
}

fn build(
    dir: &Path,
    synth: &Synth,
    n: usize,
    batch: usize,
    dtype: Dtype,
    params: HnswParams,
) -> anyhow::Result<serde_json::Value> {
    let (q, e) = (synth.q, synth.e);
    let anon_start = rss_kib("RssAnon:");
    let mut store = Store::create_or_open(
        dir,
        StoreOptions::new("bench/synthetic", q, e)
            .with_dtype(dtype)
            .with_hnsw(params),
    )?;
    let (mut t_gen, mut t_data, mut t_insert, mut t_merge) = (0.0, 0.0, 0.0, 0.0);
    let (mut slowest_commit, mut commits) = (0f64, 0usize);
    let mut anon_peak = 0;
    let started = Instant::now();
    for start in (0..n).step_by(batch) {
        let t = Instant::now();
        let recs: Vec<_> = (start..(start + batch).min(n))
            .into_par_iter()
            .map(|i| ImageRecord {
                meta: Some(synth.photo(i as u64)),
                ..synth.record(i as u64)
            })
            .collect();
        t_gen += t.elapsed().as_secs_f64();
        let mut b = Batch::new();
        for r in recs {
            b.add(r);
        }
        let t = Instant::now();
        let info = store.commit(b)?;
        slowest_commit = slowest_commit.max(t.elapsed().as_secs_f64());
        commits += 1;
        t_data += info.timings.data.as_secs_f64();
        t_insert += info.timings.index_insert.as_secs_f64();
        t_merge += info.timings.index_merge.as_secs_f64();
        let done = (start + batch).min(n);
        if commits % 256 == 0 || done == n {
            anon_peak = anon_peak.max(rss_kib("RssAnon:"));
            eprintln!(
                "committed {done} images, generation {}: index {:.1} s insert + {:.1} s merge/retrain, data {:.1} s",
                info.generation, t_insert, t_merge, t_data
            );
        }
    }
    let seconds = started.elapsed().as_secs_f64() - t_gen;
    let writer_anon = rss_kib("RssAnon:");
    drop(store);
    let mut disk: HashMap<&str, u64> = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = if name.ends_with(".parquet") {
            "parquet"
        } else if name.ends_with(".rows") {
            "rows"
        } else if name.starts_with("ivf-") {
            "ivf"
        } else {
            "other"
        };
        *disk.entry(kind).or_default() += entry.metadata()?.len();
    }
    let per = |k: &str| *disk.get(k).unwrap_or(&0) as f64 / n as f64;
    let index_s = t_insert + t_merge;
    Ok(json!({
        "seconds": seconds,
        "images_per_s": n as f64 / seconds,
        "data_s": t_data,
        "index_insert_s": t_insert,
        "index_merge_and_retrain_s": t_merge,
        "index_images_per_s": n as f64 / index_s.max(1e-9),
        "index_share_of_wall": index_s / seconds,
        "commits": commits,
        "slowest_commit_s": slowest_commit,
        "writer_anon_bytes_per_image_end": (writer_anon.saturating_sub(anon_start)) as f64 * 1024.0 / n as f64,
        "writer_anon_bytes_per_image_peak": (anon_peak.max(writer_anon).saturating_sub(anon_start)) as f64 * 1024.0 / n as f64,
        "disk_bytes_per_image": {
            "parquet": per("parquet"),
            "rows": per("rows"),
            "ivf": per("ivf"),
            "other": per("other"),
            "total": per("parquet") + per("rows") + per("ivf") + per("other"),
        },
    }))
}
