//! The views of the explorer.

pub mod exits;
pub mod graph;
pub mod pipeline;
pub mod run;
pub mod sim;
