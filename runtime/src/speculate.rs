//! Self-speculative decode steps: for every planned request with a [`SpecPlan`], one cycle
//! of drafting and verification, batched over the requests.
//!
//! A request's cache holds every layer's keys and values up to its last token `x` at
//! position `p` (not yet run). A cycle:
//! 1. **Draft.** `x` runs the layers below `draft_exit`; the exit head there (or, with
//!    `draft_exit` = the model's depth, the model's own head) gives the first draft token
//!    `d1`, which runs the same layers and gives `d2`, and so on, up to `max_draft` tokens or
//!    until a drafted token's top-1 probability under the draft is below `stop_below`
//!    (Kangaroo's rule: that token stays in the draft). The last draft token runs the
//!    shallow layers too, without the head. Only the layers below `draft_exit` append
//!    keys and values; the streams after them are kept.
//! 2. **Verify.** One call enters at `draft_exit` with the kept streams of `x, d1 .. dk` and
//!    runs the remaining layers and the model's head at every position: the full model's
//!    logits after `x` and after each draft. The shallow layers are not recomputed.
//! 3. **Keep.** Greedy: the longest prefix of the drafts equal to the full model's tokens,
//!    then the full model's token after it. Sampling: speculative sampling (accept each
//!    draft with probability `min(1, p/q)`, replace the first rejected one from
//!    `max(0, p - q)` normalised, or add a token from `p` after the last draft).
//! 4. **Roll back.** Every layer's cache is cut back to `x` and the kept drafts, so the
//!    next cycle starts like step 1 at the new last token.
//!
//! Rows are batched per draft depth: each drafting round is one call for every row still
//! drafting (and one for rows running their last draft token's shallow pass), the
//! verification one call for all rows.

use super::metrics::{SpecCounts, Speculated};
use super::step::Row;
use super::{Engine, StepError};
use bevy_ecs::prelude::*;
use candle_core::{DType, Tensor};
use exitgraph_compiler::exits::speculative::{
    accept_greedy, accepts, argmax, distribution, residual,
};
use exitgraph_compiler::exits::{rule::softmax, SelfSpeculative};
use exitgraph_compiler::generate::Sampling;
use exitgraph_compiler::lower::{KvCache, Program, Run, Segment, Task, Want};
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::rngs::StdRng;
use rand::Rng;
use std::time::Instant;

/// A request's random stream for drafting and acceptance (sampling only), taken out for
/// the step that uses it. Seeded from the request's sampler seed through [`stream_seed`],
/// so it never replays the draws of the sampler that picked the prompt's token.
#[derive(Component)]
pub struct SpecRng(pub Option<rand::rngs::StdRng>);

/// The seed of self-speculation's random stream for a request whose sampler has `seed`: a
/// SplitMix64 step of `seed` with a tag, so the two streams differ.
pub fn stream_seed(seed: u64) -> u64 {
    let mut z = seed ^ 0x5350_4543_554c_4154; // "SPECULAT"
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What one row's cycle gives.
pub(super) struct Cycle {
    pub entity: Entity,
    /// The kept tokens, in order, and how each came to be.
    pub tokens: Vec<(u32, Speculated)>,
    pub counts: SpecCounts,
}

/// One row's part of a cycle in progress.
struct Draft {
    spec: SelfSpeculative,
    /// `x` and the drafts so far.
    tokens: Vec<u32>,
    /// Streams after the shallow layers, one `[1, hidden]` per token that ran them.
    states: Vec<Tensor>,
    /// Under sampling, the draft's distribution for each drafted token.
    q: Vec<Vec<f32>>,
    /// Most tokens it may draft (also bounded by the tokens it may still produce).
    limit: usize,
    /// Still drafting.
    open: bool,
}

/// Runs one cycle for each row: `specs[i]` is row `i`'s settings and the tokens it may still
/// produce, `rngs[i]` its random stream. Rows keep their caches, rolled back to what was
/// kept.
pub(super) fn run_cycles(
    engine: &Engine,
    rows: &mut [Row],
    specs: &[(SelfSpeculative, usize)],
    rngs: &mut [Option<StdRng>],
) -> Result<Vec<Cycle>, StepError> {
    let mut cycles = Vec::with_capacity(rows.len());
    let mut depths: Vec<usize> = specs.iter().map(|(s, _)| s.draft_exit).collect();
    depths.sort_unstable();
    depths.dedup();
    for depth in depths {
        let members: Vec<usize> = (0..rows.len())
            .filter(|&i| specs[i].0.draft_exit == depth)
            .collect();
        let mut group: Vec<&mut Row> = rows
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| specs[*i].0.draft_exit == depth)
            .map(|(_, r)| r)
            .collect();
        let setup: Vec<(SelfSpeculative, usize)> = members.iter().map(|&i| specs[i]).collect();
        let mut group_rngs: Vec<Option<&mut StdRng>> = Vec::with_capacity(members.len());
        for (i, r) in rngs.iter_mut().enumerate() {
            if specs[i].0.draft_exit == depth {
                group_rngs.push(r.as_mut());
            }
        }
        cycles.extend(cycle_group(
            &engine.program,
            &engine.decoding.rule,
            depth,
            &mut group,
            &setup,
            &mut group_rngs,
        )?);
    }
    Ok(cycles)
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<f32>>, StepError> {
    Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

fn sample(dist: &[f32], rng: &mut StdRng) -> Result<u32, StepError> {
    let w = WeightedIndex::new(dist)
        .map_err(|e| StepError::Speculation(format!("sampling from the distribution: {e}")))?;
    Ok(w.sample(rng) as u32)
}

/// One greedy self-speculative cycle of one sequence, outside the runtime (the runtime's
/// own code, for tests and studies): `cache` holds every position before `start`, `last` is
/// the token at `start`, and at most `budget` tokens may be kept. Returns the kept tokens
/// and the cycle's counts; the cache is rolled back to `start + kept.len()`.
pub fn greedy_cycle(
    program: &Program,
    cache: &mut KvCache,
    last: u32,
    start: usize,
    spec: SelfSpeculative,
    budget: usize,
) -> Result<(Vec<u32>, SpecCounts), StepError> {
    spec.validate(program.graph())
        .map_err(StepError::Speculation)?;
    if budget == 0 {
        return Err(StepError::Speculation(
            "a cycle keeps at least one token".into(),
        ));
    }
    let mut row = Row {
        entity: Entity::PLACEHOLDER,
        ids: vec![last],
        start,
        cache: std::mem::take(cache),
        carried: None,
        path: Vec::new(),
        stage: 0,
        may_exit: false,
    };
    let out = cycle_group(
        program,
        &Sampling::Greedy,
        spec.draft_exit,
        &mut [&mut row],
        &[(spec, budget)],
        &mut [None],
    );
    *cache = row.cache;
    let cycle = out?.pop().ok_or(StepError::Lost("a cycle gave nothing"))?;
    Ok((
        cycle.tokens.into_iter().map(|(t, _)| t).collect(),
        cycle.counts,
    ))
}

/// The cycles of rows that all draft after `depth` layers.
fn cycle_group(
    program: &Program,
    sampling: &Sampling,
    depth: usize,
    rows: &mut [&mut Row],
    setup: &[(SelfSpeculative, usize)],
    rngs: &mut [Option<&mut StdRng>],
) -> Result<Vec<Cycle>, StepError> {
    let layers = program.graph().info.num_layers;
    let head = if depth == layers {
        program.logits_node()?
    } else {
        program
            .graph()
            .exit_at(depth)
            .and_then(|e| e.logits)
            .ok_or(StepError::Lost("the draft's exit head is gone"))?
    };
    let stream = program.stream_node(depth)?;
    let greedy = matches!(sampling, Sampling::Greedy);
    let mut drafts: Vec<Draft> = rows
        .iter()
        .zip(setup)
        .map(|(row, &(spec, budget))| {
            // Every kept draft and the token after them count against the budget.
            let limit = spec.max_draft.min(budget.saturating_sub(1));
            Draft {
                spec,
                tokens: row.ids.clone(),
                states: Vec::new(),
                q: Vec::new(),
                limit,
                open: limit > 0,
            }
        })
        .collect();
    let starts: Vec<usize> = rows.iter().map(|r| r.start).collect();
    let mut counts = vec![SpecCounts::default(); rows.len()];
    // Drafting rounds: round j runs token j of every row that has one.
    for j in 0.. {
        let due: Vec<usize> = (0..rows.len())
            .filter(|&i| drafts[i].tokens.len() > j)
            .collect();
        if due.is_empty() {
            break;
        }
        // One call per round: with the draft head when any row still drafts (rows that
        // stopped ignore its logits: one extra head row each), without it otherwise.
        let with_head = due.iter().any(|&i| drafts[i].open);
        {
            let members = due;
            let started = Instant::now();
            let ids: Vec<[u32; 1]> = members.iter().map(|&i| [drafts[i].tokens[j]]).collect();
            let mut want = vec![Want::all(stream)];
            if with_head {
                want.push(Want::last(head));
            }
            let run = Run {
                from: 0,
                task: Task::Outputs(want),
                commit: false,
            };
            let out = {
                let mut segments: Vec<Segment> = Vec::with_capacity(members.len());
                let mut k = 0;
                for (i, row) in rows.iter_mut().enumerate() {
                    if members.get(k) == Some(&i) {
                        segments.push(Segment {
                            ids: &ids[k],
                            start: starts[i] + j,
                            state: None,
                            cache: &mut row.cache,
                        });
                        k += 1;
                    }
                }
                program.run(&mut segments, &run)?
            };
            program.device().synchronize()?;
            let seconds = started.elapsed().as_secs_f64();
            for (&i, values) in members.iter().zip(out) {
                let mut values = values.into_iter();
                let state = values
                    .next()
                    .ok_or(StepError::Lost("a draft call returned nothing"))?;
                let d = &mut drafts[i];
                d.states.push(state);
                counts[i].shallow_tokens += 1;
                counts[i].draft_s += seconds / members.len() as f64;
                if !(with_head && d.open) {
                    continue;
                }
                let logits = values
                    .next()
                    .ok_or(StepError::Lost("a draft call returned no logits"))?;
                let logits = to_rows(&logits)?.pop().unwrap_or_default();
                let top1 = softmax(&logits).into_iter().fold(0.0f32, f32::max);
                let token = if greedy {
                    argmax(&logits).unwrap_or(0) as u32
                } else {
                    let q = distribution(&logits, sampling);
                    let rng = rngs[i]
                        .as_deref_mut()
                        .ok_or(StepError::Lost("a sampling request lost its random stream"))?;
                    let t = sample(&q, rng)?;
                    d.q.push(q);
                    t
                };
                d.tokens.push(token);
                counts[i].drafted += 1;
                if d.tokens.len() > d.limit || d.spec.stops_after(top1) {
                    d.open = false;
                }
            }
        }
    }
    // Verification: every row's tokens from the draft depth on, in one call.
    let started = Instant::now();
    let logits_node = program.logits_node()?;
    let states: Vec<Tensor> = drafts
        .iter()
        .map(|d| Tensor::cat(&d.states, 0))
        .collect::<Result<_, _>>()?;
    let run = Run {
        from: depth,
        task: Task::Outputs(vec![Want::all(logits_node)]),
        commit: true,
    };
    let out = {
        let mut segments: Vec<Segment> = rows
            .iter_mut()
            .zip(&drafts)
            .zip(states)
            .map(|((row, d), state)| Segment {
                ids: &d.tokens,
                start: row.start,
                state: Some(state),
                cache: &mut row.cache,
            })
            .collect();
        program.run(&mut segments, &run)?
    };
    program.device().synchronize()?;
    let seconds = started.elapsed().as_secs_f64();
    let mut cycles = Vec::with_capacity(rows.len());
    for (i, values) in out.into_iter().enumerate() {
        let logits = values
            .into_iter()
            .next()
            .ok_or(StepError::Lost("verification returned nothing"))?;
        let full = to_rows(&logits)?;
        let d = &drafts[i];
        let drafted = &d.tokens[1..];
        let kept: Vec<u32> = if greedy {
            let targets: Vec<u32> = full.iter().map(|l| argmax(l).unwrap_or(0) as u32).collect();
            accept_greedy(drafted, &targets)
        } else {
            let rng = rngs[i]
                .as_deref_mut()
                .ok_or(StepError::Lost("a sampling request lost its random stream"))?;
            let mut kept = Vec::with_capacity(drafted.len() + 1);
            let mut rejected = false;
            for (k, &token) in drafted.iter().enumerate() {
                let p = distribution(&full[k], sampling);
                let u: f64 = rng.random();
                if accepts(&p, &d.q[k], token, u) {
                    kept.push(token);
                } else {
                    kept.push(sample(&residual(&p, &d.q[k]), rng)?);
                    rejected = true;
                    break;
                }
            }
            if !rejected {
                let p = distribution(&full[drafted.len()], sampling);
                kept.push(sample(&p, rng)?);
            }
            kept
        };
        let accepted = kept.len() - 1;
        let last = if accepted == drafted.len() {
            Speculated::Bonus
        } else {
            Speculated::Rejected
        };
        // Keep `x` and the accepted drafts: the new last token is not run yet.
        rows[i].cache.truncate(rows[i].start + kept.len())?;
        let c = &mut counts[i];
        c.cycles = 1;
        c.accepted = accepted;
        c.produced = kept.len();
        c.verify_s = seconds / drafts.len() as f64;
        let marks = (0..kept.len()).map(|k| {
            if k < accepted {
                Speculated::Accepted
            } else {
                last
            }
        });
        cycles.push(Cycle {
            entity: rows[i].entity,
            tokens: kept.iter().copied().zip(marks).collect(),
            counts: *c,
        });
    }
    Ok(cycles)
}
