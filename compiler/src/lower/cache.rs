//! Inference state: the KV cache of one sequence (or one padded batch), one entry per slot.
//!
//! Each slot holds the keys and values its attention wrote, `[batch, kv_heads, positions,
//! head_dim]`; slots may hold different numbers of positions (SkipDecode bypasses middle
//! layers; a stage-wise step fills the lower slots first). `len` is the number of positions
//! committed: where the next call starts unless the caller says otherwise. A cache can be
//! rolled back ([`KvCache::truncate`]) and forked ([`KvCache::fork`]); tensors are shared
//! copy-on-write, so a fork costs nothing until one side appends.
//!
//! A slot may also lack positions on purpose: a token that left early with its skipped
//! layers' keys and values *absent* ([`KvCache::leave_absent`]) is counted in those slots
//! but stored in none of them, so later tokens attend there only to the positions present
//! (Mixture-of-Recursions' recursion-wise caching). Keys keep the rotary position of the
//! token they came from, so attention over the present ones is exact.

use candle_core::{Result, Tensor};

/// One attention place's keys and values.
#[derive(Clone, Default)]
pub(crate) struct Slot {
    /// `[batch, kv_heads, present positions, head_dim]`, in position order.
    pub(crate) kv: Option<(Tensor, Tensor)>,
    /// Positions counted in the slot without keys and values in it.
    pub(crate) absent: usize,
}

impl Slot {
    /// Positions the slot stores.
    pub(crate) fn present(&self) -> Result<usize> {
        self.kv.as_ref().map_or(Ok(0), |(k, _)| k.dim(2))
    }

    /// Positions the slot accounts for, present or absent: the position of the next token
    /// appended to it.
    pub(crate) fn end(&self) -> Result<usize> {
        Ok(self.present()? + self.absent)
    }
}

#[derive(Clone, Default)]
pub struct KvCache {
    slots: Vec<Slot>,
    len: usize,
}

impl KvCache {
    /// An empty cache with `slots` slots.
    pub fn with_slots(slots: usize) -> Self {
        KvCache {
            slots: vec![Slot::default(); slots],
            len: 0,
        }
    }

    /// Positions committed (tokens per sequence in the cache).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Positions slot `i` holds.
    pub fn slot_len(&self, i: usize) -> usize {
        self.slot(i).and_then(|(k, _)| k.dim(2).ok()).unwrap_or(0)
    }

    /// Positions slot `i` counts without holding their keys and values (tokens that left
    /// before its layer with their skipped keys and values absent).
    pub fn absent(&self, i: usize) -> usize {
        self.slots.get(i).map_or(0, |s| s.absent)
    }

    /// Whether any slot counts positions it does not hold.
    pub fn has_absent(&self) -> bool {
        self.slots.iter().any(|s| s.absent > 0)
    }

    /// Keys and values `[batch, kv_heads, positions, head_dim]` of slot `i`.
    pub fn slot(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.slots.get(i).and_then(|s| s.kv.as_ref())
    }

    /// Slot `i`, for a kernel to append to.
    pub(crate) fn slot_mut(&mut self, i: usize) -> Result<&mut Slot> {
        let n = self.slots.len();
        self.slots.get_mut(i).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "KV slot {i} does not exist (the cache has {n} slots)"
            ))
        })
    }

    /// Checks that absent positions starting at `start` may be counted in slot `i`: the slot
    /// exists and accounts for exactly the positions before `start`.
    pub(crate) fn check_absent(&self, i: usize, start: usize) -> Result<()> {
        let n = self.slots.len();
        let slot = self.slots.get(i).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "KV slot {i} does not exist (the cache has {n} slots)"
            ))
        })?;
        let end = slot.end()?;
        if end != start {
            candle_core::bail!(
                "KV slot {i} accounts for {end} positions but the absent ones start at position \
                 {start}: a slot is appended to in order"
            );
        }
        Ok(())
    }

    /// Counts `n` more positions in slot `i` without keys and values (a token that left
    /// before the slot's layer, its skipped keys and values absent); check first with
    /// [`KvCache::check_absent`]. A slot that does not exist is left alone.
    pub(crate) fn leave_absent(&mut self, i: usize, n: usize) {
        if let Some(slot) = self.slots.get_mut(i) {
            slot.absent += n;
        }
    }

    /// Marks `n` positions as committed.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len = n;
    }

    /// Rolls back to the first `n` positions: every slot keeps at most `n`, and at most `n`
    /// are committed. Appending after a truncate is exactly as if the dropped positions had
    /// never been appended. A slot with absent positions cannot be rolled back (which of
    /// its stored positions are below `n` is not recorded); that is an error.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.absent > 0 && slot.end()? > n {
                candle_core::bail!(
                    "KV slot {i} has {} absent positions (skipped keys and values): it cannot \
                     be rolled back to position {n}",
                    slot.absent
                );
            }
        }
        for slot in &mut self.slots {
            let Some((k, v)) = slot.kv.as_ref() else {
                continue;
            };
            let have = k.dim(2)?;
            if have <= n {
                continue;
            }
            slot.kv = if n == 0 {
                None
            } else {
                Some((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?))
            };
        }
        self.len = self.len.min(n);
        Ok(())
    }

    /// An independent copy: appending to one leaves the other as it was.
    pub fn fork(&self) -> KvCache {
        self.clone()
    }
}
