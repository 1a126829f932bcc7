use exitgraph::inspect::summarize;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint folder (config.json, safetensors); the demo model when omitted.
    model_dir: Option<PathBuf>,
    /// Context length at which to report FLOPs per token.
    #[arg(long, default_value_t = 512)]
    context: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dir = a
        .model_dir
        .unwrap_or_else(exitgraph::pipeline::demo_model_dir);
    let ckpt = exitgraph_ir::import(&dir)?;
    outln!("model            {}", dir.display());
    out!("{}", summarize(&ckpt.graph).to_table(a.context));
    match &ckpt.tokenizer {
        Some(t) => outln!("\ntokenizer        {}", t.display()),
        None => outln!("\ntokenizer        none (prompts are token ids)"),
    }
    Ok(())
}
