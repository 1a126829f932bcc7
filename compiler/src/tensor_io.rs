//! Reading input tensors and writing output tensors as safetensors; writes are atomic.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TensorIoError {
    #[error("{path}: {message}", path = path.display())]
    Read { path: PathBuf, message: String },
    #[error("{path}: tensor \"{tensor}\": {message}", path = path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{path}: cannot write: {message}", path = path.display())]
    Write { path: PathBuf, message: String },
}

/// `input_ids` and the optional `attention_mask` and `token_type_ids` of a forward call.
pub struct ForwardInputs {
    pub input_ids: Tensor,
    pub attention_mask: Option<Tensor>,
    pub token_type_ids: Option<Tensor>,
}

fn integer_2d(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    name: &str,
) -> Result<Option<Tensor>, TensorIoError> {
    let Some(t) = tensors.get(name) else {
        return Ok(None);
    };
    let err = |message: String| TensorIoError::Tensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        message,
    };
    if t.rank() != 2 {
        return Err(err(format!(
            "expected shape [batch, seq], got {:?}",
            t.dims()
        )));
    }
    if !matches!(
        t.dtype(),
        DType::I64 | DType::U32 | DType::U8 | DType::I32 | DType::I16
    ) {
        return Err(err(format!("expected integer ids, got {:?}", t.dtype())));
    }
    let min = t
        .to_dtype(DType::I64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.min(0))
        .and_then(|t| t.to_scalar::<i64>())
        .map_err(|e| err(e.to_string()))?;
    if min < 0 {
        return Err(err(format!("has a negative value {min}")));
    }
    t.to_dtype(DType::U32)
        .map(Some)
        .map_err(|e| err(e.to_string()))
}

/// Reads the inputs of `exitgraph forward`.
pub fn read_forward_inputs(path: &Path) -> Result<ForwardInputs, TensorIoError> {
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| TensorIoError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let input_ids =
        integer_2d(path, &tensors, "input_ids")?.ok_or_else(|| TensorIoError::Tensor {
            path: path.to_path_buf(),
            tensor: "input_ids".into(),
            message: "missing".into(),
        })?;
    let dims = input_ids.dims().to_vec();
    let same_shape = |name: &str, t: Option<Tensor>| -> Result<Option<Tensor>, TensorIoError> {
        match t {
            Some(t) if t.dims() != dims.as_slice() => Err(TensorIoError::Tensor {
                path: path.to_path_buf(),
                tensor: name.to_string(),
                message: format!("has shape {:?}, input_ids has {dims:?}", t.dims()),
            }),
            other => Ok(other),
        }
    };
    let attention_mask = same_shape(
        "attention_mask",
        integer_2d(path, &tensors, "attention_mask")?,
    )?;
    let token_type_ids = same_shape(
        "token_type_ids",
        integer_2d(path, &tensors, "token_type_ids")?,
    )?;
    Ok(ForwardInputs {
        input_ids,
        attention_mask,
        token_type_ids,
    })
}

/// Writes `tensors` to `path` through a temporary file in the same folder, then renames.
pub fn write_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), TensorIoError> {
    write_atomic_with(path, tensors, &std::collections::BTreeMap::new())
}

/// [`write_atomic`] with `metadata` in the file's `__metadata__` (none when empty).
pub fn write_atomic_with(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<(), TensorIoError> {
    let err = |message: String| TensorIoError::Write {
        path: path.to_path_buf(),
        message,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| err("not a file path".into()))?
        .to_string_lossy()
        .to_string();
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let saved = if metadata.is_empty() {
        candle_core::safetensors::save(tensors, &tmp).map_err(|e| e.to_string())
    } else {
        let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
        let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        safetensors::serialize(sorted, Some(meta))
            .map_err(|e| e.to_string())
            .and_then(|bytes| std::fs::write(&tmp, bytes).map_err(|e| e.to_string()))
    };
    let result = saved.and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    crate::atomic::sync_folder(path);
    Ok(())
}
