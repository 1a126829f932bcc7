//! Relaxed Recursive Transformers (Bae et al., 2024): `TieLayers` turns an L-layer model into
//! one block of K = L/B layers looped B times, and `DepthLora` relaxes the tying with a
//! low-rank adapter per loop iteration and layer position.
//!
//! `TieLayers` keeps every depth as a block of its own (its own KV slot, its own
//! `hidden_states.{depth}`), so a looped model's outputs count layer applications as the
//! unrolled model's do; the blocks at position `j` of every loop share the weight identity `j`
//! and read the same weight recipes, which lowering materialises once (the program's weight
//! bytes shrink by about B×). Each block records the weights its ops read before tying
//! (`Block::untied`), which `DepthLora(init: Svd)` approximates.
//!
//! Trained weights (`exitgraph train recursive`) come from each pass's `weights:` file: the
//! shared block as `tied.{node}.{role}` (the node of the position's first-loop layer, or of
//! the depth itself for `norms: PerIteration` vectors), the adapters as
//! `lora.{node}.{target}.a` / `.b` (the node of the depth), e.g. `tied.layers.1.attn.q.weight`
//! and `lora.layers.4.attn.q.a`. Every tensor the pass needs must be in the file with the shape
//! the recipe would have had, and every `tied.*` / `lora.*` tensor in it must be used.
//!
//! **Invariants** (property-tested): `TieLayers(loops: 1)` leaves the outputs unchanged;
//! `TieLayers(norms: PerIteration)` + `DepthLora(rank: Full, init: Svd)` reproduces the
//! original model; `DepthLora(init: Zero)` equals the tied model without adapters; `Lower`
//! with B loops equals a checkpoint whose layer `i·K + j` holds layer `j`'s weights.

use crate::{Pass, PassContext, PassError, PassReport};
use exitgraph_ir::op::LowRank;
use exitgraph_ir::{Graph, NodeIndex, Op, SvdFactor, WeightRef};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Prefix of the shared block's trained tensors in a `TieLayers(weights: ...)` file.
pub const TIED_PREFIX: &str = "tied.";
/// Prefix of the adapters' tensors in a `DepthLora(weights: ...)` file.
pub const LORA_PREFIX: &str = "lora.";

/// Metadata of a `TieLayers` weights file: the [`model_fingerprint`] of the checkpoint it was
/// trained on.
pub const MODEL_KEY: &str = "exitgraph.model";
/// Metadata of a `TieLayers` weights file: a digest of its tensors' values.
pub const CONTENT_KEY: &str = "exitgraph.content";
/// Metadata of a `DepthLora` weights file: the [`base_fingerprint`] of the tied block its
/// adapters were trained against.
pub const BASE_KEY: &str = "exitgraph.base";

/// FNV-1a (64 bits) of `bytes`, as 16 hex digits: a fingerprint, not a security hash.
pub fn digest(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The checkpoint's structure: its model description and its own tensors' names, shapes and
/// dtypes (not their values: two checkpoints of one architecture and layout share it).
pub fn model_fingerprint(g: &Graph) -> String {
    use std::fmt::Write;
    let mut text = format!("{:?}\n", g.info);
    for (name, t) in &g.weights.tensors {
        if [TIED_PREFIX, LORA_PREFIX, "exits."]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let _ = writeln!(text, "{name} {:?} {:?}", t.shape, t.dtype);
    }
    digest(text.as_bytes())
}

/// What a graph's adapters are relative to: the checkpoint's structure and every block's
/// weights after tying (their recipes, which name the loop count, the init and the norms;
/// trained block weights by their file's content digest). A `DepthLora(weights: ...)` file
/// made against another base is refused.
pub fn base_fingerprint(g: &Graph) -> String {
    use std::fmt::Write;
    let mut text = model_fingerprint(g);
    let mut files = BTreeSet::new();
    for d in 0..g.blocks.len() {
        let _ = write!(text, "\n{d}:{}", g.blocks[d].weights);
        for node in block_nodes(g, d) {
            let mut op = g.graph[node].op.clone();
            for w in op.weights_mut() {
                let _ = write!(text, " {w}");
                for src in w.sources() {
                    if src.starts_with(TIED_PREFIX) {
                        if let Some(info) = g.weights.tensors.get(src) {
                            files.insert(info.file.clone());
                        }
                    }
                }
            }
        }
    }
    for f in files {
        let content = exitgraph_ir::import::read_metadata(std::path::Path::new(&f))
            .ok()
            .and_then(|m| m.get(CONTENT_KEY).cloned())
            .unwrap_or_default();
        let _ = write!(text, "\ntied file content {content}");
    }
    digest(text.as_bytes())
}

/// Checks a weights file's fingerprint `key` against `expected`; files without one (made by
/// hand) are taken as they are. Returns whether it was checked.
pub(crate) fn check_fingerprint(
    cx: &PassContext,
    file: &str,
    key: &str,
    expected: &str,
    what: &str,
) -> Result<bool, String> {
    let path = cx.resolve(file);
    if !path.is_file() {
        // Reading the file names the problem (`add_weights`).
        return Ok(false);
    }
    let meta = exitgraph_ir::import::read_metadata(&path).map_err(|e| e.to_string())?;
    match meta.get(key) {
        None => Ok(false),
        Some(found) if found == expected => Ok(true),
        Some(found) => Err(format!(
            "\"{file}\" was trained against {what} than this pipeline's ({key} {found}, here {expected}): retrain it for this pipeline"
        )),
    }
}

/// Name of a trained block weight: `tied.{node}.{role}`.
pub fn tied_name(node: &str, role: &str) -> String {
    format!("{TIED_PREFIX}{node}.{role}")
}

/// Name of an adapter factor: `lora.{node}.{target}.a` or `.b`.
pub fn lora_name(node: &str, target: LoraTarget, factor: SvdFactor) -> String {
    let f = match factor {
        SvdFactor::A => "a",
        SvdFactor::B => "b",
    };
    format!("{LORA_PREFIX}{node}.{target:?}.{f}")
}

/// Names of an op's stored weights, in `Op::weights_mut` order: `weight`/`bias` of a norm,
/// `{projection}.weight`/`.bias` of attention and MLP projections.
pub fn weight_roles(op: &Op) -> Vec<String> {
    match op {
        Op::Norm(n) => {
            let mut v = vec!["weight".to_string()];
            if n.bias.is_some() {
                v.push("bias".into());
            }
            v
        }
        Op::Attention(_) | Op::Mlp(_) => {
            let mut probe = op.clone();
            targeted(&mut probe)
                .into_iter()
                .flat_map(|(t, l)| {
                    let mut v = vec![format!("{t:?}.weight")];
                    if l.bias.is_some() {
                        v.push(format!("{t:?}.bias"));
                    }
                    v
                })
                .collect()
        }
        other => {
            let mut probe = other.clone();
            (0..probe.weights_mut().len())
                .map(|i| format!("w{i}"))
                .collect()
        }
    }
}

/// Checks that the catalog holds `name` (from `file`) with the shape `expected` of the
/// recipe it replaces.
fn file_weight(g: &Graph, file: &str, name: &str, expected: &[usize]) -> Result<WeightRef, String> {
    let info = g
        .weights
        .tensors
        .get(name)
        .ok_or_else(|| format!("\"{file}\" has no tensor {name}"))?;
    if info.shape != expected {
        return Err(format!(
            "\"{file}\": tensor {name} has shape {:?}, the model needs {expected:?}",
            info.shape
        ));
    }
    Ok(WeightRef::file(name))
}

/// Adds `file`'s tensors with `prefix` to the catalog, returning their names.
fn add_prefixed(
    g: &mut Graph,
    cx: &PassContext,
    file: &str,
    prefix: &'static str,
    pass: &'static str,
) -> Result<BTreeSet<String>, PassError> {
    let names = cx
        .add_weights(g, file, |n| n.starts_with(prefix))
        .map_err(|p| PassError::Field {
            pass,
            field: "weights",
            message: p.0,
        })?;
    Ok(names
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect())
}

/// Refuses tensors of a pass's file that no weight used (a file made for another pipeline).
fn all_used(
    pass: &'static str,
    file: &str,
    offered: &BTreeSet<String>,
    used: &BTreeSet<String>,
) -> Result<(), PassError> {
    if let Some(extra) = offered.difference(used).next() {
        return Err(PassError::Field {
            pass,
            field: "weights",
            message: format!(
                "\"{file}\" has tensor {extra}, which is no weight of this pipeline's {} ({} of {} tensors unused: was the file made for another pipeline?)",
                if pass == "TieLayers" { "tied block" } else { "adapters" },
                offered.difference(used).count(),
                offered.len()
            ),
        });
    }
    Ok(())
}

/// How the shared block's weights are initialised from the original layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TieInit {
    /// Position `j` takes layer `round(linspace(0, L − 1, K))[j]`, rounding half to even as
    /// NumPy and PyTorch do (L = 6, K = 3: 0, 2.5 → 2, 5).
    #[default]
    Stepwise,
    /// Position `j` takes the mean of the layers tied to it: `j, j + K, j + 2K, ...`.
    Average,
    /// Position `j` takes layer `j` (the first K layers).
    Lower,
}

/// Whose norm weights each depth uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TieNorms {
    /// Norms are tied like the other weights (by the same `init` rule).
    #[default]
    Shared,
    /// Each depth keeps its original layer's norm weights and biases (vectors: a negligible
    /// number of parameters; biases go with them so that Qwen2's and GPT-2's layers can be
    /// relaxed back exactly, since a low-rank adapter changes only the matrices).
    PerIteration,
}

/// `TieLayers(loops: B, init: ..., norms: ..., weights: ...)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TieLayers {
    pub loops: usize,
    pub init: TieInit,
    pub norms: TieNorms,
    /// Safetensors file of trained block weights (`tied.*`), relative to the pipeline; the
    /// `init` rule's recipes when `None`.
    pub weights: Option<String>,
}

/// NumPy's `round(linspace(0, n - 1, k))`, half to even.
pub fn stepwise_layers(n: usize, k: usize) -> Vec<usize> {
    if k == 1 {
        return vec![0];
    }
    (0..k)
        .map(|j| {
            let x = j as f64 * (n - 1) as f64 / (k - 1) as f64;
            x.round_ties_even() as usize
        })
        .collect()
}

/// The nodes of block `depth`, in graph order.
fn block_nodes(g: &Graph, depth: usize) -> Vec<NodeIndex> {
    g.graph
        .node_indices()
        .filter(|&n| g.graph[n].layer == Some(depth))
        .collect()
}

/// Which of an op's stored weights (in `Op::weights_mut` order) are vectors that
/// `norms: PerIteration` keeps per depth: norm weights and biases.
fn vector_flags(op: &Op) -> Vec<bool> {
    match op {
        Op::Norm(n) => vec![true; 1 + usize::from(n.bias.is_some())],
        Op::Embedding(_) => {
            let mut o = op.clone();
            vec![false; o.weights_mut().len()]
        }
        other => other
            .linears()
            .into_iter()
            .flat_map(|l| {
                let mut v = vec![false];
                if l.bias.is_some() {
                    v.push(true);
                }
                v
            })
            .collect(),
    }
}

/// The stored weights of a block's ops, in node order, each flagged when it is a vector
/// (norm weight or bias).
fn block_weights(g: &Graph, depth: usize) -> Vec<(bool, WeightRef)> {
    block_nodes(g, depth)
        .into_iter()
        .flat_map(|n| {
            let mut op = g.graph[n].op.clone();
            let flags = vector_flags(&op);
            op.weights_mut()
                .into_iter()
                .zip(flags)
                .map(|(w, vector)| (vector, w.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

impl Pass for TieLayers {
    fn name(&self) -> &'static str {
        "TieLayers"
    }

    fn run(&self, g: &mut Graph, cx: &PassContext) -> Result<PassReport, PassError> {
        let field = |field: &'static str, message: String| PassError::Field {
            pass: "TieLayers",
            field,
            message,
        };
        if g.filter.is_some() {
            return Err(PassError::Config {
                pass: "TieLayers",
                message: "TieLayers cannot follow GemFilter (its filter layer would become one \
                          iteration of a shared block): put GemFilter last"
                    .into(),
            });
        }
        let n = g.blocks.len();
        let b = self.loops;
        if b == 0 || n % b != 0 {
            return Err(field(
                "loops",
                format!("{b} loops do not divide the model's {n} layers"),
            ));
        }
        if g.blocks.iter().any(|bl| bl.weights != bl.depth) {
            return Err(field(
                "loops",
                "the model's layers are already tied (one TieLayers per pipeline)".into(),
            ));
        }
        let k = n / b;
        let originals: Vec<Vec<(bool, WeightRef)>> = (0..n).map(|d| block_weights(g, d)).collect();
        if originals.iter().any(|w| w.len() != originals[0].len()) {
            return Err(field(
                "loops",
                "the layers do not all have the same ops, so they cannot be tied".into(),
            ));
        }
        let sources = stepwise_layers(n, k);
        // The shared recipe of each position's `i`-th weight.
        let shared = |j: usize, i: usize| -> WeightRef {
            match self.init {
                TieInit::Stepwise => originals[sources[j]][i].1.clone(),
                TieInit::Lower => originals[j][i].1.clone(),
                TieInit::Average => {
                    let of: Vec<WeightRef> =
                        (0..b).map(|l| originals[j + l * k][i].1.clone()).collect();
                    if of.len() == 1 {
                        of[0].clone()
                    } else {
                        WeightRef::Mean(of)
                    }
                }
            }
        };
        let offered = match &self.weights {
            Some(file) => {
                check_fingerprint(
                    cx,
                    file,
                    MODEL_KEY,
                    &model_fingerprint(g),
                    "another checkpoint",
                )
                .map_err(|m| field("weights", m))?;
                add_prefixed(g, cx, file, TIED_PREFIX, "TieLayers")?
            }
            None => BTreeSet::new(),
        };
        let mut used = BTreeSet::new();
        let mut changed = Vec::new();
        for (d, original) in originals.iter().enumerate() {
            let (loop_i, j) = (d / k, d % k);
            let mut i = 0;
            let first_loop = block_nodes(g, j);
            for (at, node) in block_nodes(g, d).into_iter().enumerate() {
                let mut touched = false;
                let op = g.graph[node].op.clone();
                let flags = vector_flags(&op);
                let roles = weight_roles(&op);
                let mut new = Vec::new();
                for (vector, role) in flags.iter().zip(&roles) {
                    let per_depth = *vector && self.norms == TieNorms::PerIteration;
                    let recipe = if per_depth {
                        original[i].1.clone()
                    } else {
                        shared(j, i)
                    };
                    let recipe = match &self.weights {
                        None => recipe,
                        Some(file) => {
                            let owner = if per_depth { node } else { first_loop[at] };
                            let name = tied_name(&g.graph[owner].name, role);
                            let expected = recipe
                                .shape(&g.weights)
                                .map_err(|e| field("weights", e.to_string()))?;
                            used.insert(name.clone());
                            file_weight(g, file, &name, &expected)
                                .map_err(|m| field("weights", m))?
                        }
                    };
                    new.push(recipe);
                    i += 1;
                }
                for (w, s) in g.graph[node].op.weights_mut().into_iter().zip(new) {
                    touched |= *w != s;
                    *w = s;
                }
                if touched {
                    changed.push(g.graph[node].name.clone());
                }
            }
            let block = &mut g.blocks[d];
            block.weights = j;
            block.iteration = loop_i;
            block.untied = original.iter().map(|(_, w)| w.clone()).collect();
        }
        if let Some(file) = &self.weights {
            all_used("TieLayers", file, &offered, &used)?;
        }
        Ok(PassReport {
            summary: format!(
                "tied {n} layers into one block of {k} looped {b} times ({}, {:?} norms)",
                match &self.weights {
                    Some(f) => format!("trained weights from \"{f}\""),
                    None => format!("{:?} init", self.init),
                },
                self.norms
            ),
            added: Vec::new(),
            removed: Vec::new(),
            changed,
        })
    }
}

/// The rank of `DepthLora`'s adapters: `Rank(r)` or `Full` in RON. (A bare number beside
/// an identifier would need RON's untyped parsing, which reads any identifier as a unit
/// value: a typo such as `Fulll` would pass unnoticed.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoraRank {
    /// This rank (at most the smaller side of each weight).
    Rank(usize),
    /// min(out, in) of each weight: the adapter can hold any residual.
    Full,
}

/// How `DepthLora`'s adapters start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoraInit {
    /// Truncated SVD of the residual between the original layer's weight and the shared one.
    #[default]
    Svd,
    /// `B = 0` (the tied model), `A` seeded uniform in ±1/√in (LoRA's usual start).
    Zero,
}

/// Which projections get adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[allow(non_camel_case_types)]
pub enum LoraTarget {
    q,
    k,
    v,
    o,
    gate,
    up,
    down,
}

/// The shared block's weights of a tied graph by the names a `TieLayers(weights: ...)` file
/// gives them, with their current recipes: one entry per position's shared weight and, with
/// `norms: PerIteration`, per depth's own norm weights and biases. What `train recursive
/// --train-shared` trains.
pub fn tied_tensors(g: &Graph, norms: TieNorms) -> Vec<(String, WeightRef)> {
    let k = g
        .blocks
        .iter()
        .map(|b| b.weights)
        .max()
        .map_or(0, |m| m + 1);
    let mut out: Vec<(String, WeightRef)> = Vec::new();
    let mut seen = BTreeSet::new();
    for d in 0..g.blocks.len() {
        let j = g.blocks[d].weights;
        let first_loop = block_nodes(g, j.min(k.saturating_sub(1)));
        for (at, node) in block_nodes(g, d).into_iter().enumerate() {
            let mut op = g.graph[node].op.clone();
            let flags = vector_flags(&op);
            let roles = weight_roles(&op);
            for ((w, vector), role) in op.weights_mut().into_iter().zip(flags).zip(roles) {
                let per_depth = vector && norms == TieNorms::PerIteration;
                let owner = if per_depth { node } else { first_loop[at] };
                let name = tied_name(&g.graph[owner].name, &role);
                if seen.insert(name.clone()) {
                    out.push((name, w.clone()));
                }
            }
        }
    }
    out
}

/// Every adapter factor of a graph by the names a `DepthLora(weights: ...)` file gives them,
/// with their current recipes. What `train recursive` trains.
pub fn lora_tensors(g: &Graph) -> Vec<(String, WeightRef)> {
    let mut out = Vec::new();
    for d in 0..g.blocks.len() {
        for node in block_nodes(g, d) {
            let name = &g.graph[node].name;
            let mut op = g.graph[node].op.clone();
            for (target, l) in targeted(&mut op) {
                if let Some(ad) = &l.adapter {
                    out.push((lora_name(name, target, SvdFactor::A), ad.a.clone()));
                    out.push((lora_name(name, target, SvdFactor::B), ad.b.clone()));
                }
            }
        }
    }
    out
}

/// `DepthLora(rank: r, targets: [...], init: Svd | Zero, weights: ...)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepthLora {
    pub rank: LoraRank,
    pub targets: Vec<LoraTarget>,
    pub init: LoraInit,
    /// Safetensors file of trained adapters (`lora.*`), relative to the pipeline; the `init`
    /// rule's recipes when `None`.
    pub weights: Option<String>,
}

/// The block's projections with their targets, in `Op::weights_mut` order of their weight.
fn targeted(op: &mut Op) -> Vec<(LoraTarget, &mut exitgraph_ir::op::Linear)> {
    match op {
        Op::Attention(a) => vec![
            (LoraTarget::q, &mut a.q),
            (LoraTarget::k, &mut a.k),
            (LoraTarget::v, &mut a.v),
            (LoraTarget::o, &mut a.o),
        ],
        Op::Mlp(m) => {
            let mut v = Vec::new();
            if let Some(g) = m.gate.as_mut() {
                v.push((LoraTarget::gate, g));
            }
            v.push((LoraTarget::up, &mut m.up));
            v.push((LoraTarget::down, &mut m.down));
            v
        }
        _ => Vec::new(),
    }
}

impl Pass for DepthLora {
    fn name(&self) -> &'static str {
        "DepthLora"
    }

    fn run(&self, g: &mut Graph, cx: &PassContext) -> Result<PassReport, PassError> {
        let field = |field: &'static str, message: String| PassError::Field {
            pass: "DepthLora",
            field,
            message,
        };
        if g.blocks.iter().all(|b| b.untied.is_empty()) {
            return Err(field(
                "rank",
                "DepthLora relaxes tied layers: put a TieLayers pass before it".into(),
            ));
        }
        if self.targets.is_empty() {
            return Err(field("targets", "no projection named".into()));
        }
        if self.rank == LoraRank::Rank(0) {
            return Err(field("rank", "rank 0 adds nothing".into()));
        }
        let mut checked = false;
        let offered = match &self.weights {
            Some(file) => {
                checked = check_fingerprint(
                    cx,
                    file,
                    BASE_KEY,
                    &base_fingerprint(g),
                    "another tied block (model, loops, init, norms or shared weights)",
                )
                .map_err(|m| field("weights", m))?;
                add_prefixed(g, cx, file, LORA_PREFIX, "DepthLora")?
            }
            None => BTreeSet::new(),
        };
        let mut used = BTreeSet::new();
        let mut changed = Vec::new();
        let mut params = 0usize;
        for d in 0..g.blocks.len() {
            let untied = g.blocks[d].untied.clone();
            let mut i = 0;
            for node in block_nodes(g, d) {
                let name = g.graph[node].name.clone();
                let mut op = g.graph[node].op.clone();
                // Position of each projection's weight among the block's stored weights.
                let mut offsets = Vec::new();
                {
                    let mut probe = op.clone();
                    let mut at = i;
                    for l in probe.linears_mut() {
                        offsets.push(at);
                        at += 1 + usize::from(l.bias.is_some());
                    }
                    let total = probe.weights_mut().len();
                    i += total;
                }
                let mut any = false;
                for ((target, l), at) in targeted(&mut op).into_iter().zip(offsets) {
                    if !self.targets.contains(&target) {
                        continue;
                    }
                    let side = l.out_features.min(l.in_features);
                    let rank = match self.rank {
                        LoraRank::Full => side,
                        LoraRank::Rank(r) if r <= side => r,
                        LoraRank::Rank(r) => {
                            return Err(field(
                                "rank",
                                format!(
                                "{r} exceeds {name}.{target:?}'s smaller side {side} ([{}, {}])",
                                l.out_features, l.in_features
                            ),
                            ))
                        }
                    };
                    let original = untied.get(at).cloned().ok_or_else(|| {
                        field(
                            "rank",
                            format!("block {d} has no record of {name}'s weights"),
                        )
                    })?;
                    let (a, b) = match (&self.weights, self.init) {
                        (Some(file), _) => {
                            let mut get = |factor, shape: [usize; 2]| {
                                let n = lora_name(&name, target, factor);
                                used.insert(n.clone());
                                file_weight(g, file, &n, &shape).map_err(|m| field("weights", m))
                            };
                            (
                                get(SvdFactor::A, [rank, l.in_features])?,
                                get(SvdFactor::B, [l.out_features, rank])?,
                            )
                        }
                        (None, LoraInit::Svd) => {
                            let svd = |factor| WeightRef::Svd {
                                target: Box::new(original.clone()),
                                base: Box::new(l.weight.clone()),
                                rank,
                                factor,
                            };
                            (svd(SvdFactor::A), svd(SvdFactor::B))
                        }
                        (None, LoraInit::Zero) => (
                            WeightRef::Uniform {
                                shape: vec![rank, l.in_features],
                                seed: (d as u64) << 8 | target as u64,
                            },
                            WeightRef::Zeros {
                                shape: vec![l.out_features, rank],
                            },
                        ),
                    };
                    params += rank * (l.in_features + l.out_features);
                    l.adapter = Some(LowRank {
                        a,
                        b,
                        rank,
                        scale: 1.0,
                    });
                    any = true;
                }
                g.graph[node].op = op;
                if any {
                    changed.push(name);
                }
            }
        }
        if let Some(file) = &self.weights {
            all_used("DepthLora", file, &offered, &used)?;
        }
        Ok(PassReport {
            summary: format!(
                "added depth-wise LoRA ({:?}, {}) to {} ops: {params} adapter parameters",
                self.rank,
                match &self.weights {
                    Some(f) if checked => format!("trained from \"{f}\""),
                    Some(f) => format!(
                        "trained from \"{f}\", which has no {BASE_KEY} fingerprint: not checked against this tied block"
                    ),
                    None => format!("{:?} init", self.init),
                },
                changed.len()
            ),
            added: Vec::new(),
            removed: Vec::new(),
            changed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stepwise_rounds_half_to_even() {
        assert_eq!(stepwise_layers(6, 3), vec![0, 2, 5]);
        assert_eq!(stepwise_layers(6, 2), vec![0, 5]);
        assert_eq!(stepwise_layers(6, 6), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(stepwise_layers(6, 1), vec![0]);
        // linspace(0, 7, 3) = 0, 3.5, 7: 3.5 rounds to 4 (even).
        assert_eq!(stepwise_layers(8, 3), vec![0, 4, 7]);
    }
}
