//! Both backbones train through candle's autograd with adapters attached: every trainable
//! variable receives a gradient, gradients agree with finite differences, and the hooks
//! leave the base model untouched when no adapter is active.

mod common;

use adapters_core::{Adapter, ForwardCtx, InsertionPoint};
use adapters_models::heads::{mean_pool, ClassificationHead};
use adapters_models::HoldsAdapters;
use adapters_models::{load, Backbone, Bert, Llama};
use candle_core::{Device, Tensor, Var};
use common::*;

fn bert() -> Bert {
    match load(&minilm(), &Device::Cpu).unwrap().backbone {
        Backbone::Bert(b) => b,
        _ => unreachable!(),
    }
}

fn llama() -> Llama {
    match load(&smollm(), &Device::Cpu).unwrap().backbone {
        Backbone::Llama(m) => m,
        _ => unreachable!(),
    }
}

fn bert_batch() -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[101u32, 7592, 2088, 2003, 102], [101, 2307, 102, 0, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev).unwrap();
    (ids, mask)
}

fn bert_loss(bert: &Bert, head: &ClassificationHead, ctx: &ForwardCtx) -> Tensor {
    let (ids, mask) = bert_batch();
    let hidden = bert.forward(&ids, None, Some(&mask), ctx).unwrap();
    // Mean pooling plus the pooler's output, so the pooler's projection is on the path too.
    let pooled = (mean_pool(&hidden, &mask).unwrap() + bert.pooler_output(&hidden, ctx).unwrap().unwrap()).unwrap();
    let logits = head.forward(&pooled, 0.0, &ForwardCtx::inference()).unwrap();
    let labels = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&logits, &labels).unwrap()
}

#[test]
fn bert_every_adapter_and_head_variable_gets_a_gradient() {
    let mut bert = bert();
    let probe = Probe::everywhere(&bert.model_info(), &Device::Cpu).unwrap();
    assert_eq!(probe.points().len(), 6 * 8 + 1, "8 points per layer and the pooler");
    bert.adapters_mut().add("probe", Box::new(probe)).unwrap();
    bert.adapters_mut().activate(&["probe"]).unwrap();
    let head = ClassificationHead::new(384, 2, &Default::default(), 0, &Device::Cpu).unwrap();
    let loss = bert_loss(&bert, &head, &ForwardCtx::training());
    let grads = loss.backward().unwrap();
    let mut vars = bert.adapters().active_vars();
    vars.extend(head.vars());
    assert_all_grads(&vars, &grads);
}

#[test]
fn bert_gradients_agree_with_finite_differences() {
    let mut bert = bert();
    let probe = Probe::everywhere(&bert.model_info(), &Device::Cpu).unwrap();
    bert.adapters_mut().add("probe", Box::new(probe)).unwrap();
    bert.adapters_mut().activate(&["probe"]).unwrap();
    let head = ClassificationHead::new(384, 2, &Default::default(), 0, &Device::Cpu).unwrap();
    let ctx = ForwardCtx::training();
    let grads = bert_loss(&bert, &head, &ctx).backward().unwrap();
    let vars = bert.adapters().active_vars();
    // A hidden-site variable in the first layer and a projection-site one in the last.
    for name in ["probe.layer 0 attention_output", "probe.layer 5 value"] {
        let var: &Var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
        let analytic: Vec<Vec<f32>> = grads.get(var.as_tensor()).unwrap().to_vec2().unwrap();
        let orig = var.as_tensor().copy().unwrap();
        for (r, c) in [(0usize, 0usize), (3, 7)] {
            let eps = 1e-2f32;
            let at = |delta: f32| {
                let mut w: Vec<Vec<f32>> = orig.to_vec2().unwrap();
                w[r][c] += delta;
                var.set(&Tensor::new(w, &Device::Cpu).unwrap()).unwrap();
                bert_loss(&bert, &head, &ctx).to_scalar::<f32>().unwrap() as f64
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            var.set(&orig).unwrap();
            let a = analytic[r][c] as f64;
            assert!((a - numeric).abs() <= 2e-2 * a.abs().max(1e-2), "{name}[{r},{c}]: analytic {a}, numeric {numeric}");
        }
    }
}

#[test]
fn llama_every_adapter_variable_gets_a_gradient() {
    let mut m = llama();
    let probe = Probe::everywhere(&m.model_info(), &Device::Cpu).unwrap();
    assert_eq!(probe.points().len(), 30 * 9);
    m.adapters_mut().add("probe", Box::new(probe)).unwrap();
    m.adapters_mut().activate(&["probe"]).unwrap();
    let ids = Tensor::new(&[[504u32, 3575, 282, 4649, 314, 7042]], &Device::Cpu).unwrap();
    let ctx = ForwardCtx::training();
    let hidden = m.forward_hidden(&ids.narrow(1, 0, 5).unwrap(), None, &ctx).unwrap();
    let logits = m.logits(&hidden).unwrap().squeeze(0).unwrap();
    let targets = ids.narrow(1, 1, 5).unwrap().squeeze(0).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
    assert_all_grads(&m.adapters().active_vars(), &loss.backward().unwrap());
}

/// Checks that gradient checkpointing gives the plain step's loss and gradients, for a
/// model with a noisy probe attached (dropout and auxiliary losses at every hidden site) or
/// trained in full (`trainable`).
fn assert_checkpointing_matches(model: &Backbone, ids: &Tensor, mask: &Tensor, vars: &[(String, Var)], head: impl Fn(&Tensor) -> Tensor) {
    let plain_ctx = ForwardCtx::training_seeded(7);
    let mut plain = head(&model.hidden_states(ids, mask, &plain_ctx).unwrap());
    for aux in plain_ctx.take_aux().losses {
        plain = (plain + aux.value).unwrap();
    }
    let plain_grads = plain.backward().unwrap();
    let ctx = ForwardCtx::training_seeded(7);
    let just_vars: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let (mut loss, grads) = model.backward_checkpointed(ids, mask, &ctx, &just_vars, |h| Ok::<_, candle_core::Error>(head(h))).unwrap();
    for aux in ctx.take_aux().losses {
        assert!(!aux.value.track_op(), "the first pass builds no graph");
        loss = (loss + aux.value).unwrap();
    }
    let (a, b) = (plain.to_scalar::<f32>().unwrap(), loss.to_scalar::<f32>().unwrap());
    assert!((a - b).abs() <= 1e-5 * a.abs(), "loss: plain {a}, checkpointed {b}");
    assert_all_grads(vars, &grads);
    for (name, var) in vars {
        let (p, c) = (plain_grads.get(var).unwrap().flatten_all().unwrap(), grads.get(var).unwrap().flatten_all().unwrap());
        let scale = p.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let d = max_abs_diff(&p.to_vec1().unwrap(), &c.to_vec1().unwrap());
        assert!(d <= 1e-4 * scale, "{name}: gradients differ by {d} (largest {scale})");
    }
}

#[test]
fn checkpointed_steps_match_plain_steps_for_both_backbones_and_full_fine_tuning() {
    let dev = Device::Cpu;
    let head = ClassificationHead::new(384, 2, &Default::default(), 0, &dev).unwrap();
    let labels = Tensor::new(&[1u32, 0], &dev).unwrap();
    let (ids, mask) = bert_batch();
    let classify = |h: &Tensor| {
        let logits = head.forward(&mean_pool(h, &mask).unwrap(), 0.0, &ForwardCtx::inference()).unwrap();
        candle_nn::loss::cross_entropy(&logits, &labels).unwrap()
    };
    let mut model = Backbone::Bert(bert());
    let probe = Probe::everywhere(&model.model_info(), &dev).unwrap().noisy();
    model.adapters_mut().add("probe", Box::new(probe)).unwrap();
    model.adapters_mut().activate(&["probe"]).unwrap();
    // Every layer's variables and the head's (the pooler is not on this loss's path).
    let mut vars: Vec<_> = model.adapters().active_vars().into_iter().filter(|(n, _)| !n.contains("pooler")).collect();
    vars.extend(head.vars());
    assert_checkpointing_matches(&model, &ids, &mask, &vars, classify);

    // Full fine-tuning: the embeddings' gradients come through the first layer's input.
    model.adapters_mut().activate(&[]).unwrap();
    let trainable = model.make_trainable().unwrap();
    let names = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight", "encoder.layer.5.output.dense.bias"];
    let picked: Vec<_> = trainable.into_iter().filter(|(n, _)| names.contains(&n.as_str())).collect();
    assert_eq!(picked.len(), names.len());
    assert_checkpointing_matches(&model, &ids, &mask, &picked, classify);

    let mut model = Backbone::Llama(llama());
    let probe = Probe::everywhere(&model.model_info(), &dev).unwrap().noisy();
    model.adapters_mut().add("probe", Box::new(probe)).unwrap();
    model.adapters_mut().activate(&["probe"]).unwrap();
    let ids = Tensor::new(&[[504u32, 3575, 282, 4649, 314, 7042], [1, 2, 3, 4, 0, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &dev).unwrap();
    let Backbone::Llama(m) = &model else { unreachable!() };
    let next_token = |h: &Tensor| {
        let logits = m.logits(&h.narrow(1, 0, 5).unwrap()).unwrap().flatten_to(1).unwrap();
        candle_nn::loss::cross_entropy(&logits, &ids.narrow(1, 1, 5).unwrap().flatten_all().unwrap()).unwrap()
    };
    assert_checkpointing_matches(&model, &ids, &mask, &model.adapters().active_vars(), next_token);
}

#[test]
fn idle_hooks_leave_the_base_untouched_and_rows_can_choose() {
    let mut bert = bert();
    let (ids, mask) = bert_batch();
    let ctx = ForwardCtx::inference();
    let base = bert.forward(&ids, None, Some(&mask), &ctx).unwrap().to_vec3::<f32>().unwrap();
    let probe = Probe::everywhere(&bert.model_info(), &Device::Cpu).unwrap();
    let snapshot = bert.adapters_snapshot();
    bert.adapters_mut().add("probe", Box::new(probe)).unwrap();
    // A snapshot taken before (what a request in flight holds) is not changed.
    assert!(snapshot.names().is_empty() && bert.adapters().names() == ["probe"]);
    // Attached but inactive: bit-identical.
    assert_eq!(bert.forward(&ids, None, Some(&mask), &ctx).unwrap().to_vec3::<f32>().unwrap(), base);
    bert.adapters_mut().activate(&["probe"]).unwrap();
    let adapted = bert.forward(&ids, None, Some(&mask), &ctx).unwrap().to_vec3::<f32>().unwrap();
    assert_ne!(adapted, base);
    bert.adapters_mut().activate(&[]).unwrap();
    // Row 0 through the probe, row 1 through the base model, in one forward.
    let rows = ForwardCtx::inference().with_row_choices(&[vec!["probe".into()], vec![]], &Device::Cpu).unwrap();
    let mixed = bert.forward(&ids, None, Some(&mask), &rows).unwrap().to_vec3::<f32>().unwrap();
    assert_eq!(mixed[1], base[1]);
    let d = max_abs_diff(&mixed[0].concat(), &adapted[0].concat());
    assert!(d < 1e-5, "row 0 differs from the all-probe forward by {d}");
}

/// An embedding perturbation (what adversarial training searches) enters the forward
/// pass: zero changes nothing, and its gradient through every layer and adapter agrees
/// with finite differences.
#[test]
fn bert_embedding_perturbation_gradients_agree_with_finite_differences() {
    let mut bert = bert();
    let probe = Probe::everywhere(&bert.model_info(), &Device::Cpu).unwrap();
    bert.adapters_mut().add("probe", Box::new(probe)).unwrap();
    bert.adapters_mut().activate(&["probe"]).unwrap();
    let head = ClassificationHead::new(384, 2, &Default::default(), 0, &Device::Cpu).unwrap();
    let ctx = ForwardCtx::inference().with_graph();
    let plain = bert_loss(&bert, &head, &ctx).to_scalar::<f32>().unwrap();
    let zero = Var::zeros((2, 5, 384), candle_core::DType::F32, &Device::Cpu).unwrap();
    let loss = bert_loss(&bert, &head, &ctx.clone().with_embedding_perturbation(zero.as_tensor().clone()));
    assert_eq!(loss.to_scalar::<f32>().unwrap(), plain, "a zero perturbation changes nothing");
    let analytic: Vec<Vec<Vec<f32>>> = loss.backward().unwrap().get(zero.as_tensor()).unwrap().to_vec3().unwrap();
    assert!(analytic[1][4].iter().all(|&g| g == 0.0), "padding gets no gradient");
    for (b, t, h) in [(0usize, 0usize, 0usize), (0, 3, 100), (1, 1, 383)] {
        let at = |d: f32| {
            let mut v = vec![vec![vec![0f32; 384]; 5]; 2];
            v[b][t][h] = d;
            let delta = Tensor::new(v, &Device::Cpu).unwrap();
            bert_loss(&bert, &head, &ctx.clone().with_embedding_perturbation(delta)).to_scalar::<f32>().unwrap() as f64
        };
        let eps = 1e-2f32;
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        let a = analytic[b][t][h] as f64;
        assert!((a - numeric).abs() <= 2e-2 * a.abs().max(1e-3), "[{b},{t},{h}]: analytic {a}, numeric {numeric}");
    }
}
