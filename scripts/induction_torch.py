"""Independent check, in PyTorch, of what makes the induction lookup form on the `repeat`
task (README, `train lm`: attend_within_examples and tie_embeddings).

A 2-layer transformers LlamaForCausalLM (hidden 128, 4 heads, 2 key-value heads) trains on
`repeat`-style examples (6-12 distinct symbols of 36, a bar, the same symbols again from a
random index, not the first), one example per row padded to 32 tokens, 64 rows per step
(2,048 tokens, as 16 x 128), AdamW (0.9, 0.95, weight decay 0.1), linear warmup over 50
steps then cosine decay to a tenth, clipping at 1.0. It prints the held-out accuracy on the
repeated symbols after the first (the answers exitgraph's corpus scores).

    python3 scripts/induction_torch.py --steps 1000 --lr 1e-3            # untied head
    python3 scripts/induction_torch.py --steps 1000 --lr 1e-3 --tied     # tied head
    python3 scripts/induction_torch.py --steps 1000 --lr 1e-3 --packed   # 16 x 128 packed rows
"""
import argparse
import math
import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
REPEAT, BAR, EOS = 36, 37, 38


def example(rng):
    n = rng.randint(6, 12)
    s = rng.sample(range(36), n)
    start = rng.randint(1, n - 2)
    return [REPEAT] + s + [BAR] + s[start:] + [EOS]


def rows(rng, n, packed):
    """`n` rows of 33 tokens (one example, EOS-padded) or of 129 (packed examples)."""
    width = 129 if packed else 33
    out, cur = [], []
    while len(out) < n:
        e = example(rng)
        if cur and (not packed or len(cur) + len(e) > width):
            out.append(cur + [EOS] * (width - len(cur)))
            cur = []
        cur += e
    return torch.tensor(out)


def accuracy(model, batch):
    """Share of the repeated symbols after the first that the argmax predicts."""
    with torch.no_grad():
        pred = model(batch[:, :-1]).logits.argmax(-1)
    ok = total = 0
    for r in range(batch.shape[0]):
        after = 0
        for t in range(batch.shape[1] - 1):
            tok, nxt = batch[r, t].item(), batch[r, t + 1].item()
            if tok == BAR:
                after = 1
                continue
            if tok in (REPEAT, EOS):
                after = 0
            if after and nxt < 36:
                total += 1
                ok += int(pred[r, t].item() == nxt)
    return ok / max(total, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--packed", action="store_true")
    ap.add_argument("--vocab", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = random.Random(1)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                      max_position_embeddings=256, tie_word_embeddings=a.tied)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    held_out = rows(random.Random(2), 64, False)
    per_step = 16 if a.packed else 64
    for step in range(a.steps):
        warm = min(1.0, (step + 1) / 50)
        cos = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for g in opt.param_groups:
            g["lr"] = a.lr * warm * cos
        b = rows(rng, per_step, a.packed)
        logits = model(b[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, a.vocab), b[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == a.steps - 1:
            model.eval()
            print(f"step {step} loss {loss.item():.3f} accuracy {accuracy(model, held_out):.3f}",
                  flush=True)
            model.train()


if __name__ == "__main__":
    main()
