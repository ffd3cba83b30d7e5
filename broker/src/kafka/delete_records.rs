//! DeleteRecords v0-2: moves each partition's log start offset forward (the low watermark),
//! answered by the partition's owner shard once the new start is persisted; whole segments
//! below it are deleted. Offset -1 means the high watermark, as in Kafka.

use std::collections::BTreeMap;

use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::{DeleteRecordsRequest, DeleteRecordsResponse};

use super::errors::*;
use super::{decode, respond, Response};
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::shard;

pub async fn handle(frame: RequestFrame) -> Result<Response, String> {
    let req: DeleteRecordsRequest = decode(&frame)?;
    let s = shard();
    let image = s.image();
    let mut rows: Vec<Vec<DeleteRecordsPartitionResult>> = Vec::with_capacity(req.topics.len());
    // Owner shard -> (topic, partition, offset) and where each answer goes.
    type Plan = BTreeMap<u32, (Vec<(String, i32, i64)>, Vec<(usize, usize)>)>;
    let mut plan: Plan = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for (ti, t) in req.topics.iter().enumerate() {
        let name = t.name.0.to_string();
        let mut row = Vec::with_capacity(t.partitions.len());
        for (pi, p) in t.partitions.iter().enumerate() {
            let mut r = DeleteRecordsPartitionResult::default()
                .with_partition_index(p.partition_index)
                .with_low_watermark(-1)
                .with_error_code(UNKNOWN_TOPIC_OR_PARTITION);
            if !seen.insert((name.clone(), p.partition_index)) {
                r.error_code = INVALID_REQUEST;
            } else if image.topics.get(&name).is_some_and(|t| t.internal) {
                // As Kafka: records of internal topics cannot be deleted.
                r.error_code = INVALID_TOPIC_EXCEPTION;
            } else if let Err(code) = image.route(&name, p.partition_index, s.config.node_id) {
                r.error_code = code;
            } else if let Some(owner) = image.owner(&name, p.partition_index) {
                let e = plan.entry(owner).or_default();
                e.0.push((name.clone(), p.partition_index, p.offset));
                e.1.push((ti, pi));
            }
            row.push(r);
        }
        rows.push(row);
    }
    for (owner, (items, slots)) in plan {
        let answers = s
            .run_on(owner as usize, move |s| {
                Box::pin(async move {
                    let mut out = Vec::with_capacity(items.len());
                    for (topic, partition, offset) in items {
                        out.push(s.delete_records(&topic, partition, offset).await);
                    }
                    out
                })
            })
            .await
            .unwrap_or_default();
        for (i, &(ti, pi)) in slots.iter().enumerate() {
            let (low, code) = answers
                .get(i)
                .copied()
                .unwrap_or((-1, NOT_LEADER_OR_FOLLOWER));
            rows[ti][pi].low_watermark = low;
            rows[ti][pi].error_code = code;
        }
    }
    let resp = DeleteRecordsResponse::default().with_topics(
        req.topics
            .into_iter()
            .zip(rows)
            .map(|(t, partitions)| {
                DeleteRecordsTopicResult::default()
                    .with_name(t.name)
                    .with_partitions(partitions)
            })
            .collect(),
    );
    respond(&frame, OutBuf::new(), &resp)
}
