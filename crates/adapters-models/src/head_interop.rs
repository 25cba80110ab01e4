//! Classification heads as AdapterHub and PEFT keep them in their adapter folders, both
//! ways, computed as those libraries compute them.
//!
//! - AdapterHub (`save_adapter(..., with_head=True)`): `head_config.json` beside the
//!   adapter and `model_head.safetensors` (or the pickle `pytorch_model_head.bin`) with
//!   keys `heads.NAME.I.weight`, `I` the module's index in the head's `nn.Sequential`:
//!   `[Dropout, Linear, activation]` per hidden layer, then `[Dropout, Linear]`. It reads
//!   the first token on encoders (or BERT's pooler, `use_pooler`) and the last on decoders.
//! - PEFT (`task_type = "SEQ_CLS"`): transformers' own classifier, saved among
//!   `modules_to_save` in `adapter_model.safetensors`: `base_model.model.classifier.*` on
//!   BERT (`BertForSequenceClassification`: on the pooler output) and
//!   `base_model.model.score.weight` on Llama (`LlamaForSequenceClassification`: the last
//!   token, no bias). PEFT folders keep no label names: they read as `LABEL_0`, `LABEL_1`,
//!   ... as transformers names them.

use crate::error::{Error, Result};
use crate::heads::{ClassificationHead, HeadShape, Pooling};
use crate::saved_heads::{HeadConfig, SavedHead};
use crate::Backbone;
use adapters_core::io::{read_json, read_tensors, save_tensors_atomic, write_atomic, CONFIG_FILE, WEIGHTS_FILE};
use adapters_core::Activation;
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// AdapterHub's head configuration file.
pub const ADAPTERHUB_HEAD_CONFIG: &str = "head_config.json";
/// AdapterHub's head weights (`use_safetensors=True`).
pub const ADAPTERHUB_HEAD_WEIGHTS: &str = "model_head.safetensors";
/// AdapterHub's default head weights (a PyTorch pickle, read without running it).
pub const ADAPTERHUB_HEAD_PICKLE: &str = "pytorch_model_head.bin";
/// The fields of AdapterHub 1.3.0's `ClassificationHead` config.
const ADAPTERHUB_HEAD_FIELDS: &[&str] =
    &["head_type", "num_labels", "layers", "activation_function", "use_pooler", "bias", "label2id", "dropout_prob"];
/// The modules PEFT saves for a `SEQ_CLS` adapter (`modules_to_save`).
pub const PEFT_CLASSIFIERS: [&str; 2] = ["classifier", "score"];
const PEFT_PREFIX: &str = "base_model.model.";

/// transformers' label names where a file gives none.
fn default_labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("LABEL_{i}")).collect()
}

/// AdapterHub's flexible-head model class for this backbone, and its `model_type`;
/// an error for an architecture AdapterHub 1.3.0 does not support.
fn adapterhub_class(model: &Backbone) -> Result<(&'static str, String)> {
    let architecture = adapters_core::InsertionPoint::model_info(model).architecture;
    let class = match architecture.as_str() {
        "bert" => "BertAdapterModel",
        "roberta" => "RobertaAdapterModel",
        "xlm-roberta" => "XLMRobertaAdapterModel",
        "distilbert" => "DistilBertAdapterModel",
        "llama" => "LlamaAdapterModel",
        "mistral" => "MistralAdapterModel",
        other => {
            return Err(Error::Unsupported(format!(
                "AdapterHub 1.3.0 has no model with heads for `{other}`; keep the head in our format or PEFT's"
            )))
        }
    };
    Ok((class, architecture))
}

/// The index of each linear layer in AdapterHub's `nn.Sequential`: the hidden ones, then
/// the output layer.
fn adapterhub_indices(shape: &HeadShape) -> (Vec<usize>, usize) {
    let mut next = 0;
    let mut hidden = Vec::new();
    for _ in 1..shape.layers {
        hidden.push(next + 1);
        next += 2 + usize::from(shape.activation.is_some());
    }
    (hidden, next + 1)
}

/// The AdapterHub head saved in the adapter folder `dir`, if it has one.
pub fn read_adapterhub(dir: &Path, model: &Backbone) -> Result<Option<SavedHead>> {
    let path = dir.join(ADAPTERHUB_HEAD_CONFIG);
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |m: String| Error::file(&path, m);
    let json = read_json(&path)?;
    let name = json["name"].as_str().ok_or_else(|| bad("has no head `name`".into()))?.to_string();
    let (class, _) = adapterhub_class(model)?;
    let saved_class = json["model_class"].as_str().unwrap_or_default();
    // AdapterHub loads a head into the class it was saved from, or the older
    // `...ModelWithHeads` of the same model.
    if saved_class != class && saved_class != class.replace("AdapterModel", "ModelWithHeads") {
        return Err(bad(format!(
            "model_class `{saved_class}`: only flexible heads of `{class}` (this model's AdapterHub class) are read; a static head \
             (`...ForSequenceClassification`) or another model's head is not"
        )));
    }
    let config = json["config"].as_object().ok_or_else(|| bad("has no head `config` table".into()))?;
    if let Some(unknown) = config.keys().find(|k| !ADAPTERHUB_HEAD_FIELDS.contains(&k.as_str())) {
        return Err(bad(format!(
            "head config field `{unknown}` is not one of AdapterHub 1.3.0's classification head fields; refused rather than ignored"
        )));
    }
    match &config["head_type"] {
        Value::String(t) if t == "classification" => {}
        other => return Err(bad(format!("head_type {other} is not supported (only `classification` heads are read)"))),
    }
    let count = |field: &str, default: u64| -> Result<usize> {
        match &config.get(field).cloned().unwrap_or(Value::Null) {
            Value::Null => Ok(default as usize),
            v => v
                .as_u64()
                .filter(|n| *n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("head config field `{field}` = {v} is not a positive count"))),
        }
    };
    let flag = |field: &str, default: bool| -> Result<bool> {
        match &config.get(field).cloned().unwrap_or(Value::Null) {
            Value::Null => Ok(default),
            v => v.as_bool().ok_or_else(|| bad(format!("head config field `{field}` = {v} is not true or false"))),
        }
    };
    let num_labels = count("num_labels", 2)?;
    let activation = match config.get("activation_function").cloned().unwrap_or(Value::Null) {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(Activation::from_name(&s).map_err(|e| bad(format!("head config field `activation_function`: {e}")))?),
        other => return Err(bad(format!("head config field `activation_function` = {other} is not a name"))),
    };
    let shape = HeadShape { layers: count("layers", 2)?, activation, bias: flag("bias", true)? };
    let pooling = match (flag("use_pooler", false)?, model) {
        (true, Backbone::Bert(_)) => Pooling::Pooler,
        (true, Backbone::Llama(_)) => return Err(bad("head config field `use_pooler` = true: a Llama model has no pooler".into())),
        (false, Backbone::Bert(_)) => Pooling::Cls,
        (false, Backbone::Llama(_)) => Pooling::Last,
    };
    let labels = match config.get("label2id").cloned().unwrap_or(Value::Null) {
        Value::Null => default_labels(num_labels),
        Value::Object(map) => {
            let mut labels = vec![None; num_labels];
            for (label, id) in map {
                let slot = id.as_u64().and_then(|i| labels.get_mut(i as usize)).ok_or_else(|| {
                    bad(format!("head config field `label2id`: `{label}` has id {id}, not one of 0..{num_labels} (num_labels)"))
                })?;
                *slot = Some(label);
            }
            labels
                .into_iter()
                .enumerate()
                .map(|(i, l)| l.ok_or_else(|| bad(format!("head config field `label2id` names no label {i}"))))
                .collect::<Result<_>>()?
        }
        other => return Err(bad(format!("head config field `label2id` = {other} is not a table"))),
    };
    let hidden = model.hidden_size();
    if let Some(h) = json["hidden_size"].as_u64().filter(|h| *h as usize != hidden) {
        return Err(bad(format!("hidden_size {h}: the head was saved for another width than this model's {hidden}")));
    }
    let weights = [ADAPTERHUB_HEAD_WEIGHTS, ADAPTERHUB_HEAD_PICKLE]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join(ADAPTERHUB_HEAD_WEIGHTS));
    let (hidden_at, out_at) = adapterhub_indices(&shape);
    let ours: HashMap<String, String> = hidden_at
        .iter()
        .enumerate()
        .flat_map(|(i, at)| [(format!("{at}.weight"), format!("hidden.{i}.weight")), (format!("{at}.bias"), format!("hidden.{i}.bias"))])
        .chain([(format!("{out_at}.weight"), "weight".into()), (format!("{out_at}.bias"), "bias".into())])
        .collect();
    let prefix = format!("heads.{name}.");
    let mut tensors = HashMap::new();
    for (key, t) in read_tensors(&weights, model.device())? {
        let ours = key.strip_prefix(&prefix).and_then(|k| ours.get(k)).ok_or_else(|| {
            Error::file(&weights, format!("tensor `{key}` is not a layer of the {}-layer head `{name}` its config describes", shape.layers))
        })?;
        tensors.insert(ours.clone(), t);
    }
    let head = ClassificationHead::from_tensors(tensors, &shape, hidden, num_labels).map_err(|e| Error::file(&weights, e))?;
    let adapters = read_json(&dir.join(CONFIG_FILE)).ok().and_then(|c| c["name"].as_str().map(|n| vec![n.to_string()])).unwrap_or_default();
    let config = HeadConfig {
        task: name,
        kind: "classification".into(),
        labels,
        pooling,
        hidden_size: hidden,
        adapters,
        label_map: Default::default(),
        layers: shape.layers,
        activation: shape.activation,
        bias: shape.bias,
    };
    Ok(Some(SavedHead { config, head, dir: dir.to_path_buf() }))
}

/// Writes `head` into the adapter folder `dir` as AdapterHub keeps it, so that
/// `load_adapter(dir, with_head=True, use_safetensors=True)` loads it and predicts what we
/// predict; a head AdapterHub cannot compute (mean pooling) is refused with the reason.
pub fn write_adapterhub(dir: &Path, config: &HeadConfig, head: &ClassificationHead, model: &Backbone, model_name: &str) -> Result<()> {
    let use_pooler = match (config.pooling, model) {
        (Pooling::Cls, Backbone::Bert(_)) | (Pooling::Last, Backbone::Llama(_)) => false,
        (Pooling::Pooler, Backbone::Bert(_)) => true,
        (pooling, _) => {
            let theirs = if model.is_encoder() {
                "the first token (pooling = \"cls\") or BERT's pooler (\"pooler\")"
            } else {
                "the last token (\"last\")"
            };
            return Err(Error::Invalid(format!(
                "head `{}` pools by {pooling:?}; AdapterHub's classification heads on this model read {theirs}. Train the head with that \
                 pooling, or convert without heads (--no-heads)",
                config.task
            )));
        }
    };
    let shape = head.shape();
    let label2id = if config.labels == default_labels(config.labels.len()) {
        Value::Null
    } else {
        Value::Object(config.labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect())
    };
    let (class, model_type) = adapterhub_class(model)?;
    let file = json!({
        "config": {
            "head_type": "classification", "num_labels": config.labels.len(), "layers": shape.layers,
            "activation_function": shape.activation.map(Activation::name), "use_pooler": use_pooler, "bias": shape.bias,
            "label2id": label2id, "dropout_prob": null,
        },
        "hidden_size": model.hidden_size(), "model_class": class, "model_name": model_name, "model_type": model_type,
        "name": config.task, "version": "adapters.1.3.0",
    });
    let (hidden_at, out_at) = adapterhub_indices(&shape);
    let mut tensors = HashMap::new();
    let prefix = format!("heads.{}", config.task);
    for (at, layer) in hidden_at.iter().zip(&head.hidden).chain([(&out_at, &head.out)]) {
        tensors.insert(format!("{prefix}.{at}.weight"), layer.weight.as_tensor().clone());
        if let Some(b) = &layer.bias {
            tensors.insert(format!("{prefix}.{at}.bias"), b.as_tensor().clone());
        }
    }
    save_tensors_atomic(&tensors, &dir.join(ADAPTERHUB_HEAD_WEIGHTS))?;
    write_atomic(&dir.join(ADAPTERHUB_HEAD_CONFIG), serde_json::to_string_pretty(&file).expect("json").as_bytes())?;
    Ok(())
}

/// The weights file of a PEFT folder (safetensors, else PEFT's default pickle).
fn peft_weights(dir: &Path) -> PathBuf {
    let pickle = dir.join("adapter_model.bin");
    if !dir.join(WEIGHTS_FILE).exists() && pickle.exists() {
        pickle
    } else {
        dir.join(WEIGHTS_FILE)
    }
}

/// transformers' classifier module of this backbone's sequence-classification model, and
/// the pooling and shape it computes with.
fn peft_classifier(model: &Backbone) -> (&'static str, Pooling, HeadShape) {
    match model {
        Backbone::Bert(_) => ("classifier", Pooling::Pooler, HeadShape { layers: 1, activation: None, bias: true }),
        Backbone::Llama(_) => ("score", Pooling::Last, HeadShape { layers: 1, activation: None, bias: false }),
    }
}

/// The classifier a PEFT `SEQ_CLS` adapter folder saved, if it has one.
pub fn read_peft(dir: &Path, model: &Backbone) -> Result<Option<SavedHead>> {
    let config_path = dir.join(CONFIG_FILE);
    let Ok(json) = read_json(&config_path) else { return Ok(None) };
    if json.get("peft_type").is_none() || json["task_type"] != "SEQ_CLS" {
        return Ok(None);
    }
    let weights = peft_weights(dir);
    let (module, pooling, shape) = peft_classifier(model);
    let mut tensors = HashMap::new();
    for (key, t) in read_tensors(&weights, model.device())? {
        let Some(rest) = key.strip_prefix(PEFT_PREFIX) else { continue };
        match rest.split_once('.') {
            Some((m, param)) if m == module => {
                tensors.insert(param.to_string(), t);
            }
            Some((m, _)) if PEFT_CLASSIFIERS.contains(&m) => {
                return Err(Error::file(
                    &weights,
                    format!("tensor `{key}`: a {m} belongs to another model than this one (it has `{module}`)"),
                ))
            }
            _ => {}
        }
    }
    let Some(weight) = tensors.get("weight") else { return Ok(None) };
    let num_labels = weight.dim(0)?;
    let head = ClassificationHead::from_tensors(tensors, &shape, model.hidden_size(), num_labels).map_err(|e| Error::file(&weights, e))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
    let config = HeadConfig {
        task: name.clone(),
        kind: "classification".into(),
        labels: default_labels(num_labels),
        pooling,
        hidden_size: model.hidden_size(),
        adapters: vec![name],
        label_map: Default::default(),
        layers: 1,
        activation: None,
        bias: shape.bias,
    };
    Ok(Some(SavedHead { config, head, dir: dir.to_path_buf() }))
}

/// Adds `head` to the PEFT folder `dir` (written by the LoRA writer) as a `SEQ_CLS`
/// adapter's saved classifier, so that PEFT over transformers' sequence-classification
/// model predicts what we predict; a head it cannot compute is refused with the reason.
pub fn write_peft(dir: &Path, config: &HeadConfig, head: &ClassificationHead, model: &Backbone) -> Result<()> {
    let (module, pooling, shape) = peft_classifier(model);
    if config.pooling != pooling || head.shape() != shape {
        return Err(Error::Invalid(format!(
            "head `{}` ({} layer(s), {:?} pooling, {}output bias) is not transformers' `{module}` on this model ({:?} pooling, one layer, \
             {}output bias), the only head PEFT saves; train it with that shape, or convert without heads (--no-heads)",
            config.task,
            head.shape().layers,
            config.pooling,
            if head.shape().bias { "" } else { "no " },
            pooling,
            if shape.bias { "" } else { "no " },
        )));
    }
    let weights = dir.join(WEIGHTS_FILE);
    // transformers' BERT classifier keeps the encoder under `bert.`; the Llama one under
    // `model.`, as the base model's paths already read.
    let encoder_prefix = if model.is_encoder() { "bert." } else { "" };
    let mut tensors: HashMap<String, Tensor> = read_tensors(&weights, model.device())?
        .into_iter()
        .map(|(key, t)| match key.strip_prefix(PEFT_PREFIX) {
            Some(rest) => (format!("{PEFT_PREFIX}{encoder_prefix}{rest}"), t),
            None => (key, t),
        })
        .collect();
    tensors.insert(format!("{PEFT_PREFIX}{module}.weight"), head.out.weight.as_tensor().clone());
    if let Some(b) = &head.out.bias {
        tensors.insert(format!("{PEFT_PREFIX}{module}.bias"), b.as_tensor().clone());
    }
    let config_path = dir.join(CONFIG_FILE);
    let mut json = read_json(&config_path)?;
    json["task_type"] = json!("SEQ_CLS");
    json["modules_to_save"] = json!(PEFT_CLASSIFIERS);
    save_tensors_atomic(&tensors, &weights)?;
    write_atomic(&config_path, serde_json::to_string_pretty(&json).expect("json").as_bytes())?;
    Ok(())
}
