//! Metadata v1-12, ApiVersions v0-3 and DescribeCluster v0.

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, BrokerId, DescribeClusterResponse, MetadataRequest,
    MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::{decode, respond, Response};
use crate::cluster::metadata::{validate_topic_name, Image, TopicMeta};
use crate::protocol::{encode_response, versions, OutBuf, RequestFrame};
use crate::shard::shard;

/// Kafka's "authorized operations not requested" marker.
const AUTHORIZED_OPERATIONS_OMITTED: i32 = i32::MIN;

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

fn topic_entry(name: &str, t: &TopicMeta, node: i32, version: i16) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_error_code(NONE)
        .with_name(Some(TopicName(StrBytes::from_string(name.to_string()))))
        .with_topic_id(if version >= 10 {
            t.id
        } else {
            uuid::Uuid::nil()
        })
        .with_is_internal(t.internal)
        .with_topic_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED)
        .with_partitions(
            t.partitions
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    MetadataResponsePartition::default()
                        .with_error_code(NONE)
                        .with_partition_index(i as i32)
                        .with_leader_id(BrokerId(node))
                        .with_leader_epoch(if version >= 7 { p.leader_epoch } else { -1 })
                        .with_replica_nodes(vec![BrokerId(node)])
                        .with_isr_nodes(vec![BrokerId(node)])
                        .with_offline_replicas(vec![])
                })
                .collect(),
        )
}

fn topic_error(name: Option<String>, id: uuid::Uuid, code: i16) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_error_code(code)
        .with_name(name.map(|n| TopicName(StrBytes::from_string(n))))
        .with_topic_id(id)
        .with_topic_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED)
}

pub async fn handle_metadata(frame: RequestFrame) -> Result<Response, String> {
    let req: MetadataRequest = decode(&frame)?;
    let s = shard();
    let node = s.config.node_id;
    let version = frame.api_version;
    let mut image = s.image();
    let auto =
        s.config.auto_create_topics && (frame.api_version < 4 || req.allow_auto_topic_creation);
    let topics: Vec<MetadataResponseTopic> = match &req.topics {
        None => image
            .topics
            .iter()
            .map(|(n, t)| topic_entry(n, t, node, version))
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
                        node,
                        version,
                    )
                })
                .collect()
        }
    };
    let resp = MetadataResponse::default()
        .with_brokers(vec![MetadataResponseBroker::default()
            .with_node_id(BrokerId(node))
            .with_host(StrBytes::from_string(s.config.advertised_host.clone()))
            .with_port(s.config.advertised_port)])
        .with_cluster_id(Some(StrBytes::from_string(s.cluster_id.to_string())))
        .with_controller_id(BrokerId(node))
        .with_topics(topics)
        .with_cluster_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED);
    respond(&frame, OutBuf::new(), &resp)
}

fn lookup(
    image: &Image,
    name: Option<String>,
    id: uuid::Uuid,
    node: i32,
    version: i16,
) -> MetadataResponseTopic {
    match name {
        Some(n) => match image.topics.get(&n) {
            Some(t) => topic_entry(&n, t, node, version),
            None => {
                let code = if validate_topic_name(&n).is_err() {
                    INVALID_TOPIC_EXCEPTION
                } else {
                    UNKNOWN_TOPIC_OR_PARTITION
                };
                topic_error(Some(n), uuid::Uuid::nil(), code)
            }
        },
        None => match image.topic_by_id(id) {
            Some((n, t)) => topic_entry(n, t, node, version),
            None => topic_error(None, id, UNKNOWN_TOPIC_ID),
        },
    }
}

pub fn handle_describe_cluster(frame: RequestFrame) -> Result<Response, String> {
    let s = shard();
    let node = s.config.node_id;
    let resp = DescribeClusterResponse::default()
        .with_cluster_id(StrBytes::from_string(s.cluster_id.to_string()))
        .with_controller_id(BrokerId(node))
        .with_brokers(vec![DescribeClusterBroker::default()
            .with_broker_id(BrokerId(node))
            .with_host(StrBytes::from_string(s.config.advertised_host.clone()))
            .with_port(s.config.advertised_port)])
        .with_cluster_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED);
    respond(&frame, OutBuf::new(), &resp)
}
