//! The runtime: a Bevy-style ECS (`bevy_ecs`, used standalone) where every request is an
//! entity. Components hold its prompt, generated tokens, KV cache and timing; resources hold
//! the program, the batching policy, the clock and the trace. A schedule of small systems
//! runs one scheduler iteration per call: admit arrivals → plan the batch → execute → emit
//! tokens → record. Between execute and emit, `decide` turns results into tokens and
//! `copy_state` fills the caches of tokens that stopped at an exit head. How deep a request's
//! tokens run is its own plan: components from [`strategy`], attached at admission.
//! Systems return `Result`; a failed step's [`StepError`] is piped into the [`Failure`]
//! resource and ends the run. Entity order never matters: everything that iterates sorts by
//! request id.
//!
//! Two executors share these systems. The real one (candle) runs the planned sequences as one
//! ragged batch ([`Program::forward_ragged`]), whose per-sequence results equal unbatched
//! runs, and advances the clock by the measured time of the step. The simulated one runs no
//! model: it advances the clock by the [`cost::CostModel`] profiled on this machine and
//! produces no token ids (traces record `token: null`). Decoding is greedy and runs each
//! request to its `max_new_tokens`.

pub mod cost;
mod decide;
pub mod encoder;
pub mod metrics;
mod select;
pub mod sim_exits;
pub mod speculate;
mod step;
pub mod strategy;
pub mod trace;
pub mod workload;

use bevy_ecs::prelude::*;
/// The batching policies, configured in a pipeline's `runtime.batching`.
pub use exitgraph_compiler::batching as policy;
use exitgraph_compiler::exits::{Depth, SelfSpeculative};
use exitgraph_compiler::generate::{GenerateError, GenerateOptions};
use exitgraph_compiler::lower::{KvCache, Program};
use metrics::{RequestOutcome, ServeReport, SpecCounts, Speculated, TokenStat};
use policy::{Batching, Candidate};
pub use select::{select_share, Selected};
use std::sync::Arc;
use trace::{LayerSignal, TraceRecord, TraceWriter};
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
    /// The path of the token on its way down (or just produced).
    pub track: TokenTrack,
    /// Per generated token: how deep it ran.
    pub stats: Vec<TokenStat>,
    /// Sum of forced tokens' negative log-likelihoods.
    pub nll: f64,
    /// The first forced token's (it comes from the prompt's pass).
    pub first_nll: f64,
    /// The simulated executor's exit depth for the token on its way down.
    pub sim_exit: Option<usize>,
    /// Under simulated exits with skipped keys and values absent: per layer, how many of the
    /// sequence's positions have none there (they left before it), which later tokens do
    /// not attend to. Empty otherwise.
    pub absent_kv: Vec<usize>,
    /// Self-speculative cycles so far.
    pub spec: SpecCounts,
}

/// One token's way through the layers.
#[derive(Clone, Debug, Default)]
pub struct TokenTrack {
    /// Layers run so far.
    pub layers: Vec<usize>,
    /// Exit points evaluated: signal and head token.
    pub signals: Vec<LayerSignal>,
    /// Head tokens of the exit points so far (patience).
    pub earlier: Vec<u32>,
    /// (exit point, head token), for the oracle's choice.
    pub oracle: Vec<(usize, u32)>,
    /// Exit heads evaluated.
    pub heads: usize,
    /// The exit point that produced the token.
    pub exit_layer: usize,
    /// Layers whose keys and values came from the exit state.
    pub filled: usize,
    /// The model's own final norm and LM head produced the token.
    pub final_head: bool,
}

impl TokenTrack {
    fn stat(&self) -> TokenStat {
        TokenStat {
            exit_layer: self.exit_layer as u16,
            layers_run: self.layers.len() as u16,
            heads: self.heads as u16,
            filled: self.filled as u16,
            final_head: self.final_head,
            speculated: None,
        }
    }
}

/// What one sequence got from this step's stage.
pub struct StageResult {
    pub entity: Entity,
    /// The stage the sequence ran this step.
    pub stage: usize,
    /// Layers run once the stage ended (its exit point).
    pub end: usize,
    /// The model's logits (the stage ended at the last layer).
    pub logits: Option<candle_core::Tensor>,
    /// Hidden states `[new tokens, hidden]` after the stage.
    pub hidden: Option<candle_core::Tensor>,
    /// The exit head's logits at the stage's end.
    pub exit_logits: Option<candle_core::Tensor>,
    /// The exit gate's logit.
    pub gate: Option<candle_core::Tensor>,
    /// The residual stream one layer below the exit, at the last position (saturation).
    pub below: Option<candle_core::Tensor>,
}

impl StageResult {
    fn new(entity: Entity, stage: usize, end: usize) -> Self {
        StageResult {
            entity,
            stage,
            end,
            logits: None,
            hidden: None,
            exit_logits: None,
            gate: None,
            below: None,
        }
    }
}

/// This step's results, for `decide`.
#[derive(Resource, Default)]
pub struct StageResults {
    /// The step's stage (under looped depth-wise batching, the deepest one it ran): the
    /// stage its time is booked to.
    pub stage: usize,
    pub range: std::ops::Range<usize>,
    pub entries: Vec<StageResult>,
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
/// `seed + i`), and which ids end a
/// request early.
#[derive(Clone)]
pub struct Decoding {
    sampling: candle_transformers::generation::Sampling,
    /// The same rule in exitgraph's terms (self-speculation computes its distributions).
    rule: exitgraph_compiler::generate::Sampling,
    seed: u64,
    stop_ids: Vec<u32>,
}

impl Decoding {
    /// Greedy to `max_new_tokens`, no early stop.
    pub fn greedy() -> Self {
        Decoding {
            sampling: candle_transformers::generation::Sampling::ArgMax,
            rule: exitgraph_compiler::generate::Sampling::Greedy,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }

    /// `sampling` with `seed`; a request ends early at any of `stop_ids`.
    pub fn new(
        sampling: &exitgraph_compiler::generate::Sampling,
        seed: u64,
        stop_ids: Vec<u32>,
    ) -> Result<Self, GenerateError> {
        Ok(Decoding {
            sampling: sampling.to_candle()?,
            rule: sampling.clone(),
            seed,
            stop_ids,
        })
    }
}

/// The lowered program, the batching policy, the executor, the decoding rule and the depth
/// strategy given to each admitted request.
#[derive(Resource)]
pub struct Engine {
    pub program: Arc<Program>,
    pub batching: Batching,
    pub executor: Executor,
    pub decoding: Decoding,
    pub depth: Depth,
    /// Depths with an exit head.
    pub exits: Vec<usize>,
    /// Whether a request of the run brings its own early-exit strategy (exit depths are then
    /// stage boundaries whatever the runtime's strategy).
    pub request_exits: bool,
    /// Where stages start and end: `[0, .., layers]`. The policy's depth-wise cuts, plus
    /// the exit points under early exiting.
    pub boundaries: Vec<usize>,
    /// The simulated executor's exit depths, when it simulates early exits.
    pub sim_exits: Option<SimExits>,
    /// What happens to the keys and values of the layers a token skipped by leaving early,
    /// under either executor.
    pub skipped_kv: sim_exits::SkippedKv,
}

/// Simulated early exits: where depths come from, and per layer the share of its work that
/// filling its keys and values from an exit state costs (CALM's state copying).
pub struct SimExits {
    pub source: sim_exits::ExitSource,
    pub fill_share: Vec<f64>,
}

impl Engine {
    /// Tokens a prompt of `n` prefills: under GemFilter the kept ones, else all `n`. (The
    /// batching policies plan with it, so a token budget counts the second run's tokens.)
    pub fn prefill_tokens(&self, n: usize) -> usize {
        self.program
            .graph()
            .filter
            .as_ref()
            .map_or(n, |f| f.keep.count(n))
    }

    /// The layers of stage `s`.
    pub fn stage_range(&self, s: usize) -> std::ops::Range<usize> {
        let at = |i: usize| self.boundaries.get(i).copied().unwrap_or(0);
        at(s)..at(s + 1)
    }

    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.boundaries.len().saturating_sub(1).max(1)
    }

    /// Checks a depth strategy against the program, the executor and the batching policy.
    fn check_depth(&self, depth: &Depth) -> anyhow::Result<()> {
        depth
            .validate(self.program.graph())
            .map_err(anyhow::Error::msg)?;
        self.check_stateful_heads(depth)?;
        self.check_skipped_kv(depth)?;
        match (depth, &self.executor, &self.batching) {
            (Depth::SkipDecode(_), _, _) if self.sim_exits.is_some() => {
                anyhow::bail!(
                    "given exit depths and SkipDecode both set how deep tokens run; use one"
                )
            }
            (Depth::EarlyExit { .. }, Executor::Real, _) if self.sim_exits.is_some() => {
                anyhow::bail!(
                    "given exit depths and the pipeline's exit rule both decide where tokens \
                     leave; use one (a pipeline with exit heads and no EarlyExit depth)"
                )
            }
            (Depth::EarlyExit { .. }, Executor::Sim(_), _) if self.sim_exits.is_none() => anyhow::bail!(
                "the simulated executor runs no model, so exit rules cannot be evaluated; use the \
                 real executor, or give the simulated one exit depths (serve --sim-exits)"
            ),
            (Depth::SelfSpeculative { .. }, Executor::Sim(_), _) => anyhow::bail!(
                "the simulated executor runs no model, so drafts cannot be verified; serve \
                 SelfSpeculative with the real executor"
            ),
            (Depth::SelfSpeculative { .. }, _, b) if b.is_looped() => anyhow::bail!(
                "SelfSpeculative is not supported under LoopedDepthWise batching yet (a cycle \
                 runs outside the loop's per-iteration batches); use static, continuous or \
                 depth-wise batching"
            ),
            (Depth::SelfSpeculative { .. }, _, _) if self.sim_exits.is_some() => anyhow::bail!(
                "given exit depths and SelfSpeculative both set how deep tokens run; use one"
            ),
            (Depth::SkipDecode(_), _, b) if b.picks_stages() => anyhow::bail!(
                "SkipDecode runs each token's whole path in one step; use static or continuous batching"
            ),
            _ => self.check_policy(),
        }
    }

    /// Absent keys and values of skipped layers serve one token per call at positions counted
    /// in order: not self-speculation (several tokens per verification, rolled back) nor
    /// SkipDecode (its own skipped layers), nor a sliding window (it counts positions).
    fn check_skipped_kv(&self, depth: &Depth) -> anyhow::Result<()> {
        if self.skipped_kv != sim_exits::SkippedKv::Absent {
            return Ok(());
        }
        match depth {
            Depth::SelfSpeculative { .. } => anyhow::bail!(
                "SelfSpeculative verifies several tokens per call and rolls rejected ones back, \
                 which needs every layer's keys and values: they cannot be left absent; fill \
                 them (the default)"
            ),
            Depth::SkipDecode(_) => anyhow::bail!(
                "SkipDecode decides its own skipped layers; leaving keys and values absent \
                 concerns tokens that exit early"
            ),
            _ => {}
        }
        let g = self.program.graph();
        if let Some(node) = g.graph.node_weights().find(
            |n| matches!(&n.op, exitgraph_ir::op::Op::Attention(a) if a.sliding_window.is_some()),
        ) {
            anyhow::bail!(
                "{} attends within a sliding window, which counts positions, so skipped layers' \
                 keys and values cannot be left absent; fill them (the default)",
                node.name
            );
        }
        Ok(())
    }

    /// Exit heads with attention of their own (Kangaroo's adapter) keep keys and values of
    /// every position that ran the layers below them, so they serve only strategies where
    /// every token runs those layers: self-speculative drafting and the full model.
    fn check_stateful_heads(&self, depth: &Depth) -> anyhow::Result<()> {
        let Some(exit) = self
            .program
            .graph()
            .exits
            .iter()
            .find(|e| e.kv_slot.is_some())
        else {
            return Ok(());
        };
        let k = exit.after;
        let why = "it keeps keys and values of its own, filled only when every token runs the \
                   layers below it";
        if !matches!(depth, Depth::Full | Depth::SelfSpeculative { .. }) {
            anyhow::bail!(
                "the exit head after layer {k} is an AttentionAdapter: {why}; it drafts for \
                 SelfSpeculative (or the model runs Full), not for early exits or SkipDecode"
            );
        }
        if self.sim_exits.is_some() || self.batching.is_looped() {
            anyhow::bail!(
                "the exit head after layer {k} is an AttentionAdapter: {why}; serve it without \
                 given exit depths and without LoopedDepthWise batching"
            );
        }
        Ok(())
    }

    /// Checks the batching policy against the program: a looped policy needs a looped
    /// model, with every exit point it uses at the end of an iteration.
    fn check_policy(&self) -> anyhow::Result<()> {
        if !self.batching.is_looped() {
            return Ok(());
        }
        let g = self.program.graph();
        let ends = iteration_ends(g);
        if ends.len() < 2 {
            anyhow::bail!(
                "LoopedDepthWise batching needs a model with a tied block (a pipeline with \
                 TieLayers); this one has no loop"
            );
        }
        let layers = g.info.num_layers;
        let width = ends[0];
        if ends.windows(2).any(|w| w[1] - w[0] != width) || ends.last() != Some(&layers) {
            anyhow::bail!(
                "LoopedDepthWise batching needs every iteration to run the same block; this \
                 model's iterations end after layers {ends:?}"
            );
        }
        let points: Vec<usize> = match &self.sim_exits {
            Some(sim) => sim.source.points().to_vec(),
            None if self.request_exits || matches!(self.depth, Depth::EarlyExit { .. }) => {
                self.exits.clone()
            }
            None => Vec::new(),
        };
        if let Some(k) = points.iter().find(|k| **k > 0 && !ends.contains(k)) {
            anyhow::bail!(
                "an exit after layer {k} is inside a loop iteration; under LoopedDepthWise \
                 batching exits go after iterations (layers {ends:?})"
            );
        }
        Ok(())
    }

    fn compute_boundaries(&mut self) {
        let layers = self.program.graph().info.num_layers;
        if self.batching.is_looped() {
            // Stages are the loop's iterations; exits go after them (`check_policy`).
            let mut b = iteration_ends(self.program.graph());
            b.insert(0, 0);
            if b.len() >= 2 {
                self.boundaries = b;
                return;
            }
        }
        let stages = self.batching.stages().min(layers.max(1));
        let mut b: Vec<usize> = (0..=stages)
            .map(|s| stage_layers(layers, stages, s.min(stages - 1)).start)
            .collect();
        b[stages] = layers;
        if let Some(sim) = &self.sim_exits {
            b.extend(sim.source.points().iter().copied());
        } else if self.request_exits || matches!(self.depth, Depth::EarlyExit { .. }) {
            b.extend(self.exits.iter().copied().filter(|&k| k > 0 && k < layers));
        }
        b.sort_unstable();
        b.dedup();
        self.boundaries = b;
    }
}

/// The depths at which a loop iteration ends (the last one included), from the blocks'
/// iteration numbers: `[K, 2K, .., L]` for a block of K layers looped L/K times, `[L]` for a
/// model with no loop.
pub fn iteration_ends(g: &exitgraph_ir::Graph) -> Vec<usize> {
    let blocks = &g.blocks;
    let mut ends: Vec<usize> = (1..blocks.len())
        .filter(|&d| blocks[d].iteration != blocks[d - 1].iteration)
        .collect();
    ends.push(blocks.len());
    ends
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
    /// Busy seconds of steps that ran no prompt (decode only), their exit decisions and
    /// state copying included.
    pub decode_busy_s: f64,
    /// Whether this step runs a prompt.
    pub prompt_step: bool,
    /// Requests arrived and not finished.
    pub active: usize,
}

/// Requests that have not arrived yet, latest first (so `pop` gives the next one).
#[derive(Resource, Default)]
pub struct Arrivals(pub Vec<RequestSpec>);

/// This step's batch, in request order.
#[derive(Resource, Default)]
pub struct Plan(pub Vec<Entity>);

/// Tokens one request produced in a step (several when a plan emits more than one; `None`
/// for the simulated executor, which produces no ids).
#[derive(Clone, Debug, PartialEq)]
pub struct Emitted {
    pub entity: Entity,
    pub tokens: Vec<Option<u32>>,
    /// Per token, how self-speculation produced it (empty for other strategies).
    pub speculated: Vec<Speculated>,
}

impl Emitted {
    pub fn one(entity: Entity, token: Option<u32>) -> Self {
        Emitted {
            entity,
            tokens: vec![token],
            speculated: Vec::new(),
        }
    }
}

/// Tokens produced by this step, in plan order.
#[derive(Resource, Default)]
pub struct StepTokens(pub Vec<Emitted>);

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Run(#[from] exitgraph_compiler::lower::RunError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("writing the trace: {0:#}")]
    Trace(anyhow::Error),
    #[error("{0}")]
    Lost(&'static str),
    #[error("simulated exits: {0}")]
    Simulation(String),
    #[error("self-speculative decoding: {0}")]
    Speculation(String),
}

/// The first failure of a run, piped from the systems that return one.
#[derive(Resource, Default)]
pub struct Failure(pub Option<StepError>);

/// Keeps a system's error for [`Runtime::run`] to report.
fn fail(In(result): In<Result<(), StepError>>, mut failure: ResMut<Failure>) {
    if let Err(e) = result {
        failure.0.get_or_insert(e);
    }
}

/// The streamed trace and per-step occupancy.
#[derive(Resource, Default)]
pub struct Recorder {
    pub trace: Option<TraceWriter>,
    pub occupancy: Vec<(f64, usize)>,
    /// Per step, the rows at each stage.
    pub stage_rows: Vec<Vec<usize>>,
    /// Busy seconds per stage.
    pub stage_busy_s: Vec<f64>,
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
        // Under GemFilter the select phase reads the whole prompt and the model then runs on
        // the kept tokens: each must fit the positions.
        let prefill = engine.prefill_tokens(r.prompt.len());
        let need = r.prompt.len().max(prefill + r.max_new_tokens);
        if need > max_positions {
            let why = if prefill < r.prompt.len() && r.prompt.len() > max_positions {
                format!(
                    "the prompt ({}) exceeds the model's {max_positions} positions (GemFilter's \
                     select phase reads all of it)",
                    r.prompt.len()
                )
            } else {
                format!(
                    "prompt ({}) + new tokens ({}) exceed the model's {max_positions} positions",
                    prefill, r.max_new_tokens
                )
            };
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
        let (id, tokens) = (r.id, prefill);
        let sampler = Sampler(
            candle_transformers::generation::LogitsProcessor::from_sampling(
                engine.decoding.seed.wrapping_add(id as u64),
                engine.decoding.sampling.clone(),
            ),
        );
        let depth = r.depth.clone().unwrap_or_else(|| engine.depth.clone());
        let mut entity =
            commands.spawn((Request(r), Progress::default(), Kv(cache), Active, sampler));
        strategy::attach(
            &depth,
            engine.decoding.seed.wrapping_add(id as u64),
            &mut entity,
        );
        queue.0.push_back((id, entity.id(), tokens));
    }
}

/// The tokens a running request's row runs in its next step, as a token budget counts
/// them: its prompt before anything is produced, then one token, or for a self-speculative
/// cycle the most its verification runs (its last token and the drafts it may still make:
/// `max_draft`, and no more than the tokens it may still produce after one).
fn step_tokens(r: &RequestSpec, produced: usize, spec: Option<&SelfSpeculative>) -> usize {
    match spec {
        _ if produced == 0 => r.prompt.len(),
        Some(s) if r.forced.is_empty() => {
            1 + s
                .max_draft
                .min(r.max_new_tokens.saturating_sub(produced + 1))
        }
        _ => 1,
    }
}

fn plan(
    mut commands: Commands,
    engine: Res<Engine>,
    mut out: ResMut<Plan>,
    mut queue: ResMut<WaitQueue>,
    running: Query<(Entity, &Request, &Progress, Option<&strategy::SpecPlan>), With<Running>>,
) {
    let mut live: Vec<(usize, Entity, Candidate)> = running
        .iter()
        .map(|(e, r, p, spec)| {
            let c = Candidate {
                id: r.0.id,
                tokens: step_tokens(&r.0, p.produced, spec.map(|s| &s.spec)),
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
    // Tokens part-way down finish their way together before anything else runs (depth-wise
    // batching picks stages itself).
    let deepest = candidates.iter().map(|c| c.stage).max().unwrap_or(0);
    let chosen: std::collections::HashSet<usize> = if deepest > 0 && !engine.batching.picks_stages()
    {
        candidates
            .iter()
            .filter(|c| c.stage == deepest)
            .map(|c| c.id)
            .collect()
    } else {
        engine.batching.plan(&candidates).into_iter().collect()
    };
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

/// Advances the clock by `seconds` of work done in the current step.
fn add_busy(clock: &mut Clock, recorder: &mut Recorder, stage: usize, seconds: f64) {
    add_clock(clock, seconds);
    add_stage_busy(recorder, stage, seconds);
}

/// Advances the clock by `seconds` of work, booked to no stage.
fn add_clock(clock: &mut Clock, seconds: f64) {
    clock.now_s += seconds;
    clock.busy_s += seconds;
    if !clock.prompt_step {
        clock.decode_busy_s += seconds;
    }
}

fn add_stage_busy(recorder: &mut Recorder, stage: usize, seconds: f64) {
    if recorder.stage_busy_s.len() <= stage {
        recorder.stage_busy_s.resize(stage + 1, 0.0);
    }
    recorder.stage_busy_s[stage] += seconds;
}

/// Appends each produced token to its request and finishes requests that are done.
fn emit(
    mut commands: Commands,
    mut produced: ResMut<StepTokens>,
    mut clock: ResMut<Clock>,
    engine: Res<Engine>,
    mut seqs: Query<(&Request, &mut Progress)>,
) {
    let layers = engine.program.graph().info.num_layers;
    for emitted in &mut produced.0 {
        let Ok((req, mut p)) = seqs.get_mut(emitted.entity) else {
            continue;
        };
        // Tokens after the request finished (a cycle's tokens after an end-of-sequence) are
        // dropped here, so the trace records only what the request produced.
        let mut kept = emitted.tokens.len();
        for (i, &token) in emitted.tokens.iter().enumerate() {
            if p.done {
                // A cycle's tokens after an end-of-sequence are dropped (its counts, which
                // describe the cycles, keep them).
                kept = i;
                break;
            }
            if let Some(t) = token {
                p.tokens.push(t);
            }
            let stat = match emitted.speculated.get(i) {
                // Every self-speculative token is the full model's (its depth, its head).
                Some(&how) => TokenStat {
                    exit_layer: layers as u16,
                    layers_run: layers as u16,
                    heads: 0,
                    filled: 0,
                    final_head: true,
                    speculated: Some(how),
                },
                None => p.track.stat(),
            };
            p.stats.push(stat);
            p.produced += 1;
            if p.first_token_s.is_none() {
                p.first_token_s = Some(clock.now_s);
            }
            let forced_done = !req.0.forced.is_empty() && p.produced >= req.0.forced.len();
            let stopped = forced_done
                || (req.0.forced.is_empty()
                    && token.is_some_and(|t| engine.decoding.stop_ids.contains(&t)));
            if p.produced >= req.0.max_new_tokens || stopped {
                p.done = true;
                p.finish_s = Some(clock.now_s);
                clock.active -= 1;
                commands
                    .entity(emitted.entity)
                    .remove::<(Active, Running)>();
            }
        }
        emitted.tokens.truncate(kept);
        emitted.speculated.truncate(kept);
    }
}

/// Writes one trace record per produced token.
fn record(
    produced: Res<StepTokens>,
    clock: Res<Clock>,
    engine: Res<Engine>,
    mut recorder: ResMut<Recorder>,
    seqs: Query<(&Request, &Progress)>,
) -> Result<(), StepError> {
    if recorder.trace.is_none() || produced.0.is_empty() {
        return Ok(());
    }
    let batch = produced.0.len();
    for emitted in &produced.0 {
        let Ok((req, p)) = seqs.get(emitted.entity) else {
            continue;
        };
        // The step's tokens are the request's last ones (emit may have stopped early).
        let n = emitted.tokens.len().min(p.produced);
        for (i, &token) in emitted.tokens.iter().take(n).enumerate() {
            let r = TraceRecord {
                seq: req.0.id,
                pos: req.0.prompt.len() + p.produced - n + i,
                token,
                step: clock.step,
                t_s: clock.now_s,
                batch,
                stages: stage_names(&p.track.layers, &engine.boundaries),
                layers: p.track.layers.clone(),
                exit_layer: p.track.exit_layer,
                signals: p.track.signals.clone(),
                speculated: emitted.speculated.get(i).copied(),
            };
            if let Some(w) = recorder.trace.as_mut() {
                w.write(&r).map_err(StepError::Trace)?;
            }
        }
    }
    Ok(())
}

/// The stages a path ran: contiguous runs of layers, split at stage boundaries.
fn stage_names(layers: &[usize], boundaries: &[usize]) -> Vec<String> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &l in layers {
        match runs.last_mut() {
            Some((_, end)) if *end == l && !boundaries.contains(&l) => *end = l + 1,
            _ => runs.push((l, l + 1)),
        }
    }
    runs.into_iter()
        .map(|(a, b)| format!("layers {a}..{b}"))
        .collect()
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
        let exits = program.graph().exit_depths();
        let request_exits = requests
            .iter()
            .any(|r| matches!(r.depth, Some(Depth::EarlyExit { .. })));
        let mut engine = Engine {
            program,
            batching,
            executor,
            decoding,
            depth: Depth::Full,
            exits,
            request_exits,
            boundaries: Vec::new(),
            sim_exits: None,
            skipped_kv: sim_exits::SkippedKv::Filled,
        };
        engine.compute_boundaries();
        world.insert_resource(engine);
        world.insert_resource(StageResults::default());
        world.insert_resource(decide::Exited::default());
        world.insert_resource(Failure::default());
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
        schedule.add_systems(
            (
                admit,
                plan,
                select::select.pipe(fail),
                step::execute.pipe(fail),
                decide::decide.pipe(fail),
                decide::copy_state.pipe(fail),
                emit,
                record.pipe(fail),
            )
                .chain(),
        );
        Runtime { world, schedule }
    }

    /// Sets how deep tokens run; checks it against the program and the executor.
    pub fn with_depth(mut self, depth: Depth) -> anyhow::Result<Self> {
        {
            let mut engine = self.world.resource_mut::<Engine>();
            engine.check_depth(&depth)?;
            engine.depth = depth;
            engine.compute_boundaries();
        }
        Ok(self)
    }

    /// Exits tokens at the depths `source` gives instead of by an exit rule (see
    /// [`sim_exits`]). The simulated executor runs no model, so it cannot evaluate a rule;
    /// the real one runs the exit head at a token's given depth and takes the token from it
    /// (its keys and values above are filled from the exit state, or left absent), so one exit
    /// distribution can be served for real and simulated on any model with exit heads.
    pub fn with_simulated_exits(mut self, source: sim_exits::ExitSource) -> anyhow::Result<Self> {
        {
            let mut engine = self.world.resource_mut::<Engine>();
            if matches!(engine.executor, Executor::Real) {
                // The real executor takes each token from the exit head at its given depth.
                let g = engine.program.graph();
                if let Some(k) = source
                    .points()
                    .iter()
                    .find(|&&k| g.exit_at(k).and_then(|e| e.logits).is_none())
                {
                    anyhow::bail!(
                        "given exit depths: the real executor takes a token leaving after layer \
                         {k} from the exit head there, and the pipeline has none (add \
                         InsertExits(after: [{k}], ...))"
                    );
                }
            }
            let cost = exitgraph_compiler::exits::cost::DepthCost::of(engine.program.graph());
            let fill_share = cost
                .layer
                .iter()
                .zip(&cost.kv_fill)
                .map(|(l, f)| if *l > 0.0 { f / l } else { 0.0 })
                .collect();
            engine.sim_exits = Some(SimExits { source, fill_share });
            let depth = engine.depth.clone();
            engine.check_depth(&depth)?;
            engine.compute_boundaries();
        }
        Ok(self)
    }

    /// What happens to the keys and values of the layers a token skipped by leaving early:
    /// filled from its exit state (CALM's state copying, the default) or left absent, so
    /// later tokens attend in those layers only to the positions that reached them. Both
    /// executors do either. Absent keys and values serve one token per call, so strategies
    /// that verify several (self-speculation) and sliding-window attention refuse them.
    pub fn with_skipped_kv(mut self, skipped: sim_exits::SkippedKv) -> anyhow::Result<Self> {
        {
            let mut engine = self.world.resource_mut::<Engine>();
            engine.skipped_kv = skipped;
            let depth = engine.depth.clone();
            engine.check_depth(&depth)?;
        }
        Ok(self)
    }

    /// Runs every request to completion (or failure).
    pub fn run(mut self) -> anyhow::Result<(ServeReport, Vec<RequestOutcome>)> {
        let mut drafts = Vec::new();
        {
            let engine = self.world.resource::<Engine>();
            engine.check_policy()?;
            engine.check_stateful_heads(&engine.depth)?;
            drafts.extend(engine.depth.speculative().map(|s| s.draft_exit));
            for r in &self.world.resource::<Arrivals>().0 {
                if let Some(depth) = &r.depth {
                    engine
                        .check_depth(depth)
                        .map_err(|e| anyhow::anyhow!("request {}: {e}", r.id))?;
                    drafts.extend(depth.speculative().map(|s| s.draft_exit));
                }
            }
        }
        {
            // Kangaroo adapters keep their caches whole only where some request drafts with
            // them: the others (and a run that drafts with none) do not pay for them.
            let mut engine = self.world.resource_mut::<Engine>();
            if engine
                .program
                .graph()
                .exits
                .iter()
                .any(|e| e.kv_slot.is_some())
            {
                engine.program = Arc::new(engine.program.sync_heads(&drafts));
            }
        }
        loop {
            self.schedule.run(&mut self.world);
            if let Some(e) = self.world.resource_mut::<Failure>().0.take() {
                let step = self.world.resource::<Clock>().step;
                anyhow::bail!("step {step}: {e}");
            }
            let pending = !self.world.resource::<Arrivals>().0.is_empty();
            let active = self.world.resource::<Clock>().active > 0;
            if !pending && !active {
                break;
            }
        }
        let mut q = self
            .world
            .query::<(&Request, &Progress, Option<&Failed>, Option<&Selected>)>();
        let mut outcomes: Vec<RequestOutcome> = q
            .iter(&self.world)
            .map(|(r, p, f, sel)| RequestOutcome {
                id: r.0.id,
                arrival_s: r.0.arrival_s,
                prompt_tokens: sel.map_or(r.0.prompt.len(), |s| s.prompt_tokens),
                selected: sel.map(|s| s.kept.clone()).filter(|k| !k.is_empty()),
                selection_scores: sel.map(|s| s.scores.clone()).filter(|k| !k.is_empty()),
                selection_s: sel.map(|s| s.seconds),
                tokens: p.tokens.clone(),
                produced: p.produced,
                first_token_s: p.first_token_s,
                finish_s: p.finish_s,
                failed: f.map(|f| f.0.clone()),
                stats: p.stats.clone(),
                nll: p.nll,
                first_nll: p.first_nll,
                speculative: (p.spec.cycles > 0).then_some(p.spec),
            })
            .collect();
        outcomes.sort_by_key(|o| o.id);
        let clock = self.world.resource::<Clock>();
        let (steps, busy, decode_busy) = (clock.step, clock.busy_s, clock.decode_busy_s);
        let mut recorder = self.world.resource_mut::<Recorder>();
        let occupancy = std::mem::take(&mut recorder.occupancy);
        let stage_busy = std::mem::take(&mut recorder.stage_busy_s);
        let stage_rows = std::mem::take(&mut recorder.stage_rows);
        if let Some(w) = recorder.trace.take() {
            w.finish()?;
        }
        let mut report = ServeReport::from_outcomes(&outcomes, steps, busy, occupancy);
        report.decode_busy_s = decode_busy;
        report.set_stage_rows(stage_rows);
        let engine = self.world.resource::<Engine>();
        report.executor = match engine.executor {
            Executor::Real => "real".into(),
            Executor::Sim(_) => "simulated".into(),
        };
        report.simulated_exits = engine
            .sim_exits
            .as_ref()
            .map(|sim| sim.source.label().to_string());
        report.skipped_kv = engine.skipped_kv;
        report.policy = format!("{:?}", engine.batching);
        let stages = engine.stages();
        let total: f64 = stage_busy.iter().sum();
        report.stage_busy_share = (0..stages)
            .map(|s| {
                let r = engine.stage_range(s);
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
/// batched `generate` does.
pub fn generate_through_runtime(
    program: Arc<Program>,
    prompts: &[Vec<u32>],
    opts: &exitgraph_compiler::generate::GenerateOptions,
) -> anyhow::Result<Vec<Vec<u32>>> {
    generate_with_depth(program, prompts, opts, &Depth::Full, None).map(|(rows, _)| rows)
}

/// [`generate_through_runtime`] with adaptive depth, a trace, and each request's outcome
/// (per-token depth statistics); skipped layers' keys and values are filled.
pub fn generate_with_depth(
    program: Arc<Program>,
    prompts: &[Vec<u32>],
    opts: &exitgraph_compiler::generate::GenerateOptions,
    depth: &Depth,
    trace: Option<TraceWriter>,
) -> anyhow::Result<(Vec<Vec<u32>>, Vec<RequestOutcome>)> {
    generate_with_strategy(
        program,
        prompts,
        opts,
        depth,
        sim_exits::SkippedKv::Filled,
        trace,
    )
}

/// [`generate_with_depth`] with what becomes of the keys and values of the layers an
/// early-exiting token skipped (a pipeline's `runtime.skipped_kv`).
pub fn generate_with_strategy(
    program: Arc<Program>,
    prompts: &[Vec<u32>],
    opts: &exitgraph_compiler::generate::GenerateOptions,
    depth: &Depth,
    skipped_kv: sim_exits::SkippedKv,
    trace: Option<TraceWriter>,
) -> anyhow::Result<(Vec<Vec<u32>>, Vec<RequestOutcome>)> {
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
            forced: Vec::new(),
            depth: None,
        })
        .collect();
    if opts.max_new_tokens == 0 {
        return Ok((prompts.to_vec(), Vec::new()));
    }
    let batching = Batching::Static {
        max_batch: prompts.len().max(1),
    };
    let (_, outcomes) = Runtime::new(program, batching, Executor::Real, decoding, requests, trace)
        .with_depth(depth.clone())?
        .with_skipped_kv(skipped_kv)?
        .run()?;
    if let Some(f) = outcomes.iter().find_map(|o| o.failed.as_ref()) {
        anyhow::bail!("{f}");
    }
    let longest = outcomes.iter().map(|o| o.tokens.len()).max().unwrap_or(0);
    let rows = prompts
        .iter()
        .zip(&outcomes)
        .map(|(p, o)| {
            let mut row = p.clone();
            row.extend(&o.tokens);
            row.resize(p.len() + longest, pad);
            row
        })
        .collect();
    Ok((rows, outcomes))
}

/// Continues each prompt; returns prompt + new tokens per row. Generation runs through the
/// ECS runtime (one static batch, [`generate_through_runtime`]): a row that
/// ends at an EOS id is padded to the longest, as transformers' batched `generate` does.
pub fn generate(
    program: &Program,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<u32>>, GenerateError> {
    let info = &program.graph().info;
    if !info.family.is_decoder() {
        return Err(GenerateError::Input(format!(
            "{} is an encoder; it does not generate tokens",
            info.model_type
        )));
    }
    if prompts.is_empty() {
        return Err(GenerateError::Input("no prompts".into()));
    }
    if prompts.iter().any(Vec::is_empty) {
        return Err(GenerateError::Input("a prompt has no tokens".into()));
    }
    if let Some(bad) = prompts
        .iter()
        .flatten()
        .find(|&&t| t as usize >= info.vocab)
    {
        return Err(GenerateError::Input(format!(
            "token id {bad} is outside the vocabulary (size {})",
            info.vocab
        )));
    }
    opts.sampling.to_candle()?;
    generate_through_runtime(Arc::new(program.clone()), prompts, opts)
        .map_err(GenerateError::Runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: a prompt of 5 counts 5; a plain decode row 1; a speculative row its last
    /// token and up to `max_draft` drafts, no more than the tokens it may still produce
    /// after one (10 new tokens, 7 produced: 2 drafts at most); a forced request 1.
    #[test]
    fn a_budget_counts_a_speculative_row_as_its_verification() {
        let r = RequestSpec {
            id: 0,
            arrival_s: 0.0,
            prompt: vec![1, 2, 3, 4, 5],
            max_new_tokens: 10,
            forced: Vec::new(),
            depth: None,
        };
        let s = SelfSpeculative {
            draft_exit: 2,
            max_draft: 6,
            stop_below: Some(0.6),
        };
        assert_eq!(step_tokens(&r, 0, Some(&s)), 5);
        assert_eq!(step_tokens(&r, 3, None), 1);
        assert_eq!(step_tokens(&r, 1, Some(&s)), 7);
        assert_eq!(step_tokens(&r, 7, Some(&s)), 3);
        assert_eq!(step_tokens(&r, 9, Some(&s)), 1);
        let forced = RequestSpec {
            forced: vec![7, 8],
            ..r
        };
        assert_eq!(step_tokens(&forced, 1, Some(&s)), 1);
    }
}
