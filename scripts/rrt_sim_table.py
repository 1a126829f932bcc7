#!/usr/bin/env python3
"""Table of scripts/bench-rrt-sim.sh's simulated runs: throughput, p50 end-to-end latency and
mean rows per step of each configuration, relative to the vanilla model with static and with
continuous batching, beside what a step that only reads the shared block's weights predicts
for looped batching with exits (2 / (2 - e) over continuous batching, e the share of tokens
leaving after the first of two iterations).

Usage: scripts/rrt_sim_table.py RUNS_DIR "SHARE SHARE ..."
"""
import json
import os
import re
import sys


def ideal_looped_gain(share, head=0.0, layers=1.0):
    """Tokens per second of looped batching over continuous batching's with full steps of
    the same rows, when a call's time is a fixed `head` (the LM head's read, paid by every
    call) plus the read of the layers it runs (`layers` for all of them; a looped call runs
    one iteration, half): a token needs 2 - e iterations on average, so a looped call
    finishes 1 / (2 - e) of its rows in head + layers / 2, a continuous one all of them in
    head + layers."""
    return (head + layers) / ((head + layers / 2.0) * (2.0 - share))


def cost_terms(path):
    """The intercept (c0) and per_layers of a cost model file (RON)."""
    text = open(path).read()
    c0 = float(re.search(r"coefficients: \(([-0-9.e]+),", text).group(1))
    layers = float(re.search(r"per_layers: ([-0-9.e]+)", text).group(1))
    return c0, layers


# Checked by hand: nothing leaves early, no gain; every token leaves, twice the tokens per
# unit of weight reads; half of them, 4/3.
assert ideal_looped_gain(0.0) == 1.0 and ideal_looped_gain(1.0) == 2.0
assert abs(ideal_looped_gain(0.5) - 4.0 / 3.0) < 1e-12
# With a head read as long as a layer read: (1 + 1) / ((1 + 0.5) * 1.5) = 8/9 at e = 0.5.
assert abs(ideal_looped_gain(0.5, head=1.0) - 8.0 / 9.0) < 1e-12


def main():
    runs, shares = sys.argv[1], sys.argv[2].split()
    for machine, title in (("gpu", "A100-40GB-like roofline (1555 GB/s, 312 TFLOP/s, bf16)"),
                           ("cpu", "this CPU, profiled")):
        def load(name):
            path = os.path.join(runs, f"{machine}-{name}.json")
            with open(path) as f:
                return json.load(f)

        static = load("vanilla-static")["throughput_tok_s"]
        csb = load("vanilla-continuous")["throughput_tok_s"]
        print(f"\n{title}\n")
        print("| model | batching | exits (share after iteration 1) | skipped KV | tok/s | "
              "e2e p50 (s) | mean rows/step | vs vanilla static | vs vanilla continuous | "
              "looped / recursive continuous without exits: predicted from the step costs |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
        rows = [("vanilla", "static", "none", "", "vanilla-static"),
                ("vanilla", "continuous", "none", "", "vanilla-continuous"),
                ("recursive", "continuous", "none", "", "recursive-continuous"),
                ("recursive", "looped", "none", "", "recursive-looped")]
        for s in shares:
            rows += [("recursive", "continuous", s, "filled", f"recursive-continuous-exits-{s}"),
                     ("recursive", "looped", s, "absent", f"recursive-looped-exits-{s}-absent"),
                     ("recursive", "looped", s, "filled", f"recursive-looped-exits-{s}-filled")]
        base = load("recursive-continuous")["throughput_tok_s"]
        head, layers = cost_terms(os.path.join(runs, "..", "b", f"recursive-{machine}.ron"))
        for model, policy, exits, kv, name in rows:
            r = load(name)
            t = r["throughput_tok_s"]
            pred = ""
            if policy == "looped" and machine == "cpu":
                # Compute-bound: a step's time grows with its rows, so the weights-read
                # formula does not apply; only the simulated ratio is shown.
                pred = f"sim {t / base:.2f}x"
            elif policy == "looped":
                e = 0.0 if exits == "none" else float(exits)
                pred = (f"{ideal_looped_gain(e, head, layers):.2f}x "
                        f"(weights only {ideal_looped_gain(e):.2f}x; sim {t / base:.2f}x)")
            print(f"| {model} | {policy} | {exits} | {kv} | {t:.0f} | {r['e2e']['p50_ms'] / 1e3:.3f} | "
                  f"{r['mean_batch']:.1f} | {t / static:.2f}x | {t / csb:.2f}x | {pred} |")


if __name__ == "__main__":
    main()
