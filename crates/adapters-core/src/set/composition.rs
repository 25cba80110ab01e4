//! The composition path: a resolved setup (stack, fuse, parallel, average, batch_split,
//! split) evaluated on one site's input and output.

use super::{AdapterSet, LentBySite, Node};
use crate::adapter::{ProjectionIo, SublayerIo};
use crate::capability::FuseMember;
use crate::context::{AuxLoss, ForwardCtx, FusionAttention};
use crate::point::Point;
use candle_core::{Result, Tensor};

impl AdapterSet {
    /// Evaluates a resolved setup on one site's input and output.
    pub(super) fn run(
        &self,
        node: &Node,
        point: Point,
        input: &Tensor,
        output: &Tensor,
        site: LentBySite,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        // A child absent at this point passes its input through.
        let child = |c: &Option<Node>, input: &Tensor, output: &Tensor, ctx: &ForwardCtx| match c {
            Some(n) => self.run(n, point, input, output, site, ctx),
            None => Ok(output.clone()),
        };
        // Children on consecutive parts of dimension `dim` (rows or positions).
        let parts = |children: &[Option<Node>], sizes: &[usize], dim: usize, what: &str| -> Result<Tensor> {
            let total = output.dim(dim)?;
            if sizes.iter().sum::<usize>() != total {
                candle_core::bail!("{what} {:?} add up to {}, but the batch has {total} ({point})", sizes, sizes.iter().sum::<usize>());
            }
            let mut outs = Vec::with_capacity(children.len());
            let mut start = 0;
            for (c, &n) in children.iter().zip(sizes) {
                let part_ctx = if dim == 0 { ctx.for_range(start, n)? } else { ctx.for_positions(start, n)? };
                outs.push(child(c, &input.narrow(dim, start, n)?, &output.narrow(dim, start, n)?, &part_ctx)?);
                start += n;
            }
            Tensor::cat(&outs, dim)
        };
        match node {
            Node::Adapter(a) => match site {
                LentBySite::Hidden(post_norm) => a.forward_hidden(point, &SublayerIo { input, output, post_norm }, ctx),
                LentBySite::Projection(linear) => a.forward_projection(point, &ProjectionIo { input, output, linear }, ctx),
            },
            Node::Stack(children) => {
                let mut out = output.clone();
                for c in children {
                    out = self.run(c, point, input, &out, site, ctx)?;
                }
                Ok(out)
            }
            Node::Fuse { name, fusion, members } => {
                let LentBySite::Hidden(post_norm) = site else {
                    candle_core::bail!("fusion `{name}` sits at a projection ({point}); fusion runs at hidden sites only")
                };
                let outputs = members.iter().map(|m| self.run(m, point, input, output, site, ctx)).collect::<Result<Vec<_>>>()?;
                let fuse_members: Vec<FuseMember> = members
                    .iter()
                    .zip(outputs)
                    .map(|(m, output)| FuseMember { adapter: m.last_adapter().map(|a| a.as_ref()), output })
                    .collect();
                let Some(layer) = fusion.capabilities().fusion else { candle_core::bail!("`{name}` is not a fusion layer ({point})") };
                let fused = layer.fuse(point, &SublayerIo { input, output, post_norm }, &fuse_members, ctx)?;
                if let Some(value) = fused.regularization {
                    ctx.push_loss(AuxLoss { adapter: name.clone(), point, name: "fusion_value_regularization".into(), value });
                }
                ctx.push_fusion_attention(FusionAttention { fusion: name.clone(), point, weights: fused.attention });
                Ok(fused.output)
            }
            Node::Parallel(children) => {
                let n = children.len();
                let rows = output.dim(0)?;
                if rows % n != 0 {
                    candle_core::bail!(
                        "parallel over {n} adapters needs the batch repeated {n} times, but it has {rows} rows ({point}); \
                         the backbone repeats it when the setup is set on the model"
                    );
                }
                let copy = rows / n;
                let mut outs = Vec::with_capacity(n);
                for (i, c) in children.iter().enumerate() {
                    let (x, y) = (input.narrow(0, i * copy, copy)?, output.narrow(0, i * copy, copy)?);
                    outs.push(child(c, &x, &y, &ctx.for_copy(i, copy)?)?);
                }
                Tensor::cat(&outs, 0)
            }
            Node::Average { children, weights } => {
                let mut total: Option<Tensor> = None;
                let n = children.len() as f64;
                for (c, &w) in children.iter().zip(weights) {
                    let y = (child(c, input, output, ctx)? * (w as f64 / n))?;
                    total = Some(match total {
                        None => y,
                        Some(t) => (t + y)?,
                    });
                }
                total.ok_or_else(|| candle_core::Error::Msg(format!("average with no children ({point})")))
            }
            Node::BatchSplit { children, sizes } => parts(children, sizes, 0, "batch_split sizes"),
            Node::Split { children, splits } => parts(children, splits, 1, "split positions"),
        }
    }
}
