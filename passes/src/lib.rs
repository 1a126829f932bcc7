//! Graph rewrites of exitgraph.
//!
//! A pass is a small struct implementing [`Pass`]; the [`PassManager`] runs a pipeline of them,
//! verifies the graph after each and names the pass that broke it. [`PassSpec`] is the RON
//! form of a pass in a pipeline file. Each pass's module documents its invariant.

mod context;
pub mod exits;
pub mod gemfilter;
mod manager;
pub mod recursive;
mod spec;
pub mod truncate;

pub use context::{FileProblem, PassContext};
pub use exits::{HeadDims, HeadKind, InsertExits};
pub use gemfilter::GemFilter;
pub use manager::{PassManager, PassOutcome};
pub use recursive::{DepthLora, LoraInit, LoraRank, LoraTarget, TieInit, TieLayers, TieNorms};
pub use spec::PassSpec;
pub use truncate::TruncateLayers;

use exitgraph_ir::{Graph, VerifyError};

/// What a pass did, for the CLI, the GUI's highlights and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// One line saying what changed.
    pub summary: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The pass's parameters do not fit this graph.
    #[error("{pass}: {message}")]
    Config { pass: &'static str, message: String },
    /// A field of the pass names something that cannot be used (a missing or broken file).
    #[error("{pass}: field \"{field}\": {message}")]
    Field {
        pass: &'static str,
        field: &'static str,
        message: String,
    },
    /// The graph failed verification after the pass ran. (The message includes the
    /// problems, so they are not also a `source()` that `{:#}` would print again.)
    #[error("after pass {pass}: {cause}")]
    Broken {
        pass: &'static str,
        cause: VerifyError,
    },
}

/// A rewrite of the graph. `cx` resolves files the pass names and lets it extend the
/// weight catalog, so the compiler needs to know no pass by name.
pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, graph: &mut Graph, cx: &PassContext) -> Result<PassReport, PassError>;
}
