//! AdapterHub's `adapters` folder format for bottleneck adapters, both ways:
//! `adapter_config.json` (the `BnConfig` fields under `config`, the adapter `name`) and
//! `adapter.safetensors` with keys such as
//! `encoder.layer.3.output.adapters.NAME.adapter_down.0.weight`.

use crate::config::{width_for, Activation, BottleneckConfig, KindDefaults, DOUBLE_SEQ_BN, PAR_BN, SEQ_BN};
use adapters_core::io::{fill_vars, read_tensors, save_tensors_atomic, write_atomic};
use adapters_core::{Adapter, BuildArgs, Error, Layers, Loaded, ModelInfo, Placement, Site};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The weights file of an AdapterHub adapter folder (`use_safetensors=True`).
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
/// The weights file AdapterHub writes by default (a PyTorch pickle, read without running it).
pub const PICKLE_FILE: &str = "pytorch_adapter.bin";
/// The AdapterHub version whose layout we write.
pub const VERSION: &str = "adapters.1.3.0";

pub(crate) fn detect(config: &Value) -> bool {
    // A fusion folder's config has `adapter_names` (the fusion crate reads those).
    config.get("adapter_names").is_none()
        && config.get("config").is_some_and(|c| c.is_object())
        && config
            .get("version")
            .and_then(|v| v.as_str())
            .is_some_and(|v| v.starts_with("adapters.") || v.starts_with("adapter-transformers"))
}

/// Every `BnConfig` field of AdapterHub 1.3.0. A field outside this list is refused by
/// name: it could change what the adapter computes.
const BN_FIELDS: &[&str] = &[
    "architecture",
    "mh_adapter",
    "output_adapter",
    "reduction_factor",
    "non_linearity",
    "original_ln_before",
    "original_ln_after",
    "ln_before",
    "ln_after",
    "init_weights",
    "init_weights_seed",
    "is_parallel",
    "scaling",
    "use_gating",
    "residual_before_ln",
    "adapter_residual_before_ln",
    "inv_adapter",
    "inv_adapter_reduction_factor",
    "cross_adapter",
    "leave_out",
    "dropout",
    "phm_layer",
    "phm_dim",
    "factorized_phm_W",
    "shared_W_phm",
    "shared_phm_rule",
    "factorized_phm_rule",
    "phm_c_init",
    "phm_init_range",
    "learn_phm",
    "hypercomplex_nonlinearity",
    "phm_rank",
    "phm_bias",
    "stochastic_depth",
];

fn bad(path: &Path, message: String) -> Error {
    Error::Io { path: path.to_path_buf(), message }
}

/// AdapterHub's `BnConfig` as our configuration and placement, or an error naming the
/// first field (and its value) that we would not compute exactly as AdapterHub does.
fn read_config(c: &Value, model: &ModelInfo) -> Result<(&'static KindDefaults, Value, Placement), String> {
    let fields = c.as_object().ok_or("`config` is not a table of fields")?;
    match fields.get("architecture").unwrap_or(&Value::Null) {
        Value::Null => {}
        Value::String(a) if a == "bottleneck" => {}
        other => return Err(format!("config field `architecture` = {other}: only AdapterHub's bottleneck adapters are read here")),
    }
    if let Some(unknown) = fields.keys().find(|k| !BN_FIELDS.contains(&k.as_str())) {
        return Err(format!("config field `{unknown}` is not one of AdapterHub 1.3.0's BnConfig fields; refused rather than ignored"));
    }
    let value = |k: &str| fields.get(k).unwrap_or(&Value::Null);
    let flag = |k: &str, default: bool| -> Result<bool, String> {
        match value(k) {
            Value::Null => Ok(default),
            Value::Bool(b) => Ok(*b),
            other => Err(format!("config field `{k}` must be true or false, not {other}")),
        }
    };
    let refusals = [
        ("phm_layer", flag("phm_layer", false)?, "Compacter's PHM layers are not supported"),
        (
            "original_ln_after",
            !flag("original_ln_after", true)?,
            "the backbone always applies its own residual add and norm after the adapter",
        ),
        ("inv_adapter", !value("inv_adapter").is_null(), "invertible adapters are not supported"),
    ];
    if let Some((field, _, why)) = refusals.iter().find(|(_, on, _)| *on) {
        return Err(format!("config field `{field}` = {} is refused: {why}", value(field)));
    }
    let (mh, out) = (flag("mh_adapter", false)?, flag("output_adapter", true)?);
    if !mh && !out {
        return Err("config fields `mh_adapter` and `output_adapter` are both false: the adapter has no site".into());
    }
    let is_parallel = flag("is_parallel", false)?;
    let kind = match (is_parallel, mh && out) {
        (true, _) => &PAR_BN,
        (false, true) => &DOUBLE_SEQ_BN,
        (false, false) => &SEQ_BN,
    };
    let sites = [(mh, Site::AttentionOutput), (out, Site::FfnOutput)].into_iter().filter(|(on, _)| *on).map(|(_, s)| s).collect();
    let non_linearity = value("non_linearity").as_str().ok_or("config field `non_linearity` is missing or not a name")?;
    let non_linearity = Activation::from_name(non_linearity).map_err(|e| format!("config field `non_linearity`: {e}"))?;
    let init_weights = match value("init_weights") {
        Value::Null => "bert",
        Value::String(s) if ["bert", "mam_adapter", "houlsby"].contains(&s.as_str()) => s.as_str(),
        other => return Err(format!("config field `init_weights` = {other} is not one of bert, mam_adapter, houlsby")),
    };
    let leave_out: Vec<usize> = match value("leave_out") {
        Value::Null => vec![],
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_u64().map(|l| l as usize).ok_or_else(|| format!("config field `leave_out` holds {v}, not a layer index")))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            // AdapterHub ignores indices past the last layer.
            .filter(|l| *l < model.num_layers)
            .collect(),
        other => return Err(format!("config field `leave_out` must be a list of layer indices, not {other}")),
    };
    if value("residual_before_ln") == "post_add" && !matches!(model.architecture.as_str(), "bert" | "roberta" | "xlm-roberta") {
        return Err(format!(
            "config field `residual_before_ln` = \"post_add\" needs a post-norm model (BERT); on `{}` AdapterHub fails on it too",
            model.architecture
        ));
    }
    let (reduction_factor, sizes) = reduction_factors(value("reduction_factor"), model)?;
    let number = |k: &str, default: f64| -> Result<f64, String> {
        match value(k) {
            Value::Null => Ok(default),
            v => v.as_f64().ok_or_else(|| format!("config field `{k}` must be a number, not {v}")),
        }
    };
    let ours = json!({
        "reduction_factor": reduction_factor,
        "non_linearity": non_linearity,
        "original_ln_before": flag("original_ln_before", false)?,
        "is_parallel": is_parallel,
        "scaling": match value("scaling") { Value::Null => json!(1.0), v => v.clone() },
        "ln_before": flag("ln_before", false)?,
        "ln_after": flag("ln_after", false)?,
        "dropout": number("dropout", 0.0)?,
        "use_gating": flag("use_gating", false)?,
        "residual_before_ln": match value("residual_before_ln") { Value::Null => json!(true), v => v.clone() },
        "adapter_residual_before_ln": flag("adapter_residual_before_ln", false)?,
        "stochastic_depth": number("stochastic_depth", 0.0)?,
        "init_weights": init_weights,
    });
    Ok((kind, ours, Placement { layers: Layers::All, leave_out, sites, sizes }))
}

/// A `reduction_factor` (a number, or a table of layer index → number with an optional
/// `default`) as one factor and the per-layer widths that differ from its width.
fn reduction_factors(v: &Value, model: &ModelInfo) -> Result<(f64, BTreeMap<String, usize>), String> {
    let positive = |k: &str, v: &Value| -> Result<f64, String> {
        v.as_f64()
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| format!("config field `reduction_factor` {k}= {v}: not a positive number"))
    };
    let table = match v {
        Value::Null => return Ok((16.0, BTreeMap::new())),
        Value::Object(t) => t,
        number => return Ok((positive("", number)?, BTreeMap::new())),
    };
    if let Some(key) = table.keys().find(|k| *k != "default" && k.parse::<usize>().is_err()) {
        return Err(format!("config field `reduction_factor` has the key `{key}`: keys are layer indices or `default`"));
    }
    let per_layer = |l: usize| -> Result<f64, String> {
        match table.get(&l.to_string()).or_else(|| table.get("default")) {
            Some(v) => positive(&format!("[\"{l}\"] "), v),
            None => {
                Err(format!("config field `reduction_factor` gives no factor for layer {l} and no `default` (AdapterHub fails on it too)"))
            }
        }
    };
    let base = match table.get("default") {
        Some(v) => positive("[\"default\"] ", v)?,
        None => per_layer(0)?,
    };
    let mut sizes = BTreeMap::new();
    for l in 0..model.num_layers {
        let width = width_for(model.hidden_size, per_layer(l)?);
        if width != width_for(model.hidden_size, base) {
            sizes.insert(l.to_string(), width);
        }
    }
    Ok((base, sizes))
}

pub(crate) fn load(dir: &Path, json: &Value, model: &ModelInfo, device: &Device) -> Result<Loaded, Error> {
    let config_path = dir.join(adapters_core::io::CONFIG_FILE);
    let name = json["name"].as_str().ok_or_else(|| bad(&config_path, "has no adapter `name`".into()))?.to_string();
    adapters_core::io::check_model_type(dir, json, model)?;
    let (kind, ours, placement) = read_config(&json["config"], model).map_err(|m| bad(&config_path, m))?;
    let adapter = crate::Bottleneck::build(kind, &BuildArgs { config: &ours, placement: &placement, model, device, seed: 0 })?;
    // AdapterHub writes pickles unless asked for safetensors (and cannot write `ln_before`
    // adapters as safetensors at all).
    let weights = [WEIGHTS_FILE, PICKLE_FILE].iter().map(|f| dir.join(f)).find(|p| p.exists()).unwrap_or_else(|| dir.join(WEIGHTS_FILE));
    let hub = read_tensors(&weights, device)?;
    let renamed = rename_from_hub(&adapter, hub, &name, model, &weights)?;
    fill_vars(&adapter, renamed, &weights)?;
    Ok(Loaded { name, adapter: Box::new(adapter), placement, format: "adapterhub" })
}

/// The AdapterHub keys of one of our variables: `adapter_down` is a Sequential (with
/// `ln_before`: the norm at `.0`, the linear at `.1`), and the norm is also registered as
/// `adapter_norm_before`, so PyTorch's state dict names it twice.
fn hub_params(param: &str, ln_before: bool) -> Vec<String> {
    let linear = if ln_before { "adapter_down.1" } else { "adapter_down.0" };
    match param.split_once('.') {
        Some(("adapter_down", p)) => vec![format!("{linear}.{p}")],
        Some(("adapter_norm_before", p)) => vec![format!("adapter_norm_before.{p}"), format!("adapter_down.0.{p}")],
        _ => vec![param.to_string()],
    }
}

/// `layer.3.ffn_output.adapter_down.weight` -> `encoder.layer.3.output.adapters.NAME.adapter_down.0.weight`
/// (and any other key PyTorch gives the same tensor).
fn hub_keys(ours: &str, name: &str, model: &ModelInfo, ln_before: bool) -> Option<Vec<String>> {
    let (point, param) = adapters_core::Point::split_var_name(ours)?;
    let module = hub_module(point, model)?;
    Some(hub_params(param, ln_before).into_iter().map(|p| format!("{module}.adapters.{name}.{p}")).collect())
}

/// The module AdapterHub hangs a bottleneck layer on: BERT's and RoBERTa's sublayer output
/// modules (`encoder.layer.3.output`); elsewhere (DistilBERT, the decoders) the layer's own
/// `attention_adapters` and `output_adapters` (`transformer.layer.3.output_adapters`,
/// `layers.3.output_adapters`: a decoder's base-model path, found under `model.` in a task
/// model by the reader's suffix match).
fn hub_module(point: adapters_core::Point, model: &ModelInfo) -> Option<String> {
    let module = &model.spec(point)?.module;
    if matches!(model.architecture.as_str(), "bert" | "roberta" | "xlm-roberta") {
        return Some(module.clone());
    }
    let adapters = match point.site {
        Site::AttentionOutput => "attention_adapters",
        Site::FfnOutput => "output_adapters",
        _ => return None,
    };
    let layer = &model.spec(adapters_core::Point::new(point.layer, Site::LayerOutput))?.module;
    Some(format!("{}.{adapters}", layer.strip_prefix("model.").unwrap_or(layer)))
}

/// Maps AdapterHub keys to our variable names; any model prefix (`bert.`) is dropped.
/// Two keys of one tensor must hold the same values.
fn rename_from_hub(
    adapter: &crate::Bottleneck,
    mut hub: HashMap<String, Tensor>,
    name: &str,
    model: &ModelInfo,
    file: &Path,
) -> Result<HashMap<String, Tensor>, Error> {
    let ln_before = adapter.settings().ln_before;
    // Strip a model prefix (`bert.encoder...` from a model with a head).
    let wanted: Vec<(String, Vec<String>)> = adapter
        .vars()
        .into_iter()
        .map(|(ours, _)| {
            hub_keys(&ours, name, model, ln_before)
                .map(|k| (ours.clone(), k))
                .ok_or_else(|| bad(file, format!("no module path for `{ours}`")))
        })
        .collect::<Result<_, _>>()?;
    let find = |hub: &HashMap<String, Tensor>, key: &str| hub.keys().find(|k| *k == key || k.ends_with(&format!(".{key}"))).cloned();
    let mut out = HashMap::new();
    for (ours, keys) in wanted {
        let mut found: Vec<(String, Tensor)> = Vec::new();
        for key in &keys {
            if let Some(k) = find(&hub, key) {
                let t = hub.remove(&k).expect("found");
                found.push((k, t));
            }
        }
        if let [(first, a), (second, b), ..] = found.as_slice() {
            let differ = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            if a.dims() != b.dims() || differ > 0.0 {
                return Err(bad(file, format!("`{first}` and `{second}` name one tensor in AdapterHub but hold different values")));
            }
        }
        if let Some((_, t)) = found.into_iter().next() {
            out.insert(ours, t);
        }
    }
    if let Some(extra) = hub.keys().next() {
        return Err(bad(file, format!("tensor `{extra}` does not belong to adapter `{name}` with this config")));
    }
    Ok(out)
}

/// Saves a bottleneck adapter in AdapterHub's layout, or says which setting AdapterHub's
/// config cannot hold.
pub fn save(dir: &Path, name: &str, adapter: &dyn Adapter, placement: &Placement, model: &ModelInfo) -> Result<(), Error> {
    let kind = adapter.kind();
    if ![SEQ_BN.name, DOUBLE_SEQ_BN.name, PAR_BN.name].contains(&kind) {
        return Err(Error::Adapter(format!(
            "AdapterHub's bottleneck format holds seq_bn, double_seq_bn and par_bn adapters, not `{kind}`"
        )));
    }
    let c: BottleneckConfig = serde_json::from_value(adapter.config()).map_err(|e| Error::Adapter(format!("bottleneck config: {e}")))?;
    let sites: Vec<Site> = adapter.points().iter().map(|p| p.site).collect();
    let hidden = model.hidden_size;
    // Layers outside the selection become AdapterHub's `leave_out`.
    let selected = placement.layers(model.num_layers)?;
    let mut leave_out: Vec<usize> = (0..model.num_layers).filter(|l| !selected.contains(l) || placement.leave_out.contains(l)).collect();
    leave_out.dedup();
    let reduction_factor = hub_reduction_factor(&c, placement, model, &leave_out)?;
    let config = json!({
        "adapter_residual_before_ln": c.adapter_residual_before_ln, "cross_adapter": false, "dropout": c.dropout,
        "factorized_phm_W": true, "factorized_phm_rule": false, "hypercomplex_nonlinearity": "glorot-uniform",
        "init_weights": c.init_weights, "init_weights_seed": null, "inv_adapter": null, "inv_adapter_reduction_factor": null,
        "is_parallel": c.is_parallel, "learn_phm": true, "leave_out": leave_out,
        "ln_after": c.ln_after, "ln_before": c.ln_before,
        "mh_adapter": sites.contains(&Site::AttentionOutput), "non_linearity": c.non_linearity,
        "original_ln_after": true, "original_ln_before": c.original_ln_before,
        "output_adapter": sites.contains(&Site::FfnOutput),
        "phm_bias": true, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": false, "phm_rank": 1,
        "reduction_factor": reduction_factor, "residual_before_ln": c.residual_before_ln, "scaling": c.scaling,
        "shared_W_phm": false, "shared_phm_rule": true, "stochastic_depth": c.stochastic_depth, "use_gating": c.use_gating,
    });
    let (model_class, model_type) = adapters_core::io::hf_model_class(model);
    let mut tensors = HashMap::new();
    for (ours, var) in adapter.vars() {
        for key in hub_keys(&ours, name, model, c.ln_before).ok_or_else(|| Error::Adapter(format!("no module path for `{ours}`")))? {
            tensors.insert(key, var.as_tensor().copy()?);
        }
    }
    save_tensors_atomic(&tensors, &dir.join(WEIGHTS_FILE))?;
    let file = json!({
        "config": config, "hidden_size": hidden, "model_class": model_class,
        "model_name": Value::Null, "model_type": model_type, "name": name, "version": VERSION,
    });
    write_atomic(&dir.join(adapters_core::io::CONFIG_FILE), serde_json::to_string_pretty(&file).expect("json").as_bytes())
}

/// Our widths as AdapterHub's `reduction_factor`: one number, or a table by layer when
/// widths differ, each factor checked to give back exactly that width.
fn hub_reduction_factor(c: &BottleneckConfig, placement: &Placement, model: &ModelInfo, leave_out: &[usize]) -> Result<Value, Error> {
    let hidden = model.hidden_size;
    let factor_for = |width: usize, at: &str| -> Result<f64, Error> {
        // Our own factor when it gives this width, else hidden / width (checked).
        let rf = if width_for(hidden, c.reduction_factor) == width { c.reduction_factor } else { hidden as f64 / width as f64 };
        if width_for(hidden, rf) != width {
            return Err(Error::Adapter(format!(
                "the bottleneck width {width} {at} has no reduction_factor that gives it back in AdapterHub (hidden size {hidden})"
            )));
        }
        Ok(rf)
    };
    let default_width = c.default_size(hidden);
    let default = factor_for(default_width, "of the config")?;
    let mut table = serde_json::Map::new();
    for l in (0..model.num_layers).filter(|l| !leave_out.contains(l)) {
        let width = placement.size_for(l, default_width);
        if width != default_width {
            table.insert(l.to_string(), json!(factor_for(width, &format!("at layer {l}"))?));
        }
    }
    if table.is_empty() {
        return Ok(json!(default));
    }
    table.insert("default".into(), json!(default));
    Ok(Value::Object(table))
}
