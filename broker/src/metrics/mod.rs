//! Broker metrics: what the shards count, and the Prometheus endpoint that reads it.
//!
//! Each shard writes only its own `ShardMetrics`: plain atomics (relaxed, one writer, so no
//! cache line moves between cores on the data path) and fixed-bucket histograms. The scrape
//! runs on its own thread (`exposition`), sums the shards and never touches a shard's
//! `RefCell`s or locks: what needs the shard's own state (partition offsets, cache bytes,
//! groups) is copied out by a sampler task on each shard every `SAMPLE_INTERVAL`, into
//! atomics or a snapshot behind a mutex that only the sampler and the scrape take.
//!
//! | what | where it is counted |
//! |---|---|
//! | requests by API and error code, latency by API | `kafka::respond` (outcome), `net` (latency: frame read to response ready) |
//! | bytes and records in / out per partition | produce appends (`Shard::appended`), consumer fetches (`Shard::read_partition`) |
//! | fdatasync latency, bytes per group-commit round | `Shard::sync_partition` / `sync_parts` |
//! | produce stages (`Stage`) | `net` (frame read, append, response write), `Shard` (disk write, stored and replication waits) |
//! | cache hits / misses | consumer fetches served from the batch cache / from disk |
//! | backpressure waits | appends that waited for the shard's pending bytes to drain |
//! | ISR shrinks / expands | `replication::isr_ticker` once the controller took the change |
//! | offsets, sizes, cache and pending bytes, groups, cluster state | the sampler (`sample`) |
//!
//! | limit | value |
//! |---|---|
//! | API slots | `API_SLOTS` (API keys 0..=127) |
//! | error-code slots | `ERROR_SLOTS` (-1..=126; others count as `UNKNOWN`) |
//! | histogram buckets | `LATENCY_BUCKETS_S`, `BYTES_BUCKETS` |
//! | a scrape request | `exposition::REQUEST_BYTES_MAX`, read within `exposition::REQUEST_TIMEOUT` |

pub mod exposition;

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often each shard copies its gauges (offsets, sizes, groups) out for scrapes.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
pub const API_SLOTS: usize = 128;
pub const ERROR_SLOTS: usize = 128;
/// Request and fdatasync latency buckets, seconds: fine from 0.1 to 10 ms, where an fdatasync
/// and an acks=all Produce fall on a local disk, so their p99 can be read to within 0.25-1 ms.
pub const LATENCY_BUCKETS_S: [f64; 23] = [
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Bytes per group-commit round buckets.
pub const BYTES_BUCKETS: [f64; 12] = [
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
    17179869184.0,
];

/// A histogram with fixed buckets, one writer: counts per bucket (not cumulative), the sum in
/// the bucket unit's millionths, the count.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add((v * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Adds this histogram into `into`: per-bucket counts by upper bound (not cumulative, as
    /// prometheus-client's encoder takes them), sum, count.
    fn add_to(&self, into: &mut HistogramSum) {
        if into.buckets.is_empty() {
            into.buckets = self.bounds.iter().map(|b| (*b, 0)).collect();
            into.buckets.push((f64::INFINITY, 0));
        }
        for (i, c) in self.counts.iter().enumerate() {
            into.buckets[i].1 += c.load(Relaxed);
        }
        into.sum += self.sum_micros.load(Relaxed) as f64 / 1e6;
        into.count += self.count.load(Relaxed);
    }
}

#[derive(Default)]
struct HistogramSum {
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

/// A partition replica's counters and sampled gauges. Shared by the shard that owns the
/// replica (its only writer) and the scrape.
pub struct PartitionMetrics {
    pub topic: String,
    pub partition: i32,
    pub bytes_in: AtomicU64,
    pub records_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub records_out: AtomicU64,
    pub log_end_offset: AtomicI64,
    pub high_watermark: AtomicI64,
    pub log_start_offset: AtomicI64,
    pub size_bytes: AtomicU64,
    pub leader: AtomicBool,
    pub under_replicated: AtomicBool,
}

impl PartitionMetrics {
    pub fn new(topic: &str, partition: i32) -> Arc<PartitionMetrics> {
        Arc::new(PartitionMetrics {
            topic: topic.to_string(),
            partition,
            bytes_in: AtomicU64::new(0),
            records_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            log_end_offset: AtomicI64::new(0),
            high_watermark: AtomicI64::new(0),
            log_start_offset: AtomicI64::new(0),
            size_bytes: AtomicU64::new(0),
            leader: AtomicBool::new(false),
            under_replicated: AtomicBool::new(false),
        })
    }

    pub fn produced(&self, records: u64, bytes: u64) {
        self.records_in.fetch_add(records, Relaxed);
        self.bytes_in.fetch_add(bytes, Relaxed);
    }

    pub fn fetched(&self, records: u64, bytes: u64) {
        self.records_out.fetch_add(records, Relaxed);
        self.bytes_out.fetch_add(bytes, Relaxed);
    }
}

/// A consumer group as its coordinator shard last sampled it.
#[derive(Clone, Debug)]
pub struct GroupSample {
    pub group: String,
    pub state: &'static str,
    pub members: usize,
    /// (topic, partition, committed offset)
    pub offsets: Vec<(String, i32, i64)>,
}

/// The stages of a produce request, timed separately (`weir_produce_stage_seconds`) so the
/// write path's waits can be told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The frame body's bytes arriving, from its size prefix to its last byte.
    FrameRead = 0,
    /// Stage one: parse, validate, route to the owning shards and append.
    Append = 1,
    /// One partition's disk write round (the flusher's `write_all`).
    DiskWrite = 2,
    /// From the append to the batches being written (acks=1) or fdatasynced (acks=all).
    StoredWait = 3,
    /// acks=all on a replicated partition: from durable to the high watermark passing it.
    ReplicationWait = 4,
    /// Writing the response to the socket.
    ResponseWrite = 5,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::FrameRead,
        Stage::Append,
        Stage::DiskWrite,
        Stage::StoredWait,
        Stage::ReplicationWait,
        Stage::ResponseWrite,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Stage::FrameRead => "frame_read",
            Stage::Append => "append",
            Stage::DiskWrite => "disk_write",
            Stage::StoredWait => "stored_wait",
            Stage::ReplicationWait => "replication_wait",
            Stage::ResponseWrite => "response_write",
        }
    }
}

/// One shard's metrics.
pub struct ShardMetrics {
    /// [api][error + 1]: requests answered.
    requests: Box<[AtomicU64]>,
    /// [api]: request latency, frame read to response ready.
    latency: Box<[Histogram]>,
    pub fsync: Histogram,
    /// Writes through O_DSYNC (`Shard::spawn_write`): a partition's write and its sync.
    pub durable_write: Histogram,
    pub group_commit_bytes: Histogram,
    /// [stage]: produce stage latency (`Stage`).
    pub stages: Box<[Histogram]>,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub backpressure_waits: AtomicU64,
    /// Produced batches stamped where they arrived (`PartitionLog::append_frame`).
    pub batches_in_place: AtomicU64,
    pub isr_shrinks: AtomicU64,
    pub isr_expands: AtomicU64,
    pub connections: AtomicUsize,
    pub cache_bytes: AtomicU64,
    /// Bytes of batch-arena chunks the shard has mapped (`storage::arena`).
    pub arena_bytes: AtomicU64,
    pub pending_bytes: AtomicU64,
    /// The shard's partition replicas, as the sampler last listed them.
    pub partitions: Mutex<Vec<Arc<PartitionMetrics>>>,
    /// The groups this shard coordinates, as the sampler last saw them.
    pub groups: Mutex<Vec<GroupSample>>,
}

impl ShardMetrics {
    fn new() -> ShardMetrics {
        ShardMetrics {
            requests: (0..API_SLOTS * ERROR_SLOTS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            latency: (0..API_SLOTS)
                .map(|_| Histogram::new(&LATENCY_BUCKETS_S))
                .collect(),
            fsync: Histogram::new(&LATENCY_BUCKETS_S),
            durable_write: Histogram::new(&LATENCY_BUCKETS_S),
            group_commit_bytes: Histogram::new(&BYTES_BUCKETS),
            stages: Stage::ALL
                .iter()
                .map(|_| Histogram::new(&LATENCY_BUCKETS_S))
                .collect(),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            backpressure_waits: AtomicU64::new(0),
            batches_in_place: AtomicU64::new(0),
            isr_shrinks: AtomicU64::new(0),
            isr_expands: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            cache_bytes: AtomicU64::new(0),
            arena_bytes: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            partitions: Mutex::new(Vec::new()),
            groups: Mutex::new(Vec::new()),
        }
    }
}

/// Cluster-level gauges, written by shard 0's sampler from the metadata image.
#[derive(Default)]
pub struct ClusterMetrics {
    pub brokers: AtomicI64,
    pub fenced_brokers: AtomicI64,
    pub offline_partitions: AtomicI64,
    pub metadata_version: AtomicI64,
    pub active_controller: AtomicBool,
    pub in_cluster: AtomicBool,
}

/// The whole broker's metrics: one `ShardMetrics` per shard.
pub struct BrokerMetrics {
    pub node_id: i32,
    pub shards: Vec<ShardMetrics>,
    pub cluster: ClusterMetrics,
}

impl BrokerMetrics {
    pub fn new(node_id: i32, shards: usize) -> Arc<BrokerMetrics> {
        Arc::new(BrokerMetrics {
            node_id,
            shards: (0..shards).map(|_| ShardMetrics::new()).collect(),
            cluster: ClusterMetrics::default(),
        })
    }
}

thread_local! {
    /// This shard's metrics (unset on threads that are not shards: then nothing is counted).
    static LOCAL: RefCell<Option<(Arc<BrokerMetrics>, usize)>> = const { RefCell::new(None) };
}

/// Makes this thread shard `shard` of `m`.
pub fn install(m: Arc<BrokerMetrics>, shard: usize) {
    assert!(shard < m.shards.len());
    LOCAL.with(|l| *l.borrow_mut() = Some((m, shard)));
}

/// Runs `f` on this shard's metrics, if this thread is a shard. The borrow ends inside.
pub fn with<R>(f: impl FnOnce(&ShardMetrics) -> R) -> Option<R> {
    LOCAL.with(|l| l.borrow().as_ref().map(|(m, i)| f(&m.shards[*i])))
}

/// The broker's metrics, on a shard thread.
pub fn broker() -> Option<Arc<BrokerMetrics>> {
    LOCAL.with(|l| l.borrow().as_ref().map(|(m, _)| m.clone()))
}

fn slot(api: i16) -> Option<usize> {
    (0..API_SLOTS as i16).contains(&api).then_some(api as usize)
}

/// A request of `api` was answered with `error` (the first error code in the response).
pub fn request_outcome(api: i16, error: i16) {
    let Some(a) = slot(api) else { return };
    let e = if (-1..ERROR_SLOTS as i16 - 1).contains(&error) {
        (error + 1) as usize
    } else {
        ERROR_SLOTS - 1
    };
    with(|m| m.requests[a * ERROR_SLOTS + e].fetch_add(1, Relaxed));
}

/// A request of `api` took `elapsed` from its frame being read to its response being ready.
pub fn request_latency(api: i16, elapsed: Duration) {
    let Some(a) = slot(api) else { return };
    with(|m| m.latency[a].observe(elapsed.as_secs_f64()));
}

pub fn fsync_latency(elapsed: Duration) {
    with(|m| m.fsync.observe(elapsed.as_secs_f64()));
}

/// A partition's pending batches were written through O_DSYNC and made durable in `elapsed`.
pub fn durable_write_latency(elapsed: Duration) {
    with(|m| m.durable_write.observe(elapsed.as_secs_f64()));
}

/// A produce request spent `elapsed` in `stage`.
pub fn produce_stage(stage: Stage, elapsed: Duration) {
    with(|m| m.stages[stage as usize].observe(elapsed.as_secs_f64()));
}

pub fn group_commit(bytes: u64) {
    with(|m| m.group_commit_bytes.observe(bytes as f64));
}

pub fn cache_read(hit: bool) {
    with(|m| {
        if hit {
            m.cache_hits.fetch_add(1, Relaxed);
        } else {
            m.cache_misses.fetch_add(1, Relaxed);
        }
    });
}

/// A produced batch was stamped in its request frame's buffer instead of copied.
pub fn batch_in_place() {
    with(|m| m.batches_in_place.fetch_add(1, Relaxed));
}

pub fn backpressure_wait() {
    with(|m| m.backpressure_waits.fetch_add(1, Relaxed));
}

pub fn isr_changed(shrink: bool) {
    with(|m| {
        if shrink {
            m.isr_shrinks.fetch_add(1, Relaxed);
        } else {
            m.isr_expands.fetch_add(1, Relaxed);
        }
    });
}

pub fn connection_opened() {
    with(|m| m.connections.fetch_add(1, Relaxed));
}

pub fn connection_closed() {
    with(|m| m.connections.fetch_sub(1, Relaxed));
}

/// Records and bytes of a chunk of stored batches (walks their headers only).
pub fn count_batches(chunks: &[bytes::Bytes]) -> (u64, u64) {
    let (mut records, mut bytes) = (0u64, 0u64);
    for c in chunks {
        let mut at = 0;
        // Bounded: every step moves past one whole batch or stops.
        while let Some(h) = crate::storage::batch::Header::new(&c[at..]) {
            let Some(len) = h.total_bytes() else { break };
            if len == 0 || at + len > c.len() {
                break;
            }
            records += (h.last_offset() - h.base_offset() + 1).max(0) as u64;
            bytes += len as u64;
            at += len;
        }
    }
    (records, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_count_each_value_once() {
        let h = Histogram::new(&LATENCY_BUCKETS_S);
        h.observe(0.00005);
        h.observe(0.002);
        h.observe(100.0);
        let mut s = HistogramSum::default();
        h.add_to(&mut s);
        h.add_to(&mut s);
        assert_eq!(s.count, 6);
        assert_eq!(s.buckets[0], (0.0001, 2));
        assert_eq!(s.buckets[6], (0.002, 2));
        assert_eq!(s.buckets.last().unwrap(), &(f64::INFINITY, 2));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 6);
        assert!((s.sum - 2.0 * 100.00205).abs() < 1e-3);
    }

    #[test]
    fn outcomes_count_on_a_shard_only() {
        request_outcome(0, 0); // not a shard: ignored
        let m = BrokerMetrics::new(1, 2);
        install(m.clone(), 1);
        request_outcome(0, 0);
        request_outcome(0, 7);
        request_outcome(0, -1);
        request_outcome(0, 999);
        request_outcome(999, 0);
        let r = &m.shards[1].requests;
        assert_eq!(r[1].load(Relaxed), 1);
        assert_eq!(r[8].load(Relaxed), 1);
        assert_eq!(r[0].load(Relaxed), 1);
        assert_eq!(r[ERROR_SLOTS - 1].load(Relaxed), 1);
        assert_eq!(
            m.shards[0]
                .requests
                .iter()
                .map(|a| a.load(Relaxed))
                .sum::<u64>(),
            0
        );
    }
}
