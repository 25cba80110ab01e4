//! Placement rules: which layers and sites of a concrete model an adapter occupies.

use crate::point::{ModelInfo, Point, PointSpec, Site};
use crate::Error;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which layers an adapter is placed in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    /// Every layer (`"all"`).
    #[default]
    #[serde(with = "all_tag")]
    All,
    /// An explicit list of layer indices (`[0, 3, 5]`).
    List(Vec<usize>),
    /// The k layers closest to the output (`{ top = 3 }`).
    Top {
        /// How many layers, counted from the output.
        top: usize,
    },
}

mod all_tag {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("all")
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<(), D::Error> {
        let s = String::deserialize(d)?;
        if s == "all" {
            Ok(())
        } else {
            Err(D::Error::custom(format!("expected \"all\", got \"{s}\"")))
        }
    }
}

/// Where an adapter goes: layers, minus `leave_out`, times sites, with per-layer sizes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Which layers (default: all).
    #[serde(default)]
    pub layers: Layers,
    /// Layers to skip even if `layers` selects them (AdapterHub's `leave_out`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leave_out: Vec<usize>,
    /// Which sites in each layer; empty means the adapter kind's default sites.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<Site>,
    /// Per-layer size overrides (bottleneck width, LoRA rank, ...), keyed by layer index.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sizes: BTreeMap<String, usize>,
}

impl Placement {
    /// The selected layer indices of a model with `num_layers` layers, ascending.
    pub fn layers(&self, num_layers: usize) -> Result<Vec<usize>, Error> {
        let check = |what: &str, l: usize| {
            if l >= num_layers {
                Err(Error::Placement(format!(
                    "{what} names layer {l}, but the model has {num_layers} layers (0..={})",
                    num_layers.saturating_sub(1)
                )))
            } else {
                Ok(())
            }
        };
        let mut layers: Vec<usize> = match &self.layers {
            Layers::All => (0..num_layers).collect(),
            Layers::List(list) => {
                for &l in list {
                    check("`layers`", l)?;
                }
                list.clone()
            }
            Layers::Top { top } => {
                if *top == 0 || *top > num_layers {
                    return Err(Error::Placement(format!(
                        "`layers = {{ top = {top} }}` must be between 1 and the model's {num_layers} layers"
                    )));
                }
                (num_layers - top..num_layers).collect()
            }
        };
        for &l in &self.leave_out {
            check("`leave_out`", l)?;
        }
        layers.sort_unstable();
        layers.dedup();
        layers.retain(|l| !self.leave_out.contains(l));
        Ok(layers)
    }

    /// The size for `layer`: its override if one is given, else `default`.
    pub fn size_for(&self, layer: usize, default: usize) -> usize {
        self.sizes.get(&layer.to_string()).copied().unwrap_or(default)
    }

    /// Expands the rule against a concrete model.
    ///
    /// `default_sites` are used when the placement names none; `allowed` says which site
    /// kinds the adapter kind supports (an error names the first one it does not).
    /// Default sites a model fuses into one projection (Phi-3's `query_key_value`,
    /// `ffn_gate_up`) are taken on the fused one, as PEFT's defaults for such models target
    /// `qkv_proj`; sites a placement names are taken as named.
    pub fn expand(&self, model: &ModelInfo, default_sites: &[Site], allowed: impl Fn(Site) -> bool) -> Result<Vec<PointSpec>, Error> {
        let defaults = on_fused_projections(default_sites, model);
        let sites = if self.sites.is_empty() { &defaults } else { &self.sites };
        if sites.is_empty() {
            return Err(Error::Placement("no sites selected".into()));
        }
        for &site in sites {
            if !allowed(site) {
                return Err(Error::Placement(format!("this adapter kind cannot sit at site `{site}`")));
            }
            if !model.sites().contains(&site) {
                let offered: Vec<_> = model.sites().iter().map(|s| s.name()).collect();
                return Err(Error::Placement(format!(
                    "the {} model has no `{site}` site; it offers {}",
                    model.architecture,
                    offered.join(", ")
                )));
            }
        }
        let layers = self.layers(model.num_layers)?;
        for key in self.sizes.keys() {
            let ok = key.parse::<usize>().map(|l| l < model.num_layers).unwrap_or(false);
            if !ok {
                return Err(Error::Placement(format!("`sizes` key \"{key}\" is not a layer index below {}", model.num_layers)));
            }
        }
        let mut points = Vec::new();
        for &layer in &layers {
            for &site in sites {
                // A site the model has only in some layers (BERT's pooler, on the last)
                // is taken where it exists.
                if let Some(spec) = model.spec(Point::new(layer, site)) {
                    points.push(spec.clone());
                }
            }
        }
        if points.is_empty() {
            return Err(Error::Placement("the placement selects no layer".into()));
        }
        Ok(points)
    }
}

/// `sites` with each one the model lacks replaced by the fused projection that holds it
/// where the model has one (query, key, value: `query_key_value`; gate, up: `ffn_gate_up`),
/// each site once.
fn on_fused_projections(sites: &[Site], model: &ModelInfo) -> Vec<Site> {
    let offered = model.sites();
    let mut out: Vec<Site> = Vec::new();
    for &site in sites {
        let fused = match site {
            Site::Query | Site::Key | Site::Value => Site::QueryKeyValue,
            Site::FfnGate | Site::FfnUp => Site::FfnGateUp,
            other => other,
        };
        let site = if !offered.contains(&site) && offered.contains(&fused) { fused } else { site };
        if !out.contains(&site) {
            out.push(site);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(layers: usize) -> ModelInfo {
        let mut points = Vec::new();
        for layer in 0..layers {
            for site in [Site::AttentionOutput, Site::FfnOutput, Site::Query, Site::Value] {
                points.push(PointSpec {
                    point: Point::new(layer, site),
                    in_features: 8,
                    out_features: 8,
                    module: format!("l{layer}.{site}"),
                });
            }
        }
        ModelInfo { architecture: "test".into(), hidden_size: 8, num_layers: layers, vocab_size: 10, points }
    }

    fn parse(json: &str) -> Placement {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn all_layers_by_default() {
        assert_eq!(parse("{}").layers(4).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse(r#"{"layers":"all"}"#).layers(3).unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn list_top_and_leave_out() {
        assert_eq!(parse(r#"{"layers":[3,1,1]}"#).layers(4).unwrap(), vec![1, 3]);
        assert_eq!(parse(r#"{"layers":{"top":2}}"#).layers(6).unwrap(), vec![4, 5]);
        assert_eq!(parse(r#"{"leave_out":[0,5]}"#).layers(6).unwrap(), vec![1, 2, 3, 4]);
    }

    #[test]
    fn bad_layers_are_named() {
        let e = parse(r#"{"layers":[7]}"#).layers(6).unwrap_err().to_string();
        assert!(e.contains("layer 7") && e.contains("6 layers"), "{e}");
        let e = parse(r#"{"layers":{"top":0}}"#).layers(6).unwrap_err().to_string();
        assert!(e.contains("top = 0"), "{e}");
        let e = serde_json::from_str::<Placement>(r#"{"layerz":[1]}"#).unwrap_err().to_string();
        assert!(e.contains("layerz"), "{e}");
    }

    #[test]
    fn expand_sites_and_sizes() {
        let m = model(3);
        let p = parse(r#"{"layers":[0,2],"sizes":{"2":16}}"#);
        let pts = p.expand(&m, &[Site::FfnOutput], |s| s.is_hidden()).unwrap();
        assert_eq!(pts.iter().map(|s| s.point).collect::<Vec<_>>(), vec![Point::new(0, Site::FfnOutput), Point::new(2, Site::FfnOutput)]);
        assert_eq!(p.size_for(2, 4), 16);
        assert_eq!(p.size_for(0, 4), 4);

        let e = parse(r#"{"sites":["query"]}"#).expand(&m, &[Site::FfnOutput], |s| s.is_hidden()).unwrap_err().to_string();
        assert!(e.contains("query"), "{e}");
        let e = parse(r#"{"sites":["ffn_gate"]}"#).expand(&m, &[], |_| true).unwrap_err().to_string();
        assert!(e.contains("ffn_gate") && e.contains("offers"), "{e}");
        let e = parse(r#"{"sizes":{"9":3}}"#).expand(&m, &[Site::FfnOutput], |_| true).unwrap_err().to_string();
        assert!(e.contains("\"9\""), "{e}");
    }
}
