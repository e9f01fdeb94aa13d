//! `blipdex search`: the server's text search from the command line, through the same query
//! API (`blipdex_search::Query`): ITC ranking (ANN or exact), filters, ITM reranking of the
//! first N of the whole ranking, the page, and captions.

use anyhow::bail;
use blipdex_model::ModelFiles;
use blipdex_search::filter::format_wall_clock;
use blipdex_search::{Answer, Engine, EngineOptions, Near, PhotoFilter, Query, SearchParams};
use clap::Args;

use crate::args::ModelArgs;
use crate::caption::Quantize;

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// Index directory (built by `blipdex ingest`).
    #[arg(long, env = "BLIPDEX_INDEX")]
    pub index: String,
    #[command(flatten)]
    pub remote: crate::args::RemoteArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to look for, in words (at most 4096 bytes); empty (--query "") with --sort date_desc
    /// or date_asc browses: every photo the filters keep, by date.
    #[arg(long, env = "BLIPDEX_QUERY")]
    pub query: String,
    /// Hits to return.
    #[arg(long, env = "BLIPDEX_TOP_K", default_value_t = 10)]
    pub top_k: usize,
    /// Skip this many of the best hits (the next page: --offset 10 --top-k 10).
    #[arg(long, env = "BLIPDEX_OFFSET", default_value_t = 0)]
    pub offset: usize,
    /// Only images with a path starting with this.
    #[arg(long, env = "BLIPDEX_PATH_PREFIX")]
    pub path_prefix: Option<String>,
    /// Only hits whose ITC score is at least this.
    #[arg(long, env = "BLIPDEX_MIN_SCORE")]
    pub min_score: Option<f32>,
    /// Only photos taken at or after this time of the camera's clock (EXIF): 2019-06-01 or
    /// 2019-06-01T12:30:00.
    #[arg(long, env = "BLIPDEX_TAKEN_AFTER")]
    pub taken_after: Option<String>,
    /// Only photos taken before this time (a date alone includes that whole day).
    #[arg(long, env = "BLIPDEX_TAKEN_BEFORE")]
    pub taken_before: Option<String>,
    /// Only photos whose camera make or model contains this (case-insensitive).
    #[arg(long, env = "BLIPDEX_CAMERA")]
    pub camera: Option<String>,
    /// Only photos within a circle: LAT,LON,RADIUS_KM (decimal degrees, e.g. 59.91,10.75,25).
    #[arg(long, env = "BLIPDEX_NEAR", value_parser = parse_near, allow_hyphen_values = true)]
    pub near: Option<Near>,
    /// Only photos with (true) or without (false) a GPS location.
    #[arg(long, env = "BLIPDEX_HAS_LOCATION")]
    pub has_location: Option<bool>,
    /// Order of the hits: score (default), date_desc (newest first) or date_asc.
    #[arg(long, env = "BLIPDEX_SORT", default_value = "score")]
    pub sort: String,
    /// Rerank the first N hits of the whole ranking by ITM match probability (recomputed from
    /// the image files), then cut the page.
    #[arg(long, env = "BLIPDEX_RERANK", default_value_t = 0)]
    pub rerank: usize,
    /// Brute-force ITC over every image instead of the ANN index.
    #[arg(long, env = "BLIPDEX_EXACT")]
    pub exact: bool,
    /// ANN search breadth: images rescored exactly (larger = better recall, slower).
    #[arg(long, env = "BLIPDEX_EF", default_value_t = blipdex_store::DEFAULT_EF)]
    pub ef: usize,
    /// Caption each hit that has no stored caption with this checkpoint (a
    /// Blip2ForConditionalGeneration, e.g. Salesforce/blip2-opt-2.7b); stored captions are
    /// shown without it.
    #[arg(long, env = "BLIPDEX_CAPTION_MODEL")]
    pub caption_model: Option<String>,
    /// Store the caption model's decoder Linear weights quantized.
    #[arg(long, env = "BLIPDEX_QUANTIZE", value_enum)]
    pub quantize: Option<Quantize>,
    /// Print one JSON object: {"hits": [{image_id, path, itc_score, and itm_score, caption or
    /// error where present}]}.
    #[arg(long, env = "BLIPDEX_JSON")]
    pub json: bool,
}

fn parse_near(s: &str) -> Result<Near, String> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s:?}: {e}; write LAT,LON,RADIUS_KM"))?;
    match v[..] {
        [lat, lon, radius_km] => Ok(Near {
            lat,
            lon,
            radius_km,
        }),
        _ => Err(format!("{s:?}: write LAT,LON,RADIUS_KM (three numbers)")),
    }
}

pub fn run(args: &SearchArgs) -> anyhow::Result<()> {
    let photo = PhotoFilter::parse(
        args.taken_after.as_deref().unwrap_or(""),
        args.taken_before.as_deref().unwrap_or(""),
        args.camera.as_deref().unwrap_or(""),
        args.near,
        args.has_location,
    )?;
    let query = Query::text(
        args.query.clone(),
        SearchParams {
            top_k: args.top_k,
            offset: args.offset,
            exact: args.exact,
            ef: args.ef,
            path_prefix: args.path_prefix.clone(),
            min_score: args.min_score,
            photo,
            sort: args.sort.parse()?,
        },
        args.rerank,
        args.caption_model.is_some(),
    );
    // The query's own rules (limits, a blank query) before minutes of model loading.
    query.validate(args.caption_model.is_some())?;
    let (index, _) = args.remote.local_index(&args.index)?;
    let mut opts = EngineOptions::new(&index, args.model.resolve()?);
    opts.load = args.model.load_options()?;
    opts.caption_model = args
        .caption_model
        .as_deref()
        .map(|c| ModelFiles::resolve(c, None))
        .transpose()?;
    opts.caption_storage = Quantize::storage(args.quantize);
    let engine = Engine::load(&opts)?;
    let out = match engine.answer_one(query)? {
        Answer::Hits { hits, .. } => hits,
        Answer::Caption(_) => bail!("a search was answered with a caption"),
    };

    if args.json {
        let hits: Vec<serde_json::Value> = out
            .iter()
            .map(|h| {
                let mut v = serde_json::json!({
                    "image_id": h.image_id,
                    "path": h.path,
                    "itc_score": h.itc_score,
                });
                let photo = h.photo.clone().unwrap_or_default();
                for (k, val) in [
                    ("itm_score", h.itm_score.map(serde_json::Value::from)),
                    ("caption", h.caption.clone().map(serde_json::Value::from)),
                    ("error", h.error.clone().map(serde_json::Value::from)),
                    (
                        "taken_at",
                        photo.taken_at.map(|t| format_wall_clock(t).into()),
                    ),
                    ("camera", photo.camera().map(serde_json::Value::from)),
                    ("latitude", photo.gps_lat.map(serde_json::Value::from)),
                    ("longitude", photo.gps_lon.map(serde_json::Value::from)),
                ] {
                    if let Some(val) = val {
                        v[k] = val;
                    }
                }
                v
            })
            .collect();
        println!("{}", serde_json::json!({ "hits": hits }));
    } else {
        for (rank, h) in out.iter().enumerate() {
            let itm = h
                .itm_score
                .map(|p| format!("  itm {p:.4}"))
                .unwrap_or_default();
            let err = h
                .error
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default();
            let caption = h
                .caption
                .as_deref()
                .map(|c| format!("\n       {c}"))
                .unwrap_or_default();
            let photo = h.photo.clone().unwrap_or_default();
            let when = photo
                .taken_at
                .map(|t| format!("  {}", format_wall_clock(t)))
                .unwrap_or_default();
            println!(
                "{:>3}. {:.4}{itm}  {}{when}{err}{caption}",
                args.offset + rank + 1,
                h.itc_score,
                h.path
            );
        }
    }
    Ok(())
}
