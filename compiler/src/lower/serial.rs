//! Small CPU calls of candle-nn's fused ops, run on the calling thread.
//!
//! candle-nn's CPU softmax splits its rows over rayon's pool on every call, however few they
//! are, and its RoPE kernel does so for any call of more than one position. A decode or
//! verification call's attention scores on a small model are a few hundred numbers, and
//! handing them to the pool and waiting for it cost about 10 µs a call on 2 cores, more than
//! the arithmetic (docs/benchmarks.md, "Small calls on the calling thread"). Up to
//! [`SERIAL_ELEMENTS`] this module runs candle-nn's softmax kernel (the same reductions, in
//! the same order) on the calling thread, so the result is bitwise candle-nn's; attention
//! uses the same limit to rotate a small call of several tokens one position per row
//! (`AttentionKernel::rotates_per_token`). Larger calls, training and other devices keep
//! the fused ops.

use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// Elements up to which a call runs on the calling thread: a choice between two measured
/// points (softmax on 2 AVX2 cores: 7.6 µs on the calling thread against 12.5 µs split at
/// 2,048 elements, 28.9 against 26.0 µs at 8,192; docs/benchmarks.md).
pub const SERIAL_ELEMENTS: usize = 4096;

/// Whether a call on `t` runs on the calling thread.
pub fn is_small(t: &Tensor) -> bool {
    t.device().is_cpu() && t.elem_count() <= SERIAL_ELEMENTS
}

/// Softmax over the last axis, as `candle_nn::ops::softmax_last_dim`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if is_small(x) && x.is_contiguous() {
        x.apply_op1_no_bwd(&SoftmaxOnThread)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// candle-nn's softmax kernel without the split: per row the maximum, `exp(x - max)`, their
/// sum (candle's vectorised reductions), then each divided by the sum.
struct SoftmaxOnThread;

fn softmax_kernel<T: candle_core::WithDType + num_traits::Float + VecOps>(
    src: &[T],
    layout: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("softmax on the calling thread needs a contiguous input");
    };
    let src = &src[start..end];
    let dims = layout.shape().dims();
    let n = dims.last().copied().unwrap_or(1).max(1);
    let mut dst = vec![T::zero(); src.len()];
    for (s, d) in src.chunks(n).zip(dst.chunks_mut(n)) {
        let mut max = T::neg_infinity();
        // SAFETY: `chunks(n)` yields no empty slice, so the reduction reads `s.len() >= 1`
        // initialised elements, and `max` is a valid `&mut T`.
        #[allow(unsafe_code)]
        unsafe {
            T::vec_reduce_max(s.as_ptr(), &mut max, s.len())
        };
        for (x, y) in s.iter().zip(d.iter_mut()) {
            *y = (*x - max).exp();
        }
        let mut sum = T::zero();
        // SAFETY: as above, `d.len() == s.len() >= 1` initialised elements; `sum` is valid.
        #[allow(unsafe_code)]
        unsafe {
            T::vec_reduce_sum(d.as_ptr(), &mut sum, d.len())
        };
        for y in d.iter_mut() {
            *y /= sum;
        }
    }
    Ok((
        candle_core::WithDType::to_cpu_storage_owned(dst),
        Shape::from_dims(dims),
    ))
}

impl candle_core::CustomOp1 for SoftmaxOnThread {
    fn name(&self) -> &'static str {
        "softmax-last-dim-on-thread"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(s) => softmax_kernel::<f32>(s, layout),
            CpuStorage::F64(s) => softmax_kernel::<f64>(s, layout),
            CpuStorage::BF16(s) => softmax_kernel::<half::bf16>(s, layout),
            CpuStorage::F16(s) => softmax_kernel::<half::f16>(s, layout),
            other => candle_core::bail!(
                "softmax on the calling thread: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Invariant: up to the limit the calling thread's softmax equals candle-nn's fused op
        /// bit for bit, masked entries (`f32::MIN`) included, in every float dtype, on a
        /// view that starts inside its storage.
        #[test]
        fn equals_candle_nn_bitwise(
            rows in 1usize..16,
            cols in 1usize..256,
            masked in 0usize..4,
            seed in 0u64..1000,
            dtype in prop::sample::select(vec![DType::F32, DType::F64, DType::BF16, DType::F16]),
        ) {
            let dev = Device::Cpu;
            let mut state = seed;
            // One row more than used: the input is the last `rows` rows, at an offset.
            let mut vals = Vec::with_capacity((rows + 1) * cols);
            for i in 0..(rows + 1) * cols {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                // Masked keys, but never a whole row: attention always keeps one key.
                let masked_key = i % cols < masked.min(cols - 1);
                vals.push(if masked_key { f32::MIN } else { 20.0 * u - 10.0 });
            }
            let x = Tensor::from_vec(vals, (rows + 1, cols), &dev)?
                .to_dtype(dtype)?
                .narrow(0, 1, rows)?;
            prop_assert!(is_small(&x) && x.is_contiguous());
            let flat = |t: &Tensor| -> Result<Vec<f64>> {
                t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
            };
            let ours = flat(&x.apply_op1_no_bwd(&SoftmaxOnThread)?)?;
            let theirs = flat(&candle_nn::ops::softmax_last_dim(&x)?)?;
            prop_assert_eq!(flat(&softmax_last_dim(&x)?)?, ours.clone());
            prop_assert_eq!(ours.len(), rows * cols);
            for (p, q) in ours.iter().zip(&theirs) {
                prop_assert_eq!(p.to_bits(), q.to_bits());
            }
            // Each row sums to 1: the op is a softmax, not merely equal to another (in the
            // wide types; bf16 and f16 sums drift with the row's length).
            if matches!(dtype, DType::F32 | DType::F64) {
                for r in ours.chunks(cols) {
                    prop_assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn the_limit_is_inclusive_and_cpu_only() -> Result<()> {
        let dev = Device::Cpu;
        assert!(is_small(&Tensor::zeros(SERIAL_ELEMENTS, DType::F32, &dev)?));
        assert!(!is_small(&Tensor::zeros(
            SERIAL_ELEMENTS + 1,
            DType::F32,
            &dev
        )?));
        // Above the limit the fused op runs: same values as candle-nn's.
        let big = Tensor::arange(0f32, (2 * SERIAL_ELEMENTS) as f32, &dev)?
            .reshape((2, SERIAL_ELEMENTS))?
            .affine(1e-3, 0.0)?;
        let ours = softmax_last_dim(&big)?.to_vec2::<f32>()?;
        assert_eq!(
            ours,
            candle_nn::ops::softmax_last_dim(&big)?.to_vec2::<f32>()?
        );
        assert!((ours[1].iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert!(ours[0][SERIAL_ELEMENTS - 1] > ours[0][0]);
        Ok(())
    }
}
