//! A task's data, tokenized once: labelled texts for classification, fixed-length token
//! blocks for causal language modelling, conversations with their assistant tokens marked
//! for chat; and the seeded order of its batches.

use crate::config::{TaskConfig, TaskType};
use crate::data::{check_labels, read_labelled, read_text, Fields};
use crate::error::{fail, Result, Within};
use adapters_models::TextTokenizer;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::path::Path;

/// Token ids per row, and the label index per row (classification only).
#[derive(Clone, Debug, Default)]
pub struct Split {
    pub ids: Vec<Vec<u32>>,
    pub labels: Vec<u32>,
    /// Chat only: per row, 1 on the tokens the loss predicts (the assistant's), 0 elsewhere.
    pub loss_mask: Vec<Vec<u32>>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// The first `limit` rows.
    pub fn limit(mut self, limit: Option<usize>) -> Split {
        if let Some(n) = limit {
            self.ids.truncate(n);
            self.labels.truncate(n);
            self.loss_mask.truncate(n);
        }
        self
    }
}

/// A task's splits, ready for batching.
pub struct TaskData {
    /// Label names in index order (empty for language modelling).
    pub labels: Vec<String>,
    pub train: Split,
    pub dev: Option<Split>,
    pub test: Option<Split>,
    /// Rows skipped as bad, per split, when the task allows skipping.
    pub skipped: usize,
}

/// Reads and tokenizes a task's files.
pub fn load(task: &TaskConfig, tokenizer: &TextTokenizer, max_length: usize, is_encoder: bool) -> Result<TaskData> {
    if max_length < 2 {
        fail!(Data, "`model.max_length` must be at least 2");
    }
    if task.train_limit == Some(0) {
        fail!(Data, "task `{}`: `train_limit` must be at least 1 (or left out to train on every row)", task.name);
    }
    match task.kind {
        TaskType::Classification => load_labelled(task, tokenizer, max_length, is_encoder),
        TaskType::Chat if is_encoder => {
            fail!(Data, "task `{}`: chat needs a decoder model (Llama family) with a chat template; this model is an encoder", task.name)
        }
        TaskType::Chat => load_chats(task, tokenizer, max_length),
        TaskType::CausalLm => {
            if is_encoder {
                fail!(Data, "task `{}`: causal_lm needs a decoder model (Llama family); this model is an encoder", task.name);
            }
            let eos = tokenizer.eos_token.as_deref().and_then(|t| tokenizer.token_id(t));
            let blocks = |path: &Path| -> Result<Split> {
                let docs = read_text(path)?;
                let mut stream = Vec::new();
                for d in &docs {
                    stream.extend(tokenizer.encode(d, false)?);
                    stream.extend(eos);
                }
                let ids: Vec<Vec<u32>> = stream.chunks_exact(max_length).map(<[u32]>::to_vec).collect();
                if ids.is_empty() {
                    fail!(Data, "{}: fewer than {max_length} tokens, not one block of `model.max_length`", path.display());
                }
                Ok(Split { ids, ..Default::default() })
            };
            Ok(TaskData {
                labels: Vec::new(),
                train: blocks(&task.train)?.limit(task.train_limit),
                dev: task.dev.as_deref().map(blocks).transpose()?.map(|s| s.limit(task.eval_limit)),
                test: task.test.as_deref().map(blocks).transpose()?.map(|s| s.limit(task.eval_limit)),
                skipped: 0,
            })
        }
    }
}

/// Conversations rendered with the model's chat template, cut to `max_length`; rows left
/// with no assistant token are dropped and counted.
fn load_chats(task: &TaskConfig, tokenizer: &TextTokenizer, max_length: usize) -> Result<TaskData> {
    let mut skipped = 0;
    let mut read = |path: &Path| -> Result<Split> {
        let mut split = Split::default();
        for messages in crate::data::read_chats(path)? {
            let (ids, mut mask) = chat_tokens(tokenizer, &messages).within(|| format!("{}", path.display()))?;
            // A decoder keeps the start of the conversation (no end token to keep).
            let ids = adapters_models::tokenizer::truncate_ids(ids, max_length, false);
            mask.truncate(ids.len());
            if mask.iter().skip(1).all(|&m| m == 0) {
                skipped += 1;
                continue;
            }
            split.ids.push(ids);
            split.loss_mask.push(mask);
        }
        if split.ids.is_empty() {
            fail!(Data, "{}: no conversation has an assistant token within `model.max_length` = {max_length}", path.display());
        }
        Ok(split)
    };
    let train = read(&task.train)?.limit(task.train_limit);
    let dev = task.dev.as_deref().map(&mut read).transpose()?.map(|s| s.limit(task.eval_limit));
    let test = task.test.as_deref().map(&mut read).transpose()?.map(|s| s.limit(task.eval_limit));
    Ok(TaskData { labels: Vec::new(), train, dev, test, skipped })
}

/// A conversation's tokens under the chat template, and a mask with 1 on each assistant
/// message's tokens (its content and end-of-turn marker: what the model must produce
/// after the template's generation prompt).
pub fn chat_tokens(tokenizer: &TextTokenizer, messages: &[adapters_models::Message]) -> Result<(Vec<u32>, Vec<u32>)> {
    let render = |upto: usize, prompt: bool| -> Result<Vec<u32>> {
        Ok(tokenizer.encode(&tokenizer.apply_chat_template(&messages[..upto], prompt)?, false)?)
    };
    let ids = render(messages.len(), false)?;
    let mut mask = vec![0u32; ids.len()];
    for (k, _) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
        let (before, through) = (render(k, true)?, render(k + 1, false)?);
        if !ids.starts_with(&through) || !through.starts_with(&before) {
            fail!(
                Data,
                "the chat template does not render message {} as a continuation of the ones before it, so its tokens cannot be marked",
                k + 1
            );
        }
        mask[before.len()..through.len()].iter_mut().for_each(|m| *m = 1);
    }
    Ok((ids, mask))
}

fn load_labelled(task: &TaskConfig, tokenizer: &TextTokenizer, max_length: usize, is_encoder: bool) -> Result<TaskData> {
    let fields = Fields { text: task.text_field.clone(), label: task.label_field.clone(), skip_bad_rows: task.skip_bad_rows };
    // `label_map` renames labels as they are read, so every split sees the new names.
    let read = |path: &Path| -> Result<crate::data::Read> {
        let mut read = read_labelled(path, &fields)?;
        for e in &mut read.examples {
            if let Some(to) = task.label_map.as_ref().and_then(|m| m.get(&e.label)) {
                e.label = to.clone();
            }
        }
        Ok(read)
    };
    let train = read(&task.train)?;
    if train.examples.is_empty() {
        fail!(Data, "{}: no examples", task.train.display());
    }
    let known: BTreeSet<String> = train.examples.iter().map(|e| e.label.clone()).collect();
    if known.len() < 2 {
        fail!(Data, "{}: only one label ({}); classification needs at least two", task.train.display(), known.iter().next().unwrap());
    }
    let labels: Vec<String> = known.iter().cloned().collect();
    let mut skipped = train.skipped;
    let encode = |path: &Path, examples: Vec<crate::data::Example>| -> Result<Split> {
        check_labels(path, &examples, &known)?;
        let mut split = Split::default();
        for e in examples {
            split.ids.push(encode_truncated(tokenizer, &e.text, max_length, is_encoder)?);
            split.labels.push(labels.binary_search(&e.label).expect("checked above") as u32);
        }
        Ok(split)
    };
    let train_split = encode(&task.train, train.examples)?.limit(task.train_limit);
    let mut other = |path: &Option<std::path::PathBuf>| -> Result<Option<Split>> {
        let Some(path) = path else { return Ok(None) };
        let read = read(path)?;
        skipped += read.skipped;
        encode(path, read.examples).map(Some)
    };
    let dev = other(&task.dev)?.map(|s| s.limit(task.eval_limit));
    let test = other(&task.test)?.map(|s| s.limit(task.eval_limit));
    Ok(TaskData { labels, train: train_split, dev, test, skipped })
}

/// Token ids of a text for classification, cut to `max_length` (keeping an encoder's
/// closing special token, `[SEP]`).
pub fn encode_truncated(tokenizer: &TextTokenizer, text: &str, max_length: usize, is_encoder: bool) -> Result<Vec<u32>> {
    Ok(adapters_models::tokenizer::truncate_ids(tokenizer.encode(text, is_encoder)?, max_length, is_encoder))
}

/// The batches of one epoch: a seeded shuffle, then (with `group`) rows of similar length
/// grouped into the same batch (within windows of 50 batches) to save padding, then the
/// batches shuffled again. Deterministic in (seed, task, epoch), so a resumed run sees the
/// same.
pub fn epoch_batches(lengths: &[usize], batch_size: usize, group: bool, seed: u64, task: usize, epoch: usize) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(&[seed, task as u64, epoch as u64, salt::EPOCH_ORDER]));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    if !group {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches = Vec::new();
    for window in order.chunks_mut(batch_size * 50) {
        window.sort_by_key(|&i| lengths[i]);
        batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Evaluation order: rows sorted by length, in batches.
pub fn sorted_batches(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    order.chunks(batch_size).map(<[usize]>::to_vec).collect()
}

/// The salts that keep a run's random streams apart: each is mixed with the run's seed
/// (and the step, task or epoch), so that changing how one stream is drawn never shifts
/// another. The values are arbitrary but fixed: changing one changes every run.
pub mod salt {
    /// A new adapter's initial weights.
    pub const ADAPTER_INIT: u64 = 0xada;
    /// A new classification head's initial weights.
    pub const HEAD_INIT: u64 = 0x4ead;
    /// Which task a multi-task step samples.
    pub const TASK_CHOICE: u64 = 0x7a5c;
    /// A step's dropout masks and other training-time randomness.
    pub const DROPOUT: u64 = 0xd209;
    /// The order of an epoch's batches.
    pub const EPOCH_ORDER: u64 = 0xba7c;
}

/// Mixes numbers into one seed (splitmix64 steps).
pub fn mix(parts: &[u64]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &p in parts {
        h ^= p.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_add(h << 6).wrapping_add(h >> 2);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_cover_every_row_once_and_repeat_with_the_seed() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 101).collect();
        let a = epoch_batches(&lengths, 32, true, 7, 0, 0);
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_batches(&lengths, 32, true, 7, 0, 0));
        assert_ne!(a, epoch_batches(&lengths, 32, true, 7, 0, 1));
        // Grouping by length: the mean spread inside a batch is far below random batches'.
        let spread: usize =
            a.iter().map(|b| b.iter().map(|&i| lengths[i]).max().unwrap() - b.iter().map(|&i| lengths[i]).min().unwrap()).sum();
        assert!(spread / a.len() < 20, "{}", spread / a.len());
    }
}
