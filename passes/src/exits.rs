//! `InsertExits`: exit heads after chosen layers.
//!
//! Each exit point `k` (1 ≤ k < layers) reads the residual stream after `k` layers
//! (`hidden_states.k`) and adds the outputs `exit.k.logits` (decoders) or
//! `exit.k.sentence_embedding` (encoders with sentence pooling), plus `exit.k.gate` (one
//! logit) when a learned gate is asked for. Head kinds:
//!
//! - `SharedLmHead(norm: true)`: the model's own final norm and LM head (LayerSkip, logit lens);
//!   with `norm: false` the LM head reads the stream directly.
//! - `Linear`: a norm and LM head of its own (`exits.k.norm.weight`, `exits.k.head.weight`).
//! - `Mlp(hidden: h)`: a residual adapter `x + down(act(up(norm_k(x))))`, then the shared final
//!   norm and LM head (`exits.k.norm.weight`, `exits.k.mlp.up.weight`, `exits.k.mlp.down.weight`).
//! - `AttentionAdapter` (alias `Kangaroo`): Kangaroo's adapter (Liu et al., 2024), one
//!   attention layer with its norms, `norm_k(x + attn(attn_norm_k(x)))`, then the frozen LM
//!   head (`exits.k.attn_norm.weight`, `exits.k.attn.{q,k,v,o}.weight`, `exits.k.norm.weight`).
//!   The attention has layer `k`'s settings (the first layer the draft skips: heads,
//!   key-value heads, head size, rotary embedding, scale, sliding window), no biases, and a
//!   KV cache slot of its own (recorded in [`Exit::kv_slot`]); the norms are of the final
//!   norm's kind without a bias.
//!
//! Trained weights (own heads, gates `exits.k.gate.weight`/`.bias`) come from the pass's
//! `weights:` file (resolved by the [`PassContext`], relative to the pipeline), which the
//! pass adds to the weight catalog; its tensors may replace only `exits.*` entries. A file
//! `train exits` wrote records the backbone it was trained on (the graph's
//! [`base_fingerprint`] before the exits) and is refused on another; a file without one
//! (made by hand) is taken as it is.
//! Each exit is recorded as a typed [`Exit`] in the graph (the stream it reads, its logits or
//! pooled embedding, its gate, every node it added); output names are for users only.
//! Encoders pool each exit's stream the way the model pools its last one; they take no head.
//!
//! **Invariant**: the pass only adds nodes and outputs; every existing node, edge and output is
//! unchanged, so the full path computes exactly what it did before.

use crate::recursive::{base_fingerprint, check_fingerprint, BASE_KEY};
use crate::{Pass, PassContext, PassError, PassReport};
use exitgraph_ir::op::{Attention, Linear, Mlp, Norm, Op};
use exitgraph_ir::{Exit, Graph, Node, NodeIndex, Shape, WeightRef};
use serde::{Deserialize, Serialize};

/// What an exit head is made of.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum HeadKind {
    /// The model's final norm (when `norm`) and LM head.
    SharedLmHead { norm: bool },
    /// A norm and LM head of the exit's own.
    Linear,
    /// A residual MLP adapter of width `hidden` before the shared final norm and LM head.
    Mlp { hidden: usize },
    /// Kangaroo's adapter: a norm, one attention layer and a residual, then a norm of its own
    /// and the shared LM head. The head keeps keys and values (a KV slot of its own).
    #[serde(alias = "Kangaroo")]
    AttentionAdapter,
}

/// The sizes an exit head's own weights take from the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadDims {
    pub hidden: usize,
    pub vocab: usize,
    /// Query heads, key-value heads and head size of the model's attention.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl HeadDims {
    /// The sizes of `g`'s exit heads (attention sizes from its first attention op; zero for a
    /// model with none).
    pub fn of(g: &Graph) -> Self {
        let attn = g.graph.node_weights().find_map(|n| match &n.op {
            Op::Attention(a) => Some((a.heads, a.kv_heads, a.head_dim)),
            _ => None,
        });
        let (heads, kv_heads, head_dim) = attn.unwrap_or((0, 0, 0));
        HeadDims {
            hidden: g.info.hidden,
            vocab: g.info.vocab,
            heads,
            kv_heads,
            head_dim,
        }
    }
}

impl Default for HeadKind {
    fn default() -> Self {
        HeadKind::SharedLmHead { norm: true }
    }
}

/// Names of the weights an exit head of this kind owns (trained by `train exits`), with shapes.
pub fn head_weights(
    kind: &HeadKind,
    gate: bool,
    point: usize,
    dims: &HeadDims,
) -> Vec<(String, Vec<usize>)> {
    let HeadDims {
        hidden,
        vocab,
        heads,
        kv_heads,
        head_dim,
    } = *dims;
    let mut out = Vec::new();
    match kind {
        HeadKind::SharedLmHead { .. } => {}
        HeadKind::Linear => {
            out.push((format!("exits.{point}.norm.weight"), vec![hidden]));
            out.push((format!("exits.{point}.head.weight"), vec![vocab, hidden]));
        }
        HeadKind::Mlp { hidden: h } => {
            out.push((format!("exits.{point}.norm.weight"), vec![hidden]));
            out.push((format!("exits.{point}.mlp.up.weight"), vec![*h, hidden]));
            out.push((format!("exits.{point}.mlp.down.weight"), vec![hidden, *h]));
        }
        HeadKind::AttentionAdapter => {
            out.push((format!("exits.{point}.attn_norm.weight"), vec![hidden]));
            out.push((
                format!("exits.{point}.attn.q.weight"),
                vec![heads * head_dim, hidden],
            ));
            for p in ["k", "v"] {
                out.push((
                    format!("exits.{point}.attn.{p}.weight"),
                    vec![kv_heads * head_dim, hidden],
                ));
            }
            out.push((
                format!("exits.{point}.attn.o.weight"),
                vec![hidden, heads * head_dim],
            ));
            out.push((format!("exits.{point}.norm.weight"), vec![hidden]));
        }
    }
    if gate {
        out.push((format!("exits.{point}.gate.weight"), vec![1, hidden]));
        out.push((format!("exits.{point}.gate.bias"), vec![1]));
    }
    out
}

/// The exit depths a pass's settings choose: explicit layer counts or every `n` layers (the
/// last layer, which is the model's own output, is never an exit point).
pub fn chosen_depths(
    after: &[usize],
    every: Option<usize>,
    layers: usize,
) -> Result<Vec<usize>, String> {
    let mut points: Vec<usize> = match (after.is_empty(), every) {
        (false, None) => after.to_vec(),
        (true, Some(0)) => return Err("every must be at least 1".into()),
        (true, Some(n)) => (1..layers).filter(|k| k % n == 0).collect(),
        (true, None) => return Err("give the exit layers in `after: [..]` or `every: n`".into()),
        (false, Some(_)) => return Err("give either `after` or `every`, not both".into()),
    };
    if let Some(&bad) = points.iter().find(|&&k| k == 0 || k >= layers) {
        return Err(format!(
            "exit after layer {bad} is out of range 1..{layers} (layer {layers} is the model's own output)"
        ));
    }
    points.sort_unstable();
    points.dedup();
    Ok(points)
}

#[derive(Clone, Debug, PartialEq)]
pub struct InsertExits {
    /// Exit after these many layers...
    pub after: Vec<usize>,
    /// ...or after every `n` layers.
    pub every: Option<usize>,
    pub head: HeadKind,
    /// Add a learned gate per exit.
    pub gate: bool,
    /// Safetensors file of trained heads and gates, relative to the pipeline.
    pub weights: Option<String>,
}

fn node(name: String, op: Op, shape: Shape) -> Node {
    Node {
        name,
        op,
        layer: None,
        shape,
    }
}

impl InsertExits {
    fn err(message: String) -> PassError {
        PassError::Config {
            pass: "InsertExits",
            message,
        }
    }

    /// The final norm (if any) and LM head of a decoder.
    fn shared_head(g: &Graph) -> Result<(Option<Norm>, Linear), PassError> {
        let head = g
            .head
            .logits
            .ok_or_else(|| Self::err("the graph has no LM head to share".into()))?;
        let Op::LmHead(l) = &g.graph[head].op else {
            return Err(Self::err("the model's head is not an LmHead".into()));
        };
        let norm = g.head.norm.and_then(|i| match &g.graph[i].op {
            Op::Norm(n) => Some(n.clone()),
            _ => None,
        });
        Ok((norm, l.clone()))
    }

    fn own(&self, g: &Graph, name: &str) -> Result<WeightRef, PassError> {
        if g.weights.tensors.contains_key(name) {
            Ok(WeightRef::file(name))
        } else {
            let objective = if self.head == HeadKind::AttentionAdapter {
                " --objective kangaroo"
            } else {
                ""
            };
            Err(Self::err(format!(
                "weight {name} is not loaded: train the heads with `exitgraph train exits{objective}` \
                 and name the file in the pass's `weights:`"
            )))
        }
    }

    fn add_decoder_exit(
        &self,
        g: &mut Graph,
        k: usize,
        stream: NodeIndex,
        added: &mut Vec<String>,
    ) -> Result<Exit, PassError> {
        let hidden = g.info.hidden;
        let (final_norm, lm_head) = Self::shared_head(g)?;
        let mut nodes = Vec::new();
        let mut push = |g: &mut Graph, n: Node, inputs: &[NodeIndex]| {
            added.push(n.name.clone());
            let idx = g.add(n, inputs);
            nodes.push(idx);
            idx
        };
        let per_token = Shape::per_token(hidden);
        let next_slot = g.kv_slots();
        let mut kv_slot = None;
        let (head_in, head) = match &self.head {
            HeadKind::SharedLmHead { norm } => {
                let x = match (norm, &final_norm) {
                    (true, Some(n)) => push(
                        g,
                        node(
                            format!("exit.{k}.norm"),
                            Op::Norm(n.clone()),
                            per_token.clone(),
                        ),
                        &[stream],
                    ),
                    (true, None) => {
                        return Err(Self::err(
                            "SharedLmHead(norm: true): the model has no final norm".into(),
                        ))
                    }
                    (false, _) => stream,
                };
                (x, lm_head.clone())
            }
            HeadKind::Linear => {
                let base = final_norm.clone().ok_or_else(|| {
                    Self::err("Linear heads copy the final norm; the model has none".into())
                })?;
                let norm = Norm {
                    weight: self.own(g, &format!("exits.{k}.norm.weight"))?,
                    bias: None,
                    ..base
                };
                let x = push(
                    g,
                    node(format!("exit.{k}.norm"), Op::Norm(norm), per_token.clone()),
                    &[stream],
                );
                let head = Linear {
                    weight: self.own(g, &format!("exits.{k}.head.weight"))?,
                    bias: None,
                    in_features: hidden,
                    out_features: g.info.vocab,
                    adapter: None,
                };
                (x, head)
            }
            HeadKind::Mlp { hidden: h } => {
                let base = final_norm.clone().ok_or_else(|| {
                    Self::err("Mlp heads end in the final norm; the model has none".into())
                })?;
                let own_norm = Norm {
                    weight: self.own(g, &format!("exits.{k}.norm.weight"))?,
                    bias: None,
                    ..base.clone()
                };
                let up = self.own(g, &format!("exits.{k}.mlp.up.weight"))?;
                let down = self.own(g, &format!("exits.{k}.mlp.down.weight"))?;
                let act = g
                    .graph
                    .node_weights()
                    .find_map(|n| match &n.op {
                        Op::Mlp(m) => Some(m.act),
                        _ => None,
                    })
                    .ok_or_else(|| Self::err("the model has no MLP to copy".into()))?;
                let x = push(
                    g,
                    node(
                        format!("exit.{k}.norm"),
                        Op::Norm(own_norm),
                        per_token.clone(),
                    ),
                    &[stream],
                );
                let mlp = Mlp {
                    act,
                    gate: None,
                    up: Linear {
                        weight: up,
                        bias: None,
                        in_features: hidden,
                        out_features: *h,
                        adapter: None,
                    },
                    down: Linear {
                        weight: down,
                        bias: None,
                        in_features: *h,
                        out_features: hidden,
                        adapter: None,
                    },
                };
                let m = push(
                    g,
                    node(format!("exit.{k}.mlp"), Op::Mlp(mlp), per_token.clone()),
                    &[x],
                );
                let sum = push(
                    g,
                    node(format!("exit.{k}.add"), Op::Add, per_token.clone()),
                    &[stream, m],
                );
                let out = push(
                    g,
                    node(
                        format!("exit.{k}.final_norm"),
                        Op::Norm(base),
                        per_token.clone(),
                    ),
                    &[sum],
                );
                (out, lm_head.clone())
            }
            HeadKind::AttentionAdapter => {
                let base = final_norm.clone().ok_or_else(|| {
                    Self::err(
                        "AttentionAdapter heads end in a norm like the model's final one; the \
                         model has none"
                            .into(),
                    )
                })?;
                // The attention settings of layer k, the first layer the draft skips.
                let template = g
                    .graph
                    .node_weights()
                    .find_map(|n| match &n.op {
                        Op::Attention(a) if n.layer == Some(k) => Some(a.clone()),
                        _ => None,
                    })
                    .ok_or_else(|| Self::err(format!("layer {k} has no attention to copy")))?;
                let linear = |weight: WeightRef, in_features: usize, out_features: usize| Linear {
                    weight,
                    bias: None,
                    in_features,
                    out_features,
                    adapter: None,
                };
                let (q_out, kv_out) = (
                    template.heads * template.head_dim,
                    template.kv_heads * template.head_dim,
                );
                let attention = Attention {
                    q: linear(
                        self.own(g, &format!("exits.{k}.attn.q.weight"))?,
                        hidden,
                        q_out,
                    ),
                    k: linear(
                        self.own(g, &format!("exits.{k}.attn.k.weight"))?,
                        hidden,
                        kv_out,
                    ),
                    v: linear(
                        self.own(g, &format!("exits.{k}.attn.v.weight"))?,
                        hidden,
                        kv_out,
                    ),
                    o: linear(
                        self.own(g, &format!("exits.{k}.attn.o.weight"))?,
                        q_out,
                        hidden,
                    ),
                    ..template
                };
                let attn_norm = Norm {
                    weight: self.own(g, &format!("exits.{k}.attn_norm.weight"))?,
                    bias: None,
                    ..base.clone()
                };
                let own_norm = Norm {
                    weight: self.own(g, &format!("exits.{k}.norm.weight"))?,
                    bias: None,
                    ..base
                };
                let x = push(
                    g,
                    node(
                        format!("exit.{k}.attn_norm"),
                        Op::Norm(attn_norm),
                        per_token.clone(),
                    ),
                    &[stream],
                );
                let a = push(
                    g,
                    node(
                        format!("exit.{k}.attn"),
                        Op::Attention(attention),
                        per_token.clone(),
                    ),
                    &[x],
                );
                let sum = push(
                    g,
                    node(format!("exit.{k}.add"), Op::Add, per_token.clone()),
                    &[stream, a],
                );
                let out = push(
                    g,
                    node(
                        format!("exit.{k}.norm"),
                        Op::Norm(own_norm),
                        per_token.clone(),
                    ),
                    &[sum],
                );
                kv_slot = Some(next_slot);
                (out, lm_head.clone())
            }
        };
        let vocab = head.out_features;
        let logits = push(
            g,
            node(
                format!("exit.{k}.head"),
                Op::LmHead(head),
                Shape::per_token(vocab),
            ),
            &[head_in],
        );
        g.outputs.insert(format!("exit.{k}.logits"), logits);
        let mut gate_node = None;
        if self.gate {
            let gate = Linear {
                weight: self.own(g, &format!("exits.{k}.gate.weight"))?,
                bias: Some(self.own(g, &format!("exits.{k}.gate.bias"))?),
                in_features: hidden,
                out_features: 1,
                adapter: None,
            };
            let n = push(
                g,
                node(
                    format!("exit.{k}.gate"),
                    Op::LmHead(gate),
                    Shape::per_token(1),
                ),
                &[head_in],
            );
            g.outputs.insert(format!("exit.{k}.gate"), n);
            gate_node = Some(n);
        }
        Ok(Exit {
            after: k,
            reads: stream,
            logits: Some(logits),
            embedding: None,
            gate: gate_node,
            nodes,
            kv_slot,
        })
    }

    fn add_encoder_exit(
        &self,
        g: &mut Graph,
        k: usize,
        stream: NodeIndex,
        added: &mut Vec<String>,
    ) -> Result<Exit, PassError> {
        let pool = g.head.pooled.ok_or_else(|| {
            Self::err("encoder exits pool like the model's sentence_embedding; it has none".into())
        })?;
        let node_ = g.graph[pool].clone();
        let n = g.add(
            Node {
                name: format!("exit.{k}.pool"),
                layer: None,
                ..node_
            },
            &[stream],
        );
        added.push(format!("exit.{k}.pool"));
        g.outputs.insert(format!("exit.{k}.sentence_embedding"), n);
        Ok(Exit {
            after: k,
            reads: stream,
            logits: None,
            embedding: Some(n),
            gate: None,
            nodes: vec![n],
            kv_slot: None,
        })
    }
}

impl Pass for InsertExits {
    fn name(&self) -> &'static str {
        "InsertExits"
    }

    fn run(&self, g: &mut Graph, cx: &PassContext) -> Result<PassReport, PassError> {
        let layers = g.info.num_layers;
        let points = chosen_depths(&self.after, self.every, layers).map_err(Self::err)?;
        if let Some(k) = points.iter().find(|&&k| g.exit_at(k).is_some()) {
            return Err(Self::err(format!(
                "the graph already has an exit after layer {k}"
            )));
        }
        if let Some(file) = &self.weights {
            let field = |message: String| PassError::Field {
                pass: "InsertExits",
                field: "weights",
                message,
            };
            // Heads `train exits` wrote record the backbone they were trained on.
            check_fingerprint(
                cx,
                file,
                BASE_KEY,
                &base_fingerprint(g),
                "another model or backbone",
            )
            .map_err(field)?;
            cx.add_weights(g, file, |name| name.starts_with("exits."))
                .map_err(|p| field(p.0))?;
        }
        let mut added = Vec::new();
        for &k in &points {
            let stream = g
                .stream(k)
                .ok_or_else(|| Self::err(format!("the graph has no block {k}")))?;
            let exit = if g.info.family.is_decoder() {
                self.add_decoder_exit(g, k, stream, &mut added)?
            } else {
                self.add_encoder_exit(g, k, stream, &mut added)?
            };
            g.exits.push(exit);
        }
        g.exits.sort_by_key(|e| e.after);
        Ok(PassReport {
            summary: format!(
                "added exits after layers {points:?} ({} nodes)",
                added.len()
            ),
            added,
            removed: Vec::new(),
            changed: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PassManager;
    use proptest::prelude::*;
    use std::path::Path;

    fn fixture(name: &str) -> Graph {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name);
        exitgraph_ir::import(&dir).expect("fixture imports").graph
    }

    #[test]
    fn points_are_checked() {
        assert_eq!(chosen_depths(&[], Some(2), 6), Ok(vec![2, 4]));
        assert_eq!(chosen_depths(&[4, 2, 4], None, 6), Ok(vec![2, 4]));
        assert!(chosen_depths(&[6], None, 6).unwrap_err().contains("1..6"));
        assert!(chosen_depths(&[0], None, 6).is_err());
        assert!(chosen_depths(&[], None, 6).is_err());
        assert!(chosen_depths(&[2], Some(2), 6).is_err());
        assert!(chosen_depths(&[], Some(0), 6).is_err());
    }

    #[test]
    fn own_heads_need_their_weights() {
        let mut g = fixture("tiny-llama");
        let e = InsertExits {
            after: vec![2],
            every: None,
            head: HeadKind::Linear,
            gate: false,
            weights: None,
        }
        .run(&mut g, &PassContext::detached())
        .expect_err("no weights");
        assert!(e.to_string().contains("exits.2.norm.weight"), "{e}");
    }

    proptest! {
        /// Only nodes and outputs are added: every original node (name, op with its weights,
        /// layer, shape), edge, output and record is unchanged, on decoders of three families,
        /// with exits chosen by `after` or `every`, with or without gates, shared heads or
        /// Kangaroo adapters (each with a KV slot of its own, after the blocks').
        #[test]
        fn exits_leave_the_full_path_unchanged(
            name in prop_oneof![Just("tiny-llama"), Just("tiny-qwen2"), Just("tiny-gpt2")],
            mask in 1u32..64,
            every in prop::option::of(1usize..4),
            gate in any::<bool>(),
            adapter in any::<bool>(),
        ) {
            let mut g = fixture(name);
            let n = g.info.num_layers;
            let points: Vec<usize> = match every {
                Some(e) => (1..n).filter(|k| k % e == 0).collect(),
                None => (1..n).filter(|k| mask & (1 << (k - 1)) != 0).collect(),
            };
            prop_assume!(!points.is_empty());
            // The shared head, or Kangaroo's adapter (GPT-2 has no RMS final norm to copy,
            // but any final norm serves).
            let head = if adapter { HeadKind::AttentionAdapter } else { HeadKind::default() };
            if gate || adapter {
                // Trained weights, as a `weights:` file would add them to the catalog.
                let file = g.weights.tensors.values().next().expect("tensors").clone();
                for &k in &points {
                    for (tensor, shape) in head_weights(&head, gate, k, &HeadDims::of(&g)) {
                        g.weights.tensors.insert(tensor, exitgraph_ir::TensorInfo { shape, ..file.clone() });
                    }
                }
            }
            let mut h = g.clone();
            let pass = InsertExits {
                after: if every.is_some() { Vec::new() } else { points.clone() },
                every,
                head: head.clone(),
                gate,
                weights: None,
            };
            PassManager::new(vec![Box::new(pass)]).run(&mut h).expect("verifies");
            for i in g.graph.node_indices() {
                prop_assert_eq!(&g.graph[i], &h.graph[i]);
                prop_assert_eq!(g.inputs(i), h.inputs(i));
                prop_assert!(g.users(i).iter().all(|u| h.users(i).contains(u)));
            }
            for (k, v) in &g.outputs {
                prop_assert_eq!(h.outputs.get(k), Some(v));
            }
            prop_assert_eq!(&g.blocks, &h.blocks);
            prop_assert_eq!(&g.head, &h.head);
            for &k in &points {
                let key = format!("exit.{k}.logits");
                prop_assert!(h.outputs.contains_key(&key));
                // The typed record names the stream after k layers and the logits output.
                let exit = h.exit_at(k).expect("a record per exit");
                prop_assert_eq!(Some(exit.reads), g.stream(k));
                prop_assert_eq!(exit.logits, h.outputs.get(&key).copied());
                prop_assert_eq!(exit.gate, h.outputs.get(&format!("exit.{k}.gate")).copied());
                prop_assert_eq!(exit.gate.is_some(), gate);
                prop_assert!(matches!(h.graph[exit.reads].op, Op::Add));
                // The shared head: the model's own LM head weights, read at depth k.
                let Op::LmHead(l) = &h.graph[exit.logits.expect("logits")].op else {
                    panic!("exit head is not an LmHead")
                };
                let Op::LmHead(own) = &h.graph[h.head.logits.expect("head")].op else {
                    panic!("model head is not an LmHead")
                };
                prop_assert_eq!(&l.weight, &own.weight);
                // An adapter has one attention node and a KV slot after every block's and
                // every earlier exit's; other heads have neither.
                let attentions = exit.nodes.iter().filter(|&&i| matches!(h.graph[i].op, Op::Attention(_))).count();
                prop_assert_eq!(attentions, usize::from(adapter));
                let before = points.iter().filter(|&&p| p < k).count();
                prop_assert_eq!(exit.kv_slot, adapter.then_some(g.kv_slots() + before));
            }
            prop_assert_eq!(h.kv_slots(), g.kv_slots() + if adapter { points.len() } else { 0 });
            prop_assert_eq!(h.exit_depths(), points.clone());
            let per_exit = if gate { 2 } else { 1 };
            prop_assert_eq!(h.outputs.len(), g.outputs.len() + per_exit * points.len());
        }

        /// On an encoder (MiniLM, fetched by scripts/fetch-minilm.sh): only nodes and outputs
        /// are added, and each exit pools the stream after its layer as the model pools.
        #[test]
        fn encoder_exits_leave_the_full_path_unchanged(mask in 1u32..32, every in prop::option::of(1usize..4)) {
            let g = fixture("minilm-l6/model");
            let n = g.info.num_layers;
            let points: Vec<usize> = match every {
                Some(e) => (1..n).filter(|k| k % e == 0).collect(),
                None => (1..n).filter(|k| mask & (1 << (k - 1)) != 0).collect(),
            };
            prop_assume!(!points.is_empty());
            let mut h = g.clone();
            let pass = InsertExits {
                after: if every.is_some() { Vec::new() } else { points.clone() },
                every,
                head: HeadKind::default(),
                gate: false,
                weights: None,
            };
            PassManager::new(vec![Box::new(pass)]).run(&mut h).expect("verifies");
            for i in g.graph.node_indices() {
                prop_assert_eq!(&g.graph[i], &h.graph[i]);
                prop_assert_eq!(g.inputs(i), h.inputs(i));
            }
            for (k, v) in &g.outputs {
                prop_assert_eq!(h.outputs.get(k), Some(v));
            }
            prop_assert_eq!(&g.blocks, &h.blocks);
            prop_assert_eq!(&g.head, &h.head);
            let pool = g.head.pooled.expect("MiniLM pools");
            for &k in &points {
                let exit = h.exit_at(k).expect("a record per exit");
                let e = exit.embedding.expect("an embedding");
                prop_assert_eq!(h.outputs.get(&format!("exit.{k}.sentence_embedding")), Some(&e));
                prop_assert_eq!(h.inputs(e), vec![g.stream(k).expect("stream")]);
                prop_assert_eq!(&h.graph[e].op, &g.graph[pool].op);
                prop_assert!(exit.logits.is_none() && exit.gate.is_none());
            }
            prop_assert_eq!(h.outputs.len(), g.outputs.len() + points.len());
        }
    }
}
