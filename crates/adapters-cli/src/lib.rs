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
    Info(commands::InfoArgs),
    /// Sentence embeddings: mean-pooled over tokens, L2-normalised.
    Embed(commands::EmbedArgs),
    /// Cosine similarity between every pair of texts, from their embeddings.
    Similarity(commands::SimilarityArgs),
    /// Generate text after a prompt with a decoder model, streaming tokens as they come.
    Generate(commands::GenerateArgs),
    /// The top K next-token logits at the last position of a prompt (decoder models).
    Logits(commands::LogitsArgs),
    /// Create a freshly initialised adapter of any registered kind and save it.
    New(adapter_commands::NewArgs),
    /// Rewrite an adapter folder in another layout: ours (`native`), PEFT (LoRA) or
    /// AdapterHub (bottleneck kinds and fusion layers), e.g. to hand it to Python users,
    /// with its classification heads in that layout (AdapterHub's `with_head=True` heads,
    /// PEFT's `SEQ_CLS` classifier). The model is the one the adapter was made for (checked).
    Convert(adapter_commands::ConvertArgs),
    /// Show an adapter folder (ours, PEFT or AdapterHub): kind, placement, parameters,
    /// base model, and with --model whether it fits that model.
    Inspect(adapter_commands::InspectArgs),
    /// Merge LoRA adapters into the base weights and write a new model folder.
    Merge(adapter_commands::MergeArgs),
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
    Average(average_command::AverageArgs),
    /// Turn a mixture-of-experts adapter (moe_bn, moe_lora) into one plain adapter (seq_bn,
    /// lora) whose weights are the mean of its experts': the serving form of a mixture
    /// trained AdaMix-style (`router = "random"`, `shared_init = true`), at one adapter's
    /// cost and without a router. Heads saved with the mixture are copied.
    MergeExperts(adapter_commands::MergeExpertsArgs),
    /// Write the adapter a hypernetwork (hyper_bn) generates for one task, or a mixture of
    /// its tasks, as a plain Pfeiffer (seq_bn) adapter folder that computes the same function:
    /// it loads, merges, serves and converts like any other. Heads are copied.
    HyperExport(adapter_commands::HyperExportArgs),
    /// Show which experts each token chose, per layer, in the loaded mixture-of-experts
    /// adapters (moe_bn, moe_lora).
    Route(commands::RouteArgs),
    /// Train adapters (and heads) from a TOML config: see examples/ and the README.
    Train(train_commands::TrainArgs),
    /// Classify texts with a trained head (found in heads/ of the model or adapter folders).
    Predict(train_commands::PredictArgs),
    /// Evaluate on a file: accuracy and macro-F1 with a trained head (.jsonl / .csv), or
    /// perplexity of a decoder on plain text (.txt, blank-line separated documents).
    Eval(train_commands::EvalArgs),
    /// Store an adapter folder (or a setup folder: adapter_setup.json with one subfolder
    /// per adapter) in the adapter library as a new immutable version of NAME, tagged
    /// `latest` (and --tag). Unknown kinds and broken folders are refused before anything
    /// is uploaded; with --model it must also load onto that model.
    Push(store_commands::PushArgs),
    /// Download a stored version into a new folder: NAME (latest), NAME@TAG or
    /// NAME@VERSION (a unique prefix of 4+ digits will do). Files are hash-checked.
    Pull(store_commands::PullArgs),
    /// List the library's adapters (or one), with versions, tags, kinds and sizes.
    List(store_commands::ListArgs),
    /// Point TAG of an adapter at the version REFERENCE names (`adapters tag sms@3f9a prod`).
    Tag(store_commands::TagArgs),
    /// Serve MODEL and the adapters of the library over HTTP (OpenAI-style endpoints).
    /// Adapters load on first use (`"model": "NAME@TAG"`), stay in an LRU cache, and
    /// report per-adapter Prometheus metrics at /metrics. Ctrl-C or SIGTERM drains and stops.
    Serve(serve_command::ServeArgs),
    /// Remove a stored version (NAME@VERSION or NAME@TAG), or with --tag one tag of NAME.
    /// A version that tags point to stays unless --force (which removes those tags too).
    Rm(store_commands::RmArgs),
}

/// Runs the `adapters` command line on this process's arguments, with the families of
/// `adapters-families` linked (and any the calling binary linked itself).
pub fn main() {
    adapters_families::link();
    adapters_kernels::tune_cpu_runtime();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Kinds => commands::kinds(),
        Command::Info(commands::InfoArgs { model, json }) => commands::info(&model, json),
        Command::Embed(commands::EmbedArgs { model, texts, json, max_batch_tokens, base, adapters }) => {
            commands::embed(&model, &adapters, &base, &texts, json, max_batch_tokens)
        }
        Command::Similarity(commands::SimilarityArgs { model, texts, adapters }) => commands::similarity(&model, &adapters, &texts),
        Command::Generate(commands::GenerateArgs { model, prompt, max_tokens, greedy, temperature, top_p, seed, chat, adapters }) => {
            let sampling = if greedy {
                adapters_models::generate::Sampling::Greedy
            } else {
                adapters_models::generate::Sampling::Sample { temperature, top_p, seed }
            };
            commands::generate(&model, &adapters, &prompt, max_tokens, &sampling, chat)
        }
        Command::Logits(commands::LogitsArgs { model, prompt, top, chat, json, adapters }) => {
            commands::logits(&model, &adapters, &prompt, top, chat, json)
        }
        Command::New(adapter_commands::NewArgs { kind, model, out, set, name, seed, format }) => {
            adapter_commands::new(&kind, &model, &out, &set, name, seed, format)
        }
        Command::Inspect(adapter_commands::InspectArgs { dir, model }) => adapter_commands::inspect(&dir, model.as_deref()),
        Command::Convert(args) => adapter_commands::convert(&args.dir, &args.model, args.format, &args.out, args.heads()),
        Command::Merge(adapter_commands::MergeArgs { model, adapters, out }) => {
            adapter_commands::merge(&model, &AdapterArgs::stacked(&adapters), &out)
        }
        Command::Average(average_command::AverageArgs {
            model,
            adapters,
            weights,
            method,
            density,
            rank,
            clamp,
            majority_sign,
            seed,
            format,
            name,
            out,
        }) => {
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
        Command::MergeExperts(adapter_commands::MergeExpertsArgs { dir, model, out }) => {
            adapter_commands::merge_experts(&dir, &model, &out)
        }
        Command::HyperExport(adapter_commands::HyperExportArgs { dir, model, task, out }) => {
            adapter_commands::hyper_export(&dir, &model, &task, &out)
        }
        Command::Route(commands::RouteArgs { model, texts, task_id, json, adapters }) => {
            commands::route(&model, &adapters, &texts, task_id, json)
        }
        Command::Train(train_commands::TrainArgs { config, set, resume, stop_after }) => {
            train_commands::train(&config, &set, resume, stop_after)
        }
        Command::Predict(train_commands::PredictArgs { model, texts, task, head, conditioning, max_length, json, base, adapters }) => {
            train_commands::TaskChoice::parse(task.as_deref(), head.as_deref(), conditioning.as_deref())
                .and_then(|task| train_commands::predict(&model, &adapters, &base, &task, &texts, max_length, json))
        }
        Command::Eval(train_commands::EvalArgs {
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
            base,
            adapters,
        }) => {
            let fields = adapters_train::data::Fields { text: text_field, label: label_field, skip_bad_rows };
            train_commands::TaskChoice::parse(task.as_deref(), head.as_deref(), conditioning.as_deref())
                .and_then(|task| train_commands::eval(&model, &adapters, &base, &task, &data, fields, max_length, &robustness, json))
        }
        Command::Push(store_commands::PushArgs { dir, name, tags, model, run, store }) => {
            store_commands::push(&dir, &name, &tags, model.as_deref(), run, &store)
        }
        Command::Pull(store_commands::PullArgs { reference, out, store }) => store_commands::pull(&reference, &out, &store),
        Command::List(store_commands::ListArgs { name, json, store }) => store_commands::list(name.as_deref(), json, &store),
        Command::Tag(store_commands::TagArgs { reference, tag, store }) => store_commands::tag(&reference, &tag, &store),
        Command::Serve(serve_command::ServeArgs {
            model,
            base,
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
            max_batch_tokens,
            prefill_chunk,
            batch_wait_ms,
            max_concurrent_requests,
            max_waiting_tokens,
            max_kv_tokens,
            request_timeout,
            drain_seconds,
            shutdown_timeout,
        }) => {
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
                batching: adapters_serve::Batching {
                    max_rows: batch_rows,
                    max_batch_tokens,
                    prefill_chunk,
                    max_wait: std::time::Duration::from_millis(batch_wait_ms),
                },
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
            serve_command::serve(&model, &base, &store, &host, port, config)
        }
        Command::Rm(store_commands::RmArgs { reference, tag, force, store }) => {
            store_commands::rm(&reference, tag.as_deref(), force, &store)
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
