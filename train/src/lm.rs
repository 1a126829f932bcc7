//! `exitgraph train lm CONFIG.ron`: a Llama-architecture language model trained from scratch
//! on the graded synthetic corpus, saved as a Hugging Face checkpoint (config.json,
//! model.safetensors, tokenizer.json) that the importer and transformers both load.
//!
//! The run: generate the corpus and a held-out corpus (another seed) → train a byte-level
//! BPE tokenizer → write a seeded random initialisation as a checkpoint in the run folder
//! (`OUTPUT.run`, beside the output) → import it, lower it for training, and train all
//! parameters with [`Trainer`] (checkpoints in `OUTPUT.run/checkpoints`) → write the trained
//! weights in the run folder → only then replace the output's files, each atomically
//! (a complete temporary file, synced, renamed over the old one), and remove the run folder.
//! An existing model in the output is replaced only when the caller says so (`--force`), and
//! is never touched before training has finished: an interrupted run leaves it whole, and a
//! process that has it memory-mapped keeps reading the old file.

use super::data::Batcher;
use super::{lm_loss, ParamStore, TrainConfig, TrainLog, Trainer};
use crate::corpus::{self, CorpusSpec};
use crate::layerskip::LayerSkipSpec;
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use exitgraph_compiler::lower::{LowerOptions, Program};
use exitgraph_compiler::synth::{write_random_llama, LlamaSpec};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

fn default_rope_theta() -> f64 {
    10000.0
}

fn default_init_std() -> f32 {
    0.02
}

/// Shape of the model to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_init_std")]
    pub init_std: f32,
    /// The LM head shares the token embedding's matrix (`tie_word_embeddings`). Default
    /// true; a separate head costs `vocab × hidden` parameters and learns induction (the
    /// lookup `recall`, `repeat` and `needle` need) far sooner on this corpus.
    #[serde(default = "default_tie_embeddings")]
    pub tie_embeddings: bool,
}

fn default_tie_embeddings() -> bool {
    true
}

/// A `train lm` config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmTrainSpec {
    /// Output folder, relative to the config file.
    pub output: String,
    pub corpus: CorpusSpec,
    /// Held-out corpus for evaluation (use another seed).
    pub eval_corpus: CorpusSpec,
    /// Upper bound of the tokenizer's vocabulary.
    pub vocab_size: usize,
    /// An existing `tokenizer.json` (relative to the config) to use instead of training one,
    /// so that the model shares its vocabulary with another model and their losses compare;
    /// `vocab_size` is then ignored.
    #[serde(default)]
    pub tokenizer: Option<String>,
    pub model: ModelShape,
    /// Tokens per training row.
    pub seq_len: usize,
    pub batch_size: usize,
    /// Seed of the initialisation and the data order.
    pub seed: u64,
    pub training: TrainConfig,
    /// LayerSkip's recipe: layer dropout rising with depth and an early-exit loss through
    /// the shared final norm and LM head ([`crate::layerskip`]); off when omitted.
    #[serde(default)]
    pub layerskip: Option<LayerSkipSpec>,
    /// A length curriculum: from each stage's `from_step` on, training rows are
    /// `seq_len` tokens long in batches of `batch_size` (the same corpus, packed again);
    /// before the first stage, the top-level `seq_len` and `batch_size`. A stage shorter
    /// than the longest trains only on the examples that fit its rows. Evaluation always
    /// uses the top-level `seq_len`. Empty: one length throughout.
    #[serde(default)]
    pub length_curriculum: Vec<LengthStage>,
    /// Each token attends only to earlier tokens of its own example (the row's packed
    /// examples are split at each `<s>` and after each `</s>`, see
    /// [`crate::data::example_ids`]), in training and in evaluation, rather than to
    /// everything before it in the row. Off when omitted (today's packing).
    #[serde(default)]
    pub attend_within_examples: bool,
}

/// One stage of [`LmTrainSpec::length_curriculum`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthStage {
    /// The first step of the stage.
    pub from_step: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    /// Train this stage only on these tasks' examples of the corpus (e.g. `[needle]` for
    /// the long rows, which then carry no short examples whose masked attention would cost
    /// as much as a long one's); every task of the corpus when empty.
    #[serde(default)]
    pub tasks: Vec<corpus::Task>,
    /// Every row of this stage starts with one of its examples of at least this many tokens
    /// (`<s>` and `</s>` included; e.g. the needle examples longer than the previous stage's
    /// rows), and the room it leaves is filled with the stage's shorter examples, first fit,
    /// each at most once ([`corpus::pack_led`]). So the long rows carry a long-range lookup
    /// each and the short tasks are still trained in the rest. 0 when omitted: rows packed
    /// from all the stage's examples in order (or, with `lead_needles`, led by those).
    #[serde(default)]
    pub lead_tokens: usize,
    /// Needle examples generated for this stage (with their own seed, lengths and fact
    /// depths), each leading a row of its own beside the corpus's leads; the ones longer than
    /// a row (`seq_len + 1` tokens) are left out, never cut. Without `lead_tokens` they are the
    /// only leads, and the stage's corpus examples only fill the room they leave (first fit,
    /// the rest unused). None when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lead_needles: Option<corpus::NeedleLeads>,
}

impl LmTrainSpec {
    /// `(from_step, seq_len, batch_size)` of every stage, the top-level one first.
    fn stages(&self) -> Vec<(usize, usize, usize)> {
        let mut stages = vec![(0, self.seq_len, self.batch_size)];
        stages.extend(
            self.length_curriculum
                .iter()
                .map(|s| (s.from_step, s.seq_len, s.batch_size)),
        );
        stages
    }

    /// The tasks (empty: all), the lead length (0: none) and the generated leads of every
    /// stage, the top-level one first.
    fn stage_filters(&self) -> Vec<StageLeads<'_>> {
        let mut filters = vec![StageLeads {
            tasks: &[],
            lead_tokens: 0,
            needles: None,
        }];
        filters.extend(self.length_curriculum.iter().map(|s| StageLeads {
            tasks: s.tasks.as_slice(),
            lead_tokens: s.lead_tokens,
            needles: s.lead_needles.as_ref(),
        }));
        filters
    }
}

impl LmTrainSpec {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        exitgraph_compiler::ron_file::read(path)
    }
}

/// A stage's choice of examples: [`LengthStage::tasks`], [`LengthStage::lead_tokens`] and
/// [`LengthStage::lead_needles`].
struct StageLeads<'a> {
    tasks: &'a [corpus::Task],
    lead_tokens: usize,
    needles: Option<&'a corpus::NeedleLeads>,
}

/// What a run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LmReport {
    /// The folder written; `training.json` holds it as the config names it (relative to the
    /// config file).
    pub output: PathBuf,
    pub params: usize,
    pub vocab: usize,
    /// Rows of the first stage (the top-level `seq_len`).
    pub train_rows: usize,
    pub eval_rows: usize,
    /// What every stage of the length curriculum trained on, the top-level one first.
    #[serde(default)]
    pub stages: Vec<StageReport>,
    pub log: TrainLog,
}

/// One stage of a run's length curriculum: its rows and the examples packed into them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub from_step: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    /// Corpus examples the stage's filters keep.
    pub examples: usize,
    pub rows: usize,
    /// Generated needle examples ([`LengthStage::lead_needles`]) that fit a row and lead one.
    #[serde(default)]
    pub lead_needles: usize,
}

/// The folder a run trains in, beside the output: `OUTPUT.run`.
pub fn run_folder(output: &Path) -> PathBuf {
    let mut name = output
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "model".into());
    name.push(".run");
    output.with_file_name(name)
}

/// The files of a trained checkpoint, copied from the run folder to the output.
const CHECKPOINT_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// `path` with its last component a real name (`.` and `..` resolved against the existing
/// folders), so the run folder can sit beside it.
fn named_folder(path: &Path) -> anyhow::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let mut normal = PathBuf::new();
    for c in absolute.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    if normal.file_name().is_none() {
        bail!("{} has no folder name", path.display());
    }
    Ok(normal)
}

/// Copies the run's checkpoint files into `out`: each to a complete, synced temporary file
/// first, then all renamed over the old ones back to back, so the output holds a mixed set
/// only for the moment of the renames.
fn publish(run: &Path, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut staged = Vec::new();
    for f in CHECKPOINT_FILES {
        let target = out.join(f);
        let tmp = exitgraph_compiler::atomic::temp_path(&target)?;
        let copied =
            std::fs::copy(run.join(f), &tmp).and_then(|_| std::fs::File::open(&tmp)?.sync_all());
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            for (t, _) in &staged {
                let _ = std::fs::remove_file(t);
            }
            bail!("{}: cannot write: {e}", target.display());
        }
        staged.push((tmp, target));
    }
    for (tmp, target) in &staged {
        std::fs::rename(tmp, target)
            .with_context(|| format!("{}: cannot write", target.display()))?;
    }
    exitgraph_compiler::atomic::sync_folder(&out.join("config.json"));
    Ok(())
}

/// Trains the model a config describes. With `resume`, continues from the newest checkpoint
/// in `OUTPUT.run/checkpoints`. A model already in the output is replaced only with `force`.
pub fn train_lm(
    config_path: &Path,
    resume: bool,
    force: bool,
    show_progress: bool,
) -> anyhow::Result<LmReport> {
    let spec = LmTrainSpec::read(config_path)?;
    train_lm_spec(&spec, config_path, resume, force, show_progress)
}

/// Trains the model `spec` describes; relative paths in it resolve against the folder of
/// `config_path`, which errors name.
pub fn train_lm_spec(
    spec: &LmTrainSpec,
    config_path: &Path,
    resume: bool,
    force: bool,
    show_progress: bool,
) -> anyhow::Result<LmReport> {
    // A training row is seq_len + 1 tokens (inputs and the shifted targets).
    for (i, &(from, seq_len, batch)) in spec.stages().iter().enumerate() {
        let field = if i == 0 {
            "seq_len".to_string()
        } else {
            format!("length_curriculum[{}].seq_len", i - 1)
        };
        if seq_len >= spec.model.max_positions {
            bail!(
                "{}: {field} {seq_len} does not fit the model's positions: \
                 model.max_positions is {}, it needs to be more than {field}",
                config_path.display(),
                spec.model.max_positions
            );
        }
        if seq_len == 0 || batch == 0 {
            bail!(
                "{}: {} needs a positive seq_len and batch_size",
                config_path.display(),
                if i == 0 {
                    "training".to_string()
                } else {
                    format!("length_curriculum[{}]", i - 1)
                }
            );
        }
        if let Some(problem) = i
            .checked_sub(1)
            .and_then(|j| spec.length_curriculum.get(j))
            .and_then(|s| s.lead_needles.as_ref())
            .and_then(|n| n.problem())
        {
            bail!(
                "{}: length_curriculum[{}].lead_needles: {problem}",
                config_path.display(),
                i - 1
            );
        }
        if i > 0 && from <= spec.stages()[i - 1].0 {
            bail!(
                "{}: length_curriculum[{}].from_step {from} must be after the previous stage's \
                 (steps start at 0)",
                config_path.display(),
                i - 1
            );
        }
    }
    let base = config_path.parent().unwrap_or_else(|| Path::new("."));
    let out = named_folder(&base.join(&spec.output)).with_context(|| {
        format!(
            "{}: output \"{}\" must name a folder",
            config_path.display(),
            spec.output
        )
    })?;
    let existing = out.join("model.safetensors");
    if existing.exists() && !force {
        bail!(
            "{}: output {} already holds a model; `train lm` replaces it only with --force \
             (it trains in {} and replaces the files when training has finished)",
            config_path.display(),
            existing.display(),
            run_folder(&out).display()
        );
    }
    let run = run_folder(&out);
    std::fs::create_dir_all(&run).with_context(|| format!("{}: cannot create", run.display()))?;
    let device = Device::Cpu;

    let train_examples = corpus::generate(&spec.corpus);
    let eval_examples = corpus::generate(&spec.eval_corpus);
    let tokenizer = match &spec.tokenizer {
        Some(file) => {
            let path = base.join(file);
            tokenizers::Tokenizer::from_file(&path).map_err(|e| {
                anyhow::anyhow!(
                    "{}: tokenizer: {}: {e}",
                    config_path.display(),
                    path.display()
                )
            })?
        }
        None => corpus::train_tokenizer(&train_examples, spec.vocab_size)?,
    };
    let (bos, eos) = corpus::try_special_ids(&tokenizer)?;
    let vocab = tokenizer.get_vocab_size(true);
    // Every stage but the longest packs only the examples that fit its rows, so a short
    // stage does not train on haystacks cut off from their question; the longest stage
    // packs them all (an example longer than its rows is cut, as `pack` does).
    let encoded = train_examples
        .iter()
        .map(|e| corpus::encode(&tokenizer, e))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let longest = spec
        .stages()
        .iter()
        .map(|s| s.1)
        .max()
        .unwrap_or(spec.seq_len);
    let mut stage_rows = Vec::new();
    let mut stage_reports = Vec::new();
    for (i, (&(from, seq_len, batch), filter)) in
        spec.stages().iter().zip(spec.stage_filters()).enumerate()
    {
        let StageLeads {
            tasks,
            lead_tokens,
            needles,
        } = filter;
        let fitting = stage_examples(
            &encoded,
            &train_examples,
            StageFilter {
                seq_len,
                longest: seq_len == longest,
                tasks,
            },
        );
        // With `lead_tokens`, the examples that long lead the rows and the rest fill them.
        let (mut leads, fill): (Vec<corpus::Encoded>, Vec<corpus::Encoded>) = if lead_tokens > 0 {
            fitting
                .into_iter()
                .partition(|e| e.ids.len() >= lead_tokens)
        } else {
            (Vec::new(), fitting)
        };
        let generated = match needles {
            Some(needles) => generated_leads(&tokenizer, needles, seq_len)?,
            None => Vec::new(),
        };
        if let (Some(needles), true) = (needles, generated.is_empty()) {
            bail!(
                "{}: length_curriculum[{}].lead_needles: none of its {} examples fits a row of \
                 {} tokens (seq_len + 1); fewer sentences would",
                config_path.display(),
                i - 1,
                needles.examples,
                seq_len + 1
            );
        }
        let led = lead_tokens > 0 || needles.is_some();
        let fitting = if lead_tokens > 0 { &leads } else { &fill };
        // A stage led only by generated needles has rows even without a corpus example, but
        // tasks the corpus does not have are still an error.
        if i > 0
            && fitting.is_empty()
            && (lead_tokens > 0 || needles.is_none() || !tasks.is_empty())
        {
            let which = if tasks.is_empty() {
                "no example of the corpus".to_string()
            } else {
                let names: Vec<_> = tasks.iter().map(|t| t.name()).collect();
                format!(
                    "none of its tasks ({}) has an example that",
                    names.join(", ")
                )
            };
            let why = if lead_tokens > 0 {
                format!(
                    "{which} fits {seq_len} tokens and has at least lead_tokens ({lead_tokens})"
                )
            } else {
                format!("{which} fits {seq_len} tokens")
            };
            bail!(
                "{}: length_curriculum[{}] has no examples: {why}",
                config_path.display(),
                i - 1
            );
        }
        let corpus_leads = leads.len();
        let lead_needles = generated.len();
        leads.extend(generated);
        let (rows, examples) = if led {
            let (rows, used) = corpus::pack_led(&leads, &fill, seq_len, eos)?;
            (rows, corpus_leads + used)
        } else {
            (corpus::pack_encoded(&fill, seq_len, eos)?, fill.len())
        };
        let rows: Vec<Vec<u32>> = rows.into_iter().map(|r| r.ids).collect();
        stage_reports.push(StageReport {
            from_step: from,
            seq_len,
            batch_size: batch,
            examples,
            rows: rows.len(),
            lead_needles,
        });
        stage_rows.push((from, rows, batch));
    }
    let train_rows = stage_rows[0].1.len();
    let eval_rows = corpus::pack(&tokenizer, &eval_examples, spec.seq_len)?;
    if train_rows == 0 || eval_rows.is_empty() {
        bail!(
            "{}: the corpus is too small for seq_len {}",
            config_path.display(),
            spec.seq_len
        );
    }

    let checkpoints = run.join("checkpoints");
    // Any checkpoint (even with a lost `latest` pointer) is something to resume from.
    let has_checkpoint = std::fs::read_dir(&checkpoints).is_ok_and(|mut entries| {
        entries.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("step-")))
    });
    let resuming = resume && has_checkpoint;
    if !resuming {
        // A fresh run never mixes with an earlier run's checkpoints.
        let _ = std::fs::remove_dir_all(&checkpoints);
    }
    if !resuming {
        let shape = &spec.model;
        let init = LlamaSpec {
            model_type: "llama".into(),
            hidden: shape.hidden,
            layers: shape.layers,
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            intermediate: shape.intermediate,
            vocab,
            max_positions: shape.max_positions,
            tie_embeddings: shape.tie_embeddings,
            rope_theta: shape.rope_theta,
            init_std: shape.init_std,
            sliding_window: None,
            norm_std: 0.0,
            bos_token_id: Some(bos),
            eos_token_id: Some(eos),
        };
        write_random_llama(&run, &init, spec.seed)?;
        corpus::save_tokenizer(&tokenizer, &run.join("tokenizer.json"))?;
    }

    let layerskip = spec.layerskip.clone().unwrap_or_default();
    layerskip
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
    let mut graph = exitgraph_ir::import(&run)?.graph;
    let layers = graph.info.num_layers;
    if layerskip.exits() && layers > 1 {
        // Every layer's output through the model's own final norm and LM head.
        use exitgraph_passes::{HeadKind, InsertExits, Pass, PassContext};
        InsertExits {
            after: Vec::new(),
            every: Some(1),
            head: HeadKind::SharedLmHead { norm: true },
            gate: false,
            weights: None,
        }
        .run(&mut graph, &PassContext::detached())
        .map_err(|e| anyhow::anyhow!("early-exit loss: {e}"))?;
    }
    let mut params = ParamStore::load(&graph.weights, &run, &device)?;
    let program = Program::lower_with(
        &graph,
        &mut params,
        &device,
        DType::F32,
        LowerOptions::training(),
    )?;
    // (first step, batches) of every stage of the length curriculum.
    let stages: Vec<(usize, Batcher)> = stage_rows
        .into_iter()
        .map(|(from, rows, batch)| (from, Batcher::new(rows, batch, spec.seed)))
        .collect();
    let eval = Batcher::new(eval_rows, spec.batch_size, spec.seed);
    let eval_batches = eval.in_order(&device)?;
    let accum = spec.training.grad_accum.max(1);
    // The call's inputs: with `attend_within_examples`, each token's example as its segment.
    let inputs_of = |x: candle_core::Tensor| -> anyhow::Result<exitgraph_compiler::lower::Inputs> {
        let example_ids = if spec.attend_within_examples {
            Some(crate::data::example_ids(&x, bos, eos)?)
        } else {
            None
        };
        Ok(exitgraph_compiler::lower::Inputs {
            input_ids: x,
            attention_mask: None,
            token_type_ids: None,
            example_ids,
        })
    };
    let forward_loss =
        |x: candle_core::Tensor, y: &candle_core::Tensor| -> anyhow::Result<candle_core::Tensor> {
            let logits = program
                .forward(&inputs_of(x)?, &mut program.new_cache(), &["logits"], false)?
                .remove("logits")
                .context("the program has no logits")?;
            Ok(lm_loss(&logits, y)?)
        };
    // (exit depth, logits node) of every early exit, shallowest first.
    let exit_nodes: Vec<(usize, exitgraph_ir::NodeIndex)> = graph
        .exits
        .iter()
        .filter_map(|e| e.logits.map(|n| (e.after, n)))
        .collect();
    let steps = spec.training.steps;
    let layerskip_loss = |x: candle_core::Tensor,
                          y: &candle_core::Tensor,
                          step: usize,
                          micro: usize|
     -> anyhow::Result<candle_core::Tensor> {
        let rows = x.dim(0)?;
        let keep = if layerskip.p_max > 0.0 {
            let mut rng = crate::data::SplitMix64::new(
                spec.seed ^ (step as u64).wrapping_mul(0x9E37_79B9) ^ (micro as u64) << 48,
            );
            let masks = (0..layers)
                .map(|l| {
                    let p = layerskip.dropout_rate(l, layers, step, steps);
                    let keep: Vec<f32> = (0..rows)
                        .map(|_| {
                            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                            f32::from(u8::from(u >= p))
                        })
                        .collect();
                    candle_core::Tensor::from_vec(keep, rows, &device)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(masks)
        } else {
            None
        };
        let weights = layerskip.exit_weights(layers, step);
        let mut want = vec![(weights[layers - 1], program.logits_node()?)];
        for &(after, node) in &exit_nodes {
            if let Some(&w) = weights.get(after - 1).filter(|&&w| w > 0.0) {
                want.push((w, node));
            }
        }
        let nodes: Vec<_> = want.iter().map(|w| w.1).collect();
        let inputs = inputs_of(x)?;
        let outs = program.forward_nodes_dropping(
            &inputs,
            &mut program.new_cache(),
            None,
            &nodes,
            false,
            keep.as_deref(),
        )?;
        let mut total: Option<candle_core::Tensor> = None;
        for ((w, _), logits) in want.iter().zip(outs) {
            let term = (lm_loss(&logits, y)? * *w)?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        total.context("no loss term")
    };
    let plain = layerskip.p_max == 0.0 && !layerskip.exits();
    let mut loss = |step: usize, micro: usize| -> anyhow::Result<(candle_core::Tensor, usize)> {
        let (from, train) = stages
            .iter()
            .rev()
            .find(|(from, _)| *from <= step)
            .context("no stage for the step")?;
        let (x, y) = train.batch((step - from) * accum + micro, &device)?;
        let tokens = y.elem_count();
        let l = if plain {
            forward_loss(x, &y)?
        } else {
            layerskip_loss(x, &y, step, micro)?
        };
        Ok((l, tokens))
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
    let mut trainer =
        Trainer::new(spec.training.clone(), &mut params).with_checkpoints(&checkpoints);
    trainer.show_progress = show_progress;
    if resuming {
        trainer.resume()?;
    }
    let log = trainer.run(&mut loss, &mut evaluate)?;
    drop(trainer);

    params.save(&run.join("model.safetensors"))?;
    drop(params);
    publish(&run, &out)?;
    let report = LmReport {
        output: out.clone(),
        params: graph.params(),
        vocab,
        train_rows,
        stages: stage_reports,
        eval_rows: eval.rows(),
        log,
    };
    // The record names the output as the config does (relative to it), so a shipped
    // `training.json` carries no folder of the machine that trained it.
    let record = LmReport {
        output: PathBuf::from(&spec.output),
        ..report.clone()
    };
    exitgraph_compiler::atomic::write_text(
        &out.join("training.json"),
        &serde_json::to_string_pretty(&record)?,
    )?;
    let _ = std::fs::remove_dir_all(&run);
    Ok(report)
}

/// Which examples one stage of the length curriculum packs into its rows.
struct StageFilter<'a> {
    seq_len: usize,
    /// The longest stage packs examples longer than its rows too (cut); a shorter stage
    /// only those that fit (`seq_len + 1` tokens: inputs and the shifted targets).
    longest: bool,
    /// Only these tasks' examples (every task when empty).
    tasks: &'a [corpus::Task],
}

/// The stage's generated needle examples, encoded, that fit a row of `seq_len + 1` tokens.
fn generated_leads(
    tokenizer: &tokenizers::Tokenizer,
    needles: &corpus::NeedleLeads,
    seq_len: usize,
) -> anyhow::Result<Vec<corpus::Encoded>> {
    let mut fitting = Vec::new();
    for example in needles.generate() {
        let encoded = corpus::encode(tokenizer, &example)?;
        if encoded.ids.len() <= seq_len + 1 {
            fitting.push(encoded);
        }
    }
    Ok(fitting)
}

/// The encoded examples (`encoded[i]` encodes `examples[i]`) a stage trains on, in order.
fn stage_examples(
    encoded: &[corpus::Encoded],
    examples: &[corpus::Example],
    filter: StageFilter<'_>,
) -> Vec<corpus::Encoded> {
    encoded
        .iter()
        .zip(examples)
        .filter(|(e, ex)| {
            let n = e.ids.len();
            (filter.longest || n <= filter.seq_len + 1)
                && (filter.tasks.is_empty() || filter.tasks.contains(&ex.task))
        })
        .map(|(e, _)| e.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage keeps the examples of its tasks that fit its rows (`seq_len + 1` tokens; any
    /// length in the longest stage), in corpus order.
    #[test]
    fn a_stage_packs_the_examples_its_tasks_and_lengths_allow() {
        use corpus::Task;
        let lens = [
            (Task::Copy, 5),
            (Task::Needle, 40),
            (Task::Needle, 9),
            (Task::Needle, 20),
        ];
        let encoded: Vec<corpus::Encoded> = lens
            .iter()
            .map(|&(_, n)| corpus::Encoded {
                ids: (0..n).collect(),
                answer: vec![false; n as usize],
            })
            .collect();
        let examples: Vec<corpus::Example> = lens
            .iter()
            .map(|&(task, _)| corpus::Example {
                task,
                text: String::new(),
                answers: Vec::new(),
            })
            .collect();
        let kept = |seq_len, longest, tasks: &[Task]| -> Vec<usize> {
            let filter = StageFilter {
                seq_len,
                longest,
                tasks,
            };
            stage_examples(&encoded, &examples, filter)
                .iter()
                .map(|e| e.ids.len())
                .collect()
        };
        assert_eq!(kept(19, false, &[]), vec![5, 9, 20]);
        assert_eq!(kept(18, false, &[]), vec![5, 9]);
        assert_eq!(kept(19, true, &[]), vec![5, 40, 9, 20]);
        assert_eq!(kept(19, true, &[Task::Needle]), vec![40, 9, 20]);
        assert_eq!(kept(8, false, &[Task::Needle]), vec![9]);
        assert_eq!(kept(7, false, &[Task::Needle]), Vec::<usize>::new());
        assert_eq!(kept(8, false, &[Task::Copy]), vec![5]);
    }

    #[test]
    fn the_run_folder_sits_beside_the_output() {
        let cwd = std::env::current_dir().unwrap_or_default();
        let named = |p: &str| named_folder(Path::new(p)).ok();
        assert_eq!(
            named("/a/model").map(|p| run_folder(&p)),
            Some(PathBuf::from("/a/model.run"))
        );
        assert_eq!(
            named("/a/model/").map(|p| run_folder(&p)),
            Some(PathBuf::from("/a/model.run"))
        );
        assert_eq!(
            named("/a/b/..").map(|p| run_folder(&p)),
            Some(PathBuf::from("/a.run"))
        );
        assert_eq!(named("/a/./model/."), Some(PathBuf::from("/a/model")));
        assert_eq!(named("."), cwd.file_name().map(|_| cwd.clone()));
        assert!(named("/").is_none());
    }
}
