//! `exitgraph bench --gemfilter`: GemFilter's time to first token against the full model's
//! prefill on a random Llama, beside the ideal ratio its FLOPs imply.
//!
//! For each prompt length `n` and kept count `k`, repetitions alternate the two paths on one
//! lowered program (the random model with a `GemFilter` pass): the full model's prefill of
//! the `n` tokens with the LM head at the last one, and GemFilter's select phase (layers up
//! to the filter layer on the `n` tokens, scores, selection) followed by the full model's
//! prefill of the `k` kept tokens with the head. Each timing is from the call to the
//! first token's logits. The ideal speedup is the full prefill's FLOPs over GemFilter's
//! ([`prefill_flops`], [`gemfilter_flops`]); the peak KV bytes are computed from the cache's
//! shapes (the select phase's cache is dropped before the second run).

use crate::bench::BenchOptions;
use crate::bench_exits::median;
use crate::lower::{Program, Run, Segment, Task, Want};
use crate::synth::write_random_llama;
use exitgraph_ir::{Graph, Keep, Op};
use exitgraph_passes::{GemFilter, Pass, PassContext};
use std::fmt::Write;
use std::time::Instant;

/// What to measure.
#[derive(Clone, Debug)]
pub struct GemFilterBench {
    pub prompt_lens: Vec<usize>,
    pub keeps: Vec<usize>,
    /// 0-based filter layer.
    pub filter_layer: usize,
    pub pool: usize,
}

/// One (n, k) row.
#[derive(Clone, Debug, PartialEq)]
pub struct GemFilterRow {
    pub prompt: usize,
    pub keep: usize,
    /// Median full prefill (to the first token's logits), ms.
    pub full_ms: f64,
    /// Median GemFilter select phase plus prefill of the kept tokens, ms.
    pub gemfilter_ms: f64,
    /// Median select phase alone, ms.
    pub select_ms: f64,
    /// Lowest and highest per-repetition speedup.
    pub speedup_range: (f64, f64),
    pub ideal_speedup: f64,
    pub full_kv_bytes: usize,
    pub gemfilter_kv_bytes: usize,
}

impl GemFilterRow {
    pub fn speedup(&self) -> f64 {
        self.full_ms / self.gemfilter_ms.max(1e-12)
    }
}

#[derive(Clone, Debug)]
pub struct GemFilterReport {
    pub params: usize,
    pub layers: usize,
    pub filter_layer: usize,
    pub threads: usize,
    pub reps: usize,
    pub rows: Vec<GemFilterRow>,
}

/// FLOPs of one layer of `graph` per token (its projections and MLP: every op of block 0
/// but attention over the context) and per (query, key) pair of attention.
pub fn layer_flops(graph: &Graph) -> (f64, f64) {
    let mut per_token = 0.0;
    let mut per_pair = 0.0;
    for n in graph.graph.node_weights() {
        if n.layer == Some(0) && !matches!(n.op, Op::QueryKeyScores(_)) {
            per_token += n.op.flops_per_token() as f64;
            per_pair += n.op.attention_flops_per_context_token() as f64;
        }
    }
    (per_token, per_pair)
}

/// FLOPs of a causal prefill of `n` tokens through `layers` layers: every token's per-token
/// work and, per layer, `n (n + 1) / 2` query-key pairs; plus the head at the last token.
pub fn prefill_flops(layers: usize, per_token: f64, per_pair: f64, head: f64, n: usize) -> f64 {
    let n = n as f64;
    layers as f64 * (per_token * n + per_pair * n * (n + 1.0) / 2.0) + head
}

/// FLOPs of GemFilter's first token: the select phase (layers `0..r` on the `n` tokens,
/// layer `r`'s norm, q and k projections on them (`select_per_token`), the last query
/// against `n` keys over `heads` heads of `head_dim`), then the full model's prefill of the
/// `k` kept tokens with the head.
#[allow(clippy::too_many_arguments)]
pub fn gemfilter_flops(
    layers: usize,
    r: usize,
    per_token: f64,
    per_pair: f64,
    head: f64,
    select_per_token: f64,
    heads_x_dim: usize,
    n: usize,
    k: usize,
) -> f64 {
    let select = prefill_flops(r, per_token, per_pair, 0.0, n)
        + select_per_token * n as f64
        + 2.0 * (heads_x_dim * n) as f64;
    select + prefill_flops(layers, per_token, per_pair, head, k.min(n))
}

/// Seconds to the first token's logits of a fresh prefill of `ids`.
fn time_prefill(program: &Program, ids: &[u32]) -> anyhow::Result<f64> {
    let logits = program.logits_node()?;
    let mut cache = program.new_cache();
    let started = Instant::now();
    let out = program.run(
        &mut [Segment::new(ids, &mut cache)],
        &Run {
            from: 0,
            task: Task::Outputs(vec![Want::last(logits)]),
            commit: true,
        },
    )?;
    // Reading the logits back waits for the device.
    let _ = out[0][0]
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(started.elapsed().as_secs_f64())
}

pub fn run(
    opts: &BenchOptions,
    bench: &GemFilterBench,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<GemFilterReport> {
    if bench.prompt_lens.is_empty() || bench.keeps.is_empty() {
        anyhow::bail!("bench --gemfilter needs at least one --prompt-lens and one --keep");
    }
    let dir = tempfile::tempdir()?;
    let mut spec = opts.spec.clone();
    let longest = bench.prompt_lens.iter().copied().max().unwrap_or(0);
    spec.max_positions = spec.max_positions.max(longest + 1);
    write_random_llama(dir.path(), &spec, opts.seed)?;
    let mut graph = exitgraph_ir::import(dir.path())?.graph;
    let layers = graph.info.num_layers;
    let first_keep = bench.keeps[0];
    GemFilter::new(bench.filter_layer, Keep::Tokens(first_keep), bench.pool)
        .run(&mut graph, &PassContext::detached())
        .map_err(|e| anyhow::anyhow!("bench --filter-layer/--keep: {e}"))?;
    let (per_token, per_pair) = layer_flops(&graph);
    let head = graph
        .graph
        .node_weights()
        .filter(|n| n.layer.is_none() && matches!(n.op, Op::LmHead(_) | Op::Norm(_)))
        .map(|n| n.op.flops_per_token() as f64)
        .sum::<f64>();
    let (select_per_token, heads_x_dim, kv_per_token) = graph
        .graph
        .node_weights()
        .find_map(|n| match &n.op {
            Op::QueryKeyScores(a) => Some((
                (a.q.flops_per_token() + a.k.flops_per_token()) as f64
                    + 5.0 * a.q.in_features as f64,
                a.heads * a.head_dim,
                2 * a.kv_heads * a.head_dim,
            )),
            _ => None,
        })
        .ok_or_else(|| anyhow::anyhow!("the GemFilter pass added no scores node"))?;
    let device = opts.device.to_candle()?;
    let bytes = opts.dtype.size_in_bytes();
    let params = graph.params();
    let mut rows = Vec::new();
    for &n in &bench.prompt_lens {
        let prompt: Vec<u32> = (0..n)
            .map(|i| ((i * 7919 + 13 + opts.seed as usize) % graph.info.vocab) as u32)
            .collect();
        for &k in &bench.keeps {
            if let Some(f) = graph.filter.as_mut() {
                f.keep = Keep::Tokens(k);
            }
            let program = Program::lower(&graph, dir.path(), &device, opts.dtype)?;
            // Warm-up, untimed.
            time_prefill(&program, &prompt[..n.min(16)])?;
            let (mut full, mut gem, mut select) = (Vec::new(), Vec::new(), Vec::new());
            for rep in 0..opts.reps {
                progress(&format!(
                    "n {n}, k {k}: repetition {} of {}",
                    rep + 1,
                    opts.reps
                ));
                let mut time_gemfilter = || -> anyhow::Result<()> {
                    let started = Instant::now();
                    let sel = crate::gemfilter::select(&program, &[prompt.as_slice()])?;
                    select.push(started.elapsed().as_secs_f64());
                    let kept = sel[0].ids(&prompt);
                    time_prefill(&program, &kept)?;
                    gem.push(started.elapsed().as_secs_f64());
                    Ok(())
                };
                // Alternate which path goes first.
                if rep % 2 == 0 {
                    full.push(time_prefill(&program, &prompt)?);
                    time_gemfilter()?;
                } else {
                    time_gemfilter()?;
                    full.push(time_prefill(&program, &prompt)?);
                }
            }
            let ratios: Vec<f64> = full
                .iter()
                .zip(&gem)
                .map(|(f, g)| f / g.max(1e-12))
                .collect();
            let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let full_flops = prefill_flops(layers, per_token, per_pair, head, n);
            let gem_flops = gemfilter_flops(
                layers,
                bench.filter_layer,
                per_token,
                per_pair,
                head,
                select_per_token,
                heads_x_dim,
                n,
                k,
            );
            rows.push(GemFilterRow {
                prompt: n,
                keep: k,
                full_ms: 1e3 * median(full),
                gemfilter_ms: 1e3 * median(gem),
                select_ms: 1e3 * median(select),
                speedup_range: (lo, hi),
                ideal_speedup: full_flops / gem_flops,
                full_kv_bytes: layers * n * kv_per_token * bytes,
                gemfilter_kv_bytes: (bench.filter_layer * n).max(layers * k.min(n))
                    * kv_per_token
                    * bytes,
            });
        }
    }
    Ok(GemFilterReport {
        params,
        layers,
        filter_layer: bench.filter_layer,
        threads: candle_core::utils::get_num_threads(),
        reps: opts.reps,
        rows,
    })
}

impl GemFilterReport {
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "GemFilter time to first token vs full prefill: random Llama, {:.1}M parameters, {} \
             layers, filter layer {} (0-based), {} threads, median of {} repetitions (range of \
             the per-repetition speedups)\n\n\
             | prompt | keep | full prefill ms | GemFilter ms | select ms | speedup (range) | ideal | measured / ideal | peak KV full | peak KV GemFilter |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.params as f64 / 1e6,
            self.layers,
            self.filter_layer,
            self.threads,
            self.reps
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2}x ({:.2}–{:.2}) | {:.2}x | {:.2} | {:.1} MB | {:.1} MB |",
                r.prompt,
                r.keep,
                r.full_ms,
                r.gemfilter_ms,
                r.select_ms,
                r.speedup(),
                r.speedup_range.0,
                r.speedup_range.1,
                r.ideal_speedup,
                r.speedup() / r.ideal_speedup.max(1e-12),
                r.full_kv_bytes as f64 / 1e6,
                r.gemfilter_kv_bytes as f64 / 1e6,
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_flops_by_hand() {
        // 2 layers, 10 FLOPs a token, 3 a query-key pair, head 7, 4 tokens:
        // 2 · (10·4 + 3·4·5/2) + 7 = 2 · (40 + 30) + 7 = 147.
        assert_eq!(prefill_flops(2, 10.0, 3.0, 7.0, 4), 147.0);
        assert_eq!(prefill_flops(0, 10.0, 3.0, 7.0, 4), 7.0);
    }

    #[test]
    fn gemfilter_flops_by_hand() {
        // 4 layers, r = 1, n = 6, k = 2; 10 a token, 3 a pair, head 7; the select layer's
        // norm, q, k: 4 a token; 8 = heads × head size.
        // select: 1 · (10·6 + 3·21) + 4·6 + 2·8·6 = 123 + 24 + 96 = 243;
        // second run: 4 · (10·2 + 3·3) + 7 = 116 + 7 = 123.
        assert_eq!(gemfilter_flops(4, 1, 10.0, 3.0, 7.0, 4.0, 8, 6, 2), 366.0);
        // k ≥ n: the select phase plus the full prefill.
        let full = prefill_flops(4, 10.0, 3.0, 7.0, 6);
        assert_eq!(
            gemfilter_flops(4, 1, 10.0, 3.0, 7.0, 4.0, 8, 6, 9),
            243.0 + full
        );
    }

    #[test]
    fn layer_flops_count_block_zero_only() {
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::synth::LlamaSpec::tiny();
        write_random_llama(dir.path(), &spec, 1).unwrap();
        let mut g = exitgraph_ir::import(dir.path()).unwrap().graph;
        let before = layer_flops(&g);
        GemFilter::new(0, Keep::Tokens(4), 5)
            .run(&mut g, &PassContext::detached())
            .unwrap();
        // The scores node in layer 0 is not per-token layer work.
        assert_eq!(layer_flops(&g), before);
        let (h, i) = (spec.hidden as f64, spec.intermediate as f64);
        let kv = (spec.kv_heads * spec.head_dim()) as f64;
        // q, o: h×h; k, v: h×kv; gate, up, down: h×i; two norms 5h each.
        let expected = 2.0 * (2.0 * h * h + 2.0 * h * kv + 3.0 * h * i) + 10.0 * h;
        assert_eq!(before.0, expected);
        assert_eq!(before.1, 4.0 * h);
    }
}
