//! The Prometheus endpoint of a real broker process: every scrape parses with a Prometheus
//! text parser (prometheus-parse), and after a known produce, fetch and commit the counters and
//! gauges moved by exactly the right amounts.

use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use weir_tests::raw::Conn;
use weir_tests::{admin, eventually, Broker};

fn scrape(b: &Broker) -> Scrape {
    let (status, body) = b.scrape();
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// The sum of the samples named `name` whose labels include `labels` (0 when there is none).
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b.iter().map(|c| c.count).fold(0.0, f64::max),
            Value::Summary(_) => panic!("{name} is a summary"),
        })
        .sum()
}

fn delta(a: &Scrape, b: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(b, name, labels) - value(a, name, labels)
}

#[test]
fn counters_move_by_exactly_what_was_produced_fetched_and_committed() {
    let b = Broker::start(2);
    admin::create(&b, "m", 2, 1, &[]).unwrap();
    // Partitions show up with the shards' next sample (every second).
    assert!(eventually(Duration::from_secs(10), || {
        value(&scrape(&b), "weir_partition_leader", &[("topic", "m")]) == 2.0
    }));
    let before = scrape(&b);
    for name in [
        "weir_broker_info",
        "weir_connections",
        "weir_cache_bytes",
        "weir_pending_bytes",
        "weir_offline_partitions",
        "weir_active_controller",
        "weir_under_replicated_partitions",
    ] {
        assert!(
            before.samples.iter().any(|s| s.metric == name),
            "{name} is exposed"
        );
    }
    assert_eq!(value(&before, "weir_active_controller", &[]), 1.0);

    // 10 acks=all produce requests of 50 records (250 per partition), one refused.
    let mut c = Conn::new(&b.bootstrap());
    for i in 0..10 {
        assert_eq!(c.produce("m", i % 2, -1, -1, 0, 50).0, 0);
    }
    assert_eq!(c.produce("m", 7, -1, -1, 0, 5).0, 3, "no partition 7");
    // One consumer fetch per partition reads everything back (the stored bytes are exactly the
    // produced batches: the broker only stamps offsets into them).
    let stored: usize = (0..2).map(|p| c.fetch_records("m", p, 0).len()).sum();
    assert!(stored > 500 * 10);

    let after = scrape(&b);
    let topic = [("topic", "m")];
    assert_eq!(
        delta(&before, &after, "weir_topic_records_in_total", &topic),
        500.0
    );
    assert_eq!(
        delta(&before, &after, "weir_topic_bytes_in_total", &topic),
        stored as f64
    );
    assert_eq!(
        delta(&before, &after, "weir_topic_records_out_total", &topic),
        500.0
    );
    assert_eq!(
        delta(&before, &after, "weir_topic_bytes_out_total", &topic),
        stored as f64
    );
    let produce_ok = [("api", "Produce"), ("error", "NONE")];
    assert_eq!(
        delta(&before, &after, "weir_requests_total", &produce_ok),
        10.0
    );
    let refused = [("api", "Produce"), ("error", "UNKNOWN_TOPIC_OR_PARTITION")];
    assert_eq!(delta(&before, &after, "weir_requests_total", &refused), 1.0);
    assert_eq!(
        delta(
            &before,
            &after,
            "weir_requests_total",
            &[("api", "Fetch"), ("error", "NONE")]
        ),
        2.0
    );
    let produce = [("api", "Produce")];
    assert_eq!(
        delta(
            &before,
            &after,
            "weir_request_duration_seconds_count",
            &produce
        ),
        11.0
    );
    // The +Inf bucket of the latency histogram holds every request.
    assert_eq!(
        delta(&before, &after, "weir_request_duration_seconds", &produce),
        11.0
    );
    // The produce stages: every Produce frame is read, appended and answered; the 10 that
    // appended waited for their fdatasync (and, acks=all, for the high watermark).
    let stage = |name: &str| {
        delta(
            &before,
            &after,
            "weir_produce_stage_seconds_count",
            &[("stage", name)],
        )
    };
    assert_eq!(stage("frame_read"), 11.0);
    assert_eq!(stage("append"), 11.0);
    assert_eq!(stage("response_write"), 11.0);
    assert_eq!(stage("stored_wait"), 10.0);
    assert_eq!(stage("replication_wait"), 10.0);
    assert!((1.0..=10.0).contains(&stage("disk_write")));
    // Every byte was made durable by some group-commit round, each round by fdatasyncs or by
    // writes through O_DSYNC.
    assert_eq!(
        delta(&before, &after, "weir_group_commit_bytes_sum", &[]),
        stored as f64
    );
    let rounds = delta(&before, &after, "weir_group_commit_bytes_count", &[]);
    assert!(
        (1.0..=10.0).contains(&rounds),
        "{rounds} group-commit rounds"
    );
    let syncs = delta(
        &before,
        &after,
        "weir_fdatasync_duration_seconds_count",
        &[],
    ) + delta(
        &before,
        &after,
        "weir_durable_write_duration_seconds_count",
        &[],
    );
    assert!(syncs >= rounds, "{syncs} syncs for {rounds} rounds");
    // Fresh data is read from the cache.
    assert!(delta(&before, &after, "weir_cache_hits_total", &[]) >= 2.0);
    assert!(value(&after, "weir_connections", &[]) >= 1.0);

    // Per-partition gauges (sampled every second).
    let p0 = [("topic", "m"), ("partition", "0")];
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = scrape(&b);
            value(&s, "weir_partition_high_watermark", &p0) == 250.0
                && value(&s, "weir_partition_log_end_offset", &[("topic", "m")]) == 500.0
        }),
        "log end offsets and high watermarks reach the produced counts"
    );
    let s = scrape(&b);
    assert_eq!(value(&s, "weir_partition_log_start_offset", &p0), 0.0);
    assert_eq!(value(&s, "weir_partition_leader", &p0), 1.0);
    assert!(value(&s, "weir_partition_size_bytes", &[("topic", "m")]) >= stored as f64);

    // A group with committed offsets 100 and 200 lags by 150 and 50.
    let mut cfg = b.client_config();
    cfg.set("group.id", "lagging")
        .set("enable.auto.commit", "false");
    let consumer: rdkafka::consumer::BaseConsumer = cfg.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("m", 0, Offset::Offset(100))
        .unwrap();
    tpl.add_partition_offset("m", 1, Offset::Offset(200))
        .unwrap();
    consumer.commit(&tpl, CommitMode::Sync).unwrap();
    let g = |p: &'static str| [("group", "lagging"), ("topic", "m"), ("partition", p)];
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = scrape(&b);
            value(&s, "weir_consumer_group_lag", &g("0")) == 150.0
                && value(&s, "weir_consumer_group_lag", &g("1")) == 50.0
        }),
        "group lag per partition"
    );
    let s = scrape(&b);
    assert_eq!(
        value(&s, "weir_consumer_group_committed_offset", &g("1")),
        200.0
    );
    assert!(value(&s, "weir_consumer_groups", &[("state", "Empty")]) >= 1.0);
    assert!(
        delta(
            &before,
            &s,
            "weir_requests_total",
            &[("api", "OffsetCommit")]
        ) >= 1.0
    );

    // Anything but /metrics is a 404, not a hang or a crash.
    let (status, _) = weir_tests::http_get(&format!("127.0.0.1:{}", b.metrics_port), "/nope");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

/// Scrapes while producers load the broker: each parses, and counters only grow. (How long
/// scrapes take is printed, not asserted: speed belongs to bench/.)
#[test]
fn scrapes_under_load_parse_and_counters_only_grow() {
    let b = Broker::start(2);
    admin::create(&b, "load", 4, 1, &[]).unwrap();
    let bg = weir_tests::workload::background_producer(&b.client_config(), &b.bootstrap(), "load");
    let mut last = 0.0;
    let mut took = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let started = Instant::now();
        let s = scrape(&b);
        took.push(started.elapsed());
        let n = value(&s, "weir_topic_records_in_total", &[("topic", "load")]);
        assert!(n >= last, "records_in went from {last} to {n}");
        last = n;
        std::thread::sleep(Duration::from_millis(100));
    }
    let acked = bg.finish();
    let s = scrape(&b);
    assert_eq!(
        value(&s, "weir_topic_records_in_total", &[("topic", "load")]),
        acked.len() as f64,
        "every acknowledged record counted once"
    );
    took.sort();
    println!(
        "{} scrapes under load ({} records): median {:?}, max {:?}",
        took.len(),
        acked.len(),
        took[took.len() / 2],
        took.last().unwrap()
    );
}

/// On a 3-broker cluster: every broker sees 3 brokers and exactly one is the active
/// controller; killing a follower makes the leader's partition under-replicated, counts an ISR
/// shrink, and the restart's catch-up counts an expand.
#[test]
fn cluster_metrics_follow_isr_changes_and_the_controller() {
    let mut c = weir_tests::Cluster::start(3, &[("replica.lag.time.max.ms", "2000")]);
    let all = |f: &dyn Fn(&Scrape) -> bool, c: &weir_tests::Cluster| {
        eventually(Duration::from_secs(30), || {
            (0..3).all(|i| f(&scrape(c.node(i))))
        })
    };
    assert!(
        all(
            &|s| value(s, "weir_brokers", &[]) == 3.0
                && value(s, "weir_fenced_brokers", &[]) == 0.0,
            &c
        ),
        "3 unfenced brokers everywhere"
    );
    admin::create(c.node(0), "r", 1, 3, &[]).unwrap();
    assert!(eventually(Duration::from_secs(30), || {
        weir_tests::topic_view(c.node(0), "r").is_some_and(|v| v[0].isr.len() == 3)
    }));
    let controllers: f64 = (0..3)
        .map(|i| value(&scrape(c.node(i)), "weir_active_controller", &[]))
        .sum();
    assert_eq!(controllers, 1.0, "one active controller");
    let leader = weir_tests::topic_view(c.node(0), "r").unwrap()[0].leader as usize;
    let follower = (leader + 1) % 3;
    let before = scrape(c.node(leader));
    assert_eq!(value(&before, "weir_under_replicated_partitions", &[]), 0.0);
    c.kill(follower);
    assert!(
        eventually(Duration::from_secs(30), || {
            let s = scrape(c.node(leader));
            // Also the __consumer_offsets partitions it leads.
            value(&s, "weir_under_replicated_partitions", &[]) >= 1.0
                && delta(&before, &s, "weir_isr_shrinks_total", &[]) >= 1.0
        }),
        "the leader reports the partition under-replicated and the shrink: {}",
        {
            let s = scrape(c.node(leader));
            format!(
                "urp {} shrinks {} view {:?}",
                value(&s, "weir_under_replicated_partitions", &[]),
                value(&s, "weir_isr_shrinks_total", &[]),
                weir_tests::topic_view(c.node(leader), "r").map(|v| v[0].isr.clone())
            )
        }
    );
    c.restart(follower);
    assert!(
        eventually(Duration::from_secs(30), || {
            let s = scrape(c.node(leader));
            value(&s, "weir_under_replicated_partitions", &[]) == 0.0
                && delta(&before, &s, "weir_isr_expands_total", &[]) >= 1.0
        }),
        "the follower rejoins the ISR"
    );
    assert_eq!(
        value(&scrape(c.node(leader)), "weir_offline_partitions", &[]),
        0.0
    );
}

/// The batch arena (storage/arena.rs) holds the stamped batches in mapped chunks, and its
/// memory follows the cache: after writing about 2.5 times the harness's 64 MiB cache, each
/// shard's mapped chunks are within a few chunks of what it caches and has unwritten, and
/// they are unmapped when the topic is deleted (a batch kept alive anywhere would pin its
/// chunk and fail the last check).
#[test]
fn batch_arena_memory_follows_the_cache_and_is_released() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    const MIB: f64 = (1 << 20) as f64;
    let b = Broker::start(2);
    admin::create(&b, "arena", 4, 1, &[]).unwrap();
    let producer: BaseProducer = b
        .client_config()
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.size", "65536")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap();
    let payload = vec![7u8; 1024];
    for i in 0..160_000u32 {
        let key = i.to_string();
        let mut rec = BaseRecord::to("arena")
            .partition((i % 4) as i32)
            .key(&key)
            .payload(&payload);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    let check = |s: &Scrape| {
        for shard in ["0", "1"] {
            let l = [("shard", shard)];
            let arena = value(s, "weir_batch_arena_bytes", &l);
            let cache = value(s, "weir_cache_bytes", &l);
            let pending = value(s, "weir_pending_bytes", &l);
            // The harness's 64 MiB cache, 32 MiB per shard, is full after ~160 MB.
            assert!(cache > 30.0 * MIB, "shard {shard}: cache {cache}");
            // A chunk is unmapped when its last batch leaves the cache. Batches leave oldest
            // append first (`storage/cache.rs`), also when partitions' writes complete out of
            // order, so chunks free in the order they were filled: the arena follows what is
            // cached and unwritten within a few chunks (4 MiB also covers a cache just under its
            // share). Evicted in write order, it was seen at cache + 8 MiB under CI load.
            eprintln!(
                "shard {shard}: arena {:.1} MiB, cache {:.1} MiB, pending {:.1} MiB",
                arena / MIB,
                cache / MIB,
                pending / MIB
            );
            assert!(
                arena <= cache + pending + 4.0 * MIB,
                "shard {shard}: arena {arena} > cache {cache} + pending {pending} + 4 MiB"
            );
            assert!(
                arena >= cache / 2.0,
                "shard {shard}: arena {arena}, cache {cache}"
            );
        }
    };
    // The sample is refreshed every second.
    std::thread::sleep(Duration::from_millis(1500));
    check(&scrape(&b));
    admin::delete(&b, "arena").unwrap();
    assert!(
        eventually(Duration::from_secs(15), || {
            let s = scrape(&b);
            ["0", "1"]
                .iter()
                .all(|shard| value(&s, "weir_batch_arena_bytes", &[("shard", shard)]) <= 1.0 * MIB)
        }),
        "chunks stay mapped after the topic is gone: {:?}",
        scrape(&b)
            .samples
            .iter()
            .filter(|x| x.metric == "weir_batch_arena_bytes")
            .map(|x| format!("{:?}", x.value))
            .collect::<Vec<_>>()
    );
}

/// A producer whose requests each carry one large batch (one partition, 1 MB batches) gets
/// its batches stamped in the request's buffer, not copied (`weir_produce_batches_in_place`),
/// and the records read back intact at their acknowledged offsets, from the cache and, after
/// kill -9 and a restart, from disk. A producer spreading small batches over partitions gets copies.
#[test]
fn large_lone_batches_are_stored_from_the_request_buffer() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut b = Broker::start(1);
    admin::create(&b, "whole", 1, 1, &[]).unwrap();
    admin::create(&b, "spread", 4, 1, &[]).unwrap();
    let before = scrape(&b);
    let produce = |topic: &str, partitions: i32, batch_size: &str, n: usize| {
        let producer: FutureProducer = b
            .client_config()
            .set("acks", "all")
            .set("linger.ms", "100")
            .set("batch.size", batch_size)
            .create()
            .unwrap();
        let acks: Vec<_> = (0..n)
            .map(|i| {
                let key = format!("{topic}-{i}");
                let value = vec![(i % 251) as u8; 1024];
                producer
                    .send_result(
                        FutureRecord::to(topic)
                            .partition(i as i32 % partitions)
                            .key(&key)
                            .payload(&value),
                    )
                    .unwrap()
            })
            .collect();
        acks.into_iter()
            .map(|a| futures::executor::block_on(a).unwrap().unwrap())
            .collect::<Vec<_>>()
    };
    let whole = produce("whole", 1, "1000000", 3000);
    let after_whole = scrape(&b);
    let in_place = delta(
        &before,
        &after_whole,
        "weir_produce_batches_in_place_total",
        &[],
    );
    assert!(in_place >= 2.0, "in place: {in_place}");
    produce("spread", 4, "16384", 2000);
    let after_spread = scrape(&b);
    assert_eq!(
        delta(
            &after_whole,
            &after_spread,
            "weir_produce_batches_in_place_total",
            &[]
        ),
        0.0
    );
    let check = |b: &Broker| {
        let got = weir_tests::workload::consume(
            &b.client_config(),
            "whole",
            1,
            3000,
            Duration::from_secs(30),
        );
        let recs = &got[&0];
        assert_eq!(recs.len(), 3000);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.offset, i as i64);
            assert_eq!(r.key.as_deref(), Some(format!("whole-{i}").as_bytes()));
            assert_eq!(r.value.as_deref(), Some(&vec![(i % 251) as u8; 1024][..]));
        }
        for (i, d) in whole.iter().enumerate() {
            assert_eq!((d.partition, d.offset), (0, i as i64));
        }
    };
    check(&b);
    // Acknowledged with acks=all: after kill -9 the same bytes come from disk.
    b.kill9();
    b.restart();
    check(&b);
}
