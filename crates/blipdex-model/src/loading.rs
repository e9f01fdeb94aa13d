//! Where a checkpoint's files come from: a local directory in Hugging Face layout, or a hub repo
//! id resolved through hf-hub's cache (`HF_HOME`, `HF_HUB_OFFLINE`, revision).

use std::path::{Path, PathBuf};

use blipdex_core::{Error, Result};

/// Files of the checkpoint that blipdex may read; all but config and weights are optional.
const OPTIONAL_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
];

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// A resolved checkpoint: one directory holding `config.json`, the safetensors weights and
/// whatever tokenizer/processor files the checkpoint ships.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user asked for (a path or `owner/name[@revision]`), for messages and fingerprints.
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    /// Hub revision when the model came from the hub.
    pub revision: Option<String>,
}

impl ModelFiles {
    /// `spec` is a directory, or a hub repo id (`Salesforce/blip2-itm-vit-g`).
    pub fn resolve(spec: &str, revision: Option<&str>) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        if path.exists() {
            return Err(Error::bad_model(
                spec,
                "is a file; pass the checkpoint directory (the one holding config.json)",
            ));
        }
        if looks_like_repo_id(spec) {
            let hub = Self::from_hub(spec, revision.unwrap_or("main"));
            // `models/itm-x` with a local `models/`: most likely a mistyped path, not a repo.
            let first = path.components().next().map(|c| c.as_os_str());
            let local_parent = first.is_some_and(|f| Path::new(f).is_dir());
            return match hub {
                Err(e) if local_parent => Err(Error::bad_model(
                    spec,
                    format!(
                        "no such directory (in {}), and as a Hugging Face repo id it failed too: \
                         {e}",
                        std::env::current_dir().map_or_else(
                            |_| "the current directory".into(),
                            |d| d.display().to_string()
                        )
                    ),
                )),
                other => other,
            };
        }
        Err(Error::bad_model(
            spec,
            "no such directory, and not a Hugging Face repo id (owner/name)",
        ))
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        let name = dir.display().to_string();
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::bad_model(
                &name,
                "no config.json: not a Hugging Face checkpoint directory \
                 (expected config.json + model.safetensors, as save_pretrained writes them)",
            ));
        }
        let weights = if dir.join(INDEX).is_file() {
            shards_from_index(dir, &dir.join(INDEX), &name)?
        } else if dir.join(SINGLE).is_file() {
            vec![dir.join(SINGLE)]
        } else {
            return Err(Error::bad_model(
                &name,
                "no model.safetensors or model.safetensors.index.json \
                 (PyTorch .bin weights are not supported: re-save with safe_serialization=True)",
            ));
        };
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            config,
            weights,
            revision: None,
        })
    }

    fn from_hub(repo_id: &str, revision: &str) -> Result<Self> {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
            .unwrap_or(false);
        let repo = hf_hub::Repo::with_revision(
            repo_id.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        );
        let hub = if offline {
            Hub::Cache(hf_hub::Cache::from_env().repo(repo))
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .map_err(|e| Error::Hub {
                    repo: repo_id.to_string(),
                    file: String::new(),
                    reason: e.to_string(),
                })?;
            Hub::Api(api.repo(repo))
        };
        let fetch = |file: &str| hub.fetch(repo_id, file);
        let config = fetch("config.json")?;
        let weights = match fetch(INDEX) {
            Ok(index) => {
                let shards = shard_names(&index, repo_id)?;
                let mut out = Vec::with_capacity(shards.len());
                for shard in shards {
                    out.push(fetch(&shard)?);
                }
                out
            }
            Err(_) => vec![fetch(SINGLE)?],
        };
        for file in OPTIONAL_FILES {
            if let Err(e) = fetch(file) {
                tracing::debug!("{repo_id}: optional {file} not fetched: {e}");
            }
        }
        Ok(Self {
            name: format!("{repo_id}@{revision}"),
            dir: parent(&config)?,
            config,
            weights,
            revision: Some(revision.to_string()),
        })
    }

    /// A file of the checkpoint directory, if present.
    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let p = self.dir.join(name);
        p.is_file().then_some(p)
    }

    /// Identity of the checkpoint's content: blake3 over config.json and every weight file, so
    /// the same weights fetched from the hub or copied to a directory fingerprint alike, and any
    /// other checkpoint differs. Stored with every index so embeddings of two models never mix.
    pub fn fingerprint(&self) -> Result<String> {
        let mut h = blake3::Hasher::new();
        let mut files = vec![self.config.clone()];
        files.extend(self.weights.iter().cloned());
        for f in &files {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            h.update(name.as_bytes());
            h.update_mmap_rayon(f).map_err(|e| Error::io(f, e))?;
        }
        Ok(format!("blake3:{}", h.finalize().to_hex()))
    }

    pub fn read_config(&self) -> Result<String> {
        std::fs::read_to_string(&self.config).map_err(|e| Error::io(&self.config, e))
    }
}

/// hf-hub's cache alone (`HF_HUB_OFFLINE`) or its API (cache first, then download).
enum Hub {
    Cache(hf_hub::CacheRepo),
    Api(hf_hub::api::sync::ApiRepo),
}

impl Hub {
    fn fetch(&self, repo_id: &str, file: &str) -> Result<PathBuf> {
        let err = |reason: String| Error::Hub {
            repo: repo_id.to_string(),
            file: file.to_string(),
            reason,
        };
        match self {
            Hub::Cache(cache) => cache.get(file).ok_or_else(|| {
                err(
                    "not in the local cache and HF_HUB_OFFLINE is set; download it once \
                     online, or pass a local directory"
                        .into(),
                )
            }),
            Hub::Api(api) => api.get(file).map_err(|e| {
                err(format!(
                    "{e}; check the network or set HF_HUB_OFFLINE=1 to use the cache, \
                     or pass a local checkpoint directory"
                ))
            }),
        }
    }
}

fn parent(p: &Path) -> Result<PathBuf> {
    p.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::bad_model(p.display(), "file has no parent directory"))
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

fn shard_names(index: &Path, model: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_model(model, format!("{}: {e}", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::bad_model(model, format!("{} has no weight_map", index.display())))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn shards_from_index(dir: &Path, index: &Path, model: &str) -> Result<Vec<PathBuf>> {
    shard_names(index, model)?
        .into_iter()
        .map(|n| {
            let p = dir.join(&n);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::bad_model(
                    model,
                    format!("shard {n} listed in {INDEX} is missing"),
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("Salesforce/blip2-itm-vit-g"));
        assert!(!looks_like_repo_id("./nope"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("plain"));
    }

    #[test]
    fn missing_dir_is_a_clear_error() {
        let e = ModelFiles::resolve("/definitely/not/here", None).unwrap_err();
        assert!(e.to_string().contains("no such directory"), "{e}");
    }
}
