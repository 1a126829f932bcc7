//! Rotary position embedding tables, computed as Hugging Face does (in f32).

use candle_core::{DType, Device, Result, Tensor};
use exitgraph_ir::op::{Rope, RopeScaling};

/// Inverse frequencies of one RoPE configuration, `[rotary_dim / 2]` in f32.
#[derive(Clone, Debug)]
pub struct RopeKernel {
    pub inv_freq: Tensor,
    pub rotary_dim: usize,
}

/// The inverse frequencies after scaling, as in transformers' `ROPE_INIT_FUNCTIONS`.
pub fn inv_freq(rope: &Rope) -> Vec<f32> {
    let dim = rope.rotary_dim;
    let base = rope.theta as f32;
    let plain: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    match &rope.scaling {
        RopeScaling::Default => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let factor = *factor as f32;
            let low = *low_freq_factor as f32;
            let high = *high_freq_factor as f32;
            let old_len = *original_max_position_embeddings as f32;
            let low_wavelen = old_len / low;
            let high_wavelen = old_len / high;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

impl RopeKernel {
    pub fn new(rope: &Rope, device: &Device) -> Result<Self> {
        let f = inv_freq(rope);
        let n = f.len();
        Ok(RopeKernel {
            inv_freq: Tensor::from_vec(f, n, device)?,
            rotary_dim: rope.rotary_dim,
        })
    }

    /// `cos` and `sin` for positions `start..start + len`, each `[len, rotary_dim / 2]`.
    pub fn tables(&self, start: usize, len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        let device = self.inv_freq.device();
        let pos: Vec<f32> = (start..start + len).map(|p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (len, 1), device)?;
        let freqs = pos.broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// Rotates `x: [batch, heads, seq, head_dim]` (rotate-half layout; only the first
    /// `rotary_dim` features when the rotation is partial).
    /// With `differentiable`, uses the unfused op that has a gradient.
    pub fn apply(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        differentiable: bool,
    ) -> Result<Tensor> {
        let rope = |x: &Tensor| {
            if differentiable {
                candle_nn::rotary_emb::rope_slow(x, cos, sin)
            } else {
                candle_nn::rotary_emb::rope(x, cos, sin)
            }
        };
        let head_dim = x.dim(3)?;
        if self.rotary_dim == head_dim {
            rope(&x.contiguous()?)
        } else {
            let rot = x.narrow(3, 0, self.rotary_dim)?.contiguous()?;
            let pass = x.narrow(3, self.rotary_dim, head_dim - self.rotary_dim)?;
            Tensor::cat(&[&rope(&rot)?, &pass], 3)
        }
    }
}
