//! The search page (issue 20) in headless Chromium, driven through chromedriver's W3C WebDriver
//! API: `blipdex serve --http-listen` over an index of the fixture photos with the fixture
//! checkpoints; the test types a query, sees the thumbnails load, opens a caption, runs "more like
//! this", a date filter and browsing by date without a query, and writes a screenshot to `target/test-artifacts/browser-search.png`.
//! Without `chromedriver` (Debian: `chromium chromium-driver`) it says SKIPPED and passes, unless
//! BLIPDEX_REQUIRE_BROWSER=1.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use blipdex_search::filter::format_wall_clock;
use common::{agent, free_port, json_of, repo, s, Proc, Server};
use serde_json::{json, Value};

/// How long any one thing the page does may take to show.
const WAIT: Duration = Duration::from_secs(30);

/// A WebDriver session of a chromedriver started here; the session ends and chromedriver is
/// killed on drop.
struct Browser {
    /// `http://127.0.0.1:<port>/session/<id>`.
    base: String,
    driver_url: String,
    session: String,
    http: ureq::Agent,
    _driver: Proc,
}

impl Browser {
    fn start() -> Result<Self> {
        let port = free_port()?;
        let log = std::env::temp_dir().join(format!("blipdex-chromedriver-{port}.log"));
        let driver = Proc(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", s(&log)?))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting chromedriver")?,
        );
        let base = format!("http://127.0.0.1:{port}");
        let http = agent();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, v)) = json_of(http.get(&format!("{base}/status")).call()) {
                if v["value"]["ready"] == true {
                    break;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "chromedriver did not get ready on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900"],
        });
        if Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let (status, v) = json_of(http.post(&format!("{base}/session")).send_json(caps))?;
        ensure!(status == 200, "new session: {v}");
        let session = v["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no session id: {v}"))?
            .to_string();
        Ok(Browser {
            base: format!("{base}/session/{session}"),
            driver_url: base,
            session,
            http,
            _driver: driver,
        })
    }

    /// A WebDriver command: its `value`, or the WebDriver error as an error.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let req = self.http.request(method, &format!("{}{path}", self.base));
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let (status, v) = json_of(r)?;
        ensure!(
            status == 200,
            "{method} {path}: {status} {}: {}",
            v["value"]["error"],
            v["value"]["message"]
        );
        Ok(v["value"].clone())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    fn js(&self, script: &str, args: Value) -> Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    fn find(&self, css: &str) -> Result<String> {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        // The W3C element reference key.
        let id = v["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .with_context(|| format!("no element {css}: {v}"))?;
        Ok(id.to_string())
    }

    fn click(&self, css: &str) -> Result<()> {
        let e = self.find(css)?;
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})))
            .map(|_| ())
    }

    fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find(css)?;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .map(|_| ())
    }

    /// Presses and releases `keys` (WebDriver key codes) on whatever has the focus.
    fn press(&self, keys: &str) -> Result<()> {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|k| {
                let k = k.to_string();
                [
                    json!({"type": "keyDown", "value": k}),
                    json!({"type": "keyUp", "value": k}),
                ]
            })
            .collect();
        let seq = json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]});
        self.cmd("POST", "/actions", Some(seq)).map(|_| ())
    }

    /// Polls `probe` until it gives `Some`, for at most [`WAIT`]; the error names `what` and the
    /// last thing `seen` in the page.
    fn wait<T>(&self, what: &str, mut probe: impl FnMut(&Self) -> Result<Option<T>>) -> Result<T> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(t) = probe(self)? {
                return Ok(t);
            }
            if Instant::now() > deadline {
                let seen = self.js(SEEN, json!([]))?;
                bail!("timed out waiting for {what}; the page shows {seen:#}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&self, to: &Path) -> Result<()> {
        let v = self.cmd("GET", "/screenshot", None)?;
        let png = base64_decode(v.as_str().context("screenshot is not a string")?)?;
        std::fs::create_dir_all(to.parent().context("no parent")?)?;
        std::fs::write(to, png)?;
        println!("screenshot: {}", to.display());
        Ok(())
    }

    /// What the browser's console said (chromedriver's log extension), for failure messages.
    fn console(&self) -> String {
        self.cmd("POST", "/se/log", Some(json!({"type": "browser"})))
            .map(|v| v.to_string())
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let url = format!("{}/session/{}", self.driver_url, self.session);
        let _ = self.http.delete(&url).call();
    }
}

/// The status line and every hit as the page shows it.
const SEEN: &str = r#"
return {
  status: document.querySelector('#status').textContent,
  hits: Array.from(document.querySelectorAll('#grid .hit')).map(h => {
    const img = h.querySelector('img');
    const cap = h.querySelector('.caption');
    const time = h.querySelector('time');
    return {
      id: Number(h.dataset.imageId),
      path: h.dataset.path,
      alt: img ? img.alt : null,
      loaded: !!img && img.complete && img.naturalWidth > 0,
      caption: cap && !cap.hidden ? cap.textContent : '',
      score: (h.querySelector('.score') || {}).textContent,
      taken: time ? time.dateTime : null,
    };
  }),
};
"#;

#[derive(Debug, Clone)]
struct Hit {
    id: u64,
    name: String,
    alt: String,
    loaded: bool,
    caption: String,
    score: String,
    taken: Option<String>,
}

struct Seen {
    status: String,
    hits: Vec<Hit>,
}

fn seen(b: &Browser) -> Result<Seen> {
    let v = b.js(SEEN, json!([]))?;
    let hits = v["hits"]
        .as_array()
        .context("hits")?
        .iter()
        .map(|h| Hit {
            id: h["id"].as_u64().unwrap_or(u64::MAX),
            name: h["path"]
                .as_str()
                .map(|p| file_name(p).to_string())
                .unwrap_or_default(),
            alt: h["alt"].as_str().unwrap_or_default().to_string(),
            loaded: h["loaded"] == true,
            caption: h["caption"].as_str().unwrap_or_default().to_string(),
            score: h["score"].as_str().unwrap_or_default().to_string(),
            taken: h["taken"].as_str().map(str::to_string),
        })
        .collect();
    Ok(Seen {
        status: v["status"].as_str().unwrap_or_default().to_string(),
        hits,
    })
}

/// Standard base64 (WebDriver's screenshots).
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {:?}", c as char),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

fn file_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

/// One photo of the album's `expected.json`: its file name and camera wall-clock date, if any.
#[derive(Debug, Clone)]
struct Photo {
    name: String,
    taken: Option<String>,
}

/// The album: `tests/fixtures/photos-meta` (photos with EXIF dates, and `expected.json`).
fn album() -> Result<(PathBuf, Vec<Photo>)> {
    let dir = repo().join("tests/fixtures/photos-meta");
    let text = std::fs::read_to_string(dir.join("expected.json"))
        .with_context(|| format!("{}/expected.json", dir.display()))?;
    let v: Value = serde_json::from_str(&text)?;
    Ok((dir, photos_of(&v)?))
}

/// The photos of `expected.json`: file name -> metadata, whose `taken_at` is the camera's
/// wall clock in seconds since 1970-01-01T00:00:00 (no time zone), or null.
fn photos_of(v: &Value) -> Result<Vec<Photo>> {
    let photos: Vec<Photo> = v
        .as_object()
        .with_context(|| format!("expected.json is not an object: {v}"))?
        .iter()
        .map(|(name, meta)| Photo {
            name: name.clone(),
            taken: meta["taken_at"]
                .as_i64()
                .map(|t| format_wall_clock(t)[..10].to_string()),
        })
        .collect();
    ensure!(!photos.is_empty(), "expected.json lists no photos");
    Ok(photos)
}

#[test]
fn search_page_in_headless_chromium() -> Result<()> {
    let have_driver = Command::new("chromedriver")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_driver {
        println!(
            "SKIPPED: chromium-driver not installed (apt-get install chromium chromium-driver)"
        );
        ensure!(
            std::env::var("BLIPDEX_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "BLIPDEX_REQUIRE_BROWSER=1 but chromedriver is not installed"
        );
        return Ok(());
    }

    let (photos_dir, photos) = album()?;
    let tmp = tempfile::tempdir()?;
    let index = tmp.path().join("index");
    let o = Command::new(env!("CARGO_BIN_EXE_blipdex"))
        .args(["ingest", "--index", s(&index)?, "--model"])
        .arg(repo().join("tests/fixtures/models/itm-a"))
        .arg(&photos_dir)
        .arg("--json")
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let server_log = tmp.path().join("serve.log");
    let server = Server::start(&index, &server_log, None)?;
    let browser = Browser::start()?;
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .context("target dir")?
        .join("test-artifacts");
    let result = drive(&browser, &server, &photos);
    if let Err(e) = result {
        let shot = artifacts.join("browser-search-failed.png");
        let _ = browser.screenshot(&shot);
        let log = std::fs::read_to_string(&server_log).unwrap_or_default();
        bail!(
            "{e:#}\nbrowser console: {}\nserve log:\n{log}",
            browser.console()
        );
    }
    browser.screenshot(&artifacts.join("browser-search.png"))
}

fn drive(b: &Browser, server: &Server, photos: &[Photo]) -> Result<()> {
    let all: BTreeSet<&str> = photos.iter().map(|p| p.name.as_str()).collect();
    b.cmd(
        "POST",
        "/url",
        Some(json!({ "url": format!("{}/", server.url) })),
    )?;
    let title = b.cmd("GET", "/title", None)?;
    ensure!(
        title.as_str().is_some_and(|t| t.contains("blipdex")),
        "title {title}"
    );

    // The keyboard: `/` focuses the search box.
    b.js("document.activeElement.blur();", json!([]))?;
    b.press("/")?;
    let focused = b.js("return document.activeElement.id;", json!([]))?;
    ensure!(focused == "q", "`/` focused {focused}, not #q");

    // A query typed into the search box and Enter: every photo shows, its thumbnail loaded,
    // its file name as alt text until it is captioned.
    b.type_into("#q", "a photo\u{E007}")?;
    let first = b.wait("thumbnails of every photo", |b| {
        let s = seen(b)?;
        let names: BTreeSet<&str> = s.hits.iter().map(|h| h.name.as_str()).collect();
        Ok((names == all && s.hits.iter().all(|h| h.loaded)).then_some(s))
    })?;
    ensure!(
        first.status.contains("generation"),
        "status: {}",
        first.status
    );
    for h in &first.hits {
        ensure!(h.alt == h.name, "alt before captioning: {h:?}");
        ensure!(h.score.contains("score"), "no score on {h:?}");
    }

    // "Caption" shows the caption model's text, which becomes the alt text.
    let target = first.hits[0].clone();
    let captioned = caption_first(b)?;
    ensure!(captioned.id == target.id, "{captioned:?} vs {target:?}");
    let direct = agent()
        .post(&format!("{}/api/v1/caption", server.url))
        .send_json(json!({ "image_id": target.id }))?
        .into_json::<Value>()?;
    ensure!(
        direct["text"] == captioned.caption.as_str(),
        "the page shows {:?}, the API says {direct}",
        captioned.caption
    );

    // "More like this" on the last hit: that photo comes first (score 1).
    let last = first.hits.last().context("no hits")?.clone();
    b.click(".hit:last-child .more-btn")?;
    let like = b.wait("the photos like the last hit", |b| {
        let s = seen(b)?;
        let done = s.status.contains("like") && s.status.contains("generation");
        Ok((done && !s.hits.is_empty()).then_some(s))
    })?;
    ensure!(
        like.hits[0].id == last.id,
        "first hit {:?}, not the photo clicked {last:?}",
        like.hits[0]
    );
    ensure!(like.hits[0].score.contains("1.000"), "{:?}", like.hits[0]);

    // A date range that only some photos fall in: exactly those show, with their dates.
    let mut days: Vec<&str> = photos.iter().filter_map(|p| p.taken.as_deref()).collect();
    days.sort_unstable();
    days.dedup();
    ensure!(
        days.len() >= 3,
        "expected.json needs 3 distinct days: {photos:?}"
    );
    // About the second quarter of the days, both ends a photo's day (the bounds are inclusive).
    let (after, before) = (days[days.len() / 4], days[days.len() / 2]);
    let want: BTreeSet<&str> = photos
        .iter()
        .filter(|p| {
            p.taken
                .as_deref()
                .is_some_and(|d| after <= d && d <= before)
        })
        .map(|p| p.name.as_str())
        .collect();
    ensure!(
        !want.is_empty() && want.len() < all.len(),
        "{want:?} of {all:?}"
    );
    b.js(
        "document.querySelector('#taken-after').value = arguments[0];\
         document.querySelector('#taken-before').value = arguments[1];",
        json!([after, before]),
    )?;
    b.click("#apply")?;
    let filtered = b.wait(&format!("only {want:?} ({after}..={before})"), |b| {
        let s = seen(b)?;
        let names: BTreeSet<&str> = s.hits.iter().map(|h| h.name.as_str()).collect();
        Ok((names == want && s.hits.iter().all(|h| h.loaded)).then_some(s))
    })?;
    for h in &filtered.hits {
        let day = h.taken.as_deref().and_then(|t| t.get(..10)).unwrap_or("");
        ensure!(
            after <= day && day <= before,
            "{h:?} shows no date in {after}..={before}"
        );
    }
    // Browsing: no query, sorted by date: the same filtered photos, newest first, unscored.
    b.js(
        "document.querySelector('#q').value = '';\
         document.querySelector('#sort').value = 'date_desc';\
         document.querySelector('#search-form').requestSubmit();",
        json!([]),
    )?;
    let browsed = b.wait(&format!("browsing {want:?} newest first"), |b| {
        let s = seen(b)?;
        let names: BTreeSet<&str> = s.hits.iter().map(|h| h.name.as_str()).collect();
        Ok(
            (names == want && s.status.contains("by date") && s.hits.iter().all(|h| h.loaded))
                .then_some(s),
        )
    })?;
    ensure!(
        browsed.hits.iter().all(|h| h.score.is_empty()),
        "browsing shows no scores: {:?}",
        browsed.hits
    );
    let dates: Vec<&str> = browsed
        .hits
        .iter()
        .filter_map(|h| h.taken.as_deref())
        .collect();
    ensure!(
        dates.len() == browsed.hits.len() && dates.windows(2).all(|w| w[0] >= w[1]),
        "not newest first: {dates:?}"
    );
    // The screenshot shows a caption too.
    caption_first(b)?;
    Ok(())
}

/// Clicks the first hit's "Caption" and waits for its caption; that is its image's alt text.
fn caption_first(b: &Browser) -> Result<Hit> {
    b.click(".hit .caption-btn")?;
    let h = b.wait("a caption", |b| {
        let s = seen(b)?;
        Ok(s.hits
            .first()
            .filter(|h| !h.caption.trim().is_empty())
            .cloned())
    })?;
    ensure!(
        h.alt == h.caption,
        "alt {:?} is not the caption {:?}",
        h.alt,
        h.caption
    );
    Ok(h)
}
