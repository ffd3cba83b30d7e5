//! The group coordinator: Kafka's classic consumer-group protocol.
//!
//! The coordinator of a group is the shard owning partition `hash(group) % 50` of the internal
//! topic `__consumer_offsets`; every request about that group is handed to that shard, which
//! keeps the group's state in memory and writes commits and group metadata to that partition
//! (acks=all, so an acknowledged commit survives a crash). On start each shard replays its
//! partitions of the topic; requests for groups still loading get COORDINATOR_LOAD_IN_PROGRESS.
//!
//! States: Empty -> PreparingRebalance -> CompletingRebalance -> Stable, and Dead (deleted).
//! The broker never interprets assignments: it picks a protocol every member supports (by
//! vote), hands the leader every member's metadata, and hands each member the assignment the
//! leader chose, so eager and cooperative assignors both work.

pub mod consumer;
pub mod records;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::{JoinGroupResponse, SyncGroupResponse};
use kafka_protocol::protocol::StrBytes;

use crate::kafka::errors::*;
use crate::shard::Shard;
use crate::storage::log::now_ms;
use records::{GroupValue, Key, MemberValue, OffsetValue};

pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Members per group; JoinGroup beyond it answers GROUP_MAX_SIZE_REACHED.
pub const MEMBERS_PER_GROUP_MAX: usize = 1000;
/// Bytes of protocol metadata per member (subscriptions are small; this bounds memory).
pub const MEMBER_METADATA_BYTES_MAX: usize = 1 << 20;
/// Groups per shard.
pub const GROUPS_PER_SHARD_MAX: usize = 100_000;
const TICK: Duration = Duration::from_millis(100);
/// A failing write of Empty groups is retried every tick but reported at most this often.
const EMPTY_RETRY_WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
            State::Dead => "Dead",
        }
    }
}

pub struct Member {
    pub id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocols: Vec<(String, Bytes)>,
    pub assignment: Bytes,
    join_waiter: Option<(oneshot::Sender<JoinGroupResponse>, i16)>,
    sync_waiter: Option<(oneshot::Sender<SyncGroupResponse>, i16)>,
    last_seen: Instant,
}

impl Member {
    pub fn metadata_for(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

pub struct Group {
    pub id: String,
    pub state: State,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub generation: i32,
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, until they join or expire.
    pending: HashMap<String, Instant>,
    /// group.instance.id -> member id of static members.
    pub static_members: HashMap<String, String>,
    pub offsets: HashMap<(String, i32), OffsetValue>,
    /// Offsets committed inside open transactions (TxnOffsetCommit), by producer id: they
    /// become `offsets` at the transaction's COMMIT marker, or vanish at its ABORT.
    pub pending_txn: HashMap<i64, HashMap<(String, i32), OffsetValue>>,
    /// PreparingRebalance: when members that have not rejoined are dropped.
    rebalance_deadline: Instant,
    /// PreparingRebalance from Empty: the join completes no earlier than this
    /// (group.initial.rebalance.delay.ms), so members starting together share a generation.
    join_not_before: Instant,
    /// CompletingRebalance: the leader must sync by then.
    sync_deadline: Instant,
    state_timestamp: i64,
    /// __consumer_offsets partition this group lives in.
    pub partition: i32,
    /// The group became Empty by losing its members and that is not yet written to
    /// `__consumer_offsets`: until it is, a restart would bring the departed members back
    /// (Stable), and the next member would wait a whole session timeout for them.
    empty_unpersisted: bool,
    /// Set for a group of the KIP-848 consumer protocol (its members, epochs and assignments);
    /// such a group has no classic members.
    pub consumer: Option<Box<consumer::ConsumerGroup>>,
}

impl Group {
    fn new(id: &str, partition: i32) -> Group {
        let now = Instant::now();
        Group {
            id: id.to_string(),
            state: State::Empty,
            protocol_type: None,
            protocol: None,
            generation: 0,
            leader: None,
            members: BTreeMap::new(),
            pending: HashMap::new(),
            static_members: HashMap::new(),
            offsets: HashMap::new(),
            pending_txn: HashMap::new(),
            rebalance_deadline: now,
            join_not_before: now,
            sync_deadline: now,
            state_timestamp: now_ms(),
            partition,
            empty_unpersisted: false,
            consumer: None,
        }
    }

    /// The last member is gone: a new generation with no protocol and no leader, as Kafka's
    /// onCompleteJoin does for an empty group, to be persisted before anyone is answered.
    fn become_empty(&mut self) {
        assert!(
            self.members.is_empty(),
            "only a group without members is Empty"
        );
        self.generation += 1;
        self.protocol = None;
        self.leader = None;
        self.set_state(State::Empty);
        self.empty_unpersisted = true;
    }

    /// The group-metadata record of the now-Empty group if it still has to be written (and
    /// marks it written; `unpersisted_again` undoes that when the write fails).
    fn take_empty_record(&mut self) -> Option<OffsetsRecord> {
        // A group that became a consumer-protocol group meanwhile writes its own records: a
        // classic record after them would turn it back into a classic group on replay.
        if !std::mem::take(&mut self.empty_unpersisted)
            || self.state != State::Empty
            || self.consumer.is_some()
        {
            return None;
        }
        Some((
            records::group_key(&self.id),
            Some(records::group_value(&self.value())),
        ))
    }

    fn set_state(&mut self, s: State) {
        self.state = s;
        self.state_timestamp = now_ms();
    }

    fn supports(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if self.members.is_empty() {
            return true;
        }
        if self.protocol_type.as_deref() != Some(protocol_type) {
            return false;
        }
        // Some protocol must stay common to all members.
        protocols.iter().any(|(p, _)| {
            self.members
                .values()
                .all(|m| m.protocols.iter().any(|(q, _)| q == p))
        })
    }

    /// Picks the protocol by vote: each member votes for its most preferred protocol among
    /// those every member supports.
    fn select_protocol(&self) -> Option<String> {
        let candidates: Vec<&String> = self
            .members
            .values()
            .next()?
            .protocols
            .iter()
            .map(|(p, _)| p)
            .filter(|p| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(q, _)| q == *p))
            })
            .collect();
        let mut votes: BTreeMap<&String, usize> = BTreeMap::new();
        for m in self.members.values() {
            if let Some((p, _)) = m.protocols.iter().find(|(p, _)| candidates.contains(&p)) {
                *votes.entry(p).or_default() += 1;
            }
        }
        // Highest vote; ties go to the first member's preference order.
        candidates
            .iter()
            .max_by_key(|p| {
                (
                    votes.get(*p).copied().unwrap_or(0),
                    std::cmp::Reverse(candidates.iter().position(|c| c == *p)),
                )
            })
            .map(|p| (*p).clone())
    }

    fn value(&self) -> GroupValue {
        let protocol = self.protocol.clone();
        GroupValue {
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            generation: self.generation,
            protocol: protocol.clone(),
            leader: self.leader.clone(),
            state_timestamp: self.state_timestamp,
            members: self
                .members
                .values()
                .map(|m| MemberValue {
                    member_id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    rebalance_timeout_ms: m.rebalance_timeout_ms,
                    session_timeout_ms: m.session_timeout_ms,
                    subscription: protocol
                        .as_deref()
                        .map(|p| m.metadata_for(p))
                        .unwrap_or_default(),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        }
    }

    fn remove_member(&mut self, id: &str) -> Option<Member> {
        let m = self.members.remove(id)?;
        if let Some(i) = &m.instance_id {
            if self.static_members.get(i).map(|x| x.as_str()) == Some(id) {
                self.static_members.remove(i);
            }
        }
        if self.leader.as_deref() == Some(id) {
            self.leader = self.members.keys().next().cloned();
        }
        Some(m)
    }
}

/// Group-coordinator settings, from the broker config.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub offsets_partitions: i32,
    /// `offsets.topic.segment.bytes`
    pub offsets_segment_bytes: u64,
    pub min_session_timeout_ms: i32,
    pub max_session_timeout_ms: i32,
    pub initial_rebalance_delay_ms: u64,
    pub offsets_retention_ms: i64,
    /// How often expired offsets are looked for (Kafka's offsets.retention.check.interval.ms).
    pub offsets_retention_check_ms: u64,
    pub offset_metadata_bytes_max: usize,
    /// `group.consumer.heartbeat.interval.ms` (KIP-848 groups).
    pub consumer_heartbeat_interval_ms: i32,
    /// `group.consumer.session.timeout.ms` (KIP-848 groups).
    pub consumer_session_timeout_ms: i32,
    /// `group.consumer.max.size`: members per KIP-848 group (at most MEMBERS_PER_GROUP_MAX).
    pub consumer_max_size: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            offsets_partitions: 50,
            offsets_segment_bytes: 104_857_600,
            min_session_timeout_ms: 6_000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 3_000,
            offsets_retention_ms: 7 * 24 * 3600 * 1000,
            offsets_retention_check_ms: 600_000,
            offset_metadata_bytes_max: 4096,
            consumer_heartbeat_interval_ms: 5_000,
            consumer_session_timeout_ms: 45_000,
            consumer_max_size: MEMBERS_PER_GROUP_MAX,
        }
    }
}

/// One shard's share of the coordinator.
#[derive(Default)]
pub struct Coordinator {
    pub groups: RefCell<HashMap<String, Group>>,
    /// __consumer_offsets partitions of this shard still being replayed.
    pub loading: RefCell<HashSet<i32>>,
}

pub enum Lookup {
    Ok,
    Loading,
}

impl Coordinator {
    pub fn check_loaded(&self, partition: i32) -> Lookup {
        if self.loading.borrow().contains(&partition) {
            Lookup::Loading
        } else {
            Lookup::Ok
        }
    }

    /// Kafka's member id form: client id, a dash, a UUID.
    pub fn new_member_id(&self, client_id: &str) -> String {
        format!(
            "{}-{}",
            if client_id.is_empty() {
                "member"
            } else {
                client_id
            },
            uuid::Uuid::new_v4()
        )
    }
}

// ---- persistence ----

/// One record for `__consumer_offsets`: key and value (None: tombstone).
pub type OffsetsRecord = (Bytes, Option<Bytes>);

/// Appends records to this shard's `__consumer_offsets` partition and waits for the fsync.
pub async fn persist(s: &Rc<Shard>, partition: i32, recs: Vec<OffsetsRecord>) -> Result<(), i16> {
    s.persist_records(OFFSETS_TOPIC, partition, recs, None)
        .await
}

/// Replays one `__consumer_offsets` partition into the coordinator. Bounded by the log end.
pub async fn load_partition(s: &Rc<Shard>, partition: i32) {
    if let Some(p) = s.partition(OFFSETS_TOPIC, partition) {
        let loaded = s
            .replay_records(&p, |rec| {
                if rec.control {
                    // A transaction marker: type 1 commits, 0 aborts (key: i16 version, i16 type).
                    let commit = rec.key.as_ref().is_some_and(|k| k.len() >= 4 && k[3] == 1);
                    complete_txn_offsets(s, partition, rec.producer_id, commit);
                } else if rec.transactional {
                    apply_txn_offset(s, partition, rec.producer_id, rec.key, rec.value);
                } else {
                    apply_record(s, partition, rec.key, rec.value);
                }
            })
            .await;
        tracing::debug!(
            partition,
            records = loaded,
            "loaded __consumer_offsets partition"
        );
    }
    s.groups.loading.borrow_mut().remove(&partition);
}

/// Records offsets committed inside producer `pid`'s transaction (TxnOffsetCommit), durable in
/// `__consumer_offsets` partition `partition` as a transactional batch. They stay pending until
/// the transaction's marker.
pub async fn txn_offset_commit(
    s: &Rc<Shard>,
    partition: i32,
    group: &str,
    pid: i64,
    epoch: i16,
    offsets: Vec<(String, i32, OffsetValue)>,
) -> Result<(), i16> {
    let recs: Vec<OffsetsRecord> = offsets
        .iter()
        .map(|(t, p, v)| {
            (
                records::offset_key(group, t, *p),
                Some(records::offset_value(v)),
            )
        })
        .collect();
    s.persist_records(OFFSETS_TOPIC, partition, recs, Some((pid, epoch)))
        .await?;
    let mut groups = s.groups.groups.borrow_mut();
    let g = groups
        .entry(group.to_string())
        .or_insert_with(|| Group::new(group, partition));
    let pending = g.pending_txn.entry(pid).or_default();
    for (t, p, v) in offsets {
        pending.insert((t, p), v);
    }
    Ok(())
}

fn apply_txn_offset(
    s: &Rc<Shard>,
    partition: i32,
    pid: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
) {
    let Some(Key::Offset {
        group,
        topic,
        partition: p,
    }) = key.and_then(records::decode_key)
    else {
        return;
    };
    let Some(v) = value.and_then(records::decode_offset_value) else {
        return;
    };
    s.groups
        .groups
        .borrow_mut()
        .entry(group.clone())
        .or_insert_with(|| Group::new(&group, partition))
        .pending_txn
        .entry(pid)
        .or_default()
        .insert((topic, p), v);
}

/// Producer `pid`'s transaction ended with a marker in `__consumer_offsets` partition
/// `partition`: its pending offsets there become the groups' offsets (commit) or are dropped.
pub fn complete_txn_offsets(s: &Rc<Shard>, partition: i32, pid: i64, commit: bool) {
    let mut groups = s.groups.groups.borrow_mut();
    for g in groups.values_mut().filter(|g| g.partition == partition) {
        if let Some(pending) = g.pending_txn.remove(&pid) {
            if commit {
                g.offsets.extend(pending);
            }
        }
    }
}

/// Whether an open transaction holds an offset commit for (topic, partition) of `group`
/// (OffsetFetch with require_stable answers UNSTABLE_OFFSET_COMMIT then).
pub fn has_pending_txn_offset(s: &Shard, group: &str, topic: &str, partition: i32) -> bool {
    s.groups.groups.borrow().get(group).is_some_and(|g| {
        g.pending_txn
            .values()
            .any(|m| m.contains_key(&(topic.to_string(), partition)))
    })
}

fn apply_record(s: &Rc<Shard>, partition: i32, key: Option<Bytes>, value: Option<Bytes>) {
    let mut groups = s.groups.groups.borrow_mut();
    if let Some(k) = key.as_ref().filter(|k| consumer::is_consumer_key(k)) {
        consumer::apply_record(&mut groups, partition, k.clone(), value);
        return;
    }
    let Some(key) = key.and_then(records::decode_key) else {
        return;
    };
    match key {
        Key::Offset {
            group,
            topic,
            partition: p,
        } => match value.and_then(records::decode_offset_value) {
            Some(v) => {
                groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(&group, partition))
                    .offsets
                    .insert((topic, p), v);
            }
            None => {
                if let Some(g) = groups.get_mut(&group) {
                    g.offsets.remove(&(topic, p));
                }
            }
        },
        Key::Group { group } => match value.and_then(records::decode_group_value) {
            Some(v) => {
                let g = groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(&group, partition));
                // A classic group record after consumer-protocol records: the group changed type.
                g.consumer = None;
                g.protocol_type = (!v.protocol_type.is_empty()).then_some(v.protocol_type);
                g.generation = v.generation;
                g.protocol = v.protocol.clone();
                g.leader = v.leader;
                g.members.clear();
                g.static_members.clear();
                let now = Instant::now();
                for m in v.members {
                    if let Some(i) = &m.instance_id {
                        g.static_members.insert(i.clone(), m.member_id.clone());
                    }
                    let protocols = v
                        .protocol
                        .iter()
                        .map(|p| (p.clone(), m.subscription.clone()))
                        .collect();
                    g.members.insert(
                        m.member_id.clone(),
                        Member {
                            id: m.member_id,
                            instance_id: m.instance_id,
                            client_id: m.client_id,
                            client_host: m.client_host,
                            session_timeout_ms: m.session_timeout_ms,
                            rebalance_timeout_ms: m.rebalance_timeout_ms,
                            protocols,
                            assignment: m.assignment,
                            join_waiter: None,
                            sync_waiter: None,
                            last_seen: now,
                        },
                    );
                }
                let st = if g.members.is_empty() {
                    State::Empty
                } else {
                    State::Stable
                };
                g.set_state(st);
            }
            None => {
                if let Some(g) = groups.get_mut(&group).filter(|g| g.consumer.is_none()) {
                    g.members.clear();
                    g.static_members.clear();
                    g.set_state(State::Empty);
                    if g.offsets.is_empty() {
                        groups.remove(&group);
                    }
                }
            }
        },
    }
}

// ---- the state machine ----

pub struct JoinArgs {
    pub group: String,
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    pub version: i16,
}

fn join_error(code: i16, member_id: &str) -> JoinGroupResponse {
    JoinGroupResponse::default()
        .with_error_code(code)
        .with_generation_id(-1)
        .with_member_id(StrBytes::from_string(member_id.to_string()))
        .with_protocol_name(Some(StrBytes::from_static_str("")))
}

/// The JoinGroup answer for `member` in the group's current generation.
fn join_response(g: &Group, member: &str, version: i16) -> JoinGroupResponse {
    let protocol = g.protocol.clone().unwrap_or_default();
    let mut r = JoinGroupResponse::default()
        .with_generation_id(g.generation)
        .with_protocol_name(Some(StrBytes::from_string(protocol.clone())))
        .with_leader(StrBytes::from_string(g.leader.clone().unwrap_or_default()))
        .with_member_id(StrBytes::from_string(member.to_string()));
    if version >= 7 {
        r.protocol_type = g.protocol_type.clone().map(StrBytes::from_string);
    }
    if g.leader.as_deref() == Some(member) {
        r.members = g
            .members
            .values()
            .map(|m| {
                let mut x = JoinGroupResponseMember::default()
                    .with_member_id(StrBytes::from_string(m.id.clone()))
                    .with_metadata(m.metadata_for(&protocol));
                if version >= 5 {
                    x.group_instance_id = m.instance_id.clone().map(StrBytes::from_string);
                }
                x
            })
            .collect();
    }
    r
}

fn sync_response(g: &Group, code: i16, assignment: Bytes, version: i16) -> SyncGroupResponse {
    let mut r = SyncGroupResponse::default()
        .with_error_code(code)
        .with_assignment(assignment);
    if version >= 5 {
        r.protocol_type = g.protocol_type.clone().map(StrBytes::from_string);
        r.protocol_name = g.protocol.clone().map(StrBytes::from_string);
    }
    r
}

fn max_rebalance_timeout(g: &Group) -> Duration {
    Duration::from_millis(
        g.members
            .values()
            .map(|m| m.rebalance_timeout_ms.max(0) as u64)
            .max()
            .unwrap_or(0),
    )
}

fn prepare_rebalance(g: &mut Group, initial_delay_ms: u64) {
    if g.state == State::CompletingRebalance {
        // Members waiting for their assignment must rejoin.
        for m in g.members.values_mut() {
            if let Some((tx, v)) = m.sync_waiter.take() {
                let _ = tx.send(sync_response_plain(REBALANCE_IN_PROGRESS, v));
            }
        }
    }
    let now = Instant::now();
    if g.state == State::Empty {
        g.join_not_before = now + Duration::from_millis(initial_delay_ms);
    }
    if g.state != State::PreparingRebalance {
        g.rebalance_deadline = now + max_rebalance_timeout(g);
        g.set_state(State::PreparingRebalance);
    }
}

fn sync_response_plain(code: i16, _version: i16) -> SyncGroupResponse {
    SyncGroupResponse::default().with_error_code(code)
}

/// Completes the join phase when every member has rejoined (and any initial delay passed),
/// or when `force` (the rebalance deadline): members that did not rejoin are dropped.
fn maybe_complete_join(g: &mut Group, force: bool) {
    if g.state != State::PreparingRebalance {
        return;
    }
    let all_joined = g.members.values().all(|m| m.join_waiter.is_some());
    // With nobody left there is no one to wait for: the group becomes Empty at once.
    let waited = g.members.is_empty() || Instant::now() >= g.join_not_before;
    let ready = force || (all_joined && waited);
    if !ready {
        return;
    }
    let gone: Vec<String> = g
        .members
        .values()
        .filter(|m| m.join_waiter.is_none())
        .map(|m| m.id.clone())
        .collect();
    for id in gone {
        tracing::info!(group = %g.id, member = %id, "member did not rejoin in time; removed");
        g.remove_member(&id);
    }
    if g.members.is_empty() {
        g.become_empty();
        return;
    }
    g.generation += 1;
    g.protocol = g.select_protocol();
    if g.leader.as_ref().is_none_or(|l| !g.members.contains_key(l)) {
        g.leader = g.members.keys().next().cloned();
    }
    g.set_state(State::CompletingRebalance);
    g.sync_deadline = Instant::now() + max_rebalance_timeout(g);
    let waiters: Vec<(String, oneshot::Sender<JoinGroupResponse>, i16)> = g
        .members
        .values_mut()
        .filter_map(|m| m.join_waiter.take().map(|(tx, v)| (m.id.clone(), tx, v)))
        .collect();
    for (id, tx, v) in waiters {
        let _ = tx.send(join_response(g, &id, v));
    }
    tracing::info!(group = %g.id, generation = g.generation, members = g.members.len(), protocol = ?g.protocol, "rebalance: join complete");
}

enum JoinOutcome {
    Wait(oneshot::Receiver<JoinGroupResponse>),
    Persist(JoinGroupResponse, GroupValue, i32),
}

impl Shard {
    pub async fn group_join(self: &Rc<Self>, a: JoinArgs, partition: i32) -> JoinGroupResponse {
        let cfg = self.config.group.clone();
        if a.group.is_empty() {
            return join_error(INVALID_GROUP_ID, &a.member_id);
        }
        if a.session_timeout_ms < cfg.min_session_timeout_ms
            || a.session_timeout_ms > cfg.max_session_timeout_ms
        {
            return join_error(INVALID_SESSION_TIMEOUT, &a.member_id);
        }
        if a.protocols.is_empty() || a.protocol_type.is_empty() {
            return join_error(INCONSISTENT_GROUP_PROTOCOL, &a.member_id);
        }
        if a.protocols.iter().map(|(_, m)| m.len()).sum::<usize>() > MEMBER_METADATA_BYTES_MAX {
            return join_error(INVALID_REQUEST, &a.member_id);
        }
        let outcome = 'join: {
            let mut groups = self.groups.groups.borrow_mut();
            if !groups.contains_key(&a.group) {
                if !a.member_id.is_empty() {
                    return join_error(UNKNOWN_MEMBER_ID, &a.member_id);
                }
                if groups.len() >= GROUPS_PER_SHARD_MAX {
                    return join_error(COORDINATOR_NOT_AVAILABLE, &a.member_id);
                }
                groups.insert(a.group.clone(), Group::new(&a.group, partition));
            }
            let g = groups.get_mut(&a.group).expect("inserted above");
            if g.state == State::Dead {
                return join_error(COORDINATOR_NOT_AVAILABLE, &a.member_id);
            }
            if let Some(cg) = &g.consumer {
                if !cg.members.is_empty() {
                    // Kafka would let a classic member join a consumer group (online
                    // migration); Weir does not.
                    return join_error(INCONSISTENT_GROUP_PROTOCOL, &a.member_id);
                }
                // An empty consumer group becomes a classic group; its group record written
                // at the end of this rebalance supersedes the consumer records on replay.
                g.consumer = None;
                g.protocol_type = None;
            }
            if !g.supports(&a.protocol_type, &a.protocols) {
                return join_error(INCONSISTENT_GROUP_PROTOCOL, &a.member_id);
            }
            let now = Instant::now();
            let mut member_id = a.member_id.clone();
            let mut is_new = false;
            if member_id.is_empty() {
                let new_id = self.groups.new_member_id(&a.client_id);
                if let Some(inst) = &a.instance_id {
                    if let Some(old) = g.static_members.get(inst).cloned() {
                        // A static member came back with a new member id: it replaces the old
                        // one (fencing it) and keeps its assignment.
                        if let Some(mut m) = g.members.remove(&old) {
                            if let Some((tx, _)) = m.join_waiter.take() {
                                let _ = tx.send(join_error(FENCED_INSTANCE_ID, &old));
                            }
                            if let Some((tx, v)) = m.sync_waiter.take() {
                                let _ = tx.send(sync_response_plain(FENCED_INSTANCE_ID, v));
                            }
                            let unchanged = m.protocols == a.protocols;
                            m.id = new_id.clone();
                            m.last_seen = now;
                            m.session_timeout_ms = a.session_timeout_ms;
                            m.rebalance_timeout_ms = a.rebalance_timeout_ms;
                            m.protocols = a.protocols.clone();
                            g.members.insert(new_id.clone(), m);
                            g.static_members.insert(inst.clone(), new_id.clone());
                            let was_leader = g.leader.as_deref() == Some(old.as_str());
                            if was_leader {
                                g.leader = Some(new_id.clone());
                            }
                            if g.state == State::Stable && unchanged {
                                // As Kafka: no rebalance; the new member id is persisted so the
                                // instance is not fenced after a broker restart. A rejoining
                                // leader must not assign again (its SyncGroup is answered with
                                // its current assignment anyway): from v9 it gets the members
                                // with `skip_assignment` (KIP-814), so it can still watch their
                                // subscriptions; before v9, as Kafka, it gets no members and
                                // the leader id it had, which is not its new member id, so it
                                // does not act as the leader.
                                tracing::info!(group = %g.id, instance = %inst, leader = was_leader, "static member rejoined; assignment kept, no rebalance");
                                let mut r = join_response(g, &new_id, a.version);
                                if was_leader {
                                    if a.version >= 9 {
                                        r.skip_assignment = true;
                                    } else {
                                        r.members.clear();
                                        r.leader = StrBytes::from_string(old.clone());
                                    }
                                }
                                break 'join JoinOutcome::Persist(r, g.value(), g.partition);
                            }
                            member_id = new_id;
                        }
                    } else {
                        member_id = new_id;
                        is_new = true;
                    }
                } else if a.version >= 4 {
                    if g.pending.len() >= MEMBERS_PER_GROUP_MAX {
                        return join_error(GROUP_MAX_SIZE_REACHED, "");
                    }
                    g.pending.insert(
                        new_id.clone(),
                        now + Duration::from_millis(a.session_timeout_ms as u64),
                    );
                    return join_error(MEMBER_ID_REQUIRED, &new_id);
                } else {
                    member_id = new_id;
                    is_new = true;
                }
            } else if g.pending.remove(&member_id).is_some() {
                is_new = true;
            } else if !g.members.contains_key(&member_id) {
                if let Some(inst) = &a.instance_id {
                    if g.static_members.contains_key(inst) {
                        return join_error(FENCED_INSTANCE_ID, &member_id);
                    }
                }
                return join_error(UNKNOWN_MEMBER_ID, &member_id);
            } else if let Some(inst) = &a.instance_id {
                if g.static_members.get(inst).is_some_and(|m| *m != member_id) {
                    return join_error(FENCED_INSTANCE_ID, &member_id);
                }
            }
            if is_new {
                if g.members.len() >= MEMBERS_PER_GROUP_MAX {
                    return join_error(GROUP_MAX_SIZE_REACHED, &member_id);
                }
                if let Some(inst) = &a.instance_id {
                    g.static_members.insert(inst.clone(), member_id.clone());
                }
                g.members.insert(
                    member_id.clone(),
                    Member {
                        id: member_id.clone(),
                        instance_id: a.instance_id.clone(),
                        client_id: a.client_id.clone(),
                        client_host: a.client_host.clone(),
                        session_timeout_ms: a.session_timeout_ms,
                        rebalance_timeout_ms: a.rebalance_timeout_ms,
                        protocols: a.protocols.clone(),
                        assignment: Bytes::new(),
                        join_waiter: None,
                        sync_waiter: None,
                        last_seen: now,
                    },
                );
                if g.protocol_type.is_none() {
                    g.protocol_type = Some(a.protocol_type.clone());
                }
                prepare_rebalance(g, cfg.initial_rebalance_delay_ms);
            } else {
                let is_leader = g.leader.as_deref() == Some(member_id.as_str());
                let m = g.members.get_mut(&member_id).expect("checked above");
                let changed = m.protocols != a.protocols;
                m.protocols = a.protocols.clone();
                m.session_timeout_ms = a.session_timeout_ms;
                m.rebalance_timeout_ms = a.rebalance_timeout_ms;
                m.last_seen = now;
                match g.state {
                    State::Stable | State::CompletingRebalance if !changed && !is_leader => {
                        return join_response(g, &member_id, a.version);
                    }
                    State::PreparingRebalance => {}
                    _ => prepare_rebalance(g, cfg.initial_rebalance_delay_ms),
                }
            }
            let (tx, rx) = oneshot::channel();
            let m = g.members.get_mut(&member_id).expect("member present");
            if let Some((old, _)) = m.join_waiter.replace((tx, a.version)) {
                // A second JoinGroup from the same member supersedes the first.
                let _ = old.send(join_error(REBALANCE_IN_PROGRESS, &member_id));
            }
            maybe_complete_join(g, false);
            JoinOutcome::Wait(rx)
        };
        match outcome {
            JoinOutcome::Wait(rx) => rx
                .await
                .unwrap_or_else(|_| join_error(COORDINATOR_NOT_AVAILABLE, &a.member_id)),
            JoinOutcome::Persist(resp, value, partition) => {
                match persist(
                    self,
                    partition,
                    vec![(
                        records::group_key(&a.group),
                        Some(records::group_value(&value)),
                    )],
                )
                .await
                {
                    Ok(()) => resp,
                    Err(code) => join_error(code, &a.member_id),
                }
            }
        }
    }

    fn check_member(
        g: &Group,
        member_id: &str,
        instance_id: Option<&str>,
        generation: Option<i32>,
    ) -> Result<(), i16> {
        if let Some(inst) = instance_id {
            if g.static_members.get(inst).is_some_and(|m| m != member_id) {
                return Err(FENCED_INSTANCE_ID);
            }
        }
        if !g.members.contains_key(member_id) {
            return Err(UNKNOWN_MEMBER_ID);
        }
        if let Some(gen) = generation {
            if gen != g.generation {
                return Err(ILLEGAL_GENERATION);
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn group_sync(
        self: &Rc<Self>,
        group: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        protocol_type: Option<&str>,
        protocol_name: Option<&str>,
        assignments: Vec<(String, Bytes)>,
        version: i16,
    ) -> SyncGroupResponse {
        let (rx, persist_value, partition) = {
            let mut groups = self.groups.groups.borrow_mut();
            let Some(g) = groups.get_mut(group) else {
                return sync_response_plain(UNKNOWN_MEMBER_ID, version);
            };
            if let Err(code) = Self::check_member(g, member_id, instance_id, Some(generation)) {
                return sync_response_plain(code, version);
            }
            if protocol_type.is_some_and(|t| Some(t) != g.protocol_type.as_deref())
                || protocol_name.is_some_and(|p| Some(p) != g.protocol.as_deref())
            {
                return sync_response_plain(INCONSISTENT_GROUP_PROTOCOL, version);
            }
            match g.state {
                State::Empty | State::Dead => {
                    return sync_response_plain(UNKNOWN_MEMBER_ID, version)
                }
                State::PreparingRebalance => {
                    return sync_response_plain(REBALANCE_IN_PROGRESS, version)
                }
                State::Stable => {
                    let m = g.members.get_mut(member_id).expect("checked");
                    m.last_seen = Instant::now();
                    let a = m.assignment.clone();
                    return sync_response(g, NONE, a, version);
                }
                State::CompletingRebalance => {}
            }
            let (tx, rx) = oneshot::channel();
            let m = g.members.get_mut(member_id).expect("checked");
            m.last_seen = Instant::now();
            m.sync_waiter = Some((tx, version));
            if g.leader.as_deref() != Some(member_id) {
                (rx, None, g.partition)
            } else {
                let mut value = g.value();
                let given: HashMap<String, Bytes> = assignments.into_iter().collect();
                for mv in value.members.iter_mut() {
                    mv.assignment = given.get(&mv.member_id).cloned().unwrap_or_default();
                }
                (rx, Some((value, given)), g.partition)
            }
        };
        if let Some((value, given)) = persist_value {
            let generation_at_sync = value.generation;
            let r = persist(
                self,
                partition,
                vec![(
                    records::group_key(group),
                    Some(records::group_value(&value)),
                )],
            )
            .await;
            let mut groups = self.groups.groups.borrow_mut();
            if let Some(g) = groups.get_mut(group) {
                if g.state == State::CompletingRebalance && g.generation == generation_at_sync {
                    let code = r.err().unwrap_or(NONE);
                    if code == NONE {
                        for m in g.members.values_mut() {
                            m.assignment = given.get(&m.id).cloned().unwrap_or_default();
                        }
                        g.set_state(State::Stable);
                        tracing::info!(group = %g.id, generation = g.generation, "rebalance: group stable");
                    } else {
                        prepare_rebalance(g, 0);
                    }
                    let waiters: Vec<(Bytes, oneshot::Sender<SyncGroupResponse>, i16)> = g
                        .members
                        .values_mut()
                        .filter_map(|m| {
                            m.sync_waiter
                                .take()
                                .map(|(tx, v)| (m.assignment.clone(), tx, v))
                        })
                        .collect();
                    for (a, tx, v) in waiters {
                        let _ = tx.send(if code == NONE {
                            sync_response(g, NONE, a, v)
                        } else {
                            sync_response_plain(code, v)
                        });
                    }
                }
            }
        }
        rx.await
            .unwrap_or_else(|_| sync_response_plain(REBALANCE_IN_PROGRESS, version))
    }

    pub fn group_heartbeat(
        &self,
        group: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
    ) -> i16 {
        let mut groups = self.groups.groups.borrow_mut();
        let Some(g) = groups.get_mut(group) else {
            return UNKNOWN_MEMBER_ID;
        };
        if let Err(code) = Self::check_member(g, member_id, instance_id, None) {
            return code;
        }
        g.members.get_mut(member_id).expect("checked").last_seen = Instant::now();
        if generation != g.generation {
            return ILLEGAL_GENERATION;
        }
        match g.state {
            State::PreparingRebalance => REBALANCE_IN_PROGRESS,
            State::Empty | State::Dead => UNKNOWN_MEMBER_ID,
            _ => NONE,
        }
    }

    /// Removes members (by member id, or by instance id for static members). Returns a code
    /// per member. When the last member left, the Empty group is written to
    /// `__consumer_offsets` before the answer, as Kafka does, so a restart does not bring the
    /// departed members back.
    pub async fn group_leave(
        self: &Rc<Self>,
        group: &str,
        leaving: &[(String, Option<String>)],
    ) -> Result<Vec<i16>, i16> {
        let (codes, empty, partition) = self.leave_members(group, leaving)?;
        if let Some(rec) = empty {
            if let Err(code) = persist(self, partition, vec![rec]).await {
                tracing::warn!(
                    group,
                    code,
                    "writing the Empty group failed; the ticker retries"
                );
                self.unpersisted_again(group);
                return Err(code);
            }
        }
        Ok(codes)
    }

    /// A write of an Empty group failed: mark it for the ticker to retry, if still Empty.
    fn unpersisted_again(&self, group: &str) {
        if let Some(g) = self.groups.groups.borrow_mut().get_mut(group) {
            g.empty_unpersisted = g.state == State::Empty;
        }
    }

    /// The in-memory part of LeaveGroup: the per-member codes, and the record of the group if
    /// it became Empty (with its `__consumer_offsets` partition).
    fn leave_members(
        &self,
        group: &str,
        leaving: &[(String, Option<String>)],
    ) -> Result<(Vec<i16>, Option<OffsetsRecord>, i32), i16> {
        let cfg = self.config.group.clone();
        let mut groups = self.groups.groups.borrow_mut();
        let Some(g) = groups.get_mut(group) else {
            return Err(UNKNOWN_MEMBER_ID);
        };
        let mut codes = Vec::with_capacity(leaving.len());
        let mut removed = false;
        for (member_id, instance_id) in leaving {
            let id = match instance_id {
                Some(inst) => match g.static_members.get(inst) {
                    Some(m) if member_id.is_empty() || m == member_id => m.clone(),
                    Some(_) => {
                        codes.push(FENCED_INSTANCE_ID);
                        continue;
                    }
                    None => {
                        codes.push(UNKNOWN_MEMBER_ID);
                        continue;
                    }
                },
                None => member_id.clone(),
            };
            match g.remove_member(&id) {
                Some(m) => {
                    if let Some((tx, _)) = m.join_waiter {
                        let _ = tx.send(join_error(UNKNOWN_MEMBER_ID, &id));
                    }
                    tracing::info!(group = %g.id, member = %id, "member left");
                    removed = true;
                    codes.push(NONE);
                }
                None => codes.push(UNKNOWN_MEMBER_ID),
            }
        }
        if removed {
            match g.state {
                State::PreparingRebalance => maybe_complete_join(g, false),
                State::Stable | State::CompletingRebalance => {
                    if g.members.is_empty() {
                        g.become_empty();
                    } else {
                        prepare_rebalance(g, cfg.initial_rebalance_delay_ms);
                    }
                }
                _ => {}
            }
        }
        Ok((codes, g.take_empty_record(), g.partition))
    }

    /// Validates an OffsetCommit's member and generation. generation -1 with an empty member id
    /// is a "simple" commit (assign()-based consumers), allowed while the group has no members.
    pub fn group_commit_check(
        &self,
        group: &str,
        member_id: &str,
        instance_id: Option<&str>,
        generation: i32,
        partition: i32,
        version: i16,
    ) -> Result<(), i16> {
        let mut groups = self.groups.groups.borrow_mut();
        if let Some(cg) = groups.get(group).and_then(|g| g.consumer.as_deref()) {
            return consumer::check_commit(cg, member_id, generation, version);
        }
        if !groups.contains_key(group) {
            if generation >= 0 {
                return Err(ILLEGAL_GENERATION);
            }
            if groups.len() >= GROUPS_PER_SHARD_MAX {
                return Err(COORDINATOR_NOT_AVAILABLE);
            }
            groups.insert(group.to_string(), Group::new(group, partition));
            return Ok(());
        }
        let g = groups.get_mut(group).expect("present");
        if generation < 0 && member_id.is_empty() {
            return if g.members.is_empty() {
                Ok(())
            } else {
                Err(UNKNOWN_MEMBER_ID)
            };
        }
        Self::check_member(g, member_id, instance_id, Some(generation))?;
        match g.state {
            State::PreparingRebalance | State::CompletingRebalance => Err(REBALANCE_IN_PROGRESS),
            State::Stable => {
                g.members.get_mut(member_id).expect("checked").last_seen = Instant::now();
                Ok(())
            }
            _ => Err(UNKNOWN_MEMBER_ID),
        }
    }

    /// The session and rebalance clock of this shard's groups, plus offset expiry.
    pub async fn group_ticker(self: Rc<Self>) {
        let mut last_expiry = Instant::now();
        let mut last_warn = Instant::now() - EMPTY_RETRY_WARN_EVERY;
        loop {
            glommio::timer::sleep(TICK).await;
            if self.shutting_down.get() {
                // No rebalance completes from now on: every tick until the shard stops,
                // answer the members waiting in JoinGroup/SyncGroup (COORDINATOR_NOT_AVAILABLE,
                // REBALANCE_IN_PROGRESS) so their connections can close.
                for g in self.groups.groups.borrow_mut().values_mut() {
                    for m in g.members.values_mut() {
                        m.join_waiter = None;
                        m.sync_waiter = None;
                    }
                }
                continue;
            }
            let cfg = self.config.group.clone();
            let now = Instant::now();
            {
                let mut groups = self.groups.groups.borrow_mut();
                for g in groups.values_mut() {
                    g.pending.retain(|_, deadline| *deadline > now);
                    let expired: Vec<String> = g
                        .members
                        .values()
                        .filter(|m| m.join_waiter.is_none() && m.sync_waiter.is_none())
                        .filter(|m| {
                            now.duration_since(m.last_seen)
                                > Duration::from_millis(m.session_timeout_ms as u64)
                        })
                        .map(|m| m.id.clone())
                        .collect();
                    for id in &expired {
                        tracing::info!(group = %g.id, member = %id, "member session expired");
                        g.remove_member(id);
                    }
                    match g.state {
                        State::PreparingRebalance => {
                            maybe_complete_join(g, now >= g.rebalance_deadline)
                        }
                        State::CompletingRebalance if now >= g.sync_deadline => {
                            tracing::info!(group = %g.id, "leader did not sync in time; rebalancing");
                            let lazy: Vec<String> = g
                                .members
                                .values()
                                .filter(|m| m.sync_waiter.is_none())
                                .map(|m| m.id.clone())
                                .collect();
                            for id in lazy {
                                g.remove_member(&id);
                            }
                            prepare_rebalance(g, 0);
                        }
                        State::Stable | State::CompletingRebalance if !expired.is_empty() => {
                            if g.members.is_empty() {
                                g.become_empty();
                            } else {
                                prepare_rebalance(g, 0);
                            }
                        }
                        _ => {}
                    }
                }
            }
            self.consumer_group_tick().await;
            let failed = self.persist_empty_groups().await;
            if failed > 0 && now.duration_since(last_warn) >= EMPTY_RETRY_WARN_EVERY {
                last_warn = now;
                tracing::warn!(
                    groups = failed,
                    "writing Empty groups to __consumer_offsets failed; retrying every tick"
                );
            }
            if now.duration_since(last_expiry)
                >= Duration::from_millis(cfg.offsets_retention_check_ms)
            {
                last_expiry = now;
                self.expire_offsets(cfg.offsets_retention_ms).await;
            }
        }
    }

    /// Writes the group-metadata record of every group that became Empty without a request to
    /// answer (sessions expired, a rebalance ended with nobody) or whose earlier write failed.
    /// Returns how many groups could not be written (they are retried next tick).
    async fn persist_empty_groups(self: &Rc<Self>) -> usize {
        let mut failed = 0;
        let mut by_partition: HashMap<i32, Vec<(String, OffsetsRecord)>> = HashMap::new();
        {
            let mut groups = self.groups.groups.borrow_mut();
            for g in groups.values_mut().filter(|g| g.empty_unpersisted) {
                if let Some(rec) = g.take_empty_record() {
                    by_partition
                        .entry(g.partition)
                        .or_default()
                        .push((g.id.clone(), rec));
                }
            }
        }
        for (partition, recs) in by_partition {
            let (ids, recs): (Vec<String>, Vec<OffsetsRecord>) = recs.into_iter().unzip();
            if persist(self, partition, recs).await.is_err() {
                failed += ids.len();
                for id in &ids {
                    self.unpersisted_again(id);
                }
            }
        }
        failed
    }

    /// Removes committed offsets of empty groups older than offsets.retention.minutes, with
    /// tombstones in `__consumer_offsets`.
    pub async fn expire_offsets(self: &Rc<Self>, retention_ms: i64) {
        let now = now_ms();
        let mut by_partition: HashMap<i32, Vec<OffsetsRecord>> = HashMap::new();
        {
            let mut groups = self.groups.groups.borrow_mut();
            for g in groups.values_mut() {
                if g.state != State::Empty
                    || g.consumer.as_ref().is_some_and(|c| !c.members.is_empty())
                {
                    continue;
                }
                let old: Vec<(String, i32)> = g
                    .offsets
                    .iter()
                    .filter(|(_, v)| now - v.commit_timestamp > retention_ms)
                    .map(|(k, _)| k.clone())
                    .collect();
                for (t, p) in old {
                    g.offsets.remove(&(t.clone(), p));
                    by_partition
                        .entry(g.partition)
                        .or_default()
                        .push((records::offset_key(&g.id, &t, p), None));
                }
            }
            // As Kafka: a consumer-protocol group without members and offsets is deleted.
            for g in groups.values().filter(|g| {
                g.offsets.is_empty() && g.consumer.as_ref().is_some_and(|c| c.members.is_empty())
            }) {
                let cg = g.consumer.as_ref().expect("filtered");
                by_partition
                    .entry(g.partition)
                    .or_default()
                    .extend(consumer::delete_records(&g.id, cg));
            }
            groups.retain(|_, g| {
                !(g.offsets.is_empty() && g.consumer.as_ref().is_some_and(|c| c.members.is_empty()))
            });
            groups.retain(|_, g| {
                !(g.state == State::Empty
                    && g.consumer.is_none()
                    && g.offsets.is_empty()
                    && g.members.is_empty()
                    && g.generation == 0)
            });
        }
        for (partition, recs) in by_partition {
            let n = recs.len();
            if persist(self, partition, recs).await.is_ok() {
                tracing::info!(
                    partition,
                    expired = n,
                    "expired committed offsets of empty groups"
                );
            }
        }
    }
}
