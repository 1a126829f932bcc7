//! Small CPU calls of candle-nn's fused softmax, run on the calling thread.
//!
//! candle-nn's CPU softmax splits its rows over rayon's pool on every call, however few they
//! are. A decode or verification call's attention scores on a small model are a few hundred
//! numbers, and handing them to the pool and waiting for it cost about 10 µs a call on 2
//! cores, more than the arithmetic, once per layer (docs/benchmarks.md, "Small calls on the
//! calling thread"). Up to [`SERIAL_ELEMENTS`] this module runs candle-nn's kernel (the
//! same reductions, in the same order) on the calling thread, so the result is bitwise
//! candle-nn's; larger calls, and other devices, keep the fused op.

use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// Elements up to which a call runs on the calling thread: softmax on 2 AVX2 cores took
/// 7.6 µs here against 12.5 µs split at 2,048 elements, 28.9 against 26.0 µs at 8,192
/// (docs/benchmarks.md).
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

fn softmax_rows<T: candle_core::WithDType + num_traits::Float + VecOps>(
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
        // SAFETY: `s` holds `s.len()` initialised elements, as the reduction reads.
        #[allow(unsafe_code)]
        unsafe {
            T::vec_reduce_max(s.as_ptr(), &mut max, s.len())
        };
        for (x, y) in s.iter().zip(d.iter_mut()) {
            *y = (*x - max).exp();
        }
        let mut sum = T::zero();
        // SAFETY: `d` holds `d.len()` initialised elements, as the reduction reads.
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
            CpuStorage::F32(s) => softmax_rows::<f32>(s, layout),
            CpuStorage::F64(s) => softmax_rows::<f64>(s, layout),
            CpuStorage::BF16(s) => softmax_rows::<half::bf16>(s, layout),
            CpuStorage::F16(s) => softmax_rows::<half::f16>(s, layout),
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
        /// bit for bit, masked entries (`f32::MIN`) included, in every float dtype.
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
            let mut vals = Vec::with_capacity(rows * cols);
            for i in 0..rows * cols {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                // Masked keys, but never a whole row: attention always keeps one key.
                vals.push(if i % cols < masked.min(cols - 1) { f32::MIN } else { 20.0 * u - 10.0 });
            }
            let x = Tensor::from_vec(vals, (rows, cols), &dev).unwrap().to_dtype(dtype).unwrap();
            prop_assert!(is_small(&x));
            let ours = softmax_last_dim(&x).unwrap();
            let theirs = candle_nn::ops::softmax_last_dim(&x).unwrap();
            let flat = |t: &Tensor| {
                t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
            };
            let (a, b) = (flat(&ours), flat(&theirs));
            prop_assert_eq!(a.len(), rows * cols);
            for (p, q) in a.iter().zip(&b) {
                prop_assert_eq!(p.to_bits(), q.to_bits());
            }
            // Each row sums to 1: the op is a softmax, not merely equal to another.
            let tol = if matches!(dtype, DType::BF16 | DType::F16) { 5e-2 } else { 1e-5 };
            for r in a.chunks(cols) {
                prop_assert!((r.iter().sum::<f64>() - 1.0).abs() < tol);
            }
        }
    }

    #[test]
    fn large_inputs_take_the_fused_op() -> Result<()> {
        let dev = Device::Cpu;
        let big = Tensor::arange(0f32, (2 * SERIAL_ELEMENTS) as f32, &dev)?
            .reshape((2, SERIAL_ELEMENTS))?
            .affine(1e-3, 0.0)?;
        assert!(!is_small(&big));
        let ours = softmax_last_dim(&big)?.to_vec2::<f32>()?;
        assert_eq!(
            ours,
            candle_nn::ops::softmax_last_dim(&big)?.to_vec2::<f32>()?
        );
        assert!((ours[1].iter().sum::<f32>() - 1.0).abs() < 1e-4);
        // The largest score gets the largest weight.
        assert!(ours[0][SERIAL_ELEMENTS - 1] > ours[0][0]);
        Ok(())
    }
}
