//! Broker configuration: command-line flags plus the subset of Kafka's `server.properties`
//! keys that apply to Weir. Everything here is plain data, shared read-only by every shard.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// Hard ceilings that no configuration may exceed. They bound memory per request.
pub const SOCKET_REQUEST_BYTES_CEILING: usize = 1 << 30;
pub const MESSAGE_BYTES_CEILING: usize = 256 << 20;
/// The most bytes one compressed batch may decompress to when the broker must decode it
/// (recompression, timestamp lookups); a batch beyond it is refused as corrupt. Decoding runs
/// on the shard thread, one batch at a time, so this also bounds a shard's decode memory.
pub const DECOMPRESSED_BATCH_BYTES_MAX: usize = 128 << 20;
/// Upper bound on partitions in one topic and on the whole broker, so one CreateTopics
/// cannot ask for unbounded files and memory.
pub const PARTITIONS_PER_TOPIC_MAX: i32 = 10_000;
pub const PARTITIONS_PER_BROKER_MAX: usize = 50_000;

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// host:port announced to clients in Metadata: the listen address unless an advertised
    /// listener was given.
    pub advertised_host: String,
    pub advertised_port: i32,
    /// An advertised listener was given (`advertised.listeners` or `--advertised-listener`):
    /// later changes of the listen address leave it alone.
    pub advertised_explicit: bool,
    pub data_dir: PathBuf,
    pub shards: usize,
    pub node_id: i32,
    /// Bytes of recent record batches each shard keeps in memory.
    pub cache_bytes: usize,
    pub num_partitions: i32,
    pub default_replication_factor: i16,
    pub auto_create_topics: bool,
    pub log: LogConfig,
    pub socket_request_bytes_max: usize,
    /// Interval of the retention check, Kafka's log.retention.check.interval.ms.
    pub retention_check_interval_ms: u64,
    /// Connections accepted per shard before new ones are refused.
    pub connections_per_shard_max: usize,
    /// Idempotent producers idle this long are forgotten (Kafka's producer.id.expiration.ms).
    pub producer_id_expiration_ms: i64,
    pub group: crate::group::GroupConfig,
    pub txn: crate::txn::TxnConfig,
    /// The log cleaner (compacted topics): `log.cleaner.enable`, `log.cleaner.backoff.ms`,
    /// `log.cleaner.dedupe.buffer.size` (the key map's memory, per shard),
    /// `log.cleaner.io.max.bytes.per.second` (0: unlimited).
    pub cleaner_enable: bool,
    pub cleaner_backoff_ms: u64,
    pub cleaner_dedupe_bytes: usize,
    pub cleaner_io_bytes_per_s: u64,
    /// Cluster mode (issue #11): what this node is and who the controller voters are.
    pub cluster: ClusterConfig,
    /// Where the Prometheus endpoint listens (`weir.metrics.listen`, `none` turns it off).
    pub metrics_listen: Option<SocketAddr>,
    /// Keys set in server.properties, by `--override` or by a command-line flag
    /// (DescribeConfigs reports them as STATIC_BROKER_CONFIG, the rest as DEFAULT_CONFIG).
    pub given: std::collections::BTreeSet<String>,
}

/// The Prometheus endpoint's default address (`weir.metrics.listen`).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9644";

/// `weir.metrics.listen`: host:port, or `none` (no endpoint).
pub fn parse_metrics_listen(v: &str) -> Result<Option<SocketAddr>> {
    if v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .with_context(|| format!("{v:?} is not host:port or none"))
}

/// DescribeConfigs' type codes (Kafka's ConfigType).
pub const CONFIG_TYPE_BOOLEAN: i8 = 1;
pub const CONFIG_TYPE_STRING: i8 = 2;
pub const CONFIG_TYPE_INT: i8 = 3;
pub const CONFIG_TYPE_SHORT: i8 = 4;
pub const CONFIG_TYPE_LONG: i8 = 5;
pub const CONFIG_TYPE_LIST: i8 = 7;

/// Per-log settings. Topic-level configs override these field by field.
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub segment_bytes: u64,
    pub roll_ms: u64,
    /// -1: keep forever.
    pub retention_ms: i64,
    /// -1: no size limit.
    pub retention_bytes: i64,
    pub index_interval_bytes: u32,
    pub message_bytes_max: usize,
    pub log_append_time: bool,
    /// `min.insync.replicas`: acks=all needs this many in-sync replicas.
    pub min_insync_replicas: i16,
    /// `leader.replication.throttled.replicas` / `follower.replication.throttled.replicas`:
    /// which replicas' catch-up traffic the broker's replication throttle counts (validated:
    /// "", "*", or `partition:broker` pairs; see `replication::throttle`).
    pub leader_throttled_replicas: String,
    pub follower_throttled_replicas: String,
    /// `compression.type`: None keeps the producer's codec ("producer"); otherwise batches
    /// are stored with this codec, recompressed on produce when they differ.
    pub compression: Option<kafka_protocol::records::Compression>,
    /// `cleanup.policy`: `delete` (retention removes whole segments), `compact` (the cleaner
    /// keeps the latest record per key), or both.
    pub delete: bool,
    pub compact: bool,
    /// `min.cleanable.dirty.ratio`, `min.compaction.lag.ms`, `max.compaction.lag.ms`,
    /// `delete.retention.ms` (how long tombstones outlive cleaning).
    pub min_cleanable_dirty_ratio: f64,
    pub min_compaction_lag_ms: i64,
    pub max_compaction_lag_ms: i64,
    pub delete_retention_ms: i64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            roll_ms: 7 * 24 * 3600 * 1000,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            index_interval_bytes: 4096,
            message_bytes_max: 1_048_588,
            log_append_time: false,
            min_insync_replicas: 1,
            leader_throttled_replicas: String::new(),
            follower_throttled_replicas: String::new(),
            compression: None,
            delete: true,
            compact: false,
            min_cleanable_dirty_ratio: 0.5,
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: i64::MAX,
            delete_retention_ms: 86_400_000,
        }
    }
}

/// Topic config keys Weir understands, with how each maps onto [`LogConfig`].
pub const TOPIC_CONFIG_KEYS: &[&str] = &[
    "cleanup.policy",
    "min.cleanable.dirty.ratio",
    "min.compaction.lag.ms",
    "max.compaction.lag.ms",
    "delete.retention.ms",
    "retention.ms",
    "retention.bytes",
    "segment.bytes",
    "segment.ms",
    "segment.index.bytes",
    "index.interval.bytes",
    "max.message.bytes",
    "message.timestamp.type",
    "min.insync.replicas",
    "compression.type",
    "leader.replication.throttled.replicas",
    "follower.replication.throttled.replicas",
];

/// Topic config keys whose value is a comma-separated list (IncrementalAlterConfigs may
/// APPEND to and SUBTRACT from them).
pub const TOPIC_LIST_CONFIG_KEYS: &[&str] = &[
    "cleanup.policy",
    "leader.replication.throttled.replicas",
    "follower.replication.throttled.replicas",
];

/// Broker configs that AlterConfigs / IncrementalAlterConfigs may change at runtime (KIP-226
/// dynamic broker configs), per broker or as the cluster-wide default. Every other key is
/// refused with Kafka's "Cannot update these configs dynamically" (INVALID_REQUEST).
pub const BROKER_DYNAMIC_CONFIG_KEYS: &[&str] = &[
    "leader.replication.throttled.rate",
    "follower.replication.throttled.rate",
];

/// Broker log defaults that may change at runtime for the whole cluster (the default broker
/// resource ""), with the topic config each one is the default of. Topics without their own
/// override take a new value at once.
pub const CLUSTER_DYNAMIC_LOG_KEYS: &[(&str, &str)] = &[
    ("log.retention.ms", "retention.ms"),
    ("log.retention.bytes", "retention.bytes"),
    ("log.segment.bytes", "segment.bytes"),
    ("log.roll.ms", "segment.ms"),
    ("log.index.interval.bytes", "index.interval.bytes"),
    ("log.message.timestamp.type", "message.timestamp.type"),
    ("message.max.bytes", "max.message.bytes"),
    ("min.insync.replicas", "min.insync.replicas"),
    ("compression.type", "compression.type"),
];

/// The topic config a cluster-wide dynamic log key is the default of.
pub fn cluster_log_key(k: &str) -> Option<&'static str> {
    CLUSTER_DYNAMIC_LOG_KEYS
        .iter()
        .find(|(b, _)| *b == k)
        .map(|(_, t)| *t)
}

/// Kafka's default for the replication throttle rates: Long.MAX_VALUE (no throttle).
pub const THROTTLED_RATE_DEFAULT: i64 = i64::MAX;

/// Checks a dynamic broker config map (a broker's or the default's overrides after an edit):
/// `Err((error code, message))` as Kafka answers.
pub fn validate_broker_dynamic(
    overrides: &BTreeMap<String, String>,
    cluster_default: bool,
) -> std::result::Result<(), (i16, String)> {
    let fixed: Vec<&str> = overrides
        .keys()
        .map(String::as_str)
        .filter(|k| !BROKER_DYNAMIC_CONFIG_KEYS.contains(k) && cluster_log_key(k).is_none())
        .collect();
    if !fixed.is_empty() {
        return Err((
            crate::kafka::errors::INVALID_REQUEST,
            format!(
                "Cannot update these configs dynamically: Set({})",
                fixed.join(", ")
            ),
        ));
    }
    let log_keys: Vec<&str> = overrides
        .keys()
        .map(String::as_str)
        .filter(|k| cluster_log_key(k).is_some())
        .collect();
    if !cluster_default && !log_keys.is_empty() {
        return Err((
            crate::kafka::errors::INVALID_REQUEST,
            format!(
                "Weir changes these log defaults for the whole cluster only (the default broker resource, --entity-default): Set({})",
                log_keys.join(", ")
            ),
        ));
    }
    let mut log = LogConfig::default();
    for k in &log_keys {
        let v = &overrides[*k];
        log.apply_topic_key(cluster_log_key(k).expect("filtered"), v)
            .map_err(|e| {
                (
                    crate::kafka::errors::INVALID_CONFIG,
                    format!("Invalid value {v} for configuration {k}: {e}"),
                )
            })?;
    }
    for (k, v) in overrides
        .iter()
        .filter(|(k, _)| cluster_log_key(k).is_none())
    {
        match v.trim().parse::<i64>() {
            Ok(n) if n >= 0 => {}
            Ok(_) => {
                return Err((
                    crate::kafka::errors::INVALID_CONFIG,
                    format!("Invalid value {v} for configuration {k}: Value must be at least 0"),
                ))
            }
            Err(_) => {
                return Err((
                    crate::kafka::errors::INVALID_CONFIG,
                    format!("Invalid value {v} for configuration {k}: Not a number of type LONG"),
                ))
            }
        }
    }
    Ok(())
}

/// Checks a throttled-replicas topic config: "" (none), "*" (all), or
/// `partition:broker[,partition:broker...]`.
pub fn parse_throttled_replicas(key: &str, value: &str) -> Result<()> {
    let v = value.trim();
    if v.is_empty() || v == "*" {
        return Ok(());
    }
    let ok = v.split(',').all(|item| {
        let mut it = item.trim().splitn(2, ':');
        matches!(
            (it.next().map(str::parse::<i32>), it.next().map(str::parse::<i32>)),
            (Some(Ok(p)), Some(Ok(b))) if p >= 0 && b >= 0
        )
    });
    if !ok {
        bail!(
            "Invalid value {value} for configuration {key}: must be the literal '*' or a list of \
             replicas in the following format: [partitionId]:[brokerId],[partitionId]:[brokerId],..."
        );
    }
    Ok(())
}

/// Whether a validated throttled-replicas list names replica (`partition`, `broker`).
pub fn throttled_replica(list: &str, partition: i32, broker: i32) -> bool {
    let v = list.trim();
    if v == "*" {
        return true;
    }
    v.split(',').any(|item| {
        let mut it = item.trim().splitn(2, ':');
        it.next().and_then(|p| p.parse::<i32>().ok()) == Some(partition)
            && it.next().and_then(|b| b.parse::<i32>().ok()) == Some(broker)
    })
}

/// A change to one topic's config overrides.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConfigEdit {
    /// AlterConfigs: the given overrides replace all of them.
    Replace(BTreeMap<String, String>),
    /// IncrementalAlterConfigs: (key, operation 0 SET / 1 DELETE / 2 APPEND / 3 SUBTRACT, value).
    Incremental(Vec<(String, i8, Option<String>)>),
}

impl ConfigEdit {
    /// The overrides after this edit (not yet validated: see `LogConfig::with_topic_overrides`).
    /// `defaults` gives a list key's effective value when APPEND or SUBTRACT finds no override.
    pub fn apply(
        self,
        current: &BTreeMap<String, String>,
        defaults: &LogConfig,
    ) -> Result<BTreeMap<String, String>> {
        let ops = match self {
            ConfigEdit::Replace(all) => return Ok(all),
            ConfigEdit::Incremental(ops) => ops,
        };
        let mut seen = std::collections::HashSet::new();
        let mut out = current.clone();
        for (key, op, value) in ops {
            if !seen.insert(key.clone()) {
                bail!("Error due to duplicate config keys");
            }
            let list = TOPIC_LIST_CONFIG_KEYS.contains(&key.as_str());
            match (op, value) {
                (0, Some(v)) => {
                    out.insert(key, v);
                }
                (1, _) => {
                    out.remove(&key);
                }
                (2 | 3, _) if !list => {
                    let verb = if op == 2 { "append" } else { "subtract" };
                    bail!("Config value {verb} is not allowed for config key: {key}");
                }
                (2 | 3, Some(v)) => {
                    let now = out
                        .get(&key)
                        .cloned()
                        .or_else(|| defaults.describe(&key))
                        .unwrap_or_default();
                    let mut items: Vec<String> = now
                        .split(',')
                        .map(str::trim)
                        .filter(|x| !x.is_empty())
                        .map(str::to_string)
                        .collect();
                    for x in v.split(',').map(str::trim).filter(|x| !x.is_empty()) {
                        if op == 2 && !items.iter().any(|i| i == x) {
                            items.push(x.to_string());
                        } else if op == 3 {
                            items.retain(|i| i != x);
                        }
                    }
                    out.insert(key, items.join(","));
                }
                (0 | 2 | 3, None) => bail!("Null value not supported for topic config {key}"),
                (op, _) => bail!("Unknown config operation {op} for config key {key}"),
            }
        }
        Ok(out)
    }
}

impl LogConfig {
    /// Applies topic-level overrides. Returns an error naming the first bad key or value.
    pub fn with_topic_overrides(&self, overrides: &BTreeMap<String, String>) -> Result<LogConfig> {
        let mut c = self.clone();
        for (k, v) in overrides {
            c.apply_topic_key(k, v)?;
        }
        Ok(c)
    }

    pub fn apply_topic_key(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "retention.ms" => self.retention_ms = parse_i64_min(value, -1)?,
            "retention.bytes" => self.retention_bytes = parse_i64_min(value, -1)?,
            "segment.bytes" => self.segment_bytes = parse_segment_bytes(value)?,
            "segment.ms" => self.roll_ms = parse_i64_min(value, 1)? as u64,
            "index.interval.bytes" => self.index_interval_bytes = parse_index_interval(value)?,
            "max.message.bytes" => self.message_bytes_max = parse_message_bytes(value)?,
            "message.timestamp.type" => {
                self.log_append_time = match value {
                    "CreateTime" => false,
                    "LogAppendTime" => true,
                    _ => bail!("message.timestamp.type must be CreateTime or LogAppendTime"),
                }
            }
            "cleanup.policy" => {
                let (mut delete, mut compact) = (false, false);
                for p in value.split(',').map(str::trim) {
                    match p {
                        "delete" => delete = true,
                        "compact" => compact = true,
                        _ => bail!("Invalid value {value} for configuration cleanup.policy: String must be one of: compact, delete"),
                    }
                }
                if !(delete || compact) {
                    bail!("Invalid value {value} for configuration cleanup.policy: String must be one of: compact, delete");
                }
                (self.delete, self.compact) = (delete, compact);
            }
            "min.cleanable.dirty.ratio" => {
                let r: f64 = value.trim().parse().map_err(|_| anyhow::anyhow!("Invalid value {value} for configuration min.cleanable.dirty.ratio: Not a number of type DOUBLE"))?;
                if !(0.0..=1.0).contains(&r) {
                    bail!("Invalid value {value} for configuration min.cleanable.dirty.ratio: Value must be no less than 0 and no more than 1");
                }
                self.min_cleanable_dirty_ratio = r;
            }
            "min.compaction.lag.ms" => self.min_compaction_lag_ms = parse_i64_min(value, 0)?,
            "max.compaction.lag.ms" => self.max_compaction_lag_ms = parse_i64_min(value, 1)?,
            "delete.retention.ms" => self.delete_retention_ms = parse_i64_min(value, 0)?,
            "compression.type" => {
                use kafka_protocol::records::Compression;
                self.compression = match value {
                    "producer" => None,
                    "uncompressed" => Some(Compression::None),
                    "gzip" => Some(Compression::Gzip),
                    "snappy" => Some(Compression::Snappy),
                    "lz4" => Some(Compression::Lz4),
                    "zstd" => Some(Compression::Zstd),
                    _ => bail!("Invalid value {value} for configuration compression.type: String must be one of: uncompressed, zstd, lz4, snappy, gzip, producer"),
                }
            }
            "min.insync.replicas" => {
                self.min_insync_replicas = parse_i64_min(value, 1)?.min(i16::MAX as i64) as i16;
            }
            "segment.index.bytes" => {
                parse_i64_min(value, 4096)?;
            }
            "leader.replication.throttled.replicas" => {
                parse_throttled_replicas(key, value)?;
                self.leader_throttled_replicas = value.trim().to_string();
            }
            "follower.replication.throttled.replicas" => {
                parse_throttled_replicas(key, value)?;
                self.follower_throttled_replicas = value.trim().to_string();
            }
            _ => bail!("unknown topic config {key}"),
        }
        Ok(())
    }

    /// The effective value of a topic config key, as DescribeConfigs reports it.
    pub fn describe(&self, key: &str) -> Option<String> {
        Some(match key {
            "cleanup.policy" => match (self.compact, self.delete) {
                (true, true) => "compact,delete",
                (true, false) => "compact",
                _ => "delete",
            }
            .into(),
            "min.cleanable.dirty.ratio" => self.min_cleanable_dirty_ratio.to_string(),
            "min.compaction.lag.ms" => self.min_compaction_lag_ms.to_string(),
            "max.compaction.lag.ms" => self.max_compaction_lag_ms.to_string(),
            "delete.retention.ms" => self.delete_retention_ms.to_string(),
            "retention.ms" => self.retention_ms.to_string(),
            "retention.bytes" => self.retention_bytes.to_string(),
            "segment.bytes" => self.segment_bytes.to_string(),
            "segment.ms" => self.roll_ms.to_string(),
            "segment.index.bytes" => "10485760".into(),
            "index.interval.bytes" => self.index_interval_bytes.to_string(),
            "max.message.bytes" => self.message_bytes_max.to_string(),
            "message.timestamp.type" => if self.log_append_time {
                "LogAppendTime"
            } else {
                "CreateTime"
            }
            .into(),
            "min.insync.replicas" => self.min_insync_replicas.to_string(),
            "compression.type" => match self.compression {
                None => "producer",
                Some(kafka_protocol::records::Compression::None) => "uncompressed",
                Some(kafka_protocol::records::Compression::Gzip) => "gzip",
                Some(kafka_protocol::records::Compression::Snappy) => "snappy",
                Some(kafka_protocol::records::Compression::Lz4) => "lz4",
                Some(kafka_protocol::records::Compression::Zstd) => "zstd",
            }
            .into(),
            "leader.replication.throttled.replicas" => self.leader_throttled_replicas.clone(),
            "follower.replication.throttled.replicas" => self.follower_throttled_replicas.clone(),
            _ => return None,
        })
    }
}

fn parse_i64_min(v: &str, min: i64) -> Result<i64> {
    let n: i64 = v
        .trim()
        .parse()
        .with_context(|| format!("{v:?} is not an integer"))?;
    if n < min {
        bail!("{n} is below the minimum {min}");
    }
    Ok(n)
}

fn parse_segment_bytes(v: &str) -> Result<u64> {
    let n = parse_i64_min(v, 14)?;
    if n > i32::MAX as i64 {
        bail!("segment bytes {n} exceeds {}", i32::MAX);
    }
    Ok(n as u64)
}

fn parse_index_interval(v: &str) -> Result<u32> {
    let n = parse_i64_min(v, 0)?;
    Ok(n.min(i32::MAX as i64) as u32)
}

fn parse_message_bytes(v: &str) -> Result<usize> {
    let n = parse_i64_min(v, 0)? as usize;
    if n > MESSAGE_BYTES_CEILING {
        bail!("max message bytes {n} exceeds Weir's ceiling {MESSAGE_BYTES_CEILING}");
    }
    Ok(n)
}

impl Config {
    pub fn new(listen: SocketAddr, data_dir: PathBuf, shards: usize) -> Config {
        Config {
            listen,
            advertised_host: listen.ip().to_string(),
            advertised_port: listen.port() as i32,
            advertised_explicit: false,
            data_dir,
            shards,
            node_id: 0,
            cache_bytes: 256 << 20,
            num_partitions: 1,
            default_replication_factor: 1,
            auto_create_topics: true,
            log: LogConfig::default(),
            socket_request_bytes_max: 104_857_600,
            retention_check_interval_ms: 300_000,
            connections_per_shard_max: 10_000,
            producer_id_expiration_ms: 86_400_000,
            group: crate::group::GroupConfig::default(),
            txn: crate::txn::TxnConfig::default(),
            cleaner_enable: true,
            cleaner_backoff_ms: 15_000,
            cleaner_dedupe_bytes: 128 << 20,
            cleaner_io_bytes_per_s: 0,
            cluster: ClusterConfig::default(),
            metrics_listen: Some(DEFAULT_METRICS_LISTEN.parse().expect("a socket address")),
            given: Default::default(),
        }
    }

    /// Every broker config key Weir understands with its effective value and type, as a
    /// BROKER DescribeConfigs lists them (the dynamic ones come from the metadata image).
    pub fn broker_entries(&self) -> Vec<(&'static str, String, i8)> {
        let c = &self.cluster;
        let listeners = match c.controller_listen {
            Some(ctl) if self.in_cluster() && c.roles_controller => format!(
                "PLAINTEXT://{},{}://{ctl}",
                self.listen,
                c.controller_listener_names
                    .split(',')
                    .next()
                    .unwrap_or("CONTROLLER")
            ),
            _ => format!("PLAINTEXT://{}", self.listen),
        };
        let roles = match (c.roles_broker, c.roles_controller, self.in_cluster()) {
            (_, _, false) => "broker,controller".to_string(),
            (true, true, true) => "broker,controller".to_string(),
            (true, false, true) => "broker".to_string(),
            _ => "controller".to_string(),
        };
        let voters = c
            .voters
            .iter()
            .map(|(id, a)| format!("{id}@{a}"))
            .collect::<Vec<_>>()
            .join(",");
        vec![
            ("node.id", self.node_id.to_string(), CONFIG_TYPE_INT),
            ("broker.id", self.node_id.to_string(), CONFIG_TYPE_INT),
            ("process.roles", roles, CONFIG_TYPE_LIST),
            ("listeners", listeners, CONFIG_TYPE_STRING),
            (
                "weir.metrics.listen",
                self.metrics_listen
                    .map_or_else(|| "none".to_string(), |a| a.to_string()),
                CONFIG_TYPE_STRING,
            ),
            (
                "advertised.listeners",
                format!(
                    "PLAINTEXT://{}:{}",
                    self.advertised_host, self.advertised_port
                ),
                CONFIG_TYPE_STRING,
            ),
            (
                "controller.listener.names",
                c.controller_listener_names.clone(),
                CONFIG_TYPE_STRING,
            ),
            ("controller.quorum.voters", voters, CONFIG_TYPE_LIST),
            (
                "broker.rack",
                c.rack.clone().unwrap_or_default(),
                CONFIG_TYPE_STRING,
            ),
            (
                "log.dirs",
                self.data_dir.display().to_string(),
                CONFIG_TYPE_STRING,
            ),
            (
                "num.partitions",
                self.num_partitions.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "default.replication.factor",
                self.default_replication_factor.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "min.insync.replicas",
                c.min_insync_replicas.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "auto.create.topics.enable",
                self.auto_create_topics.to_string(),
                CONFIG_TYPE_BOOLEAN,
            ),
            (
                "log.segment.bytes",
                self.log.segment_bytes.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "log.roll.ms",
                self.log.roll_ms.to_string(),
                CONFIG_TYPE_LONG,
            ),
            (
                "log.retention.ms",
                self.log.retention_ms.to_string(),
                CONFIG_TYPE_LONG,
            ),
            (
                "log.retention.bytes",
                self.log.retention_bytes.to_string(),
                CONFIG_TYPE_LONG,
            ),
            (
                "log.retention.check.interval.ms",
                self.retention_check_interval_ms.to_string(),
                CONFIG_TYPE_LONG,
            ),
            (
                "log.index.interval.bytes",
                self.log.index_interval_bytes.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "log.message.timestamp.type",
                if self.log.log_append_time {
                    "LogAppendTime"
                } else {
                    "CreateTime"
                }
                .to_string(),
                CONFIG_TYPE_STRING,
            ),
            (
                "message.max.bytes",
                self.log.message_bytes_max.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "socket.request.max.bytes",
                self.socket_request_bytes_max.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "max.connections",
                self.connections_per_shard_max.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "producer.id.expiration.ms",
                self.producer_id_expiration_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "offsets.topic.num.partitions",
                self.group.offsets_partitions.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "transaction.state.log.num.partitions",
                self.txn.partitions.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "transaction.max.timeout.ms",
                self.txn.max_timeout_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "transactional.id.expiration.ms",
                self.txn.id_expiration_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "offsets.retention.minutes",
                (self.group.offsets_retention_ms / 60_000).to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "offsets.retention.check.interval.ms",
                self.group.offsets_retention_check_ms.to_string(),
                CONFIG_TYPE_LONG,
            ),
            (
                "offset.metadata.max.bytes",
                self.group.offset_metadata_bytes_max.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "group.min.session.timeout.ms",
                self.group.min_session_timeout_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "group.max.session.timeout.ms",
                self.group.max_session_timeout_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "group.initial.rebalance.delay.ms",
                self.group.initial_rebalance_delay_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "group.consumer.heartbeat.interval.ms",
                self.group.consumer_heartbeat_interval_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "group.consumer.session.timeout.ms",
                self.group.consumer_session_timeout_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "group.consumer.max.size",
                self.group.consumer_max_size.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "broker.session.timeout.ms",
                c.session_timeout_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "broker.heartbeat.interval.ms",
                c.heartbeat_interval_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "replica.fetch.max.bytes",
                c.replica_fetch_max_bytes.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "replica.fetch.response.max.bytes",
                c.replica_fetch_response_max_bytes.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "replica.fetch.wait.max.ms",
                c.replica_fetch_wait_max_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "replica.fetch.backoff.ms",
                c.replica_fetch_backoff_ms.to_string(),
                CONFIG_TYPE_INT,
            ),
            (
                "replica.lag.time.max.ms",
                c.replica_lag_time_max_ms.to_string(),
                CONFIG_TYPE_LONG,
            ),
            ("num.replica.fetchers", "1".to_string(), CONFIG_TYPE_INT),
            (
                "unclean.leader.election.enable",
                "false".to_string(),
                CONFIG_TYPE_BOOLEAN,
            ),
            (
                "auto.leader.rebalance.enable",
                c.auto_leader_rebalance.to_string(),
                CONFIG_TYPE_BOOLEAN,
            ),
            (
                "leader.imbalance.check.interval.seconds",
                c.leader_imbalance_check_interval_s.to_string(),
                CONFIG_TYPE_LONG,
            ),
            (
                "leader.imbalance.per.broker.percentage",
                c.leader_imbalance_per_broker_percentage.to_string(),
                CONFIG_TYPE_INT,
            ),
        ]
    }

    /// The key as DescribeConfigs names it for a given key and its aliases.
    fn canonical_key(k: &str) -> &str {
        match k {
            "broker.id" => "node.id",
            "log.dir" => "log.dirs",
            "log.roll.hours" => "log.roll.ms",
            "log.retention.minutes" | "log.retention.hours" => "log.retention.ms",
            other => other,
        }
    }

    /// Whether this node runs in a cluster (a controller quorum is configured).
    pub fn in_cluster(&self) -> bool {
        !self.cluster.voters.is_empty()
    }

    /// Checks the cluster settings once every property and flag is applied: the listeners
    /// resolve (`listeners` may name a controller listener, whose name
    /// `controller.listener.names` may give after it), and this node's roles fit the voters.
    pub fn finish(&mut self) -> Result<()> {
        self.resolve_listeners()?;
        if !self.in_cluster() {
            return Ok(());
        }
        anyhow::ensure!(
            self.cluster.roles_broker || self.cluster.roles_controller,
            "process.roles must name broker, controller or both"
        );
        self.check_roles()
    }

    /// The client listener is the first entry of `listeners` not named in
    /// `controller.listener.names`; the controller listener is the one named there.
    fn resolve_listeners(&mut self) -> Result<()> {
        let Some(raw) = self.cluster.listeners_raw.clone() else {
            return Ok(());
        };
        let names: Vec<String> = self
            .cluster
            .controller_listener_names
            .split(',')
            .map(|n| n.trim().to_ascii_uppercase())
            .collect();
        let mut client = None;
        for l in raw.split(',').map(str::trim).filter(|l| !l.is_empty()) {
            let name = l
                .split_once("://")
                .map(|(n, _)| n.trim().to_ascii_uppercase())
                .unwrap_or_else(|| "PLAINTEXT".into());
            let (host, port) = parse_listener(l)?;
            let addr: SocketAddr = format!("{host}:{port}")
                .parse()
                .with_context(|| format!("listener {l} is not an ip:port"))?;
            if names.contains(&name) {
                self.cluster.controller_listen = Some(addr);
            } else if client.is_none() {
                client = Some(addr);
            }
        }
        if let Some(addr) = client {
            self.set_listen(addr);
        }
        Ok(())
    }

    /// A cluster node's roles fit the voters; the timeouts fit each other.
    fn check_roles(&mut self) -> Result<()> {
        let c = &mut self.cluster;
        let me = self.node_id as u64;
        if c.roles_controller {
            let voter = c.voters.get(&me).copied().with_context(|| {
                format!(
                    "node.id {me} has the controller role but is not in controller.quorum.voters"
                )
            })?;
            if c.controller_listen.is_none() {
                c.controller_listen = Some(voter);
            }
        } else {
            anyhow::ensure!(
                !c.voters.contains_key(&me),
                "node.id {me} is in controller.quorum.voters but process.roles lacks controller"
            );
        }
        anyhow::ensure!(
            c.heartbeat_interval_ms < c.session_timeout_ms,
            "broker.heartbeat.interval.ms must be shorter than broker.session.timeout.ms"
        );
        Ok(())
    }

    /// Sets the listen address; it is also what Metadata announces unless an advertised
    /// listener was given.
    pub fn set_listen(&mut self, listen: SocketAddr) {
        self.listen = listen;
        if !self.advertised_explicit {
            self.advertised_host = listen.ip().to_string();
            self.advertised_port = listen.port() as i32;
        }
    }

    /// Sets the advertised listener (`PLAINTEXT://host:port` or `host:port`); it wins over
    /// the listen address whichever is set later.
    pub fn set_advertised(&mut self, listener: &str) -> Result<()> {
        let (host, port) = parse_listener(listener)?;
        self.advertised_host = host;
        self.advertised_port = port;
        self.advertised_explicit = true;
        Ok(())
    }

    /// Applies a Kafka server.properties file. Unknown keys are logged and ignored, as Kafka
    /// does; a known key with a bad value is an error.
    pub fn apply_properties(&mut self, text: &str) -> Result<()> {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let Some((k, v)) = line.split_once(['=', ':']) else {
                bail!("line {}: expected key=value", n + 1);
            };
            let (k, v) = (k.trim(), v.trim());
            self.apply_property(k, v)
                .with_context(|| format!("line {}: {k}", n + 1))?;
        }
        Ok(())
    }

    pub fn apply_property(&mut self, k: &str, v: &str) -> Result<()> {
        self.apply_known(k, v)?;
        // Unknown keys land here too; DescribeConfigs only asks about the ones it lists.
        let key = Config::canonical_key(k);
        self.given.insert(key.to_string());
        if key == "node.id" {
            self.given.insert("broker.id".into());
        }
        Ok(())
    }

    fn apply_known(&mut self, k: &str, v: &str) -> Result<()> {
        match k {
            "num.partitions" => {
                self.num_partitions =
                    parse_i64_min(v, 1)?.min(PARTITIONS_PER_TOPIC_MAX as i64) as i32
            }
            "default.replication.factor" => {
                self.default_replication_factor = parse_i64_min(v, 1)?.min(i16::MAX as i64) as i16
            }
            "auto.create.topics.enable" => self.auto_create_topics = parse_bool(v)?,
            "log.segment.bytes" => self.log.segment_bytes = parse_segment_bytes(v)?,
            "log.roll.ms" => self.log.roll_ms = parse_i64_min(v, 1)? as u64,
            "log.roll.hours" => self.log.roll_ms = parse_i64_min(v, 1)? as u64 * 3_600_000,
            "log.retention.ms" => self.log.retention_ms = parse_i64_min(v, -1)?,
            "log.retention.minutes" => {
                self.log.retention_ms = parse_i64_min(v, -1)?.saturating_mul(60_000)
            }
            "log.retention.hours" => {
                self.log.retention_ms = parse_i64_min(v, -1)?.saturating_mul(3_600_000)
            }
            "log.retention.bytes" => self.log.retention_bytes = parse_i64_min(v, -1)?,
            "log.retention.check.interval.ms" => {
                self.retention_check_interval_ms = parse_i64_min(v, 1)? as u64
            }
            "log.index.interval.bytes" => self.log.index_interval_bytes = parse_index_interval(v)?,
            "log.message.timestamp.type" => {
                self.log.apply_topic_key("message.timestamp.type", v)?
            }
            "socket.request.max.bytes" => {
                let n = parse_i64_min(v, 1024)? as usize;
                if n > SOCKET_REQUEST_BYTES_CEILING {
                    bail!("{n} exceeds Weir's ceiling {SOCKET_REQUEST_BYTES_CEILING}");
                }
                self.socket_request_bytes_max = n;
            }
            "message.max.bytes" => self.log.message_bytes_max = parse_message_bytes(v)?,
            "node.id" | "broker.id" => {
                self.node_id = parse_i64_min(v, 0)?.min(i32::MAX as i64) as i32
            }
            "log.dirs" | "log.dir" => {
                self.data_dir = PathBuf::from(v.split(',').next().unwrap_or(v).trim())
            }
            "offsets.topic.num.partitions" => {
                self.group.offsets_partitions = parse_i64_min(v, 1)?.min(1000) as i32
            }
            "log.cleaner.enable" => self.cleaner_enable = parse_bool(v)?,
            "log.cleaner.backoff.ms" => self.cleaner_backoff_ms = parse_i64_min(v, 1)? as u64,
            "log.cleaner.dedupe.buffer.size" => {
                self.cleaner_dedupe_bytes = parse_i64_min(v, 1 << 20)?.min(1 << 34) as usize
            }
            "log.cleaner.io.max.bytes.per.second" => {
                let r: f64 = v.trim().parse().context("not a number")?;
                self.cleaner_io_bytes_per_s = if r >= u64::MAX as f64 || r <= 0.0 {
                    0
                } else {
                    r as u64
                };
            }
            "offsets.topic.segment.bytes" => {
                self.group.offsets_segment_bytes = parse_segment_bytes(v)?
            }
            "transaction.state.log.segment.bytes" => {
                self.txn.segment_bytes = parse_segment_bytes(v)?
            }
            "transaction.state.log.num.partitions" => {
                self.txn.partitions = parse_i64_min(v, 1)?.min(1000) as i32
            }
            "transaction.max.timeout.ms" => {
                self.txn.max_timeout_ms = parse_i64_min(v, 1)?.min(i32::MAX as i64) as i32
            }
            "transactional.id.expiration.ms" => self.txn.id_expiration_ms = parse_i64_min(v, 1)?,
            "transaction.abort.timed.out.transaction.cleanup.interval.ms" => {
                self.txn.abort_check_interval_ms = parse_i64_min(v, 1)? as u64
            }
            "group.min.session.timeout.ms" => {
                self.group.min_session_timeout_ms = parse_i64_min(v, 1)?.min(i32::MAX as i64) as i32
            }
            "group.max.session.timeout.ms" => {
                self.group.max_session_timeout_ms = parse_i64_min(v, 1)?.min(i32::MAX as i64) as i32
            }
            "group.initial.rebalance.delay.ms" => {
                self.group.initial_rebalance_delay_ms = parse_i64_min(v, 0)? as u64
            }
            "group.consumer.heartbeat.interval.ms" => {
                self.group.consumer_heartbeat_interval_ms =
                    parse_i64_min(v, 1)?.min(i32::MAX as i64) as i32
            }
            "group.consumer.session.timeout.ms" => {
                self.group.consumer_session_timeout_ms =
                    parse_i64_min(v, 1)?.min(i32::MAX as i64) as i32
            }
            "group.consumer.max.size" => {
                self.group.consumer_max_size =
                    parse_i64_min(v, 1)?.min(crate::group::MEMBERS_PER_GROUP_MAX as i64) as usize
            }
            "offsets.retention.minutes" => {
                self.group.offsets_retention_ms = parse_i64_min(v, 1)?.saturating_mul(60_000)
            }
            "offsets.retention.check.interval.ms" => {
                self.group.offsets_retention_check_ms = parse_i64_min(v, 1)? as u64
            }
            "offset.metadata.max.bytes" => {
                self.group.offset_metadata_bytes_max = parse_i64_min(v, 0)?.min(1 << 20) as usize
            }
            "producer.id.expiration.ms" => self.producer_id_expiration_ms = parse_i64_min(v, 1)?,
            "max.connections" => self.connections_per_shard_max = parse_i64_min(v, 1)? as usize,
            "listeners" => {
                // Resolved now, and again by `finish` in case `controller.listener.names`
                // comes later.
                self.cluster.listeners_raw = Some(v.to_string());
                self.resolve_listeners()?;
            }
            "controller.listener.names" => self.cluster.controller_listener_names = v.to_string(),
            "weir.metrics.listen" => self.metrics_listen = parse_metrics_listen(v)?,
            "process.roles" => {
                let (mut b, mut c) = (false, false);
                for r in v.split(',').map(str::trim) {
                    match r {
                        "broker" => b = true,
                        "controller" => c = true,
                        _ => bail!("unknown role {r:?} (expected broker and/or controller)"),
                    }
                }
                self.cluster.roles_broker = b;
                self.cluster.roles_controller = c;
            }
            "controller.quorum.voters" => self.cluster.voters = parse_voters(v)?,
            "broker.session.timeout.ms" => {
                self.cluster.session_timeout_ms = parse_i64_min(v, 100)? as u64
            }
            "broker.heartbeat.interval.ms" => {
                self.cluster.heartbeat_interval_ms = parse_i64_min(v, 10)? as u64
            }
            "min.insync.replicas" => {
                self.cluster.min_insync_replicas = parse_i64_min(v, 1)?.min(i16::MAX as i64) as i16;
                self.log.min_insync_replicas = self.cluster.min_insync_replicas;
            }
            "broker.rack" => self.cluster.rack = Some(v.to_string()),
            "replica.fetch.max.bytes" => {
                self.cluster.replica_fetch_max_bytes = parse_i64_min(v, 1024)?
                    .min(crate::config::MESSAGE_BYTES_CEILING as i64)
                    as usize
            }
            "replica.fetch.response.max.bytes" => {
                self.cluster.replica_fetch_response_max_bytes = parse_i64_min(v, 1024)?
                    .min(crate::kafka::fetch::FETCH_RESPONSE_BYTES_MAX as i64)
                    as usize
            }
            "replica.fetch.wait.max.ms" => {
                self.cluster.replica_fetch_wait_max_ms = parse_i64_min(v, 0)?.min(30_000) as u64
            }
            "replica.fetch.backoff.ms" => {
                self.cluster.replica_fetch_backoff_ms = parse_i64_min(v, 0)?.min(60_000) as u64
            }
            "replica.lag.time.max.ms" => {
                self.cluster.replica_lag_time_max_ms = parse_i64_min(v, 100)? as u64
            }
            "auto.leader.rebalance.enable" => self.cluster.auto_leader_rebalance = parse_bool(v)?,
            "leader.imbalance.check.interval.seconds" => {
                self.cluster.leader_imbalance_check_interval_s = parse_i64_min(v, 1)? as u64
            }
            "leader.imbalance.per.broker.percentage" => {
                self.cluster.leader_imbalance_per_broker_percentage =
                    parse_i64_min(v, 0)?.min(100) as u32
            }
            "num.replica.fetchers" => {
                if parse_i64_min(v, 1)? != 1 {
                    bail!("num.replica.fetchers: Weir runs one fetcher per leader broker (1)");
                }
            }
            "unclean.leader.election.enable" => {
                if parse_bool(v)? {
                    bail!("unclean.leader.election.enable=true is not supported: Weir elects leaders from the ISR only");
                }
            }
            "advertised.listeners" => self.set_advertised(v)?,
            _ => tracing::warn!(key = k, "ignoring server.properties key Weir does not use"),
        }
        Ok(())
    }
}

fn parse_bool(v: &str) -> Result<bool> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => bail!("expected true or false, got {v:?}"),
    }
}

/// Parses `PLAINTEXT://host:port` or `host:port`.
pub fn parse_listener(v: &str) -> Result<(String, i32)> {
    let v = v.split(',').next().unwrap_or(v).trim();
    let v = v.rsplit_once("://").map(|(_, rest)| rest).unwrap_or(v);
    let (host, port) = v.rsplit_once(':').context("listener needs host:port")?;
    let port: u16 = port.parse().with_context(|| format!("bad port in {v}"))?;
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    Ok((host.trim_matches(['[', ']']).to_string(), port as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::new("127.0.0.1:9092".parse().unwrap(), "d".into(), 1)
    }

    #[test]
    fn properties_apply_known_keys_and_reject_bad_values() {
        let mut c = cfg();
        c.apply_properties(
            "# comment\nnum.partitions=6\nlog.segment.bytes = 1048576\nauto.create.topics.enable=false\nsocket.request.max.bytes=2000\nsome.unknown=1\n",
        )
        .unwrap();
        assert_eq!(c.num_partitions, 6);
        assert_eq!(c.log.segment_bytes, 1 << 20);
        assert!(!c.auto_create_topics);
        assert_eq!(c.socket_request_bytes_max, 2000);
        assert!(c.apply_properties("num.partitions=zero").is_err());
        assert!(c
            .apply_properties("message.max.bytes=999999999999")
            .is_err());
    }

    #[test]
    fn topic_overrides() {
        let base = LogConfig::default();
        let mut o = BTreeMap::new();
        o.insert("retention.ms".to_string(), "1000".to_string());
        o.insert(
            "message.timestamp.type".to_string(),
            "LogAppendTime".to_string(),
        );
        let c = base.with_topic_overrides(&o).unwrap();
        assert_eq!(c.retention_ms, 1000);
        assert!(c.log_append_time);
        o.insert("cleanup.policy".to_string(), "compact".to_string());
        let c = base.with_topic_overrides(&o).unwrap();
        assert!(c.compact && !c.delete);
        o.insert("cleanup.policy".to_string(), "compact,delete".to_string());
        let c = base.with_topic_overrides(&o).unwrap();
        assert!(c.compact && c.delete);
        assert_eq!(
            c.describe("cleanup.policy").as_deref(),
            Some("compact,delete")
        );
        o.insert("cleanup.policy".to_string(), "shred".to_string());
        assert!(base.with_topic_overrides(&o).is_err());
        o.insert("cleanup.policy".to_string(), "compact".to_string());
        o.insert("min.cleanable.dirty.ratio".to_string(), "1.5".to_string());
        assert!(base.with_topic_overrides(&o).is_err());
        let mut bad = BTreeMap::new();
        bad.insert("no.such.key".to_string(), "1".to_string());
        assert!(base.with_topic_overrides(&bad).is_err());
    }

    #[test]
    fn advertised_listener_wins_over_the_listen_address_in_any_order() {
        let flag: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        // File: advertised after listeners, then the --listen flag.
        let mut c = cfg();
        c.apply_properties(
            "listeners=PLAINTEXT://127.0.0.1:9093\nadvertised.listeners=PLAINTEXT://adv.example:9094\n",
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9093");
        c.set_listen(flag);
        assert_eq!(c.listen, flag);
        assert_eq!(
            (c.advertised_host.as_str(), c.advertised_port),
            ("adv.example", 9094)
        );
        // File: advertised before listeners.
        let mut c = cfg();
        c.apply_properties(
            "advertised.listeners=adv.example:9094\nlisteners=PLAINTEXT://127.0.0.1:9093\n",
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9093");
        assert_eq!(
            (c.advertised_host.as_str(), c.advertised_port),
            ("adv.example", 9094)
        );
        // Only listeners: the listen address is announced, and a later --listen replaces both.
        let mut c = cfg();
        c.apply_properties("listeners=PLAINTEXT://127.0.0.1:9093\n")
            .unwrap();
        assert_eq!(
            (c.advertised_host.as_str(), c.advertised_port),
            ("127.0.0.1", 9093)
        );
        c.set_listen(flag);
        assert_eq!(
            (c.advertised_host.as_str(), c.advertised_port),
            ("127.0.0.1", 7000)
        );
        // --advertised-listener wins over the file.
        c.set_advertised("flag.example:1").unwrap();
        c.apply_properties("listeners=PLAINTEXT://127.0.0.1:9093\n")
            .unwrap();
        assert_eq!(
            (c.advertised_host.as_str(), c.advertised_port),
            ("flag.example", 1)
        );
    }

    #[test]
    fn listeners() {
        assert_eq!(
            parse_listener("PLAINTEXT://localhost:9093").unwrap(),
            ("localhost".into(), 9093)
        );
        assert_eq!(
            parse_listener("10.0.0.1:1").unwrap(),
            ("10.0.0.1".into(), 1)
        );
        assert!(parse_listener("nohost").is_err());
    }
}

/// Cluster settings, as Kafka names them.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `process.roles`.
    pub roles_broker: bool,
    pub roles_controller: bool,
    /// `controller.quorum.voters`: node id -> controller listener. Empty: a single node.
    pub voters: std::collections::BTreeMap<u64, SocketAddr>,
    /// Where this node's controller listener binds (the `CONTROLLER` entry of `listeners`,
    /// else its own voter address).
    pub controller_listen: Option<SocketAddr>,
    pub controller_listener_names: String,
    /// `listeners` as given, resolved by `Config::finish`.
    pub listeners_raw: Option<String>,
    /// `broker.session.timeout.ms`: a broker silent this long is fenced.
    pub session_timeout_ms: u64,
    /// `broker.heartbeat.interval.ms`.
    pub heartbeat_interval_ms: u64,
    /// `min.insync.replicas` (used by replication, issue #12).
    pub min_insync_replicas: i16,
    /// `broker.rack`.
    pub rack: Option<String>,
    /// `replica.fetch.max.bytes`: one partition's share of a follower's fetch.
    pub replica_fetch_max_bytes: usize,
    /// `replica.fetch.response.max.bytes`: a whole follower fetch response.
    pub replica_fetch_response_max_bytes: usize,
    /// `replica.fetch.wait.max.ms`: how long a follower's fetch waits at the leader for data.
    pub replica_fetch_wait_max_ms: u64,
    /// `replica.fetch.backoff.ms`: a follower's pause after a failed fetch.
    pub replica_fetch_backoff_ms: u64,
    /// `replica.lag.time.max.ms`: a follower not caught up for this long leaves the ISR.
    pub replica_lag_time_max_ms: u64,
    /// `auto.leader.rebalance.enable`: the controller moves leaderships back to preferred
    /// replicas.
    pub auto_leader_rebalance: bool,
    /// `leader.imbalance.check.interval.seconds`.
    pub leader_imbalance_check_interval_s: u64,
    /// `leader.imbalance.per.broker.percentage`: accepted and described, unused (as in Kafka's
    /// KRaft controller, every partition whose preferred replica can lead moves back).
    pub leader_imbalance_per_broker_percentage: u32,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            roles_broker: true,
            roles_controller: true,
            voters: Default::default(),
            controller_listen: None,
            controller_listener_names: "CONTROLLER".into(),
            listeners_raw: None,
            session_timeout_ms: 9000,
            heartbeat_interval_ms: 2000,
            min_insync_replicas: 1,
            rack: None,
            replica_fetch_max_bytes: 1 << 20,
            replica_fetch_response_max_bytes: 10 << 20,
            replica_fetch_wait_max_ms: 500,
            replica_fetch_backoff_ms: 1000,
            replica_lag_time_max_ms: 30_000,
            auto_leader_rebalance: true,
            leader_imbalance_check_interval_s: 300,
            leader_imbalance_per_broker_percentage: 10,
        }
    }
}

/// Parses `0@127.0.0.1:9093,1@127.0.0.1:9095`.
pub fn parse_voters(v: &str) -> Result<std::collections::BTreeMap<u64, SocketAddr>> {
    let mut out = std::collections::BTreeMap::new();
    for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, addr) = item
            .split_once('@')
            .with_context(|| format!("voter {item:?} is not id@host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("voter id in {item:?}"))?;
        let addr: SocketAddr = addr
            .trim()
            .parse()
            .with_context(|| format!("voter address in {item:?} is not an ip:port"))?;
        anyhow::ensure!(out.insert(id, addr).is_none(), "voter {id} is named twice");
    }
    anyhow::ensure!(!out.is_empty(), "controller.quorum.voters names no voter");
    Ok(out)
}
