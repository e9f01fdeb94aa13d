//! Helpers shared by the CLI tests that start real peers: Python packages installed on
//! demand, and an S3-compatible server (moto) on 127.0.0.1.
#![allow(dead_code)]

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn s(p: &Path) -> Result<&str> {
    p.to_str().context("utf-8 path")
}

/// An S3 server on 127.0.0.1, stopped on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
    py: String,
    deps: PathBuf,
}

impl Moto {
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// With moto's own settings, e.g. `INITIAL_NO_AUTH_ACTION_COUNT=0` to check signatures.
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Self> {
        let (py, deps) = python_with("pydeps-moto", "moto.server, boto3", "moto[server]")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&py)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("PYTHONPATH", &deps)
            .envs(settings.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let moto = Moto {
            child,
            port,
            py,
            deps,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "moto did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(moto)
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// Runs boto3 code with `s3` a client of this server.
    pub fn boto(&self, code: &str) -> Result<String> {
        let prelude = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', \
             aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n",
            self.port
        );
        let o = Command::new(&self.py)
            .args(["-c", &(prelude + code)])
            .env("PYTHONPATH", &self.deps)
            .output()?;
        ensure!(
            o.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Creates the buckets `photos` and `idx` and uploads every file of `folder` (not its
    /// subfolders) as `photos/album/<name>`: the photos are then `s3://photos/album`.
    pub fn upload_album(&self, folder: &Path) -> Result<()> {
        self.boto(&format!(
            "import os\ns3.create_bucket(Bucket='photos')\ns3.create_bucket(Bucket='idx')\n\
             for n in sorted(os.listdir('{0}')):\n\
             \x20   p = os.path.join('{0}', n)\n\
             \x20   if os.path.isfile(p): s3.upload_file(p, 'photos', 'album/' + n)\n",
            s(folder)?
        ))
        .map(|_| ())
    }

    pub fn keys(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let out = self.boto(&format!(
            "p = s3.get_paginator('list_objects_v2')\n\
             for page in p.paginate(Bucket='{bucket}', Prefix='{prefix}'):\n\
             \x20   for o in page.get('Contents', []): print(o['Key'])\n"
        ))?;
        Ok(out.lines().map(str::to_string).collect())
    }

    pub fn blipdex(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(env!("CARGO_BIN_EXE_blipdex"))
            .args(args)
            .envs(self.env())
            .output()?)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// python3 (or $PYTHON) and a folder under `target/` on PYTHONPATH where `import {imports}`
/// works: `package` is pip-installed there when it does not.
pub fn python_with(folder: &str, imports: &str, package: &str) -> Result<(String, PathBuf)> {
    let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let deps = repo().join("target").join(folder);
    let works = || {
        Command::new(&py)
            .args(["-c", &format!("import {imports}")])
            .env("PYTHONPATH", &deps)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works() {
        let st = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&deps)
            .arg(package)
            .status()?;
        ensure!(
            st.success() && works(),
            "pip install {package} into {deps:?} failed"
        );
    }
    Ok((py, deps))
}

/// Content hash -> sorted paths of every live image.
pub fn contents(index: &Path) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
    let store = blipdex_store::Store::open_readonly(index)?;
    Ok(store
        .iter()
        .map(|r| {
            let mut p = r.paths.clone();
            p.sort();
            (r.content_hash, p)
        })
        .collect())
}

/// The one local copy of an object-store index that a command made under `cache`.
pub fn copy_under(cache: &Path) -> Result<PathBuf> {
    Ok(std::fs::read_dir(cache)?
        .next()
        .context("no copy under the cache folder")??
        .path()
        .join("read"))
}

impl Moto {
    /// (path, ITC score) of every image of `index` (an exact search with the fixture model),
    /// copying an object-store index under `cache`.
    pub fn scores(&self, index: &str, cache: &Path) -> Result<Vec<(String, f64)>> {
        let model = repo().join("tests/fixtures/models/itm-a");
        let o = self.blipdex(&[
            "search",
            "--index",
            index,
            "--cache-dir",
            s(cache)?,
            "--model",
            s(&model)?,
            "--query",
            "a rocket on a launch pad",
            "--top-k",
            "100",
            "--exact",
            "--json",
        ])?;
        ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout);
        let last = text.lines().last().context("no output")?;
        Ok(hit_scores(&serde_json::from_str(last)?))
    }
}

/// (path, ITC score) of each hit of `search --json` output, by path.
pub fn hit_scores(search: &serde_json::Value) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = search["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            (
                h["path"].as_str().unwrap_or_default().to_string(),
                h["itc_score"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

/// The JSON body of a call, also of a non-2xx answer (WebDriver and API errors are JSON).
pub fn json_of(r: std::result::Result<ureq::Response, ureq::Error>) -> Result<(u16, Value)> {
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => return Err(e.into()),
    };
    let status = resp.status();
    let text = resp.into_string()?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v))
}

/// `blipdex serve` with the HTTP API on a free port, killed on drop.
pub struct Server {
    _proc: Proc,
    pub url: String,
}

impl Server {
    /// With the fixture checkpoints (caption-a for captions); `token` sets BLIPDEX_AUTH_TOKEN.
    pub fn start(index: &Path, log: &Path, token: Option<&str>) -> Result<Self> {
        let fixtures = repo().join("tests/fixtures");
        let (grpc, http) = (free_port()?, free_port()?);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_blipdex"));
        match token {
            Some(t) => cmd.env("BLIPDEX_AUTH_TOKEN", t),
            None => cmd.env_remove("BLIPDEX_AUTH_TOKEN"),
        };
        let mut child = cmd
            .args(["serve", "--index", s(index)?, "--model"])
            .arg(fixtures.join("models/itm-a"))
            .arg("--caption-model")
            .arg(fixtures.join("models/caption-a"))
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .stdout(Stdio::null())
            .stderr(File::create(log)?)
            .spawn()?;
        let url = format!("http://127.0.0.1:{http}");
        let http_agent = agent();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = child.try_wait()? {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                bail!("blipdex serve exited ({st}) before serving:\n{log}");
            }
            if let Ok((200, v)) = json_of(http_agent.get(&format!("{url}/api/v1/health")).call()) {
                if v["status"] == "serving" {
                    break;
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                let _ = child.kill();
                bail!("blipdex serve never said serving on {url}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Server {
            _proc: Proc(child),
            url,
        })
    }
}
