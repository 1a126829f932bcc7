use exitgraph::pipeline::{compile, Pipeline};
use exitgraph::runtime::cost::profile;
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
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (pipeline, pipeline_path) = Pipeline::open(&a.pipeline)?;
    let compiled = compile(&pipeline, &pipeline_path)?;
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
    let worst = model
        .samples
        .iter()
        .map(|s| (model.predict_sample(s) / s.seconds - 1.0).abs())
        .fold(0.0, f64::max);
    outln!(
        "{} step shapes measured; largest relative error of the fit {:.1}%",
        model.samples.len(),
        100.0 * worst
    );
    let spread = exitgraph::runtime::metrics::Spread::of(
        &model.samples.iter().map(|s| s.spread).collect::<Vec<_>>(),
    );
    outln!(
        "range of the {} repetitions per shape, relative to their median: median {:.1}%, \
         largest {:.1}%",
        a.reps.max(1),
        100.0 * spread.median,
        100.0 * spread.max
    );
    outln!("wrote {}", a.output.display());
    Ok(())
}
