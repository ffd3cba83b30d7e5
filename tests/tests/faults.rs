//! Storage faults injected under the log of a real broker process (`WEIR_FAULTS_FILE`, see
//! broker/src/storage/file.rs): an I/O error takes only its partition offline and loses nothing
//! acknowledged; a short write is retried in place until it succeeds; a crash at an exact point
//! (right before an fdatasync) loses nothing acknowledged.
//!
//! One test function: the rules file is named by an environment variable the broker processes
//! inherit from this test process.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_tests::raw::Conn;
use weir_tests::{admin, eventually, Broker};

const KAFKA_STORAGE_ERROR: i16 = 56;

fn rules(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    // The broker rereads the file every 100 ms.
    std::thread::sleep(Duration::from_millis(400));
}

/// Produces `batches` batches of 3 records (acks=all); returns their base offsets.
fn produce_ok(conn: &mut Conn, topic: &str, batches: usize) -> Vec<i64> {
    (0..batches)
        .map(|_| {
            let (code, base) = conn.produce(topic, 0, -1, -1, -1, 3);
            assert_eq!(code, 0, "produce to {topic}");
            base
        })
        .collect()
}

#[test]
fn injected_storage_faults() {
    let rules_dir = tempfile::tempdir().unwrap();
    let file = rules_dir.path().join("faults");
    rules(&file, "");
    std::env::set_var("WEIR_FAULTS_FILE", &file);

    // EIO on one partition's writes: that partition answers KAFKA_STORAGE_ERROR promptly and
    // stays offline; the others go on; after a restart everything acknowledged is there.
    let mut b = Broker::start(1);
    admin::create(&b, "bad", 1, 1, &[]).unwrap();
    admin::create(&b, "good", 1, 1, &[]).unwrap();
    let mut conn = Conn::new(&b.bootstrap());
    let before = produce_ok(&mut conn, "bad", 20);
    // The shard's cache bytes (the gauge is sampled every second).
    let cache_bytes = |b: &Broker| b.metric("weir_cache_bytes");
    assert!(
        eventually(Duration::from_secs(5), || cache_bytes(&b) > 0.0),
        "bad's written batches are cached"
    );
    rules(&file, "write eio bad-0\n");
    let t0 = Instant::now();
    assert_eq!(conn.produce("bad", 0, -1, -1, -1, 3).0, KAFKA_STORAGE_ERROR);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(conn.fetch("bad", 0, 0, 0, 1).0, KAFKA_STORAGE_ERROR);
    // No fetch reads an offline partition's batches: they leave the cache (they used to stay
    // cached, and its unwritten ones outside the cache's accounting, for as long as it ran).
    assert!(
        eventually(Duration::from_secs(5), || cache_bytes(&b) == 0.0),
        "an offline partition's batches stay cached: {} bytes",
        cache_bytes(&b)
    );
    produce_ok(&mut conn, "good", 20);
    rules(&file, "");
    // EIO is not retried: offline until restart.
    assert_eq!(conn.produce("bad", 0, -1, -1, -1, 3).0, KAFKA_STORAGE_ERROR);
    assert!(b.log().contains("partition offline"));
    b.kill9();
    b.restart();
    let mut conn = Conn::new(&b.bootstrap());
    let end = conn.offset("bad", 0, -1);
    assert!(
        end >= *before.last().unwrap() + 3,
        "acknowledged records kept: end {end}"
    );
    produce_ok(&mut conn, "bad", 5);
    drop(conn);
    drop(b);

    // Short writes: the partition stalls (retryable), then the same bytes are written again at
    // the same place; the log reads back whole and survives a kill -9.
    let mut b = Broker::start(1);
    admin::create(&b, "t", 1, 1, &[]).unwrap();
    let mut conn = Conn::new(&b.bootstrap());
    let mut acked = produce_ok(&mut conn, "t", 50);
    rules(&file, "write short t-0\n");
    assert_eq!(conn.produce("t", 0, -1, -1, -1, 3).0, KAFKA_STORAGE_ERROR);
    assert!(b.log().contains("short DMA write"));
    rules(&file, "");
    assert!(
        eventually(Duration::from_secs(15), || conn
            .produce("t", 0, -1, -1, -1, 3)
            .0
            == 0),
        "the partition takes appends again after short writes stop:\n{}",
        b.log()
    );
    acked.extend(produce_ok(&mut conn, "t", 50));
    b.kill9();
    b.restart();
    let mut conn = Conn::new(&b.bootstrap());
    let end = conn.offset("t", 0, -1);
    assert!(end >= *acked.last().unwrap() + 3);
    // Every batch from 0 to the end is intact (the broker checks CRCs on recovery: a torn or
    // misplaced rewrite would have truncated the log below the acknowledged end).
    let mut offset = 0;
    while offset < end {
        let (code, hw, bytes) = conn.fetch("t", 0, offset, 0, 1);
        assert_eq!(code, 0);
        assert_eq!(hw, end);
        assert!(bytes > 0);
        offset += 3;
    }
    drop(conn);
    drop(b);

    // A crash right before an fdatasync: nothing acknowledged is lost.
    let mut b = Broker::start(1);
    admin::create(&b, "c", 1, 1, &[]).unwrap();
    let mut conn = Conn::new(&b.bootstrap());
    let acked = produce_ok(&mut conn, "c", 30);
    rules(&file, "sync crash c-0\n");
    // The next acks=all produce makes the flusher sync: the process aborts there, unanswered.
    let _ = std::panic::catch_unwind(move || conn.produce("c", 0, -1, -1, -1, 3));
    assert!(
        eventually(Duration::from_secs(10), || !b.is_running()),
        "the injected crash happened"
    );
    rules(&file, "");
    b.kill9();
    b.restart();
    let mut conn = Conn::new(&b.bootstrap());
    let end = conn.offset("c", 0, -1);
    assert!(
        end >= *acked.last().unwrap() + 3,
        "acknowledged kept: end {end}"
    );
    produce_ok(&mut conn, "c", 5);
    drop(conn);
    drop(b);

    // A full disk under one partition while another partition of the same shard takes steady
    // traffic: the stalled one is still retried every second (the flusher never idles here),
    // and takes appends again soon after space is back.
    let b = Broker::start(1);
    admin::create(&b, "full", 1, 1, &[]).unwrap();
    admin::create(&b, "busy", 1, 1, &[]).unwrap();
    let mut conn = Conn::new(&b.bootstrap());
    produce_ok(&mut conn, "full", 5);
    rules(&file, "write enospc full-0\n");
    assert_eq!(
        conn.produce("full", 0, -1, -1, -1, 3).0,
        KAFKA_STORAGE_ERROR
    );
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (stop, bootstrap) = (stop.clone(), b.bootstrap());
        std::thread::spawn(move || {
            let mut conn = Conn::new(&bootstrap);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(conn.produce("busy", 0, -1, -1, -1, 3).0, 0);
                n += 1;
            }
            n
        })
    };
    rules(&file, "");
    let t0 = Instant::now();
    let back = eventually(Duration::from_secs(15), || {
        conn.produce("full", 0, -1, -1, -1, 3).0 == 0
    });
    stop.store(true, Ordering::Relaxed);
    let busy_produces = busy.join().unwrap();
    assert!(
        back,
        "the stalled partition was never retried while {busy_produces} produces kept the shard busy"
    );
    eprintln!(
        "stalled partition back after {:?}, {busy_produces} produces to the busy one meanwhile",
        t0.elapsed()
    );
    std::env::remove_var("WEIR_FAULTS_FILE");
}
