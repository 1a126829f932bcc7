//! exitgraph-gui: the desktop explorer of exitgraph. Views live in [`views`]; everything
//! they compute (layout, folding, diffs, node details, heatmaps, trace aggregation) is in
//! plain modules beside them.

pub mod app;
pub mod collapse;
pub mod compute_path;
pub mod diff;
pub mod heatmap;
pub mod jobs;
pub mod layout;
pub mod loaded;
pub mod looping;
pub mod node_info;
pub mod paths;
pub mod pipeline_check;
pub mod ron_highlight;
pub mod serving;
pub mod sweep;
pub mod tokens;
pub mod trace_stats;
pub mod viewport;
pub mod views;

#[cfg(test)]
mod test_graphs;

pub use app::ExplorerApp;
