//! Weighted combinations of adapters of one kind (`adapters average`): a new adapter from
//! several trained ones. Every kind combines `linear`ly (each weight the weighted sum of the
//! inputs' — negative weights subtract, "unlearning"); a family registers its own methods
//! with `inventory::submit!` (LoRA: PEFT's `add_weighted_adapter` methods), and may replace
//! `linear` for its kind where the plain sum is not what users expect.

use crate::{registry, Adapter, Error, ModelInfo, Placement};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// One adapter to combine, as read from its folder.
#[derive(Clone, Copy)]
pub struct Input<'a> {
    /// The adapter, weights filled in.
    pub adapter: &'a dyn Adapter,
    /// Where it sits.
    pub placement: &'a Placement,
    /// Its weight in the combination.
    pub weight: f64,
}

/// How TIES elects the sign each weight keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MajoritySign {
    /// The sign of the inputs' sum.
    #[default]
    Total,
    /// The sign most inputs have.
    Frequency,
}

/// The options of the methods that need them (PEFT's names in brackets).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The share of each input's entries that TIES, DARE and magnitude pruning keep, in
    /// [0, 1] (`density`).
    pub density: Option<f64>,
    /// The rank of an SVD result; default the inputs' largest (`svd_rank`).
    pub rank: Option<usize>,
    /// A quantile in (0, 1] at which the SVD factors are clamped (`svd_clamp`).
    pub clamp: Option<f64>,
    /// TIES's sign election (`majority_sign_method`).
    pub majority_sign: MajoritySign,
    /// The seed of DARE's random masks.
    pub seed: u64,
}

/// What a combination gives: the new adapter and where it sits.
pub struct Combined {
    /// The adapter.
    pub adapter: Box<dyn Adapter>,
    /// Its placement.
    pub placement: Placement,
}

/// A family's combining function: (method, inputs, options, model, device).
pub type CombineFn = fn(&str, &[Input], &Options, &ModelInfo, &Device) -> Result<Combined, Error>;

/// A method registered by a family for its kind.
pub struct Combination {
    /// The kind it combines.
    pub kind: &'static str,
    /// The method's name (`--method`).
    pub method: &'static str,
    /// One line for `--help` and errors.
    pub summary: &'static str,
    /// Combines inputs of `kind` by `method` (its own name: one function may serve several
    /// methods); there is at least one input and their kinds were checked.
    pub combine: CombineFn,
}

inventory::collect!(Combination);

/// The methods `kind` combines by, with what each does: `linear` and the registered ones,
/// sorted by name.
pub fn methods(kind: &str) -> Vec<(&'static str, &'static str)> {
    let mut methods: Vec<(&str, &str)> =
        inventory::iter::<Combination>.into_iter().filter(|c| c.kind == kind).map(|c| (c.method, c.summary)).collect();
    if !methods.iter().any(|(name, _)| *name == "linear") {
        methods.push(("linear", "the weighted sum of every weight"));
    }
    methods.sort();
    methods
}

/// Combines `inputs` (all of one kind) by `method`.
pub fn combine(method: &str, inputs: &[Input], options: &Options, model: &ModelInfo, device: &Device) -> Result<Combined, Error> {
    let first = inputs.first().ok_or_else(|| Error::Adapter("nothing to combine: give at least one adapter".into()))?;
    let kind = first.adapter.kind();
    if let Some((i, other)) = inputs.iter().enumerate().find(|(_, x)| x.adapter.kind() != kind) {
        return Err(Error::Mismatch(format!(
            "adapter {} is a `{}` adapter and adapter 1 a `{kind}` one; only adapters of one kind combine",
            i + 1,
            other.adapter.kind()
        )));
    }
    if let Some(bad) = inputs.iter().position(|x| !x.weight.is_finite()) {
        return Err(Error::Adapter(format!("the weight of adapter {} is {}; weights are finite numbers", bad + 1, inputs[bad].weight)));
    }
    check_options(options)?;
    if let Some(c) = inventory::iter::<Combination>.into_iter().find(|c| c.kind == kind && c.method == method) {
        return (c.combine)(method, inputs, options, model, device);
    }
    if method != "linear" {
        let known: Vec<String> = methods(kind).iter().map(|(name, what)| format!("\n  {name}: {what}")).collect();
        return Err(Error::Adapter(format!("`{kind}` adapters do not combine by `{method}`; they combine by:{}", known.concat())));
    }
    linear(inputs, model, device)
}

fn check_options(options: &Options) -> Result<(), Error> {
    if let Some(d) = options.density.filter(|d| !(0.0..=1.0).contains(d)) {
        return Err(Error::Adapter(format!("density {d}: the share of entries kept is in [0, 1]")));
    }
    if let Some(q) = options.clamp.filter(|q| !(*q > 0.0 && *q <= 1.0)) {
        return Err(Error::Adapter(format!("clamp {q}: a quantile in (0, 1]")));
    }
    if options.rank == Some(0) {
        return Err(Error::Adapter("rank 0: an SVD result has rank at least 1".into()));
    }
    Ok(())
}

/// The weighted sum of every variable: inputs must match in kind, configuration,
/// placement and shapes.
pub fn linear(inputs: &[Input], model: &ModelInfo, device: &Device) -> Result<Combined, Error> {
    let first = &inputs[0];
    for (i, x) in inputs.iter().enumerate().skip(1) {
        same_form(first, x, i)?;
    }
    let adapter = registry::build(first.adapter.kind(), &first.adapter.config(), first.placement, model, device, 0)?;
    let parts: Vec<Vec<(String, candle_core::Var)>> = inputs.iter().map(|x| x.adapter.vars()).collect();
    for (j, (name, var)) in adapter.vars().into_iter().enumerate() {
        let mut sum: Option<Tensor> = None;
        for (x, vars) in inputs.iter().zip(&parts) {
            let term = (vars[j].1.as_tensor() * x.weight)?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        debug_assert_eq!(name, parts[0][j].0);
        var.set(&sum.expect("at least one input"))?;
    }
    Ok(Combined { adapter, placement: first.placement.clone() })
}

/// Inputs 1 and `i + 1` have the same kind, configuration, placement and variable shapes;
/// a difference is named with both values (`field `r`: 16 in adapter 1, 8 in adapter 2`).
pub fn same_form(first: &Input, other: &Input, i: usize) -> Result<(), Error> {
    let differ =
        |what: &str| Error::Mismatch(format!("adapter {} differs from adapter 1 in its {what}; only adapters of one form combine", i + 1));
    let (a, b) = (first.adapter.config(), other.adapter.config());
    if a != b {
        return Err(differ(&format!("configuration: {}", difference(&a, &b, "", i + 1))));
    }
    if first.placement != other.placement {
        let json = |p: &Placement| serde_json::to_value(p).unwrap_or_default();
        return Err(differ(&format!("placement: {}", difference(&json(first.placement), &json(other.placement), "", i + 1))));
    }
    let shapes = |a: &dyn Adapter| -> Vec<(String, Vec<usize>)> { a.vars().into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect() };
    if shapes(first.adapter) != shapes(other.adapter) {
        return Err(differ("weights' names or shapes"));
    }
    Ok(())
}

/// The first field where two JSON values differ, with both values: `field `r`: 16 in
/// adapter 1, 8 in adapter N` (a field one side lacks reads as absent).
fn difference(a: &serde_json::Value, b: &serde_json::Value, path: &str, n: usize) -> String {
    use serde_json::Value;
    if let (Value::Object(x), Value::Object(y)) = (a, b) {
        let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
        for key in keys {
            let (u, v) = (x.get(key), y.get(key));
            if u != v {
                let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                return match (u, v) {
                    (Some(u), Some(v)) => difference(u, v, &path, n),
                    _ => {
                        let shown = |v: Option<&Value>| v.map_or("absent".to_string(), Value::to_string);
                        format!("field `{path}`: {} in adapter 1, {} in adapter {n}", shown(u), shown(v))
                    }
                };
            }
        }
    }
    let field = if path.is_empty() { "the whole value".to_string() } else { format!("field `{path}`") };
    format!("{field}: {a} in adapter 1, {b} in adapter {n}")
}

#[cfg(test)]
mod tests {
    use super::difference;
    use serde_json::json;

    #[test]
    fn a_difference_names_the_first_differing_field_and_both_values() {
        let a = json!({"r": 16, "alpha": 32, "placement": {"layers": [0, 1]}});
        assert_eq!(
            difference(&a, &json!({"r": 8, "alpha": 32, "placement": {"layers": [0, 1]}}), "", 2),
            "field `r`: 16 in adapter 1, 8 in adapter 2"
        );
        assert_eq!(
            difference(&a, &json!({"r": 16, "alpha": 32, "placement": {"layers": [0]}}), "", 3),
            "field `placement.layers`: [0,1] in adapter 1, [0] in adapter 3"
        );
        assert_eq!(
            difference(&a, &json!({"r": 16, "alpha": 32}), "", 2),
            "field `placement`: {\"layers\":[0,1]} in adapter 1, absent in adapter 2"
        );
    }
}
