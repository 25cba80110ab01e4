//! Activation functions by their Hugging Face names.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// An activation function by every name AdapterHub accepts (its `leakyrelu` and
/// transformers' `ACT2FN`), computed as those compute it: adapters' non-linearities,
/// prediction heads' activations and backbones' `hidden_act` all read names this way.
/// Names for one function (`swish`/`silu`, the tanh-approximated GELUs) read as one
/// variant and are written back by its first name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `relu`.
    Relu,
    /// `relu2`: relu(x)².
    Relu2,
    /// `relu6`: min(max(x, 0), 6).
    Relu6,
    /// `leakyrelu` / `leaky_relu`: negative slope 0.01.
    LeakyRelu,
    /// `gelu` / `gelu_python`: exact (erf) GELU.
    Gelu,
    /// `gelu_10`: exact GELU clipped to [-10, 10].
    Gelu10,
    /// `gelu_new` / `gelu_fast` / `gelu_accurate` / `gelu_pytorch_tanh` / `gelu_python_tanh`:
    /// 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))).
    GeluTanh,
    /// `quick_gelu`: x σ(1.702 x).
    QuickGelu,
    /// `swish` / `silu`: x σ(x).
    Silu,
    /// `tanh`.
    Tanh,
    /// `sigmoid`.
    Sigmoid,
    /// `mish`: x tanh(softplus(x)).
    Mish,
    /// `linear`: the identity.
    Linear,
    /// `laplace`: 0.5 (1 + erf((x − 0.707107) / (0.282095 √2))).
    Laplace,
}

/// Every accepted name and its function; the first name of each is the one written.
const ACTIVATION_NAMES: &[(&str, Activation)] = &[
    ("relu", Activation::Relu),
    ("relu2", Activation::Relu2),
    ("relu6", Activation::Relu6),
    ("leakyrelu", Activation::LeakyRelu),
    ("leaky_relu", Activation::LeakyRelu),
    ("gelu", Activation::Gelu),
    ("gelu_python", Activation::Gelu),
    ("gelu_10", Activation::Gelu10),
    ("gelu_new", Activation::GeluTanh),
    ("gelu_fast", Activation::GeluTanh),
    ("gelu_accurate", Activation::GeluTanh),
    ("gelu_pytorch_tanh", Activation::GeluTanh),
    ("gelu_python_tanh", Activation::GeluTanh),
    ("quick_gelu", Activation::QuickGelu),
    ("swish", Activation::Silu),
    ("silu", Activation::Silu),
    ("tanh", Activation::Tanh),
    ("sigmoid", Activation::Sigmoid),
    ("mish", Activation::Mish),
    ("linear", Activation::Linear),
    ("laplace", Activation::Laplace),
];

/// transformers' `LaplaceActivation` constants, as it writes them (not 1/√2 exactly).
#[allow(clippy::approx_constant)]
const LAPLACE_MU: f64 = 0.707107;
const LAPLACE_SIGMA: f64 = 0.282095;

impl Activation {
    /// The activation of a name, case-insensitively as AdapterHub lowercases it; the
    /// error lists the names accepted.
    pub fn from_name(name: &str) -> std::result::Result<Activation, String> {
        let lower = name.to_lowercase();
        if let Some((_, a)) = ACTIVATION_NAMES.iter().find(|(n, _)| *n == lower) {
            return Ok(*a);
        }
        let names: Vec<&str> = ACTIVATION_NAMES.iter().map(|(n, _)| *n).collect();
        let why = match lower.as_str() {
            "prelu" | "xielu" => " (it has learned parameters of its own, which this library does not load)",
            _ => "",
        };
        Err(format!("activation `{name}` is not supported{why}; use one of {}", names.join(", ")))
    }

    /// The name written for it.
    pub fn name(self) -> &'static str {
        ACTIVATION_NAMES.iter().find(|(_, a)| *a == self).map(|(n, _)| *n).expect("every variant is named")
    }

    /// The function, on any tensor (differentiable).
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        use candle_nn::ops::sigmoid;
        match self {
            Activation::Relu => x.relu(),
            Activation::Relu2 => x.relu()?.sqr(),
            Activation::Relu6 => x.relu()?.minimum(6f64),
            Activation::LeakyRelu => candle_nn::ops::leaky_relu(x, 0.01),
            Activation::Gelu => adapters_kernels::gelu_erf(x),
            Activation::Gelu10 => adapters_kernels::gelu_erf(x)?.clamp(-10f64, 10f64),
            Activation::GeluTanh => x.gelu(),
            Activation::QuickGelu => x.mul(&sigmoid(&(x * 1.702)?)?),
            Activation::Silu => x.silu(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => sigmoid(x),
            Activation::Mish => {
                // softplus(x) = max(x, 0) + log(1 + exp(-|x|)), stable for large |x|.
                let softplus = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                x.mul(&softplus.tanh()?)
            }
            Activation::Linear => Ok(x.clone()),
            Activation::Laplace => (((x - LAPLACE_MU)? / (LAPLACE_SIGMA * std::f64::consts::SQRT_2))?.erf()? + 1.0)? * 0.5,
        }
    }

    /// The fused kernels' form of it, where they have one.
    pub fn kernel(self) -> Option<adapters_kernels::Activation> {
        match self {
            Activation::Relu => Some(adapters_kernels::Activation::Relu),
            Activation::Gelu => Some(adapters_kernels::Activation::Gelu),
            Activation::Silu => Some(adapters_kernels::Activation::Silu),
            Activation::Tanh => Some(adapters_kernels::Activation::Tanh),
            Activation::Linear => Some(adapters_kernels::Activation::Identity),
            _ => None,
        }
    }
}

impl Serialize for Activation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Activation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Activation::from_name(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}
