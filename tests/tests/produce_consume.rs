//! Real librdkafka producers and consumers against a real broker process: complete, ordered,
//! byte-exact read-back, with every compression codec.

use std::collections::HashMap;
use std::time::Duration;

use weir_tests::workload::{consume, produce, verify};
use weir_tests::{admin, Broker};

fn round_trip(b: &Broker, topic: &str, n: usize, settings: &[(&str, &str)]) {
    admin::create(b, topic, 6, 1, &[]).expect("create topic");
    let acked = produce(&b.client_config(), topic, 0..n, settings);
    let got = consume(&b.client_config(), topic, 6, n, Duration::from_secs(180));
    verify(&acked, &got);
    // Equal keys went to the same partition, and all six partitions got data.
    let mut key_partition: HashMap<Vec<u8>, i32> = HashMap::new();
    for (p, recs) in &got {
        for r in recs {
            let prev = key_partition.insert(r.key.clone().unwrap(), *p);
            assert!(prev.is_none_or(|q| q == *p), "a key spans partitions");
        }
    }
    assert_eq!(got.len(), 6, "records in every partition");
}

#[test]
fn hundred_thousand_keyed_records_with_headers_acks_all() {
    let b = Broker::start(2);
    round_trip(&b, "keyed", 100_000, &[("acks", "all")]);
}

#[test]
fn every_compression_codec_round_trips() {
    let b = Broker::start(2);
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        round_trip(
            &b,
            &format!("codec-{codec}"),
            100_000,
            &[("acks", "all"), ("compression.type", codec)],
        );
    }
}

#[test]
fn fetch_long_poll_is_woken_by_an_append() {
    let b = Broker::start(2);
    admin::create(&b, "poll", 1, 1, &[]).unwrap();
    let mut c = weir_tests::raw::Conn::new(&b.bootstrap());
    // Nothing there: with max_wait 200 ms the fetch returns empty after the wait.
    assert_eq!(c.fetch("poll", 0, 0, 200, 1), (0, 0, 0));
    // Out of range offsets are refused.
    assert_eq!(c.fetch("poll", 0, 5, 0, 1).0, 1);
    // A fetch waiting up to 30 s returns as soon as a record is appended.
    let bootstrap = b.bootstrap();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        let mut w = weir_tests::raw::Conn::new(&bootstrap);
        w.produce("poll", 0, -1, -1, 0, 3)
    });
    let started = std::time::Instant::now();
    let (err, hw, bytes) = c.fetch("poll", 0, 0, 30_000, 1);
    let waited = started.elapsed();
    assert_eq!(writer.join().unwrap().0, 0);
    assert_eq!((err, hw), (0, 3));
    assert!(bytes > 0, "the woken fetch carries the new batch");
    assert!(
        waited < Duration::from_secs(20),
        "woken by the append, not by the 30 s deadline ({waited:?})"
    );
}

/// (base offset, codec bits) of every stored batch from `offset` on.
fn stored_codecs(b: &Broker, topic: &str, offset: i64) -> Vec<(i64, i16)> {
    let mut c = weir_tests::raw::Conn::new(&b.bootstrap());
    let records = c.fetch_records(topic, 0, offset);
    let mut out = Vec::new();
    let mut at = 0;
    while at + 61 <= records.len() {
        let base = i64::from_be_bytes(records[at..at + 8].try_into().unwrap());
        let len = i32::from_be_bytes(records[at + 8..at + 12].try_into().unwrap()) as usize;
        let attrs = i16::from_be_bytes(records[at + 21..at + 23].try_into().unwrap());
        out.push((base, attrs & 7));
        at += 12 + len;
    }
    out
}

/// Topic `compression.type` other than `producer` (Kafka recompresses on the broker): an
/// idempotent librdkafka producer sends uncompressed batches to an lz4 topic and they are
/// stored as lz4; after AlterConfigs to `uncompressed` its gzip batches are stored
/// uncompressed; every record reads back exactly once, in order. An unknown codec is refused
/// with Kafka's message.
#[test]
fn topic_compression_type_recompresses_batches() {
    let b = Broker::start(2);
    admin::create(&b, "lz", 1, 1, &[("compression.type", "lz4")]).unwrap();
    let first = weir_tests::workload::produce(
        &b.client_config(),
        "lz",
        0..2000,
        &[
            ("acks", "all"),
            ("compression.type", "none"),
            ("enable.idempotence", "true"),
        ],
    );
    assert_eq!(first.len(), 2000);
    let codecs = stored_codecs(&b, "lz", 0);
    assert!(!codecs.is_empty());
    assert!(
        codecs.iter().all(|(_, c)| *c == 3),
        "lz4 everywhere: {codecs:?}"
    );

    let cfg = rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic("lz"))
        .set("compression.type", "uncompressed");
    let r = futures::executor::block_on(admin::client(&b).alter_configs([&cfg], &admin::opts()))
        .expect("AlterConfigs");
    assert!(r[0].is_ok(), "{r:?}");
    let second = weir_tests::workload::produce(
        &b.client_config(),
        "lz",
        2000..3000,
        &[("acks", "all"), ("compression.type", "gzip")],
    );
    assert_eq!(second.len(), 1000);
    let codecs = stored_codecs(&b, "lz", 2000);
    assert!(!codecs.is_empty());
    assert!(
        codecs.iter().all(|(base, c)| *base >= 2000 && *c == 0),
        "uncompressed: {codecs:?}"
    );

    let all: Vec<_> = first.into_iter().chain(second).collect();
    weir_tests::workload::verify(
        &all,
        &weir_tests::workload::consume(&b.client_config(), "lz", 1, 3000, Duration::from_secs(30)),
    );

    let err = admin::create(&b, "brotli", 1, 1, &[("compression.type", "brotli")]).unwrap_err();
    assert_eq!(err, rdkafka::types::RDKafkaErrorCode::InvalidConfig);
}
