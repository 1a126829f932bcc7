#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Config styles and checkpoint layouts beyond the transformers fixtures: llama3 and linear
//! RoPE scaling, rope_theta at the top level and inside rope_parameters, GQA with an explicit
//! head_dim, attention and MLP biases, BF16 and F16 weights, sharded checkpoints, Mistral
//! and Qwen2 sliding windows, GPT-2 without the `transformer.` prefix and with an untied head.
//! References come from `scripts/make_variant_fixtures.py`, an independent NumPy
//! implementation of transformers' semantics (checked against the transformers fixtures).

use candle_core::{DType, Device, Tensor};
use exitgraph::generate::{generate, GenerateOptions};
use exitgraph::lower::{Inputs, Program};
use std::path::PathBuf;

#[path = "common/device.rs"]
mod device;
use device::{fixtures, test_device};

fn variant(name: &str) -> PathBuf {
    fixtures().join("variants").join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_device(&Device::Cpu).unwrap() - b)
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

fn check(name: &str) {
    let dir = variant(name);
    let ckpt = exitgraph_ir::import(&dir).expect("import");
    let program = Program::lower(&ckpt.graph, &dir, &test_device(), DType::F32).expect("lower");
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let names = program.output_names();
    let want: Vec<&str> = names.iter().map(String::as_str).collect();
    for n in &want {
        assert!(r.contains_key(*n), "{name}: reference lacks {n}");
    }
    let mut cache = program.new_cache();
    let out = program
        .forward(
            &Inputs {
                input_ids: ids.clone(),
                attention_mask: None,
                token_type_ids: None,
                example_ids: None,
            },
            &mut cache,
            &want,
            false,
        )
        .expect("forward");
    for n in &want {
        let d = max_abs_diff(&out[*n], &r[*n]);
        assert!(d <= 1e-4, "{name}: {n} differs by {d}");
    }
    let prompts = ids.to_vec2::<u32>().unwrap();
    let expected = r["greedy"].to_vec2::<i64>().unwrap();
    let n_new = expected[0].len() - prompts[0].len();
    let got = generate(&program, &prompts, &GenerateOptions::greedy(n_new)).expect("generate");
    for (g, e) in got.iter().zip(&expected) {
        let e: Vec<u32> = e.iter().map(|&x| x as u32).collect();
        assert_eq!(g, &e, "{name}: greedy differs");
    }
}

#[test]
fn llama_gqa_llama3_rope_bf16_with_biases() {
    check("llama-gqa-llama3-rope");
}

#[test]
fn llama_linear_rope_sharded_f16() {
    check("llama-linear-rope-sharded");
}

#[test]
fn mistral_sliding_window() {
    check("mistral-sliding-window");
}

#[test]
fn qwen2_sliding_layers() {
    check("qwen2-sliding-layers");
}

#[test]
fn gpt2_untied_exact_gelu_without_prefix() {
    check("gpt2-untied-gelu");
}
