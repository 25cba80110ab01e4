//! Every registered adapter kind, with its default configuration and placement, on the
//! random-weight model of every supported architecture (fixtures/architectures): it builds
//! from the model's insertion points, runs a forward with finite outputs, and the
//! gradient of the outputs reaches its variables. Kinds that need settings to build
//! (fusion's members, a hypernetwork's tasks) are refused alike on every architecture;
//! defaults naming q/k/v take Phi-3's fused projection.

use adapters_core::{registry, ForwardCtx, InsertionPoint, Placement};
use adapters_models::HoldsAdapters;
use adapters_testkit::architectures::{model, outputs_in, DECODERS, ENCODERS};
use candle_core::Device;

#[test]
fn every_kind_trains_on_every_architecture() {
    adapters_testkit::register_all();
    let kinds = registry::kinds();
    // Per kind: the refusal on the first architecture (None: it built there).
    let mut first: std::collections::BTreeMap<&str, Option<String>> = Default::default();
    for name in DECODERS.into_iter().chain(ENCODERS) {
        let mut m = model(name);
        let info = m.model_info();
        for kind in &kinds {
            let built = registry::build(kind.name, &serde_json::json!({}), &Placement::default(), &info, &Device::Cpu, 3);
            let refusal = built.as_ref().err().map(|e| e.to_string());
            let seen = first.entry(kind.name).or_insert_with(|| refusal.clone());
            assert_eq!(*seen, refusal, "{name}: {} builds or is refused differently than on {}", kind.name, DECODERS[0]);
            let Ok(adapter) = built else { continue };
            let vars = adapter.vars();
            m.adapters_mut().add(kind.name, adapter).unwrap_or_else(|e| panic!("{name}: {}: {e}", kind.name));
            m.adapters_mut().activate(&[kind.name]).unwrap();
            let out = outputs_in(&m, name, &ForwardCtx::training_seeded(1));
            let total = out.values().map(|t| t.sqr().unwrap().sum_all().unwrap()).reduce(|a, b| (a + b).unwrap()).unwrap();
            let value = total.to_scalar::<f32>().unwrap();
            assert!(value.is_finite(), "{name}: {}: outputs are not finite", kind.name);
            let grads = total.backward().unwrap();
            let reached = vars
                .iter()
                .filter(|(_, v)| {
                    grads.get(v.as_tensor()).is_some_and(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
                })
                .count();
            assert!(reached > 0, "{name}: {}: no gradient reaches its {} variables", kind.name, vars.len());
            m.adapters_mut().activate(&[]).unwrap();
            m.adapters_mut().remove(kind.name).unwrap();
        }
    }
    let refused: Vec<_> = first.iter().filter(|(_, r)| r.is_some()).map(|(k, _)| *k).collect();
    assert_eq!(refused, ["fusion", "hyper_bn"], "only the kinds that need settings are refused");
}
