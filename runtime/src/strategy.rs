//! Depth strategies as per-request components. A request's strategy is attached when it
//! is admitted ([`attach`]); the execute and decide systems read the components of the
//! requests they run, so each request follows its own plan and strategies never appear as
//! `match` arms in the systems.
//!
//! - no component: every token runs every layer (full depth);
//! - [`ExitPlan`]: at each exit head the request's rule decides whether the token stops;
//! - [`SkipPlan`]: each generated token runs SkipDecode's path for its sequence position;
//! - [`SpecPlan`]: each decode step is a self-speculative cycle (draft, verify, keep).

use bevy_ecs::prelude::*;
use exitgraph_compiler::exits::{Depth, ExitRule, SelfSpeculative, SkipDecode};

/// A request whose tokens may stop at an exit head, decided by `rule`.
#[derive(Component, Clone, Debug)]
pub struct ExitPlan {
    pub rule: ExitRule,
}

/// A request decoding self-speculatively: each of its decode steps drafts with the layers
/// up to `spec.draft_exit`, verifies with the rest and keeps what the full model agrees with.
#[derive(Component, Clone, Copy, Debug)]
pub struct SpecPlan {
    pub spec: SelfSpeculative,
}

/// A request following SkipDecode's position-wise schedule.
#[derive(Component, Clone, Copy, Debug)]
pub struct SkipPlan {
    pub schedule: SkipDecode,
}

impl SkipPlan {
    /// The layers a request's token at sequence position `pos` runs, when the prompt has
    /// `prompt` tokens: prompt positions run every layer (they run in one pass that produces
    /// the first token); a generated token runs SkipDecode's warm-up then top layers for its
    /// position's `n(pos)`. `positions` is the model's (the decay length by default).
    pub fn path(&self, pos: usize, prompt: usize, positions: usize, layers: usize) -> Vec<usize> {
        if pos < prompt {
            return (0..layers).collect();
        }
        let n = self
            .schedule
            .layers_at(pos, self.schedule.length(positions));
        if n >= layers {
            return (0..layers).collect();
        }
        let (warm, top) = self.schedule.path(n, layers);
        warm.chain(top).collect()
    }
}

/// Gives a newly admitted request the components of the strategy `depth`; `seed` is its
/// sampler's (self-speculation's random stream starts from it).
pub fn attach(depth: &Depth, seed: u64, entity: &mut EntityCommands<'_>) {
    match depth {
        Depth::Full => {}
        Depth::EarlyExit { rule } => {
            entity.insert(ExitPlan { rule: rule.clone() });
        }
        Depth::SkipDecode(schedule) => {
            entity.insert(SkipPlan {
                schedule: *schedule,
            });
        }
        Depth::SelfSpeculative { .. } => {
            use rand::SeedableRng;
            let Some(spec) = depth.speculative() else {
                return;
            };
            entity.insert((
                SpecPlan { spec },
                super::speculate::SpecRng(Some(rand::rngs::StdRng::seed_from_u64(
                    super::speculate::stream_seed(seed),
                ))),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_paths_follow_the_schedule() {
        let plan = SkipPlan {
            schedule: SkipDecode {
                max_layers: 6,
                min_layers: 2,
                warmup: 1,
                max_length: Some(9),
            },
        };
        // Prompt positions run every layer, whatever the schedule says there.
        assert_eq!(plan.path(7, 8, 256, 6), vec![0, 1, 2, 3, 4, 5]);
        // Position 1 of a 1-token prompt: n = round(6 - 4/8) = 6, every layer.
        assert_eq!(plan.path(1, 1, 256, 6), vec![0, 1, 2, 3, 4, 5]);
        // Position 4: n = 6 - 4 * 4/8 = 4: warm-up layer 0, top layers 3..6.
        assert_eq!(plan.path(4, 1, 256, 6), vec![0, 3, 4, 5]);
        // Position 8 and beyond: min_layers, the warm-up layer and the top one.
        assert_eq!(plan.path(8, 3, 256, 6), vec![0, 5]);
        assert_eq!(plan.path(40, 3, 256, 6), vec![0, 5]);
        // The same position gives the same path whatever the prompt's length.
        assert_eq!(plan.path(6, 2, 256, 6), plan.path(6, 5, 256, 6));
        // Without max_length the decay runs over the model's positions.
        let long = SkipPlan {
            schedule: SkipDecode {
                max_length: None,
                ..plan.schedule
            },
        };
        assert_eq!(long.path(8, 3, 256, 6).len(), 6);
        assert_eq!(long.path(255, 3, 256, 6), vec![0, 5]);
    }
}
