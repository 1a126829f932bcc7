//! Per-sample early exiting for encoders' sentence embeddings.
//!
//! The batch runs stage by stage between exit points. At each exit point a sample whose
//! state has saturated — the cosine between its mean-pooled residual stream after the exit's
//! layer and after the layer below it (the embeddings for an exit after layer 1) reaches the
//! `Saturation` threshold, as CALM and MuE compare consecutive layers —
//! leaves the batch with the exit's pooled embedding (`exit.k.sentence_embedding`, pooled the
//! way the model pools); the others continue together to the next exit, or to the model's
//! own `sentence_embedding`.

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use exitgraph_compiler::exits::rule::cosine;
use exitgraph_compiler::exits::ExitRule;
use exitgraph_compiler::lower::{Inputs, Program};

/// One sample's embedding and where it exited.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedded {
    pub embedding: Vec<f32>,
    /// Layers its state went through.
    pub exit_layer: usize,
    /// Saturation at each exit point it reached.
    pub signals: Vec<(usize, f64)>,
}

/// Mean over the real tokens of `h: [n, seq, hidden]` (mask `[n, seq]`, 1 = real).
fn mean_pooled(h: &Tensor, mask: &[Vec<u32>]) -> anyhow::Result<Vec<Vec<f32>>> {
    let h = h.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    Ok(h.iter()
        .zip(mask)
        .map(|(rows, m)| {
            let width = rows.first().map_or(0, Vec::len);
            let mut acc = vec![0f32; width];
            let mut n = 0f32;
            for (r, &keep) in rows.iter().zip(m) {
                if keep == 1 {
                    n += 1.0;
                    for (a, x) in acc.iter_mut().zip(r) {
                        *a += x;
                    }
                }
            }
            acc.iter().map(|a| a / n.max(1.0)).collect()
        })
        .collect())
}

/// Which rules an encoder can use: saturation (and `Never`), combined with `Any`/`All`.
fn check(rule: &ExitRule) -> anyhow::Result<()> {
    match rule {
        ExitRule::Saturation(_) | ExitRule::Never => Ok(()),
        ExitRule::Any(rs) | ExitRule::All(rs) => rs.iter().try_for_each(check),
        other => bail!(
            "encoders exit on hidden-state saturation only (Saturation, Never, Any, All), not {other:?}"
        ),
    }
}

/// Embeds the token rows `ids` (padded with `pad`), each leaving at its own exit.
pub fn embed_with_exits(
    program: &Program,
    ids: &[Vec<u32>],
    pad: u32,
    rule: &ExitRule,
) -> anyhow::Result<Vec<Embedded>> {
    check(rule)?;
    rule.validate().map_err(anyhow::Error::msg)?;
    let graph = program.graph();
    if graph.info.family.is_decoder() {
        bail!("embed_with_exits is for encoders");
    }
    let layers = graph.info.num_layers;
    let points = graph.exit_depths();
    if points.is_empty() {
        bail!("the encoder has no exits: add an InsertExits pass");
    }
    if ids.iter().any(Vec::is_empty) {
        bail!("a text has no tokens");
    }
    let device = program.device().clone();
    let len = ids.iter().map(Vec::len).max().unwrap_or(0);
    let mut rows: Vec<usize> = (0..ids.len()).collect();
    let mut results: Vec<Option<Embedded>> = vec![None; ids.len()];
    let mut signals: Vec<Vec<(usize, f64)>> = vec![Vec::new(); ids.len()];
    let mut carried: Option<Tensor> = None;
    let mut start = 0;
    for end in points.iter().copied().chain(std::iter::once(layers)) {
        if rows.is_empty() {
            break;
        }
        let mut flat = Vec::with_capacity(rows.len() * len);
        let mut mask_rows = Vec::with_capacity(rows.len());
        for &r in &rows {
            let m: Vec<u32> = (0..len).map(|i| u32::from(i < ids[r].len())).collect();
            flat.extend((0..len).map(|i| ids[r].get(i).copied().unwrap_or(pad)));
            mask_rows.push(m);
        }
        let mask_flat: Vec<u32> = mask_rows.iter().flatten().copied().collect();
        let inputs = Inputs {
            input_ids: Tensor::from_vec(flat, (rows.len(), len), &device)?,
            attention_mask: Some(Tensor::from_vec(mask_flat, (rows.len(), len), &device)?),
            token_type_ids: None,
            example_ids: None,
        };
        let last = end == layers;
        let pooled_node = if last {
            graph
                .head
                .pooled
                .context("the encoder has no sentence pooling")?
        } else {
            graph
                .exit_at(end)
                .and_then(|e| e.embedding)
                .with_context(|| format!("the exit after layer {end} has no pooled embedding"))?
        };
        // The stream one layer below the exit, for saturation.
        let want = vec![
            pooled_node,
            program.stream_node(end)?,
            program.stream_node(end - 1)?,
        ];
        let entry = match &carried {
            Some(h) => Some((program.stream_node(start)?, h)),
            None => None,
        };
        let out = program.forward_nodes(&inputs, &mut program.new_cache(), entry, &want, false)?;
        let prev = mean_pooled(
            out.get(2).context("no hidden state below the exit")?,
            &mask_rows,
        )?;
        let h = out.get(1).context("no hidden state")?.clone();
        let pooled = out
            .first()
            .context("no pooled output")?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let now = mean_pooled(&h, &mask_rows)?;
        let mut keep = Vec::new();
        for (i, &r) in rows.iter().enumerate() {
            let fire = if last {
                true
            } else {
                let view = exitgraph_compiler::exits::ExitView {
                    probs: &[],
                    hidden: &now[i],
                    prev_hidden: Some(&prev[i]),
                    gate: None,
                    earlier: &[],
                    index: 0,
                    max_tokens: 1,
                };
                let (fire, _) = rule.decide(&view);
                signals[r].push((end, cosine(&now[i], &prev[i])));
                fire
            };
            if fire {
                results[r] = Some(Embedded {
                    embedding: pooled[i].clone(),
                    exit_layer: end,
                    signals: std::mem::take(&mut signals[r]),
                });
            } else {
                keep.push(i);
            }
        }
        let idx = Tensor::new(
            keep.iter()
                .map(|&i| i as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            &device,
        )?;
        if keep.is_empty() {
            break;
        }
        carried = Some(h.index_select(&idx, 0)?);
        rows = keep.iter().map(|&i| rows[i]).collect();
        start = end;
    }
    results
        .into_iter()
        .map(|r| r.context("a sample produced no embedding"))
        .collect()
}
