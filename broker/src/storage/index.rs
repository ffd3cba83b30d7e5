//! Sparse offset index and time index of one segment, in Kafka's file formats:
//!
//! ```text
//! <base>.index       entries of 8 bytes:  | relative offset u32 BE | file position u32 BE |
//! <base>.timeindex   entries of 12 bytes: | max timestamp i64 BE   | relative offset u32 BE |
//! ```
//!
//! One entry is added per `index.interval.bytes` of log written. Both live in memory for the
//! active segment and are written out whole when a segment rolls and at clean shutdown; after an
//! unclean stop the active segment's indexes are rebuilt while its tail is scanned. Only the
//! newest DENSE_TAIL_ENTRIES of the active segment keep that density in memory (and so in the
//! files written from it); older entries, and sealed segments' entries, are thinned to one per
//! THINNED_STRIDE_BYTES, and readers scan forward from the entry they find.

/// At most this many entries per index: Kafka's segment.index.bytes default (10 MiB) / 8.
/// The segment rolls when either index is full.
pub const INDEX_ENTRIES_MAX: usize = 10 * 1024 * 1024 / 8;
/// One offset entry per this many bytes of log is what a thinned index keeps in memory: every
/// sealed segment, and the older part of the active one.
pub const THINNED_STRIDE_BYTES: u32 = 256 << 10;
/// The active segment keeps at least its newest this many entries at full density (every
/// `index.interval.bytes`); when it holds twice as many, the older ones are thinned. So the
/// active segment's in-memory index is at most about 24 bytes x (2 x this + segment bytes /
/// THINNED_STRIDE_BYTES): about 147 KiB per partition for a 1 GiB segment, however small its
/// batches. Without the bound it grew with the segment's batch count (24 bytes per batch).
pub const DENSE_TAIL_ENTRIES: usize = 1024;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct SegmentIndex {
    /// (relative offset, position), strictly increasing in both.
    pub offsets: Vec<(u32, u32)>,
    /// (max timestamp so far, relative offset), strictly increasing timestamps.
    pub times: Vec<(i64, u32)>,
    bytes_since_entry: u64,
}

impl SegmentIndex {
    /// Records a batch appended at `position` in the segment. Entries are sparse: one per
    /// `interval_bytes` written.
    pub fn on_append(
        &mut self,
        rel_offset: u32,
        position: u32,
        batch_bytes: u32,
        max_ts: i64,
        interval_bytes: u32,
    ) {
        if self.bytes_since_entry >= interval_bytes as u64 || self.offsets.is_empty() {
            if self
                .offsets
                .last()
                .is_none_or(|&(o, p)| o < rel_offset && p < position)
            {
                self.offsets.push((rel_offset, position));
            }
            if self.times.last().is_none_or(|&(t, _)| max_ts > t) {
                self.times.push((max_ts, rel_offset));
            }
            self.bytes_since_entry = 0;
            if self.offsets.len() >= 2 * DENSE_TAIL_ENTRIES {
                self.thin_older(THINNED_STRIDE_BYTES, DENSE_TAIL_ENTRIES);
            }
        }
        self.bytes_since_entry += batch_bytes as u64;
    }

    /// Thins all but the newest `keep_dense` offset entries (and the time entries before the
    /// first of those) as `thin` does. Lookups stay at or before the exact answer; the newest
    /// part of the segment, where tail readers are, keeps its full density.
    pub fn thin_older(&mut self, stride_bytes: u32, keep_dense: usize) {
        if self.offsets.len() <= keep_dense {
            return;
        }
        let cut = self.offsets.len() - keep_dense;
        let dense_from = self.offsets[cut].0;
        let times_cut = self.times.partition_point(|&(_, o)| o < dense_from);
        let mut older = SegmentIndex {
            offsets: self.offsets[..cut].to_vec(),
            times: self.times[..times_cut].to_vec(),
            bytes_since_entry: 0,
        };
        older.thin(stride_bytes);
        older.offsets.extend_from_slice(&self.offsets[cut..]);
        older.times.extend_from_slice(&self.times[times_cut..]);
        self.offsets = older.offsets;
        self.times = older.times;
    }

    pub fn is_full(&self) -> bool {
        self.offsets.len() >= INDEX_ENTRIES_MAX || self.times.len() >= INDEX_ENTRIES_MAX
    }

    /// The file position to start scanning from for `rel_offset`: the largest indexed entry at
    /// or below it, else the start of the segment.
    pub fn position_for(&self, rel_offset: u32) -> u32 {
        match self.offsets.partition_point(|&(o, _)| o <= rel_offset) {
            0 => 0,
            i => self.offsets[i - 1].1,
        }
    }

    /// The relative offset to start scanning from for the first record with timestamp >=
    /// `ts`: the entry just before the first one whose max timestamp reaches `ts`.
    pub fn offset_for_time(&self, ts: i64) -> u32 {
        match self.times.partition_point(|&(t, _)| t < ts) {
            0 => 0,
            i => self.times[i - 1].1,
        }
    }

    /// Thins a sealed segment's in-memory index to one offset entry per `stride_bytes` of log
    /// (and as many time entries), so the memory every sealed segment keeps does not grow with
    /// its batch count. Lookups stay correct: each answer
    /// is a position or offset at or before the exact one, and readers scan forward from it.
    pub fn thin(&mut self, stride_bytes: u32) {
        let mut last_kept: Option<u32> = None;
        self.offsets.retain(|&(_, pos)| {
            let keep = last_kept.is_none_or(|p| pos >= p.saturating_add(stride_bytes));
            if keep {
                last_kept = Some(pos);
            }
            keep
        });
        // At most one time entry per kept offset entry: the first at or after it. (Thinning by
        // count instead made earlier entries sparser on every pass over an active segment.)
        let offsets = &self.offsets;
        let mut next = 0usize;
        self.times.retain(|&(_, o)| {
            if next >= offsets.len() || o < offsets[next].0 {
                return false;
            }
            while next < offsets.len() && offsets[next].0 <= o {
                next += 1;
            }
            true
        });
        self.offsets.shrink_to_fit();
        self.times.shrink_to_fit();
        debug_assert!(self
            .offsets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
        debug_assert!(self
            .times
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    }

    pub fn encode_offsets(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.offsets.len() * 8);
        for &(o, p) in &self.offsets {
            v.extend_from_slice(&o.to_be_bytes());
            v.extend_from_slice(&p.to_be_bytes());
        }
        v
    }

    pub fn encode_times(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.times.len() * 12);
        for &(t, o) in &self.times {
            v.extend_from_slice(&t.to_be_bytes());
            v.extend_from_slice(&o.to_be_bytes());
        }
        v
    }

    /// Decodes both files and checks them against the segment: entries strictly increasing,
    /// positions inside the segment. None means "inconsistent: rebuild".
    pub fn decode(offsets: &[u8], times: &[u8], segment_bytes: u64) -> Option<SegmentIndex> {
        if offsets.len() % 8 != 0 || times.len() % 12 != 0 {
            return None;
        }
        if offsets.len() / 8 > INDEX_ENTRIES_MAX || times.len() / 12 > INDEX_ENTRIES_MAX {
            return None;
        }
        let mut idx = SegmentIndex::default();
        for e in offsets.chunks_exact(8) {
            let o = u32::from_be_bytes(e[0..4].try_into().ok()?);
            let p = u32::from_be_bytes(e[4..8].try_into().ok()?);
            if p as u64 >= segment_bytes.max(1) {
                return None;
            }
            if let Some(&(lo, lp)) = idx.offsets.last() {
                if o <= lo || p <= lp {
                    return None;
                }
            }
            idx.offsets.push((o, p));
        }
        for e in times.chunks_exact(12) {
            let t = i64::from_be_bytes(e[0..8].try_into().ok()?);
            let o = u32::from_be_bytes(e[8..12].try_into().ok()?);
            if let Some(&(lt, lo)) = idx.times.last() {
                if t <= lt || o < lo {
                    return None;
                }
            }
            idx.times.push((t, o));
        }
        if segment_bytes > 0 && idx.offsets.is_empty() {
            return None;
        }
        Some(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinning_keeps_lookups_at_or_before_the_exact_answer() {
        let mut full = SegmentIndex::default();
        // 2000 batches of 1000 bytes, 10 offsets each: an entry per batch at interval 1000.
        for i in 0..2000u32 {
            full.on_append(i * 10, i * 1000, 1000, 1_000 + i as i64, 1000);
        }
        let mut thin = full.clone();
        thin.thin(64 * 1024);
        assert!(
            thin.offsets.len() <= 2000 * 1000 / (64 * 1024) + 1,
            "{}",
            thin.offsets.len()
        );
        assert!(thin.times.len() <= thin.offsets.len() + 1);
        assert_eq!(thin.offsets[0], full.offsets[0]);
        for rel in (0..20_000u32).step_by(7) {
            let exact = full.position_for(rel);
            let got = thin.position_for(rel);
            assert!(got <= exact, "offset {rel}: {got} > {exact}");
            assert!(
                exact - got < 64 * 1024 + 1000,
                "offset {rel}: {got} far before {exact}"
            );
        }
        for ts in (900..3_100i64).step_by(13) {
            assert!(
                thin.offset_for_time(ts) <= full.offset_for_time(ts),
                "ts {ts}"
            );
        }
    }

    /// The active segment's index stays bounded however many batches it takes, keeps its
    /// newest entries exact, and answers older lookups at or before the exact answer.
    #[test]
    fn active_index_keeps_a_dense_tail_and_a_bounded_size() {
        let mut full = SegmentIndex::default();
        let mut bounded = SegmentIndex::default();
        // 50,000 batches of 500 bytes (25 MB), an entry per batch: the unbounded index has
        // 50,000 entries.
        for i in 0..50_000u32 {
            full.offsets.push((i * 4, i * 500));
            full.times.push((1_000 + i as i64, i * 4));
            bounded.on_append(i * 4, i * 500, 500, 1_000 + i as i64, 1);
            assert!(
                bounded.offsets.len()
                    <= 2 * DENSE_TAIL_ENTRIES
                        + (i as usize * 500) / THINNED_STRIDE_BYTES as usize
                        + 1,
                "after {i} batches: {} entries",
                bounded.offsets.len()
            );
        }
        assert!(bounded.offsets.len() >= DENSE_TAIL_ENTRIES);
        assert!(bounded.times.len() <= bounded.offsets.len() + 1);
        let dense_from = bounded.offsets[bounded.offsets.len() - DENSE_TAIL_ENTRIES].0;
        for rel in (0..200_000u32).step_by(7) {
            let exact = full.position_for(rel);
            let got = bounded.position_for(rel);
            assert!(got <= exact, "offset {rel}: {got} > {exact}");
            assert!(exact - got <= THINNED_STRIDE_BYTES + 500, "offset {rel}");
            if rel >= dense_from {
                assert_eq!(got, exact, "offset {rel} is in the dense tail");
            }
        }
        // Time lookups land at most about two strides before the exact answer, in the old part
        // of the segment too (each batch is 500 bytes and 4 offsets).
        let stride_offsets = (THINNED_STRIDE_BYTES / 500 + 1) * 4;
        for ts in (900..51_100i64).step_by(13) {
            let (exact, got) = (full.offset_for_time(ts), bounded.offset_for_time(ts));
            assert!(got <= exact, "ts {ts}");
            assert!(
                exact - got <= 2 * stride_offsets,
                "ts {ts}: {got} far before {exact}"
            );
        }
    }

    #[test]
    fn sparse_entries_and_lookup() {
        let mut idx = SegmentIndex::default();
        // 10 batches of 1000 bytes, 10 offsets each, interval 4096 bytes.
        for i in 0..10u32 {
            idx.on_append(i * 10, i * 1000, 1000, 100 + i as i64, 4096);
        }
        assert_eq!(idx.offsets, vec![(0, 0), (50, 5000)]);
        assert_eq!(idx.position_for(0), 0);
        assert_eq!(idx.position_for(49), 0);
        assert_eq!(idx.position_for(55), 5000);
        assert_eq!(idx.offset_for_time(104), 0);
        assert_eq!(idx.offset_for_time(106), 50);
        let back =
            SegmentIndex::decode(&idx.encode_offsets(), &idx.encode_times(), 10_000).unwrap();
        assert_eq!(back.offsets, idx.offsets);
        assert_eq!(back.times, idx.times);
    }

    #[test]
    fn rejects_inconsistent_files() {
        let mut idx = SegmentIndex::default();
        idx.on_append(0, 0, 5000, 1, 100);
        idx.on_append(5, 5000, 5000, 2, 100);
        let o = idx.encode_offsets();
        assert!(SegmentIndex::decode(&o, &idx.encode_times(), 10_000).is_some());
        // Position beyond the segment.
        assert!(SegmentIndex::decode(&o, &[], 4000).is_none());
        // Torn entry.
        assert!(SegmentIndex::decode(&o[..o.len() - 3], &[], 10_000).is_none());
        // Not increasing.
        let mut swapped = o[8..16].to_vec();
        swapped.extend_from_slice(&o[0..8]);
        assert!(SegmentIndex::decode(&swapped, &[], 10_000).is_none());
        // A non-empty segment with an empty index is suspicious: rebuild.
        assert!(SegmentIndex::decode(&[], &[], 10).is_none());
        assert!(SegmentIndex::decode(&[], &[], 0).is_some());
    }
}
