//! Cluster metadata: topics, their partitions, configs, and the shard table saying which shard
//! owns each partition. Shard 0 is the controller: it alone changes metadata, persists each new
//! image, and broadcasts it to every shard. Every shard holds the same immutable image
//! (`Arc<Image>`), so routing a request never takes a lock.
//!
//! On disk: `<data-dir>/weir-metadata.json` and a second copy `weir-metadata.backup.json`, each
//! replaced atomically (write a temp file of a name no other write uses, fsync, rename, fsync
//! dir), the primary first; and `<data-dir>/meta.properties` with `cluster.id` and `node.id` as
//! Kafka writes, replaced the same way. A change counts as stored only once both copies are, so
//! the backup always holds every change anyone was told about. Start-up uses the newest copy
//! that parses, says so with a WARN when that is not the primary, rewrites the bad copy, and
//! refuses to start empty over partition directories when neither copy parses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Config, LogConfig, PARTITIONS_PER_BROKER_MAX, PARTITIONS_PER_TOPIC_MAX};

pub const METADATA_FILE: &str = "weir-metadata.json";
/// The second copy of the image, written after the primary with the same bytes.
pub const METADATA_BACKUP_FILE: &str = "weir-metadata.backup.json";
/// Where start-up moves a primary copy it could not parse, for an operator to look at.
pub const METADATA_UNREADABLE_FILE: &str = "weir-metadata.json.unreadable";
/// Temp files of atomic replacement end with this; start-up removes leftovers.
const TMP_SUFFIX: &str = ".tmp";
/// Metadata images are small (topics x partitions x ~60 bytes); a copy larger than this is not
/// one of ours and is not read into memory.
const METADATA_BYTES_MAX: u64 = 256 << 20;
/// Partition directories named in a start-up message; the rest are counted.
const DIRS_NAMED_MAX: usize = 20;
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartitionMeta {
    /// The shard (core) that owns this partition's log on this broker (meaningful only when
    /// this broker holds a replica: the controller decides which brokers hold replicas, each
    /// broker which of its cores owns its own).
    pub shard: u32,
    pub leader_epoch: i32,
    /// Brokers holding a replica, the preferred leader first. Images written before clusters
    /// existed have none: `Image::single_node` reads that as this node alone.
    #[serde(default)]
    pub replicas: Vec<i32>,
    /// In-sync replicas.
    #[serde(default)]
    pub isr: Vec<i32>,
    /// The leading broker, or -1 (none).
    #[serde(default = "no_leader")]
    pub leader: i32,
    /// Grows with every leader or ISR change (KRaft's partition epoch).
    #[serde(default)]
    pub partition_epoch: i32,
    /// A running reassignment (KIP-455): replicas joining, and replicas leaving.
    #[serde(default)]
    pub adding: Vec<i32>,
    #[serde(default)]
    pub removing: Vec<i32>,
}

fn no_leader() -> i32 {
    -1
}

impl PartitionMeta {
    /// Whether broker `node` holds a replica of this partition.
    pub fn hosted_on(&self, node: i32) -> bool {
        self.replicas.contains(&node)
    }
}

/// A registered broker as clients see it (Metadata, DescribeCluster).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BrokerMeta {
    pub host: String,
    pub port: i32,
    #[serde(default)]
    pub rack: Option<String>,
    /// Missed its session timeout (or shut down): listed nowhere, leads nothing.
    #[serde(default)]
    pub fenced: bool,
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
    /// Registered brokers by node id (fenced ones included).
    #[serde(default)]
    pub brokers: BTreeMap<i32, BrokerMeta>,
    /// The active controller's node id, or -1 while none is known.
    #[serde(default = "no_leader")]
    pub controller_id: i32,
    /// Dynamic broker configs (KIP-226): resource ("" = the cluster-wide default, else a node
    /// id) -> key -> value.
    #[serde(default)]
    pub broker_configs: BTreeMap<String, BTreeMap<String, String>>,
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

    /// Effective log config of a topic: the broker's static defaults, then the cluster-wide
    /// dynamic log defaults, then the topic's overrides.
    pub fn log_config(&self, base: &LogConfig, topic: &str) -> LogConfig {
        let mut out = base.clone();
        if let Some(dynamic) = self.broker_configs.get("") {
            for (k, v) in dynamic {
                if let Some(topic_key) = crate::config::cluster_log_key(k) {
                    // Validated when set; a value that no longer parses is skipped.
                    let _ = out.apply_topic_key(topic_key, v);
                }
            }
        }
        if let Some(t) = self.topics.get(topic) {
            // Validated when set: a topic's overrides apply whole or not at all.
            if let Ok(c) = out.with_topic_overrides(&t.configs) {
                out = c;
            }
        }
        out
    }

    /// A dynamic broker config's effective value on broker `node`, and whether it comes from
    /// the broker's own override (true) or the cluster-wide default (false).
    pub fn broker_config(&self, node: i32, key: &str) -> Option<(&str, bool)> {
        if let Some(v) = self
            .broker_configs
            .get(&node.to_string())
            .and_then(|m| m.get(key))
        {
            return Some((v, true));
        }
        self.broker_configs
            .get("")
            .and_then(|m| m.get(key))
            .map(|v| (v.as_str(), false))
    }

    pub fn topic_by_id(&self, id: uuid::Uuid) -> Option<(&String, &TopicMeta)> {
        self.topics.iter().find(|(_, t)| t.id == id)
    }

    /// The shard of this broker that serves a client's produce or fetch for a partition:
    /// UNKNOWN_TOPIC_OR_PARTITION when there is no such partition, NOT_LEADER_OR_FOLLOWER
    /// when broker `node` does not lead it (the client refreshes metadata and moves on).
    pub fn route(&self, topic: &str, partition: i32, node: i32) -> Result<u32, i16> {
        use crate::kafka::errors::{NOT_LEADER_OR_FOLLOWER, UNKNOWN_TOPIC_OR_PARTITION};
        let p = self
            .topics
            .get(topic)
            .and_then(|t| {
                usize::try_from(partition)
                    .ok()
                    .and_then(|i| t.partitions.get(i))
            })
            .ok_or(UNKNOWN_TOPIC_OR_PARTITION)?;
        if p.leader != node {
            return Err(NOT_LEADER_OR_FOLLOWER);
        }
        Ok(p.shard)
    }

    /// Brokers that are registered and not fenced, by node id.
    pub fn live_brokers(&self) -> impl Iterator<Item = (i32, &BrokerMeta)> {
        self.brokers
            .iter()
            .filter(|(_, b)| !b.fenced)
            .map(|(&id, b)| (id, b))
    }

    /// This broker's image of a committed cluster image: the same topics, brokers and
    /// leaderships, plus the shard table for the replicas this broker holds. A replica keeps
    /// the shard `prev` gave it (its log is open there); a new one gets the next shard in
    /// rotation.
    pub fn from_cluster(
        ci: &crate::cluster::quorum::ClusterImage,
        controller: i32,
        prev: &Image,
        node: i32,
        shards: usize,
    ) -> Image {
        let shards = shards.max(1) as u32;
        let mut next_shard = prev.next_shard % shards;
        let mut topics = BTreeMap::new();
        for (name, ct) in &ci.topics {
            let old = prev.topics.get(name).filter(|t| t.id == ct.id);
            let partitions = ct
                .partitions
                .iter()
                .enumerate()
                .map(|(i, cp)| {
                    let kept = old
                        .and_then(|t| t.partitions.get(i))
                        .filter(|p| p.hosted_on(node))
                        .map(|p| p.shard);
                    let shard = match kept {
                        Some(s) => s,
                        None if cp.replicas.contains(&node) => {
                            let s = next_shard;
                            next_shard = (next_shard + 1) % shards;
                            s
                        }
                        None => 0,
                    };
                    PartitionMeta {
                        shard,
                        leader_epoch: cp.leader_epoch,
                        replicas: cp.replicas.clone(),
                        isr: cp.isr.clone(),
                        leader: cp.leader,
                        partition_epoch: cp.partition_epoch,
                        adding: cp.adding.clone(),
                        removing: cp.removing.clone(),
                    }
                })
                .collect();
            topics.insert(
                name.clone(),
                TopicMeta {
                    id: ct.id,
                    partitions,
                    configs: ct.configs.clone(),
                    internal: is_internal_topic(name),
                },
            );
        }
        let brokers = ci
            .brokers
            .iter()
            .map(|(&id, b)| {
                (
                    id,
                    BrokerMeta {
                        host: b.host.clone(),
                        port: b.port as i32,
                        rack: b.rack.clone(),
                        fenced: b.fenced,
                    },
                )
            })
            .collect();
        // Clients send admin requests to the controller Metadata names, so it must be a broker
        // they can reach: the active controller when it is a live broker, else (a
        // controller-only node leads the quorum) the lowest live broker, which forwards, as
        // KRaft names a live broker there.
        let live = |id: &i32| ci.brokers.get(id).is_some_and(|b| !b.fenced);
        let controller_id = if live(&controller) {
            controller
        } else {
            ci.brokers.keys().copied().find(live).unwrap_or(-1)
        };
        Image {
            version: ci.version,
            topics,
            next_shard,
            producer_id_block_end: ci.producer_id_block_end,
            brokers,
            controller_id,
            broker_configs: ci.broker_configs.clone(),
        }
    }

    /// A broker in a cluster starts knowing no leader: what it stored may be stale, and it
    /// serves a partition only once the controller's current image says it leads it.
    pub fn forget_leaders(&mut self) {
        for t in self.topics.values_mut() {
            for p in &mut t.partitions {
                p.leader = -1;
            }
        }
        self.brokers.clear();
        self.controller_id = -1;
    }

    /// A single broker without a quorum: it is the only broker, the controller, and the
    /// leader and only replica of every partition (images written before clusters existed
    /// name no replicas). Called at start-up and on every change the single-node controller
    /// makes.
    pub fn single_node(&mut self, cfg: &Config) {
        let node = cfg.node_id;
        self.brokers.clear();
        self.brokers.insert(
            node,
            BrokerMeta {
                host: cfg.advertised_host.clone(),
                port: cfg.advertised_port,
                rack: None,
                fenced: false,
            },
        );
        self.controller_id = node;
        for t in self.topics.values_mut() {
            for p in &mut t.partitions {
                if p.replicas != [node] || p.isr != [node] || p.leader != node {
                    p.replicas = vec![node];
                    p.isr = vec![node];
                    p.leader = node;
                }
            }
        }
    }
}

/// Why a topic change was refused; each is one Kafka error code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopicError {
    AlreadyExists,
    InvalidName(String),
    InvalidPartitions(String),
    InvalidReplicationFactor(String),
    InvalidConfig(String),
    Unknown,
    InvalidRequest(String),
    InvalidReplicaAssignment(String),
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
            TopicError::InvalidReplicaAssignment(_) => INVALID_REPLICA_ASSIGNMENT,
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
            | TopicError::InvalidRequest(m)
            | TopicError::InvalidReplicaAssignment(m) => m.clone(),
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTopic {
    pub name: String,
    pub num_partitions: i32,
    pub replication_factor: i16,
    pub configs: BTreeMap<String, String>,
    /// Manual replica assignments, as (partition index, broker ids) in request order.
    pub assignments: Vec<(i32, Vec<i32>)>,
}

/// Manual replica assignments on a single node: Kafka's rules (`decide::manual_assignment`),
/// with this node the only registered broker. Returns (partitions, replication factor).
fn check_manual_assignment(cfg: &Config, t: &NewTopic) -> Result<(i32, i16), TopicError> {
    let a = crate::cluster::decide::manual_assignment(t, |b| b == cfg.node_id)?;
    Ok((a.len() as i32, a.first().map_or(1, |r| r.len()) as i16))
}

/// Kafka's lower bound and Weir's upper bound on a topic's partition count.
pub fn check_partition_count(partitions: i32) -> Result<(), TopicError> {
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
    Ok(())
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
    let manual = if t.assignments.is_empty() {
        None
    } else {
        Some(check_manual_assignment(cfg, t)?)
    };
    let partitions = match manual {
        Some((p, _)) => p,
        None if t.num_partitions == -1 => cfg.num_partitions,
        None => t.num_partitions,
    };
    check_partition_count(partitions)?;
    if image.partition_count() + partitions as usize > PARTITIONS_PER_BROKER_MAX {
        return Err(TopicError::InvalidPartitions(format!(
            "The broker would host more than {PARTITIONS_PER_BROKER_MAX} partitions."
        )));
    }
    let rf = match manual {
        Some((_, rf)) => rf,
        None if t.replication_factor == -1 => cfg.default_replication_factor,
        None => t.replication_factor,
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
                replicas: Vec::new(),
                isr: Vec::new(),
                leader: -1,
                partition_epoch: 0,
                adding: Vec::new(),
                removing: Vec::new(),
            }
        })
        .collect()
}

/// One copy of the image as start-up found it.
enum Copy {
    Valid(Image),
    Absent,
    Unreadable(String),
}

fn read_copy(path: &Path) -> Copy {
    use std::io::Read;
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| {
        f.take(METADATA_BYTES_MAX + 1).read_to_end(&mut bytes)?;
        Ok(())
    });
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Copy::Absent,
        Err(e) => Copy::Unreadable(format!("reading it failed: {e}")),
        Ok(()) if bytes.len() as u64 > METADATA_BYTES_MAX => {
            Copy::Unreadable(format!("larger than {METADATA_BYTES_MAX} bytes"))
        }
        Ok(()) if bytes.is_empty() => Copy::Unreadable("empty (0 bytes)".into()),
        Ok(()) => match serde_json::from_slice::<Image>(&bytes) {
            Ok(image) => Copy::Valid(image),
            Err(e) => Copy::Unreadable(format!("{e} ({} bytes)", bytes.len())),
        },
    }
}

/// `<topic>-<partition>` directories in the data dir, as (topic, partition), sorted.
fn partition_dirs(data_dir: &Path) -> Result<Vec<(String, i32)>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(data_dir).with_context(|| format!("listing {}", data_dir.display()))?;
    for e in entries {
        let e = e?;
        if !e.file_type()?.is_dir() {
            continue;
        }
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((topic, p)) = name.rsplit_once('-') else {
            continue;
        };
        let Ok(p) = p.parse::<i32>() else { continue };
        // The controller quorum's metadata log lives beside the partitions, named as KRaft's.
        if topic == "__cluster_metadata" {
            continue;
        }
        if p >= 0 && validate_topic_name(topic).is_ok() {
            out.push((topic.to_string(), p));
        }
    }
    out.sort();
    Ok(out)
}

/// "t-0, t-1, __consumer_offsets-0, ...": the topics' own directories first, then the internal
/// ones, at most DIRS_NAMED_MAX named.
fn name_some(dirs: &[(String, i32)]) -> String {
    let mut sorted: Vec<&(String, i32)> = dirs.iter().collect();
    sorted.sort_by_key(|(t, p)| (t.starts_with("__"), t.clone(), *p));
    let mut s: Vec<String> = sorted
        .iter()
        .take(DIRS_NAMED_MAX)
        .map(|(t, p)| format!("{t}-{p}"))
        .collect();
    if dirs.len() > DIRS_NAMED_MAX {
        s.push(format!("and {} more", dirs.len() - DIRS_NAMED_MAX));
    }
    s.join(", ")
}

/// Removes temp files of metadata writes a crash interrupted (they are never read).
fn remove_leftover_temps(data_dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(data_dir)? {
        let name = e?.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = [METADATA_FILE, METADATA_BACKUP_FILE, "meta.properties"]
            .iter()
            .any(|f| name.starts_with(f));
        if ours && name.ends_with(TMP_SUFFIX) {
            std::fs::remove_file(data_dir.join(name))?;
        }
    }
    Ok(())
}

/// Loads the image: the newest of the two copies that parses. Falls back to the backup with a
/// WARN when the primary is missing or unreadable (and rewrites both); starts empty only when
/// no copy and no partition directory exists (a fresh data dir), or with a WARN when the
/// copies are unreadable but no partition directory exists (nothing to lose); refuses to start
/// when no copy parses but partition directories exist. Re-homes partitions of shards that no
/// longer exist (fewer --shards than before) by their index modulo the shard count.
/// Blocking: call it before the executors start.
pub fn load(data_dir: &Path, shards: usize) -> Result<Image> {
    remove_leftover_temps(data_dir)
        .with_context(|| format!("removing temp files in {}", data_dir.display()))?;
    let primary_path = data_dir.join(METADATA_FILE);
    let backup_path = data_dir.join(METADATA_BACKUP_FILE);
    let primary = read_copy(&primary_path);
    let backup = read_copy(&backup_path);
    let mut rewrite = false;
    let mut image = match (primary, backup) {
        (Copy::Valid(p), Copy::Valid(b)) if b.version > p.version => {
            tracing::warn!(
                "{} holds metadata version {} but {} holds the newer version {}: using the backup \
                 (was the primary replaced by an older copy?)",
                primary_path.display(),
                p.version,
                backup_path.display(),
                b.version
            );
            rewrite = true;
            b
        }
        (Copy::Valid(p), b) => {
            match b {
                Copy::Valid(b) => rewrite = b.version != p.version,
                Copy::Absent => {
                    // Data dirs from before the backup copy existed get one now.
                    tracing::info!("writing the backup copy {}", backup_path.display());
                    rewrite = true;
                }
                Copy::Unreadable(why) => {
                    tracing::warn!(
                        "{} is unreadable ({why}); rewriting it from {} (version {})",
                        backup_path.display(),
                        primary_path.display(),
                        p.version
                    );
                    rewrite = true;
                }
            }
            p
        }
        (p, Copy::Valid(b)) => {
            let why = match &p {
                Copy::Unreadable(why) => format!("unreadable: {why}"),
                _ => "it is missing".to_string(),
            };
            let moved = if let Copy::Unreadable(_) = p {
                std::fs::rename(&primary_path, data_dir.join(METADATA_UNREADABLE_FILE))
                    .with_context(|| format!("moving {} aside", primary_path.display()))?;
                format!("; the unreadable file was moved to {METADATA_UNREADABLE_FILE}")
            } else {
                String::new()
            };
            tracing::warn!(
                "{} cannot be used ({why}). Starting from the backup copy {} (metadata version {}, \
                 which holds every acknowledged metadata change) and rewriting the primary{moved}",
                primary_path.display(),
                backup_path.display(),
                b.version
            );
            rewrite = true;
            b
        }
        (Copy::Absent, Copy::Absent) => {
            let dirs = partition_dirs(data_dir)?;
            if !dirs.is_empty() {
                anyhow::bail!(
                    "{} and {} are missing but {} holds {} partition directories ({}): refusing to \
                     start with no topics, which would hide their data. Restore a metadata file, \
                     or move the partition directories away to start empty.",
                    METADATA_FILE,
                    METADATA_BACKUP_FILE,
                    data_dir.display(),
                    dirs.len(),
                    name_some(&dirs)
                );
            }
            Image::default()
        }
        (p, b) => {
            let why = |c: &Copy| match c {
                Copy::Unreadable(why) => why.clone(),
                _ => "missing".to_string(),
            };
            let dirs = partition_dirs(data_dir)?;
            if !dirs.is_empty() {
                anyhow::bail!(
                    "no readable metadata image: {} is unreadable ({}) and {} is unreadable ({}), \
                     but {} holds {} partition directories ({}): refusing to start with no \
                     topics, which would hide their data. Restore a metadata file, or move the \
                     partition directories away to start empty.",
                    METADATA_FILE,
                    why(&p),
                    METADATA_BACKUP_FILE,
                    why(&b),
                    data_dir.display(),
                    dirs.len(),
                    name_some(&dirs)
                );
            }
            if let Copy::Unreadable(_) = p {
                std::fs::rename(&primary_path, data_dir.join(METADATA_UNREADABLE_FILE))
                    .with_context(|| format!("moving {} aside", primary_path.display()))?;
            }
            tracing::warn!(
                "no readable metadata image ({}: {}; {}: {}) and no partition directory: starting empty",
                METADATA_FILE,
                why(&p),
                METADATA_BACKUP_FILE,
                why(&b)
            );
            rewrite = true;
            Image::default()
        }
    };
    if rewrite {
        store(data_dir, &image)?;
    }
    let orphans: Vec<(String, i32)> = partition_dirs(data_dir)?
        .into_iter()
        .filter(|(t, p)| image.owner(t, *p).is_none())
        .collect();
    if !orphans.is_empty() {
        tracing::warn!(
            "{} partition directories are not in the metadata image and are left untouched: {}",
            orphans.len(),
            name_some(&orphans)
        );
    }
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

/// Replaces `dir/name` with `bytes` so that a reader (or a crash) sees either the old or the
/// new file, never a part: the bytes go to a temp file no other write uses (pid and a counter
/// in its name, created exclusively: two writers, even two processes, never share one), which
/// is fsynced, renamed over the file, and the directory fsynced.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("{name}.{}.{n}{TMP_SUFFIX}", std::process::id()));
    let path = dir.join(name);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsyncing {}", dir.display()))?;
    Ok(())
}

/// Persists the image: the primary copy, then the backup, each atomically. An error means the
/// change must not be used (the backup may not have it). Blocking: call it off the executor
/// threads.
pub fn store(data_dir: &Path, image: &Image) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(image)?;
    write_atomically(data_dir, METADATA_FILE, &bytes)?;
    write_atomically(data_dir, METADATA_BACKUP_FILE, &bytes)?;
    Ok(())
}

pub fn partition_dir(data_dir: &Path, topic: &str, partition: i32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

/// Reads or creates `meta.properties`; returns the cluster id. Refuses a data directory that
/// belongs to another node id.
/// The cluster id of a cluster's brokers: the same on every broker without coordination, from
/// the voters they were all given (FNV-1a 128 of `controller.quorum.voters`, printed as Kafka
/// prints ids).
pub fn cluster_id_of_voters(voters: &BTreeMap<u64, std::net::SocketAddr>) -> String {
    let text: String = voters.iter().map(|(id, a)| format!("{id}@{a},")).collect();
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in text.bytes() {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    base64_uuid(uuid::Uuid::from_u128(h))
}

/// This data dir's cluster id (`meta.properties`), created on first start: `wanted` (a
/// cluster's id) or a random one for a single node. A data dir of another cluster is refused.
pub fn cluster_id(data_dir: &Path, node_id: i32, wanted: Option<&str>) -> Result<String> {
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
            if let Some(w) = wanted {
                anyhow::ensure!(
                    id == w,
                    "{} belongs to cluster {id}, but this node's controller.quorum.voters make cluster {w}",
                    path.display()
                );
            }
            return Ok(id);
        }
    }
    let id = wanted
        .map(str::to_string)
        .unwrap_or_else(|| base64_uuid(uuid::Uuid::new_v4()));
    let text = format!("#Weir\nversion=1\ncluster.id={id}\nnode.id={node_id}\n");
    write_atomically(data_dir, "meta.properties", text.as_bytes())?;
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
            assignments: Vec::new(),
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
        let id = cluster_id(dir.path(), 1, None).unwrap();
        assert_eq!(id.len(), 22);
        assert_eq!(cluster_id(dir.path(), 1, None).unwrap(), id);
        assert!(cluster_id(dir.path(), 2, None).is_err());
    }

    fn image_with(topics: usize) -> Image {
        let mut image = Image::default();
        for i in 0..topics {
            let parts = assign_shards(&mut image, 3, 2);
            image.topics.insert(
                format!("topic-{i}"),
                TopicMeta {
                    id: uuid::Uuid::new_v4(),
                    partitions: parts,
                    configs: BTreeMap::new(),
                    internal: false,
                },
            );
        }
        image.version = topics as u64 + 1;
        image
    }

    fn truncate(path: &Path, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    #[test]
    fn an_unreadable_primary_falls_back_to_the_backup_and_is_rewritten() {
        for cut in [0.5, 0.0] {
            let dir = tempfile::tempdir().unwrap();
            let image = image_with(5);
            store(dir.path(), &image).unwrap();
            let primary = dir.path().join(METADATA_FILE);
            let len = std::fs::metadata(&primary).unwrap().len();
            truncate(&primary, (len as f64 * cut) as u64);
            std::fs::create_dir(dir.path().join("topic-0-0")).unwrap();
            assert_eq!(load(dir.path(), 2).unwrap(), image);
            // The primary was rewritten; the bad one kept aside for a look.
            assert_eq!(
                serde_json::from_slice::<Image>(&std::fs::read(&primary).unwrap()).unwrap(),
                image
            );
            assert!(dir.path().join(METADATA_UNREADABLE_FILE).exists());
            // Missing (not just unreadable) works the same.
            std::fs::remove_file(&primary).unwrap();
            assert_eq!(load(dir.path(), 2).unwrap(), image);
            assert!(primary.exists());
        }
    }

    #[test]
    fn no_readable_copy_over_partition_directories_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path(), &image_with(2)).unwrap();
        truncate(&dir.path().join(METADATA_FILE), 10);
        truncate(&dir.path().join(METADATA_BACKUP_FILE), 0);
        std::fs::create_dir(dir.path().join("topic-1-2")).unwrap();
        let e = format!("{:#}", load(dir.path(), 2).unwrap_err());
        assert!(e.contains("refusing to start"), "{e}");
        assert!(e.contains("topic-1-2"), "{e}");
        // Nothing was changed: an operator can still restore a copy.
        assert_eq!(
            std::fs::metadata(dir.path().join(METADATA_FILE))
                .unwrap()
                .len(),
            10
        );
        // Both copies gone over partition directories: refused too.
        std::fs::remove_file(dir.path().join(METADATA_FILE)).unwrap();
        std::fs::remove_file(dir.path().join(METADATA_BACKUP_FILE)).unwrap();
        assert!(load(dir.path(), 2).is_err());
        // With no partition directory there is nothing to lose: start empty.
        std::fs::remove_dir(dir.path().join("topic-1-2")).unwrap();
        assert_eq!(load(dir.path(), 2).unwrap(), Image::default());
        std::fs::write(dir.path().join(METADATA_FILE), b"{\"vers").unwrap();
        assert_eq!(load(dir.path(), 2).unwrap(), Image::default());
    }

    #[test]
    fn a_data_dir_without_a_backup_gets_one_and_temp_leftovers_go() {
        let dir = tempfile::tempdir().unwrap();
        let image = image_with(1);
        let bytes = serde_json::to_vec_pretty(&image).unwrap();
        std::fs::write(dir.path().join(METADATA_FILE), &bytes).unwrap();
        std::fs::write(dir.path().join("weir-metadata.json.tmp"), &bytes[..9]).unwrap();
        assert_eq!(load(dir.path(), 2).unwrap(), image);
        assert_eq!(
            std::fs::read(dir.path().join(METADATA_BACKUP_FILE)).unwrap(),
            bytes
        );
        assert!(!dir.path().join("weir-metadata.json.tmp").exists());
    }

    /// Writers that race (two broker processes on one data dir did, with one shared temp
    /// name) never leave or expose a partly written copy.
    #[test]
    fn racing_writers_never_expose_a_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path(), &image_with(1)).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let d = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    for i in 0..40 {
                        store(&d, &image_with(1 + (w * 40 + i) % 60)).unwrap();
                    }
                })
            })
            .collect();
        let reader = {
            let d = dir.path().to_path_buf();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut reads = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    for f in [METADATA_FILE, METADATA_BACKUP_FILE] {
                        let bytes = std::fs::read(d.join(f)).unwrap();
                        if let Err(e) = serde_json::from_slice::<Image>(&bytes) {
                            panic!("{f} read partly written ({} bytes): {e}", bytes.len());
                        }
                        reads += 1;
                    }
                }
                reads
            })
        };
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(TMP_SUFFIX))
            .collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
    }
}

/// Kafka's internal topics: created by the broker, never deleted by clients.
pub fn is_internal_topic(name: &str) -> bool {
    name == crate::group::OFFSETS_TOPIC || name == crate::txn::TXN_TOPIC
}
