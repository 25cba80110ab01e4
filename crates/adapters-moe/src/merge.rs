//! `adapters merge-experts`: a mixture folder becomes one plain adapter (`seq_bn` or `lora`)
//! whose weights are the mean of the experts'. The serving form of AdaMix-style mixtures
//! (`router = "random"`, `shared_init = true`): one adapter's cost, no router.

use crate::config::ExpertKind;
use crate::mixture::Mixture;
use adapters_core::{io, registry, Adapter, BuildArgs, Error, InsertionPoint, Placement};
use candle_core::Device;
use std::path::Path;

/// A plain adapter made from a mixture.
pub struct Averaged {
    /// The name the mixture was saved under.
    pub name: String,
    /// The plain adapter (`seq_bn` for `moe_bn`, `lora` for `moe_lora`).
    pub adapter: Box<dyn Adapter>,
    /// The mixture's placement, which the plain adapter keeps.
    pub placement: Placement,
    /// The mixture's kind.
    pub from_kind: &'static str,
}

/// Reads the mixture folder `dir` (checked against `model`) and averages its experts.
pub fn average_folder(dir: &Path, model: &dyn InsertionPoint, device: &Device) -> Result<Averaged, Error> {
    let loaded = io::load(dir, model, device)?;
    let kind = match loaded.adapter.kind() {
        "moe_bn" => ExpertKind::Bottleneck,
        "moe_lora" => ExpertKind::Lora,
        other => {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                message: format!("holds a `{other}` adapter; merge-experts turns `moe_bn` or `moe_lora` mixtures into plain adapters"),
            })
        }
    };
    // The same adapter as its concrete type: built from its config, filled with its weights.
    let info = model.model_info();
    let config = loaded.adapter.config();
    let mixture = Mixture::build(kind, &BuildArgs { config: &config, placement: &loaded.placement, model: &info, device, seed: 0 })?;
    let weights = loaded.adapter.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    io::fill_vars(&mixture, weights, dir)?;
    let plain = mixture.averaged()?;
    let adapter = registry::build(plain.kind, &plain.config, &loaded.placement, &info, device, 0)?;
    io::fill_vars(adapter.as_ref(), plain.tensors.into_iter().collect(), dir)?;
    Ok(Averaged { name: loaded.name, adapter, placement: loaded.placement, from_kind: kind.name() })
}
