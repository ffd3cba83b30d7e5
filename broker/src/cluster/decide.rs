//! The active controller's decisions: pure functions from the committed [`ClusterImage`] and a
//! request to the answers for the client and the records that carry them out. Nothing here does
//! I/O; `active.rs` submits the records as one log entry.
//!
//! Each item of a request is checked against the image as changed by the items before it (a
//! name created twice in one request is refused the second time): its records are applied to
//! a scratch copy with [`ClusterImage::apply_batch`], the same code every voter runs, so a
//! record that would not apply is never submitted.

use std::collections::BTreeMap;

use super::metadata::{validate_topic_name, NewTopic, TopicError};
use super::quorum::record::NO_LEADER;
use super::quorum::{BrokerId, ClusterImage, ClusterPartition, MetadataRecord};
use crate::config::{Config, ConfigEdit, PARTITIONS_PER_BROKER_MAX, PARTITIONS_PER_TOPIC_MAX};

/// Per item: (partitions, replication factor) or why it was refused.
pub type Answers = Vec<Result<(i32, i16), TopicError>>;

/// A small deterministic generator (xorshift64*) seeded by the caller, so decisions are
/// reproducible in tests and random in production.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1) as u64) as usize
    }
}

/// Registered, unfenced brokers, by id (Kafka sorts them before assigning).
pub fn live_brokers(img: &ClusterImage) -> Vec<BrokerId> {
    img.brokers
        .values()
        .filter(|b| !b.fenced)
        .map(|b| b.node_id)
        .collect()
}

/// Kafka's rack-unaware replica assignment (`assignReplicasToBrokersRackUnaware`): partition
/// `p`'s first replica (its preferred leader) is broker `(p + start_index) % n`, so leaders go
/// round robin from a random start; each further replica is shifted from the first by an
/// amount that grows by one every `n` partitions, so followers spread too.
pub fn assign_replicas(
    brokers: &[BrokerId],
    partitions: usize,
    rf: usize,
    start_index: usize,
    first_partition: usize,
    shift: usize,
) -> Vec<Vec<BrokerId>> {
    let n = brokers.len();
    assert!(n > 0 && rf >= 1 && rf <= n, "rf {rf} over {n} brokers");
    let mut shift = shift;
    let mut out = Vec::with_capacity(partitions);
    for p in first_partition..first_partition + partitions {
        if p > 0 && p % n == 0 {
            shift += 1;
        }
        let first = (p + start_index) % n;
        let mut replicas = vec![brokers[first]];
        for j in 0..rf - 1 {
            let step = 1 + (shift + j) % (n - 1);
            replicas.push(brokers[(first + step) % n]);
        }
        out.push(replicas);
    }
    out
}

fn replicas_held(img: &ClusterImage) -> BTreeMap<BrokerId, usize> {
    let mut held = BTreeMap::new();
    for t in img.topics.values() {
        for p in &t.partitions {
            for r in &p.replicas {
                *held.entry(*r).or_insert(0) += 1;
            }
        }
    }
    held
}

fn check_limits(img: &ClusterImage, assignment: &[Vec<BrokerId>]) -> Result<(), TopicError> {
    let mut held = replicas_held(img);
    for replicas in assignment {
        for r in replicas {
            let n = held.entry(*r).or_insert(0);
            *n += 1;
            if *n > PARTITIONS_PER_BROKER_MAX {
                return Err(TopicError::InvalidPartitions(format!(
                    "Broker {r} would host more than {PARTITIONS_PER_BROKER_MAX} partitions."
                )));
            }
        }
    }
    Ok(())
}

fn rf_error(rf: i64, live: usize) -> TopicError {
    TopicError::InvalidReplicationFactor(format!(
        "Unable to replicate the partition {rf} time(s): The target replication factor of {rf} cannot be reached because only {live} broker(s) are registered."
    ))
}

/// Kafka's checks of manual assignments: no count or factor beside them, partitions 0..n
/// without gaps, each replica list non-empty, of one length, without repeats, naming
/// `registered` brokers only. Returns the replica lists in partition order.
pub fn manual_assignment(
    t: &NewTopic,
    registered: impl Fn(BrokerId) -> bool,
) -> Result<Vec<Vec<BrokerId>>, TopicError> {
    if t.num_partitions != -1 || t.replication_factor != -1 {
        return Err(TopicError::InvalidRequest(
            "Both numPartitions or replicationFactor and replicasAssignments were set. Both cannot be used at the same time.".into(),
        ));
    }
    let mut out: Vec<Option<Vec<BrokerId>>> = vec![None; t.assignments.len()];
    let mut rf: Option<usize> = None;
    for (index, brokers) in &t.assignments {
        let slot = usize::try_from(*index).ok().and_then(|i| out.get_mut(i));
        let Some(slot) = slot.filter(|s| s.is_none()) else {
            return Err(TopicError::InvalidReplicaAssignment(
                "Partitions should be a consecutive 0-based integer sequence".into(),
            ));
        };
        if brokers.is_empty() {
            return Err(TopicError::InvalidReplicaAssignment(format!(
                "The manual partition assignment includes an empty replica list for partition {index}."
            )));
        }
        if let Some(n) = rf.filter(|&n| n != brokers.len()) {
            return Err(TopicError::InvalidReplicaAssignment(format!(
                "The manual partition assignment includes a partition with {} replica(s), but this is inconsistent with previous partitions, which have {n} replica(s).",
                brokers.len()
            )));
        }
        rf = Some(brokers.len());
        for (i, b) in brokers.iter().enumerate() {
            if brokers[..i].contains(b) {
                return Err(TopicError::InvalidReplicaAssignment(format!(
                    "The manual partition assignment includes the broker {b} more than once."
                )));
            }
            if !registered(*b) {
                return Err(TopicError::InvalidReplicaAssignment(format!(
                    "The manual partition assignment includes broker {b}, but no such broker is registered."
                )));
            }
        }
        *slot = Some(brokers.clone());
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every slot filled"))
        .collect())
}

/// The replica lists of a new topic, or why it is refused.
fn plan_topic(
    img: &ClusterImage,
    cfg: &Config,
    t: &NewTopic,
    rng: &mut Rng,
) -> Result<Vec<Vec<BrokerId>>, TopicError> {
    validate_topic_name(&t.name)?;
    if img.topics.contains_key(&t.name) {
        return Err(TopicError::AlreadyExists);
    }
    let assignment = if t.assignments.is_empty() {
        let partitions = if t.num_partitions == -1 {
            cfg.num_partitions
        } else {
            t.num_partitions
        };
        super::metadata::check_partition_count(partitions)?;
        let rf = if t.replication_factor == -1 {
            cfg.default_replication_factor
        } else {
            t.replication_factor
        };
        if rf <= 0 {
            return Err(TopicError::InvalidReplicationFactor(
                "Replication factor must be larger than 0.".into(),
            ));
        }
        let live = live_brokers(img);
        if rf as usize > live.len() {
            return Err(rf_error(rf as i64, live.len()));
        }
        let n = live.len();
        let (start, shift) = (rng.below(n), rng.below(n));
        assign_replicas(&live, partitions as usize, rf as usize, start, 0, shift)
    } else {
        manual_assignment(t, |b| img.brokers.contains_key(&b))?
    };
    if assignment.len() > PARTITIONS_PER_TOPIC_MAX as usize {
        return Err(TopicError::InvalidPartitions(format!(
            "Number of partitions {} exceeds Weir's limit of {PARTITIONS_PER_TOPIC_MAX} per topic.",
            assignment.len()
        )));
    }
    check_limits(img, &assignment)?;
    cfg.log
        .with_topic_overrides(&t.configs)
        .map_err(|e| TopicError::InvalidConfig(e.to_string()))?;
    Ok(assignment)
}

/// Applies `records` to the scratch image; a refusal (which would be a bug in a decision) is
/// reported as the item's error and nothing of it is kept.
fn try_apply(
    scratch: &mut ClusterImage,
    records: &[MetadataRecord],
    out: &mut Vec<MetadataRecord>,
) -> Result<(), TopicError> {
    let mut next = scratch.clone();
    let index = next.version + 1;
    if let Err(why) = next.apply_batch(index, records) {
        return Err(TopicError::InvalidRequest(format!(
            "The controller refused its own change: {why}"
        )));
    }
    next.version = index;
    *scratch = next;
    out.extend_from_slice(records);
    Ok(())
}

pub fn create_topics(
    img: &ClusterImage,
    cfg: &Config,
    topics: &[NewTopic],
    validate_only: bool,
    rng: &mut Rng,
) -> (Answers, Vec<MetadataRecord>) {
    let mut scratch = img.clone();
    let mut records = Vec::new();
    let answers = topics
        .iter()
        .map(|t| {
            let assignment = plan_topic(&scratch, cfg, t, rng)?;
            let answer = (assignment.len() as i32, assignment[0].len() as i16);
            let record = MetadataRecord::CreateTopic {
                name: t.name.clone(),
                id: uuid::Uuid::new_v4(),
                partitions: assignment,
                configs: t.configs.clone(),
            };
            try_apply(&mut scratch, &[record], &mut records)?;
            Ok(answer)
        })
        .collect();
    if validate_only {
        records.clear();
    }
    (answers, records)
}

pub fn delete_topics(img: &ClusterImage, names: &[String]) -> (Answers, Vec<MetadataRecord>) {
    let mut scratch = img.clone();
    let mut records = Vec::new();
    let answers = names
        .iter()
        .map(|n| {
            let t = scratch.topics.get(n).ok_or(TopicError::Unknown)?;
            if super::metadata::is_internal_topic(n) {
                return Err(TopicError::InvalidRequest(format!(
                    "Topic {n} is an internal topic and cannot be deleted"
                )));
            }
            let answer = (t.partitions.len() as i32, rf_of(&t.partitions));
            let record = MetadataRecord::DeleteTopic {
                name: n.clone(),
                id: t.id,
            };
            try_apply(&mut scratch, &[record], &mut records)?;
            Ok(answer)
        })
        .collect();
    (answers, records)
}

fn rf_of(parts: &[ClusterPartition]) -> i16 {
    parts.first().map(|p| p.replicas.len() as i16).unwrap_or(0)
}

pub fn create_partitions(
    img: &ClusterImage,
    _cfg: &Config,
    list: &[(String, i32)],
    validate_only: bool,
    rng: &mut Rng,
) -> (Answers, Vec<MetadataRecord>) {
    let mut scratch = img.clone();
    let mut records = Vec::new();
    let answers = list
        .iter()
        .map(|(name, count)| {
            let t = scratch.topics.get(name).ok_or(TopicError::Unknown)?;
            let current = t.partitions.len() as i32;
            if *count < current {
                return Err(TopicError::InvalidPartitions(format!(
                    "Topic currently has {current} partitions, which is higher than the requested {count}."
                )));
            }
            if *count == current {
                return Err(TopicError::InvalidPartitions(format!(
                    "Topic already has {current} partitions."
                )));
            }
            if *count > PARTITIONS_PER_TOPIC_MAX {
                return Err(TopicError::InvalidPartitions(format!(
                    "{count} partitions exceed Weir's limit of {PARTITIONS_PER_TOPIC_MAX} per topic."
                )));
            }
            let rf = rf_of(&t.partitions).max(1) as usize;
            let live = live_brokers(&scratch);
            if rf > live.len() {
                return Err(rf_error(rf as i64, live.len()));
            }
            // As Kafka: continue from where partition 0's leader sits among the brokers.
            let start = t
                .partitions
                .first()
                .and_then(|p| p.replicas.first())
                .and_then(|b| live.iter().position(|l| l == b))
                .unwrap_or_else(|| rng.below(live.len()));
            let shift = rng.below(live.len());
            let assignment = assign_replicas(
                &live,
                (*count - current) as usize,
                rf,
                start,
                current as usize,
                shift,
            );
            check_limits(&scratch, &assignment)?;
            let record = MetadataRecord::CreatePartitions {
                name: name.clone(),
                id: t.id,
                partitions: assignment,
            };
            try_apply(&mut scratch, &[record], &mut records)?;
            Ok((*count, rf as i16))
        })
        .collect();
    if validate_only {
        records.clear();
    }
    (answers, records)
}

pub fn alter_topic_configs(
    img: &ClusterImage,
    cfg: &Config,
    edits: &[(String, ConfigEdit)],
    validate_only: bool,
) -> (Answers, Vec<MetadataRecord>) {
    config_edits(img, edits, validate_only, |scratch, name, edit| {
        let t = scratch.topics.get(name).ok_or(TopicError::Unknown)?;
        let new = edit
            .clone()
            .apply(&t.configs, &cfg.log)
            .map_err(|e| TopicError::InvalidConfig(e.to_string()))?;
        cfg.log
            .with_topic_overrides(&new)
            .map_err(|e| TopicError::InvalidConfig(e.to_string()))?;
        Ok(config_changes(&t.configs, &new, |key, value| {
            MetadataRecord::TopicConfig {
                name: name.to_string(),
                key,
                value,
            }
        }))
    })
}

/// Resolves each (resource, edit) against the image as changed by the edits before it, into
/// records applied all or nothing per resource; validate_only keeps none of them.
fn config_edits(
    img: &ClusterImage,
    edits: &[(String, ConfigEdit)],
    validate_only: bool,
    changes_for: impl Fn(&ClusterImage, &str, &ConfigEdit) -> Result<Vec<MetadataRecord>, TopicError>,
) -> (Answers, Vec<MetadataRecord>) {
    let mut scratch = img.clone();
    let mut records = Vec::new();
    let answers = edits
        .iter()
        .map(|(name, edit)| {
            let changes = changes_for(&scratch, name, edit)?;
            try_apply(&mut scratch, &changes, &mut records)?;
            Ok((0, 0))
        })
        .collect();
    if validate_only {
        records.clear();
    }
    (answers, records)
}

/// One record per key whose value differs between `current` and `new` (value None: removed).
fn config_changes(
    current: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
    record: impl Fn(String, Option<String>) -> MetadataRecord,
) -> Vec<MetadataRecord> {
    let set = new
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| record(k.clone(), Some(v.clone())));
    let removed = current
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|k| record(k.clone(), None));
    set.chain(removed).collect()
}

/// A broker resource's dynamic configs after `edit`, validated as Kafka does.
pub fn broker_config_edit(
    resource: &str,
    current: &BTreeMap<String, String>,
    edit: ConfigEdit,
) -> Result<BTreeMap<String, String>, TopicError> {
    let new = edit
        .apply(current, &crate::config::LogConfig::default())
        .map_err(|e| TopicError::InvalidConfig(e.to_string()))?;
    crate::config::validate_broker_dynamic(&new, resource.is_empty()).map_err(|(code, msg)| {
        if code == crate::kafka::errors::INVALID_REQUEST {
            TopicError::InvalidRequest(msg)
        } else {
            TopicError::InvalidConfig(msg)
        }
    })?;
    Ok(new)
}

/// Dynamic broker config changes: one `BrokerConfig` record per key that changes.
pub fn alter_broker_configs(
    img: &ClusterImage,
    edits: &[(String, ConfigEdit)],
    validate_only: bool,
) -> (Answers, Vec<MetadataRecord>) {
    config_edits(img, edits, validate_only, |scratch, resource, edit| {
        let empty = BTreeMap::new();
        let current = scratch.broker_configs.get(resource).unwrap_or(&empty);
        let new = broker_config_edit(resource, current, edit.clone())?;
        Ok(config_changes(current, &new, |key, value| {
            MetadataRecord::BrokerConfig {
                resource: resource.to_string(),
                key,
                value,
            }
        }))
    })
}

/// Fences a broker and moves what it leads, as KRaft does: it leaves every ISR it is in unless
/// it is the last member (then the ISR stays and the partition has no leader, so no replica
/// that may lack acknowledged records is elected); a partition it led gets the first replica,
/// in replica order, that is in the new ISR and on a live broker. Leader epoch + 1 when the
/// leader changes; partition epoch + 1 with every change.
pub fn fence_broker(img: &ClusterImage, node: BrokerId) -> Vec<MetadataRecord> {
    let Some(b) = img.brokers.get(&node) else {
        return Vec::new();
    };
    let mut records = vec![MetadataRecord::FenceBroker {
        node_id: node,
        epoch: b.epoch,
    }];
    let live = |r: &BrokerId| *r != node && img.brokers.get(r).is_some_and(|b| !b.fenced);
    for (name, t) in &img.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            if p.leader != node && !p.isr.contains(&node) {
                continue;
            }
            let isr: Vec<BrokerId> = if p.isr == [node] {
                p.isr.clone()
            } else {
                p.isr.iter().copied().filter(|r| *r != node).collect()
            };
            let leader = if p.leader != node && p.leader != NO_LEADER {
                p.leader
            } else {
                p.replicas
                    .iter()
                    .copied()
                    .find(|r| isr.contains(r) && live(r))
                    .unwrap_or(NO_LEADER)
            };
            records.push(change(name, t.id, i, p, leader, isr));
        }
    }
    records
}

/// Unfences a broker; partitions without a leader whose ISR holds it get it as leader.
pub fn unfence_broker(img: &ClusterImage, node: BrokerId) -> Vec<MetadataRecord> {
    let Some(b) = img.brokers.get(&node) else {
        return Vec::new();
    };
    let mut records = vec![MetadataRecord::UnfenceBroker {
        node_id: node,
        epoch: b.epoch,
    }];
    for (name, t) in &img.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            if p.leader == NO_LEADER && p.isr.contains(&node) {
                records.push(change(name, t.id, i, p, node, p.isr.clone()));
            }
        }
    }
    records
}

/// A topic and one of its partitions, if both exist.
fn find_partition<'a>(
    img: &'a ClusterImage,
    topic: &str,
    partition: i32,
) -> Option<(&'a super::quorum::ClusterTopic, &'a ClusterPartition)> {
    let t = img.topics.get(topic)?;
    let p = usize::try_from(partition)
        .ok()
        .and_then(|i| t.partitions.get(i))?;
    Some((t, p))
}

/// A preferred election can make `want` the leader of `p`: it is registered, unfenced and in
/// the ISR.
fn can_lead(img: &ClusterImage, p: &ClusterPartition, want: BrokerId) -> bool {
    img.brokers.get(&want).is_some_and(|b| !b.fenced) && p.isr.contains(&want)
}

/// ElectLeaders: moves each partition's leadership to its preferred replica (the first) when
/// that replica is live and in the ISR. Answers per partition: NONE, ELECTION_NOT_NEEDED (it
/// leads already), PREFERRED_LEADER_NOT_AVAILABLE, UNKNOWN_TOPIC_OR_PARTITION. Unclean
/// elections are never run: a partition with a leader needs none (ELECTION_NOT_NEEDED), one
/// without gets ELIGIBLE_LEADERS_NOT_AVAILABLE.
pub fn elect_leaders(
    img: &ClusterImage,
    list: &[(String, i32)],
    preferred: bool,
) -> (Vec<Result<(i32, i16), TopicError>>, Vec<MetadataRecord>) {
    use crate::kafka::errors::{
        ELECTION_NOT_NEEDED, ELIGIBLE_LEADERS_NOT_AVAILABLE, PREFERRED_LEADER_NOT_AVAILABLE,
        UNKNOWN_TOPIC_OR_PARTITION,
    };
    let mut answers = Vec::with_capacity(list.len());
    let mut records = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (topic, partition) in list {
        let Some((t, p)) = find_partition(img, topic, *partition) else {
            answers.push(Ok((*partition, UNKNOWN_TOPIC_OR_PARTITION)));
            continue;
        };
        if !preferred {
            let code = if p.leader != NO_LEADER {
                ELECTION_NOT_NEEDED
            } else {
                ELIGIBLE_LEADERS_NOT_AVAILABLE
            };
            answers.push(Ok((*partition, code)));
            continue;
        }
        let Some(&want) = p.replicas.first() else {
            answers.push(Ok((*partition, PREFERRED_LEADER_NOT_AVAILABLE)));
            continue;
        };
        if p.leader == want {
            answers.push(Ok((*partition, ELECTION_NOT_NEEDED)));
            continue;
        }
        if !can_lead(img, p, want) {
            answers.push(Ok((*partition, PREFERRED_LEADER_NOT_AVAILABLE)));
            continue;
        }
        if seen.insert((topic.clone(), *partition)) {
            records.push(change(
                topic,
                t.id,
                *partition as usize,
                p,
                want,
                p.isr.clone(),
            ));
        }
        answers.push(Ok((*partition, 0)));
    }
    (answers, records)
}

/// Most preferred elections `leader_imbalance` proposes at once (Kafka's controller also
/// elects at most 1000 per pass and runs the next pass at once).
pub const MAX_ELECTIONS_PER_BALANCE: usize = 1000;

/// `auto.leader.rebalance.enable`: the partitions whose preferred (first) replica is live, in
/// the ISR and not leading, at most `MAX_ELECTIONS_PER_BALANCE` of them. As in Kafka's KRaft
/// controller there is no per-broker threshold: a ratio gate
/// (`leader.imbalance.per.broker.percentage`, ZooKeeper-mode Kafka) left a broker's last few
/// partitions led elsewhere for good once the others had moved back.
pub fn leader_imbalance(img: &ClusterImage) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for (name, t) in &img.topics {
        for (i, p) in t.partitions.iter().enumerate() {
            let Some(&want) = p.replicas.first() else {
                continue;
            };
            if p.leader != want && can_lead(img, p, want) {
                out.push((name.clone(), i as i32));
                if out.len() == MAX_ELECTIONS_PER_BALANCE {
                    return out;
                }
            }
        }
    }
    out
}

/// UnregisterBroker (decommissioning): removes a broker's registration, so it leaves the
/// metadata for good. Only a stopped (fenced) broker that holds no replica may go: a running
/// one would register again, and replicas on it would be lost (reassign them first).
pub fn unregister_broker(
    img: &ClusterImage,
    id: BrokerId,
) -> (Vec<Result<(i32, i16), TopicError>>, Vec<MetadataRecord>) {
    let Some(b) = img.brokers.get(&id) else {
        return (
            vec![Ok((0, crate::kafka::errors::BROKER_ID_NOT_REGISTERED))],
            Vec::new(),
        );
    };
    if !b.fenced {
        return (
            vec![Err(TopicError::InvalidRequest(format!(
                "Broker {id} is running: stop it before unregistering it"
            )))],
            Vec::new(),
        );
    }
    let held = img
        .topics
        .values()
        .flat_map(|t| t.partitions.iter())
        .filter(|p| p.replicas.contains(&id))
        .count();
    if held > 0 {
        return (
            vec![Err(TopicError::InvalidRequest(format!(
                "Broker {id} still holds replicas of {held} partitions: reassign them first"
            )))],
            Vec::new(),
        );
    }
    (
        vec![Ok((0, 0))],
        vec![MetadataRecord::UnregisterBroker {
            node_id: id,
            epoch: b.epoch,
        }],
    )
}

/// A leader's AlterPartition: its new ISR, if it still leads at the epochs it saw (else
/// FENCED_LEADER_EPOCH or INVALID_UPDATE_VERSION, as Kafka answers), and the ISR holds the
/// leader, only replicas, and only unfenced brokers joining (else INELIGIBLE_REPLICA).
pub fn alter_partition(
    img: &ClusterImage,
    topic: &str,
    partition: i32,
    leader: BrokerId,
    leader_epoch: i32,
    partition_epoch: i32,
    isr: &[BrokerId],
) -> (Vec<Result<(i32, i16), TopicError>>, Vec<MetadataRecord>) {
    use crate::kafka::errors::{
        FENCED_LEADER_EPOCH, INELIGIBLE_REPLICA, INVALID_UPDATE_VERSION, NOT_LEADER_OR_FOLLOWER,
        UNKNOWN_TOPIC_OR_PARTITION,
    };
    let answer = |code: i16| (vec![Ok((0, code))], Vec::new());
    let Some((t, p)) = find_partition(img, topic, partition) else {
        return answer(UNKNOWN_TOPIC_OR_PARTITION);
    };
    if p.leader != leader {
        return answer(NOT_LEADER_OR_FOLLOWER);
    }
    if leader_epoch != p.leader_epoch {
        return answer(FENCED_LEADER_EPOCH);
    }
    if partition_epoch != p.partition_epoch {
        return answer(INVALID_UPDATE_VERSION);
    }
    let mut new: Vec<BrokerId> = isr.to_vec();
    new.sort_unstable();
    new.dedup();
    let eligible = |r: &BrokerId| {
        p.replicas.contains(r)
            && (p.isr.contains(r) || img.brokers.get(r).is_some_and(|b| !b.fenced))
    };
    if !new.contains(&leader) || !new.iter().all(eligible) {
        return answer(INELIGIBLE_REPLICA);
    }
    // Kept in replica order, as the controller writes it elsewhere.
    let ordered: Vec<BrokerId> = p
        .replicas
        .iter()
        .copied()
        .filter(|r| new.contains(r))
        .collect();
    // A reassignment completes once every replica it adds is in sync.
    if !p.adding.is_empty() && p.adding.iter().all(|r| ordered.contains(r)) {
        let done = finish_reassignment(img, topic, t.id, partition, p, &p.target(), &ordered);
        return (vec![Ok((0, 0))], done.into_iter().collect());
    }
    if ordered == p.isr {
        return answer(0);
    }
    let record = change(topic, t.id, partition as usize, p, leader, ordered);
    (vec![Ok((0, 0))], vec![record])
}

/// The record that ends a reassignment at `target` (or cancels one, with the original
/// replicas): the replicas become `target`, the ISR keeps its members in it, and a leader
/// outside it hands over to the first in-sync target replica on a live broker. None when no
/// target replica is in sync (the reassignment waits).
fn finish_reassignment(
    img: &ClusterImage,
    topic: &str,
    id: uuid::Uuid,
    partition: i32,
    p: &ClusterPartition,
    target: &[BrokerId],
    isr: &[BrokerId],
) -> Option<MetadataRecord> {
    let new_isr: Vec<BrokerId> = target.iter().copied().filter(|r| isr.contains(r)).collect();
    if new_isr.is_empty() {
        return None;
    }
    let live = |r: &BrokerId| img.brokers.get(r).is_some_and(|b| !b.fenced);
    let leader = if new_isr.contains(&p.leader) {
        p.leader
    } else {
        new_isr.iter().copied().find(live).unwrap_or(NO_LEADER)
    };
    Some(MetadataRecord::PartitionReplicas {
        name: topic.to_string(),
        id,
        partition,
        replicas: target.to_vec(),
        adding: Vec::new(),
        removing: Vec::new(),
        leader,
        leader_epoch: next_leader_epoch(p, leader),
        isr: new_isr,
        partition_epoch: p.partition_epoch + 1,
    })
}

/// AlterPartitionReassignments (KIP-455): per partition, a target replica list (start or
/// replace a reassignment) or None (cancel one). Answers per partition, in order: NONE,
/// UNKNOWN_TOPIC_OR_PARTITION, INVALID_REPLICA_ASSIGNMENT (empty, duplicate or unregistered
/// brokers), NO_REASSIGNMENT_IN_PROGRESS (cancel without one).
pub fn alter_reassignments(
    img: &ClusterImage,
    list: &[(String, i32, Option<Vec<BrokerId>>)],
) -> (Vec<Result<(i32, i16), TopicError>>, Vec<MetadataRecord>) {
    use crate::kafka::errors::{
        INVALID_REPLICA_ASSIGNMENT, NO_REASSIGNMENT_IN_PROGRESS, UNKNOWN_TOPIC_OR_PARTITION,
    };
    let mut answers = Vec::with_capacity(list.len());
    let mut records = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (topic, partition, target) in list {
        let Some((t, p)) = find_partition(img, topic, *partition) else {
            answers.push(Ok((*partition, UNKNOWN_TOPIC_OR_PARTITION)));
            continue;
        };
        if !seen.insert((topic.clone(), *partition)) {
            answers.push(Err(TopicError::InvalidRequest(format!(
                "{topic}-{partition} is named twice"
            ))));
            continue;
        }
        let original = p.original();
        let Some(target) = target else {
            if p.adding.is_empty() && p.removing.is_empty() {
                answers.push(Ok((*partition, NO_REASSIGNMENT_IN_PROGRESS)));
                continue;
            }
            // Cancel: back to the original replicas.
            match finish_reassignment(img, topic, t.id, *partition, p, &original, &p.isr) {
                Some(r) => {
                    records.push(r);
                    answers.push(Ok((*partition, 0)));
                }
                None => answers.push(Err(TopicError::InvalidRequest(
                    "no original replica is in sync: the reassignment cannot be cancelled now"
                        .into(),
                ))),
            }
            continue;
        };
        let distinct: std::collections::BTreeSet<_> = target.iter().collect();
        if target.is_empty()
            || distinct.len() != target.len()
            || target.iter().any(|b| !img.brokers.contains_key(b))
        {
            answers.push(Ok((*partition, INVALID_REPLICA_ASSIGNMENT)));
            continue;
        }
        if *target == p.replicas && p.adding.is_empty() && p.removing.is_empty() {
            answers.push(Ok((*partition, 0)));
            continue;
        }
        let adding: Vec<BrokerId> = target
            .iter()
            .copied()
            .filter(|r| !original.contains(r))
            .collect();
        let removing: Vec<BrokerId> = original
            .iter()
            .copied()
            .filter(|r| !target.contains(r))
            .collect();
        // Nothing to copy: done at once (replicas only leave, or the order changes).
        if adding.is_empty() {
            if let Some(r) = finish_reassignment(img, topic, t.id, *partition, p, target, &p.isr) {
                records.push(r);
                answers.push(Ok((*partition, 0)));
                continue;
            }
        }
        let replicas: Vec<BrokerId> = target.iter().chain(removing.iter()).copied().collect();
        // The ISR keeps only replicas still listed (a replaced plan may drop some).
        let isr: Vec<BrokerId> = p
            .isr
            .iter()
            .copied()
            .filter(|r| replicas.contains(r))
            .collect();
        let leader = if isr.contains(&p.leader) {
            p.leader
        } else {
            NO_LEADER
        };
        records.push(MetadataRecord::PartitionReplicas {
            name: topic.clone(),
            id: t.id,
            partition: *partition,
            replicas,
            adding,
            removing,
            leader,
            leader_epoch: next_leader_epoch(p, leader),
            isr,
            partition_epoch: p.partition_epoch + 1,
        });
        answers.push(Ok((*partition, 0)));
    }
    (answers, records)
}

/// A partition's leader epoch once `leader` leads: bumped when the leader changes.
fn next_leader_epoch(p: &ClusterPartition, leader: BrokerId) -> i32 {
    if leader != p.leader {
        p.leader_epoch + 1
    } else {
        p.leader_epoch
    }
}

fn change(
    name: &str,
    id: uuid::Uuid,
    index: usize,
    p: &ClusterPartition,
    leader: BrokerId,
    isr: Vec<BrokerId>,
) -> MetadataRecord {
    MetadataRecord::PartitionChange {
        name: name.to_string(),
        id,
        partition: index as i32,
        leader,
        leader_epoch: next_leader_epoch(p, leader),
        isr,
        partition_epoch: p.partition_epoch + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::new(
            "127.0.0.1:9092".parse().unwrap(),
            std::path::PathBuf::from("/nonexistent"),
            1,
        )
    }

    fn apply(img: &mut ClusterImage, records: &[MetadataRecord]) {
        let index = img.version + 1;
        img.apply_batch(index, records).expect("the records apply");
        img.version = index;
    }

    /// An image with brokers 0..n registered and unfenced.
    fn cluster(n: i32) -> ClusterImage {
        let mut img = ClusterImage::default();
        for b in 0..n {
            apply(
                &mut img,
                &[MetadataRecord::RegisterBroker {
                    node_id: b,
                    host: "127.0.0.1".into(),
                    port: 9091 + b as u16,
                    rack: None,
                    incarnation: uuid::Uuid::new_v4(),
                }],
            );
            let epoch = img.brokers[&b].epoch;
            apply(
                &mut img,
                &[MetadataRecord::UnfenceBroker { node_id: b, epoch }],
            );
        }
        img
    }

    fn topic(name: &str, partitions: i32, rf: i16) -> NewTopic {
        NewTopic {
            name: name.into(),
            num_partitions: partitions,
            replication_factor: rf,
            configs: BTreeMap::new(),
            assignments: Vec::new(),
        }
    }

    #[test]
    fn assignment_is_kafkas_round_robin_with_shifted_followers() {
        // Kafka's documented example: 5 brokers, 10 partitions, RF 3, start index 0, shift 0.
        let a = assign_replicas(&[0, 1, 2, 3, 4], 10, 3, 0, 0, 0);
        let want: Vec<Vec<i32>> = vec![
            vec![0, 1, 2],
            vec![1, 2, 3],
            vec![2, 3, 4],
            vec![3, 4, 0],
            vec![4, 0, 1],
            vec![0, 2, 3],
            vec![1, 3, 4],
            vec![2, 4, 0],
            vec![3, 0, 1],
            vec![4, 1, 2],
        ];
        assert_eq!(a, want);
    }

    #[test]
    fn topics_spread_over_live_brokers_and_rf_above_them_is_refused() {
        let mut img = cluster(3);
        let mut rng = Rng::new(7);
        let (answers, records) = create_topics(
            &img,
            &cfg(),
            &[
                topic("a", 6, 3),
                topic("b", 6, 1),
                topic("a", 1, 1),
                topic("c", 1, 4),
            ],
            false,
            &mut rng,
        );
        assert_eq!(answers[0], Ok((6, 3)));
        assert_eq!(answers[1], Ok((6, 1)));
        assert_eq!(answers[2], Err(TopicError::AlreadyExists));
        assert!(
            matches!(&answers[3], Err(TopicError::InvalidReplicationFactor(m)) if m.contains("only 3 broker(s)")),
            "{:?}",
            answers[3]
        );
        apply(&mut img, &records);
        let a = &img.topics["a"];
        for p in &a.partitions {
            let mut r = p.replicas.clone();
            r.sort();
            assert_eq!(r, vec![0, 1, 2], "RF 3 on 3 brokers: every broker");
            assert_eq!(p.leader, p.replicas[0]);
        }
        let leaders: Vec<i32> = img.topics["b"]
            .partitions
            .iter()
            .map(|p| p.leader)
            .collect();
        for w in leaders.windows(2) {
            assert_eq!(w[1], (w[0] + 1) % 3, "round robin: {leaders:?}");
        }
        // validate_only decides but writes nothing.
        let (answers, records) = create_topics(&img, &cfg(), &[topic("d", 2, 2)], true, &mut rng);
        assert_eq!(answers, vec![Ok((2, 2))]);
        assert!(records.is_empty());
    }

    #[test]
    fn fenced_brokers_take_no_new_replicas() {
        let mut img = cluster(3);
        let r = fence_broker(&img, 2);
        apply(&mut img, &r);
        let (answers, records) = create_topics(
            &img,
            &cfg(),
            &[topic("t", 4, 2), topic("u", 1, 3)],
            false,
            &mut Rng::new(1),
        );
        assert_eq!(answers[0], Ok((4, 2)));
        assert!(matches!(
            answers[1],
            Err(TopicError::InvalidReplicationFactor(_))
        ));
        apply(&mut img, &records);
        assert!(img.topics["t"]
            .partitions
            .iter()
            .all(|p| !p.replicas.contains(&2)));
    }

    #[test]
    fn manual_assignments_name_registered_brokers() {
        let img = cluster(3);
        let mut t = topic("m", -1, -1);
        t.assignments = vec![(0, vec![2, 0]), (1, vec![0, 1])];
        let (answers, records) = create_topics(&img, &cfg(), &[t.clone()], false, &mut Rng::new(1));
        assert_eq!(answers, vec![Ok((2, 2))]);
        let MetadataRecord::CreateTopic { partitions, .. } = &records[0] else {
            panic!()
        };
        assert_eq!(partitions, &vec![vec![2, 0], vec![0, 1]]);
        t.assignments = vec![(0, vec![7])];
        let (answers, _) = create_topics(&img, &cfg(), &[t.clone()], false, &mut Rng::new(1));
        assert!(matches!(
            answers[0],
            Err(TopicError::InvalidReplicaAssignment(_))
        ));
        t.assignments = vec![(1, vec![0])];
        let (answers, _) = create_topics(&img, &cfg(), &[t], false, &mut Rng::new(1));
        assert!(matches!(
            answers[0],
            Err(TopicError::InvalidReplicaAssignment(_))
        ));
    }

    #[test]
    fn fencing_moves_leadership_and_unfencing_restores_leaderless_partitions() {
        let mut img = cluster(3);
        let mut f = topic("f", -1, -1);
        f.assignments = vec![(0, vec![0, 1, 2])];
        let mut g = topic("g", -1, -1);
        g.assignments = vec![(0, vec![0])];
        let (answers, records) = create_topics(&img, &cfg(), &[f, g], false, &mut Rng::new(1));
        assert_eq!(answers, vec![Ok((1, 3)), Ok((1, 1))]);
        apply(&mut img, &records);
        let records = fence_broker(&img, 0);
        apply(&mut img, &records);
        let p0 = &img.topics["f"].partitions[0];
        assert_eq!((p0.leader, p0.isr.clone()), (1, vec![1, 2]));
        assert_eq!((p0.leader_epoch, p0.partition_epoch), (1, 1));
        let p1 = &img.topics["g"].partitions[0];
        assert_eq!(
            (p1.leader, p1.isr.clone()),
            (-1, vec![0]),
            "the last ISR member keeps it"
        );
        assert!(img.brokers[&0].fenced);
        let r = unfence_broker(&img, 0);
        apply(&mut img, &r);
        let p1 = &img.topics["g"].partitions[0];
        assert_eq!((p1.leader, p1.leader_epoch), (0, 2));
        // Partition 0 stays with broker 1: broker 0 is out of its ISR until it catches up.
        assert_eq!(img.topics["f"].partitions[0].leader, 1);
    }

    #[test]
    fn rebalance_restores_every_preferred_leader_not_only_above_a_ratio() {
        let mut img = cluster(3);
        let mut t = topic("t", -1, -1);
        t.assignments = (0..20).map(|i| (i, vec![0, 1, 2])).collect();
        let (_, records) = create_topics(&img, &cfg(), &[t], false, &mut Rng::new(1));
        apply(&mut img, &records);
        assert!(leader_imbalance(&img).is_empty(), "all led by broker 0");
        let r = fence_broker(&img, 0);
        apply(&mut img, &r);
        let r = unfence_broker(&img, 0);
        apply(&mut img, &r);
        assert!(leader_imbalance(&img).is_empty(), "broker 0 is in no ISR");
        // Broker 0 catches up on 19 partitions: those 19 move back.
        for p in &mut img.topics.get_mut("t").unwrap().partitions[..19] {
            p.isr.push(0);
        }
        let list = leader_imbalance(&img);
        assert_eq!(list.len(), 19);
        let (_, records) = elect_leaders(&img, &list, true);
        apply(&mut img, &records);
        // Then the 20th: one of 20 (5%) is below Kafka's old 10% ratio, and still moves back.
        img.topics.get_mut("t").unwrap().partitions[19].isr.push(0);
        assert_eq!(leader_imbalance(&img), vec![("t".to_string(), 19)]);
        let list = leader_imbalance(&img);
        let (_, records) = elect_leaders(&img, &list, true);
        apply(&mut img, &records);
        assert!(img.topics["t"].partitions.iter().all(|p| p.leader == 0));
        assert!(leader_imbalance(&img).is_empty());
    }

    #[test]
    fn partitions_are_added_with_the_topics_rf_and_deleted_topics_go() {
        let mut img = cluster(3);
        let (_, records) =
            create_topics(&img, &cfg(), &[topic("p", 2, 2)], false, &mut Rng::new(3));
        apply(&mut img, &records);
        let (answers, records) = create_partitions(
            &img,
            &cfg(),
            &[("p".into(), 5), ("p".into(), 1), ("x".into(), 2)],
            false,
            &mut Rng::new(3),
        );
        assert_eq!(answers[0], Ok((5, 2)));
        assert!(matches!(answers[1], Err(TopicError::InvalidPartitions(_))));
        assert_eq!(answers[2], Err(TopicError::Unknown));
        apply(&mut img, &records);
        assert_eq!(img.topics["p"].partitions.len(), 5);
        assert!(img.topics["p"]
            .partitions
            .iter()
            .all(|p| p.replicas.len() == 2));
        let (answers, records) = delete_topics(&img, &["p".into(), "p".into()]);
        assert_eq!(answers[0], Ok((5, 2)));
        assert_eq!(answers[1], Err(TopicError::Unknown));
        apply(&mut img, &records);
        assert!(img.topics.is_empty());
    }
}
