#!/usr/bin/env python3
"""Checks that Hugging Face transformers loads a checkpoint written by `exitgraph train lm`
as LlamaForCausalLM and computes the same hidden states and logits as exitgraph.

    python3 scripts/check_demo_with_transformers.py --model models/demo --exitgraph target/release/exitgraph

Tokenizes a few corpus-style lines with the checkpoint's tokenizer.json, runs
`exitgraph forward` on them, runs transformers on the same ids, and compares. Needs torch,
transformers, tokenizers and safetensors.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, LlamaForCausalLM

SENTENCES = ["a dog is sad .", "two cats are red .", "the big birds are very cold .", "some men are not happy ."]

LINES = [
    "copy: K7F2Q | K7F2Q",
    "recall: A3, Q8, Z1; Q8",
    "add: 347+285=2360",
    "count A in ABAACA = 4",
    "the big cats are very red .",
    "copy: ZV5P | ZV5P",
    # A long row (about 1500 tokens): positions far into the context, where rotary
    # embeddings of both implementations must still agree.
    "needle: " + " ".join(SENTENCES * 40) + " K47 . " + " ".join(SENTENCES * 10) + " ; K47",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--exitgraph", default="target/release/exitgraph")
    args = ap.parse_args()
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    with open(os.path.join(args.model, "config.json")) as f:
        positions = json.load(f)["max_position_embeddings"]
    encoded = [(line, [bos] + tok.encode(line, add_special_tokens=False).ids + [eos]) for line in LINES]
    # Every row must fit the model's positions with the 8 generated tokens.
    kept = [(line, r) for line, r in encoded if len(r) + 8 <= positions]
    lines = [line for line, _ in kept]
    rows = [r for _, r in kept]
    print(f"{len(rows)} rows of up to {max(len(r) for r in rows)} tokens ({positions} positions)")
    width = max(len(r) for r in rows)
    rows = [r + [eos] * (width - len(r)) for r in rows]  # right padding: causal, harmless
    ids = torch.tensor(rows, dtype=torch.int64)
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        save_file({"input_ids": ids}, inp)
        subprocess.run([args.exitgraph, "forward", args.model, "--input", inp, "--output", out, "--generate", "8"], check=True)
        ours = load_file(out)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    assert isinstance(model, LlamaForCausalLM), type(model)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True)
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=eos)
    worst, scale = {}, {}
    for i, h in enumerate(ref.hidden_states):
        worst[f"hidden_states.{i}"] = (h - ours[f"hidden_states.{i}"]).abs().max().item()
        scale[f"hidden_states.{i}"] = h.abs().max().item()
    worst["logits"] = (ref.logits - ours["logits"]).abs().max().item()
    scale["logits"] = ref.logits.abs().max().item()
    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    for k, v in worst.items():
        print(f"  {k:18s} max|diff| {v:.2e}   max|value| {scale[k]:9.2f}   relative {v / max(scale[k], 1e-12):.1e}")
    same_greedy = torch.equal(greedy, ours["greedy"])
    print(f"  greedy (8 new tokens, EOS stops a row) {'equal' if same_greedy else 'DIFFERS'}")
    for line, row in zip(lines, greedy.tolist()):
        shown = line if len(line) <= 32 else line[:14] + " ... " + line[-13:]
        print(f"  {shown!r:34} -> {tok.decode(row[width:])!r}")
    # Logits to 1e-4 absolute; the residual stream (whose largest entries grow into the
    # hundreds in a trained model) to 1e-5 relative to its largest entry.
    hidden_ok = all(worst[k] <= 1e-5 * max(scale[k], 1.0) for k in worst if k != "logits")
    ok = worst["logits"] <= 1e-4 and hidden_ok and same_greedy
    print("ok" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
