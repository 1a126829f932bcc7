//! `exitgraph bench --speculative`: self-speculative decoding on the bench's model (a random
//! Llama of about 100M parameters, or `--model DIR`), swept like `eval speculative` (the
//! full model and each setting timed back to back, alternating, the same measured counts and
//! ideal speedups) but on prompts of fixed token ids, so it needs no tokenizer.
//!
//! Its point is the cost side. On a model whose weights do not fit the CPU's caches, a decode
//! step is bound by reading them, and a verification call of a few tokens costs about one
//! token's step: the regime the method is built for, which the 1.67M-parameter demo model
//! (cache-resident) does not reach. A random model's acceptance is a property of its random
//! weights (how little its layers move the residual stream), not of a trained model's draft:
//! the table reports it, and the speedup is read against it.

use crate::bench::BenchOptions;
use crate::eval::exits::Case;
use crate::eval::speculative::{sweep, SpecOptions, SpecReport};
use crate::lower::Program;
use crate::synth::write_random_llama;
use candle_core::{DType, Device};
use exitgraph_passes::{HeadKind, InsertExits, Pass, PassContext};
use std::sync::Arc;

/// What `bench --speculative` sweeps.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecBench {
    /// Draft depths ℓ; empty for a quarter and a half of the layers.
    pub exits: Vec<usize>,
    pub drafts: Vec<usize>,
    pub thresholds: Vec<Option<f32>>,
    /// Prompts decoded per run (each `prompt_len` fixed token ids).
    pub prompts: usize,
    /// Factor on the random model's layer output projections (`o_proj`, `down_proj`); 1
    /// leaves the random model as `bench` makes it.
    pub layer_scale: f32,
}

/// Multiplies every layer's output projections in `dir/model.safetensors` by `scale`, so
/// each layer adds `scale` times its update to the residual stream: with a small scale the
/// stream after a few layers is nearly the final one and a shallow draft agrees with the
/// full model more often. Rewritten atomically.
pub fn scale_layer_outputs(dir: &std::path::Path, scale: f32) -> anyhow::Result<usize> {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let mut scaled = 0;
    for (name, t) in tensors.iter_mut() {
        if name.ends_with(".self_attn.o_proj.weight") || name.ends_with(".mlp.down_proj.weight") {
            *t = t.affine(f64::from(scale), 0.0)?;
            scaled += 1;
        }
    }
    crate::tensor_io::write_atomic(&path, &tensors)?;
    Ok(scaled)
}

/// `count` prompts of `len` token ids below `vocab`, different per prompt, the same every run.
pub fn fixed_prompts(count: usize, len: usize, vocab: usize) -> Vec<Case> {
    (0..count)
        .map(|p| Case {
            prompt: (0..len)
                .map(|i| ((i * 7919 + p * 104_729 + 13) % vocab.max(1)) as u32)
                .collect(),
            reference: Vec::new(),
        })
        .collect()
}

/// The draft depths: the given ones, or a quarter and a half of `layers` (at least 1, below
/// `layers`, each once).
pub fn draft_depths(given: &[usize], layers: usize) -> Vec<usize> {
    if !given.is_empty() {
        return given.to_vec();
    }
    let mut d: Vec<usize> = [layers / 4, layers / 2]
        .into_iter()
        .map(|l| l.clamp(1, layers.saturating_sub(1).max(1)))
        .collect();
    d.dedup();
    d
}

/// Runs the sweep on the bench's model (CPU, f32): exits sharing the final norm and LM head
/// after every draft depth, `opts.batch` prompts side by side, `opts.decode_tokens` tokens
/// decoded after the first.
pub fn run(
    opts: &BenchOptions,
    bench: &SpecBench,
    progress: impl FnMut(&str),
) -> anyhow::Result<SpecReport> {
    if opts.model_dir.is_some() && bench.layer_scale != 1.0 {
        anyhow::bail!("bench --layer-scale applies to the random model, not to --model");
    }
    if !(bench.layer_scale.is_finite() && bench.layer_scale >= 0.0) {
        anyhow::bail!(
            "bench --layer-scale {}: a factor of 0 or more",
            bench.layer_scale
        );
    }
    let scratch = tempfile::tempdir()?;
    let dir = match &opts.model_dir {
        Some(d) => d.clone(),
        None => {
            write_random_llama(scratch.path(), &opts.spec, opts.seed)?;
            if bench.layer_scale != 1.0 {
                scale_layer_outputs(scratch.path(), bench.layer_scale)?;
            }
            scratch.path().to_path_buf()
        }
    };
    let mut graph = exitgraph_ir::import(&dir)
        .map_err(|e| anyhow::anyhow!("bench --speculative: {}: {e}", dir.display()))?
        .graph;
    let layers = graph.info.num_layers;
    let exits = draft_depths(&bench.exits, layers);
    if let Some(bad) = exits.iter().find(|&&l| l == 0 || l >= layers) {
        anyhow::bail!(
            "bench --draft-exits {bad}: a draft runs 1 to {} of the model's {layers} layers",
            layers.saturating_sub(1)
        );
    }
    if bench.prompts == 0 {
        anyhow::bail!("bench --prompts 0: at least one prompt");
    }
    InsertExits {
        after: exits.clone(),
        every: None,
        head: HeadKind::SharedLmHead { norm: true },
        gate: false,
        weights: None,
    }
    .run(&mut graph, &PassContext::detached())?;
    let program = Arc::new(Program::lower(&graph, &dir, &Device::Cpu, DType::F32)?);
    let cases = fixed_prompts(bench.prompts, opts.prompt_len, graph.info.vocab);
    let name = match &opts.model_dir {
        Some(d) => d.display().to_string(),
        None if bench.layer_scale != 1.0 => format!(
            "random Llama, {:.1}M parameters, layer outputs x{}",
            graph.params() as f64 / 1e6,
            bench.layer_scale
        ),
        None => format!(
            "random Llama, {:.1}M parameters",
            graph.params() as f64 / 1e6
        ),
    };
    let spec = SpecOptions {
        exits,
        drafts: bench.drafts.clone(),
        thresholds: bench.thresholds.clone(),
        batches: vec![opts.batch],
        new_tokens: opts.decode_tokens + 1,
        reps: opts.reps,
    };
    sweep(&[(name, program)], &cases, &spec, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_fixed_distinct_and_in_the_vocabulary() {
        let a = fixed_prompts(3, 5, 11);
        let again: Vec<Vec<u32>> = fixed_prompts(3, 5, 11)
            .into_iter()
            .map(|c| c.prompt)
            .collect();
        assert_eq!(
            a.iter().map(|c| c.prompt.clone()).collect::<Vec<_>>(),
            again
        );
        assert_eq!(a.len(), 3);
        assert!(a.iter().all(|c| c.prompt.len() == 5));
        assert!(a.iter().flat_map(|c| &c.prompt).all(|&t| t < 11));
        assert_ne!(a[0].prompt, a[1].prompt);
        // Hand-computed: (0 * 7919 + 0 + 13) % 11 = 2, (1 * 7919 + 13) % 11 = 7932 % 11 = 1.
        assert_eq!(&a[0].prompt[..2], &[2, 1]);
    }

    #[test]
    fn layer_scale_multiplies_only_the_output_projections() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let spec = crate::synth::LlamaSpec::tiny();
        write_random_llama(dir.path(), &spec, 3)?;
        let file = dir.path().join("model.safetensors");
        let before = candle_core::safetensors::load(&file, &Device::Cpu)?;
        assert_eq!(scale_layer_outputs(dir.path(), 0.5)?, 2 * spec.layers);
        let after = candle_core::safetensors::load(&file, &Device::Cpu)?;
        assert_eq!(before.len(), after.len());
        for (name, b) in &before {
            let a = after[name].flatten_all()?.to_vec1::<f32>()?;
            let b = b.flatten_all()?.to_vec1::<f32>()?;
            let output = name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight");
            for (x, y) in a.iter().zip(&b) {
                let want = if output { 0.5 * y } else { *y };
                assert_eq!(x.to_bits(), want.to_bits(), "{name}");
            }
        }
        Ok(())
    }

    #[test]
    fn draft_depths_default_to_a_quarter_and_a_half() {
        assert_eq!(draft_depths(&[], 12), vec![3, 6]);
        assert_eq!(draft_depths(&[], 2), vec![1]);
        assert_eq!(draft_depths(&[5], 12), vec![5]);
    }
}
