//! The controller: shard 0 alone changes cluster metadata. It validates a change against the
//! current image, persists the new image (fsync + rename) before anyone sees it, then sends it
//! to every shard and waits until each has opened or deleted its partitions. Only then does the
//! request that asked for the change get its answer, so a client that created a topic can
//! produce to it at once.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use futures::channel::oneshot;

use super::agent;
use super::metadata::{self, Image, TopicError, TopicMeta};
use super::rpc::{Request, Response as RpcResponse};
use crate::config::{PARTITIONS_PER_BROKER_MAX, PARTITIONS_PER_TOPIC_MAX};
use crate::shard::{ControlOp, ControlReply, Shard, ShardMsg};
use crate::storage::log::blocking;

pub const CONTROLLER_SHARD: usize = 0;

pub async fn handle(s: &Rc<Shard>, op: ControlOp) -> ControlReply {
    assert_eq!(
        s.id, CONTROLLER_SHARD,
        "metadata changes run on the controller shard"
    );
    if s.config.in_cluster() {
        return forward(op).await;
    }
    let _permit = s.control_lock.acquire_permit(1).await;
    let mut image: Image = (*s.image()).clone();
    let mut changed = false;
    let results: ControlReply = match op {
        ControlOp::CreateTopics(topics, validate_only) => topics
            .into_iter()
            .map(|t| {
                let (partitions, rf) = metadata::check_new_topic(&image, &s.config, &t)?;
                if !validate_only {
                    let parts = metadata::assign_shards(&mut image, partitions as usize, s.count);
                    image.topics.insert(
                        t.name.clone(),
                        TopicMeta { id: uuid::Uuid::new_v4(), partitions: parts, configs: t.configs, internal: false },
                    );
                    changed = true;
                }
                Ok((partitions, rf))
            })
            .collect(),
        ControlOp::DeleteTopics(names) => names
            .into_iter()
            .map(|n| match image.topics.remove(&n) {
                Some(t) if t.internal => {
                    image.topics.insert(n.clone(), t);
                    Err(TopicError::InvalidRequest(format!("Topic {n} is an internal topic and cannot be deleted")))
                }
                Some(t) => {
                    changed = true;
                    Ok((t.partitions.len() as i32, 1))
                }
                None => Err(TopicError::Unknown),
            })
            .collect(),
        ControlOp::CreatePartitions(list, validate_only) => list
            .into_iter()
            .map(|(name, count)| {
                let current = image.topics.get(&name).ok_or(TopicError::Unknown)?.partitions.len() as i32;
                if count < current {
                    return Err(TopicError::InvalidPartitions(format!(
                        "Topic currently has {current} partitions, which is higher than the requested {count}."
                    )));
                }
                if count == current {
                    return Err(TopicError::InvalidPartitions(format!("Topic already has {current} partitions.")));
                }
                if count > PARTITIONS_PER_TOPIC_MAX || image.partition_count() + (count - current) as usize > PARTITIONS_PER_BROKER_MAX {
                    return Err(TopicError::InvalidPartitions(format!(
                        "{count} partitions exceed Weir's limits ({PARTITIONS_PER_TOPIC_MAX} per topic, {PARTITIONS_PER_BROKER_MAX} per broker)."
                    )));
                }
                if !validate_only {
                    let parts = metadata::assign_shards(&mut image, (count - current) as usize, s.count);
                    image.topics.get_mut(&name).expect("checked above").partitions.extend(parts);
                    changed = true;
                }
                Ok((count, 1))
            })
            .collect(),
        ControlOp::AlterPartition { .. } => vec![Err(TopicError::InvalidRequest(
            "a single node has no replicas to change".into(),
        ))],
        // A single node holds every replica: it can only be asked to keep it.
        ControlOp::AlterReassignments(list) => list
            .into_iter()
            .map(|(t, p, target)| {
                use crate::kafka::errors::*;
                let known = image
                    .topics
                    .get(&t)
                    .is_some_and(|t| p >= 0 && (p as usize) < t.partitions.len());
                Ok((p, match target {
                    _ if !known => UNKNOWN_TOPIC_OR_PARTITION,
                    None => NO_REASSIGNMENT_IN_PROGRESS,
                    Some(r) if r == [s.config.node_id] => NONE,
                    Some(_) => INVALID_REPLICA_ASSIGNMENT,
                }))
            })
            .collect(),
        ControlOp::UnregisterBroker(_) => vec![Err(TopicError::InvalidRequest(
            "a single node cannot unregister itself".into(),
        ))],
        // A single node leads every partition: there is nothing to elect.
        ControlOp::ElectLeaders(list, _) => list
            .into_iter()
            .map(|(t, p)| {
                let known = image
                    .topics
                    .get(&t)
                    .is_some_and(|t| p >= 0 && (p as usize) < t.partitions.len());
                Ok((p, if known { crate::kafka::errors::ELECTION_NOT_NEEDED } else { crate::kafka::errors::UNKNOWN_TOPIC_OR_PARTITION }))
            })
            .collect(),
        ControlOp::AlterTopicConfigs(edits, validate_only) => edits
            .into_iter()
            .map(|(name, edit)| {
                let t = image.topics.get(&name).ok_or(TopicError::Unknown)?;
                let new = edit
                    .apply(&t.configs, &s.config.log)
                    .map_err(|e| TopicError::InvalidConfig(e.to_string()))?;
                s.config
                    .log
                    .with_topic_overrides(&new)
                    .map_err(|e| TopicError::InvalidConfig(e.to_string()))?;
                if !validate_only && new != t.configs {
                    image.topics.get_mut(&name).expect("checked above").configs = new;
                    changed = true;
                }
                Ok((0, 0))
            })
            .collect(),
        ControlOp::AlterBrokerConfigs(edits, validate_only) => edits
            .into_iter()
            .map(|(resource, edit)| {
                let current = image.broker_configs.get(&resource).cloned().unwrap_or_default();
                let new = super::decide::broker_config_edit(&resource, &current, edit)?;
                if !validate_only && new != current {
                    if new.is_empty() {
                        image.broker_configs.remove(&resource);
                    } else {
                        image.broker_configs.insert(resource, new);
                    }
                    changed = true;
                }
                Ok((0, 0))
            })
            .collect(),
    };
    if !changed {
        return results;
    }
    image.version += 1;
    image.single_node(&s.config);
    let image = Arc::new(image);
    let (dir, to_store) = (s.config.data_dir.clone(), image.clone());
    let stored = blocking(move || {
        crate::storage::reserve::with_reserve(&dir, || metadata::store(&dir, &to_store))
    });
    if let Err(e) = stored.await {
        tracing::error!("persisting metadata failed: {e:#}");
        let msg = format!("The broker could not persist metadata: {e}");
        return results
            .into_iter()
            .map(|r| r.and(Err(TopicError::InvalidRequest(msg.clone()))))
            .collect();
    }
    broadcast(s, image).await;
    results
}

/// Producer ids are reserved in blocks of this many: one metadata write per block.
pub const PRODUCER_ID_BLOCK: i64 = 1000;

/// Hands out a producer id that was never handed out before, across restarts: ids come from a
/// block whose end is persisted before any id in it is used.
pub async fn allocate_producer_id(s: &Rc<Shard>) -> anyhow::Result<i64> {
    assert_eq!(s.id, CONTROLLER_SHARD);
    if s.config.in_cluster() {
        return allocate_producer_id_in_cluster(s).await;
    }
    let _permit = s.control_lock.acquire_permit(1).await;
    let mut image: Image = (*s.image()).clone();
    if s.producer_id_next.get() >= image.producer_id_block_end {
        // Ids at or above the persisted block end were never handed out.
        let start = image.producer_id_block_end;
        image.producer_id_block_end = start + PRODUCER_ID_BLOCK;
        image.version += 1;
        let image = Arc::new(image);
        let (dir, to_store) = (s.config.data_dir.clone(), image.clone());
        blocking(move || {
            crate::storage::reserve::with_reserve(&dir, || metadata::store(&dir, &to_store))
        })
        .await?;
        s.set_image(image);
        s.producer_id_next.set(start);
    }
    let id = s.producer_id_next.get();
    s.producer_id_next.set(id + 1);
    Ok(id)
}

/// Sends a new image to every shard and waits for each to apply it.
pub async fn broadcast(s: &Rc<Shard>, image: Arc<Image>) {
    let mut replies = Vec::with_capacity(s.count);
    for target in 0..s.count {
        let (tx, rx) = oneshot::channel();
        s.send(
            target,
            ShardMsg::Apply {
                image: image.clone(),
                reply: tx,
            },
        )
        .await;
        replies.push((target, rx));
    }
    for (target, rx) in replies {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(shard = target, "applying metadata failed: {e}"),
            Err(_) => tracing::warn!(
                shard = target,
                "shard did not answer a metadata change (shutting down?)"
            ),
        }
    }
}

/// Asks the controller for a change, from any shard.
pub async fn request(s: &Rc<Shard>, op: ControlOp) -> Option<ControlReply> {
    let (tx, rx) = oneshot::channel();
    s.send(CONTROLLER_SHARD, ShardMsg::Control { op, reply: tx })
        .await;
    rx.await.ok()
}

// ---- in a cluster ----

/// How long a forwarded change may take: the controller's answer, then this broker applying
/// the version it committed at.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// Shard 0 of a broker in a cluster: turns each image the agent sees into this broker's
/// `Image` (keeping its shard table), stores it, and applies it on every shard. Runs until the
/// agent stops.
pub async fn follow_cluster(s: Rc<Shard>) {
    assert_eq!(s.id, CONTROLLER_SHARD);
    let Some(agent) = agent::agent() else { return };
    let mut rx = agent.watch_view();
    loop {
        let view = rx.borrow_and_update().clone();
        let current = s.image();
        // Never an image older than the one stored: a restarted voter's state machine starts
        // from its snapshot and re-applies the log only once it learns the commit index, and
        // following that older image would delete every partition created since.
        let newer = view.image.version > current.version;
        let same = view.image.version == current.version;
        if newer
            || (same && view.controller != current.controller_id)
            || (same && current.brokers.is_empty() && !view.image.brokers.is_empty())
        {
            let _permit = s.control_lock.acquire_permit(1).await;
            let image = Arc::new(Image::from_cluster(
                &view.image,
                view.controller,
                &s.image(),
                s.config.node_id,
                s.count,
            ));
            let (dir, to_store) = (s.config.data_dir.clone(), image.clone());
            let stored = blocking(move || {
                crate::storage::reserve::with_reserve(&dir, || metadata::store(&dir, &to_store))
            })
            .await;
            match stored {
                Ok(()) => {
                    let version = image.version;
                    broadcast(&s, image).await;
                    agent.set_applied(version);
                }
                Err(e) => {
                    tracing::error!("persisting metadata failed: {e:#}; retrying");
                    glommio::timer::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// A change asked of the active controller; answered once this shard applied it, so the
/// client that created a topic can use it on this broker at once.
async fn forward(op: ControlOp) -> ControlReply {
    let n = match &op {
        ControlOp::CreateTopics(t, _) => t.len(),
        ControlOp::DeleteTopics(t) => t.len(),
        ControlOp::CreatePartitions(t, _) => t.len(),
        ControlOp::AlterTopicConfigs(t, _) => t.len(),
        ControlOp::AlterBrokerConfigs(t, _) => t.len(),
        ControlOp::AlterPartition { .. } => 1,
        ControlOp::ElectLeaders(list, _) => list.len(),
        ControlOp::AlterReassignments(list) => list.len(),
        ControlOp::UnregisterBroker(_) => 1,
    };
    let fail = |why: String| vec![Err(TopicError::InvalidRequest(why)); n];
    let Some(agent) = agent::agent() else {
        return fail("no cluster agent".into());
    };
    let deadline = std::time::Instant::now() + FORWARD_TIMEOUT;
    match agent.ask(Request::Control(op), deadline).await {
        Ok(RpcResponse::Control { answers, version }) => {
            // Bounded by the deadline; the image arrives within a heartbeat or two.
            while agent.applied() < version && std::time::Instant::now() < deadline {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            answers
        }
        Ok(other) => fail(format!("unexpected controller answer: {other:?}")),
        Err(e) => fail(format!("The active controller is not available: {e}")),
    }
}

/// A producer id from this broker's block, asking the controller for a new block when it is
/// used up.
async fn allocate_producer_id_in_cluster(s: &Rc<Shard>) -> anyhow::Result<i64> {
    let _permit = s.control_lock.acquire_permit(1).await;
    if s.producer_id_next.get() >= s.producer_id_end.get() {
        let agent = agent::agent().context("no cluster agent")?;
        let deadline = std::time::Instant::now() + FORWARD_TIMEOUT;
        match agent
            .ask(
                Request::ProducerIds {
                    node_id: s.config.node_id,
                },
                deadline,
            )
            .await
        {
            Ok(RpcResponse::ProducerIds { start, end }) => {
                s.producer_id_next.set(start);
                s.producer_id_end.set(end);
            }
            Ok(other) => anyhow::bail!("unexpected controller answer: {other:?}"),
            Err(e) => anyhow::bail!("no producer ids: {e}"),
        }
    }
    let id = s.producer_id_next.get();
    s.producer_id_next.set(id + 1);
    Ok(id)
}
