//! PEFT's LoRA folder format, both ways: `adapter_config.json` (`peft_type: LORA`, `r`,
//! `lora_alpha`, `target_modules`, `rank_pattern`, `alpha_pattern`, `use_rslora`,
//! `layers_to_transform`, ...) and `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`.

use crate::lora::{tensors_by_point, Lora, LoraConfig};
use adapters_core::io::{fill_vars, read_tensors, save_tensors_atomic, write_atomic, CONFIG_FILE, WEIGHTS_FILE};
use adapters_core::{Adapter, BuildArgs, Error, Layers, Loaded, ModelInfo, Placement, Point, Site};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

const PREFIX: &str = "base_model.model.";

pub(crate) fn detect(config: &Value) -> bool {
    config.get("peft_type").is_some()
}

fn bad(path: &Path, message: String) -> Error {
    Error::Io { path: path.to_path_buf(), message }
}

/// The point of a PEFT module path; a task model's extra prefix (`bert.`) is skipped.
fn point_of(module: &str, model: &ModelInfo) -> Option<Point> {
    let mut rest = module;
    loop {
        if let Some(spec) = model.point_at_module(rest) {
            return Some(spec.point);
        }
        rest = rest.split_once('.')?.1;
    }
}

pub(crate) fn load(dir: &Path, json: &Value, model: &ModelInfo, device: &Device) -> Result<Loaded, Error> {
    let config_path = dir.join(CONFIG_FILE);
    let peft_type = json["peft_type"].as_str().unwrap_or("");
    if peft_type != "LORA" {
        return Err(bad(&config_path, format!("peft_type `{peft_type}` is not supported (only LORA)")));
    }
    let unsupported = [
        ("use_dora", json["use_dora"].as_bool() == Some(true)),
        ("fan_in_fan_out", json["fan_in_fan_out"].as_bool() == Some(true)),
        ("bias other than \"none\"", json["bias"].as_str().is_some_and(|b| b != "none")),
        ("modules_to_save", json["modules_to_save"].as_array().is_some_and(|m| !m.is_empty())),
    ];
    if let Some((what, _)) = unsupported.iter().find(|(_, on)| *on) {
        return Err(bad(&config_path, format!("`{what}` is not supported by this library's LoRA")));
    }
    let weights = dir.join(WEIGHTS_FILE);
    let tensors = read_tensors(&weights, device)?;
    let mut pairs: HashMap<Point, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (key, t) in tensors {
        let stripped = key.strip_prefix(PREFIX).unwrap_or(&key);
        let (module, which) = if let Some(m) = stripped.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = stripped.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(bad(&weights, format!("tensor `{key}` is not a LoRA A or B weight")));
        };
        let point = point_of(module, model).ok_or_else(|| {
            bad(&weights, format!("tensor `{key}`: module `{module}` is not a projection of this {} model", model.architecture))
        })?;
        let slot = pairs.entry(point).or_default();
        if which == 0 {
            slot.0 = Some(t)
        } else {
            slot.1 = Some(t)
        }
    }
    if pairs.is_empty() {
        return Err(bad(&weights, "holds no LoRA tensors".into()));
    }
    let mut complete = HashMap::new();
    for (p, (a, b)) in pairs {
        match (a, b) {
            (Some(a), Some(b)) => complete.insert(p, (a, b)),
            _ => return Err(bad(&weights, format!("{p}: has only one of lora_A and lora_B"))),
        };
    }
    // Placement: the layers and sites that carry tensors (they must form a full grid).
    let layers: BTreeSet<usize> = complete.keys().map(|p| p.layer).collect();
    let sites: BTreeSet<Site> = complete.keys().map(|p| p.site).collect();
    let grid = layers.iter().flat_map(|&l| sites.iter().map(move |&s| Point::new(l, s))).filter(|p| model.spec(*p).is_some()).count();
    if grid != complete.len() {
        return Err(bad(&weights, "the adapted modules do not cover the same sites in every adapted layer; not supported".into()));
    }
    let placement = Placement {
        layers: if layers.len() == model.num_layers { Layers::All } else { Layers::List(layers.into_iter().collect()) },
        leave_out: vec![],
        sites: sites.into_iter().collect(),
        sizes: Default::default(),
    };
    // Ranks come from the tensors (exact), alphas from the config's patterns.
    let r = json["r"].as_u64().unwrap_or(8) as usize;
    let alpha = json["lora_alpha"].as_f64().unwrap_or(8.0);
    let alpha_pattern: BTreeMap<String, f64> = json["alpha_pattern"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
        .unwrap_or_default();
    let mut rank_pattern = BTreeMap::new();
    for (p, (a, _)) in &complete {
        let rank = a.dim(0)?;
        if rank != r {
            rank_pattern.insert(model.spec(*p).expect("point of the model").module.clone(), rank);
        }
    }
    let config = LoraConfig {
        r,
        alpha,
        dropout: json["lora_dropout"].as_f64().unwrap_or(0.0),
        use_rslora: json["use_rslora"].as_bool().unwrap_or(false),
        rank_pattern,
        alpha_pattern,
    };
    let config_json = serde_json::to_value(&config).expect("json");
    let adapter = Lora::build(&BuildArgs { config: &config_json, placement: &placement, model, device, seed: 0 })?;
    fill_vars(&adapter, tensors_by_point(complete), &weights)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "lora".into());
    Ok(Loaded { name, adapter: Box::new(adapter), placement, format: "peft" })
}

/// Saves a LoRA adapter as a PEFT folder. Ranks that differ from `r` (per-layer sizes)
/// become `rank_pattern` entries.
pub fn save(dir: &Path, adapter: &dyn Adapter, model: &ModelInfo, base_model_name: &str) -> Result<(), Error> {
    if adapter.kind() != "lora" {
        return Err(Error::Adapter(format!("PEFT's LoRA format holds `lora` adapters, not `{}`", adapter.kind())));
    }
    let config: LoraConfig = serde_json::from_value(adapter.config()).map_err(|e| Error::Adapter(e.to_string()))?;
    let points = adapter.points();
    let mut rank_pattern: BTreeMap<String, usize> = config.rank_pattern.clone();
    let mut tensors = HashMap::new();
    let vars: HashMap<String, candle_core::Var> = adapter.vars().into_iter().collect();
    let mut targets = BTreeSet::new();
    for p in &points {
        let module = model.spec(*p).ok_or_else(|| Error::Adapter(format!("the model has no {p}")))?.module.clone();
        targets.insert(module.rsplit('.').next().unwrap_or(&module).to_string());
        let (an, bn) = Lora::var_names(*p);
        let a = vars[&an].as_tensor().clone();
        if crate::lora::pattern_match(&config.rank_pattern, &module).is_none() && a.dim(0)? != config.r {
            rank_pattern.insert(module.clone(), a.dim(0)?);
        }
        tensors.insert(format!("{PREFIX}{module}.lora_A.weight"), a);
        tensors.insert(format!("{PREFIX}{module}.lora_B.weight"), vars[&bn].as_tensor().clone());
    }
    let layers: BTreeSet<usize> = points.iter().map(|p| p.layer).collect();
    let layers_to_transform = if layers.len() == model.num_layers { Value::Null } else { json!(layers) };
    save_tensors_atomic(&tensors, &dir.join(WEIGHTS_FILE))?;
    let file = json!({
        "peft_type": "LORA", "task_type": null, "base_model_name_or_path": base_model_name,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": config.alpha_pattern,
        "layers_to_transform": layers_to_transform, "layers_pattern": null,
        "bias": "none", "fan_in_fan_out": false, "use_dora": false, "modules_to_save": null,
        "init_lora_weights": true, "inference_mode": true, "revision": null,
    });
    write_atomic(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&file).expect("json").as_bytes())
}
