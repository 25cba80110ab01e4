//! Task heads on top of a backbone's hidden states. The causal-LM head lives with the
//! decoder (`Llama::logits`), since it may be tied to the token embeddings. Padding,
//! pooling and classification here are the ones training and serving share.

use adapters_core::{Activation, ForwardCtx, Init};
use candle_core::{DType, Device, Result, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A linear layer of a head: `weight` `[out, in]`, `bias` `[out]` when it has one.
#[derive(Clone)]
pub struct Dense {
    /// `[out, in]`.
    pub weight: Var,
    /// `[out]`.
    pub bias: Option<Var>,
}

impl Dense {
    /// PyTorch's `nn.Linear` init, from `init`.
    fn new(init: &mut Init, inputs: usize, outputs: usize, bias: bool, device: &Device) -> Result<Self> {
        let weight = Var::from_tensor(&init.kaiming_uniform(outputs, inputs, device)?)?;
        let bias = if bias { Some(Var::from_tensor(&init.uniform(outputs, 1.0 / (inputs as f64).sqrt(), device)?)?) } else { None };
        Ok(Dense { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.as_tensor().t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b.as_tensor()),
            None => Ok(y),
        }
    }
}

/// The layers of a classification head, as AdapterHub's `ClassificationHead` builds them:
/// `layers - 1` hidden linear layers of the model's width, each followed by `activation`,
/// then one to the labels. One layer is a plain linear classifier (transformers' own
/// `classifier` / `score`).
#[derive(Clone, Debug, PartialEq)]
pub struct HeadShape {
    /// Linear layers in all (at least one).
    pub layers: usize,
    /// After each hidden layer; `None` adds no activation (AdapterHub's `null`).
    pub activation: Option<Activation>,
    /// Whether the output layer has a bias (hidden layers always have one).
    pub bias: bool,
}

impl Default for HeadShape {
    fn default() -> Self {
        HeadShape { layers: 1, activation: None, bias: true }
    }
}

/// Sequence classification on a pooled representation (see [`HeadShape`]). A clone shares
/// the weights (its `Var`s are handles), which is how tasks share one head.
#[derive(Clone)]
pub struct ClassificationHead {
    /// The hidden layers `[hidden, hidden]`, each followed by `activation`.
    pub hidden: Vec<Dense>,
    /// After each hidden layer.
    pub activation: Option<Activation>,
    /// The output layer `[num_labels, hidden]`.
    pub out: Dense,
}

impl ClassificationHead {
    /// A freshly initialised head (PyTorch's `nn.Linear` init, seeded).
    pub fn new(hidden: usize, num_labels: usize, shape: &HeadShape, seed: u64, device: &Device) -> Result<Self> {
        let mut init = Init::new(seed);
        let layers = (1..shape.layers.max(1)).map(|_| Dense::new(&mut init, hidden, hidden, true, device)).collect::<Result<_>>()?;
        let out = Dense::new(&mut init, hidden, num_labels, shape.bias, device)?;
        Ok(ClassificationHead { hidden: layers, activation: shape.activation, out })
    }

    /// Its shape.
    pub fn shape(&self) -> HeadShape {
        HeadShape { layers: self.hidden.len() + 1, activation: self.activation, bias: self.out.bias.is_some() }
    }

    /// Logits `[batch, num_labels]` from pooled features `[batch, hidden]`, with dropout
    /// before each layer in training (as AdapterHub's head).
    pub fn forward(&self, pooled: &Tensor, dropout: f64, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut x = pooled.clone();
        for layer in &self.hidden {
            x = layer.forward(&ctx.dropout(&x, dropout)?)?;
            if let Some(a) = self.activation {
                x = a.apply(&x)?;
            }
        }
        self.out.forward(&ctx.dropout(&x, dropout)?)
    }

    /// The head's variables: `weight`, `bias` (the output layer) and `hidden.N.weight`,
    /// `hidden.N.bias`; the names of its saved tensors.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut vars = Vec::new();
        for (i, d) in self.hidden.iter().enumerate() {
            vars.push((format!("hidden.{i}.weight"), d.weight.clone()));
            vars.extend(d.bias.clone().map(|b| (format!("hidden.{i}.bias"), b)));
        }
        vars.push(("weight".into(), self.out.weight.clone()));
        vars.extend(self.out.bias.clone().map(|b| ("bias".into(), b)));
        vars
    }

    /// A head from tensors named as [`Self::vars`] names them, checked against `shape`,
    /// the width and the label count; the error names the tensor at fault.
    pub fn from_tensors(
        mut tensors: HashMap<String, Tensor>,
        shape: &HeadShape,
        hidden: usize,
        num_labels: usize,
    ) -> std::result::Result<Self, String> {
        let mut take = |name: String, dims: &[usize]| -> std::result::Result<Var, String> {
            let t = tensors.remove(&name).ok_or_else(|| format!("tensor `{name}` is missing"))?;
            if t.dims() != dims {
                return Err(format!("tensor `{name}` has shape {:?}, the head needs {dims:?}", t.dims()));
            }
            Var::from_tensor(&t).map_err(|e| e.to_string())
        };
        let mut layers = Vec::new();
        for i in 0..shape.layers.saturating_sub(1) {
            layers.push(Dense {
                weight: take(format!("hidden.{i}.weight"), &[hidden, hidden])?,
                bias: Some(take(format!("hidden.{i}.bias"), &[hidden])?),
            });
        }
        let weight = take("weight".into(), &[num_labels, hidden])?;
        let bias = if shape.bias { Some(take("bias".into(), &[num_labels])?) } else { None };
        if let Some(extra) = tensors.keys().min() {
            return Err(format!(
                "tensor `{extra}` is not part of a {}-layer head{}",
                shape.layers,
                if shape.bias { "" } else { " without an output bias" }
            ));
        }
        Ok(ClassificationHead { hidden: layers, activation: shape.activation, out: Dense { weight, bias } })
    }

    /// The number of labels.
    pub fn num_labels(&self) -> usize {
        self.out.weight.dim(0).unwrap_or(0)
    }
}

/// Mean of the hidden states over the tokens the mask keeps: `[batch, hidden]`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    summed.broadcast_div(&counts)
}

/// The hidden state of each row's last unmasked token (decoder classification).
pub fn last_token_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let last = (attention_mask.to_dtype(DType::F32)?.sum(1)? - 1.0)?.clamp(0.0, f64::MAX)?.to_dtype(DType::U32)?;
    let (b, _, h) = hidden.dims3()?;
    let idx = last.reshape((b, 1, 1))?.expand((b, 1, h))?.contiguous()?;
    hidden.gather(&idx, 1)?.squeeze(1)
}

/// Rows scaled to unit L2 norm (eps 1e-12, as PyTorch's `F.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_respects_the_mask() -> Result<()> {
        let dev = Device::Cpu;
        // [2, 3, 2]: row 0 has 3 tokens, row 1 has 2 (last is padding).
        let h = Tensor::new(&[[[1f32, 2.], [3., 4.], [5., 6.]], [[7., 8.], [9., 10.], [100., 100.]]], &dev)?;
        let mask = Tensor::new(&[[1u32, 1, 1], [1, 1, 0]], &dev)?;
        assert_eq!(mean_pool(&h, &mask)?.to_vec2::<f32>()?, vec![vec![3., 4.], vec![8., 9.]]);
        assert_eq!(last_token_pool(&h, &mask)?.to_vec2::<f32>()?, vec![vec![5., 6.], vec![9., 10.]]);
        let n = l2_normalize(&Tensor::new(&[[3f32, 4.]], &dev)?)?.to_vec2::<f32>()?;
        assert_eq!(n, vec![vec![0.6, 0.8]]);
        let shape = HeadShape { layers: 2, activation: Some(Activation::Tanh), bias: false };
        let head = ClassificationHead::new(2, 3, &shape, 1, &dev)?;
        assert_eq!(head.forward(&mean_pool(&h, &mask)?, 0.0, &ForwardCtx::inference())?.dims(), &[2, 3]);
        assert_eq!(head.shape(), shape);
        let names: Vec<String> = head.vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["hidden.0.weight", "hidden.0.bias", "weight"]);
        Ok(())
    }
}

/// How a classification head sees a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the tokens (encoders).
    Mean,
    /// The first token (`[CLS]`).
    Cls,
    /// The last token (decoders).
    Last,
    /// BERT's pooler output, `tanh(W h[CLS] + b)` (AdapterHub's `use_pooler`, and what
    /// transformers' `BertForSequenceClassification` classifies).
    Pooler,
}

/// Right-pads rows of token ids: `[batch, longest]` ids (padding id 0) and the mask.
pub fn pad(rows: &[&[u32]], device: &Device) -> Result<(Tensor, Tensor)> {
    let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(rows.len() * longest);
    let mut mask = Vec::with_capacity(rows.len() * longest);
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(0u32, longest - r.len()));
        mask.extend(std::iter::repeat_n(1u32, r.len()));
        mask.extend(std::iter::repeat_n(0u32, longest - r.len()));
    }
    Ok((Tensor::from_vec(ids, (rows.len(), longest), device)?, Tensor::from_vec(mask, (rows.len(), longest), device)?))
}

/// Pooled features `[batch, hidden]` for a classification head.
pub fn pooled(backbone: &crate::Backbone, rows: &[&[u32]], pooling: Pooling, ctx: &ForwardCtx) -> Result<Tensor> {
    let (ids, mask) = pad(rows, backbone.device())?;
    let hidden = backbone.hidden_states(&ids, &mask, ctx)?;
    pool(backbone, &hidden, &mask, pooling, ctx)
}

/// Pools hidden states `[batch, seq, hidden]` of right-padded rows into `[batch, hidden]`.
pub fn pool(backbone: &crate::Backbone, hidden: &Tensor, mask: &Tensor, pooling: Pooling, ctx: &ForwardCtx) -> Result<Tensor> {
    Ok(match pooling {
        Pooling::Mean => mean_pool(hidden, mask)?,
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Last => last_token_pool(hidden, mask)?,
        Pooling::Pooler => backbone.pooler_output(hidden, ctx)?.ok_or_else(|| {
            candle_core::Error::Msg("pooling `pooler` needs BERT's pooler (`pooler.dense`), which this model does not have".into())
        })?,
    })
}
