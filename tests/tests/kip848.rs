//! The KIP-848 consumer group protocol (ConsumerGroupHeartbeat, ConsumerGroupDescribe): the
//! Java reference client with group.protocol=consumer, the error codes over the raw protocol,
//! and a coordinator killed with -9 under consumer-protocol members.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use kafka_protocol::messages::consumer_group_heartbeat_request::TopicPartitions;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use weir_tests::raw::Conn;
use weir_tests::{admin, Broker};

const UNKNOWN_MEMBER_ID: i16 = 25;
const INVALID_REQUEST: i16 = 42;
const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
const GROUP_ID_NOT_FOUND: i16 = 69;
const GROUP_MAX_SIZE_REACHED: i16 = 81;
const FENCED_MEMBER_EPOCH: i16 = 110;
const UNSUPPORTED_ASSIGNOR: i16 = 112;
const STALE_MEMBER_EPOCH: i16 = 113;
const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;

fn s(x: &str) -> StrBytes {
    StrBytes::from_string(x.to_string())
}

fn broker(extra: &str) -> (Broker, tempfile::TempDir) {
    let conf = tempfile::tempdir().unwrap();
    let path = conf.path().join("server.properties");
    std::fs::write(
        &path,
        format!(
            "group.initial.rebalance.delay.ms=0\ngroup.consumer.heartbeat.interval.ms=500\n{extra}"
        ),
    )
    .unwrap();
    (
        Broker::start_with(2, &["--config", path.to_str().unwrap()]),
        conf,
    )
}

type Owned = BTreeMap<Uuid, BTreeSet<i32>>;
use kafka_protocol::messages::consumer_group_heartbeat_response::Assignment;
use uuid::Uuid;

fn owned(a: &Option<Assignment>) -> Option<Owned> {
    a.as_ref().map(|a| {
        a.topic_partitions
            .iter()
            .map(|tp| (tp.topic_id, tp.partitions.iter().copied().collect()))
            .collect()
    })
}

fn count(o: &Owned) -> usize {
    o.values().map(|p| p.len()).sum()
}

/// One heartbeat; `owned` None sends no topic partitions.
#[allow(clippy::too_many_arguments)]
fn heartbeat(
    c: &mut Conn,
    group: &str,
    member: &str,
    epoch: i32,
    topics: Option<&[&str]>,
    assignor: Option<&str>,
    owned: Option<&Owned>,
) -> ConsumerGroupHeartbeatResponse {
    let req = ConsumerGroupHeartbeatRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_member_id(s(member))
        .with_member_epoch(epoch)
        .with_rebalance_timeout_ms(if epoch == 0 { 30_000 } else { -1 })
        .with_subscribed_topic_names(topics.map(|ts| ts.iter().map(|t| TopicName(s(t))).collect()))
        .with_server_assignor(assignor.map(s))
        .with_topic_partitions(owned.map(|o| {
            o.iter()
                .map(|(t, ps)| {
                    TopicPartitions::default()
                        .with_topic_id(*t)
                        .with_partitions(ps.iter().copied().collect())
                })
                .collect()
        }));
    c.call(ApiKey::ConsumerGroupHeartbeat, 0, &req)
}

fn join(c: &mut Conn, group: &str, topics: &[&str]) -> ConsumerGroupHeartbeatResponse {
    heartbeat(c, group, "", 0, Some(topics), None, Some(&Owned::new()))
}

fn describe(c: &mut Conn, group: &str) -> consumer_group_describe_response::DescribedGroup {
    let r: ConsumerGroupDescribeResponse = c.call(
        ApiKey::ConsumerGroupDescribe,
        0,
        &ConsumerGroupDescribeRequest::default().with_group_ids(vec![GroupId(s(group))]),
    );
    r.groups.into_iter().next().unwrap()
}

fn commit(
    c: &mut Conn,
    group: &str,
    member: &str,
    epoch: i32,
    topic: &str,
    p: i32,
    offset: i64,
) -> i16 {
    let r: OffsetCommitResponse = c.call(
        ApiKey::OffsetCommit,
        9,
        &OffsetCommitRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_generation_id_or_member_epoch(epoch)
            .with_member_id(s(member))
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(TopicName(s(topic)))
                .with_partitions(vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(p)
                    .with_committed_offset(offset)])]),
    );
    r.topics[0].partitions[0].error_code
}

/// Committed offsets of `group` for partitions 0..n of `topic` (OffsetFetch v9 with the member).
fn fetch(
    c: &mut Conn,
    group: &str,
    member: Option<(&str, i32)>,
    topic: &str,
    n: i32,
) -> (i16, Vec<i64>) {
    let r: OffsetFetchResponse = c.call(
        ApiKey::OffsetFetch,
        9,
        &OffsetFetchRequest::default().with_groups(vec![OffsetFetchRequestGroup::default()
            .with_group_id(GroupId(s(group)))
            .with_member_id(member.map(|m| s(m.0)))
            .with_member_epoch(member.map(|m| m.1).unwrap_or(-1))
            .with_topics(Some(vec![OffsetFetchRequestTopics::default()
                .with_name(TopicName(s(topic)))
                .with_partition_indexes((0..n).collect())]))]),
    );
    let g = &r.groups[0];
    (
        g.error_code,
        g.topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| p.committed_offset))
            .collect(),
    )
}

/// Two members reconcile to a stable, balanced assignment of `topic`; returns
/// ((member, epoch, owned) x 2). The second member gets partitions only after the first
/// revoked them.
fn two_stable_members(
    c: &mut Conn,
    group: &str,
    topic: &str,
    partitions: usize,
) -> Vec<(String, i32, Owned)> {
    let r1 = join(c, group, &[topic]);
    assert_eq!(r1.error_code, 0, "{:?}", r1.error_message);
    let m1 = r1.member_id.clone().unwrap().to_string();
    assert_eq!(r1.member_epoch, 1);
    let o1 = owned(&r1.assignment).unwrap();
    assert_eq!(
        count(&o1),
        partitions,
        "the only member gets every partition"
    );
    let r2 = join(c, group, &[topic]);
    assert_eq!(r2.error_code, 0);
    let m2 = r2.member_id.clone().unwrap().to_string();
    // m1 still owns everything: m2 is at the new epoch with nothing yet (unreleased).
    assert_eq!(r2.member_epoch, 2);
    assert_eq!(
        count(&owned(&r2.assignment).unwrap()),
        0,
        "nothing before m1 revokes"
    );
    // m1 learns it must give up half, at its old epoch.
    let r = heartbeat(c, group, &m1, 1, None, None, Some(&o1));
    assert_eq!(r.error_code, 0);
    assert_eq!(r.member_epoch, 1, "epoch kept while revoking");
    let kept = owned(&r.assignment).unwrap();
    assert_eq!(count(&kept), partitions / 2);
    // m2 asks again: still nothing, m1 has not reported the revocation.
    let r = heartbeat(c, group, &m2, 2, None, None, Some(&Owned::new()));
    assert_eq!(r.error_code, 0);
    assert!(owned(&r.assignment).is_none_or(|o| count(&o) == 0));
    // m1 reports it revoked: epoch 2.
    let r = heartbeat(c, group, &m1, 1, None, None, Some(&kept));
    assert_eq!((r.error_code, r.member_epoch), (0, 2));
    // m2 now gets the other half.
    let r = heartbeat(c, group, &m2, 2, None, None, Some(&Owned::new()));
    assert_eq!((r.error_code, r.member_epoch), (0, 2));
    let o2 = owned(&r.assignment).unwrap();
    assert_eq!(count(&o2), partitions / 2);
    for (t, ps) in &o2 {
        assert!(
            kept.get(t).is_none_or(|k| k.is_disjoint(ps)),
            "no partition owned twice"
        );
    }
    let d = describe(c, group);
    assert_eq!(d.group_state.as_str(), "Stable");
    assert_eq!(d.group_epoch, 2);
    vec![(m1, 2, kept), (m2, 2, o2)]
}

#[test]
fn consumer_group_errors_and_reconciliation_over_the_raw_protocol() {
    let (b, _conf) = broker("group.consumer.max.size=2\n");
    admin::create(&b, "t", 4, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    // Advertised.
    let v: ApiVersionsResponse = c.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    for key in [68, 69] {
        let k = v
            .api_keys
            .iter()
            .find(|k| k.api_key == key)
            .expect("advertised");
        assert_eq!((k.min_version, k.max_version), (0, 0));
    }
    // Bad first heartbeats.
    let r = heartbeat(&mut c, "g", "", 0, None, None, Some(&Owned::new()));
    assert_eq!(r.error_code, INVALID_REQUEST, "no subscription");
    let r = heartbeat(&mut c, "g", "", 0, Some(&["t"]), None, None);
    assert_eq!(r.error_code, INVALID_REQUEST, "no owned partitions");
    let r = heartbeat(&mut c, "g", "", 3, Some(&["t"]), None, None);
    assert_eq!(r.error_code, INVALID_REQUEST, "epoch without member id");
    let r = heartbeat(&mut c, "g", "m", -3, None, None, None);
    assert_eq!(r.error_code, INVALID_REQUEST, "epoch -3");
    let r = heartbeat(
        &mut c,
        "g",
        "",
        0,
        Some(&["t"]),
        Some("sticky"),
        Some(&Owned::new()),
    );
    assert_eq!(r.error_code, UNSUPPORTED_ASSIGNOR);
    assert!(r.error_message.unwrap().contains("uniform, range"));
    // Unknown group, unknown member.
    let r = heartbeat(&mut c, "nope", "m", 1, None, None, None);
    assert_eq!(r.error_code, GROUP_ID_NOT_FOUND);
    let d = describe(&mut c, "nope");
    assert_eq!(d.error_code, GROUP_ID_NOT_FOUND);

    let members = two_stable_members(&mut c, "g", "t", 4);
    let (m1, e1, o1) = members[0].clone();
    // As Kafka, the size check comes first: a full group answers an unknown member so.
    let r = heartbeat(&mut c, "g", "stranger", 2, None, None, None);
    assert_eq!(r.error_code, GROUP_MAX_SIZE_REACHED);
    let r = heartbeat(&mut c, "g", &m1, 7, None, None, Some(&o1));
    assert_eq!(r.error_code, FENCED_MEMBER_EPOCH, "epoch ahead");
    let r = heartbeat(&mut c, "g", &m1, e1 - 1, None, None, Some(&o1));
    assert_eq!(
        r.error_code, 0,
        "the previous epoch with a subset of the assignment is accepted"
    );
    assert_eq!(r.member_epoch, 2);
    // The group is full.
    let r = join(&mut c, "g", &["t"]);
    assert_eq!(r.error_code, GROUP_MAX_SIZE_REACHED);
    // Commits: the member epoch is the generation.
    assert_eq!(
        commit(&mut c, "g", &m1, e1 - 1, "t", 0, 5),
        STALE_MEMBER_EPOCH
    );
    assert_eq!(
        commit(&mut c, "g", "stranger", e1, "t", 0, 5),
        UNKNOWN_MEMBER_ID
    );
    assert_eq!(commit(&mut c, "g", &m1, e1, "t", 0, 5), 0);
    assert_eq!(
        fetch(&mut c, "g", Some((&m1, e1 - 1)), "t", 1).0,
        STALE_MEMBER_EPOCH
    );
    assert_eq!(fetch(&mut c, "g", Some((&m1, e1)), "t", 1), (0, vec![5]));
    assert_eq!(fetch(&mut c, "g", None, "t", 1), (0, vec![5]));
    // Describe.
    let d = describe(&mut c, "g");
    assert_eq!(d.error_code, 0);
    assert_eq!((d.group_epoch, d.assignment_epoch), (2, 2));
    assert_eq!(d.assignor_name.as_str(), "uniform");
    assert_eq!(d.members.len(), 2);
    for m in &d.members {
        assert_eq!(m.member_epoch, 2);
        let n: usize = m
            .assignment
            .topic_partitions
            .iter()
            .map(|t| t.partitions.len())
            .sum();
        assert_eq!(n, 2);
        assert_eq!(m.assignment.topic_partitions[0].topic_name.0.as_str(), "t");
        assert_eq!(m.subscribed_topic_names[0].0.as_str(), "t");
    }
    // ListGroups v5: a consumer group; DescribeGroups (classic) says Dead, as Kafka.
    let l: ListGroupsResponse = c.call(ApiKey::ListGroups, 5, &ListGroupsRequest::default());
    let g = l
        .groups
        .iter()
        .find(|g| g.group_id.0.as_str() == "g")
        .unwrap();
    assert_eq!(
        (
            g.protocol_type.as_str(),
            g.group_state.as_str(),
            g.group_type.as_str()
        ),
        ("consumer", "Stable", "consumer")
    );
    let dg: DescribeGroupsResponse = c.call(
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default().with_groups(vec![GroupId(s("g"))]),
    );
    assert_eq!(dg.groups[0].group_state.as_str(), "Dead");
    // A classic JoinGroup for the consumer group is refused.
    let j: JoinGroupResponse = c.call(
        ApiKey::JoinGroup,
        5,
        &JoinGroupRequest::default()
            .with_group_id(GroupId(s("g")))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(10_000)
            .with_member_id(s(""))
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![join_group_request::JoinGroupRequestProtocol::default(
            )
            .with_name(s("range"))
            .with_metadata(bytes::Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))]),
    );
    assert_eq!(j.error_code, INCONSISTENT_GROUP_PROTOCOL);
    // And a consumer heartbeat for a classic group with members.
    let j: JoinGroupResponse = c.call(
        ApiKey::JoinGroup,
        3,
        &JoinGroupRequest::default()
            .with_group_id(GroupId(s("classic")))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(10_000)
            .with_member_id(s(""))
            .with_protocol_type(s("consumer"))
            .with_protocols(vec![join_group_request::JoinGroupRequestProtocol::default(
            )
            .with_name(s("range"))
            .with_metadata(bytes::Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))]),
    );
    assert_eq!(j.error_code, 0);
    let r = join(&mut c, "classic", &["t"]);
    assert_eq!(r.error_code, GROUP_ID_NOT_FOUND);
    // Leaving: epoch -1; the other member then gets everything.
    let (m2, e2, o2) = members[1].clone();
    let r = heartbeat(&mut c, "g", &m1, -1, None, None, None);
    assert_eq!((r.error_code, r.member_epoch), (0, -1));
    let r = heartbeat(&mut c, "g", &m2, e2, None, None, Some(&o2));
    assert_eq!(r.error_code, 0);
    assert_eq!(r.member_epoch, 3);
    assert_eq!(count(&owned(&r.assignment).unwrap()), 4);
    let d = describe(&mut c, "g");
    assert_eq!((d.members.len(), d.group_epoch), (1, 3));
    let r = heartbeat(&mut c, "g", "stranger", 3, None, None, None);
    assert_eq!(r.error_code, UNKNOWN_MEMBER_ID);
    let r = heartbeat(&mut c, "g", &m1, 2, None, None, None);
    assert_eq!(
        r.error_code, UNKNOWN_MEMBER_ID,
        "a member that left is unknown"
    );
}

/// The coordinator is killed with -9 while two consumer-protocol members are stable: after the
/// restart the group's epoch, members and assignments are back, the members carry on with
/// their epochs (not fenced), the committed offsets are kept, and a member that stops
/// heartbeating is fenced after group.consumer.session.timeout.ms, its partitions going to the
/// other.
#[test]
fn consumer_group_survives_a_coordinator_kill9() {
    weir_binary();
    let (mut b, _conf) = broker("group.consumer.session.timeout.ms=4000\n");
    admin::create(&b, "k", 6, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    let members = two_stable_members(&mut c, "kg", "k", 6);
    for (i, (m, e, _)) in members.iter().enumerate() {
        for p in 0..6 {
            if p % 2 == i as i32 {
                assert_eq!(commit(&mut c, "kg", m, *e, "k", p, 100 + p as i64), 0);
            }
        }
    }
    let before = describe(&mut c, "kg");
    drop(c);
    b.kill9();
    b.restart();
    let mut c = Conn::new(&b.bootstrap());
    let started = Instant::now();
    let after = loop {
        let d = describe(&mut c, "kg");
        if d.error_code != COORDINATOR_LOAD_IN_PROGRESS {
            break d;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "group never loaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(after.error_code, 0);
    assert_eq!(
        (after.group_epoch, after.assignment_epoch),
        (before.group_epoch, before.assignment_epoch)
    );
    let summary = |d: &consumer_group_describe_response::DescribedGroup| {
        d.members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.member_epoch,
                    m.assignment
                        .topic_partitions
                        .iter()
                        .flat_map(|t| t.partitions.clone())
                        .collect::<BTreeSet<i32>>(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(summary(&after), summary(&before));
    println!(
        "restored: epoch {} members {:?}",
        after.group_epoch,
        summary(&after)
    );
    // The members carry on with their epochs.
    for (m, e, o) in &members {
        let r = heartbeat(&mut c, "kg", m, *e, None, None, Some(o));
        assert_eq!((r.error_code, r.member_epoch), (0, *e), "{m} carries on");
    }
    let (code, offsets) = fetch(&mut c, "kg", Some((&members[0].0, members[0].1)), "k", 6);
    assert_eq!(code, 0);
    assert_eq!(offsets, (0..6).map(|p| 100 + p).collect::<Vec<i64>>());
    // Only the first member keeps heartbeating: the second is fenced after its session and
    // the first ends up with every partition.
    let (m1, mut e1, mut o1) = members[0].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = heartbeat(&mut c, "kg", &m1, e1, None, None, Some(&o1));
        assert_eq!(r.error_code, 0);
        e1 = r.member_epoch;
        if let Some(o) = owned(&r.assignment) {
            o1 = o;
        }
        if count(&o1) == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the silent member was never fenced"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let d = describe(&mut c, "kg");
    assert_eq!(d.members.len(), 1);
    assert!(d.group_epoch > before.group_epoch);
    assert!(b.log().contains("session timed out"));
    // `weir consumer-groups --describe` shows the group's state, offsets and owners.
    let out = weir(&[
        "consumer-groups",
        "--bootstrap-server",
        &b.bootstrap(),
        "--describe",
        "--group",
        "kg",
    ]);
    println!("{out}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(rows.len(), 6, "{out}");
    for (p, r) in rows.iter().enumerate() {
        assert_eq!(r[2], p.to_string());
        assert_eq!(r[3], (100 + p).to_string(), "committed offset");
        assert_eq!(r[6], "Stable");
        assert_eq!(r[7], m1, "owner");
    }
}

/// Builds the `weir` CLI; returns its path.
fn weir_binary() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let st = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--bin", "weir"])
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(st.success());
    root.join("target/debug/weir")
}

/// Runs the `weir` CLI; returns its standard output.
fn weir(args: &[&str]) -> String {
    let out = Command::new(weir_binary()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// kafka-clients 3.9.1 with group.protocol=consumer: three consumers, one joining and one
/// leaving while a producer writes; exactly-once reads across members, no partition owned
/// twice, committed offsets = log ends; then the range assignor's layout.
#[test]
fn java_consumers_with_the_consumer_protocol() {
    let (b, _conf) = broker("");
    let cp = weir_tests::java::classpath("WeirKip848Client");
    let started = Instant::now();
    let out = Command::new("java")
        .args([
            "-cp",
            &cp,
            "WeirKip848Client",
            &b.bootstrap(),
            "kip848",
            "10000",
        ])
        .output()
        .expect("java");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && stdout.contains("OK 10000"),
        "Java client failed ({}):\n{stdout}\n{}\nbroker log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        b.log()
    );
    println!("{stdout}\nin {:?}", started.elapsed());
    assert!(stdout.contains("DUPLICATES 0"));
    assert!(stdout.contains("REBALANCE c3 assigned"));
    assert!(stdout.contains("REBALANCE c1 revoked"));
}

/// Runs WeirKip848Client in failover mode against `bootstrap`: at "HALF", `fail` runs (it kills
/// the coordinator), then the consumers resume. Returns the program's output.
fn java_failover(
    bootstrap: &str,
    topic: &str,
    rf: &str,
    logs: &dyn Fn() -> String,
    fail: &mut dyn FnMut(),
) -> String {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let cp = weir_tests::java::classpath("WeirKip848Client");
    let mut child = Command::new("java")
        .args([
            "-cp",
            &cp,
            "WeirKip848Client",
            bootstrap,
            topic,
            "20000",
            "failover",
            rf,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("java");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = String::new();
    loop {
        let Some(Ok(l)) = lines.next() else {
            panic!("Java ended before HALF:\n{out}\n{}", logs());
        };
        out.push_str(&l);
        out.push('\n');
        if l.starts_with("HALF") {
            break;
        }
    }
    fail();
    let failed_at = Instant::now();
    writeln!(child.stdin.as_mut().unwrap(), "GO").unwrap();
    for l in lines.map_while(Result::ok) {
        out.push_str(&l);
        out.push('\n');
    }
    let st = child.wait().unwrap();
    assert!(
        st.success() && out.contains("OK 20000"),
        "{out}\nbroker logs:\n{}",
        logs()
    );
    println!("{out}finished {:?} after the failure", failed_at.elapsed());
    out
}

/// kafka-clients 3.9.1 consumers (group.protocol=consumer) while their coordinator is killed
/// with -9 and restarted: they carry on (the restored group accepts their member epochs), read
/// every record (at most the uncommitted tail twice) and commit to the log ends.
#[test]
fn java_consumers_carry_on_after_a_coordinator_kill9() {
    let (b, _conf) = broker("");
    let bootstrap = b.bootstrap();
    let b = std::cell::RefCell::new(b);
    let mut log_before = 0;
    java_failover(
        &bootstrap,
        "failover",
        "1",
        &|| b.borrow().log(),
        &mut || {
            let mut b = b.borrow_mut();
            log_before = b.log().len();
            b.kill9();
            b.restart();
        },
    );
    let log = b.borrow().log();
    let after = &log[log_before..];
    let rejoins = after.matches("member joins the consumer group").count();
    let fenced = after.matches("member fenced").count();
    println!("joins after the restart: {rejoins}, fenced: {fenced}");
    assert_eq!(rejoins, 0, "the members carried on with their epochs");
}

/// Three brokers: the broker coordinating the group (leader of its `__consumer_offsets`
/// partition, replicated to the others) is killed with -9; another broker takes the partition
/// over, replays the group from its replica, and the Java consumers carry on there without
/// rejoining.
#[test]
fn java_consumers_follow_their_group_to_a_new_coordinator() {
    let c = weir_tests::Cluster::start(3, &[("group.consumer.heartbeat.interval.ms", "500")]);
    let bootstrap = c.bootstrap();
    let c = std::cell::RefCell::new(c);
    let mut killed = usize::MAX;
    java_failover(
        &bootstrap,
        "moving",
        "3",
        &|| c.borrow().logs(),
        &mut || {
            let mut conn = Conn::new(&c.borrow().node(0).bootstrap());
            let r: FindCoordinatorResponse = conn.call(
                ApiKey::FindCoordinator,
                3,
                &FindCoordinatorRequest::default().with_key(s("moving-g")),
            );
            assert_eq!(r.error_code, 0);
            killed = r.node_id.0 as usize;
            println!("killing the coordinator, broker {killed}");
            c.borrow_mut().kill(killed);
        },
    );
    let c = c.into_inner();
    for i in (0..3).filter(|i| *i != killed) {
        assert_eq!(
            c.node(i)
                .log()
                .matches("member joins the consumer group")
                .count(),
            0,
            "broker {i}: the members carried on with their epochs"
        );
    }
}

fn static_heartbeat(c: &mut Conn, member: &str, epoch: i32) -> ConsumerGroupHeartbeatResponse {
    let mut req = ConsumerGroupHeartbeatRequest::default()
        .with_group_id(GroupId(s("sg")))
        .with_member_id(s(member))
        .with_member_epoch(epoch)
        .with_instance_id(Some(s("instance-1")))
        .with_rebalance_timeout_ms(-1);
    if epoch == 0 {
        req = req
            .with_rebalance_timeout_ms(30_000)
            .with_subscribed_topic_names(Some(vec![TopicName(s("st"))]))
            .with_topic_partitions(Some(vec![]));
    }
    c.call(ApiKey::ConsumerGroupHeartbeat, 0, &req)
}

/// A static member (instance id): a second member with its instance id is refused while it is
/// active (UNRELEASED_INSTANCE_ID), a wrong member id is fenced (FENCED_INSTANCE_ID); after a
/// temporary leave (epoch -2) the instance comes back under a new member id with its
/// partitions and without a new group epoch.
#[test]
fn static_members_rejoin_with_their_assignment() {
    const FENCED_INSTANCE_ID: i16 = 82;
    const UNRELEASED_INSTANCE_ID: i16 = 111;
    let (b, _conf) = broker("");
    admin::create(&b, "st", 2, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    let r = static_heartbeat(&mut c, "", 0);
    assert_eq!((r.error_code, r.member_epoch), (0, 1));
    let a = r.member_id.unwrap().to_string();
    let first = owned(&r.assignment).unwrap();
    assert_eq!(count(&first), 2);
    assert_eq!(
        static_heartbeat(&mut c, "", 0).error_code,
        UNRELEASED_INSTANCE_ID
    );
    assert_eq!(
        static_heartbeat(&mut c, "other", 1).error_code,
        FENCED_INSTANCE_ID
    );
    let r = static_heartbeat(&mut c, &a, -2);
    assert_eq!((r.error_code, r.member_epoch), (0, -2));
    let d = describe(&mut c, "sg");
    assert_eq!((d.group_epoch, d.members[0].member_epoch), (1, -2));
    let r = static_heartbeat(&mut c, "", 0);
    assert_eq!((r.error_code, r.member_epoch), (0, 1));
    let b2 = r.member_id.unwrap().to_string();
    assert_ne!(a, b2);
    assert_eq!(owned(&r.assignment).unwrap(), first, "the same partitions");
    let d = describe(&mut c, "sg");
    assert_eq!(d.group_epoch, 1, "no new group epoch");
    assert_eq!(d.members.len(), 1);
    assert_eq!(d.members[0].member_id.as_str(), b2);
    assert_eq!(d.members[0].instance_id.as_deref(), Some("instance-1"));
}

/// An empty consumer-protocol group without committed offsets is deleted by the offset
/// expiry pass (tombstones: it stays deleted after a restart); one with offsets stays.
#[test]
fn empty_consumer_groups_without_offsets_are_deleted() {
    let (mut b, _conf) = broker("offsets.retention.check.interval.ms=300\n");
    admin::create(&b, "e", 1, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    for g in ["gone", "kept"] {
        let r = join(&mut c, g, &["e"]);
        assert_eq!(r.error_code, 0);
        let m = r.member_id.unwrap().to_string();
        if g == "kept" {
            assert_eq!(commit(&mut c, g, &m, 1, "e", 0, 3), 0);
        }
        let r = heartbeat(&mut c, g, &m, -1, None, None, None);
        assert_eq!(r.error_code, 0);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while describe(&mut c, "gone").error_code != GROUP_ID_NOT_FOUND {
        assert!(
            Instant::now() < deadline,
            "the empty group was never deleted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(describe(&mut c, "kept").group_state.as_str(), "Empty");
    drop(c);
    b.kill9();
    b.restart();
    let mut c = Conn::new(&b.bootstrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let d = loop {
        let d = describe(&mut c, "kept");
        if d.error_code != COORDINATOR_LOAD_IN_PROGRESS {
            break d;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!((d.error_code, d.group_state.as_str()), (0, "Empty"));
    assert_eq!(describe(&mut c, "gone").error_code, GROUP_ID_NOT_FOUND);
    assert_eq!(fetch(&mut c, "kept", None, "e", 1), (0, vec![3]));
}

/// A member that does not revoke its partitions within its rebalance timeout is fenced, and
/// the member waiting for them gets them.
#[test]
fn a_member_that_does_not_revoke_in_its_rebalance_timeout_is_fenced() {
    let (b, _conf) = broker("");
    admin::create(&b, "rt", 2, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    let r: ConsumerGroupHeartbeatResponse = c.call(
        ApiKey::ConsumerGroupHeartbeat,
        0,
        &ConsumerGroupHeartbeatRequest::default()
            .with_group_id(GroupId(s("rtg")))
            .with_member_epoch(0)
            .with_rebalance_timeout_ms(1_000)
            .with_subscribed_topic_names(Some(vec![TopicName(s("rt"))]))
            .with_topic_partitions(Some(vec![])),
    );
    assert_eq!((r.error_code, r.member_epoch), (0, 1));
    let slow = r.member_id.unwrap().to_string();
    let all = owned(&r.assignment).unwrap();
    let r = join(&mut c, "rtg", &["rt"]);
    let quick = r.member_id.unwrap().to_string();
    // The slow member is asked to revoke one partition and never confirms.
    let r = heartbeat(&mut c, "rtg", &slow, 1, None, None, Some(&all));
    assert_eq!((r.error_code, r.member_epoch), (0, 1));
    assert_eq!(count(&owned(&r.assignment).unwrap()), 1);
    let started = Instant::now();
    let mut got = Owned::new();
    let mut epoch = 2;
    while count(&got) < 2 {
        assert!(started.elapsed() < Duration::from_secs(15), "never fenced");
        std::thread::sleep(Duration::from_millis(200));
        let r = heartbeat(&mut c, "rtg", &quick, epoch, None, None, Some(&got));
        assert_eq!(r.error_code, 0);
        epoch = r.member_epoch;
        if let Some(o) = owned(&r.assignment) {
            got = o;
        }
    }
    println!("fenced and reassigned after {:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_millis(800));
    let r = heartbeat(&mut c, "rtg", &slow, 1, None, None, Some(&all));
    assert_eq!(r.error_code, UNKNOWN_MEMBER_ID);
    assert!(b
        .log()
        .contains("did not revoke its partitions in its rebalance timeout"));
}
