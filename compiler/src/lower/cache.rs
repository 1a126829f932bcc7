//! Inference state: the KV cache of one sequence (or one padded batch), one entry per slot.
//!
//! Each slot holds the keys and values its attention wrote, `[batch, kv_heads, positions,
//! head_dim]`; slots may hold different numbers of positions (SkipDecode bypasses middle
//! layers; a stage-wise step fills the lower slots first). `len` is the number of positions
//! committed: where the next call starts unless the caller says otherwise. A cache can be
//! rolled back ([`KvCache::truncate`]) and forked ([`KvCache::fork`]); tensors are shared
//! copy-on-write, so a fork costs nothing until one side appends.

use candle_core::{Result, Tensor};

#[derive(Clone, Default)]
pub struct KvCache {
    slots: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache with `slots` slots.
    pub fn with_slots(slots: usize) -> Self {
        KvCache {
            slots: vec![None; slots],
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

    /// Keys and values `[batch, kv_heads, positions, head_dim]` of slot `i`.
    pub fn slot(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.slots.get(i).and_then(Option::as_ref)
    }

    /// Slot `i`, for a kernel to append to.
    pub(crate) fn slot_mut(&mut self, i: usize) -> Result<&mut Option<(Tensor, Tensor)>> {
        let n = self.slots.len();
        self.slots.get_mut(i).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "KV slot {i} does not exist (the cache has {n} slots)"
            ))
        })
    }

    /// Marks `n` positions as committed.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len = n;
    }

    /// Rolls back to the first `n` positions: every slot keeps at most `n`, and at most `n`
    /// are committed. Appending after a truncate is exactly as if the dropped positions had
    /// never been appended.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        for slot in &mut self.slots {
            let Some((k, v)) = slot.as_ref() else {
                continue;
            };
            let have = k.dim(2)?;
            if have <= n {
                continue;
            }
            *slot = if n == 0 {
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
