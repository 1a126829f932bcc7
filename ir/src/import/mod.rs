//! Import of Hugging Face checkpoints from a local folder: `config.json`, one
//! `model.safetensors` or shards with `model.safetensors.index.json`, and `tokenizer.json`
//! when present. Families: Llama, Mistral, Qwen2, GPT-2, BERT.

mod bert;
mod checkpoint;
mod config;
mod context;
mod error;
mod gpt2;
mod llama;
mod rope;

pub use checkpoint::{read_catalog, read_header, read_metadata};
pub use config::JsonConfig;
pub use error::ImportError;

use crate::graph::{Family, Graph};
use std::path::{Path, PathBuf};

/// An imported checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub graph: Graph,
    /// `tokenizer.json` when the folder has one.
    pub tokenizer: Option<PathBuf>,
}

/// The family for a `model_type`.
pub fn family_of(model_type: &str) -> Option<Family> {
    Some(match model_type {
        "llama" => Family::Llama,
        "mistral" => Family::Mistral,
        "qwen2" => Family::Qwen2,
        "gpt2" => Family::Gpt2,
        "bert" => Family::Bert,
        _ => return None,
    })
}

/// Reads the checkpoint in `dir` into a verified graph.
pub fn import(dir: &Path) -> Result<Checkpoint, ImportError> {
    if !dir.is_dir() {
        return Err(ImportError::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
        ));
    }
    let cfg = JsonConfig::read(&dir.join("config.json"))?;
    let model_type = cfg
        .opt_str("model_type")?
        .ok_or_else(|| cfg.error("model_type", "missing"))?
        .to_string();
    let family = family_of(&model_type).ok_or_else(|| ImportError::UnsupportedModel {
        path: cfg.path.clone(),
        model_type: model_type.clone(),
    })?;
    let catalog = read_catalog(dir)?;
    let graph = match family {
        Family::Llama | Family::Mistral | Family::Qwen2 => {
            llama::build(&cfg, &catalog, family, &model_type)?
        }
        Family::Gpt2 => gpt2::build(&cfg, &catalog)?,
        Family::Bert => bert::build(&cfg, &catalog, dir)?,
    };
    crate::verify::verify(&graph).map_err(|cause| ImportError::Invalid {
        path: dir.to_path_buf(),
        cause,
    })?;
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.exists());
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        graph,
        tokenizer,
    })
}
