//! Adaptive depth at decode time: how deep each token runs.
//!
//! - [`Depth::EarlyExit`]: after each exit point (see the `InsertExits` pass) an
//!   [`ExitRule`] decides whether the token stops there. The layers it skipped get keys and
//!   values computed from its exit hidden state (CALM's state copying), so later tokens can
//!   attend at every layer, or (the runtime's `SkippedKv::Absent`) none, and later tokens
//!   attend there only to the positions that reached them. Prompts always run the full
//!   depth.
//! - [`Depth::SkipDecode`] (Del Corro et al., 2023): the exit point is a function of the
//!   *sequence position* alone, shared by every sequence at that position: the token at
//!   position `p` runs `n(p)` layers, decaying linearly from `max_layers` at position 0 to
//!   `min_layers` at position `max_length - 1` (and beyond): `warmup` bottom layers, then the
//!   top `n - warmup` (the lower-middle layers are bypassed). `n` never grows along a
//!   sequence, so a token never needs a key an earlier token did not write.
//!
//! - [`Depth::SelfSpeculative`] (LayerSkip, Kangaroo): the layers up to an exit head draft
//!   a few tokens, the full model checks them in one call and keeps the prefix it agrees
//!   with; its output is the full model's (see [`speculative`]).
//!
//! The runtime (`crate::runtime`) executes these per token, in batches; `eval exits`
//! measures speed against quality.

pub mod cost;
pub mod ltt;
pub mod rule;
pub mod speculative;

pub use rule::{ExitRule, ExitView};
pub use speculative::SelfSpeculative;

use exitgraph_ir::Graph;
use serde::{Deserialize, Serialize};

/// The keys and values of the layers a token skipped by leaving early.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkippedKv {
    /// Computed from the token's exit state in a separate call (CALM's state copying), so
    /// later tokens attend to every position in every layer (the default).
    #[default]
    Filled,
    /// Never computed: later tokens attend, in those layers, only to the positions that
    /// reached them (Mixture-of-Recursions' recursion-wise caching; the Relaxed Recursive
    /// Transformers' throughput simulation charges nothing for them either). The real
    /// runtime (`exitgraph-runtime`) counts the positions as absent in those layers' KV slots
    /// ([`crate::lower::Task::AbsentKv`]) and attends over the ones present;
    /// the simulator drops the state-copying call and charges each later token's
    /// attention, layer by layer, over the positions that have keys and values there. A
    /// slot with absent positions takes one token per call, so self-speculation (several
    /// tokens per verification, rollback) and sliding-window attention cannot use it.
    Absent,
}

/// How deep tokens run, as written in a pipeline's `runtime: (depth: ...)`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Depth {
    /// Every token runs every layer.
    #[default]
    Full,
    /// Exit heads decide per token with `rule`.
    EarlyExit { rule: ExitRule },
    /// SkipDecode's position-wise schedule, shared by tokens at the same step.
    SkipDecode(SkipDecode),
    /// Self-speculative decoding: the layers up to an exit head draft, the rest verify;
    /// the output is the full model's. The fields are [`SelfSpeculative`]'s.
    SelfSpeculative {
        draft_exit: usize,
        max_draft: usize,
        #[serde(default)]
        stop_below: Option<f32>,
    },
}

impl From<SelfSpeculative> for Depth {
    fn from(s: SelfSpeculative) -> Self {
        Depth::SelfSpeculative {
            draft_exit: s.draft_exit,
            max_draft: s.max_draft,
            stop_below: s.stop_below,
        }
    }
}

/// SkipDecode's position-wise schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipDecode {
    /// Layers the token at sequence position 0 would run (the top of the decay).
    pub max_layers: usize,
    /// Layers the tokens at position `max_length - 1` and beyond run.
    pub min_layers: usize,
    /// Bottom layers every token runs before the skip.
    pub warmup: usize,
    /// Sequence length (prompt included) over which the exit point decays; the model's
    /// positions when absent.
    #[serde(default)]
    pub max_length: Option<usize>,
}

impl SkipDecode {
    pub fn validate(&self, layers: usize) -> Result<(), String> {
        if self.max_length.is_some_and(|l| l < 2) {
            return Err("SkipDecode's max_length must be at least 2 positions".into());
        }
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

    /// The decay length: `max_length`, or the model's `positions`.
    pub fn length(&self, positions: usize) -> usize {
        self.max_length.unwrap_or(positions)
    }

    /// Layers the token at sequence position `pos` (0-based, prompt included) runs when the
    /// schedule decays over `length` positions: `max_layers - (max_layers - min_layers) ·
    /// min(pos, length - 1) / (length - 1)`, rounded half away from zero; never increasing
    /// in `pos`.
    pub fn layers_at(&self, pos: usize, length: usize) -> usize {
        if length <= 1 || self.max_layers == self.min_layers {
            return self.max_layers;
        }
        let frac = pos.min(length - 1) as f64 / (length - 1) as f64;
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
            Depth::SelfSpeculative { .. } => match self.speculative() {
                Some(s) => s.validate(graph),
                None => Ok(()),
            },
        }
    }

    /// Self-speculation's settings, when this is [`Depth::SelfSpeculative`].
    pub fn speculative(&self) -> Option<SelfSpeculative> {
        match *self {
            Depth::SelfSpeculative {
                draft_exit,
                max_draft,
                stop_below,
            } => Some(SelfSpeculative {
                draft_exit,
                max_draft,
                stop_below,
            }),
            _ => None,
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
            max_length: Some(9),
        };
        // Over 9 positions: n(p) = 6 - 4p/8, rounded half away from zero.
        let ns: Vec<usize> = (0..12).map(|p| s.layers_at(p, s.length(256))).collect();
        assert_eq!(ns, vec![6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 2, 2]);
        assert_eq!(s.length(256), 9);
        assert_eq!(
            SkipDecode {
                max_length: None,
                ..s
            }
            .length(256),
            256
        );
        assert!(SkipDecode {
            max_length: Some(1),
            ..s
        }
        .validate(6)
        .is_err());
        assert_eq!(s.path(4, 6), (0..1, 3..6));
        assert_eq!(s.path(6, 6), (0..1, 1..6));
        assert!(s.validate(6).is_ok());
        assert!(SkipDecode { max_layers: 7, ..s }.validate(6).is_err());
        assert!(SkipDecode { warmup: 2, ..s }.validate(6).is_err());
    }
}
