//! Materialising weight recipes from memory-mapped safetensors, once each.

use super::recipes;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use exitgraph_ir::{SvdFactor, WeightCatalog, WeightRef};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WeightLoadError {
    #[error("{path}: cannot map safetensors: {cause}", path = path.display())]
    Open {
        path: PathBuf,
        cause: candle_core::Error,
    },
    #[error("weight {weight}: {cause}")]
    Load {
        weight: String,
        cause: candle_core::Error,
    },
    #[error("weight {weight}: tensor \"{tensor}\" is not in the checkpoint catalog")]
    Missing { weight: String, tensor: String },
    #[error("weight {weight}: tensor \"{tensor}\" holds {count} NaN or infinite value(s); the checkpoint is corrupt or diverged")]
    NotFinite {
        weight: String,
        tensor: String,
        count: usize,
    },
}

/// Values of a loaded float tensor that are NaN or infinite. A cheap pass first (`x·0` is 0
/// for every finite value and NaN otherwise, so the sum is 0 exactly when all are finite);
/// only a tensor that fails it is counted.
fn non_finite(t: &Tensor) -> candle_core::Result<usize> {
    if !t.dtype().is_float() {
        return Ok(0);
    }
    let probe = t.affine(0.0, 0.0)?.sum_all()?.to_dtype(DType::F64)?;
    if probe.to_scalar::<f64>()? == 0.0 {
        return Ok(0);
    }
    Ok(t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .iter()
        .filter(|x| !x.is_finite())
        .count())
}

/// Where lowering gets weight tensors: the checkpoint (inference) or trainable parameters.
pub trait WeightSource {
    /// The tensor a recipe yields.
    fn get(&mut self, w: &WeightRef) -> Result<Tensor, WeightLoadError>;
    /// Lowering no longer needs this recipe's own tensor (it was copied into a fused one).
    fn forget(&mut self, _w: &WeightRef) {}
}

/// The checkpoint's files, mapped, and every recipe materialised so far.
pub struct WeightStore {
    files: MmapedSafetensors,
    device: Device,
    dtype: DType,
    cache: HashMap<WeightRef, Tensor>,
}

impl WeightStore {
    /// Maps every file the catalog lists under `root`.
    pub fn open(
        catalog: &WeightCatalog,
        root: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, WeightLoadError> {
        let files: BTreeSet<&str> = catalog.tensors.values().map(|t| t.file.as_str()).collect();
        let paths: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
        // SAFETY: the files are mapped read-only; exitgraph never writes to a checkpoint it
        // has open, and the header of each was validated against the file length at import.
        #[allow(unsafe_code)]
        let mapped = unsafe { MmapedSafetensors::multi(&paths) };
        let files = mapped.map_err(|cause| WeightLoadError::Open {
            path: paths.first().cloned().unwrap_or_else(|| root.to_path_buf()),
            cause,
        })?;
        Ok(WeightStore {
            files,
            device: device.clone(),
            dtype,
            cache: HashMap::new(),
        })
    }
}

impl WeightSource for WeightStore {
    fn forget(&mut self, w: &WeightRef) {
        self.cache.remove(w);
    }

    fn get(&mut self, w: &WeightRef) -> Result<Tensor, WeightLoadError> {
        if let Some(t) = self.cache.get(w) {
            return Ok(t.clone());
        }
        let wrap = |cause| WeightLoadError::Load {
            weight: w.to_string(),
            cause,
        };
        let t = match w {
            WeightRef::File { tensor } => {
                let raw = self.files.load(tensor, &Device::Cpu).map_err(|_| {
                    WeightLoadError::Missing {
                        weight: w.to_string(),
                        tensor: tensor.clone(),
                    }
                })?;
                // A NaN or infinite weight would make every output silently wrong.
                let count = non_finite(&raw).map_err(wrap)?;
                if count > 0 {
                    return Err(WeightLoadError::NotFinite {
                        weight: w.to_string(),
                        tensor: tensor.clone(),
                        count,
                    });
                }
                raw.to_dtype(self.dtype)
                    .and_then(|t| t.to_device(&self.device))
                    .map_err(wrap)?
            }
            WeightRef::Transpose(of) => self
                .get(of)?
                .t()
                .and_then(|t| t.contiguous())
                .map_err(wrap)?,
            WeightRef::Slice {
                of,
                dim,
                start,
                len,
            } => self
                .get(of)?
                .narrow(*dim, *start, *len)
                .and_then(|t| t.contiguous())
                .map_err(wrap)?,
            WeightRef::Mean(of) => {
                let parts = of
                    .iter()
                    .map(|w| self.get(w))
                    .collect::<Result<Vec<_>, _>>()?;
                recipes::mean(&parts).map_err(wrap)?
            }
            WeightRef::Zeros { shape } => {
                Tensor::zeros(shape.as_slice(), self.dtype, &self.device).map_err(wrap)?
            }
            WeightRef::Uniform { shape, seed } => recipes::uniform(shape, *seed)
                .and_then(|t| t.to_dtype(self.dtype))
                .and_then(|t| t.to_device(&self.device))
                .map_err(wrap)?,
            WeightRef::Svd {
                target,
                base,
                rank,
                factor,
            } => {
                let (t, b) = (self.get(target)?, self.get(base)?);
                let (a_factor, b_factor) = recipes::svd_factors(&t, &b, *rank).map_err(wrap)?;
                let place = |x: Tensor| {
                    x.to_dtype(self.dtype)
                        .and_then(|x| x.to_device(&self.device))
                };
                let (a_factor, b_factor) = (
                    place(a_factor).map_err(wrap)?,
                    place(b_factor).map_err(wrap)?,
                );
                // Both factors come from one decomposition: keep the other for its recipe.
                let other = match factor {
                    SvdFactor::A => (SvdFactor::B, b_factor.clone()),
                    SvdFactor::B => (SvdFactor::A, a_factor.clone()),
                };
                self.cache.insert(
                    WeightRef::Svd {
                        target: target.clone(),
                        base: base.clone(),
                        rank: *rank,
                        factor: other.0,
                    },
                    other.1,
                );
                match factor {
                    SvdFactor::A => a_factor,
                    SvdFactor::B => b_factor,
                }
            }
        };
        self.cache.insert(w.clone(), t.clone());
        Ok(t)
    }
}
