use exitgraph::inspect::summarize;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint folder (config.json, safetensors).
    model_dir: PathBuf,
    /// Context length at which to report FLOPs per token.
    #[arg(long, default_value_t = 512)]
    context: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let ckpt = exitgraph_ir::import(&a.model_dir)?;
    println!("model            {}", a.model_dir.display());
    print!("{}", summarize(&ckpt.graph).to_table(a.context));
    match &ckpt.tokenizer {
        Some(t) => println!("\ntokenizer        {}", t.display()),
        None => println!("\ntokenizer        none (prompts are token ids)"),
    }
    Ok(())
}
