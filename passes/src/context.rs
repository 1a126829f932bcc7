//! What every pass may reach besides the graph: files named in the pipeline (resolved
//! relative to the pipeline file) and the weight catalog they extend.

use exitgraph_ir::Graph;
use std::path::{Path, PathBuf};

/// The environment a pipeline's passes run in.
#[derive(Clone, Debug, Default)]
pub struct PassContext {
    /// Folder of the pipeline file; `None` when the passes come from code, not a file.
    base: Option<PathBuf>,
}

/// Why a pass could not read a file it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProblem(pub String);

impl PassContext {
    /// Passes of the pipeline file `pipeline`: relative paths resolve next to it.
    pub fn for_pipeline(pipeline: &Path) -> Self {
        PassContext {
            base: Some(
                pipeline
                    .parent()
                    .unwrap_or_else(|| Path::new("."))
                    .to_path_buf(),
            ),
        }
    }

    /// Passes built in code: relative paths resolve against the working directory.
    pub fn detached() -> Self {
        PassContext::default()
    }

    /// The path a file written in the pipeline names.
    pub fn resolve(&self, file: &str) -> PathBuf {
        let f = Path::new(file);
        match &self.base {
            Some(base) if !f.is_absolute() => base.join(f),
            _ => f.to_path_buf(),
        }
    }

    /// Adds the tensors of the safetensors file `file` to the graph's weight catalog (by
    /// absolute path, so lowering reads them beside the checkpoint's own). Tensors may
    /// replace catalog entries only where `may_replace` says so (a pass's own trained
    /// weights); any other clash would shadow the checkpoint and is refused. Returns the
    /// tensor names added.
    pub fn add_weights(
        &self,
        graph: &mut Graph,
        file: &str,
        may_replace: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, FileProblem> {
        let path = self.resolve(file);
        if !path.is_file() {
            return Err(FileProblem(format!(
                "\"{file}\" resolves to {}, which is not a file",
                path.display()
            )));
        }
        let abs = std::fs::canonicalize(&path).unwrap_or(path.clone());
        let tensors = exitgraph_ir::import::read_header(&abs, &abs.display().to_string())
            .map_err(|e| FileProblem(e.to_string()))?;
        if let Some(name) = tensors
            .keys()
            .find(|n| graph.weights.tensors.contains_key(*n) && !may_replace(n))
        {
            return Err(FileProblem(format!(
                "{}: tensor {name} would shadow the checkpoint's own",
                path.display()
            )));
        }
        let names: Vec<String> = tensors.keys().cloned().collect();
        graph.weights.tensors.extend(tensors);
        Ok(names)
    }
}
