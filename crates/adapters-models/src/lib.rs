//! Backbones with adapter insertion points: BERT-family encoders (BERT, RoBERTa, XLM-R,
//! DistilBERT) and Llama-family decoders (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3),
//! loaded from their original files by their original tensor names, with tokenizers,
//! heads and generation.
//!
//! Both backbones are our own code so that every sublayer and projection calls its
//! model's [`adapters_core::AdapterSet`], and so that training gradients flow through
//! differentiable ops (see [`ops`]).

#![warn(missing_docs)]

mod attached;
pub mod bert;
mod checkpoint;
mod error;
pub mod generate;
pub mod head_interop;
pub mod heads;
pub mod llama;
pub mod model;
pub mod ops;
pub mod packed;
pub mod saved_heads;
pub mod tokenizer;
pub mod weights;

pub use attached::HoldsAdapters;
pub use bert::{Bert, BertConfig, EncoderArch};
pub use error::{Error, Result};
pub use llama::{DecoderArch, KvCache, Llama, LlamaConfig};
pub use model::{
    fetched, length_batches, load, load_with, models_dir, sentence_embeddings, Backbone, BaseWeights, LoadedModel, MAX_BATCH_TOKENS,
};
pub use tokenizer::{Message, TextTokenizer};
