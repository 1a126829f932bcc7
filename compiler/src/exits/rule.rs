//! Exit rules: when a token may stop at an exit point.
//!
//! A rule sees what the exit head produced for the token (its probabilities, the hidden
//! state, the gate, the tokens of earlier exit points) and says whether to exit, with the
//! signal it judged by (recorded in traces). Rules combine with `Any` and `All`.

use serde::{Deserialize, Serialize};

/// An exit rule, as written in a pipeline's `depth: EarlyExit(rule: ...)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ExitRule {
    /// Never exit (every token runs the full depth; the exits are only observed).
    Never,
    /// Max softmax probability ≥ threshold.
    Confidence(f64),
    /// Top-1 minus top-2 probability ≥ threshold (CALM's softmax response).
    Margin(f64),
    /// Entropy of the head's distribution (nats) ≤ threshold.
    Entropy(f64),
    /// The last `k` exit points (this one included) agree on the top token (PABEE).
    Patience(usize),
    /// Cosine similarity between this exit point's hidden state and the previous exit
    /// point's (the embeddings for the first) ≥ threshold (CALM, MuE).
    Saturation(f64),
    /// The learned gate's probability that this exit's token equals the final one ≥
    /// threshold (needs `InsertExits(gate: true)` and trained gates).
    Gate(f64),
    /// Exit at the first exit point whose token equals the full model's. An upper bound for
    /// studies: it runs the full model to know the answer, so it saves nothing.
    Oracle,
    /// Exit when any of the rules fires.
    Any(Vec<ExitRule>),
    /// Exit when all of the rules fire.
    All(Vec<ExitRule>),
}

/// What an exit point produced for one token.
pub struct ExitView<'a> {
    /// The head's softmax probabilities.
    pub probs: &'a [f32],
    /// The residual stream at this exit point (the token's last position).
    pub hidden: &'a [f32],
    /// The residual stream at the previous exit point (the embeddings for the first).
    pub prev_hidden: Option<&'a [f32]>,
    /// The gate's probability, when the exit has a gate.
    pub gate: Option<f32>,
    /// Top tokens of the earlier exit points for this token, in order.
    pub earlier: &'a [u32],
}

/// Top-1 token, its probability and the runner-up's probability.
pub fn top2(probs: &[f32]) -> (u32, f32, f32) {
    let (mut best, mut p1, mut p2) = (0u32, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &p) in probs.iter().enumerate() {
        if p > p1 {
            p2 = p1;
            p1 = p;
            best = i as u32;
        } else if p > p2 {
            p2 = p;
        }
    }
    (best, p1, p2.max(0.0))
}

/// Entropy in nats.
pub fn entropy(probs: &[f32]) -> f64 {
    probs
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -(p as f64) * (p as f64).ln())
        .sum()
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        dot += x as f64 * y as f64;
        na += x as f64 * x as f64;
        nb += y as f64 * y as f64;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// Softmax in f64 for accuracy, returned as f32.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / sum) as f32).collect()
}

impl ExitRule {
    /// Whether the rule needs the full model's token (only `Oracle`).
    pub fn is_oracle(&self) -> bool {
        matches!(self, ExitRule::Oracle)
    }

    /// Whether the rule reads learned gates.
    pub fn needs_gate(&self) -> bool {
        match self {
            ExitRule::Gate(_) => true,
            ExitRule::Any(rs) | ExitRule::All(rs) => rs.iter().any(ExitRule::needs_gate),
            _ => false,
        }
    }

    /// Checks thresholds and nesting; `Oracle` stands alone.
    pub fn validate(&self) -> Result<(), String> {
        let unit = |name: &str, t: f64| {
            if (0.0..=1.0).contains(&t) {
                Ok(())
            } else {
                Err(format!("{name} threshold {t} is outside 0..=1"))
            }
        };
        match self {
            ExitRule::Never | ExitRule::Oracle => Ok(()),
            ExitRule::Confidence(t) => unit("Confidence", *t),
            ExitRule::Margin(t) => unit("Margin", *t),
            ExitRule::Gate(t) => unit("Gate", *t),
            ExitRule::Saturation(t) => {
                if (-1.0..=1.0).contains(t) {
                    Ok(())
                } else {
                    Err(format!("Saturation threshold {t} is outside -1..=1"))
                }
            }
            ExitRule::Entropy(t) => {
                if *t >= 0.0 && t.is_finite() {
                    Ok(())
                } else {
                    Err(format!(
                        "Entropy threshold {t} must be a non-negative number"
                    ))
                }
            }
            ExitRule::Patience(k) => {
                if *k >= 1 {
                    Ok(())
                } else {
                    Err("Patience needs at least 1".into())
                }
            }
            ExitRule::Any(rs) | ExitRule::All(rs) => {
                if rs.is_empty() {
                    return Err("Any/All need at least one rule".into());
                }
                for r in rs {
                    if r.is_oracle() {
                        return Err("Oracle cannot be combined with other rules".into());
                    }
                    r.validate()?;
                }
                Ok(())
            }
        }
    }

    /// Whether the token exits here, and the signal judged by (for `Any`/`All`, the first
    /// rule's). `Oracle` never fires here: the runtime decides it after the full model ran.
    pub fn decide(&self, v: &ExitView<'_>) -> (bool, f64) {
        match self {
            ExitRule::Never => (false, top2(v.probs).1 as f64),
            ExitRule::Oracle => (false, top2(v.probs).1 as f64),
            ExitRule::Confidence(t) => {
                let p = top2(v.probs).1 as f64;
                (p >= *t, p)
            }
            ExitRule::Margin(t) => {
                let (_, p1, p2) = top2(v.probs);
                let m = (p1 - p2) as f64;
                (m >= *t, m)
            }
            ExitRule::Entropy(t) => {
                let h = entropy(v.probs);
                (h <= *t, h)
            }
            ExitRule::Patience(k) => {
                let tok = top2(v.probs).0;
                let run = 1 + v.earlier.iter().rev().take_while(|&&e| e == tok).count();
                (run >= *k, run as f64)
            }
            ExitRule::Saturation(t) => {
                let c = v.prev_hidden.map_or(0.0, |p| cosine(v.hidden, p));
                (v.prev_hidden.is_some() && c >= *t, c)
            }
            ExitRule::Gate(t) => {
                let g = v.gate.unwrap_or(0.0) as f64;
                (v.gate.is_some() && g >= *t, g)
            }
            ExitRule::Any(rs) => {
                let results: Vec<(bool, f64)> = rs.iter().map(|r| r.decide(v)).collect();
                let signal = results.first().map_or(0.0, |r| r.1);
                (results.iter().any(|r| r.0), signal)
            }
            ExitRule::All(rs) => {
                let results: Vec<(bool, f64)> = rs.iter().map(|r| r.decide(v)).collect();
                let signal = results.first().map_or(0.0, |r| r.1);
                (!results.is_empty() && results.iter().all(|r| r.0), signal)
            }
        }
    }

    /// The same rule with its (first) threshold set to `t`, for sweeps.
    pub fn with_threshold(&self, t: f64) -> ExitRule {
        match self {
            ExitRule::Confidence(_) => ExitRule::Confidence(t),
            ExitRule::Margin(_) => ExitRule::Margin(t),
            ExitRule::Entropy(_) => ExitRule::Entropy(t),
            ExitRule::Patience(_) => ExitRule::Patience(t.round().max(1.0) as usize),
            ExitRule::Saturation(_) => ExitRule::Saturation(t),
            ExitRule::Gate(_) => ExitRule::Gate(t),
            other => other.clone(),
        }
    }

    /// A rule by its sweep name (`confidence`, `margin`, `entropy`, `patience`,
    /// `saturation`, `gate`) at threshold `t`.
    pub fn by_name(name: &str, t: f64) -> Option<ExitRule> {
        Some(match name.to_ascii_lowercase().as_str() {
            "confidence" => ExitRule::Confidence(t),
            "margin" => ExitRule::Margin(t),
            "entropy" => ExitRule::Entropy(t),
            "patience" => ExitRule::Patience(t.round().max(1.0) as usize),
            "saturation" => ExitRule::Saturation(t),
            "gate" => ExitRule::Gate(t),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(probs: &'a [f32], earlier: &'a [u32]) -> ExitView<'a> {
        ExitView {
            probs,
            hidden: &[1.0, 0.0],
            prev_hidden: Some(&[1.0, 1.0]),
            gate: Some(0.7),
            earlier,
        }
    }

    #[test]
    fn rules_judge_their_signal() {
        let p = [0.7f32, 0.2, 0.1];
        let v = view(&p, &[0, 0]);
        assert!(ExitRule::Confidence(0.6).decide(&v).0);
        assert!(!ExitRule::Confidence(0.8).decide(&v).0);
        let (fire, m) = ExitRule::Margin(0.5).decide(&v);
        assert!(fire && (m - 0.5).abs() < 1e-6);
        let h = entropy(&p);
        assert!((h - 0.8018).abs() < 1e-3, "{h}");
        assert!(ExitRule::Entropy(0.81).decide(&v).0);
        assert!(!ExitRule::Entropy(0.8).decide(&v).0);
        assert_eq!(ExitRule::Patience(3).decide(&v), (true, 3.0));
        assert!(
            !ExitRule::Patience(3).decide(&view(&p, &[0, 1])).0,
            "the run of agreement is broken"
        );
        let (fire, c) = ExitRule::Saturation(0.7).decide(&v);
        assert!(fire && (c - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-9);
        assert!(ExitRule::Gate(0.6).decide(&v).0);
        assert!(!ExitRule::Gate(0.8).decide(&v).0);
        assert!(
            ExitRule::Any(vec![ExitRule::Gate(0.8), ExitRule::Confidence(0.6)])
                .decide(&v)
                .0
        );
        assert!(
            !ExitRule::All(vec![ExitRule::Gate(0.8), ExitRule::Confidence(0.6)])
                .decide(&v)
                .0
        );
        assert!(!ExitRule::Never.decide(&v).0);
        assert!(!ExitRule::Oracle.decide(&v).0);
    }

    #[test]
    fn bad_rules_are_rejected() {
        assert!(ExitRule::Confidence(1.5).validate().is_err());
        assert!(ExitRule::Patience(0).validate().is_err());
        assert!(ExitRule::Any(vec![ExitRule::Oracle]).validate().is_err());
        assert!(ExitRule::Any(vec![]).validate().is_err());
        assert!(ExitRule::All(vec![ExitRule::Margin(0.1)])
            .validate()
            .is_ok());
    }

    #[test]
    fn softmax_sums_to_one() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        let s: f32 = p.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert_eq!(top2(&p).0, 2);
    }
}
