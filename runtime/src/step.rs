//! The execute system: runs the planned batch and leaves per-sequence results for
//! `decide`. Requests with a [`SkipPlan`] run their token's whole path this step; the others
//! run the current stage of layers (with the exit head at its end when one is there).

use super::speculate::{run_cycles, SpecRng};
use super::strategy::{ExitPlan, SkipPlan, SpecPlan};
use super::{
    add_busy, cost, Clock, Emitted, Engine, Executor, Kv, Plan, Progress, Recorder, Request,
    StageResult, StageResults, StepError, StepTokens,
};
use bevy_ecs::prelude::*;
use candle_core::Tensor;
use exitgraph_compiler::lower::{KvCache, Run, Segment, Task, Want};
use std::time::Instant;

/// One planned sequence, its state taken out of its components for the step.
pub(super) struct Row {
    pub(super) entity: Entity,
    /// The tokens it runs: its prompt, or its last token.
    pub(super) ids: Vec<u32>,
    /// Position of `ids[0]`.
    pub(super) start: usize,
    pub(super) cache: KvCache,
    /// The residual stream the previous stage left.
    pub(super) carried: Option<Tensor>,
    /// The layers its token runs this step.
    pub(super) path: Vec<usize>,
    /// The stage it runs.
    pub(super) stage: usize,
    /// Whether an exit head after the stage may let its token go: it has an exit rule, or
    /// its given exit depth is the stage's end.
    pub(super) may_exit: bool,
}

impl Row {
    fn segment(&mut self) -> Segment<'_> {
        Segment {
            ids: &self.ids,
            start: self.start,
            state: self.carried.clone(),
            cache: &mut self.cache,
        }
    }
}

/// The tokens a sequence runs this step and the position of the first.
fn step_ids(req: &Request, p: &Progress) -> (Vec<u32>, usize) {
    match p.tokens.last() {
        Some(&t) => (vec![t], req.0.prompt.len() + p.tokens.len() - 1),
        None => (req.0.prompt.clone(), 0),
    }
}

/// Books the step's time and records its occupancy: rows in all, and rows per stage.
fn finish_step(
    clock: &mut Clock,
    recorder: &mut Recorder,
    stage: usize,
    s: f64,
    per_stage: Vec<usize>,
) {
    let rows: usize = per_stage.iter().sum();
    if per_stage.iter().filter(|&&n| n > 0).count() > 1 {
        // A looped step ran several stages at once: each gets its rows' share of the time.
        super::add_clock(clock, s);
        for (i, &n) in per_stage.iter().enumerate() {
            super::add_stage_busy(recorder, i, s * n as f64 / rows as f64);
        }
    } else {
        add_busy(clock, recorder, stage, s);
    }
    clock.step += 1;
    let now = clock.now_s;
    recorder.occupancy.push((now, rows));
    recorder.stage_rows.push(per_stage);
}

#[allow(clippy::too_many_arguments)]
pub(super) fn execute(
    engine: Res<Engine>,
    plan: Res<Plan>,
    mut clock: ResMut<Clock>,
    mut produced: ResMut<StepTokens>,
    mut results: ResMut<StageResults>,
    mut recorder: ResMut<Recorder>,
    mut seqs: Query<(&Request, &mut Progress, &mut Kv, Option<&SkipPlan>)>,
    exiting: Query<&ExitPlan>,
    mut speculating: Query<(&SpecPlan, &mut SpecRng)>,
) -> Result<(), StepError> {
    produced.0.clear();
    results.entries.clear();
    if plan.0.is_empty() {
        return Ok(());
    }
    let layers = engine.program.graph().info.num_layers;
    let positions = engine.program.graph().info.max_positions;
    // Every planned row runs its own stage (one stage for all but looped depth-wise
    // batching); the step's time is booked to the deepest.
    let stage = plan
        .0
        .iter()
        .filter_map(|&e| seqs.get(e).ok())
        .map(|(_, p, _, _)| p.stage)
        .max()
        .unwrap_or(0);
    results.stage = stage;
    results.range = engine.stage_range(stage);
    // The layers each planned token runs this step; a token starting its way down begins a
    // fresh record of its path.
    clock.prompt_step = plan
        .0
        .iter()
        .any(|&e| seqs.get(e).is_ok_and(|(_, p, _, _)| p.produced == 0));
    let mut per_stage = vec![0usize; engine.stages()];
    let mut rows: Vec<Row> = Vec::with_capacity(plan.0.len());
    for &e in &plan.0 {
        let Ok((req, mut p, mut kv, skip)) = seqs.get_mut(e) else {
            continue;
        };
        let stage = p.stage;
        let range = engine.stage_range(stage);
        if let Some(n) = per_stage.get_mut(stage) {
            *n += 1;
        }
        if stage == 0 {
            p.track = Default::default();
        }
        // A SkipDecode token runs its own path in one step; the prompt (nothing produced
        // yet) runs with the stage like any full-depth row.
        let path = match skip {
            Some(s) if p.produced > 0 => {
                let pos = req.0.prompt.len() + p.produced - 1;
                s.path(pos, req.0.prompt.len(), positions, layers)
            }
            _ => range.clone().collect(),
        };
        p.track.layers.extend(&path);
        let (ids, start) = step_ids(req, &p);
        let real = matches!(engine.executor, Executor::Real);
        if let (true, 0, Some(sim)) = (real, stage, &engine.sim_exits) {
            // Given exit depths, served for real: the token's depth is drawn as it starts
            // down (a prompt's token comes from the full model).
            p.sim_exit = Some(if p.produced == 0 {
                layers
            } else {
                // The position of the token it produces, as traces record it.
                sim.source
                    .depth(req.0.id, req.0.prompt.len() + p.produced)
                    .map_err(StepError::Simulation)?
            });
        }
        rows.push(Row {
            entity: e,
            ids: if real { ids } else { Vec::new() },
            start,
            cache: if real {
                std::mem::take(&mut kv.0)
            } else {
                KvCache::default()
            },
            carried: p.carried.take(),
            path,
            stage,
            may_exit: exiting.contains(e)
                || (real && engine.sim_exits.is_some() && p.sim_exit == Some(range.end)),
        });
    }
    if let Executor::Sim(model) = &engine.executor {
        // The token and attention terms scale with the layers each row runs; the intercept
        // does not, and the per-sequence term (a norm and LM head at a sequence's last
        // position) is paid by every head a row evaluates: the model's own at the last layer,
        // and, under simulated exits, the exit head at each exit point its token passes.
        let (mut tokens, mut attention, mut sequences, mut headed) = (0.0, 0.0, 0.0, 0);
        // The call's rows (new tokens), for the work that depends on its shape.
        let mut call_rows = 0;
        // Simulated exits: token-equivalents of filling skipped layers' keys and values (their
        // key and value projections' share of the layers' FLOPs), and the largest share of
        // the layers one fill runs and of their work it does (its fixed work).
        // One fill call per exit depth, as the real runtime makes: (tokens, layers, share).
        let mut fills: std::collections::BTreeMap<usize, (f64, f64, f64)> = Default::default();
        // The per-layer fixed work is paid once per distinct path of weights the step runs:
        // rows at different iterations of a looped block read the same weights.
        // (Other policies run distinct layer paths in separate calls.)
        let blocks = &engine.program.graph().blocks;
        let looped = engine.batching.is_looped();
        let mut paths: Vec<Vec<usize>> = rows
            .iter()
            .map(|r| {
                r.path
                    .iter()
                    .map(|&l| match blocks.get(l) {
                        Some(b) if looped => b.weights,
                        _ => l,
                    })
                    .collect()
            })
            .collect();
        paths.sort_unstable();
        paths.dedup();
        let layer_share =
            paths.iter().map(|p| p.len()).sum::<usize>() as f64 / layers.max(1) as f64;
        let mut done = Vec::new();
        for row in &rows {
            let Ok((req, mut p, _, _)) = seqs.get_mut(row.entity) else {
                continue;
            };
            let stage = row.stage;
            let range = engine.stage_range(stage);
            let last_stage = range.end == layers;
            let new_tokens = if p.produced == 0 {
                req.0.prompt.len()
            } else {
                1
            };
            let shape = if p.produced == 0 {
                (new_tokens, 0)
            } else {
                (1, req.0.prompt.len() + p.produced - 1)
            };
            let share = row.path.len() as f64 / layers.max(1) as f64;
            call_rows += shape.0;
            tokens += share * shape.0 as f64;
            sequences += share;
            attention += if p.absent_kv.is_empty() {
                share * cost::attention_work(&[shape]) as f64
            } else {
                // Each layer attends to the positions that have keys and values there.
                row.path
                    .iter()
                    .map(|&l| {
                        let absent = p.absent_kv.get(l).copied().unwrap_or(0);
                        let cached = shape.1.saturating_sub(absent);
                        cost::attention_work(&[(shape.0, cached)]) as f64
                    })
                    .sum::<f64>()
                    / layers.max(1) as f64
            };
            let exit_at = match &engine.sim_exits {
                Some(sim) => {
                    if stage == 0 {
                        // A prompt's token comes from the full model (it never exits in the
                        // real runtime either).
                        let pos = req.0.prompt.len() + p.produced;
                        p.sim_exit = Some(if p.produced == 0 {
                            layers
                        } else {
                            sim.source
                                .depth(req.0.id, pos)
                                .map_err(StepError::Simulation)?
                        });
                    }
                    let exit_at = p.sim_exit.unwrap_or(layers);
                    let passed = sim
                        .source
                        .points()
                        .iter()
                        .filter(|&&k| k > range.start && k <= range.end.min(exit_at))
                        .count();
                    headed += passed;
                    p.track.heads += passed;
                    exit_at
                }
                None => layers,
            };
            if exit_at <= range.end || last_stage {
                let exit_at = exit_at.min(layers);
                if let Some(sim) = engine
                    .sim_exits
                    .as_ref()
                    .filter(|_| engine.skipped_kv == crate::sim_exits::SkippedKv::Filled)
                {
                    let skipped =
                        sim.fill_share[exit_at..].iter().sum::<f64>() / layers.max(1) as f64;
                    if exit_at < layers {
                        let fill = fills.entry(exit_at).or_default();
                        fill.0 += skipped * new_tokens as f64;
                        fill.1 = (layers - exit_at) as f64 / layers.max(1) as f64;
                        fill.2 = skipped;
                    }
                    p.track.filled = layers - exit_at;
                }
                if exit_at < layers
                    && engine.sim_exits.is_some()
                    && engine.skipped_kv == crate::sim_exits::SkippedKv::Absent
                {
                    // The token's keys and values exist only in the layers it ran.
                    if p.absent_kv.is_empty() {
                        p.absent_kv = vec![0; layers];
                    }
                    for a in &mut p.absent_kv[exit_at..] {
                        *a += 1;
                    }
                }
                headed += usize::from(exit_at == layers);
                p.track.exit_layer = exit_at;
                p.track.final_head = exit_at == layers;
                p.stage = 0;
                p.sim_exit = None;
                done.push(row.entity);
            } else {
                p.stage = stage + 1;
            }
        }
        let mut step_s = model.predict_layers(tokens, attention, sequences, headed, layer_share)
            + model.call_work(call_rows, headed, layer_share);
        if looped {
            // Each group of rows at one iteration runs its own adapters (and per-iteration
            // norms) in the looped call.
            let mut iterations: Vec<usize> = rows.iter().map(|r| r.stage).collect();
            iterations.sort_unstable();
            iterations.dedup();
            step_s += model.group_work(iterations.len(), layer_share);
        }
        // Separate calls, one per exit depth, as the real runtime's state copying makes.
        for (filled, fill_layers, fill_kv) in fills.into_values() {
            step_s += model.predict_fill(filled, fill_layers, fill_kv);
        }
        produced.0 = done
            .into_iter()
            .map(|e| super::Emitted::one(e, None))
            .collect();
        finish_step(&mut clock, &mut recorder, stage, step_s, per_stage);
        return Ok(());
    }
    let started = Instant::now();
    // A self-speculative request's decode step is a whole cycle (a forced continuation,
    // which scores every position with the full model, decodes at full depth: the tokens
    // are the same).
    let (mut spec_rows, rows): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| {
        speculating.contains(r.entity)
            && seqs
                .get(r.entity)
                .is_ok_and(|(req, p, _, _)| p.produced > 0 && req.0.forced.is_empty())
    });
    let (mut skip_rows, mut stage_rows): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| {
        seqs.get(r.entity)
            .is_ok_and(|(_, p, _, skip)| skip.is_some() && p.produced > 0)
    });
    // The exit head at the stage's end runs when a token in the stage may stop there; the
    // stream one layer below it when a rule judges saturation.
    let heads = engine.sim_exits.is_some() || stage_rows.iter().any(|r| exiting.contains(r.entity));
    let below = stage_rows.iter().any(|r| {
        exiting
            .get(r.entity)
            .is_ok_and(|plan| plan.rule.needs_previous_layer())
    });
    let wants = StageWants { heads, below };
    let ran = if engine.batching.is_looped() {
        run_looped(&engine, &mut stage_rows, wants)
    } else {
        run_stage(&engine, &mut stage_rows, wants)
    };
    let mut setups = Vec::with_capacity(spec_rows.len());
    let mut rngs = Vec::with_capacity(spec_rows.len());
    for row in &spec_rows {
        let budget = seqs.get(row.entity).map_or(0, |(req, p, _, _)| {
            req.0.max_new_tokens.saturating_sub(p.produced)
        });
        let (plan, mut rng) = speculating
            .get_mut(row.entity)
            .map_err(|_| StepError::Lost("a speculative request lost its plan"))?;
        setups.push((plan.spec, budget));
        rngs.push(rng.0.take());
    }
    let cycles = if spec_rows.is_empty() {
        Ok(Vec::new())
    } else {
        run_cycles(&engine, &mut spec_rows, &setups, &mut rngs)
    };
    for (row, rng) in spec_rows.iter().zip(rngs) {
        if let Ok((_, mut slot)) = speculating.get_mut(row.entity) {
            slot.0 = rng;
        }
    }
    let outcome = ran
        .and_then(|mut a| {
            a.extend(run_paths(&engine, &mut skip_rows)?);
            Ok(a)
        })
        // A GPU queues work: the step's time ends when its work has run.
        .and_then(|a| Ok(engine.program.device().synchronize().map(|_| a)?));
    let elapsed = started.elapsed().as_secs_f64();
    for row in stage_rows.into_iter().chain(skip_rows).chain(spec_rows) {
        if let Ok((_, _, mut kv, _)) = seqs.get_mut(row.entity) {
            kv.0 = row.cache;
        }
    }
    for cycle in cycles? {
        if let Ok((_, mut p, _, _)) = seqs.get_mut(cycle.entity) {
            p.spec.add(&cycle.counts);
            // Every kept token is the full model's: traces record the full depth.
            p.track.layers = (0..layers).collect();
            p.track.exit_layer = layers;
            p.track.final_head = true;
        }
        let (tokens, marks): (Vec<u32>, Vec<_>) = cycle.tokens.into_iter().unzip();
        produced.0.push(Emitted {
            entity: cycle.entity,
            tokens: tokens.into_iter().map(Some).collect(),
            speculated: marks,
        });
    }
    let mut entries = outcome?;
    // Results (and so tokens and trace records) in plan order.
    entries.sort_by_key(|r| plan.0.iter().position(|&e| e == r.entity));
    results.entries = entries;
    finish_step(&mut clock, &mut recorder, stage, elapsed, per_stage);
    Ok(())
}

/// What a stage returns beside its main output.
#[derive(Clone, Copy)]
struct StageWants {
    /// The exit head (and gate) at the stage's end.
    heads: bool,
    /// The stream one layer below the exit (saturation), at the last position.
    below: bool,
}

/// One stage for the rows (all at the same stage), with the exit head at its end when it
/// has one.
fn run_stage(
    engine: &Engine,
    rows: &mut [Row],
    wants: StageWants,
) -> Result<Vec<StageResult>, StepError> {
    let StageWants { heads, below } = wants;
    let Some(stage) = rows.first().map(|r| r.stage) else {
        return Ok(Vec::new());
    };
    if rows.iter().any(|r| r.stage != stage) {
        return Err(StepError::Lost(
            "rows at different stages in one step of a policy that runs one stage",
        ));
    }
    let range = engine.stage_range(stage);
    let program = &engine.program;
    let last_stage = range.end == program.graph().info.num_layers;
    let end = range.end;
    if range.start > 0 && rows.iter().any(|r| r.carried.is_none()) {
        return Err(StepError::Lost(
            "a sequence in a later stage lost its hidden state",
        ));
    }
    let exit = (!last_stage && heads)
        .then(|| program.graph().exit_at(end))
        .flatten();
    let mut want = vec![if last_stage {
        Want::last(program.logits_node()?)
    } else {
        Want::all(program.stream_node(end)?)
    }];
    if let Some(e) = exit {
        want.extend(e.logits.map(Want::last));
        want.extend(e.gate.map(Want::last));
    }
    let (has_logits, has_gate) = (
        exit.is_some_and(|e| e.logits.is_some()),
        exit.is_some_and(|e| e.gate.is_some()),
    );
    let has_below = exit.is_some() && below;
    if has_below {
        want.push(Want::last(program.stream_node(end - 1)?));
    }
    let run = Run {
        from: range.start,
        task: Task::Outputs(want),
        commit: last_stage,
    };
    let mut segments: Vec<Segment> = rows.iter_mut().map(Row::segment).collect();
    let out = program.run(&mut segments, &run)?;
    drop(segments);
    let mut entries = Vec::with_capacity(rows.len());
    for (row, values) in rows.iter().zip(out) {
        let mut values = values.into_iter();
        let main = values
            .next()
            .ok_or(StepError::Lost("a stage returned nothing"))?;
        let mut result = StageResult::new(row.entity, stage, end);
        if last_stage {
            result.logits = Some(squeeze(main)?);
        } else {
            result.hidden = Some(main);
            if has_logits {
                result.exit_logits = values.next().map(squeeze).transpose()?;
            }
            if has_gate {
                result.gate = values.next().map(squeeze).transpose()?;
            }
            if has_below {
                result.below = values.next().map(squeeze).transpose()?;
            }
        }
        entries.push(result);
    }
    Ok(entries)
}

/// Looped depth-wise batching: every row runs one iteration of the looped block from its
/// own depth in one call ([`Program::run_blocks`](exitgraph_compiler::lower::Program::run_blocks):
/// the shared weights once for all rows, each group of rows at one iteration with its own
/// adapters and KV slots), then the heads, per exit point: the model's own for rows at the
/// last iteration (committing their caches), the exit head after the iteration for rows
/// whose token may leave there.
fn run_looped(
    engine: &Engine,
    rows: &mut [Row],
    wants: StageWants,
) -> Result<Vec<StageResult>, StepError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let program = &engine.program;
    let layers = program.graph().info.num_layers;
    let ranges: Vec<std::ops::Range<usize>> =
        rows.iter().map(|r| engine.stage_range(r.stage)).collect();
    let width = ranges[0].len();
    if ranges.iter().any(|r| r.len() != width) {
        return Err(StepError::Lost(
            "loop iterations of different lengths in one looped step",
        ));
    }
    if rows
        .iter()
        .zip(&ranges)
        .any(|(r, g)| g.start > 0 && r.carried.is_none())
    {
        return Err(StepError::Lost(
            "a sequence in a later stage lost its hidden state",
        ));
    }
    let from: Vec<usize> = ranges.iter().map(|r| r.start).collect();
    let outs = {
        let mut segments: Vec<Segment> = rows.iter_mut().map(Row::segment).collect();
        program.run_blocks(&mut segments, &from, width, wants.below)?
    };
    let mut results: Vec<StageResult> = rows
        .iter()
        .zip(&ranges)
        .zip(outs)
        .map(|((row, range), out)| {
            let mut r = StageResult::new(row.entity, row.stage, range.end);
            r.hidden = Some(out.stream);
            r.below = out.below;
            r
        })
        .collect();
    // The heads' logits in one call: the model's own for rows at the last layer (their
    // caches commit), the exit head's for rows that may leave after their iteration. An exit
    // head that shares the final norm and LM head reads that weight once for both.
    let graph = program.graph();
    let mut members = Vec::new();
    let (mut entries, mut heads, mut commit) = (Vec::new(), Vec::new(), Vec::new());
    for (i, range) in ranges.iter().enumerate() {
        let end = range.end;
        let head = if end == layers {
            Some(program.logits_node()?)
        } else if rows[i].may_exit {
            graph.exit_at(end).and_then(|e| e.logits)
        } else {
            None
        };
        if let Some(h) = head {
            members.push(i);
            entries.push(end);
            heads.push(h);
            commit.push(end == layers);
        }
    }
    let logits = {
        let mut segments = head_segments(rows, &results, &members)?;
        program.run_heads(&mut segments, &entries, &heads, &commit)?
    };
    for ((&i, l), last) in members.iter().zip(logits).zip(&commit) {
        let r = &mut results[i];
        if *last {
            r.logits = Some(squeeze(l)?);
            r.hidden = None;
            r.below = None;
        } else {
            r.exit_logits = Some(squeeze(l)?);
        }
    }
    // Learned gates, one call per exit point that has one.
    let mut gated: Vec<usize> = ranges
        .iter()
        .zip(rows.iter())
        .filter(|(_, row)| row.may_exit)
        .map(|(r, _)| r.end)
        .filter(|&end| end < layers)
        .filter(|&end| graph.exit_at(end).is_some_and(|e| e.gate.is_some()))
        .collect();
    gated.sort_unstable();
    gated.dedup();
    for end in gated {
        let Some(gate) = graph.exit_at(end).and_then(|e| e.gate) else {
            continue;
        };
        let run = Run {
            from: end,
            task: Task::Outputs(vec![Want::last(gate)]),
            commit: false,
        };
        let members: Vec<usize> = (0..rows.len())
            .filter(|&i| ranges[i].end == end && rows[i].may_exit)
            .collect();
        let out = {
            let mut segments = head_segments(rows, &results, &members)?;
            program.run(&mut segments, &run)?
        };
        for (&i, values) in members.iter().zip(out) {
            results[i].gate = values.into_iter().next().map(squeeze).transpose()?;
        }
    }
    if !wants.below {
        for r in &mut results {
            r.below = None;
        }
    }
    Ok(results)
}

/// The rows `members` (ascending) as segments entering with the stream their stage left.
fn head_segments<'r>(
    rows: &'r mut [Row],
    results: &[StageResult],
    members: &[usize],
) -> Result<Vec<Segment<'r>>, StepError> {
    let mut states = Vec::with_capacity(members.len());
    for &i in members {
        states.push(
            results[i]
                .hidden
                .clone()
                .ok_or(StepError::Lost("a stage returned nothing"))?,
        );
    }
    Ok(rows
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| members.contains(i))
        .zip(states)
        .map(|((_, row), state)| row.segment().with_state(state))
        .collect())
}

fn squeeze(t: Tensor) -> Result<Tensor, StepError> {
    Ok(t.squeeze(0)?)
}

/// Rows whose token runs a path of its own this step (SkipDecode): rows with the same path
/// run together, layer by layer in contiguous runs, each run entering with the stream the
/// previous one left.
fn run_paths(engine: &Engine, rows: &mut [Row]) -> Result<Vec<StageResult>, StepError> {
    let program = &engine.program;
    let layers = program.graph().info.num_layers;
    // Rows with equal paths are contiguous once sorted (results follow entities).
    rows.sort_by(|a, b| a.path.cmp(&b.path).then(a.entity.cmp(&b.entity)));
    let mut entries = Vec::with_capacity(rows.len());
    for group in rows.chunk_by_mut(|a, b| a.path == b.path) {
        let runs = contiguous(&group[0].path);
        for (i, r) in runs.iter().enumerate() {
            let last = i + 1 == runs.len();
            if last && r.end != layers {
                return Err(StepError::Lost(
                    "a token's path does not end at the last layer",
                ));
            }
            let want = if last {
                Want::last(program.logits_node()?)
            } else {
                Want::all(program.stream_node(r.end)?)
            };
            let run = Run {
                from: r.start,
                task: Task::Outputs(vec![want]),
                commit: last,
            };
            let mut segments: Vec<Segment> = group.iter_mut().map(Row::segment).collect();
            let out = program.run(&mut segments, &run)?;
            drop(segments);
            for (row, mut values) in group.iter_mut().zip(out) {
                let v = values.remove(0);
                if last {
                    let mut result = StageResult::new(row.entity, 0, layers);
                    result.logits = Some(squeeze(v)?);
                    entries.push(result);
                } else {
                    row.carried = Some(v);
                }
            }
        }
    }
    Ok(entries)
}

/// A path cut into runs of consecutive layers.
fn contiguous(path: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for &l in path {
        match runs.last_mut() {
            Some(r) if r.end == l => r.end = l + 1,
            _ => runs.push(l..l + 1),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::contiguous;

    #[test]
    fn paths_cut_into_runs() {
        assert_eq!(contiguous(&[0, 3, 4, 5]), vec![0..1, 3..6]);
        assert_eq!(contiguous(&[0, 1, 2]), vec![0..3]);
        assert!(contiguous(&[]).is_empty());
    }
}
