//! Convenience callers of [`Program::run`]: a full step (logits at each segment's last
//! token), one stage of layers, and state copying.
//!
//! A stage runs a range of layers: the first from token ids, a later one from the hidden
//! states the previous stage returned, and only the last stage produces logits and commits
//! the caches' positions. Running the stages in order gives exactly the full call.

use super::run::{Run, Segment, Task, Want};
use super::{Program, RunError};
use candle_core::Tensor;
use std::ops::Range;

/// What a stage returns per sequence.
#[derive(Clone, Debug)]
pub enum StageOutput {
    /// Hidden states `[new tokens, hidden]` after the stage's last layer.
    Hidden(Vec<Tensor>),
    /// Logits `[vocab]` at each sequence's last new token (the last stage).
    Logits(Vec<Tensor>),
}

fn squeeze(t: Tensor) -> Result<Tensor, RunError> {
    t.squeeze(0).map_err(|e| RunError::Input(e.to_string()))
}

impl Program {
    /// Runs each segment's new tokens after its cached ones; returns each segment's logits at
    /// its last new token (`[vocab]`, in the program's dtype).
    pub fn forward_ragged(&self, segments: &mut [Segment<'_>]) -> Result<Vec<Tensor>, RunError> {
        let logits = self.logits_node()?;
        self.run(segments, &Run::outputs(vec![Want::last(logits)]))?
            .into_iter()
            .map(|mut v| squeeze(v.remove(0)))
            .collect()
    }

    /// Runs layers `layers` for the segments. A range starting after layer 0 takes the
    /// previous stage's hidden states in `carried` (one `[new tokens, hidden]` per segment).
    pub fn forward_stage(
        &self,
        segments: &mut [Segment<'_>],
        layers: Range<usize>,
        carried: Option<&[Tensor]>,
    ) -> Result<StageOutput, RunError> {
        let total = self.graph.blocks.len();
        if layers.start >= layers.end || layers.end > total {
            return Err(RunError::Input(format!(
                "layer range {layers:?} is not within 0..{total}"
            )));
        }
        if layers.start > 0 {
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
            for (seg, h) in segments.iter_mut().zip(carried) {
                seg.state = Some(h.clone());
            }
        }
        let last = layers.end == total;
        let want = if last {
            Want::last(self.logits_node()?)
        } else {
            Want::all(self.stream_node(layers.end)?)
        };
        let run = Run {
            from: layers.start,
            task: Task::Outputs(vec![want]),
            commit: last,
        };
        let out: Vec<Tensor> = self
            .run(segments, &run)?
            .into_iter()
            .map(|mut v| v.remove(0))
            .collect();
        if last {
            out.into_iter()
                .map(squeeze)
                .collect::<Result<_, _>>()
                .map(StageOutput::Logits)
        } else {
            Ok(StageOutput::Hidden(out))
        }
    }

    /// CALM's state copying: for sequences whose token exited after `from` layers, writes
    /// the keys and values of layers `from..` computed from the exit hidden states `hidden`
    /// (one `[new tokens, hidden]` per segment) into their caches, and commits the
    /// positions, so later tokens can attend at every layer.
    pub fn fill_kv(
        &self,
        segments: &mut [Segment<'_>],
        from: usize,
        hidden: &[Tensor],
    ) -> Result<(), RunError> {
        if hidden.len() != segments.len() {
            return Err(RunError::Input(
                "one hidden state per segment is needed".into(),
            ));
        }
        for (seg, h) in segments.iter_mut().zip(hidden) {
            seg.state = Some(h.clone());
        }
        let run = Run {
            from,
            task: Task::FillKv,
            commit: true,
        };
        self.run(segments, &run).map(|_| ())
    }
}
