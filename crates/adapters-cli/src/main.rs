//! `adapters`: inspect models and adapter kinds, embed text, generate, read logits.

mod commands;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
        adapters logits models/SmolLM2-135M-Instruct.Q4_1.gguf \"The capital of France is\" --top 5 --json"
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
    },
    /// Cosine similarity between every pair of texts, from their embeddings.
    Similarity {
        model: PathBuf,
        /// Two or more texts.
        #[arg(required = true, num_args = 2..)]
        texts: Vec<String>,
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
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Kinds => commands::kinds(),
        Command::Info { model, json } => commands::info(&model, json),
        Command::Embed { model, texts, json } => commands::embed(&model, &texts, json),
        Command::Similarity { model, texts } => commands::similarity(&model, &texts),
        Command::Generate { model, prompt, max_tokens, greedy, temperature, top_p, seed, chat } => {
            let sampling = if greedy {
                adapters_models::generate::Sampling::Greedy
            } else {
                adapters_models::generate::Sampling::Sample { temperature, top_p, seed }
            };
            commands::generate(&model, &prompt, max_tokens, &sampling, chat)
        }
        Command::Logits { model, prompt, top, chat, json } => commands::logits(&model, &prompt, top, chat, json),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
