//! What the graph view shows for a clicked node: op, shape, parameters, FLOPs, where its
//! weights come from and, in a tied model, which shared weights and loop iteration it runs
//! and the rank of its projections' adapters.

use crate::looping::projections;
use exitgraph_ir::{Graph, NodeIndex, WeightRef};
use std::collections::BTreeSet;

/// One weight of a node.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightSource {
    /// Its role in the op (`q.weight`, `tokens`, ...).
    pub role: String,
    /// The recipe: a tensor name, or how it is transposed or sliced out of one.
    pub recipe: String,
    /// The shape the recipe yields, or why it cannot be resolved.
    pub shape: Result<Vec<usize>, String>,
    /// Each checkpoint tensor read: name, file, stored dtype, stored shape.
    pub tensors: Vec<TensorSource>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorSource {
    pub name: String,
    /// File and dtype and shape as stored, or `None` when the catalog lacks the tensor.
    pub stored: Option<(String, String, Vec<usize>)>,
}

/// Where a node of a tied model sits in the loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TiedBlock {
    /// The weight identity of its block (the shared layer it runs).
    pub weights: usize,
    /// Its block's loop iteration, 0-based.
    pub iteration: usize,
    /// Depths whose blocks run the same weights, this one included, ascending.
    pub shared_by: Vec<usize>,
}

/// A low-rank adapter on one of a node's projections.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterInfo {
    /// `q`, `k`, `v`, `o`, `gate`, `up`, `down` or `lm_head`.
    pub projection: &'static str,
    pub rank: usize,
    pub scale: f64,
    /// Parameters of its two factors.
    pub params: usize,
}

/// Everything the details panel shows.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeDetails {
    pub name: String,
    pub kind: &'static str,
    pub layer: Option<usize>,
    pub shape: String,
    pub inputs: Vec<(String, String)>,
    pub params: usize,
    pub flops_per_token: u64,
    pub flops_per_context_token: u64,
    pub weights: Vec<WeightSource>,
    /// Its place in the loop, when its block shares weights with other depths.
    pub tied: Option<TiedBlock>,
    /// Adapters on its projections, in projection order.
    pub adapters: Vec<AdapterInfo>,
    /// The op's fields, pretty-printed.
    pub attributes: String,
}

/// A recipe as text: `name`, `transpose(name)`, `name[dim 0: 0..64]`.
pub fn describe_recipe(w: &WeightRef) -> String {
    match w {
        WeightRef::File { tensor } => tensor.clone(),
        WeightRef::Transpose(of) => format!("transpose({})", describe_recipe(of)),
        WeightRef::Slice {
            of,
            dim,
            start,
            len,
        } => format!(
            "{}[dim {dim}: {start}..{}]",
            describe_recipe(of),
            start + len
        ),
        other => other.to_string(),
    }
}

/// The details of node `n`, or `None` when it is not in the graph.
pub fn details(g: &Graph, n: NodeIndex) -> Option<NodeDetails> {
    let node = g.node(n)?;
    let weights = node
        .op
        .weights()
        .into_iter()
        .map(|(role, w)| WeightSource {
            role: role.to_string(),
            recipe: describe_recipe(w),
            shape: w.shape(&g.weights).map_err(|e| e.to_string()),
            tensors: w
                .sources()
                .into_iter()
                .map(|s| TensorSource {
                    name: s.to_string(),
                    stored: g
                        .weights
                        .tensors
                        .get(s)
                        .map(|t| (t.file.clone(), t.dtype.to_string(), t.shape.clone())),
                })
                .collect(),
        })
        .collect();
    let inputs = g
        .inputs(n)
        .into_iter()
        .filter_map(|i| g.node(i))
        .map(|i| (i.name.clone(), i.shape.to_string()))
        .collect();
    let tied = node
        .layer
        .and_then(|d| g.blocks.iter().find(|b| b.depth == d))
        .and_then(|block| {
            let shared_by: Vec<usize> = g
                .blocks
                .iter()
                .filter(|b| b.weights == block.weights)
                .map(|b| b.depth)
                .collect();
            (shared_by.len() > 1).then_some(TiedBlock {
                weights: block.weights,
                iteration: block.iteration,
                shared_by,
            })
        });
    let adapters = projections(&node.op)
        .into_iter()
        .filter_map(|(projection, l)| {
            l.adapter.as_ref().map(|a| AdapterInfo {
                projection,
                rank: a.rank,
                scale: a.scale,
                params: a.rank * (l.in_features + l.out_features),
            })
        })
        .collect();
    Some(NodeDetails {
        name: node.name.clone(),
        kind: node.op.kind(),
        layer: node.layer,
        shape: node.shape.to_string(),
        inputs,
        params: g.node_params(n),
        flops_per_token: node.op.flops_per_token(),
        flops_per_context_token: node.op.attention_flops_per_context_token(),
        weights,
        tied,
        adapters,
        attributes: format!("{:#?}", node.op),
    })
}

/// Parameters of a set of nodes with each weight counted once, however many nodes read it
/// (a looped block's shared weights); adapters count once per projection, as
/// `Graph::params` counts them (zero-initialised ones share a recipe, not a tensor).
pub fn distinct_params(g: &Graph, nodes: &[NodeIndex]) -> usize {
    let mut seen = BTreeSet::new();
    nodes
        .iter()
        .filter_map(|&n| g.node(n))
        .flat_map(|node| node.op.weights())
        .filter(|(role, w)| role.starts_with("adapter") || seen.insert((*w).clone()))
        .filter_map(|(_, w)| w.shape(&g.weights).ok())
        .map(|s| s.iter().product::<usize>())
        .sum()
}

/// Total parameters and FLOPs per token over a set of nodes (a folded block).
pub fn totals(g: &Graph, nodes: &[NodeIndex]) -> (usize, u64) {
    nodes.iter().fold((0, 0), |(p, f), &n| {
        (
            p + g.node_params(n),
            f + g.node(n).map_or(0, |x| x.op.flops_per_token()),
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn recipes_read_as_text() {
        let w = WeightRef::file("c_attn.weight")
            .transposed()
            .slice(0, 64, 64);
        assert_eq!(
            describe_recipe(&w),
            "transpose(c_attn.weight)[dim 0: 64..128]"
        );
    }

    #[test]
    fn demo_attention_details() {
        let ckpt = exitgraph_ir::import(&exitgraph::pipeline::demo_model_dir()).unwrap();
        let g = &ckpt.graph;
        let n = g
            .graph
            .node_indices()
            .find(|&n| g.graph[n].op.kind() == "Attention")
            .unwrap();
        let d = details(g, n).unwrap();
        assert_eq!(d.layer, Some(0));
        assert_eq!(d.shape, "[batch, seq, 128]");
        // q, o: 128×128; k, v: 128×64 (2 KV heads of 32).
        assert_eq!(d.params, 2 * 128 * 128 + 2 * 128 * 64);
        assert_eq!(d.flops_per_token, 2 * d.params as u64);
        assert_eq!(d.flops_per_context_token, 4 * 128);
        assert_eq!(d.weights.len(), 4);
        let q = &d.weights[0];
        assert_eq!(q.role, "q.weight");
        let (file, dtype, shape) = q.tensors[0].stored.clone().unwrap();
        assert_eq!(file, "model.safetensors");
        assert_eq!(dtype, "F32");
        assert_eq!(shape, vec![128, 128]);
        assert_eq!(d.inputs.len(), 1);
    }

    #[test]
    fn a_tied_projection_shows_its_shared_weights_iteration_and_adapter_rank() {
        let g = crate::test_graphs::tied_demo(2, Some(16));
        let attn = g.find("layers.5.attn").unwrap();
        let d = details(&g, attn).unwrap();
        let tied = d.tied.unwrap();
        // Depth 5 is layer 1 of the shared block, in the second iteration.
        assert_eq!((tied.weights, tied.iteration), (1, 1));
        assert_eq!(tied.shared_by, vec![1, 5]);
        let names: Vec<&str> = d.adapters.iter().map(|a| a.projection).collect();
        assert_eq!(names, ["q", "k", "v", "o"]);
        assert!(d.adapters.iter().all(|a| a.rank == 16));
        // q: 128 in, 128 out.
        assert_eq!(d.adapters[0].params, 16 * (128 + 128));
        // A norm of the block is tied too, but has no adapter.
        let norm = details(&g, g.find("layers.5.attn_norm").unwrap()).unwrap();
        assert!(norm.tied.is_some() && norm.adapters.is_empty());
        // The imported model: nothing tied.
        let untied = exitgraph_ir::import(&exitgraph::pipeline::demo_model_dir()).unwrap();
        let d = details(&untied.graph, untied.graph.find("layers.4.attn").unwrap()).unwrap();
        assert_eq!((d.tied, d.adapters.len()), (None, 0));
    }

    #[test]
    fn shared_weights_count_once() {
        let g = crate::test_graphs::tied_demo(2, None);
        let (a, b) = (
            g.find("layers.1.attn").unwrap(),
            g.find("layers.5.attn").unwrap(),
        );
        assert_eq!(distinct_params(&g, &[a, b]), distinct_params(&g, &[a]));
        assert_eq!(totals(&g, &[a, b]).0, 2 * distinct_params(&g, &[a]));
    }
}
