//! `exitgraph eval exits`: speed against quality of early exiting, per rule and threshold.
//!
//! Data: held-out examples of the synthetic corpus; each is cut at its first answer token
//! into a prompt and a reference continuation. Per setting, every prompt is decoded greedily
//! through the runtime (all examples arrive at once, `batch` at a time) with the exits, and
//! compared with the full model's greedy decoding: agreement is the share of generated
//! positions whose token equals the full model's. Perplexity is measured on the reference
//! continuations by teacher forcing, each token scored by the distribution of the exit that
//! produced it. Speed: measured tokens/s (wall clock of the whole run) and the ideal speedup
//! implied by the path costs (layers, heads and state copying, in FLOPs; see
//! [`crate::exits::cost`]).

use crate::corpus::{self, CorpusSpec, Task};
use crate::exits::cost::DepthCost;
use crate::exits::{Depth, ExitRule};
use crate::lower::Program;
use crate::runtime::metrics::{RequestOutcome, TokenStat};
use crate::runtime::policy::Batching;
use crate::runtime::workload::RequestSpec;
use crate::runtime::{Decoding, Executor, Runtime};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

/// A prompt and its reference continuation.
#[derive(Clone, Debug)]
pub struct Case {
    pub prompt: Vec<u32>,
    pub reference: Vec<u32>,
}

/// Held-out cases of `tasks` (all when empty): `examples` drawn with `seed`, each cut at its
/// first answer token; the continuation runs to the end of the example (at most `max_new`).
pub fn corpus_cases(
    tokenizer: &tokenizers::Tokenizer,
    tasks: &[Task],
    seed: u64,
    examples: usize,
    max_new: usize,
) -> anyhow::Result<Vec<Case>> {
    let data = corpus::generate(&CorpusSpec {
        seed,
        examples,
        tasks: tasks.to_vec(),
    });
    let mut out = Vec::new();
    for ex in &data {
        let enc = corpus::encode(tokenizer, ex)?;
        let Some(first) = enc.answer.iter().position(|&a| a) else {
            continue;
        };
        if first == 0 {
            continue;
        }
        let end = enc.ids.len().min(first + max_new);
        out.push(Case {
            prompt: enc.ids[..first].to_vec(),
            reference: enc.ids[first..end].to_vec(),
        });
    }
    if out.is_empty() {
        bail!("the corpus gave no cases with answers");
    }
    Ok(out)
}

/// One setting's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    /// `all`, `calibration` or `held-out`.
    pub split: String,
    pub rule: String,
    pub threshold: f64,
    /// Mean layers a generated token's hidden state went through.
    pub avg_exit_layer: f64,
    /// Share of generated tokens per exit point (the last is the full model).
    pub exit_share: Vec<(usize, f64)>,
    /// Share of generated positions equal to the full model's greedy tokens.
    pub agreement: f64,
    pub perplexity: f64,
    /// Perplexity relative to the full model's, minus 1.
    pub perplexity_change: f64,
    pub tokens_per_s: f64,
    /// Measured: tokens/s over the full model's tokens/s.
    pub speedup: f64,
    /// Full path cost over the mean adaptive path cost (layers, heads, state copying).
    pub ideal_speedup: f64,
}

/// The whole evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitReport {
    pub layers: usize,
    pub exits: Vec<usize>,
    pub cases: usize,
    pub batch: usize,
    pub full_tokens_per_s: f64,
    pub full_perplexity: f64,
    pub rows: Vec<SweepRow>,
    /// With a target agreement: the threshold chosen per rule on the calibration split.
    pub chosen: Vec<SweepRow>,
}

/// `RULE=lo:hi:step` → the rule at every threshold.
pub fn parse_sweep(text: &str) -> anyhow::Result<Vec<ExitRule>> {
    let (name, range) = text
        .split_once('=')
        .with_context(|| format!("--sweep {text}: expected RULE=lo:hi:step"))?;
    let parts: Vec<f64> = range
        .split(':')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--sweep {text}: lo:hi:step must be numbers"))?;
    let [lo, hi, step] = parts[..] else {
        bail!("--sweep {text}: expected RULE=lo:hi:step");
    };
    if !(step > 0.0 && lo <= hi && lo.is_finite() && hi.is_finite()) {
        bail!("--sweep {text}: needs lo <= hi and step > 0");
    }
    let count = ((hi - lo) / step + 1e-9).floor() as usize + 1;
    if count > 1000 {
        bail!("--sweep {text}: {count} settings is too many (at most 1000)");
    }
    let mut rules = Vec::with_capacity(count);
    for i in 0..count {
        let t = ((lo + step * i as f64) * 1e9).round() / 1e9;
        let rule = ExitRule::by_name(name, t).with_context(|| {
            format!(
                "--sweep {text}: unknown rule {name} (confidence, margin, entropy, patience, saturation, gate)"
            )
        })?;
        rule.validate()
            .map_err(|e| anyhow::anyhow!("--sweep {text}: {e}"))?;
        rules.push(rule);
    }
    Ok(rules)
}

fn rule_name(rule: &ExitRule) -> (String, f64) {
    match rule {
        ExitRule::Confidence(t) => ("confidence".into(), *t),
        ExitRule::Margin(t) => ("margin".into(), *t),
        ExitRule::Entropy(t) => ("entropy".into(), *t),
        ExitRule::Patience(k) => ("patience".into(), *k as f64),
        ExitRule::Saturation(t) => ("saturation".into(), *t),
        ExitRule::Gate(t) => ("gate".into(), *t),
        ExitRule::Oracle => ("oracle (upper bound)".into(), 0.0),
        ExitRule::Never => ("never".into(), 0.0),
        other => (format!("{other:?}"), 0.0),
    }
}

/// Runs every case through the runtime; returns the outcomes in case order and the wall time.
fn run_cases(
    program: &Arc<Program>,
    cases: &[Case],
    batch: usize,
    depth: &Depth,
    forced: bool,
) -> anyhow::Result<(Vec<RequestOutcome>, f64)> {
    let requests = cases
        .iter()
        .enumerate()
        .map(|(id, c)| RequestSpec {
            id,
            arrival_s: 0.0,
            prompt: c.prompt.clone(),
            max_new_tokens: c.reference.len(),
            forced: if forced {
                c.reference.clone()
            } else {
                Vec::new()
            },
            depth: None,
        })
        .collect();
    let started = Instant::now();
    let (_, outcomes) = Runtime::new(
        program.clone(),
        Batching::Static {
            max_batch: batch.max(1),
        },
        Executor::Real,
        Decoding::greedy(),
        requests,
        None,
    )
    .with_depth(depth.clone())?
    .run()?;
    let wall = started.elapsed().as_secs_f64();
    if let Some(f) = outcomes.iter().find_map(|o| o.failed.as_ref()) {
        bail!("{f}");
    }
    Ok((outcomes, wall))
}

/// The evaluator: a program with exits, its cases and the full model's baseline.
pub struct ExitEval {
    program: Arc<Program>,
    cost: DepthCost,
    layers: usize,
    exits: Vec<usize>,
    batch: usize,
    full_tokens: Vec<Vec<u32>>,
    full_nll: Vec<f64>,
    full_tps: f64,
}

fn perplexity(nll: f64, tokens: usize) -> f64 {
    (nll / tokens.max(1) as f64).exp()
}

impl ExitEval {
    /// Runs the full model over `cases` (greedy and teacher-forced) as the baseline.
    pub fn new(program: Arc<Program>, cases: &[Case], batch: usize) -> anyhow::Result<Self> {
        let graph = program.graph();
        let layers = graph.info.num_layers;
        let exits = graph.exit_depths();
        if exits.is_empty() {
            bail!("the pipeline has no exit heads: add an InsertExits pass");
        }
        let cost = DepthCost::of(graph);
        // One warm-up pass so the first timed run does not pay for first-touch costs.
        run_cases(
            &program,
            &cases[..cases.len().min(4)],
            batch,
            &Depth::Full,
            false,
        )?;
        let (full, wall) = run_cases(&program, cases, batch, &Depth::Full, false)?;
        let (forced, _) = run_cases(&program, cases, batch, &Depth::Full, true)?;
        let generated: usize = full.iter().map(|o| o.tokens.len()).sum();
        Ok(ExitEval {
            cost,
            layers,
            exits,
            batch,
            full_tokens: full.into_iter().map(|o| o.tokens).collect(),
            full_nll: forced.iter().map(|o| o.nll).collect(),
            full_tps: generated as f64 / wall.max(1e-9),
            program,
        })
    }

    fn path_cost(&self, s: &TokenStat) -> f64 {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let heads: Vec<f64> = self.cost.head.values().copied().collect();
        s.layers_run as f64 * mean(&self.cost.layer)
            + s.heads as f64 * mean(&heads)
            + s.filled as f64 * mean(&self.cost.kv_fill)
            + if s.final_head {
                self.cost.final_head
            } else {
                0.0
            }
    }

    /// One setting on the cases `which` (indices into the baseline's cases).
    pub fn row(
        &self,
        cases: &[Case],
        which: &[usize],
        rule: &ExitRule,
        split: &str,
    ) -> anyhow::Result<SweepRow> {
        let subset: Vec<Case> = which.iter().map(|&i| cases[i].clone()).collect();
        let depth = Depth::EarlyExit { rule: rule.clone() };
        // The full model is timed right before, on the same cases, so both runs see the
        // same machine load.
        let (full, full_wall) = run_cases(&self.program, &subset, self.batch, &Depth::Full, false)?;
        let full_generated: usize = full.iter().map(|o| o.tokens.len()).sum();
        let full_tps = full_generated as f64 / full_wall.max(1e-9);
        let (outs, wall) = run_cases(&self.program, &subset, self.batch, &depth, false)?;
        let (forced, _) = run_cases(&self.program, &subset, self.batch, &depth, true)?;
        let (mut same, mut total) = (0usize, 0usize);
        let mut stats: Vec<TokenStat> = Vec::new();
        for (o, &i) in outs.iter().zip(which) {
            let want = &self.full_tokens[i];
            total += want.len();
            same += o.tokens.iter().zip(want).filter(|(a, b)| a == b).count();
            stats.extend(o.stats.iter().copied());
        }
        let generated = stats.len();
        let mut counts = vec![0usize; self.layers + 1];
        for s in &stats {
            if let Some(c) = counts.get_mut(s.exit_layer as usize) {
                *c += 1;
            }
        }
        let points: Vec<usize> = self
            .exits
            .iter()
            .copied()
            .chain(std::iter::once(self.layers))
            .collect();
        let exit_share = points
            .iter()
            .map(|&k| (k, counts[k] as f64 / generated.max(1) as f64))
            .collect();
        let avg_exit_layer =
            stats.iter().map(|s| s.exit_layer as f64).sum::<f64>() / generated.max(1) as f64;
        // The oracle runs the full model to know its answer; its ideal speedup is that of
        // a perfect rule: the token stops at the oracle's exit (heads up to it, state
        // copying above it).
        let costed: Vec<TokenStat> = if rule.is_oracle() {
            stats
                .iter()
                .map(|s| {
                    let exit = s.exit_layer as usize;
                    let early = exit < self.layers;
                    TokenStat {
                        exit_layer: s.exit_layer,
                        layers_run: s.exit_layer,
                        heads: if s.heads == 0 {
                            0
                        } else if early {
                            self.exits.iter().filter(|&&k| k <= exit).count() as u16
                        } else {
                            self.exits.len() as u16
                        },
                        filled: if early {
                            (self.layers - exit) as u16
                        } else {
                            0
                        },
                        final_head: !early,
                    }
                })
                .collect()
        } else {
            stats.clone()
        };
        let adaptive_cost =
            costed.iter().map(|s| self.path_cost(s)).sum::<f64>() / generated.max(1) as f64;
        let forced_tokens: usize = subset.iter().map(|c| c.reference.len()).sum();
        let nll: f64 = forced.iter().map(|o| o.nll).sum();
        let full_nll: f64 = which.iter().map(|&i| self.full_nll[i]).sum();
        let ppl = perplexity(nll, forced_tokens);
        let full_ppl = perplexity(full_nll, forced_tokens);
        let tps = generated as f64 / wall.max(1e-9);
        let (name, threshold) = rule_name(rule);
        Ok(SweepRow {
            split: split.into(),
            rule: name,
            threshold,
            avg_exit_layer,
            exit_share,
            agreement: same as f64 / total.max(1) as f64,
            perplexity: ppl,
            perplexity_change: ppl / full_ppl - 1.0,
            tokens_per_s: tps,
            speedup: tps / full_tps,
            ideal_speedup: self.cost.full() / adaptive_cost.max(1e-9),
        })
    }
}

/// Sweeps `rules` over `cases`; with `target`, also picks per rule name the threshold with
/// the highest ideal speedup reaching `target` agreement on the calibration half, and reports
/// it on the held-out half.
pub fn sweep(
    program: Arc<Program>,
    cases: &[Case],
    batch: usize,
    rules: &[ExitRule],
    target: Option<f64>,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<ExitReport> {
    let eval = ExitEval::new(program.clone(), cases, batch)?;
    let all: Vec<usize> = (0..cases.len()).collect();
    let mut rows = Vec::new();
    let oracle = eval.row(cases, &all, &ExitRule::Oracle, "all")?;
    let full_ppl = oracle.perplexity / (1.0 + oracle.perplexity_change);
    rows.push(oracle);
    for rule in rules {
        progress(&format!("{rule:?}"));
        rows.push(eval.row(cases, &all, rule, "all")?);
    }
    let mut chosen = Vec::new();
    if let Some(target) = target {
        let calibration: Vec<usize> = all.iter().copied().filter(|i| i % 2 == 0).collect();
        let held_out: Vec<usize> = all.iter().copied().filter(|i| i % 2 == 1).collect();
        let mut names: Vec<String> = rules.iter().map(|r| rule_name(r).0).collect();
        names.dedup();
        for name in names {
            let mut best: Option<(ExitRule, SweepRow)> = None;
            for rule in rules.iter().filter(|r| rule_name(r).0 == name) {
                let row = eval.row(cases, &calibration, rule, "calibration")?;
                if row.agreement >= target
                    && best
                        .as_ref()
                        .is_none_or(|(_, b)| row.ideal_speedup > b.ideal_speedup)
                {
                    best = Some((rule.clone(), row));
                }
            }
            match best {
                Some((rule, cal)) => {
                    chosen.push(cal);
                    chosen.push(eval.row(cases, &held_out, &rule, "held-out")?);
                }
                None => progress(&format!(
                    "{name}: no threshold reaches {target} agreement on the calibration split"
                )),
            }
        }
    }
    Ok(ExitReport {
        layers: eval.layers,
        exits: eval.exits.clone(),
        cases: cases.len(),
        batch,
        full_tokens_per_s: eval.full_tps,
        full_perplexity: full_ppl,
        rows,
        chosen,
    })
}

fn table(rows: &[SweepRow], out: &mut String) {
    let _ = writeln!(
        out,
        "| split | rule | threshold | avg exit layer | exit shares | agreement | ppl change | tok/s | speedup | ideal |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let shares: Vec<String> = r
            .exit_share
            .iter()
            .map(|(k, s)| format!("L{k} {:.0}%", s * 100.0))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {:.3} | {:.2} | {} | {:.1}% | {:+.1}% | {:.0} | {:.2}x | {:.2}x |",
            r.split,
            r.rule,
            r.threshold,
            r.avg_exit_layer,
            shares.join(" "),
            r.agreement * 100.0,
            r.perplexity_change * 100.0,
            r.tokens_per_s,
            r.speedup,
            r.ideal_speedup
        );
    }
}

impl ExitReport {
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} cases, exits after layers {:?} of {}, batch {}: full model {:.0} tok/s, perplexity {:.3}\n",
            self.cases, self.exits, self.layers, self.batch, self.full_tokens_per_s, self.full_perplexity
        );
        table(&self.rows, &mut out);
        if !self.chosen.is_empty() {
            let _ = writeln!(
                out,
                "\nChosen on the calibration split, reported on held-out:\n"
            );
            table(&self.chosen, &mut out);
        }
        out
    }

    /// Every row as CSV (exit shares as `L2:0.31;L4:0.20;...`).
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "split,rule,threshold,avg_exit_layer,exit_share,agreement,perplexity,perplexity_change,tokens_per_s,speedup,ideal_speedup\n",
        );
        for r in self.rows.iter().chain(&self.chosen) {
            let shares: Vec<String> = r
                .exit_share
                .iter()
                .map(|(k, s)| format!("L{k}:{s:.4}"))
                .collect();
            let _ = writeln!(
                out,
                "{},{},{},{:.4},{},{:.4},{:.4},{:.4},{:.1},{:.4},{:.4}",
                r.split,
                r.rule,
                r.threshold,
                r.avg_exit_layer,
                shares.join(";"),
                r.agreement,
                r.perplexity,
                r.perplexity_change,
                r.tokens_per_s,
                r.speedup,
                r.ideal_speedup
            );
        }
        out
    }
}

/// Speedup (measured and ideal) against agreement, one curve per rule, as a PNG.
pub fn plot(report: &ExitReport, path: &std::path::Path) -> anyhow::Result<()> {
    use super::plot::{line_chart_png, Series};
    let mut series: Vec<Series> = Vec::new();
    for r in report.rows.iter().filter(|r| r.split == "all") {
        for (kind, y) in [("measured", r.speedup), ("ideal", r.ideal_speedup)] {
            let name = format!("{} ({kind})", r.rule);
            match series.iter_mut().find(|s| s.name == name) {
                Some(s) => s.points.push((r.agreement * 100.0, y)),
                None => series.push(Series {
                    name,
                    points: vec![(r.agreement * 100.0, y)],
                    line: kind == "ideal",
                }),
            }
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    line_chart_png(
        path,
        &format!(
            "Early exits after layers {:?} of {}: speed against quality",
            report.exits, report.layers
        ),
        "agreement with full greedy decoding (%)",
        "speedup over the full model (x)",
        &series,
        (1000, 640),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_parse() {
        let r = parse_sweep("confidence=0.5:0.7:0.1").unwrap_or_default();
        assert_eq!(
            r,
            vec![
                ExitRule::Confidence(0.5),
                ExitRule::Confidence(0.6),
                ExitRule::Confidence(0.7)
            ]
        );
        assert!(parse_sweep("confidence=0.5:0.7").is_err());
        assert!(parse_sweep("speed=0:1:0.1").is_err());
        assert!(parse_sweep("confidence=0.5:2:0.5").is_err(), "out of range");
        assert!(parse_sweep("margin=0.7:0.5:0.1").is_err());
    }
}
