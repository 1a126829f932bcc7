#!/usr/bin/env python3
"""Needle retrieval by Hugging Face transformers alone, on a checkpoint written by
`exitgraph train lm`: an independent check of what `exitgraph eval layers --needle N` finds.

    python3 scripts/needle_torch.py --model models/demo --lengths 500,1000,1500,2000 --cases 5

Each case is a haystack of grammar sentences drawn (with --seed) from a small fixed list,
about N tokens long, holding one fact `K47 .` before the sentence at the given depth, then
the question `; K`. LlamaForCausalLM decodes two tokens greedily; a case counts when they
spell the value. Prints the share per (length, depth). Needs torch and transformers.
"""
import argparse
import random

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

SENTENCES = [
    "a dog is sad .",
    "two cats are red .",
    "some birds are not green .",
    "the fish is cold .",
    "three dogs are happy .",
]


def case(rng, tok, length, depth):
    sentences = []
    while len(tok(" ".join(sentences))["input_ids"]) <= length:
        sentences.append(rng.choice(SENTENCES))
    at = round(depth * len(sentences))
    key = rng.choice("ABCDEFGHJK")
    value = f"{rng.randint(0, 9)}{rng.randint(0, 9)}"
    parts = ["needle:"]
    for i in range(len(sentences) + 1):
        if i == at:
            parts.append(f"{key}{value} .")
        if i < len(sentences):
            parts.append(sentences[i])
    return " ".join(parts) + f" ; {key}", value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--lengths", default="500,1000,1500,2000")
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{a.model}/tokenizer.json")
    rng = random.Random(a.seed)
    print("tokens  depth  retrieved")
    for length in (int(x) for x in a.lengths.split(",")):
        for depth in (float(x) for x in a.depths.split(",")):
            right = 0
            for _ in range(a.cases):
                text, value = case(rng, tok, length, depth)
                ids = tok(text, return_tensors="pt")["input_ids"]
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=2, do_sample=False)
                got = tok.decode(out[0, ids.shape[1]:]).replace(" ", "")
                right += got.startswith(value)
            print(f"{length:6}  {depth:5.2f}  {right}/{a.cases}", flush=True)


if __name__ == "__main__":
    main()
