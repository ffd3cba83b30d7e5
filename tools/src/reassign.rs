//! `weir reassign-partitions`: kafka-reassign-partitions.sh's verbs and JSON files, over
//! AlterPartitionReassignments and ListPartitionReassignments (KIP-455).
//!
//! Files, as Kafka writes them:
//! - topics to move: `{"version":1,"topics":[{"topic":"t"}]}`
//! - a plan: `{"version":1,"partitions":[{"topic":"t","partition":0,"replicas":[1,2],"log_dirs":["any","any"]}]}`

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use kafka_protocol::messages::alter_partition_reassignments_request::{
    ReassignablePartition, ReassignableTopic,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use serde::{Deserialize, Serialize};

use crate::client::conn::Conn;
use crate::client::metadata::Cluster;
use crate::error_name;

#[derive(Deserialize)]
pub struct TopicsToMove {
    pub topics: Vec<TopicName_>,
}

#[derive(Deserialize)]
pub struct TopicName_ {
    pub topic: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub version: i32,
    pub partitions: Vec<PlanPartition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanPartition {
    pub topic: String,
    pub partition: i32,
    pub replicas: Vec<i32>,
    #[serde(default)]
    pub log_dirs: Vec<String>,
}

impl Plan {
    fn new(mut partitions: Vec<PlanPartition>) -> Plan {
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        for p in &mut partitions {
            p.log_dirs = vec!["any".into(); p.replicas.len()];
        }
        Plan {
            version: 1,
            partitions,
        }
    }

    /// Orders the partitions by topic and partition, as every listing of a plan here is.
    pub fn sort(&mut self) {
        self.partitions
            .sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    }

    /// `t-0,t-1`: the plan's partitions as Kafka's tool lists them.
    pub fn partition_names(&self) -> String {
        self.partitions
            .iter()
            .map(|p| format!("{}-{}", p.topic, p.partition))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("a plan serialises")
    }
}

/// Kafka's rack-unaware assignment of `partitions` partitions with `rf` replicas over
/// `brokers`: leaders round robin, followers shifted so replicas spread evenly.
pub fn assign(brokers: &[i32], partitions: i32, rf: usize) -> Result<Vec<Vec<i32>>> {
    let n = brokers.len();
    if rf == 0 || rf > n {
        bail!("replication factor {rf} larger than the {n} brokers listed");
    }
    let mut out = Vec::new();
    let mut shift = 0usize;
    for p in 0..partitions.max(0) as usize {
        if p > 0 && p % n == 0 {
            shift += 1;
        }
        let first = p % n;
        let mut replicas = vec![brokers[first]];
        for j in 0..rf - 1 {
            let idx = (first + 1 + (shift + j) % (n - 1).max(1)) % n;
            replicas.push(brokers[idx]);
        }
        out.push(replicas);
    }
    Ok(out)
}

/// `--generate`: the current assignment of the listed topics and a proposal over `brokers`.
pub fn generate(conn: &mut Conn, topics: &TopicsToMove, brokers: &[i32]) -> Result<(Plan, Plan)> {
    let names: Vec<String> = topics.topics.iter().map(|t| t.topic.clone()).collect();
    let cluster = Cluster::fetch(conn, Some(&names), false)?;
    let mut current = Vec::new();
    let mut proposed = Vec::new();
    for name in &names {
        let t = cluster
            .topics
            .get(name)
            .filter(|t| t.error == 0)
            .with_context(|| format!("topic {name} does not exist"))?;
        let rf = t.replicas.first().map(|r| r.len()).unwrap_or(1);
        for (p, replicas) in t.replicas.iter().enumerate() {
            current.push(PlanPartition {
                topic: name.clone(),
                partition: p as i32,
                replicas: replicas.clone(),
                log_dirs: Vec::new(),
            });
        }
        for (p, replicas) in assign(brokers, t.replicas.len() as i32, rf)?
            .into_iter()
            .enumerate()
        {
            proposed.push(PlanPartition {
                topic: name.clone(),
                partition: p as i32,
                replicas,
                log_dirs: Vec::new(),
            });
        }
    }
    Ok((Plan::new(current), Plan::new(proposed)))
}

/// The current assignment of the partitions a plan names (for rollback).
pub fn current_of(conn: &mut Conn, plan: &Plan) -> Result<Plan> {
    let names: Vec<String> = plan
        .partitions
        .iter()
        .map(|p| p.topic.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let cluster = Cluster::fetch(conn, Some(&names), false)?;
    let mut out = Vec::new();
    for p in &plan.partitions {
        let replicas = cluster
            .topics
            .get(&p.topic)
            .and_then(|t| t.replicas.get(p.partition as usize))
            .with_context(|| format!("partition {}-{} does not exist", p.topic, p.partition))?;
        out.push(PlanPartition {
            topic: p.topic.clone(),
            partition: p.partition,
            replicas: replicas.clone(),
            log_dirs: Vec::new(),
        });
    }
    Ok(Plan::new(out))
}

/// `--execute` (targets) or `--cancel` (None): AlterPartitionReassignments. Errors name each
/// refused partition.
pub fn alter(conn: &mut Conn, plan: &Plan, cancel: bool) -> Result<()> {
    let mut by_topic: BTreeMap<&str, Vec<ReassignablePartition>> = BTreeMap::new();
    for p in &plan.partitions {
        by_topic.entry(&p.topic).or_default().push(
            ReassignablePartition::default()
                .with_partition_index(p.partition)
                .with_replicas(if cancel {
                    None
                } else {
                    Some(p.replicas.iter().map(|&b| BrokerId(b)).collect())
                }),
        );
    }
    let req = AlterPartitionReassignmentsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(
            by_topic
                .into_iter()
                .map(|(t, parts)| {
                    ReassignableTopic::default()
                        .with_name(TopicName(StrBytes::from_string(t.to_string())))
                        .with_partitions(parts)
                })
                .collect(),
        );
    let (r, _): (AlterPartitionReassignmentsResponse, i16) =
        conn.call(ApiKey::AlterPartitionReassignments, 0, &req)?;
    if r.error_code != 0 {
        bail!("the reassignment was refused: {}", error_name(r.error_code));
    }
    let mut errors = Vec::new();
    for t in &r.responses {
        for p in &t.partitions {
            if p.error_code != 0 {
                errors.push(format!(
                    "{}-{}: {}{}",
                    t.name.0.as_str(),
                    p.partition_index,
                    error_name(p.error_code),
                    p.error_message
                        .as_ref()
                        .map(|m| format!(" ({})", m.as_str()))
                        .unwrap_or_default()
                ));
            }
        }
    }
    if !errors.is_empty() {
        bail!("some partitions were refused: {}", errors.join(", "));
    }
    Ok(())
}

/// Partitions with a reassignment in progress.
pub fn in_progress(conn: &mut Conn) -> Result<BTreeSet<(String, i32)>> {
    let (r, _): (ListPartitionReassignmentsResponse, i16) = conn.call(
        ApiKey::ListPartitionReassignments,
        0,
        &ListPartitionReassignmentsRequest::default()
            .with_timeout_ms(30_000)
            .with_topics(None),
    )?;
    if r.error_code != 0 {
        bail!("listing reassignments: {}", error_name(r.error_code));
    }
    Ok(r.topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.name.0.to_string(), p.partition_index))
        })
        .collect())
}

/// `--verify`: one line per partition of the plan, as Kafka prints them; true when all are
/// complete (in progress: still listed, or the replicas differ from the plan).
pub fn verify(conn: &mut Conn, plan: &Plan) -> Result<(bool, Vec<String>)> {
    let running = in_progress(conn)?;
    let current = current_of(conn, plan)?;
    let mut done = true;
    let mut lines = vec!["Status of partition reassignment:".to_string()];
    for (want, now) in plan.partitions.iter().zip(&current.partitions) {
        let complete = !running.contains(&(want.topic.clone(), want.partition))
            && want.replicas == now.replicas;
        done &= complete;
        lines.push(format!(
            "Reassignment of partition {}-{} is {}.",
            want.topic,
            want.partition,
            if complete {
                "completed"
            } else {
                "still in progress"
            }
        ));
    }
    Ok((done, lines))
}

/// UnregisterBroker (KIP-500 era): removes a stopped broker that holds no replicas.
pub fn unregister(conn: &mut Conn, broker: i32) -> Result<()> {
    let (r, _): (UnregisterBrokerResponse, i16) = conn.call(
        ApiKey::UnregisterBroker,
        0,
        &UnregisterBrokerRequest::default().with_broker_id(BrokerId(broker)),
    )?;
    if r.error_code != 0 {
        bail!(
            "unregistering broker {broker}: {}{}",
            error_name(r.error_code),
            r.error_message
                .as_ref()
                .map(|m| format!(" ({})", m.as_str()))
                .unwrap_or_default()
        );
    }
    Ok(())
}

const LEADER_RATE: &str = "leader.replication.throttled.rate";
const FOLLOWER_RATE: &str = "follower.replication.throttled.rate";
const LEADER_REPLICAS: &str = "leader.replication.throttled.replicas";
const FOLLOWER_REPLICAS: &str = "follower.replication.throttled.replicas";

/// The throttled-replica lists a plan needs, per topic, as Kafka's tool computes them: for
/// every partition whose replicas change, the leader side lists its current replicas (any of
/// them may lead) and the follower side the replicas it gains.
pub fn throttled_replicas(current: &Plan, proposed: &Plan) -> BTreeMap<String, (String, String)> {
    let mut out: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for (now, want) in current.partitions.iter().zip(&proposed.partitions) {
        if now.replicas == want.replicas {
            continue;
        }
        let e = out.entry(want.topic.clone()).or_default();
        for b in &now.replicas {
            e.0.push(format!("{}:{b}", want.partition));
        }
        for b in want.replicas.iter().filter(|b| !now.replicas.contains(b)) {
            e.1.push(format!("{}:{b}", want.partition));
        }
    }
    out.into_iter()
        .map(|(t, (l, f))| (t, (l.join(","), f.join(","))))
        .collect()
}

/// `--execute --throttle`: sets the topic throttled-replica lists, then the rate on every
/// broker the plan touches (each broker's resource sent to that broker). Returns the brokers.
pub fn set_throttles(
    conn: &mut Conn,
    current: &Plan,
    proposed: &Plan,
    rate: u64,
) -> Result<Vec<i32>> {
    for (topic, (leader, follower)) in throttled_replicas(current, proposed) {
        crate::admin::alter_configs(
            conn,
            crate::admin::RESOURCE_TOPIC,
            &topic,
            &[
                (LEADER_REPLICAS.to_string(), leader),
                (FOLLOWER_REPLICAS.to_string(), follower),
            ],
            &[],
        )?;
    }
    let brokers: BTreeSet<i32> = current
        .partitions
        .iter()
        .chain(&proposed.partitions)
        .flat_map(|p| p.replicas.iter().copied())
        .collect();
    let cluster = Cluster::fetch(conn, Some(&[]), false)?;
    let set = [
        (LEADER_RATE.to_string(), rate.to_string()),
        (FOLLOWER_RATE.to_string(), rate.to_string()),
    ];
    for b in &brokers {
        let addr = cluster
            .brokers
            .get(b)
            .with_context(|| format!("broker {b} is not in the cluster's metadata"))?;
        alter_broker_on(addr, *b, &set, &[])?;
    }
    Ok(brokers.into_iter().collect())
}

/// IncrementalAlterConfigs of broker `b`'s own resource, sent to that broker (at `addr`).
fn alter_broker_on(addr: &str, b: i32, set: &[(String, String)], delete: &[String]) -> Result<()> {
    let mut c = Conn::connect(
        addr,
        "weir-reassign-partitions",
        std::time::Duration::from_secs(30),
    )?;
    crate::admin::alter_configs(
        &mut c,
        crate::admin::RESOURCE_BROKER,
        &b.to_string(),
        set,
        delete,
    )
}

/// `--verify` once every partition is complete: removes the rates from every live broker and
/// the throttled-replica lists from the plan's topics. Returns the lines Kafka's tool prints.
pub fn clear_throttles(conn: &mut Conn, plan: &Plan) -> Result<Vec<String>> {
    let cluster = Cluster::fetch(conn, Some(&[]), false)?;
    let mut brokers: Vec<(i32, String)> = cluster.brokers.into_iter().collect();
    brokers.sort();
    let rates = [LEADER_RATE.to_string(), FOLLOWER_RATE.to_string()];
    for (b, addr) in &brokers {
        alter_broker_on(addr, *b, &[], &rates)?;
    }
    let topics: BTreeSet<&str> = plan.partitions.iter().map(|p| p.topic.as_str()).collect();
    let lists = [LEADER_REPLICAS.to_string(), FOLLOWER_REPLICAS.to_string()];
    for t in &topics {
        crate::admin::alter_configs(conn, crate::admin::RESOURCE_TOPIC, t, &[], &lists)?;
    }
    Ok(vec![
        format!(
            "Clearing broker-level throttles on brokers {}",
            brokers
                .iter()
                .map(|(b, _)| b.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
        format!(
            "Clearing topic-level throttles on topic {}",
            topics.into_iter().collect::<Vec<_>>().join(",")
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_spreads_leaders_and_replicas() {
        let a = assign(&[0, 1, 2, 3], 8, 2).unwrap();
        let leaders: Vec<i32> = a.iter().map(|r| r[0]).collect();
        assert_eq!(leaders, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        let mut count = BTreeMap::new();
        for r in &a {
            assert_eq!(r.iter().collect::<BTreeSet<_>>().len(), 2);
            for b in r {
                *count.entry(*b).or_insert(0) += 1;
            }
        }
        assert!(count.values().all(|&n| n == 4), "{count:?}");
        assert!(assign(&[0, 1], 3, 3).is_err());
        let plan = Plan::new(vec![PlanPartition {
            topic: "t".into(),
            partition: 0,
            replicas: vec![1, 2],
            log_dirs: vec![],
        }]);
        assert_eq!(
            plan.json(),
            r#"{"version":1,"partitions":[{"topic":"t","partition":0,"replicas":[1,2],"log_dirs":["any","any"]}]}"#
        );
    }

    #[test]
    fn throttled_replicas_name_sources_and_new_replicas() {
        let part = |t: &str, p, r: &[i32]| PlanPartition {
            topic: t.into(),
            partition: p,
            replicas: r.to_vec(),
            log_dirs: vec![],
        };
        let current = Plan::new(vec![
            part("a", 0, &[0, 1]),
            part("a", 1, &[1, 2]),
            part("b", 0, &[2, 0]),
        ]);
        let proposed = Plan::new(vec![
            part("a", 0, &[0, 3]),
            part("a", 1, &[1, 2]),
            part("b", 0, &[3, 1]),
        ]);
        let t = throttled_replicas(&current, &proposed);
        assert_eq!(t.len(), 2);
        assert_eq!(t["a"], ("0:0,0:1".to_string(), "0:3".to_string()));
        assert_eq!(t["b"], ("0:2,0:0".to_string(), "0:3,0:1".to_string()));
    }
}
