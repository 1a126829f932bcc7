//! `exitgraph eval layers`: per task, next-token accuracy on answer tokens when decoding from
//! each layer through the final norm and LM head (the logit lens), on a held-out corpus.
//!
//! Layer `k` is read out by the `TruncateLayers(keep: k)` pass (final norm and LM head
//! applied to the residual stream after `k` layers); `k = layers` is the full model.

use crate::corpus::{self, CorpusSpec, Encoded, Task};
use crate::lower::Program;
use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use exitgraph_passes::{Pass, PassContext, TruncateLayers};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// Answer-token accuracy of one task at every depth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    pub task: Task,
    pub answers: usize,
    /// `accuracy[k - 1]`: share of answer tokens predicted correctly from layer `k`.
    pub accuracy: Vec<f64>,
}

impl TaskRow {
    /// The shallowest layer reaching `share` of the full model's accuracy; `None` when the
    /// full model gets fewer than 10% right (nothing to resolve).
    pub fn resolved_at(&self, share: f64) -> Option<usize> {
        let full = *self.accuracy.last()?;
        if full < 0.1 {
            return None;
        }
        self.accuracy
            .iter()
            .position(|&a| a >= share * full)
            .map(|i| i + 1)
    }
}

/// The whole table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    pub layers: usize,
    pub seed: u64,
    pub examples: usize,
    /// Examples longer than the model's positions (long needle haystacks), left out.
    #[serde(default)]
    pub skipped: usize,
    pub rows: Vec<TaskRow>,
}

/// Evaluates the model in `dir` on `examples` held-out examples of `tasks` (the short ones
/// when empty) drawn with `seed`.
pub fn eval_layers(
    dir: &Path,
    seed: u64,
    examples: usize,
    tasks: &[Task],
) -> anyhow::Result<LayerReport> {
    let ckpt = exitgraph_ir::import(dir)?;
    let tok_path = ckpt
        .tokenizer
        .clone()
        .with_context(|| format!("{}: eval layers needs tokenizer.json", dir.display()))?;
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let data = corpus::generate(&CorpusSpec::new(seed, examples, tasks.to_vec()));
    let positions = ckpt.graph.info.max_positions;
    let mut by_task: BTreeMap<Task, Vec<Encoded>> = BTreeMap::new();
    let mut skipped = 0;
    for ex in &data {
        let e = corpus::encode(&tokenizer, ex)?;
        // A haystack longer than the model's positions cannot be scored.
        if e.ids.len() > positions {
            skipped += 1;
            continue;
        }
        by_task.entry(ex.task).or_default().push(e);
    }
    // Similar lengths batch together (less padding).
    for encoded in by_task.values_mut() {
        encoded.sort_by_key(|e| e.ids.len());
    }
    let layers = ckpt.graph.info.num_layers;
    let device = Device::Cpu;
    let mut correct: BTreeMap<Task, Vec<usize>> = BTreeMap::new();
    let mut totals: BTreeMap<Task, usize> = BTreeMap::new();
    for k in 1..=layers {
        let mut g = ckpt.graph.clone();
        TruncateLayers { keep: k }.run(&mut g, &PassContext::detached())?;
        let program = Program::lower(&g, dir, &device, DType::F32)?;
        for (task, encoded) in &by_task {
            let hits = correct.entry(*task).or_insert_with(|| vec![0; layers]);
            let mut total = 0;
            for chunk in encoded.chunks(32) {
                let (h, t) = score_batch(&program, chunk, &device)?;
                hits[k - 1] += h;
                total += t;
            }
            totals.insert(*task, total);
        }
    }
    let rows = correct
        .into_iter()
        .map(|(task, hits)| {
            let n = totals.get(&task).copied().unwrap_or(0);
            TaskRow {
                task,
                answers: n,
                accuracy: hits.iter().map(|&h| h as f64 / n.max(1) as f64).collect(),
            }
        })
        .collect();
    Ok(LayerReport {
        layers,
        seed,
        examples,
        skipped,
        rows,
    })
}

/// Right-pads a batch (a causal model's earlier positions do not see the padding) and counts
/// answer tokens predicted by the argmax of the previous position.
fn score_batch(
    program: &Program,
    batch: &[Encoded],
    device: &Device,
) -> anyhow::Result<(usize, usize)> {
    let len = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let pad = batch
        .first()
        .and_then(|e| e.ids.last().copied())
        .unwrap_or(0);
    let mut flat = Vec::with_capacity(batch.len() * len);
    for e in batch {
        flat.extend(e.ids.iter().copied());
        flat.extend(std::iter::repeat_n(pad, len - e.ids.len()));
    }
    let ids = Tensor::from_vec(flat, (batch.len(), len), device)?;
    let logits = program.logits(&ids)?;
    let predicted: Vec<Vec<u32>> = logits.argmax(2)?.to_vec2()?;
    let (mut hits, mut total) = (0, 0);
    for (e, pred) in batch.iter().zip(&predicted) {
        for t in 1..e.ids.len() {
            if e.answer[t] {
                total += 1;
                hits += usize::from(pred[t - 1] == e.ids[t]);
            }
        }
    }
    Ok((hits, total))
}

impl LayerReport {
    /// A Markdown table: one row per task, one column per layer, accuracy in percent.
    pub fn to_markdown(&self) -> String {
        let mut s = String::from("| task | answers |");
        for k in 1..=self.layers {
            let _ = write!(s, " L{k} |");
        }
        s.push_str(" resolved at (95% of full) |\n|---|---:|");
        for _ in 1..=self.layers {
            s.push_str("---:|");
        }
        s.push_str("---:|\n");
        for r in &self.rows {
            let _ = write!(s, "| {} | {} |", r.task.name(), r.answers);
            for a in &r.accuracy {
                let _ = write!(s, " {:.1} |", 100.0 * a);
            }
            let at = r
                .resolved_at(0.95)
                .map_or("-".to_string(), |l| format!("L{l}"));
            let _ = writeln!(s, " {at} |");
        }
        s
    }
}
