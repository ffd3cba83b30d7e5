//! Fetch v4-12: the fetch planner groups partitions by owner shard, reads them there (cache
//! first, then disk), and long-polls up to max_wait_ms when less than min_bytes is available,
//! woken by appends. Fetch sessions (KIP-227) are declined: every response has session id 0,
//! so clients send full fetch requests. Record batches go into the response as stored `Bytes`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{FetchRequest, FetchResponse};

use super::errors::*;
use super::{decode, respond, Response};
use crate::protocol::{OutBuf, RequestFrame};
use crate::shard::{shard, FetchItem, FetchResult, ShardMsg};

/// Upper bound on one fetch response's record bytes, whatever the client asks (Kafka's
/// fetch.max.bytes default is 50 MiB).
pub const FETCH_RESPONSE_BYTES_MAX: usize = 64 << 20;
/// Longest long-poll honoured.
pub const FETCH_WAIT_MS_MAX: i32 = 60_000;
const FETCH_SESSION_ID_NOT_FOUND: i16 = 70;

type Plan = BTreeMap<usize, Vec<(usize, usize, FetchItem)>>;

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
            .map(|(_, _, i)| FetchItem {
                topic: i.topic.clone(),
                partition: i.partition,
                offset: i.offset,
                partition_max_bytes: i.partition_max_bytes,
                current_leader_epoch: i.current_leader_epoch,
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

fn store(results: &mut [Vec<FetchResult>], plan: &Plan, target: usize, got: Vec<FetchResult>) {
    for ((ti, pi, _), r) in plan[&target].iter().zip(got) {
        results[*ti][*pi] = r;
    }
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

    if req.session_id != 0 {
        let resp = FetchResponse::default()
            .with_error_code(FETCH_SESSION_ID_NOT_FOUND)
            .with_session_id(0);
        return respond(&frame, OutBuf::new(), &resp);
    }

    let mut results: Vec<Vec<FetchResult>> = Vec::with_capacity(req.topics.len());
    let mut plan: Plan = BTreeMap::new();
    for (ti, t) in req.topics.iter().enumerate() {
        let name = t.topic.0.to_string();
        let mut row = Vec::with_capacity(t.partitions.len());
        for (pi, p) in t.partitions.iter().enumerate() {
            let unknown = FetchResult {
                error: UNKNOWN_TOPIC_OR_PARTITION,
                high_watermark: -1,
                log_start_offset: -1,
                records: Vec::new(),
            };
            row.push(unknown);
            let Some(owner) = image.owner(&name, p.partition) else {
                continue;
            };
            plan.entry(owner as usize).or_default().push((
                ti,
                pi,
                FetchItem {
                    topic: name.clone(),
                    partition: p.partition,
                    offset: p.fetch_offset,
                    partition_max_bytes: (p.partition_max_bytes.max(0) as usize).min(max_bytes),
                    current_leader_epoch: if frame.api_version >= 9 {
                        p.current_leader_epoch
                    } else {
                        -1
                    },
                },
            ));
        }
        results.push(row);
    }

    // Pass one: what is there now.
    for (target, rx) in run_plan(&plan, max_bytes, None).await {
        if let Ok(got) = rx.await {
            store(&mut results, &plan, target, got);
        }
    }
    let total: usize = results.iter().flatten().map(|r| r.bytes()).sum();
    let errors = results.iter().flatten().any(|r| r.error != NONE);
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
                let news = got.iter().any(|r| !r.records.is_empty() || r.error != NONE);
                store(&mut results, &plan, target, got);
                if news {
                    break;
                }
            }
        }
    }

    // Enforce max_bytes over the whole response: the first non-empty partition is always
    // returned whole (KIP-74), later ones only while they fit.
    let mut budget_used = 0usize;
    let mut out = OutBuf::new();
    let mut topics = Vec::with_capacity(req.topics.len());
    for (t, row) in req.topics.iter().zip(results) {
        let mut partitions = Vec::with_capacity(row.len());
        for (p, mut r) in t.partitions.iter().zip(row) {
            let bytes = r.bytes();
            if budget_used > 0 && budget_used + bytes > max_bytes {
                r.records.clear();
            } else {
                budget_used += bytes;
            }
            let hw = r.high_watermark;
            partitions.push(
                PartitionData::default()
                    .with_partition_index(p.partition)
                    .with_error_code(r.error)
                    .with_high_watermark(hw)
                    .with_last_stable_offset(hw)
                    .with_log_start_offset(if frame.api_version >= 5 {
                        r.log_start_offset
                    } else {
                        -1
                    })
                    .with_aborted_transactions(if req.isolation_level == 1 {
                        Some(Vec::new())
                    } else {
                        None
                    })
                    .with_preferred_read_replica((-1).into())
                    .with_records(Some(out.splice(r.records))),
            );
        }
        topics.push(
            FetchableTopicResponse::default()
                .with_topic(t.topic.clone())
                .with_partitions(partitions),
        );
    }
    let resp = FetchResponse::default()
        .with_session_id(0)
        .with_responses(topics);
    respond(&frame, out, &resp)
}
