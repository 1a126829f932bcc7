//! The graph: ops as nodes on a petgraph `StableDiGraph`, named outputs, the weight catalog.

use crate::op::Op;
use crate::shape::Shape;
use crate::structure::{Block, Exit, Head};
use crate::weight::WeightCatalog;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Model family a graph was imported from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Gpt2,
    Bert,
}

impl Family {
    /// Decoder families generate text; encoders produce hidden states and embeddings.
    pub fn is_decoder(self) -> bool {
        !matches!(self, Family::Bert)
    }
}

/// Facts about the imported model that are not ops.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub family: Family,
    /// `model_type` as config.json spells it.
    pub model_type: String,
    pub num_layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub max_positions: usize,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

/// One op in the graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique, human-readable name, e.g. `layers.3.attn`.
    pub name: String,
    pub op: Op,
    /// Depth of the block this op belongs to (an index into [`Graph::blocks`]), if any.
    /// Which weights the block uses and its KV slot are the block's, not the node's.
    #[serde(default)]
    pub layer: Option<usize>,
    /// Symbolic shape of the op's output.
    pub shape: Shape,
}

/// Data flow from one node's output into input `slot` of another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub slot: usize,
}

/// A model as a graph of layer-level ops.
///
/// Named outputs follow Hugging Face: `hidden_states.{i}` (0 = embedding output, the last one
/// after the final norm), `logits` or `last_hidden_state`, `sentence_embedding`. They are for
/// users; structure (blocks, exits, the embedded stream) is in typed records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Graph {
    pub info: ModelInfo,
    pub graph: StableDiGraph<Node, Edge>,
    pub outputs: BTreeMap<String, NodeIndex>,
    pub weights: WeightCatalog,
    /// The residual stream before any block (the embedding's output, after its norm if any).
    #[serde(default)]
    pub embedded: Option<NodeIndex>,
    /// The transformer blocks in the order they run (`blocks[d].depth == d`).
    #[serde(default)]
    pub blocks: Vec<Block>,
    /// Exit heads, ordered by the depth they read.
    #[serde(default)]
    pub exits: Vec<Exit>,
    /// The model's own final norm, LM head and pooling.
    #[serde(default)]
    pub head: Head,
    /// GemFilter's token selection, when a pass added it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<crate::structure::Filter>,
}

impl Graph {
    /// An empty graph for a model.
    pub fn new(info: ModelInfo, weights: WeightCatalog) -> Self {
        Graph {
            info,
            graph: StableDiGraph::new(),
            outputs: BTreeMap::new(),
            weights,
            embedded: None,
            blocks: Vec::new(),
            exits: Vec::new(),
            head: Head::default(),
            filter: None,
        }
    }

    /// Records the blocks of a model where nothing is tied: block `d` reads the stream
    /// before it and writes `outputs[d]`, uses layer `d`'s weights, and (when it has
    /// attention) the next KV slot. `embedded` is the stream before block 0.
    pub fn set_untied_blocks(&mut self, embedded: NodeIndex, outputs: &[NodeIndex]) {
        self.embedded = Some(embedded);
        let mut input = embedded;
        let mut slot = 0;
        self.blocks = outputs
            .iter()
            .enumerate()
            .map(|(depth, &output)| {
                let has_attention = self
                    .graph
                    .node_weights()
                    .any(|n| n.layer == Some(depth) && matches!(n.op, crate::op::Op::Attention(_)));
                let kv_slot = has_attention.then(|| {
                    slot += 1;
                    slot - 1
                });
                let b = Block {
                    depth,
                    weights: depth,
                    iteration: 0,
                    kv_slot,
                    input,
                    output,
                    untied: Vec::new(),
                };
                input = output;
                b
            })
            .collect();
    }

    /// The residual stream after `k` blocks: the embedded stream for 0, else block `k - 1`'s
    /// output (before any final norm).
    pub fn stream(&self, k: usize) -> Option<NodeIndex> {
        match k {
            0 => self.embedded,
            k => self.blocks.get(k - 1).map(|b| b.output),
        }
    }

    /// The exit that reads the stream after `after` blocks.
    pub fn exit_at(&self, after: usize) -> Option<&Exit> {
        self.exits.iter().find(|e| e.after == after)
    }

    /// Depths with an exit head, ascending.
    pub fn exit_depths(&self) -> Vec<usize> {
        let mut d: Vec<usize> = self.exits.iter().map(|e| e.after).collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// Number of KV cache slots the graph's blocks and exit heads use.
    pub fn kv_slots(&self) -> usize {
        self.blocks
            .iter()
            .filter_map(|b| b.kv_slot)
            .chain(self.exits.iter().filter_map(|e| e.kv_slot))
            .max()
            .map_or(0, |s| s + 1)
    }

    /// The model's own head output: logits for decoders, else the last block's stream.
    pub fn final_output(&self) -> Option<NodeIndex> {
        self.head.logits.or_else(|| self.stream(self.blocks.len()))
    }

    /// Adds a node fed by `inputs` in slot order and returns its index.
    pub fn add(&mut self, node: Node, inputs: &[NodeIndex]) -> NodeIndex {
        let idx = self.graph.add_node(node);
        for (slot, &from) in inputs.iter().enumerate() {
            self.graph.add_edge(from, idx, Edge { slot });
        }
        idx
    }

    pub fn node(&self, idx: NodeIndex) -> Option<&Node> {
        self.graph.node_weight(idx)
    }

    /// The nodes feeding `idx`, in slot order.
    pub fn inputs(&self, idx: NodeIndex) -> Vec<NodeIndex> {
        let mut ins: Vec<(usize, NodeIndex)> = self
            .graph
            .edges_directed(idx, Direction::Incoming)
            .map(|e| (e.weight().slot, e.source()))
            .collect();
        ins.sort();
        ins.into_iter().map(|(_, n)| n).collect()
    }

    /// The nodes reading `idx`'s output, in index order.
    pub fn users(&self, idx: NodeIndex) -> Vec<NodeIndex> {
        let mut outs: Vec<NodeIndex> = self
            .graph
            .edges_directed(idx, Direction::Outgoing)
            .map(|e| e.target())
            .collect();
        outs.sort();
        outs.dedup();
        outs
    }

    /// Replaces every use of `old` as an input (and as a named output) by `new`.
    pub fn replace_uses(&mut self, old: NodeIndex, new: NodeIndex) {
        let uses: Vec<(NodeIndex, Edge, petgraph::stable_graph::EdgeIndex)> = self
            .graph
            .edges_directed(old, Direction::Outgoing)
            .map(|e| (e.target(), *e.weight(), e.id()))
            .collect();
        for (target, edge, id) in uses {
            self.graph.remove_edge(id);
            self.graph.add_edge(new, target, edge);
        }
        for out in self.outputs.values_mut() {
            if *out == old {
                *out = new;
            }
        }
    }

    /// Nodes in an order where every node comes after its inputs (ties broken by index, so
    /// the order is deterministic). Fails with the names of nodes on a cycle.
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>, Vec<String>> {
        let mut indegree: BTreeMap<NodeIndex, usize> = self
            .graph
            .node_indices()
            .map(|n| (n, self.graph.edges_directed(n, Direction::Incoming).count()))
            .collect();
        let mut ready: std::collections::BTreeSet<NodeIndex> = indegree
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&n, _)| n)
            .collect();
        let mut order = Vec::with_capacity(indegree.len());
        while let Some(n) = ready.pop_first() {
            order.push(n);
            for e in self.graph.edges_directed(n, Direction::Outgoing) {
                if let Some(d) = indegree.get_mut(&e.target()) {
                    *d -= 1;
                    if *d == 0 {
                        ready.insert(e.target());
                    }
                }
            }
        }
        if order.len() == self.graph.node_count() {
            Ok(order)
        } else {
            let done: std::collections::BTreeSet<_> = order.into_iter().collect();
            Err(self
                .graph
                .node_indices()
                .filter(|n| !done.contains(n))
                .map(|n| self.graph[n].name.clone())
                .collect())
        }
    }

    /// The node with this name.
    pub fn find(&self, name: &str) -> Option<NodeIndex> {
        self.graph
            .node_indices()
            .find(|&n| self.graph[n].name == name)
    }

    /// Parameters of one node, counted from the catalog shapes of its weights.
    pub fn node_params(&self, idx: NodeIndex) -> usize {
        self.graph[idx]
            .op
            .weights()
            .iter()
            .filter_map(|(_, w)| w.shape(&self.weights).ok())
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// Parameters of the whole graph; a tensor shared by several ops (tied embeddings, a
    /// looped block's weights) counts once. Adapters count once per projection: each is its
    /// own parameter even when two start from equal recipes (`Zeros` of one shape).
    pub fn params(&self) -> usize {
        self.params_of(|_| true)
    }

    /// [`Graph::params`] over the nodes `keep` selects (e.g. the layers': `n.layer.is_some()`).
    pub fn params_of(&self, keep: impl Fn(&Node) -> bool) -> usize {
        let mut seen = std::collections::BTreeSet::new();
        let mut total = 0;
        for n in self.graph.node_indices() {
            if !keep(&self.graph[n]) {
                continue;
            }
            for (role, w) in self.graph[n].op.weights() {
                if role.starts_with("adapter") || seen.insert(w.clone()) {
                    total += w
                        .shape(&self.weights)
                        .map(|s| s.iter().product::<usize>())
                        .unwrap_or(0);
                }
            }
        }
        total
    }

    /// Bytes of checkpoint tensors the graph reads, in their stored dtype.
    pub fn weight_bytes(&self) -> usize {
        let mut seen = std::collections::BTreeSet::new();
        for n in self.graph.node_indices() {
            for (_, w) in self.graph[n].op.weights() {
                for s in w.sources() {
                    seen.insert(s.to_string());
                }
            }
        }
        seen.iter()
            .filter_map(|s| self.weights.tensors.get(s))
            .map(|t| t.shape.iter().product::<usize>() * t.dtype.size_bytes())
            .sum()
    }

    /// Transformer layers present in the graph, ascending.
    pub fn layers(&self) -> Vec<usize> {
        let set: std::collections::BTreeSet<usize> =
            self.graph.node_weights().filter_map(|n| n.layer).collect();
        set.into_iter().collect()
    }

    /// Removes nodes that no named output depends on. Returns their names.
    pub fn prune_unused(&mut self) -> Vec<String> {
        let mut live = std::collections::BTreeSet::new();
        let mut stack: Vec<NodeIndex> = self.outputs.values().copied().collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.inputs(n));
            }
        }
        let dead: Vec<NodeIndex> = self
            .graph
            .node_indices()
            .filter(|n| !live.contains(n))
            .collect();
        let mut names = Vec::new();
        for n in dead {
            if let Some(node) = self.graph.remove_node(n) {
                names.push(node.name);
            }
        }
        names
    }
}
