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
    /// KV cache slot of the head's own attention (Kangaroo's adapter), if it has one. Such a
    /// head keeps keys and values of every position that ran the layers below it, so it is
    /// run whenever those layers run (see the lowering's schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_slot: Option<usize>,
}

impl Exit {
    /// The node whose output the exit produces a token or embedding from.
    pub fn head(&self) -> Option<NodeIndex> {
        self.logits.or(self.embedding)
    }
}

/// GemFilter's token selection (Shi et al., 2024): a select phase runs the layers up to
/// `layer` on the whole prompt, scores every position by the last position's query at
/// `layer` (the `scores` node), keeps the top `keep` after average pooling with kernel
/// `pool`, and the full model runs afresh on the kept tokens. `keep_first` and `keep_last`
/// (0 in the reference implementation, which forces nothing) reserve that many of the kept
/// tokens for the prompt's first and last positions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    /// 0-based index of the layer whose attention selects (the reference implementation's
    /// `select_layer_idx`): the select phase runs layers `0..layer` and this layer's norm,
    /// q and k.
    pub layer: usize,
    pub keep: Keep,
    /// Kernel of the average pool over the scores (odd; 1: no pooling).
    pub pool: usize,
    /// The [`crate::op::Op::QueryKeyScores`] node.
    pub scores: NodeIndex,
    /// Prompt positions `0..keep_first` are always kept (a deviation from the reference).
    #[serde(default)]
    pub keep_first: usize,
    /// The last `keep_last` prompt positions are always kept (a deviation from the reference).
    #[serde(default)]
    pub keep_last: usize,
}

/// How many prompt tokens GemFilter keeps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Keep {
    /// At most this many (the whole prompt when it is shorter).
    Tokens(usize),
    /// This share of the prompt's tokens, rounded up (at least one).
    Fraction(f64),
}

impl Keep {
    /// Tokens kept of a prompt of `n` tokens: `min(k, n)`, or `ceil(fraction · n)` (at least
    /// one of a non-empty prompt).
    pub fn count(&self, n: usize) -> usize {
        match *self {
            Keep::Tokens(k) => k.min(n),
            Keep::Fraction(_) if n == 0 => 0,
            // Less a hair, so a product that is a whole number up to rounding
            // (0.07 · 100 = 7.000000000000001) is not rounded up past it.
            Keep::Fraction(f) => ((f * n as f64 - 1e-9).ceil() as usize).clamp(1, n),
        }
    }
}

impl Filter {
    /// Checks `keep` and `pool`: a positive count or a fraction in (0, 1], an odd pool; and
    /// that `keep_first` and `keep_last` fit in a `keep` count.
    pub fn check(&self) -> Result<(), String> {
        check_keep_and_pool(&self.keep, self.pool)?;
        check_forced(&self.keep, self.keep_first, self.keep_last)
    }
}

/// Checks that `keep_first + keep_last` forced tokens fit in a `keep` count. With a
/// `keep_fraction` the count depends on the prompt: where it is smaller, the last positions
/// take the count first, then the first ones.
pub fn check_forced(keep: &Keep, first: usize, last: usize) -> Result<(), String> {
    match *keep {
        Keep::Tokens(k) if first.saturating_add(last) > k => Err(format!(
            "keep_first + keep_last ({first} + {last}) must not exceed keep ({k}): the forced \
             positions are part of the kept tokens"
        )),
        _ => Ok(()),
    }
}

/// Checks GemFilter's `keep` and `pool`, naming the field that is wrong.
pub fn check_keep_and_pool(keep: &Keep, pool: usize) -> Result<(), String> {
    match *keep {
        Keep::Tokens(0) => return Err("keep must be at least 1".into()),
        Keep::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
            return Err(format!("keep_fraction must be in (0, 1], is {f}"))
        }
        _ => {}
    }
    if pool == 0 || pool % 2 == 0 {
        return Err(format!(
            "pool must be odd (a window centred on each position), is {pool}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_counts_tokens_and_rounds_fractions_up() {
        assert_eq!(Keep::Tokens(4).count(10), 4);
        assert_eq!(Keep::Tokens(4).count(3), 3);
        assert_eq!(Keep::Fraction(0.25).count(10), 3);
        assert_eq!(Keep::Fraction(0.2).count(10), 2);
        assert_eq!(Keep::Fraction(0.01).count(5), 1);
        assert_eq!(Keep::Fraction(1.0).count(7), 7);
        assert_eq!(Keep::Fraction(0.5).count(0), 0);
        assert_eq!(Keep::Fraction(0.07).count(100), 7);
        assert_eq!(Keep::Fraction(0.125).count(2048), 256);
    }

    #[test]
    fn forced_positions_must_fit_in_a_keep_count() {
        assert!(check_forced(&Keep::Tokens(8), 3, 5).is_ok());
        assert!(check_forced(&Keep::Tokens(8), 0, 0).is_ok());
        let e = check_forced(&Keep::Tokens(8), 4, 5).unwrap_err();
        assert!(e.contains("keep_first + keep_last (4 + 5)"), "{e}");
        assert!(check_forced(&Keep::Tokens(8), usize::MAX, 1).is_err());
        // A fraction's count is per prompt: nothing to check ahead.
        assert!(check_forced(&Keep::Fraction(0.01), 40, 40).is_ok());
    }

    #[test]
    fn bad_keep_and_pool_name_their_field() {
        assert!(check_keep_and_pool(&Keep::Tokens(8), 5).is_ok());
        assert!(check_keep_and_pool(&Keep::Fraction(1.0), 1).is_ok());
        let e = |keep, pool| check_keep_and_pool(&keep, pool).unwrap_err();
        assert!(e(Keep::Tokens(0), 5).contains("keep"));
        assert!(e(Keep::Fraction(0.0), 5).contains("keep_fraction"));
        assert!(e(Keep::Fraction(1.5), 5).contains("keep_fraction"));
        assert!(e(Keep::Fraction(f64::NAN), 5).contains("keep_fraction"));
        assert!(e(Keep::Tokens(8), 4).contains("pool"));
        assert!(e(Keep::Tokens(8), 0).contains("pool"));
    }
}
