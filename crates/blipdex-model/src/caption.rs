//! Captions and visual question answering with `Blip2ForConditionalGeneration` (OPT language
//! models): `language_projection` of the Q-Former output, the OPT decoder, and transformers'
//! greedy and beam search, token for token.
//!
//! Input assembly follows transformers 5: `[Q projected queries] + [BOS] + [prompt tokens]`, left
//! padded per batch (`[queries][padding][BOS prompt]`, as `Blip2Processor` lays it out). With
//! `image_token_index` the processor writes Q `<image>` tokens whose embeddings are replaced;
//! older configs prepend the queries. Both give the same sequence, so both are handled alike.
//! Lengths count the way transformers 5 counts them: the Q query positions, BOS and the prompt
//! are all part of `max_length`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use blipdex_core::{Error, Result};

use crate::blip2::{open_weights, read_config, terr, LoadOptions};
use crate::config::Blip2Config;
use crate::loading::ModelFiles;
use crate::opt::{LinearStorage, OptConfig, OptForCausalLM, TokenIds};

/// transformers' model-agnostic default: 20 new tokens when no length is configured.
const DEFAULT_MAX_NEW_TOKENS: usize = 20;
/// transformers' stand-in for "impossible" beam scores.
const BEAM_NEG: f32 = -1.0e9;

/// `early_stopping` of a generation config (beam search only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `false` (the default): stop when the best running beam, at its current length, cannot
    /// beat the worst finished hypothesis.
    #[default]
    Heuristic,
    /// `true`: stop as soon as `num_beams` hypotheses are finished.
    Eager,
    /// `"never"`: the canonical criterion (best running beam at `max_length` when the length
    /// penalty is positive).
    Never,
}

/// Decoding settings, as transformers' `GenerationConfig` has them (greedy and beam search).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Total length, counting the Q query positions, BOS and the prompt. `max_new_tokens` wins.
    pub max_length: Option<usize>,
    pub max_new_tokens: Option<usize>,
    /// Total length below which EOS is forbidden. `min_new_tokens` wins.
    pub min_length: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub num_beams: usize,
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// The subset of `generation_config.json` blipdex reads; anything that would change the decoding
/// in ways not implemented here is refused rather than ignored.
#[derive(Debug, Default, Deserialize)]
struct RawGenerationConfig {
    max_length: Option<usize>,
    max_new_tokens: Option<usize>,
    min_length: Option<usize>,
    min_new_tokens: Option<usize>,
    num_beams: Option<usize>,
    length_penalty: Option<f64>,
    early_stopping: Option<serde_json::Value>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<u32>,
    do_sample: Option<bool>,
    num_return_sequences: Option<usize>,
    num_beam_groups: Option<usize>,
    repetition_penalty: Option<f64>,
    no_repeat_ngram_size: Option<usize>,
    bad_words_ids: Option<serde_json::Value>,
    forced_bos_token_id: Option<u32>,
    forced_eos_token_id: Option<serde_json::Value>,
    suppress_tokens: Option<serde_json::Value>,
    begin_suppress_tokens: Option<serde_json::Value>,
}

impl GenerationConfig {
    /// transformers' defaults with the language model's special tokens.
    pub fn for_text_config(text: &OptConfig) -> Self {
        Self {
            max_length: None,
            max_new_tokens: None,
            min_length: None,
            min_new_tokens: None,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            bos_token_id: text.bos_token_id,
            eos_token_ids: text.eos_token_ids(),
            pad_token_id: text.pad_token_id,
        }
    }

    /// `generation_config.json` of the checkpoint directory if there is one, else the defaults.
    /// Special tokens missing from the file come from the language model's config.
    pub fn from_model_dir(dir: &Path, text: &OptConfig) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::for_text_config(text));
        }
        let json = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&json, text).map_err(|reason| Error::bad_model(path.display(), reason))
    }

    pub fn from_json_str(json: &str, text: &OptConfig) -> std::result::Result<Self, String> {
        let raw: RawGenerationConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let mut unsupported = Vec::new();
        if raw.do_sample == Some(true) {
            unsupported.push("do_sample=true (only greedy and beam search are implemented)");
        }
        if raw.num_return_sequences.is_some_and(|n| n > 1) {
            unsupported.push("num_return_sequences>1");
        }
        if raw.num_beam_groups.is_some_and(|n| n > 1) {
            unsupported.push("num_beam_groups>1 (diverse beam search)");
        }
        if raw.repetition_penalty.is_some_and(|p| p != 1.0) {
            unsupported.push("repetition_penalty");
        }
        if raw.no_repeat_ngram_size.is_some_and(|n| n > 0) {
            unsupported.push("no_repeat_ngram_size");
        }
        let set = |v: &Option<serde_json::Value>| v.as_ref().is_some_and(|v| !v.is_null());
        if set(&raw.bad_words_ids)
            || raw.forced_bos_token_id.is_some()
            || set(&raw.forced_eos_token_id)
        {
            unsupported.push("bad_words_ids / forced_bos_token_id / forced_eos_token_id");
        }
        if set(&raw.suppress_tokens) || set(&raw.begin_suppress_tokens) {
            unsupported.push("suppress_tokens / begin_suppress_tokens");
        }
        if !unsupported.is_empty() {
            return Err(format!(
                "unsupported generation settings: {}",
                unsupported.join(", ")
            ));
        }
        let early_stopping = match raw.early_stopping {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {
                EarlyStopping::Heuristic
            }
            Some(serde_json::Value::Bool(true)) => EarlyStopping::Eager,
            Some(serde_json::Value::String(s)) if s == "never" => EarlyStopping::Never,
            Some(other) => {
                return Err(format!(
                    "early_stopping must be true, false or \"never\", not {other}"
                ))
            }
        };
        let defaults = Self::for_text_config(text);
        let cfg = Self {
            max_length: raw.max_length,
            max_new_tokens: raw.max_new_tokens,
            min_length: raw.min_length,
            min_new_tokens: raw.min_new_tokens,
            num_beams: raw.num_beams.unwrap_or(1),
            length_penalty: raw.length_penalty.unwrap_or(1.0),
            early_stopping,
            bos_token_id: raw.bos_token_id.or(defaults.bos_token_id),
            eos_token_ids: raw
                .eos_token_id
                .map_or(defaults.eos_token_ids, |e| e.to_vec()),
            pad_token_id: raw.pad_token_id.or(defaults.pad_token_id),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that do not depend on the input.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_beams == 0 {
            return Err("num_beams must be at least 1".into());
        }
        if self.max_new_tokens == Some(0) {
            return Err("max_new_tokens must be at least 1".into());
        }
        if !self.length_penalty.is_finite() {
            return Err("length_penalty must be finite".into());
        }
        Ok(())
    }
}

/// Lengths and tokens of one `generate` call, resolved as transformers resolves them.
#[derive(Debug, Clone)]
struct Plan {
    prompt_len: usize,
    max_length: usize,
    min_length: usize,
    eos: Vec<u32>,
    /// Token for finished rows (greedy): `pad_token_id`, else the first EOS.
    pad: Option<u32>,
}

/// `language_projection` + the OPT language model of a `Blip2ForConditionalGeneration` /
/// `Blip2Model` checkpoint.
pub struct LanguageHead {
    pub language_projection: Linear,
    pub language_model: OptForCausalLM,
    pub num_query_tokens: usize,
    /// `<image>` placeholder id of transformers 5 configs; the sequence is the same without it.
    pub image_token_index: Option<u32>,
    /// The activations' dtype: the checkpoint's as loaded, or f32 where bf16/f16 weights are
    /// packed for the CPU (see `OptForCausalLM::compute_in_f32`).
    dtype: DType,
    device: Device,
}

impl LanguageHead {
    /// Build from a VarBuilder at the checkpoint root (keys `language_projection.*`,
    /// `language_model.model.decoder.*`, `language_model.lm_head.weight`), float weights.
    pub fn new(cfg: &Blip2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_storage(cfg, LinearStorage::Float, vb)
    }

    /// As [`LanguageHead::new`], with the decoder's Linear weights stored as `storage` says.
    pub fn with_storage(
        cfg: &Blip2Config,
        storage: LinearStorage,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let text = text_config(cfg).map_err(candle_core::Error::Msg)?;
        let mut language_projection = candle_nn::linear(
            cfg.qformer_config.hidden_size,
            text.hidden_size,
            vb.pp("language_projection"),
        )?;
        let mut language_model = OptForCausalLM::new(&text, storage, vb.pp("language_model"))?;
        let mut dtype = vb.dtype();
        if language_model.compute_in_f32()? {
            let p = &language_projection;
            let bias = p.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
            language_projection = candle_nn::Linear::new(p.weight().to_dtype(DType::F32)?, bias);
            dtype = DType::F32;
        }
        Ok(Self {
            language_projection,
            language_model,
            num_query_tokens: cfg.num_query_tokens,
            image_token_index: cfg.image_token_index,
            dtype,
            device: vb.device().clone(),
        })
    }

    /// Load the language side of a checkpoint, with errors that say what is wrong.
    pub fn load(files: &ModelFiles, opts: &LoadOptions, storage: LinearStorage) -> Result<Self> {
        let cfg = read_config(files, opts)?;
        text_config(&cfg).map_err(Error::Unsupported)?;
        let vb = open_weights(files, opts)?;
        if !vb.contains_tensor("language_projection.weight") {
            return Err(Error::Unsupported(format!(
                "{} has no language model weights (no language_projection); captions need a \
                 Blip2ForConditionalGeneration checkpoint such as Salesforce/blip2-opt-2.7b",
                files.name
            )));
        }
        Self::with_storage(&cfg, storage, vb).map_err(|e| {
            Error::bad_model(
                &files.name,
                format!("language model weights do not fit config.json: {e}"),
            )
        })
    }

    pub fn config(&self) -> &OptConfig {
        &self.language_model.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `language_projection(qformer_features)`: [N, Q, hidden_size] in the model dtype.
    pub fn language_model_inputs(&self, qformer_features: &Tensor) -> Result<Tensor> {
        let run = || -> candle_core::Result<Tensor> {
            let q = qformer_features
                .to_device(&self.device)?
                .to_dtype(self.dtype)?;
            blipdex_kernels::profile::span("language_projection", &self.device, || {
                self.language_projection.forward(&q)
            })
        };
        run().map_err(terr)
    }

    /// `Blip2Model.get_text_features` for OPT: the decoder's last hidden state [M, T, D] of
    /// text-only input. `input_ids` u32 [M, T]; `attention_mask` [M, T] of 0/1.
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let run = || -> candle_core::Result<Tensor> {
            let ids = input_ids.to_device(&self.device)?;
            let embeds = self.language_model.embed(&ids)?;
            self.language_model.decoder.forward(
                &embeds,
                attention_mask,
                &mut self.language_model.new_cache(),
            )
        };
        run().map_err(terr)
    }

    /// Logits of text-only input [M, T, vocab] (`OPTForCausalLM` on `input_ids`).
    pub fn text_logits(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let run = || -> candle_core::Result<Tensor> {
            let ids = input_ids.to_device(&self.device)?;
            let embeds = self.language_model.embed(&ids)?;
            self.language_model.forward(
                &embeds,
                attention_mask,
                &mut self.language_model.new_cache(),
            )
        };
        run().map_err(terr)
    }

    /// `Blip2ForConditionalGeneration.forward` logits [N, L, vocab] for images and prompts, and
    /// the attention mask [N, L] (u32) of the assembled input. `prompts[i]` are the prompt's
    /// token ids without special tokens (BOS is added here); empty means no prompt.
    pub fn forward(
        &self,
        qformer_features: &Tensor,
        prompts: &[Vec<u32>],
    ) -> Result<(Tensor, Tensor)> {
        let (embeds, mask) = self.assemble(qformer_features, prompts)?;
        let mask = mask_tensor(&mask, &self.device)?;
        let logits = self
            .language_model
            .forward(&embeds, &mask, &mut self.language_model.new_cache())
            .map_err(terr)?;
        Ok((logits, mask))
    }

    /// Caption / answer: the new token ids per image (without the prompt), exactly as
    /// transformers' `generate` returns them: in a batch, rows that end early are filled with
    /// the pad token after their EOS. `prompts[i]` as in [`LanguageHead::forward`].
    pub fn generate(
        &self,
        qformer_features: &Tensor,
        prompts: &[Vec<u32>],
        gen: &GenerationConfig,
    ) -> Result<Vec<Vec<u32>>> {
        gen.validate().map_err(Error::InvalidArgument)?;
        let (embeds, mask) = self.assemble(qformer_features, prompts)?;
        let plan = self.plan(mask.first().map_or(0, Vec::len), gen)?;
        if gen.num_beams == 1 {
            self.greedy(&embeds, mask, &plan).map_err(terr)
        } else {
            self.beam_search(&embeds, mask, &plan, gen).map_err(terr)
        }
    }

    /// [queries][left padding][BOS prompt] embeddings and their 0/1 mask rows.
    fn assemble(
        &self,
        qformer_features: &Tensor,
        prompts: &[Vec<u32>],
    ) -> Result<(Tensor, Vec<Vec<u32>>)> {
        let cfg = self.config();
        let n = qformer_features.dim(0).map_err(terr)?;
        if prompts.len() != n {
            return Err(Error::InvalidArgument(format!(
                "{} prompts for {n} images: give one (possibly empty) prompt per image",
                prompts.len()
            )));
        }
        if n == 0 {
            return Err(Error::InvalidArgument("no images to caption".into()));
        }
        if cfg.word_embed_proj_dim() != cfg.hidden_size {
            // transformers 5.23 scatters hidden_size-wide queries into word_embed_proj_dim-wide
            // embeddings there, which is not a meaningful model.
            return Err(Error::Unsupported(format!(
                "OPT with word_embed_proj_dim {} != hidden_size {}: the projected queries do not fit \
                 the token embeddings (transformers cannot caption with it either)",
                cfg.word_embed_proj_dim(),
                cfg.hidden_size
            )));
        }
        let bos = cfg
            .bos_token_id
            .ok_or_else(|| Error::bad_model("language model", "text_config has no bos_token_id"))?;
        let vocab = cfg.vocab_size as u32;
        if let Some(bad) = prompts.iter().flatten().find(|&&t| t >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "prompt token id {bad} is outside the vocabulary ({vocab} tokens)"
            )));
        }
        let pad = cfg.pad_token_id.unwrap_or(bos);
        let text_len = prompts.iter().map(Vec::len).max().unwrap_or(0) + 1;
        let q = self.num_query_tokens;
        let mut ids = Vec::with_capacity(n * text_len);
        let mut mask = Vec::with_capacity(n);
        for p in prompts {
            let padding = text_len - 1 - p.len();
            ids.extend(std::iter::repeat_n(pad, padding));
            ids.push(bos);
            ids.extend_from_slice(p);
            let mut row = vec![1u32; q];
            row.extend(std::iter::repeat_n(0, padding));
            row.extend(std::iter::repeat_n(1, text_len - padding));
            mask.push(row);
        }
        let lang = self.language_model_inputs(qformer_features)?;
        let run = || -> candle_core::Result<Tensor> {
            let (_, lq, _) = lang.dims3()?;
            if lq != q {
                candle_core::bail!(
                    "Q-Former features have {lq} queries, the config says num_query_tokens = {q}"
                );
            }
            let ids = Tensor::from_vec(ids, (n, text_len), &self.device)?;
            let text = self.language_model.embed(&ids)?;
            Tensor::cat(&[&lang, &text], 1)
        };
        Ok((run().map_err(terr)?, mask))
    }

    /// transformers' `_prepare_generated_length` / `_validate_generated_length` for an input of
    /// `prompt_len` positions (queries + padding + BOS + prompt).
    fn plan(&self, prompt_len: usize, gen: &GenerationConfig) -> Result<Plan> {
        let max_positions = self.language_model.decoder.max_positions();
        let max_length = match (gen.max_new_tokens, gen.max_length) {
            (Some(new), _) => prompt_len + new,
            (None, Some(total)) => total,
            // The default is 20 new tokens, capped by the position table.
            (None, None) => (prompt_len + DEFAULT_MAX_NEW_TOKENS).min(max_positions),
        };
        if prompt_len >= max_length {
            return Err(Error::InvalidArgument(format!(
                "the input is {prompt_len} positions ({} query tokens + BOS + prompt) but max_length is \
                 {max_length}; set max_new_tokens instead",
                self.num_query_tokens
            )));
        }
        // The last token is never fed back, so max_length - 1 positions need embeddings.
        if max_length - 1 > max_positions {
            return Err(Error::InvalidArgument(format!(
                "{prompt_len} input positions + {} new tokens exceed the language model's \
                 max_position_embeddings ({max_positions})",
                max_length - prompt_len
            )));
        }
        let min_length = match (gen.min_new_tokens, gen.min_length) {
            (Some(new), _) => prompt_len + new,
            (None, Some(total)) => total,
            (None, None) => 0,
        };
        let eos = gen.eos_token_ids.clone();
        let pad = gen.pad_token_id.or_else(|| eos.first().copied());
        Ok(Plan {
            prompt_len,
            max_length,
            min_length,
            eos,
            pad,
        })
    }

    /// transformers' `_sample` without sampling.
    fn greedy(
        &self,
        embeds: &Tensor,
        mut mask: Vec<Vec<u32>>,
        plan: &Plan,
    ) -> candle_core::Result<Vec<Vec<u32>>> {
        let lm = &self.language_model;
        let n = mask.len();
        let has_eos = !plan.eos.is_empty();
        let mut cache = lm.new_cache();
        let mut logits =
            lm.forward_last(embeds, &mask_tensor_c(&mask, &self.device)?, &mut cache)?;
        let mut out = vec![Vec::new(); n];
        let mut unfinished = vec![true; n];
        let mut cur_len = plan.prompt_len;
        loop {
            let mut scores = logits.to_vec2::<f32>()?;
            for (i, row) in scores.iter_mut().enumerate() {
                if cur_len < plan.min_length {
                    forbid(row, &plan.eos);
                }
                let tok = match plan.pad {
                    Some(pad) if has_eos && !unfinished[i] => pad,
                    _ => argmax(row),
                };
                out[i].push(tok);
            }
            cur_len += 1;
            for (i, u) in unfinished.iter_mut().enumerate() {
                let last = out[i].last().copied().unwrap_or_default();
                if cur_len >= plan.max_length || plan.eos.contains(&last) {
                    *u = false;
                }
            }
            if !unfinished.iter().any(|&u| u) {
                return Ok(out);
            }
            for row in &mut mask {
                row.push(1);
            }
            let next: Vec<u32> = out
                .iter()
                .map(|r| r.last().copied().unwrap_or_default())
                .collect();
            let ids = Tensor::from_vec(next, (n, 1), &self.device)?;
            logits = lm.forward_last(
                &lm.embed(&ids)?,
                &mask_tensor_c(&mask, &self.device)?,
                &mut cache,
            )?;
        }
    }

    /// transformers' `_beam_search` (the vectorized one of transformers ≥ 4.50), item by item
    /// on the host: top `max(2, 1 + #eos) * num_beams` continuations, the best `num_beams`
    /// unfinished ones run on, the finished ones among the first `num_beams` enter the
    /// hypotheses with score `sum logprob / new_len ** length_penalty`.
    fn beam_search(
        &self,
        embeds: &Tensor,
        mask: Vec<Vec<u32>>,
        plan: &Plan,
        gen: &GenerationConfig,
    ) -> candle_core::Result<Vec<Vec<u32>>> {
        let lm = &self.language_model;
        let (n, k) = (mask.len(), gen.num_beams);
        let keep = 2usize.max(1 + plan.eos.len()) * k;
        let lp = gen.length_penalty;
        let denom = |new_len: usize| (new_len as f64).powf(lp) as f32;

        let mut cache = lm.new_cache();
        let first = lm.forward_last(embeds, &mask_tensor_c(&mask, &self.device)?, &mut cache)?;
        // Every beam starts as a copy of its item; only beam 0 scores 0 so that the first step
        // does not pick the same token k times.
        let expand: Vec<u32> = (0..n as u32)
            .flat_map(|i| std::iter::repeat_n(i, k))
            .collect();
        let expand = Tensor::from_vec(expand, n * k, &self.device)?;
        cache.select_rows(&expand)?;
        let mut logits = first.index_select(&expand, 0)?;
        let mut mask: Vec<Vec<u32>> = mask
            .iter()
            .flat_map(|r| std::iter::repeat_n(r.clone(), k))
            .collect();

        let mut running: Vec<Vec<(f32, Vec<u32>)>> = (0..n)
            .map(|_| {
                (0..k)
                    .map(|j| (if j == 0 { 0.0 } else { BEAM_NEG }, Vec::new()))
                    .collect()
            })
            .collect();
        let mut finished: Vec<Vec<(f32, Vec<u32>)>> = vec![Vec::new(); n];
        let mut open = vec![true; n]; // transformers' is_early_stop_heuristic_unsatisfied
        let mut cur_len = plan.prompt_len;
        loop {
            let rows = logits.to_vec2::<f32>()?;
            let mut all_hit = true;
            let mut sources = Vec::with_capacity(n * k);
            for b in 0..n {
                let mut cands: Vec<(f32, usize, u32)> = Vec::with_capacity(k * keep);
                for (j, beam) in running[b].iter().enumerate() {
                    let mut row = log_softmax(&rows[b * k + j]);
                    if cur_len < plan.min_length {
                        forbid(&mut row, &plan.eos);
                    }
                    for (tok, s) in top_n(&row, keep) {
                        cands.push((s + beam.0, j, tok));
                    }
                }
                // torch.topk over beam * vocab + token, best first.
                let vocab = rows[b * k].len();
                cands.sort_by(|x, y| {
                    y.0.total_cmp(&x.0)
                        .then((x.1 * vocab + x.2 as usize).cmp(&(y.1 * vocab + y.2 as usize)))
                });
                cands.truncate(keep);
                let hits: Vec<bool> = cands
                    .iter()
                    .map(|c| plan.eos.contains(&c.2) || cur_len + 1 >= plan.max_length)
                    .collect();
                all_hit &= hits.iter().all(|&h| h);

                let full = finished[b].len() == k;
                if open[b] && !(full && gen.early_stopping == EarlyStopping::Eager) {
                    let d = denom(cur_len + 1 - plan.prompt_len);
                    for (c, _) in cands.iter().zip(&hits).take(k).filter(|(_, &h)| h) {
                        let mut tokens = running[b][c.1].1.clone();
                        tokens.push(c.2);
                        finished[b].push((c.0 / d, tokens));
                    }
                    finished[b].sort_by(|x, y| y.0.total_cmp(&x.0));
                    finished[b].truncate(k);
                }

                // The best `k` continuations that did not stop run on (transformers gives the
                // stopped ones -1e9, which only matters when all of them stopped: max_length).
                let order: Vec<usize> = (0..cands.len())
                    .filter(|&i| !hits[i])
                    .chain((0..cands.len()).filter(|&i| hits[i]))
                    .take(k)
                    .collect();
                let next: Vec<(f32, Vec<u32>)> = order
                    .iter()
                    .map(|&i| {
                        let c = cands[i];
                        let mut tokens = running[b][c.1].1.clone();
                        tokens.push(c.2);
                        let score = if hits[i] { c.0 + BEAM_NEG } else { c.0 };
                        (score, tokens)
                    })
                    .collect();
                sources.extend(order.iter().map(|&i| (b * k + cands[i].1) as u32));
                running[b] = next;
            }
            cur_len += 1;
            for b in 0..n {
                if !open[b] || finished[b].len() < k {
                    continue;
                }
                let len = match gen.early_stopping {
                    EarlyStopping::Never if lp > 0.0 => plan.max_length - plan.prompt_len,
                    _ => cur_len - plan.prompt_len,
                };
                let best_running = running[b][0].0 / denom(len);
                let worst_finished = finished[b]
                    .iter()
                    .map(|f| f.0)
                    .fold(f32::INFINITY, f32::min);
                open[b] = best_running > worst_finished;
            }
            let all_full = finished.iter().all(|f| f.len() == k);
            let stop = !open.iter().any(|&o| o)
                || (all_full && gen.early_stopping == EarlyStopping::Eager)
                || all_hit;
            if stop {
                break;
            }
            let sources = Tensor::from_vec(sources, n * k, &self.device)?;
            cache.select_rows(&sources)?;
            for row in &mut mask {
                row.push(1);
            }
            let next: Vec<u32> = running
                .iter()
                .flat_map(|beams| {
                    beams
                        .iter()
                        .map(|(_, t)| t.last().copied().unwrap_or_default())
                })
                .collect();
            let ids = Tensor::from_vec(next, (n * k, 1), &self.device)?;
            logits = lm.forward_last(
                &lm.embed(&ids)?,
                &mask_tensor_c(&mask, &self.device)?,
                &mut cache,
            )?;
        }

        let mut best: Vec<Vec<u32>> = (0..n)
            .map(|b| {
                finished[b]
                    .first()
                    .or_else(|| running[b].first())
                    .map(|(_, t)| t.clone())
                    .unwrap_or_default()
            })
            .collect();
        // transformers fills the static output with `pad_token_id or eos_token_id[0]`.
        let fill = match (plan.pad, plan.eos.first()) {
            (Some(p), _) if p != 0 => p,
            (_, Some(&e)) => e,
            (p, None) => p.unwrap_or_default(),
        };
        let width = best.iter().map(Vec::len).max().unwrap_or(0);
        for row in &mut best {
            row.resize(width, fill);
        }
        Ok(best)
    }
}

/// The OPT config of a BLIP-2 config's `text_config`, or why captions cannot use it.
pub fn text_config(cfg: &Blip2Config) -> std::result::Result<OptConfig, String> {
    let text = cfg.text_config.as_ref().ok_or_else(|| {
        "this checkpoint has no language model (no text_config); captions need a \
         Blip2ForConditionalGeneration checkpoint such as Salesforce/blip2-opt-2.7b"
            .to_string()
    })?;
    let mut opt = OptConfig::from_value(text).map_err(|e| format!("text_config: {e}"))?;
    opt.kernels = cfg.kernels;
    Ok(opt)
}

/// Tokens of a generated row up to and including its first EOS: what one image generated on
/// its own (transformers pads rows that finish early in a batch).
pub fn trim_after_eos<'a>(tokens: &'a [u32], eos: &[u32]) -> &'a [u32] {
    match tokens.iter().position(|t| eos.contains(t)) {
        Some(i) => &tokens[..=i],
        None => tokens,
    }
}

fn mask_tensor(rows: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
    mask_tensor_c(rows, dev).map_err(terr)
}

fn mask_tensor_c(rows: &[Vec<u32>], dev: &Device) -> candle_core::Result<Tensor> {
    let l = rows.first().map_or(0, Vec::len);
    Tensor::from_vec(rows.concat(), (rows.len(), l), dev)
}

fn forbid(row: &mut [f32], ids: &[u32]) {
    for &e in ids {
        if let Some(x) = row.get_mut(e as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// First index of the maximum, as `torch.argmax`.
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax` in f32 as PyTorch computes it: x - max - log(sum(exp(x - max))).
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    let lse = sum.ln();
    row.iter().map(|&x| x - max - lse).collect()
}

/// The `n` best (token, score) of a row, best first, lower token first on ties.
fn top_n(row: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if n < idx.len() {
        idx.select_nth_unstable_by(n, cmp);
        idx.truncate(n);
    }
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, row[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt() -> OptConfig {
        OptConfig::from_value(&serde_json::json!({"model_type": "opt"}))
            .expect("default OPT config")
    }

    #[test]
    fn generation_config_defaults_and_overrides() {
        let g = GenerationConfig::from_json_str(
            r#"{"eos_token_id": [2, 50118], "num_beams": 5, "early_stopping": "never"}"#,
            &opt(),
        )
        .expect("parses");
        assert_eq!(g.eos_token_ids, vec![2, 50118]);
        assert_eq!(g.num_beams, 5);
        assert_eq!(g.early_stopping, EarlyStopping::Never);
        assert_eq!(g.pad_token_id, Some(1));
        assert_eq!(g.bos_token_id, Some(2));
        let e = GenerationConfig::from_json_str(r#"{"do_sample": true}"#, &opt())
            .expect_err("sampling is refused");
        assert!(e.contains("do_sample"), "{e}");
    }

    #[test]
    fn top_n_and_argmax_prefer_the_first_index_on_ties() {
        let row = [1.0, 3.0, 3.0, -1.0, 2.0];
        assert_eq!(argmax(&row), 1);
        assert_eq!(top_n(&row, 3), vec![(1, 3.0), (2, 3.0), (4, 2.0)]);
        assert_eq!(trim_after_eos(&[5, 2, 1, 1], &[2]), &[5, 2]);
        assert_eq!(trim_after_eos(&[5, 6], &[2]), &[5, 6]);
    }

    #[test]
    fn non_opt_language_models_are_refused() {
        let e = OptConfig::from_value(&serde_json::json!({"model_type": "t5"}))
            .expect_err("T5 is refused");
        assert!(e.contains("OPT"), "{e}");
    }
}
