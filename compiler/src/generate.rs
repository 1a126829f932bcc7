//! Token generation with the KV cache: greedy, or seeded temperature / top-p sampling.
//!
//! Matches Hugging Face `generate` for a batch of equal-length prompts: a row that emits an
//! end-of-sequence id is padded afterwards (with `pad_token_id`, else the first EOS id), and
//! generation stops when every row has finished or `max_new_tokens` is reached.

use crate::lower::{Inputs, Program, RunError};
use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling as CandleSampling};
use serde::{Deserialize, Serialize};

/// How the next token is chosen.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Sampling {
    /// The most likely token.
    #[default]
    Greedy,
    /// Sample from `softmax(logits / temperature)`, restricted to the smallest set of tokens
    /// whose probability reaches `top_p` when given.
    Temperature {
        temperature: f64,
        #[serde(default)]
        top_p: Option<f64>,
    },
}

/// Settings of one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Seed of the sampler (row `i` uses `seed + i`).
    pub seed: u64,
    /// Stop a row at the model's end-of-sequence ids.
    pub stop_at_eos: bool,
}

impl GenerateOptions {
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerateOptions {
            max_new_tokens,
            sampling: Sampling::Greedy,
            seed: 0,
            stop_at_eos: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("{0}")]
    Input(String),
    #[error("sampling: {0}")]
    Sample(candle_core::Error),
}

impl Sampling {
    /// candle-transformers' form, checking the parameters.
    pub fn to_candle(&self) -> Result<CandleSampling, GenerateError> {
        match self {
            Sampling::Greedy => Ok(CandleSampling::ArgMax),
            Sampling::Temperature { temperature, top_p } => {
                if !(*temperature > 0.0 && temperature.is_finite()) {
                    return Err(GenerateError::Input(format!(
                        "temperature must be positive, got {temperature}"
                    )));
                }
                match top_p {
                    None => Ok(CandleSampling::All {
                        temperature: *temperature,
                    }),
                    Some(p) if *p > 0.0 && *p <= 1.0 => Ok(CandleSampling::TopP {
                        p: *p,
                        temperature: *temperature,
                    }),
                    Some(p) => Err(GenerateError::Input(format!(
                        "top_p must be in (0, 1], got {p}"
                    ))),
                }
            }
        }
    }
}

/// Continues each prompt (all of equal length); returns prompt + new tokens per row.
pub fn generate(
    program: &Program,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>, GenerateError> {
    let info = &program.graph().info;
    if !info.family.is_decoder() {
        return Err(GenerateError::Input(format!(
            "{} is an encoder; it does not generate tokens",
            info.model_type
        )));
    }
    let Some(first) = prompts.first() else {
        return Err(GenerateError::Input("no prompts".into()));
    };
    let len = first.len();
    if len == 0 || prompts.iter().any(|p| p.len() != len) {
        return Err(GenerateError::Input(
            "prompts must be non-empty and of equal length (padding is not supported)".into(),
        ));
    }
    if let Some(bad) = prompts
        .iter()
        .flatten()
        .find(|&&t| t as usize >= info.vocab)
    {
        return Err(GenerateError::Input(format!(
            "token id {bad} is outside the vocabulary (size {})",
            info.vocab
        )));
    }
    let sampling = opts.sampling.to_candle()?;
    let mut samplers: Vec<LogitsProcessor> = (0..prompts.len())
        .map(|i| LogitsProcessor::from_sampling(opts.seed.wrapping_add(i as u64), sampling.clone()))
        .collect();
    let eos: &[u32] = if opts.stop_at_eos {
        &info.eos_token_ids
    } else {
        &[]
    };
    let pad = info.pad_token_id.or(eos.first().copied()).unwrap_or(0);
    let device = program.device();
    let batch = prompts.len();
    let run_err = |e: candle_core::Error| GenerateError::Run(RunError::Input(e.to_string()));
    let mut input = Tensor::from_vec(prompts.concat(), (batch, len), device).map_err(run_err)?;
    let mut out: Vec<Vec<u32>> = prompts.to_vec();
    let mut done = vec![false; batch];
    let mut cache = program.new_cache();
    for _ in 0..opts.max_new_tokens {
        let inputs = Inputs {
            input_ids: input,
            attention_mask: None,
            token_type_ids: None,
        };
        let logits = program
            .forward(&inputs, &mut cache, &["logits"], true)?
            .remove("logits")
            .ok_or_else(|| GenerateError::Input("program produced no logits".into()))?;
        let seq = logits.dim(1).map_err(run_err)?;
        let last = logits
            .narrow(1, seq - 1, 1)
            .and_then(|l| l.squeeze(1))
            .and_then(|l| l.to_dtype(DType::F32))
            .map_err(run_err)?;
        let mut next = Vec::with_capacity(batch);
        for (row, sampler) in samplers.iter_mut().enumerate() {
            let row_logits = last.get(row).map_err(run_err)?;
            let mut token = sampler.sample(&row_logits).map_err(GenerateError::Sample)?;
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
        input = Tensor::from_vec(next, (batch, 1), device).map_err(run_err)?;
    }
    Ok(out)
}
