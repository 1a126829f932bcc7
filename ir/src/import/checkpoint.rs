//! Reading the tensor catalog of a checkpoint: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Only headers are read; data stays on disk until lowering
//! memory-maps it.

use super::config::JsonConfig;
use super::error::ImportError;
use crate::weight::{StoredDtype, TensorInfo, WeightCatalog};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// Largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Reads every tensor's name, dtype and shape from the checkpoint in `dir`.
pub fn read_catalog(dir: &Path) -> Result<WeightCatalog, ImportError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let mut catalog = WeightCatalog {
        root: dir.display().to_string(),
        tensors: BTreeMap::new(),
    };
    if index.exists() {
        let idx = JsonConfig::read(&index)?;
        let map = match idx.get("weight_map") {
            Some(Value::Object(m)) => m,
            Some(_) => return Err(idx.error("weight_map", "expected an object of tensor -> file")),
            None => return Err(idx.error("weight_map", "missing")),
        };
        let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                idx.error(&format!("weight_map.{tensor}"), "expected a file name")
            })?;
            if file.contains("..") || Path::new(file).is_absolute() {
                return Err(idx.error(
                    &format!("weight_map.{tensor}"),
                    format!("file \"{file}\" is outside the checkpoint folder"),
                ));
            }
            by_file
                .entry(file.to_string())
                .or_default()
                .push(tensor.clone());
        }
        for (file, tensors) in by_file {
            if !dir.join(&file).is_file() {
                return Err(idx.error(
                    "weight_map",
                    format!(
                        "shard \"{file}\" does not exist (it holds {} of the listed tensors)",
                        tensors.len()
                    ),
                ));
            }
            let header = read_header(&dir.join(&file), &file)?;
            for t in tensors {
                let info = header.get(&t).ok_or_else(|| ImportError::Safetensors {
                    path: dir.join(&file),
                    problem: format!(
                        "tensor \"{t}\" is listed in model.safetensors.index.json but not stored in this file"
                    ),
                })?;
                catalog.tensors.insert(t, info.clone());
            }
        }
    } else if single.exists() {
        catalog.tensors = read_header(&single, "model.safetensors")?;
    } else {
        let hint = if dir.join("pytorch_model.bin").exists() {
            " (pytorch_model.bin is not supported: convert it to safetensors)"
        } else {
            ""
        };
        return Err(ImportError::Safetensors {
            path: dir.to_path_buf(),
            problem: format!(
                "no model.safetensors or model.safetensors.index.json in this folder{hint}"
            ),
        });
    }
    Ok(catalog)
}

/// The `__metadata__` strings of the safetensors file at `path` (empty when it has none).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, ImportError> {
    let (value, _) = header_json(path)?;
    Ok(value
        .get("__metadata__")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// The header of the safetensors file at `path` as JSON, with the file's length and the
/// header's.
fn header_json(path: &Path) -> Result<(Value, (u64, u64)), ImportError> {
    let bad = |problem: String| ImportError::Safetensors {
        path: path.to_path_buf(),
        problem,
    };
    let mut f = std::fs::File::open(path).map_err(|e| ImportError::io(path, e))?;
    let file_len = f.metadata().map_err(|e| ImportError::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes).map_err(|_| {
        bad(format!(
            "truncated: {file_len} bytes, too short for a safetensors header"
        ))
    })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(bad(format!(
            "truncated or not safetensors: header claims {header_len} bytes, file has {file_len}"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("cannot read header: {e}")))?;
    let value: Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    Ok((value, (file_len, header_len)))
}

/// Parses one safetensors file's header and checks it against the file's length.
pub fn read_header(
    path: &Path,
    file_name: &str,
) -> Result<BTreeMap<String, TensorInfo>, ImportError> {
    let bad = |problem: String| ImportError::Safetensors {
        path: path.to_path_buf(),
        problem,
    };
    let (value, (file_len, header_len)) = header_json(path)?;
    let Value::Object(entries) = value else {
        return Err(bad("header is not a JSON object".into()));
    };
    let data_len = file_len - 8 - header_len;
    let mut out = BTreeMap::new();
    // The (non-empty) byte ranges of the tensors, to check that none overlap.
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let field = |what: &str| bad(format!("tensor \"{name}\": {what}"));
        let dtype_name = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| field("missing dtype"))?;
        let dtype = StoredDtype::from_safetensors(dtype_name)
            .ok_or_else(|| field(&format!("unknown dtype {dtype_name}")))?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| field("missing shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| field("shape must be a list of integers"))?;
        let offsets: Vec<u64> = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| field("data_offsets must be two integers"))?;
        let (start, end) = (offsets[0], offsets[1]);
        let expected = shape
            .iter()
            .try_fold(dtype.size_bytes() as u64, |n, &d| n.checked_mul(d as u64))
            .ok_or_else(|| field(&format!("shape {shape:?} is too large")))?;
        if end < start || end - start != expected {
            return Err(field(&format!(
                "data_offsets {start}..{end} hold {} bytes, shape {shape:?} of {dtype} needs {expected}",
                end.saturating_sub(start)
            )));
        }
        if end > data_len {
            return Err(bad(format!(
                "truncated: tensor \"{name}\" ends at byte {end} of the data, which has {data_len}"
            )));
        }
        if start < end {
            ranges.push((start, end, name.clone()));
        }
        out.insert(
            name,
            TensorInfo {
                file: file_name.to_string(),
                dtype,
                shape,
            },
        );
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        let ((s0, e0, a), (s1, e1, b)) = (&pair[0], &pair[1]);
        if s1 < e0 {
            return Err(bad(format!(
                "tensor \"{b}\": data_offsets {s1}..{e1} overlap tensor \"{a}\" ({s0}..{e0})"
            )));
        }
    }
    Ok(out)
}
