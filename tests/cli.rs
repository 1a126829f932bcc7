#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `exitgraph` binary end to end: every example pipeline runs, and `forward` and `encode`
//! write what transformers computed.

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn exitgraph(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_exitgraph"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("exitgraph runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exitgraph {args:?} failed:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
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

#[test]
fn every_example_pipeline_compiles_and_runs() {
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ron"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 4, "one example per family");
    for ex in examples {
        if ex.to_string_lossy().ends_with("-train.ron") {
            // Training configs: parsed here, run by `train_lm_writes_a_checkpoint...`.
            exitgraph::train::lm::LmTrainSpec::read(&ex).unwrap();
            continue;
        }
        let ex = ex.to_string_lossy().to_string();
        if ex.ends_with("-cost.ron") {
            // A profiled cost model (the explorer's simulator uses it).
            exitgraph::runtime::cost::CostModel::read(Path::new(&ex)).unwrap();
            continue;
        }
        if ex.ends_with("-heads.ron") {
            // Heads of their own need training first: the error says how.
            let out = Command::new(env!("CARGO_BIN_EXE_exitgraph"))
                .args(["compile", &ex])
                .current_dir(root())
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("train exits"),
                "{err}"
            );
            continue;
        }
        let compiled = stdout(&exitgraph(&["compile", &ex]));
        assert!(compiled.contains("result:"), "{compiled}");
        let text = std::fs::read_to_string(&ex).unwrap();
        if text.contains("minilm") {
            let out = stdout(&exitgraph(&[
                "encode",
                &ex,
                "--text",
                "The cat sat on the mat.",
            ]));
            if text.contains("EarlyExit") {
                assert!(
                    out.contains("exit after layer") && out.contains("dim 384"),
                    "{out}"
                );
            } else {
                assert!(
                    out.contains("sentence_embedding dim 384 norm 1.0000"),
                    "{out}"
                );
            }
        } else {
            // Other models take token ids; the demo model has a tokenizer: text in, text
            // out, and a prompt like its training text.
            let ids_in = text.lines().any(|l| l.trim_start().starts_with("model:"));
            let prompt = if ids_in { "5 17 42 7" } else { "some birds" };
            let out = stdout(&exitgraph(&[
                "run",
                &ex,
                "--prompt",
                prompt,
                "--max-new-tokens",
                "6",
            ]));
            if ids_in {
                let ids: Vec<u32> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
                assert_eq!(ids.len(), 6, "{ex}: {out}");
            } else {
                assert!(out.starts_with(prompt), "{ex}: {out}");
                assert!(
                    out.trim_end().len() > prompt.len(),
                    "{ex}: no new text after the prompt: {out}"
                );
            }
        }
    }
}

#[test]
fn forward_writes_the_reference_tensors() {
    for case in ["tiny-llama", "tiny-qwen2", "tiny-gpt2"] {
        let dir = tempfile::tempdir().unwrap();
        let model = root().join("tests/fixtures").join(case);
        let reference = model.join("reference.safetensors");
        let out_path = dir.path().join("out.safetensors");
        let r = candle_core::safetensors::load(&reference, &Device::Cpu).unwrap();
        let greedy = &r["greedy"];
        let n_new = greedy.dim(1).unwrap() - r["input_ids"].dim(1).unwrap();
        exitgraph(&[
            "forward",
            model.to_str().unwrap(),
            "--input",
            reference.to_str().unwrap(),
            "--output",
            out_path.to_str().unwrap(),
            "--generate",
            &n_new.to_string(),
        ]);
        let out = candle_core::safetensors::load(&out_path, &Device::Cpu).unwrap();
        for (name, expected) in &r {
            if name == "input_ids" {
                continue;
            }
            let got = out.get(name).unwrap_or_else(|| panic!("{case}: no {name}"));
            if name == "greedy" {
                assert_eq!(got.dtype(), DType::I64);
                assert_eq!(
                    got.to_vec2::<i64>().unwrap(),
                    expected.to_vec2::<i64>().unwrap(),
                    "{case}"
                );
            } else {
                let d = max_abs_diff(got, expected);
                assert!(d <= 1e-4, "{case}: {name} differs by {d}");
            }
        }
    }
}

/// `forward` takes a pipeline: the tiny Llama tied into a looped block and relaxed back by
/// full-rank SVD adapters (norms and biases per iteration) still matches transformers'
/// outputs of the original checkpoint, `hidden_states.{i}` counting layer applications.
#[test]
fn forward_runs_a_looped_pipeline_against_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/tiny-llama");
    let pipeline = dir.path().join("looped.ron");
    std::fs::write(
        &pipeline,
        format!(
            "Pipeline(model: {:?}, passes: [TieLayers(loops: 2, init: Stepwise, norms: PerIteration), DepthLora(rank: Full, init: Svd)])",
            model.to_string_lossy()
        ),
    )
    .unwrap();
    let reference = model.join("reference.safetensors");
    let out_path = dir.path().join("out.safetensors");
    exitgraph(&[
        "forward",
        pipeline.to_str().unwrap(),
        "--input",
        reference.to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ]);
    let r = candle_core::safetensors::load(&reference, &Device::Cpu).unwrap();
    let out = candle_core::safetensors::load(&out_path, &Device::Cpu).unwrap();
    let mut compared = 0;
    for (name, expected) in &r {
        if name.starts_with("hidden_states.") || name == "logits" {
            let d = max_abs_diff(&out[name], expected);
            assert!(d <= 1e-4, "{name} differs by {d}");
            compared += 1;
        }
    }
    assert!(compared >= 3, "compared only {compared} tensors");
    let shown = stdout(&exitgraph(&["inspect", pipeline.to_str().unwrap()]));
    assert!(shown.contains("2 loops"), "{shown}");
}

/// `forward` on a GemFilter pipeline writes the kept positions, the full model's run on the
/// kept tokens and, with `--generate`, the kept ids and the new ones: all as the reference
/// (`scripts/make_gemfilter_fixture.py`, transformers) has them; `run` says what it kept.
#[test]
fn forward_with_gemfilter_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/tiny-llama");
    let pipeline = dir.path().join("gemfilter.ron");
    std::fs::write(
        &pipeline,
        format!(
            "Pipeline(model: {:?}, passes: [GemFilter(filter_layer: 2, keep: 64, pool: 5)])",
            model.to_string_lossy()
        ),
    )
    .unwrap();
    let reference = root().join("tests/fixtures/gemfilter/r2_k64_pool5.safetensors");
    let r = candle_core::safetensors::load(&reference, &Device::Cpu).unwrap();
    let input = dir.path().join("in.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("input_ids".to_string(), r["input_ids"].clone())]),
        &input,
    )
    .unwrap();
    let out_path = dir.path().join("out.safetensors");
    exitgraph(&[
        "forward",
        pipeline.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
        "--generate",
        "6",
    ]);
    let out = candle_core::safetensors::load(&out_path, &Device::Cpu).unwrap();
    let selected = &out["gemfilter.selected"];
    assert_eq!(selected.dtype(), DType::I64);
    assert_eq!(
        selected.to_vec2::<i64>().unwrap(),
        r["selected"].to_vec2::<i64>().unwrap()
    );
    let scale = r["scores_raw"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_abs_diff(&out["gemfilter.scores"], &r["scores_raw"]);
    assert!(d <= 1e-4 * scale.max(1.0), "scores differ by {d}");
    let mut compared = 0;
    for (name, expected) in &r {
        if name.starts_with("hidden_states.") || name == "logits" {
            let d = max_abs_diff(&out[name], expected);
            assert!(d <= 1e-4, "{name} differs by {d}");
            compared += 1;
        }
    }
    assert_eq!(compared, 8, "logits and 7 hidden states");
    assert_eq!(
        out["greedy"].to_vec2::<i64>().unwrap(),
        r["greedy"].to_vec2::<i64>().unwrap()
    );
    // Two rows select independently: each as the reference.
    let two = Tensor::cat(&[&r["input_ids"], &r["input_ids"]], 0).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("input_ids".to_string(), two)]),
        &input,
    )
    .unwrap();
    exitgraph(&[
        "forward",
        pipeline.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ]);
    let out = candle_core::safetensors::load(&out_path, &Device::Cpu).unwrap();
    let want = r["selected"].to_vec2::<i64>().unwrap().remove(0);
    assert_eq!(
        out["gemfilter.selected"].to_vec2::<i64>().unwrap(),
        vec![want.clone(), want]
    );
    for row in 0..2 {
        let got = out["logits"].narrow(0, row, 1).unwrap();
        let d = max_abs_diff(&got, &r["logits"]);
        assert!(d <= 1e-4, "row {row}: logits differ by {d}");
    }
    let ids: Vec<String> = r["input_ids"]
        .to_vec2::<i64>()
        .unwrap()
        .remove(0)
        .iter()
        .map(i64::to_string)
        .collect();
    let shown = stdout(&exitgraph(&[
        "run",
        pipeline.to_str().unwrap(),
        "--prompt",
        &ids.join(" "),
        "--max-new-tokens",
        "2",
    ]));
    assert!(
        shown.contains("GemFilter kept 64 of 300 prompt tokens"),
        "{shown}"
    );
}

#[test]
fn encode_matches_sentence_transformers() {
    let refs = root().join("tests/fixtures/minilm-l6");
    assert!(
        refs.join("model/model.safetensors").exists(),
        "MiniLM weights missing: run scripts/fetch-minilm.sh"
    );
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("emb.safetensors");
    exitgraph(&[
        "encode",
        "examples/minilm.ron",
        "--text",
        "The cat sat on the mat.",
        "--text",
        "Early exiting saves compute on easy inputs.",
        "--output",
        out_path.to_str().unwrap(),
    ]);
    let out = candle_core::safetensors::load(&out_path, &Device::Cpu).unwrap();
    let r =
        candle_core::safetensors::load(refs.join("reference.safetensors"), &Device::Cpu).unwrap();
    let d = max_abs_diff(&out["sentence_embedding"], &r["sentence_embedding"]);
    assert!(d <= 1e-4, "sentence embeddings differ by {d}");
}

#[test]
fn inspect_reports_parameters_and_flops() {
    let out = stdout(&exitgraph(&["inspect", "tests/fixtures/tiny-llama"]));
    // 512*64 embedding + 512*64 head + 6 layers * (attention 64*(64+32+32)+64*64 + mlp 3*64*160 + 2*64) + 64.
    assert!(out.contains("(324416)"), "{out}");
    assert!(out.contains("FLOPs per token"), "{out}");
    assert!(out.contains("4 heads, 2 kv heads, head size 16"), "{out}");
}

#[test]
fn compile_writes_dot_and_ir_that_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let dot = dir.path().join("g.dot");
    let ir = dir.path().join("g.ron");
    exitgraph(&[
        "compile",
        "examples/llama-truncated.ron",
        "--dot",
        dot.to_str().unwrap(),
        "--emit-ir",
        ir.to_str().unwrap(),
    ]);
    let dot = std::fs::read_to_string(dot).unwrap();
    assert!(dot.starts_with("digraph"));
    assert!(dot.contains("layers.2.attn") && !dot.contains("layers.3.attn"));
    let text = std::fs::read_to_string(ir).unwrap();
    let g = exitgraph_ir::serial::from_ron(&text).unwrap();
    exitgraph_ir::verify(&g).unwrap();
    assert_eq!(g.info.num_layers, 3);
}

#[test]
fn sampling_is_seeded() {
    let run = |seed: &str| {
        stdout(&exitgraph(&[
            "run",
            "examples/llama.ron",
            "--prompt",
            "5 17 42",
            "--temperature",
            "1.5",
            "--seed",
            seed,
        ]))
    };
    assert_eq!(run("3"), run("3"));
    assert_ne!(run("3"), run("4"));
}

#[test]
fn train_lm_writes_a_checkpoint_that_loads_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tiny-train.ron");
    std::fs::write(
        &config,
        r#"(
            output: "model",
            corpus: (seed: 5, examples: 300),
            eval_corpus: (seed: 6, examples: 40),
            vocab_size: 384,
            model: (hidden: 32, layers: 2, heads: 4, kv_heads: 2, intermediate: 64, max_positions: 64),
            seq_len: 32,
            batch_size: 4,
            seed: 3,
            training: (steps: 4, lr: 1e-2, warmup_steps: 1, clip_norm: Some(1.0), checkpoint_every: 2),
        )"#,
    )
    .unwrap();
    let out = stdout(&exitgraph(&["train", "lm", config.to_str().unwrap()]));
    assert!(out.contains("for 4 steps"), "{out}");
    let model = dir.path().join("model");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training.json",
    ] {
        assert!(model.join(f).exists(), "{f} missing");
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("training.json")).unwrap()).unwrap();
    assert_eq!(
        record["output"], "model",
        "training.json names the output as the config does, not as an absolute path"
    );
    assert!(
        !dir.path().join("model.run").exists(),
        "the run folder (initialisation, checkpoints) is removed after a finished run"
    );
    let g = exitgraph_ir::import(&model).unwrap().graph;
    assert_eq!(g.info.num_layers, 2);
    let table = stdout(&exitgraph(&[
        "eval",
        "layers",
        model.to_str().unwrap(),
        "--examples",
        "50",
    ]));
    for task in ["copy", "count", "recall", "addition", "grammar"] {
        assert!(table.contains(&format!("| {task} |")), "{table}");
    }
    assert!(table.contains("L1") && table.contains("L2"), "{table}");
    let only = stdout(&exitgraph(&[
        "eval",
        "layers",
        model.to_str().unwrap(),
        "--examples",
        "20",
        "--data",
        "repeat,recall",
    ]));
    assert!(
        only.contains("| repeat |") && only.contains("| recall |") && !only.contains("| copy |"),
        "{only}"
    );

    // A second run refuses to replace the model without --force and leaves it untouched;
    // with --force it trains in the run folder and replaces the files at the end.
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_exitgraph"))
        .args(["train", "lm", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    for needle in ["already holds a model", "--force", "model.run"] {
        assert!(err.contains(needle), "expected {needle:?} in {err}");
    }
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(!dir.path().join("model.run").exists());
    let config_text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("seed: 3", "seed: 4");
    std::fs::write(&config, config_text).unwrap();
    let out = stdout(&exitgraph(&[
        "train",
        "lm",
        config.to_str().unwrap(),
        "--force",
    ]));
    assert!(out.contains("for 4 steps"), "{out}");
    assert_ne!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(
        !dir.path().join("model.run").exists(),
        "the run folder is removed"
    );
    exitgraph_ir::import(&model).unwrap();
}

#[test]
fn the_demo_model_is_the_default() {
    let demo = root().join("models/demo");
    assert!(
        demo.join("model.safetensors").exists(),
        "models/demo is shipped"
    );
    let out = stdout(&exitgraph(&["inspect"]));
    assert!(
        out.contains("models/demo") && out.contains("llama"),
        "{out}"
    );
    let out = stdout(&exitgraph(&[
        "run",
        "--prompt",
        "copy: K7F2Q |",
        "--max-new-tokens",
        "6",
    ]));
    assert!(out.starts_with("copy: K7F2Q |"), "{out}");
    assert!(
        out.trim_end().len() > "copy: K7F2Q |".len(),
        "no new text after the prompt: {out}"
    );
}

#[test]
fn serve_runs_a_workload_with_both_executors() {
    let dir = tempfile::tempdir().unwrap();
    let cost = dir.path().join("cost.ron");
    let trace = dir.path().join("trace.jsonl");
    let json = dir.path().join("metrics.json");
    let out = stdout(&exitgraph(&[
        "profile",
        "examples/llama.ron",
        "-o",
        cost.to_str().unwrap(),
        "--reps",
        "1",
        "--max-tokens",
        "16",
        "--max-batch",
        "4",
    ]));
    assert!(out.contains("step time ="), "{out}");
    for executor in ["real", "sim"] {
        let out = stdout(&exitgraph(&[
            "serve",
            "examples/llama.ron",
            "--workload",
            "examples/workloads/burst.ron",
            "--executor",
            executor,
            "--cost",
            cost.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ]));
        assert!(out.contains("32 completed, 0 failed"), "{out}");
        let records = exitgraph::runtime::trace::read_trace(&trace)
            .unwrap()
            .count();
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(
            records as u64,
            metrics["generated_tokens"].as_u64().unwrap()
        );
    }
}

/// `profile --roofline` writes a cost model derived from the graph, with no measurement, and
/// the simulator serves with it; leaving skipped layers' keys and values absent saves the
/// state copying that filling them costs.
#[test]
fn a_roofline_cost_model_simulates_exits_with_and_without_state_copying() {
    let dir = tempfile::tempdir().unwrap();
    let cost = dir.path().join("roofline.ron");
    let out = stdout(&exitgraph(&[
        "profile",
        "examples/demo-exits.ron",
        "--roofline",
        "--bandwidth-gbs",
        "1555",
        "--peak-tflops",
        "312",
        "-o",
        cost.to_str().unwrap(),
    ]));
    assert!(
        out.contains("roofline of 1555 GB/s and 312 TFLOP/s"),
        "{out}"
    );
    let model = exitgraph::runtime::cost::CostModel::read(&cost).unwrap();
    assert!(model.samples.is_empty() && model.roofline.is_some());
    // The demo's 8 layers of 196,608 weights each (q, o 128 × 128; k, v 128 × 64; gate, up,
    // down 128 × 384) at 2 bytes, read at 1555 GB/s.
    let layers = 8.0 * (2.0 * 128.0 * 128.0 + 2.0 * 128.0 * 64.0 + 3.0 * 128.0 * 384.0);
    assert!(
        (model.per_layers - layers * 2.0 / 1555e9).abs() < 1e-15,
        "{model:?}"
    );
    let exits = dir.path().join("exits.ron");
    std::fs::write(&exits, "Distribution(exits: [(2, 0.7), (8, 0.3)], seed: 3)").unwrap();
    let serve = |skipped: &str| {
        let json = dir.path().join(format!("{skipped}.json"));
        let out = stdout(&exitgraph(&[
            "serve",
            "examples/demo-exits.ron",
            "--workload",
            "examples/workloads/burst.ron",
            "--executor",
            "sim",
            "--cost",
            cost.to_str().unwrap(),
            "--sim-exits",
            exits.to_str().unwrap(),
            "--skipped-kv",
            skipped,
            "--json",
            json.to_str().unwrap(),
        ]));
        assert!(out.contains("32 completed, 0 failed"), "{out}");
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        (out, m["makespan_s"].as_f64().unwrap())
    };
    let (filled, filled_s) = serve("filled");
    let (absent, absent_s) = serve("absent");
    assert!(absent.contains("absent, not filled"), "{absent}");
    assert!(!filled.contains("absent"), "{filled}");
    assert!(absent_s < filled_s, "{absent_s} vs {filled_s}");
}

/// The real executor serves an early-exit pipeline with the skipped layers' keys and values
/// absent: every request completes, tokens do exit early, and the report and JSON name the
/// mode.
#[test]
fn serve_real_exits_with_absent_keys_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("absent.json");
    let trace = dir.path().join("absent.jsonl");
    let out = stdout(&exitgraph(&[
        "serve",
        "examples/demo-exits.ron",
        "--workload",
        "examples/workloads/burst.ron",
        "--skipped-kv",
        "absent",
        "--json",
        json.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
    ]));
    assert!(out.contains("32 completed, 0 failed"), "{out}");
    assert!(out.contains("absent, not filled"), "{out}");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(m["skipped_kv"], "Absent");
    let early = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            r["exit_layer"].as_u64().unwrap() < 8
        })
        .count();
    assert!(early > 0, "no token exited early");
    // The same from the pipeline's `runtime.skipped_kv`, and the flag overrides it.
    let pipeline = dir.path().join("absent.ron");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("examples/demo-exits.ron"))
        .unwrap()
        .replace(
            "depth: EarlyExit(rule: Confidence(0.9)),",
            "depth: EarlyExit(rule: Confidence(0.9)),\n        skipped_kv: Absent,",
        );
    assert!(text.contains("skipped_kv: Absent"));
    std::fs::write(&pipeline, text).unwrap();
    let serve = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            pipeline.to_str().unwrap(),
            "--workload",
            "examples/workloads/burst.ron",
        ];
        args.extend_from_slice(extra);
        stdout(&exitgraph(&args))
    };
    assert!(serve(&[]).contains("absent, not filled"));
    assert!(!serve(&["--skipped-kv", "filled"]).contains("absent"));
}

/// A model folder where a pipeline is expected runs the model as imported.
#[test]
fn run_accepts_a_model_folder() {
    let model = root().join("tests/fixtures/tiny-llama");
    let out = stdout(&exitgraph(&[
        "run",
        model.to_str().unwrap(),
        "--prompt",
        "5 17 42",
        "--max-new-tokens",
        "3",
    ]));
    assert!(!out.trim().is_empty(), "{out}");
}

/// `eval layers --needle` prints a row per depth with its cases and refuses a context longer
/// than the model's positions, naming both.
#[test]
fn eval_layers_needle_table_and_context_bound() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_exitgraph"))
            .args(args)
            .current_dir(root())
            .output()
            .unwrap()
    };
    let out = run(&[
        "eval",
        "layers",
        "--examples",
        "10",
        "--needle",
        "64",
        "--needle-cases",
        "2",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("needle retrieval at 64 tokens"), "{text}");
    for depth in ["| 0% | 2 |", "| 50% | 2 |", "| 100% | 2 |"] {
        assert!(text.contains(depth), "{depth} missing: {text}");
    }
    assert!(text.contains("| all | 22 |"), "{text}");
    let out = run(&["eval", "layers", "--examples", "10", "--needle", "5000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--needle 5000") && err.contains("2048 positions"),
        "{err}"
    );
}

#[test]
fn bench_times_a_saved_random_model_and_names_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let tiny = [
        "bench",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--intermediate",
        "96",
        "--vocab",
        "300",
        "--prompt-len",
        "9",
        "--decode-tokens",
        "3",
        "--reps",
        "1",
    ];
    let mut args = tiny.to_vec();
    args.extend(["--save-model", model.to_str().unwrap()]);
    let out = stdout(&exitgraph(&args));
    assert!(out.contains("| prefill | 9 |"), "{out}");
    assert!(out.contains("| decode | 3 |"), "{out}");
    assert!(out.contains("candle matmuls by"), "{out}");
    // Without --torch there is no PyTorch column.
    assert!(!out.contains("PyTorch"), "{out}");
    // The kept checkpoint has the asked shape (grouped-query heads included) and benchmarks
    // again through --model.
    let ckpt = exitgraph_ir::import(&model).unwrap();
    assert_eq!(ckpt.graph.info.vocab, 300);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["intermediate_size"], 96);
    let out = stdout(&exitgraph(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-len",
        "5",
        "--decode-tokens",
        "2",
        "--reps",
        "1",
        "--profile",
    ]));
    assert!(out.contains("| prefill | 5 |"), "{out}");
    // The op profile names the projections, attention's parts and the LM head of each phase,
    // with the LM head once per call (prefill: 1, decode: 2 steps).
    for needle in [
        "exitgraph prefill",
        "exitgraph decode",
        "| gate/up projection [1, 5, 64] | 2 |",
        "| q/k/v projection [1, 1, 64] | 4 |",
        "| softmax |",
        "| LM head [1, 1, 64] | 1 |",
        "| LM head [1, 1, 64] | 2 |",
    ] {
        assert!(out.contains(needle), "expected {needle:?} in {out}");
    }
    // The two implementations agree on the same weights.
    let diff: f64 = out
        .split("max |logit difference| vs candle-transformers ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(diff < 1e-4, "{out}");
}

/// `bench --torch` on a tiny model: with PyTorch and transformers importable it adds the
/// PyTorch column and the logits agree; without them it fails saying what to install.
#[test]
fn bench_torch_compares_with_pytorch_or_says_what_is_missing() {
    let have_torch = Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    let args = [
        "bench",
        "--layers",
        "1",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--intermediate",
        "96",
        "--vocab",
        "300",
        "--prompt-len",
        "6",
        "--decode-tokens",
        "2",
        "--reps",
        "1",
        "--torch",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_exitgraph"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    if have_torch {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = stdout(&out);
        assert!(text.contains("ours / PyTorch (time)"), "{text}");
        assert!(text.contains("greedy tokens"), "{text}");
        let diff: f64 = text
            .split("max |logit difference| vs ours ")
            .nth(1)
            .and_then(|t| t.split(',').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!(diff < 1e-4, "{text}");
    } else {
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("bench --torch") && err.contains("pip install torch transformers"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn self_speculative_run_prints_the_full_models_text_and_its_drafts() {
    let args = |ex: &str| {
        vec![
            "run".to_string(),
            ex.to_string(),
            "--prompt".into(),
            "copy: K7F2Q |".into(),
            "--max-new-tokens".into(),
            "16".into(),
        ]
    };
    let full = stdout(&exitgraph(
        &args("examples/demo.ron")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    let mut spec_args = args("examples/demo-speculative.ron");
    spec_args.push("--show-exits".into());
    let spec = stdout(&exitgraph(
        &spec_args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    // The same text (the full model's greedy continuation), then the per-token table.
    let first = |s: &str| s.lines().next().unwrap_or_default().to_string();
    assert_eq!(first(&spec), first(&full), "{spec}");
    assert!(spec.contains("speculation: "), "{spec}");
    assert!(spec.contains("draft accepted"), "{spec}");
    assert!(spec.contains("full model ("), "{spec}");
}

#[test]
fn bench_projections_times_each_form_and_names_the_lowerings_choice() {
    let out = stdout(&exitgraph(&[
        "bench",
        "--projections",
        "--shapes",
        "16x24,1100x1000",
        "--rows",
        "1,3",
        "--calls",
        "2",
        "--reps",
        "1",
    ]));
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| in × out"))
        .collect();
    assert_eq!(rows.len(), 4, "{out}");
    if cfg!(feature = "mkl") {
        // MKL takes transposed operands as they are: every call multiplies by the view.
        assert!(rows.iter().all(|r| r.contains("| x·Wᵀ (view) |")), "{out}");
        return;
    }
    // A small weight is stored transposed; one over 2^20 elements keeps its layout, and a
    // call of 3 rows puts the weight first.
    assert!(
        rows[1].starts_with("| 16 × 24 | 3 |") && rows[1].contains("| x·Wᵀ (stored) |"),
        "{out}"
    );
    assert!(
        rows[2].starts_with("| 1100 × 1000 | 1 |") && rows[2].contains("| x·Wᵀ (view) |"),
        "{out}"
    );
    assert!(rows[3].contains("| (W·xᵀ)ᵀ |"), "{out}");
}

#[test]
fn eval_speculative_reports_a_lossless_sweep() {
    let out = stdout(&exitgraph(&[
        "eval",
        "speculative",
        "examples/demo-speculative.ron",
        "--exits",
        "2,8",
        "--drafts",
        "3",
        "--thresholds",
        "none",
        "--batches",
        "1,3",
        "--examples",
        "4",
        "--new-tokens",
        "8",
        "--reps",
        "1",
    ]));
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| pipeline |"))
        .collect();
    assert_eq!(rows.len(), 4, "{out}");
    for r in &rows {
        assert!(r.contains("| yes |"), "not lossless: {r}");
    }
    // A draft as deep as the model is always accepted.
    assert!(
        rows.iter().any(|r| r
            .starts_with("| demo-speculative.ron | own head | 8 | 3 | none | 1 | yes | 100.0% |")),
        "{out}"
    );
}

/// `bench --speculative` on a tiny random model: one lossless row per setting; with the
/// layer outputs scaled to 0 every layer leaves the stream as it is, so a shallow draft is
/// the full model and every drafted token is accepted; unscaled, the table still reports a
/// (lower) acceptance and stays lossless.
#[test]
fn bench_speculative_sweeps_a_random_model() {
    let tiny = [
        "bench",
        "--speculative",
        "--layers",
        "4",
        "--hidden",
        "64",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--intermediate",
        "96",
        "--vocab",
        "300",
        "--prompt-len",
        "6",
        "--decode-tokens",
        "6",
        "--reps",
        "1",
        "--prompts",
        "2",
        "--drafts",
        "3",
        "--thresholds",
        "none",
    ];
    let rows = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.starts_with("| random Llama"))
            .map(str::to_string)
            .collect()
    };
    let mut args = tiny.to_vec();
    args.extend(["--layer-scale", "0"]);
    let out = stdout(&exitgraph(&args));
    let scaled = rows(&out);
    // Default draft depths: a quarter and a half of 4 layers.
    assert_eq!(scaled.len(), 2, "{out}");
    assert!(out.contains("CPU: "), "{out}");
    for (r, depth) in scaled.iter().zip([1, 2]) {
        assert!(r.contains("layer outputs x0"), "{r}");
        assert!(
            r.contains(&format!(
                "| shared | {depth} | 3 | none | 1 | yes | 100.0% |"
            )),
            "{r}"
        );
    }
    let out = stdout(&exitgraph(&tiny));
    let plain = rows(&out);
    assert_eq!(plain.len(), 2, "{out}");
    assert!(plain.iter().all(|r| r.contains("| yes |")), "{out}");
}

/// `train exits --objective kangaroo` from the command line writes a pipeline whose adapter
/// drafts: `run` prints the full model's text with the drafts marked, and `eval speculative
/// --compare` sweeps it beside the shared head, both lossless, each row naming its head.
#[test]
fn kangaroo_adapters_train_and_draft_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("kangaroo");
    let out = out_dir.display().to_string();
    let trained = stdout(&exitgraph(&[
        "train",
        "exits",
        "examples/demo-kangaroo-heads.ron",
        "--objective",
        "kangaroo",
        "-o",
        &out,
        "--steps",
        "4",
        "--examples",
        "100",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
    ]));
    assert!(
        trained.contains("exits after layers [1, 2, 3]"),
        "{trained}"
    );
    let pipeline = out_dir.join("pipeline.ron").display().to_string();
    let args = |ex: &str| {
        vec![
            "run".to_string(),
            ex.to_string(),
            "--prompt".into(),
            "copy: K7F2Q |".into(),
            "--max-new-tokens".into(),
            "12".into(),
            "--show-exits".into(),
        ]
    };
    let run = |a: Vec<String>| {
        stdout(&exitgraph(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        ))
    };
    let full = run(args("examples/demo.ron"));
    let spec = run(args(&pipeline));
    let first = |s: &str| s.lines().next().unwrap_or_default().to_string();
    assert_eq!(first(&spec), first(&full), "{spec}");
    assert!(spec.contains("speculation: "), "{spec}");
    let sweep = stdout(&exitgraph(&[
        "eval",
        "speculative",
        "examples/demo-speculative.ron",
        "--compare",
        &pipeline,
        "--exits",
        "2",
        "--drafts",
        "4",
        "--thresholds",
        "0.6",
        "--batches",
        "2",
        "--examples",
        "4",
        "--new-tokens",
        "8",
        "--reps",
        "1",
    ]));
    let rows: Vec<&str> = sweep
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| pipeline |"))
        .collect();
    assert_eq!(rows.len(), 2, "{sweep}");
    assert!(
        rows[0].starts_with("| demo-speculative.ron | shared | 2 |"),
        "{sweep}"
    );
    assert!(
        rows[1].starts_with("| pipeline.ron | adapter | 2 |"),
        "{sweep}"
    );
    assert!(rows.iter().all(|r| r.contains("| yes |")), "{sweep}");
    // A pipeline on another model is refused.
    let other = dir.path().join("other.ron");
    std::fs::write(
        &other,
        format!(
            "Pipeline(model: {:?}, passes: [InsertExits(after: [2])])",
            root()
                .join("tests/fixtures/tiny-llama")
                .display()
                .to_string()
        ),
    )
    .unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_exitgraph"))
        .args([
            "eval",
            "speculative",
            "examples/demo-speculative.ron",
            "--compare",
            &other.display().to_string(),
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("one model") && err.contains("other.ron"),
        "{err}"
    );
}
