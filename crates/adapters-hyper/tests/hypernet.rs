//! The hypernetwork on the real MiniLM: it starts near the identity, a batch mixing tasks
//! gives every row what its task alone gives, a task mixture of weights 1 and 0 is that
//! task exactly, the exported `seq_bn` adapter computes what the hypernetwork computes,
//! gradients of every part match finite differences, it saves and loads back, and bad
//! configurations are refused naming the field.

use adapters_core::{io, registry, Adapter, BuildArgs, ForwardCtx, InsertionPoint, Placement, Point, Site, SublayerIo};
use adapters_hyper::HyperNet;
use adapters_models::HoldsAdapters;
use adapters_models::{fetched, load, Backbone};
use adapters_testkit::max_diff;
use candle_core::{Device, Tensor};
use serde_json::json;

const TASKS: [&str; 3] = ["sms_spam", "trec_coarse", "rotten_tomatoes"];

fn model() -> Backbone {
    let _ = (adapters_hyper::family(), adapters_bottleneck::family());
    load(&fetched("all-MiniLM-L6-v2").unwrap(), &Device::Cpu).unwrap().backbone
}

fn config() -> serde_json::Value {
    json!({"tasks": TASKS, "layer_norm": true, "non_linearity": "gelu"})
}

/// A hypernetwork whose every weight is moved away from its initialisation (its heads and
/// task embeddings would otherwise start too alike to tell tasks apart).
fn hyper(m: &Backbone, config: &serde_json::Value, seed: u64) -> HyperNet {
    let h = HyperNet::build(&BuildArgs { config, placement: &Placement::default(), model: &m.model_info(), device: &Device::Cpu, seed })
        .unwrap();
    let mut init = adapters_core::Init::new(seed + 1000);
    for (_, v) in h.vars() {
        let t = v.as_tensor();
        v.set(&(t + init.normal(t.shape(), 0.02, &Device::Cpu).unwrap()).unwrap()).unwrap();
    }
    h
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

fn tasks(ids: &[u32]) -> ForwardCtx {
    ForwardCtx::inference().with_task_ids(Tensor::new(ids, &Device::Cpu).unwrap())
}

fn mean_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().mean_all().unwrap().to_scalar().unwrap()
}

fn attach(m: &mut Backbone, name: &str, a: Box<dyn Adapter>) {
    m.adapters_mut().add(name, a).unwrap();
    m.adapters_mut().activate(&[name]).unwrap();
}

#[test]
fn starts_near_the_identity_like_a_pfeiffer_adapter() {
    let mut m = model();
    let base = hidden(&m, &ForwardCtx::inference());
    let h = registry::build("hyper_bn", &json!({"tasks": TASKS}), &Placement::default(), &m.model_info(), &Device::Cpu, 1).unwrap();
    attach(&mut m, "hyper", h);
    let generated = hidden(&m, &tasks(&[0, 1, 2, 0, 1, 2]));
    let pfeiffer = registry::build("seq_bn", &json!({}), &Placement::default(), &m.model_info(), &Device::Cpu, 1).unwrap();
    attach(&mut m, "pfeiffer", pfeiffer);
    let plain = hidden(&m, &ForwardCtx::inference());
    let moved = mean_abs(&(&generated - &base).unwrap());
    let moved_plain = mean_abs(&(&plain - &base).unwrap());
    assert!(moved > 0.0, "the generated adapters do something");
    assert!(
        moved < 2.0 * moved_plain,
        "the hypernetwork moves the output by {moved} on average, a fresh Pfeiffer adapter by {moved_plain}"
    );
}

#[test]
fn a_mixed_task_batch_gives_every_row_its_own_tasks_output() {
    let mut m = model();
    let h = hyper(&m, &config(), 2);
    attach(&mut m, "hyper", Box::new(h));
    let mixed = hidden(&m, &tasks(&[0, 1, 2, 2, 0, 1]));
    for task in 0..3u32 {
        let alone = hidden(&m, &tasks(&[task; 6]));
        for (row, &t) in [0u32, 1, 2, 2, 0, 1].iter().enumerate() {
            if t == task {
                let d = max_diff(&mixed.get(row).unwrap(), &alone.get(row).unwrap());
                assert!(d < 1e-4, "row {row} (task {t}) differs from its task alone by {d}");
            }
        }
    }
    // Tasks get different adapters.
    let (first, second) = (hidden(&m, &tasks(&[0; 6])), hidden(&m, &tasks(&[1; 6])));
    assert!(max_diff(&first, &second) > 1e-3);
}

#[test]
fn mixtures_interpolate_and_weights_one_and_zero_are_the_task_exactly() {
    let mut m = model();
    let h = hyper(&m, &config(), 3);
    let table = h.vars().into_iter().find(|(n, _)| n == "hypernet.task_embeddings").unwrap().1;
    let pure = h.task_vector(&[("trec_coarse".into(), 1.0), ("sms_spam".into(), 0.0)]).unwrap();
    let row = table.as_tensor().get(1).unwrap();
    assert_eq!(pure.to_vec1::<f32>().unwrap(), row.to_vec1::<f32>().unwrap(), "bit for bit");
    let half = h.task_vector(&[("sms_spam".into(), 0.5), ("rotten_tomatoes".into(), 0.5)]).unwrap();
    let mean = ((table.as_tensor().get(0).unwrap() + table.as_tensor().get(2).unwrap()).unwrap() * 0.5).unwrap();
    assert!(max_diff(&half, &mean) < 1e-6);
    // Given as the context's conditioning, the pure vector gives the task's output.
    let vectors = pure.unsqueeze(0).unwrap().repeat((6, 1)).unwrap();
    attach(&mut m, "hyper", Box::new(h));
    let by_vector = hidden(&m, &ForwardCtx::inference().with_conditioning(vectors));
    let by_id = hidden(&m, &tasks(&[1; 6]));
    assert!(max_diff(&by_vector, &by_id) < 1e-5);
    // Unknown names and weights are refused, naming them.
    let h = hyper(&m, &config(), 3);
    let err = h.task_vector(&[("imdb".into(), 1.0)]).unwrap_err().to_string();
    assert!(err.contains("imdb") && err.contains("rotten_tomatoes"), "{err}");
    let err = h.task_vector(&[("sms_spam".into(), f64::NAN)]).unwrap_err().to_string();
    assert!(err.contains("sms_spam"), "{err}");
}

#[test]
fn the_exported_adapter_computes_what_the_hypernetwork_computes() {
    let dir = std::env::temp_dir().join(format!("hyper-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut m = model();
    let h = hyper(&m, &config(), 4);
    io::save(&dir, "hyper", &h, &Placement::default(), &m.fingerprint().unwrap()).unwrap();
    attach(&mut m, "hyper", Box::new(h));
    let expected = hidden(&m, &tasks(&[2; 6]));
    let mixed_expected = {
        let h = adapters_hyper::export::export_folder(&dir, &m, &[("rotten_tomatoes".into(), 1.0)], &Device::Cpu).unwrap();
        assert_eq!(h.adapter.kind(), "seq_bn");
        attach(&mut m, "exported", h.adapter);
        hidden(&m, &ForwardCtx::inference())
    };
    let d = max_diff(&expected, &mixed_expected);
    assert!(d < 1e-4, "exported adapter differs by {d}");
    // A saved and loaded hypernetwork computes the same.
    let loaded = io::load(&dir, &m, &Device::Cpu).unwrap();
    attach(&mut m, "loaded", loaded.adapter);
    assert_eq!(max_diff(&hidden(&m, &tasks(&[2; 6])), &expected), 0.0);
    // A plain adapter is not a hypernetwork.
    let plain = dir.with_extension("plain");
    let _ = std::fs::remove_dir_all(&plain);
    let a = registry::build("seq_bn", &json!({}), &Placement::default(), &m.model_info(), &Device::Cpu, 0).unwrap();
    io::save(&plain, "plain", a.as_ref(), &Placement::default(), &m.fingerprint().unwrap()).unwrap();
    let err = adapters_hyper::export::export_folder(&plain, &m, &[("sms_spam".into(), 1.0)], &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("seq_bn") && err.contains("hyper_bn"), "{err}");
    let _ = (std::fs::remove_dir_all(&dir), std::fs::remove_dir_all(&plain));
}

fn site_loss(h: &HyperNet, point: Point, io_in: &Tensor, io_out: &Tensor, weights: &Tensor) -> Tensor {
    let ctx = ForwardCtx::training_seeded(9).with_task_ids(Tensor::new(&[0u32, 2], &Device::Cpu).unwrap());
    let out = h.forward_hidden(point, &SublayerIo { input: io_in, output: io_out, post_norm: None }, &ctx).unwrap();
    (out * weights).unwrap().sum_all().unwrap()
}

#[test]
fn gradients_of_every_part_match_finite_differences() {
    let m = model();
    let h = hyper(&m, &config(), 5);
    let point = Point::new(3, Site::FfnOutput);
    let mut init = adapters_core::Init::new(77);
    let dev = Device::Cpu;
    let io_in = init.normal((2, 5, 384), 1.0, &dev).unwrap();
    let io_out = init.normal((2, 5, 384), 1.0, &dev).unwrap();
    let weights = init.normal((2, 5, 384), 1.0, &dev).unwrap();
    let grads = site_loss(&h, point, &io_in, &io_out, &weights).backward().unwrap();
    let eps = 1e-3f32;
    let mut checked = 0;
    for (name, var) in h.vars() {
        let g =
            grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The entries with the largest gradients, where the comparison means most.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in order.iter().take(2) {
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap()).unwrap();
                let l: f32 = site_loss(&h, point, &io_in, &io_out, &weights).to_scalar().unwrap();
                l
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            at(0.0);
            let rel = (fd - g[i]).abs() / g[i].abs().max(1e-1);
            assert!(rel < 3e-2, "{name}[{i}]: autograd {} vs finite differences {fd}", g[i]);
            checked += 1;
        }
    }
    assert!(checked >= 2 * 14, "every variable checked: {checked}");
}

#[test]
fn bad_configurations_are_refused_naming_the_field() {
    let m = model();
    let info = m.model_info();
    let build =
        |c: serde_json::Value| registry::build("hyper_bn", &c, &Placement::default(), &info, &Device::Cpu, 0).err().unwrap().to_string();
    assert!(build(json!({})).contains("`tasks`"));
    assert!(build(json!({"tasks": ["a", "a"]})).contains("`a` twice"));
    assert!(build(json!({"tasks": ["a"], "code_dim": 1_000_000_000})).contains("`code_dim`"));
    assert!(build(json!({"tasks": ["a"], "reduction_factor": 0})).contains("`reduction_factor`"));
    let e = build(json!({"tasks": ["a"], "conditioning": "prompt"}));
    assert!(e.contains("`prompt`") && e.contains("hyper_bn"), "{e}");
    // Without task ids a task-conditioned hypernetwork says how to give them.
    let mut m = m;
    let h = hyper(&m, &config(), 6);
    attach(&mut m, "hyper", Box::new(h));
    let (ids, mask) = batch();
    let err = m.hidden_states(&ids, &mask, &ForwardCtx::inference()).unwrap_err().to_string();
    assert!(err.contains("--task"), "{err}");
}

#[test]
fn instance_conditioning_reads_each_rows_own_tokens() {
    let mut m = model();
    let h = hyper(&m, &json!({"conditioning": "instance"}), 7);
    attach(&mut m, "hyper", Box::new(h));
    let (ids, mask) = batch();
    let all = m.hidden_states(&ids, &mask, &ForwardCtx::inference()).unwrap();
    // Row 1 alone, without its padding: the backbone computes its conditioning from its
    // real tokens only, so it gets the same adapter.
    let real = mask.get(1).unwrap().sum_all().unwrap().to_scalar::<u32>().unwrap() as usize;
    let alone_ids = ids.get(1).unwrap().narrow(0, 0, real).unwrap().unsqueeze(0).unwrap();
    let alone_mask = mask.get(1).unwrap().narrow(0, 0, real).unwrap().unsqueeze(0).unwrap();
    let alone = m.hidden_states(&alone_ids, &alone_mask, &ForwardCtx::inference()).unwrap();
    let d = max_diff(&all.get(1).unwrap().narrow(0, 0, real).unwrap(), &alone.get(0).unwrap());
    assert!(d < 1e-4, "row 1 differs from itself alone by {d}");
    // Rows with other tokens get other adapters: the same row repeated with different
    // neighbours is unchanged, while the hypernetwork with a fixed vector changes it.
    let fixed = Tensor::zeros((6, 384), candle_core::DType::F32, &Device::Cpu).unwrap();
    let given = m.hidden_states(&ids, &mask, &ForwardCtx::inference().with_conditioning(fixed)).unwrap();
    assert!(max_diff(&given, &all) > 1e-3, "the instance vector matters");
}

#[test]
fn a_new_task_starts_from_a_trained_generator_and_trains_only_its_embedding() {
    let dir = std::env::temp_dir().join(format!("hyper-generator-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let m = model();
    let trained = hyper(&m, &config(), 8);
    io::save(&dir, "hyper", &trained, &Placement::default(), &m.fingerprint().unwrap()).unwrap();
    let new_config = json!({"tasks": ["trec_fine", "sms_spam"], "layer_norm": true, "non_linearity": "gelu",
        "generator_from": dir, "train": "task_embeddings"});
    let fresh = HyperNet::build(&BuildArgs {
        config: &new_config,
        placement: &Placement::default(),
        model: &m.model_info(),
        device: &Device::Cpu,
        seed: 9,
    })
    .unwrap();
    // Only the task table trains; everything else is the trained generator's.
    let trains: Vec<String> = fresh.vars().into_iter().map(|(n, _)| n).filter(|n| (&fresh as &dyn Adapter).trains_var(n)).collect();
    assert_eq!(trains, ["hypernet.task_embeddings"]);
    let theirs: std::collections::HashMap<String, Tensor> = trained.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    for (name, var) in fresh.vars() {
        if name != "hypernet.task_embeddings" {
            assert_eq!(max_diff(var.as_tensor(), &theirs[&name]), 0.0, "{name} copied");
        }
    }
    // A task both know keeps its embedding; a new one starts at their mean.
    let table = fresh.vars().into_iter().find(|(n, _)| n == "hypernet.task_embeddings").unwrap().1.as_tensor().clone();
    let old = &theirs["hypernet.task_embeddings"];
    assert_eq!(max_diff(&table.get(1).unwrap(), &old.get(0).unwrap()), 0.0);
    assert!(max_diff(&table.get(0).unwrap(), &old.mean(0).unwrap()) < 1e-6);
    // Saved, it is a complete hypernetwork: no reference to the generator's folder.
    assert!(fresh.config().get("generator_from").is_none());
    // A generator of another shape is refused, naming the field and the folder.
    let other = json!({"tasks": ["x"], "layer_norm": true, "non_linearity": "gelu", "code_dim": 4, "generator_from": dir});
    let err = registry::build("hyper_bn", &other, &Placement::default(), &m.model_info(), &Device::Cpu, 0).err().unwrap().to_string();
    assert!(err.contains("`code_dim`") && err.contains("adapter_config.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
