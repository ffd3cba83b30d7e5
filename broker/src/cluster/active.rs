//! The active controller: the voter that leads the quorum answers brokers' requests
//! ([`super::rpc`]), decides every change against the committed image ([`super::decide`]) and
//! writes it to the metadata log. It runs on the quorum's thread (tokio), apart from the
//! shards' data path.
//!
//! Liveness, as KRaft does it: a broker registers (fenced), is unfenced by its first heartbeat
//! once it has applied the metadata up to its own registration, and is fenced when no
//! heartbeat arrived for `broker.session.timeout.ms`; fencing moves its leaderships to other
//! in-sync replicas. Heartbeat times live only in the active controller's memory: a newly
//! elected controller gives every broker a full session timeout from its election before it
//! fences anyone. A broker that asks to shut down (SIGTERM) is fenced at once, so its
//! leaderships move before it stops.
//!
//! Changes are decided one at a time (`decide_lock`): each is checked against the image that
//! includes every earlier change, and answered only once committed and applied here.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::decide;
use super::metadata::{NewTopic, TopicError};
use super::quorum::{BrokerId, ClusterImage, MetadataRecord, QuorumHandle, SubmitError};
use super::rpc::{Request, Response};
use crate::config::Config;
use crate::shard::ControlOp;

/// Producer ids handed to a broker per request (each costs one metadata record).
pub const PRODUCER_ID_BLOCK: i64 = 1000;
/// How often the active controller checks heartbeats and internal topics.
const TICK_MS_MAX: u64 = 250;
/// Replication factor of `__consumer_offsets`: Kafka's `offsets.topic.replication.factor`,
/// capped by the brokers registered, so a small cluster gets one too.
const OFFSETS_TOPIC_RF_MAX: usize = 3;

pub struct Active {
    cfg: Arc<Config>,
    quorum: QuorumHandle,
    decide_lock: tokio::sync::Mutex<()>,
    liveness: Mutex<Liveness>,
}

#[derive(Default)]
struct Liveness {
    /// Term in which this voter last became the leader, and when it noticed.
    leader_since: Option<(u64, Instant)>,
    last_heartbeat: HashMap<BrokerId, Instant>,
    /// Internal topics whose creation failed, said once per controller term.
    internal_topics_warned: std::collections::HashSet<String>,
    /// When preferred leaders were last checked (`auto.leader.rebalance.enable`).
    last_rebalance_check: Option<Instant>,
}

impl Active {
    pub fn new(cfg: Arc<Config>, quorum: QuorumHandle) -> Arc<Active> {
        Arc::new(Active {
            cfg,
            quorum,
            decide_lock: tokio::sync::Mutex::new(()),
            liveness: Mutex::new(Liveness::default()),
        })
    }

    /// Installs this as the quorum's answerer of broker requests and starts the liveness
    /// checks on the quorum's runtime.
    pub fn install(self: &Arc<Self>) {
        let me = self.clone();
        self.quorum.set_service(Arc::new(move |from, body| {
            let me = me.clone();
            Box::pin(async move {
                let resp = match serde_json::from_value::<Request>(body) {
                    Ok(req) => me.serve(from, req).await,
                    Err(e) => Response::Unavailable(format!("unreadable request: {e}")),
                };
                serde_json::to_value(resp).unwrap_or_default()
            })
        }));
        let me = self.clone();
        self.quorum
            .runtime()
            .spawn(async move { me.tick_loop().await });
    }

    fn leader_check(&self) -> Result<(), Response> {
        let status = self.quorum.status();
        if status.is_leader() {
            Ok(())
        } else {
            Err(Response::NotController {
                leader: status.leader,
            })
        }
    }

    async fn serve(&self, from: u64, req: Request) -> Response {
        if let Err(r) = self.leader_check() {
            return r;
        }
        match req {
            Request::Register {
                node_id,
                host,
                port,
                rack,
                incarnation,
            } => {
                if node_id as u64 != from {
                    return Response::Unavailable(format!(
                        "node {from} registered as node {node_id}"
                    ));
                }
                let _g = self.decide_lock.lock().await;
                let image = self.quorum.image();
                if let Some(b) = image.brokers.get(&node_id) {
                    if b.incarnation == incarnation && b.host == host && b.port == port {
                        self.heard(node_id);
                        return Response::Registered { epoch: b.epoch };
                    }
                }
                let record = MetadataRecord::RegisterBroker {
                    node_id,
                    host,
                    port,
                    rack,
                    incarnation,
                };
                match self.quorum.submit(vec![record]).await {
                    Ok(c) => {
                        self.heard(node_id);
                        tracing::info!(node = node_id, epoch = c.log_index, "broker registered");
                        Response::Registered { epoch: c.log_index }
                    }
                    Err(e) => unavailable(e),
                }
            }
            Request::Heartbeat {
                node_id,
                epoch,
                applied_version,
                want_shutdown,
            } => {
                let image = self.quorum.image();
                match image.brokers.get(&node_id) {
                    Some(b) if b.epoch == epoch => {}
                    _ => return Response::UnknownBroker,
                }
                self.heard(node_id);
                let fenced = image.brokers[&node_id].fenced;
                let change = if want_shutdown && !fenced {
                    Some(true)
                } else if !want_shutdown && fenced && applied_version >= epoch {
                    Some(false)
                } else {
                    None
                };
                if let Some(fence) = change {
                    if let Err(e) = self.set_fenced(node_id, epoch, fence).await {
                        return unavailable(e);
                    }
                }
                let image = self.quorum.image();
                let fenced = image.brokers.get(&node_id).is_none_or(|b| b.fenced);
                Response::Beat {
                    fenced,
                    version: image.version,
                    controller: self.quorum.node_id(),
                    shutdown_ready: want_shutdown && fenced && leads_nothing(&image, node_id),
                }
            }
            Request::Control(op) => self.control(op).await,
            Request::ProducerIds { node_id } => {
                let _g = self.decide_lock.lock().await;
                let start = self.quorum.image().producer_id_block_end;
                let end = start + PRODUCER_ID_BLOCK;
                match self
                    .quorum
                    .submit(vec![MetadataRecord::ProducerIdBlock { node_id, end }])
                    .await
                {
                    Ok(_) => Response::ProducerIds { start, end },
                    Err(e) => unavailable(e),
                }
            }
            Request::GetImage => Response::Image((*self.quorum.image()).clone()),
        }
    }

    fn heard(&self, node: BrokerId) {
        let mut l = self.liveness.lock().expect("liveness lock");
        l.last_heartbeat.insert(node, Instant::now());
    }

    /// Fences or unfences a broker (moving leaderships as `decide` says), if its registration
    /// is still `epoch` and the change is still needed.
    async fn set_fenced(&self, node: BrokerId, epoch: u64, fence: bool) -> Result<(), SubmitError> {
        let _g = self.decide_lock.lock().await;
        let image = self.quorum.image();
        let Some(b) = image.brokers.get(&node) else {
            return Ok(());
        };
        if b.epoch != epoch || b.fenced == fence {
            return Ok(());
        }
        let records = if fence {
            decide::fence_broker(&image, node)
        } else {
            decide::unfence_broker(&image, node)
        };
        if records.is_empty() {
            return Ok(());
        }
        self.quorum.submit(records).await?;
        tracing::info!(node, "broker {}", if fence { "fenced" } else { "unfenced" });
        Ok(())
    }

    async fn control(&self, op: ControlOp) -> Response {
        let _g = self.decide_lock.lock().await;
        let image = self.quorum.image();
        let mut rng = decide::Rng::new(rand_seed());
        let (answers, records) = match &op {
            ControlOp::CreateTopics(topics, validate_only) => {
                decide::create_topics(&image, &self.cfg, topics, *validate_only, &mut rng)
            }
            ControlOp::DeleteTopics(names) => decide::delete_topics(&image, names),
            ControlOp::CreatePartitions(list, validate_only) => {
                decide::create_partitions(&image, &self.cfg, list, *validate_only, &mut rng)
            }
            ControlOp::AlterTopicConfigs(edits, validate_only) => {
                decide::alter_topic_configs(&image, &self.cfg, edits, *validate_only)
            }
            ControlOp::AlterBrokerConfigs(edits, validate_only) => {
                decide::alter_broker_configs(&image, edits, *validate_only)
            }
            ControlOp::AlterReassignments(list) => decide::alter_reassignments(&image, list),
            ControlOp::UnregisterBroker(id) => decide::unregister_broker(&image, *id),
            ControlOp::ElectLeaders(list, preferred) => {
                decide::elect_leaders(&image, list, *preferred)
            }
            ControlOp::AlterPartition {
                topic,
                partition,
                leader,
                leader_epoch,
                partition_epoch,
                isr,
            } => decide::alter_partition(
                &image,
                topic,
                *partition,
                *leader,
                *leader_epoch,
                *partition_epoch,
                isr,
            ),
        };
        if records.is_empty() {
            return Response::Control {
                answers,
                version: image.version,
            };
        }
        match self.quorum.submit(records).await {
            Ok(c) => Response::Control {
                answers,
                version: c.log_index,
            },
            Err(e) => {
                let why = format!("The controller could not commit the change: {e}");
                Response::Control {
                    answers: answers
                        .into_iter()
                        .map(|a| a.and(Err(TopicError::InvalidRequest(why.clone()))))
                        .collect(),
                    version: image.version,
                }
            }
        }
    }

    async fn tick_loop(self: Arc<Self>) {
        let every = Duration::from_millis(
            (self.cfg.cluster.heartbeat_interval_ms / 2).clamp(10, TICK_MS_MAX),
        );
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.tick().await {
                tracing::warn!("controller tick: {e}");
            }
        }
    }

    /// Fences brokers whose session expired; creates `__consumer_offsets` once enough brokers
    /// are up.
    async fn tick(&self) -> Result<(), SubmitError> {
        let status = self.quorum.status();
        let now = Instant::now();
        let expired: Vec<(BrokerId, u64)> = {
            let mut l = self.liveness.lock().expect("liveness lock");
            if !status.is_leader() {
                l.leader_since = None;
                l.last_heartbeat.clear();
                return Ok(());
            }
            if l.leader_since.is_none_or(|(term, _)| term != status.term) {
                l.leader_since = Some((status.term, now));
                l.last_heartbeat.clear();
                l.internal_topics_warned.clear();
                l.last_rebalance_check = None;
                tracing::info!(term = status.term, "this node is the active controller");
            }
            let since = l.leader_since.expect("set above").1;
            let timeout = Duration::from_millis(self.cfg.cluster.session_timeout_ms);
            self.quorum
                .image()
                .brokers
                .values()
                .filter(|b| !b.fenced)
                .filter(|b| {
                    let last = l.last_heartbeat.get(&b.node_id).copied().unwrap_or(since);
                    now.duration_since(last) > timeout
                })
                .map(|b| (b.node_id, b.epoch))
                .collect()
        };
        for (node, epoch) in expired {
            tracing::warn!(
                node,
                "broker missed its session timeout ({} ms): fencing it",
                self.cfg.cluster.session_timeout_ms
            );
            self.set_fenced(node, epoch, true).await?;
        }
        self.ensure_internal_topics().await?;
        self.rebalance_leaders().await
    }

    /// `auto.leader.rebalance.enable`: every `leader.imbalance.check.interval.seconds`, moves
    /// leaderships back to preferred replicas that are live and in sync.
    async fn rebalance_leaders(&self) -> Result<(), SubmitError> {
        if !self.cfg.cluster.auto_leader_rebalance {
            return Ok(());
        }
        let every = Duration::from_secs(self.cfg.cluster.leader_imbalance_check_interval_s);
        {
            let mut l = self.liveness.lock().expect("liveness lock");
            let now = Instant::now();
            match l.last_rebalance_check {
                Some(t) if now.duration_since(t) < every => return Ok(()),
                None => {
                    // A new controller waits one interval before its first check.
                    l.last_rebalance_check = Some(now);
                    return Ok(());
                }
                _ => l.last_rebalance_check = Some(now),
            }
        }
        let _g = self.decide_lock.lock().await;
        // A pass elects at most MAX_ELECTIONS_PER_BALANCE; a full pass is followed by another
        // at once, up to the number of partitions there are.
        let total: usize = self
            .quorum
            .image()
            .topics
            .values()
            .map(|t| t.partitions.len())
            .sum();
        for _ in 0..=total / decide::MAX_ELECTIONS_PER_BALANCE {
            let image = self.quorum.image();
            let list = decide::leader_imbalance(&image);
            let (_, records) = decide::elect_leaders(&image, &list, true);
            if records.is_empty() {
                break;
            }
            tracing::info!(
                partitions = records.len(),
                "moving leaderships back to preferred replicas"
            );
            self.quorum.submit(records).await?;
            if list.len() < decide::MAX_ELECTIONS_PER_BALANCE {
                break;
            }
        }
        Ok(())
    }

    /// Creates the internal topics (`__consumer_offsets`, `__transaction_state`) once enough
    /// brokers registered.
    async fn ensure_internal_topics(&self) -> Result<(), SubmitError> {
        for name in [crate::group::OFFSETS_TOPIC, crate::txn::TXN_TOPIC] {
            self.ensure_internal_topic(name).await?;
        }
        Ok(())
    }

    async fn ensure_internal_topic(&self, name: &str) -> Result<(), SubmitError> {
        let image = self.quorum.image();
        if image.topics.contains_key(name) {
            return Ok(());
        }
        // RF min(3, registered brokers), once three have registered or every broker had a
        // session timeout since this controller's election to register.
        let registered = image.brokers.len();
        let settled = {
            let l = self.liveness.lock().expect("liveness lock");
            l.leader_since.is_some_and(|(_, since)| {
                since.elapsed() > Duration::from_millis(self.cfg.cluster.session_timeout_ms)
            })
        };
        if registered == 0 || (registered < OFFSETS_TOPIC_RF_MAX && !settled) {
            return Ok(());
        }
        let live = image.brokers.values().filter(|b| !b.fenced).count();
        let wanted = registered.min(OFFSETS_TOPIC_RF_MAX);
        if live < wanted {
            return Ok(());
        }
        let _g = self.decide_lock.lock().await;
        let image = self.quorum.image();
        if image.topics.contains_key(name) {
            return Ok(());
        }
        let topic = internal_topic(&self.cfg, name, wanted);
        let (answers, records) = decide::create_topics(
            &image,
            &self.cfg,
            &[topic],
            false,
            &mut decide::Rng::new(rand_seed()),
        );
        if let Some(Err(e)) = answers.first() {
            // Checked every tick: said once per controller term.
            let mut l = self.liveness.lock().expect("liveness lock");
            if l.internal_topics_warned.insert(name.to_string()) {
                tracing::warn!("cannot create {name}: {}", e.message());
            }
            return Ok(());
        }
        if !records.is_empty() {
            self.quorum.submit(records).await?;
            tracing::info!(rf = wanted, "created {name}");
        }
        Ok(())
    }
}

/// An internal topic (`__consumer_offsets`, `__transaction_state`) as the single node creates
/// it: never deleted by retention.
pub fn internal_topic(cfg: &Config, name: &str, rf: usize) -> NewTopic {
    let mut configs = BTreeMap::new();
    configs.insert("retention.ms".to_string(), "-1".to_string());
    let segment_bytes = if name == crate::txn::TXN_TOPIC {
        cfg.txn.segment_bytes
    } else {
        cfg.group.offsets_segment_bytes
    };
    configs.insert("segment.bytes".to_string(), segment_bytes.to_string());
    // Compacted: the cleaner keeps the latest record per key (offsets, groups, transactions).
    configs.insert("cleanup.policy".to_string(), "compact".to_string());
    NewTopic {
        name: name.to_string(),
        num_partitions: if name == crate::txn::TXN_TOPIC {
            cfg.txn.partitions
        } else {
            cfg.group.offsets_partitions
        },
        replication_factor: rf as i16,
        configs,
        assignments: Vec::new(),
    }
}

fn leads_nothing(image: &ClusterImage, node: BrokerId) -> bool {
    image.topics.values().all(|t| {
        t.partitions
            .iter()
            .all(|p| p.leader != node || p.isr == [node])
    })
}

fn unavailable(e: SubmitError) -> Response {
    match e {
        SubmitError::NotLeader { leader, .. } => Response::NotController { leader },
        e => Response::Unavailable(e.to_string()),
    }
}

fn rand_seed() -> u64 {
    let u = uuid::Uuid::new_v4().as_u128();
    (u as u64) ^ ((u >> 64) as u64)
}
