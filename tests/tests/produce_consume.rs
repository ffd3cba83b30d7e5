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
