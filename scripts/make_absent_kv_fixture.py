#!/usr/bin/env python3
"""Makes the skipped-keys-and-values reference fixture, tests/fixtures/absent-kv/, from the
tiny Llama fixture (tests/fixtures/tiny-llama: 6 layers, 4 query heads, 2 key-value heads,
head size 16), written from the methods' descriptions, not from exitgraph's code.

Greedy decoding where each generated token's pass stops at a given depth d (2, 4 or 6 of the
6 layers) and its next token comes from the exit head there: the model's own final RMSNorm
and LM head applied to the residual stream after d layers (exitgraph's
`InsertExits(after: [2, 4], head: SharedLmHead(norm: true))`). Prompt tokens run every layer.
What a later token sees in the layers d.. that an earlier token skipped is the question:

- absent (Mixture-of-Recursions' recursion-wise caching): the earlier token has no key or
  value in those layers; a query at layer l attends only to the positions that ran layer l;
- filled (CALM's state copying): the earlier token's keys and values in layer l >= d are
  computed from its exit state h_d through layer l's input RMSNorm and k, v projections
  (with RoPE at its own position).

Each step recomputes the whole sequence with per-layer attention masks (no cache), in float64
from the float32 weights; with every depth 6 the logits equal transformers'
LlamaForCausalLM's within 1e-6 (checked below; transformers computes the rotary frequencies
in float32).

Writes case.safetensors: prompt_ids [P], depths [N-1] (the depth of the pass over generated
position P+i, which produces the token at P+i+1), and for MODE in absent, filled:
MODE.tokens [N] and MODE.logits [N, vocab] (the logits each token was the argmax of; the
first from the prompt's full pass). The two modes' tokens differ (asserted), so a runtime
that fills when it should leave absent, or the reverse, is caught.

    python3 scripts/make_absent_kv_fixture.py
Needs torch, safetensors and transformers (run with transformers 5.24 / torch 2.15).
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODEL = os.path.join(ROOT, "tiny-llama")
OUT = os.path.join(ROOT, "absent-kv")
PROMPT_LEN = 7
NEW_TOKENS = 12
# The depth of each generated token's pass (a token at depth 6 runs the whole model).
DEPTHS = [2, 4, 6, 2, 2, 6, 4, 2, 6, 4, 2]
assert len(DEPTHS) == NEW_TOKENS - 1


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Model:
    def __init__(self, cfg, w):
        self.cfg = cfg
        self.w = {k: v.double() for k, v in w.items()}
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.d = cfg["head_dim"]
        self.eps = cfg["rms_norm_eps"]
        theta = cfg["rope_parameters"]["rope_theta"]
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.d, 2, dtype=torch.float64) / self.d))

    def rope(self, x, n):
        # x: [heads, n, d]
        freqs = torch.outer(torch.arange(n, dtype=torch.float64), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return x * emb.cos() + rotate_half(x) * emb.sin()

    def kv(self, l, x, n):
        p = f"model.layers.{l}.self_attn"
        k = (x @ self.w[f"{p}.k_proj.weight"].T).view(n, self.kv_heads, self.d).transpose(0, 1)
        v = (x @ self.w[f"{p}.v_proj.weight"].T).view(n, self.kv_heads, self.d).transpose(0, 1)
        return self.rope(k, n), v

    def head(self, h):
        return rms_norm(h, self.w["model.norm.weight"], self.eps) @ self.w["lm_head.weight"].T

    def streams(self, ids, depth, mode):
        """The residual stream after every layer for every position, where position j ran
        depth[j] layers; `mode` says what later tokens see where j did not run."""
        n = len(ids)
        h = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        out = [h]
        exit_state = [None] * n
        for j in range(n):
            if depth[j] == 0:
                exit_state[j] = h[j]
        rep = self.heads // self.kv_heads
        for l in range(self.layers):
            p = f"model.layers.{l}"
            ln1 = self.w[f"{p}.input_layernorm.weight"]
            x = rms_norm(h, ln1, self.eps)
            q = (x @ self.w[f"{p}.self_attn.q_proj.weight"].T).view(n, self.heads, self.d).transpose(0, 1)
            q = self.rope(q, n)
            k, v = self.kv(l, x, n)
            present = torch.tensor([depth[j] > l for j in range(n)])
            if mode == "filled":
                # Positions that left before layer l: keys and values from their exit state.
                for j in range(n):
                    if not present[j]:
                        xs = rms_norm(exit_state[j], ln1, self.eps).expand(n, -1)
                        ks, vs = self.kv(l, xs, n)
                        k[:, j] = ks[:, j]
                        v[:, j] = vs[:, j]
                visible = torch.ones(n, dtype=torch.bool)
            else:
                visible = present
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
            allowed = causal & visible[None, :]
            # A position that did not run this layer: its row is never read; let it see itself
            # so the softmax stays finite.
            allowed |= torch.eye(n, dtype=torch.bool)
            kk = k.repeat_interleave(rep, dim=0)
            vv = v.repeat_interleave(rep, dim=0)
            s = (q @ kk.transpose(-1, -2)) / (self.d ** 0.5)
            s = s.masked_fill(~allowed[None], float("-inf"))
            a = torch.softmax(s, dim=-1) @ vv
            a = a.transpose(0, 1).reshape(n, self.heads * self.d)
            h = h + a @ self.w[f"{p}.self_attn.o_proj.weight"].T
            y = rms_norm(h, self.w[f"{p}.post_attention_layernorm.weight"], self.eps)
            g = y @ self.w[f"{p}.mlp.gate_proj.weight"].T
            u = y @ self.w[f"{p}.mlp.up_proj.weight"].T
            h = h + (torch.nn.functional.silu(g) * u) @ self.w[f"{p}.mlp.down_proj.weight"].T
            out.append(h)
            for j in range(n):
                if depth[j] == l + 1:
                    exit_state[j] = h[j]
        return out

    def decode(self, prompt, depths, mode):
        ids = list(prompt)
        depth = [self.layers] * len(prompt)
        tokens, logits = [], []
        for step in range(len(depths) + 1):
            s = self.streams(ids, depth, mode)
            last = len(ids) - 1
            row = self.head(s[depth[last]][last])
            t = int(row.argmax())
            tokens.append(t)
            logits.append(row)
            if step < len(depths):
                ids.append(t)
                depth.append(depths[step])
        return tokens, torch.stack(logits)


def main():
    cfg = json.load(open(os.path.join(MODEL, "config.json")))
    model = Model(cfg, load_file(os.path.join(MODEL, "model.safetensors")))
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, cfg["vocab_size"], (PROMPT_LEN,), generator=g).tolist()

    # The hand-written forward equals transformers' at full depth (to 1e-6: transformers
    # computes the rotary frequencies in float32).
    hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float64).eval()
    ids = prompt + [5, 9, 11]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    got = model.head(model.streams(ids, [6] * len(ids), "absent")[-1])
    assert (want - got).abs().max() < 1e-6, (want - got).abs().max()

    tensors = {
        "prompt_ids": torch.tensor(prompt, dtype=torch.int64),
        "depths": torch.tensor(DEPTHS, dtype=torch.int64),
    }
    result = {}
    for mode in ["absent", "filled"]:
        tokens, logits = model.decode(prompt, DEPTHS, mode)
        tensors[f"{mode}.tokens"] = torch.tensor(tokens, dtype=torch.int64)
        tensors[f"{mode}.logits"] = logits.float()
        result[mode] = tokens
    differ = [i for i, (a, b) in enumerate(zip(result["absent"], result["filled"])) if a != b]
    assert differ, "the two modes give the same tokens: the fixture would not tell them apart"
    os.makedirs(OUT, exist_ok=True)
    save_file(tensors, os.path.join(OUT, "case.safetensors"))
    meta = {
        "model": "tiny-llama",
        "exit_heads": "after layers 2 and 4, the final RMSNorm and LM head",
        "prompt_ids": prompt,
        "depths": DEPTHS,
        "tokens": result,
        "first_difference": differ[0],
        "made_with": f"torch {torch.__version__}",
    }
    with open(os.path.join(OUT, "case.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
