//! `exitgraph train exits PIPELINE.ron`: trains the exit heads and gates of a pipeline's
//! `InsertExits` pass by self-distillation, the backbone frozen by default.
//!
//! Per exit point `k` and position: `distill · KL(p_final ‖ p_k) + (1 − distill) · CE(y, p_k)`,
//! where `p_final` is the full model's distribution (a constant) and `y` the next token of the
//! corpus; a gate adds `BCE(σ(gate_k), [argmax p_k = argmax p_final])`. The loss is the mean
//! over exit points. Heads start as the shared head (`Linear`: copies of the final norm and
//! LM head) or as the identity (`Mlp`: zero down-projection); gates start at 0.5.
//!
//! [`Objective::Kangaroo`] trains Kangaroo's adapters (`AttentionAdapter` heads) as the paper
//! does: the backbone and the LM head frozen, the loss the cross-entropy to the full model's
//! soft distribution, `−Σ_v p_final(v) · log p_k(v)`, averaged over positions and exits (no
//! label term, no gates). An adapter starts as the shared head: its attention's q, k and v
//! are copies of layer k's (the first layer the draft skips), its input norm is layer k's
//! attention norm, its output projection is zero (so the residual passes the stream
//! unchanged) and its last norm is a copy of the final norm's weight. (A deviation: Kangaroo's
//! training code starts from a fresh module's default random initialisation; this one makes
//! the untrained adapter equal the shared head when the final norm has no bias, as in
//! Llama-family models. Kangaroo also masks the loss to response tokens; here every position
//! counts.)
//!
//! On a looped pipeline (`TieLayers`, exits after loop iterations) the same loss trains each
//! iteration's exit. `train_adapters` also trains the `DepthLora` adapters (`lora.*`) and
//! `train_shared` the shared block (`tied.*`); the final layer then moves too, so the loss
//! gains the final layer's own `CE(y, p_final)` (the distillation target stays the current
//! final distribution, detached), as LayerSkip's early-exit loss keeps the last layer's term.
//!
//! Output: `OUT/heads.safetensors` (only the `exits.*` tensors, written atomically),
//! `OUT/lora.safetensors` and `OUT/tied.safetensors` when those trained (with the
//! fingerprints `train recursive` writes), `OUT/pipeline.ron` (the pipeline naming the trained
//! files, the model and other files' paths made absolute) and `OUT/training.json` (loss
//! curves). The output's files are written only once training has finished.

use crate::corpus::Task;
use crate::data::Batcher;
use crate::recursive::{absolute_from, held_out_loss, materialise, publish, LORA_FILE, TIED_FILE};
use crate::{lm_loss, ParamStore, TrainConfig, TrainLog, Trainer};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, D};
use exitgraph_compiler::lower::{Inputs, LowerOptions, Program, WeightSource, WeightStore};
use exitgraph_compiler::pipeline::{compile, resolve_model, Pipeline};
use exitgraph_ir::op::Op;
use exitgraph_ir::WeightRef;
use exitgraph_passes::exits::{chosen_depths, head_weights, HeadDims};
use exitgraph_passes::recursive::{
    base_fingerprint, lora_tensors, tied_tensors, BASE_KEY, LORA_PREFIX, TIED_PREFIX,
};
use exitgraph_passes::{HeadKind, PassSpec, TieNorms};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What `train exits` is asked to do.
#[derive(Clone, Debug)]
pub struct ExitTrainSpec {
    pub tasks: Vec<Task>,
    pub examples: usize,
    pub seed: u64,
    pub seq_len: usize,
    pub batch_size: usize,
    /// Weight of the distillation term (the rest is the hard-label loss).
    pub distill: f64,
    /// Train the pipeline's `DepthLora` adapters with the exits.
    pub train_adapters: bool,
    /// Train the shared block of the pipeline's `TieLayers` with the exits.
    pub train_shared: bool,
    pub objective: Objective,
    pub training: TrainConfig,
}

/// What the heads learn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Objective {
    /// Self-distillation mixed with the label loss (`distill`), gates by BCE.
    #[default]
    Distill,
    /// Kangaroo: the cross-entropy to the full model's soft distribution, adapters only.
    Kangaroo,
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "distill" => Ok(Objective::Distill),
            "kangaroo" => Ok(Objective::Kangaroo),
            other => Err(format!(
                "unknown objective {other:?} (use distill or kangaroo)"
            )),
        }
    }
}

/// What a run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExitTrainReport {
    pub heads: PathBuf,
    pub pipeline: PathBuf,
    pub trainable: usize,
    pub exits: Vec<usize>,
    /// `lora.safetensors`, when the adapters trained.
    pub adapters: Option<PathBuf>,
    /// `tied.safetensors`, when the shared block trained.
    pub shared: Option<PathBuf>,
    /// When the adapters or the shared block trained: the final layer's held-out next-token
    /// cross-entropy before and after (the exits' agreement is with a final layer that moved).
    pub final_loss: Option<(f64, f64)>,
    /// What the heads learned.
    #[serde(default)]
    pub objective: Objective,
    /// The held-out loss of the heads before training (an adapter or MLP head starts as the
    /// shared head).
    #[serde(default)]
    pub eval_before: f64,
    pub log: TrainLog,
}

/// A folder removed when this is dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// File name of the trained heads in the output folder.
pub const HEADS_FILE: &str = "heads.safetensors";

/// Initial values of the heads' own weights.
fn initial_heads(
    graph: &exitgraph_ir::Graph,
    model_dir: &Path,
    kind: &HeadKind,
    gate: bool,
    points: &[usize],
    seed: u64,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let device = Device::Cpu;
    let head = graph.head.logits.context("the model has no LM head")?;
    let Op::LmHead(lm) = &graph.graph[head].op else {
        bail!("the logits output is not an LM head");
    };
    let norm = graph
        .inputs(head)
        .first()
        .and_then(|&i| match &graph.graph[i].op {
            Op::Norm(n) => Some(n.weight.clone()),
            _ => None,
        });
    let mut store = WeightStore::open(&graph.weights, model_dir, &device, DType::F32)?;
    let mut out = HashMap::new();
    let dims = HeadDims::of(graph);
    for &k in points {
        // Layer k's attention and the norm before it (an adapter starts from them).
        let layer_attention = || -> anyhow::Result<(exitgraph_ir::op::Attention, WeightRef)> {
            let node = graph
                .graph
                .node_indices()
                .find(|&n| {
                    graph.graph[n].layer == Some(k) && matches!(graph.graph[n].op, Op::Attention(_))
                })
                .with_context(|| format!("layer {k} has no attention"))?;
            let Op::Attention(a) = &graph.graph[node].op else {
                bail!("unreachable: matched an attention op above");
            };
            let norm = graph
                .inputs(node)
                .first()
                .and_then(|&i| match &graph.graph[i].op {
                    Op::Norm(n) => Some(n.weight.clone()),
                    _ => None,
                })
                .with_context(|| format!("layer {k}'s attention has no norm before it"))?;
            Ok((a.clone(), norm))
        };
        for (name, shape) in head_weights(kind, gate, k, &dims) {
            let attn = name.strip_prefix(&format!("exits.{k}.attn."));
            let t = if name.ends_with(".attn_norm.weight") {
                store.get(&layer_attention()?.1)?.copy()?
            } else if let Some(part @ ("q.weight" | "k.weight" | "v.weight")) = attn {
                let (a, _) = layer_attention()?;
                let w = match part {
                    "q.weight" => &a.q.weight,
                    "k.weight" => &a.k.weight,
                    _ => &a.v.weight,
                };
                store.get(w)?.copy()?
            } else if name.ends_with(".norm.weight") {
                match &norm {
                    Some(w) => store.get(w)?.copy()?,
                    None => Tensor::ones(shape.as_slice(), DType::F32, &device)?,
                }
            } else if name.ends_with(".head.weight") {
                store.get(&lm.weight)?.copy()?
            } else if name.ends_with(".mlp.up.weight") {
                // Seeded uniform values with standard deviation 0.02.
                let mut rng = crate::data::SplitMix64::new(seed ^ (k as u64) << 8);
                let n: usize = shape.iter().product();
                let a = 0.02 * 3f64.sqrt();
                let values: Vec<f32> = (0..n)
                    .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * a)
                    .map(|v| v as f32)
                    .collect();
                Tensor::from_vec(values, shape.as_slice(), &device)?
            } else {
                Tensor::zeros(shape.as_slice(), DType::F32, &device)?
            };
            out.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    Ok(out)
}

/// Mean over positions of KL(p ‖ q) for `[n, vocab]` log-probabilities.
fn kl(log_p: &Tensor, log_q: &Tensor) -> candle_core::Result<Tensor> {
    (log_p.exp()? * (log_p - log_q)?)?
        .sum(D::Minus1)?
        .mean_all()
}

/// Mean over positions of the cross-entropy `−Σ p · log q` of `[n, vocab]`
/// log-probabilities (Kangaroo's adapter loss: `p` the full model's soft distribution).
fn soft_cross_entropy(log_p: &Tensor, log_q: &Tensor) -> candle_core::Result<Tensor> {
    (log_p.exp()? * log_q)?.sum(D::Minus1)?.mean_all()?.neg()
}

/// Mean binary cross-entropy of logits `x` against 0/1 targets `t` (stable form).
fn bce_with_logits(x: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
    // max(x, 0) − x·t + log(1 + exp(−|x|))
    let relu = x.relu()?;
    let soft = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    ((relu - (x * t)?)? + soft)?.mean_all()
}

/// Trains the exits of the pipeline at `pipeline_path`, writing into `out`.
pub fn train_exits(
    pipeline_path: &Path,
    out: &Path,
    spec: &ExitTrainSpec,
    show_progress: bool,
) -> anyhow::Result<ExitTrainReport> {
    let mut pipeline = Pipeline::read(pipeline_path)?;
    let index = pipeline
        .passes
        .iter()
        .position(|p| matches!(p, PassSpec::InsertExits { .. }))
        .with_context(|| {
            format!(
                "{}: the pipeline has no InsertExits pass",
                pipeline_path.display()
            )
        })?;
    let PassSpec::InsertExits {
        after,
        every,
        head,
        gate,
        ..
    } = pipeline.passes[index].clone()
    else {
        bail!("unreachable: the pass was matched above");
    };
    let shown = pipeline_path.display();
    let tie = pipeline
        .passes
        .iter()
        .position(|p| matches!(p, PassSpec::TieLayers { .. }));
    let lora = pipeline
        .passes
        .iter()
        .position(|p| matches!(p, PassSpec::DepthLora { .. }));
    if spec.train_adapters && lora.is_none() {
        bail!("{shown}: --train-adapters needs a DepthLora pass in the pipeline");
    }
    if spec.train_shared && tie.is_none() {
        bail!("{shown}: --train-shared needs a TieLayers pass in the pipeline (a looped model)");
    }
    if spec.train_shared && lora.is_some() && !spec.train_adapters {
        bail!(
            "{shown}: the DepthLora adapters were fitted to the shared block as it is: train them with it (--train-adapters --train-shared)"
        );
    }
    let kangaroo = spec.objective == Objective::Kangaroo;
    if kangaroo {
        if head != HeadKind::AttentionAdapter {
            bail!(
                "{shown}: --objective kangaroo trains Kangaroo's adapter: set the InsertExits \
                 pass's head to AttentionAdapter (it is {head:?})"
            );
        }
        if gate || spec.train_adapters || spec.train_shared {
            bail!(
                "{shown}: --objective kangaroo trains the adapters alone (backbone and LM head \
                 frozen): drop gate: true, --train-adapters and --train-shared"
            );
        }
    }
    let backbone_trains = spec.train_adapters || spec.train_shared;
    let heads_train = !matches!(head, HeadKind::SharedLmHead { .. }) || gate;
    if !heads_train && !backbone_trains {
        bail!(
            "{shown}: SharedLmHead exits without gates have nothing to train (use Linear or Mlp heads, gate: true, or --train-adapters / --train-shared on a looped model)"
        );
    }
    let model_dir = resolve_model(&pipeline, pipeline_path);
    let ckpt = exitgraph_ir::import(&model_dir)?;
    let layers = ckpt.graph.info.num_layers;
    let points = chosen_depths(&after, (every > 0).then_some(every), layers)
        .map_err(|e| anyhow::anyhow!("{}: InsertExits: {e}", pipeline_path.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    // Training reads its files from a staging folder; the output's files are written only
    // once training has finished.
    let staging = out.join(".staging");
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("{}: cannot create", staging.display()))?;
    // Removed however the run ends.
    let _staging_guard = RemoveOnDrop(staging.clone());
    let init = initial_heads(&ckpt.graph, &model_dir, &head, gate, &points, spec.seed)?;
    exitgraph_compiler::tensor_io::write_atomic(&staging.join(HEADS_FILE), &init)?;
    // The adapters and shared weights that train start as the pipeline describes them.
    if backbone_trains {
        // Without the exits, whose heads may not exist yet.
        let mut backbone = pipeline.clone();
        backbone.passes.remove(index);
        let before = compile(&backbone, pipeline_path)?;
        let mut named = Vec::new();
        if spec.train_adapters {
            named.extend(lora_tensors(&before.graph));
        }
        if spec.train_shared {
            let norms = match tie.map(|i| &pipeline.passes[i]) {
                Some(PassSpec::TieLayers { norms, .. }) => *norms,
                _ => TieNorms::Shared,
            };
            named.extend(tied_tensors(&before.graph, norms));
        }
        let initial = materialise(&named, &before.graph, &before.model_dir)?;
        for (file, prefix) in [(LORA_FILE, LORA_PREFIX), (TIED_FILE, TIED_PREFIX)] {
            let part: HashMap<String, Tensor> = initial
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect();
            if !part.is_empty() {
                exitgraph_compiler::tensor_io::write_atomic(&staging.join(file), &part)?;
            }
        }
    }

    // The pipeline as it will be saved: the model and other files' paths made absolute
    // (a looped model's shared block and adapters stay where they are unless they train),
    // the trained files next to it.
    let abs_model = std::fs::canonicalize(&model_dir).unwrap_or(model_dir.clone());
    pipeline.model = abs_model.display().to_string();
    for (i, pass) in pipeline.passes.iter_mut().enumerate() {
        match pass {
            PassSpec::InsertExits { weights, .. } if i == index => {
                *weights = Some(HEADS_FILE.into());
            }
            PassSpec::TieLayers { weights, .. } if spec.train_shared => {
                *weights = Some(TIED_FILE.into());
            }
            PassSpec::DepthLora { weights, .. } if spec.train_adapters && Some(i) == lora => {
                *weights = Some(LORA_FILE.into());
            }
            PassSpec::TieLayers {
                weights: Some(w), ..
            }
            | PassSpec::DepthLora {
                weights: Some(w), ..
            }
            | PassSpec::InsertExits {
                weights: Some(w), ..
            } => *w = absolute_from(pipeline_path, w),
            _ => {}
        }
    }
    let saved_pipeline = out.join("pipeline.ron");
    let compiled = compile(&pipeline, &staging.join("pipeline.ron"))?;

    let tokenizer = crate::data::model_tokenizer(&compiled, "train exits")?;
    let (train_rows, eval_rows) = crate::data::tuning_rows(
        &tokenizer,
        &spec.tasks,
        spec.examples,
        spec.seed,
        spec.seq_len,
    )?;
    if spec.seq_len + 1 > compiled.graph.info.max_positions {
        bail!(
            "seq_len {} exceeds the model's {} positions",
            spec.seq_len,
            compiled.graph.info.max_positions
        );
    }
    let device = Device::Cpu;
    let mut params = ParamStore::load(&compiled.graph.weights, &compiled.model_dir, &device)?;
    let mut patterns = Vec::new();
    if heads_train {
        patterns.push("exits.*".to_string());
    }
    if spec.train_adapters {
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
    // The heads as the pass recorded them: (logits, gate) per exit, in depth order.
    let heads = compiled
        .graph
        .exits
        .iter()
        .map(|e| {
            let logits = e
                .logits
                .with_context(|| format!("the exit after layer {} has no logits", e.after))?;
            Ok((logits, e.gate))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut want = vec![program.logits_node()?];
    for (logits, g) in &heads {
        want.push(*logits);
        want.extend(g.filter(|_| gate));
    }
    let distill = spec.distill.clamp(0.0, 1.0);
    let forward_loss = |x: Tensor, y: &Tensor| -> anyhow::Result<Tensor> {
        let inputs = Inputs {
            input_ids: x,
            attention_mask: None,
            token_type_ids: None,
            example_ids: None,
        };
        let mut outs = program
            .forward_nodes(&inputs, &mut program.new_cache(), None, &want, false)?
            .into_iter();
        let final_out = outs.next().context("no logits")?;
        let final_logits = final_out.detach();
        let (b, s, v) = final_logits.dims3()?;
        let final_lp = candle_nn::ops::log_softmax(&final_logits.reshape((b * s, v))?, D::Minus1)?;
        let final_top = final_logits.argmax(D::Minus1)?;
        let mut total: Option<Tensor> = None;
        for (_, g) in &heads {
            let logits = outs.next().context("no exit logits")?;
            let lp = candle_nn::ops::log_softmax(&logits.reshape((b * s, v))?, D::Minus1)?;
            let mut loss = if kangaroo {
                soft_cross_entropy(&final_lp, &lp)?
            } else {
                ((kl(&final_lp, &lp)? * distill)? + (lm_loss(&logits, y)? * (1.0 - distill))?)?
            };
            if gate && g.is_some() {
                let g = outs.next().context("no gate")?.reshape((b, s))?;
                let target = logits
                    .detach()
                    .argmax(D::Minus1)?
                    .eq(&final_top)?
                    .to_dtype(DType::F32)?;
                loss = (loss + bce_with_logits(&g, &target)?)?;
            }
            total = Some(match total {
                Some(t) => (t + loss)?,
                None => loss,
            });
        }
        let n = points.len().max(1) as f64;
        let exits = (total.context("no exit points")? / n)?;
        if backbone_trains {
            // The final layer moves with the backbone: its own loss keeps it a language
            // model, as the exits learn to match it.
            Ok((exits + lm_loss(&final_out, y)?)?)
        } else {
            Ok(exits)
        }
    };
    let train = Batcher::new(train_rows, spec.batch_size, spec.seed);
    let eval = Batcher::new(eval_rows, spec.batch_size, spec.seed);
    let eval_batches = eval.in_order(&device)?;
    let accum = spec.training.grad_accum.max(1);
    let mut loss = |step: usize, micro: usize| -> anyhow::Result<(Tensor, usize)> {
        let (x, y) = train.batch(step * accum + micro, &device)?;
        let tokens = y.elem_count();
        Ok((forward_loss(x, &y)?, tokens))
    };
    let mut evaluate = || -> anyhow::Result<f64> {
        let mut total = 0.0;
        let mut count = 0usize;
        for (x, y) in &eval_batches {
            let n = y.elem_count();
            let l = forward_loss(x.clone(), y)?.detach();
            total += l.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64;
            count += n;
        }
        Ok(total / count.max(1) as f64)
    };
    // The loss of the heads as they start (for Kangaroo's adapters: the shared head's).
    let eval_before = evaluate()?;
    let final_before = if backbone_trains {
        Some(held_out_loss(&program, &eval_batches)?)
    } else {
        None
    };
    let mut trainer = Trainer::new(spec.training.clone(), &mut params);
    trainer.show_progress = show_progress;
    let log = trainer.run(&mut loss, &mut evaluate)?;
    drop(trainer);
    let final_loss = match final_before {
        Some(before) => Some((before, held_out_loss(&program, &eval_batches)?)),
        None => None,
    };
    let trained = params.tensors();
    let heads: HashMap<String, Tensor> = trained
        .iter()
        .filter(|(n, _)| n.starts_with("exits."))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let heads_path = out.join(HEADS_FILE);
    exitgraph_compiler::tensor_io::write_atomic(&heads_path, &heads)?;
    let backbone: HashMap<String, Tensor> = trained
        .into_iter()
        .filter(|(n, _)| n.starts_with(LORA_PREFIX) || n.starts_with(TIED_PREFIX))
        .collect();
    publish(
        &pipeline,
        out,
        lora.filter(|_| spec.train_adapters),
        spec.train_shared,
        &backbone,
    )?;
    // The heads record the backbone they were trained on (the written pipeline's passes
    // before the exits, with any backbone file just written), so they are refused on another.
    let saved = out.join("pipeline.ron");
    let mut upto = pipeline.clone();
    upto.passes.truncate(index);
    let base = base_fingerprint(&compile(&upto, &saved)?.graph);
    let meta = [(BASE_KEY.to_string(), base)].into_iter().collect();
    exitgraph_compiler::tensor_io::write_atomic_with(&heads_path, &heads, &meta)?;
    compile(&pipeline, &saved)?;
    let report = ExitTrainReport {
        heads: heads_path,
        pipeline: saved_pipeline,
        trainable,
        exits: points,
        adapters: spec.train_adapters.then(|| out.join(LORA_FILE)),
        shared: spec.train_shared.then(|| out.join(TIED_FILE)),
        final_loss,
        objective: spec.objective,
        eval_before,
        log,
    };
    exitgraph_compiler::atomic::write_text(
        &out.join("training.json"),
        &serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}
