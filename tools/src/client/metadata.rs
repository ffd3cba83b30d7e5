//! Cluster metadata as a client sees it: brokers, topics, partition leaders.

use std::collections::HashMap;

use anyhow::{bail, Result};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::conn::Conn;

#[derive(Clone, Debug, Default)]
pub struct TopicInfo {
    pub error: i16,
    pub internal: bool,
    /// Leader node per partition (index = partition).
    pub leaders: Vec<i32>,
    pub replicas: Vec<Vec<i32>>,
    pub isr: Vec<Vec<i32>>,
}

#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub cluster_id: Option<String>,
    pub controller: i32,
    pub brokers: HashMap<i32, String>,
    pub topics: HashMap<String, TopicInfo>,
}

impl Cluster {
    /// Fetches metadata for `topics` (all topics when None), creating missing ones when the
    /// broker allows it and `auto_create` is set.
    pub fn fetch(conn: &mut Conn, topics: Option<&[String]>, auto_create: bool) -> Result<Cluster> {
        let req = MetadataRequest::default()
            .with_topics(topics.map(|ts| {
                ts.iter()
                    .map(|t| {
                        MetadataRequestTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
                    })
                    .collect()
            }))
            .with_allow_auto_topic_creation(auto_create);
        let (r, _): (MetadataResponse, i16) = conn.call(ApiKey::Metadata, 12, &req)?;
        let mut c = Cluster {
            cluster_id: r.cluster_id.map(|s| s.to_string()),
            controller: r.controller_id.0,
            brokers: r
                .brokers
                .iter()
                .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
                .collect(),
            topics: HashMap::new(),
        };
        for t in r.topics {
            let Some(name) = t.name else { continue };
            let mut parts: Vec<_> = t.partitions.into_iter().collect();
            parts.sort_by_key(|p| p.partition_index);
            c.topics.insert(
                name.0.to_string(),
                TopicInfo {
                    error: t.error_code,
                    internal: t.is_internal,
                    leaders: parts.iter().map(|p| p.leader_id.0).collect(),
                    replicas: parts
                        .iter()
                        .map(|p| p.replica_nodes.iter().map(|b| b.0).collect())
                        .collect(),
                    isr: parts
                        .iter()
                        .map(|p| p.isr_nodes.iter().map(|b| b.0).collect())
                        .collect(),
                },
            );
        }
        Ok(c)
    }

    pub fn partitions(&self, topic: &str) -> Result<usize> {
        match self.topics.get(topic) {
            Some(t) if t.error == 0 && !t.leaders.is_empty() => Ok(t.leaders.len()),
            Some(t) if t.error != 0 => bail!("topic {topic}: {}", crate::error_name(t.error)),
            _ => bail!("topic {topic} does not exist"),
        }
    }

    pub fn leader_addr(&self, topic: &str, partition: i32) -> Option<&str> {
        let t = self.topics.get(topic)?;
        let leader = *t.leaders.get(usize::try_from(partition).ok()?)?;
        self.brokers.get(&leader).map(|s| s.as_str())
    }
}
