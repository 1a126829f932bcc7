use exitgraph::train::lm::train_lm;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum TrainCommand {
    /// Train a Llama-architecture language model from scratch on the synthetic corpus.
    Lm(LmArgs),
    /// Train a pipeline's exit heads and gates by self-distillation (backbone frozen; on a
    /// looped model, --train-adapters / --train-shared train the adapters / shared block too).
    Exits(ExitsArgs),
    /// Uptrain a Relaxed Recursive Transformer (TieLayers + DepthLora pipeline): the
    /// depth-wise LoRA adapters, and the shared block with --train-shared.
    Recursive(RecursiveArgs),
}

#[derive(clap::Args)]
pub struct RecursiveArgs {
    /// Pipeline (RON) with a TieLayers pass and (usually) a DepthLora pass, on a model with
    /// tokenizer.json.
    pipeline: PathBuf,
    /// Output folder: lora.safetensors, tied.safetensors (with --train-shared), pipeline.ron
    /// (referencing them), training.json.
    #[arg(long, short)]
    out: PathBuf,
    /// Train the shared block's weights too (otherwise only the adapters train).
    #[arg(long)]
    train_shared: bool,
    /// Weight of the distillation term KL(original model ‖ recursive model), added to the
    /// next-token cross-entropy; 0 turns it off.
    #[arg(long, default_value_t = 0.0)]
    distill: f64,
    /// Corpus tasks to train on, comma-separated; all when omitted.
    #[arg(long, value_delimiter = ',')]
    data: Vec<String>,
    #[arg(long, default_value_t = 4000)]
    examples: usize,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(clap::Args)]
pub struct ExitsArgs {
    /// Pipeline (RON) with an InsertExits pass of Linear, Mlp or AttentionAdapter heads, or
    /// gates.
    pipeline: PathBuf,
    /// Output folder: heads.safetensors, pipeline.ron (referencing them), training.json.
    #[arg(long, short)]
    out: PathBuf,
    /// Corpus tasks to train on, comma-separated; all when omitted.
    #[arg(long, value_delimiter = ',')]
    data: Vec<String>,
    #[arg(long, default_value_t = 4000)]
    examples: usize,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Weight of the distillation term (KL to the final layer); the rest is the label loss.
    #[arg(long, default_value_t = 0.5)]
    distill: f64,
    /// Train the pipeline's DepthLora adapters with the exits (the final layer's own
    /// cross-entropy joins the loss); otherwise they stay frozen.
    #[arg(long)]
    train_adapters: bool,
    /// Train the shared block of the pipeline's TieLayers with the exits (with
    /// --train-adapters when the pipeline has adapters).
    #[arg(long)]
    train_shared: bool,
    /// `distill` (the --distill mix of KL and label loss) or `kangaroo` (AttentionAdapter
    /// heads only: cross-entropy to the full model's soft distribution, backbone and LM head
    /// frozen).
    #[arg(long, default_value = "distill")]
    objective: exitgraph::exits::train::Objective,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(clap::Args)]
pub struct LmArgs {
    /// Training config (RON), e.g. examples/demo-train.ron.
    config: PathBuf,
    /// Continue from the newest checkpoint in OUTPUT.run/checkpoints.
    #[arg(long)]
    resume: bool,
    /// Replace a model already in the output folder (only once training has finished).
    #[arg(long)]
    force: bool,
}

/// The optimisation settings `train exits` and `train recursive` share: a short warm-up,
/// cosine decay to a tenth of the peak, clipping at 1, four evaluations.
fn short_run(steps: usize, lr: f64) -> exitgraph::train::TrainConfig {
    exitgraph::train::TrainConfig {
        steps,
        grad_accum: 1,
        lr,
        min_lr: lr * 0.1,
        warmup_steps: (steps / 20).min(50),
        adamw: None,
        clip_norm: Some(1.0),
        eval_every: (steps / 4).max(1),
        checkpoint_every: 0,
    }
}

fn tasks(names: &[String]) -> anyhow::Result<Vec<exitgraph::corpus::Task>> {
    names.iter().map(|t| t.parse()).collect()
}

pub fn run(cmd: TrainCommand) -> anyhow::Result<()> {
    match cmd {
        TrainCommand::Recursive(a) => {
            use exitgraph::train::recursive::{train_recursive, RecursiveTrainSpec};
            let spec = RecursiveTrainSpec {
                tasks: tasks(&a.data)?,
                examples: a.examples,
                seed: a.seed,
                seq_len: a.seq_len,
                batch_size: a.batch_size,
                distill: a.distill,
                train_shared: a.train_shared,
                training: short_run(a.steps, a.lr),
            };
            let report = train_recursive(&a.pipeline, &a.out, &spec, true)?;
            outln!(
                "trained {} parameters for {} steps in {:.0} s; held-out loss {:.4} -> {:.4}",
                report.trainable,
                report.log.train_loss.len(),
                report.log.seconds,
                report.eval_before,
                report.eval_after
            );
            for f in report.adapters.iter().chain(&report.shared) {
                outln!("wrote {}", f.display());
            }
            outln!("wrote {}", report.pipeline.display());
            Ok(())
        }
        TrainCommand::Exits(a) => {
            use exitgraph::exits::train::{train_exits, ExitTrainSpec};
            let spec = ExitTrainSpec {
                tasks: tasks(&a.data)?,
                examples: a.examples,
                seed: a.seed,
                seq_len: a.seq_len,
                batch_size: a.batch_size,
                distill: a.distill,
                train_adapters: a.train_adapters,
                train_shared: a.train_shared,
                objective: a.objective,
                training: short_run(a.steps, a.lr),
            };
            let report = train_exits(&a.pipeline, &a.out, &spec, true)?;
            let last_eval = report.log.eval_loss.last().map_or(f64::NAN, |e| e.1);
            outln!(
                "trained {} parameters of exits after layers {:?} for {} steps in {:.0} s; held-out loss {:.4} -> {last_eval:.4}",
                report.trainable,
                report.exits,
                report.log.train_loss.len(),
                report.log.seconds,
                report.eval_before
            );
            if let Some((before, after)) = report.final_loss {
                outln!("the final layer's held-out loss {before:.4} -> {after:.4}");
            }
            for f in std::iter::once(&report.heads)
                .chain(&report.adapters)
                .chain(&report.shared)
            {
                outln!("wrote {}", f.display());
            }
            outln!("wrote {}", report.pipeline.display());
            Ok(())
        }
        TrainCommand::Lm(a) => {
            let report = train_lm(&a.config, a.resume, a.force, true)?;
            let last_eval = report.log.eval_loss.last().map_or(f64::NAN, |e| e.1);
            outln!(
                "trained {} parameters (vocabulary {}) on {} rows for {} steps in {:.0} s ({} tokens); eval loss {last_eval:.4}",
                report.params,
                report.vocab,
                report.train_rows,
                report.log.train_loss.len(),
                report.log.seconds,
                report.log.tokens
            );
            for stage in &report.stages {
                let generated = if stage.lead_needles > 0 {
                    format!(" and {} generated needles", stage.lead_needles)
                } else {
                    String::new()
                };
                outln!(
                    "  from step {}: {} examples{generated} in {} rows of {} tokens, batches of {}",
                    stage.from_step,
                    stage.examples,
                    stage.rows,
                    stage.seq_len,
                    stage.batch_size
                );
            }
            outln!("wrote {}", report.output.display());
            Ok(())
        }
    }
}
