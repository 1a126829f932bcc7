//! `exitgraph eval needle PIPELINE.ron`: needle-in-a-haystack retrieval by generation, for a
//! pipeline (typically with GemFilter) beside a comparison pipeline (by default the same one
//! without its GemFilter pass), at several context lengths and depths of the fact.
//!
//! A case is [`super::needle::case`]'s haystack filling the length, cut before its answer:
//! the prompt ends with the query key, and the pipeline decodes greedily as many tokens as
//! the answer has (through the runtime, one request at a time, so GemFilter's select phase
//! runs as it does when serving). It is retrieved when those tokens are the answer's. Per
//! length it also reports the median time to first token (the runtime's measured clock:
//! GemFilter's select phase, the prefill and the first token), its select phase and the rest
//! (prefill), the tokens the model ran the prompt on, and the peak KV-cache bytes, computed
//! from the cache's shapes: `layers × (prompt + new) × per-token bytes` for the full model;
//! for GemFilter the larger of the select phase's (`filter_layer` layers × prompt) and the
//! second run's (`layers × (kept + new)`).

use super::needle::case;
use super::plot::{heatmap_png, HeatPanel};
use crate::bench_exits::median;
use crate::exits::Depth;
use crate::generate::GenerateOptions;
use crate::lower::Program;
use crate::passes::PassSpec;
use crate::pipeline::{compile, Pipeline};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;

/// What to evaluate.
#[derive(Clone, Debug, PartialEq)]
pub struct NeedleOptions {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub cases: usize,
    pub seed: u64,
}

/// Retrieval at one (length, depth).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub tokens: usize,
    pub depth: f64,
    pub cases: usize,
    pub retrieved: usize,
}

/// Per length: what the model ran on, how long the first token took, the cache's peak.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LengthRow {
    pub tokens: usize,
    /// Mean prompt tokens of the cases (the haystack filling `tokens`, cut before the answer).
    pub prompt: f64,
    /// Mean tokens the full model ran the prompt on (GemFilter's kept ones).
    pub ran_on: f64,
    /// Median time to first token, ms.
    pub ttft_ms: f64,
    /// Median select-phase time, ms, as the runtime measured it (GemFilter only; 0
    /// otherwise).
    pub select_ms: f64,
    /// Median time to first token less the select phase, ms: the (second) prefill and the
    /// first token.
    pub prefill_ms: f64,
    /// Peak KV-cache bytes of the longest case, computed from the cache's shapes.
    pub peak_kv_bytes: usize,
}

/// One pipeline's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MethodReport {
    /// "GemFilter(layer r, keep …)" or "full".
    pub name: String,
    pub pipeline: String,
    pub cells: Vec<Cell>,
    pub lengths: Vec<LengthRow>,
}

/// Both pipelines side by side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NeedleComparison {
    pub seed: u64,
    pub cases: usize,
    pub depths: Vec<f64>,
    pub lengths: Vec<usize>,
    pub methods: Vec<MethodReport>,
}

/// Parses `lo:hi:step` into the depths `lo, lo + step, …, hi` (each in 0..=1).
pub fn parse_depths(spec: &str) -> anyhow::Result<Vec<f64>> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [lo, hi, step] = parts.as_slice() else {
        bail!("--depths {spec}: expected lo:hi:step, e.g. 0:1:0.1");
    };
    let num = |s: &str| -> anyhow::Result<f64> {
        s.trim()
            .parse::<f64>()
            .with_context(|| format!("--depths {spec}: {s:?} is not a number"))
    };
    let (lo, hi, step) = (num(lo)?, num(hi)?, num(step)?);
    if !(0.0..=1.0).contains(&lo) || !(0.0..=1.0).contains(&hi) || lo > hi {
        bail!("--depths {spec}: depths are shares of the haystack, 0 <= lo <= hi <= 1");
    }
    if step.is_nan() || step <= 0.0 {
        bail!("--depths {spec}: the step must be positive");
    }
    let n = ((hi - lo) / step + 1e-9).floor() as usize;
    if n > 1000 {
        bail!("--depths {spec}: more than 1000 depths");
    }
    Ok((0..=n)
        .map(|i| ((lo + i as f64 * step) * 1e9).round() / 1e9)
        .collect())
}

/// A loaded pipeline: its name in the report, program and tokenizer.
struct Method {
    name: String,
    pipeline: String,
    program: Arc<Program>,
    tokenizer: tokenizers::Tokenizer,
}

fn load(pipeline: &Pipeline, path: &Path, name: Option<String>) -> anyhow::Result<Method> {
    let compiled = compile(pipeline, path)?;
    let tok_path = compiled.checkpoint.tokenizer.clone().with_context(|| {
        format!(
            "{}: the needle evaluation needs the model's tokenizer.json",
            path.display()
        )
    })?;
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let name = name.unwrap_or_else(|| match &compiled.graph.filter {
        Some(f) => {
            let keep = match f.keep {
                exitgraph_ir::Keep::Tokens(k) => format!("keep {k}"),
                exitgraph_ir::Keep::Fraction(x) => format!("keep {x}"),
            };
            let forced = match (f.keep_first, f.keep_last) {
                (0, 0) => String::new(),
                (a, b) => format!(", first {a}, last {b}"),
            };
            format!(
                "GemFilter(layer {}, {keep}, pool {}{forced})",
                f.layer, f.pool
            )
        }
        None => "full".to_string(),
    });
    let program = Arc::new(compiled.lower()?);
    Ok(Method {
        name,
        pipeline: path.display().to_string(),
        program,
        tokenizer,
    })
}

/// Evaluates `pipeline_path` and the comparison (`compare`, or the same pipeline without its
/// GemFilter pass).
pub fn eval_needle_pipelines(
    pipeline_path: &Path,
    compare: Option<&Path>,
    opts: &NeedleOptions,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<NeedleComparison> {
    if opts.lengths.is_empty() || opts.depths.is_empty() || opts.cases == 0 {
        bail!("--lengths, --depths and --cases must each give at least one");
    }
    let (pipeline, path) = Pipeline::open(pipeline_path)?;
    let first = load(&pipeline, &path, None)?;
    let second = match compare {
        Some(c) => {
            let (p, path) = Pipeline::open(c)?;
            load(&p, &path, None)?
        }
        None => {
            let mut p = pipeline.clone();
            let before = p.passes.len();
            p.passes
                .retain(|s| !matches!(s, PassSpec::GemFilter { .. }));
            if p.passes.len() == before {
                bail!(
                    "{}: the pipeline has no GemFilter pass; give --compare FULL.ron to compare \
                     it with another pipeline",
                    pipeline_path.display()
                );
            }
            load(&p, &path, Some("full".to_string()))?
        }
    };
    let mut methods = Vec::new();
    for m in [first, second] {
        for &n in &opts.lengths {
            let positions = m.program.graph().info.max_positions;
            if n > positions {
                bail!("--lengths {n}: {} has {positions} positions", m.pipeline);
            }
        }
        methods.push(eval_method(&m, opts, &mut progress)?);
    }
    Ok(NeedleComparison {
        seed: opts.seed,
        cases: opts.cases,
        depths: opts.depths.clone(),
        lengths: opts.lengths.clone(),
        methods,
    })
}

/// Bytes the KV cache holds per layer and token: keys and values of every KV head.
fn kv_bytes_per_layer_token(program: &Program) -> usize {
    let g = program.graph();
    let per = g
        .graph
        .node_weights()
        .find_map(|n| match &n.op {
            exitgraph_ir::Op::Attention(a) => Some(2 * a.kv_heads * a.head_dim),
            _ => None,
        })
        .unwrap_or(0);
    per * program.dtype().size_in_bytes()
}

fn eval_method(
    m: &Method,
    opts: &NeedleOptions,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<MethodReport> {
    let layers = m.program.graph().info.num_layers;
    let filter = m.program.graph().filter.clone();
    let per = kv_bytes_per_layer_token(&m.program);
    let mut cells = Vec::new();
    let mut lengths = Vec::new();
    for &tokens in &opts.lengths {
        let (mut ttft, mut select_ms, mut prefill_ms) = (Vec::new(), Vec::new(), Vec::new());
        let (mut prompt_sum, mut ran_sum, mut count, mut peak) = (0usize, 0usize, 0usize, 0usize);
        for (i, &depth) in opts.depths.iter().enumerate() {
            progress(&format!("{}: {tokens} tokens, depth {depth:.2}", m.name));
            let mut retrieved = 0;
            for c in 0..opts.cases {
                let seed = opts.seed ^ (((i * 100_003 + c) as u64) << 8);
                let e = case(&m.tokenizer, seed, depth, tokens)?;
                let Some(a) = e.answer.iter().position(|&x| x) else {
                    bail!("a needle case has no answer tokens");
                };
                let answer: Vec<u32> = e.ids[a..]
                    .iter()
                    .zip(&e.answer[a..])
                    .take_while(|(_, &x)| x)
                    .map(|(&t, _)| t)
                    .collect();
                let prompt = e.ids[..a].to_vec();
                let mut gen = GenerateOptions::greedy(answer.len());
                gen.stop_at_eos = false;
                let (rows, outcomes) = crate::runtime::generate_with_depth(
                    m.program.clone(),
                    std::slice::from_ref(&prompt),
                    &gen,
                    &Depth::Full,
                    None,
                )?;
                if rows[0][prompt.len()..] == answer[..] {
                    retrieved += 1;
                }
                let o = &outcomes[0];
                let first = 1e3 * (o.first_token_s.unwrap_or(0.0) - o.arrival_s);
                let select = 1e3 * o.selection_s.unwrap_or(0.0);
                ttft.push(first);
                prefill_ms.push(first - select);
                let ran = o.selected.as_ref().map_or(prompt.len(), Vec::len);
                prompt_sum += prompt.len();
                ran_sum += ran;
                count += 1;
                let bytes = match &filter {
                    Some(f) => {
                        select_ms.push(select);
                        (f.layer * prompt.len()).max(layers * (ran + answer.len())) * per
                    }
                    None => layers * (prompt.len() + answer.len()) * per,
                };
                peak = peak.max(bytes);
            }
            cells.push(Cell {
                tokens,
                depth,
                cases: opts.cases,
                retrieved,
            });
        }
        lengths.push(LengthRow {
            tokens,
            prompt: prompt_sum as f64 / count.max(1) as f64,
            ran_on: ran_sum as f64 / count.max(1) as f64,
            ttft_ms: median(ttft),
            select_ms: median(select_ms),
            prefill_ms: median(prefill_ms),
            peak_kv_bytes: peak,
        });
    }
    Ok(MethodReport {
        name: m.name.clone(),
        pipeline: m.pipeline.clone(),
        cells,
        lengths,
    })
}

impl MethodReport {
    fn share(&self, tokens: usize, depth: f64) -> Option<f64> {
        self.cells
            .iter()
            .find(|c| c.tokens == tokens && c.depth == depth)
            .map(|c| c.retrieved as f64 / c.cases.max(1) as f64)
    }

    fn overall(&self, tokens: usize) -> f64 {
        let (hit, all) = self
            .cells
            .iter()
            .filter(|c| c.tokens == tokens)
            .fold((0, 0), |(h, a), c| (h + c.retrieved, a + c.cases));
        hit as f64 / all.max(1) as f64
    }
}

impl NeedleComparison {
    /// The accuracy table (per length, one row per method) and the per-length costs.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "needle retrieval, % of {} cases per cell with every answer token generated\n\n| tokens | method |",
            self.cases
        );
        for d in &self.depths {
            let _ = write!(s, " {:.0}% |", 100.0 * d);
        }
        s.push_str(" all |\n|---:|---|");
        for _ in &self.depths {
            s.push_str("---:|");
        }
        s.push_str("---:|\n");
        for &n in &self.lengths {
            for m in &self.methods {
                let _ = write!(s, "| {n} | {} |", m.name);
                for &d in &self.depths {
                    match m.share(n, d) {
                        Some(v) => {
                            let _ = write!(s, " {:.0} |", 100.0 * v);
                        }
                        None => s.push_str(" |"),
                    }
                }
                let _ = writeln!(s, " {:.1} |", 100.0 * m.overall(n));
            }
        }
        s.push_str(
            "\n| tokens | method | prompt tokens | ran on | select ms | prefill ms | time to first token ms | peak KV |\n\
             |---:|---|---:|---:|---:|---:|---:|---:|\n",
        );
        for &n in &self.lengths {
            for m in &self.methods {
                if let Some(r) = m.lengths.iter().find(|r| r.tokens == n) {
                    let _ = writeln!(
                        s,
                        "| {n} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} MB |",
                        m.name,
                        r.prompt,
                        r.ran_on,
                        r.select_ms,
                        r.prefill_ms,
                        r.ttft_ms,
                        r.peak_kv_bytes as f64 / 1e6
                    );
                }
            }
        }
        s
    }

    /// One line per (method, length, depth).
    pub fn to_csv(&self) -> String {
        let mut s = String::from("method,tokens,depth,cases,retrieved,share\n");
        for m in &self.methods {
            for c in &m.cells {
                let _ = writeln!(
                    s,
                    "{},{},{},{},{},{:.4}",
                    m.name.replace(',', ";"),
                    c.tokens,
                    c.depth,
                    c.cases,
                    c.retrieved,
                    c.retrieved as f64 / c.cases.max(1) as f64
                );
            }
        }
        s
    }

    /// The heatmap: one panel per method, lengths down, depths across.
    pub fn write_plot(&self, path: &Path) -> anyhow::Result<()> {
        let panels: Vec<HeatPanel> = self
            .methods
            .iter()
            .map(|m| HeatPanel {
                name: m.name.clone(),
                rows: self.lengths.iter().map(|n| n.to_string()).collect(),
                cols: self
                    .depths
                    .iter()
                    .map(|d| format!("{:.0}", 100.0 * d))
                    .collect(),
                values: self
                    .lengths
                    .iter()
                    .map(|&n| self.depths.iter().map(|&d| m.share(n, d)).collect())
                    .collect(),
            })
            .collect();
        let width = (260 + 60 * self.depths.len() * panels.len()).clamp(640, 2400) as u32;
        let height = (200 + 60 * self.lengths.len()).clamp(300, 1200) as u32;
        heatmap_png(
            path,
            "Needle retrieval (% of cases)",
            "depth of the fact in the haystack (%)",
            "tokens",
            &panels,
            (width, height),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depths_parse_with_their_ends() {
        assert_eq!(
            parse_depths("0:1:0.1").unwrap(),
            vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
        );
        assert_eq!(parse_depths("0.5:0.5:0.1").unwrap(), vec![0.5]);
        assert_eq!(parse_depths("0:1:0.4").unwrap(), vec![0.0, 0.4, 0.8]);
        for bad in ["0:1", "0:2:0.1", "1:0:0.1", "0:1:0", "a:1:0.1"] {
            let e = parse_depths(bad).unwrap_err().to_string();
            assert!(e.contains("--depths"), "{bad}: {e}");
        }
    }

    #[test]
    fn tables_show_each_method_per_length() {
        let method = |name: &str, hits: [usize; 2]| MethodReport {
            name: name.into(),
            pipeline: "p.ron".into(),
            cells: vec![
                Cell {
                    tokens: 512,
                    depth: 0.0,
                    cases: 4,
                    retrieved: hits[0],
                },
                Cell {
                    tokens: 512,
                    depth: 1.0,
                    cases: 4,
                    retrieved: hits[1],
                },
            ],
            lengths: vec![LengthRow {
                tokens: 512,
                prompt: 508.0,
                ran_on: 64.0,
                ttft_ms: 12.5,
                select_ms: 3.5,
                prefill_ms: 9.0,
                peak_kv_bytes: 2_000_000,
            }],
        };
        let r = NeedleComparison {
            seed: 1,
            cases: 4,
            depths: vec![0.0, 1.0],
            lengths: vec![512],
            methods: vec![method("GemFilter", [1, 4]), method("full", [4, 4])],
        };
        let md = r.to_markdown();
        assert!(md.contains("| 512 | GemFilter | 25 | 100 | 62.5 |"), "{md}");
        assert!(md.contains("| 512 | full | 100 | 100 | 100.0 |"), "{md}");
        assert!(
            md.contains("| 512 | GemFilter | 508 | 64 | 3.5 | 9.0 | 12.5 | 2.00 MB |"),
            "{md}"
        );
        let csv = r.to_csv();
        assert!(csv.contains("GemFilter,512,0,4,1,0.2500"), "{csv}");
        assert!(csv.contains("full,512,1,4,4,1.0000"), "{csv}");
    }
}
