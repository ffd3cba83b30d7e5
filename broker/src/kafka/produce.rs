//! Produce v3-11. Batches are validated on the shard that read the request (CRC32C and header
//! checks, no record decoding), grouped by owner shard, and appended there in one message per
//! shard. acks=all answers after the owner's group-commit fdatasync.
//!
//! v10 (KIP-951) answers NOT_LEADER_OR_FOLLOWER with the partition's current leader and its
//! endpoint. v11 only lets the broker answer TRANSACTION_ABORTABLE (KIP-890) where older
//! versions get INVALID_TXN_STATE: Kafka gives either only when its produce-side transaction
//! verification fails, which Weir does not do, so v11 is answered exactly as v10.

use std::collections::BTreeMap;

use futures::channel::oneshot;
use futures::FutureExt;
use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, LeaderIdAndEpoch, NodeEndpoint, PartitionProduceResponse,
    TopicProduceResponse,
};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::{decode, respond, Pending};
use crate::cluster::controller;
use crate::cluster::metadata::{self, NewTopic};
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::{shard, ControlOp, ProduceItem, ProduceReply, ShardMsg};
use crate::storage::batch::{self, BatchError};

fn partition_error(
    index: i32,
    code: i16,
    message: Option<String>,
    version: i16,
) -> PartitionProduceResponse {
    PartitionProduceResponse::default()
        .with_index(index)
        .with_error_code(code)
        .with_base_offset(-1)
        .with_log_append_time_ms(-1)
        .with_log_start_offset(-1)
        .with_error_message(message.filter(|_| version >= 8).map(StrBytes::from_string))
}

/// Indexes (within their batch) of the records without a key, over every batch of `records`.
/// A batch that does not decode counts as keyless at index 0.
fn keyless_records(records: &bytes::Bytes) -> Vec<i32> {
    use kafka_protocol::records::RecordBatchDecoder;
    let mut buf = records.clone();
    let mut out = Vec::new();
    // Every iteration consumes one batch from `buf`.
    while buf.len() >= batch::HEADER_BYTES {
        match RecordBatchDecoder::decode(&mut buf) {
            Ok(set) => out.extend(
                set.records
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.key.is_none())
                    .map(|(i, _)| i as i32),
            ),
            Err(_) => {
                out.push(0);
                break;
            }
        }
    }
    out
}

/// At most this many bytes of a request frame besides one partition's records, for those
/// records to be stamped in place and cached in the frame's buffer: what the cache then holds
/// beyond the batch's counted bytes (a request header, a topic name, the produce fields).
const FRAME_SLACK_BYTES: usize = 1024;

/// Creates the topics a request names that do not exist yet, when auto-creation is on.
pub async fn auto_create(names: Vec<String>) {
    let s = shard();
    if !s.config.auto_create_topics || names.is_empty() {
        return;
    }
    let topics = names
        .into_iter()
        .filter(|n| metadata::validate_topic_name(n).is_ok())
        .map(|name| NewTopic {
            name,
            num_partitions: -1,
            replication_factor: -1,
            configs: BTreeMap::new(),
            assignments: Vec::new(),
        })
        .collect::<Vec<_>>();
    if topics.is_empty() {
        return;
    }
    if let Some(results) = controller::request(&s, ControlOp::CreateTopics(topics, false)).await {
        for r in results {
            if let Err(e) = r {
                if e != metadata::TopicError::AlreadyExists {
                    tracing::warn!("auto-creating a topic failed: {}", e.message());
                }
            }
        }
    }
}

pub async fn handle(mut frame: RequestFrame) -> Result<Pending, String> {
    let mut req: ProduceRequest = decode(&frame)?;
    // The frame's bytes beyond the records of a partition that fills it: the request header
    // and the produce fields. Such records are stamped where they lie, when nothing else
    // references the frame by then (`PartitionLog::append_frame`).
    let frame_bytes = frame.frame_bytes;
    // The decoded request and its items are all this handler keeps of the frame: drop the
    // other views of its buffer (the header's strings, the body) so a lone large batch can
    // be stamped in place.
    frame.body = bytes::Bytes::new();
    frame.header.client_id = None;
    frame.header.unknown_tagged_fields.clear();
    let s = shard();
    let acks = req.acks;

    let mut image = s.image();
    let missing: Vec<String> = req
        .topic_data
        .iter()
        .map(|t| t.name.0.to_string())
        .filter(|n| !image.topics.contains_key(n))
        .collect();
    if !missing.is_empty() {
        auto_create(missing).await;
        image = s.image();
    }

    // results[t][p], filled in request order.
    let mut results: Vec<Vec<PartitionProduceResponse>> = Vec::with_capacity(req.topic_data.len());
    let mut per_shard: BTreeMap<usize, (Vec<ProduceItem>, Vec<(usize, usize)>)> = BTreeMap::new();
    let transactional = req
        .transactional_id
        .as_ref()
        .is_some_and(|t| !t.0.is_empty());
    for (ti, t) in req.topic_data.iter_mut().enumerate() {
        let name = t.name.0.to_string();
        // An owned copy: the decoded name is a view of the frame.
        t.name = TopicName(StrBytes::from_string(name.clone()));
        let log_cfg = image.log_config(&s.config.log, &name);
        let mut row = Vec::with_capacity(t.partition_data.len());
        for (pi, p) in t.partition_data.iter_mut().enumerate() {
            if !matches!(acks, -1..=1) {
                row.push(partition_error(
                    p.index,
                    INVALID_REQUIRED_ACKS,
                    None,
                    frame.api_version,
                ));
                continue;
            }
            if image.topics.get(&name).is_some_and(|t| t.internal) {
                row.push(partition_error(
                    p.index,
                    INVALID_TOPIC_EXCEPTION,
                    Some("Cannot append to an internal topic".into()),
                    frame.api_version,
                ));
                continue;
            }
            let owner = match image.route(&name, p.index, s.config.node_id) {
                Ok(owner) => owner,
                Err(code) => {
                    row.push(partition_error(p.index, code, None, frame.api_version));
                    continue;
                }
            };
            let Some(records) = p.records.take() else {
                row.push(partition_error(
                    p.index,
                    CORRUPT_MESSAGE,
                    Some("no records".into()),
                    frame.api_version,
                ));
                continue;
            };
            // A topic compression.type other than `producer`: batches in another codec are
            // re-encoded with the topic's (Kafka's LogValidator), then checked again.
            let checked =
                batch::validate_produce(&records, log_cfg.message_bytes_max).and_then(|infos| {
                    match log_cfg.compression {
                        None => Ok((records, infos)),
                        Some(target) => match batch::recompress(&records, &infos, target)? {
                            None => Ok((records, infos)),
                            Some(re) => {
                                let infos =
                                    batch::validate_produce(&re, log_cfg.message_bytes_max)?;
                                Ok((re, infos))
                            }
                        },
                    }
                });
            // A transactional batch comes from a transactional producer (with its id in the
            // request) and carries sequences; a producer that sends one without is refused.
            let checked =
                checked.and_then(
                    |(records, infos)| match infos.iter().find(|i| i.transactional) {
                        Some(i) if !transactional || i.base_sequence < 0 => {
                            Err(BatchError::Invalid(
                                "a transactional batch needs a transactional id and sequences",
                            ))
                        }
                        _ => Ok((records, infos)),
                    },
                );
            // A compacted topic takes only keyed records (KIP-467: the partition fails with
            // INVALID_RECORD and the index of each keyless record).
            if log_cfg.compact {
                if let Ok((records, _)) = &checked {
                    let keyless = keyless_records(records);
                    if !keyless.is_empty() {
                        let msg = format!("Compacted topic cannot accept message without key in topic partition {name}-{}.", p.index);
                        let mut e = partition_error(
                            p.index,
                            INVALID_RECORD,
                            Some(format!("One or more records have been rejected due to {} record errors in total, and only showing the first three errors at most: {msg}", keyless.len())),
                            frame.api_version,
                        );
                        if frame.api_version >= 8 {
                            e.record_errors = keyless
                                .into_iter()
                                .map(|i| {
                                    BatchIndexAndErrorMessage::default()
                                        .with_batch_index(i)
                                        .with_batch_index_error_message(Some(
                                            StrBytes::from_string(msg.clone()),
                                        ))
                                })
                                .collect();
                        }
                        row.push(e);
                        continue;
                    }
                }
            }
            let (records, infos) = match checked {
                Ok(ok) => ok,
                Err(e) => {
                    let (code, msg) = match e {
                        BatchError::Corrupt(m) => (CORRUPT_MESSAGE, m.to_string()),
                        BatchError::OldMagic(m) => (
                            UNSUPPORTED_FOR_MESSAGE_FORMAT,
                            format!("magic {m} is not supported; use magic 2"),
                        ),
                        BatchError::TooLarge { bytes, max } => (
                            MESSAGE_TOO_LARGE,
                            format!("batch of {bytes} bytes exceeds max.message.bytes {max}"),
                        ),
                        BatchError::Invalid(m) => (INVALID_RECORD, m.to_string()),
                    };
                    tracing::debug!(topic = %name, partition = p.index, "refused batch: {msg}");
                    row.push(partition_error(p.index, code, Some(msg), frame.api_version));
                    continue;
                }
            };
            row.push(partition_error(
                p.index,
                REQUEST_TIMED_OUT,
                None,
                frame.api_version,
            ));
            let entry = per_shard.entry(owner as usize).or_default();
            let whole_frame = records.len() + FRAME_SLACK_BYTES >= frame_bytes;
            entry.0.push(ProduceItem {
                topic: name.clone(),
                partition: p.index,
                records,
                infos,
                whole_frame,
            });
            entry.1.push((ti, pi));
        }
        results.push(row);
    }

    // Nothing of the request is a view of the frame any more but the items' records.
    let names: Vec<_> = std::mem::take(&mut req.topic_data)
        .into_iter()
        .map(|t| t.name)
        .collect();
    drop(req);

    // Stage one: this shard appends (in memory) before the next request on this connection
    // is read. A peer shard's items go on its produce lane, which appends them in the order
    // sent, so the connection does not wait for them here (acks=0 does, to count errors).
    let mut local = Vec::with_capacity(1);
    let mut remote = Vec::with_capacity(per_shard.len());
    for (target, (items, slots)) in per_shard {
        let (tx, rx) = oneshot::channel();
        // A peer replies once its appends are stored (the connection does not wait for them
        // in stage one, so it needs nothing sooner): one wake-up of this shard, not two.
        let msg = ShardMsg::Produce {
            acks,
            items,
            reply_when_stored: target != s.id && acks != 0,
            reply: tx,
        };
        if target == s.id {
            s.send(target, msg).await;
            local.push((rx, slots));
        } else {
            s.send_produce(target, msg).await;
            remote.push((rx, slots));
        }
    }
    let version = frame.api_version;
    let mut durable = Vec::new();
    for (rx, slots) in local {
        take_reply(rx.await, &slots, &mut results, &mut durable, version);
    }
    if acks == 0 {
        for (rx, slots) in remote {
            take_reply(rx.await, &slots, &mut results, &mut durable, version);
        }
        let first = results
            .iter()
            .flatten()
            .map(|p| p.error_code)
            .find(|c| *c != NONE);
        crate::metrics::request_outcome(frame.api_key as i16, first.unwrap_or(NONE));
        return Ok(futures::future::ready(None).boxed_local());
    }

    // Stage two: the peers' appends, then acks=all waits for the owners' fdatasync, acks=1 for
    // their disk write.
    Ok(async move {
        for (rx, slots) in remote {
            take_reply(rx.await, &slots, &mut results, &mut durable, version);
        }
        for (d, slots) in durable {
            let code = match d.await {
                Ok(Ok(())) => NONE,
                Ok(Err(code)) => code,
                Err(_) => NOT_LEADER_OR_FOLLOWER,
            };
            if code != NONE {
                for (ti, pi) in slots {
                    results[ti][pi].error_code = code;
                    results[ti][pi].base_offset = -1;
                }
            }
        }
        // KIP-951 (v10+): where the leader is, for a producer that asked the wrong broker.
        let mut endpoints = super::topics::NodeEndpoints::default();
        if frame.api_version >= 10 {
            let image = shard().image();
            for (name, row) in names.iter().zip(&mut results) {
                for p in row
                    .iter_mut()
                    .filter(|p| p.error_code == NOT_LEADER_OR_FOLLOWER)
                {
                    let (leader, epoch, endpoint) =
                        super::topics::current_leader(&image, name.0.as_str(), p.index);
                    p.current_leader = LeaderIdAndEpoch::default()
                        .with_leader_id(leader.into())
                        .with_leader_epoch(epoch);
                    endpoints.add(leader, endpoint);
                }
            }
        }
        let resp = ProduceResponse::default()
            .with_responses(
                names
                    .into_iter()
                    .zip(results)
                    .map(|(name, partition_responses)| {
                        TopicProduceResponse::default()
                            .with_name(name)
                            .with_partition_responses(partition_responses)
                    })
                    .collect(),
            )
            .with_node_endpoints(
                endpoints
                    .into_entries()
                    .map(|(id, (host, port, rack))| {
                        NodeEndpoint::default()
                            .with_node_id(id.into())
                            .with_host(StrBytes::from_string(host))
                            .with_port(port)
                            .with_rack(rack.map(StrBytes::from_string))
                    })
                    .collect(),
            );
        match respond(&frame, OutBuf::new(), &resp) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                None
            }
        }
    }
    .boxed_local())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::records::*;

    #[test]
    fn keyless_records_are_found_by_index() {
        let rec = |i: i64, key: Option<&'static [u8]>| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            delete_horizon: false,
            offset: i,
            sequence: i as i32 - 1,
            timestamp: 1_000,
            key: key.map(bytes::Bytes::from_static),
            value: Some(bytes::Bytes::from_static(b"v")),
            headers: Default::default(),
        };
        let mut b = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut b,
            &[
                rec(0, Some(b"k")),
                rec(1, None),
                rec(2, Some(b"k")),
                rec(3, None),
            ],
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .unwrap();
        assert_eq!(keyless_records(&b.freeze()), vec![1, 3]);
    }
}

/// Fills the response slots of one owner's items from its append reply (a dropped reply: the
/// owner is gone, NOT_LEADER_OR_FOLLOWER), and keeps its durability wait.
fn take_reply(
    reply: Result<ProduceReply, oneshot::Canceled>,
    slots: &[(usize, usize)],
    results: &mut [Vec<PartitionProduceResponse>],
    durable: &mut Vec<(oneshot::Receiver<Result<(), i16>>, Vec<(usize, usize)>)>,
    api_version: i16,
) {
    match reply {
        Ok(reply) => {
            for (r, &(ti, pi)) in reply.results.iter().zip(slots) {
                let slot = &mut results[ti][pi];
                slot.error_code = r.error;
                slot.base_offset = r.base_offset;
                slot.log_append_time_ms = r.log_append_time_ms;
                if api_version >= 5 {
                    slot.log_start_offset = r.log_start_offset;
                }
            }
            if let Some(d) = reply.durable {
                durable.push((d, slots.to_vec()));
            }
        }
        Err(_) => {
            for &(ti, pi) in slots {
                results[ti][pi].error_code = NOT_LEADER_OR_FOLLOWER;
            }
        }
    }
}
