//! Held-out quality of a model or pipeline on the synthetic corpus: the mean next-token
//! cross-entropy over every position of every held-out example (teacher-forced, from the
//! token after BOS through EOS), and per task the accuracy on answer tokens (the argmax of
//! the previous position's logits, as `eval layers` scores them).

use crate::corpus::{self, CorpusSpec, Encoded, Task};
use crate::lower::Program;
use candle_core::{Device, Tensor, D};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Answer-token accuracy of one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskAccuracy {
    pub task: Task,
    pub answers: usize,
    pub correct: usize,
}

impl TaskAccuracy {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.answers.max(1) as f64
    }

    /// The binomial standard error of [`TaskAccuracy::accuracy`]: `√(p·(1 − p) / n)`.
    pub fn standard_error(&self) -> f64 {
        let p = self.accuracy();
        (p * (1.0 - p) / self.answers.max(1) as f64).sqrt()
    }
}

/// What [`quality`] measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Mean next-token cross-entropy (nats) over `positions` predictions.
    pub loss: f64,
    pub positions: usize,
    /// One entry per task present, in task order.
    pub tasks: Vec<TaskAccuracy>,
}

/// Running sums of one evaluation.
#[derive(Clone, Debug, Default, PartialEq)]
struct Tally {
    nll: f64,
    positions: usize,
    /// Per task: (answers, correct).
    tasks: BTreeMap<Task, (usize, usize)>,
}

impl Tally {
    /// Adds one example: `log_probs[t]` is the log-distribution predicted at position `t`
    /// (of the next token); positions past the example's length are padding and ignored.
    fn add(&mut self, task: Task, e: &Encoded, log_probs: &[Vec<f32>]) {
        let entry = self.tasks.entry(task).or_default();
        for t in 1..e.ids.len() {
            let row = &log_probs[t - 1];
            let target = e.ids[t] as usize;
            self.nll -= f64::from(row[target]);
            self.positions += 1;
            if e.answer[t] {
                entry.0 += 1;
                // The first maximum, as argmax picks it.
                let best = row
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                    )
                    .0;
                entry.1 += usize::from(best == target);
            }
        }
    }

    fn finish(self) -> Quality {
        Quality {
            loss: self.nll / self.positions.max(1) as f64,
            positions: self.positions,
            tasks: self
                .tasks
                .into_iter()
                .map(|(task, (answers, correct))| TaskAccuracy {
                    task,
                    answers,
                    correct,
                })
                .collect(),
        }
    }
}

/// `examples` held-out examples drawn with `seed` (all tasks, equal shares), encoded.
pub fn held_out(
    tokenizer: &tokenizers::Tokenizer,
    seed: u64,
    examples: usize,
) -> anyhow::Result<Vec<(Task, Encoded)>> {
    corpus::generate(&CorpusSpec::new(seed, examples, Vec::new()))
        .iter()
        .map(|ex| Ok((ex.task, corpus::encode(tokenizer, ex)?)))
        .collect()
}

/// The quality of `program` on `data`, 32 examples per forward pass (right-padded: a
/// causal model's earlier positions do not see the padding).
pub fn quality(program: &Program, data: &[(Task, Encoded)]) -> anyhow::Result<Quality> {
    let device = Device::Cpu;
    let mut tally = Tally::default();
    for chunk in data.chunks(32) {
        let len = chunk.iter().map(|(_, e)| e.ids.len()).max().unwrap_or(0);
        if len < 2 {
            continue;
        }
        let mut flat = Vec::with_capacity(chunk.len() * len);
        for (_, e) in chunk {
            flat.extend(e.ids.iter().copied());
            let pad = e.ids.last().copied().unwrap_or(0);
            flat.extend(std::iter::repeat_n(pad, len - e.ids.len()));
        }
        let logits = program.logits(&Tensor::from_vec(flat, (chunk.len(), len), &device)?)?;
        let log_probs: Vec<Vec<Vec<f32>>> = candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec3()?;
        for ((task, e), rows) in chunk.iter().zip(&log_probs) {
            tally.add(*task, e, rows);
        }
    }
    Ok(tally.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_matches_hand_computed_figures() {
        // Vocabulary of 3. Example: ids [0, 2, 1], the last token an answer.
        let e = Encoded {
            ids: vec![0, 2, 1],
            answer: vec![false, false, true],
        };
        let ln = |p: f32| p.ln();
        let log_probs = vec![
            // Position 0 predicts token 2 with p = 0.5.
            vec![ln(0.25), ln(0.25), ln(0.5)],
            // Position 1 predicts token 1 with p = 0.2; the argmax is token 0: a miss.
            vec![ln(0.7), ln(0.2), ln(0.1)],
            // Padding: ignored.
            vec![ln(1.0), ln(1e-9), ln(1e-9)],
        ];
        let mut t = Tally::default();
        t.add(Task::Copy, &e, &log_probs);
        // A second example of another task: one answer, predicted right with p = 0.6.
        let f = Encoded {
            ids: vec![0, 1],
            answer: vec![false, true],
        };
        t.add(Task::Count, &f, &[vec![ln(0.3), ln(0.6), ln(0.1)]]);
        let q = t.finish();
        // p = 0.29 of 100 answers: √(0.29 · 0.71 / 100) = 0.045376...
        let se = TaskAccuracy {
            task: Task::Count,
            answers: 100,
            correct: 29,
        }
        .standard_error();
        assert!((se - 0.045376).abs() < 1e-6, "{se}");
        assert_eq!(q.positions, 3);
        let want = -(0.5f64.ln() + 0.2f64.ln() + 0.6f64.ln()) / 3.0;
        assert!((q.loss - want).abs() < 1e-6, "{} vs {want}", q.loss);
        assert_eq!(
            q.tasks,
            vec![
                TaskAccuracy {
                    task: Task::Copy,
                    answers: 1,
                    correct: 0
                },
                TaskAccuracy {
                    task: Task::Count,
                    answers: 1,
                    correct: 1
                },
            ]
        );
    }
}
