#!/usr/bin/env python3
"""Makes the GemFilter reference fixture, tests/fixtures/gemfilter/, from the tiny Llama
fixture (tests/fixtures/tiny-llama: 6 layers, 4 query heads, 2 key-value heads) with
Hugging Face transformers, written from the method's description (Shi et al., 2024,
"Discovering the Gems in Early Layers"), not from exitgraph's code:

  1. run the model on the prompt; take the input of layer r (0-based, the reference
     implementation's `select_layer_idx`), apply that layer's input norm, q and k
     projections and RoPE at positions 0..n-1;
  2. score every prompt position by the last position's query against its key: no 1/sqrt(d)
     scale, no softmax, key-value heads repeated to the query heads, summed over heads;
  3. average-pool the scores over the sequence (kernel `pool`, stride 1, padding pool // 2,
     the zero padding counted in the average: torch's avg_pool1d defaults);
  4. keep the top min(k, n) positions, sorted into their original order; with exitgraph's
     `keep_first: a, keep_last: b` (a deviation the reference does not have: the
     `forced_*` case), the last b and the first a positions are kept whatever they score and
     the top k - a - b pooled scores among the positions a..n-b-1 fill the rest;
  5. run the full model afresh on the kept token ids (positions 0..k-1, no cache) and decode
     greedily from there.

Everything is computed in float64 and stored as float32 (ids as int64). Each case is checked
to have a gap between the k-th and (k+1)-th pooled score well above float32 rounding, so the
selection does not hinge on the last bits.

Writes, per case NAME, NAME.safetensors (input_ids, scores_raw, scores, selected, logits,
hidden_states.{0..L}, greedy) and one cases.json describing them.

    python3 scripts/make_gemfilter_fixture.py
Needs torch and transformers (run with transformers 5.24 / torch 2.15).
"""
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODEL = os.path.join(ROOT, "tiny-llama")
OUT = os.path.join(ROOT, "gemfilter")

# (name, prompt length, filter layer r, keep k, pool, new tokens, seed of the prompt,
#  keep_first, keep_last)
CASES = [
    ("r2_k64_pool5", 300, 2, 64, 5, 6, 0, 0, 0),
    ("r0_k40_pool3", 137, 0, 40, 3, 4, 1, 0, 0),
    ("r5_k17_pool1", 90, 5, 17, 1, 4, 2, 0, 0),
    ("keep_all", 50, 1, 64, 5, 6, 3, 0, 0),
    ("forced_r1_k24_first3_last6", 260, 1, 24, 5, 6, 4, 3, 6),
]


def scores_at(model, ids, r):
    """Layer r's last-query scores, [batch, n]: q·k after RoPE, summed over heads."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        x = out.hidden_states[r]
        layer = model.model.layers[r]
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        b, n, _ = h.shape
        d = attn.head_dim
        q = attn.q_proj(h).view(b, n, -1, d).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, -1, d).transpose(1, 2)
        pos = torch.arange(n).unsqueeze(0).expand(b, n)
        cos, sin = model.model.rotary_emb(h, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        last = q[:, :, -1:, :]
        inner = torch.matmul(last, k.transpose(-1, -2))[:, :, 0, :]
        return inner.sum(dim=1)


def select(raw, keep, pool, first=0, last=0):
    pooled = F.avg_pool1d(raw.unsqueeze(1), kernel_size=pool, padding=pool // 2, stride=1)[:, 0, :]
    n = raw.shape[-1]
    k = min(keep, n)
    assert first + last <= k
    # The positions left to the scores: a..n-b-1; the forced ones are added back after topk.
    middle = pooled[:, first:n - last]
    free = k - first - last
    top = torch.topk(middle, free, dim=-1)
    forced = torch.cat([torch.arange(first), torch.arange(n - last, n)]).unsqueeze(0)
    selected = torch.sort(torch.cat([top.indices + first, forced], dim=-1), dim=-1).values
    if free < middle.shape[-1]:
        ordered = torch.sort(middle, dim=-1, descending=True).values
        gap = (ordered[:, free - 1] - ordered[:, free]).abs().min().item()
        scale = pooled.abs().max().item()
        assert gap > 1e-4 * scale, f"k-th and (k+1)-th scores too close: {gap} (scale {scale})"
    return pooled, selected


def main():
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64, attn_implementation="eager")
    model.eval()
    vocab = model.config.vocab_size
    os.makedirs(OUT, exist_ok=True)
    described = []
    for name, n, r, keep, pool, new, seed, first, last in CASES:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab, (1, n), generator=g)
        raw = scores_at(model, ids, r)
        pooled, selected = select(raw, keep, pool, first, last)
        kept_ids = torch.gather(ids, 1, selected)
        with torch.no_grad():
            out = model(input_ids=kept_ids, output_hidden_states=True)
            greedy = model.generate(kept_ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                    pad_token_id=model.config.eos_token_id or 0)
        tensors = {
            "input_ids": ids.to(torch.int64),
            "scores_raw": raw.float(),
            "scores": pooled.float(),
            "selected": selected.to(torch.int64),
            "logits": out.logits.float(),
            "greedy": greedy.to(torch.int64),
        }
        for i, h in enumerate(out.hidden_states):
            tensors[f"hidden_states.{i}"] = h.float()
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, f"{name}.safetensors"))
        described.append({
            "name": name, "prompt_tokens": n, "filter_layer": r, "keep": keep, "pool": pool,
            "new_tokens": new, "kept": int(selected.shape[1]), "keep_first": first, "keep_last": last,
        })
        print(f"{name}: n {n}, r {r}, keep {keep}, pool {pool} -> {selected.shape[1]} kept, "
              f"first {selected[0, :8].tolist()}")
    import transformers
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({
            "model": "../tiny-llama",
            "made_with": f"transformers {transformers.__version__}, torch {torch.__version__}, float64",
            "script": "scripts/make_gemfilter_fixture.py",
            "cases": described,
        }, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
