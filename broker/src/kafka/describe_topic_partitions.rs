//! DescribeTopicPartitions v0 (KIP-966): the partitions of the named topics (or of all
//! topics), in pages. Topics are answered in name order from the request's cursor (topic,
//! first partition); a response holds at most `response_partition_limit` partitions (and never
//! more than Kafka's `max.request.partition.size.limit` default, 2000), and when more remain it
//! ends with the cursor to ask for next. A topic is only cut at a partition boundary when it
//! alone does not fit; a topic that does not fit any more starts the next page.
//!
//! As Kafka: a named topic that does not exist is UNKNOWN_TOPIC_OR_PARTITION (or
//! INVALID_TOPIC_EXCEPTION for an invalid name), listing all topics never lists errors, a
//! cursor outside the named topics or with a negative partition fails every named topic with
//! INVALID_REQUEST. Weir has no eligible leader replicas (KIP-966 ELR is off, as in Kafka 3.9 by
//! default): both ELR lists are empty.

use std::collections::BTreeSet;

use kafka_protocol::messages::describe_topic_partitions_response::{
    Cursor, DescribeTopicPartitionsResponsePartition, DescribeTopicPartitionsResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, DescribeTopicPartitionsRequest, DescribeTopicPartitionsResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::metadata::{offline, TOPIC_OPERATIONS_ALL};
use super::{decode, respond, Response};
use crate::cluster::metadata::{is_internal_topic, validate_topic_name, Image, TopicMeta};
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::shard;

/// Kafka's `max.request.partition.size.limit` default: the most partitions one response lists.
pub const PARTITIONS_PER_RESPONSE_MAX: i32 = 2000;

pub fn handle(frame: RequestFrame) -> Result<Response, String> {
    let req: DescribeTopicPartitionsRequest = decode(&frame)?;
    let image = shard().image();
    let resp = describe(&image, &req);
    respond(&frame, OutBuf::new(), &resp)
}

fn name(n: &str) -> Option<TopicName> {
    Some(TopicName(StrBytes::from_string(n.to_string())))
}

fn ids(v: &[i32]) -> Vec<BrokerId> {
    v.iter().map(|&r| BrokerId(r)).collect()
}

/// The whole answer, from the image alone.
pub fn describe(
    image: &Image,
    req: &DescribeTopicPartitionsRequest,
) -> DescribeTopicPartitionsResponse {
    let all = req.topics.is_empty();
    let cursor = req
        .cursor
        .as_ref()
        .map(|c| (c.topic_name.0.as_str(), c.partition_index));
    let from = cursor.map(|c| c.0).unwrap_or("");
    // In name order, each once, from the cursor's topic on. Bounded by the request's size (or
    // the image's topic count).
    let names: BTreeSet<&str> = if all {
        image
            .topics
            .keys()
            .map(String::as_str)
            .filter(|n| *n >= from)
            .collect()
    } else {
        req.topics
            .iter()
            .map(|t| t.name.0.as_str())
            .filter(|n| *n >= from)
            .collect()
    };
    let bad_cursor = match cursor {
        Some((topic, partition)) => partition < 0 || (!all && !names.contains(topic)),
        None => false,
    };
    if bad_cursor {
        return DescribeTopicPartitionsResponse::default().with_topics(
            req.topics
                .iter()
                .map(|t| {
                    DescribeTopicPartitionsResponseTopic::default()
                        .with_error_code(INVALID_REQUEST)
                        .with_name(Some(t.name.clone()))
                })
                .collect(),
        );
    }

    let mut remaining = req
        .response_partition_limit
        .clamp(1, PARTITIONS_PER_RESPONSE_MAX) as usize;
    let mut resp = DescribeTopicPartitionsResponse::default();
    for n in names {
        if remaining == 0 {
            // The previous topics filled the page: the next one starts the next page.
            resp.next_cursor = Some(
                Cursor::default()
                    .with_topic_name(TopicName(StrBytes::from_string(n.to_string())))
                    .with_partition_index(0),
            );
            break;
        }
        let Some(t) = image.topics.get(n) else {
            if !all {
                let code = if validate_topic_name(n).is_err() {
                    INVALID_TOPIC_EXCEPTION
                } else {
                    UNKNOWN_TOPIC_OR_PARTITION
                };
                resp.topics.push(
                    DescribeTopicPartitionsResponseTopic::default()
                        .with_error_code(code)
                        .with_name(name(n))
                        .with_is_internal(is_internal_topic(n))
                        .with_topic_authorized_operations(TOPIC_OPERATIONS_ALL),
                );
            }
            continue;
        };
        let start = match cursor {
            Some((topic, partition)) if topic == n => partition as usize,
            _ => 0,
        };
        let count = t.partitions.len();
        let end = count.min(start.saturating_add(remaining));
        resp.topics.push(topic_entry(image, n, t, start, end));
        if end < count {
            resp.next_cursor = Some(
                Cursor::default()
                    .with_topic_name(TopicName(StrBytes::from_string(n.to_string())))
                    .with_partition_index(end as i32),
            );
            break;
        }
        remaining -= end.saturating_sub(start);
    }
    resp
}

/// Partitions `start..end` of topic `n`.
fn topic_entry(
    image: &Image,
    n: &str,
    t: &TopicMeta,
    start: usize,
    end: usize,
) -> DescribeTopicPartitionsResponseTopic {
    let partitions = t
        .partitions
        .iter()
        .enumerate()
        .take(end)
        .skip(start)
        .map(|(i, p)| {
            let leader = if image.brokers.contains_key(&p.leader) {
                p.leader
            } else {
                -1
            };
            DescribeTopicPartitionsResponsePartition::default()
                .with_error_code(NONE)
                .with_partition_index(i as i32)
                .with_leader_id(BrokerId(leader))
                .with_leader_epoch(p.leader_epoch)
                .with_replica_nodes(ids(&p.replicas))
                .with_isr_nodes(ids(&p.isr))
                .with_eligible_leader_replicas(Some(Vec::new()))
                .with_last_known_elr(Some(Vec::new()))
                .with_offline_replicas(offline(image, &p.replicas))
        })
        .collect();
    DescribeTopicPartitionsResponseTopic::default()
        .with_error_code(NONE)
        .with_name(name(n))
        .with_topic_id(t.id)
        .with_is_internal(t.internal)
        .with_partitions(partitions)
        .with_topic_authorized_operations(TOPIC_OPERATIONS_ALL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::metadata::{BrokerMeta, PartitionMeta};
    use kafka_protocol::messages::describe_topic_partitions_request::{
        Cursor as ReqCursor, TopicRequest,
    };

    fn image(topics: &[(&str, usize)]) -> Image {
        let mut image = Image::default();
        for (i, &(n, count)) in topics.iter().enumerate() {
            let partitions = (0..count)
                .map(|_| PartitionMeta {
                    shard: 0,
                    leader_epoch: 3,
                    replicas: vec![1, 2],
                    isr: vec![1],
                    leader: 1,
                    partition_epoch: 0,
                    adding: vec![],
                    removing: vec![],
                })
                .collect();
            image.topics.insert(
                n.to_string(),
                TopicMeta {
                    id: uuid::Uuid::from_u128(i as u128 + 1),
                    partitions,
                    configs: Default::default(),
                    internal: false,
                },
            );
        }
        image.brokers.insert(
            1,
            BrokerMeta {
                host: "h".into(),
                port: 1,
                rack: None,
                fenced: false,
            },
        );
        image
    }

    fn request(
        topics: &[&str],
        limit: i32,
        cursor: Option<(&str, i32)>,
    ) -> DescribeTopicPartitionsRequest {
        DescribeTopicPartitionsRequest::default()
            .with_topics(
                topics
                    .iter()
                    .map(|n| {
                        TopicRequest::default()
                            .with_name(TopicName(StrBytes::from_string(n.to_string())))
                    })
                    .collect(),
            )
            .with_response_partition_limit(limit)
            .with_cursor(cursor.map(|(t, p)| {
                ReqCursor::default()
                    .with_topic_name(TopicName(StrBytes::from_string(t.to_string())))
                    .with_partition_index(p)
            }))
    }

    /// (topic, error, first partition, partition count) of each topic, and the next cursor.
    type Shape = (Vec<(String, i16, i32, usize)>, Option<(String, i32)>);

    fn shape(r: &DescribeTopicPartitionsResponse) -> Shape {
        (
            r.topics
                .iter()
                .map(|t| {
                    (
                        t.name.as_ref().unwrap().0.to_string(),
                        t.error_code,
                        t.partitions
                            .first()
                            .map(|p| p.partition_index)
                            .unwrap_or(-1),
                        t.partitions.len(),
                    )
                })
                .collect(),
            r.next_cursor
                .as_ref()
                .map(|c| (c.topic_name.0.to_string(), c.partition_index)),
        )
    }

    #[test]
    fn pages_follow_the_cursor_over_topics_in_name_order() {
        let image = image(&[("b", 3), ("a", 2)]);
        let r = describe(&image, &request(&["b", "a"], 3, None));
        assert_eq!(
            shape(&r),
            (
                vec![("a".into(), 0, 0, 2), ("b".into(), 0, 0, 1)],
                Some(("b".into(), 1))
            )
        );
        let p = &r.topics[0].partitions[0];
        assert_eq!((p.leader_id.0, p.leader_epoch), (1, 3));
        assert_eq!(p.replica_nodes, vec![BrokerId(1), BrokerId(2)]);
        assert_eq!(p.offline_replicas, vec![BrokerId(2)], "not registered");
        assert_eq!(p.eligible_leader_replicas, Some(vec![]));
        assert_eq!(r.topics[0].topic_id, uuid::Uuid::from_u128(2));
        let r = describe(&image, &request(&["b", "a"], 3, Some(("b", 1))));
        assert_eq!(shape(&r), (vec![("b".into(), 0, 1, 2)], None));
        // A page filled exactly by one topic: the next starts the next page.
        let r = describe(&image, &request(&[], 2, None));
        assert_eq!(
            shape(&r),
            (vec![("a".into(), 0, 0, 2)], Some(("b".into(), 0)))
        );
        // A limit above Kafka's 2000 is 2000, below 1 is 1.
        let r = describe(&image, &request(&[], 0, None));
        assert_eq!(shape(&r).1, Some(("a".into(), 1)));
        let r = describe(&image, &request(&[], i32::MAX, None));
        assert_eq!(shape(&r).1, None);
        // A cursor past a topic's last partition lists it empty.
        let r = describe(&image, &request(&[], 10, Some(("a", 9))));
        assert_eq!(
            shape(&r),
            (vec![("a".into(), 0, -1, 0), ("b".into(), 0, 0, 3)], None)
        );
    }

    #[test]
    fn errors_as_kafka() {
        let image = image(&[("a", 1)]);
        let r = describe(&image, &request(&["zz", "a", "a", "bad/name"], 10, None));
        assert_eq!(
            shape(&r).0,
            vec![
                ("a".into(), 0, 0, 1),
                ("bad/name".into(), INVALID_TOPIC_EXCEPTION, -1, 0),
                ("zz".into(), UNKNOWN_TOPIC_OR_PARTITION, -1, 0),
            ]
        );
        assert_eq!(r.topics[2].topic_id, uuid::Uuid::nil());
        // Listing all topics never names missing ones; a cursor topic that does not exist is
        // fine then.
        let r = describe(&image, &request(&[], 10, Some(("0", 0))));
        assert_eq!(shape(&r).0.len(), 1);
        // A cursor outside the named topics, or with a negative partition: INVALID_REQUEST
        // for every named topic.
        for cursor in [("b", 0), ("a", -1)] {
            let r = describe(&image, &request(&["a", "a"], 10, Some(cursor)));
            assert_eq!(
                shape(&r),
                (
                    vec![
                        ("a".into(), INVALID_REQUEST, -1, 0),
                        ("a".into(), INVALID_REQUEST, -1, 0)
                    ],
                    None
                )
            );
        }
    }
}
