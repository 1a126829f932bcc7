//! Adaptive depth at decode time: how deep each token runs.
//!
//! - [`Depth::EarlyExit`]: after each exit point (see the `InsertExits` pass) an
//!   [`ExitRule`] decides whether the token stops there. The layers it skipped get keys and
//!   values computed from its exit hidden state (CALM's state copying), so later tokens can
//!   attend at every layer. Prompts always run the full depth.
//! - [`Depth::SkipDecode`]: generated token `t` of `T` runs `n(t)` layers, decaying linearly
//!   from `max_layers` to `min_layers`: `warmup` bottom layers, then the top `n - warmup`
//!   (the lower-middle layers are bypassed). `n` never grows, so a token never needs a key
//!   an earlier token did not write.
//!
//! The runtime (`crate::runtime`) executes these per token, in batches; `eval exits`
//! measures speed against quality.

pub mod cost;
pub mod rule;

pub use rule::{ExitRule, ExitView};

use exitgraph_ir::Graph;
use serde::{Deserialize, Serialize};

/// How deep tokens run, as written in a pipeline's `runtime: (depth: ...)`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Depth {
    /// Every token runs every layer.
    #[default]
    Full,
    /// Exit heads decide per token with `rule`.
    EarlyExit { rule: ExitRule },
    /// SkipDecode's position-wise schedule, shared by tokens at the same step.
    SkipDecode(SkipDecode),
}

/// SkipDecode's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipDecode {
    /// Layers the first generated token runs.
    pub max_layers: usize,
    /// Layers the last generated token runs.
    pub min_layers: usize,
    /// Bottom layers every token runs before the skip.
    pub warmup: usize,
}

impl SkipDecode {
    pub fn validate(&self, layers: usize) -> Result<(), String> {
        if !(self.min_layers <= self.max_layers && self.max_layers <= layers) {
            return Err(format!(
                "SkipDecode needs min_layers ({}) <= max_layers ({}) <= the model's {layers} layers",
                self.min_layers, self.max_layers
            ));
        }
        if self.warmup == 0 {
            return Err("SkipDecode's warmup must be at least 1 layer".into());
        }
        if self.warmup >= self.min_layers {
            return Err(format!(
                "SkipDecode's warmup ({}) must be below min_layers ({}): every token runs at least one top layer",
                self.warmup, self.min_layers
            ));
        }
        Ok(())
    }

    /// Layers generated token `t` (0-based) of `total` runs: linear from `max_layers` at
    /// the first to `min_layers` at the last, rounded; never increasing in `t`.
    pub fn layers_at(&self, t: usize, total: usize) -> usize {
        if total <= 1 || self.max_layers == self.min_layers {
            return self.max_layers;
        }
        let frac = t.min(total - 1) as f64 / (total - 1) as f64;
        let n = self.max_layers as f64 - (self.max_layers - self.min_layers) as f64 * frac;
        (n.round() as usize).clamp(self.min_layers, self.max_layers)
    }

    /// The layers a token running `n` of `layers` layers runs, as two ranges: the warm-up
    /// and the top.
    pub fn path(
        &self,
        n: usize,
        layers: usize,
    ) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let top = n.saturating_sub(self.warmup);
        (0..self.warmup.min(n), layers - top..layers)
    }
}

/// Whether every exit of the graph has a learned gate.
pub fn has_gates(graph: &Graph) -> bool {
    !graph.exits.is_empty() && graph.exits.iter().all(|e| e.gate.is_some())
}

impl Depth {
    /// Checks the strategy against the program's graph.
    pub fn validate(&self, graph: &Graph) -> Result<(), String> {
        match self {
            Depth::Full => Ok(()),
            Depth::EarlyExit { rule } => {
                rule.validate()?;
                if graph.exits.is_empty() {
                    return Err(
                        "EarlyExit needs exit heads: add an InsertExits pass to the pipeline"
                            .into(),
                    );
                }
                if rule.needs_gate() && !has_gates(graph) {
                    return Err(
                        "the Gate rule needs learned gates: InsertExits(gate: true, weights: ...)"
                            .into(),
                    );
                }
                Ok(())
            }
            Depth::SkipDecode(s) => s.validate(graph.info.num_layers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipdecode_decays_and_never_grows() {
        let s = SkipDecode {
            max_layers: 6,
            min_layers: 2,
            warmup: 1,
        };
        let ns: Vec<usize> = (0..9).map(|t| s.layers_at(t, 9)).collect();
        assert_eq!(ns.first(), Some(&6));
        assert_eq!(ns.last(), Some(&2));
        assert!(ns.windows(2).all(|w| w[1] <= w[0]), "{ns:?}");
        assert_eq!(s.path(4, 6), (0..1, 3..6));
        assert_eq!(s.path(6, 6), (0..1, 1..6));
        assert!(s.validate(6).is_ok());
        assert!(SkipDecode { max_layers: 7, ..s }.validate(6).is_err());
        assert!(SkipDecode { warmup: 2, ..s }.validate(6).is_err());
    }
}
