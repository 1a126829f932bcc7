//! Padded tensor batches: `[batch, seq]` token ids with an attention mask, every row at the
//! same positions. Training, encoders and the reference checks run this way; the runtime
//! runs ragged segments ([`super::Program::run`]).

use super::adapter::Adapters;
use super::attention::AttnCtx;
use super::{Kernel, KvCache, Program, RunError};
use crate::lower::adapter::project;
use crate::op_profile::{shape, time as timed};
use candle_core::{DType, Tensor};
use exitgraph_ir::NodeIndex;
use std::collections::BTreeMap;

/// One call's inputs.
pub struct Inputs {
    /// `[batch, seq]` token ids (u32).
    pub input_ids: Tensor,
    /// `[batch, cached + seq]`, 1 for real tokens, 0 for padding.
    pub attention_mask: Option<Tensor>,
    /// `[batch, seq]` segment ids (BERT).
    pub token_type_ids: Option<Tensor>,
    /// `[batch, seq]` example index of every token (u32) of packed rows: a token attends
    /// only to tokens of its own example (the earlier ones, in a causal model), as if each
    /// example had a row of its own; positions still count along the row, so with rotary
    /// positions (relative) an example computes what it computes alone. Only from an empty
    /// cache.
    pub example_ids: Option<Tensor>,
}

impl Program {
    /// Runs the steps the named outputs need (names as users see them in `forward` dumps).
    /// With `last_logits_only`, LM heads see only each sequence's last position.
    pub fn forward(
        &self,
        inputs: &Inputs,
        cache: &mut KvCache,
        want: &[&str],
        last_logits_only: bool,
    ) -> Result<BTreeMap<String, Tensor>, RunError> {
        let nodes = want
            .iter()
            .map(|w| self.output_node(w))
            .collect::<Result<Vec<_>, _>>()?;
        let values = self.forward_nodes(inputs, cache, None, &nodes, last_logits_only)?;
        Ok(want.iter().map(|w| w.to_string()).zip(values).collect())
    }

    /// Every position's logits for `[batch, seq]` token ids, from an empty cache, no mask
    /// (training and evaluation on packed or right-padded rows).
    pub fn logits(&self, input_ids: &Tensor) -> Result<Tensor, RunError> {
        let inputs = Inputs {
            input_ids: input_ids.clone(),
            attention_mask: None,
            token_type_ids: None,
            example_ids: None,
        };
        self.forward(&inputs, &mut self.new_cache(), &["logits"], false)?
            .remove("logits")
            .ok_or_else(|| RunError::Input("the program has no logits".into()))
    }

    /// Runs the steps the graph nodes `want` need and returns their values in order. When
    /// `entry` is `(node, h)`, the value of `node` (a residual stream,
    /// `h: [batch, seq, hidden]`) is given and what only feeds it does not run: staged
    /// encoders start after their exit point this way.
    pub fn forward_nodes(
        &self,
        inputs: &Inputs,
        cache: &mut KvCache,
        entry: Option<(NodeIndex, &Tensor)>,
        want: &[NodeIndex],
        last_logits_only: bool,
    ) -> Result<Vec<Tensor>, RunError> {
        self.forward_nodes_dropping(inputs, cache, entry, want, last_logits_only, None)
    }

    /// [`Program::forward_nodes`] with layer dropout (stochastic depth, as LayerSkip trains):
    /// `keep[d]` is a `[batch]` tensor of 1 (block `d` runs for that row) or 0 (the row's
    /// residual stream passes block `d` unchanged), so block `d`'s output becomes
    /// `x + keep[d] · (block(x) − x)`. The skipped rows' compute still happens; only the
    /// result is dropped.
    pub fn forward_nodes_dropping(
        &self,
        inputs: &Inputs,
        cache: &mut KvCache,
        entry: Option<(NodeIndex, &Tensor)>,
        want: &[NodeIndex],
        last_logits_only: bool,
        keep: Option<&[Tensor]>,
    ) -> Result<Vec<Tensor>, RunError> {
        let (batch, seq) = inputs
            .input_ids
            .dims2()
            .map_err(|e| RunError::Input(format!("input_ids must be [batch, seq]: {e}")))?;
        if seq == 0 {
            return Err(RunError::Input("input_ids has no tokens".into()));
        }
        let ids = inputs
            .input_ids
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::U32))
            .and_then(|t| t.to_vec1::<u32>())
            .map_err(|e| RunError::Input(format!("input_ids: {e}")))?;
        self.check_ids(&ids)?;
        let start = cache.len();
        self.check_absent_call(cache, seq)?;
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
        let targets = want
            .iter()
            .map(|&n| self.step_of(n))
            .collect::<Result<Vec<_>, _>>()?;
        let mut values: Vec<Option<Tensor>> = vec![None; self.steps.len()];
        let mut given = Vec::new();
        if let Some((node, h)) = entry {
            let i = self.step_of(node)?;
            values[i] = Some(h.clone());
            given.push(i);
        }
        let plan = self.schedule_call(&targets, &given);
        // Callers build inputs on the host; the program may run on a GPU.
        let on_device = |t: &Tensor, what: &str| {
            t.to_device(&self.device)
                .map_err(|e| RunError::Input(format!("{what}: {e}")))
        };
        let input_ids = on_device(&inputs.input_ids, "input_ids")?;
        let token_type_ids = inputs
            .token_type_ids
            .as_ref()
            .map(|t| on_device(t, "token_type_ids"))
            .transpose()?;
        let key_mask = inputs
            .attention_mask
            .as_ref()
            .map(|m| {
                m.to_dtype(DType::F32)
                    .and_then(|m| m.to_device(&self.device))
            })
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
        if let Some(t) = &inputs.example_ids {
            if t.dims() != [batch, seq] {
                return Err(RunError::Input(format!(
                    "example_ids has shape {:?}, expected [{batch}, {seq}]",
                    t.dims()
                )));
            }
            let ids = t
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::U32))
                .and_then(|t| t.to_vec1::<u32>())
                .map_err(|e| RunError::Input(format!("example_ids: {e}")))?;
            ctx = ctx
                .with_examples(batch, ids)
                .map_err(|e| RunError::Input(e.to_string()))?;
        }
        // Layer dropout: each block's input and output steps, and the inputs kept for it.
        let mut drop_at: BTreeMap<usize, (usize, Tensor)> = BTreeMap::new();
        let mut input_of: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        if let Some(keep) = keep {
            if keep.len() != self.graph.blocks.len() {
                return Err(RunError::Input(format!(
                    "layer dropout has {} masks for {} blocks",
                    keep.len(),
                    self.graph.blocks.len()
                )));
            }
            for (d, b) in self.graph.blocks.iter().enumerate() {
                let mask = keep[d]
                    .reshape((batch, 1, 1))
                    .and_then(|m| m.to_dtype(DType::F32))
                    .and_then(|m| m.to_device(&self.device))
                    .map_err(|e| RunError::Input(format!("layer dropout mask {d}: {e}")))?;
                drop_at.insert(self.step_of(b.output)?, (d, mask));
                input_of.entry(self.step_of(b.input)?).or_default().push(d);
            }
        }
        let mut block_inputs: BTreeMap<usize, Tensor> = BTreeMap::new();
        for &i in &plan.needed {
            let step = &self.steps[i];
            let wrap = |cause| RunError::Step {
                step: step.name.clone(),
                cause,
            };
            let args = self.step_args(i, &values)?;
            let arg = |k: usize| args[k];
            let lora = |k: usize| step.adapters.get(k).and_then(Option::as_ref);
            let out = match &step.kernel {
                Kernel::Input => Ok(input_ids.clone()),
                Kernel::Embedding(e) => timed(
                    || "embedding".to_string(),
                    || e.forward(arg(0), start, token_type_ids.as_ref()),
                ),
                Kernel::Norm(n) => n.forward(arg(0)),
                Kernel::Attention(a) => step.slot().and_then(|slot| {
                    a.forward(
                        arg(0),
                        &mut ctx,
                        cache.slot_mut(slot)?,
                        Adapters::Uniform(&step.adapters),
                    )
                }),
                Kernel::Mlp(m) => m.forward(arg(0), Adapters::Uniform(&step.adapters)),
                Kernel::Add => timed(
                    || format!("residual add {}", shape(arg(0))),
                    || arg(0) + arg(1),
                ),
                Kernel::LmHead(l) => {
                    let x = arg(0);
                    if last_logits_only && seq > 1 {
                        // The last position of each sequence, as one contiguous row each.
                        x.narrow(1, seq - 1, 1)
                            .and_then(|x| x.contiguous())
                            .and_then(|x| {
                                timed(
                                    || format!("LM head {}", shape(&x)),
                                    || project(l, lora(0), &x),
                                )
                            })
                    } else {
                        timed(
                            || format!("LM head {}", shape(x)),
                            || project(l, lora(0), x),
                        )
                    }
                }
                Kernel::Pool(p) => p.forward(arg(0), query_mask.as_ref()),
                Kernel::Scores(a) => {
                    // Each row's last position is its query: rows must be unpadded.
                    let padded = match &query_mask {
                        Some(m) => m
                            .min_all()
                            .and_then(|m| m.to_scalar::<f32>())
                            .is_ok_and(|m| m < 1.0),
                        None => false,
                    };
                    if padded {
                        return Err(RunError::Input(format!(
                            "{}: GemFilter scores take each row's last position as the query, \
                             so the rows must not be padded (give prompts one at a time or as \
                             ragged segments)",
                            step.name
                        )));
                    }
                    let x = arg(0);
                    let (b, s, h) = x.dims3().map_err(wrap)?;
                    let parts: Vec<(usize, usize, usize)> =
                        (0..b).map(|i| (i * s, s, start)).collect();
                    x.reshape((1, b * s, h))
                        .and_then(|x| {
                            a.last_query_scores_ragged(
                                &x,
                                &parts,
                                Adapters::Uniform(&step.adapters),
                            )
                        })
                        .and_then(|t| t.reshape((b, s, 1)))
                }
            }
            .map_err(wrap)?;
            let out = match (drop_at.get(&i), keep) {
                (Some((d, mask)), Some(_)) => {
                    let x = block_inputs.remove(d).ok_or_else(|| {
                        RunError::Input(format!("block {d}'s input was not computed"))
                    })?;
                    let delta = (&out - &x).map_err(wrap)?;
                    (x + delta.broadcast_mul(mask).map_err(wrap)?).map_err(wrap)?
                }
                _ => out,
            };
            if let Some(blocks) = input_of.get(&i) {
                for &d in blocks {
                    block_inputs.insert(d, out.clone());
                }
            }
            values[i] = Some(out);
            for &j in &step.inputs {
                if plan.frees(j, i) {
                    values[j] = None;
                }
            }
        }
        cache.commit(start + seq);
        targets
            .iter()
            .map(|&t| {
                values[t].clone().ok_or_else(|| {
                    RunError::Input(format!("{} was not computed", self.steps[t].name))
                })
            })
            .collect()
    }
}
