//! A test-only adapter kind, registered from this separate test crate, built by name
//! through the registry and run through an `AdapterSet`.

use adapters_core::registry::{self, parse_config};
use adapters_core::{
    Adapter, AdapterKind, AdapterSet, BuildArgs, ConfigField, ForwardCtx, Init, ModelInfo, Placement, Point, PointSpec, Site, SublayerIo,
};
use candle_core::{DType, Device, Result, Tensor, Var};
use serde::Deserialize;
use std::collections::HashMap;

/// Adds a learned per-point bias to the sublayer output.
struct ShiftAdapter {
    config: ShiftConfig,
    shifts: HashMap<Point, Var>,
}

#[derive(Deserialize, serde::Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct ShiftConfig {
    #[serde(default = "one")]
    scale: f64,
}
fn one() -> f64 {
    1.0
}

impl Adapter for ShiftAdapter {
    fn kind(&self) -> &str {
        "test_shift"
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap()
    }
    fn points(&self) -> Vec<Point> {
        let mut p: Vec<_> = self.shifts.keys().copied().collect();
        p.sort();
        p
    }
    fn vars(&self) -> Vec<(String, Var)> {
        self.points().into_iter().map(|p| (format!("{}.{}.shift", p.layer, p.site), self.shifts[&p].clone())).collect()
    }
    fn forward_hidden(&self, point: Point, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
        // Per-example context must line up with the rows this adapter sees.
        if let Some(ids) = &ctx.task_ids {
            if ids.dim(0)? != io.output.dim(0)? {
                candle_core::bail!("task ids for {} rows, hidden state of {}", ids.dim(0)?, io.output.dim(0)?);
            }
        }
        io.output.broadcast_add(&(self.shifts[&point].as_tensor() * self.config.scale)?)
    }
}

fn build_shift(args: &BuildArgs) -> std::result::Result<Box<dyn Adapter>, adapters_core::Error> {
    let config: ShiftConfig = parse_config("test_shift", args.config)?;
    let points = args.placement.expand(args.model, &[Site::FfnOutput], |s| s.is_hidden())?;
    let mut init = Init::new(args.seed);
    let mut shifts = HashMap::new();
    for spec in points {
        shifts.insert(spec.point, Var::from_tensor(&init.normal(spec.out_features, 1.0, args.device)?)?);
    }
    Ok(Box::new(ShiftAdapter { config, shifts }))
}

adapters_core::inventory::submit! {
    AdapterKind {
        name: "test_shift",
        family: "core-tests",
        summary: "adds a learned bias after a sublayer (test only)",
        fields: &[ConfigField { name: "scale", ty: "f64", default: "1.0", doc: "multiplies the bias" }],
        build: build_shift,
    }
}

fn model() -> ModelInfo {
    let points = (0..2)
        .flat_map(|layer| {
            [Site::AttentionOutput, Site::FfnOutput].map(|site| PointSpec {
                point: Point::new(layer, site),
                in_features: 4,
                out_features: 4,
                module: format!("layers.{layer}.{site}"),
            })
        })
        .collect();
    ModelInfo { architecture: "toy".into(), hidden_size: 4, num_layers: 2, vocab_size: 10, points }
}

fn build(config: serde_json::Value, placement: &str) -> std::result::Result<Box<dyn Adapter>, adapters_core::Error> {
    build_seeded(config, placement, 3)
}

fn build_seeded(config: serde_json::Value, placement: &str, seed: u64) -> std::result::Result<Box<dyn Adapter>, adapters_core::Error> {
    let placement: Placement = serde_json::from_str(placement).unwrap();
    registry::build("test_shift", &config, &placement, &model(), &Device::Cpu, seed)
}

#[test]
fn the_kind_is_listed_and_built_by_name() {
    assert!(registry::kinds().iter().any(|k| k.name == "test_shift" && k.family == "core-tests"));
    let a = build(serde_json::json!({"scale": 2.0}), r#"{"layers":[1]}"#).unwrap();
    assert_eq!(a.kind(), "test_shift");
    assert_eq!(a.points(), vec![Point::new(1, Site::FfnOutput)]);
    assert_eq!(a.num_parameters(), 4);
    assert_eq!(a.config()["scale"], 2.0);
}

#[test]
fn unknown_kind_and_bad_field_are_clear() {
    let e = registry::build("no_such", &serde_json::json!({}), &Placement::default(), &model(), &Device::Cpu, 0).err().unwrap().to_string();
    assert!(e.contains("no_such") && e.contains("test_shift"), "{e}");
    let e = build(serde_json::json!({"scael": 2.0}), "{}").err().unwrap().to_string();
    assert!(e.contains("test_shift") && e.contains("scael"), "{e}");
    let e = build(serde_json::json!({"scale": "big"}), "{}").err().unwrap().to_string();
    assert!(e.contains("test_shift") && e.contains("invalid type"), "{e}");
    let e = build(serde_json::json!({}), r#"{"sites":["query"]}"#).err().unwrap().to_string();
    assert!(e.contains("query"), "{e}");
}

#[test]
fn set_dispatch_follows_the_active_stack_and_row_choices() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let mut set = AdapterSet::default();
    set.add("a", build(serde_json::json!({}), "{}")?)?;
    // b has its own seed and scale, so "a then b" differs from a, from b and from the base.
    set.add("b", build_seeded(serde_json::json!({"scale": -2.0}), "{}", 4)?)?;
    assert!(set.add("a", build(serde_json::json!({}), "{}")?).is_err());
    assert_eq!(set.names(), vec!["a", "b"]);

    let x = Tensor::zeros((3, 2, 4), DType::F32, &dev)?;
    let h = Tensor::ones((3, 2, 4), DType::F32, &dev)?;
    let io = SublayerIo { input: &x, output: &h, post_norm: None };
    let point = Point::new(0, Site::FfnOutput);
    let ctx = ForwardCtx::inference();

    // Nothing active: the output is returned untouched.
    let out = set.hidden(point, &io, &ctx)?;
    assert_eq!(out.to_vec3::<f32>()?, h.to_vec3::<f32>()?);

    let shift_a = set.get("a").unwrap().vars()[0].1.as_tensor().clone();
    set.activate(&["a"])?;
    let out = set.hidden(point, &io, &ctx)?;
    let want = h.broadcast_add(&shift_a)?;
    assert_eq!(out.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
    assert_eq!(set.active_vars().len(), 2);

    // Per-row choice: row 0 base, row 1 "a", row 2 "a" then "b" (stacked).
    let choices = vec![vec![], vec!["a".to_string()], vec!["a".to_string(), "b".to_string()]];
    let task_ids = Tensor::new(&[0u32, 1, 2], &dev)?;
    let ctx = ForwardCtx::inference().with_row_choices(&choices, &dev)?.with_task_ids(task_ids);
    let out = set.hidden(point, &io, &ctx)?;
    let shift_b = set.get("b").unwrap().vars()[0].1.as_tensor().clone();
    let rows = out.to_vec3::<f32>()?;
    assert_eq!(rows[0], h.get(0)?.to_vec2::<f32>()?);
    assert_eq!(rows[1], h.get(1)?.broadcast_add(&shift_a)?.to_vec2::<f32>()?);
    let stacked = h.get(2)?.broadcast_add(&shift_a)?.broadcast_add(&(shift_b * -2.0)?)?;
    let base_row = h.get(2)?.to_vec2::<f32>()?;
    assert!(rows[2].iter().flatten().zip(base_row.iter().flatten()).any(|(g, b)| (g - b).abs() > 0.1), "row 2 is the base");
    assert_ne!(rows[2], rows[1], "row 2 got only `a`");
    for (g, w) in rows[2].iter().flatten().zip(stacked.to_vec2::<f32>()?.iter().flatten()) {
        assert!((g - w).abs() < 1e-6, "row 2: {g} vs {w}");
    }

    let ctx = ForwardCtx::inference().with_row_choices(&[vec!["zzz".to_string()]], &dev)?;
    let e = set.hidden(point, &io, &ctx).unwrap_err().to_string();
    assert!(e.contains("zzz"), "{e}");

    set.remove("a")?;
    assert!(set.active().is_empty());
    assert!(set.activate(&["a"]).is_err());
    Ok(())
}
