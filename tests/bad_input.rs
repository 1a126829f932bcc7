#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bad input gets one clear error naming the file and the field (or tensor), a non-zero exit
//! and never a panic: broken checkpoints, pipeline files and `forward` / `run` inputs, through
//! the library and the `exitgraph` binary.

use candle_core::{DType, Device, Tensor};
use exitgraph::pipeline::{compile, Pipeline};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn tiny_llama() -> PathBuf {
    fixtures().join("tiny-llama")
}

/// A temporary copy of a fixture checkpoint: its config and safetensors, no references.
fn copy_checkpoint(fixture: &Path) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("reference") {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    dir
}

/// A copy of tiny-llama with `edit` applied to its config.json.
fn llama_with_config(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> TempDir {
    let dir = copy_checkpoint(&tiny_llama());
    let path = dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dir
}

/// A copy of tiny-llama with `edit` applied to the tensors of its model.safetensors.
fn llama_with_weights(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> TempDir {
    let dir = copy_checkpoint(&tiny_llama());
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    dir
}

/// The error `exitgraph_ir::import` gives for `dir`.
fn import_error(dir: &Path) -> String {
    match exitgraph_ir::import(dir) {
        Ok(_) => panic!("{} imported, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Runs the binary, expecting a clean failure; returns its stderr.
fn exitgraph_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_exitgraph"))
        .args(args)
        .output()
        .expect("exitgraph runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "exitgraph {args:?} succeeded, expected an error:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !stderr.contains("panicked"),
        "exitgraph {args:?} panicked:\n{stderr}"
    );
    assert!(
        stderr.starts_with("error:"),
        "exitgraph {args:?}: stderr should start with \"error:\":\n{stderr}"
    );
    stderr
}

#[track_caller]
fn assert_mentions(message: &str, needles: &[&str]) {
    for n in needles {
        assert!(message.contains(n), "expected {n:?} in:\n{message}");
    }
}

/// Import through the library and `exitgraph inspect`: both fail naming every needle.
#[track_caller]
fn assert_import_fails(dir: &Path, needles: &[&str]) -> String {
    let lib = import_error(dir);
    assert_mentions(&lib, needles);
    let cli = exitgraph_fails(&["inspect", &dir.to_string_lossy()]);
    assert_eq!(
        cli,
        format!("error: {lib}\n"),
        "the CLI prints the error once"
    );
    lib
}

// ---------------------------------------------------------------- config.json

#[test]
fn config_json_missing() {
    let dir = copy_checkpoint(&tiny_llama());
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_import_fails(dir.path(), &["config.json", "No such file"]);
}

#[test]
fn config_json_invalid_json_has_line_and_column() {
    let dir = copy_checkpoint(&tiny_llama());
    std::fs::write(
        dir.path().join("config.json"),
        "{\n  \"model_type\": \"llama\",\n  \"hidden_size\": 64,,\n}\n",
    )
    .unwrap();
    let msg = assert_import_fails(dir.path(), &["config.json", "line 3, column"]);
    assert_eq!(
        msg.matches("line 3").count(),
        1,
        "position given once: {msg}"
    );
}

#[test]
fn config_json_not_an_object() {
    let dir = copy_checkpoint(&tiny_llama());
    std::fs::write(dir.path().join("config.json"), "[1, 2, 3]").unwrap();
    assert_import_fails(dir.path(), &["config.json", "expected a JSON object"]);
}

#[test]
fn config_required_field_missing() {
    let dir = llama_with_config(|c| {
        c.remove("hidden_size");
    });
    assert_import_fails(dir.path(), &["config.json", "\"hidden_size\"", "missing"]);
}

#[test]
fn config_model_type_missing() {
    let dir = llama_with_config(|c| {
        c.remove("model_type");
    });
    assert_import_fails(dir.path(), &["config.json", "\"model_type\"", "missing"]);
}

#[test]
fn config_field_of_wrong_type() {
    let dir = llama_with_config(|c| {
        c.insert("num_hidden_layers".into(), "six".into());
    });
    assert_import_fails(
        dir.path(),
        &["config.json", "\"num_hidden_layers\"", "integer", "\"six\""],
    );
}

#[test]
fn config_zero_size() {
    let dir = llama_with_config(|c| {
        c.insert("num_attention_heads".into(), 0.into());
    });
    assert_import_fails(
        dir.path(),
        &["config.json", "\"num_attention_heads\"", "at least 1"],
    );
}

#[test]
fn config_kv_heads_do_not_divide_heads() {
    let dir = llama_with_config(|c| {
        c.insert("num_key_value_heads".into(), 3.into());
    });
    assert_import_fails(
        dir.path(),
        &[
            "config.json",
            "\"num_key_value_heads\"",
            "3 does not divide",
            "(4)",
        ],
    );
}

#[test]
fn config_absurd_sizes_do_not_panic() {
    let dir = llama_with_config(|c| {
        c.insert("num_attention_heads".into(), (1u64 << 40).into());
        c.insert("num_key_value_heads".into(), (1u64 << 40).into());
        c.insert("head_dim".into(), (1u64 << 40).into());
    });
    assert_import_fails(
        dir.path(),
        &["config.json", "\"num_attention_heads\"", "too large"],
    );
    let dir = llama_with_config(|c| {
        c.insert("num_hidden_layers".into(), 1_000_000.into());
    });
    assert_import_fails(
        dir.path(),
        &[
            "config.json",
            "\"num_hidden_layers\"",
            "model.safetensors",
            "layer 999999",
        ],
    );
}

#[test]
fn config_token_id_that_does_not_fit_u32() {
    let dir = llama_with_config(|c| {
        c.insert("eos_token_id".into(), ((1u64 << 32) + 2).into());
    });
    assert_import_fails(
        dir.path(),
        &["config.json", "\"eos_token_id\"", "4294967298"],
    );
}

#[test]
fn config_unsupported_model_type() {
    let dir = llama_with_config(|c| {
        c.insert("model_type".into(), "t5".into());
    });
    assert_import_fails(
        dir.path(),
        &["config.json", "\"t5\"", "llama, mistral, qwen2, gpt2, bert"],
    );
}

#[test]
fn config_unsupported_rope_type() {
    let dir = llama_with_config(|c| {
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}),
        );
    });
    assert_import_fails(
        dir.path(),
        &[
            "config.json",
            "rope_parameters.rope_type",
            "\"yarn\"",
            "default, linear, llama3",
        ],
    );
}

#[test]
fn config_unsupported_activation() {
    let dir = llama_with_config(|c| {
        c.insert("hidden_act".into(), "mish".into());
    });
    assert_import_fails(dir.path(), &["config.json", "\"hidden_act\"", "\"mish\""]);
}

// ---------------------------------------------------------------- safetensors

#[test]
fn safetensors_missing() {
    let dir = copy_checkpoint(&tiny_llama());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_import_fails(dir.path(), &["model.safetensors", "no model.safetensors"]);
}

#[test]
fn safetensors_truncated_in_the_data() {
    let dir = copy_checkpoint(&tiny_llama());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_import_fails(dir.path(), &["model.safetensors", "truncated"]);
}

#[test]
fn safetensors_truncated_in_the_header() {
    for keep in [3, 100] {
        let dir = copy_checkpoint(&tiny_llama());
        let path = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..keep]).unwrap();
        assert_import_fails(dir.path(), &["model.safetensors", "truncated"]);
    }
}

#[test]
fn safetensors_garbage() {
    let dir = copy_checkpoint(&tiny_llama());
    let path = dir.path().join("model.safetensors");
    std::fs::write(
        &path,
        "this is not a safetensors file, just some text\n".repeat(10),
    )
    .unwrap();
    assert_import_fails(dir.path(), &["model.safetensors", "not safetensors"]);
    // A plausible header length followed by something that is not JSON.
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"<html>oops</html>....");
    std::fs::write(&path, bytes).unwrap();
    assert_import_fails(dir.path(), &["model.safetensors", "not valid JSON"]);
}

#[test]
fn safetensors_header_with_absurd_shape_does_not_panic() {
    let dir = copy_checkpoint(&tiny_llama());
    let path = dir.path().join("model.safetensors");
    let header = r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&path, bytes).unwrap();
    assert_import_fails(
        dir.path(),
        &["model.safetensors", "model.embed_tokens.weight", "shape"],
    );
}

#[test]
fn tensor_missing() {
    let dir = llama_with_weights(|t| {
        t.remove("model.layers.2.mlp.up_proj.weight").unwrap();
    });
    assert_import_fails(
        dir.path(),
        &[
            "model.safetensors",
            "\"model.layers.2.mlp.up_proj.weight\"",
            "missing",
        ],
    );
}

#[test]
fn tensor_of_the_wrong_shape() {
    let dir = llama_with_weights(|t| {
        let w = Tensor::zeros((160, 32), DType::F32, &Device::Cpu).unwrap();
        t.insert("model.layers.2.mlp.up_proj.weight".into(), w);
    });
    assert_import_fails(
        dir.path(),
        &[
            "model.safetensors",
            "model.layers.2.mlp.up_proj.weight",
            "[160, 32]",
            "[160, 64]",
        ],
    );
}

#[test]
fn config_hidden_size_disagrees_with_the_tensors() {
    let dir = llama_with_config(|c| {
        c.insert("hidden_size".into(), 96.into());
    });
    assert_import_fails(
        dir.path(),
        &[
            "model.safetensors",
            "model.embed_tokens.weight",
            "[512, 64]",
            "[512, 96]",
        ],
    );
}

#[test]
fn tensor_of_an_integer_dtype() {
    let dir = llama_with_weights(|t| {
        let w = Tensor::zeros(64, DType::I64, &Device::Cpu).unwrap();
        t.insert("model.norm.weight".into(), w);
    });
    assert_import_fails(
        dir.path(),
        &["model.safetensors", "\"model.norm.weight\"", "I64"],
    );
}

#[test]
fn sharded_index_points_to_a_missing_shard() {
    let dir = copy_checkpoint(&fixtures().join("variants/llama-linear-rope-sharded"));
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    assert_import_fails(
        dir.path(),
        &[
            "model.safetensors.index.json",
            "weight_map",
            "model-00002-of-00002.safetensors",
        ],
    );
}

#[test]
fn sharded_index_invalid() {
    let dir = copy_checkpoint(&fixtures().join("variants/llama-linear-rope-sharded"));
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
    assert_import_fails(
        dir.path(),
        &["model.safetensors.index.json", "\"weight_map\"", "missing"],
    );
    std::fs::write(&index, r#"{"weight_map": {"lm_head.weight": 3}}"#).unwrap();
    assert_import_fails(
        dir.path(),
        &["model.safetensors.index.json", "weight_map.lm_head.weight"],
    );
}

// ---------------------------------------------------------------- pipelines

/// Writes `text` as `pipeline.ron` in a fresh folder.
fn pipeline_file(text: &str) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline.ron");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A pipeline on tiny-llama with `rest` after the model line.
fn llama_pipeline(rest: &str) -> (TempDir, PathBuf) {
    let model = tiny_llama().to_string_lossy().to_string();
    pipeline_file(&format!("Pipeline(\n    model: {model:?},\n{rest})\n"))
}

/// The pipeline's error through the library (read, then compile) and `exitgraph compile`.
#[track_caller]
fn assert_pipeline_fails(path: &Path, needles: &[&str]) -> String {
    let lib = match Pipeline::read(path) {
        Err(e) => e.to_string(),
        Ok(p) => match compile(&p, path) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} compiled, expected an error", path.display()),
        },
    };
    assert_mentions(&lib, needles);
    let cli = exitgraph_fails(&["compile", &path.to_string_lossy()]);
    assert_eq!(
        cli,
        format!("error: {lib}\n"),
        "the CLI prints the error once"
    );
    lib
}

#[test]
fn pipeline_syntax_error_has_line_and_column() {
    let (_dir, path) = llama_pipeline("    passes: [TruncateLayers(keep: 2)\n");
    let msg = assert_pipeline_fails(&path, &["pipeline.ron:"]);
    let at = format!("{}:", path.display());
    let rest = msg.strip_prefix(&at).expect("starts with the file");
    let mut parts = rest.splitn(3, ':');
    let line: usize = parts.next().unwrap().parse().expect("a line number");
    let column: usize = parts.next().unwrap().parse().expect("a column number");
    assert!(line >= 3 && column >= 1, "{msg}");
}

#[test]
fn pipeline_unknown_field() {
    let (_dir, path) = pipeline_file("Pipeline(\n    model: \"m\",\n    pases: [],\n)\n");
    let msg = assert_pipeline_fails(&path, &["pipeline.ron:3:", "pases"]);
    assert_mentions(&msg, &["passes"]);
}

#[test]
fn pipeline_without_model_uses_the_demo_model() {
    let (_dir, path) = pipeline_file("Pipeline(\n    passes: [],\n)\n");
    let p = Pipeline::read(&path).expect("model is optional");
    let compiled = compile(&p, &path).expect("the demo model compiles");
    assert_eq!(compiled.graph.info.model_type, "llama");
    assert!(
        compiled.model_dir.ends_with("models/demo"),
        "{}",
        compiled.model_dir.display()
    );
}

#[test]
fn pipeline_unknown_pass() {
    let (_dir, path) = llama_pipeline("    passes: [Frobnicate(x: 1)],\n");
    assert_pipeline_fails(&path, &["pipeline.ron:3:", "Frobnicate", "TruncateLayers"]);
}

#[test]
fn pipeline_pass_parameter_out_of_range() {
    let (_dir, path) = llama_pipeline("    passes: [TruncateLayers(keep: 99)],\n");
    assert_pipeline_fails(&path, &["pipeline.ron", "TruncateLayers", "99", "1..=6"]);
}

/// Recursive passes' bad fields are named with the line and column of the field.
#[test]
fn recursive_pass_fields_have_line_and_column() {
    let (_dir, path) = llama_pipeline("    passes: [\n        TieLayers(loops: 4),\n    ],\n");
    assert_pipeline_fails(
        &path,
        &[
            "pipeline.ron:4:19:",
            "TieLayers",
            "\"loops\"",
            "4 loops",
            "6 layers",
        ],
    );
    let (_dir, path) = llama_pipeline(
        "    passes: [\n        TieLayers(loops: 2),\n        DepthLora(rank: Rank(65)),\n    ],\n",
    );
    assert_pipeline_fails(
        &path,
        &["pipeline.ron:5:19:", "DepthLora", "\"rank\"", "65", "64"],
    );
    let (_dir, path) = llama_pipeline("    passes: [DepthLora(rank: Rank(2))],\n");
    assert_pipeline_fails(&path, &["pipeline.ron:3:", "DepthLora", "TieLayers"]);
    let (_dir, path) = llama_pipeline(
        "    passes: [TieLayers(loops: 2), DepthLora(rank: Rank(2), targets: [q, qq])],\n",
    );
    assert_pipeline_fails(&path, &["pipeline.ron:3:", "qq", "LoraTarget"]);
    let (_dir, path) = llama_pipeline(
        "    passes: [TieLayers(loops: 2), DepthLora(rank: Rank(2), weights: \"none.safetensors\")],\n",
    );
    assert_pipeline_fails(
        &path,
        &[
            "pipeline.ron:3:",
            "\"weights\"",
            "none.safetensors",
            "not a file",
        ],
    );
}

/// GemFilter's bad settings are named with the line and column of the field; passes it
/// cannot follow are named.
#[test]
fn gemfilter_fields_have_line_and_column() {
    let pass = |text: &str| llama_pipeline(&format!("    passes: [\n        {text},\n    ],\n"));
    let (_dir, path) = pass("GemFilter(filter_layer: 6, keep: 8)");
    assert_pipeline_fails(
        &path,
        &[
            "pipeline.ron:4:19:",
            "GemFilter",
            "\"filter_layer\"",
            "0..6",
        ],
    );
    let (_dir, path) = pass("GemFilter(filter_layer: 1, keep: 8, pool: 4)");
    assert_pipeline_fails(&path, &["pipeline.ron:4:", "\"pool\"", "odd"]);
    let (_dir, path) = pass("GemFilter(filter_layer: 1, keep: 0)");
    assert_pipeline_fails(&path, &["pipeline.ron:4:", "\"keep\"", "at least 1"]);
    let (_dir, path) = pass("GemFilter(filter_layer: 1, keep_fraction: 1.5)");
    assert_pipeline_fails(&path, &["pipeline.ron:4:", "\"keep_fraction\"", "(0, 1]"]);
    let (_dir, path) = pass("GemFilter(filter_layer: 1, keep: 8, keep_fraction: 0.5)");
    assert_pipeline_fails(&path, &["pipeline.ron:4:", "GemFilter", "not both"]);
    let (_dir, path) = pass("GemFilter(filter_layer: 1, keep: 8, keep_first: 4, keep_last: 5)");
    assert_pipeline_fails(
        &path,
        &[
            "pipeline.ron:4:45:",
            "\"keep_first\"",
            "(4 + 5)",
            "keep (8)",
        ],
    );
    let (_dir, path) = pass("GemFilter(filter_layer: 1, keep: 8, keep_last: 9)");
    assert_pipeline_fails(&path, &["pipeline.ron:4:45:", "\"keep_last\"", "(0 + 9)"]);
    let (_dir, path) = pass("GemFilter(filter_layer: 1, kep: 8)");
    assert_pipeline_fails(&path, &["pipeline.ron:4:", "kep"]);
    let (_dir, path) = pass("TieLayers(loops: 2), GemFilter(filter_layer: 1, keep: 8)");
    assert_pipeline_fails(&path, &["pipeline.ron:4:", "GemFilter", "TieLayers"]);
}

#[test]
fn pipeline_unsupported_version() {
    let (_dir, path) = llama_pipeline("    version: 7,\n");
    assert_pipeline_fails(&path, &["pipeline.ron", "\"version\"", "7"]);
}

#[test]
fn pipeline_file_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.ron");
    assert_pipeline_fails(&path, &["nope.ron", "No such file"]);
}

#[test]
fn pipeline_model_path_does_not_exist() {
    let (_dir, path) = pipeline_file("Pipeline(model: \"no-such-model\")\n");
    assert_pipeline_fails(&path, &["pipeline.ron", "\"model\"", "no-such-model"]);
}

#[test]
fn pipeline_model_is_broken() {
    let model = llama_with_config(|c| {
        c.remove("vocab_size");
    });
    let (_dir, path) = pipeline_file(&format!(
        "Pipeline(model: {:?})\n",
        model.path().to_string_lossy()
    ));
    assert_pipeline_fails(&path, &["config.json", "\"vocab_size\"", "missing"]);
}

#[test]
fn inspect_model_folder_missing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    assert_import_fails(&missing, &["no-such-model", "not found"]);
}

// ---------------------------------------------------------------- forward

/// Writes `tensors` to `in.safetensors` in a fresh folder.
fn input_file(tensors: &[(&str, Tensor)]) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.safetensors");
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    (dir, path)
}

fn ids(rows: &[&[i64]]) -> Tensor {
    Tensor::new(
        rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap()
}

/// `exitgraph forward tiny-llama --input INPUT` (plus `extra`) fails; returns stderr.
fn forward_fails(input: &Path, extra: &[&str]) -> String {
    let out = input.with_file_name("out.safetensors");
    let model = tiny_llama();
    let mut args = vec![
        "forward",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let stderr = exitgraph_fails(&args);
    assert!(!out.exists(), "no output is written on error");
    stderr
}

#[test]
fn forward_input_without_input_ids() {
    let (_dir, path) = input_file(&[("attention_mask", ids(&[&[1, 1, 1]]))]);
    let msg = forward_fails(&path, &[]);
    assert_mentions(&msg, &["in.safetensors", "\"input_ids\"", "missing"]);
}

#[test]
fn forward_input_ids_of_float_dtype() {
    let t = Tensor::new(&[[1f32, 2., 3.]], &Device::Cpu).unwrap();
    let (_dir, path) = input_file(&[("input_ids", t)]);
    let msg = forward_fails(&path, &[]);
    assert_mentions(&msg, &["in.safetensors", "\"input_ids\"", "integer", "F32"]);
}

#[test]
fn forward_input_ids_of_wrong_rank() {
    let t = Tensor::new(&[1i64, 2, 3], &Device::Cpu).unwrap();
    let (_dir, path) = input_file(&[("input_ids", t)]);
    let msg = forward_fails(&path, &[]);
    assert_mentions(&msg, &["in.safetensors", "\"input_ids\"", "[batch, seq]"]);
}

#[test]
fn forward_negative_token_id() {
    let (_dir, path) = input_file(&[("input_ids", ids(&[&[1, -4, 3]]))]);
    let msg = forward_fails(&path, &[]);
    assert_mentions(&msg, &["in.safetensors", "\"input_ids\"", "negative", "-4"]);
}

#[test]
fn forward_token_id_outside_the_vocabulary() {
    let (_dir, path) = input_file(&[("input_ids", ids(&[&[1, 600, 3]]))]);
    let msg = forward_fails(&path, &[]);
    assert_mentions(&msg, &["600", "outside the vocabulary", "512"]);
}

#[test]
fn forward_attention_mask_shape_mismatch() {
    let (_dir, path) = input_file(&[
        ("input_ids", ids(&[&[1, 2, 3, 4]])),
        ("attention_mask", ids(&[&[1, 1, 1]])),
    ]);
    let msg = forward_fails(&path, &[]);
    assert_mentions(
        &msg,
        &["in.safetensors", "\"attention_mask\"", "[1, 3]", "[1, 4]"],
    );
}

#[test]
fn forward_generate_with_a_padded_mask() {
    let (_dir, path) = input_file(&[
        ("input_ids", ids(&[&[1, 2, 3, 4], &[5, 6, 0, 0]])),
        ("attention_mask", ids(&[&[1, 1, 1, 1], &[1, 1, 0, 0]])),
    ]);
    let msg = forward_fails(&path, &["--generate", "3"]);
    assert_mentions(&msg, &["in.safetensors", "attention_mask", "padding"]);
}

#[test]
fn forward_input_file_missing() {
    let dir = tempfile::tempdir().unwrap();
    let msg = forward_fails(&dir.path().join("in.safetensors"), &[]);
    assert_mentions(&msg, &["in.safetensors"]);
}

#[test]
fn forward_input_file_not_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.safetensors");
    std::fs::write(&path, "1 2 3 4\n").unwrap();
    let msg = forward_fails(&path, &[]);
    assert_mentions(&msg, &["in.safetensors"]);
}

// ---------------------------------------------------------------- run

#[test]
fn run_prompt_that_is_not_token_ids_without_a_tokenizer() {
    let (_dir, path) = llama_pipeline("");
    let msg = exitgraph_fails(&["run", path.to_str().unwrap(), "--prompt", "hello world"]);
    assert_mentions(&msg, &["tokenizer.json", "token ids", "\"hello\""]);
}

#[test]
fn run_empty_prompt() {
    let (_dir, path) = llama_pipeline("");
    let msg = exitgraph_fails(&["run", path.to_str().unwrap(), "--prompt", "  "]);
    assert_mentions(&msg, &["prompt", "no tokens"]);
}

#[test]
fn run_prompt_token_outside_the_vocabulary() {
    let (_dir, path) = llama_pipeline("");
    let msg = exitgraph_fails(&["run", path.to_str().unwrap(), "--prompt", "1 9999"]);
    assert_mentions(&msg, &["9999", "outside the vocabulary"]);
}

// ---------------------------------------------------------------- early exits

#[test]
fn exit_after_a_layer_out_of_range() {
    let (_dir, path) = llama_pipeline("    passes: [InsertExits(after: [2, 9])],\n");
    assert_pipeline_fails(&path, &["pipeline.ron", "InsertExits", "9", "1..6"]);
}

#[test]
fn exit_heads_without_trained_weights() {
    let (_dir, path) = llama_pipeline("    passes: [InsertExits(after: [2], head: Linear)],\n");
    assert_pipeline_fails(
        &path,
        &["InsertExits", "exits.2.norm.weight", "train exits"],
    );
}

#[test]
fn exit_weights_file_missing_or_corrupt() {
    let (dir, path) =
        llama_pipeline("    passes: [InsertExits(after: [2], weights: \"heads.safetensors\")],\n");
    assert_pipeline_fails(&path, &["pipeline.ron", "\"weights\"", "heads.safetensors"]);
    std::fs::write(
        dir.path().join("heads.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    assert_pipeline_fails(&path, &["\"weights\"", "heads.safetensors", "truncated"]);
}

#[test]
fn early_exit_without_exits_or_with_a_bad_threshold() {
    let (_dir, path) = llama_pipeline("    runtime: (depth: EarlyExit(rule: Confidence(0.9))),\n");
    let err = exitgraph_fails(&["run", &path.to_string_lossy(), "--prompt", "1 2 3"]);
    assert_mentions(&err, &["EarlyExit", "InsertExits"]);
    let (_dir, path) = llama_pipeline(
        "    passes: [InsertExits(every: 2)],\n    runtime: (depth: EarlyExit(rule: Any([Confidence(1.5)]))),\n",
    );
    let err = exitgraph_fails(&["run", &path.to_string_lossy(), "--prompt", "1 2 3"]);
    assert_mentions(&err, &["Confidence", "1.5", "0..=1"]);
    let (_dir, path) = llama_pipeline(
        "    runtime: (depth: SkipDecode((max_layers: 9, min_layers: 2, warmup: 1))),\n",
    );
    let err = exitgraph_fails(&["run", &path.to_string_lossy(), "--prompt", "1 2 3"]);
    assert_mentions(&err, &["SkipDecode", "max_layers (9)", "6 layers"]);
}

#[test]
fn eval_exits_rejects_a_bad_sweep() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-exits.ron");
    let demo = demo.to_string_lossy();
    let err = exitgraph_fails(&["eval", "exits", &demo, "--sweep", "confidence=0.9:0.5:0.1"]);
    assert_mentions(&err, &["--sweep", "lo <= hi"]);
    let err = exitgraph_fails(&["eval", "exits", &demo, "--sweep", "speed=0:1:0.5"]);
    assert_mentions(&err, &["unknown rule speed"]);
}

#[test]
fn eval_layers_names_an_unknown_task() {
    let err = exitgraph_fails(&["eval", "layers", "--data", "copy,recal", "--examples", "5"]);
    assert_mentions(&err, &["unknown task `recal`", "recall", "repeat"]);
}

#[test]
fn a_nan_weight_is_an_error_naming_the_tensor_not_a_silent_result() {
    let dir = llama_with_weights(|t| {
        let name = "model.layers.1.mlp.up_proj.weight";
        let w = t[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut w = w;
        w[5] = f32::NAN;
        let shape = t[name].dims().to_vec();
        t.insert(
            name.to_string(),
            Tensor::from_vec(w, shape, &Device::Cpu).unwrap(),
        );
    });
    let err = exitgraph_fails(&[
        "run",
        &dir.path().to_string_lossy(),
        "--prompt",
        "1 2 3",
        "--max-new-tokens",
        "2",
    ]);
    assert_mentions(
        &err,
        &["model.layers.1.mlp.up_proj.weight", "1 NaN or infinite"],
    );
}

#[test]
fn a_workload_without_requests_is_an_error_naming_the_file() {
    let (dir, pipeline) = llama_pipeline("");
    let workload = dir.path().join("empty.ron");
    std::fs::write(
        &workload,
        "(requests: 0, arrivals: AllAtOnce, prompt_len: Fixed(4), output_len: Fixed(2))",
    )
    .unwrap();
    let err = exitgraph_fails(&[
        "serve",
        &pipeline.to_string_lossy(),
        "--workload",
        &workload.to_string_lossy(),
    ]);
    assert_mentions(&err, &["empty.ron", "requests", "at least 1"]);
}

#[test]
fn run_with_a_corrupt_tokenizer_json() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
    let dir = copy_checkpoint(&demo);
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": garbage").unwrap();
    let err = exitgraph_fails(&["run", &dir.path().to_string_lossy(), "--prompt", "hi"]);
    assert_mentions(&err, &["tokenizer.json", "not a valid tokenizer"]);
}

#[test]
fn run_prompt_longer_than_the_model_positions() {
    // tiny-llama has max_position_embeddings 2048.
    let (_dir, path) = llama_pipeline("");
    let prompt = vec!["5"; 2049].join(" ");
    let err = exitgraph_fails(&[
        "run",
        &path.to_string_lossy(),
        "--prompt",
        &prompt,
        "--max-new-tokens",
        "1",
    ]);
    assert_mentions(
        &err,
        &["prompt is too long", "2049 tokens", "2048 positions"],
    );
}

// ---------------------------------------------------------------- serve

/// Writes `text` as the workload `name` beside a tiny-llama pipeline; runs `serve` with
/// `extra` and returns the error.
fn serve_fails(name: &str, workload: &str, extra: &[&str]) -> String {
    let (dir, pipeline) = llama_pipeline("");
    let path = dir.path().join(name);
    std::fs::write(&path, workload).unwrap();
    let pipeline = pipeline.to_string_lossy();
    let path = path.to_string_lossy();
    let mut args = vec!["serve", &pipeline, "--workload", &path];
    args.extend_from_slice(extra);
    exitgraph_fails(&args)
}

const GOOD_WORKLOAD: &str =
    "(requests: 2, arrivals: AllAtOnce, prompt_len: Fixed(4), output_len: Fixed(2))";

#[test]
fn a_workload_with_a_negative_poisson_rate() {
    let err = serve_fails(
        "poisson.ron",
        "(requests: 4, arrivals: Poisson(rate_per_s: -2.0), prompt_len: Fixed(4), output_len: Fixed(2))",
        &[],
    );
    assert_mentions(
        &err,
        &["poisson.ron", "arrivals", "rate_per_s", "positive", "-2"],
    );
}

#[test]
fn a_workload_with_uniform_min_above_max() {
    let err = serve_fails(
        "uniform.ron",
        "(requests: 4, arrivals: AllAtOnce, prompt_len: Uniform(min: 9, max: 3), output_len: Fixed(2))",
        &[],
    );
    assert_mentions(&err, &["uniform.ron", "prompt_len", "min <= max", "9..=3"]);
}

#[test]
fn a_workload_arrivals_trace_missing_malformed_or_short() {
    let workload = "(requests: 3, arrivals: Trace(file: \"times.json\"), prompt_len: Fixed(4), output_len: Fixed(2))";
    let (dir, pipeline) = llama_pipeline("");
    let path = dir.path().join("traced.ron");
    std::fs::write(&path, workload).unwrap();
    let serve = || {
        exitgraph_fails(&[
            "serve",
            &pipeline.to_string_lossy(),
            "--workload",
            &path.to_string_lossy(),
        ])
    };
    let needles = ["traced.ron", "arrivals", "Trace(file: \"times.json\")"];
    let err = serve();
    assert_mentions(&err, &needles);
    assert_mentions(&err, &["cannot read", "No such file"]);
    std::fs::write(dir.path().join("times.json"), "{\"t\": [0.1, 0.2]").unwrap();
    let err = serve();
    assert_mentions(&err, &needles);
    assert_mentions(&err, &["JSON list of arrival times"]);
    std::fs::write(dir.path().join("times.json"), "[0.1, -0.5, 0.2]").unwrap();
    let err = serve();
    assert_mentions(&err, &needles);
    assert_mentions(&err, &["non-negative", "-0.5"]);
    // Fewer times than requests is not silently a smaller workload.
    std::fs::write(dir.path().join("times.json"), "[0.1, 0.2]").unwrap();
    let err = serve();
    assert_mentions(&err, &needles);
    assert_mentions(&err, &["2 arrival times", "3 requests"]);
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn a_trace_in_a_missing_folder_is_an_error_naming_the_path() {
    let (dir, pipeline) = llama_pipeline("");
    let workload = dir.path().join("w.ron");
    std::fs::write(&workload, GOOD_WORKLOAD).unwrap();
    let before = names_in(dir.path());
    let trace = dir.path().join("nonexistent-subdir/trace.jsonl");
    let trace = trace.to_string_lossy();
    let pipeline = pipeline.to_string_lossy();
    let err = exitgraph_fails(&["run", &pipeline, "--prompt", "1 2 3", "--trace", &trace]);
    assert_mentions(&err, &[&trace, "cannot write"]);
    let workload = workload.to_string_lossy();
    let err = exitgraph_fails(&[
        "serve",
        &pipeline,
        "--workload",
        &workload,
        "--trace",
        &trace,
    ]);
    assert_mentions(&err, &[&trace, "cannot write"]);
    assert_eq!(names_in(dir.path()), before, "nothing is left behind");
}

#[test]
fn serve_with_an_unknown_policy_lists_the_policies() {
    let err = serve_fails("w.ron", GOOD_WORKLOAD, &["--policy", "bogus"]);
    assert_mentions(
        &err,
        &[
            "--policy",
            "bogus",
            "static",
            "continuous",
            "depthwise",
            "looped",
        ],
    );
}

#[test]
fn looped_batching_needs_a_loop_and_exits_after_iterations() {
    // A model with no tied block has no iterations to batch.
    let err = serve_fails("w.ron", GOOD_WORKLOAD, &["--policy", "looped"]);
    assert_mentions(&err, &["LoopedDepthWise", "TieLayers", "no loop"]);
    // An exit inside an iteration (6 layers looped twice: iterations end after 3 and 6).
    let (dir, pipeline) = llama_pipeline(
        "    passes: [TieLayers(loops: 2), InsertExits(after: [1], head: SharedLmHead(norm: true))],\n    runtime: (depth: EarlyExit(rule: Confidence(0.9))),\n",
    );
    let workload = dir.path().join("w.ron");
    std::fs::write(&workload, GOOD_WORKLOAD).unwrap();
    let err = exitgraph_fails(&[
        "serve",
        &pipeline.to_string_lossy(),
        "--workload",
        &workload.to_string_lossy(),
        "--policy",
        "looped",
    ]);
    assert_mentions(
        &err,
        &["exit after layer 1", "inside a loop iteration", "[3, 6]"],
    );
    // The same pipeline with the exit after the first iteration serves.
    let (dir, pipeline) = llama_pipeline(
        "    passes: [TieLayers(loops: 2), InsertExits(after: [3], head: SharedLmHead(norm: true))],\n    runtime: (depth: EarlyExit(rule: Confidence(0.9)), batching: LoopedDepthWise(max_batch: 4, token_budget: 64)),\n",
    );
    let workload = dir.path().join("w.ron");
    std::fs::write(&workload, GOOD_WORKLOAD).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_exitgraph"))
        .args(["serve", &pipeline.to_string_lossy(), "--workload"])
        .arg(&workload)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("LoopedDepthWise") && text.contains("2 completed"),
        "{text}"
    );
}

#[test]
fn serve_sim_without_a_cost_model() {
    let err = serve_fails("w.ron", GOOD_WORKLOAD, &["--executor", "sim"]);
    assert_mentions(
        &err,
        &[
            "--executor sim",
            "cost model",
            "--cost",
            "exitgraph profile",
        ],
    );
}

#[test]
fn serve_sim_with_a_corrupt_cost_model_has_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let cost = dir.path().join("cost.ron");
    std::fs::write(
        &cost,
        "CostModel(\n    version: 1,\n    coefficients: [0.001, 0.0002, oops],\n    samples: [],\n)\n",
    )
    .unwrap();
    let cost = cost.to_string_lossy();
    let err = serve_fails(
        "w.ron",
        GOOD_WORKLOAD,
        &["--executor", "sim", "--cost", &cost],
    );
    assert_mentions(&err, &[&format!("{cost}:3:")]);
    // A missing one is named too.
    let missing = dir.path().join("missing-cost.ron");
    let missing = missing.to_string_lossy();
    let err = serve_fails(
        "w.ron",
        GOOD_WORKLOAD,
        &["--executor", "sim", "--cost", &missing],
    );
    assert_mentions(&err, &[&missing, "cannot read"]);
}

// ---------------------------------------------------------------- train lm

/// A tiny `train lm` config with `seq_len` and `max_positions`, in a fresh folder.
fn train_config(seq_len: usize, max_positions: usize) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tiny-train.ron");
    std::fs::write(
        &config,
        format!(
            r#"(
            output: "model",
            corpus: (seed: 5, examples: 300),
            eval_corpus: (seed: 6, examples: 40),
            vocab_size: 384,
            model: (hidden: 32, layers: 2, heads: 4, kv_heads: 2, intermediate: 64, max_positions: {max_positions}),
            seq_len: {seq_len},
            batch_size: 4,
            seed: 3,
            training: (steps: 4, lr: 1e-2, warmup_steps: 1, clip_norm: Some(1.0), checkpoint_every: 2),
        )"#
        ),
    )
    .unwrap();
    (dir, config)
}

#[test]
fn train_lm_seq_len_beyond_the_model_positions() {
    let (dir, config) = train_config(100, 64);
    let err = exitgraph_fails(&["train", "lm", &config.to_string_lossy()]);
    assert_mentions(
        &err,
        &["tiny-train.ron", "seq_len 100", "max_positions is 64"],
    );
    assert_eq!(
        names_in(dir.path()),
        vec!["tiny-train.ron"],
        "nothing is trained or written"
    );
}

#[test]
fn train_lm_resume_with_a_corrupt_latest_pointer() {
    let (dir, config) = train_config(32, 64);
    let config = config.to_string_lossy().to_string();
    // A run that trains and checkpoints but cannot publish (the output is a file) leaves its
    // run folder behind, as an interrupted run would.
    let output = dir.path().join("model");
    std::fs::write(&output, "in the way").unwrap();
    let err = exitgraph_fails(&["train", "lm", &config]);
    assert_mentions(&err, &["model", "cannot create"]);
    std::fs::remove_file(&output).unwrap();
    let checkpoints = dir.path().join("model.run/checkpoints");
    let latest = checkpoints.join("latest");
    assert_eq!(std::fs::read_to_string(&latest).unwrap(), "step-00000004");
    std::fs::write(&latest, b"\xff\x00../../garbage\n").unwrap();

    // Nothing complete to fall back to: an error naming the folder and the pointer.
    let state = checkpoints.join("step-00000004/state.json");
    let aside = dir.path().join("state.json");
    std::fs::rename(&state, &aside).unwrap();
    let err = exitgraph_fails(&["train", "lm", &config, "--resume"]);
    assert_mentions(
        &err,
        &[
            "checkpoints",
            "no checkpoint could be resumed",
            "latest",
            "does not name a checkpoint",
        ],
    );

    // With the checkpoint whole again, resume falls back to it with a warning.
    std::fs::rename(&aside, &state).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_exitgraph"))
        .args(["train", "lm", &config, "--resume"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_mentions(
        &stderr,
        &[
            "warning:",
            "latest",
            "does not name a checkpoint",
            "resuming from step-00000004",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("for 4 steps"));
    exitgraph_ir::import(&output).unwrap();
}

// ---------------------------------------------------------------- safetensors offsets

/// A copy of tiny-llama whose model.safetensors header (JSON) is rewritten by `edit`,
/// the data bytes kept as they are.
fn llama_with_header(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> TempDir {
    let dir = copy_checkpoint(&tiny_llama());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    edit(header.as_object_mut().unwrap());
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&bytes[8 + len..]);
    std::fs::write(&path, out).unwrap();
    dir
}

fn offsets(header: &serde_json::Map<String, Value>, tensor: &str) -> Value {
    header[tensor]["data_offsets"].clone()
}

#[test]
fn safetensors_data_offsets_disagree_with_the_shape() {
    let dir = llama_with_header(|h| {
        let start = offsets(h, "model.norm.weight")[0].as_u64().unwrap();
        h["model.norm.weight"]["data_offsets"] = serde_json::json!([start, start + 128]);
    });
    assert_import_fails(
        dir.path(),
        &[
            "model.safetensors",
            "\"model.norm.weight\"",
            "data_offsets",
            "hold 128 bytes",
            "shape [64] of F32 needs 256",
        ],
    );
}

#[test]
fn safetensors_data_offsets_overlap_another_tensor() {
    let dir = llama_with_header(|h| {
        let other = offsets(h, "model.layers.0.input_layernorm.weight");
        h["model.norm.weight"]["data_offsets"] = other;
    });
    assert_import_fails(
        dir.path(),
        &[
            "model.safetensors",
            "\"model.norm.weight\"",
            "\"model.layers.0.input_layernorm.weight\"",
            "overlap",
        ],
    );
}

#[test]
fn safetensors_data_offsets_not_a_pair_of_numbers() {
    for bad in [
        serde_json::json!([0]),
        serde_json::json!([0, 256, 512]),
        serde_json::json!(["0", "256"]),
        serde_json::json!([0, -256]),
        serde_json::json!("0..256"),
    ] {
        let dir = llama_with_header(|h| {
            h["model.norm.weight"]["data_offsets"] = bad.clone();
        });
        assert_import_fails(
            dir.path(),
            &[
                "model.safetensors",
                "\"model.norm.weight\"",
                "data_offsets must be two integers",
            ],
        );
    }
    let dir = llama_with_header(|h| {
        h["model.norm.weight"]
            .as_object_mut()
            .unwrap()
            .remove("data_offsets");
    });
    assert_import_fails(
        dir.path(),
        &["\"model.norm.weight\"", "data_offsets must be two integers"],
    );
}

#[test]
fn bench_shapes_and_save_folder_are_checked() {
    let e = exitgraph_fails(&["bench", "--hidden", "64", "--heads", "5"]);
    assert_mentions(&e, &["--heads 5", "--hidden 64"]);
    let e = exitgraph_fails(&["bench", "--hidden", "64", "--heads", "4", "--kv-heads", "3"]);
    assert_mentions(&e, &["--kv-heads 3", "--heads 4"]);
    let dir = tempfile::tempdir().unwrap();
    let e = exitgraph_fails(&[
        "bench",
        "--layers",
        "1",
        "--hidden",
        "64",
        "--save-model",
        dir.path().to_str().unwrap(),
    ]);
    assert_mentions(&e, &["--save-model", "already exists"]);
    let e = exitgraph_fails(&["bench", "--exits", "--torch"]);
    assert_mentions(&e, &["--torch", "--exits"]);
    let e = exitgraph_fails(&["bench", "--exits", "--dtype", "bf16"]);
    assert_mentions(&e, &["--dtype", "--exits"]);
    let e = exitgraph_fails(&["bench", "--batch", "0"]);
    assert_mentions(&e, &["--batch 0"]);
    let e = exitgraph_fails(&["bench", "--projections", "--shapes", "128"]);
    assert_mentions(&e, &["--shapes", "IN x OUT"]);
    let e = exitgraph_fails(&["bench", "--projections", "--shapes", "128x0"]);
    assert_mentions(&e, &["output features `0`"]);
    let e = exitgraph_fails(&["bench", "--projections", "--rows", "1,0"]);
    assert_mentions(&e, &["--rows 0"]);
    let e = exitgraph_fails(&["bench", "--projections", "--torch"]);
    assert_mentions(&e, &["--torch", "--projections"]);
    let e = exitgraph_fails(&["bench", "--projections", "--exits"]);
    assert_mentions(&e, &["--projections", "--exits"]);
    // bench --speculative: a draft needs a token, a depth inside the model, a factor of 0 or
    // more on the random model only, a probability as threshold, and no unrelated flag.
    let tiny = ["bench", "--speculative", "--layers", "2", "--hidden", "64"];
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = tiny.to_vec();
        a.extend_from_slice(extra);
        exitgraph_fails(&a)
    };
    assert_mentions(&with(&["--drafts", "0"]), &["--drafts 0"]);
    assert_mentions(
        &with(&["--draft-exits", "2"]),
        &["--draft-exits 2", "1 to 1", "2 layers"],
    );
    assert_mentions(&with(&["--layer-scale=-1"]), &["--layer-scale -1"]);
    assert_mentions(&with(&["--thresholds", "1.5"]), &["--thresholds", "[0, 1]"]);
    assert_mentions(&with(&["--prompts", "0"]), &["--prompts 0"]);
    assert_mentions(&with(&["--torch"]), &["--torch", "--speculative"]);
    assert_mentions(
        &with(&[
            "--layer-scale",
            "0.5",
            "--model",
            dir.path().to_str().unwrap(),
        ]),
        &["--layer-scale", "--model"],
    );
    let e = exitgraph_fails(&["bench", "--speculative", "--exits"]);
    assert_mentions(&e, &["--speculative", "--exits"]);
}

/// A roofline needs its machine, and a positive one; skipped keys and values cannot be left
/// absent under self-speculation.
#[test]
fn roofline_and_skipped_kv_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let demo = root.join("examples/demo.ron");
    let demo = demo.to_str().unwrap();
    let burst = root.join("examples/workloads/burst.ron");
    let burst = burst.to_str().unwrap();
    let cost = dir.path().join("c.ron");
    let c = cost.to_str().unwrap();
    let e = exitgraph_fails(&["profile", demo, "--roofline", "-o", c]);
    assert_mentions(&e, &["--bandwidth-gbs", "--peak-tflops"]);
    let e = exitgraph_fails(&[
        "profile",
        demo,
        "--roofline",
        "--bandwidth-gbs",
        "0",
        "--peak-tflops",
        "1",
        "-o",
        c,
    ]);
    assert_mentions(&e, &["--roofline", "positive bandwidth"]);
    assert!(!cost.exists(), "a refused roofline wrote {c}");
    // Self-speculation verifies several tokens per call and rolls back: it needs every
    // layer's keys and values.
    let spec = root.join("examples/demo-speculative.ron");
    let e = exitgraph_fails(&[
        "serve",
        spec.to_str().unwrap(),
        "--workload",
        burst,
        "--skipped-kv",
        "absent",
    ]);
    assert_mentions(&e, &["--skipped-kv absent", "SelfSpeculative", "fill them"]);
    // SkipDecode skips layers its own way.
    let skip = root.join("examples/demo-skipdecode.ron");
    let e = exitgraph_fails(&[
        "serve",
        skip.to_str().unwrap(),
        "--workload",
        burst,
        "--skipped-kv",
        "absent",
    ]);
    assert_mentions(&e, &["--skipped-kv absent", "SkipDecode"]);
    // Nothing exits early: no layer is skipped.
    let e = exitgraph_fails(&["serve", demo, "--workload", burst, "--skipped-kv", "absent"]);
    assert_mentions(&e, &["--skipped-kv absent", "no token exits early"]);
}

/// `--cuda N` on a build without the `cuda` feature says which feature and how to build it,
/// from every command that takes it and from a pipeline's `device: Cuda(N)`.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_says_how_to_build_it() {
    let dir = tiny_llama();
    let input = dir.join("reference.safetensors");
    let out = tempfile::tempdir().unwrap();
    let output = out.path().join("out.safetensors");
    let e = exitgraph_fails(&[
        "forward",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--cuda",
        "0",
    ]);
    assert_mentions(&e, &["Cuda(0)", "`cuda` feature", "scripts/build-cuda.sh"]);
    assert!(!output.exists(), "no output is written");
    let e = exitgraph_fails(&["bench", "--layers", "1", "--hidden", "64", "--cuda", "1"]);
    assert_mentions(&e, &["Cuda(1)", "`cuda` feature", "scripts/build-cuda.sh"]);
    let pipeline = out.path().join("gpu.ron");
    std::fs::write(
        &pipeline,
        format!(
            "Pipeline(model: {:?}, device: Cuda(0))",
            dir.to_str().unwrap()
        ),
    )
    .unwrap();
    let e = exitgraph_fails(&["run", pipeline.to_str().unwrap(), "--prompt", "a"]);
    assert_mentions(&e, &["Cuda(0)", "`cuda` feature"]);
}

/// In a `cuda` build run against the link stubs instead of a driver (CI has no GPU):
/// `--cuda 0` names the device, the driver it needs and how to list GPUs.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs the link stubs as the driver: scripts/test.sh runs it with EXITGRAPH_CUDA_STUB_DRIVER=1"]
fn cuda_without_a_driver_names_what_is_missing() {
    assert!(
        std::env::var_os("EXITGRAPH_CUDA_STUB_DRIVER").is_some(),
        "run with EXITGRAPH_CUDA_STUB_DRIVER=1 through scripts/build-cuda.sh"
    );
    let dir = tiny_llama();
    let input = dir.join("reference.safetensors");
    let out = tempfile::tempdir().unwrap();
    let output = out.path().join("out.safetensors");
    let e = exitgraph_fails(&[
        "forward",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--cuda",
        "0",
    ]);
    assert_mentions(&e, &["Cuda(0)", "not available", "R580", "nvidia-smi"]);
    assert!(!output.exists(), "no output is written");
}

/// Given exit depths: a distribution that does not sum to 1, a depth the model lacks, a
/// syntax error, a trace of another workload, and the real executor on a model without an
/// exit head at a given depth each get a clear error.
#[test]
fn bad_simulated_exits_are_errors_naming_the_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let demo = root.join("examples/demo.ron");
    let cost = root.join("examples/demo-cost.ron");
    let workload = root.join("examples/workloads/burst.ron");
    let dir = tempfile::tempdir().unwrap();
    let serve = |exits: &str, executor: &str| {
        let path = dir.path().join("exits.ron");
        std::fs::write(&path, exits).unwrap();
        exitgraph_fails(&[
            "serve",
            demo.to_str().unwrap(),
            "--workload",
            workload.to_str().unwrap(),
            "--executor",
            executor,
            "--cost",
            cost.to_str().unwrap(),
            "--sim-exits",
            path.to_str().unwrap(),
        ])
    };
    let e = serve("Distribution(exits: [(1, 0.5), (6, 0.3)], seed: 0)", "sim");
    assert_mentions(&e, &["exits.ron", "sum to 0.8", "not 1"]);
    let e = serve("Distribution(exits: [(1, 0.5), (9, 0.5)], seed: 0)", "sim");
    assert_mentions(&e, &["exits.ron", "depth 9", "8 layers"]);
    let e = serve("Distribution(exits: [(1, 0.5)]\n  seed: 0)", "sim");
    assert_mentions(&e, &["exits.ron", "2:"]);
    // The real executor takes a leaving token from the exit head at its depth.
    let e = serve("Distribution(exits: [(2, 0.5), (6, 0.5)], seed: 0)", "real");
    assert_mentions(&e, &["after layer 2", "no", "InsertExits(after: [2]"]);
    std::fs::write(
        dir.path().join("other.jsonl"),
        r#"{"seq":99,"pos":3,"token":null,"step":0,"t_s":0.0,"batch":1,"stages":[],"layers":[0],"exit_layer":1}"#,
    )
    .unwrap();
    let e = serve(r#"Replay(trace: "other.jsonl")"#, "sim");
    assert_mentions(
        &e,
        &["replayed trace has no token for request 0", "same workload"],
    );
}
