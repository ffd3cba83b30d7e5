//! What the console asks of the cluster beyond `Admin`: offsets from each partition's leader,
//! a group's coordinator, a group's members with their assignments, and partition sizes from
//! DescribeLogDirs. Every call opens its connections and drops them at the end; the console
//! keeps no Kafka state between requests.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kafka_protocol::messages::describe_log_dirs_request::DescribableLogDirTopic;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use crate::client::conn::Conn;
use crate::client::metadata::Cluster;
use crate::consumer::{decode_assignment, list_offsets, TopicPartition};
use crate::{connect_any, error_name};

/// Connect and request timeout of the console's Kafka connections.
pub const KAFKA_TIMEOUT_MS: u64 = 10_000;

/// The client id the console's connections carry.
pub const CLIENT_ID: &str = "weir-console";

pub fn connect(bootstrap: &str) -> Result<Conn> {
    connect_any(
        bootstrap,
        CLIENT_ID,
        Duration::from_millis(KAFKA_TIMEOUT_MS),
    )
}

/// Offsets (`which`: -2 earliest, -1 latest, or a timestamp) asked of each partition's
/// leader. A partition without a leader is left out.
pub fn offsets(
    conn: &mut Conn,
    cluster: &Cluster,
    tps: &[TopicPartition],
    which: i64,
) -> Result<BTreeMap<TopicPartition, i64>> {
    let mut by_leader: BTreeMap<String, Vec<TopicPartition>> = BTreeMap::new();
    for tp in tps {
        if let Some(addr) = cluster.leader_addr(&tp.0, tp.1) {
            by_leader
                .entry(addr.to_string())
                .or_default()
                .push(tp.clone());
        }
    }
    let mut out = BTreeMap::new();
    for (addr, tps) in by_leader {
        let got = if addr == conn.addr {
            list_offsets(conn, &tps, which)?
        } else {
            let mut c = Conn::connect(&addr, CLIENT_ID, Duration::from_millis(KAFKA_TIMEOUT_MS))?;
            list_offsets(&mut c, &tps, which)?
        };
        out.extend(got);
    }
    Ok(out)
}

/// A connection to the coordinator of `group` (FindCoordinator).
pub fn coordinator(conn: &mut Conn, group: &str) -> Result<Conn> {
    let v = conn.version(ApiKey::FindCoordinator, 4)?;
    let req = if v >= 4 {
        FindCoordinatorRequest::default()
            .with_coordinator_keys(vec![StrBytes::from_string(group.to_string())])
    } else {
        FindCoordinatorRequest::default().with_key(StrBytes::from_string(group.to_string()))
    };
    let r: FindCoordinatorResponse = conn.call_at(ApiKey::FindCoordinator, v, &req)?;
    let (code, host, port) = if v >= 4 {
        let c = r
            .coordinators
            .first()
            .ok_or_else(|| anyhow!("FindCoordinator answered no coordinator"))?;
        (c.error_code, c.host.to_string(), c.port)
    } else {
        (r.error_code, r.host.to_string(), r.port)
    };
    if code != 0 {
        bail!(
            "finding the coordinator of group {group}: {}",
            error_name(code)
        );
    }
    Conn::connect(
        &format!("{host}:{port}"),
        CLIENT_ID,
        Duration::from_millis(KAFKA_TIMEOUT_MS),
    )
}

/// One member of a group as DescribeGroups reports it.
#[derive(Clone, Debug)]
pub struct Member {
    pub member_id: String,
    pub client_id: String,
    pub host: String,
    /// Partitions assigned (decoded from the consumer protocol; empty for other protocols).
    pub assignment: Vec<TopicPartition>,
}

#[derive(Clone, Debug)]
pub struct Group {
    pub state: String,
    pub protocol_type: String,
    pub protocol: String,
    pub members: Vec<Member>,
}

/// DescribeGroups of one group, asked of its coordinator.
pub fn describe_group(coord: &mut Conn, group: &str) -> Result<Group> {
    let (r, _): (DescribeGroupsResponse, i16) = coord.call(
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default()
            .with_groups(vec![GroupId(StrBytes::from_string(group.to_string()))]),
    )?;
    let g = r
        .groups
        .first()
        .context("an empty DescribeGroups response")?;
    if g.error_code != 0 {
        bail!("describing group {group}: {}", error_name(g.error_code));
    }
    if g.group_state.as_str() == "Dead" {
        // A KIP-848 consumer-protocol group is described by ConsumerGroupDescribe.
        if let Some(v) = crate::consumer::describe_consumer_group(coord, group)? {
            return Ok(Group {
                state: v.state,
                protocol_type: "consumer".to_string(),
                protocol: v.assignor,
                members: v
                    .members
                    .into_iter()
                    .map(|(member_id, client_id, host, assignment)| Member {
                        member_id,
                        client_id,
                        host,
                        assignment,
                    })
                    .collect(),
            });
        }
    }
    let consumer = g.protocol_type.as_str() == "consumer";
    Ok(Group {
        state: g.group_state.to_string(),
        protocol_type: g.protocol_type.to_string(),
        protocol: g.protocol_data.to_string(),
        members: g
            .members
            .iter()
            .map(|m| Member {
                member_id: m.member_id.to_string(),
                client_id: m.client_id.to_string(),
                host: m.client_host.to_string(),
                assignment: if consumer {
                    decode_assignment(m.member_assignment.clone()).unwrap_or_default()
                } else {
                    Vec::new()
                },
            })
            .collect(),
    })
}

/// A group's committed offsets (every partition it committed), asked of its coordinator.
pub fn committed(coord: &mut Conn, group: &str) -> Result<BTreeMap<TopicPartition, i64>> {
    let (r, _): (OffsetFetchResponse, i16) = coord.call(
        ApiKey::OffsetFetch,
        7,
        &OffsetFetchRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_topics(None),
    )?;
    if r.error_code != 0 {
        bail!(
            "fetching offsets of group {group}: {}",
            error_name(r.error_code)
        );
    }
    let mut out = BTreeMap::new();
    for t in &r.topics {
        for p in &t.partitions {
            if p.error_code == 0 && p.committed_offset >= 0 {
                out.insert(
                    (t.name.0.to_string(), p.partition_index),
                    p.committed_offset,
                );
            }
        }
    }
    Ok(out)
}

/// Commits `offsets` for `group` from outside it (generation -1), as
/// `kafka-consumer-groups.sh --reset-offsets` does; Kafka refuses while the group has members.
pub fn commit(coord: &mut Conn, group: &str, offsets: &[(TopicPartition, i64)]) -> Result<()> {
    let req = crate::consumer::offset_commit_request(group, -1, "", None, offsets);
    let (r, _): (OffsetCommitResponse, i16) = coord.call(ApiKey::OffsetCommit, 8, &req)?;
    for t in &r.topics {
        for p in &t.partitions {
            match p.error_code {
                0 => {}
                // Kafka answers UNKNOWN_MEMBER_ID to a commit from outside a group with members.
                25 | 68 => bail!(
                    "NON_EMPTY_GROUP: group {group} has active members; stop its consumers before resetting offsets"
                ),
                c => bail!(
                    "resetting {}-{}: {}",
                    t.name.0.as_str(),
                    p.partition_index,
                    error_name(c)
                ),
            }
        }
    }
    Ok(())
}

/// Bytes on disk per partition (the largest replica), from every broker's DescribeLogDirs.
/// Brokers that do not answer are skipped; None when none answered.
pub fn partition_sizes(
    cluster: &Cluster,
    topics: &[String],
) -> Option<BTreeMap<TopicPartition, i64>> {
    let req = DescribeLogDirsRequest::default().with_topics(Some(
        topics
            .iter()
            .filter_map(|t| {
                let info = cluster.topics.get(t)?;
                Some(
                    DescribableLogDirTopic::default()
                        .with_topic(TopicName(StrBytes::from_string(t.clone())))
                        .with_partitions((0..info.leaders.len() as i32).collect()),
                )
            })
            .collect(),
    ));
    let mut out: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    let mut answered = false;
    for addr in cluster.brokers.values() {
        let Ok(mut c) = Conn::connect(addr, CLIENT_ID, Duration::from_millis(KAFKA_TIMEOUT_MS))
        else {
            continue;
        };
        let Ok((r, _)) = c.call::<_, DescribeLogDirsResponse>(ApiKey::DescribeLogDirs, 4, &req)
        else {
            continue;
        };
        if r.error_code != 0 {
            continue;
        }
        answered = true;
        for d in r.results.iter().filter(|d| d.error_code == 0) {
            for t in &d.topics {
                for p in t.partitions.iter().filter(|p| !p.is_future_key) {
                    let e = out
                        .entry((t.name.0.to_string(), p.partition_index))
                        .or_insert(0);
                    *e = (*e).max(p.partition_size);
                }
            }
        }
    }
    answered.then_some(out)
}

/// Each broker's supported version range of a few APIs (from ApiVersions at connect), for
/// the overview. Brokers that cannot be reached get an error text.
pub fn broker_versions(cluster: &Cluster) -> BTreeMap<i32, Result<Vec<(ApiKey, i16)>, String>> {
    let mut out = BTreeMap::new();
    for (id, addr) in &cluster.brokers {
        let r = Conn::connect(addr, CLIENT_ID, Duration::from_millis(KAFKA_TIMEOUT_MS))
            .map(|c| {
                [
                    ApiKey::Produce,
                    ApiKey::Fetch,
                    ApiKey::Metadata,
                    ApiKey::ListOffsets,
                    ApiKey::OffsetCommit,
                    ApiKey::CreateTopics,
                ]
                .into_iter()
                .filter_map(|k| c.version(k, i16::MAX).ok().map(|v| (k, v)))
                .collect()
            })
            .map_err(|e| format!("{e:#}"));
        out.insert(*id, r);
    }
    out
}
