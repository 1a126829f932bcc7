#!/usr/bin/env python3
"""Makes the Kangaroo adapter reference fixture, tests/fixtures/kangaroo/, from the tiny Llama
fixture (tests/fixtures/tiny-llama: 6 layers, 4 query heads, 2 key-value heads, head size 16)
with Hugging Face transformers, written from the method's description (Liu et al., 2024,
"Kangaroo: Lossless Self-Speculative Decoding via Double Early Exiting"), not from exitgraph's
code. The draft after layer 2 is

    x      = the residual stream after the first 2 layers (transformers' hidden_states[2])
    h      = x + Attention(RMSNorm_a(x))        one attention layer, the model's head layout,
                                                RoPE at positions 0..n-1, causal, no biases
    logits = lm_head(RMSNorm_b(h))              the model's own (frozen) LM head

with random adapter weights (seeded; norm weights near one). Everything is computed in float64
from the float32 weights and stored as float32.

Writes adapter.safetensors (the adapter's weights, named as exitgraph's `InsertExits(head:
AttentionAdapter)` reads them: exits.2.attn_norm.weight, exits.2.attn.{q,k,v,o}.weight,
exits.2.norm.weight), case.safetensors (per prompt NAME: NAME.input_ids, NAME.draft_logits
[n, vocab], NAME.logits [n, vocab], the full model's) and case.json.

    python3 scripts/make_kangaroo_fixture.py
Needs torch and transformers (run with transformers 5.24 / torch 2.15).
"""
import json
import math
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODEL = os.path.join(ROOT, "tiny-llama")
OUT = os.path.join(ROOT, "kangaroo")
AFTER = 2
# (name, prompt length, seed of the prompt)
PROMPTS = [("long", 23, 0), ("short", 9, 1)]


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def adapter_weights(cfg):
    g = torch.Generator().manual_seed(1234)
    h, d = cfg.hidden_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * d, cfg.num_key_value_heads * d

    def normal(*shape, std):
        return (torch.randn(*shape, generator=g) * std).float()

    p = f"exits.{AFTER}"
    return {
        f"{p}.attn_norm.weight": (1.0 + normal(h, std=0.1)),
        f"{p}.attn.q.weight": normal(q_out, h, std=0.2),
        f"{p}.attn.k.weight": normal(kv_out, h, std=0.2),
        f"{p}.attn.v.weight": normal(kv_out, h, std=0.2),
        f"{p}.attn.o.weight": normal(h, q_out, std=0.2),
        f"{p}.norm.weight": (1.0 + normal(h, std=0.1)),
    }


def draft_logits(model, w, ids):
    cfg = model.config
    p = f"exits.{AFTER}"
    W = {k: v.double() for k, v in w.items()}
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        x = out.hidden_states[AFTER]
        b, n, _ = x.shape
        d = cfg.head_dim
        a = rms_norm(x, W[f"{p}.attn_norm.weight"], cfg.rms_norm_eps)
        q = (a @ W[f"{p}.attn.q.weight"].T).view(b, n, -1, d).transpose(1, 2)
        k = (a @ W[f"{p}.attn.k.weight"].T).view(b, n, -1, d).transpose(1, 2)
        v = (a @ W[f"{p}.attn.v.weight"].T).view(b, n, -1, d).transpose(1, 2)
        pos = torch.arange(n).unsqueeze(0)
        cos, sin = model.model.rotary_emb(x, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(b, n, -1) @ W[f"{p}.attn.o.weight"].T
        h = x + attn
        logits = model.lm_head(rms_norm(h, W[f"{p}.norm.weight"], cfg.rms_norm_eps))
    return logits[0], out.logits[0]


def main():
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64, attn_implementation="eager")
    model.eval()
    w = adapter_weights(model.config)
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous() for k, v in w.items()}, os.path.join(OUT, "adapter.safetensors"))
    tensors, described = {}, []
    for name, n, seed in PROMPTS:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g)
        draft, full = draft_logits(model, w, ids)
        tensors[f"{name}.input_ids"] = ids[0].to(torch.int64)
        tensors[f"{name}.draft_logits"] = draft.float()
        tensors[f"{name}.logits"] = full.float()
        agree = (draft.argmax(-1) == full.argmax(-1)).float().mean().item()
        described.append({"name": name, "prompt_tokens": n, "draft_agrees_with_full": agree})
        print(f"{name}: n {n}, draft argmax agrees with the full model at {agree:.0%} of positions")
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "case.safetensors"))
    import transformers
    with open(os.path.join(OUT, "case.json"), "w") as f:
        json.dump({
            "model": "../tiny-llama",
            "after": AFTER,
            "made_with": f"transformers {transformers.__version__}, torch {torch.__version__}, float64",
            "script": "scripts/make_kangaroo_fixture.py",
            "prompts": described,
        }, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
