//! Adversarial training and attacks in embedding space (PGD, as in FreeLB and SMART): a
//! perturbation of the token embeddings, each token's inside an L2 ball of radius ε, is
//! found by a few steps of projected gradient ascent on a loss; training then fits the
//! clean batch and the perturbed one. Only adapters and heads train (or everything in
//! full mode): the perturbation is searched, not learned.

use crate::error::{fail, Result};
use crate::forward::StepReports;
use adapters_core::ForwardCtx;
use adapters_models::Backbone;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};

/// `[training.adversarial]`, and the strength of an evaluation-time attack.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Adversarial {
    /// Radius of each token's L2 ball in embedding space (MiniLM's token embeddings have
    /// norms of about 1.1: on Rotten Tomatoes a radius of 0.02 already costs a plain adapter a fifth of its accuracy).
    pub epsilon: f64,
    /// Ascent steps K (each one forward and backward pass).
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Length of each ascent step along the per-token normalised gradient; default ε
    /// (so K = 1 is the fast gradient method).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_size: Option<f64>,
    /// The perturbed term's weight in the loss (the clean cross-entropy's is 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub weight: f64,
    /// SMART's smoothness term: the perturbation maximises, and training adds, the
    /// symmetric KL divergence between the perturbed and the clean predictions instead of
    /// the perturbed batch's cross-entropy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kl: bool,
}

fn one() -> f64 {
    1.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

fn default_steps() -> usize {
    2
}

impl Adversarial {
    /// Checks the numbers (names the `training.adversarial` field at fault).
    pub fn check(&self) -> Result<()> {
        self.check_named(|field| format!("`training.adversarial.{field}`"))
    }

    /// [`Adversarial::check`], naming a field as `name(field)` says (a CLI flag, say).
    pub fn check_named(&self, name: impl Fn(&str) -> String) -> Result<()> {
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            fail!(Config, "{} = {}: the ball's radius is a positive number", name("epsilon"), self.epsilon);
        }
        if !(1..=100).contains(&self.steps) {
            fail!(Config, "{} = {}: give 1 to 100 ascent steps", name("steps"), self.steps);
        }
        if let Some(a) = self.step_size.filter(|a| !(a.is_finite() && *a > 0.0)) {
            fail!(Config, "{} = {a}: a step length is a positive number", name("step_size"));
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            fail!(Config, "{} = {}: the perturbed term's weight is a positive number", name("weight"), self.weight);
        }
        Ok(())
    }

    fn step_length(&self) -> f64 {
        self.step_size.unwrap_or(self.epsilon)
    }
}

/// Classification logits `[rows, labels]` of one part of a batch, its gold labels and its
/// weight in the batch's loss (its share of the rows).
pub struct LabelledLogits {
    /// The part's logits.
    pub logits: Tensor,
    /// Gold label indices `[rows]` (u32).
    pub labels: Tensor,
    /// The part's weight in the loss.
    pub weight: f64,
}

/// The weighted cross-entropy of parts.
pub fn cross_entropy(parts: &[LabelledLogits]) -> Result<Tensor> {
    weighted(parts.iter().map(|p| Ok((candle_nn::loss::cross_entropy(&p.logits, &p.labels)?, p.weight))))
}

/// The weighted symmetric KL divergence between two sets of parts' predictions (mean over rows).
fn symmetric_kl(a: &[LabelledLogits], b: &[LabelledLogits]) -> Result<Tensor> {
    weighted(a.iter().zip(b).map(|(a, b)| {
        let (la, lb) = (candle_nn::ops::log_softmax(&a.logits, D::Minus1)?, candle_nn::ops::log_softmax(&b.logits, D::Minus1)?);
        let diff = (&la - &lb)?;
        let kl = ((la.exp()? - lb.exp()?)? * diff)?.sum(D::Minus1)?.mean_all()?;
        Ok((kl, a.weight))
    }))
}

fn weighted(terms: impl Iterator<Item = Result<(Tensor, f64)>>) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for term in terms {
        let (t, w) = term?;
        let t = (t * w)?;
        total = Some(match total {
            None => t,
            Some(s) => (s + t)?,
        });
    }
    match total {
        Some(t) => Ok(t),
        None => fail!(Data, "an empty batch has no loss"),
    }
}

/// Each token's perturbation `[batch, seq, hidden]` pulled back into its ε-ball; zero on
/// padding (`keep` is the mask as `[batch, seq, 1]` floats).
fn project(delta: &Tensor, keep: &Tensor, epsilon: f64) -> Result<Tensor> {
    let norms = delta.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let scale = (norms.clamp(epsilon, f64::INFINITY)?.recip()? * epsilon)?;
    Ok(delta.broadcast_mul(&scale)?.broadcast_mul(keep)?)
}

/// The perturbation that `attack.steps` steps of projected gradient ascent from zero find
/// for `objective` (a scalar from the final hidden states and the context they ran
/// with). The passes report nothing to `ctx` (their auxiliary losses are dropped).
pub fn perturbation(
    backbone: &Backbone,
    ids: &Tensor,
    mask: &Tensor,
    ctx: &ForwardCtx,
    attack: &Adversarial,
    objective: impl Fn(&Tensor, &ForwardCtx) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let keep = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let ctx = ctx.clone().with_own_reports().with_graph();
    let mut delta = Tensor::zeros((b, t, backbone.hidden_size()), DType::F32, backbone.device())?;
    for _ in 0..attack.steps {
        let var = Var::from_tensor(&delta)?;
        let pass = ctx.clone().with_embedding_perturbation(var.as_tensor().clone());
        let value = objective(&backbone.hidden_states(ids, mask, &pass)?, &pass)?;
        pass.take_aux();
        let Some(grad) = value.backward()?.remove(var.as_tensor()) else {
            fail!(Run, "the attack's objective does not depend on the embeddings");
        };
        let norms = grad.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
        let step = (grad.broadcast_div(&norms)? * attack.step_length())?;
        delta = project(&(delta + step)?, &keep, attack.epsilon)?;
    }
    Ok(delta)
}

/// A training step's loss and gradients with adversarial training: the clean batch's
/// cross-entropy plus `weight` times, on the perturbation that maximises it, the perturbed
/// batch's cross-entropy (or with `kl`, the symmetric KL divergence between perturbed and
/// clean predictions, which the perturbation maximises instead).
/// `parts` maps hidden states (and the context they ran with) to the batch's parts.
pub fn loss_and_grads(
    backbone: &Backbone,
    ids: &Tensor,
    mask: &Tensor,
    ctx: &ForwardCtx,
    attack: &Adversarial,
    parts: impl Fn(&Tensor, &ForwardCtx) -> Result<Vec<LabelledLogits>>,
) -> Result<(Tensor, GradStore, StepReports)> {
    let clean = parts(&backbone.hidden_states(ids, mask, ctx)?, ctx)?;
    let clean_loss = cross_entropy(&clean)?;
    let smooth = attack.kl;
    let target: Vec<LabelledLogits> =
        clean.iter().map(|p| LabelledLogits { logits: p.logits.detach(), labels: p.labels.clone(), weight: p.weight }).collect();
    let objective = |h: &Tensor, c: &ForwardCtx| {
        let perturbed = parts(h, c)?;
        if smooth {
            symmetric_kl(&perturbed, &target)
        } else {
            cross_entropy(&perturbed)
        }
    };
    let delta = perturbation(backbone, ids, mask, ctx, attack, objective)?;
    let perturbed = parts(&backbone.hidden_states(ids, mask, &ctx.clone().with_embedding_perturbation(delta))?, ctx)?;
    let term = ((if smooth { symmetric_kl(&perturbed, &clean)? } else { cross_entropy(&perturbed)? }) * attack.weight)?;
    let mut reports = StepReports::default();
    reports.aux_losses.insert("adversarial".into(), term.to_scalar::<f32>()? as f64);
    let aux = ctx.take_aux();
    reports.routing = aux.routing;
    let mut loss = (clean_loss + term)?;
    for a in aux.losses {
        *reports.aux_losses.entry(a.name).or_default() += a.value.to_scalar::<f32>()? as f64;
        loss = (loss + a.value)?;
    }
    let grads = loss.backward()?;
    Ok((loss.detach(), grads, reports))
}

/// Logits of rows under the attack `attack`: the perturbation that maximises the
/// cross-entropy of `logits` (from hidden states, the mask and the context) against
/// `labels` (u32 `[rows]`), then the logits with it. Adapters and heads stay as they are.
pub fn attacked_logits(
    backbone: &Backbone,
    ids: &Tensor,
    mask: &Tensor,
    labels: &Tensor,
    ctx: &ForwardCtx,
    attack: &Adversarial,
    logits: impl Fn(&Tensor, &ForwardCtx) -> Result<Tensor>,
) -> Result<Tensor> {
    let objective = |h: &Tensor, c: &ForwardCtx| Ok(candle_nn::loss::cross_entropy(&logits(h, c)?, labels)?);
    let delta = perturbation(backbone, ids, mask, ctx, attack, objective)?;
    let ctx = ctx.clone().with_embedding_perturbation(delta);
    logits(&backbone.hidden_states(ids, mask, &ctx)?, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn projection_keeps_each_token_in_its_ball_and_zeroes_padding() -> Result<()> {
        let delta = Tensor::new(&[[[3.0f32, 4.0], [0.3, 0.4]], [[1.0, 0.0], [6.0, 8.0]]], &Device::Cpu)?;
        let keep = Tensor::new(&[[[1.0f32], [1.0]], [[1.0], [0.0]]], &Device::Cpu)?;
        let p = project(&delta, &keep, 1.0)?.to_vec3::<f32>()?;
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(&p[0][0], &[0.6, 0.8]), "norm 5 scaled to 1: {:?}", p[0][0]);
        assert!(close(&p[0][1], &[0.3, 0.4]), "inside the ball: unchanged");
        assert!(close(&p[1][0], &[1.0, 0.0]), "on the sphere: unchanged");
        assert!(close(&p[1][1], &[0.0, 0.0]), "padding: zero");
        Ok(())
    }

    #[test]
    fn symmetric_kl_is_zero_for_equal_predictions_and_positive_otherwise() -> Result<()> {
        let part = |v: &[[f32; 2]; 2]| -> Result<LabelledLogits> {
            Ok(LabelledLogits { logits: Tensor::new(v, &Device::Cpu)?, labels: Tensor::new(&[0u32, 1], &Device::Cpu)?, weight: 1.0 })
        };
        let a = [part(&[[1.0, 2.0], [0.0, -1.0]])?];
        let b = [part(&[[2.0, 0.0], [0.0, -1.0]])?];
        assert!(symmetric_kl(&a, &a)?.to_scalar::<f32>()?.abs() < 1e-7);
        // Row 1: KL(p‖q) + KL(q‖p) for p = softmax(1, 2), q = softmax(2, 0); row 2 equal.
        let (p, q) = ([0.268_941_4f64, 0.731_058_6], [0.880_797_1f64, 0.119_202_9]);
        let expected = (0..2).map(|i| (p[i] - q[i]) * (p[i].ln() - q[i].ln())).sum::<f64>() / 2.0;
        assert!((symmetric_kl(&a, &b)?.to_scalar::<f32>()? as f64 - expected).abs() < 1e-5);
        Ok(())
    }
}
