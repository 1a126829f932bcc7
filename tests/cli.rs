//! The `exitgraph` binary end to end.
