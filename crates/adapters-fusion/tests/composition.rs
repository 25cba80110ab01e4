//! The composition blocks on a real model with real adapters (the two Pfeiffer adapters of
//! the AdapterHub fusion reference): `parallel` gives each child's output from one pass,
//! `batch_split` gives each row its child's output, `split` over one adapter twice is that
//! adapter, and a refused setup leaves the active one in place.

use adapters_core::{io, ForwardCtx, Setup};
use adapters_models::HoldsAdapters;
use adapters_models::{load, Backbone, Bert};
use adapters_testkit::max_diff;
use candle_core::{Device, Tensor};
use std::path::PathBuf;

fn bert_with_members() -> Bert {
    let _ = adapters_bottleneck::family();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut bert = match load(&root.join("models/all-MiniLM-L6-v2"), &Device::Cpu).unwrap().backbone {
        Backbone::Bert(b) => b,
        _ => unreachable!(),
    };
    for member in ["sentiment", "topic"] {
        let dir = root.join("fixtures/interop/adapterhub_fusion_minilm/adapters").join(member);
        let loaded = io::load(&dir, &bert, &Device::Cpu).unwrap();
        bert.adapters_mut().add(member, loaded.adapter).unwrap();
    }
    bert
}

/// Two sentences of six tokens (no padding), and the hidden states under `setup`.
fn forward(bert: &mut Bert, setup: &str) -> Tensor {
    bert.adapters_mut().set_setup(Some(setup.parse::<Setup>().unwrap())).unwrap();
    let ids = Tensor::new(&[[101u32, 1996, 3185, 2001, 1037, 102], [101, 15768, 3062, 9249, 2044, 102]], &Device::Cpu).unwrap();
    bert.forward(&ids, None, None, &ForwardCtx::inference()).unwrap()
}

#[test]
fn parallel_gives_every_childs_output_from_one_pass() {
    let mut bert = bert_with_members();
    let both = forward(&mut bert, "parallel(sentiment, topic)");
    assert_eq!(both.dims(), [4, 6, 384], "one copy of the 2-row batch per child");
    let sentiment = forward(&mut bert, "sentiment");
    let topic = forward(&mut bert, "topic");
    assert!(max_diff(&both.narrow(0, 0, 2).unwrap(), &sentiment) < 1e-5);
    assert!(max_diff(&both.narrow(0, 2, 2).unwrap(), &topic) < 1e-5);
    assert!(max_diff(&sentiment, &topic) > 1e-3, "the two adapters differ");
}

#[test]
fn batch_split_gives_each_row_its_childs_output() {
    let mut bert = bert_with_members();
    let split = forward(&mut bert, "batch_split(sentiment, topic; sizes=1, 1)");
    let sentiment = forward(&mut bert, "sentiment");
    let topic = forward(&mut bert, "topic");
    assert!(max_diff(&split.narrow(0, 0, 1).unwrap(), &sentiment.narrow(0, 0, 1).unwrap()) < 1e-5);
    assert!(max_diff(&split.narrow(0, 1, 1).unwrap(), &topic.narrow(0, 1, 1).unwrap()) < 1e-5);
    // Sizes that do not add up to the batch are an error naming both.
    bert.adapters_mut().set_setup(Some("batch_split(sentiment, topic; sizes=1, 2)".parse().unwrap())).unwrap();
    let ids = Tensor::new(&[[101u32, 102], [101, 102]], &Device::Cpu).unwrap();
    let e = bert.forward(&ids, None, None, &ForwardCtx::inference()).unwrap_err().to_string();
    assert!(e.contains("add up to 3, but the batch has 2"), "{e}");
}

#[test]
fn split_over_positions_and_stack_and_average_compose_as_defined() {
    let mut bert = bert_with_members();
    let sentiment = forward(&mut bert, "sentiment");
    let split_same = forward(&mut bert, "split(sentiment, sentiment; splits=2, 4)");
    assert!(max_diff(&split_same, &sentiment) < 1e-5, "split over one adapter twice is that adapter");
    let split = forward(&mut bert, "split(sentiment, topic; splits=2, 4)");
    assert!(max_diff(&split, &sentiment) > 1e-4, "the later positions see the other adapter");
    // average over one child with weight 1 is that child (Σ wᵢ·outᵢ / n).
    let single = forward(&mut bert, "average(sentiment; weights=1)");
    assert!(max_diff(&single, &sentiment) < 1e-5);
}

/// LoRA (a projection adapter) cannot be a fusion member; stacked over a fusion it can.
#[test]
fn lora_stacks_with_a_fusion_but_is_not_fused() {
    let _ = (adapters_lora::family(), adapters_fusion::family());
    let mut bert = bert_with_members();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let lora = io::load(&root.join("fixtures/interop/peft_lora_minilm/adapter"), &bert, &Device::Cpu).unwrap();
    bert.adapters_mut().add("lora", lora.adapter).unwrap();
    let fusion = io::load(&root.join("fixtures/interop/adapterhub_fusion_minilm/fusion"), &bert, &Device::Cpu).unwrap();
    bert.adapters_mut().add("sentiment,topic", fusion.adapter).unwrap();
    // AdapterHub names fusions with commas, which expressions cannot spell: build the tree.
    let tree = Setup::Fuse {
        children: vec![Setup::Adapter { name: "sentiment".into() }, Setup::Adapter { name: "lora".into() }],
        fusion: Some("sentiment,topic".into()),
    };
    let e = bert.adapters_mut().set_setup(Some(tree)).unwrap_err().to_string();
    assert!(e.contains("`lora` sits on projections") && e.contains("stack projection adapters"), "{e}");
    let fused = forward(&mut bert, "fuse(sentiment, topic)");
    let stacked = forward(&mut bert, "stack(lora, fuse(sentiment, topic))");
    assert!(max_diff(&fused, &stacked) > 1e-4, "the LoRA under the fusion changes the output");
}

#[test]
fn a_refused_setup_keeps_the_active_one() {
    let mut bert = bert_with_members();
    let before = forward(&mut bert, "stack(sentiment, topic)");
    let e = bert.adapters_mut().set_setup(Some("stack(sentiment, missing)".parse().unwrap())).unwrap_err().to_string();
    assert!(e.contains("no adapter named `missing`"), "{e}");
    let e = bert.adapters_mut().set_setup(Some("fuse(sentiment, topic)".parse().unwrap())).unwrap_err().to_string();
    assert!(e.contains("no fusion layer over [sentiment, topic]") && e.contains("attached fusion layers: none"), "{e}");
    assert_eq!(bert.adapters().setup().unwrap().to_string(), "stack(sentiment, topic)");
    let ids = Tensor::new(&[[101u32, 1996, 3185, 2001, 1037, 102], [101, 15768, 3062, 9249, 2044, 102]], &Device::Cpu).unwrap();
    let after = bert.forward(&ids, None, None, &ForwardCtx::inference()).unwrap();
    assert_eq!(max_diff(&before, &after), 0.0);
}
