//! Where the reference-equivalence tests run and where their fixtures are.
//!
//! `EXITGRAPH_TEST_DEVICE` picks the device: unset or `cpu` for the CPU, `cuda:N` for GPU
//! N in a `cuda` build (for test binaries built with `--features cuda` and run on a GPU
//! machine; `scripts/gpu-check.sh` checks the same fixtures through the CLI). Outputs are
//! compared on the host.

use candle_core::Device;
use std::path::{Path, PathBuf};

pub fn test_device() -> Device {
    match std::env::var("EXITGRAPH_TEST_DEVICE").ok().as_deref() {
        None | Some("" | "cpu") => Device::Cpu,
        Some(name) => {
            let ordinal = name
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("EXITGRAPH_TEST_DEVICE={name}: expected cpu or cuda:N"));
            Device::new_cuda(ordinal)
                .unwrap_or_else(|e| panic!("EXITGRAPH_TEST_DEVICE={name}: {e}"))
        }
    }
}

/// `tests/fixtures` of the source tree the tests were built in or, for a test binary
/// carried to another machine, of the repository it runs in (the working directory).
pub fn fixtures() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    if built.exists() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    }
}
