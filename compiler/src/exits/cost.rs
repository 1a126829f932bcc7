//! What a token's path costs, in FLOPs per token (attention over the context not counted):
//! the ideal speedup of adaptive depth is the full path's cost over the adaptive one's.

use exitgraph_ir::op::Op;
use exitgraph_ir::Graph;
use std::collections::BTreeMap;

/// Per-token FLOPs of a graph's parts.
#[derive(Clone, Debug, PartialEq)]
pub struct DepthCost {
    /// FLOPs of each transformer layer.
    pub layer: Vec<f64>,
    /// FLOPs of each exit point's head (and gate), by layer count.
    pub head: BTreeMap<usize, f64>,
    /// FLOPs of the final norm and LM head.
    pub final_head: f64,
    /// FLOPs of writing one layer's keys and values from a copied state (norm + k, v).
    pub kv_fill: Vec<f64>,
}

impl DepthCost {
    pub fn of(graph: &Graph) -> Self {
        let layers = graph.info.num_layers;
        let mut layer = vec![0.0; layers];
        let mut kv_fill = vec![0.0; layers];
        let mut head = BTreeMap::new();
        let mut final_head = 0.0;
        for idx in graph.graph.node_indices() {
            let n = &graph.graph[idx];
            if matches!(n.op, Op::QueryKeyScores(_)) {
                // GemFilter's select phase runs once per prompt, not per token.
                continue;
            }
            let f = n.op.flops_per_token() as f64;
            match n.layer {
                Some(l) if l < layers => {
                    layer[l] += f;
                    if let Op::Attention(a) = &n.op {
                        let kv = (a.k.flops_per_token() + a.v.flops_per_token()) as f64;
                        kv_fill[l] += kv + 5.0 * a.q.in_features as f64;
                    }
                }
                Some(_) => {}
                None => {
                    if let Some(e) = graph.exits.iter().find(|e| e.nodes.contains(&idx)) {
                        *head.entry(e.after).or_insert(0.0) += f;
                    } else if matches!(n.op, Op::Norm(_) | Op::LmHead(_)) {
                        final_head += f;
                    }
                }
            }
        }
        DepthCost {
            layer,
            head,
            final_head,
            kv_fill,
        }
    }

    /// FLOPs of the full model for one token.
    pub fn full(&self) -> f64 {
        self.layer.iter().sum::<f64>() + self.final_head
    }

    /// FLOPs of a token that ran `layers`, evaluated the heads at `heads`, filled keys and
    /// values for `filled` layers and reached the final head when `final_head`.
    pub fn path(
        &self,
        layers: &[usize],
        heads: &[usize],
        filled: &[usize],
        final_head: bool,
    ) -> f64 {
        let l: f64 = layers.iter().filter_map(|&i| self.layer.get(i)).sum();
        let h: f64 = heads.iter().filter_map(|k| self.head.get(k)).sum();
        let f: f64 = filled.iter().filter_map(|&i| self.kv_fill.get(i)).sum();
        l + h + f + if final_head { self.final_head } else { 0.0 }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::synth::{write_random_llama, LlamaSpec};
    use exitgraph_passes::{HeadKind, InsertExits, PassManager};

    /// The tiny Llama (hidden 32, 4 heads of 8, 2 KV heads, MLP 64, vocabulary 97, 3
    /// layers) with a shared-head exit after layer 1, costed by hand.
    #[test]
    fn costs_match_hand_computed_flops() {
        let dir = tempfile::tempdir().unwrap();
        let spec = LlamaSpec::tiny();
        write_random_llama(dir.path(), &spec, 1).unwrap();
        let mut g = exitgraph_ir::import(dir.path()).unwrap().graph;
        let exits = InsertExits {
            after: vec![1],
            every: None,
            head: HeadKind::default(),
            gate: false,
            weights: None,
        };
        PassManager::new(vec![Box::new(exits)]).run(&mut g).unwrap();
        let c = DepthCost::of(&g);
        // Attention: q 2·32·32 + k 2·32·16 + v 2·32·16 + o 2·32·32 = 6144; gated MLP:
        // 3 · 2·32·64 = 12288; two RMS norms: 2 · 5·32 = 320.
        let layer = 6144.0 + 12288.0 + 320.0;
        assert_eq!(c.layer, vec![layer; 3]);
        // Final norm 5·32 plus LM head 2·32·97.
        let head = 160.0 + 6208.0;
        assert_eq!(c.final_head, head);
        // The shared exit head: its own copy of the final norm and the LM head.
        assert_eq!(c.head, BTreeMap::from([(1, head)]));
        // State copying of one layer: k and v projections (2·32·16 each) and the norm.
        assert_eq!(c.kv_fill, vec![2048.0 + 160.0; 3]);
        assert_eq!(c.full(), 3.0 * layer + head);
        // A token exiting after layer 1: one layer, the exit head, two layers filled.
        assert_eq!(
            c.path(&[0], &[1], &[1, 2], false),
            layer + head + 2.0 * 2208.0
        );
        // A SkipDecode token running layers 0 and 2 is produced by the final head.
        assert_eq!(c.path(&[0, 2], &[], &[], true), 2.0 * layer + head);
    }
}
