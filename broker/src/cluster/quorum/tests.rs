//! Three real voters on loopback TCP ports with their logs in temp dirs.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::*;
use MetadataRecord::*;

const DEADLINE: Duration = Duration::from_secs(15);

fn free_voters(ids: &[NodeId]) -> BTreeMap<NodeId, SocketAddr> {
    let listeners: Vec<_> = ids
        .iter()
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ids.iter()
        .zip(&listeners)
        .map(|(&id, l)| (id, l.local_addr().unwrap()))
        .collect()
}

fn start(id: NodeId, voters: &BTreeMap<NodeId, SocketAddr>, root: &Path) -> Quorum {
    let mut cfg = QuorumConfig::new(
        id,
        voters.clone(),
        root.join(format!("n{id}")).join(METADATA_DIR),
    );
    // Small, so the test takes snapshots, purges logs and sends a snapshot to a lagging voter.
    cfg.snapshot_every_entries = 8;
    cfg.entries_kept_after_snapshot = 2;
    Quorum::start(cfg).unwrap()
}

fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < DEADLINE, "no {what} within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The leader every running voter names, if they agree and it is one of them.
fn agreed_leader(nodes: &BTreeMap<NodeId, Quorum>) -> Option<NodeId> {
    let leaders: Vec<_> = nodes.values().map(|q| q.handle().status().leader).collect();
    let first = leaders[0]?;
    (leaders.iter().all(|l| *l == Some(first)) && nodes.contains_key(&first)).then_some(first)
}

fn submit(q: &Quorum, records: Vec<MetadataRecord>) -> Result<Committed, SubmitError> {
    futures::executor::block_on(q.handle().submit(records))
}

/// Waits until every voter applied at least `index`, then asserts their images are equal.
fn converged(nodes: &BTreeMap<NodeId, Quorum>, index: u64) -> Arc<ClusterImage> {
    wait_until(&format!("convergence at index {index}"), || {
        let images: Vec<_> = nodes.values().map(|q| q.handle().image()).collect();
        let v = images[0].version;
        (v >= index && images.iter().all(|i| i.version == v)).then(|| {
            for i in &images {
                assert_eq!(**i, *images[0], "voters applied the same log differently");
            }
            images[0].clone()
        })
    })
}

fn register(id: BrokerId) -> MetadataRecord {
    RegisterBroker {
        node_id: id,
        host: "127.0.0.1".into(),
        port: 9090 + id as u16,
        rack: Some(format!("r{}", id % 2)),
        incarnation: Uuid::new_v4(),
    }
}

/// Same metadata, whatever entry index it was reached at.
fn same_metadata(a: &ClusterImage, b: &ClusterImage) -> bool {
    a.brokers == b.brokers
        && a.topics == b.topics
        && a.producer_id_block_end == b.producer_id_block_end
}

#[test]
fn three_voters_replicate_fail_over_catch_up_and_restart() {
    let root = tempfile::tempdir().unwrap();
    let ids = [1, 2, 3];
    let voters = free_voters(&ids);
    let t0 = Instant::now();
    let mut nodes: BTreeMap<NodeId, Quorum> = ids
        .iter()
        .map(|&id| (id, start(id, &voters, root.path())))
        .collect();
    let leader = wait_until("leader", || agreed_leader(&nodes));
    eprintln!("leader {leader} elected after {:?}", t0.elapsed());

    // A follower is not the active controller and says who is.
    let follower = *ids.iter().find(|&&i| i != leader).unwrap();
    match submit(&nodes[&follower], vec![register(9)]) {
        Err(SubmitError::NotLeader {
            leader: Some(l),
            leader_addr: Some(addr),
        }) => {
            assert_eq!(l, leader);
            assert_eq!(addr, voters[&leader].to_string());
        }
        other => panic!("a follower accepted a write: {other:?}"),
    }

    // A frame longer than the limit closes the connection; the voter carries on.
    let mut raw = TcpStream::connect(voters[&follower]).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert_eq!(
        raw.read(&mut [0u8; 16]).unwrap_or(0),
        0,
        "an oversized frame must close the connection"
    );

    // Records submitted to the leader commit and apply identically on all three.
    let l = &nodes[&leader];
    submit(l, vec![register(1), register(2), register(3)]).unwrap();
    let epoch = l.handle().image().brokers[&1].epoch;
    submit(l, vec![UnfenceBroker { node_id: 1, epoch }]).unwrap();
    let topic = Uuid::new_v4();
    submit(
        l,
        vec![CreateTopic {
            name: "orders".into(),
            id: topic,
            partitions: vec![vec![1, 2, 3], vec![2, 3, 1]],
            configs: BTreeMap::from([("retention.ms".to_string(), "60000".to_string())]),
        }],
    )
    .unwrap();
    submit(
        l,
        vec![PartitionChange {
            name: "orders".into(),
            id: topic,
            partition: 1,
            leader: 3,
            leader_epoch: 1,
            isr: vec![3, 1],
            partition_epoch: 1,
        }],
    )
    .unwrap();
    submit(
        l,
        vec![TopicConfig {
            name: "orders".into(),
            key: "cleanup.policy".into(),
            value: Some("compact".into()),
        }],
    )
    .unwrap();
    let last = submit(
        l,
        vec![ProducerIdBlock {
            node_id: 1,
            end: 1000,
        }],
    )
    .unwrap();
    // A batch that does not apply is committed but changes nothing, on every voter.
    let before = l.handle().image();
    match submit(
        l,
        vec![FenceBroker {
            node_id: 2,
            epoch: 1,
        }],
    ) {
        Err(SubmitError::Rejected { log_index, reason }) => {
            assert!(log_index > last.log_index);
            assert!(reason.contains("epoch"), "{reason}");
        }
        other => panic!("a stale fence applied: {other:?}"),
    }
    let image = converged(&nodes, last.log_index + 1);
    assert!(same_metadata(&image, &before));
    assert!(!image.brokers[&1].fenced && image.brokers[&2].fenced);
    let p1 = &image.topics["orders"].partitions[1];
    assert_eq!((p1.leader, p1.leader_epoch, &p1.isr), (3, 1, &vec![3, 1]));
    assert_eq!(image.topics["orders"].configs["cleanup.policy"], "compact");
    assert_eq!(image.producer_id_block_end, 1000);

    // Stop the leader: the other two elect a new one within the liveness bound.
    let stopped = leader;
    let stopped_last = nodes[&stopped].handle().status().last_log_index.unwrap();
    let t = Instant::now();
    nodes.remove(&stopped).unwrap().shutdown();
    let leader = wait_until("new leader", || agreed_leader(&nodes));
    let failover = t.elapsed();
    eprintln!("leader {stopped} stopped; {leader} leads after {failover:?}");
    assert_ne!(leader, stopped);

    // Further records commit with two of three voters, until the leader has taken a snapshot
    // and purged the entries the stopped voter lacks. openraft postpones a purge while its
    // replication to the stopped voter holds those entries in flight, so how many batches that
    // takes varies (bounded here).
    let mut end = 1000;
    let mut last = 0;
    let mut batches = 0;
    while batches < 400 {
        end += 1000;
        batches += 1;
        last = submit(&nodes[&leader], vec![ProducerIdBlock { node_id: 2, end }])
            .unwrap()
            .log_index;
        let purged = nodes[&leader].handle().status().purged;
        if batches >= 24 && purged.is_some_and(|p| p > stopped_last) {
            break;
        }
    }
    let image = converged(&nodes, last);
    assert_eq!(image.producer_id_block_end, end);
    let status = nodes[&leader].handle().status();
    eprintln!("{batches} batches committed by two voters; leader {status:?}");
    assert!(
        status.purged.is_some_and(|p| p > stopped_last),
        "the leader still has the entries the stopped voter lacks (up to {stopped_last}): {status:?}"
    );

    // The stopped voter comes back from its directory and catches up (by snapshot: the leader
    // purged the entries it missed).
    let t = Instant::now();
    nodes.insert(stopped, start(stopped, &voters, root.path()));
    let image = converged(&nodes, last);
    eprintln!("voter {stopped} caught up after {:?}", t.elapsed());
    assert_eq!(image.producer_id_block_end, end);
    let caught_up = nodes[&stopped].handle().status();
    assert!(
        caught_up.snapshot.is_some_and(|s| s > stopped_last),
        "voter {stopped} did not install the leader's snapshot: {caught_up:?}"
    );

    // Restart all three: the committed image comes back from snapshot + log.
    let before = image;
    for (_, q) in std::mem::take(&mut nodes) {
        q.shutdown();
    }
    let t = Instant::now();
    nodes = ids
        .iter()
        .map(|&id| (id, start(id, &voters, root.path())))
        .collect();
    for q in nodes.values() {
        // Before any election: the snapshot is loaded, nothing replays from entry 1.
        let (image, status) = (q.handle().image(), q.handle().status());
        assert!(
            image.version > 0 && !image.topics.is_empty(),
            "voter {} starts empty",
            q.handle().node_id()
        );
        assert!(status.snapshot.is_some_and(|s| s <= image.version));
    }
    let leader = wait_until("leader after restart", || agreed_leader(&nodes));
    let image = converged(&nodes, before.version);
    eprintln!(
        "all three restarted; {leader} leads after {:?}",
        t.elapsed()
    );
    assert!(
        same_metadata(&image, &before),
        "metadata changed across a full restart"
    );
    let c = submit(
        &nodes[&leader],
        vec![ProducerIdBlock {
            node_id: 3,
            end: end + 1000,
        }],
    )
    .unwrap();
    assert_eq!(
        converged(&nodes, c.log_index).producer_id_block_end,
        end + 1000
    );
    eprintln!("whole scenario took {:?}", t0.elapsed());
}

/// One voter (a broker with no quorum configured: the embedded one-node quorum) leads at once,
/// commits alone, and finds its image again after a restart.
#[test]
fn a_single_voter_commits_alone_and_restarts() {
    let root = tempfile::tempdir().unwrap();
    let voters = free_voters(&[0]);
    let q = start(0, &voters, root.path());
    wait_until("single leader", || {
        q.handle().status().is_leader().then_some(())
    });
    let mut last = 0;
    for i in 1..=12 {
        last = submit(
            &q,
            vec![ProducerIdBlock {
                node_id: 0,
                end: i * 1000,
            }],
        )
        .unwrap()
        .log_index;
    }
    assert_eq!(q.handle().image().version, last);
    q.shutdown();
    let q = start(0, &voters, root.path());
    assert_eq!(
        q.handle().image().producer_id_block_end,
        12_000,
        "the snapshot + log did not come back"
    );
    wait_until("single leader after restart", || {
        q.handle().status().is_leader().then_some(())
    });
    let c = submit(
        &q,
        vec![ProducerIdBlock {
            node_id: 0,
            end: 13_000,
        }],
    )
    .unwrap();
    assert!(c.log_index > last);
}
