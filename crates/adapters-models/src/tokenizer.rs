//! Tokenizers: Hugging Face `tokenizer.json` files, and the byte-level BPE tokenizer stored
//! in a GGUF file's metadata; plus the model's chat template.

use crate::error::{Error, Result};
use candle_core::quantized::gguf_file;
use serde::Serialize;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PaddingParams, PaddingStrategy, PreTokenizerWrapper, Tokenizer};

/// One chat message (`role` is `system`, `user` or `assistant`).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A tokenizer with the special tokens and chat template of its model.
pub struct TextTokenizer {
    /// The Hugging Face tokenizer.
    pub inner: Tokenizer,
    /// Jinja chat template, as in `tokenizer_config.json` or GGUF `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// The beginning-of-sequence token, if the model has one.
    pub bos_token: Option<String>,
    /// The end-of-sequence token, if the model has one.
    pub eos_token: Option<String>,
}

/// A batch of encoded texts, padded to the longest.
pub struct Batch {
    /// Token ids, one row per text.
    pub ids: Vec<Vec<u32>>,
    /// Segment (token type) ids.
    pub type_ids: Vec<Vec<u32>>,
    /// 1 on tokens, 0 on padding.
    pub attention_mask: Vec<Vec<u32>>,
}

impl TextTokenizer {
    /// Reads `tokenizer.json`, and `tokenizer_config.json` beside it if present (chat
    /// template, bos/eos tokens). Padding is set to the longest text of each batch.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner = Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let pad = inner.get_padding().cloned().unwrap_or_default();
        inner.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..pad }));
        let mut tok = TextTokenizer { inner, chat_template: None, bos_token: None, eos_token: None };
        let config_path = dir.join("tokenizer_config.json");
        if config_path.exists() {
            let bytes = std::fs::read(&config_path).map_err(|e| Error::file(&config_path, e))?;
            let config: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| Error::file(&config_path, format!("not valid JSON: {e}")))?;
            let token = |key: &str| match &config[key] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                _ => None,
            };
            tok.chat_template = config["chat_template"].as_str().map(String::from);
            tok.bos_token = token("bos_token");
            tok.eos_token = token("eos_token");
        }
        Ok(tok)
    }

    /// Builds the byte-level BPE tokenizer of a GGUF file (`tokenizer.ggml.model = gpt2`):
    /// digits split one by one, byte-level pre-tokenization without an added prefix space,
    /// control and user-defined tokens as special tokens.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let md = |key: &str| ct.metadata.get(key).ok_or_else(|| Error::Tokenizer(format!("GGUF metadata has no `{key}`")));
        let model = md("tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!("GGUF tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)")));
        }
        let strings = |key: &str| -> Result<Vec<String>> { md(key)?.to_vec()?.iter().map(|v| Ok(v.to_string()?.clone())).collect() };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').ok_or_else(|| Error::Tokenizer(format!("GGUF merge `{m}` has no space")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("building the GGUF BPE tokenizer: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ]))));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
        let specials: Vec<AddedToken> =
            tokens.iter().zip(&types).filter(|(_, &t)| t == 3 || t == 4).map(|(tok, _)| AddedToken::from(tok.clone(), true)).collect();
        inner.add_special_tokens(&specials);
        let token_at = |key: &str| ct.metadata.get(key).and_then(|v| v.to_u32().ok()).and_then(|id| tokens.get(id as usize).cloned());
        Ok(TextTokenizer {
            inner,
            chat_template: ct.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
            bos_token: token_at("tokenizer.ggml.bos_token_id"),
            eos_token: token_at("tokenizer.ggml.eos_token_id"),
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (chat template, bos/eos) into
    /// `dir`, the layout [`TextTokenizer::from_folder`] reads.
    pub fn save_folder(&self, dir: &Path) -> Result<()> {
        let json = self.inner.to_string(true).map_err(|e| Error::Tokenizer(format!("serialising the tokenizer: {e}")))?;
        adapters_core::io::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let config = serde_json::json!({
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        });
        let json = serde_json::to_string_pretty(&config).expect("JSON values serialise");
        adapters_core::io::write_atomic(&dir.join("tokenizer_config.json"), json.as_bytes())?;
        Ok(())
    }

    /// Token ids of one text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(format!("tokenizing: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of one text, and whether the tokenizer's own truncation (`truncation` in
    /// tokenizer.json) cut it.
    pub fn encode_noting_cut(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, bool)> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(format!("tokenizing: {e}")))?;
        Ok((enc.get_ids().to_vec(), !enc.get_overflowing().is_empty()))
    }

    /// The most tokens the tokenizer keeps of a text (`truncation.max_length` in
    /// tokenizer.json), if it cuts texts at all.
    pub fn max_length(&self) -> Option<usize> {
        self.inner.get_truncation().map(|t| t.max_length)
    }

    /// Encodes several texts (with special tokens), padded to the longest.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Batch> {
        let encs = self.inner.encode_batch(texts.to_vec(), true).map_err(|e| Error::Tokenizer(format!("tokenizing: {e}")))?;
        Ok(Batch {
            ids: encs.iter().map(|e| e.get_ids().to_vec()).collect(),
            type_ids: encs.iter().map(|e| e.get_type_ids().to_vec()).collect(),
            attention_mask: encs.iter().map(|e| e.get_attention_mask().to_vec()).collect(),
        })
    }

    /// The text of token ids.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(format!("decoding: {e}")))
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Renders messages with the model's chat template.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Tokenizer("this model has no chat template; drop --chat and pass the prompt as is".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let failed = |what: &str, e: minijinja::Error| Error::Tokenizer(format!("{what}: {e}"));
        env.add_template("chat", template).map_err(|e| failed("the model's chat template does not parse", e))?;
        let rendered = env
            .get_template("chat")
            .map_err(|e| failed("the model's chat template does not parse", e))?
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(|e| failed("rendering the chat template", e))?;
        Ok(rendered)
    }
}

/// `ids` cut to `max_length`, keeping the closing special token (`[SEP]`) where
/// `keep_last`.
pub fn truncate_ids(mut ids: Vec<u32>, max_length: usize, keep_last: bool) -> Vec<u32> {
    if ids.len() > max_length && max_length > 0 {
        let last = ids[ids.len() - 1];
        ids.truncate(max_length);
        if keep_last {
            ids[max_length - 1] = last;
        }
    }
    ids
}
