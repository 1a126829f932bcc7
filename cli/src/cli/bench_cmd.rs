use exitgraph::bench::{run as run_bench, BenchOptions};
use exitgraph::synth::LlamaSpec;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Benchmark this Llama checkpoint instead of a random ~100M-parameter one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt tokens in the prefill.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens decoded one at a time after the prefill.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Sequences run side by side in prefill and decode, each its own prompt (tokens/s
    /// count every row).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Layers of the random model.
    #[arg(long, default_value_t = 12)]
    layers: usize,
    /// Hidden size of the random model.
    #[arg(long, default_value_t = 768)]
    hidden: usize,
    /// Attention heads of the random model [default: hidden / 64].
    #[arg(long)]
    heads: Option<usize>,
    /// Key-value heads of the random model [default: as many as heads].
    #[arg(long)]
    kv_heads: Option<usize>,
    /// MLP intermediate size of the random model [default: hidden * 8 / 3].
    #[arg(long)]
    intermediate: Option<usize>,
    /// Vocabulary of the random model.
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weights and activations: f32 or bf16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// Also time PyTorch (transformers' LlamaForCausalLM with SDPA) on the same checkpoint,
    /// same threads, interleaved with ours; needs python3 with torch and transformers.
    #[arg(long)]
    torch: bool,
    /// Keep the random checkpoint in this new folder (e.g. for scripts/profile_torch.py).
    #[arg(long, conflicts_with = "model")]
    save_model: Option<PathBuf>,
    /// Also print our time op by op (projections, attention's parts, norms, activations,
    /// adds, LM head) for prefill and decode, from separate runs after the timed ones.
    #[arg(long)]
    profile: bool,
    /// Benchmark adaptive depth instead: decode speed of early exits and SkipDecode on the
    /// random model, measured against the ideal speedup their paths imply.
    #[arg(long)]
    exits: bool,
    /// Run on CUDA GPU N instead of the CPU (a `cuda` build; PyTorch then uses the same GPU).
    #[arg(long)]
    cuda: Option<usize>,
    /// Benchmark GemFilter instead: its time to first token against the full prefill, per
    /// --prompt-lens and --keep, beside the ideal speedup from FLOPs.
    #[arg(long, conflicts_with = "exits")]
    gemfilter: bool,
    /// With --gemfilter: prompt lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096,8192")]
    prompt_lens: Vec<usize>,
    /// With --gemfilter: tokens kept, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    keep: Vec<usize>,
    /// With --gemfilter: the 0-based filter layer [default: 13/32 of the layers, as the
    /// GemFilter paper's layer 13 of Llama 3.1 8B's 32].
    #[arg(long)]
    filter_layer: Option<usize>,
    /// With --gemfilter: the scores' average-pool kernel.
    #[arg(long, default_value_t = 5)]
    pool: usize,
    /// Benchmark one projection x·Wᵀ instead, per --shapes and --rows, in each form the CPU
    /// GEMM can run it, beside the form the lowering chooses.
    #[arg(long, conflicts_with_all = ["exits", "gemfilter"])]
    projections: bool,
    /// With --projections: shapes IN x OUT, comma-separated [default: the demo model's and
    /// the random bench model's projections].
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<exitgraph::bench_projections::Shape>,
    /// With --projections: rows per call, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,64")]
    rows: Vec<usize>,
    /// With --projections: calls per timed repetition.
    #[arg(long, default_value_t = 50)]
    calls: usize,
    /// Benchmark self-speculative decoding instead: the model's first ℓ layers draft through
    /// the shared final norm and LM head, the rest verify; speed against the full model,
    /// side by side, beside the ideal speedup (as `eval speculative`, on fixed-id prompts).
    #[arg(long, conflicts_with_all = ["exits", "gemfilter", "projections"])]
    speculative: bool,
    /// With --speculative: draft depths ℓ, comma-separated [default: a quarter and a half of
    /// the layers].
    #[arg(long, value_delimiter = ',')]
    draft_exits: Vec<usize>,
    /// With --speculative: draft lengths γ, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    drafts: Vec<usize>,
    /// With --speculative: stop thresholds, comma-separated; `none` drafts γ every cycle.
    #[arg(long, value_delimiter = ',', default_value = "none,0.6")]
    thresholds: Vec<String>,
    /// With --speculative: prompts decoded per run (--batch of them side by side).
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// With --speculative: multiply the random model's layer output projections (o_proj,
    /// down_proj) by this factor, so its layers move the residual stream less and a shallow
    /// draft agrees with the full model more often (acceptance by construction, to measure
    /// the speed side where drafts are accepted).
    #[arg(long, default_value_t = 1.0)]
    layer_scale: f32,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.projections {
        return projections(&a);
    }
    let mut spec = LlamaSpec::bench_100m();
    spec.layers = a.layers;
    spec.hidden = a.hidden;
    spec.heads = a.heads.unwrap_or((a.hidden / 64).max(1));
    spec.kv_heads = a.kv_heads.unwrap_or(spec.heads);
    spec.intermediate = a.intermediate.unwrap_or(a.hidden * 8 / 3);
    spec.vocab = a.vocab;
    // The random model's positions cover the prompt and the decoded tokens.
    spec.max_positions = spec.max_positions.max(a.prompt_len + a.decode_tokens + 1);
    if spec.heads == 0 || a.hidden % spec.heads != 0 {
        anyhow::bail!(
            "bench --heads {}: must divide --hidden {}",
            spec.heads,
            a.hidden
        );
    }
    if spec.kv_heads == 0 || spec.heads % spec.kv_heads != 0 {
        anyhow::bail!(
            "bench --kv-heads {}: must divide --heads {}",
            spec.kv_heads,
            spec.heads
        );
    }
    if a.batch == 0 {
        anyhow::bail!("bench --batch 0: at least one sequence");
    }
    if a.cuda.is_some() && a.profile {
        anyhow::bail!(
            "bench --profile times ops on the CPU only: GPU kernels run asynchronously, so a \
             host timer around an op measures its launch"
        );
    }
    if a.exits {
        for (given, flag) in [
            (a.torch, "--torch"),
            (a.profile, "--profile"),
            (a.save_model.is_some(), "--save-model"),
            (a.dtype != "f32", "--dtype"),
            (a.cuda.is_some(), "--cuda"),
            (a.batch != 1, "--batch"),
        ] {
            if given {
                anyhow::bail!(
                    "bench {flag} applies to the full-depth prefill and decode benchmark, not to --exits (f32, random model)"
                );
            }
        }
    }
    if a.speculative {
        for (given, flag) in [
            (a.torch, "--torch"),
            (a.profile, "--profile"),
            (a.save_model.is_some(), "--save-model"),
            (a.dtype != "f32", "--dtype"),
            (a.cuda.is_some(), "--cuda"),
        ] {
            if given {
                anyhow::bail!("bench {flag} does not apply to --speculative (f32, on the CPU)");
            }
        }
        if a.drafts.contains(&0) {
            anyhow::bail!("bench --drafts 0: a draft has at least one token");
        }
    }
    if a.gemfilter {
        for (given, flag) in [
            (a.torch, "--torch"),
            (a.profile, "--profile"),
            (a.save_model.is_some(), "--save-model"),
            (a.batch != 1, "--batch"),
            (a.model.is_some(), "--model"),
        ] {
            if given {
                anyhow::bail!(
                    "bench {flag} does not apply to --gemfilter (one prompt, a random model)"
                );
            }
        }
    }
    let opts = BenchOptions {
        spec,
        model_dir: a.model,
        prompt_len: a.prompt_len,
        decode_tokens: a.decode_tokens,
        batch: a.batch,
        reps: a.reps.max(1),
        seed: a.seed,
        dtype: if a.dtype == "bf16" {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        },
        torch: a.torch,
        save_model: a.save_model,
        profile: a.profile,
        device: a.cuda.map_or(
            exitgraph::device::DeviceSpec::Cpu,
            exitgraph::device::DeviceSpec::Cuda,
        ),
    };
    if a.gemfilter {
        let bench = exitgraph::bench_gemfilter::GemFilterBench {
            prompt_lens: a.prompt_lens.clone(),
            keeps: a.keep.clone(),
            filter_layer: a.filter_layer.unwrap_or(a.layers * 13 / 32),
            pool: a.pool,
        };
        let report = with_spinner(|p| exitgraph::bench_gemfilter::run(&opts, &bench, p))?;
        out!("{}", report.to_markdown());
        return Ok(());
    }
    if a.speculative {
        let bench = exitgraph::bench_speculative::SpecBench {
            exits: a.draft_exits.clone(),
            drafts: a.drafts.clone(),
            thresholds: exitgraph::eval::speculative::parse_thresholds(&a.thresholds)?,
            prompts: a.prompts,
            layer_scale: a.layer_scale,
        };
        let report = with_spinner(|p| exitgraph::bench_speculative::run(&opts, &bench, p))?;
        out!(
            "CPU: {}; {} matmul threads\n",
            exitgraph::cpu::features().join(", "),
            exitgraph::cpu::matmul_threads()
        );
        out!("{}", report.to_markdown());
        return Ok(());
    }
    if a.exits {
        let report = with_spinner(|p| exitgraph::bench_exits::run(&opts, p))?;
        out!("{}", report.to_markdown());
        return Ok(());
    }
    let bar = ProgressBar::new(opts.reps as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} runs ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("bench");
    let report = run_bench(&opts, |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    out!("{}", report.to_markdown());
    Ok(())
}

/// Runs `f` with a spinner that shows what it reports it is running.
fn with_spinner<T>(f: impl FnOnce(&mut dyn FnMut(&str)) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let bar = ProgressBar::new_spinner();
    let result = f(&mut |what: &str| {
        bar.set_message(what.to_string());
        bar.tick();
    });
    bar.finish_and_clear();
    result
}

fn projections(a: &Args) -> anyhow::Result<()> {
    use exitgraph::bench_projections::{run, Shape, DEFAULT_SHAPES};
    for (given, flag) in [
        (a.torch, "--torch"),
        (a.profile, "--profile"),
        (a.save_model.is_some(), "--save-model"),
        (a.model.is_some(), "--model"),
        (a.cuda.is_some(), "--cuda"),
        (a.batch != 1, "--batch"),
        (a.dtype != "f32", "--dtype"),
    ] {
        if given {
            anyhow::bail!("bench {flag} does not apply to --projections (f32 on the CPU)");
        }
    }
    if let Some(r) = a.rows.iter().find(|&&r| r == 0) {
        anyhow::bail!("bench --rows {r}: a call has at least one row");
    }
    if a.calls == 0 {
        anyhow::bail!("bench --calls 0: at least one call per repetition");
    }
    let shapes: Vec<Shape> = if a.shapes.is_empty() {
        DEFAULT_SHAPES
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?
    } else {
        a.shapes.clone()
    };
    let bar = ProgressBar::new_spinner();
    let report = run(&shapes, &a.rows, a.reps.max(1), a.calls, |what| {
        bar.set_message(what.to_string());
        bar.tick();
    })?;
    bar.finish_and_clear();
    out!("{}", report.to_markdown());
    Ok(())
}
