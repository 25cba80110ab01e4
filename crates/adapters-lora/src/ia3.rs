//! IA3: learned scaling vectors on projections (Liu et al., 2022). At output-scaled sites
//! (key, value by default) `y = l * (W x + b)`; at input-scaled feed-forward sites
//! (ffn_down by default) `y = W (l * x) + b`. Vectors start at one: no change.

use adapters_core::capability::{Capabilities, InputScaled};
use adapters_core::registry::parse_config;
use adapters_core::{Adapter, BuildArgs, Error, ForwardCtx, Point, ProjectionIo, Site};
use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// IA3's configuration (the `ia3` kind's fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ia3Config {
    /// Sites whose input (not output) is scaled (PEFT's `feedforward_modules`).
    #[serde(default = "default_ff")]
    pub feedforward_sites: Vec<Site>,
}

fn default_ff() -> Vec<Site> {
    vec![Site::FfnDown]
}

/// Sites used when the placement names none (PEFT's defaults).
pub const DEFAULT_SITES: &[Site] = &[Site::Key, Site::Value, Site::FfnDown];

/// An IA3 adapter: a learned scaling vector per projection point.
pub struct Ia3 {
    config: Ia3Config,
    scales: BTreeMap<Point, Var>,
}

impl Ia3 {
    /// Builds an `ia3` adapter from registry arguments (scales start at 1: identity).
    pub fn build(args: &BuildArgs) -> std::result::Result<Self, Error> {
        let config: Ia3Config = parse_config("ia3", args.config)?;
        let points = args.placement.expand(args.model, DEFAULT_SITES, Site::is_projection)?;
        let mut scales = BTreeMap::new();
        for spec in points {
            let n = if config.feedforward_sites.contains(&spec.point.site) { spec.in_features } else { spec.out_features };
            scales.insert(spec.point, Var::from_tensor(&Tensor::ones(n, DType::F32, args.device)?)?);
        }
        Ok(Ia3 { config, scales })
    }
}

impl Adapter for Ia3 {
    fn kind(&self) -> &str {
        "ia3"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("configs serialise")
    }

    fn points(&self) -> Vec<Point> {
        self.scales.keys().copied().collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.scales.iter().map(|(p, v)| (p.var_name("ia3_l"), v.clone())).collect()
    }

    fn capabilities(&self) -> Capabilities<'_> {
        Capabilities { input_scaled: Some(self), ..Default::default() }
    }

    fn forward_projection(&self, point: Point, io: &ProjectionIo, _ctx: &ForwardCtx) -> Result<Tensor> {
        let l = self.scales[&point].as_tensor();
        if self.config.feedforward_sites.contains(&point.site) {
            (io.linear.apply)(&io.input.broadcast_mul(l)?)
        } else {
            io.output.broadcast_mul(l)
        }
    }
}

impl InputScaled for Ia3 {
    fn input_scale(&self, point: Point) -> Option<Tensor> {
        let l = self.scales.get(&point)?;
        self.config.feedforward_sites.contains(&point.site).then(|| l.as_tensor().clone())
    }
}
