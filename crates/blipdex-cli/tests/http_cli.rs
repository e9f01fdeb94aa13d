//! `blipdex serve --http-listen` end to end: the OpenAPI document is valid OpenAPI (checked by
//! `openapi-spec-validator`, pip-installed on demand), the token guards the API but not the
//! page, and `blipdex search` takes the same EXIF filters as the API and answers the same.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use common::{agent, json_of, python_with, repo, s, Server};
use serde_json::{json, Value};

fn names(v: &Value) -> BTreeSet<String> {
    v["hits"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|h| h["path"].as_str())
                .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn openapi_document_is_valid_and_cli_filters_match_the_api() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let index = tmp.path().join("index");
    let fixtures = repo().join("tests/fixtures");
    let o = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args(["ingest", "--index", s(&index)?, "--model"])
        .arg(fixtures.join("models/itm-a"))
        .arg(fixtures.join("photos-meta"))
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let server = Server::start(&index, &tmp.path().join("serve.log"), Some("tok3n"))?;
    let http = agent();

    // The document, validated against the OpenAPI 3.1 schema.
    let (code, doc) = json_of(http.get(&format!("{}/openapi.json", server.url)).call())?;
    ensure!(code == 200, "{doc}");
    let path = tmp.path().join("openapi.json");
    std::fs::write(&path, serde_json::to_vec(&doc)?)?;
    let (py, deps) = python_with(
        "pydeps-openapi",
        "openapi_spec_validator",
        "openapi-spec-validator",
    )?;
    let v = Command::new(py)
        .args([
            "-c",
            "import json, sys\n\
             from openapi_spec_validator import validate\n\
             validate(json.load(open(sys.argv[1])))\n\
             print('valid')",
        ])
        .arg(&path)
        .env("PYTHONPATH", deps)
        .output()?;
    ensure!(
        v.status.success() && String::from_utf8_lossy(&v.stdout).contains("valid"),
        "openapi-spec-validator: {}",
        String::from_utf8_lossy(&v.stderr)
    );

    // The token guards the API, not the page or health.
    let (code, body) = json_of(
        http.post(&format!("{}/api/v1/search/text", server.url))
            .send_json(json!({"query": "a photo"})),
    )?;
    ensure!(
        code == 401 && body["error"]["code"] == "UNAUTHENTICATED",
        "{code} {body}"
    );
    let page = http.get(&format!("{}/", server.url)).call()?;
    ensure!(page.header("content-security-policy").is_some());
    ensure!(page.into_string()?.contains("<html"));

    // The CLI's filters, the API's filters: the same photos.
    let api = |filters: Value| -> Result<BTreeSet<String>> {
        let (code, body) = json_of(
            http.post(&format!("{}/api/v1/search/text", server.url))
                .set("Authorization", "Bearer tok3n")
                .send_json(json!({"query": "a photo", "top_k": 50, "filters": filters})),
        )?;
        ensure!(code == 200, "{body}");
        Ok(names(&body))
    };
    let cli = |flags: &[&str]| -> Result<BTreeSet<String>> {
        let o = Command::new(env!("CARGO_BIN_EXE_blipdex"))
            .args(["search", "--index", s(&index)?, "--model"])
            .arg(fixtures.join("models/itm-a"))
            .args(["--query", "a photo", "--top-k", "50", "--json"])
            .args(flags)
            .output()?;
        ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Ok(names(
            &serde_json::from_slice(&o.stdout).context("search --json")?,
        ))
    };
    for (flags, filters) in [
        (
            vec![
                "--taken-after",
                "2017-01-01",
                "--taken-before",
                "2019-12-31",
            ],
            json!({"taken_after": "2017-01-01", "taken_before": "2019-12-31"}),
        ),
        (vec!["--camera", "nikon"], json!({"camera": "nikon"})),
        (
            vec!["--has-location", "true"],
            json!({"has_location": true}),
        ),
        (
            vec!["--near", "-33.87,151.21,30"],
            json!({"near": {"lat": -33.87, "lon": 151.21, "radius_km": 30}}),
        ),
    ] {
        let (a, c) = (api(filters.clone())?, cli(&flags)?);
        ensure!(!a.is_empty(), "{filters}: nothing matched");
        ensure!(a == c, "{filters}: API {a:?}, CLI {c:?}");
    }
    // A bad date is refused before the model loads, naming the flag.
    let o = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args(["search", "--index", s(&index)?, "--model"])
        .arg(fixtures.join("models/itm-a"))
        .args(["--query", "a photo", "--taken-after", "last summer"])
        .output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(!o.status.success() && err.contains("taken_after"), "{err}");
    Ok(())
}
