#!/usr/bin/env bash
# The GPU check of a `cuda` build, run from the repository root on a machine with an NVIDIA
# GPU. The binary is built elsewhere (scripts/build-cuda.sh; the GPU machine needs no Rust):
#
#   EXITGRAPH=path/to/exitgraph scripts/gpu-check.sh [OUT_DIR] [--no-bench]
#
# (The release binary is about 77 MB, 19 MB stripped and gzipped: `strip` and `gzip` it to
# carry it.)
#
# 1. the GPU, its driver, and the CUDA libraries the binary loads (PyTorch's CUDA 13 wheels
#    bring them; see scripts/cuda-runtime-requirements.txt);
# 2. reference equivalence on the GPU: `forward` on every fixture with reference tensors,
#    compared by scripts/compare_outputs.py: f32 within 1e-4 of transformers (greedy tokens
#    equal), bf16 and f16 within a relative bound stated there;
# 3. the runtime on the GPU: `run` of the demo pipelines (full depth, early exits,
#    SkipDecode) gives the CPU's tokens, exits included;
# 4. unless --no-bench: prefill and decode against PyTorch (eager, SDPA) on the same GPU and
#    weights, a random ~1B-parameter Llama in bf16, batch 1 and 16, prompts of 512 and 2048
#    tokens.
# Needs python3 with numpy and safetensors, and torch + transformers for step 4. Logs and
# outputs go to OUT_DIR (default gpu-check); the exit status is the number of failures.
# EXITGRAPH_CHECK_DEVICE=cpu runs steps 2-3 on the CPU (a check of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
bin="${EXITGRAPH:-target/release/exitgraph}"
out=gpu-check
bench=1
for arg in "$@"; do
  case "$arg" in
    --no-bench) bench=0 ;;
    *) out="$arg" ;;
  esac
done
mkdir -p "$out"
device="${EXITGRAPH_CHECK_DEVICE:-cuda:0}"
failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

echo "== 1. GPU, driver, libraries"
if [ "$device" != cpu ]; then
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv ||
    fail "nvidia-smi: no NVIDIA driver or GPU"
  # The CUDA 13 libraries of a PyTorch (or pip) install: site-packages/nvidia/cu13/lib.
  libs="$(python3 -c '
import nvidia, os
print(next((os.path.join(p, "cu13", "lib") for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "cu13", "lib"))), ""))' 2>/dev/null || true)"
  if [ -n "$libs" ]; then
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "CUDA libraries from $libs"
  fi
fi
missing="$(ldd "$bin" | grep 'not found' || true)"
if [ -n "$missing" ]; then
  case "$missing" in
    *libcuda.so*) fail "$bin cannot load: $missing (the NVIDIA driver's library: install a driver for CUDA 13, R580 or newer)" ;;
    *) fail "$bin cannot load: $missing (pip install --require-hashes -r scripts/cuda-runtime-requirements.txt)" ;;
  esac
  exit "$failures"
fi
ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc' || true
cuda_flag=()
[ "$device" != cpu ] && cuda_flag=(--cuda "${device#cuda:}")

echo "== 2. reference equivalence on $device"
for dir in tests/fixtures/*/ tests/fixtures/variants/*/; do
  dir="${dir%/}"
  name="$(basename "$dir")"
  ref="$dir/reference.safetensors"
  [ -f "$ref" ] || continue
  model="$dir"
  [ -d "$dir/model" ] && model="$dir/model"
  if [ ! -f "$model/config.json" ] || ! ls "$model"/model*.safetensors >/dev/null 2>&1; then
    echo "skip $name: no weights here (MiniLM's come from scripts/fetch-minilm.sh)"
    continue
  fi
  greedy=()
  new="$(python3 -c "
from safetensors.numpy import load_file
r = load_file('$ref')
print(r['greedy'].shape[1] - r['input_ids'].shape[1] if 'greedy' in r else 0)")"
  [ "$new" -gt 0 ] && greedy=(--generate "$new")
  for dtype in f32 bf16 f16; do
    got="$out/$name-$dtype.safetensors"
    if ! "$bin" forward "$model" --input "$ref" --output "$got" --dtype "$dtype" \
      "${cuda_flag[@]}" "${greedy[@]}" >"$out/$name-$dtype.log" 2>&1; then
      fail "$name $dtype: forward failed: $(tail -3 "$out/$name-$dtype.log")"
      continue
    fi
    echo "-- $name $dtype"
    python3 scripts/compare_outputs.py "$ref" "$got" "$dtype" || fail "$name $dtype differs"
  done
done

echo "== 3. the runtime on $device: the CPU's tokens and exits"
prompt="the big cats are"
trap 'rm -f examples/.gpu-check-*.ron' EXIT
for pipeline in demo demo-exits demo-skipdecode; do
  # A copy beside the original (its paths are relative to it), on the device.
  copy="examples/.gpu-check-$pipeline.ron"
  if [ "$device" = cpu ]; then
    cp "examples/$pipeline.ron" "$copy"
  else
    sed "0,/^Pipeline(/s//Pipeline(\n    device: Cuda(${device#cuda:}),/" "examples/$pipeline.ron" >"$copy"
  fi
  "$bin" run "examples/$pipeline.ron" --prompt "$prompt" --show-exits >"$out/run-$pipeline-cpu.txt" 2>&1 ||
    fail "$pipeline on the CPU: $(tail -3 "$out/run-$pipeline-cpu.txt")"
  if "$bin" run "$copy" --prompt "$prompt" --show-exits >"$out/run-$pipeline-$device.txt" 2>&1; then
    if diff "$out/run-$pipeline-cpu.txt" "$out/run-$pipeline-$device.txt" >"$out/run-$pipeline.diff"; then
      echo "ok   $pipeline: same tokens and exits as on the CPU"
    else
      fail "$pipeline: tokens or exits differ from the CPU's ($out/run-$pipeline.diff)"
    fi
  else
    fail "$pipeline on $device: $(tail -3 "$out/run-$pipeline-$device.txt")"
  fi
  rm -f "$copy"
done

if [ "$bench" = 1 ] && [ "$device" != cpu ]; then
  echo "== 4. prefill and decode against PyTorch, bf16, random ~1B Llama"
  model="$out/llama-1b"
  save=(--save-model "$model")
  [ -d "$model" ] && save=(--model "$model")
  for batch in 1 16; do
    for prompt_len in 512 2048; do
      "$bin" bench --cuda "${device#cuda:}" --torch --dtype bf16 "${save[@]}" \
        --layers 16 --hidden 2048 --heads 32 --kv-heads 8 --intermediate 8192 --vocab 32000 \
        --batch "$batch" --prompt-len "$prompt_len" --decode-tokens 64 --reps 5 |
        tee "$out/bench-$batch-$prompt_len.md" || fail "bench, batch $batch, $prompt_len tokens"
      save=(--model "$model")
    done
  done
fi

echo "== $failures failure(s)"
exit "$failures"
