//! The bottleneck configuration. Field names follow AdapterHub's `BnConfig`, so configs
//! translate one to one; the three kinds differ only in their defaults.

use adapters_core::registry::parse_config;
pub use adapters_core::Activation;
use adapters_core::{Error, Site};
use serde::{Deserialize, Serialize};

/// How the adapter output is scaled: a fixed number, a learned scalar, or a learned
/// per-channel vector.
#[derive(Clone, Debug, PartialEq)]
pub enum Scaling {
    /// A fixed factor.
    Fixed(f64),
    /// One learned scalar.
    Learned,
    /// A learned factor per channel.
    Channel,
}

impl Serialize for Scaling {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Scaling::Fixed(v) => s.serialize_f64(*v),
            Scaling::Learned => s.serialize_str("learned"),
            Scaling::Channel => s.serialize_str("channel"),
        }
    }
}

impl<'de> Deserialize<'de> for Scaling {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => Ok(Scaling::Fixed(n.as_f64().unwrap_or(1.0))),
            serde_json::Value::String(s) if s == "learned" => Ok(Scaling::Learned),
            serde_json::Value::String(s) if s == "channel" => Ok(Scaling::Channel),
            other => Err(serde::de::Error::custom(format!("scaling must be a number, \"learned\" or \"channel\", not {other}"))),
        }
    }
}

/// Initialisation of the projections.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitWeights {
    /// Both projections normal(0, 0.02), biases zero (AdapterHub's `bert`).
    Bert,
    /// Down projection kaiming-uniform, up projection and biases zero: the adapter starts
    /// as the identity (AdapterHub's `mam_adapter`).
    MamAdapter,
    /// Both projections truncated normal(0, 0.01) within ±0.02, biases zero
    /// (AdapterHub's `houlsby`, used by its `AdapterPlusConfig`).
    Houlsby,
}

/// Which tensor the residual around a sequential adapter is (AdapterHub's
/// `residual_before_ln`): what the adapter's output is added to before the backbone's
/// own residual add and norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ResidualBeforeLn {
    /// `true`: the sublayer's output, before the backbone's residual add and norm.
    #[default]
    Output,
    /// `false`: the adapter's input (with `original_ln_before`, the post-norm sum).
    AdapterInput,
    /// `"post_add"`: the sublayer output plus the residual stream, before the norm.
    PostAdd,
}

impl ResidualBeforeLn {
    fn is_default(&self) -> bool {
        *self == ResidualBeforeLn::Output
    }
}

impl Serialize for ResidualBeforeLn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ResidualBeforeLn::Output => s.serialize_bool(true),
            ResidualBeforeLn::AdapterInput => s.serialize_bool(false),
            ResidualBeforeLn::PostAdd => s.serialize_str("post_add"),
        }
    }
}

impl<'de> Deserialize<'de> for ResidualBeforeLn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Bool(true) => Ok(ResidualBeforeLn::Output),
            serde_json::Value::Bool(false) => Ok(ResidualBeforeLn::AdapterInput),
            serde_json::Value::String(s) if s == "post_add" => Ok(ResidualBeforeLn::PostAdd),
            other => Err(serde::de::Error::custom(format!("residual_before_ln must be true, false or \"post_add\", not {other}"))),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// A bottleneck adapter's full configuration (AdapterHub's `BnConfig` fields we support).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BottleneckConfig {
    /// Bottleneck width = ⌊hidden size / reduction_factor⌋ (Python's `//`; at least 1),
    /// unless `bottleneck_size` is set.
    pub reduction_factor: f64,
    /// An explicit bottleneck width, overriding `reduction_factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bottleneck_size: Option<usize>,
    /// Activation between the projections.
    pub non_linearity: Activation,
    /// Sequential adapters: feed the sublayer's post-norm output to the adapter (Pfeiffer)
    /// instead of the raw sublayer output (Houlsby).
    pub original_ln_before: bool,
    /// Parallel adapter: it reads the sublayer's input (He et al.).
    pub is_parallel: bool,
    /// How the adapter output is scaled.
    pub scaling: Scaling,
    /// A LayerNorm of the adapter's own before the down projection.
    pub ln_before: bool,
    /// A LayerNorm of the adapter's own after the up projection.
    pub ln_after: bool,
    /// Dropout on the adapter output, in training only.
    pub dropout: f64,
    /// A learned sigmoid gate on the adapter output, one value per sequence: the mean
    /// over the sequence's tokens of σ(gate(adapter input)), as AdapterHub gates.
    pub use_gating: bool,
    /// Which tensor the adapter's output is added to (sequential adapters).
    #[serde(default, skip_serializing_if = "ResidualBeforeLn::is_default")]
    pub residual_before_ln: ResidualBeforeLn,
    /// With `ln_after`: add the residual before the adapter's own norm, not after it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub adapter_residual_before_ln: bool,
    /// Sequential adapters, in training: drop a whole sequence's adapter output with this
    /// probability, scaling the kept ones by 1 / (1 − p) (torchvision's row-mode stochastic
    /// depth, as AdapterHub applies it). No effect at inference.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stochastic_depth: f64,
    /// How the projections start.
    pub init_weights: InitWeights,
}

impl BottleneckConfig {
    /// The width at a layer of a model with this hidden size (before per-layer overrides).
    pub fn default_size(&self, hidden: usize) -> usize {
        self.bottleneck_size.unwrap_or_else(|| width_for(hidden, self.reduction_factor))
    }
}

/// AdapterHub's width for a reduction factor: `max(int(hidden // reduction_factor), 1)`,
/// with Python's float floor division (which can differ from ⌊hidden / rf⌋ by one).
pub fn width_for(hidden: usize, reduction_factor: f64) -> usize {
    let (x, w) = (hidden as f64, reduction_factor);
    // CPython's float_floor_div.
    let m = x % w;
    let mut div = (x - m) / w;
    if m != 0.0 && ((w < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    let mut floor = div.floor();
    if div - floor > 0.5 {
        floor += 1.0;
    }
    (floor.max(0.0) as usize).max(1)
}

/// The registered kinds and their defaults.
pub struct KindDefaults {
    /// The registered kind name.
    pub name: &'static str,
    /// The sites it occupies by default.
    pub sites: &'static [Site],
    /// Its default field values.
    pub defaults: fn() -> serde_json::Value,
}

/// Pfeiffer: after the FFN, reading the post-norm output.
pub const SEQ_BN: KindDefaults = KindDefaults {
    name: "seq_bn",
    sites: &[Site::FfnOutput],
    defaults: || {
        serde_json::json!({
            "reduction_factor": 16.0, "non_linearity": "relu", "original_ln_before": true, "is_parallel": false,
            "scaling": 1.0, "ln_before": false, "ln_after": false, "dropout": 0.0, "use_gating": false, "init_weights": "bert"
        })
    },
};

/// Houlsby: after attention and after the FFN.
pub const DOUBLE_SEQ_BN: KindDefaults = KindDefaults {
    name: "double_seq_bn",
    sites: &[Site::AttentionOutput, Site::FfnOutput],
    defaults: || {
        serde_json::json!({
            "reduction_factor": 16.0, "non_linearity": "swish", "original_ln_before": false, "is_parallel": false,
            "scaling": 1.0, "ln_before": false, "ln_after": false, "dropout": 0.0, "use_gating": false, "init_weights": "bert"
        })
    },
};

/// He et al.: beside the FFN, reading its input, scaled by 4.
pub const PAR_BN: KindDefaults = KindDefaults {
    name: "par_bn",
    sites: &[Site::FfnOutput],
    defaults: || {
        serde_json::json!({
            "reduction_factor": 2.0, "non_linearity": "relu", "original_ln_before": false, "is_parallel": true,
            "scaling": 4.0, "ln_before": false, "ln_after": false, "dropout": 0.0, "use_gating": false, "init_weights": "mam_adapter"
        })
    },
};

/// Every bottleneck kind.
pub const KINDS: [&KindDefaults; 3] = [&SEQ_BN, &DOUBLE_SEQ_BN, &PAR_BN];

/// The kind's defaults overlaid with the user's fields; unknown fields are errors.
pub fn resolve(kind: &KindDefaults, user: &serde_json::Value) -> Result<BottleneckConfig, Error> {
    let mut merged = (kind.defaults)();
    match user {
        serde_json::Value::Object(fields) => {
            for (k, v) in fields {
                merged[k] = v.clone();
            }
        }
        serde_json::Value::Null => {}
        other => return Err(Error::Config { kind: kind.name.into(), message: format!("expected a table of fields, got {other}") }),
    }
    let config: BottleneckConfig = parse_config(kind.name, &merged)?;
    if config.reduction_factor.is_nan() || config.reduction_factor <= 0.0 {
        return Err(Error::Config {
            kind: kind.name.into(),
            message: format!("reduction_factor must be positive, got {}", config.reduction_factor),
        });
    }
    if !(0.0..1.0).contains(&config.dropout) {
        return Err(Error::Config { kind: kind.name.into(), message: format!("dropout must be in [0, 1), got {}", config.dropout) });
    }
    if !(0.0..1.0).contains(&config.stochastic_depth) {
        return Err(Error::Config {
            kind: kind.name.into(),
            message: format!("stochastic_depth must be in [0, 1), got {}", config.stochastic_depth),
        });
    }
    if config.residual_before_ln == ResidualBeforeLn::PostAdd && !config.original_ln_before && !config.is_parallel {
        return Err(Error::Config {
            kind: kind.name.into(),
            message: "residual_before_ln = \"post_add\" needs original_ln_before = true (there is no residual add before the \
                      adapter to take it after; AdapterHub fails on this combination too)"
                .into(),
        });
    }
    Ok(config)
}
