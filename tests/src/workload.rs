//! A deterministic keyed workload: record `i` has a known key, value, headers and timestamp, so
//! whatever a consumer reads back can be checked field by field.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// Record timestamps start an hour before this test process started: recent enough that no
/// default time-based retention applies, fixed for the whole process.
pub fn base_timestamp_ms() -> i64 {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        now - 3_600_000
    })
}

pub fn key(i: usize) -> String {
    format!("key-{}", i % 997)
}

pub fn value(i: usize) -> Vec<u8> {
    let mut v = format!("value-{i}-").into_bytes();
    // Varying sizes (40..140 bytes) with compressible and incompressible parts.
    let extra = 40 + (i * 7919) % 100;
    v.extend((0..extra).map(|j| b'a' + ((i + j * j) % 26) as u8));
    v
}

pub fn timestamp(i: usize) -> i64 {
    base_timestamp_ms() + i as i64
}

/// What the producer learned about one record from its acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acked {
    pub idx: usize,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Default)]
pub struct Acks {
    pub acked: Mutex<Vec<Acked>>,
    pub failed: AtomicUsize,
    pub last_error: Mutex<Option<String>>,
}

#[derive(Clone)]
pub struct Ctx(pub Arc<Acks>);

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Box<usize>;
    fn delivery(&self, r: &DeliveryResult<'_>, idx: Box<usize>) {
        match r {
            Ok(m) => self.0.acked.lock().unwrap().push(Acked {
                idx: *idx,
                partition: m.partition(),
                offset: m.offset(),
            }),
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                *self.0.last_error.lock().unwrap() = Some(e.to_string());
            }
        }
    }
}

pub fn producer(cfg: &ClientConfig) -> (BaseProducer<Ctx>, Arc<Acks>) {
    let acks = Arc::new(Acks::default());
    let p = cfg
        .create_with_context(Ctx(acks.clone()))
        .expect("creating producer");
    (p, acks)
}

/// Sends record `i` (retrying while librdkafka's queue is full).
pub fn send(p: &BaseProducer<Ctx>, topic: &str, i: usize) {
    if let Err(e) = try_send(p, topic, i) {
        panic!("send failed: {e}");
    }
}

/// Sends record `i`, retrying while librdkafka's queue is full; the error when the client
/// refuses it for good.
pub fn try_send(p: &BaseProducer<Ctx>, topic: &str, i: usize) -> Result<(), KafkaError> {
    let k = key(i);
    let v = value(i);
    let idx = i.to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "idx",
            value: Some(idx.as_bytes()),
        })
        .insert(Header {
            key: "kind",
            value: Some(b"test".as_slice()),
        });
    let mut rec = BaseRecord::with_opaque_to(topic, Box::new(i))
        .key(&k)
        .payload(&v)
        .headers(headers)
        .timestamp(timestamp(i));
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                p.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Produces records `range` with `settings` and waits for every acknowledgement.
pub fn produce(
    bootstrap: &ClientConfig,
    topic: &str,
    range: std::ops::Range<usize>,
    settings: &[(&str, &str)],
) -> Vec<Acked> {
    let mut cfg = bootstrap.clone();
    cfg.set("linger.ms", "5").set("message.timeout.ms", "60000");
    for (k, v) in settings {
        cfg.set(*k, *v);
    }
    let (p, acks) = producer(&cfg);
    for i in range.clone() {
        send(&p, topic, i);
        if i % 1000 == 0 {
            p.poll(Duration::ZERO);
        }
    }
    p.flush(Duration::from_secs(120)).expect("flush");
    let failed = acks.failed.load(Ordering::Relaxed);
    assert_eq!(
        failed,
        0,
        "deliveries failed: {:?}",
        acks.last_error.lock().unwrap()
    );
    let mut v = acks.acked.lock().unwrap().clone();
    assert_eq!(v.len(), range.len(), "every record acknowledged");
    v.sort_by_key(|a| a.idx);
    v
}

/// An idempotent acks=all producer sending records 0, 1, 2, ... on its own thread until
/// `finish`, through every broker of `bootstrap` (a comma-separated list).
pub struct Background {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Arc<Acks>)>,
}

pub fn background_producer(cfg: &ClientConfig, bootstrap: &str, topic: &str) -> Background {
    let mut cfg = cfg.clone();
    cfg.set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "300000")
        .set("topic.metadata.refresh.interval.ms", "500");
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, topic) = (stop.clone(), topic.to_string());
    let thread = std::thread::spawn(move || {
        let (p, acks) = producer(&cfg);
        let mut i = 0usize;
        while !flag.load(Ordering::Relaxed) {
            send(&p, &topic, i);
            i += 1;
            if i % 50 == 0 {
                p.poll(Duration::from_millis(10));
            }
        }
        p.flush(Duration::from_secs(240)).expect("flush");
        (i, acks)
    });
    Background { stop, thread }
}

impl Background {
    /// Stops sending, waits for every acknowledgement, and asserts each record sent was
    /// acknowledged. Returns them in send order.
    pub fn finish(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        let (sent, acks) = self.thread.join().expect("producer thread");
        let failed = acks.failed.load(Ordering::Relaxed);
        assert_eq!(
            failed,
            0,
            "deliveries failed: {:?}",
            acks.last_error.lock().unwrap()
        );
        let mut acked = acks.acked.lock().unwrap().clone();
        assert_eq!(acked.len(), sent, "every record acknowledged");
        acked.sort_by_key(|a| a.idx);
        acked
    }
}

#[derive(Clone, Debug)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: Option<i64>,
}

impl Consumed {
    pub fn idx(&self) -> usize {
        let h = self
            .headers
            .iter()
            .find(|(k, _)| k == "idx")
            .expect("idx header");
        std::str::from_utf8(&h.1).unwrap().parse().unwrap()
    }

    /// Asserts every field equals what record `idx` was produced with.
    pub fn check(&self) {
        let i = self.idx();
        assert_eq!(
            self.key.as_deref(),
            Some(key(i).as_bytes()),
            "key of record {i}"
        );
        assert_eq!(
            self.value.as_deref(),
            Some(value(i).as_slice()),
            "value of record {i}"
        );
        assert_eq!(
            self.timestamp,
            Some(timestamp(i)),
            "timestamp of record {i}"
        );
        assert_eq!(
            self.headers,
            vec![
                ("idx".to_string(), i.to_string().into_bytes()),
                ("kind".to_string(), b"test".to_vec())
            ]
        );
    }
}

pub fn consumer(bootstrap: &ClientConfig) -> BaseConsumer {
    let mut cfg = bootstrap.clone();
    // librdkafka needs a group.id even for assign(); nothing is committed.
    cfg.set("group.id", "weir-e2e")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "100");
    cfg.create().expect("creating consumer")
}

/// Reads partitions 0..partitions of `topic` from the beginning until `expected` records came
/// back or `timeout` passed. Returns records per partition in the order read.
pub fn consume(
    bootstrap: &ClientConfig,
    topic: &str,
    partitions: i32,
    expected: usize,
    timeout: Duration,
) -> BTreeMap<i32, Vec<Consumed>> {
    let c = consumer(bootstrap);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out: BTreeMap<i32, Vec<Consumed>> = BTreeMap::new();
    let mut n = 0;
    let deadline = Instant::now() + timeout;
    while n < expected && Instant::now() < deadline {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.entry(m.partition()).or_default().push(Consumed {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| k.to_vec()),
                    value: m.payload().map(|v| v.to_vec()),
                    headers,
                    timestamp: m.timestamp().to_millis(),
                });
                n += 1;
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    out
}

/// Checks a full read-back against the acknowledgements: every acknowledged record is at its
/// acknowledged partition and offset with every field intact, offsets within a partition are
/// consecutive from 0, and records of a partition come back in the order they were sent.
pub fn verify(acked: &[Acked], got: &BTreeMap<i32, Vec<Consumed>>) {
    let total: usize = got.values().map(|v| v.len()).sum();
    assert_eq!(total, acked.len(), "records read back");
    let mut by_idx = std::collections::HashMap::new();
    for (p, recs) in got {
        for (n, r) in recs.iter().enumerate() {
            assert_eq!(
                r.offset, n as i64,
                "partition {p}: offsets are dense and in order"
            );
            r.check();
            by_idx.insert(r.idx(), (*p, r.offset));
        }
        let idxs: Vec<usize> = recs.iter().map(|r| r.idx()).collect();
        assert!(
            idxs.windows(2).all(|w| w[0] < w[1]),
            "partition {p}: send order kept"
        );
    }
    for a in acked {
        // librdkafka acknowledges a retried idempotent batch it knows was stored without an
        // offset (-1001, "possibly persisted" after a leader change): it must be in its
        // partition all the same.
        let want = if a.offset < 0 {
            by_idx
                .get(&a.idx)
                .map(|&(p, o)| (p, o))
                .filter(|&(p, _)| p == a.partition)
        } else {
            Some((a.partition, a.offset))
        };
        assert!(
            want.is_some(),
            "record {} (acknowledged without an offset) is missing",
            a.idx
        );
        assert_eq!(
            by_idx.get(&a.idx),
            want.as_ref(),
            "record {} where it was acknowledged",
            a.idx
        );
    }
}
