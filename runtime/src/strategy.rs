//! Depth strategies as per-request components. A request's strategy is attached when it
//! is admitted ([`attach`]); the execute and decide systems read the components of the
//! requests they run, so each request follows its own plan and strategies never appear as
//! `match` arms in the systems.
//!
//! - no component: every token runs every layer (full depth);
//! - [`ExitPlan`]: at each exit head the request's rule decides whether the token stops;
//! - [`SkipPlan`]: each generated token runs SkipDecode's path for its position.

use bevy_ecs::prelude::*;
use exitgraph_compiler::exits::{Depth, ExitRule, SkipDecode};

/// A request whose tokens may stop at an exit head, decided by `rule`.
#[derive(Component, Clone, Debug)]
pub struct ExitPlan {
    pub rule: ExitRule,
}

/// A request following SkipDecode's position-wise schedule.
#[derive(Component, Clone, Copy, Debug)]
pub struct SkipPlan {
    pub schedule: SkipDecode,
}

impl SkipPlan {
    /// The layers the request's next token runs: the prompt (nothing produced yet) runs
    /// every layer; generated token `t` of `max_new_tokens` runs SkipDecode's warm-up then top
    /// layers for its `n(t)`.
    pub fn path(&self, produced: usize, max_new_tokens: usize, layers: usize) -> Vec<usize> {
        if produced == 0 {
            return (0..layers).collect();
        }
        let n = self
            .schedule
            .layers_at(produced - 1, max_new_tokens.saturating_sub(1));
        if n >= layers {
            return (0..layers).collect();
        }
        let (warm, top) = self.schedule.path(n, layers);
        warm.chain(top).collect()
    }
}

/// Gives a newly admitted request the components of the strategy `depth`.
pub fn attach(depth: &Depth, entity: &mut EntityCommands<'_>) {
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
            },
        };
        // The prompt runs every layer; the first generated token max_layers (all 6); the
        // last of 9 tokens min_layers: the warm-up layer and the top one.
        assert_eq!(plan.path(0, 9, 6), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(plan.path(1, 9, 6), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(plan.path(9, 9, 6), vec![0, 5]);
        // Token 5 of 9: n = round(6 - 4 * 4/8) = 4 layers: warm-up 0, top 3..6.
        assert_eq!(plan.path(5, 9, 6), vec![0, 3, 4, 5]);
    }
}
