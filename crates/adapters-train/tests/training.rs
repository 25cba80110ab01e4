//! The trainer on the real models and datasets (`cargo xtask fetch`), in short runs.

use adapters_core::InsertionPoint;
use adapters_models::HoldsAdapters;
use adapters_train::{Config, RunOptions, Trainer};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A scratch folder for one test, removed when the test ends, passed or failed (a full
/// fine-tuning run writes a 350 MB model into it).
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("adapters-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// The first `n` lines of a fetched data file, as a new file in `dir`.
fn head_of(dataset: &str, split: &str, n: usize, dir: &Path) -> PathBuf {
    let src = root().join("data").join(dataset).join(split);
    let text = std::fs::read_to_string(&src).unwrap_or_else(|_| panic!("{} missing: run `cargo xtask fetch`", src.display()));
    let sep = if split.ends_with(".txt") { "\n\n" } else { "\n" };
    let body: Vec<&str> = text.split(sep).take(n).collect();
    let out = dir.join(format!("{dataset}-{split}"));
    std::fs::write(&out, body.join(sep) + sep).unwrap();
    out
}

fn minilm() -> String {
    adapters_models::fetched("all-MiniLM-L6-v2").unwrap().display().to_string()
}

fn config(body: &str, out: &Path) -> Config {
    adapters_testkit::register_all();
    Config::parse(&format!("{body}\n[output]\ndir = {:?}\n", out.display().to_string()), &[]).unwrap()
}

fn sms_config(dir: &Path, adapters: &str, training: &str) -> String {
    let (train, dev) = (head_of("sms_spam", "train.jsonl", 48, dir), head_of("sms_spam", "dev.jsonl", 16, dir));
    format!(
        "[model]\npath = {:?}\nmax_length = 32\n{adapters}\n[[task]]\nname = \"sms\"\ntype = \"classification\"\ntrain = {:?}\ndev = {:?}\ntest = {:?}\n[training]\nbatch_size = 8\n{training}\n",
        minilm(),
        train.display().to_string(),
        dev.display().to_string(),
        dev.display().to_string()
    )
}

/// Every trainable variable's values, by name.
fn trainable_values(t: &Trainer) -> HashMap<String, Vec<f32>> {
    values(t.trainable().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect())
}

/// The run `body` into `out`, stopped after `stop` steps and resumed to its end.
fn stopped_and_resumed(body: &str, out: &Path, stop: usize) -> Trainer {
    Trainer::new(config(body, out), &Device::Cpu).unwrap().run(&RunOptions { stop_after: Some(stop), ..Default::default() }).unwrap();
    let mut resumed = Trainer::new(config(body, out), &Device::Cpu).unwrap();
    resumed.run(&RunOptions { resume: true, ..Default::default() }).unwrap();
    resumed
}

fn values(pairs: Vec<(String, Tensor)>) -> HashMap<String, Vec<f32>> {
    pairs.into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

/// Adapters mode: after training, every base weight is bit-identical and every adapter
/// and head variable has changed.
#[test]
fn the_base_stays_frozen_and_everything_trainable_changes() {
    let dir = scratch("frozen");
    let adapters = "[adapters.pf]\nkind = \"seq_bn\"\nreduction_factor = 16\ninit_weights = \"bert\"\n[adapters.lo]\nkind = \"lora\"\nr = 4\nplacement = { sites = [\"query\", \"value\"] }\n";
    let c = config(&sms_config(&dir, adapters, "steps = 3\nlr = 1e-2\nwarmup_ratio = 0.0"), &dir.join("out"));
    let mut trainer = Trainer::new(c, &Device::Cpu).unwrap();
    let base_before = values(trainer.model().backbone.named_weights());
    let trainable_before = trainable_values(&trainer);
    let summary = trainer.run(&RunOptions::default()).unwrap();
    assert!(summary.finished && summary.steps == 3);
    let base_after = values(trainer.model().backbone.named_weights());
    assert_eq!(base_before.len(), base_after.len());
    for (name, before) in &base_before {
        assert!(before == &base_after[name], "base weight {name} changed");
    }
    let trainable_after = trainable_values(&trainer);
    assert!(trainable_before.keys().any(|k| k.starts_with("adapter.pf.")) && trainable_before.keys().any(|k| k.starts_with("adapter.lo.")));
    for (name, before) in &trainable_before {
        assert!(before != &trainable_after[name], "trainable variable {name} did not change");
    }
    // The reports exist: metrics log, plot, summary, adapters with the head in the top one.
    let out = dir.join("out");
    for f in ["metrics.jsonl", "curves.svg", "summary.json", "adapters/pf/adapter_config.json", "adapters/pf/heads/sms/head.safetensors"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    assert!(std::fs::read_to_string(out.join("curves.svg")).unwrap().contains("<svg"));
}

/// Training 6 steps straight equals training 3, stopping, and resuming for 3 more, with
/// dropout on (seeded per step), bit for bit.
#[test]
fn resuming_from_a_checkpoint_gives_the_same_result() {
    let dir = scratch("resume");
    let adapters = "[adapters.pf]\nkind = \"seq_bn\"\nreduction_factor = 16\ndropout = 0.1\n";
    let body = sms_config(&dir, adapters, "steps = 6\neval_every = 2\ncheckpoint_every = 2");
    let mut straight = Trainer::new(config(&body, &dir.join("a")), &Device::Cpu).unwrap();
    straight.run(&RunOptions::default()).unwrap();
    let mut first = Trainer::new(config(&body, &dir.join("b")), &Device::Cpu).unwrap();
    let s = first.run(&RunOptions { stop_after: Some(3), ..Default::default() }).unwrap();
    assert!(!s.finished && s.steps == 3);
    drop(first);
    // A fresh run into the same folder must not overwrite the checkpoint.
    let e = Trainer::new(config(&body, &dir.join("b")), &Device::Cpu).unwrap().run(&RunOptions::default()).unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
    let mut resumed = Trainer::new(config(&body, &dir.join("b")), &Device::Cpu).unwrap();
    let s = resumed.run(&RunOptions { resume: true, ..Default::default() }).unwrap();
    assert!(s.finished && s.steps == 6);
    assert_eq!(trainable_values(&straight), trainable_values(&resumed));
    // The log of the resumed run has each step once.
    let steps: Vec<u64> = adapters_train::metrics::MetricsLog::read(&dir.join("b/metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|r| r.get("split").is_none())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    // A different config refuses to resume this checkpoint.
    let other = sms_config(&dir, adapters, "steps = 7\neval_every = 2\ncheckpoint_every = 2");
    let mut t = Trainer::new(config(&other, &dir.join("b")), &Device::Cpu).unwrap();
    let _ = std::fs::remove_file(dir.join("b/summary.json"));
    assert!(t.run(&RunOptions { resume: true, ..Default::default() }).unwrap_err().to_string().contains("different config"));
}

/// `gradient_checkpointing = true` trains the same adapter, up to float rounding, with
/// dropout on in the adapter and before the head.
#[test]
fn gradient_checkpointing_trains_like_the_plain_step() {
    let dir = scratch("checkpointing");
    let adapters = "[adapters.pf]\nkind = \"seq_bn\"\nreduction_factor = 16\ndropout = 0.1\n";
    let run = |name: &str, training: &str| {
        let mut t = Trainer::new(config(&sms_config(&dir, adapters, training), &dir.join(name)), &Device::Cpu).unwrap();
        t.run(&RunOptions::default()).unwrap();
        let losses: Vec<f64> = adapters_train::metrics::MetricsLog::read(&dir.join(name).join("metrics.jsonl"))
            .unwrap()
            .iter()
            .filter(|r| r.get("split").is_none())
            .map(|r| r["loss"].as_f64().unwrap())
            .collect();
        (trainable_values(&t), losses)
    };
    let (plain, plain_losses) = run("plain", "steps = 4");
    let (checkpointed, losses) = run("checkpointed", "steps = 4\ngradient_checkpointing = true");
    assert_eq!(losses.len(), 4);
    for (a, b) in plain_losses.iter().zip(&losses) {
        assert!((a - b).abs() < 1e-5 * a.abs(), "step losses differ: plain {plain_losses:?}, checkpointed {losses:?}");
    }
    for (name, p) in &plain {
        let c = &checkpointed[name];
        let d = p.iter().zip(c).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(d < 1e-5, "{name} differs by {d}");
    }
}

/// Staged training freezes what the stage leaves out; multi-task sampling visits both
/// tasks, each with its own head and adapter.
#[test]
fn stages_freeze_groups_and_multi_task_visits_every_task() {
    let dir = scratch("stages");
    let (sms, trec) = (head_of("sms_spam", "train.jsonl", 40, &dir), head_of("trec_coarse", "train.jsonl", 40, &dir));
    let body = format!(
        "[model]\npath = {:?}\nmax_length = 32\n[adapters.a]\nkind = \"seq_bn\"\nreduction_factor = 32\ninit_weights = \"bert\"\n[adapters.b]\nkind = \"seq_bn\"\nreduction_factor = 32\ninit_weights = \"bert\"\n\
         [[task]]\nname = \"sms\"\ntype = \"classification\"\ntrain = {:?}\nadapters = [\"a\"]\n[[task]]\nname = \"trec\"\ntype = \"classification\"\ntrain = {:?}\nadapters = [\"b\"]\n\
         [training]\nbatch_size = 8\nsteps = 4\nsampling = \"uniform\"\n[[stage]]\nsteps = 2\ntrain = [\"heads\"]\n[[stage]]\ntrain = [\"adapter:a\", \"head:sms\"]\n",
        minilm(),
        sms.display().to_string(),
        trec.display().to_string()
    );
    let c = config(&body, &dir.join("out"));
    let mut trainer = Trainer::new(c.clone(), &Device::Cpu).unwrap();
    let before = trainable_values(&trainer);
    let mut half = Trainer::new(config(&body, &dir.join("half")), &Device::Cpu).unwrap();
    half.run(&RunOptions { stop_after: Some(2), ..Default::default() }).unwrap();
    let mid = trainable_values(&half);
    for (name, v) in &before {
        if name.starts_with("adapter.") {
            assert_eq!(v, &mid[name], "{name} trained in the heads-only stage");
        }
    }
    trainer.run(&RunOptions::default()).unwrap();
    let after = trainable_values(&trainer);
    assert!(before.iter().any(|(n, v)| n.starts_with("adapter.a.") && v != &after[n]), "adapter a never trained");
    for (name, v) in &before {
        if name.starts_with("adapter.b.") {
            assert_eq!(v, &after[name], "{name} trained although no stage trains adapter b");
        }
    }
    let tasks: std::collections::BTreeSet<String> = adapters_train::metrics::MetricsLog::read(&dir.join("out/metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| r["task"].as_str().map(str::to_string))
        .collect();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    assert!(dir.join("out/adapters/a/heads/sms").exists() && dir.join("out/adapters/b/heads/trec").exists());
}

/// Causal LM on SmolLM2 with a bottleneck adapter learns: overfitting four training blocks,
/// their perplexity falls well below where it started, and the report is exp(loss).
#[test]
fn causal_lm_adapter_overfits_a_few_sequences() {
    let dir = scratch("lm");
    let train = head_of("movie_dialog", "train.txt", 40, &dir);
    let gguf = adapters_models::fetched("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap();
    let body = format!(
        "[model]\npath = {:?}\nmax_length = 32\n[adapters.d]\nkind = \"seq_bn\"\nreduction_factor = 16\n\
         [[task]]\nname = \"dialog\"\ntype = \"causal_lm\"\ntrain = {:?}\ndev = {:?}\ntest = {:?}\neval_limit = 4\n\
         [training]\nbatch_size = 4\nsteps = 12\nlr = 2e-3\nwarmup_ratio = 0.0\nschedule = \"constant\"\ngroup_by_length = false\n",
        gguf.display().to_string(),
        train.display().to_string(),
        train.display().to_string(),
        train.display().to_string()
    );
    let mut trainer = Trainer::new(config(&body, &dir.join("out")), &Device::Cpu).unwrap();
    let s = trainer.run(&RunOptions::default()).unwrap();
    let t = &s.tasks["dialog"];
    let (before, after) = (t.dev_at_start["perplexity"], t.dev["perplexity"]);
    assert!(before.is_finite() && before > 1.0, "{before}");
    assert!(after < 0.7 * before, "perplexity on the training blocks went from {before:.2} to {after:.2}");
    assert!((t.dev["loss"].exp() - after).abs() < 1e-6 * after);
}

/// The chat template's rendering marks exactly each assistant message and its end-of-turn
/// marker (what the model must produce after the generation prompt).
#[test]
fn chat_tokens_mark_exactly_the_assistant_turns() {
    let gguf = adapters_models::fetched("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap();
    let tokenizer = adapters_models::load(&gguf, &Device::Cpu).unwrap().tokenizer;
    let m = |role: &str, content: &str| adapters_models::Message { role: role.into(), content: content.into() };
    let chat = [m("user", "hi there"), m("assistant", "hello."), m("user", "how are you?"), m("assistant", "fine, thanks.")];
    let (ids, mask) = adapters_train::chat_tokens(&tokenizer, &chat).unwrap();
    assert_eq!(ids.len(), mask.len());
    // The marked runs, decoded.
    let mut runs: Vec<Vec<u32>> = Vec::new();
    for (i, (&id, &marked)) in ids.iter().zip(&mask).enumerate() {
        if marked == 1 {
            if i == 0 || mask[i - 1] == 0 {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(id);
        }
    }
    let texts: Vec<String> = runs.iter().map(|r| tokenizer.decode(r, false).unwrap()).collect();
    assert_eq!(texts, ["hello.<|im_end|>\n", "fine, thanks.<|im_end|>\n"]);
}

/// A chat adapter learns the assistant's turns: its loss is the mean next-token
/// cross-entropy over the assistant tokens alone (checked before training against the
/// base model's own logits: the adapter starts as the identity), and overfitting a few
/// conversations drives that perplexity down. Bad rows are refused naming file and line.
#[test]
fn chat_adapter_learns_only_the_assistant_turns() {
    let dir = scratch("chat");
    let train = head_of("movie_chat", "train.jsonl", 24, &dir);
    let gguf = adapters_models::fetched("SmolLM2-135M-Instruct.Q4_1.gguf").unwrap();
    let body = |train: &Path| {
        format!(
            "[model]\npath = {:?}\nmax_length = 96\n[adapters.d]\nkind = \"seq_bn\"\nreduction_factor = 16\ninit_weights = \"mam_adapter\"\n\
             [[task]]\nname = \"chat\"\ntype = \"chat\"\ntrain = {:?}\ndev = {:?}\neval_limit = 4\n\
             [training]\nbatch_size = 4\nsteps = 12\nlr = 3e-3\nwarmup_ratio = 0.0\nschedule = \"constant\"\n",
            gguf.display().to_string(),
            train.display().to_string(),
            train.display().to_string()
        )
    };
    let mut trainer = Trainer::new(config(&body(&train), &dir.join("out")), &Device::Cpu).unwrap();
    let s = trainer.run(&RunOptions::default()).unwrap();
    let t = &s.tasks["chat"];
    let (before, after) = (t.dev_at_start["perplexity"], t.dev["perplexity"]);
    assert!(after < 0.7 * before, "assistant-token perplexity on the training chats went from {before:.2} to {after:.2}");

    // The starting loss by hand: the base model's logits at the positions before each
    // assistant token of the first four conversations.
    let loaded = adapters_models::load(&gguf, &Device::Cpu).unwrap();
    let adapters_models::Backbone::Llama(base) = &loaded.backbone else { unreachable!() };
    let (mut nll, mut count) = (0.0f64, 0usize);
    for line in std::fs::read_to_string(&train).unwrap().lines().take(4) {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let chat: Vec<adapters_models::Message> = serde_json::from_value(row["messages"].clone()).unwrap();
        let (mut ids, mut mask) = adapters_train::chat_tokens(&loaded.tokenizer, &chat).unwrap();
        ids.truncate(96);
        mask.truncate(96);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let hidden = base.forward_hidden(&input, None, &adapters_core::ForwardCtx::inference()).unwrap();
        let logp = candle_nn::ops::log_softmax(&base.logits(&hidden).unwrap().squeeze(0).unwrap(), 1).unwrap().to_vec2::<f32>().unwrap();
        for p in 0..ids.len() - 1 {
            if mask[p + 1] == 1 {
                nll -= logp[p][ids[p + 1] as usize] as f64;
                count += 1;
            }
        }
    }
    let by_hand = nll / count as f64;
    assert!((t.dev_at_start["loss"] - by_hand).abs() < 1e-3, "trainer {} vs by hand {by_hand}", t.dev_at_start["loss"]);

    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n").unwrap();
    let e = Trainer::new(config(&body(&bad), &dir.join("bad-out")), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("bad.jsonl:2") && e.contains("no assistant message"), "{e}");
}

/// Full fine-tuning changes base weights; the head-only mode trains only the head.
#[test]
fn full_and_head_only_modes_train_what_they_say() {
    let dir = scratch("modes");
    let body = sms_config(&dir, "", "steps = 2\nlr = 1e-3\nwarmup_ratio = 0.0\nmode = \"full\"");
    let mut full = Trainer::new(config(&body, &dir.join("full")), &Device::Cpu).unwrap();
    let base = adapters_models::load(Path::new(&minilm()), &Device::Cpu).unwrap();
    let before = values(base.backbone.named_weights());
    full.run(&RunOptions::default()).unwrap();
    let after = values(full.model().backbone.named_weights());
    // Every weight that takes part in the forward pass: not the pooler (mean pooling
    // never reads it; it is saved unchanged), and the unused token-type rows aside.
    let used: Vec<_> = before.iter().filter(|(n, _)| !n.starts_with("pooler.")).collect();
    assert_eq!(before.len() - used.len(), 2, "the pooler's weight and bias");
    let changed = used.iter().filter(|(n, v)| *v != &after[*n]).count();
    assert!(changed >= used.len() - 1, "{changed} of {} base weights changed", used.len());
    assert!(before.iter().filter(|(n, _)| n.starts_with("pooler.")).all(|(n, v)| v == &after[n]));
    assert!(dir.join("full/model/model.safetensors").exists() && dir.join("full/model/heads/sms/head_config.json").exists());
    let body = sms_config(&dir, "", "steps = 2\nmode = \"head_only\"");
    let mut head = Trainer::new(config(&body, &dir.join("head")), &Device::Cpu).unwrap();
    assert_eq!(head.trainable().len(), 2);
    head.run(&RunOptions::default()).unwrap();
    assert!(dir.join("head/heads/sms/head.safetensors").exists());
}

/// Every config in examples/ parses, and its data files are the fetched ones.
#[test]
fn every_example_config_parses() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let c = Config::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            for t in &c.task {
                for f in [Some(&t.train), t.dev.as_ref(), t.test.as_ref()].into_iter().flatten() {
                    assert!(root().join(f).exists(), "{}: {} missing", path.display(), f.display());
                }
            }
            seen += 1;
        }
    }
    assert!(seen >= 8, "{seen} example configs");
}

/// Records what the forward context carries to the sites: every row's task id and the
/// attention mask, narrowed alike.
mod context_probe {
    use adapters_core::{Adapter, AdapterKind, BuildArgs, ForwardCtx, Point, Site, SublayerIo};
    use candle_core::{Result, Tensor, Var};
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    pub static SEEN_TASKS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

    struct Probe(Vec<Point>);

    impl Adapter for Probe {
        fn kind(&self) -> &str {
            "test_context_probe"
        }
        fn config(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn points(&self) -> Vec<Point> {
            self.0.clone()
        }
        fn vars(&self) -> Vec<(String, Var)> {
            vec![]
        }
        fn forward_hidden(&self, _: Point, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
            let rows = io.output.dim(0)?;
            let ids = ctx.task_ids.as_ref().expect("the trainer sets task ids for every batch");
            let mask = ctx.attention_mask.as_ref().expect("the backbone hands the mask to its sites");
            assert_eq!((ids.dim(0)?, mask.dims2()?), (rows, (rows, io.output.dim(1)?)));
            SEEN_TASKS.lock().unwrap().extend(ids.to_vec1::<u32>()?);
            Ok(io.output.clone())
        }
    }

    fn build(args: &BuildArgs) -> std::result::Result<Box<dyn Adapter>, adapters_core::Error> {
        let points = args.placement.expand(args.model, &[Site::FfnOutput], |s| s.is_hidden())?;
        Ok(Box::new(Probe(points.into_iter().map(|p| p.point).collect())))
    }

    adapters_core::inventory::submit! {
        AdapterKind { name: "test_context_probe", family: "train-tests", summary: "records the forward context (test only)", fields: &[], build }
    }
}

/// Mixed-task batches: every step trains both tasks (different adapters and heads, one
/// forward with rows routed per task), and every row reaches the sites with its task id.
#[test]
fn mixed_task_batches_train_every_task_in_every_step() {
    let dir = scratch("mixed");
    let (sms, trec) = (head_of("sms_spam", "train.jsonl", 40, &dir), head_of("trec_coarse", "train.jsonl", 40, &dir));
    let body = format!(
        "[model]\npath = {:?}\nmax_length = 32\n[adapters.a]\nkind = \"seq_bn\"\nreduction_factor = 32\ninit_weights = \"bert\"\n\
         [adapters.b]\nkind = \"lora\"\nr = 2\n[adapters.probe]\nkind = \"test_context_probe\"\nplacement = {{ layers = [0] }}\n\
         [[task]]\nname = \"sms\"\ntype = \"classification\"\ntrain = {:?}\nadapters = [\"a\", \"probe\"]\n\
         [[task]]\nname = \"trec\"\ntype = \"classification\"\ntrain = {:?}\nadapters = [\"b\", \"probe\"]\n\
         [training]\nbatch_size = 8\nsteps = 1\nlr = 1e-2\nwarmup_ratio = 0.0\nmixed_task_batches = true\n",
        minilm(),
        sms.display().to_string(),
        trec.display().to_string()
    );
    let mut trainer = Trainer::new(config(&body, &dir.join("out")), &Device::Cpu).unwrap();
    let before = trainable_values(&trainer);
    context_probe::SEEN_TASKS.lock().unwrap().clear();
    trainer.run(&RunOptions::default()).unwrap();
    let after = trainable_values(&trainer);
    for prefix in ["adapter.a.", "adapter.b.", "head.sms.", "head.trec."] {
        assert!(before.iter().any(|(n, v)| n.starts_with(prefix) && v != &after[n]), "{prefix} did not train in the one step");
    }
    assert_eq!(*context_probe::SEEN_TASKS.lock().unwrap(), [0u32, 1].into_iter().collect());
    let log = adapters_train::metrics::MetricsLog::read(&dir.join("out/metrics.jsonl")).unwrap();
    assert!(log.iter().any(|r| r["task"] == "mixed"));
}

/// Two-stage AdapterFusion: stage one trains two Pfeiffer adapters on two datasets; stage
/// two loads their folders frozen (`from`), fuses them for a third task and trains only the
/// fusion layer and the head. The members' weights do not move, the fusion's do, the value
/// regularisation enters the loss, and the outputs hold the fusion folder with the head and
/// `adapter_setup.json`. Bad stage-two configs name the key.
#[test]
fn two_stage_fusion_trains_only_the_fusion_and_the_head() {
    let dir = scratch("fusion");
    let stage1 = dir.join("stage1");
    for (name, dataset) in [("spam", "sms_spam"), ("trec", "trec_coarse")] {
        let (train, dev) = (head_of(dataset, "train.jsonl", 32, &dir), head_of(dataset, "dev.jsonl", 8, &dir));
        let body = format!(
            "[model]\npath = {:?}\nmax_length = 32\n[adapters.{name}]\nkind = \"seq_bn\"\nreduction_factor = 32\n[[task]]\nname = \"{name}\"\ntype = \"classification\"\ntrain = {:?}\ndev = {:?}\n[training]\nbatch_size = 8\nsteps = 2\n",
            minilm(),
            train.display().to_string(),
            dev.display().to_string()
        );
        Trainer::new(config(&body, &stage1.join(name)), &Device::Cpu).unwrap().run(&RunOptions::default()).unwrap();
    }
    let member = |name: &str| stage1.join(name).join("adapters").join(name);
    let adapters = format!(
        "[adapters.spam]\nfrom = {:?}\n[adapters.trec]\nfrom = {:?}\n[adapters.fused]\nkind = \"fusion\"\nmembers = [\"spam\", \"trec\"]\n",
        member("spam").display().to_string(),
        member("trec").display().to_string()
    );
    let body = sms_config(&dir, &adapters, "steps = 3\nlr = 1e-2\nwarmup_ratio = 0.0")
        .replace("[[task]]\nname = \"sms\"\n", "[[task]]\nname = \"sms\"\nsetup = \"fuse(spam, trec; fusion=fused)\"\n");
    let out = dir.join("stage2");
    let mut trainer = Trainer::new(config(&body, &out), &Device::Cpu).unwrap();
    let trainable: Vec<String> = trainer.trainable().into_iter().map(|(n, _)| n).collect();
    assert!(trainable.iter().all(|n| n.starts_with("adapter.fused.") || n.starts_with("head.")), "{trainable:?}");
    let members_before = values(
        ["spam", "trec"]
            .iter()
            .flat_map(|m| trainer.model().backbone.adapters().get(m).unwrap().vars())
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect(),
    );
    let fusion_before = trainable_values(&trainer);
    trainer.run(&RunOptions::default()).unwrap();
    let members_after = values(
        ["spam", "trec"]
            .iter()
            .flat_map(|m| trainer.model().backbone.adapters().get(m).unwrap().vars())
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect(),
    );
    assert_eq!(members_before, members_after, "frozen members moved");
    let fusion_after = trainable_values(&trainer);
    let unchanged: Vec<&String> = fusion_before.iter().filter(|(n, v)| *v == &fusion_after[*n]).map(|(n, _)| n).collect();
    assert!(unchanged.is_empty(), "every fusion and head variable trains; unchanged: {unchanged:?}");
    for f in ["adapters/fused/adapter_config.json", "adapters/fused/adapter_setup.json", "adapters/fused/heads/sms/head.safetensors"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    assert!(!out.join("adapters/spam").exists(), "frozen members are not written again");
    // The fusion's attention on dev: per layer, over the two members, a distribution.
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("fusion_attention.json")).unwrap()).unwrap();
    let fusion = &report["fusions"][0];
    assert_eq!((fusion["fusion"].as_str(), fusion["task"].as_str()), (Some("fused"), Some("sms")));
    assert_eq!(fusion["members"], serde_json::json!(["spam", "trec"]));
    let points = fusion["points"].as_array().unwrap();
    assert_eq!(points.len(), 6, "one row per layer");
    for p in points {
        let w: Vec<f64> = p["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
        assert!(w.len() == 2 && (w.iter().sum::<f64>() - 1.0).abs() < 1e-4 && p["tokens"].as_u64().unwrap() > 8, "{p}");
    }
    assert!(std::fs::read_to_string(out.join("fusion_attention.svg")).unwrap().contains("<svg"));

    // The fusion's own learning rate reaches the optimizer: so small here that its
    // variables do not move, while the head (at `training.lr`) does.
    let slow = body.replace("members = [\"spam\", \"trec\"]\n", "members = [\"spam\", \"trec\"]\nlr = 1e-30\n");
    let mut trainer = Trainer::new(config(&slow, &dir.join("slow")), &Device::Cpu).unwrap();
    let before = trainable_values(&trainer);
    trainer.run(&RunOptions::default()).unwrap();
    let after = trainable_values(&trainer);
    let shift = |n: &String| before[n].iter().zip(&after[n]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let moved = |prefix: &str| before.keys().filter(|n| n.starts_with(prefix) && shift(n) > 1e-12).count();
    assert_eq!(moved("adapter.fused."), 0, "the fusion trained at training.lr");
    assert!(moved("head.") > 0, "the head did not train");

    // Errors name the key.
    let err = |body: String| Trainer::new(config(&body, &dir.join("bad")), &Device::Cpu).err().unwrap().to_string();
    let missing = body.replace(&member("trec").display().to_string(), "/nonexistent/trec");
    let e = err(missing);
    assert!(e.contains("`adapters.trec.from`") && e.contains("/nonexistent/trec"), "{e}");
    let lora = body.replace(
        &format!("[adapters.trec]\nfrom = {:?}\n", member("trec").display().to_string()),
        "[adapters.trec]\nkind = \"lora\"\nr = 4\n",
    );
    let e = err(lora);
    assert!(e.contains("`task.setup` of task `sms`") && e.contains("`trec` sits on projections"), "{e}");
}

/// One mixture of experts shared by two tasks, trained on mixed-task batches with a noisy
/// router: the metrics log has each step's balance losses and expert shares, the summary
/// each point's shares per task, `routing.svg` is drawn, and a resumed run ends with the
/// uninterrupted run's weights (the router noise is seeded).
#[test]
fn a_shared_mixture_logs_its_routing_and_resumes_exactly() {
    let dir = scratch("moe");
    let (sms, trec) = (head_of("sms_spam", "train.jsonl", 40, &dir), head_of("trec_coarse", "train.jsonl", 40, &dir));
    let (sms_dev, trec_dev) = (head_of("sms_spam", "dev.jsonl", 16, &dir), head_of("trec_coarse", "dev.jsonl", 16, &dir));
    let body = format!(
        "[model]\npath = {:?}\nmax_length = 32\n[adapters.moe]\nkind = \"moe_bn\"\nexperts = 4\nrouter = \"noisy\"\nz_loss = 0.001\n\
         placement = {{ layers = [4, 5] }}\n\
         [[task]]\nname = \"sms\"\ntype = \"classification\"\ntrain = {:?}\ndev = {:?}\nadapters = [\"moe\"]\n\
         [[task]]\nname = \"trec\"\ntype = \"classification\"\ntrain = {:?}\ndev = {:?}\nadapters = [\"moe\"]\n\
         [training]\nbatch_size = 8\nsteps = 4\neval_every = 2\ncheckpoint_every = 2\nlr = 1e-2\nmixed_task_batches = true\n",
        minilm(),
        sms.display().to_string(),
        sms_dev.display().to_string(),
        trec.display().to_string(),
        trec_dev.display().to_string()
    );
    let mut straight = Trainer::new(config(&body, &dir.join("a")), &Device::Cpu).unwrap();
    let summary = straight.run(&RunOptions::default()).unwrap();
    let resumed = stopped_and_resumed(&body, &dir.join("b"), 3);
    assert_eq!(trainable_values(&straight), trainable_values(&resumed));

    let steps: Vec<_> = adapters_train::metrics::MetricsLog::read(&dir.join("a/metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.get("split").is_none())
        .collect();
    assert_eq!(steps.len(), 4);
    for r in &steps {
        assert!(r["aux_losses"]["load_balance"].as_f64().unwrap() > 0.0);
        assert!(r["aux_losses"]["router_z"].as_f64().unwrap() > 0.0);
        let routing = r["routing"].as_object().unwrap();
        assert_eq!(routing.keys().collect::<Vec<_>>(), ["moe_bn layer 4 ffn_output", "moe_bn layer 5 ffn_output"]);
        for point in routing.values() {
            let share: f64 = point["share"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
            assert!((share - 1.0).abs() < 1e-9);
            assert!((0.0..=1.0).contains(&point["entropy"].as_f64().unwrap()));
        }
    }
    assert!(summary.aux_losses["load_balance"] > 0.0 && summary.aux_losses["router_z"] > 0.0);
    let routing = summary.routing.expect("routing in the summary");
    let point = &routing.points["moe_bn layer 5 ffn_output"];
    assert_eq!(point.per_task_share.as_ref().unwrap().keys().collect::<Vec<_>>(), ["sms", "trec"]);
    let mi = point.task_expert_mi_bits.unwrap();
    assert!(mi >= 0.0);
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("a/summary.json")).unwrap()).unwrap();
    let saved_mi = saved["routing"]["points"]["moe_bn layer 5 ffn_output"]["task_expert_mi_bits"].as_f64().unwrap();
    assert!((saved_mi - mi).abs() < 1e-12);
    assert!(std::fs::read_to_string(dir.join("a/routing.svg")).unwrap().contains("expert 3"));
}

#[test]
fn a_hypernetwork_learns_tasks_jointly_and_a_new_task_with_its_generator_frozen() {
    let dir = scratch("hyper");
    let (sms, trec) = (head_of("sms_spam", "train.jsonl", 40, &dir), head_of("trec_coarse", "train.jsonl", 40, &dir));
    let task = |name: &str, train: &std::path::Path| {
        format!("[[task]]\nname = {name:?}\ntype = \"classification\"\ntrain = {:?}\nadapters = [\"hyper\"]\n", train.display().to_string())
    };
    let training = "[training]\nbatch_size = 8\nsteps = 4\nlr = 1e-2\nmixed_task_batches = true\n";
    let body = format!(
        "[model]\npath = {:?}\nmax_length = 32\n[adapters.hyper]\nkind = \"hyper_bn\"\n{}{}{training}",
        minilm(),
        task("sms", &sms),
        task("trec", &trec)
    );
    let mut trainer = Trainer::new(config(&body, &dir.join("joint")), &Device::Cpu).unwrap();
    let before = trainable_values(&trainer);
    trainer.run(&RunOptions::default()).unwrap();
    let after = trainable_values(&trainer);
    assert_ne!(before, after);
    // The trainer filled in the task names, in [[task]] order.
    let saved = dir.join("joint/adapters/hyper");
    let config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config_json["config"]["tasks"], serde_json::json!(["sms", "trec"]));

    // Names in another order are refused: task ids are positions in the run's list.
    let swapped = body.replace("kind = \"hyper_bn\"\n", "kind = \"hyper_bn\"\ntasks = [\"trec\", \"sms\"]\n");
    let err = Trainer::new(config(&swapped, &dir.join("swapped")), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("[[task]] order") && err.contains("adapters.hyper"), "{err}");

    // A new task on the frozen generator: its embedding (64 numbers) and its head train.
    let new_task = format!(
        "[model]\npath = {:?}\nmax_length = 32\n[adapters.hyper]\nkind = \"hyper_bn\"\ngenerator_from = {:?}\ntrain = \"task_embeddings\"\n{}{training}",
        minilm(),
        saved.display().to_string(),
        task("trec_again", &trec)
    );
    let mut trainer = Trainer::new(config(&new_task, &dir.join("new")), &Device::Cpu).unwrap();
    let names: Vec<String> = trainer.trainable().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| n.starts_with("head.") || n == "adapter.hyper.hypernet.task_embeddings"), "{names:?}");
    let adapter_part: usize = trainer.trainable().iter().filter(|(n, _)| !n.starts_with("head.")).map(|(_, v)| v.elem_count()).sum();
    assert_eq!(adapter_part, 64, "one task embedding");
    trainer.run(&RunOptions::default()).unwrap();
}

/// Two tasks share one head: the second's data names the labels differently and
/// `label_map` renames them. One set of head weights trains on both (the same rows under
/// either naming score the same), and the saved head reads either naming. Without the
/// map the labels differ and the run is refused naming both tasks.
#[test]
fn tasks_share_a_head_through_a_label_map() {
    let dir = scratch("shared-head");
    let (sms, dev) = (head_of("sms_spam", "train.jsonl", 40, &dir), head_of("sms_spam", "dev.jsonl", 16, &dir));
    let rename = |from: &Path, to: &str| {
        let text = std::fs::read_to_string(from).unwrap();
        let text = text.replace("\"label\":\"ham\"", "\"label\":\"ok\"").replace("\"label\":\"spam\"", "\"label\":\"junk\"");
        assert!(!text.contains("\"ham\"") && !text.contains("\"spam\""), "every label renamed");
        std::fs::write(dir.join(to), text).unwrap();
        dir.join(to).display().to_string()
    };
    let (renamed, renamed_dev) = (rename(&sms, "renamed-train.jsonl"), rename(&dev, "renamed-dev.jsonl"));
    let task = |name: &str, train: &str, dev: &str, extra: &str| {
        format!("[[task]]\nname = {name:?}\ntype = \"classification\"\ntrain = {train:?}\ndev = {dev:?}\ntest = {dev:?}\n{extra}")
    };
    let body = |extra: &str| {
        format!(
            "[model]\npath = {:?}\nmax_length = 32\n[adapters.pf]\nkind = \"seq_bn\"\nreduction_factor = 32\n{}{}\
             [training]\nbatch_size = 8\nsteps = 3\nlr = 1e-2\nmixed_task_batches = true\n",
            minilm(),
            task("sms", &sms.display().to_string(), &dev.display().to_string(), ""),
            task("renamed", &renamed, &renamed_dev, extra)
        )
    };
    let shared = body("head = \"sms\"\nlabel_map = { ok = \"ham\", junk = \"spam\" }\n");
    let mut trainer = Trainer::new(config(&shared, &dir.join("out")), &Device::Cpu).unwrap();
    let heads: Vec<String> = trainer.trainable().into_iter().map(|(n, _)| n).filter(|n| n.starts_with("head.")).collect();
    assert_eq!(heads, ["head.sms.weight", "head.sms.bias"], "one head");
    let summary = trainer.run(&RunOptions::default()).unwrap();
    let test = |t: &str| serde_json::to_value(&summary).unwrap()["tasks"][t]["test"].clone();
    assert_eq!(test("sms"), test("renamed"), "one head, the same rows: the same scores");
    let model = adapters_models::load(minilm().as_ref(), &Device::Cpu).unwrap().backbone;
    let saved = adapters_models::saved_heads::load_all(&dir.join("out/adapters/pf"), &model).unwrap();
    assert_eq!(saved.len(), 1, "one head folder");
    let head = &saved[0].config;
    assert_eq!((head.task.as_str(), head.labels.clone()), ("sms", vec!["ham".to_string(), "spam".into()]));
    assert_eq!([head.label_index("ok"), head.label_index("spam"), head.label_index("maybe")], [Some(0), Some(1), None]);

    let err = Trainer::new(config(&body("head = \"sms\"\n"), &dir.join("bad")), &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("`sms` and `renamed` share the head `sms`") && err.contains("label_map"), "{err}");
}

/// `init_from` starts an adapter from a trained folder and keeps training it: the run
/// begins with the folder's weights and head (same labels), moves them, and saves the
/// adapter with the folder's kind, configuration and placement. A task with other labels
/// gets a new head. `init_from` with `kind` or `from` is refused naming the key.
#[test]
fn init_from_continues_an_adapter_and_its_head() {
    let dir = scratch("init-from");
    let adapters = "[adapters.pf]\nkind = \"seq_bn\"\nreduction_factor = 32\ninit_weights = \"bert\"\nplacement = { layers = [4, 5] }\n";
    let first = config(&sms_config(&dir, adapters, "steps = 2\nlr = 1e-2"), &dir.join("first"));
    Trainer::new(first, &Device::Cpu).unwrap().run(&RunOptions::default()).unwrap();
    let saved = dir.join("first/adapters/pf");
    let continued = format!("[adapters.pf]\ninit_from = {:?}\n", saved.display().to_string());
    let mut trainer =
        Trainer::new(config(&sms_config(&dir, &continued, "steps = 2\nlr = 1e-2"), &dir.join("second")), &Device::Cpu).unwrap();
    let start = trainable_values(&trainer);
    let on_disk = |rel: &str| values(adapters_core::io::read_tensors(&saved.join(rel), &Device::Cpu).unwrap().into_iter().collect());
    let (adapter, head) = (on_disk("adapter_model.safetensors"), on_disk("heads/sms/head.safetensors"));
    assert_eq!(start.len(), adapter.len() + head.len());
    for (name, v) in &start {
        let stored = name.strip_prefix("adapter.pf.").map(|n| &adapter[n]).unwrap_or_else(|| &head[name.trim_start_matches("head.sms.")]);
        assert_eq!(v, stored, "{name} starts from the folder");
    }
    trainer.run(&RunOptions::default()).unwrap();
    let end = trainable_values(&trainer);
    assert!(start.iter().all(|(n, v)| v != &end[n]), "every variable trained on");
    let config_of = |d: &Path| -> serde_json::Value {
        let c: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("adapter_config.json")).unwrap()).unwrap();
        serde_json::json!([c["kind"], c["config"], c["placement"]])
    };
    assert_eq!(config_of(&saved), config_of(&dir.join("second/adapters/pf")));

    // TREC's labels are not the SMS head's: a new head, the adapter still from the folder.
    let trec = head_of("trec_coarse", "train.jsonl", 16, &dir);
    let body = format!(
        "[model]\npath = {:?}\nmax_length = 32\n{continued}[[task]]\nname = \"sms\"\ntype = \"classification\"\ntrain = {:?}\n[training]\nsteps = 1\nbatch_size = 8\n",
        minilm(),
        trec.display().to_string()
    );
    let trainer = Trainer::new(config(&body, &dir.join("third")), &Device::Cpu).unwrap();
    let head_rows = trainer.trainable().into_iter().find(|(n, _)| n == "head.sms.weight").unwrap().1.dims()[0];
    let labels: std::collections::BTreeSet<String> = std::fs::read_to_string(&trec)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["label"].as_str().unwrap().to_string())
        .collect();
    assert!(labels.len() > 2 && head_rows == labels.len(), "a head for TREC's {} labels, not the SMS head", labels.len());

    for (extra, says) in [("kind = \"seq_bn\"\n", "leave out `kind`"), ("from = \"x\"\n", "give one")] {
        let text = format!("{}\n[output]\ndir = \"x\"\n", body.replace(&continued, &format!("{continued}{extra}")));
        let e = Config::parse(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("adapters.pf") && e.contains(says), "{e}");
    }
}

/// Adversarial training (2 PGD steps, dropout on): every step logs its adversarial term,
/// stopping and resuming gives the uninterrupted run's weights bit for bit, and the
/// SMART form (the KL term) trains too.
#[test]
fn adversarial_training_logs_its_term_and_resumes_exactly() {
    let dir = scratch("adversarial");
    let adapters = "[adapters.pf]\nkind = \"seq_bn\"\nreduction_factor = 16\ndropout = 0.1\n";
    let training = "steps = 4\neval_every = 2\ncheckpoint_every = 2\n[training.adversarial]\nepsilon = 0.5\nsteps = 2";
    let body = sms_config(&dir, adapters, training);
    let mut straight = Trainer::new(config(&body, &dir.join("a")), &Device::Cpu).unwrap();
    straight.run(&RunOptions::default()).unwrap();
    let records = adapters_train::metrics::MetricsLog::read(&dir.join("a/metrics.jsonl")).unwrap();
    let terms: Vec<f64> =
        records.iter().filter(|r| r.get("split").is_none()).map(|r| r["aux_losses"]["adversarial"].as_f64().unwrap()).collect();
    assert!(terms.len() == 4 && terms.iter().all(|t| t.is_finite() && *t > 0.0), "{terms:?}");
    let resumed = stopped_and_resumed(&body, &dir.join("b"), 2);
    assert_eq!(trainable_values(&straight), trainable_values(&resumed));
    let smart = sms_config(&dir, adapters, &format!("{training}\nkl = true\nweight = 0.5"));
    let summary = Trainer::new(config(&smart, &dir.join("c")), &Device::Cpu).unwrap().run(&RunOptions::default()).unwrap();
    assert!(summary.aux_losses["adversarial"] > 0.0, "{:?}", summary.aux_losses);
    // Only where the backbone runs on classification data.
    let e = Config::parse(&format!("{}\n[output]\ndir = \"x\"\n", sms_config(&dir, "", &format!("mode = \"head_only\"\n{training}"))), &[])
        .unwrap_err();
    assert!(e.to_string().contains("`training.adversarial`"), "{e}");
    let e = Config::parse(&format!("{}\n[output]\ndir = \"x\"\n", sms_config(&dir, adapters, "[training.adversarial]\nepsilon = -1")), &[])
        .unwrap_err();
    assert!(e.to_string().contains("`training.adversarial.epsilon` = -1"), "{e}");
}
