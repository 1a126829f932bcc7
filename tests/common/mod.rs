//! Helpers shared by the end-to-end tests.

use candle_core::{DType, Tensor};
use candle_transformers::generation::LogitsProcessor;
use exitgraph::generate::GenerateOptions;
use exitgraph::lower::{Inputs, Program};

/// An independent reference for generation: the padded-batch path (`Program::forward` on
/// `[batch, seq]` ids, no runtime), prompts of equal length, one sampler per row seeded
/// `seed + row`, rows padded after an EOS id as transformers' batched `generate` does.
pub fn reference_generate(
    program: &Program,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Vec<Vec<u32>> {
    let info = &program.graph().info;
    let len = prompts[0].len();
    assert!(prompts.iter().all(|p| p.len() == len), "equal lengths");
    let sampling = opts.sampling.to_candle().unwrap();
    let mut samplers: Vec<LogitsProcessor> = (0..prompts.len())
        .map(|i| LogitsProcessor::from_sampling(opts.seed.wrapping_add(i as u64), sampling.clone()))
        .collect();
    let eos: &[u32] = if opts.stop_at_eos {
        &info.eos_token_ids
    } else {
        &[]
    };
    let pad = info.pad_token_id.or(eos.first().copied()).unwrap_or(0);
    let batch = prompts.len();
    let device = program.device();
    let mut input = Tensor::from_vec(prompts.concat(), (batch, len), device).unwrap();
    let mut out: Vec<Vec<u32>> = prompts.to_vec();
    let mut done = vec![false; batch];
    let mut cache = program.new_cache();
    for _ in 0..opts.max_new_tokens {
        let inputs = Inputs {
            input_ids: input,
            attention_mask: None,
            token_type_ids: None,
            example_ids: None,
        };
        let logits = program
            .forward(&inputs, &mut cache, &["logits"], true)
            .unwrap()
            .remove("logits")
            .unwrap();
        let seq = logits.dim(1).unwrap();
        let last = logits
            .narrow(1, seq - 1, 1)
            .and_then(|l| l.squeeze(1))
            .and_then(|l| l.to_dtype(DType::F32))
            .unwrap();
        let mut next = Vec::with_capacity(batch);
        for (row, sampler) in samplers.iter_mut().enumerate() {
            let mut token = sampler.sample(&last.get(row).unwrap()).unwrap();
            if done[row] {
                token = pad;
            } else if eos.contains(&token) {
                done[row] = true;
            }
            out[row].push(token);
            next.push(token);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_vec(next, (batch, 1), device).unwrap();
    }
    out
}
