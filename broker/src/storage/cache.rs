//! The shard's cache of recent record batches, used instead of the kernel page cache (our files
//! are O_DIRECT). Each partition keeps a contiguous suffix of its log in memory; the shard keeps
//! one FIFO over all partitions in append order and evicts from its front while the total is
//! over `--cache-bytes`. A batch not yet written to disk is never evicted: it is the only copy.

use std::collections::VecDeque;

use bytes::Bytes;

#[derive(Clone)]
pub struct CachedBatch {
    pub base: i64,
    pub last: i64,
    pub bytes: Bytes,
}

/// One partition's cached suffix of the log: batches in offset order, no gaps.
#[derive(Default)]
pub struct PartitionCache {
    batches: VecDeque<CachedBatch>,
}

impl PartitionCache {
    /// The first offset served from memory. With nothing cached, everything below the log end
    /// is on disk.
    pub fn start(&self, log_end_offset: i64) -> i64 {
        self.batches
            .front()
            .map(|b| b.base)
            .unwrap_or(log_end_offset)
    }

    pub fn push(&mut self, b: CachedBatch) {
        debug_assert!(
            self.batches.back().is_none_or(|l| l.last + 1 == b.base),
            "cache must stay contiguous"
        );
        self.batches.push_back(b);
    }

    /// Batches from the one holding `offset`: at least one, then up to `max_bytes` in all.
    pub fn read(&self, offset: i64, max_bytes: usize) -> Vec<Bytes> {
        let i = self.batches.partition_point(|b| b.last < offset);
        let mut out = Vec::new();
        let mut total = 0usize;
        for b in self.batches.range(i..) {
            if !out.is_empty() && total + b.bytes.len() > max_bytes {
                break;
            }
            total += b.bytes.len();
            out.push(b.bytes.clone());
        }
        out
    }

    /// Finds a batch for a timestamp scan: the cached batches from `offset` on.
    pub fn iter_from(&self, offset: i64) -> impl Iterator<Item = &CachedBatch> {
        let i = self.batches.partition_point(|b| b.last < offset);
        self.batches.range(i..)
    }

    pub fn pop_front_if(&mut self, base: i64) -> bool {
        if self.batches.front().is_some_and(|b| b.base == base) {
            self.batches.pop_front();
            true
        } else {
            false
        }
    }

    pub fn front_base(&self) -> Option<i64> {
        self.batches.front().map(|b| b.base)
    }
}

/// Shard-wide accounting and eviction order.
pub struct ShardCache {
    pub limit_bytes: usize,
    pub bytes: usize,
    /// (partition id, batch base offset, batch bytes) in append order.
    fifo: VecDeque<(u64, i64, usize)>,
}

/// What happened to the front FIFO entry during eviction.
pub enum Evicted {
    /// The partition is gone: the entry just leaves the accounting.
    Gone,
    /// The batch was on disk and has left memory (`PartitionCache::pop_front_if`).
    Dropped,
    /// Not yet on disk: eviction must wait for the flusher.
    Pinned,
}

impl ShardCache {
    pub fn new(limit_bytes: usize) -> ShardCache {
        ShardCache {
            limit_bytes,
            bytes: 0,
            fifo: VecDeque::new(),
        }
    }

    pub fn insert(&mut self, partition_id: u64, cache: &mut PartitionCache, b: CachedBatch) {
        self.bytes += b.bytes.len();
        self.fifo.push_back((partition_id, b.base, b.bytes.len()));
        cache.push(b);
    }

    pub fn over_limit(&self) -> bool {
        self.bytes > self.limit_bytes
    }

    /// Evicts from the front while over the limit; `evict_one(partition, base)` drops one
    /// batch. Returns false when it stopped at a batch not yet written (the caller flushes and
    /// applies backpressure).
    pub fn evict(&mut self, mut evict_one: impl FnMut(u64, i64) -> Evicted) -> bool {
        while self.bytes > self.limit_bytes {
            let Some(&(pid, base, len)) = self.fifo.front() else {
                return true;
            };
            if let Evicted::Pinned = evict_one(pid, base) {
                return false;
            }
            self.fifo.pop_front();
            self.bytes -= len;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(base: i64, n: i64, len: usize) -> CachedBatch {
        CachedBatch {
            base,
            last: base + n - 1,
            bytes: Bytes::from(vec![0u8; len]),
        }
    }

    #[test]
    fn read_and_evict_in_order() {
        let mut shard = ShardCache::new(250);
        let mut p = PartitionCache::default();
        for i in 0..4 {
            shard.insert(1, &mut p, b(i * 10, 10, 100));
        }
        assert_eq!(p.read(15, 200).len(), 2);
        assert_eq!(p.read(15, 150).len(), 1);
        assert_eq!(
            p.read(15, 1).len(),
            1,
            "at least one batch even above max_bytes"
        );
        assert_eq!(p.read(40, 1000).len(), 0);
        assert_eq!(p.start(40), 0);
        // Only the first batch is written: eviction stops at the second.
        let written_below = 10;
        let evict = |p: &mut PartitionCache, base: i64, written: i64| {
            if base < written {
                assert!(p.pop_front_if(base));
                Evicted::Dropped
            } else {
                Evicted::Pinned
            }
        };
        assert!(!shard.evict(|_, base| evict(&mut p, base, written_below)));
        assert_eq!(shard.bytes, 300);
        assert_eq!(p.start(40), 10);
        assert!(shard.evict(|_, base| evict(&mut p, base, 40)));
        assert_eq!(shard.bytes, 200);
        assert_eq!(p.start(40), 20);
        // Entries of a deleted partition are dropped.
        shard.limit_bytes = 0;
        assert!(shard.evict(|_, _| Evicted::Gone));
        assert_eq!(shard.bytes, 0);
    }
}
