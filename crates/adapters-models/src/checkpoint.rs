//! Gradient checkpointing: a training step that keeps only each layer's input during the
//! forward pass and, going backwards, recomputes one layer at a time and back-propagates
//! through it. The activations of one layer are held at once instead of all of them, for
//! the price of a second forward pass. Dropout draws the same masks both times: every
//! layer draws from its own stream ([`ForwardCtx::for_layer`]).

use crate::model::Backbone;
use crate::{bert, llama, Bert, Llama};
use adapters_core::ForwardCtx;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// One forward pass split into its layers.
enum Layers<'a> {
    Bert(&'a Bert, bert::LayerInputs),
    Llama(&'a Llama, llama::LayerInputs),
}

impl Layers<'_> {
    fn count(&self) -> usize {
        match self {
            Layers::Bert(m, _) => m.num_layers(),
            Layers::Llama(m, _) => m.num_layers(),
        }
    }

    /// The context of layer `l` (its own random stream).
    fn ctx(&self, l: usize) -> ForwardCtx {
        match self {
            Layers::Bert(_, inputs) => inputs.ctx.for_layer(l),
            Layers::Llama(_, inputs) => inputs.ctx.for_layer(l),
        }
    }

    fn layer(&self, l: usize, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        match self {
            Layers::Bert(m, inputs) => m.layer(l, x, inputs, ctx),
            Layers::Llama(m, inputs) => m.layer(l, x, inputs, ctx),
        }
    }

    fn finish(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layers::Bert(_, inputs) => inputs.finish(x),
            Layers::Llama(m, inputs) => m.finish(x, inputs.virtual_tokens, &inputs.ctx),
        }
    }
}

impl Backbone {
    /// A training step's forward and backward pass with gradient checkpointing: the same
    /// loss and gradients as `head(&self.hidden_states(ids, mask, ctx)?)?.backward()`, up
    /// to float rounding, holding one layer's activations at a time.
    ///
    /// `head` maps the last hidden states to the scalar loss. Auxiliary losses the layers
    /// report reach `ctx` detached, as values to add to the reported loss; their gradients
    /// are included in the result. Returns the head's loss (detached) and the gradients of `vars`.
    pub fn backward_checkpointed<E: From<candle_core::Error>>(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        ctx: &ForwardCtx,
        vars: &[Var],
        head: impl FnOnce(&Tensor) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<(Tensor, GradStore), E> {
        let (embedded, layers) = match self {
            Backbone::Bert(m) => {
                let (x, inputs) = m.embed(ids, None, Some(mask), ctx)?;
                (x, Layers::Bert(m, inputs))
            }
            Backbone::Llama(m) => {
                let (x, inputs) = m.embed(ids, 0, &ctx.masked(mask))?;
                (x, Layers::Llama(m, inputs))
            }
        };
        // Forward: keep each layer's input, build no graph.
        let mut inputs = Vec::with_capacity(layers.count());
        let mut x = embedded.detach();
        for l in 0..layers.count() {
            let layer_ctx = layers.ctx(l).without_graph().with_own_reports();
            let next = layers.layer(l, &x, &layer_ctx)?.detach();
            let mut reports = layer_ctx.take_aux();
            for loss in &mut reports.losses {
                loss.value = loss.value.detach();
            }
            ctx.report(reports);
            inputs.push(x);
            x = next;
        }
        // The head. (Running the top layer with a graph here instead of twice saves a sixth
        // of a MiniLM forward but holds its activations during the head: 57 MB more at
        // batch 32 x 128.)
        let top = Var::from_tensor(&x)?;
        drop(x);
        let loss = head(&layers.finish(top.as_tensor())?)?;
        // A backward pass also leaves full-size gradients of frozen operands in its store:
        // only the variables' and the input's are kept.
        let mut grads = loss.backward()?;
        let mut sums: Vec<Option<Tensor>> = vars.iter().map(|v| grads.remove(v.as_tensor())).collect();
        let mut upstream = grads.remove(top.as_tensor());
        drop((grads, top));
        // Backward: recompute each layer from its input, with a graph, and
        // back-propagate the gradient of its output through it.
        while let Some(input) = inputs.pop() {
            let Some(grad_out) = upstream.take() else { break };
            let l = inputs.len();
            let input = Var::from_tensor(&input)?;
            let layer_ctx = layers.ctx(l).with_own_reports();
            let out = layers.layer(l, input.as_tensor(), &layer_ctx)?;
            let mut objective = (out * grad_out)?.sum_all()?;
            for aux in layer_ctx.take_aux().losses {
                objective = (objective + aux.value)?;
            }
            let mut grads = objective.backward()?;
            accumulate(&mut sums, vars, &mut grads)?;
            upstream = grads.remove(input.as_tensor());
        }
        // The embeddings, when they are trained (full fine-tuning).
        if let (Some(grad_in), true) = (upstream, embedded.track_op()) {
            accumulate(&mut sums, vars, &mut (embedded * grad_in)?.sum_all()?.backward()?)?;
        }
        let mut grads = GradStore::default();
        for (v, sum) in vars.iter().zip(sums) {
            if let Some(sum) = sum {
                grads.insert(v.as_tensor(), sum);
            }
        }
        Ok((loss.detach(), grads))
    }
}

/// Adds the gradients of `vars` in `grads` to the running sums.
fn accumulate(sums: &mut [Option<Tensor>], vars: &[Var], grads: &mut GradStore) -> Result<()> {
    for (sum, v) in sums.iter_mut().zip(vars) {
        if let Some(g) = grads.remove(v.as_tensor()) {
            *sum = Some(match sum.take() {
                Some(s) => (s + g)?,
                None => g,
            });
        }
    }
    Ok(())
}
