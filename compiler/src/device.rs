//! Where and in what precision a program runs.

use serde::{Deserialize, Serialize};

/// A compute device as written in a pipeline file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
    /// An Apple GPU by ordinal (needs the `metal` feature).
    Metal(usize),
}

/// Floating-point type weights and activations are computed in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DtypeSpec {
    #[default]
    F32,
    F16,
    BF16,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0:?} needs exitgraph built with the `{1}` feature")]
    NotBuilt(DeviceSpec, &'static str),
    #[error("device {0:?}: {1}")]
    Unavailable(DeviceSpec, candle_core::Error),
}

impl DeviceSpec {
    pub fn to_candle(self) -> Result<candle_core::Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(i) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(DeviceError::NotBuilt(self, "cuda"));
                }
                candle_core::Device::new_cuda(i).map_err(|e| DeviceError::Unavailable(self, e))
            }
            DeviceSpec::Metal(i) => {
                if !candle_core::utils::metal_is_available() {
                    return Err(DeviceError::NotBuilt(self, "metal"));
                }
                candle_core::Device::new_metal(i).map_err(|e| DeviceError::Unavailable(self, e))
            }
        }
    }
}

impl DtypeSpec {
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            DtypeSpec::F32 => candle_core::DType::F32,
            DtypeSpec::F16 => candle_core::DType::F16,
            DtypeSpec::BF16 => candle_core::DType::BF16,
        }
    }
}
