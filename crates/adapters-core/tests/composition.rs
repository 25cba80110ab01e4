//! Core's composition blocks and per-row dispatch on toy kinds, checked against their
//! definitions exactly: a shift kind (`h + b`) whose outputs are easy to predict, one with
//! a batchable per-row form, and a fusion layer that must only run inside `fuse(...)`.

use adapters_core::AdapterSet;
use adapters_core::{
    Adapter, BatchableForm, Capabilities, ForwardCtx, FuseMember, Fused, FusionLayer, Point, RowBatched, Setup, Site, SublayerIo,
};
use adapters_testkit::max_diff;
use candle_core::{DType, Device, Result, Tensor, Var};

const POINT: Point = Point { layer: 0, site: Site::FfnOutput };

/// `h + b` at one hidden site; with `batchable`, the same through the per-row form.
struct Shift {
    bias: Tensor,
    batchable: bool,
}

impl Adapter for Shift {
    fn kind(&self) -> &str {
        "toy_shift"
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn points(&self) -> Vec<Point> {
        vec![POINT]
    }
    fn vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    fn forward_hidden(&self, _: Point, io: &SublayerIo, _: &ForwardCtx) -> Result<Tensor> {
        io.output.broadcast_add(&self.bias)
    }
    fn capabilities(&self) -> Capabilities<'_> {
        Capabilities { row_batched: self.batchable.then_some(self as &dyn RowBatched), ..Default::default() }
    }
}

impl RowBatched for Shift {
    fn batchable_form(&self, _: Point) -> Option<BatchableForm> {
        Some(BatchableForm { key: "toy_shift".into(), weights: vec![self.bias.clone()] })
    }
    /// `weights[0]` is `[rows, d]`: each row's own bias.
    fn forward_hidden_rows(&self, _: Point, io: &SublayerIo, weights: &[Tensor], _: &ForwardCtx) -> Result<Tensor> {
        io.output.broadcast_add(&weights[0].unsqueeze(1)?)
    }
}

/// A fusion layer that takes the members' mean output.
/// A fusion layer averaging its members' outputs, made over `members`.
struct MeanFusion {
    members: Vec<String>,
}

impl Adapter for MeanFusion {
    fn kind(&self) -> &str {
        "toy_fusion"
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn points(&self) -> Vec<Point> {
        vec![POINT]
    }
    fn vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    fn capabilities(&self) -> Capabilities<'_> {
        Capabilities { fusion: Some(self), ..Default::default() }
    }
}

impl FusionLayer for MeanFusion {
    fn members(&self) -> Vec<String> {
        self.members.clone()
    }

    fn fuse(&self, _: Point, _: &SublayerIo, members: &[FuseMember], _: &ForwardCtx) -> Result<Fused> {
        let outputs: Vec<&Tensor> = members.iter().map(|m| &m.output).collect();
        let output = (Tensor::stack(&outputs, 0)?.sum(0)? / members.len() as f64)?;
        let (b, t, _) = output.dims3()?;
        let attention = (Tensor::ones((b, t, members.len()), DType::F32, output.device())? / members.len() as f64)?;
        Ok(Fused { output, attention, regularization: None })
    }
}

fn vector(values: &[f32]) -> Tensor {
    Tensor::new(values, &Device::Cpu).unwrap()
}

/// A set with shifts `a` = +1, `b` = +10, `c` = +100 (all 4 features) and a fusion over a, b.
fn set(batchable: bool) -> (AdapterSet, [Tensor; 3]) {
    let biases = [vector(&[1.0; 4]), vector(&[10.0; 4]), vector(&[100.0; 4])];
    let mut set = AdapterSet::default();
    for (name, bias) in ["a", "b", "c"].iter().zip(&biases) {
        set.add(name, Box::new(Shift { bias: bias.clone(), batchable })).unwrap();
    }
    set.add("ab", Box::new(MeanFusion { members: vec!["a".into(), "b".into()] })).unwrap();
    (set, biases)
}

/// `[rows, 3, 4]` sublayer outputs, every value distinct.
fn output(rows: usize) -> Tensor {
    Tensor::arange(0f32, (rows * 12) as f32, &Device::Cpu).unwrap().reshape((rows, 3, 4)).unwrap()
}

fn run(set: &AdapterSet, h: &Tensor, ctx: &ForwardCtx) -> Tensor {
    let x = h.zeros_like().unwrap();
    set.hidden(POINT, &SublayerIo { input: &x, output: h, post_norm: None }, ctx).unwrap()
}

fn with(set: &mut AdapterSet, setup: &str) {
    set.set_setup(Some(setup.parse::<Setup>().unwrap())).unwrap();
}

#[test]
fn an_unnamed_fuse_block_finds_its_fusion_by_name_or_by_members() {
    let (mut set, _) = set(false);
    let h = output(2);
    let ctx = ForwardCtx::inference();
    // `ab` is made over [a, b]: `fuse(a, b)` finds it without AdapterHub's name `a,b`.
    with(&mut set, "fuse(a, b; fusion=ab)");
    let named = run(&set, &h, &ctx);
    with(&mut set, "fuse(a, b)");
    assert_eq!(set.setup().unwrap().to_string(), "fuse(a, b; fusion=ab)");
    assert_eq!(max_diff(&run(&set, &h, &ctx), &named), 0.0);
    // AdapterHub's name wins where it is attached.
    set.add("a,b", Box::new(MeanFusion { members: vec!["b".into(), "a".into()] })).unwrap();
    with(&mut set, "fuse(a, b)");
    assert_eq!(set.setup().unwrap().fusion_names(), ["a,b"]);
    // None over these members: the error lists what is attached.
    let err = set.set_setup(Some("fuse(b, c)".parse().unwrap())).unwrap_err().to_string();
    assert!(err.contains("no fusion layer over [b, c]") && err.contains("`ab` over [a, b]") && err.contains("`a,b` over [b, a]"), "{err}");
    // Two over the same members: name one.
    set.add("ab2", Box::new(MeanFusion { members: vec!["a".into(), "b".into()] })).unwrap();
    set.remove("a,b").unwrap();
    let err = set.check_setup(&"fuse(a, b)".parse().unwrap()).unwrap_err().to_string();
    assert!(err.contains("several") && err.contains("ab, ab2"), "{err}");
}

#[test]
fn each_block_computes_its_definition() {
    let (mut set, [a, b, c]) = set(false);
    let h = output(2);
    let ctx = ForwardCtx::inference();
    let plus = |t: &Tensor, bias: &Tensor| t.broadcast_add(bias).unwrap();

    with(&mut set, "stack(a, b, c)");
    assert_eq!(max_diff(&run(&set, &h, &ctx), &plus(&plus(&plus(&h, &a), &b), &c)), 0.0);

    // Σ wᵢ·outᵢ / n.
    with(&mut set, "average(a, b; weights=0.7, -0.3)");
    let want = ((plus(&h, &a) * (0.7 / 2.0)).unwrap() + (plus(&h, &b) * (-0.3 / 2.0)).unwrap()).unwrap();
    assert!(max_diff(&run(&set, &h, &ctx), &want) < 1e-5);

    // Rows 0 to a, row 1 to b.
    with(&mut set, "batch_split(a, b; sizes=1, 1)");
    let want = Tensor::cat(&[&plus(&h.narrow(0, 0, 1).unwrap(), &a), &plus(&h.narrow(0, 1, 1).unwrap(), &b)], 0).unwrap();
    assert_eq!(max_diff(&run(&set, &h, &ctx), &want), 0.0);

    // Positions 0..2 to a, position 2 to c.
    with(&mut set, "split(a, c; splits=2, 1)");
    let want = Tensor::cat(&[&plus(&h.narrow(1, 0, 2).unwrap(), &a), &plus(&h.narrow(1, 2, 1).unwrap(), &c)], 1).unwrap();
    assert_eq!(max_diff(&run(&set, &h, &ctx), &want), 0.0);

    // The batch repeated once per child (the backbone repeats it): copy i gets child i.
    with(&mut set, "parallel(a, b)");
    let repeated = h.repeat((2, 1, 1)).unwrap();
    let want = Tensor::cat(&[&plus(&h, &a), &plus(&h, &b)], 0).unwrap();
    assert_eq!(max_diff(&run(&set, &repeated, &ctx), &want), 0.0);

    // The fusion layer combines what each member computes.
    with(&mut set, "stack(c, fuse(a, b; fusion=ab))");
    let want = plus(&plus(&plus(&h, &c), &a), &(&b - &a).unwrap().affine(0.5, 0.0).unwrap());
    assert!(max_diff(&run(&set, &h, &ctx), &want) < 1e-5);
}

#[test]
fn a_fusion_layer_runs_only_inside_fuse_and_fuses_only_fusion_layers() {
    let (mut set, _) = set(false);
    let e = set.set_setup(Some("stack(ab)".parse().unwrap())).unwrap_err().to_string();
    assert!(e.contains("`ab` is a fusion layer") && e.contains("fuse("), "{e}");
    let e = set.set_setup(Some("fuse(a, b; fusion=c)".parse().unwrap())).unwrap_err().to_string();
    assert!(e.contains("`c` is a `toy_shift` adapter, not a fusion layer"), "{e}");
}

/// Rows choosing their own stacks get what each stack gives alone, whether the adapters
/// run group by group or through their batchable per-row form.
#[test]
fn rows_choose_their_stacks_alone_or_batched() {
    for batchable in [false, true] {
        let (mut set, _) = set(batchable);
        let h = output(4);
        let choices: Vec<Vec<String>> =
            [vec!["b"], vec![], vec!["a"], vec!["a", "c"]].iter().map(|c| c.iter().map(|s| s.to_string()).collect()).collect();
        let ctx = ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu).unwrap();
        let together = run(&set, &h, &ctx);
        for (row, choice) in choices.iter().enumerate() {
            let names: Vec<&str> = choice.iter().map(String::as_str).collect();
            set.activate(&names).unwrap();
            let alone = run(&set, &h.narrow(0, row, 1).unwrap(), &ForwardCtx::inference());
            let diff = max_diff(&together.narrow(0, row, 1).unwrap(), &alone);
            assert_eq!(diff, 0.0, "batchable {batchable}, row {row} {choice:?}");
        }
    }
}
