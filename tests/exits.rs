#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Adaptive depth in the runtime, on random small models (proptest):
//! - an exit rule that never fires gives exactly the model without exits;
//! - `Oracle` gives the full model's greedy tokens;
//! - SkipDecode with max = min = all layers gives the full model;
//! - batched and unbatched runs (every policy, depth-wise included) give each sequence the
//!   same tokens and exit layers;
//! - a token that always exits at layer k continues exactly like the model truncated to k
//!   layers (an independent reference: `TruncateLayers` + the shared head).

use candle_core::Tensor;
use candle_core::{DType, Device};
use exitgraph::exits::{Depth, ExitRule, SkipDecode};
use exitgraph::generate::{generate, GenerateOptions};
use exitgraph::lower::{Program, Run, Segment, Task, Want};
use exitgraph::runtime::policy::Batching;
use exitgraph::runtime::workload::RequestSpec;
use exitgraph::runtime::{Decoding, Executor, Runtime};
use exitgraph::synth::{write_random_llama, LlamaSpec};
use exitgraph_passes::{HeadKind, InsertExits, Pass, PassContext, TruncateLayers};
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
        weights: None,
    }
    .run(&mut h, &PassContext::detached())
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
            depth: None,
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

/// What the token at one position ran, for the layer-major reference.
#[derive(Clone, Debug, PartialEq)]
enum Ran {
    /// Every layer.
    Full,
    /// These layers; the others are bypassed (no keys or values written there).
    Layers(Vec<usize>),
    /// Layers below `k`, then stopped at the exit after `k`: every layer from `k` on gets
    /// keys and values computed from the exit state (CALM's state copying).
    Exit(usize),
}

fn to_rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

/// One program call from depth `from` on a fresh cache: `ids` at positions `0..`, entering
/// with `state` (one row per token), returning the wanted node at every position.
fn call(
    p: &Program,
    ids: &[u32],
    from: usize,
    state: Option<Vec<Vec<f32>>>,
    want: Want,
) -> Vec<Vec<f32>> {
    let mut cache = p.new_cache();
    let hidden = p.graph().info.hidden;
    let state = state.map(|rows| {
        let flat: Vec<f32> = rows.concat();
        Tensor::from_vec(flat, (rows.len(), hidden), &Device::Cpu).unwrap()
    });
    let mut seg = [Segment {
        ids,
        start: 0,
        state,
        cache: &mut cache,
    }];
    let run = Run {
        from,
        task: Task::Outputs(vec![want]),
        commit: true,
    };
    let out = p.run(&mut seg, &run).unwrap().remove(0).remove(0);
    let out = if out.rank() == 3 {
        out.squeeze(0).unwrap()
    } else {
        out
    };
    to_rows(&out)
}

/// The logits the last position's producing head gives, recomputed layer by layer over the
/// whole sequence with no KV cache: at layer `l` the positions that run it, or write its keys
/// and values from an exit state, attend to each other causally; they must be a prefix of
/// the sequence (true of SkipDecode's decaying schedule and of exits, which write every
/// layer). Independent of the runtime's batching, cache reuse and scheduling.
fn reference_logits(p: &Program, ids: &[u32], ran: &[Ran]) -> Vec<f32> {
    reference(p, ids, ran).1
}

/// [`reference_logits`], with the last position's residual stream after every depth
/// (0 = the embeddings).
fn reference(p: &Program, ids: &[u32], ran: &[Ran]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let layers = p.graph().info.num_layers;
    let n = ids.len();
    let mut state = call(p, ids, 0, None, Want::all(p.stream_node(0).unwrap()));
    let mut last_states = vec![state[n - 1].clone()];
    for l in 0..layers {
        let runs = |r: &Ran| match r {
            Ran::Full => true,
            Ran::Layers(set) => set.contains(&l),
            Ran::Exit(k) => l < *k,
        };
        let present: Vec<bool> = ran
            .iter()
            .map(|r| runs(r) || matches!(r, Ran::Exit(k) if l >= *k))
            .collect();
        let q = present.iter().take_while(|&&x| x).count();
        assert!(
            present[q..].iter().all(|&x| !x),
            "layer {l}: the positions present must be a prefix"
        );
        if q == 0 {
            last_states.push(state[n - 1].clone());
            continue;
        }
        let out = call(
            p,
            &ids[..q],
            l,
            Some(state[..q].to_vec()),
            Want::all(p.stream_node(l + 1).unwrap()),
        );
        for (i, row) in out.into_iter().enumerate() {
            if runs(&ran[i]) {
                state[i] = row;
            }
        }
        last_states.push(state[n - 1].clone());
    }
    let last = n - 1;
    let (from, node) = match ran[last] {
        Ran::Exit(k) => (k, p.graph().exit_at(k).and_then(|e| e.logits).unwrap()),
        _ => (layers, p.logits_node().unwrap()),
    };
    let logits = call(
        p,
        &ids[last..],
        from,
        Some(vec![state[last].clone()]),
        Want::last(node),
    )
    .remove(0);
    (last_states, logits)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0 as u32
}

/// SkipDecode's layers for the token at `pos`, from the paper's formula written out here
/// (not the library's): n = round(max - (max - min) * min(pos, L - 1) / (L - 1)), the warm-up
/// layers then the top n - warmup.
fn skip_layers(
    layers: usize,
    max: usize,
    min: usize,
    warmup: usize,
    length: usize,
    pos: usize,
) -> Vec<usize> {
    let frac = pos.min(length - 1) as f64 / (length - 1) as f64;
    let n = (max as f64 - (max - min) as f64 * frac).round() as usize;
    (0..warmup).chain(layers - (n - warmup)..layers).collect()
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
    fn the_oracle_exits_where_an_independent_computation_says(seed in any::<u64>(), layers in 2usize..6, mask in 1u32..32) {
        let dir = tempfile::tempdir().unwrap();
        let g = graph(dir.path(), layers, seed);
        let pts = points(layers, mask);
        prop_assume!(!pts.is_empty());
        let plain = lower(&g, dir.path());
        let p = lower(&with_exits(&g, &pts), dir.path());
        let prs = prompts(seed, 3);
        let got = serve(&p, &prs, 6, Batching::Continuous { max_batch: 2, token_budget: 64 }, &Depth::EarlyExit { rule: ExitRule::Oracle });
        for (pr, (tokens, exits)) in prs.iter().zip(got) {
            let full = greedy(&plain, pr, 6);
            prop_assert_eq!(&tokens, &full);
            // Every exit head over the whole full-model sequence in one cache-free call: the
            // oracle's exit for generated token i is the first exit whose top token at the
            // position that produced it equals the full model's.
            let seq: Vec<u32> = pr.iter().chain(&full).copied().collect();
            let heads: Vec<(usize, Vec<Vec<f32>>)> = pts
                .iter()
                .map(|&k| {
                    let node = p.graph().exit_at(k).and_then(|e| e.logits).unwrap();
                    (k, call(&p, &seq, 0, None, Want::all(node)))
                })
                .collect();
            prop_assert_eq!(exits[0] as usize, layers, "the first token comes from the prompt's pass");
            for i in 1..full.len() {
                let pos = pr.len() + i - 1;
                let want = heads
                    .iter()
                    .find(|(_, rows)| argmax(&rows[pos]) == full[i])
                    .map_or(layers, |(k, _)| *k);
                prop_assert_eq!(exits[i] as usize, want, "token {}", i);
            }
        }
    }

    #[test]
    fn skipdecode_skips_as_a_layer_major_reference_does(
        seed in any::<u64>(),
        layers in 3usize..6,
        min_frac in 0.0f64..1.0,
        length in 4usize..12,
        continuous in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let g = graph(dir.path(), layers, seed);
        let p = lower(&g, dir.path());
        let min = 2 + ((min_frac * (layers - 2) as f64) as usize).min(layers - 3);
        let schedule = SkipDecode { max_layers: layers, min_layers: min, warmup: 1, max_length: Some(length) };
        let prs = prompts(seed, 3);
        let new = 6;
        let batching = if continuous {
            Batching::Continuous { max_batch: 3, token_budget: 64 }
        } else {
            Batching::Static { max_batch: 3 }
        };
        let got = serve(&p, &prs, new, batching, &Depth::SkipDecode(schedule));
        let mut skipped = 0;
        for (pr, (tokens, ran)) in prs.iter().zip(got) {
            // Greedy decoding, each step recomputed from scratch layer by layer.
            let mut seq = pr.clone();
            let mut plan: Vec<Ran> = vec![Ran::Full; pr.len()];
            let mut want = Vec::new();
            for _ in 0..new {
                let t = argmax(&reference_logits(&p, &seq, &plan));
                want.push(t);
                let pos = seq.len();
                seq.push(t);
                let path = skip_layers(layers, layers, min, 1, length, pos);
                plan.push(if path.len() == layers { Ran::Full } else { Ran::Layers(path) });
            }
            prop_assert_eq!(&tokens, &want);
            for (i, &r) in ran.iter().enumerate().skip(1) {
                let pos = pr.len() + i - 1;
                prop_assert_eq!(r as usize, skip_layers(layers, layers, min, 1, length, pos).len());
                skipped += usize::from((r as usize) < layers);
            }
        }
        prop_assert!(skipped > 0, "some token ran fewer layers");
    }

    #[test]
    fn skipdecode_at_full_depth_is_the_full_model(seed in any::<u64>(), layers in 2usize..6) {
        let dir = tempfile::tempdir().unwrap();
        let g = graph(dir.path(), layers, seed);
        let p = lower(&g, dir.path());
        let prs = prompts(seed, 3);
        let depth = Depth::SkipDecode(SkipDecode { max_layers: layers, min_layers: layers, warmup: 1, max_length: None });
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
            Depth::SkipDecode(SkipDecode { max_layers: layers, min_layers: 2, warmup: 1, max_length: Some(12) })
        } else {
            Depth::EarlyExit { rule: ExitRule::Margin(threshold) }
        };
        // Every third request always exits at the first exit point, so exits happen in the
        // batch whatever the threshold; every third follows the Margin rule.
        let own = |i: usize| match i % 3 {
            0 => Some(Depth::EarlyExit { rule: ExitRule::Confidence(0.0) }),
            1 => Some(Depth::EarlyExit { rule: ExitRule::Margin(threshold) }),
            _ => None,
        };
        let prs = prompts(seed, 5);
        let run = |ids: &[usize], batching: Batching| -> Vec<(Vec<u32>, Vec<u16>)> {
            let requests = ids
                .iter()
                .map(|&i| RequestSpec {
                    id: i,
                    arrival_s: 0.0,
                    prompt: prs[i].clone(),
                    max_new_tokens: 5,
                    forced: Vec::new(),
                    depth: own(i),
                })
                .collect();
            let (_, outcomes) = Runtime::new(p.clone(), batching, Executor::Real, Decoding::greedy(), requests, None)
                .with_depth(depth.clone())
                .unwrap()
                .run()
                .unwrap();
            outcomes
                .into_iter()
                .map(|o| (o.tokens, o.stats.iter().map(|s| s.exit_layer).collect()))
                .collect()
        };
        let all: Vec<usize> = (0..prs.len()).collect();
        let together = run(&all, policy);
        let exited: usize = together
            .iter()
            .map(|(_, e)| e.iter().filter(|&&l| (l as usize) < layers).count())
            .sum();
        prop_assert!(exited > 0, "tokens exited in the batch");
        for i in all {
            let alone = run(&[i], Batching::Static { max_batch: 1 });
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
        TruncateLayers { keep: k }.run(&mut cut, &PassContext::detached()).unwrap();
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

/// CALM's state copying, end to end in the runtime: with a threshold that lets some tokens
/// exit and not others, every token (exited or not) equals the layer-major reference in which
/// each exited token's skipped layers hold keys and values computed from its exit state — so
/// the full-depth tokens after an exit read those copied keys and values.
#[test]
fn tokens_after_an_exit_read_the_copied_keys_and_values() {
    let mut mixed_cases = 0;
    for seed in 0..6u64 {
        let dir = tempfile::tempdir().unwrap();
        let layers = 4;
        let g = graph(dir.path(), layers, seed);
        let pts = [1, 2];
        let p = lower(&with_exits(&g, &pts), dir.path());
        let prs = prompts(seed, 2);
        let new = 8;
        // The threshold that gives the most mixed pattern: an exit followed by a full-depth
        // token, so copied keys and values are read.
        let mut best: Option<Vec<(Vec<u32>, Vec<u16>)>> = None;
        for t in [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05] {
            let got = serve(
                &p,
                &prs,
                new,
                Batching::Static { max_batch: 2 },
                &Depth::EarlyExit {
                    rule: ExitRule::Margin(t),
                },
            );
            let mixed = got.iter().any(|(_, e)| {
                e.iter()
                    .skip(1)
                    .position(|&l| (l as usize) < layers)
                    .is_some_and(|i| e[i + 2..].iter().any(|&l| l as usize == layers))
            });
            if mixed {
                best = Some(got);
                break;
            }
        }
        let Some(got) = best else { continue };
        mixed_cases += 1;
        for (pr, (tokens, exits)) in prs.iter().zip(got) {
            let mut seq = pr.clone();
            let mut plan: Vec<Ran> = vec![Ran::Full; pr.len()];
            for (i, &t) in tokens.iter().enumerate() {
                // Token i came from the position before it, run as the runtime recorded.
                if i > 0 {
                    let k = exits[i] as usize;
                    let last = plan.len() - 1;
                    plan[last] = if k < layers { Ran::Exit(k) } else { Ran::Full };
                }
                assert_eq!(
                    argmax(&reference_logits(&p, &seq, &plan)),
                    t,
                    "seed {seed}, token {i}"
                );
                seq.push(t);
                plan.push(Ran::Full);
            }
        }
    }
    assert!(
        mixed_cases >= 2,
        "only {mixed_cases} seeds mixed exits and full-depth tokens"
    );
}

/// Saturation compares consecutive layers: with an exit after every layer, a token stops at
/// the first exit `k` where cos(h_k, h_{k−1}) reaches the threshold, the states computed by
/// the layer-major reference. Checked under static batching and under depth-wise batching
/// with one layer per stage (each stage starts one layer below its exit).
#[test]
fn saturation_compares_each_exit_with_the_layer_below() {
    let mut exits_seen = 0;
    for seed in 0..4u64 {
        let dir = tempfile::tempdir().unwrap();
        let layers = 4;
        let g = graph(dir.path(), layers, seed);
        let pts: Vec<usize> = (1..layers).collect();
        let p = lower(&with_exits(&g, &pts), dir.path());
        let prs = prompts(seed, 2);
        // A threshold at the median cosine between consecutive layers at the prompts' last
        // positions, so that some tokens exit and some do not.
        let mut cosines = Vec::new();
        for pr in &prs {
            let (st, _) = reference(&p, pr, &vec![Ran::Full; pr.len()]);
            cosines.extend((1..layers).map(|k| cosine(&st[k], &st[k - 1])));
        }
        cosines.sort_by(f64::total_cmp);
        let t = cosines[cosines.len() / 2];
        let rule = ExitRule::Saturation(t);
        for batching in [
            Batching::Static { max_batch: 2 },
            Batching::DepthWise {
                max_batch: 2,
                stages: layers,
            },
        ] {
            let got = serve(
                &p,
                &prs,
                5,
                batching.clone(),
                &Depth::EarlyExit { rule: rule.clone() },
            );
            for (pr, (tokens, exits)) in prs.iter().zip(&got) {
                let mut seq = pr.clone();
                let mut plan: Vec<Ran> = vec![Ran::Full; pr.len()];
                for (i, &tok) in tokens.iter().enumerate() {
                    if i > 0 {
                        let (st, _) = reference(&p, &seq, &plan);
                        let want = pts
                            .iter()
                            .copied()
                            .find(|&k| cosine(&st[k], &st[k - 1]) >= t)
                            .unwrap_or(layers);
                        assert_eq!(
                            exits[i] as usize, want,
                            "seed {seed}, token {i}, {batching:?}"
                        );
                        exits_seen += usize::from(want < layers);
                        let last = plan.len() - 1;
                        plan[last] = if want < layers {
                            Ran::Exit(want)
                        } else {
                            Ran::Full
                        };
                    }
                    assert_eq!(
                        argmax(&reference_logits(&p, &seq, &plan)),
                        tok,
                        "seed {seed}, token {i}"
                    );
                    seq.push(tok);
                    plan.push(Ran::Full);
                }
            }
        }
    }
    assert!(exits_seen > 0, "some token exited on saturation");
}

/// MiniLM (weights fetched by scripts/fetch-minilm.sh) with exits after layers 2..=5.
fn minilm() -> (exitgraph_ir::Graph, Arc<Program>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/minilm-l6/model");
    assert!(
        dir.join("model.safetensors").exists(),
        "MiniLM weights missing: run scripts/fetch-minilm.sh"
    );
    let g = exitgraph_ir::import(&dir).unwrap().graph;
    let h = with_exits(&g, &[2, 3, 4, 5]);
    let p = lower(&h, &dir);
    (h, p)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn encoder_exits_match_full_and_shallow_embeddings_and_ignore_the_batch() {
    use exitgraph::exits::encoder::embed_with_exits;
    use exitgraph::lower::Inputs;
    let (_, p) = minilm();
    let rows: Vec<Vec<u32>> = vec![
        vec![101, 1037, 2158, 2003, 2652, 1037, 6490, 1012, 102],
        vec![101, 7592, 102],
        vec![101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 102],
    ];
    let len = 9;
    let ids: Vec<u32> = rows
        .iter()
        .flat_map(|r| (0..len).map(|i| r.get(i).copied().unwrap_or(0)))
        .collect();
    let mask: Vec<u32> = rows
        .iter()
        .flat_map(|r| (0..len).map(|i| u32::from(i < r.len())))
        .collect();
    let inputs = Inputs {
        input_ids: candle_core::Tensor::from_vec(ids, (3, len), &Device::Cpu).unwrap(),
        attention_mask: Some(candle_core::Tensor::from_vec(mask, (3, len), &Device::Cpu).unwrap()),
        token_type_ids: None,
        example_ids: None,
    };
    let out = p
        .forward(
            &inputs,
            &mut p.new_cache(),
            &["sentence_embedding", "exit.2.sentence_embedding"],
            false,
        )
        .unwrap();
    let full = out["sentence_embedding"].to_vec2::<f32>().unwrap();
    let shallow = out["exit.2.sentence_embedding"].to_vec2::<f32>().unwrap();
    // Never exiting: the model's own embeddings.
    let never = embed_with_exits(&p, &rows, 0, &ExitRule::Never).unwrap();
    for (e, f) in never.iter().zip(&full) {
        assert_eq!(e.exit_layer, 6);
        assert!(max_diff(&e.embedding, f) < 1e-5);
        assert_eq!(e.signals.len(), 4);
    }
    // Always exiting: the first exit's pooled state.
    let always = embed_with_exits(&p, &rows, 0, &ExitRule::Saturation(-1.0)).unwrap();
    for (e, s) in always.iter().zip(&shallow) {
        assert_eq!(e.exit_layer, 2);
        assert!(max_diff(&e.embedding, s) < 1e-5);
    }
    // A threshold between: each sample's result equals its run alone.
    let rule = ExitRule::Saturation(0.85);
    let together = embed_with_exits(&p, &rows, 0, &rule).unwrap();
    let layers: Vec<usize> = together.iter().map(|e| e.exit_layer).collect();
    assert!(
        layers.iter().any(|&l| l < 6),
        "someone exits early: {layers:?}"
    );
    for (r, t) in rows.iter().zip(&together) {
        let alone = embed_with_exits(&p, std::slice::from_ref(r), 0, &rule).unwrap();
        assert_eq!(alone[0].exit_layer, t.exit_layer);
        assert!(max_diff(&alone[0].embedding, &t.embedding) < 1e-4);
    }
    assert!(embed_with_exits(&p, &rows, 0, &ExitRule::Confidence(0.5)).is_err());
}

/// `train exits` on the demo model: heads start as the shared head, the distillation loss
/// falls, only head tensors are saved, and the written pipeline runs with the trained gates.
#[test]
fn exit_heads_train_and_the_written_pipeline_runs() {
    use exitgraph::exits::train::{train_exits, ExitTrainSpec};
    use exitgraph::pipeline::{compile, Pipeline};
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("p.ron");
    let demo = exitgraph::pipeline::demo_model_dir();
    std::fs::write(
        &pipeline,
        format!(
            "Pipeline(model: {:?}, passes: [InsertExits(after: [2], head: Linear, gate: true)], runtime: (depth: EarlyExit(rule: Gate(0.5))))",
            demo.display().to_string()
        ),
    )
    .unwrap();
    let spec = ExitTrainSpec {
        tasks: Vec::new(),
        examples: 200,
        seed: 3,
        seq_len: 32,
        batch_size: 4,
        distill: 1.0,
        train_adapters: false,
        train_shared: false,
        objective: Default::default(),
        training: exitgraph::train::TrainConfig {
            steps: 16,
            grad_accum: 1,
            lr: 3e-3,
            min_lr: 3e-3,
            warmup_steps: 0,
            adamw: None,
            clip_norm: Some(1.0),
            eval_every: 8,
            checkpoint_every: 0,
        },
    };
    let out = dir.path().join("out");
    let report = train_exits(&pipeline, &out, &spec, false).unwrap();
    let evals: Vec<f64> = report.log.eval_loss.iter().map(|e| e.1).collect();
    assert!(
        evals.len() >= 2 && evals.last() < evals.first(),
        "{evals:?}"
    );
    let saved = candle_core::safetensors::load(&report.heads, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = saved.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "exits.2.gate.bias",
            "exits.2.gate.weight",
            "exits.2.head.weight",
            "exits.2.norm.weight"
        ]
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
    let p = Pipeline::read(&report.pipeline).unwrap();
    let compiled = compile(&p, &report.pipeline).unwrap();
    let program = Arc::new(compiled.lower().unwrap());
    let got = serve(
        &program,
        &prompts(1, 2),
        4,
        Batching::Static { max_batch: 2 },
        &p.runtime.depth,
    );
    assert_eq!(got.len(), 2);
}

/// State copying writes, at every skipped layer `j`, the keys and values that layer computes
/// when the exit hidden state is its input (checked against running layers `j..` from it).
#[test]
fn state_copying_writes_each_skipped_layers_keys_from_the_exit_state() {
    use exitgraph::lower::{Segment, StageOutput};
    let dir = tempfile::tempdir().unwrap();
    let g = graph(dir.path(), 5, 11);
    let p = lower(&g, dir.path());
    let prompt: Vec<u32> = vec![3, 14, 15, 92, 65];
    let k = 2;
    // Prefill, then run the next token through layers 0..k only.
    let mut cache = p.new_cache();
    p.forward_ragged(&mut [Segment::new(&prompt, &mut cache)])
        .unwrap();
    let next = [35u32];
    let mut after_prompt = cache.clone();
    let StageOutput::Hidden(h) = p
        .forward_stage(&mut [Segment::new(&next, &mut after_prompt)], 0..k, None)
        .unwrap()
    else {
        panic!("hidden states expected")
    };
    let mut filled = after_prompt.clone();
    p.fill_kv(&mut [Segment::new(&next, &mut filled)], k, &h)
        .unwrap();
    assert_eq!(filled.len(), prompt.len() + 1);
    for j in k..5 {
        // Layers j.. from the exit state, on a cache holding the prompt and layers 0..j.
        let mut reference = after_prompt.clone();
        p.forward_stage(&mut [Segment::new(&next, &mut reference)], j..5, Some(&h))
            .unwrap();
        let (fk, fv) = filled.slot(j).unwrap();
        let (rk, rv) = reference.slot(j).unwrap();
        for (a, b) in [(fk, rk), (fv, rv)] {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "layer {j}: keys/values differ by {d}");
        }
    }
}

/// Depth strategies are per request: in one batch, a request with its own early-exit plan
/// stops at the first exit, a request following the runtime's full depth runs every layer and
/// a SkipDecode request follows its schedule; each gets what it would get alone.
#[test]
fn requests_follow_their_own_depth_plans_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let g = with_exits(&graph(dir.path(), 4, 5), &[1, 2]);
    let p = lower(&g, dir.path());
    let prompt: Vec<u32> = vec![11, 22, 33];
    let always = Depth::EarlyExit {
        rule: ExitRule::Confidence(0.0),
    };
    let skip = Depth::SkipDecode(SkipDecode {
        max_layers: 4,
        min_layers: 2,
        warmup: 1,
        max_length: Some(8),
    });
    let request = |id: usize, depth: Option<Depth>| RequestSpec {
        id,
        arrival_s: 0.0,
        prompt: prompt.clone(),
        max_new_tokens: 5,
        forced: Vec::new(),
        depth,
    };
    let (_, outcomes) = Runtime::new(
        p.clone(),
        Batching::Static { max_batch: 3 },
        Executor::Real,
        Decoding::greedy(),
        vec![
            request(0, Some(always.clone())),
            request(1, None),
            request(2, Some(skip.clone())),
        ],
        None,
    )
    .run()
    .unwrap();
    let exits: Vec<Vec<u16>> = outcomes
        .iter()
        .map(|o| o.stats.iter().map(|s| s.exit_layer).collect())
        .collect();
    // The prompt's token comes from the full model; every later token of request 0 stops at
    // the first exit, request 1's run all 4 layers.
    assert_eq!(exits[0], vec![4, 1, 1, 1, 1]);
    assert_eq!(exits[1], vec![4; 5]);
    // Who produced each token, for costing: the model's head, or the exit head.
    let final_head = |o: &exitgraph::runtime::metrics::RequestOutcome| -> Vec<bool> {
        o.stats.iter().map(|s| s.final_head).collect()
    };
    assert_eq!(
        final_head(&outcomes[0]),
        vec![true, false, false, false, false]
    );
    assert_eq!(final_head(&outcomes[1]), vec![true; 5]);
    // The SkipDecode request: the prompt's pass gives the first token (4 layers); the token at
    // position p runs round(4 - 2p/7) layers: positions 3, 4, 5, 6 give 3, 3, 3, 2. Every token
    // comes from the model's own head.
    assert_eq!(exits[2], vec![4, 3, 3, 3, 2]);
    assert_eq!(final_head(&outcomes[2]), vec![true; 5]);
    let alone_skip = serve(
        &p,
        std::slice::from_ref(&prompt),
        5,
        Batching::Static { max_batch: 1 },
        &skip,
    );
    assert_eq!(outcomes[2].tokens, alone_skip[0].0);
    assert_eq!(outcomes[1].tokens, greedy(&p, &prompt, 5));
    let alone = serve(
        &p,
        std::slice::from_ref(&prompt),
        5,
        Batching::Static { max_batch: 1 },
        &always,
    );
    assert_eq!(outcomes[0].tokens, alone[0].0);
    assert_eq!(exits[0], alone[0].1);
}
