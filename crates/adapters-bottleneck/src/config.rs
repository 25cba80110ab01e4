//! The bottleneck configuration. Field names follow AdapterHub's `BnConfig`, so configs
//! translate one to one; the three kinds differ only in their defaults.

use adapters_core::registry::parse_config;
use adapters_core::{Error, Site};
use serde::{Deserialize, Serialize};

/// The non-linearity between the down and up projections.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `relu`.
    Relu,
    /// `gelu` (exact).
    Gelu,
    /// SiLU, as AdapterHub names it.
    Swish,
    /// `silu` (same as `swish`).
    Silu,
    /// `tanh`.
    Tanh,
}

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
}

/// A bottleneck adapter's full configuration (AdapterHub's `BnConfig` fields we support).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BottleneckConfig {
    /// Bottleneck width = hidden size / reduction_factor (unless `bottleneck_size` is set).
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
    /// A learned sigmoid gate on the adapter output.
    pub use_gating: bool,
    /// How the projections start.
    pub init_weights: InitWeights,
}

impl BottleneckConfig {
    /// The width at a layer of a model with this hidden size (before per-layer overrides).
    pub fn default_size(&self, hidden: usize) -> usize {
        self.bottleneck_size.unwrap_or_else(|| ((hidden as f64 / self.reduction_factor) as usize).max(1))
    }
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
    Ok(config)
}
