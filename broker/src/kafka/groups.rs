//! Consumer-group APIs: FindCoordinator 0-5, JoinGroup 0-9, SyncGroup 0-5, Heartbeat 0-4,
//! LeaveGroup 0-5, OffsetCommit 2-9, OffsetFetch 1-9, ListGroups 0-5, DescribeGroups 0-5,
//! DeleteGroups 0-2, OffsetDelete 0. Each group's requests run on its coordinator shard.
//! (JoinGroup 8 and LeaveGroup 5 add a reason, KIP-800, which is logged; JoinGroup 9 adds
//! `skip_assignment`, KIP-814, see `group::join_response`.)

use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

use bytes::Bytes;
use futures::FutureExt;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::{decode, respond, Response};
use crate::group::records::{self, OffsetValue};
use crate::group::{self, JoinArgs, Lookup, State, OFFSETS_TOPIC};
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::{shard, Shard};
use crate::storage::log::now_ms;

const AUTHORIZED_OPERATIONS_OMITTED: i32 = i32::MIN;

fn sb(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

/// (coordinator shard, __consumer_offsets partition) of a group on this broker.
fn coordinator(s: &Shard, group: &str) -> Result<(usize, i32), i16> {
    let partition = records::partition_for(group, s.config.group.offsets_partitions);
    super::coordinator_shard(s, OFFSETS_TOPIC, partition)
}

/// The broker coordinating `group`: the leader of its `__consumer_offsets` partition.
fn coordinator_node(s: &Shard, group: &str) -> Result<(i32, String, i32), i16> {
    let partition = records::partition_for(group, s.config.group.offsets_partitions);
    super::coordinator_node(s, OFFSETS_TOPIC, partition)
}

/// Runs `f` for `group` on its coordinator shard, or answers `on_error(code)`.
pub(super) async fn on_coordinator<R: Send + 'static>(
    group: &str,
    on_error: impl FnOnce(i16) -> R,
    f: impl FnOnce(Rc<Shard>, i32) -> futures::future::LocalBoxFuture<'static, R> + Send + 'static,
) -> R {
    let s = shard();
    let (target, partition) = match coordinator(&s, group) {
        Ok(x) => x,
        Err(code) => return on_error(code),
    };
    let r = s
        .run_on(target, move |t| {
            async move {
                if let Lookup::Loading = t.groups.check_loaded(partition) {
                    return Err(COORDINATOR_LOAD_IN_PROGRESS);
                }
                Ok(f(t, partition).await)
            }
            .boxed_local()
        })
        .await;
    match r {
        Some(Ok(v)) => v,
        Some(Err(code)) => on_error(code),
        None => on_error(COORDINATOR_NOT_AVAILABLE),
    }
}

pub fn handle_find_coordinator(frame: RequestFrame) -> Result<Response, String> {
    let req: FindCoordinatorRequest = decode(&frame)?;
    let s = shard();
    let answer = |key_type: i8, key: &str| -> Result<(i32, String, i32), (i16, &'static str)> {
        match key_type {
            0 => coordinator_node(&s, key).map_err(|c| (c, "The coordinator is not available.")),
            1 => super::txn::coordinator_node(&s, key)
                .map_err(|c| (c, "The coordinator is not available.")),
            _ => Err((INVALID_REQUEST, "Unknown coordinator key type")),
        }
    };
    let mut resp = FindCoordinatorResponse::default();
    if frame.api_version >= 4 {
        resp.coordinators = req
            .coordinator_keys
            .iter()
            .map(|k| {
                let c = Coordinator::default().with_key(k.clone());
                match answer(req.key_type, k) {
                    Ok((node, host, port)) => c
                        .with_node_id(BrokerId(node))
                        .with_host(sb(host))
                        .with_port(port),
                    Err((code, msg)) => c
                        .with_error_code(code)
                        .with_error_message(Some(sb(msg)))
                        .with_node_id(BrokerId(-1))
                        .with_port(-1),
                }
            })
            .collect();
    } else {
        match answer(req.key_type, &req.key) {
            Ok((node, host, port)) => {
                resp = resp
                    .with_node_id(BrokerId(node))
                    .with_host(sb(host))
                    .with_port(port);
            }
            Err((code, msg)) => {
                resp.error_code = code;
                if frame.api_version >= 1 {
                    resp.error_message = Some(sb(msg));
                }
                resp = resp.with_node_id(BrokerId(-1)).with_port(-1);
            }
        }
    }
    respond(&frame, OutBuf::new(), &resp)
}

pub async fn handle_join(frame: RequestFrame) -> Result<Response, String> {
    let req: JoinGroupRequest = decode(&frame)?;
    let version = frame.api_version;
    if let Some(reason) = req.reason.as_ref().filter(|_| version >= 8) {
        tracing::debug!(group = %req.group_id.0, member = %req.member_id, "join: {}", truncated(reason));
    }
    let args = JoinArgs {
        group: req.group_id.0.to_string(),
        member_id: req.member_id.to_string(),
        instance_id: req.group_instance_id.as_ref().map(|s| s.to_string()),
        client_id: frame
            .header
            .client_id
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        client_host: frame.client_host.clone(),
        session_timeout_ms: req.session_timeout_ms,
        rebalance_timeout_ms: if version >= 1 {
            req.rebalance_timeout_ms
        } else {
            req.session_timeout_ms
        },
        protocol_type: req.protocol_type.to_string(),
        protocols: req
            .protocols
            .iter()
            .map(|p| (p.name.to_string(), p.metadata.clone()))
            .collect(),
        version,
    };
    let member = args.member_id.clone();
    let group = args.group.clone();
    let resp = on_coordinator(
        &group,
        |code| {
            JoinGroupResponse::default()
                .with_error_code(code)
                .with_generation_id(-1)
                .with_member_id(sb(member))
                .with_protocol_name(Some(sb("")))
        },
        move |s, partition| async move { s.group_join(args, partition).await }.boxed_local(),
    )
    .await;
    respond(&frame, OutBuf::new(), &resp)
}

pub async fn handle_sync(frame: RequestFrame) -> Result<Response, String> {
    let req: SyncGroupRequest = decode(&frame)?;
    let version = frame.api_version;
    let group = req.group_id.0.to_string();
    let g2 = group.clone();
    let resp = on_coordinator(
        &group,
        |code| SyncGroupResponse::default().with_error_code(code),
        move |s, _| {
            async move {
                let assignments = req
                    .assignments
                    .iter()
                    .map(|a| (a.member_id.to_string(), a.assignment.clone()))
                    .collect();
                s.group_sync(
                    &g2,
                    req.member_id.as_str(),
                    req.group_instance_id.as_ref().map(|x| x.as_str()),
                    req.generation_id,
                    req.protocol_type.as_ref().map(|x| x.as_str()),
                    req.protocol_name.as_ref().map(|x| x.as_str()),
                    assignments,
                    version,
                )
                .await
            }
            .boxed_local()
        },
    )
    .await;
    respond(&frame, OutBuf::new(), &resp)
}

pub async fn handle_heartbeat(frame: RequestFrame) -> Result<Response, String> {
    let req: HeartbeatRequest = decode(&frame)?;
    let group = req.group_id.0.to_string();
    let code = on_coordinator(
        &group,
        |code| code,
        move |s, _| {
            async move {
                s.group_heartbeat(
                    req.group_id.0.as_str(),
                    req.member_id.as_str(),
                    req.group_instance_id.as_ref().map(|x| x.as_str()),
                    req.generation_id,
                )
            }
            .boxed_local()
        },
    )
    .await;
    respond(
        &frame,
        OutBuf::new(),
        &HeartbeatResponse::default().with_error_code(code),
    )
}

pub async fn handle_leave(frame: RequestFrame) -> Result<Response, String> {
    let req: LeaveGroupRequest = decode(&frame)?;
    let version = frame.api_version;
    let group = req.group_id.0.to_string();
    if version >= 5 {
        for m in req.members.iter() {
            if let Some(reason) = &m.reason {
                tracing::debug!(group = %req.group_id.0, member = %m.member_id, "leave: {}", truncated(reason));
            }
        }
    }
    let leaving: Vec<(String, Option<String>)> = if version >= 3 {
        req.members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|x| x.to_string()),
                )
            })
            .collect()
    } else {
        vec![(req.member_id.to_string(), None)]
    };
    let l2 = leaving.clone();
    let g2 = group.clone();
    let r = on_coordinator(&group, Err, move |s, _| {
        async move { s.group_leave(&g2, &l2).await }.boxed_local()
    })
    .await;
    let mut resp = LeaveGroupResponse::default();
    match r {
        Err(code) => resp.error_code = code,
        Ok(codes) => {
            if version >= 3 {
                resp.members = leaving
                    .iter()
                    .zip(&codes)
                    .map(|((m, i), c)| {
                        MemberResponse::default()
                            .with_member_id(sb(m.clone()))
                            .with_group_instance_id(i.clone().map(sb))
                            .with_error_code(*c)
                    })
                    .collect();
            } else {
                resp.error_code = codes.first().copied().unwrap_or(NONE);
            }
        }
    }
    respond(&frame, OutBuf::new(), &resp)
}

pub async fn handle_offset_commit(frame: RequestFrame) -> Result<Response, String> {
    let req: OffsetCommitRequest = decode(&frame)?;
    let version = frame.api_version;
    let group = req.group_id.0.to_string();
    let g2 = group.clone();
    let topics: Vec<(String, Vec<(i32, i64, i32, String)>)> = req
        .topics
        .iter()
        .map(|t| {
            (
                t.name.0.to_string(),
                t.partitions
                    .iter()
                    .map(|p| {
                        let epoch = if version >= 6 {
                            p.committed_leader_epoch
                        } else {
                            -1
                        };
                        (
                            p.partition_index,
                            p.committed_offset,
                            epoch,
                            p.committed_metadata
                                .as_ref()
                                .map(|m| m.to_string())
                                .unwrap_or_default(),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    let t2 = topics.clone();
    let member = req.member_id.to_string();
    let instance = if version >= 7 {
        req.group_instance_id.as_ref().map(|x| x.to_string())
    } else {
        None
    };
    let generation = req.generation_id_or_member_epoch;
    let codes: Result<Vec<Vec<i16>>, i16> = on_coordinator(&group, Err, move |s, partition| {
        async move {
            s.group_commit_check(
                &g2,
                &member,
                instance.as_deref(),
                generation,
                partition,
                version,
            )?;
            let max = s.config.group.offset_metadata_bytes_max;
            let now = now_ms();
            let mut recs = Vec::new();
            let mut accepted = Vec::new();
            let image = s.image();
            let codes: Vec<Vec<i16>> = t2
                .iter()
                .map(|(topic, parts)| {
                    let count = image.topics.get(topic).map(|t| t.partitions.len());
                    parts
                        .iter()
                        .map(|(p, offset, epoch, meta)| {
                            // As Kafka: no commits for partitions that do not exist.
                            if !count.is_some_and(|n| usize::try_from(*p).is_ok_and(|p| p < n)) {
                                return UNKNOWN_TOPIC_OR_PARTITION;
                            }
                            if meta.len() > max {
                                return OFFSET_METADATA_TOO_LARGE;
                            }
                            let v = OffsetValue {
                                offset: *offset,
                                leader_epoch: *epoch,
                                metadata: meta.clone(),
                                commit_timestamp: now,
                            };
                            recs.push((
                                records::offset_key(&g2, topic, *p),
                                Some(records::offset_value(&v)),
                            ));
                            accepted.push(((topic.clone(), *p), v));
                            NONE
                        })
                        .collect()
                })
                .collect();
            group::persist(&s, partition, recs).await?;
            if let Some(g) = s.groups.groups.borrow_mut().get_mut(&g2) {
                g.offsets.extend(accepted);
            }
            Ok(codes)
        }
        .boxed_local()
    })
    .await;
    let resp = OffsetCommitResponse::default().with_topics(
        req.topics
            .iter()
            .enumerate()
            .map(|(ti, t)| {
                OffsetCommitResponseTopic::default()
                    .with_name(t.name.clone())
                    .with_partitions(
                        t.partitions
                            .iter()
                            .enumerate()
                            .map(|(pi, p)| {
                                let code = match &codes {
                                    Ok(c) => c[ti][pi],
                                    Err(e) => *e,
                                };
                                OffsetCommitResponsePartition::default()
                                    .with_partition_index(p.partition_index)
                                    .with_error_code(code)
                            })
                            .collect(),
                    )
            })
            .collect(),
    );
    respond(&frame, OutBuf::new(), &resp)
}

/// TxnOffsetCommit v0-3: offsets committed inside a transaction, written to
/// `__consumer_offsets` as the producer's transactional batch and visible to the group only
/// at the transaction's COMMIT marker.
pub async fn handle_txn_offset_commit(frame: RequestFrame) -> Result<Response, String> {
    let req: TxnOffsetCommitRequest = decode(&frame)?;
    let group = req.group_id.0.to_string();
    let g2 = group.clone();
    let (pid, epoch) = (req.producer_id.0, req.producer_epoch);
    let rows: Vec<(String, i32, i64, i32, String)> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| {
                (
                    t.name.0.to_string(),
                    p.partition_index,
                    p.committed_offset,
                    if frame.api_version >= 2 {
                        p.committed_leader_epoch
                    } else {
                        -1
                    },
                    p.committed_metadata
                        .as_ref()
                        .map(|m| m.to_string())
                        .unwrap_or_default(),
                )
            })
        })
        .collect();
    let r2 = rows.clone();
    let codes: Result<Vec<i16>, i16> = on_coordinator(&group, Err, move |s, partition| {
        async move {
            let max = s.config.group.offset_metadata_bytes_max;
            let now = now_ms();
            let image = s.image();
            let mut accepted = Vec::new();
            let codes: Vec<i16> = r2
                .into_iter()
                .map(|(topic, p, offset, leader_epoch, metadata)| {
                    let count = image.topics.get(&topic).map(|t| t.partitions.len());
                    if !count.is_some_and(|n| usize::try_from(p).is_ok_and(|p| p < n)) {
                        return UNKNOWN_TOPIC_OR_PARTITION;
                    }
                    if metadata.len() > max {
                        return OFFSET_METADATA_TOO_LARGE;
                    }
                    accepted.push((
                        topic,
                        p,
                        OffsetValue {
                            offset,
                            leader_epoch,
                            metadata,
                            commit_timestamp: now,
                        },
                    ));
                    NONE
                })
                .collect();
            if !accepted.is_empty() {
                group::txn_offset_commit(&s, partition, &g2, pid, epoch, accepted).await?;
            }
            Ok(codes)
        }
        .boxed_local()
    })
    .await;
    let code = |i: usize| match &codes {
        Ok(c) => c[i],
        Err(e) => *e,
    };
    let rows = rows
        .into_iter()
        .enumerate()
        .map(|(i, (t, p, ..))| (t, (p, code(i))));
    let topics = crate::protocol::by_topic(rows)
        .into_iter()
        .map(|(t, ps)| {
            TxnOffsetCommitResponseTopic::default()
                .with_name(TopicName(sb(t)))
                .with_partitions(
                    ps.into_iter()
                        .map(|(p, code)| {
                            TxnOffsetCommitResponsePartition::default()
                                .with_partition_index(p)
                                .with_error_code(code)
                        })
                        .collect(),
                )
        })
        .collect();
    respond(
        &frame,
        OutBuf::new(),
        &TxnOffsetCommitResponse::default().with_topics(topics),
    )
}

type Committed = Vec<(String, i32, Option<OffsetValue>)>;
/// Partitions with an offset commit inside an open transaction (KIP-447's require_stable).
type Unstable = std::collections::HashSet<(String, i32)>;

/// Committed offsets of one group: the asked partitions, or all (topics None); with
/// `require_stable`, also the partitions an open transaction holds a commit for.
async fn fetch_offsets(
    group: String,
    topics: Option<Vec<(String, Vec<i32>)>>,
    require_stable: bool,
    member: Option<(String, i32)>,
) -> Result<(Committed, Unstable), i16> {
    let g2 = group.clone();
    on_coordinator(&group, Err, move |s, _| {
        async move {
            let groups = s.groups.groups.borrow();
            let g = groups.get(&g2);
            // OffsetFetch v9 from a member of a consumer-protocol group: its epoch must be
            // current.
            if let (Some((mid, epoch)), Some(cg)) = (&member, g.and_then(|g| g.consumer.as_deref()))
            {
                group::consumer::check_member_epoch(cg, mid, *epoch)?;
            }
            let unstable: Unstable = match g {
                Some(g) if require_stable => g
                    .pending_txn
                    .values()
                    .flat_map(|m| m.keys().cloned())
                    .collect(),
                _ => Unstable::new(),
            };
            Ok((
                match topics {
                    Some(ts) => ts
                        .into_iter()
                        .flat_map(|(t, ps)| ps.into_iter().map(move |p| (t.clone(), p)))
                        .map(|(t, p)| {
                            let v = g.and_then(|g| g.offsets.get(&(t.clone(), p)).cloned());
                            (t, p, v)
                        })
                        .collect(),
                    None => {
                        let mut all: Vec<_> = g
                            .map(|g| {
                                g.offsets
                                    .iter()
                                    .map(|((t, p), v)| (t.clone(), *p, Some(v.clone())))
                                    .collect()
                            })
                            .unwrap_or_default();
                        all.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
                        all
                    }
                },
                unstable,
            ))
        }
        .boxed_local()
    })
    .await
}

fn group_by_topic(rows: Committed) -> BTreeMap<String, Vec<(i32, Option<OffsetValue>)>> {
    let mut m: BTreeMap<String, Vec<(i32, Option<OffsetValue>)>> = BTreeMap::new();
    for (t, p, v) in rows {
        m.entry(t).or_default().push((p, v));
    }
    m
}

pub async fn handle_offset_fetch(frame: RequestFrame) -> Result<Response, String> {
    let req: OffsetFetchRequest = decode(&frame)?;
    let version = frame.api_version;
    let epoch = |v: &Option<OffsetValue>| {
        if version >= 5 {
            v.as_ref().map(|v| v.leader_epoch).unwrap_or(-1)
        } else {
            -1
        }
    };
    if version >= 8 {
        let mut groups = Vec::with_capacity(req.groups.len());
        for g in &req.groups {
            let topics = g.topics.as_ref().map(|ts| {
                ts.iter()
                    .map(|t| (t.name.0.to_string(), t.partition_indexes.clone()))
                    .collect()
            });
            let member = if version >= 9 {
                g.member_id
                    .as_ref()
                    .map(|m| (m.to_string(), g.member_epoch))
            } else {
                None
            };
            let r =
                fetch_offsets(g.group_id.0.to_string(), topics, req.require_stable, member).await;
            let mut out = OffsetFetchResponseGroup::default().with_group_id(g.group_id.clone());
            match r {
                Err(code) => out.error_code = code,
                Ok((rows, unstable)) => {
                    out.topics = group_by_topic(rows)
                        .into_iter()
                        .map(|(t, ps)| {
                            OffsetFetchResponseTopics::default()
                                .with_name(TopicName(sb(t.clone())))
                                .with_partitions(
                                    ps.into_iter()
                                        .map(|(p, v)| {
                                            let held = unstable.contains(&(t.clone(), p));
                                            let v = if held { None } else { v };
                                            OffsetFetchResponsePartitions::default()
                                                .with_partition_index(p)
                                                .with_error_code(if held {
                                                    UNSTABLE_OFFSET_COMMIT
                                                } else {
                                                    NONE
                                                })
                                                .with_committed_offset(
                                                    v.as_ref().map(|v| v.offset).unwrap_or(-1),
                                                )
                                                .with_committed_leader_epoch(epoch(&v))
                                                .with_metadata(Some(sb(v
                                                    .map(|v| v.metadata)
                                                    .unwrap_or_default())))
                                        })
                                        .collect(),
                                )
                        })
                        .collect()
                }
            }
            groups.push(out);
        }
        return respond(
            &frame,
            OutBuf::new(),
            &OffsetFetchResponse::default().with_groups(groups),
        );
    }
    let topics = req.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes.clone()))
            .collect::<Vec<_>>()
    });
    let stable = version >= 7 && req.require_stable;
    let r = fetch_offsets(req.group_id.0.to_string(), topics.clone(), stable, None).await;
    let mut resp = OffsetFetchResponse::default();
    match r {
        Ok((rows, unstable)) => {
            resp.topics = group_by_topic(rows)
                .into_iter()
                .map(|(t, ps)| {
                    OffsetFetchResponseTopic::default()
                        .with_name(TopicName(sb(t.clone())))
                        .with_partitions(
                            ps.into_iter()
                                .map(|(p, v)| {
                                    let held = unstable.contains(&(t.clone(), p));
                                    let v = if held { None } else { v };
                                    OffsetFetchResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_error_code(if held {
                                            UNSTABLE_OFFSET_COMMIT
                                        } else {
                                            NONE
                                        })
                                        .with_committed_offset(
                                            v.as_ref().map(|v| v.offset).unwrap_or(-1),
                                        )
                                        .with_committed_leader_epoch(epoch(&v))
                                        .with_metadata(Some(sb(v
                                            .map(|v| v.metadata)
                                            .unwrap_or_default())))
                                })
                                .collect(),
                        )
                })
                .collect();
        }
        Err(code) => {
            if version >= 2 {
                resp.error_code = code;
            }
            // v1 has no top-level error: every asked partition carries it.
            resp.topics = topics
                .unwrap_or_default()
                .into_iter()
                .map(|(t, ps)| {
                    OffsetFetchResponseTopic::default()
                        .with_name(TopicName(sb(t)))
                        .with_partitions(
                            ps.into_iter()
                                .map(|p| {
                                    OffsetFetchResponsePartition::default()
                                        .with_partition_index(p)
                                        .with_committed_offset(-1)
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect();
        }
    }
    respond(&frame, OutBuf::new(), &resp)
}

pub async fn handle_list_groups(frame: RequestFrame) -> Result<Response, String> {
    let req: ListGroupsRequest = decode(&frame)?;
    let version = frame.api_version;
    let s = shard();
    let filter: HashSet<String> = if version >= 4 {
        req.states_filter.iter().map(|x| x.to_lowercase()).collect()
    } else {
        HashSet::new()
    };
    let types: HashSet<String> = if version >= 5 {
        req.types_filter.iter().map(|x| x.to_lowercase()).collect()
    } else {
        HashSet::new()
    };
    let mut groups = Vec::new();
    for target in 0..s.count {
        let listed = s
            .run_on(target, |t| {
                async move {
                    t.groups
                        .groups
                        .borrow()
                        .values()
                        .filter(|g| g.state != State::Dead)
                        .map(|g| match &g.consumer {
                            Some(cg) => (
                                g.id.clone(),
                                "consumer".to_string(),
                                cg.state_name().to_string(),
                                "consumer",
                            ),
                            None => (
                                g.id.clone(),
                                g.protocol_type.clone().unwrap_or_default(),
                                g.state.name().to_string(),
                                "classic",
                            ),
                        })
                        .collect::<Vec<_>>()
                }
                .boxed_local()
            })
            .await
            .unwrap_or_default();
        for (id, ptype, state, gtype) in listed {
            if !filter.is_empty() && !filter.contains(&state.to_lowercase()) {
                continue;
            }
            if !types.is_empty() && !types.contains(gtype) {
                continue;
            }
            let mut g = ListedGroup::default()
                .with_group_id(GroupId(sb(id)))
                .with_protocol_type(sb(ptype));
            if version >= 4 {
                g.group_state = sb(state);
            }
            if version >= 5 {
                g.group_type = sb(gtype);
            }
            groups.push(g);
        }
    }
    respond(
        &frame,
        OutBuf::new(),
        &ListGroupsResponse::default().with_groups(groups),
    )
}

pub async fn handle_describe_groups(frame: RequestFrame) -> Result<Response, String> {
    let req: DescribeGroupsRequest = decode(&frame)?;
    let version = frame.api_version;
    let mut out = Vec::with_capacity(req.groups.len());
    for gid in &req.groups {
        let id = gid.0.to_string();
        let i2 = id.clone();
        let r = on_coordinator(&id, Err, move |s, _| {
            async move {
                let groups = s.groups.groups.borrow();
                // As Kafka: DescribeGroups knows classic groups only; a consumer-protocol
                // group is described by ConsumerGroupDescribe.
                Ok(groups.get(&i2).filter(|g| g.consumer.is_none()).map(|g| {
                    let protocol = g.protocol.clone().unwrap_or_default();
                    let members: Vec<_> = g
                        .members
                        .values()
                        .map(|m| {
                            (
                                m.id.clone(),
                                m.instance_id.clone(),
                                m.client_id.clone(),
                                m.client_host.clone(),
                                m.metadata_for(&protocol),
                                m.assignment.clone(),
                            )
                        })
                        .collect();
                    (
                        g.state,
                        g.protocol_type.clone().unwrap_or_default(),
                        if g.state == State::Stable {
                            protocol
                        } else {
                            String::new()
                        },
                        members,
                    )
                }))
            }
            .boxed_local()
        })
        .await;
        let mut d = DescribedGroup::default()
            .with_group_id(gid.clone())
            .with_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED);
        match r {
            Err(code) => d.error_code = code,
            Ok(None) => d.group_state = sb(State::Dead.name()),
            Ok(Some((state, ptype, pdata, members))) => {
                d.group_state = sb(state.name());
                d.protocol_type = sb(ptype);
                d.protocol_data = sb(pdata);
                d.members = members
                    .into_iter()
                    .map(
                        |(id, inst, client, host, meta, asg): (
                            String,
                            Option<String>,
                            String,
                            String,
                            Bytes,
                            Bytes,
                        )| {
                            let mut m = DescribedGroupMember::default()
                                .with_member_id(sb(id))
                                .with_client_id(sb(client))
                                .with_client_host(sb(host))
                                .with_member_metadata(meta)
                                .with_member_assignment(asg);
                            if version >= 4 {
                                m.group_instance_id = inst.map(sb);
                            }
                            m
                        },
                    )
                    .collect();
            }
        }
        out.push(d);
    }
    respond(
        &frame,
        OutBuf::new(),
        &DescribeGroupsResponse::default().with_groups(out),
    )
}

pub async fn handle_delete_groups(frame: RequestFrame) -> Result<Response, String> {
    let req: DeleteGroupsRequest = decode(&frame)?;
    let mut results = Vec::with_capacity(req.groups_names.len());
    for gid in &req.groups_names {
        let id = gid.0.to_string();
        let i2 = id.clone();
        let code = on_coordinator(
            &id,
            |c| c,
            move |s, partition| {
                async move {
                    let recs = {
                        let mut groups = s.groups.groups.borrow_mut();
                        let Some(g) = groups.get(&i2) else {
                            return GROUP_ID_NOT_FOUND;
                        };
                        if !g.members.is_empty()
                            || g.consumer.as_ref().is_some_and(|c| !c.members.is_empty())
                        {
                            return NON_EMPTY_GROUP;
                        }
                        let mut recs: Vec<group::OffsetsRecord> = g
                            .offsets
                            .keys()
                            .map(|(t, p)| (records::offset_key(&i2, t, *p), None))
                            .collect();
                        match &g.consumer {
                            Some(cg) => recs.extend(group::consumer::delete_records(&i2, cg)),
                            None => recs.push((records::group_key(&i2), None)),
                        }
                        groups.remove(&i2);
                        recs
                    };
                    match group::persist(&s, partition, recs).await {
                        Ok(()) => NONE,
                        Err(c) => c,
                    }
                }
                .boxed_local()
            },
        )
        .await;
        results.push(
            DeletableGroupResult::default()
                .with_group_id(gid.clone())
                .with_error_code(code),
        );
    }
    respond(
        &frame,
        OutBuf::new(),
        &DeleteGroupsResponse::default().with_results(results),
    )
}

/// Topics a consumer group's members subscribe to, read from their subscription metadata.
fn subscribed_topics(g: &group::Group) -> HashSet<String> {
    use kafka_protocol::protocol::Decodable;
    let mut out = HashSet::new();
    if let Some(cg) = &g.consumer {
        out.extend(
            cg.members
                .values()
                .flat_map(|m| m.subscribed.iter().cloned()),
        );
        return out;
    }
    if g.protocol_type.as_deref() != Some("consumer") {
        return out;
    }
    for m in g.members.values() {
        for (_, meta) in &m.protocols {
            let mut b = meta.clone();
            if b.len() < 2 {
                continue;
            }
            let version = i16::from_be_bytes([b[0], b[1]]);
            let _ = bytes::Buf::get_i16(&mut b);
            if let Ok(sub) = ConsumerProtocolSubscription::decode(&mut b, version.clamp(0, 3)) {
                out.extend(sub.topics.iter().map(|t| t.to_string()));
            }
        }
    }
    out
}

pub async fn handle_offset_delete(frame: RequestFrame) -> Result<Response, String> {
    let req: OffsetDeleteRequest = decode(&frame)?;
    let id = req.group_id.0.to_string();
    let i2 = id.clone();
    let asked: Vec<(String, Vec<i32>)> = req
        .topics
        .iter()
        .map(|t| {
            (
                t.name.0.to_string(),
                t.partitions.iter().map(|p| p.partition_index).collect(),
            )
        })
        .collect();
    let a2 = asked.clone();
    let r: Result<Vec<Vec<i16>>, i16> = on_coordinator(&id, Err, move |s, partition| {
        async move {
            let (codes, recs) = {
                let mut groups = s.groups.groups.borrow_mut();
                let Some(g) = groups.get_mut(&i2) else {
                    return Err(GROUP_ID_NOT_FOUND);
                };
                let subscribed = subscribed_topics(g);
                let mut recs = Vec::new();
                let codes = a2
                    .iter()
                    .map(|(t, ps)| {
                        ps.iter()
                            .map(|p| {
                                if !subscribed.is_empty() && subscribed.contains(t) {
                                    return GROUP_SUBSCRIBED_TO_TOPIC;
                                }
                                if g.offsets.remove(&(t.clone(), *p)).is_some() {
                                    recs.push((records::offset_key(&i2, t, *p), None));
                                }
                                NONE
                            })
                            .collect()
                    })
                    .collect();
                (codes, recs)
            };
            group::persist(&s, partition, recs).await?;
            Ok(codes)
        }
        .boxed_local()
    })
    .await;
    let mut resp = OffsetDeleteResponse::default();
    match r {
        Err(code) => resp.error_code = code,
        Ok(codes) => {
            resp.topics = req
                .topics
                .iter()
                .zip(codes)
                .map(|(t, cs)| {
                    OffsetDeleteResponseTopic::default()
                        .with_name(t.name.clone())
                        .with_partitions(
                            t.partitions
                                .iter()
                                .zip(cs)
                                .map(|(p, c)| {
                                    OffsetDeleteResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(c)
                                })
                                .collect(),
                        )
                })
                .collect();
        }
    }
    respond(&frame, OutBuf::new(), &resp)
}

/// A client-given reason (KIP-800) for a log line: at most 200 characters.
fn truncated(reason: &str) -> &str {
    match reason.char_indices().nth(200) {
        Some((i, _)) => &reason[..i],
        None => reason,
    }
}
