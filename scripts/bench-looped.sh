#!/usr/bin/env bash
# Continuous vs looped depth-wise batching, real and simulated, side by side:
#   (a) the recursive demo (examples/demo-recursive.ron, uptrained with `train recursive`)
#       with its real exits (an exit after the first iteration, Confidence(0.8)) and with an
#       RRT-like exit distribution (60% of tokens leave after the first iteration);
#   (b) a random 124.7M-parameter Llama (12 layers) tied into 6 layers looped twice, rank-16
#       adapters, an exit head after the first iteration, served without exits, with the RRT-like
#       distribution and with the exit share (a)'s real exits had.
# Every served configuration with exits runs twice: the skipped layers' keys and values filled
# from the exit state (CALM's state copying, the default) and absent (--skipped-kv absent:
# later tokens attend there only to the positions present, recursion-wise caching).
# Each real configuration is served --reps times (medians and ranges in the output); each is
# also simulated with the cost model `exitgraph profile` fitted to that pipeline.
# Usage: scripts/bench-looped.sh OUT_DIR   (files already in OUT_DIR are reused)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/bench-looped.sh OUT_DIR}"
reps="${REPS:-3}"
mkdir -p "$out/a" "$out/b"
bin="${EXITGRAPH_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release -p exitgraph --locked
  bin="${CARGO_TARGET_DIR:-target}/release/exitgraph"
fi
root="$(pwd)"
heavy="$root/examples/workloads/poisson-heavy.ron"

# (a) the uptrained recursive demo.
if [ ! -f "$out/a/rrt/pipeline.ron" ]; then
  "$bin" train recursive examples/demo-recursive.ron -o "$out/a/rrt" --train-shared \
    --steps 60 --lr 3e-4 --batch-size 8
fi
python3 - "$out/a/rrt/pipeline.ron" "$out/a" <<'EOF'
import sys
src, dst = sys.argv[1], sys.argv[2]
text = open(src).read().replace('Some("', 'Some("rrt/')
heads = text.replace("    ],\n    runtime", "        InsertExits(every: 4, head: SharedLmHead(norm: true)),\n    ],\n    runtime")
open(f"{dst}/full.ron", "w").write(text)
open(f"{dst}/heads.ron", "w").write(heads)
open(f"{dst}/exits.ron", "w").write(heads.replace("depth: Full", "depth: EarlyExit(rule: Confidence(0.8))"))
EOF
echo 'Distribution(exits: [(4, 0.6), (8, 0.4)], seed: 1)' > "$out/a/rrt-like.ron"
[ -f "$out/a/cost.ron" ] || "$bin" profile "$out/a/heads.ron" -o "$out/a/cost.ron"

# (b) the random recursive Llama.
if [ ! -f "$out/b/llama125/model.safetensors" ]; then
  "$bin" bench --layers 12 --hidden 768 --heads 12 --kv-heads 4 --intermediate 2048 \
    --vocab 32000 --prompt-len 8 --decode-tokens 1 --reps 1 --save-model "$out/b/llama125"
fi
cat > "$out/b/heads.ron" <<EOF
Pipeline(
    model: "llama125",
    passes: [
        TieLayers(loops: 2, init: Average),
        DepthLora(rank: Rank(16), init: Svd),
        InsertExits(after: [6], head: SharedLmHead(norm: true)),
    ],
    runtime: (max_new_tokens: 32, sampling: Greedy),
)
EOF
cat > "$out/b/workload.ron" <<EOF
// Decode-heavy: short prompts, 16-40 new tokens, arrivals faster than the model serves.
Workload(
    requests: 48,
    arrivals: Poisson(rate_per_s: 40.0),
    prompt_len: Uniform(min: 8, max: 32),
    output_len: Uniform(min: 16, max: 40),
    seed: 5,
)
EOF
echo 'Distribution(exits: [(6, 0.6), (12, 0.4)], seed: 1)' > "$out/b/rrt-like.ron"
[ -f "$out/b/cost.ron" ] || "$bin" profile "$out/b/heads.ron" -o "$out/b/cost.ron"

serve() { # NAME PIPELINE WORKLOAD COST [ARGS...]
  local name="$1" pipeline="$2" workload="$3" cost="$4"
  shift 4
  for policy in continuous looped; do
    echo "=== $name, $policy, real (median of $reps)"
    "$bin" serve "$pipeline" --workload "$workload" --policy "$policy" --max-batch 8 \
      --reps "$reps" "$@" --json "$out/$name-$policy-real.json" | tail -n 12
    echo "=== $name, $policy, simulated"
    "$bin" serve "$pipeline" --workload "$workload" --policy "$policy" --max-batch 8 \
      --executor sim --cost "$cost" "$@" --json "$out/$name-$policy-sim.json" \
      | grep -E "throughput|mean batch|rows per stage|end to end"
  done
}

# (a): real exits (the simulation replays the continuous run's trace), then the RRT-like share.
"$bin" serve "$out/a/exits.ron" --workload "$heavy" --policy continuous --max-batch 8 \
  --trace "$out/a/real.jsonl" > /dev/null
echo "Replay(trace: \"real.jsonl\")" > "$out/a/replay.ron"
for policy in continuous looped; do
  echo "=== a-exits, $policy, real (median of $reps)"
  "$bin" serve "$out/a/exits.ron" --workload "$heavy" --policy "$policy" --max-batch 8 \
    --reps "$reps" --json "$out/a-exits-$policy-real.json" | tail -n 12
  echo "=== a-exits, $policy, simulated (replayed trace)"
  "$bin" serve "$out/a/heads.ron" --workload "$heavy" --policy "$policy" --max-batch 8 \
    --executor sim --cost "$out/a/cost.ron" --sim-exits "$out/a/replay.ron" \
    | grep -E "throughput|mean batch|rows per stage|end to end"
done
serve a-full "$out/a/full.ron" "$heavy" "$out/a/cost.ron"
serve a-rrt "$out/a/heads.ron" "$heavy" "$out/a/cost.ron" --sim-exits "$out/a/rrt-like.ron"
serve a-rrt-absent "$out/a/heads.ron" "$heavy" "$out/a/cost.ron" --sim-exits "$out/a/rrt-like.ron" \
  --skipped-kv absent

# (b): no exits, the RRT-like share, and the share of tokens (a)'s real exits let go.
share=$(python3 -c "
import json
d = [json.loads(l)['exit_layer'] for l in open('$out/a/real.jsonl')]
print(round(sum(1 for x in d if x < 8) / len(d), 3))")
echo "Distribution(exits: [(6, $share), (12, $(python3 -c "print(round(1 - $share, 3))"))], seed: 1)" \
  > "$out/b/a-share.ron"
echo "(a)'s real exits let $share of its tokens go after the first iteration"
serve b-full "$out/b/heads.ron" "$out/b/workload.ron" "$out/b/cost.ron"
serve b-rrt "$out/b/heads.ron" "$out/b/workload.ron" "$out/b/cost.ron" --sim-exits "$out/b/rrt-like.ron"
serve b-a-share "$out/b/heads.ron" "$out/b/workload.ron" "$out/b/cost.ron" --sim-exits "$out/b/a-share.ron"
serve b-rrt-absent "$out/b/heads.ron" "$out/b/workload.ron" "$out/b/cost.ron" \
  --sim-exits "$out/b/rrt-like.ron" --skipped-kv absent
serve b-a-share-absent "$out/b/heads.ron" "$out/b/workload.ron" "$out/b/cost.ron" \
  --sim-exits "$out/b/a-share.ron" --skipped-kv absent
