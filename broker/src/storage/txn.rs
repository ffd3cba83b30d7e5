//! Transactions at the partition: control batches (COMMIT / ABORT markers), the open
//! transactions that hold back the last stable offset (LSO), and the aborted-transaction index
//! (`.txnindex`) that read_committed fetches return.
//!
//! Rules (Kafka's):
//! - A transactional batch (attribute bit 4) of a producer with no open transaction on this
//!   partition opens one at its base offset.
//! - A control batch (bits 4 and 5) ends the producer's open transaction: COMMIT makes it
//!   visible, ABORT adds (producer id, first offset, marker offset, LSO after it) to the index.
//!   Its epoch, when newer, becomes the producer's epoch here (older writers are fenced).
//! - LSO = the first offset of the oldest open transaction, else the high watermark.
//!   read_committed fetches and ListOffsets(latest, read_committed) stop there.
//!
//! Control record (one per control batch, never compressed): key = version i16 (0) + type i16
//! (0 ABORT, 1 COMMIT); value = version i16 (0) + coordinator epoch i32.
//!
//! `.txnindex` (one per segment, named like the segment, written when the segment is sealed,
//! rebuilt by replay otherwise), 34 bytes per aborted transaction, big-endian:
//! ```text
//!  0  2  version (0)
//!  2  8  producer id
//! 10  8  first offset
//! 18  8  last offset (the ABORT marker's)
//! 26  8  last stable offset after the abort
//! ```

use bytes::{Bytes, BytesMut};

use super::batch::Header;

pub const TXN_INDEX_ENTRY_BYTES: usize = 34;
/// Aborted transactions one `.txnindex` file may hold (bounds the decoder).
pub const TXN_INDEX_ENTRIES_MAX: usize = 1 << 22;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    Abort,
    Commit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    pub last_offset: i64,
    pub last_stable_offset: i64,
}

/// The marker a control batch carries; None for another control type or a malformed one.
pub fn marker_of(batch: &[u8]) -> Option<Marker> {
    let h = Header::new(batch)?;
    if !h.is_control() || h.attributes() & 7 != 0 {
        return None;
    }
    let mut r = &batch[super::batch::HEADER_BYTES..h.total_bytes()?.min(batch.len())];
    let _len = varint(&mut r)?;
    let _attributes = take(&mut r, 1)?;
    let _ts_delta = varint(&mut r)?;
    let _offset_delta = varint(&mut r)?;
    let key_len = varint(&mut r)?;
    if key_len < 4 {
        return None;
    }
    let key = take(&mut r, key_len as usize)?;
    match i16::from_be_bytes([key[2], key[3]]) {
        0 => Some(Marker::Abort),
        1 => Some(Marker::Commit),
        _ => None,
    }
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (a, b) = r.split_at(n);
    *r = b;
    Some(a)
}

/// A zigzag varint (records' encoding), at most 5 bytes.
fn varint(r: &mut &[u8]) -> Option<i64> {
    let mut v: u64 = 0;
    for i in 0..5 {
        let b = *take(r, 1)?.first()?;
        v |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Some(((v >> 1) as i64) ^ -((v & 1) as i64));
        }
    }
    None
}

/// A control batch with one marker record (offset 0: the log stamps its offset).
pub fn marker_batch(
    producer_id: i64,
    producer_epoch: i16,
    coordinator_epoch: i32,
    marker: Marker,
    timestamp_ms: i64,
) -> Bytes {
    use kafka_protocol::records::*;
    let mut key = Vec::with_capacity(4);
    key.extend_from_slice(&0i16.to_be_bytes());
    key.extend_from_slice(&(if marker == Marker::Commit { 1i16 } else { 0 }).to_be_bytes());
    let mut value = Vec::with_capacity(6);
    value.extend_from_slice(&0i16.to_be_bytes());
    value.extend_from_slice(&coordinator_epoch.to_be_bytes());
    let record = Record {
        transactional: true,
        control: true,
        partition_leader_epoch: 0,
        producer_id,
        producer_epoch,
        timestamp_type: TimestampType::Creation,
        delete_horizon: false,
        offset: 0,
        sequence: -1,
        timestamp: timestamp_ms,
        key: Some(Bytes::from(key)),
        value: Some(Bytes::from(value)),
        headers: Default::default(),
    };
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        std::slice::from_ref(&record),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("a control batch encodes");
    buf.freeze()
}

pub fn encode_index(entries: &[AbortedTxn]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * TXN_INDEX_ENTRY_BYTES);
    for e in entries {
        out.extend_from_slice(&0i16.to_be_bytes());
        out.extend_from_slice(&e.producer_id.to_be_bytes());
        out.extend_from_slice(&e.first_offset.to_be_bytes());
        out.extend_from_slice(&e.last_offset.to_be_bytes());
        out.extend_from_slice(&e.last_stable_offset.to_be_bytes());
    }
    out
}

/// Decodes a `.txnindex`; a torn tail entry is dropped. None when the file is not one.
pub fn decode_index(b: &[u8]) -> Option<Vec<AbortedTxn>> {
    let n = b.len() / TXN_INDEX_ENTRY_BYTES;
    if n > TXN_INDEX_ENTRIES_MAX {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for c in b.chunks_exact(TXN_INDEX_ENTRY_BYTES) {
        let i = |at: usize| i64::from_be_bytes(c[at..at + 8].try_into().expect("8 bytes"));
        if i16::from_be_bytes([c[0], c[1]]) != 0 {
            return None;
        }
        out.push(AbortedTxn {
            producer_id: i(2),
            first_offset: i(10),
            last_offset: i(18),
            last_stable_offset: i(26),
        });
    }
    Some(out)
}

pub fn index_file_name(base_offset: i64) -> String {
    format!("{base_offset:020}.txnindex")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_batches_round_trip() {
        for m in [Marker::Commit, Marker::Abort] {
            let b = marker_batch(42, 3, 7, m, 1_000);
            let h = Header::new(&b).unwrap();
            assert!(h.is_control() && h.is_transactional());
            assert_eq!((h.producer_id(), h.producer_epoch()), (42, 3));
            assert_eq!(h.record_count(), 1);
            assert_eq!(marker_of(&b), Some(m));
            assert!(matches!(
                super::super::batch::check_stored(&b, None),
                super::super::batch::Stored::Valid { .. }
            ));
        }
        let data = super::super::batch::test_batches::make(1, 10, 5);
        assert_eq!(marker_of(&data), None);
    }

    #[test]
    fn txn_index_round_trips_and_drops_a_torn_tail() {
        let e = vec![
            AbortedTxn {
                producer_id: 1,
                first_offset: 10,
                last_offset: 20,
                last_stable_offset: 21,
            },
            AbortedTxn {
                producer_id: 2,
                first_offset: 15,
                last_offset: 30,
                last_stable_offset: 31,
            },
        ];
        let mut b = encode_index(&e);
        assert_eq!(b.len(), 68);
        assert_eq!(decode_index(&b).unwrap(), e);
        b.truncate(50);
        assert_eq!(decode_index(&b).unwrap(), e[..1]);
    }
}
