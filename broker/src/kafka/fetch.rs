//! Fetch v4-17: the fetch planner groups partitions by owner shard, reads them there (cache
//! first, then disk), and long-polls up to max_wait_ms when less than min_bytes is available,
//! woken by appends. From v7 a client may open an incremental fetch session (KIP-227,
//! `fetch_session.rs`): later requests carry only changed partitions and responses only
//! partitions with news. Record batches go into the response as stored `Bytes`.
//!
//! From v13 topics are named by topic id (KIP-516), resolved through the image; an id the
//! image does not know is answered with UNKNOWN_TOPIC_ID (and stays in a session until
//! forgotten). v14 only adds an error Weir never gives (no tiered storage); v15 moves a
//! follower's id into the tagged ReplicaState; v16 answers NOT_LEADER_OR_FOLLOWER and
//! FENCED_LEADER_EPOCH with the current leader and its endpoint (KIP-951); v17 adds the
//! follower's directory id, which Weir (one log directory) ignores.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use kafka_protocol::messages::fetch_response::{
    AbortedTransaction, FetchableTopicResponse, LeaderIdAndEpoch, NodeEndpoint, PartitionData,
};
use kafka_protocol::messages::{FetchRequest, FetchResponse, ProducerId, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::errors::*;
use super::fetch_session::{
    self as sessions, CachedPartition, TopicRef, FETCH_SESSION_ID_NOT_FOUND,
    FETCH_SESSION_TOPIC_ID_ERROR, INVALID_FETCH_SESSION_EPOCH,
};
use super::topics::{self, NodeEndpoints};
use super::{decode, respond, Response};
use crate::protocol::{OutBuf, RequestFrame};
use crate::replication::throttle;
use crate::shard::{shard, FetchItem, FetchResult, ShardMsg, CONSUMER};

/// Upper bound on one fetch response's record bytes, whatever the client asks (Kafka's
/// fetch.max.bytes default is 50 MiB).
pub const FETCH_RESPONSE_BYTES_MAX: usize = 64 << 20;
/// Longest long-poll honoured.
pub const FETCH_WAIT_MS_MAX: i32 = 60_000;
/// Owner shard -> (index into the fetch's partition list, what to read).
type Plan = BTreeMap<usize, Vec<(usize, FetchItem)>>;

async fn run_plan(
    plan: &Plan,
    max_bytes: usize,
    wait_until: Option<Instant>,
) -> Vec<(usize, oneshot::Receiver<Vec<FetchResult>>)> {
    let s = shard();
    let mut rxs = Vec::with_capacity(plan.len());
    for (&target, items) in plan {
        let (tx, rx) = oneshot::channel();
        let items = items
            .iter()
            .map(|(_, i)| FetchItem {
                topic: i.topic.clone(),
                partition: i.partition,
                offset: i.offset,
                partition_max_bytes: i.partition_max_bytes,
                current_leader_epoch: i.current_leader_epoch,
                replica_id: i.replica_id,
                last_fetched_epoch: i.last_fetched_epoch,
                read_committed: i.read_committed,
            })
            .collect();
        s.send(
            target,
            ShardMsg::Fetch {
                items,
                max_bytes,
                wait_until,
                reply: tx,
            },
        )
        .await;
        rxs.push((target, rx));
    }
    rxs
}

fn store(results: &mut [FetchResult], plan: &Plan, target: usize, got: Vec<FetchResult>) {
    for ((i, _), r) in plan[&target].iter().zip(got) {
        results[*i] = r;
    }
}

/// How the partitions of this fetch were chosen, which decides the response's shape.
enum Mode {
    /// Every partition of the request is answered; `session_id` is 0 (no session) or the id
    /// of a session this request just opened.
    Full { session_id: i32 },
    /// An incremental fetch in session `session_id`: only partitions with news are answered.
    Incremental { session_id: i32 },
}

fn session_error(frame: &RequestFrame, code: i16) -> Result<Response, String> {
    let resp = FetchResponse::default()
        .with_error_code(code)
        .with_session_id(0);
    respond(frame, OutBuf::new(), &resp)
}

pub async fn handle(frame: RequestFrame) -> Result<Response, String> {
    let req: FetchRequest = decode(&frame)?;
    let s = shard();
    let image = s.image();
    let max_bytes = if frame.api_version >= 3 {
        req.max_bytes.max(1) as usize
    } else {
        usize::MAX
    }
    .min(FETCH_RESPONSE_BYTES_MAX);
    let max_wait = Duration::from_millis(req.max_wait_ms.clamp(0, FETCH_WAIT_MS_MAX) as u64);
    let min_bytes = req.min_bytes.max(0) as usize;

    let leader_epoch = |e: i32| if frame.api_version >= 9 { e } else { -1 };
    // v13+: topics by id; the names are the image's ("" for an id it does not know).
    let by_id = frame.api_version >= 13;
    let names = by_id.then(|| topics::names_by_id(&image));
    let name_of = |id: &uuid::Uuid| -> String {
        names
            .as_ref()
            .and_then(|n| n.get(id).cloned())
            .unwrap_or_default()
    };
    let from_request = || -> Vec<CachedPartition> {
        req.topics
            .iter()
            .flat_map(|t| {
                let (name, topic_id) = if by_id {
                    (name_of(&t.topic_id), t.topic_id)
                } else {
                    (t.topic.0.to_string(), uuid::Uuid::nil())
                };
                t.partitions.iter().map(move |p| {
                    let mut c = CachedPartition::new(
                        name.clone(),
                        p.partition,
                        p.fetch_offset,
                        (p.partition_max_bytes.max(0) as usize).min(max_bytes),
                        leader_epoch(p.current_leader_epoch),
                    );
                    c.topic_id = topic_id;
                    if frame.api_version >= 12 {
                        c.last_fetched_epoch = p.last_fetched_epoch;
                    }
                    c
                })
            })
            .collect()
    };
    let (session_id, epoch) = if frame.api_version >= 7 {
        (req.session_id, req.session_epoch)
    } else {
        (0, -1)
    };
    let (mode, wanted) = match (session_id, epoch) {
        (0, -1) => (Mode::Full { session_id: 0 }, from_request()),
        (0, 0) => {
            let wanted = from_request();
            let id = sessions::create(s.id, s.count, by_id).unwrap_or(0);
            let fits = id != 0
                && sessions::with_session(id, |sess| wanted.iter().all(|p| sess.upsert(p.clone())))
                    .unwrap_or(false);
            if id != 0 && !fits {
                sessions::remove(id);
            }
            let session_id = if fits { id } else { 0 };
            (Mode::Full { session_id }, wanted)
        }
        (id, -1) => {
            sessions::remove(id);
            (Mode::Full { session_id: 0 }, from_request())
        }
        (id, epoch) => {
            let updates = from_request();
            let outcome = sessions::with_session(id, |sess| {
                if epoch != sess.next_epoch {
                    return Err(INVALID_FETCH_SESSION_EPOCH);
                }
                if sess.uses_topic_ids != by_id {
                    return Err(FETCH_SESSION_TOPIC_ID_ERROR);
                }
                for f in &req.forgotten_topics_data {
                    let topic = if by_id {
                        TopicRef::Id(f.topic_id)
                    } else {
                        TopicRef::Name(f.topic.0.as_str())
                    };
                    for &p in &f.partitions {
                        sess.forget(topic, p);
                    }
                }
                if !updates.into_iter().all(|p| sess.upsert(p)) {
                    return Err(FETCH_SESSION_ID_NOT_FOUND);
                }
                sess.next_epoch = epoch.wrapping_add(1).max(1);
                Ok(sess.partitions.clone())
            });
            match outcome {
                None => return session_error(&frame, FETCH_SESSION_ID_NOT_FOUND),
                Some(Err(code)) => {
                    if code == FETCH_SESSION_ID_NOT_FOUND {
                        sessions::remove(id);
                    }
                    return session_error(&frame, code);
                }
                Some(Ok(mut wanted)) => {
                    // A session by id names its partitions with the current image's names: a
                    // topic deleted since is UNKNOWN_TOPIC_ID now.
                    if by_id {
                        for c in &mut wanted {
                            c.topic = name_of(&c.topic_id);
                        }
                    }
                    (Mode::Incremental { session_id: id }, wanted)
                }
            }
        }
    };

    // A follower broker's fetch (replica id >= 0) reads to the log end and reports its
    // position; its LastFetchedEpoch (v12, kept in the session like the offset) is checked for
    // divergence.
    // From v15 the follower's id is in the tagged ReplicaState.
    let requester = if frame.api_version >= 15 {
        req.replica_state.replica_id.0
    } else {
        req.replica_id.0
    };
    let replica_id = if requester >= 0 { requester } else { CONSUMER };
    // The leader's replication throttle: partitions it applies to (out-of-sync follower of a
    // listed replica) are answered without records while the broker's bucket is empty.
    let me = s.config.node_id;
    let leader_rate = (replica_id >= 0)
        .then(|| throttle::rate(&image, me, throttle::LEADER_RATE))
        .flatten();
    let over_quota = leader_rate.is_some_and(|r| throttle::LEADER.exceeded(r));
    let mut throttled = vec![false; wanted.len()];
    let mut results: Vec<FetchResult> = Vec::with_capacity(wanted.len());
    let mut plan: Plan = BTreeMap::new();
    for (i, c) in wanted.iter().enumerate() {
        results.push(FetchResult {
            error: UNKNOWN_TOPIC_OR_PARTITION,
            high_watermark: -1,
            log_start_offset: -1,
            records: Vec::new(),
            diverging: None,
            last_stable_offset: -1,
            aborted: Vec::new(),
        });
        if by_id && c.topic.is_empty() {
            results[i].error = UNKNOWN_TOPIC_ID;
            continue;
        }
        let owner = match image.route(&c.topic, c.partition, s.config.node_id) {
            Ok(owner) => owner,
            Err(code) => {
                results[i].error = code;
                continue;
            }
        };
        if leader_rate.is_some()
            && throttle::listed(&image, &c.topic, throttle::LEADER_REPLICAS, c.partition, me)
            && image
                .topics
                .get(&c.topic)
                .and_then(|t| t.partitions.get(c.partition as usize))
                .is_some_and(|pm| !pm.isr.contains(&replica_id))
        {
            throttled[i] = true;
        }
        plan.entry(owner as usize).or_default().push((
            i,
            FetchItem {
                topic: c.topic.clone(),
                partition: c.partition,
                offset: c.fetch_offset,
                partition_max_bytes: if throttled[i] && over_quota {
                    0
                } else {
                    c.max_bytes
                },
                current_leader_epoch: c.current_leader_epoch,
                replica_id,
                last_fetched_epoch: if replica_id >= 0 {
                    c.last_fetched_epoch
                } else {
                    -1
                },
                read_committed: replica_id < 0 && req.isolation_level == 1,
            },
        ));
    }

    // Pass one: what is there now.
    for (target, rx) in run_plan(&plan, max_bytes, None).await {
        if let Ok(got) = rx.await {
            store(&mut results, &plan, target, got);
        }
    }
    let total: usize = results.iter().map(|r| r.bytes()).sum();
    let errors = results
        .iter()
        .any(|r| r.error != NONE || r.diverging.is_some());
    if total < min_bytes.max(1) && !errors && !max_wait.is_zero() && !plan.is_empty() {
        // Pass two: every owner waits for an append (or the deadline); the first to return
        // with data ends the wait, and dropping the others' replies cancels their waits.
        let deadline = Instant::now() + max_wait;
        let mut pending = run_plan(&plan, max_bytes, Some(deadline)).await;
        // Bounded by the number of owner shards.
        while !pending.is_empty() {
            let (got, i, _) =
                futures::future::select_all(pending.iter_mut().map(|(_, rx)| rx)).await;
            let (target, _) = pending.swap_remove(i);
            if let Ok(got) = got {
                let news = got
                    .iter()
                    .any(|r| !r.records.is_empty() || r.error != NONE || r.diverging.is_some());
                store(&mut results, &plan, target, got);
                if news {
                    break;
                }
            }
        }
    }

    // Which partitions the response names: all of them for a full fetch; for an incremental
    // one only those with records, an error, or a moved high watermark or log start. Either
    // way the session remembers what it told the client.
    let session_id = match mode {
        Mode::Full { session_id } | Mode::Incremental { session_id } => session_id,
    };
    let incremental = matches!(mode, Mode::Incremental { .. });
    let include: Vec<bool> = if session_id == 0 {
        vec![true; results.len()]
    } else {
        sessions::with_session(session_id, |sess| {
            wanted
                .iter()
                .zip(&results)
                .map(|(w, r)| {
                    let key = if by_id {
                        TopicRef::Id(w.topic_id)
                    } else {
                        TopicRef::Name(&w.topic)
                    };
                    let news = match sess.get_mut(key, w.partition) {
                        Some(c) => c.must_respond(
                            !r.records.is_empty(),
                            r.error,
                            r.high_watermark,
                            r.log_start_offset,
                        ),
                        None => true,
                    };
                    news || !incremental || r.diverging.is_some()
                })
                .collect()
        })
        .unwrap_or_else(|| vec![true; results.len()])
    };

    // Enforce max_bytes over the whole response: the first non-empty partition is always
    // returned whole (KIP-74), later ones only while they fit.
    let mut budget_used = 0usize;
    let mut throttled_bytes = 0usize;
    let mut out = OutBuf::new();
    let mut topics: Vec<FetchableTopicResponse> = Vec::new();
    let mut endpoints = NodeEndpoints::default();
    for (((w, mut r), included), throttled) in
        wanted.iter().zip(results).zip(include).zip(throttled)
    {
        if !included {
            continue;
        }
        let bytes = r.bytes();
        if budget_used > 0 && budget_used + bytes > max_bytes {
            r.records.clear();
        } else {
            budget_used += bytes;
            if throttled {
                throttled_bytes += bytes;
            }
        }
        let hw = r.high_watermark;
        // KIP-951 (v16+): where the leader is, for a client that asked the wrong broker.
        let mut current_leader = LeaderIdAndEpoch::default()
            .with_leader_id((-1).into())
            .with_leader_epoch(-1);
        if frame.api_version >= 16
            && matches!(r.error, NOT_LEADER_OR_FOLLOWER | FENCED_LEADER_EPOCH)
        {
            let (leader, epoch, endpoint) = topics::current_leader(&image, &w.topic, w.partition);
            current_leader = current_leader
                .with_leader_id(leader.into())
                .with_leader_epoch(epoch);
            endpoints.add(leader, endpoint);
        }
        let data = PartitionData::default()
            .with_partition_index(w.partition)
            .with_error_code(r.error)
            .with_high_watermark(hw)
            .with_last_stable_offset(if r.last_stable_offset >= 0 {
                r.last_stable_offset
            } else {
                hw
            })
            .with_log_start_offset(if frame.api_version >= 5 {
                r.log_start_offset
            } else {
                -1
            })
            .with_aborted_transactions(if req.isolation_level == 1 {
                Some(
                    r.aborted
                        .iter()
                        .map(|a| {
                            AbortedTransaction::default()
                                .with_producer_id(ProducerId(a.producer_id))
                                .with_first_offset(a.first_offset)
                        })
                        .collect(),
                )
            } else {
                None
            })
            .with_preferred_read_replica((-1).into())
            .with_diverging_epoch(
                kafka_protocol::messages::fetch_response::EpochEndOffset::default()
                    .with_epoch(r.diverging.map(|d| d.0).unwrap_or(-1))
                    .with_end_offset(r.diverging.map(|d| d.1).unwrap_or(-1)),
            )
            .with_current_leader(current_leader)
            .with_records(Some(out.splice(r.records)));
        // Consecutive partitions of one topic share a topic entry.
        match topics.last_mut() {
            Some(t) if by_id && t.topic_id == w.topic_id => t.partitions.push(data),
            Some(t) if !by_id && t.topic.0.as_str() == w.topic => t.partitions.push(data),
            _ => topics.push(
                FetchableTopicResponse::default()
                    .with_topic(TopicName(StrBytes::from_string(if by_id {
                        String::new()
                    } else {
                        w.topic.clone()
                    })))
                    .with_topic_id(w.topic_id)
                    .with_partitions(vec![data]),
            ),
        }
    }
    if let Some(rate) = leader_rate {
        throttle::LEADER.record(rate, throttled_bytes);
    }
    let resp = FetchResponse::default()
        .with_session_id(session_id)
        .with_responses(topics)
        .with_node_endpoints(
            endpoints
                .into_entries()
                .map(|(id, (host, port, rack))| {
                    NodeEndpoint::default()
                        .with_node_id(id.into())
                        .with_host(StrBytes::from_string(host))
                        .with_port(port)
                        .with_rack(rack.map(StrBytes::from_string))
                })
                .collect(),
        );
    respond(&frame, out, &resp)
}
