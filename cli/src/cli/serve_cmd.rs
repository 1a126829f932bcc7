use exitgraph::pipeline::{compile, Pipeline};
use exitgraph::runtime::cost::CostModel;
use exitgraph::runtime::metrics::RepeatedReport;
use exitgraph::runtime::policy::{Batching, Priority};
use exitgraph::runtime::sim_exits::{ExitSource, SkippedKv};
use exitgraph::runtime::trace::TraceWriter;
use exitgraph::runtime::workload::Workload;
use exitgraph::runtime::{Decoding, Executor, Runtime};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SkippedKvArg {
    Filled,
    Absent,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExecutorArg {
    /// Run the model with candle; the clock advances by measured step times.
    Real,
    /// Run no model; the clock advances by the cost model given with --cost.
    Sim,
}

#[derive(clap::Args)]
pub struct Args {
    /// Pipeline file (RON; its `runtime.batching` is the policy) or a model folder.
    pipeline: PathBuf,
    /// Workload file (RON): arrivals, prompt and output lengths, seed.
    #[arg(long)]
    workload: PathBuf,
    #[arg(long, value_enum, default_value = "real")]
    executor: ExecutorArg,
    /// Cost model written by `exitgraph profile` (needed by --executor sim).
    #[arg(long)]
    cost: Option<PathBuf>,
    /// Exit tokens at depths replayed from a trace or drawn from a distribution (RON:
    /// `Replay(trace: "t.jsonl")` or `Distribution(exits: [(1, 0.5), (4, 0.5)], seed: 0)`)
    /// instead of by an exit rule: the simulated executor charges the implied path; the real
    /// one runs it, taking each token from the exit head at its depth.
    #[arg(long, alias = "exit-depths")]
    sim_exits: Option<PathBuf>,
    /// The keys and values of the layers a token skipped by exiting early (an EarlyExit
    /// pipeline or --sim-exits): `filled` from its exit state in a separate call (CALM's
    /// state copying), or `absent`: never computed, later tokens attend in those layers only
    /// to the positions that reached them (recursion-wise caching, as Mixture-of-Recursions
    /// and the Relaxed Recursive Transformers' throughput simulation assume). Both
    /// executors do either. Default: the pipeline's `runtime.skipped_kv` (filled).
    #[arg(long, value_enum)]
    skipped_kv: Option<SkippedKvArg>,
    /// Stream one JSON record per generated token to this file (JSON Lines).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Write the metrics as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Serve the workload this many times and report each headline metric's median and
    /// range (the real executor's times vary from run to run; the trace is of the first run).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Override the policy: static, continuous, depthwise or looped (continuous depth-wise
    /// batching over a looped block: rows at every iteration share one step).
    #[arg(long)]
    policy: Option<String>,
    /// With --policy: most sequences per step.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// With --policy depthwise: stages the layers are cut into.
    #[arg(long, default_value_t = 2)]
    stages: usize,
    /// With --policy continuous or looped: most new tokens per step.
    #[arg(long, default_value_t = 512)]
    token_budget: usize,
    /// With --policy looped: which waiting rows a full step takes first.
    #[arg(long, value_enum, default_value = "deepest-first")]
    priority: PriorityArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum PriorityArg {
    /// Rows at the deepest loop iteration first (they finish soonest), then by arrival.
    DeepestFirst,
    /// By arrival, whatever the iteration.
    OldestFirst,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (pipeline, pipeline_path) = Pipeline::open(&a.pipeline)?;
    // The flags are checked before the (slower) compile.
    let batching = match a.policy.as_deref() {
        None => pipeline.runtime.batching.clone(),
        Some("static") => Batching::Static {
            max_batch: a.max_batch,
        },
        Some("continuous") => Batching::Continuous {
            max_batch: a.max_batch,
            token_budget: a.token_budget,
        },
        Some("depthwise") => Batching::DepthWise {
            max_batch: a.max_batch,
            stages: a.stages,
        },
        Some("looped") => Batching::LoopedDepthWise {
            max_batch: a.max_batch,
            token_budget: a.token_budget,
            priority: match a.priority {
                PriorityArg::DeepestFirst => Priority::DeepestFirst,
                PriorityArg::OldestFirst => Priority::OldestFirst,
            },
        },
        Some(other) => anyhow::bail!(
            "--policy {other}: unknown policy; expected static, continuous, depthwise or looped"
        ),
    };
    let executor = match a.executor {
        ExecutorArg::Real => Executor::Real,
        ExecutorArg::Sim => {
            let path = a.cost.as_deref().ok_or_else(|| {
                anyhow::anyhow!(
                    "--executor sim: the simulated executor needs a cost model; give one with \
                     --cost COST.ron (write it with `exitgraph profile`)"
                )
            })?;
            Executor::Sim(CostModel::read(path)?)
        }
    };
    let compiled = compile(&pipeline, &pipeline_path)?;
    let program = Arc::new(compiled.lower()?);
    let sim_exits = a
        .sim_exits
        .as_deref()
        .map(|p| ExitSource::read(p, compiled.graph.info.num_layers))
        .transpose()?;
    let workload = Workload::read(&a.workload)?;
    let base = a.workload.parent().unwrap_or_else(|| Path::new("."));
    let requests = workload
        .requests(compiled.graph.info.vocab, base)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", a.workload.display()))?;
    if a.reps == 0 {
        anyhow::bail!("--reps 0: serve at least once");
    }
    // The pipeline's sampling and seed; the workload's lengths are honoured (no EOS stop).
    let decoding = Decoding::new(
        &pipeline.runtime.sampling,
        pipeline.runtime.seed,
        Vec::new(),
    )?;
    let mut reports = Vec::with_capacity(a.reps);
    for rep in 0..a.reps {
        let trace = match (&a.trace, rep) {
            (Some(path), 0) => Some(TraceWriter::create(path)?),
            _ => None,
        };
        let executor = match &executor {
            Executor::Real => Executor::Real,
            Executor::Sim(cost) => Executor::Sim(cost.clone()),
        };
        let mut runtime = Runtime::new(
            program.clone(),
            batching.clone(),
            executor,
            decoding.clone(),
            requests.clone(),
            trace,
        );
        if let Some(src) = &sim_exits {
            runtime = runtime.with_simulated_exits(src.clone())?;
        }
        runtime = runtime.with_depth(pipeline.runtime.depth.clone())?;
        let skipped_kv = match a.skipped_kv {
            Some(SkippedKvArg::Filled) => SkippedKv::Filled,
            Some(SkippedKvArg::Absent) => SkippedKv::Absent,
            None => pipeline.runtime.skipped_kv,
        };
        if skipped_kv == SkippedKv::Absent {
            let said = if a.skipped_kv.is_some() {
                "--skipped-kv absent"
            } else {
                "the pipeline's runtime.skipped_kv: Absent"
            };
            if sim_exits.is_none()
                && matches!(pipeline.runtime.depth, exitgraph::exits::Depth::Full)
            {
                anyhow::bail!(
                    "{said}: no token exits early here (the pipeline's depth is Full and no \
                     --sim-exits is given), so no layer is skipped"
                );
            }
            runtime = runtime
                .with_skipped_kv(SkippedKv::Absent)
                .map_err(|e| anyhow::anyhow!("{said}: {e}"))?;
        }
        let (report, _) = runtime.run()?;
        reports.push(report);
    }
    if a.reps == 1 {
        let report = reports.remove(0);
        out!("{}", report.to_table());
        if let Some(path) = &a.json {
            exitgraph::atomic::write_text(path, &serde_json::to_string_pretty(&report)?)?;
        }
    } else {
        let repeated = RepeatedReport::of(reports);
        out!("{}", repeated.reports[0].to_table());
        outln!();
        out!("{}", repeated.to_table());
        if let Some(path) = &a.json {
            exitgraph::atomic::write_text(path, &serde_json::to_string_pretty(&repeated)?)?;
        }
    }
    if let Some(t) = &a.trace {
        outln!("trace: {}", t.display());
    }
    if let Some(path) = &a.json {
        outln!("wrote {}", path.display());
    }
    Ok(())
}
