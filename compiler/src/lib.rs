//! exitgraph: pipelines of graph passes over Hugging Face checkpoints, lowered to candle.

pub mod device;
pub mod generate;
pub mod lower;
