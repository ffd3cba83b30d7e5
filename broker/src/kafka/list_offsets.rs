//! ListOffsets v1-9: earliest (-2), latest (-1), max timestamp (-3, v7), earliest local (-4,
//! v8: the log start, as in Kafka without tiered storage), latest tiered (-5, v9: offset -1 and
//! epoch -1, Kafka's answer when nothing is tiered) and by timestamp, answered by each
//! partition's owner shard.

use std::collections::BTreeMap;

use futures::channel::oneshot;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};

use super::errors::*;
use super::{decode, respond, Response};
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::{shard, ListOffsetItem, ShardMsg};

pub async fn handle(frame: RequestFrame) -> Result<Response, String> {
    let req: ListOffsetsRequest = decode(&frame)?;
    let s = shard();
    let image = s.image();
    let mut rows: Vec<Vec<ListOffsetsPartitionResponse>> = Vec::with_capacity(req.topics.len());
    let mut plan: BTreeMap<usize, (Vec<ListOffsetItem>, Vec<(usize, usize)>)> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for (ti, t) in req.topics.iter().enumerate() {
        let name = t.name.0.to_string();
        let mut row = Vec::with_capacity(t.partitions.len());
        for (pi, p) in t.partitions.iter().enumerate() {
            let mut r = ListOffsetsPartitionResponse::default()
                .with_partition_index(p.partition_index)
                .with_error_code(UNKNOWN_TOPIC_OR_PARTITION)
                .with_timestamp(-1)
                .with_offset(-1)
                .with_leader_epoch(-1);
            if !seen.insert((name.clone(), p.partition_index)) {
                r.error_code = INVALID_REQUEST;
            } else if !timestamp_supported(p.timestamp, frame.api_version) {
                r.error_code = UNSUPPORTED_VERSION;
            } else if let Err(code) = image.route(&name, p.partition_index, s.config.node_id) {
                r.error_code = code;
            } else if let Some(owner) = image.owner(&name, p.partition_index) {
                let e = plan.entry(owner as usize).or_default();
                e.0.push(ListOffsetItem {
                    topic: name.clone(),
                    partition: p.partition_index,
                    timestamp: p.timestamp,
                    read_committed: frame.api_version >= 2 && req.isolation_level == 1,
                    current_leader_epoch: if frame.api_version >= 4 {
                        p.current_leader_epoch
                    } else {
                        -1
                    },
                });
                e.1.push((ti, pi));
            }
            row.push(r);
        }
        rows.push(row);
    }
    let mut rxs = Vec::with_capacity(plan.len());
    for (target, (items, slots)) in plan {
        let (tx, rx) = oneshot::channel();
        s.send(target, ShardMsg::ListOffsets { items, reply: tx })
            .await;
        rxs.push((rx, slots));
    }
    for (rx, slots) in rxs {
        let got = rx.await.unwrap_or_default();
        for (&(ti, pi), r) in slots.iter().zip(got) {
            let slot = &mut rows[ti][pi];
            slot.error_code = r.error;
            slot.timestamp = r.timestamp;
            slot.offset = r.offset;
            if frame.api_version >= 4 {
                slot.leader_epoch = r.leader_epoch;
            }
        }
    }
    let resp = ListOffsetsResponse::default().with_topics(
        req.topics
            .into_iter()
            .zip(rows)
            .map(|(t, partitions)| {
                ListOffsetsTopicResponse::default()
                    .with_name(t.name)
                    .with_partitions(partitions)
            })
            .collect(),
    );
    respond(&frame, OutBuf::new(), &resp)
}

/// Kafka's rule: a negative (special) timestamp is answered only from the version that
/// introduced it; unknown ones never.
fn timestamp_supported(timestamp: i64, version: i16) -> bool {
    let since = match timestamp {
        t if t >= 0 => return true,
        -1 | -2 => 0,
        -3 => 7,
        -4 => 8,
        -5 => 9,
        _ => return false,
    };
    version >= since
}

#[cfg(test)]
mod tests {
    use super::timestamp_supported;

    #[test]
    fn special_timestamps_need_their_version() {
        assert!(timestamp_supported(0, 1));
        assert!(timestamp_supported(-2, 1));
        assert!(!timestamp_supported(-3, 6) && timestamp_supported(-3, 7));
        assert!(!timestamp_supported(-4, 7) && timestamp_supported(-4, 8));
        assert!(!timestamp_supported(-5, 8) && timestamp_supported(-5, 9));
        assert!(!timestamp_supported(-6, 9));
    }
}
