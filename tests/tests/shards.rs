//! Requests for partitions owned by different shards are served by their owners: the shard
//! table in the metadata file says who owns what, and each shard reports at shutdown which
//! partitions it appended to and served fetches for, and how many operations it received from
//! other shards.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::producer::{BaseRecord, Producer};
use weir_tests::workload::{self, consume};
use weir_tests::{admin, Broker};

/// Parses `shard=N produced=[t-0:3,t-2:1] fetched=[...] remote_in=X remote_out=Y`.
fn stats(log: &str) -> BTreeMap<usize, (Vec<String>, Vec<String>, u64)> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let Some(at) = line.find("shard=") else {
            continue;
        };
        let rest = &line[at..];
        if !rest.contains("produced=[") {
            continue;
        }
        let field = |name: &str| -> String {
            let start = rest.find(&format!("{name}=")).unwrap() + name.len() + 1;
            rest[start..]
                .split(' ')
                .next()
                .unwrap()
                .trim_matches(|c| c == '[' || c == ']')
                .to_string()
        };
        let list = |s: String| {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(|x| x.split(':').next().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let shard: usize = field("shard").parse().unwrap();
        out.insert(
            shard,
            (
                list(field("produced")),
                list(field("fetched")),
                field("remote_in").parse().unwrap(),
            ),
        );
    }
    out
}

#[test]
fn partitions_are_served_by_their_owner_shards() {
    let mut b = Broker::start(2);
    admin::create(&b, "owned", 4, 1, &[]).unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.data_dir().join("weir-metadata.json")).unwrap())
            .unwrap();
    let owners: Vec<usize> = meta["topics"]["owned"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["shard"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(owners.len(), 4);
    assert!(
        owners.contains(&0) && owners.contains(&1),
        "the shard table spreads partitions: {owners:?}"
    );

    // One producer connection lands on one shard; it writes to all four partitions.
    let mut cfg = b.client_config();
    cfg.set("acks", "all").set("linger.ms", "5");
    let (p, acks) = workload::producer(&cfg);
    for i in 0..400usize {
        let v = workload::value(i);
        p.send(
            BaseRecord::<(), _, _>::with_opaque_to("owned", Box::new(i))
                .partition((i % 4) as i32)
                .payload(&v),
        )
        .unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
    assert_eq!(acks.acked.lock().unwrap().len(), 400);
    let got = consume(&b.client_config(), "owned", 4, 400, Duration::from_secs(30));
    assert_eq!(got.values().map(|v| v.len()).sum::<usize>(), 400);

    assert!(b.stop());
    let st = stats(&b.log());
    assert_eq!(st.len(), 2, "both shards reported:\n{}", b.log());
    for (partition, owner) in owners.iter().enumerate() {
        let name = format!("owned-{partition}");
        for (shard, (produced, fetched, _)) in &st {
            assert_eq!(
                produced.contains(&name),
                shard == owner,
                "{name} appended on shard {shard}, owner {owner}"
            );
            assert_eq!(
                fetched.contains(&name),
                shard == owner,
                "{name} fetched on shard {shard}, owner {owner}"
            );
        }
    }
    // Whichever shard held the connections, the other received its share as cross-shard work.
    assert!(
        st.values().any(|(_, _, remote_in)| *remote_in > 0),
        "cross-shard hand-off happened"
    );
}
