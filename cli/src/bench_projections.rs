//! `exitgraph bench --projections`: the time of one projection `x Wᵀ` per shape and row
//! count in each form candle's CPU GEMM can run it, beside the form the lowering chooses
//! ([`crate::lower::Dense`]). Verification calls of self-speculation, batched decode steps
//! and the looped block's rows are projections of 2 to 16 rows, where the forms differ most.

use crate::lower::{Dense, DenseForm};
use candle_core::{DType, Device, Tensor};
use std::fmt::Write;
use std::time::Instant;

/// A projection's shape: input and output features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub inputs: usize,
    pub outputs: usize,
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (i, o) = s
            .split_once('x')
            .ok_or_else(|| format!("`{s}`: a shape is IN x OUT, e.g. 128x768"))?;
        let parse = |v: &str, what: &str| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("`{s}`: {what} features `{v}` is not a positive integer"))
        };
        Ok(Shape {
            inputs: parse(i, "input")?,
            outputs: parse(o, "output")?,
        })
    }
}

/// The demo model's projections (q/k/v and gate/up fused, as lowered) and the random
/// ~100M-parameter bench model's.
pub const DEFAULT_SHAPES: &str = "128x256,128x128,128x768,384x128,128x379,\
                                  768x2304,768x768,768x4096,2048x768,768x8192";

/// One shape and row count: median microseconds per form.
#[derive(Clone, Debug)]
pub struct ProjectionRow {
    pub shape: Shape,
    pub rows: usize,
    pub view_us: f64,
    pub stored_us: f64,
    pub weight_first_us: f64,
    /// The lowering's projection, in the form it chose.
    pub ours_us: f64,
    pub ours_form: DenseForm,
}

#[derive(Clone, Debug)]
pub struct ProjectionReport {
    pub rows: Vec<ProjectionRow>,
    pub reps: usize,
    pub calls: usize,
    pub threads: usize,
}

/// Median of `reps` timings of `calls` calls each, in microseconds per call.
fn time(
    reps: usize,
    calls: usize,
    mut f: impl FnMut() -> candle_core::Result<Tensor>,
) -> anyhow::Result<f64> {
    for _ in 0..calls.min(20) {
        f()?;
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        for _ in 0..calls {
            f()?;
        }
        t.push(start.elapsed().as_secs_f64() * 1e6 / calls as f64);
    }
    Ok(crate::runtime::metrics::Spread::of(&t).median)
}

/// Times every shape at every row count.
pub fn run(
    shapes: &[Shape],
    row_counts: &[usize],
    reps: usize,
    calls: usize,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<ProjectionReport> {
    let dev = Device::Cpu;
    let mut rows = Vec::new();
    for &shape in shapes {
        let w = Tensor::randn(0f32, 0.02, (shape.outputs, shape.inputs), &dev)?;
        let wt = w.t()?.contiguous()?;
        let ours = Dense::inference(w.clone(), None)?;
        for &n in row_counts {
            progress(&format!("{}x{}, {n} rows", shape.inputs, shape.outputs));
            let x = Tensor::randn(0f32, 1.0, (n, shape.inputs), &dev)?;
            let view_us = time(reps, calls, || x.matmul(&w.t()?))?;
            let stored_us = time(reps, calls, || x.matmul(&wt))?;
            let weight_first_us = time(reps, calls, || w.matmul(&x.t()?)?.t()?.contiguous())?;
            let ours_us = time(reps, calls, || ours.forward(&x))?;
            rows.push(ProjectionRow {
                shape,
                rows: n,
                view_us,
                stored_us,
                weight_first_us,
                ours_us,
                ours_form: ours.form(n),
            });
        }
    }
    // The lowered projection must compute x·Wᵀ at every shape and row count timed; a wrong
    // form would make fast rows meaningless.
    for &shape in shapes {
        let w = Tensor::randn(0f32, 0.02, (shape.outputs, shape.inputs), &dev)?;
        let ours = Dense::inference(w.clone(), None)?;
        for &n in row_counts {
            let x = Tensor::randn(0f32, 1.0, (n, shape.inputs), &dev)?;
            let want = x.matmul(&w.t()?)?;
            let got = ours.forward(&x)?;
            let diff = (want - got)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            anyhow::ensure!(
                diff < 1e-3,
                "{}x{}, {n} rows: the lowered projection differs from x·Wᵀ by {diff}",
                shape.inputs,
                shape.outputs
            );
        }
    }
    Ok(ProjectionReport {
        rows,
        reps,
        calls,
        threads: crate::cpu::matmul_threads(),
    })
}

impl ProjectionReport {
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "projection x·Wᵀ on the CPU ({} matmul threads; {}): µs per call, median of {} \
             repetitions of {} calls; `ours` is the lowering's projection in the form it chose \
             (weights of at most {} elements stored transposed, (W·xᵀ)ᵀ for {}..={} rows otherwise)\n",
            self.threads,
            crate::cpu::features().join(", "),
            self.reps,
            self.calls,
            crate::lower::COLUMNS_MAX,
            2,
            crate::lower::FEW_ROWS_MAX,
        );
        s.push_str("| in × out | rows | x·Wᵀ (view) | x·Wᵀ (stored) | (W·xᵀ)ᵀ | ours | our form | view / ours |\n");
        s.push_str("|---|---:|---:|---:|---:|---:|---|---:|\n");
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} × {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.2}x |",
                r.shape.inputs,
                r.shape.outputs,
                r.rows,
                r.view_us,
                r.stored_us,
                r.weight_first_us,
                r.ours_us,
                r.ours_form,
                r.view_us / r.ours_us,
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_bad_ones_say_why() {
        assert_eq!(
            "128x768".parse::<Shape>().unwrap(),
            Shape {
                inputs: 128,
                outputs: 768
            }
        );
        let e = "128".parse::<Shape>().unwrap_err();
        assert!(e.contains("IN x OUT"), "{e}");
        let e = "128x0".parse::<Shape>().unwrap_err();
        assert!(e.contains("output features `0`"), "{e}");
        assert!(DEFAULT_SHAPES
            .split(',')
            .all(|s| s.parse::<Shape>().is_ok()));
    }

    #[test]
    fn the_report_times_every_shape_and_row_count_and_names_our_form() {
        let shapes = [Shape {
            inputs: 8,
            outputs: 16,
        }];
        let report = run(&shapes, &[1, 3], 1, 2, |_| {}).unwrap();
        assert_eq!(report.rows.len(), 2);
        assert!(report
            .rows
            .iter()
            .all(|r| r.ours_us > 0.0 && r.view_us > 0.0));
        // A small weight is stored transposed on a CPU build without MKL.
        let want = if cfg!(feature = "mkl") {
            DenseForm::TransposedView
        } else {
            DenseForm::StoredTransposed
        };
        assert_eq!(report.rows[1].ours_form, want);
        let md = report.to_markdown();
        assert!(md.contains("| 8 × 16 | 3 |"), "{md}");
    }
}
