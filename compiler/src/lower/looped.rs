//! Rows at different depths of a looped block in one call: [`Program::run_blocks`].
//!
//! After `TieLayers`, the blocks at the same position of every loop iteration share their
//! kernels (one weight identity); only their KV slots and adapters differ. A call here runs
//! each segment through `width` consecutive blocks starting at its own depth, and the blocks
//! the segments are at must match position by position (the same ops, reading the same
//! stream). Every op whose kernel the segments' blocks share runs once over all their rows:
//! one matmul for the shared weights, then each group of rows at the same depth adds its own
//! low-rank adapter term ([`Adapters::Grouped`]); attention runs per segment on the slot of
//! the block it is at. An op whose kernels differ (per-iteration norms, untied layers) runs
//! per group on that group's rows. Each segment's result is exactly what [`Program::run`]
//! gives it alone, entering at its depth (property-tested).

use super::adapter::{Adapters, RowGroup};
use super::attention::{AttnCtx, RaggedPart};
use super::{Kernel, Program, RunError, Step};
use super::{Run, Segment, Task, Want};
use candle_core::Tensor;

/// What one segment of [`Program::run_blocks`] returns.
#[derive(Debug)]
pub struct BlockOutput {
    /// The residual stream after the segment's last block, `[tokens, hidden]`.
    pub stream: Tensor,
    /// The stream one block below that, at the last token (`[1, hidden]`), when asked for.
    pub below: Option<Tensor>,
}

/// Where a block's step reads an input: the stream entering the block, or an earlier step of
/// the block (by position).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Entry,
    Local(usize),
}

/// One block's steps in run order, with their inputs by position.
struct Template {
    steps: Vec<usize>,
    inputs: Vec<Vec<Source>>,
}

/// Whether two steps run the same stored weights (the same kernel).
fn same_kernel(a: &Kernel, b: &Kernel) -> bool {
    use std::sync::Arc;
    match (a, b) {
        (Kernel::Norm(x), Kernel::Norm(y)) => Arc::ptr_eq(x, y),
        (Kernel::Attention(x), Kernel::Attention(y)) => Arc::ptr_eq(x, y),
        (Kernel::Mlp(x), Kernel::Mlp(y)) => Arc::ptr_eq(x, y),
        (Kernel::LmHead(x), Kernel::LmHead(y)) => Arc::ptr_eq(x, y),
        (Kernel::Add, Kernel::Add) => true,
        _ => false,
    }
}

fn kind(k: &Kernel) -> &'static str {
    match k {
        Kernel::Input => "input",
        Kernel::Embedding(_) => "embedding",
        Kernel::Norm(_) => "norm",
        Kernel::Attention(_) => "attention",
        Kernel::Mlp(_) => "mlp",
        Kernel::Add => "add",
        Kernel::LmHead(_) => "lm head",
        Kernel::Pool(_) => "pool",
        Kernel::Scores(_) => "gemfilter scores",
    }
}

impl Program {
    /// The steps of block `depth`: what computes its output from its input.
    fn template(&self, depth: usize) -> Result<Template, RunError> {
        let block = self.graph.blocks.get(depth).ok_or_else(|| {
            RunError::Input(format!(
                "there is no block at depth {depth} (the program has {})",
                self.graph.blocks.len()
            ))
        })?;
        let entry = self.step_of(block.input)?;
        let out = self.step_of(block.output)?;
        self.template_between(entry, out)
            .map_err(|e| RunError::Input(format!("block {depth}: {e}")))
    }

    /// The steps that compute step `out` from step `entry`'s value.
    fn template_between(&self, entry: usize, out: usize) -> Result<Template, RunError> {
        let steps = self.schedule(&[out], &[entry]).needed;
        let inputs = steps
            .iter()
            .map(|&i| {
                self.steps[i]
                    .inputs
                    .iter()
                    .map(|&j| match steps.iter().position(|&s| s == j) {
                        Some(p) => Ok(Source::Local(p)),
                        None if j == entry => Ok(Source::Entry),
                        None => Err(RunError::Input(format!(
                            "{} reads {}, outside its block",
                            self.steps[i].name, self.steps[j].name
                        ))),
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        if steps.last() != Some(&out) {
            return Err(RunError::Input(format!(
                "{} is not the last step computing it",
                self.steps[out].name
            )));
        }
        Ok(Template { steps, inputs })
    }

    /// Whether the templates run the same ops in the same order from the same inputs.
    fn alike(&self, templates: &[&Template]) -> bool {
        let first = templates[0];
        templates.iter().all(|t| {
            t.steps.len() == first.steps.len()
                && t.inputs == first.inputs
                && t.steps
                    .iter()
                    .zip(&first.steps)
                    .all(|(&a, &b)| kind(&self.steps[a].kernel) == kind(&self.steps[b].kernel))
        })
    }

    /// Runs alike templates position by position over `x`, whose rows are the groups' in
    /// order (`spans`: each group's rows and the segments they belong to, for attention).
    /// An op whose kernel every group shares runs once with each group's adapters; any
    /// other runs per group on its rows. Returns the last step's value.
    fn run_aligned(
        &self,
        templates: &[&Template],
        spans: &[(usize, &[usize])],
        x: &Tensor,
        segments: &mut [Segment<'_>],
    ) -> Result<Tensor, RunError> {
        let first = templates[0];
        let mut values: Vec<Option<Tensor>> = vec![None; first.steps.len()];
        for p in 0..first.steps.len() {
            let args = first.inputs[p]
                .iter()
                .map(|src| match src {
                    Source::Entry => Ok(x),
                    Source::Local(q) => values[*q].as_ref().ok_or_else(|| {
                        RunError::Input(format!("{} was not computed", self.steps[*q].name))
                    }),
                })
                .collect::<Result<Vec<&Tensor>, _>>()?;
            let steps: Vec<&Step> = templates.iter().map(|t| &self.steps[t.steps[p]]).collect();
            let wrap = |cause| RunError::Step {
                step: steps[0].name.clone(),
                cause,
            };
            let out = if steps
                .iter()
                .all(|s| same_kernel(&s.kernel, &steps[0].kernel))
            {
                let row_groups: Vec<RowGroup> = steps
                    .iter()
                    .zip(spans)
                    .map(|(s, (rows, _))| RowGroup {
                        rows: *rows,
                        adapters: &s.adapters,
                    })
                    .collect();
                let members: Vec<(usize, &Step)> = spans
                    .iter()
                    .zip(&steps)
                    .flat_map(|((_, m), s)| m.iter().map(move |&i| (i, *s)))
                    .collect();
                apply(
                    steps[0],
                    &args,
                    segments,
                    &members,
                    Adapters::Grouped(&row_groups),
                )
                .map_err(wrap)?
            } else {
                let mut outs = Vec::with_capacity(spans.len());
                let mut offset = 0;
                for ((rows, members), s) in spans.iter().zip(&steps) {
                    let part: Vec<Tensor> = args
                        .iter()
                        .map(|a| a.narrow(1, offset, *rows))
                        .collect::<Result<_, _>>()
                        .map_err(wrap)?;
                    let part: Vec<&Tensor> = part.iter().collect();
                    let members: Vec<(usize, &Step)> = members.iter().map(|&i| (i, *s)).collect();
                    outs.push(
                        apply(s, &part, segments, &members, Adapters::Uniform(&s.adapters))
                            .map_err(wrap)?,
                    );
                    offset += rows;
                }
                Tensor::cat(&outs, 1).map_err(wrap)?
            };
            values[p] = Some(out);
        }
        values
            .pop()
            .flatten()
            .ok_or_else(|| RunError::Input("a block computed nothing".into()))
    }

    /// Heads at several depths in one call: segment `i`'s last token, entering with its
    /// `state` (the residual stream the head reads: `Graph::stream(entries[i])`), through
    /// the head whose output is node `heads[i]` (the model's logits, or an exit's). Heads
    /// that share their kernels (an exit head reusing the final norm and LM head) run once
    /// over all their rows: one read of the LM head for a looped step whose rows finish at
    /// different depths. A segment with `commit[i]` commits its cache's new positions (its
    /// token ended the model). Returns each segment's head output, `[1, width]`.
    pub fn run_heads(
        &self,
        segments: &mut [Segment<'_>],
        entries: &[usize],
        heads: &[exitgraph_ir::NodeIndex],
        commit: &[bool],
    ) -> Result<Vec<Tensor>, RunError> {
        let n = segments.len();
        if entries.len() != n || heads.len() != n || commit.len() != n {
            return Err(RunError::Input(format!(
                "{n} segments with {} entry depths, {} heads and {} commit flags",
                entries.len(),
                heads.len(),
                commit.len()
            )));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let hidden = self.graph.info.hidden;
        // Segments grouped by (entry, head): rows of a group are contiguous.
        let mut keys: Vec<(usize, usize)> = Vec::with_capacity(n);
        for i in 0..n {
            keys.push((
                self.step_of(self.stream_node(entries[i])?)?,
                self.step_of(heads[i])?,
            ));
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| (keys[i], i));
        let mut rows = Vec::with_capacity(n);
        for &i in &order {
            let s = segments[i]
                .state
                .as_ref()
                .ok_or_else(|| RunError::Input("a head call needs every segment's state".into()))?;
            let len = s.dim(0).map_err(|e| RunError::Input(e.to_string()))?;
            if s.dims() != [len, hidden] || len == 0 {
                return Err(RunError::Input(format!(
                    "head entry state of shape {:?} (width {hidden} expected)",
                    s.dims()
                )));
            }
            rows.push(
                s.narrow(0, len - 1, 1)
                    .map_err(|e| RunError::Input(e.to_string()))?,
            );
        }
        let x = Tensor::cat(&rows, 0)
            .and_then(|t| t.unsqueeze(0))
            .map_err(|e| RunError::Input(format!("head states: {e}")))?;
        let mut groups: Vec<((usize, usize), usize)> = Vec::new();
        for &i in &order {
            match groups.last_mut() {
                Some((k, rows)) if *k == keys[i] => *rows += 1,
                _ => groups.push((keys[i], 1)),
            }
        }
        let owned = groups
            .iter()
            .map(|((entry, out), _)| self.template_between(*entry, *out))
            .collect::<Result<Vec<_>, _>>()?;
        let templates: Vec<&Template> = owned.iter().collect();
        let y = if self.alike(&templates) {
            let spans: Vec<(usize, &[usize])> =
                groups.iter().map(|(_, rows)| (*rows, &[][..])).collect();
            self.run_aligned(&templates, &spans, &x, segments)?
        } else {
            // Heads of different shapes (a trained head beside the model's own): each group
            // through its own walk.
            let mut outs = Vec::with_capacity(groups.len());
            let mut offset = 0;
            for ((entry, out), rows) in &groups {
                let mut values: Vec<Option<Tensor>> = vec![None; self.steps.len()];
                values[*entry] = Some(
                    x.narrow(1, offset, *rows)
                        .map_err(|e| RunError::Input(e.to_string()))?,
                );
                let plan = self.schedule(&[*out], &[*entry]);
                for &i in &plan.needed {
                    let step = &self.steps[i];
                    let args = self.step_args(i, &values)?;
                    let v = apply(
                        step,
                        &args,
                        segments,
                        &[],
                        Adapters::Uniform(&step.adapters),
                    )
                    .map_err(|cause| RunError::Step {
                        step: step.name.clone(),
                        cause,
                    })?;
                    values[i] = Some(v);
                }
                outs.push(values[*out].take().ok_or_else(|| {
                    RunError::Input(format!("{} was not computed", self.steps[*out].name))
                })?);
                offset += rows;
            }
            Tensor::cat(&outs, 1).map_err(|e| RunError::Input(e.to_string()))?
        };
        let mut out: Vec<Option<Tensor>> = (0..n).map(|_| None).collect();
        for (k, &i) in order.iter().enumerate() {
            out[i] = Some(
                y.get(0)
                    .and_then(|t| t.narrow(0, k, 1))
                    .map_err(|e| RunError::Input(e.to_string()))?,
            );
        }
        for (seg, &c) in segments.iter_mut().zip(commit) {
            if c {
                seg.cache.commit(seg.start + seg.ids.len());
            }
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| RunError::Input("a segment got no head output".into())))
            .collect()
    }

    /// Runs segment `i` through blocks `from[i] .. from[i] + width`, entering with its state
    /// (or, at depth 0 without one, its tokens' embeddings). Blocks at the same offset must
    /// run the same ops; ops whose kernels they share run once over every row. Nothing is
    /// committed to the caches (keys and values are appended, as a stage that does not end
    /// the model appends them). Returns per segment, in order, the stream after its last
    /// block and, with `below`, the stream one block lower at its last token.
    pub fn run_blocks(
        &self,
        segments: &mut [Segment<'_>],
        from: &[usize],
        width: usize,
        below: bool,
    ) -> Result<Vec<BlockOutput>, RunError> {
        if segments.len() != from.len() {
            return Err(RunError::Input(format!(
                "{} segments with {} entry depths",
                segments.len(),
                from.len()
            )));
        }
        if segments.is_empty() {
            return Ok(Vec::new());
        }
        if width == 0 {
            return Err(RunError::Input("a call through no blocks".into()));
        }
        let hidden = self.graph.info.hidden;
        let blocks = self.graph.blocks.len();
        if let Some(&d) = from.iter().find(|&&d| d + width > blocks) {
            return Err(RunError::Input(format!(
                "blocks {d}..{} are beyond the program's {blocks} layers",
                d + width
            )));
        }
        // Segments grouped by depth: rows at one depth are contiguous in the stream.
        let mut order: Vec<usize> = (0..segments.len()).collect();
        order.sort_by_key(|&i| (from[i], i));
        let mut states: Vec<Option<Tensor>> = Vec::with_capacity(segments.len());
        for seg in segments.iter() {
            if seg.ids.is_empty() {
                return Err(RunError::Input("a segment has no tokens".into()));
            }
            self.check_ids(seg.ids)?;
            self.check_absent_call(seg.cache, seg.ids.len())?;
            states.push(seg.state.clone());
        }
        // Segments starting at depth 0 with tokens only: their embeddings first.
        let fresh: Vec<usize> = (0..segments.len())
            .filter(|&i| from[i] == 0 && states[i].is_none())
            .collect();
        if !fresh.is_empty() {
            let want = Want::all(self.stream_node(0)?);
            let run = Run {
                from: 0,
                task: Task::Outputs(vec![want]),
                commit: false,
            };
            let mut embed: Vec<Segment> = segments
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| fresh.contains(i))
                .map(|(_, s)| Segment {
                    ids: s.ids,
                    start: s.start,
                    state: None,
                    cache: &mut *s.cache,
                })
                .collect();
            let out = self.run(&mut embed, &run)?;
            for (&i, mut v) in fresh.iter().zip(out) {
                states[i] = Some(v.remove(0));
            }
        }
        let mut rows = Vec::with_capacity(order.len());
        for &i in &order {
            let len = segments[i].ids.len();
            let s = states[i].take().ok_or_else(|| {
                RunError::Input(format!(
                    "entering after {} layers needs the segment's state",
                    from[i]
                ))
            })?;
            if s.dims() != [len, hidden] {
                return Err(RunError::Input(format!(
                    "entry state of shape {:?} for {len} tokens of width {hidden}",
                    s.dims()
                )));
            }
            rows.push(s);
        }
        let mut x = Tensor::cat(&rows, 0)
            .and_then(|t| t.unsqueeze(0))
            .map_err(|e| RunError::Input(format!("entry states: {e}")))?;
        drop(rows);
        // Groups: (first depth, segments in order, rows).
        let mut groups: Vec<(usize, Vec<usize>, usize)> = Vec::new();
        for &i in &order {
            let len = segments[i].ids.len();
            match groups.last_mut() {
                Some((d, members, rows)) if *d == from[i] => {
                    members.push(i);
                    *rows += len;
                }
                _ => groups.push((from[i], vec![i], len)),
            }
        }
        let mut lower = None;
        for j in 0..width {
            if j + 1 == width && below {
                lower = Some(x.clone());
            }
            let owned = groups
                .iter()
                .map(|(d, _, _)| self.template(d + j))
                .collect::<Result<Vec<_>, _>>()?;
            let templates: Vec<&Template> = owned.iter().collect();
            if !self.alike(&templates) {
                let d = templates
                    .iter()
                    .zip(&groups)
                    .skip(1)
                    .find(|(t, _)| !self.alike(&[templates[0], t]))
                    .map_or(groups[0].0, |(_, g)| g.0);
                return Err(RunError::Input(format!(
                    "blocks {} and {} do not run the same ops: rows at different depths \
                     share a call only through a looped (tied) block",
                    groups[0].0 + j,
                    d + j
                )));
            }
            let spans: Vec<(usize, &[usize])> = groups
                .iter()
                .map(|(_, members, rows)| (*rows, members.as_slice()))
                .collect();
            x = self.run_aligned(&templates, &spans, &x, segments)?;
        }
        // Back to the callers' order.
        let mut out: Vec<Option<BlockOutput>> = (0..segments.len()).map(|_| None).collect();
        let mut offset = 0;
        for &i in &order {
            let len = segments[i].ids.len();
            let take = |t: &Tensor, o: usize, n: usize| {
                t.get(0)
                    .and_then(|t| t.narrow(0, o, n))
                    .map_err(|e| RunError::Input(e.to_string()))
            };
            out[i] = Some(BlockOutput {
                stream: take(&x, offset, len)?,
                below: lower
                    .as_ref()
                    .map(|l| take(l, offset + len - 1, 1))
                    .transpose()?,
            });
            offset += len;
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| RunError::Input("a segment got no output".into())))
            .collect()
    }
}

/// One op of a block over the rows of `members` (segment index and the step it is at, in
/// stream order, their rows contiguous from the start of `args`).
fn apply(
    step: &Step,
    args: &[&Tensor],
    segments: &mut [Segment<'_>],
    members: &[(usize, &Step)],
    adapters: Adapters<'_>,
) -> candle_core::Result<Tensor> {
    let arg = |k: usize| {
        args.get(k)
            .copied()
            .ok_or_else(|| candle_core::Error::Msg(format!("{} misses input {k}", step.name)))
    };
    match &step.kernel {
        Kernel::Norm(n) => n.forward(arg(0)?),
        Kernel::Add => arg(0)? + arg(1)?,
        Kernel::Mlp(m) => m.forward(arg(0)?, adapters),
        Kernel::LmHead(l) => adapters.project(0, l.as_ref(), arg(0)?),
        Kernel::Attention(a) => {
            // Each segment attends on the slot of the block it is at.
            let mut slots: Vec<(usize, usize)> = Vec::with_capacity(members.len());
            for (i, s) in members {
                slots.push((*i, s.slot()?));
            }
            let mut contexts: Vec<AttnCtx> = slots
                .iter()
                .map(|&(i, _)| AttnCtx::new(segments[i].start, segments[i].ids.len(), None))
                .collect();
            let mut parts: Vec<RaggedPart> = Vec::with_capacity(members.len());
            let mut offset = 0;
            // Borrow each member's cache once: members are distinct segments.
            let mut caches: Vec<(usize, &mut Segment<'_>)> = segments
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| slots.iter().any(|(j, _)| j == i))
                .collect();
            for (&(i, slot), ctx) in slots.iter().zip(contexts.iter_mut()) {
                let k = caches
                    .iter()
                    .position(|(j, _)| *j == i)
                    .ok_or_else(|| candle_core::Error::Msg("a segment is missing".into()))?;
                let (_, seg) = caches.swap_remove(k);
                let len = seg.ids.len();
                parts.push((offset, len, ctx, seg.cache.slot_mut(slot)?));
                offset += len;
            }
            a.forward_ragged(arg(0)?, &mut parts, adapters)
        }
        other => candle_core::bail!(
            "{}: a {} op inside a block cannot run in a looped call",
            step.name,
            kind(other)
        ),
    }
}
