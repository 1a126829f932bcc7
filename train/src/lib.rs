//! Training on candle autograd: parameters selectable by name pattern, AdamW with warmup and
//! cosine decay, gradient clipping and accumulation, periodic evaluation, atomic checkpoints
//! with exact resume. Language-model training from scratch lives in [`lm`], training exit heads
//! in [`exits`], the graded synthetic corpus both train on in [`corpus`].

pub mod corpus;
pub mod data;
pub mod exits;
pub mod layerskip;
pub mod lm;
pub mod optim;
pub mod params;
pub mod recursive;
pub mod trainer;

pub use optim::{AdamW, AdamWConfig, Schedule};
pub use params::{glob_match, ParamStore};
pub use trainer::{TrainConfig, TrainLog, Trainer};

use candle_core::Tensor;

/// Mean next-token cross-entropy of `logits: [batch, seq, vocab]` against
/// `targets: [batch, seq]` (u32).
pub fn lm_loss(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    candle_nn::loss::cross_entropy(&logits.reshape((b * s, v))?, &targets.reshape(b * s)?)
}
