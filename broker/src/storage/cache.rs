//! The shard's cache of recent record batches, used instead of the kernel page cache (our files
//! are O_DIRECT). Each partition keeps a contiguous suffix of its log in memory. A batch not yet
//! written to disk is the only copy: it is cached at append but enters the shard's eviction
//! queue only once written (`admit_written`), so eviction never meets a batch it must keep and a
//! partition whose writes stall cannot stop eviction of the others. Written batches are evicted
//! oldest append first while they and the unwritten ones exceed the shard's share of
//! `--cache-bytes`; unwritten ones are bounded by the shard's pending-bytes backpressure (a
//! quarter of the share, at least 8 MiB), so together they stay within the share.
//!
//! Append order, not write order: each partition's write is its own task, so a slow write lets
//! other partitions' later batches be written (and admitted) first. Evicted in write order, the
//! slow partition's batches would then stay cached for a whole turn of the cache, each holding
//! its arena chunk (`storage/arena.rs`) while the chunk's other batches were long gone: the
//! arena measured cache + 8 MiB in CI. Evicted in append order, they are the next to go once
//! written, and chunks free in the order they were filled.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use bytes::Bytes;

#[derive(Clone)]
pub struct CachedBatch {
    pub base: i64,
    pub last: i64,
    pub bytes: Bytes,
    /// The shard's append sequence number (`ShardCache::insert`): the eviction order.
    seq: u64,
}

/// One partition's cached suffix of the log: batches in offset order, no gaps.
#[derive(Default)]
pub struct PartitionCache {
    batches: VecDeque<CachedBatch>,
    /// The first offset not yet handed to the shard's eviction queue (every batch below it that
    /// is still cached is in the queue; batches from it on are unwritten).
    admitted_end: Option<i64>,
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

    /// Only through `ShardCache::insert`, which gives the batch its append sequence number.
    fn push(&mut self, b: CachedBatch) {
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

    /// Bytes of cached batches not yet admitted to the eviction queue (unwritten).
    pub fn unadmitted_bytes(&self) -> usize {
        let from = self.admitted_end.unwrap_or(i64::MIN);
        let i = self.batches.partition_point(|b| b.base < from);
        self.batches.range(i..).map(|b| b.bytes.len()).sum()
    }
}

/// What one cached batch costs besides its bytes, counted against the cache's limit: its
/// `CachedBatch` (56 bytes) in a VecDeque that may be twice the size it needs, its eviction
/// queue entry (32 bytes, the same), and the shared header behind its `Bytes` with its
/// allocation (about 48). So `--cache-bytes` bounds the cache's bookkeeping too: with the 2 KB
/// batches of many small producers that is 10% of the cache, which was memory outside the limit.
pub const BATCH_OVERHEAD_BYTES: usize = 224;

/// The bytes a cached batch of `len` bytes counts for.
fn cost(len: usize) -> usize {
    len + BATCH_OVERHEAD_BYTES
}

/// Shard-wide accounting and eviction order.
pub struct ShardCache {
    pub limit_bytes: usize,
    /// Bytes of the written batches in the eviction queue, each with BATCH_OVERHEAD_BYTES.
    pub bytes: usize,
    /// (append sequence number, partition id, batch base offset, cost) of written batches,
    /// oldest append first. Within a partition, sequence numbers grow with offsets, so its
    /// entry that comes out first is always its front cached batch.
    queue: BinaryHeap<Reverse<(u64, u64, i64, usize)>>,
    /// The sequence number of the next inserted batch.
    next_seq: u64,
}

/// What happened to the oldest queued batch during eviction.
pub enum Evicted {
    /// The partition is gone: the entry just leaves the accounting.
    Gone,
    /// The batch has left memory (`PartitionCache::pop_front_if`).
    Dropped,
}

impl ShardCache {
    pub fn new(limit_bytes: usize) -> ShardCache {
        ShardCache {
            limit_bytes,
            bytes: 0,
            queue: BinaryHeap::new(),
            next_seq: 0,
        }
    }

    /// Caches a just-appended (unwritten) batch, offsets `base..=last`, in its partition; it
    /// joins the eviction queue when written.
    pub fn insert(&mut self, cache: &mut PartitionCache, base: i64, last: i64, bytes: Bytes) {
        let b = CachedBatch {
            base,
            last,
            bytes,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        if cache.admitted_end.is_none() {
            cache.admitted_end = Some(b.base);
        }
        cache.push(b);
    }

    /// Hands the partition's cached batches that are now written (below `written_offset`) to
    /// the eviction queue. O(batches admitted x log(queue length)).
    pub fn admit_written(
        &mut self,
        partition_id: u64,
        cache: &mut PartitionCache,
        written_offset: i64,
    ) {
        let Some(from) = cache.admitted_end else {
            return;
        };
        let i = cache.batches.partition_point(|b| b.base < from);
        let mut end = from;
        for b in cache.batches.range(i..) {
            if b.last >= written_offset {
                break;
            }
            self.bytes += cost(b.bytes.len());
            self.queue
                .push(Reverse((b.seq, partition_id, b.base, cost(b.bytes.len()))));
            end = b.last + 1;
        }
        cache.admitted_end = Some(end);
    }

    /// Drops a partition's cached batches and their queue entries (its log was truncated).
    /// O(queue length); truncation is rare.
    pub fn forget(&mut self, partition_id: u64, cache: &mut PartitionCache) {
        let mut released = 0;
        self.queue.retain(|&Reverse((_, pid, _, len))| {
            if pid == partition_id {
                released += len;
                false
            } else {
                true
            }
        });
        self.bytes -= released;
        *cache = PartitionCache::default();
    }

    /// Evicts the oldest appended written batches while they and `unwritten_bytes` (the
    /// shard's unwritten batches, also cached) exceed the limit; `evict_one(partition, base)`
    /// drops one batch. Bounded by the queue's length.
    pub fn evict(
        &mut self,
        unwritten_bytes: usize,
        mut evict_one: impl FnMut(u64, i64) -> Evicted,
    ) {
        while self.bytes + unwritten_bytes > self.limit_bytes {
            let Some(Reverse((_, pid, base, len))) = self.queue.pop() else {
                return;
            };
            match evict_one(pid, base) {
                Evicted::Gone | Evicted::Dropped => {}
            }
            self.bytes -= len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Caches a batch of `n` offsets from `base`, `len` bytes.
    fn insert(shard: &mut ShardCache, p: &mut PartitionCache, base: i64, n: i64, len: usize) {
        shard.insert(p, base, base + n - 1, Bytes::from(vec![0u8; len]));
    }

    #[test]
    fn read_and_evict_in_order() {
        // Each 100-byte batch costs `c`; the limit holds two and a half.
        let c = cost(100);
        let mut shard = ShardCache::new(2 * c + c / 2);
        let mut p = PartitionCache::default();
        for i in 0..4 {
            insert(&mut shard, &mut p, i * 10, 10, 100);
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
        // Nothing written: nothing is in the eviction queue, nothing can be evicted.
        assert_eq!(shard.bytes, 0);
        assert_eq!(p.unadmitted_bytes(), 400);
        let drop_front = |p: &mut PartitionCache, base: i64| {
            assert!(p.pop_front_if(base));
            Evicted::Dropped
        };
        shard.evict(0, |_, base| drop_front(&mut p, base));
        assert_eq!(p.start(40), 0);
        // The first three are written: eviction takes the oldest until under the limit.
        shard.admit_written(1, &mut p, 30);
        assert_eq!(shard.bytes, 3 * c);
        assert_eq!(p.unadmitted_bytes(), 100);
        shard.evict(0, |_, base| drop_front(&mut p, base));
        assert_eq!(shard.bytes, 2 * c);
        assert_eq!(p.start(40), 10);
        // Admitting again is idempotent for what was admitted.
        shard.admit_written(1, &mut p, 30);
        assert_eq!(shard.bytes, 2 * c);
        shard.admit_written(1, &mut p, 40);
        assert_eq!(shard.bytes, 3 * c);
        shard.evict(0, |_, base| drop_front(&mut p, base));
        assert_eq!(shard.bytes, 2 * c);
        assert_eq!(p.start(40), 20);
        // Unwritten batches count against the limit: room for one more unwritten batch
        // evicts a written one.
        shard.evict(c, |_, base| drop_front(&mut p, base));
        assert_eq!(shard.bytes, c);
        assert_eq!(p.start(40), 30);
        // Entries of a deleted partition are dropped.
        shard.limit_bytes = 0;
        shard.evict(0, |_, _| Evicted::Gone);
        assert_eq!(shard.bytes, 0);
    }

    /// A partition whose write completed late still has its batches evicted in the order they
    /// were appended, before other partitions' later batches that were written first (in write
    /// order they outlived those by a whole turn of the cache, pinning their arena chunks).
    #[test]
    fn eviction_follows_append_order_across_partitions() {
        let c = cost(100);
        let mut shard = ShardCache::new(100 * c);
        let (mut slow, mut fast) = (PartitionCache::default(), PartitionCache::default());
        // Appended alternately: slow 0, fast 0, slow 10, fast 10, ...
        for i in 0..4 {
            insert(&mut shard, &mut slow, i * 10, 10, 100);
            insert(&mut shard, &mut fast, i * 10, 10, 100);
        }
        // The fast partition's write completes first, the slow one's after it.
        shard.admit_written(2, &mut fast, 40);
        shard.admit_written(1, &mut slow, 40);
        let mut order = Vec::new();
        shard.limit_bytes = 4 * c;
        shard.evict(0, |pid, base| {
            let p = if pid == 1 { &mut slow } else { &mut fast };
            assert!(
                p.pop_front_if(base),
                "the oldest queued batch is its partition's front"
            );
            order.push((pid, base));
            Evicted::Dropped
        });
        assert_eq!(order, vec![(1, 0), (2, 0), (1, 10), (2, 10)]);
        assert_eq!(shard.bytes, 4 * c);
        assert_eq!((slow.start(40), fast.start(40)), (20, 20));
    }
}
