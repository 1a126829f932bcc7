use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use exitgraph::generate::Sampling;
use exitgraph::lower::{Inputs, Program};
use exitgraph::pipeline::{compile, Compiled, Pipeline};
use exitgraph::runtime::generate_with_strategy;
use exitgraph::runtime::metrics::Speculated;
use exitgraph::runtime::trace::TraceWriter;
use exitgraph::tensor_io::write_atomic;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Pipeline file (RON) or a model folder; the demo model (models/demo) when omitted.
    pipeline: Option<PathBuf>,
    /// Prompt text; token ids separated by spaces when the model has no tokenizer.json.
    #[arg(long)]
    prompt: String,
    /// Overrides the pipeline's `runtime.max_new_tokens`.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Overrides the pipeline's `runtime.seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// Sample at this temperature instead of the pipeline's sampling.
    #[arg(long)]
    temperature: Option<f64>,
    /// With --temperature: nucleus sampling threshold.
    #[arg(long, requires = "temperature")]
    top_p: Option<f64>,
    /// Print, per generated token, the layers it ran and where it exited.
    #[arg(long)]
    show_exits: bool,
    /// Write the token-level trace (JSON Lines) to this file.
    #[arg(long)]
    trace: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct EncodeArgs {
    /// Pipeline file (RON) of an encoder.
    pipeline: PathBuf,
    /// A text to embed; repeat for several.
    #[arg(long = "text", required = true)]
    texts: Vec<String>,
    /// Write `sentence_embedding` (or `last_hidden_state`) to this safetensors file.
    #[arg(long)]
    output: Option<PathBuf>,
}

fn load_tokenizer(compiled: &Compiled) -> anyhow::Result<Option<Tokenizer>> {
    match &compiled.checkpoint.tokenizer {
        Some(path) => {
            let mut t = Tokenizer::from_file(path)
                .map_err(|e| anyhow::anyhow!("{}: not a valid tokenizer: {e}", path.display()))?;
            // Padding is ours to do (with an attention mask), not the tokenizer's.
            t.with_padding(None);
            Ok(Some(t))
        }
        None => Ok(None),
    }
}

fn parse_ids(text: &str) -> anyhow::Result<Vec<u32>> {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .with_context(|| format!("the model has no tokenizer.json, so the prompt must be token ids; \"{s}\" is not one"))
        })
        .collect()
}

fn tokenize(tok: Option<&Tokenizer>, text: &str) -> anyhow::Result<Vec<u32>> {
    let ids = match tok {
        Some(t) => {
            let enc = t
                .encode(text, true)
                .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
            enc.get_ids()
                .iter()
                .zip(enc.get_attention_mask())
                .filter(|(_, &m)| m == 1)
                .map(|(&id, _)| id)
                .collect()
        }
        None => parse_ids(text)?,
    };
    if ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    Ok(ids)
}

/// A prompt (or text) must fit the model's positions; it is never silently truncated.
fn check_length(compiled: &Compiled, ids: &[u32], what: &str) -> anyhow::Result<()> {
    let positions = compiled.graph.info.max_positions;
    if ids.len() > positions {
        bail!(
            "the {what} is too long: {} tokens, but the model has {positions} positions",
            ids.len()
        );
    }
    Ok(())
}

fn prepare(path: Option<&Path>) -> anyhow::Result<(Compiled, Program)> {
    let (pipeline, path) = match path {
        Some(p) => Pipeline::open(p)?,
        None => (Pipeline::demo(), PathBuf::from("demo.ron")),
    };
    let compiled = compile(&pipeline, &path)?;
    let program = compiled.lower()?;
    Ok((compiled, program))
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let (compiled, program) = prepare(a.pipeline.as_deref())?;
    if !compiled.graph.info.family.is_decoder() {
        return embed(&compiled, &program, &[a.prompt], None);
    }
    let tokenizer = load_tokenizer(&compiled)?;
    let prompt = tokenize(tokenizer.as_ref(), &a.prompt)?;
    check_length(&compiled, &prompt, "prompt")?;
    let mut opts = compiled.pipeline.runtime.generate_options();
    if let Some(n) = a.max_new_tokens {
        opts.max_new_tokens = n;
    }
    if let Some(s) = a.seed {
        opts.seed = s;
    }
    if let Some(t) = a.temperature {
        opts.sampling = Sampling::Temperature {
            temperature: t,
            top_p: a.top_p,
        };
    }
    let depth = compiled.pipeline.runtime.depth.clone();
    let trace = a.trace.as_deref().map(TraceWriter::create).transpose()?;
    let layers = compiled.graph.info.num_layers;
    let (out, outcomes) = generate_with_strategy(
        Arc::new(program),
        std::slice::from_ref(&prompt),
        &opts,
        &depth,
        compiled.pipeline.runtime.skipped_kv,
        trace,
    )?;
    let new: Vec<u32> = out
        .first()
        .map(|r| r[prompt.len()..].to_vec())
        .unwrap_or_default();
    match &tokenizer {
        Some(t) => {
            let text = t
                .decode(&new, true)
                .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
            outln!("{}{}", a.prompt, text);
        }
        None => outln!(
            "{}",
            new.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        ),
    }
    if let (Some(f), Some(kept)) = (
        &compiled.graph.filter,
        outcomes.first().and_then(|o| o.selected.as_ref()),
    ) {
        // GemFilter: which prompt tokens the full model ran on.
        let text = match &tokenizer {
            Some(t) => {
                let ids: Vec<u32> = kept
                    .iter()
                    .filter_map(|&i| prompt.get(i).copied())
                    .collect();
                format!(
                    "{:?}",
                    t.decode(&ids, false)
                        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?
                )
            }
            None => format!("{kept:?}"),
        };
        let forced = match (f.keep_first, f.keep_last) {
            (0, 0) => String::new(),
            (a, b) => format!(", the first {a} and last {b} always"),
        };
        outln!(
            "GemFilter kept {} of {} prompt tokens (layer {}'s scores{forced}): {text}",
            kept.len(),
            prompt.len(),
            f.layer
        );
    }
    if a.show_exits {
        let stats = outcomes
            .first()
            .map(|o| o.stats.clone())
            .unwrap_or_default();
        let speculative = stats.iter().any(|s| s.speculated.is_some());
        outln!(
            "token  text            exit layer  layers run{}",
            if speculative { "  speculation" } else { "" }
        );
        for (t, s) in new.iter().zip(&stats) {
            let text = match &tokenizer {
                Some(tk) => tk.decode(&[*t], false).unwrap_or_default(),
                None => t.to_string(),
            };
            let how = match s.speculated {
                Some(Speculated::Accepted) => "  draft accepted",
                Some(Speculated::Rejected) => "  full model (draft rejected)",
                Some(Speculated::Bonus) => "  full model (after the drafts)",
                None => "",
            };
            outln!(
                "{t:>5}  {:<14}  {:>4} / {layers}  {:>10}{how}",
                format!("{text:?}"),
                s.exit_layer,
                s.layers_run
            );
        }
        if let Some(c) = outcomes.first().and_then(|o| o.speculative.as_ref()) {
            outln!(
                "speculation: {} cycles, {} drafted, {} accepted ({:.1}%), {:.2} tokens per verification",
                c.cycles,
                c.drafted,
                c.accepted,
                100.0 * c.acceptance(),
                c.tokens_per_cycle()
            );
        }
        let n = stats.len().max(1) as f64;
        let mean: f64 = stats.iter().map(|s| s.layers_run as f64).sum::<f64>() / n;
        outln!("mean layers run {mean:.2} of {layers} ({:?})", depth);
    }
    if let Some(path) = &a.trace {
        outln!("wrote {}", path.display());
    }
    Ok(())
}

pub fn encode(a: EncodeArgs) -> anyhow::Result<()> {
    let (compiled, program) = prepare(Some(&a.pipeline))?;
    if compiled.graph.info.family.is_decoder() {
        bail!(
            "{}: {} is a decoder; use `exitgraph run` to generate text",
            a.pipeline.display(),
            compiled.graph.info.model_type
        );
    }
    embed(&compiled, &program, &a.texts, a.output.as_deref())
}

/// Embeds texts (padded into one batch) and prints or writes the embeddings.
fn embed(
    compiled: &Compiled,
    program: &Program,
    texts: &[String],
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let tokenizer = load_tokenizer(compiled)?;
    let rows: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            let ids = tokenize(tokenizer.as_ref(), t)?;
            check_length(compiled, &ids, "text")?;
            Ok(ids)
        })
        .collect::<anyhow::Result<_>>()?;
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let pad = compiled.graph.info.pad_token_id.unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut mask = Vec::with_capacity(rows.len() * len);
    for r in &rows {
        for i in 0..len {
            ids.push(r.get(i).copied().unwrap_or(pad));
            mask.push(u32::from(i < r.len()));
        }
    }
    if let exitgraph::exits::Depth::EarlyExit { rule } = &compiled.pipeline.runtime.depth {
        let out = exitgraph::exits::encoder::embed_with_exits(program, &rows, pad, rule)?;
        let layers = compiled.graph.info.num_layers;
        if let Some(path) = output {
            let flat: Vec<f32> = out.iter().flat_map(|e| e.embedding.clone()).collect();
            let width = out.first().map_or(0, |e| e.embedding.len());
            let t = Tensor::from_vec(flat, (out.len(), width), &candle_core::Device::Cpu)?;
            let exits: Vec<u32> = out.iter().map(|e| e.exit_layer as u32).collect();
            let n = exits.len();
            let exits = Tensor::from_vec(exits, n, &candle_core::Device::Cpu)?;
            write_atomic(
                path,
                &HashMap::from([
                    ("sentence_embedding".to_string(), t),
                    ("exit_layer".to_string(), exits),
                ]),
            )?;
            outln!(
                "wrote sentence_embedding [{n}, {width}] and exit_layer to {}",
                path.display()
            );
            return Ok(());
        }
        for (text, e) in texts.iter().zip(&out) {
            let head: Vec<String> = e
                .embedding
                .iter()
                .take(8)
                .map(|x| format!("{x:+.4}"))
                .collect();
            let sat: Vec<String> = e
                .signals
                .iter()
                .map(|(k, c)| format!("L{k} {c:.4}"))
                .collect();
            outln!(
                "{text:?}\n  exit after layer {} of {layers} (saturation: {})\n  sentence_embedding dim {}: [{} ...]",
                e.exit_layer,
                sat.join(", "),
                e.embedding.len(),
                head.join(", ")
            );
        }
        return Ok(());
    }
    let device = program.device();
    let inputs = Inputs {
        input_ids: Tensor::from_vec(ids, (rows.len(), len), device)?,
        attention_mask: Some(Tensor::from_vec(mask, (rows.len(), len), device)?),
        token_type_ids: None,
        example_ids: None,
    };
    let name = if program
        .output_names()
        .iter()
        .any(|n| n == "sentence_embedding")
    {
        "sentence_embedding"
    } else {
        "last_hidden_state"
    };
    let mut cache = program.new_cache();
    let out = program.forward(&inputs, &mut cache, &[name], false)?;
    let t = out[name]
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?;
    if let Some(path) = output {
        write_atomic(path, &HashMap::from([(name.to_string(), t.clone())]))?;
        outln!("wrote {name} {:?} to {}", t.dims(), path.display());
        return Ok(());
    }
    let t = if t.rank() == 3 { t.mean(1)? } else { t };
    for (text, row) in texts.iter().zip(t.to_vec2::<f32>()?) {
        let head: Vec<String> = row.iter().take(8).map(|x| format!("{x:+.4}")).collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        outln!(
            "{text:?}\n  {name} dim {} norm {norm:.4}: [{} ...]",
            row.len(),
            head.join(", ")
        );
    }
    Ok(())
}
