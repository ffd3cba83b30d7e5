//! The broker process's lifecycle: one broker per data directory and per port, the advertised
//! listener from server.properties, no request answered before every shard opened its
//! partitions, and a bounded clean shutdown while producers and long-polling consumers are
//! connected.

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{
    ApiKey, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use weir_tests::raw::Conn;
use weir_tests::workload::{self, consume, produce, verify};
use weir_tests::{admin, broker_binary, eventually, free_port, Broker};

const NOT_LEADER_OR_FOLLOWER: i16 = 6;
const CLEAN_SHUTDOWN_MARKER: &str = ".weir_clean_shutdown";

/// A broker process started by hand (not through `Broker`), killed when dropped.
struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Proc {
    fn start(args: &[&str], log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("proc-{}.log", free_port()));
        let child = Command::new(broker_binary())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting broker");
        Proc { child, log }
    }

    /// Waits up to `timeout` for the process to exit.
    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        let mut s = String::new();
        std::fs::File::open(&self.log)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_second_broker_on_the_same_data_dir_refuses_to_start() {
    let mut b = Broker::start(1);
    admin::create(&b, "locked", 2, 1, &[]).unwrap();
    let mut acked = produce(&b.client_config(), "locked", 0..500, &[("acks", "all")]);

    let other_port = free_port().to_string();
    let data_dir = b.data_dir();
    let started = Instant::now();
    let mut second = Proc::start(
        &[
            "--listen",
            &format!("127.0.0.1:{other_port}"),
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--shards",
            "1",
        ],
        b.dir.path(),
    );
    let status = second.wait(Duration::from_secs(20));
    let log = second.log();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second broker must exit non-zero, got {status:?}:\n{log}"
    );
    eprintln!(
        "second broker exited after {:?}: {}",
        started.elapsed(),
        log.lines().last().unwrap_or_default()
    );
    assert!(
        log.contains("lock") && log.contains(data_dir.to_str().unwrap()),
        "the error names the lock and the data dir:\n{log}"
    );

    // The first broker is undisturbed: it takes more records and serves all of them.
    assert!(b.is_running());
    acked.extend(produce(
        &b.client_config(),
        "locked",
        500..1000,
        &[("acks", "all")],
    ));
    acked.sort_by_key(|a| a.idx);
    let got = consume(
        &b.client_config(),
        "locked",
        2,
        1000,
        Duration::from_secs(30),
    );
    verify(&acked, &got);
    assert!(b.stop());
}

#[test]
fn a_second_broker_on_the_same_port_fails_with_address_in_use() {
    let mut b = Broker::start(2);
    admin::create(&b, "port", 4, 1, &[]).unwrap();

    let other = tempfile::tempdir().unwrap();
    let mut second = Proc::start(
        &[
            "--listen",
            &b.bootstrap(),
            "--data-dir",
            other.path().join("data").to_str().unwrap(),
            "--shards",
            "2",
        ],
        other.path(),
    );
    let status = second.wait(Duration::from_secs(20));
    let log = second.log();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second broker must exit non-zero, got {status:?}:\n{log}"
    );
    assert!(
        log.to_lowercase().contains("address in use"),
        "the error says the address is in use:\n{log}"
    );

    // Every client connection (one per producer, several producers) reaches the first broker.
    let mut acked = Vec::new();
    for round in 0..8usize {
        acked.extend(produce(
            &b.client_config(),
            "port",
            round * 250..(round + 1) * 250,
            &[("acks", "all")],
        ));
    }
    acked.sort_by_key(|a| a.idx);
    let got = consume(&b.client_config(), "port", 4, 2000, Duration::from_secs(30));
    verify(&acked, &got);
    assert!(b.stop());
}

fn metadata_broker(bootstrap: &str) -> (String, i32) {
    metadata_broker_on(&mut Conn::new(bootstrap))
}

fn metadata_broker_on(c: &mut Conn) -> (String, i32) {
    let r: MetadataResponse = c.call(
        ApiKey::Metadata,
        12,
        &MetadataRequest::default().with_topics(Some(vec![])),
    );
    assert_eq!(r.brokers.len(), 1);
    (r.brokers[0].host.to_string(), r.brokers[0].port)
}

#[test]
fn advertised_listener_from_the_config_file_wins_over_listen() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("server.properties");
    // `listeners` names a port nobody uses: --listen wins over it.
    std::fs::write(
        &cfg,
        format!(
            "advertised.listeners=PLAINTEXT://advertised.example:19092\nlisteners=PLAINTEXT://127.0.0.1:{}\n",
            free_port()
        ),
    )
    .unwrap();
    let mut b = Broker::start_with(1, &["--config", cfg.to_str().unwrap()]);
    assert_eq!(
        metadata_broker(&b.bootstrap()),
        ("advertised.example".to_string(), 19092)
    );
    assert!(b.stop());

    // Without --listen, `listeners` from the file is the listen address, and without an
    // advertised listener it is also what Metadata announces.
    let port = free_port();
    std::fs::write(&cfg, format!("listeners=PLAINTEXT://127.0.0.1:{port}\n")).unwrap();
    let mut p = Proc::start(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            cfg_dir.path().join("data").to_str().unwrap(),
            "--shards",
            "1",
        ],
        cfg_dir.path(),
    );
    let bootstrap = format!("127.0.0.1:{port}");
    assert!(
        eventually(Duration::from_secs(20), || TcpStream::connect(&bootstrap)
            .is_ok()),
        "listening on the file's listener:\n{}",
        p.log()
    );
    assert_eq!(
        metadata_broker(&bootstrap),
        ("127.0.0.1".to_string(), port as i32)
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc_kill(p.child.id() as i32, 15) };
    assert!(p.wait(Duration::from_secs(30)).is_some_and(|s| s.success()));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// One ListOffsets (latest) for partitions 0..partitions of `topic` on a raw connection:
/// every partition's error code, or the I/O error that ended the connection.
fn list_offsets_errors(
    s: &mut TcpStream,
    correlation_id: i32,
    topic: &str,
    partitions: i32,
) -> std::io::Result<Vec<i16>> {
    use bytes::{Bytes, BytesMut};
    use kafka_protocol::messages::{RequestHeader, ResponseHeader};
    use kafka_protocol::protocol::{Decodable, Encodable};
    use std::io::Write;
    let version = 7;
    let req = ListOffsetsRequest::default()
        .with_replica_id((-1).into())
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(
                (0..partitions)
                    .map(|p| {
                        ListOffsetsPartition::default()
                            .with_partition_index(p)
                            .with_timestamp(-1)
                    })
                    .collect(),
            )]);
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::ListOffsets as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .encode(
            &mut buf,
            ApiKey::ListOffsets.request_header_version(version),
        )
        .unwrap();
    req.encode(&mut buf, version).unwrap();
    s.write_all(&weir_tests::raw::frame(&buf))?;
    let mut size = [0u8; 4];
    s.read_exact(&mut size)?;
    let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
    s.read_exact(&mut body)?;
    let mut body = Bytes::from(body);
    let h = ResponseHeader::decode(
        &mut body,
        ApiKey::ListOffsets.response_header_version(version),
    )
    .unwrap();
    assert_eq!(h.correlation_id, correlation_id);
    let r = ListOffsetsResponse::decode(&mut body, version).unwrap();
    Ok(r.topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| p.error_code))
        .collect())
}

#[test]
fn after_recovery_no_partition_is_missing_once_the_port_accepts() {
    const PARTITIONS: i32 = 200;
    let mut b = Broker::start(2);
    admin::create(&b, "many", PARTITIONS, 1, &[]).unwrap();
    // Partitions are assigned to shards round-robin; shard 1's get far more batches to
    // recover, so the shards finish opening at different times.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.data_dir().join("weir-metadata.json")).unwrap())
            .unwrap();
    let heavy: Vec<i32> = meta["topics"]["many"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, p)| p["shard"].as_u64() == Some(1))
        .map(|(i, _)| i as i32)
        .collect();
    assert!(!heavy.is_empty());
    let mut cfg = b.client_config();
    cfg.set("acks", "all")
        .set("linger.ms", "0")
        .set("batch.num.messages", "1");
    let (p, acks) = workload::producer(&cfg);
    let n = 20_000usize;
    for i in 0..n {
        let v = workload::value(i);
        let part = if i % 10 == 0 {
            (i / 10) as i32 % PARTITIONS
        } else {
            heavy[i % heavy.len()]
        };
        let mut rec =
            rdkafka::producer::BaseRecord::<(), _, _>::with_opaque_to("many", Box::new(i))
                .partition(part)
                .payload(&v);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    p.poll(Duration::from_millis(5));
                }
            }
        }
    }
    p.flush(Duration::from_secs(120)).unwrap();
    assert_eq!(acks.acked.lock().unwrap().len(), n);
    drop(p);
    b.kill9();
    // The killed process's listening socket can outlive it for a moment (its io_uring is torn
    // down asynchronously): start polling once the port refuses connections.
    assert!(eventually(Duration::from_secs(10), || TcpStream::connect(
        b.bootstrap()
    )
    .is_err()));

    // Poll from before the restart: connect as soon as the port accepts and ask for every
    // partition's end offset, again and again.
    let bootstrap = b.bootstrap();
    let done = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let poller = {
        let (done, rounds, seen) = (done.clone(), rounds.clone(), seen.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let Ok(mut c) = TcpStream::connect(&bootstrap) else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                while !done.load(Ordering::Relaxed) {
                    let round = rounds.fetch_add(1, Ordering::Relaxed);
                    match list_offsets_errors(&mut c, round as i32, "many", PARTITIONS) {
                        Ok(errors) => {
                            let not_leader = errors
                                .iter()
                                .filter(|e| **e == NOT_LEADER_OR_FOLLOWER)
                                .count();
                            let other = errors.iter().filter(|e| **e != 0).count() - not_leader;
                            if not_leader + other > 0 {
                                seen.lock().unwrap().push(format!(
                                    "round {round}: {not_leader} NOT_LEADER_OR_FOLLOWER, {other} other errors"
                                ));
                            }
                        }
                        Err(e) => {
                            seen.lock()
                                .unwrap()
                                .push(format!("round {round}: connection failed: {e}"));
                            break;
                        }
                    }
                }
            }
        })
    };
    let t = Instant::now();
    b.restart();
    eprintln!("restart took {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    poller.join().unwrap();
    let rounds = rounds.load(Ordering::Relaxed);
    let seen = seen.lock().unwrap();
    eprintln!(
        "{rounds} ListOffsets rounds, {} failed: {:?}",
        seen.len(),
        seen.first()
    );
    assert!(rounds > 0);
    assert!(
        seen.is_empty(),
        "after the port accepted, ListOffsets failed:\n{}",
        seen.join("\n")
    );
    assert!(b.stop());
}

/// A raw long poll: Fetch of an idle partition that waits up to `max_wait_ms`. Returns when
/// answered or when the connection ends.
fn raw_long_poll(bootstrap: &str, topic: &str, max_wait_ms: i32) -> std::thread::JoinHandle<()> {
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(move || {
            let mut c = Conn::new(&bootstrap);
            c.fetch(&topic, 0, 0, max_wait_ms, 1)
        });
        let _ = r;
    })
}

#[test]
fn sigterm_under_load_finishes_promptly_and_cleanly() {
    let mut b = Broker::start(2);
    admin::create(&b, "load", 4, 1, &[]).unwrap();
    admin::create(&b, "idle", 2, 1, &[]).unwrap();
    let mut acked_total = 0usize;
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        // Producers: acks=all, sending without pause.
        let mut cfg = b.client_config();
        cfg.set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "5000")
            .set("retries", "0");
        let mut threads = Vec::new();
        let acked = Arc::new(Mutex::new(Vec::new()));
        for t in 0..2usize {
            let (cfg, stop, acked) = (cfg.clone(), stop.clone(), acked.clone());
            threads.push(std::thread::spawn(move || {
                let (p, acks) = workload::producer(&cfg);
                let mut i = t * 10_000_000;
                while !stop.load(Ordering::Relaxed) {
                    workload::send(&p, "load", i);
                    i += 1;
                    p.poll(Duration::ZERO);
                    if i % 64 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                p.poll(Duration::from_millis(100));
                let _ = p.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
                acked
                    .lock()
                    .unwrap()
                    .extend(acks.acked.lock().unwrap().iter().copied());
            }));
        }
        // Consumers: librdkafka long-polling an idle topic for 10 s, one tailing the busy one.
        for (topic, wait_ms) in [("idle", "10000"), ("idle", "10000"), ("load", "10000")] {
            let (mut cfg, stop) = (b.client_config(), stop.clone());
            cfg.set("group.id", "lifecycle")
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", wait_ms)
                .set("fetch.min.bytes", "1000000")
                .set("reconnect.backoff.ms", "50");
            threads.push(std::thread::spawn(move || {
                let c: BaseConsumer = cfg.create().unwrap();
                let mut tpl = TopicPartitionList::new();
                for p in 0..2 {
                    tpl.add_partition_offset(topic, p, Offset::End).unwrap();
                }
                c.assign(&tpl).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let _ = c.poll(Duration::from_millis(50));
                }
            }));
        }
        // Raw long polls that would wait a full minute.
        let polls: Vec<_> = (0..2)
            .map(|_| raw_long_poll(&b.bootstrap(), "idle", 60_000))
            .collect();
        std::thread::sleep(Duration::from_millis(1500));

        let t = Instant::now();
        let stopped = b.stop();
        let took = t.elapsed();
        let log = b.log();
        eprintln!("round {round}: SIGTERM to exit took {took:?}");
        assert!(stopped, "clean exit (status 0):\n{log}");
        assert!(
            took < Duration::from_secs(10),
            "shutdown took {took:?}:\n{log}"
        );
        assert!(
            b.data_dir().join(CLEAN_SHUTDOWN_MARKER).exists(),
            "clean-shutdown marker written"
        );
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        for p in polls {
            p.join().unwrap();
        }

        // Every acknowledged record is there after the restart.
        b.restart();
        let acked = acked.lock().unwrap();
        acked_total += acked.len();
        let mut c = Conn::new(&b.bootstrap());
        for part in 0..4 {
            let end = c.offset("load", part, -1);
            let top = acked
                .iter()
                .filter(|a| a.partition == part)
                .map(|a| a.offset + 1)
                .max()
                .unwrap_or(0);
            assert!(end >= top, "partition {part}: end {end} < acked {top}");
        }
    }
    eprintln!("{acked_total} records acknowledged over the rounds");
    assert!(acked_total > 0, "producers were running");
    assert!(b.stop());
}

/// Both shards accept connections on the port: the kernel spreads a burst of connections over
/// their sockets. Each shard logs at shutdown how many it had open.
#[test]
fn connections_are_spread_over_the_shards() {
    let mut b = Broker::start(2);
    let conns: Vec<Conn> = (0..64).map(|_| Conn::new(&b.bootstrap())).collect();
    // A request on each proves it was accepted.
    let mut conns = conns;
    for c in conns.iter_mut() {
        metadata_broker_on(c);
    }
    assert!(b.stop());
    // The log has ANSI colours around field names.
    let mut log = String::new();
    let raw_log = b.log();
    let mut chars = raw_log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            log.push(c);
        }
    }
    let per_shard: Vec<usize> = log
        .lines()
        .filter(|l| l.contains("shutting down: answering in-flight requests"))
        .map(|l| {
            let at = l.find("connections=").expect("connections field") + "connections=".len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    eprintln!("connections per shard: {per_shard:?}");
    assert_eq!(per_shard.len(), 2, "{log}");
    assert_eq!(per_shard.iter().sum::<usize>(), 64);
    assert!(per_shard.iter().all(|n| *n > 0), "{per_shard:?}");
    drop(conns);
}

/// A client that sends fetches and never reads the responses keeps its connection open past
/// the drain timeout: the broker still exits within the shutdown bound, non-zero and without
/// the clean-shutdown marker, and the next start recovers every acknowledged record.
#[test]
fn a_client_that_never_reads_cannot_hold_up_shutdown() {
    use std::io::Write;
    let mut b = Broker::start(1);
    admin::create(&b, "big", 1, 1, &[]).unwrap();
    let acked = produce(&b.client_config(), "big", 0..20_000, &[("acks", "all")]);
    let end = acked.iter().map(|a| a.offset + 1).max().unwrap();

    // 32 fetches of up to 1 MiB each (more than the socket buffers hold), never read.
    let mut s = TcpStream::connect(b.bootstrap()).unwrap();
    for cid in 0..32 {
        use bytes::BytesMut;
        use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
        use kafka_protocol::messages::{FetchRequest, RequestHeader};
        use kafka_protocol::protocol::Encodable;
        let req = FetchRequest::default()
            .with_replica_id((-1).into())
            .with_max_wait_ms(0)
            .with_max_bytes(1 << 20)
            .with_session_epoch(-1)
            .with_topics(vec![FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_static_str("big")))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(0)
                    .with_fetch_offset(0)
                    .with_partition_max_bytes(1 << 20)])]);
        let mut buf = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(ApiKey::Fetch as i16)
            .with_request_api_version(12)
            .with_correlation_id(cid)
            .encode(&mut buf, ApiKey::Fetch.request_header_version(12))
            .unwrap();
        req.encode(&mut buf, 12).unwrap();
        s.write_all(&weir_tests::raw::frame(&buf)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));

    let t = Instant::now();
    let stopped = b.stop();
    let took = t.elapsed();
    let log = b.log();
    eprintln!("SIGTERM to exit took {took:?}");
    assert!(!stopped, "exit status non-zero:\n{log}");
    assert!(took < Duration::from_secs(10), "bounded: took {took:?}");
    assert!(log.contains("connections still open"), "{log}");
    assert!(
        !b.data_dir().join(CLEAN_SHUTDOWN_MARKER).exists(),
        "no clean-shutdown marker"
    );
    drop(s);

    b.restart();
    assert!(b.log().contains("recovering the tail"));
    assert_eq!(Conn::new(&b.bootstrap()).offset("big", 0, -1), end);
    assert!(b.stop());
}
