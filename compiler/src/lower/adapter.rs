//! Low-rank adapters applied at run time: `y = x W^T + scale · (x A^T) B^T`, the stored
//! weight `W` shared by every place that uses it and never merged with an adapter.

use candle_core::{Module, Result, Tensor};
use candle_nn::Linear;

/// One projection's adapter, lowered: `A: [rank, in]`, `B: [out, rank]`.
#[derive(Clone)]
pub struct Lora {
    pub down: Linear,
    pub up: Linear,
    pub scale: f64,
}

impl Lora {
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Self {
        Lora {
            down: Linear::new(a, None),
            up: Linear::new(b, None),
            scale,
        }
    }

    /// `y + scale · (x A^T) B^T`.
    pub fn add_to(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let delta = self.up.forward(&self.down.forward(x)?)?;
        let delta = if self.scale == 1.0 {
            delta
        } else {
            (delta * self.scale)?
        };
        y + delta
    }

    pub fn tensors(&self) -> [&Tensor; 2] {
        [self.down.weight(), self.up.weight()]
    }
}

/// `y` with the adapter's term added when there is one.
pub fn adapt(lora: Option<&Lora>, x: &Tensor, y: Tensor) -> Result<Tensor> {
    match lora {
        Some(l) => l.add_to(x, &y),
        None => Ok(y),
    }
}

/// A projection `x → x W^T + b`, then its adapter.
pub fn project(linear: &Linear, lora: Option<&Lora>, x: &Tensor) -> Result<Tensor> {
    adapt(lora, x, linear.forward(x)?)
}
