//! Model summaries: ops, layers, parameters, FLOPs per token, weight memory.

use exitgraph_ir::{Graph, Op};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Totals for one op kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpKindSummary {
    pub count: usize,
    pub params: usize,
    pub flops_per_token: u64,
}

/// What `exitgraph inspect` prints.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSummary {
    pub model_type: String,
    pub decoder: bool,
    pub layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub nodes: usize,
    pub params: usize,
    pub weight_bytes: usize,
    /// Matmul and norm FLOPs for one token, independent of context.
    pub flops_per_token: u64,
    /// Extra FLOPs per token for each token of context it attends to.
    pub attention_flops_per_context_token: u64,
    pub by_kind: BTreeMap<&'static str, OpKindSummary>,
    pub attention: Option<String>,
}

pub fn summarize(g: &Graph) -> ModelSummary {
    let mut by_kind: BTreeMap<&'static str, OpKindSummary> = BTreeMap::new();
    let mut flops = 0;
    let mut attn_flops = 0;
    let mut attention = None;
    for n in g.graph.node_indices() {
        let node = &g.graph[n];
        let e = by_kind.entry(node.op.kind()).or_default();
        e.count += 1;
        e.params += g.node_params(n);
        e.flops_per_token += node.op.flops_per_token();
        flops += node.op.flops_per_token();
        attn_flops += node.op.attention_flops_per_context_token();
        if let (None, Op::Attention(a)) = (&attention, &node.op) {
            let mut s = format!(
                "{} heads, {} kv heads, head size {}",
                a.heads, a.kv_heads, a.head_dim
            );
            if let Some(r) = &a.rope {
                let _ = write!(s, ", rope theta {} {:?}", r.theta, r.scaling);
            }
            if let Some(w) = a.sliding_window {
                let _ = write!(s, ", sliding window {w}");
            }
            attention = Some(s);
        }
    }
    ModelSummary {
        model_type: g.info.model_type.clone(),
        decoder: g.info.family.is_decoder(),
        layers: g.info.num_layers,
        hidden: g.info.hidden,
        vocab: g.info.vocab,
        nodes: g.graph.node_count(),
        params: g.params(),
        weight_bytes: g.weight_bytes(),
        flops_per_token: flops,
        attention_flops_per_context_token: attn_flops,
        by_kind,
        attention,
    }
}

/// A count with a unit suffix (k, M, G).
pub fn human(n: f64) -> String {
    if n < 1e3 {
        return format!("{n:.0}");
    }
    let (v, unit) = if n >= 1e9 {
        (n / 1e9, "G")
    } else if n >= 1e6 {
        (n / 1e6, "M")
    } else {
        (n / 1e3, "k")
    };
    format!("{v:.2}{unit}")
}

impl ModelSummary {
    /// The summary as an aligned text table.
    pub fn to_table(&self, context: usize) -> String {
        let mut s = String::new();
        let kind = if self.decoder { "decoder" } else { "encoder" };
        let _ = writeln!(s, "model type       {} ({kind})", self.model_type);
        let _ = writeln!(s, "layers           {}", self.layers);
        let _ = writeln!(s, "hidden size      {}", self.hidden);
        let _ = writeln!(s, "vocabulary       {}", self.vocab);
        if let Some(a) = &self.attention {
            let _ = writeln!(s, "attention        {a}");
        }
        let _ = writeln!(s, "graph nodes      {}", self.nodes);
        let _ = writeln!(
            s,
            "parameters       {} ({})",
            human(self.params as f64),
            self.params
        );
        let _ = writeln!(
            s,
            "weight memory    {}B as stored",
            human(self.weight_bytes as f64)
        );
        let total = self.flops_per_token + self.attention_flops_per_context_token * context as u64;
        let _ = writeln!(
            s,
            "FLOPs per token  {} + {} per context token = {} at context {context}",
            human(self.flops_per_token as f64),
            human(self.attention_flops_per_context_token as f64),
            human(total as f64)
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<12} {:>6} {:>14} {:>16}",
            "op", "count", "parameters", "FLOPs/token"
        );
        for (k, v) in &self.by_kind {
            let _ = writeln!(
                s,
                "{:<12} {:>6} {:>14} {:>16}",
                k,
                v.count,
                human(v.params as f64),
                human(v.flops_per_token as f64)
            );
        }
        s
    }
}
