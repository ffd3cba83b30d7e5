//! `weir log-dirs --describe` (kafka-log-dirs.sh) and `weir leader-election`
//! (kafka-leader-election.sh).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use kafka_protocol::messages::describe_log_dirs_request::DescribableLogDirTopic;
use kafka_protocol::messages::elect_leaders_request::TopicPartitions;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use serde_json::{json, Value};

use crate::client::conn::Conn;
use crate::client::metadata::Cluster;
use crate::error_name;

/// DescribeLogDirs from each broker (all, or `brokers`), for `topics` (all when None), as
/// kafka-log-dirs.sh's JSON. Returns the brokers that answered and the JSON.
pub fn describe(
    conn: &mut Conn,
    brokers: Option<&[i32]>,
    topics: Option<&[String]>,
) -> Result<(Vec<i32>, Value)> {
    let cluster = Cluster::fetch(conn, topics, false)?;
    let mut ids: Vec<i32> = cluster.brokers.keys().copied().collect();
    ids.sort_unstable();
    if let Some(want) = brokers {
        for b in want {
            if !ids.contains(b) {
                bail!("broker {b} is not in the cluster's metadata");
            }
        }
        ids.retain(|b| want.contains(b));
    }
    let req = DescribeLogDirsRequest::default().with_topics(topics.map(|ts| {
        ts.iter()
            .filter_map(|t| {
                let info = cluster.topics.get(t)?;
                Some(
                    DescribableLogDirTopic::default()
                        .with_topic(TopicName(StrBytes::from_string(t.clone())))
                        .with_partitions((0..info.replicas.len() as i32).collect()),
                )
            })
            .collect()
    }));
    let mut out = Vec::new();
    for id in &ids {
        let addr = &cluster.brokers[id];
        let mut c = Conn::connect(addr, "weir-log-dirs", Duration::from_secs(10))?;
        let (r, _): (DescribeLogDirsResponse, i16) = c.call(ApiKey::DescribeLogDirs, 4, &req)?;
        if r.error_code != 0 {
            bail!("broker {id}: {}", error_name(r.error_code));
        }
        let dirs: Vec<Value> = r
            .results
            .iter()
            .map(|d| {
                let partitions: Vec<Value> = d
                    .topics
                    .iter()
                    .flat_map(|t| {
                        t.partitions.iter().map(move |p| {
                            json!({
                                "partition": format!("{}-{}", t.name.0.as_str(), p.partition_index),
                                "size": p.partition_size,
                                "offsetLag": p.offset_lag,
                                "isFuture": p.is_future_key,
                            })
                        })
                    })
                    .collect();
                json!({
                    "logDir": d.log_dir.as_str(),
                    "error": if d.error_code == 0 { Value::Null } else { Value::from(error_name(d.error_code)) },
                    "partitions": partitions,
                })
            })
            .collect();
        out.push(json!({"broker": id, "logDirs": dirs}));
    }
    Ok((ids, json!({"version": 1, "brokers": out})))
}

/// ElectLeaders: preferred elections for `partitions` (every partition when None). Returns the
/// lines kafka-leader-election.sh prints.
pub fn elect_preferred(
    conn: &mut Conn,
    partitions: Option<&[(String, i32)]>,
) -> Result<Vec<String>> {
    let topic_partitions = partitions.map(|ps| {
        let mut by: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
        for (t, p) in ps {
            by.entry(t).or_default().push(*p);
        }
        by.into_iter()
            .map(|(t, ps)| {
                TopicPartitions::default()
                    .with_topic(TopicName(StrBytes::from_string(t.to_string())))
                    .with_partitions(ps)
            })
            .collect()
    });
    let req = ElectLeadersRequest::default()
        .with_election_type(0)
        .with_timeout_ms(30_000)
        .with_topic_partitions(topic_partitions);
    let (r, _): (ElectLeadersResponse, i16) = conn.call(ApiKey::ElectLeaders, 2, &req)?;
    if r.error_code != 0 {
        bail!("leader election refused: {}", error_name(r.error_code));
    }
    let (mut done, mut not_needed, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for t in &r.replica_election_results {
        for p in &t.partition_result {
            let name = format!("{}-{}", t.topic.0.as_str(), p.partition_id);
            match p.error_code {
                0 => done.push(name),
                84 => not_needed.push(name),
                code => failed.push(format!("{name}: {}", error_name(code))),
            }
        }
    }
    let mut lines = Vec::new();
    if !done.is_empty() {
        lines.push(format!(
            "Successfully completed leader election (PREFERRED) for partitions {}",
            done.join(", ")
        ));
    }
    if !not_needed.is_empty() {
        lines.push(format!(
            "Valid replica already elected for partitions {}",
            not_needed.join(", ")
        ));
    }
    if !failed.is_empty() {
        bail!(
            "{}Leader election failed for partitions {}",
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
            failed.join(", ")
        );
    }
    Ok(lines)
}
