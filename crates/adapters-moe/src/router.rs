//! Routing: from router logits to a dispatch plan (which tokens each expert computes, with
//! which gate), the balance losses, and the statistics reported to the trainer.
//!
//! The choice itself (top-k, capacity) is made on the host from the router's
//! probabilities, a `[units, choices]` table: small next to the experts' work. The gates
//! stay tensors, so gradients reach the router through them.

use crate::config::{Granularity, MoeConfig, RouterKind};
use adapters_core::{AuxLoss, ForwardCtx, Point, RoutingStats};
use candle_core::{Result, Tensor, D};
use rand::Rng;

/// What each expert computes in one forward.
pub struct Plan {
    /// Per expert: the flat token indices (into `[batch · seq]`) it runs on.
    pub tokens: Vec<Vec<u32>>,
    /// Per expert, per token: the index of its gate in the flattened gate table.
    pub gate_at: Vec<Vec<u32>>,
    /// The gates, `[units · choices]` flattened; `None` when every gate is `constant_gate`.
    pub gates: Option<Tensor>,
    /// The gate of every assignment when `gates` is `None`.
    pub constant_gate: f64,
    /// The non-padding tokens (flat indices), in order.
    pub kept: Vec<u32>,
    /// Per kept token, its unit (the token itself, or its sequence).
    pub unit_of_kept: Vec<u32>,
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

/// Each unit's choices, best first, before the capacity limit.
fn choose(config: &MoeConfig, probs: Option<&[Vec<f32>]>, units: usize, ctx: &ForwardCtx) -> Vec<Vec<u32>> {
    let e = config.experts as u32;
    match probs {
        Some(probs) => probs
            .iter()
            .map(|p| {
                let mut order: Vec<u32> = (0..p.len() as u32).collect();
                // Highest probability first; ties to the lower index (a stable sort).
                order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]));
                order.truncate(config.top_k);
                order
            })
            .collect(),
        // AdaMix: one expert drawn uniformly per unit in training, all of them otherwise.
        None => match ctx.rng() {
            Some(mut rng) => (0..units).map(|_| vec![rng.random_range(0..e)]).collect(),
            None => (0..units).map(|_| (0..e).collect()).collect(),
        },
    }
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
    let choices_n = config.choices();
    let logits = match (logits, config.router) {
        (Some(l), RouterKind::Noisy) => match ctx.normal_noise(l.dims(), config.noise_std, l.device())? {
            Some(noise) => Some((l + noise)?),
            None => Some(l),
        },
        (l, _) => l,
    };
    // Composed softmax: candle's fused `softmax_last_dim` has no backward pass.
    let probs = logits.as_ref().map(|l| candle_nn::ops::softmax(l, D::Minus1)).transpose()?;
    let probs_host = probs.as_ref().map(|p| p.to_vec2::<f32>()).transpose()?;
    let chosen = choose(config, probs_host.as_deref(), units.count, ctx);

    // Capacity, in unit order: an expert full at its capacity drops later assignments.
    let slots = chosen.first().map_or(1, Vec::len);
    let capacity = config.capacity_factor.map(|cf| (cf * units.count as f64 * slots as f64 / experts as f64).ceil() as usize);
    let mut load = vec![0usize; experts];
    let mut accepted: Vec<Vec<u32>> = Vec::with_capacity(units.count);
    let mut overflowed_units = vec![0usize; units.count];
    for (u, c) in chosen.iter().enumerate() {
        let mut keep = Vec::with_capacity(c.len());
        for &e in c {
            let e_us = e as usize;
            if e_us >= experts {
                continue; // the skip choice: nothing to compute
            }
            if capacity.is_some_and(|cap| load[e_us] >= cap) {
                overflowed_units[u] += 1;
                continue;
            }
            load[e_us] += 1;
            keep.push(e);
        }
        accepted.push(keep);
    }

    // Gates: the router probability (top-1, as Switch), or renormalised over the chosen
    // (top-k > 1, skip included so that it keeps its share); 1/E for the random router.
    let (gates, constant_gate) = match &probs {
        None => (None, if ctx.train { 1.0 } else { 1.0 / experts as f64 }),
        Some(p) if config.top_k == 1 => (Some(p.flatten_all()?), 1.0),
        Some(p) => {
            let mut mask = vec![0f32; units.count * choices_n];
            for (u, c) in chosen.iter().enumerate() {
                for &e in c {
                    mask[u * choices_n + e as usize] = 1.0;
                }
            }
            let mask = Tensor::from_vec(mask, (units.count, choices_n), p.device())?;
            let norm = (p * &mask)?.sum_keepdim(D::Minus1)?;
            (Some(p.broadcast_div(&norm)?.flatten_all()?), 1.0)
        }
    };

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
        let mine = &accepted[u];
        if chosen[u].iter().all(|&e| e as usize >= experts) {
            skipped += 1.0;
        }
        overflowed += overflowed_units[u] as f32;
        for &e in mine {
            let e = e as usize;
            tokens[e].push(token);
            gate_at[e].push((u * choices_n + e) as u32);
            tokens_per_expert[e] += 1.0;
            if let Some(t) = &unit_tasks {
                per_task[t[u] as usize][e] += 1.0;
            }
        }
        if let Some(c) = &mut choices_per_token {
            c[token as usize] = mine.clone();
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
    if ctx.train {
        if let (Some(p), Some(l)) = (&probs, &logits) {
            if config.balance_loss > 0.0 && units.count > 0 {
                let mut f = vec![0f32; choices_n];
                for c in &chosen {
                    for &e in c {
                        f[e as usize] += 1.0 / (units.count * c.len()) as f32;
                    }
                }
                let f = Tensor::from_vec(f, choices_n, p.device())?;
                let mean_p = p.mean(0)?;
                let value = ((mean_p * f)?.sum_all()? * (config.balance_loss * choices_n as f64))?;
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
    Ok(Plan { tokens, gate_at, gates, constant_gate, kept: units.kept, unit_of_kept: units.unit_of_kept, stats })
}
