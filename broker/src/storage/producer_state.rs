//! Idempotent-producer state of one partition: for each producer id, its epoch and the last
//! five batches it wrote (sequence range, offsets). A batch is checked against this state as it
//! is appended, without decoding any record.
//!
//! Rules (Kafka's, with KIP-360's handling of unknown producers):
//! - an epoch older than the one known: INVALID_PRODUCER_EPOCH;
//! - a newer epoch must start at sequence 0 (the producer reset its sequences);
//! - same epoch: a batch equal to one of the cached five is a duplicate, answered with the
//!   offset it got the first time and not written again; otherwise its first sequence must
//!   follow the last one (wrapping at i32::MAX), else OUT_OF_ORDER_SEQUENCE_NUMBER;
//! - no state for the producer (new, expired, or removed with its data by retention): any
//!   sequence is accepted.
//!
//! The state is snapshotted to `<offset>.snapshot` at segment roll and at clean shutdown;
//! on start the newest snapshot not past the log end is loaded and the log after it replayed.
//!
//! Snapshot format (big-endian):
//! ```text
//!  0   4   magic "WPS1"
//!  4   4   CRC32C of bytes 8..end
//!  8   8   offset the snapshot covers up to (exclusive)
//!  16  4   producer count
//!  then per producer:
//!      8 producer id | 2 epoch | 8 last timestamp | 8 txn first offset (-1: none, reserved)
//!      1 batch count (<= 5), then per batch:
//!        4 first seq | 4 last seq | 8 first offset | 8 last offset | 8 max timestamp
//! ```
//! The reserved transaction field lets transactions add ongoing-transaction tracking to the
//! same entries without a format change.

use std::collections::{HashMap, VecDeque};

use crate::kafka::errors::{INVALID_PRODUCER_EPOCH, OUT_OF_ORDER_SEQUENCE_NUMBER};

/// Batches remembered per producer: the most a producer has in flight (max.in.flight 5).
pub const BATCHES_PER_PRODUCER: usize = 5;
const MAGIC: &[u8; 4] = b"WPS1";
/// A snapshot never holds more producers than this (bounds the decoder's allocation).
pub const PRODUCERS_PER_PARTITION_MAX: usize = 1_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchMeta {
    pub first_seq: i32,
    pub last_seq: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub max_timestamp: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerEntry {
    pub epoch: i16,
    pub batches: VecDeque<BatchMeta>,
    pub last_timestamp: i64,
    /// First offset of the producer's open transaction; reserved for transactions.
    pub txn_first_offset: Option<i64>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    Append,
    Duplicate { first_offset: i64, last_offset: i64 },
    Refuse(i16),
}

/// The last sequence of a batch: sequences wrap from i32::MAX to 0.
pub fn last_sequence(base: i32, last_offset_delta: i32) -> i32 {
    ((base as i64 + last_offset_delta as i64) % (i32::MAX as i64 + 1)) as i32
}

fn follows(last: i32, next: i32) -> bool {
    if last == i32::MAX {
        next == 0
    } else {
        next == last + 1
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerStates {
    pub entries: HashMap<i64, ProducerEntry>,
}

impl ProducerStates {
    pub fn check(&self, pid: i64, epoch: i16, first_seq: i32, last_seq: i32) -> Check {
        let Some(e) = self.entries.get(&pid) else {
            return Check::Append;
        };
        if epoch < e.epoch {
            return Check::Refuse(INVALID_PRODUCER_EPOCH);
        }
        if epoch > e.epoch {
            return if first_seq == 0 {
                Check::Append
            } else {
                Check::Refuse(OUT_OF_ORDER_SEQUENCE_NUMBER)
            };
        }
        if let Some(b) = e
            .batches
            .iter()
            .find(|b| b.first_seq == first_seq && b.last_seq == last_seq)
        {
            return Check::Duplicate {
                first_offset: b.first_offset,
                last_offset: b.last_offset,
            };
        }
        match e.batches.back() {
            Some(last) if !follows(last.last_seq, first_seq) => {
                Check::Refuse(OUT_OF_ORDER_SEQUENCE_NUMBER)
            }
            _ => Check::Append,
        }
    }

    /// Records an appended batch (also used while replaying the log).
    pub fn record(&mut self, pid: i64, epoch: i16, batch: BatchMeta) {
        let e = self.entries.entry(pid).or_insert_with(|| ProducerEntry {
            epoch,
            batches: VecDeque::with_capacity(BATCHES_PER_PRODUCER),
            last_timestamp: batch.max_timestamp,
            txn_first_offset: None,
        });
        if epoch != e.epoch {
            e.epoch = epoch;
            e.batches.clear();
        }
        e.last_timestamp = e.last_timestamp.max(batch.max_timestamp);
        if e.batches.len() == BATCHES_PER_PRODUCER {
            e.batches.pop_front();
        }
        e.batches.push_back(batch);
    }

    /// Forgets producers idle for `expiration_ms` and producers whose every batch lies below
    /// the log start (their data was deleted by retention).
    pub fn expire(&mut self, now_ms: i64, expiration_ms: i64, log_start_offset: i64) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| {
            let idle = now_ms - e.last_timestamp >= expiration_ms;
            let gone = e
                .batches
                .back()
                .is_some_and(|b| b.last_offset < log_start_offset);
            !(idle || gone) || e.txn_first_offset.is_some()
        });
        before - self.entries.len()
    }

    pub fn encode(&self, offset: i64) -> Vec<u8> {
        let mut body = Vec::with_capacity(12 + self.entries.len() * 40);
        body.extend_from_slice(&offset.to_be_bytes());
        body.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        let mut pids: Vec<_> = self.entries.keys().copied().collect();
        pids.sort_unstable();
        for pid in pids {
            let e = &self.entries[&pid];
            body.extend_from_slice(&pid.to_be_bytes());
            body.extend_from_slice(&e.epoch.to_be_bytes());
            body.extend_from_slice(&e.last_timestamp.to_be_bytes());
            body.extend_from_slice(&e.txn_first_offset.unwrap_or(-1).to_be_bytes());
            body.push(e.batches.len() as u8);
            for b in &e.batches {
                body.extend_from_slice(&b.first_seq.to_be_bytes());
                body.extend_from_slice(&b.last_seq.to_be_bytes());
                body.extend_from_slice(&b.first_offset.to_be_bytes());
                body.extend_from_slice(&b.last_offset.to_be_bytes());
                body.extend_from_slice(&b.max_timestamp.to_be_bytes());
            }
        }
        let mut out = Vec::with_capacity(8 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a snapshot; None when it is torn, corrupt or not a snapshot.
    pub fn decode(b: &[u8]) -> Option<(i64, ProducerStates)> {
        if b.len() < 20 || &b[0..4] != MAGIC {
            return None;
        }
        let crc = u32::from_be_bytes(b[4..8].try_into().ok()?);
        if crc32c::crc32c(&b[8..]) != crc {
            return None;
        }
        let mut r = Reader(&b[8..]);
        let offset = r.i64()?;
        let count = r.u32()? as usize;
        if count > PRODUCERS_PER_PARTITION_MAX {
            return None;
        }
        let mut s = ProducerStates::default();
        for _ in 0..count {
            let pid = r.i64()?;
            let epoch = r.i16()?;
            let last_timestamp = r.i64()?;
            let txn = r.i64()?;
            let n = r.u8()? as usize;
            if n > BATCHES_PER_PRODUCER {
                return None;
            }
            let mut batches = VecDeque::with_capacity(n);
            for _ in 0..n {
                batches.push_back(BatchMeta {
                    first_seq: r.i32()?,
                    last_seq: r.i32()?,
                    first_offset: r.i64()?,
                    last_offset: r.i64()?,
                    max_timestamp: r.i64()?,
                });
            }
            s.entries.insert(
                pid,
                ProducerEntry {
                    epoch,
                    batches,
                    last_timestamp,
                    txn_first_offset: (txn >= 0).then_some(txn),
                },
            );
        }
        r.0.is_empty().then_some((offset, s))
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        if self.0.len() < N {
            return None;
        }
        let (a, b) = self.0.split_at(N);
        self.0 = b;
        a.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn i16(&mut self) -> Option<i16> {
        self.take().map(i16::from_be_bytes)
    }
    fn i32(&mut self) -> Option<i32> {
        self.take().map(i32::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_be_bytes)
    }
}

pub fn snapshot_file_name(offset: i64) -> String {
    format!("{offset:020}.snapshot")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(first: i32, last: i32, off: i64) -> BatchMeta {
        BatchMeta {
            first_seq: first,
            last_seq: last,
            first_offset: off,
            last_offset: off + (last - first) as i64,
            max_timestamp: 1,
        }
    }

    #[test]
    fn sequence_rules() {
        let mut s = ProducerStates::default();
        assert_eq!(
            s.check(7, 0, 5, 9),
            Check::Append,
            "unknown producer: any sequence"
        );
        s.record(7, 0, meta(0, 4, 100));
        assert_eq!(
            s.check(7, 0, 0, 4),
            Check::Duplicate {
                first_offset: 100,
                last_offset: 104
            }
        );
        assert_eq!(s.check(7, 0, 5, 9), Check::Append);
        assert_eq!(
            s.check(7, 0, 6, 9),
            Check::Refuse(OUT_OF_ORDER_SEQUENCE_NUMBER),
            "gap"
        );
        assert_eq!(
            s.check(7, 0, 3, 4),
            Check::Refuse(OUT_OF_ORDER_SEQUENCE_NUMBER),
            "overlap"
        );
        assert_eq!(
            s.check(7, 1, 3, 4),
            Check::Refuse(OUT_OF_ORDER_SEQUENCE_NUMBER),
            "new epoch must start at 0"
        );
        assert_eq!(s.check(7, 1, 0, 0), Check::Append);
        s.record(7, 1, meta(0, 0, 200));
        assert_eq!(s.check(7, 0, 5, 9), Check::Refuse(INVALID_PRODUCER_EPOCH));
        // Only the last five batches are remembered.
        for i in 1..=6 {
            s.record(7, 1, meta(i, i, 200 + i as i64));
        }
        assert_eq!(s.entries[&7].batches.len(), BATCHES_PER_PRODUCER);
        assert_eq!(
            s.check(7, 1, 6, 6),
            Check::Duplicate {
                first_offset: 206,
                last_offset: 206
            }
        );
        assert_eq!(s.check(7, 1, 7, 7), Check::Append);
        // Wrapping sequences.
        assert_eq!(last_sequence(i32::MAX - 1, 3), 1);
        s.record(9, 0, meta(i32::MAX - 2, i32::MAX, 300));
        assert_eq!(s.check(9, 0, 0, 3), Check::Append);
    }

    #[test]
    fn snapshot_round_trip_and_corruption() {
        let mut s = ProducerStates::default();
        s.record(1, 3, meta(0, 9, 0));
        s.record(1, 3, meta(10, 19, 10));
        s.record(2, 0, meta(0, 0, 20));
        let bytes = s.encode(21);
        assert_eq!(ProducerStates::decode(&bytes), Some((21, s.clone())));
        let mut bad = bytes.clone();
        bad[30] ^= 1;
        assert_eq!(ProducerStates::decode(&bad), None);
        assert_eq!(ProducerStates::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(ProducerStates::decode(b"nope"), None);
    }

    #[test]
    fn expiry() {
        let mut s = ProducerStates::default();
        s.record(
            1,
            0,
            BatchMeta {
                max_timestamp: 1_000,
                ..meta(0, 0, 0)
            },
        );
        s.record(
            2,
            0,
            BatchMeta {
                max_timestamp: 50_000,
                ..meta(0, 0, 100)
            },
        );
        assert_eq!(s.expire(60_000, 30_000, 0), 1);
        assert!(s.entries.contains_key(&2));
        assert_eq!(s.expire(60_000, 30_000, 101), 1, "data below the log start");
        assert!(s.entries.is_empty());
    }
}
