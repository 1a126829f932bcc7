#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Relaxed Recursive Transformers' passes on random Llama, Qwen2, Mistral and GPT-2
//! checkpoints (proptest):
//! - `TieLayers(loops: 1)` leaves the outputs unchanged;
//! - `TieLayers(norms: PerIteration)` + `DepthLora(rank: Full, init: Svd)` reproduces the
//!   original model's logits and hidden states (the adapters hold each layer's whole residual
//!   from the shared weights), whatever the init;
//! - `DepthLora(init: Zero)` equals the tied model without adapters;
//! - `TieLayers(init: Lower)` with B loops equals an independent reference: a checkpoint
//!   whose layer `i·K + j` holds layer `j`'s tensors;
//! - the looped model's KV-cached decoding equals recomputation, batching never changes a
//!   row, and its weights are lowered once per position (weight bytes shrink).

use candle_core::{DType, Device, Tensor};
use exitgraph::lower::{Inputs, Program};
use exitgraph::synth::{write_random_gpt2, write_random_llama, BlockSpec, LlamaSpec};
use exitgraph_ir::Graph;
use exitgraph_passes::{
    DepthLora, LoraInit, LoraRank, LoraTarget, PassManager, TieInit, TieLayers, TieNorms,
};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::Path;

fn all_targets() -> Vec<LoraTarget> {
    use LoraTarget::*;
    vec![q, k, v, o, gate, up, down]
}

/// A random checkpoint of `family` with `layers` layers in `dir`.
fn checkpoint(dir: &Path, family: &str, layers: usize, seed: u64) -> Graph {
    if family == "gpt2" {
        let mut s = BlockSpec::tiny();
        s.layers = layers;
        write_random_gpt2(dir, &s, seed).unwrap();
    } else {
        let mut s = LlamaSpec::tiny();
        s.model_type = family.into();
        s.layers = layers;
        write_random_llama(dir, &s, seed).unwrap();
    }
    exitgraph_ir::import(dir).unwrap().graph
}

fn tie(g: &Graph, loops: usize, init: TieInit, norms: TieNorms, lora: Option<DepthLora>) -> Graph {
    let mut h = g.clone();
    let mut passes: Vec<Box<dyn exitgraph_passes::Pass>> = vec![Box::new(TieLayers {
        loops,
        init,
        norms,
        weights: None,
    })];
    if let Some(l) = lora {
        passes.push(Box::new(l));
    }
    PassManager::new(passes)
        .run(&mut h)
        .expect("the passes verify");
    h
}

fn lower(g: &Graph, dir: &Path) -> Program {
    Program::lower(g, dir, &Device::Cpu, DType::F32).unwrap()
}

fn tokens(n: usize, seed: u64) -> Vec<u32> {
    (0..n)
        .map(|i| ((seed as usize + i * 31) % 97) as u32)
        .collect()
}

fn outputs(p: &Program, rows: &[Vec<u32>], want: &[&str]) -> Vec<Tensor> {
    let inputs = Inputs {
        input_ids: Tensor::from_vec(rows.concat(), (rows.len(), rows[0].len()), &Device::Cpu)
            .unwrap(),
        attention_mask: None,
        token_type_ids: None,
        example_ids: None,
    };
    let mut out = p.forward(&inputs, &mut p.new_cache(), want, false).unwrap();
    want.iter().map(|w| out.remove(*w).unwrap()).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// (family, layers, loops) with loops dividing layers.
fn shapes() -> impl Strategy<Value = (&'static str, usize, usize)> {
    (
        prop_oneof![Just("llama"), Just("qwen2"), Just("mistral"), Just("gpt2")],
        prop_oneof![
            Just((2usize, 2usize)),
            Just((4, 2)),
            Just((4, 4)),
            Just((6, 3)),
            Just((6, 2)),
            Just((3, 3))
        ],
    )
        .prop_map(|(f, (l, b))| (f, l, b))
}

fn inits() -> impl Strategy<Value = TieInit> {
    prop_oneof![
        Just(TieInit::Stepwise),
        Just(TieInit::Average),
        Just(TieInit::Lower)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]

    #[test]
    fn one_loop_changes_nothing(family in prop_oneof![Just("llama"), Just("gpt2")], layers in 1usize..4, seed in any::<u64>(), init in inits()) {
        let dir = tempfile::tempdir().unwrap();
        let g = checkpoint(dir.path(), family, layers, seed);
        let h = tie(&g, 1, init, TieNorms::Shared, None);
        let rows = vec![tokens(6, seed)];
        let a = outputs(&lower(&g, dir.path()), &rows, &["logits"]).remove(0);
        let b = outputs(&lower(&h, dir.path()), &rows, &["logits"]).remove(0);
        prop_assert_eq!(max_diff(&a, &b), 0.0);
    }

    #[test]
    fn full_rank_svd_adapters_reproduce_the_original((family, layers, loops) in shapes(), seed in any::<u64>(), init in inits()) {
        let dir = tempfile::tempdir().unwrap();
        let g = checkpoint(dir.path(), family, layers, seed);
        let lora = DepthLora { rank: LoraRank::Full, targets: all_targets(), init: LoraInit::Svd, weights: None };
        let h = tie(&g, loops, init, TieNorms::PerIteration, Some(lora));
        let rows = vec![tokens(7, seed)];
        let mut want: Vec<String> = (0..=layers).map(|i| format!("hidden_states.{i}")).collect();
        want.push("logits".into());
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        let a = outputs(&lower(&g, dir.path()), &rows, &want);
        let b = outputs(&lower(&h, dir.path()), &rows, &want);
        for ((x, y), name) in a.iter().zip(&b).zip(&want) {
            prop_assert!(max_diff(x, y) < 1e-4, "{} differs by {}", name, max_diff(x, y));
        }
        // Without the adapters (tied only), layers that took another layer's weights differ.
        if loops > 1 && init != TieInit::Average {
            let tied = tie(&g, loops, init, TieNorms::PerIteration, None);
            let c = outputs(&lower(&tied, dir.path()), &rows, &["logits"]).remove(0);
            prop_assert!(max_diff(&a[layers + 1], &c) > 1e-3, "tying changed nothing");
        }
    }

    #[test]
    fn zero_adapters_equal_the_tied_model((family, layers, loops) in shapes(), seed in any::<u64>(), init in inits(), rank in 1usize..4) {
        let dir = tempfile::tempdir().unwrap();
        let g = checkpoint(dir.path(), family, layers, seed);
        let tied = tie(&g, loops, init, TieNorms::Shared, None);
        let lora = DepthLora { rank: LoraRank::Rank(rank), targets: all_targets(), init: LoraInit::Zero, weights: None };
        let relaxed = tie(&g, loops, init, TieNorms::Shared, Some(lora));
        let rows = vec![tokens(5, seed)];
        let a = outputs(&lower(&tied, dir.path()), &rows, &["logits"]).remove(0);
        let p = lower(&relaxed, dir.path());
        let b = outputs(&p, &rows, &["logits"]).remove(0);
        prop_assert!(max_diff(&a, &b) < 1e-5);
        // The adapters exist (their A is not zero), shared weights are lowered once.
        prop_assert!(p.weight_bytes() > lower(&tied, dir.path()).weight_bytes());
    }

    #[test]
    fn lower_init_equals_a_checkpoint_of_repeated_layers((family, layers, loops) in shapes(), seed in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        let g = checkpoint(dir.path(), family, layers, seed);
        let h = tie(&g, loops, TieInit::Lower, TieNorms::Shared, None);
        // The reference: layer i·K + j's tensors replaced by layer j's, as a checkpoint.
        let k = layers / loops;
        let reference = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("config.json"), reference.path().join("config.json")).unwrap();
        let tensors = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
        let prefix = if family == "gpt2" { "transformer.h." } else { "model.layers." };
        let mut out: HashMap<String, Tensor> = HashMap::new();
        for (name, t) in &tensors {
            let replaced = name.strip_prefix(prefix).and_then(|rest| {
                let (layer, tail) = rest.split_once('.')?;
                let j = layer.parse::<usize>().ok()? % k;
                tensors.get(&format!("{prefix}{j}.{tail}")).cloned()
            });
            out.insert(name.clone(), replaced.unwrap_or_else(|| t.clone()));
        }
        candle_core::safetensors::save(&out, reference.path().join("model.safetensors")).unwrap();
        let r = exitgraph_ir::import(reference.path()).unwrap().graph;
        let rows = vec![tokens(6, seed)];
        let a = outputs(&lower(&r, reference.path()), &rows, &["logits"]).remove(0);
        let tied = lower(&h, dir.path());
        let b = outputs(&tied, &rows, &["logits"]).remove(0);
        prop_assert!(max_diff(&a, &b) < 1e-5, "differs by {}", max_diff(&a, &b));
        // The tied program holds one copy of each position's weights.
        if loops > 1 {
            prop_assert!(tied.weight_bytes() < lower(&g, dir.path()).weight_bytes());
        }
    }

    #[test]
    fn looped_kv_decoding_and_batching_equal_recomputation((family, layers, loops) in shapes(), seed in any::<u64>(), init in inits(), split in 1usize..6) {
        let dir = tempfile::tempdir().unwrap();
        let g = checkpoint(dir.path(), family, layers, seed);
        let lora = DepthLora { rank: LoraRank::Rank(2), targets: all_targets(), init: LoraInit::Svd, weights: None };
        let h = tie(&g, loops, init, TieNorms::Shared, Some(lora));
        let p = lower(&h, dir.path());
        let seq = tokens(7, seed);
        let full = outputs(&p, std::slice::from_ref(&seq), &["logits"]).remove(0);
        let mut cache = p.new_cache();
        let step = |ids: &[u32], cache: &mut exitgraph::lower::KvCache| {
            let inputs = Inputs {
                input_ids: Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap(),
                attention_mask: None,
                token_type_ids: None,
                example_ids: None,
            };
            p.forward(&inputs, cache, &["logits"], false).unwrap().remove("logits").unwrap()
        };
        let mut parts = vec![step(&seq[..split], &mut cache)];
        for &t in &seq[split..] {
            parts.push(step(&[t], &mut cache));
        }
        let inc = Tensor::cat(&parts, 1).unwrap();
        prop_assert!(max_diff(&full, &inc) < 1e-4, "decoding differs by {}", max_diff(&full, &inc));
        let other = tokens(7, seed ^ 99);
        let both = outputs(&p, &[seq.clone(), other], &["logits"]).remove(0);
        prop_assert!(max_diff(&both.narrow(0, 0, 1).unwrap(), &full) < 1e-5);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// The trained-weight files' naming round-trips on every family (biases of Qwen2 and
    /// GPT-2, both norm modes): the tensors `tied_tensors` / `lora_tensors` name, written to
    /// files and read back by the passes' `weights:`, compute exactly what the recipes do.
    #[test]
    fn weights_files_reproduce_their_recipes((family, layers, loops) in shapes(), seed in any::<u64>(), init in inits(), per_iteration in any::<bool>()) {
        use exitgraph::lower::{WeightSource, WeightStore};
        use exitgraph_passes::recursive::{lora_tensors, tied_tensors};
        let dir = tempfile::tempdir().unwrap();
        let g = checkpoint(dir.path(), family, layers, seed);
        let norms = if per_iteration { TieNorms::PerIteration } else { TieNorms::Shared };
        let lora = DepthLora { rank: LoraRank::Rank(2), targets: all_targets(), init: LoraInit::Svd, weights: None };
        let h = tie(&g, loops, init, norms, Some(lora.clone()));
        let mut store = WeightStore::open(&h.weights, dir.path(), &Device::Cpu, DType::F32).unwrap();
        let mut save = |named: Vec<(String, exitgraph_ir::WeightRef)>, file: &str| {
            let values: HashMap<String, Tensor> = named
                .into_iter()
                .map(|(n, w)| (n, store.get(&w).unwrap().copy().unwrap()))
                .collect();
            let path = dir.path().join(file);
            candle_core::safetensors::save(&values, &path).unwrap();
            (values.len(), path.display().to_string())
        };
        let (n_tied, tied_file) = save(tied_tensors(&h, norms), "tied.safetensors");
        let (n_lora, lora_file) = save(lora_tensors(&h), "lora.safetensors");
        prop_assert!(n_tied > 0 && n_lora > 0);
        let mut from_files = g.clone();
        PassManager::new(vec![
            Box::new(TieLayers { loops, init, norms, weights: Some(tied_file) }),
            Box::new(DepthLora { weights: Some(lora_file), ..lora }),
        ])
        .run(&mut from_files)
        .unwrap();
        let rows = vec![tokens(7, seed)];
        let a = outputs(&lower(&h, dir.path()), &rows, &["logits"]).remove(0);
        let b = outputs(&lower(&from_files, dir.path()), &rows, &["logits"]).remove(0);
        prop_assert!(max_diff(&a, &b) < 1e-6, "{}", max_diff(&a, &b));
    }
}

#[test]
fn tying_is_recorded_and_bad_loops_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let g = checkpoint(dir.path(), "llama", 6, 3);
    let h = tie(&g, 2, TieInit::Stepwise, TieNorms::Shared, None);
    let ids: Vec<(usize, usize)> = h.blocks.iter().map(|b| (b.weights, b.iteration)).collect();
    assert_eq!(ids, vec![(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]);
    let slots: std::collections::BTreeSet<_> = h.blocks.iter().map(|b| b.kv_slot).collect();
    assert_eq!(slots.len(), 6, "each depth keeps its own KV slot");
    // Stepwise takes layers round(linspace(0, 5, 3)) = 0, 2 (2.5 rounds to even), 5.
    let q_of = |g: &Graph, depth: usize| -> String {
        g.graph
            .node_indices()
            .find_map(|n| match (&g.graph[n].op, g.graph[n].layer) {
                (exitgraph_ir::Op::Attention(a), Some(d)) if d == depth => {
                    Some(a.q.weight.to_string())
                }
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(q_of(&h, 1), "model.layers.2.self_attn.q_proj.weight");
    assert_eq!(q_of(&h, 4), "model.layers.2.self_attn.q_proj.weight");
    assert_eq!(q_of(&h, 5), "model.layers.5.self_attn.q_proj.weight");
    let mut bad = g.clone();
    let err = PassManager::new(vec![Box::new(TieLayers {
        loops: 4,
        init: TieInit::Lower,
        norms: TieNorms::Shared,
        weights: None,
    })])
    .run(&mut bad)
    .unwrap_err()
    .to_string();
    assert!(err.contains("loops") && err.contains("6 layers"), "{err}");
    let mut untied = g.clone();
    let err = PassManager::new(vec![Box::new(DepthLora {
        rank: LoraRank::Rank(2),
        targets: all_targets(),
        init: LoraInit::Svd,
        weights: None,
    })])
    .run(&mut untied)
    .unwrap_err()
    .to_string();
    assert!(err.contains("TieLayers"), "{err}");
    let mut wide = g.clone();
    let err = PassManager::new(vec![
        Box::new(TieLayers {
            loops: 2,
            init: TieInit::Lower,
            norms: TieNorms::Shared,
            weights: None,
        }),
        Box::new(DepthLora {
            rank: LoraRank::Rank(999),
            targets: all_targets(),
            init: LoraInit::Svd,
            weights: None,
        }),
    ])
    .run(&mut wide)
    .unwrap_err()
    .to_string();
    assert!(err.contains("rank") && err.contains("999"), "{err}");
}

/// A pipeline file over the demo model with `passes`.
fn demo_pipeline(dir: &Path, passes: &str) -> std::path::PathBuf {
    let path = dir.join("p.ron");
    let demo = exitgraph::pipeline::demo_model_dir();
    std::fs::write(
        &path,
        format!(
            "Pipeline(model: {:?}, passes: [{passes}])",
            demo.display().to_string()
        ),
    )
    .unwrap();
    path
}

fn uptraining(
    steps: usize,
    distill: f64,
    train_shared: bool,
) -> exitgraph::train::recursive::RecursiveTrainSpec {
    exitgraph::train::recursive::RecursiveTrainSpec {
        tasks: Vec::new(),
        examples: 200,
        seed: 5,
        seq_len: 32,
        batch_size: 4,
        distill,
        train_shared,
        training: exitgraph::train::TrainConfig {
            steps,
            grad_accum: 1,
            lr: 3e-3,
            min_lr: 3e-3,
            warmup_steps: 0,
            adamw: None,
            clip_norm: Some(1.0),
            eval_every: steps.max(1),
            checkpoint_every: 0,
        },
    }
}

/// Logits of a pipeline file's compiled program on `rows`.
fn pipeline_logits(path: &Path, rows: &[Vec<u32>]) -> Tensor {
    use exitgraph::pipeline::{compile, Pipeline};
    let p = Pipeline::read(path).unwrap();
    let program = compile(&p, path).unwrap().lower().unwrap();
    outputs(&program, rows, &["logits"]).remove(0)
}

/// `train recursive` on the demo model: the held-out loss falls, the adapters are saved
/// under their documented names, and the written pipeline computes what an independent
/// reference computes: a plain checkpoint whose layer `d` holds the mean of the layers tied
/// to its position plus layer `d`'s trained `B·A`, merged by hand.
#[test]
fn uptrained_adapters_equal_a_merged_unrolled_checkpoint() {
    use exitgraph::train::recursive::train_recursive;
    let dir = tempfile::tempdir().unwrap();
    let pipeline = demo_pipeline(
        dir.path(),
        "TieLayers(loops: 2, init: Average), DepthLora(rank: Rank(4), init: Svd)",
    );
    let out = dir.path().join("out");
    let report = train_recursive(&pipeline, &out, &uptraining(12, 0.5, false), false).unwrap();
    assert!(
        report.eval_after < report.eval_before,
        "held-out loss {} -> {}",
        report.eval_before,
        report.eval_after
    );
    assert!(report.shared.is_none());
    let demo = exitgraph::pipeline::demo_model_dir();
    let info = exitgraph_ir::import(&demo).unwrap().graph.info;
    let (layers, hidden) = (info.num_layers, info.hidden);
    let lora =
        candle_core::safetensors::load(report.adapters.as_ref().unwrap(), &Device::Cpu).unwrap();
    // Every depth × 7 projections × 2 factors, nothing else.
    assert_eq!(
        lora.len(),
        layers * 14,
        "{:?}",
        lora.keys().collect::<Vec<_>>()
    );
    assert_eq!(lora["lora.layers.4.attn.q.a"].dims(), &[4, hidden]);
    assert_eq!(lora["lora.layers.4.mlp.down.b"].dims(), &[hidden, 4]);

    // The reference: merge W_shared + B·A per layer into an ordinary checkpoint.
    let original =
        candle_core::safetensors::load(demo.join("model.safetensors"), &Device::Cpu).unwrap();
    let reference_dir = dir.path().join("merged");
    std::fs::create_dir_all(&reference_dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(demo.join(f), reference_dir.join(f)).unwrap();
    }
    let k = layers / 2;
    let projections = [
        ("self_attn.q_proj", "attn.q"),
        ("self_attn.k_proj", "attn.k"),
        ("self_attn.v_proj", "attn.v"),
        ("self_attn.o_proj", "attn.o"),
        ("mlp.gate_proj", "mlp.gate"),
        ("mlp.up_proj", "mlp.up"),
        ("mlp.down_proj", "mlp.down"),
    ];
    let mut merged: HashMap<String, Tensor> = original.clone();
    for d in 0..layers {
        let j = d % k;
        let mean = |suffix: &str| {
            let a = &original[&format!("model.layers.{j}.{suffix}")];
            let b = &original[&format!("model.layers.{}.{suffix}", j + k)];
            ((a + b).unwrap() / 2.0).unwrap()
        };
        for norm in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
            merged.insert(format!("model.layers.{d}.{norm}"), mean(norm));
        }
        for (hf, ours) in projections {
            let a = &lora[&format!("lora.layers.{d}.{ours}.a")];
            let b = &lora[&format!("lora.layers.{d}.{ours}.b")];
            let w = (mean(&format!("{hf}.weight")) + b.matmul(a).unwrap()).unwrap();
            merged.insert(format!("model.layers.{d}.{hf}.weight"), w);
        }
    }
    candle_core::safetensors::save(&merged, reference_dir.join("model.safetensors")).unwrap();
    let reference = exitgraph_ir::import(&reference_dir).unwrap().graph;
    let reference = lower(&reference, &reference_dir);
    let rows = vec![tokens(12, 1), tokens(12, 2)];
    let want = outputs(&reference, &rows, &["logits"]).remove(0);
    let got = pipeline_logits(&report.pipeline, &rows);
    let d = max_diff(&want, &got);
    assert!(d < 1e-3, "trained pipeline vs merged reference: {d}");
    // And training changed something: the untrained recipes give other logits.
    let before = pipeline_logits(&pipeline, &rows);
    assert!(max_diff(&before, &got) > 1e-3);
}

fn exit_training(
    train_adapters: bool,
    train_shared: bool,
) -> exitgraph::exits::train::ExitTrainSpec {
    let mut u = uptraining(16, 0.0, false);
    u.training.eval_every = 8;
    exitgraph::exits::train::ExitTrainSpec {
        tasks: u.tasks,
        examples: u.examples,
        seed: u.seed,
        seq_len: u.seq_len,
        batch_size: u.batch_size,
        distill: 0.5,
        train_adapters,
        train_shared,
        objective: Default::default(),
        training: u.training,
    }
}

/// `train exits` on a looped pipeline (the demo model tied into a block looped twice, with
/// adapters and an exit after the first iteration): frozen, only the head trains and the
/// saved pipeline still finds the adapters; with `train_adapters`, the adapters are saved
/// too, differ from their SVD start, and the saved pipeline (fingerprints checked) computes
/// other logits than the untrained one. Flags that name a pass the pipeline lacks are errors.
#[test]
fn exits_train_on_a_looped_pipeline_frozen_or_with_adapters() {
    use exitgraph::exits::train::train_exits;
    use exitgraph::pipeline::{compile, Pipeline};
    let dir = tempfile::tempdir().unwrap();
    let demo = exitgraph::pipeline::demo_model_dir();
    let layers = exitgraph_ir::import(&demo).unwrap().graph.info.num_layers;
    let half = layers / 2;
    // The adapters as a file, so the frozen run's saved pipeline must resolve its path.
    let base = demo_pipeline(
        dir.path(),
        "TieLayers(loops: 2, init: Average), DepthLora(rank: Rank(2), init: Svd)",
    );
    let staged = train_recursive_for(&base, &dir.path().join("rrt"), 0);
    let lora_file = staged.adapters.clone().unwrap();
    let backbone = format!(
        "TieLayers(loops: 2, init: Average), DepthLora(rank: Rank(2), init: Svd, weights: Some({:?}))",
        lora_file.display().to_string()
    );
    let write = |name: &str, passes: String| {
        let path = dir.path().join(name);
        let text = format!(
            "Pipeline(model: {:?}, passes: [{passes}])",
            demo.display().to_string()
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let looped = write(
        "looped.ron",
        format!("{backbone}, InsertExits(after: [{half}], head: Linear)"),
    );
    let no_exits = write("no-exits.ron", backbone.clone());

    let frozen = train_exits(
        &looped,
        &dir.path().join("frozen"),
        &exit_training(false, false),
        false,
    )
    .unwrap();
    assert_eq!(frozen.exits, vec![half]);
    assert!(frozen.adapters.is_none() && frozen.shared.is_none());
    let heads = candle_core::safetensors::load(&frozen.heads, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = heads.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            format!("exits.{half}.head.weight"),
            format!("exits.{half}.norm.weight")
        ]
        .iter()
        .collect::<Vec<_>>()
    );
    let evals: Vec<f64> = frozen.log.eval_loss.iter().map(|e| e.1).collect();
    assert!(
        evals.len() >= 2 && evals.last() < evals.first(),
        "{evals:?}"
    );
    assert!(!dir.path().join("frozen/lora.safetensors").exists());
    assert!(!dir.path().join("frozen/.staging").exists());
    let rows = vec![tokens(12, 1), tokens(12, 2)];
    // Frozen: the saved pipeline's backbone is the input's, so the final logits are equal.
    let want = pipeline_logits(&no_exits, &rows);
    let got = pipeline_logits(&frozen.pipeline, &rows);
    assert!(max_diff(&want, &got) < 1e-5);

    let joint = train_exits(
        &looped,
        &dir.path().join("joint"),
        &exit_training(true, false),
        false,
    )
    .unwrap();
    let (before, after) = joint.final_loss.unwrap();
    assert!(before.is_finite() && after.is_finite() && before != after);
    assert!(frozen.final_loss.is_none());
    let adapters = joint.adapters.clone().unwrap();
    let trained = candle_core::safetensors::load(&adapters, &Device::Cpu).unwrap();
    let start = candle_core::safetensors::load(&lora_file, &Device::Cpu).unwrap();
    assert_eq!(
        trained.keys().collect::<std::collections::BTreeSet<_>>(),
        start.keys().collect::<std::collections::BTreeSet<_>>()
    );
    let moved = trained
        .iter()
        .map(|(n, t)| max_diff(t, &start[n]))
        .fold(0f32, f32::max);
    assert!(moved > 1e-4, "the adapters did not train: {moved}");
    let p = Pipeline::read(&joint.pipeline).unwrap();
    compile(&p, &joint.pipeline).unwrap();
    let got = pipeline_logits(&joint.pipeline, &rows);
    assert!(max_diff(&want, &got) > 1e-4);

    // Flags that need a pass the pipeline lacks, and shared training under frozen adapters.
    let flat = write("flat.ron", "InsertExits(after: [1], head: Linear)".into());
    for (i, (pipeline, adapters, shared, words)) in [
        (&flat, true, false, ["--train-adapters", "DepthLora"]),
        (&flat, false, true, ["--train-shared", "TieLayers"]),
        (&looped, false, true, ["--train-adapters", "fitted"]),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("e{i}"));
        let err = train_exits(pipeline, &out, &exit_training(adapters, shared), false)
            .unwrap_err()
            .to_string();
        assert!(words.iter().all(|w| err.contains(w)), "{err}");
    }
}

/// `train recursive` for `steps` steps (adapters only), for tests that need trained files.
fn train_recursive_for(
    pipeline: &Path,
    out: &Path,
    steps: usize,
) -> exitgraph::train::recursive::RecursiveTrainReport {
    exitgraph::train::recursive::train_recursive(
        pipeline,
        out,
        &uptraining(steps, 0.0, false),
        false,
    )
    .unwrap()
}

/// With no steps, the written pipeline (adapters and shared block as files) computes exactly
/// what the recipes compute; `--train-shared` saves one tensor per position, not per depth,
/// and the block stays tied after training (one copy of its weights in the program).
#[test]
fn materialised_weights_equal_their_recipes_and_shared_training_keeps_the_tie() {
    use exitgraph::train::recursive::train_recursive;
    let dir = tempfile::tempdir().unwrap();
    let pipeline = demo_pipeline(
        dir.path(),
        "TieLayers(loops: 2, init: Stepwise, norms: PerIteration), DepthLora(rank: Rank(2), targets: [q, v, down], init: Zero)",
    );
    let rows = vec![tokens(10, 3)];
    let out = dir.path().join("zero");
    let report = train_recursive(&pipeline, &out, &uptraining(0, 0.0, true), false).unwrap();
    assert_eq!(report.log.train_loss.len(), 0);
    let want = pipeline_logits(&pipeline, &rows);
    let got = pipeline_logits(&report.pipeline, &rows);
    assert_eq!(max_diff(&want, &got), 0.0);
    let tied =
        candle_core::safetensors::load(report.shared.as_ref().unwrap(), &Device::Cpu).unwrap();
    let demo = exitgraph::pipeline::demo_model_dir();
    let layers = exitgraph_ir::import(&demo).unwrap().graph.info.num_layers;
    let k = layers / 2;
    // k positions × 7 projections, plus every depth's 2 norms of its own.
    assert_eq!(
        tied.len(),
        k * 7 + layers * 2,
        "{:?}",
        tied.keys().collect::<Vec<_>>()
    );
    let last = layers - 1;
    assert!(tied.contains_key(&format!("tied.layers.{}.attn.q.weight", k - 1)));
    assert!(tied.contains_key(&format!("tied.layers.{last}.attn_norm.weight")));
    assert!(!tied.contains_key(&format!("tied.layers.{last}.attn.q.weight")));
    // Stepwise: position 1 starts as layer round((L - 1) / (k - 1)) = 2 for 6 or 8 layers.
    let original =
        candle_core::safetensors::load(demo.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(
            &tied["tied.layers.1.mlp.up.weight"],
            &original["model.layers.2.mlp.up_proj.weight"]
        ),
        0.0
    );

    let out = dir.path().join("trained");
    let mut spec = uptraining(6, 0.0, true);
    // Whole-block updates on a trained model need a gentler step than adapters alone.
    spec.training.lr = 3e-4;
    spec.training.min_lr = 3e-4;
    let report = train_recursive(&pipeline, &out, &spec, false).unwrap();
    assert!(
        report.eval_after < report.eval_before,
        "held-out loss {} -> {}",
        report.eval_before,
        report.eval_after
    );
    let trained =
        candle_core::safetensors::load(report.shared.as_ref().unwrap(), &Device::Cpu).unwrap();
    assert!(
        max_diff(
            &trained["tied.layers.1.mlp.up.weight"],
            &tied["tied.layers.1.mlp.up.weight"]
        ) > 0.0
    );
    let p = exitgraph::pipeline::Pipeline::read(&report.pipeline).unwrap();
    let compiled = exitgraph::pipeline::compile(&p, &report.pipeline).unwrap();
    let untied = compiled.original.clone();
    let (looped, plain) = (
        compiled.lower().unwrap(),
        Program::lower(&untied, &compiled.model_dir, &Device::Cpu, DType::F32).unwrap(),
    );
    assert!(
        (looped.weight_bytes() as f64) < 0.7 * plain.weight_bytes() as f64,
        "{} vs {}",
        looped.weight_bytes(),
        plain.weight_bytes()
    );
}

/// Trained-weight files that do not fit the pipeline are refused, naming the pass, the field
/// and the tensor; `train recursive` needs a TieLayers pass.
#[test]
fn mismatched_trained_weights_are_refused() {
    use exitgraph::train::recursive::train_recursive;
    let dir = tempfile::tempdir().unwrap();
    let info = exitgraph_ir::import(&exitgraph::pipeline::demo_model_dir())
        .unwrap()
        .graph
        .info;
    let pipeline = demo_pipeline(
        dir.path(),
        "TieLayers(loops: 2, init: Lower), DepthLora(rank: Rank(2), targets: [q], init: Svd)",
    );
    let out = dir.path().join("out");
    let report = train_recursive(&pipeline, &out, &uptraining(0, 0.0, false), false).unwrap();
    let lora_file = report.adapters.unwrap();
    let compile_err = |passes: &str| {
        let p = demo_pipeline(dir.path(), passes);
        let pipeline = exitgraph::pipeline::Pipeline::read(&p).unwrap();
        exitgraph::pipeline::compile(&pipeline, &p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let file = lora_file.display().to_string();
    // Another rank: shapes differ.
    let e = compile_err(&format!(
        "TieLayers(loops: 2, init: Lower), DepthLora(rank: Rank(3), targets: [q], weights: {file:?})"
    ));
    assert!(
        e.contains("DepthLora")
            && e.contains("weights")
            && e.contains("lora.layers.0.attn.q.a")
            && e.contains(&format!("[2, {}]", info.hidden)),
        "{e}"
    );
    // More targets than the file has.
    let e = compile_err(&format!(
        "TieLayers(loops: 2, init: Lower), DepthLora(rank: Rank(2), targets: [q, k], weights: {file:?})"
    ));
    assert!(e.contains("has no tensor lora.layers.0.attn.k.a"), "{e}");
    // A target the file lacks.
    let e = compile_err(&format!(
        "TieLayers(loops: 2, init: Lower), DepthLora(rank: Rank(2), targets: [v], weights: {file:?})"
    ));
    assert!(e.contains("has no tensor lora.layers.0.attn.v.a"), "{e}");
    // Fewer targets than the file has: its other tensors would be silently ignored.
    let wider = demo_pipeline(
        dir.path(),
        "TieLayers(loops: 2, init: Lower), DepthLora(rank: Rank(2), targets: [q, k], init: Svd)",
    );
    let both = train_recursive(
        &wider,
        &dir.path().join("both"),
        &uptraining(0, 0.0, false),
        false,
    )
    .unwrap()
    .adapters
    .unwrap()
    .display()
    .to_string();
    let e = compile_err(&format!(
        "TieLayers(loops: 2, init: Lower), DepthLora(rank: Rank(2), targets: [q], weights: {both:?})"
    ));
    assert!(
        e.contains("lora.layers.0.attn.k.a")
            && e.contains(&format!(
                "{} of {} tensors unused",
                info.num_layers * 2,
                info.num_layers * 4
            )),
        "{e}"
    );
    // A file without any tensors of the pass.
    let e = compile_err(&format!("TieLayers(loops: 2, weights: {file:?})"));
    assert!(
        e.contains("TieLayers") && e.contains("has no tensor tied.layers.0.attn_norm.weight"),
        "{e}"
    );
    let e = compile_err("TieLayers(loops: 2, weights: \"missing.safetensors\")");
    assert!(
        e.contains("weights") && e.contains("missing.safetensors"),
        "{e}"
    );

    // Adapters trained against another tied block (another init here; names and shapes
    // fit) are refused by their fingerprint.
    let e = compile_err(&format!(
        "TieLayers(loops: 2, init: Stepwise), DepthLora(rank: Rank(2), targets: [q], weights: {file:?})"
    ));
    assert!(
        e.contains("another tied block") && e.contains("retrain"),
        "{e}"
    );
    // A hand-made file (no fingerprint) is taken as it is, and the report says so.
    let tensors = candle_core::safetensors::load(&lora_file, &Device::Cpu).unwrap();
    let hand = dir.path().join("hand.safetensors");
    candle_core::safetensors::save(&tensors, &hand).unwrap();
    let p = demo_pipeline(
        dir.path(),
        &format!("TieLayers(loops: 2, init: Stepwise), DepthLora(rank: Rank(2), targets: [q], weights: {:?})", hand.display().to_string()),
    );
    let pipeline = exitgraph::pipeline::Pipeline::read(&p).unwrap();
    let compiled = exitgraph::pipeline::compile(&pipeline, &p).unwrap();
    assert!(
        compiled
            .outcomes
            .iter()
            .any(|o| o.report.summary.contains("not checked")),
        "{:?}",
        compiled
            .outcomes
            .iter()
            .map(|o| &o.report.summary)
            .collect::<Vec<_>>()
    );

    let p = demo_pipeline(dir.path(), "DepthLora(rank: Rank(2))");
    let e = train_recursive(&p, &out, &uptraining(0, 0.0, false), false).unwrap_err();
    assert!(format!("{e:#}").contains("TieLayers"), "{e:#}");
    let p = demo_pipeline(dir.path(), "TieLayers(loops: 2)");
    let e = train_recursive(&p, &out, &uptraining(0, 0.0, false), false).unwrap_err();
    assert!(format!("{e:#}").contains("--train-shared"), "{e:#}");
}

/// The uptraining loss is `CE + W · KL(original ‖ recursive)`: with a zero learning rate the
/// first step's loss equals that sum computed here by hand from the original checkpoint's and
/// the recursive pipeline's logits on the same batch; without distillation it is the CE alone.
#[test]
fn the_uptraining_loss_is_cross_entropy_plus_distillation_from_the_untied_model() {
    use exitgraph::train::data::Batcher;
    use exitgraph::train::recursive::train_recursive;
    let dir = tempfile::tempdir().unwrap();
    let pipeline = demo_pipeline(
        dir.path(),
        "TieLayers(loops: 2, init: Lower), DepthLora(rank: Rank(2), init: Svd)",
    );
    let first_loss = |distill: f64, name: &str| {
        let mut spec = uptraining(1, distill, false);
        spec.training.lr = 0.0;
        spec.training.min_lr = 0.0;
        let r = train_recursive(&pipeline, &dir.path().join(name), &spec, false).unwrap();
        r.log.train_loss[0].1
    };
    let (with, without) = (first_loss(2.0, "kd"), first_loss(0.0, "ce"));
    // The same first batch, by hand.
    let demo = exitgraph::pipeline::demo_model_dir();
    let tokenizer = tokenizers::Tokenizer::from_file(demo.join("tokenizer.json")).unwrap();
    let spec = uptraining(1, 0.0, false);
    let examples = exitgraph::corpus::generate(&exitgraph::corpus::CorpusSpec::new(
        spec.seed,
        spec.examples,
        Vec::new(),
    ));
    let rows = exitgraph::corpus::pack(&tokenizer, &examples, spec.seq_len).unwrap();
    let (x, y) = Batcher::new(rows, spec.batch_size, spec.seed)
        .batch(0, &Device::Cpu)
        .unwrap();
    let logits_of = |p: &Program| {
        let inputs = Inputs {
            input_ids: x.clone(),
            attention_mask: None,
            token_type_ids: None,
            example_ids: None,
        };
        p.forward(&inputs, &mut p.new_cache(), &["logits"], false)
            .unwrap()
            .remove("logits")
            .unwrap()
    };
    let original = lower(&exitgraph_ir::import(&demo).unwrap().graph, &demo);
    let p = exitgraph::pipeline::Pipeline::read(&pipeline).unwrap();
    let student = exitgraph::pipeline::compile(&p, &pipeline)
        .unwrap()
        .lower()
        .unwrap();
    let (t, s) = (logits_of(&original), logits_of(&student));
    let v = s.dim(2).unwrap();
    let lp = |l: &Tensor| candle_nn::ops::log_softmax(&l.reshape(((), v)).unwrap(), 1).unwrap();
    let (ls, lt) = (lp(&s), lp(&t));
    let targets: Vec<u32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let ls_rows: Vec<Vec<f32>> = ls.to_vec2().unwrap();
    let lt_rows: Vec<Vec<f32>> = lt.to_vec2().unwrap();
    let n = targets.len() as f64;
    let ce: f64 = targets
        .iter()
        .zip(&ls_rows)
        .map(|(&t, r)| -f64::from(r[t as usize]))
        .sum::<f64>()
        / n;
    let kl: f64 = lt_rows
        .iter()
        .zip(&ls_rows)
        .map(|(p, q)| {
            p.iter()
                .zip(q)
                .map(|(&a, &b)| f64::from(a).exp() * f64::from(a - b))
                .sum::<f64>()
        })
        .sum::<f64>()
        / n;
    assert!(
        kl > 1e-3,
        "the tied model differs from the original: KL {kl}"
    );
    assert!(
        (without - ce).abs() < 1e-4,
        "CE: trainer {without}, by hand {ce}"
    );
    assert!(
        (with - (ce + 2.0 * kl)).abs() < 1e-4,
        "CE + 2 KL: trainer {with}, by hand {}",
        ce + 2.0 * kl
    );
}
