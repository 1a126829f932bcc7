#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The keys and values of the layers an early-exiting token skipped, filled (CALM's state
//! copying) or absent (recursion-wise caching: later tokens attend in those layers only to
//! the positions that reached them):
//! - against a reference written with PyTorch from the methods' descriptions
//!   (`scripts/make_absent_kv_fixture.py`: the tiny Llama, exits after layers 2 and 4, a
//!   given depth per generated token), by `Program::run` with `Task::AbsentKv` /
//!   `Task::FillKv` and by the real runtime with replayed exit depths, in both modes;
//! - invariant (proptest, random flat and looped models, random exit depths): under every
//!   batching policy each request gets, with absent keys and values, exactly the tokens it
//!   gets served alone, which equal a decode by hand with `Task::AbsentKv` at the drawn
//!   depths, and every token leaves at its drawn depth;
//! - a slot with absent positions refuses what it cannot serve: several tokens per call,
//!   rollback.

use candle_core::{DType, Device, Tensor};
use exitgraph::exits::Depth;
use exitgraph::lower::{KvCache, Positions, Program, Run, Segment, Task, Want};
use exitgraph::runtime::metrics::RequestOutcome;
use exitgraph::runtime::policy::{Batching, Priority};
use exitgraph::runtime::sim_exits::{ExitSource, SimulatedExits, SkippedKv};
use exitgraph::runtime::trace::TraceRecord;
use exitgraph::runtime::workload::{Arrivals, Length, RequestSpec, Workload};
use exitgraph::runtime::{Decoding, Executor, Runtime};
use exitgraph::synth::{write_random_llama, LlamaSpec};
use exitgraph_passes::{
    DepthLora, HeadKind, InsertExits, LoraInit, LoraRank, LoraTarget, Pass, PassContext,
    PassManager, TieInit, TieLayers, TieNorms,
};
use proptest::prelude::*;
use std::path::Path;
use std::sync::Arc;

#[path = "common/device.rs"]
#[allow(dead_code)]
mod device;

fn shared_exits(after: Vec<usize>) -> InsertExits {
    InsertExits {
        after,
        every: None,
        head: HeadKind::SharedLmHead { norm: true },
        gate: false,
        weights: None,
    }
}

/// The reference case: the tiny Llama with shared exit heads after layers 2 and 4, the
/// fixture's tensors, its prompt and the depth of each generated token's pass.
type Case = std::collections::HashMap<String, Tensor>;
fn reference() -> (Arc<Program>, Case, Vec<u32>, Vec<usize>) {
    let root = device::fixtures();
    let model = root.join("tiny-llama");
    let mut g = exitgraph_ir::import(&model).unwrap().graph;
    shared_exits(vec![2, 4])
        .run(&mut g, &PassContext::detached())
        .unwrap();
    let p = Program::lower(&g, &model, &Device::Cpu, DType::F32).unwrap();
    let case =
        candle_core::safetensors::load(root.join("absent-kv/case.safetensors"), &Device::Cpu)
            .unwrap();
    let prompt = ids_of(&case["prompt_ids"]);
    let depths = ids_of(&case["depths"])
        .into_iter()
        .map(|d| d as usize)
        .collect();
    (Arc::new(p), case, prompt, depths)
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().to_vec1().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.flatten_all().unwrap() - b.flatten_all().unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs `ids` from the cache's end to the full model's logits.
fn run_full(p: &Program, cache: &mut KvCache, ids: &[u32]) -> anyhow::Result<Tensor> {
    let mut seg = [Segment::new(ids, cache)];
    let mut out = p.run(
        &mut seg,
        &Run::outputs(vec![Want::last(p.logits_node().unwrap())]),
    )?;
    Ok(out.remove(0).remove(0))
}

/// Counts `ids` at `start` as absent in the blocks from depth `from` on.
fn leave_absent(p: &Program, cache: &mut KvCache, ids: &[u32], start: usize, from: usize) {
    let mut seg = [Segment {
        ids,
        start,
        state: None,
        cache,
    }];
    let run = Run {
        from,
        task: Task::AbsentKv,
        commit: true,
    };
    p.run(&mut seg, &run).unwrap();
}

/// Greedy decoding as the reference describes it, with `Program::run`: each generated
/// token's pass stops at its depth and takes its next token from the head there; the layers
/// it skipped are then filled from its exit state or left absent. Returns the tokens and the
/// logits each was the argmax of.
fn decode_by_hand(
    p: &Program,
    prompt: &[u32],
    depths: &[usize],
    skipped: SkippedKv,
) -> (Vec<u32>, Vec<Tensor>) {
    let g = p.graph();
    let layers = g.info.num_layers;
    let head_at = |d: usize| {
        if d == layers {
            p.logits_node().unwrap()
        } else {
            g.exit_at(d).unwrap().logits.unwrap()
        }
    };
    let mut cache = p.new_cache();
    let first = {
        let mut seg = [Segment::new(prompt, &mut cache)];
        p.run(&mut seg, &Run::outputs(vec![Want::last(head_at(layers))]))
            .unwrap()
            .remove(0)
            .remove(0)
    };
    let argmax = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap()
    };
    let mut tokens = vec![argmax(&first)];
    let mut logits = vec![first];
    for &d in depths {
        let ids = [*tokens.last().unwrap()];
        let want = vec![
            Want::last(head_at(d)),
            Want {
                node: g.stream(d).unwrap(),
                at: Positions::Last,
            },
        ];
        let mut out = {
            let mut seg = [Segment::new(&ids, &mut cache)];
            p.run(&mut seg, &Run::outputs(want)).unwrap().remove(0)
        };
        let state = out.remove(1);
        let row = out.remove(0);
        if d < layers {
            let start = cache.len() - 1;
            let mut seg = [Segment {
                ids: &ids,
                start,
                state: Some(state.reshape((1, g.info.hidden)).unwrap()),
                cache: &mut cache,
            }];
            let task = match skipped {
                SkippedKv::Filled => Task::FillKv,
                SkippedKv::Absent => Task::AbsentKv,
            };
            p.run(
                &mut seg,
                &Run {
                    from: d,
                    task,
                    commit: true,
                },
            )
            .unwrap();
        }
        tokens.push(argmax(&row));
        logits.push(row);
    }
    (tokens, logits)
}

/// Both modes, by hand with `Program::run`, equal the reference: the same tokens and every
/// step's logits within 1e-4. The two modes' reference tokens differ, so a mode that did the
/// other's work fails.
#[test]
fn program_runs_match_the_reference_in_both_modes() {
    let (p, case, prompt, depths) = reference();
    assert!(depths.iter().any(|&d| d < 6) && depths.contains(&6));
    assert_ne!(
        ids_of(&case["absent.tokens"]),
        ids_of(&case["filled.tokens"])
    );
    for (mode, skipped) in [("absent", SkippedKv::Absent), ("filled", SkippedKv::Filled)] {
        let (tokens, logits) = decode_by_hand(&p, &prompt, &depths, skipped);
        assert_eq!(tokens, ids_of(&case[&format!("{mode}.tokens")]), "{mode}");
        let want = &case[&format!("{mode}.logits")];
        for (i, row) in logits.iter().enumerate() {
            let w = want.narrow(0, i, 1).unwrap();
            let diff = max_diff(row, &w);
            assert!(diff < 1e-4, "{mode}: step {i}: logits differ by {diff}");
        }
    }
    // A position left absent from depth 2 on is counted in the slots of layers 2..6 and
    // stored in none; the slots below are untouched by the call.
    let mut cache = p.new_cache();
    run_full(&p, &mut cache, &prompt).unwrap();
    leave_absent(&p, &mut cache, &[3], prompt.len(), 2);
    for slot in 0..6 {
        let want = (prompt.len(), usize::from(slot >= 2));
        assert_eq!(
            (cache.slot_len(slot), cache.absent(slot)),
            want,
            "slot {slot}"
        );
    }
    assert_eq!(cache.len(), prompt.len() + 1);
}

/// One request's records of a replayed trace: the generated token at position `pos` left at
/// `exit_layer`.
fn trace_record(seq: usize, pos: usize, exit_layer: usize) -> TraceRecord {
    TraceRecord {
        seq,
        pos,
        token: None,
        step: 0,
        t_s: 0.0,
        batch: 1,
        stages: Vec::new(),
        layers: Vec::new(),
        exit_layer,
        signals: Vec::new(),
        speculated: None,
    }
}

/// The real runtime, replaying the reference's exit depths, produces the reference's tokens
/// in both modes under static, continuous and depth-wise batching (three copies of the
/// request batched together), and records filled layers only when it fills.
#[test]
fn the_runtime_with_replayed_depths_matches_the_reference() {
    let (p, case, prompt, depths) = reference();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("depths.jsonl");
    let copies = 3;
    let mut lines = String::new();
    for seq in 0..copies {
        for (k, &d) in depths.iter().enumerate() {
            // The pass over position P + k produces the token at P + k + 1.
            let r = trace_record(seq, prompt.len() + k + 1, d);
            lines.push_str(&serde_json::to_string(&r).unwrap());
            lines.push('\n');
        }
    }
    std::fs::write(&trace, lines).unwrap();
    let source = ExitSource::new(
        &SimulatedExits::Replay {
            trace: trace.clone(),
        },
        Path::new("."),
        6,
    )
    .unwrap();
    let requests: Vec<RequestSpec> = (0..copies)
        .map(|id| RequestSpec {
            id,
            arrival_s: 0.0,
            prompt: prompt.clone(),
            max_new_tokens: depths.len() + 1,
            forced: Vec::new(),
            depth: None,
        })
        .collect();
    for batching in [
        Batching::Static { max_batch: 1 },
        Batching::Continuous {
            max_batch: 3,
            token_budget: 64,
        },
        Batching::DepthWise {
            max_batch: 3,
            stages: 3,
        },
    ] {
        for (mode, skipped) in [("absent", SkippedKv::Absent), ("filled", SkippedKv::Filled)] {
            let (report, outcomes) = Runtime::new(
                p.clone(),
                batching.clone(),
                Executor::Real,
                Decoding::greedy(),
                requests.clone(),
                None,
            )
            .with_simulated_exits(source.clone())
            .unwrap()
            .with_skipped_kv(skipped)
            .unwrap()
            .run()
            .unwrap();
            assert_eq!(report.skipped_kv, skipped);
            let want = ids_of(&case[&format!("{mode}.tokens")]);
            for o in &outcomes {
                assert_eq!(o.tokens, want, "{mode}, {batching:?}, request {}", o.id);
                let exits: Vec<usize> =
                    o.stats[1..].iter().map(|s| s.exit_layer as usize).collect();
                assert_eq!(exits, depths, "{mode}: the replayed depths ran");
                for (s, &d) in o.stats[1..].iter().zip(&depths) {
                    let filled = if skipped == SkippedKv::Filled {
                        6 - d
                    } else {
                        0
                    };
                    assert_eq!(s.filled as usize, filled, "{mode}: filled layers");
                }
            }
        }
    }
}

/// A slot with absent positions takes one token per call and cannot be rolled back (the
/// runtime's refusals are in `tests/bad_input.rs`).
#[test]
fn absent_slots_refuse_several_tokens_and_rollback() {
    let (p, ..) = reference();
    let mut cache = p.new_cache();
    let prompt = [5u32, 6, 7];
    run_full(&p, &mut cache, &prompt).unwrap();
    let one = [8u32];
    {
        let mut seg = [Segment::new(&one, &mut cache)];
        let stream = p.graph().stream(2).unwrap();
        p.run(&mut seg, &Run::outputs(vec![Want::last(stream)]))
            .unwrap();
    }
    leave_absent(&p, &mut cache, &one, 3, 2);
    // One more token at every layer is fine.
    let mut fork = cache.fork();
    run_full(&p, &mut fork, &one).unwrap();
    assert_eq!((fork.slot_len(5), fork.absent(5)), (4, 1));
    // Two tokens in one call over the slots with an absent position: refused.
    let e = run_full(&p, &mut cache, &[8, 9]).err().unwrap().to_string();
    assert!(
        e.contains("absent positions") && e.contains("this call brings 2"),
        "{e}"
    );
    // Refused before anything ran: no slot took the two tokens.
    assert_eq!(cache.slot_len(0), 4);
    assert_eq!(cache.len(), 4);
    // Rolling back over the absent position: refused, and the cache is left whole.
    let e = cache.truncate(3).err().unwrap().to_string();
    assert!(e.contains("cannot be rolled back"), "{e}");
    assert_eq!(cache.absent(2), 1);
    assert_eq!(cache.slot_len(0), 4);
}

/// A random Llama of `layers` layers with shared exit heads after `after`, tied into `loops`
/// iterations with rank-2 adapters when `loops > 1`.
fn random_model(
    dir: &Path,
    layers: usize,
    loops: usize,
    after: Vec<usize>,
    seed: u64,
) -> Arc<Program> {
    let mut s = LlamaSpec::tiny();
    s.layers = layers;
    write_random_llama(dir, &s, seed).unwrap();
    let mut g = exitgraph_ir::import(dir).unwrap().graph;
    let mut passes: Vec<Box<dyn Pass>> = Vec::new();
    if loops > 1 {
        use LoraTarget::*;
        passes.push(Box::new(TieLayers {
            loops,
            init: TieInit::Average,
            norms: TieNorms::Shared,
            weights: None,
        }));
        passes.push(Box::new(DepthLora {
            rank: LoraRank::Rank(2),
            init: LoraInit::Svd,
            targets: vec![q, k, v, o, gate, up, down],
            weights: None,
        }));
    }
    PassManager::new(passes).run(&mut g).unwrap();
    shared_exits(after)
        .run(&mut g, &PassContext::detached())
        .unwrap();
    Arc::new(Program::lower(&g, dir, &Device::Cpu, DType::F32).unwrap())
}

fn serve(
    p: &Arc<Program>,
    batching: Batching,
    requests: Vec<RequestSpec>,
    source: &ExitSource,
) -> Vec<RequestOutcome> {
    let (report, outcomes) = Runtime::new(
        p.clone(),
        batching,
        Executor::Real,
        Decoding::greedy(),
        requests,
        None,
    )
    .with_simulated_exits(source.clone())
    .unwrap()
    .with_depth(Depth::Full)
    .unwrap()
    .with_skipped_kv(SkippedKv::Absent)
    .unwrap()
    .run()
    .unwrap();
    assert_eq!(report.completed, outcomes.len(), "no request is lost");
    outcomes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Invariant: with skipped keys and values absent, a request's tokens do not depend on
    /// the requests it is batched with, under every policy (looped depth-wise on a looped
    /// model), and tokens do leave early.
    #[test]
    fn absent_keys_and_values_give_each_request_its_own_tokens(
        seed in any::<u64>(),
        looped_model in any::<bool>(),
        n in 2usize..5,
        max_batch in 2usize..5,
        draw in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (p, policies) = if looped_model {
            (
                random_model(dir.path(), 6, 3, vec![2, 4], seed),
                vec![
                    Batching::Continuous { max_batch, token_budget: 64 },
                    Batching::LoopedDepthWise {
                        max_batch,
                        token_budget: 64,
                        priority: Priority::DeepestFirst,
                    },
                    Batching::LoopedDepthWise {
                        max_batch,
                        token_budget: 64,
                        priority: Priority::OldestFirst,
                    },
                ],
            )
        } else {
            (
                random_model(dir.path(), 4, 1, vec![1, 3], seed),
                vec![
                    Batching::Static { max_batch },
                    Batching::Continuous { max_batch, token_budget: 64 },
                    Batching::DepthWise { max_batch, stages: 2 },
                ],
            )
        };
        let layers = p.graph().info.num_layers;
        let points: Vec<usize> = p.graph().exits.iter().map(|e| e.after).collect();
        let mut exits: Vec<(usize, f64)> = points.iter().map(|&k| (k, 0.35)).collect();
        exits.push((layers, 1.0 - 0.35 * points.len() as f64));
        let source = ExitSource::new(
            &SimulatedExits::Distribution { exits, seed: draw },
            Path::new("."),
            layers,
        )
        .unwrap();
        let w = Workload {
            requests: n,
            arrivals: Arrivals::AllAtOnce,
            prompt_len: Length::Uniform { min: 1, max: 8 },
            output_len: Length::Uniform { min: 2, max: 7 },
            seed,
        };
        let requests = w.requests(97, Path::new(".")).unwrap();
        let alone: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| {
                serve(&p, Batching::Static { max_batch: 1 }, vec![r.clone()], &source)
                    .remove(0)
                    .tokens
            })
            .collect();
        // Alone, each equals a decode by hand with the drawn depths and absent keys (a
        // runtime that filled them would differ wherever filling changes a token).
        for (r, tokens) in requests.iter().zip(&alone) {
            let depths: Vec<usize> = (1..r.max_new_tokens)
                .map(|i| source.depth(r.id, r.prompt.len() + i).unwrap())
                .collect();
            let (by_hand, _) = decode_by_hand(&p, &r.prompt, &depths, SkippedKv::Absent);
            prop_assert_eq!(tokens, &by_hand, "request {} alone against a decode by hand", r.id);
        }
        for policy in policies {
            let got = serve(&p, policy.clone(), requests.clone(), &source);
            for ((o, want), r) in got.iter().zip(&alone).zip(&requests) {
                prop_assert!(!o.tokens.is_empty());
                prop_assert_eq!(&o.tokens, want, "request {} under {:?}", o.id, policy);
                // Each token left at its drawn depth (the first comes from the prompt's
                // pass, at full depth), and nothing was filled.
                for (i, s) in o.stats.iter().enumerate() {
                    let drawn = if i == 0 { layers } else { source.depth(r.id, r.prompt.len() + i).unwrap() };
                    prop_assert_eq!(s.exit_layer as usize, drawn);
                    prop_assert_eq!(s.filled, 0);
                }
            }
        }
    }
}

/// A model with sliding-window attention cannot leave skipped keys and values absent (a
/// window counts positions): the runtime refuses it, and so does a call on a cache with
/// absent positions, before anything runs.
#[test]
fn sliding_windows_refuse_absent_keys_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let src = device::fixtures().join("tiny-qwen2");
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["use_sliding_window"] = serde_json::json!(true);
    cfg["sliding_window"] = serde_json::json!(4);
    cfg["max_window_layers"] = serde_json::json!(2);
    cfg["layer_types"] = serde_json::json!([
        "full_attention",
        "full_attention",
        "sliding_attention",
        "sliding_attention"
    ]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let mut g = exitgraph_ir::import(dir.path()).unwrap().graph;
    shared_exits(vec![1])
        .run(&mut g, &PassContext::detached())
        .unwrap();
    let p = Arc::new(Program::lower(&g, dir.path(), &Device::Cpu, DType::F32).unwrap());
    let request = RequestSpec {
        id: 0,
        arrival_s: 0.0,
        prompt: vec![5, 6, 7],
        max_new_tokens: 3,
        forced: Vec::new(),
        depth: None,
    };
    let e = Runtime::new(
        p.clone(),
        Batching::Static { max_batch: 1 },
        Executor::Real,
        Decoding::greedy(),
        vec![request],
        None,
    )
    .with_skipped_kv(SkippedKv::Absent)
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("sliding window") && e.contains("layers.2"),
        "{e}"
    );
    // By hand: after a position is left absent, even a one-token call is refused, and the
    // cache is unchanged.
    let mut cache = p.new_cache();
    run_full(&p, &mut cache, &[5, 6, 7]).unwrap();
    leave_absent(&p, &mut cache, &[8], 3, 1);
    let e = run_full(&p, &mut cache, &[9]).err().unwrap().to_string();
    assert!(e.contains("sliding-window"), "{e}");
    assert_eq!((cache.len(), cache.slot_len(0)), (4, 3));
}

/// A pipeline's `runtime: (skipped_kv: Absent)` reaches generation (`run`, `forward
/// --generate`) through `generate_with_strategy`: with a rule that always exits at the
/// first exit point, every generated token after the first leaves after layer 2 and has
/// nothing filled, where the default fills its 4 skipped layers. The field parses from RON.
#[test]
fn generation_follows_the_pipelines_skipped_kv() {
    use exitgraph::exits::ExitRule;
    use exitgraph::generate::GenerateOptions;
    let (p, ..) = reference();
    let depth = Depth::EarlyExit {
        rule: ExitRule::Confidence(0.0),
    };
    let mut opts = GenerateOptions::greedy(6);
    opts.stop_at_eos = false;
    let prompts = vec![vec![5u32, 6, 7, 8]];
    let generate = |skipped| {
        exitgraph::runtime::generate_with_strategy(
            p.clone(),
            &prompts,
            &opts,
            &depth,
            skipped,
            None,
        )
        .unwrap()
        .1
        .remove(0)
    };
    for (skipped, filled) in [(SkippedKv::Absent, 0), (SkippedKv::Filled, 4)] {
        let o = generate(skipped);
        assert_eq!(o.stats.len(), 6);
        for s in &o.stats[1..] {
            assert_eq!(
                (s.exit_layer, s.filled as usize),
                (2, filled),
                "{skipped:?}"
            );
        }
    }
    let spec: exitgraph::pipeline::RuntimeSpec =
        ron::from_str("(depth: EarlyExit(rule: Confidence(0.9)), skipped_kv: Absent)").unwrap();
    assert_eq!(spec.skipped_kv, SkippedKv::Absent);
    let default: exitgraph::pipeline::RuntimeSpec = ron::from_str("()").unwrap();
    assert_eq!(default.skipped_kv, SkippedKv::Filled);
}
