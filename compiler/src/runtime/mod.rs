//! The runtime: a Bevy-style ECS (`bevy_ecs`, used standalone) where every request is an
//! entity. Components hold its prompt, generated tokens, KV cache and timing; resources hold
//! the program, the batching policy, the clock and the trace. A schedule of small systems
//! runs one scheduler iteration per call: admit arrivals → plan the batch → execute → emit
//! tokens → record. (Exit decisions join between execute and emit with early exiting.)
//! Entity order never matters: everything that iterates sorts by request id.
//!
//! Two executors share these systems. The real one (candle) runs the planned sequences as one
//! ragged batch ([`Program::forward_ragged`]), whose per-sequence results equal unbatched
//! runs, and advances the clock by the measured time of the step. The simulated one runs no
//! model: it advances the clock by the [`cost::CostModel`] profiled on this machine and
//! produces no token ids (traces record `token: null`). Decoding is greedy and runs each
//! request to its `max_new_tokens`.

pub mod cost;
pub mod metrics;
pub mod policy;
pub mod trace;
pub mod workload;

use crate::lower::{KvCache, Program, Segment, StageOutput};
use bevy_ecs::prelude::*;
use metrics::{RequestOutcome, ServeReport};
use policy::{Batching, Candidate};
use std::sync::Arc;
use std::time::Instant;
use trace::{TraceRecord, TraceWriter};
use workload::RequestSpec;

/// A request, as it arrived.
#[derive(Component, Clone, Debug)]
pub struct Request(pub RequestSpec);

/// What a request has produced so far.
#[derive(Component, Clone, Debug, Default)]
pub struct Progress {
    /// Token ids (real executor only).
    pub tokens: Vec<u32>,
    /// Tokens generated (both executors).
    pub produced: usize,
    pub first_token_s: Option<f64>,
    pub finish_s: Option<f64>,
    pub done: bool,
    /// The stage the next token is at (depth-wise batching cuts the layers into stages).
    pub stage: usize,
    /// Hidden states the previous stage produced for the next one.
    pub carried: Option<candle_core::Tensor>,
}

/// Marks a request that has arrived and not finished.
#[derive(Component, Clone, Copy, Debug)]
pub struct Active;

/// Marks an active request that has started (its prompt ran).
#[derive(Component, Clone, Copy, Debug)]
pub struct Running;

/// Arrived requests waiting to start, in arrival order: (id, entity, prompt tokens).
#[derive(Resource, Default)]
pub struct WaitQueue(pub std::collections::VecDeque<(usize, Entity, usize)>);

/// The request's KV cache.
#[derive(Component)]
pub struct Kv(pub KvCache);

/// A request that was refused, with the reason.
#[derive(Component, Clone, Debug)]
pub struct Failed(pub String);

/// Which executor advances the clock.
pub enum Executor {
    /// Run the model with candle.
    Real,
    /// Advance the clock by a profiled cost model; run nothing.
    Sim(cost::CostModel),
}

/// How tokens are chosen: greedy or seeded sampling (request `i` samples with seed
/// `seed + i`, as [`crate::generate::generate`] does for row `i`), and which ids end a
/// request early.
#[derive(Clone)]
pub struct Decoding {
    sampling: candle_transformers::generation::Sampling,
    seed: u64,
    stop_ids: Vec<u32>,
}

impl Decoding {
    /// Greedy to `max_new_tokens`, no early stop.
    pub fn greedy() -> Self {
        Decoding {
            sampling: candle_transformers::generation::Sampling::ArgMax,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }

    /// `sampling` with `seed`; a request ends early at any of `stop_ids`.
    pub fn new(
        sampling: &crate::generate::Sampling,
        seed: u64,
        stop_ids: Vec<u32>,
    ) -> Result<Self, crate::generate::GenerateError> {
        Ok(Decoding {
            sampling: sampling.to_candle()?,
            seed,
            stop_ids,
        })
    }
}

/// The lowered program, the batching policy, the executor and the decoding rule.
#[derive(Resource)]
pub struct Engine {
    pub program: Arc<Program>,
    pub batching: Batching,
    pub executor: Executor,
    pub decoding: Decoding,
}

/// A request's token sampler.
#[derive(Component)]
pub struct Sampler(pub candle_transformers::generation::LogitsProcessor);

/// Simulated time, advanced by measured execution; the scheduler iteration count.
#[derive(Resource, Default)]
pub struct Clock {
    pub now_s: f64,
    pub step: u64,
    pub busy_s: f64,
    /// Requests arrived and not finished.
    pub active: usize,
}

/// Requests that have not arrived yet, latest first (so `pop` gives the next one).
#[derive(Resource, Default)]
pub struct Arrivals(pub Vec<RequestSpec>);

/// This step's batch, in request order.
#[derive(Resource, Default)]
pub struct Plan(pub Vec<Entity>);

/// Tokens produced by this step, in plan order.
#[derive(Resource, Default)]
pub struct StepTokens(pub Vec<(Entity, Option<u32>)>);

/// The streamed trace and per-step occupancy.
#[derive(Resource, Default)]
pub struct Recorder {
    pub trace: Option<TraceWriter>,
    pub occupancy: Vec<(f64, usize)>,
    /// Busy seconds per stage.
    pub stage_busy_s: Vec<f64>,
    pub error: Option<String>,
}

fn admit(
    mut commands: Commands,
    mut arrivals: ResMut<Arrivals>,
    mut queue: ResMut<WaitQueue>,
    mut clock: ResMut<Clock>,
    engine: Res<Engine>,
) {
    if clock.active == 0 {
        if let Some(next) = arrivals.0.last() {
            clock.now_s = clock.now_s.max(next.arrival_s);
        }
    }
    let max_positions = engine.program.graph().info.max_positions;
    while arrivals
        .0
        .last()
        .is_some_and(|r| r.arrival_s <= clock.now_s)
    {
        let Some(r) = arrivals.0.pop() else { break };
        let need = r.prompt.len() + r.max_new_tokens;
        if need > max_positions {
            let why = format!(
                "prompt ({}) + new tokens ({}) exceed the model's {max_positions} positions",
                r.prompt.len(),
                r.max_new_tokens
            );
            commands.spawn((
                Request(r),
                Progress {
                    done: true,
                    ..Progress::default()
                },
                Failed(why),
            ));
            continue;
        }
        let cache = match engine.executor {
            Executor::Real => engine.program.new_cache(),
            Executor::Sim(_) => KvCache::default(),
        };
        clock.active += 1;
        let (id, tokens) = (r.id, r.prompt.len());
        let sampler = Sampler(
            candle_transformers::generation::LogitsProcessor::from_sampling(
                engine.decoding.seed.wrapping_add(id as u64),
                engine.decoding.sampling.clone(),
            ),
        );
        let e = commands
            .spawn((Request(r), Progress::default(), Kv(cache), Active, sampler))
            .id();
        queue.0.push_back((id, e, tokens));
    }
}

fn plan(
    mut commands: Commands,
    engine: Res<Engine>,
    mut out: ResMut<Plan>,
    mut queue: ResMut<WaitQueue>,
    running: Query<(Entity, &Request, &Progress), With<Running>>,
) {
    let mut live: Vec<(usize, Entity, Candidate)> = running
        .iter()
        .map(|(e, r, p)| {
            let c = Candidate {
                id: r.0.id,
                tokens: 1,
                running: true,
                stage: p.stage,
            };
            (r.0.id, e, c)
        })
        .collect();
    live.sort_by_key(|(id, _, _)| *id);
    // Policies admit waiting requests in arrival order, never more than a batch: only the
    // head of the queue can be chosen.
    let window = engine.batching.max_batch();
    live.extend(queue.0.iter().take(window).map(|&(id, e, tokens)| {
        let c = Candidate {
            id,
            tokens,
            running: false,
            stage: 0,
        };
        (id, e, c)
    }));
    let candidates: Vec<Candidate> = live.iter().map(|(_, _, c)| *c).collect();
    let chosen: std::collections::HashSet<usize> =
        engine.batching.plan(&candidates).into_iter().collect();
    out.0.clear();
    for (id, e, c) in &live {
        if chosen.contains(id) {
            out.0.push(*e);
            if !c.running {
                commands.entity(*e).insert(Running);
            }
        }
    }
    // The chosen waiting requests are a prefix of the queue (policies admit in order).
    while queue
        .0
        .front()
        .is_some_and(|(id, _, _)| chosen.contains(id))
    {
        queue.0.pop_front();
    }
}

/// The layers of stage `stage` when `layers` are cut into `stages` near-equal ranges.
pub fn stage_layers(layers: usize, stages: usize, stage: usize) -> std::ops::Range<usize> {
    let stages = stages.clamp(1, layers.max(1));
    (stage * layers / stages)..((stage + 1) * layers / stages)
}

fn add_stage_busy(recorder: &mut Recorder, stage: usize, seconds: f64) {
    if recorder.stage_busy_s.len() <= stage {
        recorder.stage_busy_s.resize(stage + 1, 0.0);
    }
    recorder.stage_busy_s[stage] += seconds;
}

#[allow(clippy::too_many_arguments)]
fn execute(
    engine: Res<Engine>,
    plan: Res<Plan>,
    mut clock: ResMut<Clock>,
    mut produced: ResMut<StepTokens>,
    mut recorder: ResMut<Recorder>,
    mut seqs: Query<(&Request, &mut Progress, &mut Kv)>,
    mut samplers: Query<&mut Sampler>,
) {
    produced.0.clear();
    if plan.0.is_empty() {
        return;
    }
    let layers = engine.program.graph().info.num_layers;
    let stages = engine.batching.stages().min(layers.max(1));
    let stage = plan
        .0
        .first()
        .and_then(|&e| seqs.get(e).ok())
        .map_or(0, |(_, p, _)| p.stage);
    let range = stage_layers(layers, stages, stage);
    let last_stage = range.end == layers;
    if let Executor::Sim(model) = &engine.executor {
        let shapes: Vec<(usize, usize)> = plan
            .0
            .iter()
            .filter_map(|&e| seqs.get(e).ok())
            .map(|(req, p, _)| {
                if p.produced == 0 {
                    (req.0.prompt.len(), 0)
                } else {
                    (1, req.0.prompt.len() + p.produced - 1)
                }
            })
            .collect();
        let tokens = shapes.iter().map(|s| s.0).sum();
        let share = range.len() as f64 / layers.max(1) as f64;
        let step_s = share * model.predict(tokens, cost::attention_work(&shapes), shapes.len());
        for &e in &plan.0 {
            if let Ok((_, mut p, _)) = seqs.get_mut(e) {
                p.stage = if last_stage { 0 } else { stage + 1 };
            }
        }
        if last_stage {
            produced.0 = plan.0.iter().map(|&e| (e, None)).collect();
        }
        clock.now_s += step_s;
        clock.busy_s += step_s;
        add_stage_busy(&mut recorder, stage, step_s);
        clock.step += 1;
        let now = clock.now_s;
        recorder.occupancy.push((now, plan.0.len()));
        return;
    }
    // Caches (and carried hidden states) leave their components for the step and go back
    // after it.
    let mut taken: Vec<(Entity, Vec<u32>, KvCache)> = Vec::with_capacity(plan.0.len());
    let mut carried: Vec<candle_core::Tensor> = Vec::new();
    for &e in &plan.0 {
        if let Ok((req, mut progress, mut kv)) = seqs.get_mut(e) {
            let ids = match progress.tokens.last() {
                Some(&t) => vec![t],
                None => req.0.prompt.clone(),
            };
            if let Some(h) = progress.carried.take() {
                carried.push(h);
            }
            taken.push((e, ids, std::mem::take(&mut kv.0)));
        }
    }
    let mut segments: Vec<Segment> = taken
        .iter_mut()
        .map(|(_, ids, cache)| Segment { ids, cache })
        .collect();
    let started = Instant::now();
    let carried_ref = (stage > 0).then_some(carried.as_slice());
    let result = engine
        .program
        .forward_stage(&mut segments, range, carried_ref);
    let elapsed = started.elapsed().as_secs_f64();
    drop(segments);
    let entities: Vec<Entity> = taken.iter().map(|(e, _, _)| *e).collect();
    let mut outcome: Result<Vec<Option<u32>>, String> = Ok(Vec::new());
    match result {
        Ok(StageOutput::Logits(logits)) => {
            let tokens: Result<Vec<Option<u32>>, String> = logits
                .iter()
                .zip(&entities)
                .map(|(l, e)| {
                    let l = l
                        .to_dtype(candle_core::DType::F32)
                        .map_err(|e| e.to_string())?;
                    match samplers.get_mut(*e) {
                        Ok(mut s) => s.0.sample(&l),
                        Err(_) => l.argmax(0).and_then(|t| t.to_scalar::<u32>()),
                    }
                    .map(Some)
                    .map_err(|e| e.to_string())
                })
                .collect();
            outcome = tokens;
        }
        Ok(StageOutput::Hidden(hidden)) => {
            for (e, h) in entities.iter().zip(hidden) {
                if let Ok((_, mut p, _)) = seqs.get_mut(*e) {
                    p.carried = Some(h);
                }
            }
        }
        Err(e) => outcome = Err(e.to_string()),
    }
    for (e, _, cache) in taken {
        if let Ok((_, mut p, mut kv)) = seqs.get_mut(e) {
            kv.0 = cache;
            p.stage = if last_stage { 0 } else { stage + 1 };
        }
    }
    match outcome {
        Ok(tokens) => {
            if last_stage {
                produced.0 = entities.into_iter().zip(tokens).collect();
            }
            clock.now_s += elapsed;
            clock.busy_s += elapsed;
            add_stage_busy(&mut recorder, stage, elapsed);
            clock.step += 1;
            let now = clock.now_s;
            recorder.occupancy.push((now, plan.0.len()));
        }
        Err(e) => recorder.error = Some(e),
    }
}

/// Appends each produced token to its request and finishes requests that are done.
fn emit(
    mut commands: Commands,
    produced: Res<StepTokens>,
    mut clock: ResMut<Clock>,
    engine: Res<Engine>,
    mut seqs: Query<(&Request, &mut Progress)>,
) {
    for &(e, token) in &produced.0 {
        let Ok((req, mut p)) = seqs.get_mut(e) else {
            continue;
        };
        if let Some(t) = token {
            p.tokens.push(t);
        }
        p.produced += 1;
        if p.first_token_s.is_none() {
            p.first_token_s = Some(clock.now_s);
        }
        let stopped = token.is_some_and(|t| engine.decoding.stop_ids.contains(&t));
        if p.produced >= req.0.max_new_tokens || stopped {
            p.done = true;
            p.finish_s = Some(clock.now_s);
            clock.active -= 1;
            commands.entity(e).remove::<(Active, Running)>();
        }
    }
}

/// Writes one trace record per produced token.
fn record(
    produced: Res<StepTokens>,
    clock: Res<Clock>,
    engine: Res<Engine>,
    mut recorder: ResMut<Recorder>,
    seqs: Query<(&Request, &Progress)>,
) {
    if recorder.trace.is_none() || produced.0.is_empty() {
        return;
    }
    let graph = engine.program.graph();
    let layers: Vec<usize> = graph.layers();
    let n_layers = graph.info.num_layers;
    let n_stages = engine.batching.stages().min(n_layers.max(1));
    let stage_names: Vec<String> = (0..n_stages)
        .map(|s| {
            let r = stage_layers(n_layers, n_stages, s);
            format!("layers {}..{}", r.start, r.end)
        })
        .collect();
    let batch = produced.0.len();
    for &(e, token) in &produced.0 {
        let Ok((req, p)) = seqs.get(e) else {
            continue;
        };
        let r = TraceRecord {
            seq: req.0.id,
            pos: req.0.prompt.len() + p.produced - 1,
            token,
            step: clock.step,
            t_s: clock.now_s,
            batch,
            stages: stage_names.clone(),
            layers: layers.clone(),
            exit_layer: n_layers,
            signals: Vec::new(),
        };
        if let Some(w) = recorder.trace.as_mut() {
            if let Err(err) = w.write(&r) {
                recorder.error = Some(err.to_string());
                return;
            }
        }
    }
}

/// A configured run.
pub struct Runtime {
    world: World,
    schedule: Schedule,
}

impl Runtime {
    /// A runtime for `requests` on `program` with `batching`; traces go to `trace` when given.
    pub fn new(
        program: Arc<Program>,
        batching: Batching,
        executor: Executor,
        decoding: Decoding,
        mut requests: Vec<RequestSpec>,
        trace: Option<TraceWriter>,
    ) -> Self {
        let mut world = World::new();
        requests.sort_by(|a, b| b.arrival_s.total_cmp(&a.arrival_s).then(b.id.cmp(&a.id)));
        world.insert_resource(Engine {
            program,
            batching,
            executor,
            decoding,
        });
        world.insert_resource(Clock::default());
        world.insert_resource(Arrivals(requests));
        world.insert_resource(Plan::default());
        world.insert_resource(WaitQueue::default());
        world.insert_resource(StepTokens::default());
        world.insert_resource(Recorder {
            trace,
            ..Recorder::default()
        });
        let mut schedule = Schedule::default();
        schedule.add_systems((admit, plan, execute, emit, record).chain());
        Runtime { world, schedule }
    }

    /// Runs every request to completion (or failure).
    pub fn run(mut self) -> anyhow::Result<(ServeReport, Vec<RequestOutcome>)> {
        loop {
            self.schedule.run(&mut self.world);
            if let Some(e) = self.world.resource_mut::<Recorder>().error.take() {
                anyhow::bail!("step {}: {e}", self.world.resource::<Clock>().step);
            }
            let pending = !self.world.resource::<Arrivals>().0.is_empty();
            let active = self.world.resource::<Clock>().active > 0;
            if !pending && !active {
                break;
            }
        }
        let mut q = self.world.query::<(&Request, &Progress, Option<&Failed>)>();
        let mut outcomes: Vec<RequestOutcome> = q
            .iter(&self.world)
            .map(|(r, p, f)| RequestOutcome {
                id: r.0.id,
                arrival_s: r.0.arrival_s,
                prompt_tokens: r.0.prompt.len(),
                tokens: p.tokens.clone(),
                produced: p.produced,
                first_token_s: p.first_token_s,
                finish_s: p.finish_s,
                failed: f.map(|f| f.0.clone()),
            })
            .collect();
        outcomes.sort_by_key(|o| o.id);
        let clock = self.world.resource::<Clock>();
        let (steps, busy) = (clock.step, clock.busy_s);
        let mut recorder = self.world.resource_mut::<Recorder>();
        let occupancy = std::mem::take(&mut recorder.occupancy);
        let stage_busy = std::mem::take(&mut recorder.stage_busy_s);
        if let Some(w) = recorder.trace.take() {
            w.finish()?;
        }
        let mut report = ServeReport::from_outcomes(&outcomes, steps, busy, occupancy);
        let engine = self.world.resource::<Engine>();
        report.executor = match engine.executor {
            Executor::Real => "real".into(),
            Executor::Sim(_) => "simulated".into(),
        };
        report.policy = format!("{:?}", engine.batching);
        let layers = engine.program.graph().info.num_layers;
        let stages = engine.batching.stages().min(layers.max(1));
        let total: f64 = stage_busy.iter().sum();
        report.stage_busy_share = (0..stages)
            .map(|s| {
                let r = stage_layers(layers, stages, s);
                let busy = stage_busy.get(s).copied().unwrap_or(0.0);
                (
                    format!("layers {}..{}", r.start, r.end),
                    if total > 0.0 { busy / total } else { 0.0 },
                )
            })
            .collect();
        Ok((report, outcomes))
    }
}

/// Continues `prompts` through the runtime, all arriving at once in one static batch, and
/// returns prompt + new tokens per prompt, in order. A request that ends at an EOS id is
/// padded (with `pad_token_id`, else the first EOS id) to the longest, as transformers'
/// batched `generate` does, so the result equals [`crate::generate::generate`]'s.
pub fn generate_through_runtime(
    program: Arc<Program>,
    prompts: &[Vec<u32>],
    opts: &crate::generate::GenerateOptions,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let info = program.graph().info.clone();
    if !info.family.is_decoder() {
        anyhow::bail!(
            "{} is an encoder; it does not generate tokens",
            info.model_type
        );
    }
    let stop_ids = if opts.stop_at_eos {
        info.eos_token_ids.clone()
    } else {
        Vec::new()
    };
    let pad = info.pad_token_id.or(stop_ids.first().copied()).unwrap_or(0);
    let decoding = Decoding::new(&opts.sampling, opts.seed, stop_ids)?;
    let requests: Vec<RequestSpec> = prompts
        .iter()
        .enumerate()
        .map(|(id, p)| RequestSpec {
            id,
            arrival_s: 0.0,
            prompt: p.clone(),
            max_new_tokens: opts.max_new_tokens,
        })
        .collect();
    if opts.max_new_tokens == 0 {
        return Ok(prompts.to_vec());
    }
    let batching = Batching::Static {
        max_batch: prompts.len().max(1),
    };
    let (_, outcomes) =
        Runtime::new(program, batching, Executor::Real, decoding, requests, None).run()?;
    if let Some(f) = outcomes.iter().find_map(|o| o.failed.as_ref()) {
        anyhow::bail!("{f}");
    }
    let longest = outcomes.iter().map(|o| o.tokens.len()).max().unwrap_or(0);
    Ok(prompts
        .iter()
        .zip(&outcomes)
        .map(|(p, o)| {
            let mut row = p.clone();
            row.extend(&o.tokens);
            row.resize(p.len() + longest, pad);
            row
        })
        .collect())
}
