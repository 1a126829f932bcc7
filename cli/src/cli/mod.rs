//! Subcommands of `exitgraph`.

mod bench_cmd;
mod compile_cmd;
mod eval_cmd;
mod forward_cmd;
mod inspect_cmd;
mod profile_cmd;
mod run_cmd;
mod serve_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "exitgraph",
    version,
    about = "Compile and run adaptive-depth transformers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ops, layers, parameters, FLOPs per token and weight memory of a checkpoint.
    Inspect(inspect_cmd::Args),
    /// Run a checkpoint on token ids from a safetensors file; write every hidden state.
    Forward(forward_cmd::Args),
    /// Run a pipeline's passes and print what each did.
    Compile(compile_cmd::Args),
    /// Text in, text out through a pipeline (embeddings for encoders).
    Run(run_cmd::RunArgs),
    /// Sentence embeddings of texts through an encoder pipeline.
    Encode(run_cmd::EncodeArgs),
    /// Time prefill and decode against candle-transformers' Llama on the same weights.
    Bench(bench_cmd::Args),
    /// Serve a workload through the ECS runtime with a batching policy; print latency and
    /// throughput metrics.
    Serve(serve_cmd::Args),
    /// Measure step times of a pipeline's program for the simulated executor.
    Profile(profile_cmd::Args),
    /// Evaluate models (`eval layers MODEL_DIR`).
    #[command(subcommand)]
    Eval(eval_cmd::EvalCommand),
    /// Train models (`train lm CONFIG.ron`).
    #[command(subcommand)]
    Train(train_cmd::TrainCommand),
}

pub fn main() -> ExitCode {
    exitgraph::cpu::pin_thread_count();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Inference commands only: training's backward pass is elementwise-heavy and was 1.2-1.35×
    // slower with candle's pool on one thread (docs/benchmarks.md).
    if !matches!(cli.command, Command::Train(_)) {
        exitgraph::cpu::configure_threads();
    }
    let result = match cli.command {
        Command::Inspect(a) => inspect_cmd::run(a),
        Command::Forward(a) => forward_cmd::run(a),
        Command::Compile(a) => compile_cmd::run(a),
        Command::Run(a) => run_cmd::run(a),
        Command::Encode(a) => run_cmd::encode(a),
        Command::Bench(a) => bench_cmd::run(a),
        Command::Train(t) => train_cmd::run(t),
        Command::Eval(e) => eval_cmd::run(e),
        Command::Serve(a) => serve_cmd::run(a),
        Command::Profile(a) => profile_cmd::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
