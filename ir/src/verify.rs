//! Structural, shape and weight checks of a [`Graph`].
//!
//! The pass manager runs [`verify`] after every pass, so a broken rewrite is reported with the
//! pass that made it and every problem at once.

use crate::graph::Graph;
use crate::op::{Linear, Op};
use crate::shape::Shape;
use crate::weight::WeightRef;
use petgraph::stable_graph::NodeIndex;
use std::collections::BTreeSet;
use std::fmt;

/// One thing wrong with a graph, at a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub node: String,
    pub message: String,
}

/// Every problem `verify` found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct VerifyError(pub Vec<Problem>);

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "graph is invalid:")?;
        for p in &self.0 {
            write!(f, "\n  {}: {}", p.node, p.message)?;
        }
        Ok(())
    }
}

struct Checker<'g> {
    g: &'g Graph,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn report(&mut self, node: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            node: node.to_string(),
            message: message.into(),
        });
    }

    fn weight(&mut self, node: &str, role: &str, w: &WeightRef, expected: &[usize]) {
        match w.shape(&self.g.weights) {
            Ok(s) if s == expected => {}
            Ok(s) => self.report(
                node,
                format!(
                    "weight {role} ({w}{}) has shape {s:?}, expected {expected:?}",
                    self.files_of(w)
                ),
            ),
            Err(e) => self.report(node, format!("weight {role}: {e}")),
        }
        for src in w.sources() {
            if let Some(t) = self.g.weights.tensors.get(src) {
                if !t.dtype.is_float_weight() {
                    self.report(
                        node,
                        format!(
                            "weight {role}: tensor \"{src}\" in {} has dtype {}, expected F32, F16 or BF16",
                            t.file, t.dtype
                        ),
                    );
                }
            }
        }
    }

    fn files_of(&self, w: &WeightRef) -> String {
        let files: BTreeSet<&str> = w
            .sources()
            .iter()
            .filter_map(|s| self.g.weights.tensors.get(*s))
            .map(|t| t.file.as_str())
            .collect();
        if files.is_empty() {
            String::new()
        } else {
            format!(" in {}", files.into_iter().collect::<Vec<_>>().join(", "))
        }
    }

    fn linear(&mut self, node: &str, role: &str, l: &Linear) {
        self.weight(
            node,
            &format!("{role}.weight"),
            &l.weight,
            &[l.out_features, l.in_features],
        );
        if let Some(b) = &l.bias {
            self.weight(node, &format!("{role}.bias"), b, &[l.out_features]);
        }
        if let Some(a) = &l.adapter {
            if a.rank == 0 {
                self.report(node, format!("{role}: adapter rank must be at least 1"));
            }
            self.weight(
                node,
                &format!("{role}.adapter.a"),
                &a.a,
                &[a.rank, l.in_features],
            );
            self.weight(
                node,
                &format!("{role}.adapter.b"),
                &a.b,
                &[l.out_features, a.rank],
            );
        }
    }

    fn input_width(&mut self, node: &str, input: &Shape, width: usize) {
        if *input != Shape::per_token(width) {
            self.report(
                node,
                format!("input has shape {input}, expected [batch, seq, {width}]"),
            );
        }
    }

    fn check_node(&mut self, idx: NodeIndex) {
        let g = self.g;
        let node = &g.graph[idx];
        let name = node.name.as_str();
        let inputs = g.inputs(idx);
        let slots: Vec<usize> = g
            .graph
            .edges_directed(idx, petgraph::Direction::Incoming)
            .map(|e| e.weight().slot)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if inputs.len() != node.op.arity() || slots != (0..node.op.arity()).collect::<Vec<_>>() {
            self.report(
                name,
                format!(
                    "{} takes {} input(s) on slots 0..{}, has {} on slots {slots:?}",
                    node.op.kind(),
                    node.op.arity(),
                    node.op.arity(),
                    inputs.len()
                ),
            );
            return;
        }
        let in_shapes: Vec<Shape> = inputs.iter().map(|&i| g.graph[i].shape.clone()).collect();
        let expected_out = match &node.op {
            Op::TokenInput => Shape::tokens(),
            Op::Embedding(e) => {
                if in_shapes[0] != Shape::tokens() {
                    self.report(
                        name,
                        format!(
                            "input has shape {}, expected token ids [batch, seq]",
                            in_shapes[0]
                        ),
                    );
                }
                self.weight(name, "tokens", &e.tokens, &[e.vocab, e.hidden]);
                if let Some(p) = &e.positions {
                    match p.shape(&g.weights) {
                        Ok(s) if s.len() == 2 && s[1] == e.hidden => {}
                        Ok(s) => self.report(name, format!("weight positions ({p}) has shape {s:?}, expected [max_positions, {}]", e.hidden)),
                        Err(err) => self.report(name, format!("weight positions: {err}")),
                    }
                }
                if let Some(t) = &e.token_types {
                    match t.shape(&g.weights) {
                        Ok(s) if s.len() == 2 && s[1] == e.hidden => {}
                        Ok(s) => self.report(name, format!("weight token_types ({t}) has shape {s:?}, expected [type_vocab, {}]", e.hidden)),
                        Err(err) => self.report(name, format!("weight token_types: {err}")),
                    }
                }
                Shape::per_token(e.hidden)
            }
            Op::Norm(n) => {
                self.input_width(name, &in_shapes[0], n.hidden);
                self.weight(name, "weight", &n.weight, &[n.hidden]);
                if let Some(b) = &n.bias {
                    self.weight(name, "bias", b, &[n.hidden]);
                }
                if !(n.eps > 0.0 && n.eps.is_finite()) {
                    self.report(name, format!("eps must be positive, is {}", n.eps));
                }
                Shape::per_token(n.hidden)
            }
            Op::Attention(a) | Op::QueryKeyScores(a) => {
                let hidden = a.q.in_features;
                self.input_width(name, &in_shapes[0], hidden);
                if a.heads == 0 || a.kv_heads == 0 || a.head_dim == 0 {
                    self.report(name, "heads, kv_heads and head_dim must be positive");
                } else if a.heads % a.kv_heads != 0 {
                    self.report(
                        name,
                        format!(
                            "heads ({}) is not a multiple of kv_heads ({})",
                            a.heads, a.kv_heads
                        ),
                    );
                }
                if a.q.out_features != a.heads * a.head_dim {
                    self.report(
                        name,
                        format!(
                            "q projects to {}, expected heads*head_dim = {}",
                            a.q.out_features,
                            a.heads * a.head_dim
                        ),
                    );
                }
                for (role, l) in [("k", &a.k), ("v", &a.v)] {
                    if l.out_features != a.kv_heads * a.head_dim {
                        self.report(
                            name,
                            format!(
                                "{role} projects to {}, expected kv_heads*head_dim = {}",
                                l.out_features,
                                a.kv_heads * a.head_dim
                            ),
                        );
                    }
                    if l.in_features != hidden {
                        self.report(
                            name,
                            format!("{role} reads {}, expected {hidden}", l.in_features),
                        );
                    }
                }
                if a.o.in_features != a.heads * a.head_dim || a.o.out_features != hidden {
                    self.report(
                        name,
                        format!(
                            "o maps {} -> {}, expected {} -> {hidden}",
                            a.o.in_features,
                            a.o.out_features,
                            a.heads * a.head_dim
                        ),
                    );
                }
                if let Some(r) = &a.rope {
                    if r.rotary_dim == 0 || r.rotary_dim > a.head_dim || r.rotary_dim % 2 != 0 {
                        self.report(
                            name,
                            format!(
                                "rotary_dim {} must be even and in 1..={}",
                                r.rotary_dim, a.head_dim
                            ),
                        );
                    }
                }
                if a.sliding_window == Some(0) {
                    self.report(name, "sliding_window must be positive");
                }
                self.linear(name, "q", &a.q);
                self.linear(name, "k", &a.k);
                self.linear(name, "v", &a.v);
                self.linear(name, "o", &a.o);
                if matches!(node.op, Op::QueryKeyScores(_)) {
                    Shape::per_token(1)
                } else {
                    Shape::per_token(hidden)
                }
            }
            Op::Mlp(m) => {
                let hidden = m.up.in_features;
                self.input_width(name, &in_shapes[0], hidden);
                if let Some(gate) = &m.gate {
                    if gate.in_features != hidden || gate.out_features != m.up.out_features {
                        self.report(name, "gate and up projections differ in shape");
                    }
                    self.linear(name, "gate", gate);
                }
                if m.down.in_features != m.up.out_features || m.down.out_features != hidden {
                    self.report(
                        name,
                        format!(
                            "down maps {} -> {}, expected {} -> {hidden}",
                            m.down.in_features, m.down.out_features, m.up.out_features
                        ),
                    );
                }
                self.linear(name, "up", &m.up);
                self.linear(name, "down", &m.down);
                Shape::per_token(hidden)
            }
            Op::Add => {
                if in_shapes[0] != in_shapes[1] {
                    self.report(
                        name,
                        format!("adds shapes {} and {}", in_shapes[0], in_shapes[1]),
                    );
                }
                in_shapes[0].clone()
            }
            Op::LmHead(l) => {
                self.input_width(name, &in_shapes[0], l.in_features);
                self.linear(name, "lm_head", l);
                Shape::per_token(l.out_features)
            }
            Op::Pool(p) => {
                self.input_width(name, &in_shapes[0], p.hidden);
                Shape::per_sequence(p.hidden)
            }
        };
        if node.shape != expected_out {
            self.report(
                name,
                format!("declared shape {} but computes {expected_out}", node.shape),
            );
        }
    }
}

/// Checks that the graph is acyclic, every op has its inputs, shapes agree along every edge,
/// every weight exists with the shape its op needs, names are unique and outputs exist.
pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    let mut c = Checker {
        g,
        problems: Vec::new(),
    };
    if let Err(cycle) = g.topo_order() {
        c.report("graph", format!("has a cycle through {}", cycle.join(", ")));
        return Err(VerifyError(c.problems));
    }
    let mut names = BTreeSet::new();
    let mut token_inputs = 0;
    for idx in g.graph.node_indices() {
        let node = &g.graph[idx];
        if !names.insert(node.name.as_str()) {
            c.report(&node.name, "name is used by more than one node");
        }
        if matches!(node.op, Op::TokenInput) {
            token_inputs += 1;
        }
        if let Some(l) = node.layer {
            if l >= g.info.num_layers {
                c.report(
                    &node.name,
                    format!("layer {l} out of range 0..{}", g.info.num_layers),
                );
            }
        }
        c.check_node(idx);
    }
    if token_inputs != 1 {
        c.report(
            "graph",
            format!("needs exactly one TokenInput, has {token_inputs}"),
        );
    }
    if g.outputs.is_empty() {
        c.report("graph", "has no outputs");
    }
    for (name, &idx) in &g.outputs {
        if g.graph.node_weight(idx).is_none() {
            c.report("graph", format!("output {name} points at a removed node"));
        }
    }
    if let Some(&idx) = g.outputs.get("logits") {
        if let Some(n) = g.graph.node_weight(idx) {
            if !matches!(n.op, Op::LmHead(_)) {
                c.report(
                    "graph",
                    format!(
                        "output logits comes from {} ({}), not an LmHead",
                        n.name,
                        n.op.kind()
                    ),
                );
            }
        }
    }
    check_structure(&mut c);
    if c.problems.is_empty() {
        Ok(())
    } else {
        Err(VerifyError(c.problems))
    }
}

/// The typed records point at live nodes and agree with the graph: one block per layer in
/// depth order, each reading the stream the one before writes, distinct KV slots, every
/// attention inside a block with a slot, blocks sharing a weight identity running the same
/// ops, one exit per depth within the stack reading its stream, a head of the right kinds.
fn check_structure(c: &mut Checker<'_>) {
    let g = c.g;
    let live = |n: NodeIndex| g.graph.node_weight(n).is_some();
    if g.blocks.len() != g.info.num_layers {
        c.report(
            "graph",
            format!(
                "records {} blocks for {} layers",
                g.blocks.len(),
                g.info.num_layers
            ),
        );
    }
    if g.embedded.is_some_and(|n| !live(n)) {
        c.report("graph", "the embedded stream points at a removed node");
    }
    let mut slots = BTreeSet::new();
    for (d, b) in g.blocks.iter().enumerate() {
        let name = format!("block {d}");
        if b.depth != d {
            c.report(&name, format!("records depth {}", b.depth));
        }
        if !live(b.input) || !live(b.output) {
            c.report(&name, "its input or output stream points at a removed node");
        } else if g.stream(d) != Some(b.input) {
            c.report(&name, "does not read the stream the block before it writes");
        }
        if let Some(s) = b.kv_slot {
            if !slots.insert(s) {
                c.report(&name, format!("KV slot {s} is used by another block"));
            }
        }
    }
    // Blocks with one weight identity run the same ops, in the same order (adapters, norm
    // weights and biases aside: `TieLayers(norms: PerIteration)` keeps each depth's own).
    let ops_of = |d: usize| -> Vec<crate::op::Op> {
        g.graph
            .node_indices()
            .filter(|&n| g.graph[n].layer == Some(d))
            .map(|n| {
                let mut op = g.graph[n].op.without_adapters();
                if let Op::Norm(norm) = &mut op {
                    norm.weight = crate::weight::WeightRef::Zeros { shape: Vec::new() };
                    norm.bias = None;
                }
                for l in op.linears_mut() {
                    l.bias = None;
                }
                op
            })
            .collect()
    };
    for (d, b) in g.blocks.iter().enumerate() {
        if let Some(first) = g.blocks[..d].iter().find(|o| o.weights == b.weights) {
            if ops_of(first.depth) != ops_of(d) {
                c.report(
                    &format!("block {d}"),
                    format!(
                        "shares weight identity {} with block {} but runs different ops or weights",
                        b.weights, first.depth
                    ),
                );
            }
        }
    }
    for e in &g.exits {
        if let Some(s) = e.kv_slot {
            if !slots.insert(s) {
                c.report(
                    &format!("exit after {}", e.after),
                    format!("KV slot {s} is used by a block or another exit"),
                );
            }
        }
    }
    for n in g.graph.node_indices() {
        let node = &g.graph[n];
        if !matches!(node.op, Op::Attention(_)) {
            continue;
        }
        let in_block = node
            .layer
            .and_then(|d| g.blocks.get(d))
            .and_then(|b| b.kv_slot)
            .is_some();
        let exits_with_it: Vec<&crate::Exit> =
            g.exits.iter().filter(|e| e.nodes.contains(&n)).collect();
        let in_exit =
            node.layer.is_none() && matches!(exits_with_it.as_slice(), [e] if e.kv_slot.is_some());
        if !in_block && !in_exit {
            c.report(
                &node.name,
                "attention outside a block or an exit head with a KV slot",
            );
        }
    }
    for e in &g.exits {
        let attentions = e
            .nodes
            .iter()
            .filter(|&&n| {
                g.graph
                    .node_weight(n)
                    .is_some_and(|node| matches!(node.op, Op::Attention(_)))
            })
            .count();
        if attentions > 1 || (attentions == 0) != e.kv_slot.is_none() {
            c.report(
                &format!("exit after {}", e.after),
                format!(
                    "has {attentions} attention nodes and {} KV slot (one of each, or neither)",
                    if e.kv_slot.is_some() { "a" } else { "no" }
                ),
            );
        }
    }
    let head_ok = |n: Option<NodeIndex>, ok: fn(&Op) -> bool| {
        n.is_none_or(|n| g.graph.node_weight(n).is_some_and(|node| ok(&node.op)))
    };
    if !head_ok(g.head.logits, |op| matches!(op, Op::LmHead(_)))
        || !head_ok(g.head.norm, |op| matches!(op, Op::Norm(_)))
        || !head_ok(g.head.pooled, |op| matches!(op, Op::Pool(_)))
    {
        c.report(
            "graph",
            "the head record points at a removed node or one of the wrong kind",
        );
    }
    let mut exit_depths = BTreeSet::new();
    for e in &g.exits {
        let name = format!("exit after {}", e.after);
        if !exit_depths.insert(e.after) {
            c.report(&name, "is one of several exits at that depth");
        }
        if e.after == 0 || e.after >= g.info.num_layers.max(1) {
            c.report(&name, format!("is out of range 1..{}", g.info.num_layers));
        }
        if g.stream(e.after) != Some(e.reads) {
            c.report(&name, "does not read the stream after its layer");
        }
        let nodes = e
            .nodes
            .iter()
            .chain(&e.logits)
            .chain(&e.embedding)
            .chain(&e.gate);
        if nodes.clone().any(|&n| !live(n)) {
            c.report(&name, "points at a removed node");
        }
        if e.head().is_none() {
            c.report(&name, "has neither logits nor an embedding");
        }
    }
    if let Some(f) = &g.filter {
        let name = "GemFilter";
        match g.graph.node_weight(f.scores) {
            None => c.report(name, "points at a removed node"),
            Some(node) => {
                if !matches!(node.op, Op::QueryKeyScores(_)) {
                    c.report(
                        name,
                        format!("scores node {} is not QueryKeyScores", node.name),
                    );
                }
                if node.layer != Some(f.layer) {
                    c.report(
                        name,
                        format!("scores node {} is not in layer {}", node.name, f.layer),
                    );
                }
            }
        }
        if f.layer >= g.blocks.len() {
            c.report(
                name,
                format!(
                    "filter layer {} is not one of the {} layers",
                    f.layer,
                    g.blocks.len()
                ),
            );
        }
        if let Err(e) = f.check() {
            c.report(name, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Edge, Node};
    use petgraph::visit::EdgeRef;
    use std::path::Path;

    fn tiny_llama() -> Graph {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        crate::import(&dir).expect("fixture imports").graph
    }

    fn messages(g: &Graph) -> String {
        verify(g).expect_err("graph is broken").to_string()
    }

    #[test]
    fn imported_graph_verifies() {
        verify(&tiny_llama()).expect("valid");
    }

    #[test]
    fn a_cycle_is_reported() {
        let mut g = tiny_llama();
        let a = g.find("layers.0.attn").expect("node");
        let b = g.find("layers.1.attn").expect("node");
        g.graph.add_edge(b, a, Edge { slot: 1 });
        assert!(messages(&g).contains("cycle"));
    }

    #[test]
    fn a_missing_input_is_reported() {
        let mut g = tiny_llama();
        let add = g.find("layers.2.attn_residual").expect("node");
        let e = g
            .graph
            .edges_directed(add, petgraph::Direction::Incoming)
            .next()
            .expect("edge")
            .id();
        g.graph.remove_edge(e);
        let m = messages(&g);
        assert!(
            m.contains("layers.2.attn_residual") && m.contains("takes 2 input"),
            "{m}"
        );
    }

    #[test]
    fn a_weight_of_the_wrong_shape_is_reported() {
        let mut g = tiny_llama();
        let n = g.find("layers.1.mlp").expect("node");
        if let Op::Mlp(m) = &mut g.graph[n].op {
            m.up.out_features = 100;
        }
        let m = messages(&g);
        assert!(m.contains("model.layers.1.mlp.up_proj.weight"), "{m}");
        assert!(m.contains("[160, 64]") && m.contains("[100, 64]"), "{m}");
    }

    #[test]
    fn mismatched_residual_shapes_are_reported() {
        let mut g = tiny_llama();
        let n = g.find("layers.0.attn").expect("node");
        g.graph[n].shape = crate::Shape::per_token(32);
        assert!(messages(&g).contains("declared shape"));
    }

    #[test]
    fn duplicate_names_and_bad_layers_are_reported() {
        let mut g = tiny_llama();
        let input = g.find("input").expect("node");
        g.add(
            Node {
                name: "embed".into(),
                op: Op::TokenInput,
                layer: Some(99),
                shape: crate::Shape::tokens(),
            },
            &[],
        );
        let _ = input;
        let m = messages(&g);
        assert!(m.contains("used by more than one node"), "{m}");
        assert!(m.contains("layer 99 out of range"), "{m}");
        assert!(m.contains("exactly one TokenInput"), "{m}");
    }
}
