//! Token generation with the KV cache: greedy, or seeded temperature / top-p sampling.
//!
//! Matches Hugging Face `generate` for a batch of prompts: a row that emits an
//! end-of-sequence id is padded afterwards (with `pad_token_id`, else the first EOS id), and
//! generation stops when every row has finished or `max_new_tokens` is reached. The loop is
//! the runtime's (`exitgraph_runtime::generate`); this module holds the settings.

use crate::lower::RunError;
use candle_transformers::generation::Sampling as CandleSampling;
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
    #[error(transparent)]
    Runtime(anyhow::Error),
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
