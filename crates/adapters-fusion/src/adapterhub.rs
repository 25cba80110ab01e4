//! AdapterHub's fusion folder, both ways: `adapter_fusion_config.json` (the
//! `AdapterFusionConfig` fields under `config`, the members under `adapter_names`, the
//! fusion `name`) and `model_adapter_fusion.safetensors` with keys such as
//! `encoder.layer.3.output.adapter_fusion_layer.NAME.query.weight`.

use crate::fusion::Fusion;
use adapters_core::io::{fill_vars, read_tensors, save_tensors_atomic, write_atomic};
use adapters_core::{Adapter, BuildArgs, Error, Layers, Loaded, ModelInfo, Placement, Point};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// The configuration file of an AdapterHub fusion folder.
pub const CONFIG_FILE: &str = adapters_core::io::FUSION_CONFIG_FILE;
/// The weights file of an AdapterHub fusion folder.
pub const WEIGHTS_FILE: &str = "model_adapter_fusion.safetensors";
/// The AdapterHub version whose layout we write.
pub const VERSION: &str = "adapters.1.3.0";

/// The fusion configuration fields AdapterHub writes (ours less `members`).
const FIELDS: [&str; 10] = [
    "dropout_prob",
    "key",
    "query",
    "query_before_ln",
    "regularization",
    "residual_before",
    "temperature",
    "value",
    "value_before_softmax",
    "value_initialized",
];

pub(crate) fn detect(config: &Value) -> bool {
    config.get("adapter_names").is_some_and(Value::is_array)
        && config.get("config").is_some_and(|c| c.get("value_before_softmax").is_some())
}

fn bad(path: &Path, message: String) -> Error {
    Error::Io { path: path.to_path_buf(), message }
}

/// Our parameter name at a point (`layer.3.ffn_output.query.weight`) and AdapterHub's.
fn hub_key(point: Point, param: &str, name: &str, model: &ModelInfo) -> Option<String> {
    Some(format!("{}.adapter_fusion_layer.{name}.{param}", model.spec(point)?.module))
}

pub(crate) fn load(dir: &Path, json: &Value, model: &ModelInfo, device: &Device) -> Result<Loaded, Error> {
    let config_path = dir.join(CONFIG_FILE);
    let name = json["name"].as_str().ok_or_else(|| bad(&config_path, "has no fusion `name`".into()))?.to_string();
    adapters_core::io::check_model_type(dir, json, model)?;
    let members: Vec<String> = json["adapter_names"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().map(String::from).ok_or_else(|| bad(&config_path, "`adapter_names` must be a list of names".into())))
        .collect::<Result<_, _>>()?;
    let mut config = serde_json::Map::new();
    for field in FIELDS {
        config.insert(
            field.into(),
            json["config"].get(field).cloned().ok_or_else(|| bad(&config_path, format!("`config.{field}` is missing")))?,
        );
    }
    config.insert("members".into(), json!(members));
    let config = Value::Object(config);

    // Where it sits: the hidden sites whose modules hold this fusion's weights.
    let weights_path = dir.join(WEIGHTS_FILE);
    let hub = read_tensors(&weights_path, device)?;
    let mut layers = BTreeSet::new();
    let mut sites = BTreeSet::new();
    for spec in model.points.iter().filter(|s| s.point.site.is_hidden()) {
        let prefix = format!("{}.adapter_fusion_layer.{name}.", spec.module);
        if hub.keys().any(|k| k.starts_with(&prefix)) {
            layers.insert(spec.point.layer);
            sites.insert(spec.point.site);
        }
    }
    if layers.is_empty() {
        return Err(bad(&weights_path, format!("holds no `adapter_fusion_layer.{name}` weights for this `{}` model", model.architecture)));
    }
    let placement =
        Placement { layers: Layers::List(layers.into_iter().collect()), sites: sites.into_iter().collect(), ..Default::default() };
    let fusion = Fusion::build(&BuildArgs { config: &config, placement: &placement, model, device, seed: 0 })?;
    let mut ours = HashMap::new();
    for (var_name, _) in fusion.vars() {
        let (point, param) =
            Point::split_var_name(&var_name).ok_or_else(|| Error::Adapter(format!("unexpected fusion variable `{var_name}`")))?;
        let key = hub_key(point, param, &name, model).ok_or_else(|| Error::Adapter(format!("no module path for {point}")))?;
        let t: Tensor = hub.get(&key).cloned().ok_or_else(|| bad(&weights_path, format!("tensor `{key}` is missing")))?;
        ours.insert(var_name, t);
    }
    fill_vars(&fusion, ours, &weights_path)?;
    Ok(Loaded { name, adapter: Box::new(fusion), placement, format: "adapterhub-fusion" })
}

/// Saves a fusion layer in AdapterHub's layout (`load_adapter_fusion` reads it).
/// The folder is named as AdapterHub names a fusion (its members joined by commas, `a,b`),
/// whatever it is called here, so that AdapterHub's `Fuse("a", "b")` finds it.
pub fn save(dir: &Path, adapter: &dyn Adapter, model: &ModelInfo) -> Result<(), Error> {
    if adapter.kind() != crate::KIND {
        return Err(Error::Adapter(format!("AdapterHub's fusion format holds fusion layers, not `{}` adapters", adapter.kind())));
    }
    let c = adapter.config();
    let members: Vec<&str> = c["members"].as_array().into_iter().flatten().filter_map(|m| m.as_str()).collect();
    let name = &members.join(",");
    let mut config = serde_json::Map::new();
    for field in FIELDS {
        config.insert(field.into(), c[field].clone());
    }
    let mut tensors = HashMap::new();
    for (ours, var) in adapter.vars() {
        let (point, param) = Point::split_var_name(&ours).ok_or_else(|| Error::Adapter(format!("unexpected fusion variable `{ours}`")))?;
        let key = hub_key(point, param, name, model).ok_or_else(|| Error::Adapter(format!("no module path for {point}")))?;
        tensors.insert(key, var.as_tensor().clone());
    }
    save_tensors_atomic(&tensors, &dir.join(WEIGHTS_FILE))?;
    let (model_class, model_type) = adapters_core::io::hf_model_class(model);
    let file = json!({
        "adapter_names": c["members"], "config": Value::Object(config), "hidden_size": model.hidden_size,
        "model_class": model_class, "model_name": Value::Null, "model_type": model_type, "name": name, "version": VERSION,
    });
    write_atomic(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&file).expect("json").as_bytes())
}
