use exitgraph::eval::layers::eval_layers;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Per task, answer-token accuracy when decoding from each layer (logit lens).
    Layers(LayersArgs),
    /// Speed against quality of early exiting: sweep exit rules' thresholds.
    Exits(Box<ExitsArgs>),
    /// Relaxed Recursive Transformers' quality table: each tying, init and LoRA rank before
    /// and after uptraining, beside the original and same-size models trained from scratch.
    Recursive(Box<RecursiveArgs>),
    /// Needle-in-a-haystack retrieval by generation, a GemFilter pipeline beside the full
    /// model, per context length and depth of the fact; time to first token and peak KV.
    Needle(NeedleArgs),
    /// Self-speculative decoding against the full model: losslessness, acceptance, tokens
    /// per verification, time split and speedup per draft depth, draft length, stop
    /// threshold and batch, beside the ideal speedup.
    Speculative(SpeculativeArgs),
}

#[derive(clap::Args)]
pub struct SpeculativeArgs {
    /// Pipeline (RON) whose InsertExits pass puts an exit head after every draft depth swept.
    pipeline: PathBuf,
    /// Further pipelines on the same model (e.g. trained Kangaroo adapters beside the shared
    /// head), swept setting by setting beside the first.
    #[arg(long)]
    compare: Vec<PathBuf>,
    /// Draft depths ℓ (layers the draft runs), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    exits: Vec<usize>,
    /// Draft lengths γ (most tokens drafted per cycle), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4,6,8")]
    drafts: Vec<usize>,
    /// Stop thresholds (Kangaroo's stop_below), comma-separated; `none` drafts γ every cycle.
    #[arg(long, value_delimiter = ',', default_value = "none,0.6")]
    thresholds: Vec<String>,
    /// Batch sizes (requests decoded side by side), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    /// Held-out prompts (corpus examples cut at their first answer).
    #[arg(long, default_value_t = 16)]
    examples: usize,
    /// Corpus tasks of the prompts, comma-separated (all when empty).
    #[arg(long, value_delimiter = ',')]
    data: Vec<String>,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed repetitions (the median is reported; the range is the noise).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Write one line per row as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn speculative(a: SpeculativeArgs) -> anyhow::Result<()> {
    use exitgraph::eval::speculative::{parse_thresholds, prompts, sweep, SpecOptions};
    let pipeline = exitgraph::pipeline::Pipeline::read(&a.pipeline)?;
    let compiled = exitgraph::pipeline::compile(&pipeline, &a.pipeline)?;
    let tok_path = compiled.checkpoint.tokenizer.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: eval speculative needs the model's tokenizer.json",
            compiled.model_dir.display()
        )
    })?;
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let tasks = a
        .data
        .iter()
        .map(|t| t.parse())
        .collect::<anyhow::Result<Vec<exitgraph::corpus::Task>>>()?;
    if a.batches.contains(&0) {
        anyhow::bail!("--batches: a batch holds at least one request");
    }
    if a.new_tokens == 0 {
        anyhow::bail!("--new-tokens must be at least 1");
    }
    let opts = SpecOptions {
        exits: a.exits.clone(),
        drafts: a.drafts.clone(),
        thresholds: parse_thresholds(&a.thresholds)?,
        batches: a.batches.clone(),
        new_tokens: a.new_tokens,
        reps: a.reps,
    };
    let cases = prompts(&tokenizer, &tasks, a.seed, a.examples)?;
    let positions = compiled.graph.info.max_positions;
    if let Some(c) = cases
        .iter()
        .find(|c| c.prompt.len() + a.new_tokens > positions)
    {
        anyhow::bail!(
            "--new-tokens {}: a prompt of {} tokens would run past the model's {positions} positions",
            a.new_tokens,
            c.prompt.len()
        );
    }
    let name = |p: &std::path::Path| {
        p.file_name()
            .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
    };
    let mut programs = vec![(name(&a.pipeline), std::sync::Arc::new(compiled.lower()?))];
    let model = std::fs::canonicalize(&compiled.model_dir).unwrap_or(compiled.model_dir.clone());
    for other in &a.compare {
        let pipeline = exitgraph::pipeline::Pipeline::read(other)?;
        let c = exitgraph::pipeline::compile(&pipeline, other)?;
        let theirs = std::fs::canonicalize(&c.model_dir).unwrap_or(c.model_dir.clone());
        if theirs != model {
            anyhow::bail!(
                "--compare {}: it runs the model in {}, and {} the one in {}; compare drafts on one model",
                other.display(),
                theirs.display(),
                a.pipeline.display(),
                model.display()
            );
        }
        programs.push((name(other), std::sync::Arc::new(c.lower()?)));
    }
    let bar = indicatif::ProgressBar::new_spinner();
    let report = sweep(&programs, &cases, &opts, |what| {
        bar.set_message(what.to_string());
        bar.tick();
    })
    .map_err(|e| anyhow::anyhow!("{}: {e:#}", a.pipeline.display()))?;
    bar.finish_and_clear();
    out!("{}", report.to_markdown());
    if let Some(path) = &a.csv {
        exitgraph::atomic::write_text(path, &report.to_csv())?;
        outln!("wrote {}", path.display());
    }
    if let Some(path) = &a.json {
        exitgraph::atomic::write_text(path, &serde_json::to_string_pretty(&report)?)?;
        outln!("wrote {}", path.display());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct NeedleArgs {
    /// The pipeline to evaluate (with a GemFilter pass unless --compare is given).
    pipeline: PathBuf,
    /// Pipeline to compare with (default: the same pipeline without its GemFilter pass).
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Context lengths the haystacks fill, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048")]
    lengths: Vec<usize>,
    /// Depths of the fact as lo:hi:step (0: the haystack's start, 1: just before the question).
    #[arg(long, default_value = "0:1:0.1")]
    depths: String,
    /// Haystacks per (length, depth).
    #[arg(long, default_value_t = 10)]
    cases: usize,
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Write one line per (method, length, depth) as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the green/red heatmap (PNG), one panel per pipeline.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn needle(a: NeedleArgs) -> anyhow::Result<()> {
    use exitgraph::eval::needle_gen::{eval_needle_pipelines, parse_depths, NeedleOptions};
    let opts = NeedleOptions {
        lengths: a.lengths.clone(),
        depths: parse_depths(&a.depths)?,
        cases: a.cases,
        seed: a.seed,
    };
    let bar = indicatif::ProgressBar::new_spinner();
    let report = eval_needle_pipelines(&a.pipeline, a.compare.as_deref(), &opts, |msg| {
        bar.set_message(msg.to_string());
        bar.tick();
    })?;
    bar.finish_and_clear();
    out!("{}", report.to_markdown());
    if let Some(path) = &a.csv {
        exitgraph::atomic::write_text(path, &report.to_csv())?;
        outln!("wrote {}", path.display());
    }
    if let Some(path) = &a.json {
        exitgraph::atomic::write_text(path, &serde_json::to_string_pretty(&report)?)?;
        outln!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        report.write_plot(path)?;
        outln!("wrote {}", path.display());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct RecursiveArgs {
    /// Checkpoint folder with tokenizer.json; the demo model when omitted.
    model_dir: Option<PathBuf>,
    /// Loop counts to tie the layers into, comma-separated (each must divide the layers).
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    loops: Vec<usize>,
    /// Initialisations of the shared block: stepwise, average, lower.
    #[arg(long, value_delimiter = ',', default_value = "stepwise,average,lower")]
    inits: Vec<String>,
    /// LoRA ranks (0: no adapters; full: min(in, out)).
    #[arg(long, value_delimiter = ',', default_value = "0,4,16,64,full")]
    ranks: Vec<String>,
    /// Uptraining steps of every row (the same budget everywhere).
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Peak learning rate (warm-up over a tenth of the steps, cosine decay to a tenth).
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Training examples generated (seed --seed).
    #[arg(long, default_value_t = 4000)]
    examples: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Weight of the distillation term KL(original ‖ recursive) during uptraining.
    #[arg(long, default_value_t = 0.0)]
    distill: f64,
    /// Held-out examples every row is evaluated on (seed --eval-seed).
    #[arg(long, default_value_t = 500)]
    eval_examples: usize,
    #[arg(long, default_value_t = 1000)]
    eval_seed: u64,
    /// Skip the same-size models trained from scratch.
    #[arg(long)]
    no_scratch: bool,
    /// Folder for the runs (pipelines, adapters, scratch models).
    #[arg(long, default_value = "runs/recursive")]
    work: PathBuf,
    /// Write the table as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Plot held-out loss against layer parameters (PNG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Evaluate nothing: print (and write as CSV/plot) a report an earlier run wrote with
    /// --json.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn parse_init(s: &str) -> anyhow::Result<exitgraph::passes::TieInit> {
    use exitgraph::passes::TieInit;
    match s.trim().to_ascii_lowercase().as_str() {
        "stepwise" => Ok(TieInit::Stepwise),
        "average" => Ok(TieInit::Average),
        "lower" => Ok(TieInit::Lower),
        other => anyhow::bail!("--inits: unknown init \"{other}\" (stepwise, average, lower)"),
    }
}

fn parse_rank(s: &str) -> anyhow::Result<Option<exitgraph::passes::LoraRank>> {
    use exitgraph::passes::LoraRank;
    match s.trim() {
        "full" | "Full" => Ok(Some(LoraRank::Full)),
        "0" => Ok(None),
        r => r
            .parse::<usize>()
            .map(|r| Some(LoraRank::Rank(r)))
            .map_err(|_| anyhow::anyhow!("--ranks: \"{r}\" is neither a number nor full")),
    }
}

fn recursive(a: RecursiveArgs) -> anyhow::Result<()> {
    use exitgraph::eval::recursive::{eval_recursive, GridReport, GridSpec};
    use exitgraph::train::recursive::RecursiveTrainSpec;
    if let Some(path) = &a.report {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let report: GridReport = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
        return write_recursive_report(&a, &report);
    }
    let spec = GridSpec {
        model: a
            .model_dir
            .clone()
            .unwrap_or_else(exitgraph::pipeline::demo_model_dir),
        loops: a.loops.clone(),
        inits: a
            .inits
            .iter()
            .map(|s| parse_init(s))
            .collect::<anyhow::Result<_>>()?,
        ranks: a
            .ranks
            .iter()
            .map(|s| parse_rank(s))
            .collect::<anyhow::Result<_>>()?,
        uptrain: RecursiveTrainSpec {
            tasks: Vec::new(),
            examples: a.examples,
            seed: a.seed,
            seq_len: a.seq_len,
            batch_size: a.batch_size,
            distill: a.distill,
            train_shared: true,
            training: exitgraph::train::TrainConfig {
                steps: a.steps,
                grad_accum: 1,
                lr: a.lr,
                min_lr: a.lr * 0.1,
                warmup_steps: (a.steps / 10).min(50),
                adamw: None,
                clip_norm: Some(1.0),
                eval_every: 0,
                checkpoint_every: 0,
            },
        },
        scratch: !a.no_scratch,
        eval_seed: a.eval_seed,
        eval_examples: a.eval_examples,
        work: a.work.clone(),
    };
    let report = eval_recursive(&spec, |row| {
        eprintln!(
            "{} rank {} {:?}: held-out loss {:.4} ({:.0} s training)",
            row.model, row.rank, row.stage, row.quality.loss, row.train_seconds
        );
    })?;
    write_recursive_report(&a, &report)
}

fn write_recursive_report(
    a: &RecursiveArgs,
    report: &exitgraph::eval::recursive::GridReport,
) -> anyhow::Result<()> {
    out!("{}", report.to_markdown());
    outln!(
        "uptraining: {} steps x {} rows x {} tokens = {} tokens per trained row; {} held-out examples (seed {})",
        report.steps,
        report.batch_size,
        report.seq_len,
        report.tokens_per_run,
        report.eval_examples,
        report.eval_seed
    );
    if let Some(path) = &a.csv {
        exitgraph::atomic::write_text(path, &report.to_csv())?;
        outln!("wrote {}", path.display());
    }
    if let Some(path) = &a.json {
        exitgraph::atomic::write_text(path, &serde_json::to_string_pretty(report)?)?;
        outln!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        exitgraph::eval::plot::line_chart_png(
            path,
            "Relaxed recursive models: held-out loss against size",
            "layer parameters (millions; grows with the LoRA rank)",
            "held-out cross-entropy (nats)",
            &report.plot_series(),
            (1100, 700),
        )?;
        outln!("wrote {}", path.display());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ExitsArgs {
    /// Pipeline (RON) with an InsertExits pass, on a model with tokenizer.json.
    pipeline: PathBuf,
    /// Corpus tasks to draw cases from, comma-separated (copy, count, recall, addition,
    /// grammar); all when omitted.
    #[arg(long, value_delimiter = ',')]
    data: Vec<String>,
    /// Held-out examples (seed of the held-out corpus: --seed).
    #[arg(long, default_value_t = 200)]
    examples: usize,
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Longest continuation per case.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// RULE=lo:hi:step (confidence, margin, entropy, patience, saturation, gate); repeat for
    /// several rules.
    #[arg(long, required_unless_present_any = ["report", "skipdecode"])]
    sweep: Vec<String>,
    /// A SkipDecode schedule to evaluate beside the rules, MAX:MIN:WARMUP[:LENGTH] (layers
    /// at position 0, layers from position LENGTH-1 on, warm-up layers; LENGTH defaults to
    /// the model's positions); repeat for several.
    #[arg(long)]
    skipdecode: Vec<String>,
    /// CALM's decaying threshold for every swept confidence-type rule (confidence, margin,
    /// saturation, gate): λ_t = clip(0.9·λ + 0.1·e^(−τ·t/N)).
    #[arg(long)]
    decay_tau: Option<f64>,
    /// Timing repetitions per setting (median and range reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Evaluate nothing: print (and write as CSV/plot) a report an earlier run wrote with
    /// --json.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Pick, per rule, the threshold with the best speedup reaching this agreement with the
    /// full model on a calibration half, and report it on the held-out half.
    #[arg(long)]
    target_agreement: Option<f64>,
    /// With --target-agreement: choose by Learn-then-Test instead of the point estimate, so
    /// that with probability at least 1 − EPSILON the chosen threshold's expected
    /// disagreement is at most 1 − the target (CALM's calibration).
    #[arg(long, requires = "target_agreement")]
    ltt_epsilon: Option<f64>,
    /// Write every row as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write a plot of speedup against agreement (PNG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct LayersArgs {
    /// Checkpoint folder with tokenizer.json (trained by `exitgraph train lm`); the demo
    /// model when omitted.
    model_dir: Option<PathBuf>,
    /// Seed of the held-out corpus (the demo model trained on seed 1).
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    /// Held-out examples, mixed evenly over the tasks.
    #[arg(long, default_value_t = 1000)]
    examples: usize,
    /// Corpus tasks to score, comma-separated (any task of the corpus, `repeat` and
    /// `needle` included); the five short ones (copy, count, recall, addition, grammar)
    /// when omitted.
    #[arg(long, value_delimiter = ',')]
    data: Vec<String>,
    /// Also write the table as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also measure needle retrieval by depth with haystacks filling this many tokens (the
    /// full model; see `eval::needle`).
    #[arg(long, value_name = "TOKENS")]
    needle: Option<usize>,
    /// Haystacks per depth for --needle.
    #[arg(long, default_value_t = 20)]
    needle_cases: usize,
    /// Also write the needle table as JSON.
    #[arg(long, requires = "needle")]
    needle_json: Option<PathBuf>,
}

fn write_exit_report(
    a: &ExitsArgs,
    report: &exitgraph::eval::exits::ExitReport,
) -> anyhow::Result<()> {
    out!("{}", report.to_markdown());
    if let Some(path) = &a.csv {
        exitgraph::atomic::write_text(path, &report.to_csv())?;
        outln!("wrote {}", path.display());
    }
    if let Some(path) = &a.json {
        exitgraph::atomic::write_text(path, &serde_json::to_string_pretty(report)?)?;
        outln!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        exitgraph::eval::exits::plot(report, path)?;
        outln!("wrote {}", path.display());
    }
    Ok(())
}

fn exits(a: ExitsArgs) -> anyhow::Result<()> {
    use exitgraph::eval::exits::{
        corpus_cases, parse_skipdecode, parse_sweep, sweep, Setting, SweepOptions,
    };
    use exitgraph::exits::ExitRule;
    if let Some(path) = &a.report {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let report: exitgraph::eval::exits::ExitReport = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column()))?;
        return write_exit_report(&a, &report);
    }
    let pipeline = exitgraph::pipeline::Pipeline::read(&a.pipeline)?;
    let compiled = exitgraph::pipeline::compile(&pipeline, &a.pipeline)?;
    let tok_path = compiled.checkpoint.tokenizer.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: eval exits needs the model's tokenizer.json",
            compiled.model_dir.display()
        )
    })?;
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let tasks = a
        .data
        .iter()
        .map(|t| t.parse())
        .collect::<anyhow::Result<Vec<exitgraph::corpus::Task>>>()?;
    if let Some(t) = a.target_agreement {
        if !(0.0..=1.0).contains(&t) {
            anyhow::bail!("--target-agreement {t} is outside 0..=1");
        }
    }
    if let Some(e) = a.ltt_epsilon {
        if !(e > 0.0 && e < 1.0) {
            anyhow::bail!("--ltt-epsilon {e} must be between 0 and 1");
        }
    }
    if a.reps == 0 {
        anyhow::bail!("--reps must be at least 1");
    }
    let layers = compiled.graph.info.num_layers;
    let mut settings = Vec::new();
    for s in &a.sweep {
        for rule in parse_sweep(s)? {
            let rule = match a.decay_tau {
                Some(tau)
                    if matches!(
                        rule,
                        ExitRule::Confidence(_)
                            | ExitRule::Margin(_)
                            | ExitRule::Saturation(_)
                            | ExitRule::Gate(_)
                    ) =>
                {
                    ExitRule::Decaying {
                        rule: Box::new(rule),
                        tau,
                    }
                }
                _ => rule,
            };
            rule.validate()
                .map_err(|e| anyhow::anyhow!("--decay-tau: {e}"))?;
            settings.push(Setting::Rule(rule));
        }
    }
    for s in &a.skipdecode {
        settings.push(Setting::Skip(parse_skipdecode(s, layers)?));
    }
    let cases = corpus_cases(&tokenizer, &tasks, a.seed, a.examples, a.max_new_tokens)?;
    let program = std::sync::Arc::new(compiled.lower()?);
    let bar = indicatif::ProgressBar::new_spinner();
    let opts = SweepOptions {
        batch: a.batch,
        reps: a.reps,
        target: a.target_agreement,
        epsilon: a.ltt_epsilon,
    };
    let report = sweep(program, &cases, &settings, &opts, |what| {
        bar.set_message(what.to_string());
        bar.tick();
    })?;
    bar.finish_and_clear();
    write_exit_report(&a, &report)
}

pub fn run(cmd: EvalCommand) -> anyhow::Result<()> {
    match cmd {
        EvalCommand::Exits(a) => exits(*a),
        EvalCommand::Recursive(a) => recursive(*a),
        EvalCommand::Needle(a) => needle(a),
        EvalCommand::Speculative(a) => speculative(a),
        EvalCommand::Layers(a) => {
            let dir = a
                .model_dir
                .unwrap_or_else(exitgraph::pipeline::demo_model_dir);
            let tasks = a
                .data
                .iter()
                .map(|t| t.parse())
                .collect::<anyhow::Result<Vec<exitgraph::corpus::Task>>>()?;
            let report = eval_layers(&dir, a.seed, a.examples, &tasks)?;
            out!("{}", report.to_markdown());
            if report.skipped > 0 {
                outln!(
                    "({} examples longer than the model's positions left out)",
                    report.skipped
                );
            }
            if let Some(path) = &a.json {
                exitgraph::atomic::write_text(path, &serde_json::to_string_pretty(&report)?)?;
                outln!("wrote {}", path.display());
            }
            if let Some(tokens) = a.needle {
                let needle =
                    exitgraph::eval::needle::eval_needle(&dir, tokens, a.needle_cases, a.seed)?;
                outln!();
                out!("{}", needle.to_markdown());
                if let Some(path) = &a.needle_json {
                    exitgraph::atomic::write_text(path, &serde_json::to_string_pretty(&needle)?)?;
                    outln!("wrote {}", path.display());
                }
            }
            Ok(())
        }
    }
}
