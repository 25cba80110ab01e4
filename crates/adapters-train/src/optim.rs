//! AdamW with weight decay only where it belongs, a warmup-then-decay learning-rate
//! schedule, and global gradient-norm clipping. candle-nn's AdamW decays every variable;
//! here matrices decay and vectors (biases, norm weights, scaling vectors) do not.

use crate::error::{fail, Error};
use adapters_kernels::{adamw, AdamWStep};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::collections::HashMap;

/// How the learning rate falls after warmup.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decay {
    /// Stays at the peak.
    Constant,
    /// Falls linearly to 0.
    Linear,
    /// Follows half a cosine down to 0.
    Cosine,
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then `decay` to 0 at `total`.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// The learning rate at the end of warmup.
    pub peak: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// All steps of the run.
    pub total: usize,
    /// The shape after warmup.
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate for step `step` (0-based), as Hugging Face's schedulers compute it.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * step as f64 / self.warmup.max(1) as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Linear => self.peak * (1.0 - progress),
            Decay::Cosine => self.peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
    /// Updates this variable has had (its bias correction), as PyTorch keeps per parameter.
    t: u32,
    /// This variable's learning rate as a multiple of the step's.
    lr_scale: f64,
}

/// AdamW (decoupled weight decay, as PyTorch's `torch.optim.AdamW`).
pub struct AdamW {
    slots: Vec<Slot>,
    /// Decay of the first moment (0.9).
    pub beta1: f64,
    /// Decay of the second moment (0.999).
    pub beta2: f64,
    /// Added to the denominator (1e-8).
    pub eps: f64,
    /// Decoupled weight decay on matrices.
    pub weight_decay: f64,
}

impl AdamW {
    /// Variables of rank 2 or more get weight decay; vectors and scalars do not.
    pub fn new(vars: Vec<(String, Var)>, weight_decay: f64) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = var.rank() >= 2;
                Ok(Slot { m: var.zeros_like()?, v: var.zeros_like()?, name, var, decay, t: 0, lr_scale: 1.0 })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { slots, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay })
    }

    /// Gives variable `name` a learning rate of `scale` times the step's (a parameter
    /// group with its own rate).
    pub fn scale_lr(&mut self, name: &str, scale: f64) -> Result<()> {
        let slot = self.slots.iter_mut().find(|s| s.name == name);
        let slot = slot.ok_or_else(|| candle_core::Error::Msg(format!("AdamW: no variable `{name}`")))?;
        slot.lr_scale = scale;
        Ok(())
    }

    /// How many variables get weight decay, and how many do not.
    pub fn decay_split(&self) -> (usize, usize) {
        let d = self.slots.iter().filter(|s| s.decay).count();
        (d, self.slots.len() - d)
    }

    /// The moment estimates and update counts as `m.NAME`, `v.NAME`, `t.NAME` tensors,
    /// for checkpoints.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            // Copies: the moments are updated in place by the next step.
            out.insert(format!("m.{}", s.name), s.m.copy()?);
            out.insert(format!("v.{}", s.name), s.v.copy()?);
            out.insert(format!("t.{}", s.name), Tensor::new(&[s.t], s.m.device())?);
        }
        Ok(out)
    }

    /// Restores [`AdamW::state`]; every variable's entries must be there with its shapes.
    /// The moments move to the device of the variable they belong to (a checkpoint is
    /// read on the CPU; the gradients they meet live where the variables do).
    pub fn load_state(&mut self, mut state: HashMap<String, Tensor>) -> crate::error::Result<()> {
        let mut take = |key: String, dims: &[usize]| -> crate::error::Result<Tensor> {
            let t = state.remove(&key).ok_or_else(|| Error::Run(format!("the optimizer state has no `{key}`")))?;
            if t.dims() != dims {
                fail!(Run, "the optimizer state `{key}` has shape {:?}, expected {dims:?}", t.dims());
            }
            Ok(t)
        };
        let mut restored = Vec::new();
        for s in &self.slots {
            let m = take(format!("m.{}", s.name), s.m.dims())?.to_device(s.var.device())?;
            let v = take(format!("v.{}", s.name), s.v.dims())?.to_device(s.var.device())?;
            let t = take(format!("t.{}", s.name), &[1])?.to_dtype(candle_core::DType::U32)?.to_vec1::<u32>()?[0];
            restored.push((m, v, t));
        }
        for (s, (m, v, t)) in self.slots.iter_mut().zip(restored) {
            (s.m, s.v, s.t) = (m, v, t);
        }
        Ok(())
    }

    /// One update with learning rate `lr`. A variable without a gradient is left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else { continue };
            s.t += 1;
            let lr = lr * s.lr_scale;
            let step = AdamWStep {
                lr,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                c1: 1.0 - self.beta1.powi(s.t as i32),
                c2: 1.0 - self.beta2.powi(s.t as i32),
                decay: if s.decay { 1.0 - lr * self.weight_decay } else { 1.0 },
            };
            adamw(s.var.as_tensor(), &s.m, &s.v, &g.contiguous()?, step)?;
        }
        Ok(())
    }
}

/// Scales every gradient so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(vars: &[Var], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = total.sqrt();
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let clipped = (g * scale)?;
                grads.insert(v.as_tensor(), clipped);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_match_the_reference_formulas() {
        let s = Schedule { peak: 1e-3, warmup: 10, total: 110, decay: Decay::Linear };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 5e-4).abs() < 1e-12);
        assert_eq!(s.lr(110), 0.0);
        let c = Schedule { decay: Decay::Cosine, ..s };
        assert!((c.lr(60) - 5e-4).abs() < 1e-12);
        assert!((c.lr(35) - 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * 0.25).cos())).abs() < 1e-12);
        assert_eq!(Schedule { decay: Decay::Constant, ..s }.lr(100), 1e-3);
    }

    /// Three AdamW steps on f(w) = sum(w^2) / 2 (gradient w) against the update computed
    /// by hand in f64; the matrix decays, the vectors do not; `c` has half the learning rate.
    #[test]
    fn adamw_matches_a_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[[1.0f32, -2.0]], &dev)?;
        let b = Var::new(&[0.5f32], &dev)?;
        let c = Var::new(&[0.5f32], &dev)?;
        let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone()), ("c".into(), c.clone())], 0.1)?;
        opt.scale_lr("c", 0.5)?;
        assert!(opt.scale_lr("nope", 0.5).is_err());
        assert_eq!(opt.decay_split(), (1, 2));
        let (lr, b1, b2, eps, wd): (f64, f64, f64, f64, f64) = (0.01, 0.9, 0.999, 1e-8, 0.1);
        let mut want_w = [1.0f64, -2.0];
        let mut want_b = 0.5f64;
        let (mut want_c, mut mc, mut vc) = (0.5f64, 0.0f64, 0.0f64);
        let (mut mw, mut vw, mut mb, mut vb) = ([0.0f64; 2], [0.0f64; 2], 0.0f64, 0.0f64);
        for t in 1..=3 {
            let squares = (w.as_tensor().sqr()?.sum_all()? + b.as_tensor().sqr()?.sum_all()?)?;
            let loss = ((squares + c.as_tensor().sqr()?.sum_all()?)? * 0.5)?;
            opt.step(&loss.backward()?, lr)?;
            let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            for i in 0..2 {
                let g = want_w[i];
                mw[i] = b1 * mw[i] + (1.0 - b1) * g;
                vw[i] = b2 * vw[i] + (1.0 - b2) * g * g;
                want_w[i] = want_w[i] * (1.0 - lr * wd) - lr * (mw[i] / c1) / ((vw[i] / c2).sqrt() + eps);
            }
            let g = want_b;
            mb = b1 * mb + (1.0 - b1) * g;
            vb = b2 * vb + (1.0 - b2) * g * g;
            want_b -= lr * (mb / c1) / ((vb / c2).sqrt() + eps);
            let g = want_c;
            mc = b1 * mc + (1.0 - b1) * g;
            vc = b2 * vc + (1.0 - b2) * g * g;
            want_c -= 0.5 * lr * (mc / c1) / ((vc / c2).sqrt() + eps);
        }
        let got_w = w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        for i in 0..2 {
            assert!((got_w[i] as f64 - want_w[i]).abs() < 1e-6, "{} vs {}", got_w[i], want_w[i]);
        }
        assert!((b.as_tensor().to_vec1::<f32>()?[0] as f64 - want_b).abs() < 1e-6);
        assert!((c.as_tensor().to_vec1::<f32>()?[0] as f64 - want_c).abs() < 1e-6);
        Ok(())
    }

    /// The device under test: `ADAPTERS_TEST_DEVICE=cuda` (or `cuda:N`) runs these tests
    /// on a GPU (in a build with the `cuda` feature); the CPU otherwise.
    fn test_device() -> Device {
        match std::env::var("ADAPTERS_TEST_DEVICE").as_deref() {
            Ok(d) if d.starts_with("cuda") => {
                let ordinal = d.strip_prefix("cuda:").and_then(|n| n.parse().ok()).unwrap_or(0);
                Device::new_cuda(ordinal).expect("ADAPTERS_TEST_DEVICE asks for CUDA: build with the cuda feature on a GPU machine")
            }
            _ => Device::Cpu,
        }
    }

    /// A checkpoint is read on the CPU; after loading, the moments live with their
    /// variables, and the next step (gradients on the variables' device) works and equals
    /// the step of an optimizer that never left the device.
    #[test]
    fn loaded_state_follows_the_variables_device() -> Result<()> {
        let dev = test_device();
        let fresh = || -> Result<(Var, AdamW)> {
            let w = Var::new(&[[1.0f32, -2.0], [0.5, 3.0]], &dev)?;
            let opt = AdamW::new(vec![("w".into(), w.clone())], 0.1)?;
            Ok((w, opt))
        };
        let step = |w: &Var, opt: &mut AdamW| -> Result<()> {
            let loss = (w.as_tensor().sqr()?.sum_all()? * 0.5)?;
            opt.step(&loss.backward()?, 0.01)
        };
        let (w, mut opt) = fresh()?;
        step(&w, &mut opt)?;
        let on_cpu: HashMap<String, Tensor> =
            opt.state()?.into_iter().map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
        let (w2, mut resumed) = fresh()?;
        w2.set(w.as_tensor())?;
        resumed.load_state(on_cpu).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        for t in resumed.state()?.values() {
            assert!(t.device().same_device(w2.device()), "state on {:?}, variable on {:?}", t.device(), w2.device());
        }
        step(&w, &mut opt)?;
        step(&w2, &mut resumed)?;
        assert_eq!(w.as_tensor().to_vec2::<f32>()?, w2.as_tensor().to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn clipping_scales_to_the_max_norm() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[3.0f32, 4.0], &dev)?;
        let mut grads = (w.as_tensor().sqr()?.sum_all()? * 0.5)?.backward()?; // gradient (3, 4), norm 5
        let norm = clip_grad_norm(std::slice::from_ref(&w), &mut grads, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        let g = grads.get(w.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5);
        Ok(())
    }
}
