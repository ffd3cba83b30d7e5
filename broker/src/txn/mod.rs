//! The transaction coordinator (Kafka's, KIP-98): one per partition of `__transaction_state`,
//! on the shard that owns the partition on the broker that leads it. Each transactional id maps
//! to one partition (Java's String.hashCode, as groups do) and to a `TxnValue` kept in memory
//! and written to that partition before any answer depends on it.
//!
//! | step | record written first | then |
//! |---|---|---|
//! | InitProducerId, new id | Empty (new producer id, epoch 0) | answer |
//! | InitProducerId, known id | Empty (epoch + 1; a new producer id at the epoch limit) | answer; an open transaction is first aborted with the bumped epoch (fencing the old producer) |
//! | AddPartitionsToTxn / AddOffsetsToTxn | Ongoing (the partitions added) | answer |
//! | EndTxn | PrepareCommit / PrepareAbort | markers to every partition (durable, replicated), then CompleteCommit / CompleteAbort, then answer |
//! | timeout (`transaction.timeout.ms` passed) | PrepareAbort with epoch + 1 | markers, CompleteAbort: the producer is fenced |
//! | `transactional.id.expiration.ms` idle | tombstone | the id is forgotten |
//!
//! A coordinator that starts leading a partition replays it (requests for its ids answer
//! COORDINATOR_LOAD_IN_PROGRESS until then) and finishes any transaction left in
//! PrepareCommit / PrepareAbort by writing its markers again (markers are idempotent: a
//! partition ignores a marker for a producer with no open transaction).
//!
//! Markers go to each partition's leader: on this broker through its owner shard, elsewhere as
//! WriteTxnMarkers, one request per broker (`peer`).

pub mod records;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use futures::channel::oneshot;
use futures::FutureExt;
use kafka_protocol::messages::write_txn_markers_request::{
    WritableTxnMarker, WritableTxnMarkerTopic,
};
use kafka_protocol::messages::{
    ApiKey, ProducerId, TopicName, WriteTxnMarkersRequest, WriteTxnMarkersResponse,
};
use kafka_protocol::protocol::StrBytes;

use crate::kafka::errors::*;
use crate::shard::{Shard, ShardMsg};
use crate::storage::log::now_ms;
pub use records::{TxnState, TxnValue};

pub const TXN_TOPIC: &str = "__transaction_state";
/// How long a coordinator keeps retrying a partition's marker before it leaves the
/// transaction prepared (the ticker tries again).
const MARKER_RETRY_DEADLINE: Duration = Duration::from_secs(30);
const MARKER_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// WriteTxnMarkers round trip to another broker.
const MARKER_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MARKER_RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Transactional ids one coordinator shard keeps (InitProducerId beyond: COORDINATOR_NOT_AVAILABLE).
pub const TXN_IDS_PER_SHARD_MAX: usize = 1_000_000;

#[derive(Clone, Debug)]
pub struct TxnConfig {
    /// `transaction.state.log.num.partitions`
    pub partitions: i32,
    /// `transaction.state.log.segment.bytes`
    pub segment_bytes: u64,
    /// `transaction.max.timeout.ms`
    pub max_timeout_ms: i32,
    /// `transactional.id.expiration.ms`
    pub id_expiration_ms: i64,
    /// `transaction.abort.timed.out.transaction.cleanup.interval.ms`
    pub abort_check_interval_ms: u64,
}

impl Default for TxnConfig {
    fn default() -> Self {
        TxnConfig {
            partitions: 50,
            segment_bytes: 104_857_600,
            max_timeout_ms: 900_000,
            id_expiration_ms: 604_800_000,
            abort_check_interval_ms: 10_000,
        }
    }
}

/// One shard's share of the transaction coordinator.
#[derive(Default)]
pub struct Coordinator {
    pub txns: RefCell<HashMap<String, TxnValue>>,
    /// `__transaction_state` partitions of this shard still being replayed.
    pub loading: RefCell<HashSet<i32>>,
    /// Ids with a state change in flight: another request for them answers
    /// CONCURRENT_TRANSACTIONS (the client retries).
    busy: RefCell<HashSet<String>>,
}

/// Marks an id busy while it lives.
struct Busy<'a>(&'a Coordinator, String);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.borrow_mut().remove(&self.1);
    }
}

impl Coordinator {
    fn begin(&self, id: &str) -> Result<Busy<'_>, i16> {
        if !self.busy.borrow_mut().insert(id.to_string()) {
            return Err(CONCURRENT_TRANSACTIONS);
        }
        Ok(Busy(self, id.to_string()))
    }

    pub fn get(&self, id: &str) -> Option<TxnValue> {
        self.txns.borrow().get(id).cloned()
    }
}

/// The `__transaction_state` partition of a transactional id.
pub fn partition_for(id: &str, partitions: i32) -> i32 {
    crate::group::records::partition_for(id, partitions)
}

/// Writes `v` (None: tombstone) for `id` to its partition and, once durable, into memory.
async fn store(s: &Rc<Shard>, partition: i32, id: &str, v: Option<TxnValue>) -> Result<(), i16> {
    let rec = (
        records::encode_key(id),
        v.as_ref().map(records::encode_value),
    );
    s.persist_records(TXN_TOPIC, partition, vec![rec], None)
        .await
        .map_err(|e| match e {
            NOT_LEADER_OR_FOLLOWER | NOT_COORDINATOR => NOT_COORDINATOR,
            _ => COORDINATOR_NOT_AVAILABLE,
        })?;
    let mut txns = s.txns.txns.borrow_mut();
    match v {
        Some(v) => {
            txns.insert(id.to_string(), v);
        }
        None => {
            txns.remove(id);
        }
    }
    Ok(())
}

async fn allocate_producer_id(s: &Rc<Shard>) -> Result<i64, i16> {
    let (tx, rx) = oneshot::channel();
    s.send(
        crate::cluster::controller::CONTROLLER_SHARD,
        ShardMsg::AllocateProducerId { reply: tx },
    )
    .await;
    rx.await.ok().flatten().ok_or(COORDINATOR_NOT_AVAILABLE)
}

/// InitProducerId with a transactional id. `expected`: the (producer id, epoch) the client
/// says it has (KIP-360), or (-1, -1).
pub async fn init_producer_id(
    s: &Rc<Shard>,
    partition: i32,
    id: &str,
    timeout_ms: i32,
    expected: (i64, i16),
) -> Result<(i64, i16), i16> {
    if timeout_ms <= 0 || timeout_ms > s.config.txn.max_timeout_ms {
        return Err(INVALID_TRANSACTION_TIMEOUT);
    }
    let _busy = s.txns.begin(id)?;
    let now = now_ms();
    let Some(mut v) = s.txns.get(id) else {
        if s.txns.txns.borrow().len() >= TXN_IDS_PER_SHARD_MAX {
            return Err(COORDINATOR_NOT_AVAILABLE);
        }
        let pid = allocate_producer_id(s).await?;
        let v = TxnValue {
            producer_id: pid,
            epoch: 0,
            timeout_ms,
            state: TxnState::Empty,
            partitions: BTreeSet::new(),
            last_update_ms: now,
            start_ms: -1,
        };
        store(s, partition, id, Some(v)).await?;
        return Ok((pid, 0));
    };
    if expected.0 >= 0 && (expected.0 != v.producer_id || expected.1 != v.epoch) {
        // Retry of a bump that already happened.
        if expected.0 == v.producer_id && expected.1 + 1 == v.epoch {
            return Ok((v.producer_id, v.epoch));
        }
        return Err(PRODUCER_FENCED);
    }
    match v.state {
        TxnState::PrepareCommit | TxnState::PrepareAbort | TxnState::PrepareEpochFence => {
            // Markers are still being written (the ticker finishes them).
            return Err(CONCURRENT_TRANSACTIONS);
        }
        TxnState::Ongoing => {
            // The previous producer's open transaction is aborted with a bumped epoch: its
            // writes are fenced from here on.
            v.epoch = next_epoch(v.epoch);
            complete(s, partition, id, v.clone(), false).await?;
            v = s.txns.get(id).ok_or(COORDINATOR_NOT_AVAILABLE)?;
        }
        _ => {}
    }
    if v.epoch >= i16::MAX - 1 {
        v.producer_id = allocate_producer_id(s).await?;
        v.epoch = 0;
    } else {
        v.epoch += 1;
    }
    v.state = TxnState::Empty;
    v.timeout_ms = timeout_ms;
    v.partitions.clear();
    v.last_update_ms = now;
    v.start_ms = -1;
    let out = (v.producer_id, v.epoch);
    store(s, partition, id, Some(v)).await?;
    Ok(out)
}

fn next_epoch(e: i16) -> i16 {
    e.saturating_add(1).min(i16::MAX - 1)
}

/// Checks a request's producer id and epoch against the id's state.
fn check_producer(v: &TxnValue, pid: i64, epoch: i16) -> Result<(), i16> {
    if v.producer_id != pid {
        return Err(INVALID_PRODUCER_ID_MAPPING);
    }
    if epoch != v.epoch {
        return Err(PRODUCER_FENCED);
    }
    Ok(())
}

/// AddPartitionsToTxn / AddOffsetsToTxn: the partitions join the transaction (it begins if
/// none was open).
pub async fn add_partitions(
    s: &Rc<Shard>,
    partition: i32,
    id: &str,
    pid: i64,
    epoch: i16,
    parts: Vec<(String, i32)>,
) -> Result<(), i16> {
    let _busy = s.txns.begin(id)?;
    let mut v = s.txns.get(id).ok_or(INVALID_PRODUCER_ID_MAPPING)?;
    check_producer(&v, pid, epoch)?;
    match v.state {
        TxnState::PrepareCommit | TxnState::PrepareAbort | TxnState::PrepareEpochFence => {
            return Err(CONCURRENT_TRANSACTIONS)
        }
        TxnState::Dead => return Err(INVALID_TXN_STATE),
        _ => {}
    }
    let now = now_ms();
    let was_open = v.state == TxnState::Ongoing;
    let before = v.partitions.len();
    v.partitions.extend(parts);
    if v.partitions.len() > records::PARTITIONS_PER_TXN_MAX {
        return Err(INVALID_REQUEST);
    }
    if was_open && v.partitions.len() == before {
        return Ok(());
    }
    if !was_open {
        v.start_ms = now;
    }
    v.state = TxnState::Ongoing;
    v.last_update_ms = now;
    store(s, partition, id, Some(v)).await
}

/// EndTxn: commits or aborts the open transaction; answered once every marker is written.
pub async fn end_txn(
    s: &Rc<Shard>,
    partition: i32,
    id: &str,
    pid: i64,
    epoch: i16,
    commit: bool,
) -> Result<(), i16> {
    let _busy = s.txns.begin(id)?;
    let v = s.txns.get(id).ok_or(INVALID_PRODUCER_ID_MAPPING)?;
    check_producer(&v, pid, epoch)?;
    match (v.state, commit) {
        (TxnState::Ongoing, _) => complete(s, partition, id, v, commit).await,
        // A retry of what already happened.
        (TxnState::CompleteCommit, true) | (TxnState::CompleteAbort, false) => Ok(()),
        (TxnState::PrepareCommit, true) | (TxnState::PrepareAbort, false) => {
            Err(CONCURRENT_TRANSACTIONS)
        }
        // An abort of a transaction with no partitions is allowed (Kafka's client sends it
        // after an error before any send).
        (TxnState::Empty, false) => Ok(()),
        _ => Err(INVALID_TXN_STATE),
    }
}

/// Prepare record, markers, Complete record. `v` carries the epoch the markers use.
async fn complete(
    s: &Rc<Shard>,
    partition: i32,
    id: &str,
    mut v: TxnValue,
    commit: bool,
) -> Result<(), i16> {
    v.state = if commit {
        TxnState::PrepareCommit
    } else {
        TxnState::PrepareAbort
    };
    v.last_update_ms = now_ms();
    store(s, partition, id, Some(v.clone())).await?;
    finish_prepared(s, partition, id, v).await
}

/// Writes the markers of a prepared transaction, then its Complete record.
async fn finish_prepared(
    s: &Rc<Shard>,
    partition: i32,
    id: &str,
    mut v: TxnValue,
) -> Result<(), i16> {
    let commit = v.state == TxnState::PrepareCommit;
    write_markers(s, partition, v.producer_id, v.epoch, commit, &v.partitions).await?;
    v.state = if commit {
        TxnState::CompleteCommit
    } else {
        TxnState::CompleteAbort
    };
    v.partitions.clear();
    v.last_update_ms = now_ms();
    store(s, partition, id, Some(v)).await
}

/// Writes the transaction's markers to every partition's leader (retried until
/// `MARKER_RETRY_DEADLINE`). Partitions of deleted topics are skipped.
async fn write_markers(
    s: &Rc<Shard>,
    txn_partition: i32,
    pid: i64,
    epoch: i16,
    commit: bool,
    parts: &BTreeSet<(String, i32)>,
) -> Result<(), i16> {
    let coordinator_epoch = s
        .image()
        .topics
        .get(TXN_TOPIC)
        .and_then(|t| t.partitions.get(txn_partition as usize))
        .map_or(0, |p| p.leader_epoch);
    let deadline = std::time::Instant::now() + MARKER_RETRY_DEADLINE;
    let mut left: BTreeSet<(String, i32)> = parts.clone();
    // Bounded by the deadline; each round retries what failed.
    while !left.is_empty() {
        let image = s.image();
        let me = s.config.node_id;
        let mut by_broker: BTreeMap<i32, Vec<(String, i32)>> = BTreeMap::new();
        for (t, p) in &left {
            match image
                .topics
                .get(t)
                .and_then(|tm| tm.partitions.get(*p as usize))
            {
                None => {}
                Some(pm) => by_broker
                    .entry(pm.leader)
                    .or_default()
                    .push((t.clone(), *p)),
            }
        }
        let mut failed = BTreeSet::new();
        for (broker, tps) in by_broker {
            let results = if broker == me {
                write_local(s, pid, epoch, coordinator_epoch, commit, &tps).await
            } else if broker < 0 {
                tps.iter().map(|_| LEADER_NOT_AVAILABLE).collect()
            } else {
                write_remote(s, broker, pid, epoch, coordinator_epoch, commit, &tps).await
            };
            for (tp, code) in tps.into_iter().zip(results) {
                if code != NONE && code != UNKNOWN_TOPIC_OR_PARTITION {
                    failed.insert(tp);
                }
            }
        }
        left = failed;
        if left.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            tracing::warn!(pid, epoch, commit, partitions = ?left, "transaction markers not written yet; retried later");
            return Err(COORDINATOR_NOT_AVAILABLE);
        }
        glommio::timer::sleep(MARKER_RETRY_BACKOFF).await;
    }
    Ok(())
}

/// Markers for partitions this broker leads, each on its owner shard. One code per partition.
pub async fn write_local(
    s: &Rc<Shard>,
    pid: i64,
    epoch: i16,
    coordinator_epoch: i32,
    commit: bool,
    tps: &[(String, i32)],
) -> Vec<i16> {
    let image = s.image();
    let waits = tps.iter().map(|(t, p)| {
        let route = image.route(t, *p, s.config.node_id);
        let (t, p) = (t.clone(), *p);
        async move {
            let owner = route?;
            s.run_on(owner as usize, move |o| {
                async move {
                    let part = o.partition(&t, p).ok_or(UNKNOWN_TOPIC_OR_PARTITION)?;
                    o.append_marker(&part, pid, epoch, coordinator_epoch, commit)
                        .await
                }
                .boxed_local()
            })
            .await
            .unwrap_or(Err(NOT_LEADER_OR_FOLLOWER))
        }
    });
    futures::future::join_all(waits)
        .await
        .into_iter()
        .map(|r: Result<(), i16>| r.err().unwrap_or(NONE))
        .collect()
}

/// WriteTxnMarkers v1 to broker `broker`. One code per partition.
async fn write_remote(
    s: &Rc<Shard>,
    broker: i32,
    pid: i64,
    epoch: i16,
    coordinator_epoch: i32,
    commit: bool,
    tps: &[(String, i32)],
) -> Vec<i16> {
    let addr = match s.image().brokers.get(&broker) {
        Some(b) if !b.fenced => format!("{}:{}", b.host, b.port),
        _ => return vec![LEADER_NOT_AVAILABLE; tps.len()],
    };
    let topics = crate::protocol::by_topic(tps.iter().map(|(t, p)| (t, *p)))
        .into_iter()
        .map(|(t, ps)| {
            WritableTxnMarkerTopic::default()
                .with_name(TopicName(StrBytes::from_string(t.clone())))
                .with_partition_indexes(ps)
        })
        .collect();
    let req = WriteTxnMarkersRequest::default().with_markers(vec![WritableTxnMarker::default()
        .with_producer_id(ProducerId(pid))
        .with_producer_epoch(epoch)
        .with_transaction_result(commit)
        .with_topics(topics)
        .with_coordinator_epoch(coordinator_epoch)]);
    let resp: anyhow::Result<WriteTxnMarkersResponse> = async {
        let mut c =
            crate::peer::Conn::connect(&addr, "weir-txn-coordinator", MARKER_REQUEST_TIMEOUT)
                .await?;
        c.call(
            ApiKey::WriteTxnMarkers,
            1,
            &req,
            MARKER_REQUEST_TIMEOUT,
            MARKER_RESPONSE_BYTES_MAX,
        )
        .await
    }
    .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(broker, %addr, "WriteTxnMarkers failed: {e:#}");
            return vec![REQUEST_TIMED_OUT; tps.len()];
        }
    };
    let mut codes: HashMap<(String, i32), i16> = HashMap::new();
    for m in resp.markers {
        for t in m.topics {
            for p in t.partitions {
                codes.insert((t.name.0.to_string(), p.partition_index), p.error_code);
            }
        }
    }
    tps.iter()
        .map(|tp| codes.get(tp).copied().unwrap_or(UNKNOWN_SERVER_ERROR))
        .collect()
}

/// Replays one `__transaction_state` partition into the coordinator; prepared transactions
/// are finished by the ticker. Bounded by the log end.
pub async fn load_partition(s: &Rc<Shard>, partition: i32) {
    if let Some(p) = s.partition(TXN_TOPIC, partition) {
        // The last record of each id wins.
        let mut loaded: HashMap<String, Option<TxnValue>> = HashMap::new();
        s.replay_records(&p, |rec| {
            if let Some(id) = rec.key.and_then(records::decode_key) {
                loaded.insert(id, rec.value.and_then(records::decode_value));
            }
        })
        .await;
        let mut txns = s.txns.txns.borrow_mut();
        for (id, v) in loaded {
            match v {
                Some(v) => {
                    txns.insert(id, v);
                }
                None => {
                    txns.remove(&id);
                }
            }
        }
    }
    s.txns.loading.borrow_mut().remove(&partition);
    tracing::debug!(partition, "loaded __transaction_state partition");
}

/// Forgets the ids of a partition this broker stopped leading.
pub fn unload_partition(s: &Shard, partition: i32) {
    let count = s.config.txn.partitions;
    s.txns
        .txns
        .borrow_mut()
        .retain(|id, _| partition_for(id, count) != partition);
}

/// Every `transaction.abort.timed.out.transaction.cleanup.interval.ms`: aborts (with a bumped
/// epoch) transactions open longer than their timeout, finishes prepared ones whose markers
/// are not all written, and forgets ids idle past `transactional.id.expiration.ms`.
pub async fn ticker(s: Rc<Shard>) {
    let interval = Duration::from_millis(s.config.txn.abort_check_interval_ms.max(10));
    // Bounded: one pass over this shard's ids per interval.
    while !s.shutting_down.get() {
        glommio::timer::sleep(interval.min(Duration::from_secs(1))).await;
        let now = now_ms();
        let due: Vec<(String, TxnValue)> = s
            .txns
            .txns
            .borrow()
            .iter()
            .filter(|(id, v)| {
                !s.txns.busy.borrow().contains(*id)
                    && match v.state {
                        TxnState::Ongoing => now - v.start_ms > v.timeout_ms as i64,
                        TxnState::PrepareCommit
                        | TxnState::PrepareAbort
                        | TxnState::PrepareEpochFence => true,
                        TxnState::Empty | TxnState::CompleteCommit | TxnState::CompleteAbort => {
                            now - v.last_update_ms > s.config.txn.id_expiration_ms
                        }
                        TxnState::Dead => false,
                    }
            })
            .map(|(id, v)| (id.clone(), v.clone()))
            .collect();
        for (id, v) in due {
            let partition = partition_for(&id, s.config.txn.partitions);
            if s.partition(TXN_TOPIC, partition)
                .is_none_or(|p| !p.repl.borrow().is_leader())
            {
                continue;
            }
            let Ok(_busy) = s.txns.begin(&id) else {
                continue;
            };
            // The state may have moved while others ran.
            if s.txns.get(&id).as_ref() != Some(&v) {
                continue;
            }
            let r = match v.state {
                TxnState::Ongoing => {
                    tracing::info!(id = %id, pid = v.producer_id, "aborting a transaction past its timeout");
                    let mut v = v;
                    v.epoch = next_epoch(v.epoch);
                    complete(&s, partition, &id, v, false).await
                }
                TxnState::PrepareCommit | TxnState::PrepareAbort => {
                    finish_prepared(&s, partition, &id, v).await
                }
                TxnState::PrepareEpochFence => {
                    let mut v = v;
                    v.state = TxnState::PrepareAbort;
                    finish_prepared(&s, partition, &id, v).await
                }
                _ => store(&s, partition, &id, None).await,
            };
            if let Err(code) = r {
                tracing::debug!(id = %id, code, "transaction housekeeping deferred");
            }
        }
    }
}
