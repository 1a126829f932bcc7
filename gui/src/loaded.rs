//! A compiled pipeline as the explorer holds it: both graphs, their diff, the passes' reports,
//! the tokenizer and what the background jobs need to lower the program.

use crate::diff::{diff, GraphDiff};
use crate::serving::ProgramSource;
use crate::tokens::TokenText;
use exitgraph::pipeline::{compile, Pipeline};
use exitgraph_ir::Graph;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Loaded {
    pub pipeline: Pipeline,
    /// The file the pipeline came from (models resolve relative to it).
    pub path: PathBuf,
    pub model_dir: PathBuf,
    pub before: Graph,
    pub after: Graph,
    pub diff: GraphDiff,
    /// (pass, what it did) in order.
    pub passes: Vec<(String, String)>,
    pub tokens: Arc<TokenText>,
}

impl Loaded {
    /// Imports the model and runs the passes.
    pub fn compile(pipeline: &Pipeline, path: &Path) -> anyhow::Result<Loaded> {
        let c = compile(pipeline, path)?;
        let tokens = TokenText::load(c.checkpoint.tokenizer.as_deref())?;
        Ok(Loaded {
            diff: diff(&c.original, &c.graph),
            passes: c
                .outcomes
                .iter()
                .map(|o| (o.pass.to_string(), o.report.summary.clone()))
                .collect(),
            pipeline: c.pipeline,
            path: path.to_path_buf(),
            model_dir: c.model_dir,
            before: c.original,
            after: c.graph,
            tokens: Arc::new(tokens),
        })
    }

    pub fn source(&self) -> ProgramSource {
        ProgramSource {
            graph: self.after.clone(),
            model_dir: self.model_dir.clone(),
            device: self.pipeline.device,
            dtype: self.pipeline.dtype,
        }
    }

    /// Layers of the compiled model.
    pub fn depth(&self) -> usize {
        self.after.layers().last().map_or(0, |l| l + 1)
    }
}
