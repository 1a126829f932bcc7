//! Which steps a call runs and when each value can be freed: shared by the padded and the
//! ragged execution modes.

use super::Program;
use std::collections::BTreeSet;

/// The steps a call runs, in order, and the last step reading each value.
pub(super) struct Schedule {
    pub needed: Vec<usize>,
    pub last_use: Vec<usize>,
}

impl Schedule {
    /// Whether value `j` can be dropped after step `i` ran.
    pub fn frees(&self, j: usize, i: usize) -> bool {
        self.last_use[j] == i
    }
}

impl Program {
    /// Steps needed for `targets` when the values of `given` are supplied by the caller
    /// (an entry state): the walk back from the targets stops there. Targets are kept to
    /// the end. (The looped runner plans a block's steps with this alone.)
    pub(super) fn schedule(&self, targets: &[usize], given: &[usize]) -> Schedule {
        self.schedule_with(targets, given, false)
    }

    /// [`Program::schedule`] for a call of [`Program::run`] or [`Program::forward_nodes`]:
    /// an exit head with attention of its own (Kangaroo's adapter) kept in sync runs its
    /// attention whenever the call computes the stream it reads (not when the stream is
    /// given): its KV slot then holds every position the layers below it hold, whatever the
    /// call wants.
    pub(super) fn schedule_call(&self, targets: &[usize], given: &[usize]) -> Schedule {
        self.schedule_with(targets, given, true)
    }

    fn schedule_with(&self, targets: &[usize], given: &[usize], stateful: bool) -> Schedule {
        let mut needed = BTreeSet::new();
        let mut stack = targets.to_vec();
        let walk = |stack: &mut Vec<usize>, needed: &mut BTreeSet<usize>| {
            while let Some(i) = stack.pop() {
                if given.contains(&i) {
                    continue;
                }
                if needed.insert(i) {
                    stack.extend(self.steps[i].inputs.iter().copied());
                }
            }
        };
        walk(&mut stack, &mut needed);
        let heads = if stateful {
            self.stateful_heads.as_slice()
        } else {
            &[]
        };
        for &(stream, attention) in heads {
            if needed.contains(&stream) && !needed.contains(&attention) {
                stack.push(attention);
                walk(&mut stack, &mut needed);
            }
        }
        let mut last_use = vec![0usize; self.steps.len()];
        for &i in &needed {
            for &j in &self.steps[i].inputs {
                last_use[j] = last_use[j].max(i);
            }
        }
        for &t in targets {
            last_use[t] = usize::MAX;
        }
        Schedule {
            needed: needed.into_iter().collect(),
            last_use,
        }
    }
}
