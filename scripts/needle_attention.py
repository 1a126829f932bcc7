#!/usr/bin/env python3
"""Where needle retrieval breaks: the attention mass the question's last position puts on the
fact's tokens, per layer (the largest over heads), against the haystack's length, computed by
Hugging Face transformers (eager attention) on a checkpoint written by `exitgraph train lm`.

    python3 scripts/needle_attention.py --model models/demo --lengths 250,500,1000,1500,2000

Cases are `scripts/needle_torch.py`'s (haystacks of five repeated grammar sentences, one fact
`K47 .` at the given depth, the question `; K`). For each (length, depth) it prints the share
of cases whose two greedy tokens spell the value, then per layer the mean over cases of the
largest per-head attention weight summed over the fact's key and value tokens, at the last
position. A retrieval head whose mass falls as the haystack grows, with the fact at the same
distance from the question, is attention diluted over more keys: its logit margin for the
fact does not grow with the length. Needs torch and transformers.
"""
import argparse
import os
import random
import sys

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from needle_torch import case  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/demo")
    ap.add_argument("--lengths", default="250,500,1000,1500,2000")
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model = LlamaForCausalLM.from_pretrained(
        a.model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{a.model}/tokenizer.json")
    rng = random.Random(a.seed)
    print("tokens  depth  retrieved | per layer: largest head's attention mass on the fact")
    for length in (int(x) for x in a.lengths.split(",")):
        for depth in (float(x) for x in a.depths.split(",")):
            right, masses = 0, []
            for _ in range(a.cases):
                text, value = case(rng, tok, length, depth)
                key = text[-1]
                start = text.index(f"{key}{value} .")
                end = start + len(f"{key}{value}")
                enc = tok(text, return_offsets_mapping=True)
                fact = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > start]
                ids = torch.tensor([enc["input_ids"]])
                with torch.no_grad():
                    out = model(ids, output_attentions=True)
                    gen = model.generate(ids, max_new_tokens=2, do_sample=False)
                right += tok.decode(gen[0, ids.shape[1]:]).replace(" ", "") == value
                masses.append([float(att[0, :, -1, fact].sum(-1).max()) for att in out.attentions])
            mean = [sum(m[layer] for m in masses) / len(masses) for layer in range(len(masses[0]))]
            print(
                f"{length:6d}  {depth:5.1f}  {right / a.cases:9.2f} | "
                + " ".join(f"{x:.2f}" for x in mean),
                flush=True,
            )


if __name__ == "__main__":
    main()
