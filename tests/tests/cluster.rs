//! Three broker processes on loopback form a cluster (issue #11): a Raft controller quorum
//! among them, registrations and heartbeats, Kafka's replica assignment, metadata from any
//! broker, forwarding to the active controller, fencing, controller failover and a full
//! restart. Real clients: librdkafka (rdkafka), raw requests, and the Java client.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kafka_protocol::messages::{ApiKey, DescribeClusterRequest, DescribeClusterResponse};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use weir_tests::{admin, eventually, raw, workload, Broker, Cluster};

/// What one broker's Metadata says.
#[derive(Debug, Default, Clone, PartialEq)]
struct View {
    brokers: BTreeSet<i32>,
    /// topic -> partition -> (leader, replicas, isr)
    topics: BTreeMap<String, Vec<(i32, Vec<i32>, Vec<i32>)>>,
}

fn view_of(b: &Broker) -> Option<View> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", "metadata-probe")
        .create()
        .ok()?;
    let m = c.fetch_metadata(None, Duration::from_secs(5)).ok()?;
    let mut v = View {
        brokers: m.brokers().iter().map(|b| b.id()).collect(),
        ..View::default()
    };
    for t in m.topics() {
        if t.name().starts_with("__") {
            continue;
        }
        let mut parts: Vec<_> = t
            .partitions()
            .iter()
            .map(|p| {
                (
                    p.id(),
                    (p.leader(), p.replicas().to_vec(), p.isr().to_vec()),
                )
            })
            .collect();
        parts.sort_by_key(|(id, _)| *id);
        v.topics.insert(
            t.name().to_string(),
            parts.into_iter().map(|(_, x)| x).collect(),
        );
    }
    Some(v)
}

/// The active controller as DescribeCluster from broker `b` names it.
fn controller_of(b: &Broker) -> i32 {
    let mut c = raw::Conn::new(&b.bootstrap());
    let r: DescribeClusterResponse = c.call(
        ApiKey::DescribeCluster,
        0,
        &DescribeClusterRequest::default(),
    );
    assert_eq!(r.error_code, 0);
    r.controller_id.0
}

/// Waits until every running broker's Metadata agrees and satisfies `ok`.
fn converge(c: &Cluster, nodes: &[usize], what: &str, ok: impl Fn(&View) -> bool) -> View {
    let mut last = Vec::new();
    let done = eventually(Duration::from_secs(30), || {
        last = nodes.iter().map(|&i| view_of(c.node(i))).collect();
        last.iter().all(|v| v.as_ref().is_some_and(&ok)) && last.windows(2).all(|w| w[0] == w[1])
    });
    assert!(done, "{what}: brokers never agreed: {last:#?}");
    last[0].clone().expect("checked above")
}

#[test]
fn three_brokers_assign_replicas_as_kafka_and_refuse_rf_above_brokers() {
    let c = Cluster::start(3, &[]);
    converge(&c, &[0, 1, 2], "three brokers", |v| v.brokers.len() == 3);
    let controller = controller_of(c.node(0));
    assert!((0..3).contains(&controller), "controller {controller}");
    for i in 1..3 {
        assert_eq!(
            controller_of(c.node(i)),
            controller,
            "every broker names the same controller"
        );
    }

    // Asked of a broker that is (probably) not the controller: forwarded.
    let asked = c.node((controller as usize + 1) % 3);
    for rf in 1..=3 {
        admin::create(asked, &format!("rf{rf}"), 6, rf, &[]).expect("create");
    }
    assert_eq!(
        admin::create(asked, "rf4", 1, 4, &[]),
        Err(RDKafkaErrorCode::InvalidReplicationFactor)
    );
    let v = converge(&c, &[0, 1, 2], "topics", |v| v.topics.len() == 3);
    for rf in 1..=3usize {
        let parts = &v.topics[&format!("rf{rf}")];
        assert_eq!(parts.len(), 6);
        let mut leaders = BTreeMap::new();
        for (leader, replicas, isr) in parts {
            assert_eq!(replicas.len(), rf, "rf{rf}: {parts:?}");
            assert_eq!(
                replicas.iter().collect::<BTreeSet<_>>().len(),
                rf,
                "distinct replicas"
            );
            assert_eq!(*leader, replicas[0], "the first replica leads");
            assert_eq!(isr, replicas);
            *leaders.entry(*leader).or_insert(0) += 1;
        }
        // Kafka's algorithm: leaders round robin over the brokers from a random start.
        assert_eq!(leaders.len(), 3, "rf{rf} leaders spread: {parts:?}");
        assert!(
            leaders.values().all(|&n| n == 2),
            "rf{rf} leaders even: {leaders:?}"
        );
        for (i, (leader, ..)) in parts.iter().enumerate().skip(1) {
            assert_eq!(*leader, (parts[i - 1].0 + 1) % 3, "round robin: {parts:?}");
        }
    }
    assert!(!v.topics.contains_key("rf4"));
}

#[test]
fn clients_produce_and_consume_across_brokers() {
    let c = Cluster::start(3, &[]);
    converge(&c, &[0, 1, 2], "three brokers", |v| v.brokers.len() == 3);
    admin::create(c.node(0), "spread", 6, 1, &[]).expect("create");
    converge(&c, &[0, 1, 2], "topic", |v| v.topics.contains_key("spread"));
    let cfg = c.node(2).client_config();
    let acked = workload::produce(&cfg, "spread", 0..3_000, &[("acks", "all")]);
    let got = workload::consume(&cfg, "spread", 6, acked.len(), Duration::from_secs(60));
    workload::verify(&acked, &got);

    // A produce sent straight to a broker that does not lead the partition is refused.
    let v = view_of(c.node(0)).unwrap();
    let (leader, ..) = v.topics["spread"][0];
    let other = c.node(((leader + 1) % 3) as usize);
    let mut conn = raw::Conn::new(&other.bootstrap());
    let (code, _) = conn.produce("spread", 0, -1, -1, -1, 1);
    assert_eq!(code, 6, "NOT_LEADER_OR_FOLLOWER");
}

#[test]
fn stopped_broker_is_fenced_and_killed_controller_is_replaced() {
    let mut c = Cluster::start(3, &[]);
    converge(&c, &[0, 1, 2], "three brokers", |v| v.brokers.len() == 3);
    admin::create(c.node(0), "before", 3, 1, &[]).expect("create");
    converge(&c, &[0, 1, 2], "topic", |v| v.topics.contains_key("before"));

    // A broker that dies is fenced within the session timeout: gone from Metadata, and its
    // partition (RF 1) has no leader.
    let controller = controller_of(c.node(0)) as usize;
    let victim = (controller + 1) % 3;
    c.kill(victim);
    let alive: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let v = converge(&c, &alive, "fenced", |v| {
        !v.brokers.contains(&(victim as i32))
    });
    for (leader, replicas, _) in &v.topics["before"] {
        if replicas == &[victim as i32] {
            assert_eq!(*leader, -1, "the fenced broker's partition has no leader");
        }
    }
    c.restart(victim);
    converge(&c, &[0, 1, 2], "back", |v| {
        v.brokers.len() == 3 && v.topics["before"].iter().all(|(l, ..)| *l >= 0)
    });

    // kill -9 the active controller: another voter takes over and changes work again.
    c.kill(controller);
    let alive: Vec<usize> = (0..3).filter(|&i| i != controller).collect();
    let mut new_controller = -1;
    assert!(
        eventually(Duration::from_secs(20), || {
            new_controller = controller_of(c.node(alive[0]));
            new_controller >= 0 && new_controller != controller as i32
        }),
        "no new controller"
    );
    assert!(eventually(Duration::from_secs(20), || admin::create(
        c.node(alive[1]),
        "after",
        3,
        2,
        &[]
    )
    .is_ok()));
    converge(&c, &alive, "after failover", |v| {
        v.topics.contains_key("after")
    });
    // The old controller comes back and catches up.
    c.restart(controller);
    let v = converge(&c, &[0, 1, 2], "caught up", |v| {
        v.brokers.len() == 3 && v.topics.contains_key("after")
    });
    assert_eq!(v.topics["after"].len(), 3);
}

#[test]
fn whole_cluster_restart_keeps_metadata_and_records() {
    let mut c = Cluster::start(3, &[]);
    converge(&c, &[0, 1, 2], "three brokers", |v| v.brokers.len() == 3);
    admin::create(c.node(1), "kept", 3, 1, &[]).expect("create");
    admin::create(c.node(1), "kept3", 2, 3, &[]).expect("create");
    let before = converge(&c, &[0, 1, 2], "topics", |v| v.topics.len() == 2);
    let cfg = c.node(0).client_config();
    let acked = workload::produce(&cfg, "kept", 0..1_000, &[("acks", "all")]);
    for i in 0..3 {
        assert!(c.stop(i), "node {i} stops cleanly:\n{}", c.logs());
    }
    c.restart_all();
    let after = converge(&c, &[0, 1, 2], "restarted", |v| {
        v.brokers.len() == 3
            && v.topics.len() == 2
            && v.topics["kept"].iter().all(|(l, ..)| *l >= 0)
    });
    for t in ["kept", "kept3"] {
        let replicas = |v: &View| v.topics[t].iter().map(|p| p.1.clone()).collect::<Vec<_>>();
        assert_eq!(
            replicas(&after),
            replicas(&before),
            "{t}: same replicas after restart"
        );
    }
    let got = workload::consume(
        &c.node(2).client_config(),
        "kept",
        3,
        acked.len(),
        Duration::from_secs(60),
    );
    let n: usize = got.values().map(|v| v.len()).sum();
    assert_eq!(
        n,
        acked.len(),
        "records read back after the restart:\n{}",
        c.logs()
    );
    workload::verify(&acked, &got);
}

/// Kafka's other layouts: a controller-only voter (no Kafka listener) and a broker-only node
/// (not a voter: it learns the metadata from the active controller). Clients never see the
/// controller-only node as a broker, and Metadata names a reachable broker as the controller.
#[test]
fn controller_only_and_broker_only_nodes() {
    let c = Cluster::start_roles(
        &[
            "broker,controller",
            "broker,controller",
            "controller",
            "broker",
        ],
        &[],
    );
    let v = converge(&c, &[0, 1, 3], "three brokers", |v| v.brokers.len() == 3);
    assert_eq!(v.brokers, BTreeSet::from([0, 1, 3]));
    for i in [0, 1, 3] {
        assert!(
            v.brokers.contains(&controller_of(c.node(i))),
            "a reachable controller"
        );
    }
    // Created through the broker-only node, spread over all three brokers.
    admin::create(c.node(3), "mixed", 3, 3, &[]).expect("create");
    let v = converge(&c, &[0, 1, 3], "topic", |v| v.topics.contains_key("mixed"));
    for (_, replicas, _) in &v.topics["mixed"] {
        assert_eq!(
            replicas.iter().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([0, 1, 3])
        );
    }
}
