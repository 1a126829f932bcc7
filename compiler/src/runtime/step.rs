//! The execute system: runs the planned batch through one stage of layers (or, with
//! SkipDecode, each token's whole path) and leaves per-sequence results for `decide`.

use super::{
    add_stage_busy, cost, Clock, Engine, Executor, Kv, Plan, Progress, Recorder, Request,
    StageResult, StageResults, StepTokens,
};
use crate::exits::{Depth, SkipDecode};
use crate::lower::{KvCache, Segment, StageOutput};
use bevy_ecs::prelude::*;
use candle_core::Tensor;
use std::time::Instant;

/// The tokens a sequence runs this step: its prompt, or its last token.
fn step_ids(req: &Request, p: &Progress) -> Vec<u32> {
    match p.tokens.last() {
        Some(&t) => vec![t],
        None => req.0.prompt.clone(),
    }
}

fn finish_step(clock: &mut Clock, recorder: &mut Recorder, stage: usize, s: f64, batch: usize) {
    clock.now_s += s;
    clock.busy_s += s;
    add_stage_busy(recorder, stage, s);
    clock.step += 1;
    let now = clock.now_s;
    recorder.occupancy.push((now, batch));
}

#[allow(clippy::too_many_arguments)]
pub(super) fn execute(
    engine: Res<Engine>,
    plan: Res<Plan>,
    mut clock: ResMut<Clock>,
    mut produced: ResMut<StepTokens>,
    mut results: ResMut<StageResults>,
    mut recorder: ResMut<Recorder>,
    mut seqs: Query<(&Request, &mut Progress, &mut Kv)>,
) {
    produced.0.clear();
    results.entries.clear();
    if plan.0.is_empty() {
        return;
    }
    let layers = engine.program.graph().info.num_layers;
    let stage = plan
        .0
        .first()
        .and_then(|&e| seqs.get(e).ok())
        .map_or(0, |(_, p, _)| p.stage);
    let range = engine.stage_range(stage);
    let last_stage = range.end == layers;
    results.stage = stage;
    results.range = range.clone();
    // A token starting its way down begins a fresh record of its path.
    if stage == 0 {
        for &e in &plan.0 {
            if let Ok((_, mut p, _)) = seqs.get_mut(e) {
                p.track = Default::default();
            }
        }
    }
    if let Executor::Sim(model) = &engine.executor {
        let mut shapes = Vec::new();
        let mut layer_share = 0.0;
        for &e in &plan.0 {
            let Ok((req, mut p, _)) = seqs.get_mut(e) else {
                continue;
            };
            let shape = if p.produced == 0 {
                (req.0.prompt.len(), 0)
            } else {
                (1, req.0.prompt.len() + p.produced - 1)
            };
            let run = match &engine.depth {
                Depth::SkipDecode(s) if p.produced > 0 => {
                    s.layers_at(p.produced - 1, req.0.max_new_tokens.saturating_sub(1))
                }
                _ => range.len(),
            };
            layer_share += run as f64 * shape.0 as f64;
            shapes.push(shape);
            let path = skip_or_range(&engine.depth, &p, &req.0, range.clone(), layers);
            p.track.layers.extend(path);
            p.track.exit_layer = p.track.layers.len();
            p.stage = if last_stage { 0 } else { stage + 1 };
        }
        let tokens: usize = shapes.iter().map(|s| s.0).sum();
        let share = layer_share / (tokens.max(1) * layers.max(1)) as f64;
        let step_s = share * model.predict(tokens, cost::attention_work(&shapes), shapes.len());
        if last_stage {
            produced.0 = plan.0.iter().map(|&e| (e, None)).collect();
        }
        finish_step(&mut clock, &mut recorder, stage, step_s, plan.0.len());
        return;
    }
    // Caches (and carried hidden states) leave their components for the step and go back
    // after it.
    let mut taken: Vec<Taken> = Vec::with_capacity(plan.0.len());
    for &e in &plan.0 {
        if let Ok((req, mut p, mut kv)) = seqs.get_mut(e) {
            let ids = step_ids(req, &p);
            let carried = p.carried.take();
            let n = match &engine.depth {
                Depth::SkipDecode(s) if p.produced > 0 => {
                    s.layers_at(p.produced - 1, req.0.max_new_tokens.saturating_sub(1))
                }
                _ => layers,
            };
            let path = skip_or_range(&engine.depth, &p, &req.0, range.clone(), layers);
            p.track.layers.extend(path);
            taken.push((e, ids, std::mem::take(&mut kv.0), carried, n));
        }
    }
    let started = Instant::now();
    let outcome = match &engine.depth {
        Depth::SkipDecode(s) => run_skipdecode(&engine, s, &mut taken),
        _ => run_stage(&engine, &mut taken, stage, range.clone(), last_stage),
    };
    let elapsed = started.elapsed().as_secs_f64();
    for (e, _, cache, _, _) in taken {
        if let Ok((_, _, mut kv)) = seqs.get_mut(e) {
            kv.0 = cache;
        }
    }
    match outcome {
        Ok(entries) => {
            results.entries = entries;
            finish_step(&mut clock, &mut recorder, stage, elapsed, plan.0.len());
        }
        Err(e) => recorder.error = Some(e),
    }
}

/// The layers a sequence runs in this step.
fn skip_or_range(
    depth: &Depth,
    p: &Progress,
    req: &super::workload::RequestSpec,
    range: std::ops::Range<usize>,
    layers: usize,
) -> Vec<usize> {
    match depth {
        Depth::SkipDecode(s) if p.produced > 0 => {
            let n = s.layers_at(p.produced - 1, req.max_new_tokens.saturating_sub(1));
            let (warm, top) = s.path(n, layers);
            warm.chain(top).collect()
        }
        _ => range.collect(),
    }
}

type Taken = (Entity, Vec<u32>, KvCache, Option<Tensor>, usize);

/// One stage for every planned sequence, with the exit head at its end when it has one.
fn run_stage(
    engine: &Engine,
    taken: &mut [Taken],
    stage: usize,
    range: std::ops::Range<usize>,
    last_stage: bool,
) -> Result<Vec<StageResult>, String> {
    let end = range.end;
    let at_exit = !last_stage
        && matches!(engine.depth, Depth::EarlyExit { .. })
        && engine.exits.contains(&end);
    let mut extras: Vec<String> = Vec::new();
    if at_exit {
        extras.push(format!("exit.{end}.logits"));
        if engine.gates {
            extras.push(format!("exit.{end}.gate"));
        }
    }
    let extra_refs: Vec<&str> = extras.iter().map(String::as_str).collect();
    let carried: Vec<Tensor> = taken.iter_mut().filter_map(|t| t.3.take()).collect();
    if stage > 0 && carried.len() != taken.len() {
        return Err("a sequence in a later stage lost its hidden state".into());
    }
    let mut segments: Vec<Segment> = taken
        .iter_mut()
        .map(|(_, ids, cache, _, _)| Segment { ids, cache })
        .collect();
    let carried_ref = (stage > 0).then_some(carried.as_slice());
    let (out, extra) = engine
        .program
        .forward_stage_with(&mut segments, range, carried_ref, &extra_refs)
        .map_err(|e| e.to_string())?;
    let mut exit_logits = extra.first().cloned().map(|v| v.into_iter());
    let mut gates = extra.get(1).cloned().map(|v| v.into_iter());
    let mut entries = Vec::with_capacity(taken.len());
    match out {
        StageOutput::Logits(logits) => {
            for ((e, ..), l) in taken.iter().zip(logits) {
                entries.push(StageResult {
                    entity: *e,
                    logits: Some(l),
                    ..StageResult::new(*e)
                });
            }
        }
        StageOutput::Hidden(hidden) => {
            for ((e, ..), h) in taken.iter().zip(hidden) {
                entries.push(StageResult {
                    hidden: Some(h),
                    exit_logits: exit_logits.as_mut().and_then(Iterator::next),
                    gate: gates.as_mut().and_then(Iterator::next),
                    ..StageResult::new(*e)
                });
            }
        }
    }
    Ok(entries)
}

/// SkipDecode: every planned token's whole path in this step. Prompts run every layer;
/// generated tokens run the warm-up layers together, then their top layers grouped by depth.
fn run_skipdecode(
    engine: &Engine,
    s: &SkipDecode,
    taken: &mut [Taken],
) -> Result<Vec<StageResult>, String> {
    let program = &engine.program;
    let layers = program.graph().info.num_layers;
    // Groups of equal depth are contiguous once sorted (result order follows entities).
    taken.sort_by_key(|t| t.4);
    let mut logits: Vec<Tensor> = Vec::with_capacity(taken.len());
    for group in taken.chunk_by_mut(|a, b| a.4 == b.4) {
        let n = group[0].4;
        let (warm, top) = if n >= layers {
            (0..0, 0..layers)
        } else {
            s.path(n, layers)
        };
        let mut carried: Option<Vec<Tensor>> = None;
        if !warm.is_empty() {
            let mut segments: Vec<Segment> = group
                .iter_mut()
                .map(|t| Segment {
                    ids: &t.1,
                    cache: &mut t.2,
                })
                .collect();
            match program
                .forward_stage(&mut segments, warm, None)
                .map_err(|e| e.to_string())?
            {
                StageOutput::Hidden(h) => carried = Some(h),
                StageOutput::Logits(_) => return Err("the warm-up produced logits".into()),
            }
        }
        let mut segments: Vec<Segment> = group
            .iter_mut()
            .map(|t| Segment {
                ids: &t.1,
                cache: &mut t.2,
            })
            .collect();
        let out = program
            .forward_stage(&mut segments, top, carried.as_deref())
            .map_err(|e| e.to_string())?;
        let StageOutput::Logits(ls) = out else {
            return Err("the top layers produced no logits".into());
        };
        logits.extend(ls);
    }
    Ok(taken
        .iter()
        .zip(logits)
        .map(|(t, l)| StageResult {
            logits: Some(l),
            ..StageResult::new(t.0)
        })
        .collect())
}
