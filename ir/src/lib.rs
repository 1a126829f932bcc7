//! exitgraph's graph IR: layer-level ops on a petgraph graph, symbolic shapes, weights by
//! reference, verification, RON and DOT, and import of Hugging Face checkpoints.

pub mod graph;
pub mod import;
pub mod op;
pub mod serial;
pub mod shape;
pub mod structure;
pub mod verify;
pub mod weight;

pub use graph::{Edge, Family, Graph, ModelInfo, Node};
pub use import::{import, Checkpoint, ImportError};
pub use op::{LowRank, Op};
pub use petgraph::stable_graph::NodeIndex;
pub use shape::{Dim, Shape};
pub use structure::{Block, Exit, Filter, Head, Keep};
pub use verify::{verify, VerifyError};
pub use weight::{StoredDtype, SvdFactor, TensorInfo, WeightCatalog, WeightRef};
