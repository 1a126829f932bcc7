use exitgraph::bench::{run as run_bench, BenchOptions};
use exitgraph::synth::LlamaSpec;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Benchmark this Llama checkpoint instead of a random ~100M-parameter one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt tokens in the prefill.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens decoded one at a time after the prefill.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Layers of the random model.
    #[arg(long, default_value_t = 12)]
    layers: usize,
    /// Hidden size of the random model.
    #[arg(long, default_value_t = 768)]
    hidden: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Benchmark adaptive depth instead: decode speed of early exits and SkipDecode on the
    /// random model, measured against the ideal speedup their paths imply.
    #[arg(long)]
    exits: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut spec = LlamaSpec::bench_100m();
    spec.layers = a.layers;
    spec.hidden = a.hidden;
    spec.heads = (a.hidden / 64).max(1);
    spec.kv_heads = spec.heads;
    spec.intermediate = a.hidden * 8 / 3;
    let opts = BenchOptions {
        spec,
        model_dir: a.model,
        prompt_len: a.prompt_len,
        decode_tokens: a.decode_tokens,
        reps: a.reps.max(1),
        seed: a.seed,
    };
    if a.exits {
        let bar = ProgressBar::new_spinner();
        let report = exitgraph::bench_exits::run(&opts, |what| {
            bar.set_message(what.to_string());
            bar.tick();
        })?;
        bar.finish_and_clear();
        out!("{}", report.to_markdown());
        return Ok(());
    }
    let bar = ProgressBar::new(opts.reps as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} runs ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("bench");
    let report = run_bench(&opts, |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    out!("{}", report.to_markdown());
    Ok(())
}
