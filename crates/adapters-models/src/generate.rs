//! Text generation with a KV cache: greedy or sampled (temperature, top-p) decoding.

use crate::llama::Llama;
use adapters_core::ForwardCtx;
use candle_core::{Result, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub enum Sampling {
    /// Always the most likely token.
    Greedy,
    /// Softmax(logits / temperature), restricted to the smallest set of tokens whose
    /// probability reaches `top_p`, drawn with a seeded generator.
    Sample {
        /// Divides the logits; below 1 sharpens, above 1 flattens.
        temperature: f64,
        /// The probability mass kept (nucleus sampling).
        top_p: f64,
        /// Seed of the generator that draws tokens.
        seed: u64,
    },
}

/// Generates up to `max_tokens` tokens after `prompt`, calling `on_token` with each new
/// token as it is produced (an error from it stops generation and is returned); stops
/// early at any of `stop_ids`. Returns the new tokens.
pub fn generate<E: From<crate::Error>>(
    model: &Llama,
    prompt: &[u32],
    max_tokens: usize,
    sampling: &Sampling,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> std::result::Result<(), E>,
) -> std::result::Result<Vec<u32>, E> {
    if prompt.is_empty() {
        return Err(crate::Error::Invalid("the prompt is empty".into()).into());
    }
    let step = |r: Result<Tensor>| r.map_err(|e| E::from(crate::Error::from(e)));
    let ctx = ForwardCtx::inference();
    let mut cache = model.new_cache();
    let mut rng = match sampling {
        Sampling::Sample { seed, .. } => ChaCha8Rng::seed_from_u64(*seed),
        Sampling::Greedy => ChaCha8Rng::seed_from_u64(0),
    };
    let mut input = step(Tensor::new(prompt, model.device()).and_then(|t| t.unsqueeze(0)))?;
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let logits = step(model.last_logits(&input, Some(&mut cache), &ctx).and_then(|l| l.squeeze(0)))?;
        let next = choose(&logits, sampling, &mut rng).map_err(|e| E::from(crate::Error::from(e)))?;
        out.push(next);
        on_token(next)?;
        if stop_ids.contains(&next) {
            break;
        }
        input = step(Tensor::new(&[next], model.device()).and_then(|t| t.unsqueeze(0)))?;
    }
    Ok(out)
}

/// Picks the next token from `[vocab]` logits.
pub fn choose(logits: &Tensor, sampling: &Sampling, rng: &mut ChaCha8Rng) -> Result<u32> {
    match sampling {
        Sampling::Greedy => logits.argmax(D::Minus1)?.to_scalar::<u32>(),
        Sampling::Sample { temperature, top_p, .. } => {
            let probs = candle_nn::ops::softmax_last_dim(&(logits / temperature.max(1e-5))?)?.to_vec1::<f32>()?;
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let mut kept = Vec::new();
            let mut mass = 0.0f64;
            for i in order {
                kept.push(i);
                mass += probs[i] as f64;
                if mass >= *top_p {
                    break;
                }
            }
            let mut r = rng.random::<f64>() * mass;
            for &i in &kept {
                r -= probs[i] as f64;
                if r <= 0.0 {
                    return Ok(i as u32);
                }
            }
            Ok(*kept.last().expect("at least one token is kept") as u32)
        }
    }
}
