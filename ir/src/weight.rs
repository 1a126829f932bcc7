//! Weights by reference: where a parameter comes from, never its data.
//!
//! A [`WeightRef`] names a tensor in the checkpoint or a recipe over other references
//! (a transpose, a slice). The compiler materialises recipes once, at lowering. The
//! [`WeightCatalog`] lists every tensor of the checkpoint's files with its dtype and shape,
//! so shapes of recipes can be checked without reading any data.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Element type of a stored tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
    /// Any other safetensors dtype (integers, f64, f8): cataloged, never loaded as a weight.
    Other {
        name: String,
        size_bytes: usize,
    },
}

impl StoredDtype {
    /// Parses a safetensors dtype name (`F32`, `BF16`, `I64`, ...).
    pub fn from_safetensors(name: &str) -> Option<Self> {
        let other = |size_bytes| StoredDtype::Other {
            name: name.to_string(),
            size_bytes,
        };
        Some(match name {
            "F32" => StoredDtype::F32,
            "F16" => StoredDtype::F16,
            "BF16" => StoredDtype::BF16,
            "F64" | "I64" | "U64" => other(8),
            "I32" | "U32" => other(4),
            "I16" | "U16" => other(2),
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => other(1),
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size_bytes(&self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::F16 | StoredDtype::BF16 => 2,
            StoredDtype::Other { size_bytes, .. } => *size_bytes,
        }
    }

    /// Whether exitgraph can load a weight of this dtype.
    pub fn is_float_weight(&self) -> bool {
        !matches!(self, StoredDtype::Other { .. })
    }
}

impl fmt::Display for StoredDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoredDtype::F32 => write!(f, "F32"),
            StoredDtype::F16 => write!(f, "F16"),
            StoredDtype::BF16 => write!(f, "BF16"),
            StoredDtype::Other { name, .. } => write!(f, "{name}"),
        }
    }
}

/// One tensor stored in a checkpoint file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// File name relative to the checkpoint folder.
    pub file: String,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
}

/// Every tensor of a checkpoint, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightCatalog {
    /// Folder the checkpoint was read from (as given by the user).
    pub root: String,
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// A recipe that yields one weight tensor.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WeightRef {
    /// A tensor of the checkpoint, by its name.
    File { tensor: String },
    /// The transpose of a 2-D weight (GPT-2 stores `Conv1D` weights as `[in, out]`).
    Transpose(Box<WeightRef>),
    /// `len` rows (dim 0) or columns (dim 1) starting at `start` (fused QKV weights).
    Slice {
        of: Box<WeightRef>,
        dim: usize,
        start: usize,
        len: usize,
    },
    /// The element-wise mean of tensors of one shape (`TieLayers(init: Average)`).
    Mean(Vec<WeightRef>),
    /// A tensor of zeros.
    Zeros { shape: Vec<usize> },
    /// A seeded uniform tensor in ±1/√(last dim) (LoRA's `A` initialisation, as PEFT's
    /// Kaiming-uniform with a = √5 gives).
    Uniform { shape: Vec<usize>, seed: u64 },
    /// A factor of the rank-`rank` truncated SVD of `target − base` (`DepthLora(init: Svd)`):
    /// with `target − base = U·diag(S)·Vᵀ`, `B = U[:, :r]·diag(S[:r])` (`[out, r]`) and
    /// `A = Vᵀ[:r, :]` (`[r, in]`), so `B·A` is the best rank-`r` approximation.
    Svd {
        target: Box<WeightRef>,
        base: Box<WeightRef>,
        rank: usize,
        factor: SvdFactor,
    },
}

/// Which factor of a truncated SVD a [`WeightRef::Svd`] yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SvdFactor {
    /// `Vᵀ[:r, :]`: `[rank, in]`.
    A,
    /// `U[:, :r]·diag(S[:r])`: `[out, rank]`.
    B,
}

/// Why a weight recipe cannot be resolved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    #[error("tensor \"{0}\" is not in the checkpoint")]
    Missing(String),
    #[error("{recipe}: {reason}")]
    BadRecipe { recipe: String, reason: String },
}

impl WeightRef {
    /// A reference to a checkpoint tensor.
    pub fn file(tensor: impl Into<String>) -> Self {
        WeightRef::File {
            tensor: tensor.into(),
        }
    }

    /// This weight transposed.
    pub fn transposed(self) -> Self {
        WeightRef::Transpose(Box::new(self))
    }

    /// Part of this weight along `dim`.
    pub fn slice(self, dim: usize, start: usize, len: usize) -> Self {
        WeightRef::Slice {
            of: Box::new(self),
            dim,
            start,
            len,
        }
    }

    /// Names of the checkpoint tensors this recipe reads.
    pub fn sources(&self) -> Vec<&str> {
        match self {
            WeightRef::File { tensor } => vec![tensor.as_str()],
            WeightRef::Transpose(of) | WeightRef::Slice { of, .. } => of.sources(),
            WeightRef::Mean(of) => of.iter().flat_map(WeightRef::sources).collect(),
            WeightRef::Zeros { .. } | WeightRef::Uniform { .. } => Vec::new(),
            WeightRef::Svd { target, base, .. } => {
                let mut v = target.sources();
                v.extend(base.sources());
                v
            }
        }
    }

    /// The shape this recipe yields, checked against the catalog.
    pub fn shape(&self, catalog: &WeightCatalog) -> Result<Vec<usize>, WeightError> {
        match self {
            WeightRef::File { tensor } => catalog
                .tensors
                .get(tensor)
                .map(|t| t.shape.clone())
                .ok_or_else(|| WeightError::Missing(tensor.clone())),
            WeightRef::Transpose(of) => {
                let s = of.shape(catalog)?;
                if s.len() != 2 {
                    return Err(self.bad(format!("transpose needs a 2-D tensor, got {s:?}")));
                }
                Ok(vec![s[1], s[0]])
            }
            WeightRef::Slice {
                of,
                dim,
                start,
                len,
            } => {
                let mut s = of.shape(catalog)?;
                if *dim >= s.len() {
                    return Err(self.bad(format!("dim {dim} out of range for shape {s:?}")));
                }
                if start + len > s[*dim] {
                    return Err(self.bad(format!(
                        "slice {start}..{} exceeds size {} of dim {dim}",
                        start + len,
                        s[*dim]
                    )));
                }
                s[*dim] = *len;
                Ok(s)
            }
            WeightRef::Mean(of) => {
                let Some(first) = of.first() else {
                    return Err(self.bad("a mean of no tensors".into()));
                };
                let s = first.shape(catalog)?;
                for w in &of[1..] {
                    let t = w.shape(catalog)?;
                    if t != s {
                        return Err(self.bad(format!("shapes {s:?} and {t:?} differ")));
                    }
                }
                Ok(s)
            }
            WeightRef::Zeros { shape } | WeightRef::Uniform { shape, .. } => Ok(shape.clone()),
            WeightRef::Svd {
                target,
                base,
                rank,
                factor,
            } => {
                let (t, b) = (target.shape(catalog)?, base.shape(catalog)?);
                if t.len() != 2 || t != b {
                    return Err(self.bad(format!(
                        "needs two 2-D tensors of one shape, got {t:?} and {b:?}"
                    )));
                }
                if *rank == 0 || *rank > t[0].min(t[1]) {
                    return Err(self.bad(format!(
                        "rank {rank} is outside 1..={} for a {:?} weight",
                        t[0].min(t[1]),
                        t
                    )));
                }
                Ok(match factor {
                    SvdFactor::A => vec![*rank, t[1]],
                    SvdFactor::B => vec![t[0], *rank],
                })
            }
        }
    }

    fn bad(&self, reason: String) -> WeightError {
        WeightError::BadRecipe {
            recipe: self.to_string(),
            reason,
        }
    }
}

impl fmt::Display for WeightRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightRef::File { tensor } => write!(f, "{tensor}"),
            WeightRef::Transpose(of) => write!(f, "transpose({of})"),
            WeightRef::Slice {
                of,
                dim,
                start,
                len,
            } => {
                write!(f, "slice({of}, dim {dim}, {start}..{})", start + len)
            }
            WeightRef::Mean(of) => {
                let names: Vec<String> = of.iter().map(ToString::to_string).collect();
                write!(f, "mean({})", names.join(", "))
            }
            WeightRef::Zeros { shape } => write!(f, "zeros({shape:?})"),
            WeightRef::Uniform { shape, seed } => write!(f, "uniform({shape:?}, seed {seed})"),
            WeightRef::Svd {
                target,
                base,
                rank,
                factor,
            } => write!(f, "svd{factor:?}({target} - {base}, rank {rank})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> WeightCatalog {
        let mut c = WeightCatalog::default();
        c.tensors.insert(
            "attn.c_attn.weight".into(),
            TensorInfo {
                file: "model.safetensors".into(),
                dtype: StoredDtype::F32,
                shape: vec![64, 192],
            },
        );
        c
    }

    #[test]
    fn recipe_shapes_follow_the_ops() {
        let c = catalog();
        let w = WeightRef::file("attn.c_attn.weight").transposed();
        assert_eq!(w.shape(&c), Ok(vec![192, 64]));
        let q = w.clone().slice(0, 64, 64);
        assert_eq!(q.shape(&c), Ok(vec![64, 64]));
        assert!(w.slice(0, 150, 64).shape(&c).is_err());
        assert_eq!(
            WeightRef::file("nope").shape(&c),
            Err(WeightError::Missing("nope".into()))
        );
    }
}
