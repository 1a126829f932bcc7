//! Lowering a verified [`Graph`] to a [`Program`] of candle kernels, and running it.
//!
//! Kernels are keyed by weight identity: every place in the graph that uses the same stored
//! weights (tied layers, a looped block) shares one kernel, materialised once; what differs
//! per place (its KV slot, its low-rank adapters) belongs to the place's [`Step`] and is
//! passed to the kernel on each call. Steps run in the graph's topological order; each keeps
//! its output until the last step that reads it. Inference state (the KV cache) lives in a
//! [`KvCache`] the caller owns.
//!
//! [`Program::run`] is the one way to run ragged segments (generation, stages, exits, state
//! copying); [`Program::forward`] runs a padded tensor batch (training, encoders, reference
//! checks). Both plan with the same step walker.

mod adapter;
mod attention;
mod batch;
mod cache;
mod dense;
mod fused;
mod kernels;
mod looped;
mod ragged;
pub mod recipes;
mod rope;
mod run;
mod serial;
mod walk;
mod weights;

pub use adapter::{Adapters, Lora, RowGroup};
pub use batch::Inputs;
pub use cache::KvCache;
pub use dense::{Dense, Form as DenseForm, COLUMNS_MAX, FEW_ROWS_MAX};
pub use looped::BlockOutput;
pub use ragged::StageOutput;
pub use rope::inv_freq;
pub use run::{Positions, Run, Segment, Task, Want};
pub use weights::{WeightLoadError, WeightSource, WeightStore};

use attention::AttentionKernel;
use candle_core::{DType, Device, Tensor};
use exitgraph_ir::op::{Linear as IrLinear, Op};
use exitgraph_ir::{Graph, NodeIndex, WeightRef};
use fused::FusedLinear;
use kernels::{EmbeddingKernel, MlpIn, MlpKernel, NormKernel, PoolKernel};
use rope::RopeKernel;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error(transparent)]
    Weights(#[from] WeightLoadError),
    #[error(transparent)]
    Invalid(#[from] exitgraph_ir::VerifyError),
    #[error("node {node}: {cause}")]
    Build {
        node: String,
        cause: candle_core::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("step {step}: {cause}")]
    Step {
        step: String,
        cause: candle_core::Error,
    },
    #[error("{0}")]
    Input(String),
    #[error("the program has no output named {0} (it has: {1})")]
    UnknownOutput(String, String),
}

/// A lowered op. Kernels with weights are shared (`Arc`) by every step with the same
/// stored weights.
#[derive(Clone)]
enum Kernel {
    Input,
    Embedding(Arc<EmbeddingKernel>),
    Norm(Arc<NormKernel>),
    Attention(Arc<AttentionKernel>),
    Mlp(Arc<MlpKernel>),
    Add,
    LmHead(Arc<Dense>),
    Pool(PoolKernel),
    /// GemFilter's last-query scores with the filter layer's attention kernel (q and k).
    Scores(Arc<AttentionKernel>),
}

impl Kernel {
    /// Every stored tensor the kernel holds.
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Kernel::Input | Kernel::Add | Kernel::Pool(_) => Vec::new(),
            Kernel::Embedding(e) => e.tensors(),
            Kernel::Norm(n) => n.tensors(),
            Kernel::Attention(a) => a.tensors(),
            // The attention step of the same layer holds these weights.
            Kernel::Scores(_) => Vec::new(),
            Kernel::Mlp(m) => m.tensors(),
            Kernel::LmHead(l) => l.tensors(),
        }
    }
}

/// One place in the graph, lowered: its kernel and what is its own.
#[derive(Clone)]
struct Step {
    name: String,
    /// Depth of the block the step belongs to.
    layer: Option<usize>,
    kernel: Kernel,
    inputs: Vec<usize>,
    /// KV cache slot of an attention step (its block's).
    slot: Option<usize>,
    /// Adapters of the op's projections, in [`Op::linears`] order.
    adapters: Vec<Option<Lora>>,
}

impl Step {
    fn slot(&self) -> Result<usize, candle_core::Error> {
        self.slot.ok_or_else(|| {
            candle_core::Error::Msg("attention outside a block has no KV slot".into())
        })
    }
}

/// A lowered graph, ready to run. Cloning shares every kernel and weight.
#[derive(Clone)]
pub struct Program {
    graph: Graph,
    steps: Vec<Step>,
    /// Step of each graph node.
    node_step: HashMap<NodeIndex, usize>,
    outputs: BTreeMap<String, usize>,
    /// Exit heads with attention of their own (Kangaroo's adapters) kept in sync: (the step
    /// of the stream each reads, its attention step). A call that computes the stream also
    /// runs the attention, so the head's KV slot holds every position the layers below it
    /// hold. Every such head by default; see [`Program::sync_heads`].
    stateful_heads: Vec<(usize, usize)>,
    kv_slots: usize,
    device: Device,
    dtype: DType,
}

/// One matmul for several projections of the same input; the parts' own tensors are dropped
/// from the store's cache once fused, so peak memory stays near one copy.
fn fused(
    store: &mut dyn WeightSource,
    parts: &[&IrLinear],
    opts: &LowerOptions,
) -> Result<FusedLinear, LowerError> {
    let mut tensors = Vec::with_capacity(parts.len());
    for l in parts {
        let w = store.get(&l.weight)?;
        let b = l.bias.as_ref().map(|b| store.get(b)).transpose()?;
        tensors.push((w, b));
    }
    if !opts.fuse_projections {
        return Ok(FusedLinear::separate(tensors));
    }
    let f = FusedLinear::new(tensors).map_err(|cause| LowerError::Build {
        node: parts
            .iter()
            .map(|l| l.weight.to_string())
            .collect::<Vec<_>>()
            .join(" + "),
        cause,
    })?;
    for l in parts {
        store.forget(&l.weight);
        if let Some(b) = &l.bias {
            store.forget(b);
        }
    }
    Ok(f)
}

/// The kernel of attention op `a` of node `node`; `rope_ids` numbers the distinct rotary
/// settings, so attention steps with the same ones share their tables in a call.
fn attention_kernel(
    node: &str,
    a: &exitgraph_ir::op::Attention,
    store: &mut dyn WeightSource,
    rope_ids: &mut Vec<(exitgraph_ir::op::Rope, usize)>,
    device: &Device,
    opts: &LowerOptions,
) -> Result<Arc<AttentionKernel>, LowerError> {
    let rope = match &a.rope {
        Some(r) => {
            let id = match rope_ids.iter().find(|(x, _)| x == r) {
                Some((_, id)) => *id,
                None => {
                    rope_ids.push((r.clone(), rope_ids.len()));
                    rope_ids.len() - 1
                }
            };
            let kernel = RopeKernel::new(r, device).map_err(|cause| LowerError::Build {
                node: node.to_string(),
                cause,
            })?;
            Some((id, kernel))
        }
        None => None,
    };
    Ok(Arc::new(AttentionKernel {
        qkv: fused(store, &[&a.q, &a.k, &a.v], opts)?,
        o: linear(store, &a.o, opts)?,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        scale: a.scale,
        causal: a.causal,
        window: a.sliding_window,
        rope,
        differentiable: opts.differentiable,
    }))
}

/// A projection's weights: the source's own tensors for training, laid out for inference
/// otherwise ([`Dense::inference`]).
fn linear(
    store: &mut dyn WeightSource,
    l: &IrLinear,
    opts: &LowerOptions,
) -> Result<Dense, LowerError> {
    let w = store.get(&l.weight)?;
    let b = match &l.bias {
        Some(b) => Some(store.get(b)?),
        None => None,
    };
    if opts.differentiable {
        Ok(Dense::source(w, b))
    } else {
        Dense::inference(w, b).map_err(|cause| LowerError::Build {
            node: l.weight.to_string(),
            cause,
        })
    }
}

/// The adapters of an op's projections, lowered (kept low-rank).
/// Each adapter is lowered once (`built`, by its two weights): places that share one (a
/// GemFilter select step and its layer's attention) share its tensors.
fn adapters(
    store: &mut dyn WeightSource,
    op: &Op,
    opts: &LowerOptions,
    built: &mut HashMap<(WeightRef, WeightRef), Lora>,
) -> Result<Vec<Option<Lora>>, LowerError> {
    op.linears()
        .into_iter()
        .map(|l| {
            l.adapter
                .as_ref()
                .map(|a| {
                    let key = (a.a.clone(), a.b.clone());
                    if let Some(lora) = built.get(&key) {
                        if lora.scale == a.scale {
                            return Ok(lora.clone());
                        }
                    }
                    let (down, up) = (store.get(&a.a)?, store.get(&a.b)?);
                    let lora = if opts.differentiable {
                        Lora::new(down, up, a.scale)
                    } else {
                        Lora::inference(down, up, a.scale).map_err(|cause| LowerError::Build {
                            node: a.a.to_string(),
                            cause,
                        })?
                    };
                    built.insert(key, lora.clone());
                    Ok(lora)
                })
                .transpose()
        })
        .collect()
}

/// Kernels built so far, by the stored weights they hold (ops without adapters).
#[derive(Default)]
struct KernelCache(HashMap<Vec<WeightRef>, Vec<(Op, Kernel)>>);

impl KernelCache {
    fn get(&self, base: &Op) -> Option<Kernel> {
        let key = Self::key(base);
        self.0
            .get(&key)?
            .iter()
            .find(|(op, _)| op == base)
            .map(|(_, k)| k.clone())
    }

    fn insert(&mut self, base: Op, kernel: Kernel) {
        self.0
            .entry(Self::key(&base))
            .or_default()
            .push((base, kernel));
    }

    fn key(base: &Op) -> Vec<WeightRef> {
        base.weights().into_iter().map(|(_, w)| w.clone()).collect()
    }
}

/// How a graph is lowered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowerOptions {
    /// Stack q/k/v and gate/up weights into one matmul each (inference).
    pub fuse_projections: bool,
    /// Use ops that have gradients (unfused norms, softmax and RoPE) so the program can be
    /// trained; the fused kernels cut the gradient.
    pub differentiable: bool,
}

impl LowerOptions {
    /// Fastest inference.
    pub fn inference() -> Self {
        LowerOptions {
            fuse_projections: true,
            differentiable: false,
        }
    }

    /// Gradients flow to every weight; weights stay the source's own tensors, so an
    /// optimizer's in-place update is seen by the next call.
    pub fn training() -> Self {
        LowerOptions {
            fuse_projections: false,
            differentiable: true,
        }
    }
}

impl Program {
    /// Lowers `graph` for inference, reading weights from the checkpoint folder `root`.
    pub fn lower(
        graph: &Graph,
        root: &Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Program, LowerError> {
        let mut store = WeightStore::open(&graph.weights, root, device, dtype)?;
        Program::lower_with(graph, &mut store, device, dtype, LowerOptions::inference())
    }

    /// Lowers `graph` with weights from any source.
    pub fn lower_with(
        graph: &Graph,
        store: &mut dyn WeightSource,
        device: &Device,
        dtype: DType,
        opts: LowerOptions,
    ) -> Result<Program, LowerError> {
        exitgraph_ir::verify(graph)?;
        let order = graph
            .topo_order()
            .map_err(|_| LowerError::Invalid(exitgraph_ir::VerifyError(Vec::new())))?;
        let mut node_step: HashMap<NodeIndex, usize> = HashMap::new();
        let mut steps = Vec::with_capacity(order.len());
        let mut rope_ids: Vec<(exitgraph_ir::op::Rope, usize)> = Vec::new();
        let mut kernels = KernelCache::default();
        // Weights an embedding reads: an LM head reading one of them is tied to it.
        let tied: std::collections::HashSet<WeightRef> = graph
            .graph
            .node_weights()
            .filter_map(|n| match &n.op {
                Op::Embedding(e) => Some(e.tokens.clone()),
                _ => None,
            })
            .collect();
        let mut loras: HashMap<(WeightRef, WeightRef), Lora> = HashMap::new();
        for n in order {
            let node = &graph.graph[n];
            let build = |cause| LowerError::Build {
                node: node.name.clone(),
                cause,
            };
            let base = node.op.without_adapters();
            let kernel = match kernels.get(&base) {
                Some(k) => k,
                None => {
                    let k = match &base {
                        Op::TokenInput => Kernel::Input,
                        Op::Embedding(e) => Kernel::Embedding(Arc::new(EmbeddingKernel {
                            tokens: store.get(&e.tokens)?,
                            hidden: e.hidden,
                            positions: e.positions.as_ref().map(|p| store.get(p)).transpose()?,
                            token_types: e
                                .token_types
                                .as_ref()
                                .map(|t| store.get(t))
                                .transpose()?,
                        })),
                        Op::Norm(nm) => {
                            let weight = store.get(&nm.weight)?;
                            let bias = match &nm.bias {
                                Some(b) => store.get(b)?,
                                None => weight.zeros_like().map_err(build)?,
                            };
                            Kernel::Norm(Arc::new(NormKernel {
                                kind: nm.kind,
                                weight,
                                bias,
                                stored_bias: nm.bias.is_some(),
                                eps: nm.eps as f32,
                                differentiable: opts.differentiable,
                            }))
                        }
                        Op::Attention(a) => Kernel::Attention(attention_kernel(
                            &node.name,
                            a,
                            store,
                            &mut rope_ids,
                            device,
                            &opts,
                        )?),
                        Op::QueryKeyScores(a) => {
                            // The layer's own attention kernel: its weights are lowered once
                            // (and kept as the attention step's, whichever comes first).
                            let attention = Op::Attention(a.clone());
                            let k = match kernels.get(&attention) {
                                Some(Kernel::Attention(k)) => k,
                                _ => {
                                    let k = attention_kernel(
                                        &node.name,
                                        a,
                                        store,
                                        &mut rope_ids,
                                        device,
                                        &opts,
                                    )?;
                                    kernels.insert(attention, Kernel::Attention(k.clone()));
                                    k
                                }
                            };
                            Kernel::Scores(k)
                        }
                        Op::Mlp(m) => Kernel::Mlp(Arc::new(MlpKernel {
                            act: m.act,
                            input: match &m.gate {
                                Some(g) => MlpIn::Gated(fused(store, &[g, &m.up], &opts)?),
                                None => MlpIn::Plain(linear(store, &m.up, &opts)?),
                            },
                            down: linear(store, &m.down, &opts)?,
                        })),
                        Op::Add => Kernel::Add,
                        // A head tied to the embedding keeps the embedding's tensor (one
                        // copy of the matrix, as `weight_bytes` counts it).
                        Op::LmHead(l) if tied.contains(&l.weight) => {
                            let w = store.get(&l.weight)?;
                            let b = l.bias.as_ref().map(|b| store.get(b)).transpose()?;
                            Kernel::LmHead(Arc::new(Dense::source(w, b)))
                        }
                        Op::LmHead(l) => Kernel::LmHead(Arc::new(linear(store, l, &opts)?)),
                        Op::Pool(p) => Kernel::Pool(PoolKernel {
                            mode: p.mode,
                            normalize: p.normalize,
                        }),
                    };
                    kernels.insert(base, k.clone());
                    k
                }
            };
            let slot = match (&kernel, node.layer) {
                (Kernel::Attention(_), Some(d)) => graph.blocks.get(d).and_then(|b| b.kv_slot),
                // An exit head's own attention (Kangaroo's adapter) has the exit's slot.
                (Kernel::Attention(_), None) => graph
                    .exits
                    .iter()
                    .find(|e| e.nodes.contains(&n))
                    .and_then(|e| e.kv_slot),
                _ => None,
            };
            let inputs = graph.inputs(n).iter().map(|i| node_step[i]).collect();
            node_step.insert(n, steps.len());
            steps.push(Step {
                name: node.name.clone(),
                layer: node.layer,
                kernel,
                inputs,
                slot,
                adapters: adapters(store, &node.op, &opts, &mut loras)?,
            });
        }
        let outputs = graph
            .outputs
            .iter()
            .map(|(name, n)| (name.clone(), node_step[n]))
            .collect();
        let stateful_heads = graph
            .exits
            .iter()
            .filter(|e| e.kv_slot.is_some())
            .filter_map(|e| {
                let attention = e
                    .nodes
                    .iter()
                    .find(|n| matches!(graph.graph[**n].op, Op::Attention(_)))?;
                Some((node_step[&e.reads], node_step[attention]))
            })
            .collect();
        Ok(Program {
            graph: graph.clone(),
            steps,
            node_step,
            outputs,
            stateful_heads,
            kv_slots: graph.kv_slots(),
            device: device.clone(),
            dtype,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The same program keeping only the stateful exit heads after `depths` in sync (see
    /// [`Exit::kv_slot`](exitgraph_ir::Exit::kv_slot)). The others then run only when an
    /// output needs them, so a caller that drafts with none of them (the full model, say)
    /// does not pay for their attention; their slots are not kept whole, and a later call
    /// that continues one from a cache fails with the slot's length named.
    pub fn sync_heads(&self, depths: &[usize]) -> Program {
        let mut p = self.clone();
        p.stateful_heads = self
            .graph
            .exits
            .iter()
            .filter(|e| e.kv_slot.is_some() && depths.contains(&e.after))
            .filter_map(|e| {
                let attention = e
                    .nodes
                    .iter()
                    .find(|n| matches!(self.graph.graph[**n].op, Op::Attention(_)))?;
                Some((self.node_step[&e.reads], self.node_step[attention]))
            })
            .collect();
        p
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of the weights the program holds, each materialised tensor counted once however
    /// many places use it (tied embeddings, layers sharing a weight identity), adapters
    /// included.
    pub fn weight_bytes(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut bytes = 0;
        for step in &self.steps {
            let own = step.adapters.iter().flatten().flat_map(Lora::tensors);
            for t in step.kernel.tensors().into_iter().chain(own) {
                if seen.insert(t.id()) {
                    bytes += t.elem_count() * t.dtype().size_in_bytes();
                }
            }
        }
        bytes
    }

    /// Number of distinct kernels with weights (each materialised once).
    pub fn weight_kernels(&self) -> usize {
        let mut seen = BTreeSet::new();
        for step in &self.steps {
            let id = match &step.kernel {
                Kernel::Embedding(k) => Arc::as_ptr(k) as *const u8,
                Kernel::Norm(k) => Arc::as_ptr(k) as *const u8,
                Kernel::Attention(k) => Arc::as_ptr(k) as *const u8,
                Kernel::Mlp(k) => Arc::as_ptr(k) as *const u8,
                Kernel::LmHead(k) => Arc::as_ptr(k) as *const u8,
                Kernel::Input | Kernel::Add | Kernel::Pool(_) | Kernel::Scores(_) => continue,
            };
            seen.insert(id as usize);
        }
        seen.len()
    }

    /// The input values of step `i`. Steps run in topological order and a value is freed
    /// only after its last reader, so every input is present; the check guards that.
    fn step_args<'v>(
        &self,
        i: usize,
        values: &'v [Option<Tensor>],
    ) -> Result<Vec<&'v Tensor>, RunError> {
        let step = &self.steps[i];
        step.inputs
            .iter()
            .map(|&j| {
                values[j].as_ref().ok_or_else(|| RunError::Step {
                    step: step.name.clone(),
                    cause: candle_core::Error::Msg(format!(
                        "input {} was not computed",
                        self.steps[j].name
                    )),
                })
            })
            .collect()
    }

    /// Names of the outputs the program can produce.
    pub fn output_names(&self) -> Vec<String> {
        self.outputs.keys().cloned().collect()
    }

    /// The step computing a graph node.
    fn step_of(&self, node: NodeIndex) -> Result<usize, RunError> {
        self.node_step
            .get(&node)
            .copied()
            .ok_or_else(|| RunError::Input(format!("node {node:?} is not part of the program")))
    }

    /// The graph node of a named output (user-facing names: `forward` dumps).
    pub fn output_node(&self, name: &str) -> Result<NodeIndex, RunError> {
        self.graph
            .outputs
            .get(name)
            .copied()
            .ok_or_else(|| RunError::UnknownOutput(name.into(), self.output_names().join(", ")))
    }

    /// The model's own logits node (decoders).
    pub fn logits_node(&self) -> Result<NodeIndex, RunError> {
        self.graph
            .head
            .logits
            .ok_or_else(|| RunError::Input("the program has no LM head (an encoder?)".into()))
    }

    /// The residual stream after `k` blocks.
    pub fn stream_node(&self, k: usize) -> Result<NodeIndex, RunError> {
        self.graph.stream(k).ok_or_else(|| {
            RunError::Input(format!(
                "the program has no stream after {k} layers (it has {})",
                self.graph.blocks.len()
            ))
        })
    }

    /// An empty KV cache for this program: one slot per block with attention.
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_slots(self.kv_slots)
    }

    /// Checks token ids against the vocabulary.
    fn check_ids<'a>(&self, ids: impl IntoIterator<Item = &'a u32>) -> Result<(), RunError> {
        let vocab = self.graph.info.vocab;
        match ids.into_iter().find(|&&t| t as usize >= vocab) {
            Some(bad) => Err(RunError::Input(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            ))),
            None => Ok(()),
        }
    }
}
