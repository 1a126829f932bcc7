//! Several projections of the same input as one matmul (q/k/v, gate/up): one pass over the
//! input and one larger GEMM instead of several small ones.

use super::dense::Dense;
use candle_core::{Result, Tensor, D};

pub enum FusedLinear {
    /// One matmul, outputs split by width.
    Stacked {
        linear: Dense,
        /// Output width of each part, in order.
        sizes: Vec<usize>,
    },
    /// One matmul per part (training: each weight stays a leaf of the autograd graph, and
    /// an optimizer update is seen without re-stacking).
    Separate(Vec<Dense>),
}

impl FusedLinear {
    /// Keeps the parts as separate matmuls.
    pub fn separate(parts: Vec<(Tensor, Option<Tensor>)>) -> Self {
        FusedLinear::Separate(
            parts
                .into_iter()
                .map(|(w, b)| Dense::source(w, b))
                .collect(),
        )
    }

    /// Stacks `[out_i, in]` weights (and biases; a missing bias counts as zeros when another
    /// part has one).
    pub fn new(parts: Vec<(Tensor, Option<Tensor>)>) -> Result<Self> {
        let sizes = parts
            .iter()
            .map(|(w, _)| w.dim(0))
            .collect::<Result<Vec<_>>>()?;
        let any_bias = parts.iter().any(|(_, b)| b.is_some());
        let weights: Vec<&Tensor> = parts.iter().map(|(w, _)| w).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if any_bias {
            let biases = parts
                .iter()
                .map(|(w, b)| match b {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(w.dim(0)?, w.dtype(), w.device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(FusedLinear::Stacked {
            linear: Dense::inference(weight, bias)?,
            sizes,
        })
    }

    /// Every stored tensor.
    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            FusedLinear::Stacked { linear, .. } => linear.tensors(),
            FusedLinear::Separate(parts) => parts.iter().flat_map(Dense::tensors).collect(),
        }
    }

    /// Each part's output, as views of one result.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            FusedLinear::Stacked { linear, sizes } => {
                let y = linear.forward(x)?;
                let mut start = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for &n in sizes {
                    out.push(y.narrow(D::Minus1, start, n)?);
                    start += n;
                }
                Ok(out)
            }
            FusedLinear::Separate(parts) => parts.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// Part `i`'s output alone, computing only it (GemFilter's scores need keys of every
    /// position and the query of one).
    pub fn forward_part(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        match self {
            FusedLinear::Stacked { linear, sizes } => {
                let Some(&n) = sizes.get(i) else {
                    candle_core::bail!("a fused projection has no part {i}");
                };
                let start: usize = sizes.iter().take(i).sum();
                linear.narrow(start, n)?.forward(x)
            }
            FusedLinear::Separate(parts) => match parts.get(i) {
                Some(l) => l.forward(x),
                None => candle_core::bail!("a fused projection has no part {i}"),
            },
        }
    }

    /// The outputs of the parts after the first `skip`, computing only those (state copying
    /// needs keys and values, not queries).
    pub fn forward_tail(&self, x: &Tensor, skip: usize) -> Result<Vec<Tensor>> {
        match self {
            FusedLinear::Stacked { linear, sizes } => {
                let start: usize = sizes.iter().take(skip).sum();
                let rest: usize = sizes.iter().skip(skip).sum();
                let y = linear.narrow(start, rest)?.forward(x)?;
                let mut at = 0;
                let mut out = Vec::with_capacity(sizes.len().saturating_sub(skip));
                for &n in sizes.iter().skip(skip) {
                    out.push(y.narrow(D::Minus1, at, n)?);
                    at += n;
                }
                Ok(out)
            }
            FusedLinear::Separate(parts) => parts.iter().skip(skip).map(|l| l.forward(x)).collect(),
        }
    }
}
