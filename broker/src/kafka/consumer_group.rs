//! The KIP-848 consumer group APIs: ConsumerGroupHeartbeat v0 and ConsumerGroupDescribe v0,
//! run on the group's coordinator shard (see `group::consumer`).

use std::collections::HashMap;

use futures::FutureExt;
use kafka_protocol::messages::consumer_group_describe_response::{
    self as describe, DescribedGroup,
};
use kafka_protocol::messages::consumer_group_heartbeat_response::{self as hb, Assignment};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use uuid::Uuid;

use super::errors::*;
use super::groups::on_coordinator;
use super::{decode, respond, Response};
use crate::group::consumer::{self, Heartbeat};
use crate::protocol::{OutBuf, RequestFrame};

const AUTHORIZED_OPERATIONS_OMITTED: i32 = i32::MIN;

fn sb(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

pub async fn handle_heartbeat(frame: RequestFrame) -> Result<Response, String> {
    let req: ConsumerGroupHeartbeatRequest = decode(&frame)?;
    let args = Heartbeat {
        group: req.group_id.0.to_string(),
        member_id: req.member_id.to_string(),
        epoch: req.member_epoch,
        instance_id: req.instance_id.as_ref().map(|x| x.to_string()),
        rack_id: req.rack_id.as_ref().map(|x| x.to_string()),
        rebalance_timeout_ms: req.rebalance_timeout_ms,
        subscribed: req
            .subscribed_topic_names
            .as_ref()
            .map(|ts| ts.iter().map(|t| t.0.to_string()).collect()),
        regex: req.subscribed_topic_regex.as_ref().map(|x| x.to_string()),
        assignor: req.server_assignor.as_ref().map(|x| x.to_string()),
        owned: req.topic_partitions.as_ref().map(|tps| {
            let mut a = consumer::Assignment::new();
            for tp in tps {
                a.entry(tp.topic_id)
                    .or_default()
                    .extend(tp.partitions.iter().copied());
            }
            a
        }),
        client_id: frame
            .header
            .client_id
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        client_host: frame.client_host.clone(),
    };
    let group = args.group.clone();
    let answer = if group.is_empty() {
        // No coordinator to route to: the validation answers.
        consumer::heartbeat(
            &mut HashMap::new(),
            &args,
            0,
            &Default::default(),
            &Default::default(),
            std::time::Instant::now(),
        )
        .err()
        .unwrap_or_default()
    } else {
        on_coordinator(
            &group,
            |code| consumer::Answer {
                error: code,
                epoch: -1,
                ..Default::default()
            },
            move |s, partition| {
                async move { s.consumer_heartbeat(args, partition).await }.boxed_local()
            },
        )
        .await
    };
    let mut resp = ConsumerGroupHeartbeatResponse::default()
        .with_error_code(answer.error)
        .with_error_message(answer.message.map(sb))
        .with_member_id(answer.member_id.map(sb))
        .with_member_epoch(answer.epoch)
        .with_heartbeat_interval_ms(answer.heartbeat_interval_ms);
    resp.assignment = answer.assignment.map(|a| {
        Assignment::default().with_topic_partitions(
            a.into_iter()
                .map(|(t, ps)| {
                    hb::TopicPartitions::default()
                        .with_topic_id(t)
                        .with_partitions(ps.into_iter().collect())
                })
                .collect(),
        )
    });
    respond(&frame, OutBuf::new(), &resp)
}

/// One described member, gathered on the coordinator.
type MemberRow = (
    String,
    Option<String>,
    Option<String>,
    i32,
    String,
    String,
    Vec<String>,
    consumer::Assignment,
    consumer::Assignment,
);

pub async fn handle_describe(frame: RequestFrame) -> Result<Response, String> {
    let req: ConsumerGroupDescribeRequest = decode(&frame)?;
    let names: HashMap<Uuid, String> = crate::shard::shard()
        .image()
        .topics
        .iter()
        .map(|(n, t)| (t.id, n.clone()))
        .collect();
    let assignment = |a: consumer::Assignment| {
        describe::Assignment::default().with_topic_partitions(
            a.into_iter()
                .map(|(t, ps)| {
                    describe::TopicPartitions::default()
                        .with_topic_id(t)
                        .with_topic_name(TopicName(sb(names.get(&t).cloned().unwrap_or_default())))
                        .with_partitions(ps.into_iter().collect())
                })
                .collect(),
        )
    };
    let mut out = Vec::with_capacity(req.group_ids.len());
    for gid in &req.group_ids {
        let id = gid.0.to_string();
        let i2 = id.clone();
        let r = on_coordinator(&id, Err, move |s, _| {
            async move {
                let groups = s.groups.groups.borrow();
                let Some(cg) = groups.get(&i2).and_then(|g| g.consumer.as_ref()) else {
                    return Err(GROUP_ID_NOT_FOUND);
                };
                let members: Vec<MemberRow> = cg
                    .members
                    .values()
                    .map(|m| {
                        (
                            m.id.clone(),
                            m.instance_id.clone(),
                            m.rack_id.clone(),
                            m.epoch,
                            m.client_id.clone(),
                            m.client_host.clone(),
                            m.subscribed.clone(),
                            m.assigned.clone(),
                            cg.target.get(&m.id).cloned().unwrap_or_default(),
                        )
                    })
                    .collect();
                Ok((
                    cg.state_name(),
                    cg.epoch,
                    cg.assignment_epoch,
                    cg.assignor(),
                    members,
                ))
            }
            .boxed_local()
        })
        .await;
        let mut d = DescribedGroup::default()
            .with_group_id(gid.clone())
            .with_authorized_operations(AUTHORIZED_OPERATIONS_OMITTED);
        match r {
            Err(code) => {
                d.error_code = code;
                if code == GROUP_ID_NOT_FOUND {
                    d.error_message = Some(sb(format!("Group {id} not found.")));
                }
                d.group_state = sb("Dead");
            }
            Ok((state, epoch, assignment_epoch, assignor, members)) => {
                d.group_state = sb(state);
                d.group_epoch = epoch;
                d.assignment_epoch = assignment_epoch;
                d.assignor_name = sb(assignor);
                d.members = members
                    .into_iter()
                    .map(|(mid, inst, rack, epoch, client, host, subs, cur, tgt)| {
                        describe::Member::default()
                            .with_member_id(sb(mid))
                            .with_instance_id(inst.map(sb))
                            .with_rack_id(rack.map(sb))
                            .with_member_epoch(epoch)
                            .with_client_id(sb(client))
                            .with_client_host(sb(host))
                            .with_subscribed_topic_names(
                                subs.into_iter().map(|t| TopicName(sb(t))).collect(),
                            )
                            .with_assignment(assignment(cur))
                            .with_target_assignment(assignment(tgt))
                    })
                    .collect();
            }
        }
        out.push(d);
    }
    respond(
        &frame,
        OutBuf::new(),
        &ConsumerGroupDescribeResponse::default().with_groups(out),
    )
}
