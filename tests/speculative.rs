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
use exitgraph::synth::{write_random_llama, LlamaSpec};
use exitgraph_passes::{HeadKind, InsertExits, Pass, PassContext};
use proptest::prelude::*;
use std::path::Path;
use std::sync::Arc;

fn model(dir: &Path, layers: usize, vocab: usize, seed: u64, exits: &[usize]) -> Arc<Program> {
    model_with(dir, layers, vocab, seed, exits, LlamaSpec::tiny().init_std)
}

fn model_with(
    dir: &Path,
    layers: usize,
    vocab: usize,
    seed: u64,
    exits: &[usize],
    init_std: f32,
) -> Arc<Program> {
    let mut spec = LlamaSpec::tiny();
    spec.init_std = init_std;
    spec.layers = layers;
    spec.vocab = vocab;
    write_random_llama(dir, &spec, seed).unwrap();
    let mut g = exitgraph_ir::import(dir).unwrap().graph;
    if !exits.is_empty() {
        InsertExits {
            after: exits.to_vec(),
            every: None,
            head: HeadKind::SharedLmHead { norm: true },
            gate: false,
            weights: None,
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
        let p = model(dir.path(), layers, 97, seed, &exits);
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
    let p = model_with(dir.path(), 3, vocab, 7, &[1], 0.6);
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
    #[test]
    fn kv_after_rollback_equals_never_drafting(
        seed in any::<u64>(),
        layers in 2usize..5,
        exit_frac in 0.0f64..1.0,
        max_draft in 1usize..6,
    ) {
        use exitgraph::runtime::speculate::greedy_cycle;
        let dir = tempfile::tempdir().unwrap();
        let draft_exit = 1 + ((exit_frac * layers as f64) as usize).min(layers - 1);
        let exits: Vec<usize> = (1..layers).collect();
        let p = model(dir.path(), layers, 97, seed, &exits);
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
