use exitgraph::eval::layers::eval_layers;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Per task, answer-token accuracy when decoding from each layer (logit lens).
    Layers(LayersArgs),
}

#[derive(clap::Args)]
pub struct LayersArgs {
    /// Checkpoint folder with tokenizer.json (trained by `exitgraph train lm`); the demo
    /// model when omitted.
    model_dir: Option<PathBuf>,
    /// Seed of the held-out corpus (the demo model trained on seed 1).
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Held-out examples, mixed evenly over the tasks.
    #[arg(long, default_value_t = 1000)]
    examples: usize,
    /// Also write the table as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(cmd: EvalCommand) -> anyhow::Result<()> {
    match cmd {
        EvalCommand::Layers(a) => {
            let dir = a
                .model_dir
                .unwrap_or_else(exitgraph::pipeline::demo_model_dir);
            let report = eval_layers(&dir, a.seed, a.examples)?;
            out!("{}", report.to_markdown());
            if let Some(path) = &a.json {
                exitgraph::atomic::write_text(path, &serde_json::to_string_pretty(&report)?)?;
                outln!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}
