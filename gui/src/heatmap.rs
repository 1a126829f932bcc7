//! The token × layer heatmap of a run: for each generated token, which layers ran, the exit
//! signal at each exit point (when the program has exit heads) and where the token exited.
//! Over a tied model the columns read as (loop iteration, layer of the shared block).

use crate::looping::Looping;
use exitgraph::runtime::metrics::Speculated;
use exitgraph::runtime::trace::TraceRecord;

/// One cell: a token at one layer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cell {
    /// The layer ran for this token.
    pub ran: bool,
    /// The exit rule's signal at the exit point after this layer, if one was evaluated.
    pub signal: Option<f64>,
    /// The token's output came from the exit point after this layer.
    pub exit: bool,
}

/// One generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRow {
    pub seq: usize,
    pub pos: usize,
    pub token: Option<u32>,
    /// The token decoded to text (its id when there is no tokenizer).
    pub text: String,
    /// Layers run before the token was produced.
    pub exit_layer: usize,
    /// The 0-based layers run.
    pub layers: Vec<usize>,
    /// One per layer, `depth` long.
    pub cells: Vec<Cell>,
    /// Under self-speculative decoding: a kept draft or the full model's token.
    pub speculated: Option<Speculated>,
}

/// The heatmap, built once per run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Heatmap {
    /// Layers of the model (columns).
    pub depth: usize,
    pub rows: Vec<TokenRow>,
    /// Smallest and largest signal, when any token has signals.
    pub signal_range: Option<(f64, f64)>,
    /// The model's loop, when its layers are tied.
    pub looping: Option<Looping>,
}

/// The header of one heatmap column (one depth).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnHeader {
    /// `L3`, or `i1·L0` (iteration 1, layer 0 of the shared block) over a tied model.
    pub text: String,
    /// What the column is, in words.
    pub hover: String,
    /// The column starts a loop iteration after the first (a separator goes before it).
    pub loop_start: bool,
}

impl Heatmap {
    pub fn has_signals(&self) -> bool {
        self.signal_range.is_some()
    }

    /// Whether any token was decoded self-speculatively.
    pub fn has_speculation(&self) -> bool {
        self.rows.iter().any(|r| r.speculated.is_some())
    }

    /// The heatmap of a model whose layers loop as `looping` says.
    pub fn with_looping(mut self, looping: Option<Looping>) -> Self {
        self.looping = looping;
        self
    }

    /// One header per column (depth).
    pub fn headers(&self) -> Vec<ColumnHeader> {
        (0..self.depth)
            .map(|d| match &self.looping {
                Some(l) if l.depths().contains(&d) => {
                    let (i, j) = (l.iteration(d), l.position(d));
                    ColumnHeader {
                        text: format!("i{i}·L{j}"),
                        hover: format!(
                            "depth {d}: loop iteration {i} of {}, layer {j} of the shared block",
                            l.loops
                        ),
                        loop_start: d > 0 && j == 0,
                    }
                }
                _ => ColumnHeader {
                    text: format!("L{d}"),
                    hover: format!("layer {d}"),
                    loop_start: false,
                },
            })
            .collect()
    }

    /// Tokens whose output came from each depth: index `k` counts exits after `k` layers.
    pub fn exit_histogram(&self) -> Vec<u64> {
        exit_histogram(self.rows.iter().map(|r| r.exit_layer), self.depth)
    }
}

/// Counts exit layers into `depth + 1` bins (larger values go in the last).
pub fn exit_histogram(exits: impl Iterator<Item = usize>, depth: usize) -> Vec<u64> {
    let mut h = vec![0u64; depth + 1];
    for e in exits {
        let i = e.min(depth);
        h[i] += 1;
    }
    h
}

/// Builds the heatmap of `records` for a model of `depth` layers; `decode` turns a token id
/// into text.
pub fn build(records: &[TraceRecord], depth: usize, decode: impl Fn(u32) -> String) -> Heatmap {
    let mut rows: Vec<TokenRow> = records
        .iter()
        .map(|r| {
            let mut cells = vec![Cell::default(); depth];
            for &l in &r.layers {
                if let Some(c) = cells.get_mut(l) {
                    c.ran = true;
                }
            }
            for s in &r.signals {
                if let Some(c) = s.layer.checked_sub(1).and_then(|i| cells.get_mut(i)) {
                    c.signal = Some(s.value);
                }
            }
            if let Some(c) = r.exit_layer.checked_sub(1).and_then(|i| cells.get_mut(i)) {
                c.exit = true;
            }
            TokenRow {
                seq: r.seq,
                pos: r.pos,
                token: r.token,
                text: r.token.map(&decode).unwrap_or_else(|| "·".to_string()),
                exit_layer: r.exit_layer,
                layers: r.layers.clone(),
                cells,
                speculated: r.speculated,
            }
        })
        .collect();
    rows.sort_by_key(|r| (r.seq, r.pos));
    let signal_range = records
        .iter()
        .flat_map(|r| r.signals.iter().map(|s| s.value))
        .filter(|v| v.is_finite())
        .fold(None, |acc: Option<(f64, f64)>, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        });
    Heatmap {
        depth,
        rows,
        signal_range,
        looping: None,
    }
}

/// Where `value` sits in `range`, 0 to 1 (0.5 when the range is a point).
pub fn normalize(value: f64, (lo, hi): (f64, f64)) -> f32 {
    if hi > lo {
        ((value - lo) / (hi - lo)).clamp(0.0, 1.0) as f32
    } else {
        0.5
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use exitgraph::runtime::trace::LayerSignal;

    fn record(seq: usize, pos: usize, layers: usize, signals: Vec<(usize, f64)>) -> TraceRecord {
        TraceRecord {
            speculated: None,
            seq,
            pos,
            token: Some(pos as u32),
            step: pos as u64,
            t_s: pos as f64 * 0.01,
            batch: 1,
            stages: vec!["all".into()],
            layers: (0..layers).collect(),
            exit_layer: layers,
            signals: signals
                .into_iter()
                .map(|(layer, value)| LayerSignal {
                    layer,
                    value,
                    token: None,
                })
                .collect(),
        }
    }

    #[test]
    fn without_signals_the_heatmap_shows_layers_run() {
        let recs = vec![record(0, 5, 6, vec![]), record(0, 4, 6, vec![])];
        let h = build(&recs, 6, |t| format!("<{t}>"));
        assert!(!h.has_signals());
        assert_eq!(h.rows.len(), 2);
        // Sorted by position.
        assert_eq!(h.rows[0].pos, 4);
        assert_eq!(h.rows[0].text, "<4>");
        assert!(h.rows[0].cells.iter().all(|c| c.ran && c.signal.is_none()));
        // The full model's output: the exit cell is the last layer.
        assert!(h.rows[0].cells[5].exit);
        assert_eq!(h.exit_histogram(), vec![0, 0, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn signals_fill_their_exit_points_and_mark_the_exit() {
        let recs = vec![
            record(0, 3, 2, vec![(2, 0.9)]),
            record(1, 3, 6, vec![(2, 0.1), (4, 0.3)]),
        ];
        let h = build(&recs, 6, |t| t.to_string());
        assert_eq!(h.signal_range, Some((0.1, 0.9)));
        let early = &h.rows[0];
        assert_eq!(early.cells[1].signal, Some(0.9));
        assert!(early.cells[1].exit);
        assert!(!early.cells[2].ran);
        let late = &h.rows[1];
        assert_eq!(late.cells[3].signal, Some(0.3));
        assert!(late.cells[5].exit && !late.cells[1].exit);
        assert_eq!(h.exit_histogram(), vec![0, 0, 1, 0, 0, 0, 1]);
    }

    #[test]
    fn bad_layer_numbers_are_ignored() {
        let mut r = record(0, 0, 3, vec![(0, 1.0), (99, 2.0)]);
        r.layers.push(50);
        r.exit_layer = 0;
        let h = build(&[r], 3, |t| t.to_string());
        assert_eq!(h.rows[0].cells.len(), 3);
        assert!(h.rows[0]
            .cells
            .iter()
            .all(|c| !c.exit && c.signal.is_none()));
        assert_eq!(h.exit_histogram()[0], 1);
    }

    #[test]
    fn an_untied_model_has_a_header_per_layer() {
        let h = build(&[record(0, 0, 6, vec![])], 6, |t| t.to_string());
        let headers = h.headers();
        let texts: Vec<&str> = headers.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["L0", "L1", "L2", "L3", "L4", "L5"]);
        assert!(headers.iter().all(|c| !c.loop_start));
    }

    #[test]
    fn a_looped_model_labels_columns_by_loop_and_layer() {
        let looping = Looping {
            block_len: 3,
            loops: 2,
            ..Default::default()
        };
        let h = build(&[record(0, 0, 6, vec![])], 6, |t| t.to_string()).with_looping(Some(looping));
        let headers = h.headers();
        let texts: Vec<&str> = headers.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            ["i0·L0", "i0·L1", "i0·L2", "i1·L0", "i1·L1", "i1·L2"]
        );
        // One separator, before the second iteration.
        let starts: Vec<usize> = (0..6).filter(|&d| headers[d].loop_start).collect();
        assert_eq!(starts, [3]);
        assert_eq!(
            headers[4].hover,
            "depth 4: loop iteration 1 of 2, layer 1 of the shared block"
        );
        // The cells stay per depth.
        assert_eq!(h.rows[0].cells.len(), 6);
        assert!(h.rows[0].cells[5].exit);
    }

    #[test]
    fn normalize_clamps() {
        assert_eq!(normalize(5.0, (0.0, 10.0)), 0.5);
        assert_eq!(normalize(-1.0, (0.0, 10.0)), 0.0);
        assert_eq!(normalize(3.0, (3.0, 3.0)), 0.5);
    }
}
