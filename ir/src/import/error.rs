//! Errors of checkpoint import: each names the file, and the field or tensor at fault.
//!
//! A variant's message includes its cause, so the cause is a plain field (`cause`), not a
//! `source()`: printing the chain (`{:#}`) would repeat it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {cause}", path = path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: invalid JSON at line {line}, column {column}: {message}", path = path.display())]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: field \"{field}\": {problem}", path = path.display())]
    Field {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("{path}: unsupported model_type \"{model_type}\" (supported: llama, mistral, qwen2, gpt2, bert)", path = path.display())]
    UnsupportedModel { path: PathBuf, model_type: String },
    #[error("{path}: {problem}", path = path.display())]
    Safetensors { path: PathBuf, problem: String },
    #[error("{path}: tensor \"{tensor}\" is missing (needed for {needed_for})", path = path.display())]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        needed_for: String,
    },
    #[error("{path}: {cause}", path = path.display())]
    Invalid {
        path: PathBuf,
        cause: crate::verify::VerifyError,
    },
}

impl ImportError {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        ImportError::Io {
            path: path.into(),
            cause,
        }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, e: &serde_json::Error) -> Self {
        // serde_json's message ends with the position, which the error states already.
        let message = e.to_string();
        let position = format!(" at line {} column {}", e.line(), e.column());
        ImportError::Json {
            path: path.into(),
            line: e.line(),
            column: e.column(),
            message: message
                .strip_suffix(&position)
                .unwrap_or(&message)
                .to_string(),
        }
    }
}
