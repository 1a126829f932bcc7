//! `TruncateLayers`: keep the first `keep` transformer layers.
//!
//! The consumers of the last layer's output (final norm, pooling) read the residual stream
//! after layer `keep - 1` instead, and the deeper layers are removed. This is the shallow
//! sub-network of self-speculative decoding and the "logit lens" at one depth.
//!
//! **Invariant**: `hidden_states.i` for `i < keep` are the original's; the logits equal the
//! original's final norm and LM head applied to `hidden_states.keep` of the original (before
//! its norm); `keep == num_layers` leaves the graph unchanged.

use crate::{Pass, PassContext, PassError, PassReport};
use exitgraph_ir::Graph;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TruncateLayers {
    pub keep: usize,
}

impl Pass for TruncateLayers {
    fn name(&self) -> &'static str {
        "TruncateLayers"
    }

    fn run(&self, g: &mut Graph, _cx: &PassContext) -> Result<PassReport, PassError> {
        let n = g.info.num_layers;
        let err = |message: String| PassError::Config {
            pass: "TruncateLayers",
            message,
        };
        if self.keep == 0 || self.keep > n {
            return Err(err(format!("keep = {} is out of range 1..={n}", self.keep)));
        }
        if let Some(f) = g.filter.as_ref().filter(|f| f.layer >= self.keep) {
            return Err(PassError::Field {
                pass: "TruncateLayers",
                field: "keep",
                message: format!(
                    "keep = {} removes layer {}, which the GemFilter before it selects with",
                    self.keep, f.layer
                ),
            });
        }
        if self.keep == n {
            return Ok(PassReport {
                summary: format!("kept all {n} layers; nothing to do"),
                ..PassReport::default()
            });
        }
        let stream_key = format!("hidden_states.{}", self.keep);
        let stream = g
            .stream(self.keep)
            .ok_or_else(|| err(format!("graph has no block {}", self.keep - 1)))?;
        let old = g
            .stream(n)
            .ok_or_else(|| err(format!("graph has no block {}", n - 1)))?;
        // The user-facing `hidden_states.{keep}` names the final norm when there is one.
        let final_out = g.head.norm;
        // Exits at or past the new depth would keep the removed layers alive.
        let (kept, dropped): (Vec<_>, Vec<_>) =
            g.exits.drain(..).partition(|e| e.after < self.keep);
        g.exits = kept;
        for e in &dropped {
            let heads: Vec<_> = e.nodes.iter().chain(&e.logits).chain(&e.gate).collect();
            g.outputs.retain(|_, o| !heads.contains(&&*o));
        }
        g.replace_uses(old, stream);
        for i in self.keep + 1..=n {
            g.outputs.remove(&format!("hidden_states.{i}"));
        }
        g.outputs.insert(stream_key, final_out.unwrap_or(stream));
        g.blocks.truncate(self.keep);
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
        let report = TruncateLayers { keep: 6 }
            .run(&mut h, &PassContext::detached())
            .expect("runs");
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
            let e = TruncateLayers { keep }
                .run(&mut g, &PassContext::detached())
                .expect_err("rejects");
            assert!(e.to_string().contains("1..=4"), "{e}");
        }
    }

    #[test]
    fn exits_past_the_new_depth_go_with_their_layers() {
        let mut g = fixture("tiny-llama");
        let exits = crate::InsertExits {
            after: vec![2, 4],
            every: None,
            head: crate::HeadKind::default(),
            gate: false,
            weights: None,
        };
        PassManager::new(vec![Box::new(exits), Box::new(TruncateLayers { keep: 3 })])
            .run(&mut g)
            .expect("verifies");
        assert_eq!(g.exit_depths(), vec![2]);
        assert!(!g.outputs.contains_key("exit.4.logits"));
        assert_eq!(g.layers(), vec![0, 1, 2]);
        assert_eq!(g.blocks.len(), 3);
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
