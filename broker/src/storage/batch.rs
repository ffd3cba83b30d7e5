//! Kafka record batches (magic 2), handled by their 61-byte header only: the records inside are
//! never decoded on the hot path. Layout (big-endian):
//!
//! ```text
//!  0      8        12          16    17    21     23          27        35       43      51     53       57       61
//!  +------+--------+-----------+-----+-----+------+-----------+---------+--------+-------+------+--------+--------+---------
//!  |base  |batch   |partition  |magic|crc  |attr  |lastOffset |base     |max     |producer|prod. |base    |record  |records…
//!  |offset|length  |leaderEpoch| =2  |32c  |      |Delta      |timestamp|timestamp|id     |epoch |sequence|count   |
//!  +------+--------+-----------+-----+-----+------+-----------+---------+--------+-------+------+--------+--------+---------
//!  batch length counts the bytes after its own field (total = length + 12);
//!  the CRC32C covers bytes 21..end, so rewriting base offset and leader epoch keeps it valid.
//! ```

use bytes::Bytes;

pub const HEADER_BYTES: usize = 61;
/// Bytes before the batch length field is counted: base offset + the length field itself.
pub const LOG_OVERHEAD: usize = 12;
const MAGIC_OFFSET: usize = 16;
const CRC_OFFSET: usize = 17;
const ATTRIBUTES_OFFSET: usize = 21;
const LAST_OFFSET_DELTA_OFFSET: usize = 23;
const BASE_TIMESTAMP_OFFSET: usize = 27;
const MAX_TIMESTAMP_OFFSET: usize = 35;
const PRODUCER_ID_OFFSET: usize = 43;
const PRODUCER_EPOCH_OFFSET: usize = 51;
const BASE_SEQUENCE_OFFSET: usize = 53;
const RECORD_COUNT_OFFSET: usize = 57;

const ATTR_TIMESTAMP_TYPE: i16 = 1 << 3;
const ATTR_TRANSACTIONAL: i16 = 1 << 4;
const ATTR_CONTROL: i16 = 1 << 5;

/// Why a batch was refused. Each maps onto one Kafka error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// CORRUPT_MESSAGE: lengths, CRC or counts do not add up.
    Corrupt(&'static str),
    /// UNSUPPORTED_FOR_MESSAGE_FORMAT: magic 0 or 1.
    OldMagic(i8),
    /// MESSAGE_TOO_LARGE.
    TooLarge { bytes: usize, max: usize },
    /// INVALID_RECORD: well-formed, but not allowed from a producer (e.g. control batches).
    Invalid(&'static str),
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A read-only view of one batch header. The slice must hold at least [`HEADER_BYTES`].
#[derive(Clone, Copy)]
pub struct Header<'a>(&'a [u8]);

impl<'a> Header<'a> {
    pub fn new(b: &'a [u8]) -> Option<Header<'a>> {
        (b.len() >= HEADER_BYTES).then_some(Header(b))
    }
    pub fn base_offset(&self) -> i64 {
        be_i64(self.0, 0)
    }
    pub fn batch_length(&self) -> i32 {
        be_i32(self.0, 8)
    }
    /// Total bytes of the batch on disk or on the wire, or None when the length is nonsense.
    pub fn total_bytes(&self) -> Option<usize> {
        let l = self.batch_length();
        // `then`, not `then_some`: the sum must not be computed for a negative length.
        (l >= (HEADER_BYTES - LOG_OVERHEAD) as i32).then(|| l as usize + LOG_OVERHEAD)
    }
    pub fn leader_epoch(&self) -> i32 {
        be_i32(self.0, 12)
    }
    pub fn magic(&self) -> i8 {
        self.0[MAGIC_OFFSET] as i8
    }
    pub fn crc(&self) -> u32 {
        be_i32(self.0, CRC_OFFSET) as u32
    }
    pub fn attributes(&self) -> i16 {
        be_i16(self.0, ATTRIBUTES_OFFSET)
    }
    pub fn is_control(&self) -> bool {
        self.attributes() & ATTR_CONTROL != 0
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes() & ATTR_TRANSACTIONAL != 0
    }
    pub fn last_offset_delta(&self) -> i32 {
        be_i32(self.0, LAST_OFFSET_DELTA_OFFSET)
    }
    pub fn last_offset(&self) -> i64 {
        self.base_offset() + self.last_offset_delta() as i64
    }
    pub fn base_timestamp(&self) -> i64 {
        be_i64(self.0, BASE_TIMESTAMP_OFFSET)
    }
    pub fn max_timestamp(&self) -> i64 {
        be_i64(self.0, MAX_TIMESTAMP_OFFSET)
    }
    pub fn producer_id(&self) -> i64 {
        be_i64(self.0, PRODUCER_ID_OFFSET)
    }
    pub fn producer_epoch(&self) -> i16 {
        be_i16(self.0, PRODUCER_EPOCH_OFFSET)
    }
    pub fn base_sequence(&self) -> i32 {
        be_i32(self.0, BASE_SEQUENCE_OFFSET)
    }
    pub fn record_count(&self) -> i32 {
        be_i32(self.0, RECORD_COUNT_OFFSET)
    }
}

/// The codec bits of a batch's attributes.
const ATTR_COMPRESSION_MASK: i16 = 0x07;

/// Topic `compression.type` other than `producer`: the Produce partition's batches (already
/// validated, `infos`) re-encoded with `target`, or None when every batch already uses it
/// (stored as sent). Each batch keeps its producer id, epoch, base sequence, transactional
/// flag, leader epoch, record offsets and timestamps; decoding is bounded by
/// `DECOMPRESSED_BATCH_BYTES_MAX`. A batch that does not decode is CORRUPT_MESSAGE, as Kafka
/// answers a batch it cannot decompress.
pub fn recompress(
    records: &Bytes,
    infos: &[BatchInfo],
    target: kafka_protocol::records::Compression,
) -> Result<Option<Bytes>, BatchError> {
    use kafka_protocol::records::{RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions};
    let codec_of = |i: &BatchInfo| {
        Header::new(&records[i.start..])
            .map(|h| h.attributes() & ATTR_COMPRESSION_MASK)
            .unwrap_or(0)
    };
    if infos.iter().all(|i| codec_of(i) == target as i16) {
        return Ok(None);
    }
    let mut out = bytes::BytesMut::with_capacity(records.len());
    for i in infos {
        let batch = records.slice(i.start..i.start + i.bytes);
        if codec_of(i) == target as i16 {
            out.extend_from_slice(&batch);
            continue;
        }
        let mut b = batch;
        let set = RecordBatchDecoder::decode(&mut b)
            .map_err(|_| BatchError::Corrupt("a batch could not be decompressed (or decompresses past the broker's limit) for the topic's compression.type"))?;
        RecordBatchEncoder::encode(
            &mut out,
            &set.records,
            &RecordEncodeOptions {
                version: 2,
                compression: target,
            },
        )
        .map_err(|_| BatchError::Invalid("a batch could not be recompressed"))?;
    }
    Ok(Some(out.freeze()))
}

/// Facts about a validated batch that the log needs, read once from the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchInfo {
    /// Where the batch starts inside the slice it was found in.
    pub start: usize,
    pub bytes: usize,
    /// Offsets the batch spans: lastOffsetDelta + 1.
    pub offset_count: u32,
    pub max_timestamp: i64,
    /// -1 for a producer without idempotence.
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    /// The batch belongs to a transaction (attribute bit 4).
    pub transactional: bool,
}

/// Validates every batch in a Produce partition's `records` as a producer may send them.
/// Checks lengths, magic, CRC32C and record counts without decoding any record.
pub fn validate_produce(
    records: &[u8],
    message_bytes_max: usize,
) -> Result<Vec<BatchInfo>, BatchError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    if records.is_empty() {
        return Err(BatchError::Corrupt("empty records"));
    }
    while pos < records.len() {
        let rest = &records[pos..];
        if rest.len() < LOG_OVERHEAD + 5 {
            return Err(BatchError::Corrupt("truncated batch header"));
        }
        let magic = rest[MAGIC_OFFSET] as i8;
        if magic != 2 {
            if magic == 0 || magic == 1 {
                return Err(BatchError::OldMagic(magic));
            }
            return Err(BatchError::Corrupt("unknown magic"));
        }
        let h = Header::new(rest).ok_or(BatchError::Corrupt("truncated batch header"))?;
        let total = h
            .total_bytes()
            .ok_or(BatchError::Corrupt("batch length below header size"))?;
        if total > message_bytes_max {
            return Err(BatchError::TooLarge {
                bytes: total,
                max: message_bytes_max,
            });
        }
        if total > rest.len() {
            return Err(BatchError::Corrupt("batch length exceeds records"));
        }
        let batch = &rest[..total];
        if crc32c::crc32c(&batch[ATTRIBUTES_OFFSET..]) != h.crc() {
            return Err(BatchError::Corrupt("CRC32C mismatch"));
        }
        let count = h.record_count();
        if count <= 0 || h.last_offset_delta() != count - 1 {
            return Err(BatchError::Corrupt(
                "record count does not match lastOffsetDelta",
            ));
        }
        if h.is_control() {
            return Err(BatchError::Invalid(
                "producers may not write control batches",
            ));
        }
        if h.is_transactional() && h.producer_id() < 0 {
            return Err(BatchError::Invalid(
                "a transactional batch needs a producer id",
            ));
        }
        out.push(BatchInfo {
            start: pos,
            bytes: total,
            offset_count: count as u32,
            max_timestamp: h.max_timestamp(),
            producer_id: h.producer_id(),
            producer_epoch: h.producer_epoch(),
            base_sequence: h.base_sequence(),
            transactional: h.is_transactional(),
        });
        pos += total;
    }
    Ok(out)
}

/// A batch a follower copies from its leader, as the leader stored it.
#[derive(Clone, Debug)]
pub struct ReplicaBatch {
    pub base: i64,
    pub last: i64,
    pub leader_epoch: i32,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    /// A zero-copy slice of the fetch response.
    pub bytes: Bytes,
}

/// Splits a leader's fetched `records` into whole batches for a follower whose log ends at
/// `next_offset`: checks each batch's framing and CRC, skips batches wholly below
/// `next_offset`, drops a trailing partial batch (fetch responses may end in one), and requires
/// the rest to follow in offset order from `next_offset` on (gaps allowed: a compacted log).
pub fn validate_replica(
    records: &Bytes,
    next_offset: i64,
) -> Result<Vec<ReplicaBatch>, BatchError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut next = next_offset;
    while pos < records.len() {
        let rest = &records[pos..];
        let total = match check_stored(rest, None) {
            Stored::Valid { bytes } => bytes,
            Stored::Incomplete => break,
            Stored::Corrupt => return Err(BatchError::Corrupt("corrupt batch from the leader")),
        };
        let h = Header::new(rest).expect("checked");
        if h.last_offset() < next {
            pos += total;
            continue;
        }
        // Offsets only grow; a compacted leader log has gaps between batches.
        if h.base_offset() < next {
            return Err(BatchError::Corrupt(
                "batches from the leader go back in offsets",
            ));
        }
        out.push(ReplicaBatch {
            base: h.base_offset(),
            last: h.last_offset(),
            leader_epoch: h.leader_epoch(),
            max_timestamp: h.max_timestamp(),
            producer_id: h.producer_id(),
            producer_epoch: h.producer_epoch(),
            base_sequence: h.base_sequence(),
            bytes: records.slice(pos..pos + total),
        });
        next = h.last_offset() + 1;
        pos += total;
    }
    Ok(out)
}

/// Copies one validated batch into the shard's batch arena (`storage::arena`), with the broker's base offset
/// and leader epoch written into the header; with `log_append_time_ms` it also sets the
/// timestamp type and max timestamp and recomputes the CRC.
///
/// This is the one copy a produced batch gets (a memcpy: about 50 µs for a 1 MiB batch). It
/// gives the cache an exact byte count: a slice of the request frame would pin the whole
/// frame, up to socket.request.max.bytes, for as long as it is cached. The arena packs these
/// copies into chunks, so they do not fragment the heap. A lone large batch that is the whole
/// frame is not copied: `stamp_in_place` on the frame's buffer (`PartitionLog::append_frame`).
pub fn stamp(
    batch: &[u8],
    base_offset: i64,
    leader_epoch: i32,
    log_append_time_ms: Option<i64>,
) -> Bytes {
    debug_assert!(batch.len() >= HEADER_BYTES);
    let out = super::arena::copy_with(batch, |b| {
        stamp_in_place(b, base_offset, leader_epoch, log_append_time_ms)
    });
    debug_assert_eq!(Header(&out).base_offset(), base_offset);
    out
}

/// Writes the broker's base offset and leader epoch (and with `log_append_time_ms` the
/// timestamp type, max timestamp and CRC) into a validated batch's header, where it lies.
pub fn stamp_in_place(
    b: &mut [u8],
    base_offset: i64,
    leader_epoch: i32,
    log_append_time_ms: Option<i64>,
) {
    assert!(b.len() >= HEADER_BYTES);
    b[0..8].copy_from_slice(&base_offset.to_be_bytes());
    b[12..16].copy_from_slice(&leader_epoch.to_be_bytes());
    if let Some(now) = log_append_time_ms {
        let attrs = be_i16(b, ATTRIBUTES_OFFSET) | ATTR_TIMESTAMP_TYPE;
        b[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&attrs.to_be_bytes());
        b[MAX_TIMESTAMP_OFFSET..MAX_TIMESTAMP_OFFSET + 8].copy_from_slice(&now.to_be_bytes());
        let crc = crc32c::crc32c(&b[ATTRIBUTES_OFFSET..]);
        b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    }
}

/// Result of checking stored bytes (recovery, reads from disk).
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// A whole, CRC-valid batch of this many bytes.
    Valid { bytes: usize },
    /// Not enough bytes for the header or the declared length: a torn tail.
    Incomplete,
    /// Bytes that are not a valid batch (preallocated zeros, bit flips).
    Corrupt,
}

/// Checks the batch at the start of `b` as stored: magic, length, CRC, count.
pub fn check_stored(b: &[u8], expected_base: Option<i64>) -> Stored {
    let Some(h) = Header::new(b) else {
        return Stored::Incomplete;
    };
    if h.magic() != 2 {
        return Stored::Corrupt;
    }
    let Some(total) = h.total_bytes() else {
        return Stored::Corrupt;
    };
    if total > MESSAGE_BYTES_STORED_MAX {
        return Stored::Corrupt;
    }
    if total > b.len() {
        return Stored::Incomplete;
    }
    // Offsets only grow; a compacted segment has gaps between its batches.
    if let Some(base) = expected_base {
        if h.base_offset() < base {
            return Stored::Corrupt;
        }
    }
    if h.record_count() <= 0 || h.last_offset_delta() < 0 {
        return Stored::Corrupt;
    }
    if crc32c::crc32c(&b[ATTRIBUTES_OFFSET..total]) != h.crc() {
        return Stored::Corrupt;
    }
    Stored::Valid { bytes: total }
}

/// No stored batch can be larger than the largest message size any config allows.
pub const MESSAGE_BYTES_STORED_MAX: usize = crate::config::MESSAGE_BYTES_CEILING;

#[cfg(test)]
pub mod test_batches {
    use super::*;
    use bytes::BytesMut;

    /// Builds an uncompressed batch with `n` records with the kafka-protocol crate's encoder.
    pub fn make(n: usize, value_bytes: usize, timestamp: i64) -> Bytes {
        make_with(n, value_bytes, timestamp, -1, -1, 0)
    }

    /// An idempotent producer's batch: producer id, epoch and first sequence.
    pub fn make_idempotent(n: usize, pid: i64, epoch: i16, seq: i32) -> Bytes {
        make_with(n, 10, 1_000, pid, epoch, seq)
    }

    /// A transactional batch (attribute bit 4) of `n` records.
    pub fn make_transactional(n: usize, pid: i64, epoch: i16, seq: i32) -> Bytes {
        make_full(n, 10, 1_000, pid, epoch, seq, true)
    }

    fn make_with(
        n: usize,
        value_bytes: usize,
        timestamp: i64,
        pid: i64,
        epoch: i16,
        seq: i32,
    ) -> Bytes {
        make_full(n, value_bytes, timestamp, pid, epoch, seq, false)
    }

    fn make_full(
        n: usize,
        value_bytes: usize,
        timestamp: i64,
        pid: i64,
        epoch: i16,
        seq: i32,
        transactional: bool,
    ) -> Bytes {
        use kafka_protocol::records::*;
        let records: Vec<Record> = (0..n)
            .map(|i| Record {
                transactional,
                control: false,
                partition_leader_epoch: 0,
                producer_id: pid,
                producer_epoch: epoch,
                timestamp_type: TimestampType::Creation,
                delete_horizon: false,
                offset: i as i64,
                sequence: seq + i as i32,
                timestamp: timestamp + i as i64,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(vec![b'v'; value_bytes])),
                headers: Default::default(),
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .unwrap();
        buf.freeze()
    }
}

#[cfg(test)]
mod recompress_tests {
    use super::test_batches::{make, make_idempotent};
    use super::*;
    use kafka_protocol::records::{Compression, RecordBatchDecoder};

    fn decode(b: &Bytes) -> Vec<kafka_protocol::records::Record> {
        let mut x = b.clone();
        let mut out = Vec::new();
        while x.len() > 0 {
            out.extend(RecordBatchDecoder::decode(&mut x).unwrap().records);
        }
        out
    }

    #[test]
    fn recompression_keeps_every_record_and_producer_field() {
        let mut two = bytes::BytesMut::new();
        two.extend_from_slice(&make_idempotent(5, 42, 3, 17));
        two.extend_from_slice(&make(4, 100, 7_000));
        let two = two.freeze();
        let infos = validate_produce(&two, 1 << 20).unwrap();
        let lz4 = recompress(&two, &infos, Compression::Lz4)
            .unwrap()
            .expect("re-encoded");
        let re = validate_produce(&lz4, 1 << 20).unwrap();
        assert_eq!(re.len(), 2);
        for (a, b) in infos.iter().zip(&re) {
            assert_eq!(
                (
                    a.offset_count,
                    a.max_timestamp,
                    a.producer_id,
                    a.producer_epoch,
                    a.base_sequence
                ),
                (
                    b.offset_count,
                    b.max_timestamp,
                    b.producer_id,
                    b.producer_epoch,
                    b.base_sequence
                )
            );
            assert_eq!(Header::new(&lz4[b.start..]).unwrap().attributes() & 7, 3);
        }
        let (before, after) = (decode(&two), decode(&lz4));
        assert_eq!(before.len(), after.len());
        for (x, y) in before.iter().zip(&after) {
            assert_eq!(
                (x.offset, x.timestamp, &x.key, &x.value, x.sequence),
                (y.offset, y.timestamp, &y.key, &y.value, y.sequence)
            );
        }
        // Already in the target codec: stored as sent.
        assert!(recompress(&lz4, &re, Compression::Lz4).unwrap().is_none());
        // And back to uncompressed.
        let plain = recompress(&lz4, &re, Compression::None).unwrap().unwrap();
        assert_eq!(decode(&plain).len(), 9);
    }

    #[test]
    fn a_batch_that_decompresses_past_the_limit_is_refused() {
        use kafka_protocol::records::{RecordBatchEncoder, RecordEncodeOptions};
        // 12 MiB of zeros in one zstd batch of a few KiB.
        let rec = kafka_protocol::records::Record {
            transactional: false,
            control: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: kafka_protocol::records::TimestampType::Creation,
            delete_horizon: false,
            offset: 0,
            sequence: -1,
            timestamp: 1,
            key: None,
            value: Some(Bytes::from(vec![0u8; 12 << 20])),
            headers: Default::default(),
        };
        let mut buf = bytes::BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            [&rec],
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::Zstd,
            },
        )
        .unwrap();
        let bomb = buf.freeze();
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        let infos = validate_produce(&bomb, 1 << 20).unwrap();
        // The broker's limit is 128 MiB; tests in this process decode far less than 8 MiB.
        kafka_protocol::compression::set_decompressed_bytes_max(8 << 20);
        let r = recompress(&bomb, &infos, Compression::Lz4);
        assert!(matches!(r, Err(BatchError::Corrupt(_))), "{r:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::test_batches::make;
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn validates_and_stamps_without_breaking_crc() {
        let b = make(3, 10, 1000);
        let infos = validate_produce(&b, 1 << 20).unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].offset_count, 3);
        assert_eq!(infos[0].bytes, b.len());
        assert_eq!(infos[0].max_timestamp, 1002);
        let s = stamp(&b, 42, 7, None);
        let h = Header::new(&s).unwrap();
        assert_eq!(
            (h.base_offset(), h.leader_epoch(), h.last_offset()),
            (42, 7, 44)
        );
        assert_eq!(check_stored(&s, Some(42)), Stored::Valid { bytes: s.len() });
        let t = stamp(&b, 5, 0, Some(99_999));
        let h = Header::new(&t).unwrap();
        assert_eq!(h.max_timestamp(), 99_999);
        assert_ne!(h.attributes() & ATTR_TIMESTAMP_TYPE, 0);
        assert_eq!(check_stored(&t, Some(5)), Stored::Valid { bytes: t.len() });
    }

    #[test]
    fn several_batches_in_one_records_field() {
        let mut two = BytesMut::new();
        two.extend_from_slice(&make(2, 1, 0));
        two.extend_from_slice(&make(5, 1, 0));
        let infos = validate_produce(&two, 1 << 20).unwrap();
        assert_eq!(
            infos.iter().map(|i| i.offset_count).collect::<Vec<_>>(),
            vec![2, 5]
        );
        assert_eq!(infos[1].start, infos[0].bytes);
    }

    #[test]
    fn rejects_corruption() {
        let b = make(2, 8, 0);
        let mut flipped = b.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert_eq!(
            validate_produce(&flipped, 1 << 20),
            Err(BatchError::Corrupt("CRC32C mismatch"))
        );
        assert_eq!(check_stored(&flipped, None), Stored::Corrupt);
        assert!(matches!(
            validate_produce(&b[..b.len() - 1], 1 << 20),
            Err(BatchError::Corrupt(_))
        ));
        assert_eq!(check_stored(&b[..b.len() - 1], None), Stored::Incomplete);
        assert!(matches!(
            validate_produce(&b, 10),
            Err(BatchError::TooLarge { .. })
        ));
        let mut old = b.to_vec();
        old[MAGIC_OFFSET] = 1;
        assert_eq!(
            validate_produce(&old, 1 << 20),
            Err(BatchError::OldMagic(1))
        );
        assert_eq!(check_stored(&[0u8; 100], None), Stored::Corrupt);
        assert!(validate_produce(&[], 100).is_err());
        assert!(validate_produce(&[0u8; 5], 100).is_err());
    }
}

#[cfg(test)]
mod header_length_tests {
    use super::*;

    /// A negative batch length off the wire once overflowed in `total_bytes` (found by the
    /// soak fuzzer): it must read as nonsense, not panic.
    #[test]
    fn negative_batch_length_is_nonsense_not_a_panic() {
        let mut b = vec![0u8; HEADER_BYTES];
        for len in [-1i32, i32::MIN, 0, 10] {
            b[8..12].copy_from_slice(&len.to_be_bytes());
            assert_eq!(Header::new(&b).unwrap().total_bytes(), None, "length {len}");
        }
        b[8..12].copy_from_slice(&100i32.to_be_bytes());
        assert_eq!(
            Header::new(&b).unwrap().total_bytes(),
            Some(100 + LOG_OVERHEAD)
        );
    }
}
