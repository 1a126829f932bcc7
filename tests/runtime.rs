#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The ECS runtime on random small models (proptest):
//! - ragged batches give each sequence exactly its unbatched result;
//! - with every batching policy, each request gets exactly the tokens of its own unbatched
//!   greedy run, and no request is lost;
//! - the same workload seed gives the same token-level trace;
//! - with arrivals out of id order (Poisson, or a trace file of shuffled times) and seeded
//!   sampling with EOS stops, every policy gives each request what it gets alone.

mod common;

use candle_core::{DType, Device};
use common::reference_generate;
use exitgraph::generate::GenerateOptions;
use exitgraph::lower::{Program, Segment};
use exitgraph::runtime::policy::Batching;
use exitgraph::runtime::trace::{read_trace, TraceWriter};
use exitgraph::runtime::workload::{Arrivals, Length, Workload};
use exitgraph::runtime::{Decoding, Executor, Runtime};
use exitgraph::synth::{write_random_llama, LlamaSpec};
use proptest::prelude::*;
use std::path::Path;
use std::sync::Arc;

fn model(dir: &Path, ty: &str, kv: usize, seed: u64) -> Program {
    let mut spec = LlamaSpec::tiny();
    spec.model_type = ty.into();
    spec.kv_heads = kv;
    write_random_llama(dir, &spec, seed).unwrap();
    let g = exitgraph_ir::import(dir).unwrap().graph;
    Program::lower(&g, dir, &Device::Cpu, DType::F32).unwrap()
}

/// The request alone, on the padded-batch reference path (no runtime).
fn greedy_alone(p: &Program, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut opts = GenerateOptions::greedy(n);
    opts.stop_at_eos = false;
    reference_generate(p, &[prompt.to_vec()], &opts).remove(0)[prompt.len()..].to_vec()
}

fn policies() -> impl Strategy<Value = Batching> {
    prop_oneof![
        (1usize..5).prop_map(|m| Batching::Static { max_batch: m }),
        (1usize..5, 1usize..40).prop_map(|(m, b)| Batching::Continuous {
            max_batch: m,
            token_budget: b
        }),
        (1usize..5, 1usize..5).prop_map(|(m, st)| Batching::DepthWise {
            max_batch: m,
            stages: st
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]

    #[test]
    fn ragged_batches_equal_unbatched_runs(seed in any::<u64>(), lens in prop::collection::vec(1usize..9, 1..5), kv in prop_oneof![Just(1usize), Just(2), Just(4)]) {
        let dir = tempfile::tempdir().unwrap();
        let p = model(dir.path(), "llama", kv, seed);
        let prompts: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &l)| (0..l).map(|j| ((seed as usize + i * 31 + j * 7) % 97) as u32).collect()).collect();
        // Each sequence alone.
        let alone: Vec<Vec<f32>> = prompts.iter().map(|pr| {
            let mut cache = p.new_cache();
            let mut segs = [Segment::new(pr, &mut cache)];
            p.forward_ragged(&mut segs).unwrap().remove(0).to_vec1::<f32>().unwrap()
        }).collect();
        // All together, then one more token each, together.
        let mut caches: Vec<_> = prompts.iter().map(|_| p.new_cache()).collect();
        let mut segs: Vec<Segment> = prompts.iter().zip(caches.iter_mut()).map(|(ids, cache)| Segment::new(ids, cache)).collect();
        let together = p.forward_ragged(&mut segs).unwrap();
        for (a, t) in alone.iter().zip(&together) {
            let t = t.to_vec1::<f32>().unwrap();
            let d = a.iter().zip(&t).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            prop_assert!(d < 1e-5, "differs by {d}");
        }
        let next: Vec<Vec<u32>> = (0..prompts.len()).map(|i| vec![(i as u32 * 5) % 97]).collect();
        let mut segs: Vec<Segment> = next.iter().zip(caches.iter_mut()).map(|(ids, cache)| Segment::new(ids, cache)).collect();
        let step = p.forward_ragged(&mut segs).unwrap();
        for (i, pr) in prompts.iter().enumerate() {
            let mut full = pr.clone();
            full.extend(&next[i]);
            let mut cache = p.new_cache();
            let mut one = [Segment::new(&full, &mut cache)];
            let want = p.forward_ragged(&mut one).unwrap().remove(0).to_vec1::<f32>().unwrap();
            let got = step[i].to_vec1::<f32>().unwrap();
            let d = want.iter().zip(&got).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            prop_assert!(d < 1e-4, "decode step differs by {d}");
        }
    }

    #[test]
    fn every_policy_gives_each_request_its_own_greedy_tokens(seed in any::<u64>(), policy in policies(), n in 1usize..7, poisson in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(model(dir.path(), "qwen2", 2, seed));
        let workload = Workload {
            requests: n,
            arrivals: if poisson { Arrivals::Poisson { rate_per_s: 500.0 } } else { Arrivals::AllAtOnce },
            prompt_len: Length::Uniform { min: 1, max: 12 },
            output_len: Length::Uniform { min: 1, max: 6 },
            seed,
        };
        let requests = workload.requests(97, Path::new(".")).unwrap();
        let (report, outcomes) = Runtime::new(p.clone(), policy, Executor::Real,
        Decoding::greedy(), requests.clone(), None).run().unwrap();
        prop_assert_eq!(outcomes.len(), n, "no request is lost");
        prop_assert_eq!(report.completed, n);
        for (r, o) in requests.iter().zip(&outcomes) {
            prop_assert_eq!(r.id, o.id);
            prop_assert_eq!(&o.tokens, &greedy_alone(&p, &r.prompt, r.max_new_tokens));
            prop_assert!(o.first_token_s.unwrap() >= r.arrival_s);
        }
    }
}

#[test]
fn too_long_requests_fail_with_a_reason_and_the_rest_complete() {
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(model(dir.path(), "llama", 2, 1));
    let workload = Workload {
        requests: 3,
        arrivals: Arrivals::AllAtOnce,
        prompt_len: Length::Fixed(200),
        output_len: Length::Fixed(100),
        seed: 0,
    };
    let mut requests = workload.requests(97, Path::new(".")).unwrap();
    requests[1].prompt.truncate(5);
    requests[1].max_new_tokens = 3;
    let (report, outcomes) = Runtime::new(
        p,
        Batching::Continuous {
            max_batch: 4,
            token_budget: 64,
        },
        Executor::Real,
        Decoding::greedy(),
        requests,
        None,
    )
    .run()
    .unwrap();
    assert_eq!((report.completed, report.failed), (1, 2));
    assert!(outcomes[0]
        .failed
        .as_ref()
        .unwrap()
        .contains("exceed the model's 256 positions"));
    assert_eq!(outcomes[1].tokens.len(), 3);
}

#[test]
fn same_seed_same_trace() {
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(model(dir.path(), "llama", 2, 9));
    let workload = Workload {
        requests: 5,
        arrivals: Arrivals::AllAtOnce,
        prompt_len: Length::Uniform { min: 2, max: 9 },
        output_len: Length::Uniform { min: 2, max: 5 },
        seed: 42,
    };
    let out = tempfile::tempdir().unwrap();
    let mut traces = Vec::new();
    for i in 0..2 {
        let path = out.path().join(format!("t{i}.jsonl"));
        let requests = workload.requests(97, Path::new(".")).unwrap();
        let writer = TraceWriter::create(&path).unwrap();
        Runtime::new(
            p.clone(),
            Batching::Continuous {
                max_batch: 3,
                token_budget: 16,
            },
            Executor::Real,
            Decoding::greedy(),
            requests,
            Some(writer),
        )
        .run()
        .unwrap();
        let records: Vec<_> = read_trace(&path)
            .unwrap()
            .map(|r| r.unwrap())
            .map(|r| (r.seq, r.pos, r.token, r.step, r.batch, r.layers))
            .collect();
        traces.push(records);
    }
    assert!(!traces[0].is_empty());
    assert_eq!(traces[0], traces[1]);
}

#[test]
fn simulated_executor_follows_the_same_schedule_and_is_deterministic() {
    use exitgraph::runtime::cost::{CostModel, Sample};
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(model(dir.path(), "llama", 2, 4));
    let samples: Vec<Sample> = [(1, 5, 1), (8, 40, 1), (4, 90, 4), (16, 300, 2), (2, 10, 2)]
        .iter()
        .map(|&(tokens, attention, sequences)| Sample {
            tokens,
            attention,
            sequences,
            seconds: 1e-3
                + 1e-4 * tokens as f64
                + 1e-6 * attention as f64
                + 5e-5 * sequences as f64,
            spread: 0.0,
            layers_share: 1.0,
            exit_head: false,
            groups: 0,
        })
        .collect();
    let cost = CostModel::fit(samples).unwrap();
    let workload = Workload {
        requests: 6,
        arrivals: Arrivals::AllAtOnce,
        prompt_len: Length::Uniform { min: 2, max: 9 },
        output_len: Length::Uniform { min: 2, max: 5 },
        seed: 7,
    };
    let out = tempfile::tempdir().unwrap();
    let policy = Batching::Continuous {
        max_batch: 3,
        token_budget: 16,
    };
    let run = |executor: Executor, name: &str| {
        let path = out.path().join(name);
        let requests = workload.requests(97, Path::new(".")).unwrap();
        let (report, _) = Runtime::new(
            p.clone(),
            policy.clone(),
            executor,
            Decoding::greedy(),
            requests,
            Some(TraceWriter::create(&path).unwrap()),
        )
        .run()
        .unwrap();
        let records: Vec<_> = read_trace(&path).unwrap().map(|r| r.unwrap()).collect();
        (report, records)
    };
    let (real, real_trace) = run(Executor::Real, "real.jsonl");
    let (sim, sim_trace) = run(Executor::Sim(cost.clone()), "sim.jsonl");
    let (_, sim_again) = run(Executor::Sim(cost), "sim2.jsonl");
    assert_eq!(real.steps, sim.steps);
    assert_eq!(real.generated_tokens, sim.generated_tokens);
    let shape = |t: &[exitgraph::runtime::trace::TraceRecord]| {
        t.iter()
            .map(|r| (r.seq, r.pos, r.step, r.batch))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&real_trace), shape(&sim_trace));
    assert!(sim_trace.iter().all(|r| r.token.is_none()));
    assert!(real_trace.iter().all(|r| r.token.is_some()));
    assert_eq!(sim_trace, sim_again, "the simulated clock is deterministic");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]

    #[test]
    fn arrival_order_sampling_and_eos_never_change_a_request(
        seed in any::<u64>(),
        policy in policies(),
        n in 2usize..6,
        trace in any::<bool>(),
        sample in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(model(dir.path(), "llama", 2, seed));
        // Arrival times from a trace file or Poisson.
        let arrivals = if trace {
            let times: Vec<f64> = (0..n).map(|i| ((i * 7) % n) as f64 * 1e-3).collect();
            std::fs::write(dir.path().join("arrivals.json"), serde_json::to_string(&times).unwrap()).unwrap();
            Arrivals::Trace { file: "arrivals.json".into() }
        } else {
            Arrivals::Poisson { rate_per_s: 800.0 }
        };
        let workload = Workload {
            requests: n,
            arrivals,
            prompt_len: Length::Uniform { min: 1, max: 10 },
            output_len: Length::Uniform { min: 1, max: 7 },
            seed,
        };
        let mut requests = workload.requests(97, dir.path()).unwrap();
        // The workload gives ids in arrival order: reverse the times so the last id arrives
        // first.
        let times: Vec<f64> = requests.iter().map(|r| r.arrival_s).rev().collect();
        for (r, t) in requests.iter_mut().zip(times) {
            r.arrival_s = t;
        }
        prop_assert!(requests.windows(2).any(|w| w[0].arrival_s > w[1].arrival_s), "arrivals out of id order");
        let sampling = if sample {
            exitgraph::generate::Sampling::Temperature { temperature: 1.2, top_p: Some(0.9) }
        } else {
            exitgraph::generate::Sampling::Greedy
        };
        // A common token id stops requests early.
        let decoding = || Decoding::new(&sampling, seed, vec![(seed % 7) as u32, 11, 42]).unwrap();
        let (report, together) = Runtime::new(p.clone(), policy, Executor::Real, decoding(), requests.clone(), None).run().unwrap();
        prop_assert_eq!(report.completed, n, "no request is lost");
        for (r, o) in requests.iter().zip(&together) {
            prop_assert_eq!(r.id, o.id);
            prop_assert!(!o.tokens.is_empty());
            let mut one = r.clone();
            one.arrival_s = 0.0;
            let (_, alone) = Runtime::new(p.clone(), Batching::Static { max_batch: 1 }, Executor::Real, decoding(), vec![one], None).run().unwrap();
            prop_assert_eq!(&o.tokens, &alone[0].tokens, "request {}", r.id);
        }
    }

    /// The CLI and `generate` generate through the runtime: greedy or seeded sampling, with
    /// EOS stops and padding, it equals the padded-batch reference loop.
    #[test]
    fn generation_through_the_runtime_equals_the_reference_loop(seed in any::<u64>(), rows in 1usize..4, len in 1usize..8, sample in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = LlamaSpec::tiny();
        spec.eos_token_id = Some((seed % 97) as u32);
        write_random_llama(dir.path(), &spec, seed).unwrap();
        let g = exitgraph_ir::import(dir.path()).unwrap().graph;
        let p = Arc::new(Program::lower(&g, dir.path(), &Device::Cpu, DType::F32).unwrap());
        let prompts: Vec<Vec<u32>> = (0..rows).map(|r| (0..len).map(|j| ((seed as usize >> 3) + r * 13 + j * 5) as u32 % 97).collect()).collect();
        let mut opts = GenerateOptions::greedy(8);
        opts.seed = seed;
        if sample {
            opts.sampling = exitgraph::generate::Sampling::Temperature { temperature: 1.3, top_p: Some(0.9) };
        }
        let a = reference_generate(&p, &prompts, &opts);
        let b = exitgraph::runtime::generate_through_runtime(p.clone(), &prompts, &opts).unwrap();
        prop_assert_eq!(a, b);
    }
}

/// The simulated executor charges SkipDecode's layer work by the share of layers each token
/// runs and the rest in full: one request, hand-computed step by step.
#[test]
fn simulated_skipdecode_scales_only_the_layer_terms() {
    use exitgraph::exits::{Depth, SkipDecode};
    use exitgraph::runtime::cost::CostModel;
    use exitgraph::runtime::workload::RequestSpec;
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(model(dir.path(), "llama", 2, 4));
    let layers = p.graph().info.num_layers; // 3
    let (c0, c1, c2, c3) = (2e-3, 1e-4, 3e-7, 5e-5);
    let cost = CostModel {
        version: 1,
        coefficients: [c0, c1, c2, c3],
        per_layers: 0.0,
        per_sequence_layers: 0.0,
        per_group: 0.0,
        per_layers_rows: 0.0,
        per_head_call: 0.0,
        kv_fill_per_layers: None,
        roofline: None,
        samples: Vec::new(),
    };
    // 3 layers, n(p) = round(3 - p/7) over 8 positions (min 2, warm-up 1).
    let skip = SkipDecode {
        max_layers: 3,
        min_layers: 2,
        warmup: 1,
        max_length: Some(8),
    };
    let prompt = vec![1u32, 2, 3, 4, 5];
    let request = RequestSpec {
        id: 0,
        arrival_s: 0.0,
        prompt: prompt.clone(),
        max_new_tokens: 3,
        forced: Vec::new(),
        depth: Some(Depth::SkipDecode(skip)),
    };
    let (report, outcomes) = Runtime::new(
        p.clone(),
        Batching::Static { max_batch: 1 },
        Executor::Sim(cost),
        Decoding::greedy(),
        vec![request],
        None,
    )
    .run()
    .unwrap();
    assert_eq!(outcomes[0].produced, 3);
    // Prefill: 5 tokens at full depth, attention 5 * 5, one final head.
    let mut want = c0 + c1 * 5.0 + c2 * 25.0 + c3;
    // Decode: the token at position 5 runs round(3 - 5/7) = 2 of 3 layers with 5 cached;
    // position 6 runs round(3 - 6/7) = 2 with 6 cached. Each reaches the last layer (head).
    for (n, cached) in [(2.0, 5.0), (2.0, 6.0)] {
        let share = n / layers as f64;
        want += c0 + c1 * share + c2 * share * (cached + 1.0) + c3;
    }
    let busy = report.busy_share * report.makespan_s;
    assert!(
        (busy - want).abs() < 1e-12,
        "busy {busy} vs hand-computed {want}"
    );
    assert_eq!(
        outcomes[0]
            .stats
            .iter()
            .map(|s| s.layers_run)
            .collect::<Vec<_>>(),
        vec![3, 2, 2]
    );
}

/// Simulated exits charge the layers a token runs, one head per exit point it passes, and the
/// state copying of the layers it skipped as a separate call: one request, hand-computed.
#[test]
fn simulated_exits_charge_the_path_heads_and_state_copying() {
    use exitgraph::exits::cost::DepthCost;
    use exitgraph::runtime::cost::CostModel;
    use exitgraph::runtime::sim_exits::{ExitSource, SimulatedExits};
    use exitgraph::runtime::workload::RequestSpec;
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(model(dir.path(), "llama", 2, 4));
    let layers = p.graph().info.num_layers;
    assert_eq!(layers, 3);
    let (c0, c1, c2, c3, pl, ps) = (2e-3, 1e-4, 3e-7, 5e-5, 1.2e-3, 4e-4);
    let cost = CostModel {
        version: 1,
        coefficients: [c0, c1, c2, c3],
        per_layers: pl,
        per_sequence_layers: ps,
        per_group: 0.0,
        per_layers_rows: 0.0,
        per_head_call: 0.0,
        kv_fill_per_layers: None,
        roofline: None,
        samples: Vec::new(),
    };
    let exits = SimulatedExits::Distribution {
        exits: vec![(1, 1.0)],
        seed: 0,
    };
    let source = ExitSource::new(&exits, Path::new("."), layers).unwrap();
    let request = RequestSpec {
        id: 0,
        arrival_s: 0.0,
        prompt: vec![1, 2, 3, 4, 5],
        max_new_tokens: 2,
        forced: Vec::new(),
        depth: None,
    };
    use exitgraph::runtime::sim_exits::SkippedKv;
    let serve = |cost: CostModel, skipped: SkippedKv| {
        Runtime::new(
            p.clone(),
            Batching::Static { max_batch: 1 },
            Executor::Sim(cost),
            Decoding::greedy(),
            vec![request.clone()],
            None,
        )
        .with_simulated_exits(source.clone())
        .unwrap()
        .with_skipped_kv(skipped)
        .unwrap()
        .run()
        .unwrap()
    };
    let (report, outcomes) = serve(cost.clone(), SkippedKv::Filled);
    assert_eq!(outcomes[0].produced, 2);
    // Filling layers 1 and 2 from the exit state costs their key and value projections.
    let d = DepthCost::of(p.graph());
    let fill: f64 = (1..3).map(|l| d.kv_fill[l] / d.layer[l]).sum::<f64>() / 3.0;
    assert!(fill > 0.0 && fill < 2.0 / 3.0);
    // The prompt's token comes from the full model: stage 0..1 (5 tokens, attention 5 * 5,
    // a third of the per-layer and per-sequence work, the exit head after layer 1), then
    // stage 1..3 (two thirds, the final head). The decode token at position 5 (1 token, 6
    // keys) leaves after layer 1, then the state copying of layers 1 and 2 (their key and
    // value FLOP share of the token work, and the same share of the per-layer fixed work:
    // a fill reads only the k and v weights of the layers it fills).
    let mut want = c0 + c1 * 5.0 / 3.0 + c2 * 25.0 / 3.0 + c3 + pl / 3.0 + ps / 3.0;
    want += c0 + c1 * 10.0 / 3.0 + c2 * 50.0 / 3.0 + c3 + pl * 2.0 / 3.0 + ps * 2.0 / 3.0;
    want += c0 + c1 / 3.0 + c2 * 6.0 / 3.0 + c3 + pl / 3.0 + ps / 3.0;
    want += c0 + c1 * fill + pl * fill;
    let busy = report.busy_share * report.makespan_s;
    assert!(
        (busy - want).abs() < 1e-12,
        "busy {busy} vs hand-computed {want}"
    );
    let stats: Vec<_> = outcomes[0]
        .stats
        .iter()
        .map(|s| (s.exit_layer, s.layers_run, s.filled, s.heads))
        .collect();
    assert_eq!(stats, vec![(3, 3, 0, 1), (1, 1, 2, 1)]);
    assert!(report
        .simulated_exits
        .as_deref()
        .is_some_and(|l| l.contains("drawn")));
    // The call-shape terms: the prompt's two stage calls have 5 rows (a third and two thirds
    // of the layers) and the decode call one; each of the three runs a head; the state
    // copying pays neither.
    let (r, h) = (2e-4, 3e-4);
    let (shaped, _) = serve(
        CostModel {
            per_layers_rows: r,
            per_head_call: h,
            ..cost.clone()
        },
        SkippedKv::Filled,
    );
    let busy_shaped = shaped.busy_share * shaped.makespan_s;
    let extra = r * (1.0 / 3.0 + 2.0 / 3.0) + 3.0 * h;
    assert!(
        (busy_shaped - (want + extra)).abs() < 1e-12,
        "{busy_shaped} vs {}",
        want + extra
    );

    // Skipped layers' keys and values left absent: no state copying is charged or recorded,
    // and the report says so.
    let (absent, outcomes) = serve(cost.clone(), SkippedKv::Absent);
    let busy_absent = absent.busy_share * absent.makespan_s;
    let copying = c0 + c1 * fill + pl * fill;
    assert!(
        (busy_absent - (want - copying)).abs() < 1e-12,
        "{busy_absent}"
    );
    assert_eq!(outcomes[0].stats[1].filled, 0);
    assert_eq!(outcomes[0].stats[1].exit_layer, 1);
    assert_eq!(absent.skipped_kv, SkippedKv::Absent);
    assert_eq!(report.skipped_kv, SkippedKv::Filled);
    assert!(absent.to_table().contains("absent, not filled"));
    // A model with its own fill cost (a roofline's k and v weights) charges that instead of
    // the intercept and the per-layer work.
    let kf = 7e-4;
    let (own, _) = serve(
        CostModel {
            kv_fill_per_layers: Some(kf),
            ..cost.clone()
        },
        SkippedKv::Filled,
    );
    let busy_own = own.busy_share * own.makespan_s;
    let own_copying = c1 * fill + kf * 2.0 / 3.0;
    assert!((busy_own - (want - copying + own_copying)).abs() < 1e-12);
}

/// With skipped keys and values absent, a token that ran deeper than an earlier one that
/// left early attends, in the layers the earlier one skipped, to one position fewer; with
/// them filled, to every position, plus the state copying.
#[test]
fn absent_keys_and_values_shorten_later_tokens_attention_in_skipped_layers() {
    use exitgraph::runtime::cost::CostModel;
    use exitgraph::runtime::sim_exits::{ExitSource, SimulatedExits, SkippedKv};
    use exitgraph::runtime::workload::RequestSpec;
    let dir = tempfile::tempdir().unwrap();
    let p = Arc::new(model(dir.path(), "llama", 2, 4));
    let layers = p.graph().info.num_layers;
    assert_eq!(layers, 3);
    let (c0, c1, c2, c3, pl, ps) = (2e-3, 1e-4, 3e-7, 5e-5, 1.2e-3, 4e-4);
    let cost = CostModel {
        version: 1,
        coefficients: [c0, c1, c2, c3],
        per_layers: pl,
        per_sequence_layers: ps,
        per_group: 0.0,
        per_layers_rows: 0.0,
        per_head_call: 0.0,
        kv_fill_per_layers: None,
        roofline: None,
        samples: Vec::new(),
    };
    // A seed whose draws send the second token out after layer 1 and the third through all
    // 3 (a token's depth is drawn at the position it is produced at: 6 and 7; its input
    // sits one position earlier, at 5 and 6).
    let (_, source) = (0..1000)
        .map(|seed| {
            let e = SimulatedExits::Distribution {
                exits: vec![(1, 0.5), (3, 0.5)],
                seed,
            };
            let s = ExitSource::new(&e, Path::new("."), layers).unwrap();
            (e, s)
        })
        .find(|(_, s)| s.depth(0, 6).unwrap() == 1 && s.depth(0, 7).unwrap() == 3)
        .expect("some seed draws depths 1 then 3");
    let request = RequestSpec {
        id: 0,
        arrival_s: 0.0,
        prompt: vec![1, 2, 3, 4, 5],
        max_new_tokens: 3,
        forced: Vec::new(),
        depth: None,
    };
    let busy = |skipped: SkippedKv| {
        let (report, outcomes) = Runtime::new(
            p.clone(),
            Batching::Static { max_batch: 1 },
            Executor::Sim(cost.clone()),
            Decoding::greedy(),
            vec![request.clone()],
            None,
        )
        .with_simulated_exits(source.clone())
        .unwrap()
        .with_skipped_kv(skipped)
        .unwrap()
        .run()
        .unwrap();
        let depths: Vec<u16> = outcomes[0].stats.iter().map(|s| s.exit_layer).collect();
        assert_eq!(depths, [3, 1, 3], "the drawn depths");
        report.busy_share * report.makespan_s
    };
    // The prompt's two stages and position 5's first stage, as in the test above.
    let common = (c0 + c1 * 5.0 / 3.0 + c2 * 25.0 / 3.0 + c3 + pl / 3.0 + ps / 3.0)
        + (c0 + c1 * 10.0 / 3.0 + c2 * 50.0 / 3.0 + c3 + pl * 2.0 / 3.0 + ps * 2.0 / 3.0)
        + (c0 + c1 / 3.0 + c2 * 6.0 / 3.0 + c3 + pl / 3.0 + ps / 3.0);
    // Position 6: layer 0 with 7 keys and the exit head, then layers 1 and 2 with the final
    // head, where position 5 has keys and values only when they were filled.
    let first = c0 + c1 / 3.0 + c2 * 7.0 / 3.0 + c3 + pl / 3.0 + ps / 3.0;
    let rest = |keys: f64| {
        c0 + c1 * 2.0 / 3.0 + c2 * keys * 2.0 / 3.0 + c3 + pl * 2.0 / 3.0 + ps * 2.0 / 3.0
    };
    let absent = busy(SkippedKv::Absent);
    let want = common + first + rest(6.0);
    assert!((absent - want).abs() < 1e-12, "absent: {absent} vs {want}");
    let d = exitgraph::exits::cost::DepthCost::of(p.graph());
    let fill: f64 = (1..3).map(|l| d.kv_fill[l] / d.layer[l]).sum::<f64>() / 3.0;
    let filled = busy(SkippedKv::Filled);
    let want = common + (c0 + c1 * fill + pl * fill) + first + rest(7.0);
    assert!((filled - want).abs() < 1e-12, "filled: {filled} vs {want}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Under every policy, simulated exits give every request all its tokens, each token
    /// the depth drawn for its (request, position) whatever the batching, and replaying the
    /// run's trace reproduces it exactly; a distribution that always runs the full model
    /// changes nothing.
    #[test]
    fn simulated_exits_follow_their_source_under_every_policy(seed in any::<u64>(), policy in policies()) {
        use exitgraph::runtime::cost::CostModel;
        use exitgraph::runtime::sim_exits::{ExitSource, SimulatedExits};
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(model(dir.path(), "llama", 2, seed));
        let layers = p.graph().info.num_layers;
        let cost = CostModel { version: 1, coefficients: [1e-3, 1e-4, 1e-6, 5e-5], per_layers: 2e-3, per_sequence_layers: 3e-4, per_group: 0.0, per_layers_rows: 0.0, per_head_call: 0.0, kv_fill_per_layers: None, roofline: None, samples: Vec::new() };
        let workload = Workload {
            requests: 6,
            arrivals: Arrivals::Poisson { rate_per_s: 500.0 },
            prompt_len: Length::Uniform { min: 2, max: 9 },
            output_len: Length::Uniform { min: 2, max: 6 },
            seed,
        };
        let out = tempfile::tempdir().unwrap();
        let run = |policy: &Batching, exits: Option<SimulatedExits>, name: &str| {
            let path = out.path().join(name);
            let requests = workload.requests(97, Path::new(".")).unwrap();
            let mut rt = Runtime::new(p.clone(), policy.clone(), Executor::Sim(cost.clone()), Decoding::greedy(), requests, Some(TraceWriter::create(&path).unwrap()));
            if let Some(e) = exits {
                rt = rt.with_simulated_exits(ExitSource::new(&e, out.path(), layers).unwrap()).unwrap();
            }
            let (report, outcomes) = rt.run().unwrap();
            let records: Vec<_> = read_trace(&path).unwrap().map(|r| r.unwrap()).collect();
            (report, outcomes, records)
        };
        let drawn = SimulatedExits::Distribution { exits: vec![(1, 0.5), (layers, 0.5)], seed };
        let (report, outcomes, trace) = run(&policy, Some(drawn.clone()), "drawn.jsonl");
        prop_assert_eq!(report.completed, 6);
        for o in &outcomes {
            let want = workload.requests(97, Path::new(".")).unwrap()[o.id].max_new_tokens;
            prop_assert_eq!(o.produced, want);
        }
        let depth = |t: &[exitgraph::runtime::trace::TraceRecord]| t.iter().map(|r| ((r.seq, r.pos), r.exit_layer)).collect::<std::collections::BTreeMap<_, _>>();
        let exits = depth(&trace);
        let source = ExitSource::new(&drawn, out.path(), layers).unwrap();
        let prompt_len: std::collections::BTreeMap<usize, usize> = workload.requests(97, Path::new(".")).unwrap().iter().map(|r| (r.id, r.prompt.len())).collect();
        for (&(seq, pos), &d) in &exits {
            // A prompt's token comes from the full model.
            let want = if pos == prompt_len[&seq] { layers } else { source.depth(seq, pos).unwrap() };
            prop_assert_eq!(d, want);
        }
        prop_assert!(exits.values().all(|&d| d == 1 || d == layers));
        prop_assert!(trace.iter().all(|r| r.layers == (0..r.exit_layer).collect::<Vec<_>>()));
        // Batching never changes a token's depth: one sequence at a time gives the same.
        let (_, _, alone) = run(&Batching::Static { max_batch: 1 }, Some(drawn), "alone.jsonl");
        prop_assert_eq!(&exits, &depth(&alone));
        // Replaying the trace reproduces the run, step for step.
        let replay = SimulatedExits::Replay { trace: "drawn.jsonl".into() };
        let (replayed, _, again) = run(&policy, Some(replay), "replayed.jsonl");
        prop_assert_eq!(&trace, &again);
        prop_assert_eq!(replayed.makespan_s, report.makespan_s);
        // Always the full depth: as without simulated exits.
        let full = SimulatedExits::Distribution { exits: vec![(layers, 1.0)], seed };
        let (a, _, ta) = run(&policy, Some(full), "full.jsonl");
        let (b, _, tb) = run(&policy, None, "none.jsonl");
        prop_assert_eq!(ta, tb);
        prop_assert_eq!(a.makespan_s, b.makespan_s);
    }
}

/// Every example workload reads and expands to its stated number of requests, in arrival
/// order, with prompts inside the vocabulary (a format change cannot leave one broken).
#[test]
fn every_example_workload_reads_and_expands() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/workloads");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("ron") {
            continue;
        }
        let w = Workload::read(&path)?;
        let requests = w.requests(1000, &dir)?;
        assert_eq!(requests.len(), w.requests, "{}", path.display());
        assert!(
            requests
                .windows(2)
                .all(|p| p[0].arrival_s <= p[1].arrival_s),
            "{}: arrivals out of order",
            path.display()
        );
        assert!(requests.iter().all(|r| r.prompt.iter().all(|&t| t < 1000)));
        seen += 1;
    }
    assert!(seen >= 5, "found {seen} example workloads");
    Ok(())
}
