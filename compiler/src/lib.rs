//! The exitgraph compiler: pipeline files (RON) and the passes they name, lowering a graph to
//! candle kernels keyed by weight identity, the [`lower::Program`] with its one entry point
//! for ragged segments, and the explicit KV state. The settings a pipeline gives the runtime
//! (batching, depth strategy, sampling) are typed here; the runtime that acts on them is the
//! `exitgraph-runtime` crate.

pub mod atomic;
pub mod batching;
pub mod device;
pub mod exits;
pub mod gemfilter;
pub mod generate;
pub mod inspect;
pub mod lower;
pub mod op_profile;
pub mod pipeline;
pub mod ron_file;
pub mod synth;
pub mod tensor_io;

/// The graph rewrites, re-exported for library users.
pub use exitgraph_passes as passes;
