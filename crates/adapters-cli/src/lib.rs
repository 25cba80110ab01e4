//! `adapters`: inspect models and adapter kinds, embed text, generate, read logits, train,
//! store and serve adapters. The binary is [`main`]; a team's own binary that adds a family
//! crate of its own links it and then calls [`main`]:
//!
//! ```ignore
//! fn main() {
//!     my_family::family();
//!     adapters_cli::main()
//! }
//! ```

mod adapter_commands;
mod average_command;
mod commands;
mod serve_command;
mod store_commands;
mod train_commands;

use adapters_core::merge;
use clap::{Parser, Subcommand};
use commands::AdapterArgs;
use std::path::PathBuf;
use store_commands::StoreArg;

#[derive(Parser)]
#[command(
    name = "adapters",
    version,
    about = "Small trainable adapters on frozen transformer models",
    long_about = "Small trainable adapters on frozen transformer models.\n\n\
        MODEL is a Hugging Face folder (config.json, model.safetensors, tokenizer.json) of a \
        BERT-family encoder or Llama-family decoder, or a Llama-family .gguf file. \
        `cargo xtask fetch` puts all-MiniLM-L6-v2 and SmolLM2-135M-Instruct under models/.",
    after_help = "Examples:\n  \
        adapters info models/all-MiniLM-L6-v2\n  \
        adapters embed models/all-MiniLM-L6-v2 \"first text\" \"second text\" --json\n  \
        adapters generate models/SmolLM2-135M-Instruct.Q4_1.gguf \"Tell me a joke\" --chat\n  \
        adapters logits models/SmolLM2-135M-Instruct.Q4_1.gguf \"The capital of France is\" --top 5 --json\n  \
        adapters new seq_bn --model models/all-MiniLM-L6-v2 --out my-adapter --set reduction_factor=8\n  \
        adapters new lora --model models/all-MiniLM-L6-v2 --out my-lora --set r=4 --set placement.sites='[\"query\",\"value\"]' --format peft\n  \
        adapters inspect my-adapter --model models/all-MiniLM-L6-v2\n  \
        adapters embed models/all-MiniLM-L6-v2 \"some text\" --adapter my-adapter --adapter my-lora\n  \
        adapters push my-adapter --store s3://team-adapters --name sms-spam --tag prod --model models/all-MiniLM-L6-v2\n  \
        adapters list --store s3://team-adapters\n  \
        adapters embed models/all-MiniLM-L6-v2 \"some text\" --adapter sms-spam@prod --store s3://team-adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every registered adapter kind with its configuration fields.
    Kinds,
    /// Describe a model: architecture, sizes, parameter count and insertion points.
    Info {
        model: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Sentence embeddings: mean-pooled over tokens, L2-normalised.
    Embed {
        model: PathBuf,
        /// One or more texts.
        #[arg(required = true)]
        texts: Vec<String>,
        /// Print one JSON array of embeddings (one array of floats per text).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        adapters: AdapterArgs,
    },
    /// Cosine similarity between every pair of texts, from their embeddings.
    Similarity {
        model: PathBuf,
        /// Two or more texts.
        #[arg(required = true, num_args = 2..)]
        texts: Vec<String>,
        #[command(flatten)]
        adapters: AdapterArgs,
    },
    /// Generate text after a prompt with a decoder model, streaming tokens as they come.
    Generate {
        model: PathBuf,
        prompt: String,
        /// Most new tokens to generate.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Always take the most likely token (otherwise sample).
        #[arg(long)]
        greedy: bool,
        /// Sampling temperature.
        #[arg(long, default_value_t = 0.7)]
        temperature: f64,
        /// Nucleus sampling: keep the most likely tokens up to this probability mass.
        #[arg(long, default_value_t = 0.9)]
        top_p: f64,
        /// Seed for sampling.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[command(flatten)]
        adapters: AdapterArgs,
    },
    /// The top K next-token logits at the last position of a prompt (decoder models).
    Logits {
        model: PathBuf,
        prompt: String,
        /// How many of the largest logits to show.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Print JSON: [{"id": .., "token": .., "logit": ..}, ...].
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        adapters: AdapterArgs,
    },
    /// Create a freshly initialised adapter of any registered kind and save it.
    New {
        /// The adapter kind (see `adapters kinds`).
        kind: String,
        /// The base model the adapter is made for.
        #[arg(long)]
        model: PathBuf,
        /// The folder to write (must not exist yet, or be empty).
        #[arg(long)]
        out: PathBuf,
        /// A config field (`r=4`, `non_linearity=gelu`) or placement rule
        /// (`placement.layers=[0,1]`, `placement.layers={"top":2}`, `placement.leave_out=[0]`,
        /// `placement.sites=["query","value"]`, `placement.sizes.5=16`). Values are JSON;
        /// bare words are strings. Repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// The name recorded in the adapter (default: the folder name).
        #[arg(long)]
        name: Option<String>,
        /// Seed for the initial weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// File layout: ours, `peft` (LoRA) or `adapterhub` (bottleneck kinds).
        #[arg(long, value_enum, default_value_t = adapter_commands::Format::Native)]
        format: adapter_commands::Format,
    },
    /// Rewrite an adapter folder in another layout: ours (`native`), PEFT (LoRA) or
    /// AdapterHub (bottleneck kinds and fusion layers), e.g. to hand it to Python users.
    /// The model is the one the adapter was made for (checked).
    Convert {
        /// The adapter folder (any layout).
        dir: PathBuf,
        /// The base model it belongs to.
        #[arg(long)]
        model: PathBuf,
        /// The layout to write.
        #[arg(long, value_enum)]
        format: adapter_commands::Format,
        /// The folder to write (must not exist yet, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show an adapter folder (ours, PEFT or AdapterHub): kind, placement, parameters,
    /// base model, and with --model whether it fits that model.
    Inspect {
        dir: PathBuf,
        /// Check against this model and show the parameter share.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Merge LoRA adapters into the base weights and write a new model folder.
    Merge {
        model: PathBuf,
        /// LoRA adapter folders to merge, in order (repeatable).
        #[arg(long = "adapter", required = true)]
        adapters: Vec<PathBuf>,
        /// The folder to write the merged model to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Combine adapters of one kind into a new adapter folder: a weighted average (or sum;
    /// negative weights subtract what an adapter learned). Every kind combines `linear`ly,
    /// weight by weight. LoRA adapters combine as PEFT's add_weighted_adapter does:
    /// `linear` (the A and B factors summed separately, each weighted by sqrt(|w·scale|):
    /// cheap but approximate), `cat` (the factors side by side: exactly Σ w·scale·B·A, at
    /// the summed rank), `svd` (that exact sum cut back to --rank), `ties` / `dare_linear` /
    /// `dare_ties` / `magnitude_prune` on the factors (with --density), and each of those
    /// with `_svd` on the full updates. Classification heads that every folder carries for
    /// the same task and labels are averaged with the same weights.
    #[command(
        after_help = "Examples:\n  adapters average --model models/all-MiniLM-L6-v2 --adapter sms-a --adapter sms-b --out sms-avg\n  \
        adapters average --model models/all-MiniLM-L6-v2 --adapter base-task --adapter toxic --weights 1,-0.5 --out detoxed\n  \
        adapters average --model models/all-MiniLM-L6-v2 --adapter lora-a --adapter lora-b --method ties --density 0.5 --out lora-ties"
    )]
    Average {
        /// The base model the adapters belong to (checked).
        #[arg(long)]
        model: PathBuf,
        /// An adapter folder to combine (repeatable; ours, PEFT or AdapterHub), all of one kind.
        #[arg(long = "adapter", required = true)]
        adapters: Vec<PathBuf>,
        /// One weight per --adapter, comma-separated, e.g. 0.7,0.3 or 1,-0.5 (default:
        /// equal weights that sum to 1).
        #[arg(long, allow_hyphen_values = true)]
        weights: Option<String>,
        /// How to combine (see above).
        #[arg(long, default_value = "linear")]
        method: String,
        /// The share of each input's entries that TIES, DARE and magnitude pruning keep, in [0, 1].
        #[arg(long)]
        density: Option<f64>,
        /// The rank of an SVD result (default: the inputs' largest).
        #[arg(long)]
        rank: Option<usize>,
        /// Clamp an SVD result's factors at this quantile of their entries, in (0, 1].
        #[arg(long)]
        clamp: Option<f64>,
        /// TIES's sign election: the sign of the sum (`total`) or the most common (`frequency`).
        #[arg(long, default_value = "total", value_parser = ["total", "frequency"])]
        majority_sign: String,
        /// Seed of DARE's random masks.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The layout to write.
        #[arg(long, value_enum, default_value = "native")]
        format: adapter_commands::Format,
        /// The new adapter's name (default: the folder's name).
        #[arg(long)]
        name: Option<String>,
        /// The folder to write (must not exist yet, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Turn a mixture-of-experts adapter (moe_bn, moe_lora) into one plain adapter (seq_bn,
    /// lora) whose weights are the mean of its experts': the serving form of a mixture
    /// trained AdaMix-style (`router = "random"`, `shared_init = true`), at one adapter's
    /// cost and without a router. Heads saved with the mixture are copied.
    MergeExperts {
        /// The mixture's adapter folder.
        dir: PathBuf,
        /// The base model it belongs to (checked).
        #[arg(long)]
        model: PathBuf,
        /// The folder to write (must not exist yet, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the adapter a hypernetwork (hyper_bn) generates for one task, or a mixture of
    /// its tasks, as a plain Pfeiffer (seq_bn) adapter folder that computes the same function:
    /// it loads, merges, serves and converts like any other. Heads are copied.
    HyperExport {
        /// The hypernetwork's adapter folder.
        dir: PathBuf,
        /// The base model it belongs to (checked).
        #[arg(long)]
        model: PathBuf,
        /// A task name, or a mixture of tasks: 'vader_tweets:0.5,rotten_tomatoes:0.5'.
        #[arg(long)]
        task: String,
        /// The folder to write (must not exist yet, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
    /// Show which experts each token chose, per layer, in the loaded mixture-of-experts
    /// adapters (moe_bn, moe_lora).
    Route {
        model: PathBuf,
        #[arg(required = true)]
        texts: Vec<String>,
        /// The task id to route by (mixtures with `routing = "task"`).
        #[arg(long)]
        task_id: Option<u32>,
        /// Print JSON: [{"text", "tokens", "experts": {point: [[expert, ...] per token]}}].
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        adapters: AdapterArgs,
    },
    /// Train adapters (and heads) from a TOML config: see examples/ and the README.
    Train {
        /// The config file (model, adapters, tasks, training, output).
        config: PathBuf,
        /// Override a config value: `training.lr=5e-4`, `training.mode="head_only"`,
        /// `output.dir="runs/x"` (dotted key, TOML value). Repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue from the checkpoint in the output folder.
        #[arg(long)]
        resume: bool,
        /// Stop after this many steps in total (a checkpoint is written; --resume continues).
        #[arg(long, value_name = "STEPS")]
        stop_after: Option<usize>,
    },
    /// Classify texts with a trained head (found in heads/ of the model or adapter folders).
    Predict {
        model: PathBuf,
        #[arg(required = true)]
        texts: Vec<String>,
        /// The task: picks its head and, for hypernetwork adapters (hyper_bn), the adapter
        /// they generate. A hypernetwork also takes a mixture of its tasks,
        /// 'vader_tweets:0.5,rotten_tomatoes:0.5' (choose the head with --head).
        #[arg(long)]
        task: Option<String>,
        /// The task whose head classifies, when it is not --task (a task mixture).
        #[arg(long)]
        head: Option<String>,
        /// For hypernetworks: generate from this vector of the task-embedding space (a JSON
        /// array, e.g. one a caller learned or composed) instead of --task's embedding.
        #[arg(long, conflicts_with = "task")]
        conditioning: Option<String>,
        /// Longer texts are truncated to this many tokens.
        #[arg(long, default_value_t = 128)]
        max_length: usize,
        /// Print JSON: [{"text", "label", "scores": {label: probability}}].
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        adapters: AdapterArgs,
    },
    /// Evaluate on a file: accuracy and macro-F1 with a trained head (.jsonl / .csv), or
    /// perplexity of a decoder on plain text (.txt, blank-line separated documents).
    Eval {
        model: PathBuf,
        /// The data file.
        #[arg(long)]
        data: PathBuf,
        /// The task: picks its head and, for hypernetwork adapters (hyper_bn), the adapter
        /// they generate. A hypernetwork also takes a mixture of its tasks,
        /// 'vader_tweets:0.5,rotten_tomatoes:0.5' (choose the head with --head).
        #[arg(long)]
        task: Option<String>,
        /// The task whose head classifies, when it is not --task (a task mixture).
        #[arg(long)]
        head: Option<String>,
        /// For hypernetworks: generate from this vector of the task-embedding space (a JSON
        /// array, e.g. one a caller learned or composed) instead of --task's embedding.
        #[arg(long, conflicts_with = "task")]
        conditioning: Option<String>,
        #[arg(long, default_value = "text")]
        text_field: String,
        #[arg(long, default_value = "label")]
        label_field: String,
        /// Skip bad rows instead of failing.
        #[arg(long)]
        skip_bad_rows: bool,
        /// Token limit per text (classification) or block length (perplexity).
        #[arg(long, default_value_t = 128)]
        max_length: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        robustness: train_commands::Robustness,
        #[command(flatten)]
        adapters: AdapterArgs,
    },
    /// Store an adapter folder (or a setup folder: adapter_setup.json with one subfolder
    /// per adapter) in the adapter library as a new immutable version of NAME, tagged
    /// `latest` (and --tag). Unknown kinds and broken folders are refused before anything
    /// is uploaded; with --model it must also load onto that model.
    Push {
        /// The adapter or setup folder.
        dir: PathBuf,
        /// The adapter's name in the library (letters, digits, `.`, `_`, `-`).
        #[arg(long)]
        name: String,
        /// Also point this tag at the new version (`prod`, `canary`, ...). Repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Check that it loads onto this base model (and record the model's fingerprint).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The training run it came from, recorded in the manifest.
        #[arg(long)]
        run: Option<String>,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Download a stored version into a new folder: NAME (latest), NAME@TAG or
    /// NAME@VERSION (a unique prefix of 4+ digits will do). Files are hash-checked.
    Pull {
        reference: String,
        /// The folder to write (must not exist yet, or be empty).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List the library's adapters (or one), with versions, tags, kinds and sizes.
    List {
        name: Option<String>,
        /// Print JSON (the manifests and their tags).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Point TAG of an adapter at the version REFERENCE names (`adapters tag sms@3f9a prod`).
    Tag {
        reference: String,
        tag: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Serve MODEL and the adapters of the library over HTTP (OpenAI-style endpoints).
    /// Adapters load on first use (`"model": "NAME@TAG"`), stay in an LRU cache, and
    /// report per-adapter Prometheus metrics at /metrics. Ctrl-C or SIGTERM drains and stops.
    Serve {
        model: PathBuf,
        #[command(flatten)]
        store: StoreArg,
        /// Address to listen on. 0.0.0.0 accepts other machines, and then an admin token is
        /// required (or --insecure-admin).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Most adapters resident at once.
        #[arg(long, default_value_t = 64)]
        max_adapters: usize,
        /// Most bytes of resident adapters.
        #[arg(long, default_value_t = 2 << 30)]
        max_adapter_bytes: u64,
        /// Bearer token required by /admin/* (load, unload, pin, tag, routes). Prefer the
        /// environment variable (a Kubernetes Secret) to the flag, which `ps` shows. Without
        /// one, admin is open, so the server then listens on loopback only.
        #[arg(long, env = "ADAPTERS_ADMIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
        admin_token: Option<adapters_serve::admin::AdminToken>,
        /// Listen off loopback with /admin/* open, for when something in front (a proxy, a
        /// network policy) already guards it. Logged as a warning at start and every 10 minutes.
        #[arg(long)]
        insecure_admin: bool,
        /// Where downloaded adapter versions are kept (default: $ADAPTERS_CACHE or ~/.cache/adapters).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Forward passes run at once; more requests wait in a queue.
        #[arg(long, default_value_t = 2)]
        max_concurrent: usize,
        /// Seconds a tag's resolution is reused before asking the store again.
        #[arg(long, default_value_t = 5)]
        tag_ttl: u64,
        /// A/B routes, JSON: `{"ROUTE": [{"adapter": "NAME@VERSION", "weight": 90}, ...]}`;
        /// a request for ROUTE goes to a variant by weight (sticky per `user`).
        #[arg(long)]
        routes: Option<PathBuf>,
        /// Most rows in one forward pass, each through its own adapter: texts of embedding and
        /// classification requests waiting together, or generations decoding together
        /// (continuous batching). 0 turns batching off: each request alone.
        #[arg(long, default_value_t = 32)]
        batch_rows: usize,
        /// Milliseconds a batch waits for more requests once a compute slot is free.
        #[arg(long, default_value_t = 2)]
        batch_wait_ms: u64,
        /// Requests in flight (waiting or running, every endpoint) before new ones get 503
        /// with Retry-After.
        #[arg(long, default_value_t = adapters_serve::admission::Limits::default().max_requests)]
        max_concurrent_requests: usize,
        /// Tokens waiting for compute before new requests get 503 (one larger than this alone
        /// gets 413): texts of embedding and classification requests until their forward pass,
        /// prompt + max_tokens of generations until they join the decoding batch. About what
        /// the machine gets through in --request-timeout.
        #[arg(long, default_value_t = adapters_serve::admission::Limits::default().max_waiting_tokens)]
        max_waiting_tokens: usize,
        /// KV-cache tokens (prompt + max_tokens) of the generations decoding together; more
        /// wait. Default: a quarter of the memory available at start, at the model's bytes per
        /// token (SmolLM2-135M: 46 KB).
        #[arg(long)]
        max_kv_tokens: Option<usize>,
        /// Seconds a request may take before it is answered 503 (a streamed generation: until
        /// its first token). Keep it under the clients' and the load balancer's time-outs.
        #[arg(long, default_value_t = adapters_serve::admission::Limits::default().request_timeout.as_secs())]
        request_timeout: u64,
        /// On SIGTERM: seconds /ready answers 503 while requests are still served, so the load
        /// balancer stops sending (longer than its readiness check interval).
        #[arg(long, default_value_t = adapters_serve::Config::default().drain.as_secs())]
        drain_seconds: u64,
        /// Then: seconds requests in flight get to finish before open streams are ended with
        /// a final event.
        #[arg(long, default_value_t = adapters_serve::Config::default().shutdown_timeout.as_secs())]
        shutdown_timeout: u64,
    },
    /// Remove a stored version (NAME@VERSION or NAME@TAG), or with --tag one tag of NAME.
    /// A version that tags point to stays unless --force (which removes those tags too).
    Rm {
        reference: String,
        /// Remove this tag of the adapter instead of a version.
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        store: StoreArg,
    },
}

/// Runs the `adapters` command line on this process's arguments, with the families of
/// `adapters-families` linked (and any the calling binary linked itself).
pub fn main() {
    adapters_families::link();
    adapters_kernels::tune_cpu_runtime();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Kinds => commands::kinds(),
        Command::Info { model, json } => commands::info(&model, json),
        Command::Embed { model, texts, json, adapters } => commands::embed(&model, &adapters, &texts, json),
        Command::Similarity { model, texts, adapters } => commands::similarity(&model, &adapters, &texts),
        Command::Generate { model, prompt, max_tokens, greedy, temperature, top_p, seed, chat, adapters } => {
            let sampling = if greedy {
                adapters_models::generate::Sampling::Greedy
            } else {
                adapters_models::generate::Sampling::Sample { temperature, top_p, seed }
            };
            commands::generate(&model, &adapters, &prompt, max_tokens, &sampling, chat)
        }
        Command::Logits { model, prompt, top, chat, json, adapters } => commands::logits(&model, &adapters, &prompt, top, chat, json),
        Command::New { kind, model, out, set, name, seed, format } => adapter_commands::new(&kind, &model, &out, &set, name, seed, format),
        Command::Inspect { dir, model } => adapter_commands::inspect(&dir, model.as_deref()),
        Command::Convert { dir, model, format, out } => adapter_commands::convert(&dir, &model, format, &out),
        Command::Merge { model, adapters, out } => adapter_commands::merge(&model, &AdapterArgs::stacked(&adapters), &out),
        Command::Average { model, adapters, weights, method, density, rank, clamp, majority_sign, seed, format, name, out } => {
            let majority_sign = if majority_sign == "frequency" { merge::MajoritySign::Frequency } else { merge::MajoritySign::Total };
            average_command::average(average_command::Request {
                model: &model,
                dirs: &adapters,
                weights: weights.as_deref(),
                method: &method,
                options: merge::Options { density, rank, clamp, majority_sign, seed },
                format,
                name,
                out: &out,
            })
        }
        Command::MergeExperts { dir, model, out } => adapter_commands::merge_experts(&dir, &model, &out),
        Command::HyperExport { dir, model, task, out } => adapter_commands::hyper_export(&dir, &model, &task, &out),
        Command::Route { model, texts, task_id, json, adapters } => commands::route(&model, &adapters, &texts, task_id, json),
        Command::Train { config, set, resume, stop_after } => train_commands::train(&config, &set, resume, stop_after),
        Command::Predict { model, texts, task, head, conditioning, max_length, json, adapters } => {
            train_commands::TaskChoice::parse(task.as_deref(), head.as_deref(), conditioning.as_deref())
                .and_then(|task| train_commands::predict(&model, &adapters, &task, &texts, max_length, json))
        }
        Command::Eval {
            model,
            data,
            task,
            head,
            conditioning,
            text_field,
            label_field,
            skip_bad_rows,
            max_length,
            json,
            robustness,
            adapters,
        } => {
            let fields = adapters_train::data::Fields { text: text_field, label: label_field, skip_bad_rows };
            train_commands::TaskChoice::parse(task.as_deref(), head.as_deref(), conditioning.as_deref())
                .and_then(|task| train_commands::eval(&model, &adapters, &task, &data, fields, max_length, &robustness, json))
        }
        Command::Push { dir, name, tags, model, run, store } => store_commands::push(&dir, &name, &tags, model.as_deref(), run, &store),
        Command::Pull { reference, out, store } => store_commands::pull(&reference, &out, &store),
        Command::List { name, json, store } => store_commands::list(name.as_deref(), json, &store),
        Command::Tag { reference, tag, store } => store_commands::tag(&reference, &tag, &store),
        Command::Serve {
            model,
            store,
            host,
            port,
            max_adapters,
            max_adapter_bytes,
            admin_token,
            insecure_admin,
            cache_dir,
            max_concurrent,
            tag_ttl,
            routes,
            batch_rows,
            batch_wait_ms,
            max_concurrent_requests,
            max_waiting_tokens,
            max_kv_tokens,
            request_timeout,
            drain_seconds,
            shutdown_timeout,
        } => {
            let routes = match routes.map(|r| adapters_serve::routes::Routes::load(&r)).transpose() {
                Ok(r) => r.unwrap_or_default(),
                Err(e) => {
                    eprintln!("error: --routes {e}");
                    std::process::exit(1);
                }
            };
            let config = adapters_serve::Config {
                routes,
                cache_dir: cache_dir.unwrap_or_else(adapters_store::default_cache_dir),
                limits: adapters_serve::cache::Limits { max_adapters, max_bytes: max_adapter_bytes },
                admin_token,
                insecure_admin,
                tag_ttl: std::time::Duration::from_secs(tag_ttl),
                max_concurrent,
                batching: adapters_serve::Batching { max_rows: batch_rows, max_wait: std::time::Duration::from_millis(batch_wait_ms) },
                admission: adapters_serve::admission::Limits {
                    max_requests: max_concurrent_requests,
                    max_waiting_tokens,
                    max_kv_tokens,
                    request_timeout: std::time::Duration::from_secs(request_timeout),
                },
                drain: std::time::Duration::from_secs(drain_seconds),
                shutdown_timeout: std::time::Duration::from_secs(shutdown_timeout),
                ..Default::default()
            };
            serve_command::serve(&model, &store, &host, port, config)
        }
        Command::Rm { reference, tag, force, store } => store_commands::rm(&reference, tag.as_deref(), force, &store),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
