//! GemFilter's token selection (Shi et al., 2024, "Discovering the Gems in Early Layers"):
//! from the filter layer's last-query scores of a prompt, which prompt positions the full
//! model runs on.
//!
//! The scores are the last prompt position's query against every key at the filter layer,
//! after RoPE, before softmax and without the 1/√d scale, key-value heads repeated to the
//! query heads, summed over heads. [`select_positions`] then follows the reference
//! implementation: an average pool over the sequence (kernel `pool`, stride 1, padding
//! `pool / 2`, the zero padding counted in every window's average, as PyTorch's
//! `avg_pool1d` does by default), the top `min(keep, n)` pooled scores, their positions sorted
//! into prompt order. Nothing is forced in or out (the last position is kept only if it
//! scores). Ties between equal pooled scores go to the earlier position (PyTorch's `topk`
//! leaves their order unspecified).
//!
//! A deviation the reference does not have, off by default: [`select_positions_forcing`]
//! reserves part of the kept count for the prompt's first and last positions (`keep_first`,
//! `keep_last`) and fills the rest by score from the positions between them.

use crate::lower::{Program, Run, RunError, Segment, Task, Want};
use candle_core::DType;

/// One prompt's selection.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// The filter layer's last-query score of every prompt position, before pooling.
    pub scores: Vec<f32>,
    /// The kept positions, in prompt order.
    pub kept: Vec<usize>,
}

impl Selection {
    /// The kept tokens of `prompt`, in order: what the full model runs on.
    pub fn ids(&self, prompt: &[u32]) -> Vec<u32> {
        self.kept
            .iter()
            .filter_map(|&i| prompt.get(i).copied())
            .collect()
    }
}

/// GemFilter's select phase for `prompts`, side by side in one call (each from position 0
/// with a fresh, discarded KV cache, so several prompts of any lengths batch like any
/// prefill): the program's filter layer scores each prompt's positions and
/// [`select_positions`] keeps the filter's share of them.
pub fn select(program: &Program, prompts: &[&[u32]]) -> Result<Vec<Selection>, RunError> {
    let filter = program
        .graph()
        .filter
        .clone()
        .ok_or_else(|| RunError::Input("the program has no GemFilter".into()))?;
    let mut caches: Vec<_> = prompts.iter().map(|_| program.new_cache()).collect();
    let mut segments: Vec<Segment<'_>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, c)| Segment::new(p, c))
        .collect();
    let run = Run {
        from: 0,
        task: Task::Outputs(vec![Want::all(filter.scores)]),
        commit: false,
    };
    let out = program.run(&mut segments, &run)?;
    out.into_iter()
        .zip(prompts)
        .map(|(mut values, prompt)| {
            let scores = values
                .pop()
                .ok_or_else(|| RunError::Input("the select phase returned no scores".into()))?
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| RunError::Input(format!("GemFilter scores: {e}")))?;
            let kept = select_positions_forcing(
                &scores,
                filter.keep.count(prompt.len()),
                filter.pool,
                filter.keep_first,
                filter.keep_last,
            );
            Ok(Selection { scores, kept })
        })
        .collect()
}

/// The pooled scores: `scores` averaged over windows of `pool` positions centred on each
/// position (stride 1, `pool / 2` zeros of padding on each side, counted in the average).
/// `pool` must be odd, so the output has one score per position.
pub fn pool_scores(scores: &[f32], pool: usize) -> Vec<f32> {
    let n = scores.len();
    let half = pool / 2;
    (0..n)
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(n);
            let sum: f64 = scores[lo..hi].iter().map(|&s| s as f64).sum();
            (sum / pool as f64) as f32
        })
        .collect()
}

/// The prompt positions GemFilter keeps: the `min(keep, n)` highest pooled scores (see
/// [`pool_scores`]), in prompt order.
pub fn select_positions(scores: &[f32], keep: usize, pool: usize) -> Vec<usize> {
    select_positions_forcing(scores, keep, pool, 0, 0)
}

/// [`select_positions`] with `min(keep, n)` positions of which the last `last` and the first
/// `first` are always kept (the last ones first where the count cannot hold both); the rest
/// of the count goes to the highest pooled scores (pooled over the whole prompt) among the
/// positions between them. With `first = last = 0` it is the reference's selection.
pub fn select_positions_forcing(
    scores: &[f32],
    keep: usize,
    pool: usize,
    first: usize,
    last: usize,
) -> Vec<usize> {
    let n = scores.len();
    let keep = keep.min(n);
    let last = last.min(keep);
    let first = first.min(keep - last);
    let pooled = pool_scores(scores, pool);
    let mut order: Vec<usize> = (first..n - last).collect();
    // Highest first; equal scores (and NaN, which a finite model never gives) by position.
    order.sort_by(|&a, &b| {
        pooled[b]
            .partial_cmp(&pooled[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    order.truncate(keep - first - last);
    order.extend((0..first).chain(n - last..n));
    order.sort_unstable();
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_counts_the_zero_padding() {
        // Kernel 3, padding 1: the ends average over one zero.
        let s = [3.0, 6.0, 9.0, 0.0];
        assert_eq!(pool_scores(&s, 3), vec![3.0, 6.0, 5.0, 3.0]);
        // Kernel 5, padding 2, three positions: every window holds at least two zeros.
        assert_eq!(pool_scores(&[5.0, 10.0, 5.0], 5), vec![4.0, 4.0, 4.0]);
        // Kernel 1 is the identity.
        assert_eq!(pool_scores(&s, 1), s.to_vec());
    }

    #[test]
    fn the_top_pooled_positions_are_kept_in_prompt_order() {
        // Pooled with kernel 3: [1, 2, 4, 8/3, 5/3].
        let s = [1.0, 2.0, 3.0, 7.0, -2.0];
        assert_eq!(
            pool_scores(&s, 3),
            vec![1.0, 2.0, 4.0, 8.0 / 3.0, 5.0 / 3.0]
        );
        // The last position (4) is not forced in.
        assert_eq!(select_positions(&s, 2, 3), vec![2, 3]);
        assert_eq!(select_positions(&s, 3, 3), vec![1, 2, 3]);
        // Without pooling the raw scores decide: 7 and 3.
        assert_eq!(select_positions(&s, 2, 1), vec![2, 3]);
        assert_eq!(select_positions(&s, 1, 1), vec![3]);
        assert_eq!(select_positions(&s, 4, 3), vec![1, 2, 3, 4]);
        // keep ≥ n keeps everything.
        assert_eq!(select_positions(&s, 9, 3), vec![0, 1, 2, 3, 4]);
        assert!(select_positions(&[], 4, 5).is_empty());
    }

    #[test]
    fn forced_positions_take_their_share_of_the_count() {
        // Pooled with kernel 3: [1, 2, 4, 8/3, 5/3]; unforced, keep 2 takes 2 and 3.
        let s = [1.0, 2.0, 3.0, 7.0, -2.0];
        // The last position forced: one slot left, the best of positions 0..4 (2).
        assert_eq!(select_positions_forcing(&s, 2, 3, 0, 1), vec![2, 4]);
        // The first forced too: no slot left for scores.
        assert_eq!(select_positions_forcing(&s, 2, 3, 1, 1), vec![0, 4]);
        // Keep 3, first 1: the best two of positions 1..5 (2 and 3).
        assert_eq!(select_positions_forcing(&s, 3, 3, 1, 0), vec![0, 2, 3]);
        // Scores pool over the whole prompt: forcing the last two leaves position 2 the best
        // of 0..3 (its window still counts position 3's 7).
        assert_eq!(select_positions_forcing(&s, 3, 3, 0, 2), vec![2, 3, 4]);
        // More forced than the count: the last positions first, then the first.
        assert_eq!(select_positions_forcing(&s, 2, 3, 2, 2), vec![3, 4]);
        assert_eq!(select_positions_forcing(&s, 3, 3, 2, 2), vec![0, 3, 4]);
        // keep ≥ n keeps everything; nothing forced is the reference.
        assert_eq!(
            select_positions_forcing(&s, 9, 3, 2, 2),
            vec![0, 1, 2, 3, 4]
        );
        assert_eq!(
            select_positions_forcing(&s, 3, 3, 0, 0),
            select_positions(&s, 3, 3)
        );
        assert!(select_positions_forcing(&[], 4, 5, 1, 1).is_empty());
    }

    #[test]
    fn ties_go_to_the_earlier_position() {
        assert_eq!(select_positions(&[1.0, 1.0, 1.0, 0.0], 2, 1), vec![0, 1]);
    }
}
