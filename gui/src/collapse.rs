//! Groups a graph's nodes into columns for drawing: the nodes before the first layer, one
//! column per transformer layer, the nodes after the last; runs of identical layers fold into
//! one block so a model of 100+ layers stays readable, and a tied model's looped block (every
//! iteration of it) folds into one box.

use crate::diff::NodeStatus;
use crate::looping::Looping;
use exitgraph_ir::{Graph, NodeIndex};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One box of the drawing.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Node(NodeIndex),
    /// Layers `first..=last` folded: every layer has the same ops in the same order.
    Block {
        first: usize,
        last: usize,
        nodes: Vec<NodeIndex>,
        /// The op kinds of one layer, in order.
        kinds: Vec<&'static str>,
    },
    /// A tied model's looped block folded: every iteration's layers in one box.
    Loop {
        looping: Looping,
        nodes: Vec<NodeIndex>,
        /// The op kinds of one layer, in order.
        kinds: Vec<&'static str>,
    },
}

/// The boxes, the columns they sit in (top to bottom) and the edges between boxes.
#[derive(Clone, Debug, Default)]
pub struct Grouping {
    pub items: Vec<Item>,
    pub columns: Vec<Column>,
    pub edges: Vec<(usize, usize)>,
    pub item_of: HashMap<NodeIndex, usize>,
}

/// A column: its title and its items, top to bottom.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Column {
    pub title: String,
    pub items: Vec<usize>,
}

/// Options for [`group`].
#[derive(Clone, Debug, Default)]
pub struct CollapseOptions {
    /// Fold runs of identical layers.
    pub collapse: bool,
    /// Fold a tied model's looped block into one box (unless one of its layers is expanded).
    pub loops: bool,
    /// Layers never folded.
    pub expanded: BTreeSet<usize>,
}

/// Longest distance from a source node, for every node (0 for a graph with a cycle).
pub fn ranks(g: &Graph) -> HashMap<NodeIndex, usize> {
    let mut rank: HashMap<NodeIndex, usize> = HashMap::new();
    let order = g
        .topo_order()
        .unwrap_or_else(|_| g.graph.node_indices().collect());
    for n in order {
        let r = g
            .inputs(n)
            .iter()
            .filter_map(|i| rank.get(i).map(|r| r + 1))
            .max()
            .unwrap_or(0);
        rank.insert(n, r);
    }
    rank
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Before,
    Layer(usize),
    After,
}

/// Groups `g` for drawing; `status` gives each node's diff status (layers whose statuses
/// differ never fold together).
pub fn group(g: &Graph, status: impl Fn(&str) -> NodeStatus, opts: &CollapseOptions) -> Grouping {
    let rank = ranks(g);
    let first_layered = g
        .graph
        .node_indices()
        .filter(|&n| g.graph[n].layer.is_some())
        .filter_map(|n| rank.get(&n).copied())
        .min()
        .unwrap_or(usize::MAX);
    let mut by_key: BTreeMap<Key, Vec<NodeIndex>> = BTreeMap::new();
    for n in g.graph.node_indices() {
        let key = match g.graph[n].layer {
            Some(l) => Key::Layer(l),
            None if rank.get(&n).copied().unwrap_or(0) < first_layered => Key::Before,
            None => Key::After,
        };
        by_key.entry(key).or_default().push(n);
    }
    for nodes in by_key.values_mut() {
        nodes.sort_by_key(|n| (rank.get(n).copied().unwrap_or(0), g.graph[*n].name.clone()));
    }
    let signature = |nodes: &[NodeIndex]| -> Vec<(&'static str, NodeStatus)> {
        nodes
            .iter()
            .map(|&n| (g.graph[n].op.kind(), status(&g.graph[n].name)))
            .collect()
    };

    let looping =
        Looping::of(g).filter(|l| opts.loops && !l.depths().any(|d| opts.expanded.contains(&d)));
    let in_loop = |k: Key| match (k, &looping) {
        (Key::Layer(l), Some(lp)) => lp.depths().contains(&l),
        _ => false,
    };

    let mut out = Grouping::default();
    let keys: Vec<Key> = by_key.keys().copied().collect();
    let mut i = 0;
    while i < keys.len() {
        let key = keys[i];
        let nodes = &by_key[&key];
        if let (true, Some(lp)) = (in_loop(key), &looping) {
            let mut end = i;
            while keys.get(end + 1).is_some_and(|&k| in_loop(k)) {
                end += 1;
            }
            let members: Vec<NodeIndex> = keys[i..=end]
                .iter()
                .flat_map(|k| by_key[k].iter().copied())
                .collect();
            let item = out.items.len();
            for &n in &members {
                out.item_of.insert(n, item);
            }
            out.items.push(Item::Loop {
                looping: lp.clone(),
                nodes: members,
                kinds: nodes.iter().map(|&n| g.graph[n].op.kind()).collect(),
            });
            out.columns.push(Column {
                title: "looped block".to_string(),
                items: vec![item],
            });
            i = end + 1;
            continue;
        }
        // The run of identical, consecutive, folded layers starting here.
        let mut end = i;
        if let (true, Key::Layer(l)) = (opts.collapse, key) {
            if !opts.expanded.contains(&l) {
                let sig = signature(nodes);
                while let Some(Key::Layer(next)) = keys.get(end + 1).copied() {
                    let prev = match keys[end] {
                        Key::Layer(p) => p,
                        _ => break,
                    };
                    if next != prev + 1
                        || opts.expanded.contains(&next)
                        || signature(&by_key[&Key::Layer(next)]) != sig
                    {
                        break;
                    }
                    end += 1;
                }
            }
        }
        if end > i {
            let (Key::Layer(first), Key::Layer(last)) = (key, keys[end]) else {
                i = end + 1;
                continue;
            };
            let members: Vec<NodeIndex> = keys[i..=end]
                .iter()
                .flat_map(|k| by_key[k].iter().copied())
                .collect();
            let item = out.items.len();
            for &n in &members {
                out.item_of.insert(n, item);
            }
            out.items.push(Item::Block {
                first,
                last,
                nodes: members,
                kinds: nodes.iter().map(|&n| g.graph[n].op.kind()).collect(),
            });
            out.columns.push(Column {
                title: format!("layers {first}–{last}"),
                items: vec![item],
            });
        } else {
            let title = match key {
                Key::Before => "inputs".to_string(),
                Key::Layer(l) => format!("layer {l}"),
                Key::After => "outputs".to_string(),
            };
            let mut col = Column {
                title,
                items: Vec::new(),
            };
            for &n in nodes {
                let item = out.items.len();
                out.item_of.insert(n, item);
                out.items.push(Item::Node(n));
                col.items.push(item);
            }
            out.columns.push(col);
        }
        i = end + 1;
    }
    let mut edges = BTreeSet::new();
    for e in g.graph.edge_indices() {
        if let Some((a, b)) = g.graph.edge_endpoints(e) {
            if let (Some(&ia), Some(&ib)) = (out.item_of.get(&a), out.item_of.get(&b)) {
                if ia != ib {
                    edges.insert((ia, ib));
                }
            }
        }
    }
    out.edges = edges.into_iter().collect();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_graphs::{chain, tied_demo};

    fn same(_: &str) -> NodeStatus {
        NodeStatus::Same
    }

    #[test]
    fn uncollapsed_has_a_column_per_layer_plus_inputs_and_outputs() {
        let g = chain(6);
        let gr = group(&g, same, &CollapseOptions::default());
        assert_eq!(gr.columns.len(), 8);
        assert_eq!(gr.columns[0].title, "inputs");
        assert_eq!(gr.columns[1].title, "layer 0");
        assert_eq!(gr.columns[7].title, "outputs");
        assert_eq!(gr.items.len(), g.graph.node_count());
        // Columns list their ops in data-flow order.
        let names: Vec<&str> = gr.columns[1]
            .items
            .iter()
            .map(|&i| match &gr.items[i] {
                Item::Node(n) => g.graph[*n].name.as_str(),
                Item::Block { .. } | Item::Loop { .. } => "",
            })
            .collect();
        assert_eq!(names[0], "layers.0.input_norm");
        assert_eq!(names[5], "layers.0.mlp_residual");
    }

    #[test]
    fn a_hundred_and_twenty_layers_fold_into_one_block() {
        let g = chain(120);
        let opts = CollapseOptions {
            collapse: true,
            ..Default::default()
        };
        let gr = group(&g, same, &opts);
        assert_eq!(gr.columns.len(), 3);
        assert_eq!(gr.columns[1].title, "layers 0–119");
        match &gr.items[gr.columns[1].items[0]] {
            Item::Block {
                first,
                last,
                nodes,
                kinds,
            } => {
                assert_eq!((*first, *last), (0, 119));
                assert_eq!(nodes.len(), 120 * 6);
                assert_eq!(kinds.len(), 6);
            }
            other => panic!("expected a block, got {other:?}"),
        }
        // input → embed → block → norm → head.
        assert_eq!(gr.edges.len(), 4);
    }

    #[test]
    fn expanding_a_layer_splits_the_block_around_it() {
        let g = chain(120);
        let opts = CollapseOptions {
            collapse: true,
            expanded: BTreeSet::from([5]),
            ..Default::default()
        };
        let gr = group(&g, same, &opts);
        let titles: Vec<&str> = gr.columns.iter().map(|c| c.title.as_str()).collect();
        assert_eq!(
            titles,
            ["inputs", "layers 0–4", "layer 5", "layers 6–119", "outputs"]
        );
    }

    #[test]
    fn layers_with_different_status_do_not_fold_together() {
        let g = chain(10);
        let opts = CollapseOptions {
            collapse: true,
            ..Default::default()
        };
        let status = |name: &str| {
            if name.starts_with("layers.3.") {
                NodeStatus::Changed
            } else {
                NodeStatus::Same
            }
        };
        let gr = group(&g, status, &opts);
        let titles: Vec<&str> = gr.columns.iter().map(|c| c.title.as_str()).collect();
        assert_eq!(
            titles,
            ["inputs", "layers 0–2", "layer 3", "layers 4–9", "outputs"]
        );
    }

    fn titles(gr: &Grouping) -> Vec<&str> {
        gr.columns.iter().map(|c| c.title.as_str()).collect()
    }

    const LOOPS: CollapseOptions = CollapseOptions {
        collapse: false,
        loops: true,
        expanded: BTreeSet::new(),
    };

    #[test]
    fn a_tied_eight_layer_model_folds_into_one_looped_block() {
        let g = tied_demo(2, Some(16));
        let gr = group(&g, same, &LOOPS);
        assert_eq!(titles(&gr), ["inputs", "looped block", "outputs"]);
        match &gr.items[gr.columns[1].items[0]] {
            Item::Loop {
                looping,
                nodes,
                kinds,
            } => {
                assert_eq!((looping.loops, looping.block_len), (2, 4));
                assert_eq!(
                    looping.adapters().as_deref(),
                    Some("LoRA r16 per iteration")
                );
                // Every iteration's nodes are in the box: 8 depths of 6 ops.
                assert_eq!(nodes.len(), 48);
                assert_eq!(kinds.len(), 6);
            }
            other => panic!("expected a looped block, got {other:?}"),
        }
        // input → embed → loop → final norm → head.
        assert_eq!(gr.edges.len(), 4);
        // Folding runs of identical layers as well changes nothing: the loop takes them all.
        let both = CollapseOptions {
            collapse: true,
            ..LOOPS
        };
        assert_eq!(titles(&group(&g, same, &both)), titles(&gr));
    }

    #[test]
    fn an_unfolded_loop_shows_every_iterations_layers() {
        let g = tied_demo(2, None);
        let layer_columns = |gr: &Grouping| {
            titles(gr)
                .iter()
                .filter(|t| t.starts_with("layer "))
                .count()
        };
        // Not folding loops, or expanding any layer of the loop: eight layer columns.
        let off = group(&g, same, &CollapseOptions::default());
        assert_eq!(layer_columns(&off), 8);
        let expanded = CollapseOptions {
            expanded: BTreeSet::from([4]),
            ..LOOPS
        };
        let gr = group(&g, same, &expanded);
        assert_eq!(layer_columns(&gr), 8);
        assert!(gr.items.iter().all(|i| !matches!(i, Item::Loop { .. })));
    }

    #[test]
    fn folding_loops_leaves_an_untied_graph_unchanged() {
        let g = chain(6);
        let plain = group(&g, same, &CollapseOptions::default());
        let loops = group(&g, same, &LOOPS);
        assert_eq!(loops.items, plain.items);
        assert_eq!(loops.columns, plain.columns);
        assert_eq!(loops.edges, plain.edges);
        let runs = CollapseOptions {
            collapse: true,
            ..Default::default()
        };
        assert_eq!(
            titles(&group(
                &g,
                same,
                &CollapseOptions {
                    loops: true,
                    ..runs.clone()
                }
            )),
            ["inputs", "layers 0–5", "outputs"]
        );
    }
}
