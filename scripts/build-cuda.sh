#!/usr/bin/env bash
# Builds exitgraph with the `cuda` feature on a machine without a GPU, a driver or a CUDA
# toolkit, then passes its arguments to cargo (default: the release binary):
#
#   scripts/build-cuda.sh                                   # cargo build --release -p exitgraph --features cuda
#   scripts/build-cuda.sh check --workspace --all-targets --features exitgraph/cuda
#
# What the build needs and where it comes from:
# * nvcc 13.0 with NVVM, the CUDA headers, CCCL and libcudart: the pinned NVIDIA wheels in
#   scripts/cuda-requirements.txt (checked by hash), unpacked into a prefix that serves as
#   CUDA_HOME ($EXITGRAPH_CUDA_PREFIX, by default ~/.cache/exitgraph/cuda-13.0.88).
#   candle's kernels are compiled to PTX for the compute capability in $CUDA_COMPUTE_CAP
#   (default 90: H100/H200); the driver JIT-compiles PTX for newer GPUs, not older ones.
# * The driver (libcuda), cuBLAS, cuBLASLt, cuRAND and NVRTC, which candle links
#   dynamically: only link stubs are needed to build, as CUDA toolkits ship in lib/stubs.
#   They are generated from the function list of the cudarc version in Cargo.lock, with
#   the real libraries' SONAMEs, and every stub function returns an error code. The stubs
#   are never on the binary's run-time path.
#
# Running the binary needs an NVIDIA driver that supports CUDA 13 (R580 or newer) and
# the real libraries, e.g. from PyPI (see the README's "GPU" section):
#   pip install -r scripts/cuda-runtime-requirements.txt
# with their lib folders on LD_LIBRARY_PATH. x86-64 Linux only (manylinux wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
version=13.0.88
prefix="${EXITGRAPH_CUDA_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/exitgraph/cuda-$version}"
# Written last: a prefix without it is incomplete and is filled again.
stamp="$prefix/.installed-$version"
if [ ! -f "$stamp" ]; then
  echo "installing the CUDA $version compiler into $prefix" >&2
  wheels="$(mktemp -d)"
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r scripts/cuda-requirements.txt -d "$wheels"
  rm -rf "$prefix"
  mkdir -p "$prefix"
  python3 - "$wheels" "$prefix" <<'PY'
import pathlib, sys, zipfile
wheels, prefix = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
# Every wheel keeps its part of the toolkit under nvidia/cu13/ (bin, nvvm, include, lib):
# merged, they are one CUDA_HOME, whose bin/nvcc.profile finds the rest relative to itself.
root = "nvidia/cu13/"
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith(root) or info.is_dir():
                continue
            target = prefix / info.filename[len(root):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode)
PY
  # Wheels may not record modes: the compiler's programs must run.
  chmod +x "$prefix"/bin/* "$prefix"/nvvm/bin/*
  ln -sf libcudart.so.13 "$prefix/lib/libcudart.so"
  rm -rf "$wheels"
  trap - EXIT
  touch "$stamp"
fi

# Link stubs for the libraries cudarc links, from cudarc's own bindings.
cudarc="$(cargo metadata --format-version 1 --locked --features exitgraph/cuda | python3 -c '
import json, os, sys
packages = json.load(sys.stdin)["packages"]
print(next(os.path.dirname(p["manifest_path"]) for p in packages if p["name"] == "cudarc"))
')"
stubs="$prefix/lib/stubs"
stubs_stamp="$stubs/.from-$(basename "$cudarc")"
if [ ! -f "$stubs_stamp" ]; then
  rm -rf "$stubs"
  mkdir -p "$stubs"
  # folder in cudarc's src/, library, SONAME, the error code every stub returns
  while read -r module lib soname code; do
    names="$(sed -n 's/^pub unsafe fn \([A-Za-z0-9_]*\)(.*/\1/p' "$cudarc/src/$module/sys/mod.rs" | sort -u)"
    if [ -z "$names" ]; then
      echo "no functions found in $cudarc/src/$module/sys/mod.rs" >&2
      exit 1
    fi
    {
      echo "/* Link stub for $soname generated from cudarc's $module bindings. */"
      for name in $names; do echo "int $name(void) { return $code; }"; done
    } > "$stubs/$lib.c"
    cc -shared -fPIC -o "$stubs/$lib.so" -Wl,-soname,"$soname" "$stubs/$lib.c"
    rm "$stubs/$lib.c"
  done <<'LIBS'
driver libcuda libcuda.so.1 34
nvrtc libnvrtc libnvrtc.so.13 11
curand libcurand libcurand.so.10 201
cublas libcublas libcublas.so.13 1
cublaslt libcublasLt libcublasLt.so.13 1
LIBS
  touch "$stubs_stamp"
fi

# EXITGRAPH_CUDA_STUB_DRIVER=1: the stubs stand in for the driver and libraries at run time
# too (under their SONAMEs), so that a `cuda` build's tests run on a machine without a GPU:
# CPU work runs, and opening a GPU fails as it does without a driver (scripts/test.sh).
if [ "${EXITGRAPH_CUDA_STUB_DRIVER:-0}" = 1 ]; then
  run="$stubs/run"
  mkdir -p "$run"
  for stub in "$stubs"/*.so; do
    ln -sf "$stub" "$run/$(readelf -d "$stub" | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')"
  done
  export LD_LIBRARY_PATH="$run:$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

export CUDA_HOME="$prefix"
export PATH="$prefix/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
if [ $# -eq 0 ]; then
  set -- build --release -p exitgraph --features cuda
fi
exec cargo "$@"
