#!/usr/bin/env python3
"""Generates the checkpoint-variant fixtures under tests/fixtures/variants/.

torch and transformers are not available where these fixtures are made, so the
reference outputs come from an independent NumPy re-implementation of
transformers' forward passes (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, GPT2LMHeadModel), computed in float64 and stored as float32.

Every variant folder holds:
  config.json                      HF-style config (model_type, architectures, ...)
  model.safetensors                or model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
  reference.safetensors            input_ids, hidden_states.{0..L}, logits, greedy
  reference.json                   a short description (same keys as the other fixtures)

The reference is computed from the checkpoint as read back from disk (BF16/F16
weights upcast to f32 exactly, as the Rust loader does), so the weights and the
reference can never disagree.

Usage:
  python3 scripts/make_variant_fixtures.py               # (re)writes all variants
  python3 scripts/make_variant_fixtures.py --self-check  # first compares this NumPy
      implementation against the transformers-made fixtures tiny-llama, tiny-qwen2
      and tiny-gpt2, then (re)writes the variants

Only numpy and safetensors (safetensors.numpy) are needed. Deterministic: fixed seeds.
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OUT_DIR = os.path.join(FIXTURES, "variants")

NEW_TOKENS = 8
# Greedy steps whose top-1/top-2 logit gap is below this are rejected (a new seed is
# tried), so float32 implementations cannot flip a greedy token.
MIN_MARGIN = 2e-3
# Each greedy row must produce at least this many distinct new tokens.
MIN_DISTINCT = 5


# ----------------------------------------------------------------------------------
# dtype rounding and safetensors I/O
# ----------------------------------------------------------------------------------

def f32_to_bf16_bits(x):
    """float32 -> bfloat16 bit pattern (uint16), round to nearest, ties to even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    assert np.all(np.isfinite(x))
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path, tensors, dtype):
    """Writes a safetensors file by hand (needed for BF16, which numpy lacks).

    tensors: dict name -> float32 array. dtype: "BF16", "F16" or "F32".
    Layout per the safetensors spec: u64 little-endian header length, JSON header
    (padded with spaces to a multiple of 8), then the raw little-endian data.
    """
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name], dtype=np.float32)
        if dtype == "BF16":
            raw = f32_to_bf16_bits(a).astype("<u2").tobytes()
        elif dtype == "F16":
            raw = a.astype("<f2").tobytes()
        elif dtype == "F32":
            raw = a.astype("<f4").tobytes()
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)
    return offset  # total tensor bytes


def read_safetensors(path):
    """Independent reader: returns dict name -> (float32 array, dtype string)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        raw = data[base + s: base + e]
        shape = tuple(info["shape"])
        dt = info["dtype"]
        if dt == "BF16":
            a = bf16_bits_to_f32(np.frombuffer(raw, dtype="<u2"))
        elif dt == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif dt == "F32":
            a = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        elif dt == "I64":
            a = np.frombuffer(raw, dtype="<i8")
        else:
            raise ValueError(f"{path}: unsupported dtype {dt}")
        out[name] = (a.reshape(shape), dt)
    return out


def load_checkpoint(model_dir):
    """Reads config + weights (single file or sharded with index) as float64 arrays."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            idx = json.load(f)
        files = sorted(set(idx["weight_map"].values()))
    else:
        idx = None
        files = ["model.safetensors"]
    weights = {}
    for fn in files:
        for name, (a, _dt) in read_safetensors(os.path.join(model_dir, fn)).items():
            if idx is not None:
                assert idx["weight_map"][name] == fn, (name, fn)
            assert name not in weights, name
            weights[name] = a.astype(np.float64)
    if idx is not None:
        assert set(idx["weight_map"]) == set(weights)
    return cfg, weights


# ----------------------------------------------------------------------------------
# Reference forward passes (transformers semantics), float64
# ----------------------------------------------------------------------------------

def rope_parameters(cfg):
    """Mirrors transformers' standardize_rope_params: v5 `rope_parameters` (with
    rope_theta inside) or v4 top-level `rope_theta` + optional `rope_scaling`."""
    if isinstance(cfg.get("rope_parameters"), dict):
        rp = dict(cfg["rope_parameters"])
    elif isinstance(cfg.get("rope_scaling"), dict):
        rp = dict(cfg["rope_scaling"])
    else:
        rp = {}
    if "rope_theta" not in rp:
        rp["rope_theta"] = cfg.get("rope_theta", 10000.0)
    rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    return rp


def inv_freq_f32(cfg, head_dim):
    """transformers' ROPE_INIT_FUNCTIONS for default / linear / llama3, in float32."""
    rp = rope_parameters(cfg)
    base = float(rp["rope_theta"])
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    assert dim == head_dim, "partial rotary not used by these fixtures"
    exponent = (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    # python float ** float32 tensor -> float32 in torch
    inv_freq = (np.float32(1.0) / np.power(np.float32(base), exponent, dtype=np.float32)).astype(np.float32)
    t = rp["rope_type"]
    if t == "default":
        return inv_freq
    if t == "linear":
        return (inv_freq / np.float32(rp["factor"])).astype(np.float32)
    if t == "llama3":
        factor = np.float32(rp["factor"])
        lff = rp["low_freq_factor"]
        hff = rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        low_freq_wavelen = old / lff
        high_freq_wavelen = old / hff
        wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((np.float32(old) / wavelen - np.float32(lff)) / np.float32(hff - lff)).astype(np.float32)
        smoothed = ((np.float32(1) - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama).astype(np.float32)
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)
    raise NotImplementedError(t)


def rope_cos_sin(inv_freq, seq):
    pos = np.arange(seq, dtype=np.float32)
    freqs = (pos[:, None] * inv_freq[None, :]).astype(np.float32)  # float32, like transformers
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    return np.cos(emb), np.sin(emb)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps):
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x, W, name):
    """nn.Linear: y = x @ W.T + b (bias only where the checkpoint has one)."""
    y = x @ W[name + ".weight"].T
    if name + ".bias" in W:
        y = y + W[name + ".bias"]
    return y


def attention_mask(seq, window):
    """True where query q may attend key k: causal, and for sliding layers
    transformers' sliding_window_overlay kv_idx > q_idx - sliding_window."""
    q = np.arange(seq)[:, None]
    k = np.arange(seq)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


def softmax_attend(q, k, v, allowed, scale):
    """q: [B, H, S, D], k, v: [B, H, S, D] (already repeated for GQA)."""
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    scores = np.where(allowed[None, None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, v)


def layer_windows(cfg):
    """Per-layer sliding window (None = full attention), as transformers decides it."""
    L = cfg["num_hidden_layers"]
    mt = cfg["model_type"]
    if mt == "llama":
        return [None] * L
    if mt == "mistral":
        # MistralModel: create_sliding_window_causal_mask for every layer iff sliding_window is set
        return [cfg.get("sliding_window")] * L
    if mt == "qwen2":
        # Qwen2Config.__post_init__: sliding_window kept only if use_sliding_window;
        # layer_types default: sliding for i >= max_window_layers (when a window is set).
        sw = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
        types = cfg.get("layer_types")
        if types is None:
            types = ["sliding_attention" if sw is not None and i >= cfg.get("max_window_layers", 28)
                     else "full_attention" for i in range(L)]
        return [sw if t == "sliding_attention" else None for t in types]
    raise NotImplementedError(mt)


def act_fn(name):
    if name == "silu":
        return lambda x: x / (1.0 + np.exp(-x))
    if name == "gelu":  # exact erf GELU (nn.functional.gelu)
        erf = np.vectorize(math.erf, otypes=[np.float64])
        return lambda x: 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    raise NotImplementedError(name)


def forward_llama_like(cfg, W, ids):
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM. Returns (hidden_states, logits)."""
    B, S = ids.shape
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    act = act_fn(cfg.get("hidden_act", "silu"))
    cos, sin = rope_cos_sin(inv_freq_f32(cfg, hd), S)
    windows = layer_windows(cfg)
    scale = hd ** -0.5

    x = W["model.embed_tokens.weight"][ids]
    hidden = [x]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        n = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = linear(n, W, p + "self_attn.q_proj").reshape(B, S, H, hd).transpose(0, 2, 1, 3)
        k = linear(n, W, p + "self_attn.k_proj").reshape(B, S, KV, hd).transpose(0, 2, 1, 3)
        v = linear(n, W, p + "self_attn.v_proj").reshape(B, S, KV, hd).transpose(0, 2, 1, 3)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = H // KV  # repeat_kv: query head h uses kv head h // rep
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        o = softmax_attend(q, k, v, attention_mask(S, windows[i]), scale)
        o = o.transpose(0, 2, 1, 3).reshape(B, S, H * hd)
        h = x + linear(o, W, p + "self_attn.o_proj")
        n2 = rms_norm(h, W[p + "post_attention_layernorm.weight"], eps)
        mlp = linear(act(linear(n2, W, p + "mlp.gate_proj")) * linear(n2, W, p + "mlp.up_proj"),
                     W, p + "mlp.down_proj")
        x = h + mlp
        hidden.append(x)
    x = rms_norm(x, W["model.norm.weight"], eps)
    hidden[-1] = x
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) else W["lm_head.weight"]
    return hidden, x @ head.T


def forward_gpt2(cfg, W, ids):
    """GPT2LMHeadModel (eager attention semantics). Accepts keys with or without 'transformer.'."""
    W = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in W.items()}
    B, S = ids.shape
    E = cfg["n_embd"]
    H = cfg["n_head"]
    hd = E // H
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    act = act_fn(cfg.get("activation_function", "gelu_new"))
    allowed = attention_mask(S, None)

    def conv1d(x, name):  # Conv1D: weight stored [in, out]
        return x @ W[name + ".weight"] + W[name + ".bias"]

    x = W["wte.weight"][ids] + W["wpe.weight"][np.arange(S)][None]
    hidden = [x]
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        n = layer_norm(x, W[p + "ln_1.weight"], W[p + "ln_1.bias"], eps)
        qkv = conv1d(n, p + "attn.c_attn")
        q, k, v = (t.reshape(B, S, H, hd).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, axis=-1))
        scale = 1.0
        if cfg.get("scale_attn_weights", True):
            scale /= math.sqrt(hd)
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            scale /= float(i + 1)
        o = softmax_attend(q, k, v, allowed, scale).transpose(0, 2, 1, 3).reshape(B, S, E)
        x = x + conv1d(o, p + "attn.c_proj")
        n2 = layer_norm(x, W[p + "ln_2.weight"], W[p + "ln_2.bias"], eps)
        x = x + conv1d(act(conv1d(n2, p + "mlp.c_fc")), p + "mlp.c_proj")
        hidden.append(x)
    x = layer_norm(x, W["ln_f.weight"], W["ln_f.bias"], eps)
    hidden[-1] = x
    head = W["wte.weight"] if cfg.get("tie_word_embeddings", True) else W["lm_head.weight"]
    return hidden, x @ head.T


def forward(cfg, W, ids):
    if cfg["model_type"] == "gpt2":
        return forward_gpt2(cfg, W, ids)
    return forward_llama_like(cfg, W, ids)


def greedy(cfg, W, ids, n_new):
    """Full recomputation per step, argmax of the last position, no EOS stopping.
    Returns (sequences, smallest top-1/top-2 gap seen)."""
    seq = ids.copy()
    min_gap = np.inf
    for _ in range(n_new):
        _, logits = forward(cfg, W, seq)
        last = logits[:, -1, :]
        top2 = np.sort(last, axis=-1)[:, -2:]
        min_gap = min(min_gap, float((top2[:, 1] - top2[:, 0]).min()))
        seq = np.concatenate([seq, last.argmax(axis=-1)[:, None].astype(np.int64)], axis=1)
    return seq, min_gap


# ----------------------------------------------------------------------------------
# Variant definitions
# ----------------------------------------------------------------------------------

def llama_family_weights(cfg, rng, std, embed_std, qkv_bias, o_bias, mlp_bias):
    E = cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or E // H
    I = cfg["intermediate_size"]
    V = cfg["vocab_size"]
    nrm = lambda *s: rng.normal(0.0, std, size=s)
    ones = lambda n: 1.0 + rng.normal(0.0, 0.1, size=n)
    bias = lambda n: rng.normal(0.0, 0.05, size=n)
    W = {"model.embed_tokens.weight": rng.normal(0.0, embed_std, size=(V, E))}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = ones(E)
        W[p + "post_attention_layernorm.weight"] = ones(E)
        for name, out_dim, in_dim in (("q_proj", H * hd, E), ("k_proj", KV * hd, E),
                                      ("v_proj", KV * hd, E), ("o_proj", E, H * hd)):
            W[p + f"self_attn.{name}.weight"] = nrm(out_dim, in_dim)
            if (name != "o_proj" and qkv_bias) or (name == "o_proj" and o_bias):
                W[p + f"self_attn.{name}.bias"] = bias(out_dim)
        for name, out_dim, in_dim in (("gate_proj", I, E), ("up_proj", I, E), ("down_proj", E, I)):
            W[p + f"mlp.{name}.weight"] = nrm(out_dim, in_dim)
            if mlp_bias:
                W[p + f"mlp.{name}.bias"] = bias(out_dim)
    W["model.norm.weight"] = ones(E)
    if not cfg.get("tie_word_embeddings", False):
        W["lm_head.weight"] = nrm(V, E) * 2.0
    return W


def gpt2_weights(cfg, rng, std):
    E = cfg["n_embd"]
    I = cfg["n_inner"] or 4 * E
    V = cfg["vocab_size"]
    nrm = lambda *s: rng.normal(0.0, std, size=s)
    ones = lambda n: 1.0 + rng.normal(0.0, 0.1, size=n)
    bias = lambda n: rng.normal(0.0, 0.05, size=n)
    W = {"wte.weight": rng.normal(0.0, 0.3, size=(V, E)),
         "wpe.weight": rng.normal(0.0, 0.1, size=(cfg["n_positions"], E))}
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        W[p + "ln_1.weight"], W[p + "ln_1.bias"] = ones(E), bias(E)
        W[p + "ln_2.weight"], W[p + "ln_2.bias"] = ones(E), bias(E)
        W[p + "attn.c_attn.weight"], W[p + "attn.c_attn.bias"] = nrm(E, 3 * E), bias(3 * E)  # [in, out]
        W[p + "attn.c_proj.weight"], W[p + "attn.c_proj.bias"] = nrm(E, E), bias(E)
        W[p + "mlp.c_fc.weight"], W[p + "mlp.c_fc.bias"] = nrm(E, I), bias(I)
        W[p + "mlp.c_proj.weight"], W[p + "mlp.c_proj.bias"] = nrm(I, E), bias(E)
    W["ln_f.weight"], W["ln_f.bias"] = ones(E), bias(E)
    if not cfg.get("tie_word_embeddings", True):
        W["lm_head.weight"] = rng.normal(0.0, 0.3, size=(V, E))
    return W


COMMON_LLAMA = {
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "use_cache": True,
    "vocab_size": 256,
}

VARIANTS = [
    {
        "name": "llama-gqa-llama3-rope",
        "about": "llama; GQA 4 query heads / 1 kv head; explicit head_dim 16 with hidden_size 48 "
                 "(heads*head_dim = 64 != hidden); transformers-4 style top-level rope_theta 500000 + "
                 "rope_scaling llama3 (factor 8, low 1, high 4, original_max_position_embeddings 16); "
                 "tied embeddings (no lm_head.weight); attention_bias (q,k,v,o) and mlp_bias "
                 "(gate,up,down); BF16 weights; prompt length 40.",
        "config": dict(COMMON_LLAMA, **{
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": True,
            "mlp_bias": True,
            "head_dim": 16,
            "hidden_size": 48,
            "intermediate_size": 96,
            "max_position_embeddings": 128,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 1,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 16,
                "rope_type": "llama3",
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.46.0",
        }),
        "dtype": "BF16",
        "shards": 1,
        "batch": 2, "seq": 40,
        "weights": lambda cfg, rng: llama_family_weights(cfg, rng, std=0.2, embed_std=0.3,
                                                          qkv_bias=True, o_bias=True, mlp_bias=True),
    },
    {
        "name": "llama-linear-rope-sharded",
        "about": "llama; transformers-5 style rope_parameters {rope_type linear, factor 4, rope_theta "
                 "10000} (theta inside rope_parameters, no top-level rope_theta); untied lm_head; "
                 "checkpoint sharded into two files with model.safetensors.index.json; F16 weights; "
                 "head_dim derived (64 / 4 = 16); GQA 4/2.",
        "config": dict(COMMON_LLAMA, **{
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_size": 64,
            "intermediate_size": 128,
            "max_position_embeddings": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
            "num_key_value_heads": 2,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {"factor": 4.0, "rope_theta": 10000.0, "rope_type": "linear"},
            "tie_word_embeddings": False,
            "dtype": "float16",
            "transformers_version": "5.0.0",
        }),
        "dtype": "F16",
        "shards": 2,
        "batch": 2, "seq": 24,
        "weights": lambda cfg, rng: llama_family_weights(cfg, rng, std=0.12, embed_std=0.5,
                                                          qkv_bias=False, o_bias=False, mlp_bias=False),
    },
    {
        "name": "mistral-sliding-window",
        "about": "mistral; sliding_window 5 on every layer (query q sees key k iff k <= q and "
                 "q - k < 5); GQA 4/2; head_dim derived (64 / 4 = 16); top-level rope_theta 1e6; no "
                 "biases; untied lm_head; F32 weights; prompt length 16 (> window).",
        "config": dict(COMMON_LLAMA, **{
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": 64,
            "intermediate_size": 128,
            "max_position_embeddings": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000.0,
            "sliding_window": 5,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "transformers_version": "4.46.0",
        }),
        "dtype": "F32",
        "shards": 1,
        "batch": 2, "seq": 16,
        "weights": lambda cfg, rng: llama_family_weights(cfg, rng, std=0.15, embed_std=0.5,
                                                          qkv_bias=False, o_bias=False, mlp_bias=False),
    },
    {
        "name": "qwen2-sliding-layers",
        "about": "qwen2; use_sliding_window true, sliding_window 4, max_window_layers 1, 3 layers, no "
                 "layer_types key, so layer 0 is full attention and layers 1 and 2 use the window "
                 "(k <= q and q - k < 4); q,k,v biases, no o bias; tied embeddings; top-level "
                 "rope_theta 1e6; F32 weights; prompt length 14.",
        "config": dict(COMMON_LLAMA, **{
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": 32,
            "intermediate_size": 64,
            "max_position_embeddings": 256,
            "max_window_layers": 1,
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": 4,
            "use_sliding_window": True,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            "transformers_version": "4.46.0",
        }),
        "dtype": "F32",
        "shards": 1,
        "batch": 2, "seq": 14,
        "weights": lambda cfg, rng: llama_family_weights(cfg, rng, std=0.25, embed_std=0.3,
                                                          qkv_bias=True, o_bias=False, mlp_bias=False),
    },
    {
        "name": "gpt2-untied-gelu",
        "about": "gpt2; activation_function gelu (exact erf GELU); scale_attn_by_inverse_layer_idx "
                 "(scores also divided by layer_idx + 1); untied, with a top-level lm_head.weight; "
                 "keys stored without the 'transformer.' prefix (wte.weight, h.0.attn.c_attn.weight, "
                 "...); Conv1D weights [in, out]; n_inner 48 with n_embd 32; 3 layers; F32 weights.",
        "config": {
            "activation_function": "gelu",
            "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.1,
            "bos_token_id": None,
            "embd_pdrop": 0.1,
            "eos_token_id": None,
            "pad_token_id": None,
            "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05,
            "model_type": "gpt2",
            "n_embd": 32,
            "n_head": 4,
            "n_inner": 48,
            "n_layer": 3,
            "n_positions": 64,
            "reorder_and_upcast_attn": False,
            "resid_pdrop": 0.1,
            "scale_attn_by_inverse_layer_idx": True,
            "scale_attn_weights": True,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "transformers_version": "4.46.0",
            "use_cache": True,
            "vocab_size": 256,
        },
        "dtype": "F32",
        "shards": 1,
        "batch": 2, "seq": 20,
        "weights": lambda cfg, rng: gpt2_weights(cfg, rng, std=0.2),
    },
]


# ----------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------

def write_checkpoint(folder, weights, dtype, shards):
    names = list(weights)  # insertion order: embeddings, layers in order, final norm, lm_head
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), weights, dtype)
        return
    assert shards == 2
    itemsize = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    sizes = [weights[n].size * itemsize for n in names]
    total = sum(sizes)
    cum, cut = 0, len(names)
    for j, s in enumerate(sizes):
        if cum + s > total / 2:
            cut = j
            break
        cum += s
    groups = [names[:cut], names[cut:]]
    weight_map = {}
    for k, group in enumerate(groups):
        fn = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(folder, fn), {n: weights[n] for n in group}, dtype)
        for n in group:
            weight_map[n] = fn
    index = {"metadata": {"total_size": total},
             "weight_map": {n: weight_map[n] for n in sorted(weight_map)}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def build_variant(v, attempt):
    cfg = v["config"]
    seed = 1000 * (VARIANTS.index(v) + 1) + attempt
    rng = np.random.default_rng(seed)
    weights = {k: np.asarray(a, dtype=np.float32) for k, a in v["weights"](cfg, rng).items()}
    ids = rng.integers(0, cfg["vocab_size"], size=(v["batch"], v["seq"]), dtype=np.int64)
    return seed, weights, ids


def make_variant(v):
    folder = os.path.join(OUT_DIR, v["name"])
    cfg = v["config"]
    for attempt in range(50):
        seed, weights, ids = build_variant(v, attempt)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        write_checkpoint(folder, weights, v["dtype"], v["shards"])
        # Reference from the checkpoint as stored (dtype-rounded, upcast exactly).
        cfg_disk, W = load_checkpoint(folder)
        hidden, logits = forward(cfg_disk, W, ids)
        seq, gap = greedy(cfg_disk, W, ids, NEW_TOKENS)
        new = seq[:, ids.shape[1]:]
        distinct = min(len(set(row.tolist())) for row in new)
        if gap >= MIN_MARGIN and distinct >= MIN_DISTINCT:
            break
        print(f"  {v['name']}: seed {seed} rejected (min gap {gap:.2e}, distinct {distinct})")
    else:
        raise RuntimeError(f"{v['name']}: no acceptable seed")

    ref = {"input_ids": ids.astype(np.int64)}
    for i, h in enumerate(hidden):
        ref[f"hidden_states.{i}"] = h.astype(np.float32)
    ref["logits"] = logits.astype(np.float32)
    ref["greedy"] = seq.astype(np.int64)
    save_file(ref, os.path.join(folder, "reference.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "reference.json"), "w") as f:
        json.dump({
            "n_hidden_states": len(hidden),
            "note": "hidden_states.0 is the embedding output; hidden_states.i the output of layer i "
                    "(the last one after the final norm, as transformers returns it). Made by "
                    "scripts/make_variant_fixtures.py (NumPy float64 re-implementation of "
                    "transformers' semantics), not by transformers itself.",
            "greedy_new_tokens": NEW_TOKENS,
            "weights_dtype": v["dtype"],
            "seed": seed,
            "min_greedy_top2_gap": round(gap, 6),
            "variant": v["about"],
        }, f, indent=2)
        f.write("\n")

    size = sum(os.path.getsize(os.path.join(folder, x)) for x in os.listdir(folder))
    print(f"{v['name']}: seed {seed}, {len(hidden) - 1} layers, ids {list(ids.shape)}, "
          f"min top-2 gap {gap:.3g}, {size / 1024:.0f} KiB")
    for r, row in enumerate(new):
        print(f"  greedy row {r}: {row.tolist()}")
    return size


def self_check():
    """Compares this implementation with the transformers-made tiny fixtures."""
    worst = 0.0
    for name in ("tiny-llama", "tiny-qwen2", "tiny-gpt2"):
        d = os.path.join(FIXTURES, name)
        if not os.path.exists(os.path.join(d, "reference.safetensors")):
            print(f"self-check: {name} missing, skipped")
            continue
        cfg, W = load_checkpoint(d)
        r = load_file(os.path.join(d, "reference.safetensors"))
        ids = r["input_ids"].astype(np.int64)
        hidden, logits = forward(cfg, W, ids)
        diffs = {f"hidden_states.{i}": np.abs(h - r[f"hidden_states.{i}"]).max() for i, h in enumerate(hidden)}
        diffs["logits"] = np.abs(logits - r["logits"]).max()
        n_new = r["greedy"].shape[1] - ids.shape[1]
        seq, _ = greedy(cfg, W, ids, n_new)
        same = bool(np.array_equal(seq, r["greedy"]))
        m = max(diffs.values())
        worst = max(worst, m)
        print(f"self-check {name}: max |diff| {m:.2e} over {len(diffs)} tensors, greedy equal: {same}")
        if m > 1e-4 or not same:
            raise SystemExit(f"self-check failed on {name}")
    print(f"self-check passed (worst {worst:.2e})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--self-check", action="store_true",
                    help="first compare against the transformers-made tiny-* fixtures")
    args = ap.parse_args()
    if args.self_check:
        self_check()
    os.makedirs(OUT_DIR, exist_ok=True)
    total = sum(make_variant(v) for v in VARIANTS)
    print(f"total {total / 1024:.0f} KiB in {OUT_DIR}")
    if total > 3 * 1024 * 1024:
        raise SystemExit("fixtures exceed 3 MB")


if __name__ == "__main__":
    sys.exit(main())
