#!/usr/bin/env python3
"""Checks the fixtures in tests/fixtures (and tests/fixtures/variants) against Hugging Face
transformers: every hidden state and the logits to 1e-4, and greedy decoding token for
token. Needs torch and transformers (not needed by the test suite; run it where they exist).

    python3 scripts/check_with_transformers.py [--attn eager|sdpa]
"""
import argparse
import glob
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def check(folder, attn):
    ref = load_file(os.path.join(folder, "reference.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    ids = ref["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    worst = 0.0
    for i, h in enumerate(out.hidden_states):
        worst = max(worst, (h - ref[f"hidden_states.{i}"]).abs().max().item())
    worst = max(worst, (out.logits - ref["logits"]).abs().max().item())
    greedy = ref["greedy"]
    new = greedy.shape[1] - ids.shape[1]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=model.config.eos_token_id or 0)
    same = gen.shape == greedy.shape and bool((gen == greedy).all())
    return worst, same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attn", default="eager")
    args = ap.parse_args()
    folders = [os.path.join(ROOT, d) for d in ("tiny-llama", "tiny-qwen2", "tiny-gpt2")]
    folders += sorted(glob.glob(os.path.join(ROOT, "variants", "*", "")))
    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, attention {args.attn}")
    ok = True
    for f in folders:
        name = os.path.relpath(f, ROOT).rstrip("/")
        try:
            worst, same = check(f, args.attn)
            good = worst <= 1e-4 and same
            ok &= good
            print(f"{name:40s} max|diff| {worst:.2e}  greedy {'equal' if same else 'DIFFERS'}  {'ok' if good else 'FAIL'}")
        except Exception as e:  # report every folder
            ok = False
            print(f"{name:40s} ERROR {type(e).__name__}: {e}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
