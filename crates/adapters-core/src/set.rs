//! The named adapters attached to one model, the active setup, and the dispatch that
//! backbones call at every point.

use crate::adapter::{Adapter, ProjectionIo, SublayerIo};
use crate::context::ForwardCtx;
use crate::point::Point;
use crate::Error;
use candle_core::{Result, Tensor, Var};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

#[derive(Clone)]
struct Named {
    name: String,
    adapter: Arc<dyn Adapter>,
    points: HashSet<Point>,
}

/// The adapters of one model, by name, and which of them are active.
///
/// The active setup is a stack: the named adapters applied in order at every point they
/// share. A forward context may instead route each row of a batch through its own stack
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
    active: Vec<String>,
    /// Adapters whose weights are merged into the base model: kept for unmerging, never
    /// applied by the hooks.
    merged: HashSet<String>,
    /// For each point, the active adapters there in stack order (rebuilt on change).
    active_at: HashMap<Point, Vec<Arc<dyn Adapter>>>,
}

impl AdapterSet {
    /// Attaches an adapter under `name` (inactive until activated).
    pub fn add(&mut self, name: &str, adapter: Box<dyn Adapter>) -> std::result::Result<(), Error> {
        if self.get(name).is_some() {
            return Err(Error::Adapter(format!("an adapter named `{name}` is already attached; remove it first or pick another name")));
        }
        let points = adapter.points().into_iter().collect();
        self.adapters.push(Named { name: name.to_string(), adapter: Arc::from(adapter), points });
        Ok(())
    }

    /// Detaches an adapter (and drops it from the active setup).
    pub fn remove(&mut self, name: &str) -> std::result::Result<Arc<dyn Adapter>, Error> {
        let i = self.index(name)?;
        if self.merged.contains(name) {
            return Err(Error::Adapter(format!("adapter `{name}` is merged into the base weights; unmerge it first")));
        }
        let named = self.adapters.remove(i);
        self.active.retain(|n| n != name);
        self.rebuild();
        Ok(named.adapter)
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
        for name in names {
            self.index(name)?;
            if self.merged.contains(*name) {
                return Err(Error::Adapter(format!("adapter `{name}` is merged into the base weights; unmerge it to activate it")));
            }
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        self.rebuild();
        Ok(())
    }

    /// Marks an adapter as merged into (or unmerged from) the base weights. The backbone
    /// changes its weights; this only records it and keeps the hooks from applying it.
    pub fn set_merged(&mut self, name: &str, merged: bool) -> std::result::Result<(), Error> {
        self.index(name)?;
        if merged {
            self.merged.insert(name.to_string());
            self.active.retain(|n| n != name);
            self.rebuild();
        } else {
            self.merged.remove(name);
        }
        Ok(())
    }

    /// Whether an adapter is merged into the base weights.
    pub fn is_merged(&self, name: &str) -> bool {
        self.merged.contains(name)
    }

    /// The active stack.
    pub fn active(&self) -> &[String] {
        &self.active
    }

    /// Every trainable variable of the active adapters, as `adapter_name.var_name`.
    pub fn active_vars(&self) -> Vec<(String, Var)> {
        self.active
            .iter()
            .filter_map(|n| self.adapters.iter().find(|a| &a.name == n))
            .flat_map(|a| a.adapter.vars().into_iter().map(move |(v, var)| (format!("{}.{v}", a.name), var)))
            .collect()
    }

    fn index(&self, name: &str) -> std::result::Result<usize, Error> {
        self.adapters
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| Error::Adapter(format!("no adapter named `{name}`; attached: [{}]", self.names().join(", "))))
    }

    fn rebuild(&mut self) {
        self.active_at.clear();
        for name in &self.active {
            let named = self.adapters.iter().find(|a| &a.name == name).expect("active names are attached");
            for &p in &named.points {
                self.active_at.entry(p).or_default().push(named.adapter.clone());
            }
        }
    }

    fn stack_at(&self, stack: &[String], point: Point) -> Result<Vec<Arc<dyn Adapter>>> {
        let mut out = Vec::new();
        for name in stack {
            let named = self
                .adapters
                .iter()
                .find(|a| &a.name == name)
                .ok_or_else(|| candle_core::Error::Msg(format!("row choice names adapter `{name}`, which is not attached")))?;
            if named.points.contains(&point) {
                out.push(named.adapter.clone());
            }
        }
        Ok(out)
    }

    /// Whether any adapter may run at `point` in this forward pass (an active one, or any
    /// when rows choose their own): backbones fuse operations around points where none does.
    pub fn may_act_at(&self, point: Point, ctx: &ForwardCtx) -> bool {
        ctx.row_groups.is_some() || self.active_at.contains_key(&point)
    }

    /// Runs the adapters at a hidden site; returns the (possibly new) sublayer output.
    pub fn hidden(&self, point: Point, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let run = |stack: &[Arc<dyn Adapter>], input: &Tensor, output: &Tensor, ctx: &ForwardCtx| -> Result<Tensor> {
            let mut out = output.clone();
            for a in stack {
                let io = SublayerIo { input, output: &out, post_norm: io.post_norm };
                out = a.forward_hidden(point, &io, ctx)?;
            }
            Ok(out)
        };
        self.dispatch(point, io.input, io.output, ctx, run).and_then(|y| detached_without_grad(y, ctx))
    }

    /// Runs the adapters at a projection site; returns the (possibly new) projection output.
    pub fn projection(&self, point: Point, io: &ProjectionIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let run = |stack: &[Arc<dyn Adapter>], input: &Tensor, output: &Tensor, ctx: &ForwardCtx| -> Result<Tensor> {
            let mut out = output.clone();
            for a in stack {
                let io = ProjectionIo { input, output: &out, linear: io.linear };
                out = a.forward_projection(point, &io, ctx)?;
            }
            Ok(out)
        };
        self.dispatch(point, io.input, io.output, ctx, run).and_then(|y| detached_without_grad(y, ctx))
    }

    /// Applies `run` with the active stack, or per row group when the context routes rows.
    fn dispatch(
        &self,
        point: Point,
        input: &Tensor,
        output: &Tensor,
        ctx: &ForwardCtx,
        run: impl Fn(&[Arc<dyn Adapter>], &Tensor, &Tensor, &ForwardCtx) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let Some(groups) = &ctx.row_groups else {
            return match self.active_at.get(&point) {
                None => Ok(output.clone()),
                Some(stack) => run(stack, input, output, ctx),
            };
        };
        if let Some(name) = self.merged.iter().next() {
            candle_core::bail!(
                "per-row adapter choices need an unmerged base model, but adapter `{name}` is merged into the \
                 base weights (every row would get it); unmerge it first"
            );
        }
        let mut result = output.clone();
        for group in groups {
            let stack = self.stack_at(&group.stack, point)?;
            if stack.is_empty() {
                continue;
            }
            let rows_in = input.index_select(&group.rows, 0)?;
            let rows_out = output.index_select(&group.rows, 0)?;
            let new_rows = run(&stack, &rows_in, &rows_out, &ctx.for_rows(&group.rows)?)?;
            result = result.index_add(&group.rows, &(new_rows - rows_out)?, 0)?;
        }
        Ok(result)
    }
}

/// `y` cut from the autograd graph when the context wants no gradients: trainable
/// adapters would otherwise make every later tensor of an inference pass track its history.
fn detached_without_grad(y: Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
    Ok(if ctx.no_grad && y.track_op() { y.detach() } else { y })
}
