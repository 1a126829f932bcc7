//! Typed access to a Hugging Face `config.json` with errors that name the field.

use super::error::ImportError;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Largest integer a size field may hold, so that the product of two sizes fits a `usize`.
const MAX_SIZE: u64 = u32::MAX as u64;

/// A parsed JSON config file.
pub struct JsonConfig {
    pub path: PathBuf,
    pub value: Value,
}

impl JsonConfig {
    /// Reads and parses a JSON file.
    pub fn read(path: &Path) -> Result<Self, ImportError> {
        let text = std::fs::read_to_string(path).map_err(|e| ImportError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ImportError::json(path, &e))?;
        if !value.is_object() {
            return Err(ImportError::Field {
                path: path.to_path_buf(),
                field: "(top level)".into(),
                problem: "expected a JSON object".into(),
            });
        }
        Ok(JsonConfig {
            path: path.to_path_buf(),
            value,
        })
    }

    /// An error about `field`.
    pub fn error(&self, field: &str, problem: impl Into<String>) -> ImportError {
        ImportError::Field {
            path: self.path.clone(),
            field: field.to_string(),
            problem: problem.into(),
        }
    }

    /// The value at a dotted path (`rope_parameters.rope_theta`); `null` counts as absent.
    pub fn get(&self, field: &str) -> Option<&Value> {
        let mut v = &self.value;
        for part in field.split('.') {
            v = v.get(part)?;
        }
        (!v.is_null()).then_some(v)
    }

    pub fn has(&self, field: &str) -> bool {
        self.get(field).is_some()
    }

    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>, ImportError> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        let n = match v.as_u64() {
            Some(n) => n as f64,
            None => match v.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 => f,
                _ => {
                    return Err(
                        self.error(field, format!("expected a non-negative integer, got {v}"))
                    )
                }
            },
        };
        if n > MAX_SIZE as f64 {
            return Err(self.error(field, format!("{v} is too large (at most {MAX_SIZE})")));
        }
        Ok(Some(n as usize))
    }

    pub fn usize(&self, field: &str) -> Result<usize, ImportError> {
        self.opt_usize(field)?
            .ok_or_else(|| self.error(field, "missing"))
    }

    /// A required size that must be at least 1.
    pub fn positive(&self, field: &str) -> Result<usize, ImportError> {
        let n = self.usize(field)?;
        if n == 0 {
            return Err(self.error(field, "must be at least 1"));
        }
        Ok(n)
    }

    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>, ImportError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(field, format!("expected a number, got {v}"))),
        }
    }

    /// A number that must be positive and finite.
    pub fn positive_f64(&self, field: &str, default: f64) -> Result<f64, ImportError> {
        let x = self.opt_f64(field)?.unwrap_or(default);
        if !(x > 0.0 && x.is_finite()) {
            return Err(self.error(field, format!("must be a positive number, got {x}")));
        }
        Ok(x)
    }

    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>, ImportError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.error(field, format!("expected true or false, got {v}"))),
        }
    }

    pub fn opt_str(&self, field: &str) -> Result<Option<&str>, ImportError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.error(field, format!("expected a string, got {v}"))),
        }
    }

    /// A token id given as one integer or a list of them (`eos_token_id`).
    pub fn token_ids(&self, field: &str) -> Result<Vec<u32>, ImportError> {
        let bad = |v: &Value| {
            self.error(
                field,
                format!("expected a token id or a list of them, got {v}"),
            )
        };
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| token_id(v).ok_or_else(|| bad(v)))
                .collect(),
            Some(v) => token_id(v).map(|n| vec![n]).ok_or_else(|| bad(v)),
        }
    }

    /// A list of strings (`layer_types`).
    pub fn opt_str_list(&self, field: &str) -> Result<Option<Vec<String>>, ImportError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.error(field, format!("expected strings, got {v}")))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.error(field, format!("expected a list of strings, got {v}"))),
        }
    }
}

/// A token id: an integer that fits a `u32`.
fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}
