//! A token's compute path: the graph nodes that ran to produce it.

use exitgraph_ir::{Graph, NodeIndex};
use std::collections::BTreeSet;

/// Nodes on the path of a token that ran `layers` (0-based) and exited after `exit_layer`
/// layers: every node of those layers, and the nodes outside layers that lead to the output
/// used (the embedding before, the norm and head after). When the graph has outputs per exit
/// point (`exit.{k}` or `logits.{k}`, as exit heads add), the head of exit `exit_layer` is
/// followed; otherwise `logits`.
pub fn path(g: &Graph, layers: &[usize], exit_layer: usize) -> BTreeSet<NodeIndex> {
    let ran: BTreeSet<usize> = layers.iter().copied().collect();
    let depth = g.layers().last().map_or(0, |l| l + 1);
    let output = [format!("exit.{exit_layer}"), format!("logits.{exit_layer}")]
        .into_iter()
        .find_map(|name| g.outputs.get(&name).copied())
        .or_else(|| {
            if exit_layer >= depth {
                g.outputs
                    .get("logits")
                    .or_else(|| g.outputs.get("last_hidden_state"))
                    .copied()
            } else {
                None
            }
        });
    // Walk back from the output used through nodes that ran.
    let mut on_path = BTreeSet::new();
    let mut stack: Vec<NodeIndex> = output.into_iter().collect();
    if stack.is_empty() {
        // No output for this exit point: the layers that ran and what feeds them.
        stack = g
            .graph
            .node_indices()
            .filter(|&n| g.graph[n].layer.is_some_and(|l| ran.contains(&l)))
            .collect();
    }
    while let Some(n) = stack.pop() {
        let runs = g.graph[n].layer.is_none_or(|l| ran.contains(&l));
        if runs && on_path.insert(n) {
            stack.extend(g.inputs(n));
        }
    }
    on_path
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_graphs::chain;

    #[test]
    fn a_full_depth_token_uses_every_node() {
        let g = chain(4);
        let p = path(&g, &[0, 1, 2, 3], 4);
        assert_eq!(p.len(), g.graph.node_count());
    }

    #[test]
    fn an_early_exit_uses_its_head_and_the_layers_before_it() {
        let mut g = chain(4);
        let l1 = g.find("layers.1.mlp_residual").unwrap();
        let head = g.graph[g.find("lm_head").unwrap()].clone();
        let exit = g.add(
            exitgraph_ir::Node {
                name: "exit_head.2".into(),
                layer: None,
                ..head
            },
            &[l1],
        );
        g.outputs.insert("exit.2".into(), exit);
        let p = path(&g, &[0, 1], 2);
        let names: BTreeSet<&str> = p.iter().map(|&n| g.graph[n].name.as_str()).collect();
        assert!(names.contains("exit_head.2"));
        assert!(names.contains("embed"));
        assert!(names.contains("layers.1.attn"));
        assert!(!names.contains("layers.2.attn"));
        assert!(!names.contains("lm_head"));
    }

    #[test]
    fn without_a_head_for_the_exit_the_layers_run_are_shown() {
        let g = chain(4);
        let p = path(&g, &[0, 1], 2);
        let names: BTreeSet<&str> = p.iter().map(|&n| g.graph[n].name.as_str()).collect();
        assert!(names.contains("layers.0.attn") && names.contains("embed"));
        assert!(!names.contains("layers.3.attn") && !names.contains("lm_head"));
    }
}
