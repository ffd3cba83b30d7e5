//! The consumer: `subscribe` with a group (join, client-side range assignment when leader,
//! heartbeats and auto commit driven by `poll`), or `assign` partitions directly; `poll`,
//! `seek`, `commit_sync`, `auto.offset.reset`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::RecordBatchDecoder;

use crate::client::conn::Conn;
use crate::client::metadata::Cluster;
use crate::{connect_any, error_name};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
    None,
}

#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub bootstrap: String,
    pub client_id: String,
    pub group_id: Option<String>,
    pub group_instance_id: Option<String>,
    pub auto_offset_reset: OffsetReset,
    pub enable_auto_commit: bool,
    pub auto_commit_interval: Duration,
    pub session_timeout_ms: i32,
    pub heartbeat_interval: Duration,
    pub max_poll_interval_ms: i32,
    pub fetch_max_wait_ms: i32,
    pub max_partition_fetch_bytes: i32,
    pub fetch_max_bytes: i32,
    pub request_timeout: Duration,
}

impl ConsumerConfig {
    pub fn new(bootstrap: &str) -> ConsumerConfig {
        ConsumerConfig {
            bootstrap: bootstrap.to_string(),
            client_id: "weir-consumer".into(),
            group_id: None,
            group_instance_id: None,
            auto_offset_reset: OffsetReset::Latest,
            enable_auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
            session_timeout_ms: 45_000,
            heartbeat_interval: Duration::from_secs(3),
            max_poll_interval_ms: 300_000,
            fetch_max_wait_ms: 500,
            max_partition_fetch_bytes: 1 << 20,
            fetch_max_bytes: 50 << 20,
            request_timeout: Duration::from_secs(30),
        }
    }

    pub fn set(&mut self, key: &str, value: &str) -> Result<&mut Self> {
        let num = |v: &str| -> Result<i64> {
            v.parse()
                .with_context(|| format!("{key}: {v:?} is not a number"))
        };
        match key {
            "bootstrap.servers" => self.bootstrap = value.into(),
            "client.id" => self.client_id = value.into(),
            "group.id" => self.group_id = Some(value.into()),
            "group.instance.id" => self.group_instance_id = Some(value.into()),
            "auto.offset.reset" => {
                self.auto_offset_reset = match value {
                    "earliest" => OffsetReset::Earliest,
                    "latest" => OffsetReset::Latest,
                    "none" => OffsetReset::None,
                    _ => bail!("auto.offset.reset must be earliest, latest or none"),
                }
            }
            "enable.auto.commit" => self.enable_auto_commit = value == "true",
            "auto.commit.interval.ms" => {
                self.auto_commit_interval = Duration::from_millis(num(value)? as u64)
            }
            "session.timeout.ms" => self.session_timeout_ms = num(value)? as i32,
            "heartbeat.interval.ms" => {
                self.heartbeat_interval = Duration::from_millis(num(value)? as u64)
            }
            "max.poll.interval.ms" => self.max_poll_interval_ms = num(value)? as i32,
            "fetch.max.wait.ms" => self.fetch_max_wait_ms = num(value)? as i32,
            "max.partition.fetch.bytes" => self.max_partition_fetch_bytes = num(value)? as i32,
            "fetch.max.bytes" => self.fetch_max_bytes = num(value)? as i32,
            "request.timeout.ms" => {
                self.request_timeout = Duration::from_millis(num(value)? as u64)
            }
            _ => bail!("unknown consumer setting {key}"),
        }
        Ok(self)
    }
}

#[derive(Clone, Debug)]
pub struct ConsumerRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

pub type TopicPartition = (String, i32);

pub struct Consumer {
    cfg: ConsumerConfig,
    conns: HashMap<String, Conn>,
    coordinator: Option<Conn>,
    cluster: Cluster,
    subscription: Vec<String>,
    assigned: Vec<TopicPartition>,
    positions: HashMap<TopicPartition, i64>,
    member_id: String,
    generation: i32,
    rejoin: bool,
    last_heartbeat: Instant,
    last_commit: Instant,
    buffered: VecDeque<ConsumerRecord>,
}

const PROTOCOL: &str = "range";

impl Consumer {
    pub fn new(cfg: ConsumerConfig) -> Result<Consumer> {
        let conn = connect_any(&cfg.bootstrap, &cfg.client_id, cfg.request_timeout)?;
        let mut conns = HashMap::new();
        conns.insert(String::new(), conn);
        Ok(Consumer {
            cfg,
            conns,
            coordinator: None,
            cluster: Cluster::default(),
            subscription: Vec::new(),
            assigned: Vec::new(),
            positions: HashMap::new(),
            member_id: String::new(),
            generation: -1,
            rejoin: false,
            last_heartbeat: Instant::now(),
            last_commit: Instant::now(),
            buffered: VecDeque::new(),
        })
    }

    fn bootstrap_conn(&mut self) -> &mut Conn {
        self.conns.get_mut("").expect("bootstrap connection")
    }

    fn refresh(&mut self, topics: &[String]) -> Result<()> {
        let t = topics.to_vec();
        self.cluster = Cluster::fetch(self.bootstrap_conn(), Some(&t), false)?;
        Ok(())
    }

    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.assigned.clone()
    }

    pub fn position(&self, tp: &TopicPartition) -> Option<i64> {
        self.positions.get(tp).copied()
    }

    /// Reads these partitions without a group; positions come from committed offsets (when a
    /// group.id is set) or auto.offset.reset.
    pub fn assign(&mut self, tps: Vec<TopicPartition>) -> Result<()> {
        let topics: Vec<String> = tps.iter().map(|t| t.0.clone()).collect();
        self.refresh(&topics)?;
        self.assigned = tps;
        self.positions.clear();
        self.init_positions()
    }

    /// Joins the group and consumes the topics' partitions it is assigned.
    pub fn subscribe(&mut self, topics: &[&str]) -> Result<()> {
        if self.cfg.group_id.is_none() {
            bail!("subscribe needs a group.id");
        }
        self.subscription = topics.iter().map(|t| t.to_string()).collect();
        let sub = self.subscription.clone();
        self.refresh(&sub)?;
        for t in &sub {
            self.cluster.partitions(t)?;
        }
        self.join()
    }

    pub fn seek(&mut self, tp: TopicPartition, offset: i64) {
        self.buffered
            .retain(|r| (r.topic.as_str(), r.partition) != (tp.0.as_str(), tp.1));
        self.positions.insert(tp, offset);
    }

    fn coordinator(&mut self) -> Result<&mut Conn> {
        if self.coordinator.is_none() {
            let group = self
                .cfg
                .group_id
                .clone()
                .ok_or_else(|| anyhow!("no group.id"))?;
            let v = self.bootstrap_conn().version(ApiKey::FindCoordinator, 4)?;
            // v4 batches keys in coordinator_keys; earlier versions carry one key.
            let req = if v >= 4 {
                FindCoordinatorRequest::default()
                    .with_coordinator_keys(vec![StrBytes::from_string(group)])
            } else {
                FindCoordinatorRequest::default().with_key(StrBytes::from_string(group))
            };
            let r: FindCoordinatorResponse =
                self.bootstrap_conn()
                    .call_at(ApiKey::FindCoordinator, v, &req)?;
            let (code, host, port) = if v >= 4 {
                let c = r
                    .coordinators
                    .first()
                    .ok_or_else(|| anyhow!("no coordinator"))?;
                (c.error_code, c.host.to_string(), c.port)
            } else {
                (r.error_code, r.host.to_string(), r.port)
            };
            if code != 0 {
                bail!("FindCoordinator: {}", error_name(code));
            }
            self.coordinator = Some(Conn::connect(
                &format!("{host}:{port}"),
                &self.cfg.client_id,
                self.cfg.request_timeout,
            )?);
        }
        Ok(self.coordinator.as_mut().expect("connected"))
    }

    fn join(&mut self) -> Result<()> {
        let group = self.cfg.group_id.clone().expect("group");
        let mut meta = BytesMut::new();
        meta.put_i16(0);
        ConsumerProtocolSubscription::default()
            .with_topics(
                self.subscription
                    .iter()
                    .map(|t| StrBytes::from_string(t.clone()))
                    .collect(),
            )
            .encode(&mut meta, 0)?;
        let meta = meta.freeze();
        // Bounded: MEMBER_ID_REQUIRED and retriable errors end within a few rounds.
        for _ in 0..20 {
            let req = JoinGroupRequest::default()
                .with_group_id(GroupId(StrBytes::from_string(group.clone())))
                .with_session_timeout_ms(self.cfg.session_timeout_ms)
                .with_rebalance_timeout_ms(self.cfg.max_poll_interval_ms)
                .with_member_id(StrBytes::from_string(self.member_id.clone()))
                .with_group_instance_id(
                    self.cfg
                        .group_instance_id
                        .clone()
                        .map(StrBytes::from_string),
                )
                .with_protocol_type(StrBytes::from_static_str("consumer"))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str(PROTOCOL))
                    .with_metadata(meta.clone())]);
            let (r, _): (JoinGroupResponse, i16) =
                self.coordinator()?.call(ApiKey::JoinGroup, 7, &req)?;
            match r.error_code {
                0 => {}
                79 => {
                    self.member_id = r.member_id.to_string();
                    continue;
                }
                25 | 22 => {
                    self.member_id.clear();
                    continue;
                }
                27 | 14 | 15 | 16 => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                c => bail!("JoinGroup: {}", error_name(c)),
            }
            self.member_id = r.member_id.to_string();
            self.generation = r.generation_id;
            let assignments = if r.leader == r.member_id {
                self.assign_range(&r.members)?
            } else {
                Vec::new()
            };
            let req = SyncGroupRequest::default()
                .with_group_id(GroupId(StrBytes::from_string(group.clone())))
                .with_generation_id(self.generation)
                .with_member_id(StrBytes::from_string(self.member_id.clone()))
                .with_group_instance_id(
                    self.cfg
                        .group_instance_id
                        .clone()
                        .map(StrBytes::from_string),
                )
                .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
                .with_protocol_name(Some(StrBytes::from_static_str(PROTOCOL)))
                .with_assignments(assignments);
            let (s, _): (SyncGroupResponse, i16) =
                self.coordinator()?.call(ApiKey::SyncGroup, 5, &req)?;
            match s.error_code {
                0 => {}
                27 | 22 | 25 => continue,
                c => bail!("SyncGroup: {}", error_name(c)),
            }
            self.assigned = decode_assignment(s.assignment)?;
            self.assigned.sort();
            self.positions.clear();
            self.buffered.clear();
            self.rejoin = false;
            self.last_heartbeat = Instant::now();
            let topics: Vec<String> = self.subscription.clone();
            self.refresh(&topics)?;
            return self.init_positions();
        }
        bail!("could not join group {group}")
    }

    /// The range assignor: per topic, partitions in order split into contiguous ranges over the
    /// members subscribed to it, sorted by member id; the first members get one more.
    fn assign_range(
        &mut self,
        members: &[join_group_response::JoinGroupResponseMember],
    ) -> Result<Vec<SyncGroupRequestAssignment>> {
        let mut subs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in members {
            let mut b = m.metadata.clone();
            if b.len() < 2 {
                continue;
            }
            let v = b.get_i16();
            let sub = ConsumerProtocolSubscription::decode(&mut b, v.clamp(0, 3))?;
            subs.insert(
                m.member_id.to_string(),
                sub.topics.iter().map(|t| t.to_string()).collect(),
            );
        }
        let topics: Vec<String> = {
            let mut t: Vec<String> = subs.values().flatten().cloned().collect();
            t.sort();
            t.dedup();
            t
        };
        self.refresh(&topics)?;
        let mut plan: BTreeMap<String, BTreeMap<String, Vec<i32>>> =
            subs.keys().map(|m| (m.clone(), BTreeMap::new())).collect();
        for t in &topics {
            let n = self.cluster.partitions(t).unwrap_or(0) as i32;
            let ms: Vec<&String> = subs
                .iter()
                .filter(|(_, ts)| ts.contains(t))
                .map(|(m, _)| m)
                .collect();
            if ms.is_empty() {
                continue;
            }
            let per = n / ms.len() as i32;
            let extra = n % ms.len() as i32;
            let mut next = 0;
            for (i, m) in ms.iter().enumerate() {
                let count = per + if (i as i32) < extra { 1 } else { 0 };
                plan.get_mut(*m)
                    .expect("member")
                    .insert(t.clone(), (next..next + count).collect());
                next += count;
            }
        }
        plan.into_iter()
            .map(|(m, tps)| {
                let mut b = BytesMut::new();
                b.put_i16(0);
                ConsumerProtocolAssignment::default()
                    .with_assigned_partitions(
                        tps.into_iter()
                            .map(|(t, ps)| {
                                AssignedTopic::default()
                                    .with_topic(TopicName(StrBytes::from_string(t)))
                                    .with_partitions(ps)
                            })
                            .collect(),
                    )
                    .encode(&mut b, 0)?;
                Ok(SyncGroupRequestAssignment::default()
                    .with_member_id(StrBytes::from_string(m))
                    .with_assignment(b.freeze()))
            })
            .collect()
    }

    /// Positions for assigned partitions: committed offsets, else auto.offset.reset.
    fn init_positions(&mut self) -> Result<()> {
        let mut committed = HashMap::new();
        if let Some(group) = self.cfg.group_id.clone() {
            let mut topics: BTreeMap<String, Vec<i32>> = BTreeMap::new();
            for (t, p) in &self.assigned {
                topics.entry(t.clone()).or_default().push(*p);
            }
            let req = OffsetFetchRequest::default()
                .with_group_id(GroupId(StrBytes::from_string(group)))
                .with_topics(Some(
                    topics
                        .into_iter()
                        .map(|(t, ps)| {
                            OffsetFetchRequestTopic::default()
                                .with_name(TopicName(StrBytes::from_string(t)))
                                .with_partition_indexes(ps)
                        })
                        .collect(),
                ));
            let (r, _): (OffsetFetchResponse, i16) =
                self.coordinator()?.call(ApiKey::OffsetFetch, 7, &req)?;
            if r.error_code != 0 {
                bail!("OffsetFetch: {}", error_name(r.error_code));
            }
            for t in r.topics {
                for p in t.partitions {
                    if p.committed_offset >= 0 {
                        committed.insert(
                            (t.name.0.to_string(), p.partition_index),
                            p.committed_offset,
                        );
                    }
                }
            }
        }
        let missing: Vec<TopicPartition> = self
            .assigned
            .iter()
            .filter(|tp| !committed.contains_key(*tp))
            .cloned()
            .collect();
        self.positions.extend(committed);
        if !missing.is_empty() {
            let ts = match self.cfg.auto_offset_reset {
                OffsetReset::Earliest => -2,
                OffsetReset::Latest => -1,
                OffsetReset::None => {
                    bail!("no committed offset for {missing:?} and auto.offset.reset=none")
                }
            };
            for (tp, o) in list_offsets(self.bootstrap_conn(), &missing, ts)? {
                self.positions.insert(tp, o);
            }
        }
        Ok(())
    }

    fn heartbeat(&mut self) -> Result<()> {
        let Some(group) = self.cfg.group_id.clone() else {
            return Ok(());
        };
        if self.subscription.is_empty()
            || self.last_heartbeat.elapsed() < self.cfg.heartbeat_interval
        {
            return Ok(());
        }
        self.last_heartbeat = Instant::now();
        let req = HeartbeatRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group)))
            .with_generation_id(self.generation)
            .with_member_id(StrBytes::from_string(self.member_id.clone()))
            .with_group_instance_id(
                self.cfg
                    .group_instance_id
                    .clone()
                    .map(StrBytes::from_string),
            );
        let (r, _): (HeartbeatResponse, i16) =
            self.coordinator()?.call(ApiKey::Heartbeat, 4, &req)?;
        match r.error_code {
            0 => {}
            27 => self.rejoin = true,
            22 | 25 => {
                self.rejoin = true;
                if r.error_code == 25 {
                    self.member_id.clear();
                }
            }
            c => bail!("Heartbeat: {}", error_name(c)),
        }
        Ok(())
    }

    /// Fetches records; waits up to `timeout` when none are there.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        self.heartbeat()?;
        if self.rejoin {
            if self.cfg.enable_auto_commit {
                let _ = self.commit_sync();
            }
            self.join()?;
        }
        if self.cfg.enable_auto_commit
            && self.cfg.group_id.is_some()
            && self.last_commit.elapsed() >= self.cfg.auto_commit_interval
        {
            self.commit_sync()?;
        }
        if !self.buffered.is_empty() {
            return Ok(self.buffered.drain(..).collect());
        }
        if self.assigned.is_empty() {
            std::thread::sleep(timeout.min(Duration::from_millis(100)));
            return Ok(Vec::new());
        }
        let wait = (timeout.as_millis() as i32)
            .min(self.cfg.fetch_max_wait_ms)
            .max(0);
        let mut by_leader: BTreeMap<String, Vec<TopicPartition>> = BTreeMap::new();
        for tp in &self.assigned {
            let addr = self
                .cluster
                .leader_addr(&tp.0, tp.1)
                .map(|s| s.to_string())
                .unwrap_or_default();
            by_leader.entry(addr).or_default().push(tp.clone());
        }
        let mut out = Vec::new();
        let mut refresh = false;
        for (addr, tps) in by_leader {
            let mut topics: BTreeMap<String, Vec<FetchPartition>> = BTreeMap::new();
            for tp in &tps {
                let pos = *self.positions.get(tp).unwrap_or(&0);
                topics.entry(tp.0.clone()).or_default().push(
                    FetchPartition::default()
                        .with_partition(tp.1)
                        .with_fetch_offset(pos)
                        .with_partition_max_bytes(self.cfg.max_partition_fetch_bytes),
                );
            }
            let req = FetchRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_max_wait_ms(wait)
                .with_min_bytes(1)
                .with_max_bytes(self.cfg.fetch_max_bytes)
                .with_session_epoch(-1)
                .with_topics(
                    topics
                        .into_iter()
                        .map(|(t, ps)| {
                            FetchTopic::default()
                                .with_topic(TopicName(StrBytes::from_string(t)))
                                .with_partitions(ps)
                        })
                        .collect(),
                );
            if !addr.is_empty() && !self.conns.contains_key(&addr) {
                let c = Conn::connect(&addr, &self.cfg.client_id, self.cfg.request_timeout)?;
                self.conns.insert(addr.clone(), c);
            }
            let conn = self
                .conns
                .get_mut(if addr.is_empty() { "" } else { &addr })
                .expect("connected");
            let (r, _): (FetchResponse, i16) = conn.call(ApiKey::Fetch, 12, &req)?;
            for t in r.responses {
                let topic = t.topic.0.to_string();
                for p in t.partitions {
                    let tp = (topic.clone(), p.partition_index);
                    match p.error_code {
                        0 => {}
                        1 => {
                            let ts = if self.cfg.auto_offset_reset == OffsetReset::Latest {
                                -1
                            } else {
                                -2
                            };
                            for (tp, o) in
                                list_offsets(self.bootstrap_conn(), std::slice::from_ref(&tp), ts)?
                            {
                                self.positions.insert(tp, o);
                            }
                            continue;
                        }
                        // Partition moved or metadata stale: refresh and retry on the next poll.
                        3 | 5 | 6 | 56 | 74 | 75 => {
                            refresh = true;
                            continue;
                        }
                        c => bail!("Fetch {}-{}: {}", topic, p.partition_index, error_name(c)),
                    }
                    let Some(mut records) = p.records else {
                        continue;
                    };
                    let pos = *self.positions.get(&tp).unwrap_or(&0);
                    let mut next = pos;
                    // Every iteration consumes one batch; a trailing partial batch is left.
                    while records.len() >= 61 {
                        let total = i32::from_be_bytes(records[8..12].try_into().expect("4 bytes"))
                            as usize
                            + 12;
                        if total > records.len() {
                            break;
                        }
                        let mut one = records.split_to(total);
                        let set = RecordBatchDecoder::decode(&mut one)?;
                        for rec in set.records {
                            if rec.offset < pos || rec.control {
                                next = next.max(rec.offset + 1);
                                continue;
                            }
                            next = next.max(rec.offset + 1);
                            out.push(ConsumerRecord {
                                topic: topic.clone(),
                                partition: p.partition_index,
                                offset: rec.offset,
                                timestamp: rec.timestamp,
                                key: rec.key,
                                value: rec.value,
                                headers: rec
                                    .headers
                                    .into_iter()
                                    .map(|(k, v)| (k.to_string(), v))
                                    .collect(),
                            });
                        }
                    }
                    self.positions.insert(tp, next);
                }
            }
        }
        if refresh {
            let topics: Vec<String> = self.assigned.iter().map(|t| t.0.clone()).collect();
            self.refresh(&topics)?;
        }
        Ok(out)
    }

    /// Commits the current positions.
    pub fn commit_sync(&mut self) -> Result<()> {
        let Some(group) = self.cfg.group_id.clone() else {
            bail!("commit needs a group.id")
        };
        if self.positions.is_empty() {
            return Ok(());
        }
        let (generation, member) = if self.subscription.is_empty() {
            (-1, String::new())
        } else {
            (self.generation, self.member_id.clone())
        };
        let offsets: Vec<(TopicPartition, i64)> = self
            .positions
            .iter()
            .map(|(tp, o)| (tp.clone(), *o))
            .collect();
        let req = offset_commit_request(
            &group,
            generation,
            &member,
            self.cfg.group_instance_id.clone(),
            &offsets,
        );
        let (r, _): (OffsetCommitResponse, i16) =
            self.coordinator()?.call(ApiKey::OffsetCommit, 8, &req)?;
        self.last_commit = Instant::now();
        for t in r.topics {
            for p in t.partitions {
                match p.error_code {
                    0 => {}
                    27 | 22 | 25 => {
                        self.rejoin = true;
                        bail!(
                            "commit failed: {} (the group is rebalancing)",
                            error_name(p.error_code)
                        );
                    }
                    c => bail!("commit failed: {}", error_name(c)),
                }
            }
        }
        Ok(())
    }

    /// Commits (with auto commit) and leaves the group. As in the Java client, a failed
    /// auto-commit (say the group is rebalancing because another member left) is logged and
    /// the consumer still leaves the group: the records since the last commit are then
    /// delivered again to whoever gets the partitions.
    pub fn close(mut self) -> Result<()> {
        if self.cfg.enable_auto_commit && self.cfg.group_id.is_some() {
            if let Err(e) = self.commit_sync() {
                tracing::warn!("auto-commit on close failed: {e:#}");
            }
        }
        if let (Some(group), false) = (self.cfg.group_id.clone(), self.member_id.is_empty()) {
            if self.cfg.group_instance_id.is_none() {
                let req = LeaveGroupRequest::default()
                    .with_group_id(GroupId(StrBytes::from_string(group)))
                    .with_members(vec![leave_group_request::MemberIdentity::default()
                        .with_member_id(StrBytes::from_string(self.member_id.clone()))]);
                let _: (LeaveGroupResponse, i16) =
                    self.coordinator()?.call(ApiKey::LeaveGroup, 4, &req)?;
            }
        }
        Ok(())
    }
}

/// An OffsetCommit of `offsets` for `group` (generation -1 and no member: a commit from
/// outside the group, allowed while it has no members).
pub fn offset_commit_request(
    group: &str,
    generation: i32,
    member: &str,
    instance: Option<String>,
    offsets: &[(TopicPartition, i64)],
) -> OffsetCommitRequest {
    let mut topics: BTreeMap<String, Vec<OffsetCommitRequestPartition>> = BTreeMap::new();
    for ((t, p), o) in offsets {
        topics.entry(t.clone()).or_default().push(
            OffsetCommitRequestPartition::default()
                .with_partition_index(*p)
                .with_committed_offset(*o)
                .with_committed_metadata(Some(StrBytes::from_static_str(""))),
        );
    }
    OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_generation_id_or_member_epoch(generation)
        .with_member_id(StrBytes::from_string(member.to_string()))
        .with_group_instance_id(instance.map(StrBytes::from_string))
        .with_topics(
            topics
                .into_iter()
                .map(|(t, ps)| {
                    OffsetCommitRequestTopic::default()
                        .with_name(TopicName(StrBytes::from_string(t)))
                        .with_partitions(ps)
                })
                .collect(),
        )
}

/// A consumer-protocol assignment (SyncGroup, DescribeGroups) as topic-partitions.
pub(crate) fn decode_assignment(mut b: Bytes) -> Result<Vec<TopicPartition>> {
    if b.len() < 2 {
        return Ok(Vec::new());
    }
    let v = b.get_i16();
    let a = ConsumerProtocolAssignment::decode(&mut b, v.clamp(0, 3))?;
    Ok(a.assigned_partitions
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.topic.0.to_string(), *p))
        })
        .collect())
}

/// A KIP-848 consumer-protocol group as ConsumerGroupDescribe reports it.
pub struct ConsumerGroupView {
    pub state: String,
    pub assignor: String,
    pub epoch: i32,
    /// (member id, client id, client host, assigned partitions).
    pub members: Vec<(String, String, String, Vec<TopicPartition>)>,
}

/// ConsumerGroupDescribe of `group`: None when it is not a consumer-protocol group (DescribeGroups
/// calls such a group Dead, as Kafka does) or the broker lacks the API.
pub(crate) fn describe_consumer_group(
    conn: &mut Conn,
    group: &str,
) -> Result<Option<ConsumerGroupView>> {
    let req = ConsumerGroupDescribeRequest::default()
        .with_group_ids(vec![GroupId(StrBytes::from_string(group.to_string()))]);
    let Ok((r, _)) =
        conn.call::<_, ConsumerGroupDescribeResponse>(ApiKey::ConsumerGroupDescribe, 0, &req)
    else {
        return Ok(None);
    };
    let Some(g) = r.groups.first().filter(|g| g.error_code == 0) else {
        return Ok(None);
    };
    Ok(Some(ConsumerGroupView {
        state: g.group_state.to_string(),
        assignor: g.assignor_name.to_string(),
        epoch: g.group_epoch,
        members: g
            .members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.client_id.to_string(),
                    m.client_host.to_string(),
                    m.assignment
                        .topic_partitions
                        .iter()
                        .flat_map(|t| {
                            t.partitions
                                .iter()
                                .map(move |p| (t.topic_name.0.to_string(), *p))
                        })
                        .collect(),
                )
            })
            .collect(),
    }))
}

/// ListOffsets: -2 earliest, -1 latest, or a timestamp.
pub fn list_offsets(
    conn: &mut Conn,
    tps: &[TopicPartition],
    timestamp: i64,
) -> Result<Vec<(TopicPartition, i64)>> {
    let mut topics: BTreeMap<String, Vec<ListOffsetsPartition>> = BTreeMap::new();
    for (t, p) in tps {
        topics.entry(t.clone()).or_default().push(
            ListOffsetsPartition::default()
                .with_partition_index(*p)
                .with_timestamp(timestamp),
        );
    }
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(
            topics
                .into_iter()
                .map(|(t, ps)| {
                    ListOffsetsTopic::default()
                        .with_name(TopicName(StrBytes::from_string(t)))
                        .with_partitions(ps)
                })
                .collect(),
        );
    let (r, _): (ListOffsetsResponse, i16) = conn.call(ApiKey::ListOffsets, 7, &req)?;
    let mut out = Vec::new();
    for t in r.topics {
        for p in t.partitions {
            if p.error_code != 0 {
                bail!(
                    "ListOffsets {}-{}: {}",
                    t.name.0.as_str(),
                    p.partition_index,
                    error_name(p.error_code)
                );
            }
            out.push(((t.name.0.to_string(), p.partition_index), p.offset));
        }
    }
    Ok(out)
}
