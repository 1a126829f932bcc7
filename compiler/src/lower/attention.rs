//! Multi-head attention with grouped-query heads, RoPE, a KV cache and exact masking
//! (causal, sliding window, padding).

use super::adapter::{adapt, project, Lora};
use super::fused::FusedLinear;
use super::rope::RopeKernel;
use candle_core::{DType, Result, Tensor};
use candle_nn::Linear;
use std::collections::HashMap;

/// Per-call facts every attention layer needs.
pub struct AttnCtx {
    /// Position of the first token of this call (tokens already in the cache).
    pub start: usize,
    pub seq: usize,
    /// `[batch, start + seq]`, 1 for real tokens and 0 for padding, in f32.
    pub key_mask: Option<Tensor>,
    /// Additive masks by (causal, window), built once per call.
    masks: HashMap<(bool, Option<usize>), Option<Tensor>>,
    /// RoPE tables by kernel identity.
    tables: HashMap<usize, (Tensor, Tensor)>,
}

impl AttnCtx {
    pub fn new(start: usize, seq: usize, key_mask: Option<Tensor>) -> Self {
        AttnCtx {
            start,
            seq,
            key_mask,
            masks: HashMap::new(),
            tables: HashMap::new(),
        }
    }

    /// Additive mask `[batch or 1, 1, seq, start + seq]` in f32, or `None` when every query
    /// may see every key.
    fn mask(
        &mut self,
        causal: bool,
        window: Option<usize>,
        device: &candle_core::Device,
    ) -> Result<Option<Tensor>> {
        if let Some(m) = self.masks.get(&(causal, window)) {
            return Ok(m.clone());
        }
        let kv_len = self.start + self.seq;
        let needs_position_mask = (causal && self.seq > 1) || window.is_some_and(|w| kv_len > w);
        let mut mask = if needs_position_mask {
            let mut data = Vec::with_capacity(self.seq * kv_len);
            for i in 0..self.seq {
                let q = self.start + i;
                for k in 0..kv_len {
                    let visible = (!causal || k <= q) && window.is_none_or(|w| q < k + w);
                    data.push(if visible { 0f32 } else { f32::MIN });
                }
            }
            Some(Tensor::from_vec(data, (1, 1, self.seq, kv_len), device)?)
        } else {
            None
        };
        if let Some(km) = &self.key_mask {
            // 0 where the key is real, f32::MIN where it is padding.
            let pad = ((km.ones_like()? - km)? * f64::from(f32::MIN))?
                .unsqueeze(1)?
                .unsqueeze(1)?;
            mask = Some(match mask {
                Some(m) => m.broadcast_add(&pad)?.clamp(f32::MIN, 0f32)?,
                None => pad,
            });
        }
        self.masks.insert((causal, window), mask.clone());
        Ok(mask)
    }
}

/// A sequence in a ragged call: offset of its tokens, their count, its call context and its
/// layer cache.
pub type RaggedPart<'a> = (usize, usize, AttnCtx, &'a mut Option<(Tensor, Tensor)>);

/// One attention layer's stored weights, lowered once per weight identity. The KV slot and
/// any adapters belong to the place that runs it and are arguments of each call.
pub struct AttentionKernel {
    /// q, k and v projections, fused.
    pub qkv: FusedLinear,
    pub o: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub causal: bool,
    pub window: Option<usize>,
    pub rope: Option<(usize, RopeKernel)>,
    /// Use ops with gradients (training) instead of the fused inference kernels.
    pub differentiable: bool,
}

fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, s, d) = x.dims4()?;
    Tensor::cat(&vec![&x; n_rep], 2)?.reshape((b, kv * n_rep, s, d))
}

impl AttentionKernel {
    /// q, k and v of `x`, with their adapters (`adapters` in q, k, v, o order).
    fn project_qkv(&self, x: &Tensor, adapters: &[Option<Lora>]) -> Result<Vec<Tensor>> {
        let parts = self.qkv.forward(x)?;
        parts
            .into_iter()
            .enumerate()
            .map(|(i, y)| adapt(adapters.get(i).and_then(Option::as_ref), x, y))
            .collect()
    }

    fn output(&self, y: &Tensor, adapters: &[Option<Lora>]) -> Result<Tensor> {
        project(&self.o, adapters.get(3).and_then(Option::as_ref), y)
    }

    /// `x: [batch, seq, hidden]` → `[batch, seq, hidden]`, appending this call's keys and
    /// values to `cache` (the slot of the place that runs the kernel).
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &mut AttnCtx,
        cache: &mut Option<(Tensor, Tensor)>,
        adapters: &[Option<Lora>],
    ) -> Result<Tensor> {
        let qkv = self.project_qkv(x, adapters)?;
        let y = self.attend(&qkv[0], &qkv[1], &qkv[2], ctx, cache)?;
        self.output(&y, adapters)
    }

    /// Several sequences' tokens side by side in `x: [1, total, hidden]`: the projections
    /// run on all tokens at once, attention runs per sequence on its own cache and
    /// positions. `segments[i]` is (offset in `x`, length, cache of sequence `i`).
    pub fn forward_ragged(
        &self,
        x: &Tensor,
        segments: &mut [RaggedPart<'_>],
        adapters: &[Option<Lora>],
    ) -> Result<Tensor> {
        let qkv = self.project_qkv(x, adapters)?;
        let mut outs = Vec::with_capacity(segments.len());
        for (offset, len, ctx, cache) in segments.iter_mut() {
            let part = |t: &Tensor| t.narrow(1, *offset, *len);
            outs.push(self.attend(
                &part(&qkv[0])?,
                &part(&qkv[1])?,
                &part(&qkv[2])?,
                ctx,
                cache,
            )?);
        }
        self.output(&Tensor::cat(&outs, 1)?, adapters)
    }

    /// Splits projected `[batch, seq, heads * head_dim]` into heads and rotates q and k.
    fn heads_with_rope(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &mut AttnCtx,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = q.dims3()?;
        let d = self.head_dim;
        let split = |t: &Tensor, h: usize| -> Result<Tensor> {
            t.reshape((b, s, h, d))?.transpose(1, 2)?.contiguous()
        };
        let mut q = split(q, self.heads)?;
        let mut k = split(k, self.kv_heads)?;
        let v = split(v, self.kv_heads)?;
        if let Some((id, rope)) = &self.rope {
            let (cos, sin) = match ctx.tables.get(id) {
                Some(t) => t.clone(),
                None => {
                    let t = rope.tables(ctx.start, ctx.seq, q.dtype())?;
                    ctx.tables.insert(*id, t.clone());
                    t
                }
            };
            q = rope.apply(&q, &cos, &sin, self.differentiable)?;
            k = rope.apply(&k, &cos, &sin, self.differentiable)?;
        }
        Ok((q, k, v))
    }

    /// Appends this call's keys and values to the cache; returns every position's.
    fn append(
        k: Tensor,
        v: Tensor,
        ctx: &AttnCtx,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        let cached = cache.as_ref().map_or(Ok(0), |(pk, _)| pk.dim(2))?;
        if cached != ctx.start {
            candle_core::bail!(
                "KV slot holds {cached} positions but the call starts at position {}: a slot is appended to in order (truncate the cache to roll back)",
                ctx.start
            );
        }
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Writes keys and values computed from `x: [1, total, hidden]` (the layer's normed input)
    /// into each part's cache without attending: CALM's state copying fills the layers an
    /// exited token skipped from its exit hidden state.
    pub fn append_kv_ragged(
        &self,
        x: &Tensor,
        parts: &mut [RaggedPart<'_>],
        adapters: &[Option<Lora>],
    ) -> Result<()> {
        let kv = self.qkv.forward_tail(x, 1)?;
        let (Some(k_all), Some(v_all)) = (kv.first(), kv.get(1)) else {
            candle_core::bail!("the fused projection has no key and value parts");
        };
        let lora = |i: usize| adapters.get(i).and_then(Option::as_ref);
        let k_all = &adapt(lora(1), x, k_all.clone())?;
        let v_all = &adapt(lora(2), x, v_all.clone())?;
        let d = self.head_dim;
        for (offset, len, ctx, cache) in parts.iter_mut() {
            let split = |t: &Tensor| -> Result<Tensor> {
                t.narrow(1, *offset, *len)?
                    .reshape((1, *len, self.kv_heads, d))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let mut k = split(k_all)?;
            let v = split(v_all)?;
            if let Some((id, rope)) = &self.rope {
                let (cos, sin) = match ctx.tables.get(id) {
                    Some(t) => t.clone(),
                    None => {
                        let t = rope.tables(ctx.start, ctx.seq, k.dtype())?;
                        ctx.tables.insert(*id, t.clone());
                        t
                    }
                };
                k = rope.apply(&k, &cos, &sin, self.differentiable)?;
            }
            Self::append(k, v, ctx, cache)?;
        }
        Ok(())
    }

    /// Every stored tensor the kernel holds.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut t = self.qkv.tensors();
        t.push(self.o.weight());
        t.extend(self.o.bias());
        t
    }

    /// Attention of projected `q, k, v: [batch, seq, heads * head_dim]` for one call on one
    /// cache; returns `[batch, seq, heads * head_dim]` before the output projection.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &mut AttnCtx,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.heads_with_rope(q, k, v, ctx)?;
        let (k, v) = Self::append(k, v, ctx, cache)?;
        let n_rep = self.heads / self.kv_heads;
        let k = repeat_kv(k, n_rep)?;
        let v = repeat_kv(v, n_rep)?;
        let (b, _, s, d) = q.dims4()?;
        let dtype = q.dtype();
        let mut att = (q.matmul(&k.t()?)? * self.scale)?;
        if dtype != DType::F32 {
            att = att.to_dtype(DType::F32)?;
        }
        if let Some(mask) = ctx.mask(self.causal, self.window, q.device())? {
            att = att.broadcast_add(&mask)?;
        }
        let att = if self.differentiable {
            candle_nn::ops::softmax(&att, candle_core::D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        }
        .to_dtype(dtype)?;
        att.matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, s, self.heads * d))
    }
}
