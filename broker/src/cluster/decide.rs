//! STUB until the helper's branch lands.
use super::metadata::{NewTopic, TopicError};
use super::quorum::{BrokerId, ClusterImage, MetadataRecord};
use crate::config::{Config, ConfigEdit};
pub type Answers = Vec<Result<(i32, i16), TopicError>>;
pub fn create_topics(
    _: &ClusterImage,
    _: &Config,
    t: &[NewTopic],
    _: bool,
    _: &mut u64,
) -> (Answers, Vec<MetadataRecord>) {
    (vec![Err(TopicError::Unknown); t.len()], vec![])
}
pub fn delete_topics(_: &ClusterImage, t: &[String]) -> (Answers, Vec<MetadataRecord>) {
    (vec![Err(TopicError::Unknown); t.len()], vec![])
}
pub fn create_partitions(
    _: &ClusterImage,
    _: &Config,
    t: &[(String, i32)],
    _: bool,
    _: &mut u64,
) -> (Answers, Vec<MetadataRecord>) {
    (vec![Err(TopicError::Unknown); t.len()], vec![])
}
pub fn alter_topic_configs(
    _: &ClusterImage,
    _: &Config,
    t: &[(String, ConfigEdit)],
    _: bool,
) -> (Answers, Vec<MetadataRecord>) {
    (vec![Err(TopicError::Unknown); t.len()], vec![])
}
pub fn fence_broker(img: &ClusterImage, node: BrokerId) -> Vec<MetadataRecord> {
    img.brokers
        .get(&node)
        .map(|b| {
            vec![MetadataRecord::FenceBroker {
                node_id: node,
                epoch: b.epoch,
            }]
        })
        .unwrap_or_default()
}
pub fn unfence_broker(img: &ClusterImage, node: BrokerId) -> Vec<MetadataRecord> {
    img.brokers
        .get(&node)
        .map(|b| {
            vec![MetadataRecord::UnfenceBroker {
                node_id: node,
                epoch: b.epoch,
            }]
        })
        .unwrap_or_default()
}
