//! exitgraph: pipelines of graph passes over Hugging Face checkpoints, lowered to candle,
//! served by an ECS runtime with adaptive depth.
//!
//! This crate is the front door: the `exitgraph` command line, evaluation and benchmarks, and
//! the library's parts under one name. The parts live in their own crates:
//! `exitgraph-ir` (the graph), `exitgraph-passes` (rewrites), `exitgraph-compiler`
//! (pipelines, lowering, `Program`, KV state), `exitgraph-runtime` (the ECS runtime,
//! depth strategies, simulator, generation) and `exitgraph-train` (training, corpus).

pub use exitgraph_compiler::{
    atomic, batching, device, gemfilter, inspect, lower, pipeline, ron_file, synth, tensor_io,
};
pub use exitgraph_passes as passes;
pub use exitgraph_runtime as runtime;
pub use exitgraph_train as train;
pub use exitgraph_train::corpus;

/// Adaptive depth: strategies, exit rules and path costs (compiler), encoder exits
/// (runtime), training exit heads (train).
pub mod exits {
    pub use exitgraph_compiler::exits::*;
    pub use exitgraph_runtime::encoder;
    pub use exitgraph_train::exits as train;
}

/// Generation settings (compiler) and the generation entry point (runtime).
pub mod generate {
    pub use exitgraph_compiler::generate::*;
    pub use exitgraph_runtime::generate;
}

pub mod bench;
pub mod bench_exits;
pub mod bench_gemfilter;
pub mod bench_projections;
pub mod bench_speculative;
pub mod cpu;
pub mod eval;
