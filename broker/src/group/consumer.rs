//! The consumer group protocol of KIP-848 (ConsumerGroupHeartbeat): the coordinator, not a
//! group leader, computes the assignment.
//!
//! A group has a group epoch, bumped whenever its membership or its members' subscriptions (or
//! the partition counts of the subscribed topics) change. When the group epoch passes the
//! target assignment epoch, the group's server-side assignor (`uniform` or `range`, the one most
//! members ask for) computes a new target assignment. Each member then reconciles towards its
//! target on its own heartbeats, as Kafka's CurrentAssignmentBuilder does: partitions it must
//! give up are first revoked (the member keeps its epoch until its heartbeat no longer reports
//! them), and a partition is handed to a member only once no other member owns or is revoking
//! it; a member reaches the target epoch when nothing remains to revoke.
//!
//! State goes to the group's `__consumer_offsets` partition before a heartbeat is answered, as
//! Kafka's records (keys 3, 5, 6, 7, 8; see ARCHITECTURE.md) and is replayed on load. The group
//! lives in the classic `Group` entry (`Group::consumer`), which also holds its committed offsets:
//! a group id is either classic or consumer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use uuid::Uuid;

use super::records::{put_opt_str, put_str, R};
use super::{persist, Group, GroupConfig, OffsetsRecord, State, GROUPS_PER_SHARD_MAX};
use crate::cluster::metadata::TopicMeta;
use crate::kafka::errors::*;
use crate::shard::Shard;

/// Server-side assignors, the first the default (Kafka's `group.consumer.assignors`).
pub const ASSIGNORS: &[&str] = &["uniform", "range"];
/// Topics one member may subscribe to.
pub const SUBSCRIBED_TOPICS_MAX: usize = 10_000;
/// How often the partition counts of a group's subscribed topics are looked at again.
const METADATA_REFRESH: Duration = Duration::from_secs(5);
pub const LEAVE_GROUP_MEMBER_EPOCH: i32 = -1;
pub const LEAVE_GROUP_STATIC_MEMBER_EPOCH: i32 = -2;

/// Partitions by topic id.
pub type Assignment = BTreeMap<Uuid, BTreeSet<i32>>;

/// A member's reconciliation state (Kafka's MemberState values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    Stable = 0,
    UnrevokedPartitions = 1,
    UnreleasedPartitions = 2,
}

impl MemberState {
    fn from_i8(v: i8) -> MemberState {
        match v {
            1 => MemberState::UnrevokedPartitions,
            2 => MemberState::UnreleasedPartitions,
            _ => MemberState::Stable,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Member {
    pub id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// Sorted, without duplicates.
    pub subscribed: Vec<String>,
    pub assignor: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub epoch: i32,
    pub prev_epoch: i32,
    pub state: MemberState,
    pub assigned: Assignment,
    pub revoking: Assignment,
    last_seen: Instant,
    /// Set while partitions are pending revocation: the member is fenced if it has not revoked
    /// them by then (its rebalance timeout).
    revoke_deadline: Option<Instant>,
}

impl Member {
    fn new(id: String, now: Instant) -> Member {
        Member {
            id,
            instance_id: None,
            rack_id: None,
            client_id: String::new(),
            client_host: String::new(),
            subscribed: Vec::new(),
            assignor: None,
            rebalance_timeout_ms: 0,
            epoch: 0,
            prev_epoch: 0,
            state: MemberState::Stable,
            assigned: Assignment::new(),
            revoking: Assignment::new(),
            last_seen: now,
            revoke_deadline: None,
        }
    }

    /// What the member-metadata record holds.
    fn metadata(&self) -> MemberMetadata {
        MemberMetadata {
            instance_id: self.instance_id.clone(),
            rack_id: self.rack_id.clone(),
            client_id: self.client_id.clone(),
            client_host: self.client_host.clone(),
            subscribed: self.subscribed.clone(),
            assignor: self.assignor.clone(),
            rebalance_timeout_ms: self.rebalance_timeout_ms,
        }
    }

    fn current(&self) -> CurrentAssignment {
        CurrentAssignment {
            epoch: self.epoch,
            prev_epoch: self.prev_epoch,
            state: self.state,
            assigned: self.assigned.clone(),
            revoking: self.revoking.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberMetadata {
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub subscribed: Vec<String>,
    pub assignor: Option<String>,
    pub rebalance_timeout_ms: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentAssignment {
    pub epoch: i32,
    pub prev_epoch: i32,
    pub state: MemberState,
    pub assigned: Assignment,
    pub revoking: Assignment,
}

/// The KIP-848 part of a group.
#[derive(Debug)]
pub struct ConsumerGroup {
    pub epoch: i32,
    pub assignment_epoch: i32,
    pub members: BTreeMap<String, Member>,
    /// The target assignment, by member id.
    pub target: HashMap<String, Assignment>,
    /// Instance id -> member id of static members.
    pub static_members: HashMap<String, String>,
    /// Subscribed topics: name -> (id, partitions) as last computed; None after a load until
    /// the first heartbeat computes it (without bumping the epoch).
    topics: Option<BTreeMap<String, (Uuid, i32)>>,
    refresh_at: Instant,
}

impl ConsumerGroup {
    pub fn new() -> ConsumerGroup {
        ConsumerGroup {
            epoch: 0,
            assignment_epoch: 0,
            members: BTreeMap::new(),
            target: HashMap::new(),
            static_members: HashMap::new(),
            topics: None,
            refresh_at: Instant::now(),
        }
    }

    /// Kafka's consumer group states.
    pub fn state_name(&self) -> &'static str {
        if self.members.is_empty() {
            "Empty"
        } else if self.epoch != self.assignment_epoch {
            "Assigning"
        } else if self
            .members
            .values()
            .any(|m| m.epoch != self.assignment_epoch || m.state != MemberState::Stable)
        {
            "Reconciling"
        } else {
            "Stable"
        }
    }

    /// The assignor most members ask for (ties: the first by name), else the default.
    pub fn assignor(&self) -> &'static str {
        let mut votes: BTreeMap<&'static str, usize> = BTreeMap::new();
        for m in self.members.values() {
            if let Some(a) = m.assignor.as_deref() {
                if let Some(name) = ASSIGNORS.iter().find(|n| **n == a) {
                    *votes.entry(name).or_default() += 1;
                }
            }
        }
        let mut best: Option<(&'static str, usize)> = None;
        for (name, n) in votes {
            if best.is_none_or(|(_, b)| n > b) {
                best = Some((name, n));
            }
        }
        best.map(|(n, _)| n).unwrap_or(ASSIGNORS[0])
    }

    /// The epoch of the member owning (assigned or revoking) a partition, or -1.
    fn owner_epoch(&self, topic: Uuid, partition: i32) -> i32 {
        for m in self.members.values() {
            let has = |a: &Assignment| a.get(&topic).is_some_and(|ps| ps.contains(&partition));
            if has(&m.assigned) || has(&m.revoking) {
                return m.epoch;
            }
        }
        -1
    }

    /// Removes a member and bumps the group epoch (Kafka's fencing of a member); returns the
    /// records saying so.
    fn remove_member(&mut self, group: &str, id: &str) -> Vec<OffsetsRecord> {
        let Some(m) = self.members.remove(id) else {
            return Vec::new();
        };
        if let Some(i) = &m.instance_id {
            if self.static_members.get(i).map(String::as_str) == Some(id) {
                self.static_members.remove(i);
            }
        }
        self.target.remove(id);
        self.epoch += 1;
        vec![
            (current_key(group, id), None),
            (target_member_key(group, id), None),
            (member_key(group, id), None),
            (metadata_key(group), Some(metadata_value(self.epoch))),
        ]
    }
}

impl Default for ConsumerGroup {
    fn default() -> Self {
        ConsumerGroup::new()
    }
}

// ---- assignors ----

/// One member as the assignors see it.
pub struct Subscriber<'a> {
    pub id: &'a str,
    pub instance_id: Option<&'a str>,
    pub topics: &'a [String],
}

/// The target assignment by `assignor` ("uniform" or "range") of `topics` (name -> (id,
/// partitions)) to `members`; `previous` is the current target (uniform keeps what it can).
pub fn assign(
    assignor: &str,
    members: &[Subscriber],
    topics: &BTreeMap<String, (Uuid, i32)>,
    previous: &HashMap<String, Assignment>,
) -> HashMap<String, Assignment> {
    if assignor == "range" {
        range(members, topics)
    } else {
        uniform(members, topics, previous)
    }
}

/// Kafka's server-side range assignor: members sorted (static members by instance id first,
/// then by member id); for each topic, each subscriber in that order takes the next range of
/// partitions/subscribers partitions, the first partitions%subscribers one more.
fn range(
    members: &[Subscriber],
    topics: &BTreeMap<String, (Uuid, i32)>,
) -> HashMap<String, Assignment> {
    let mut order: Vec<&Subscriber> = members.iter().collect();
    order.sort_by(|a, b| match (a.instance_id, b.instance_id) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.id.cmp(b.id),
    });
    let mut out: HashMap<String, Assignment> = members
        .iter()
        .map(|m| (m.id.to_string(), Assignment::new()))
        .collect();
    for (name, (id, n)) in topics {
        let subs: Vec<&&Subscriber> = order
            .iter()
            .filter(|m| m.topics.iter().any(|t| t == name))
            .collect();
        if subs.is_empty() {
            continue;
        }
        let k = subs.len() as i32;
        let (quota, mut extra) = (n / k, n % k);
        let mut next = 0;
        for m in subs {
            let mut q = quota;
            if extra > 0 {
                q += 1;
                extra -= 1;
            }
            let end = (next + q).min(*n);
            if next < end {
                out.get_mut(m.id)
                    .expect("every member has an entry")
                    .insert(*id, (next..end).collect());
            }
            next = end;
        }
    }
    out
}

/// A balanced, sticky assignment: partitions stay with their previous target owner where it
/// still subscribes, the rest go to the least loaded subscriber, and partitions then move from
/// a member to a subscriber with at least two fewer until none can (for identical
/// subscriptions: every member within one partition of every other).
fn uniform(
    members: &[Subscriber],
    topics: &BTreeMap<String, (Uuid, i32)>,
    previous: &HashMap<String, Assignment>,
) -> HashMap<String, Assignment> {
    let mut order: Vec<&Subscriber> = members.iter().collect();
    order.sort_by(|a, b| a.id.cmp(b.id));
    let by_id: HashMap<Uuid, (&String, i32)> =
        topics.iter().map(|(n, (id, p))| (*id, (n, *p))).collect();
    // Subscribers (indexes into `order`) of each topic.
    let subscribers: HashMap<Uuid, Vec<usize>> = topics
        .iter()
        .map(|(name, (id, _))| {
            (
                *id,
                (0..order.len())
                    .filter(|i| order[*i].topics.iter().any(|t| t == name))
                    .collect(),
            )
        })
        .collect();
    let mut owner: BTreeMap<(Uuid, i32), usize> = BTreeMap::new();
    let mut count = vec![0usize; order.len()];
    for (i, m) in order.iter().enumerate() {
        for (tid, ps) in previous.get(m.id).into_iter().flatten() {
            let Some((_, n)) = by_id.get(tid) else {
                continue;
            };
            if !subscribers[tid].contains(&i) {
                continue;
            }
            for p in ps.iter().filter(|p| **p < *n) {
                if let std::collections::btree_map::Entry::Vacant(e) = owner.entry((*tid, *p)) {
                    e.insert(i);
                    count[i] += 1;
                }
            }
        }
    }
    for (id, n) in topics.values() {
        let subs = &subscribers[id];
        if subs.is_empty() {
            continue;
        }
        for p in 0..*n {
            if owner.contains_key(&(*id, p)) {
                continue;
            }
            let best = *subs
                .iter()
                .min_by_key(|i| (count[**i], **i))
                .expect("not empty");
            owner.insert((*id, p), best);
            count[best] += 1;
        }
    }
    // Each move lowers the sum of squared counts, so this ends; the bound is a safety net.
    let mut budget = 1 + owner.len() * order.len().max(1);
    loop {
        let mut moved = false;
        let keys: Vec<(Uuid, i32)> = owner.keys().copied().collect();
        for k in keys {
            let from = owner[&k];
            let to = subscribers[&k.0]
                .iter()
                .copied()
                .filter(|i| count[*i] + 1 < count[from])
                .min_by_key(|i| (count[*i], *i));
            if let Some(to) = to {
                owner.insert(k, to);
                count[from] -= 1;
                count[to] += 1;
                moved = true;
                budget -= 1;
            }
            if budget == 0 {
                break;
            }
        }
        if !moved || budget == 0 {
            break;
        }
    }
    let mut out: HashMap<String, Assignment> = order
        .iter()
        .map(|m| (m.id.to_string(), Assignment::new()))
        .collect();
    for ((tid, p), i) in owner {
        out.get_mut(order[i].id)
            .expect("member")
            .entry(tid)
            .or_default()
            .insert(p);
    }
    out
}

// ---- reconciliation (Kafka's CurrentAssignmentBuilder) ----

fn owns_any(owned: Option<&Assignment>, revoking: &Assignment) -> bool {
    let Some(owned) = owned else {
        return true;
    };
    owned.iter().any(|(t, ps)| {
        revoking
            .get(t)
            .is_some_and(|r| ps.iter().any(|p| r.contains(p)))
    })
}

/// The member's next current assignment towards `target` (at `target_epoch`); `owner_epoch`
/// says whether another member owns a partition (-1: free); `owned` is what the heartbeat
/// reported (None: not reported).
fn reconcile(
    m: &CurrentAssignment,
    target_epoch: i32,
    target: &Assignment,
    owned: Option<&Assignment>,
    owner_epoch: impl Fn(Uuid, i32) -> i32,
) -> CurrentAssignment {
    match m.state {
        MemberState::Stable if m.epoch == target_epoch => m.clone(),
        MemberState::Stable | MemberState::UnreleasedPartitions => {
            next_assignment(m, m.epoch, target_epoch, target, owned, &owner_epoch)
        }
        MemberState::UnrevokedPartitions => {
            if owns_any(owned, &m.revoking) {
                m.clone()
            } else {
                next_assignment(m, m.epoch + 1, target_epoch, target, owned, &owner_epoch)
            }
        }
    }
}

fn next_assignment(
    m: &CurrentAssignment,
    member_epoch: i32,
    target_epoch: i32,
    target: &Assignment,
    owned: Option<&Assignment>,
    owner_epoch: &impl Fn(Uuid, i32) -> i32,
) -> CurrentAssignment {
    let mut assigned = Assignment::new();
    let mut revoking = Assignment::new();
    let mut pending = Assignment::new();
    let mut unreleased = false;
    let topics: BTreeSet<Uuid> = target.keys().chain(m.assigned.keys()).copied().collect();
    let empty = BTreeSet::new();
    for t in topics {
        let tgt = target.get(&t).unwrap_or(&empty);
        let cur = m.assigned.get(&t).unwrap_or(&empty);
        let kept: BTreeSet<i32> = cur.intersection(tgt).copied().collect();
        let revoke: BTreeSet<i32> = cur.difference(&kept).copied().collect();
        let mut add: BTreeSet<i32> = tgt.difference(&kept).copied().collect();
        let before = add.len();
        add.retain(|p| owner_epoch(t, *p) == -1);
        unreleased |= add.len() != before;
        if !kept.is_empty() {
            assigned.insert(t, kept);
        }
        if !revoke.is_empty() {
            revoking.insert(t, revoke);
        }
        if !add.is_empty() {
            pending.insert(t, add);
        }
    }
    let with_epoch = |state, epoch: i32, assigned: Assignment, revoking: Assignment| {
        let prev_epoch = if epoch != m.epoch {
            m.epoch
        } else {
            m.prev_epoch
        };
        CurrentAssignment {
            epoch,
            prev_epoch,
            state,
            assigned,
            revoking,
        }
    };
    if !revoking.is_empty() && owns_any(owned, &revoking) {
        with_epoch(
            MemberState::UnrevokedPartitions,
            member_epoch,
            assigned,
            revoking,
        )
    } else {
        for (t, ps) in pending {
            assigned.entry(t).or_default().extend(ps);
        }
        let state = if unreleased {
            MemberState::UnreleasedPartitions
        } else {
            MemberState::Stable
        };
        with_epoch(state, target_epoch, assigned, Assignment::new())
    }
}

// ---- the heartbeat ----

/// A ConsumerGroupHeartbeat request.
#[derive(Clone, Debug, Default)]
pub struct Heartbeat {
    pub group: String,
    pub member_id: String,
    pub epoch: i32,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub subscribed: Option<Vec<String>>,
    pub regex: Option<String>,
    pub assignor: Option<String>,
    pub owned: Option<Assignment>,
    pub client_id: String,
    pub client_host: String,
}

/// The answer to a heartbeat (error 0), or the error with its message.
#[derive(Clone, Debug, Default)]
pub struct Answer {
    pub error: i16,
    pub message: Option<String>,
    pub member_id: Option<String>,
    pub epoch: i32,
    pub heartbeat_interval_ms: i32,
    pub assignment: Option<Assignment>,
}

fn fail(code: i16, msg: &str) -> Answer {
    Answer {
        error: code,
        message: Some(msg.to_string()),
        epoch: -1,
        ..Answer::default()
    }
}

fn validate(hb: &Heartbeat) -> Result<(), Answer> {
    let bad = |m: &str| Err(fail(INVALID_REQUEST, m));
    if hb.group.is_empty() {
        return bad("GroupId can't be empty.");
    }
    if hb.instance_id.as_deref() == Some("") {
        return bad("InstanceId can't be empty.");
    }
    if hb.rack_id.as_deref() == Some("") {
        return bad("RackId can't be empty.");
    }
    if hb.regex.is_some() {
        return bad("SubscribedTopicRegex is not supported yet.");
    }
    match hb.epoch {
        e if e > 0 || e == LEAVE_GROUP_MEMBER_EPOCH => {
            if hb.member_id.is_empty() {
                return bad("MemberId can't be empty.");
            }
        }
        0 => {
            if hb.rebalance_timeout_ms == -1 {
                return bad("RebalanceTimeoutMs must be provided in first request.");
            }
            if hb.owned.as_ref().is_none_or(|o| !o.is_empty()) {
                return bad("TopicPartitions must be empty when (re-)joining.");
            }
            if hb.subscribed.as_ref().is_none_or(|s| s.is_empty()) {
                return bad("SubscribedTopicNames must be set in first request.");
            }
        }
        LEAVE_GROUP_STATIC_MEMBER_EPOCH => {
            if hb.member_id.is_empty() {
                return bad("MemberId can't be empty.");
            }
            if hb.instance_id.is_none() {
                return bad("InstanceId can't be null.");
            }
        }
        _ => return bad("MemberEpoch is invalid."),
    }
    if hb
        .subscribed
        .as_ref()
        .is_some_and(|s| s.len() > SUBSCRIBED_TOPICS_MAX)
    {
        return bad("Too many subscribed topics.");
    }
    if let Some(a) = &hb.assignor {
        if !ASSIGNORS.contains(&a.as_str()) {
            return Err(fail(
                UNSUPPORTED_ASSIGNOR,
                &format!(
                    "ServerAssignor {a} is not supported. Supported assignors: {}.",
                    ASSIGNORS.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Kafka's epoch check of a known member: a greater epoch is fenced; a smaller one is accepted
/// only if it is the previous epoch and the member owns a subset of its assignment (the answer
/// with the bumped epoch was lost).
fn check_epoch(m: &Member, epoch: i32, owned: Option<&Assignment>) -> Result<(), Answer> {
    let subset = |o: &Assignment| {
        o.iter().all(|(t, ps)| {
            ps.is_empty()
                || m.assigned
                    .get(t)
                    .is_some_and(|a| ps.iter().all(|p| a.contains(p)))
        })
    };
    if epoch > m.epoch || (epoch < m.epoch && (epoch != m.prev_epoch || !owned.is_some_and(subset)))
    {
        return Err(fail(
            FENCED_MEMBER_EPOCH,
            &format!(
                "The consumer group member has a different member epoch ({epoch}) than the one known by the group coordinator ({}). The member must abandon all its partitions and rejoin.",
                m.epoch
            ),
        ));
    }
    Ok(())
}

fn new_member_id() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Uuid::new_v4().as_bytes())
}

/// The in-memory part of a heartbeat: the answer and the records to write before it is sent.
pub fn heartbeat(
    groups: &mut HashMap<String, Group>,
    hb: &Heartbeat,
    partition: i32,
    topics_meta: &BTreeMap<String, TopicMeta>,
    cfg: &GroupConfig,
    now: Instant,
) -> Result<(Answer, Vec<OffsetsRecord>), Answer> {
    validate(hb)?;
    if hb.epoch < 0 {
        return leave(groups, hb);
    }
    let gid = hb.group.as_str();
    let mut recs = Vec::new();
    if !groups.contains_key(gid) {
        if hb.epoch != 0 {
            return Err(fail(
                GROUP_ID_NOT_FOUND,
                &format!("Consumer group {gid} not found."),
            ));
        }
        if groups.len() >= GROUPS_PER_SHARD_MAX {
            return Err(fail(COORDINATOR_NOT_AVAILABLE, "Too many groups."));
        }
        groups.insert(gid.to_string(), Group::new(gid, partition));
    }
    let g = groups.get_mut(gid).expect("present");
    if g.consumer.is_none() {
        if !g.members.is_empty() || hb.epoch != 0 || g.state != State::Empty {
            return Err(fail(
                GROUP_ID_NOT_FOUND,
                &format!("Group {gid} is not a consumer group"),
            ));
        }
        // An empty classic group (committed offsets only) becomes a consumer group.
        g.consumer = Some(Box::default());
        g.protocol_type = Some("consumer".to_string());
        g.protocol = None;
        g.leader = None;
    }
    let cg = g.consumer.as_mut().expect("consumer group");
    let known = match &hb.instance_id {
        Some(i) => cg.static_members.contains_key(i),
        None => cg.members.contains_key(&hb.member_id),
    };
    if !known && cg.members.len() >= cfg.consumer_max_size {
        return Err(fail(
            GROUP_MAX_SIZE_REACHED,
            &format!(
                "The consumer group has reached its maximum capacity of {} members.",
                cfg.consumer_max_size
            ),
        ));
    }
    let owned = hb.owned.as_ref();
    let fresh_id = || {
        if hb.member_id.is_empty() {
            new_member_id()
        } else {
            hb.member_id.clone()
        }
    };
    // The member as it is before this heartbeat, and whether it is new to the group.
    let (mut member, is_new) = match &hb.instance_id {
        None => match cg.members.get(&hb.member_id) {
            // A known member rejoining with epoch 0 has given up its partitions: it starts over.
            Some(m) if hb.epoch != 0 => {
                check_epoch(m, hb.epoch, owned)?;
                (m.clone(), false)
            }
            Some(_) => (Member::new(hb.member_id.clone(), now), true),
            None if hb.epoch != 0 => {
                return Err(fail(
                    UNKNOWN_MEMBER_ID,
                    &format!("Member {} is not a member of group {gid}.", hb.member_id),
                ))
            }
            None => (Member::new(fresh_id(), now), true),
        },
        Some(inst) => match cg.static_members.get(inst).cloned() {
            None if hb.epoch != 0 => {
                return Err(fail(
                    UNKNOWN_MEMBER_ID,
                    &format!("Instance id {inst} is unknown."),
                ))
            }
            None => (Member::new(fresh_id(), now), true),
            Some(old_id) if hb.epoch == 0 => {
                let old = cg.members.get(&old_id).expect("static member");
                if old.epoch != LEAVE_GROUP_STATIC_MEMBER_EPOCH {
                    return Err(fail(
                        UNRELEASED_INSTANCE_ID,
                        &format!("Static member {old_id} with instance id {inst} is still active."),
                    ));
                }
                // The static member comes back: the new member takes over its partitions
                // and target assignment without a new group epoch.
                let mut m = old.clone();
                m.id = fresh_id();
                m.epoch = 0;
                m.prev_epoch = 0;
                m.state = MemberState::Stable;
                m.revoking.clear();
                m.revoke_deadline = None;
                let target = cg.target.remove(&old_id);
                cg.members.remove(&old_id);
                recs.push((current_key(gid, &old_id), None));
                recs.push((target_member_key(gid, &old_id), None));
                recs.push((member_key(gid, &old_id), None));
                if let Some(t) = target {
                    recs.push((target_member_key(gid, &m.id), Some(assignment_value(&t))));
                    cg.target.insert(m.id.clone(), t);
                }
                recs.push((member_key(gid, &m.id), Some(member_value(&m.metadata()))));
                cg.static_members.insert(inst.clone(), m.id.clone());
                tracing::info!(group = gid, instance = %inst, member = %m.id, replaced = %old_id, "static member rejoined");
                (m, false)
            }
            Some(old_id) => {
                if old_id != hb.member_id {
                    return Err(fail(
                        FENCED_INSTANCE_ID,
                        &format!(
                            "Static member {} with instance id {inst} was replaced by {old_id}.",
                            hb.member_id
                        ),
                    ));
                }
                let m = cg.members.get(&old_id).expect("static member");
                check_epoch(m, hb.epoch, owned)?;
                (m.clone(), false)
            }
        },
    };
    let before_meta = member.metadata();
    let before_current = member.current();
    if let Some(i) = &hb.instance_id {
        member.instance_id = Some(i.clone());
    }
    if let Some(r) = &hb.rack_id {
        member.rack_id = Some(r.clone());
    }
    if hb.rebalance_timeout_ms != -1 {
        member.rebalance_timeout_ms = hb.rebalance_timeout_ms;
    }
    if let Some(a) = &hb.assignor {
        member.assignor = Some(a.clone());
    }
    if let Some(s) = &hb.subscribed {
        let mut s = s.clone();
        s.sort();
        s.dedup();
        member.subscribed = s;
    }
    member.client_id = hb.client_id.clone();
    member.client_host = hb.client_host.clone();
    let mut bump = is_new || member.subscribed != before_meta.subscribed;
    if is_new || member.metadata() != before_meta {
        recs.push((
            member_key(gid, &member.id),
            Some(member_value(&member.metadata())),
        ));
    }
    if is_new {
        if let Some(i) = &member.instance_id {
            cg.static_members.insert(i.clone(), member.id.clone());
        }
        tracing::info!(group = gid, member = %member.id, "member joins the consumer group");
    }
    let member_id = member.id.clone();
    cg.members.insert(member_id.clone(), member);
    if bump || cg.topics.is_none() || now >= cg.refresh_at {
        let names: BTreeSet<&String> = cg.members.values().flat_map(|m| &m.subscribed).collect();
        let meta: BTreeMap<String, (Uuid, i32)> = names
            .into_iter()
            .filter_map(|n| {
                topics_meta
                    .get(n)
                    .map(|t| (n.clone(), (t.id, t.partitions.len() as i32)))
            })
            .collect();
        if cg.topics.as_ref().is_some_and(|old| *old != meta) {
            bump = true;
        }
        cg.topics = Some(meta);
        cg.refresh_at = now + METADATA_REFRESH;
    }
    if bump {
        cg.epoch += 1;
        recs.push((metadata_key(gid), Some(metadata_value(cg.epoch))));
        tracing::info!(group = gid, epoch = cg.epoch, "bumped the group epoch");
    }
    if cg.epoch > cg.assignment_epoch {
        let assignor = cg.assignor();
        let subs: Vec<Subscriber> = cg
            .members
            .values()
            .map(|m| Subscriber {
                id: &m.id,
                instance_id: m.instance_id.as_deref(),
                topics: &m.subscribed,
            })
            .collect();
        let target = assign(
            assignor,
            &subs,
            cg.topics.as_ref().expect("computed above"),
            &cg.target,
        );
        for (mid, a) in &target {
            if cg.target.get(mid) != Some(a) {
                recs.push((target_member_key(gid, mid), Some(assignment_value(a))));
            }
        }
        cg.target = target;
        cg.assignment_epoch = cg.epoch;
        recs.push((
            target_metadata_key(gid),
            Some(metadata_value(cg.assignment_epoch)),
        ));
        tracing::info!(
            group = gid,
            epoch = cg.epoch,
            assignor,
            members = cg.members.len(),
            "computed a new target assignment"
        );
    }
    let target = cg.target.get(&member_id).cloned().unwrap_or_default();
    let stored = cg.members.get(&member_id).expect("inserted").current();
    let next = reconcile(&stored, cg.assignment_epoch, &target, owned, |t, p| {
        cg.owner_epoch(t, p)
    });
    let m = cg.members.get_mut(&member_id).expect("inserted");
    if next != before_current || is_new {
        recs.push((current_key(gid, &member_id), Some(current_value(&next))));
    }
    if next.state == MemberState::UnrevokedPartitions {
        if m.state != MemberState::UnrevokedPartitions || m.revoke_deadline.is_none() {
            m.revoke_deadline =
                Some(now + Duration::from_millis(m.rebalance_timeout_ms.max(0) as u64));
        }
    } else {
        m.revoke_deadline = None;
    }
    let assigned_changed = next.assigned != before_current.assigned;
    m.epoch = next.epoch;
    m.prev_epoch = next.prev_epoch;
    m.state = next.state;
    m.assigned = next.assigned;
    m.revoking = next.revoking;
    m.last_seen = now;
    let full = hb.epoch == 0
        || (hb.rebalance_timeout_ms != -1 && hb.subscribed.is_some() && hb.owned.is_some());
    Ok((
        Answer {
            error: NONE,
            message: None,
            member_id: Some(member_id),
            epoch: m.epoch,
            heartbeat_interval_ms: cfg.consumer_heartbeat_interval_ms,
            assignment: (full || assigned_changed).then(|| m.assigned.clone()),
        },
        recs,
    ))
}

/// A heartbeat with epoch -1 (the member leaves) or -2 (a static member leaves for now and
/// keeps its partitions until its session times out).
fn leave(
    groups: &mut HashMap<String, Group>,
    hb: &Heartbeat,
) -> Result<(Answer, Vec<OffsetsRecord>), Answer> {
    let gid = hb.group.as_str();
    let Some(cg) = groups.get_mut(gid).and_then(|g| g.consumer.as_mut()) else {
        return Err(fail(
            GROUP_ID_NOT_FOUND,
            &format!("Consumer group {gid} not found."),
        ));
    };
    let id = match &hb.instance_id {
        None => hb.member_id.clone(),
        Some(inst) => match cg.static_members.get(inst) {
            None => {
                return Err(fail(
                    UNKNOWN_MEMBER_ID,
                    &format!("Instance id {inst} is unknown."),
                ))
            }
            Some(m) if *m != hb.member_id => {
                return Err(fail(
                    FENCED_INSTANCE_ID,
                    &format!("Static member {} was replaced by {m}.", hb.member_id),
                ))
            }
            Some(m) => m.clone(),
        },
    };
    if !cg.members.contains_key(&id) {
        return Err(fail(
            UNKNOWN_MEMBER_ID,
            &format!("Member {id} is not a member of group {gid}."),
        ));
    }
    let recs = if hb.epoch == LEAVE_GROUP_STATIC_MEMBER_EPOCH {
        let m = cg.members.get_mut(&id).expect("checked");
        if m.epoch != LEAVE_GROUP_STATIC_MEMBER_EPOCH {
            m.prev_epoch = m.epoch;
            m.epoch = LEAVE_GROUP_STATIC_MEMBER_EPOCH;
        }
        tracing::info!(group = gid, member = %id, "static member left for now");
        vec![(current_key(gid, &id), Some(current_value(&m.current())))]
    } else {
        tracing::info!(group = gid, member = %id, "member left the consumer group");
        cg.remove_member(gid, &id)
    };
    Ok((
        Answer {
            member_id: Some(hb.member_id.clone()),
            epoch: hb.epoch,
            ..Answer::default()
        },
        recs,
    ))
}

/// Members that missed their session (or did not revoke in their rebalance timeout) are
/// removed; returns the records to write, by `__consumer_offsets` partition.
pub fn expire(
    groups: &mut HashMap<String, Group>,
    cfg: &GroupConfig,
    now: Instant,
) -> HashMap<i32, Vec<OffsetsRecord>> {
    let session = Duration::from_millis(cfg.consumer_session_timeout_ms.max(0) as u64);
    let mut out: HashMap<i32, Vec<OffsetsRecord>> = HashMap::new();
    for g in groups.values_mut() {
        let Some(cg) = g.consumer.as_mut() else {
            continue;
        };
        let gone: Vec<(String, &'static str)> = cg
            .members
            .values()
            .filter_map(|m| {
                if now.duration_since(m.last_seen) > session {
                    Some((m.id.clone(), "session timed out"))
                } else if m.revoke_deadline.is_some_and(|d| now >= d) {
                    Some((
                        m.id.clone(),
                        "did not revoke its partitions in its rebalance timeout",
                    ))
                } else {
                    None
                }
            })
            .collect();
        for (id, why) in gone {
            tracing::info!(group = %g.id, member = %id, why, "member fenced");
            let recs = cg.remove_member(&g.id, &id);
            out.entry(g.partition).or_default().extend(recs);
        }
    }
    out
}

/// Checks an OffsetCommit against a consumer group, as Kafka: a negative epoch commits
/// (admin, or a consumer without group management) while the group has no members; otherwise
/// the member must exist, use OffsetCommit v9+ (else UNSUPPORTED_VERSION) and give its current
/// epoch (else STALE_MEMBER_EPOCH).
pub fn check_commit(
    cg: &ConsumerGroup,
    member_id: &str,
    epoch: i32,
    version: i16,
) -> Result<(), i16> {
    if epoch < 0 && cg.members.is_empty() {
        return Ok(());
    }
    if !cg.members.contains_key(member_id) {
        return Err(UNKNOWN_MEMBER_ID);
    }
    if version < 9 {
        return Err(UNSUPPORTED_VERSION);
    }
    check_member_epoch(cg, member_id, epoch)
}

/// OffsetFetch v9 with a member id: the member must exist with that epoch.
pub fn check_member_epoch(cg: &ConsumerGroup, member_id: &str, epoch: i32) -> Result<(), i16> {
    match cg.members.get(member_id) {
        None => Err(UNKNOWN_MEMBER_ID),
        Some(m) if m.epoch != epoch => Err(STALE_MEMBER_EPOCH),
        Some(_) => Ok(()),
    }
}

/// Tombstones for every record of an empty consumer group (DeleteGroups).
pub fn delete_records(group: &str, cg: &ConsumerGroup) -> Vec<OffsetsRecord> {
    let mut recs: Vec<OffsetsRecord> = cg
        .target
        .keys()
        .map(|m| (target_member_key(group, m), None))
        .collect();
    recs.push((target_metadata_key(group), None));
    recs.push((metadata_key(group), None));
    recs
}

fn write_error(code: i16) -> i16 {
    match code {
        NOT_LEADER_OR_FOLLOWER | KAFKA_STORAGE_ERROR | NOT_COORDINATOR => NOT_COORDINATOR,
        _ => COORDINATOR_NOT_AVAILABLE,
    }
}

impl Shard {
    /// ConsumerGroupHeartbeat on the group's coordinator shard: the state change is written to
    /// `__consumer_offsets` before the answer.
    pub async fn consumer_heartbeat(self: &Rc<Self>, hb: Heartbeat, partition: i32) -> Answer {
        let image = self.image();
        let r = heartbeat(
            &mut self.groups.groups.borrow_mut(),
            &hb,
            partition,
            &image.topics,
            &self.config.group,
            Instant::now(),
        );
        match r {
            Err(a) => a,
            Ok((answer, recs)) => match persist(self, partition, recs).await {
                Ok(()) => answer,
                Err(code) => fail(write_error(code), "Writing the group state failed."),
            },
        }
    }

    /// The ticker's part for KIP-848 groups: fences members that missed their session.
    pub async fn consumer_group_tick(self: &Rc<Self>) {
        let by_partition = expire(
            &mut self.groups.groups.borrow_mut(),
            &self.config.group,
            Instant::now(),
        );
        for (partition, recs) in by_partition {
            if let Err(code) = persist(self, partition, recs).await {
                tracing::warn!(
                    partition,
                    code,
                    "writing fenced consumer-group members failed"
                );
            }
        }
    }
}

// ---- records ----

pub(super) fn is_consumer_key(key: &[u8]) -> bool {
    key.len() >= 2 && (3..=8).contains(&i16::from_be_bytes([key[0], key[1]]))
}

fn key(version: i16, group: &str, member: Option<&str>) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(version);
    put_str(&mut b, group);
    if let Some(m) = member {
        put_str(&mut b, m);
    }
    b.freeze()
}

pub fn metadata_key(group: &str) -> Bytes {
    key(3, group, None)
}
pub fn member_key(group: &str, member: &str) -> Bytes {
    key(5, group, Some(member))
}
pub fn target_metadata_key(group: &str) -> Bytes {
    key(6, group, None)
}
pub fn target_member_key(group: &str, member: &str) -> Bytes {
    key(7, group, Some(member))
}
pub fn current_key(group: &str, member: &str) -> Bytes {
    key(8, group, Some(member))
}

/// Group epoch (key 3) and target assignment epoch (key 6) values.
fn metadata_value(epoch: i32) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(0);
    b.put_i32(epoch);
    b.freeze()
}

fn put_assignment(b: &mut BytesMut, a: &Assignment) {
    b.put_i32(a.len() as i32);
    for (t, ps) in a {
        b.put_slice(t.as_bytes());
        b.put_i32(ps.len() as i32);
        for p in ps {
            b.put_i32(*p);
        }
    }
}

fn assignment_value(a: &Assignment) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(0);
    put_assignment(&mut b, a);
    b.freeze()
}

fn member_value(m: &MemberMetadata) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(0);
    put_opt_str(&mut b, m.instance_id.as_deref());
    put_opt_str(&mut b, m.rack_id.as_deref());
    put_str(&mut b, &m.client_id);
    put_str(&mut b, &m.client_host);
    b.put_i32(m.subscribed.len() as i32);
    for t in &m.subscribed {
        put_str(&mut b, t);
    }
    put_opt_str(&mut b, m.assignor.as_deref());
    b.put_i32(m.rebalance_timeout_ms);
    b.freeze()
}

fn current_value(c: &CurrentAssignment) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(0);
    b.put_i32(c.epoch);
    b.put_i32(c.prev_epoch);
    b.put_i8(c.state as i8);
    put_assignment(&mut b, &c.assigned);
    put_assignment(&mut b, &c.revoking);
    b.freeze()
}

fn read_assignment(r: &mut R) -> Option<Assignment> {
    let n = r.i32()?;
    if n < 0 || n as usize > r.0.remaining() {
        return None;
    }
    let mut a = Assignment::new();
    for _ in 0..n {
        let id = Uuid::from_slice(&r.take(16)?).ok()?;
        let m = r.i32()?;
        if m < 0 || m as usize > r.0.remaining() / 4 {
            return None;
        }
        let mut ps = BTreeSet::new();
        for _ in 0..m {
            ps.insert(r.i32()?);
        }
        a.insert(id, ps);
    }
    Some(a)
}

fn decode_epoch(v: Bytes) -> Option<i32> {
    let mut r = R(v);
    r.i16()?;
    r.i32()
}

fn decode_member(v: Bytes) -> Option<MemberMetadata> {
    let mut r = R(v);
    r.i16()?;
    let instance_id = r.opt_str()?;
    let rack_id = r.opt_str()?;
    let client_id = r.str()?;
    let client_host = r.str()?;
    let n = r.i32()?;
    if n < 0 || n as usize > r.0.remaining() / 2 {
        return None;
    }
    let mut subscribed = Vec::with_capacity(n as usize);
    for _ in 0..n {
        subscribed.push(r.str()?);
    }
    Some(MemberMetadata {
        instance_id,
        rack_id,
        client_id,
        client_host,
        subscribed,
        assignor: r.opt_str()?,
        rebalance_timeout_ms: r.i32()?,
    })
}

fn decode_current(v: Bytes) -> Option<CurrentAssignment> {
    let mut r = R(v);
    r.i16()?;
    let epoch = r.i32()?;
    let prev_epoch = r.i32()?;
    let state = MemberState::from_i8(r.take(1)?[0] as i8);
    Some(CurrentAssignment {
        epoch,
        prev_epoch,
        state,
        assigned: read_assignment(&mut r)?,
        revoking: read_assignment(&mut r)?,
    })
}

/// Applies one KIP-848 record of `__consumer_offsets` partition `partition` (replay).
pub(super) fn apply_record(
    groups: &mut HashMap<String, Group>,
    partition: i32,
    key: Bytes,
    value: Option<Bytes>,
) {
    let mut r = R(key);
    let Some(version) = r.i16() else { return };
    let Some(gid) = r.str() else { return };
    let member = if matches!(version, 5 | 7 | 8) {
        match r.str() {
            Some(m) => Some(m),
            None => return,
        }
    } else {
        None
    };
    if value.is_none() && groups.get(&gid).is_none_or(|g| g.consumer.is_none()) {
        return;
    }
    if version == 3 && value.is_none() {
        // The group was deleted (or became a classic group).
        let g = groups.get_mut(&gid).expect("checked");
        g.consumer = None;
        g.protocol_type = None;
        if g.offsets.is_empty() && g.members.is_empty() {
            groups.remove(&gid);
        }
        return;
    }
    let g = groups
        .entry(gid.clone())
        .or_insert_with(|| Group::new(&gid, partition));
    if g.consumer.is_none() {
        g.members.clear();
        g.static_members.clear();
        g.protocol = None;
        g.leader = None;
        g.set_state(State::Empty);
    }
    g.protocol_type = Some("consumer".to_string());
    let cg = g.consumer.get_or_insert_with(Box::default);
    let now = Instant::now();
    match (version, member, value) {
        (3, _, Some(v)) => {
            if let Some(e) = decode_epoch(v) {
                cg.epoch = e;
            }
        }
        (5, Some(mid), Some(v)) => {
            let Some(md) = decode_member(v) else { return };
            let m = cg
                .members
                .entry(mid.clone())
                .or_insert_with(|| Member::new(mid.clone(), now));
            if let Some(i) = &md.instance_id {
                cg.static_members.insert(i.clone(), mid.clone());
            }
            m.instance_id = md.instance_id;
            m.rack_id = md.rack_id;
            m.client_id = md.client_id;
            m.client_host = md.client_host;
            m.subscribed = md.subscribed;
            m.assignor = md.assignor;
            m.rebalance_timeout_ms = md.rebalance_timeout_ms;
        }
        (5, Some(mid), None) => {
            if let Some(m) = cg.members.remove(&mid) {
                if let Some(i) = &m.instance_id {
                    if cg.static_members.get(i) == Some(&mid) {
                        cg.static_members.remove(i);
                    }
                }
            }
        }
        (6, _, Some(v)) => {
            if let Some(e) = decode_epoch(v) {
                cg.assignment_epoch = e;
            }
        }
        (7, Some(mid), Some(v)) => {
            let mut r = R(v);
            if r.i16().is_some() {
                if let Some(a) = read_assignment(&mut r) {
                    cg.target.insert(mid, a);
                }
            }
        }
        (7, Some(mid), None) => {
            cg.target.remove(&mid);
        }
        (8, Some(mid), Some(v)) => {
            if let (Some(c), Some(m)) = (decode_current(v), cg.members.get_mut(&mid)) {
                m.epoch = c.epoch;
                m.prev_epoch = c.prev_epoch;
                m.state = c.state;
                m.assigned = c.assigned;
                m.revoking = c.revoking;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(spec: &[(&str, i32)]) -> BTreeMap<String, (Uuid, i32)> {
        spec.iter()
            .enumerate()
            .map(|(i, (n, p))| (n.to_string(), (Uuid::from_u128(i as u128 + 1), *p)))
            .collect()
    }

    fn count(a: &Assignment) -> usize {
        a.values().map(|p| p.len()).sum()
    }

    #[test]
    fn uniform_is_balanced_and_sticky() {
        let t = topics(&[("a", 6), ("b", 5)]);
        let subs = vec!["a".to_string(), "b".to_string()];
        let ms: Vec<Subscriber> = ["m1", "m2", "m3"]
            .iter()
            .map(|id| Subscriber {
                id,
                instance_id: None,
                topics: &subs,
            })
            .collect();
        let first = assign("uniform", &ms[..2], &t, &HashMap::new());
        let counts: Vec<usize> = first.values().map(count).collect();
        assert_eq!(counts.iter().sum::<usize>(), 11);
        assert!(counts.iter().all(|c| *c == 5 || *c == 6), "{counts:?}");
        // A third member: everyone within one, and m1/m2 only give partitions up.
        let second = assign("uniform", &ms, &t, &first);
        let counts: Vec<usize> = ["m1", "m2", "m3"]
            .iter()
            .map(|m| count(&second[*m]))
            .collect();
        assert_eq!(counts.iter().sum::<usize>(), 11);
        assert!(counts.iter().all(|c| *c == 3 || *c == 4), "{counts:?}");
        for m in ["m1", "m2"] {
            for (t, ps) in &second[m] {
                assert!(ps.is_subset(&first[m][t]), "{m} kept its partitions");
            }
        }
        // No partition twice, none missing.
        let mut all = BTreeSet::new();
        for a in second.values() {
            for (t, ps) in a {
                for p in ps {
                    assert!(all.insert((*t, *p)));
                }
            }
        }
        assert_eq!(all.len(), 11);
        // Unchanged membership: unchanged assignment.
        assert_eq!(assign("uniform", &ms, &t, &second), second);
    }

    #[test]
    fn uniform_respects_subscriptions() {
        let t = topics(&[("a", 4), ("b", 4)]);
        let only_a = vec!["a".to_string()];
        let both = vec!["a".to_string(), "b".to_string()];
        let ms = vec![
            Subscriber {
                id: "x",
                instance_id: None,
                topics: &only_a,
            },
            Subscriber {
                id: "y",
                instance_id: None,
                topics: &both,
            },
        ];
        let out = assign("uniform", &ms, &t, &HashMap::new());
        let b = Uuid::from_u128(2);
        assert!(!out["x"].contains_key(&b));
        assert_eq!(out["y"][&b].len(), 4);
        assert_eq!(count(&out["x"]), 4);
        assert_eq!(count(&out["y"]), 4);
    }

    #[test]
    fn range_matches_kafka_layout() {
        // 7 partitions, 3 members: 0-2, 3-4, 5-6 by member id; per topic independently.
        let t = topics(&[("a", 7), ("b", 2)]);
        let subs = vec!["a".to_string(), "b".to_string()];
        let ms: Vec<Subscriber> = ["c", "a", "b"]
            .iter()
            .map(|id| Subscriber {
                id,
                instance_id: None,
                topics: &subs,
            })
            .collect();
        let out = assign("range", &ms, &t, &HashMap::new());
        let (ta, tb) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let ps = |m: &str, t: Uuid| -> Vec<i32> {
            out[m]
                .get(&t)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default()
        };
        assert_eq!(ps("a", ta), vec![0, 1, 2]);
        assert_eq!(ps("b", ta), vec![3, 4]);
        assert_eq!(ps("c", ta), vec![5, 6]);
        assert_eq!(ps("a", tb), vec![0]);
        assert_eq!(ps("b", tb), vec![1]);
        assert!(ps("c", tb).is_empty());
        // Static members come first, by instance id.
        let ms2 = vec![
            Subscriber {
                id: "a",
                instance_id: None,
                topics: &subs,
            },
            Subscriber {
                id: "z",
                instance_id: Some("i1"),
                topics: &subs,
            },
        ];
        let out = assign("range", &ms2, &t, &HashMap::new());
        assert_eq!(
            out["z"][&ta].iter().copied().collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn reconciliation_revokes_before_assigning() {
        let t = Uuid::from_u128(1);
        let a = |ps: &[i32]| -> Assignment { [(t, ps.iter().copied().collect())].into() };
        // Member owns 0-3 at epoch 1; the target at epoch 2 keeps 0-1.
        let m = CurrentAssignment {
            epoch: 1,
            prev_epoch: 0,
            state: MemberState::Stable,
            assigned: a(&[0, 1, 2, 3]),
            revoking: Assignment::new(),
        };
        let next = reconcile(&m, 2, &a(&[0, 1]), Some(&a(&[0, 1, 2, 3])), |_, _| -1);
        assert_eq!(next.state, MemberState::UnrevokedPartitions);
        assert_eq!(next.epoch, 1);
        assert_eq!(next.assigned, a(&[0, 1]));
        assert_eq!(next.revoking, a(&[2, 3]));
        // Still reporting 2: no progress.
        assert_eq!(
            reconcile(&next, 2, &a(&[0, 1]), Some(&a(&[0, 1, 2])), |_, _| -1),
            next
        );
        // Revoked: the target epoch.
        let done = reconcile(&next, 2, &a(&[0, 1]), Some(&a(&[0, 1])), |_, _| -1);
        assert_eq!(
            (done.state, done.epoch, done.prev_epoch),
            (MemberState::Stable, 2, 1)
        );
        // Another member gets 2-3 only once they are free.
        let other = CurrentAssignment {
            epoch: 1,
            prev_epoch: 0,
            state: MemberState::Stable,
            assigned: Assignment::new(),
            revoking: Assignment::new(),
        };
        let w = reconcile(&other, 2, &a(&[2, 3]), Some(&Assignment::new()), |_, p| {
            if p == 2 {
                1
            } else {
                -1
            }
        });
        assert_eq!((w.state, w.epoch), (MemberState::UnreleasedPartitions, 2));
        assert_eq!(w.assigned, a(&[3]));
        let w2 = reconcile(&w, 2, &a(&[2, 3]), Some(&a(&[3])), |_, _| -1);
        assert_eq!((w2.state, w2.assigned), (MemberState::Stable, a(&[2, 3])));
    }

    #[test]
    fn records_round_trip() {
        let mut groups = HashMap::new();
        let t = Uuid::from_u128(9);
        let md = MemberMetadata {
            instance_id: Some("i".into()),
            rack_id: None,
            client_id: "c".into(),
            client_host: "/h".into(),
            subscribed: vec!["x".into()],
            assignor: Some("range".into()),
            rebalance_timeout_ms: 300,
        };
        let cur = CurrentAssignment {
            epoch: 4,
            prev_epoch: 3,
            state: MemberState::UnreleasedPartitions,
            assigned: [(t, [1, 2].into())].into(),
            revoking: Assignment::new(),
        };
        for (k, v) in [
            (metadata_key("g"), Some(metadata_value(4))),
            (member_key("g", "m"), Some(member_value(&md))),
            (
                target_member_key("g", "m"),
                Some(assignment_value(&cur.assigned)),
            ),
            (target_metadata_key("g"), Some(metadata_value(4))),
            (current_key("g", "m"), Some(current_value(&cur))),
        ] {
            assert!(is_consumer_key(&k));
            apply_record(&mut groups, 7, k, v);
        }
        let cg = groups["g"].consumer.as_ref().unwrap();
        assert_eq!((cg.epoch, cg.assignment_epoch), (4, 4));
        assert_eq!(cg.members["m"].metadata(), md);
        assert_eq!(cg.members["m"].current(), cur);
        assert_eq!(cg.target["m"], cur.assigned);
        assert_eq!(cg.static_members["i"], "m");
        // Truncated values are ignored, never panic.
        let v = current_value(&cur);
        apply_record(
            &mut groups,
            7,
            current_key("g", "m"),
            Some(v.slice(..v.len() - 3)),
        );
        apply_record(&mut groups, 7, member_key("g", "m"), None);
        apply_record(&mut groups, 7, metadata_key("g"), None);
        assert!(!groups.contains_key("g"));
    }
}
