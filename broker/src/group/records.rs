//! Records of the internal topic `__consumer_offsets`, in Kafka's own key and value layouts
//! (big-endian; strings are i16 length + UTF-8, nullable strings use -1, bytes are i32 length):
//!
//! ```text
//! offset commit key   (version 1): i16 1 | string group | string topic | i32 partition
//! offset commit value (version 3): i16 3 | i64 offset | i32 leader epoch | string metadata | i64 commit timestamp
//! group key           (version 2): i16 2 | string group
//! group value         (version 3): i16 3 | string protocol type | i32 generation | nullable string protocol
//!                                  | nullable string leader | i64 state timestamp | i32 member count
//!                                  | per member: string member id | nullable string instance id | string client id
//!                                    | string client host | i32 rebalance timeout | i32 session timeout
//!                                    | bytes subscription | bytes assignment
//! ```
//! A record with a null value is a tombstone: the offset or the group was deleted.

use bytes::{Buf, BufMut, Bytes, BytesMut};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetValue {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberValue {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    pub subscription: Bytes,
    pub assignment: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupValue {
    pub protocol_type: String,
    pub generation: i32,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub state_timestamp: i64,
    pub members: Vec<MemberValue>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Offset {
        group: String,
        topic: String,
        partition: i32,
    },
    Group {
        group: String,
    },
}

pub(super) fn put_str(b: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(i16::MAX as usize)];
    b.put_i16(s.len() as i16);
    b.put_slice(s);
}

pub(super) fn put_opt_str(b: &mut BytesMut, s: Option<&str>) {
    match s {
        Some(s) => put_str(b, s),
        None => b.put_i16(-1),
    }
}

fn put_bytes(b: &mut BytesMut, v: &[u8]) {
    b.put_i32(v.len() as i32);
    b.put_slice(v);
}

pub fn offset_key(group: &str, topic: &str, partition: i32) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(1);
    put_str(&mut b, group);
    put_str(&mut b, topic);
    b.put_i32(partition);
    b.freeze()
}

pub fn offset_value(v: &OffsetValue) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(3);
    b.put_i64(v.offset);
    b.put_i32(v.leader_epoch);
    put_str(&mut b, &v.metadata);
    b.put_i64(v.commit_timestamp);
    b.freeze()
}

pub fn group_key(group: &str) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(2);
    put_str(&mut b, group);
    b.freeze()
}

pub fn group_value(v: &GroupValue) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(3);
    put_str(&mut b, &v.protocol_type);
    b.put_i32(v.generation);
    put_opt_str(&mut b, v.protocol.as_deref());
    put_opt_str(&mut b, v.leader.as_deref());
    b.put_i64(v.state_timestamp);
    b.put_i32(v.members.len() as i32);
    for m in &v.members {
        put_str(&mut b, &m.member_id);
        put_opt_str(&mut b, m.instance_id.as_deref());
        put_str(&mut b, &m.client_id);
        put_str(&mut b, &m.client_host);
        b.put_i32(m.rebalance_timeout_ms);
        b.put_i32(m.session_timeout_ms);
        put_bytes(&mut b, &m.subscription);
        put_bytes(&mut b, &m.assignment);
    }
    b.freeze()
}

/// A bounds-checked reader: every length is checked against what is left before use.
pub(super) struct R(pub(super) Bytes);

impl R {
    pub(super) fn i16(&mut self) -> Option<i16> {
        (self.0.remaining() >= 2).then(|| self.0.get_i16())
    }
    pub(super) fn i32(&mut self) -> Option<i32> {
        (self.0.remaining() >= 4).then(|| self.0.get_i32())
    }
    pub(super) fn i64(&mut self) -> Option<i64> {
        (self.0.remaining() >= 8).then(|| self.0.get_i64())
    }
    pub(super) fn take(&mut self, n: usize) -> Option<Bytes> {
        (self.0.remaining() >= n).then(|| self.0.split_to(n))
    }
    pub(super) fn opt_str(&mut self) -> Option<Option<String>> {
        let n = self.i16()?;
        if n < 0 {
            return Some(None);
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec()).ok().map(Some)
    }
    pub(super) fn str(&mut self) -> Option<String> {
        self.opt_str()?
    }
    fn bytes(&mut self) -> Option<Bytes> {
        let n = self.i32()?;
        if n < 0 {
            return Some(Bytes::new());
        }
        self.take(n as usize)
    }
}

pub fn decode_key(k: Bytes) -> Option<Key> {
    let mut r = R(k);
    match r.i16()? {
        0 | 1 => Some(Key::Offset {
            group: r.str()?,
            topic: r.str()?,
            partition: r.i32()?,
        }),
        2 => Some(Key::Group { group: r.str()? }),
        _ => None,
    }
}

pub fn decode_offset_value(v: Bytes) -> Option<OffsetValue> {
    let mut r = R(v);
    let version = r.i16()?;
    let offset = r.i64()?;
    let leader_epoch = if version >= 3 { r.i32()? } else { -1 };
    let metadata = r.str()?;
    let commit_timestamp = r.i64()?;
    Some(OffsetValue {
        offset,
        leader_epoch,
        metadata,
        commit_timestamp,
    })
}

pub fn decode_group_value(v: Bytes) -> Option<GroupValue> {
    let mut r = R(v);
    let version = r.i16()?;
    if !(0..=3).contains(&version) {
        return None;
    }
    let protocol_type = r.str()?;
    let generation = r.i32()?;
    let protocol = r.opt_str()?;
    let leader = r.opt_str()?;
    let state_timestamp = if version >= 2 { r.i64()? } else { -1 };
    let n = r.i32()?;
    if n < 0 || n as usize > r.0.remaining() {
        return None;
    }
    let mut members = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let member_id = r.str()?;
        let instance_id = if version >= 3 { r.opt_str()? } else { None };
        let client_id = r.str()?;
        let client_host = r.str()?;
        let rebalance_timeout_ms = if version >= 1 { r.i32()? } else { 0 };
        let session_timeout_ms = r.i32()?;
        let subscription = r.bytes()?;
        let assignment = r.bytes()?;
        members.push(MemberValue {
            member_id,
            instance_id,
            client_id,
            client_host,
            rebalance_timeout_ms,
            session_timeout_ms,
            subscription,
            assignment,
        });
    }
    Some(GroupValue {
        protocol_type,
        generation,
        protocol,
        leader,
        state_timestamp,
        members,
    })
}

/// Kafka places a group on `__consumer_offsets` partition abs(groupId.hashCode()) % count,
/// with Java's String.hashCode over UTF-16 code units; using the same function keeps a group
/// on the partition Kafka would choose.
pub fn partition_for(group: &str, partitions: i32) -> i32 {
    let mut h: i32 = 0;
    for unit in group.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(unit as i32);
    }
    (h & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let k = offset_key("g", "t", 3);
        assert_eq!(
            decode_key(k),
            Some(Key::Offset {
                group: "g".into(),
                topic: "t".into(),
                partition: 3
            })
        );
        assert_eq!(
            decode_key(group_key("g")),
            Some(Key::Group { group: "g".into() })
        );
        let o = OffsetValue {
            offset: 42,
            leader_epoch: 1,
            metadata: "m".into(),
            commit_timestamp: 7,
        };
        assert_eq!(decode_offset_value(offset_value(&o)), Some(o));
        let g = GroupValue {
            protocol_type: "consumer".into(),
            generation: 3,
            protocol: Some("range".into()),
            leader: Some("a".into()),
            state_timestamp: 9,
            members: vec![MemberValue {
                member_id: "a".into(),
                instance_id: Some("i".into()),
                client_id: "c".into(),
                client_host: "/127.0.0.1".into(),
                rebalance_timeout_ms: 1,
                session_timeout_ms: 2,
                subscription: Bytes::from_static(b"sub"),
                assignment: Bytes::from_static(b"asg"),
            }],
        };
        assert_eq!(decode_group_value(group_value(&g)), Some(g));
        // Truncated or hostile input decodes to None, never panics.
        let v = group_value(&GroupValue {
            protocol_type: "x".into(),
            generation: 1,
            protocol: None,
            leader: None,
            state_timestamp: 0,
            members: vec![],
        });
        assert!(decode_group_value(v.slice(..v.len() - 1)).is_none());
        let mut huge = BytesMut::new();
        huge.put_i16(3);
        huge.put_i16(i16::MAX);
        assert!(decode_group_value(huge.freeze()).is_none());
    }

    #[test]
    fn partition_matches_java_hash_code() {
        // "test".hashCode() == 3556498 in Java; 3556498 % 50 == 48.
        assert_eq!(partition_for("test", 50), 48);
        // A negative Java hash: "polygenelubricants".hashCode() == Integer.MIN_VALUE -> 0.
        assert_eq!(partition_for("polygenelubricants", 50), 0);
        assert!((0..50).contains(&partition_for("any-group", 50)));
    }
}
