//! With the `mkl` feature, records where Intel's OpenMP runtime lives (an rpath), so the
//! binary finds `libiomp5.so` without LD_LIBRARY_PATH. MKL itself is linked statically by
//! candle's `intel-mkl-src`, which finds it through pkg-config (see scripts/mkl.sh).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    if std::env::var_os("CARGO_FEATURE_MKL").is_none() {
        return;
    }
    let libdir = Command::new("pkg-config")
        .args(["--variable=libdir", "openmp"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|d| !d.is_empty());
    match libdir {
        Some(dir) => println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}"),
        None => println!(
            "cargo:warning=pkg-config does not know `openmp` (Intel's OpenMP runtime): \
             the binary will need LD_LIBRARY_PATH to find libiomp5.so; build through scripts/mkl.sh"
        ),
    }
}
