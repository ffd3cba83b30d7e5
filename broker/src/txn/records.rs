//! Records of the internal topic `__transaction_state`, in Kafka's layouts (big-endian; strings
//! are i16 length + UTF-8):
//!
//! ```text
//! key   (version 0): i16 0 | string transactional id
//! value (version 0): i16 0 | i64 producer id | i16 producer epoch | i32 transaction timeout ms
//!                    | i8 state | i32 partition-topic count (-1: none)
//!                    | per topic: string topic | i32 count | i32 partition...
//!                    | i64 last update timestamp ms | i64 start timestamp ms
//! ```
//! A record with a null value is a tombstone: the transactional id expired.
//! States: 0 Empty, 1 Ongoing, 2 PrepareCommit, 3 PrepareAbort, 4 CompleteCommit,
//! 5 CompleteAbort, 6 Dead, 7 PrepareEpochFence.

use std::collections::BTreeSet;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Partitions one transaction may span (bounds the decoder and AddPartitionsToTxn).
pub const PARTITIONS_PER_TXN_MAX: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnState {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
    Dead,
    PrepareEpochFence,
}

impl TxnState {
    pub fn code(self) -> i8 {
        match self {
            TxnState::Empty => 0,
            TxnState::Ongoing => 1,
            TxnState::PrepareCommit => 2,
            TxnState::PrepareAbort => 3,
            TxnState::CompleteCommit => 4,
            TxnState::CompleteAbort => 5,
            TxnState::Dead => 6,
            TxnState::PrepareEpochFence => 7,
        }
    }

    pub fn from_code(c: i8) -> Option<TxnState> {
        Some(match c {
            0 => TxnState::Empty,
            1 => TxnState::Ongoing,
            2 => TxnState::PrepareCommit,
            3 => TxnState::PrepareAbort,
            4 => TxnState::CompleteCommit,
            5 => TxnState::CompleteAbort,
            6 => TxnState::Dead,
            7 => TxnState::PrepareEpochFence,
            _ => return None,
        })
    }

    /// Kafka's names, as DescribeTransactions and ListTransactions report them.
    pub fn name(self) -> &'static str {
        match self {
            TxnState::Empty => "Empty",
            TxnState::Ongoing => "Ongoing",
            TxnState::PrepareCommit => "PrepareCommit",
            TxnState::PrepareAbort => "PrepareAbort",
            TxnState::CompleteCommit => "CompleteCommit",
            TxnState::CompleteAbort => "CompleteAbort",
            TxnState::Dead => "Dead",
            TxnState::PrepareEpochFence => "PrepareEpochFence",
        }
    }
}

/// One transactional id's state, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnValue {
    pub producer_id: i64,
    pub epoch: i16,
    pub timeout_ms: i32,
    pub state: TxnState,
    pub partitions: BTreeSet<(String, i32)>,
    pub last_update_ms: i64,
    pub start_ms: i64,
}

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_i16(s.len() as i16);
    b.put_slice(s.as_bytes());
}

fn get_str(b: &mut Bytes) -> Option<String> {
    if b.remaining() < 2 {
        return None;
    }
    let n = b.get_i16();
    if n < 0 || b.remaining() < n as usize {
        return None;
    }
    String::from_utf8(b.split_to(n as usize).to_vec()).ok()
}

pub fn encode_key(id: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + id.len());
    b.put_i16(0);
    put_str(&mut b, id);
    b.freeze()
}

pub fn decode_key(mut b: Bytes) -> Option<String> {
    if b.remaining() < 2 || b.get_i16() != 0 {
        return None;
    }
    get_str(&mut b)
}

pub fn encode_value(v: &TxnValue) -> Bytes {
    let mut b = BytesMut::with_capacity(64 + v.partitions.len() * 24);
    b.put_i16(0);
    b.put_i64(v.producer_id);
    b.put_i16(v.epoch);
    b.put_i32(v.timeout_ms);
    b.put_i8(v.state.code());
    let topics = crate::protocol::by_topic(v.partitions.iter().map(|(t, p)| (t, *p)));
    b.put_i32(topics.len() as i32);
    for (t, ps) in topics {
        put_str(&mut b, t);
        b.put_i32(ps.len() as i32);
        for p in ps {
            b.put_i32(p);
        }
    }
    b.put_i64(v.last_update_ms);
    b.put_i64(v.start_ms);
    b.freeze()
}

pub fn decode_value(mut b: Bytes) -> Option<TxnValue> {
    if b.remaining() < 2 + 8 + 2 + 4 + 1 + 4 || b.get_i16() != 0 {
        return None;
    }
    let producer_id = b.get_i64();
    let epoch = b.get_i16();
    let timeout_ms = b.get_i32();
    let state = TxnState::from_code(b.get_i8())?;
    let topics = b.get_i32();
    let mut partitions = BTreeSet::new();
    for _ in 0..topics.max(0) {
        let t = get_str(&mut b)?;
        if b.remaining() < 4 {
            return None;
        }
        let n = b.get_i32();
        if n < 0 || b.remaining() < n as usize * 4 {
            return None;
        }
        for _ in 0..n {
            partitions.insert((t.clone(), b.get_i32()));
            if partitions.len() > PARTITIONS_PER_TXN_MAX {
                return None;
            }
        }
    }
    if b.remaining() < 16 {
        return None;
    }
    Some(TxnValue {
        producer_id,
        epoch,
        timeout_ms,
        state,
        partitions,
        last_update_ms: b.get_i64(),
        start_ms: b.get_i64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_value_round_trip_in_kafkas_layout() {
        let k = encode_key("tx-1");
        assert_eq!(&k[..], &[0, 0, 0, 4, b't', b'x', b'-', b'1']);
        assert_eq!(decode_key(k).as_deref(), Some("tx-1"));
        let v = TxnValue {
            producer_id: 7,
            epoch: 3,
            timeout_ms: 60_000,
            state: TxnState::Ongoing,
            partitions: [
                ("a".to_string(), 0),
                ("a".to_string(), 2),
                ("b".to_string(), 1),
            ]
            .into_iter()
            .collect(),
            last_update_ms: 11,
            start_ms: 10,
        };
        let b = encode_value(&v);
        // version, pid, epoch, timeout, state, 2 topics
        assert_eq!(&b[..2], &[0, 0]);
        assert_eq!(b[16], 1);
        assert_eq!(&b[17..21], &2i32.to_be_bytes());
        assert_eq!(decode_value(b.clone()), Some(v));
        assert_eq!(decode_value(b.slice(..b.len() - 1)), None);
    }
}
