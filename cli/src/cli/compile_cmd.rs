use anyhow::Context;
use exitgraph::pipeline::{compile, Pipeline};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Pipeline file (RON).
    pipeline: PathBuf,
    /// Write the compiled graph as Graphviz DOT (nodes a pass added or changed are filled).
    #[arg(long)]
    dot: Option<PathBuf>,
    /// Write the compiled graph's structure as RON.
    #[arg(long)]
    emit_ir: Option<PathBuf>,
}

/// Writes `text` to `path` through a temporary file, then renames.
pub fn write_text_atomic(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("{}: cannot write", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let pipeline = Pipeline::read(&a.pipeline)?;
    let compiled = compile(&pipeline, &a.pipeline)?;
    outln!(
        "model {} ({}, {} layers, {} nodes)",
        compiled.model_dir.display(),
        compiled.original.info.model_type,
        compiled.original.info.num_layers,
        compiled.original.graph.node_count()
    );
    if compiled.outcomes.is_empty() {
        outln!("no passes: the model runs as imported");
    }
    let mut touched = Vec::new();
    for (i, o) in compiled.outcomes.iter().enumerate() {
        outln!("pass {} {}: {}", i + 1, o.pass, o.report.summary);
        for (what, names) in [
            ("added", &o.report.added),
            ("changed", &o.report.changed),
            ("removed", &o.report.removed),
        ] {
            if !names.is_empty() {
                outln!("    {what} {}: {}", names.len(), names.join(", "));
            }
        }
        touched.extend(o.report.added.iter().cloned());
        touched.extend(o.report.changed.iter().cloned());
    }
    outln!(
        "result: {} layers, {} nodes, {} parameters, outputs {}",
        compiled.graph.info.num_layers,
        compiled.graph.graph.node_count(),
        compiled.graph.params(),
        compiled
            .graph
            .outputs
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(path) = &a.dot {
        write_text_atomic(
            path,
            &exitgraph_ir::serial::to_dot(&compiled.graph, &touched),
        )?;
        outln!("wrote {}", path.display());
    }
    if let Some(path) = &a.emit_ir {
        let ron = exitgraph_ir::serial::to_ron(&compiled.graph).context("serialising the graph")?;
        write_text_atomic(path, &ron)?;
        outln!("wrote {}", path.display());
    }
    Ok(())
}
