//! AlterPartitionReassignments v0-1 and ListPartitionReassignments v0 (KIP-455). Changes are
//! forwarded to the active controller (`decide::alter_reassignments`); a reassignment lives in
//! the metadata log as the partition's `adding`/`removing` replicas until every added replica
//! is in sync, when the controller drops the removed ones (and moves leadership off them).

use std::collections::BTreeMap;

use kafka_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use kafka_protocol::messages::list_partition_reassignments_response::{
    OngoingPartitionReassignment, OngoingTopicReassignment,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, BrokerId,
    ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::{decode, respond, Response};
use crate::cluster::controller;
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::{shard, ControlOp};

/// Partitions one request may name.
const PARTITIONS_MAX: usize = 100_000;

pub async fn handle_alter(frame: RequestFrame) -> Result<Response, String> {
    let req: AlterPartitionReassignmentsRequest = decode(&frame)?;
    let s = shard();
    let image = s.image();
    let rf_change_allowed = frame.api_version == 0 || req.allow_replication_factor_change;
    let mut early: Vec<Option<i16>> = Vec::new();
    let mut asks = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            if early.len() >= PARTITIONS_MAX {
                return Err("too many partitions in AlterPartitionReassignments".into());
            }
            let target: Option<Vec<i32>> =
                p.replicas.as_ref().map(|r| r.iter().map(|b| b.0).collect());
            let current_rf = image
                .topics
                .get(t.name.0.as_str())
                .and_then(|tm| tm.partitions.get(p.partition_index.max(0) as usize))
                .map(|pm| pm.replicas.len() - pm.adding.len());
            let rf_changes = matches!((&target, current_rf), (Some(r), Some(n)) if r.len() != n);
            if !rf_change_allowed && rf_changes {
                early.push(Some(INVALID_REPLICATION_FACTOR));
            } else {
                early.push(None);
                asks.push((t.name.0.to_string(), p.partition_index, target));
            }
        }
    }
    let mut answers = if asks.is_empty() {
        Vec::new()
    } else {
        controller::request(&s, ControlOp::AlterReassignments(asks))
            .await
            .unwrap_or_default()
    }
    .into_iter();
    let mut early = early.into_iter();
    let mut responses = Vec::with_capacity(req.topics.len());
    for t in &req.topics {
        let mut parts = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let (code, msg) = match early.next().flatten() {
                Some(code) => (
                    code,
                    Some("The replication factor may not change".to_string()),
                ),
                None => match answers.next() {
                    Some(Ok((_, code))) => (code, None),
                    Some(Err(e)) => (e.code(), Some(e.message())),
                    None => (NOT_CONTROLLER, Some("the controller did not answer".into())),
                },
            };
            parts.push(
                ReassignablePartitionResponse::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(code)
                    .with_error_message(msg.map(StrBytes::from_string)),
            );
        }
        responses.push(
            ReassignableTopicResponse::default()
                .with_name(t.name.clone())
                .with_partitions(parts),
        );
    }
    let resp = AlterPartitionReassignmentsResponse::default()
        .with_allow_replication_factor_change(rf_change_allowed)
        .with_error_code(NONE)
        .with_responses(responses);
    respond(&frame, OutBuf::new(), &resp)
}

pub async fn handle_list(frame: RequestFrame) -> Result<Response, String> {
    let req: ListPartitionReassignmentsRequest = decode(&frame)?;
    let image = shard().image();
    let wanted: Option<BTreeMap<&str, &Vec<i32>>> = req.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.name.0.as_str(), &t.partition_indexes))
            .collect()
    });
    let ids = |v: &[i32]| v.iter().map(|&b| BrokerId(b)).collect::<Vec<_>>();
    let mut topics = Vec::new();
    for (name, t) in &image.topics {
        let only = match &wanted {
            Some(w) => match w.get(name.as_str()) {
                Some(list) => Some(*list),
                None => continue,
            },
            None => None,
        };
        let parts: Vec<OngoingPartitionReassignment> = t
            .partitions
            .iter()
            .enumerate()
            .filter(|(i, pm)| {
                (!pm.adding.is_empty() || !pm.removing.is_empty())
                    && only.is_none_or(|l| l.contains(&(*i as i32)))
            })
            .map(|(i, pm)| {
                OngoingPartitionReassignment::default()
                    .with_partition_index(i as i32)
                    .with_replicas(ids(&pm.replicas))
                    .with_adding_replicas(ids(&pm.adding))
                    .with_removing_replicas(ids(&pm.removing))
            })
            .collect();
        if !parts.is_empty() {
            topics.push(
                OngoingTopicReassignment::default()
                    .with_name(TopicName(StrBytes::from_string(name.clone())))
                    .with_partitions(parts),
            );
        }
    }
    let resp = ListPartitionReassignmentsResponse::default()
        .with_error_code(NONE)
        .with_topics(topics);
    respond(&frame, OutBuf::new(), &resp)
}

/// UnregisterBroker v0 (decommissioning, KIP-500 era): forwarded to the controller
/// (`decide::unregister_broker`).
pub async fn handle_unregister(frame: RequestFrame) -> Result<Response, String> {
    let req: kafka_protocol::messages::UnregisterBrokerRequest = decode(&frame)?;
    let s = shard();
    let answer = controller::request(&s, ControlOp::UnregisterBroker(req.broker_id.0))
        .await
        .unwrap_or_default();
    let (code, msg) = match answer.first() {
        Some(Ok((_, code))) => (*code, None),
        Some(Err(e)) => (e.code(), Some(e.message())),
        None => (
            NOT_CONTROLLER,
            Some("the controller did not answer".to_string()),
        ),
    };
    let resp = kafka_protocol::messages::UnregisterBrokerResponse::default()
        .with_error_code(code)
        .with_error_message(msg.map(StrBytes::from_string));
    respond(&frame, OutBuf::new(), &resp)
}
