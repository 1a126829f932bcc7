//! Typed structure of a graph: its transformer blocks and exit heads.
//!
//! Passes, lowering, the runtime, the cost model and the explorer find layers and exits here,
//! never by parsing output names (`hidden_states.{i}`, `exit.{k}.logits` are for users' dumps).
//!
//! A *block* is one transformer layer as it runs: its place in the stack (`depth`, the index
//! every node of the block carries in [`crate::Node::layer`]), which stored layer's weights it
//! uses (`weights`: equal for layers tied into one looped block), the loop `iteration` it is,
//! and the KV cache slot its attention writes (`kv_slot`). In an imported model the three
//! coincide with the depth; a tied model runs one weight identity at several depths, each
//! with its own slot.

use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};

/// One transformer layer as it runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Layers that run before this one; nodes of the block carry it as `layer`.
    pub depth: usize,
    /// The stored layer whose weights the block uses (its weight identity).
    pub weights: usize,
    /// Loop iteration of a looped block (0 when nothing is tied).
    #[serde(default)]
    pub iteration: usize,
    /// KV cache slot of the block's attention, if it has one.
    #[serde(default)]
    pub kv_slot: Option<usize>,
    /// The residual stream the block reads.
    pub input: NodeIndex,
    /// The residual stream the block writes.
    pub output: NodeIndex,
    /// The stored weights the block's ops read before `TieLayers` pointed them at the shared
    /// block's (in node order, each op's [`crate::op::Op::weights_mut`] order); empty when
    /// nothing is tied. `DepthLora` initialises adapters from the difference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub untied: Vec<crate::weight::WeightRef>,
}

/// The model's own output end, as imported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The final norm, reading the last block's stream (pre-norm decoders).
    #[serde(default)]
    pub norm: Option<NodeIndex>,
    /// The LM head's logits (decoders).
    #[serde(default)]
    pub logits: Option<NodeIndex>,
    /// Sentence pooling of the last stream (sentence-transformers encoders).
    #[serde(default)]
    pub pooled: Option<NodeIndex>,
}

/// One exit head: where it reads the residual stream and what it outputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Layers run before the exit (it reads the stream after block `after - 1`).
    pub after: usize,
    /// The residual stream the head reads.
    pub reads: NodeIndex,
    /// The head's vocabulary logits (decoders).
    #[serde(default)]
    pub logits: Option<NodeIndex>,
    /// The pooled sentence embedding (encoders).
    #[serde(default)]
    pub embedding: Option<NodeIndex>,
    /// The learned gate's logit, if the exit has one.
    #[serde(default)]
    pub gate: Option<NodeIndex>,
    /// Every node the exit added (norms, adapter, head, gate, pooling).
    pub nodes: Vec<NodeIndex>,
}

impl Exit {
    /// The node whose output the exit produces a token or embedding from.
    pub fn head(&self) -> Option<NodeIndex> {
        self.logits.or(self.embedding)
    }
}
