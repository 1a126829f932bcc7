use exitgraph::inspect::summarize;
use exitgraph::pipeline::{compile, Pipeline};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint folder (config.json, safetensors) or pipeline (RON; its compiled graph and
    /// lowered program are reported); the demo model when omitted.
    model_dir: Option<PathBuf>,
    /// Context length at which to report FLOPs per token.
    #[arg(long, default_value_t = 512)]
    context: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = a
        .model_dir
        .unwrap_or_else(exitgraph::pipeline::demo_model_dir);
    // A file is a pipeline; anything else is a model folder (a missing one is reported as
    // such by the importer).
    if !path.is_file() {
        let ckpt = exitgraph_ir::import(&path)?;
        outln!("model            {}", path.display());
        out!("{}", summarize(&ckpt.graph).to_table(a.context));
        match &ckpt.tokenizer {
            Some(t) => outln!("\ntokenizer        {}", t.display()),
            None => outln!("\ntokenizer        none (prompts are token ids)"),
        }
        return Ok(());
    }
    let pipeline = Pipeline::read(&path)?;
    let compiled = compile(&pipeline, &path)?;
    outln!("pipeline         {}", path.display());
    outln!("model            {}", compiled.model_dir.display());
    out!("{}", summarize(&compiled.graph).to_table(a.context));
    let tied: std::collections::BTreeSet<usize> =
        compiled.graph.blocks.iter().map(|b| b.weights).collect();
    if tied.len() < compiled.graph.blocks.len() {
        outln!(
            "\nlooped           {} layers run {} weight identities ({} loops)",
            compiled.graph.blocks.len(),
            tied.len(),
            compiled
                .graph
                .blocks
                .iter()
                .map(|b| b.iteration + 1)
                .max()
                .unwrap_or(1)
        );
    }
    let program = compiled.lower()?;
    outln!(
        "program weights  {:.2} MB materialised ({} weight kernels, adapters included)",
        program.weight_bytes() as f64 / 1e6,
        program.weight_kernels()
    );
    Ok(())
}
