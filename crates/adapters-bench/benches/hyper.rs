//! A hypernetwork against per-task adapters on a batch mixing four tasks, timed interleaved
//! (see `adapters_bench`): MiniLM forward at batch 32 x seq 128, rows of 4 tasks (8 each).
//!
//! - forward: baseline the bare model; 4 per-task Pfeiffer adapters (r = 24), each row
//!   through its task's (the batched per-row path of mixed-adapter batches); the
//!   hypernetwork generating each task's Pfeiffer adapter (r = 24) from the rows' task ids.
//! - generation: baseline the hypernetwork's forward; generating the weights of a forward
//!   alone (4 tasks x 6 layers), so its ratio is the share of the forward spent generating.

use adapters_bench::{interleave, to_json, write_result};
use adapters_core::{registry, ForwardCtx, InsertionPoint, Placement, Point, Site};
use adapters_hyper::HyperNet;
use adapters_models::HoldsAdapters;
use adapters_models::{fetched, load, Backbone, Bert};
use candle_core::{Device, Tensor};
use serde_json::json;

const ROWS: usize = 32;
const TASKS: [&str; 4] = ["sms_spam", "trec_coarse", "rotten_tomatoes", "vader_tweets"];

fn ids(batch: usize, seq: usize, vocab: u32) -> Tensor {
    let v: Vec<u32> = (0..batch * seq).map(|i| 1000 + (i as u32 * 7919) % (vocab - 1000)).collect();
    Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
}

fn randomise(a: &dyn adapters_core::Adapter) {
    for (_, v) in a.vars() {
        v.set(&(v.as_tensor() + Tensor::randn(0f32, 0.02, v.shape(), &Device::Cpu).unwrap()).unwrap()).unwrap();
    }
}

fn bert(m: Backbone) -> Bert {
    let Backbone::Bert(b) = m else { unreachable!("MiniLM is a BERT") };
    b
}

fn main() {
    adapters_kernels::tune_cpu_runtime();
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = (adapters_bottleneck::family(), adapters_hyper::family());
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let dev = Device::Cpu;
    let input = ids(ROWS, 128, 30522);
    let task_of_row: Vec<u32> = (0..ROWS as u32).map(|r| r % TASKS.len() as u32).collect();

    let bare = bert(load(&fetched("all-MiniLM-L6-v2").unwrap(), &dev).unwrap().backbone);
    let mut per_task = load(&fetched("all-MiniLM-L6-v2").unwrap(), &dev).unwrap().backbone;
    for t in TASKS {
        let a = registry::build("seq_bn", &json!({}), &Placement::default(), &per_task.model_info(), &dev, 1).unwrap();
        randomise(a.as_ref());
        per_task.adapters_mut().add(t, a).unwrap();
    }
    let per_task = bert(per_task);
    let choices: Vec<Vec<String>> = task_of_row.iter().map(|&t| vec![TASKS[t as usize].to_string()]).collect();
    let per_row = ForwardCtx::inference().with_row_choices(&choices, &dev).unwrap();

    let mut with_hyper = load(&fetched("all-MiniLM-L6-v2").unwrap(), &dev).unwrap().backbone;
    let config = json!({"tasks": TASKS});
    let info = with_hyper.model_info();
    let build = || {
        let args = adapters_core::BuildArgs { config: &config, placement: &Placement::default(), model: &info, device: &dev, seed: 1 };
        HyperNet::build(&args).unwrap()
    };
    let hyper = build();
    randomise(&hyper);
    let generator = build();
    with_hyper.adapters_mut().add("hyper", Box::new(hyper)).unwrap();
    with_hyper.adapters_mut().activate(&["hyper"]).unwrap();
    let with_hyper = bert(with_hyper);
    let by_task = ForwardCtx::inference().with_task_ids(Tensor::new(task_of_row.as_slice(), &dev).unwrap());

    let bare_forward = || {
        bare.forward(&input, None, None, &ForwardCtx::inference()).unwrap();
    };
    let per_task_forward = || {
        per_task.forward(&input, None, None, &per_row).unwrap();
    };
    let hyper_forward = || {
        with_hyper.forward(&input, None, None, &by_task).unwrap();
    };
    let forward = interleave(
        &[
            ("bare model", &bare_forward),
            ("4 per-task Pfeiffer adapters (r = 24), each row through its task's", &per_task_forward),
            ("hypernetwork, each row's adapter generated from its task", &hyper_forward),
        ],
        rounds,
    );
    let incremental = |i: usize| forward[i].median_ratio - 1.0;
    let mut result = to_json("Hypernetwork vs per-task adapters, 4 tasks in one batch, MiniLM forward, 32 x 128", &forward, rounds);
    result["notes"] = json!([format!(
        "Incremental cost over the bare forward (median pair ratio - 1): per-task adapters {:.4}, hypernetwork {:.4}.",
        incremental(1),
        incremental(2)
    )]);
    write_result("hyper_forward.json", &result);

    // The weights of one forward: 4 tasks' embeddings through the generator at 6 layers.
    let tasks = generator.task_vector(&[(TASKS[0].into(), 1.0)]).unwrap();
    let four = Tensor::stack(&[&tasks, &tasks, &tasks, &tasks], 0).unwrap();
    let generate = || {
        for layer in 0..6 {
            generator.generate(Point::new(layer, Site::FfnOutput), &four).unwrap();
        }
    };
    let generation = interleave(
        &[("hypernetwork forward (4 tasks, 32 x 128)", &hyper_forward), ("generating its weights alone (4 tasks x 6 layers)", &generate)],
        rounds * 3,
    );
    write_result(
        "hyper_generation.json",
        &to_json("Generating adapter weights, share of the hypernetwork's forward", &generation, rounds * 3),
    );
}
