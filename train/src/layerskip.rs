//! LayerSkip's training recipe (Elhoushi et al., 2024, "LayerSkip: Enabling Early Exit
//! Inference and Self-Speculative Decoding"), as `train lm`'s `layerskip:` field.
//!
//! **Layer dropout.** At step `t` of `T`, layer `l` of `L` (0-based) is skipped for a training
//! row with probability `p(l, t) = S(t) · D(l) · p_max`, where `D(l) = e^(l·ln2 / (L−1)) − 1`
//! rises from 0 at the first layer to 1 at the last, and the curriculum `S(t)` is 1
//! (`Constant`) or `e^(t·ln2 / (T−1)) − 1` (`Exponential`, rising from 0 to 1). Each row draws
//! its own layers (seeded by the run's seed, the step and the micro-batch, so a resumed run
//! draws the same).
//!
//! **Early-exit loss.** Every layer's output goes through the model's own final norm and LM
//! head; the loss is `Σ_l ẽ(t, l) · CE(head(norm(x_(l+1))), y)` with
//! `ẽ(t, l) = C(t, l) · e(l) / Σ_i C(t, i) · e(i)`, where `e(l) = e_scale · Σ_(i=0..=l) i` for
//! `l < L − 1` and `e(L − 1) = L − 1 + e_scale · Σ_(i=0..=L−2) i`. The curriculum `C(t, l)` is 1
//! for every layer (`All`) or, `Rotational(every: R)`, 1 for the layers with `l ≡ t (mod R)`
//! and the last layer. With `e_scale = 0` only the last layer's loss remains: ordinary
//! training.

use serde::{Deserialize, Serialize};

/// How the layer-dropout rate grows over training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DropoutCurriculum {
    /// `S(t) = 1`.
    #[default]
    Constant,
    /// `S(t) = e^(t·ln2 / (T−1)) − 1`: no dropout at the first step, `p_max` at the last.
    Exponential,
}

/// Which layers' early-exit losses count at a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitCurriculum {
    /// Every layer at every step.
    #[default]
    All,
    /// Every `every`-th layer, rotating by one each step, and always the last layer.
    Rotational { every: usize },
}

/// `layerskip: (p_max: 0.1, exit_scale: 1.0, ...)` in a `train lm` config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSkipSpec {
    /// The last layer's dropout rate; 0 turns layer dropout off.
    #[serde(default)]
    pub p_max: f64,
    #[serde(default)]
    pub dropout_curriculum: DropoutCurriculum,
    /// `e_scale` of the early-exit loss; 0 leaves only the last layer's loss.
    #[serde(default)]
    pub exit_scale: f64,
    #[serde(default)]
    pub exit_curriculum: ExitCurriculum,
}

impl LayerSkipSpec {
    /// Checks the fields; the message names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.p_max) {
            return Err(format!("layerskip.p_max {} is outside 0..=1", self.p_max));
        }
        if !(self.exit_scale.is_finite() && self.exit_scale >= 0.0) {
            return Err(format!(
                "layerskip.exit_scale {} must be a non-negative number",
                self.exit_scale
            ));
        }
        if self.exit_curriculum == (ExitCurriculum::Rotational { every: 0 }) {
            return Err("layerskip.exit_curriculum: Rotational(every: 0) selects no layer".into());
        }
        Ok(())
    }

    /// `p(l, t)`: the probability that a row skips layer `l` (of `layers`) at step `t` (of
    /// `steps`).
    pub fn dropout_rate(&self, l: usize, layers: usize, t: usize, steps: usize) -> f64 {
        let ln2 = std::f64::consts::LN_2;
        let depth = if layers > 1 {
            (l as f64 * ln2 / (layers - 1) as f64).exp() - 1.0
        } else {
            0.0
        };
        let time = match self.dropout_curriculum {
            DropoutCurriculum::Constant => 1.0,
            DropoutCurriculum::Exponential if steps > 1 => {
                (t as f64 * ln2 / (steps - 1) as f64).exp() - 1.0
            }
            DropoutCurriculum::Exponential => 1.0,
        };
        (time * depth * self.p_max).clamp(0.0, 1.0)
    }

    /// `ẽ(t, l)` for `l = 0..layers`: the weight of each layer's exit loss at step `t`
    /// (summing to 1).
    pub fn exit_weights(&self, layers: usize, t: usize) -> Vec<f64> {
        let last = layers.saturating_sub(1);
        let tri = |n: usize| (n * (n + 1) / 2) as f64;
        let e: Vec<f64> = (0..layers)
            .map(|l| {
                if l < last {
                    self.exit_scale * tri(l)
                } else {
                    last as f64 + self.exit_scale * tri(last.saturating_sub(1))
                }
            })
            .collect();
        let c = |l: usize| match self.exit_curriculum {
            ExitCurriculum::All => true,
            ExitCurriculum::Rotational { every } => l == last || l % every == t % every,
        };
        let weighted: Vec<f64> = (0..layers).map(|l| if c(l) { e[l] } else { 0.0 }).collect();
        let total: f64 = weighted.iter().sum();
        if total > 0.0 {
            weighted.iter().map(|w| w / total).collect()
        } else {
            // A one-layer model: its only layer is the last.
            (0..layers)
                .map(|l| f64::from(u8::from(l == last)))
                .collect()
        }
    }

    /// Whether the early-exit loss changes anything.
    pub fn exits(&self) -> bool {
        self.exit_scale > 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn dropout_rates_match_hand_computed_values() {
        let s = LayerSkipSpec {
            p_max: 0.2,
            ..Default::default()
        };
        // L = 4: D(l) = 2^(l/3) − 1.
        let want = [
            0.0,
            2f64.powf(1.0 / 3.0) - 1.0,
            2f64.powf(2.0 / 3.0) - 1.0,
            1.0,
        ];
        for (l, d) in want.iter().enumerate() {
            assert!(
                (s.dropout_rate(l, 4, 7, 10) - 0.2 * d).abs() < 1e-12,
                "layer {l}"
            );
        }
        let e = LayerSkipSpec {
            p_max: 0.2,
            dropout_curriculum: DropoutCurriculum::Exponential,
            ..Default::default()
        };
        // S(0) = 0, S(T − 1) = 1, S(t) = 2^(t/(T−1)) − 1.
        assert_eq!(e.dropout_rate(3, 4, 0, 11), 0.0);
        assert!((e.dropout_rate(3, 4, 10, 11) - 0.2).abs() < 1e-12);
        assert!((e.dropout_rate(3, 4, 5, 11) - 0.2 * (2f64.sqrt() - 1.0)).abs() < 1e-12);
        assert_eq!(s.dropout_rate(0, 1, 0, 1), 0.0);
    }

    #[test]
    fn exit_weights_match_hand_computed_values() {
        // L = 4, e_scale = 1: e = [0, 1, 3, 3 + (0 + 1 + 2)] = [0, 1, 3, 6], sum 10.
        let s = LayerSkipSpec {
            exit_scale: 1.0,
            ..Default::default()
        };
        assert!(close(&s.exit_weights(4, 0), &[0.0, 0.1, 0.3, 0.6]));
        // Rotational every 2 at t = 1: layers 1 and 3 → [0, 1, 0, 6] / 7.
        let r = LayerSkipSpec {
            exit_scale: 1.0,
            exit_curriculum: ExitCurriculum::Rotational { every: 2 },
            ..Default::default()
        };
        assert!(close(
            &r.exit_weights(4, 1),
            &[0.0, 1.0 / 7.0, 0.0, 6.0 / 7.0]
        ));
        // t = 2: layers 0 and 2, and the last: [0, 0, 3, 6] / 9.
        assert!(close(
            &r.exit_weights(4, 2),
            &[0.0, 0.0, 1.0 / 3.0, 2.0 / 3.0]
        ));
        // e_scale = 0: only the last layer.
        assert!(close(
            &LayerSkipSpec::default().exit_weights(4, 3),
            &[0.0, 0.0, 0.0, 1.0]
        ));
        assert!(close(&s.exit_weights(1, 0), &[1.0]));
    }

    #[test]
    fn bad_fields_are_named() {
        let bad = |s: LayerSkipSpec, field: &str| {
            let e = s.validate().unwrap_err();
            assert!(e.contains(field), "{e}");
        };
        bad(
            LayerSkipSpec {
                p_max: 1.5,
                ..Default::default()
            },
            "p_max",
        );
        bad(
            LayerSkipSpec {
                exit_scale: -1.0,
                ..Default::default()
            },
            "exit_scale",
        );
        bad(
            LayerSkipSpec {
                exit_curriculum: ExitCurriculum::Rotational { every: 0 },
                ..Default::default()
            },
            "exit_curriculum",
        );
    }
}
