//! Follower fetchers: one per leader broker this broker follows (Kafka's `num.replica.fetchers`
//! = 1), on shard 0. Each carries every partition the pair shares in one Fetch (v12, replica id
//! = this broker, `LastFetchedEpoch` per partition), long-polls the leader for
//! `replica.fetch.wait.max.ms`, and hands each owner shard its partitions' results in one
//! message. The owner appends the leader's batches as they are (same offsets, epochs and CRCs),
//! truncates where the leader answers a diverging epoch, takes the leader's high watermark, and
//! fdatasyncs before the next fetch, so the fetch offset the leader sees is durable here.
//!
//! | what | limit |
//! |---|---|
//! | one partition in a fetch | `replica.fetch.max.bytes` (1 MiB) |
//! | one response | `replica.fetch.response.max.bytes` (10 MiB); frames above `RESPONSE_FRAME_MAX` close the connection |
//! | a fetch round trip | `replica.fetch.wait.max.ms` + `IO_TIMEOUT` |
//! | after an error | `replica.fetch.backoff.ms` |

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ForgottenTopic};
use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::throttle;
use crate::kafka::errors::*;
use crate::peer::Conn;
use crate::shard::{Partition, Shard};
use crate::storage::batch;

const FETCH_VERSION: i16 = 12;
/// Connecting, writing a request, and reading beyond the long-poll wait.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response frame read from a leader: a whole response plus one oversized batch.
const RESPONSE_FRAME_MAX: usize =
    crate::kafka::fetch::FETCH_RESPONSE_BYTES_MAX + crate::config::MESSAGE_BYTES_CEILING;
/// The supervisor looks for leaders without a fetcher this often.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(100);

/// A partition this broker follows: (topic, index, owner shard, leader epoch, whether the
/// follower replication throttle applies: listed and not in the ISR).
type Followed = (String, i32, usize, i32, bool);

/// Shard 0: starts a fetcher for every leader broker some local replica follows; a fetcher
/// ends when nothing here follows its leader any more. Runs until shutdown.
pub async fn supervise(s: Rc<Shard>) {
    let running: Rc<RefCell<BTreeSet<i32>>> = Default::default();
    // Bounded: one pass per interval until shutdown.
    while !s.shutting_down.get() {
        let image = s.image();
        let me = s.config.node_id;
        let leaders: BTreeSet<i32> = image
            .topics
            .values()
            .flat_map(|t| t.partitions.iter())
            .filter(|pm| pm.hosted_on(me) && pm.leader >= 0 && pm.leader != me)
            .map(|pm| pm.leader)
            .collect();
        for leader in leaders {
            if running.borrow_mut().insert(leader) {
                let (s, running) = (s.clone(), running.clone());
                glommio::spawn_local(async move {
                    tracing::info!(leader, "follower fetcher started");
                    fetch_from(&s, leader).await;
                    running.borrow_mut().remove(&leader);
                    tracing::info!(leader, "follower fetcher stopped");
                })
                .detach();
            }
        }
        glommio::timer::sleep(SUPERVISE_INTERVAL).await;
    }
}

fn followed(s: &Shard, leader: i32) -> Vec<Followed> {
    let image = s.image();
    let me = s.config.node_id;
    let mut out = Vec::new();
    for (name, t) in &image.topics {
        for (i, pm) in t.partitions.iter().enumerate() {
            if pm.leader == leader && pm.hosted_on(me) {
                let throttled = !pm.isr.contains(&me)
                    && throttle::listed(&image, name, throttle::FOLLOWER_REPLICAS, i as i32, me);
                out.push((
                    name.clone(),
                    i as i32,
                    pm.shard as usize,
                    pm.leader_epoch,
                    throttled,
                ));
            }
        }
    }
    out
}

/// A follower replica's position: (log end, epoch of its last batch, log start).
type Position = (i64, i32, i64);
/// What a fetch session holds for one partition: (fetch offset, last fetched epoch, current
/// leader epoch, partition max bytes).
type Sent = (i64, i32, i32, i32);

/// The follower's side of an incremental fetch session with one leader (KIP-227): after the
/// first full fetch, a request names only partitions whose position or epoch changed, and
/// the partitions no longer followed as forgotten.
struct Session {
    id: i32,
    /// The epoch of the next request (1 after the full one, wrapping to 1).
    epoch: i32,
    sent: BTreeMap<(String, i32), Sent>,
}

/// One fetcher's loop against `leader`.
async fn fetch_from(s: &Rc<Shard>, leader: i32) {
    let cfg = s.config.cluster.clone();
    let backoff = Duration::from_millis(cfg.replica_fetch_backoff_ms);
    let mut conn: Option<Conn> = None;
    let mut session: Option<Session> = None;
    // Bounded by shutdown and by the partitions followed: it ends when none is left.
    while !s.shutting_down.get() {
        let parts = followed(s, leader);
        if parts.is_empty() {
            return;
        }
        let addr = s
            .image()
            .brokers
            .get(&leader)
            .map(|b| format!("{}:{}", b.host, b.port));
        let Some(addr) = addr else {
            glommio::timer::sleep(backoff).await;
            continue;
        };
        // Where each replica is, asked of its owner shard (one message per shard).
        let mut by_shard: BTreeMap<usize, Vec<(String, i32)>> = BTreeMap::new();
        for (t, p, shard, _, _) in &parts {
            by_shard.entry(*shard).or_default().push((t.clone(), *p));
        }
        let mut positions: BTreeMap<(String, i32), Position> = BTreeMap::new();
        for (shard, list) in by_shard {
            let got = s
                .run_on(shard, move |sh| {
                    Box::pin(async move {
                        list.into_iter()
                            .filter_map(|(t, i)| {
                                let p = sh.partition(&t, i)?;
                                let l = p.log.borrow();
                                Some((
                                    (t, i),
                                    (
                                        l.log_end_offset,
                                        l.epochs.latest_epoch(),
                                        l.log_start_offset,
                                    ),
                                ))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .await
                .unwrap_or_default();
            positions.extend(got);
        }
        if positions.is_empty() {
            // The replicas are not open yet (metadata still applying).
            glommio::timer::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if conn.as_ref().is_none_or(|c| c.addr != addr) {
            session = None;
            match Conn::connect(&addr, "weir-replica-fetcher", IO_TIMEOUT).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::debug!(leader, %addr, "follower fetcher cannot connect: {e:#}");
                    glommio::timer::sleep(backoff).await;
                    continue;
                }
            }
        }
        // The follower throttle: throttled partitions ask for 0 bytes while the bucket is
        // empty.
        let follower_rate = throttle::rate(&s.image(), s.config.node_id, throttle::FOLLOWER_RATE);
        let hold = follower_rate.is_some_and(|r| throttle::FOLLOWER.exceeded(r));
        let (req, current) = build_request(
            s.config.node_id,
            &cfg,
            &parts,
            &positions,
            session.as_ref(),
            hold,
        );
        let c = conn.as_mut().expect("connected above");
        let wait = Duration::from_millis(cfg.replica_fetch_wait_max_ms) + IO_TIMEOUT;
        let resp = match c
            .call::<_, FetchResponse>(ApiKey::Fetch, FETCH_VERSION, &req, wait, RESPONSE_FRAME_MAX)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(leader, %addr, "follower fetch failed: {e:#}");
                conn = None;
                session = None;
                glommio::timer::sleep(backoff).await;
                continue;
            }
        };
        if resp.error_code != NONE {
            let lost = resp.error_code == crate::kafka::fetch_session::FETCH_SESSION_ID_NOT_FOUND
                || resp.error_code == crate::kafka::fetch_session::INVALID_FETCH_SESSION_EPOCH;
            tracing::debug!(leader, code = resp.error_code, "follower fetch refused");
            session = None;
            if !lost {
                glommio::timer::sleep(backoff).await;
            }
            continue;
        }
        session = match session.take() {
            Some(mut sess) => {
                sess.epoch = if sess.epoch == i32::MAX {
                    1
                } else {
                    sess.epoch + 1
                };
                sess.sent = current;
                Some(sess)
            }
            None if resp.session_id != 0 => {
                tracing::info!(
                    leader,
                    session = resp.session_id,
                    partitions = current.len(),
                    "follower fetch session opened"
                );
                Some(Session {
                    id: resp.session_id,
                    epoch: 1,
                    sent: current,
                })
            }
            None => None,
        };
        // Results to their owner shards, one message each, applied concurrently.
        let owner: BTreeMap<(String, i32), (usize, bool)> = parts
            .iter()
            .map(|(t, p, sh, _, throttled)| ((t.clone(), *p), (*sh, *throttled)))
            .collect();
        let mut throttled_bytes = 0usize;
        let mut work: BTreeMap<usize, Vec<Fetched>> = BTreeMap::new();
        for t in resp.responses {
            let topic = t.topic.0.to_string();
            for pd in t.partitions {
                let key = (topic.clone(), pd.partition_index);
                let (Some(&(shard, throttled)), Some(&(fetch_offset, _, _))) =
                    (owner.get(&key), positions.get(&key))
                else {
                    continue;
                };
                if throttled {
                    throttled_bytes += pd.records.as_ref().map_or(0, |r| r.len());
                }
                let diverging = (pd.diverging_epoch.end_offset >= 0
                    || pd.diverging_epoch.epoch >= 0)
                    .then_some((pd.diverging_epoch.epoch, pd.diverging_epoch.end_offset));
                work.entry(shard).or_default().push(Fetched {
                    topic: topic.clone(),
                    partition: pd.partition_index,
                    fetch_offset,
                    error: pd.error_code,
                    high_watermark: pd.high_watermark,
                    leader_log_start: pd.log_start_offset,
                    diverging,
                    records: pd.records.unwrap_or_default(),
                });
            }
        }
        if let Some(rate) = follower_rate {
            throttle::FOLLOWER.record(rate, throttled_bytes);
        }
        let mut refused = false;
        let jobs = work.into_iter().map(|(shard, items)| {
            s.run_on(shard, move |sh| {
                Box::pin(async move { apply(&sh, leader, items).await })
            })
        });
        for r in futures::future::join_all(jobs).await {
            refused |= r.unwrap_or(true);
        }
        if refused {
            // Stale metadata on one side: give it a moment to arrive.
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The next fetch to a leader: a full one that opens a session when there is none, else an
/// incremental one. Returns it with what the session will hold once it is answered.
fn build_request(
    me: i32,
    cfg: &crate::config::ClusterConfig,
    parts: &[Followed],
    positions: &BTreeMap<(String, i32), Position>,
    session: Option<&Session>,
    hold_throttled: bool,
) -> (FetchRequest, BTreeMap<(String, i32), Sent>) {
    let mut topics: Vec<FetchTopic> = Vec::new();
    let mut current = BTreeMap::new();
    for (t, p, _, epoch, throttled) in parts {
        let key = (t.clone(), *p);
        let Some(&(leo, last_epoch, start)) = positions.get(&key) else {
            continue;
        };
        let max_bytes = if *throttled && hold_throttled {
            0
        } else {
            cfg.replica_fetch_max_bytes as i32
        };
        let state = (leo, last_epoch, *epoch, max_bytes);
        let unchanged = session.is_some_and(|s| s.sent.get(&key) == Some(&state));
        current.insert(key, state);
        if unchanged {
            continue;
        }
        let fp = FetchPartition::default()
            .with_partition(*p)
            .with_current_leader_epoch(*epoch)
            .with_fetch_offset(leo)
            .with_last_fetched_epoch(last_epoch)
            .with_log_start_offset(start)
            .with_partition_max_bytes(max_bytes);
        match topics.last_mut() {
            Some(ft) if ft.topic.0.as_str() == t => ft.partitions.push(fp),
            _ => topics.push(
                FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(t.clone())))
                    .with_partitions(vec![fp]),
            ),
        }
    }
    let mut forgotten: Vec<ForgottenTopic> = Vec::new();
    if let Some(s) = session {
        for (t, p) in s.sent.keys().filter(|k| !current.contains_key(*k)) {
            match forgotten.last_mut() {
                Some(f) if f.topic.0.as_str() == t => f.partitions.push(*p),
                _ => forgotten.push(
                    ForgottenTopic::default()
                        .with_topic(TopicName(StrBytes::from_string(t.clone())))
                        .with_partitions(vec![*p]),
                ),
            }
        }
    }
    let (id, epoch) = session.map(|s| (s.id, s.epoch)).unwrap_or((0, 0));
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(me))
        .with_max_wait_ms(cfg.replica_fetch_wait_max_ms as i32)
        .with_min_bytes(1)
        .with_max_bytes(cfg.replica_fetch_response_max_bytes as i32)
        .with_isolation_level(0)
        .with_session_id(id)
        .with_session_epoch(epoch)
        .with_topics(topics)
        .with_forgotten_topics_data(forgotten);
    (req, current)
}

/// One partition's part of a leader's fetch response.
pub struct Fetched {
    topic: String,
    partition: i32,
    /// The offset this broker asked from.
    fetch_offset: i64,
    error: i16,
    high_watermark: i64,
    leader_log_start: i64,
    diverging: Option<(i32, i64)>,
    records: Bytes,
}

/// On the owner shard: applies one fetch's results to this shard's follower replicas, then
/// waits until what was appended is fdatasynced. Returns whether the leader refused some
/// partition for stale metadata.
async fn apply(s: &Rc<Shard>, leader: i32, items: Vec<Fetched>) -> bool {
    let mut refused = false;
    let mut waits = Vec::new();
    for f in items {
        let Some(p) = s.partition(&f.topic, f.partition) else {
            continue;
        };
        if p.repl.borrow().leader != leader {
            continue;
        }
        match f.error {
            NONE => {}
            OFFSET_OUT_OF_RANGE
                if f.leader_log_start > f.fetch_offset
                    && p.log.borrow().log_end_offset == f.fetch_offset =>
            {
                // What this replica would copy next is gone at the leader: start over there.
                let _ = s.reset_replica(&p, f.leader_log_start).await;
                continue;
            }
            OFFSET_OUT_OF_RANGE => {
                tracing::warn!(topic = %f.topic, partition = f.partition, offset = f.fetch_offset, leader_log_start = f.leader_log_start, "follower fetch offset out of range at the leader");
                refused = true;
                continue;
            }
            code => {
                tracing::debug!(topic = %f.topic, partition = f.partition, code, "follower fetch partition error");
                refused = true;
                continue;
            }
        }
        if p.log.borrow().log_end_offset != f.fetch_offset {
            continue;
        }
        if let Some((epoch, end)) = f.diverging {
            let to = truncation_offset(&p, epoch, end);
            tracing::info!(topic = %f.topic, partition = f.partition, leader_epoch = epoch, leader_end = end, to, "log diverged from the leader's");
            let _ = s.truncate_replica(&p, to).await;
            continue;
        }
        let mut leo = f.fetch_offset;
        let mut next = f.fetch_offset;
        // An empty replica that starts at the leader's log start inside a batch takes the
        // whole batch: it restarts at the batch's base (the log start then moves up below).
        if let Some(h) = batch::Header::new(&f.records) {
            let empty = {
                let l = p.log.borrow();
                l.log_end_offset == l.log_start_offset
            };
            if empty && h.base_offset() < next && h.last_offset() >= next {
                let base = h.base_offset();
                if s.reset_replica(&p, base).await.is_err() {
                    continue;
                }
                next = base;
            }
        }
        if !f.records.is_empty() {
            match batch::validate_replica(&f.records, next) {
                Ok(batches) if !batches.is_empty() => {
                    match s.append_replica(&p, next, &batches).await {
                        Ok(end) => {
                            leo = end;
                            waits.push((p.clone(), end));
                        }
                        Err(code) => {
                            tracing::warn!(topic = %f.topic, partition = f.partition, code, "appending replicated batches failed");
                            continue;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(topic = %f.topic, partition = f.partition, "leader sent unusable batches: {e:?}");
                    continue;
                }
            }
        }
        {
            let mut r = p.repl.borrow_mut();
            let hw = f.high_watermark.min(leo);
            if hw > r.high_watermark {
                r.high_watermark = hw;
            }
        }
        // The leader's log start (DeleteRecords, retention) moves this replica's too.
        if f.leader_log_start > p.log.borrow().log_start_offset {
            let _ = s
                .delete_records(&f.topic, f.partition, f.leader_log_start)
                .await;
        }
    }
    if !waits.is_empty() {
        let _ = s.wait_synced(&waits).await;
    }
    refused
}

/// Where a follower cuts its log when the leader says its last epoch diverged: the leader's
/// end of that epoch, or this log's own end of it if that comes first (KIP-279). With no epoch
/// in common, down to the high watermark.
fn truncation_offset(p: &Partition, leader_epoch: i32, leader_end: i64) -> i64 {
    let l = p.log.borrow();
    let hw = p.repl.borrow().high_watermark;
    if leader_epoch < 0 || leader_end < 0 {
        return hw.min(l.log_end_offset);
    }
    let (mine, my_end) = l.epochs.end_offset_for(leader_epoch, l.log_end_offset);
    if mine < 0 {
        return hw.min(l.log_end_offset);
    }
    leader_end.min(my_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::protocol::{Decodable, Encodable};

    #[test]
    fn requests_carry_replica_id_and_last_epochs() {
        let cfg = crate::config::ClusterConfig::default();
        let parts = vec![
            ("a".to_string(), 0, 0, 4, false),
            ("a".to_string(), 1, 1, 4, false),
            ("b".to_string(), 0, 0, 2, true),
        ];
        let mut pos = BTreeMap::new();
        pos.insert(("a".to_string(), 0), (10, 3, 0));
        pos.insert(("b".to_string(), 0), (7, 2, 5));
        let (req, current) = build_request(2, &cfg, &parts, &pos, None, false);
        assert_eq!(req.replica_id.0, 2);
        assert_eq!(
            (req.session_id, req.session_epoch),
            (0, 0),
            "asks for a session"
        );
        assert_eq!(
            req.topics.len(),
            2,
            "a partition without a position is skipped"
        );
        let a0 = &req.topics[0].partitions[0];
        assert_eq!(
            (
                a0.fetch_offset,
                a0.last_fetched_epoch,
                a0.current_leader_epoch
            ),
            (10, 3, 4)
        );
        let b0 = &req.topics[1].partitions[0];
        assert_eq!((b0.fetch_offset, b0.log_start_offset), (7, 5));
        let mut buf = BytesMut::new();
        req.encode(&mut buf, FETCH_VERSION).unwrap();
        let back = FetchRequest::decode(&mut buf.freeze(), FETCH_VERSION).unwrap();
        assert_eq!(back, req);

        // In the session: only what changed, and what is no longer followed is forgotten.
        let sess = Session {
            id: 77,
            epoch: 3,
            sent: current,
        };
        pos.insert(("a".to_string(), 0), (12, 3, 0));
        let (req, _) = build_request(2, &cfg, &parts[..2], &pos, Some(&sess), false);
        assert_eq!((req.session_id, req.session_epoch), (77, 3));
        assert_eq!(req.topics.len(), 1);
        assert_eq!(req.topics[0].partitions[0].fetch_offset, 12);
        assert_eq!(req.forgotten_topics_data.len(), 1);
        assert_eq!(req.forgotten_topics_data[0].topic.0.as_str(), "b");
        let (req, _) = build_request(2, &cfg, &parts, &pos, Some(&sess), false);
        assert!(req.forgotten_topics_data.is_empty());

        // A throttled partition asks for nothing while the throttle holds, and asks again
        // (a session change) once it lifts; unthrottled ones are unaffected.
        let (req, held) = build_request(2, &cfg, &parts, &pos, None, true);
        let max = |r: &FetchRequest, t: &str| {
            r.topics
                .iter()
                .find(|x| x.topic.0.as_str() == t)
                .map(|x| x.partitions[0].partition_max_bytes)
        };
        assert_eq!(max(&req, "b"), Some(0));
        assert_eq!(max(&req, "a"), Some(cfg.replica_fetch_max_bytes as i32));
        let sess = Session {
            id: 78,
            epoch: 1,
            sent: held,
        };
        let (req, _) = build_request(2, &cfg, &parts, &pos, Some(&sess), false);
        assert_eq!(max(&req, "b"), Some(cfg.replica_fetch_max_bytes as i32));
        assert_eq!(max(&req, "a"), None, "unchanged, not re-sent");
    }
}
