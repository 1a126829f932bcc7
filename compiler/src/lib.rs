//! exitgraph: pipelines of graph passes over Hugging Face checkpoints, lowered to candle.

pub mod atomic;
pub mod bench;
pub mod bench_exits;
pub mod corpus;
pub mod device;
pub mod eval;
pub mod exits;
pub mod generate;
pub mod inspect;
pub mod lower;
pub mod pipeline;
pub mod ron_file;
pub mod runtime;
pub mod synth;
pub mod tensor_io;
pub mod train;

/// The graph rewrites, re-exported for the explorer and library users.
pub use exitgraph_passes as passes;
