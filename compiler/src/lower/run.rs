//! The one entry point for ragged execution: [`Program::run`].
//!
//! A call runs several *segments* (sequences) side by side as one `[1, total, hidden]`
//! stream: token-wise ops (embedding, norms, projections, MLP, heads) see every token at
//! once; attention runs per segment on its own cache slot and positions, so each segment's
//! result is exactly its unbatched one. A segment says its new tokens, the position of the
//! first, its cache and, when the call enters after block 0, its entry state. The [`Run`]
//! says the depth entered at, what to compute ([`Task`]) and whether the caches commit the
//! new positions. Generation, depth-wise stages, exit heads, SkipDecode paths and CALM's
//! state copying are all calls of this one function.

use super::adapter::{project, Adapters};
use super::attention::{AttnCtx, RaggedPart};
use super::{Kernel, KvCache, Program, RunError};
use candle_core::Tensor;
use exitgraph_ir::NodeIndex;

/// Which positions of an output a call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// Each segment's last new token (a head then computes only those rows).
    Last,
    /// Every new token.
    All,
}

/// One output of a call: a graph node's value at some positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    pub node: NodeIndex,
    pub at: Positions,
}

impl Want {
    pub fn last(node: NodeIndex) -> Self {
        Want {
            node,
            at: Positions::Last,
        }
    }

    pub fn all(node: NodeIndex) -> Self {
        Want {
            node,
            at: Positions::All,
        }
    }
}

/// What a call computes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Task {
    /// These outputs (and the attention they need, appending keys and values).
    Outputs(Vec<Want>),
    /// Keys and values of every block from the entry depth on, computed from the entry
    /// state without attending (CALM's state copying for a token that exited early).
    FillKv,
    /// No keys and values at all in the blocks from the entry depth on: the new positions
    /// are counted there as absent, and later tokens attend in those blocks only to the
    /// positions present (a token that exited early, its skipped layers' keys and values
    /// absent, as in Mixture-of-Recursions' recursion-wise caching). Computes nothing;
    /// needs no entry state.
    AbsentKv,
}

/// How a call runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// Blocks before this depth do not run: segments bring the residual stream after them.
    pub from: usize,
    pub task: Task,
    /// Whether each cache commits the segment's positions (`len = start + tokens`).
    pub commit: bool,
}

impl Run {
    /// The outputs `want`, from the tokens.
    pub fn outputs(want: Vec<Want>) -> Self {
        Run {
            from: 0,
            task: Task::Outputs(want),
            commit: true,
        }
    }
}

/// One sequence's part of a call.
pub struct Segment<'a> {
    /// The new tokens (their count and positions; from depth 0, their embeddings).
    pub ids: &'a [u32],
    /// Position of `ids[0]`.
    pub start: usize,
    /// The residual stream `[tokens, hidden]` at the entry depth, when it is not 0.
    pub state: Option<Tensor>,
    pub cache: &'a mut KvCache,
}

impl<'a> Segment<'a> {
    /// New tokens after the cache's committed positions.
    pub fn new(ids: &'a [u32], cache: &'a mut KvCache) -> Self {
        Segment {
            ids,
            start: cache.len(),
            state: None,
            cache,
        }
    }

    /// The same tokens entering with a residual stream `state: [tokens, hidden]`.
    pub fn with_state(mut self, state: Tensor) -> Self {
        self.state = Some(state);
        self
    }
}

/// A segment's place in the flat stream: offset, tokens, first position.
#[derive(Clone, Copy)]
struct Span {
    offset: usize,
    len: usize,
    start: usize,
}

impl Program {
    /// Runs `segments` as `run` says. For [`Task::Outputs`], returns per segment the wanted
    /// values in order, each `[rows, width]` (1 row for [`Positions::Last`], one per new
    /// token for [`Positions::All`]); for [`Task::FillKv`] and [`Task::AbsentKv`], nothing.
    pub fn run(
        &self,
        segments: &mut [Segment<'_>],
        run: &Run,
    ) -> Result<Vec<Vec<Tensor>>, RunError> {
        if segments.is_empty() {
            return Ok(Vec::new());
        }
        let spans = self.spans(segments, run.from)?;
        let total: usize = spans.iter().map(|s| s.len).sum();
        let entry_state = if run.from > 0 && run.task != Task::AbsentKv {
            let states = segments
                .iter()
                .map(|s| s.state.clone())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    RunError::Input(format!(
                        "entering after {} layers needs every segment's state",
                        run.from
                    ))
                })?;
            Some(
                Tensor::cat(&states, 0)
                    .and_then(|t| t.unsqueeze(0))
                    .map_err(|e| RunError::Input(format!("entry states: {e}")))?,
            )
        } else {
            None
        };
        let out = match &run.task {
            Task::Outputs(want) => {
                self.run_outputs(segments, &spans, total, run.from, entry_state, want)?
            }
            Task::FillKv => {
                let x = entry_state.ok_or_else(|| {
                    RunError::Input("filling keys and values needs an entry state".into())
                })?;
                self.fill(segments, &spans, run.from, &x)?;
                Vec::new()
            }
            Task::AbsentKv => {
                self.leave_absent(segments, &spans, run.from)?;
                Vec::new()
            }
        };
        if run.commit {
            for (seg, span) in segments.iter_mut().zip(&spans) {
                seg.cache.commit(span.start + span.len);
            }
        }
        Ok(out)
    }

    /// A cache with absent positions takes one token per call, on a model without sliding
    /// windows. Checked before a call runs anything, so a refused call leaves every cache
    /// as it was.
    pub(crate) fn check_absent_call(&self, cache: &KvCache, tokens: usize) -> Result<(), RunError> {
        if !cache.has_absent() {
            return Ok(());
        }
        if tokens > 1 {
            return Err(RunError::Input(format!(
                "a cache with absent positions (tokens that left early, their skipped layers' \
                 keys and values absent) takes one token per call; this call brings {tokens}"
            )));
        }
        if self.has_sliding_window() {
            return Err(RunError::Input(
                "a cache with absent positions (tokens that left early, their skipped layers' \
                 keys and values absent) cannot serve sliding-window attention, which counts \
                 positions"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether any attention of the graph attends within a sliding window.
    fn has_sliding_window(&self) -> bool {
        self.graph.graph.node_weights().any(
            |n| matches!(&n.op, exitgraph_ir::op::Op::Attention(a) if a.sliding_window.is_some()),
        )
    }

    /// Checks the segments and lays them out in the flat stream.
    fn spans(&self, segments: &[Segment<'_>], from: usize) -> Result<Vec<Span>, RunError> {
        let blocks = self.graph.blocks.len();
        if from > blocks {
            return Err(RunError::Input(format!(
                "entry depth {from} is beyond the program's {blocks} layers"
            )));
        }
        let hidden = self.graph.info.hidden;
        let mut spans = Vec::with_capacity(segments.len());
        let mut offset = 0;
        for seg in segments {
            if seg.ids.is_empty() {
                return Err(RunError::Input("a segment has no tokens".into()));
            }
            self.check_ids(seg.ids)?;
            let len = seg.ids.len();
            self.check_absent_call(seg.cache, seg.ids.len())?;
            if let (true, Some(s)) = (from > 0, &seg.state) {
                if s.dims() != [len, hidden] {
                    return Err(RunError::Input(format!(
                        "entry state of shape {:?} for {len} tokens of width {hidden}",
                        s.dims()
                    )));
                }
            }
            spans.push(Span {
                offset,
                len,
                start: seg.start,
            });
            offset += len;
        }
        Ok(spans)
    }

    /// Each segment's attention context and cache slot for one attention step.
    fn parts<'s>(
        segments: &'s mut [Segment<'_>],
        spans: &[Span],
        contexts: &'s mut [AttnCtx],
        slot: usize,
    ) -> Result<Vec<RaggedPart<'s>>, candle_core::Error> {
        segments
            .iter_mut()
            .zip(spans)
            .zip(contexts.iter_mut())
            .map(|((seg, sp), ctx)| Ok((sp.offset, sp.len, ctx, seg.cache.slot_mut(slot)?)))
            .collect()
    }

    /// One attention context per segment, for every attention step of a call.
    fn contexts(spans: &[Span]) -> Vec<AttnCtx> {
        spans
            .iter()
            .map(|sp| AttnCtx::new(sp.start, sp.len, None))
            .collect()
    }

    fn run_outputs(
        &self,
        segments: &mut [Segment<'_>],
        spans: &[Span],
        total: usize,
        from: usize,
        entry_state: Option<Tensor>,
        want: &[Want],
    ) -> Result<Vec<Vec<Tensor>>, RunError> {
        let targets = want
            .iter()
            .map(|w| self.step_of(w.node))
            .collect::<Result<Vec<_>, _>>()?;
        let mut values: Vec<Option<Tensor>> = vec![None; self.steps.len()];
        let mut given = Vec::new();
        if let Some(x) = entry_state {
            let i = self.step_of(self.stream_node(from)?)?;
            values[i] = Some(x);
            given.push(i);
        }
        let plan = self.schedule_call(&targets, &given);
        // Nothing below the entry depth may run: the outputs must be reachable from it.
        if let Some(&bad) = plan.needed.iter().find(|&&i| {
            let s = &self.steps[i];
            from > 0 && (s.layer.is_some_and(|l| l < from) || matches!(s.kernel, Kernel::Input))
        }) {
            return Err(RunError::Input(format!(
                "{} runs before the entry depth {from}: an output needs layers the call skips",
                self.steps[bad].name
            )));
        }
        // Heads wanted (and read by nothing else) only at the last positions compute only
        // those rows.
        let last_rows: Vec<bool> = (0..self.steps.len())
            .map(|i| {
                let wanted: Vec<&Want> = want
                    .iter()
                    .zip(&targets)
                    .filter(|(_, &t)| t == i)
                    .map(|(w, _)| w)
                    .collect();
                matches!(self.steps[i].kernel, Kernel::LmHead(_) | Kernel::Pool(_))
                    && !wanted.is_empty()
                    && wanted.iter().all(|w| w.at == Positions::Last)
                    && !plan
                        .needed
                        .iter()
                        .any(|&j| self.steps[j].inputs.contains(&i))
            })
            .collect();
        let flat: Vec<u32> = segments
            .iter()
            .flat_map(|s| s.ids.iter().copied())
            .collect();
        let positions: Vec<u32> = spans
            .iter()
            .flat_map(|s| (s.start..s.start + s.len).map(|p| p as u32))
            .collect();
        let last_tokens: Vec<u32> = spans
            .iter()
            .map(|s| (s.offset + s.len - 1) as u32)
            .collect();
        let mut contexts = Self::contexts(spans);
        for &i in &plan.needed {
            let step = &self.steps[i];
            let wrap = |cause| RunError::Step {
                step: step.name.clone(),
                cause,
            };
            let args = self.step_args(i, &values)?;
            let lora = step.adapters.first().and_then(Option::as_ref);
            let out = match &step.kernel {
                Kernel::Input => Tensor::from_vec(flat.clone(), (1, total), &self.device),
                Kernel::Embedding(e) => e.forward_positions(args[0], &positions),
                Kernel::Norm(n) => n.forward(args[0]),
                Kernel::Mlp(m) => m.forward(args[0], Adapters::Uniform(&step.adapters)),
                Kernel::Add => args[0] + args[1],
                Kernel::Attention(a) => step.slot().and_then(|slot| {
                    let mut parts = Self::parts(segments, spans, &mut contexts, slot)?;
                    a.forward_ragged(args[0], &mut parts, Adapters::Uniform(&step.adapters))
                }),
                Kernel::Scores(a) => {
                    let parts: Vec<(usize, usize, usize)> =
                        spans.iter().map(|s| (s.offset, s.len, s.start)).collect();
                    a.last_query_scores_ragged(args[0], &parts, Adapters::Uniform(&step.adapters))
                }
                Kernel::LmHead(l) if last_rows[i] => {
                    Tensor::new(last_tokens.as_slice(), &self.device)
                        .and_then(|idx| args[0].index_select(&idx, 1))
                        .and_then(|x| project(l, lora, &x))
                }
                Kernel::LmHead(l) => project(l, lora, args[0]),
                Kernel::Pool(p) => spans
                    .iter()
                    .map(|s| {
                        args[0]
                            .narrow(1, s.offset, s.len)
                            .and_then(|x| p.forward(&x, None))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .and_then(|rows| Tensor::cat(&rows, 0))
                    .and_then(|t| t.unsqueeze(0)),
            }
            .map_err(wrap)?;
            values[i] = Some(out);
            for &j in &step.inputs {
                if plan.frees(j, i) {
                    values[j] = None;
                }
            }
        }
        let mut out: Vec<Vec<Tensor>> = vec![Vec::with_capacity(want.len()); spans.len()];
        for (w, &t) in want.iter().zip(&targets) {
            let v = values[t].as_ref().ok_or_else(|| {
                RunError::Input(format!("{} was not computed", self.steps[t].name))
            })?;
            let pooled = matches!(self.steps[t].kernel, Kernel::Pool(_));
            for (s, sp) in spans.iter().enumerate() {
                let rows = if last_rows[t] || pooled {
                    // One row per segment; for Pool at every position, the same vector.
                    v.get(0).and_then(|v| v.narrow(0, s, 1))
                } else {
                    match w.at {
                        Positions::Last => v
                            .get(0)
                            .and_then(|v| v.narrow(0, sp.offset + sp.len - 1, 1)),
                        Positions::All => v.get(0).and_then(|v| v.narrow(0, sp.offset, sp.len)),
                    }
                };
                out[s].push(rows.map_err(|e| RunError::Input(e.to_string()))?);
            }
        }
        Ok(out)
    }

    /// CALM's state copying: keys and values of every attention block at depth `from` or
    /// deeper, computed from the entry state `x: [1, total, hidden]` through the norm before
    /// each attention, appended to each segment's slot.
    fn fill(
        &self,
        segments: &mut [Segment<'_>],
        spans: &[Span],
        from: usize,
        x: &Tensor,
    ) -> Result<(), RunError> {
        let mut contexts = Self::contexts(spans);
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
            let normed = match input.map(|s| (&s.kernel, s)) {
                Some((Kernel::Norm(n), _)) => n.forward(x).map_err(wrap)?,
                _ => {
                    return Err(RunError::Input(format!(
                        "{}: state copying needs the attention input to be a norm of the residual stream",
                        step.name
                    )))
                }
            };
            step.slot()
                .and_then(|slot| {
                    let mut parts = Self::parts(segments, spans, &mut contexts, slot)?;
                    a.append_kv_ragged(&normed, &mut parts, Adapters::Uniform(&step.adapters))
                })
                .map_err(wrap)?;
        }
        Ok(())
    }

    /// Counts each segment's new positions as absent in every attention slot of a block at
    /// depth `from` or deeper. Every slot is checked first, so a refused call changes none.
    fn leave_absent(
        &self,
        segments: &mut [Segment<'_>],
        spans: &[Span],
        from: usize,
    ) -> Result<(), RunError> {
        let mut slots = Vec::new();
        for step in &self.steps {
            if !matches!(step.kernel, Kernel::Attention(_)) || step.layer.is_none_or(|l| l < from) {
                continue;
            }
            let wrap = |cause| RunError::Step {
                step: step.name.clone(),
                cause,
            };
            let slot = step.slot().map_err(wrap)?;
            for (seg, sp) in segments.iter().zip(spans) {
                seg.cache
                    .check_absent(slot, sp.start)
                    .map_err(|cause| RunError::Step {
                        step: step.name.clone(),
                        cause,
                    })?;
            }
            slots.push(slot);
        }
        for slot in slots {
            for (seg, sp) in segments.iter_mut().zip(spans) {
                seg.cache.leave_absent(slot, sp.len);
            }
        }
        Ok(())
    }
}
