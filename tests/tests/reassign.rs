//! Partition reassignment (issue #13, KIP-455) on broker processes on loopback: a fourth broker
//! is commissioned and takes replicas under a steady acks=all producer; a reassignment that
//! cannot finish is listed and cancelled; a leader-side replication throttle holds a new
//! replica's catch-up to its rate.

use std::collections::BTreeMap;
use std::time::Duration;

use kafka_protocol::messages::alter_partition_reassignments_request::{
    ReassignablePartition, ReassignableTopic,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, ApiKey, BrokerId,
    ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use rdkafka::consumer::Consumer;
use weir_tests::{admin, eventually, log_bytes, raw, topic_view, workload, Broker, Cluster};

const FAST: &[(&str, &str)] = &[
    ("replica.lag.time.max.ms", "4000"),
    ("replica.fetch.wait.max.ms", "200"),
    ("replica.fetch.backoff.ms", "200"),
];

/// (leader, replicas, isr) per partition of `topic` as broker `b` reports it.
fn partitions(b: &Broker, topic: &str) -> Option<Vec<(i32, Vec<i32>, Vec<i32>)>> {
    Some(
        topic_view(b, topic)?
            .into_iter()
            .map(|p| (p.leader, p.replicas, p.isr))
            .collect(),
    )
}

fn reassign(b: &Broker, topic: &str, plan: &[(i32, Option<Vec<i32>>)]) -> Vec<(i32, i16)> {
    let mut c = raw::Conn::new(&b.bootstrap());
    let req = AlterPartitionReassignmentsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(vec![ReassignableTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(
                plan.iter()
                    .map(|(p, r)| {
                        ReassignablePartition::default()
                            .with_partition_index(*p)
                            .with_replicas(
                                r.as_ref().map(|r| r.iter().map(|&b| BrokerId(b)).collect()),
                            )
                    })
                    .collect(),
            )]);
    let r: AlterPartitionReassignmentsResponse =
        c.call(ApiKey::AlterPartitionReassignments, 0, &req);
    assert_eq!(r.error_code, 0);
    r.responses[0]
        .partitions
        .iter()
        .map(|p| (p.partition_index, p.error_code))
        .collect()
}

/// Ongoing reassignments: partition -> (replicas, adding, removing).
fn ongoing(b: &Broker) -> BTreeMap<i32, (Vec<i32>, Vec<i32>, Vec<i32>)> {
    let mut c = raw::Conn::new(&b.bootstrap());
    let r: ListPartitionReassignmentsResponse = c.call(
        ApiKey::ListPartitionReassignments,
        0,
        &ListPartitionReassignmentsRequest::default()
            .with_timeout_ms(30_000)
            .with_topics(None),
    );
    assert_eq!(r.error_code, 0);
    let ids = |v: &[BrokerId]| v.iter().map(|b| b.0).collect::<Vec<_>>();
    r.topics
        .iter()
        .flat_map(|t| t.partitions.iter())
        .map(|p| {
            (
                p.partition_index,
                (
                    ids(&p.replicas),
                    ids(&p.adding_replicas),
                    ids(&p.removing_replicas),
                ),
            )
        })
        .collect()
}

#[test]
fn a_fourth_broker_takes_replicas_under_load_without_losing_records() {
    let mut c = Cluster::start(3, FAST);
    admin::create(c.node(0), "move", 6, 2, &[]).expect("create");
    assert!(eventually(Duration::from_secs(30), || partitions(
        c.node(0),
        "move"
    )
    .is_some_and(|v| v
        .iter()
        .all(|(l, r, isr)| *l >= 0 && isr.len() == r.len()))));

    let producer =
        workload::background_producer(&c.node(0).client_config(), &c.bootstrap(), "move");
    // A consumer group member reads all along, committing as it goes.
    let stop_group = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let group = {
        let (stop, seen) = (stop_group.clone(), seen.clone());
        let mut cfg = c.node(0).client_config();
        cfg.set("bootstrap.servers", c.bootstrap())
            .set("group.id", "mover")
            .set("auto.offset.reset", "earliest")
            .set("topic.metadata.refresh.interval.ms", "500");
        std::thread::spawn(move || {
            use rdkafka::message::{Headers, Message};
            let member: rdkafka::consumer::BaseConsumer = cfg.create().expect("group member");
            member.subscribe(&["move"]).expect("subscribe");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(m)) = member.poll(Duration::from_millis(100)) {
                    let idx: usize = m
                        .headers()
                        .and_then(|h| h.iter().find(|x| x.key == "idx"))
                        .and_then(|x| std::str::from_utf8(x.value?).ok()?.parse().ok())
                        .expect("idx header");
                    seen.lock().unwrap().insert(idx);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    // Commission broker 3, then spread every partition over brokers 0-3.
    let new = c.add_broker();
    assert_eq!(new, 3);
    let plan: Vec<(i32, Option<Vec<i32>>)> = (0..6)
        .map(|p| (p, Some(vec![(p % 4), ((p + 1) % 4)])))
        .collect();
    let codes = reassign(c.node(1), "move", &plan);
    assert!(codes.iter().all(|(_, code)| *code == 0), "{codes:?}");
    // Verify: until no reassignment is listed (asked of the broker that took the change, which
    // answered once it had applied it).
    assert!(
        eventually(Duration::from_secs(60), || ongoing(c.node(1)).is_empty()),
        "reassignments still running: {:?}",
        ongoing(c.node(1))
    );
    // (librdkafka may ask a broker that applied the last change a moment later.)
    let mut v = Vec::new();
    assert!(eventually(Duration::from_secs(10), || {
        v = partitions(c.node(1), "move").unwrap_or_default();
        v.len() == 6
            && plan
                .iter()
                .all(|(p, t)| Some(&v[*p as usize].1) == t.as_ref())
    }));
    for (p, target) in &plan {
        let (leader, replicas, _) = &v[*p as usize];
        assert_eq!(Some(replicas), target.as_ref(), "partition {p}");
        assert!(
            replicas.contains(leader),
            "partition {p} led by a replica: {leader}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    let acked = producer.finish();
    let sent = acked.len();
    let got = workload::consume(
        &c.node(3).client_config(),
        "move",
        6,
        acked.len(),
        Duration::from_secs(60),
    );
    workload::verify(&acked, &got);
    eprintln!("{sent} records acknowledged across the reassignment");
    // The group sees every acknowledged record.
    let missing = || {
        let seen = seen.lock().unwrap();
        acked.iter().filter(|a| !seen.contains(&a.idx)).count()
    };
    let complete = eventually(Duration::from_secs(60), || missing() == 0);
    stop_group.store(true, std::sync::atomic::Ordering::Relaxed);
    group.join().expect("group member");
    assert!(complete, "the group missed {} of {sent} records", missing());

    // Replicas hold byte-identical logs; brokers that left a partition deleted it.
    for i in 0..4 {
        assert!(c.stop(i), "broker {i} stops cleanly");
    }
    for (p, target) in &plan {
        let target = target.as_ref().unwrap();
        for b in 0..4usize {
            let dir = c.node(b).data_dir().join(format!("move-{p}"));
            assert_eq!(
                dir.exists(),
                target.contains(&(b as i32)),
                "broker {b} holds move-{p}"
            );
        }
        let a = log_bytes(
            &c.node(target[0] as usize)
                .data_dir()
                .join(format!("move-{p}")),
        );
        let b = log_bytes(
            &c.node(target[1] as usize)
                .data_dir()
                .join(format!("move-{p}")),
        );
        assert!(
            !a.is_empty() && a == b,
            "move-{p}: replicas differ ({} / {} bytes)",
            a.len(),
            b.len()
        );
    }
}

#[test]
fn a_reassignment_that_cannot_finish_is_listed_and_cancelled() {
    let mut c = Cluster::start(3, FAST);
    admin::create(c.node(0), "stuck", 1, 2, &[]).expect("create");
    let mut before = None;
    assert!(eventually(Duration::from_secs(30), || {
        before = partitions(c.node(0), "stuck");
        before
            .as_ref()
            .is_some_and(|v| v[0].0 >= 0 && v[0].2.len() == 2)
    }));
    let (_, original, _) = before.unwrap().remove(0);
    let spare = (0..3).find(|b| !original.contains(b)).unwrap();
    // The broker to add is down: the reassignment cannot complete.
    c.stop(spare as usize);
    let target = vec![original[0], spare];
    assert_eq!(
        reassign(
            c.node(original[0] as usize),
            "stuck",
            &[(0, Some(target.clone()))]
        ),
        vec![(0, 0)]
    );
    let listed = ongoing(c.node(original[0] as usize));
    assert_eq!(
        listed.get(&0),
        Some(&(
            vec![original[0], spare, original[1]],
            vec![spare],
            vec![original[1]]
        )),
        "{listed:?}"
    );
    // Unknown partitions and brokers, and cancelling nothing, are refused per partition.
    assert_eq!(
        reassign(c.node(original[0] as usize), "stuck", &[(5, Some(vec![0]))]),
        vec![(5, 3)]
    );
    assert_eq!(
        reassign(
            c.node(original[0] as usize),
            "stuck",
            &[(0, Some(vec![0, 9]))]
        ),
        vec![(0, 39)]
    );
    // Cancel: back to the original replicas.
    assert_eq!(
        reassign(c.node(original[0] as usize), "stuck", &[(0, None)]),
        vec![(0, 0)]
    );
    assert!(ongoing(c.node(original[0] as usize)).is_empty());
    assert_eq!(
        reassign(c.node(original[0] as usize), "stuck", &[(0, None)]),
        vec![(0, 85)]
    );
    assert!(eventually(Duration::from_secs(10), || partitions(
        c.node(original[0] as usize),
        "stuck"
    )
    .is_some_and(|v| v[0].1 == original)));
}

/// A reassignment lives in the metadata log: with the active controller killed while it waits
/// for a replica, it completes under the next controller once that replica catches up.
#[test]
fn a_reassignment_completes_after_the_controller_fails_over() {
    use kafka_protocol::messages::{DescribeClusterRequest, DescribeClusterResponse};
    let mut c = Cluster::start(3, FAST);
    let controller = |b: &Broker| -> i32 {
        let mut conn = raw::Conn::new(&b.bootstrap());
        let r: DescribeClusterResponse = conn.call(
            ApiKey::DescribeCluster,
            0,
            &DescribeClusterRequest::default(),
        );
        r.controller_id.0
    };
    let mut ctrl = -1;
    assert!(eventually(Duration::from_secs(20), || {
        ctrl = controller(c.node(0));
        ctrl >= 0
    }));
    let ctrl = ctrl as usize;
    let (a, spare) = ((ctrl + 1) % 3, (ctrl + 2) % 3);
    // A topic on the controller's broker and one other; it moves to [a, spare].
    let assignment: &[&[i32]] = &[&[ctrl as i32, a as i32]];
    let t = rdkafka::admin::NewTopic::new(
        "failover",
        1,
        rdkafka::admin::TopicReplication::Variable(assignment),
    );
    let r =
        futures::executor::block_on(admin::client(c.node(a)).create_topics([&t], &admin::opts()))
            .expect("CreateTopics");
    assert!(r[0].is_ok(), "{r:?}");
    assert!(eventually(Duration::from_secs(30), || partitions(
        c.node(a),
        "failover"
    )
    .is_some_and(|v| v[0].2.len() == 2)));
    let acked = workload::produce(
        &c.node(a).client_config(),
        "failover",
        0..500,
        &[("acks", "all")],
    );
    c.stop(spare);
    assert_eq!(
        reassign(
            c.node(a),
            "failover",
            &[(0, Some(vec![a as i32, spare as i32]))]
        ),
        vec![(0, 0)]
    );
    assert!(!ongoing(c.node(a)).is_empty());
    c.kill(ctrl);
    c.restart(spare);
    assert!(
        eventually(Duration::from_secs(60), || ongoing(c.node(a)).is_empty()
            && partitions(c.node(a), "failover").is_some_and(|v| v[0].1
                == [a as i32, spare as i32]
                && v[0].2.len() == 2)),
        "the reassignment completed under the new controller: {:?} {:?}",
        ongoing(c.node(a)),
        partitions(c.node(a), "failover")
    );
    let got = workload::consume(
        &c.node(spare).client_config(),
        "failover",
        1,
        500,
        Duration::from_secs(30),
    );
    workload::verify(&acked, &got);
}

fn unregister(b: &Broker, id: i32) -> (i16, Option<String>) {
    use kafka_protocol::messages::{UnregisterBrokerRequest, UnregisterBrokerResponse};
    let mut c = raw::Conn::new(&b.bootstrap());
    let r: UnregisterBrokerResponse = c.call(
        ApiKey::UnregisterBroker,
        0,
        &UnregisterBrokerRequest::default().with_broker_id(BrokerId(id)),
    );
    (r.error_code, r.error_message.map(|m| m.to_string()))
}

/// Decommissioning broker 0: its replicas are moved off by reassignment, it stops, and it is
/// unregistered; clients go on with the other two.
#[test]
fn a_broker_is_drained_stopped_and_unregistered() {
    let mut c = Cluster::start(3, FAST);
    admin::create(c.node(1), "dec", 3, 2, &[]).expect("create");
    let mut v = None;
    assert!(eventually(Duration::from_secs(30), || {
        v = partitions(c.node(1), "dec");
        v.as_ref()
            .is_some_and(|v| v.iter().all(|(l, r, isr)| *l >= 0 && isr.len() == r.len()))
    }));
    let cfg = c.node(1).client_config();
    let mut acked = workload::produce(&cfg, "dec", 0..300, &[("acks", "all")]);
    let plan: Vec<(i32, Option<Vec<i32>>)> = v
        .unwrap()
        .iter()
        .enumerate()
        .map(|(p, (_, replicas, _))| {
            let spare = (0..3).find(|b| !replicas.contains(b)).unwrap();
            let target = replicas
                .iter()
                .map(|&r| if r == 0 { spare } else { r })
                .collect();
            (p as i32, Some(target))
        })
        .collect();
    let codes = reassign(c.node(1), "dec", &plan);
    assert!(codes.iter().all(|(_, code)| *code == 0), "{codes:?}");
    // The coordinators' topics have replicas on every broker: RF 3 becomes RF 2 without 0.
    for internal in ["__consumer_offsets", "__transaction_state"] {
        let parts = partitions(c.node(1), internal).expect(internal);
        let drain: Vec<(i32, Option<Vec<i32>>)> = parts
            .iter()
            .enumerate()
            .map(|(p, (_, r, _))| {
                (
                    p as i32,
                    Some(r.iter().copied().filter(|&b| b != 0).collect()),
                )
            })
            .collect();
        let codes = reassign(c.node(1), internal, &drain);
        assert!(codes.iter().all(|(_, code)| *code == 0), "{codes:?}");
    }
    let off_0 = |t: &str| {
        partitions(c.node(1), t).is_some_and(|v| v.iter().all(|(_, r, _)| !r.contains(&0)))
    };
    assert!(eventually(Duration::from_secs(60), || ongoing(c.node(1))
        .is_empty()
        && off_0("dec")
        && off_0("__consumer_offsets")
        && off_0("__transaction_state")));
    let (code, msg) = unregister(c.node(1), 0);
    assert_eq!(code, 42, "a running broker is not unregistered: {msg:?}");
    assert!(c.stop(0), "broker 0 stops cleanly");
    assert_eq!(unregister(c.node(1), 0), (0, None));
    assert_eq!(
        unregister(c.node(2), 0).0,
        102,
        "BROKER_ID_NOT_REGISTERED once it is gone"
    );
    // Clients go on with brokers 1 and 2.
    let more = workload::produce(
        &c.node(2).client_config(),
        "dec",
        300..600,
        &[("acks", "all")],
    );
    acked.extend(more);
    acked.sort_by_key(|a| a.idx);
    let got = workload::consume(
        &c.node(2).client_config(),
        "dec",
        3,
        600,
        Duration::from_secs(30),
    );
    workload::verify(&acked, &got);
}

/// A replica added to a partition whose start DeleteRecords moved begins at the leader's log
/// start (it cannot copy what is gone), completes the reassignment, and serves the records
/// after the cut when it leads.
#[test]
fn a_new_replica_starts_at_the_leaders_log_start() {
    use rdkafka::{Offset, TopicPartitionList};
    let mut c = Cluster::start(3, FAST);
    let assignment: &[&[i32]] = &[&[0]];
    let t = rdkafka::admin::NewTopic::new(
        "cut",
        1,
        rdkafka::admin::TopicReplication::Variable(assignment),
    );
    let r =
        futures::executor::block_on(admin::client(c.node(1)).create_topics([&t], &admin::opts()))
            .expect("CreateTopics");
    assert!(r[0].is_ok(), "{r:?}");
    assert!(eventually(Duration::from_secs(30), || partitions(
        c.node(1),
        "cut"
    )
    .is_some_and(|v| v[0].0 == 0)));
    let acked = workload::produce(
        &c.node(0).client_config(),
        "cut",
        0..200,
        &[("acks", "all")],
    );
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("cut", 0, Offset::Offset(120))
        .unwrap();
    let r =
        futures::executor::block_on(admin::client(c.node(0)).delete_records(&tpl, &admin::opts()))
            .expect("DeleteRecords");
    assert!(r.find_partition("cut", 0).unwrap().error().is_ok());
    assert_eq!(
        reassign(c.node(1), "cut", &[(0, Some(vec![0, 1]))]),
        vec![(0, 0)]
    );
    if !eventually(Duration::from_secs(30), || ongoing(c.node(1)).is_empty()) {
        panic!(
            "the new replica never caught up: {:?}\n{}\n{}",
            ongoing(c.node(1)),
            c.node(1).log(),
            c.node(0).log()
        );
    }
    assert!(c
        .node(1)
        .log()
        .contains("replica restarted at the leader's log start"));
    // Broker 1 alone: it leads and serves the records from the cut on.
    c.kill(0);
    assert!(eventually(Duration::from_secs(30), || partitions(
        c.node(1),
        "cut"
    )
    .is_some_and(|v| v[0].0 == 1)));
    let consumer = workload::consumer(&c.node(1).client_config());
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("cut", 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut offsets = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while offsets.len() < 80 && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            use rdkafka::Message;
            offsets.push(m.offset());
        }
    }
    assert_eq!(offsets, (120..200).collect::<Vec<i64>>());
    assert_eq!(acked.len(), 200);
}

/// The leader side of the replication throttle alone, set through librdkafka's AlterConfigs:
/// `leader.replication.throttled.rate` on the leader's broker resource and
/// `leader.replication.throttled.replicas` on the topic hold a new replica's catch-up to the
/// rate, while DescribeConfigs reports the rate as a dynamic broker config.
#[test]
fn the_leader_throttle_holds_a_new_replica_to_its_rate() {
    use rdkafka::admin::{AlterConfig, ResourceSpecifier};
    let c = Cluster::start(
        3,
        &[
            ("replica.fetch.wait.max.ms", "200"),
            ("replica.fetch.max.bytes", "65536"),
        ],
    );
    let assignment: &[&[i32]] = &[&[0]];
    let t = rdkafka::admin::NewTopic::new(
        "lt",
        1,
        rdkafka::admin::TopicReplication::Variable(assignment),
    );
    let a = admin::client(c.node(0));
    let r = futures::executor::block_on(a.create_topics([&t], &admin::opts())).expect("create");
    assert!(r[0].is_ok(), "{r:?}");
    let acked = workload::produce(
        &c.node(0).client_config(),
        "lt",
        0..20_000,
        &[("acks", "all")],
    );
    assert_eq!(acked.len(), 20_000);
    let mut data = log_bytes(&c.node(0).data_dir().join("lt-0"));
    while data.last() == Some(&0) {
        data.pop();
    }
    let bytes = data.len() as f64;

    let rate: u64 = 512 * 1024;
    let rate_s = rate.to_string();
    let broker_cfg = AlterConfig::new(ResourceSpecifier::Broker(0))
        .set("leader.replication.throttled.rate", &rate_s);
    let topic_cfg = AlterConfig::new(ResourceSpecifier::Topic("lt"))
        .set("leader.replication.throttled.replicas", "0:0");
    let r = futures::executor::block_on(a.alter_configs([&broker_cfg, &topic_cfg], &admin::opts()))
        .expect("AlterConfigs");
    assert!(r.iter().all(|x| x.is_ok()), "{r:?}");
    let described = futures::executor::block_on(
        a.describe_configs([&ResourceSpecifier::Broker(0)], &admin::opts()),
    )
    .expect("DescribeConfigs");
    let res = described[0].as_ref().expect("broker 0 configs");
    let entry = res
        .get("leader.replication.throttled.rate")
        .expect("listed");
    assert_eq!(entry.value.as_deref(), Some(rate_s.as_str()));
    assert_eq!(entry.source, rdkafka::admin::ConfigSource::DynamicBroker);
    // Broker 1 has no throttle of its own: the default (Long.MAX_VALUE).
    let other = futures::executor::block_on(
        admin::client(c.node(1)).describe_configs([&ResourceSpecifier::Broker(1)], &admin::opts()),
    )
    .expect("DescribeConfigs");
    let e = other[0]
        .as_ref()
        .unwrap()
        .get("leader.replication.throttled.rate")
        .unwrap();
    assert_eq!(e.value.as_deref(), Some("9223372036854775807"));
    assert_eq!(e.source, rdkafka::admin::ConfigSource::Default);

    let started = std::time::Instant::now();
    assert_eq!(
        reassign(c.node(0), "lt", &[(0, Some(vec![0, 1]))]),
        vec![(0, 0)]
    );
    assert!(eventually(Duration::from_secs(120), || ongoing(c.node(0)).is_empty()));
    let elapsed = started.elapsed().as_secs_f64();
    // The bucket allows one second of burst plus one fetch beyond the rate; a fetch is at
    // least one whole batch, however small replica.fetch.max.bytes is.
    let overshoot = weir_tests::largest_batch(&data).max(65_536);
    eprintln!(
        "leader-throttled move: {bytes} bytes in {elapsed:.1} s = {:.0} B/s (throttle {rate} B/s, largest fetch allowance {overshoot} B)",
        bytes / elapsed
    );
    assert!(
        bytes <= rate as f64 * (elapsed + 1.0) + overshoot as f64,
        "moved {bytes} bytes in {elapsed:.1} s: faster than {rate} B/s"
    );
    // The new replica joined the ISR and holds the leader's log byte for byte.
    assert!(eventually(Duration::from_secs(10), || partitions(
        c.node(0),
        "lt"
    )
    .is_some_and(|v| v[0].2.len() == 2)));
    let mut copy = log_bytes(&c.node(1).data_dir().join("lt-0"));
    while copy.last() == Some(&0) {
        copy.pop();
    }
    assert!(copy == data, "replica differs from the leader");
}
