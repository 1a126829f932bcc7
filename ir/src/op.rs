//! Layer-level operations: the vocabulary researchers think in.
//!
//! Each op is coarse enough to lower to a few fused candle calls and fine enough to place an
//! exit head or an adapter between two of them. Inputs arrive on numbered edges (see
//! [`crate::Edge`]); [`Op::arity`] says how many each op takes.

use crate::weight::WeightRef;
use serde::{Deserialize, Serialize};

/// A dense projection `y = x W^T + b` with `W: [out, in]`, plus, when it has an adapter,
/// the low-rank term `scale · (x A^T) B^T`, applied at run time (never merged into `W`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    pub weight: WeightRef,
    #[serde(default)]
    pub bias: Option<WeightRef>,
    pub in_features: usize,
    pub out_features: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<LowRank>,
}

/// A low-rank adapter (LoRA): `A: [rank, in]`, `B: [out, rank]`, output scaled by `scale`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LowRank {
    pub a: WeightRef,
    pub b: WeightRef,
    pub rank: usize,
    pub scale: f64,
}

impl Linear {
    /// A projection without bias or adapter.
    pub fn plain(weight: WeightRef, in_features: usize, out_features: usize) -> Self {
        Linear {
            weight,
            bias: None,
            in_features,
            out_features,
            adapter: None,
        }
    }

    /// Number of parameters (the adapter's included).
    pub fn params(&self) -> usize {
        self.in_features * self.out_features
            + self.bias.as_ref().map_or(0, |_| self.out_features)
            + self
                .adapter
                .as_ref()
                .map_or(0, |a| a.rank * (self.in_features + self.out_features))
    }

    /// FLOPs per token: the dense matmul plus the adapter's two thin ones.
    pub fn flops_per_token(&self) -> u64 {
        let dense = 2 * (self.in_features * self.out_features) as u64;
        let low = self.adapter.as_ref().map_or(0, |a| {
            2 * (a.rank * (self.in_features + self.out_features)) as u64
        });
        dense + low
    }
}

/// Token lookup, plus learned absolute positions and token types where the family has them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    pub vocab: usize,
    pub hidden: usize,
    pub tokens: WeightRef,
    /// `[max_positions, hidden]`, added at each token's absolute position (GPT-2, BERT).
    #[serde(default)]
    pub positions: Option<WeightRef>,
    /// `[type_vocab, hidden]`, added by `token_type_ids` (BERT).
    #[serde(default)]
    pub token_types: Option<WeightRef>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormKind {
    /// `x / rms(x) * w`.
    Rms,
    /// `(x - mean) / std * w + b`.
    Layer,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Norm {
    pub kind: NormKind,
    pub hidden: usize,
    pub eps: f64,
    pub weight: WeightRef,
    #[serde(default)]
    pub bias: Option<WeightRef>,
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3 wavelength-dependent rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Rotary position embedding on queries and keys (rotate-half layout, as Hugging Face).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Leading part of each head that rotates; equals the head size for full rotary.
    pub rotary_dim: usize,
}

/// Multi-head attention with grouped-query heads, optional RoPE and bias.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    #[serde(default)]
    pub rope: Option<Rope>,
    /// Decoder attention: a token sees only itself and earlier tokens.
    pub causal: bool,
    /// A token sees at most this many tokens, itself included (Mistral, Qwen2 sliding layers).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Multiplier of `q·k`, usually `1/sqrt(head_dim)`.
    pub scale: f64,
}

impl Attention {
    pub fn params(&self) -> usize {
        self.q.params() + self.k.params() + self.v.params() + self.o.params()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact GELU with erf (`gelu`).
    GeluErf,
    Relu,
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
}

/// Feed-forward block: `down(act(gate(x)) * up(x))` when gated (SwiGLU), else `down(act(up(x)))`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mlp {
    pub act: Activation,
    #[serde(default)]
    pub gate: Option<Linear>,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn params(&self) -> usize {
        self.gate.as_ref().map_or(0, Linear::params) + self.up.params() + self.down.params()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolMode {
    /// Mean of the token vectors where `attention_mask` is 1.
    Mean,
    /// The first token's vector.
    Cls,
}

/// One vector per sequence from its token vectors, optionally L2-normalised
/// (sentence-transformers pooling).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pool {
    pub hidden: usize,
    pub mode: PoolMode,
    pub normalize: bool,
}

/// One node's operation.
// Attention carries four projections; ops live once per graph node, so their size is not
// worth an indirection on every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Token ids `[batch, seq]` (with `attention_mask` and `token_type_ids` beside them).
    TokenInput,
    Embedding(Embedding),
    Norm(Norm),
    Attention(Attention),
    Mlp(Mlp),
    /// Residual connection: the sum of its two inputs.
    Add,
    /// Projection to vocabulary logits.
    LmHead(Linear),
    Pool(Pool),
    /// GemFilter's selection scores: reading a layer's normed input (the attention's own
    /// input), the last position's query against every position's key, after RoPE, without
    /// the `1/√d` scale or a softmax, key-value heads repeated to the query heads, summed over
    /// heads: one score per position, `[batch, seq, 1]`. It carries a copy of that layer's
    /// attention op (the same weights, lowered once) and uses only its q and k.
    QueryKeyScores(Attention),
}

impl Op {
    /// Number of inputs the op reads.
    pub fn arity(&self) -> usize {
        match self {
            Op::TokenInput => 0,
            Op::Add => 2,
            _ => 1,
        }
    }

    /// Short name of the op kind, for tables and DOT labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::TokenInput => "TokenInput",
            Op::Embedding(_) => "Embedding",
            Op::Norm(n) => match n.kind {
                NormKind::Rms => "RmsNorm",
                NormKind::Layer => "LayerNorm",
            },
            Op::Attention(_) => "Attention",
            Op::Mlp(_) => "Mlp",
            Op::Add => "Add",
            Op::LmHead(_) => "LmHead",
            Op::Pool(_) => "Pool",
            Op::QueryKeyScores(_) => "QueryKeyScores",
        }
    }

    /// Floating-point operations per token, not counting attention over the context
    /// (see [`Op::attention_flops_per_context_token`]). A multiply-add counts as 2.
    pub fn flops_per_token(&self) -> u64 {
        let matmul = Linear::flops_per_token;
        match self {
            Op::TokenInput | Op::Embedding(_) => 0,
            Op::Norm(n) => 5 * n.hidden as u64,
            Op::Add => 0,
            Op::Attention(a) => matmul(&a.q) + matmul(&a.k) + matmul(&a.v) + matmul(&a.o),
            Op::Mlp(m) => m.gate.as_ref().map_or(0, matmul) + matmul(&m.up) + matmul(&m.down),
            Op::LmHead(l) => matmul(l),
            Op::Pool(p) => p.hidden as u64,
            // Runs once per prompt (GemFilter's select phase), not per token.
            Op::QueryKeyScores(_) => 0,
        }
    }

    /// The op with every adapter removed: what its shared, stored weights compute.
    pub fn without_adapters(&self) -> Op {
        let mut op = self.clone();
        op.linears_mut().into_iter().for_each(|l| l.adapter = None);
        op
    }

    /// Every projection of the op, mutably (for passes that add adapters).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Op::Attention(a) | Op::QueryKeyScores(a) => {
                vec![&mut a.q, &mut a.k, &mut a.v, &mut a.o]
            }
            Op::Mlp(m) => {
                let mut v: Vec<&mut Linear> = m.gate.iter_mut().collect();
                v.push(&mut m.up);
                v.push(&mut m.down);
                v
            }
            Op::LmHead(l) => vec![l],
            _ => Vec::new(),
        }
    }

    /// Every projection of the op.
    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Op::Attention(a) | Op::QueryKeyScores(a) => vec![&a.q, &a.k, &a.v, &a.o],
            Op::Mlp(m) => {
                let mut v: Vec<&Linear> = m.gate.iter().collect();
                v.push(&m.up);
                v.push(&m.down);
                v
            }
            Op::LmHead(l) => vec![l],
            _ => Vec::new(),
        }
    }

    /// FLOPs one token spends per token of context it attends to (`q·k` and `p·v`).
    pub fn attention_flops_per_context_token(&self) -> u64 {
        match self {
            Op::Attention(a) => 4 * (a.heads * a.head_dim) as u64,
            _ => 0,
        }
    }

    /// Every weight the op reads, with the role it plays.
    pub fn weights(&self) -> Vec<(&'static str, &WeightRef)> {
        let mut out = Vec::new();
        fn push_linear<'a>(
            out: &mut Vec<(&'static str, &'a WeightRef)>,
            roles: (&'static str, &'static str),
            l: &'a Linear,
        ) {
            out.push((roles.0, &l.weight));
            if let Some(b) = &l.bias {
                out.push((roles.1, b));
            }
            if let Some(a) = &l.adapter {
                out.push(("adapter.a", &a.a));
                out.push(("adapter.b", &a.b));
            }
        }
        match self {
            Op::TokenInput | Op::Add | Op::Pool(_) => {}
            Op::Embedding(e) => {
                out.push(("tokens", &e.tokens));
                if let Some(p) = &e.positions {
                    out.push(("positions", p));
                }
                if let Some(t) = &e.token_types {
                    out.push(("token_types", t));
                }
            }
            Op::Norm(n) => {
                out.push(("weight", &n.weight));
                if let Some(b) = &n.bias {
                    out.push(("bias", b));
                }
            }
            Op::Attention(a) | Op::QueryKeyScores(a) => {
                push_linear(&mut out, ("q.weight", "q.bias"), &a.q);
                push_linear(&mut out, ("k.weight", "k.bias"), &a.k);
                push_linear(&mut out, ("v.weight", "v.bias"), &a.v);
                push_linear(&mut out, ("o.weight", "o.bias"), &a.o);
            }
            Op::Mlp(m) => {
                if let Some(g) = &m.gate {
                    push_linear(&mut out, ("gate.weight", "gate.bias"), g);
                }
                push_linear(&mut out, ("up.weight", "up.bias"), &m.up);
                push_linear(&mut out, ("down.weight", "down.bias"), &m.down);
            }
            Op::LmHead(l) => push_linear(&mut out, ("weight", "bias"), l),
        }
        out
    }

    /// Every stored weight the op reads (adapters excluded), mutably, in [`Op::weights`]'
    /// order: for passes that re-point weights (tying layers).
    pub fn weights_mut(&mut self) -> Vec<&mut WeightRef> {
        fn linear(l: &mut Linear) -> Vec<&mut WeightRef> {
            let mut v = vec![&mut l.weight];
            v.extend(l.bias.as_mut());
            v
        }
        match self {
            Op::TokenInput | Op::Add | Op::Pool(_) => Vec::new(),
            Op::Embedding(e) => {
                let mut v = vec![&mut e.tokens];
                v.extend(e.positions.as_mut());
                v.extend(e.token_types.as_mut());
                v
            }
            Op::Norm(n) => {
                let mut v = vec![&mut n.weight];
                v.extend(n.bias.as_mut());
                v
            }
            other => other.linears_mut().into_iter().flat_map(linear).collect(),
        }
    }
}
