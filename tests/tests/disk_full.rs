//! A full disk, for real: the broker's data directory is a small ext4 filesystem on a loop
//! device (the tests run as root, as CI does). Filling it must never cost an acknowledged
//! record: appends are refused promptly with KAFKA_STORAGE_ERROR, acks=1 is never acknowledged
//! for bytes that did not reach the disk, reads go on, DeleteTopics still works (so space can
//! be freed through Kafka), SIGTERM stays clean, and the partition takes appends again by itself
//! once there is room.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use weir_tests::raw::Conn;
use weir_tests::workload::{producer, Acked};
use weir_tests::{admin, eventually, Broker};

const KAFKA_STORAGE_ERROR: i16 = 56;

/// An ext4 filesystem of `mib` MiB in an image file, loop-mounted at `mnt`; unmounted on drop.
struct LoopFs {
    mnt: PathBuf,
}

impl LoopFs {
    fn mount(img: &Path, mnt: &Path, mib: u64) -> LoopFs {
        std::fs::create_dir_all(mnt).unwrap();
        let f = std::fs::File::create(img).unwrap();
        f.set_len(mib << 20).unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(
                out.status.success(),
                "{cmd:?} failed (this test needs root and loop devices): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(img));
        run(Command::new("mount").args(["-o", "loop"]).arg(img).arg(mnt));
        LoopFs {
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Fills the filesystem with a plain file until it is full, as another process would.
fn fill_up(dir: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("other-process-ballast")).unwrap();
    let block = vec![0xabu8; 4 << 10];
    let mut written = 0u64;
    while let Ok(n) = f.write(&block) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    let _ = f.sync_all();
    written
}

fn payload(i: usize) -> Vec<u8> {
    let mut v = format!("record-{i}-").into_bytes();
    v.resize(1024, b'a' + (i % 26) as u8);
    v
}

/// Reads `topic`-0 from the beginning until `until` (exclusive offset) or `timeout`.
fn read_all(b: &Broker, topic: &str, until: i64, timeout: Duration) -> BTreeMap<i64, Vec<u8>> {
    let mut cfg = b.client_config();
    cfg.set("group.id", "disk-full-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100");
    let c: BaseConsumer = cfg.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.insert(m.offset(), m.payload().unwrap_or_default().to_vec());
            if m.offset() + 1 >= until {
                break;
            }
        }
    }
    out
}

/// Every acknowledged record is at its acknowledged offset with its payload.
fn check_acked(acked: &[Acked], got: &BTreeMap<i64, Vec<u8>>) {
    for a in acked {
        let v = got.get(&a.offset).unwrap_or_else(|| {
            panic!(
                "acknowledged record {} at offset {} is gone",
                a.idx, a.offset
            )
        });
        assert_eq!(
            v,
            &payload(a.idx),
            "record {} at offset {}",
            a.idx,
            a.offset
        );
    }
}

fn produce_until_full(b: &Broker, topic: &str, max_records: usize) -> (Vec<Acked>, usize) {
    let mut cfg = b.client_config();
    cfg.set("acks", "1")
        .set("enable.idempotence", "false")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "5000");
    let (p, acks) = producer(&cfg);
    let mut sent = 0;
    while sent < max_records && acks.failed.load(Ordering::Relaxed) == 0 {
        for _ in 0..500 {
            let v = payload(sent);
            let mut rec = BaseRecord::<(), _, _>::with_opaque_to(topic, Box::new(sent))
                .payload(&v)
                .partition(0);
            loop {
                match p.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        rec = r;
                        p.poll(Duration::from_millis(5));
                    }
                }
            }
            sent += 1;
        }
        p.poll(Duration::from_millis(1));
    }
    let _ = p.flush(Duration::from_secs(30));
    let mut v = acks.acked.lock().unwrap().clone();
    v.sort_by_key(|a| a.offset);
    (v, acks.failed.load(Ordering::Relaxed))
}

#[test]
fn full_disk_refuses_promptly_loses_nothing_and_recovers_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tempfile::tempdir().unwrap();
    let fs = LoopFs::mount(&img.path().join("fs.img"), &tmp.path().join("data"), 96);
    let mut b = Broker::start_in(tmp, 1, &[]);
    let data = b.data_dir();
    assert!(eventually(Duration::from_secs(10), || data
        .join(".weir-reserve")
        .exists()));

    // Someone else's topic takes a good part of the disk; it is what the operator deletes later.
    admin::create(&b, "filler", 1, 1, &[("segment.bytes", "4194304")]).unwrap();
    let mut cfg = b.client_config();
    cfg.set("acks", "all").set("linger.ms", "5");
    let (p, acks) = producer(&cfg);
    let big = vec![7u8; 60 << 10];
    for i in 0..400 {
        let mut rec = BaseRecord::<(), _, _>::with_opaque_to("filler", Box::new(i)).payload(&big);
        while let Err((_, r)) = p.send(rec) {
            rec = r;
            p.poll(Duration::from_millis(5));
        }
    }
    p.flush(Duration::from_secs(60)).unwrap();
    assert_eq!(acks.failed.load(Ordering::Relaxed), 0);

    // Fill the rest through Kafka, acks=1, until the broker refuses.
    admin::create(&b, "t", 1, 1, &[]).unwrap();
    let (acked, failed) = produce_until_full(&b, "t", 200_000);
    assert!(failed > 0, "the disk never filled up");
    assert!(!acked.is_empty());
    eprintln!(
        "acknowledged {} records before the disk filled; {failed} failed",
        acked.len()
    );
    // And fill what is left, as another process on the machine would.
    let filled = fill_up(&fs.mnt);
    eprintln!("another process took the last {filled} bytes");

    // A produce is answered promptly with KAFKA_STORAGE_ERROR.
    let mut conn = Conn::new(&b.bootstrap());
    let t0 = Instant::now();
    let (code, _) = conn.produce("t", 0, -1, -1, -1, 3);
    assert_eq!(code, KAFKA_STORAGE_ERROR, "produce to a full disk");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "answered promptly: {:?}",
        t0.elapsed()
    );

    // Reads go on: every acknowledged record is there.
    let until = acked.last().unwrap().offset + 1;
    let got = read_all(&b, "t", until, Duration::from_secs(30));
    check_acked(&acked, &got);

    // SIGTERM while full is a clean shutdown.
    assert!(b.stop(), "clean exit while the disk is full:\n{}", b.log());
    assert!(data.join(".weir_clean_shutdown").exists());
    b.restart();
    let got = read_all(&b, "t", until, Duration::from_secs(30));
    check_acked(&acked, &got);
    // Still full after the restart (recovery trimmed the preallocated tail, so a little fits).
    let (acked2, failed) = produce_until_full(&b, "t", 200_000);
    assert!(failed > 0, "the disk is still full");
    let mut conn = Conn::new(&b.bootstrap());
    assert_eq!(conn.produce("t", 0, -1, -1, -1, 3).0, KAFKA_STORAGE_ERROR);

    // Space is freed through Kafka: DeleteTopics works on the full disk.
    admin::delete(&b, "filler").expect("DeleteTopics while the disk is full");
    // The partition comes back by itself.
    let mut conn = Conn::new(&b.bootstrap());
    let back = eventually(Duration::from_secs(30), || {
        conn.produce("t", 0, -1, -1, -1, 3).0 == 0
    });
    assert!(back, "partition did not take appends again:\n{}", b.log());
    let (more, failed) = produce_until_full(&b, "t", 2_000);
    assert_eq!(failed, 0);
    assert_eq!(more.len(), 2_000);

    // Nothing acknowledged was lost, across everything, including a kill -9 now.
    b.kill9();
    b.restart();
    let until = more.last().unwrap().offset + 1;
    let got = read_all(&b, "t", until, Duration::from_secs(60));
    check_acked(&acked, &got);
    check_acked(&acked2, &got);
    check_acked(&more, &got);
    let log = b.log();
    assert!(!log.contains("panicked"));
    assert!(
        log.contains("disk full"),
        "the partition stalled on a full disk:\n{log}"
    );
    assert!(log.contains("disk space is back"));
    assert!(
        log.contains("released the"),
        "DeleteTopics used the reserve"
    );
    drop(b);
    drop(fs);
}
