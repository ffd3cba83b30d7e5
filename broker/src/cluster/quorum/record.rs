//! The metadata log's records and the image they build.
//!
//! A log entry carries one [`MetadataBatch`]: records the active controller decided together
//! (a topic and its partitions, a registration). A batch applies atomically: every record is
//! checked, and if one does not apply the image stays as it was and the batch is answered with
//! the reason. Records carry every value they set (ids, epochs, replica lists), never anything
//! the applier would have to invent, so every voter builds the same image from the same log.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Kafka's broker id (`node.id`).
pub type BrokerId = i32;

/// No leader (Kafka writes -1).
pub const NO_LEADER: BrokerId = -1;

/// Records per batch, checked by the submitter before a batch enters the log.
pub const BATCH_RECORDS_MAX: usize = 10_000;

/// One change to the cluster metadata. The serde tag is the record's name, so the on-disk and
/// on-wire form is self-describing JSON (`{"type":"FenceBroker","node_id":1,"epoch":7}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum MetadataRecord {
    /// A broker (re)registers. Its epoch becomes the log index of this record, as in KRaft, so
    /// a record about an older registration (a stale fence) is recognised and refused. A new
    /// registration starts fenced; the controller unfences it once it heartbeats.
    RegisterBroker {
        node_id: BrokerId,
        host: String,
        port: u16,
        rack: Option<String>,
        /// Random per process start: tells a restart from a duplicate registration.
        incarnation: Uuid,
    },
    FenceBroker {
        node_id: BrokerId,
        epoch: u64,
    },
    UnfenceBroker {
        node_id: BrokerId,
        epoch: u64,
    },
    UnregisterBroker {
        node_id: BrokerId,
        epoch: u64,
    },
    /// A new topic; each partition is its replica list, the first replica its leader, the ISR
    /// all replicas, leader and partition epochs 0.
    CreateTopic {
        name: String,
        id: Uuid,
        partitions: Vec<Vec<BrokerId>>,
        configs: BTreeMap<String, String>,
    },
    DeleteTopic {
        name: String,
        id: Uuid,
    },
    /// Partitions appended to a topic, numbered after the existing ones.
    CreatePartitions {
        name: String,
        id: Uuid,
        partitions: Vec<Vec<BrokerId>>,
    },
    /// A partition's new leader and ISR. `partition_epoch` must grow with every change and
    /// `leader_epoch` must not shrink, so a late or replayed change is refused.
    PartitionChange {
        name: String,
        id: Uuid,
        partition: i32,
        leader: BrokerId,
        leader_epoch: i32,
        isr: Vec<BrokerId>,
        partition_epoch: i32,
    },
    /// A partition's whole replica state: a reassignment begins, completes or is cancelled
    /// (KIP-455). Checked like `PartitionChange`; `adding` and `removing` are replicas.
    PartitionReplicas {
        name: String,
        id: Uuid,
        partition: i32,
        replicas: Vec<BrokerId>,
        adding: Vec<BrokerId>,
        removing: Vec<BrokerId>,
        leader: BrokerId,
        leader_epoch: i32,
        isr: Vec<BrokerId>,
        partition_epoch: i32,
    },
    /// Producer ids below `end` are handed out (to `node_id`'s block); `end` only grows.
    ProducerIdBlock {
        node_id: BrokerId,
        end: i64,
    },
    /// Sets (`Some`) or removes (`None`) one topic config override.
    TopicConfig {
        name: String,
        key: String,
        value: Option<String>,
    },
    /// Sets (`Some`) or removes (`None`) one dynamic broker config (KIP-226): for broker
    /// `resource` (its node id as a string), or for every broker when `resource` is "".
    BrokerConfig {
        resource: String,
        key: String,
        value: Option<String>,
    },
}

/// The application data of one log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataBatch {
    pub records: Vec<MetadataRecord>,
}

/// What applying one entry did: `rejected` names why a batch did not apply (image unchanged).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyOutcome {
    pub rejected: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerRegistration {
    pub node_id: BrokerId,
    pub host: String,
    pub port: u16,
    pub rack: Option<String>,
    pub incarnation: Uuid,
    /// Log index of the registration record.
    pub epoch: u64,
    pub fenced: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPartition {
    /// While a reassignment runs: the target replicas, then those being removed (KIP-455).
    pub replicas: Vec<BrokerId>,
    pub isr: Vec<BrokerId>,
    pub leader: BrokerId,
    pub leader_epoch: i32,
    pub partition_epoch: i32,
    /// A running reassignment: replicas joining, and replicas leaving once they have joined.
    #[serde(default)]
    pub adding: Vec<BrokerId>,
    #[serde(default)]
    pub removing: Vec<BrokerId>,
}

impl ClusterPartition {
    /// The replicas a running reassignment moves to (all replicas otherwise).
    pub fn target(&self) -> Vec<BrokerId> {
        self.replicas
            .iter()
            .copied()
            .filter(|r| !self.removing.contains(r))
            .collect()
    }

    /// The replicas before a running reassignment began.
    pub fn original(&self) -> Vec<BrokerId> {
        self.replicas
            .iter()
            .copied()
            .filter(|r| !self.adding.contains(r))
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterTopic {
    pub id: Uuid,
    pub partitions: Vec<ClusterPartition>,
    pub configs: BTreeMap<String, String>,
}

/// The committed cluster metadata, as every voter's state machine holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterImage {
    /// Log index of the last entry applied (0: nothing applied).
    pub version: u64,
    pub brokers: BTreeMap<BrokerId, BrokerRegistration>,
    pub topics: BTreeMap<String, ClusterTopic>,
    pub producer_id_block_end: i64,
    /// Dynamic broker configs: resource ("" = the cluster-wide default, else a node id) ->
    /// key -> value.
    #[serde(default)]
    pub broker_configs: BTreeMap<String, BTreeMap<String, String>>,
}

impl ClusterImage {
    /// Applies one batch at `log_index`, all or nothing. `version` is set by the caller (every
    /// entry moves it, applied or not).
    pub fn apply_batch(
        &mut self,
        log_index: u64,
        records: &[MetadataRecord],
    ) -> Result<(), String> {
        if records.len() > BATCH_RECORDS_MAX {
            return Err(format!(
                "batch of {} records exceeds {BATCH_RECORDS_MAX}",
                records.len()
            ));
        }
        match records {
            [] => Ok(()),
            // One record: `apply_record` checks everything before it changes anything.
            [one] => self.apply_record(log_index, one),
            many => {
                let mut next = self.clone();
                for (i, r) in many.iter().enumerate() {
                    next.apply_record(log_index, r)
                        .map_err(|e| format!("record {i}: {e}"))?;
                }
                *self = next;
                Ok(())
            }
        }
    }

    fn topic_mut(&mut self, name: &str, id: Uuid) -> Result<&mut ClusterTopic, String> {
        match self.topics.get_mut(name) {
            Some(t) if t.id == id => Ok(t),
            Some(t) => Err(format!("topic {name} has id {}, not {id}", t.id)),
            None => Err(format!("unknown topic {name}")),
        }
    }

    fn partition_mut(
        &mut self,
        name: &str,
        id: Uuid,
        partition: i32,
    ) -> Result<&mut ClusterPartition, String> {
        let t = self.topic_mut(name, id)?;
        usize::try_from(partition)
            .ok()
            .and_then(|i| t.partitions.get_mut(i))
            .ok_or_else(|| format!("unknown partition {name}-{partition}"))
    }

    fn broker_mut(
        &mut self,
        node_id: BrokerId,
        epoch: u64,
    ) -> Result<&mut BrokerRegistration, String> {
        match self.brokers.get_mut(&node_id) {
            Some(b) if b.epoch == epoch => Ok(b),
            Some(b) => Err(format!(
                "broker {node_id} has epoch {}, not {epoch}",
                b.epoch
            )),
            None => Err(format!("broker {node_id} is not registered")),
        }
    }

    /// Checks one record against the image, then applies it; on error nothing changed.
    fn apply_record(&mut self, log_index: u64, r: &MetadataRecord) -> Result<(), String> {
        use MetadataRecord::*;
        match r {
            RegisterBroker {
                node_id,
                host,
                port,
                rack,
                incarnation,
            } => {
                if *node_id < 0 {
                    return Err(format!("invalid broker id {node_id}"));
                }
                self.brokers.insert(
                    *node_id,
                    BrokerRegistration {
                        node_id: *node_id,
                        host: host.clone(),
                        port: *port,
                        rack: rack.clone(),
                        incarnation: *incarnation,
                        epoch: log_index,
                        fenced: true,
                    },
                );
            }
            FenceBroker { node_id, epoch } => self.broker_mut(*node_id, *epoch)?.fenced = true,
            UnfenceBroker { node_id, epoch } => self.broker_mut(*node_id, *epoch)?.fenced = false,
            UnregisterBroker { node_id, epoch } => {
                self.broker_mut(*node_id, *epoch)?;
                self.brokers.remove(node_id);
            }
            CreateTopic {
                name,
                id,
                partitions,
                configs,
            } => {
                if name.is_empty() {
                    return Err("empty topic name".into());
                }
                if self.topics.contains_key(name) {
                    return Err(format!("topic {name} already exists"));
                }
                if self.topics.values().any(|t| t.id == *id) {
                    return Err(format!("topic id {id} is in use"));
                }
                if partitions.is_empty() {
                    return Err(format!("topic {name} has no partitions"));
                }
                let parts = new_partitions(partitions)?;
                self.topics.insert(
                    name.clone(),
                    ClusterTopic {
                        id: *id,
                        partitions: parts,
                        configs: configs.clone(),
                    },
                );
            }
            DeleteTopic { name, id } => {
                self.topic_mut(name, *id)?;
                self.topics.remove(name);
            }
            CreatePartitions {
                name,
                id,
                partitions,
            } => {
                let parts = new_partitions(partitions)?;
                let t = self.topic_mut(name, *id)?;
                if parts.is_empty() {
                    return Err(format!("no partitions to add to {name}"));
                }
                t.partitions.extend(parts);
            }
            PartitionChange {
                name,
                id,
                partition,
                leader,
                leader_epoch,
                isr,
                partition_epoch,
            } => {
                let p = self.partition_mut(name, *id, *partition)?;
                let replicas = p.replicas.clone();
                check_partition_change(
                    p,
                    name,
                    *partition,
                    &replicas,
                    *leader,
                    *leader_epoch,
                    isr,
                    *partition_epoch,
                )?;
                p.leader = *leader;
                p.leader_epoch = *leader_epoch;
                p.isr = isr.clone();
                p.partition_epoch = *partition_epoch;
            }
            PartitionReplicas {
                name,
                id,
                partition,
                replicas,
                adding,
                removing,
                leader,
                leader_epoch,
                isr,
                partition_epoch,
            } => {
                let p = self.partition_mut(name, *id, *partition)?;
                let set: BTreeSet<_> = replicas.iter().collect();
                if replicas.is_empty()
                    || set.len() != replicas.len()
                    || replicas.iter().any(|b| *b < 0)
                {
                    return Err(format!(
                        "bad replica list {replicas:?} for {name}-{partition}"
                    ));
                }
                if adding.iter().chain(removing).any(|b| !set.contains(b)) {
                    return Err(format!(
                        "adding or removing of {name}-{partition} names a non-replica"
                    ));
                }
                check_partition_change(
                    p,
                    name,
                    *partition,
                    replicas,
                    *leader,
                    *leader_epoch,
                    isr,
                    *partition_epoch,
                )?;
                p.replicas = replicas.clone();
                p.adding = adding.clone();
                p.removing = removing.clone();
                p.leader = *leader;
                p.leader_epoch = *leader_epoch;
                p.isr = isr.clone();
                p.partition_epoch = *partition_epoch;
            }
            ProducerIdBlock { end, .. } => {
                if *end <= self.producer_id_block_end {
                    return Err(format!(
                        "producer id block end {end} does not pass {}",
                        self.producer_id_block_end
                    ));
                }
                self.producer_id_block_end = *end;
            }
            TopicConfig { name, key, value } => {
                let t = self
                    .topics
                    .get_mut(name)
                    .ok_or_else(|| format!("unknown topic {name}"))?;
                match value {
                    Some(v) => {
                        t.configs.insert(key.clone(), v.clone());
                    }
                    None => {
                        t.configs.remove(key);
                    }
                }
            }
            BrokerConfig {
                resource,
                key,
                value,
            } => {
                if !resource.is_empty() && resource.parse::<BrokerId>().map_or(true, |b| b < 0) {
                    return Err(format!("bad broker config resource {resource:?}"));
                }
                match value {
                    Some(v) => {
                        self.broker_configs
                            .entry(resource.clone())
                            .or_default()
                            .insert(key.clone(), v.clone());
                    }
                    None => {
                        if let Some(m) = self.broker_configs.get_mut(resource) {
                            m.remove(key);
                            if m.is_empty() {
                                self.broker_configs.remove(resource);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// New partitions from replica lists: leader the first replica, ISR all replicas.
fn new_partitions(lists: &[Vec<BrokerId>]) -> Result<Vec<ClusterPartition>, String> {
    lists
        .iter()
        .enumerate()
        .map(|(i, replicas)| {
            if replicas.is_empty() {
                return Err(format!("partition {i} has no replicas"));
            }
            if replicas.iter().any(|b| *b < 0) {
                return Err(format!("partition {i} names an invalid broker id"));
            }
            if replicas.iter().collect::<BTreeSet<_>>().len() != replicas.len() {
                return Err(format!("partition {i} names a broker twice"));
            }
            Ok(ClusterPartition {
                replicas: replicas.clone(),
                isr: replicas.clone(),
                leader: replicas[0],
                leader_epoch: 0,
                partition_epoch: 0,
                adding: Vec::new(),
                removing: Vec::new(),
            })
        })
        .collect()
}

/// The checks every leader/ISR change of a partition passes (`PartitionChange`,
/// `PartitionReplicas`): the partition epoch grows, the leader epoch does not shrink, the
/// leader is in the ISR, and the ISR holds distinct members of `replicas`.
#[allow(clippy::too_many_arguments)]
fn check_partition_change(
    p: &ClusterPartition,
    name: &str,
    partition: i32,
    replicas: &[BrokerId],
    leader: BrokerId,
    leader_epoch: i32,
    isr: &[BrokerId],
    partition_epoch: i32,
) -> Result<(), String> {
    if partition_epoch <= p.partition_epoch {
        return Err(format!(
            "stale change of {name}-{partition}: partition epoch {partition_epoch} <= {}",
            p.partition_epoch
        ));
    }
    if leader_epoch < p.leader_epoch {
        return Err(format!(
            "stale change of {name}-{partition}: leader epoch {leader_epoch} < {}",
            p.leader_epoch
        ));
    }
    if leader != NO_LEADER && !isr.contains(&leader) {
        return Err(format!(
            "leader {leader} of {name}-{partition} is not in its ISR"
        ));
    }
    if let Some(b) = isr.iter().find(|b| !replicas.contains(b)) {
        return Err(format!(
            "ISR member {b} of {name}-{partition} is not a replica"
        ));
    }
    if isr.iter().collect::<BTreeSet<_>>().len() != isr.len() {
        return Err(format!("duplicate ISR member in {name}-{partition}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use MetadataRecord::*;

    fn register(id: BrokerId) -> MetadataRecord {
        RegisterBroker {
            node_id: id,
            host: "127.0.0.1".into(),
            port: 9092 + id as u16,
            rack: None,
            incarnation: Uuid::from_u128(id as u128),
        }
    }

    #[test]
    fn records_apply_with_their_checks() {
        let mut img = ClusterImage::default();
        img.apply_batch(3, &[register(1)]).unwrap();
        assert_eq!(img.brokers[&1].epoch, 3);
        assert!(img.brokers[&1].fenced);
        assert!(img
            .apply_batch(
                4,
                &[UnfenceBroker {
                    node_id: 1,
                    epoch: 2
                }]
            )
            .is_err());
        img.apply_batch(
            4,
            &[UnfenceBroker {
                node_id: 1,
                epoch: 3,
            }],
        )
        .unwrap();
        assert!(!img.brokers[&1].fenced);

        let id = Uuid::from_u128(7);
        let create = CreateTopic {
            name: "t".into(),
            id,
            partitions: vec![vec![1, 2], vec![2, 1]],
            configs: BTreeMap::new(),
        };
        img.apply_batch(5, std::slice::from_ref(&create)).unwrap();
        assert!(img.apply_batch(6, &[create]).is_err());
        assert_eq!(img.topics["t"].partitions[1].leader, 2);
        let change = PartitionChange {
            name: "t".into(),
            id,
            partition: 0,
            leader: 2,
            leader_epoch: 1,
            isr: vec![2],
            partition_epoch: 1,
        };
        img.apply_batch(7, std::slice::from_ref(&change)).unwrap();
        assert!(img.apply_batch(8, &[change]).unwrap_err().contains("stale"));
        assert!(img
            .apply_batch(
                8,
                &[PartitionChange {
                    name: "t".into(),
                    id,
                    partition: 0,
                    leader: 3,
                    leader_epoch: 2,
                    isr: vec![3],
                    partition_epoch: 2,
                }]
            )
            .is_err());
        img.apply_batch(
            9,
            &[ProducerIdBlock {
                node_id: 1,
                end: 1000,
            }],
        )
        .unwrap();
        assert!(img
            .apply_batch(
                10,
                &[ProducerIdBlock {
                    node_id: 1,
                    end: 1000
                }]
            )
            .is_err());
    }

    #[test]
    fn a_batch_applies_all_or_nothing() {
        let mut img = ClusterImage::default();
        let before = img.clone();
        let err = img
            .apply_batch(
                1,
                &[
                    register(1),
                    DeleteTopic {
                        name: "missing".into(),
                        id: Uuid::nil(),
                    },
                ],
            )
            .unwrap_err();
        assert!(err.starts_with("record 1:"), "{err}");
        assert_eq!(img, before);
        img.apply_batch(2, &[register(1), register(2)]).unwrap();
        assert_eq!(img.brokers.len(), 2);
    }
}
