//! `exitgraph bench --exits`: decode speed of adaptive depth against the ideal speedup its
//! paths imply, on a random Llama (weights do not matter for speed, and fixed rules make
//! the paths deterministic).
//!
//! Each setting decodes one sequence through the runtime; its decode time is the runtime's
//! clock from the first to the last token (measured execution, the host-side exit decisions
//! and state copying included). Repetitions alternate the settings' order; each timed decode
//! runs on a freshly lowered program after an untimed warm-up, with no other setting's
//! program in memory. The table gives the ratio of median decode times and the range of the
//! per-repetition speedups. The
//! ideal speedup is the full path's FLOPs over the mean adaptive path's (layers run, exit
//! heads evaluated, keys and values filled from exit states; see [`crate::exits::cost`]).

use crate::bench::BenchOptions;
use crate::exits::cost::DepthCost;
use crate::exits::{Depth, ExitRule, SkipDecode};
use crate::lower::Program;
use crate::runtime::metrics::TokenStat;
use crate::runtime::policy::Batching;
use crate::runtime::workload::RequestSpec;
use crate::runtime::{Decoding, Executor, Runtime};
use crate::synth::write_random_llama;
use candle_core::{DType, Device};
use exitgraph_passes::{HeadKind, InsertExits, Pass, PassContext};
use std::fmt::Write;
use std::sync::Arc;

/// One setting's figures.
#[derive(Clone, Debug)]
pub struct ExitBenchRow {
    pub setting: String,
    pub layers_run: f64,
    pub heads_per_token: f64,
    pub decode_tokens_per_s: f64,
    /// Median decode time of the full model over this setting's.
    pub measured_speedup: f64,
    /// Lowest and highest of the per-repetition speedups (the noise).
    pub speedup_range: (f64, f64),
    pub ideal_speedup: f64,
}

/// The table.
#[derive(Clone, Debug)]
pub struct ExitBenchReport {
    pub params: usize,
    pub layers: usize,
    pub threads: usize,
    pub reps: usize,
    pub rows: Vec<ExitBenchRow>,
}

/// The median of `v` (0 when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A setting's speed against the full model's from per-repetition decode times (seconds per
/// token, repetition `i` of both timed back to back): the full model's median time over the
/// setting's median time, and the lowest and highest per-repetition ratio.
pub fn speedup(full: &[f64], setting: &[f64]) -> (f64, (f64, f64)) {
    let ratios: Vec<f64> = full
        .iter()
        .zip(setting)
        .map(|(b, x)| b / x.max(1e-12))
        .collect();
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let med = median(full.to_vec()) / median(setting.to_vec()).max(1e-12);
    (med, (lo, hi))
}

/// Decodes once; returns decode seconds per token and the decode tokens' stats.
fn decode_once(
    program: &Arc<Program>,
    prompt: &[u32],
    new: usize,
    depth: &Depth,
) -> anyhow::Result<(f64, Vec<TokenStat>)> {
    let request = RequestSpec {
        id: 0,
        arrival_s: 0.0,
        prompt: prompt.to_vec(),
        max_new_tokens: new,
        forced: Vec::new(),
        depth: None,
    };
    let (_, outcomes) = Runtime::new(
        program.clone(),
        Batching::Static { max_batch: 1 },
        Executor::Real,
        Decoding::greedy(),
        vec![request],
        None,
    )
    .with_depth(depth.clone())?
    .run()?;
    let o = outcomes
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no outcome"))?;
    let (Some(first), Some(last)) = (o.first_token_s, o.finish_s) else {
        anyhow::bail!("the request did not finish");
    };
    let decoded = o.produced.saturating_sub(1).max(1);
    Ok(((last - first) / decoded as f64, o.stats[1..].to_vec()))
}

/// Runs the settings on a random model of `opts.spec`.
pub fn run(opts: &BenchOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<ExitBenchReport> {
    let dir = tempfile::tempdir()?;
    write_random_llama(dir.path(), &opts.spec, opts.seed)?;
    let graph = exitgraph_ir::import(dir.path())?.graph;
    let layers = graph.info.num_layers;
    let q = (layers / 4).max(1);
    let half = (layers / 2).max(1);
    let prompt: Vec<u32> = (0..opts.prompt_len)
        .map(|i| ((i * 7919 + 13) % graph.info.vocab) as u32)
        .collect();
    let new = opts.decode_tokens + 1;
    let always = ExitRule::Confidence(0.0);
    // The exit point decays over the sequence, prompt included (SkipDecode's position-wise
    // schedule), reaching min_layers at the last generated position.
    let skip = SkipDecode {
        max_layers: layers,
        min_layers: (layers / 3).max(2),
        warmup: 1,
        max_length: Some(opts.prompt_len + new),
    };
    let settings: Vec<(String, Vec<usize>, Depth)> = vec![
        ("full model".into(), Vec::new(), Depth::Full),
        (
            format!("exit after layer {}", 3 * q),
            vec![3 * q],
            Depth::EarlyExit {
                rule: always.clone(),
            },
        ),
        (
            format!("exit after layer {half}"),
            vec![half],
            Depth::EarlyExit {
                rule: always.clone(),
            },
        ),
        (
            format!("exit after layer {q}"),
            vec![q],
            Depth::EarlyExit { rule: always },
        ),
        (
            format!("exits {:?}, never taken", [q, half, 3 * q]),
            vec![q, half, 3 * q],
            Depth::EarlyExit {
                rule: ExitRule::Never,
            },
        ),
        (
            format!(
                "SkipDecode {}→{} layers over {} positions, warm-up 1",
                skip.max_layers,
                skip.min_layers,
                opts.prompt_len + new
            ),
            Vec::new(),
            Depth::SkipDecode(skip),
        ),
    ];
    struct Setting {
        name: String,
        cost: DepthCost,
        graph: exitgraph_ir::Graph,
        depth: Depth,
        times: Vec<f64>,
        stats: Vec<TokenStat>,
    }
    let mut runs = Vec::with_capacity(settings.len());
    for (name, points, depth) in settings {
        let mut g = graph.clone();
        if !points.is_empty() {
            InsertExits {
                after: points,
                every: None,
                head: HeadKind::SharedLmHead { norm: true },
                gate: false,
                weights: None,
            }
            .run(&mut g, &PassContext::detached())?;
        }
        runs.push(Setting {
            name,
            cost: DepthCost::of(&g),
            graph: g,
            depth,
            times: Vec::new(),
            stats: Vec::new(),
        });
    }
    // Repetitions alternate the settings' order (forward, then backward) so slow drifts of
    // the machine's load fall on every setting alike. Each timed decode gets a freshly
    // lowered program and an untimed warm-up decode, with no other setting's program held in
    // memory (holding all of them at once changed the settings' relative speeds).
    let reps = opts.reps.max(1);
    for rep in 0..reps {
        progress(&format!("run {} of {reps}", rep + 1));
        let order: Vec<usize> = if rep % 2 == 0 {
            (0..runs.len()).collect()
        } else {
            (0..runs.len()).rev().collect()
        };
        for i in order {
            let r = &mut runs[i];
            let program = Arc::new(Program::lower(
                &r.graph,
                dir.path(),
                &Device::Cpu,
                DType::F32,
            )?);
            decode_once(&program, &prompt, new.min(4), &r.depth)?;
            let (t, s) = decode_once(&program, &prompt, new, &r.depth)?;
            r.times.push(t);
            r.stats = s;
        }
    }
    let base_times = runs.first().map(|r| r.times.clone()).unwrap_or_default();
    let mut rows = Vec::with_capacity(runs.len());
    for r in runs {
        let t = median(r.times.clone());
        let (measured, range) = speedup(&base_times, &r.times);
        let stats = &r.stats;
        let cost = &r.cost;
        let n = stats.len().max(1) as f64;
        let mean_cost = stats
            .iter()
            .map(|s| {
                let run: Vec<usize> = (0..s.layers_run as usize).collect();
                let heads: Vec<usize> = cost.head.keys().copied().take(s.heads as usize).collect();
                let filled: Vec<usize> = (s.exit_layer as usize..layers)
                    .take(s.filled as usize)
                    .collect();
                cost.path(&run, &heads, &filled, s.final_head)
            })
            .sum::<f64>()
            / n;
        rows.push(ExitBenchRow {
            setting: r.name,
            layers_run: stats.iter().map(|s| s.layers_run as f64).sum::<f64>() / n,
            heads_per_token: stats.iter().map(|s| s.heads as f64).sum::<f64>() / n,
            decode_tokens_per_s: 1.0 / t.max(1e-12),
            measured_speedup: measured,
            speedup_range: range,
            ideal_speedup: cost.full() / mean_cost.max(1e-9),
        });
    }
    Ok(ExitBenchReport {
        params: graph.params(),
        layers,
        threads: candle_core::utils::get_num_threads(),
        reps: opts.reps.max(1),
        rows,
    })
}

impl ExitBenchReport {
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "random Llama, {:.1}M parameters, {} layers, {} threads, median of {} runs, batch 1\n",
            self.params as f64 / 1e6,
            self.layers,
            self.threads,
            self.reps
        );
        let _ = writeln!(
            out,
            "| setting | layers run | heads / token | decode tok/s | measured speedup | per-run range | ideal speedup | measured / ideal |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {:.2} | {:.2} | {:.1} | {:.2}x | {:.2}–{:.2}x | {:.2}x | {:.2} |",
                r.setting,
                r.layers_run,
                r.heads_per_token,
                r.decode_tokens_per_s,
                r.measured_speedup,
                r.speedup_range.0,
                r.speedup_range.1,
                r.ideal_speedup,
                r.measured_speedup / r.ideal_speedup
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn speedups_are_ratios_of_median_times_with_the_per_run_range() {
        // Full model 40, 50, 44 ms per token; the setting 20, 20, 25 ms: medians 44 and 20,
        // so 2.2x; per repetition 2.0, 2.5, 1.76.
        let (s, (lo, hi)) = speedup(&[0.040, 0.050, 0.044], &[0.020, 0.020, 0.025]);
        assert!((s - 2.2).abs() < 1e-12, "{s}");
        assert!(
            (lo - 1.76).abs() < 1e-12 && (hi - 2.5).abs() < 1e-12,
            "{lo} {hi}"
        );
        // An even count takes the mean of the middle two.
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
