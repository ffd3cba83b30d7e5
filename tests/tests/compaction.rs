//! Log compaction (cleanup.policy=compact) on a real broker with librdkafka clients: keyed
//! updates are cleaned to the latest value per key with their offsets kept, a reader running
//! during cleaning never sees a wrong or out-of-order value, and a keyless record is refused
//! (KIP-467).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use weir_tests::{admin, eventually, Broker};

const KEYS: usize = 50;
const ROUNDS: usize = 40;

/// Every record of partition 0 from the beginning: (offset, key, value).
fn read_all(b: &Broker, topic: &str) -> Vec<(i64, String, String)> {
    let c: BaseConsumer = b
        .client_config()
        .set("group.id", "compaction-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // Bounded by the deadline; ends at the partition's end.
    while std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push((
                m.offset(),
                String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap(),
                String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap(),
            )),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    out
}

/// Values are `<key>:<round>`: a record's value names its own key, and a key's rounds only
/// grow with the offset.
fn check_consistent(recs: &[(i64, String, String)]) {
    let mut last_round: BTreeMap<&str, usize> = BTreeMap::new();
    let mut last_offset = -1;
    for (o, k, v) in recs {
        assert!(
            *o > last_offset,
            "offsets only grow: {o} after {last_offset}"
        );
        last_offset = *o;
        let (vk, round) = v.split_once(':').expect("key:round");
        assert_eq!(vk, k, "offset {o}: a value of another key");
        let round: usize = round.parse().unwrap();
        if let Some(prev) = last_round.insert(k, round) {
            assert!(
                round > prev,
                "offset {o}: {k} went from round {prev} back to {round}"
            );
        }
    }
}

#[test]
fn compaction_keeps_the_latest_value_per_key_and_readers_never_see_a_wrong_one() {
    let b = Broker::start_with(1, &["--override", "log.cleaner.backoff.ms=300"]);
    admin::create(
        &b,
        "cmp",
        1,
        1,
        &[
            ("cleanup.policy", "compact"),
            ("segment.bytes", "4096"),
            ("min.cleanable.dirty.ratio", "0.01"),
            ("delete.retention.ms", "0"),
        ],
    )
    .unwrap();
    // A reader checks every pass it makes while the cleaner works.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, bootstrap) = (stop.clone(), b.bootstrap());
        std::thread::spawn(move || {
            let b = Broker::attach(bootstrap.rsplit_once(':').unwrap().1.parse().unwrap());
            let mut passes = 0;
            while !stop.load(Ordering::Relaxed) {
                check_consistent(&read_all(&b, "cmp"));
                passes += 1;
            }
            passes
        })
    };
    let p: BaseProducer = b
        .client_config()
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()
        .unwrap();
    // Keys stop being updated at different rounds (key k's last round is
    // ROUNDS - 1 - 2 * (k % 10)): their latest values are spread over the log, so the cleaned
    // sealed segments keep a few records each, with gaps.
    let last_round = |k: usize| ROUNDS - 1 - 2 * (k % 10);
    let updated = |round: usize, k: usize| round <= last_round(k);
    let mut total = 0;
    for round in 0..ROUNDS {
        for k in (0..KEYS).filter(|k| updated(round, *k)) {
            total += 1;
            let (key, value) = (format!("k{k:02}"), format!("k{k:02}:{round}"));
            p.send(BaseRecord::to("cmp").partition(0).key(&key).payload(&value))
                .map_err(|(e, _)| e)
                .unwrap();
        }
        p.flush(Duration::from_secs(30)).unwrap();
    }
    // The cleaner catches up: far fewer records than were written, each key's latest value
    // kept, offsets unchanged (gaps where older values were).
    let mut last = Vec::new();
    assert!(
        eventually(Duration::from_secs(60), || {
            last = read_all(&b, "cmp");
            last.len() < total / 4
        }),
        "compaction left {} of {total} records",
        last.len()
    );
    check_consistent(&last);
    let latest: BTreeMap<&str, &str> = last
        .iter()
        .map(|(_, k, v)| (k.as_str(), v.as_str()))
        .collect();
    if latest.len() != KEYS {
        let mut c = weir_tests::raw::Conn::new(&b.bootstrap());
        let raw = c.fetch_records("cmp", 0, 0);
        let mut at = 0;
        let mut bases = Vec::new();
        while at + 61 <= raw.len() {
            let base = i64::from_be_bytes(raw[at..at + 8].try_into().unwrap());
            let len = i32::from_be_bytes(raw[at + 8..at + 12].try_into().unwrap()) as usize + 12;
            bases.push(base);
            at += len;
        }
        eprintln!(
            "DEBUG raw fetch from 0: {} bytes, batch bases {:?}; log: {}",
            raw.len(),
            bases,
            b.log()
        );
    }
    assert_eq!(latest.len(), KEYS, "{last:?}");
    for (k, v) in &latest {
        let n: usize = k[1..].parse().unwrap();
        assert_eq!(
            *v,
            format!("{k}:{}", last_round(n)),
            "{k} keeps its latest value"
        );
    }
    assert_eq!(
        last.last().unwrap().0,
        total as i64 - 1,
        "the last offset is kept"
    );
    assert!(
        last.windows(2).any(|w| w[1].0 > w[0].0 + 1),
        "offsets keep their gaps: {:?}",
        last.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    stop.store(true, Ordering::Relaxed);
    let passes = reader.join().expect("the reader saw only consistent logs");
    assert!(passes > 0);

    // KIP-467: a batch with a keyless record is refused by a compacted topic, with the
    // record's index; the keyed records of the same request's other batch are not affected.
    {
        use bytes::Bytes;
        use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
        use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
        use kafka_protocol::protocol::StrBytes;
        use kafka_protocol::records::Compression;
        let records = weir_tests::raw::batch(
            [
                (
                    Some(Bytes::from_static(b"k00")),
                    Some(Bytes::from_static(b"k00:999")),
                ),
                (None, Some(Bytes::from_static(b"no key"))),
            ]
            .into_iter()
            .map(|(k, v)| (k, v, 1_000)),
            -1,
            -1,
            // Sequences that follow the offsets keep both records in one batch.
            0,
            Compression::None,
        );
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_static_str("cmp")))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(records))])]);
        let mut c = weir_tests::raw::Conn::new(&b.bootstrap());
        let r: ProduceResponse = c.call(ApiKey::Produce, 9, &req);
        let part = &r.responses[0].partition_responses[0];
        assert_eq!(part.error_code, 87, "INVALID_RECORD");
        assert_eq!(part.record_errors.len(), 1, "{part:?}");
        assert_eq!(part.record_errors[0].batch_index, 1);
        let msg = part
            .error_message
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("Compacted topic cannot accept message without key"),
            "{msg}"
        );
    }
    // After kill -9 and a restart (every segment scanned again, gaps and all) the cleaned log
    // reads the same.
    let mut b = b;
    b.kill9();
    b.restart();
    let again = read_all(&b, "cmp");
    // The refused batch stored nothing; the cleaner may have gone further meanwhile.
    check_consistent(&again);
    assert!(
        again.iter().all(|r| last.contains(r)),
        "no record appeared or changed"
    );
    let latest_again: BTreeMap<&str, &str> = again
        .iter()
        .map(|(_, k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(latest_again, latest);
}

/// `__consumer_offsets` is compacted: a group that commits 600 times keeps about one record
/// per partition after cleaning (its segment files shrink far below the ~60 KB written), and
/// after kill -9 and a restart the group still has its last commit.
#[test]
fn consumer_offsets_are_compacted_and_the_last_commit_survives() {
    use rdkafka::consumer::CommitMode;
    let mut b = Broker::start_with(
        1,
        &[
            "--override",
            "log.cleaner.backoff.ms=300",
            "--override",
            "offsets.topic.segment.bytes=4096",
        ],
    );
    admin::create(&b, "src", 1, 1, &[]).unwrap();
    let c: BaseConsumer = b
        .client_config()
        .set("group.id", "g-compact")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    for o in 1..=600 {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("src", 0, Offset::Offset(o))
            .unwrap();
        c.commit(&tpl, CommitMode::Sync).unwrap();
    }
    // The group's __consumer_offsets partition (Java's String.hashCode, as Kafka).
    let h = "g-compact"
        .encode_utf16()
        .fold(0i32, |h, u| h.wrapping_mul(31).wrapping_add(u as i32));
    let partition = ((h & 0x7fff_ffff) % 50).to_string();
    // What its segment files hold on disk.
    let size = |b: &Broker| -> f64 {
        std::fs::read_dir(b.data_dir().join(format!("__consumer_offsets-{partition}")))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| e.metadata().unwrap().len() as f64)
            .sum()
    };
    let mut last = 0.0;
    assert!(
        eventually(Duration::from_secs(60), || {
            last = size(&b);
            last < 16_384.0
        }),
        "600 commits (about 60 KB) cleaned to {last} bytes"
    );
    drop(c);
    b.kill9();
    b.restart();
    let c: BaseConsumer = b
        .client_config()
        .set("group.id", "g-compact")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition("src", 0);
    let committed = c.committed_offsets(tpl, Duration::from_secs(30)).unwrap();
    assert_eq!(
        committed.find_partition("src", 0).unwrap().offset(),
        Offset::Offset(600)
    );
}

/// The keyed records stored in a partition directory's segment files, in offset order
/// (stops at preallocated zeros).
fn stored_records(dir: &std::path::Path) -> Vec<(i64, String, String)> {
    use kafka_protocol::records::RecordBatchDecoder;
    let mut buf = bytes::Bytes::from(weir_tests::log_bytes(dir));
    let mut out = Vec::new();
    while buf.len() >= 61 && buf[8..12] != [0, 0, 0, 0] {
        let Ok(set) = RecordBatchDecoder::decode(&mut buf) else {
            break;
        };
        for r in set.records {
            out.push((
                r.offset,
                String::from_utf8(r.key.unwrap_or_default().to_vec()).unwrap(),
                String::from_utf8(r.value.unwrap_or_default().to_vec()).unwrap(),
            ));
        }
    }
    out
}

/// A follower that was down while its leader compacted catches up across the gaps (it copies
/// batches that skip offsets), rejoins the ISR, and its files hold every key's latest value.
#[test]
fn a_follower_catches_up_from_a_compacted_leader() {
    let mut c = weir_tests::Cluster::start(3, &[("log.cleaner.backoff.ms", "300")]);
    assert!(eventually(Duration::from_secs(30), || {
        weir_tests::topic_view(c.node(0), "__consumer_offsets").is_some()
            && admin::create(
                c.node(0),
                "rc",
                1,
                3,
                &[
                    ("cleanup.policy", "compact"),
                    ("segment.bytes", "4096"),
                    ("min.cleanable.dirty.ratio", "0.01"),
                ],
            )
            .is_ok()
    }));
    let isr = |c: &weir_tests::Cluster, from: usize| {
        weir_tests::topic_view(c.node(from), "rc").map(|v| (v[0].leader, v[0].isr.len()))
    };
    assert!(eventually(Duration::from_secs(30), || isr(&c, 0)
        .is_some_and(|(l, n)| l >= 0 && n == 3)));
    let leader = isr(&c, 0).unwrap().0 as usize;
    let follower = (leader + 1) % 3;
    c.kill(follower);
    let p: BaseProducer = c
        .node(leader)
        .client_config()
        .set("bootstrap.servers", c.bootstrap())
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()
        .unwrap();
    for round in 0..ROUNDS {
        for k in 0..KEYS {
            let (key, value) = (format!("k{k:02}"), format!("k{k:02}:{round}"));
            p.send(BaseRecord::to("rc").partition(0).key(&key).payload(&value))
                .map_err(|(e, _)| e)
                .unwrap();
        }
        p.flush(Duration::from_secs(30)).unwrap();
    }
    let leader_dir = c.node(leader).data_dir().join("rc-0");
    assert!(
        eventually(Duration::from_secs(60), || stored_records(&leader_dir)
            .len()
            < KEYS * ROUNDS / 4),
        "the leader compacted"
    );
    c.restart(follower);
    let back = (follower + 1) % 3;
    assert!(
        eventually(Duration::from_secs(60), || isr(&c, back)
            .is_some_and(|(_, n)| n == 3)),
        "the follower rejoined the ISR"
    );
    let follower_dir = c.node(follower).data_dir().join("rc-0");
    let latest = |recs: &[(i64, String, String)]| -> BTreeMap<String, (i64, String)> {
        recs.iter()
            .map(|(o, k, v)| (k.clone(), (*o, v.clone())))
            .collect()
    };
    let mut got = BTreeMap::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            got = latest(&stored_records(&follower_dir));
            got.len() == KEYS
        }),
        "the follower's files hold {} keys",
        got.len()
    );
    assert_eq!(
        got,
        latest(&stored_records(&leader_dir)),
        "same latest record per key, same offsets"
    );
    for (k, (_, v)) in &got {
        assert_eq!(*v, format!("{k}:{}", ROUNDS - 1));
    }
}
