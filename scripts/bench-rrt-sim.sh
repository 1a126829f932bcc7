#!/usr/bin/env bash
# The Relaxed Recursive Transformers throughput study's shape, simulated: a vanilla Llama
# (no tying) with static and with continuous batching, and the same model tied into a
# looped block (rank-16 adapters, an exit after the first iteration) with continuous and
# with continuous depth-wise batching, under oracle-like exits after the first iteration.
#   - exit shares: the share of tokens the Oracle rule lets go after the first iteration on
#     the uptrained recursive demo (a real run), and 0.5, 0.75, 0.9;
#   - two cost models of the same graphs: a roofline of an A100-40GB-like accelerator
#     (1555 GB/s, 312 TFLOP/s, bf16 weights and cache: decoding bound by reading weights,
#     the paper's setting) and this machine's CPU, profiled;
#   - the looped policy with the skipped iteration's keys and values absent (the paper's
#     simulation charges nothing for them) and filled (what the real runtime does).
# Usage: scripts/bench-rrt-sim.sh OUT_DIR   (files already in OUT_DIR are reused;
# EXITGRAPH_BIN=... reuses a binary; LLAMA125=DIR reuses the random 124.7M checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/bench-rrt-sim.sh OUT_DIR}"
mkdir -p "$out/a" "$out/b" "$out/runs"
bin="${EXITGRAPH_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release -p exitgraph --locked
  bin="${CARGO_TARGET_DIR:-target}/release/exitgraph"
fi
root="$(pwd)"

# (a) The recursive demo, uptrained, served for real with the Oracle rule after its first
# iteration: the share of tokens that could leave there.
if [ ! -f "$out/a/rrt/pipeline.ron" ]; then
  "$bin" train recursive examples/demo-recursive.ron -o "$out/a/rrt" --train-shared \
    --steps 60 --lr 3e-4 --batch-size 8
fi
python3 - "$out/a/rrt/pipeline.ron" "$out/a/oracle.ron" <<'EOF'
import sys
text = open(sys.argv[1]).read()
for old, new in (('Some("', 'Some("rrt/'),
                 ("    ],\n    runtime", "        InsertExits(every: 4, head: SharedLmHead(norm: true)),\n    ],\n    runtime"),
                 ("depth: Full", "depth: EarlyExit(rule: Oracle)")):
    assert old in text, f"{sys.argv[1]}: no {old!r} to rewrite"
    text = text.replace(old, new)
open(sys.argv[2], "w").write(text)
EOF
if [ ! -f "$out/a/oracle.jsonl" ]; then
  "$bin" serve "$out/a/oracle.ron" --workload "$root/examples/workloads/poisson-heavy.ron" \
    --policy continuous --max-batch 8 --trace "$out/a/oracle.jsonl" > /dev/null
fi
# Each request's first token comes from its prompt's pass (full depth); the share counts
# the tokens after it, to which a simulated distribution applies.
oracle=$(python3 - "$out/a/oracle.jsonl" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
first = {}
for r in recs:
    first[r["seq"]] = min(first.get(r["seq"], r["pos"]), r["pos"])
later = [r for r in recs if r["pos"] != first[r["seq"]]]
print(round(sum(1 for r in later if r["exit_layer"] < 8) / len(later), 3))
EOF
)
echo "Oracle on (a): $oracle of the tokens after each request's first leave after the first iteration"

# (b) The random 124.7M Llama, vanilla and tied into 6 layers looped twice.
model="${LLAMA125:-$out/b/llama125}"
if [ ! -f "$model/model.safetensors" ]; then
  "$bin" bench --layers 12 --hidden 768 --heads 12 --kv-heads 4 --intermediate 2048 \
    --vocab 32000 --prompt-len 8 --decode-tokens 1 --reps 1 --save-model "$model"
fi
cat > "$out/b/vanilla.ron" <<EOF
Pipeline(model: "$model", passes: [], runtime: (max_new_tokens: 32, sampling: Greedy))
EOF
cat > "$out/b/recursive.ron" <<EOF
Pipeline(
    model: "$model",
    passes: [
        TieLayers(loops: 2, init: Average),
        DepthLora(rank: Rank(16), init: Svd),
        InsertExits(after: [6], head: SharedLmHead(norm: true)),
    ],
    runtime: (max_new_tokens: 32, sampling: Greedy),
)
EOF
# A saturating workload for the accelerator (everything queued at once), and the CPU's
# decode-heavy one (as scripts/bench-looped.sh).
cat > "$out/b/gpu-workload.ron" <<EOF
Workload(requests: 512, arrivals: Poisson(rate_per_s: 1000000.0),
         prompt_len: Uniform(min: 64, max: 256), output_len: Uniform(min: 64, max: 256), seed: 7)
EOF
cat > "$out/b/cpu-workload.ron" <<EOF
Workload(requests: 48, arrivals: Poisson(rate_per_s: 40.0),
         prompt_len: Uniform(min: 8, max: 32), output_len: Uniform(min: 16, max: 40), seed: 5)
EOF
for m in vanilla recursive; do
  [ -f "$out/b/$m-gpu.ron" ] || "$bin" profile "$out/b/$m.ron" --roofline --bandwidth-gbs 1555 \
    --peak-tflops 312 --weight-bytes 2 --kv-bytes 2 -o "$out/b/$m-gpu.ron"
  [ -f "$out/b/$m-cpu.ron" ] || "$bin" profile "$out/b/$m.ron" -o "$out/b/$m-cpu.ron"
done
shares="$oracle 0.5 0.75 0.9"
for s in $shares; do
  echo "Distribution(exits: [(6, $s), (12, $(python3 -c "print(round(1 - $s, 3))"))], seed: 1)" \
    > "$out/b/exits-$s.ron"
done

sim() { # NAME MACHINE PIPELINE POLICY [ARGS...]
  local name="$1" machine="$2" pipeline="$3" policy="$4"
  shift 4
  "$bin" serve "$out/b/$pipeline.ron" --workload "$out/b/$machine-workload.ron" \
    --executor sim --cost "$out/b/$pipeline-$machine.ron" --policy "$policy" --max-batch 32 \
    --token-budget 8192 "$@" --json "$out/runs/$machine-$name.json" > /dev/null
}
for machine in gpu cpu; do
  sim vanilla-static "$machine" vanilla static
  sim vanilla-continuous "$machine" vanilla continuous
  sim recursive-continuous "$machine" recursive continuous
  sim recursive-looped "$machine" recursive looped
  for s in $shares; do
    sim "recursive-continuous-exits-$s" "$machine" recursive continuous \
      --sim-exits "$out/b/exits-$s.ron"
    sim "recursive-looped-exits-$s-absent" "$machine" recursive looped \
      --sim-exits "$out/b/exits-$s.ron" --skipped-kv absent
    sim "recursive-looped-exits-$s-filled" "$machine" recursive looped \
      --sim-exits "$out/b/exits-$s.ron"
  done
done
python3 scripts/rrt_sim_table.py "$out/runs" "$shares"
