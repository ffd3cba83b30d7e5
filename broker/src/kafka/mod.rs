//! Kafka API handlers. Each request runs in two stages:
//!
//! 1. `dispatch` does the work that must happen in request order on a connection (decoding,
//!    routing, appending) and returns;
//! 2. the returned `Pending` future finishes the response (for acks=all produce: waiting for
//!    the group-commit fsync) while the connection already reads its next request.
//!
//! Responses are written in request order by the connection's writer.

pub mod admin;
pub mod alter_configs;
pub mod consumer_group;
pub mod delete_records;
pub mod describe_topic_partitions;
pub mod elect_leaders;
pub mod errors;
pub mod fetch;
pub mod fetch_session;
pub mod groups;
pub mod init_producer_id;
pub mod list_offsets;
pub mod log_dirs;
pub mod metadata;
pub mod offset_for_leader_epoch;
pub mod outcome;
pub mod produce;
pub mod reassign;
pub mod topics;
pub mod txn;

use bytes::Bytes;
use futures::future::LocalBoxFuture;
use futures::FutureExt;
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::Encodable;

use crate::protocol::{encode_response, OutBuf, RequestFrame};

/// A response frame as buffers, or None (acks=0 produce has no response).
pub type Response = Option<Vec<Bytes>>;
pub type Pending = LocalBoxFuture<'static, Response>;

/// Stage one of a request. Err: the request is malformed; close the connection.
pub async fn dispatch(frame: RequestFrame) -> Result<Pending, String> {
    let ready =
        |r: Result<Response, String>| r.map(|resp| futures::future::ready(resp).boxed_local());
    match frame.api_key {
        ApiKey::Produce => produce::handle(frame).await,
        ApiKey::Fetch => ready(fetch::handle(frame).await),
        ApiKey::ListOffsets => ready(list_offsets::handle(frame).await),
        ApiKey::OffsetForLeaderEpoch => ready(offset_for_leader_epoch::handle(frame).await),
        ApiKey::DeleteRecords => ready(delete_records::handle(frame).await),
        ApiKey::Metadata => ready(metadata::handle_metadata(frame).await),
        ApiKey::DescribeTopicPartitions => ready(describe_topic_partitions::handle(frame)),
        ApiKey::ApiVersions => ready(metadata::handle_api_versions(frame)),
        ApiKey::DescribeCluster => ready(metadata::handle_describe_cluster(frame)),
        ApiKey::CreateTopics => ready(admin::handle_create_topics(frame).await),
        ApiKey::DeleteTopics => ready(admin::handle_delete_topics(frame).await),
        ApiKey::CreatePartitions => ready(admin::handle_create_partitions(frame).await),
        ApiKey::DescribeConfigs => ready(admin::handle_describe_configs(frame)),
        ApiKey::ElectLeaders => ready(elect_leaders::handle(frame).await),
        ApiKey::DescribeLogDirs => ready(log_dirs::handle(frame).await),
        ApiKey::AlterPartitionReassignments => ready(reassign::handle_alter(frame).await),
        ApiKey::ListPartitionReassignments => ready(reassign::handle_list(frame).await),
        ApiKey::UnregisterBroker => ready(reassign::handle_unregister(frame).await),
        ApiKey::AlterConfigs => ready(alter_configs::handle_alter_configs(frame).await),
        ApiKey::IncrementalAlterConfigs => {
            ready(alter_configs::handle_incremental_alter_configs(frame).await)
        }
        ApiKey::InitProducerId => ready(init_producer_id::handle(frame).await),
        ApiKey::FindCoordinator => ready(groups::handle_find_coordinator(frame)),
        ApiKey::JoinGroup => ready(groups::handle_join(frame).await),
        ApiKey::SyncGroup => ready(groups::handle_sync(frame).await),
        ApiKey::Heartbeat => ready(groups::handle_heartbeat(frame).await),
        ApiKey::LeaveGroup => ready(groups::handle_leave(frame).await),
        ApiKey::OffsetCommit => ready(groups::handle_offset_commit(frame).await),
        ApiKey::OffsetFetch => ready(groups::handle_offset_fetch(frame).await),
        ApiKey::ListGroups => ready(groups::handle_list_groups(frame).await),
        ApiKey::DescribeGroups => ready(groups::handle_describe_groups(frame).await),
        ApiKey::DeleteGroups => ready(groups::handle_delete_groups(frame).await),
        ApiKey::OffsetDelete => ready(groups::handle_offset_delete(frame).await),
        ApiKey::ConsumerGroupHeartbeat => ready(consumer_group::handle_heartbeat(frame).await),
        ApiKey::ConsumerGroupDescribe => ready(consumer_group::handle_describe(frame).await),
        ApiKey::AddPartitionsToTxn => ready(txn::handle_add_partitions(frame).await),
        ApiKey::AddOffsetsToTxn => ready(txn::handle_add_offsets(frame).await),
        ApiKey::EndTxn => ready(txn::handle_end_txn(frame).await),
        ApiKey::WriteTxnMarkers => ready(txn::handle_write_markers(frame).await),
        ApiKey::TxnOffsetCommit => ready(groups::handle_txn_offset_commit(frame).await),
        ApiKey::DescribeTransactions => ready(txn::handle_describe(frame).await),
        ApiKey::ListTransactions => ready(txn::handle_list(frame).await),
        other => Err(format!("API {other:?} is not supported")),
    }
}

/// The broker leading `partition` of a coordinator topic (`__consumer_offsets`,
/// `__transaction_state`), with the address it registered: the group or transaction
/// coordinator FindCoordinator names.
pub fn coordinator_node(
    s: &crate::shard::Shard,
    topic: &str,
    partition: i32,
) -> Result<(i32, String, i32), i16> {
    let image = s.image();
    let leader = image
        .topics
        .get(topic)
        .and_then(|t| t.partitions.get(partition as usize))
        .map(|p| p.leader)
        .ok_or(errors::COORDINATOR_NOT_AVAILABLE)?;
    match image.brokers.get(&leader) {
        Some(b) if !b.fenced => Ok((leader, b.host.clone(), b.port)),
        _ => Err(errors::COORDINATOR_NOT_AVAILABLE),
    }
}

/// The shard of this broker that coordinates `partition` of a coordinator topic:
/// NOT_COORDINATOR when another live broker leads it (the client asks FindCoordinator again),
/// COORDINATOR_NOT_AVAILABLE while it has no live leader.
pub fn coordinator_shard(
    s: &crate::shard::Shard,
    topic: &str,
    partition: i32,
) -> Result<(usize, i32), i16> {
    match s.image().route(topic, partition, s.config.node_id) {
        Ok(shard) => Ok((shard as usize, partition)),
        Err(errors::NOT_LEADER_OR_FOLLOWER) if coordinator_node(s, topic, partition).is_ok() => {
            Err(errors::NOT_COORDINATOR)
        }
        Err(_) => Err(errors::COORDINATOR_NOT_AVAILABLE),
    }
}

/// Encodes `body` as the response to `frame`.
pub fn respond<T: Encodable + outcome::Outcome>(
    frame: &RequestFrame,
    out: OutBuf,
    body: &T,
) -> Result<Response, String> {
    crate::metrics::request_outcome(frame.api_key as i16, body.error_code());
    encode_response(
        out,
        frame.api_key,
        frame.api_version,
        frame.header.correlation_id,
        body,
    )
    .map(Some)
    .map_err(|e| {
        format!(
            "encoding {:?} v{} response: {e:#}",
            frame.api_key, frame.api_version
        )
    })
}

pub fn decode<T: kafka_protocol::protocol::Decodable>(frame: &RequestFrame) -> Result<T, String> {
    crate::protocol::decode_body(frame).map_err(|e| format!("{e:#}"))
}
