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
    /// Continuous depth-wise batching over a looped block (Relaxed Recursive Transformers,
    /// Mixture-of-Recursions): the stages are the loop's iterations, and each step runs the
    /// shared block once for up to `max_batch` rows waiting at *any* iteration (each with its
    /// own iteration's adapters and KV slots; prompt and decode rows mix), under
    /// `token_budget` new tokens. A row whose token leaves (at the last iteration or an
    /// exit after an iteration) frees its place for the next step; new requests join at
    /// iteration 0. Needs a model with a tied block (`TieLayers`).
    LoopedDepthWise {
        max_batch: usize,
        token_budget: usize,
        #[serde(default)]
        priority: Priority,
    },
}

/// Which rows a looped depth-wise step takes first when more are waiting than fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Priority {
    /// Rows at the deepest iteration first (they finish soonest and free their places),
    /// then by arrival.
    #[default]
    DeepestFirst,
    /// By arrival only, whatever the iteration.
    OldestFirst,
}

/// What the planner sees of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: usize,
    /// Tokens it would run this step (its prompt while the prompt is on its way down, else
    /// 1).
    pub tokens: usize,
    pub running: bool,
    /// The stage the sequence's next token is at (0 for every policy but the depth-wise
    /// ones).
    pub stage: usize,
}

impl Batching {
    /// Whether stages are a looped block's iterations.
    pub fn is_looped(&self) -> bool {
        matches!(self, Batching::LoopedDepthWise { .. })
    }

    /// Whether the policy chooses stages itself (otherwise tokens part-way down finish their
    /// way before anything else runs).
    pub fn picks_stages(&self) -> bool {
        matches!(
            self,
            Batching::DepthWise { .. } | Batching::LoopedDepthWise { .. }
        )
    }

    /// Stages the layers are cut into (for [`Batching::LoopedDepthWise`], the model's loop
    /// decides; 1 here).
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
            | Batching::DepthWise { max_batch, .. }
            | Batching::LoopedDepthWise { max_batch, .. } => max_batch.max(1),
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
            Batching::LoopedDepthWise {
                max_batch,
                token_budget,
                priority,
            } => {
                let mut order = running;
                if priority == Priority::DeepestFirst {
                    order.sort_by_key(|c| (std::cmp::Reverse(c.stage), c.id));
                }
                let mut chosen = Vec::new();
                let mut tokens = 0;
                let mut held = false;
                for c in order {
                    if chosen.len() >= max_batch.max(1) {
                        held = true;
                        break;
                    }
                    // A row over the budget waits for a later step (it runs alone rather
                    // than never).
                    if tokens + c.tokens > token_budget && !chosen.is_empty() {
                        held = true;
                        continue;
                    }
                    tokens += c.tokens;
                    chosen.push(c.id);
                }
                // Waiting requests join in arrival order while there is room, and only when
                // no started row is waiting: sequences in flight never exceed `max_batch`,
                // and a held row is not overtaken by newcomers.
                for c in candidates.iter().filter(|c| !c.running && !held) {
                    if chosen.len() >= max_batch.max(1)
                        || (tokens + c.tokens > token_budget && !chosen.is_empty())
                    {
                        break;
                    }
                    tokens += c.tokens;
                    chosen.push(c.id);
                }
                chosen
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
mod looped_tests {
    use super::*;

    fn c(id: usize, tokens: usize, running: bool, stage: usize) -> Candidate {
        Candidate {
            id,
            tokens,
            running,
            stage,
        }
    }

    #[test]
    fn looped_steps_mix_iterations_deepest_first() {
        let p = Batching::LoopedDepthWise {
            max_batch: 3,
            token_budget: 100,
            priority: Priority::DeepestFirst,
        };
        let cands = [
            c(0, 1, true, 0),
            c(1, 1, true, 2),
            c(2, 1, true, 1),
            c(3, 1, true, 2),
            c(4, 5, false, 0),
        ];
        // Rows at iterations 2, 2, 1 fill the step; the one at 0 and the joiner wait.
        assert_eq!(p.plan(&cands), vec![1, 3, 2]);
        let p = Batching::LoopedDepthWise {
            max_batch: 3,
            token_budget: 100,
            priority: Priority::OldestFirst,
        };
        assert_eq!(p.plan(&cands), vec![0, 1, 2]);
    }

    #[test]
    fn looped_joiners_fill_free_places_under_the_budget() {
        let p = Batching::LoopedDepthWise {
            max_batch: 4,
            token_budget: 8,
            priority: Priority::DeepestFirst,
        };
        // One running row (1 token), joiners of 5 and 3 tokens: 1 + 5 fits, + 3 does not.
        assert_eq!(
            p.plan(&[c(0, 1, true, 1), c(1, 5, false, 0), c(2, 3, false, 0)]),
            vec![0, 1]
        );
        // A prompt on its way down counts its tokens; an oversized one runs alone.
        assert_eq!(p.plan(&[c(5, 20, true, 1), c(6, 1, true, 0)]), vec![5]);
        // A started row held back by the budget is not overtaken by a newcomer that fits.
        assert_eq!(
            p.plan(&[c(0, 1, true, 1), c(1, 9, true, 0), c(2, 1, false, 0)]),
            vec![0]
        );
        assert_eq!(p.plan(&[c(7, 20, false, 0)]), vec![7]);
        assert!(p.is_looped() && p.picks_stages());
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
