//! A token's compute path: the graph nodes that ran to produce it, and over a tied model
//! the loop iterations it ran.

use crate::looping::{IterationsRun, Looping};
use exitgraph_ir::{Graph, NodeIndex};
use std::collections::BTreeSet;

/// Nodes on the path of a token that ran `layers` (0-based) and exited after `exit_layer`
/// layers: every node of those layers, and the nodes outside layers that lead to the output
/// used (the embedding before, the norm and head after). When the graph has an exit head
/// after `exit_layer` (an [`exitgraph_ir::Exit`] record, as `InsertExits` adds), its head is
/// followed; at full depth, the model's own head.
pub fn path(g: &Graph, layers: &[usize], exit_layer: usize) -> BTreeSet<NodeIndex> {
    let ran: BTreeSet<usize> = layers.iter().copied().collect();
    let depth = g.layers().last().map_or(0, |l| l + 1);
    let output = g
        .exit_at(exit_layer)
        .and_then(|e| e.head())
        .or_else(|| (exit_layer >= depth).then(|| g.final_output()).flatten());
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

/// The loop iterations a token that ran `layers` (0-based depths) took part in, when `g`'s
/// layers are tied into a looped block; `None` for an untied graph.
pub fn iterations(g: &Graph, layers: &[usize]) -> Option<IterationsRun> {
    Looping::of(g).map(|l| l.iterations_run(layers))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_graphs::{chain, tied_demo};

    #[test]
    fn a_full_depth_token_uses_every_node() {
        let g = chain(4);
        let p = path(&g, &[0, 1, 2, 3], 4);
        assert_eq!(p.len(), g.graph.node_count());
    }

    /// The graph as the real `InsertExits` pass leaves it (tiny Llama fixture).
    fn with_exits(after: Vec<usize>) -> Graph {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        let mut g = exitgraph_ir::import(&dir).unwrap().graph;
        let pass = exitgraph::passes::InsertExits {
            after,
            every: None,
            head: exitgraph::passes::HeadKind::default(),
            gate: false,
            weights: None,
        };
        exitgraph::passes::PassManager::new(vec![Box::new(pass)])
            .run(&mut g)
            .unwrap();
        g
    }

    #[test]
    fn an_early_exit_uses_its_head_and_the_layers_before_it() {
        let g = with_exits(vec![2, 4]);
        let p = path(&g, &[0, 1], 2);
        let names: BTreeSet<&str> = p.iter().map(|&n| g.graph[n].name.as_str()).collect();
        // The exit's own norm and head, as the pass names them.
        assert!(names.contains("exit.2.head"), "{names:?}");
        assert!(names.contains("exit.2.norm"), "{names:?}");
        assert!(names.contains("embed"));
        assert!(names.contains("layers.1.attn"));
        assert!(!names.contains("layers.2.attn"));
        assert!(!names.contains("lm_head"));
        // A token exiting at the second exit takes that exit's head, not the first's.
        let deeper = path(&g, &[0, 1, 2, 3], 4);
        let names4: BTreeSet<&str> = deeper.iter().map(|&n| g.graph[n].name.as_str()).collect();
        assert!(names4.contains("exit.4.head") && names4.contains("layers.3.mlp"));
        assert!(!names4.contains("exit.2.head") && !names4.contains("layers.4.attn"));
        // At full depth the model's own head is outlined, not an exit's.
        let full = path(&g, &[0, 1, 2, 3, 4, 5], 6);
        let names: BTreeSet<&str> = full.iter().map(|&n| g.graph[n].name.as_str()).collect();
        assert!(names.contains("lm_head") && !names.contains("exit.2.head"));
    }

    #[test]
    fn without_a_head_for_the_exit_the_layers_run_are_shown() {
        let g = chain(4);
        let p = path(&g, &[0, 1], 2);
        let names: BTreeSet<&str> = p.iter().map(|&n| g.graph[n].name.as_str()).collect();
        assert!(names.contains("layers.0.attn") && names.contains("embed"));
        assert!(!names.contains("layers.3.attn") && !names.contains("lm_head"));
    }

    #[test]
    fn over_a_looped_block_the_path_follows_each_iteration() {
        let g = tied_demo(2, Some(16));
        // A token that ran every depth: both iterations, every node.
        let all = [0, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(
            iterations(&g, &all).unwrap().to_string(),
            "2 of 2 iterations"
        );
        assert_eq!(path(&g, &all, 8).len(), g.graph.node_count());
        // A token that ran the first iteration only: one of two, and only depths 0–3 on its
        // path (the shared block's nodes of the second iteration did not run).
        let first = iterations(&g, &[0, 1, 2, 3]).unwrap();
        assert_eq!((first.ran, first.of), (1, 2));
        let layers: BTreeSet<usize> = path(&g, &[0, 1, 2, 3], 4)
            .iter()
            .filter_map(|&n| g.graph[n].layer)
            .collect();
        assert_eq!(layers, BTreeSet::from([0, 1, 2, 3]));
        // An untied graph has no iterations to count.
        assert_eq!(iterations(&chain(6), &all), None);
    }
}
