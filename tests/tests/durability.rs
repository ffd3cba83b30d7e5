//! Stop, crash and corruption: acknowledged data survives, damaged tails are repaired at start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::producer::Producer;
use weir_tests::workload::{self, consume, produce, verify};
use weir_tests::{admin, eventually, Broker};

const T: Duration = Duration::from_secs(20);

fn high_watermarks(b: &Broker, topic: &str, partitions: i32) -> Vec<i64> {
    let c = workload::consumer(&b.client_config());
    (0..partitions)
        .map(|p| c.fetch_watermarks(topic, p, T).unwrap().1)
        .collect()
}

#[test]
fn clean_stop_and_restart_keeps_everything() {
    let mut b = Broker::start(2);
    admin::create(&b, "keep", 6, 1, &[]).unwrap();
    let acked = produce(&b.client_config(), "keep", 0..20_000, &[("acks", "1")]);
    assert!(b.stop(), "clean exit on SIGTERM");
    assert!(
        b.data_dir().join(".weir_clean_shutdown").exists(),
        "clean-shutdown marker written"
    );
    b.restart();
    assert!(
        !b.log().contains("recovering the tail"),
        "a clean start skips recovery"
    );
    let got = consume(
        &b.client_config(),
        "keep",
        6,
        20_000,
        Duration::from_secs(60),
    );
    verify(&acked, &got);
    // Appends continue after the restart.
    let more = produce(
        &b.client_config(),
        "keep",
        20_000..21_000,
        &[("acks", "all")],
    );
    assert!(more
        .iter()
        .all(|a| a.offset >= acked.iter().filter(|x| x.partition == a.partition).count() as i64));
}

#[test]
fn kill_9_during_acks_all_stream_loses_nothing_acknowledged() {
    let mut b = Broker::start(2);
    admin::create(&b, "crash", 6, 1, &[]).unwrap();
    let mut cfg = b.client_config();
    cfg.set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "3000")
        .set("retries", "0");
    let (p, acks) = workload::producer(&cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let sender = std::thread::spawn(move || {
        let mut i = 0usize;
        while !stop2.load(Ordering::Relaxed) && i < 5_000_000 {
            workload::send(&p, "crash", i);
            i += 1;
            if i % 200 == 0 {
                p.poll(Duration::from_millis(1));
            }
        }
        let _ = p.flush(Duration::from_secs(10));
        i
    });
    assert!(
        eventually(Duration::from_secs(60), || acks.acked.lock().unwrap().len()
            >= 30_000),
        "producer made progress"
    );
    b.kill9();
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    let acked = acks.acked.lock().unwrap().clone();
    assert!(
        sent > acked.len(),
        "the kill interrupted in-flight records ({sent} sent, {} acked)",
        acked.len()
    );

    b.restart();
    assert!(
        b.log().contains("recovering the tail"),
        "an unclean start recovers"
    );
    let highs = high_watermarks(&b, "crash", 6);
    let total: i64 = highs.iter().sum();
    assert!(
        total as usize >= acked.len(),
        "{total} records after restart, {} were acknowledged",
        acked.len()
    );
    let got = consume(
        &b.client_config(),
        "crash",
        6,
        total as usize,
        Duration::from_secs(120),
    );
    for (p, recs) in &got {
        assert_eq!(
            recs.len() as i64,
            highs[*p as usize],
            "partition {p} readable to its end"
        );
    }
    acknowledged_in_place(&acked, &got);
}

/// Every record read back is intact and at a dense offset, and every acknowledged record is
/// where it was acknowledged. Checks no send order, so records of several producers (or of
/// one producer across a crash) may interleave. Returns how many records were read.
fn acknowledged_in_place(
    acked: &[workload::Acked],
    got: &std::collections::BTreeMap<i32, Vec<workload::Consumed>>,
) -> usize {
    let mut at = std::collections::HashMap::new();
    for (p, recs) in got {
        for (n, r) in recs.iter().enumerate() {
            assert_eq!(r.offset, n as i64, "partition {p}: offsets are dense");
            r.check(); // nothing corrupt
            at.insert(r.idx(), (*p, r.offset));
        }
    }
    for a in acked {
        assert_eq!(
            at.get(&a.idx),
            Some(&(a.partition, a.offset)),
            "acknowledged record {} is where it was acknowledged",
            a.idx
        );
    }
    at.len()
}

fn active_segment(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs.pop().unwrap()
}

/// Walks Kafka batch headers (length at bytes 8..12) to the end of the valid data; returns the
/// start of the last batch and the end of the data.
fn last_batch(data: &[u8]) -> (usize, usize) {
    let (mut pos, mut last) = (0usize, 0usize);
    while pos + 12 <= data.len() {
        let len = i32::from_be_bytes(data[pos + 8..pos + 12].try_into().unwrap());
        if len <= 0 || pos + 12 + len as usize > data.len() {
            break;
        }
        last = pos;
        pos += 12 + len as usize;
    }
    (last, pos)
}

#[test]
fn torn_and_bit_flipped_tails_are_repaired_at_start() {
    let mut b = Broker::start(1);
    admin::create(&b, "tail", 1, 1, &[]).unwrap();
    produce(&b.client_config(), "tail", 0..1000, &[("acks", "all")]);
    b.kill9();

    // A torn write: half of a copy of the last batch after the end of the log.
    let seg = active_segment(&b.data_dir().join("tail-0"));
    let mut data = std::fs::read(&seg).unwrap();
    let (last, end) = last_batch(&data);
    let half = (end - last) / 2;
    let torn: Vec<u8> = data[last..last + half].to_vec();
    if data.len() < end + half {
        data.resize(end + half, 0);
    }
    data[end..end + half].copy_from_slice(&torn);
    std::fs::write(&seg, &data).unwrap();

    b.restart();
    assert!(
        b.log().contains("truncating torn or corrupt tail"),
        "the torn tail was noticed:\n{}",
        b.log()
    );
    assert_eq!(high_watermarks(&b, "tail", 1), vec![1000]);
    let acked = produce(
        &b.client_config(),
        "tail",
        1000..1010,
        &[("acks", "all"), ("linger.ms", "50")],
    );
    assert_eq!(
        acked.first().unwrap().offset,
        1000,
        "appends continue where the valid log ends"
    );
    let got = consume(&b.client_config(), "tail", 1, 1010, Duration::from_secs(30));
    assert_eq!(got[&0].len(), 1010);
    got[&0].iter().for_each(|r| r.check());
    b.kill9();

    // A flipped bit inside the last batch: its CRC fails, it and only it is dropped.
    let seg = active_segment(&b.data_dir().join("tail-0"));
    let mut data = std::fs::read(&seg).unwrap();
    let (last, end) = last_batch(&data);
    let last_base = i64::from_be_bytes(data[last..last + 8].try_into().unwrap());
    data[(last + end) / 2 + 30] ^= 0x10;
    std::fs::write(&seg, &data).unwrap();

    b.restart();
    let high = high_watermarks(&b, "tail", 1)[0];
    assert_eq!(high, last_base, "the log ends before the corrupt batch");
    assert!(high >= 1000);
    let got = consume(
        &b.client_config(),
        "tail",
        1,
        high as usize,
        Duration::from_secs(30),
    );
    assert_eq!(got[&0].len() as i64, high);
    got[&0].iter().for_each(|r| r.check());
    let acked = produce(&b.client_config(), "tail", 2000..2005, &[("acks", "all")]);
    assert_eq!(acked.first().unwrap().offset, high);
}

/// acks=1 and acks=all producers on the same partitions at once. acks=1 batches are written
/// without O_DSYNC, so an acks=all batch queued behind them cannot count its own O_DSYNC write
/// as durable: the broker must still fdatasync the earlier writes before answering. Every
/// record of both producers is answered in time and read back; a kill -9 afterwards loses
/// none of them (all were at least written).
#[test]
fn acks_1_and_acks_all_on_the_same_partitions_are_all_answered() {
    let mut b = Broker::start(2);
    admin::create(&b, "mixed", 2, 1, &[]).unwrap();
    let cfg = b.client_config();
    let settings = |acks| {
        [
            ("acks", acks),
            ("linger.ms", "0"),
            ("message.timeout.ms", "30000"),
        ]
    };
    let c1 = cfg.clone();
    let one = std::thread::spawn(move || produce(&c1, "mixed", 0..20_000, &settings("1")));
    let all = produce(&cfg, "mixed", 20_000..40_000, &settings("all"));
    let mut acked = one.join().unwrap();
    acked.extend(all);
    acked.sort_by_key(|a| a.idx);
    // Both paths ran: O_DSYNC writes, and fdatasyncs of partitions written plainly before.
    assert!(b.metric("weir_durable_write_duration_seconds_count") > 0.0);
    assert!(b.metric("weir_fdatasync_duration_seconds_count") > 0.0);
    b.kill9();
    b.restart();
    let got = consume(
        &b.client_config(),
        "mixed",
        2,
        acked.len(),
        Duration::from_secs(60),
    );
    // Two producers interleave, so only each record's place is checked (not send order).
    assert_eq!(
        acknowledged_in_place(&acked, &got),
        acked.len(),
        "records read back"
    );
}
