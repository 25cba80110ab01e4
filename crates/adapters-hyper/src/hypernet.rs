//! The hypernetwork adapter (`hyper_bn`): one shared generator that writes a Pfeiffer
//! bottleneck adapter for every (row, layer, site) from a conditioning vector.
//!
//! A row's vector (its task's embedding, a caller's vector in that space, or its input's
//! mean token embedding through a learned projection) is joined with the layer's and the
//! site's embeddings, projected to a small code (`Linear → ReLU → Linear`, then a layer
//! norm without parameters so the code's scale cannot drift), and every generator head
//! turns the code into one of the adapter's tensors: `G · code + c`. The generated
//! adapters run through the bottleneck family's per-row forward, so a batch mixing tasks
//! is one forward with per-row weights, and an exported adapter computes the same function.

use crate::config::{Conditioning, HyperConfig, TrainParts, KIND};
use adapters_bottleneck::Bottleneck;
use adapters_core::{
    io, Adapter, BuildArgs, Capabilities, ConditioningNeed, Error, ForwardCtx, Init, PartlyFrozen, Point, RowBatched, Site, SublayerIo,
};
use adapters_kernels as kernels;
use candle_core::{DType, Device, Result, Tensor, Var};

/// One generated tensor: `G · code + c`, reshaped.
struct Head {
    /// The generated tensor's name in a `seq_bn` adapter (`adapter_down.weight`, ...).
    name: &'static str,
    shape: Vec<usize>,
    /// `[elements, code_dim]`.
    g: Var,
    /// `[elements]`: the tensor every code starts from.
    c: Var,
}

/// A `hyper_bn` adapter.
pub struct HyperNet {
    config: HyperConfig,
    points: Vec<Point>,
    /// The sites it occupies, in the order of `site_table`'s rows.
    sites: Vec<Site>,
    /// Task conditioning: `[tasks, task_dim]`.
    task_table: Option<Var>,
    /// Instance conditioning: `[task_dim, hidden]` and `[task_dim]`.
    instance: Option<(Var, Var)>,
    /// `[num_layers, position_dim]`.
    layer_table: Var,
    /// `[sites, position_dim]`.
    site_table: Var,
    /// `[projector_hidden, task_dim + 2 · position_dim]`, `[projector_hidden]`.
    projector_in: (Var, Var),
    /// `[code_dim, projector_hidden]`, `[code_dim]`.
    projector_out: (Var, Var),
    heads: Vec<Head>,
    /// A `seq_bn` adapter of the generated layout at the same points: its per-row forward
    /// runs the generated weights (its own tensors are never used).
    template: Bottleneck,
}

fn var(t: Tensor) -> Result<Var> {
    Var::from_tensor(&t)
}

impl HyperNet {
    /// Builds a hypernetwork from registry arguments.
    pub fn build(args: &BuildArgs) -> std::result::Result<Self, Error> {
        let config = HyperConfig::parse(args.config)?;
        let specs = args.placement.expand(args.model, &[Site::FfnOutput], |s| s.is_hidden())?;
        let bad = |m: String| Error::Config { kind: KIND.into(), message: m };
        if !args.placement.sizes.is_empty() {
            return Err(bad("one generator writes every layer's adapter, so all have one size: drop `placement.sizes`".into()));
        }
        let d = args.model.hidden_size;
        let r = config.bottleneck(d);
        let mut sites: Vec<Site> = Vec::new();
        for s in &specs {
            if !sites.contains(&s.point.site) {
                sites.push(s.point.site);
            }
        }
        let template_config = serde_json::json!({
            "reduction_factor": config.reduction_factor,
            "non_linearity": config.non_linearity,
            "ln_before": config.layer_norm,
        });
        let template = Bottleneck::build(
            &adapters_bottleneck::config::SEQ_BN,
            &BuildArgs { config: &template_config, placement: args.placement, model: args.model, device: args.device, seed: 0 },
        )?;

        let dev = args.device;
        let mut init = Init::new(args.seed);
        let (td, pd, ph, cd) = (config.task_dim, config.position_dim, config.projector_hidden, config.code_dim);
        let (task_table, instance) = match config.conditioning {
            Conditioning::Task => (Some(var(init.normal((config.tasks.len(), td), 1.0, dev)?)?), None),
            Conditioning::Instance => (None, Some((var(init.kaiming_uniform(td, d, dev)?)?, var(Tensor::zeros(td, DType::F32, dev)?)?))),
        };
        let layer_table = var(init.normal((args.model.num_layers, pd), 1.0, dev)?)?;
        let site_table = var(init.normal((sites.len(), pd), 1.0, dev)?)?;
        let projector_in = (var(init.kaiming_uniform(ph, td + 2 * pd, dev)?)?, var(Tensor::zeros(ph, DType::F32, dev)?)?);
        let projector_out = (var(init.kaiming_uniform(cd, ph, dev)?)?, var(Tensor::zeros(cd, DType::F32, dev)?)?);

        // Every code starts from a small random adapter (`c`: normal weights, zero biases,
        // unit norm weights) and the weight heads add a task-dependent part half that size
        // (the code has unit variance per entry). `c` is shared by every layer, so its
        // effects add up along the model: it starts at 1/√2 of a Pfeiffer adapter's 0.02,
        // which moves the model's output about as little as a fresh Pfeiffer adapter does.
        let std = 0.02 / 2f64.sqrt();
        let mut shapes: Vec<(&'static str, Vec<usize>, f64, f64)> = vec![
            ("adapter_down.weight", vec![r, d], std, std),
            ("adapter_down.bias", vec![r], 0.0, 0.0),
            ("adapter_up.weight", vec![d, r], std, std),
            ("adapter_up.bias", vec![d], 0.0, 0.0),
        ];
        if config.layer_norm {
            shapes.push(("adapter_norm_before.weight", vec![d], 1.0, 0.0));
            shapes.push(("adapter_norm_before.bias", vec![d], 0.0, 0.0));
        }
        let mut heads = Vec::with_capacity(shapes.len());
        for (name, shape, start, spread) in shapes {
            let n: usize = shape.iter().product();
            let c = match (start, spread) {
                (s, sp) if sp > 0.0 && s == sp => init.normal(n, sp, dev)?,
                (s, _) => (Tensor::ones(n, DType::F32, dev)? * s)?,
            };
            let g = if spread > 0.0 {
                init.normal((n, cd), 0.5 * spread / (cd as f64).sqrt(), dev)?
            } else {
                // Zero, not random: a bias or norm head starts at `c` for every code
                // (its gradient is not zero: the code is).
                Tensor::zeros((n, cd), DType::F32, dev)?
            };
            heads.push(Head { name, shape, g: var(g)?, c: var(c)? });
        }
        let hyper = HyperNet {
            config,
            points: specs.iter().map(|s| s.point).collect(),
            sites,
            task_table,
            instance,
            layer_table,
            site_table,
            projector_in,
            projector_out,
            heads,
            template,
        };
        if let Some(dir) = &hyper.config.generator_from {
            hyper.start_from(dir)?;
        }
        Ok(hyper)
    }

    /// Copies a trained generator from the `hyper_bn` folder `dir`: every tensor but the
    /// task embeddings, and the embeddings of tasks both know (by name); other tasks start
    /// at the mean of the folder's task embeddings.
    fn start_from(&self, dir: &std::path::Path) -> std::result::Result<(), Error> {
        let config_file = dir.join(io::CONFIG_FILE);
        let bad = |m: String| Error::Io { path: config_file.clone(), message: m };
        let saved = io::read_json(&config_file)?;
        if saved["kind"] != KIND {
            return Err(bad(format!("holds a `{}` adapter; `generator_from` reads a trained {KIND} folder", saved["kind"])));
        }
        let theirs = HyperConfig::parse(&saved["config"])?;
        let (mine, other) = (self.config.generator_shape(), theirs.generator_shape());
        for (field, value) in mine.as_object().expect("an object") {
            if other[field] != *value {
                return Err(bad(format!(
                    "its `{field}` is {}, this adapter's {value}: a generator is only reused with the same shape",
                    other[field]
                )));
            }
        }
        let weights_file = dir.join(io::WEIGHTS_FILE);
        let mut tensors = io::read_tensors(&weights_file, self.device())?;
        let table = tensors.remove(TASK_TABLE);
        for (name, var) in self.vars().into_iter().filter(|(n, _)| n != TASK_TABLE) {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::Io { path: weights_file.clone(), message: format!("tensor `{name}` is missing") })?;
            if t.dims() != var.dims() {
                return Err(Error::Io {
                    path: weights_file.clone(),
                    message: format!(
                        "tensor `{name}` has shape {:?}, this adapter's {:?} (another model or placement?)",
                        t.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&t)?;
        }
        if let (Some(mine), Some(table)) = (&self.task_table, table) {
            let start = table.mean_keepdim(0)?;
            let rows = self
                .config
                .tasks
                .iter()
                .map(|t| match theirs.task_id(t) {
                    Some(i) => table.narrow(0, i, 1),
                    None => Ok(start.clone()),
                })
                .collect::<Result<Vec<_>>>()?;
            mine.set(&Tensor::cat(&rows, 0)?)?;
        }
        Ok(())
    }

    /// The configuration it was built with.
    pub fn settings(&self) -> &HyperConfig {
        &self.config
    }

    /// The vector in task-embedding space of a mixture of tasks (see [`task_vector_of`]).
    pub fn task_vector(&self, mixture: &[(String, f64)]) -> std::result::Result<Tensor, Error> {
        task_vector_of(self, mixture)
    }

    /// Each row's conditioning vector in task-embedding space, `[n, task_dim]`, and for
    /// each row of the batch the index of its vector (rows of one task share one).
    fn conditioning(&self, rows: usize, ctx: &ForwardCtx) -> Result<(Tensor, Option<Vec<u32>>)> {
        match (self.config.conditioning, &ctx.conditioning, &ctx.task_ids) {
            (Conditioning::Task, Some(v), _) => {
                if v.dims() != [rows, self.config.task_dim] {
                    candle_core::bail!(
                        "{KIND}: conditioning vectors must be [rows, task_dim] = [{rows}, {}], got {:?}",
                        self.config.task_dim,
                        v.dims()
                    );
                }
                Ok((v.to_dtype(DType::F32)?, None))
            }
            (Conditioning::Task, None, Some(ids)) => {
                let ids = ids.to_vec1::<u32>()?;
                if ids.len() != rows {
                    candle_core::bail!("{KIND}: the forward context has {} task ids for {rows} rows", ids.len());
                }
                let tasks = self.config.tasks.len();
                if let Some(&bad) = ids.iter().find(|&&id| id as usize >= tasks) {
                    candle_core::bail!("{KIND}: task id {bad} is out of range; this hypernetwork knows {tasks} tasks");
                }
                let mut unique: Vec<u32> = ids.clone();
                unique.sort_unstable();
                unique.dedup();
                let index = ids.iter().map(|id| unique.binary_search(id).expect("present") as u32).collect();
                let table = self.task_table.as_ref().expect("task conditioning has its table").as_tensor();
                Ok((table.index_select(&Tensor::new(unique.as_slice(), table.device())?, 0)?, Some(index)))
            }
            (Conditioning::Task, None, None) => candle_core::bail!(
                "{KIND}: task conditioning needs each row's task: task ids in the forward context (multi-task training \
                 has them; `adapters predict` and `eval` take `--task NAME` or a mixture `--task 'a:0.5,b:0.5'`; for other \
                 commands write the task's adapter with `adapters hyper-export`)"
            ),
            (Conditioning::Instance, Some(v), _) => {
                let (w, b) = self.instance.as_ref().expect("instance conditioning has its projection");
                let hidden = w.dim(1)?;
                if v.dims() != [rows, hidden] {
                    candle_core::bail!(
                        "{KIND}: instance conditioning reads [rows, hidden] = [{rows}, {hidden}] mean token embeddings, got {:?}",
                        v.dims()
                    );
                }
                Ok((kernels::linear(&v.to_dtype(DType::F32)?, w.as_tensor(), Some(b.as_tensor()))?, None))
            }
            (Conditioning::Instance, None, _) => candle_core::bail!(
                "{KIND}: instance conditioning needs each row's mean token embedding as the forward context's \
                 `conditioning` (the trainer and the CLI compute it)"
            ),
        }
    }

    /// The code of each conditioning vector at a point: `[n, code_dim]`.
    fn code(&self, point: Point, vectors: &Tensor) -> Result<Tensor> {
        let n = vectors.dim(0)?;
        let dev = vectors.device();
        let site = self.sites.iter().position(|s| *s == point.site).expect("built for its sites");
        let position =
            Tensor::cat(&[self.layer_table.as_tensor().narrow(0, point.layer, 1)?, self.site_table.as_tensor().narrow(0, site, 1)?], 1)?;
        let joined = Tensor::cat(&[vectors.clone(), position.broadcast_as((n, 2 * self.config.position_dim))?.contiguous()?], 1)?;
        let (w1, b1) = &self.projector_in;
        let (w2, b2) = &self.projector_out;
        let hidden = kernels::linear(&joined, w1.as_tensor(), Some(b1.as_tensor()))?.relu()?;
        let code = kernels::linear(&hidden, w2.as_tensor(), Some(b2.as_tensor()))?;
        let cd = self.config.code_dim;
        kernels::layer_norm(&code, &Tensor::ones(cd, DType::F32, dev)?, &Tensor::zeros(cd, DType::F32, dev)?, 1e-5)
    }

    /// The adapter tensors generated at `point` from conditioning vectors `[n, task_dim]`:
    /// one `[n, ...]` tensor per head, in the `seq_bn` layout's order.
    pub fn generate(&self, point: Point, vectors: &Tensor) -> Result<Vec<Tensor>> {
        let code = self.code(point, vectors)?;
        let n = code.dim(0)?;
        self.heads
            .iter()
            .map(|h| {
                let mut shape = vec![n];
                shape.extend(&h.shape);
                kernels::linear(&code, h.g.as_tensor(), Some(h.c.as_tensor()))?.reshape(shape)
            })
            .collect()
    }

    /// The plain `seq_bn` tensors for one conditioning vector `[task_dim]`, named as a
    /// `seq_bn` adapter names them, and that adapter's configuration: what
    /// `adapters hyper-export` writes.
    pub fn plain_form(&self, vector: &Tensor) -> Result<(serde_json::Value, Vec<(String, Tensor)>)> {
        let vectors = vector.unsqueeze(0)?;
        let mut tensors = Vec::new();
        for &point in &self.points {
            for (head, t) in self.heads.iter().zip(self.generate(point, &vectors)?) {
                tensors.push((point.var_name(head.name), t.squeeze(0)?));
            }
        }
        Ok((self.template.config(), tensors))
    }

    fn device(&self) -> &Device {
        self.layer_table.device()
    }
}

/// The vector in task-embedding space of a mixture of tasks, `Σ wᵢ · embedding(taskᵢ)`, for
/// any loaded `hyper_bn` adapter (weights 1 and 0 give one task's embedding exactly). What
/// callers pass as the forward context's `conditioning` to run a task mixture.
pub fn task_vector_of(adapter: &dyn Adapter, mixture: &[(String, f64)]) -> std::result::Result<Tensor, Error> {
    let bad = |m: String| Error::Config { kind: KIND.into(), message: m };
    if adapter.kind() != KIND {
        return Err(bad(format!("a `{}` adapter has no task embeddings", adapter.kind())));
    }
    let config = HyperConfig::parse(&adapter.config())?;
    if config.conditioning != Conditioning::Task {
        return Err(bad("this hypernetwork is conditioned on its input, not on tasks".into()));
    }
    if mixture.is_empty() {
        return Err(bad(format!("a task mixture names at least one of: {}", config.tasks.join(", "))));
    }
    let mut weights = vec![0f32; config.tasks.len()];
    for (name, w) in mixture {
        let id = config
            .task_id(name)
            .ok_or_else(|| bad(format!("no task `{name}` in this hypernetwork; it knows: {}", config.tasks.join(", "))))?;
        if !w.is_finite() {
            return Err(bad(format!("task `{name}` has weight {w}; weights are finite numbers")));
        }
        weights[id] += *w as f32;
    }
    let table = adapter.vars().into_iter().find(|(n, _)| n == TASK_TABLE).map(|(_, v)| v.as_tensor().clone());
    let table = table.ok_or_else(|| bad(format!("no `{TASK_TABLE}` tensor")))?;
    let n = weights.len();
    let run = || Tensor::from_vec(weights, (1, n), table.device())?.matmul(&table)?.squeeze(0);
    Ok(run()?)
}

/// The task-embedding table's variable name.
const TASK_TABLE: &str = "hypernet.task_embeddings";

impl Adapter for HyperNet {
    fn kind(&self) -> &str {
        KIND
    }

    /// The saved configuration: a complete hypernetwork, without how its training started
    /// (`generator_from`, `train`), so that the folder loads on its own.
    fn config(&self) -> serde_json::Value {
        let saved = HyperConfig { generator_from: None, train: TrainParts::All, ..self.config.clone() };
        serde_json::to_value(&saved).expect("configs serialise")
    }

    fn points(&self) -> Vec<Point> {
        self.points.clone()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self.task_table.iter().map(|t| (TASK_TABLE.to_string(), t.clone())).collect();
        if let Some((w, b)) = &self.instance {
            out.push(("hypernet.instance.weight".into(), w.clone()));
            out.push(("hypernet.instance.bias".into(), b.clone()));
        }
        out.push(("hypernet.layer_embeddings".into(), self.layer_table.clone()));
        out.push(("hypernet.site_embeddings".into(), self.site_table.clone()));
        out.push(("hypernet.projector.0.weight".into(), self.projector_in.0.clone()));
        out.push(("hypernet.projector.0.bias".into(), self.projector_in.1.clone()));
        out.push(("hypernet.projector.2.weight".into(), self.projector_out.0.clone()));
        out.push(("hypernet.projector.2.bias".into(), self.projector_out.1.clone()));
        for h in &self.heads {
            out.push((format!("hypernet.heads.{}.generator", h.name), h.g.clone()));
            out.push((format!("hypernet.heads.{}.start", h.name), h.c.clone()));
        }
        out
    }

    fn capabilities(&self) -> Capabilities<'_> {
        Capabilities {
            partly_frozen: (self.config.train != TrainParts::All).then_some(self as &dyn PartlyFrozen),
            conditioning: (self.config.conditioning == Conditioning::Instance).then_some(ConditioningNeed::MeanTokenEmbedding),
            ..Default::default()
        }
    }

    /// Generates each row's adapter at this point and runs them all in one per-row forward.
    fn forward_hidden(&self, point: Point, io: &SublayerIo, ctx: &ForwardCtx) -> Result<Tensor> {
        let rows = io.output.dim(0)?;
        let (vectors, index) = self.conditioning(rows, ctx)?;
        let mut weights = self.generate(point, &vectors)?;
        if let Some(index) = index {
            let index = Tensor::new(index.as_slice(), self.device())?;
            weights = weights.iter().map(|w| w.index_select(&index, 0)).collect::<Result<_>>()?;
        }
        self.template.forward_hidden_rows(point, io, &weights, ctx)
    }
}

impl PartlyFrozen for HyperNet {
    /// Learning a new task with the generator frozen trains the task embeddings only.
    fn is_frozen_var(&self, var_name: &str) -> bool {
        self.config.train != TrainParts::All && var_name != TASK_TABLE
    }
}
