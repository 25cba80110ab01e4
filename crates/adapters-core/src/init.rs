//! Seeded weight initialisation. candle's CPU RNG cannot be seeded, so adapters draw their
//! initial weights from this generator to make runs reproducible.

use candle_core::{Device, Result, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

/// A seeded generator of initial weights.
pub struct Init {
    rng: ChaCha8Rng,
}

impl Init {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Init { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Normal(0, std) values.
    pub fn normal(&mut self, shape: impl Into<Shape>, std: f64, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let dist = Normal::new(0.0, std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let v: Vec<f32> = (0..shape.elem_count()).map(|_| dist.sample(&mut self.rng) as f32).collect();
        Tensor::from_vec(v, shape, device)
    }

    /// Normal(0, std) values redrawn until they fall within ±bound (PyTorch's
    /// `trunc_normal_`).
    pub fn truncated_normal(&mut self, shape: impl Into<Shape>, std: f64, bound: f64, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let dist = Normal::new(0.0, std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut draw = || loop {
            let v: f64 = dist.sample(&mut self.rng);
            if v.abs() <= bound {
                return v as f32;
            }
        };
        let v: Vec<f32> = (0..shape.elem_count()).map(|_| draw()).collect();
        Tensor::from_vec(v, shape, device)
    }

    /// Uniform(-bound, bound) values.
    pub fn uniform(&mut self, shape: impl Into<Shape>, bound: f64, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let dist = Uniform::new_inclusive(-bound, bound).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let v: Vec<f32> = (0..shape.elem_count()).map(|_| dist.sample(&mut self.rng) as f32).collect();
        Tensor::from_vec(v, shape, device)
    }

    /// PyTorch's default `nn.Linear` weight init, kaiming-uniform with a = sqrt(5):
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Used for LoRA's A as PEFT does.
    pub fn kaiming_uniform(&mut self, out_features: usize, in_features: usize, device: &Device) -> Result<Tensor> {
        self.uniform((out_features, in_features), 1.0 / (in_features as f64).sqrt(), device)
    }

    /// A fresh seed derived from this generator (for sub-modules).
    pub fn fork(&mut self) -> Init {
        Init::new(self.rng.random())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights() {
        let d = Device::Cpu;
        let a = Init::new(7).normal((3, 4), 0.02, &d).unwrap().to_vec2::<f32>().unwrap();
        let b = Init::new(7).normal((3, 4), 0.02, &d).unwrap().to_vec2::<f32>().unwrap();
        let c = Init::new(8).normal((3, 4), 0.02, &d).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn truncated_normal_stays_within_its_bound() {
        let t = Init::new(3).truncated_normal(10_000, 0.01, 0.02, &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert!(t.iter().all(|v| v.abs() <= 0.02));
        let std = (t.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / t.len() as f64).sqrt();
        // The ±2σ truncation narrows the spread to 0.88σ.
        assert!((std - 0.0088).abs() < 0.0003, "{std}");
    }

    #[test]
    fn kaiming_bound_holds() {
        let t = Init::new(1).kaiming_uniform(8, 100, &Device::Cpu).unwrap();
        let max = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max <= 0.1 && max > 0.05, "{max}");
    }
}
