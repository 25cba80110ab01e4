//! Capabilities: the optional forms an adapter hands out through
//! [`Adapter::capabilities`], each a small trait of its own.
//!
//! A plain kind needs none of them: the backbone runs its forwards. Each exists because a
//! measured case was slow or impossible without it, and each must agree with the plain
//! forwards where both apply (the family's tests check that).

use crate::adapter::{Adapter, LayerNormWeights, ProjectionIo, SublayerIo};
use crate::context::ForwardCtx;
use crate::point::Point;
use candle_core::{Result, Tensor};

/// What an adapter hands out besides its forwards (all `None` by default).
#[derive(Clone, Copy, Default)]
pub struct Capabilities<'a> {
    /// Its change at a projection is a low-rank term (LoRA).
    pub low_rank: Option<&'a dyn LowRankProjection>,
    /// Its change at a projection is a per-feature scale of the input (IA3).
    pub input_scaled: Option<&'a dyn InputScaled>,
    /// It runs with a post-norm backbone's add-and-norm in one pass (bottleneck, MoE).
    pub fused_post_norm: Option<&'a dyn FusedPostNorm>,
    /// Its rows run batched with other adapters of the same form (bottleneck, LoRA).
    pub row_batched: Option<&'a dyn RowBatched>,
    /// It can be merged into the frozen weights (LoRA).
    pub mergeable: Option<&'a dyn Mergeable>,
    /// It combines other adapters' outputs inside a `fuse(...)` block (AdapterFusion).
    pub fusion: Option<&'a dyn FusionLayer>,
    /// Some of its variables are saved but not trained (a hypernetwork learning a task).
    pub partly_frozen: Option<&'a dyn PartlyFrozen>,
    /// It reads a conditioning vector the backbone computes (instance hypernetworks).
    pub conditioning: Option<ConditioningNeed>,
}

/// A low-rank term a projection adapter adds to the projection output: `down · upᵀ`, with
/// `down` `[..., r]` computed from the projection's input and `up` `[out_features, r]`.
pub struct LowRank {
    /// The r-wide middle, from the projection's input (LoRA: `s · x Aᵀ`).
    pub down: Tensor,
    /// The up projection (LoRA: `B`).
    pub up: Tensor,
}

/// A projection adapter whose whole change is a low-rank term added to the output. Used by
/// LoRA. When such an adapter is the only one at a projection, the backbone adds the term
/// inside its own product ([`adapters_kernels::low_rank_linear`]), so neither the frozen
/// output nor the full-width delta is made or kept for the backward pass: introduced with
/// the MiniLM LoRA training step's heap peak going from 799 to 586 MB (commit 191ebb7,
/// together with the kernels' detached backward inputs).
pub trait LowRankProjection {
    /// The term at `point` for this projection input; `None` where the adapter has none.
    /// Must agree with `forward_projection`: `io.output + down · upᵀ`.
    fn low_rank_term(&self, point: Point, input: &Tensor, ctx: &ForwardCtx) -> Option<Result<LowRank>>;
}

/// A projection adapter whose whole change is a per-feature scale of the projection's
/// input, `W (l ⊙ x) + b` (IA3 at feed-forward inputs). The set scales the input before
/// the frozen product, per row when rows choose their adapters, where the plain
/// `forward_projection` would run the product a second time on the scaled input:
/// introduced when IA3 alone made the MiniLM b32 x s128 forward 1.3x slower than a Pfeiffer
/// adapter, and its rows slowed a mixed batch of five kinds.
pub trait InputScaled {
    /// `l` (`[in_features]`) at `point`; `None` where the adapter scales no input there
    /// (its `forward_projection` then runs). Must agree with `forward_projection`.
    fn input_scale(&self, point: Point) -> Option<Tensor>;
}

/// An adapter at a hidden site of a post-norm backbone (BERT) that computes the site's
/// result `norm(output' + input)` in one pass with the backbone's norm, when it is the only
/// adapter there and no gradient is wanted. Used by the bottleneck family
/// ([`adapters_kernels::bottleneck_add_layer_norm`]) and token-routed sparse MoE
/// ([`adapters_kernels::mixture_add_layer_norm`]): the adapter then costs its own
/// arithmetic, not extra passes over `[tokens, hidden]`. BENCHMARKS.md: a Pfeiffer adapter
/// adds 1.2-2.7% to the MiniLM inference forward, 8 sparse experts (k = 1) 2.0%.
pub trait FusedPostNorm {
    /// The site's normed result at `point`, `norm` being the backbone's `(weight, bias,
    /// eps)`; `None` where this adapter has no fused form (the backbone then runs
    /// `forward_hidden` and its norm, which this must agree with).
    fn add_layer_norm(&self, point: Point, io: &SublayerIo, norm: LayerNormWeights, ctx: &ForwardCtx) -> Option<Result<Tensor>>;
}

/// The form in which an adapter's computation at a point runs together with other
/// adapters' in one batch whose rows use different adapters (mixed-adapter serving).
pub struct BatchableForm {
    /// Equal keys mean equal computation and equal weight shapes (kind, configuration, sizes).
    pub key: String,
    /// The tensors that differ between such adapters, in a fixed order.
    pub weights: Vec<Tensor>,
}

/// An adapter whose rows run in one batched computation with the rows of other adapters
/// of the same [`BatchableForm::key`], over weights stacked per row
/// ([`adapters_kernels::row_linear`]). Used by the bottleneck family and LoRA (and the
/// hypernetwork, which generates bottleneck weights per row). BENCHMARKS.md: 32 Pfeiffer
/// adapters, one row each, cost 1.061x one adapter for the whole MiniLM batch, where 32
/// separate row groups would each pay a forward's worth of small products.
pub trait RowBatched {
    /// The form at `point`; `None`: its rows there run as a group of their own.
    fn batchable_form(&self, point: Point) -> Option<BatchableForm>;

    /// At a hidden site, with weights per row: `weights[j]` stacks tensor `j` of the form
    /// of each row's adapter (`[rows, ...]`). Must agree with each adapter's own
    /// `forward_hidden` on its rows. Kinds without hidden points leave it.
    fn forward_hidden_rows(&self, point: Point, io: &SublayerIo, weights: &[Tensor], ctx: &ForwardCtx) -> Result<Tensor> {
        let _ = (point, weights, ctx);
        Ok(io.output.clone())
    }

    /// At a projection site, with weights per row (as [`RowBatched::forward_hidden_rows`]).
    fn forward_projection_rows(&self, point: Point, io: &ProjectionIo, weights: &[Tensor], ctx: &ForwardCtx) -> Result<Tensor> {
        let _ = (point, weights, ctx);
        Ok(io.output.clone())
    }
}

/// An adapter that can be merged into the frozen base weights, so that inference pays
/// nothing for it (BENCHMARKS.md: MiniLM with LoRA r=12 on q,v merged runs at 0.999x the
/// bare forward, unmerged 1.009x). Used by LoRA (`W + ΔW`) and DoRA (`W` rescaled per row).
pub trait Mergeable {
    /// The weight (`[out, in]`) that replaces the base weight `weight` at a projection point
    /// when merged; `None` where the adapter has nothing there.
    fn merged_weight(&self, point: Point, weight: &Tensor) -> Option<Result<Tensor>>;
    /// The base weight back from the merged one: the inverse of
    /// [`Mergeable::merged_weight`], exact up to float rounding.
    fn unmerged_weight(&self, point: Point, merged: &Tensor) -> Option<Result<Tensor>>;
}

/// One member of a fusion at a site: its output there and the adapter whose conventions
/// (what it reads, where its residual comes from) the fusion follows: the member itself,
/// or the last adapter of a stacked member.
pub struct FuseMember<'a> {
    /// The member adapter (`None` for a member that is not a plain adapter or stack).
    pub adapter: Option<&'a dyn Adapter>,
    /// The sublayer output with this member applied.
    pub output: Tensor,
}

/// What a fusion layer returns at a site.
pub struct Fused {
    /// The new sublayer output.
    pub output: Tensor,
    /// The attention weights over the members, `[batch, seq, members]`.
    pub attention: Tensor,
    /// A regularisation term for the training loss (already weighted), if any.
    pub regularization: Option<Tensor>,
}

/// A fusion layer: the adapter named by a `fuse(...)` block, which combines its members'
/// outputs at a hidden site instead of changing the site itself (AdapterFusion). A setup
/// that names it outside a `fuse(...)` block is refused when it is set.
pub trait FusionLayer {
    /// The names of the adapters it was made over, in order: a `fuse(...)` block without a
    /// fusion name finds it by them.
    fn members(&self) -> Vec<String>;

    /// The new sublayer output at `point` from the members' outputs there.
    fn fuse(&self, point: Point, io: &SublayerIo, members: &[FuseMember], ctx: &ForwardCtx) -> Result<Fused>;
}

/// An adapter some of whose variables are saved but not trained: a hypernetwork learning a
/// new task with its generator frozen trains only its task embeddings.
pub trait PartlyFrozen {
    /// Whether training leaves the variable `var_name` (one of [`Adapter::vars`]) as it is.
    fn is_frozen_var(&self, var_name: &str) -> bool;
}

/// A conditioning vector an adapter reads from [`ForwardCtx::conditioning`] that the
/// backbone computes when the caller gave none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditioningNeed {
    /// Each row's mean input token embedding (`[batch, hidden]`, padding left out):
    /// instance-conditioned hypernetworks.
    MeanTokenEmbedding,
}
