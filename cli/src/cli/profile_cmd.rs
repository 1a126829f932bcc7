use exitgraph::pipeline::{compile, Pipeline};
use exitgraph::runtime::cost::{profile, CostModel};
use indicatif::ProgressBar;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Pipeline file (RON) or model folder whose program to measure.
    pipeline: PathBuf,
    /// Where to write the cost model (RON).
    #[arg(short, long)]
    output: PathBuf,
    /// Timed repetitions per step shape (the median is kept; their range is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Largest prefill measured, in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Largest decode batch measured, in sequences.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Measure nothing: derive the cost model of a machine bound by its memory bandwidth and
    /// arithmetic peak (--bandwidth-gbs, --peak-tflops) from the pipeline's graph.
    #[arg(long, requires_all = ["bandwidth_gbs", "peak_tflops"])]
    roofline: bool,
    /// With --roofline: memory bandwidth, GB/s (e.g. 1555 for an A100 40GB).
    #[arg(long, requires = "roofline")]
    bandwidth_gbs: Option<f64>,
    /// With --roofline: arithmetic peak, TFLOP/s (e.g. 312 for an A100's bf16 tensor cores).
    #[arg(long, requires = "roofline")]
    peak_tflops: Option<f64>,
    /// With --roofline: bytes per weight (2 for bf16, 4 for f32).
    #[arg(long, default_value_t = 2.0, requires = "roofline")]
    weight_bytes: f64,
    /// With --roofline: bytes per cached key or value element.
    #[arg(long, default_value_t = 2.0, requires = "roofline")]
    kv_bytes: f64,
    /// Measure nothing: fit the cost model again to the step samples in this cost model
    /// file (one `profile` wrote), with this version's terms (--reps, --max-tokens and
    /// --max-batch then do not apply).
    #[arg(long, conflicts_with = "roofline")]
    refit: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (pipeline, pipeline_path) = Pipeline::open(&a.pipeline)?;
    let compiled = compile(&pipeline, &pipeline_path)?;
    if a.roofline {
        return roofline(&a, &compiled.graph);
    }
    let model = match &a.refit {
        Some(path) => {
            let old = CostModel::read(path)?;
            if old.samples.is_empty() {
                anyhow::bail!(
                    "--refit {}: the cost model holds no measured samples to fit",
                    path.display()
                );
            }
            CostModel::fit(old.samples)
                .map_err(|e| anyhow::anyhow!("--refit {}: {e}", path.display()))?
        }
        None => {
            let program = compiled.lower()?;
            let bar = ProgressBar::new(0);
            let model = profile(
                &program,
                a.reps,
                a.max_tokens,
                a.max_batch,
                |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                },
            )?;
            bar.finish_and_clear();
            model
        }
    };
    model.write(&a.output)?;
    let [c0, c1, c2, c3] = model.coefficients;
    outln!(
        "step time = {:.3} ms + s x ({:.4} ms/token + {:.6} ms/(token x context) + {:.4} \
         ms/sequence + {:.3} ms) + {:.4} ms/head, s = share of the layers run",
        c0 * 1e3,
        c1 * 1e3,
        c2 * 1e3,
        model.per_sequence_layers * 1e3,
        model.per_layers * 1e3,
        c3 * 1e3,
    );
    if model.per_layers_rows > 0.0 || model.per_head_call > 0.0 {
        outln!(
            "  + {:.3} ms x s for a call of two or more rows + {:.3} ms for a call that runs a head",
            model.per_layers_rows * 1e3,
            model.per_head_call * 1e3,
        );
    }
    let errors: Vec<f64> = model
        .samples
        .iter()
        .map(|s| model.predict_sample(s) / s.seconds - 1.0)
        .collect();
    let worst = errors.iter().fold(0.0f64, |w, e| w.max(e.abs()));
    let rms = (errors.iter().map(|e| e * e).sum::<f64>() / errors.len().max(1) as f64).sqrt();
    outln!(
        "{} step shapes measured; largest relative error of the fit {:.1}%, root mean square \
         {:.1}%",
        model.samples.len(),
        100.0 * worst,
        100.0 * rms
    );
    let spread = exitgraph::runtime::metrics::Spread::of(
        &model.samples.iter().map(|s| s.spread).collect::<Vec<_>>(),
    );
    let reps = match &a.refit {
        Some(_) => "repetitions".to_string(),
        None => format!("{} repetitions", a.reps.max(1)),
    };
    outln!(
        "range of the {reps} per shape, relative to their median: median {:.1}%, largest {:.1}%",
        100.0 * spread.median,
        100.0 * spread.max
    );
    outln!("wrote {}", a.output.display());
    Ok(())
}

/// `profile --roofline`: the derived cost model, written and summarised.
fn roofline(a: &Args, graph: &exitgraph_ir::Graph) -> anyhow::Result<()> {
    use exitgraph::runtime::cost::{CostModel, Roofline};
    let machine = Roofline {
        bandwidth: a.bandwidth_gbs.unwrap_or(0.0) * 1e9,
        peak: a.peak_tflops.unwrap_or(0.0) * 1e12,
        weight_bytes: a.weight_bytes,
        kv_bytes: a.kv_bytes,
    };
    let model = CostModel::roofline(graph, machine).map_err(|e| {
        anyhow::anyhow!(
            "profile --roofline (--bandwidth-gbs {:?}, --peak-tflops {:?}, --weight-bytes {}, \
             --kv-bytes {}): {e}",
            a.bandwidth_gbs,
            a.peak_tflops,
            a.weight_bytes,
            a.kv_bytes
        )
    })?;
    model.write(&a.output)?;
    let [c0, c1, c2, c3] = model.coefficients;
    outln!(
        "roofline of {:.0} GB/s and {:.0} TFLOP/s ({} bytes per weight): a call reads every \
         layer's weights in {:.4} ms x s and the LM head in {:.4} ms; {:.6} ms per token x s, \
         {:.8} ms per (token x context) x s, {:.6} ms per head, {:.6} ms per group of rows at \
         one iteration x s; s = share of the layers run",
        machine.bandwidth / 1e9,
        machine.peak / 1e12,
        machine.weight_bytes,
        model.per_layers * 1e3,
        c0 * 1e3,
        c1 * 1e3,
        c2 * 1e3,
        c3 * 1e3,
        model.per_group * 1e3,
    );
    outln!("wrote {}", a.output.display());
    Ok(())
}
