#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Adaptive depth in the runtime, on random small models (proptest):
//! - an exit rule that never fires gives exactly the model without exits;
//! - `Oracle` gives the full model's greedy tokens;
//! - SkipDecode with max = min = all layers gives the full model;
//! - batched and unbatched runs (every policy, depth-wise included) give each sequence the
//!   same tokens and exit layers;
//! - a token that always exits at layer k continues exactly like the model truncated to k
//!   layers (an independent reference: `TruncateLayers` + the shared head).

use candle_core::{DType, Device};
use exitgraph::exits::{Depth, ExitRule, SkipDecode};
use exitgraph::generate::{generate, GenerateOptions};
use exitgraph::lower::Program;
use exitgraph::runtime::policy::Batching;
use exitgraph::runtime::workload::RequestSpec;
use exitgraph::runtime::{Decoding, Executor, Runtime};
use exitgraph::synth::{write_random_llama, LlamaSpec};
use exitgraph_passes::{HeadKind, InsertExits, Pass, TruncateLayers};
use proptest::prelude::*;
use std::path::Path;
use std::sync::Arc;

fn spec(layers: usize) -> LlamaSpec {
    let mut s = LlamaSpec::tiny();
    s.layers = layers;
    s
}

fn graph(dir: &Path, layers: usize, seed: u64) -> exitgraph_ir::Graph {
    write_random_llama(dir, &spec(layers), seed).unwrap();
    exitgraph_ir::import(dir).unwrap().graph
}

fn with_exits(g: &exitgraph_ir::Graph, points: &[usize]) -> exitgraph_ir::Graph {
    let mut h = g.clone();
    InsertExits {
        after: points.to_vec(),
        every: None,
        head: HeadKind::SharedLmHead { norm: true },
        gate: false,
    }
    .run(&mut h)
    .unwrap();
    h
}

fn lower(g: &exitgraph_ir::Graph, dir: &Path) -> Arc<Program> {
    Arc::new(Program::lower(g, dir, &Device::Cpu, DType::F32).unwrap())
}

fn prompts(seed: u64, n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..1 + (seed as usize + i * 3) % 7)
                .map(|j| ((seed as usize + i * 31 + j * 7) % 97) as u32)
                .collect()
        })
        .collect()
}

/// Runs `prompts` with `depth` under `batching`; tokens and exit layers per request.
fn serve(
    p: &Arc<Program>,
    prompts: &[Vec<u32>],
    new: usize,
    batching: Batching,
    depth: &Depth,
) -> Vec<(Vec<u32>, Vec<u16>)> {
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(id, pr)| RequestSpec {
            id,
            arrival_s: 0.0,
            prompt: pr.clone(),
            max_new_tokens: new,
            forced: Vec::new(),
        })
        .collect();
    let (_, outcomes) = Runtime::new(
        p.clone(),
        batching,
        Executor::Real,
        Decoding::greedy(),
        requests,
        None,
    )
    .with_depth(depth.clone())
    .unwrap()
    .run()
    .unwrap();
    outcomes
        .into_iter()
        .map(|o| (o.tokens, o.stats.iter().map(|s| s.exit_layer).collect()))
        .collect()
}

fn greedy(p: &Program, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut opts = GenerateOptions::greedy(n);
    opts.stop_at_eos = false;
    generate(p, &[prompt.to_vec()], &opts).unwrap().remove(0)[prompt.len()..].to_vec()
}

fn points(layers: usize, mask: u32) -> Vec<usize> {
    (1..layers).filter(|k| mask & (1 << (k - 1)) != 0).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn a_rule_that_never_fires_changes_nothing(seed in any::<u64>(), layers in 2usize..6, mask in 1u32..32, never in prop_oneof![Just(ExitRule::Never), Just(ExitRule::Confidence(1.0)), Just(ExitRule::Patience(99))]) {
        let dir = tempfile::tempdir().unwrap();
        let g = graph(dir.path(), layers, seed);
        let pts = points(layers, mask);
        prop_assume!(!pts.is_empty());
        let plain = lower(&g, dir.path());
        let p = lower(&with_exits(&g, &pts), dir.path());
        let prs = prompts(seed, 3);
        let got = serve(&p, &prs, 6, Batching::Static { max_batch: 3 }, &Depth::EarlyExit { rule: never });
        for (pr, (tokens, exits)) in prs.iter().zip(got) {
            prop_assert_eq!(tokens, greedy(&plain, pr, 6));
            prop_assert!(exits.iter().all(|&e| e as usize == layers));
        }
    }

    #[test]
    fn the_oracle_decodes_the_full_models_tokens(seed in any::<u64>(), layers in 2usize..6, mask in 1u32..32) {
        let dir = tempfile::tempdir().unwrap();
        let g = graph(dir.path(), layers, seed);
        let pts = points(layers, mask);
        prop_assume!(!pts.is_empty());
        let plain = lower(&g, dir.path());
        let p = lower(&with_exits(&g, &pts), dir.path());
        let prs = prompts(seed, 3);
        let got = serve(&p, &prs, 6, Batching::Continuous { max_batch: 2, token_budget: 64 }, &Depth::EarlyExit { rule: ExitRule::Oracle });
        for (pr, (tokens, exits)) in prs.iter().zip(got) {
            prop_assert_eq!(tokens, greedy(&plain, pr, 6));
            prop_assert!(exits.iter().all(|e| *e as usize == layers || pts.contains(&(*e as usize))));
        }
    }

    #[test]
    fn skipdecode_at_full_depth_is_the_full_model(seed in any::<u64>(), layers in 2usize..6) {
        let dir = tempfile::tempdir().unwrap();
        let g = graph(dir.path(), layers, seed);
        let p = lower(&g, dir.path());
        let prs = prompts(seed, 3);
        let depth = Depth::SkipDecode(SkipDecode { max_layers: layers, min_layers: layers, warmup: 1 });
        let got = serve(&p, &prs, 6, Batching::Static { max_batch: 3 }, &depth);
        for (pr, (tokens, _)) in prs.iter().zip(got) {
            prop_assert_eq!(tokens, greedy(&p, pr, 6));
        }
    }

    #[test]
    fn batching_never_changes_a_sequences_tokens(
        seed in any::<u64>(),
        layers in 3usize..6,
        mask in 1u32..32,
        threshold in 0.0f64..0.2,
        policy in prop_oneof![
            (1usize..4).prop_map(|m| Batching::Static { max_batch: m }),
            (1usize..4).prop_map(|m| Batching::Continuous { max_batch: m, token_budget: 24 }),
            (1usize..4, 1usize..4).prop_map(|(m, s)| Batching::DepthWise { max_batch: m, stages: s }),
        ],
        skip in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let g = graph(dir.path(), layers, seed);
        let pts = points(layers, mask);
        prop_assume!(!pts.is_empty());
        let p = lower(&with_exits(&g, &pts), dir.path());
        let depth = if skip && !matches!(policy, Batching::DepthWise { .. }) {
            Depth::SkipDecode(SkipDecode { max_layers: layers, min_layers: 2, warmup: 1 })
        } else {
            Depth::EarlyExit { rule: ExitRule::Margin(threshold) }
        };
        let prs = prompts(seed, 4);
        let together = serve(&p, &prs, 5, policy, &depth);
        for (i, pr) in prs.iter().enumerate() {
            let alone = serve(&p, std::slice::from_ref(pr), 5, Batching::Static { max_batch: 1 }, &depth);
            prop_assert_eq!(&together[i], &alone[0], "request {}", i);
        }
    }

    #[test]
    fn always_exiting_at_k_continues_like_the_model_cut_at_k(seed in any::<u64>(), layers in 2usize..6, k_frac in 0.0f64..1.0) {
        let dir = tempfile::tempdir().unwrap();
        let g = graph(dir.path(), layers, seed);
        let k = 1 + ((k_frac * (layers - 1) as f64) as usize).min(layers - 2);
        let full = lower(&g, dir.path());
        let p = lower(&with_exits(&g, &[k]), dir.path());
        let mut cut = g.clone();
        TruncateLayers { keep: k }.run(&mut cut).unwrap();
        let cut = lower(&cut, dir.path());
        let prs = prompts(seed, 2);
        let got = serve(&p, &prs, 5, Batching::Static { max_batch: 2 }, &Depth::EarlyExit { rule: ExitRule::Confidence(0.0) });
        for (pr, (tokens, exits)) in prs.iter().zip(got) {
            // The prompt runs the whole model; every later token exits at k.
            let first = greedy(&full, pr, 1)[0];
            let mut context = pr.clone();
            context.push(first);
            let mut want = vec![first];
            want.extend(greedy(&cut, &context, 4));
            prop_assert_eq!(tokens, want);
            prop_assert_eq!(exits[0] as usize, layers);
            prop_assert!(exits[1..].iter().all(|&e| e as usize == k));
        }
    }
}
