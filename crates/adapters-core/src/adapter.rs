//! The `Adapter` trait: one named adapter, occupying one or more points of a model.

use crate::capability::Capabilities;
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
    /// The frozen projection itself.
    pub linear: FrozenLinear<'a>,
}

/// A frozen projection as its site lends it to adapters: the map, to re-apply to a changed
/// input (IA3 on a feed-forward input), and its weights, for adapters whose update depends
/// on them (DoRA normalises `W + ΔW` per output row).
#[derive(Clone, Copy)]
pub struct FrozenLinear<'a> {
    /// `x ↦ x Wᵀ + b` (in decoding steps possibly on an 8-bit copy of `W`).
    pub apply: TensorFn<'a>,
    /// `W`, `[out_features, in_features]`, in f32: a view of the base's weight, or over a
    /// quantized (packed) base a transient de-quantised copy, made only when called.
    pub weight: &'a dyn Fn() -> candle_core::Result<Tensor>,
    /// `b`, `[out_features]`, if the projection has one.
    pub bias: Option<&'a Tensor>,
}

/// What the input-embeddings site (and, in decoders, the LM-head input) hands to an adapter.
pub struct EmbeddingIo<'a> {
    /// The token embeddings `[batch, seq, hidden]` (at `lm_head_input`: the final hidden
    /// states, after the final norm).
    pub embeddings: &'a Tensor,
    /// `[batch, seq]` (`u32`, 1 on tokens, 0 on padding); `None` when no row is padded.
    pub mask: Option<&'a Tensor>,
}

impl EmbeddingIo<'_> {
    /// `mask` (`[rows, seq]`) with `virtual_tokens` ones in front of every row: the mask
    /// of embeddings after virtual tokens were prepended.
    pub fn mask_with_virtual_tokens(mask: &Tensor, virtual_tokens: usize) -> Result<Tensor> {
        if virtual_tokens == 0 {
            return Ok(mask.clone());
        }
        Tensor::cat(&[&Tensor::ones((mask.dim(0)?, virtual_tokens), mask.dtype(), mask.device())?, mask], 1)
    }
}

/// Keys and values an adapter prepends to a layer's attention, in the key and value
/// projections' layout: `[rows, prefix, kv_heads * head_dim]` each.
pub struct KeyValuePrefix {
    /// The prefix keys (no position is applied to them).
    pub keys: Tensor,
    /// The prefix values.
    pub values: Tensor,
}

/// What a layer-output site hands to a position-selective intervention.
pub struct InterventionIo<'a> {
    /// The residual stream leaving the layer, `[batch, seq, hidden]`.
    pub hidden: &'a Tensor,
    /// `[batch, seq]` (`u32`, 1 on tokens, 0 on padding); `None` when no row is padded.
    /// Rows are right-padded, so a row's tokens are its first `sum(mask)` positions.
    pub mask: Option<&'a Tensor>,
}

/// An adapter: a small trainable module attached to a frozen backbone.
///
/// One `Adapter` value is one named adapter with all its per-point modules; the backbone
/// calls it at each point it occupies. A kind implements its identity (`kind`, `config`,
/// `points`, `vars`) and the forward of each kind of site its points sit on
/// ([`crate::SiteKind`]); placement rules keep its points to those sites, so the other
/// forwards are never called.
///
/// Anything more (a fused fast path, a low-rank or per-row form, a mergeable delta, a
/// fusion over other adapters, a conditioning need, variables that do not train) is an
/// opt-in capability the adapter hands out through [`Adapter::capabilities`]; see
/// [`crate::capability`] for each, which kinds use it and what it buys.
pub trait Adapter: Send + Sync {
    /// The registered kind name (`seq_bn`, `lora`, ...).
    fn kind(&self) -> &str;

    /// The full configuration, as it would be saved (kind-specific fields).
    fn config(&self) -> serde_json::Value;

    /// The points this adapter occupies.
    fn points(&self) -> Vec<Point>;

    /// Every variable, with a name that is unique within this adapter (all are saved;
    /// all train unless [`Capabilities::partly_frozen`] says otherwise).
    fn vars(&self) -> Vec<(String, Var)>;

    /// At a hidden site (between sublayers): the new sublayer output, replacing
    /// `io.output`. Kinds without hidden points leave it: it is never called for them.
    fn forward_hidden(&self, point: Point, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let _ = (point, ctx);
        Ok(io.output.clone())
    }

    /// At a projection site: the new projection output, replacing `io.output`. Kinds
    /// without projection points leave it: it is never called for them.
    fn forward_projection(&self, point: Point, io: &ProjectionIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let _ = (point, ctx);
        Ok(io.output.clone())
    }

    /// At the input-embeddings site: the new embeddings, `[batch, seq + virtual, hidden]`
    /// (virtual tokens, if any, prepended: prompt tuning); at `lm_head_input`: the new
    /// final hidden states, same shape. Kinds without such points leave it.
    fn forward_embeddings(&self, point: Point, io: &EmbeddingIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let _ = (point, ctx);
        Ok(io.embeddings.clone())
    }

    /// At a key/value-prefix site: the keys and values to prepend for `rows` rows (prefix
    /// tuning); `None` for none. Kinds without such points leave it.
    fn key_value_prefix(&self, point: Point, rows: usize, ctx: &ForwardCtx) -> Result<Option<KeyValuePrefix>> {
        let _ = (point, rows, ctx);
        Ok(None)
    }

    /// At a layer-output site: the new residual stream, changed at the positions the
    /// intervention chooses only (see [`crate::intervention::at_positions`]). Kinds
    /// without such points leave it.
    fn forward_intervention(&self, point: Point, io: &InterventionIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let _ = (point, ctx);
        Ok(io.hidden.clone())
    }

    /// The optional forms this adapter hands out; none by default.
    fn capabilities(&self) -> Capabilities<'_> {
        Capabilities::default()
    }
}

impl dyn Adapter + '_ {
    /// Number of parameters (every variable's elements).
    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Whether training updates the variable `var_name` (one of [`Adapter::vars`]).
    pub fn trains_var(&self, var_name: &str) -> bool {
        self.capabilities().partly_frozen.is_none_or(|p| !p.is_frozen_var(var_name))
    }
}
