//! `exitgraph bench`: prefill and decode speed of our lowered Llama against
//! candle-transformers' hand-written Llama on the same weights, measured in one run.

use crate::lower::{Inputs, Program};
use crate::synth::{write_random_llama, LlamaSpec};
use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama as cl;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Random model to make when `model_dir` is not given.
    pub spec: LlamaSpec,
    /// An existing Llama checkpoint instead of a random one.
    pub model_dir: Option<PathBuf>,
    pub prompt_len: usize,
    pub decode_tokens: usize,
    pub reps: usize,
    pub seed: u64,
}

/// Median times of one phase.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub phase: &'static str,
    pub tokens: usize,
    pub ours_ms: f64,
    pub theirs_ms: f64,
}

impl BenchRow {
    pub fn ours_tokens_per_s(&self) -> f64 {
        self.tokens as f64 / (self.ours_ms / 1e3)
    }
    pub fn theirs_tokens_per_s(&self) -> f64 {
        self.tokens as f64 / (self.theirs_ms / 1e3)
    }
    /// Our time over theirs: below 1 means we are faster.
    pub fn ratio(&self) -> f64 {
        self.ours_ms / self.theirs_ms
    }
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub params: usize,
    pub threads: usize,
    pub reps: usize,
    pub prompt_len: usize,
    /// Largest difference between the two models' last-position logits after prefill.
    pub max_logit_diff: f32,
    pub rows: Vec<BenchRow>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn argmax_last(logits: &Tensor) -> anyhow::Result<u32> {
    let l = logits.flatten_all()?;
    let vocab = *logits.dims().last().context("logits have no dims")?;
    let last = l.narrow(0, l.dim(0)? - vocab, vocab)?;
    Ok(last.argmax(0)?.to_scalar::<u32>()?)
}

struct Ours<'a>(&'a Program);
struct Theirs<'a>(&'a cl::Llama, &'a cl::Config);

impl Ours<'_> {
    /// Prefill then decode; returns (prefill ms, decode ms, prefill logits).
    fn run(&self, prompt: &Tensor, decode: usize) -> anyhow::Result<(f64, f64, Tensor)> {
        let mut cache = self.0.new_cache();
        let inputs = |ids: Tensor| Inputs {
            input_ids: ids,
            attention_mask: None,
            token_type_ids: None,
        };
        let t0 = Instant::now();
        let mut out = self
            .0
            .forward(&inputs(prompt.clone()), &mut cache, &["logits"], true)?;
        let logits = out.remove("logits").context("no logits")?;
        let mut next = argmax_last(&logits)?;
        let prefill = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        for _ in 0..decode {
            let ids = Tensor::new(&[[next]], prompt.device())?;
            let mut out = self
                .0
                .forward(&inputs(ids), &mut cache, &["logits"], true)?;
            next = argmax_last(&out.remove("logits").context("no logits")?)?;
        }
        Ok((prefill, t1.elapsed().as_secs_f64() * 1e3, logits))
    }
}

impl Theirs<'_> {
    fn run(&self, prompt: &Tensor, decode: usize) -> anyhow::Result<(f64, f64, Tensor)> {
        let mut cache = cl::Cache::new(true, DType::F32, self.1, prompt.device())?;
        let t0 = Instant::now();
        let logits = self.0.forward(prompt, 0, &mut cache)?;
        let mut next = argmax_last(&logits)?;
        let prefill = t0.elapsed().as_secs_f64() * 1e3;
        let start = prompt.dim(1)?;
        let t1 = Instant::now();
        for pos in start..start + decode {
            let ids = Tensor::new(&[[next]], prompt.device())?;
            let logits = self.0.forward(&ids, pos, &mut cache)?;
            next = argmax_last(&logits)?;
        }
        Ok((prefill, t1.elapsed().as_secs_f64() * 1e3, logits))
    }
}

/// Runs the benchmark; `progress` is called after each repetition.
pub fn run(opts: &BenchOptions, mut progress: impl FnMut(usize)) -> anyhow::Result<BenchReport> {
    let tmp;
    let dir = match &opts.model_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            write_random_llama(tmp.path(), &opts.spec, opts.seed)?;
            tmp.path().to_path_buf()
        }
    };
    let device = Device::Cpu;
    let ckpt = exitgraph_ir::import(&dir)?;
    if ckpt.graph.info.family != exitgraph_ir::Family::Llama {
        anyhow::bail!("{}: bench compares Llama checkpoints only", dir.display());
    }
    let program = Program::lower(&ckpt.graph, &dir, &device, DType::F32)?;
    let config_text = std::fs::read_to_string(dir.join("config.json"))?;
    let their_cfg: cl::LlamaConfig = serde_json::from_str(&config_text).with_context(|| {
        format!(
            "{}: candle-transformers cannot read this config",
            dir.display()
        )
    })?;
    let their_cfg = their_cfg.into_config(false);
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &device)?;
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &device);
    let theirs = cl::Llama::load(vb, &their_cfg)?;

    let vocab = ckpt.graph.info.vocab as u32;
    let ids: Vec<u32> = (0..opts.prompt_len as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let prompt = Tensor::from_vec(ids, (1, opts.prompt_len), &device)?;
    let ours = Ours(&program);
    let theirs = Theirs(&theirs, &their_cfg);
    // Warm-up, and the logits check.
    let (_, _, a) = ours.run(&prompt, 1)?;
    let (_, _, b) = theirs.run(&prompt, 1)?;
    let a = a.flatten_all()?;
    let b = b.flatten_all()?;
    let n = b.dim(0)?;
    let a = a.narrow(0, a.dim(0)? - n, n)?;
    let max_logit_diff = (a - b)?.abs()?.max(0)?.to_scalar::<f32>()?;
    let mut times: [Vec<f64>; 4] = Default::default();
    for rep in 0..opts.reps {
        // Alternate who goes first, so neither always runs on a warmer cache.
        let (o, t) = if rep % 2 == 0 {
            let o = ours.run(&prompt, opts.decode_tokens)?;
            (o, theirs.run(&prompt, opts.decode_tokens)?)
        } else {
            let t = theirs.run(&prompt, opts.decode_tokens)?;
            (ours.run(&prompt, opts.decode_tokens)?, t)
        };
        times[0].push(o.0);
        times[1].push(t.0);
        times[2].push(o.1);
        times[3].push(t.1);
        progress(rep + 1);
    }
    let [po, pt, dec_o, dec_t] = times;
    Ok(BenchReport {
        params: ckpt.graph.params(),
        threads: candle_core::utils::get_num_threads(),
        reps: opts.reps,
        prompt_len: opts.prompt_len,
        max_logit_diff,
        rows: vec![
            BenchRow {
                phase: "prefill",
                tokens: opts.prompt_len,
                ours_ms: median(po),
                theirs_ms: median(pt),
            },
            BenchRow {
                phase: "decode",
                tokens: opts.decode_tokens,
                ours_ms: median(dec_o),
                theirs_ms: median(dec_t),
            },
        ],
    })
}

impl BenchReport {
    /// The report as a Markdown table.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "Llama, {:.1}M parameters, f32, CPU ({} threads), prompt {} tokens, median of {} runs; \
             max |logit difference| {:.2e}\n\n",
            self.params as f64 / 1e6,
            self.threads,
            self.prompt_len,
            self.reps,
            self.max_logit_diff
        );
        s.push_str("| phase | tokens | exitgraph ms | exitgraph tok/s | candle-transformers ms | candle-transformers tok/s | ours / theirs (time) |\n");
        s.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} |\n",
                r.phase,
                r.tokens,
                r.ours_ms,
                r.ours_tokens_per_s(),
                r.theirs_ms,
                r.theirs_tokens_per_s(),
                r.ratio()
            ));
        }
        s
    }
}
