//! AdapterHub's `adapters` folder format for bottleneck adapters, both ways:
//! `adapter_config.json` (the `BnConfig` fields under `config`, the adapter `name`) and
//! `adapter.safetensors` with keys such as
//! `encoder.layer.3.output.adapters.NAME.adapter_down.0.weight`.

use crate::config::{DOUBLE_SEQ_BN, PAR_BN, SEQ_BN};
use adapters_core::io::{fill_vars, read_tensors, save_tensors_atomic, write_atomic};
use adapters_core::{Adapter, BuildArgs, Error, Layers, Loaded, ModelInfo, Placement, Site};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// The weights file of an AdapterHub adapter folder.
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
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

/// Our parameter name for an AdapterHub one, and back.
fn hub_param(ours: &str) -> String {
    ours.replace("adapter_down.weight", "adapter_down.0.weight").replace("adapter_down.bias", "adapter_down.0.bias")
}

fn bad(path: &Path, message: String) -> Error {
    Error::Io { path: path.to_path_buf(), message }
}

pub(crate) fn load(dir: &Path, json: &Value, model: &ModelInfo, device: &Device) -> Result<Loaded, Error> {
    let config_path = dir.join(adapters_core::io::CONFIG_FILE);
    let c = &json["config"];
    let name = json["name"].as_str().ok_or_else(|| bad(&config_path, "has no adapter `name`".into()))?.to_string();
    adapters_core::io::check_model_type(dir, json, model)?;
    let flag = |k: &str| c[k].as_bool().unwrap_or(false);
    let unsupported = [
        ("phm_layer", flag("phm_layer")),
        ("residual_before_ln = false", c["residual_before_ln"].as_bool() == Some(false)),
        ("original_ln_after = false", c["original_ln_after"].as_bool() == Some(false)),
        ("adapter_residual_before_ln", flag("adapter_residual_before_ln")),
        ("inv_adapter", !c["inv_adapter"].is_null()),
        ("stochastic_depth", c["stochastic_depth"].as_f64().unwrap_or(0.0) > 0.0),
    ];
    if let Some((what, _)) = unsupported.iter().find(|(_, on)| *on) {
        return Err(bad(&config_path, format!("config field `{what}` is not supported by this library's bottleneck adapters")));
    }
    let (mh, out) = (flag("mh_adapter"), c["output_adapter"].as_bool().unwrap_or(true));
    let kind = if flag("is_parallel") {
        &PAR_BN
    } else if mh && out {
        &DOUBLE_SEQ_BN
    } else {
        &SEQ_BN
    };
    let mut sites = Vec::new();
    if mh {
        sites.push(Site::AttentionOutput);
    }
    if out {
        sites.push(Site::FfnOutput);
    }
    let non_linearity = c["non_linearity"].as_str().unwrap_or("relu").to_lowercase();
    let non_linearity = match non_linearity.as_str() {
        "gelu_new" | "gelu_orig" => "gelu".to_string(),
        other => other.to_string(),
    };
    let ours = json!({
        "reduction_factor": c["reduction_factor"].as_f64().unwrap_or(16.0),
        "non_linearity": non_linearity,
        "original_ln_before": flag("original_ln_before"),
        "is_parallel": flag("is_parallel"),
        "scaling": c["scaling"].clone(),
        "ln_before": flag("ln_before"),
        "ln_after": flag("ln_after"),
        "dropout": c["dropout"].as_f64().unwrap_or(0.0),
        "use_gating": flag("use_gating"),
        "init_weights": if c["init_weights"].as_str() == Some("mam_adapter") { "mam_adapter" } else { "bert" },
    });
    let leave_out: Vec<usize> =
        c["leave_out"].as_array().map(|a| a.iter().filter_map(|v| v.as_u64().map(|x| x as usize)).collect()).unwrap_or_default();
    let placement = Placement { layers: Layers::All, leave_out, sites, sizes: Default::default() };
    let adapter = crate::Bottleneck::build(kind, &BuildArgs { config: &ours, placement: &placement, model, device, seed: 0 })?;

    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() && dir.join("pytorch_adapter.bin").exists() {
        return Err(bad(
            &dir.join("pytorch_adapter.bin"),
            "PyTorch pickles are not read; save the adapter with use_safetensors=True".into(),
        ));
    }
    let hub = read_tensors(&weights, device)?;
    let renamed = rename_from_hub(&adapter, hub, &name, model, &weights)?;
    fill_vars(&adapter, renamed, &weights)?;
    Ok(Loaded { name, adapter: Box::new(adapter), placement, format: "adapterhub" })
}

/// Maps AdapterHub keys to our variable names; any model prefix (`bert.`) is dropped.
fn rename_from_hub(
    adapter: &dyn Adapter,
    hub: HashMap<String, Tensor>,
    name: &str,
    model: &ModelInfo,
    file: &Path,
) -> Result<HashMap<String, Tensor>, Error> {
    let mut by_key: HashMap<String, String> = HashMap::new();
    for (ours, _) in adapter.vars() {
        by_key.insert(hub_key(&ours, name, model).ok_or_else(|| bad(file, format!("no module path for `{ours}`")))?, ours);
    }
    let mut out = HashMap::new();
    for (key, t) in hub {
        let found = by_key.iter().find(|(k, _)| key == **k || key.ends_with(&format!(".{k}")));
        match found {
            Some((_, ours)) => {
                out.insert(ours.clone(), t);
            }
            None => return Err(bad(file, format!("tensor `{key}` does not belong to adapter `{name}` with this config"))),
        }
    }
    Ok(out)
}

/// `layer.3.ffn_output.adapter_down.weight` -> `encoder.layer.3.output.adapters.NAME.adapter_down.0.weight`.
fn hub_key(ours: &str, name: &str, model: &ModelInfo) -> Option<String> {
    let (point, param) = adapters_core::Point::split_var_name(ours)?;
    let module = &model.spec(point)?.module;
    Some(format!("{module}.adapters.{name}.{}", hub_param(param)))
}

/// Saves a bottleneck adapter in AdapterHub's layout.
pub fn save(dir: &Path, name: &str, adapter: &dyn Adapter, placement: &Placement, model: &ModelInfo) -> Result<(), Error> {
    let kind = adapter.kind();
    if ![SEQ_BN.name, DOUBLE_SEQ_BN.name, PAR_BN.name].contains(&kind) {
        return Err(Error::Adapter(format!(
            "AdapterHub's bottleneck format holds seq_bn, double_seq_bn and par_bn adapters, not `{kind}`"
        )));
    }
    let c = adapter.config();
    if c.get("bottleneck_size").is_some_and(|v| !v.is_null()) || !placement.sizes.is_empty() || placement.layers != Layers::All {
        return Err(Error::Adapter(
            "AdapterHub's config has only reduction_factor and leave_out: explicit sizes and layer lists cannot be saved in it".into(),
        ));
    }
    let sites: Vec<Site> = adapter.points().iter().map(|p| p.site).collect();
    let non_linearity = match c["non_linearity"].as_str() {
        Some("silu") => "swish",
        Some(other) => other,
        None => "relu",
    };
    let config = json!({
        "adapter_residual_before_ln": false, "cross_adapter": false, "dropout": c["dropout"],
        "factorized_phm_W": true, "factorized_phm_rule": false, "hypercomplex_nonlinearity": "glorot-uniform",
        "init_weights": c["init_weights"], "init_weights_seed": null, "inv_adapter": null, "inv_adapter_reduction_factor": null,
        "is_parallel": c["is_parallel"], "learn_phm": true, "leave_out": placement.leave_out,
        "ln_after": c["ln_after"], "ln_before": c["ln_before"],
        "mh_adapter": sites.contains(&Site::AttentionOutput), "non_linearity": non_linearity,
        "original_ln_after": true, "original_ln_before": c["original_ln_before"],
        "output_adapter": sites.contains(&Site::FfnOutput),
        "phm_bias": true, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": false, "phm_rank": 1,
        "reduction_factor": c["reduction_factor"], "residual_before_ln": true, "scaling": c["scaling"],
        "shared_W_phm": false, "shared_phm_rule": true, "stochastic_depth": 0.0, "use_gating": c["use_gating"],
    });
    let (model_class, model_type) = adapters_core::io::hf_model_class(model);
    let mut tensors = HashMap::new();
    for (ours, var) in adapter.vars() {
        let key = hub_key(&ours, name, model).ok_or_else(|| Error::Adapter(format!("no module path for `{ours}`")))?;
        tensors.insert(key, var.as_tensor().clone());
    }
    save_tensors_atomic(&tensors, &dir.join(WEIGHTS_FILE))?;
    let file = json!({
        "config": config, "hidden_size": model.hidden_size, "model_class": model_class,
        "model_name": Value::Null, "model_type": model_type, "name": name, "version": VERSION,
    });
    write_atomic(&dir.join(adapters_core::io::CONFIG_FILE), serde_json::to_string_pretty(&file).expect("json").as_bytes())
}
