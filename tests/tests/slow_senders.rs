//! Slow and stalled senders (issue #9): bytes that have not arrived reserve no request memory,
//! so sockets that announce huge frames and then trickle or stall cannot freeze other clients;
//! a stalled partial frame is closed; a slow but steady sender still gets its request through;
//! connection-level warnings are rate-limited.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, RequestHeader,
    ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::Compression;
use rdkafka::producer::Producer;
use weir_tests::{admin, raw, workload, Broker};

/// The default `socket.request.max.bytes`: the largest frame a client may announce.
const FRAME_MAX_BYTES: i32 = 100 << 20;

/// A request encoded as one size-prefixed frame.
fn request_frame<Req: Encodable>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    req: &Req,
) -> Vec<u8> {
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("slow-senders")))
        .encode(&mut buf, key.request_header_version(version))
        .unwrap();
    req.encode(&mut buf, version).unwrap();
    raw::frame(&buf)
}

/// Reads one response frame; None when the socket times out or closes first.
fn read_response<Resp: Decodable>(
    s: &mut TcpStream,
    key: ApiKey,
    version: i16,
    correlation_id: i32,
) -> Option<Resp> {
    let mut size = [0u8; 4];
    s.read_exact(&mut size).ok()?;
    let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
    s.read_exact(&mut body).ok()?;
    let mut body = Bytes::from(body);
    let h = ResponseHeader::decode(&mut body, key.response_header_version(version)).unwrap();
    assert_eq!(h.correlation_id, correlation_id);
    Some(Resp::decode(&mut body, version).unwrap())
}

/// A Metadata request on a fresh connection is answered within `deadline`.
fn metadata_answered(b: &Broker, deadline: Duration) -> bool {
    let mut s = TcpStream::connect(b.bootstrap()).unwrap();
    s.set_read_timeout(Some(deadline)).unwrap();
    let req = MetadataRequest::default().with_topics(None);
    s.write_all(&request_frame(ApiKey::Metadata, 1, 5, &req))
        .unwrap();
    let r: Option<MetadataResponse> = read_response(&mut s, ApiKey::Metadata, 1, 5);
    r.is_some_and(|r| !r.brokers.is_empty())
}

/// Waits until the broker closes `s` (EOF or reset) or `limit` passes; returns how long it took.
fn wait_closed(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 256];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(start.elapsed()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => panic!("reading: {e}"),
        }
    }
    None
}

/// True when the broker has neither closed `s` nor sent anything on it.
fn still_open(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    let open = matches!((&*s).read(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    open
}

#[test]
fn huge_announced_frames_do_not_stall_other_clients() {
    let b = Broker::start(2);
    admin::create(&b, "steady", 2, 1, &[]).unwrap();

    // 32 connections (so each of the two shards surely gets at least four) each announce a
    // 64 MiB frame, then trickle one byte per second: they make progress, so they stay
    // connected for the whole test, yet together they announce 2 GiB (four of them would have
    // reserved a whole shard's 256 MiB of request memory before the fix).
    const SLOW: usize = 32;
    const ANNOUNCED_BYTES: i32 = 64 << 20;
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|_| {
            let mut s = TcpStream::connect(b.bootstrap()).unwrap();
            s.write_all(&ANNOUNCED_BYTES.to_be_bytes()).unwrap();
            s.write_all(&[0u8; 3]).unwrap();
            s
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let stop = stop.clone();
        let mut socks: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for s in socks.iter_mut() {
                    // A failed write shows up below as a closed socket.
                    let _ = s.write_all(&[0u8]);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    // Let the broker read every size prefix before the normal client starts.
    std::thread::sleep(Duration::from_millis(500));

    // Liveness deadline: far below the 60 s the old body timeout froze the shards for.
    let deadline = Duration::from_secs(20);
    let started = Instant::now();
    let mut cfg = b.client_config();
    cfg.set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", deadline.as_millis().to_string());
    let (p, acks) = workload::producer(&cfg);
    for i in 0..1000 {
        workload::send(&p, "steady", i);
    }
    let flushed = p.flush(deadline);
    let acked = acks.acked.lock().unwrap().len();
    let produce_took = started.elapsed();
    // Metadata on fresh connections (they land on either shard) is answered too.
    let metadata: Vec<bool> = (0..4).map(|_| metadata_answered(&b, deadline)).collect();
    let took = started.elapsed();

    stop.store(true, Ordering::Relaxed);
    trickler.join().unwrap();
    let open = slow.iter().filter(|s| still_open(s)).count();
    eprintln!(
        "acked {acked}/1000 in {produce_took:?}; metadata {metadata:?}; all done in {took:?}; \
         {open}/{SLOW} slow senders still connected"
    );
    assert!(flushed.is_ok(), "every record acknowledged: {flushed:?}");
    assert_eq!(acked, 1000, "every record acknowledged");
    assert_eq!(acks.failed.load(Ordering::Relaxed), 0);
    assert!(metadata.iter().all(|m| *m), "every Metadata answered");
    assert_eq!(
        open, SLOW,
        "the slow senders were still connected throughout"
    );
    slow.clear();
    let log = b.log();
    assert!(!log.contains("panicked"), "no panic:\n{log}");
}

/// A Produce v9 request with one batch of `count` records of `value_bytes` each (no producer
/// id) for each of partitions `0..partitions`.
fn produce_frame(
    topic: &str,
    partitions: i32,
    count: usize,
    value_bytes: usize,
    correlation_id: i32,
) -> Vec<u8> {
    let records = (0..count).map(|i| {
        (
            Some(Bytes::from(format!("k{i}"))),
            Some(Bytes::from(vec![b'a' + (i % 26) as u8; value_bytes])),
            workload::timestamp(i),
        )
    });
    let batch = raw::batch(records, -1, -1, -1, Compression::None);
    let req = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partition_data(
                (0..partitions)
                    .map(|p| {
                        PartitionProduceData::default()
                            .with_index(p)
                            .with_records(Some(batch.clone()))
                    })
                    .collect(),
            )]);
    request_frame(ApiKey::Produce, 9, correlation_id, &req)
}

#[test]
fn slow_but_steady_sender_is_accepted() {
    let b = Broker::start(1);
    admin::create(&b, "dribble", 1, 1, &[]).unwrap();
    // ~0.9 MiB (under the 1 MiB message.max.bytes), sent 16 KiB every 100 ms: about 6 s.
    let frame = produce_frame("dribble", 1, 900, 1000, 11);
    assert!(frame.len() > 900_000);
    let mut s = TcpStream::connect(b.bootstrap()).unwrap();
    s.set_nodelay(true).unwrap();
    let started = Instant::now();
    for piece in frame.chunks(16 << 10) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent_in = started.elapsed();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let r: ProduceResponse =
        read_response(&mut s, ApiKey::Produce, 9, 11).expect("a produce response");
    let p = &r.responses[0].partition_responses[0];
    eprintln!("{} bytes sent in {sent_in:?}", frame.len());
    assert!(
        sent_in > Duration::from_secs(3),
        "the frame really was dribbled"
    );
    assert_eq!((p.error_code, p.base_offset), (0, 0));
    let mut c = raw::Conn::new(&b.bootstrap());
    assert_eq!(c.offset("dribble", 0, -1), 900, "all 900 records stored");
}

#[test]
fn large_frames_from_many_connections_all_complete() {
    // Six ~22 MiB frames at once on one shard: together far more than the 64 MiB partial-frame
    // pool and each more than one connection's 16 MiB share, so frames must pass one at a time
    // through the overdraft; if partial frames could wedge each other, none would finish.
    const PARTITIONS: i32 = 24;
    const SENDERS: usize = 6;
    let b = Broker::start(1);
    admin::create(&b, "big", PARTITIONS, 1, &[]).unwrap();
    let frame = Arc::new(produce_frame("big", PARTITIONS, 900, 1000, 21));
    assert!(frame.len() > 20 << 20);
    let started = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (bootstrap, frame) = (b.bootstrap(), frame.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(bootstrap).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                s.write_all(&frame).unwrap();
                let r: ProduceResponse =
                    read_response(&mut s, ApiKey::Produce, 9, 21).expect("a produce response");
                r.responses[0]
                    .partition_responses
                    .iter()
                    .map(|p| p.error_code)
                    .collect::<Vec<i16>>()
            })
        })
        .collect();
    for s in senders {
        let codes = s.join().unwrap();
        assert_eq!(codes, vec![0; PARTITIONS as usize]);
    }
    eprintln!(
        "{SENDERS} frames of {} bytes in {:?}",
        frame.len(),
        started.elapsed()
    );
    let mut c = raw::Conn::new(&b.bootstrap());
    for p in 0..PARTITIONS {
        assert_eq!(c.offset("big", p, -1), 900 * SENDERS as i64);
    }
    assert!(!b.log().contains("closing connection"), "{}", b.log());
}

#[test]
fn stalled_partial_frames_are_closed() {
    let b = Broker::start(1);
    // One announces a frame and sends part of it; the other sends only a size prefix.
    let mut part = 1000i32.to_be_bytes().to_vec();
    part.extend_from_slice(&[0u8; 10]);
    let announced = FRAME_MAX_BYTES.to_be_bytes().to_vec();
    let waiters: Vec<_> = [part, announced]
        .into_iter()
        .map(|bytes| {
            let bootstrap = b.bootstrap();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(bootstrap).unwrap();
                s.write_all(&bytes).unwrap();
                wait_closed(&mut s, Duration::from_secs(40))
            })
        })
        .collect();
    for w in waiters {
        let closed_after = w.join().unwrap();
        eprintln!("stalled frame closed after {closed_after:?}");
        let closed_after = closed_after.expect("the broker closes a stalled partial frame");
        // Given some time (a sender may pause), but far less than the old 60 s.
        assert!(closed_after > Duration::from_secs(5), "{closed_after:?}");
        assert!(closed_after < Duration::from_secs(30), "{closed_after:?}");
    }
    // The broker still serves.
    assert!(metadata_answered(&b, Duration::from_secs(10)));
}

/// Drops ANSI colour sequences (the broker's log is written as if to a terminal).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// (warning lines about bad size prefixes, total of the suppressed counts)
fn warn_counts(b: &Broker) -> (usize, u64) {
    let log = strip_ansi(&b.log());
    let logged = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("frame size out of range"))
        .count();
    let suppressed = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("connection warnings suppressed"))
        .map(|l| {
            let at = l.find("suppressed=").expect("a suppressed= field") + "suppressed=".len();
            let digits: String = l[at..].chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse::<u64>().unwrap()
        })
        .sum();
    (logged, suppressed)
}

#[test]
fn connection_warnings_are_rate_limited() {
    let b = Broker::start(2);
    const BAD: usize = 500;
    let started = Instant::now();
    for i in 0..BAD {
        let mut s = TcpStream::connect(b.bootstrap()).unwrap();
        let size = [-1i32, 0, i32::MAX, FRAME_MAX_BYTES + 1][i % 4];
        s.write_all(&size.to_be_bytes()).unwrap();
        assert!(
            wait_closed(&mut s, Duration::from_secs(10)).is_some(),
            "a bad size prefix closes the connection"
        );
    }
    let sent_in = started.elapsed();
    // Every rejection is either logged or counted in a summary line, which comes at the end of
    // its window (10 s).
    let accounted = weir_tests::eventually(Duration::from_secs(30), || {
        let (logged, suppressed) = warn_counts(&b);
        logged as u64 + suppressed == BAD as u64
    });
    let (logged, suppressed) = warn_counts(&b);
    eprintln!("{BAD} bad connections in {sent_in:?}: {logged} warnings, {suppressed} suppressed");
    assert!(
        accounted,
        "{logged} logged + {suppressed} suppressed == {BAD}"
    );
    // At most 20 per 10 s window per shard; the connections took `sent_in`.
    let windows = sent_in.as_secs() / 10 + 2;
    let bound = 20 * b.shards * windows as usize;
    assert!(logged <= bound, "{logged} warnings (bound {bound})");
    assert!(suppressed > 0);
    assert!(metadata_answered(&b, Duration::from_secs(10)));
}
