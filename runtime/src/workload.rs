//! Workloads: when requests arrive and how long their prompts and outputs are, seeded.
//!
//! ```ron
//! Workload(
//!     requests: 64,
//!     arrivals: Poisson(rate_per_s: 20.0),   // or AllAtOnce, or Trace(file: "arrivals.json")
//!     prompt_len: Uniform(min: 8, max: 32),  // or Fixed(16)
//!     output_len: Fixed(16),
//!     seed: 0,
//! )
//! ```

use anyhow::{bail, Context};
use exitgraph_compiler::synth::SplitMix64;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A length distribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Length {
    Fixed(usize),
    /// Uniform over `min..=max`.
    Uniform {
        min: usize,
        max: usize,
    },
}

impl Length {
    fn sample(&self, rng: &mut SplitMix64) -> usize {
        match *self {
            Length::Fixed(n) => n,
            Length::Uniform { min, max } => min + rng.below(max.saturating_sub(min) + 1),
        }
    }

    fn check(&self, field: &str) -> anyhow::Result<()> {
        match *self {
            Length::Fixed(0) => bail!("{field}: lengths must be at least 1"),
            Length::Uniform { min, max } if min == 0 || max < min => {
                bail!("{field}: Uniform needs 1 <= min <= max, got {min}..={max}")
            }
            _ => Ok(()),
        }
    }
}

/// When requests arrive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Arrivals {
    /// Every request at time 0.
    AllAtOnce,
    /// Exponential gaps with this mean rate.
    Poisson { rate_per_s: f64 },
    /// Arrival times in seconds from a JSON list, relative to the workload file.
    Trace { file: String },
}

/// A workload file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub requests: usize,
    pub arrivals: Arrivals,
    pub prompt_len: Length,
    pub output_len: Length,
    #[serde(default)]
    pub seed: u64,
}

/// One request of a workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestSpec {
    pub id: usize,
    pub arrival_s: f64,
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    /// Teacher forcing: when not empty, the request's tokens are these (one per step, at
    /// most `max_new_tokens`) instead of sampled ones, and their log-likelihood under the
    /// distribution that produced each step is summed (perplexity studies).
    #[serde(default)]
    pub forced: Vec<u32>,
    /// The request's own depth strategy; `None` follows the runtime's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<exitgraph_compiler::exits::Depth>,
}

impl Workload {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        exitgraph_compiler::ron_file::read(path)
    }

    /// The requests, with prompts of random ids below `vocab`; `base` resolves trace files.
    pub fn requests(&self, vocab: usize, base: &Path) -> anyhow::Result<Vec<RequestSpec>> {
        if self.requests == 0 {
            bail!("requests: a workload needs at least 1 request");
        }
        self.prompt_len.check("prompt_len")?;
        self.output_len.check("output_len")?;
        let mut rng = SplitMix64::new(self.seed);
        let times: Vec<f64> = match &self.arrivals {
            Arrivals::AllAtOnce => vec![0.0; self.requests],
            Arrivals::Poisson { rate_per_s } => {
                if !(*rate_per_s > 0.0 && rate_per_s.is_finite()) {
                    bail!("arrivals: rate_per_s must be positive, got {rate_per_s}");
                }
                let mut t = 0.0;
                (0..self.requests)
                    .map(|_| {
                        let u = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                        t += -u.ln() / rate_per_s;
                        t
                    })
                    .collect()
            }
            Arrivals::Trace { file } => {
                let path = base.join(file);
                let at = || format!("arrivals: Trace(file: {file:?}): {}", path.display());
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("{}: cannot read", at()))?;
                let mut times: Vec<f64> = serde_json::from_str(&text).with_context(|| {
                    format!("{}: expected a JSON list of arrival times in seconds", at())
                })?;
                if let Some(t) = times.iter().find(|t| !(t.is_finite() && **t >= 0.0)) {
                    bail!(
                        "{}: arrival times must be finite and non-negative, got {t}",
                        at()
                    );
                }
                if times.len() < self.requests {
                    bail!(
                        "{}: the trace lists {} arrival times, the workload has {} requests",
                        at(),
                        times.len(),
                        self.requests
                    );
                }
                times.sort_by(f64::total_cmp);
                times.truncate(self.requests);
                times
            }
        };
        Ok(times
            .into_iter()
            .enumerate()
            .map(|(id, arrival_s)| {
                let plen = self.prompt_len.sample(&mut rng);
                let prompt = (0..plen).map(|_| rng.below(vocab) as u32).collect();
                RequestSpec {
                    id,
                    arrival_s,
                    prompt,
                    max_new_tokens: self.output_len.sample(&mut rng),
                    forced: Vec::new(),
                    depth: None,
                }
            })
            .collect())
    }
}
