//! Where an adapter can sit in a backbone: a (layer, site) pair, and the sizes seen there.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A kind of site inside one transformer layer (or at its input or output).
///
/// Hidden sites sit between sublayers: the adapter sees the sublayer's input (the residual
/// stream entering it) and its output, so sequential (Pfeiffer, Houlsby) and parallel
/// (He et al.) adapters, fusion, mixtures and hypernetwork adapters all live there.
/// Projection sites sit on one linear layer: the adapter sees the projection's input and
/// output and may add a delta (LoRA) or rescale (IA3), or be merged into the weight.
/// The other kinds ([`SiteKind`]) serve the families that change attention's keys and
/// values (prefix tuning), the token embeddings (prompt tuning, invertible adapters) or a
/// layer's output at chosen positions (ReFT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    /// After the self-attention sublayer (before its residual add / post-norm).
    AttentionOutput,
    /// After the feed-forward sublayer (before its residual add / post-norm).
    FfnOutput,
    /// Query projection.
    Query,
    /// Key projection.
    Key,
    /// Value projection.
    Value,
    /// Attention output projection.
    AttentionProj,
    /// FFN up projection (BERT `intermediate.dense`, Llama `up_proj`).
    FfnUp,
    /// FFN gate projection (Llama `gate_proj`; BERT has none).
    FfnGate,
    /// FFN down projection (BERT `output.dense`, Llama `down_proj`).
    FfnDown,
    /// The fused query-key-value projection (Phi-3 `qkv_proj`: queries, keys, values
    /// stacked along the output), where a model has one instead of three.
    QueryKeyValue,
    /// The fused gate-up projection (Phi-3 `gate_up_proj`: gate, then up, along the
    /// output), where a model has one instead of two.
    FfnGateUp,
    /// BERT's pooler projection (`pooler.dense`, on the `[CLS]` token, feeding
    /// `pooler_output`); one point, on the last layer.
    Pooler,
    /// Keys and values an adapter prepends to a layer's attention (prefix tuning): every
    /// query also attends to them; they hold no position and never enter a KV cache.
    KeyValuePrefix,
    /// The input token embeddings, before anything else sees them; one point, on layer 0.
    /// An adapter may transform them (invertible adapters) or prepend virtual tokens
    /// (prompt tuning), which the backbone attends to and leaves out of its outputs.
    InputEmbeddings,
    /// A layer's output, the residual stream leaving it: position-selective
    /// interventions (ReFT) change it at chosen token positions only.
    LayerOutput,
    /// The final hidden states before the LM head (decoders); one point, on the last
    /// layer: invertible adapters apply their inverse here.
    LmHeadInput,
}

/// What a kind of site hands to its adapters, which decides the forward it calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiteKind {
    /// Between sublayers: `forward_hidden`.
    Hidden,
    /// On a projection: `forward_projection`.
    Projection,
    /// Attention's keys and values: `key_value_prefix`.
    KeyValuePrefix,
    /// The token embeddings, in or out: `forward_embeddings`.
    Embeddings,
    /// A layer's output at chosen positions: `forward_intervention`.
    Intervention,
}

impl Site {
    /// Every site, hidden sites first.
    pub const ALL: [Site; 16] = [
        Site::AttentionOutput,
        Site::FfnOutput,
        Site::Query,
        Site::Key,
        Site::Value,
        Site::AttentionProj,
        Site::FfnUp,
        Site::FfnGate,
        Site::FfnDown,
        Site::QueryKeyValue,
        Site::FfnGateUp,
        Site::Pooler,
        Site::KeyValuePrefix,
        Site::InputEmbeddings,
        Site::LayerOutput,
        Site::LmHeadInput,
    ];

    /// What this site hands to its adapters.
    pub fn kind(self) -> SiteKind {
        match self {
            Site::AttentionOutput | Site::FfnOutput => SiteKind::Hidden,
            Site::KeyValuePrefix => SiteKind::KeyValuePrefix,
            Site::InputEmbeddings | Site::LmHeadInput => SiteKind::Embeddings,
            Site::LayerOutput => SiteKind::Intervention,
            Site::Query
            | Site::Key
            | Site::Value
            | Site::AttentionProj
            | Site::FfnUp
            | Site::FfnGate
            | Site::FfnDown
            | Site::QueryKeyValue
            | Site::FfnGateUp
            | Site::Pooler => SiteKind::Projection,
        }
    }

    /// True for sites between sublayers (`forward_hidden`).
    pub fn is_hidden(self) -> bool {
        self.kind() == SiteKind::Hidden
    }

    /// True for sites on a projection weight (`forward_projection`).
    pub fn is_projection(self) -> bool {
        self.kind() == SiteKind::Projection
    }

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Site::AttentionOutput => "attention_output",
            Site::FfnOutput => "ffn_output",
            Site::Query => "query",
            Site::Key => "key",
            Site::Value => "value",
            Site::AttentionProj => "attention_proj",
            Site::FfnUp => "ffn_up",
            Site::FfnGate => "ffn_gate",
            Site::FfnDown => "ffn_down",
            Site::QueryKeyValue => "query_key_value",
            Site::FfnGateUp => "ffn_gate_up",
            Site::Pooler => "pooler",
            Site::KeyValuePrefix => "key_value_prefix",
            Site::InputEmbeddings => "input_embeddings",
            Site::LayerOutput => "layer_output",
            Site::LmHeadInput => "lm_head_input",
        }
    }

    /// Parses a site name; the error lists the valid names.
    pub fn parse(name: &str) -> Result<Site, String> {
        Site::ALL.iter().copied().find(|s| s.name() == name).ok_or_else(|| {
            let names: Vec<_> = Site::ALL.iter().map(|s| s.name()).collect();
            format!("unknown site `{name}`; valid sites: {}", names.join(", "))
        })
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One (layer, site) pair of a concrete model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Point {
    /// Layer index, from 0 at the input.
    pub layer: usize,
    /// Where in the layer.
    pub site: Site,
}

impl Point {
    /// The point at `site` of layer `layer`.
    pub fn new(layer: usize, site: Site) -> Self {
        Point { layer, site }
    }
}

impl Point {
    /// An adapter variable's name at this point, `layer.L.SITE.PARAM`: the convention of the
    /// families' `vars`, which [`Point::split_var_name`] reverses.
    pub fn var_name(&self, param: &str) -> String {
        format!("layer.{}.{}.{param}", self.layer, self.site)
    }

    /// Splits an adapter variable name of the form `layer.L.SITE.PARAM` (the convention of
    /// the families' `vars`) into its point and `PARAM`.
    pub fn split_var_name(name: &str) -> Option<(Point, &str)> {
        let rest = name.strip_prefix("layer.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (site, param) = rest.split_once('.')?;
        Some((Point::new(layer.parse().ok()?, Site::parse(site).ok()?), param))
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {} {}", self.layer, self.site)
    }
}

/// A point together with the tensor widths an adapter sees there and the module path
/// the original (PyTorch) model has at that place.
///
/// For hidden sites both widths are the model's hidden size; for projection sites they
/// are the projection's input and output features. The module path (e.g.
/// `encoder.layer.3.attention.self.query`, `model.layers.0.mlp`) is what the Python
/// ecosystem's adapter files use in their tensor names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointSpec {
    /// The point.
    pub point: Point,
    /// Width of what the adapter receives.
    pub in_features: usize,
    /// Width of what the adapter returns.
    pub out_features: usize,
    /// The original model's module path at this point.
    pub module: String,
}

/// What an adapter constructor needs to know about the backbone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `bert` or `llama`.
    pub architecture: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_layers: usize,
    /// Number of token embeddings.
    pub vocab_size: usize,
    /// Every point the backbone exposes, in layer order.
    pub points: Vec<PointSpec>,
}

impl ModelInfo {
    /// The spec of one point, if the model has it.
    pub fn spec(&self, point: Point) -> Option<&PointSpec> {
        self.points.iter().find(|p| p.point == point)
    }

    /// The point whose module path is `module`, if any.
    pub fn point_at_module(&self, module: &str) -> Option<&PointSpec> {
        self.points.iter().find(|p| p.module == module)
    }

    /// The site kinds this model offers (in `Site::ALL` order).
    pub fn sites(&self) -> Vec<Site> {
        Site::ALL.iter().copied().filter(|s| self.points.iter().any(|p| p.point.site == *s)).collect()
    }
}

/// Implemented by every backbone: the insertion points it exposes and their widths.
///
/// Placement rules expand against this, and adapter constructors read the widths from it,
/// so a family crate never needs to know which backbone it is attached to.
pub trait InsertionPoint {
    /// A description of the model for adapter constructors.
    fn model_info(&self) -> ModelInfo;

    /// The frozen base weights by their original names.
    fn named_weights(&self) -> Vec<(String, candle_core::Tensor)>;

    /// The weights the fingerprint covers: all of them unless a backbone leaves some out
    /// (BERT's pooler, which adapters saved before it was loaded did not cover).
    fn fingerprint_weights(&self) -> Vec<(String, candle_core::Tensor)> {
        self.named_weights()
    }

    /// The model's fingerprint (see [`crate::Fingerprint`]).
    fn fingerprint(&self) -> candle_core::Result<crate::Fingerprint> {
        crate::Fingerprint::of(&self.model_info(), &self.fingerprint_weights())
    }
}
