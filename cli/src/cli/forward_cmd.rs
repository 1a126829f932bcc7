use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use exitgraph::device::{DeviceSpec, DtypeSpec};
use exitgraph::generate::GenerateOptions;
use exitgraph::lower::Inputs;
use exitgraph::pipeline::{compile, Pipeline};
use exitgraph::runtime::generate_with_strategy;
use exitgraph::tensor_io::{read_forward_inputs, write_atomic};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint folder (config.json, safetensors), or a pipeline (RON) whose compiled
    /// program runs (a looped model's `hidden_states.{i}` count layer applications).
    model_dir: PathBuf,
    /// safetensors with `input_ids` [batch, seq] (and `attention_mask`, `token_type_ids`).
    #[arg(long)]
    input: PathBuf,
    /// Where to write `hidden_states.{i}`, `logits` or `last_hidden_state`,
    /// `sentence_embedding`, and `greedy`; with a GemFilter pipeline also
    /// `gemfilter.selected` (i64 [batch, k], the kept positions in order) and
    /// `gemfilter.scores` (f32 [batch, seq]), the other outputs being the full model's run on
    /// the kept tokens and `greedy` the kept ids followed by the new ones.
    #[arg(long)]
    output: PathBuf,
    /// Also decode this many tokens greedily; written as `greedy` (prompt + new ids, i64).
    #[arg(long)]
    generate: Option<usize>,
    /// Compute precision (default: the pipeline's, f32 for a model folder).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Run on CUDA GPU N (needs the `cuda` feature; default: the pipeline's device).
    #[arg(long)]
    cuda: Option<usize>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (mut pipeline, pipeline_path) = Pipeline::open(&a.model_dir)?;
    if let Some(i) = a.cuda {
        pipeline.device = DeviceSpec::Cuda(i);
    }
    if let Some(d) = a.dtype {
        pipeline.dtype = match d {
            DtypeArg::F32 => DtypeSpec::F32,
            DtypeArg::F16 => DtypeSpec::F16,
            DtypeArg::Bf16 => DtypeSpec::BF16,
        };
    }
    let compiled = compile(&pipeline, &pipeline_path)?;
    let inputs = read_forward_inputs(&a.input)?;
    let vocab = compiled.graph.info.vocab;
    let max_id = inputs.input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
    if max_id as usize >= vocab {
        bail!(
            "{}: tensor \"input_ids\": token id {max_id} is outside the vocabulary of {} (size {vocab})",
            a.input.display(),
            a.model_dir.display()
        );
    }
    let program = compiled.lower()?;
    let device = program.device().clone();
    let to_dev = |t: &Tensor| t.to_device(&device);
    let run_inputs = Inputs {
        input_ids: to_dev(&inputs.input_ids)?,
        attention_mask: inputs.attention_mask.as_ref().map(to_dev).transpose()?,
        token_type_ids: inputs.token_type_ids.as_ref().map(to_dev).transpose()?,
        example_ids: None,
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    // GemFilter: the select phase picks each row's tokens; the outputs are the full model's
    // fresh run on those.
    let filter = program.graph().filter.clone();
    let mut selected: Option<Vec<Vec<u32>>> = None;
    let run_inputs = match &filter {
        None => run_inputs,
        Some(_) => {
            unpadded(
                &inputs,
                &a.input,
                "GemFilter selects from each row's last position",
            )?;
            let prompts = inputs.input_ids.to_vec2::<u32>()?;
            let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let sels = exitgraph::gemfilter::select(&program, &refs).with_context(|| {
                format!("GemFilter's select phase of {}", a.model_dir.display())
            })?;
            let rows = sels.len();
            let n = prompts.first().map_or(0, Vec::len);
            let k = sels.first().map_or(0, |s| s.kept.len());
            let kept: Vec<i64> = sels
                .iter()
                .flat_map(|s| s.kept.iter().map(|&p| p as i64))
                .collect();
            let scores: Vec<f32> = sels.iter().flat_map(|s| s.scores.iter().copied()).collect();
            let cpu = candle_core::Device::Cpu;
            tensors.insert(
                "gemfilter.selected".into(),
                Tensor::from_vec(kept, (rows, k), &cpu)?,
            );
            tensors.insert(
                "gemfilter.scores".into(),
                Tensor::from_vec(scores, (rows, n), &cpu)?,
            );
            let ids: Vec<Vec<u32>> = sels.iter().zip(&prompts).map(|(s, p)| s.ids(p)).collect();
            let flat: Vec<u32> = ids.concat();
            selected = Some(ids);
            Inputs {
                input_ids: Tensor::from_vec(flat, (rows, k), &device)?,
                attention_mask: None,
                token_type_ids: None,
                example_ids: None,
            }
        }
    };
    let names: Vec<String> = program
        .output_names()
        .into_iter()
        .filter(|n| filter.is_none() || n.as_str() != exitgraph::passes::gemfilter::SCORES)
        .collect();
    let want: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut cache = program.new_cache();
    let outputs = program
        .forward(&run_inputs, &mut cache, &want, false)
        .with_context(|| format!("running {}", a.model_dir.display()))?;
    for (name, t) in outputs {
        tensors.insert(
            name,
            t.to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?,
        );
    }
    if let Some(n) = a.generate {
        unpadded(
            &inputs,
            &a.input,
            "--generate needs unpadded rows of equal length",
        )?;
        let prompts = inputs.input_ids.to_vec2::<u32>()?;
        // The pipeline's depth strategy decodes (self-speculation keeps the full model's
        // greedy tokens; early exits may change them).
        let (mut out, _) = generate_with_strategy(
            Arc::new(program),
            &prompts,
            &GenerateOptions::greedy(n),
            &compiled.pipeline.runtime.depth,
            compiled.pipeline.runtime.skipped_kv,
            None,
        )?;
        if let Some(kept) = &selected {
            // The selected ids, then the new ones (the runtime selects the same way).
            for ((row, prompt), ids) in out.iter_mut().zip(&prompts).zip(kept) {
                let new = row.split_off(prompt.len());
                *row = ids.iter().copied().chain(new).collect();
            }
        }
        let rows = out.len();
        let cols = out.first().map_or(0, Vec::len);
        let flat: Vec<i64> = out.into_iter().flatten().map(i64::from).collect();
        tensors.insert(
            "greedy".into(),
            Tensor::from_vec(flat, (rows, cols), &candle_core::Device::Cpu)?,
        );
    }
    write_atomic(&a.output, &tensors)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    outln!(
        "wrote {} tensors to {}: {}",
        names.len(),
        a.output.display(),
        names
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Fails when `inputs` has an attention mask with padding; `why` says what needs it.
fn unpadded(
    inputs: &exitgraph::tensor_io::ForwardInputs,
    path: &std::path::Path,
    why: &str,
) -> anyhow::Result<()> {
    if let Some(mask) = &inputs.attention_mask {
        let min = mask.flatten_all()?.min(0)?.to_scalar::<u32>()?;
        if min == 0 {
            bail!("{}: attention_mask has padding; {why}", path.display());
        }
    }
    Ok(())
}
