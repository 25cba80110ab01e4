//! Position-selective interventions (ReFT): a function applied to the hidden states at
//! chosen token positions only, the rest of the residual stream left as it was.

use candle_core::{Result, Tensor};

/// Each row's token count from a `[batch, seq]` mask (`None`: every row has `seq` tokens).
pub fn row_lengths(mask: Option<&Tensor>, batch: usize, seq: usize) -> Result<Vec<usize>> {
    match mask {
        None => Ok(vec![seq; batch]),
        Some(m) => Ok(m.to_dtype(candle_core::DType::U32)?.sum(1)?.to_vec1::<u32>()?.into_iter().map(|n| n as usize).collect()),
    }
}

/// The first `first` and last `last` token positions of each row (ReFT's prefix and
/// suffix positions), for right-padded rows of the given lengths; a position in both
/// counts once, in order.
pub fn edge_positions(lengths: &[usize], first: usize, last: usize) -> Vec<Vec<usize>> {
    lengths
        .iter()
        .map(|&n| {
            let mut at: Vec<usize> = (0..first.min(n)).chain(n.saturating_sub(last)..n).collect();
            at.dedup();
            at
        })
        .collect()
}

/// `hidden` (`[batch, seq, d]`) with `f` applied to the rows `hidden[b, p]` for every
/// `p` in `positions[b]`: `f` gets them stacked, `[n, d]`, and returns `[n, d]`; every
/// other position is returned unchanged (and gets no gradient through `f`).
pub fn at_positions(hidden: &Tensor, positions: &[Vec<usize>], f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (batch, seq, d) = hidden.dims3()?;
    if positions.len() != batch {
        candle_core::bail!("intervention positions for {} rows, but the batch has {batch}", positions.len());
    }
    let flat: Vec<u32> =
        positions.iter().enumerate().flat_map(|(b, ps)| ps.iter().filter(|&&p| p < seq).map(move |&p| (b * seq + p) as u32)).collect();
    if flat.is_empty() {
        return Ok(hidden.clone());
    }
    let index = Tensor::new(flat.as_slice(), hidden.device())?;
    let rows = hidden.reshape((batch * seq, d))?;
    let selected = rows.index_select(&index, 0)?;
    let changed = f(&selected)?;
    if changed.dims() != selected.dims() {
        candle_core::bail!("an intervention returned {:?} for {:?} selected positions", changed.dims(), selected.dims());
    }
    rows.index_add(&index, &(changed - selected)?, 0)?.reshape((batch, seq, d))
}
