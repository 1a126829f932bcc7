//! Runs prompts and workloads through exitgraph's runtime and collects their traces.

use crate::jobs::Reporter;
use exitgraph::device::{DeviceSpec, DtypeSpec};
use exitgraph::exits::Depth;
use exitgraph::exits::SkippedKv;
use exitgraph::generate::Sampling;
use exitgraph::lower::Program;
use exitgraph::runtime::cost::CostModel;
use exitgraph::runtime::metrics::ServeReport;
use exitgraph::runtime::policy::Batching;
use exitgraph::runtime::trace::{read_trace, TraceRecord, TraceWriter};
use exitgraph::runtime::workload::RequestSpec;
use exitgraph::runtime::workload::{Length, Workload};
use exitgraph::runtime::{Decoding, Executor, Runtime};
use exitgraph_ir::Graph;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The compiled graph and how to lower it.
#[derive(Clone)]
pub struct ProgramSource {
    pub graph: Graph,
    pub model_dir: PathBuf,
    pub device: DeviceSpec,
    pub dtype: DtypeSpec,
}

impl ProgramSource {
    pub fn lower(&self) -> anyhow::Result<Program> {
        let device = self.device.to_candle()?;
        Ok(Program::lower(
            &self.graph,
            &self.model_dir,
            &device,
            self.dtype.to_candle(),
        )?)
    }
}

/// Prompts to generate from, and how.
#[derive(Clone)]
pub struct PromptRun {
    pub prompts: Vec<Vec<u32>>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    pub stop_ids: Vec<u32>,
    /// How deep tokens run (the pipeline's `runtime.depth`).
    pub depth: Depth,
    /// What becomes of an exited token's skipped layers (the pipeline's
    /// `runtime.skipped_kv`).
    pub skipped_kv: SkippedKv,
}

/// What a prompt run produced.
#[derive(Clone, Debug, Default)]
pub struct PromptResult {
    /// One record per generated token; `seq` is the prompt's index.
    pub records: Vec<TraceRecord>,
    /// The generated ids per prompt.
    pub outputs: Vec<Vec<u32>>,
    /// Per prompt, GemFilter's selection when the pipeline has one.
    pub selections: Vec<Option<Selection>>,
}

/// Which prompt tokens GemFilter kept, and the filter layer's score of each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selection {
    pub prompt: Vec<u32>,
    pub kept: Vec<usize>,
    pub scores: Vec<f32>,
}

fn run_traced(
    program: Arc<Program>,
    batching: Batching,
    executor: Executor,
    decoding: Decoding,
    requests: Vec<RequestSpec>,
    depth: &Depth,
    skipped_kv: SkippedKv,
) -> anyhow::Result<(
    ServeReport,
    Vec<exitgraph::runtime::metrics::RequestOutcome>,
    Vec<TraceRecord>,
)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("trace.jsonl");
    let writer = TraceWriter::create(&path)?;
    let (report, outcomes) = Runtime::new(
        program,
        batching,
        executor,
        decoding,
        requests,
        Some(writer),
    )
    .with_depth(depth.clone())?
    .with_skipped_kv(skipped_kv)?
    .run()?;
    let records = read_trace(&path)?.collect::<anyhow::Result<Vec<_>>>()?;
    Ok((report, outcomes, records))
}

/// Generates from each prompt in turn through the runtime (real executor), reporting
/// progress per prompt.
pub fn run_prompts(
    source: &ProgramSource,
    run: &PromptRun,
    reporter: Option<&Reporter>,
) -> anyhow::Result<PromptResult> {
    let report = |f: f32, m: String| {
        if let Some(r) = reporter {
            r.set(f, m);
        }
    };
    report(0.0, "lowering the program".into());
    let program = Arc::new(source.lower()?);
    let decoding = Decoding::new(&run.sampling, run.seed, run.stop_ids.clone())?;
    let n = run.prompts.len();
    let mut out = PromptResult::default();
    for (i, prompt) in run.prompts.iter().enumerate() {
        report(i as f32 / n as f32, format!("prompt {} of {n}", i + 1));
        let request = RequestSpec {
            id: i,
            arrival_s: 0.0,
            prompt: prompt.clone(),
            max_new_tokens: run.max_new_tokens,
            forced: Vec::new(),
            depth: None,
        };
        let (_, outcomes, records) = run_traced(
            program.clone(),
            Batching::Static { max_batch: 1 },
            Executor::Real,
            decoding.clone(),
            vec![request],
            &run.depth,
            run.skipped_kv,
        )?;
        if let Some(f) = outcomes.iter().find_map(|o| o.failed.clone()) {
            anyhow::bail!("prompt {}: {f}", i + 1);
        }
        let outcome = outcomes.into_iter().next();
        out.selections.push(outcome.as_ref().and_then(|o| {
            Some(Selection {
                prompt: prompt.clone(),
                kept: o.selected.clone()?,
                scores: o.selection_scores.clone()?,
            })
        }));
        out.outputs
            .push(outcome.map(|o| o.tokens).unwrap_or_default());
        out.records.extend(records);
    }
    report(1.0, format!("{n} prompts done"));
    Ok(out)
}

/// A simulated serving run.
#[derive(Clone)]
pub struct SimRun {
    pub workload: PathBuf,
    pub cost: PathBuf,
    pub batching: Batching,
    pub sampling: Sampling,
    pub seed: u64,
    /// How deep tokens run; exit rules need the real executor, so early exiting simulates
    /// full depth.
    pub depth: Depth,
}

/// Most tokens a simulated workload may produce here (the explorer holds its trace).
pub const MAX_SIM_TOKENS: usize = 1_000_000;

fn mean_len(l: &Length) -> usize {
    match *l {
        Length::Fixed(n) => n,
        Length::Uniform { min, max } => (min + max) / 2,
    }
}

/// Serves a workload with the simulated executor.
pub fn simulate(
    source: &ProgramSource,
    sim: &SimRun,
    reporter: Option<&Reporter>,
) -> anyhow::Result<(ServeReport, Vec<TraceRecord>)> {
    let report = |f: f32, m: &str| {
        if let Some(r) = reporter {
            r.set(f, m);
        }
    };
    report(0.0, "reading the workload and cost model");
    let workload = Workload::read(&sim.workload)?;
    let expected = workload
        .requests
        .saturating_mul(mean_len(&workload.output_len));
    if expected > MAX_SIM_TOKENS {
        anyhow::bail!(
            "{}: about {expected} tokens; the explorer plots workloads of up to {MAX_SIM_TOKENS} (use `exitgraph serve --executor sim` for larger ones)",
            sim.workload.display()
        );
    }
    let cost = CostModel::read(&sim.cost)?;
    let base = sim.workload.parent().unwrap_or_else(|| Path::new("."));
    let requests = workload
        .requests(source.graph.info.vocab, base)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", sim.workload.display()))?;
    report(0.2, "lowering the program");
    let program = Arc::new(source.lower()?);
    report(0.4, "simulating");
    let decoding = Decoding::new(&sim.sampling, sim.seed, Vec::new())?;
    let (serve, _, records) = run_traced(
        program,
        sim.batching.clone(),
        Executor::Sim(cost),
        decoding,
        requests,
        &match &sim.depth {
            // The simulator runs no model: exit rules and drafts cannot be judged, so these
            // simulate the full model (whose tokens self-speculation reproduces).
            Depth::EarlyExit { .. } | Depth::SelfSpeculative { .. } => Depth::Full,
            other => other.clone(),
        },
        SkippedKv::Filled,
    )?;
    report(1.0, "done");
    Ok((serve, records))
}
