//! The AdapterFusion layer (Pfeiffer et al. 2021, AdapterHub's `BertFusion`): at each hidden
//! site its member adapters share, attention over the members' outputs per token, with
//! the sublayer's (normalised) output as the query.

use adapters_core::{
    registry, Adapter, BuildArgs, Capabilities, Error, ForwardCtx, FuseMember, Fused, FusionLayer, Init, Point, Site, SublayerIo,
};
use adapters_kernels as kernels;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The fusion's configuration: AdapterHub's `AdapterFusionConfig` fields, plus the members.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusionConfig {
    /// The fused adapters' names, in order (the order of the attention weights).
    pub members: Vec<String>,
    /// A learned query projection of the sublayer output.
    pub key: bool,
    /// A learned key projection of each member's output.
    pub query: bool,
    /// A learned value projection (no bias) of each member's output.
    pub value: bool,
    /// Start the value projection at the identity (off-diagonal 1e-6), as AdapterHub does.
    pub value_initialized: bool,
    /// Apply the value projection to each member before the weighted sum (else after it).
    pub value_before_softmax: bool,
    /// Add the residual to each member's output before the values (else to the result).
    pub residual_before: bool,
    /// Take the query before the backbone's norm (the raw sublayer output).
    pub query_before_ln: bool,
    /// Softmax temperature starting at 50 and falling by 0.05 per training forward to 1
    /// (AdapterHub also lowers it in evaluation forwards; here only training moves it).
    pub temperature: bool,
    /// Dropout on the attention scores in training; `None`: 0.1 (BERT's attention dropout).
    pub dropout_prob: Option<f64>,
    /// Add `0.01 · ‖I − W_V‖²` per site to the training loss (needs `value`).
    pub regularization: bool,
}

impl FusionConfig {
    /// AdapterHub's `dynamic` configuration (query, key and value; value regularised).
    pub fn dynamic(members: Vec<String>) -> Self {
        FusionConfig {
            members,
            key: true,
            query: true,
            value: true,
            value_initialized: true,
            value_before_softmax: true,
            residual_before: false,
            query_before_ln: false,
            temperature: false,
            dropout_prob: None,
            regularization: true,
        }
    }

    /// AdapterHub's `static` configuration (query and key only).
    pub fn static_(members: Vec<String>) -> Self {
        FusionConfig { value: false, value_initialized: false, regularization: false, ..Self::dynamic(members) }
    }

    /// Reads a configuration: `preset` (`"dynamic"`, default, or `"static"`) gives the
    /// defaults, any other field overrides them; `members` is required.
    pub fn parse(kind: &str, json: &serde_json::Value) -> std::result::Result<Self, Error> {
        let bad = |message: String| Error::Config { kind: kind.into(), message };
        let mut object = json.as_object().cloned().ok_or_else(|| bad("the configuration must be a table".into()))?;
        let preset = match object.remove("preset") {
            None => "dynamic".to_string(),
            Some(serde_json::Value::String(s)) => s,
            Some(other) => return Err(bad(format!("`preset` must be \"dynamic\" or \"static\", not {other}"))),
        };
        let base = match preset.as_str() {
            "dynamic" => FusionConfig::dynamic(vec![]),
            "static" => FusionConfig::static_(vec![]),
            other => return Err(bad(format!("`preset` must be \"dynamic\" or \"static\", not \"{other}\""))),
        };
        if !object.contains_key("members") {
            return Err(bad("`members` is required: the names of the adapters to fuse, e.g. [\"sentiment\", \"topic\"]".into()));
        }
        let mut full = serde_json::to_value(base).expect("configs serialise");
        for (k, v) in object {
            full[k] = v;
        }
        let config: FusionConfig = registry::parse_config(kind, &full)?;
        if config.members.len() < 2 {
            return Err(bad(format!("`members` names {} adapter(s); a fusion needs at least two", config.members.len())));
        }
        if config.regularization && !config.value {
            return Err(bad("`regularization` needs `value = true` (it pulls the value matrix towards the identity)".into()));
        }
        if let Some(p) = config.dropout_prob.filter(|p| !(0.0..1.0).contains(p)) {
            return Err(bad(format!("`dropout_prob` = {p} is outside [0, 1)")));
        }
        Ok(config)
    }
}

/// The fusion parameters at one site.
struct SiteLayer {
    query: Option<(Var, Var)>,
    key: Option<(Var, Var)>,
    value: Option<Var>,
    /// The current softmax temperature (falls during training when `temperature` is on).
    temperature: Mutex<f64>,
}

/// An AdapterFusion layer over named member adapters, at the hidden sites they share.
pub struct Fusion {
    config: FusionConfig,
    sites: BTreeMap<Point, SiteLayer>,
}

/// Temperature at the start of training when the schedule is on (AdapterHub's `T`).
const START_TEMPERATURE: f64 = 50.0;
/// Weight of the value regularisation (AdapterHub's `0.01`).
const VALUE_REGULARIZATION: f64 = 0.01;

impl Fusion {
    /// Builds a fusion layer from registry arguments: its sites are the placement's hidden
    /// sites (those its members occupy; by default after the FFN, where Pfeiffer adapters sit).
    pub fn build(args: &BuildArgs) -> std::result::Result<Self, Error> {
        let config = FusionConfig::parse(crate::KIND, args.config)?;
        let points = args.placement.expand(args.model, &[Site::FfnOutput], |s| s.is_hidden())?;
        let mut init = Init::new(args.seed);
        let dev = args.device;
        let mut sites = BTreeMap::new();
        for spec in points {
            let d = spec.out_features;
            let linear = |init: &mut Init| -> Result<(Var, Var)> {
                Ok((Var::from_tensor(&init.normal((d, d), 0.02, dev)?)?, Var::from_tensor(&Tensor::zeros(d, DType::F32, dev)?)?))
            };
            let query = if config.query { Some(linear(&mut init)?) } else { None };
            let key = if config.key { Some(linear(&mut init)?) } else { None };
            let value = if !config.value {
                None
            } else if config.value_initialized {
                Some(Var::from_tensor(&near_identity(d, dev)?)?)
            } else {
                Some(Var::from_tensor(&init.normal((d, d), 0.02, dev)?)?)
            };
            let start = if config.temperature { START_TEMPERATURE } else { 1.0 };
            sites.insert(spec.point, SiteLayer { query, key, value, temperature: Mutex::new(start) });
        }
        Ok(Fusion { config, sites })
    }

    /// The configuration it was built with.
    pub fn settings(&self) -> &FusionConfig {
        &self.config
    }
}

/// AdapterHub's identity start for the value matrix: 1 on the diagonal, 1e-6 elsewhere.
fn near_identity(d: usize, dev: &Device) -> Result<Tensor> {
    Tensor::eye(d, DType::F32, dev)?.affine(1.0 - 1e-6, 1e-6)
}

/// A boolean field of a member's saved configuration (bottleneck adapters), with a default.
fn member_flag(member: &dyn Adapter, field: &str, default: bool) -> bool {
    member.config().get(field).and_then(|v| v.as_bool()).unwrap_or(default)
}

impl Adapter for Fusion {
    fn kind(&self) -> &str {
        crate::KIND
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("configs serialise")
    }

    fn points(&self) -> Vec<Point> {
        self.sites.keys().copied().collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (p, s) in &self.sites {
            let mut push = |name: &str, v: &Var| out.push((p.var_name(name), v.clone()));
            if let Some((w, b)) = &s.query {
                push("query.weight", w);
                push("query.bias", b);
            }
            if let Some((w, b)) = &s.key {
                push("key.weight", w);
                push("key.bias", b);
            }
            if let Some(w) = &s.value {
                push("value.weight", w);
            }
        }
        out
    }

    fn capabilities(&self) -> Capabilities<'_> {
        Capabilities { fusion: Some(self), ..Default::default() }
    }
}

impl FusionLayer for Fusion {
    fn members(&self) -> Vec<String> {
        self.config.members.clone()
    }

    fn fuse(&self, point: Point, io: &SublayerIo, members: &[FuseMember], ctx: &ForwardCtx) -> Result<Fused> {
        let Some(site) = self.sites.get(&point) else {
            candle_core::bail!("the fusion over {} has no layer at {point}", self.config.members.join(", "))
        };
        let Some(last) = members.last() else { candle_core::bail!("a fusion at {point} got no member outputs") };
        let c = &self.config;
        // What the last member reads (AdapterHub's `pre_forward` of the last fused adapter):
        // the sublayer output, normalised together with the residual stream when the member
        // reads the post-norm output (Pfeiffer), and its residual.
        let original_ln_before = last.adapter.is_none_or(|a| member_flag(a, "original_ln_before", true));
        let residual_before_ln = last.adapter.is_none_or(|a| member_flag(a, "residual_before_ln", true));
        let normed = match (original_ln_before, io.post_norm) {
            (true, Some(norm)) => norm(io.output, io.input)?,
            (true, None) => (io.input + io.output)?,
            (false, _) => io.output.clone(),
        };
        let residual = if residual_before_ln { io.output.clone() } else { normed.clone() };
        let query = if c.query_before_ln { io.output.clone() } else { normed };

        // Each member's own contribution: its output minus the sublayer output it was given.
        let ups = members.iter().map(|m| &m.output - io.output).collect::<Result<Vec<_>>>()?;
        let ups = Tensor::stack(&ups, 2)?; // [b, t, n, d]
        let values = if c.residual_before { ups.broadcast_add(&residual.unsqueeze(2)?)? } else { ups.clone() };
        let q = match &site.query {
            Some((w, b)) => kernels::linear(&query, w.as_tensor(), Some(b.as_tensor()))?,
            None => query,
        };
        let k = match &site.key {
            Some((w, b)) => kernels::linear(&ups, w.as_tensor(), Some(b.as_tensor()))?,
            None => ups,
        };
        let v = match (&site.value, c.value_before_softmax) {
            (Some(w), true) => kernels::linear(&values, w.as_tensor(), None)?,
            _ => values,
        };
        let scores = k.broadcast_mul(&q.unsqueeze(2)?)?.sum(D::Minus1)?; // [b, t, n]
        let scores = if ctx.is_training() { ctx.dropout(&scores, c.dropout_prob.unwrap_or(0.1))? } else { scores };
        let temperature = {
            let mut t = site.temperature.lock().expect("fusion temperature");
            let now = *t;
            if ctx.is_training() && c.temperature {
                *t = (now - START_TEMPERATURE / 1000.0).max(1.0);
            }
            now
        };
        let probs = candle_nn::ops::softmax(&(scores / temperature)?, D::Minus1)?; // softmax_last_dim has no backward
        let mut context = v.broadcast_mul(&probs.unsqueeze(3)?)?.sum(2)?; // [b, t, d]
        if let (Some(w), false) = (&site.value, c.value_before_softmax) {
            context = kernels::linear(&context, w.as_tensor(), None)?;
        }
        let output = if c.residual_before { context } else { (context + residual)? };
        let regularization = match (&site.value, c.regularization && ctx.is_training()) {
            (Some(w), true) => {
                let d = w.dim(0)?;
                let gap = (Tensor::eye(d, DType::F32, w.device())? - w.as_tensor())?;
                Some((gap.sqr()?.sum_all()? * VALUE_REGULARIZATION)?)
            }
            _ => None,
        };
        Ok(Fused { output, attention: probs, regularization })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adapters_core::{ModelInfo, Placement, PointSpec};

    const D: usize = 6;

    fn model() -> ModelInfo {
        let point = Point::new(0, Site::FfnOutput);
        ModelInfo {
            architecture: "bert".into(),
            hidden_size: D,
            num_layers: 1,
            vocab_size: 10,
            points: vec![PointSpec { point, in_features: D, out_features: D, module: "encoder.layer.0.output".into() }],
        }
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut init = Init::new(seed);
        init.normal(shape, 1.0, &Device::Cpu).unwrap()
    }

    /// A fusion with `overrides` on the dynamic preset, its weights moved off their
    /// initialisation so that every path matters.
    fn fusion(overrides: serde_json::Value) -> Fusion {
        let mut config = serde_json::json!({ "members": ["a", "b", "c"] });
        for (k, v) in overrides.as_object().unwrap() {
            config[k] = v.clone();
        }
        let f =
            Fusion::build(&BuildArgs { config: &config, placement: &Placement::default(), model: &model(), device: &Device::Cpu, seed: 3 })
                .unwrap();
        for (i, (_, var)) in f.vars().iter().enumerate() {
            var.set(&(var.as_tensor() + (randn(var.dims(), 50 + i as u64) * 0.3).unwrap()).unwrap()).unwrap();
        }
        f
    }

    /// The loss `Σ output · R` of the fusion at the point, for members given as outputs.
    fn loss(f: &Fusion, input: &Tensor, output: &Tensor, members: &[Tensor]) -> Tensor {
        let norm = |y: &Tensor, x: &Tensor| (y + x)?.affine(0.5, 0.1);
        let io = SublayerIo { input, output, post_norm: Some(&norm) };
        let members: Vec<FuseMember> = members.iter().map(|m| FuseMember { adapter: None, output: m.clone() }).collect();
        let fused = f.fuse(Point::new(0, Site::FfnOutput), &io, &members, &ForwardCtx::inference()).unwrap();
        let sums = fused.attention.sum(candle_core::D::Minus1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "attention rows sum to 1");
        (fused.output * randn(&[1, 2, D], 99)).unwrap().sum_all().unwrap()
    }

    /// Every fusion weight's gradient and a member output's against central finite
    /// differences, for the presets and each option that changes the maths.
    #[test]
    fn gradients_match_finite_differences_for_every_option() {
        let (input, output) = (randn(&[1, 2, D], 1), randn(&[1, 2, D], 2));
        for overrides in [
            serde_json::json!({}),
            serde_json::json!({ "preset": "static" }),
            serde_json::json!({ "residual_before": true }),
            serde_json::json!({ "value_before_softmax": false }),
            serde_json::json!({ "query_before_ln": true }),
        ] {
            let f = fusion(overrides.clone());
            let member = Var::from_tensor(&randn(&[1, 2, D], 7)).unwrap();
            let members = vec![member.as_tensor().clone(), randn(&[1, 2, D], 8), randn(&[1, 2, D], 9)];
            let grads = loss(&f, &input, &output, &members).backward().unwrap();
            let mut vars: Vec<(String, Var)> = f.vars();
            vars.push(("member a".into(), member.clone()));
            for (name, var) in vars {
                let analytic = grads.get(&var).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let flat = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for j in [0, flat.len() / 2, flat.len() - 1] {
                    let at = |delta: f32| -> f64 {
                        let mut v = flat.clone();
                        v[j] += delta;
                        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                        let members = vec![member.as_tensor().clone(), members[1].clone(), members[2].clone()];
                        let l = loss(&f, &input, &output, &members).to_scalar::<f32>().unwrap() as f64;
                        var.set(&Tensor::from_vec(flat.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                        l
                    };
                    let h = 1e-2;
                    let numeric = (at(h) - at(-h)) / (2.0 * h as f64);
                    let err = (numeric - analytic[j] as f64).abs();
                    assert!(err < 2e-2 * (1.0 + numeric.abs()), "{overrides}: {name}[{j}] analytic {} vs {numeric}", analytic[j]);
                }
            }
        }
    }

    /// With `temperature`, training starts at T = 50 (flatter attention than T = 1) and
    /// falls by 0.05 per training forward to 1, where it equals the fusion without it.
    #[test]
    fn the_temperature_schedule_starts_flat_and_ends_at_one() {
        let (x, y) = (randn(&[1, 2, D], 1), randn(&[1, 2, D], 2));
        let members: Vec<FuseMember> = (0..3).map(|i| FuseMember { adapter: None, output: randn(&[1, 2, D], 20 + i) }).collect();
        let io = SublayerIo { input: &x, output: &y, post_norm: None };
        let point = Point::new(0, Site::FfnOutput);
        let ctx = ForwardCtx::training_seeded(1);
        let (warm, plain) =
            (fusion(serde_json::json!({ "temperature": true, "dropout_prob": 0.0 })), fusion(serde_json::json!({ "dropout_prob": 0.0 })));
        let spread = |f: &Fusion| -> f32 {
            let a = f.fuse(point, &io, &members, &ctx).unwrap().attention;
            (a.max(candle_core::D::Minus1).unwrap() - a.min(candle_core::D::Minus1).unwrap())
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(spread(&warm) < spread(&plain) / 5.0, "T = 50 flattens the attention");
        for _ in 0..1000 {
            spread(&warm);
        }
        assert!((spread(&warm) - spread(&plain)).abs() < 1e-6, "after 980 steps T is 1");
    }

    /// Dropout on the attention scores acts in training only, draws its mask from the
    /// context's seeded generator, and is off at `dropout_prob = 0`.
    #[test]
    fn score_dropout_is_seeded_and_only_in_training() {
        let (x, y) = (randn(&[2, 8, D], 1), randn(&[2, 8, D], 2));
        let members: Vec<FuseMember> = (0..3).map(|i| FuseMember { adapter: None, output: randn(&[2, 8, D], 30 + i) }).collect();
        let io = SublayerIo { input: &x, output: &y, post_norm: None };
        let point = Point::new(0, Site::FfnOutput);
        let attention = |f: &Fusion, ctx: &ForwardCtx| f.fuse(point, &io, &members, ctx).unwrap().attention;
        let (dropping, plain) = (fusion(serde_json::json!({ "dropout_prob": 0.5 })), fusion(serde_json::json!({ "dropout_prob": 0.0 })));
        let inference = attention(&dropping, &ForwardCtx::inference());
        let differs = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-4;
        let (first, again) = (attention(&dropping, &ForwardCtx::training_seeded(5)), attention(&dropping, &ForwardCtx::training_seeded(5)));
        assert!(differs(&first, &inference), "dropout changes the training attention");
        assert!(!differs(&first, &again), "the same seed draws the same mask");
        assert!(differs(&first, &attention(&dropping, &ForwardCtx::training_seeded(6))), "another seed, another mask");
        assert!(!differs(&inference, &attention(&plain, &ForwardCtx::inference())), "no dropout in inference");
        assert!(!differs(&attention(&plain, &ForwardCtx::training_seeded(5)), &inference), "dropout_prob = 0 turns it off");
    }

    #[test]
    fn configs_are_checked_with_the_field_named() {
        let build = |c: serde_json::Value| {
            Fusion::build(&BuildArgs { config: &c, placement: &Placement::default(), model: &model(), device: &Device::Cpu, seed: 0 })
                .err()
                .unwrap()
                .to_string()
        };
        assert!(build(serde_json::json!({})).contains("`members` is required"));
        assert!(build(serde_json::json!({ "members": ["a"] })).contains("a fusion needs at least two"));
        assert!(build(serde_json::json!({ "members": ["a", "b"], "preset": "fancy" })).contains("`preset`"));
        assert!(build(serde_json::json!({ "members": ["a", "b"], "value": false })).contains("`regularization` needs `value = true`"));
        assert!(build(serde_json::json!({ "members": ["a", "b"], "tempreature": true })).contains("tempreature"));
    }

    #[test]
    fn the_value_matrix_starts_at_the_identity_and_regularisation_measures_the_gap() {
        let f = Fusion::build(&BuildArgs {
            config: &serde_json::json!({ "members": ["a", "b"] }),
            placement: &Placement::default(),
            model: &model(),
            device: &Device::Cpu,
            seed: 0,
        })
        .unwrap();
        let (_, value) = f.vars().into_iter().find(|(n, _)| n.ends_with("value.weight")).unwrap();
        let v = value.as_tensor().to_vec2::<f32>().unwrap();
        assert!(v[0][0] == 1.0 && v[0][1] == 1e-6);
        // In training the gap is reported: 0.01 · ‖I − W‖² = 0.01 · (D² − D) · 1e-12 here.
        let (x, y) = (randn(&[1, 2, D], 1), randn(&[1, 2, D], 2));
        let io = SublayerIo { input: &x, output: &y, post_norm: None };
        let members: Vec<FuseMember> = (0..2).map(|i| FuseMember { adapter: None, output: randn(&[1, 2, D], 10 + i) }).collect();
        let fused = f.fuse(Point::new(0, Site::FfnOutput), &io, &members, &ForwardCtx::training_seeded(1)).unwrap();
        let reg = fused.regularization.unwrap().to_scalar::<f32>().unwrap();
        assert!((reg - 0.01 * (D * D - D) as f32 * 1e-12).abs() < 1e-15, "{reg}");
        assert!(f.fuse(Point::new(0, Site::FfnOutput), &io, &members, &ForwardCtx::inference()).unwrap().regularization.is_none());
    }
}
