#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Invariants of lowering and passes on random small models (proptest):
//! - decoding with the KV cache equals recomputing the whole sequence;
//! - a batch gives each row exactly its own single-sequence result;
//! - `generate` (greedy) equals repeated argmax over full recomputation;
//! - `TruncateLayers(keep)` equals the checkpoint loaded with `keep` layers, keeps the
//!   shallower hidden states, and `keep == layers` leaves the graph unchanged;
//! - the IR round-trips through RON, and compiling `TruncateLayers(keep: all)` gives the
//!   imported graph back;
//! - on random GPT-2 and BERT checkpoints of varied widths and heads: right-padded batches
//!   with attention masks give each row its own single-sequence result (the pooled sentence
//!   embedding for BERT, where the mask is what keeps padding out; logits for GPT-2, where
//!   causal attention already does, so that half checks only that padding is inert), KV-cached decoding equals recomputation
//!   (GPT-2), and per-sample encoder exits (`InsertExits(every: 1)`) give each sample what
//!   it gets alone.

use candle_core::{DType, Device, Tensor};
use exitgraph::generate::{generate, GenerateOptions};
use exitgraph::lower::{Inputs, Program};
use exitgraph::pipeline::{compile, Pipeline};
use exitgraph::synth::{
    write_random_bert, write_random_gpt2, write_random_llama, BlockSpec, LlamaSpec,
};
use exitgraph_passes::PassSpec;
use proptest::prelude::*;
use std::path::Path;

fn spec_strategy() -> impl Strategy<Value = (LlamaSpec, u64)> {
    (
        prop_oneof![Just("llama"), Just("qwen2"), Just("mistral")],
        1usize..=3,
        prop_oneof![Just(1usize), Just(2), Just(4)],
        any::<bool>(),
        prop_oneof![Just(None), Just(Some(3usize)), Just(Some(6))],
        any::<u64>(),
        // (hidden, heads): head widths 6 to 16.
        prop_oneof![
            Just((32usize, 4usize)),
            Just((16, 2)),
            Just((48, 6)),
            Just((24, 4)),
            Just((32, 2))
        ],
    )
        .prop_map(|(ty, layers, kv, tie, window, seed, (hidden, heads))| {
            let mut s = LlamaSpec::tiny();
            s.model_type = ty.to_string();
            s.layers = layers;
            s.hidden = hidden;
            s.heads = heads;
            // Grouped-query attention where the KV heads divide the heads.
            s.kv_heads = if heads % kv == 0 { kv } else { 1 };
            s.tie_embeddings = tie;
            s.sliding_window = if ty == "mistral" { window } else { None };
            (s, seed)
        })
}

fn lower(dir: &Path) -> Program {
    let ckpt = exitgraph_ir::import(dir).expect("import");
    Program::lower(&ckpt.graph, dir, &Device::Cpu, DType::F32).expect("lower")
}

fn ids(rows: &[Vec<u32>]) -> Tensor {
    Tensor::from_vec(rows.concat(), (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

fn run(
    p: &Program,
    rows: &[Vec<u32>],
    want: &[&str],
    cache: &mut exitgraph::lower::KvCache,
) -> Vec<Tensor> {
    let inputs = Inputs {
        input_ids: ids(rows),
        attention_mask: None,
        token_type_ids: None,
        example_ids: None,
    };
    let mut out = p.forward(&inputs, cache, want, false).expect("forward");
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

fn prompt(len: usize, seed: u64, vocab: u32) -> Vec<u32> {
    (0..len as u64)
        .map(|i| {
            ((seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(i * 1442695040888963407))
                >> 33) as u32
                % vocab
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn kv_cache_decoding_equals_full_recompute((spec, seed) in spec_strategy(), len in 2usize..12, split in 1usize..11) {
        let dir = tempfile::tempdir().unwrap();
        write_random_llama(dir.path(), &spec, seed).unwrap();
        let p = lower(dir.path());
        let tokens = prompt(len, seed, spec.vocab as u32);
        let split = split.min(len - 1);
        let full = run(&p, std::slice::from_ref(&tokens), &["logits"], &mut p.new_cache()).remove(0);
        let mut cache = p.new_cache();
        let mut parts = vec![run(&p, &[tokens[..split].to_vec()], &["logits"], &mut cache).remove(0)];
        for &t in &tokens[split..] {
            parts.push(run(&p, &[vec![t]], &["logits"], &mut cache).remove(0));
        }
        let inc = Tensor::cat(&parts, 1).unwrap();
        prop_assert!(max_diff(&full, &inc) < 1e-4, "differs by {}", max_diff(&full, &inc));
    }

    #[test]
    fn batch_rows_equal_single_runs((spec, seed) in spec_strategy(), len in 1usize..10, batch in 2usize..4) {
        let dir = tempfile::tempdir().unwrap();
        write_random_llama(dir.path(), &spec, seed).unwrap();
        let p = lower(dir.path());
        let rows: Vec<Vec<u32>> = (0..batch).map(|b| prompt(len, seed ^ (b as u64 + 1), spec.vocab as u32)).collect();
        let together = run(&p, &rows, &["logits"], &mut p.new_cache()).remove(0);
        for (b, row) in rows.iter().enumerate() {
            let alone = run(&p, std::slice::from_ref(row), &["logits"], &mut p.new_cache()).remove(0);
            let mine = together.narrow(0, b, 1).unwrap();
            prop_assert!(max_diff(&alone, &mine) < 1e-5);
        }
    }

    #[test]
    fn greedy_generation_equals_argmax_of_full_recompute((spec, seed) in spec_strategy(), len in 1usize..6) {
        let dir = tempfile::tempdir().unwrap();
        write_random_llama(dir.path(), &spec, seed).unwrap();
        let p = lower(dir.path());
        let mut seq = prompt(len, seed, spec.vocab as u32);
        let got = generate(&p, std::slice::from_ref(&seq), &GenerateOptions::greedy(6)).unwrap().remove(0);
        for _ in 0..6 {
            let logits = run(&p, std::slice::from_ref(&seq), &["logits"], &mut p.new_cache()).remove(0);
            let last = logits.get(0).unwrap().get(seq.len() - 1).unwrap();
            seq.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
        }
        prop_assert_eq!(got, seq);
    }

    #[test]
    fn truncate_equals_checkpoint_with_fewer_layers((spec, seed) in spec_strategy(), keep_frac in 0.0f64..1.0, len in 1usize..8) {
        let dir = tempfile::tempdir().unwrap();
        write_random_llama(dir.path(), &spec, seed).unwrap();
        let keep = 1 + ((spec.layers as f64 * keep_frac) as usize).min(spec.layers - 1);
        let pipeline = Pipeline {
            version: 1,
            model: dir.path().to_string_lossy().to_string(),
            device: Default::default(),
            dtype: Default::default(),
            passes: vec![PassSpec::TruncateLayers { keep }],
            runtime: Default::default(),
        };
        let compiled = compile(&pipeline, Path::new("pipeline.ron")).unwrap();
        let truncated = compiled.lower().unwrap();
        let tokens = vec![prompt(len, seed, spec.vocab as u32)];
        // The same files with config.json saying `keep` layers: the deeper tensors go unused.
        let short = tempfile::tempdir().unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        cfg["num_hidden_layers"] = keep.into();
        std::fs::write(short.path().join("config.json"), cfg.to_string()).unwrap();
        std::fs::copy(dir.path().join("model.safetensors"), short.path().join("model.safetensors")).unwrap();
        let reference = lower(short.path());
        let a = run(&truncated, &tokens, &["logits"], &mut truncated.new_cache()).remove(0);
        let b = run(&reference, &tokens, &["logits"], &mut reference.new_cache()).remove(0);
        prop_assert_eq!(max_diff(&a, &b), 0.0);
        let original = lower(dir.path());
        for i in 0..keep {
            let name = format!("hidden_states.{i}");
            let x = run(&truncated, &tokens, &[&name], &mut truncated.new_cache()).remove(0);
            let y = run(&original, &tokens, &[&name], &mut original.new_cache()).remove(0);
            prop_assert_eq!(max_diff(&x, &y), 0.0);
        }
    }

    #[test]
    fn ir_round_trips_and_full_truncation_is_the_identity((spec, seed) in spec_strategy()) {
        let dir = tempfile::tempdir().unwrap();
        write_random_llama(dir.path(), &spec, seed).unwrap();
        let g = exitgraph_ir::import(dir.path()).unwrap().graph;
        let text = exitgraph_ir::serial::to_ron(&g).unwrap();
        let back = exitgraph_ir::serial::from_ron(&text).unwrap();
        exitgraph_ir::verify(&back).unwrap();
        prop_assert_eq!(&text, &exitgraph_ir::serial::to_ron(&back).unwrap());
        let pipeline = Pipeline {
            version: 1,
            model: dir.path().to_string_lossy().to_string(),
            device: Default::default(),
            dtype: Default::default(),
            passes: vec![PassSpec::TruncateLayers { keep: spec.layers }],
            runtime: Default::default(),
        };
        let a = compile(&pipeline, Path::new("p.ron")).unwrap();
        // keep == layers: the imported graph, unchanged.
        prop_assert_eq!(&exitgraph_ir::serial::to_ron(&a.graph).unwrap(), &text);
    }
}

/// GPT-2 / BERT sizes: widths 16 to 48, 1 to 4 heads dividing them, 1 to 3 layers.
fn block_strategy() -> impl Strategy<Value = (BlockSpec, u64)> {
    (
        prop_oneof![
            Just((16usize, 2usize)),
            Just((24, 3)),
            Just((32, 4)),
            Just((48, 2)),
            Just((32, 1))
        ],
        1usize..=3,
        prop_oneof![Just(32usize), Just(80)],
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|((hidden, heads), layers, intermediate, tie, seed)| {
            let mut s = BlockSpec::tiny();
            s.hidden = hidden;
            s.heads = heads;
            s.layers = layers;
            s.intermediate = intermediate;
            s.tie_embeddings = tie;
            (s, seed)
        })
}

/// Rows of assorted lengths, right-padded with `pad` to the longest, and their mask.
fn padded(rows: &[Vec<u32>], pad: u32) -> (Tensor, Tensor) {
    let len = rows.iter().map(Vec::len).max().unwrap();
    let ids: Vec<u32> = rows
        .iter()
        .flat_map(|r| (0..len).map(|i| r.get(i).copied().unwrap_or(pad)))
        .collect();
    let mask: Vec<u32> = rows
        .iter()
        .flat_map(|r| (0..len).map(|i| u32::from(i < r.len())))
        .collect();
    (
        Tensor::from_vec(ids, (rows.len(), len), &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, (rows.len(), len), &Device::Cpu).unwrap(),
    )
}

fn forward_masked(p: &Program, rows: &[Vec<u32>], want: &str) -> Tensor {
    let (input_ids, mask) = padded(rows, 0);
    let inputs = Inputs {
        input_ids,
        attention_mask: Some(mask),
        token_type_ids: None,
        example_ids: None,
    };
    p.forward(&inputs, &mut p.new_cache(), &[want], false)
        .expect("forward")
        .remove(want)
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn gpt2_padded_batches_and_kv_decoding_equal_single_full_runs(
        (spec, seed) in block_strategy(),
        lens in prop::collection::vec(1usize..9, 2..4),
        split in 1usize..8,
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_random_gpt2(dir.path(), &spec, seed).unwrap();
        let p = lower(dir.path());
        let vocab = spec.vocab as u32;
        let rows: Vec<Vec<u32>> = lens.iter().enumerate().map(|(b, &n)| prompt(n, seed ^ (b as u64 + 7), vocab)).collect();
        let together = forward_masked(&p, &rows, "logits");
        for (b, row) in rows.iter().enumerate() {
            let alone = run(&p, std::slice::from_ref(row), &["logits"], &mut p.new_cache()).remove(0);
            let mine = together.narrow(0, b, 1).unwrap().narrow(1, 0, row.len()).unwrap();
            prop_assert!(max_diff(&alone, &mine) < 1e-4, "row {} differs by {}", b, max_diff(&alone, &mine));
        }
        // KV-cached decoding of the longest row equals its full recomputation.
        let tokens = rows.iter().max_by_key(|r| r.len()).unwrap().clone();
        prop_assume!(tokens.len() >= 2);
        let split = split.min(tokens.len() - 1);
        let full = run(&p, std::slice::from_ref(&tokens), &["logits"], &mut p.new_cache()).remove(0);
        let mut cache = p.new_cache();
        let mut parts = vec![run(&p, &[tokens[..split].to_vec()], &["logits"], &mut cache).remove(0)];
        for &t in &tokens[split..] {
            parts.push(run(&p, &[vec![t]], &["logits"], &mut cache).remove(0));
        }
        let inc = Tensor::cat(&parts, 1).unwrap();
        prop_assert!(max_diff(&full, &inc) < 1e-4, "differs by {}", max_diff(&full, &inc));
    }

    #[test]
    fn bert_padded_batches_and_encoder_exits_equal_single_runs(
        (spec, seed) in block_strategy(),
        lens in prop::collection::vec(1usize..9, 2..4),
        threshold in 0.5f64..1.0,
    ) {
        use exitgraph::exits::encoder::embed_with_exits;
        use exitgraph::exits::ExitRule;
        use exitgraph_passes::{HeadKind, InsertExits, Pass, PassContext};
        let dir = tempfile::tempdir().unwrap();
        write_random_bert(dir.path(), &spec, seed).unwrap();
        let vocab = spec.vocab as u32;
        // Token 0 is padding: real tokens start at 1.
        let rows: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(b, &n)| prompt(n, seed ^ (b as u64 + 3), vocab - 1).iter().map(|t| t + 1).collect())
            .collect();
        let p = lower(dir.path());
        let together = forward_masked(&p, &rows, "sentence_embedding");
        for (b, row) in rows.iter().enumerate() {
            let alone = run(&p, std::slice::from_ref(row), &["sentence_embedding"], &mut p.new_cache()).remove(0);
            let mine = together.narrow(0, b, 1).unwrap();
            prop_assert!(max_diff(&alone, &mine) < 1e-4, "row {} differs by {}", b, max_diff(&alone, &mine));
        }
        // Per-sample exits after every layer: each sample gets what it gets alone.
        let mut g = exitgraph_ir::import(dir.path()).unwrap().graph;
        prop_assume!(g.info.num_layers >= 2);
        InsertExits { after: Vec::new(), every: Some(1), head: HeadKind::default(), gate: false, weights: None }
            .run(&mut g, &PassContext::detached())
            .unwrap();
        let q = Program::lower(&g, dir.path(), &Device::Cpu, DType::F32).unwrap();
        let rule = ExitRule::Saturation(threshold);
        let batch = embed_with_exits(&q, &rows, 0, &rule).unwrap();
        for (r, e) in rows.iter().zip(&batch) {
            let alone = embed_with_exits(&q, std::slice::from_ref(r), 0, &rule).unwrap().remove(0);
            prop_assert_eq!(alone.exit_layer, e.exit_layer);
            let d = alone.embedding.iter().zip(&e.embedding).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            prop_assert!(d < 1e-4, "embedding differs by {}", d);
        }
    }
}
