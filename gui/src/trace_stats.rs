//! A serving trace aggregated once, on load, into what the simulator view plots: throughput
//! and time between tokens over time, batch occupancy per layer, exit depths. Drawing reads
//! only these few hundred points, however long the trace.

use crate::heatmap::exit_histogram;
use exitgraph::runtime::trace::{read_trace, TraceRecord};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Most time bins a summary has.
pub const MAX_BINS: usize = 200;

/// The plotted series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceSummary {
    pub records: usize,
    pub sequences: usize,
    pub steps: usize,
    /// Model depth seen in the trace (largest layer run + 1, or largest exit layer).
    pub depth: usize,
    /// Clock time of the last token.
    pub end_s: f64,
    /// [time, tokens per second] per bin.
    pub throughput: Vec<[f64; 2]>,
    /// [time, mean ms between a sequence's consecutive tokens] per bin with such gaps.
    pub tbt_ms: Vec<[f64; 2]>,
    /// [time, mean sequences per step] per bin with steps.
    pub batch: Vec<[f64; 2]>,
    /// Per layer: [time, mean tokens per step that ran this layer].
    pub occupancy_by_layer: Vec<Vec<[f64; 2]>>,
    /// Tokens per exit depth (index = layers run).
    pub exit_histogram: Vec<u64>,
    /// p50, p95, p99 of the time between tokens, ms.
    pub tbt_percentiles: [f64; 3],
}

/// Reads a trace file written by `exitgraph serve --trace`.
pub fn load(path: &Path) -> anyhow::Result<Vec<TraceRecord>> {
    let mut out = Vec::new();
    for r in read_trace(path)? {
        out.push(r?);
    }
    if out.is_empty() {
        anyhow::bail!("{}: the trace has no records", path.display());
    }
    Ok(out)
}

struct Step {
    t: f64,
    batch: usize,
    per_layer: Vec<u32>,
}

/// Aggregates records (in any order).
pub fn summarize(records: &[TraceRecord]) -> TraceSummary {
    let depth = records
        .iter()
        .map(|r| {
            r.layers
                .iter()
                .map(|l| l.saturating_add(1))
                .max()
                .unwrap_or(0)
                .max(r.exit_layer)
        })
        .max()
        .unwrap_or(0)
        .min(4096);
    let end_s = records
        .iter()
        .map(|r| r.t_s)
        .filter(|t| t.is_finite())
        .fold(0.0, f64::max);

    // Steps: time, batch and tokens per layer.
    let mut steps: BTreeMap<u64, Step> = BTreeMap::new();
    for r in records {
        let s = steps.entry(r.step).or_insert_with(|| Step {
            t: r.t_s,
            batch: r.batch,
            per_layer: vec![0; depth],
        });
        s.batch = s.batch.max(r.batch);
        for &l in &r.layers {
            if let Some(c) = s.per_layer.get_mut(l) {
                *c += 1;
            }
        }
    }

    // Gaps between consecutive tokens of a sequence.
    let mut by_seq: HashMap<usize, Vec<(usize, f64)>> = HashMap::new();
    for r in records {
        by_seq.entry(r.seq).or_default().push((r.pos, r.t_s));
    }
    let mut gaps: Vec<(f64, f64)> = Vec::new();
    for toks in by_seq.values_mut() {
        toks.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        for w in toks.windows(2) {
            gaps.push((w[1].1, (w[1].1 - w[0].1) * 1e3));
        }
    }

    let bins = MAX_BINS.min(steps.len().max(1));
    let width = if end_s > 0.0 {
        end_s / bins as f64
    } else {
        1.0
    };
    let bin_of = |t: f64| -> usize {
        if t.is_finite() && t > 0.0 {
            ((t / width) as usize).min(bins - 1)
        } else {
            0
        }
    };
    let center = |b: usize| (b as f64 + 0.5) * width;

    let mut tokens = vec![0u64; bins];
    for r in records {
        tokens[bin_of(r.t_s)] += 1;
    }
    let throughput = tokens
        .iter()
        .enumerate()
        .map(|(b, &n)| [center(b), n as f64 / width])
        .collect();

    let mut gap_sum = vec![(0.0f64, 0u64); bins];
    for &(t, ms) in &gaps {
        let g = &mut gap_sum[bin_of(t)];
        g.0 += ms;
        g.1 += 1;
    }
    let tbt_ms = gap_sum
        .iter()
        .enumerate()
        .filter(|(_, g)| g.1 > 0)
        .map(|(b, g)| [center(b), g.0 / g.1 as f64])
        .collect();

    let mut step_count = vec![0u64; bins];
    let mut batch_sum = vec![0u64; bins];
    let mut layer_sum = vec![vec![0u64; bins]; depth];
    for s in steps.values() {
        let b = bin_of(s.t);
        step_count[b] += 1;
        batch_sum[b] += s.batch as u64;
        for (l, &c) in s.per_layer.iter().enumerate() {
            layer_sum[l][b] += u64::from(c);
        }
    }
    let per_step = |sums: &[u64]| -> Vec<[f64; 2]> {
        (0..bins)
            .filter(|&b| step_count[b] > 0)
            .map(|b| [center(b), sums[b] as f64 / step_count[b] as f64])
            .collect()
    };
    let batch = per_step(&batch_sum);
    let occupancy_by_layer = layer_sum.iter().map(|s| per_step(s)).collect();

    let mut gap_ms: Vec<f64> = gaps.iter().map(|g| g.1).collect();
    gap_ms.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        if gap_ms.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * gap_ms.len() as f64).ceil() as usize).clamp(1, gap_ms.len());
        gap_ms[rank - 1]
    };

    TraceSummary {
        records: records.len(),
        sequences: by_seq.len(),
        steps: steps.len(),
        depth,
        end_s,
        throughput,
        tbt_ms,
        batch,
        occupancy_by_layer,
        exit_histogram: exit_histogram(records.iter().map(|r| r.exit_layer), depth),
        tbt_percentiles: [pct(0.5), pct(0.95), pct(0.99)],
    }
}

/// A synthetic trace of `tokens` records over `layers` layers (for tests and frame-time
/// measurement): sequences of 20 tokens, 8 per step, every fifth token exiting early with
/// signals.
pub fn synthetic(tokens: usize, layers: usize) -> Vec<TraceRecord> {
    use exitgraph::runtime::trace::LayerSignal;
    let layers = layers.max(1);
    (0..tokens)
        .map(|i| {
            let seq = i / 20;
            let pos = 16 + i % 20;
            let step = (seq / 8 * 20 + i % 20) as u64;
            let exit = if i % 5 == 0 {
                layers.div_ceil(2)
            } else {
                layers
            };
            TraceRecord {
                speculated: None,
                seq,
                pos,
                token: None,
                step,
                t_s: step as f64 * 0.004,
                batch: 8,
                stages: vec!["all".into()],
                layers: (0..exit).collect(),
                exit_layer: exit,
                signals: (1..=exit)
                    .filter(|l| l % 2 == 0)
                    .map(|l| LayerSignal {
                        layer: l,
                        value: (i % 7) as f64 / 7.0 + l as f64 / layers as f64,
                        token: None,
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ten_thousand_tokens_aggregate_to_few_points() {
        let recs = synthetic(10_000, 6);
        let s = summarize(&recs);
        assert_eq!(s.records, 10_000);
        assert_eq!(s.sequences, 500);
        assert_eq!(s.depth, 6);
        assert!(s.throughput.len() <= MAX_BINS);
        assert_eq!(s.occupancy_by_layer.len(), 6);
        // Tokens are conserved by the throughput series.
        let width = s.end_s / s.throughput.len() as f64;
        let total: f64 = s.throughput.iter().map(|p| p[1] * width).sum();
        assert!((total - 10_000.0).abs() < 1e-6, "{total}");
        // Every fifth token exits after 3 layers.
        assert_eq!(s.exit_histogram[3], 2_000);
        assert_eq!(s.exit_histogram[6], 8_000);
        // Deeper layers see fewer tokens per step.
        let mean = |l: usize| {
            s.occupancy_by_layer[l].iter().map(|p| p[1]).sum::<f64>()
                / s.occupancy_by_layer[l].len() as f64
        };
        assert!(mean(0) > mean(5));
        // Consecutive tokens of a sequence are 4 ms apart.
        assert!((s.tbt_percentiles[0] - 4.0).abs() < 1e-9);
    }

    #[test]
    fn an_empty_or_odd_trace_does_not_panic() {
        let s = summarize(&[]);
        assert_eq!(s.records, 0);
        let mut r = synthetic(3, 2);
        r[0].t_s = f64::NAN;
        r[1].layers = vec![usize::MAX - 1];
        let s = summarize(&r);
        assert_eq!(s.records, 3);
    }

    #[test]
    fn a_bad_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(&p, "{\"seq\": 1}\n").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("t.jsonl:1"), "{e}");
        std::fs::write(&p, "").unwrap();
        assert!(load(&p).is_err());
        assert!(load(&dir.path().join("missing.jsonl")).is_err());
    }
}
