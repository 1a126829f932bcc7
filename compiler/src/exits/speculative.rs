//! Self-speculative decoding (LayerSkip, Elhoushi et al. 2024; Kangaroo, Liu et al. 2024):
//! the first `draft_exit` layers and the exit head there draft tokens one at a time, the
//! layers from `draft_exit` on check them all in one call, and the longest prefix the full
//! model agrees with is kept, followed by the full model's own next token. The output is the
//! full model's, exactly: greedily, token for token; with sampling, in distribution (the
//! speculative-sampling rule of Leviathan et al. 2023 and Chen et al. 2023).
//!
//! This module holds the strategy's settings and the acceptance rules, which are pure
//! functions of the draft and the full model's logits; the runtime runs the cycles.

use crate::generate::Sampling;
use exitgraph_ir::Graph;
use serde::{Deserialize, Serialize};

/// `depth: SelfSpeculative(draft_exit: l, max_draft: g, stop_below: Some(0.6))`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfSpeculative {
    /// Layers the draft runs: the exit head after this many layers drafts (`InsertExits`
    /// placed it); the model's own depth drafts with the model's own head.
    pub draft_exit: usize,
    /// Most tokens drafted per cycle (γ).
    pub max_draft: usize,
    /// Kangaroo's early stop: drafting ends after a token whose draft distribution's top-1
    /// probability (softmax at temperature 1, whatever the sampling) is below this; the
    /// token stays in the draft. `None`: always `max_draft` tokens (LayerSkip).
    #[serde(default)]
    pub stop_below: Option<f32>,
}

impl SelfSpeculative {
    /// Checks the settings against the graph; errors name the field.
    pub fn validate(&self, graph: &Graph) -> Result<(), String> {
        let layers = graph.info.num_layers;
        if self.draft_exit == 0 || self.draft_exit > layers {
            return Err(format!(
                "SelfSpeculative's draft_exit ({}) must be between 1 and the model's {layers} layers",
                self.draft_exit
            ));
        }
        if self.draft_exit < layers
            && graph
                .exit_at(self.draft_exit)
                .is_none_or(|e| e.logits.is_none())
        {
            let have = graph.exit_depths();
            return Err(format!(
                "SelfSpeculative's draft_exit ({}) has no exit head to draft with: add \
                 InsertExits(after: [{}]) to the pipeline (exit heads are after layers {have:?})",
                self.draft_exit, self.draft_exit
            ));
        }
        if self.max_draft == 0 {
            return Err("SelfSpeculative's max_draft must be at least 1 token".into());
        }
        if let Some(t) = self.stop_below {
            if !(0.0..=1.0).contains(&t) {
                return Err(format!(
                    "SelfSpeculative's stop_below ({t}) must be a probability in [0, 1]"
                ));
            }
        }
        Ok(())
    }

    /// Whether drafting stops after a token the draft gave probability `prob`.
    pub fn stops_after(&self, prob: f32) -> bool {
        self.stop_below.is_some_and(|t| prob < t)
    }
}

/// The distribution a sampler draws from: `softmax(logits / temperature)`, and under top-p
/// the most likely tokens up to and including the one whose cumulative probability reaches
/// `top_p` (candle's `LogitsProcessor` rule, which the non-speculative path samples with),
/// renormalised. Greedy: all mass on the first maximal logit.
pub fn distribution(logits: &[f32], sampling: &Sampling) -> Vec<f32> {
    let mut p = vec![0.0f32; logits.len()];
    match sampling {
        Sampling::Greedy => {
            if let Some(i) = argmax(logits) {
                p[i] = 1.0;
            }
        }
        Sampling::Temperature { temperature, top_p } => {
            let scaled: Vec<f32> = logits
                .iter()
                .map(|&l| (l as f64 / temperature) as f32)
                .collect();
            p = super::rule::softmax(&scaled);
            if let Some(top) = top_p.filter(|&t| t > 0.0 && t < 1.0) {
                let mut order: Vec<usize> = (0..p.len()).collect();
                order.sort_by(|&i, &j| p[j].total_cmp(&p[i]));
                let mut cum = 0.0f32;
                for i in order {
                    if cum >= top as f32 {
                        p[i] = 0.0;
                    } else {
                        cum += p[i];
                    }
                }
                let sum: f32 = p.iter().sum();
                if sum > 0.0 {
                    p.iter_mut().for_each(|x| *x /= sum);
                }
            }
        }
    }
    p
}

/// Index of the first maximal value (ties go to the lower id, as argmax does).
pub fn argmax(values: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in values.iter().enumerate() {
        if best.is_none_or(|b| v > values[b]) {
            best = Some(i);
        }
    }
    best
}

/// Greedy verification: `targets[i]` is the full model's token after the first `i` drafts
/// (`targets.len() == drafts.len() + 1`). Returns the kept tokens: the longest prefix of the
/// drafts equal to the targets, then the full model's token after it (the correction of the
/// first rejected draft, or the bonus token after an accepted draft).
pub fn accept_greedy(drafts: &[u32], targets: &[u32]) -> Vec<u32> {
    let n = drafts
        .iter()
        .zip(targets)
        .take_while(|(d, t)| d == t)
        .count();
    let mut out = drafts[..n].to_vec();
    if let Some(&t) = targets.get(n) {
        out.push(t);
    }
    out
}

/// Speculative sampling's verdict on one drafted token `d` with draft distribution `q` and
/// the full model's `p` at its position, given a uniform draw `u` in [0, 1): accepted when
/// `u < p(d) / q(d)` (so with probability `min(1, p(d)/q(d))`).
pub fn accepts(p: &[f32], q: &[f32], d: u32, u: f64) -> bool {
    let (pd, qd) = (
        p.get(d as usize).copied().unwrap_or(0.0) as f64,
        q.get(d as usize).copied().unwrap_or(0.0) as f64,
    );
    if qd <= 0.0 {
        // The draft could not have drawn it; only a full model that can may keep it.
        return pd > 0.0;
    }
    u < pd / qd
}

/// The distribution a rejected draft is replaced from: `max(0, p - q)`, normalised. When
/// it is all zero (p = q up to rounding, so rejection had probability 0), `p` itself.
pub fn residual(p: &[f32], q: &[f32]) -> Vec<f32> {
    let r: Vec<f32> = p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect();
    let sum: f32 = r.iter().sum();
    if sum > 0.0 {
        r.iter().map(|x| x / sum).collect()
    } else {
        p.to_vec()
    }
}

/// Work of self-speculation against the full model's, per generated token, from measured
/// counts: `cycles` verifications produced `produced` tokens from `drafted` drafts; the draft
/// runs `draft_exit` of the `layers` layers; `head` is the LM head's per-token FLOPs in
/// layers; `adapter` the draft head's own layers' (Kangaroo's attention adapter: its
/// projections, which run for every token that runs the draft's layers; 0 for a shared
/// head).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Counted {
    pub layers: usize,
    pub draft_exit: usize,
    pub head: f64,
    pub adapter: f64,
    pub cycles: usize,
    pub drafted: usize,
    pub produced: usize,
}

impl Counted {
    /// The full model's FLOPs over self-speculation's for the same tokens: every drafted
    /// token and each cycle's first token run the draft's layers, every draft the head, and
    /// the same tokens the remaining layers and the head in verification; the full model
    /// runs every layer and the head per token. Below 1 whenever anything is drafted (the
    /// draft head's work), and lower the more drafts are rejected: self-speculation never
    /// saves arithmetic, it saves passes.
    pub fn flop_ratio(&self) -> f64 {
        let (l, e, h) = (self.layers as f64, self.draft_exit as f64, self.head);
        let positions = (self.drafted + self.cycles) as f64;
        let spec =
            positions * (e + self.adapter) + self.drafted as f64 * h + positions * (l - e + h);
        let full = self.produced as f64 * (l + h);
        if spec > 0.0 {
            full / spec
        } else {
            1.0
        }
    }

    /// The ideal speedup of decoding bound by reading weights (one read of a layer's
    /// weights per call, whatever its tokens), for one sequence decoded alone (at batch
    /// sizes above 1 a call reads the weights once for all its rows, so this is the
    /// per-sequence figure): the full model reads every
    /// layer and the head per token; a cycle reads the draft's layers once per token that
    /// runs them (its own call: drafts are sequential), the head once per draft, and the
    /// remaining layers and the head once for its whole verification.
    pub fn read_speedup(&self) -> f64 {
        let (l, e, h) = (self.layers as f64, self.draft_exit as f64, self.head);
        let shallow_calls = (self.drafted + self.cycles) as f64;
        let spec = shallow_calls * (e + self.adapter)
            + self.drafted as f64 * h
            + self.cycles as f64 * (l - e + h);
        let full = self.produced as f64 * (l + h);
        if spec > 0.0 {
            full / spec
        } else {
            1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_keeps_the_agreeing_prefix_and_the_models_next_token() {
        // All accepted: the drafts and the bonus token.
        assert_eq!(accept_greedy(&[4, 5, 6], &[4, 5, 6, 7]), vec![4, 5, 6, 7]);
        // The second draft is rejected: the first, then the full model's correction.
        assert_eq!(accept_greedy(&[4, 5, 6], &[4, 9, 6, 7]), vec![4, 9]);
        // A later agreement after a rejection does not count.
        assert_eq!(accept_greedy(&[1, 2], &[3, 2, 8]), vec![3]);
        // No draft: the full model's token alone.
        assert_eq!(accept_greedy(&[], &[2]), vec![2]);
    }

    #[test]
    fn distributions_follow_temperature_and_top_p() {
        // softmax([0, ln 2, ln 4] / 1) = [1, 2, 4] / 7.
        let logits = [0.0, 2f32.ln(), 4f32.ln()];
        let all = distribution(
            &logits,
            &Sampling::Temperature {
                temperature: 1.0,
                top_p: None,
            },
        );
        for (a, b) in all.iter().zip([1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0]) {
            assert!((a - b).abs() < 1e-6, "{all:?}");
        }
        // Temperature 2 halves the logits: [1, √2, 2] / (3 + √2).
        let warm = distribution(
            &logits,
            &Sampling::Temperature {
                temperature: 2.0,
                top_p: None,
            },
        );
        let z = 3.0 + 2f32.sqrt();
        assert!((warm[1] - 2f32.sqrt() / z).abs() < 1e-6, "{warm:?}");
        // top_p 0.6: 4/7 = 0.571 < 0.6, so the next one (2/7) is kept too; then [0, 1/3, 2/3].
        let nucleus = distribution(
            &logits,
            &Sampling::Temperature {
                temperature: 1.0,
                top_p: Some(0.6),
            },
        );
        assert_eq!(nucleus[0], 0.0);
        assert!((nucleus[1] - 1.0 / 3.0).abs() < 1e-6, "{nucleus:?}");
        // top_p 0.5: the top token alone reaches it.
        let top = distribution(
            &logits,
            &Sampling::Temperature {
                temperature: 1.0,
                top_p: Some(0.5),
            },
        );
        assert_eq!(top, vec![0.0, 0.0, 1.0]);
        // Greedy: the first maximal logit.
        assert_eq!(
            distribution(&[1.0, 3.0, 3.0], &Sampling::Greedy),
            vec![0.0, 1.0, 0.0]
        );
    }

    #[test]
    fn acceptance_is_min_one_p_over_q_and_the_residual_is_p_minus_q() {
        let p = [0.5, 0.3, 0.2];
        let q = [0.25, 0.6, 0.15];
        // p/q for token 1 is 0.5: accepted below, rejected at and above.
        assert!(accepts(&p, &q, 1, 0.49));
        assert!(!accepts(&p, &q, 1, 0.5));
        // p/q ≥ 1: always accepted.
        assert!(accepts(&p, &q, 0, 0.999));
        assert!(accepts(&p, &q, 2, 0.999));
        // max(0, p - q) = [0.25, 0, 0.05], normalised.
        let r = residual(&p, &q);
        for (a, b) in r.iter().zip([0.25 / 0.3, 0.0, 0.05 / 0.3]) {
            assert!((a - b).abs() < 1e-6, "{r:?}");
        }
        // Equal distributions: the residual falls back to p.
        assert_eq!(residual(&p, &p), p.to_vec());
    }

    #[test]
    fn ideal_figures_by_hand() {
        // 8 layers, draft after 2, head 0.5 layer: one cycle drafted 4 tokens and produced 5.
        let c = Counted {
            layers: 8,
            draft_exit: 2,
            head: 0.5,
            adapter: 0.0,
            cycles: 1,
            drafted: 4,
            produced: 5,
        };
        // FLOPs: 5 positions × 2 layers + 4 heads × 0.5 = 12 drafting, 5 × (6 + 0.5) = 32.5
        // verifying; the full model 5 × 8.5 = 42.5.
        assert!((c.flop_ratio() - 42.5 / 44.5).abs() < 1e-12);
        // Weight reads: 5 shallow calls × 2 + 4 heads × 0.5 + one verification 6.5 = 18.5.
        assert!((c.read_speedup() - 42.5 / 18.5).abs() < 1e-12);
        // Nothing drafted: one shallow call and one verification per token, as the full
        // model's one pass.
        let none = Counted {
            drafted: 0,
            cycles: 3,
            produced: 3,
            ..c
        };
        assert!((none.flop_ratio() - 1.0).abs() < 1e-12);
        assert!((none.read_speedup() - 1.0).abs() < 1e-12);
        // Rejections: 2 cycles drafted 4 and produced 3 (one kept draft, two full-model
        // tokens). FLOPs: 6 positions × 2 + 4 × 0.5 + 6 × 6.5 = 53 against 3 × 8.5 = 25.5;
        // reads: 6 × 2 + 4 × 0.5 + 2 × 6.5 = 27.
        let rejected = Counted {
            cycles: 2,
            drafted: 4,
            produced: 3,
            ..c
        };
        assert!((rejected.flop_ratio() - 25.5 / 53.0).abs() < 1e-12);
        assert!((rejected.read_speedup() - 25.5 / 27.0).abs() < 1e-12);
        // A Kangaroo adapter of 0.25 layer runs with every shallow token: the first case's
        // 5 shallow tokens add 1.25 to both the FLOPs (44.5 + 1.25) and the reads
        // (18.5 + 1.25).
        let adapted = Counted { adapter: 0.25, ..c };
        assert!((adapted.flop_ratio() - 42.5 / 45.75).abs() < 1e-12);
        assert!((adapted.read_speedup() - 42.5 / 19.75).abs() < 1e-12);
    }

    #[test]
    fn stop_below_is_strict() {
        let s = SelfSpeculative {
            draft_exit: 2,
            max_draft: 6,
            stop_below: Some(0.6),
        };
        assert!(s.stops_after(0.59));
        assert!(!s.stops_after(0.6));
        assert!(!SelfSpeculative {
            stop_below: None,
            ..s
        }
        .stops_after(0.0));
    }
}
