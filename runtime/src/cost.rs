//! The simulated executor's cost model: step time as a linear function of the step's new
//! tokens, its attention work (Σ new tokens × context length), the heads it runs and the
//! share of the layers it runs, fitted by non-negative least squares to calls measured on this machine
//! (`exitgraph profile`: full forward passes, and calls that stop part-way down, as stages
//! and early exits do).
//!
//! `seconds = c0 + s·(c1·tokens + c2·attention + c5·sequences) + c3·heads + c4·s`, where `s`
//! is the share of the layers the call runs: `c4` is the fixed work of running every layer
//! once (launching each op, whatever the batch), `c5` each sequence's own work in every layer
//! (attention runs per sequence), and `c3` a head (final norm and LM head at a sequence's
//! last position). A stage of one layer out of six pays a sixth of `c4` and `c5`. Version-1
//! files have neither (their intercept and per-sequence term hold them); they still read.
//!
//! A looped model's profile adds calls of one loop iteration whose rows sit at `g` different
//! iterations ([`Program::run_blocks`]: the shared weights once, each group of rows with its
//! own adapters, per-iteration norms and KV slots), and a term `c6·s·g` for that per-group
//! work (0 in files without such calls).
//!
//! Two terms depend on a call's shape: `c7·s` when it has two or more rows (new tokens; on
//! a CPU a matrix product packs its operands, a one-row product does not) and `c8` when it
//! runs any head (the LM head's weights read once, whatever its rows). They join the fit
//! when its samples tell them apart from the other terms (0 in older files).

use anyhow::{bail, Context};
use exitgraph_compiler::lower::{Positions, Program, Run, Segment, Task, Want};
use exitgraph_ir::NodeIndex;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// One measured step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub tokens: usize,
    pub attention: usize,
    pub sequences: usize,
    /// Median seconds over the repetitions.
    pub seconds: f64,
    /// The repetitions' range relative to their median, (max − min) / median.
    #[serde(default)]
    pub spread: f64,
    /// Share of the layers the call ran: 1 for a full forward pass with the head at each
    /// sequence's last position; less for a call that stops part-way down.
    #[serde(default = "full_depth")]
    pub layers_share: f64,
    /// Whether a call that stops part-way down ran the exit head there at each sequence's
    /// last position (and the host-side softmax an exit rule reads), as an early-exit stage
    /// does. A full call always runs the final head.
    #[serde(default)]
    pub exit_head: bool,
    /// In a looped call (one iteration of a looped block for every row), the number of
    /// distinct iterations its rows were at; 0 for other calls.
    #[serde(default)]
    pub groups: usize,
}

impl Sample {
    /// A profiled call of `shape` (new tokens, cached tokens per segment) and its times.
    fn measured(
        shape: &[(usize, usize)],
        times: &crate::metrics::Spread,
        layers_share: f64,
        exit_head: bool,
        groups: usize,
    ) -> Self {
        Sample {
            tokens: shape.iter().map(|s| s.0).sum(),
            attention: attention_work(shape),
            sequences: shape.len(),
            seconds: times.median,
            spread: times.relative(),
            layers_share,
            exit_head,
            groups,
        }
    }
}

fn full_depth() -> f64 {
    1.0
}

/// The fitted model and the samples it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    pub version: u32,
    /// Seconds: intercept, per new token, per unit of attention work, per head (a sequence's
    /// final norm and LM head at its last position, and its other per-sequence work).
    pub coefficients: [f64; 4],
    /// Seconds of the fixed work of running every layer once, scaled by the share of the
    /// layers a call runs (0 in version-1 files, whose intercept holds it).
    #[serde(default)]
    pub per_layers: f64,
    /// Seconds of one sequence's own work in every layer (attention runs per sequence),
    /// scaled by the share of the layers it runs (0 in version-1 files).
    #[serde(default)]
    pub per_sequence_layers: f64,
    /// Seconds of one group of rows at one loop iteration in a looped call (its adapters,
    /// per-iteration norms), scaled by the share of the layers the call runs (0 without
    /// looped calls in the profile).
    #[serde(default)]
    pub per_group: f64,
    /// Seconds of the extra fixed work of a call of two or more rows (new tokens) over a
    /// one-row call, scaled by the share of the layers it runs: on a CPU a matrix product
    /// packs its operands where a one-row product does not (0 in files fitted without it).
    #[serde(default)]
    pub per_layers_rows: f64,
    /// Seconds of running a head at all in a call, whatever its rows: reading the LM head's
    /// weights once (0 in files fitted without it, whose per-head term holds it).
    #[serde(default)]
    pub per_head_call: f64,
    /// Seconds of the fixed work of a call that fills the keys and values of every layer
    /// from copied states (CALM's state copying), scaled by the share of the layers it fills,
    /// charged instead of the intercept and `per_layers`. Absent in profiled models, which
    /// charge such a call the intercept and the k and v share of `per_layers`
    /// ([`CostModel::predict_fill`]); a roofline model reads only the k and v weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_fill_per_layers: Option<f64>,
    /// The machine a roofline model describes (absent in profiled models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roofline: Option<Roofline>,
    pub samples: Vec<Sample>,
}

/// A machine described by its memory bandwidth and arithmetic peak, for a cost model that is
/// derived rather than measured ([`CostModel::roofline`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Roofline {
    /// Bytes per second read from memory.
    pub bandwidth: f64,
    /// FLOPs per second.
    pub peak: f64,
    /// Bytes of one weight (2 for bf16, 4 for f32).
    pub weight_bytes: f64,
    /// Bytes of one cached key or value element.
    pub kv_bytes: f64,
}

/// Number of features of the full fit.
const FEATURES: usize = 9;

/// The heads a sample's call runs: one per sequence at full depth or at an exit head.
fn sample_heads(s: &Sample) -> usize {
    if s.layers_share >= 1.0 || s.exit_head {
        s.sequences
    } else {
        0
    }
}

/// The fit's features of a sample: intercept, share-weighted tokens and attention, heads,
/// share, share-weighted sequences, share-weighted groups, share if the call has two or
/// more rows, and whether it runs a head.
fn features(s: &Sample) -> [f64; FEATURES] {
    let share = s.layers_share;
    let heads = sample_heads(s);
    [
        1.0,
        share * s.tokens as f64,
        share * s.attention as f64,
        heads as f64,
        share,
        share * s.sequences as f64,
        share * s.groups as f64,
        share * f64::from(u8::from(s.tokens >= 2)),
        f64::from(u8::from(heads >= 1)),
    ]
}

/// Non-negative least squares from the normal equations (`ata = XᵀWX`, `atb = XᵀWy`, `yty =
/// yᵀWy`): the `x ≥ 0` minimising `yty − 2·atbᵀx + xᵀ·ata·x`. Every subset of the features
/// is tried free with the rest at 0 (at most 2⁹ small solves); the optimum is the best
/// feasible one, since at it the free coefficients solve their own normal equations.
fn nnls(ata: &[Vec<f64>], atb: &[f64], yty: f64) -> Vec<f64> {
    let n = atb.len();
    let objective = |x: &[f64]| {
        let mut q = yty;
        for i in 0..n {
            q -= 2.0 * atb[i] * x[i];
            for j in 0..n {
                q += x[i] * ata[i][j] * x[j];
            }
        }
        q
    };
    let mut best = (vec![0.0; n], yty);
    for mask in 1u32..(1 << n) {
        let free: Vec<usize> = (0..n).filter(|&i| mask & (1 << i) != 0).collect();
        let a: Vec<Vec<f64>> = free
            .iter()
            .map(|&i| free.iter().map(|&j| ata[i][j]).collect())
            .collect();
        let b: Vec<f64> = free.iter().map(|&i| atb[i]).collect();
        let Some(sol) = solve_dyn(a, b) else {
            continue;
        };
        if sol.iter().any(|&v| v < 0.0) {
            continue;
        }
        let mut x = vec![0.0; n];
        for (&i, v) in free.iter().zip(sol) {
            x[i] = v;
        }
        let q = objective(&x);
        if q < best.1 {
            best = (x, q);
        }
    }
    best.0
}

/// Whether the samples tell the features `cols` apart: Gaussian elimination on their
/// normal equations scaled to unit diagonal (a correlation matrix) finds every pivot above
/// 1e-6, i.e. no feature is explained to within one part in a million by the others.
fn determined(ata: &[[f64; FEATURES]; FEATURES], cols: &[usize]) -> bool {
    let n = cols.len();
    let d: Vec<f64> = cols.iter().map(|&i| ata[i][i]).collect();
    if d.iter().any(|&v| v <= 0.0 || !v.is_finite()) {
        return false;
    }
    let mut a: Vec<Vec<f64>> = (0..n)
        .map(|r| {
            (0..n)
                .map(|c| ata[cols[r]][cols[c]] / (d[r] * d[c]).sqrt())
                .collect()
        })
        .collect();
    for col in 0..n {
        let Some(pivot) = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
        else {
            return false;
        };
        if a[pivot][col].abs() < 1e-6 {
            return false;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in a.iter_mut().skip(col + 1) {
            let f = row[col] / pivot_row[col];
            for (v, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * p;
            }
        }
    }
    true
}

/// Gaussian elimination with partial pivoting on a square system of any size.
fn solve_dyn(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-18 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (v, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

impl CostModel {
    /// Least-squares fit with every coefficient non-negative (each is the seconds of some
    /// work, so none may be negative: an unconstrained fit gave the demo model a negative
    /// intercept and head term), each sample weighted by 1 / seconds so small and large
    /// steps count alike (relative error). Without partial-depth samples the per-layer term
    /// cannot be told from the intercept and is left at 0.
    pub fn fit(samples: Vec<Sample>) -> anyhow::Result<Self> {
        let partial = samples.iter().any(|s| s.layers_share < 1.0);
        let looped = samples.iter().any(|s| s.groups > 0);
        let mut ata = [[0.0; FEATURES]; FEATURES];
        let mut atb = [0.0; FEATURES];
        let mut yty = 0.0;
        for s in &samples {
            let f = features(s);
            let w = 1.0 / (s.seconds * s.seconds).max(1e-12);
            yty += w * s.seconds * s.seconds;
            for i in 0..FEATURES {
                for j in 0..FEATURES {
                    ata[i][j] += w * f[i] * f[j];
                }
                atb[i] += w * f[i] * s.seconds;
            }
        }
        // The chosen features' normal equations must determine the model; the fit is their
        // non-negative least-squares solution. Without partial-depth samples the per-layer
        // and per-sequence-layer terms cannot be told from the intercept and others, nor
        // the per-group term without looped calls; the row-count and head-call terms join
        // when the samples tell them apart from the rest.
        let sub = |cols: &[usize]| -> (Vec<Vec<f64>>, Vec<f64>) {
            (
                cols.iter()
                    .map(|&i| cols.iter().map(|&j| ata[i][j]).collect())
                    .collect(),
                cols.iter().map(|&i| atb[i]).collect(),
            )
        };
        let mut cols: Vec<usize> = vec![0, 1, 2, 3];
        if partial {
            cols.extend([4, 5]);
        }
        if partial && looped {
            cols.push(6);
        }
        let (a, b) = sub(&cols);
        solve_dyn(a, b).context("profile samples do not determine the cost model")?;
        if partial {
            for extra in [7, 8] {
                let mut with = cols.clone();
                with.push(extra);
                if determined(&ata, &with) {
                    cols = with;
                }
            }
        }
        let (a, b) = sub(&cols);
        let x = nnls(&a, &b, yty);
        let mut c = [0.0; FEATURES];
        for (&i, v) in cols.iter().zip(x) {
            c[i] = v;
        }
        Ok(CostModel {
            version: 2,
            coefficients: [c[0], c[1], c[2], c[3]],
            per_layers: c[4],
            per_sequence_layers: c[5],
            per_group: c[6],
            per_layers_rows: c[7],
            per_head_call: c[8],
            kv_fill_per_layers: None,
            roofline: None,
            samples,
        })
    }

    /// Predicted seconds of a full forward pass (every layer, a head per sequence).
    pub fn predict(&self, tokens: usize, attention: usize, sequences: usize) -> f64 {
        let n = sequences as f64;
        self.predict_layers(tokens as f64, attention as f64, n, sequences, 1.0)
            + self.call_work(tokens, sequences, 1.0)
    }

    /// Predicted seconds of a sample's call.
    pub fn predict_sample(&self, s: &Sample) -> f64 {
        let share = s.layers_share;
        let heads = sample_heads(s);
        self.call_work(s.tokens, heads, share)
            + self.predict_layers(
                share * s.tokens as f64,
                share * s.attention as f64,
                share * s.sequences as f64,
                heads,
                share,
            )
            + self.group_work(s.groups, share)
    }

    /// Predicted seconds of a call filling keys and values from copied states: `tokens` is
    /// weighted by the share of a layer's work the filling does in the layers it fills,
    /// `layers_share` is the share of the layers filled, and `kv_share` the same layers'
    /// share of the whole model's layer work that filling does (their key and value
    /// projections). A profiled model charges the intercept and that share of the per-layer
    /// fixed work (a fill runs only the norms and the k and v projections of the layers it
    /// fills, so it reads that share of their weights); a roofline, the k and v weights of
    /// the layers filled.
    pub fn predict_fill(&self, tokens: f64, layers_share: f64, kv_share: f64) -> f64 {
        match self.kv_fill_per_layers {
            Some(fixed) => self.coefficients[1] * tokens + fixed * layers_share,
            None => self.predict_layers(tokens, 0.0, 0.0, 0, kv_share),
        }
    }

    /// The cost model of a machine that is bound by reading memory or by arithmetic, derived
    /// from the graph: every call reads the weights of the layers it runs once, whatever
    /// its rows (`per_layers`: each block's projections and adapters, a looped block's once
    /// per iteration, as a GPU whose caches cannot hold a layer re-reads it), and the final
    /// norm and LM head once (the intercept); each token costs its FLOPs at the peak
    /// (`c1`, and `c3` for the LM head at a sequence's last position); each (query, cached
    /// key) pair costs attention's FLOPs and reading the key and value (`c2`); each group of
    /// rows at one loop iteration reads its own adapters (`per_group`); filling a skipped
    /// layer's keys and values reads its k and v weights (`kv_fill_per_layers`).
    ///
    /// Memory and arithmetic times add (a roofline takes their maximum): the sum is at most
    /// twice the roofline, and close to it wherever one side dominates, as reading weights
    /// does in decoding. Not counted: norms' and embeddings' reads, exit heads' own weights,
    /// activations' traffic, kernel launches and the host. Overcharged: every call pays the
    /// LM head's read, also one that runs no head (a stage that ends early, GemFilter's
    /// select phase); a prompt's queries share one read of their cache and attend causally,
    /// but the step's attention work counts every query against the whole context, so
    /// prefill's attention is charged about twice; `per_layers` includes the adapters, so a
    /// looped call pays its share of every iteration's adapters besides each group's own
    /// (rank-16 adapters on a 768-wide model: 3% of a layer's bytes).
    pub fn roofline(graph: &exitgraph_ir::Graph, machine: Roofline) -> anyhow::Result<Self> {
        use exitgraph_ir::op::Op;
        if !(machine.bandwidth > 0.0
            && machine.peak > 0.0
            && machine.weight_bytes > 0.0
            && machine.kv_bytes > 0.0)
        {
            bail!(
                "a roofline needs a positive bandwidth, peak, weight size and cache element size"
            );
        }
        let layers = graph.info.num_layers;
        let (mut layer_bytes, mut adapter_bytes, mut kv_weight_bytes) = (0.0, 0.0, 0.0);
        let (mut token_flops, mut pair_flops, mut kv_position_bytes) = (0.0, 0.0, 0.0);
        let (mut head_bytes, mut head_flops) = (0.0, 0.0);
        let exit_nodes: std::collections::HashSet<NodeIndex> = graph
            .exits
            .iter()
            .flat_map(|e| e.nodes.iter().copied())
            .collect();
        for idx in graph.graph.node_indices() {
            let n = &graph.graph[idx];
            if matches!(n.op, Op::QueryKeyScores(_)) || exit_nodes.contains(&idx) {
                continue;
            }
            let params: usize = n.op.linears().iter().map(|l| l.params()).sum();
            let adapters: usize =
                n.op.linears()
                    .iter()
                    .filter_map(|l| {
                        l.adapter
                            .as_ref()
                            .map(|a| a.rank * (l.in_features + l.out_features))
                    })
                    .sum();
            match (n.layer, &n.op) {
                (Some(l), op) if l < layers => {
                    layer_bytes += params as f64 * machine.weight_bytes;
                    adapter_bytes += adapters as f64 * machine.weight_bytes;
                    token_flops += op.flops_per_token() as f64;
                    if let Op::Attention(a) = op {
                        pair_flops += op.attention_flops_per_context_token() as f64;
                        kv_position_bytes +=
                            2.0 * (a.kv_heads * a.head_dim) as f64 * machine.kv_bytes;
                        kv_weight_bytes +=
                            (a.k.params() + a.v.params()) as f64 * machine.weight_bytes;
                    }
                }
                (None, Op::LmHead(l)) => {
                    head_bytes += l.params() as f64 * machine.weight_bytes;
                    head_flops += l.flops_per_token() as f64;
                }
                _ => {}
            }
        }
        let (bw, peak) = (machine.bandwidth, machine.peak);
        Ok(CostModel {
            version: 2,
            coefficients: [
                head_bytes / bw,
                token_flops / peak,
                pair_flops / peak + kv_position_bytes / bw,
                head_flops / peak,
            ],
            per_layers: layer_bytes / bw,
            per_sequence_layers: 0.0,
            per_group: adapter_bytes / bw,
            per_layers_rows: 0.0,
            per_head_call: 0.0,
            kv_fill_per_layers: Some(kv_weight_bytes / bw),
            roofline: Some(machine),
            samples: Vec::new(),
        })
    }

    /// Predicted seconds of the work a call pays by its shape: the extra fixed work of
    /// `rows ≥ 2` new tokens, scaled by the share of the layers it runs, and one head read
    /// if it runs any of its `heads`.
    pub fn call_work(&self, rows: usize, heads: usize, layers_share: f64) -> f64 {
        let several = if rows >= 2 { layers_share } else { 0.0 };
        let head = if heads >= 1 { 1.0 } else { 0.0 };
        self.per_layers_rows * several + self.per_head_call * head
    }

    /// Predicted seconds of the per-group work of a looped call whose rows sit at `groups`
    /// distinct iterations and which runs `layers_share` of the layers (one iteration).
    pub fn group_work(&self, groups: usize, layers_share: f64) -> f64 {
        self.per_group * layers_share * groups as f64
    }

    /// Predicted seconds of a call whose tokens run only part of the layers: `tokens`,
    /// `attention` and `sequences` are already weighted by the share of the layers each
    /// sequence runs, `heads` counts the heads run (a final or exit head at a sequence's last
    /// position), and `layers_share` is the share of the layers the call runs (the fixed
    /// per-layer work). The intercept is paid in full.
    pub fn predict_layers(
        &self,
        tokens: f64,
        attention: f64,
        sequences: f64,
        heads: usize,
        layers_share: f64,
    ) -> f64 {
        let f = [1.0, tokens, attention, heads as f64];
        let t: f64 = f
            .iter()
            .zip(&self.coefficients)
            .map(|(a, b)| a * b)
            .sum::<f64>()
            + self.per_layers * layers_share
            + self.per_sequence_layers * sequences;
        t.max(1e-6)
    }

    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let m: CostModel = exitgraph_compiler::ron_file::read(path)?;
        if !matches!(m.version, 1 | 2) {
            bail!(
                "{}: cost model version {} is not supported (1 or 2)",
                path.display(),
                m.version
            );
        }
        Ok(m)
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let cfg = ron::ser::PrettyConfig::new()
            .new_line("\n".to_string())
            .struct_names(true);
        exitgraph_compiler::atomic::write_text(path, &ron::ser::to_string_pretty(self, cfg)?)
    }
}

/// Attention work of a step: Σ over sequences of new tokens × context after the step.
pub fn attention_work(shapes: &[(usize, usize)]) -> usize {
    shapes
        .iter()
        .map(|&(new, cached)| new * (cached + new))
        .sum()
}

/// A profiled call: each segment's (new tokens, cached tokens), the layers it runs, and the
/// exit head it runs at its end.
type Call = (Vec<(usize, usize)>, usize, Option<NodeIndex>);

/// Measures steps of many shapes (prefills of 1..=max_tokens tokens, decode batches of
/// 1..=max_batch sequences at several context lengths, and mixes) on `program`.
pub fn profile(
    program: &Program,
    reps: usize,
    max_tokens: usize,
    max_batch: usize,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<CostModel> {
    // The simulator serves no self-speculative drafts: Kangaroo adapters do not run.
    let program = &program.sync_heads(&[]);
    let max_ctx = program.graph().info.max_positions.min(1024);
    let mut shapes: Vec<Vec<(usize, usize)>> = Vec::new();
    let mut t = 1;
    while t <= max_tokens && t < max_ctx {
        shapes.push(vec![(t, 0)]);
        t *= 2;
    }
    for ctx in [8usize, 32, 96, 192] {
        if ctx + 2 >= max_ctx {
            continue;
        }
        let mut n = 1;
        while n <= max_batch {
            shapes.push(vec![(1, ctx); n]);
            n *= 2;
        }
        shapes.push(
            [
                vec![(16.min(max_ctx - ctx - 1), 0)],
                vec![(1, ctx); max_batch.max(1) / 2],
            ]
            .concat(),
        );
    }
    // Steps of a loaded server: several decodes at assorted contexts beside a prefill.
    let mut n = 2;
    while n <= max_batch {
        for (ctx, prefill) in [(16usize, 8usize), (48, 24), (96, 40)] {
            if ctx + n + prefill + 2 >= max_ctx {
                continue;
            }
            let decodes: Vec<(usize, usize)> = (0..n - 1)
                .map(|i| (1, ctx + (i * 7) % ctx.max(1)))
                .collect();
            shapes.push([decodes, vec![(prefill, 0)]].concat());
        }
        n *= 2;
    }
    let graph = program.graph();
    let layers = graph.info.num_layers.max(1);
    // Calls that stop after `depth` layers and run no head (stages, early exits): a few
    // shapes at one layer and at half the layers, so the fit can tell the per-layer fixed
    // work from the intercept.
    let calls: Vec<(Vec<(usize, usize)>, usize)> =
        shapes.into_iter().map(|shape| (shape, layers)).collect();
    // Where the graph has an exit head, the same calls also run it (and the host-side
    // softmax of its logits), so the head's cost is measured apart from the layers'.
    let mut depths = vec![1, layers / 2];
    depths.extend(
        graph
            .exits
            .iter()
            .filter(|e| e.logits.is_some())
            .map(|e| e.after)
            .take(1),
    );
    depths.sort_unstable();
    depths.dedup();
    let mut calls: Vec<Call> = calls
        .into_iter()
        .map(|(shape, depth)| (shape, depth, None))
        .collect();
    for depth in depths.into_iter().filter(|&d| d >= 1 && d < layers) {
        let head = graph
            .exits
            .iter()
            .find(|e| e.after == depth)
            .and_then(|e| e.logits);
        for shape in [
            vec![(1, 8)],
            vec![(16, 0)],
            vec![(64, 0)],
            vec![(1, 32); 4.min(max_batch.max(1))],
            vec![(1, 96); 8.min(max_batch.max(1))],
        ] {
            if shape.iter().all(|&(n, c)| n + c < max_ctx) {
                calls.push((shape.clone(), depth, None));
                if head.is_some() {
                    calls.push((shape, depth, head));
                }
            }
        }
    }
    // A looped model: calls of one iteration whose rows sit at 1 ..= loops different
    // iterations, as looped depth-wise batching runs them (prompt and decode rows mixed).
    let ends = crate::iteration_ends(graph);
    let width = ends[0];
    let mut looped_calls: Vec<(Vec<(usize, usize)>, usize)> = Vec::new();
    if ends.len() > 1 {
        for shape in [
            vec![(1, 8)],
            vec![(1, 32); 2],
            vec![(1, 32); 4.min(max_batch.max(1))],
            vec![(1, 96); 8.min(max_batch.max(1))],
            [vec![(16, 0)], vec![(1, 48); 3]].concat(),
        ] {
            if shape.iter().all(|&(n, c)| n + c < max_ctx) {
                for groups in 1..=ends.len().min(shape.len()) {
                    looped_calls.push((shape.clone(), groups));
                }
            }
        }
    }
    let total = calls.len() + looped_calls.len();
    let mut samples = Vec::with_capacity(total);
    for (i, (shape, depth, head)) in calls.iter().enumerate() {
        let times = time_call(program, shape, reps, |segs| {
            if *depth == layers {
                program.forward_ragged(segs)?;
                return Ok(());
            }
            let stream = graph
                .stream(*depth)
                .with_context(|| format!("the graph has no stream after {depth} layers"))?;
            let mut want = vec![Want {
                node: stream,
                at: Positions::All,
            }];
            want.extend(head.map(|node| Want {
                node,
                at: Positions::Last,
            }));
            let out = program.run(
                segs,
                &Run {
                    from: 0,
                    task: Task::Outputs(want),
                    commit: true,
                },
            )?;
            if head.is_some() {
                // The exit rule's view: each sequence's probabilities on the host.
                for seq in &out {
                    let logits = seq[1].to_dtype(candle_core::DType::F32)?.flatten_all()?;
                    let p = exitgraph_compiler::exits::rule::softmax(&logits.to_vec1()?);
                    std::hint::black_box(p);
                }
            }
            Ok(())
        })?;
        let share = *depth as f64 / layers as f64;
        samples.push(Sample::measured(shape, &times, share, head.is_some(), 0));
        progress(i + 1, total);
    }
    let hidden = graph.info.hidden;
    for (k, (shape, groups)) in looped_calls.iter().enumerate() {
        // Row `i` runs iteration `i mod groups`, entering later iterations with a state.
        let from: Vec<usize> = (0..shape.len()).map(|i| (i % groups) * width).collect();
        let dtype = program.dtype();
        let times = time_call(program, shape, reps, |segs| {
            for (seg, &f) in segs.iter_mut().zip(&from) {
                if f > 0 {
                    seg.state = Some(candle_core::Tensor::zeros(
                        (seg.ids.len(), hidden),
                        dtype,
                        program.device(),
                    )?);
                }
            }
            program.run_blocks(segs, &from, width, false)?;
            Ok(())
        })?;
        let share = width as f64 / layers as f64;
        samples.push(Sample::measured(shape, &times, share, false, *groups));
        progress(calls.len() + k + 1, total);
    }
    CostModel::fit(samples)
}

/// Times `call` on fresh caches filled to each segment's context (`shape`: new tokens,
/// cached tokens per segment), `reps` times; the median and range.
fn time_call(
    program: &Program,
    shape: &[(usize, usize)],
    reps: usize,
    mut call: impl FnMut(&mut [Segment]) -> anyhow::Result<()>,
) -> anyhow::Result<crate::metrics::Spread> {
    let vocab = program.graph().info.vocab as u32;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        // Fill each cache to its context, then time the step.
        let mut caches: Vec<_> = shape.iter().map(|_| program.new_cache()).collect();
        let mut fill: Vec<Vec<u32>> = shape
            .iter()
            .map(|&(_, c)| (0..c as u32).map(|k| (k * 7 + 3) % vocab).collect())
            .collect();
        {
            let mut segs: Vec<Segment> = fill
                .iter_mut()
                .zip(caches.iter_mut())
                .filter(|(ids, _)| !ids.is_empty())
                .map(|(ids, cache)| Segment::new(ids, cache))
                .collect();
            program.forward_ragged(&mut segs)?;
        }
        let new: Vec<Vec<u32>> = shape
            .iter()
            .map(|&(n, _)| (0..n as u32).map(|k| (k * 13 + 5) % vocab).collect())
            .collect();
        let mut segs: Vec<Segment> = new
            .iter()
            .zip(caches.iter_mut())
            .map(|(ids, cache)| Segment::new(ids, cache))
            .collect();
        let start = Instant::now();
        call(&mut segs)?;
        // A GPU queues work: the call's time ends when its work has run.
        program.device().synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(crate::metrics::Spread::of(&times))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_roofline_model_charges_weights_read_flops_and_cache_reads_by_hand() {
        use exitgraph_compiler::synth::{write_random_llama, LlamaSpec};
        use exitgraph_ir::op::LowRank;
        let dir = tempfile::tempdir().unwrap();
        // Hidden 32, 3 layers, 4 heads of 8, 2 key-value heads, intermediate 64, vocabulary
        // 97, no biases.
        write_random_llama(dir.path(), &LlamaSpec::tiny(), 0).unwrap();
        let mut graph = exitgraph_ir::import::import(dir.path()).unwrap().graph;
        // A rank-2 adapter on one projection of layer 1 (q: 32 → 32).
        let q = graph
            .graph
            .node_indices()
            .find(|&i| {
                graph.graph[i].layer == Some(1)
                    && matches!(graph.graph[i].op, exitgraph_ir::op::Op::Attention(_))
            })
            .unwrap();
        let w = graph.graph[q].op.linears()[0].weight.clone();
        graph.graph[q].op.linears_mut()[0].adapter = Some(LowRank {
            a: w.clone(),
            b: w,
            rank: 2,
            scale: 1.0,
        });
        let machine = Roofline {
            bandwidth: 1000.0,
            peak: 100.0,
            weight_bytes: 2.0,
            kv_bytes: 4.0,
        };
        let m = CostModel::roofline(&graph, machine).unwrap();
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-9 * b.max(1.0), "{a} vs {b}");
        // A layer: q 1024 + k 512 + v 512 + o 1024 + gate, up, down 2048 each = 9216
        // weights; 3 layers and the adapter's 2 × (32 + 32) = 27776, at 2 bytes per 1000 B/s.
        close(m.per_layers, 27776.0 * 2.0 / 1000.0);
        // Per token 2 FLOPs per weight (the adapter's too) and 5 per element of each of a
        // layer's two norms, at 100 FLOP/s.
        close(
            m.coefficients[1],
            (2.0 * 27776.0 + 3.0 * 2.0 * 5.0 * 32.0) / 100.0,
        );
        // Per (query, cached key) pair and layer: q·k and the weighted sum of v, 2 × 2 × 32
        // FLOPs, and one key and one value of 2 heads × 8 at 4 bytes.
        close(
            m.coefficients[2],
            3.0 * 128.0 / 100.0 + 3.0 * 128.0 / 1000.0,
        );
        // The LM head (32 × 97 = 3104 weights): read once per call, its FLOPs per sequence.
        close(m.coefficients[0], 3104.0 * 2.0 / 1000.0);
        close(m.coefficients[3], 2.0 * 3104.0 / 100.0);
        // Each group of rows reads its adapters; filling reads k and v of each layer.
        close(m.per_group, 128.0 * 2.0 / 1000.0);
        close(m.kv_fill_per_layers.unwrap(), 3.0 * 1024.0 * 2.0 / 1000.0);
        assert_eq!(m.per_sequence_layers, 0.0);
        // A decode step of 4 sequences at contexts 10: weights once, tokens and pairs each.
        close(
            m.predict(4, 40, 4),
            6.208 + 4.0 * 565.12 + 40.0 * 4.224 + 4.0 * 62.08 + 55.552,
        );
        // A fill of half the layers: no head read, half the k and v weights.
        close(m.predict_fill(2.0, 0.5, 0.1), 2.0 * 565.12 + 0.5 * 6.144);
        // The model writes and reads back as RON, the machine with it.
        let file = dir.path().join("cost.ron");
        m.write(&file).unwrap();
        assert_eq!(CostModel::read(&file).unwrap(), m);
        let zero = Roofline {
            bandwidth: 0.0,
            ..machine
        };
        let e = CostModel::roofline(&graph, zero).unwrap_err().to_string();
        assert!(e.contains("positive bandwidth"), "{e}");
    }

    #[test]
    fn partial_depth_scales_only_the_layer_terms() {
        let mut m = CostModel {
            version: 1,
            coefficients: [2e-3, 1e-4, 3e-7, 5e-5],
            per_layers: 0.0,
            per_sequence_layers: 0.0,
            per_group: 0.0,
            per_layers_rows: 0.0,
            per_head_call: 0.0,
            kv_fill_per_layers: None,
            roofline: None,
            samples: Vec::new(),
        };
        // One decode token at context 10 running half the layers: tokens 0.5, attention
        // 11 * 0.5 = 5.5; the intercept and the sequence's term in full:
        // 2e-3 + 0.5 * 1e-4 + 5.5 * 3e-7 + 5e-5 = 2.10165e-3.
        assert!((m.predict_layers(0.5, 5.5, 0.5, 1, 0.5) - 2.101_65e-3).abs() < 1e-12);
        // The whole step scaled by half would have been 1.0508e-3.
        assert!((m.predict(1, 11, 1) - 2.1533e-3).abs() < 1e-12);
        // With per-layer fixed work of 1.2e-3 and per-sequence layer work of 4e-4, half
        // the layers pay 0.6e-3 + 0.2e-3 of them.
        m.per_layers = 1.2e-3;
        m.per_sequence_layers = 4e-4;
        assert!((m.predict_layers(0.5, 5.5, 0.5, 1, 0.5) - 2.901_65e-3).abs() < 1e-12);
        assert!((m.predict(1, 11, 1) - 3.7533e-3).abs() < 1e-12);
    }

    /// Calls at each layer share, token count and sequence count (at most one sequence per
    /// token), partial ones with and without the exit head there, timed by `seconds`.
    fn partial_samples(
        shares: &[f64],
        tokens: &[usize],
        seqs: &[usize],
        seconds: impl Fn(&Sample) -> f64,
    ) -> Vec<Sample> {
        let mut samples = Vec::new();
        for &share in shares {
            for &tokens in tokens {
                for &seqs in seqs {
                    let seqs = seqs.min(tokens);
                    for exit_head in [false, true] {
                        let mut s = Sample {
                            tokens,
                            attention: tokens * tokens * 3 + seqs * tokens * 11 + 5,
                            sequences: seqs,
                            seconds: 0.0,
                            spread: 0.0,
                            layers_share: share,
                            exit_head: exit_head && share < 1.0,
                            groups: 0,
                        };
                        s.seconds = seconds(&s);
                        samples.push(s);
                    }
                }
            }
        }
        samples
    }

    #[test]
    fn fit_recovers_the_per_layer_term_from_partial_calls() {
        let (c, per_layers, per_seq) = ([2e-3, 1e-4, 3e-7, 5e-5], 1.5e-3, 2e-4);
        let samples = partial_samples(&[1.0, 0.5, 1.0 / 6.0], &[1, 4, 16, 64], &[1, 2, 8], |s| {
            c[0] + s.layers_share * (c[1] * s.tokens as f64 + c[2] * s.attention as f64)
                + c[3] * sample_heads(s) as f64
                + per_layers * s.layers_share
                + per_seq * s.layers_share * s.sequences as f64
        });
        let m = CostModel::fit(samples).unwrap();
        assert_eq!(m.version, 2);
        let fitted = m
            .coefficients
            .iter()
            .chain([&m.per_layers, &m.per_sequence_layers]);
        for (a, b) in fitted.zip(c.iter().chain([&per_layers, &per_seq])) {
            assert!((a - b).abs() < 1e-9 + 1e-6 * b.abs(), "{a} vs {b}");
        }
        for s in &m.samples {
            assert!((m.predict_sample(s) / s.seconds - 1.0).abs() < 1e-9);
        }
    }

    /// Samples made with a multi-row term and a head-call term are fitted exactly, every
    /// coefficient recovered, and a call's shape is charged by hand: two or more rows pay
    /// the multi-row work scaled by the layers' share, a call with any head pays one head
    /// read.
    #[test]
    fn fit_recovers_the_row_and_head_call_terms() {
        let (c, per_layers, per_seq) = ([2e-3, 1e-4, 3e-7, 5e-5], 1.5e-3, 2e-4);
        let (rows_term, head_call) = (4e-3, 6e-3);
        let samples = partial_samples(&[1.0, 0.5, 0.25], &[1, 2, 5, 16], &[1, 2, 4], |s| {
            let heads = sample_heads(s);
            c[0] + s.layers_share * (c[1] * s.tokens as f64 + c[2] * s.attention as f64)
                + c[3] * heads as f64
                + per_layers * s.layers_share
                + per_seq * s.layers_share * s.sequences as f64
                + if s.tokens >= 2 {
                    rows_term * s.layers_share
                } else {
                    0.0
                }
                + if heads >= 1 { head_call } else { 0.0 }
        });
        let m = CostModel::fit(samples).unwrap();
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-9 + 1e-6 * b, "{a} vs {b}");
        close(m.per_layers_rows, rows_term);
        close(m.per_head_call, head_call);
        close(m.per_layers, per_layers);
        close(m.coefficients[3], c[3]);
        for s in &m.samples {
            assert!((m.predict_sample(s) / s.seconds - 1.0).abs() < 1e-9);
        }
        // Samples whose calls all have several rows cannot tell the multi-row work from the
        // per-layer work: the term stays out of the fit (0), and the fit is still exact.
        let several: Vec<Sample> = m
            .samples
            .iter()
            .filter(|s| s.tokens >= 2)
            .copied()
            .collect();
        let without = CostModel::fit(several).unwrap();
        assert_eq!(without.per_layers_rows, 0.0);
        close(without.per_layers, per_layers + rows_term);
        for s in &without.samples {
            assert!((without.predict_sample(s) / s.seconds - 1.0).abs() < 1e-9);
        }
        // By hand: one row, no head: neither term; 3 rows at half depth with a head: half
        // the multi-row work and one head read; a full decode step of 4 sequences: both.
        assert_eq!(m.call_work(1, 0, 0.5), 0.0);
        close(m.call_work(3, 1, 0.5), 0.5 * 4e-3 + 6e-3);
        close(
            m.predict(4, 40, 4),
            2e-3 + 4.0 * 1e-4 + 40.0 * 3e-7 + 4.0 * 5e-5 + 1.5e-3 + 4.0 * 2e-4 + 4e-3 + 6e-3,
        );
    }

    #[test]
    fn fit_recovers_the_per_group_term_of_looped_calls() {
        let (c, per_layers, per_seq, per_group) = ([2e-3, 1e-4, 3e-7, 5e-5], 1.5e-3, 2e-4, 7e-4);
        let mut samples = Vec::new();
        // Full and partial calls, and looped calls of one iteration (a third of the layers)
        // with rows at 1, 2 or 3 iterations.
        for (share, groups) in [
            (1.0, 0),
            (0.5, 0),
            (1.0 / 3.0, 1),
            (1.0 / 3.0, 2),
            (1.0 / 3.0, 3),
        ] {
            for tokens in [1, 4, 16] {
                for seqs in [1usize, 3, 8] {
                    let attention = tokens * tokens * 3 + seqs * tokens * 11 + 5;
                    let heads = if share >= 1.0 { seqs } else { 0 } as f64;
                    let seconds = c[0]
                        + share * (c[1] * tokens as f64 + c[2] * attention as f64)
                        + c[3] * heads
                        + per_layers * share
                        + per_seq * share * seqs as f64
                        + per_group * share * groups as f64;
                    samples.push(Sample {
                        tokens,
                        attention,
                        sequences: seqs,
                        seconds,
                        spread: 0.0,
                        layers_share: share,
                        exit_head: false,
                        groups,
                    });
                }
            }
        }
        let m = CostModel::fit(samples).unwrap();
        assert!((m.per_group - per_group).abs() < 1e-9, "{}", m.per_group);
        assert!((m.per_layers - per_layers).abs() < 1e-9, "{}", m.per_layers);
        // By hand: one iteration of three (share 1/3) for 4 decode rows at context 10 in 2
        // groups: tokens 4/3, attention 44/3, sequences 4/3, no head, the per-layer work a
        // third, two groups' work a third each:
        let want = 2e-3
            + 1e-4 * 4.0 / 3.0
            + 3e-7 * 44.0 / 3.0
            + 1.5e-3 / 3.0
            + 2e-4 * 4.0 / 3.0
            + 7e-4 * 2.0 / 3.0;
        let s = Sample {
            tokens: 4,
            attention: 44,
            sequences: 4,
            seconds: 0.0,
            spread: 0.0,
            layers_share: 1.0 / 3.0,
            exit_head: false,
            groups: 2,
        };
        assert!(
            (m.predict_sample(&s) - want).abs() < 1e-9,
            "{} vs {want}",
            m.predict_sample(&s)
        );
        // Without looped calls the term is not fitted.
        let flat: Vec<Sample> = m
            .samples
            .iter()
            .filter(|s| s.groups == 0)
            .copied()
            .collect();
        assert_eq!(CostModel::fit(flat).unwrap().per_group, 0.0);
    }

    /// min ‖Ax − y‖² with A = [[1, 0], [0, 1], [1, 1]], y = [1, −1, 0]: unconstrained
    /// x = (1, −1); with x ≥ 0, x2 = 0 and x1 minimises (x1 − 1)² + 1 + x1², so x1 = 0.5.
    #[test]
    fn nnls_by_hand() {
        let ata = vec![vec![2.0, 1.0], vec![1.0, 2.0]];
        let x = nnls(&ata, &[1.0, -1.0], 2.0);
        assert!((x[0] - 0.5).abs() < 1e-12 && x[1] == 0.0, "{x:?}");
        // A feasible unconstrained optimum is kept.
        let x = nnls(&ata, &[3.0, 3.0], 10.0);
        assert!(
            (x[0] - 1.0).abs() < 1e-12 && (x[1] - 1.0).abs() < 1e-12,
            "{x:?}"
        );
    }

    /// Times from a cost with a negative intercept: the fit keeps every coefficient at or
    /// above 0 and fits no worse than the unconstrained one clipped at 0.
    #[test]
    fn fit_never_gives_a_negative_coefficient() {
        let truth = [-4e-4, 1e-4, 3e-7, 5e-5];
        let mut samples = Vec::new();
        for tokens in [8, 16, 64] {
            for seqs in [1, 2, 8] {
                let attention = tokens * tokens * 3 + seqs * tokens * 11 + 5;
                let f = [1.0, tokens as f64, attention as f64, seqs as f64];
                let seconds = f.iter().zip(&truth).map(|(a, b)| a * b).sum();
                samples.push(Sample {
                    tokens,
                    attention,
                    sequences: seqs,
                    seconds,
                    spread: 0.0,
                    layers_share: 1.0,
                    exit_head: false,
                    groups: 0,
                });
            }
        }
        let m = CostModel::fit(samples.clone()).unwrap();
        assert!(
            m.coefficients.iter().all(|&c| c >= 0.0),
            "{:?}",
            m.coefficients
        );
        assert_eq!(m.coefficients[0], 0.0);
        let error = |c: [f64; 4]| -> f64 {
            samples
                .iter()
                .map(|s| {
                    let f = [1.0, s.tokens as f64, s.attention as f64, s.sequences as f64];
                    let p: f64 = f.iter().zip(&c).map(|(a, b)| a * b).sum();
                    ((p - s.seconds) / s.seconds).powi(2)
                })
                .sum()
        };
        let clipped = truth.map(|c: f64| c.max(0.0));
        assert!(error(m.coefficients) <= error(clipped) + 1e-15);
    }

    #[test]
    fn fit_recovers_a_linear_cost() {
        let truth = [2e-3, 1e-4, 3e-7, 5e-5];
        let mut samples = Vec::new();
        for tokens in [1, 4, 16, 64] {
            for seqs in [1, 2, 8] {
                let attention = tokens * tokens * 3 + seqs * tokens * 11 + 5;
                let f = [1.0, tokens as f64, attention as f64, seqs as f64];
                let seconds = f.iter().zip(&truth).map(|(a, b)| a * b).sum();
                samples.push(Sample {
                    tokens,
                    attention,
                    sequences: seqs,
                    seconds,
                    spread: 0.0,
                    layers_share: 1.0,
                    exit_head: false,
                    groups: 0,
                });
            }
        }
        let m = CostModel::fit(samples).unwrap();
        for (a, b) in m.coefficients.iter().zip(&truth) {
            assert!((a - b).abs() < 1e-9 + 1e-6 * b.abs(), "{a} vs {b}");
        }
    }
}
