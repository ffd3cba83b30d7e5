//! The controller quorum (issue #11): the cluster metadata as a Raft-replicated log among the
//! controller voters, like KRaft's `__cluster_metadata`. Groundwork, not yet wired into the
//! broker: today's single-node controller (`controller.rs`, shard 0) still owns `Image`.
//!
//! # Why openraft
//!
//! The consensus is [openraft](https://docs.rs/openraft) 0.9, never a hand-rolled election or
//! log-matching rule. raft-rs (TiKV) is a pure state machine: the application writes the driver
//! loop (ticks, `Ready` handling, message sending, snapshot transfer, persistence ordering)
//! itself, and those are where Raft implementations get subtle. openraft drives elections,
//! replication, commit, snapshot building, snapshot transfer and log purging itself behind
//! three traits we implement (`RaftLogStorage`, `RaftStateMachine`, `RaftNetworkFactory`),
//! runs on tokio, and is actively maintained (Databend's meta service runs on it).
//!
//! # Threads
//!
//! The quorum runs on its own std thread (`quorum-<id>`) with a tokio current-thread runtime:
//! the control plane stays apart from the glommio shards, and its blocking file I/O (fsync of
//! log entries, votes and snapshots) stalls nobody's data path. The rest of the broker talks to
//! it through a [`QuorumHandle`] (Send + Clone): `submit` sends a batch over a bounded channel
//! and awaits the outcome; `watch_image` yields every newly committed [`ClusterImage`]. Both
//! are tokio sync primitives, which need no tokio runtime on the caller's side, so a glommio
//! shard can await them.
//!
//! # Who writes, who applies
//!
//! The Raft leader is the active controller and the only writer: `submit` on any other voter
//! answers [`SubmitError::NotLeader`] naming the leader (the caller forwards the request to it,
//! as Kafka forwards CreateTopics to the active controller). An entry is committed once a
//! majority of voters has fsynced it. Every voter's state machine applies committed entries in
//! log order into its `ClusterImage`; brokers will learn of a change by watching that image
//! (and, for brokers that are not voters, by fetching the log: not built yet).
//!
//! # Records (schema level; each log entry is one batch, applied all or nothing)
//!
//! | record | fields | applies as |
//! |---|---|---|
//! | `RegisterBroker` | node_id, host, port, rack?, incarnation (uuid) | registration replaced; epoch := entry's log index; fenced |
//! | `FenceBroker` / `UnfenceBroker` | node_id, epoch | fenced := true / false, if epoch is the current registration's |
//! | `UnregisterBroker` | node_id, epoch | registration removed, if epoch matches |
//! | `CreateTopic` | name, id (uuid), partitions: [[replica]], configs | new topic; leader = first replica, ISR = replicas, epochs 0 |
//! | `DeleteTopic` | name, id | topic removed, if name and id match |
//! | `CreatePartitions` | name, id, partitions: [[replica]] | partitions appended |
//! | `PartitionChange` | name, id, partition, leader, leader_epoch, isr, partition_epoch | if partition_epoch grows, leader_epoch does not shrink, leader in ISR (or -1), ISR ⊆ replicas |
//! | `ProducerIdBlock` | node_id, end | producer_id_block_end := end, if it grows |
//! | `TopicConfig` | name, key, value? | override set (or removed when null) |
//!
//! Blank entries (a new leader's first) and membership entries move only `version`.
//!
//! # Mapping to today's `metadata::Image`
//!
//! `ClusterImage.topics[name]` ↔ `Image.topics[name]`: `id` and `configs` are the same; each
//! `ClusterPartition` adds `replicas`, `isr`, `leader` and `partition_epoch` to `leader_epoch`.
//! The shard that owns a partition is not in the cluster image (the controller decides which
//! broker holds a replica, each broker which of its cores owns it), so the broker keeps its
//! shard table beside it. `producer_id_block_end` is the same number. `brokers` is new.
//! `version` is the log index of the last applied entry (in `Image` a counter of changes).
//!
//! # Files (`<data-dir>/__cluster_metadata-0/`)
//!
//! `log` (framed entries), `vote.json`, `purged.json`, `committed.json` ([`log_store`]) and
//! `snapshot` ([`state_machine`]). A snapshot is taken every `snapshot_every_entries` committed
//! entries; entries behind it are purged, keeping `entries_kept_after_snapshot` for followers
//! that lag a little (one further behind gets the snapshot).
//!
//! # Timeouts (defaults of [`QuorumConfig::new`])
//!
//! | what | default | effect |
//! |---|---|---|
//! | heartbeat interval | 100 ms | leader → followers; also openraft's AppendEntries RPC timeout |
//! | election timeout | 500–1000 ms (random) | a candidate's wait; a follower stands after the leader lease (1000 ms) plus this; also the vote RPC timeout |
//! | snapshot chunk timeout | 2 s | one InstallSnapshot chunk |
//! | connect timeout | 500 ms | to a peer; failure = unreachable, retried every 200 ms |
//! | submit timeout | 10 s | `submit` gives up with `Timeout` (outcome unknown) |
//!
//! openraft adds a leader lease: a follower that saw a committed leader refuses votes, and does
//! not stand itself, until the lease (the election timeout's maximum, 1 s) plus an election
//! timeout passed without a heartbeat. A new leader is thus elected about 1.5 to 2.5 s after
//! the old one stops (the tests see about 2 s); shorter timeouts trade that for more spurious
//! elections on a loaded machine. KRaft's defaults (election 1 s, fetch 2 s) are similar.
//!
//! # Not here yet
//!
//! Voters are static (the configured `controller.quorum.voters`): no membership changes, no
//! observers/learners for broker-only nodes. A voter whose directory was wiped rejoins with an
//! empty log and vote, which Raft's safety does not cover (as in KRaft without KIP-853).

pub mod log_store;
pub mod network;
pub mod record;
pub mod state_machine;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::{BasicNode, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

pub use record::{
    ApplyOutcome, BrokerId, BrokerRegistration, ClusterImage, ClusterPartition, ClusterTopic,
    MetadataBatch, MetadataRecord,
};

openraft::declare_raft_types!(
    /// The quorum's Raft types: entries carry a [`MetadataBatch`], applying one answers an
    /// [`ApplyOutcome`], nodes are addressed by their controller listener.
    pub TypeConfig:
        D = MetadataBatch,
        R = ApplyOutcome,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type Node = BasicNode;
pub type Entry = openraft::Entry<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;

/// The metadata log's directory under a broker's data dir, named as KRaft names it.
pub const METADATA_DIR: &str = "__cluster_metadata-0";
/// Serialized bytes of one submitted batch (one log entry).
pub const ENTRY_BYTES_MAX: usize = 1 << 20;
/// Submissions queued for the quorum thread, and in flight at once on it.
pub const SUBMIT_QUEUE_MAX: usize = 256;

pub fn metadata_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(METADATA_DIR)
}

#[derive(Clone, Debug)]
pub struct QuorumConfig {
    pub node_id: NodeId,
    /// Every voter's controller listener, this node's included (`controller.quorum.voters`).
    pub voters: BTreeMap<NodeId, SocketAddr>,
    /// Where this node listens for its peers (normally `voters[node_id]`).
    pub listen: SocketAddr,
    pub dir: PathBuf,
    /// Requests naming another cluster are refused.
    pub cluster_name: String,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_every_entries: u64,
    pub entries_kept_after_snapshot: u64,
    pub install_snapshot_timeout_ms: u64,
    pub submit_timeout_ms: u64,
}

impl QuorumConfig {
    pub fn new(
        node_id: NodeId,
        voters: BTreeMap<NodeId, SocketAddr>,
        dir: PathBuf,
    ) -> QuorumConfig {
        let listen = voters
            .get(&node_id)
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9093)));
        QuorumConfig {
            node_id,
            voters,
            listen,
            dir,
            cluster_name: "weir".into(),
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every_entries: 1000,
            entries_kept_after_snapshot: 100,
            install_snapshot_timeout_ms: 2000,
            submit_timeout_ms: 10_000,
        }
    }

    fn raft_config(&self) -> anyhow::Result<openraft::Config> {
        anyhow::ensure!(
            self.voters.contains_key(&self.node_id),
            "node {} is not among the voters {:?}",
            self.node_id,
            self.voters.keys().collect::<Vec<_>>()
        );
        anyhow::ensure!(
            self.heartbeat_interval_ms > 0
                && self.heartbeat_interval_ms < self.election_timeout_min_ms,
            "the heartbeat interval must be shorter than the election timeout"
        );
        let config = openraft::Config {
            cluster_name: self.cluster_name.clone(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries.max(1)),
            max_in_snapshot_log_to_keep: self.entries_kept_after_snapshot,
            // Entries per AppendEntries: with ENTRY_BYTES_MAX each, well inside a frame.
            max_payload_entries: 16,
            snapshot_max_chunk_size: 1 << 20,
            ..Default::default()
        };
        Ok(config.validate()?)
    }
}

/// What a voter knows of the quorum.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuorumStatus {
    pub node_id: NodeId,
    /// The active controller, if known.
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    /// Last log index covered by this voter's snapshot.
    pub snapshot: Option<u64>,
    pub purged: Option<u64>,
}

impl QuorumStatus {
    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.node_id)
    }
}

/// A committed batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    pub log_index: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// This voter is not the active controller; `leader` is, if known.
    NotLeader {
        leader: Option<NodeId>,
        leader_addr: Option<String>,
    },
    /// Committed, but the batch did not apply (the image is unchanged): why.
    Rejected { log_index: u64, reason: String },
    /// Refused before it entered the log.
    Invalid(String),
    /// No outcome within the submit timeout: the batch may or may not commit.
    Timeout,
    /// The quorum is shutting down or failed.
    Unavailable(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::NotLeader {
                leader,
                leader_addr,
            } => {
                write!(
                    f,
                    "not the active controller (leader: {leader:?} at {leader_addr:?})"
                )
            }
            SubmitError::Rejected { log_index, reason } => {
                write!(f, "entry {log_index} did not apply: {reason}")
            }
            SubmitError::Invalid(m) => write!(f, "invalid batch: {m}"),
            SubmitError::Timeout => write!(f, "no outcome within the submit timeout"),
            SubmitError::Unavailable(m) => write!(f, "quorum unavailable: {m}"),
        }
    }
}

impl std::error::Error for SubmitError {}

struct Submit {
    batch: MetadataBatch,
    reply: oneshot::Sender<Result<Committed, SubmitError>>,
}

/// The broker's side of the quorum: Send + Clone, usable from any thread or executor.
#[derive(Clone)]
pub struct QuorumHandle {
    node_id: NodeId,
    submit_tx: mpsc::Sender<Submit>,
    image_rx: watch::Receiver<Arc<ClusterImage>>,
    status_rx: watch::Receiver<QuorumStatus>,
    service: network::ServiceSlot,
    runtime: tokio::runtime::Handle,
}

impl QuorumHandle {
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Proposes `records` as one entry; answers once it is committed and applied here.
    pub async fn submit(&self, records: Vec<MetadataRecord>) -> Result<Committed, SubmitError> {
        if records.is_empty() {
            return Err(SubmitError::Invalid("no records".into()));
        }
        if records.len() > record::BATCH_RECORDS_MAX {
            return Err(SubmitError::Invalid(format!(
                "{} records exceed {}",
                records.len(),
                record::BATCH_RECORDS_MAX
            )));
        }
        let batch = MetadataBatch { records };
        let bytes = serde_json::to_vec(&batch)
            .map_err(|e| SubmitError::Invalid(e.to_string()))?
            .len();
        if bytes > ENTRY_BYTES_MAX {
            return Err(SubmitError::Invalid(format!(
                "{bytes} bytes exceed {ENTRY_BYTES_MAX}"
            )));
        }
        let (reply, rx) = oneshot::channel();
        self.submit_tx
            .send(Submit { batch, reply })
            .await
            .map_err(|_| SubmitError::Unavailable("the quorum thread has stopped".into()))?;
        rx.await.unwrap_or_else(|_| {
            Err(SubmitError::Unavailable(
                "the quorum thread has stopped".into(),
            ))
        })
    }

    /// The latest image this voter applied.
    pub fn image(&self) -> Arc<ClusterImage> {
        self.image_rx.borrow().clone()
    }

    /// Yields each newly applied image (`changed().await`, then `borrow()`).
    pub fn watch_image(&self) -> watch::Receiver<Arc<ClusterImage>> {
        self.image_rx.clone()
    }

    /// The quorum thread's runtime, for the controller's own tasks.
    pub fn runtime(&self) -> tokio::runtime::Handle {
        self.runtime.clone()
    }

    /// Installs the answerer of brokers' controller requests (once; later calls are ignored).
    pub fn set_service(&self, service: network::Service) {
        let _ = self.service.set(service);
    }

    pub fn status(&self) -> QuorumStatus {
        self.status_rx.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<QuorumStatus> {
        self.status_rx.clone()
    }
}

/// A running voter: owns the quorum thread, which stops when this is shut down or dropped.
pub struct Quorum {
    handle: QuorumHandle,
    stop_tx: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Quorum {
    /// Opens the log and snapshot in `cfg.dir`, binds the controller listener and starts the
    /// voter on its own thread. A fresh voter initializes the cluster with the configured
    /// voters (openraft allows every voter to do so with the same membership).
    pub fn start(cfg: QuorumConfig) -> anyhow::Result<Quorum> {
        let raft_config = Arc::new(cfg.raft_config()?);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("quorum-{}", cfg.node_id))
            .spawn(move || run(cfg, raft_config, ready_tx, stop_rx))
            .context("spawning the quorum thread")?;
        match ready_rx.recv() {
            Ok(Ok(handle)) => Ok(Quorum {
                handle,
                stop_tx: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                anyhow::bail!("the quorum thread died while starting")
            }
        }
    }

    pub fn handle(&self) -> QuorumHandle {
        self.handle.clone()
    }

    /// Stops the voter: Raft shuts down, the listener and peer connections close, the thread
    /// ends. What was committed stays in the log and snapshot. Blocks until the thread has
    /// ended (so does dropping a `Quorum`): call it off the glommio executors.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(node = self.handle.node_id, "the quorum thread panicked");
            }
        }
    }
}

impl Drop for Quorum {
    fn drop(&mut self) {
        self.stop();
    }
}

type Ready = std::sync::mpsc::SyncSender<anyhow::Result<QuorumHandle>>;

fn run(
    cfg: QuorumConfig,
    raft_config: Arc<openraft::Config>,
    ready: Ready,
    stop_rx: oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(
                anyhow::Error::new(e).context("building the quorum runtime")
            ));
            return;
        }
    };
    rt.block_on(async move {
        let (raft, handle, tasks) = match start_voter(&cfg, raft_config).await {
            Ok(x) => x,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        if ready.send(Ok(handle)).is_err() {
            return;
        }
        let _ = stop_rx.await;
        if let Err(e) = raft.shutdown().await {
            tracing::warn!(node = cfg.node_id, "raft shutdown: {e}");
        }
        for t in tasks {
            t.abort();
        }
    });
    // Dropping the runtime cancels what is left (connections, timers) and closes the sockets.
    drop(rt);
}

async fn start_voter(
    cfg: &QuorumConfig,
    raft_config: Arc<openraft::Config>,
) -> anyhow::Result<(Raft, QuorumHandle, Vec<tokio::task::JoinHandle<()>>)> {
    let id = cfg.node_id;
    let log = log_store::LogStore::open(&cfg.dir)
        .with_context(|| format!("opening {}", cfg.dir.display()))?;
    let (sm, image_rx) = state_machine::StateMachine::open(&cfg.dir)
        .with_context(|| format!("opening {}", cfg.dir.display()))?;
    let socket = if cfg.listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(cfg.listen)
        .with_context(|| format!("binding the controller listener {}", cfg.listen))?;
    let listener = socket.listen(128)?;
    let cluster: Arc<str> = cfg.cluster_name.clone().into();
    let network = network::NetworkFactory {
        id,
        cluster: cluster.clone(),
    };
    let raft = Raft::new(id, raft_config, network, log, sm)
        .await
        .context("starting raft")?;

    let service: network::ServiceSlot = Default::default();
    let mut tasks = vec![tokio::spawn(network::serve(
        listener,
        raft.clone(),
        id,
        cluster,
        service.clone(),
    ))];

    if !raft.is_initialized().await? {
        let members: BTreeMap<NodeId, Node> = cfg
            .voters
            .iter()
            .map(|(&n, addr)| {
                (
                    n,
                    BasicNode {
                        addr: addr.to_string(),
                    },
                )
            })
            .collect();
        if let Err(e) = raft.initialize(members).await {
            // Another voter's entries arrived first: the cluster exists already.
            tracing::info!(node = id, "not initializing the quorum: {e}");
        }
    }

    // Seeded from openraft's metrics as they are now (the log and snapshot are loaded), so a
    // caller sees this voter's state as soon as `start` returns.
    let mut metrics = raft.metrics();
    let (status_tx, status_rx) = watch::channel(status_of(id, &metrics.borrow_and_update()));
    tasks.push(tokio::spawn(async move {
        while metrics.changed().await.is_ok() {
            let status = status_of(id, &metrics.borrow_and_update());
            status_tx.send_replace(status);
        }
    }));

    let (submit_tx, mut submit_rx) = mpsc::channel::<Submit>(SUBMIT_QUEUE_MAX);
    let submit_timeout = Duration::from_millis(cfg.submit_timeout_ms);
    let writer = raft.clone();
    tasks.push(tokio::spawn(async move {
        let in_flight = Arc::new(Semaphore::new(SUBMIT_QUEUE_MAX));
        while let Some(Submit { batch, reply }) = submit_rx.recv().await {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let raft = writer.clone();
            tokio::spawn(async move {
                let outcome = match tokio::time::timeout(submit_timeout, write(&raft, batch)).await
                {
                    Ok(r) => r,
                    Err(_) => Err(SubmitError::Timeout),
                };
                let _ = reply.send(outcome);
                drop(permit);
            });
        }
    }));

    let handle = QuorumHandle {
        node_id: id,
        submit_tx,
        image_rx,
        status_rx,
        service,
        runtime: tokio::runtime::Handle::current(),
    };
    Ok((raft, handle, tasks))
}

fn status_of(id: NodeId, m: &openraft::RaftMetrics<NodeId, Node>) -> QuorumStatus {
    QuorumStatus {
        node_id: id,
        leader: m.current_leader,
        term: m.current_term,
        last_log_index: m.last_log_index,
        last_applied: m.last_applied.map(|l| l.index),
        snapshot: m.snapshot.map(|l| l.index),
        purged: m.purged.map(|l| l.index),
    }
}

async fn write(raft: &Raft, batch: MetadataBatch) -> Result<Committed, SubmitError> {
    match raft.client_write(batch).await {
        Ok(resp) => match resp.data.rejected {
            None => Ok(Committed {
                log_index: resp.log_id.index,
            }),
            Some(reason) => Err(SubmitError::Rejected {
                log_index: resp.log_id.index,
                reason,
            }),
        },
        Err(e) => match e.forward_to_leader::<Node>() {
            Some(f) => Err(SubmitError::NotLeader {
                leader: f.leader_id,
                leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
            }),
            None => Err(SubmitError::Unavailable(e.to_string())),
        },
    }
}
