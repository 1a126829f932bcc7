//! `exitgraph eval speculative PIPELINE.ron`: self-speculative decoding against the full
//! model on the same held-out prompts, per draft depth ℓ, draft length γ, stop threshold and
//! batch size: whether the output is lossless (greedy tokens equal the full model's),
//! acceptance, tokens per verification, the draft/verify time split, decode tokens/s and
//! the measured speedup (median over repetitions, full model and setting timed back to back
//! in alternating order, with the range as the noise), beside the ideal speedup the
//! measured counts imply in FLOPs.
//!
//! Two figures from the measured counts stand beside the measured speedup (see
//! [`Counted`]): the ideal speedup of decoding bound by reading weights (each call reads
//! the weights of the layers it runs once, whatever its tokens: the full model one full
//! pass per token; self-speculation one pass of the draft's `ℓ` layers per drafted or
//! cycle-opening token, the draft head per draft, and one pass of the other `L - ℓ` layers
//! and the head per verification), and the ratio of FLOPs (full over speculative), which is
//! below 1 whenever a draft is rejected: self-speculation saves passes, not arithmetic.
//! Work is counted in per-token FLOPs of the projections and MLPs in layers (attention over
//! the context left out); the head's FLOPs are `2 · hidden · vocab`.

use super::exits::{corpus_cases, run_static, Case};
use crate::corpus::Task;
use crate::exits::speculative::Counted;
use crate::exits::{Depth, SelfSpeculative};
use crate::lower::Program;
use crate::runtime::metrics::{RequestOutcome, SpecCounts};
use crate::runtime::workload::RequestSpec;
use anyhow::bail;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::sync::Arc;

/// What to sweep and on what.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecOptions {
    pub exits: Vec<usize>,
    pub drafts: Vec<usize>,
    /// Stop thresholds; `None` drafts γ tokens every cycle (LayerSkip).
    pub thresholds: Vec<Option<f32>>,
    pub batches: Vec<usize>,
    /// Tokens generated per prompt (no stop at end-of-sequence, so every setting generates
    /// the same count).
    pub new_tokens: usize,
    pub reps: usize,
}

/// One setting at one batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpecRow {
    /// The pipeline (its file name) and the kind of its draft head ([`draft_head`]).
    #[serde(default)]
    pub pipeline: String,
    #[serde(default)]
    pub draft_head: String,
    pub draft_exit: usize,
    pub max_draft: usize,
    pub stop_below: Option<f32>,
    pub batch: usize,
    /// Prompts whose greedy tokens differ from the full model's (0: lossless).
    pub mismatched: usize,
    pub counts: SpecCounts,
    /// Median decode tokens/s of the full model and of the setting.
    pub full_tok_s: f64,
    pub spec_tok_s: f64,
    /// Median of the per-repetition ratios, and their range.
    pub speedup: f64,
    pub speedup_range: (f64, f64),
    /// The ideal speedup of weight-read-bound decoding from the measured counts
    /// ([`Counted::read_speedup`]).
    pub ideal: f64,
    /// The full model's FLOPs over self-speculation's ([`Counted::flop_ratio`]).
    pub flop_ratio: f64,
}

/// The whole sweep.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpecReport {
    pub layers: usize,
    pub prompts: usize,
    pub new_tokens: usize,
    pub reps: usize,
    /// The head's FLOPs per token in layers (the ideal speedup's head cost).
    pub head_layers: f64,
    pub rows: Vec<SpecRow>,
}

/// Parses `--thresholds none,0.4,0.6`.
pub fn parse_thresholds(items: &[String]) -> anyhow::Result<Vec<Option<f32>>> {
    items
        .iter()
        .map(|s| match s.trim() {
            "none" => Ok(None),
            t => {
                let v: f32 = t
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--thresholds: {t:?} is not a number or none"))?;
                if !(0.0..=1.0).contains(&v) {
                    bail!("--thresholds: {v} is not a probability in [0, 1]");
                }
                Ok(Some(v))
            }
        })
        .collect()
}

fn run(
    program: &Arc<Program>,
    cases: &[Case],
    new_tokens: usize,
    batch: usize,
    depth: &Depth,
) -> anyhow::Result<(Vec<RequestOutcome>, f64)> {
    let requests = cases
        .iter()
        .enumerate()
        .map(|(id, c)| RequestSpec {
            id,
            arrival_s: 0.0,
            prompt: c.prompt.clone(),
            max_new_tokens: new_tokens,
            forced: Vec::new(),
            depth: None,
        })
        .collect();
    run_static(program, requests, batch, depth)
}

/// Decode tokens/s: every request's tokens after its first, over the decode steps' time.
fn decode_rate(outcomes: &[RequestOutcome], busy: f64) -> f64 {
    let tokens: usize = outcomes.iter().map(|o| o.produced.saturating_sub(1)).sum();
    tokens as f64 / busy.max(1e-9)
}

/// The head's FLOPs per token, in layers' per-token FLOPs.
pub fn head_layers(program: &Program) -> f64 {
    let g = program.graph();
    let (per_token, _) = crate::bench_gemfilter::layer_flops(g);
    let head = 2.0 * g.info.hidden as f64 * g.info.vocab as f64;
    if per_token > 0.0 {
        head / per_token
    } else {
        0.0
    }
}

/// The per-token FLOPs of the draft head's own layers after `draft_exit` layers (a Kangaroo
/// adapter's projections), in layers' per-token FLOPs; 0 for a shared head or the model's own.
pub fn adapter_layers(program: &Program, draft_exit: usize) -> f64 {
    let g = program.graph();
    let (per_token, _) = crate::bench_gemfilter::layer_flops(g);
    let Some(exit) = g.exit_at(draft_exit).filter(|e| e.kv_slot.is_some()) else {
        return 0.0;
    };
    let flops: f64 = exit
        .nodes
        .iter()
        .filter_map(|&n| match &g.graph[n].op {
            op @ exitgraph_ir::op::Op::Attention(_) => Some(op.flops_per_token() as f64),
            _ => None,
        })
        .sum();
    if per_token > 0.0 {
        flops / per_token
    } else {
        0.0
    }
}

/// What drafts after `draft_exit` layers: `own head` (the model's, at its full depth),
/// `adapter` (Kangaroo's attention adapter), `mlp` (a residual MLP adapter), `shared` (the
/// model's final norm and LM head read early) or `linear` (a norm and head of its own).
pub fn draft_head(program: &Program, draft_exit: usize) -> &'static str {
    use exitgraph_ir::op::Op;
    let g = program.graph();
    if draft_exit >= g.info.num_layers {
        return "own head";
    }
    let Some(exit) = g.exit_at(draft_exit) else {
        return "none";
    };
    if exit.kv_slot.is_some() {
        return "adapter";
    }
    if exit
        .nodes
        .iter()
        .any(|&n| matches!(g.graph[n].op, Op::Mlp(_)))
    {
        return "mlp";
    }
    let weight = |n: Option<exitgraph_ir::NodeIndex>| match n.map(|n| &g.graph[n].op) {
        Some(Op::LmHead(l)) => Some(l.weight.clone()),
        _ => None,
    };
    if weight(exit.logits).is_some() && weight(exit.logits) == weight(g.head.logits) {
        "shared"
    } else {
        "linear"
    }
}

/// Runs the sweep on `cases` for each of `programs` (a name and a pipeline's program, all on
/// one model), setting by setting side by side; `progress` hears what runs.
pub fn sweep(
    programs: &[(String, Arc<Program>)],
    cases: &[Case],
    opts: &SpecOptions,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<SpecReport> {
    if opts.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let Some((_, first)) = programs.first() else {
        bail!("no pipeline to sweep");
    };
    let layers = first.graph().info.num_layers;
    let head = head_layers(first);
    let mut rows = Vec::new();
    for &batch in &opts.batches {
        progress(&format!("full model, batch {batch}"));
        // Each pipeline's own full-depth tokens are its reference (pipelines compared share
        // the model, not necessarily every pass).
        let references = programs
            .iter()
            .map(|(_, p)| Ok(run(p, cases, opts.new_tokens, batch, &Depth::Full)?.0))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for &draft_exit in &opts.exits {
            for &max_draft in &opts.drafts {
                for &stop_below in &opts.thresholds {
                    for ((name, program), reference) in programs.iter().zip(&references) {
                        let spec = SelfSpeculative {
                            draft_exit,
                            max_draft,
                            stop_below,
                        };
                        spec.validate(program.graph())
                            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                        let depth = Depth::from(spec);
                        progress(&format!(
                        "{name}: ℓ {draft_exit}, γ {max_draft}, threshold {stop_below:?}, batch {batch}"
                    ));
                        let mut full_rates = Vec::new();
                        let mut spec_rates = Vec::new();
                        let mut ratios = Vec::new();
                        let mut last = Vec::new();
                        for rep in 0..opts.reps {
                            let time = |d: &Depth| -> anyhow::Result<(f64, Vec<RequestOutcome>)> {
                                let (outs, busy) = run(program, cases, opts.new_tokens, batch, d)?;
                                Ok((decode_rate(&outs, busy), outs))
                            };
                            let (full, (fast, outs)) = if rep % 2 == 0 {
                                let f = time(&Depth::Full)?.0;
                                (f, time(&depth)?)
                            } else {
                                let s = time(&depth)?;
                                (time(&Depth::Full)?.0, s)
                            };
                            full_rates.push(full);
                            spec_rates.push(fast);
                            ratios.push(fast / full.max(1e-12));
                            last = outs;
                        }
                        let mismatched = last
                            .iter()
                            .zip(reference)
                            .filter(|(a, b)| a.tokens != b.tokens)
                            .count();
                        let mut counts = SpecCounts::default();
                        for o in &last {
                            if let Some(c) = &o.speculative {
                                counts.add(c);
                            }
                        }
                        let counted = Counted {
                            layers,
                            draft_exit,
                            head,
                            adapter: adapter_layers(program, draft_exit),
                            cycles: counts.cycles,
                            drafted: counts.drafted,
                            produced: counts.produced,
                        };
                        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
                        let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        rows.push(SpecRow {
                            pipeline: name.clone(),
                            draft_head: draft_head(program, draft_exit).to_string(),
                            draft_exit,
                            max_draft,
                            stop_below,
                            batch,
                            mismatched,
                            counts,
                            full_tok_s: crate::bench_exits::median(full_rates),
                            spec_tok_s: crate::bench_exits::median(spec_rates),
                            speedup: crate::bench_exits::median(ratios),
                            speedup_range: (lo, hi),
                            ideal: counted.read_speedup(),
                            flop_ratio: counted.flop_ratio(),
                        });
                    }
                }
            }
        }
    }
    Ok(SpecReport {
        layers,
        prompts: cases.len(),
        new_tokens: opts.new_tokens,
        reps: opts.reps,
        head_layers: head,
        rows,
    })
}

/// Held-out prompts from the demo corpus: `examples` examples of `tasks` drawn with `seed`,
/// each cut at its first answer token.
pub fn prompts(
    tokenizer: &tokenizers::Tokenizer,
    tasks: &[Task],
    seed: u64,
    examples: usize,
) -> anyhow::Result<Vec<Case>> {
    corpus_cases(tokenizer, tasks, seed, examples, 1)
}

fn threshold(t: Option<f32>) -> String {
    t.map_or_else(|| "none".into(), |v| format!("{v}"))
}

impl SpecReport {
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "self-speculative decoding against the full model ({} layers): {} prompts, {} new \
             tokens each, greedy; tokens/s and speedup are medians of {} repetitions (range \
             in brackets); ideal speedup of weight-read-bound decoding and the FLOP ratio, both \
             from the measured counts (head = {:.2} layers)\n",
            self.layers, self.prompts, self.new_tokens, self.reps, self.head_layers
        );
        let _ = writeln!(
            s,
            "| pipeline | draft head | ℓ | γ | stop below | batch | lossless | accepted | tokens / verification | draft / verify s | full tok/s | spec tok/s | speedup | ideal (reads) | FLOPs full / spec |"
        );
        let _ = writeln!(
            s,
            "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {:.1}% | {:.2} | {:.2} / {:.2} | {:.1} | {:.1} | {:.2}x [{:.2}–{:.2}] | {:.2}x | {:.2} |",
                r.pipeline,
                r.draft_head,
                r.draft_exit,
                r.max_draft,
                threshold(r.stop_below),
                r.batch,
                if r.mismatched == 0 {
                    "yes".to_string()
                } else {
                    format!("no ({} prompts differ)", r.mismatched)
                },
                100.0 * r.counts.acceptance(),
                r.counts.tokens_per_cycle(),
                r.counts.draft_s,
                r.counts.verify_s,
                r.full_tok_s,
                r.spec_tok_s,
                r.speedup,
                r.speedup_range.0,
                r.speedup_range.1,
                r.ideal,
                r.flop_ratio
            );
        }
        s
    }

    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "pipeline,draft_head,draft_exit,max_draft,stop_below,batch,mismatched,drafted,accepted,cycles,produced,acceptance,tokens_per_verification,draft_s,verify_s,full_tok_s,spec_tok_s,speedup,speedup_min,speedup_max,ideal_reads,flop_ratio\n",
        );
        for r in &self.rows {
            let c = &r.counts;
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.2},{:.2},{:.4},{:.4},{:.4},{:.4},{:.4}",
                r.pipeline.replace(',', ";"),
                r.draft_head,
                r.draft_exit,
                r.max_draft,
                threshold(r.stop_below),
                r.batch,
                r.mismatched,
                c.drafted,
                c.accepted,
                c.cycles,
                c.produced,
                c.acceptance(),
                c.tokens_per_cycle(),
                c.draft_s,
                c.verify_s,
                r.full_tok_s,
                r.spec_tok_s,
                r.speedup,
                r.speedup_range.0,
                r.speedup_range.1,
                r.ideal,
                r.flop_ratio
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> SpecRow {
        SpecRow {
            pipeline: "kangaroo.ron".into(),
            draft_head: "adapter".into(),
            draft_exit: 2,
            max_draft: 4,
            stop_below: Some(0.6),
            batch: 1,
            mismatched: 0,
            counts: SpecCounts {
                cycles: 4,
                drafted: 12,
                accepted: 9,
                produced: 13,
                shallow_tokens: 16,
                draft_s: 0.5,
                verify_s: 0.25,
            },
            full_tok_s: 100.0,
            spec_tok_s: 150.0,
            speedup: 1.5,
            speedup_range: (1.4, 1.6),
            ideal: 1.8,
            flop_ratio: 0.9,
        }
    }

    #[test]
    fn the_table_and_csv_carry_the_figures() {
        let report = SpecReport {
            layers: 8,
            prompts: 3,
            new_tokens: 14,
            reps: 3,
            head_layers: 0.25,
            rows: vec![row()],
        };
        let md = report.to_markdown();
        // 9 of 12 accepted = 75%; 13 tokens over 4 verifications = 3.25.
        assert!(md.contains("| kangaroo.ron | adapter | 2 | 4 | 0.6 | 1 | yes | 75.0% | 3.25 | 0.50 / 0.25 | 100.0 | 150.0 | 1.50x [1.40–1.60] | 1.80x | 0.90 |"), "{md}");
        let csv = report.to_csv();
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .starts_with("kangaroo.ron,adapter,2,4,0.6,1,0,12,9,4,13,0.7500,3.2500,"),
            "{csv}"
        );
    }

    #[test]
    fn thresholds_parse() {
        let t = parse_thresholds(&["none".into(), "0.6".into()]).unwrap();
        assert_eq!(t, vec![None, Some(0.6)]);
        assert!(parse_thresholds(&["1.5".into()]).is_err());
        assert!(parse_thresholds(&["high".into()]).is_err());
    }

    #[test]
    fn decode_rate_counts_tokens_after_the_first() {
        let o = |produced| RequestOutcome {
            id: 0,
            arrival_s: 0.0,
            prompt_tokens: 1,
            tokens: Vec::new(),
            produced,
            first_token_s: None,
            finish_s: None,
            failed: None,
            stats: Vec::new(),
            nll: 0.0,
            first_nll: 0.0,
            selected: None,
            selection_scores: None,
            selection_s: None,
            speculative: None,
        };
        // (5 - 1) + (3 - 1) = 6 tokens in 2 s.
        assert!((decode_rate(&[o(5), o(3)], 2.0) - 3.0).abs() < 1e-12);
    }
}
