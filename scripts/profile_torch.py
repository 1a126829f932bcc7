#!/usr/bin/env python3
"""Per-op profile of PyTorch's prefill and decode on a Llama checkpoint.

The PyTorch side of the CPU profile in docs/benchmarks.md: transformers' LlamaForCausalLM
(eager, SDPA attention) under torch.profiler, the same work as `exitgraph bench` (one
prefill call over the prompt, then greedy single-token decode steps with the KV cache), and
a table of self CPU time per op and input shape for each phase.

    python3 scripts/profile_torch.py MODEL_DIR [--prompt-len 128] [--decode-tokens 32]
        [--threads 2] [--rows 25]

Make MODEL_DIR with `exitgraph bench ... --save-model MODEL_DIR`.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = LlamaForCausalLM.from_pretrained(
        a.model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    vocab = model.config.vocab_size
    ids = torch.tensor([[(i * 7919 + 13) % vocab for i in range(a.prompt_len)]])

    def prefill():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.past_key_values, int(out.logits[0, -1].argmax())

    def decode(past, nxt):
        for _ in range(a.decode_tokens):
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())

    with torch.inference_mode():
        decode(*prefill())  # warm-up
        for phase in ("prefill", "decode"):
            past, nxt = prefill()
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                if phase == "prefill":
                    prefill()
                else:
                    decode(past, nxt)
            wall = (time.perf_counter() - t0) * 1e3
            print(f"## PyTorch {torch.__version__}, {phase}, {a.threads} threads, "
                  f"wall {wall:.1f} ms (profiled)\n")
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=40,
                max_shapes_column_width=60))


if __name__ == "__main__":
    main()
