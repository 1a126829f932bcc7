#![allow(clippy::unwrap_used, clippy::expect_used)]
//! GemFilter against the independent reference in `tests/fixtures/gemfilter` (made by
//! `scripts/make_gemfilter_fixture.py` with transformers from the method's description, in
//! float64, on the tiny Llama fixture): the filter layer's last-query scores, the pooled
//! scores, the kept positions, and the full model's greedy continuation of the kept tokens
//! through the runtime; then the invariants on random models (proptests).

use candle_core::{DType, Device, Tensor};
use exitgraph::gemfilter::{pool_scores, select, select_positions, select_positions_forcing};
use exitgraph::generate::GenerateOptions;
use exitgraph::lower::Program;
use exitgraph::passes::{GemFilter, PassManager};
use exitgraph::runtime::policy::Batching;
use exitgraph::runtime::workload::RequestSpec;
use exitgraph::runtime::{Decoding, Executor, Runtime};
use exitgraph_ir::{Graph, Keep};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

#[path = "common/device.rs"]
mod device;
use device::{fixtures, test_device};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt_tokens: usize,
    filter_layer: usize,
    keep: usize,
    pool: usize,
    new_tokens: usize,
    kept: usize,
    #[serde(default)]
    keep_first: usize,
    #[serde(default)]
    keep_last: usize,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn cases() -> Vec<(Case, HashMap<String, Tensor>)> {
    let dir = fixtures().join("gemfilter");
    let cases: Cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    cases
        .cases
        .into_iter()
        .map(|c| {
            let t = candle_core::safetensors::load(
                dir.join(format!("{}.safetensors", c.name)),
                &Device::Cpu,
            )
            .unwrap();
            (c, t)
        })
        .collect()
}

fn row_f32(t: &Tensor) -> Vec<f32> {
    t.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
}

/// The reference's raw scores, pooled and ranked by our code, keep exactly the reference's
/// positions, in prompt order; the cases cover keep < n with pools 5, 3 and 1, keep ≥ n, and
/// the first and last positions forced in (`keep_first`, `keep_last`, our deviation).
#[test]
fn selection_from_the_reference_scores_equals_the_reference() {
    let all = cases();
    assert_eq!(all.len(), 5);
    assert!(all.iter().any(|(c, _)| c.keep >= c.prompt_tokens));
    assert!(all.iter().any(|(c, _)| c.keep_first > 0 && c.keep_last > 0));
    for (case, t) in all {
        let raw = row_f32(&t["scores_raw"]);
        assert_eq!(raw.len(), case.prompt_tokens, "{}", case.name);
        let want_pooled = row_f32(&t["scores"]);
        let scale = want_pooled.iter().fold(0f32, |m, s| m.max(s.abs()));
        for (i, (a, b)) in pool_scores(&raw, case.pool)
            .iter()
            .zip(&want_pooled)
            .enumerate()
        {
            assert!(
                (a - b).abs() <= 1e-5 * scale.max(1.0),
                "{}: pooled score {i}: {a} vs {b}",
                case.name
            );
        }
        let want: Vec<usize> = t["selected"]
            .squeeze(0)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|p| p as usize)
            .collect();
        assert_eq!(want.len(), case.kept, "{}", case.name);
        assert_eq!(
            select_positions_forcing(&raw, case.keep, case.pool, case.keep_first, case.keep_last),
            want,
            "{}",
            case.name
        );
        if case.keep_first > 0 && case.keep_last > 0 {
            // Forcing either end alone selects otherwise: both did something.
            for (a, b) in [(0, case.keep_last), (case.keep_first, 0), (0, 0)] {
                assert_ne!(
                    select_positions_forcing(&raw, case.keep, case.pool, a, b),
                    want,
                    "{}: first {a}, last {b}",
                    case.name
                );
            }
        }
    }
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.squeeze(0)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// `graph` with a GemFilter pass, lowered on the CPU from `dir`'s weights.
fn filtered(
    graph: &Graph,
    dir: &std::path::Path,
    r: usize,
    keep: Keep,
    pool: usize,
) -> Arc<Program> {
    filtered_by(graph, dir, GemFilter::new(r, keep, pool))
}

/// `graph` with the given GemFilter pass, lowered on the CPU from `dir`'s weights.
fn filtered_by(graph: &Graph, dir: &std::path::Path, pass: GemFilter) -> Arc<Program> {
    let mut g = graph.clone();
    PassManager::new(vec![Box::new(pass)]).run(&mut g).unwrap();
    Arc::new(Program::lower(&g, dir, &test_device(), DType::F32).unwrap())
}

/// Our select phase on the tiny Llama scores every prompt position as the reference does
/// (within 1e-4 of the largest score) and keeps exactly its positions; the runtime then runs
/// the full model on the kept tokens and continues them greedily as transformers does, and
/// reports the kept positions.
#[test]
fn select_phase_and_continuation_equal_the_reference() {
    let dir = fixtures().join("tiny-llama");
    let graph = exitgraph_ir::import(&dir).unwrap().graph;
    for (case, t) in cases() {
        let pass = GemFilter::new(case.filter_layer, Keep::Tokens(case.keep), case.pool)
            .forcing(case.keep_first, case.keep_last);
        let program = filtered_by(&graph, &dir, pass);
        let prompt = ids_of(&t["input_ids"]);
        let sel = select(&program, &[prompt.as_slice()]).unwrap().remove(0);
        let want_raw = row_f32(&t["scores_raw"]);
        let scale = want_raw.iter().fold(1f32, |m, s| m.max(s.abs()));
        for (i, (a, b)) in sel.scores.iter().zip(&want_raw).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "{}: score {i}: {a} vs {b}",
                case.name
            );
        }
        let want: Vec<usize> = ids_of(&t["selected"])
            .into_iter()
            .map(|p| p as usize)
            .collect();
        assert_eq!(sel.kept, want, "{}", case.name);

        let mut opts = GenerateOptions::greedy(case.new_tokens);
        opts.stop_at_eos = false;
        let (rows, outcomes) = exitgraph::runtime::generate_with_depth(
            program.clone(),
            std::slice::from_ref(&prompt),
            &opts,
            &exitgraph::exits::Depth::Full,
            None,
        )
        .unwrap();
        let greedy = ids_of(&t["greedy"]);
        assert_eq!(greedy.len(), case.kept + case.new_tokens);
        assert_eq!(rows[0][..prompt.len()], prompt[..], "{}", case.name);
        assert_eq!(
            rows[0][prompt.len()..],
            greedy[case.kept..],
            "{}",
            case.name
        );
        assert_eq!(
            outcomes[0].selected.as_deref(),
            Some(&want[..]),
            "{}",
            case.name
        );
        assert_eq!(outcomes[0].prompt_tokens, case.prompt_tokens);
    }
}

/// A random small Llama (GQA) in `dir`.
fn random_llama(dir: &std::path::Path, seed: u64) -> Graph {
    use exitgraph::synth::{write_random_llama, LlamaSpec};
    let mut spec = LlamaSpec::tiny();
    spec.kv_heads = if seed % 2 == 0 {
        spec.heads
    } else {
        spec.heads / 2
    };
    write_random_llama(dir, &spec, seed).unwrap();
    exitgraph_ir::import(dir).unwrap().graph
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Under every batching policy each request gets exactly the tokens it gets alone (its
    /// own selection, whatever ran beside it), no request is lost, every request with a
    /// prompt longer than `keep` reports `keep` kept positions, and the simulated executor
    /// serves the same workload to completion.
    #[test]
    fn every_policy_serves_gemfilter_requests_as_alone(
        seed in 0u64..1000,
        keep in 2usize..10,
        lens in proptest::collection::vec(1usize..30, 2..6),
        policy in prop_oneof![
            (1usize..4).prop_map(|m| Batching::Static { max_batch: m }),
            (1usize..4, 8usize..64).prop_map(|(m, b)| Batching::Continuous { max_batch: m, token_budget: b }),
            (1usize..4, 1usize..4).prop_map(|(m, st)| Batching::DepthWise { max_batch: m, stages: st }),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let graph = random_llama(dir.path(), seed);
        let r = (seed as usize / 7) % graph.info.num_layers;
        let program = filtered(&graph, dir.path(), r, Keep::Tokens(keep), 3);
        let vocab = graph.info.vocab as u64;
        let requests: Vec<RequestSpec> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| RequestSpec {
                id: i,
                arrival_s: 0.001 * i as f64,
                prompt: (0..n).map(|j| ((seed * 13 + i as u64 * 29 + j as u64 * 3) % vocab) as u32).collect(),
                max_new_tokens: 4,
                forced: Vec::new(),
                depth: None,
            })
            .collect();
        let (report, together) = Runtime::new(program.clone(), policy.clone(), Executor::Real, Decoding::greedy(), requests.clone(), None)
            .run()
            .unwrap();
        prop_assert_eq!(report.completed, requests.len());
        for (req, o) in requests.iter().zip(&together) {
            prop_assert_eq!(o.tokens.len(), 4);
            prop_assert_eq!(o.prompt_tokens, req.prompt.len());
            let kept = o.selected.clone().unwrap();
            prop_assert_eq!(kept.len(), keep.min(req.prompt.len()));
            let mut one = req.clone();
            one.arrival_s = 0.0;
            let (_, alone) = Runtime::new(program.clone(), Batching::Static { max_batch: 1 }, Executor::Real, Decoding::greedy(), vec![one], None)
                .run()
                .unwrap();
            prop_assert_eq!(&o.tokens, &alone[0].tokens, "request {}", req.id);
            prop_assert_eq!(&o.selected, &alone[0].selected);
        }
        // Simulated: the same workload completes, its select phases charged to the clock.
        let cost = exitgraph::runtime::cost::CostModel {
            version: 2,
            coefficients: [1e-3, 1e-5, 1e-8, 1e-4],
            per_layers: 1e-3,
            per_sequence_layers: 1e-4,
            per_group: 0.0,
            per_layers_rows: 0.0,
            per_head_call: 0.0,
            kv_fill_per_layers: None,
            roofline: None,
            samples: Vec::new(),
        };
        let (sim, outcomes) = Runtime::new(program.clone(), policy, Executor::Sim(cost), Decoding::greedy(), requests.clone(), None)
            .run()
            .unwrap();
        prop_assert_eq!(sim.completed, requests.len());
        prop_assert!(outcomes.iter().all(|o| o.produced == 4 && o.selected.is_none()));
    }

    /// The kept positions are sorted, unique, in range and number min(k, n); selecting
    /// several prompts of different lengths in one call equals selecting each alone; and a
    /// prompt no longer than `keep` generates exactly what the model without GemFilter does.
    #[test]
    fn selection_invariants_hold_on_random_models(
        seed in 0u64..1000,
        keep in 1usize..24,
        pool in prop_oneof![Just(1usize), Just(3), Just(5)],
        lens in proptest::collection::vec(1usize..40, 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let graph = random_llama(dir.path(), seed);
        let layers = graph.info.num_layers;
        let r = (seed as usize) % layers;
        let program = filtered(&graph, dir.path(), r, Keep::Tokens(keep), pool);
        let vocab = graph.info.vocab as u64;
        let prompts: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| ((seed * 31 + i as u64 * 17 + j as u64 * 7) % vocab) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let together = select(&program, &refs).unwrap();
        for (p, sel) in prompts.iter().zip(&together) {
            prop_assert_eq!(sel.kept.len(), keep.min(p.len()));
            prop_assert!(sel.kept.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(sel.kept.iter().all(|&i| i < p.len()));
            prop_assert_eq!(sel.scores.len(), p.len());
            let alone = select(&program, &[p.as_slice()]).unwrap().remove(0);
            for (a, b) in alone.scores.iter().zip(&sel.scores) {
                prop_assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0));
            }
            // The kept positions agree unless the k-th and (k+1)-th pooled scores are within
            // the batched matmul's rounding of each other.
            let mut pooled = pool_scores(&sel.scores, pool);
            pooled.sort_by(|a, b| b.total_cmp(a));
            let k = keep.min(p.len());
            let scale = pooled.iter().fold(1f32, |m, s| m.max(s.abs()));
            if k == p.len() || pooled[k - 1] - pooled[k] > 1e-3 * scale {
                prop_assert_eq!(&alone.kept, &sel.kept);
            }
        }
        // keep ≥ n: the whole prompt, and the same tokens as the model without the pass.
        let short: Vec<Vec<u32>> = prompts.iter().filter(|p| p.len() <= keep).cloned().collect();
        if !short.is_empty() {
            let plain = Arc::new(Program::lower(&graph, dir.path(), &test_device(), DType::F32).unwrap());
            let opts = GenerateOptions::greedy(5);
            for p in &short {
                let a = exitgraph::runtime::generate_through_runtime(plain.clone(), std::slice::from_ref(p), &opts).unwrap();
                let b = exitgraph::runtime::generate_through_runtime(program.clone(), std::slice::from_ref(p), &opts).unwrap();
                prop_assert!(a[0].len() > p.len());
                prop_assert_eq!(a, b);
            }
        }
    }

    /// With `keep_first: a, keep_last: b` the select phase keeps min(k, n) positions in order,
    /// among them the prompt's last min(b, k') and first min(a, k' - b) (k' = min(k, n)), and
    /// every other kept position scores (pooled) at least as high as every dropped position
    /// between the forced ones; without forcing, the same model keeps the reference's
    /// selection of the same scores.
    #[test]
    fn forced_positions_are_kept_on_random_models(
        seed in 0u64..1000,
        keep in 1usize..16,
        first_share in 0.0f64..=1.0,
        last_share in 0.0f64..=1.0,
        pool in prop_oneof![Just(1usize), Just(3), Just(5)],
        lens in proptest::collection::vec(1usize..40, 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let graph = random_llama(dir.path(), seed);
        let r = (seed as usize) % graph.info.num_layers;
        // Every split from nothing forced to a + b = k (no slot left to the scores).
        let last = (keep as f64 * last_share).round() as usize;
        let first = ((keep - last) as f64 * first_share).round() as usize;
        let pass = GemFilter::new(r, Keep::Tokens(keep), pool).forcing(first, last);
        let program = filtered_by(&graph, dir.path(), pass);
        let plain = filtered(&graph, dir.path(), r, Keep::Tokens(keep), pool);
        let vocab = graph.info.vocab as u64;
        let prompts: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| ((seed * 13 + i as u64 * 29 + j as u64 * 11) % vocab) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let forced = select(&program, &refs).unwrap();
        let unforced = select(&plain, &refs).unwrap();
        for ((p, sel), free) in prompts.iter().zip(&forced).zip(&unforced) {
            let n = p.len();
            let k = keep.min(n);
            prop_assert_eq!(sel.kept.len(), k);
            prop_assert!(sel.kept.windows(2).all(|w| w[0] < w[1]));
            let b = last.min(k);
            let a = first.min(k - b);
            let must: Vec<usize> = (0..a).chain(n - b..n).collect();
            prop_assert!(must.iter().all(|i| sel.kept.contains(i)), "{:?} misses {:?}", sel.kept, must);
            let pooled = pool_scores(&sel.scores, pool);
            let chosen: Vec<usize> = sel.kept.iter().copied().filter(|i| !must.contains(i)).collect();
            let dropped: Vec<usize> = (a..n - b).filter(|i| !sel.kept.contains(i)).collect();
            for &i in &chosen {
                for &j in &dropped {
                    prop_assert!(pooled[i] >= pooled[j], "kept {} ({}) under dropped {} ({})", i, pooled[i], j, pooled[j]);
                }
            }
            prop_assert_eq!(&sel.kept, &select_positions_forcing(&sel.scores, keep, pool, first, last));
            prop_assert_eq!(&free.kept, &select_positions(&free.scores, keep, pool));
        }
    }
}

/// The simulated executor charges one request's select phase as a call over the prompt's
/// tokens at the share of the layers up to the filter layer's q and k, then prefills only the
/// kept tokens: its busy time, hand-computed from a cost model with only an intercept and a
/// per-token term, on the tiny random Llama (hidden 32, 4 heads of 8, 2 KV heads, MLP 64,
/// 3 layers).
#[test]
fn simulated_gemfilter_charges_the_select_phase_and_the_kept_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let graph = random_llama(dir.path(), 1);
    let (r, n, keep, new) = (1usize, 20usize, 5usize, 3usize);
    let program = filtered(&graph, dir.path(), r, Keep::Tokens(keep), 3);
    let (c0, c1) = (0.01, 0.001);
    let cost = exitgraph::runtime::cost::CostModel {
        version: 2,
        coefficients: [c0, c1, 0.0, 0.0],
        per_layers: 0.0,
        per_sequence_layers: 0.0,
        per_group: 0.0,
        per_layers_rows: 0.0,
        per_head_call: 0.0,
        kv_fill_per_layers: None,
        roofline: None,
        samples: Vec::new(),
    };
    let request = RequestSpec {
        id: 0,
        arrival_s: 0.0,
        prompt: (0..n as u32).collect(),
        max_new_tokens: new,
        forced: Vec::new(),
        depth: None,
    };
    let (report, outcomes) = Runtime::new(
        program,
        Batching::Static { max_batch: 1 },
        Executor::Sim(cost),
        Decoding::greedy(),
        vec![request],
        None,
    )
    .run()
    .unwrap();
    // A layer's work per token: q, o 2·32·32 each; k, v 2·32·16 each; the MLP 3·2·32·64;
    // two norms 5·32 each = 18,752. The scores node: q, k and a norm = 3,232.
    let share = (r as f64 + 3232.0 / 18752.0) / 3.0;
    let select = c0 + c1 * share * n as f64;
    let prefill = c0 + c1 * keep as f64;
    let decode = (new - 1) as f64 * (c0 + c1);
    let want = select + prefill + decode;
    let o = &outcomes[0];
    let finish = o.finish_s.unwrap();
    assert!(
        (finish - want).abs() < 1e-12,
        "finished at {finish}, want {want}"
    );
    assert!((o.first_token_s.unwrap() - (select + prefill)).abs() < 1e-12);
    assert!((report.decode_busy_s - decode).abs() < 1e-12);
    assert_eq!((o.prompt_tokens, o.produced), (n, new));
    assert!((o.selection_s.unwrap() - select).abs() < 1e-12);
}
