//! Exit decisions for the simulated executor. It runs no model, so it cannot evaluate an exit
//! rule; instead each token's exit depth comes from a recorded trace of a real run or is drawn
//! from a given distribution, and the clock is charged for the path that depth implies.
//!
//! ```ron
//! Replay(trace: "real.jsonl")                           // per (request, position): `exit_layer`
//! Distribution(exits: [(1, 0.5), (2, 0.3), (4, 0.2)], seed: 0)  // (depth, probability)
//! ```
//!
//! Depths count layers run (a token leaving after the first layer has depth 1; the full
//! model of `L` layers, `L`), as trace records' `exit_layer` does. The exit points a token
//! passes are the depths below `L` that can occur: the distribution's, or those in the
//! trace (its exit layers and the exit points its records evaluated). A token that leaves at
//! depth `d` ran layers `0..d`, evaluated an exit head at every exit point up to `d`, and
//! had the keys and values of layers `d..L` filled from its exit state (CALM's state copying,
//! as the real runtime does). A drawn depth depends only on the seed, the request id and the
//! token's position, never on batching.

use anyhow::{bail, Context};
use exitgraph_compiler::synth::SplitMix64;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Where simulated exit depths come from, as written in RON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SimulatedExits {
    /// Each token's `exit_layer` in a trace (JSON Lines, as `serve --trace` writes), keyed by
    /// request id and position; the path is relative to the RON file.
    Replay { trace: PathBuf },
    /// Depths drawn per token: (depth, probability) pairs, probabilities summing to 1.
    Distribution { exits: Vec<(usize, f64)>, seed: u64 },
}

pub use exitgraph_compiler::exits::SkippedKv;

/// Checked exit depths for a model of `layers` layers.
#[derive(Clone, Debug)]
pub struct ExitSource {
    layers: usize,
    kind: Kind,
    /// Exit points below the last layer, ascending.
    points: Vec<usize>,
    label: String,
}

#[derive(Clone, Debug)]
enum Kind {
    Replay(HashMap<(usize, usize), usize>),
    /// Depths with their cumulative probability, ascending by depth.
    Draw {
        cumulative: Vec<(usize, f64)>,
        seed: u64,
    },
}

impl ExitSource {
    /// Reads a [`SimulatedExits`] RON file; errors name the file (and line and column).
    pub fn read(path: &Path, layers: usize) -> anyhow::Result<Self> {
        let spec: SimulatedExits = exitgraph_compiler::ron_file::read(path)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::new(&spec, base, layers).with_context(|| path.display().to_string())
    }

    /// Checks `spec` against a model of `layers` layers (a replayed trace is read relative to
    /// `base`).
    pub fn new(spec: &SimulatedExits, base: &Path, layers: usize) -> anyhow::Result<Self> {
        let check_depth = |d: usize, what: &str| -> anyhow::Result<()> {
            if d == 0 || d > layers {
                bail!("{what}: depth {d} is outside 1..={layers} (the model has {layers} layers)");
            }
            Ok(())
        };
        match spec {
            SimulatedExits::Distribution { exits, seed } => {
                if exits.is_empty() {
                    bail!("Distribution: no exits given");
                }
                let mut sorted = exits.clone();
                sorted.sort_by_key(|e| e.0);
                let mut total = 0.0;
                let mut cumulative = Vec::with_capacity(sorted.len());
                for (i, &(d, p)) in sorted.iter().enumerate() {
                    check_depth(d, "Distribution")?;
                    if i > 0 && sorted[i - 1].0 == d {
                        bail!("Distribution: depth {d} is given twice");
                    }
                    if !p.is_finite() || p < 0.0 {
                        bail!("Distribution: depth {d} has probability {p}; probabilities are in [0, 1]");
                    }
                    total += p;
                    cumulative.push((d, total));
                }
                if (total - 1.0).abs() > 1e-6 {
                    bail!("Distribution: the probabilities sum to {total}, not 1");
                }
                let points = sorted
                    .iter()
                    .filter(|&&(d, p)| d < layers && p > 0.0)
                    .map(|e| e.0)
                    .collect();
                let shares: Vec<String> = sorted
                    .iter()
                    .map(|(d, p)| format!("{d}: {:.0}%", p * 100.0))
                    .collect();
                Ok(ExitSource {
                    layers,
                    kind: Kind::Draw {
                        cumulative,
                        seed: *seed,
                    },
                    points,
                    label: format!(
                        "exits drawn per token (depth: share {}; seed {seed})",
                        shares.join(", ")
                    ),
                })
            }
            SimulatedExits::Replay { trace } => {
                let path = base.join(trace);
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("Replay: {}: cannot read", path.display()))?;
                let mut table = HashMap::new();
                let mut points = BTreeSet::new();
                for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                    let line = line.with_context(|| format!("{}: cannot read", path.display()))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let r: crate::trace::TraceRecord = serde_json::from_str(&line)
                        .with_context(|| format!("{}: line {}", path.display(), i + 1))?;
                    let at = format!("{}: line {}: exit_layer", path.display(), i + 1);
                    check_depth(r.exit_layer, &at)?;
                    if table.insert((r.seq, r.pos), r.exit_layer).is_some() {
                        bail!(
                            "{}: line {}: a second record for request {} position {}",
                            path.display(),
                            i + 1,
                            r.seq,
                            r.pos
                        );
                    }
                    points.extend(
                        std::iter::once(r.exit_layer)
                            .chain(r.signals.iter().map(|s| s.layer))
                            .filter(|&d| d > 0 && d < layers),
                    );
                }
                if table.is_empty() {
                    bail!("Replay: {} has no records", path.display());
                }
                Ok(ExitSource {
                    layers,
                    label: format!(
                        "exits replayed from {} ({} tokens)",
                        path.display(),
                        table.len()
                    ),
                    kind: Kind::Replay(table),
                    points: points.into_iter().collect(),
                })
            }
        }
    }

    /// The depth at which request `seq`'s token at position `pos` leaves.
    pub fn depth(&self, seq: usize, pos: usize) -> Result<usize, String> {
        match &self.kind {
            Kind::Replay(table) => table.get(&(seq, pos)).copied().ok_or_else(|| {
                format!(
                    "the replayed trace has no token for request {seq} at position {pos} \
                     (replay a trace of the same workload)"
                )
            }),
            Kind::Draw { cumulative, seed } => {
                let mut rng = SplitMix64::new(
                    seed ^ (seq as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        ^ (pos as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
                );
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                Ok(cumulative
                    .iter()
                    .find(|&&(_, c)| u < c)
                    .or(cumulative.last())
                    .map_or(self.layers, |&(d, _)| d))
            }
        }
    }

    /// Exit points below the last layer, ascending: stage boundaries, and where heads run.
    pub fn points(&self) -> &[usize] {
        &self.points
    }

    /// For reports: where the depths come from.
    pub fn label(&self) -> &str {
        &self.label
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn draw(exits: Vec<(usize, f64)>) -> ExitSource {
        ExitSource::new(
            &SimulatedExits::Distribution { exits, seed: 7 },
            Path::new("."),
            4,
        )
        .unwrap()
    }

    #[test]
    fn drawn_depths_follow_the_distribution_and_the_seed() {
        let src = draw(vec![(4, 0.2), (1, 0.5), (2, 0.3)]);
        assert_eq!(src.points(), &[1, 2]);
        let n = 20_000;
        let mut counts = [0usize; 5];
        for i in 0..n {
            counts[src.depth(i % 100, i / 100).unwrap()] += 1;
        }
        // Binomial standard deviation at n = 20,000 is at most 0.0036: 5σ is 0.018.
        for (d, p) in [(1, 0.5), (2, 0.3), (4, 0.2)] {
            let share = counts[d] as f64 / n as f64;
            assert!((share - p).abs() < 0.018, "depth {d}: {share} vs {p}");
        }
        assert_eq!(counts[3], 0);
        // The same (seed, request, position) gives the same depth; other seeds differ.
        let again = draw(vec![(1, 0.5), (2, 0.3), (4, 0.2)]);
        assert!((0..50).all(|i| src.depth(i, 3) == again.depth(i, 3)));
        let other = ExitSource::new(
            &SimulatedExits::Distribution {
                exits: vec![(1, 0.5), (2, 0.3), (4, 0.2)],
                seed: 8,
            },
            Path::new("."),
            4,
        )
        .unwrap();
        assert!((0..50).any(|i| src.depth(i, 3) != other.depth(i, 3)));
    }

    #[test]
    fn a_certain_depth_is_always_drawn() {
        let src = draw(vec![(2, 1.0)]);
        assert!((0..100).all(|i| src.depth(i, i).unwrap() == 2));
    }

    #[test]
    fn bad_distributions_are_refused_with_the_reason() {
        let err = |exits: Vec<(usize, f64)>| {
            ExitSource::new(
                &SimulatedExits::Distribution { exits, seed: 0 },
                Path::new("."),
                4,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(err(vec![(1, 0.5), (2, 0.3)]).contains("sum to 0.8"));
        assert!(err(vec![(5, 1.0)]).contains("outside 1..=4"));
        assert!(err(vec![(0, 1.0)]).contains("outside 1..=4"));
        assert!(err(vec![(1, 0.5), (1, 0.5)]).contains("twice"));
        assert!(err(vec![(1, -0.5), (2, 1.5)]).contains("probability -0.5"));
        assert!(err(vec![]).contains("no exits"));
    }

    #[test]
    fn a_replayed_trace_gives_each_token_its_recorded_depth() {
        let dir = tempfile::tempdir().unwrap();
        let record = |seq: usize, pos: usize, exit: usize, signals: &[usize]| {
            serde_json::json!({
                "seq": seq, "pos": pos, "token": 5, "step": 0, "t_s": 0.0, "batch": 1,
                "stages": [], "layers": (0..exit).collect::<Vec<_>>(), "exit_layer": exit,
                "signals": signals.iter().map(|&l| serde_json::json!({"layer": l, "value": 0.5, "token": 5})).collect::<Vec<_>>(),
            })
            .to_string()
        };
        let lines = [
            record(0, 3, 1, &[1]),
            record(0, 4, 4, &[1, 2]),
            record(1, 2, 2, &[1, 2]),
        ];
        std::fs::write(dir.path().join("t.jsonl"), lines.join("\n")).unwrap();
        let spec = SimulatedExits::Replay {
            trace: "t.jsonl".into(),
        };
        let src = ExitSource::new(&spec, dir.path(), 4).unwrap();
        assert_eq!(src.depth(0, 3).unwrap(), 1);
        assert_eq!(src.depth(0, 4).unwrap(), 4);
        assert_eq!(src.depth(1, 2).unwrap(), 2);
        assert!(src
            .depth(1, 3)
            .unwrap_err()
            .contains("request 1 at position 3"));
        assert_eq!(src.points(), &[1, 2]);
        // A depth the model cannot have names the file and line.
        std::fs::write(dir.path().join("t.jsonl"), record(0, 3, 7, &[])).unwrap();
        let e = format!("{:#}", ExitSource::new(&spec, dir.path(), 4).unwrap_err());
        assert!(e.contains("t.jsonl: line 1: exit_layer"), "{e}");
    }
}
