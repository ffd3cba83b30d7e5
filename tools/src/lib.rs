//! Weir's Kafka client library: a producer with Kafka's pipeline and settings, a consumer with
//! groups, and an admin client, all on the kafka-protocol crate. Blocking I/O on a few threads:
//! the library is for tools, tests and benchmarks, not the broker's hot path.

pub mod admin;
pub mod client;
pub mod cluster;
pub mod console;
pub mod consumer;
pub mod log_dirs;
pub mod partitioner;
pub mod producer;
pub mod reassign;

use std::time::Duration;

use anyhow::{bail, Result};

pub use client::conn::Conn;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Connects to the first reachable server of a comma-separated bootstrap list.
pub fn connect_any(bootstrap: &str, client_id: &str, timeout: Duration) -> Result<Conn> {
    let mut last = None;
    for addr in bootstrap
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        match Conn::connect(addr, client_id, timeout) {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e),
        None => bail!("no bootstrap server given"),
    }
}

/// Kafka's name of an error code.
pub fn error_name(code: i16) -> &'static str {
    match code {
        0 => "NONE",
        1 => "OFFSET_OUT_OF_RANGE",
        2 => "CORRUPT_MESSAGE",
        3 => "UNKNOWN_TOPIC_OR_PARTITION",
        6 => "NOT_LEADER_OR_FOLLOWER",
        7 => "REQUEST_TIMED_OUT",
        10 => "MESSAGE_TOO_LARGE",
        14 => "COORDINATOR_LOAD_IN_PROGRESS",
        15 => "COORDINATOR_NOT_AVAILABLE",
        16 => "NOT_COORDINATOR",
        17 => "INVALID_TOPIC_EXCEPTION",
        22 => "ILLEGAL_GENERATION",
        25 => "UNKNOWN_MEMBER_ID",
        27 => "REBALANCE_IN_PROGRESS",
        36 => "TOPIC_ALREADY_EXISTS",
        37 => "INVALID_PARTITIONS",
        38 => "INVALID_REPLICATION_FACTOR",
        40 => "INVALID_CONFIG",
        42 => "INVALID_REQUEST",
        45 => "OUT_OF_ORDER_SEQUENCE_NUMBER",
        47 => "INVALID_PRODUCER_EPOCH",
        56 => "KAFKA_STORAGE_ERROR",
        68 => "NON_EMPTY_GROUP",
        69 => "GROUP_ID_NOT_FOUND",
        79 => "MEMBER_ID_REQUIRED",
        82 => "FENCED_INSTANCE_ID",
        87 => "INVALID_RECORD",
        _ => "UNKNOWN_SERVER_ERROR",
    }
}
