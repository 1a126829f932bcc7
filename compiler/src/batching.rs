//! Batching policies: which sequences run together in the next step.

use serde::{Deserialize, Serialize};

/// How the scheduler forms batches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Batching {
    /// Take up to `max_batch` waiting requests and run them until all finish; nothing joins
    /// a running batch.
    Static { max_batch: usize },
    /// Iteration-level scheduling (Orca, vLLM): every step, running sequences continue and
    /// waiting ones join while the batch has fewer than `max_batch` sequences and the step's
    /// new tokens (whole prompts for joiners, one per running sequence) fit `token_budget`.
    Continuous {
        max_batch: usize,
        token_budget: usize,
    },
    /// Depth-wise: the layers are cut into `stages` equal ranges and each step runs one
    /// stage for up to `max_batch` sequences that are at it, so tokens at the same depth run
    /// together whatever their position. The deepest occupied stage goes first (finishing
    /// tokens frees their slots); new requests join at stage 0.
    DepthWise { max_batch: usize, stages: usize },
}

/// What the planner sees of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: usize,
    /// Tokens it would run this step (its prompt if it has not started, else 1).
    pub tokens: usize,
    pub running: bool,
    /// The stage the sequence's next token is at (0 for every policy but depth-wise).
    pub stage: usize,
}

impl Batching {
    /// Stages the layers are cut into.
    pub fn stages(&self) -> usize {
        match *self {
            Batching::DepthWise { stages, .. } => stages.max(1),
            _ => 1,
        }
    }

    /// Most sequences in one step.
    pub fn max_batch(&self) -> usize {
        match *self {
            Batching::Static { max_batch }
            | Batching::Continuous { max_batch, .. }
            | Batching::DepthWise { max_batch, .. } => max_batch.max(1),
        }
    }

    /// The ids to run this step, from candidates sorted by id (arrival order). `batch_open`
    /// says whether a static batch is still in flight.
    pub fn plan(&self, candidates: &[Candidate]) -> Vec<usize> {
        let running: Vec<&Candidate> = candidates.iter().filter(|c| c.running).collect();
        match *self {
            Batching::Static { max_batch } => {
                if !running.is_empty() {
                    return running.iter().map(|c| c.id).collect();
                }
                candidates
                    .iter()
                    .take(max_batch.max(1))
                    .map(|c| c.id)
                    .collect()
            }
            Batching::Continuous {
                max_batch,
                token_budget,
            } => {
                let mut chosen: Vec<usize> = running.iter().map(|c| c.id).collect();
                let mut tokens: usize = running.iter().map(|c| c.tokens).sum();
                for c in candidates.iter().filter(|c| !c.running) {
                    if chosen.len() >= max_batch.max(1) {
                        break;
                    }
                    // A prompt longer than the budget still runs, alone, rather than never.
                    if tokens + c.tokens > token_budget && !chosen.is_empty() {
                        break;
                    }
                    tokens += c.tokens;
                    chosen.push(c.id);
                }
                chosen
            }
            Batching::DepthWise { max_batch, .. } => {
                let Some(stage) = candidates.iter().map(|c| c.stage).max() else {
                    return Vec::new();
                };
                candidates
                    .iter()
                    .filter(|c| c.stage == stage)
                    .take(max_batch.max(1))
                    .map(|c| c.id)
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: usize, tokens: usize, running: bool) -> Candidate {
        Candidate {
            id,
            tokens,
            running,
            stage: 0,
        }
    }

    #[test]
    fn static_batches_wait_for_the_whole_batch() {
        let p = Batching::Static { max_batch: 2 };
        assert_eq!(
            p.plan(&[c(0, 5, false), c(1, 5, false), c(2, 5, false)]),
            vec![0, 1]
        );
        assert_eq!(p.plan(&[c(0, 1, true), c(2, 5, false)]), vec![0]);
    }

    #[test]
    fn continuous_batches_admit_under_the_budget() {
        let p = Batching::Continuous {
            max_batch: 3,
            token_budget: 10,
        };
        assert_eq!(
            p.plan(&[c(0, 1, true), c(1, 6, false), c(2, 6, false)]),
            vec![0, 1]
        );
        assert_eq!(
            p.plan(&[c(3, 50, false)]),
            vec![3],
            "an oversized prompt runs alone"
        );
        assert_eq!(
            p.plan(&[c(0, 1, true), c(1, 1, true), c(2, 1, true), c(4, 1, false)]),
            vec![0, 1, 2]
        );
    }
}

#[cfg(test)]
mod depth_tests {
    use super::*;

    #[test]
    fn depth_wise_runs_the_deepest_occupied_stage() {
        let c = |id, stage, running| Candidate {
            id,
            tokens: 1,
            running,
            stage,
        };
        let p = Batching::DepthWise {
            max_batch: 2,
            stages: 3,
        };
        let cands = [
            c(0, 1, true),
            c(1, 2, true),
            c(2, 2, true),
            c(3, 2, true),
            c(4, 0, false),
        ];
        assert_eq!(p.plan(&cands), vec![1, 2]);
        assert_eq!(p.plan(&[c(0, 0, true), c(4, 0, false)]), vec![0, 4]);
        assert_eq!(p.stages(), 3);
    }
}
