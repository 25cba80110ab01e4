//! The subcommands: thin layers over adapters-core and adapters-models.

use adapters_core::{registry, ForwardCtx, InsertionPoint, Setup, SiteKind};
use adapters_models::generate::{generate as run_generation, Sampling};
use adapters_models::HoldsAdapters;
use adapters_models::{load, Backbone, LoadedModel, Message};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    return Ok(Device::cuda_if_available(0)?);
    #[cfg(not(feature = "cuda"))]
    Ok(Device::Cpu)
}

/// The error for a command that needs an adapter family this binary was built without.
pub fn missing_family(feature: &str, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{what} needs the `{feature}` adapter family, which this `adapters` binary was built without; rebuild it with \
         `cargo build --release -p adapters-cli --features {feature}`"
    )
}

pub fn open(model: &Path) -> Result<LoadedModel> {
    Ok(load(model, &device()?)?)
}

/// How to run the frozen base model.
#[derive(clap::Args, Debug, Default)]
pub struct BaseArgs {
    /// `int8`: run an encoder's frozen projections in 8 bits (weights quantised per
    /// channel at load, activations per row at each product; adapters, embeddings and norms
    /// stay f32). Faster on CPUs with AVX-512 VNNI, slower without; see BENCHMARKS.md for
    /// speed and RESULTS.md for accuracy against f32.
    #[arg(long, value_name = "MODE", value_parser = ["int8"])]
    pub quantize: Option<String>,
}

impl BaseArgs {
    /// Applies the options to a loaded model.
    pub fn apply(&self, loaded: &mut LoadedModel) -> Result<()> {
        if self.quantize.is_some() {
            loaded.backbone.use_int8().context("--quantize int8")?;
        }
        Ok(())
    }
}

/// Adapters to attach before running, and how to compose them.
#[derive(clap::Args, Debug, Default)]
pub struct AdapterArgs {
    /// An adapter folder (ours, PEFT LoRA or AdapterHub bottleneck), as `DIR` (named as
    /// saved in it) or `NAME=DIR`. Repeat to load several; without --setup they are
    /// stacked in the given order. Two adapters with one name are an error.
    #[arg(long = "adapter", value_name = "[NAME=]DIR")]
    pub adapter: Vec<String>,
    /// A fusion folder over loaded adapters (ours, or AdapterHub's `save_adapter_fusion`
    /// output); use it with --setup 'fuse(a, b)'. Repeatable.
    #[arg(long = "fusion", value_name = "DIR")]
    pub fusion: Vec<PathBuf>,
    /// How to compose the loaded adapters, e.g. 'fuse(a, b, c)', 'stack(lang, task)',
    /// 'average(a, b; weights=0.7, 0.3)' (weights as given; add '; normalize' to divide by
    /// their sum), 'parallel(a, b)' (one output per adapter from one pass),
    /// 'batch_split(a, b; sizes=2, 2)' (rows), 'split(a, b; splits=64, 64)' (positions);
    /// or an adapter_setup.json (or a folder holding one).
    #[arg(long, value_name = "EXPR")]
    pub setup: Option<String>,
    /// The adapter library to take `--adapter NAME@TAG` (or NAME@VERSION, or NAME: its
    /// latest) from when no such folder exists; versions are downloaded once into
    /// $ADAPTERS_CACHE (default ~/.cache/adapters).
    #[arg(long, env = "ADAPTERS_STORE", value_name = "URI")]
    pub store: Option<String>,
}

impl AdapterArgs {
    /// Plain adapter folders, stacked.
    pub fn stacked(dirs: &[PathBuf]) -> Self {
        AdapterArgs { adapter: dirs.iter().map(|d| d.display().to_string()).collect(), ..Default::default() }
    }

    /// Each `--adapter` as (name, folder): `NAME=DIR` when the part before `=` is a plain
    /// name and `DIR` otherwise.
    pub fn named_dirs(&self) -> Vec<(Option<String>, PathBuf)> {
        self.adapter
            .iter()
            .map(|a| match a.split_once('=') {
                Some((name, dir)) if !name.is_empty() && !name.contains(std::path::is_separator) => (Some(name.to_string()), dir.into()),
                _ => (None, a.into()),
            })
            .collect()
    }

    /// [`AdapterArgs::named_dirs`], with references to the `--store` library downloaded:
    /// an `--adapter` that is not a folder but a `NAME[@TAG|@VERSION]` is taken from the
    /// store and named NAME.
    pub fn resolved_dirs(&self) -> Result<Vec<(Option<String>, PathBuf)>> {
        self.named_dirs()
            .into_iter()
            .map(|(name, dir)| {
                let text = dir.display().to_string();
                match (&self.store, dir.exists(), text.parse::<adapters_store::Reference>()) {
                    (Some(store), false, Ok(reference)) => {
                        let local = adapters_store::local_copy(store, &reference, &adapters_store::default_cache_dir())?;
                        Ok((name.or(Some(reference.name.to_string())), local))
                    }
                    _ => Ok((name, dir)),
                }
            })
            .collect()
    }

    /// The adapter and fusion folders (where saved heads may be).
    pub fn dirs(&self) -> Result<Vec<PathBuf>> {
        Ok(self.resolved_dirs()?.into_iter().map(|(_, d)| d).chain(self.fusion.iter().cloned()).collect())
    }
}

/// Loads a model, attaches the adapter and fusion folders and activates `--setup` (or
/// the adapters stacked in the given order).
pub fn open_with(model: &Path, args: &AdapterArgs) -> Result<LoadedModel> {
    let mut loaded = open(model)?;
    let mut names = Vec::new();
    for (name, dir) in args.resolved_dirs()? {
        if !dir.join(adapters_core::io::CONFIG_FILE).exists() && dir.join(adapters_models::saved_heads::HEADS_DIR).is_dir() {
            continue; // a head-only run folder: heads, no adapter
        }
        let name = loaded.backbone.load_adapter(&dir, name.as_deref()).with_context(|| format!("loading the adapter {}", dir.display()))?;
        names.push(name);
    }
    for dir in &args.fusion {
        loaded.backbone.load_adapter(dir, None).with_context(|| format!("loading the fusion {}", dir.display()))?;
    }
    let setup = match &args.setup {
        Some(path) if Path::new(path).exists() => Some(Setup::load(Path::new(path))?),
        Some(expr) => Some(expr.parse::<Setup>().with_context(|| format!("--setup {expr:?}"))?),
        None if names.is_empty() => None,
        None => Some(Setup::stack(&names)),
    };
    loaded.backbone.adapters_mut().set_setup(setup).context("--setup")?;
    Ok(loaded)
}

pub fn kinds() -> Result<()> {
    let kinds = registry::kinds();
    if kinds.is_empty() {
        println!("No adapter kinds are registered in this build.");
        return Ok(());
    }
    for kind in kinds {
        println!("{:<16} {} (from {})", kind.name, kind.summary, kind.family);
        for f in kind.fields {
            println!("    {:<22} {:<24} default {:<10} {}", f.name, f.ty, f.default, f.doc);
        }
    }
    Ok(())
}

pub fn info(model: &Path, json: bool) -> Result<()> {
    let loaded = open(model)?;
    let info = loaded.backbone.model_info();
    let params = loaded.backbone.num_parameters();
    let details = match &loaded.backbone {
        Backbone::Bert(m) => serde_json::to_value(&m.config)?,
        Backbone::Llama(m) => serde_json::to_value(&m.config)?,
    };
    if json {
        let out = serde_json::json!({
            "source": loaded.source,
            "architecture": info.architecture,
            "parameters": params,
            "config": details,
            "insertion_points": info.points,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("model         {}", loaded.source.display());
    println!("architecture  {}", info.architecture);
    println!("parameters    {params} ({:.1}M)", params as f64 / 1e6);
    println!("layers        {}", info.num_layers);
    println!("hidden size   {}", info.hidden_size);
    println!("vocabulary    {}", info.vocab_size);
    if let Backbone::Llama(m) = &loaded.backbone {
        let c = &m.config;
        println!("heads         {} query, {} key/value, head size {}", c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        println!("context       {} positions, RoPE theta {}", c.max_position_embeddings, c.rope_theta);
        println!("lm head       {}", if m.ties_embeddings() { "tied to the token embeddings" } else { "separate" });
    }
    println!("insertion points: {} ({} in each of layers 0-{})", info.points.len(), info.sites().len(), info.num_layers - 1);
    for site in info.sites() {
        let spec = info.points.iter().find(|p| p.point.site == site).expect("site listed");
        let kind = match site.kind() {
            SiteKind::Hidden => "between sublayers",
            SiteKind::Projection => "projection",
            SiteKind::KeyValuePrefix => "attention prefix",
            SiteKind::Embeddings => "token embeddings",
            SiteKind::Intervention => "layer output",
        };
        println!("    {:<18} {:<18} {} -> {}", site.name(), kind, spec.in_features, spec.out_features);
    }
    Ok(())
}

/// Normalised mean-pooled embeddings, one per text, in batches of at most
/// `max_batch_tokens` padded tokens.
fn embeddings(loaded: &LoadedModel, texts: &[String], max_batch_tokens: usize) -> Result<Vec<Vec<f32>>> {
    Ok(adapters_models::sentence_embeddings(&loaded.backbone, &loaded.tokenizer, texts, max_batch_tokens)?.0)
}

pub fn embed(model: &Path, adapters: &AdapterArgs, base: &BaseArgs, texts: &[String], json: bool, max_batch_tokens: usize) -> Result<()> {
    let mut loaded = open_with(model, adapters)?;
    base.apply(&mut loaded)?;
    let vectors = embeddings(&loaded, texts, max_batch_tokens)?;
    if json {
        println!("{}", serde_json::to_string(&vectors)?);
    } else {
        for (text, v) in texts.iter().zip(&vectors) {
            let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:+.4}")).collect();
            println!("{:>4} dims  [{} ...]  {text}", v.len(), head.join(", "));
        }
    }
    Ok(())
}

pub fn similarity(model: &Path, adapters: &AdapterArgs, texts: &[String]) -> Result<()> {
    let loaded = open_with(model, adapters)?;
    let v = embeddings(&loaded, texts, adapters_models::MAX_BATCH_TOKENS)?;
    for (i, a) in texts.iter().enumerate() {
        for (j, b) in texts.iter().enumerate().skip(i + 1) {
            let cos: f32 = v[i].iter().zip(&v[j]).map(|(x, y)| x * y).sum();
            println!("{cos:+.3}  {a:?} ~ {b:?}");
        }
    }
    Ok(())
}

fn decoder(loaded: &LoadedModel) -> Result<&adapters_models::Llama> {
    match &loaded.backbone {
        Backbone::Llama(m) => Ok(m),
        Backbone::Bert(_) => bail!(
            "{} is an encoder (BERT) model, which cannot generate text; use a decoder such as models/SmolLM2-135M-Instruct.Q4_1.gguf",
            loaded.source.display()
        ),
    }
}

fn prompt_ids(loaded: &LoadedModel, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    let text = if chat {
        loaded.tokenizer.apply_chat_template(&[Message { role: "user".into(), content: prompt.into() }], true)?
    } else {
        prompt.to_string()
    };
    let ids = loaded.tokenizer.encode(&text, false)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization; give some text");
    }
    Ok(ids)
}

pub fn generate(model: &Path, adapters: &AdapterArgs, prompt: &str, max_tokens: usize, sampling: &Sampling, chat: bool) -> Result<()> {
    let loaded = open_with(model, adapters)?;
    let m = decoder(&loaded)?;
    let ids = prompt_ids(&loaded, prompt, chat)?;
    let mut stop: Vec<u32> = m.config.eos_tokens();
    if let Some(id) = loaded.tokenizer.eos_token.as_deref().and_then(|t| loaded.tokenizer.token_id(t)) {
        stop.push(id);
    }
    let mut stream = loaded.tokenizer.inner.decode_stream(true);
    let mut out = std::io::stdout().lock();
    run_generation(m, &ids, max_tokens, sampling, &stop, |id| -> Result<()> {
        if !stop.contains(&id) {
            if let Some(piece) = stream.step(id).map_err(|e| anyhow::anyhow!("decoding: {e}"))? {
                out.write_all(piece.as_bytes())?;
                out.flush()?;
            }
        }
        Ok(())
    })
    .context("generating")?;
    writeln!(out)?;
    Ok(())
}

pub fn logits(model: &Path, adapters: &AdapterArgs, prompt: &str, top: usize, chat: bool, json: bool) -> Result<()> {
    let loaded = open_with(model, adapters)?;
    let m = decoder(&loaded)?;
    let ids = prompt_ids(&loaded, prompt, chat)?;
    let input = Tensor::new(ids.as_slice(), m.device())?.unsqueeze(0)?;
    let logits: Vec<f32> = m.last_logits(&input, None, &ForwardCtx::inference())?.squeeze(0)?.to_vec1()?;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let rows: Vec<serde_json::Value> = order
        .iter()
        .take(top)
        .map(|&i| {
            let token = loaded.tokenizer.decode(&[i as u32], false).unwrap_or_default();
            serde_json::json!({ "id": i, "token": token, "logit": logits[i] })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        for r in rows {
            println!("{:>7}  {:>9.4}  {:?}", r["id"], r["logit"].as_f64().unwrap_or(0.0), r["token"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

/// Which experts each token of each text chose at every routed point of the loaded
/// mixture-of-experts adapters.
pub fn route(model: &Path, adapters: &AdapterArgs, texts: &[String], task_id: Option<u32>, json: bool) -> Result<()> {
    let loaded = open_with(model, adapters)?;
    let device = loaded.backbone.device().clone();
    let mut report = Vec::new();
    for text in texts {
        let ids = loaded.tokenizer.encode(text, true)?;
        let tokens: Vec<String> =
            ids.iter().map(|&id| loaded.tokenizer.decode(&[id], false).map(|t| t.trim().to_string())).collect::<Result<_, _>>()?;
        let n = ids.len();
        let mut ctx = ForwardCtx::inference().with_routing();
        if let Some(t) = task_id {
            ctx = ctx.with_task_ids(Tensor::new(&[t], &device)?);
        }
        let (ids, mask) = (Tensor::from_vec(ids, (1, n), &device)?, Tensor::ones((1, n), candle_core::DType::U32, &device)?);
        loaded.backbone.hidden_states(&ids, &mask, &ctx)?;
        let routing = ctx.take_aux().routing;
        if routing.is_empty() {
            bail!("no loaded adapter routes tokens; `route` shows the experts of mixture-of-experts adapters (moe_bn, moe_lora)");
        }
        let points: Vec<(String, Vec<Vec<u32>>)> =
            routing.into_iter().map(|s| (format!("{} {}", s.adapter, s.point), s.choices.unwrap_or_default())).collect();
        report.push((text, tokens, points));
    }
    if json {
        let out: Vec<serde_json::Value> = report
            .iter()
            .map(|(text, tokens, points)| {
                let points: serde_json::Map<String, serde_json::Value> =
                    points.iter().map(|(p, c)| (p.clone(), serde_json::json!(c))).collect();
                serde_json::json!({"text": text, "tokens": tokens, "experts": points})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for (text, tokens, points) in &report {
        println!("{text:?}  (experts per token; '-' = none: skipped or over capacity)");
        let label = points.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
        let cell = |c: &[u32]| if c.is_empty() { "-".to_string() } else { c.iter().map(u32::to_string).collect::<Vec<_>>().join("+") };
        let widths: Vec<usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| points.iter().map(|(_, c)| cell(&c[i]).len()).max().unwrap_or(1).max(t.chars().count()))
            .collect();
        let row = |cells: Vec<String>| cells.iter().zip(&widths).map(|(c, w)| format!("{c:>w$}")).collect::<Vec<_>>().join(" ");
        println!("  {:label$}  {}", "", row(tokens.clone()));
        for (point, choices) in points {
            println!("  {point:label$}  {}", row(choices.iter().map(|c| cell(c)).collect()));
        }
        println!();
    }
    Ok(())
}

/// The arguments of `adapters info`.
#[derive(clap::Args)]
pub struct InfoArgs {
    pub model: std::path::PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `adapters embed`.
#[derive(clap::Args)]
pub struct EmbedArgs {
    pub model: std::path::PathBuf,
    /// One or more texts.
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// Print one JSON array of embeddings (one array of floats per text).
    #[arg(long)]
    pub json: bool,
    /// Padded tokens per forward at most: the texts run sorted by length in batches of
    /// this many tokens (TEI's `--max-batch-tokens`); a longer text runs alone.
    #[arg(long, default_value_t = adapters_models::MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    #[command(flatten)]
    pub base: crate::commands::BaseArgs,
    #[command(flatten)]
    pub adapters: crate::commands::AdapterArgs,
}

/// The arguments of `adapters similarity`.
#[derive(clap::Args)]
pub struct SimilarityArgs {
    pub model: std::path::PathBuf,
    /// Two or more texts.
    #[arg(required = true, num_args = 2..)]
    pub texts: Vec<String>,
    #[command(flatten)]
    pub adapters: crate::commands::AdapterArgs,
}

/// The arguments of `adapters generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    pub model: std::path::PathBuf,
    pub prompt: String,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Always take the most likely token (otherwise sample).
    #[arg(long)]
    pub greedy: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Seed for sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[command(flatten)]
    pub adapters: crate::commands::AdapterArgs,
}

/// The arguments of `adapters logits`.
#[derive(clap::Args)]
pub struct LogitsArgs {
    pub model: std::path::PathBuf,
    pub prompt: String,
    /// How many of the largest logits to show.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Print JSON: [{"id": .., "token": .., "logit": ..}, ...].
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub adapters: crate::commands::AdapterArgs,
}

/// The arguments of `adapters route`.
#[derive(clap::Args)]
pub struct RouteArgs {
    pub model: std::path::PathBuf,
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// The task id to route by (mixtures with `routing = "task"`).
    #[arg(long)]
    pub task_id: Option<u32>,
    /// Print JSON: [{"text", "tokens", "experts": {point: [[expert, ...] per token]}}].
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub adapters: crate::commands::AdapterArgs,
}
