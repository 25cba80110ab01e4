//! The context that flows through one forward pass: down to the sites (training flag,
//! attention mask, per-row adapter choice, task ids, a seeded RNG) and back to the caller
//! (auxiliary losses, routing).

use crate::point::Point;
use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Arc, Mutex, MutexGuard};

/// Rows of a batch that share one adapter setup (a stack of adapter names, applied in order).
#[derive(Clone, Debug)]
pub struct StackRows {
    /// Adapter names applied in order; empty means the base model for these rows.
    pub stack: Vec<String>,
    /// Row indices into the batch (`u32`, on the model's device).
    pub rows: Tensor,
    /// The same indices, on the host.
    pub indices: Vec<u32>,
}

/// An auxiliary loss produced inside the forward pass (e.g. a router's load-balancing loss).
#[derive(Clone, Debug)]
pub struct AuxLoss {
    /// The adapter that produced it.
    pub adapter: String,
    /// Where it was produced.
    pub point: Point,
    /// What it measures (`load_balance`, ...).
    pub name: String,
    /// A scalar tensor, already weighted; the trainer adds it to the loss.
    pub value: Tensor,
}

/// Per-point routing statistics of a mixture-of-experts adapter in one forward pass.
/// Padding tokens are neither routed nor counted.
#[derive(Clone, Debug)]
pub struct RoutingStats {
    /// The kind of adapter that routed (an adapter does not know its name).
    pub adapter: String,
    /// Where it routed.
    pub point: Point,
    /// Tokens sent to each expert (a token routed to k experts counts k times; tokens
    /// dropped by the capacity limit are not counted).
    pub tokens_per_expert: Vec<f32>,
    /// Tokens routed (not padding).
    pub tokens: f32,
    /// Tokens whose router chose no expert (the skip choice): they pass through unchanged.
    pub skipped: f32,
    /// Expert assignments dropped because the expert was full (capacity factor); a token
    /// whose every assignment was dropped passes through unchanged.
    pub overflowed: f32,
    /// `tokens_per_expert` split by task id (`per_task[t]`), when the forward carries task ids.
    pub per_task: Vec<Vec<f32>>,
    /// Per token of the batch (row-major over `[batch, seq]`), the experts it was sent to;
    /// kept only when [`ForwardCtx::record_routing`] is on. Padding tokens have none.
    pub choices: Option<Vec<Vec<u32>>>,
}

/// A fusion layer's attention over its members at one site, from one forward pass.
#[derive(Clone, Debug)]
pub struct FusionAttention {
    /// The fusion layer's name.
    pub fusion: String,
    /// Where.
    pub point: Point,
    /// `[batch, seq, members]`, rows summing to 1, in the members' order.
    pub weights: Tensor,
}

/// What adapters report back from a forward pass.
#[derive(Clone, Debug, Default)]
pub struct AuxOutputs {
    /// Auxiliary losses, in the order they were reported.
    pub losses: Vec<AuxLoss>,
    /// Routing statistics, in the order they were reported.
    pub routing: Vec<RoutingStats>,
    /// Fusion attention weights, when the context asked for them.
    pub fusion_attentions: Vec<FusionAttention>,
}

/// What a forward pass is for: whether training's randomness is on (dropout, noise,
/// stochastic routing) and whether an autograd graph is built through the adapters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Deterministic, with an autograd graph: evaluation whose gradients reach the inputs
    /// (an attack's search on a trained model). The default.
    #[default]
    Evaluation,
    /// Deterministic, no autograd graph: the adapter sites detach their outputs and the
    /// kernels keep nothing for a backward pass.
    Inference,
    /// Training's randomness, with an autograd graph.
    Training,
    /// Training's randomness without an autograd graph: gradient checkpointing's first pass
    /// over a layer, which runs again with a graph for the backward.
    TrainingWithoutGraph,
}

impl Mode {
    /// Whether dropout, noise and stochastic routing are on.
    pub fn is_training(self) -> bool {
        matches!(self, Mode::Training | Mode::TrainingWithoutGraph)
    }

    /// Whether an autograd graph is built through the adapters.
    pub fn builds_graph(self) -> bool {
        matches!(self, Mode::Training | Mode::Evaluation)
    }
}

/// The per-forward context. Cheap to build; one per forward call. A clone shares the
/// reports and the random generator.
#[derive(Clone, Debug, Default)]
pub struct ForwardCtx {
    /// Training or not, and whether an autograd graph is built (see [`Mode`]).
    mode: Mode,
    /// Per-row adapter choice; `None` means every row uses the model's active setup.
    pub rows_by_stack: Option<Vec<StackRows>>,
    /// The attention mask `[batch, seq]` (`u32`, 1 on tokens, 0 on padding), set by the
    /// backbone for its forward so that hidden and projection sites can skip padding
    /// (routing statistics, balance losses); `None` when no row is padded.
    pub attention_mask: Option<Tensor>,
    /// Per-example task ids `[batch]` (`u32`), for hypernetworks and multi-task heads.
    pub task_ids: Option<Tensor>,
    /// Per-example conditioning vectors `[batch, dim]` (task or instance embeddings) from
    /// which hypernetwork adapters generate their weights at call time.
    pub conditioning: Option<Tensor>,
    /// A perturbation `[batch, seq, hidden]` the backbone adds to its token embeddings
    /// before anything else sees them: adversarial training and attacks search it.
    pub embedding_perturbation: Option<Tensor>,
    /// Keep every fusion layer's attention weights in the reports (see
    /// [`ForwardCtx::with_fusion_attentions`]); off by default (they would pile up).
    pub record_fusion_attentions: bool,
    /// Report routing statistics with every token's expert choices from inference passes
    /// too (see [`ForwardCtx::with_routing`]); training passes always report statistics.
    pub record_routing: bool,
    aux: Arc<Mutex<AuxOutputs>>,
    /// Draws dropout masks and any other randomness adapters use in training (router
    /// noise); seeded so that training runs (and resumed runs) repeat exactly. candle's
    /// own CPU RNG cannot be seeded.
    rng: Option<Arc<Mutex<ChaCha8Rng>>>,
    /// The seed `rng` started from; [`ForwardCtx::for_layer`] derives each layer's stream from it.
    seed: u64,
}

impl ForwardCtx {
    /// Inference: no dropout, no gradients.
    pub fn inference() -> Self {
        ForwardCtx { mode: Mode::Inference, ..Default::default() }
    }

    /// Training: dropout on; dropout masks from an unseeded RNG.
    pub fn training() -> Self {
        Self::training_seeded(rand::random())
    }

    /// Training with reproducible dropout masks: the same seed draws the same masks.
    pub fn training_seeded(seed: u64) -> Self {
        ForwardCtx { mode: Mode::Training, rng: Some(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed)))), seed, ..Default::default() }
    }

    /// The context of layer `l` of a backbone: this one with a random stream of the layer's
    /// own, derived from the seed, so that the layer draws the same dropout masks however
    /// often it runs (gradient checkpointing runs it twice) and whatever ran before it.
    pub fn for_layer(&self, l: usize) -> ForwardCtx {
        let rng = self.rng.as_ref().map(|_| {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(l as u64 + 1);
            Arc::new(Mutex::new(rng))
        });
        ForwardCtx { rng, ..self.clone() }
    }

    /// What this pass is for.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether dropout, noise and stochastic routing are on (see [`Mode::is_training`]).
    pub fn is_training(&self) -> bool {
        self.mode.is_training()
    }

    /// Whether an autograd graph is built through the adapters (see [`Mode::builds_graph`]).
    pub fn builds_graph(&self) -> bool {
        self.mode.builds_graph()
    }

    /// This context without an autograd graph through adapters (training stays training).
    pub fn without_graph(mut self) -> ForwardCtx {
        self.mode = if self.is_training() { Mode::TrainingWithoutGraph } else { Mode::Inference };
        self
    }

    /// This context with an autograd graph: gradients reach the inputs through adapters
    /// too (an attack's search on a trained model).
    pub fn with_graph(mut self) -> ForwardCtx {
        self.mode = if self.is_training() { Mode::Training } else { Mode::Evaluation };
        self
    }

    /// This context with reports of its own (auxiliary losses, routing, fusion attention),
    /// kept apart from this one's.
    pub fn with_own_reports(mut self) -> ForwardCtx {
        self.aux = Arc::default();
        self
    }

    /// The seeded generator adapters draw training-time randomness from (router noise,
    /// stochastic routing); `None` in inference. Draw in a fixed order so that a resumed
    /// run repeats an uninterrupted one bit for bit.
    pub fn rng(&self) -> Option<MutexGuard<'_, ChaCha8Rng>> {
        self.rng.as_ref().filter(|_| self.is_training()).map(|rng| rng.lock().expect("forward rng poisoned"))
    }

    /// Normal(0, std) noise of `shape` from [`Self::rng`]; `None` in inference.
    pub fn normal_noise(&self, shape: &[usize], std: f64, device: &Device) -> Result<Option<Tensor>> {
        let Some(mut rng) = self.rng() else { return Ok(None) };
        let normal = rand_distr::Normal::new(0.0, std).map_err(|e| candle_core::Error::Msg(format!("noise std {std}: {e}")))?;
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rand_distr::Distribution::sample(&normal, &mut *rng) as f32).collect();
        Tensor::from_vec(values, shape, device).map(Some)
    }

    /// Inverted dropout with drop probability `p` in training; `x` itself in inference.
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let Some(mut rng) = self.rng() else { return Ok(x.clone()) };
        if p >= 1.0 {
            return x.zeros_like();
        }
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep }).collect();
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
    }

    /// Routes row `i` of the batch through `choices[i]` (a stack of adapter names; empty
    /// for the base model). Rows that share a choice are computed together.
    pub fn with_row_choices(mut self, choices: &[Vec<String>], device: &Device) -> Result<Self> {
        let mut groups: Vec<(Vec<String>, Vec<u32>)> = Vec::new();
        for (row, stack) in choices.iter().enumerate() {
            match groups.iter_mut().find(|(s, _)| s == stack) {
                Some((_, rows)) => rows.push(row as u32),
                None => groups.push((stack.clone(), vec![row as u32])),
            }
        }
        let groups = groups
            .into_iter()
            .map(|(stack, rows)| {
                let n = rows.len();
                Ok(StackRows { stack, rows: Tensor::from_vec(rows.clone(), n, device)?, indices: rows })
            })
            .collect::<Result<Vec<_>>>()?;
        self.rows_by_stack = Some(groups);
        Ok(self)
    }

    /// This context for a batch in which row `i` of this one becomes `counts[i]`
    /// consecutive rows, each through row `i`'s choice (a decoding step in which a joining
    /// sequence brings a chunk of its prompt).
    pub fn with_rows_repeated(&self, counts: &[usize], device: &Device) -> Result<Self> {
        let Some(groups) = &self.rows_by_stack else { return Ok(self.clone()) };
        let starts: Vec<usize> = counts.iter().scan(0, |next, &n| Some(std::mem::replace(next, *next + n))).collect();
        let choices = groups
            .iter()
            .map(|g| {
                let indices: Vec<u32> = g
                    .indices
                    .iter()
                    .flat_map(|&r| (starts[r as usize]..starts[r as usize] + counts[r as usize]).map(|i| i as u32))
                    .collect();
                let n = indices.len();
                Ok(StackRows { stack: g.stack.clone(), rows: Tensor::from_vec(indices.clone(), n, device)?, indices })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ForwardCtx { rows_by_stack: Some(choices), ..self.clone() })
    }

    /// Sets the attention mask `[batch, seq]` (`u32`, 1 on tokens).
    pub fn with_attention_mask(mut self, mask: Tensor) -> Self {
        self.attention_mask = Some(mask);
        self
    }

    /// This context with `mask` as its attention mask, sharing everything else (reports,
    /// RNG): what a backbone hands to its sites when the caller passed a mask separately.
    pub fn masked(&self, mask: &Tensor) -> ForwardCtx {
        ForwardCtx { attention_mask: Some(mask.clone()), ..self.clone() }
    }

    /// Asks fusion layers to report their attention weights (read them with
    /// [`ForwardCtx::take_aux`]).
    pub fn with_fusion_attentions(mut self) -> Self {
        self.record_fusion_attentions = true;
        self
    }

    /// Asks mixture-of-experts adapters to report their routing, with each token's
    /// chosen experts, from this pass (read them with [`ForwardCtx::take_aux`]).
    pub fn with_routing(mut self) -> Self {
        self.record_routing = true;
        self
    }

    /// Sets per-example task ids.
    pub fn with_task_ids(mut self, task_ids: Tensor) -> Self {
        self.task_ids = Some(task_ids);
        self
    }

    /// Sets per-example conditioning vectors.
    pub fn with_conditioning(mut self, conditioning: Tensor) -> Self {
        self.conditioning = Some(conditioning);
        self
    }

    /// Sets the perturbation added to the token embeddings (see
    /// [`ForwardCtx::embedding_perturbation`]); it shares this context's reports and RNG.
    pub fn with_embedding_perturbation(mut self, delta: Tensor) -> Self {
        self.embedding_perturbation = Some(delta);
        self
    }

    /// The context seen by a subset of the batch's rows: per-example fields are narrowed
    /// to those rows, and reports still reach this context.
    pub fn for_rows(&self, rows: &Tensor) -> Result<ForwardCtx> {
        self.narrowed(|t| t.index_select(rows, 0), |t| t.index_select(rows, 0))
    }

    /// [`ForwardCtx::for_rows`] for the consecutive rows `start .. start + len`.
    pub fn for_range(&self, start: usize, len: usize) -> Result<ForwardCtx> {
        self.narrowed(|t| t.narrow(0, start, len), |t| t.narrow(0, start, len))
    }

    /// The context seen by copy `index` of a batch of `rows` rows repeated for a
    /// `parallel(...)` setup: per-example fields given for every copy are narrowed to this
    /// copy's rows; fields given once (for `rows` rows) are shared.
    pub fn for_copy(&self, index: usize, rows: usize) -> Result<ForwardCtx> {
        let pick = |t: &Tensor| if t.dim(0)? > rows { t.narrow(0, index * rows, rows) } else { Ok(t.clone()) };
        self.narrowed(pick, pick)
    }

    /// The context seen by sequence positions `start .. start + len`: the attention mask
    /// is narrowed to them; per-example fields stay.
    pub fn for_positions(&self, start: usize, len: usize) -> Result<ForwardCtx> {
        self.narrowed(|t| t.narrow(1, start, len), |t| Ok(t.clone()))
    }

    fn narrowed(&self, mask: impl Fn(&Tensor) -> Result<Tensor>, per_example: impl Fn(&Tensor) -> Result<Tensor>) -> Result<ForwardCtx> {
        Ok(ForwardCtx {
            rows_by_stack: None,
            attention_mask: self.attention_mask.as_ref().map(&mask).transpose()?,
            task_ids: self.task_ids.as_ref().map(&per_example).transpose()?,
            conditioning: self.conditioning.as_ref().map(&per_example).transpose()?,
            ..self.clone()
        })
    }

    /// Called by adapters to report an auxiliary loss.
    pub fn push_loss(&self, loss: AuxLoss) {
        self.aux.lock().expect("aux lock poisoned").losses.push(loss);
    }

    /// Called by adapters to report routing statistics.
    pub fn push_routing(&self, stats: RoutingStats) {
        self.aux.lock().expect("aux lock poisoned").routing.push(stats);
    }

    /// Called by the adapter set to report a fusion layer's attention weights (kept,
    /// detached, only when [`ForwardCtx::record_fusion_attentions`] is on).
    pub fn push_fusion_attention(&self, attention: FusionAttention) {
        if self.record_fusion_attentions {
            let weights = attention.weights.detach();
            self.aux.lock().expect("aux lock poisoned").fusion_attentions.push(FusionAttention { weights, ..attention });
        }
    }

    /// Adds reports taken from another context (see [`ForwardCtx::with_own_reports`]).
    pub fn report(&self, outputs: AuxOutputs) {
        let mut aux = self.aux.lock().expect("aux lock poisoned");
        aux.losses.extend(outputs.losses);
        aux.routing.extend(outputs.routing);
        aux.fusion_attentions.extend(outputs.fusion_attentions);
    }

    /// Takes what adapters reported during the forward pass.
    pub fn take_aux(&self) -> AuxOutputs {
        std::mem::take(&mut *self.aux.lock().expect("aux lock poisoned"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_contexts_narrow_the_mask_and_task_ids_alike() -> Result<()> {
        let dev = Device::Cpu;
        let mask = Tensor::new(&[[1u32, 1, 0], [1, 0, 0], [1, 1, 1]], &dev)?;
        let ctx = ForwardCtx::inference().with_attention_mask(mask).with_task_ids(Tensor::new(&[7u32, 8, 9], &dev)?);
        let rows = ctx.for_rows(&Tensor::new(&[2u32, 0], &dev)?)?;
        assert_eq!(rows.attention_mask.unwrap().to_vec2::<u32>()?, vec![vec![1, 1, 1], vec![1, 1, 0]]);
        assert_eq!(rows.task_ids.unwrap().to_vec1::<u32>()?, vec![9, 7]);
        Ok(())
    }

    #[test]
    fn noise_is_seeded_and_only_in_training() -> Result<()> {
        let dev = Device::Cpu;
        let draw = |ctx: &ForwardCtx| -> Result<Vec<f32>> { ctx.normal_noise(&[4], 1.0, &dev)?.unwrap().to_vec1() };
        let (a, b) = (ForwardCtx::training_seeded(3), ForwardCtx::training_seeded(3));
        assert_eq!(draw(&a)?, draw(&b)?);
        assert_ne!(draw(&a)?, draw(&ForwardCtx::training_seeded(4))?);
        // b catches up with a (two draws each).
        draw(&b)?;
        // The generator is shared with derived contexts, so draws continue the sequence.
        let masked = a.masked(&Tensor::ones((1, 4), candle_core::DType::U32, &dev)?);
        assert_eq!(draw(&masked)?, draw(&b)?);
        assert!(ForwardCtx::inference().normal_noise(&[4], 1.0, &dev)?.is_none());
        Ok(())
    }

    #[test]
    fn a_layer_draws_the_same_stream_whatever_ran_before_it() -> Result<()> {
        let dev = Device::Cpu;
        let draw = |ctx: &ForwardCtx| -> Result<Vec<f32>> { ctx.normal_noise(&[4], 1.0, &dev)?.unwrap().to_vec1() };
        let ctx = ForwardCtx::training_seeded(5);
        let first = draw(&ctx.for_layer(2))?;
        draw(&ctx)?;
        draw(&ctx.for_layer(1))?;
        assert_eq!(draw(&ctx.for_layer(2))?, first);
        assert_ne!(draw(&ctx.for_layer(3))?, first);
        assert_ne!(draw(&ForwardCtx::training_seeded(6).for_layer(2))?, first);
        assert!(ForwardCtx::inference().for_layer(2).normal_noise(&[4], 1.0, &dev)?.is_none());
        Ok(())
    }
}
