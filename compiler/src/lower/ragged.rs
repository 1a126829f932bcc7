//! Ragged batches: several sequences of different lengths, each at its own position with its
//! own KV cache, in one call. Token-wise ops (embedding, norms, projections, MLP, LM head)
//! run on every token at once; attention runs per sequence, so each sequence's result is
//! exactly its unbatched one. This is what the runtime's batching policies execute.
//!
//! A call can also run only a range of layers (a *stage*): the first stage starts from token
//! ids, a later one from the hidden states the previous stage returned, and only the last
//! stage produces logits and advances the caches' lengths. Running the stages in order gives
//! exactly the full call.

use super::attention::AttnCtx;
use super::{Kernel, KvCache, Program, RunError};
use candle_core::{Module, Tensor};
use std::collections::BTreeSet;
use std::ops::Range;

/// One sequence's part of a ragged batch: its new tokens and its cache.
pub struct Segment<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// What a stage returns per sequence.
#[derive(Clone, Debug)]
pub enum StageOutput {
    /// Hidden states `[new tokens, hidden]` after the stage's last layer.
    Hidden(Vec<Tensor>),
    /// Logits `[vocab]` at each sequence's last new token (the last stage).
    Logits(Vec<Tensor>),
}

impl Program {
    /// Runs each segment's new tokens after its cached ones; returns each segment's logits at
    /// its last new token (`[vocab]`, in the program's dtype).
    pub fn forward_ragged(&self, segments: &mut [Segment<'_>]) -> Result<Vec<Tensor>, RunError> {
        let layers = self.graph.info.num_layers;
        match self.forward_stage(segments, 0..layers, None)? {
            StageOutput::Logits(l) => Ok(l),
            StageOutput::Hidden(_) => {
                Err(RunError::Input("the full range produced no logits".into()))
            }
        }
    }

    /// Runs layers `layers` for the segments. A range starting after layer 0 takes the
    /// previous stage's hidden states in `carried` (one `[new tokens, hidden]` per segment).
    pub fn forward_stage(
        &self,
        segments: &mut [Segment<'_>],
        layers: Range<usize>,
        carried: Option<&[Tensor]>,
    ) -> Result<StageOutput, RunError> {
        self.forward_stage_with(segments, layers, carried, &[])
            .map(|(out, _)| out)
    }

    /// [`Program::forward_stage`], also returning the named head outputs `extras` (exit heads
    /// and gates: LM-head-like outputs) at each segment's last new token: `extras[i][s]` is
    /// extra `i` of segment `s`.
    pub fn forward_stage_with(
        &self,
        segments: &mut [Segment<'_>],
        layers: Range<usize>,
        carried: Option<&[Tensor]>,
        extras: &[&str],
    ) -> Result<(StageOutput, Vec<Vec<Tensor>>), RunError> {
        if segments.is_empty() {
            let out = if layers.end >= self.graph.info.num_layers {
                StageOutput::Logits(Vec::new())
            } else {
                StageOutput::Hidden(Vec::new())
            };
            return Ok((out, vec![Vec::new(); extras.len()]));
        }
        if !self.graph.info.family.is_decoder() {
            return Err(RunError::Input("ragged batches are for decoders".into()));
        }
        let total_layers = self.graph.info.num_layers;
        if layers.start >= layers.end || layers.end > total_layers {
            return Err(RunError::Input(format!(
                "layer range {layers:?} is not within 0..{total_layers}"
            )));
        }
        let vocab = self.graph.info.vocab;
        let mut flat = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(segments.len());
        for seg in segments.iter() {
            if seg.ids.is_empty() {
                return Err(RunError::Input("a segment has no tokens".into()));
            }
            if let Some(&bad) = seg.ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(RunError::Input(format!(
                    "token id {bad} is outside the vocabulary (size {vocab})"
                )));
            }
            spans.push((flat.len(), seg.ids.len(), seg.cache.len));
            positions.extend((seg.cache.len..seg.cache.len + seg.ids.len()).map(|p| p as u32));
            flat.extend_from_slice(seg.ids);
        }
        let total = flat.len();
        let input = Tensor::from_vec(flat, (1, total), &self.device)
            .map_err(|e| RunError::Input(e.to_string()))?;
        let output = |name: &str| {
            self.outputs
                .get(name)
                .copied()
                .ok_or_else(|| RunError::UnknownOutput(name.into(), self.output_names().join(", ")))
        };
        let last = layers.end == total_layers;
        let target = if last {
            output("logits")?
        } else {
            output(&format!("hidden_states.{}", layers.end))?
        };
        let mut values: Vec<Option<Tensor>> = vec![None; self.steps.len()];
        // A later stage starts from the residual stream after `layers.start` layers.
        let entry = if layers.start > 0 {
            let entry = output(&format!("hidden_states.{}", layers.start))?;
            let carried = carried.ok_or_else(|| {
                RunError::Input(format!(
                    "layers {layers:?} need the previous stage's hidden states"
                ))
            })?;
            if carried.len() != segments.len() {
                return Err(RunError::Input(
                    "one carried hidden state per segment is needed".into(),
                ));
            }
            let joined = Tensor::cat(carried, 0)
                .and_then(|t| t.unsqueeze(0))
                .map_err(|e| RunError::Input(format!("carried hidden states: {e}")))?;
            values[entry] = Some(joined);
            Some(entry)
        } else {
            None
        };
        let mut extra_steps = Vec::with_capacity(extras.len());
        for name in extras {
            let i = output(name)?;
            if !matches!(self.steps[i].kernel, Kernel::LmHead(_)) {
                return Err(RunError::Input(format!(
                    "{name} is not a head output; a stage returns heads only"
                )));
            }
            extra_steps.push(i);
        }
        let mut needed = BTreeSet::new();
        let mut stack = vec![target];
        stack.extend(&extra_steps);
        while let Some(i) = stack.pop() {
            if Some(i) == entry {
                continue;
            }
            if needed.insert(i) {
                stack.extend(self.steps[i].inputs.iter().copied());
            }
        }
        let last_tokens: Vec<u32> = spans
            .iter()
            .map(|(off, len, _)| (off + len - 1) as u32)
            .collect();
        for &i in &needed {
            let step = &self.steps[i];
            let wrap = |cause| RunError::Step {
                step: step.name.clone(),
                cause,
            };
            let args = self.step_args(i, &values)?;
            let out = match &step.kernel {
                Kernel::Input => Ok(input.clone()),
                Kernel::Embedding(e) => e.forward_positions(args[0], &positions),
                Kernel::Norm(n) => n.forward(args[0]),
                Kernel::Mlp(m) => m.forward(args[0]),
                Kernel::Add => args[0] + args[1],
                Kernel::Attention(a) => {
                    let mut parts: Vec<_> = segments
                        .iter_mut()
                        .zip(&spans)
                        .map(|(seg, &(off, len, start))| {
                            (
                                off,
                                len,
                                AttnCtx::new(start, len, None),
                                &mut seg.cache.layers[a.slot],
                            )
                        })
                        .collect();
                    a.forward_ragged(args[0], &mut parts)
                }
                Kernel::LmHead(l) => Tensor::new(last_tokens.as_slice(), &self.device)
                    .and_then(|idx| args[0].index_select(&idx, 1))
                    .and_then(|x| l.forward(&x)),
                Kernel::Pool(_) => Err(candle_core::Error::Msg("pooling in a ragged batch".into())),
            }
            .map_err(wrap)?;
            values[i] = Some(out);
        }
        let result = values[target]
            .take()
            .ok_or_else(|| RunError::Input("the stage produced nothing".into()))?;
        let n_segments = segments.len();
        let per_segment = |t: &Tensor| {
            (0..n_segments)
                .map(|i| {
                    t.get(0)
                        .and_then(|l| l.get(i))
                        .map_err(|e| RunError::Input(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let mut extra_out = Vec::with_capacity(extra_steps.len());
        for &i in &extra_steps {
            let t = values[i].as_ref().ok_or_else(|| {
                RunError::Input(format!("{} was not computed", self.steps[i].name))
            })?;
            extra_out.push(per_segment(t)?);
        }
        let out = if last {
            for (seg, &(_, len, start)) in segments.iter_mut().zip(&spans) {
                seg.cache.len = start + len;
            }
            per_segment(&result).map(StageOutput::Logits)
        } else {
            spans
                .iter()
                .map(|&(off, len, _)| {
                    result
                        .get(0)
                        .and_then(|t| t.narrow(0, off, len))
                        .map_err(|e| RunError::Input(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(StageOutput::Hidden)
        }?;
        Ok((out, extra_out))
    }

    /// CALM's state copying: for sequences whose token exited after `from` layers, writes
    /// the keys and values of layers `from..` computed from the exit hidden states `hidden`
    /// (one `[new tokens, hidden]` per segment) into their caches, and advances the caches,
    /// so later tokens can attend at every layer.
    pub fn fill_kv(
        &self,
        segments: &mut [Segment<'_>],
        from: usize,
        hidden: &[Tensor],
    ) -> Result<(), RunError> {
        if segments.is_empty() {
            return Ok(());
        }
        if hidden.len() != segments.len() {
            return Err(RunError::Input(
                "one hidden state per segment is needed".into(),
            ));
        }
        let mut spans = Vec::with_capacity(segments.len());
        let mut offset = 0;
        for (seg, h) in segments.iter().zip(hidden) {
            let len = seg.ids.len();
            if h.dims().first() != Some(&len) {
                return Err(RunError::Input(format!(
                    "hidden state of shape {:?} for {len} tokens",
                    h.dims()
                )));
            }
            spans.push((offset, len, seg.cache.len));
            offset += len;
        }
        let x = Tensor::cat(hidden, 0)
            .and_then(|t| t.unsqueeze(0))
            .map_err(|e| RunError::Input(format!("exit hidden states: {e}")))?;
        for step in &self.steps {
            let Kernel::Attention(a) = &step.kernel else {
                continue;
            };
            if step.layer.is_none_or(|l| l < from) {
                continue;
            }
            let wrap = |cause| RunError::Step {
                step: step.name.clone(),
                cause,
            };
            let input = step.inputs.first().map(|&i| &self.steps[i]);
            let normed = match input.map(|s| &s.kernel) {
                Some(Kernel::Norm(n)) => n.forward(&x).map_err(wrap)?,
                _ => {
                    return Err(RunError::Input(format!(
                        "{}: state copying needs the attention input to be a norm of the residual stream",
                        step.name
                    )))
                }
            };
            let mut parts: Vec<_> = segments
                .iter_mut()
                .zip(&spans)
                .map(|(seg, &(off, len, start))| {
                    (
                        off,
                        len,
                        AttnCtx::new(start, len, None),
                        &mut seg.cache.layers[a.slot],
                    )
                })
                .collect();
            a.append_kv_ragged(&normed, &mut parts).map_err(wrap)?;
        }
        for (seg, &(_, len, start)) in segments.iter_mut().zip(&spans) {
            seg.cache.len = start + len;
        }
        Ok(())
    }
}
