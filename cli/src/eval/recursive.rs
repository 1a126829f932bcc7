//! `exitgraph eval recursive`: the Relaxed Recursive Transformers quality table. For each
//! tying (`loops`), initialisation and LoRA rank, the recursive model's held-out loss and
//! per-task answer accuracy before and after uptraining (the same token budget for every
//! row), next to the original model and to models of the tied block's size trained from
//! scratch with that budget (the paper's "reduced-size" baseline).
//!
//! Uptraining trains the shared block and the adapters together (`train recursive
//! --train-shared`), as the paper uptrains every parameter of the recursive model; the
//! embeddings and the LM head stay frozen (a deviation: the paper trains them too). Rank 0
//! is the recursive model without adapters. Every row is evaluated on the same held-out
//! examples.

use super::quality::{held_out, quality, Quality};
use crate::corpus::{CorpusSpec, Task};
use crate::passes::{LoraRank, TieInit};
use crate::pipeline::{compile, Pipeline};
use anyhow::{bail, Context};
use exitgraph_ir::Graph;
use exitgraph_train::lm::{train_lm_spec, LmTrainSpec, ModelShape};
use exitgraph_train::recursive::{train_recursive, RecursiveTrainSpec};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// What the table covers.
#[derive(Clone, Debug)]
pub struct GridSpec {
    /// The checkpoint (with tokenizer.json).
    pub model: PathBuf,
    pub loops: Vec<usize>,
    pub inits: Vec<TieInit>,
    /// `None`: no adapters (rank 0).
    pub ranks: Vec<Option<LoraRank>>,
    /// The uptraining of every row (`train_shared` is set by the table).
    pub uptrain: RecursiveTrainSpec,
    /// Train same-size models from scratch with the same budget.
    pub scratch: bool,
    pub eval_seed: u64,
    pub eval_examples: usize,
    /// Folder for the runs' pipelines and weights.
    pub work: PathBuf,
}

/// Before or after uptraining.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    Original,
    Before,
    After,
    Scratch,
}

/// One row of the table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GridRow {
    /// `6 layers`, `3x2 Average`, `scratch 3 layers`.
    pub model: String,
    pub loops: Option<usize>,
    pub init: Option<TieInit>,
    /// `0`, `4`, ..., `full`; empty for the original and scratch rows.
    pub rank: String,
    pub stage: Stage,
    /// Parameters of the layers (shared block, per-depth norms and adapters), embeddings,
    /// final norm and LM head excluded.
    pub layer_params: usize,
    pub quality: Quality,
    /// Uptraining or training time (0 for evaluated-only rows).
    pub train_seconds: f64,
}

/// The table and how it was made.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GridReport {
    pub model: String,
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    /// Tokens each trained row saw.
    pub tokens_per_run: u64,
    pub eval_examples: usize,
    pub eval_seed: u64,
    pub rows: Vec<GridRow>,
}

/// Parameters of the graph's layers (nodes in a block), each shared weight once and each
/// adapter once per projection (as [`Graph::params`] counts).
pub fn layer_params(g: &Graph) -> usize {
    g.params_of(|n| n.layer.is_some())
}

/// Tokens one trained row sees: steps × micro-batches per step × rows × tokens per row.
pub fn tokens_per_run(t: &exitgraph_train::TrainConfig, batch_size: usize, seq_len: usize) -> u64 {
    (t.steps * t.grad_accum.max(1) * batch_size * seq_len) as u64
}

fn rank_name(rank: Option<LoraRank>) -> String {
    match rank {
        None => "0".into(),
        Some(LoraRank::Rank(r)) => r.to_string(),
        Some(LoraRank::Full) => "full".into(),
    }
}

fn pipeline_text(model: &Path, loops: usize, init: TieInit, rank: Option<LoraRank>) -> String {
    let mut passes = format!("TieLayers(loops: {loops}, init: {init:?})");
    if let Some(r) = rank {
        let r = match r {
            LoraRank::Rank(r) => format!("Rank({r})"),
            LoraRank::Full => "Full".into(),
        };
        // The paper's SVD initialisation of the relaxation.
        let _ = write!(passes, ", DepthLora(rank: {r}, init: Svd)");
    }
    format!(
        "Pipeline(model: {:?}, passes: [{passes}])\n",
        model.display().to_string()
    )
}

/// Compiles and evaluates the pipeline file `path`.
fn evaluate(
    path: &Path,
    data: &[(Task, crate::corpus::Encoded)],
) -> anyhow::Result<(usize, Quality)> {
    let p = Pipeline::read(path)?;
    let compiled = compile(&p, path)?;
    let program = compiled.lower()?;
    Ok((layer_params(&compiled.graph), quality(&program, data)?))
}

/// The shape of a `layers`-layer Llama like the model in `model` (its config.json).
fn llama_shape(model: &Path, layers: usize) -> anyhow::Result<ModelShape> {
    let path = model.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let get = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .map(|x| x as usize)
            .with_context(|| {
                format!(
                    "{}: no {k} (the from-scratch baselines are Llama models: use --no-scratch)",
                    path.display()
                )
            })
    };
    let heads = get("num_attention_heads")?;
    Ok(ModelShape {
        hidden: get("hidden_size")?,
        layers,
        heads,
        kv_heads: get("num_key_value_heads").unwrap_or(heads),
        intermediate: get("intermediate_size")?,
        max_positions: get("max_position_embeddings")?,
        rope_theta: v
            .get("rope_theta")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(10000.0),
        init_std: 0.02,
        tie_embeddings: v
            .get("tie_word_embeddings")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
    })
}

/// Runs the whole table, calling `progress` with each finished row.
pub fn eval_recursive(
    spec: &GridSpec,
    mut progress: impl FnMut(&GridRow),
) -> anyhow::Result<GridReport> {
    let model = std::fs::canonicalize(&spec.model)
        .with_context(|| format!("{}: no such model folder", spec.model.display()))?;
    let ckpt = exitgraph_ir::import(&model)?;
    let tok_path = ckpt
        .tokenizer
        .clone()
        .with_context(|| format!("{}: eval recursive needs tokenizer.json", model.display()))?;
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let data = held_out(&tokenizer, spec.eval_seed, spec.eval_examples)?;
    let layers = ckpt.graph.info.num_layers;
    for &b in &spec.loops {
        if b == 0 || layers % b != 0 {
            bail!("--loops {b} does not divide the model's {layers} layers");
        }
    }
    std::fs::create_dir_all(&spec.work)
        .with_context(|| format!("{}: cannot create", spec.work.display()))?;
    // Absolute, so that paths written in generated configs resolve the same from anywhere.
    let work = std::fs::canonicalize(&spec.work)
        .with_context(|| format!("{}: cannot resolve", spec.work.display()))?;
    let mut rows = Vec::new();
    let mut push = |row: GridRow, rows: &mut Vec<GridRow>| {
        progress(&row);
        rows.push(row);
    };

    let original = work.join("original.ron");
    exitgraph_compiler::atomic::write_text(
        &original,
        &format!("Pipeline(model: {:?})\n", model.display().to_string()),
    )?;
    let (params, q) = evaluate(&original, &data)?;
    push(
        GridRow {
            model: format!("{layers} layers"),
            loops: None,
            init: None,
            rank: String::new(),
            stage: Stage::Original,
            layer_params: params,
            quality: q,
            train_seconds: 0.0,
        },
        &mut rows,
    );

    let mut uptrain = spec.uptrain.clone();
    uptrain.train_shared = true;
    for &b in &spec.loops {
        let k = layers / b;
        for &init in &spec.inits {
            for &rank in &spec.ranks {
                let name = format!("{k}x{b}-{init:?}-r{}", rank_name(rank)).to_lowercase();
                let path = work.join(format!("{name}.ron"));
                exitgraph_compiler::atomic::write_text(
                    &path,
                    &pipeline_text(&model, b, init, rank),
                )?;
                let label = format!("{k}x{b} {init:?}");
                let (params, q) = evaluate(&path, &data)?;
                let row = |stage, layer_params, quality, train_seconds| GridRow {
                    model: label.clone(),
                    loops: Some(b),
                    init: Some(init),
                    rank: rank_name(rank),
                    stage,
                    layer_params,
                    quality,
                    train_seconds,
                };
                push(row(Stage::Before, params, q, 0.0), &mut rows);
                let report = train_recursive(&path, &work.join(&name), &uptrain, false)?;
                let (params, q) = evaluate(&report.pipeline, &data)?;
                push(row(Stage::After, params, q, report.log.seconds), &mut rows);
            }
        }
    }

    if spec.scratch {
        let mut sizes: Vec<usize> = spec.loops.iter().map(|b| layers / b).collect();
        sizes.sort_unstable();
        sizes.dedup();
        for k in sizes {
            let out = work.join(format!("scratch-{k}"));
            let lm = LmTrainSpec {
                output: out.display().to_string(),
                corpus: CorpusSpec::new(uptrain.seed, uptrain.examples, uptrain.tasks.clone()),
                eval_corpus: CorpusSpec::new(
                    uptrain.seed.wrapping_add(7919),
                    (uptrain.examples / 10).max(16),
                    uptrain.tasks.clone(),
                ),
                vocab_size: ckpt.graph.info.vocab,
                tokenizer: Some(tok_path.display().to_string()),
                model: llama_shape(&model, k)?,
                seq_len: uptrain.seq_len,
                batch_size: uptrain.batch_size,
                seed: uptrain.seed,
                training: uptrain.training.clone(),
                layerskip: None,
                length_curriculum: Vec::new(),
                attend_within_examples: false,
            };
            let report = train_lm_spec(&lm, &work.join("scratch.ron"), false, true, false)?;
            let path = work.join(format!("scratch-{k}.ron"));
            exitgraph_compiler::atomic::write_text(
                &path,
                &format!("Pipeline(model: {:?})\n", out.display().to_string()),
            )?;
            let (params, q) = evaluate(&path, &data)?;
            push(
                GridRow {
                    model: format!("scratch {k} layers"),
                    loops: None,
                    init: None,
                    rank: String::new(),
                    stage: Stage::Scratch,
                    layer_params: params,
                    quality: q,
                    train_seconds: report.log.seconds,
                },
                &mut rows,
            );
        }
    }
    let t = &uptrain.training;
    Ok(GridReport {
        model: model.display().to_string(),
        steps: t.steps,
        batch_size: uptrain.batch_size,
        seq_len: uptrain.seq_len,
        lr: t.lr,
        tokens_per_run: tokens_per_run(t, uptrain.batch_size, uptrain.seq_len),
        eval_examples: spec.eval_examples,
        eval_seed: spec.eval_seed,
        rows,
    })
}

impl GridReport {
    /// Tasks present in every row, in order.
    fn tasks(&self) -> Vec<Task> {
        self.rows
            .first()
            .map(|r| r.quality.tasks.iter().map(|t| t.task).collect())
            .unwrap_or_default()
    }

    /// A Markdown table: one row per model and stage.
    pub fn to_markdown(&self) -> String {
        let tasks = self.tasks();
        let mut s = String::from("| model | rank | stage | layer params | held-out loss |");
        for t in &tasks {
            let _ = write!(s, " {} |", t.name());
        }
        s.push_str("\n|---|---:|---|---:|---:|");
        for _ in &tasks {
            s.push_str("---:|");
        }
        s.push('\n');
        for r in &self.rows {
            let stage = match r.stage {
                Stage::Original => "original",
                Stage::Before => "tied, not trained",
                Stage::After => "uptrained",
                Stage::Scratch => "from scratch",
            };
            let _ = write!(
                s,
                "| {} | {} | {stage} | {} | {:.3} |",
                r.model, r.rank, r.layer_params, r.quality.loss
            );
            for t in &r.quality.tasks {
                let _ = write!(
                    s,
                    " {:.1} ±{:.1} |",
                    100.0 * t.accuracy(),
                    100.0 * t.standard_error()
                );
            }
            s.push('\n');
        }
        s
    }

    /// One CSV line per row.
    pub fn to_csv(&self) -> String {
        let tasks = self.tasks();
        let mut s = String::from("model,loops,init,rank,stage,layer_params,loss,train_seconds");
        for t in &tasks {
            let _ = write!(s, ",{}", t.name());
        }
        s.push('\n');
        for r in &self.rows {
            let _ = write!(
                s,
                "{},{},{},{},{:?},{},{:.5},{:.1}",
                r.model,
                r.loops.map_or(String::new(), |b| b.to_string()),
                r.init.map_or(String::new(), |i| format!("{i:?}")),
                r.rank,
                r.stage,
                r.layer_params,
                r.quality.loss,
                r.train_seconds
            );
            for t in &r.quality.tasks {
                let _ = write!(s, ",{:.4}", t.accuracy());
            }
            s.push('\n');
        }
        s
    }

    /// Held-out loss against layer parameters after uptraining, one series per tying and
    /// init (its points are the ranks), and the original model as a horizontal line across
    /// them. The untrained and from-scratch rows are in the table only: their losses (up to
    /// several nats) would flatten the curves, and ten colours are distinct.
    pub fn plot_series(&self) -> Vec<super::plot::Series> {
        let mut series: Vec<super::plot::Series> = Vec::new();
        let x = |r: &GridRow| r.layer_params as f64 / 1e6;
        for r in self.rows.iter().filter(|r| r.stage == Stage::After) {
            let name = format!("{} uptrained", r.model);
            let point = (x(r), r.quality.loss);
            match series.iter_mut().find(|s| s.name == name) {
                Some(s) => s.points.push(point),
                None => series.push(super::plot::Series {
                    name,
                    points: vec![point],
                    line: true,
                }),
            }
        }
        let xs = || series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let (lo, hi) = (xs().fold(f64::INFINITY, f64::min), xs().fold(0.0, f64::max));
        if let Some(o) = self.rows.iter().find(|r| r.stage == Stage::Original) {
            let (lo, hi) = (lo.min(x(o)), hi.max(x(o)));
            series.insert(
                0,
                super::plot::Series {
                    name: format!("{} (original)", o.model),
                    points: vec![(lo, o.quality.loss), (hi, o.quality.loss)],
                    line: true,
                },
            );
        }
        series
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::passes::{DepthLora, LoraInit, LoraTarget, PassManager, TieLayers, TieNorms};
    use crate::synth::{write_random_llama, LlamaSpec};

    /// Hand-computed for hidden 32, 4 heads of 8 (2 KV heads: k and v are 16 wide),
    /// intermediate 64: per layer q 1024 + k 512 + v 512 + o 1024 + gate, up, down 3 × 2048
    /// + two norms 64 = 9280.
    #[test]
    fn layer_params_count_shared_weights_once_and_adapters_per_depth() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = LlamaSpec::tiny();
        spec.layers = 4;
        write_random_llama(dir.path(), &spec, 1).unwrap();
        let g = exitgraph_ir::import(dir.path()).unwrap().graph;
        assert_eq!(layer_params(&g), 4 * 9280);
        let tied = |norms, rank: Option<usize>| {
            let mut h = g.clone();
            let mut passes: Vec<Box<dyn crate::passes::Pass>> = vec![Box::new(TieLayers {
                loops: 2,
                init: TieInit::Lower,
                norms,
                weights: None,
            })];
            if let Some(r) = rank {
                use LoraTarget::*;
                passes.push(Box::new(DepthLora {
                    rank: LoraRank::Rank(r),
                    targets: vec![q, k, v, o, gate, up, down],
                    init: LoraInit::Zero,
                    weights: None,
                }));
            }
            PassManager::new(passes).run(&mut h).unwrap();
            // The whole graph's count agrees: embeddings, final norm and head unchanged.
            assert_eq!(h.params(), layer_params(&h) + g.params() - layer_params(&g));
            layer_params(&h)
        };
        // Two positions' weights, once each.
        assert_eq!(tied(TieNorms::Shared, None), 2 * 9280);
        // Each depth keeps its two norms: 4 × 64 instead of 2 × 64.
        assert_eq!(tied(TieNorms::PerIteration, None), 2 * 9216 + 4 * 64);
        // Rank 2 per depth: q, o 2·(32 + 32); k, v 2·(32 + 16); gate, up, down 2·(32 + 64).
        assert_eq!(
            tied(TieNorms::Shared, Some(2)),
            2 * 9280 + 4 * (2 * 128 + 2 * 96 + 3 * 192)
        );
    }

    #[test]
    fn rank_names_and_pipelines() {
        assert_eq!(rank_name(None), "0");
        assert_eq!(rank_name(Some(LoraRank::Rank(16))), "16");
        assert_eq!(rank_name(Some(LoraRank::Full)), "full");
        let p = pipeline_text(Path::new("/m"), 3, TieInit::Stepwise, Some(LoraRank::Full));
        assert_eq!(
            p,
            "Pipeline(model: \"/m\", passes: [TieLayers(loops: 3, init: Stepwise), DepthLora(rank: Full, init: Svd)])\n"
        );
    }
}

#[cfg(test)]
mod report_tests {
    use super::*;

    fn uptraining_config() -> exitgraph_train::TrainConfig {
        exitgraph_train::TrainConfig {
            steps: 1,
            grad_accum: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 0,
            adamw: None,
            clip_norm: None,
            eval_every: 0,
            checkpoint_every: 0,
        }
    }
    use crate::eval::quality::TaskAccuracy;

    fn row(
        model: &str,
        rank: &str,
        stage: Stage,
        params: usize,
        loss: f64,
        correct: usize,
    ) -> GridRow {
        GridRow {
            model: model.into(),
            loops: (stage != Stage::Original).then_some(2),
            init: (stage != Stage::Original).then_some(TieInit::Average),
            rank: rank.into(),
            stage,
            layer_params: params,
            quality: Quality {
                loss,
                positions: 10,
                tasks: vec![TaskAccuracy {
                    task: Task::Copy,
                    answers: 8,
                    correct,
                }],
            },
            train_seconds: 1.25,
        }
    }

    #[test]
    fn the_table_csv_and_plot_series_carry_each_row() {
        let report = GridReport {
            model: "m".into(),
            steps: 2,
            batch_size: 3,
            seq_len: 4,
            lr: 1e-3,
            tokens_per_run: 24,
            eval_examples: 5,
            eval_seed: 6,
            rows: vec![
                row("6 layers", "", Stage::Original, 600, 1.5, 8),
                row("3x2 Average", "4", Stage::Before, 300, 3.0, 2),
                row("3x2 Average", "4", Stage::After, 300, 2.0, 6),
                row("3x2 Average", "full", Stage::After, 900, 1.75, 7),
            ],
        };
        let md = report.to_markdown();
        // Accuracy with its binomial standard error: 2 of 8 → 25.0 ± √(.25·.75/8) = 15.3.
        for row in [
            "| 6 layers |  | original | 600 | 1.500 | 100.0 ±0.0 |",
            "| 3x2 Average | 4 | tied, not trained | 300 | 3.000 | 25.0 ±15.3 |",
            "| 3x2 Average | full | uptrained | 900 | 1.750 | 87.5 ±11.7 |",
        ] {
            assert!(md.contains(row), "{row} not in\n{md}");
        }
        // 60 steps × 2 micro-batches × 8 rows × 128 tokens.
        let mut t = uptraining_config();
        t.steps = 60;
        t.grad_accum = 2;
        assert_eq!(tokens_per_run(&t, 8, 128), 122_880);
        let csv = report.to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "model,loops,init,rank,stage,layer_params,loss,train_seconds,copy"
        );
        assert_eq!(lines[1], "6 layers,,,,Original,600,1.50000,1.2,1.0000");
        assert_eq!(
            lines[3],
            "3x2 Average,2,Average,4,After,300,2.00000,1.2,0.7500"
        );
        assert_eq!(lines.len(), 5);
        // Untrained rows stay out of the plot; the uptrained ranks form one series, the
        // original a line across them.
        let series = report.plot_series();
        let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["6 layers (original)", "3x2 Average uptrained"]);
        assert_eq!(series[0].points, vec![(0.0003, 1.5), (0.0009, 1.5)]);
        assert_eq!(series[1].points, vec![(0.0003, 2.0), (0.0009, 1.75)]);
    }
}
