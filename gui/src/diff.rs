//! Which nodes a pipeline added, changed or removed: the graph before the passes against the
//! graph after them, matched by node name.

use exitgraph_ir::{Graph, NodeIndex};
use std::collections::{BTreeMap, BTreeSet};

/// How a node of the compiled graph relates to the imported one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeStatus {
    Same,
    /// Its op, shape, layer or inputs differ from the node of the same name.
    Changed,
    /// No node of that name was imported.
    Added,
    /// Only in the imported graph.
    Removed,
}

/// The status of every node of both graphs, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GraphDiff {
    pub after: BTreeMap<String, NodeStatus>,
    pub before: BTreeMap<String, NodeStatus>,
}

impl GraphDiff {
    pub fn status_after(&self, name: &str) -> NodeStatus {
        self.after.get(name).copied().unwrap_or(NodeStatus::Same)
    }

    pub fn status_before(&self, name: &str) -> NodeStatus {
        self.before.get(name).copied().unwrap_or(NodeStatus::Same)
    }

    /// (added, changed, removed) counts.
    pub fn counts(&self) -> (usize, usize, usize) {
        let count = |m: &BTreeMap<String, NodeStatus>, s| m.values().filter(|&&v| v == s).count();
        (
            count(&self.after, NodeStatus::Added),
            count(&self.after, NodeStatus::Changed),
            count(&self.before, NodeStatus::Removed),
        )
    }
}

fn input_names(g: &Graph, n: NodeIndex) -> Vec<&str> {
    g.inputs(n)
        .into_iter()
        .filter_map(|i| g.node(i).map(|x| x.name.as_str()))
        .collect()
}

/// Compares the graph before the passes with the graph after them.
pub fn diff(before: &Graph, after: &Graph) -> GraphDiff {
    let by_name: BTreeMap<&str, NodeIndex> = before
        .graph
        .node_indices()
        .map(|n| (before.graph[n].name.as_str(), n))
        .collect();
    let mut out = GraphDiff::default();
    let mut seen = BTreeSet::new();
    for n in after.graph.node_indices() {
        let node = &after.graph[n];
        let status = match by_name.get(node.name.as_str()) {
            None => NodeStatus::Added,
            Some(&b) => {
                seen.insert(node.name.as_str());
                let old = &before.graph[b];
                if old.op != node.op
                    || old.shape != node.shape
                    || old.layer != node.layer
                    || input_names(before, b) != input_names(after, n)
                {
                    NodeStatus::Changed
                } else {
                    NodeStatus::Same
                }
            }
        };
        out.after.insert(node.name.clone(), status);
    }
    for (name, _) in by_name {
        let status = if seen.contains(name) {
            out.after.get(name).copied().unwrap_or(NodeStatus::Same)
        } else {
            NodeStatus::Removed
        };
        out.before.insert(name.to_string(), status);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_graphs::chain;

    #[test]
    fn identical_graphs_have_no_changes() {
        // Two graphs built apart with the same content: matched by name, not identity.
        let (before, after) = (chain(3), chain(3));
        let d = diff(&before, &after);
        assert_eq!(d.counts(), (0, 0, 0));
        assert!(d.after.values().all(|&s| s == NodeStatus::Same));
    }

    #[test]
    fn truncation_removes_layers_and_rewires_the_norm() {
        let before = chain(4);
        let after = chain(2);
        let d = diff(&before, &after);
        let (added, changed, removed) = d.counts();
        assert_eq!(added, 0);
        assert_eq!(removed, 2 * 6);
        // The final norm now reads layer 2's output instead of layer 4's.
        assert_eq!(d.status_after("norm"), NodeStatus::Changed);
        assert!(changed >= 1);
        assert_eq!(d.status_before("layers.3.mlp"), NodeStatus::Removed);
        assert_eq!(d.status_after("layers.0.mlp"), NodeStatus::Same);
    }

    #[test]
    fn a_new_node_is_added() {
        let before = chain(2);
        let mut after = chain(2);
        let last = after.find("lm_head").unwrap();
        let mut extra = after.graph[last].clone();
        extra.name = "exit_head.1".into();
        after.add(extra, &[last]);
        let d = diff(&before, &after);
        assert_eq!(d.status_after("exit_head.1"), NodeStatus::Added);
        assert_eq!(d.counts().0, 1);
    }
}
