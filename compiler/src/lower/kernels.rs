//! Lowered forms of the ops other than attention.

use super::adapter::Adapters;
use super::dense::Dense;
use super::fused::FusedLinear;
use crate::op_profile::{shape, time as timed};
use candle_core::{DType, Result, Tensor, D};
use exitgraph_ir::op::{Activation, NormKind, PoolMode};

pub struct EmbeddingKernel {
    pub tokens: Tensor,
    pub hidden: usize,
    pub positions: Option<Tensor>,
    pub token_types: Option<Tensor>,
}

impl EmbeddingKernel {
    pub fn tensors(&self) -> Vec<&Tensor> {
        std::iter::once(&self.tokens)
            .chain(&self.positions)
            .chain(&self.token_types)
            .collect()
    }

    /// `ids: [batch, seq]` (u32) at positions `start..start + seq`.
    pub fn forward(
        &self,
        ids: &Tensor,
        start: usize,
        token_types: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let mut x =
            self.tokens
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, s, self.hidden))?;
        if let Some(pos) = &self.positions {
            let max = pos.dim(0)?;
            if start + s > max {
                candle_core::bail!(
                    "position {} exceeds the model's {max} learned positions",
                    start + s - 1
                );
            }
            x = x.broadcast_add(&pos.narrow(0, start, s)?.unsqueeze(0)?)?;
        }
        if let Some(table) = &self.token_types {
            let t = match token_types {
                Some(t) => {
                    table
                        .index_select(&t.flatten_all()?, 0)?
                        .reshape((b, s, self.hidden))?
                }
                None => table
                    .narrow(0, 0, 1)?
                    .unsqueeze(0)?
                    .broadcast_as((b, s, self.hidden))?
                    .contiguous()?,
            };
            x = (x + t)?;
        }
        Ok(x)
    }

    /// `ids: [1, total]` of several sequences, each token at its own position.
    pub fn forward_positions(&self, ids: &Tensor, positions: &[u32]) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let mut x =
            self.tokens
                .index_select(&ids.flatten_all()?, 0)?
                .reshape((b, s, self.hidden))?;
        if let Some(pos) = &self.positions {
            let max = pos.dim(0)?;
            if let Some(&p) = positions.iter().find(|&&p| p as usize >= max) {
                candle_core::bail!("position {p} exceeds the model's {max} learned positions");
            }
            let idx = Tensor::new(positions, ids.device())?;
            x = (x + pos.index_select(&idx, 0)?.unsqueeze(0)?)?;
        }
        if let Some(table) = &self.token_types {
            x = x.broadcast_add(&table.narrow(0, 0, 1)?.unsqueeze(0)?)?;
        }
        Ok(x)
    }
}

pub struct NormKernel {
    pub kind: NormKind,
    pub weight: Tensor,
    /// Zeros for RMSNorm and bias-free LayerNorm.
    pub bias: Tensor,
    /// Whether `bias` is a stored weight (not the zeros stood in for a missing one).
    pub stored_bias: bool,
    pub eps: f32,
    /// Use ops with gradients (training) instead of the fused inference kernels.
    pub differentiable: bool,
}

impl NormKernel {
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut t = vec![&self.weight];
        if self.stored_bias {
            t.push(&self.bias);
        }
        t
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use candle_nn::ops;
        let (w, b, eps) = (&self.weight, &self.bias, self.eps);
        timed(
            || format!("{:?} norm {}", self.kind, shape(x)),
            || match (self.kind, self.differentiable) {
                (NormKind::Rms, false) => ops::rms_norm(x, w, eps),
                (NormKind::Rms, true) => ops::rms_norm_slow(x, w, eps),
                (NormKind::Layer, false) => ops::layer_norm(x, w, b, eps),
                (NormKind::Layer, true) => ops::layer_norm_slow(x, w, b, eps),
            },
        )
    }
}

pub fn activate(act: Activation, x: &Tensor) -> Result<Tensor> {
    match act {
        Activation::Silu => x.silu(),
        Activation::GeluTanh => x.gelu(),
        Activation::GeluErf => x.gelu_erf(),
        Activation::Relu => x.relu(),
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
    }
}

pub enum MlpIn {
    /// `act(gate(x)) * up(x)`, gate and up fused.
    Gated(FusedLinear),
    /// `act(up(x))`.
    Plain(Dense),
}

pub struct MlpKernel {
    pub act: Activation,
    pub input: MlpIn,
    pub down: Dense,
}

impl MlpKernel {
    /// `adapters` in the op's projection order: gate (when gated), up, down.
    pub fn forward(&self, x: &Tensor, adapters: Adapters<'_>) -> Result<Tensor> {
        let (h, down) = match &self.input {
            MlpIn::Gated(gate_up) => {
                let (gate, up) = timed(
                    || format!("gate/up projection {}", shape(x)),
                    || {
                        let mut parts = gate_up.forward(x)?.into_iter();
                        let (Some(gate), Some(up)) = (parts.next(), parts.next()) else {
                            candle_core::bail!("the fused gate/up projection has no two parts");
                        };
                        Ok((adapters.adapt(0, x, gate)?, adapters.adapt(1, x, up)?))
                    },
                )?;
                let h = timed(
                    || format!("{:?}(gate) × up {}", self.act, shape(&gate)),
                    || activate(self.act, &gate)? * up,
                )?;
                (h, 2)
            }
            MlpIn::Plain(up) => {
                let h = timed(
                    || format!("up projection {}", shape(x)),
                    || adapters.project(0, up, x),
                )?;
                let h = timed(
                    || format!("{:?} {}", self.act, shape(&h)),
                    || activate(self.act, &h),
                )?;
                (h, 1)
            }
        };
        timed(
            || format!("down projection {}", shape(&h)),
            || adapters.project(down, &self.down, &h),
        )
    }

    /// Every stored tensor the kernel holds.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut t = match &self.input {
            MlpIn::Gated(f) => f.tensors(),
            MlpIn::Plain(l) => l.tensors(),
        };
        t.extend(self.down.tensors());
        t
    }
}

#[derive(Clone)]
pub struct PoolKernel {
    pub mode: PoolMode,
    pub normalize: bool,
}

impl PoolKernel {
    /// `x: [batch, seq, hidden]`, `mask: [batch, seq]` (f32, 1 = real token).
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let pooled = match self.mode {
            PoolMode::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
            PoolMode::Mean => match mask {
                Some(m) => {
                    let m = m.to_dtype(x.dtype())?.unsqueeze(2)?;
                    let sum = x.broadcast_mul(&m)?.sum(1)?;
                    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                    sum.broadcast_div(&count)?
                }
                None => x.mean(1)?,
            },
        };
        if self.normalize {
            let norm = pooled
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?
                .to_dtype(pooled.dtype())?;
            pooled.broadcast_div(&norm)
        } else {
            Ok(pooled)
        }
    }
}
