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

/// The point of a PEFT module path: a task model's extra prefix (`bert.`) is skipped, and
/// a base model's path (`layers.3.self_attn.q_proj` from `LlamaModel`) is found under the
/// task model's (`model.layers.3.self_attn.q_proj`).
fn point_of(module: &str, model: &ModelInfo) -> Option<Point> {
    let mut rest = module;
    loop {
        if let Some(spec) = model.point_at_module(rest) {
            return Some(spec.point);
        }
        let under = format!(".{rest}");
        if let Some(spec) = model.points.iter().find(|s| s.module.ends_with(&under) && s.point.site.is_projection()) {
            return Some(spec.point);
        }
        rest = rest.split_once('.')?.1;
    }
}

/// Every field of PEFT 0.21.2's `LoraConfig` and what it needs to be for the adapter to
/// compute here exactly what PEFT computes: `None`, any value (it does not change what a
/// loaded adapter computes on our models, or we compute it); `Some(check)`, values the
/// check accepts, else refused by name.
type FieldRule = (&'static str, Option<fn(&Value) -> bool>);

fn is_null(v: &Value) -> bool {
    v.is_null()
}
fn is_false(v: &Value) -> bool {
    v.is_null() || v == &Value::Bool(false)
}
fn is_empty(v: &Value) -> bool {
    v.is_null() || v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|o| o.is_empty())
}

/// Fields every PEFT config has (metadata; `task_type` only picks the wrapper class).
const PEFT_FIELDS: &[FieldRule] = &[
    ("peft_type", None),
    ("task_type", None),
    ("auto_mapping", None),
    ("peft_version", None),
    ("base_model_name_or_path", None),
    ("revision", None),
    ("inference_mode", None),
    // Our projections are all `nn.Linear`, for which PEFT itself resets it to false.
    ("fan_in_fan_out", None),
    // Placement: read from which modules the file holds tensors for.
    ("target_modules", None),
    ("exclude_modules", None),
    // Checked with `task_type` (see `check_modules_to_save`).
    ("modules_to_save", None),
];

/// The modules PEFT saves whole for a `SEQ_CLS` adapter: transformers' classifier, which
/// the models crate reads as the adapter's classification head.
const CLASSIFIERS: [&str; 2] = ["classifier", "score"];

/// `modules_to_save` holds only a `SEQ_CLS` adapter's classifier: any other module saved
/// whole would replace base weights, which is refused.
fn check_modules_to_save(json: &Value) -> Result<(), String> {
    let saved = &json["modules_to_save"];
    let only_classifiers = saved.as_array().is_some_and(|a| a.iter().all(|m| m.as_str().is_some_and(|m| CLASSIFIERS.contains(&m))));
    if is_empty(saved) || (json["task_type"] == "SEQ_CLS" && only_classifiers) {
        return Ok(());
    }
    Err(format!(
        "config field `modules_to_save` = {saved} is not supported: only a SEQ_CLS adapter's classifier (`classifier`, `score`) is read, \
         as its classification head"
    ))
}

/// Whether `key` (without PEFT's prefix) is a tensor of a saved classifier.
fn is_classifier(stripped: &str, json: &Value) -> bool {
    json["task_type"] == "SEQ_CLS" && stripped.split_once('.').is_some_and(|(m, _)| CLASSIFIERS.contains(&m))
}

const LORA_FIELDS: &[FieldRule] = &[
    ("r", None),
    ("lora_alpha", None),
    ("lora_dropout", None),
    ("use_rslora", None),
    ("layers_to_transform", None),
    ("layers_pattern", None),
    ("rank_pattern", None),
    ("alpha_pattern", None),
    // Only where the bias is "none" are the base model's biases untouched.
    ("bias", Some(|v| v.is_null() || v == "none")),
    // Only initialisations that leave the base weights alone (PiSSA, OLoRA, CorDA, EVA,
    // LoftQ rewrite them at load).
    ("init_lora_weights", Some(|v| v.is_null() || v.is_boolean() || v == "gaussian" || v == "orthogonal")),
    ("megatron_config", Some(is_null)),
    ("megatron_core", None),
    ("trainable_token_indices", Some(is_empty)),
    ("loftq_config", Some(is_empty)),
    ("eva_config", Some(is_null)),
    ("corda_config", Some(is_null)),
    ("lora_ga_config", Some(is_null)),
    ("use_dora", None),
    ("velora_config", Some(is_null)),
    ("alora_invocation_tokens", Some(is_null)),
    ("use_qalora", Some(is_false)),
    ("qalora_group_size", None),
    ("monteclora_config", Some(is_null)),
    ("layer_replication", Some(is_null)),
    ("runtime_config", None),
    ("lora_bias", Some(is_false)),
    ("target_parameters", Some(is_empty)),
    ("use_bdlora", Some(is_null)),
    ("arrow_config", Some(is_null)),
    ("kasa_config", Some(is_null)),
    ("ensure_weight_tying", None),
];

const IA3_FIELDS: &[FieldRule] = &[("feedforward_modules", None), ("init_ia3_weights", None)];

/// The first field that is unknown or has a value we would not compute as PEFT does.
fn check_fields(json: &Value, rules: &[&[FieldRule]]) -> Result<(), String> {
    let fields = json.as_object().ok_or("the config is not a table of fields")?;
    for (name, value) in fields {
        match rules.iter().flat_map(|r| r.iter()).find(|(n, _)| n == name) {
            None => return Err(format!("config field `{name}` is not one of PEFT 0.21.2's fields; refused rather than ignored")),
            Some((_, Some(accepts))) if !accepts(value) => {
                return Err(format!("config field `{name}` = {value} is not supported (it would compute something else here)"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// PEFT's `alpha_pattern` resolved per adapted module: a key applies to a module whose
/// path matches the regular expression `(.*\.)?(KEY)$`, as PEFT matches it. PEFT takes the
/// first matching key in the file's order, which a parsed table does not keep, so two
/// matching keys with different values are refused.
fn alpha_by_module(pattern: &Value, modules: &[String]) -> Result<BTreeMap<String, f64>, String> {
    let Some(pattern) = pattern.as_object() else { return Ok(BTreeMap::new()) };
    let mut keys = Vec::new();
    for (key, value) in pattern {
        let re = regex::Regex::new(&format!(r"^(.*\.)?({key})$"))
            .map_err(|e| format!("config field `alpha_pattern`: key `{key}` is not a regular expression this library reads: {e}"))?;
        let alpha = value.as_f64().ok_or_else(|| format!("config field `alpha_pattern`: `{key}` = {value} is not a number"))?;
        keys.push((key, re, alpha));
    }
    let mut out = BTreeMap::new();
    for module in modules {
        let matching: Vec<&(&String, regex::Regex, f64)> = keys.iter().filter(|(_, re, _)| re.is_match(module)).collect();
        if let Some((first, _, alpha)) = matching.first() {
            if let Some((other, _, _)) = matching.iter().find(|(_, _, a)| a != alpha) {
                return Err(format!(
                    "config field `alpha_pattern`: keys `{first}` and `{other}` both match `{module}` with different values; PEFT \
                     takes the first in the file, which is not kept here: refused"
                ));
            }
            out.insert(module.clone(), *alpha);
        }
    }
    Ok(out)
}

/// The weights file of a PEFT folder: safetensors, else the PyTorch pickle PEFT writes
/// with `safe_serialization=False`.
fn weights_file(dir: &Path) -> std::path::PathBuf {
    let safetensors = dir.join(WEIGHTS_FILE);
    let pickle = dir.join("adapter_model.bin");
    if !safetensors.exists() && pickle.exists() {
        pickle
    } else {
        safetensors
    }
}

/// The points of a set of module paths as a placement: the layers and sites that carry
/// tensors. Points of that grid the file does not cover are returned apart, for the
/// caller to fill with weights that change nothing.
fn grid_placement(points: impl Iterator<Item = Point>, model: &ModelInfo) -> (Placement, Vec<Point>, BTreeSet<Point>) {
    let present: BTreeSet<Point> = points.collect();
    let layers: BTreeSet<usize> = present.iter().map(|p| p.layer).collect();
    let sites: BTreeSet<Site> = present.iter().map(|p| p.site).collect();
    let missing = layers
        .iter()
        .flat_map(|&l| sites.iter().map(move |&s| Point::new(l, s)))
        .filter(|p| model.spec(*p).is_some() && !present.contains(p))
        .collect();
    let placement = Placement {
        layers: if layers.len() == model.num_layers { Layers::All } else { Layers::List(layers.into_iter().collect()) },
        leave_out: vec![],
        sites: sites.into_iter().collect(),
        sizes: Default::default(),
    };
    (placement, missing, present)
}

pub(crate) fn load(dir: &Path, json: &Value, model: &ModelInfo, device: &Device) -> Result<Loaded, Error> {
    let config_path = dir.join(CONFIG_FILE);
    let peft_type = json["peft_type"].as_str().unwrap_or("");
    let rules: &[&[FieldRule]] = match peft_type {
        "LORA" => &[PEFT_FIELDS, LORA_FIELDS],
        "IA3" => &[PEFT_FIELDS, IA3_FIELDS],
        other => return Err(bad(&config_path, format!("peft_type `{other}` is not supported (LORA and IA3 are)"))),
    };
    check_fields(json, rules).and_then(|()| check_modules_to_save(json)).map_err(|m| bad(&config_path, m))?;
    if peft_type == "IA3" {
        return load_ia3(dir, json, model, device);
    }
    let weights = weights_file(dir);
    let tensors = read_tensors(&weights, device)?;
    let mut pairs: HashMap<Point, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    let mut magnitudes: HashMap<String, Tensor> = HashMap::new();
    let use_dora = json["use_dora"].as_bool().unwrap_or(false);
    for (key, t) in tensors {
        let stripped = key.strip_prefix(PREFIX).unwrap_or(&key);
        if is_classifier(stripped, json) {
            continue;
        }
        // DoRA's magnitude (older PEFT versions add `.weight`).
        if let Some(m) = stripped.strip_suffix(".lora_magnitude_vector").or_else(|| stripped.strip_suffix(".lora_magnitude_vector.weight"))
        {
            if !use_dora {
                return Err(bad(&weights, format!("tensor `{key}` is a DoRA magnitude, but the config has no `use_dora = true`")));
            }
            let point = point_of(m, model).ok_or_else(|| bad(&weights, format!("tensor `{key}`: `{m}` is not a projection")))?;
            magnitudes.insert(Lora::magnitude_name(point), t);
            continue;
        }
        let (module, which) = if let Some(m) = stripped.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = stripped.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else if stripped.contains(".lora_embedding_A") || stripped.contains(".lora_embedding_B") {
            return Err(bad(&weights, format!("tensor `{key}` (lora_embedding_A/B): LoRA on embedding layers is not supported")));
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
    // Points of the layers x sites grid that PEFT left out (`exclude_modules`, a regex)
    // get a zero update: B = 0 adds nothing, exactly as an unadapted module.
    let (placement, missing, _) = grid_placement(complete.keys().copied(), model);
    let r = json["r"].as_u64().unwrap_or(8) as usize;
    for p in missing {
        let spec = model.spec(p).expect("point of the model");
        let zero = |rows, cols| Tensor::zeros((rows, cols), candle_core::DType::F32, device);
        complete.insert(p, (zero(r, spec.in_features)?, zero(spec.out_features, r)?));
    }
    // Ranks come from the tensors (exact), alphas from the config's patterns.
    let alpha = json["lora_alpha"].as_f64().unwrap_or(8.0);
    let modules: Vec<String> = complete.keys().map(|p| model.spec(*p).expect("point of the model").module.clone()).collect();
    let alpha_pattern = alpha_by_module(&json["alpha_pattern"], &modules).map_err(|m| bad(&config_path, m))?;
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
        use_dora,
    };
    let config_json = serde_json::to_value(&config).expect("json");
    let adapter = Lora::build(&BuildArgs { config: &config_json, placement: &placement, model, device, seed: 0 })?;
    let mut by_var = tensors_by_point(complete);
    if use_dora {
        // A module PEFT left out starts as DoRA does, at ‖W‖: NaN until the first forward.
        for (name, var) in adapter.vars().into_iter().filter(|(n, _)| n.ends_with("lora_magnitude_vector")) {
            let t = match magnitudes.remove(&name) {
                Some(t) => t,
                None => Tensor::full(f32::NAN, var.dims(), device)?,
            };
            by_var.insert(name, t);
        }
    }
    fill_vars(&adapter, by_var, &weights)?;
    let name = folder_name(dir);
    Ok(Loaded { name, adapter: Box::new(adapter), placement, format: "peft" })
}

fn folder_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into())
}

/// A PEFT IA3 folder: `<module>.ia3_l` vectors, `[1, in]` where the input is scaled
/// (`feedforward_modules`), `[out, 1]` where the output is.
fn load_ia3(dir: &Path, json: &Value, model: &ModelInfo, device: &Device) -> Result<Loaded, Error> {
    let weights = weights_file(dir);
    let mut scales: HashMap<Point, (Tensor, bool)> = HashMap::new();
    for (key, t) in read_tensors(&weights, device)? {
        let stripped = key.strip_prefix(PREFIX).unwrap_or(&key);
        if is_classifier(stripped, json) {
            continue;
        }
        let module = stripped.strip_suffix(".ia3_l").ok_or_else(|| bad(&weights, format!("tensor `{key}` is not an IA3 vector")))?;
        let point = point_of(module, model).ok_or_else(|| {
            bad(&weights, format!("tensor `{key}`: module `{module}` is not a projection of this {} model", model.architecture))
        })?;
        let input_scaled = t.dim(0)? == 1 && t.rank() == 2 && t.dim(1)? > 1;
        scales.insert(point, (t.flatten_all()?, input_scaled));
    }
    if scales.is_empty() {
        return Err(bad(&weights, "holds no IA3 vectors".into()));
    }
    let mut feedforward_sites: Vec<Site> = Vec::new();
    for (p, (_, input_scaled)) in &scales {
        if *input_scaled && !feedforward_sites.contains(&p.site) {
            feedforward_sites.push(p.site);
        }
    }
    if let Some((p, _)) = scales.iter().find(|(p, (_, i))| feedforward_sites.contains(&p.site) != *i) {
        return Err(bad(&weights, format!("{p}: scales its output where the same site elsewhere scales its input; not supported")));
    }
    feedforward_sites.sort();
    // Points of the grid without a vector scale by one: unchanged.
    let (placement, missing, _) = grid_placement(scales.keys().copied(), model);
    let config = crate::Ia3Config { feedforward_sites };
    let config_json = serde_json::to_value(&config).expect("json");
    let adapter = crate::Ia3::build(&BuildArgs { config: &config_json, placement: &placement, model, device, seed: 0 })?;
    let mut by_var: HashMap<String, Tensor> = scales.into_iter().map(|(p, (t, _))| (p.var_name("ia3_l"), t)).collect();
    for p in missing {
        let spec = model.spec(p).expect("point of the model");
        let n = if config.feedforward_sites.contains(&p.site) { spec.in_features } else { spec.out_features };
        by_var.insert(p.var_name("ia3_l"), Tensor::ones(n, candle_core::DType::F32, device)?);
    }
    fill_vars(&adapter, by_var, &weights)?;
    Ok(Loaded { name: folder_name(dir), adapter: Box::new(adapter), placement, format: "peft" })
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
        // A magnitude not set yet (NaN: no forward ran) is left out: PEFT then starts it at
        // ‖W + s·BA‖, which is what it stands for.
        if let Some(m) =
            vars.get(&Lora::magnitude_name(*p)).filter(|m| m.as_tensor().to_vec1::<f32>().is_ok_and(|v| !v.iter().any(|x| x.is_nan())))
        {
            tensors.insert(format!("{PREFIX}{module}.lora_magnitude_vector"), m.as_tensor().clone());
        }
    }
    let layers: BTreeSet<usize> = points.iter().map(|p| p.layer).collect();
    let layers_to_transform = if layers.len() == model.num_layers { Value::Null } else { json!(layers) };
    save_tensors_atomic(&tensors, &dir.join(WEIGHTS_FILE))?;
    let file = json!({
        "peft_type": "LORA", "task_type": null, "base_model_name_or_path": base_model_name,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
        "target_modules": targets, "rank_pattern": rank_pattern, "alpha_pattern": config.alpha_pattern,
        "layers_to_transform": layers_to_transform, "layers_pattern": null,
        "bias": "none", "fan_in_fan_out": false, "use_dora": config.use_dora, "modules_to_save": null,
        "init_lora_weights": true, "inference_mode": true, "revision": null,
    });
    write_atomic(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&file).expect("json").as_bytes())
}
