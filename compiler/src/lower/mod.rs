//! Lowering a verified [`Graph`] to a [`Program`] of candle kernels, and running it.
//!
//! Steps run in the graph's topological order; each keeps its output until the last step
//! that reads it. Inference state (the KV cache) lives in a [`KvCache`] the caller owns.

mod attention;
mod fused;
mod kernels;
mod ragged;
mod rope;
mod weights;

pub use ragged::{Segment, StageOutput};
pub use rope::inv_freq;
pub use weights::{WeightLoadError, WeightSource, WeightStore};

use attention::{AttentionKernel, AttnCtx};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use exitgraph_ir::op::{Linear as IrLinear, Op};
use exitgraph_ir::{Graph, NodeIndex};
use fused::FusedLinear;
use kernels::{EmbeddingKernel, MlpIn, MlpKernel, NormKernel, PoolKernel};
use rope::RopeKernel;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

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

enum Kernel {
    Input,
    Embedding(EmbeddingKernel),
    Norm(NormKernel),
    Attention(AttentionKernel),
    Mlp(MlpKernel),
    Add,
    LmHead(Linear),
    Pool(PoolKernel),
}

struct Step {
    name: String,
    /// The transformer layer the step belongs to.
    layer: Option<usize>,
    kernel: Kernel,
    inputs: Vec<usize>,
}

/// KV cache of one batch of sequences: per attention layer, keys and values so far.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Tokens per sequence already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keys and values `[batch, kv_heads, positions, head_dim]` of attention layer `i`.
    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(i).and_then(Option::as_ref)
    }
}

/// One call's inputs.
pub struct Inputs {
    /// `[batch, seq]` token ids (u32).
    pub input_ids: Tensor,
    /// `[batch, cached + seq]`, 1 for real tokens, 0 for padding.
    pub attention_mask: Option<Tensor>,
    /// `[batch, seq]` segment ids (BERT).
    pub token_type_ids: Option<Tensor>,
}

/// A lowered graph, ready to run.
pub struct Program {
    graph: Graph,
    steps: Vec<Step>,
    outputs: BTreeMap<String, usize>,
    attention_layers: usize,
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

fn linear(store: &mut dyn WeightSource, l: &IrLinear) -> Result<Linear, WeightLoadError> {
    let w = store.get(&l.weight)?;
    let b = match &l.bias {
        Some(b) => Some(store.get(b)?),
        None => None,
    };
    Ok(Linear::new(w, b))
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
        let mut index: HashMap<NodeIndex, usize> = HashMap::new();
        let mut steps = Vec::with_capacity(order.len());
        let mut rope_ids: Vec<(exitgraph_ir::op::Rope, usize)> = Vec::new();
        let mut attention_layers = 0;
        for n in order {
            let node = &graph.graph[n];
            let build = |cause| LowerError::Build {
                node: node.name.clone(),
                cause,
            };
            let kernel = match &node.op {
                Op::TokenInput => Kernel::Input,
                Op::Embedding(e) => Kernel::Embedding(EmbeddingKernel {
                    tokens: store.get(&e.tokens)?,
                    hidden: e.hidden,
                    positions: e.positions.as_ref().map(|p| store.get(p)).transpose()?,
                    token_types: e.token_types.as_ref().map(|t| store.get(t)).transpose()?,
                }),
                Op::Norm(nm) => {
                    let weight = store.get(&nm.weight)?;
                    let eps = nm.eps as f32;
                    let bias = match &nm.bias {
                        Some(b) => store.get(b)?,
                        None => weight.zeros_like().map_err(build)?,
                    };
                    Kernel::Norm(NormKernel {
                        kind: nm.kind,
                        weight,
                        bias,
                        eps,
                        differentiable: opts.differentiable,
                    })
                }
                Op::Attention(a) => {
                    let rope = match &a.rope {
                        Some(r) => {
                            let id = match rope_ids.iter().find(|(x, _)| x == r) {
                                Some((_, id)) => *id,
                                None => {
                                    rope_ids.push((r.clone(), rope_ids.len()));
                                    rope_ids.len() - 1
                                }
                            };
                            Some((id, RopeKernel::new(r, device).map_err(build)?))
                        }
                        None => None,
                    };
                    attention_layers += 1;
                    Kernel::Attention(AttentionKernel {
                        qkv: fused(store, &[&a.q, &a.k, &a.v], &opts)?,
                        o: linear(store, &a.o)?,
                        heads: a.heads,
                        kv_heads: a.kv_heads,
                        head_dim: a.head_dim,
                        scale: a.scale,
                        causal: a.causal,
                        window: a.sliding_window,
                        rope,
                        slot: attention_layers - 1,
                        differentiable: opts.differentiable,
                    })
                }
                Op::Mlp(m) => Kernel::Mlp(MlpKernel {
                    act: m.act,
                    input: match &m.gate {
                        Some(g) => MlpIn::Gated(fused(store, &[g, &m.up], &opts)?),
                        None => MlpIn::Plain(linear(store, &m.up)?),
                    },
                    down: linear(store, &m.down)?,
                }),
                Op::Add => Kernel::Add,
                Op::LmHead(l) => Kernel::LmHead(linear(store, l)?),
                Op::Pool(p) => Kernel::Pool(PoolKernel {
                    mode: p.mode,
                    normalize: p.normalize,
                }),
            };
            let inputs = graph.inputs(n).iter().map(|i| index[i]).collect();
            index.insert(n, steps.len());
            steps.push(Step {
                name: node.name.clone(),
                layer: node.layer,
                kernel,
                inputs,
            });
        }
        let outputs = graph
            .outputs
            .iter()
            .map(|(name, n)| (name.clone(), index[n]))
            .collect();
        Ok(Program {
            graph: graph.clone(),
            steps,
            outputs,
            attention_layers,
            device: device.clone(),
            dtype,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
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

    /// An empty KV cache for this program.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.attention_layers],
            len: 0,
        }
    }

    /// Runs the steps the wanted outputs need. With `last_logits_only`, the LM head sees only
    /// each sequence's last position (decoding needs no more).
    pub fn forward(
        &self,
        inputs: &Inputs,
        cache: &mut KvCache,
        want: &[&str],
        last_logits_only: bool,
    ) -> Result<BTreeMap<String, Tensor>, RunError> {
        self.forward_from(inputs, cache, None, want, last_logits_only)
    }

    /// [`Program::forward`] starting, when `entry` is `(k, h)`, from the residual stream
    /// `h: [batch, seq, hidden]` after `k` layers (`hidden_states.k`) instead of the token
    /// ids: layers before `k` do not run. Staged encoders (per-sample exits) use it.
    pub fn forward_from(
        &self,
        inputs: &Inputs,
        cache: &mut KvCache,
        entry: Option<(usize, &Tensor)>,
        want: &[&str],
        last_logits_only: bool,
    ) -> Result<BTreeMap<String, Tensor>, RunError> {
        let (batch, seq) = inputs
            .input_ids
            .dims2()
            .map_err(|e| RunError::Input(format!("input_ids must be [batch, seq]: {e}")))?;
        if seq == 0 {
            return Err(RunError::Input("input_ids has no tokens".into()));
        }
        let max_id = inputs
            .input_ids
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::U32))
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<u32>())
            .map_err(|e| RunError::Input(format!("input_ids: {e}")))?;
        if max_id as usize >= self.graph.info.vocab {
            return Err(RunError::Input(format!(
                "token id {max_id} is outside the vocabulary (size {})",
                self.graph.info.vocab
            )));
        }
        let start = cache.len;
        if let Some(m) = &inputs.attention_mask {
            if m.dims() != [batch, start + seq] {
                return Err(RunError::Input(format!(
                    "attention_mask has shape {:?}, expected [{batch}, {}]",
                    m.dims(),
                    start + seq
                )));
            }
        }
        if let Some(t) = &inputs.token_type_ids {
            if t.dims() != [batch, seq] {
                return Err(RunError::Input(format!(
                    "token_type_ids has shape {:?}, expected [{batch}, {seq}]",
                    t.dims()
                )));
            }
        }
        let mut targets = Vec::with_capacity(want.len());
        for w in want {
            match self.outputs.get(*w) {
                Some(&i) => targets.push(i),
                None => {
                    return Err(RunError::UnknownOutput(
                        w.to_string(),
                        self.output_names().join(", "),
                    ))
                }
            }
        }
        let mut values: Vec<Option<Tensor>> = vec![None; self.steps.len()];
        let entry_step = match entry {
            Some((k, h)) => {
                let name = format!("hidden_states.{k}");
                let i = *self.outputs.get(&name).ok_or_else(|| {
                    RunError::UnknownOutput(name.clone(), self.output_names().join(", "))
                })?;
                values[i] = Some(h.clone());
                Some(i)
            }
            None => None,
        };
        // Steps needed, and the last step reading each value.
        let mut needed = BTreeSet::new();
        let mut stack = targets.clone();
        while let Some(i) = stack.pop() {
            if Some(i) == entry_step {
                continue;
            }
            if needed.insert(i) {
                stack.extend(self.steps[i].inputs.iter().copied());
            }
        }
        let mut last_use = vec![0usize; self.steps.len()];
        for &i in &needed {
            for &j in &self.steps[i].inputs {
                last_use[j] = last_use[j].max(i);
            }
        }
        for &t in &targets {
            last_use[t] = usize::MAX;
        }
        if let Some(e) = entry_step {
            last_use[e] = last_use[e].max(usize::MAX - 1);
        }
        let key_mask = inputs
            .attention_mask
            .as_ref()
            .map(|m| m.to_dtype(DType::F32))
            .transpose()
            .map_err(|e| RunError::Input(format!("attention_mask: {e}")))?;
        let query_mask = match &key_mask {
            Some(m) => Some(
                m.narrow(1, start, seq)
                    .map_err(|e| RunError::Input(e.to_string()))?,
            ),
            None => None,
        };
        let mut ctx = AttnCtx::new(start, seq, key_mask);
        for &i in &needed {
            let step = &self.steps[i];
            let wrap = |cause| RunError::Step {
                step: step.name.clone(),
                cause,
            };
            let args = self.step_args(i, &values)?;
            let arg = |k: usize| args[k];
            let out = match &step.kernel {
                Kernel::Input => Ok(inputs.input_ids.clone()),
                Kernel::Embedding(e) => e.forward(arg(0), start, inputs.token_type_ids.as_ref()),
                Kernel::Norm(n) => n.forward(arg(0)),
                Kernel::Attention(a) => a.forward(arg(0), &mut ctx, &mut cache.layers[a.slot]),
                Kernel::Mlp(m) => m.forward(arg(0)),
                Kernel::Add => arg(0) + arg(1),
                Kernel::LmHead(l) => {
                    let x = arg(0);
                    if last_logits_only && seq > 1 {
                        x.narrow(1, seq - 1, 1).and_then(|x| l.forward(&x))
                    } else {
                        l.forward(x)
                    }
                }
                Kernel::Pool(p) => p.forward(arg(0), query_mask.as_ref()),
            }
            .map_err(wrap)?;
            values[i] = Some(out);
            for &j in &step.inputs {
                if last_use[j] == i {
                    values[j] = None;
                }
            }
        }
        cache.len = start + seq;
        let mut out = BTreeMap::new();
        for (w, t) in want.iter().zip(targets) {
            if let Some(v) = &values[t] {
                out.insert(w.to_string(), v.clone());
            }
        }
        Ok(out)
    }
}
