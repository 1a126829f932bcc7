#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Invariants of the execution core on random small models (proptest):
//! - truncating a KV cache to `n` positions and replaying equals never having appended past
//!   `n`; a fork is independent of the cache it came from;
//! - all-position logits from one call (several ragged segments at once) equal decoding the
//!   same tokens one position at a time;
//! - a graph where two blocks share one weight identity lowers those weights once (the
//!   lowered program's and `inspect`'s weight bytes count them once) and computes what the
//!   graph with a separate copy of the same values computes;
//! - a low-rank adapter applied at run time equals the dense weight with `scale · B A` merged
//!   into it.

use candle_core::{DType, Device, Tensor};
use exitgraph::lower::{KvCache, Program, Run, Segment, Want};
use exitgraph::synth::{write_random_llama, LlamaSpec, Normal};
use exitgraph_ir::{Graph, LowRank, Op, WeightRef};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::Path;

fn spec(ty: &str, layers: usize, kv: usize) -> LlamaSpec {
    let mut s = LlamaSpec::tiny();
    s.model_type = ty.to_string();
    s.layers = layers;
    s.kv_heads = kv;
    s
}

fn model_strategy() -> impl Strategy<Value = (LlamaSpec, u64)> {
    (
        prop_oneof![Just("llama"), Just("qwen2")],
        2usize..=3,
        prop_oneof![Just(1usize), Just(2), Just(4)],
        any::<u64>(),
    )
        .prop_map(|(ty, layers, kv, seed)| (spec(ty, layers, kv), seed))
}

fn tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((seed.wrapping_mul(31).wrapping_add(i * 17 + 3)) % vocab as u64) as u32)
        .collect()
}

fn lower(g: &Graph, dir: &Path) -> Program {
    Program::lower(g, dir, &Device::Cpu, DType::F32).expect("lower")
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

/// Logits at the last of `ids`, appended after the cache's positions.
fn step(p: &Program, ids: &[u32], cache: &mut KvCache) -> Tensor {
    p.forward_ragged(&mut [Segment::new(ids, cache)])
        .unwrap()
        .remove(0)
}

fn same_slots(a: &KvCache, b: &KvCache) -> f32 {
    assert_eq!(a.slots(), b.slots());
    let mut worst = 0f32;
    for i in 0..a.slots() {
        assert_eq!(a.slot_len(i), b.slot_len(i), "slot {i}");
        if let (Some((ak, av)), Some((bk, bv))) = (a.slot(i), b.slot(i)) {
            worst = worst.max(max_diff(ak, bk)).max(max_diff(av, bv));
        }
    }
    worst
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn truncating_and_replaying_equals_never_appending(
        (spec, seed) in model_strategy(),
        prompt_len in 2usize..8,
        extra in 1usize..5,
        cut in 0usize..12,
        replay in 1usize..4,
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_random_llama(dir.path(), &spec, seed).unwrap();
        let g = exitgraph_ir::import(dir.path()).unwrap().graph;
        let p = lower(&g, dir.path());
        let seq = tokens(prompt_len + extra, seed, spec.vocab);
        let n = cut.min(prompt_len + extra - 1).max(1);
        let again = tokens(replay, seed ^ 0x5eed, spec.vocab);
        // Appended past n, rolled back, replayed.
        let mut rolled = p.new_cache();
        step(&p, &seq[..prompt_len], &mut rolled);
        let before = rolled.fork();
        step(&p, &seq[prompt_len..], &mut rolled);
        prop_assert_eq!(rolled.len(), prompt_len + extra);
        rolled.truncate(n).unwrap();
        prop_assert_eq!(rolled.len(), n);
        let got = step(&p, &again, &mut rolled);
        // Never appended past n.
        let mut fresh = p.new_cache();
        step(&p, &seq[..n], &mut fresh);
        let want = step(&p, &again, &mut fresh);
        prop_assert!(max_diff(&got, &want) < 1e-5, "logits differ by {}", max_diff(&got, &want));
        prop_assert!(same_slots(&rolled, &fresh) < 1e-5);
        // The fork taken after the prompt never saw the extra tokens.
        prop_assert_eq!(before.len(), prompt_len);
        for i in 0..before.slots() {
            prop_assert_eq!(before.slot_len(i), prompt_len);
        }
    }

    #[test]
    fn all_position_logits_equal_decoding_position_by_position(
        (spec, seed) in model_strategy(),
        lens in prop::collection::vec(1usize..7, 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_random_llama(dir.path(), &spec, seed).unwrap();
        let g = exitgraph_ir::import(dir.path()).unwrap().graph;
        let p = lower(&g, dir.path());
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| tokens(l, seed.wrapping_add(i as u64 * 7919), spec.vocab))
            .collect();
        // One call, every segment, logits at every position.
        let mut caches: Vec<KvCache> = seqs.iter().map(|_| p.new_cache()).collect();
        let mut segments: Vec<Segment> = seqs
            .iter()
            .zip(caches.iter_mut())
            .map(|(ids, cache)| Segment::new(ids, cache))
            .collect();
        let logits = p.logits_node().unwrap();
        let all = p.run(&mut segments, &Run::outputs(vec![Want::all(logits)])).unwrap();
        for (s, ids) in seqs.iter().enumerate() {
            let rows = &all[s][0];
            prop_assert_eq!(rows.dims(), &[ids.len(), spec.vocab]);
            // One token at a time on a cache of its own.
            let mut cache = p.new_cache();
            for (i, t) in ids.iter().enumerate() {
                let one = step(&p, std::slice::from_ref(t), &mut cache);
                let row = rows.get(i).unwrap();
                prop_assert!(max_diff(&row, &one) < 1e-4, "segment {} position {} differs by {}", s, i, max_diff(&row, &one));
            }
            prop_assert_eq!(caches[s].len(), ids.len());
        }
    }
}

/// Writes `tensors` as `file` in `dir`.
fn save(dir: &Path, file: &str, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, dir.join(file)).unwrap();
}

fn load(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

/// Points every weight of block `to` at block `from`'s stored tensors (a tied layer).
fn tie_block(g: &mut Graph, from: usize, to: usize) {
    let source = format!("model.layers.{from}.");
    let target = format!("model.layers.{to}.");
    for n in g.graph.node_indices().collect::<Vec<_>>() {
        if g.graph[n].layer != Some(to) {
            continue;
        }
        let op = &mut g.graph[n].op;
        let retarget = |w: &mut WeightRef| {
            if let WeightRef::File { tensor } = w {
                *tensor = tensor.replace(&target, &source);
            }
        };
        match op {
            Op::Norm(norm) => retarget(&mut norm.weight),
            _ => op.linears_mut().into_iter().for_each(|l| {
                retarget(&mut l.weight);
                l.bias.iter_mut().for_each(retarget);
            }),
        }
    }
    g.blocks[to].weights = g.blocks[from].weights;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn a_shared_weight_identity_is_lowered_once_and_computes_the_copy(
        (spec, seed) in model_strategy(),
        len in 1usize..6,
    ) {
        // A checkpoint whose last block holds a copy of block 0's values, imported as is...
        let dir = tempfile::tempdir().unwrap();
        write_random_llama(dir.path(), &spec, seed).unwrap();
        let last = spec.layers - 1;
        let mut tensors = load(dir.path());
        let copies: Vec<(String, Tensor)> = tensors
            .iter()
            .filter(|(k, _)| k.starts_with("model.layers.0."))
            .map(|(k, v)| (k.replace("model.layers.0.", &format!("model.layers.{last}.")), v.copy().unwrap()))
            .collect();
        tensors.extend(copies);
        save(dir.path(), "model.safetensors", &tensors);
        let copied = exitgraph_ir::import(dir.path()).unwrap().graph;
        // ...and the same graph with the last block reading block 0's tensors.
        let mut shared = copied.clone();
        tie_block(&mut shared, 0, last);
        exitgraph_ir::verify(&shared).unwrap();
        let (pc, ps) = (lower(&copied, dir.path()), lower(&shared, dir.path()));
        let layer_bytes: usize = copied
            .weights
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("model.layers.{last}.")))
            .map(|(_, t)| t.shape.iter().product::<usize>() * 4)
            .sum();
        prop_assert!(layer_bytes > 0);
        prop_assert_eq!(ps.weight_bytes() + layer_bytes, pc.weight_bytes());
        // What `inspect` reports counts the shared tensors once too.
        let (summary_shared, summary_copied) = (
            exitgraph::inspect::summarize(&shared),
            exitgraph::inspect::summarize(&copied),
        );
        prop_assert_eq!(summary_shared.weight_bytes + layer_bytes, summary_copied.weight_bytes);
        // Norm, attention, norm, MLP of the shared block are the first block's kernels.
        prop_assert_eq!(ps.weight_kernels() + 4, pc.weight_kernels());
        let ids = tokens(len, seed, spec.vocab);
        let (mut a, mut b) = (pc.new_cache(), ps.new_cache());
        let (la, lb) = (step(&pc, &ids, &mut a), step(&ps, &ids, &mut b));
        prop_assert!(max_diff(&la, &lb) < 1e-5, "differ by {}", max_diff(&la, &lb));
        // And the shared block keeps its own KV slot.
        prop_assert_eq!(b.slots(), spec.layers);
        prop_assert!(same_slots(&a, &b) < 1e-5);
    }

    #[test]
    fn a_run_time_adapter_equals_the_merged_weight(
        (spec, seed) in model_strategy(),
        rank in 1usize..4,
        scale in prop_oneof![Just(1.0f64), Just(0.5), Just(2.0)],
        // One projection of an attention (q, k, v, o) and one of an MLP (gate, up, down),
        // in blocks chosen at random.
        attn in (0usize..3, 0usize..4),
        mlp in (0usize..3, 0usize..3),
        len in 2usize..6,
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_random_llama(dir.path(), &spec, seed).unwrap();
        let g = exitgraph_ir::import(dir.path()).unwrap().graph;
        let mut rng = Normal::new(seed ^ 0xada9);
        let attn_names = ["q_proj", "k_proj", "v_proj", "o_proj"];
        let mlp_names = ["gate_proj", "up_proj", "down_proj"];
        let (ab, mb) = (attn.0 % spec.layers, mlp.0 % spec.layers);
        let targets = [
            (format!("layers.{ab}.attn"), attn.1, format!("model.layers.{ab}.self_attn.{}.weight", attn_names[attn.1])),
            (format!("layers.{mb}.mlp"), mlp.1, format!("model.layers.{mb}.mlp.{}.weight", mlp_names[mlp.1])),
        ];
        let mut adapters = HashMap::new();
        let mut adapted = g.clone();
        let mut merged_tensors = load(dir.path());
        for (i, (node, which, weight)) in targets.iter().enumerate() {
            let n = adapted.find(node).unwrap();
            let l = &mut adapted.graph[n].op.linears_mut()[*which];
            let a = rng.tensor(&[rank, l.in_features], 0.3).unwrap();
            let b = rng.tensor(&[l.out_features, rank], 0.3).unwrap();
            let w = &merged_tensors[weight.as_str()];
            let delta = (b.matmul(&a).unwrap() * scale).unwrap();
            merged_tensors.insert(weight.clone(), (w + delta).unwrap());
            adapters.insert(format!("lora.{i}.a"), a);
            adapters.insert(format!("lora.{i}.b"), b);
            l.adapter = Some(LowRank {
                a: WeightRef::file(format!("lora.{i}.a")),
                b: WeightRef::file(format!("lora.{i}.b")),
                rank,
                scale,
            });
        }
        save(dir.path(), "lora.safetensors", &adapters);
        exitgraph::passes::PassContext::for_pipeline(&dir.path().join("p.ron"))
            .add_weights(&mut adapted, "lora.safetensors", |_| false)
            .unwrap();
        exitgraph_ir::verify(&adapted).unwrap();
        let merged_dir = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("config.json"), merged_dir.path().join("config.json")).unwrap();
        save(merged_dir.path(), "model.safetensors", &merged_tensors);
        let merged = exitgraph_ir::import(merged_dir.path()).unwrap().graph;
        let (pa, pm) = (lower(&adapted, dir.path()), lower(&merged, merged_dir.path()));
        // The adapter stays low-rank: the program holds the dense weights once plus A and B.
        prop_assert_eq!(
            pa.weight_bytes(),
            pm.weight_bytes() + adapters.values().map(|t| t.elem_count() * 4).sum::<usize>()
        );
        let ids = tokens(len, seed, spec.vocab);
        // Ragged execution.
        let (mut a, mut m) = (pa.new_cache(), pm.new_cache());
        let (la, lm) = (step(&pa, &ids, &mut a), step(&pm, &ids, &mut m));
        prop_assert!(max_diff(&la, &lm) < 1e-4, "differ by {}", max_diff(&la, &lm));
        prop_assert!(same_slots(&a, &m) < 1e-4);
        // The padded-batch path.
        let padded = |p: &Program| {
            let inputs = exitgraph::lower::Inputs {
                input_ids: Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap(),
                attention_mask: None,
                token_type_ids: None,
                example_ids: None,
            };
            p.forward(&inputs, &mut p.new_cache(), &["logits"], false).unwrap().remove("logits").unwrap()
        };
        let (fa, fm) = (padded(&pa), padded(&pm));
        prop_assert!(max_diff(&fa, &fm) < 1e-4, "padded path differs by {}", max_diff(&fa, &fm));
        // State copying (keys and values from an exit state) uses the k and v adapters.
        let fill = |p: &Program| {
            let mut cache = p.new_cache();
            step(p, &ids[..len - 1], &mut cache);
            let state = p
                .run(
                    &mut [Segment::new(&ids[len - 1..], &mut cache.fork())],
                    &Run { from: 0, task: exitgraph::lower::Task::Outputs(vec![Want::all(p.stream_node(1).unwrap())]), commit: false },
                )
                .unwrap()
                .remove(0)
                .remove(0);
            p.fill_kv(&mut [Segment::new(&ids[len - 1..], &mut cache)], 1, &[state]).unwrap();
            cache
        };
        let (ka, km) = (fill(&pa), fill(&pm));
        prop_assert_eq!(ka.len(), len);
        prop_assert!(same_slots(&ka, &km) < 1e-4);
        // And the adapters change the output: the test can fail.
        let plain = lower(&g, dir.path());
        let lp = step(&plain, &ids, &mut plain.new_cache());
        prop_assert!(max_diff(&la, &lp) > 1e-4);
    }
}

/// A program holds each checkpoint tensor once, tied or not: an LM head tied to the
/// embedding reads the embedding's matrix (no transposed copy of it), and the fused q/k/v and
/// gate/up matrices replace their parts.
#[test]
fn a_program_holds_each_checkpoint_tensor_once_tied_or_not() {
    for tie in [false, true] {
        let mut s = spec("llama", 2, 2);
        s.tie_embeddings = tie;
        let dir = tempfile::tempdir().unwrap();
        write_random_llama(dir.path(), &s, 3).unwrap();
        let g = exitgraph_ir::import(dir.path()).unwrap().graph;
        let file_bytes: usize = load(dir.path()).values().map(|t| t.elem_count() * 4).sum();
        // The tied checkpoint stores no LM head of its own.
        assert_eq!(
            load(dir.path()).contains_key("lm_head.weight"),
            !tie,
            "tied: {tie}"
        );
        assert_eq!(
            lower(&g, dir.path()).weight_bytes(),
            file_bytes,
            "tied: {tie}"
        );
    }
}
