//! Scale-and-shift adapters (SSF, Lian et al., NeurIPS 2022): after a sublayer, each
//! feature is scaled and shifted by learned vectors, `h ⊙ γ + β`, `2 × hidden` parameters
//! a site. Written from the guide (`adapters_core::guide`) alone, as a contributor adds a
//! family: identity, one forward, a registration, and nothing in core or the backbones.

#![warn(missing_docs)]

use adapters_core::registry::{parse_config, BuildArgs};
use adapters_core::{Adapter, AdapterKind, ConfigField, Error, ForwardCtx, Init, Point, Site, SublayerIo};
use candle_core::{Result, Tensor, Var};
use std::collections::BTreeMap;

/// The kind name in configs.
pub const KIND: &str = "scale_shift";

/// The family's name. A binary calls it so that the linker keeps this crate and the
/// registration below (which must stay in this module for that reason).
pub fn family() -> &'static str {
    "adapters-scale-shift"
}

adapters_core::inventory::submit! {
    AdapterKind {
        name: KIND,
        family: "adapters-scale-shift",
        summary: "scale-and-shift of each feature after a sublayer (SSF): h * scale + shift",
        fields: &[ConfigField {
            name: "init_std",
            ty: "number",
            default: "0.0",
            doc: "std of the initial scale - 1 and shift (0: the identity)",
        }],
        build,
    }
}

/// The saved configuration.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleShiftConfig {
    /// Std of the initial `scale - 1` and `shift`; 0 starts at the identity.
    #[serde(default)]
    pub init_std: f64,
}

/// One scale-and-shift adapter: a `(scale, shift)` pair of `[hidden]` vectors per site.
pub struct ScaleShift {
    config: ScaleShiftConfig,
    sites: BTreeMap<Point, (Var, Var)>,
}

impl Adapter for ScaleShift {
    fn kind(&self) -> &str {
        KIND
    }

    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).expect("configs serialise")
    }

    fn points(&self) -> Vec<Point> {
        self.sites.keys().copied().collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.sites
            .iter()
            .flat_map(|(p, (scale, shift))| [(p.var_name("scale"), scale.clone()), (p.var_name("shift"), shift.clone())])
            .collect()
    }

    fn forward_hidden(&self, point: Point, io: &SublayerIo, _ctx: &ForwardCtx) -> Result<Tensor> {
        let (scale, shift) = &self.sites[&point];
        io.output.broadcast_mul(scale.as_tensor())?.broadcast_add(shift.as_tensor())
    }
}

fn build(args: &BuildArgs) -> std::result::Result<Box<dyn Adapter>, Error> {
    let config: ScaleShiftConfig = parse_config(KIND, args.config)?;
    if !(config.init_std.is_finite() && config.init_std >= 0.0) {
        return Err(Error::Config { kind: KIND.into(), message: format!("init_std = {} must be a finite number >= 0", config.init_std) });
    }
    let mut init = Init::new(args.seed);
    let mut sites = BTreeMap::new();
    for spec in args.placement.expand(args.model, &[Site::AttentionOutput, Site::FfnOutput], |s| s.is_hidden())? {
        let d = spec.out_features;
        let scale = (init.normal(d, config.init_std, args.device)? + 1.0)?;
        let shift = init.normal(d, config.init_std, args.device)?;
        sites.insert(spec.point, (Var::from_tensor(&scale)?, Var::from_tensor(&shift)?));
    }
    Ok(Box::new(ScaleShift { config, sites }))
}
