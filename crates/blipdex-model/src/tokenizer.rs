//! Text tokenization as transformers' tokenizers do it, on top of the `tokenizers` crate.
//!
//! Two families are supported, matching what BLIP-2 checkpoints ship:
//! * BERT WordPiece (the Q-Former / retrieval tokenizer): `tokenizer.json`, or `vocab.txt` alone.
//! * GPT-2 byte-level BPE as OPT uses it (the captioning language model): `tokenizer.json`, or
//!   `vocab.json` + `merges.txt`.
//!
//! `tokenizer_config.json` (and, for older checkpoints, `special_tokens_map.json`) supplies the
//! special tokens, padding/truncation side, `add_bos_token`/`add_eos_token` and the
//! `added_tokens_decoder` table, interpreted as transformers 5 does.

use std::collections::BTreeMap;
use std::path::Path;

use blipdex_core::{Error, Result};
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, ModelWrapper, PostProcessor, Tokenizer, TruncationDirection};

/// Token ids and attention masks of a batch, padded to its longest sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
}

/// A tokenizer configured like the checkpoint's transformers tokenizer.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    padding_left: bool,
    truncation_left: bool,
    model_max_length: Option<usize>,
    clean_up_tokenization_spaces: bool,
    source: String,
}

/// Which vocabulary files a tokenizer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `tokenizer.json`
    Json,
    /// `vocab.txt`
    WordPiece,
    /// `vocab.json` + `merges.txt`
    Bpe,
}

/// A special token as written in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn added_token_from(v: &Value, default_special: bool) -> Option<AddedToken> {
    let content = token_content(v)?;
    let mut t = AddedToken::from(content, default_special);
    if let Value::Object(o) = v {
        let flag = |k: &str| o.get(k).and_then(Value::as_bool);
        if let Some(s) = flag("special") {
            t.special = s;
            t.normalized = !s;
        }
        t.single_word = flag("single_word").unwrap_or(false);
        t.lstrip = flag("lstrip").unwrap_or(false);
        t.rstrip = flag("rstrip").unwrap_or(false);
        if let Some(n) = flag("normalized") {
            t.normalized = n;
        }
    }
    Some(t)
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        Error::bad_model(
            path.display(),
            format!("invalid JSON ({e}); fix or re-download it"),
        )
    })?;
    if !value.is_object() {
        return Err(Error::bad_model(
            path.display(),
            "expected a JSON object; fix or re-download it",
        ));
    }
    Ok(Some(value))
}

fn tok_err(what: &str) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::Tokenizer(format!("{what}: {e}"))
}

/// Settings read from `tokenizer_config.json` (+ `special_tokens_map.json`).
struct Config {
    map: serde_json::Map<String, Value>,
}

impl Config {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }
    fn bool_or(&self, key: &str, default: bool) -> bool {
        self.get(key).and_then(Value::as_bool).unwrap_or(default)
    }
    fn token(&self, key: &str) -> Option<String> {
        self.get(key).and_then(token_content)
    }
    fn side_is_left(&self, key: &str, file: &str) -> Result<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::String(s)) if s == "right" => Ok(false),
            Some(Value::String(s)) if s == "left" => Ok(true),
            Some(v) => Err(Error::bad_model(
                file,
                format!("\"{key}\" must be \"left\" or \"right\", found {v}"),
            )),
        }
    }
}

impl TextTokenizer {
    /// Load from a model directory: `tokenizer.json` if present; else `vocab.txt` (BERT
    /// WordPiece); else `vocab.json` + `merges.txt` (GPT-2/OPT byte-level BPE). Settings come from
    /// `tokenizer_config.json` (and `special_tokens_map.json` for keys it lacks).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let source = dir.display().to_string();
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg_file = cfg_path.display().to_string();
        let mut map = match read_json(&cfg_path)? {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        if let Some(Value::Object(stm)) = read_json(&dir.join("special_tokens_map.json"))? {
            for (k, v) in stm {
                if map.get(&k).is_none_or(Value::is_null) {
                    map.insert(k, v);
                }
            }
        }
        let cfg = Config { map };

        let json = dir.join("tokenizer.json");
        let vocab_txt = dir.join("vocab.txt");
        let (vocab_json, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let (kind, mut tokenizer) = if json.is_file() {
            let mut t = Tokenizer::from_file(&json).map_err(|e| {
                Error::bad_model(
                    json.display(),
                    format!("cannot load tokenizer.json ({e}); fix or re-download it"),
                )
            })?;
            t.with_padding(None);
            t.with_truncation(None)
                .map_err(tok_err("disabling truncation"))?;
            (Kind::Json, t)
        } else if vocab_txt.is_file() {
            (Kind::WordPiece, build_wordpiece(&vocab_txt, &cfg)?)
        } else if vocab_json.is_file() && merges.is_file() {
            (Kind::Bpe, build_bpe(&vocab_json, &merges, &cfg)?)
        } else {
            return Err(Error::bad_model(
                &source,
                "no tokenizer found: looked for tokenizer.json, vocab.txt (BERT WordPiece) and \
                 vocab.json + merges.txt (GPT-2/OPT BPE); download the tokenizer files into \
                 this directory",
            ));
        };

        // Family, for transformers' class defaults.
        let class = cfg
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .unwrap_or("");
        let is_bert = kind == Kind::WordPiece || class.starts_with("Bert");
        let is_gpt2 = kind == Kind::Bpe || class.starts_with("GPT2");
        let default_token = |key: &str| -> Option<String> {
            let d = if is_bert {
                match key {
                    "unk_token" => "[UNK]",
                    "sep_token" => "[SEP]",
                    "pad_token" => "[PAD]",
                    "cls_token" => "[CLS]",
                    "mask_token" => "[MASK]",
                    _ => return None,
                }
            } else if is_gpt2 {
                match key {
                    "unk_token" | "bos_token" | "eos_token" => "<|endoftext|>",
                    _ => return None,
                }
            } else {
                return None;
            };
            Some(d.to_string())
        };
        let named = |key: &str| cfg.token(key).or_else(|| default_token(key));

        // Special tokens, added as transformers' TokenizersBackend does: the added_tokens_decoder
        // table in id order, then the named special tokens, then the extra ones. Tokens already
        // in the added vocabulary are skipped by the tokenizers crate itself.
        let mut decoder_table: BTreeMap<u32, AddedToken> = BTreeMap::new();
        if let Some(Value::Object(table)) = cfg.get("added_tokens_decoder") {
            for (id, v) in table {
                let id: u32 = id.parse().map_err(|_| {
                    Error::bad_model(
                        &cfg_file,
                        format!("added_tokens_decoder key {id:?} is not a token id"),
                    )
                })?;
                let t = added_token_from(v, true).ok_or_else(|| {
                    Error::bad_model(
                        &cfg_file,
                        format!("added_tokens_decoder entry {id} has no \"content\""),
                    )
                })?;
                decoder_table.insert(id, t);
            }
        }
        let mut to_add: Vec<AddedToken> = decoder_table.values().cloned().collect();
        for key in [
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ] {
            if let Some(t) = named(key) {
                to_add.push(AddedToken::from(t, true));
            }
        }
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            let extra: Vec<&Value> = match cfg.get(key) {
                Some(Value::Array(a)) => a.iter().collect(),
                Some(Value::Object(o)) => o.values().collect(),
                _ => Vec::new(),
            };
            to_add.extend(extra.into_iter().filter_map(|v| added_token_from(v, true)));
        }
        to_add.retain(|t| !t.content.is_empty());
        tokenizer
            .add_tokens(to_add)
            .map_err(|e| Error::bad_model(&source, format!("cannot add special tokens: {e}")))?;
        for (id, t) in &decoder_table {
            let got = tokenizer.token_to_id(&t.content);
            if got != Some(*id) {
                let msg = format!(
                    "tokenizer_config.json gives {:?} the id {id} but the vocabulary gives it \
                     {got:?}; the tokenizer files do not belong together, re-download them",
                    t.content
                );
                if kind == Kind::Json {
                    tracing::warn!(dir = %source, "{msg}");
                } else {
                    return Err(Error::bad_model(&source, msg));
                }
            }
        }

        let id_of = |key: &str| named(key).and_then(|t| tokenizer.token_to_id(&t));
        let bos_id = id_of("bos_token");
        let eos_id = id_of("eos_token");

        // Post-processor (which special tokens `encode` adds).
        let bert_template = is_bert && (kind == Kind::WordPiece || class.starts_with("Bert"));
        if bert_template {
            let cls = named("cls_token").unwrap_or_else(|| "[CLS]".into());
            let sep = named("sep_token").unwrap_or_else(|| "[SEP]".into());
            let missing = |t: &str| {
                Error::bad_model(
                    &source,
                    format!("the special token {t:?} is not in the vocabulary"),
                )
            };
            let cls_id = tokenizer.token_to_id(&cls).ok_or_else(|| missing(&cls))?;
            let sep_id = tokenizer.token_to_id(&sep).ok_or_else(|| missing(&sep))?;
            let tp = template(
                &format!("{cls}:0 $A:0 {sep}:0"),
                &format!("{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1"),
                vec![(cls, cls_id), (sep, sep_id)],
            )?;
            tokenizer.with_post_processor(Some(tp));
        } else {
            let explicit = cfg.get("add_bos_token").is_some() || cfg.get("add_eos_token").is_some();
            if explicit || kind == Kind::Bpe || tokenizer.get_post_processor().is_none() {
                let bos = named("bos_token").zip(bos_id);
                let eos = named("eos_token").zip(eos_id);
                let bos = bos.filter(|_| cfg.bool_or("add_bos_token", false));
                let eos = eos.filter(|_| cfg.bool_or("add_eos_token", false));
                let part = |t: &Option<(String, u32)>, type_id: u32, tail: bool| {
                    t.as_ref().map_or(String::new(), |(s, _)| {
                        if tail {
                            format!(" {s}:{type_id}")
                        } else {
                            format!("{s}:{type_id} ")
                        }
                    })
                };
                let single = format!("{}$A:0{}", part(&bos, 0, false), part(&eos, 0, true));
                let pair = format!(
                    "{single} {}$B:1{}",
                    part(&bos, 1, false),
                    part(&eos, 1, true)
                );
                let specials: Vec<(String, u32)> = bos.into_iter().chain(eos).collect();
                let tp = template(&single, &pair, specials)?;
                tokenizer.with_post_processor(Some(tp));
            }
        }

        let pad_id = match named("pad_token").and_then(|t| tokenizer.token_to_id(&t)) {
            Some(id) => id,
            None => {
                let fallback = eos_id.unwrap_or(0);
                tracing::warn!(
                    dir = %source,
                    "tokenizer has no padding token; padding with id {fallback} (masked out)"
                );
                fallback
            }
        };
        let model_max_length = cfg
            .get("model_max_length")
            .and_then(Value::as_u64)
            .filter(|&m| m < 1 << 40)
            .map(|m| m as usize);
        let is_bpe_model = matches!(tokenizer.get_model(), ModelWrapper::BPE(_));
        Ok(Self {
            pad_id,
            bos_id,
            eos_id,
            padding_left: cfg.side_is_left("padding_side", &cfg_file)?,
            truncation_left: cfg.side_is_left("truncation_side", &cfg_file)?,
            model_max_length,
            // transformers 5 skips this clean-up for BPE models (it would corrupt them).
            clean_up_tokenization_spaces: cfg.bool_or("clean_up_tokenization_spaces", false)
                && !is_bpe_model,
            tokenizer,
            source,
        })
    }

    /// Number of special tokens `encode_batch` adds to each text.
    pub fn num_special_tokens(&self) -> usize {
        self.tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false))
    }

    /// Encode texts with special tokens and pad them to the longest (pad id, mask 0) on the
    /// tokenizer's padding side. With `max_len`, each sequence is truncated to at most `max_len`
    /// tokens including the special tokens (on the tokenizer's truncation side), as transformers'
    /// `truncation=True, max_length=max_len` does. Empty strings are fine; an empty batch is not.
    pub fn encode_batch(&self, texts: &[&str], max_len: Option<usize>) -> Result<Encoded> {
        if texts.is_empty() {
            return Err(Error::InvalidArgument(
                "no texts to tokenize: pass at least one text".into(),
            ));
        }
        let n_special = self.num_special_tokens();
        let budget = match max_len {
            None => None,
            Some(m) if m == 0 || m < n_special => {
                return Err(Error::InvalidArgument(format!(
                    "max length {m} is too small: each text needs room for its {n_special} \
                     special token(s); use at least {}",
                    n_special.max(1)
                )))
            }
            Some(m) => Some(m - n_special),
        };
        let direction = if self.truncation_left {
            TruncationDirection::Left
        } else {
            TruncationDirection::Right
        };
        let mut rows = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let what = format!("encoding text {i}");
            let mut enc = self
                .tokenizer
                .encode(*text, false)
                .map_err(tok_err(&what))?;
            if let Some(b) = budget {
                enc.truncate(b, 0, direction);
            }
            let enc = self
                .tokenizer
                .post_process(enc, None, true)
                .map_err(tok_err(&what))?;
            let ids = enc.get_ids().to_vec();
            if max_len.is_none() {
                if let Some(limit) = self.model_max_length.filter(|&l| ids.len() > l) {
                    tracing::warn!(
                        tokenizer = %self.source,
                        "text {i} has {} tokens, more than the model's maximum of {limit}",
                        ids.len()
                    );
                }
            }
            rows.push(ids);
        }
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut input_ids = Vec::with_capacity(rows.len());
        let mut attention_mask = Vec::with_capacity(rows.len());
        for ids in rows {
            let n = ids.len();
            let pad = longest - n;
            let (mut row, mut mask) = (Vec::with_capacity(longest), Vec::with_capacity(longest));
            if self.padding_left {
                row.extend(std::iter::repeat_n(self.pad_id, pad));
                mask.extend(std::iter::repeat_n(0, pad));
            }
            row.extend_from_slice(&ids);
            mask.extend(std::iter::repeat_n(1, n));
            if !self.padding_left {
                row.extend(std::iter::repeat_n(self.pad_id, pad));
                mask.extend(std::iter::repeat_n(0, pad));
            }
            input_ids.push(row);
            attention_mask.push(mask);
        }
        Ok(Encoded {
            input_ids,
            attention_mask,
        })
    }

    /// Token ids of `text` without special tokens (transformers' `add_special_tokens=False`).
    pub fn encode_no_special(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(tok_err("encoding text"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids back to text, as transformers' `decode` (unknown ids are skipped).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(tok_err("decoding"))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// Id used to pad batches.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Id of the beginning-of-sequence token, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Id of the end-of-sequence token, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether batches are padded on the left (decoder-only language models) or right.
    pub fn padding_left(&self) -> bool {
        self.padding_left
    }

    /// The id of a token (including added/special tokens).
    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.tokenizer.token_to_id(tok)
    }

    /// `model_max_length` from the config, when it is a real limit.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// transformers' `clean_up_tokenization`.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

fn template(single: &str, pair: &str, specials: Vec<(String, u32)>) -> Result<TemplateProcessing> {
    let err = |e: String| Error::Tokenizer(format!("building the special-token template: {e}"));
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(|e| err(e.to_string()))?
        .try_pair(pair)
        .map_err(|e| err(e.to_string()))?
        .special_tokens(specials)
        .build()
        .map_err(|e| err(e.to_string()))
}

/// Lines of a vocabulary file as Python's `readlines()` + `rstrip("\n")` give them.
fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text
        .split_inclusive('\n')
        .map(|l| l.strip_suffix('\n').unwrap_or(l).to_string())
        .collect())
}

/// transformers' `BertTokenizer` built from `vocab.txt`.
fn build_wordpiece(vocab_txt: &Path, cfg: &Config) -> Result<Tokenizer> {
    let what = vocab_txt.display().to_string();
    let lines = read_lines(vocab_txt)?;
    if lines.is_empty() {
        return Err(Error::bad_model(
            &what,
            "vocab.txt is empty; re-download it",
        ));
    }
    let vocab: Vocab = lines
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    let unk = cfg.token("unk_token").unwrap_or_else(|| "[UNK]".into());
    if !vocab.contains_key(&unk) {
        return Err(Error::bad_model(
            &what,
            format!("the unknown token {unk:?} is not in vocab.txt; re-download it"),
        ));
    }
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token(unk)
        .continuing_subword_prefix("##".into())
        .max_input_chars_per_word(100)
        .build()
        .map_err(|e| Error::bad_model(&what, format!("invalid WordPiece vocabulary: {e}")))?;
    let strip_accents = cfg.get("strip_accents").and_then(Value::as_bool);
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::new(
        true,
        cfg.bool_or("tokenize_chinese_chars", true),
        strip_accents,
        cfg.bool_or("do_lower_case", true),
    )))
    .map_err(|e| Error::bad_model(&what, format!("cannot set up the BERT normalizer: {e}")))?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_decoder(Some(WordPieceDecoder::new("##".into(), true)));
    Ok(tok)
}

/// transformers' `GPT2Tokenizer` (as OPT uses it) built from `vocab.json` + `merges.txt`.
fn build_bpe(vocab_json: &Path, merges_txt: &Path, cfg: &Config) -> Result<Tokenizer> {
    let vocab_what = vocab_json.display().to_string();
    let text = std::fs::read_to_string(vocab_json).map_err(|e| Error::io(vocab_json, e))?;
    let raw: BTreeMap<String, u32> = serde_json::from_str(&text).map_err(|e| {
        Error::bad_model(
            &vocab_what,
            format!("expected a JSON object of token -> id ({e}); re-download it"),
        )
    })?;
    let vocab: Vocab = raw.into_iter().collect();
    let merges_what = merges_txt.display().to_string();
    let mut merges = Vec::new();
    for (i, line) in read_lines(merges_txt)?.into_iter().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()));
            }
            _ => {
                return Err(Error::bad_model(
                    &merges_what,
                    format!("line {} is not a merge \"a b\": {line:?}", i + 1),
                ))
            }
        }
    }
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(|e| {
            Error::bad_model(
                &merges_what,
                format!("vocab.json and merges.txt do not form a BPE model: {e}"),
            )
        })?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(ByteLevel::new(
        cfg.bool_or("add_prefix_space", false),
        true,
        true,
    )));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp_dir(tag: &str) -> PathBuf {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "blipdex-tokenizer-test-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    const BERT_VOCAB: &[&str] = &[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "on", "the", "mat", ".", "!",
        "sit", "##ting", "dog", "##s", "'", "t", "don", "cafe",
    ];

    fn bert_dir(config: Option<&str>) -> PathBuf {
        let dir = temp_dir("bert");
        std::fs::write(dir.join("vocab.txt"), BERT_VOCAB.join("\n") + "\n").expect("write");
        if let Some(c) = config {
            std::fs::write(dir.join("tokenizer_config.json"), c).expect("write");
        }
        dir
    }

    fn id(tok: &str) -> u32 {
        BERT_VOCAB.iter().position(|t| *t == tok).expect("in vocab") as u32
    }

    #[test]
    fn bert_adds_cls_sep_and_pads_right() {
        let dir = bert_dir(None);
        let t = TextTokenizer::from_model_dir(&dir).expect("load");
        let enc = t
            .encode_batch(&["A cat sitting on the mat.", "Dogs!", ""], None)
            .expect("encode");
        let (cls, sep) = (id("[CLS]"), id("[SEP]"));
        assert_eq!(
            enc.input_ids[0],
            vec![
                cls,
                id("a"),
                id("cat"),
                id("sit"),
                id("##ting"),
                id("on"),
                id("the"),
                id("mat"),
                id("."),
                sep
            ]
        );
        assert_eq!(
            enc.input_ids[1],
            vec![cls, id("dog"), id("##s"), id("!"), sep, 0, 0, 0, 0, 0]
        );
        assert_eq!(enc.attention_mask[1], vec![1, 1, 1, 1, 1, 0, 0, 0, 0, 0]);
        assert_eq!(enc.input_ids[2][..3], [cls, sep, 0]);
        assert_eq!(enc.attention_mask[2].iter().sum::<u32>(), 2);
        assert_eq!(t.pad_id(), 0);
        assert!(!t.padding_left());
        assert_eq!((t.bos_id(), t.eos_id()), (None, None));
        assert_eq!(t.num_special_tokens(), 2);
        // Lower-casing, accent stripping and unknown words.
        assert_eq!(
            t.encode_no_special("CAFÉ zebra").expect("encode"),
            vec![id("cafe"), id("[UNK]")]
        );
        // Special tokens written in the text are recognised.
        assert_eq!(
            t.encode_no_special("the [MASK]").expect("encode"),
            vec![id("the"), id("[MASK]")]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn truncation_keeps_special_tokens() {
        let dir = bert_dir(None);
        let t = TextTokenizer::from_model_dir(&dir).expect("load");
        let enc = t
            .encode_batch(&["a cat sitting on the mat", "a"], Some(4))
            .expect("encode");
        let (cls, sep) = (id("[CLS]"), id("[SEP]"));
        assert_eq!(enc.input_ids[0], vec![cls, id("a"), id("cat"), sep]);
        assert_eq!(enc.input_ids[1], vec![cls, id("a"), sep, 0]);
        let only_specials = t.encode_batch(&["a cat"], Some(2)).expect("encode");
        assert_eq!(only_specials.input_ids[0], vec![cls, sep]);
        for bad in [0, 1] {
            let err = t.encode_batch(&["a"], Some(bad)).expect_err("too small");
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        }
        let err = t.encode_batch(&[], None).expect_err("empty batch");
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_controls_case_sides_and_cleanup() {
        let dir = bert_dir(Some(
            r#"{"do_lower_case": false, "padding_side": "left", "truncation_side": "left",
                "clean_up_tokenization_spaces": true, "model_max_length": 512}"#,
        ));
        let t = TextTokenizer::from_model_dir(&dir).expect("load");
        assert!(t.padding_left());
        assert_eq!(t.model_max_length(), Some(512));
        assert_eq!(
            t.encode_no_special("Cat cat").expect("encode"),
            vec![id("[UNK]"), id("cat")]
        );
        let enc = t
            .encode_batch(&["a cat on the mat", "cat"], Some(4))
            .expect("encode");
        let (cls, sep) = (id("[CLS]"), id("[SEP]"));
        assert_eq!(enc.input_ids[0], vec![cls, id("the"), id("mat"), sep]);
        assert_eq!(enc.input_ids[1], vec![0, cls, id("cat"), sep]);
        assert_eq!(enc.attention_mask[1], vec![0, 1, 1, 1]);
        let ids = t
            .encode_batch(&["don ' t sit . the cat !"], None)
            .expect("encode")
            .input_ids
            .remove(0);
        assert_eq!(t.decode(&ids, true).expect("decode"), "don't sit. the cat!");
        assert_eq!(
            t.decode(&ids, false).expect("decode"),
            "[CLS] don't sit. the cat! [SEP]"
        );
        let bad = bert_dir(Some(r#"{"padding_side": "middle"}"#));
        let err = TextTokenizer::from_model_dir(&bad).expect_err("bad side");
        assert!(err.to_string().contains("padding_side"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&bad);
    }

    #[test]
    fn missing_files_are_a_clear_error() {
        let dir = temp_dir("empty");
        let err = TextTokenizer::from_model_dir(&dir).expect_err("no files");
        let msg = err.to_string();
        assert!(matches!(err, Error::BadModel { .. }), "{msg}");
        for needle in ["tokenizer.json", "vocab.txt", "vocab.json", "merges.txt"] {
            assert!(msg.contains(needle), "{msg}");
        }
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        // vocab.json without merges.txt is not enough either.
        std::fs::write(dir.join("vocab.json"), "{}").expect("write");
        assert!(TextTokenizer::from_model_dir(&dir).is_err());
        std::fs::write(dir.join("tokenizer.json"), "{ not json").expect("write");
        let err = TextTokenizer::from_model_dir(&dir).expect_err("bad json");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A tiny OPT-style byte-level BPE: "Ġ" is the byte-level form of a space.
    fn opt_dir() -> PathBuf {
        let dir = temp_dir("opt");
        std::fs::write(
            dir.join("vocab.json"),
            r#"{"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "c": 6, "Ġ": 7,
                "ab": 8, "Ġc": 9}"#,
        )
        .expect("write");
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b\nĠ c\n").expect("write");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"add_bos_token": true, "bos_token": "</s>", "eos_token": "</s>",
                "unk_token": "<unk>", "pad_token": "<pad>", "padding_side": "left",
                "model_max_length": 1000000000000000019884624838656,
                "added_tokens_decoder": {
                    "1": {"content": "<pad>", "special": true, "normalized": false},
                    "2": {"content": "</s>", "special": true, "normalized": false},
                    "10": {"content": "<image>", "special": true, "normalized": false,
                           "lstrip": false, "rstrip": false, "single_word": false}}}"#,
        )
        .expect("write");
        dir
    }

    #[test]
    fn opt_bpe_prepends_bos_and_pads_left() {
        let dir = opt_dir();
        let t = TextTokenizer::from_model_dir(&dir).expect("load");
        assert_eq!((t.pad_id(), t.bos_id(), t.eos_id()), (1, Some(2), Some(2)));
        assert!(t.padding_left());
        assert_eq!(t.model_max_length(), None);
        assert_eq!(t.token_to_id("<image>"), Some(10));
        let enc = t
            .encode_batch(&["ab c", "<image>ab"], None)
            .expect("encode");
        assert_eq!(enc.input_ids, vec![vec![2, 8, 9], vec![2, 10, 8]]);
        let enc = t.encode_batch(&["ab c ab", "c"], None).expect("encode");
        assert_eq!(enc.input_ids[1], vec![1, 1, 1, 2, 6]);
        assert_eq!(enc.attention_mask[1], vec![0, 0, 0, 1, 1]);
        assert_eq!(t.encode_no_special("ab c").expect("encode"), vec![8, 9]);
        assert_eq!(t.decode(&[2, 10, 8, 9], true).expect("decode"), "ab c");
        assert_eq!(
            t.decode(&[2, 10, 8, 9], false).expect("decode"),
            "</s><image>ab c"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn inconsistent_added_token_ids_are_rejected() {
        let dir = opt_dir();
        let cfg = std::fs::read_to_string(dir.join("tokenizer_config.json")).expect("read");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            cfg.replace("\"10\":", "\"50265\":"),
        )
        .expect("write");
        let err = TextTokenizer::from_model_dir(&dir).expect_err("id mismatch");
        assert!(err.to_string().contains("<image>"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cleanup_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("a , b . c ? d ! e ' f do n't i 'm it 's we 've they 're"),
            "a, b. c? d! e'f don't i'm it's we've they're"
        );
    }
}
