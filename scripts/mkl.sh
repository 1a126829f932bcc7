#!/usr/bin/env bash
# Runs cargo with Intel oneMKL available for the `mkl` feature (candle's f32 matmuls and
# vector math through MKL instead of the pure-Rust gemm crate). The first time, it installs
# the pinned oneMKL wheels from PyPI (scripts/mkl-requirements.txt, checked by hash) into a
# prefix; then it points pkg-config at them and passes its arguments to cargo:
#
#   scripts/mkl.sh build --release -p exitgraph --features mkl
#   scripts/mkl.sh test -p exitgraph --features mkl --test reference
#
# MKL is linked statically; Intel's OpenMP runtime (libiomp5.so) dynamically, found through
# an rpath into the prefix (cli/build.rs), so the built binary runs without further setup
# as long as the prefix stays. The prefix is $EXITGRAPH_MKL_PREFIX, by default
# ~/.cache/exitgraph/mkl-2026.2.0. x86-64 Linux only (the wheels are manylinux x86-64).
set -euo pipefail
cd "$(dirname "$0")/.."
version=2026.2.0
prefix="${EXITGRAPH_MKL_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/exitgraph/mkl-$version}"
pc="$prefix/lib/pkgconfig"
if [ ! -f "$pc/mkl-static-lp64-iomp.pc" ] || [ ! -f "$prefix/lib/libiomp5.so" ]; then
  echo "installing oneMKL $version into $prefix" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --ignore-installed \
    --require-hashes --prefix "$prefix" -r scripts/mkl-requirements.txt
fi
if ! command -v pkg-config >/dev/null; then
  echo "pkg-config is required to find oneMKL (apt-get install pkg-config)" >&2
  exit 1
fi
export PKG_CONFIG_PATH="$pc${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
# Test binaries of the other crates have no rpath; the loader finds the runtime here.
export LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec cargo "$@"
