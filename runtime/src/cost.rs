//! The simulated executor's cost model: step time as a linear function of the step's new
//! tokens, its attention work (Σ new tokens × context length) and its sequences, fitted by
//! least squares to steps measured on this machine (`exitgraph profile`).

use anyhow::{bail, Context};
use exitgraph_compiler::lower::{Program, Segment};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// One measured step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub tokens: usize,
    pub attention: usize,
    pub sequences: usize,
    /// Median seconds over the repetitions.
    pub seconds: f64,
    /// The repetitions' range relative to their median, (max − min) / median.
    #[serde(default)]
    pub spread: f64,
}

/// The fitted model and the samples it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    pub version: u32,
    /// Seconds: intercept, per new token, per unit of attention work, per sequence.
    pub coefficients: [f64; 4],
    pub samples: Vec<Sample>,
}

fn features(tokens: usize, attention: usize, sequences: usize) -> [f64; 4] {
    [1.0, tokens as f64, attention as f64, sequences as f64]
}

/// Solves the 4×4 normal equations by Gaussian elimination with partial pivoting.
fn solve(mut a: [[f64; 4]; 4], mut b: [f64; 4]) -> Option<[f64; 4]> {
    for col in 0..4 {
        let pivot = (col..4).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-18 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col];
        for row in col + 1..4 {
            let f = a[row][col] / pivot_row[col];
            for (v, p) in a[row].iter_mut().zip(pivot_row).skip(col) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; 4];
    for row in (0..4).rev() {
        let s: f64 = (row + 1..4).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

impl CostModel {
    /// Least-squares fit, each sample weighted by 1 / seconds so small and large steps count
    /// alike (relative error).
    pub fn fit(samples: Vec<Sample>) -> anyhow::Result<Self> {
        let mut ata = [[0.0; 4]; 4];
        let mut atb = [0.0; 4];
        for s in &samples {
            let f = features(s.tokens, s.attention, s.sequences);
            let w = 1.0 / (s.seconds * s.seconds).max(1e-12);
            for i in 0..4 {
                for j in 0..4 {
                    ata[i][j] += w * f[i] * f[j];
                }
                atb[i] += w * f[i] * s.seconds;
            }
        }
        let coefficients =
            solve(ata, atb).context("profile samples do not determine the cost model")?;
        Ok(CostModel {
            version: 1,
            coefficients,
            samples,
        })
    }

    /// Predicted seconds of a step.
    pub fn predict(&self, tokens: usize, attention: usize, sequences: usize) -> f64 {
        self.predict_layers(tokens as f64, attention as f64, sequences)
    }

    /// Predicted seconds of a step whose tokens run only part of the layers: `tokens` and
    /// `attention` are weighted by the share of the layers each token runs (the terms that
    /// scale with layers), while the intercept and the per-sequence term (the final norm and
    /// LM head at each sequence's last position, per-sequence overhead) are paid in full.
    pub fn predict_layers(&self, tokens: f64, attention: f64, sequences: usize) -> f64 {
        let f = [1.0, tokens, attention, sequences as f64];
        let t: f64 = f.iter().zip(&self.coefficients).map(|(a, b)| a * b).sum();
        t.max(1e-6)
    }

    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let m: CostModel = exitgraph_compiler::ron_file::read(path)?;
        if m.version != 1 {
            bail!(
                "{}: cost model version {} is not supported",
                path.display(),
                m.version
            );
        }
        Ok(m)
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let cfg = ron::ser::PrettyConfig::new()
            .new_line("\n".to_string())
            .struct_names(true);
        exitgraph_compiler::atomic::write_text(path, &ron::ser::to_string_pretty(self, cfg)?)
    }
}

/// Attention work of a step: Σ over sequences of new tokens × context after the step.
pub fn attention_work(shapes: &[(usize, usize)]) -> usize {
    shapes
        .iter()
        .map(|&(new, cached)| new * (cached + new))
        .sum()
}

/// Measures steps of many shapes (prefills of 1..=max_tokens tokens, decode batches of
/// 1..=max_batch sequences at several context lengths, and mixes) on `program`.
pub fn profile(
    program: &Program,
    reps: usize,
    max_tokens: usize,
    max_batch: usize,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<CostModel> {
    let max_ctx = program.graph().info.max_positions.min(1024);
    let mut shapes: Vec<Vec<(usize, usize)>> = Vec::new();
    let mut t = 1;
    while t <= max_tokens && t < max_ctx {
        shapes.push(vec![(t, 0)]);
        t *= 2;
    }
    for ctx in [8usize, 32, 96, 192] {
        if ctx + 2 >= max_ctx {
            continue;
        }
        let mut n = 1;
        while n <= max_batch {
            shapes.push(vec![(1, ctx); n]);
            n *= 2;
        }
        shapes.push(
            [
                vec![(16.min(max_ctx - ctx - 1), 0)],
                vec![(1, ctx); max_batch.max(1) / 2],
            ]
            .concat(),
        );
    }
    // Steps of a loaded server: several decodes at assorted contexts beside a prefill.
    let mut n = 2;
    while n <= max_batch {
        for (ctx, prefill) in [(16usize, 8usize), (48, 24), (96, 40)] {
            if ctx + n + prefill + 2 >= max_ctx {
                continue;
            }
            let decodes: Vec<(usize, usize)> = (0..n - 1)
                .map(|i| (1, ctx + (i * 7) % ctx.max(1)))
                .collect();
            shapes.push([decodes, vec![(prefill, 0)]].concat());
        }
        n *= 2;
    }
    let vocab = program.graph().info.vocab as u32;
    let mut samples = Vec::with_capacity(shapes.len());
    for (i, shape) in shapes.iter().enumerate() {
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            // Fill each cache to its context, then time the step.
            let mut caches: Vec<_> = shape.iter().map(|_| program.new_cache()).collect();
            let mut fill: Vec<Vec<u32>> = shape
                .iter()
                .map(|&(_, c)| (0..c as u32).map(|k| (k * 7 + 3) % vocab).collect())
                .collect();
            {
                let mut segs: Vec<Segment> = fill
                    .iter_mut()
                    .zip(caches.iter_mut())
                    .filter(|(ids, _)| !ids.is_empty())
                    .map(|(ids, cache)| Segment::new(ids, cache))
                    .collect();
                program.forward_ragged(&mut segs)?;
            }
            let new: Vec<Vec<u32>> = shape
                .iter()
                .map(|&(n, _)| (0..n as u32).map(|k| (k * 13 + 5) % vocab).collect())
                .collect();
            let mut segs: Vec<Segment> = new
                .iter()
                .zip(caches.iter_mut())
                .map(|(ids, cache)| Segment::new(ids, cache))
                .collect();
            let start = Instant::now();
            program.forward_ragged(&mut segs)?;
            times.push(start.elapsed().as_secs_f64());
        }
        let times = crate::metrics::Spread::of(&times);
        samples.push(Sample {
            tokens: shape.iter().map(|s| s.0).sum(),
            attention: attention_work(shape),
            sequences: shape.len(),
            seconds: times.median,
            spread: times.relative(),
        });
        progress(i + 1, shapes.len());
    }
    CostModel::fit(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_depth_scales_only_the_layer_terms() {
        let m = CostModel {
            version: 1,
            coefficients: [2e-3, 1e-4, 3e-7, 5e-5],
            samples: Vec::new(),
        };
        // One decode token at context 10 running half the layers: tokens 0.5, attention
        // 11 * 0.5 = 5.5; the intercept and the sequence's term in full:
        // 2e-3 + 0.5 * 1e-4 + 5.5 * 3e-7 + 5e-5 = 2.10165e-3.
        assert!((m.predict_layers(0.5, 5.5, 1) - 2.101_65e-3).abs() < 1e-12);
        // The whole step scaled by half would have been 1.0508e-3.
        assert!((m.predict(1, 11, 1) - 2.1533e-3).abs() < 1e-12);
    }

    #[test]
    fn fit_recovers_a_linear_cost() {
        let truth = [2e-3, 1e-4, 3e-7, 5e-5];
        let mut samples = Vec::new();
        for tokens in [1, 4, 16, 64] {
            for seqs in [1, 2, 8] {
                let attention = tokens * tokens * 3 + seqs * tokens * 11 + 5;
                let f = features(tokens, attention, seqs);
                let seconds = f.iter().zip(&truth).map(|(a, b)| a * b).sum();
                samples.push(Sample {
                    tokens,
                    attention,
                    sequences: seqs,
                    seconds,
                    spread: 0.0,
                });
            }
        }
        let m = CostModel::fit(samples).unwrap();
        for (a, b) in m.coefficients.iter().zip(&truth) {
            assert!((a - b).abs() < 1e-9 + 1e-6 * b.abs(), "{a} vs {b}");
        }
    }
}
