//! Replication (issue #12) on three broker processes on loopback: followers copy leaders
//! byte for byte, acks=all waits for the ISR, the ISR shrinks and grows, and kill -9 of leaders
//! loses no acknowledged record. Clients: librdkafka (rdkafka) and raw requests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use weir_tests::{admin, eventually, log_bytes, raw, topic_view, workload, Broker, Cluster};

/// (leader, isr) of each partition of `topic`, as broker `b`'s Metadata says.
fn partitions(b: &Broker, topic: &str) -> Option<Vec<(i32, Vec<i32>)>> {
    Some(
        topic_view(b, topic)?
            .into_iter()
            .map(|p| (p.leader, p.isr))
            .collect(),
    )
}

/// Waits until broker `b` reports `topic` with `ok` true; returns that view.
fn wait_for(
    b: &Broker,
    topic: &str,
    what: &str,
    ok: impl Fn(&[(i32, Vec<i32>)]) -> bool,
) -> Vec<(i32, Vec<i32>)> {
    let mut last = None;
    let done = eventually(Duration::from_secs(60), || {
        last = partitions(b, topic);
        last.as_deref().is_some_and(&ok)
    });
    assert!(done, "{what}: last view {last:?}");
    last.expect("checked")
}

fn full_isr(v: &[(i32, Vec<i32>)]) -> bool {
    v.iter().all(|(l, isr)| *l >= 0 && isr == &[0, 1, 2])
}

/// Stops every broker cleanly and asserts each partition's log is byte-identical on all three.
fn assert_replicas_identical(c: &mut Cluster, topic: &str, partitions: i32) {
    for i in 0..3 {
        assert!(c.stop(i), "broker {i} stops cleanly");
    }
    for p in 0..partitions {
        let logs: Vec<Vec<u8>> = (0..3)
            .map(|i| log_bytes(&c.node(i).data_dir().join(format!("{topic}-{p}"))))
            .collect();
        assert!(!logs[0].is_empty(), "{topic}-{p} holds data");
        for i in 1..3 {
            assert!(
                logs[i] == logs[0],
                "{topic}-{p}: broker {i}'s log ({} bytes) differs from broker 0's ({} bytes)",
                logs[i].len(),
                logs[0].len()
            );
        }
    }
}

const FAST: &[(&str, &str)] = &[
    ("replica.lag.time.max.ms", "4000"),
    ("min.insync.replicas", "2"),
    ("replica.fetch.wait.max.ms", "200"),
    ("replica.fetch.backoff.ms", "200"),
];

#[test]
fn followers_copy_leaders_byte_for_byte_and_acks_all_waits_for_them() {
    let mut c = Cluster::start(3, FAST);
    admin::create(c.node(0), "r3", 3, 3, &[]).expect("create");
    wait_for(c.node(0), "r3", "topic with full ISR", full_isr);
    let cfg = c.node(1).client_config();
    let acked = workload::produce(
        &cfg,
        "r3",
        0..6_000,
        &[("acks", "all"), ("enable.idempotence", "true")],
    );
    let got = workload::consume(&cfg, "r3", 3, acked.len(), Duration::from_secs(60));
    workload::verify(&acked, &got);
    // Followers fetch in incremental sessions (KIP-227): one per leader, opened once.
    for i in 0..3 {
        let opened = c
            .node(i)
            .log()
            .matches("follower fetch session opened")
            .count();
        assert_eq!(
            opened, 2,
            "broker {i} follows two leaders: {opened} sessions opened"
        );
    }
    // acks=all answered means every ISR member has it: the logs agree right after the last ack.
    assert_replicas_identical(&mut c, "r3", 3);
    // And after a restart everything reads back.
    c.restart_all();
    wait_for(c.node(0), "r3", "after restart", full_isr);
    let got = workload::consume(
        &c.node(2).client_config(),
        "r3",
        3,
        acked.len(),
        Duration::from_secs(60),
    );
    workload::verify(&acked, &got);
}

#[test]
fn isr_shrinks_without_a_follower_and_grows_back_with_min_insync() {
    // A controller-only node keeps the quorum while two of the three brokers are down.
    let mut c = Cluster::start_roles(&["controller", "broker", "broker", "broker"], FAST);
    let all = |v: &[(i32, Vec<i32>)]| v.iter().all(|(l, isr)| *l >= 0 && isr == &[1, 2, 3]);
    admin::create(c.node(1), "isr", 1, 3, &[]).expect("create");
    // The topic config overrides the broker's min.insync.replicas (2).
    admin::create(c.node(1), "isr1", 1, 3, &[("min.insync.replicas", "1")]).expect("create");
    wait_for(c.node(1), "isr1", "full ISR", all);
    let v = wait_for(c.node(1), "isr", "full ISR", all);
    let leader = v[0].0 as usize;
    let f1 = leader % 3 + 1;
    let f2 = f1 % 3 + 1;
    let mut conn = raw::Conn::new(&c.node(leader).bootstrap());
    assert_eq!(conn.produce("isr", 0, -1, -1, -1, 10).0, 0);

    // One follower gone: it leaves the ISR, and acks=all with min.insync 2 still works.
    c.kill(f1);
    wait_for(
        c.node(leader),
        "isr",
        "ISR without the stopped follower",
        |v| v[0].1.len() == 2 && !v[0].1.contains(&(f1 as i32)),
    );
    let (code, base) = conn.produce("isr", 0, -1, -1, -1, 10);
    assert_eq!((code, base), (0, 10), "acks=all with 2 of 3 in sync");

    // Two gone: NOT_ENOUGH_REPLICAS (19), and nothing is appended.
    c.kill(f2);
    wait_for(c.node(leader), "isr", "ISR of the leader alone", |v| {
        v[0].1 == [leader as i32]
    });
    let (code, _) = conn.produce("isr", 0, -1, -1, -1, 10);
    assert_eq!(code, 19, "NOT_ENOUGH_REPLICAS with 1 of 3 in sync");
    let (_, hw, _) = conn.fetch("isr", 0, 0, 0, 1);
    assert_eq!(hw, 20, "the refused batch was not appended");
    wait_for(
        c.node(leader),
        "isr1",
        "the other topic led by the last broker alone",
        |v| v[0] == (leader as i32, vec![leader as i32]),
    );
    let mut conn1 = raw::Conn::new(&c.node(leader).bootstrap());
    assert_eq!(
        conn1.produce("isr1", 0, -1, -1, -1, 10),
        (0, 0),
        "min.insync.replicas=1 topic"
    );

    // Both return: they catch up and rejoin; acks=all works again.
    c.restart(f1);
    c.restart(f2);
    wait_for(c.node(leader), "isr", "ISR grows back", all);
    // (librdkafka may have asked a broker whose view is a moment ahead of the leader's: the
    // produce is refused with NOT_ENOUGH_REPLICAS until the leader has the new ISR too.)
    let mut conn = raw::Conn::new(&c.node(leader).bootstrap());
    let mut r = (-1, -1);
    assert!(
        eventually(Duration::from_secs(20), || {
            r = conn.produce("isr", 0, -1, -1, -1, 10);
            r.0 != 19
        }),
        "acks=all never accepted again"
    );
    assert_eq!(r, (0, 20));
    for i in 1..4 {
        assert!(c.stop(i), "broker {i} stops cleanly");
    }
    let logs: Vec<Vec<u8>> = (1..4)
        .map(|i| log_bytes(&c.node(i).data_dir().join("isr-0")))
        .collect();
    assert!(
        logs[0] == logs[1] && logs[1] == logs[2],
        "replicas are byte-identical"
    );
}

/// SIGSTOP the leader until it is fenced and another replica leads; a produce it received
/// meanwhile is never acknowledged; after SIGCONT it learns it no longer leads, truncates what
/// the new leader does not have, and rejoins the ISR with a byte-identical log.
#[test]
fn paused_leader_is_replaced_and_truncates_when_it_resumes() {
    use kafka_protocol::messages::{ApiKey, DescribeClusterRequest, DescribeClusterResponse};
    use rdkafka::admin::{NewTopic, TopicReplication};
    let mut c = Cluster::start(3, FAST);
    // The hardest case: the paused leader is also the active controller, so the others must
    // elect a new controller before it can fence the old leader.
    let mut controller = -1;
    assert!(eventually(Duration::from_secs(20), || {
        let mut conn = raw::Conn::new(&c.node(0).bootstrap());
        let r: DescribeClusterResponse = conn.call(
            ApiKey::DescribeCluster,
            0,
            &DescribeClusterRequest::default(),
        );
        controller = r.controller_id.0;
        controller >= 0
    }));
    let replicas: Vec<i32> = (0..3).map(|i| (controller + i) % 3).collect();
    let assignment: &[&[i32]] = &[&replicas];
    let t = NewTopic::new("zombie", 1, TopicReplication::Variable(assignment));
    let r =
        futures::executor::block_on(admin::client(c.node(0)).create_topics([&t], &admin::opts()))
            .expect("CreateTopics");
    assert!(r[0].is_ok(), "{r:?}");
    let v = wait_for(c.node(0), "zombie", "full ISR", full_isr);
    let old = v[0].0 as usize;
    assert_eq!(old as i32, controller, "the controller leads the partition");
    let other = (old + 1) % 3;
    let mut conn = raw::Conn::new(&c.node(old).bootstrap());
    assert_eq!(conn.produce("zombie", 0, -1, -1, -1, 10), (0, 0));

    c.node(old).pause(true);
    // A produce that reaches the frozen leader waits in its socket.
    let zombie_produce = std::thread::spawn(move || conn.produce("zombie", 0, -1, -1, -1, 5));
    eprintln!("old leader {old}");
    if !eventually(Duration::from_secs(30), || {
        partitions(c.node(other), "zombie").is_some_and(|v| v[0].0 >= 0 && v[0].0 != old as i32)
    }) {
        eprintln!("{}", c.logs());
    }
    let v = wait_for(c.node(other), "zombie", "a new leader", |v| {
        v[0].0 >= 0 && v[0].0 != old as i32
    });
    let new = v[0].0 as usize;
    let mut conn = raw::Conn::new(&c.node(new).bootstrap());
    assert_eq!(conn.produce("zombie", 0, -1, -1, -1, 7), (0, 10));

    c.node(old).pause(false);
    let (code, _) = zombie_produce.join().expect("zombie produce");
    assert_ne!(
        code, 0,
        "the deposed leader never acknowledges with acks=all"
    );
    wait_for(
        c.node(new),
        "zombie",
        "the old leader back in the ISR",
        full_isr,
    );
    // Only what the new leader acknowledged is there.
    let (_, hw, _) = conn.fetch("zombie", 0, 0, 0, 1);
    assert_eq!(hw, 17);
    assert_eq!(conn.produce("zombie", 0, -1, -1, -1, 3), (0, 17));
    eprintln!(
        "zombie produce answered {code}; the old leader truncated: {}",
        c.node(old).log().contains("truncated a diverged replica")
    );
    assert_replicas_identical(&mut c, "zombie", 1);
}

/// Kills the leader of a partition with kill -9 again and again while an idempotent acks=all
/// producer runs, restarting it each time. Afterwards every acknowledged record is there
/// exactly once, in order, and all replicas' logs are byte-identical.
#[test]
fn kill_9_of_leaders_loses_no_acknowledged_record() {
    let cycles: usize = std::env::var("WEIR_REPLICATION_KILL_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut c = Cluster::start(3, FAST);
    admin::create(c.node(0), "kill", 3, 3, &[]).expect("create");
    wait_for(c.node(0), "kill", "full ISR", full_isr);

    let producer =
        workload::background_producer(&c.node(0).client_config(), &c.bootstrap(), "kill");
    let stop = Arc::new(AtomicBool::new(false));

    // A consumer reads all along: what it sees is below the HW, so it must never vanish.
    let watcher = {
        let stop = stop.clone();
        let mut wcfg = c.node(0).client_config();
        wcfg.set(
            "bootstrap.servers",
            (0..3)
                .map(|i| c.node(i).bootstrap())
                .collect::<Vec<_>>()
                .join(","),
        )
        .set("topic.metadata.refresh.interval.ms", "500");
        std::thread::spawn(move || {
            use rdkafka::message::Headers;
            use rdkafka::{Message, Offset, TopicPartitionList};
            let consumer = workload::consumer(&wcfg);
            let mut tpl = TopicPartitionList::new();
            for p in 0..3 {
                tpl.add_partition_offset("kill", p, Offset::Beginning)
                    .unwrap();
            }
            consumer.assign(&tpl).unwrap();
            let mut seen: Vec<(i32, i64, usize)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    let idx = m
                        .headers()
                        .and_then(|h| h.iter().find(|x| x.key == "idx"))
                        .and_then(|x| std::str::from_utf8(x.value?).ok()?.parse().ok())
                        .expect("idx header");
                    seen.push((m.partition(), m.offset(), idx));
                }
            }
            seen
        })
    };
    let started = Instant::now();
    for cycle in 0..cycles {
        let alive = (cycle + 1) % 3;
        let v = wait_for(c.node(alive), "kill", "leaders before a kill", full_isr);
        let victim = v[cycle % 3].0 as usize;
        std::thread::sleep(Duration::from_millis(300));
        c.kill(victim);
        let other = (victim + 1) % 3;
        wait_for(c.node(other), "kill", "a new leader", |v| {
            v[cycle % 3].0 >= 0 && v[cycle % 3].0 != victim as i32
        });
        std::thread::sleep(Duration::from_millis(300));
        c.restart(victim);
    }
    wait_for(c.node(0), "kill", "full ISR at the end", full_isr);
    let acked = producer.finish();
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().expect("watching consumer");
    let sent = acked.len();
    eprintln!(
        "{cycles} leader kills in {:?}; {sent} records acknowledged",
        started.elapsed()
    );
    let got = workload::consume(
        &c.node(1).client_config(),
        "kill",
        3,
        acked.len(),
        Duration::from_secs(120),
    );
    // Exactly once and in order, each where it was acknowledged.
    workload::verify(&acked, &got);
    // Nothing a consumer saw during the kills vanished or changed.
    assert!(
        !seen.is_empty(),
        "the watching consumer read records during the kills"
    );
    for &(p, offset, idx) in &seen {
        let now = got[&p].get(offset as usize).map(|r| r.idx());
        assert_eq!(
            now,
            Some(idx),
            "partition {p} offset {offset}: seen during the kills, then changed"
        );
    }
    eprintln!(
        "a consumer saw {} records during the kills; none vanished",
        seen.len()
    );
    let per_partition: BTreeMap<i32, usize> = got.iter().map(|(p, v)| (*p, v.len())).collect();
    eprintln!("records per partition: {per_partition:?}");
    assert_replicas_identical(&mut c, "kill", 3);
}

/// The broker FindCoordinator names for `group`, asked of broker `b`.
fn coordinator_of(b: &Broker, group: &str) -> i32 {
    use kafka_protocol::messages::{ApiKey, FindCoordinatorRequest, FindCoordinatorResponse};
    use kafka_protocol::protocol::StrBytes;
    let mut c = raw::Conn::new(&b.bootstrap());
    let r: FindCoordinatorResponse = c.call(
        ApiKey::FindCoordinator,
        3,
        &FindCoordinatorRequest::default().with_key(StrBytes::from_string(group.to_string())),
    );
    if r.error_code != 0 {
        return -1;
    }
    r.node_id.0
}

/// A consumer group keeps consuming, with commits, across kill -9 of the broker that
/// coordinated it: `__consumer_offsets` is replicated and the new leader of the group's
/// partition loads the group, so a later member resumes from the committed offsets.
#[test]
fn consumer_group_survives_the_loss_of_its_coordinator() {
    use rdkafka::consumer::CommitMode;
    use rdkafka::Message;
    let mut c = Cluster::start(3, FAST);
    admin::create(c.node(0), "grp", 3, 3, &[]).expect("create");
    wait_for(c.node(0), "grp", "full ISR", full_isr);
    let bootstrap = (0..3)
        .map(|i| c.node(i).bootstrap())
        .collect::<Vec<_>>()
        .join(",");
    let mut cfg = c.node(0).client_config();
    cfg.set("bootstrap.servers", &bootstrap);
    let acked = workload::produce(&cfg, "grp", 0..3_000, &[("acks", "all")]);
    assert_eq!(acked.len(), 3_000);

    let member = || -> BaseConsumer {
        let mut m = cfg.clone();
        m.set("group.id", "survivor")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("topic.metadata.refresh.interval.ms", "500");
        let c: BaseConsumer = m.create().expect("consumer");
        c.subscribe(&["grp"]).expect("subscribe");
        c
    };
    let mut seen = std::collections::BTreeSet::new();
    let consumer = member();
    let mut coordinator = -1;
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < 3_000 && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            use rdkafka::message::Headers;
            let idx: usize = m
                .headers()
                .and_then(|h| h.iter().find(|x| x.key == "idx"))
                .and_then(|x| std::str::from_utf8(x.value?).ok()?.parse().ok())
                .expect("idx header");
            seen.insert(idx);
            let _ = consumer.commit_message(&m, CommitMode::Sync);
        }
        if !killed && seen.len() >= 1_000 {
            coordinator = coordinator_of(c.node(0), "survivor");
            assert!(coordinator >= 0, "a coordinator");
            c.kill(coordinator as usize);
            killed = true;
        }
    }
    assert!(killed);
    assert_eq!(
        seen.len(),
        3_000,
        "every record consumed across the coordinator's loss"
    );
    let alive = (coordinator as usize + 1) % 3;
    let now = coordinator_of(c.node(alive), "survivor");
    assert!(now >= 0 && now != coordinator, "the group moved to {now}");
    drop(consumer);
    // A new member resumes from the committed offsets: nothing is left to read.
    let next = member();
    let mut again = 0;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        if let Some(Ok(_)) = next.poll(Duration::from_millis(100)) {
            again += 1;
        }
    }
    assert_eq!(
        again, 0,
        "committed offsets survived the coordinator's loss"
    );
    c.restart(coordinator as usize);
}

/// (leader, preferred replica) of each partition of `topic`, as broker `b`'s Metadata says.
fn preferred(b: &Broker, topic: &str) -> Option<Vec<(i32, i32)>> {
    topic_view(b, topic)?
        .into_iter()
        .map(|p| Some((p.leader, *p.replicas.first()?)))
        .collect()
}

/// Kills broker `victim` and restarts it once its leaderships moved and it is back in every
/// ISR.
fn bounce(c: &mut Cluster, victim: usize, topic: &str) {
    c.kill(victim);
    let other = (victim + 1) % 3;
    wait_for(
        c.node(other),
        topic,
        "leaders moved off the killed broker",
        |v| v.iter().all(|(l, _)| *l >= 0 && *l != victim as i32),
    );
    c.restart(victim);
    wait_for(
        c.node(other),
        topic,
        "the broker back in every ISR",
        full_isr,
    );
}

/// A 3-broker cluster with `setting`, an RF 3 topic of 6 partitions (with `records` produced
/// acks=all), and broker `victim` killed and back: its preferred partitions are led elsewhere.
fn cluster_after_a_bounce(
    setting: (&str, &str),
    topic: &str,
    records: usize,
    victim: usize,
) -> (Cluster, Vec<workload::Acked>) {
    let mut settings = FAST.to_vec();
    settings.push(setting);
    let mut c = Cluster::start(3, &settings);
    admin::create(c.node(0), topic, 6, 3, &[]).expect("create");
    wait_for(c.node(0), topic, "full ISR", full_isr);
    let cfg = c.node(0).client_config();
    let acked = workload::produce(&cfg, topic, 0..records, &[("acks", "all")]);
    bounce(&mut c, victim, topic);
    (c, acked)
}

/// Waits until every partition of `topic` is led by its preferred replica.
fn preferred_leaders_back(c: &Cluster, topic: &str) -> bool {
    eventually(Duration::from_secs(30), || {
        preferred(c.node(0), topic).is_some_and(|v| v.iter().all(|(l, p)| l == p))
    })
}

#[test]
fn elect_leaders_moves_leadership_back_to_preferred_replicas() {
    use kafka_protocol::messages::elect_leaders_request::TopicPartitions;
    use kafka_protocol::messages::{ApiKey, ElectLeadersRequest, ElectLeadersResponse};
    let (c, _) = cluster_after_a_bounce(("auto.leader.rebalance.enable", "false"), "pref", 0, 1);
    let v = preferred(c.node(0), "pref").expect("metadata");
    let moved: Vec<i32> = (0..6).filter(|&i| v[i as usize].1 == 1).collect();
    assert_eq!(moved.len(), 2, "broker 1 prefers two partitions: {v:?}");
    assert!(
        moved.iter().all(|&i| v[i as usize].0 != 1),
        "and leads none now: {v:?}"
    );

    // One named partition: elected; one already led by its preferred replica: not needed.
    let led_ok = (0..6).find(|&i| v[i as usize].1 != 1).unwrap();
    let mut conn = raw::Conn::new(&c.node(2).bootstrap());
    let req = ElectLeadersRequest::default()
        .with_election_type(0)
        .with_timeout_ms(30_000)
        .with_topic_partitions(Some(vec![TopicPartitions::default()
            .with_topic(kafka_protocol::messages::TopicName(
                kafka_protocol::protocol::StrBytes::from_static_str("pref"),
            ))
            .with_partitions(vec![moved[0], led_ok, 99])]));
    let r: ElectLeadersResponse = conn.call(ApiKey::ElectLeaders, 2, &req);
    let codes: Vec<(i32, i16)> = r.replica_election_results[0]
        .partition_result
        .iter()
        .map(|p| (p.partition_id, p.error_code))
        .collect();
    assert_eq!(codes, vec![(moved[0], 0), (led_ok, 84), (99, 3)]);
    // No partitions named: every partition whose preferred replica does not lead.
    let r: ElectLeadersResponse = conn.call(
        ApiKey::ElectLeaders,
        2,
        &ElectLeadersRequest::default()
            .with_timeout_ms(30_000)
            .with_topic_partitions(None),
    );
    let elected: Vec<(i32, i16)> = r
        .replica_election_results
        .iter()
        .flat_map(|t| {
            t.partition_result
                .iter()
                .map(|p| (p.partition_id, p.error_code))
        })
        .collect();
    assert!(
        !elected.is_empty() && elected.iter().all(|&(_, code)| code == 0),
        "{elected:?}"
    );
    assert!(
        preferred_leaders_back(&c, "pref"),
        "every partition led by its preferred replica"
    );
}

#[test]
fn auto_leader_rebalance_restores_preferred_leaders_and_hw_survives_restart() {
    let (c, acked) = cluster_after_a_bounce(
        ("leader.imbalance.check.interval.seconds", "1"),
        "auto",
        600,
        2,
    );
    assert!(
        preferred_leaders_back(&c, "auto"),
        "leaderships went back to preferred replicas: {:?}",
        preferred(c.node(0), "auto")
    );
    // Every replica checkpoints its HW (every 5 s): a restarted replica starts from it.
    std::thread::sleep(Duration::from_secs(6));
    for i in 0..3 {
        let dir = c.node(i).data_dir();
        let text = std::fs::read_to_string(dir.join("replication-offset-checkpoint-0"))
            .expect("HW checkpoint");
        assert!(text.starts_with("0\n"), "{text}");
        let total: i64 = text
            .lines()
            .filter(|l| l.starts_with("auto "))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
            .sum();
        assert_eq!(
            total, 600,
            "broker {i}'s checkpointed HWs of `auto`: {text}"
        );
    }
    let got = workload::consume(
        &c.node(1).client_config(),
        "auto",
        6,
        600,
        Duration::from_secs(60),
    );
    workload::verify(&acked, &got);
}
