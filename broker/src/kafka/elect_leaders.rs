//! ElectLeaders v0-2 (KIP-183, KIP-460): preferred leader election, forwarded to the active
//! controller (`decide::elect_leaders`). A request naming no partitions elects every partition
//! whose preferred replica does not lead. Unclean elections are refused per partition (Weir
//! elects from the ISR only).

use std::collections::BTreeMap;

use kafka_protocol::messages::elect_leaders_response::{PartitionResult, ReplicaElectionResult};
use kafka_protocol::messages::{ElectLeadersRequest, ElectLeadersResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::{decode, respond, Response};
use crate::cluster::controller;
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::{shard, ControlOp};

/// Partitions one request may name.
const PARTITIONS_MAX: usize = 100_000;

pub async fn handle(frame: RequestFrame) -> Result<Response, String> {
    let req: ElectLeadersRequest = decode(&frame)?;
    let s = shard();
    let preferred = frame.api_version == 0 || req.election_type == 0;
    let list: Vec<(String, i32)> = match &req.topic_partitions {
        Some(tps) => tps
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(move |p| (t.topic.0.to_string(), *p))
            })
            .take(PARTITIONS_MAX)
            .collect(),
        None => {
            let image = s.image();
            image
                .topics
                .iter()
                .flat_map(|(name, t)| {
                    t.partitions
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.replicas.first().is_some_and(|&r| r != p.leader))
                        .map(move |(i, _)| (name.clone(), i as i32))
                })
                .take(PARTITIONS_MAX)
                .collect()
        }
    };
    let answers = if list.is_empty() {
        Vec::new()
    } else {
        controller::request(&s, ControlOp::ElectLeaders(list.clone(), preferred))
            .await
            .unwrap_or_default()
    };
    let mut by_topic: BTreeMap<String, Vec<PartitionResult>> = BTreeMap::new();
    for (i, (topic, partition)) in list.iter().enumerate() {
        let (code, msg) = match answers.get(i) {
            Some(Ok((_, code))) => (*code, None),
            Some(Err(e)) => (e.code(), Some(e.message())),
            None => (
                NOT_CONTROLLER,
                Some("the controller did not answer".to_string()),
            ),
        };
        let msg = msg.or_else(|| match code {
            PREFERRED_LEADER_NOT_AVAILABLE => {
                Some("The preferred replica is not live or not in the ISR".into())
            }
            ELECTION_NOT_NEEDED => Some("Leader election not needed for topic partition".into()),
            _ => None,
        });
        by_topic.entry(topic.clone()).or_default().push(
            PartitionResult::default()
                .with_partition_id(*partition)
                .with_error_code(code)
                .with_error_message(msg.map(StrBytes::from_string)),
        );
    }
    let resp = ElectLeadersResponse::default()
        .with_error_code(NONE)
        .with_replica_election_results(
            by_topic
                .into_iter()
                .map(|(t, parts)| {
                    ReplicaElectionResult::default()
                        .with_topic(TopicName(StrBytes::from_string(t)))
                        .with_partition_result(parts)
                })
                .collect(),
        );
    respond(&frame, OutBuf::new(), &resp)
}
