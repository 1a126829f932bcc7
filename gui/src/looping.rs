//! The loop structure of a tied graph (Relaxed Recursive Transformers' `TieLayers`): one block
//! of `block_len` layers run `loops` times, depth `d` being layer `d % block_len` of
//! iteration `d / block_len`, and the rank of the per-iteration adapters `DepthLora` added.
//!
//! The graph view folds such a block into one box, the run view's heatmap labels its columns
//! by (loop, layer), and a token's compute path counts the iterations it ran.

use exitgraph_ir::{Graph, Op};
use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;

/// A block of layers run several times with the same weights.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Looping {
    /// Layers of the shared block (one loop iteration).
    pub block_len: usize,
    /// Loop iterations.
    pub loops: usize,
    /// Ranks of the low-rank adapters on the block's projections (empty without adapters).
    pub adapter_ranks: BTreeSet<usize>,
}

impl Looping {
    /// The loop structure of `g`, when its blocks share weights: every depth `d` uses weight
    /// identity `d % K` in iteration `d / K` of at least two. `None` for an untied graph or
    /// one whose blocks share weights in another pattern.
    pub fn of(g: &Graph) -> Option<Looping> {
        let positions: BTreeSet<usize> = g.blocks.iter().map(|b| b.weights).collect();
        let block_len = positions.len();
        let n = g.blocks.len();
        if block_len == 0 || n < 2 * block_len || !n.is_multiple_of(block_len) {
            return None;
        }
        let regular = g.blocks.iter().enumerate().all(|(d, b)| {
            b.depth == d && b.weights == d % block_len && b.iteration == d / block_len
        });
        if !regular {
            return None;
        }
        let adapter_ranks = g
            .graph
            .node_weights()
            .filter(|node| node.layer.is_some_and(|l| l < n))
            .flat_map(|node| node.op.linears())
            .filter_map(|l| l.adapter.as_ref().map(|a| a.rank))
            .collect();
        Some(Looping {
            block_len,
            loops: n / block_len,
            adapter_ranks,
        })
    }

    /// Depths the loop runs (every iteration's layers).
    pub fn depths(&self) -> Range<usize> {
        0..self.block_len * self.loops
    }

    /// The loop iteration depth `d` belongs to.
    pub fn iteration(&self, d: usize) -> usize {
        d / self.block_len.max(1)
    }

    /// Depth `d`'s layer within the shared block.
    pub fn position(&self, d: usize) -> usize {
        d % self.block_len.max(1)
    }

    /// What the loop is, in a line: `×2 loops · layers 0–2 shared`.
    pub fn summary(&self) -> String {
        format!("×{} loops · {}", self.loops, self.shared())
    }

    /// The layers of the shared block: `layers 0–2 shared`.
    pub fn shared(&self) -> String {
        match self.block_len {
            1 => "layer 0 shared".to_string(),
            k => format!("layers 0–{} shared", k - 1),
        }
    }

    /// The adapters' rank, when there are adapters: `r16`, or `r4–16` when ranks differ.
    pub fn adapter_rank(&self) -> Option<String> {
        let lo = self.adapter_ranks.first()?;
        let hi = self.adapter_ranks.last()?;
        Some(if lo == hi {
            format!("r{lo}")
        } else {
            format!("r{lo}–{hi}")
        })
    }

    /// The adapters, when there are any: `LoRA r16 per iteration`.
    pub fn adapters(&self) -> Option<String> {
        Some(format!("LoRA {} per iteration", self.adapter_rank()?))
    }

    /// The iterations a token that ran `layers` (depths) took part in.
    pub fn iterations_run(&self, layers: &[usize]) -> IterationsRun {
        let ran: BTreeSet<usize> = layers
            .iter()
            .copied()
            .filter(|d| self.depths().contains(d))
            .collect();
        let iterations: BTreeSet<usize> = ran.iter().map(|&d| self.iteration(d)).collect();
        let last = iterations.last().map_or(0, |&i| {
            ran.iter().filter(|&&d| self.iteration(d) == i).count()
        });
        IterationsRun {
            ran: iterations.len(),
            of: self.loops,
            last_layers: last,
            block_len: self.block_len,
        }
    }
}

/// How many loop iterations a token ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IterationsRun {
    /// Iterations in which at least one of the token's layers ran.
    pub ran: usize,
    /// Iterations of the loop.
    pub of: usize,
    /// Layers the token ran in its last iteration.
    pub last_layers: usize,
    /// Layers of one iteration.
    pub block_len: usize,
}

impl fmt::Display for IterationsRun {
    /// `2 of 2 iterations`, or `2 of 2 iterations, the last 1 of 3 layers` when the token
    /// left the loop inside an iteration.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = if self.of == 1 {
            "iteration"
        } else {
            "iterations"
        };
        write!(f, "{} of {} {noun}", self.ran, self.of)?;
        if self.ran > 0 && self.last_layers < self.block_len {
            write!(
                f,
                ", the last {} of {} layers",
                self.last_layers, self.block_len
            )?;
        }
        Ok(())
    }
}

/// The projections of an op that can carry an adapter, by name: `q k v o` of attention,
/// `gate up down` of an MLP, `lm_head`.
pub fn projections(op: &Op) -> Vec<(&'static str, &exitgraph_ir::op::Linear)> {
    match op {
        Op::Attention(a) => vec![("q", &a.q), ("k", &a.k), ("v", &a.v), ("o", &a.o)],
        Op::Mlp(m) => {
            let mut v: Vec<(&'static str, &exitgraph_ir::op::Linear)> =
                m.gate.iter().map(|g| ("gate", g)).collect();
            v.push(("up", &m.up));
            v.push(("down", &m.down));
            v
        }
        Op::LmHead(l) => vec![("lm_head", l)],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::test_graphs::{chain, tied_demo};

    #[test]
    fn an_untied_graph_has_no_loop() {
        assert_eq!(Looping::of(&chain(6)), None);
    }

    #[test]
    fn eight_layers_tied_twice_loop_a_block_of_four_with_rank_16_adapters() {
        let l = Looping::of(&tied_demo(2, Some(16))).unwrap();
        assert_eq!((l.block_len, l.loops), (4, 2));
        assert_eq!(l.depths(), 0..8);
        assert_eq!((l.iteration(5), l.position(5)), (1, 1));
        assert_eq!(l.summary(), "×2 loops · layers 0–3 shared");
        assert_eq!(l.adapters().as_deref(), Some("LoRA r16 per iteration"));
        // Tied without adapters: no adapter mark.
        let plain = Looping::of(&tied_demo(4, None)).unwrap();
        assert_eq!((plain.block_len, plain.loops), (2, 4));
        assert_eq!(plain.adapters(), None);
    }

    #[test]
    fn iterations_count_the_loops_a_token_took_part_in() {
        let l = Looping::of(&tied_demo(2, None)).unwrap();
        let all = l.iterations_run(&[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!((all.ran, all.of), (2, 2));
        assert_eq!(all.to_string(), "2 of 2 iterations");
        assert_eq!(
            l.iterations_run(&[0, 1, 2, 3]).to_string(),
            "1 of 2 iterations"
        );
        assert_eq!(
            l.iterations_run(&[0, 1, 2, 3, 4]).to_string(),
            "2 of 2 iterations, the last 1 of 4 layers"
        );
        assert_eq!(l.iterations_run(&[]).ran, 0);
    }
}
