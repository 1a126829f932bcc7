//! `exitgraph eval exits`: speed against quality of adaptive depth, per exit rule and
//! threshold, and per SkipDecode schedule.
//!
//! Data: held-out examples of the synthetic corpus; each is cut at its first answer token
//! into a prompt and a reference continuation. Per setting, every prompt is decoded greedily
//! through the runtime (all examples arrive at once, `batch` at a time) and compared with the
//! full model's greedy decoding. Every figure is over the *exit-eligible* tokens — each
//! request's tokens after its first, which the prompt's full pass produces and which can never
//! exit; the first token's agreement is reported apart. Agreement is the share of eligible
//! positions whose token equals the full model's; perplexity is over the reference
//! continuations' eligible positions by teacher forcing, each token scored by the
//! distribution of the exit that produced it.
//!
//! Speed: decode only on both sides. A run's decode time is the busy time of its decode-only
//! steps (exit decisions and state copying included); decode tokens/s is eligible tokens over
//! it. Each setting is timed `reps` times, each repetition timing the full model and the
//! setting back to back in alternating order; the speedup is the median per-repetition ratio,
//! with its range as the noise. The ideal speedup is the full path's FLOPs over the mean
//! eligible token's path (layers, heads and state copying; see [`crate::exits::cost`]): the
//! same tokens the measured speedup counts.

use crate::corpus::{self, CorpusSpec, Task};
use crate::exits::cost::DepthCost;
use crate::exits::{ltt, Depth, ExitRule, SkipDecode};
use crate::lower::Program;
use crate::runtime::metrics::{RequestOutcome, TokenStat};
use crate::runtime::policy::Batching;
use crate::runtime::workload::RequestSpec;
use crate::runtime::{Decoding, Executor, Runtime};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::sync::Arc;

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
    let data = corpus::generate(&CorpusSpec::new(seed, examples, tasks.to_vec()));
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

/// What `eval exits` evaluates: an exit rule (the exits decide per token) or a SkipDecode
/// schedule (depth fixed per sequence position).
#[derive(Clone, Debug, PartialEq)]
pub enum Setting {
    Rule(ExitRule),
    Skip(SkipDecode),
}

impl Setting {
    fn depth(&self) -> Depth {
        match self {
            Setting::Rule(rule) => Depth::EarlyExit { rule: rule.clone() },
            Setting::Skip(s) => Depth::SkipDecode(*s),
        }
    }

    /// The row's rule name and threshold.
    fn label(&self) -> (String, f64) {
        match self {
            Setting::Rule(rule) => rule_name(rule),
            Setting::Skip(s) => (
                format!(
                    "skipdecode {}->{} warm-up {}{}",
                    s.max_layers,
                    s.min_layers,
                    s.warmup,
                    s.max_length
                        .map_or(String::new(), |l| format!(" over {l} positions"))
                ),
                s.min_layers as f64,
            ),
        }
    }
}

/// `MAX:MIN:WARMUP[:LENGTH]` → a SkipDecode schedule (`--skipdecode`).
pub fn parse_skipdecode(text: &str, layers: usize) -> anyhow::Result<SkipDecode> {
    let parts: Vec<usize> = text
        .split(':')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!("--skipdecode {text}: expected MAX:MIN:WARMUP[:LENGTH], whole numbers")
        })?;
    let s = match parts[..] {
        [max_layers, min_layers, warmup] => SkipDecode {
            max_layers,
            min_layers,
            warmup,
            max_length: None,
        },
        [max_layers, min_layers, warmup, length] => SkipDecode {
            max_layers,
            min_layers,
            warmup,
            max_length: Some(length),
        },
        _ => bail!("--skipdecode {text}: expected MAX:MIN:WARMUP[:LENGTH]"),
    };
    s.validate(layers)
        .map_err(|e| anyhow::anyhow!("--skipdecode {text}: {e}"))?;
    Ok(s)
}

/// Learn-then-Test's guarantee for a chosen threshold (see [`crate::exits::ltt`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LttBound {
    /// Risk tolerance: 1 − the target agreement.
    pub delta: f64,
    /// With probability ≥ 1 − epsilon, the expected risk is ≤ delta.
    pub epsilon: f64,
    /// The chosen threshold's Hoeffding-Bentkus p-value on the calibration split.
    pub p_value: f64,
    /// Its mean per-case risk there.
    pub calibration_risk: f64,
    pub calibration_cases: usize,
}

/// One setting's figures. Quality and cost are over the *exit-eligible* tokens: every
/// generated token after a request's first (the first comes from the prompt's full pass and
/// can never exit); the first token's agreement is reported apart.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    /// `all`, `calibration`, `held-out` (point-estimate choice), or `calibration (LTT)` and
    /// `held-out (LTT)` (Learn-then-Test's choice).
    pub split: String,
    pub rule: String,
    pub threshold: f64,
    /// Exit-eligible tokens the row's figures are over.
    #[serde(default)]
    pub tokens: usize,
    /// Mean layers an exit-eligible token's hidden state went through.
    pub avg_exit_layer: f64,
    /// Share of exit-eligible tokens per depth: each exit point, the full model, and any
    /// other depth tokens ran (SkipDecode).
    pub exit_share: Vec<(usize, f64)>,
    /// Share of exit-eligible positions equal to the full model's greedy tokens.
    pub agreement: f64,
    /// Share of requests whose first token equals the full model's (always 1: it comes
    /// from the prompt's full pass).
    #[serde(default)]
    pub first_token_agreement: f64,
    /// Perplexity of the reference continuations' exit-eligible positions.
    pub perplexity: f64,
    /// Perplexity relative to the full model's, minus 1.
    pub perplexity_change: f64,
    /// Decode tokens/s: exit-eligible tokens over the busy time of decode-only steps
    /// (median of the repetitions; 0 when not timed).
    pub tokens_per_s: f64,
    /// Measured: median over repetitions of this setting's decode tokens/s over the full
    /// model's, timed in the same repetition (0 when not timed).
    pub speedup: f64,
    /// Lowest and highest per-repetition speedup.
    #[serde(default)]
    pub speedup_range: (f64, f64),
    /// Full path cost over the mean adaptive path cost (layers, heads, state copying).
    pub ideal_speedup: f64,
    /// Set on thresholds chosen by Learn-then-Test.
    #[serde(default)]
    pub ltt: Option<LttBound>,
}

/// The whole evaluation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExitReport {
    pub layers: usize,
    pub exits: Vec<usize>,
    pub cases: usize,
    pub batch: usize,
    /// Timing repetitions per setting.
    #[serde(default)]
    pub reps: usize,
    /// The full model's decode tokens/s (median).
    pub full_tokens_per_s: f64,
    pub full_perplexity: f64,
    pub rows: Vec<SweepRow>,
    /// With a target agreement: per rule, the threshold chosen on the calibration split
    /// (even-numbered cases) and its figures on the held-out split (odd-numbered cases).
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
        ExitRule::Decaying { rule, tau } => {
            let (name, t) = rule_name(rule);
            (format!("{name} decaying tau {tau}"), t)
        }
        ExitRule::Oracle => ("oracle (upper bound)".into(), 0.0),
        ExitRule::Never => ("never".into(), 0.0),
        other => (format!("{other:?}"), 0.0),
    }
}

/// One run of every case through the runtime: outcomes in case order, and the decode-only
/// busy seconds.
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
    run_static(program, requests, batch, depth)
}

/// `requests`, all arriving at once, in static batches of `batch` under `depth`, greedy:
/// outcomes in request order and the decode-only busy seconds. A failed request fails the
/// run.
pub fn run_static(
    program: &Arc<Program>,
    requests: Vec<RequestSpec>,
    batch: usize,
    depth: &Depth,
) -> anyhow::Result<(Vec<RequestOutcome>, f64)> {
    let (report, outcomes) = Runtime::new(
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
    if let Some(f) = outcomes.iter().find_map(|o| o.failed.as_ref()) {
        bail!("{f}");
    }
    Ok((outcomes, report.decode_busy_s))
}

/// Exit-eligible tokens of a run: every request's tokens after its first.
fn eligible(outcomes: &[RequestOutcome]) -> usize {
    outcomes.iter().map(|o| o.produced.saturating_sub(1)).sum()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Decode speed of a setting against the full model on the same cases.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timing {
    /// Per repetition: (full model's decode tokens/s, the setting's).
    pub reps: Vec<(f64, f64)>,
}

impl Timing {
    /// Median decode tokens/s of the setting.
    pub fn tokens_per_s(&self) -> f64 {
        median(&self.reps.iter().map(|r| r.1).collect::<Vec<_>>())
    }

    /// Median decode tokens/s of the full model.
    pub fn full_tokens_per_s(&self) -> f64 {
        median(&self.reps.iter().map(|r| r.0).collect::<Vec<_>>())
    }

    /// Per-repetition speedups.
    fn ratios(&self) -> Vec<f64> {
        self.reps.iter().map(|(f, s)| s / f.max(1e-12)).collect()
    }

    /// Median per-repetition speedup, and the lowest and highest.
    pub fn speedup(&self) -> (f64, (f64, f64)) {
        let r = self.ratios();
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if r.is_empty() {
            (0.0, (0.0, 0.0))
        } else {
            (median(&r), (lo, hi))
        }
    }
}

/// One case's result under a setting.
#[derive(Clone, Debug)]
struct CaseResult {
    tokens: Vec<u32>,
    stats: Vec<TokenStat>,
    /// Forced NLL of the reference's exit-eligible positions.
    nll: f64,
}

/// The evaluator: a program with exits, its cases and the full model's baseline.
pub struct ExitEval {
    program: Arc<Program>,
    cost: DepthCost,
    layers: usize,
    exits: Vec<usize>,
    batch: usize,
    reps: usize,
    cases: Vec<Case>,
    full_tokens: Vec<Vec<u32>>,
    full_nll: Vec<f64>,
}

fn perplexity(nll: f64, tokens: usize) -> f64 {
    (nll / tokens.max(1) as f64).exp()
}

impl ExitEval {
    /// Runs the full model over `cases` (greedy and teacher-forced) as the baseline; `reps`
    /// timing repetitions per setting.
    pub fn new(
        program: Arc<Program>,
        cases: &[Case],
        batch: usize,
        reps: usize,
    ) -> anyhow::Result<Self> {
        let graph = program.graph();
        let layers = graph.info.num_layers;
        let exits = graph.exit_depths();
        let cost = DepthCost::of(graph);
        // One warm-up pass so the first timed run does not pay for first-touch costs.
        run_cases(
            &program,
            &cases[..cases.len().min(4)],
            batch,
            &Depth::Full,
            false,
        )?;
        let (full, _) = run_cases(&program, cases, batch, &Depth::Full, false)?;
        let (forced, _) = run_cases(&program, cases, batch, &Depth::Full, true)?;
        Ok(ExitEval {
            cost,
            layers,
            exits,
            batch,
            reps: reps.max(1),
            cases: cases.to_vec(),
            full_tokens: full.into_iter().map(|o| o.tokens).collect(),
            full_nll: forced.iter().map(|o| o.nll - o.first_nll).collect(),
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

    /// The cost a token's path is charged: as run, or for the oracle, as a perfect rule's
    /// (heads up to the oracle's exit, state copying above it).
    fn costed(&self, s: &TokenStat, oracle: bool) -> TokenStat {
        if !oracle {
            return *s;
        }
        let exit = s.exit_layer as usize;
        let early = exit < self.layers;
        TokenStat {
            speculated: s.speculated,
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
    }

    /// Decode timing of `setting` on the cases `which`: `reps` repetitions, each timing the
    /// full model and the setting back to back, in alternating order.
    fn time(
        &self,
        which: &[usize],
        depth: &Depth,
    ) -> anyhow::Result<(Timing, Vec<RequestOutcome>)> {
        let subset: Vec<Case> = which.iter().map(|&i| self.cases[i].clone()).collect();
        let mut timing = Timing::default();
        let mut outcomes = Vec::new();
        for rep in 0..self.reps {
            let one = |d: &Depth| -> anyhow::Result<(f64, Vec<RequestOutcome>)> {
                let (outs, busy) = run_cases(&self.program, &subset, self.batch, d, false)?;
                Ok((eligible(&outs) as f64 / busy.max(1e-9), outs))
            };
            let (full, (tps, outs)) = if rep % 2 == 0 {
                let f = one(&Depth::Full)?.0;
                (f, one(depth)?)
            } else {
                let s = one(depth)?;
                (one(&Depth::Full)?.0, s)
            };
            timing.reps.push((full, tps));
            outcomes = outs;
        }
        Ok((timing, outcomes))
    }

    /// Runs `setting` on the cases `which`: tokens, paths and forced NLL per case, and the
    /// decode timing when `timed` (else the greedy run is untimed).
    fn measure(
        &self,
        which: &[usize],
        setting: &Setting,
        timed: bool,
    ) -> anyhow::Result<(Vec<CaseResult>, Option<Timing>)> {
        let depth = setting.depth();
        let subset: Vec<Case> = which.iter().map(|&i| self.cases[i].clone()).collect();
        let (timing, outs) = if timed {
            let (t, o) = self.time(which, &depth)?;
            (Some(t), o)
        } else {
            (
                None,
                run_cases(&self.program, &subset, self.batch, &depth, false)?.0,
            )
        };
        let (forced, _) = run_cases(&self.program, &subset, self.batch, &depth, true)?;
        let results = outs
            .into_iter()
            .zip(forced)
            .map(|(o, f)| CaseResult {
                tokens: o.tokens,
                stats: o.stats,
                nll: f.nll - f.first_nll,
            })
            .collect();
        Ok((results, timing))
    }

    /// Per-case risk: the share of a case's exit-eligible tokens that differ from the full
    /// model's.
    fn risks(&self, which: &[usize], results: &[CaseResult]) -> Vec<f64> {
        which
            .iter()
            .zip(results)
            .map(|(&i, r)| {
                let want = &self.full_tokens[i];
                let n = want.len().saturating_sub(1);
                if n == 0 {
                    return 0.0;
                }
                let differ = (1..want.len())
                    .filter(|&k| r.tokens.get(k) != Some(&want[k]))
                    .count();
                differ as f64 / n as f64
            })
            .collect()
    }

    /// The row of `setting` over the cases `which` (`results` in the same order).
    fn summarize(
        &self,
        which: &[usize],
        results: &[CaseResult],
        timing: Option<&Timing>,
        setting: &Setting,
        split: &str,
    ) -> SweepRow {
        let oracle = matches!(setting, Setting::Rule(r) if r.is_oracle());
        let (mut same, mut total, mut first_same) = (0usize, 0usize, 0usize);
        let mut stats: Vec<TokenStat> = Vec::new();
        let mut nll = 0.0;
        let mut full_nll = 0.0;
        let mut forced_tokens = 0usize;
        for (&i, r) in which.iter().zip(results) {
            let want = &self.full_tokens[i];
            first_same += usize::from(r.tokens.first() == want.first());
            total += want.len().saturating_sub(1);
            same += (1..want.len())
                .filter(|&k| r.tokens.get(k) == Some(&want[k]))
                .count();
            stats.extend(r.stats.iter().skip(1).map(|s| self.costed(s, oracle)));
            nll += r.nll;
            full_nll += self.full_nll[i];
            forced_tokens += self.cases[i].reference.len().saturating_sub(1);
        }
        let generated = stats.len();
        let mut counts = vec![0usize; self.layers + 1];
        for s in &stats {
            if let Some(c) = counts.get_mut(s.exit_layer as usize) {
                *c += 1;
            }
        }
        // The exit points and the full depth, and any other depth tokens stopped at
        // (SkipDecode's layers run).
        let mut points: Vec<usize> = self
            .exits
            .iter()
            .copied()
            .chain(std::iter::once(self.layers))
            .chain((0..=self.layers).filter(|&k| counts[k] > 0))
            .collect();
        points.sort_unstable();
        points.dedup();
        let exit_share = points
            .iter()
            .map(|&k| (k, counts[k] as f64 / generated.max(1) as f64))
            .collect();
        let avg_exit_layer =
            stats.iter().map(|s| s.exit_layer as f64).sum::<f64>() / generated.max(1) as f64;
        let adaptive_cost =
            stats.iter().map(|s| self.path_cost(s)).sum::<f64>() / generated.max(1) as f64;
        let ppl = perplexity(nll, forced_tokens);
        let full_ppl = perplexity(full_nll, forced_tokens);
        let (speedup, speedup_range) = timing.map_or((0.0, (0.0, 0.0)), Timing::speedup);
        let (name, threshold) = setting.label();
        SweepRow {
            split: split.into(),
            rule: name,
            threshold,
            tokens: generated,
            avg_exit_layer,
            exit_share,
            agreement: same as f64 / total.max(1) as f64,
            first_token_agreement: first_same as f64 / which.len().max(1) as f64,
            perplexity: ppl,
            perplexity_change: ppl / full_ppl - 1.0,
            tokens_per_s: timing.map_or(0.0, Timing::tokens_per_s),
            speedup,
            speedup_range,
            ideal_speedup: if generated == 0 {
                1.0
            } else {
                self.cost.full() / adaptive_cost.max(1e-9)
            },
            ltt: None,
        }
    }

    /// One setting on the cases `which`, timed.
    pub fn row(&self, which: &[usize], setting: &Setting, split: &str) -> anyhow::Result<SweepRow> {
        let (results, timing) = self.measure(which, setting, true)?;
        Ok(self.summarize(which, &results, timing.as_ref(), setting, split))
    }
}

/// Orders thresholds of one rule from the most conservative (exits least) to the least:
/// descending for every thresholded rule but `Entropy`, ascending for it. Learn-then-Test
/// tests them in this order.
pub fn stricter_first(a: &ExitRule, b: &ExitRule) -> std::cmp::Ordering {
    let (ta, tb) = (a.threshold().unwrap_or(0.0), b.threshold().unwrap_or(0.0));
    if a.larger_is_stricter() {
        tb.total_cmp(&ta)
    } else {
        ta.total_cmp(&tb)
    }
}

/// The calibration split (even-numbered cases) and the held-out split (odd-numbered cases)
/// of `n` cases.
pub fn split(n: usize) -> (Vec<usize>, Vec<usize>) {
    ((0..n).step_by(2).collect(), (1..n).step_by(2).collect())
}

/// How `sweep` calibrates and times.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepOptions {
    pub batch: usize,
    /// Timing repetitions per setting (median reported, range stated).
    pub reps: usize,
    /// Pick per rule the threshold reaching this agreement on the calibration split.
    pub target: Option<f64>,
    /// With `target`: choose by Learn-then-Test at this level instead of the point estimate.
    pub epsilon: Option<f64>,
}

/// Sweeps `settings` over `cases`; with a target agreement, also chooses per rule a
/// threshold on the calibration split (even-numbered cases) — the best ideal speedup whose
/// calibration agreement reaches the target, or with `epsilon` the least conservative
/// threshold Learn-then-Test certifies — and reports it on the held-out split (odd-numbered
/// cases).
pub fn sweep(
    program: Arc<Program>,
    cases: &[Case],
    settings: &[Setting],
    opts: &SweepOptions,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<ExitReport> {
    let has_rules = settings.iter().any(|s| matches!(s, Setting::Rule(_)));
    if has_rules && program.graph().exits.is_empty() {
        bail!("the pipeline has no exit heads: add an InsertExits pass");
    }
    let eval = ExitEval::new(program.clone(), cases, opts.batch, opts.reps)?;
    let all: Vec<usize> = (0..cases.len()).collect();
    let mut rows = Vec::new();
    let mut per_setting: Vec<Vec<CaseResult>> = Vec::new();
    let mut full_tps = Vec::new();
    let mut full_ppl = f64::NAN;
    let mut listed: Vec<Setting> = Vec::new();
    if !eval.exits.is_empty() {
        listed.push(Setting::Rule(ExitRule::Oracle));
    }
    listed.extend(settings.iter().cloned());
    for setting in &listed {
        progress(&setting.label().0);
        let (results, timing) = eval.measure(&all, setting, true)?;
        let row = eval.summarize(&all, &results, timing.as_ref(), setting, "all");
        if let Some(t) = &timing {
            full_tps.push(t.full_tokens_per_s());
        }
        full_ppl = row.perplexity / (1.0 + row.perplexity_change);
        rows.push(row);
        per_setting.push(results);
    }
    let mut chosen = Vec::new();
    if let Some(target) = opts.target {
        let (calibration, held_out) = split(cases.len());
        let pick = |results: &[CaseResult], which: &[usize]| -> Vec<CaseResult> {
            which.iter().map(|&i| results[i].clone()).collect()
        };
        let mut names: Vec<String> = Vec::new();
        for s in &listed {
            if let Setting::Rule(r) = s {
                let name = rule_name(r).0;
                if r.threshold().is_some() && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        for name in names {
            // The rule's settings, most conservative first.
            let mut group: Vec<(usize, &ExitRule)> = listed
                .iter()
                .enumerate()
                .filter_map(|(k, s)| match s {
                    Setting::Rule(r) if rule_name(r).0 == name => Some((k, r)),
                    _ => None,
                })
                .collect();
            group.sort_by(|a, b| stricter_first(a.1, b.1));
            let mut best: Option<(usize, SweepRow)> = None;
            let mut p_values = Vec::new();
            let mut cal_rows = Vec::new();
            for &(k, rule) in &group {
                let results = pick(&per_setting[k], &calibration);
                let setting = Setting::Rule(rule.clone());
                let row = eval.summarize(&calibration, &results, None, &setting, "calibration");
                if row.agreement >= target
                    && best
                        .as_ref()
                        .is_none_or(|(_, b)| row.ideal_speedup > b.ideal_speedup)
                {
                    best = Some((k, row.clone()));
                }
                if let Some(epsilon) = opts.epsilon {
                    let risks = eval.risks(&calibration, &results);
                    let mean = risks.iter().sum::<f64>() / risks.len().max(1) as f64;
                    let p = ltt::hoeffding_bentkus(mean, 1.0 - target, risks.len());
                    p_values.push(p);
                    let mut row = row;
                    row.split = "calibration (LTT)".into();
                    row.ltt = Some(LttBound {
                        delta: 1.0 - target,
                        epsilon,
                        p_value: p,
                        calibration_risk: mean,
                        calibration_cases: risks.len(),
                    });
                    cal_rows.push((k, row));
                }
            }
            let mut picks = Vec::new();
            match best {
                Some(b) => picks.push((b, "held-out")),
                None => progress(&format!(
                    "{name}: no threshold reaches {target} agreement on the calibration split"
                )),
            }
            if let Some(epsilon) = opts.epsilon {
                let valid = ltt::fixed_sequence(&p_values, epsilon);
                match valid.checked_sub(1).and_then(|i| cal_rows.into_iter().nth(i)) {
                    Some(b) => picks.push((b, "held-out (LTT)")),
                    None => progress(&format!(
                        "{name}: Learn-then-Test certifies no threshold for agreement {target} at epsilon {epsilon}"
                    )),
                }
            }
            for ((k, cal), split) in picks {
                progress(&format!("{name}: {split}"));
                let mut held = eval.row(&held_out, &listed[k], split)?;
                held.ltt = cal.ltt.clone();
                chosen.push(cal);
                chosen.push(held);
            }
        }
    }
    Ok(ExitReport {
        layers: eval.layers,
        exits: eval.exits.clone(),
        cases: cases.len(),
        batch: opts.batch,
        reps: eval.reps,
        full_tokens_per_s: median(&full_tps),
        full_perplexity: full_ppl,
        rows,
        chosen,
    })
}

fn table(rows: &[SweepRow], out: &mut String) {
    let _ = writeln!(
        out,
        "| split | rule | threshold | tokens | avg exit layer | exit shares | agreement | ppl change | decode tok/s | speedup (range) | ideal |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let shares: Vec<String> = r
            .exit_share
            .iter()
            .map(|(k, s)| format!("L{k} {:.0}%", s * 100.0))
            .collect();
        let speed = if r.speedup > 0.0 {
            format!(
                "{:.2}x ({:.2}–{:.2})",
                r.speedup, r.speedup_range.0, r.speedup_range.1
            )
        } else {
            "—".into()
        };
        let tps = if r.tokens_per_s > 0.0 {
            format!("{:.0}", r.tokens_per_s)
        } else {
            "—".into()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.3} | {} | {:.2} | {} | {:.1}% | {:+.1}% | {} | {} | {:.2}x |",
            r.split,
            r.rule,
            r.threshold,
            r.tokens,
            r.avg_exit_layer,
            shares.join(" "),
            r.agreement * 100.0,
            r.perplexity_change * 100.0,
            tps,
            speed,
            r.ideal_speedup
        );
    }
}

impl ExitReport {
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} cases, exits after layers {:?} of {}, batch {}, {} timing repetitions: full model {:.0} decode tok/s, perplexity {:.3}. Figures are over exit-eligible tokens (after each request's first); the first token always comes from the full model.\n",
            self.cases,
            self.exits,
            self.layers,
            self.batch,
            self.reps,
            self.full_tokens_per_s,
            self.full_perplexity
        );
        table(&self.rows, &mut out);
        if !self.chosen.is_empty() {
            let _ = writeln!(
                out,
                "\nChosen on the calibration split (even-numbered cases), reported on the held-out split (odd-numbered cases):\n"
            );
            table(&self.chosen, &mut out);
            for r in self
                .chosen
                .iter()
                .filter(|r| r.split.starts_with("held-out"))
            {
                if let Some(b) = &r.ltt {
                    let _ = writeln!(
                        out,
                        "\n{} {:.3}: Learn-then-Test certifies expected disagreement <= {:.3} with probability >= {:.3} (calibration risk {:.4} over {} cases, p = {:.2e})",
                        r.rule,
                        r.threshold,
                        b.delta,
                        1.0 - b.epsilon,
                        b.calibration_risk,
                        b.calibration_cases,
                        b.p_value
                    );
                }
            }
        }
        out
    }

    /// Every row as CSV (exit shares as `L2:0.31;L4:0.20;...`).
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "split,rule,threshold,tokens,avg_exit_layer,exit_share,agreement,first_token_agreement,perplexity,perplexity_change,tokens_per_s,speedup,speedup_lo,speedup_hi,ideal_speedup,ltt_delta,ltt_epsilon,ltt_p_value\n",
        );
        for r in self.rows.iter().chain(&self.chosen) {
            let shares: Vec<String> = r
                .exit_share
                .iter()
                .map(|(k, s)| format!("L{k}:{s:.4}"))
                .collect();
            let ltt = r.ltt.as_ref().map_or(",,".to_string(), |b| {
                format!("{},{},{:.6e}", b.delta, b.epsilon, b.p_value)
            });
            let _ = writeln!(
                out,
                "{},{},{},{},{:.4},{},{:.4},{:.4},{:.4},{:.4},{:.1},{:.4},{:.4},{:.4},{:.4},{}",
                r.split,
                r.rule,
                r.threshold,
                r.tokens,
                r.avg_exit_layer,
                shares.join(";"),
                r.agreement,
                r.first_token_agreement,
                r.perplexity,
                r.perplexity_change,
                r.tokens_per_s,
                r.speedup,
                r.speedup_range.0,
                r.speedup_range.1,
                r.ideal_speedup,
                ltt
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;

    fn stat(exit: u16, run: u16, heads: u16, filled: u16, final_head: bool) -> TokenStat {
        TokenStat {
            speculated: None,
            exit_layer: exit,
            layers_run: run,
            heads,
            filled,
            final_head,
        }
    }

    /// An evaluator over hand-made data: 4 layers of 10 FLOPs, an exit after layer 2 whose
    /// head costs 3, a final head of 5, keys and values filled at 2 per layer.
    fn evaluator() -> (ExitEval, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        crate::synth::write_random_llama(dir.path(), &crate::synth::LlamaSpec::tiny(), 1).unwrap();
        let g = exitgraph_ir::import(dir.path()).unwrap().graph;
        let program = Arc::new(
            Program::lower(
                &g,
                dir.path(),
                &candle_core::Device::Cpu,
                candle_core::DType::F32,
            )
            .unwrap(),
        );
        let case = |r: Vec<u32>| Case {
            prompt: vec![1],
            reference: r,
        };
        let eval = ExitEval {
            program,
            cost: DepthCost {
                layer: vec![10.0; 4],
                head: BTreeMap::from([(2, 3.0)]),
                final_head: 5.0,
                kv_fill: vec![2.0; 4],
            },
            layers: 4,
            exits: vec![2],
            batch: 1,
            reps: 1,
            cases: vec![case(vec![1, 2, 3]), case(vec![4, 5, 6])],
            full_tokens: vec![vec![1, 2, 3], vec![4, 5, 6]],
            full_nll: vec![1.0, 2.0],
        };
        (eval, dir)
    }

    fn results() -> Vec<CaseResult> {
        let full = stat(4, 4, 1, 0, true);
        let exit = stat(2, 2, 1, 2, false);
        vec![
            CaseResult {
                tokens: vec![1, 2, 9],
                stats: vec![full, exit, full],
                nll: 1.5,
            },
            CaseResult {
                tokens: vec![4, 5, 6],
                stats: vec![full, exit, exit],
                nll: 2.5,
            },
        ]
    }

    #[test]
    fn sweep_rows_match_hand_computed_figures() {
        let (eval, _dir) = evaluator();
        let timing = Timing {
            reps: vec![(100.0, 120.0), (100.0, 150.0), (110.0, 121.0)],
        };
        let row = eval.summarize(
            &[0, 1],
            &results(),
            Some(&timing),
            &Setting::Rule(ExitRule::Confidence(0.9)),
            "all",
        );
        // Exit-eligible tokens: the 2 after each case's first. 3 of 4 equal the full model's.
        assert_eq!(row.tokens, 4);
        assert!((row.agreement - 0.75).abs() < 1e-12);
        assert_eq!(row.first_token_agreement, 1.0);
        assert_eq!(row.exit_share, vec![(2, 0.75), (4, 0.25)]);
        assert!((row.avg_exit_layer - 2.5).abs() < 1e-12);
        // Paths: an exit 2·10 + 3 + 2·2 = 27, a full token 4·10 + 3 + 5 = 48; full model
        // 4·10 + 5 = 45; ideal 45 / ((3·27 + 48) / 4) = 45 / 32.25.
        assert!((row.ideal_speedup - 45.0 / 32.25).abs() < 1e-12);
        // Perplexity over the 4 eligible reference positions: e^(4/4) against e^(3/4).
        assert!((row.perplexity - 1f64.exp()).abs() < 1e-12);
        assert!((row.perplexity_change - (0.25f64.exp() - 1.0)).abs() < 1e-12);
        // Speedups per repetition 1.2, 1.5, 1.1: median 1.2, range 1.1..1.5; tokens/s the
        // median of 120, 150, 121.
        assert!((row.speedup - 1.2).abs() < 1e-12);
        assert!((row.speedup_range.0 - 1.1).abs() < 1e-12);
        assert!((row.speedup_range.1 - 1.5).abs() < 1e-12);
        assert_eq!(row.tokens_per_s, 121.0);
        // Per-case risk: 1 of 2 eligible tokens differ in case 0, none in case 1.
        assert_eq!(eval.risks(&[0, 1], &results()), vec![0.5, 0.0]);
    }

    #[test]
    fn the_oracle_is_costed_as_a_perfect_rule() {
        let (eval, _dir) = evaluator();
        // The oracle runs the full model (4 layers, one head) and records where it would have
        // exited: costed as stopping there (27) or at full depth (48).
        let ran = stat(2, 4, 1, 0, true);
        assert_eq!(eval.costed(&ran, true), stat(2, 2, 1, 2, false));
        assert_eq!(
            eval.costed(&stat(4, 4, 1, 0, true), true),
            stat(4, 4, 1, 0, true)
        );
        assert_eq!(eval.path_cost(&eval.costed(&ran, true)), 27.0);
        assert_eq!(eval.costed(&ran, false), ran);
    }

    #[test]
    fn learn_then_test_orders_thresholds_strictest_first() {
        let mut c = vec![
            ExitRule::Confidence(0.8),
            ExitRule::Confidence(0.98),
            ExitRule::Confidence(0.9),
        ];
        c.sort_by(stricter_first);
        assert_eq!(
            c,
            vec![
                ExitRule::Confidence(0.98),
                ExitRule::Confidence(0.9),
                ExitRule::Confidence(0.8)
            ]
        );
        let mut e = vec![
            ExitRule::Entropy(0.45),
            ExitRule::Entropy(0.05),
            ExitRule::Entropy(0.25),
        ];
        e.sort_by(stricter_first);
        assert_eq!(
            e,
            vec![
                ExitRule::Entropy(0.05),
                ExitRule::Entropy(0.25),
                ExitRule::Entropy(0.45)
            ]
        );
        // Tested strictest first, the chosen threshold is the last of the valid prefix:
        // p-values 0.01, 0.05, 0.3, 0.01 at ε = 0.1 keep the first two; the second is chosen.
        assert_eq!(ltt::fixed_sequence(&[0.01, 0.05, 0.3, 0.01], 0.1), 2);
    }

    #[test]
    fn calibration_and_held_out_splits_alternate() {
        assert_eq!(split(5), (vec![0, 2, 4], vec![1, 3]));
        assert_eq!(split(0), (vec![], vec![]));
    }

    #[test]
    fn skipdecode_settings_parse() {
        let s = parse_skipdecode("6:3:1", 6).unwrap();
        assert_eq!(
            (s.max_layers, s.min_layers, s.warmup, s.max_length),
            (6, 3, 1, None)
        );
        assert_eq!(
            parse_skipdecode("6:3:1:64", 6).unwrap().max_length,
            Some(64)
        );
        assert!(parse_skipdecode("7:3:1", 6).is_err());
        assert!(parse_skipdecode("6:3", 6).is_err());
        assert!(parse_skipdecode("6:x:1", 6).is_err());
    }

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
