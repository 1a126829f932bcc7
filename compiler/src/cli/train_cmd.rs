use exitgraph::train::lm::train_lm;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum TrainCommand {
    /// Train a Llama-architecture language model from scratch on the synthetic corpus.
    Lm(LmArgs),
}

#[derive(clap::Args)]
pub struct LmArgs {
    /// Training config (RON), e.g. examples/demo-train.ron.
    config: PathBuf,
    /// Continue from the newest checkpoint in OUTPUT/checkpoints.
    #[arg(long)]
    resume: bool,
}

pub fn run(cmd: TrainCommand) -> anyhow::Result<()> {
    match cmd {
        TrainCommand::Lm(a) => {
            let report = train_lm(&a.config, a.resume, true)?;
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
            outln!("wrote {}", report.output.display());
            Ok(())
        }
    }
}
