//! Several projections of the same input as one matmul (q/k/v, gate/up): one pass over the
//! input and one larger GEMM instead of several small ones.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::Linear;

pub struct FusedLinear {
    linear: Linear,
    /// Output width of each part, in order.
    sizes: Vec<usize>,
}

impl FusedLinear {
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
        Ok(FusedLinear {
            linear: Linear::new(weight, bias),
            sizes,
        })
    }

    /// Each part's output, as views of one result.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let y = self.linear.forward(x)?;
        let mut start = 0;
        let mut out = Vec::with_capacity(self.sizes.len());
        for &n in &self.sizes {
            out.push(y.narrow(D::Minus1, start, n)?);
            start += n;
        }
        Ok(out)
    }
}
