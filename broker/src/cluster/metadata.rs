//! Cluster metadata: topics, their partitions, configs, and the shard table saying which shard
//! owns each partition. Shard 0 is the controller: it alone changes metadata, persists each new
//! image, and broadcasts it to every shard. Every shard holds the same immutable image
//! (`Arc<Image>`), so routing a request never takes a lock.
//!
//! On disk: `<data-dir>/weir-metadata.json`, replaced atomically (write temp, fsync, rename,
//! fsync dir), and `<data-dir>/meta.properties` with `cluster.id` and `node.id` as Kafka writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Config, LogConfig, PARTITIONS_PER_BROKER_MAX, PARTITIONS_PER_TOPIC_MAX};

pub const METADATA_FILE: &str = "weir-metadata.json";
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartitionMeta {
    /// The shard (core) that owns this partition's log.
    pub shard: u32,
    pub leader_epoch: i32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TopicMeta {
    pub id: uuid::Uuid,
    pub partitions: Vec<PartitionMeta>,
    /// Topic-level config overrides, as given at creation.
    pub configs: BTreeMap<String, String>,
    #[serde(default)]
    pub internal: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Image {
    pub version: u64,
    pub topics: BTreeMap<String, TopicMeta>,
    /// Rotates the first shard of each new topic so partitions spread evenly.
    pub next_shard: u32,
    /// Producer ids below this have been handed out (or reserved): never reused.
    #[serde(default)]
    pub producer_id_block_end: i64,
}

impl Image {
    pub fn partition_count(&self) -> usize {
        self.topics.values().map(|t| t.partitions.len()).sum()
    }

    pub fn owner(&self, topic: &str, partition: i32) -> Option<u32> {
        let t = self.topics.get(topic)?;
        usize::try_from(partition)
            .ok()
            .and_then(|p| t.partitions.get(p))
            .map(|p| p.shard)
    }

    /// Effective log config of a topic: broker defaults plus the topic's overrides.
    pub fn log_config(&self, base: &LogConfig, topic: &str) -> LogConfig {
        self.topics
            .get(topic)
            .and_then(|t| base.with_topic_overrides(&t.configs).ok())
            .unwrap_or_else(|| base.clone())
    }

    pub fn topic_by_id(&self, id: uuid::Uuid) -> Option<(&String, &TopicMeta)> {
        self.topics.iter().find(|(_, t)| t.id == id)
    }
}

/// Why a topic change was refused; each is one Kafka error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    AlreadyExists,
    InvalidName(String),
    InvalidPartitions(String),
    InvalidReplicationFactor(String),
    InvalidConfig(String),
    Unknown,
    InvalidRequest(String),
}

impl TopicError {
    pub fn code(&self) -> i16 {
        use crate::kafka::errors::*;
        match self {
            TopicError::AlreadyExists => TOPIC_ALREADY_EXISTS,
            TopicError::InvalidName(_) => INVALID_TOPIC_EXCEPTION,
            TopicError::InvalidPartitions(_) => INVALID_PARTITIONS,
            TopicError::InvalidReplicationFactor(_) => INVALID_REPLICATION_FACTOR,
            TopicError::InvalidConfig(_) => INVALID_CONFIG,
            TopicError::Unknown => UNKNOWN_TOPIC_OR_PARTITION,
            TopicError::InvalidRequest(_) => INVALID_REQUEST,
        }
    }
    pub fn message(&self) -> String {
        match self {
            TopicError::AlreadyExists => "Topic already exists.".into(),
            TopicError::Unknown => "This server does not host this topic.".into(),
            TopicError::InvalidName(m)
            | TopicError::InvalidPartitions(m)
            | TopicError::InvalidReplicationFactor(m)
            | TopicError::InvalidConfig(m)
            | TopicError::InvalidRequest(m) => m.clone(),
        }
    }
}

/// Kafka's topic name rules: 1..=249 chars of [a-zA-Z0-9._-], not "." or "..".
pub fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::InvalidName(
            "Topic name is illegal, it can't be empty".into(),
        ));
    }
    if name == "." || name == ".." {
        return Err(TopicError::InvalidName(
            "Topic name cannot be \".\" or \"..\"".into(),
        ));
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(TopicError::InvalidName(format!(
            "Topic name is illegal, it can't be longer than {TOPIC_NAME_BYTES_MAX} characters"
        )));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
    {
        return Err(TopicError::InvalidName(format!(
            "Topic name \"{name}\" is illegal, it contains a character other than ASCII alphanumerics, '.', '_' and '-'"
        )));
    }
    Ok(())
}

pub struct NewTopic {
    pub name: String,
    pub num_partitions: i32,
    pub replication_factor: i16,
    pub configs: BTreeMap<String, String>,
    pub has_assignments: bool,
}

/// Validates a new topic against the image and the broker config; resolves -1 defaults.
pub fn check_new_topic(
    image: &Image,
    cfg: &Config,
    t: &NewTopic,
) -> Result<(i32, i16), TopicError> {
    validate_topic_name(&t.name)?;
    if image.topics.contains_key(&t.name) {
        return Err(TopicError::AlreadyExists);
    }
    if t.has_assignments {
        return Err(TopicError::InvalidRequest(
            "Manual replica assignments are not supported on a single-node Weir".into(),
        ));
    }
    let partitions = if t.num_partitions == -1 {
        cfg.num_partitions
    } else {
        t.num_partitions
    };
    if partitions <= 0 {
        return Err(TopicError::InvalidPartitions(
            "Number of partitions must be larger than 0.".into(),
        ));
    }
    if partitions > PARTITIONS_PER_TOPIC_MAX {
        return Err(TopicError::InvalidPartitions(format!(
            "Number of partitions {partitions} exceeds Weir's limit of {PARTITIONS_PER_TOPIC_MAX} per topic."
        )));
    }
    if image.partition_count() + partitions as usize > PARTITIONS_PER_BROKER_MAX {
        return Err(TopicError::InvalidPartitions(format!(
            "The broker would host more than {PARTITIONS_PER_BROKER_MAX} partitions."
        )));
    }
    let rf = if t.replication_factor == -1 {
        cfg.default_replication_factor
    } else {
        t.replication_factor
    };
    if rf <= 0 {
        return Err(TopicError::InvalidReplicationFactor(
            "Replication factor must be larger than 0.".into(),
        ));
    }
    if rf > 1 {
        return Err(TopicError::InvalidReplicationFactor(format!(
            "Unable to replicate the partition {rf} time(s): The target replication factor of {rf} cannot be reached because only 1 broker(s) are registered."
        )));
    }
    cfg.log
        .with_topic_overrides(&t.configs)
        .map_err(|e| TopicError::InvalidConfig(e.to_string()))?;
    Ok((partitions, rf))
}

/// Assigns owner shards to `count` new partitions, rotating from `image.next_shard`.
pub fn assign_shards(image: &mut Image, count: usize, shards: usize) -> Vec<PartitionMeta> {
    let shards = shards.max(1) as u32;
    (0..count)
        .map(|_| {
            let shard = image.next_shard % shards;
            image.next_shard = (image.next_shard + 1) % shards;
            PartitionMeta {
                shard,
                leader_epoch: 0,
            }
        })
        .collect()
}

/// Loads the image, re-homing partitions of shards that no longer exist (fewer --shards than
/// before) by their index modulo the shard count.
pub fn load(data_dir: &Path, shards: usize) -> Result<Image> {
    let path = data_dir.join(METADATA_FILE);
    let mut image: Image = match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Image::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    for t in image.topics.values_mut() {
        for (i, p) in t.partitions.iter_mut().enumerate() {
            if p.shard as usize >= shards {
                p.shard = (i % shards) as u32;
            }
        }
    }
    image.next_shard %= shards.max(1) as u32;
    Ok(image)
}

/// Persists the image atomically. Blocking: call it off the executor threads.
pub fn store(data_dir: &Path, image: &Image) -> Result<()> {
    let path = data_dir.join(METADATA_FILE);
    let tmp = data_dir.join(format!("{METADATA_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(image)?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(())
}

pub fn partition_dir(data_dir: &Path, topic: &str, partition: i32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

/// Reads or creates `meta.properties`; returns the cluster id. Refuses a data directory that
/// belongs to another node id.
pub fn cluster_id(data_dir: &Path, node_id: i32) -> Result<String> {
    let path = data_dir.join("meta.properties");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let mut id = None;
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("cluster.id=") {
                id = Some(v.trim().to_string());
            }
            if let Some(v) = line.strip_prefix("node.id=") {
                if v.trim() != node_id.to_string() {
                    anyhow::bail!(
                        "{} belongs to node.id {}, not {node_id}",
                        path.display(),
                        v.trim()
                    );
                }
            }
        }
        if let Some(id) = id {
            return Ok(id);
        }
    }
    let id = base64_uuid(uuid::Uuid::new_v4());
    let text = format!("#Weir\nversion=1\ncluster.id={id}\nnode.id={node_id}\n");
    std::fs::write(&path, text)?;
    Ok(id)
}

/// Kafka prints cluster ids as URL-safe base64 of a UUID without padding (22 chars).
fn base64_uuid(u: uuid::Uuid) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(u.as_bytes())
}

pub type SharedImage = Arc<Image>;

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::new("127.0.0.1:9092".parse().unwrap(), "d".into(), 2)
    }

    fn nt(name: &str, p: i32, rf: i16) -> NewTopic {
        NewTopic {
            name: name.into(),
            num_partitions: p,
            replication_factor: rf,
            configs: BTreeMap::new(),
            has_assignments: false,
        }
    }

    #[test]
    fn topic_rules_match_kafka() {
        let mut image = Image::default();
        let c = cfg();
        assert_eq!(
            check_new_topic(&image, &c, &nt("ok.name_1-x", 3, 1)),
            Ok((3, 1))
        );
        assert_eq!(check_new_topic(&image, &c, &nt("d", -1, -1)), Ok((1, 1)));
        assert_eq!(
            check_new_topic(&image, &c, &nt("bad name", 1, 1))
                .unwrap_err()
                .code(),
            17
        );
        assert_eq!(
            check_new_topic(&image, &c, &nt("..", 1, 1))
                .unwrap_err()
                .code(),
            17
        );
        assert_eq!(
            check_new_topic(&image, &c, &nt(&"x".repeat(250), 1, 1))
                .unwrap_err()
                .code(),
            17
        );
        assert_eq!(
            check_new_topic(&image, &c, &nt("t", 0, 1))
                .unwrap_err()
                .code(),
            37
        );
        assert_eq!(
            check_new_topic(&image, &c, &nt("t", 1, 3))
                .unwrap_err()
                .code(),
            38
        );
        let parts = assign_shards(&mut image, 3, 2);
        assert_eq!(
            parts.iter().map(|p| p.shard).collect::<Vec<_>>(),
            vec![0, 1, 0]
        );
        image.topics.insert(
            "t".into(),
            TopicMeta {
                id: uuid::Uuid::new_v4(),
                partitions: parts,
                configs: BTreeMap::new(),
                internal: false,
            },
        );
        assert_eq!(
            check_new_topic(&image, &c, &nt("t", 1, 1))
                .unwrap_err()
                .code(),
            36
        );
        assert_eq!(image.owner("t", 2), Some(0));
        assert_eq!(image.owner("t", 3), None);
        assert_eq!(image.owner("t", -1), None);
    }

    #[test]
    fn store_load_and_rehome() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = Image::default();
        let parts = assign_shards(&mut image, 4, 4);
        image.topics.insert(
            "t".into(),
            TopicMeta {
                id: uuid::Uuid::new_v4(),
                partitions: parts,
                configs: BTreeMap::new(),
                internal: false,
            },
        );
        store(dir.path(), &image).unwrap();
        assert_eq!(load(dir.path(), 4).unwrap(), image);
        let fewer = load(dir.path(), 2).unwrap();
        assert!(fewer.topics["t"].partitions.iter().all(|p| p.shard < 2));
        let id = cluster_id(dir.path(), 1).unwrap();
        assert_eq!(id.len(), 22);
        assert_eq!(cluster_id(dir.path(), 1).unwrap(), id);
        assert!(cluster_id(dir.path(), 2).is_err());
    }
}
