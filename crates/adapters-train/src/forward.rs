//! The task forward passes shared by training, evaluation and prediction: padding,
//! pooling, classification logits and the causal-LM loss.

use crate::error::{fail, Result};
use adapters_core::{ForwardCtx, RoutingStats};
use adapters_models::heads::pad;
use adapters_models::Backbone;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var, D};
use std::collections::BTreeMap;

/// Mean next-token cross-entropy of rows (over every token after the first, or with
/// `loss_mask` over the tokens it marks), and how many tokens it averages.
pub fn lm_loss(backbone: &Backbone, rows: &[&[u32]], loss_mask: Option<&[&[u32]]>, ctx: &ForwardCtx) -> Result<(Tensor, usize)> {
    let (ids, mask) = pad(rows, backbone.device())?;
    let hidden = backbone.hidden_states(&ids, &mask, ctx)?;
    let loss_mask = loss_mask.map(|m| pad(m, backbone.device())).transpose()?.map(|(m, _)| m);
    lm_loss_of(backbone, &hidden, &ids, loss_mask.as_ref())
}

/// [`lm_loss`] from the decoder's final hidden states `[batch, seq, hidden]` of `ids`;
/// `loss_mask` `[batch, seq]` (1 on the tokens to predict) restricts it.
pub fn lm_loss_of(backbone: &Backbone, hidden: &Tensor, ids: &Tensor, loss_mask: Option<&Tensor>) -> Result<(Tensor, usize)> {
    let Backbone::Llama(model) = backbone else { fail!(Config, "causal language modelling needs a decoder model") };
    let (b, t) = ids.dims2()?;
    let mut hidden = hidden.narrow(1, 0, t - 1)?.reshape((b * (t - 1), ()))?;
    let mut targets = ids.narrow(1, 1, t - 1)?.flatten_all()?;
    if let Some(mask) = loss_mask {
        // The positions whose next token is marked.
        let keep: Vec<u32> = mask
            .narrow(1, 1, t - 1)?
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .enumerate()
            .filter(|(_, &m)| m == 1)
            .map(|(i, _)| i as u32)
            .collect();
        if keep.is_empty() {
            fail!(Data, "no token of this batch is marked for the loss");
        }
        let keep = Tensor::new(keep.as_slice(), hidden.device())?;
        hidden = hidden.index_select(&keep, 0)?;
        targets = targets.index_select(&keep, 0)?;
    }
    let n = targets.dim(0)?;
    let loss = if model.config.final_logit_softcapping.is_some() {
        // Gemma 2 caps its logits: the loss is on the capped ones, as transformers computes it.
        candle_nn::loss::cross_entropy(&model.logits(&hidden)?, &targets)?
    } else {
        // Blocked: the [tokens, vocab] logits are never all in memory at once.
        model.output_cross_entropy(&hidden, &targets)?
    };
    Ok((loss, n))
}

/// What adapters reported during a training step besides the gradients: each kind of
/// auxiliary loss's total and the routers' statistics.
#[derive(Default)]
pub struct StepReports {
    /// Auxiliary loss values by name (`load_balance`, `router_z`, ...), summed over points.
    pub aux_losses: BTreeMap<String, f64>,
    /// Routing statistics of mixture-of-experts adapters.
    pub routing: Vec<RoutingStats>,
}

/// A training step's loss (detached; with the auxiliary losses adapters report), the
/// gradients of `vars` and what adapters reported: the backbone runs over `ids` (`mask`
/// marks tokens) and `head` maps its last hidden states to the loss. With
/// `checkpointing`, each layer's activations are recomputed during the backward pass
/// instead of kept (see [`Backbone::backward_checkpointed`]): less memory, one more
/// forward's time.
pub fn loss_and_grads(
    backbone: &Backbone,
    ids: &Tensor,
    mask: &Tensor,
    ctx: &ForwardCtx,
    vars: &[Var],
    checkpointing: bool,
    head: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, GradStore, StepReports)> {
    let (mut loss, grads) = if checkpointing {
        backbone.backward_checkpointed(ids, mask, ctx, vars, head)?
    } else {
        (head(&backbone.hidden_states(ids, mask, ctx)?)?, GradStore::default())
    };
    let aux = ctx.take_aux();
    let mut reports = StepReports { routing: aux.routing, ..Default::default() };
    for a in aux.losses {
        *reports.aux_losses.entry(a.name).or_default() += a.value.to_scalar::<f32>()? as f64;
        loss = (loss + a.value)?;
    }
    if checkpointing {
        return Ok((loss, grads, reports));
    }
    let grads = loss.backward()?;
    Ok((loss.detach(), grads, reports))
}

/// The label index with the highest logit, per row.
pub fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}
