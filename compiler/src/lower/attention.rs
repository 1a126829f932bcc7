//! Multi-head attention with grouped-query heads, RoPE, a KV cache and exact masking
//! (causal, sliding window, padding).

use super::adapter::Adapters;
use super::cache::Slot;
use super::dense::Dense;
use super::fused::FusedLinear;
use super::rope::RopeKernel;
use crate::op_profile::{shape, time as timed};
use candle_core::{DType, Result, Tensor};
use std::collections::HashMap;

/// Per-call facts every attention layer needs.
pub struct AttnCtx {
    /// Position of the first token of this call (tokens already in the cache).
    pub start: usize,
    pub seq: usize,
    /// `[batch, start + seq]`, 1 for real tokens and 0 for padding, in f32.
    pub key_mask: Option<Tensor>,
    /// `(batch, example of every token, row-major [batch, seq])`: a query sees only keys of
    /// its own example (examples packed into one training row). Only for a call from an
    /// empty cache.
    examples: Option<(usize, Vec<u32>)>,
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
            examples: None,
            masks: HashMap::new(),
            tables: HashMap::new(),
        }
    }

    /// Restricts attention to keys of the query's own example: `examples` holds
    /// `batch × seq` example ids, row-major. The call must start from an empty cache.
    pub fn with_examples(mut self, batch: usize, examples: Vec<u32>) -> Result<Self> {
        if self.start != 0 || examples.len() != batch * self.seq {
            candle_core::bail!(
                "example_ids: {} ids for a call of {batch} × {} tokens from position {} (they \
                 need one per token and an empty cache)",
                examples.len(),
                self.seq,
                self.start
            );
        }
        self.examples = Some((batch, examples));
        self.masks.clear();
        Ok(self)
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
        let visible = |q: usize, k: usize| (!causal || k <= q) && window.is_none_or(|w| q < k + w);
        let mut mask = if let Some((batch, seg)) = &self.examples {
            // start is 0: query i and key k are positions i and k of the same row.
            let (batch, seq) = (*batch, self.seq);
            let mut data = Vec::with_capacity(batch * seq * seq);
            for row in seg.chunks(seq) {
                for (q, sq) in row.iter().enumerate() {
                    for (k, sk) in row.iter().enumerate() {
                        let keep = sq == sk && visible(q, k);
                        data.push(if keep { 0f32 } else { f32::MIN });
                    }
                }
            }
            Some(Tensor::from_vec(data, (batch, 1, seq, seq), device)?)
        } else if needs_position_mask {
            let mut data = Vec::with_capacity(self.seq * kv_len);
            for i in 0..self.seq {
                let q = self.start + i;
                for k in 0..kv_len {
                    data.push(if visible(q, k) { 0f32 } else { f32::MIN });
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

/// A sequence in a ragged call: offset of its tokens, their count, its call context (one per
/// sequence and call, shared by every layer, so masks and RoPE tables are built once) and
/// its layer cache.
pub type RaggedPart<'a> = (usize, usize, &'a mut AttnCtx, &'a mut Slot);

/// One attention layer's stored weights, lowered once per weight identity. The KV slot and
/// any adapters belong to the place that runs it and are arguments of each call.
pub struct AttentionKernel {
    /// q, k and v projections, fused.
    pub qkv: FusedLinear,
    pub o: Dense,
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

/// Queries per block of a long causal call in [`AttentionKernel::attend_grouped`].
pub const QUERY_BLOCK: usize = 64;

/// Queries per block of a long causal call in [`AttentionKernel::attend_repeated`] (the
/// training path, where each block is a node of the backward graph, so blocks are larger).
pub const TRAIN_QUERY_BLOCK: usize = 128;

/// Softmax over the last axis of f32 scores. With the `mkl` feature and no mask it is
/// composed of candle ops (row max, subtract, exp, row sum, divide) so that the
/// exponentials run in MKL's vectorised `vsExp`: in decode this took softmax from 4% to
/// 1.4% of the time. Masked scores (`f32::MIN` entries) make `vsExp` far slower than
/// candle's fused `softmax_last_dim` (a 512-token prefill went from 0.46 s to 1.0 s), so
/// they, and every build without MKL, keep the fused op.
fn softmax_rows(att: &Tensor, masked: bool) -> Result<Tensor> {
    if cfg!(feature = "mkl") && !masked {
        let max = att.max_keepdim(candle_core::D::Minus1)?;
        let e = att.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(candle_core::D::Minus1)?;
        e.broadcast_div(&sum)
    } else {
        super::serial::softmax_last_dim(att)
    }
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
    fn project_qkv(&self, x: &Tensor, adapters: Adapters<'_>) -> Result<Vec<Tensor>> {
        let parts = self.qkv.forward(x)?;
        parts
            .into_iter()
            .enumerate()
            .map(|(i, y)| adapters.adapt(i, x, y))
            .collect()
    }

    fn output(&self, y: &Tensor, adapters: Adapters<'_>) -> Result<Tensor> {
        adapters.project(3, &self.o, y)
    }

    /// `x: [batch, seq, hidden]` → `[batch, seq, hidden]`, appending this call's keys and
    /// values to `cache` (the slot of the place that runs the kernel).
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &mut AttnCtx,
        cache: &mut Slot,
        adapters: Adapters<'_>,
    ) -> Result<Tensor> {
        let qkv = timed(
            || format!("q/k/v projection {}", shape(x)),
            || self.project_qkv(x, adapters),
        )?;
        let y = self.attend(&qkv[0], &qkv[1], &qkv[2], ctx, cache)?;
        timed(
            || format!("o projection {}", shape(&y)),
            || self.output(&y, adapters),
        )
    }

    /// Several sequences' tokens side by side in `x: [1, total, hidden]`: the projections
    /// run on all tokens at once, attention runs per sequence on its own cache and
    /// positions. `segments[i]` is (offset in `x`, length, cache of sequence `i`).
    pub fn forward_ragged(
        &self,
        x: &Tensor,
        segments: &mut [RaggedPart<'_>],
        adapters: Adapters<'_>,
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

    /// GemFilter's scores of `x: [1, total, hidden]` (the layer's normed input, several
    /// sequences side by side): for each part (offset in `x`, length, first position), its
    /// last position's query against each of its keys, after RoPE, without the `1/√d` scale
    /// or a softmax, key-value heads repeated to the query heads, summed over heads, in f32;
    /// `[1, total, 1]`. Only the keys of every position and the query of each part's last
    /// are projected; nothing is read from or written to a cache, so a part must be a whole
    /// prompt from position 0.
    pub fn last_query_scores_ragged(
        &self,
        x: &Tensor,
        parts: &[(usize, usize, usize)],
        adapters: Adapters<'_>,
    ) -> Result<Tensor> {
        if let Some(&(_, _, start)) = parts.iter().find(|p| p.2 != 0) {
            candle_core::bail!(
                "GemFilter scores a whole prompt from position 0; this call starts at {start}"
            );
        }
        let k_all = adapters.adapt(1, x, self.qkv.forward_part(x, 1)?)?;
        let (d, heads, kv_heads) = (self.head_dim, self.heads, self.kv_heads);
        let mut out = Vec::with_capacity(parts.len());
        for &(offset, len, start) in parts {
            if len == 0 {
                continue;
            }
            let x_last = x.narrow(1, offset + len - 1, 1)?.contiguous()?;
            let q = adapters.adapt(0, &x_last, self.qkv.forward_part(&x_last, 0)?)?;
            let q = q.reshape((1, 1, heads, d))?.transpose(1, 2)?.contiguous()?;
            let k = k_all
                .narrow(1, offset, len)?
                .reshape((1, len, kv_heads, d))?
                .transpose(1, 2)?
                .contiguous()?;
            let (q, k) = match &self.rope {
                Some((_, rope)) => {
                    let (cos, sin) = rope.tables(start, len, q.dtype())?;
                    let last = |t: &Tensor| t.narrow(0, len - 1, 1);
                    (
                        rope.apply(&q, &last(&cos)?, &last(&sin)?, self.differentiable)?,
                        rope.apply(&k, &cos, &sin, self.differentiable)?,
                    )
                }
                None => (q, k),
            };
            // q: [1, heads, 1, d]; k: [1, kv_heads, len, d] repeated to the query heads.
            let q = q.to_dtype(DType::F32)?;
            let k = repeat_kv(k.to_dtype(DType::F32)?, heads / kv_heads)?;
            let scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
            // [1, heads, 1, len] → summed over heads → [1, len, 1].
            out.push(scores.sum(1)?.reshape((1, len, 1))?);
        }
        Tensor::cat(&out, 1)
    }

    /// Whether a call's `q: [batch, seq, heads * head_dim]` is rotated per token, before the
    /// head split: a small inference call of several tokens on the CPU. candle-nn's RoPE
    /// kernel rotates one position on the calling thread but splits several over rayon's
    /// pool, which cost more than the rotation on a verification or short prefill call (see
    /// [`super::serial`]); as rows of one position each (`[batch · seq, heads, 1,
    /// head_dim]` against `[batch · seq, 1, rotary_dim / 2]` tables) the same arithmetic
    /// runs on the calling thread.
    fn rotates_per_token(&self, q: &Tensor) -> bool {
        self.rope.is_some()
            && !self.differentiable
            && q.dim(1).is_ok_and(|s| s > 1)
            && super::serial::is_small(q)
    }

    /// Splits projected `[batch, seq, heads * head_dim]` into heads and rotates q and k
    /// (per token first when [`Self::rotates_per_token`]).
    fn heads_with_rope(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &mut AttnCtx,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = q.dims3()?;
        let d = self.head_dim;
        let split = |q: &Tensor, k: &Tensor| -> Result<(Tensor, Tensor, Tensor)> {
            let heads = |t: &Tensor, h: usize| -> Result<Tensor> {
                t.reshape((b, s, h, d))?.transpose(1, 2)?.contiguous()
            };
            timed(
                || "q/k/v into heads (copies)".to_string(),
                || {
                    Ok((
                        heads(q, self.heads)?,
                        heads(k, self.kv_heads)?,
                        heads(v, self.kv_heads)?,
                    ))
                },
            )
        };
        let Some((id, rope)) = &self.rope else {
            return split(q, k);
        };
        let (cos, sin) = match ctx.tables.get(id) {
            Some(t) => t.clone(),
            None => {
                let t = rope.tables(ctx.start, ctx.seq, q.dtype())?;
                ctx.tables.insert(*id, t.clone());
                t
            }
        };
        if self.rotates_per_token(q) {
            let (q, k) = timed(
                || "RoPE on q and k".to_string(),
                || {
                    // Position p's row of the tables for every token at p, in token order.
                    let per_token = |t: &Tensor| -> Result<Tensor> {
                        let half = t.dim(1)?;
                        let t = t.narrow(0, 0, s)?.reshape((1, s, half))?;
                        let t = if b == 1 {
                            t
                        } else {
                            t.broadcast_as((b, s, half))?.contiguous()?
                        };
                        t.reshape((b * s, 1, half))
                    };
                    let (cos, sin) = (per_token(&cos)?, per_token(&sin)?);
                    let rotate = |t: &Tensor, h: usize| -> Result<Tensor> {
                        let t = t.contiguous()?.reshape((b * s, h, 1, d))?;
                        rope.apply(&t, &cos, &sin, false)?.reshape((b, s, h * d))
                    };
                    Ok::<_, candle_core::Error>((rotate(q, self.heads)?, rotate(k, self.kv_heads)?))
                },
            )?;
            return split(&q, &k);
        }
        let (q, k, v) = split(q, k)?;
        let (q, k) = timed(
            || "RoPE on q and k".to_string(),
            || {
                Ok::<_, candle_core::Error>((
                    rope.apply(&q, &cos, &sin, self.differentiable)?,
                    rope.apply(&k, &cos, &sin, self.differentiable)?,
                ))
            },
        )?;
        Ok((q, k, v))
    }

    /// Appends this call's keys and values to the slot; returns every present position's.
    /// A slot with absent positions (tokens that left before this layer) takes only
    /// one-token calls without a window: the keys it returns are then exactly those the
    /// query may see, with no mask.
    fn append(k: Tensor, v: Tensor, ctx: &AttnCtx, slot: &mut Slot) -> Result<(Tensor, Tensor)> {
        let end = slot.end()?;
        if end != ctx.start {
            candle_core::bail!(
                "KV slot accounts for {end} positions ({} stored, {} absent) but the call starts at position {}: a slot is appended to in order (truncate the cache to roll back)",
                end - slot.absent,
                slot.absent,
                ctx.start
            );
        }
        if slot.absent > 0 && (ctx.seq > 1 || ctx.key_mask.is_some()) {
            candle_core::bail!(
                "this layer's KV slot lacks {} positions (tokens that left earlier with their \
                 skipped keys and values absent); a call of {} tokens or with a key mask cannot \
                 attend over it (decode one token at a time, or fill skipped keys and values)",
                slot.absent,
                ctx.seq
            );
        }
        let (k, v) = match slot.kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        slot.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Writes keys and values computed from `x: [1, total, hidden]` (the layer's normed input)
    /// into each part's cache without attending: CALM's state copying fills the layers an
    /// exited token skipped from its exit hidden state.
    pub fn append_kv_ragged(
        &self,
        x: &Tensor,
        parts: &mut [RaggedPart<'_>],
        adapters: Adapters<'_>,
    ) -> Result<()> {
        let kv = self.qkv.forward_tail(x, 1)?;
        let (Some(k_all), Some(v_all)) = (kv.first(), kv.get(1)) else {
            candle_core::bail!("the fused projection has no key and value parts");
        };
        let k_all = &adapters.adapt(1, x, k_all.clone())?;
        let v_all = &adapters.adapt(2, x, v_all.clone())?;
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
        t.extend(self.o.tensors());
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
        cache: &mut Slot,
    ) -> Result<Tensor> {
        if cache.absent > 0 && self.window.is_some() {
            candle_core::bail!(
                "this layer's KV slot lacks {} positions (skipped keys and values absent); a \
                 sliding window counts positions, so it cannot attend over them",
                cache.absent
            );
        }
        let (q, k, v) = self.heads_with_rope(q, k, v, ctx)?;
        let (k, v) = timed(
            || "KV cache append (copy)".to_string(),
            || Self::append(k, v, ctx, cache),
        )?;
        if self.differentiable {
            return self.attend_repeated(&q, k, v, ctx);
        }
        self.attend_grouped(&q, &k, &v, ctx)
    }

    /// Attention with every key-value head copied to its query heads, scaled after the
    /// product: the training path (its ops carry gradients).
    fn attend_repeated(
        &self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        ctx: &mut AttnCtx,
    ) -> Result<Tensor> {
        let n_rep = self.heads / self.kv_heads;
        let k = repeat_kv(k, n_rep)?;
        let v = repeat_kv(v, n_rep)?;
        let (b, _, s, d) = q.dims4()?;
        let dtype = q.dtype();
        let mask = ctx.mask(self.causal, self.window, q.device())?;
        // A long causal call without padding runs in blocks of queries, each against the
        // keys up to its last query: the scores every query of a block masks are neither
        // computed nor differentiated (about half of them on a long row).
        let block = if self.causal && ctx.key_mask.is_none() && s > TRAIN_QUERY_BLOCK {
            TRAIN_QUERY_BLOCK
        } else {
            s
        };
        let keys_total = k.dim(2)?;
        let mut outs = Vec::with_capacity(s.div_ceil(block));
        let mut first = 0;
        while first < s {
            let rows = block.min(s - first);
            let keys = if rows < s {
                (ctx.start + first + rows).min(keys_total)
            } else {
                keys_total
            };
            let (qb, kb, vb) = if rows < s {
                (
                    q.narrow(2, first, rows)?,
                    k.narrow(2, 0, keys)?,
                    v.narrow(2, 0, keys)?,
                )
            } else {
                (q.clone(), k.clone(), v.clone())
            };
            let mut att = (qb.matmul(&kb.t()?)? * self.scale)?;
            if dtype != DType::F32 {
                att = att.to_dtype(DType::F32)?;
            }
            if let Some(mask) = &mask {
                let m = if rows < s {
                    mask.narrow(2, first, rows)?.narrow(3, 0, keys)?
                } else {
                    mask.clone()
                };
                att = att.broadcast_add(&m)?;
            }
            let att = candle_nn::ops::softmax(&att, candle_core::D::Minus1)?.to_dtype(dtype)?;
            outs.push(att.matmul(&vb.contiguous()?)?);
            first += rows;
        }
        let y = if outs.len() == 1 {
            outs.swap_remove(0)
        } else {
            Tensor::cat(&outs, 2)?
        };
        y.transpose(1, 2)?.reshape((b, s, self.heads * d))
    }

    /// Inference attention over `q: [batch, heads, seq, d]` and every cached position's
    /// `k, v: [batch, kv_heads, keys, d]`, without copying keys and values:
    /// - the query heads that share a key-value head are stacked along the query axis, so
    ///   one product per key-value head serves the whole group;
    /// - the scale multiplies q (seq × d values) rather than the scores (seq × keys);
    /// - a causal call of more than [`QUERY_BLOCK`] queries without padding runs in blocks
    ///   of queries, each against the keys up to its last query only: the scores of keys
    ///   every query of the block masks are never computed, and a block's scores stay small.
    ///
    /// Equal to [`Self::attend_repeated`] up to float rounding: the skipped keys' weights
    /// are exactly 0 there (masked with `f32::MIN` before the softmax).
    fn attend_grouped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &mut AttnCtx,
    ) -> Result<Tensor> {
        let (b, h, s, d) = q.dims4()?;
        let kv = self.kv_heads;
        let n_rep = h / kv;
        let keys_total = k.dim(2)?;
        let dtype = q.dtype();
        let q = (q * self.scale)?;
        let mask = ctx.mask(self.causal, self.window, q.device())?;
        let block = if self.causal && ctx.key_mask.is_none() && s > QUERY_BLOCK {
            QUERY_BLOCK
        } else {
            s
        };
        let mut outs = Vec::with_capacity(s.div_ceil(block));
        let mut first = 0;
        while first < s {
            let rows = block.min(s - first);
            let keys = if rows < s {
                (ctx.start + first + rows).min(keys_total)
            } else {
                keys_total
            };
            let qb = if rows < s {
                q.narrow(2, first, rows)?.contiguous()?
            } else {
                q.clone()
            };
            let qb = qb.reshape((b, kv, n_rep * rows, d))?;
            let (kb, vb) = if keys < keys_total {
                (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?)
            } else {
                (k.clone(), v.clone())
            };
            let mut att = timed(
                || format!("attention q·kᵀ, q {} (keys vary)", shape(&qb)),
                || qb.matmul(&kb.t()?),
            )?;
            if dtype != DType::F32 {
                att = att.to_dtype(DType::F32)?;
            }
            if let Some(m) = &mask {
                // A padding-only mask has one row for every query.
                let m = if m.dim(2)? == 1 {
                    m.narrow(3, 0, keys)?
                } else {
                    m.narrow(2, first, rows)?.narrow(3, 0, keys)?
                };
                let m = m.reshape((m.dim(0)?, 1, 1, m.dim(2)?, keys))?;
                att = timed(
                    || "attention mask add".to_string(),
                    || {
                        att.reshape((b, kv, n_rep, rows, keys))?
                            .broadcast_add(&m)?
                            .reshape((b, kv, n_rep * rows, keys))
                    },
                )?;
            }
            let att = timed(
                || "softmax".to_string(),
                || softmax_rows(&att, mask.is_some())?.to_dtype(dtype),
            )?;
            outs.push(timed(
                || format!("attention weights·v, rows {} (keys vary)", n_rep * rows),
                || att.matmul(&vb)?.reshape((b, h, rows, d)),
            )?);
            first += rows;
        }
        timed(
            || "heads back to rows (copy)".to_string(),
            || {
                let y = if outs.len() == 1 {
                    outs.swap_remove(0)
                } else {
                    Tensor::cat(&outs, 2)?
                };
                y.transpose(1, 2)?.reshape((b, s, h * d))
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use proptest::prelude::*;

    fn kernel(
        heads: usize,
        kv_heads: usize,
        d: usize,
        causal: bool,
        window: Option<usize>,
    ) -> AttentionKernel {
        let dev = Device::Cpu;
        let w = |o: usize, i: usize| Tensor::zeros((o, i), DType::F32, &dev);
        let hidden = heads * d;
        AttentionKernel {
            qkv: FusedLinear::separate(vec![(
                w(hidden, hidden).unwrap_or_else(|e| panic!("{e}")),
                None,
            )]),
            o: Dense::source(w(hidden, hidden).unwrap_or_else(|e| panic!("{e}")), None),
            heads,
            kv_heads,
            head_dim: d,
            scale: 1.0 / (d as f64).sqrt(),
            causal,
            window,
            rope: None,
            differentiable: false,
        }
    }

    /// Random `[b, h, s, d]` values in [-2, 2) from a small linear congruential stream.
    fn values(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Both attention paths on the same q, k, v; returns the largest difference.
    #[allow(clippy::too_many_arguments)]
    fn max_diff(
        heads: usize,
        kv_heads: usize,
        d: usize,
        batch: usize,
        start: usize,
        seq: usize,
        causal: bool,
        window: Option<usize>,
        pad: usize,
        seed: u64,
    ) -> Result<f32> {
        let k = kernel(heads, kv_heads, d, causal, window);
        let keys = start + seq;
        let q = values((batch, heads, seq, d), seed);
        let kk = values((batch, kv_heads, keys, d), seed + 1);
        let v = values((batch, kv_heads, keys, d), seed + 2);
        // Left padding of the last sequence in the batch.
        let key_mask = (pad > 0).then(|| {
            let mut m = vec![1f32; batch * keys];
            for slot in m
                .iter_mut()
                .skip((batch - 1) * keys)
                .take(pad.min(keys - 1))
            {
                *slot = 0.0;
            }
            Tensor::from_vec(m, (batch, keys), &Device::Cpu)
        });
        let key_mask = key_mask.transpose()?;
        let mut ctx = AttnCtx::new(start, seq, key_mask.clone());
        let a = k.attend_repeated(&q, kk.clone(), v.clone(), &mut ctx)?;
        let mut ctx = AttnCtx::new(start, seq, key_mask);
        let b = k.attend_grouped(&q, &kk, &v, &mut ctx)?;
        assert_eq!(a.dims(), b.dims());
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The training path's query blocks against a direct softmax over the whole masked
    /// score matrix, written here: causal, 600 queries (blocks of 256, the last shorter),
    /// grouped heads, with and without example ids splitting each row in two.
    #[test]
    fn blocked_training_attention_equals_a_direct_softmax() -> Result<()> {
        const _: () = assert!(600 > 4 * TRAIN_QUERY_BLOCK);
        let (heads, kv_heads, d, batch, seq) = (4, 2, 8, 2, 600);
        let k = kernel(heads, kv_heads, d, true, None);
        let q = values((batch, heads, seq, d), 21);
        let kk = values((batch, kv_heads, seq, d), 22);
        let v = values((batch, kv_heads, seq, d), 23);
        let split = [200usize, 450];
        for with_examples in [false, true] {
            let mut ctx = AttnCtx::new(0, seq, None);
            let mut examples = Vec::new();
            for &at in &split {
                examples.extend((0..seq).map(|i| u32::from(i >= at)));
            }
            if with_examples {
                ctx = ctx.with_examples(batch, examples.clone())?;
            }
            let got = k.attend_repeated(&q, kk.clone(), v.clone(), &mut ctx)?;
            // Direct: every key-value head copied to its queries, one masked softmax.
            let rep = |t: &Tensor| -> Result<Tensor> {
                let parts: Vec<Tensor> = (0..heads)
                    .map(|h| t.narrow(1, h / (heads / kv_heads), 1))
                    .collect::<Result<_>>()?;
                Tensor::cat(&parts, 1)
            };
            let scores = (q.matmul(&rep(&kk)?.t()?)? * k.scale)?;
            let mut mask = Vec::with_capacity(batch * seq * seq);
            for row in 0..batch {
                for i in 0..seq {
                    for j in 0..seq {
                        let same =
                            !with_examples || examples[row * seq + i] == examples[row * seq + j];
                        mask.push(if j <= i && same {
                            0f32
                        } else {
                            f32::NEG_INFINITY
                        });
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (batch, 1, seq, seq), &Device::Cpu)?;
            let weights =
                candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, candle_core::D::Minus1)?;
            let want =
                weights
                    .matmul(&rep(&v)?)?
                    .transpose(1, 2)?
                    .reshape((batch, seq, heads * d))?;
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "examples {with_examples}: {diff}");
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Invariant: a small call of several tokens, rotated before the head split with each
        /// token a row of its own, gives bitwise the q, k and v of splitting first and rotating
        /// every head over all its positions (the path large calls take), for full and partial
        /// rotation, grouped key-value heads and batches of more than one row.
        #[test]
        fn rope_per_token_equals_rope_per_head_bitwise(
            kv_heads in 1usize..3,
            group in 1usize..3,
            half_d in 2usize..9,
            partial in any::<bool>(),
            batch in 1usize..3,
            start in 0usize..40,
            seq in 2usize..7,
            seed in 0u64..500,
        ) {
            let heads = kv_heads * group;
            let d = 2 * half_d;
            let rotary_dim = if partial && half_d % 2 == 0 { half_d } else { d };
            let rope = exitgraph_ir::op::Rope {
                theta: 10000.0,
                scaling: exitgraph_ir::op::RopeScaling::Default,
                rotary_dim,
            };
            let mut k = kernel(heads, kv_heads, d, true, None);
            k.rope = Some((0, RopeKernel::new(&rope, &Device::Cpu)?));
            let rows = |h: usize, salt: u64| -> Result<Tensor> {
                values((batch, seq, h, d), seed * 3 + salt).reshape((batch, seq, h * d))
            };
            // q a view into a wider projection, as the fused q/k/v output is.
            let wide = values((batch, seq, heads + 1, d), seed * 3 + 3)
                .reshape((batch, seq, (heads + 1) * d))?;
            let q = wide.narrow(2, d, heads * d)?;
            let (kk, v) = (rows(kv_heads, 1)?, rows(kv_heads, 2)?);
            // The call takes the per-token path (a small call of several tokens)...
            prop_assert!(k.rotates_per_token(&q));
            // ...which training's differentiable ops never do.
            k.differentiable = true;
            prop_assert!(!k.rotates_per_token(&q));
            k.differentiable = false;
            let mut ctx = AttnCtx::new(start, seq, None);
            let (gq, gk, gv) = k.heads_with_rope(&q, &kk, &v, &mut ctx)?;
            // Split first, then rotate all positions of each head at once.
            let (cos, sin) = RopeKernel::new(&rope, &Device::Cpu)?.tables(start, seq, DType::F32)?;
            let split = |t: &Tensor, h: usize| -> Result<Tensor> {
                t.reshape((batch, seq, h, d))?.transpose(1, 2)?.contiguous()
            };
            let rope_k = k.rope.as_ref().map(|r| &r.1).ok_or_else(|| {
                candle_core::Error::Msg("no rope".into())
            })?;
            let wq = rope_k.apply(&split(&q, heads)?, &cos, &sin, false)?;
            let wk = rope_k.apply(&split(&kk, kv_heads)?, &cos, &sin, false)?;
            let wv = split(&v, kv_heads)?;
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
            };
            prop_assert_eq!(gq.dims(), wq.dims());
            prop_assert_eq!(bits(&gq)?, bits(&wq)?);
            prop_assert_eq!(bits(&gk)?, bits(&wk)?);
            prop_assert_eq!(bits(&gv)?, bits(&wv)?);
            // The rotation did something: every call of two or more tokens rotates a position
            // past 0.
            prop_assert_ne!(bits(&gq)?, bits(&split(&q, heads)?)?);
        }
    }

    #[test]
    fn grouped_blocks_equal_repeated_heads_on_a_long_causal_prefill() -> Result<()> {
        // 300 queries after 5 cached positions: query blocks of QUERY_BLOCK (the last one
        // shorter), each against only the keys up to its last query; 6 query heads share 2
        // key-value heads.
        const _: () = assert!(300 > 2 * QUERY_BLOCK);
        let diff = max_diff(6, 2, 8, 2, 5, 300, true, None, 0, 7)?;
        assert!(diff < 1e-5, "{diff}");
        // A sliding window and a single decode step.
        let diff = max_diff(4, 1, 8, 1, 40, 200, true, Some(33), 0, 8)?;
        assert!(diff < 1e-5, "{diff}");
        let diff = max_diff(4, 2, 8, 2, 250, 1, true, None, 0, 9)?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Invariant: inference attention (grouped heads without copies, the scale on q,
        /// causal query blocks) equals attention with repeated key-value heads, for any
        /// head grouping, cached prefix, call length, mask kind and padding.
        #[test]
        fn grouped_attention_equals_repeated(
            (heads, kv_heads) in prop_oneof![Just((1, 1)), Just((2, 1)), Just((4, 2)), Just((6, 3)), Just((6, 1))],
            d in prop_oneof![Just(4usize), Just(8)],
            batch in 1usize..3,
            start in 0usize..24,
            seq in prop_oneof![1usize..8, 120usize..300],
            causal in any::<bool>(),
            window in prop_oneof![Just(None), (1usize..64).prop_map(Some)],
            pad in prop_oneof![Just(0usize), 1usize..6],
            seed in 0u64..1000,
        ) {
            let diff = max_diff(heads, kv_heads, d, batch, start, seq, causal, window, pad, seed)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(diff < 1e-5, "max difference {}", diff);
        }
    }
}
