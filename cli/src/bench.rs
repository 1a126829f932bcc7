//! `exitgraph bench`: prefill and decode speed of our lowered Llama against
//! candle-transformers' hand-written Llama on the same weights, measured in one run.

use crate::device::DeviceSpec;
use crate::lower::{Inputs, Program};
use crate::synth::{write_random_llama, LlamaSpec};
use anyhow::Context;
use candle_core::{DType, Tensor};
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
    /// Sequences run side by side (each its own prompt), in every phase.
    pub batch: usize,
    pub reps: usize,
    pub seed: u64,
    /// Weight and activation type: F32 or BF16.
    pub dtype: DType,
    /// Also time PyTorch (transformers' LlamaForCausalLM, SDPA) on the same checkpoint.
    pub torch: bool,
    /// Keep the random checkpoint in this folder (for profiling the same weights elsewhere).
    pub save_model: Option<PathBuf>,
    /// Also time our program op by op (after the timed repetitions, in separate runs).
    pub profile: bool,
    /// Where all three implementations run: the CPU or a CUDA GPU (a `cuda` build).
    pub device: DeviceSpec,
}

/// Our time per op in one phase, averaged over the profiled runs.
#[derive(Clone, Debug)]
pub struct PhaseProfile {
    pub phase: &'static str,
    /// Wall time of the phase per run, ms.
    pub wall_ms: f64,
    /// (op and shape, calls per run, ms per run), largest first.
    pub ops: Vec<(String, f64, f64)>,
}

impl PhaseProfile {
    fn from_table(
        phase: &'static str,
        wall_ms: f64,
        table: std::collections::BTreeMap<String, exitgraph_compiler::op_profile::OpTime>,
        runs: usize,
    ) -> Self {
        let runs = runs.max(1) as f64;
        let mut ops: Vec<(String, f64, f64)> = table
            .into_iter()
            .map(|(name, t)| {
                (
                    name,
                    t.calls as f64 / runs,
                    t.total.as_secs_f64() * 1e3 / runs,
                )
            })
            .collect();
        ops.sort_by(|a, b| b.2.total_cmp(&a.2));
        PhaseProfile {
            phase,
            wall_ms: wall_ms / runs,
            ops,
        }
    }

    /// The phase's time no instrumented op accounts for (dispatch between ops, argmax,
    /// building inputs, masks and RoPE tables).
    pub fn unattributed_ms(&self) -> f64 {
        self.wall_ms - self.ops.iter().map(|o| o.2).sum::<f64>()
    }

    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "exitgraph {}, {:.1} ms per run\n\n| op | calls | ms | % of the phase |\n|---|---:|---:|---:|\n",
            self.phase, self.wall_ms
        );
        let pct = |ms: f64| 100.0 * ms / self.wall_ms;
        for (name, calls, ms) in &self.ops {
            s.push_str(&format!(
                "| {name} | {calls:.0} | {ms:.2} | {:.1} |\n",
                pct(*ms)
            ));
        }
        let rest = self.unattributed_ms();
        s.push_str(&format!(
            "| (between ops: dispatch, argmax, masks, tables) | | {rest:.2} | {:.1} |\n",
            pct(rest)
        ));
        s
    }
}

/// Runs prefill and decode `runs` times with op timing on: (prefill, decode) profiles.
fn profile_ours(
    program: &Program,
    prompt: &Tensor,
    decode: usize,
    runs: usize,
) -> anyhow::Result<(PhaseProfile, PhaseProfile)> {
    use exitgraph_compiler::op_profile;
    let inputs = |ids: Tensor| Inputs {
        input_ids: ids,
        attention_mask: None,
        token_type_ids: None,
        example_ids: None,
    };
    op_profile::take();
    op_profile::enable(true);
    let mut prefill_table = std::collections::BTreeMap::new();
    let mut decode_table = std::collections::BTreeMap::new();
    let (mut prefill_ms, mut decode_ms) = (0.0, 0.0);
    let result = (|| -> anyhow::Result<()> {
        for _ in 0..runs {
            let mut cache = program.new_cache();
            let t0 = Instant::now();
            let mut out =
                program.forward(&inputs(prompt.clone()), &mut cache, &["logits"], true)?;
            let rows = prompt.dim(0)?;
            let mut next = argmax_rows(&out.remove("logits").context("no logits")?, rows)?;
            prefill_ms += t0.elapsed().as_secs_f64() * 1e3;
            merge(&mut prefill_table, op_profile::take());
            let t1 = Instant::now();
            for _ in 0..decode {
                let ids = step_ids(&next, prompt.device())?;
                let mut out = program.forward(&inputs(ids), &mut cache, &["logits"], true)?;
                next = argmax_rows(&out.remove("logits").context("no logits")?, rows)?;
            }
            decode_ms += t1.elapsed().as_secs_f64() * 1e3;
            merge(&mut decode_table, op_profile::take());
        }
        Ok(())
    })();
    op_profile::enable(false);
    result?;
    Ok((
        PhaseProfile::from_table("prefill", prefill_ms, prefill_table, runs),
        PhaseProfile::from_table("decode", decode_ms, decode_table, runs),
    ))
}

fn merge(
    into: &mut std::collections::BTreeMap<String, exitgraph_compiler::op_profile::OpTime>,
    from: std::collections::BTreeMap<String, exitgraph_compiler::op_profile::OpTime>,
) {
    for (k, v) in from {
        let e = into.entry(k).or_default();
        e.total += v.total;
        e.calls += v.calls;
    }
}

/// Median times of one phase.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub phase: &'static str,
    pub tokens: usize,
    pub ours_ms: f64,
    pub theirs_ms: f64,
    /// PyTorch's median, when it was measured.
    pub torch_ms: Option<f64>,
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
    /// Our time over PyTorch's: below 1 means we are faster.
    pub fn torch_ratio(&self) -> Option<f64> {
        self.torch_ms.map(|t| self.ours_ms / t)
    }
}

/// What the PyTorch side reported besides its times.
#[derive(Clone, Debug)]
pub struct TorchCheck {
    pub version: String,
    pub threads: usize,
    /// Largest difference between PyTorch's and our last-position logits after prefill.
    pub max_logit_diff: f32,
    /// Whether PyTorch's greedy tokens equal ours over the whole decode.
    pub tokens_equal: bool,
}

#[derive(Clone, Debug)]
pub struct BenchReport {
    pub params: usize,
    /// Where the three implementations ran.
    pub device: DeviceSpec,
    /// Threads of the matmuls (MKL's in an `mkl` build) and of candle's elementwise ops.
    pub threads: usize,
    pub op_threads: usize,
    pub reps: usize,
    pub prompt_len: usize,
    /// Sequences side by side.
    pub batch: usize,
    pub dtype: DType,
    /// The library behind candle's f32 matmuls in this build.
    pub matmul: &'static str,
    /// The CPU's vector and matrix extensions (AVX2, AVX-512 and its parts, AMX).
    pub cpu_features: Vec<&'static str>,
    /// Largest difference between the two models' last-position logits after prefill.
    pub max_logit_diff: f32,
    pub torch: Option<TorchCheck>,
    pub rows: Vec<BenchRow>,
    /// Our op-by-op profile (prefill, decode) when asked for.
    pub profile: Option<(PhaseProfile, PhaseProfile)>,
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

/// Each row's argmax at its last position, from `[rows, .., vocab]` logits.
fn argmax_rows(logits: &Tensor, rows: usize) -> anyhow::Result<Vec<u32>> {
    if rows == 1 {
        return Ok(vec![argmax_last(logits)?]);
    }
    let vocab = *logits.dims().last().context("logits have no dims")?;
    let per_row = logits.elem_count() / rows.max(1);
    let last = logits
        .reshape((rows, per_row))?
        .narrow(1, per_row - vocab, vocab)?;
    Ok(last.argmax(1)?.to_vec1::<u32>()?)
}

/// The next step's ids, one per row: `[rows, 1]`.
fn step_ids(next: &[u32], device: &candle_core::Device) -> anyhow::Result<Tensor> {
    Ok(Tensor::from_slice(next, (next.len(), 1), device)?)
}

struct Ours<'a>(&'a Program);
struct Theirs<'a>(&'a cl::Llama, &'a cl::Config, DType);

/// One timed prefill + decode: (prefill ms, decode ms, prefill logits, greedy tokens).
type RunTimes = (f64, f64, Tensor, Vec<u32>);

impl Ours<'_> {
    fn run(&self, prompt: &Tensor, decode: usize) -> anyhow::Result<RunTimes> {
        let mut cache = self.0.new_cache();
        let inputs = |ids: Tensor| Inputs {
            input_ids: ids,
            attention_mask: None,
            token_type_ids: None,
            example_ids: None,
        };
        let t0 = Instant::now();
        let mut out = self
            .0
            .forward(&inputs(prompt.clone()), &mut cache, &["logits"], true)?;
        let logits = out.remove("logits").context("no logits")?;
        let rows = prompt.dim(0)?;
        let mut next = argmax_rows(&logits, rows)?;
        let prefill = t0.elapsed().as_secs_f64() * 1e3;
        let mut tokens = next.clone();
        let t1 = Instant::now();
        for _ in 0..decode {
            let ids = step_ids(&next, prompt.device())?;
            let mut out = self
                .0
                .forward(&inputs(ids), &mut cache, &["logits"], true)?;
            next = argmax_rows(&out.remove("logits").context("no logits")?, rows)?;
            tokens.extend(&next);
        }
        Ok((prefill, t1.elapsed().as_secs_f64() * 1e3, logits, tokens))
    }
}

impl Theirs<'_> {
    fn run(&self, prompt: &Tensor, decode: usize) -> anyhow::Result<RunTimes> {
        let mut cache = cl::Cache::new(true, self.2, self.1, prompt.device())?;
        let t0 = Instant::now();
        let logits = self.0.forward(prompt, 0, &mut cache)?;
        let rows = prompt.dim(0)?;
        let mut next = argmax_rows(&logits, rows)?;
        let prefill = t0.elapsed().as_secs_f64() * 1e3;
        let mut tokens = next.clone();
        let start = prompt.dim(1)?;
        let t1 = Instant::now();
        for pos in start..start + decode {
            let ids = step_ids(&next, prompt.device())?;
            let logits = self.0.forward(&ids, pos, &mut cache)?;
            next = argmax_rows(&logits, rows)?;
            tokens.extend(&next);
        }
        Ok((prefill, t1.elapsed().as_secs_f64() * 1e3, logits, tokens))
    }
}

/// The last `n` values of a logits tensor as f32 (the last position's row).
fn last_row(logits: &Tensor, n: usize) -> anyhow::Result<Vec<f32>> {
    let flat = logits.to_dtype(DType::F32)?.flatten_all()?;
    Ok(flat.narrow(0, flat.dim(0)? - n, n)?.to_vec1::<f32>()?)
}

/// Largest |a - b|; NaN when any difference is NaN (a NaN logit must not pass a check).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |acc, d| if d.is_nan() || d > acc { d } else { acc })
}

/// Runs the benchmark; `progress` is called after each repetition.
pub fn run(opts: &BenchOptions, mut progress: impl FnMut(usize)) -> anyhow::Result<BenchReport> {
    if !matches!(opts.dtype, DType::F32 | DType::BF16) {
        anyhow::bail!("bench --dtype: f32 or bf16, not {:?}", opts.dtype);
    }
    // The device first: a build or machine without it leaves no model folder behind.
    let device = opts.device.to_candle()?;
    let tmp;
    let dir = match &opts.model_dir {
        Some(d) => d.clone(),
        None => match &opts.save_model {
            Some(keep) => {
                if keep.exists() {
                    anyhow::bail!(
                        "bench --save-model {}: already exists; choose a new folder",
                        keep.display()
                    );
                }
                std::fs::create_dir_all(keep)
                    .with_context(|| format!("bench --save-model {}", keep.display()))?;
                write_random_llama(keep, &opts.spec, opts.seed)?;
                keep.clone()
            }
            None => {
                tmp = tempfile::tempdir()?;
                write_random_llama(tmp.path(), &opts.spec, opts.seed)?;
                tmp.path().to_path_buf()
            }
        },
    };
    let ckpt = exitgraph_ir::import(&dir)?;
    if ckpt.graph.info.family != exitgraph_ir::Family::Llama {
        anyhow::bail!("{}: bench compares Llama checkpoints only", dir.display());
    }
    let program = Program::lower(&ckpt.graph, &dir, &device, opts.dtype)?;
    let config_text = std::fs::read_to_string(dir.join("config.json"))?;
    let their_cfg: cl::LlamaConfig = serde_json::from_str(&config_text).with_context(|| {
        format!(
            "{}: candle-transformers cannot read this config",
            dir.display()
        )
    })?;
    let their_cfg = their_cfg.into_config(false);
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &device)?;
    let vb = candle_nn::VarBuilder::from_tensors(weights, opts.dtype, &device);
    let theirs = cl::Llama::load(vb, &their_cfg)?;
    let threads = crate::cpu::matmul_threads();
    let mut torch = if opts.torch {
        Some(TorchSide::start(
            &dir,
            opts.prompt_len,
            opts.batch.max(1),
            opts.decode_tokens,
            threads,
            opts.dtype,
            opts.device,
        )?)
    } else {
        None
    };

    let vocab = ckpt.graph.info.vocab as u32;
    // Row r's token i is (i * 7919 + 13 + r * 104729) mod vocab (PyTorch's side the same).
    let batch = opts.batch.max(1);
    let ids: Vec<u32> = (0..batch as u32)
        .flat_map(|r| {
            (0..opts.prompt_len as u32).map(move |i| (i * 7919 + 13 + r * 104_729) % vocab)
        })
        .collect();
    let prompt = Tensor::from_vec(ids, (batch, opts.prompt_len), &device)?;
    let ours = Ours(&program);
    let theirs = Theirs(&theirs, &their_cfg, opts.dtype);
    // Warm-up, and the logits check.
    let (_, _, a, _) = ours.run(&prompt, 1)?;
    let (_, _, b, _) = theirs.run(&prompt, 1)?;
    let n = *b.dims().last().context("logits have no dims")?;
    let a = last_row(&a, n)?;
    let max_logit_diff = max_abs_diff(&a, &last_row(&b, n)?);
    let mut torch_check = match &mut torch {
        Some(t) => {
            let logits = t.check()?;
            if logits.len() != n {
                anyhow::bail!("PyTorch's logits have {} entries, ours {n}", logits.len());
            }
            Some(TorchCheck {
                version: t.version.clone(),
                threads: t.threads,
                max_logit_diff: max_abs_diff(&a, &logits),
                tokens_equal: true,
            })
        }
        None => None,
    };
    let mut times: [Vec<f64>; 6] = Default::default();
    for rep in 0..opts.reps {
        // Rotate who goes first, so no one always runs on a warmer cache.
        let mut o = None;
        let mut t = None;
        let mut p = None;
        for turn in 0..3 {
            match (rep + turn) % 3 {
                0 => o = Some(ours.run(&prompt, opts.decode_tokens)?),
                1 => t = Some(theirs.run(&prompt, opts.decode_tokens)?),
                _ => {
                    if let Some(side) = &mut torch {
                        p = Some(side.run()?);
                    }
                }
            }
        }
        let (o, t) = (
            o.context("ours did not run")?,
            t.context("theirs did not run")?,
        );
        times[0].push(o.0);
        times[1].push(t.0);
        times[2].push(o.1);
        times[3].push(t.1);
        if let Some((prefill, decode, tokens)) = p {
            times[4].push(prefill);
            times[5].push(decode);
            if let Some(c) = &mut torch_check {
                c.tokens_equal &= tokens == o.3;
            }
        }
        progress(rep + 1);
    }
    if let Some(side) = torch {
        side.quit();
    }
    let profile = if opts.profile {
        Some(profile_ours(
            &program,
            &prompt,
            opts.decode_tokens,
            opts.reps,
        )?)
    } else {
        None
    };
    let [po, pt, dec_o, dec_t, pp, dec_p] = times;
    let torch_median = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
    Ok(BenchReport {
        params: ckpt.graph.params(),
        device: opts.device,
        threads,
        op_threads: crate::cpu::op_threads(),
        reps: opts.reps,
        prompt_len: opts.prompt_len,
        batch,
        dtype: opts.dtype,
        matmul: MATMUL_LIBRARY,
        cpu_features: crate::cpu::features(),
        max_logit_diff,
        torch: torch_check,
        profile,
        rows: vec![
            BenchRow {
                phase: "prefill",
                tokens: opts.prompt_len * batch,
                ours_ms: median(po),
                theirs_ms: median(pt),
                torch_ms: torch_median(pp),
            },
            BenchRow {
                phase: "decode",
                tokens: opts.decode_tokens * batch,
                ours_ms: median(dec_o),
                theirs_ms: median(dec_t),
                torch_ms: torch_median(dec_p),
            },
        ],
    })
}

/// The library behind candle's CPU matmuls in this build.
pub const MATMUL_LIBRARY: &str = if cfg!(feature = "mkl") {
    "oneMKL"
} else {
    "gemm (candle's default)"
};

/// PyTorch in a child process (`bench_torch.py`), driven one command per line.
struct TorchSide {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    stderr: tempfile::NamedTempFile,
    _script: tempfile::TempPath,
    version: String,
    threads: usize,
}

impl TorchSide {
    fn start(
        dir: &std::path::Path,
        prompt_len: usize,
        batch: usize,
        decode: usize,
        threads: usize,
        dtype: DType,
        device: DeviceSpec,
    ) -> anyhow::Result<Self> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut script = tempfile::Builder::new().suffix(".py").tempfile()?;
        script.write_all(include_str!("bench_torch.py").as_bytes())?;
        let script = script.into_temp_path();
        let stderr = tempfile::NamedTempFile::new()?;
        let dtype = if dtype == DType::BF16 {
            "bfloat16"
        } else {
            "float32"
        };
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(dir)
            .args([
                prompt_len.to_string(),
                decode.to_string(),
                threads.to_string(),
                dtype.to_string(),
                match device {
                    DeviceSpec::Cuda(i) => format!("cuda:{i}"),
                    _ => "cpu".to_string(),
                },
                batch.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.reopen()?)
            .spawn()
            .context(
                "bench --torch: cannot start python3 (it needs python3 with torch and \
                 transformers: pip install torch transformers)",
            )?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("no stdout")?);
        let mut side = TorchSide {
            child,
            stdin,
            stdout,
            stderr,
            _script: script,
            version: String::new(),
            threads: 0,
        };
        let ready = side.reply()?;
        side.version = ready["torch"].as_str().unwrap_or("?").to_string();
        side.threads = ready["threads"].as_u64().unwrap_or(0) as usize;
        Ok(side)
    }

    /// The next JSON line, or an error carrying the tail of PyTorch's stderr.
    fn reply(&mut self) -> anyhow::Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line)?;
        if n == 0 {
            let err = std::fs::read_to_string(self.stderr.path()).unwrap_or_default();
            let tail: Vec<&str> = err.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!(
                "bench --torch: the PyTorch side stopped (it needs python3 with torch and \
                 transformers: pip install torch transformers)\n{}",
                tail.join("\n")
            );
        }
        serde_json::from_str(&line).with_context(|| format!("bench --torch: bad reply {line:?}"))
    }

    fn send(&mut self, cmd: &str) -> anyhow::Result<serde_json::Value> {
        use std::io::Write;
        writeln!(self.stdin, "{{\"cmd\": \"{cmd}\"}}")?;
        self.stdin.flush()?;
        self.reply()
    }

    fn check(&mut self) -> anyhow::Result<Vec<f32>> {
        let r = self.send("check")?;
        let logits = r["logits"]
            .as_array()
            .context("bench --torch: no logits in the reply")?;
        Ok(logits
            .iter()
            .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
            .collect())
    }

    /// One timed repetition: (prefill ms, decode ms, greedy tokens).
    fn run(&mut self) -> anyhow::Result<(f64, f64, Vec<u32>)> {
        let r = self.send("run")?;
        let ms = |k: &str| {
            r[k].as_f64()
                .with_context(|| format!("bench --torch: no {k} in the reply"))
        };
        let tokens = r["tokens"]
            .as_array()
            .context("bench --torch: no tokens in the reply")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(u64::MAX) as u32)
            .collect();
        Ok((ms("prefill_ms")?, ms("decode_ms")?, tokens))
    }

    fn quit(mut self) {
        let _ = self.send("quit");
        let _ = self.child.wait();
    }
}

impl BenchReport {
    /// The report as a Markdown table.
    pub fn to_markdown(&self) -> String {
        let dtype = if self.dtype == DType::BF16 {
            "bf16"
        } else {
            "f32"
        };
        let cpu = format!(
            "CPU ({} matmul threads, candle elementwise ops on {}; {}), candle matmuls by {}",
            self.threads,
            self.op_threads,
            if self.cpu_features.is_empty() {
                "no AVX2".to_string()
            } else {
                self.cpu_features.join(", ")
            },
            self.matmul,
        );
        let place = match self.device {
            DeviceSpec::Cuda(i) => format!("CUDA GPU {i} (cuBLAS; host {cpu})"),
            _ => cpu,
        };
        let mut s = format!(
            "Llama, {:.1}M parameters, {dtype}, {place}, \
             batch {} x prompt {} tokens, median of {} runs; max |logit difference| vs candle-transformers {:.2e}\n",
            self.params as f64 / 1e6,
            self.batch,
            self.prompt_len,
            self.reps,
            self.max_logit_diff
        );
        if let Some(t) = &self.torch {
            s.push_str(&format!(
                "PyTorch {} ({} threads, transformers LlamaForCausalLM, SDPA): max |logit difference| vs ours {:.2e}, greedy tokens {}\n",
                t.version,
                t.threads,
                t.max_logit_diff,
                if t.tokens_equal { "equal" } else { "DIFFER" }
            ));
        }
        s.push('\n');
        s.push_str("| phase | tokens | exitgraph ms | exitgraph tok/s | candle-transformers ms | candle-transformers tok/s | ours / theirs (time) |");
        if self.torch.is_some() {
            s.push_str(" PyTorch ms | PyTorch tok/s | ours / PyTorch (time) |");
        }
        s.push_str("\n|---|---:|---:|---:|---:|---:|---:|");
        if self.torch.is_some() {
            s.push_str("---:|---:|---:|");
        }
        s.push('\n');
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} |",
                r.phase,
                r.tokens,
                r.ours_ms,
                r.ours_tokens_per_s(),
                r.theirs_ms,
                r.theirs_tokens_per_s(),
                r.ratio()
            ));
            if let (Some(t), Some(ratio)) = (r.torch_ms, r.torch_ratio()) {
                s.push_str(&format!(
                    " {:.1} | {:.1} | {:.3} |",
                    t,
                    r.tokens as f64 / (t / 1e3),
                    ratio
                ));
            }
            s.push('\n');
        }
        if let Some((prefill, decode)) = &self.profile {
            s.push_str(&format!(
                "\n{}\n{}",
                prefill.to_markdown(),
                decode.to_markdown()
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(torch: bool) -> BenchReport {
        BenchReport {
            params: 124_700_000,
            device: DeviceSpec::Cpu,
            threads: 2,
            op_threads: 1,
            reps: 5,
            prompt_len: 128,
            batch: 1,
            dtype: DType::F32,
            matmul: "oneMKL",
            cpu_features: vec!["AVX2", "AVX-512F"],
            max_logit_diff: 0.0,
            torch: torch.then(|| TorchCheck {
                version: "2.15.0".into(),
                threads: 2,
                max_logit_diff: 3e-6,
                tokens_equal: true,
            }),
            profile: None,
            rows: vec![BenchRow {
                phase: "prefill",
                tokens: 128,
                ours_ms: 100.0,
                theirs_ms: 125.0,
                torch_ms: torch.then_some(160.0),
            }],
        }
    }

    #[test]
    fn the_table_has_rates_and_ratios_computed_by_hand() {
        // 128 tokens in 100 ms = 1280 tok/s; 125 ms = 1024 tok/s; 100 / 125 = 0.8;
        // PyTorch: 160 ms = 800 tok/s, 100 / 160 = 0.625.
        let md = report(true).to_markdown();
        assert!(
            md.contains("| prefill | 128 | 100.0 | 1280.0 | 125.0 | 1024.0 | 0.800 | 160.0 | 800.0 | 0.625 |"),
            "{md}"
        );
        assert!(
            md.contains("AVX2, AVX-512F") && md.contains("oneMKL"),
            "{md}"
        );
        assert!(md.contains("greedy tokens equal"), "{md}");
        let md = report(false).to_markdown();
        assert!(
            md.contains("| prefill | 128 | 100.0 | 1280.0 | 125.0 | 1024.0 | 0.800 |\n"),
            "{md}"
        );
        assert!(!md.contains("PyTorch"), "{md}");
    }

    #[test]
    fn phase_profile_averages_per_run_and_keeps_the_rest() {
        use exitgraph_compiler::op_profile::OpTime;
        use std::time::Duration;
        // Two runs: "mlp" 30 ms in 24 calls, "norm" 10 ms in 50 calls; the phase took 50 ms
        // in all. Per run: mlp 15 ms / 12 calls, norm 5 ms / 25 calls, wall 25 ms, so
        // 25 - 15 - 5 = 5 ms between ops; mlp is 60% of the phase.
        let mut t = std::collections::BTreeMap::new();
        t.insert(
            "norm".to_string(),
            OpTime {
                total: Duration::from_millis(10),
                calls: 50,
            },
        );
        t.insert(
            "mlp".to_string(),
            OpTime {
                total: Duration::from_millis(30),
                calls: 24,
            },
        );
        let p = PhaseProfile::from_table("prefill", 50.0, t, 2);
        assert_eq!(p.wall_ms, 25.0);
        assert_eq!(p.ops[0].0, "mlp", "largest first");
        assert!((p.ops[0].1 - 12.0).abs() < 1e-9 && (p.ops[0].2 - 15.0).abs() < 1e-9);
        assert!((p.ops[1].1 - 25.0).abs() < 1e-9 && (p.ops[1].2 - 5.0).abs() < 1e-9);
        assert!((p.unattributed_ms() - 5.0).abs() < 1e-9);
        let md = p.to_markdown();
        assert!(md.contains("| mlp | 12 | 15.00 | 60.0 |"), "{md}");
        assert!(md.contains("| 5.00 | 20.0 |"), "{md}");
    }

    #[test]
    fn each_row_gets_its_own_argmax_at_its_last_position() {
        // [2 rows, 2 positions, 3 vocab]: row 0 ends with [0, 5, 1], row 1 with [7, 0, 2];
        // the first positions' larger values must not leak in.
        let l = Tensor::new(
            &[
                [[9f32, 0., 0.], [0., 5., 1.]],
                [[0f32, 0., 9.], [7., 0., 2.]],
            ],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(argmax_rows(&l, 2).unwrap(), vec![1, 0]);
        assert_eq!(
            argmax_rows(&l.narrow(0, 1, 1).unwrap(), 1).unwrap(),
            vec![0]
        );
        let ids = step_ids(&[4, 2], &candle_core::Device::Cpu).unwrap();
        assert_eq!(ids.to_vec2::<u32>().unwrap(), vec![vec![4], vec![2]]);
    }

    #[test]
    fn medians_and_differences() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        assert_eq!(max_abs_diff(&[1.0, -2.0, 3.0], &[1.5, -2.0, 0.0]), 3.0);
        assert!(max_abs_diff(&[1.0, f32::NAN, 3.0], &[1.0, 2.0, 3.0]).is_nan());
        assert!(max_abs_diff(&[f32::NAN, 5.0], &[1.0, 2.0]).is_nan());
    }
}
