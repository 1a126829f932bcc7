//! Low-rank adapters applied at run time: `y = x W^T + scale · (x A^T) B^T`, the stored
//! weight `W` shared by every place that uses it and never merged with an adapter.

use super::dense::Dense;
use candle_core::{Result, Tensor};

/// One projection's adapter, lowered: `A: [rank, in]`, `B: [out, rank]`.
#[derive(Clone)]
pub struct Lora {
    pub down: Dense,
    pub up: Dense,
    pub scale: f64,
}

impl Lora {
    /// Keeps `a` and `b` as the source's own tensors (training: see [`Dense::source`]).
    pub fn new(a: Tensor, b: Tensor, scale: f64) -> Self {
        Lora {
            down: Dense::source(a, None),
            up: Dense::source(b, None),
            scale,
        }
    }

    /// For inference (see [`Dense::inference`]).
    pub fn inference(a: Tensor, b: Tensor, scale: f64) -> Result<Self> {
        Ok(Lora {
            down: Dense::inference(a, None)?,
            up: Dense::inference(b, None)?,
            scale,
        })
    }

    /// `y + scale · (x A^T) B^T`.
    pub fn add_to(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        y + self.delta(x)?
    }

    /// `scale · (x A^T) B^T`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let delta = self.up.forward(&self.down.forward(x)?)?;
        if self.scale == 1.0 {
            Ok(delta)
        } else {
            delta * self.scale
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut t = self.down.tensors();
        t.extend(self.up.tensors());
        t
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
pub fn project(linear: &Dense, lora: Option<&Lora>, x: &Tensor) -> Result<Tensor> {
    adapt(lora, x, linear.forward(x)?)
}

/// Rows of a call that share one place's adapters: `rows` consecutive tokens of the flat
/// stream (axis 1), with that place's adapters in [`exitgraph_ir::Op::linears`] order.
#[derive(Clone, Copy)]
pub struct RowGroup<'a> {
    pub rows: usize,
    pub adapters: &'a [Option<Lora>],
}

/// The adapters of one call of a kernel: one place's for every row, or, when rows from
/// several places that share the kernel's weights run together (the iterations of a looped
/// block), each group of rows its own. The shared projection then runs once over every row
/// and each group adds its own low-rank term.
#[derive(Clone, Copy)]
pub enum Adapters<'a> {
    Uniform(&'a [Option<Lora>]),
    Grouped(&'a [RowGroup<'a>]),
}

impl Adapters<'_> {
    /// `y` (projection `i` of `x`, `[batch, rows, out]`) with adapter `i`'s term added to
    /// the rows it applies to.
    pub fn adapt(&self, i: usize, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let nth = |a: &[Option<Lora>]| a.get(i).and_then(Option::as_ref).cloned();
        match self {
            Adapters::Uniform(a) => adapt(a.get(i).and_then(Option::as_ref), x, y),
            Adapters::Grouped(groups) => {
                if groups.iter().all(|g| nth(g.adapters).is_none()) {
                    return Ok(y);
                }
                let total: usize = groups.iter().map(|g| g.rows).sum();
                if total != x.dim(1)? {
                    candle_core::bail!(
                        "adapter groups cover {total} rows of a call with {}",
                        x.dim(1)?
                    );
                }
                let mut deltas = Vec::with_capacity(groups.len());
                let mut offset = 0;
                for g in groups.iter() {
                    deltas.push(match nth(g.adapters) {
                        Some(l) => l.delta(&x.narrow(1, offset, g.rows)?)?,
                        None => y.narrow(1, offset, g.rows)?.zeros_like()?,
                    });
                    offset += g.rows;
                }
                y + Tensor::cat(&deltas, 1)?
            }
        }
    }

    /// Projection `i`: `x W^T + b`, then its adapters.
    pub fn project(&self, i: usize, linear: &Dense, x: &Tensor) -> Result<Tensor> {
        self.adapt(i, x, linear.forward(x)?)
    }
}
