//! A projection `x → x Wᵀ + b` whose product takes, call by call, the form candle's CPU GEMM
//! (the `gemm` crate) runs fastest for the call's number of rows.
//!
//! The checkpoint stores `W` as `[out, in]`, so `x Wᵀ` multiplies by a transposed view. With
//! one row that is a matrix-vector product and costs what reading `W` costs. With 2 to 16
//! rows the GEMM repacks the transposed view on every call: on a 2-core AVX2 machine
//! (`docs/benchmarks.md`, "Projections with a few rows") a 128 → 768 projection took 42 µs
//! for 2 rows against 8 µs for one, a 3072 → 768 one 1.1 ms against 0.19. Two forms avoid it:
//! - a small weight (at most [`COLUMNS_MAX`] elements) is stored once, at lowering, as a
//!   contiguous `Wᵀ` (`[in, out]`), which the GEMM reads as it is for any number of rows;
//! - a larger one stays `W` (no second copy of a large matrix), and a call with 2 to
//!   [`FEW_ROWS_MAX`] rows computes `(W xᵀ)ᵀ`, which the GEMM runs without repacking `W`.
//!
//! Only inference on the CPU without the `mkl` feature uses them: MKL and cuBLAS take a
//! transposed operand without repacking, and training keeps the source tensor, so that an
//! optimizer's in-place update is seen by the next call. The forms compute the same sums in
//! another order: results agree with `x Wᵀ` to rounding, not bit for bit.

use candle_core::{Result, Tensor};

/// Largest weight (elements) stored transposed: at and below it `x Wᵀ` with a contiguous
/// `Wᵀ` was within a few percent of the fastest form from 2 to 64 rows and up to 2.6× faster
/// than the view from 2 to 16, at a cost of under a microsecond for one row (where the view
/// was fastest).
pub const COLUMNS_MAX: usize = 1 << 20;

/// Most rows for which a large weight's product runs as `(W xᵀ)ᵀ`: at 64 rows the plain
/// form was as fast or faster on most shapes measured (one, 2048 → 768, still gained 1.35×
/// from the weight-first form; a 128 → 32000 head lost 1.24× at 16 rows).
pub const FEW_ROWS_MAX: usize = 16;

/// The form of a call's product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// `x Wᵀ` with `W` as given: candle's and `candle_nn::Linear`'s form.
    TransposedView,
    /// `x Wᵀ` with `Wᵀ` stored contiguous.
    StoredTransposed,
    /// `(W xᵀ)ᵀ`, the weight as the left operand.
    WeightFirst,
}

impl std::fmt::Display for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Form::TransposedView => "x·Wᵀ (view)",
            Form::StoredTransposed => "x·Wᵀ (stored)",
            Form::WeightFirst => "(W·xᵀ)ᵀ",
        })
    }
}

/// How the weight is held.
#[derive(Clone)]
enum Stored {
    /// `W`, `[out, in]`, as the source gave it.
    Rows(Tensor),
    /// `Wᵀ`, `[in, out]`, contiguous.
    Columns(Tensor),
}

/// A linear projection for inference or training; see the module documentation.
#[derive(Clone)]
pub struct Dense {
    stored: Stored,
    bias: Option<Tensor>,
    /// Whether calls choose their form by row count (CPU inference without MKL).
    by_rows: bool,
}

/// Whether this build's CPU matmuls are the `gemm` crate's (not MKL's).
fn gemm_crate() -> bool {
    !cfg!(feature = "mkl")
}

impl Dense {
    /// Keeps `weight` (`[out, in]`) as the source's own tensor and multiplies by its
    /// transposed view, as `candle_nn::Linear` does (training: gradients reach it, and an
    /// in-place update is seen by the next call).
    pub fn source(weight: Tensor, bias: Option<Tensor>) -> Self {
        Dense {
            stored: Stored::Rows(weight),
            bias,
            by_rows: false,
        }
    }

    /// For inference: on the CPU without MKL a weight of at most [`COLUMNS_MAX`] elements is
    /// stored as a contiguous `Wᵀ`, and calls choose their form by row count.
    pub fn inference(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let tuned = weight.device().is_cpu() && gemm_crate() && weight.rank() == 2;
        let stored = if tuned && weight.elem_count() <= COLUMNS_MAX {
            Stored::Columns(weight.t()?.contiguous()?)
        } else {
            Stored::Rows(weight)
        };
        Ok(Dense {
            stored,
            bias,
            by_rows: tuned,
        })
    }

    /// Output features.
    pub fn out_features(&self) -> Result<usize> {
        match &self.stored {
            Stored::Rows(w) => w.dim(0),
            Stored::Columns(wt) => wt.dim(1),
        }
    }

    /// The weight as `[out, in]` (a view when it is stored transposed).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.stored {
            Stored::Rows(w) => Ok(w.clone()),
            Stored::Columns(wt) => wt.t(),
        }
    }

    /// The tensors the projection holds (its weight as stored, and its bias).
    pub fn tensors(&self) -> Vec<&Tensor> {
        let w = match &self.stored {
            Stored::Rows(w) | Stored::Columns(w) => w,
        };
        std::iter::once(w).chain(self.bias.as_ref()).collect()
    }

    /// Output features `start..start + len` alone (views of the same storage).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Dense> {
        Ok(Dense {
            stored: match &self.stored {
                Stored::Rows(w) => Stored::Rows(w.narrow(0, start, len)?),
                Stored::Columns(wt) => Stored::Columns(wt.narrow(1, start, len)?),
            },
            bias: self
                .bias
                .as_ref()
                .map(|b| b.narrow(0, start, len))
                .transpose()?,
            by_rows: self.by_rows,
        })
    }

    /// The form of a call with `rows` rows (all leading axes of the input together).
    pub fn form(&self, rows: usize) -> Form {
        match &self.stored {
            Stored::Columns(_) => Form::StoredTransposed,
            Stored::Rows(_) if self.by_rows && (2..=FEW_ROWS_MAX).contains(&rows) => {
                Form::WeightFirst
            }
            Stored::Rows(_) => Form::TransposedView,
        }
    }

    /// `x Wᵀ + b` for `x` of any rank whose last axis is the input features.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&features, lead)) = dims.split_last() else {
            candle_core::bail!("a projection's input has no feature axis");
        };
        let rows: usize = lead.iter().product();
        let flat = x.reshape((rows, features))?;
        let y = match (&self.stored, self.form(rows)) {
            (Stored::Columns(wt), _) => flat.matmul(wt)?,
            (Stored::Rows(w), Form::WeightFirst) => w.matmul(&flat.t()?)?.t()?,
            (Stored::Rows(w), _) => flat.matmul(&w.t()?)?,
        };
        let mut out = lead.to_vec();
        out.push(y.dim(1)?);
        let y = y.reshape(out)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn ramp(shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// `x Wᵀ + b` written out as sums, for checking the forms against.
    fn by_hand(x: &[Vec<f32>], w: &[Vec<f32>], b: &[f32]) -> Vec<Vec<f32>> {
        x.iter()
            .map(|row| {
                w.iter()
                    .zip(b)
                    .map(|(wr, bi)| row.iter().zip(wr).map(|(a, c)| a * c).sum::<f32>() + bi)
                    .collect()
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &[Vec<f32>]) -> f32 {
        let a = a.to_vec2::<f32>().unwrap();
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn every_form_and_row_count_computes_x_w_transposed_plus_b() {
        // A small weight (stored transposed) and one over the limit (kept as rows, so calls
        // of 2..=16 rows take the (W xᵀ)ᵀ form).
        for (inp, out) in [(24, 40), (1024, COLUMNS_MAX / 1024 + 8)] {
            let w = ramp(&[out, inp], 0.01);
            let b = ramp(&[out], 0.1);
            let wv = w.to_vec2::<f32>().unwrap();
            let bv = b.to_vec1::<f32>().unwrap();
            let dense = Dense::inference(w.clone(), Some(b.clone())).unwrap();
            let plain = Dense::source(w.clone(), Some(b.clone()));
            let transposed = matches!(dense.stored, Stored::Columns(_));
            // An `mkl` build keeps every weight as given and multiplies by its view.
            assert_eq!(
                transposed,
                gemm_crate() && inp * out <= COLUMNS_MAX,
                "{inp} → {out}"
            );
            let forms: Vec<Form> = [1, 2, 16, 17].map(|r| dense.form(r)).into();
            if transposed {
                assert_eq!(forms, [Form::StoredTransposed; 4]);
            } else if !gemm_crate() {
                assert_eq!(forms, [Form::TransposedView; 4]);
            } else {
                use Form::*;
                assert_eq!(
                    forms,
                    [TransposedView, WeightFirst, WeightFirst, TransposedView]
                );
            }
            assert_eq!(plain.form(2), Form::TransposedView);
            for rows in [1, 2, 3, 16, 17, 40] {
                let x = ramp(&[rows, inp], 0.02);
                let want = by_hand(&x.to_vec2::<f32>().unwrap(), &wv, &bv);
                for d in [&dense, &plain] {
                    let y = d.forward(&x).unwrap();
                    assert_eq!(y.dims(), [rows, out]);
                    let err = max_diff(&y, &want);
                    assert!(err < 1e-3, "{inp} → {out}, {rows} rows: {err}");
                }
            }
        }
    }

    #[test]
    fn inputs_of_any_rank_keep_their_leading_axes() {
        let w = ramp(&[6, 4], 0.1);
        let dense = Dense::inference(w.clone(), None).unwrap();
        let x = ramp(&[2, 3, 4], 0.1);
        let y = dense.forward(&x).unwrap();
        assert_eq!(y.dims(), [2, 3, 6]);
        // Row (1, 2) of the result is x[1, 2] Wᵀ.
        let row = x.get(1).unwrap().get(2).unwrap().unsqueeze(0).unwrap();
        let want = by_hand(&row.to_vec2().unwrap(), &w.to_vec2().unwrap(), &[0.0; 6]);
        let got = y.get(1).unwrap().narrow(0, 2, 1).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn a_large_weight_takes_a_rank_three_input_weight_first() {
        let (inp, out) = (1024, COLUMNS_MAX / 1024 + 8);
        let w = ramp(&[out, inp], 0.01);
        let dense = Dense::inference(w.clone(), None).unwrap();
        let x = ramp(&[2, 3, inp], 0.02);
        if gemm_crate() {
            assert_eq!(dense.form(6), Form::WeightFirst);
        }
        let y = dense.forward(&x).unwrap();
        assert_eq!(y.dims(), [2, 3, out]);
        let flat = x.reshape((6, inp)).unwrap();
        let want = by_hand(
            &flat.to_vec2().unwrap(),
            &w.to_vec2().unwrap(),
            &vec![0.0; out],
        );
        assert!(max_diff(&y.reshape((6, out)).unwrap(), &want) < 1e-3);
        // A narrowed part of it, too.
        let part = dense.narrow(out - 5, 5).unwrap().forward(&x).unwrap();
        let want_part: Vec<Vec<f32>> = want.iter().map(|r| r[out - 5..].to_vec()).collect();
        assert!(max_diff(&part.reshape((6, 5)).unwrap(), &want_part) < 1e-3);
    }

    #[test]
    fn a_narrowed_projection_is_those_output_features() {
        let w = ramp(&[10, 8], 0.1);
        let b = ramp(&[10], 0.5);
        let x = ramp(&[3, 8], 0.1);
        for dense in [
            Dense::inference(w.clone(), Some(b.clone())).unwrap(),
            Dense::source(w.clone(), Some(b.clone())),
        ] {
            let full = dense.forward(&x).unwrap();
            let part = dense.narrow(4, 3).unwrap();
            assert_eq!(part.out_features().unwrap(), 3);
            let got = part.forward(&x).unwrap();
            let want = full.narrow(D::Minus1, 4, 3).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
            // The weight reads back as [out, in] whichever way it is stored.
            let back = part.weight().unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(back, w.narrow(0, 4, 3).unwrap().to_vec2::<f32>().unwrap());
        }
    }
}
