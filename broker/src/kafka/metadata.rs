//! Metadata v1-12, ApiVersions v0-4 (v4 only lets SupportedFeatures start at version 0, and
//! Weir lists no features) and DescribeCluster v0-1 (v1: KIP-919 endpoint types; a broker
//! answers for brokers only). Authorized operations (Metadata
//! v8+, DescribeCluster) are answered as Kafka without an authorizer does: all of them, when
//! asked for.

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, BrokerId, DescribeClusterRequest, DescribeClusterResponse,
    MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::{decode, respond, Response};
use crate::cluster::metadata::{validate_topic_name, Image, TopicMeta};
use crate::protocol::{encode_response, versions, OutBuf, RequestFrame};
use crate::shard::shard;

/// DescribeCluster v1 endpoint types (KIP-919).
const ENDPOINT_TYPE_BROKER: i8 = 1;
const ENDPOINT_TYPE_CONTROLLER: i8 = 2;
const MISMATCHED_ENDPOINT_TYPE: i16 = 114;
const UNSUPPORTED_ENDPOINT_TYPE: i16 = 115;

/// Kafka's "authorized operations not requested" marker.
const AUTHORIZED_OPERATIONS_OMITTED: i32 = i32::MIN;
/// What Kafka without an authorizer answers when a topic's authorized operations are asked
/// for: every operation a topic supports (READ, WRITE, CREATE, DELETE, ALTER, DESCRIBE,
/// DESCRIBE_CONFIGS, ALTER_CONFIGS), one bit per operation code.
pub(super) const TOPIC_OPERATIONS_ALL: i32 =
    1 << 3 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 7 | 1 << 8 | 1 << 10 | 1 << 11;
/// The same for the cluster (CREATE, ALTER, DESCRIBE, CLUSTER_ACTION, DESCRIBE_CONFIGS,
/// ALTER_CONFIGS, IDEMPOTENT_WRITE).
pub(super) const CLUSTER_OPERATIONS_ALL: i32 =
    1 << 5 | 1 << 7 | 1 << 8 | 1 << 9 | 1 << 10 | 1 << 11 | 1 << 12;

fn api_versions_body(error: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error)
        .with_api_keys(
            versions::SUPPORTED
                .iter()
                .map(|&(k, lo, hi)| {
                    ApiVersion::default()
                        .with_api_key(k as i16)
                        .with_min_version(lo)
                        .with_max_version(hi)
                })
                .collect(),
        )
}

pub fn handle_api_versions(frame: RequestFrame) -> Result<Response, String> {
    // The request body (client software name and version, v3) is informational only.
    respond(&frame, OutBuf::new(), &api_versions_body(NONE))
}

/// KIP-511: an ApiVersions request at a version we do not know gets a v0 response with
/// UNSUPPORTED_VERSION and our supported versions, so the client can retry at one of them.
pub fn unsupported_api_versions(correlation_id: i32) -> Vec<bytes::Bytes> {
    encode_response(
        OutBuf::new(),
        ApiKey::ApiVersions,
        0,
        correlation_id,
        &api_versions_body(UNSUPPORTED_VERSION),
    )
    .expect("ApiVersions v0 always encodes")
}

/// A replica is offline when its broker is fenced or not registered.
pub(super) fn offline(image: &Image, replicas: &[i32]) -> Vec<BrokerId> {
    replicas
        .iter()
        .filter(|r| image.brokers.get(r).is_none_or(|b| b.fenced))
        .map(|&r| BrokerId(r))
        .collect()
}

fn ids(v: &[i32]) -> Vec<BrokerId> {
    v.iter().map(|&r| BrokerId(r)).collect()
}

fn topic_entry(
    image: &Image,
    name: &str,
    t: &TopicMeta,
    version: i16,
    operations: i32,
) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_error_code(NONE)
        .with_name(Some(TopicName(StrBytes::from_string(name.to_string()))))
        .with_topic_id(if version >= 10 {
            t.id
        } else {
            uuid::Uuid::nil()
        })
        .with_is_internal(t.internal)
        .with_topic_authorized_operations(operations)
        .with_partitions(
            t.partitions
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    // As Kafka: a partition without a leader is listed with LEADER_NOT_AVAILABLE.
                    let error = if p.leader < 0 {
                        LEADER_NOT_AVAILABLE
                    } else {
                        NONE
                    };
                    MetadataResponsePartition::default()
                        .with_error_code(error)
                        .with_partition_index(i as i32)
                        .with_leader_id(BrokerId(p.leader))
                        .with_leader_epoch(if version >= 7 { p.leader_epoch } else { -1 })
                        .with_replica_nodes(ids(&p.replicas))
                        .with_isr_nodes(ids(&p.isr))
                        .with_offline_replicas(offline(image, &p.replicas))
                })
                .collect(),
        )
}

fn topic_error(
    name: Option<String>,
    id: uuid::Uuid,
    code: i16,
    operations: i32,
) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_error_code(code)
        .with_name(name.map(|n| TopicName(StrBytes::from_string(n))))
        .with_topic_id(id)
        .with_topic_authorized_operations(operations)
}

pub async fn handle_metadata(frame: RequestFrame) -> Result<Response, String> {
    let req: MetadataRequest = decode(&frame)?;
    let s = shard();
    let version = frame.api_version;
    let mut image = s.image();
    let auto =
        s.config.auto_create_topics && (frame.api_version < 4 || req.allow_auto_topic_creation);
    // v8+: authorized operations on request; without an authorizer, all of them (as Kafka).
    let topic_ops = if version >= 8 && req.include_topic_authorized_operations {
        TOPIC_OPERATIONS_ALL
    } else {
        AUTHORIZED_OPERATIONS_OMITTED
    };
    let cluster_ops = if (8..=10).contains(&version) && req.include_cluster_authorized_operations {
        CLUSTER_OPERATIONS_ALL
    } else {
        AUTHORIZED_OPERATIONS_OMITTED
    };
    let topics: Vec<MetadataResponseTopic> = match &req.topics {
        None => image
            .topics
            .iter()
            .map(|(n, t)| topic_entry(&image, n, t, version, topic_ops))
            .collect(),
        Some(list) => {
            if auto {
                let missing: Vec<String> = list
                    .iter()
                    .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
                    .filter(|n| !image.topics.contains_key(n))
                    .collect();
                if !missing.is_empty() {
                    super::produce::auto_create(missing).await;
                    image = s.image();
                }
            }
            list.iter()
                .map(|t| {
                    lookup(
                        &image,
                        t.name.as_ref().map(|n| n.0.to_string()),
                        t.topic_id,
                        version,
                        topic_ops,
                    )
                })
                .collect()
        }
    };
    let resp = MetadataResponse::default()
        .with_brokers(
            image
                .live_brokers()
                .map(|(id, b)| {
                    MetadataResponseBroker::default()
                        .with_node_id(BrokerId(id))
                        .with_host(StrBytes::from_string(b.host.clone()))
                        .with_port(b.port)
                        .with_rack(b.rack.clone().map(StrBytes::from_string))
                })
                .collect(),
        )
        .with_cluster_id(Some(StrBytes::from_string(s.cluster_id.to_string())))
        .with_controller_id(BrokerId(image.controller_id))
        .with_topics(topics)
        .with_cluster_authorized_operations(cluster_ops);
    respond(&frame, OutBuf::new(), &resp)
}

fn lookup(
    image: &Image,
    name: Option<String>,
    id: uuid::Uuid,
    version: i16,
    operations: i32,
) -> MetadataResponseTopic {
    match name {
        Some(n) => match image.topics.get(&n) {
            Some(t) => topic_entry(image, &n, t, version, operations),
            None => {
                let code = if validate_topic_name(&n).is_err() {
                    INVALID_TOPIC_EXCEPTION
                } else {
                    UNKNOWN_TOPIC_OR_PARTITION
                };
                topic_error(Some(n), uuid::Uuid::nil(), code, operations)
            }
        },
        None => match image.topic_by_id(id) {
            Some((n, t)) => topic_entry(image, n, t, version, operations),
            // As Kafka: unknown ids get no authorized operations.
            None => topic_error(None, id, UNKNOWN_TOPIC_ID, AUTHORIZED_OPERATIONS_OMITTED),
        },
    }
}

pub fn handle_describe_cluster(frame: RequestFrame) -> Result<Response, String> {
    let req: DescribeClusterRequest = decode(&frame)?;
    // KIP-919 (v1): a broker answers for brokers (endpoint type 1) only; v0 requests always
    // carry 1.
    if req.endpoint_type != ENDPOINT_TYPE_BROKER {
        let (code, message) = if req.endpoint_type == ENDPOINT_TYPE_CONTROLLER {
            (
                MISMATCHED_ENDPOINT_TYPE,
                "The request was sent to an endpoint of type broker, but we wanted an endpoint of type controller".to_string(),
            )
        } else {
            (
                UNSUPPORTED_ENDPOINT_TYPE,
                format!("Unsupported endpoint type {}", req.endpoint_type),
            )
        };
        let code = if frame.api_version == 0 {
            INVALID_REQUEST
        } else {
            code
        };
        let resp = DescribeClusterResponse::default()
            .with_error_code(code)
            .with_error_message(Some(StrBytes::from_string(message)))
            .with_endpoint_type(ENDPOINT_TYPE_BROKER)
            .with_cluster_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED);
        return respond(&frame, OutBuf::new(), &resp);
    }
    let s = shard();
    let image = s.image();
    let resp = DescribeClusterResponse::default()
        .with_endpoint_type(ENDPOINT_TYPE_BROKER)
        .with_cluster_id(StrBytes::from_string(s.cluster_id.to_string()))
        .with_controller_id(BrokerId(image.controller_id))
        .with_brokers(
            image
                .live_brokers()
                .map(|(id, b)| {
                    DescribeClusterBroker::default()
                        .with_broker_id(BrokerId(id))
                        .with_host(StrBytes::from_string(b.host.clone()))
                        .with_port(b.port)
                        .with_rack(b.rack.clone().map(StrBytes::from_string))
                })
                .collect(),
        )
        .with_cluster_authorized_operations(if req.include_cluster_authorized_operations {
            CLUSTER_OPERATIONS_ALL
        } else {
            AUTHORIZED_OPERATIONS_OMITTED
        });
    respond(&frame, OutBuf::new(), &resp)
}
