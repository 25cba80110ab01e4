//! Training and using trained heads: `train`, `predict`, `eval`.

use crate::commands::{open_with, AdapterArgs};
use adapters_core::ForwardCtx;
use adapters_models::LoadedModel;
use adapters_train::config::Pooling;
use adapters_train::data::{read_labelled, read_text, Fields};
use adapters_train::forward::{argmax, classify, lm_loss, pooled};
use adapters_train::heads::{self, SavedHead};
use adapters_train::metrics::{accuracy, macro_f1};
use adapters_train::{Config, RunOptions, Trainer};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::io::IsTerminal;
use std::path::Path;

pub fn train(config: &Path, sets: &[String], resume: bool, stop_after: Option<usize>) -> Result<()> {
    let _ = (adapters_bottleneck::family(), adapters_lora::family(), adapters_fusion::family(), adapters_moe::family());
    let config = Config::load(config, sets)?;
    let mut trainer = Trainer::new(config.clone(), &crate::commands::device()?)?;
    let trainable = trainer.trainable_parameters();
    eprintln!(
        "{} mode, {} trainable parameters ({:.2}% of the base's {}), {} steps",
        serde_json::to_value(config.training.mode)?.as_str().unwrap_or("?"),
        trainable,
        100.0 * trainable as f64 / trainer.model().backbone.num_parameters().max(1) as f64,
        trainer.model().backbone.num_parameters(),
        trainer.total_steps()
    );
    let summary = trainer.run(&RunOptions { resume, stop_after, progress: std::io::stderr().is_terminal() })?;
    if !summary.finished {
        return Ok(());
    }
    for (task, r) in &summary.tasks {
        let show = |m: &std::collections::BTreeMap<String, f64>| {
            ["accuracy", "macro_f1", "perplexity"]
                .iter()
                .filter_map(|k| m.get(*k).map(|v| format!("{k} {v:.4}")))
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("{task}: test {}", show(&r.test));
        if !r.test_at_start.is_empty() {
            println!("{task}: test before training {}", show(&r.test_at_start));
        }
    }
    println!(
        "trainable parameters: {} ({:.2}% of the base's {}); {} steps in {:.0} s; outputs in {}",
        summary.trainable_parameters,
        100.0 * summary.trainable_share,
        summary.base_parameters,
        summary.steps,
        summary.seconds,
        summary.output.display()
    );
    Ok(())
}

/// The heads in the model folder and the adapter folders, narrowed to `task` if given.
fn find_head(model: &Path, adapters: &AdapterArgs, task: Option<&str>, loaded: &LoadedModel) -> Result<SavedHead> {
    let device = loaded.backbone.device();
    let mut found = Vec::new();
    for dir in std::iter::once(model.to_path_buf()).chain(adapters.dirs()?) {
        if dir.is_dir() {
            found.extend(heads::load_all(&dir, device)?);
        }
    }
    let names: Vec<String> = found.iter().map(|h| format!("{} ({})", h.config.task, h.dir.display())).collect();
    let mut matching: Vec<SavedHead> = found.into_iter().filter(|h| task.is_none_or(|t| h.config.task == t)).collect();
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 if names.is_empty() => bail!(
            "no trained head in {} or the --adapter folders (heads live in a heads/TASK folder; `adapters train` writes them)",
            model.display()
        ),
        0 => bail!("no head for task `{}`; found: {}", task.unwrap_or_default(), names.join(", ")),
        _ => bail!("several heads found, choose one with --task: {}", names.join(", ")),
    }
}

fn encode(loaded: &LoadedModel, text: &str, max_length: usize) -> Result<Vec<u32>> {
    Ok(adapters_train::encode_truncated(&loaded.tokenizer, text, max_length, loaded.backbone.is_encoder())?)
}

fn logits_for(loaded: &LoadedModel, head: &SavedHead, ids: &[Vec<u32>]) -> Result<Tensor> {
    let ctx = ForwardCtx::inference();
    let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let pooling: Pooling = head.config.pooling;
    let features = pooled(&loaded.backbone, &rows, pooling, &ctx)?;
    Ok(classify(&head.head, &features, 0.0, &ctx)?)
}

pub fn predict(model: &Path, adapters: &AdapterArgs, task: Option<&str>, texts: &[String], max_length: usize, json: bool) -> Result<()> {
    let loaded = open_with(model, adapters)?;
    let head = find_head(model, adapters, task, &loaded)?;
    let ids = texts.iter().map(|t| encode(&loaded, t, max_length)).collect::<Result<Vec<_>>>()?;
    let probs = candle_nn::ops::softmax_last_dim(&logits_for(&loaded, &head, &ids)?)?.to_vec2::<f32>()?;
    let mut out = Vec::new();
    for (text, p) in texts.iter().zip(&probs) {
        let best = p.iter().enumerate().fold(0, |b, (i, &v)| if v > p[b] { i } else { b });
        let label = &head.config.labels[best];
        if json {
            let scores: serde_json::Map<String, serde_json::Value> =
                head.config.labels.iter().zip(p).map(|(l, v)| (l.clone(), serde_json::json!(v))).collect();
            out.push(serde_json::json!({"text": text, "label": label, "scores": scores}));
        } else {
            println!("{label}\t{:.3}\t{text}", p[best]);
        }
    }
    if json {
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn eval(
    model: &Path,
    adapters: &AdapterArgs,
    task: Option<&str>,
    data: &Path,
    fields: Fields,
    max_length: usize,
    json: bool,
) -> Result<()> {
    let loaded = open_with(model, adapters)?;
    let is_text = data.extension().is_some_and(|e| e == "txt");
    let result = if is_text {
        if loaded.backbone.is_encoder() {
            bail!("{}: perplexity on plain text needs a decoder model; for classification give a .jsonl or .csv file", data.display());
        }
        let ctx = ForwardCtx::inference();
        let eos = loaded.tokenizer.eos_token.as_deref().and_then(|t| loaded.tokenizer.token_id(t));
        let mut stream = Vec::new();
        for d in read_text(data)? {
            stream.extend(loaded.tokenizer.encode(&d, false)?);
            stream.extend(eos);
        }
        let blocks: Vec<&[u32]> = stream.chunks_exact(max_length).collect();
        if blocks.is_empty() {
            bail!("{}: fewer than {max_length} tokens", data.display());
        }
        let (mut nll, mut count) = (0.0, 0usize);
        for batch in blocks.chunks(8) {
            let (loss, n) = lm_loss(&loaded.backbone, batch, None, &ctx)?;
            nll += loss.to_scalar::<f32>()? as f64 * n as f64;
            count += n;
        }
        serde_json::json!({"data": data, "tokens": count, "loss": nll / count as f64, "perplexity": (nll / count as f64).exp()})
    } else {
        let head = find_head(model, adapters, task, &loaded)?;
        let examples = read_labelled(data, &fields)?.examples;
        let mut gold = Vec::new();
        for e in &examples {
            let label = head.config.labels.iter().position(|l| *l == e.label).with_context(|| {
                format!("{}:{}: label `{}` is not one the head knows ({})", data.display(), e.line, e.label, head.config.labels.join(", "))
            })?;
            gold.push(label as u32);
        }
        let mut pred = Vec::new();
        for chunk in examples.chunks(64) {
            let ids = chunk.iter().map(|e| encode(&loaded, &e.text, max_length)).collect::<Result<Vec<_>>>()?;
            pred.extend(argmax(&logits_for(&loaded, &head, &ids)?)?);
        }
        serde_json::json!({"data": data, "task": head.config.task, "examples": gold.len(),
            "accuracy": accuracy(&gold, &pred), "macro_f1": macro_f1(&gold, &pred, head.config.labels.len())})
    };
    if json {
        println!("{result}");
    } else {
        for (k, v) in result.as_object().expect("an object") {
            println!("{k}: {}", v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
        }
    }
    Ok(())
}
