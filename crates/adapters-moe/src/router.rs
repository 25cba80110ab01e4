//! Routing: from router logits to a dispatch plan (which tokens each expert computes, with
//! which gate), the balance losses, and the statistics reported to the trainer.
//!
//! The choice itself (top-k, capacity) is made on the host from the router's
//! probabilities, a `[units, choices]` table: small next to the experts' work. The gates
//! stay tensors, so gradients reach the router through them.

use crate::config::{Gate, Granularity, MoeConfig, RouterKind};
use adapters_core::{AuxLoss, ForwardCtx, Point, RoutingStats};
use candle_core::{Result, Tensor, D};
use rand::Rng;

/// Each (unit, choice)'s gate, flattened `[units · choices]` (index with [`Plan::gate_at`]).
pub enum Gates {
    /// A tensor in the autograd graph (training: gradients reach the router through it).
    Table(Tensor),
    /// Host values (inference, and the random router's constant gates).
    Host(Vec<f32>),
}

impl Gates {
    /// The gates at `at`, as a `[at.len()]` tensor.
    pub fn pick(&self, at: &[u32], device: &candle_core::Device) -> Result<Tensor> {
        match self {
            Gates::Table(t) => t.index_select(&Tensor::new(at, device)?, 0),
            Gates::Host(v) => Tensor::from_iter(at.iter().map(|&i| v[i as usize]), device),
        }
    }
}

/// What each expert computes in one forward.
pub struct Plan {
    /// Per expert: the flat token indices (into `[batch · seq]`) it runs on.
    pub tokens: Vec<Vec<u32>>,
    /// Per expert, per token: the index of its gate in [`Plan::gates`].
    pub gate_at: Vec<Vec<u32>>,
    /// The gates.
    pub gates: Gates,
    /// The non-padding tokens (flat indices), in order.
    pub kept: Vec<u32>,
    /// What the plan did, for the trainer and the `route` command.
    pub stats: RoutingStats,
}

/// The units of a batch: which non-padding tokens each covers.
pub struct Units {
    /// Non-padding tokens (flat indices into `[batch · seq]`), in order.
    pub kept: Vec<u32>,
    /// Per kept token, its unit.
    pub unit_of_kept: Vec<u32>,
    /// Per unit, its row of the batch.
    pub row: Vec<u32>,
    /// Number of units.
    pub count: usize,
    /// Tokens of the batch, padding included (`batch · seq`).
    pub total: usize,
}

impl Units {
    /// The units of a `[batch, seq]` batch under `granularity` (`mask`: 1 on tokens).
    pub fn new(granularity: Granularity, batch: usize, seq: usize, mask: Option<&[u32]>) -> Self {
        let mut kept = Vec::new();
        let mut unit_of_kept = Vec::new();
        let mut row = Vec::new();
        for b in 0..batch {
            let mut row_has_tokens = false;
            for t in 0..seq {
                let i = b * seq + t;
                if mask.is_some_and(|m| m[i] == 0) {
                    continue;
                }
                match granularity {
                    Granularity::Token => {
                        unit_of_kept.push(row.len() as u32);
                        row.push(b as u32);
                    }
                    Granularity::Sequence | Granularity::Task => {
                        if !row_has_tokens {
                            row.push(b as u32);
                        }
                        unit_of_kept.push(row.len() as u32 - 1);
                    }
                }
                row_has_tokens = true;
                kept.push(i as u32);
            }
        }
        let count = row.len();
        Units { kept, unit_of_kept, row, count, total: batch * seq }
    }
}

/// Each unit's choices, best first, before the capacity limit: `slots` per unit, flat.
/// `logits` `[units · choices]` (`None`: the random router).
fn choose(config: &MoeConfig, logits: Option<&[f32]>, units: usize, ctx: &ForwardCtx) -> (Vec<u32>, usize) {
    let e = config.experts as u32;
    let Some(logits) = logits else {
        // AdaMix: one expert drawn uniformly per unit in training, all of them otherwise.
        return match ctx.rng() {
            Some(mut rng) => ((0..units).map(|_| rng.random_range(0..e)).collect(), 1),
            None => ((0..units).flat_map(|_| 0..e).collect(), e as usize),
        };
    };
    let (n, k) = (config.choices(), config.top_k);
    let mut chosen = Vec::with_capacity(units * k);
    for row in logits.chunks_exact(n) {
        choose_row(row, k, &mut chosen);
    }
    (chosen, k)
}

/// A unit's `k` choices from its logits, best first, pushed onto `chosen`; ties go to the
/// lower index.
fn choose_row(row: &[f32], k: usize, chosen: &mut Vec<u32>) {
    if k == 1 {
        chosen.push(first_max(row));
        return;
    }
    // k picks of the highest remaining logit (k and the choices are few): no sort, no
    // scratch.
    let start = chosen.len();
    for _ in 0..k {
        let mut best: Option<usize> = None;
        for (i, v) in row.iter().enumerate() {
            let free = !chosen[start..].contains(&(i as u32));
            if free && best.is_none_or(|b| v.total_cmp(&row[b]).is_gt()) {
                best = Some(i);
            }
        }
        let Some(best) = best else { return };
        chosen.push(best as u32);
    }
}

/// The index of the first maximum.
fn first_max(row: &[f32]) -> u32 {
    row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b }) as u32
}

/// A token's experts and gates from its router logits, as [`plan`] makes them in
/// inference with a learned router and no capacity limit (the fused inference pass
/// routes each token with it): `(expert, gate)` pushed onto `picks`, nothing for the skip
/// choice.
pub fn route_row(config: &MoeConfig, logits: &[f32], picks: &mut Vec<(u32, f32)>) {
    let one;
    let mut many = Vec::new();
    // Top-1 without allocating: this runs once per token and site.
    let chosen: &[u32] = if config.top_k == 1 {
        one = [first_max(logits)];
        &one
    } else {
        choose_row(logits, config.top_k, &mut many);
        &many
    };
    let max = logits[chosen[0] as usize];
    // Top-1: the router probability, a softmax over every choice. Top-k: the probabilities
    // renormalised over the chosen (the softmax's own normaliser cancels).
    let norm: f32 = match config.top_k {
        1 => logits.iter().map(|l| (l - max).exp()).sum(),
        _ => chosen.iter().map(|&c| (logits[c as usize] - max).exp()).sum(),
    };
    for &e in chosen.iter().filter(|&&e| (e as usize) < config.experts) {
        let gate = match config.gate {
            Gate::StraightThrough => 1.0,
            Gate::Probability => (logits[e as usize] - max).exp() / norm,
        };
        picks.push((e, gate));
    }
}

/// Softmax of each row of `logits` (`[units · n]`, flat), on the host.
fn softmax_rows(logits: &[f32], n: usize) -> Vec<f32> {
    let mut p = logits.to_vec();
    for row in p.chunks_exact_mut(n) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        row.iter_mut().for_each(|v| *v /= sum);
    }
    p
}

/// Plans the forward of one site: `logits` `[units, choices]` (`None` for the random
/// router), the batch's `units` and, per unit, its task id when the context has them.
pub fn plan(
    config: &MoeConfig,
    kind: &str,
    point: Point,
    logits: Option<Tensor>,
    units: Units,
    unit_tasks: Option<Vec<u32>>,
    ctx: &ForwardCtx,
) -> Result<Plan> {
    let experts = config.experts;
    let n = config.choices();
    let logits = match (logits, config.router) {
        (Some(l), RouterKind::Noisy) => match ctx.normal_noise(l.dims(), config.noise_std, l.device())? {
            Some(noise) => Some((l + noise)?),
            None => Some(l),
        },
        (l, _) => l,
    };
    let host_logits = logits.as_ref().map(|l| l.flatten_all()?.to_vec1::<f32>()).transpose()?;
    let (chosen, slots) = choose(config, host_logits.as_deref(), units.count, ctx);
    let learned = logits.is_some();
    let width = if learned { n } else { slots.max(1) };

    // Gates: the router probability (top-1, as Switch), or renormalised over the chosen
    // (top-k > 1, skip included so that it keeps its share); 1 with the probability's
    // gradient (the straight-through gate); 1 (training) or 1/E (inference) for the random
    // router. Tensors only where gradients are wanted.
    let straight_through = config.gate == Gate::StraightThrough;
    let differentiable = ctx.is_training() || ctx.builds_graph();
    let probs = match (&logits, differentiable) {
        // Composed softmax: candle's fused `softmax_last_dim` has no backward pass.
        (Some(l), true) => Some(candle_nn::ops::softmax(l, D::Minus1)?),
        _ => None,
    };
    let gates = match (&probs, &host_logits) {
        (Some(p), _) if straight_through => {
            let p = p.flatten_all()?;
            Gates::Table(((&p - p.detach())? + 1.0)?)
        }
        (Some(p), _) if config.top_k == 1 => Gates::Table(p.flatten_all()?),
        (None, Some(_)) if straight_through => Gates::Host(vec![1.0; units.count * n]),
        (Some(p), _) => {
            let mut mask = vec![0f32; units.count * n];
            for (u, c) in chosen.chunks_exact(slots).enumerate() {
                c.iter().for_each(|&e| mask[u * n + e as usize] = 1.0);
            }
            let mask = Tensor::from_vec(mask, (units.count, n), p.device())?;
            let norm = (p * &mask)?.sum_keepdim(D::Minus1)?;
            Gates::Table(p.broadcast_div(&norm)?.flatten_all()?)
        }
        (None, Some(l)) => {
            let mut p = softmax_rows(l, n);
            if config.top_k > 1 {
                for (row, c) in p.chunks_exact_mut(n).zip(chosen.chunks_exact(slots)) {
                    let norm: f32 = c.iter().map(|&e| row[e as usize]).sum();
                    row.iter_mut().for_each(|v| *v /= norm);
                }
            }
            Gates::Host(p)
        }
        (None, None) => Gates::Host(vec![if ctx.is_training() { 1.0 } else { 1.0 / experts as f32 }; units.count * width]),
    };

    // Capacity, in unit order: an expert full at its capacity drops later assignments.
    let capacity = config.capacity_factor.map(|cf| (cf * units.count as f64 * slots as f64 / experts as f64).ceil() as usize);
    let mut load = vec![0usize; experts];
    let mut accepted = vec![u32::MAX; chosen.len()];
    let mut overflowed_units = vec![0usize; units.count];
    for (i, &e) in chosen.iter().enumerate() {
        let e_us = e as usize;
        if e_us >= experts {
            continue; // the skip choice: nothing to compute
        }
        if capacity.is_some_and(|cap| load[e_us] >= cap) {
            overflowed_units[i / slots] += 1;
            continue;
        }
        load[e_us] += 1;
        accepted[i] = e;
    }

    // Per expert: its tokens and their gates' places.
    let mut tokens = vec![Vec::new(); experts];
    let mut gate_at = vec![Vec::new(); experts];
    let mut tokens_per_expert = vec![0f32; experts];
    let tasks_n = unit_tasks.as_ref().map_or(0, |t| t.iter().max().map_or(0, |m| *m as usize + 1));
    let mut per_task = vec![vec![0f32; experts]; tasks_n];
    let (mut skipped, mut overflowed) = (0f32, 0f32);
    let mut choices_per_token: Option<Vec<Vec<u32>>> = ctx.record_routing.then(|| vec![Vec::new(); units.total]);
    for (&token, &u) in units.kept.iter().zip(&units.unit_of_kept) {
        let u = u as usize;
        let range = u * slots..(u + 1) * slots;
        if chosen[range.clone()].iter().all(|&e| e as usize >= experts) {
            skipped += 1.0;
        }
        overflowed += overflowed_units[u] as f32;
        for &e in accepted[range].iter().filter(|&&e| e != u32::MAX) {
            let e_us = e as usize;
            tokens[e_us].push(token);
            gate_at[e_us].push((u * width + if learned { e_us } else { e_us % width }) as u32);
            tokens_per_expert[e_us] += 1.0;
            if let Some(t) = &unit_tasks {
                per_task[t[u] as usize][e_us] += 1.0;
            }
            if let Some(c) = &mut choices_per_token {
                c[token as usize].push(e);
            }
        }
    }
    let stats = RoutingStats {
        adapter: kind.to_string(),
        point,
        tokens_per_expert,
        tokens: units.kept.len() as f32,
        skipped,
        overflowed,
        per_task,
        choices: choices_per_token,
    };

    // Balance terms, on the units' choices before the capacity limit (Switch counts what
    // the router asked for).
    if ctx.is_training() {
        if let (Some(p), Some(l)) = (&probs, &logits) {
            if config.balance_loss > 0.0 && units.count > 0 {
                let mut f = vec![0f32; n];
                for &e in &chosen {
                    f[e as usize] += 1.0 / chosen.len() as f32;
                }
                let f = Tensor::from_vec(f, n, p.device())?;
                let value = ((p.mean(0)? * f)?.sum_all()? * (config.balance_loss * n as f64))?;
                ctx.push_loss(AuxLoss { adapter: kind.to_string(), point, name: "load_balance".into(), value });
            }
            if config.z_loss > 0.0 && units.count > 0 {
                let max = l.max_keepdim(D::Minus1)?;
                let lse = (l.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
                let value = (lse.sqr()?.mean_all()? * config.z_loss)?;
                ctx.push_loss(AuxLoss { adapter: kind.to_string(), point, name: "router_z".into(), value });
            }
        }
    }
    Ok(Plan { tokens, gate_at, gates, kept: units.kept, stats })
}

#[cfg(test)]
mod tests {
    use super::choose_row;

    /// The top-k choice is a stable descending sort's first k: best first, ties to the
    /// lower index (what resume and the fused pass rely on to route alike).
    #[test]
    fn top_k_choice_is_the_stable_sorts_first_k() {
        let rows: [&[f32]; 4] =
            [&[0.1, 0.7, 0.7, -1.0, 0.3], &[2.0, 2.0, 2.0, 2.0, 2.0], &[-3.0, 5.0, -0.5, 4.9, 5.0], &[1.0, -2.0, 0.0, 0.5, 1.0]];
        for row in rows {
            for k in 1..=row.len() {
                let mut order: Vec<u32> = (0..row.len() as u32).collect();
                order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
                let mut chosen = vec![1]; // an earlier unit's choice, not this row's
                choose_row(row, k, &mut chosen);
                assert_eq!(&chosen[1..], &order[..k], "row {row:?}, k = {k}");
            }
        }
    }
}
