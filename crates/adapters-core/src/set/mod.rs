//! The named adapters attached to one model, the active setup, and the dispatch that
//! backbones call at every point.

use crate::adapter::{Adapter, AddNormFn, FrozenLinear, LayerNormWeights, SublayerIo};
use crate::capability::ConditioningNeed;
use crate::context::{ForwardCtx, StackRows};
use crate::point::Point;
use crate::setup::Setup;
use crate::Error;
use adapters_kernels as kernels;
use candle_core::{Result, Tensor, Var};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

mod composition;
mod rows;
mod stacked_sites;
pub use stacked_sites::PrefixKv;

#[derive(Clone)]
struct Named {
    name: String,
    adapter: Arc<dyn Adapter>,
    points: HashSet<Point>,
}

/// The adapters of one model, by name, and the active setup: a composition tree
/// ([`Setup`]: stack, fuse, parallel, average, batch_split, split) over their names.
/// Activating a list of names makes a stack of them.
///
/// A forward context may instead route each row of a batch through its own stack
/// (`ForwardCtx::with_row_choices`); rows that share a stack are computed together.
///
/// Cloning is cheap (adapters are shared `Arc`s), so a backbone can hand out immutable
/// snapshots and change a copy.
///
/// Merged adapters live in the base weights, which every row shares, so per-row choices
/// are refused while any adapter is merged: a row could neither drop nor repeat it.
#[derive(Clone, Default)]
pub struct AdapterSet {
    adapters: Vec<Named>,
    setup: Option<Setup>,
    /// Adapters whose weights are merged into the base model: kept for unmerging, never
    /// applied by the hooks.
    merged: HashSet<String>,
    /// Adapters that run but do not train (fusion members in the second stage).
    frozen: HashSet<String>,
    /// The active setup resolved at each point it touches (rebuilt on change), so a
    /// forward finds `Arc`s rather than names.
    resolved: HashMap<Point, Node>,
}

/// A setup resolved at one point: only the adapters that occupy it.
#[derive(Clone)]
enum Node {
    Adapter(Arc<dyn Adapter>),
    Stack(Vec<Node>),
    Fuse {
        name: String,
        fusion: Arc<dyn Adapter>,
        members: Vec<Node>,
    },
    /// Children absent at this point are `None`: they pass their input through.
    Parallel(Vec<Option<Node>>),
    Average {
        children: Vec<Option<Node>>,
        weights: Vec<f32>,
    },
    BatchSplit {
        children: Vec<Option<Node>>,
        sizes: Vec<usize>,
    },
    Split {
        children: Vec<Option<Node>>,
        splits: Vec<usize>,
    },
}

impl Node {
    /// The one adapter this node runs: itself, or a stack of one.
    fn single(&self) -> Option<&Arc<dyn Adapter>> {
        match self {
            Node::Adapter(a) => Some(a),
            Node::Stack(children) => match children.as_slice() {
                [Node::Adapter(a)] => Some(a),
                _ => None,
            },
            _ => None,
        }
    }

    /// The adapter whose conventions a fusion follows for this member: the last one.
    fn last_adapter(&self) -> Option<&Arc<dyn Adapter>> {
        match self {
            Node::Adapter(a) => Some(a),
            Node::Stack(children) => children.last().and_then(Node::last_adapter),
            _ => None,
        }
    }
}

/// The frozen part of a site that it lends to its adapters besides its input and output:
/// a hidden site's post-norm, a projection's linear map.
#[derive(Clone, Copy)]
enum LentBySite<'a> {
    Hidden(Option<AddNormFn<'a>>),
    Projection(FrozenLinear<'a>),
}

impl AdapterSet {
    /// Attaches an adapter under `name` (inactive until activated).
    pub fn add(&mut self, name: &str, adapter: Box<dyn Adapter>) -> std::result::Result<(), Error> {
        self.add_shared(name, Arc::from(adapter))
    }

    /// Attaches an adapter that other sets share (a server's batch borrows its resident
    /// adapters without copying them); inactive until activated.
    pub fn add_shared(&mut self, name: &str, adapter: Arc<dyn Adapter>) -> std::result::Result<(), Error> {
        if self.get(name).is_some() {
            return Err(Error::Adapter(format!("an adapter named `{name}` is already attached; remove it first or pick another name")));
        }
        let points = adapter.points().into_iter().collect();
        self.adapters.push(Named { name: name.to_string(), adapter, points });
        Ok(())
    }

    /// Detaches an adapter (and drops the active setup if it uses it).
    pub fn remove(&mut self, name: &str) -> std::result::Result<Arc<dyn Adapter>, Error> {
        let i = self.index(name)?;
        if self.merged.contains(name) {
            return Err(Error::Adapter(format!("adapter `{name}` is merged into the base weights; unmerge it first")));
        }
        let named = self.adapters.remove(i);
        self.frozen.remove(name);
        if self.setup.as_ref().is_some_and(|s| s.adapter_names().iter().chain(&s.fusion_names()).any(|n| n == name)) {
            self.setup = None;
        }
        self.rebuild()?;
        Ok(named.adapter)
    }

    /// Whether an attached adapter needs a conditioning vector of this kind that the
    /// backbone computes (see [`crate::capability::ConditioningNeed`]).
    pub fn needs_conditioning(&self, need: ConditioningNeed) -> bool {
        self.adapters.iter().any(|a| a.adapter.capabilities().conditioning == Some(need))
    }

    /// Names of the attached adapters, in attach order.
    pub fn names(&self) -> Vec<&str> {
        self.adapters.iter().map(|a| a.name.as_str()).collect()
    }

    /// The adapter attached under `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Adapter>> {
        self.adapters.iter().find(|a| a.name == name).map(|a| &a.adapter)
    }

    /// Makes `names` the active stack (applied in this order); `&[]` deactivates all.
    pub fn activate(&mut self, names: &[&str]) -> std::result::Result<(), Error> {
        if names.is_empty() {
            return self.set_setup(None);
        }
        self.set_setup(Some(Setup::stack(names)))
    }

    /// Makes `setup` the active composition (`None`: no adapter). Checked once here (see
    /// [`AdapterSet::check_setup`]); a refused setup leaves the active one in place.
    pub fn set_setup(&mut self, setup: Option<Setup>) -> std::result::Result<(), Error> {
        let setup = setup.map(|s| self.with_fusion_names(s)).transpose()?;
        let resolved = match &setup {
            Some(s) => self.resolve_all(s)?,
            None => HashMap::new(),
        };
        (self.setup, self.resolved) = (setup, resolved);
        Ok(())
    }

    /// Checks a setup against the attached adapters without activating it: the tree's
    /// shape, that every name is attached and not merged, that each `fuse` block has its
    /// fusion layer, and that a fusion's members and layer occupy the same hidden sites.
    pub fn check_setup(&self, setup: &Setup) -> std::result::Result<(), Error> {
        self.resolve_all(&self.with_fusion_names(setup.clone())?).map(|_| ())
    }

    /// `setup` with a fusion layer named in every `fuse(...)` block: the one attached under
    /// AdapterHub's name for it (`a,b`), else the one attached fusion layer made over
    /// exactly these members; an error lists the attached fusion layers when none is.
    pub fn with_fusion_names(&self, mut setup: Setup) -> std::result::Result<Setup, Error> {
        self.name_fusions(&mut setup)?;
        Ok(setup)
    }

    fn name_fusions(&self, setup: &mut Setup) -> std::result::Result<(), Error> {
        if let Setup::Fuse { children, fusion: fusion @ None } = setup {
            *fusion = Some(self.fusion_over(children)?);
        }
        setup.children_mut().iter_mut().try_for_each(|child| self.name_fusions(child))
    }

    /// The fusion layer a `fuse(...)` block without a name means: the one attached under
    /// AdapterHub's name for it (`a,b`), else the one attached fusion layer made over
    /// exactly these members, in this order.
    fn fusion_over(&self, children: &[Setup]) -> std::result::Result<String, Error> {
        let hub_name = Setup::default_fusion_name(children);
        if self.index(&hub_name).is_ok() {
            return Ok(hub_name);
        }
        let members: Vec<String> = children.iter().flat_map(Setup::adapter_names).collect();
        for member in &members {
            self.index(member)?;
        }
        let fusions: Vec<(&str, Vec<String>)> =
            self.adapters.iter().filter_map(|a| a.adapter.capabilities().fusion.map(|f| (a.name.as_str(), f.members()))).collect();
        let matching: Vec<&str> = fusions.iter().filter(|(_, m)| *m == members).map(|(n, _)| *n).collect();
        match matching.as_slice() {
            [one] => Ok(one.to_string()),
            [] => {
                let attached: Vec<String> = fusions.iter().map(|(n, m)| format!("`{n}` over [{}]", m.join(", "))).collect();
                Err(Error::Setup(format!(
                    "no fusion layer over [{}] is attached (AdapterHub would name it `{hub_name}`); attached fusion layers: {}; \
                     load the fusion trained over these adapters, or name one with `fuse(...; fusion=NAME)`",
                    members.join(", "),
                    if attached.is_empty() { "none".to_string() } else { attached.join(", ") }
                )))
            }
            many => Err(Error::Setup(format!(
                "several attached fusion layers are made over [{}]: {}; name one with `fuse(...; fusion=NAME)`",
                members.join(", "),
                many.join(", ")
            ))),
        }
    }

    /// The active setup, if any.
    pub fn setup(&self) -> Option<&Setup> {
        self.setup.as_ref()
    }

    /// Marks an adapter as merged into (or unmerged from) the base weights. The backbone
    /// changes its weights; this only records it and keeps the hooks from applying it.
    pub fn set_merged(&mut self, name: &str, merged: bool) -> std::result::Result<(), Error> {
        self.index(name)?;
        if merged {
            let setup = match &self.setup {
                Some(s) => s.without(name)?,
                None => None,
            };
            self.merged.insert(name.to_string());
            self.setup = setup;
            self.rebuild()?;
        } else {
            self.merged.remove(name);
        }
        Ok(())
    }

    /// Whether an adapter is merged into the base weights.
    pub fn is_merged(&self, name: &str) -> bool {
        self.merged.contains(name)
    }

    /// Keeps an adapter out of (or back in) the trainable variables: it still runs.
    pub fn set_frozen(&mut self, name: &str, frozen: bool) -> std::result::Result<(), Error> {
        self.index(name)?;
        if frozen {
            self.frozen.insert(name.to_string());
        } else {
            self.frozen.remove(name);
        }
        Ok(())
    }

    /// Whether an adapter is frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.frozen.contains(name)
    }

    /// The adapters the active setup uses, left to right (fusion layers not included).
    pub fn active(&self) -> Vec<String> {
        self.setup.as_ref().map(Setup::adapter_names).unwrap_or_default()
    }

    /// Every trainable variable of the active setup (its adapters and fusion layers, less
    /// frozen ones), as `adapter_name.var_name`.
    pub fn active_vars(&self) -> Vec<(String, Var)> {
        let names = self.setup.as_ref().map(|s| [s.adapter_names(), s.fusion_names()].concat()).unwrap_or_default();
        let mut seen = HashSet::new();
        names
            .into_iter()
            .filter(|n| !self.frozen.contains(n) && seen.insert(n.clone()))
            .filter_map(|n| self.adapters.iter().find(|a| a.name == n))
            .flat_map(|a| a.adapter.vars().into_iter().map(move |(v, var)| (format!("{}.{v}", a.name), var)))
            .collect()
    }

    fn index(&self, name: &str) -> std::result::Result<usize, Error> {
        self.adapters
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| Error::Adapter(format!("no adapter named `{name}`; attached: [{}]", self.names().join(", "))))
    }

    fn named(&self, name: &str) -> std::result::Result<&Named, Error> {
        self.index(name).map(|i| &self.adapters[i])
    }

    /// Re-resolves the active setup after the attached adapters changed.
    fn rebuild(&mut self) -> std::result::Result<(), Error> {
        self.resolved = match &self.setup {
            Some(s) => self.resolve_all(s)?,
            None => HashMap::new(),
        };
        Ok(())
    }

    /// `setup` checked and resolved at every point its adapters occupy.
    fn resolve_all(&self, setup: &Setup) -> std::result::Result<HashMap<Point, Node>, Error> {
        setup.validate()?;
        for name in setup.adapter_names().iter().chain(&setup.fusion_names()) {
            self.index(name)?;
            if self.merged.contains(name) {
                return Err(Error::Adapter(format!("adapter `{name}` is merged into the base weights; unmerge it to activate it")));
            }
        }
        // In order, so that an error names the same point every time.
        let points: BTreeSet<Point> =
            setup.adapter_names().iter().filter_map(|n| self.named(n).ok()).flat_map(|n| n.points.iter().copied()).collect();
        let mut resolved = HashMap::new();
        for p in points {
            if let Some(node) = self.resolve(setup, p)? {
                resolved.insert(p, node);
            }
        }
        Ok(resolved)
    }

    /// `setup` at `point`: only what occupies it; `None` when nothing does.
    fn resolve(&self, setup: &Setup, point: Point) -> std::result::Result<Option<Node>, Error> {
        let each = |children: &[Setup]| children.iter().map(|c| self.resolve(c, point)).collect::<std::result::Result<Vec<_>, _>>();
        let some = |nodes: Vec<Option<Node>>| if nodes.iter().all(Option::is_none) { None } else { Some(nodes) };
        Ok(match setup {
            Setup::Adapter { name } => {
                let named = self.named(name)?;
                if named.adapter.capabilities().fusion.is_some() {
                    return Err(Error::Setup(format!(
                        "`{name}` is a fusion layer: it combines its members inside a `fuse(...)` block and does not \
                         run on its own; activate e.g. `fuse(a, b)` with the adapters it was trained over"
                    )));
                }
                named.points.contains(&point).then(|| Node::Adapter(named.adapter.clone()))
            }
            Setup::Stack { children } => {
                let nodes: Vec<Node> = each(children)?.into_iter().flatten().collect();
                (!nodes.is_empty()).then_some(Node::Stack(nodes))
            }
            Setup::Fuse { children, fusion } => {
                let name = fusion.clone().unwrap_or_else(|| Setup::default_fusion_name(children));
                let layer = self.named(&name)?;
                if layer.adapter.capabilities().fusion.is_none() {
                    return Err(Error::Setup(format!(
                        "`{setup}`: `{name}` is a `{}` adapter, not a fusion layer; train or load a fusion layer over \
                         these adapters and name it",
                        layer.adapter.kind()
                    )));
                }
                for member in children.iter().flat_map(Setup::adapter_names) {
                    let named = self.named(&member)?;
                    if named.points.iter().all(|p| p.site.is_projection()) {
                        return Err(Error::Setup(format!(
                            "`{setup}`: `{member}` sits on projections; fusion combines adapters at hidden sites \
                             (bottleneck adapters), so stack projection adapters (LoRA, IA3) under or over the fusion instead"
                        )));
                    }
                    if !named.points.iter().any(|p| p.site.is_hidden()) {
                        return Err(Error::Setup(format!(
                            "`{setup}`: `{member}` has no hidden site; fusion combines adapters at hidden sites \
                             (bottleneck adapters), so stack `{member}` under or over the fusion instead"
                        )));
                    }
                }
                let members = each(children)?;
                if members.iter().all(Option::is_none) {
                    return Ok(None);
                }
                if let Some(i) = members.iter().position(Option::is_none) {
                    return Err(Error::Setup(format!(
                        "`{setup}`: `{}` has no adapter at {point}, where the other members have one; fused adapters \
                         must share their sites",
                        children[i]
                    )));
                }
                if !layer.points.contains(&point) {
                    return Err(Error::Setup(format!(
                        "`{setup}`: the fusion layer `{name}` has no layer at {point}, where its members sit"
                    )));
                }
                Some(Node::Fuse { name, fusion: layer.adapter.clone(), members: members.into_iter().flatten().collect() })
            }
            Setup::Parallel { children } => some(each(children)?).map(Node::Parallel),
            Setup::Average { children, weights } => some(each(children)?).map(|c| Node::Average { children: c, weights: weights.clone() }),
            Setup::BatchSplit { children, sizes } => some(each(children)?).map(|c| Node::BatchSplit { children: c, sizes: sizes.clone() }),
            Setup::Split { children, splits } => some(each(children)?).map(|c| Node::Split { children: c, splits: splits.clone() }),
        })
    }

    /// Whether any adapter may run at `point` in this forward pass (an active one, or any
    /// when rows choose their own): backbones fuse operations around points where none does.
    pub fn may_act_at(&self, point: Point, ctx: &ForwardCtx) -> bool {
        let Some(groups) = &ctx.rows_by_stack else { return self.resolved.contains_key(&point) };
        // A name not attached may act: the dispatch reports it.
        let acts = |name: &String| self.adapters.iter().find(|a| a.name == *name).is_none_or(|a| a.points.contains(&point));
        groups.iter().any(|g| g.stack.iter().any(acts))
    }

    /// How many copies of the batch the active setup asks the backbone to run (its
    /// `parallel` block's children; 1 without one).
    pub fn parallel_width(&self) -> usize {
        self.setup.as_ref().map_or(1, Setup::parallel_width)
    }

    /// Runs the adapters at a hidden site; returns the (possibly new) sublayer output.
    pub fn hidden(&self, point: Point, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
        self.dispatch(point, io.input, io.output, LentBySite::Hidden(io.post_norm), ctx).and_then(|y| detached_without_grad(y, ctx))
    }

    /// The projection at `point` of `x` with its adapters: `linear` on the input, scaled
    /// first where the adapter (of the batch, or of a row) is an input scale (see
    /// [`crate::capability::InputScaled`]), then the other adapters' changes to the output.
    pub fn projection(&self, point: Point, x: &Tensor, linear: FrozenLinear, ctx: &ForwardCtx) -> Result<Tensor> {
        let y = match &ctx.rows_by_stack {
            None => match self.resolved.get(&point).and_then(|node| input_scale(node, point)) {
                // The adapter's whole change: nothing left to dispatch.
                Some(l) => return detached_without_grad((linear.apply)(&x.broadcast_mul(&l)?)?, ctx),
                None => (linear.apply)(x)?,
            },
            Some(groups) => self.rows_product(point, x, &linear, groups)?,
        };
        self.dispatch(point, x, &y, LentBySite::Projection(linear), ctx).and_then(|y| detached_without_grad(y, ctx))
    }

    /// A projection `x Wᵀ + b` (frozen `W`, `b`) with the adapters at `point` applied, when
    /// they are one adapter with a low-rank term (see
    /// [`crate::capability::LowRankProjection`]): the
    /// term is added inside the product. `None` when they are not; the backbone then
    /// computes the projection and calls [`AdapterSet::projection`].
    pub fn low_rank_projection(
        &self,
        point: Point,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<Option<Tensor>> {
        let Some(adapter) = self.single_adapter(point, ctx) else { return Ok(None) };
        let Some(low_rank) = adapter.capabilities().low_rank else { return Ok(None) };
        let Some(term) = low_rank.low_rank_term(point, x, ctx).transpose()? else { return Ok(None) };
        detached_without_grad(kernels::low_rank_linear(x, weight, bias, &term.down, &term.up)?, ctx).map(Some)
    }

    /// `layer_norm(output' + input)` at a hidden site of a post-norm backbone, `output'`
    /// being the sublayer output with the adapters at `point` applied, in one fused pass
    /// when they are one adapter that has one (see [`crate::capability::FusedPostNorm`]),
    /// or rows choose adapters that all have one, and no gradient is wanted. `None` otherwise; the backbone then calls
    /// [`AdapterSet::hidden`] and its norm.
    pub fn hidden_add_layer_norm(&self, point: Point, io: &SublayerIo, norm: LayerNormWeights, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        if ctx.is_training() || ctx.builds_graph() {
            return Ok(None);
        }
        if let Some(groups) = &ctx.rows_by_stack {
            return self.rows_add_layer_norm(point, io, norm, groups, ctx);
        }
        let Some(adapter) = self.single_adapter(point, ctx) else { return Ok(None) };
        let Some(fused) = adapter.capabilities().fused_post_norm else { return Ok(None) };
        fused.add_layer_norm(point, io, norm, ctx).transpose()
    }

    /// The one adapter the active setup runs at `point` (alone, or as a stack of one), when
    /// rows do not choose their own.
    fn single_adapter(&self, point: Point, ctx: &ForwardCtx) -> Option<&Arc<dyn Adapter>> {
        if ctx.rows_by_stack.is_some() {
            return None;
        }
        self.resolved.get(&point)?.single()
    }

    /// Each row group's stack resolved at `point` (groups with nothing there left out);
    /// refused while an adapter is merged into the weights every row shares.
    fn row_nodes<'a>(&self, point: Point, groups: &'a [StackRows]) -> Result<Vec<(&'a StackRows, Node)>> {
        if let Some(name) = self.merged.iter().next() {
            candle_core::bail!(
                "per-row adapter choices need an unmerged base model, but adapter `{name}` is merged into the \
                 base weights (every row would get it); unmerge it first"
            );
        }
        let mut nodes = Vec::new();
        for group in groups {
            let node = self.resolve(&Setup::stack(&group.stack), point).map_err(|e| candle_core::Error::Msg(format!("row choice: {e}")))?;
            nodes.extend(node.map(|n| (group, n)));
        }
        Ok(nodes)
    }
}

/// The input scale `node` applies at a projection `point`, when it is one adapter whose
/// whole change there is one.
fn input_scale(node: &Node, point: Point) -> Option<Tensor> {
    node.single()?.capabilities().input_scaled?.input_scale(point)
}

/// `y` cut from the autograd graph when the context wants no gradients: trainable
/// adapters would otherwise make every later tensor of an inference pass track its history.
fn detached_without_grad(y: Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
    Ok(if !ctx.builds_graph() && y.track_op() { y.detach() } else { y })
}
