//! What the graph view shows for a clicked node: op, shape, parameters, FLOPs and where its
//! weights come from.

use exitgraph_ir::{Graph, NodeIndex, WeightRef};

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
        attributes: format!("{:#?}", node.op),
    })
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
        assert_eq!(d.shape, "[batch, seq, 192]");
        // q, o: 192×192; k, v: 192×96 (3 KV heads of 32).
        assert_eq!(d.params, 2 * 192 * 192 + 2 * 192 * 96);
        assert_eq!(d.flops_per_token, 2 * d.params as u64);
        assert_eq!(d.flops_per_context_token, 4 * 192);
        assert_eq!(d.weights.len(), 4);
        let q = &d.weights[0];
        assert_eq!(q.role, "q.weight");
        let (file, dtype, shape) = q.tensors[0].stored.clone().unwrap();
        assert_eq!(file, "model.safetensors");
        assert_eq!(dtype, "F32");
        assert_eq!(shape, vec![192, 192]);
        assert_eq!(d.inputs.len(), 1);
    }
}
