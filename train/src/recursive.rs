//! `exitgraph train recursive PIPELINE.ron -o OUT`: uptrains a Relaxed Recursive Transformer
//! (a pipeline with `TieLayers` and, usually, `DepthLora`) on the synthetic corpus.
//!
//! Trainable: every adapter factor (`lora.*`) and, with `train_shared`, the shared block's
//! weights (`tied.*`: one tensor per position's shared weight, plus each depth's own norm
//! vectors under `norms: PerIteration`). The embeddings, the final norm and the LM head stay
//! frozen. The loss per position is
//!
//! `CE(y, p) + distill · KL(p_teacher ‖ p)`
//!
//! where `p` is the recursive model's next-token distribution, `y` the corpus's next token
//! and `p_teacher` the original (untied) model's distribution, a constant (no distillation
//! when `distill` is 0). The evaluation loss reported is the held-out cross-entropy alone, so
//! it compares across distillation weights and with the original model.
//!
//! The adapters and shared weights start as the pipeline's recipes describe (truncated SVD,
//! zero, mean, ...), materialised once as named tensors. Output: `OUT/lora.safetensors`
//! (`lora.*`), `OUT/tied.safetensors` (`tied.*`, with `train_shared`), each written
//! atomically, `OUT/pipeline.ron` (the pipeline with `weights:` naming them and the model path
//! resolved) and `OUT/training.json` (loss curves, held-out loss before and after).

use crate::corpus::Task;
use crate::data::Batcher;
use crate::{lm_loss, ParamStore, TrainConfig, TrainLog, Trainer};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, D};
use exitgraph_compiler::lower::{LowerOptions, Program, WeightSource, WeightStore};
use exitgraph_compiler::pipeline::{compile, resolve_model, Pipeline};
use exitgraph_ir::{Graph, WeightRef};
use exitgraph_passes::recursive::{
    base_fingerprint, digest, lora_tensors, model_fingerprint, tied_tensors, BASE_KEY, CONTENT_KEY,
    LORA_PREFIX, MODEL_KEY, TIED_PREFIX,
};
use exitgraph_passes::{PassSpec, TieNorms};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What `train recursive` is asked to do.
#[derive(Clone, Debug)]
pub struct RecursiveTrainSpec {
    /// Corpus tasks (all when empty).
    pub tasks: Vec<Task>,
    pub examples: usize,
    pub seed: u64,
    pub seq_len: usize,
    pub batch_size: usize,
    /// Weight of the distillation term KL(original ‖ recursive) added to the cross-entropy.
    pub distill: f64,
    /// Train the shared block's weights as well as the adapters.
    pub train_shared: bool,
    pub training: TrainConfig,
}

/// What a run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecursiveTrainReport {
    pub pipeline: PathBuf,
    /// `lora.safetensors`, when the pipeline has adapters.
    pub adapters: Option<PathBuf>,
    /// `tied.safetensors`, when the shared block trained.
    pub shared: Option<PathBuf>,
    /// Trainable scalars.
    pub trainable: usize,
    pub distill: f64,
    /// Held-out next-token cross-entropy before training.
    pub eval_before: f64,
    /// Held-out next-token cross-entropy after training.
    pub eval_after: f64,
    pub log: TrainLog,
}

/// File names of the trained tensors in the output folder.
pub const LORA_FILE: &str = "lora.safetensors";
pub const TIED_FILE: &str = "tied.safetensors";

/// Mean over positions of KL(p ‖ q) for `[n, vocab]` log-probabilities.
fn kl(log_p: &Tensor, log_q: &Tensor) -> candle_core::Result<Tensor> {
    (log_p.exp()? * (log_p - log_q)?)?
        .sum(D::Minus1)?
        .mean_all()
}

/// The named tensors' values as their recipes give them now (f32).
pub(crate) fn materialise(
    named: &[(String, WeightRef)],
    graph: &Graph,
    model_dir: &Path,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let device = Device::Cpu;
    let mut store = WeightStore::open(&graph.weights, model_dir, &device, DType::F32)?;
    let mut out = HashMap::new();
    for (name, recipe) in named {
        let t = store
            .get(recipe)
            .with_context(|| format!("cannot compute the initial value of {name}"))?;
        out.insert(name.clone(), t.to_dtype(DType::F32)?.copy()?);
    }
    Ok(out)
}

/// A path written in the pipeline at `from`, made absolute so that a pipeline saved
/// elsewhere still finds the file.
pub(crate) fn absolute_from(from: &Path, file: &str) -> String {
    let f = Path::new(file);
    if f.is_absolute() {
        return file.to_string();
    }
    let joined = from.parent().unwrap_or_else(|| Path::new(".")).join(f);
    std::fs::canonicalize(&joined)
        .unwrap_or(joined)
        .display()
        .to_string()
}

/// Mean next-token cross-entropy of `program` over `batches`.
pub(crate) fn held_out_loss(
    program: &Program,
    batches: &[(Tensor, Tensor)],
) -> anyhow::Result<f64> {
    let mut total = 0.0;
    let mut count = 0usize;
    for (x, y) in batches {
        let logits = program.logits(x)?;
        let n = y.elem_count();
        total += lm_loss(&logits, y)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            * n as f64;
        count += n;
    }
    Ok(total / count.max(1) as f64)
}

/// Writes the trained tensors and the pipeline into `out`, with their fingerprints: the
/// shared block's file records the checkpoint's structure and a digest of its values, the
/// adapters' file the tied block they were trained against (as the pipeline's passes will
/// compute it from the written shared weights), so neither is used with another pipeline.
pub(crate) fn publish(
    pipeline: &Pipeline,
    out: &Path,
    lora: Option<usize>,
    train_shared: bool,
    trained: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    let saved = out.join("pipeline.ron");
    let part = |prefix: &str| -> HashMap<String, Tensor> {
        trained
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    };
    if train_shared {
        let tied = part(TIED_PREFIX);
        let mut names: Vec<&String> = tied.keys().collect();
        names.sort();
        let mut bytes = Vec::new();
        for n in names {
            bytes.extend(n.as_bytes());
            let values: Vec<f32> = tied[n].flatten_all()?.to_vec1()?;
            bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        }
        let model = exitgraph_ir::import(&resolve_model(pipeline, &saved))?.graph;
        let meta = [
            (MODEL_KEY.to_string(), model_fingerprint(&model)),
            (CONTENT_KEY.to_string(), digest(&bytes)),
        ]
        .into_iter()
        .collect();
        exitgraph_compiler::tensor_io::write_atomic_with(&out.join(TIED_FILE), &tied, &meta)?;
    }
    if let Some(index) = lora {
        // The tied block the adapters sit on: the pipeline's passes up to DepthLora.
        let mut upto = pipeline.clone();
        upto.passes.truncate(index);
        let base = base_fingerprint(&compile(&upto, &saved)?.graph);
        let meta = [(BASE_KEY.to_string(), base)].into_iter().collect();
        exitgraph_compiler::tensor_io::write_atomic_with(
            &out.join(LORA_FILE),
            &part(LORA_PREFIX),
            &meta,
        )?;
    }
    exitgraph_compiler::atomic::write_text(&saved, &pipeline.to_ron())?;
    // The written pipeline compiles with its fingerprints checked.
    compile(pipeline, &saved)?;
    Ok(())
}

/// Uptrains the recursive model of the pipeline at `pipeline_path`, writing into `out`.
pub fn train_recursive(
    pipeline_path: &Path,
    out: &Path,
    spec: &RecursiveTrainSpec,
    show_progress: bool,
) -> anyhow::Result<RecursiveTrainReport> {
    let shown = pipeline_path.display();
    let mut pipeline = Pipeline::read(pipeline_path)?;
    let tie = pipeline
        .passes
        .iter()
        .position(|p| matches!(p, PassSpec::TieLayers { .. }))
        .with_context(|| format!("{shown}: train recursive needs a TieLayers pass"))?;
    let lora = pipeline
        .passes
        .iter()
        .position(|p| matches!(p, PassSpec::DepthLora { .. }));
    if lora.is_none() && !spec.train_shared {
        bail!(
            "{shown}: the pipeline has no DepthLora pass, so only the shared block could train: \
             add DepthLora or pass --train-shared"
        );
    }
    if !(spec.distill.is_finite() && spec.distill >= 0.0) {
        bail!(
            "--distill must be a non-negative number, got {}",
            spec.distill
        );
    }
    let norms = match &pipeline.passes[tie] {
        PassSpec::TieLayers { norms, .. } => *norms,
        _ => TieNorms::Shared,
    };
    let model_dir = resolve_model(&pipeline, pipeline_path);
    let before = compile(&pipeline, pipeline_path)?;
    if spec.seq_len + 1 > before.graph.info.max_positions {
        bail!(
            "--seq-len {} exceeds the model's {} positions",
            spec.seq_len,
            before.graph.info.max_positions
        );
    }

    // The trainable tensors' initial values, from the pipeline's recipes.
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut named = Vec::new();
    if lora.is_some() {
        named.extend(lora_tensors(&before.graph));
    }
    if spec.train_shared {
        named.extend(tied_tensors(&before.graph, norms));
    }
    let initial = materialise(&named, &before.graph, &before.model_dir)?;
    let split = |prefix: &str, values: &HashMap<String, Tensor>| -> HashMap<String, Tensor> {
        values
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    };
    // Training runs on files in a staging folder; the output's files are replaced only once
    // training has finished, so a failed run never leaves a pipeline naming untrained tensors.
    let staging = out.join(".staging");
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("{}: cannot create", staging.display()))?;
    let write_in = |folder: &Path, values: &HashMap<String, Tensor>| -> anyhow::Result<()> {
        if lora.is_some() {
            exitgraph_compiler::tensor_io::write_atomic(
                &folder.join(LORA_FILE),
                &split(LORA_PREFIX, values),
            )?;
        }
        if spec.train_shared {
            exitgraph_compiler::tensor_io::write_atomic(
                &folder.join(TIED_FILE),
                &split(TIED_PREFIX, values),
            )?;
        }
        Ok(())
    };
    write_in(&staging, &initial)?;

    // The pipeline as it will be saved: the model and other files resolved, the trained
    // tensors next to it.
    let abs_model = std::fs::canonicalize(&model_dir).unwrap_or(model_dir.clone());
    pipeline.model = abs_model.display().to_string();
    for (i, pass) in pipeline.passes.iter_mut().enumerate() {
        match pass {
            PassSpec::TieLayers { weights, .. } => {
                if spec.train_shared {
                    *weights = Some(TIED_FILE.into());
                } else if let Some(w) = weights {
                    *w = absolute_from(pipeline_path, w);
                }
            }
            PassSpec::DepthLora { weights, .. } if Some(i) == lora => {
                *weights = Some(LORA_FILE.into());
            }
            PassSpec::DepthLora {
                weights: Some(w), ..
            }
            | PassSpec::InsertExits {
                weights: Some(w), ..
            } => *w = absolute_from(pipeline_path, w),
            _ => {}
        }
    }
    let saved_pipeline = out.join("pipeline.ron");
    let staged_pipeline = staging.join("pipeline.ron");
    let compiled = compile(&pipeline, &staged_pipeline)?;

    let tokenizer = crate::data::model_tokenizer(&compiled, "train recursive")?;
    let (train_rows, eval_rows) = crate::data::tuning_rows(
        &tokenizer,
        &spec.tasks,
        spec.examples,
        spec.seed,
        spec.seq_len,
    )?;
    let device = Device::Cpu;
    let teacher = if spec.distill > 0.0 {
        Some(Program::lower(
            &compiled.original,
            &compiled.model_dir,
            &device,
            DType::F32,
        )?)
    } else {
        None
    };
    let mut params = ParamStore::load(&compiled.graph.weights, &compiled.model_dir, &device)?;
    let mut patterns = Vec::new();
    if lora.is_some() {
        patterns.push(format!("{LORA_PREFIX}*"));
    }
    if spec.train_shared {
        patterns.push(format!("{TIED_PREFIX}*"));
    }
    params.select(&patterns)?;
    let trainable = params.trainable_count();
    let program = Program::lower_with(
        &compiled.graph,
        &mut params,
        &device,
        DType::F32,
        LowerOptions::training(),
    )?;
    let distill = spec.distill;
    let forward_loss = |x: Tensor, y: &Tensor| -> anyhow::Result<Tensor> {
        let logits = program.logits(&x)?;
        let ce = lm_loss(&logits, y)?;
        let Some(teacher) = &teacher else {
            return Ok(ce);
        };
        let t = teacher.logits(&x)?.detach();
        let (b, s, v) = logits.dims3()?;
        let lp = candle_nn::ops::log_softmax(&logits.reshape((b * s, v))?, D::Minus1)?;
        let tp = candle_nn::ops::log_softmax(&t.reshape((b * s, v))?, D::Minus1)?;
        Ok((ce + (kl(&tp, &lp)? * distill)?)?)
    };
    let train = Batcher::new(train_rows, spec.batch_size, spec.seed);
    let eval = Batcher::new(eval_rows, spec.batch_size, spec.seed);
    let eval_batches = eval.in_order(&device)?;
    let eval_before = held_out_loss(&program, &eval_batches)?;
    let accum = spec.training.grad_accum.max(1);
    let mut loss = |step: usize, micro: usize| -> anyhow::Result<(Tensor, usize)> {
        let (x, y) = train.batch(step * accum + micro, &device)?;
        let tokens = y.elem_count();
        Ok((forward_loss(x, &y)?, tokens))
    };
    let mut evaluate = || held_out_loss(&program, &eval_batches);
    let mut trainer = Trainer::new(spec.training.clone(), &mut params);
    trainer.show_progress = show_progress;
    let log = trainer.run(&mut loss, &mut evaluate)?;
    drop(trainer);
    let eval_after = match log.eval_loss.last() {
        Some(&(step, e)) if step == spec.training.steps => e,
        _ => held_out_loss(&program, &eval_batches)?,
    };
    let trained: HashMap<String, Tensor> = params
        .tensors()
        .into_iter()
        .filter(|(n, _)| n.starts_with(LORA_PREFIX) || n.starts_with(TIED_PREFIX))
        .collect();
    publish(&pipeline, out, lora, spec.train_shared, &trained)?;
    let _ = std::fs::remove_dir_all(&staging);
    let lora_path = lora.map(|_| out.join(LORA_FILE));
    let tied_path = spec.train_shared.then(|| out.join(TIED_FILE));
    let report = RecursiveTrainReport {
        pipeline: saved_pipeline,
        adapters: lora_path,
        shared: tied_path,
        trainable,
        distill,
        eval_before,
        eval_after,
        log,
    };
    exitgraph_compiler::atomic::write_text(
        &out.join("training.json"),
        &serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}
