//! Threshold calibration with a statistical guarantee: Learn-then-Test (Angelopoulos et al.,
//! 2021) as CALM (Schuster et al., 2022) uses it.
//!
//! Each calibration example `i` has a risk `r_i ∈ [0, 1]` under a threshold (here: the share
//! of its exit-eligible tokens that differ from the full model's). For a tolerance `δ`, the
//! null hypothesis of a threshold is "its expected risk exceeds δ"; its p-value is the
//! Hoeffding-Bentkus bound on the mean risk `R̂` of `n` examples:
//!
//! p = min( exp(−n · h₁(min(R̂, δ), δ)),  e · P(Binomial(n, δ) ≤ ⌈n·R̂⌉) ),
//! h₁(a, b) = a·ln(a/b) + (1 − a)·ln((1 − a)/(1 − b)).
//!
//! Thresholds are tested in a fixed sequence, from the most conservative to the least, each at
//! level `ε`, stopping at the first that is not rejected; every threshold rejected before it
//! is valid together: with probability at least `1 − ε` over the calibration draw, each has
//! expected risk ≤ δ. The least conservative valid one is chosen.

/// The Kullback-Leibler divergence between Bernoulli(a) and Bernoulli(b).
fn h1(a: f64, b: f64) -> f64 {
    let mut t = 0.0;
    if a > 0.0 {
        t += a * (a / b).ln();
    }
    if a < 1.0 {
        t += (1.0 - a) * ((1.0 - a) / (1.0 - b)).ln();
    }
    t
}

/// P(Binomial(n, p) ≤ k), summed in log space.
pub fn binomial_cdf(k: usize, n: usize, p: f64) -> f64 {
    if k >= n {
        return 1.0;
    }
    if p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    // ln C(n, i), built up incrementally.
    let mut log_choose = 0.0f64;
    let mut total = 0.0;
    for i in 0..=k {
        if i > 0 {
            log_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        total += (log_choose + i as f64 * lp + (n - i) as f64 * lq).exp();
    }
    total.min(1.0)
}

/// The Hoeffding-Bentkus p-value of "the expected risk exceeds `delta`" given mean risk
/// `risk` over `n` examples. `⌈n·R̂⌉` is taken with a 1e-9 tolerance, so a mean risk that is a
/// whole number of examples' worth does not round up through floating-point error.
pub fn hoeffding_bentkus(risk: f64, delta: f64, n: usize) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let hoeffding = (-(n as f64) * h1(risk.min(delta), delta)).exp();
    let k = ((n as f64 * risk) - 1e-9).ceil().max(0.0) as usize;
    let bentkus = std::f64::consts::E * binomial_cdf(k, n, delta);
    hoeffding.min(bentkus).min(1.0)
}

/// Fixed-sequence testing: `p_values` in order from the most conservative hypothesis to the
/// least; returns how many are rejected at level `epsilon` before the first that is not (the
/// valid prefix's length).
pub fn fixed_sequence(p_values: &[f64], epsilon: f64) -> usize {
    p_values.iter().take_while(|&&p| p <= epsilon).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
    }

    #[test]
    fn binomial_cdf_matches_hand_sums() {
        // P(Bin(100, 0.05) <= 2) = 0.95^100 + 100·0.05·0.95^99 + 4950·0.05²·0.95^98.
        let want = 0.95f64.powi(100)
            + 100.0 * 0.05 * 0.95f64.powi(99)
            + 4950.0 * 0.0025 * 0.95f64.powi(98);
        assert!(close(binomial_cdf(2, 100, 0.05), want));
        assert_eq!(binomial_cdf(100, 100, 0.3), 1.0);
        assert!(close(binomial_cdf(0, 10, 0.5), 0.5f64.powi(10)));
    }

    #[test]
    fn hoeffding_bentkus_matches_hand_computed_values() {
        // R̂ = 0, δ = 0.05, n = 100: Hoeffding exp(-100·ln(1/0.95)) = 0.95^100 = 0.0059205;
        // Bentkus e·0.95^100 = 0.016094; the minimum is Hoeffding's.
        assert!(close(
            hoeffding_bentkus(0.0, 0.05, 100),
            0.005_920_529_220_334_054
        ));
        // R̂ = 0.02, δ = 0.05, n = 100: exp(-100·h1(0.02, 0.05)) = 0.29692 beats
        // e·P(Bin ≤ 2) = 0.32147.
        assert!(close(
            hoeffding_bentkus(0.02, 0.05, 100),
            0.296_918_951_167_002_5
        ));
        // R̂ = 0.02, δ = 0.1, n = 100: Bentkus e·P(Bin(100, 0.1) ≤ 2) = 0.0052867 beats
        // Hoeffding's 0.0059368.
        assert!(close(
            hoeffding_bentkus(0.02, 0.1, 100),
            0.005_286_744_607_654_359
        ));
        // A mean risk above the tolerance is never rejected.
        assert_eq!(hoeffding_bentkus(0.06, 0.05, 100), 1.0);
        assert_eq!(hoeffding_bentkus(0.0, 0.05, 0), 1.0);
    }

    #[test]
    fn fixed_sequence_stops_at_the_first_failure() {
        assert_eq!(fixed_sequence(&[0.001, 0.01, 0.2, 0.001], 0.05), 2);
        assert_eq!(fixed_sequence(&[0.3, 0.001], 0.05), 0);
        assert_eq!(fixed_sequence(&[0.01, 0.02], 0.05), 2);
    }
}
