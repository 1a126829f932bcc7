//! `exitgraph eval layers --needle TOKENS`: needle-in-a-haystack retrieval at a fixed context
//! length, by the depth of the fact in the haystack.
//!
//! For each depth `d` in 0, 0.1, …, 1 (0: the fact opens the haystack, 1: it sits just
//! before the question), `cases` haystacks of [`Task::Needle`](crate::corpus::Task::Needle)
//! text hold one fact at that depth ([`corpus::needle::at_depth`]), each made as long as fits
//! in `tokens` positions (bos, text and eos encoded; the most grammar sentences that fit).
//! A case is retrieved when the full model's argmax predicts both value digits after the
//! query key (teacher-forced: the second digit is predicted with the first in context).

use crate::corpus::{self, Encoded};
use crate::lower::Program;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::path::Path;

/// Depths of the fact, as fractions of the haystack.
pub const DEPTHS: [f64; 11] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Retrieval at one depth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DepthRow {
    pub depth: f64,
    pub cases: usize,
    /// Cases with both value digits predicted.
    pub retrieved: usize,
    /// Mean encoded length of the cases, in tokens.
    pub mean_tokens: f64,
}

/// The whole table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NeedleReport {
    /// The context length the haystacks fill.
    pub tokens: usize,
    pub seed: u64,
    pub rows: Vec<DepthRow>,
}

/// The case of `seed` at `depth`: the longest haystack whose encoding fits `tokens`.
pub fn case(
    tokenizer: &tokenizers::Tokenizer,
    seed: u64,
    depth: f64,
    tokens: usize,
) -> anyhow::Result<Encoded> {
    let encode = |n: usize| corpus::encode(tokenizer, &corpus::needle::at_depth(seed, n, depth));
    let fits = |n: usize| -> anyhow::Result<bool> { Ok(encode(n)?.ids.len() <= tokens) };
    if !fits(1)? {
        bail!("a one-sentence haystack does not fit {tokens} tokens");
    }
    // The length grows with the sentence count (every sentence adds tokens): bisect.
    let (mut lo, mut hi) = (1, 2);
    while fits(hi)? {
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    encode(lo)
}

/// Evaluates the model in `dir` on `cases` haystacks per depth filling `tokens` positions.
pub fn eval_needle(
    dir: &Path,
    tokens: usize,
    cases: usize,
    seed: u64,
) -> anyhow::Result<NeedleReport> {
    let ckpt = exitgraph_ir::import(dir)?;
    let positions = ckpt.graph.info.max_positions;
    if tokens > positions {
        bail!(
            "--needle {tokens}: the model in {} has {positions} positions",
            dir.display()
        );
    }
    let tok_path = ckpt.tokenizer.clone().with_context(|| {
        format!(
            "{}: the needle evaluation needs tokenizer.json",
            dir.display()
        )
    })?;
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let device = Device::Cpu;
    let program = Program::lower(&ckpt.graph, dir, &device, DType::F32)?;
    let mut rows = Vec::new();
    for (i, &depth) in DEPTHS.iter().enumerate() {
        let encoded = (0..cases)
            .map(|c| {
                case(
                    &tokenizer,
                    seed ^ ((i * 100_003 + c) as u64) << 8,
                    depth,
                    tokens,
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut retrieved = 0;
        for chunk in encoded.chunks(4) {
            retrieved += retrieved_in(&program, chunk, &device)?;
        }
        let total: usize = encoded.iter().map(|e| e.ids.len()).sum();
        rows.push(DepthRow {
            depth,
            cases,
            retrieved,
            mean_tokens: total as f64 / cases.max(1) as f64,
        });
    }
    Ok(NeedleReport { tokens, seed, rows })
}

/// How many of `batch` have every answer token predicted by the previous position's argmax
/// (right-padded; a causal model's earlier positions do not see the padding).
fn retrieved_in(program: &Program, batch: &[Encoded], device: &Device) -> anyhow::Result<usize> {
    let len = batch.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(batch.len() * len);
    for e in batch {
        flat.extend(e.ids.iter().copied());
        flat.extend(std::iter::repeat_n(
            e.ids.last().copied().unwrap_or(0),
            len - e.ids.len(),
        ));
    }
    let ids = Tensor::from_vec(flat, (batch.len(), len), device)?;
    let predicted: Vec<Vec<u32>> = program.logits(&ids)?.argmax(2)?.to_vec2()?;
    Ok(batch
        .iter()
        .zip(&predicted)
        .filter(|(e, pred)| {
            (1..e.ids.len())
                .filter(|&t| e.answer[t])
                .all(|t| pred[t - 1] == e.ids[t])
        })
        .count())
}

impl NeedleReport {
    /// Share of cases retrieved at each depth, and over all depths.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "needle retrieval at {} tokens (full model, both value digits right)\n\n\
             | depth | cases | mean tokens | retrieved % |\n|---:|---:|---:|---:|\n",
            self.tokens
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {:.0}% | {} | {:.0} | {:.1} |",
                100.0 * r.depth,
                r.cases,
                r.mean_tokens,
                100.0 * r.retrieved as f64 / r.cases.max(1) as f64
            );
        }
        let (hit, all) = self
            .rows
            .iter()
            .fold((0, 0), |(h, a), r| (h + r.retrieved, a + r.cases));
        let _ = writeln!(
            s,
            "| all | {all} | | {:.1} |",
            100.0 * hit as f64 / all.max(1) as f64
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{generate, train_tokenizer, CorpusSpec};

    #[test]
    fn cases_fill_the_context_and_hold_the_fact_at_its_depth() {
        let tok = train_tokenizer(&generate(&CorpusSpec::new(3, 300, Vec::new())), 400).unwrap();
        for depth in [0.0, 0.5, 1.0] {
            let e = case(&tok, 11, depth, 300).unwrap();
            assert!(e.ids.len() <= 300);
            let decoded = tok.decode(&e.ids, true).unwrap();
            let encode_n =
                |n| corpus::encode(&tok, &corpus::needle::at_depth(11, n, depth)).unwrap();
            let n = (1..200)
                .find(|&n| encode_n(n) == e)
                .expect("a sentence count");
            assert!(
                encode_n(n + 1).ids.len() > 300,
                "one more sentence would fit"
            );
            assert!(n > 10);
            // The fact sits at the depth: its position among the words.
            let words: Vec<&str> = decoded.split(' ').collect();
            let fact = words
                .iter()
                .position(|w| w.len() == 3 && w.starts_with(|c: char| c.is_ascii_uppercase()))
                .unwrap();
            let share = fact as f64 / words.len() as f64;
            assert!(
                (share - depth).abs() < 0.1,
                "depth {depth}: fact at {share}"
            );
            assert_eq!(e.answer.iter().filter(|&&a| a).count(), 2);
            assert_eq!(e.ids.len(), e.answer.len());
        }
    }

    #[test]
    fn markdown_shows_the_shares() {
        let r = NeedleReport {
            tokens: 2048,
            seed: 1,
            rows: vec![
                DepthRow {
                    depth: 0.0,
                    cases: 4,
                    retrieved: 3,
                    mean_tokens: 2040.0,
                },
                DepthRow {
                    depth: 1.0,
                    cases: 4,
                    retrieved: 4,
                    mean_tokens: 2041.5,
                },
            ],
        };
        let md = r.to_markdown();
        assert!(md.contains("| 0% | 4 | 2040 | 75.0 |"), "{md}");
        assert!(md.contains("| 100% | 4 | 2042 | 100.0 |"), "{md}");
        assert!(md.contains("| all | 8 | | 87.5 |"), "{md}");
    }
}
