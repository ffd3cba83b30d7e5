//! One shard: the state a core owns (its partitions, its batch cache, its flusher) and the
//! operations other shards ask of it over glommio's channel mesh.
//!
//! A shard's state lives in a thread-local `Rc<Shard>`; nothing here is shared between threads
//! except the immutable metadata image and the messages themselves. No `RefCell` borrow is held
//! across an `.await`: every borrow below ends in the statement that takes it or is dropped
//! before the next await.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use event_listener::Event;
use futures::channel::oneshot;
use futures::future::{select, Either};
use glommio::channels::channel_mesh::Senders;
use glommio::sync::Semaphore;

use crate::cluster::metadata::{self, Image};
use crate::config::Config;
use crate::kafka::errors::*;
use crate::metrics::Stage;
use crate::replication::ReplicaState;
use crate::storage::batch::{BatchInfo, Header};
use crate::storage::cache::{Evicted, PartitionCache, ShardCache};
use crate::storage::log::{self, blocking, now_ms, AppendError, PartitionLog, PendingLedger};

/// Unwritten bytes a shard holds before appends wait for the flusher (backpressure): a quarter
/// of its cache share, between these bounds. Unwritten batches are cached (they are the only
/// copy) and count against the cache's limit, so the cache evicts written batches to make room
/// for them and the two together stay within the share (`pending_limit_bytes`).
pub const PENDING_BYTES_MAX: u64 = 64 << 20;
pub const PENDING_BYTES_MIN: u64 = 8 << 20;

/// The unwritten-bytes limit of a shard whose cache share is `cache_share_bytes`.
pub fn pending_limit_bytes(cache_share_bytes: usize) -> u64 {
    (cache_share_bytes as u64 / 4).clamp(PENDING_BYTES_MIN, PENDING_BYTES_MAX)
}
/// The flusher writes at least this often when nothing asks for a sync.
const FLUSH_INTERVAL: Duration = Duration::from_millis(5);
/// fdatasync rounds of one shard in flight at once. The flusher writes the next batches while
/// earlier rounds sync, so a request that arrives during a sync does not wait for it to end
/// before its own bytes go to disk; past this many, the flusher waits for one to finish.
/// `WEIR_SYNCS_IN_FLIGHT` overrides it for benchmarks (0: the flusher waits for each sync, as
/// before overlapping).
const SYNCS_IN_FLIGHT_MAX: u64 = 4;

fn syncs_in_flight_max() -> u64 {
    std::env::var("WEIR_SYNCS_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(|n: u64| n.min(64))
        .unwrap_or(SYNCS_IN_FLIGHT_MAX)
}
/// A partition whose disk is full retries its pending writes this often.
const STALL_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Longest an acks=all produce waits for its in-sync replicas.
const REPLICATION_WAIT: Duration = Duration::from_secs(30);
/// Operations from one peer shard handled at once; further messages wait in the channel.
pub const PEER_OPS_MAX: u64 = 4096;

pub struct Partition {
    pub id: u64,
    pub topic: String,
    pub index: i32,
    pub topic_id: uuid::Uuid,
    pub log: RefCell<PartitionLog>,
    pub cache: RefCell<PartitionCache>,
    /// Serialises disk writes, syncs and rolls of this log.
    io_lock: Semaphore,
    /// Notified on every append (wakes long-polling fetches) and on deletion.
    pub appended: Event,
    in_dirty: Cell<bool>,
    in_unsynced: Cell<bool>,
    /// A write task of this partition waits for its I/O lock (`Shard::spawn_write`); it will
    /// take everything appended until it starts, so no second one is queued.
    write_queued: Cell<bool>,
    /// A producer waits for durability of what the queued write will take: it goes through
    /// the O_DSYNC descriptor.
    write_durable: Cell<bool>,
    /// An I/O error happened: the partition answers KAFKA_STORAGE_ERROR from now on.
    pub failed: Cell<bool>,
    /// The disk is full: appends are refused with KAFKA_STORAGE_ERROR, reads go on, and the
    /// flusher retries the pending writes every `STALL_RETRY_INTERVAL` until they succeed.
    pub stalled: Cell<bool>,
    pub deleted: Cell<bool>,
    /// Leader, followers, ISR and high watermark (`replication`).
    pub repl: RefCell<ReplicaState>,
    /// Batches appended and fetches served with data, for the shard's stats line.
    produced_batches: Cell<u64>,
    fetches_served: Cell<u64>,
    /// Counters and sampled gauges for the metrics endpoint (`metrics`).
    pub metrics: Arc<crate::metrics::PartitionMetrics>,
}

/// The last offset of the last whole batch in `chunks`.
fn last_offset_in(chunks: &[Bytes]) -> Option<i64> {
    let mut last = None;
    for c in chunks {
        let mut at = 0;
        // Bounded: each step passes one whole batch or stops.
        while let Some(h) = crate::storage::batch::Header::new(&c[at..]) {
            let Some(len) = h.total_bytes() else { break };
            if len == 0 || at + len > c.len() {
                break;
            }
            last = Some(h.last_offset());
            at += len;
        }
    }
    last
}

/// Counters of what a shard served, logged at shutdown and used by the ownership test.
#[derive(Default)]
pub struct Stats {
    pub remote_ops_in: u64,
    pub remote_ops_out: u64,
}

pub struct Shard {
    pub id: usize,
    pub count: usize,
    pub config: Arc<Config>,
    pub cluster_id: Arc<String>,
    image: RefCell<Arc<Image>>,
    /// topic -> partition index -> partition, so lookups by `&str` need no allocation.
    partitions: RefCell<HashMap<String, HashMap<i32, Rc<Partition>>>>,
    by_id: RefCell<HashMap<u64, Rc<Partition>>>,
    next_pid: Cell<u64>,
    cache: RefCell<ShardCache>,
    senders: Senders<ShardMsg>,
    /// The produce lane to each peer: appends handled in the order they were sent.
    produce_senders: Senders<ShardMsg>,
    dirty: RefCell<Vec<Rc<Partition>>>,
    unsynced: RefCell<Vec<Rc<Partition>>>,
    /// Bytes appended on this shard and not yet taken by a disk write (backpressure gate);
    /// kept by the logs themselves, always equal to the sum of their pending bytes.
    pending: Rc<PendingLedger>,
    /// Appends wait while the shard holds more unwritten bytes than this.
    pending_limit_bytes: u64,
    flush_wanted: Event,
    sync_requested: Cell<bool>,
    /// An acks=1 producer waits for a write: the flusher writes without lingering.
    write_requested: Cell<bool>,
    /// Partitions whose writes failed for lack of space, retried by the flusher.
    stalled: RefCell<Vec<Rc<Partition>>>,
    flushed: Event,
    /// Permits for fdatasync rounds in flight (`SYNCS_IN_FLIGHT_MAX`); none: syncs inline.
    sync_slots: Option<Rc<Semaphore>>,
    /// Serialises metadata changes (used on the controller, shard 0).
    pub control_lock: Semaphore,
    /// Bytes of request frames being read or handled on this shard (only bytes that arrived).
    pub request_memory: crate::net::RequestMemory,
    pub stats: RefCell<Stats>,
    pub shutting_down: Cell<bool>,
    pub stopped: Event,
    /// Controller only: the next producer id of the reserved block.
    pub producer_id_next: Cell<i64>,
    /// In a cluster: the end of the block the controller gave this broker.
    pub producer_id_end: Cell<i64>,
    /// This shard's share of the group coordinator.
    pub groups: crate::group::Coordinator,
    /// This shard's share of the transaction coordinator.
    pub txns: crate::txn::Coordinator,
}

thread_local! {
    static SHARD: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// This thread's shard. Panics outside a shard thread (a programming error).
pub fn shard() -> Rc<Shard> {
    SHARD.with(|s| s.borrow().clone().expect("called on a shard thread"))
}

/// Produce work for one partition, validated on the receiving shard.
pub struct ProduceItem {
    pub topic: String,
    pub partition: i32,
    pub records: Bytes,
    pub infos: Vec<BatchInfo>,
    /// `records` are all but a few bytes of their request frame, and the handler holds no
    /// other view of it: a lone large batch may be stamped in place (`PartitionLog::append_frame`).
    pub whole_frame: bool,
}

#[derive(Clone, Debug)]
pub struct ProduceResult {
    pub error: i16,
    pub base_offset: i64,
    pub log_append_time_ms: i64,
    pub log_start_offset: i64,
}

pub struct ProduceReply {
    pub results: Vec<ProduceResult>,
    /// For acks=all: resolves once every appended batch is fdatasynced (or with an error code).
    pub durable: Option<oneshot::Receiver<Result<(), i16>>>,
}

pub struct FetchItem {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub partition_max_bytes: usize,
    pub current_leader_epoch: i32,
    /// Who reads: a consumer (-1) sees up to the high watermark; a follower broker (its id)
    /// reads to the log end and reports its position; the broker itself (`INTERNAL_READ`,
    /// the group coordinator, timestamp lookups) reads to the log end.
    pub replica_id: i32,
    /// A follower's epoch of its last batch (Fetch v12), checked for divergence; -1: none.
    pub last_fetched_epoch: i32,
    /// A read_committed consumer: reads stop at the last stable offset, and the aborted
    /// transactions in range come back.
    pub read_committed: bool,
}

/// `FetchItem::replica_id` of the broker's own reads.
pub const INTERNAL_READ: i32 = -2;
pub const CONSUMER: i32 = -1;

#[derive(Clone, Debug, Default)]
pub struct FetchResult {
    pub error: i16,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    pub records: Vec<Bytes>,
    /// To a follower whose log diverged: (epoch, end offset) of the leader's log to truncate to.
    pub diverging: Option<(i32, i64)>,
    pub last_stable_offset: i64,
    /// For read_committed: aborted transactions overlapping what was read.
    pub aborted: Vec<crate::storage::txn::AbortedTxn>,
}

impl FetchResult {
    pub fn bytes(&self) -> usize {
        self.records.iter().map(|b| b.len()).sum()
    }
    fn error(e: i16) -> FetchResult {
        FetchResult {
            error: e,
            high_watermark: -1,
            log_start_offset: -1,
            records: Vec::new(),
            diverging: None,
            last_stable_offset: -1,
            aborted: Vec::new(),
        }
    }
}

pub struct ListOffsetItem {
    pub topic: String,
    pub partition: i32,
    pub timestamp: i64,
    pub current_leader_epoch: i32,
    /// isolation_level 1: "latest" is the last stable offset.
    pub read_committed: bool,
}

#[derive(Clone, Debug)]
pub struct ListOffsetResult {
    pub error: i16,
    pub timestamp: i64,
    pub offset: i64,
    pub leader_epoch: i32,
}

/// Requests the controller (shard 0) serves; in a cluster, forwarded to the active controller.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum ControlOp {
    CreateTopics(Vec<metadata::NewTopic>, bool),
    DeleteTopics(Vec<String>),
    CreatePartitions(Vec<(String, i32)>, bool),
    /// New complete override maps for topics (AlterConfigs and IncrementalAlterConfigs resolve
    /// their operations against the current image first), and validate_only.
    AlterTopicConfigs(Vec<(String, ConfigEdit)>, bool),
    /// Dynamic broker configs (KIP-226): (resource: "" for the cluster-wide default or a node
    /// id, edit), and validate_only. Answered `Ok((0, 0))` per resource.
    AlterBrokerConfigs(Vec<(String, ConfigEdit)>, bool),
    /// ElectLeaders: (topic, partition) list, preferred (true) or unclean election. Answered
    /// `Ok((partition, error code))` per partition, in order.
    ElectLeaders(Vec<(String, i32)>, bool),
    /// UnregisterBroker: removes a stopped broker that holds no replicas. Answered
    /// `Ok((0, error code))`.
    UnregisterBroker(i32),
    /// AlterPartitionReassignments: (topic, partition, target replicas or None to cancel).
    /// Answered `Ok((partition, error code))` per partition, in order.
    AlterReassignments(Vec<(String, i32, Option<Vec<i32>>)>),
    /// A partition leader's new ISR (Kafka's AlterPartition), based on the leader and
    /// partition epochs it saw. Answered `Ok((0, error code))`.
    AlterPartition {
        topic: String,
        partition: i32,
        leader: i32,
        leader_epoch: i32,
        partition_epoch: i32,
        isr: Vec<i32>,
    },
}

pub use crate::config::ConfigEdit;

pub type ControlReply = Vec<Result<(i32, i16), metadata::TopicError>>;

/// Messages between shards. One message carries all the work for its target shard from one
/// request: batched, one wake-up per request and shard, never one per record.
pub enum ShardMsg {
    Produce {
        acks: i16,
        items: Vec<ProduceItem>,
        /// Reply once the appends are stored (written, or fdatasynced and replicated for
        /// acks=all) instead of right after the appends: one cross-shard wake-up per request
        /// instead of two, for a sender that does not need the offsets sooner.
        reply_when_stored: bool,
        reply: oneshot::Sender<ProduceReply>,
    },
    Fetch {
        items: Vec<FetchItem>,
        max_bytes: usize,
        wait_until: Option<Instant>,
        reply: oneshot::Sender<Vec<FetchResult>>,
    },
    ListOffsets {
        items: Vec<ListOffsetItem>,
        reply: oneshot::Sender<Vec<ListOffsetResult>>,
    },
    Apply {
        image: Arc<Image>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Control {
        op: ControlOp,
        reply: oneshot::Sender<ControlReply>,
    },
    Stats {
        reply: oneshot::Sender<String>,
    },
    AllocateProducerId {
        reply: oneshot::Sender<Option<i64>>,
    },
    /// Any work for the target shard, as a closure (group coordination uses this: the
    /// request goes in, the response comes back through the closure's channel).
    Run {
        job: Job,
    },
}

pub type Job = Box<dyn FnOnce(Rc<Shard>) -> futures::future::LocalBoxFuture<'static, ()> + Send>;

impl Shard {
    pub fn install(
        id: usize,
        count: usize,
        config: Arc<Config>,
        cluster_id: Arc<String>,
        image: Arc<Image>,
        senders: Senders<ShardMsg>,
        produce_senders: Senders<ShardMsg>,
    ) -> Rc<Shard> {
        let request_memory = crate::net::RequestMemory::new(config.socket_request_bytes_max);
        // The stamped batches live in the cache and the unwritten queue: the arena maps at most
        // both limits and a few chunks for the partly filled and straggling ones.
        let cache_share_bytes = config.cache_bytes / count.max(1);
        let pending_limit = pending_limit_bytes(cache_share_bytes);
        crate::storage::arena::set_cap_bytes(
            cache_share_bytes + pending_limit as usize + 4 * crate::storage::arena::CHUNK_BYTES,
        );
        let s = Rc::new(Shard {
            id,
            count,
            // `--cache-bytes` is the broker's whole cache: each shard keeps its share.
            cache: RefCell::new(ShardCache::new(cache_share_bytes)),
            config,
            cluster_id,
            image: RefCell::new(image),
            partitions: RefCell::new(HashMap::new()),
            by_id: RefCell::new(HashMap::new()),
            next_pid: Cell::new(1),
            senders,
            produce_senders,
            dirty: RefCell::new(Vec::new()),
            unsynced: RefCell::new(Vec::new()),
            pending: Rc::new(PendingLedger::default()),
            pending_limit_bytes: pending_limit,
            flush_wanted: Event::new(),
            sync_requested: Cell::new(false),
            write_requested: Cell::new(false),
            stalled: RefCell::new(Vec::new()),
            flushed: Event::new(),
            sync_slots: match syncs_in_flight_max() {
                0 => None,
                n => Some(Rc::new(Semaphore::new(n))),
            },
            control_lock: Semaphore::new(1),
            request_memory,
            stats: RefCell::new(Stats::default()),
            shutting_down: Cell::new(false),
            stopped: Event::new(),
            producer_id_next: Cell::new(i64::MAX),
            producer_id_end: Cell::new(0),
            groups: crate::group::Coordinator::default(),
            txns: crate::txn::Coordinator::default(),
        });
        SHARD.with(|cell| *cell.borrow_mut() = Some(s.clone()));
        s
    }

    pub fn image(&self) -> Arc<Image> {
        self.image.borrow().clone()
    }

    pub fn set_image(&self, image: Arc<Image>) {
        *self.image.borrow_mut() = image;
    }

    /// The partition this shard owns, looked up without allocating.
    pub fn partition(&self, topic: &str, index: i32) -> Option<Rc<Partition>> {
        self.partitions.borrow().get(topic)?.get(&index).cloned()
    }

    pub fn partition_count(&self) -> usize {
        self.by_id.borrow().len()
    }

    pub fn all_partitions(&self) -> Vec<Rc<Partition>> {
        self.by_id.borrow().values().cloned().collect()
    }

    /// Sends `msg` to shard `target` (handled in place when it is this shard).
    /// Sends a `ShardMsg::Produce` to a peer shard on the produce lane, where appends are
    /// handled one at a time in the order sent (so the sender need not wait for them).
    pub async fn send_produce(self: &Rc<Self>, target: usize, msg: ShardMsg) {
        debug_assert!(target != self.id && matches!(msg, ShardMsg::Produce { .. }));
        self.stats.borrow_mut().remote_ops_out += 1;
        if let Err(e) = self.produce_senders.send_to(target, msg).await {
            tracing::debug!(target, "cross-shard produce send failed: {e}");
        }
    }

    pub async fn send(self: &Rc<Self>, target: usize, msg: ShardMsg) {
        if target == self.id {
            glommio::spawn_local(handle_msg_guarded(msg)).detach();
            return;
        }
        self.stats.borrow_mut().remote_ops_out += 1;
        if let Err(e) = self.senders.send_to(target, msg).await {
            // The peer is gone (shutdown): dropping the message cancels its reply.
            tracing::debug!(target, "cross-shard send failed: {e}");
        }
    }

    // ---- applying metadata ----

    /// Makes this shard's open partitions match `image`: opens the ones it now owns, closes
    /// and deletes the ones whose topic is gone.
    pub async fn apply_image(self: &Rc<Self>, image: Arc<Image>, clean: bool) -> Result<()> {
        *self.image.borrow_mut() = image.clone();
        let stale: Vec<Rc<Partition>> = self
            .by_id
            .borrow()
            .values()
            .filter(|p| {
                image.topics.get(&p.topic).is_none_or(|t| {
                    t.id != p.topic_id
                        || t.partitions
                            .get(p.index as usize)
                            .is_none_or(|pm| !pm.hosted_on(self.config.node_id))
                })
            })
            .cloned()
            .collect();
        for p in stale {
            if let Some(t) = self.partitions.borrow_mut().get_mut(&p.topic) {
                t.remove(&p.index);
            }
            self.by_id.borrow_mut().remove(&p.id);
            p.deleted.set(true);
            // Released before any await, so the ledger matches the partitions still listed.
            p.log.borrow_mut().discard_pending();
            p.appended.notify(usize::MAX);
            let _permit = p.io_lock.acquire_permit(1).await;
            let dir = p.log.borrow().dir.clone();
            blocking(move || std::fs::remove_dir_all(&dir))
                .await
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
            tracing::info!(topic = %p.topic, partition = p.index, shard = self.id, "deleted partition");
        }
        // Config and leader epoch changes reach the logs already open: a new leader epoch
        // stamps the batches appended from now on, and fetches and ListOffsets check it.
        for p in self.all_partitions() {
            let cfg = image.log_config(&self.config.log, &p.topic);
            let epoch = image
                .topics
                .get(&p.topic)
                .and_then(|t| t.partitions.get(p.index as usize))
                .map(|pm| pm.leader_epoch);
            let mut l = p.log.borrow_mut();
            if l.config != cfg {
                l.config = cfg;
            }
            if let Some(e) = epoch.filter(|&e| e > l.leader_epoch) {
                l.leader_epoch = e;
            }
        }
        let mut coordinators_moved = self.update_replication(&image);
        // Checkpointed high watermarks, read when the first partition opens.
        let mut hws: Option<HashMap<(String, i32), i64>> = None;
        for (name, t) in &image.topics {
            for (i, pm) in t.partitions.iter().enumerate() {
                if pm.shard as usize != self.id
                    || !pm.hosted_on(self.config.node_id)
                    || self.partition(name, i as i32).is_some()
                {
                    continue;
                }
                let dir = metadata::partition_dir(&self.config.data_dir, name, i as i32);
                let cfg = image.log_config(&self.config.log, name);
                let log =
                    PartitionLog::open(dir, cfg, pm.leader_epoch, clean, self.pending.clone())
                        .await?;
                // A replica's HW starts at its checkpoint (at most its log end), else at its
                // log start: what it holds above was maybe never committed; the leader's
                // fetches (or its followers', when it leads) move it on.
                if hws.is_none() && self.config.in_cluster() {
                    let d = self.config.data_dir.clone();
                    hws =
                        Some(blocking(move || crate::replication::checkpoint::load_all(&d)).await);
                }
                let start = hws
                    .as_ref()
                    .and_then(|h| h.get(&(name.clone(), i as i32)))
                    .map(|&hw| hw.clamp(log.log_start_offset, log.log_end_offset))
                    .unwrap_or(log.log_start_offset);
                let id = self.next_pid.get();
                self.next_pid.set(id + 1);
                let p = Rc::new(Partition {
                    id,
                    topic: name.clone(),
                    index: i as i32,
                    topic_id: t.id,
                    log: RefCell::new(log),
                    cache: RefCell::new(PartitionCache::default()),
                    io_lock: Semaphore::new(1),
                    appended: Event::new(),
                    in_dirty: Cell::new(false),
                    in_unsynced: Cell::new(false),
                    write_queued: Cell::new(false),
                    write_durable: Cell::new(false),
                    failed: Cell::new(false),
                    stalled: Cell::new(false),
                    deleted: Cell::new(false),
                    repl: RefCell::new(ReplicaState::new(self.config.node_id, start)),
                    produced_batches: Cell::new(0),
                    fetches_served: Cell::new(0),
                    metrics: crate::metrics::PartitionMetrics::new(name, i as i32),
                });
                self.by_id.borrow_mut().insert(id, p.clone());
                self.partitions
                    .borrow_mut()
                    .entry(name.clone())
                    .or_default()
                    .insert(i as i32, p);
            }
        }
        coordinators_moved.extend(self.update_replication(&image));
        // The coordinators follow leadership of __consumer_offsets and __transaction_state: a
        // partition this broker stops leading leaves memory; one it starts leading is replayed
        // from its log (its groups and transactional ids answer COORDINATOR_LOAD_IN_PROGRESS
        // until then).
        let (txn_moved, offsets_moved): (Vec<_>, Vec<_>) = coordinators_moved
            .into_iter()
            .partition(|(topic, _, _)| topic == crate::txn::TXN_TOPIC);
        let mut txn_opened = Vec::new();
        for (_, partition, leads) in txn_moved {
            crate::txn::unload_partition(self, partition);
            if leads {
                txn_opened.push(partition);
            }
        }
        if !txn_opened.is_empty() {
            self.txns
                .loading
                .borrow_mut()
                .extend(txn_opened.iter().copied());
            let loader = self.clone();
            glommio::spawn_local(async move {
                for p in txn_opened {
                    crate::txn::load_partition(&loader, p).await;
                }
            })
            .detach();
        }
        let mut offsets_opened = Vec::new();
        let count = image
            .topics
            .get(crate::group::OFFSETS_TOPIC)
            .map(|t| t.partitions.len() as i32)
            .unwrap_or(1);
        for (_, partition, leads) in offsets_moved {
            self.groups
                .groups
                .borrow_mut()
                .retain(|g, _| crate::group::records::partition_for(g, count) != partition);
            if leads {
                offsets_opened.push(partition);
            }
        }
        if !offsets_opened.is_empty() {
            self.groups
                .loading
                .borrow_mut()
                .extend(offsets_opened.iter().copied());
            let loader = self.clone();
            glommio::spawn_local(async move {
                for p in offsets_opened {
                    crate::group::load_partition(&loader, p).await;
                }
            })
            .detach();
        }
        Ok(())
    }

    /// Gives every open partition its leader, ISR and epochs from `image`; wakes whoever waits
    /// on a partition whose leadership changed (acks=all producers fail over, fetches answer).
    /// Returns the coordinators' partitions (`__consumer_offsets`, `__transaction_state`)
    /// whose leadership here began (true) or ended (false).
    fn update_replication(&self, image: &Image) -> Vec<(String, i32, bool)> {
        let now = now_ms();
        let mut offsets_moved = Vec::new();
        for p in self.all_partitions() {
            let Some(pm) = image
                .topics
                .get(&p.topic)
                .and_then(|t| t.partitions.get(p.index as usize))
            else {
                continue;
            };
            let leo = p.log.borrow().log_end_offset;
            let (changed, led, leads) = {
                let mut r = p.repl.borrow_mut();
                let before = (r.leader, r.leader_epoch, r.isr.clone());
                let led = r.is_leader();
                r.update(pm, now);
                r.advance_high_watermark(leo);
                (
                    before != (r.leader, r.leader_epoch, r.isr.clone()),
                    led,
                    r.is_leader(),
                )
            };
            if changed {
                p.appended.notify(usize::MAX);
            }
            if led != leads
                && (p.topic == crate::group::OFFSETS_TOPIC || p.topic == crate::txn::TXN_TOPIC)
            {
                offsets_moved.push((p.topic.clone(), p.index, leads));
            }
        }
        offsets_moved
    }

    // ---- metrics ----

    /// Copies what scrapes read from this shard's own state (offsets, sizes, cache and pending
    /// bytes, groups; on shard 0 the cluster's state) into `metrics` every
    /// `metrics::SAMPLE_INTERVAL`, so a scrape never touches the shard.
    pub async fn metrics_sampler(self: Rc<Self>) {
        use std::sync::atomic::Ordering::Relaxed;
        // Bounded: one pass per interval over this shard's partitions and groups.
        while !self.shutting_down.get() {
            let Some(broker) = crate::metrics::broker() else {
                return;
            };
            let m = &broker.shards[self.id];
            let parts: Vec<Arc<crate::metrics::PartitionMetrics>> = self
                .by_id
                .borrow()
                .values()
                .map(|p| {
                    let (leo, start, size) = {
                        let l = p.log.borrow();
                        (l.log_end_offset, l.log_start_offset, l.size_bytes())
                    };
                    let r = p.repl.borrow();
                    let pm = &p.metrics;
                    pm.log_end_offset.store(leo, Relaxed);
                    pm.high_watermark.store(r.high_watermark.min(leo), Relaxed);
                    pm.log_start_offset.store(start, Relaxed);
                    pm.size_bytes.store(size, Relaxed);
                    pm.leader.store(r.is_leader(), Relaxed);
                    pm.under_replicated
                        .store(r.is_leader() && r.isr.len() < r.replicas.len(), Relaxed);
                    pm.clone()
                })
                .collect();
            *m.partitions.lock().unwrap_or_else(|e| e.into_inner()) = parts;
            m.cache_bytes
                .store(self.cache.borrow().bytes as u64, Relaxed);
            m.pending_bytes.store(self.pending.get(), Relaxed);
            m.arena_bytes
                .store(crate::storage::arena::mapped_bytes() as u64, Relaxed);
            let groups: Vec<crate::metrics::GroupSample> = self
                .groups
                .groups
                .borrow()
                .values()
                .map(|g| crate::metrics::GroupSample {
                    group: g.id.clone(),
                    state: g
                        .consumer
                        .as_ref()
                        .map_or(g.state.name(), |c| c.state_name()),
                    members: g
                        .consumer
                        .as_ref()
                        .map_or(g.members.len(), |c| c.members.len()),
                    offsets: g
                        .offsets
                        .iter()
                        .map(|((t, p), v)| (t.clone(), *p, v.offset))
                        .collect(),
                })
                .collect();
            *m.groups.lock().unwrap_or_else(|e| e.into_inner()) = groups;
            if self.id == 0 {
                let image = self.image();
                let c = &broker.cluster;
                c.brokers.store(image.brokers.len() as i64, Relaxed);
                c.fenced_brokers.store(
                    image.brokers.values().filter(|b| b.fenced).count() as i64,
                    Relaxed,
                );
                let offline = image
                    .topics
                    .values()
                    .flat_map(|t| t.partitions.iter())
                    .filter(|p| p.leader < 0)
                    .count();
                c.offline_partitions.store(offline as i64, Relaxed);
                c.metadata_version.store(image.version as i64, Relaxed);
                c.active_controller.store(
                    !self.config.in_cluster() || image.controller_id == self.config.node_id,
                    Relaxed,
                );
            }
            drop(broker);
            glommio::timer::sleep(crate::metrics::SAMPLE_INTERVAL).await;
        }
    }

    // ---- produce ----

    async fn wait_for_room(&self) {
        let limit = self.pending_limit_bytes;
        if self.pending.get() > limit {
            crate::metrics::backpressure_wait();
        }
        while self.pending.get() > limit {
            let l = self.flushed.listen();
            if self.pending.get() <= limit {
                break;
            }
            self.flush_wanted.notify(1);
            l.await;
        }
    }

    /// Appends to a partition this shard owns (the group coordinator's writes).
    pub async fn append_local(
        self: &Rc<Self>,
        p: &Rc<Partition>,
        item: &mut ProduceItem,
    ) -> Result<(i64, i64), i16> {
        self.append(p, item).await
    }

    /// Waits until `p` is fdatasynced up to `end`, here and on every in-sync replica.
    pub async fn wait_durable_one(&self, p: &Rc<Partition>, end: i64) -> Result<(), i16> {
        let waits = [(p.clone(), end)];
        self.wait_stored(&waits, true).await?;
        self.wait_replicated(&waits).await
    }

    // ---- follower side (driven by `replication::fetcher`) ----

    /// Appends batches copied from the leader to a follower replica, as they are; they were
    /// fetched from offset `from` (a compacted leader log may skip offsets after it). Returns
    /// the new log end.
    pub async fn append_replica(
        self: &Rc<Self>,
        p: &Rc<Partition>,
        from: i64,
        batches: &[crate::storage::batch::ReplicaBatch],
    ) -> Result<i64, i16> {
        self.wait_for_room().await;
        // Bounded: a roll makes room for the batches (or fails the partition).
        loop {
            appendable(p)?;
            if p.log.borrow().log_end_offset != from
                || batches.first().is_some_and(|b| b.base < from)
            {
                // The log moved meanwhile (a truncation): the next fetch starts over.
                return Err(OFFSET_OUT_OF_RANGE);
            }
            let r = p.log.borrow_mut().append_replica(batches);
            match r {
                Ok(()) => break,
                Err(AppendError::Refused(code)) => return Err(code),
                Err(AppendError::NeedsRoll) => {
                    let incoming: u64 = batches.iter().map(|b| b.bytes.len() as u64).sum();
                    if !self.roll_for(p, incoming).await {
                        return Err(KAFKA_STORAGE_ERROR);
                    }
                }
            }
        }
        self.appended(p, batches.iter().map(|b| (b.base, b.last, b.bytes.clone())));
        Ok(p.log.borrow().log_end_offset)
    }

    /// Truncates a follower replica's log to end before `offset` (its log diverged from the
    /// leader's), dropping its cached batches.
    pub async fn truncate_replica(&self, p: &Rc<Partition>, offset: i64) -> Result<(), i16> {
        self.rewrite_replica(p, offset, false).await
    }

    /// Empties a follower replica whose log ends below its leader's log start and restarts it
    /// at that offset.
    pub async fn reset_replica(&self, p: &Rc<Partition>, offset: i64) -> Result<(), i16> {
        self.rewrite_replica(p, offset, true).await
    }

    async fn rewrite_replica(
        &self,
        p: &Rc<Partition>,
        offset: i64,
        reset: bool,
    ) -> Result<(), i16> {
        let _permit = p.io_lock.acquire_permit(1).await;
        if p.deleted.get() {
            return Err(UNKNOWN_TOPIC_OR_PARTITION);
        }
        let before = p.log.borrow().log_end_offset;
        let r = if reset {
            PartitionLog::reset_to(&p.log, offset).await
        } else {
            PartitionLog::truncate_to(&p.log, offset).await
        };
        self.check_pending_ledger();
        self.cache
            .borrow_mut()
            .forget(p.id, &mut p.cache.borrow_mut());
        if let Err(e) = r {
            self.on_write_error(p, e, if reset { "reset" } else { "truncation" });
            return Err(KAFKA_STORAGE_ERROR);
        }
        let after = p.log.borrow().log_end_offset;
        {
            let mut rs = p.repl.borrow_mut();
            rs.high_watermark = if reset {
                after
            } else {
                rs.high_watermark.min(after)
            };
        }
        if reset {
            tracing::warn!(topic = %p.topic, partition = p.index, offset, "replica restarted at the leader's log start");
        } else {
            tracing::warn!(topic = %p.topic, partition = p.index, from = before, to = after, "truncated a diverged replica");
        }
        p.appended.notify(usize::MAX);
        Ok(())
    }

    /// Waits until every (partition, end) is fdatasynced on this broker.
    pub async fn wait_synced(&self, waits: &[(Rc<Partition>, i64)]) -> Result<(), i16> {
        self.wait_stored(waits, true).await
    }

    /// acks=all: waits until the high watermark of every (partition, end offset) reaches the end,
    /// i.e. every ISR replica has the batches (followers fetch only past what they fdatasynced).
    /// Fails when this replica stops leading (NOT_LEADER_OR_FOLLOWER), when the ISR shrinks
    /// below `min.insync.replicas` first (NOT_ENOUGH_REPLICAS_AFTER_APPEND), or after
    /// `REPLICATION_WAIT` (REQUEST_TIMED_OUT).
    async fn wait_replicated(&self, waits: &[(Rc<Partition>, i64)]) -> Result<(), i16> {
        let epochs: Vec<i32> = waits
            .iter()
            .map(|(p, _)| p.repl.borrow().leader_epoch)
            .collect();
        let deadline = Instant::now() + REPLICATION_WAIT;
        for ((p, end), epoch) in waits.iter().zip(epochs) {
            // Bounded by the deadline; every wake-up re-checks.
            loop {
                let l = p.appended.listen();
                if p.deleted.get() {
                    return Err(UNKNOWN_TOPIC_OR_PARTITION);
                }
                {
                    let r = p.repl.borrow();
                    if !r.is_leader() || r.leader_epoch != epoch {
                        return Err(NOT_LEADER_OR_FOLLOWER);
                    }
                    if r.high_watermark >= *end {
                        break;
                    }
                    if r.isr.len() < min_insync(p) {
                        return Err(NOT_ENOUGH_REPLICAS_AFTER_APPEND);
                    }
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || self.shutting_down.get() {
                    return Err(REQUEST_TIMED_OUT);
                }
                let _ = select(
                    l,
                    Box::pin(glommio::timer::sleep(left.min(Duration::from_millis(500)))),
                )
                .await;
            }
        }
        Ok(())
    }

    /// Appends `recs` (key, value; None: tombstone) as one batch to this shard's partition
    /// `topic`/`partition` and waits until it is durable and replicated (the coordinators'
    /// writes). `txn`: the producer (id, epoch) of a transactional batch written on its behalf
    /// (no sequence: a coordinator's write is not checked against the producer's sequences).
    pub async fn persist_records(
        self: &Rc<Self>,
        topic: &str,
        partition: i32,
        recs: Vec<(Bytes, Option<Bytes>)>,
        txn: Option<(i64, i16)>,
    ) -> Result<(), i16> {
        use kafka_protocol::records::{
            Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
        };
        if recs.is_empty() {
            return Ok(());
        }
        let Some(p) = self.partition(topic, partition) else {
            return Err(NOT_COORDINATOR);
        };
        let now = now_ms();
        let (pid, epoch) = txn.unwrap_or((-1, -1));
        let records: Vec<Record> = recs
            .into_iter()
            .enumerate()
            .map(|(i, (k, v))| Record {
                transactional: txn.is_some(),
                control: false,
                partition_leader_epoch: 0,
                producer_id: pid,
                producer_epoch: epoch,
                timestamp_type: TimestampType::Creation,
                delete_horizon: false,
                offset: i as i64,
                // Base sequence -1 (none); the encoder keeps one batch while offset minus
                // sequence stays constant.
                sequence: i as i32 - 1,
                timestamp: now,
                key: Some(k),
                value: v,
                headers: Default::default(),
            })
            .collect();
        let mut buf = bytes::BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )
        .map_err(|_| UNKNOWN_SERVER_ERROR)?;
        let buf = buf.freeze();
        let infos =
            crate::storage::batch::validate_produce(&buf, crate::config::MESSAGE_BYTES_CEILING)
                .map_err(|_| UNKNOWN_SERVER_ERROR)?;
        let mut item = ProduceItem {
            topic: topic.to_string(),
            partition,
            records: buf,
            infos,
            whole_frame: false,
        };
        self.append(&p, &mut item).await?;
        let end = p.log.borrow().log_end_offset;
        self.wait_durable_one(&p, end).await
    }

    /// Writes a transaction marker (COMMIT or ABORT control batch) for producer `pid` to
    /// partition `p`, which this broker leads, and waits until it is durable and replicated.
    /// On `__consumer_offsets` the producer's pending transactional offset commits become
    /// visible (commit) or are dropped (abort).
    pub async fn append_marker(
        self: &Rc<Self>,
        p: &Rc<Partition>,
        pid: i64,
        epoch: i16,
        coordinator_epoch: i32,
        commit: bool,
    ) -> Result<(), i16> {
        use crate::storage::txn::{marker_batch, Marker};
        if !p.repl.borrow().is_leader() {
            return Err(NOT_LEADER_OR_FOLLOWER);
        }
        let marker = if commit {
            Marker::Commit
        } else {
            Marker::Abort
        };
        let b = marker_batch(pid, epoch, coordinator_epoch, marker, now_ms());
        let info = crate::storage::batch::BatchInfo {
            start: 0,
            bytes: b.len(),
            offset_count: 1,
            max_timestamp: now_ms(),
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: -1,
            transactional: true,
        };
        let mut item = ProduceItem {
            topic: p.topic.clone(),
            partition: p.index,
            records: b,
            infos: vec![info],
            whole_frame: false,
        };
        self.append(p, &mut item).await?;
        if p.topic == crate::group::OFFSETS_TOPIC {
            crate::group::complete_txn_offsets(self, p.index, pid, commit);
        }
        let end = p.log.borrow().log_end_offset;
        self.wait_durable_one(p, end).await
    }

    /// Replays partition `p` of this shard from its log start to its current end, calling `f`
    /// with every record once, in offset order (the coordinators' load). Returns the records
    /// seen; stops early (logged) on a read error.
    pub async fn replay_records(
        &self,
        p: &Rc<Partition>,
        mut f: impl FnMut(kafka_protocol::records::Record),
    ) -> usize {
        use kafka_protocol::records::RecordBatchDecoder;
        let (mut offset, end) = {
            let l = p.log.borrow();
            (l.log_start_offset, l.log_end_offset)
        };
        let mut seen = 0usize;
        // Bounded by the end: every round moves `offset` past at least one record, or stops.
        while offset < end {
            let item = FetchItem {
                topic: String::new(),
                partition: p.index,
                offset,
                partition_max_bytes: 1 << 20,
                current_leader_epoch: -1,
                replica_id: INTERNAL_READ,
                last_fetched_epoch: -1,
                read_committed: false,
            };
            let r = self
                .read_partition(p, &item, item.partition_max_bytes)
                .await;
            if r.error != NONE || r.records.is_empty() {
                tracing::error!(topic = %p.topic, partition = p.index, offset, error = r.error, "replay stopped early");
                break;
            }
            let before = offset;
            for mut b in r.records {
                // Every iteration consumes one batch from `b`.
                while b.len() >= crate::storage::batch::HEADER_BYTES {
                    let Ok(set) = RecordBatchDecoder::decode(&mut b) else {
                        break;
                    };
                    for rec in set.records {
                        if rec.offset < offset {
                            continue;
                        }
                        offset = rec.offset + 1;
                        seen += 1;
                        f(rec);
                    }
                }
            }
            if offset == before {
                break;
            }
        }
        seen
    }

    /// Runs `f` on shard `target` and returns its result (None if that shard is gone).
    pub async fn run_on<R: Send + 'static>(
        self: &Rc<Self>,
        target: usize,
        f: impl FnOnce(Rc<Shard>) -> futures::future::LocalBoxFuture<'static, R> + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |s: Rc<Shard>| {
            Box::pin(async move {
                let r = f(s).await;
                let _ = tx.send(r);
            })
        });
        self.send(target, ShardMsg::Run { job }).await;
        rx.await.ok()
    }

    /// Appends one partition's validated batches; returns (base offset, log append time).
    async fn append(
        self: &Rc<Self>,
        p: &Rc<Partition>,
        item: &mut ProduceItem,
    ) -> Result<(i64, i64), i16> {
        self.wait_for_room().await;
        loop {
            appendable(p)?;
            let now = now_ms();
            let r = p.log.borrow_mut().append_frame(
                &mut item.records,
                &item.infos,
                now,
                item.whole_frame,
            );
            match r {
                Ok(a) if a.duplicate => {
                    tracing::debug!(topic = %p.topic, partition = p.index, offset = a.base_offset, "duplicate batch from an idempotent producer");
                    return Ok((a.base_offset, -1));
                }
                Ok(a) => {
                    let append_time = if p.log.borrow().config.log_append_time {
                        now
                    } else {
                        -1
                    };
                    if a.in_place {
                        crate::metrics::batch_in_place();
                    }
                    let leo = a.last_offset + 1;
                    p.repl.borrow_mut().advance_high_watermark(leo);
                    self.appended(p, a.batches.into_iter());
                    return Ok((a.base_offset, append_time));
                }
                Err(AppendError::Refused(code)) => return Err(code),
                Err(AppendError::NeedsRoll) => {
                    let incoming: u64 = item.infos.iter().map(|i| i.bytes as u64).sum();
                    // A failed roll marks the partition failed: the loop then answers.
                    self.roll_for(p, incoming).await;
                }
            }
        }
    }

    /// Rolls `p`'s active segment so `incoming` more bytes fit, unless another task did
    /// meanwhile. False when the roll failed (the partition is marked failed).
    async fn roll_for(&self, p: &Rc<Partition>, incoming: u64) -> bool {
        let _permit = p.io_lock.acquire_permit(1).await;
        // A partition that failed while this waited for the lock is not rolled (its unwritten
        // batches were discarded): the caller's append sees it offline.
        if p.deleted.get() || p.failed.get() || !p.log.borrow().needs_roll(incoming, now_ms()) {
            return true;
        }
        let r = PartitionLog::roll(&p.log).await;
        self.check_pending_ledger();
        self.admit_written(p);
        match r {
            Ok(()) => true,
            Err(e) => {
                self.on_write_error(p, e, "segment roll");
                false
            }
        }
    }

    /// Batches just appended to `p` (base, last offset, bytes): cached, queued for the
    /// flusher, counted, and announced to waiting fetches.
    fn appended(&self, p: &Rc<Partition>, batches: impl Iterator<Item = (i64, i64, Bytes)>) {
        let (mut n, mut records, mut size) = (0u64, 0u64, 0u64);
        {
            let mut cache = self.cache.borrow_mut();
            let mut pc = p.cache.borrow_mut();
            for (base, last, bytes) in batches {
                records += (last - base + 1) as u64;
                size += bytes.len() as u64;
                cache.insert(&mut pc, base, last, bytes);
                n += 1;
            }
        }
        p.metrics.produced(records, size);
        // The new batches count against the cache's limit while unwritten: make room.
        self.evict();
        self.mark_dirty(p);
        p.produced_batches.set(p.produced_batches.get() + n);
        p.appended.notify(usize::MAX);
    }

    fn mark_dirty(&self, p: &Rc<Partition>) {
        if !p.in_dirty.replace(true) {
            self.dirty.borrow_mut().push(p.clone());
        }
        self.flush_wanted.notify(1);
    }

    /// Moves `p`'s newly written batches into the eviction queue and evicts down to the limit.
    fn admit_written(&self, p: &Rc<Partition>) {
        let written = p.log.borrow().written_offset;
        self.cache
            .borrow_mut()
            .admit_written(p.id, &mut p.cache.borrow_mut(), written);
        self.evict();
    }

    /// Evicts written batches while they and the shard's unwritten ones exceed the cache share.
    fn evict(&self) {
        let by_id = self.by_id.borrow();
        let unwritten = self.pending.get() as usize;
        self.cache
            .borrow_mut()
            .evict(unwritten, |pid, base| match by_id.get(&pid) {
                None => Evicted::Gone,
                Some(p) => {
                    let popped = p.cache.borrow_mut().pop_front_if(base);
                    debug_assert!(popped, "the oldest queued batch is its partition's front");
                    Evicted::Dropped
                }
            });
    }

    async fn produce(
        self: Rc<Self>,
        acks: i16,
        items: Vec<ProduceItem>,
        reply_when_stored: bool,
        reply: oneshot::Sender<ProduceReply>,
    ) {
        let mut results = Vec::with_capacity(items.len());
        let mut waits = Vec::new();
        for mut item in items {
            let Some(p) = self.partition(&item.topic, item.partition) else {
                results.push(ProduceResult {
                    error: NOT_LEADER_OR_FOLLOWER,
                    base_offset: -1,
                    log_append_time_ms: -1,
                    log_start_offset: -1,
                });
                continue;
            };
            let refused = {
                let r = p.repl.borrow();
                if !r.is_leader() {
                    Some(NOT_LEADER_OR_FOLLOWER)
                } else if acks == -1 && r.isr.len() < min_insync(&p) {
                    Some(NOT_ENOUGH_REPLICAS)
                } else {
                    None
                }
            };
            if let Some(error) = refused {
                results.push(ProduceResult {
                    error,
                    base_offset: -1,
                    log_append_time_ms: -1,
                    log_start_offset: -1,
                });
                continue;
            }
            match self.append(&p, &mut item).await {
                Ok((base, append_time)) => {
                    let (start, end) = {
                        let l = p.log.borrow();
                        (l.log_start_offset, l.log_end_offset)
                    };
                    results.push(ProduceResult {
                        error: NONE,
                        base_offset: base,
                        log_append_time_ms: append_time,
                        log_start_offset: start,
                    });
                    waits.push((p.clone(), end));
                }
                Err(e) => results.push(ProduceResult {
                    error: e,
                    base_offset: -1,
                    log_append_time_ms: -1,
                    log_start_offset: -1,
                }),
            }
        }
        // acks=all waits for the fdatasync, acks=1 for the write (so a batch that a full disk
        // cannot take is answered with an error, never acknowledged and then lost).
        if acks == 0 || waits.is_empty() {
            let _ = reply.send(ProduceReply {
                results,
                durable: None,
            });
            return;
        }
        let me = self.clone();
        let sync = acks == -1;
        let stored = async move {
            let started = Instant::now();
            let mut r = me.wait_stored(&waits, sync).await;
            crate::metrics::produce_stage(Stage::StoredWait, started.elapsed());
            if r.is_ok() && sync {
                let started = Instant::now();
                r = me.wait_replicated(&waits).await;
                crate::metrics::produce_stage(Stage::ReplicationWait, started.elapsed());
            }
            r
        };
        if reply_when_stored {
            glommio::spawn_local(async move {
                if let Err(code) = stored.await {
                    for r in &mut results {
                        r.error = code;
                        r.base_offset = -1;
                    }
                }
                let _ = reply.send(ProduceReply {
                    results,
                    durable: None,
                });
            })
            .detach();
            return;
        }
        let (tx, rx) = oneshot::channel();
        glommio::spawn_local(async move {
            let _ = tx.send(stored.await);
        })
        .detach();
        let _ = reply.send(ProduceReply {
            results,
            durable: Some(rx),
        });
    }

    /// Group commit: waits until every (partition, end offset) is written to disk, and with
    /// `sync` also fdatasynced. All requests waiting on this shard share the flusher's next
    /// round. A partition that fails or stalls (disk full) answers KAFKA_STORAGE_ERROR at once.
    async fn wait_stored(&self, waits: &[(Rc<Partition>, i64)], sync: bool) -> Result<(), i16> {
        // Bounded: every partition write and every sync round notifies `flushed`, and each
        // either stores the waited-for bytes or marks their partition failed or stalled; a
        // waiter still short of its offset asks for another write or sync.
        loop {
            let l = self.flushed.listen();
            let mut all = true;
            for (p, end) in waits {
                if p.deleted.get() {
                    return Err(UNKNOWN_TOPIC_OR_PARTITION);
                }
                let l = p.log.borrow();
                let stored = if sync {
                    l.durable_offset
                } else {
                    l.written_offset
                };
                if stored >= *end {
                    continue;
                }
                if p.failed.get() || p.stalled.get() {
                    return Err(KAFKA_STORAGE_ERROR);
                }
                all = false;
            }
            if all {
                return Ok(());
            }
            if sync {
                self.sync_requested.set(true);
            } else {
                self.write_requested.set(true);
            }
            self.flush_wanted.notify(1);
            l.await;
        }
    }

    // ---- the flusher ----

    /// Writes pending batches and, when a producer waits for durability, fdatasyncs. One round
    /// covers every dirty partition of the shard; requests that arrive during a round share the
    /// next one.
    pub async fn flusher(self: Rc<Self>) {
        // When the partitions stalled on a full disk are next retried: every
        // `STALL_RETRY_INTERVAL`, also while other partitions keep the flusher busy.
        let mut next_retry: Option<Instant> = None;
        loop {
            if self.stalled.borrow().is_empty() {
                next_retry = None;
            } else {
                let due = *next_retry.get_or_insert_with(|| Instant::now() + STALL_RETRY_INTERVAL);
                if Instant::now() >= due {
                    next_retry = None;
                    self.retry_stalled().await;
                }
            }
            while self.dirty.borrow().is_empty() && !self.sync_requested.get() {
                let l = self.flush_wanted.listen();
                if !self.dirty.borrow().is_empty() || self.sync_requested.get() {
                    break;
                }
                if self.shutting_down.get() && self.by_id.borrow().is_empty() {
                    return;
                }
                if self.stalled.borrow().is_empty() {
                    l.await;
                } else {
                    let due =
                        *next_retry.get_or_insert_with(|| Instant::now() + STALL_RETRY_INTERVAL);
                    let retry =
                        glommio::timer::sleep(due.saturating_duration_since(Instant::now()));
                    if let Either::Right(_) = select(l, Box::pin(retry)).await {
                        next_retry = None;
                        self.retry_stalled().await;
                    }
                }
            }
            let waited_on = self.sync_requested.get() || self.write_requested.get();
            if !waited_on
                && self.pending.get() < log::WRITE_CHUNK_BYTES as u64
                && !self.shutting_down.get()
            {
                let l = self.flush_wanted.listen();
                if !self.sync_requested.get() && !self.write_requested.get() {
                    let _ = select(Box::pin(glommio::timer::sleep(FLUSH_INTERVAL)), l).await;
                }
            }
            self.flush_round().await;
        }
    }

    /// Tries the writes of partitions stalled on a full disk again; the ones that succeed
    /// take appends again.
    async fn retry_stalled(&self) {
        let parts: Vec<Rc<Partition>> = std::mem::take(&mut *self.stalled.borrow_mut());
        for p in &parts {
            self.write_partition(p).await;
            if !p.stalled.get() && !p.failed.get() && !p.deleted.get() {
                tracing::info!(topic = %p.topic, partition = p.index, "disk space is back: partition takes appends again");
            }
        }
        self.flushed.notify(usize::MAX);
    }

    /// A write, sync or roll of `p` failed: a full disk stalls the partition (appends refused,
    /// retried later, nothing in memory lost); any other error takes it offline.
    fn on_write_error(&self, p: &Rc<Partition>, e: anyhow::Error, what: &str) {
        if crate::storage::file::is_retryable(&e) {
            if !p.stalled.replace(true) {
                tracing::warn!(topic = %p.topic, partition = p.index, "{what} failed, disk full: appends refused until space returns: {e:#}");
            }
            // Listed once: `retry_stalled` takes the list and failures put it back.
            let mut stalled = self.stalled.borrow_mut();
            if !stalled.iter().any(|s| Rc::ptr_eq(s, p)) {
                stalled.push(p.clone());
            }
            // The write may have run in its own task while the flusher sleeps: wake it so it
            // starts retrying.
            self.flush_wanted.notify(1);
        } else {
            tracing::error!(topic = %p.topic, partition = p.index, "{what} failed, partition offline: {e:#}");
            self.take_offline(p);
        }
    }

    /// A partition whose write or sync failed for good: it takes no more appends or reads.
    /// Nothing unwritten was acknowledged (acks=1 and acks=all wait for the write), so its
    /// unwritten batches are released from the shard's budget, and its cached batches (which
    /// no fetch will read: they answer KAFKA_STORAGE_ERROR) from the cache, unwritten ones
    /// included, which the cache's accounting never counted.
    fn take_offline(&self, p: &Rc<Partition>) {
        p.failed.set(true);
        p.log.borrow_mut().discard_pending();
        self.cache
            .borrow_mut()
            .forget(p.id, &mut p.cache.borrow_mut());
    }

    /// One round of the flusher: writes every dirty partition, then, when a producer waits
    /// for durability, starts an fdatasync round of everything written and not yet synced.
    /// The sync runs as its own task (at most `SYNCS_IN_FLIGHT_MAX` per shard), so the next
    /// round's writes overlap it. Waiters are woken after each write phase and each sync.
    pub async fn flush_round(self: &Rc<Self>) {
        let sync = self.sync_requested.replace(false);
        self.write_requested.set(false);
        let parts: Vec<Rc<Partition>> = std::mem::take(&mut *self.dirty.borrow_mut());
        for p in &parts {
            p.in_dirty.set(false);
        }
        if write_tasks() {
            for p in parts {
                self.spawn_write(p, sync && durable_writes());
            }
            // Partitions written without O_DSYNC before (acks=1 data that an acks=all
            // producer now waits on) still need their fdatasync.
            if sync && !self.unsynced.borrow().is_empty() {
                self.start_sync_round().await;
            }
            return;
        }
        let wrote = !parts.is_empty();
        let writes = parts.iter().map(|p| self.write_partition(p));
        futures::future::join_all(writes).await;
        for p in parts {
            if !p.in_unsynced.replace(true) {
                self.unsynced.borrow_mut().push(p);
            }
        }
        if wrote {
            // acks=1 waiters need only the write. No eviction here: each write already
            // admitted its batches and evicted.
            self.flushed.notify(usize::MAX);
        }
        if sync && !self.unsynced.borrow().is_empty() {
            self.start_sync_round().await;
        }
    }

    /// Starts an fdatasync round of the partitions written and not yet synced, as its own
    /// task (at most `SYNCS_IN_FLIGHT_MAX` per shard; past that, waits for one to end).
    async fn start_sync_round(self: &Rc<Self>) {
        let Some(slots) = self.sync_slots.clone() else {
            let parts = self.take_unsynced();
            self.sync_parts(&parts).await;
            self.flushed.notify(usize::MAX);
            return;
        };
        let permit = slots
            .acquire_static_permit(1)
            .await
            .expect("the sync semaphore is never closed");
        let parts = self.take_unsynced();
        let me = self.clone();
        glommio::spawn_local(async move {
            me.sync_parts(&parts).await;
            drop(permit);
            me.flushed.notify(usize::MAX);
        })
        .detach();
    }

    /// Writes `p`'s pending batches in a task of their own, so a partition's write never waits
    /// for another partition's, and the flusher's next round does not wait for this one: a
    /// request waits only for the write of its own partitions in flight, then its own write.
    /// Per partition at most one write runs (its I/O lock) and one waits (`write_queued`);
    /// the waiting one takes everything appended until it starts. With `durable` (a producer
    /// waits for an fdatasync) the write goes through the O_DSYNC descriptor.
    fn spawn_write(self: &Rc<Self>, p: Rc<Partition>, durable: bool) {
        if durable {
            p.write_durable.set(true);
        }
        if p.write_queued.replace(true) {
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let permit = p.io_lock.acquire_permit(1).await;
            p.write_queued.set(false);
            let durable = p.write_durable.replace(false);
            me.write_locked(&p, durable).await;
            drop(permit);
            let owed = {
                let l = p.log.borrow();
                l.durable_offset < l.written_offset
            };
            if owed && !p.in_unsynced.replace(true) {
                me.unsynced.borrow_mut().push(p.clone());
            }
            // Waiters on this partition see its new written (and durable) offset; ones that
            // still wait for an fdatasync ask for a sync round.
            me.flushed.notify(usize::MAX);
        })
        .detach();
    }

    /// The partitions written since their last sync, for one sync round.
    fn take_unsynced(&self) -> Vec<Rc<Partition>> {
        let parts: Vec<Rc<Partition>> = std::mem::take(&mut *self.unsynced.borrow_mut());
        for p in &parts {
            p.in_unsynced.set(false);
        }
        parts
    }

    /// fdatasyncs `parts` (one group-commit round).
    async fn sync_parts(&self, parts: &[Rc<Partition>]) {
        let bytes: u64 = futures::future::join_all(parts.iter().map(|p| self.sync_partition(p)))
            .await
            .into_iter()
            .sum();
        if bytes > 0 {
            crate::metrics::group_commit(bytes);
        }
    }

    /// Writes what `p` has pending, without O_DSYNC (an fdatasync round covers it).
    async fn write_partition(&self, p: &Rc<Partition>) {
        let _permit = p.io_lock.acquire_permit(1).await;
        self.write_locked(p, false).await;
    }

    /// Writes what `p` has pending; the caller holds the partition's I/O lock. With `durable`
    /// (a producer waits for an fdatasync), the writes go through the O_DSYNC descriptor and
    /// make the partition durable as they complete, so its sync has nothing left to do.
    async fn write_locked(&self, p: &Rc<Partition>, durable: bool) {
        if p.deleted.get() || p.failed.get() {
            return;
        }
        let started = Instant::now();
        let synced_before = p.log.borrow().synced_bytes;
        let r = if durable {
            PartitionLog::write_all_durable(&p.log).await
        } else {
            PartitionLog::write_all(&p.log).await
        };
        crate::metrics::produce_stage(Stage::DiskWrite, started.elapsed());
        let synced = p.log.borrow().synced_bytes.saturating_sub(synced_before);
        if synced > 0 {
            crate::metrics::group_commit(synced);
            crate::metrics::durable_write_latency(started.elapsed());
        }
        self.check_pending_ledger();
        self.admit_written(p);
        match r {
            Ok(()) => p.stalled.set(false),
            Err(e) => self.on_write_error(p, e, "log write"),
        }
    }

    /// The backpressure counter must equal what the logs hold unwritten: checked after every
    /// write in debug builds (the test suite runs them), O(partitions).
    fn check_pending_ledger(&self) {
        if cfg!(debug_assertions) {
            let sum: u64 = self
                .by_id
                .borrow()
                .values()
                .map(|p| p.log.borrow().pending_bytes())
                .sum();
            assert_eq!(
                sum,
                self.pending.get(),
                "shard {}: pending-bytes ledger out of balance",
                self.id
            );
        }
    }

    /// Bytes appended and not yet handed to a disk write (for stats and tests).
    pub fn pending_bytes(&self) -> u64 {
        self.pending.get()
    }

    /// fdatasyncs what `p` wrote since its last sync. Returns the bytes that became durable.
    ///
    /// Runs without the partition's I/O lock, so writes of the next round go on meanwhile: the
    /// sync covers what was written before it started (`written_offset` read then), and the
    /// durable offset only moves forward. A truncation or reset meanwhile replaces the log
    /// (a new `instance`): the result is then dropped, since the offsets it covered may be gone.
    async fn sync_partition(&self, p: &Rc<Partition>) -> u64 {
        if p.deleted.get() || p.failed.get() {
            return 0;
        }
        let (files, written, written_bytes, instance) = {
            let l = p.log.borrow();
            (
                l.files_to_sync(),
                l.written_offset,
                l.written_bytes,
                l.instance,
            )
        };
        for f in files {
            let started = Instant::now();
            if let Err(e) = f.fdatasync().await {
                // fdatasync errors are never retried (the kernel may have dropped the data).
                tracing::error!(topic = %p.topic, partition = p.index, "fdatasync failed, partition offline: {e:#}");
                self.take_offline(p);
                return 0;
            }
            crate::metrics::fsync_latency(started.elapsed());
        }
        let mut l = p.log.borrow_mut();
        if l.instance != instance {
            return 0;
        }
        debug_assert!(written <= l.written_offset);
        l.durable_offset = l.durable_offset.max(written);
        let bytes = written_bytes.saturating_sub(l.synced_bytes);
        l.synced_bytes = l.synced_bytes.max(written_bytes);
        bytes
    }

    /// Clean shutdown of this shard's logs: write and sync everything, truncate active
    /// segments to their logical size, write their indexes.
    pub async fn close_all(&self) -> Result<()> {
        for p in self.by_id.borrow().values() {
            if !p.in_dirty.replace(true) {
                self.dirty.borrow_mut().push(p.clone());
            }
        }
        let parts: Vec<Rc<Partition>> = std::mem::take(&mut *self.dirty.borrow_mut());
        for p in &parts {
            p.in_dirty.set(false);
        }
        futures::future::join_all(parts.iter().map(|p| self.write_partition(p))).await;
        for p in parts {
            if !p.in_unsynced.replace(true) {
                self.unsynced.borrow_mut().push(p);
            }
        }
        let parts = self.take_unsynced();
        self.sync_parts(&parts).await;
        // Sync rounds the flusher started before are finished too.
        if let Some(slots) = &self.sync_slots {
            let _all = slots.acquire_permit(syncs_in_flight_max()).await;
        }
        self.flushed.notify(usize::MAX);
        let parts: Vec<Rc<Partition>> = self.all_partitions();
        let mut result = Ok(());
        for p in parts {
            let _permit = p.io_lock.acquire_permit(1).await;
            if p.failed.get() {
                result = Err(anyhow::anyhow!(
                    "partition {}-{} had an I/O error",
                    p.topic,
                    p.index
                ));
                continue;
            }
            let unwritten = p.log.borrow().pending_bytes();
            if unwritten > 0 {
                // Stalled on a full disk: these batches were never acknowledged (acks=1 and
                // acks=all wait for the write). The segment stays unsealed; the next start's
                // tail check finds its end, so the shutdown is still clean.
                tracing::warn!(topic = %p.topic, partition = p.index, unwritten_bytes = unwritten, "disk full at shutdown: unacknowledged batches not written");
                continue;
            }
            if let Err(e) = PartitionLog::close(&p.log).await {
                if crate::storage::file::is_retryable(&e) {
                    tracing::warn!(topic = %p.topic, partition = p.index, "disk full at shutdown: segment left unsealed: {e:#}");
                    continue;
                }
                tracing::error!(topic = %p.topic, partition = p.index, "closing log failed: {e:#}");
                result = Err(e);
            }
        }
        result
    }

    // ---- compaction ----

    /// The log cleaner: every `log.cleaner.backoff.ms`, one pass over each compacted
    /// partition that is due (`storage::compact`), its I/O lock held meanwhile. The cached
    /// batches of a cleaned partition are dropped, so reads come from the cleaned files.
    pub async fn cleaner(self: Rc<Self>) {
        if !self.config.cleaner_enable {
            return;
        }
        let every = Duration::from_millis(self.config.cleaner_backoff_ms);
        let entries = (self.config.cleaner_dedupe_bytes
            / crate::storage::compact::KEY_MAP_ENTRY_BYTES)
            .max(1);
        // Bounded by shutdown; one pass per partition per round.
        loop {
            glommio::timer::sleep(every).await;
            if self.shutting_down.get() {
                return;
            }
            for p in self.all_partitions() {
                if p.log.borrow().cleanable(now_ms()).is_none() {
                    continue;
                }
                let _permit = p.io_lock.acquire_permit(1).await;
                if p.deleted.get() || p.failed.get() || self.shutting_down.get() {
                    continue;
                }
                let r = crate::storage::compact::clean(
                    &p.log,
                    now_ms(),
                    entries,
                    self.config.cleaner_io_bytes_per_s,
                )
                .await;
                match r {
                    Ok(Some(c)) => {
                        if c.segments_rewritten > 0 {
                            let end = p.log.borrow().log_end_offset;
                            if p.cache.borrow().start(end) < c.cleaned_to {
                                self.cache
                                    .borrow_mut()
                                    .forget(p.id, &mut p.cache.borrow_mut());
                            }
                        }
                        tracing::info!(topic = %p.topic, partition = p.index, segments = c.segments_rewritten, removed = c.records_removed, bytes_before = c.bytes_before, bytes_after = c.bytes_after, cleaned_to = c.cleaned_to, "log cleaner pass");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(topic = %p.topic, partition = p.index, "log cleaner pass failed (retried next round): {e:#}")
                    }
                }
            }
        }
    }

    // ---- retention ----

    pub async fn retention(self: Rc<Self>) {
        let every = Duration::from_millis(self.config.retention_check_interval_ms);
        // Bounded by shutdown; also keeps the disk-space reserve in place (shard 0).
        loop {
            if self.id == 0 {
                let dir = self.config.data_dir.clone();
                if let Err(e) = blocking(move || crate::storage::reserve::ensure(&dir)).await {
                    tracing::debug!("disk-space reserve not in place yet: {e}");
                }
            }
            glommio::timer::sleep(every).await;
            if self.shutting_down.get() {
                return;
            }
            self.enforce_retention().await;
        }
    }

    pub async fn enforce_retention(&self) {
        let parts: Vec<Rc<Partition>> = self.all_partitions();
        for p in parts {
            let gone = p
                .log
                .borrow_mut()
                .expire_producers(now_ms(), self.config.producer_id_expiration_ms);
            if gone > 0 {
                tracing::debug!(topic = %p.topic, partition = p.index, gone, "expired idle producer ids");
            }
            let expired = p.log.borrow().expired_segments(now_ms());
            if expired.is_empty() {
                continue;
            }
            let _permit = p.io_lock.acquire_permit(1).await;
            remove_segments(&p, expired, "retention").await;
        }
    }

    /// DeleteRecords (Kafka's API 21) on a partition this shard owns: moves its log start to
    /// `offset` (-1: the high watermark), persisted before the answer, and deletes the whole
    /// segments below it. Returns (low watermark, error code).
    pub async fn delete_records(&self, topic: &str, partition: i32, offset: i64) -> (i64, i16) {
        let Some(p) = self.partition(topic, partition) else {
            return (-1, NOT_LEADER_OR_FOLLOWER);
        };
        let _permit = p.io_lock.acquire_permit(1).await;
        if p.deleted.get() {
            return (-1, UNKNOWN_TOPIC_OR_PARTITION);
        }
        if p.failed.get() {
            return (-1, KAFKA_STORAGE_ERROR);
        }
        // Only committed records can be deleted: up to the high watermark.
        let (start, high_watermark, dir) = {
            let l = p.log.borrow();
            let hw = p.repl.borrow().high_watermark.min(l.log_end_offset);
            (l.log_start_offset, hw, l.dir.clone())
        };
        let target = if offset == -1 { high_watermark } else { offset };
        if target < 0 || target > high_watermark {
            return (-1, OFFSET_OUT_OF_RANGE);
        }
        if target <= start {
            return (start, NONE);
        }
        let persisted =
            blocking(move || PartitionLog::write_log_start_checkpoint(&dir, target)).await;
        if let Err(e) = persisted {
            tracing::error!(topic = %p.topic, partition = p.index, "persisting the log start failed: {e}");
            return (-1, KAFKA_STORAGE_ERROR);
        }
        let below = p.log.borrow_mut().advance_log_start(target);
        tracing::info!(topic = %p.topic, partition = p.index, log_start = target, "records deleted below the new log start");
        remove_segments(&p, below, "DeleteRecords").await;
        (target, NONE)
    }

    // ---- fetch ----

    /// Reads a partition for a fetch: from the cache when the offset is recent, else from disk.
    async fn read_partition(
        &self,
        p: &Rc<Partition>,
        item: &FetchItem,
        max_bytes: usize,
    ) -> FetchResult {
        if p.failed.get() {
            return FetchResult::error(KAFKA_STORAGE_ERROR);
        }
        let (start, end, epoch) = {
            let l = p.log.borrow();
            (l.log_start_offset, l.log_end_offset, l.leader_epoch)
        };
        let hw = p.repl.borrow().high_watermark.min(end);
        let lso = p.log.borrow().last_stable_offset(hw);
        let mut r = FetchResult {
            error: NONE,
            high_watermark: if item.replica_id == INTERNAL_READ {
                end
            } else {
                hw
            },
            log_start_offset: start,
            records: Vec::new(),
            diverging: None,
            last_stable_offset: lso,
            aborted: Vec::new(),
        };
        if item.current_leader_epoch >= 0 && item.current_leader_epoch != epoch {
            r.error = if item.current_leader_epoch > epoch {
                UNKNOWN_LEADER_EPOCH
            } else {
                FENCED_LEADER_EPOCH
            };
            return r;
        }
        // A follower whose log diverged learns where before anything else: it may be ahead of
        // this log (records of a deposed leader), which is not an out-of-range offset.
        if item.replica_id >= 0 && item.offset >= start {
            if let Some(d) = self.on_follower_fetch(p, item, end) {
                r.diverging = Some(d);
                return r;
            }
            r.high_watermark = p.repl.borrow().high_watermark.min(end);
        }
        if item.offset < start || item.offset > end {
            r.error = OFFSET_OUT_OF_RANGE;
            return r;
        }
        // Consumers read below the high watermark only; read_committed ones below the LSO.
        let visible = if item.read_committed {
            lso
        } else if item.replica_id == CONSUMER {
            hw
        } else {
            end
        };
        if item.offset >= visible || max_bytes == 0 {
            return r;
        }
        let cache_start = p.cache.borrow().start(end);
        let hit = item.offset >= cache_start;
        if item.replica_id == CONSUMER {
            crate::metrics::cache_read(hit);
        }
        if hit {
            r.records = p.cache.borrow().read(item.offset, max_bytes);
        } else {
            match read_disk(p, item.offset, max_bytes).await {
                Ok(b) => r.records = b.into_iter().collect(),
                Err(e) => {
                    tracing::error!(topic = %p.topic, partition = p.index, "read failed: {e:#}");
                    r.error = KAFKA_STORAGE_ERROR;
                }
            }
        }
        if visible < end {
            cap_batches(&mut r.records, visible);
        }
        if item.replica_id == CONSUMER {
            let (records, bytes) = crate::metrics::count_batches(&r.records);
            p.metrics.fetched(records, bytes);
        }
        if item.read_committed && !r.records.is_empty() {
            let upto = last_offset_in(&r.records).map_or(visible, |l| l + 1);
            r.aborted = p.log.borrow().aborted_between(item.offset, upto);
        }
        r
    }

    /// A follower's fetch reached this leader: notes its position (moving the HW and waking
    /// acks=all producers when it moves), and answers a diverging epoch (KIP-595's
    /// DivergingEpoch) when the follower's last epoch ended earlier here than its fetch offset.
    fn on_follower_fetch(
        &self,
        p: &Rc<Partition>,
        item: &FetchItem,
        leo: i64,
    ) -> Option<(i32, i64)> {
        if item.last_fetched_epoch >= 0 {
            let (epoch, end) = p
                .log
                .borrow()
                .epochs
                .end_offset_for(item.last_fetched_epoch, leo);
            if epoch < item.last_fetched_epoch || end < item.offset {
                return Some((epoch, end));
            }
        }
        if item.offset > leo {
            // Out of range (answered as such): not a position to count.
            return None;
        }
        let moved = {
            let mut r = p.repl.borrow_mut();
            r.on_follower_fetch(item.replica_id, item.offset, leo, now_ms());
            r.advance_high_watermark(leo)
        };
        if moved {
            p.appended.notify(usize::MAX);
        }
        None
    }

    async fn fetch(
        self: Rc<Self>,
        items: Vec<FetchItem>,
        max_bytes: usize,
        wait_until: Option<Instant>,
        mut reply: oneshot::Sender<Vec<FetchResult>>,
    ) {
        let parts: Vec<Option<Rc<Partition>>> = items
            .iter()
            .map(|i| self.partition(&i.topic, i.partition))
            .collect();
        loop {
            // Listen before reading, so an append between the read and the wait is not missed.
            let listeners: Vec<_> = parts
                .iter()
                .flatten()
                .map(|p| p.appended.listen())
                .collect();
            let mut results = Vec::with_capacity(items.len());
            let mut total = 0usize;
            for (item, p) in items.iter().zip(&parts) {
                let r = match p {
                    None => FetchResult::error(NOT_LEADER_OR_FOLLOWER),
                    Some(p) if p.deleted.get() => FetchResult::error(UNKNOWN_TOPIC_OR_PARTITION),
                    Some(p) => {
                        let budget = if total == 0 {
                            max_bytes.max(1)
                        } else {
                            max_bytes.saturating_sub(total)
                        };
                        self.read_partition(p, item, item.partition_max_bytes.min(budget))
                            .await
                    }
                };
                total += r.bytes();
                results.push(r);
            }
            let has_news = total > 0
                || results
                    .iter()
                    .any(|r| r.error != NONE || r.diverging.is_some());
            // At shutdown a long poll answers now instead of holding its connection open.
            let stopping = self.stopped.listen();
            let deadline = match wait_until {
                Some(d)
                    if !has_news
                        && d > Instant::now()
                        && !listeners.is_empty()
                        && !self.shutting_down.get() =>
                {
                    d
                }
                _ => {
                    for (p, r) in parts.iter().zip(&results) {
                        if let (Some(p), false) = (p, r.records.is_empty()) {
                            p.fetches_served.set(p.fetches_served.get() + 1);
                        }
                    }
                    let _ = reply.send(results);
                    return;
                }
            };
            let any_append = futures::future::select_all(listeners);
            let timer = select(
                Box::pin(glommio::timer::sleep(
                    deadline.saturating_duration_since(Instant::now()),
                )),
                stopping,
            );
            let cancelled = reply.cancellation();
            let woke = match select(Box::pin(any_append), select(Box::pin(timer), cancelled)).await
            {
                Either::Left(_) => Wake::Append,
                Either::Right((Either::Left(_), _)) => Wake::Deadline,
                Either::Right((Either::Right(_), _)) => Wake::Cancelled,
            };
            match woke {
                Wake::Append => {}
                // Deadline: one last read, with no more waiting.
                Wake::Deadline => return Box::pin(self.fetch(items, max_bytes, None, reply)).await,
                Wake::Cancelled => return,
            }
        }
    }

    // ---- list offsets ----

    async fn list_offsets(
        self: Rc<Self>,
        items: Vec<ListOffsetItem>,
        reply: oneshot::Sender<Vec<ListOffsetResult>>,
    ) {
        let mut out = Vec::with_capacity(items.len());
        for item in &items {
            let r = match self.partition(&item.topic, item.partition) {
                None => ListOffsetResult {
                    error: NOT_LEADER_OR_FOLLOWER,
                    timestamp: -1,
                    offset: -1,
                    leader_epoch: -1,
                },
                Some(p) => self.list_offset(&p, item).await,
            };
            out.push(r);
        }
        let _ = reply.send(out);
    }

    async fn list_offset(&self, p: &Rc<Partition>, item: &ListOffsetItem) -> ListOffsetResult {
        let (start, end, epoch, max_ts) = {
            let l = p.log.borrow();
            (
                l.log_start_offset,
                l.log_end_offset,
                l.leader_epoch,
                l.max_timestamp,
            )
        };
        let mut r = ListOffsetResult {
            error: NONE,
            timestamp: -1,
            offset: -1,
            leader_epoch: epoch,
        };
        if item.current_leader_epoch >= 0 && item.current_leader_epoch != epoch {
            r.error = if item.current_leader_epoch > epoch {
                UNKNOWN_LEADER_EPOCH
            } else {
                FENCED_LEADER_EPOCH
            };
            return r;
        }
        match item.timestamp {
            // Earliest, and earliest local (KIP-405): the same log without tiered storage.
            -2 | -4 => r.offset = start,
            // Latest tiered (KIP-1005): nothing is tiered; Kafka answers -1 with epoch -1.
            -5 => r.leader_epoch = -1,
            -1 => {
                let hw = p.repl.borrow().high_watermark.min(end);
                r.offset = if item.read_committed {
                    p.log.borrow().last_stable_offset(hw)
                } else {
                    hw
                }
            }
            -3 => {
                if max_ts.1 >= start {
                    match self.offset_of_max_timestamp(p, max_ts).await {
                        Ok(o) => (r.timestamp, r.offset) = (max_ts.0, o),
                        Err(e) => {
                            tracing::error!(topic = %p.topic, partition = p.index, "max-timestamp lookup failed: {e:#}");
                            r.error = KAFKA_STORAGE_ERROR;
                        }
                    }
                }
            }
            ts if ts >= 0 => match self.offset_for_timestamp(p, ts).await {
                Ok(Some((t, o))) => (r.timestamp, r.offset) = (t, o),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(topic = %p.topic, partition = p.index, "timestamp lookup failed: {e:#}");
                    r.error = KAFKA_STORAGE_ERROR;
                }
            },
            _ => r.error = INVALID_REQUEST,
        }
        r
    }

    /// ListOffsets MAX_TIMESTAMP (KIP-734): the offset of the first record that carries the
    /// log's largest timestamp. The log knows the batch (`max_ts.1` is its last offset); only
    /// that batch is decoded.
    async fn offset_of_max_timestamp(&self, p: &Rc<Partition>, max_ts: (i64, i64)) -> Result<i64> {
        let (ts, batch_last) = max_ts;
        let item = FetchItem {
            topic: String::new(),
            partition: 0,
            offset: batch_last,
            partition_max_bytes: 1,
            current_leader_epoch: -1,
            replica_id: crate::shard::INTERNAL_READ,
            last_fetched_epoch: -1,
            read_committed: false,
        };
        let r = self.read_partition(p, &item, 1).await;
        if r.error != NONE {
            anyhow::bail!("read error {}", r.error);
        }
        let Some(chunk) = r.records.first() else {
            return Ok(batch_last);
        };
        let h = Header::new(chunk).ok_or_else(|| anyhow::anyhow!("truncated batch"))?;
        let total = h
            .total_bytes()
            .ok_or_else(|| anyhow::anyhow!("bad batch length"))?;
        if h.last_offset() != batch_last || total > chunk.len() {
            return Ok(batch_last);
        }
        let found = first_record_at_or_after(chunk.slice(..total), ts, h.base_offset())?;
        Ok(found.map(|(_, o)| o).unwrap_or(batch_last))
    }

    /// The first record with timestamp >= `ts`: the time index finds where to start, batch
    /// headers find the batch, and only that one batch is decoded to find the record.
    async fn offset_for_timestamp(&self, p: &Rc<Partition>, ts: i64) -> Result<Option<(i64, i64)>> {
        let (mut offset, end, start) = {
            let l = p.log.borrow();
            match l.offset_scan_start_for_time(ts) {
                Some(o) => (
                    o.max(l.log_start_offset),
                    l.log_end_offset,
                    l.log_start_offset,
                ),
                None => return Ok(None),
            }
        };
        let _ = start;
        // Bounded: every step moves `offset` forward by at least one batch.
        while offset < end {
            let item = FetchItem {
                topic: String::new(),
                partition: 0,
                offset,
                partition_max_bytes: 1 << 20,
                current_leader_epoch: -1,
                replica_id: crate::shard::INTERNAL_READ,
                last_fetched_epoch: -1,
                read_committed: false,
            };
            let r = self.read_partition(p, &item, 1 << 20).await;
            if r.error != NONE {
                anyhow::bail!("read error {}", r.error);
            }
            if r.records.is_empty() {
                return Ok(None);
            }
            for chunk in &r.records {
                let mut at = 0;
                while at < chunk.len() {
                    let h = Header::new(&chunk[at..])
                        .ok_or_else(|| anyhow::anyhow!("truncated batch"))?;
                    let total = h
                        .total_bytes()
                        .ok_or_else(|| anyhow::anyhow!("bad batch length"))?;
                    if h.last_offset() >= offset && h.max_timestamp() >= ts {
                        let batch = chunk.slice(at..at + total);
                        if let Some(found) = first_record_at_or_after(batch, ts, offset)? {
                            return Ok(Some(found));
                        }
                    }
                    offset = offset.max(h.last_offset() + 1);
                    at += total;
                }
            }
        }
        Ok(None)
    }
}

/// Decodes one batch (decompressing if needed) and returns (timestamp, offset) of the first
/// record at or after `min_offset` whose timestamp is >= `ts`.
fn first_record_at_or_after(batch: Bytes, ts: i64, min_offset: i64) -> Result<Option<(i64, i64)>> {
    use kafka_protocol::records::RecordBatchDecoder;
    let mut b = batch;
    let set = RecordBatchDecoder::decode(&mut b)?;
    Ok(set
        .records
        .iter()
        .filter(|r| r.offset >= min_offset)
        .find(|r| r.timestamp >= ts)
        .map(|r| (r.timestamp, r.offset)))
}

/// Removes whole segments (the caller holds the partition's I/O lock) and deletes their files.
async fn remove_segments(p: &Rc<Partition>, bases: Vec<i64>, why: &str) {
    for base in bases {
        let removed = p.log.borrow_mut().remove_segment(base);
        let Some((file, path)) = removed else {
            continue;
        };
        drop(file);
        let r = blocking(move || log::delete_segment_files(&path)).await;
        match r {
            Ok(()) => {
                tracing::info!(topic = %p.topic, partition = p.index, base, "deleted segment ({why})")
            }
            Err(e) => {
                tracing::warn!(topic = %p.topic, partition = p.index, base, "deleting segment ({why}): {e}")
            }
        }
    }
}

/// Reads from disk starting at `offset`, stepping over segments that end before it.
async fn read_disk(p: &Rc<Partition>, offset: i64, max_bytes: usize) -> Result<Option<Bytes>> {
    let mut range = p.log.borrow().locate(offset);
    // Bounded by the number of segments.
    while let Some(r) = range {
        if let Some((start, b)) = log::read_from_disk_at(&r, offset, max_bytes).await? {
            p.log.borrow().note_read(&r, offset, start, &b);
            return Ok(Some(b));
        }
        range = r
            .next_segment
            .and_then(|next| p.log.borrow().locate_segment(next));
    }
    Ok(None)
}

/// Whether `p` takes appends now: not deleted, not failed, disk not full.
fn appendable(p: &Partition) -> Result<(), i16> {
    if p.deleted.get() {
        return Err(UNKNOWN_TOPIC_OR_PARTITION);
    }
    if p.failed.get() || p.stalled.get() {
        return Err(KAFKA_STORAGE_ERROR);
    }
    Ok(())
}

/// The partition's `min.insync.replicas` (topic config, else the broker's).
fn min_insync(p: &Partition) -> usize {
    p.log.borrow().config.min_insync_replicas.max(1) as usize
}

/// Drops the batches that start at or past `end` (a consumer's view stops at the HW).
fn cap_batches(records: &mut Vec<Bytes>, end: i64) {
    let mut out = Vec::with_capacity(records.len());
    for chunk in records.drain(..) {
        let mut at = 0;
        while at < chunk.len() {
            let Some(h) = Header::new(&chunk[at..]) else {
                break;
            };
            let Some(total) = h.total_bytes() else { break };
            if h.base_offset() >= end {
                break;
            }
            at += total;
        }
        let whole = at >= chunk.len();
        if at > 0 {
            out.push(chunk.slice(..at.min(chunk.len())));
        }
        if !whole {
            break;
        }
    }
    *records = out;
}

enum Wake {
    Append,
    Deadline,
    Cancelled,
}

/// Handles a message; a panic in it is logged and contained to that operation.
pub async fn handle_msg_guarded(msg: ShardMsg) {
    use futures::FutureExt;
    if std::panic::AssertUnwindSafe(handle_msg(msg))
        .catch_unwind()
        .await
        .is_err()
    {
        tracing::error!("a shard operation panicked");
    }
}

/// Handles one message on its target shard.
pub async fn handle_msg(msg: ShardMsg) {
    let s = shard();
    match msg {
        ShardMsg::Produce {
            acks,
            items,
            reply_when_stored,
            reply,
        } => s.produce(acks, items, reply_when_stored, reply).await,
        ShardMsg::Fetch {
            items,
            max_bytes,
            wait_until,
            reply,
        } => s.fetch(items, max_bytes, wait_until, reply).await,
        ShardMsg::ListOffsets { items, reply } => s.list_offsets(items, reply).await,
        ShardMsg::Apply { image, reply } => {
            let r = s
                .apply_image(image, false)
                .await
                .map_err(|e| format!("{e:#}"));
            let _ = reply.send(r);
        }
        ShardMsg::Control { op, reply } => {
            let r = crate::cluster::controller::handle(&s, op).await;
            let _ = reply.send(r);
        }
        ShardMsg::Stats { reply } => {
            let _ = reply.send(s.stats_line());
        }
        ShardMsg::Run { job } => job(s).await,
        ShardMsg::AllocateProducerId { reply } => {
            let id = match crate::cluster::controller::allocate_producer_id(&s).await {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::error!("allocating a producer id failed: {e:#}");
                    None
                }
            };
            let _ = reply.send(id);
        }
    }
}

impl Shard {
    /// One line describing what this shard served; the ownership test reads it.
    pub fn stats_line(&self) -> String {
        let mut parts = self.all_partitions();
        parts.sort_by(|a, b| (&a.topic, a.index).cmp(&(&b.topic, b.index)));
        let list = |count: &dyn Fn(&Partition) -> u64| {
            parts
                .iter()
                .filter(|p| count(p) > 0)
                .map(|p| format!("{}-{}:{}", p.topic, p.index, count(p)))
                .collect::<Vec<_>>()
                .join(",")
        };
        let st = self.stats.borrow();
        format!(
            "shard={} produced=[{}] fetched=[{}] remote_in={} remote_out={}",
            self.id,
            list(&|p| p.produced_batches.get()),
            list(&|p| p.fetches_served.get()),
            st.remote_ops_in,
            st.remote_ops_out
        )
    }

    pub fn count_remote_in(&self) {
        self.stats.borrow_mut().remote_ops_in += 1;
    }
}

/// `WEIR_WRITE_DSYNC`, for A/B measurements: unset, the flusher writes each partition in its
/// own task (`Shard::spawn_write`) and through O_DSYNC when a producer waits for durability;
/// `tasks`: own tasks, then fdatasync rounds; `0`: rounds of writes awaited together, then
/// fdatasync rounds (before session 13).
fn write_mode() -> &'static str {
    static MODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    MODE.get_or_init(|| std::env::var("WEIR_WRITE_DSYNC").unwrap_or_default())
}

fn write_tasks() -> bool {
    write_mode() != "0"
}

fn durable_writes() -> bool {
    write_tasks() && write_mode() != "tasks"
}
