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
    #[error("device {0:?} needs exitgraph built with the `{1}` feature ({hint})", hint = build_hint(.1))]
    NotBuilt(DeviceSpec, &'static str),
    #[error("device {0:?} is not available: {1}{hint}", hint = unavailable_hint(*.0))]
    Unavailable(DeviceSpec, candle_core::Error),
}

/// How to get a build with `feature`.
fn build_hint(feature: &str) -> String {
    match feature {
        "cuda" => "build it with scripts/build-cuda.sh; README, section \"GPU\"".into(),
        _ => format!("cargo build --release -p exitgraph --features {feature}"),
    }
}

/// What to check when a device the build supports cannot be opened.
fn unavailable_hint(device: DeviceSpec) -> &'static str {
    match device {
        DeviceSpec::Cuda(_) => {
            ". The GPU needs an NVIDIA driver for CUDA 13 (R580 or newer; `nvidia-smi` lists \
             the GPUs and their ordinals, from 0)"
        }
        _ => "",
    }
}

impl DeviceSpec {
    pub fn to_candle(self) -> Result<candle_core::Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(i) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(DeviceError::NotBuilt(self, "cuda"));
                }
                candle_core::Device::new_cuda(i)
                    .map_err(|e| DeviceError::Unavailable(self, without_backtrace(e)))
            }
            DeviceSpec::Metal(i) => {
                if !candle_core::utils::metal_is_available() {
                    return Err(DeviceError::NotBuilt(self, "metal"));
                }
                candle_core::Device::new_metal(i)
                    .map_err(|e| DeviceError::Unavailable(self, without_backtrace(e)))
            }
        }
    }
}

/// candle attaches a backtrace to errors when `RUST_BACKTRACE` is set; a user's error
/// message is the cause alone.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        e => e,
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
