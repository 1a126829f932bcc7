use exitgraph::pipeline::{compile, Pipeline};
use exitgraph::runtime::cost::CostModel;
use exitgraph::runtime::policy::Batching;
use exitgraph::runtime::trace::TraceWriter;
use exitgraph::runtime::workload::Workload;
use exitgraph::runtime::{Decoding, Executor, Runtime};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// Stream one JSON record per generated token to this file (JSON Lines).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Write the metrics as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Override the policy: static, continuous or depthwise.
    #[arg(long)]
    policy: Option<String>,
    /// With --policy: most sequences per step.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// With --policy depthwise: stages the layers are cut into.
    #[arg(long, default_value_t = 2)]
    stages: usize,
    /// With --policy continuous: most new tokens per step.
    #[arg(long, default_value_t = 512)]
    token_budget: usize,
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
        Some(other) => anyhow::bail!(
            "--policy {other}: unknown policy; expected static, continuous or depthwise"
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
    let workload = Workload::read(&a.workload)?;
    let base = a.workload.parent().unwrap_or_else(|| Path::new("."));
    let requests = workload
        .requests(compiled.graph.info.vocab, base)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", a.workload.display()))?;
    let trace = a.trace.as_deref().map(TraceWriter::create).transpose()?;
    // The pipeline's sampling and seed; the workload's lengths are honoured (no EOS stop).
    let decoding = Decoding::new(
        &pipeline.runtime.sampling,
        pipeline.runtime.seed,
        Vec::new(),
    )?;
    let (report, _) = Runtime::new(program, batching, executor, decoding, requests, trace)
        .with_depth(pipeline.runtime.depth.clone())?
        .run()?;
    out!("{}", report.to_table());
    if let Some(t) = &a.trace {
        outln!("trace: {}", t.display());
    }
    if let Some(path) = &a.json {
        exitgraph::atomic::write_text(path, &serde_json::to_string_pretty(&report)?)?;
        outln!("wrote {}", path.display());
    }
    Ok(())
}
