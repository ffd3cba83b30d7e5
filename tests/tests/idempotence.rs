//! The idempotent producer: each record written exactly once per partition, in order.

use std::time::Duration;

use weir_tests::raw::Conn;
use weir_tests::workload::{consume, produce, verify};
use weir_tests::{admin, Broker};

const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
const INVALID_PRODUCER_EPOCH: i16 = 47;

#[test]
fn librdkafka_idempotent_stream_is_exactly_once_in_order() {
    let b = Broker::start(2);
    admin::create(&b, "idem", 6, 1, &[]).unwrap();
    let acked = produce(
        &b.client_config(),
        "idem",
        0..100_000,
        &[
            ("enable.idempotence", "true"),
            ("max.in.flight.requests.per.connection", "5"),
            ("acks", "all"),
        ],
    );
    let got = consume(
        &b.client_config(),
        "idem",
        6,
        100_000,
        Duration::from_secs(120),
    );
    verify(&acked, &got);
}

#[test]
fn duplicates_gaps_and_stale_epochs_over_the_raw_protocol() {
    let b = Broker::start(2);
    admin::create(&b, "raw", 2, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    let (pid, epoch) = c.init_producer_id();
    assert_eq!(epoch, 0);
    let (pid2, _) = c.init_producer_id();
    assert_ne!(pid, pid2, "every InitProducerId gets a new id");

    assert_eq!(c.produce("raw", 1, pid, 0, 0, 5), (0, 0));
    assert_eq!(c.produce("raw", 1, pid, 0, 5, 5), (0, 5));
    // The same batch again: the first offset back, nothing written.
    assert_eq!(c.produce("raw", 1, pid, 0, 0, 5), (0, 0));
    assert_eq!(c.produce("raw", 1, pid, 0, 5, 5), (0, 5));
    assert_eq!(c.offset("raw", 1, -1), 10, "one copy in the log");
    // A gap in the sequence is refused.
    assert_eq!(
        c.produce("raw", 1, pid, 0, 20, 5).0,
        OUT_OF_ORDER_SEQUENCE_NUMBER
    );
    assert_eq!(c.offset("raw", 1, -1), 10);
    // A new epoch starts again at sequence 0; the old epoch is then stale.
    assert_eq!(c.produce("raw", 1, pid, 1, 0, 2), (0, 10));
    assert_eq!(c.produce("raw", 1, pid, 0, 10, 2).0, INVALID_PRODUCER_EPOCH);
    assert_eq!(
        c.produce("raw", 1, pid, 2, 7, 2).0,
        OUT_OF_ORDER_SEQUENCE_NUMBER,
        "a new epoch must start at 0"
    );
    assert_eq!(c.offset("raw", 1, -1), 12);
    // Another producer on the same partition is independent.
    assert_eq!(c.produce("raw", 1, pid2, 0, 0, 1), (0, 12));
}

#[test]
fn duplicates_are_detected_after_a_clean_restart_and_after_kill_9() {
    let mut b = Broker::start(2);
    admin::create(&b, "again", 1, 1, &[]).unwrap();
    let (pid, _) = Conn::new(&b.bootstrap()).init_producer_id();
    let mut c = Conn::new(&b.bootstrap());
    assert_eq!(c.produce("again", 0, pid, 0, 0, 3), (0, 0));
    assert_eq!(c.produce("again", 0, pid, 0, 3, 3), (0, 3));
    drop(c);

    assert!(b.stop());
    b.restart();
    let mut c = Conn::new(&b.bootstrap());
    assert_eq!(
        c.produce("again", 0, pid, 0, 3, 3),
        (0, 3),
        "duplicate after a clean restart (snapshot)"
    );
    assert_eq!(c.produce("again", 0, pid, 0, 6, 3), (0, 6));
    drop(c);

    b.kill9();
    b.restart();
    let mut c = Conn::new(&b.bootstrap());
    assert_eq!(
        c.produce("again", 0, pid, 0, 6, 3),
        (0, 6),
        "duplicate after kill -9 (replayed from the log)"
    );
    assert_eq!(
        c.produce("again", 0, pid, 0, 12, 3).0,
        OUT_OF_ORDER_SEQUENCE_NUMBER
    );
    assert_eq!(c.offset("again", 0, -1), 9);

    // Producer ids are never reused after a restart.
    let (after, _) = c.init_producer_id();
    assert!(after > pid, "{after} after restart, {pid} before");
}

#[test]
fn idle_producer_ids_expire_after_producer_id_expiration_ms() {
    let conf = tempfile::tempdir().unwrap();
    let path = conf.path().join("server.properties");
    std::fs::write(
        &path,
        "producer.id.expiration.ms=1000\nlog.retention.check.interval.ms=200\n",
    )
    .unwrap();
    let b = Broker::start_with(1, &["--config", path.to_str().unwrap()]);
    admin::create(&b, "expire", 1, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    let (pid, _) = c.init_producer_id();
    // The batch timestamps are from 1970 (records use timestamp 1000): the producer is idle
    // by the clock at once; the broker forgets it at its next check.
    assert_eq!(c.produce("expire", 0, pid, 0, 0, 3), (0, 0));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // Known, this would be a gap (OUT_OF_ORDER_SEQUENCE_NUMBER); forgotten, any sequence is
    // accepted (KIP-360).
    assert_eq!(c.produce("expire", 0, pid, 0, 50, 2), (0, 3));
}
