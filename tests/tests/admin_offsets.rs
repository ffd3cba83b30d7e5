//! Topic administration and ListOffsets through librdkafka against a real broker process.

use std::time::Duration;

use rdkafka::admin::{OwnedResourceSpecifier, ResourceSpecifier};
use rdkafka::consumer::Consumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use weir_tests::workload::{self, base_timestamp_ms, consume, produce};
use weir_tests::{admin, eventually, Broker};

const T: Duration = Duration::from_secs(20);

#[test]
fn create_alter_delete_topics_with_kafka_errors() {
    let b = Broker::start(2);
    assert_eq!(
        admin::create(&b, "orders", 3, 1, &[("retention.ms", "1234567")]),
        Ok(())
    );
    assert_eq!(
        admin::create(&b, "orders", 3, 1, &[]),
        Err(RDKafkaErrorCode::TopicAlreadyExists)
    );
    assert_eq!(
        admin::create(&b, "bad name!", 1, 1, &[]),
        Err(RDKafkaErrorCode::InvalidTopic)
    );
    assert_eq!(
        admin::create(&b, &"x".repeat(250), 1, 1, &[]),
        Err(RDKafkaErrorCode::InvalidTopic)
    );
    assert_eq!(
        admin::create(&b, "zero", 0, 1, &[]),
        Err(RDKafkaErrorCode::InvalidPartitions)
    );
    assert_eq!(
        admin::create(&b, "three-replicas", 1, 3, &[]),
        Err(RDKafkaErrorCode::InvalidReplicationFactor)
    );
    assert_eq!(
        admin::create(&b, "bad-config", 1, 1, &[("no.such.config", "1")]),
        Err(RDKafkaErrorCode::InvalidConfig)
    );
    assert_eq!(
        admin::create(&b, "shredded", 1, 1, &[("cleanup.policy", "shred")]),
        Err(RDKafkaErrorCode::InvalidConfig)
    );
    assert_eq!(
        admin::create(&b, "compacted", 1, 1, &[("cleanup.policy", "compact")]),
        Ok(())
    );

    // DescribeConfigs: the override and the defaults.
    let a = admin::client(&b);
    let res = futures::executor::block_on(
        a.describe_configs([&ResourceSpecifier::Topic("orders")], &admin::opts()),
    )
    .unwrap();
    let res = res.into_iter().next().unwrap().unwrap();
    assert_eq!(
        res.specifier,
        OwnedResourceSpecifier::Topic("orders".into())
    );
    let m = res.entry_map();
    assert_eq!(m["retention.ms"].value.as_deref(), Some("1234567"));
    assert_eq!(m["cleanup.policy"].value.as_deref(), Some("delete"));
    assert!(m["retention.ms"].source == rdkafka::admin::ConfigSource::DynamicTopic);
    let unknown = futures::executor::block_on(
        a.describe_configs([&ResourceSpecifier::Topic("nope")], &admin::opts()),
    )
    .unwrap();
    // rust-rdkafka drops per-resource error codes; the raw protocol test checks the code.
    assert!(unknown
        .into_iter()
        .next()
        .unwrap()
        .is_ok_and(|r| r.entries.is_empty()));

    // CreatePartitions only increases.
    assert_eq!(admin::add_partitions(&b, "orders", 5), Ok(()));
    assert_eq!(
        admin::add_partitions(&b, "orders", 2),
        Err(RDKafkaErrorCode::InvalidPartitions)
    );
    assert_eq!(
        admin::add_partitions(&b, "orders", 5),
        Err(RDKafkaErrorCode::InvalidPartitions)
    );
    assert_eq!(
        admin::add_partitions(&b, "missing", 5),
        Err(RDKafkaErrorCode::UnknownTopicOrPartition)
    );
    let c = workload::consumer(&b.client_config());
    let md = c.fetch_metadata(Some("orders"), T).unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 5);
    // The new partition takes writes.
    let acked = produce(&b.client_config(), "orders", 0..200, &[("acks", "all")]);
    assert!(acked.iter().any(|a| a.partition == 4));

    // DeleteTopics removes the data; the name can be reused and starts empty.
    assert!(b.data_dir().join("orders-4").exists());
    assert_eq!(admin::delete(&b, "orders"), Ok(()));
    assert!(
        !b.data_dir().join("orders-0").exists(),
        "partition data deleted"
    );
    assert!(!b.data_dir().join("orders-4").exists());
    assert_eq!(
        admin::delete(&b, "orders"),
        Err(RDKafkaErrorCode::UnknownTopicOrPartition)
    );
    assert_eq!(admin::create(&b, "orders", 1, 1, &[]), Ok(()));
    assert_eq!(c.fetch_watermarks("orders", 0, T).unwrap(), (0, 0));

    // Topics survive a restart; deleted ones stay deleted.
    let mut b = b;
    assert!(b.stop(), "clean stop");
    b.restart();
    let c = workload::consumer(&b.client_config());
    let md = c.fetch_metadata(None, T).unwrap();
    // Internal topics (__consumer_offsets) are listed too, as Kafka does; clients filter them.
    let names: Vec<&str> = md
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|n| !n.starts_with("__"))
        .collect();
    assert_eq!(names, vec!["compacted", "orders"]);
    let orders = md.topics().iter().find(|t| t.name() == "orders").unwrap();
    assert_eq!(orders.partitions().len(), 1);
}

fn offset_for_time(c: &rdkafka::consumer::BaseConsumer, topic: &str, ts: i64) -> Offset {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(ts))
        .unwrap();
    let r = c.offsets_for_times(tpl, T).unwrap();
    r.find_partition(topic, 0).unwrap().offset()
}

#[test]
fn list_offsets_earliest_latest_and_by_timestamp() {
    let mut b = Broker::start(2);
    // Small segments and index interval so lookups cross segments and index entries.
    admin::create(
        &b,
        "times",
        1,
        1,
        &[("segment.bytes", "20000"), ("index.interval.bytes", "1000")],
    )
    .unwrap();
    produce(
        &b.client_config(),
        "times",
        0..3000,
        &[
            ("acks", "all"),
            ("linger.ms", "1"),
            ("batch.num.messages", "50"),
        ],
    );
    for round in 0..2 {
        let c = workload::consumer(&b.client_config());
        assert_eq!(
            c.fetch_watermarks("times", 0, T).unwrap(),
            (0, 3000),
            "round {round}"
        );
        // Record i has timestamp BASE + i: the first offset at or after BASE + i is i.
        for i in [0usize, 1, 49, 50, 51, 777, 1500, 2999] {
            assert_eq!(
                offset_for_time(&c, "times", base_timestamp_ms() + i as i64),
                Offset::Offset(i as i64),
                "ts of {i}, round {round}"
            );
        }
        assert_eq!(offset_for_time(&c, "times", 0), Offset::Offset(0));
        assert_eq!(
            offset_for_time(&c, "times", base_timestamp_ms() + 10_000),
            Offset::End
        );
        // Round two reads from disk only: the cache is empty after a restart.
        assert!(b.stop());
        b.restart();
    }
    let segments = b.segment_count("times-0");
    assert!(segments > 5, "lookups crossed {segments} segments");
}

#[test]
fn retention_deletes_whole_old_segments() {
    let conf = tempfile::tempdir().unwrap();
    let path = conf.path().join("server.properties");
    std::fs::write(&path, "log.retention.check.interval.ms=200\n").unwrap();
    let b = Broker::start_with(1, &["--config", path.to_str().unwrap()]);
    // Size-based retention only: time-based would also apply to old timestamps.
    admin::create(
        &b,
        "short",
        1,
        1,
        &[
            ("segment.bytes", "10000"),
            ("retention.bytes", "30000"),
            ("retention.ms", "-1"),
        ],
    )
    .unwrap();
    produce(
        &b.client_config(),
        "short",
        0..3000,
        &[
            ("acks", "all"),
            ("linger.ms", "1"),
            ("batch.num.messages", "20"),
        ],
    );
    let c = workload::consumer(&b.client_config());
    // Sizes of the .log files, oldest first (file names are the zero-padded base offsets).
    let log_sizes = || -> Vec<u64> {
        let mut files: Vec<_> = std::fs::read_dir(b.data_dir().join("short-0"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .collect()
    };
    // Kafka's rule: the oldest segment goes while the log without it still holds at least
    // retention.bytes. So once retention has run, the sealed segments without the oldest
    // hold less than retention.bytes (the active segment's file is preallocated, so its
    // length says nothing about its data). Deleting nothing leaves ~10 full segments.
    let retained = || {
        let sizes = log_sizes();
        let sealed = &sizes[..sizes.len().saturating_sub(1)];
        sealed.iter().sum::<u64>() - sealed.first().copied().unwrap_or(0) < 30_000
    };
    assert!(
        eventually(Duration::from_secs(20), retained),
        "retained segments {:?}",
        log_sizes()
    );
    // The broker also counts the active segment's data, which the file sizes above do not
    // show, so one more pass may still drop a segment: read once the log start has held still
    // for 1 s (five retention checks; nothing is produced any more).
    let mut last = (-1, -1);
    let mut still_since = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(20), || {
            let now = c.fetch_watermarks("short", 0, T).unwrap();
            if now != last {
                last = now;
                still_since = std::time::Instant::now();
            }
            still_since.elapsed() >= Duration::from_secs(1)
        }),
        "the log start kept moving: {last:?}"
    );
    let (low, high) = last;
    assert!(low > 0, "log start advanced");
    assert_eq!(high, 3000);
    // Reading from the beginning starts at the new log start and still ends at the end.
    let got = consume(
        &b.client_config(),
        "short",
        1,
        (high - low) as usize,
        Duration::from_secs(30),
    );
    let recs = &got[&0];
    assert_eq!(recs.len() as i64, high - low);
    assert_eq!(recs[0].offset, low);
    recs.iter().for_each(|r| r.check());
}

#[test]
fn log_append_time_auto_create_and_time_based_roll() {
    let b = Broker::start(2);
    // LogAppendTime: the broker's clock replaces the producer's timestamps.
    admin::create(
        &b,
        "appended",
        1,
        1,
        &[("message.timestamp.type", "LogAppendTime")],
    )
    .unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    produce(&b.client_config(), "appended", 0..100, &[("acks", "all")]);
    let c = workload::consumer(&b.client_config());
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("appended", 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut seen = 0;
    let deadline = std::time::Instant::now() + T;
    while seen < 100 && std::time::Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            use rdkafka::Message;
            match m.timestamp() {
                rdkafka::Timestamp::LogAppendTime(t) => {
                    assert!(t >= before - 1000, "stamped by the broker")
                }
                other => panic!("expected LogAppendTime, got {other:?}"),
            }
            seen += 1;
        }
    }
    assert_eq!(seen, 100);

    // Auto-creation on produce, with the broker's num.partitions (1).
    let acked = produce(
        &b.client_config(),
        "made-on-demand",
        0..10,
        &[("acks", "all")],
    );
    assert_eq!(acked.len(), 10);
    let md = c.fetch_metadata(Some("made-on-demand"), T).unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 1);

    // segment.ms: a segment older than 300 ms rolls on the next append.
    admin::create(&b, "rolling", 1, 1, &[("segment.ms", "300")]).unwrap();
    for round in 0..3 {
        produce(
            &b.client_config(),
            "rolling",
            round * 10..round * 10 + 10,
            &[("acks", "all")],
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    let logs = std::fs::read_dir(b.data_dir().join("rolling-0"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count();
    assert!(logs >= 3, "{logs} segments");
    let got = consume(&b.client_config(), "rolling", 1, 30, T);
    assert_eq!(got[&0].len(), 30);
}

/// ListOffsets MAX_TIMESTAMP (-3, KIP-734) answers the offset of the record that has the
/// largest timestamp, not the last offset of its batch.
#[test]
fn list_offsets_max_timestamp_is_the_record_with_the_largest_timestamp() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let b = Broker::start(1);
    admin::create(&b, "ts", 1, 1, &[]).unwrap();
    let mut cfg = b.client_config();
    cfg.set("linger.ms", "200");
    let p: BaseProducer = cfg.create().unwrap();
    let base = base_timestamp_ms();
    // One batch: offsets 0, 1, 2 with timestamps base+1000, base+3000, base+2000.
    for (i, dt) in [1000i64, 3000, 2000].into_iter().enumerate() {
        p.send(
            BaseRecord::<str, str>::to("ts")
                .partition(0)
                .key(&format!("k{i}"))
                .payload("v")
                .timestamp(base + dt),
        )
        .unwrap();
    }
    p.flush(T).unwrap();
    let mut conn = weir_tests::raw::Conn::new(&b.bootstrap());
    assert_eq!(conn.offset("ts", 0, -1), 3);
    assert_eq!(
        conn.offset("ts", 0, -3),
        1,
        "the record with the largest timestamp"
    );
    // A later batch with smaller timestamps does not move it; one with a larger one does.
    for (i, dt) in [500i64, 4000, 4000].into_iter().enumerate() {
        p.send(
            BaseRecord::<str, str>::to("ts")
                .partition(0)
                .key(&format!("j{i}"))
                .payload("v")
                .timestamp(base + dt),
        )
        .unwrap();
        if i == 0 {
            p.flush(T).unwrap();
            assert_eq!(conn.offset("ts", 0, -3), 1);
        }
    }
    p.flush(T).unwrap();
    assert_eq!(
        conn.offset("ts", 0, -3),
        4,
        "the first record with the new largest timestamp"
    );
}

/// CreateTopics with manual replica assignments works on a single node when every replica list
/// names this node, and is refused with Kafka's codes otherwise.
#[test]
fn create_topics_with_manual_replica_assignments() {
    use rdkafka::admin::{NewTopic, TopicReplication};
    let b = Broker::start_with(2, &["--node-id", "0"]);
    let a = admin::client(&b);
    let create = |t: NewTopic<'_>| {
        let r = futures::executor::block_on(a.create_topics([&t], &admin::opts())).unwrap();
        r.into_iter()
            .next()
            .unwrap()
            .map(|_| ())
            .map_err(|(_, e)| e)
    };
    let ok: &[&[i32]] = &[&[0], &[0], &[0]];
    assert_eq!(
        create(NewTopic::new("manual", 3, TopicReplication::Variable(ok))),
        Ok(())
    );
    let md = b
        .client_config()
        .create::<rdkafka::consumer::BaseConsumer>()
        .unwrap()
        .fetch_metadata(Some("manual"), T)
        .unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 3);
    let other: &[&[i32]] = &[&[0], &[7]];
    assert_eq!(
        create(NewTopic::new(
            "manual2",
            2,
            TopicReplication::Variable(other)
        )),
        Err(RDKafkaErrorCode::InvalidReplicaAssignment)
    );
    let twice: &[&[i32]] = &[&[0, 0]];
    assert_eq!(
        create(NewTopic::new(
            "manual3",
            1,
            TopicReplication::Variable(twice)
        )),
        Err(RDKafkaErrorCode::InvalidReplicaAssignment)
    );
    // Records round-trip through a manually assigned topic.
    let acked = produce(&b.client_config(), "manual", 0..300, &[("acks", "all")]);
    let got = consume(&b.client_config(), "manual", 3, 300, T);
    workload::verify(&acked, &got);
}

/// DeleteRecords moves the log start (the low watermark), deletes whole segments below it,
/// survives a restart (kill -9 included), and refuses offsets past the high watermark.
#[test]
fn delete_records_moves_the_log_start_and_frees_segments() {
    let mut b = Broker::start(2);
    admin::create(&b, "dr", 2, 1, &[("segment.bytes", "4096")]).unwrap();
    // Small batches, so a partition spans many 4 KiB segments.
    let small = [
        ("acks", "all"),
        ("batch.num.messages", "20"),
        ("linger.ms", "1"),
    ];
    let acked = produce(&b.client_config(), "dr", 0..2000, &small);
    let in_p0 = acked.iter().filter(|a| a.partition == 0).count() as i64;
    assert!(in_p0 > 100);
    let seg_count = |b: &Broker| b.segment_count("dr-0");
    let before = seg_count(&b);
    let a = admin::client(&b);
    let delete = |tp: &[(&str, i32, i64)]| {
        let mut tpl = TopicPartitionList::new();
        for &(t, p, o) in tp {
            tpl.add_partition_offset(t, p, Offset::Offset(o)).unwrap();
        }
        futures::executor::block_on(a.delete_records(&tpl, &admin::opts())).unwrap()
    };
    let cut = acked
        .iter()
        .filter(|a| a.partition == 0)
        .map(|a| a.offset)
        .filter(|&o| o > 0 && o < in_p0 - 1)
        .max()
        .unwrap();
    assert!(before > 2, "several segments: {before}");
    let r = delete(&[("dr", 0, cut), ("dr", 1, in_p0 * 100)]);
    let p0 = r.find_partition("dr", 0).unwrap();
    assert_eq!(p0.offset(), Offset::Offset(cut), "low watermark");
    assert!(p0.error().is_ok());
    let p1 = r.find_partition("dr", 1).unwrap();
    assert!(
        p1.error().is_err(),
        "past the high watermark: OFFSET_OUT_OF_RANGE"
    );
    assert!(
        seg_count(&b) < before,
        "whole segments below the start deleted"
    );
    let mut conn = weir_tests::raw::Conn::new(&b.bootstrap());
    assert_eq!(conn.offset("dr", 0, -2), cut);
    // A fetch below the start is out of range; from the start it returns the record at `cut`.
    assert_eq!(
        conn.fetch("dr", 0, cut - 1, 0, 1).0,
        1,
        "OFFSET_OUT_OF_RANGE"
    );
    let got = consume(&b.client_config(), "dr", 1, (in_p0 - cut) as usize, T);
    assert_eq!(got[&0].first().unwrap().offset, cut);
    assert_eq!(got[&0].len() as i64, in_p0 - cut);
    // Deleting below the current start changes nothing; -1 means the high watermark.
    let r = delete(&[("dr", 0, 0)]);
    assert_eq!(
        r.find_partition("dr", 0).unwrap().offset(),
        Offset::Offset(cut)
    );
    b.kill9();
    b.restart();
    let mut conn = weir_tests::raw::Conn::new(&b.bootstrap());
    assert_eq!(
        conn.offset("dr", 0, -2),
        cut,
        "the log start survives kill -9"
    );
    let a = admin::client(&b);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("dr", 0, Offset::End).unwrap();
    let r = futures::executor::block_on(a.delete_records(&tpl, &admin::opts())).unwrap();
    assert_eq!(
        r.find_partition("dr", 0).unwrap().offset(),
        Offset::Offset(in_p0)
    );
    assert_eq!(conn.offset("dr", 0, -2), in_p0);
    // Internal topics are refused.
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("__consumer_offsets", 0, Offset::Offset(0))
        .unwrap();
    let r = futures::executor::block_on(a.delete_records(&tpl, &admin::opts())).unwrap();
    assert!(r
        .find_partition("__consumer_offsets", 0)
        .unwrap()
        .error()
        .is_err());
}
