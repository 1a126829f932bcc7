//! Seeded data order for training: every epoch is a fresh permutation of the rows, derived
//! from the seed and the epoch alone, so batch `i` is the same in a resumed run.

use candle_core::{Device, Tensor};

pub use exitgraph_compiler::synth::SplitMix64;

/// Rows of `seq_len + 1` tokens, served in seeded batches.
pub struct Batcher {
    rows: Vec<Vec<u32>>,
    pub batch_size: usize,
    seed: u64,
}

impl Batcher {
    pub fn new(rows: Vec<Vec<u32>>, batch_size: usize, seed: u64) -> Self {
        Batcher {
            rows,
            batch_size: batch_size.max(1),
            seed,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        let mut rng = SplitMix64::new(self.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        order
    }

    /// Inputs and targets `[batch, seq_len]` (u32) of global batch `index`.
    pub fn batch(&self, index: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let n = self.rows.len();
        if n == 0 {
            candle_core::bail!("no training rows");
        }
        let first = index * self.batch_size;
        let mut flat = Vec::new();
        let mut perm_epoch = u64::MAX;
        let mut perm = Vec::new();
        for k in first..first + self.batch_size {
            let epoch = (k / n) as u64;
            if epoch != perm_epoch {
                perm = self.permutation(epoch);
                perm_epoch = epoch;
            }
            flat.extend_from_slice(&self.rows[perm[k % n]]);
        }
        let width = self.rows[0].len();
        let t = Tensor::from_vec(flat, (self.batch_size, width), device)?;
        Ok((t.narrow(1, 0, width - 1)?, t.narrow(1, 1, width - 1)?))
    }

    /// Every row once, in order, in batches (for evaluation).
    pub fn in_order(&self, device: &Device) -> candle_core::Result<Vec<(Tensor, Tensor)>> {
        let width = self.rows.first().map_or(0, Vec::len);
        self.rows
            .chunks(self.batch_size)
            .map(|chunk| {
                let t = Tensor::from_vec(chunk.concat(), (chunk.len(), width), device)?;
                Ok((t.narrow(1, 0, width - 1)?, t.narrow(1, 1, width - 1)?))
            })
            .collect()
    }
}

/// The example index of every token of packed rows `x: [batch, seq]`, for
/// [`exitgraph_compiler::lower::Inputs::example_ids`]. Every example is `bos … eos`, and the
/// tail of an example cut at a row boundary (no `bos`) is placed after another example's
/// `eos`; so a new example starts at every `bos` and at every token right after an `eos`
/// (each padding `eos` is then an example of its own). Row-major `[batch, seq]` u32.
pub fn example_ids(x: &Tensor, bos: u32, eos: u32) -> candle_core::Result<Tensor> {
    let (batch, seq) = x.dims2()?;
    let ids = x
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?;
    let mut out = Vec::with_capacity(ids.len());
    for row in ids.chunks(seq.max(1)) {
        let mut example = 0u32;
        let mut after_eos = false;
        for &id in row {
            if id == bos || after_eos {
                example += 1;
            }
            after_eos = id == eos;
            out.push(example);
        }
    }
    Tensor::from_vec(out, (batch, seq), x.device())
}

/// Rows of token ids, each `seq_len + 1` long.
pub type Rows = Vec<Vec<u32>>;

/// Training and validation rows for tuning a trained model (`train exits`, `train
/// recursive`): `examples` examples of `tasks` (all when empty) drawn with `seed`, and a tenth
/// as many (at least 16) drawn with `seed + 7919` for validation, packed into rows of
/// `seq_len + 1` tokens with the model's tokenizer.
pub fn tuning_rows(
    tokenizer: &tokenizers::Tokenizer,
    tasks: &[crate::corpus::Task],
    examples: usize,
    seed: u64,
    seq_len: usize,
) -> anyhow::Result<(Rows, Rows)> {
    use crate::corpus::{generate, pack, CorpusSpec};
    let draw =
        |seed: u64, examples: usize| generate(&CorpusSpec::new(seed, examples, tasks.to_vec()));
    let train = pack(tokenizer, &draw(seed, examples), seq_len)?;
    let eval = pack(
        tokenizer,
        &draw(seed.wrapping_add(7919), (examples / 10).max(16)),
        seq_len,
    )?;
    if train.is_empty() || eval.is_empty() {
        anyhow::bail!("the corpus is too small for a sequence length of {seq_len}");
    }
    Ok((train, eval))
}

/// The tokenizer of a compiled pipeline's model; `what` names the command that needs it.
pub fn model_tokenizer(
    compiled: &exitgraph_compiler::pipeline::Compiled,
    what: &str,
) -> anyhow::Result<tokenizers::Tokenizer> {
    use anyhow::Context;
    let path = compiled.checkpoint.tokenizer.clone().with_context(|| {
        format!(
            "{}: {what} needs tokenizer.json",
            compiled.model_dir.display()
        )
    })?;
    tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_start_at_bos_and_after_eos() {
        // bos = 1, eos = 2. Row 0 starts inside a cut example (7 2), then a whole one
        // (1 5 2), then an example's cut tail (6 9 2) placed after it, then a cut head (1 3).
        // Row 1: one example and padding eos, each its own.
        let x = Tensor::new(
            &[
                [7u32, 2, 1, 5, 2, 6, 9, 2, 1, 3],
                [1, 4, 4, 2, 2, 2, 2, 2, 2, 2],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let ids = example_ids(&x, 1, 2).unwrap().to_vec2::<u32>().unwrap();
        assert_eq!(
            ids,
            [
                [0, 0, 1, 1, 1, 2, 2, 2, 3, 3],
                [1, 1, 1, 1, 2, 3, 4, 5, 6, 7]
            ]
        );
    }

    #[test]
    fn batches_are_seeded_and_cover_each_epoch() {
        let rows: Vec<Vec<u32>> = (0..10).map(|i| vec![i, i + 100]).collect();
        let b = Batcher::new(rows.clone(), 5, 3);
        let again = Batcher::new(rows, 5, 3);
        let firsts = |b: &Batcher, i| -> Vec<u32> {
            b.batch(i, &Device::Cpu)
                .unwrap()
                .0
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let mut epoch0 = [firsts(&b, 0), firsts(&b, 1)].concat();
        assert_eq!(epoch0, [firsts(&again, 0), firsts(&again, 1)].concat());
        epoch0.sort();
        assert_eq!(epoch0, (0..10).collect::<Vec<_>>());
        assert_ne!(firsts(&b, 0), firsts(&b, 2), "the next epoch is reshuffled");
    }
}
