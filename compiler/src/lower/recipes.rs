//! Weights computed from other weights at lowering (recipes beyond reading a checkpoint
//! tensor): means of tied layers, zeros, seeded LoRA initialisations and truncated SVDs of
//! residuals. Each is computed once per program and cached by its recipe.

use crate::synth::SplitMix64;
use candle_core::{DType, Device, Tensor};

/// The element-wise mean of tensors of one shape.
pub fn mean(tensors: &[Tensor]) -> candle_core::Result<Tensor> {
    let Some(first) = tensors.first() else {
        candle_core::bail!("a mean of no tensors");
    };
    let mut sum = first.to_dtype(DType::F32)?;
    for t in &tensors[1..] {
        sum = (sum + t.to_dtype(DType::F32)?)?;
    }
    (sum / tensors.len() as f64)?.to_dtype(first.dtype())
}

/// A seeded tensor uniform in ±1/√(last dim), in f32 on the CPU.
pub fn uniform(shape: &[usize], seed: u64) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let fan_in = shape.last().copied().unwrap_or(1).max(1);
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut rng = SplitMix64::new(seed);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * bound) as f32
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// The rank-`rank` truncated SVD factors of `target − base` (2-D, `[out, in]`), computed in
/// f64 with faer: with `target − base = U·diag(S)·Vᵀ` (singular values in non-increasing
/// order), `A = Vᵀ[:r, :]` (`[r, in]`) and `B = U[:, :r]·diag(S[:r])` (`[out, r]`), both f32
/// on the CPU, so that `B·A` is the best rank-`r` approximation of the residual (the whole
/// residual at full rank).
pub fn svd_factors(
    target: &Tensor,
    base: &Tensor,
    rank: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let r = (target.to_dtype(DType::F64)? - base.to_dtype(DType::F64)?)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f64>()?;
    let (out, inp) = (r.len(), r.first().map_or(0, Vec::len));
    if rank == 0 || rank > out.min(inp) {
        candle_core::bail!(
            "rank {rank} is outside 1..={} for a [{out}, {inp}] weight",
            out.min(inp)
        );
    }
    let m = faer::Mat::<f64>::from_fn(out, inp, |i, j| r[i][j]);
    let svd = m
        .thin_svd()
        .map_err(|e| candle_core::Error::Msg(format!("SVD did not converge: {e:?}")))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut a = Vec::with_capacity(rank * inp);
    for k in 0..rank {
        for j in 0..inp {
            a.push(v[(j, k)] as f32);
        }
    }
    let mut b = Vec::with_capacity(out * rank);
    for i in 0..out {
        for k in 0..rank {
            b.push((u[(i, k)] * s[k]) as f32);
        }
    }
    Ok((
        Tensor::from_vec(a, (rank, inp), &Device::Cpu)?,
        Tensor::from_vec(b, (out, rank), &Device::Cpu)?,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(rows: &[&[f32]]) -> Tensor {
        let data: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(data, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn svd_factors_rebuild_the_residual_and_truncate_it() {
        // Residual diag(3, 1) rotated: [[3, 0], [0, 1]] - 0. Rank 1 keeps the 3 direction.
        let target = t(&[&[3.0, 0.0], &[0.0, 1.0]]);
        let base = t(&[&[0.0, 0.0], &[0.0, 0.0]]);
        let (a, b) = svd_factors(&target, &base, 2).unwrap();
        assert_eq!(a.dims(), [2, 2]);
        assert_eq!(b.dims(), [2, 2]);
        let full = b.matmul(&a).unwrap().to_vec2::<f32>().unwrap();
        for (row, want) in full.iter().zip([[3.0, 0.0], [0.0, 1.0]]) {
            for (x, y) in row.iter().zip(want) {
                assert!((x - y).abs() < 1e-6, "{full:?}");
            }
        }
        let (a1, b1) = svd_factors(&target, &base, 1).unwrap();
        let one = b1.matmul(&a1).unwrap().to_vec2::<f32>().unwrap();
        assert!(
            (one[0][0] - 3.0).abs() < 1e-6 && one[1][1].abs() < 1e-6,
            "{one:?}"
        );
        // The residual, not the target: [[4, 1], [2, 3]] - [[1, 1], [2, 2]] = diag(3, 1).
        let (a, b) = svd_factors(
            &t(&[&[4.0, 1.0], &[2.0, 3.0]]),
            &t(&[&[1.0, 1.0], &[2.0, 2.0]]),
            2,
        )
        .unwrap();
        let r = b.matmul(&a).unwrap().to_vec2::<f32>().unwrap();
        assert!(
            (r[0][0] - 3.0).abs() < 1e-6 && (r[1][1] - 1.0).abs() < 1e-6 && r[0][1].abs() < 1e-6
        );
        assert!(svd_factors(&target, &base, 3).is_err());
    }

    #[test]
    fn means_and_uniforms() {
        let m = mean(&[t(&[&[1.0, 2.0]]), t(&[&[3.0, 6.0]])]).unwrap();
        assert_eq!(m.to_vec2::<f32>().unwrap(), vec![vec![2.0, 4.0]]);
        let u = uniform(&[3, 16], 7)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(u.iter().all(|x| x.abs() <= 0.25));
        assert_eq!(
            u,
            uniform(&[3, 16], 7)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        assert_ne!(
            u,
            uniform(&[3, 16], 8)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}
