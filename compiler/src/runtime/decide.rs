//! The decide system: turns a step's results into tokens. At the last layer the model's own
//! head speaks; at an exit point the exit rule decides, per token, whether it stops there.
//! Exited tokens leave the batch: their skipped layers get keys and values from the exit
//! state (CALM's state copying) and the rest carry their hidden state to the next stage.

use super::trace::LayerSignal;
use super::{Clock, Engine, Kv, Progress, Recorder, Request, Sampler, StageResults, StepTokens};
use crate::exits::rule::{softmax, top2, ExitView};
use crate::exits::Depth;
use crate::lower::{KvCache, Segment};
use bevy_ecs::prelude::*;
use candle_core::{DType, Tensor};
use std::time::Instant;

fn to_vec(t: &Tensor) -> Result<Vec<f32>, String> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())
}

/// The last row of a `[tokens, hidden]` state.
fn last_row(h: &Tensor) -> Result<Vec<f32>, String> {
    let n = h.dim(0).map_err(|e| e.to_string())?;
    h.get(n.saturating_sub(1))
        .map_err(|e| e.to_string())
        .and_then(|r| to_vec(&r))
}

/// The token this step gives: the forced one, or a sample; adds the forced token's NLL.
fn choose(
    req: &Request,
    p: &mut Progress,
    logits: &Tensor,
    sampler: Option<Mut<Sampler>>,
) -> Result<u32, String> {
    if let Some(&forced) = req.0.forced.get(p.produced) {
        let probs = softmax(&to_vec(logits)?);
        let prob = probs
            .get(forced as usize)
            .copied()
            .unwrap_or(0.0)
            .max(1e-30);
        p.nll -= (prob as f64).ln();
        return Ok(forced);
    }
    let l = logits.to_dtype(DType::F32).map_err(|e| e.to_string())?;
    match sampler {
        Some(mut s) => s.0.sample(&l),
        None => l.argmax(0).and_then(|t| t.to_scalar::<u32>()),
    }
    .map_err(|e| e.to_string())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn decide(
    engine: Res<Engine>,
    mut results: ResMut<StageResults>,
    mut produced: ResMut<StepTokens>,
    mut clock: ResMut<Clock>,
    mut recorder: ResMut<Recorder>,
    mut seqs: Query<(&Request, &mut Progress, &mut Kv)>,
    mut samplers: Query<&mut Sampler>,
) {
    if results.entries.is_empty() {
        return;
    }
    let layers = engine.program.graph().info.num_layers;
    let end = results.range.end;
    let stage = results.stage;
    let rule = match &engine.depth {
        Depth::EarlyExit { rule } => Some(rule.clone()),
        _ => None,
    };
    let mut exited: Vec<(Entity, Tensor)> = Vec::new();
    let entries = std::mem::take(&mut results.entries);
    for r in entries {
        let Ok((req, mut p, _)) = seqs.get_mut(r.entity) else {
            continue;
        };
        let outcome: Result<(), String> = (|| {
            if let Some(logits) = &r.logits {
                let token = choose(req, &mut p, logits, samplers.get_mut(r.entity).ok())?;
                let run = p.track.layers.len();
                p.track.exit_layer = match &rule {
                    Some(rule) if rule.is_oracle() => p
                        .track
                        .oracle
                        .iter()
                        .find(|(_, t)| *t == token)
                        .map_or(layers, |(k, _)| *k),
                    _ => run,
                };
                p.stage = 0;
                produced.0.push((r.entity, Some(token)));
                return Ok(());
            }
            let hidden = r.hidden.ok_or("a stage returned nothing")?;
            if let (Some(rule), Some(exit_logits), true) = (&rule, &r.exit_logits, p.produced > 0) {
                let probs = softmax(&to_vec(exit_logits)?);
                let state = last_row(&hidden)?;
                let gate = match &r.gate {
                    Some(g) => {
                        let x = to_vec(g)?.first().copied().unwrap_or(0.0);
                        Some(1.0 / (1.0 + (-x).exp()))
                    }
                    None => None,
                };
                let (fire, signal) = {
                    let view = ExitView {
                        probs: &probs,
                        hidden: &state,
                        prev_hidden: p.track.prev_hidden.as_deref(),
                        gate,
                        earlier: &p.track.earlier,
                    };
                    rule.decide(&view)
                };
                let top = top2(&probs).0;
                p.track.signals.push(LayerSignal {
                    layer: end,
                    value: signal,
                    token: Some(top),
                });
                p.track.earlier.push(top);
                p.track.oracle.push((end, top));
                p.track.prev_hidden = Some(state);
                p.track.heads += 1;
                if fire {
                    let token = choose(req, &mut p, exit_logits, samplers.get_mut(r.entity).ok())?;
                    p.track.exit_layer = end;
                    p.track.filled = layers - end;
                    p.stage = 0;
                    produced.0.push((r.entity, Some(token)));
                    exited.push((r.entity, hidden));
                    return Ok(());
                }
            }
            p.carried = Some(hidden);
            p.stage = stage + 1;
            Ok(())
        })();
        if let Err(e) = outcome {
            recorder.error = Some(e);
            return;
        }
    }
    if exited.is_empty() {
        return;
    }
    // State copying for the exited tokens, in one batch.
    let mut taken: Vec<(Entity, Vec<u32>, KvCache)> = Vec::with_capacity(exited.len());
    let mut states = Vec::with_capacity(exited.len());
    for (e, h) in exited {
        if let Ok((req, p, mut kv)) = seqs.get_mut(e) {
            // The token that just ran is the one before the newly chosen one.
            let n = p.tokens.len();
            let ids = match p.tokens.last() {
                Some(_) if n >= 1 => vec![p.tokens[n - 1]],
                _ => req.0.prompt.clone(),
            };
            taken.push((e, ids, std::mem::take(&mut kv.0)));
            states.push(h);
        }
    }
    let started = Instant::now();
    let mut segments: Vec<Segment> = taken
        .iter_mut()
        .map(|(_, ids, cache)| Segment { ids, cache })
        .collect();
    let result = engine.program.fill_kv(&mut segments, end, &states);
    drop(segments);
    let elapsed = started.elapsed().as_secs_f64();
    for (e, _, cache) in taken {
        if let Ok((_, _, mut kv)) = seqs.get_mut(e) {
            kv.0 = cache;
        }
    }
    match result {
        Ok(()) => {
            clock.now_s += elapsed;
            clock.busy_s += elapsed;
            super::add_stage_busy(&mut recorder, stage, elapsed);
        }
        Err(e) => recorder.error = Some(e.to_string()),
    }
}
