//! Text forms of a graph: RON (structure, round-trips) and Graphviz DOT.

use crate::graph::Graph;
use crate::op::Op;
use std::fmt::Write;

/// Why a graph could not be read from RON.
#[derive(Debug, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct RonError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl From<ron::error::SpannedError> for RonError {
    fn from(e: ron::error::SpannedError) -> Self {
        RonError {
            line: e.span.start.line,
            column: e.span.start.col,
            message: e.code.to_string(),
        }
    }
}

/// The graph as pretty RON.
pub fn to_ron(g: &Graph) -> Result<String, ron::Error> {
    let cfg = ron::ser::PrettyConfig::new()
        .new_line("\n".to_string())
        .struct_names(true);
    ron::ser::to_string_pretty(g, cfg)
}

/// A graph from RON written by [`to_ron`].
pub fn from_ron(text: &str) -> Result<Graph, RonError> {
    Ok(ron::from_str(text)?)
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The graph in Graphviz DOT; `highlight` names nodes to draw filled (e.g. those a pass added).
pub fn to_dot(g: &Graph, highlight: &[String]) -> String {
    let mut out = String::from(
        "digraph exitgraph {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n",
    );
    let order = g
        .topo_order()
        .unwrap_or_else(|_| g.graph.node_indices().collect());
    for n in order {
        let node = &g.graph[n];
        let detail = match &node.op {
            Op::Attention(a) | Op::QueryKeyScores(a) => {
                format!("\\nheads {} / kv {} x {}", a.heads, a.kv_heads, a.head_dim)
            }
            Op::Mlp(m) => format!("\\n{:?} {}", m.act, m.up.out_features),
            _ => String::new(),
        };
        let style = if highlight.contains(&node.name) {
            ", style=filled, fillcolor=\"#ffd27f\""
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  n{} [label=\"{}\\n{}{}\\n{}\"{}];",
            n.index(),
            escape(&node.name),
            node.op.kind(),
            detail,
            node.shape,
            style
        );
    }
    let mut edges: Vec<(usize, usize, usize)> = g
        .graph
        .edge_indices()
        .filter_map(|e| {
            let (a, b) = g.graph.edge_endpoints(e)?;
            Some((a.index(), b.index(), g.graph[e].slot))
        })
        .collect();
    edges.sort();
    for (a, b, slot) in edges {
        let _ = writeln!(out, "  n{a} -> n{b} [label=\"{slot}\"];");
    }
    for (name, idx) in &g.outputs {
        let _ = writeln!(
            out,
            "  \"out:{}\" [shape=plaintext];\n  n{} -> \"out:{}\" [style=dashed];",
            escape(name),
            idx.index(),
            escape(name)
        );
    }
    out.push_str("}\n");
    out
}
