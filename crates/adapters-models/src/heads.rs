//! Task heads on top of a backbone's hidden states. The causal-LM head lives with the
//! decoder (`Llama::logits`), since it may be tied to the token embeddings. Padding,
//! pooling and classification here are the ones training and serving share.

use adapters_core::{ForwardCtx, Init};
use candle_core::{DType, Device, Result, Tensor, Var, D};
use serde::{Deserialize, Serialize};

/// Sequence classification: a new linear layer on a pooled representation. A clone shares
/// the weights (its `Var`s are handles), which is how tasks share one head.
#[derive(Clone)]
pub struct ClassificationHead {
    /// `[num_labels, hidden]`.
    pub weight: Var,
    /// `[num_labels]`.
    pub bias: Var,
}

impl ClassificationHead {
    /// A freshly initialised head (PyTorch's `nn.Linear` init, seeded).
    pub fn new(hidden: usize, num_labels: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut init = Init::new(seed);
        let weight = Var::from_tensor(&init.kaiming_uniform(num_labels, hidden, device)?)?;
        let bias = Var::from_tensor(&init.uniform(num_labels, 1.0 / (hidden as f64).sqrt(), device)?)?;
        Ok(ClassificationHead { weight, bias })
    }

    /// Logits `[batch, num_labels]` from pooled features `[batch, hidden]`.
    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        pooled.matmul(&self.weight.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())
    }

    /// The head's variables as `head.weight`, `head.bias`.
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![("head.weight".into(), self.weight.clone()), ("head.bias".into(), self.bias.clone())]
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
        let head = ClassificationHead::new(2, 3, 1, &dev)?;
        assert_eq!(head.forward(&mean_pool(&h, &mask)?)?.dims(), &[2, 3]);
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
    pool(&hidden, &mask, pooling)
}

/// Pools hidden states `[batch, seq, hidden]` of right-padded rows into `[batch, hidden]`.
pub fn pool(hidden: &Tensor, mask: &Tensor, pooling: Pooling) -> Result<Tensor> {
    Ok(match pooling {
        Pooling::Mean => mean_pool(hidden, mask)?,
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Last => last_token_pool(hidden, mask)?,
    })
}

/// Logits `[batch, labels]` from pooled features, with dropout on the features in training.
pub fn classify(head: &ClassificationHead, pooled: &Tensor, dropout: f64, ctx: &ForwardCtx) -> Result<Tensor> {
    head.forward(&ctx.dropout(pooled, dropout)?)
}
