//! GemFilter in the runtime: the select phase of every request whose prompt runs this step,
//! before the step runs it.
//!
//! The planned requests that have not started run the filter layer's select phase side by
//! side in one call (each prompt from position 0 on a discarded cache, so prompts of any
//! lengths batch like any prefill); each request's prompt then becomes its kept tokens, and
//! the step runs it as the full model's fresh prefill under whatever batching policy planned
//! it. The simulated executor cannot score tokens: it keeps the filter's count of them and
//! charges the select call from the cost model (the layers up to the filter layer's share).

use super::{
    add_busy, cost, Clock, Engine, Executor, Plan, Progress, Recorder, Request, StepError,
};
use bevy_ecs::prelude::*;
use std::time::Instant;

/// A request's GemFilter selection.
#[derive(Component, Clone, Debug, Default)]
pub struct Selected {
    /// Tokens of the prompt as it arrived.
    pub prompt_tokens: usize,
    /// The kept positions, in prompt order (real executor only).
    pub kept: Vec<usize>,
    /// The filter layer's score of every prompt position, before pooling (real executor
    /// only).
    pub scores: Vec<f32>,
    /// Seconds of the select call that scored the prompt (measured, or predicted by the
    /// simulated executor), shared with the requests selected in the same call.
    pub seconds: f64,
}

pub(super) fn select(
    mut commands: Commands,
    engine: Res<Engine>,
    plan: Res<Plan>,
    mut clock: ResMut<Clock>,
    mut recorder: ResMut<Recorder>,
    mut seqs: Query<(&mut Request, &Progress), Without<Selected>>,
) -> Result<(), StepError> {
    let Some(filter) = engine.program.graph().filter.clone() else {
        return Ok(());
    };
    let fresh: Vec<Entity> = plan
        .0
        .iter()
        .copied()
        .filter(|&e| {
            seqs.get(e)
                .is_ok_and(|(_, p)| p.produced == 0 && p.stage == 0)
        })
        .collect();
    if fresh.is_empty() {
        return Ok(());
    }
    clock.prompt_step = true;
    match &engine.executor {
        Executor::Real => {
            let prompts: Vec<Vec<u32>> = fresh
                .iter()
                .filter_map(|&e| seqs.get(e).ok())
                .map(|(r, _)| r.0.prompt.clone())
                .collect();
            let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let started = Instant::now();
            // An error here (a program that cannot run the prompts) ends the run, as a failed
            // step does.
            let selections = exitgraph_compiler::gemfilter::select(&engine.program, &refs)?;
            let seconds = started.elapsed().as_secs_f64();
            add_busy(&mut clock, &mut recorder, 0, seconds);
            for ((&e, prompt), sel) in fresh.iter().zip(&prompts).zip(selections) {
                if let Ok((mut r, _)) = seqs.get_mut(e) {
                    r.0.prompt = sel.ids(prompt);
                }
                commands.entity(e).insert(Selected {
                    prompt_tokens: prompt.len(),
                    kept: sel.kept,
                    scores: sel.scores,
                    seconds,
                });
            }
        }
        Executor::Sim(model) => {
            let share = select_share(engine.program.graph(), filter.layer);
            let (mut tokens, mut attention, mut sequences) = (0.0, 0.0, 0.0);
            let mut lengths = Vec::with_capacity(fresh.len());
            for &e in &fresh {
                let Ok((mut r, _)) = seqs.get_mut(e) else {
                    continue;
                };
                let n = r.0.prompt.len();
                tokens += share * n as f64;
                attention += share * cost::attention_work(&[(n, 0)]) as f64;
                sequences += share;
                // The simulated executor reads only the prompt's length.
                r.0.prompt.truncate(filter.keep.count(n));
                lengths.push((e, n));
            }
            let rows: usize = lengths.iter().map(|(_, n)| n).sum();
            let seconds = model.predict_layers(tokens, attention, sequences, 0, share)
                + model.call_work(rows, 0, share);
            add_busy(&mut clock, &mut recorder, 0, seconds);
            for (e, n) in lengths {
                commands.entity(e).insert(Selected {
                    prompt_tokens: n,
                    seconds,
                    ..Selected::default()
                });
            }
        }
    }
    Ok(())
}

/// The share of the model's per-token work the select phase does: the layers below the
/// filter layer and, of the filter layer, its scores node (norm, q and k) over the layer's
/// own per-token work.
pub fn select_share(g: &exitgraph_ir::Graph, layer: usize) -> f64 {
    let layers = g.info.num_layers.max(1) as f64;
    let (mut own, mut scores) = (0.0, 0.0);
    for n in g.graph.node_weights() {
        if n.layer != Some(layer) {
            continue;
        }
        match &n.op {
            exitgraph_ir::Op::QueryKeyScores(a) => {
                scores += (a.q.flops_per_token() + a.k.flops_per_token()) as f64
                    + 5.0 * a.q.in_features as f64;
            }
            op => own += op.flops_per_token() as f64,
        }
    }
    let part = if own > 0.0 {
        (scores / own).min(1.0)
    } else {
        1.0
    };
    (layer as f64 + part) / layers
}
