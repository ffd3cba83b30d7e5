//! Consumer groups with librdkafka (and kcat for a member killed without leaving) against a real
//! broker process.

use std::collections::{BTreeSet, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use weir_tests::workload::produce;
use weir_tests::{admin, eventually, Broker};

const WAIT: Duration = Duration::from_secs(60);

fn broker() -> (Broker, tempfile::TempDir) {
    let conf = tempfile::tempdir().unwrap();
    let path = conf.path().join("server.properties");
    // No initial join delay, so tests do not wait 3 s per new group.
    std::fs::write(&path, "group.initial.rebalance.delay.ms=0\n").unwrap();
    (
        Broker::start_with(2, &["--config", path.to_str().unwrap()]),
        conf,
    )
}

/// A group member polling on its own thread, recording its assignment and what it read.
struct Member {
    stop: Arc<AtomicBool>,
    assigned: Arc<Mutex<BTreeSet<i32>>>,
    seen: Arc<Mutex<Vec<(i32, i64, usize)>>>,
    thread: Option<JoinHandle<()>>,
}

impl Member {
    fn start(b: &Broker, group: &str, topic: &str, extra: &[(&str, &str)]) -> Member {
        let mut cfg: ClientConfig = b.client_config();
        cfg.set("group.id", group)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "100");
        for (k, v) in extra {
            cfg.set(*k, *v);
        }
        let c: BaseConsumer = cfg.create().unwrap();
        c.subscribe(&[topic]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let assigned = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, a, v) = (stop.clone(), assigned.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    let idx = m
                        .headers()
                        .and_then(|h| {
                            h.iter().find(|x| x.key == "idx").and_then(|x| {
                                x.value
                                    .map(|v| std::str::from_utf8(v).unwrap().parse().unwrap())
                            })
                        })
                        .unwrap_or(usize::MAX);
                    v.lock().unwrap().push((m.partition(), m.offset(), idx));
                    c.store_offset_from_message(&m).ok();
                }
                if let Ok(tpl) = c.assignment() {
                    *a.lock().unwrap() = tpl.elements().iter().map(|e| e.partition()).collect();
                }
            }
            // Commit what was read, then leave (close) as a well-behaved consumer does.
            let _ = c.commit_consumer_state(CommitMode::Sync);
            drop(c);
        });
        Member {
            stop,
            assigned,
            seen,
            thread: Some(thread),
        }
    }

    fn assignment(&self) -> BTreeSet<i32> {
        self.assigned.lock().unwrap().clone()
    }

    fn seen(&self) -> Vec<(i32, i64, usize)> {
        self.seen.lock().unwrap().clone()
    }

    /// Commits and leaves the group.
    fn close(mut self) -> Vec<(i32, i64, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.seen()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sizes(members: &[&Member]) -> Vec<usize> {
    let mut v: Vec<usize> = members.iter().map(|m| m.assignment().len()).collect();
    v.sort();
    v
}

fn disjoint_cover(members: &[&Member], partitions: i32) -> bool {
    let mut all = BTreeSet::new();
    let total: usize = members.iter().map(|m| m.assignment().len()).sum();
    for m in members {
        all.extend(m.assignment());
    }
    total == partitions as usize && all == (0..partitions).collect()
}

fn kcat_member(b: &Broker, group: &str, topic: &str) -> Child {
    Command::new("kcat")
        .args([
            "-b",
            &b.bootstrap(),
            "-G",
            group,
            "-X",
            "session.timeout.ms=6000",
            "-X",
            "heartbeat.interval.ms=500",
            "-q",
            "-o",
            "end",
            topic,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kcat (apt-get install kcat)")
}

#[test]
fn members_share_partitions_and_take_over_on_leave_and_on_session_expiry() {
    let (b, _conf) = broker();
    admin::create(&b, "shared", 6, 1, &[]).unwrap();
    let m1 = Member::start(&b, "g", "shared", &[]);
    let m2 = Member::start(&b, "g", "shared", &[]);
    let m3 = Member::start(&b, "g", "shared", &[]);
    assert!(
        eventually(WAIT, || sizes(&[&m1, &m2, &m3]) == vec![2, 2, 2]
            && disjoint_cover(&[&m1, &m2, &m3], 6)),
        "three members, two partitions each: {:?}",
        sizes(&[&m1, &m2, &m3])
    );
    // One leaves: its partitions move to the other two.
    m3.close();
    assert!(
        eventually(WAIT, || sizes(&[&m1, &m2]) == vec![3, 3]
            && disjoint_cover(&[&m1, &m2], 6)),
        "after a leave: {:?}",
        sizes(&[&m1, &m2])
    );

    // A third member that dies without leaving (kill -9 of a kcat process): its partitions
    // move after its session timeout.
    let mut k = kcat_member(&b, "g", "shared");
    assert!(
        eventually(WAIT, || sizes(&[&m1, &m2]) == vec![2, 2]),
        "kcat joined and took two: {:?}",
        sizes(&[&m1, &m2])
    );
    k.kill().unwrap();
    k.wait().unwrap();
    assert!(
        eventually(WAIT, || sizes(&[&m1, &m2]) == vec![3, 3]
            && disjoint_cover(&[&m1, &m2], 6)),
        "after the session expired: {:?}",
        sizes(&[&m1, &m2])
    );
    assert!(b.log().contains("member session expired"));
}

#[test]
fn committed_offsets_survive_a_broker_restart_no_duplicates_no_gaps() {
    let (mut b, _conf) = broker();
    admin::create(&b, "resume", 3, 1, &[]).unwrap();
    produce(&b.client_config(), "resume", 0..3000, &[("acks", "all")]);
    let m = Member::start(&b, "resumers", "resume", &[]);
    assert!(
        eventually(WAIT, || m.seen().len() == 3000),
        "first read: {}",
        m.seen().len()
    );
    let first = m.close(); // commits
    assert!(b.stop());
    b.restart();
    produce(&b.client_config(), "resume", 3000..5000, &[("acks", "all")]);
    let m = Member::start(&b, "resumers", "resume", &[]);
    assert!(
        eventually(WAIT, || m.seen().len() >= 2000),
        "second read: {}",
        m.seen().len()
    );
    std::thread::sleep(Duration::from_millis(500));
    let second = m.close();
    let a: HashSet<usize> = first.iter().map(|x| x.2).collect();
    let bb: HashSet<usize> = second.iter().map(|x| x.2).collect();
    assert_eq!(first.len(), 3000);
    assert_eq!(second.len(), 2000, "nothing read twice");
    assert!(a.is_disjoint(&bb));
    assert_eq!(a.union(&bb).count(), 5000, "nothing skipped");

    // And across kill -9: an acknowledged commit is durable.
    let m = Member::start(&b, "resumers", "resume", &[]);
    std::thread::sleep(Duration::from_millis(300));
    m.close();
    b.kill9();
    b.restart();
    produce(&b.client_config(), "resume", 5000..5100, &[("acks", "all")]);
    let m = Member::start(&b, "resumers", "resume", &[]);
    assert!(eventually(WAIT, || m.seen().len() >= 100));
    std::thread::sleep(Duration::from_millis(500));
    let third = m.close();
    assert_eq!(
        third.iter().map(|x| x.2).collect::<BTreeSet<_>>(),
        (5000..5100).collect()
    );
}

#[test]
fn offset_reset_earliest_latest_and_independent_groups() {
    let (b, _conf) = broker();
    admin::create(&b, "reset", 2, 1, &[]).unwrap();
    produce(&b.client_config(), "reset", 0..500, &[("acks", "all")]);
    let early = Member::start(&b, "early", "reset", &[("auto.offset.reset", "earliest")]);
    let other = Member::start(&b, "other", "reset", &[("auto.offset.reset", "earliest")]);
    let late = Member::start(&b, "late", "reset", &[("auto.offset.reset", "latest")]);
    assert!(eventually(WAIT, || early.assignment().len() == 2
        && late.assignment().len() == 2
        && other.assignment().len() == 2));
    // Let "late" settle at the end before new records arrive.
    assert!(eventually(WAIT, || early.seen().len() == 500
        && other.seen().len() == 500));
    std::thread::sleep(Duration::from_secs(2));
    produce(&b.client_config(), "reset", 500..600, &[("acks", "all")]);
    assert!(eventually(WAIT, || early.seen().len() == 600
        && other.seen().len() == 600
        && late.seen().len() == 100));
    std::thread::sleep(Duration::from_millis(500));
    let late_seen: BTreeSet<usize> = late.close().iter().map(|x| x.2).collect();
    assert_eq!(
        late_seen,
        (500..600).collect(),
        "latest reads only what came after"
    );
    let e: BTreeSet<usize> = early.close().iter().map(|x| x.2).collect();
    let o: BTreeSet<usize> = other.close().iter().map(|x| x.2).collect();
    assert_eq!(e, (0..600).collect(), "one group sees every record");
    assert_eq!(o, e, "another group independently sees every record too");
}

#[test]
fn cooperative_sticky_and_static_membership() {
    let (b, _conf) = broker();
    admin::create(&b, "coop", 6, 1, &[]).unwrap();
    let coop = [("partition.assignment.strategy", "cooperative-sticky")];
    let c1 = Member::start(&b, "cg", "coop", &coop);
    let c2 = Member::start(&b, "cg", "coop", &coop);
    assert!(
        eventually(WAIT, || sizes(&[&c1, &c2]) == vec![3, 3]
            && disjoint_cover(&[&c1, &c2], 6)),
        "{:?}",
        sizes(&[&c1, &c2])
    );
    let c3 = Member::start(&b, "cg", "coop", &coop);
    assert!(
        eventually(WAIT, || sizes(&[&c1, &c2, &c3]) == vec![2, 2, 2]
            && disjoint_cover(&[&c1, &c2, &c3], 6)),
        "incremental rebalance: {:?}",
        sizes(&[&c1, &c2, &c3])
    );
    drop((c1, c2, c3));

    // Static membership: a member restarting quickly with the same group.instance.id gets
    // its partitions back without a rebalance of the others.
    let s1 = Member::start(&b, "sg", "coop", &[("group.instance.id", "alpha")]);
    let s2 = Member::start(&b, "sg", "coop", &[("group.instance.id", "beta")]);
    assert!(eventually(WAIT, || sizes(&[&s1, &s2]) == vec![3, 3]
        && disjoint_cover(&[&s1, &s2], 6)));
    let before = s1.assignment();
    let other = s2.assignment();
    s1.close(); // a static member does not leave the group when it closes
    let s1b = Member::start(&b, "sg", "coop", &[("group.instance.id", "alpha")]);
    assert!(
        eventually(WAIT, || s1b.assignment() == before),
        "static member got {:?} back, expected {:?}",
        s1b.assignment(),
        before
    );
    assert_eq!(s2.assignment(), other);
    assert!(b.log().contains("static member rejoined; assignment kept"));
}

mod raw_errors {
    use bytes::Bytes;
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::StrBytes;
    use weir_tests::raw::Conn;

    fn s(v: &str) -> StrBytes {
        StrBytes::from_string(v.to_string())
    }

    fn join(
        c: &mut Conn,
        group: &str,
        member: &str,
        session_ms: i32,
        meta: Bytes,
    ) -> JoinGroupResponse {
        let req = JoinGroupRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_session_timeout_ms(session_ms)
            .with_rebalance_timeout_ms(10_000)
            .with_member_id(s(member))
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(s("range"))
                .with_metadata(meta)]);
        c.call(ApiKey::JoinGroup, 7, &req)
    }

    fn commit(c: &mut Conn, group: &str, generation: i32, member: &str, meta: &str) -> i16 {
        commit_to(c, "t", group, generation, member, meta)
    }

    fn commit_to(
        c: &mut Conn,
        topic: &str,
        group: &str,
        generation: i32,
        member: &str,
        meta: &str,
    ) -> i16 {
        let req = OffsetCommitRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_generation_id_or_member_epoch(generation)
            .with_member_id(s(member))
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(TopicName(s(topic)))
                .with_partitions(vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(5)
                    .with_committed_metadata(Some(s(meta)))])]);
        let r: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, 8, &req);
        r.topics[0].partitions[0].error_code
    }

    /// JoinGroup 9 (KIP-814): a static leader that rejoins a stable group with the same
    /// metadata gets the members and `skip_assignment`, with no rebalance; at v7 it gets no
    /// members. Its SyncGroup is answered with the assignment it had. JoinGroup 8 and
    /// LeaveGroup 5 carry reasons (KIP-800).
    #[test]
    fn static_leader_rejoin_skips_assignment_and_reasons_are_taken() {
        use kafka_protocol::messages::leave_group_request::MemberIdentity;
        use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
        let (b, _conf) = super::broker();
        let mut c = Conn::new(&b.bootstrap());
        let meta = Bytes::from_static(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        let join_static = |c: &mut Conn, version: i16| -> JoinGroupResponse {
            let req = JoinGroupRequest::default()
                .with_group_id(GroupId(s("sg")))
                .with_session_timeout_ms(10_000)
                .with_rebalance_timeout_ms(10_000)
                .with_member_id(s(""))
                .with_group_instance_id(Some(s("i1")))
                .with_protocol_type(s("consumer"))
                .with_reason(Some(s("starting")))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(s("range"))
                    .with_metadata(meta.clone())]);
            c.call(ApiKey::JoinGroup, version, &req)
        };
        let first = join_static(&mut c, 9);
        assert_eq!(first.error_code, 0);
        let m1 = first.member_id.to_string();
        assert_eq!(first.leader.as_str(), m1);
        assert_eq!(first.members.len(), 1);
        assert!(!first.skip_assignment, "the first join assigns");
        let generation = first.generation_id;
        let assignment = Bytes::from_static(b"the-assignment");
        let sync: SyncGroupResponse = c.call(
            ApiKey::SyncGroup,
            5,
            &SyncGroupRequest::default()
                .with_group_id(GroupId(s("sg")))
                .with_generation_id(generation)
                .with_member_id(s(&m1))
                .with_group_instance_id(Some(s("i1")))
                .with_assignments(vec![SyncGroupRequestAssignment::default()
                    .with_member_id(s(&m1))
                    .with_assignment(assignment.clone())]),
        );
        assert_eq!(
            (sync.error_code, sync.assignment.clone()),
            (0, assignment.clone())
        );

        // The static leader comes back with a new member id: v9 gets the members and
        // skip_assignment, the generation does not move.
        let again = join_static(&mut c, 9);
        assert_eq!(again.error_code, 0);
        let m2 = again.member_id.to_string();
        assert_ne!(m2, m1);
        assert_eq!(again.leader.as_str(), m2);
        assert_eq!(again.generation_id, generation, "no rebalance");
        assert!(again.skip_assignment);
        assert_eq!(again.members.len(), 1);
        assert_eq!(again.members[0].member_id.as_str(), m2);
        // At v7 the same rejoin gets no members and, as in Kafka, the leader id from before
        // the rejoin, so the client does not act as the leader.
        let old = join_static(&mut c, 7);
        assert_eq!(old.error_code, 0);
        let m3 = old.member_id.to_string();
        assert_ne!(m3, m2);
        assert_eq!(old.leader.as_str(), m2);
        assert!(old.members.is_empty());
        assert_eq!(old.generation_id, generation);
        // Its SyncGroup in the stable group gets the assignment it had, not a new one.
        let sync: SyncGroupResponse = c.call(
            ApiKey::SyncGroup,
            5,
            &SyncGroupRequest::default()
                .with_group_id(GroupId(s("sg")))
                .with_generation_id(generation)
                .with_member_id(s(&m3))
                .with_group_instance_id(Some(s("i1")))
                .with_assignments(vec![SyncGroupRequestAssignment::default()
                    .with_member_id(s(&m3))
                    .with_assignment(Bytes::from_static(b"other"))]),
        );
        assert_eq!((sync.error_code, sync.assignment), (0, assignment));

        // LeaveGroup 5 with a reason; the group is then empty.
        let left: LeaveGroupResponse = c.call(
            ApiKey::LeaveGroup,
            5,
            &LeaveGroupRequest::default()
                .with_group_id(GroupId(s("sg")))
                .with_members(vec![MemberIdentity::default()
                    .with_member_id(s(&m3))
                    .with_group_instance_id(Some(s("i1")))
                    .with_reason(Some(s("shutting down")))]),
        );
        assert_eq!(left.error_code, 0);
        assert_eq!(left.members[0].error_code, 0);
        let described: DescribeGroupsResponse = c.call(
            ApiKey::DescribeGroups,
            5,
            &DescribeGroupsRequest::default().with_groups(vec![GroupId(s("sg"))]),
        );
        assert_eq!(described.groups[0].group_state.as_str(), "Empty");
    }

    #[test]
    fn group_errors_are_kafka_codes() {
        let (b, _conf) = super::broker();
        weir_tests::admin::create(&b, "t", 1, 1, &[]).unwrap();
        let mut c = Conn::new(&b.bootstrap());
        let meta = Bytes::from_static(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            join(&mut c, "", "", 10_000, meta.clone()).error_code,
            24,
            "INVALID_GROUP_ID"
        );
        assert_eq!(
            join(&mut c, "rg", "", 10, meta.clone()).error_code,
            26,
            "INVALID_SESSION_TIMEOUT"
        );
        assert_eq!(
            join(&mut c, "rg", "nobody", 10_000, meta.clone()).error_code,
            25,
            "UNKNOWN_MEMBER_ID"
        );
        let first = join(&mut c, "rg", "", 10_000, meta.clone());
        assert_eq!(first.error_code, 79, "MEMBER_ID_REQUIRED");
        let member = first.member_id.to_string();
        let joined = join(&mut c, "rg", &member, 10_000, meta.clone());
        assert_eq!(joined.error_code, 0);
        assert_eq!(joined.leader.as_str(), member);
        let generation = joined.generation_id;
        // Oversized member metadata is refused, not stored.
        assert_eq!(
            join(&mut c, "rg2", "", 10_000, Bytes::from(vec![0u8; 2 << 20])).error_code,
            42
        );

        let hb = |c: &mut Conn, generation: i32, member: &str| -> i16 {
            let r: HeartbeatResponse = c.call(
                ApiKey::Heartbeat,
                4,
                &HeartbeatRequest::default()
                    .with_group_id(GroupId(s("rg")))
                    .with_generation_id(generation)
                    .with_member_id(s(member)),
            );
            r.error_code
        };
        assert_eq!(
            hb(&mut c, generation + 5, &member),
            22,
            "ILLEGAL_GENERATION"
        );
        assert_eq!(hb(&mut c, generation, "stranger"), 25, "UNKNOWN_MEMBER_ID");

        let sync: SyncGroupResponse = c.call(
            ApiKey::SyncGroup,
            5,
            &SyncGroupRequest::default()
                .with_group_id(GroupId(s("rg")))
                .with_generation_id(generation)
                .with_member_id(s(&member))
                .with_assignments(vec![]),
        );
        assert_eq!(sync.error_code, 0);
        assert_eq!(hb(&mut c, generation, &member), 0);
        assert_eq!(
            commit(&mut c, "rg", generation + 1, &member, ""),
            22,
            "commit with a wrong generation"
        );
        assert_eq!(
            commit(&mut c, "rg", generation, &member, &"m".repeat(5000)),
            12,
            "OFFSET_METADATA_TOO_LARGE"
        );
        assert_eq!(commit(&mut c, "rg", generation, &member, "ok"), 0);
        assert_eq!(
            commit_to(&mut c, "no-such-topic", "rg", generation, &member, "ok"),
            3,
            "UNKNOWN_TOPIC_OR_PARTITION for a topic that does not exist"
        );

        // Groups are listed and described; a group with members cannot be deleted.
        let listed: ListGroupsResponse =
            c.call(ApiKey::ListGroups, 4, &ListGroupsRequest::default());
        assert!(listed
            .groups
            .iter()
            .any(|g| g.group_id.0.as_str() == "rg" && g.group_state.as_str() == "Stable"));
        let described: DescribeGroupsResponse = c.call(
            ApiKey::DescribeGroups,
            5,
            &DescribeGroupsRequest::default()
                .with_groups(vec![GroupId(s("rg")), GroupId(s("none"))]),
        );
        assert_eq!(described.groups[0].members.len(), 1);
        assert_eq!(described.groups[0].protocol_data.as_str(), "range");
        assert_eq!(described.groups[1].group_state.as_str(), "Dead");
        let del: DeleteGroupsResponse = c.call(
            ApiKey::DeleteGroups,
            2,
            &DeleteGroupsRequest::default()
                .with_groups_names(vec![GroupId(s("rg")), GroupId(s("none"))]),
        );
        assert_eq!(del.results[0].error_code, 68, "NON_EMPTY_GROUP");
        assert_eq!(del.results[1].error_code, 69, "GROUP_ID_NOT_FOUND");

        // Leave, then the group is empty: its offsets can be fetched, deleted, and the group too.
        let leave: LeaveGroupResponse = c.call(
            ApiKey::LeaveGroup,
            4,
            &LeaveGroupRequest::default()
                .with_group_id(GroupId(s("rg")))
                .with_members(vec![
                    leave_group_request::MemberIdentity::default().with_member_id(s(&member))
                ]),
        );
        assert_eq!(leave.members[0].error_code, 0);
        let fetched: OffsetFetchResponse = c.call(
            ApiKey::OffsetFetch,
            7,
            &OffsetFetchRequest::default()
                .with_group_id(GroupId(s("rg")))
                .with_topics(None),
        );
        assert_eq!(fetched.topics[0].partitions[0].committed_offset, 5);
        let od: OffsetDeleteResponse = c.call(
            ApiKey::OffsetDelete,
            0,
            &OffsetDeleteRequest::default()
                .with_group_id(GroupId(s("rg")))
                .with_topics(vec![
                    offset_delete_request::OffsetDeleteRequestTopic::default()
                        .with_name(TopicName(s("t")))
                        .with_partitions(vec![
                            offset_delete_request::OffsetDeleteRequestPartition::default()
                                .with_partition_index(0),
                        ]),
                ]),
        );
        assert_eq!(od.topics[0].partitions[0].error_code, 0);
        let del: DeleteGroupsResponse = c.call(
            ApiKey::DeleteGroups,
            2,
            &DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s("rg"))]),
        );
        assert_eq!(del.results[0].error_code, 0);

        // The internal topic is marked internal and refuses client writes and deletion.
        let md: MetadataResponse = c.call(
            ApiKey::Metadata,
            12,
            &MetadataRequest::default().with_topics(None),
        );
        let internal = md
            .topics
            .iter()
            .find(|t| t.name.as_ref().map(|n| n.0.as_str()) == Some("__consumer_offsets"))
            .unwrap();
        assert!(internal.is_internal);
        assert_eq!(internal.partitions.len(), 50);
        let (code, _) = c.produce("__consumer_offsets", 0, -1, -1, 0, 1);
        assert_eq!(code, 17, "no client writes to an internal topic");
        assert!(!b.log().contains("panicked"));
    }
}

#[test]
fn offsets_of_empty_groups_expire_after_offsets_retention_minutes() {
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::StrBytes;
    let conf = tempfile::tempdir().unwrap();
    let path = conf.path().join("server.properties");
    std::fs::write(
        &path,
        "offsets.retention.minutes=1\noffsets.retention.check.interval.ms=500\n",
    )
    .unwrap();
    let b = Broker::start_with(1, &["--config", path.to_str().unwrap()]);
    // Commits are accepted only for partitions that exist.
    weir_tests::admin::create(&b, "t", 1, 1, &[]).unwrap();
    let mut c = weir_tests::raw::Conn::new(&b.bootstrap());
    let commit = OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_static_str("idle")))
        .with_generation_id_or_member_epoch(-1)
        .with_member_id(StrBytes::from_static_str(""))
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(StrBytes::from_static_str("t")))
            .with_partitions(vec![OffsetCommitRequestPartition::default()
                .with_partition_index(0)
                .with_committed_offset(42)])]);
    let r: OffsetCommitResponse = c.call(ApiKey::OffsetCommit, 8, &commit);
    assert_eq!(r.topics[0].partitions[0].error_code, 0);
    let fetch = |c: &mut weir_tests::raw::Conn| -> i64 {
        let r: OffsetFetchResponse = c.call(
            ApiKey::OffsetFetch,
            7,
            &OffsetFetchRequest::default()
                .with_group_id(GroupId(StrBytes::from_static_str("idle")))
                .with_topics(None),
        );
        r.topics
            .first()
            .map(|t| t.partitions[0].committed_offset)
            .unwrap_or(-1)
    };
    std::thread::sleep(Duration::from_secs(20));
    assert_eq!(fetch(&mut c), 42, "kept before the retention time");
    assert!(
        eventually(Duration::from_secs(70), || fetch(&mut c) == -1),
        "expired after offsets.retention.minutes"
    );
    // The offsets leave memory first; the log line follows once their tombstones are stored.
    assert!(
        eventually(Duration::from_secs(10), || b
            .log()
            .contains("expired committed offsets of empty groups")),
        "the expiry is logged once its tombstones are stored"
    );
}

/// Committed offsets of `group` on partitions 0..partitions of `topic`, read with OffsetFetch
/// (a consumer that never joins), and the high watermarks.
fn committed_and_ends(
    b: &Broker,
    group: &str,
    topic: &str,
    partitions: i32,
) -> (Vec<i64>, Vec<i64>) {
    let c: BaseConsumer = b
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .map(|t| {
            t.elements()
                .iter()
                .map(|e| e.offset().to_raw().unwrap_or(-1))
                .collect()
        })
        .unwrap_or_default();
    let ends = (0..partitions)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .map(|w| w.1)
                .unwrap_or(-1)
        })
        .collect();
    (committed, ends)
}

/// The state and member count DescribeGroups reports for `group`.
fn described(b: &Broker, group: &str) -> (String, usize) {
    let c: BaseConsumer = b.client_config().create().unwrap();
    let list = c
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .expect("DescribeGroups");
    match list.groups().first() {
        Some(g) => (g.state().to_string(), g.members().len()),
        None => ("(none)".to_string(), 0),
    }
}

/// librdkafka members with Kafka's default session timeout (45 s): a member the broker wrongly
/// kept would hold up the next rebalance for that long.
const DEFAULT_SESSION: [(&str, &str); 3] = [
    ("session.timeout.ms", "45000"),
    ("enable.auto.commit", "true"),
    ("auto.commit.interval.ms", "200"),
];

/// Three members of `group` share `topic` (3 partitions), read everything, commit it, and
/// leave. Returns the committed offsets (which equal the partition ends).
fn three_members_read_commit_and_leave(b: &Broker, group: &str, topic: &str) -> Vec<i64> {
    let m1 = Member::start(b, group, topic, &DEFAULT_SESSION);
    let m2 = Member::start(b, group, topic, &DEFAULT_SESSION);
    let m3 = Member::start(b, group, topic, &DEFAULT_SESSION);
    assert!(
        eventually(WAIT, || sizes(&[&m1, &m2, &m3]) == vec![1, 1, 1]
            && disjoint_cover(&[&m1, &m2, &m3], 3)),
        "three members, one partition each: {:?}",
        sizes(&[&m1, &m2, &m3])
    );
    let mut last = (Vec::new(), Vec::new());
    assert!(
        eventually(WAIT, || {
            last = committed_and_ends(b, group, topic, 3);
            last.0 == last.1 && last.1.iter().all(|e| *e > 0)
        }),
        "every record read and committed: committed {:?}, ends {:?}",
        last.0,
        last.1
    );
    m1.close();
    m2.close();
    m3.close();
    assert_eq!(
        committed_and_ends(b, group, topic, 3).0,
        last.0,
        "leaving kept the commits"
    );
    last.0
}

/// A new member of `group` gets all three partitions and reads `expect` (records produced
/// after the commits) well within one session timeout, and nothing below `committed`.
fn new_member_resumes_at_once(
    b: &Broker,
    group: &str,
    topic: &str,
    committed: &[i64],
    expect: std::ops::Range<usize>,
) {
    let started = std::time::Instant::now();
    let m = Member::start(b, group, topic, &DEFAULT_SESSION);
    let ready = eventually(WAIT, || {
        m.assignment().len() == 3 && m.seen().len() >= expect.len()
    });
    let took = started.elapsed();
    eprintln!("the new member had its partitions and records after {took:?}");
    assert!(
        ready,
        "the new member got {:?} and read {} of {}",
        m.assignment(),
        m.seen().len(),
        expect.len()
    );
    assert!(
        took < Duration::from_secs(15),
        "the new member waited {took:?} for its partitions and records (a session timeout is 45 s)"
    );
    std::thread::sleep(Duration::from_millis(500));
    let seen = m.close();
    for (p, offset, idx) in &seen {
        assert!(
            *offset >= committed[*p as usize],
            "record {idx} at {p}/{offset} is below the committed offset {}",
            committed[*p as usize]
        );
    }
    assert_eq!(
        seen.iter().map(|x| x.2).collect::<BTreeSet<_>>(),
        expect.clone().collect(),
        "resumed exactly at the committed offsets"
    );
    assert_eq!(seen.len(), expect.len(), "nothing read twice");
}

#[test]
fn a_group_whose_members_all_left_is_empty_after_a_restart_and_clean_or_kill_9() {
    // Broker defaults (group.initial.rebalance.delay.ms 3 s included), as a user runs it.
    let mut b = Broker::start(2);
    admin::create(&b, "left", 3, 1, &[]).unwrap();
    produce(&b.client_config(), "left", 0..3000, &[("acks", "all")]);
    let committed = three_members_read_commit_and_leave(&b, "leavers", "left");
    assert_eq!(described(&b, "leavers"), ("Empty".to_string(), 0));
    assert!(b.stop());
    b.restart();
    assert_eq!(
        described(&b, "leavers"),
        ("Empty".to_string(), 0),
        "loaded as Empty, without the members that left"
    );
    produce(&b.client_config(), "left", 3000..3300, &[("acks", "all")]);
    new_member_resumes_at_once(&b, "leavers", "left", &committed, 3000..3300);

    // The same across kill -9: the Empty group was durable before LeaveGroup was answered.
    produce(&b.client_config(), "left", 3300..3600, &[("acks", "all")]);
    let committed = three_members_read_commit_and_leave(&b, "leavers", "left");
    b.kill9();
    b.restart();
    assert_eq!(described(&b, "leavers"), ("Empty".to_string(), 0));
    produce(&b.client_config(), "left", 3600..3900, &[("acks", "all")]);
    new_member_resumes_at_once(&b, "leavers", "left", &committed, 3600..3900);
    assert!(!b.log().contains("panicked"));
}

#[test]
fn a_group_emptied_by_session_expiry_is_empty_after_a_restart() {
    let (mut b, _conf) = broker();
    admin::create(&b, "expiring", 2, 1, &[]).unwrap();
    // A member that dies without leaving (kill -9 of kcat): the group is Stable with it, then
    // Empty once its 6 s session expires.
    let mut k = kcat_member(&b, "expired", "expiring");
    assert!(
        eventually(WAIT, || described(&b, "expired")
            == ("Stable".to_string(), 1)),
        "kcat joined: {:?}",
        described(&b, "expired")
    );
    k.kill().unwrap();
    k.wait().unwrap();
    assert!(
        eventually(WAIT, || described(&b, "expired")
            == ("Empty".to_string(), 0)),
        "the session expired: {:?}",
        described(&b, "expired")
    );
    b.kill9();
    b.restart();
    assert_eq!(
        described(&b, "expired"),
        ("Empty".to_string(), 0),
        "the expiry was written to __consumer_offsets"
    );
}
