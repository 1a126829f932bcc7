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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PassManager;
    use proptest::prelude::*;
    use std::path::Path;

    fn fixture(name: &str) -> Graph {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name);
        exitgraph_ir::import(&dir).expect("fixture imports").graph
    }

    #[test]
    fn keeping_every_layer_changes_nothing() {
        let g = fixture("tiny-llama");
        let mut h = g.clone();
        let report = TruncateLayers { keep: 6 }.run(&mut h).expect("runs");
        assert!(report.removed.is_empty());
        assert_eq!(
            exitgraph_ir::serial::to_ron(&g).expect("ron"),
            exitgraph_ir::serial::to_ron(&h).expect("ron")
        );
    }

    #[test]
    fn out_of_range_is_an_error() {
        let mut g = fixture("tiny-gpt2");
        for keep in [0, 5] {
            let e = TruncateLayers { keep }.run(&mut g).expect_err("rejects");
            assert!(e.to_string().contains("1..=4"), "{e}");
        }
    }

    proptest! {
        #[test]
        fn truncation_verifies_and_keeps_shallow_outputs(
            name in prop_oneof![Just("tiny-llama"), Just("tiny-qwen2"), Just("tiny-gpt2")],
            frac in 0.0f64..1.0,
        ) {
            let g = fixture(name);
            let n = g.info.num_layers;
            let keep = 1 + ((n as f64 * frac) as usize).min(n - 1);
            let mut h = g.clone();
            PassManager::new(vec![Box::new(TruncateLayers { keep })]).run(&mut h).expect("verifies");
            prop_assert_eq!(h.info.num_layers, keep);
            prop_assert_eq!(h.layers(), (0..keep).collect::<Vec<_>>());
            for i in 0..keep {
                let key = format!("hidden_states.{i}");
                prop_assert_eq!(&h.graph[h.outputs[&key]].name, &g.graph[g.outputs[&key]].name);
            }
            // The final norm now reads the residual stream after layer keep - 1.
            let final_norm = h.outputs[&format!("hidden_states.{keep}")];
            let reads = h.inputs(final_norm);
            if keep < n {
                prop_assert_eq!(&h.graph[reads[0]].name, &g.graph[g.outputs[&format!("hidden_states.{keep}")]].name);
            }
            prop_assert!(h.params() < g.params() || keep == n);
        }
    }
}
