//! Pipeline files (RON): which model, where it runs, which passes rewrite it, and how the
//! runtime decodes.
//!
//! ```ron
//! Pipeline(
//!     model: "../tests/fixtures/tiny-llama", // relative to this file
//!     device: Cpu,
//!     dtype: F32,
//!     passes: [TruncateLayers(keep: 4)],
//!     runtime: (max_new_tokens: 16, sampling: Greedy, seed: 0),
//! )
//! ```

use crate::device::{DeviceSpec, DtypeSpec};
use crate::generate::{GenerateOptions, Sampling};
use crate::lower::{LowerError, Program};
use exitgraph_ir::{Checkpoint, Graph, ImportError};
use exitgraph_passes::{PassContext, PassError, PassManager, PassOutcome, PassSpec};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Current version of the pipeline format.
pub const PIPELINE_VERSION: u32 = 1;

fn default_version() -> u32 {
    PIPELINE_VERSION
}

/// The demo model shipped in `models/demo` of the exitgraph checkout.
pub fn demo_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

fn default_model() -> String {
    demo_model_dir().display().to_string()
}

impl Pipeline {
    /// The demo model as imported, with the default runtime.
    pub fn demo() -> Self {
        Pipeline {
            version: PIPELINE_VERSION,
            model: default_model(),
            device: DeviceSpec::default(),
            dtype: DtypeSpec::default(),
            passes: Vec::new(),
            runtime: RuntimeSpec::default(),
        }
    }
}

fn default_max_new_tokens() -> usize {
    32
}

fn default_true() -> bool {
    true
}

/// How the runtime decodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub sampling: Sampling,
    #[serde(default)]
    pub seed: u64,
    /// Stop a sequence at the model's end-of-sequence token.
    #[serde(default = "default_true")]
    pub stop_at_eos: bool,
    /// How `serve` batches requests.
    #[serde(default = "default_batching")]
    pub batching: crate::batching::Batching,
    /// How deep each token runs: `Full`, `EarlyExit(rule: ...)` (needs an `InsertExits`
    /// pass) or `SkipDecode((max_layers: .., min_layers: .., warmup: ..))`.
    #[serde(default)]
    pub depth: crate::exits::Depth,
    /// What becomes of the keys and values of the layers an early-exiting token skipped:
    /// `Filled` from its exit state (the default) or `Absent`.
    #[serde(default)]
    pub skipped_kv: crate::exits::SkippedKv,
}

fn default_batching() -> crate::batching::Batching {
    crate::batching::Batching::Continuous {
        max_batch: 8,
        token_budget: 512,
    }
}

impl Default for RuntimeSpec {
    fn default() -> Self {
        RuntimeSpec {
            max_new_tokens: default_max_new_tokens(),
            sampling: Sampling::Greedy,
            seed: 0,
            stop_at_eos: true,
            batching: default_batching(),
            depth: crate::exits::Depth::Full,
            skipped_kv: crate::exits::SkippedKv::Filled,
        }
    }
}

impl RuntimeSpec {
    pub fn generate_options(&self) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling.clone(),
            seed: self.seed,
            stop_at_eos: self.stop_at_eos,
        }
    }
}

/// A pipeline file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    #[serde(default = "default_version")]
    pub version: u32,
    /// Checkpoint folder, relative to the pipeline file; the demo model when omitted.
    #[serde(default = "default_model")]
    pub model: String,
    #[serde(default)]
    pub device: DeviceSpec,
    #[serde(default)]
    pub dtype: DtypeSpec,
    #[serde(default)]
    pub passes: Vec<PassSpec>,
    #[serde(default)]
    pub runtime: RuntimeSpec,
}

/// Each message includes its cause, so causes are plain fields (`cause`), not `source()`:
/// printing the chain (`{:#}`, as the CLI does) would repeat them.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {cause}", path = path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}", path = path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: field \"{field}\": {message}", path = path.display())]
    Field {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
    /// The import error names the model's files.
    #[error("{cause}")]
    Import { model: PathBuf, cause: ImportError },
    /// `at`: the line and column of the failing field (or pass) in the pipeline file, when
    /// the file on disk is the pipeline compiled and names that pass once.
    #[error("{path}{at}: {cause}", path = path.display(), at = at.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Pass {
        path: PathBuf,
        at: Option<(usize, usize)>,
        cause: PassError,
    },
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("lowering {model}: {cause}", model = model.display())]
    Lower {
        model: PathBuf,
        cause: Box<LowerError>,
    },
}

impl Pipeline {
    /// Parses pipeline RON; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Pipeline, PipelineError> {
        // Optional fields take a bare value (`weights: "heads.safetensors"`) or `Some(..)`.
        let options = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
        let p: Pipeline = options.from_str(text).map_err(|e| PipelineError::Parse {
            path: path.to_path_buf(),
            line: e.span.start.line,
            column: e.span.start.col,
            message: e.code.to_string(),
        })?;
        if p.version != PIPELINE_VERSION {
            return Err(PipelineError::Field {
                path: path.to_path_buf(),
                field: "version",
                message: format!(
                    "version {} is not supported (this exitgraph reads {PIPELINE_VERSION})",
                    p.version
                ),
            });
        }
        Ok(p)
    }

    /// A pipeline file, or a model folder given where a pipeline is expected (the model as
    /// imported, no passes, the default runtime). Returns the pipeline and the path relative
    /// files resolve against (for a folder, a pipeline inside it naming the model `.`).
    pub fn open(path: &Path) -> Result<(Pipeline, PathBuf), PipelineError> {
        if path.is_dir() {
            let pipeline = Pipeline {
                model: ".".into(),
                ..Pipeline::demo()
            };
            return Ok((pipeline, path.join("pipeline.ron")));
        }
        Ok((Pipeline::read(path)?, path.to_path_buf()))
    }

    /// Reads a pipeline file.
    pub fn read(path: &Path) -> Result<Pipeline, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|cause| PipelineError::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        Pipeline::parse(&text, path)
    }

    /// The pipeline as pretty RON.
    pub fn to_ron(&self) -> String {
        let cfg = ron::ser::PrettyConfig::new()
            .new_line("\n".to_string())
            .struct_names(true);
        ron::ser::to_string_pretty(self, cfg).unwrap_or_default()
    }
}

/// A pipeline after import and passes.
pub struct Compiled {
    pub pipeline: Pipeline,
    /// The checkpoint folder, resolved.
    pub model_dir: PathBuf,
    pub checkpoint: Checkpoint,
    /// The graph as imported.
    pub original: Graph,
    /// The graph after every pass.
    pub graph: Graph,
    pub outcomes: Vec<PassOutcome>,
}

/// Resolves the model folder of a pipeline read from `pipeline_path`.
pub fn resolve_model(pipeline: &Pipeline, pipeline_path: &Path) -> PathBuf {
    let model = Path::new(&pipeline.model);
    if model.is_absolute() {
        model.to_path_buf()
    } else {
        pipeline_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(model)
    }
}

/// Imports the model and runs the passes.
pub fn compile(pipeline: &Pipeline, pipeline_path: &Path) -> Result<Compiled, PipelineError> {
    let model_dir = resolve_model(pipeline, pipeline_path);
    if !model_dir.is_dir() {
        return Err(PipelineError::Field {
            path: pipeline_path.to_path_buf(),
            field: "model",
            message: format!(
                "\"{}\" resolves to {}, which is not a folder",
                pipeline.model,
                model_dir.display()
            ),
        });
    }
    let checkpoint = exitgraph_ir::import(&model_dir).map_err(|cause| PipelineError::Import {
        model: model_dir.clone(),
        cause,
    })?;
    let original = checkpoint.graph.clone();
    let mut graph = checkpoint.graph.clone();
    let manager = PassManager::new(pipeline.passes.iter().map(PassSpec::build).collect());
    let outcomes = manager
        .run_in(&mut graph, &PassContext::for_pipeline(pipeline_path))
        .map_err(|cause| PipelineError::Pass {
            path: pipeline_path.to_path_buf(),
            at: locate_in_file(pipeline, pipeline_path, &cause),
            cause,
        })?;
    Ok(Compiled {
        pipeline: pipeline.clone(),
        model_dir,
        checkpoint,
        original,
        graph,
        outcomes,
    })
}

/// Where a pass error points in the pipeline file: only when the file parses to `pipeline`
/// itself (a file on disk that differs would give a misleading position) and names the pass
/// once.
fn locate_in_file(pipeline: &Pipeline, path: &Path, e: &PassError) -> Option<(usize, usize)> {
    let (pass, field) = match e {
        PassError::Field { pass, field, .. } => (*pass, Some(*field)),
        PassError::Config { pass, .. } | PassError::Broken { pass, .. } => (*pass, None),
    };
    let text = std::fs::read_to_string(path).ok()?;
    if Pipeline::parse(&text, path).ok().as_ref() != Some(pipeline) {
        return None;
    }
    crate::ron_file::locate_field(&text, pass, field)
}

impl Compiled {
    /// Lowers the compiled graph on the pipeline's device and dtype.
    pub fn lower(&self) -> Result<Program, PipelineError> {
        let device = self.pipeline.device.to_candle()?;
        Program::lower(
            &self.graph,
            &self.model_dir,
            &device,
            self.pipeline.dtype.to_candle(),
        )
        .map_err(|cause| PipelineError::Lower {
            model: self.model_dir.clone(),
            cause: Box::new(cause),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_sample() {
        let text = r#"Pipeline(
            model: "../tests/fixtures/tiny-llama",
            device: Cpu,
            dtype: F32,
            passes: [TruncateLayers(keep: 4)],
            runtime: (max_new_tokens: 16, sampling: Greedy, seed: 0),
        )"#;
        let p = Pipeline::parse(text, Path::new("x.ron")).expect("parses");
        assert_eq!(p.passes, vec![PassSpec::TruncateLayers { keep: 4 }]);
        assert_eq!(p.runtime.max_new_tokens, 16);
        let again = Pipeline::parse(&p.to_ron(), Path::new("x.ron")).expect("round-trips");
        assert_eq!(again, p);
    }

    #[test]
    fn sampling_with_temperature_parses() {
        let text = r#"Pipeline(model: "m", runtime: (sampling: Temperature(temperature: 0.8, top_p: Some(0.9))))"#;
        let p = Pipeline::parse(text, Path::new("x.ron")).expect("parses");
        assert_eq!(
            p.runtime.sampling,
            Sampling::Temperature {
                temperature: 0.8,
                top_p: Some(0.9)
            }
        );
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let text = "Pipeline(\n    model: \"m\",\n    passes: [Frobnicate(x: 1)],\n)";
        let err = Pipeline::parse(text, Path::new("p.ron"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("p.ron:3:"), "{err}");
        assert!(
            err.contains("TruncateLayers"),
            "lists the known passes: {err}"
        );
        let text = "Pipeline(\n    modle: \"m\",\n)";
        let err = Pipeline::parse(text, Path::new("p.ron"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("p.ron:2:"), "{err}");
        assert!(err.contains("modle"), "{err}");
    }
}
