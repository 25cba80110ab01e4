//! The `Adapter` trait: one named adapter, occupying one or more points of a model.

use crate::context::ForwardCtx;
use crate::point::Point;
use candle_core::{Result, Tensor, Var};

/// A frozen function of a tensor that a site lends to adapters (a projection).
pub type TensorFn<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

/// A frozen norm of a sum that a site lends to adapters: `norm(a + b)` in one fused step.
pub type AddNormFn<'a> = &'a dyn Fn(&Tensor, &Tensor) -> Result<Tensor>;

/// A backbone's layer norm: `(weight, bias, eps)`.
pub type LayerNormWeights<'a> = (&'a Tensor, &'a Tensor, f64);

/// What a hidden site (between sublayers) hands to an adapter.
pub struct SublayerIo<'a> {
    /// The residual stream entering the sublayer, `[batch, seq, hidden]`.
    pub input: &'a Tensor,
    /// The sublayer's output before the residual add, `[batch, seq, hidden]`.
    pub output: &'a Tensor,
    /// The backbone's norm applied after the residual add (post-norm models such as BERT),
    /// as `post_norm(output, input) = norm(output + input)`; `None` for pre-norm models
    /// (Llama). Pfeiffer adapters read their input through it.
    pub post_norm: Option<AddNormFn<'a>>,
}

/// What a projection site hands to an adapter.
pub struct ProjectionIo<'a> {
    /// The projection's input, `[batch, seq, in_features]`.
    pub input: &'a Tensor,
    /// The projection's output `W x + b`, `[batch, seq, out_features]`.
    pub output: &'a Tensor,
    /// The frozen projection itself, so an adapter can re-apply it to a changed input.
    pub linear: TensorFn<'a>,
}

/// A low-rank term a projection adapter adds to the projection output: `down · upᵀ`, with
/// `down` `[..., r]` computed from the projection's input and `up` `[out_features, r]`.
pub struct LowRank {
    /// The r-wide middle, from the projection's input (LoRA: `s · x Aᵀ`).
    pub down: Tensor,
    /// The up projection (LoRA: `B`).
    pub up: Tensor,
}

/// How an adapter's computation at a point runs together with other adapters' in one
/// batch whose rows use different adapters (mixed-adapter serving): adapters with equal
/// `key`s compute the same function of different `weights`, so the rows of all of them
/// go through one batched computation over the weights stacked per row
/// ([`Adapter::forward_hidden_rows`], [`Adapter::forward_projection_rows`]).
pub struct RowBatch {
    /// Equal keys mean equal computation and equal weight shapes (kind, configuration, sizes).
    pub key: String,
    /// The tensors that differ between such adapters, in a fixed order.
    pub weights: Vec<Tensor>,
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

/// An adapter: a small trainable module attached to a frozen backbone.
///
/// One `Adapter` value is one named adapter with all its per-point modules; the backbone
/// calls it at each point it occupies. A kind implements the forward for the site kinds
/// it supports; the other one keeps the default, which is never called because placement
/// rules reject unsupported sites at construction.
pub trait Adapter: Send + Sync {
    /// The registered kind name (`seq_bn`, `lora`, ...).
    fn kind(&self) -> &str;

    /// The full configuration, as it would be saved (kind-specific fields).
    fn config(&self) -> serde_json::Value;

    /// The points this adapter occupies.
    fn points(&self) -> Vec<Point>;

    /// Every trainable variable, with a name that is unique within this adapter.
    fn vars(&self) -> Vec<(String, Var)>;

    /// At a hidden site: the new sublayer output (replacing `io.output`).
    fn forward_hidden(&self, point: Point, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let _ = (io, ctx);
        candle_core::bail!("adapter kind `{}` has no hidden-site forward ({point})", self.kind())
    }

    /// At a projection site: the new projection output (replacing `io.output`).
    fn forward_projection(&self, point: Point, io: &ProjectionIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let _ = (io, ctx);
        candle_core::bail!("adapter kind `{}` has no projection forward ({point})", self.kind())
    }

    /// At a projection site, for kinds whose whole change is a low-rank term added to the
    /// output (LoRA): that term. When such an adapter is the only one at a projection, the
    /// backbone adds the term inside its own product, so neither its frozen output nor the
    /// full-width delta is stored for the backward pass. `None` (the default) otherwise;
    /// `forward_projection` must agree with `io.output + down · upᵀ`.
    fn low_rank_projection(&self, point: Point, input: &Tensor, ctx: &ForwardCtx) -> Option<Result<LowRank>> {
        let _ = (point, input, ctx);
        None
    }

    /// At a hidden site of a post-norm backbone, when this adapter is the only one there
    /// and no gradient is wanted: the site's result `norm(output' + input)` (`output'`
    /// being `forward_hidden`'s) computed in one pass with the backbone's norm `(weight,
    /// bias, eps)`, e.g. by [`adapters_kernels::bottleneck_add_layer_norm`] or
    /// [`adapters_kernels::mixture_add_layer_norm`]: the adapter's work then costs its own
    /// arithmetic, not extra passes over `[tokens, hidden]`. `None` (the default): the
    /// backbone runs `forward_hidden` and its norm, which this must agree with.
    fn hidden_add_layer_norm(&self, point: Point, io: &SublayerIo, norm: LayerNormWeights, ctx: &ForwardCtx) -> Option<Result<Tensor>> {
        let _ = (point, io, norm, ctx);
        None
    }

    /// The form in which this adapter runs at `point` batched with other adapters, each
    /// on its own rows; `None` (the default): its rows run as a group of their own.
    fn row_batch(&self, point: Point) -> Option<RowBatch> {
        let _ = point;
        None
    }

    /// At a hidden site, with weights per row: `weights[j]` stacks tensor `j` of the
    /// [`RowBatch`] of each row's adapter (`[rows, ...]`), adapters that share this one's
    /// key. Must agree with each adapter's own `forward_hidden` on its rows.
    fn forward_hidden_rows(&self, point: Point, io: &SublayerIo, weights: &[Tensor], ctx: &ForwardCtx) -> Result<Tensor> {
        let _ = (io, weights, ctx);
        candle_core::bail!("adapter kind `{}` has no per-row hidden-site forward ({point})", self.kind())
    }

    /// At a projection site, with weights per row (as [`Adapter::forward_hidden_rows`]).
    fn forward_projection_rows(&self, point: Point, io: &ProjectionIo, weights: &[Tensor], ctx: &ForwardCtx) -> Result<Tensor> {
        let _ = (io, weights, ctx);
        candle_core::bail!("adapter kind `{}` has no per-row projection forward ({point})", self.kind())
    }

    /// As the fusion layer of a `fuse(...)` block at a hidden site: combines the members'
    /// outputs there into the new sublayer output. Only fusion kinds implement it.
    fn fuse_hidden(&self, point: Point, io: &SublayerIo, members: &[FuseMember], ctx: &ForwardCtx) -> Result<Fused> {
        let _ = (io, members, ctx);
        candle_core::bail!("adapter kind `{}` cannot fuse adapters ({point}); use a fusion layer in `fuse(...)`", self.kind())
    }

    /// The weight delta `ΔW` (`[out, in]`) this adapter adds at a projection point, for
    /// kinds that can be merged into the base weight; `None` otherwise.
    fn merge_delta(&self, point: Point) -> Option<Result<Tensor>> {
        let _ = point;
        None
    }

    /// Whether training updates the variable `name` (one of [`Adapter::vars`], which all
    /// are saved). All by default; a hypernetwork learning a new task with its generator
    /// frozen trains only its task embeddings.
    fn trains(&self, name: &str) -> bool {
        let _ = name;
        true
    }

    /// Whether this adapter reads each row's mean input token embedding (`[batch, hidden]`,
    /// padding left out) as the forward context's `conditioning`: instance-conditioned
    /// hypernetworks do. Backbones compute it before their layers when an attached adapter
    /// asks and the caller gave no conditioning. `false` by default.
    fn wants_mean_token_embedding(&self) -> bool {
        false
    }

    /// Number of trainable parameters.
    fn num_parameters(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }
}
