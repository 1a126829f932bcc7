//! The decide systems: turn a step's results into tokens. At the last layer the model's own
//! head speaks; at an exit head a request with an [`ExitPlan`] asks its rule whether the
//! token stops there. Exited tokens leave the batch: `copy_state` gives their skipped
//! layers keys and values from the exit state (CALM's state copying), or counts them absent
//! there (`SkippedKv::Absent`); the rest carry their hidden state to the next stage.

use super::strategy::ExitPlan;
use super::trace::LayerSignal;
use super::{
    Clock, Emitted, Engine, Kv, Progress, Recorder, Request, Sampler, StageResult, StageResults,
    StepError, StepTokens,
};
use bevy_ecs::prelude::*;
use candle_core::{DType, Tensor};
use exitgraph_compiler::exits::rule::{softmax, top2, ExitView};
use exitgraph_compiler::lower::{KvCache, Run, Segment, Task};
use std::time::Instant;

/// Tokens that stopped at an exit head this step: their exit states, for `copy_state`.
#[derive(Resource, Default)]
pub struct Exited {
    /// The token, its exit state and the layers run before its exit.
    pub states: Vec<(Entity, Tensor, usize)>,
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, StepError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The last row of a `[tokens, hidden]` state.
fn last_row(h: &Tensor) -> Result<Vec<f32>, StepError> {
    let n = h.dim(0)?;
    to_vec(&h.get(n.saturating_sub(1))?)
}

/// The token this step gives: the forced one, or a sample; adds the forced token's NLL.
fn choose(
    req: &Request,
    p: &mut Progress,
    logits: &Tensor,
    sampler: Option<Mut<Sampler>>,
) -> Result<u32, StepError> {
    if let Some(&forced) = req.0.forced.get(p.produced) {
        let probs = softmax(&to_vec(logits)?);
        let prob = probs
            .get(forced as usize)
            .copied()
            .unwrap_or(0.0)
            .max(1e-30);
        p.nll -= (prob as f64).ln();
        if p.produced == 0 {
            p.first_nll = -(prob as f64).ln();
        }
        return Ok(forced);
    }
    let l = logits.to_dtype(DType::F32)?;
    Ok(match sampler {
        Some(mut s) => s.0.sample(&l)?,
        None => l.argmax(0)?.to_scalar::<u32>()?,
    })
}

/// What the exit rule saw and said at one exit head.
fn consult(
    plan: &ExitPlan,
    p: &mut Progress,
    max_tokens: usize,
    after: usize,
    r: &StageResult,
    exit_logits: &Tensor,
    hidden: &Tensor,
) -> Result<bool, StepError> {
    let probs = softmax(&to_vec(exit_logits)?);
    let state = last_row(hidden)?;
    let below = r.below.as_ref().map(to_vec).transpose()?;
    let gate = r.gate.as_ref();
    let gate = match gate {
        Some(g) => {
            let x = to_vec(g)?.first().copied().unwrap_or(0.0);
            Some(1.0 / (1.0 + (-x).exp()))
        }
        None => None,
    };
    let (fire, signal) = plan.rule.decide(&ExitView {
        probs: &probs,
        hidden: &state,
        prev_hidden: below.as_deref(),
        gate,
        earlier: &p.track.earlier,
        index: p.produced,
        max_tokens,
    });
    let top = top2(&probs).0;
    p.track.signals.push(LayerSignal {
        layer: after,
        value: signal,
        token: Some(top),
    });
    p.track.earlier.push(top);
    p.track.oracle.push((after, top));
    p.track.heads += 1;
    Ok(fire)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn decide(
    engine: Res<Engine>,
    mut results: ResMut<StageResults>,
    mut produced: ResMut<StepTokens>,
    mut exited: ResMut<Exited>,
    mut seqs: Query<(&Request, &mut Progress, Option<&ExitPlan>)>,
    mut samplers: Query<&mut Sampler>,
    mut clock: ResMut<Clock>,
    mut recorder: ResMut<Recorder>,
) -> Result<(), StepError> {
    // Deciding (host-side softmax over the vocabulary, copies, sampling) is work of the
    // step: the clock counts it.
    let started = Instant::now();
    let (stage, any) = (results.stage, !results.entries.is_empty());
    let outcome = decide_rows(
        &engine,
        &mut results,
        &mut produced,
        &mut exited,
        &mut seqs,
        &mut samplers,
    );
    if any {
        let elapsed = started.elapsed().as_secs_f64();
        super::add_busy(&mut clock, &mut recorder, stage, elapsed);
    }
    outcome
}

fn decide_rows(
    engine: &Engine,
    results: &mut StageResults,
    produced: &mut StepTokens,
    exited: &mut Exited,
    seqs: &mut Query<(&Request, &mut Progress, Option<&ExitPlan>)>,
    samplers: &mut Query<&mut Sampler>,
) -> Result<(), StepError> {
    exited.states.clear();
    let layers = engine.program.graph().info.num_layers;
    for mut r in std::mem::take(&mut results.entries) {
        let (stage, end) = (r.stage, r.end);
        let Ok((req, mut p, plan)) = seqs.get_mut(r.entity) else {
            continue;
        };
        if let Some(logits) = &r.logits {
            let token = choose(req, &mut p, logits, samplers.get_mut(r.entity).ok())?;
            let run = p.track.layers.len();
            p.track.exit_layer = match plan {
                Some(plan) if plan.rule.is_oracle() => p
                    .track
                    .oracle
                    .iter()
                    .find(|(_, t)| *t == token)
                    .map_or(layers, |(k, _)| *k),
                _ => run,
            };
            // The model's own head produced it (an oracle's exit is only costed as one, by
            // `eval exits`).
            p.track.final_head = true;
            p.stage = 0;
            p.sim_exit = None;
            produced.0.push(Emitted::one(r.entity, Some(token)));
            continue;
        }
        let hidden = r
            .hidden
            .take()
            .ok_or(StepError::Lost("a stage returned nothing"))?;
        // Given exit depths: the token leaves at its depth, from the exit head there.
        if let (Some(_), Some(exit_logits)) = (&engine.sim_exits, &r.exit_logits) {
            p.track.heads += 1;
            if p.sim_exit == Some(end) {
                let token = choose(req, &mut p, exit_logits, samplers.get_mut(r.entity).ok())?;
                p.track.exit_layer = end;
                p.track.filled = filled(engine, layers - end);
                p.stage = 0;
                p.sim_exit = None;
                produced.0.push(Emitted::one(r.entity, Some(token)));
                exited.states.push((r.entity, hidden, end));
                continue;
            }
        }
        // A prompt's token comes from the full model: it never exits.
        if let (Some(plan), Some(exit_logits), true) = (plan, &r.exit_logits, p.produced > 0) {
            let max_tokens = req.0.max_new_tokens;
            if consult(plan, &mut p, max_tokens, end, &r, exit_logits, &hidden)? {
                let token = choose(req, &mut p, exit_logits, samplers.get_mut(r.entity).ok())?;
                p.track.exit_layer = end;
                p.track.filled = filled(engine, layers - end);
                p.stage = 0;
                produced.0.push(Emitted::one(r.entity, Some(token)));
                exited.states.push((r.entity, hidden, end));
                continue;
            }
        }
        p.carried = Some(hidden);
        p.stage = stage + 1;
    }
    Ok(())
}

/// State copying for the tokens that exited this step, in one batch: keys and values of
/// the layers they skipped, from their exit states.
pub(super) fn copy_state(
    engine: Res<Engine>,
    results: Res<StageResults>,
    mut exited: ResMut<Exited>,
    mut clock: ResMut<Clock>,
    mut recorder: ResMut<Recorder>,
    mut seqs: Query<(&Request, &Progress, &mut Kv)>,
) -> Result<(), StepError> {
    if exited.states.is_empty() {
        return Ok(());
    }
    // One call per exit point (under looped depth-wise batching, tokens of one step can
    // leave after different iterations).
    let mut states = std::mem::take(&mut exited.states);
    states.sort_by(|a, b| a.2.cmp(&b.2).then(a.0.cmp(&b.0)));
    let started = Instant::now();
    let mut outcome = Ok(());
    let absent = engine.skipped_kv == crate::sim_exits::SkippedKv::Absent;
    for group in states.chunk_by(|a, b| a.2 == b.2) {
        if outcome.is_ok() {
            outcome = fill_group(&engine, group, &mut seqs, absent);
        }
    }
    // A GPU queues work: the calls' time ends when their work has run.
    let synced = engine.program.device().synchronize();
    let elapsed = started.elapsed().as_secs_f64();
    outcome?;
    synced?;
    super::add_busy(&mut clock, &mut recorder, results.stage, elapsed);
    Ok(())
}

/// State copying for tokens that left after the same layer, in one batch; with `absent`,
/// their positions are instead counted as absent in the layers they skipped (nothing runs).
fn fill_group(
    engine: &Engine,
    group: &[(Entity, Tensor, usize)],
    seqs: &mut Query<(&Request, &Progress, &mut Kv)>,
    absent: bool,
) -> Result<(), StepError> {
    struct Row {
        entity: Entity,
        ids: Vec<u32>,
        start: usize,
        cache: KvCache,
        state: Tensor,
    }
    let after = group.first().map_or(0, |s| s.2);
    let mut rows = Vec::with_capacity(group.len());
    for (e, state, _) in group {
        let (e, state) = (*e, state.clone());
        if let Ok((req, p, mut kv)) = seqs.get_mut(e) {
            // The token that just ran (the chosen one is emitted after this system).
            let n = p.tokens.len();
            let (ids, start) = match p.tokens.last() {
                Some(&t) => (vec![t], req.0.prompt.len() + n - 1),
                None => (req.0.prompt.clone(), 0),
            };
            rows.push(Row {
                entity: e,
                ids,
                start,
                cache: std::mem::take(&mut kv.0),
                state,
            });
        }
    }
    let mut segments: Vec<Segment> = rows
        .iter_mut()
        .map(|r| Segment {
            ids: &r.ids,
            start: r.start,
            state: Some(r.state.clone()),
            cache: &mut r.cache,
        })
        .collect();
    let run = Run {
        from: after,
        task: if absent { Task::AbsentKv } else { Task::FillKv },
        commit: true,
    };
    let result = engine.program.run(&mut segments, &run);
    drop(segments);
    for r in rows {
        if let Ok((_, _, mut kv)) = seqs.get_mut(r.entity) {
            kv.0 = r.cache;
        }
    }
    result?;
    Ok(())
}

/// Layers whose keys and values a token leaving with `skipped` layers to go gets filled.
fn filled(engine: &Engine, skipped: usize) -> usize {
    match engine.skipped_kv {
        crate::sim_exits::SkippedKv::Filled => skipped,
        crate::sim_exits::SkippedKv::Absent => 0,
    }
}
