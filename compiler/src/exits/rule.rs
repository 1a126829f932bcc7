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
    /// PABEE's patience `t`: the top token has stayed unchanged over the last `t` exit
    /// points, i.e. this exit point and the `t` before it (`t + 1` heads) agree.
    Patience(usize),
    /// Cosine similarity between the hidden state after the exit's layer and the one after
    /// the layer below it (the embeddings for an exit after layer 1) ≥ threshold: CALM's and
    /// MuE's state saturation, between consecutive *layers*.
    Saturation(f64),
    /// The exit's learned consistency classifier (CALM-style: a linear gate on the exit's
    /// hidden state, trained to predict that the exit's token equals the final one) gives a
    /// probability ≥ threshold (needs `InsertExits(gate: true)` and trained gates).
    Gate(f64),
    /// CALM's decaying threshold over a confidence-type rule (`Confidence`, `Margin`,
    /// `Saturation`, `Gate`): for generated token `t` of at most `N`, the rule's threshold
    /// λ becomes clip₀¹(0.9·λ + 0.1·e^(−τ·t/N)).
    Decaying { rule: Box<ExitRule>, tau: f64 },
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
    /// The residual stream one layer below this exit point (the embeddings for an exit
    /// after layer 1), when the rule reads it.
    pub prev_hidden: Option<&'a [f32]>,
    /// The gate's probability, when the exit has a gate.
    pub gate: Option<f32>,
    /// Top tokens of the earlier exit points for this token, in order.
    pub earlier: &'a [u32],
    /// The token's index among the request's generated tokens (0 for the first).
    pub index: usize,
    /// The most tokens the request may generate (CALM's `N`).
    pub max_tokens: usize,
}

/// CALM's decayed threshold for generated token `t` of at most `n`:
/// clip₀¹(0.9·λ + 0.1·e^(−τ·t/n)).
pub fn decayed_threshold(lambda: f64, tau: f64, t: usize, n: usize) -> f64 {
    let frac = t as f64 / n.max(1) as f64;
    (0.9 * lambda + 0.1 * (-tau * frac).exp()).clamp(0.0, 1.0)
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
            ExitRule::Decaying { rule, .. } => rule.needs_gate(),
            ExitRule::Any(rs) | ExitRule::All(rs) => rs.iter().any(ExitRule::needs_gate),
            _ => false,
        }
    }

    /// Whether the rule reads the hidden state one layer below the exit (saturation).
    pub fn needs_previous_layer(&self) -> bool {
        match self {
            ExitRule::Saturation(_) => true,
            ExitRule::Decaying { rule, .. } => rule.needs_previous_layer(),
            ExitRule::Any(rs) | ExitRule::All(rs) => rs.iter().any(ExitRule::needs_previous_layer),
            _ => false,
        }
    }

    /// The rule's threshold, for rules that have one.
    pub fn threshold(&self) -> Option<f64> {
        match self {
            ExitRule::Confidence(t)
            | ExitRule::Margin(t)
            | ExitRule::Entropy(t)
            | ExitRule::Saturation(t)
            | ExitRule::Gate(t) => Some(*t),
            ExitRule::Patience(k) => Some(*k as f64),
            ExitRule::Decaying { rule, .. } => rule.threshold(),
            _ => None,
        }
    }

    /// Whether a larger threshold makes the rule exit less often (every thresholded rule but
    /// `Entropy`, whose threshold is an upper bound).
    pub fn larger_is_stricter(&self) -> bool {
        match self {
            ExitRule::Entropy(_) => false,
            ExitRule::Decaying { rule, .. } => rule.larger_is_stricter(),
            _ => true,
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
            ExitRule::Decaying { rule, tau } => {
                if !(tau.is_finite() && *tau >= 0.0) {
                    return Err(format!(
                        "Decaying's tau {tau} must be a non-negative number"
                    ));
                }
                match **rule {
                    ExitRule::Confidence(_)
                    | ExitRule::Margin(_)
                    | ExitRule::Saturation(_)
                    | ExitRule::Gate(_) => rule.validate(),
                    _ => Err(format!(
                        "Decaying applies to Confidence, Margin, Saturation or Gate, not {rule:?}"
                    )),
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
                let unchanged = v.earlier.iter().rev().take_while(|&&e| e == tok).count();
                (unchanged >= *k, unchanged as f64)
            }
            ExitRule::Saturation(t) => {
                let c = v.prev_hidden.map_or(0.0, |p| cosine(v.hidden, p));
                (v.prev_hidden.is_some() && c >= *t, c)
            }
            ExitRule::Decaying { rule, tau } => {
                let lambda = rule.threshold().unwrap_or(0.0);
                let t = decayed_threshold(lambda, *tau, v.index, v.max_tokens);
                rule.with_threshold(t).decide(v)
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
            ExitRule::Decaying { rule, tau } => ExitRule::Decaying {
                rule: Box::new(rule.with_threshold(t)),
                tau: *tau,
            },
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn view<'a>(probs: &'a [f32], earlier: &'a [u32]) -> ExitView<'a> {
        ExitView {
            probs,
            hidden: &[1.0, 0.0],
            prev_hidden: Some(&[1.0, 1.0]),
            gate: Some(0.7),
            earlier,
            index: 0,
            max_tokens: 10,
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
        // PABEE: patience t exits once the prediction stayed unchanged t times (t + 1 heads
        // agree): two earlier heads agree with this one, so 2 is met and 3 is not.
        assert_eq!(ExitRule::Patience(2).decide(&v), (true, 2.0));
        assert_eq!(ExitRule::Patience(3).decide(&v), (false, 2.0));
        assert_eq!(ExitRule::Patience(1).decide(&view(&p, &[])), (false, 0.0));
        assert_eq!(
            ExitRule::Patience(1).decide(&view(&p, &[0, 1])),
            (false, 0.0),
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
    fn calm_decays_the_threshold_over_tokens() {
        // Hand-computed: 0.9 * 0.9 + 0.1 * e^0 = 0.91 at t = 0; at t = N/2 with tau = 4,
        // 0.81 + 0.1 * e^-2 = 0.823534; at t = N, 0.81 + 0.1 * e^-4 = 0.811832.
        assert!((decayed_threshold(0.9, 4.0, 0, 10) - 0.91).abs() < 1e-12);
        assert!((decayed_threshold(0.9, 4.0, 5, 10) - 0.823_533_528).abs() < 1e-8);
        assert!((decayed_threshold(0.9, 4.0, 10, 10) - 0.811_831_564).abs() < 1e-8);
        // Clipped to [0, 1].
        assert_eq!(decayed_threshold(1.2, 0.0, 3, 10), 1.0);
        let p = [0.82f32, 0.1, 0.08];
        let rule = ExitRule::Decaying {
            rule: Box::new(ExitRule::Confidence(0.9)),
            tau: 4.0,
        };
        let mut v = view(&p, &[]);
        v.index = 0;
        assert!(!rule.decide(&v).0, "0.82 < 0.91 at the first token");
        v.index = 10;
        assert!(rule.decide(&v).0, "0.82 >= 0.8118 at the last token");
        assert!(rule.validate().is_ok());
        assert!(ExitRule::Decaying {
            rule: Box::new(ExitRule::Entropy(0.3)),
            tau: 1.0
        }
        .validate()
        .is_err());
        assert_eq!(
            rule.with_threshold(0.5),
            ExitRule::Decaying {
                rule: Box::new(ExitRule::Confidence(0.5)),
                tau: 4.0
            }
        );
    }

    #[test]
    fn rules_read_from_ron() {
        let r: ExitRule = ron::from_str("Decaying(rule: Confidence(0.9), tau: 4.0)").unwrap();
        assert_eq!(
            r,
            ExitRule::Decaying {
                rule: Box::new(ExitRule::Confidence(0.9)),
                tau: 4.0
            }
        );
        assert!(ron::from_str::<ExitRule>("Decaying(rule: Confidence(0.9))").is_err());
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
