//! The adapter registry: family crates register their kinds with `inventory::submit!`,
//! and anything (CLI, trainer, server) builds adapters by kind name from a serde config.

use crate::adapter::Adapter;
use crate::placement::Placement;
use crate::point::{ModelInfo, Point};
use crate::Error;
use candle_core::Device;
use serde::de::DeserializeOwned;

/// The `ty` of a field that lists task names in task-id order (a multi-task run's
/// `[[task]]` order). The trainer fills such a field with the run's task names when a
/// config leaves it out, and refuses a config whose names disagree with the run's.
pub const TASK_NAMES: &str = "list of task names";

/// One documented field of a kind's configuration.
#[derive(Debug)]
pub struct ConfigField {
    /// The field's name in configs.
    pub name: &'static str,
    /// Type as shown to users (`usize`, `"relu" | "gelu"`, ...).
    pub ty: &'static str,
    /// Default as shown to users; `"required"` when there is none.
    pub default: &'static str,
    /// What the field does.
    pub doc: &'static str,
}

/// Everything a constructor gets.
pub struct BuildArgs<'a> {
    /// The kind-specific configuration (without `kind` and `placement`).
    pub config: &'a serde_json::Value,
    /// Where the adapter goes.
    pub placement: &'a Placement,
    /// The backbone it is built for.
    pub model: &'a ModelInfo,
    /// Where its weights live.
    pub device: &'a Device,
    /// Seed for the adapter's initialisation (candle's CPU RNG cannot be seeded).
    pub seed: u64,
}

/// A registered adapter kind.
pub struct AdapterKind {
    /// The name used in configs and on the command line.
    pub name: &'static str,
    /// The family crate that registered it.
    pub family: &'static str,
    /// One line for `adapters kinds`.
    pub summary: &'static str,
    /// The configuration schema.
    pub fields: &'static [ConfigField],
    /// Builds an adapter from a configuration.
    pub build: fn(&BuildArgs) -> Result<Box<dyn Adapter>, Error>,
}

inventory::collect!(AdapterKind);

/// Every registered kind, sorted by name.
pub fn kinds() -> Vec<&'static AdapterKind> {
    let mut kinds: Vec<_> = inventory::iter::<AdapterKind>.into_iter().collect();
    kinds.sort_by_key(|k| k.name);
    kinds
}

/// The kind registered under `name`; the error lists the registered kinds.
pub fn kind(name: &str) -> Result<&'static AdapterKind, Error> {
    inventory::iter::<AdapterKind>.into_iter().find(|k| k.name == name).ok_or_else(|| {
        let known: Vec<_> = kinds().iter().map(|k| k.name).collect();
        Error::UnknownKind { kind: name.to_string(), known: known.join(", ") }
    })
}

/// Builds an adapter of kind `name` (see [`BuildArgs`]).
pub fn build(
    name: &str,
    config: &serde_json::Value,
    placement: &Placement,
    model: &ModelInfo,
    device: &Device,
    seed: u64,
) -> Result<Box<dyn Adapter>, Error> {
    let kind = kind(name)?;
    (kind.build)(&BuildArgs { config, placement, model, device, seed })
}

/// Parses a kind's configuration; the error names the kind and the offending field.
/// Use `#[serde(deny_unknown_fields)]` on the config struct so misspelt keys are caught.
pub fn parse_config<T: DeserializeOwned>(kind: &str, config: &serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(config.clone()).map_err(|e| Error::Config { kind: kind.to_string(), message: e.to_string() })
}

/// Checks an adapter's inner width at one point (a bottleneck's units, a LoRA rank, an
/// expert's size) before anything is allocated: at least 1 and at most the inputs plus
/// outputs of the site, beyond which it adds no capacity, so that a config such as
/// `r = 1000000000` is refused instead of exhausting memory.
pub fn check_width(kind: &str, field: &str, width: usize, in_features: usize, out_features: usize, at: Point) -> Result<(), Error> {
    let limit = in_features + out_features;
    if width == 0 || width > limit {
        return Err(Error::Config {
            kind: kind.to_string(),
            message: format!(
                "{field} gives a width of {width} at {at}, outside 1..={limit} (the site's {in_features} inputs plus \
                 {out_features} outputs); nothing was allocated"
            ),
        });
    }
    Ok(())
}
