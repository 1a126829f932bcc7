//! `TruncateLayers`: keep the first `keep` transformer layers.
//!
//! The consumers of the last layer's output (final norm, pooling) read the residual stream
//! after layer `keep - 1` instead, and the deeper layers are removed. This is the shallow
//! sub-network of self-speculative decoding and the "logit lens" at one depth.
//!
//! **Invariant**: `hidden_states.i` for `i < keep` are the original's; the logits equal the
//! original's final norm and LM head applied to `hidden_states.keep` of the original (before
//! its norm); `keep == num_layers` leaves the graph unchanged.

use crate::{Pass, PassError, PassReport};
use exitgraph_ir::{Graph, NodeIndex};
use std::collections::BTreeSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TruncateLayers {
    pub keep: usize,
}

impl Pass for TruncateLayers {
    fn name(&self) -> &'static str {
        "TruncateLayers"
    }

    fn run(&self, g: &mut Graph) -> Result<PassReport, PassError> {
        let n = g.info.num_layers;
        let err = |message: String| PassError::Config {
            pass: "TruncateLayers",
            message,
        };
        if self.keep == 0 || self.keep > n {
            return Err(err(format!("keep = {} is out of range 1..={n}", self.keep)));
        }
        if self.keep == n {
            return Ok(PassReport {
                summary: format!("kept all {n} layers; nothing to do"),
                ..PassReport::default()
            });
        }
        let stream_key = format!("hidden_states.{}", self.keep);
        let stream = *g
            .outputs
            .get(&stream_key)
            .ok_or_else(|| err(format!("graph has no output {stream_key}")))?;
        let last_layer: BTreeSet<NodeIndex> = g
            .graph
            .node_indices()
            .filter(|&i| g.graph[i].layer == Some(n - 1))
            .collect();
        // The node of the last layer that feeds something outside the layers, or is an output.
        let final_stream: Vec<NodeIndex> = last_layer
            .iter()
            .copied()
            .filter(|&i| {
                g.users(i).iter().any(|&u| g.graph[u].layer.is_none())
                    || g.outputs.values().any(|&o| o == i)
            })
            .collect();
        let [old] = final_stream[..] else {
            return Err(err(format!(
                "expected one output node of layer {}, found {}",
                n - 1,
                final_stream.len()
            )));
        };
        let final_out = g.outputs.get(&format!("hidden_states.{n}")).copied();
        g.replace_uses(old, stream);
        for i in self.keep + 1..=n {
            g.outputs.remove(&format!("hidden_states.{i}"));
        }
        match final_out {
            Some(f) if f != old => {
                g.outputs.insert(stream_key, f);
            }
            _ => {
                g.outputs.insert(stream_key, stream);
            }
        }
        let mut removed = g.prune_unused();
        removed.sort();
        g.info.num_layers = self.keep;
        Ok(PassReport {
            summary: format!(
                "kept layers 0..{} of {n}; removed {} nodes",
                self.keep,
                removed.len()
            ),
            added: Vec::new(),
            removed,
            changed: Vec::new(),
        })
    }
}
