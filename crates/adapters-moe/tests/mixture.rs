//! Mixtures of experts on the real MiniLM: the sparse dispatch (fused in inference,
//! composed in training) equals computing every expert densely, padding is neither changed nor counted, gradients of the router and
//! experts match finite differences, capacity overflow and the skip choice pass tokens
//! through unchanged, noise is seeded, task and sequence routing send whole rows, a
//! one-expert mixture is a Pfeiffer adapter, averaging the experts gives the plain
//! adapter the mixture becomes, and mixtures run in mixed-adapter batches and load back.

use adapters_core::{io, registry, Adapter, ForwardCtx, InsertionPoint, Placement, Point, Site, SublayerIo};
use adapters_models::HoldsAdapters;
use adapters_models::{fetched, load, Backbone};
use adapters_moe::Mixture;
use adapters_testkit::max_diff;
use candle_core::{Device, Tensor};
use serde_json::json;

fn model() -> Backbone {
    let _ = (adapters_moe::family(), adapters_bottleneck::family(), adapters_lora::family());
    load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone
}

/// An adapter of `kind` with every weight random (LoRA's B does not start at zero).
fn adapter(m: &Backbone, kind: &str, config: serde_json::Value, seed: u64) -> Box<dyn Adapter> {
    let a = registry::build(kind, &config, &Placement::default(), &m.model_info(), &Device::Cpu, seed).unwrap();
    randomise(a.as_ref(), seed);
    a
}

fn randomise(a: &dyn Adapter, seed: u64) {
    let mut init = adapters_core::Init::new(seed + 1000);
    for (_, v) in a.vars() {
        let t = v.as_tensor();
        v.set(&(t + init.normal(t.shape(), 0.05, &Device::Cpu).unwrap()).unwrap()).unwrap();
    }
}

/// Six rows of seven tokens, rows 1, 2, 4 and 5 right-padded.
fn batch() -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids: Vec<Vec<u32>> = (0..6u32).map(|r| (0..7u32).map(|t| 1000 + (r * 31 + t * 17) % 900).collect()).collect();
    let mask: Vec<Vec<u32>> = (0..6usize).map(|r| (0..7usize).map(|t| u32::from(t < 7 - r % 3)).collect()).collect();
    (Tensor::new(ids, &dev).unwrap(), Tensor::new(mask, &dev).unwrap())
}

fn hidden(m: &Backbone, ctx: &ForwardCtx) -> Tensor {
    let (ids, mask) = batch();
    m.hidden_states(&ids, &mask, ctx).unwrap()
}

fn with(m: &mut Backbone, name: &str, a: Box<dyn Adapter>) {
    m.adapters_mut().add(name, a).unwrap();
    m.adapters_mut().activate(&[name]).unwrap();
}

#[test]
fn sparse_dispatch_equals_dense_and_skips_padding() {
    for (kind, extra) in [("moe_bn", json!({"non_linearity": "gelu"})), ("moe_lora", json!({"r": 4}))] {
        let mut m = model();
        let config = |dispatch: &str| {
            let mut c = json!({"experts": 4, "top_k": 2, "dispatch": dispatch, "z_loss": 0.001});
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            c
        };
        let a = adapter(&m, kind, config("sparse"), 3);
        with(&mut m, "sparse", a);
        let ctx = ForwardCtx::training_seeded(1);
        let sparse = hidden(&m, &ctx);
        let aux = ctx.take_aux();
        let (_, mask) = batch();
        let tokens: u32 = mask.sum_all().unwrap().to_scalar().unwrap();
        assert!(!aux.routing.is_empty());
        for stats in &aux.routing {
            assert_eq!(stats.tokens, tokens as f32, "{kind}: only real tokens are routed");
            assert_eq!(stats.tokens_per_expert.iter().sum::<f32>(), 2.0 * tokens as f32, "{kind}: two experts each");
        }
        assert_eq!(aux.losses.iter().filter(|l| l.name == "load_balance").count(), aux.routing.len());
        assert_eq!(aux.losses.iter().filter(|l| l.name == "router_z").count(), aux.routing.len());

        let mut d = model();
        let a = adapter(&d, kind, config("dense"), 3);
        with(&mut d, "dense", a);
        let dense = hidden(&d, &ForwardCtx::training_seeded(1));
        let diff = max_diff(&sparse, &dense);
        assert!(diff < 1e-4, "{kind}: sparse and dense differ by {diff}");
        // Inference: the fused pass (on the CPU) against the dense reference.
        let (sparse_inf, dense_inf) = (hidden(&m, &ForwardCtx::inference()), hidden(&d, &ForwardCtx::inference()));
        let diff = max_diff(&sparse_inf, &dense_inf);
        assert!(diff < 1e-4, "{kind}: sparse and dense inference differ by {diff}");
        // The mixture changed the output.
        let mut base = model();
        base.adapters_mut().activate(&[]).unwrap();
        assert!(max_diff(&sparse, &hidden(&base, &ForwardCtx::inference())) > 1e-3);
    }
}

/// In inference, token-routed bottleneck mixtures run routing, experts and the layer's
/// add-and-norm in one fused pass: it equals the graph path (taken with gradients on, and
/// when routing is recorded) on a padded batch, for every gate, top-2, the skip choice and
/// the noisy router; mixtures the fused pass does not cover keep the graph path.
#[test]
fn fused_inference_pass_equals_the_graph_path() {
    let (x, ones) = (
        Tensor::zeros((1, 2, 384), candle_core::DType::F32, &Device::Cpu).unwrap(),
        Tensor::ones(384, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let io = SublayerIo { input: &x, output: &x, post_norm: None };
    let fuses = |a: &dyn Adapter| {
        a.capabilities()
            .fused_post_norm
            .and_then(|f| f.add_layer_norm(a.points()[0], &io, (&ones, &ones, 1e-12), &ForwardCtx::inference()))
            .is_some()
    };
    let cases = [
        (json!({"experts": 4}), true),
        (json!({"experts": 4, "gate": "straight_through", "non_linearity": "silu"}), true),
        (json!({"experts": 4, "top_k": 2, "skip_expert": true, "non_linearity": "gelu"}), true),
        (json!({"experts": 4, "router": "noisy"}), true),
        (json!({"experts": 4, "capacity_factor": 1.0}), false),
        (json!({"experts": 4, "routing": "sequence"}), false),
        (json!({"experts": 4, "router": "random"}), false),
    ];
    let mut m = model();
    let mut base = model();
    base.adapters_mut().activate(&[]).unwrap();
    let bare = hidden(&base, &ForwardCtx::inference());
    for (i, (config, fused)) in cases.into_iter().enumerate() {
        let a = adapter(&m, "moe_bn", config.clone(), 11 + i as u64);
        assert_eq!(fuses(a.as_ref()), fused, "{config}");
        with(&mut m, &format!("moe{i}"), a);
        let fast = hidden(&m, &ForwardCtx::inference());
        for graph in [ForwardCtx::inference().with_graph(), ForwardCtx::inference().with_routing()] {
            let diff = max_diff(&fast, &hidden(&m, &graph));
            assert!(diff < 2e-5, "{config}: the fused pass differs from the graph path by {diff}");
        }
        assert!(max_diff(&fast, &bare) > 1e-3, "{config}: the mixture acts");
    }
}

#[test]
fn padding_does_not_change_routing_or_real_tokens() {
    let mut m = model();
    let a = adapter(&m, "moe_bn", json!({"experts": 4, "routing": "sequence"}), 5);
    with(&mut m, "moe", a);
    let (ids, mask) = batch();
    let run = |ids: &Tensor| {
        let ctx = ForwardCtx::inference().with_routing();
        let h = m.hidden_states(ids, &mask, &ctx).unwrap();
        (h, ctx.take_aux().routing)
    };
    let (h1, r1) = run(&ids);
    // Other ids on the padding positions.
    let other = ((ids.to_dtype(candle_core::DType::F32).unwrap() * mask.to_dtype(candle_core::DType::F32).unwrap()).unwrap()
        + ((1.0 - mask.to_dtype(candle_core::DType::F32).unwrap()).unwrap() * 4242.0).unwrap())
    .unwrap()
    .to_dtype(candle_core::DType::U32)
    .unwrap();
    let (h2, r2) = run(&other);
    let keep = mask.to_dtype(candle_core::DType::F32).unwrap().unsqueeze(2).unwrap();
    let diff = max_diff(&h1.broadcast_mul(&keep).unwrap(), &h2.broadcast_mul(&keep).unwrap());
    assert!(diff < 1e-5, "real tokens moved by {diff} when only padding changed");
    for (a, b) in r1.iter().zip(&r2) {
        assert_eq!(a.tokens_per_expert, b.tokens_per_expert);
        let choices = a.choices.as_ref().unwrap();
        let flat: Vec<u32> = mask.flatten_all().unwrap().to_vec1().unwrap();
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c.is_empty(), flat[i] == 0, "token {i}: padding has no expert, real tokens one");
        }
        // Sequence routing: every token of a row goes where its row goes.
        for row in choices.chunks(7) {
            let real: Vec<_> = row.iter().filter(|c| !c.is_empty()).collect();
            assert!(real.windows(2).all(|w| w[0] == w[1]));
        }
    }
}

/// The loss of a mixture on fixed sublayer tensors: a weighted sum of its output plus
/// its auxiliary losses (balance and z-loss).
fn site_loss(a: &Mixture, point: Point, io_in: &Tensor, io_out: &Tensor, weights: &Tensor) -> Tensor {
    let ctx = ForwardCtx::training_seeded(9);
    let out = a.forward_hidden(point, &SublayerIo { input: io_in, output: io_out, post_norm: None }, &ctx).unwrap();
    let mut loss = (out * weights).unwrap().sum_all().unwrap();
    for aux in ctx.take_aux().losses {
        loss = (loss + aux.value).unwrap();
    }
    loss
}

#[test]
fn router_and_expert_gradients_match_finite_differences() {
    let m = model();
    let built = one_site(&m, &json!({"experts": 4, "top_k": 2, "non_linearity": "gelu", "balance_loss": 0.5, "z_loss": 0.1}), 4);
    // A larger router so that routing depends clearly on the input.
    let (_, router) = built.vars().into_iter().find(|(n, _)| n.ends_with("router.weight")).unwrap();
    router.set(&(router.as_tensor() * 20.0).unwrap()).unwrap();
    let point = Point::new(0, Site::FfnOutput);
    let mut init = adapters_core::Init::new(77);
    let dev = Device::Cpu;
    let io_in = init.normal((2, 5, 384), 1.0, &dev).unwrap();
    let io_out = init.normal((2, 5, 384), 1.0, &dev).unwrap();
    let weights = init.normal((2, 5, 384), 1.0, &dev).unwrap();
    let grads = site_loss(&built, point, &io_in, &io_out, &weights).backward().unwrap();
    let eps = 1e-3f32;
    let mut checked = 0;
    for (name, var) in built.vars() {
        if !(name.contains("router") || name.contains("experts.1.adapter_down.weight") || name.contains("experts.2.adapter_up.weight")) {
            continue;
        }
        let g =
            grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The entries with the largest gradients, where the comparison means most.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in order.iter().take(4) {
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap()).unwrap();
                let l: f32 = site_loss(&built, point, &io_in, &io_out, &weights).to_scalar().unwrap();
                l
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            at(0.0);
            let rel = (fd - g[i]).abs() / g[i].abs().max(1e-2);
            assert!(rel < 2e-2, "{name}[{i}]: autograd {} vs finite differences {fd}", g[i]);
            checked += 1;
        }
    }
    assert!(checked >= 12);
}

#[test]
fn the_straight_through_gate_adds_the_chosen_expert_at_full_weight_and_trains_the_router_as_switch_does() {
    let m = model();
    let config = |gate: &str| json!({"experts": 4, "gate": gate, "balance_loss": 0.5});
    let st = one_site(&m, &config("straight_through"), 12);
    let switch = one_site(&m, &config("probability"), 12);
    let (_, router) = st.vars().into_iter().find(|(n, _)| n.ends_with("router.weight")).unwrap();
    router.set(&(router.as_tensor() * 20.0).unwrap()).unwrap();
    for ((_, a), (_, b)) in st.vars().into_iter().zip(switch.vars()) {
        b.set(a.as_tensor()).unwrap();
    }
    let point = Point::new(0, Site::FfnOutput);
    let mut init = adapters_core::Init::new(13);
    let dev = Device::Cpu;
    let (io_in, io_out) = (init.normal((2, 5, 384), 1.0, &dev).unwrap(), init.normal((2, 5, 384), 1.0, &dev).unwrap());
    // Inference: each token's output is the sublayer output plus its chosen expert, unscaled.
    let ctx = ForwardCtx::inference().with_routing();
    let out = st.forward_hidden(point, &SublayerIo { input: &io_in, output: &io_out, post_norm: None }, &ctx).unwrap();
    let choices = ctx.take_aux().routing[0].choices.clone().unwrap();
    let z = (&io_in + &io_out).unwrap().reshape((10, 384)).unwrap();
    let var = |name: &str| st.vars().into_iter().find(|(n, _)| n.ends_with(name)).unwrap().1.as_tensor().clone();
    for (token, chosen) in choices.iter().enumerate() {
        let e = chosen[0];
        let x = z.get(token).unwrap().unsqueeze(0).unwrap();
        let w = |p: &str| var(&format!("experts.{e}.{p}"));
        let h = x.matmul(&w("adapter_down.weight").t().unwrap()).unwrap().broadcast_add(&w("adapter_down.bias")).unwrap().relu().unwrap();
        let y = h.matmul(&w("adapter_up.weight").t().unwrap()).unwrap().broadcast_add(&w("adapter_up.bias")).unwrap();
        let expected = (io_out.reshape((10, 384)).unwrap().get(token).unwrap() + y.squeeze(0).unwrap()).unwrap();
        let d = max_diff(&out.reshape((10, 384)).unwrap().get(token).unwrap(), &expected);
        assert!(d < 1e-4, "token {token}: differs from its expert at full weight by {d}");
    }
    // Training: the router's gradient is Switch's (the gate's derivative is the
    // probability's in both); the forward is the inference one.
    let weights = init.normal((2, 5, 384), 1.0, &dev).unwrap();
    let router_grad = |a: &Mixture| {
        let grads = site_loss(a, point, &io_in, &io_out, &weights).backward().unwrap();
        let (_, r) = a.vars().into_iter().find(|(n, _)| n.ends_with("router.weight")).unwrap();
        grads.get(r.as_tensor()).unwrap().clone()
    };
    let (g_st, g_switch) = (router_grad(&st), router_grad(&switch));
    assert!(max_abs(&g_st) > 1e-3);
    let d = max_diff(&g_st, &g_switch);
    assert!(d < 1e-4 * max_abs(&g_switch).max(1.0), "router gradients differ by {d}");
    let ctx = ForwardCtx::training_seeded(9);
    let trained = st.forward_hidden(point, &SublayerIo { input: &io_in, output: &io_out, post_norm: None }, &ctx).unwrap();
    assert!(max_diff(&trained, &out) < 1e-4);
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn overflow_and_skip_pass_tokens_through_unchanged() {
    let m = model();
    let configs = [("capacity", json!({"experts": 4, "capacity_factor": 0.5})), ("skip", json!({"experts": 4, "skip_expert": true}))];
    for (what, config) in configs {
        let a = one_site(&m, &config, 6);
        if what == "skip" {
            // The skip choice's router row aligned with a common direction: many tokens skip.
            let (_, router) = a.vars().into_iter().find(|(n, _)| n.ends_with("router.weight")).unwrap();
            let t = router.as_tensor();
            let skip_row = (Tensor::ones((1, 384), candle_core::DType::F32, &Device::Cpu).unwrap() * 0.05).unwrap();
            router.set(&Tensor::cat(&[t.narrow(0, 0, 4).unwrap(), skip_row], 0).unwrap()).unwrap();
        }
        let mut init = adapters_core::Init::new(8);
        let dev = Device::Cpu;
        let (io_in, io_out) = (init.normal((3, 6, 384), 1.0, &dev).unwrap(), init.normal((3, 6, 384), 1.0, &dev).unwrap());
        let ctx = ForwardCtx::inference().with_routing();
        let out = a
            .forward_hidden(Point::new(0, Site::FfnOutput), &SublayerIo { input: &io_in, output: &io_out, post_norm: None }, &ctx)
            .unwrap();
        let stats = ctx.take_aux().routing.remove(0);
        let passed = if what == "capacity" { stats.overflowed } else { stats.skipped };
        assert!(passed > 0.0, "{what}: no token passed through");
        assert!(stats.tokens_per_expert.iter().sum::<f32>() > 0.0, "{what}: no token reached an expert");
        if what == "capacity" {
            // ceil(0.5 · 18 tokens · 1 / 4 experts) = 3 tokens per expert at most.
            assert!(stats.tokens_per_expert.iter().all(|&n| n <= 3.0), "{:?}", stats.tokens_per_expert);
        }
        let (out, io_out) = (out.flatten_to(1).unwrap(), io_out.flatten_to(1).unwrap());
        let mut unchanged = 0;
        for (i, c) in stats.choices.unwrap().iter().enumerate() {
            let d = max_diff(&out.get(i).unwrap(), &io_out.get(i).unwrap());
            if c.is_empty() {
                assert!(d == 0.0, "{what}: token {i} had no expert but moved by {d}");
                unchanged += 1;
            } else {
                assert!(d > 1e-6, "{what}: token {i} had experts {c:?} but did not move");
            }
        }
        assert_eq!(unchanged as f32, passed);
    }
}

/// A `moe_bn` mixture at layer 0's feed-forward output only, every weight random.
fn one_site(m: &Backbone, config: &serde_json::Value, seed: u64) -> Mixture {
    let a = Mixture::build(
        adapters_moe::ExpertKind::Bottleneck,
        &adapters_core::BuildArgs {
            config,
            placement: &Placement { layers: adapters_core::Layers::List(vec![0]), ..Default::default() },
            model: &m.model_info(),
            device: &Device::Cpu,
            seed,
        },
    )
    .unwrap();
    randomise(&a, seed);
    a
}

#[test]
fn noisy_routing_is_seeded_and_off_in_inference() {
    let mut m = model();
    let a = adapter(&m, "moe_bn", json!({"experts": 4, "router": "noisy", "noise_std": 2.0}), 7);
    with(&mut m, "moe", a);
    let run = |ctx: &ForwardCtx| -> (Tensor, Vec<Vec<f32>>) {
        let h = hidden(&m, ctx);
        (h, ctx.take_aux().routing.into_iter().map(|r| r.tokens_per_expert).collect())
    };
    let (a, ra) = run(&ForwardCtx::training_seeded(11));
    let (b, rb) = run(&ForwardCtx::training_seeded(11));
    assert_eq!(max_diff(&a, &b), 0.0);
    assert_eq!(ra, rb);
    let (_, rc) = run(&ForwardCtx::training_seeded(12));
    assert_ne!(ra, rc, "another seed draws other noise");
    let (i1, _) = run(&ForwardCtx::inference());
    let (i2, _) = run(&ForwardCtx::inference());
    assert_eq!(max_diff(&i1, &i2), 0.0);
}

#[test]
fn task_routing_follows_the_task_ids() {
    let mut m = model();
    let a = adapter(&m, "moe_bn", json!({"experts": 4, "routing": "task", "tasks": 2}), 8);
    // Task 0 prefers expert 1, task 1 expert 3.
    for (name, v) in a.vars() {
        if name.ends_with("router.weight") {
            v.set(&Tensor::new(&[[0f32, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]], &Device::Cpu).unwrap()).unwrap();
        }
    }
    with(&mut m, "moe", a);
    let tasks = Tensor::new(&[0u32, 1, 0, 1, 1, 0], &Device::Cpu).unwrap();
    let ctx = ForwardCtx::inference().with_routing().with_task_ids(tasks);
    hidden(&m, &ctx);
    for stats in ctx.take_aux().routing {
        assert_eq!(stats.per_task.len(), 2);
        assert!(stats.per_task[0][1] > 0.0 && stats.per_task[0].iter().sum::<f32>() == stats.per_task[0][1]);
        assert!(stats.per_task[1][3] > 0.0 && stats.per_task[1].iter().sum::<f32>() == stats.per_task[1][3]);
    }
    let (ids, mask) = batch();
    let err = m.hidden_states(&ids, &mask, &ForwardCtx::inference()).unwrap_err().to_string();
    assert!(err.contains("task routing needs task ids"), "{err}");
}

/// A one-expert mixture (gate = 1) computes what a Pfeiffer adapter with the same weights
/// does; averaging the experts of a mixture whose experts are equal gives that adapter.
#[test]
fn a_one_expert_mixture_is_a_pfeiffer_adapter_and_averaging_gives_the_plain_kind() {
    for (experts, router) in [(1, "linear"), (3, "random")] {
        let mut m = model();
        let mixture = Mixture::build(
            adapters_moe::ExpertKind::Bottleneck,
            &adapters_core::BuildArgs {
                config: &json!({"experts": experts, "router": router, "shared_init": true, "reduction_factor": 12}),
                placement: &Placement::default(),
                model: &m.model_info(),
                device: &Device::Cpu,
                seed: 9,
            },
        )
        .unwrap();
        // Every expert the same random weights (biases included).
        let mut init = adapters_core::Init::new(21);
        let mut drawn = std::collections::HashMap::new();
        for (name, v) in mixture.vars() {
            let key = name.split(".experts.").nth(1).map(|rest| rest.split_once('.').unwrap().1.to_string()).unwrap_or(name.clone());
            let key = format!("{}:{key}", name.split(".experts.").next().unwrap());
            let t = drawn.entry(key).or_insert_with(|| (v.as_tensor() + init.normal(v.shape(), 0.05, &Device::Cpu).unwrap()).unwrap());
            v.set(t).unwrap();
        }
        let form = mixture.averaged().unwrap();
        assert_eq!(form.kind, "seq_bn");
        let plain = registry::build(form.kind, &form.config, &Placement::default(), &m.model_info(), &Device::Cpu, 0).unwrap();
        io::fill_vars(plain.as_ref(), form.tensors.into_iter().collect(), std::path::Path::new("averaged")).unwrap();
        with(&mut m, "moe", Box::new(mixture));
        let a = hidden(&m, &ForwardCtx::inference());
        with(&mut m, "plain", plain);
        let b = hidden(&m, &ForwardCtx::inference());
        // Padding: the mixture leaves it alone, a plain adapter does not.
        let keep = batch().1.to_dtype(candle_core::DType::F32).unwrap().unsqueeze(2).unwrap();
        let diff = max_diff(&a.broadcast_mul(&keep).unwrap(), &b.broadcast_mul(&keep).unwrap());
        assert!(diff < 1e-4, "{experts} experts ({router}): mixture and plain adapter differ by {diff}");
    }
}

/// In a batch whose rows choose different adapters, mixture rows equal the mixture alone.
#[test]
fn mixtures_run_in_mixed_batches_and_load_back() {
    let mut m = model();
    let a = adapter(&m, "moe_lora", json!({"experts": 3, "top_k": 2}), 12);
    m.adapters_mut().add("moe", a).unwrap();
    let a = adapter(&m, "seq_bn", json!({}), 13);
    m.adapters_mut().add("bn", a).unwrap();
    let s = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let choices = vec![s(&["moe"]), s(&["bn"]), s(&[]), s(&["moe"]), s(&["bn", "moe"]), s(&["moe"])];
    let mixed = hidden(&m, &ForwardCtx::inference().with_row_choices(&choices, &Device::Cpu).unwrap());
    for (row, stack) in choices.iter().enumerate() {
        let names: Vec<&str> = stack.iter().map(String::as_str).collect();
        m.adapters_mut().activate(&names).unwrap();
        let alone = hidden(&m, &ForwardCtx::inference()).get(row).unwrap();
        let (_, mask) = batch();
        let keep = mask.get(row).unwrap().to_dtype(candle_core::DType::F32).unwrap().unsqueeze(1).unwrap();
        let d = max_diff(&mixed.get(row).unwrap().broadcast_mul(&keep).unwrap(), &alone.broadcast_mul(&keep).unwrap());
        assert!(d < 1e-4, "row {row} ({stack:?}) differs by {d}");
    }
    // Saved and loaded back, it computes the same.
    m.adapters_mut().activate(&["moe"]).unwrap();
    let before = hidden(&m, &ForwardCtx::inference());
    let dir = std::env::temp_dir().join(format!("moe-roundtrip-{}", std::process::id()));
    let saved = m.adapters().get("moe").unwrap().clone();
    io::save(&dir, "moe", saved.as_ref(), &Placement::default(), &m.fingerprint().unwrap()).unwrap();
    let loaded = io::load(&dir, &m, &Device::Cpu).unwrap();
    assert_eq!(loaded.adapter.kind(), "moe_lora");
    m.adapters_mut().remove("moe").unwrap();
    with(&mut m, "moe", loaded.adapter);
    assert_eq!(max_diff(&before, &hidden(&m, &ForwardCtx::inference())), 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    let m = model();
    let build = |kind: &str, c: serde_json::Value| {
        registry::build(kind, &c, &Placement::default(), &m.model_info(), &Device::Cpu, 0).err().map(|e| e.to_string()).unwrap_or_default()
    };
    assert!(build("moe_bn", json!({"top_k": 9})).contains("`top_k`"));
    assert!(build("moe_bn", json!({"experts": 1_000_000_000})).contains("`experts`"));
    assert!(build("moe_bn", json!({"r": 8})).contains("moe_lora"));
    assert!(build("moe_lora", json!({"reduction_factor": 8})).contains("moe_bn"));
    assert!(build("moe_lora", json!({"r": 1_000_000_000})).contains("`r`"));
    assert!(build("moe_bn", json!({"routing": "task"})).contains("`tasks`"));
    assert!(build("moe_bn", json!({"router": "random", "top_k": 2})).contains("random"));
    assert!(build("moe_bn", json!({"capacity_factor": -1})).contains("`capacity_factor`"));
    assert!(build("moe_bn", json!({"gate": "straight_through", "top_k": 2})).contains("`top_k = 1`"));
    assert!(build("moe_bn", json!({"expert": 4})).contains("unknown field `expert`"));
}
