//! OffsetForLeaderEpoch v2-4 (KIP-101, KIP-320): the end offset of a leader epoch on the
//! partition's leader. Consumers (Java from v3, librdkafka at v2) ask it after a leader change
//! to check that the position they hold, and the epoch of the records before it, still exist:
//! an end offset below the position means the log was truncated there.
//!
//! As Kafka: only the leader answers (NOT_LEADER_OR_FOLLOWER elsewhere,
//! UNKNOWN_TOPIC_OR_PARTITION for a partition that does not exist), a current leader epoch
//! other than the leader's is FENCED_LEADER_EPOCH (older) or UNKNOWN_LEADER_EPOCH (newer), and
//! the answer is Kafka's leader-epoch-cache lookup (`EpochCache::leader_end_offset_for`).
//! Weir's followers do not use this API (they learn divergence from Fetch v12).

use std::collections::BTreeMap;

use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse};

use super::errors::*;
use super::{decode, respond, Response};
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::shard;

/// One partition's question: (topic, partition, current leader epoch, epoch asked about).
type Item = (String, i32, i32, i32);

pub async fn handle(frame: RequestFrame) -> Result<Response, String> {
    let req: OffsetForLeaderEpochRequest = decode(&frame)?;
    let s = shard();
    let image = s.image();
    let mut rows: Vec<Vec<EpochEndOffset>> = Vec::with_capacity(req.topics.len());
    // Owner shard -> the questions it answers, and where each answer goes.
    type Plan = BTreeMap<u32, (Vec<Item>, Vec<(usize, usize)>)>;
    let mut plan: Plan = BTreeMap::new();
    for (ti, t) in req.topics.iter().enumerate() {
        let name = t.topic.0.to_string();
        let mut row = Vec::with_capacity(t.partitions.len());
        for (pi, p) in t.partitions.iter().enumerate() {
            let mut r = EpochEndOffset::default()
                .with_partition(p.partition)
                .with_error_code(UNKNOWN_TOPIC_OR_PARTITION)
                .with_leader_epoch(-1)
                .with_end_offset(-1);
            match image.route(&name, p.partition, s.config.node_id) {
                Err(code) => r.error_code = code,
                Ok(owner) => {
                    let e = plan.entry(owner).or_default();
                    e.0.push((
                        name.clone(),
                        p.partition,
                        p.current_leader_epoch,
                        p.leader_epoch,
                    ));
                    e.1.push((ti, pi));
                }
            }
            row.push(r);
        }
        rows.push(row);
    }
    for (owner, (items, slots)) in plan {
        let answers = s
            .run_on(owner as usize, move |s| {
                Box::pin(async move {
                    items
                        .into_iter()
                        .map(|(topic, partition, current, asked)| {
                            let Some(p) = s.partition(&topic, partition) else {
                                return (NOT_LEADER_OR_FOLLOWER, -1, -1);
                            };
                            let l = p.log.borrow();
                            if current >= 0 && current != l.leader_epoch {
                                let code = if current > l.leader_epoch {
                                    UNKNOWN_LEADER_EPOCH
                                } else {
                                    FENCED_LEADER_EPOCH
                                };
                                return (code, -1, -1);
                            }
                            let (epoch, end) = l.epochs.leader_end_offset_for(
                                asked,
                                l.leader_epoch,
                                l.log_start_offset,
                                l.log_end_offset,
                            );
                            (NONE, epoch, end)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .await
            .unwrap_or_default();
        for (i, &(ti, pi)) in slots.iter().enumerate() {
            let (code, epoch, end) =
                answers
                    .get(i)
                    .copied()
                    .unwrap_or((NOT_LEADER_OR_FOLLOWER, -1, -1));
            let r = &mut rows[ti][pi];
            r.error_code = code;
            r.leader_epoch = epoch;
            r.end_offset = end;
        }
    }
    let resp = OffsetForLeaderEpochResponse::default().with_topics(
        req.topics
            .into_iter()
            .zip(rows)
            .map(|(t, partitions)| {
                OffsetForLeaderTopicResult::default()
                    .with_topic(t.topic)
                    .with_partitions(partitions)
            })
            .collect(),
    );
    respond(&frame, OutBuf::new(), &resp)
}
