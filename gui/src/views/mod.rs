//! The four views of the explorer.

pub mod graph;
pub mod pipeline;
pub mod run;
pub mod sim;
