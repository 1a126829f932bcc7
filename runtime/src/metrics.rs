//! Serving metrics: time to first token, time between tokens, end-to-end latency
//! (p50/p95/p99), throughput, batch occupancy over time.

use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// p50, p95 and p99 of a sample, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `seconds`.
    pub fn of(seconds: &[f64]) -> Self {
        let mut v: Vec<f64> = seconds.iter().map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1]
        };
        Percentiles {
            p50_ms: at(0.50),
            p95_ms: at(0.95),
            p99_ms: at(0.99),
        }
    }
}

/// One request's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestOutcome {
    pub id: usize,
    pub arrival_s: f64,
    pub prompt_tokens: usize,
    /// Token ids (empty from the simulated executor).
    pub tokens: Vec<u32>,
    /// Tokens generated.
    pub produced: usize,
    pub first_token_s: Option<f64>,
    pub finish_s: Option<f64>,
    /// Why the request did not complete.
    pub failed: Option<String>,
    /// Per generated token: how deep it ran.
    #[serde(default)]
    pub stats: Vec<TokenStat>,
    /// Sum of the forced tokens' negative log-likelihoods (nats; 0 without forcing).
    #[serde(default)]
    pub nll: f64,
    /// The first forced token's negative log-likelihood (part of `nll`; the prompt's pass
    /// scores it, so it never depends on adaptive depth).
    #[serde(default)]
    pub first_nll: f64,
    /// GemFilter's kept prompt positions, in order (real executor; the model ran on these).
    #[serde(default)]
    pub selected: Option<Vec<usize>>,
    /// GemFilter's filter-layer score of every prompt position, before pooling (real
    /// executor).
    #[serde(default)]
    pub selection_scores: Option<Vec<f32>>,
    /// Seconds of GemFilter's select call for this request (shared with the requests
    /// selected in the same call).
    #[serde(default)]
    pub selection_s: Option<f64>,
    /// Self-speculative decoding's counts for this request (its cycles, drafts, kept drafts
    /// and time split), when it decoded self-speculatively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<SpecCounts>,
}

/// How a self-speculative token came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Speculated {
    /// Drafted, and the full model agreed (greedy) or speculative sampling accepted it.
    Accepted,
    /// The full model's token in place of a rejected draft.
    Rejected,
    /// The full model's token after every draft of the cycle was accepted (or when there
    /// was no room to draft).
    Bonus,
}

/// Counts of one request's (or a run's) self-speculative cycles. They describe the cycles as
/// run: a cycle's tokens after an end-of-sequence token, which the request drops, are still
/// counted in `produced` (and, if drafts, in `accepted`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpecCounts {
    /// Verification calls (one per cycle).
    pub cycles: usize,
    /// Tokens drafted.
    pub drafted: usize,
    /// Drafted tokens kept.
    pub accepted: usize,
    /// Tokens the cycles produced (accepted drafts and the full model's tokens).
    pub produced: usize,
    /// Tokens that ran the shallow layers (every draft, and each cycle's first token).
    pub shallow_tokens: usize,
    /// Seconds in drafting calls (shared by the rows of a call).
    pub draft_s: f64,
    /// Seconds in verification calls (shared by the rows of a call).
    pub verify_s: f64,
}

impl SpecCounts {
    /// Share of drafted tokens kept.
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }

    /// Tokens produced per verification call.
    pub fn tokens_per_cycle(&self) -> f64 {
        if self.cycles == 0 {
            0.0
        } else {
            self.produced as f64 / self.cycles as f64
        }
    }

    pub fn add(&mut self, other: &SpecCounts) {
        self.cycles += other.cycles;
        self.drafted += other.drafted;
        self.accepted += other.accepted;
        self.produced += other.produced;
        self.shallow_tokens += other.shallow_tokens;
        self.draft_s += other.draft_s;
        self.verify_s += other.verify_s;
    }
}

/// How deep one generated token ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStat {
    /// The exit point that produced it (layers its hidden state went through).
    pub exit_layer: u16,
    /// Transformer layers it ran.
    pub layers_run: u16,
    /// Exit heads evaluated for it.
    pub heads: u16,
    /// Layers whose keys and values were filled from its exit state.
    pub filled: u16,
    /// The model's own final norm and LM head produced it (full depth, SkipDecode), not an
    /// exit head; its cost is charged.
    #[serde(default)]
    pub final_head: bool,
    /// Under self-speculative decoding: whether it was a kept draft or the full model's
    /// token after the drafts (the full model produced every token either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculated: Option<Speculated>,
}

/// The summary `serve` prints and writes as JSON.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServeReport {
    pub policy: String,
    pub executor: String,
    /// Where the simulated executor's exit depths came from, when it simulated exits
    /// (simulated exits, not decided by a model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated_exits: Option<String>,
    /// The keys and values of the layers an exiting token skipped: filled or absent.
    #[serde(default)]
    pub skipped_kv: crate::sim_exits::SkippedKv,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    pub generated_tokens: usize,
    pub steps: u64,
    pub makespan_s: f64,
    pub throughput_tok_s: f64,
    pub ttft: Percentiles,
    pub tbt: Percentiles,
    pub e2e: Percentiles,
    pub mean_batch: f64,
    /// Share of the makespan the executor was busy.
    pub busy_share: f64,
    /// Share of the executor's busy time spent in each stage.
    pub stage_busy_share: Vec<(String, f64)>,
    /// Mean layers a generated token ran (adaptive depth lowers it).
    #[serde(default)]
    pub mean_layers_run: f64,
    /// Busy seconds of decode-only steps (no prompt in the step), exit decisions and state
    /// copying included. Under static batching this is the time of the tokens after each
    /// request's first; under continuous batching, decode tokens that share a step with a
    /// prompt are not in it.
    #[serde(default)]
    pub decode_busy_s: f64,
    /// (clock time, sequences in the step) for every step.
    pub occupancy: Vec<(f64, usize)>,
    /// Per step (as `occupancy`), the sequences at each stage: under looped depth-wise
    /// batching, the rows at each loop iteration.
    #[serde(default)]
    pub stage_rows: Vec<Vec<usize>>,
    /// Mean sequences per step at each stage.
    #[serde(default)]
    pub mean_stage_rows: Vec<f64>,
    /// Self-speculative decoding's counts over the completed requests, when any decoded
    /// self-speculatively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<SpecCounts>,
}

impl ServeReport {
    pub fn from_outcomes(
        outcomes: &[RequestOutcome],
        steps: u64,
        busy_s: f64,
        occupancy: Vec<(f64, usize)>,
    ) -> Self {
        let done: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.failed.is_none()).collect();
        let first_arrival = outcomes
            .iter()
            .map(|o| o.arrival_s)
            .fold(f64::INFINITY, f64::min);
        let last_finish = done.iter().filter_map(|o| o.finish_s).fold(0.0, f64::max);
        let makespan = (last_finish - first_arrival.min(last_finish)).max(0.0);
        let generated: usize = done.iter().map(|o| o.produced).sum();
        let ttft: Vec<f64> = done
            .iter()
            .filter_map(|o| o.first_token_s.map(|t| t - o.arrival_s))
            .collect();
        let e2e: Vec<f64> = done
            .iter()
            .filter_map(|o| o.finish_s.map(|t| t - o.arrival_s))
            .collect();
        let tbt: Vec<f64> = done
            .iter()
            .filter_map(|o| match (o.first_token_s, o.finish_s) {
                (Some(a), Some(b)) if o.produced > 1 => Some((b - a) / (o.produced - 1) as f64),
                _ => None,
            })
            .collect();
        let mean_batch = if occupancy.is_empty() {
            0.0
        } else {
            occupancy.iter().map(|(_, b)| *b as f64).sum::<f64>() / occupancy.len() as f64
        };
        ServeReport {
            policy: String::new(),
            executor: String::new(),
            simulated_exits: None,
            skipped_kv: crate::sim_exits::SkippedKv::Filled,
            requests: outcomes.len(),
            completed: done.len(),
            failed: outcomes.len() - done.len(),
            generated_tokens: generated,
            steps,
            makespan_s: makespan,
            throughput_tok_s: if makespan > 0.0 {
                generated as f64 / makespan
            } else {
                0.0
            },
            ttft: Percentiles::of(&ttft),
            tbt: Percentiles::of(&tbt),
            e2e: Percentiles::of(&e2e),
            mean_batch,
            stage_busy_share: Vec::new(),
            decode_busy_s: 0.0,
            mean_layers_run: {
                let stats: Vec<&TokenStat> = done.iter().flat_map(|o| &o.stats).collect();
                stats.iter().map(|s| s.layers_run as f64).sum::<f64>() / stats.len().max(1) as f64
            },
            busy_share: if makespan > 0.0 {
                (busy_s / makespan).min(1.0)
            } else {
                0.0
            },
            occupancy,
            stage_rows: Vec::new(),
            mean_stage_rows: Vec::new(),
            speculative: done.iter().filter_map(|o| o.speculative.as_ref()).fold(
                None,
                |sum: Option<SpecCounts>, c| {
                    let mut sum = sum.unwrap_or_default();
                    sum.add(c);
                    Some(sum)
                },
            ),
        }
    }

    /// Sets the rows per stage of every step, and their means.
    pub fn set_stage_rows(&mut self, stage_rows: Vec<Vec<usize>>) {
        let stages = stage_rows.iter().map(Vec::len).max().unwrap_or(0);
        let steps = stage_rows.len().max(1) as f64;
        self.mean_stage_rows = (0..stages)
            .map(|s| {
                stage_rows
                    .iter()
                    .map(|r| r.get(s).copied().unwrap_or(0) as f64)
                    .sum::<f64>()
                    / steps
            })
            .collect();
        self.stage_rows = stage_rows;
    }

    /// The summary as an aligned table.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "policy           {} ({} executor)",
            self.policy, self.executor
        );
        if let Some(exits) = &self.simulated_exits {
            let given = if self.executor == "real" {
                "given"
            } else {
                "simulated"
            };
            let _ = writeln!(s, "exits            {given}: {exits}");
        }
        if self.skipped_kv == crate::sim_exits::SkippedKv::Absent {
            let _ = writeln!(
                s,
                "skipped layers   keys and values absent, not filled (later tokens attend \
                 there to the positions present)"
            );
        }
        let _ = writeln!(
            s,
            "requests         {} completed, {} failed",
            self.completed, self.failed
        );
        let _ = writeln!(
            s,
            "generated        {} tokens in {} steps",
            self.generated_tokens, self.steps
        );
        // A simulated fast machine can serve a workload in well under a millisecond.
        let _ = if self.makespan_s > 0.0 && self.makespan_s < 0.1 {
            writeln!(s, "makespan         {:.3} ms", self.makespan_s * 1e3)
        } else {
            writeln!(s, "makespan         {:.3} s", self.makespan_s)
        };
        if self.mean_layers_run > 0.0 {
            let _ = writeln!(
                s,
                "layers run       {:.2} per generated token",
                self.mean_layers_run
            );
        }
        let _ = writeln!(s, "throughput       {:.1} tokens/s", self.throughput_tok_s);
        let _ = writeln!(
            s,
            "mean batch       {:.2} sequences; executor busy {:.0}%",
            self.mean_batch,
            100.0 * self.busy_share
        );
        if self.stage_busy_share.len() > 1 {
            let parts: Vec<String> = self
                .stage_busy_share
                .iter()
                .map(|(name, share)| format!("{name} {:.0}%", 100.0 * share))
                .collect();
            let _ = writeln!(s, "stage busy       {}", parts.join(", "));
        }
        if self.mean_stage_rows.len() > 1 {
            let parts: Vec<String> = self
                .mean_stage_rows
                .iter()
                .enumerate()
                .map(|(i, r)| format!("{i}: {r:.2}"))
                .collect();
            let _ = writeln!(s, "rows per stage   {} (mean per step)", parts.join(", "));
        }
        if let Some(c) = &self.speculative {
            let _ = writeln!(
                s,
                "speculation      {} cycles, {} drafted, {:.1}% accepted, {:.2} tokens per verification",
                c.cycles,
                c.drafted,
                100.0 * c.acceptance(),
                c.tokens_per_cycle()
            );
            let _ = writeln!(
                s,
                "                 drafting {:.3} s, verifying {:.3} s",
                c.draft_s, c.verify_s
            );
        }
        let _ = writeln!(
            s,
            "{:<16} {:>10} {:>10} {:>10}",
            "latency (ms)", "p50", "p95", "p99"
        );
        for (name, p) in [
            ("time to first", &self.ttft),
            ("between tokens", &self.tbt),
            ("end to end", &self.e2e),
        ] {
            let _ = writeln!(
                s,
                "{:<16} {:>10.1} {:>10.1} {:>10.1}",
                name, p.p50_ms, p.p95_ms, p.p99_ms
            );
        }
        s
    }
}

/// One metric over repeated runs: its median (the mean of the middle two for an even count)
/// and its range.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The median and range of `values` (all zero when there are none).
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Spread {
                median: 0.0,
                min: 0.0,
                max: 0.0,
            };
        }
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }

    /// The range relative to the median, (max − min) / median.
    pub fn relative(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median
        }
    }

    /// Whether `x` lies within the range.
    pub fn contains(&self, x: f64) -> bool {
        self.min <= x && x <= self.max
    }
}

/// The same workload served several times (`serve --reps N`): the headline metrics' medians
/// and ranges, and every run's report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RepeatedReport {
    pub runs: usize,
    pub throughput_tok_s: Spread,
    pub makespan_s: Spread,
    pub ttft_p50_ms: Spread,
    pub tbt_p50_ms: Spread,
    pub e2e_p50_ms: Spread,
    pub e2e_p99_ms: Spread,
    pub reports: Vec<ServeReport>,
}

impl RepeatedReport {
    pub fn of(reports: Vec<ServeReport>) -> Self {
        let spread =
            |f: fn(&ServeReport) -> f64| Spread::of(&reports.iter().map(f).collect::<Vec<_>>());
        RepeatedReport {
            runs: reports.len(),
            throughput_tok_s: spread(|r| r.throughput_tok_s),
            makespan_s: spread(|r| r.makespan_s),
            ttft_p50_ms: spread(|r| r.ttft.p50_ms),
            tbt_p50_ms: spread(|r| r.tbt.p50_ms),
            e2e_p50_ms: spread(|r| r.e2e.p50_ms),
            e2e_p99_ms: spread(|r| r.e2e.p99_ms),
            reports,
        }
    }

    /// The medians and ranges as a table.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<22} {:>10} {:>10} {:>10} {:>8}",
            format!("over {} runs", self.runs),
            "median",
            "min",
            "max",
            "range"
        );
        for (name, m) in [
            ("throughput (tok/s)", &self.throughput_tok_s),
            ("makespan (s)", &self.makespan_s),
            ("time to first p50 (ms)", &self.ttft_p50_ms),
            ("between tokens p50 (ms)", &self.tbt_p50_ms),
            ("end to end p50 (ms)", &self.e2e_p50_ms),
            ("end to end p99 (ms)", &self.e2e_p99_ms),
        ] {
            let _ = writeln!(
                s,
                "{:<22} {:>10.3} {:>10.3} {:>10.3} {:>7.1}%",
                name,
                m.median,
                m.min,
                m.max,
                100.0 * m.relative()
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(|i| i as f64 / 1e3).collect();
        let p = Percentiles::of(&v);
        assert_eq!((p.p50_ms, p.p95_ms, p.p99_ms), (50.0, 95.0, 99.0));
    }

    #[test]
    fn rows_per_stage_by_hand() {
        let mut r = ServeReport::from_outcomes(&[], 0, 0.0, Vec::new());
        // Three steps: (2, 1), (0, 3), (4) with the second stage empty.
        r.set_stage_rows(vec![vec![2, 1], vec![0, 3], vec![4]]);
        assert_eq!(r.mean_stage_rows, vec![2.0, 4.0 / 3.0]);
        assert!(r.to_table().contains("rows per stage   0: 2.00, 1: 1.33"));
    }

    #[test]
    fn a_short_makespan_prints_in_milliseconds() {
        let mut r = ServeReport::from_outcomes(&[], 0, 0.0, Vec::new());
        r.makespan_s = 1.8e-4;
        assert!(
            r.to_table().contains("makespan         0.180 ms"),
            "{}",
            r.to_table()
        );
        r.makespan_s = 2.5;
        assert!(
            r.to_table().contains("makespan         2.500 s"),
            "{}",
            r.to_table()
        );
    }

    #[test]
    fn spreads_by_hand() {
        let odd = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        assert_eq!(odd.relative(), 1.0);
        let even = Spread::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!((even.median, even.min, even.max), (2.5, 1.0, 4.0));
        assert_eq!(even.relative(), 1.2);
        assert!(even.contains(1.0) && even.contains(4.0) && !even.contains(4.5));
        assert_eq!(Spread::of(&[]).relative(), 0.0);
        let reports: Vec<ServeReport> = [100.0, 120.0, 90.0]
            .iter()
            .map(|&t| ServeReport {
                throughput_tok_s: t,
                makespan_s: 1000.0 / t,
                ..ServeReport::default()
            })
            .collect();
        let r = RepeatedReport::of(reports);
        assert_eq!(r.runs, 3);
        assert_eq!(r.throughput_tok_s.median, 100.0);
        assert_eq!(r.makespan_s.median, 10.0);
        assert!((r.throughput_tok_s.relative() - 0.3).abs() < 1e-12);
        assert!(r.to_table().contains("over 3 runs"));
    }
}
