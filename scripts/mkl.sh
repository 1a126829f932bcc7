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
# Written last: a prefix without it is incomplete and is filled again.
stamp="$prefix/.installed-$version"
if [ ! -f "$stamp" ]; then
  echo "installing oneMKL $version into $prefix" >&2
  # pip checks the hashes; the wheels' data files (lib/, include/) are unpacked into the
  # prefix directly, so the layout does not depend on the Python's install scheme
  # (Debian's system Python would put `pip install --prefix` data under local/).
  wheels="$(mktemp -d)"
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r scripts/mkl-requirements.txt -d "$wheels"
  mkdir -p "$prefix"
  python3 - "$wheels" "$prefix" <<'PY'
import pathlib, sys, zipfile
wheels, prefix = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            # <name>.data/data/<path> holds the files a wheel installs under its prefix.
            if len(parts) > 2 and parts[0].endswith(".data") and parts[1] == "data" and not info.is_dir():
                target = prefix.joinpath(*parts[2:])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(info))
PY
  rm -rf "$wheels"
  trap - EXIT
  touch "$stamp"
fi
if ! command -v pkg-config >/dev/null; then
  echo "pkg-config is required to find oneMKL (apt-get install pkg-config)" >&2
  exit 1
fi
export PKG_CONFIG_PATH="$pc${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
# Test binaries of the other crates have no rpath; the loader finds the runtime here.
export LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec cargo "$@"
