//! Replication throttles (Kafka's KIP-73): a byte rate for catch-up traffic, set as dynamic
//! broker configs, applied only to the replicas the topic configs name.
//!
//! - `leader.replication.throttled.rate` (bytes/s) limits what this broker, as a leader, sends
//!   to followers of replicas listed in a topic's `leader.replication.throttled.replicas` as
//!   `partition:<this broker>` (or `*`), while the fetching follower is not in the ISR.
//! - `follower.replication.throttled.rate` limits what this broker, as a follower, fetches for
//!   its replicas listed in `follower.replication.throttled.replicas` as
//!   `partition:<this broker>` (or `*`), while it is not in the ISR.
//!
//! In-sync replicas are never throttled, so acks=all latency does not depend on a running
//! reassignment. Each direction is one token bucket for the whole broker (all shards): it
//! refills at the rate and holds at most one second of it. A throttled partition is left out
//! of a fetch (asked or answered with 0 bytes) while the bucket is empty; bytes sent or
//! received are taken out of it afterwards, so it may go below zero by one fetch, and over any
//! interval of `t` seconds at most `rate * (t + 1)` bytes plus one fetch pass.
//!
//! | limit | value |
//! |---|---|
//! | burst | one second of the rate |
//! | overshoot | one fetch: up to `replica.fetch.response.max.bytes`, and never less than one whole batch |

use std::sync::Mutex;
use std::time::Instant;

use crate::cluster::metadata::Image;

pub const LEADER_RATE: &str = "leader.replication.throttled.rate";
pub const FOLLOWER_RATE: &str = "follower.replication.throttled.rate";
pub const LEADER_REPLICAS: &str = "leader.replication.throttled.replicas";
pub const FOLLOWER_REPLICAS: &str = "follower.replication.throttled.replicas";

/// Seconds of the rate the bucket holds when idle.
const BURST_S: f64 = 1.0;

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be moved now; below zero after an overshoot.
    tokens: f64,
    /// The last refill; None before first use.
    last: Option<Instant>,
}

impl Bucket {
    const fn new() -> Bucket {
        Bucket {
            tokens: 0.0,
            last: None,
        }
    }

    fn refill(&mut self, rate: u64, now: Instant) {
        let cap = rate as f64 * BURST_S;
        match self.last {
            None => self.tokens = cap,
            Some(last) => {
                let dt = now.saturating_duration_since(last).as_secs_f64();
                self.tokens = (self.tokens + dt * rate as f64).min(cap);
            }
        }
        self.last = Some(now);
    }

    fn exceeded(&mut self, rate: u64, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens <= 0.0
    }

    fn record(&mut self, rate: u64, bytes: usize, now: Instant) {
        self.refill(rate, now);
        self.tokens -= bytes as f64;
    }
}

/// One direction's throttle, shared by every shard of this broker (the lock is held for a
/// few arithmetic operations, never across an await).
pub struct Quota(Mutex<Bucket>);

impl Quota {
    const fn new() -> Quota {
        Quota(Mutex::new(Bucket::new()))
    }

    /// Whether throttled partitions must wait (the bucket is empty).
    pub fn exceeded(&self, rate: u64) -> bool {
        self.0
            .lock()
            .expect("throttle lock")
            .exceeded(rate, Instant::now())
    }

    /// Takes bytes moved for throttled partitions out of the bucket.
    pub fn record(&self, rate: u64, bytes: usize) {
        if bytes > 0 {
            self.0
                .lock()
                .expect("throttle lock")
                .record(rate, bytes, Instant::now());
        }
    }
}

/// What this broker sends, as a leader, to out-of-sync followers of throttled replicas.
pub static LEADER: Quota = Quota::new();
/// What this broker fetches, as a follower, for its throttled replicas while out of sync.
pub static FOLLOWER: Quota = Quota::new();

/// The effective throttle rate `key` on broker `node` in bytes/s; None: not throttled.
pub fn rate(image: &Image, node: i32, key: &str) -> Option<u64> {
    let (v, _) = image.broker_config(node, key)?;
    match v.trim().parse::<i64>() {
        Ok(n) if (0..i64::MAX).contains(&n) => Some(n as u64),
        _ => None,
    }
}

/// Whether the topic config `key` (a throttled-replicas list) names replica
/// (`partition`, `node`) of `topic`.
pub fn listed(image: &Image, topic: &str, key: &str, partition: i32, node: i32) -> bool {
    image
        .topics
        .get(topic)
        .and_then(|t| t.configs.get(key))
        .is_some_and(|list| crate::config::throttled_replica(list, partition, node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_holds_the_rate_over_time() {
        let mut b = Bucket::new();
        let t0 = Instant::now();
        let rate = 1000;
        // One second of burst, then empty.
        assert!(!b.exceeded(rate, t0));
        b.record(rate, 1500, t0);
        assert!(b.exceeded(rate, t0));
        // Half a second later the overshoot (-500) is paid back to 0: still waiting.
        assert!(b.exceeded(rate, t0 + Duration::from_millis(500)));
        assert!(!b.exceeded(rate, t0 + Duration::from_millis(600)));
        // Moving as fast as allowed for 10 s moves at most rate * (10 + burst) + one fetch.
        let mut moved = 1500usize;
        let mut now = t0 + Duration::from_millis(600);
        let end = t0 + Duration::from_secs(10);
        while now < end {
            if !b.exceeded(rate, now) {
                b.record(rate, 300, now);
                moved += 300;
            }
            now += Duration::from_millis(10);
        }
        assert!(moved <= 1000 * 11 + 300, "moved {moved}");
        assert!(moved >= 1000 * 9, "moved {moved}");
        // Idle time refills at most one second's worth.
        assert!(!b.exceeded(rate, end + Duration::from_secs(60)));
        assert!(b.tokens <= 1000.0);
    }

    #[test]
    fn throttled_replica_lists() {
        use crate::config::{parse_throttled_replicas, throttled_replica};
        assert!(throttled_replica("*", 3, 7));
        assert!(throttled_replica("0:1,3:7", 3, 7));
        assert!(!throttled_replica("0:1,3:7", 3, 1));
        assert!(!throttled_replica("", 0, 0));
        assert!(parse_throttled_replicas(LEADER_REPLICAS, "0:1, 2:3").is_ok());
        assert!(parse_throttled_replicas(LEADER_REPLICAS, "").is_ok());
        let e = parse_throttled_replicas(LEADER_REPLICAS, "0-1").unwrap_err();
        assert!(e.to_string().contains("must be the literal '*'"), "{e}");
        assert!(parse_throttled_replicas(LEADER_REPLICAS, "x:1").is_err());
        assert!(parse_throttled_replicas(LEADER_REPLICAS, "1:-2").is_err());
    }
}
