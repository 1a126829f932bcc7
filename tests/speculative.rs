#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Self-speculative decoding in the runtime, on random small models:
//! - greedy self-speculation gives every request the full model's greedy tokens, token for
//!   token, under every batching policy, whatever the draft depth, the draft length and the
//!   stop threshold (proptest; the reference is `generate`, plain full-depth decoding outside
//!   the runtime);
//! - a draft equal to the full model (`draft_exit` = its depth) has every draft accepted;
//! - with sampling, the first tokens' joint distribution is the full model's (chi-square
//!   against probabilities computed exactly from the full model's logits);
//! - bad settings are refused with the field named.

use candle_core::{DType, Device, Tensor};
use exitgraph::exits::{Depth, SelfSpeculative};
use exitgraph::generate::{generate, GenerateOptions, Sampling};
use exitgraph::lower::{Program, Run, Segment, Want};
use exitgraph::runtime::metrics::{RequestOutcome, Speculated};
use exitgraph::runtime::policy::Batching;
use exitgraph::runtime::workload::RequestSpec;
use exitgraph::runtime::{Decoding, Executor, Runtime};
use exitgraph::synth::{write_random_exit_heads, write_random_llama, LlamaSpec};
use exitgraph_passes::{HeadKind, InsertExits, Pass, PassContext};
use proptest::prelude::*;
use std::path::Path;
use std::sync::Arc;

fn model(dir: &Path, layers: usize, vocab: usize, seed: u64, exits: &[usize]) -> Arc<Program> {
    model_with(
        dir,
        layers,
        vocab,
        seed,
        exits,
        LlamaSpec::tiny().init_std,
        false,
    )
}

/// A random Llama with shared-head exits after `exits`, or (`adapters`) Kangaroo adapters
/// with random weights there.
fn model_with(
    dir: &Path,
    layers: usize,
    vocab: usize,
    seed: u64,
    exits: &[usize],
    init_std: f32,
    adapters: bool,
) -> Arc<Program> {
    let mut spec = LlamaSpec::tiny();
    spec.init_std = init_std;
    spec.layers = layers;
    spec.vocab = vocab;
    write_random_llama(dir, &spec, seed).unwrap();
    let mut g = exitgraph_ir::import(dir).unwrap().graph;
    if !exits.is_empty() {
        let (head, weights) = if adapters {
            let file = dir.join("adapters.safetensors");
            let kind = HeadKind::AttentionAdapter;
            write_random_exit_heads(&file, &g, &kind, exits, seed ^ 0xada, 0.3).unwrap();
            (kind, Some(file.display().to_string()))
        } else {
            (HeadKind::SharedLmHead { norm: true }, None)
        };
        InsertExits {
            after: exits.to_vec(),
            every: None,
            head,
            gate: false,
            weights,
        }
        .run(&mut g, &PassContext::detached())
        .unwrap();
    }
    Arc::new(Program::lower(&g, dir, &Device::Cpu, DType::F32).unwrap())
}

fn prompts(seed: u64, n: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..1 + (seed as usize + i * 5) % 9)
                .map(|j| ((seed as usize + i * 31 + j * 7) % vocab) as u32)
                .collect()
        })
        .collect()
}

fn spec(draft_exit: usize, max_draft: usize, stop_below: Option<f32>) -> Depth {
    Depth::SelfSpeculative {
        draft_exit,
        max_draft,
        stop_below,
    }
}

fn serve(
    p: &Arc<Program>,
    requests: Vec<RequestSpec>,
    batching: Batching,
    decoding: Decoding,
    depth: &Depth,
) -> Vec<RequestOutcome> {
    let (_, outcomes) = Runtime::new(
        p.clone(),
        batching,
        Executor::Real,
        decoding,
        requests,
        None,
    )
    .with_depth(depth.clone())
    .unwrap()
    .run()
    .unwrap();
    outcomes
}

fn requests(
    prompts: &[Vec<u32>],
    new: usize,
    own: impl Fn(usize) -> Option<Depth>,
) -> Vec<RequestSpec> {
    prompts
        .iter()
        .enumerate()
        .map(|(id, pr)| RequestSpec {
            id,
            arrival_s: 0.01 * id as f64,
            prompt: pr.clone(),
            max_new_tokens: new,
            forced: Vec::new(),
            depth: own(id),
        })
        .collect()
}

/// Plain greedy decoding at full depth, outside the runtime.
fn greedy(p: &Program, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut opts = GenerateOptions::greedy(n);
    opts.stop_at_eos = false;
    generate(p, &[prompt.to_vec()], &opts).unwrap().remove(0)[prompt.len()..].to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, .. ProptestConfig::default() })]

    #[test]
    fn greedy_self_speculation_gives_the_full_models_tokens(
        seed in any::<u64>(),
        layers in 2usize..6,
        exit_frac in 0.0f64..1.0,
        max_draft in 1usize..7,
        stop in prop_oneof![Just(None), (0.0f32..1.0).prop_map(Some)],
        new in 1usize..12,
        adapters in any::<bool>(),
        policy in prop_oneof![
            (1usize..5).prop_map(|m| Batching::Static { max_batch: m }),
            (1usize..5).prop_map(|m| Batching::Continuous { max_batch: m, token_budget: 24 }),
            (1usize..5, 1usize..4).prop_map(|(m, s)| Batching::DepthWise { max_batch: m, stages: s }),
        ],
    ) {
        let dir = tempfile::tempdir().unwrap();
        // A draft depth anywhere from the first layer to the whole model.
        let draft_exit = 1 + ((exit_frac * layers as f64) as usize).min(layers - 1);
        let exits: Vec<usize> = (1..layers).collect();
        // Shared-head drafts (LayerSkip) or Kangaroo adapters, which keep a cache of their own.
        let p = model_with(dir.path(), layers, 97, seed, &exits, LlamaSpec::tiny().init_std, adapters);
        let prs = prompts(seed, 5, 97);
        let depth = spec(draft_exit, max_draft, stop);
        // Request 3 decodes at full depth beside the others; request 4 drafts with the first
        // layer alone.
        let own = |i: usize| match i {
            3 => Some(Depth::Full),
            4 => Some(spec(1, 3, None)),
            _ => None,
        };
        let outcomes = serve(&p, requests(&prs, new, own), policy, Decoding::greedy(), &depth);
        prop_assert_eq!(outcomes.len(), prs.len());
        let mut drafted = 0;
        for (o, pr) in outcomes.iter().zip(&prs) {
            prop_assert_eq!(&o.tokens, &greedy(&p, pr, new), "request {}", o.id);
            prop_assert_eq!(o.stats.len(), new);
            if let Some(c) = &o.speculative {
                prop_assert!(c.accepted <= c.drafted);
                // Each cycle gives its kept drafts and one token of the full model's.
                prop_assert_eq!(c.produced, c.accepted + c.cycles);
                prop_assert_eq!(c.produced + 1, new, "the first token comes from the prompt's pass");
                prop_assert_eq!(c.shallow_tokens, c.drafted + c.cycles);
                let marked = o.stats.iter().filter(|s| s.speculated.is_some()).count();
                prop_assert_eq!(marked, c.produced);
                drafted += c.drafted;
            }
        }
        if new > 2 {
            prop_assert!(drafted > 0, "tokens were drafted");
        }
    }

    #[test]
    fn a_draft_as_deep_as_the_model_is_always_accepted(
        seed in any::<u64>(),
        layers in 1usize..5,
        max_draft in 1usize..6,
        new in 3usize..14,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = model(dir.path(), layers, 97, seed, &[]);
        let prs = prompts(seed, 3, 97);
        let outcomes = serve(
            &p,
            requests(&prs, new, |_| None),
            Batching::Continuous { max_batch: 3, token_budget: 64 },
            Decoding::greedy(),
            &spec(layers, max_draft, None),
        );
        for (o, pr) in outcomes.iter().zip(&prs) {
            prop_assert_eq!(&o.tokens, &greedy(&p, pr, new));
            let c = o.speculative.unwrap();
            prop_assert!(c.drafted > 0);
            prop_assert_eq!(c.accepted, c.drafted, "request {}", o.id);
            prop_assert!(!o.stats.iter().any(|s| s.speculated == Some(Speculated::Rejected)));
        }
    }
}

fn softmax(l: &[f32]) -> Vec<f64> {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = l.iter().map(|&x| ((x - m) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// Pearson's chi-square of `counts` against probabilities `exact` (cells expected fewer than
/// 5 times pooled) below the 0.999 quantile of its degrees of freedom (Wilson–Hilferty).
fn assert_chi_square(exact: &[f64], counts: &[usize], what: &str) {
    let n: usize = counts.iter().sum();
    let (mut chi2, mut cells, mut pool_e, mut pool_o) = (0.0, 0usize, 0.0, 0.0);
    for (e, &o) in exact.iter().zip(counts) {
        let e = e * n as f64;
        if e >= 5.0 {
            chi2 += (o as f64 - e).powi(2) / e;
            cells += 1;
        } else {
            pool_e += e;
            pool_o += o as f64;
        }
    }
    if pool_e > 0.0 {
        chi2 += (pool_o - pool_e).powi(2) / pool_e;
        cells += 1;
    }
    assert!(
        cells >= 4,
        "{what}: only {cells} cells: too peaked a distribution for a test"
    );
    let k = (cells - 1) as f64;
    let z = 3.090_232;
    let critical = k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3);
    assert!(
        chi2 < critical,
        "{what}: chi-square {chi2:.1} over {cells} cells (critical {critical:.1})"
    );
}

/// The logits `want` gives at the last position of `ids`, from one call on a fresh cache.
fn last_logits(p: &Program, ids: &[u32], want: Want) -> Vec<f32> {
    let mut cache = p.new_cache();
    let mut seg = [Segment::new(ids, &mut cache)];
    let out: Tensor = p
        .run(&mut seg, &Run::outputs(vec![want]))
        .unwrap()
        .remove(0)
        .remove(0);
    out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// 3000 requests sample 4 tokens each with self-speculation (draft after the first of 3
/// layers, up to 3 drafts a cycle: the first cycle drafts 2, so tokens 2 to 4 come from
/// accepted drafts, replacements of rejected ones and tokens after the drafts); the joint
/// distributions of consecutive pairs (t1, t2), (t2, t3), (t3, t4) must be the full
/// model's, computed exactly by enumerating every 4-token continuation.
fn check_sampling(temperature: f64, top_p: Option<f64>) {
    use exitgraph::exits::speculative::distribution;
    let dir = tempfile::tempdir().unwrap();
    let vocab = 6;
    // Weights large enough that the draft's distribution is far from the full model's.
    let p = model_with(dir.path(), 3, vocab, 7, &[1], 0.6, false);
    let prompt: Vec<u32> = vec![1, 4, 2];
    let sampling = Sampling::Temperature { temperature, top_p };
    let (n, new) = (3000, 4);
    let outcomes = serve(
        &p,
        requests(&vec![prompt.clone(); n], new, |_| None),
        Batching::Continuous {
            max_batch: 64,
            token_budget: 4096,
        },
        Decoding::new(&sampling, 11, Vec::new()).unwrap(),
        &spec(1, 3, None),
    );
    let full = Want::last(p.logits_node().unwrap());
    let dist = |ids: &[u32]| -> Vec<f64> {
        distribution(&last_logits(&p, ids, full), &sampling)
            .into_iter()
            .map(f64::from)
            .collect()
    };
    // The draft differs from the full model after the first token.
    let draft = Want::last(p.graph().exit_at(1).unwrap().logits.unwrap());
    let p1 = dist(&prompt);
    let mut tv = 0.0;
    for (t1, &a) in p1.iter().enumerate() {
        let ids: Vec<u32> = prompt.iter().copied().chain([t1 as u32]).collect();
        let q = softmax(&last_logits(&p, &ids, draft));
        tv += a
            * 0.5
            * q.iter()
                .zip(dist(&ids))
                .map(|(x, y)| (x - y).abs())
                .sum::<f64>();
    }
    assert!(
        tv > 0.1,
        "the draft is too close to the full model for a test: TV {tv:.3}"
    );
    // Exact probability of every continuation, then its pair marginals.
    let mut pairs = vec![vec![0.0f64; vocab * vocab]; new - 1];
    let mut stack: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 1.0)];
    while let Some((cont, prob)) = stack.pop() {
        if cont.len() == new {
            for (i, pair) in pairs.iter_mut().enumerate() {
                pair[cont[i] as usize * vocab + cont[i + 1] as usize] += prob;
            }
            continue;
        }
        let ids: Vec<u32> = prompt.iter().chain(&cont).copied().collect();
        for (t, &pt) in dist(&ids).iter().enumerate() {
            if pt > 0.0 {
                let mut next = cont.clone();
                next.push(t as u32);
                stack.push((next, prob * pt));
            }
        }
    }
    let mut counts = vec![vec![0usize; vocab * vocab]; new - 1];
    let (mut accepted, mut rejected, mut multi) = (0, 0, 0);
    for o in &outcomes {
        assert_eq!(o.tokens.len(), new);
        for (i, pair) in counts.iter_mut().enumerate() {
            pair[o.tokens[i] as usize * vocab + o.tokens[i + 1] as usize] += 1;
        }
        let c = o.speculative.unwrap();
        accepted += c.accepted;
        multi += usize::from(c.drafted >= 2);
        rejected += o
            .stats
            .iter()
            .filter(|s| s.speculated == Some(Speculated::Rejected))
            .count();
    }
    // Every way of ending a cycle happened many times, with cycles of several drafts.
    assert!(multi == n, "{multi} requests drafted twice or more");
    assert!(
        accepted > n / 10 && rejected > n / 10,
        "{accepted} accepted, {rejected} rejected"
    );
    for (i, (e, c)) in pairs.iter().zip(&counts).enumerate() {
        assert_chi_square(e, c, &format!("tokens {} and {}", i + 1, i + 2));
    }
}

#[test]
fn sampled_tokens_follow_the_full_models_distribution() {
    check_sampling(1.0, None);
}

#[test]
fn sampled_tokens_follow_the_full_models_top_p_distribution() {
    // A warmer temperature, so that the nucleus holds several tokens.
    check_sampling(2.0, Some(0.9));
}

#[test]
fn bad_settings_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = model(dir.path(), 4, 97, 3, &[2]);
    let check = |depth: Depth, words: &[&str]| {
        let err = Runtime::new(
            p.clone(),
            Batching::Static { max_batch: 1 },
            Executor::Real,
            Decoding::greedy(),
            Vec::new(),
            None,
        )
        .with_depth(depth)
        .err()
        .expect("refused");
        let msg = format!("{err:#}");
        for w in words {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
    };
    check(spec(0, 3, None), &["draft_exit (0)", "4 layers"]);
    check(spec(5, 3, None), &["draft_exit (5)", "4 layers"]);
    check(spec(3, 3, None), &["draft_exit (3)", "InsertExits", "[2]"]);
    check(spec(2, 0, None), &["max_draft"]);
    check(spec(2, 3, Some(1.5)), &["stop_below (1.5)", "[0, 1]"]);
    // The simulated executor cannot judge drafts.
    let err = Runtime::new(
        p.clone(),
        Batching::Static { max_batch: 1 },
        Executor::Sim(exitgraph::runtime::cost::CostModel {
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
        }),
        Decoding::greedy(),
        Vec::new(),
        None,
    )
    .with_depth(spec(2, 3, None))
    .err()
    .expect("refused");
    assert!(format!("{err:#}").contains("real executor"), "{err:#}");
    // Looped depth-wise batching does not run cycles yet: refused, not run wrongly.
    let err = Runtime::new(
        p.clone(),
        Batching::LoopedDepthWise {
            max_batch: 4,
            token_budget: 64,
            priority: Default::default(),
        },
        Executor::Real,
        Decoding::greedy(),
        Vec::new(),
        None,
    )
    .with_depth(spec(2, 3, None))
    .err()
    .expect("refused");
    assert!(format!("{err:#}").contains("LoopedDepthWise"), "{err:#}");
}

/// Keys and values of every slot, `[positions, ..]` flattened per slot.
fn kv_of(cache: &exitgraph::lower::KvCache) -> Vec<(usize, Vec<f32>, Vec<f32>)> {
    (0..cache.slots())
        .map(|i| match cache.slot(i) {
            Some((k, v)) => (
                cache.slot_len(i),
                k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            ),
            None => (0, Vec::new(), Vec::new()),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]

    /// After each cycle (the runtime's own cycle code), every layer's cache equals the cache
    /// of one plain pass over the prompt and the kept tokens before the newest: the rejected
    /// drafts left nothing behind, and the kept drafts' keys and values, written while
    /// drafting (shallow layers) and verifying (the rest), are what the full model computes.
    /// Kangaroo adapters' own slots are held to the same: they hold exactly the kept
    /// positions, with what one pass computes.
    #[test]
    fn kv_after_rollback_equals_never_drafting(
        seed in any::<u64>(),
        layers in 2usize..5,
        exit_frac in 0.0f64..1.0,
        max_draft in 1usize..6,
        adapters in any::<bool>(),
    ) {
        use exitgraph::runtime::speculate::greedy_cycle;
        let dir = tempfile::tempdir().unwrap();
        let draft_exit = 1 + ((exit_frac * layers as f64) as usize).min(layers - 1);
        let exits: Vec<usize> = (1..layers).collect();
        // With Kangaroo adapters, their own slots are compared too.
        let p = model_with(dir.path(), layers, 97, seed, &exits, LlamaSpec::tiny().init_std, adapters);
        if adapters {
            prop_assert_eq!(p.new_cache().slots(), 2 * layers - 1);
        }
        let prompt = prompts(seed, 1, 97).remove(0);
        let spec = SelfSpeculative { draft_exit, max_draft, stop_below: None };
        // The prompt's pass commits its positions and gives the first token.
        let mut cache = p.new_cache();
        let logits = {
            let mut seg = [Segment::new(&prompt, &mut cache)];
            let run = Run::outputs(vec![Want::last(p.logits_node().unwrap())]);
            p.run(&mut seg, &run).unwrap().remove(0).remove(0)
        };
        let first = logits.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        let mut tokens = vec![first];
        let want = 12;
        let (mut rejected, mut accepted) = (0, 0);
        while tokens.len() < want {
            let start = prompt.len() + tokens.len() - 1;
            let (kept, counts) = greedy_cycle(&p, &mut cache, *tokens.last().unwrap(), start, spec, want - tokens.len()).unwrap();
            rejected += counts.drafted - counts.accepted;
            accepted += counts.accepted;
            tokens.extend(&kept);
            let seen: Vec<u32> = prompt.iter().chain(&tokens[..tokens.len() - 1]).copied().collect();
            prop_assert_eq!(cache.len(), seen.len());
            let mut plain = p.new_cache();
            {
                let mut seg = [Segment::new(&seen, &mut plain)];
                let run = Run::outputs(vec![Want::last(p.logits_node().unwrap())]);
                p.run(&mut seg, &run).unwrap();
            }
            for (i, ((n, k, v), (m, k2, v2))) in kv_of(&cache).into_iter().zip(kv_of(&plain)).enumerate() {
                prop_assert_eq!(n, m, "slot {} holds {} positions, not {}", i, n, m);
                let diff = k.iter().zip(&k2).chain(v.iter().zip(&v2)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                prop_assert!(diff < 1e-4, "slot {}: keys or values differ by {}", i, diff);
            }
        }
        prop_assert_eq!(&tokens, &greedy(&p, &prompt, want));
        // Drafts were made; with a draft as deep as the model, none was rejected.
        prop_assert!(accepted + rejected > 0);
        if draft_exit == layers {
            prop_assert_eq!(rejected, 0);
        }
    }
}

#[test]
fn the_strategy_reads_from_ron_and_a_misspelt_field_is_located() {
    use exitgraph::pipeline::Pipeline;
    let path = Path::new("spec.ron");
    let good = "Pipeline(\n    runtime: (\n        depth: SelfSpeculative(draft_exit: 2, max_draft: 6, stop_below: Some(0.6)),\n    ),\n)";
    let p = Pipeline::parse(good, path).unwrap();
    assert_eq!(
        p.runtime.depth.speculative(),
        Some(SelfSpeculative {
            draft_exit: 2,
            max_draft: 6,
            stop_below: Some(0.6)
        })
    );
    // stop_below may be left out (LayerSkip's fixed draft length).
    let fixed = "Pipeline(runtime: (depth: SelfSpeculative(draft_exit: 1, max_draft: 4)))";
    assert_eq!(
        Pipeline::parse(fixed, path)
            .unwrap()
            .runtime
            .depth
            .speculative()
            .unwrap()
            .stop_below,
        None
    );
    let bad = "Pipeline(\n    runtime: (\n        depth: SelfSpeculative(draft_exit: 2, max_drafts: 6),\n    ),\n)";
    let err = Pipeline::parse(bad, path).unwrap_err().to_string();
    assert!(
        err.contains("spec.ron:3:") && err.contains("max_drafts"),
        "{err}"
    );
}

#[path = "common/device.rs"]
#[allow(dead_code)]
mod device;

/// The tiny Llama fixture with Kangaroo's adapter after layer 2 (weights from the fixture
/// made by `scripts/make_kangaroo_fixture.py`, with transformers, from the paper's
/// description), lowered.
fn kangaroo_fixture() -> (Program, std::collections::HashMap<String, Tensor>) {
    let root = device::fixtures();
    let model = root.join("tiny-llama");
    let mut g = exitgraph_ir::import(&model).unwrap().graph;
    InsertExits {
        after: vec![2],
        every: None,
        head: HeadKind::AttentionAdapter,
        gate: false,
        weights: Some(
            root.join("kangaroo/adapter.safetensors")
                .display()
                .to_string(),
        ),
    }
    .run(&mut g, &PassContext::detached())
    .unwrap();
    let p = Program::lower(&g, &model, &Device::Cpu, DType::F32).unwrap();
    let case = candle_core::safetensors::load(root.join("kangaroo/case.safetensors"), &Device::Cpu)
        .unwrap();
    (p, case)
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

/// Kangaroo's draft (the stream after layer 2, then RMSNorm → attention → residual →
/// RMSNorm → the model's LM head) equals the reference at every position within 1e-4, three
/// ways: one call over the prompt, a padded batch (the training path), and token by token
/// after a prefill that only asked for the full model's logits: the adapter's own KV slot
/// must then already hold the prompt's positions (else the call fails or the logits differ).
/// The full model's logits are unchanged by the adapter.
#[test]
fn kangaroo_adapter_matches_the_reference() {
    let (p, case) = kangaroo_fixture();
    let exit = p.graph().exit_at(2).unwrap().clone();
    assert_eq!(
        exit.kv_slot,
        Some(6),
        "the adapter's slot follows the 6 layers'"
    );
    assert_eq!(p.new_cache().slots(), 7);
    let draft = exit.logits.unwrap();
    let full = p.logits_node().unwrap();
    for name in ["long", "short"] {
        let ids: Vec<u32> = case[&format!("{name}.input_ids")]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want_draft = &case[&format!("{name}.draft_logits")];
        let want_full = &case[&format!("{name}.logits")];
        let n = ids.len();
        // One call.
        let mut cache = p.new_cache();
        let out = {
            let mut seg = [Segment::new(&ids, &mut cache)];
            p.run(
                &mut seg,
                &Run::outputs(vec![Want::all(draft), Want::all(full)]),
            )
            .unwrap()
            .remove(0)
        };
        assert!(
            max_diff(&out[0], want_draft) < 1e-4,
            "{name}: draft, one call"
        );
        assert!(max_diff(&out[1], want_full) < 1e-4, "{name}: full model");
        // The training path.
        let inputs = exitgraph::lower::Inputs {
            input_ids: Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            attention_mask: None,
            token_type_ids: None,
            example_ids: None,
        };
        let padded = p
            .forward(&inputs, &mut p.new_cache(), &["exit.2.logits"], false)
            .unwrap();
        let padded = padded["exit.2.logits"].squeeze(0).unwrap();
        assert!(
            max_diff(&padded, want_draft) < 1e-4,
            "{name}: draft, padded"
        );
        // Token by token after a prefill of the first half that wants only the full logits.
        let half = n / 2;
        let mut cache = p.new_cache();
        {
            let mut seg = [Segment::new(&ids[..half], &mut cache)];
            p.run(&mut seg, &Run::outputs(vec![Want::last(full)]))
                .unwrap();
        }
        assert_eq!(
            cache.slot_len(6),
            half,
            "{name}: the prefill filled the adapter"
        );
        for i in half..n {
            let row = {
                let mut seg = [Segment::new(&ids[i..=i], &mut cache)];
                p.run(&mut seg, &Run::outputs(vec![Want::last(draft)]))
                    .unwrap()
                    .remove(0)
                    .remove(0)
            };
            let want = want_draft.narrow(0, i, 1).unwrap();
            assert!(max_diff(&row, &want) < 1e-4, "{name}: draft at {i}, cached");
        }
        assert_eq!(cache.slot_len(6), n);
    }
}

/// An adapter file with a tensor of the wrong shape is refused, naming the tensor and both
/// shapes; a missing tensor is named; an adapter serves only strategies where every token
/// runs the layers below it.
#[test]
fn bad_adapters_are_refused_with_the_tensor_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = device::fixtures();
    let model = root.join("tiny-llama");
    let mut tensors =
        candle_core::safetensors::load(root.join("kangaroo/adapter.safetensors"), &Device::Cpu)
            .unwrap();
    let build = |tensors: &std::collections::HashMap<String, Tensor>| -> String {
        let file = dir.path().join("bad.safetensors");
        candle_core::safetensors::save(tensors, &file).unwrap();
        let mut g = exitgraph_ir::import(&model).unwrap().graph;
        let pass = InsertExits {
            after: vec![2],
            every: None,
            head: HeadKind::AttentionAdapter,
            gate: false,
            weights: Some(file.display().to_string()),
        };
        let pm = exitgraph_passes::PassManager::new(vec![Box::new(pass)]);
        match pm.run(&mut g) {
            Err(e) => format!("{e:#}"),
            Ok(_) => match Program::lower(&g, &model, &Device::Cpu, DType::F32) {
                Err(e) => format!("{e:#}"),
                Ok(_) => "accepted".into(),
            },
        }
    };
    tensors.insert(
        "exits.2.attn.k.weight".into(),
        Tensor::zeros((16, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let msg = build(&tensors);
    assert!(
        msg.contains("exits.2.attn.k.weight") && msg.contains("16") && msg.contains("32"),
        "{msg}"
    );
    tensors.remove("exits.2.attn.k.weight");
    let msg = build(&tensors);
    assert!(msg.contains("exits.2.attn.k.weight"), "{msg}");
    // Early exits cannot keep an adapter's cache whole: refused, not run wrongly.
    let (p, _) = kangaroo_fixture();
    let err = Runtime::new(
        Arc::new(p),
        Batching::Static { max_batch: 1 },
        Executor::Real,
        Decoding::greedy(),
        Vec::new(),
        None,
    )
    .with_depth(Depth::EarlyExit {
        rule: exitgraph::exits::rule::ExitRule::Confidence(0.9),
    })
    .err()
    .expect("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("AttentionAdapter") && msg.contains("SelfSpeculative"),
        "{msg}"
    );
    // SkipDecode bypasses middle layers for some tokens: refused too.
    let (p, _) = kangaroo_fixture();
    let err = Runtime::new(
        Arc::new(p),
        Batching::Static { max_batch: 1 },
        Executor::Real,
        Decoding::greedy(),
        Vec::new(),
        None,
    )
    .with_depth(Depth::SkipDecode(exitgraph::exits::SkipDecode {
        max_layers: 6,
        min_layers: 3,
        warmup: 1,
        max_length: None,
    }))
    .err()
    .expect("refused");
    assert!(format!("{err:#}").contains("AttentionAdapter"), "{err:#}");
}

/// `Program::sync_heads` keeps only the adapters a run drafts with in sync: after a plain
/// prefill, the adapter after layer 2 holds the prompt's positions and the one after layer
/// 1 holds none (it did not run); by default both are kept whole.
#[test]
fn only_the_adapters_a_run_drafts_with_are_kept_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let p = model_with(
        dir.path(),
        3,
        97,
        9,
        &[1, 2],
        LlamaSpec::tiny().init_std,
        true,
    );
    let slot = |depth: usize| p.graph().exit_at(depth).unwrap().kv_slot.unwrap();
    let prompt: Vec<u32> = vec![4, 8, 15, 16, 23];
    let prefill = |q: &Program| {
        let mut cache = q.new_cache();
        {
            let mut seg = [Segment::new(&prompt, &mut cache)];
            q.run(
                &mut seg,
                &Run::outputs(vec![Want::last(q.logits_node().unwrap())]),
            )
            .unwrap();
        }
        cache
    };
    let all = prefill(&p);
    assert_eq!((all.slot_len(slot(1)), all.slot_len(slot(2))), (5, 5));
    let only_two = prefill(&p.sync_heads(&[2]));
    assert_eq!(
        (only_two.slot_len(slot(1)), only_two.slot_len(slot(2))),
        (0, 5)
    );
    let none = prefill(&p.sync_heads(&[]));
    assert_eq!((none.slot_len(slot(1)), none.slot_len(slot(2))), (0, 0));
}

/// The ideal figures charge a Kangaroo adapter its projections per shallow token, in layers:
/// on the tiny Llama (hidden 64, 4 query and 2 key-value heads of 16, MLP 160) the adapter's
/// q, k, v and o take 2 · (64·64 + 32·64 + 32·64 + 64·64) = 24576 FLOPs per token and a layer
/// 24576 + 2 · 3 · 64·160 (the gated MLP) + 2 · 5 · 64 (two norms) = 86656; a shared head
/// costs nothing beyond the LM head.
#[test]
fn the_adapters_cost_by_hand() {
    use exitgraph::eval::speculative::adapter_layers;
    let (p, _) = kangaroo_fixture();
    assert!((adapter_layers(&p, 2) - 24576.0 / 86656.0).abs() < 1e-12);
    assert_eq!(adapter_layers(&p, 6), 0.0, "the model's own head");
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(adapter_layers(&model(dir.path(), 3, 97, 1, &[1]), 1), 0.0);
}

/// `train exits --objective kangaroo` on the demo model: the adapter after layer 2 starts as
/// the shared head and its cross-entropy to the full model's distribution falls; only its
/// six tensors are saved; the written pipeline drafts with it, losslessly, with drafts
/// accepted. Other head kinds, gates and backbone training are refused under this objective.
#[test]
fn kangaroo_adapters_train_and_the_written_pipeline_drafts_losslessly() {
    use exitgraph::exits::train::{train_exits, ExitTrainSpec, Objective};
    use exitgraph::pipeline::{compile, Pipeline};
    let dir = tempfile::tempdir().unwrap();
    let demo = exitgraph::pipeline::demo_model_dir();
    let write = |name: &str, head: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "Pipeline(model: {:?}, passes: [InsertExits(after: [2], head: {head})], runtime: (depth: SelfSpeculative(draft_exit: 2, max_draft: 6, stop_below: Some(0.6))))",
                demo.display().to_string()
            ),
        )
        .unwrap();
        path
    };
    let spec = ExitTrainSpec {
        tasks: Vec::new(),
        examples: 200,
        seed: 3,
        seq_len: 32,
        batch_size: 4,
        distill: 0.5,
        train_adapters: false,
        train_shared: false,
        objective: Objective::Kangaroo,
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
    let report = train_exits(&write("k.ron", "AttentionAdapter"), &out, &spec, false).unwrap();
    assert_eq!(report.objective, Objective::Kangaroo);
    let last = report.log.eval_loss.last().unwrap().1;
    assert!(
        last < report.eval_before,
        "the adapter's held-out cross-entropy {last} is not below the shared head's {}",
        report.eval_before
    );
    let saved = candle_core::safetensors::load(&report.heads, &Device::Cpu).unwrap();
    let mut names: Vec<&String> = saved.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "exits.2.attn.k.weight",
            "exits.2.attn.o.weight",
            "exits.2.attn.q.weight",
            "exits.2.attn.v.weight",
            "exits.2.attn_norm.weight",
            "exits.2.norm.weight"
        ]
    );
    // The output projection started at zero (the adapter was the shared head) and learned.
    let o = &saved["exits.2.attn.o.weight"];
    assert!(
        o.abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .max(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
            > 0.0
    );
    let p = Pipeline::read(&report.pipeline).unwrap();
    let compiled = compile(&p, &report.pipeline).unwrap();
    let program = Arc::new(compiled.lower().unwrap());
    let prs: Vec<Vec<u32>> = vec![vec![5, 30, 31, 7], vec![9, 12, 40]];
    let outcomes = serve(
        &program,
        requests(&prs, 10, |_| None),
        Batching::Continuous {
            max_batch: 2,
            token_budget: 64,
        },
        Decoding::greedy(),
        &p.runtime.depth,
    );
    let mut accepted = 0;
    for (o, pr) in outcomes.iter().zip(&prs) {
        assert_eq!(o.tokens, greedy(&program, pr, 10), "request {}", o.id);
        accepted += o.speculative.unwrap().accepted;
    }
    assert!(accepted > 0, "no draft was accepted");
    // The heads record the backbone they were trained on, and are refused on another (here
    // the same checkpoint truncated to 6 layers).
    let meta = exitgraph_ir::import::read_metadata(&report.heads).unwrap();
    assert!(meta.contains_key("exitgraph.base"), "{meta:?}");
    let other = dir.path().join("other.ron");
    std::fs::write(
        &other,
        format!(
            "Pipeline(model: {:?}, passes: [TruncateLayers(keep: 6), InsertExits(after: [2], head: AttentionAdapter, weights: {:?})])",
            demo.display().to_string(),
            report.heads.display().to_string()
        ),
    )
    .unwrap();
    let err = compile(&Pipeline::read(&other).unwrap(), &other)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("weights") && err.contains("another model or backbone"),
        "{err}"
    );
    // The objective is Kangaroo's adapter alone.
    let err = train_exits(
        &write("l.ron", "Linear"),
        &dir.path().join("o2"),
        &spec,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("AttentionAdapter") && err.contains("l.ron"),
        "{err}"
    );
    let err = train_exits(
        &write("a.ron", "AttentionAdapter"),
        &dir.path().join("o3"),
        &ExitTrainSpec {
            train_adapters: true,
            ..spec.clone()
        },
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--train-adapters"), "{err}");
}

/// Under continuous batching a token budget counts a speculative row as the tokens its
/// verification may run (its last token and up to γ drafts, no more than it may still
/// produce): with a budget of 8 and γ = 6, a second request's 7-token prompt joins only in
/// the first request's last step (1 token to go, no drafts: 1 + 7 tokens); with plain
/// decoding (1 token a row) it joins at once.
#[test]
fn a_token_budget_counts_the_tokens_a_cycle_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let p = model(dir.path(), 3, 97, 5, &[1]);
    let prs: Vec<Vec<u32>> = vec![(3..10).collect(), (10..17).collect()];
    let mut reqs = requests(&prs, 12, |_| None);
    reqs[1].arrival_s = reqs[0].arrival_s;
    let policy = Batching::Continuous {
        max_batch: 4,
        token_budget: 8,
    };
    let spec_out = serve(
        &p,
        reqs.clone(),
        policy.clone(),
        Decoding::greedy(),
        &spec(1, 6, None),
    );
    let first = |o: &RequestOutcome| o.first_token_s.unwrap();
    let finish = |o: &RequestOutcome| o.finish_s.unwrap();
    assert!(spec_out[0].speculative.unwrap().drafted > 0);
    assert!(
        first(&spec_out[1]) >= finish(&spec_out[0]),
        "the second prompt joined while the first request's cycles filled the budget"
    );
    let plain = serve(&p, reqs, policy, Decoding::greedy(), &Depth::Full);
    assert!(
        first(&plain[1]) < finish(&plain[0]),
        "with one token a row the second prompt joins at once"
    );
}
