//! The producer, following the Java client's pipeline:
//!
//! ```text
//! send(record) -> interceptors.on_send -> serializers -> partitioner -> accumulator
//!      (one deque of batches per partition, bounded by buffer.memory: send blocks up to
//!       max.block.ms when full)
//! sender: drains ready batches (full, linger.ms passed, or flush) of partitions whose
//!      connection has room, groups them per broker into one Produce request (one batch per
//!      partition), keeps at most max.in.flight.requests.per.connection in flight; retriable
//!      errors are retried after retry.backoff.ms until delivery.timeout.ms; with idempotence
//!      each batch keeps its producer id, epoch and sequence across retries. The sender's
//!      state is run by the sender thread (wake-ups, linger, flush) and by each broker link's
//!      reader thread, which applies an answer and sends the request that takes its place.
//! completion (sender thread, after the next request is out): interceptors.on_acknowledgement,
//!      then the record's future / callback.
//! ```

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::Read;
use std::net::TcpStream;
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse,
    ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use crate::client::conn::{Conn, RESPONSE_BYTES_MAX};
use crate::client::metadata::Cluster;
use crate::partitioner::{Partitioner, PartitionerKind};
use crate::{error_name, now_ms};

/// Producer settings, with Kafka's names (`set`) and defaults.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    pub bootstrap: String,
    pub client_id: String,
    pub acks: i16,
    pub linger: Duration,
    pub batch_size: usize,
    pub buffer_memory: usize,
    pub max_block: Duration,
    pub compression: Compression,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub delivery_timeout: Duration,
    pub request_timeout: Duration,
    pub enable_idempotence: bool,
    pub max_in_flight: usize,
    pub partitioner: PartitionerKind,
    idempotence_explicit: bool,
}

impl ProducerConfig {
    pub fn new(bootstrap: &str) -> ProducerConfig {
        ProducerConfig {
            bootstrap: bootstrap.to_string(),
            client_id: "weir-producer".into(),
            acks: -1,
            linger: Duration::from_millis(5),
            batch_size: 16384,
            buffer_memory: 32 << 20,
            max_block: Duration::from_secs(60),
            compression: Compression::None,
            retries: u32::MAX,
            retry_backoff: Duration::from_millis(100),
            delivery_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
            enable_idempotence: true,
            max_in_flight: 5,
            partitioner: PartitionerKind::Default,
            idempotence_explicit: false,
        }
    }

    /// Sets a setting by its Kafka name.
    pub fn set(&mut self, key: &str, value: &str) -> Result<&mut Self> {
        let ms = |v: &str| -> Result<Duration> {
            Ok(Duration::from_millis(v.parse().with_context(|| {
                format!("{key}: {v:?} is not a number")
            })?))
        };
        let num = |v: &str| -> Result<usize> {
            v.parse()
                .with_context(|| format!("{key}: {v:?} is not a number"))
        };
        match key {
            "bootstrap.servers" => self.bootstrap = value.to_string(),
            "client.id" => self.client_id = value.to_string(),
            "acks" => {
                self.acks = match value {
                    "all" | "-1" => -1,
                    "1" => 1,
                    "0" => 0,
                    _ => bail!("acks must be all, -1, 0 or 1"),
                }
            }
            "linger.ms" => self.linger = ms(value)?,
            "batch.size" => self.batch_size = num(value)?.max(1),
            "buffer.memory" => self.buffer_memory = num(value)?.max(1),
            "max.block.ms" => self.max_block = ms(value)?,
            "compression.type" => self.compression = parse_compression(value)?,
            "retries" => {
                self.retries = value
                    .parse()
                    .with_context(|| format!("retries: {value:?}"))?
            }
            "retry.backoff.ms" => self.retry_backoff = ms(value)?,
            "delivery.timeout.ms" => self.delivery_timeout = ms(value)?,
            "request.timeout.ms" => self.request_timeout = ms(value)?,
            "enable.idempotence" => {
                self.enable_idempotence = value == "true";
                self.idempotence_explicit = true;
            }
            "max.in.flight.requests.per.connection" => {
                self.max_in_flight = num(value)?.clamp(1, 100)
            }
            "partitioner.class" | "partitioner" => {
                self.partitioner = match value {
                    "default" | "murmur2" => PartitionerKind::Default,
                    "uniform-sticky"
                    | "sticky"
                    | "org.apache.kafka.clients.producer.UniformStickyPartitioner" => {
                        PartitionerKind::UniformSticky
                    }
                    "round-robin"
                    | "roundrobin"
                    | "org.apache.kafka.clients.producer.RoundRobinPartitioner" => {
                        PartitionerKind::RoundRobin
                    }
                    _ => bail!("unknown partitioner {value}"),
                }
            }
            "partitioner.ignore.keys" => {
                if value == "true" {
                    self.partitioner = PartitionerKind::UniformSticky
                }
            }
            _ => bail!("unknown producer setting {key}"),
        }
        Ok(self)
    }

    fn validate(&mut self) -> Result<()> {
        if self.enable_idempotence && (self.acks != -1 || self.max_in_flight > 5) {
            if self.idempotence_explicit {
                bail!("enable.idempotence=true needs acks=all and max.in.flight.requests.per.connection <= 5");
            }
            // As the Java client: idempotence is on by default only where it can be.
            self.enable_idempotence = false;
        }
        Ok(())
    }
}

pub fn parse_compression(v: &str) -> Result<Compression> {
    Ok(match v {
        "none" => Compression::None,
        "gzip" => Compression::Gzip,
        "snappy" => Compression::Snappy,
        "lz4" => Compression::Lz4,
        "zstd" => Compression::Zstd,
        _ => bail!("compression.type must be none, gzip, snappy, lz4 or zstd"),
    })
}

/// A record before serialization.
#[derive(Clone, Debug)]
pub struct ProducerRecord<K, V> {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: Option<K>,
    pub value: Option<V>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: Option<i64>,
}

impl<K, V> ProducerRecord<K, V> {
    pub fn new(topic: &str, value: V) -> Self {
        ProducerRecord {
            topic: topic.to_string(),
            partition: None,
            key: None,
            value: Some(value),
            headers: Vec::new(),
            timestamp: None,
        }
    }
    pub fn key(mut self, k: K) -> Self {
        self.key = Some(k);
        self
    }
    pub fn partition(mut self, p: i32) -> Self {
        self.partition = Some(p);
        self
    }
    pub fn header(mut self, k: &str, v: impl Into<Vec<u8>>) -> Self {
        self.headers.push((k.to_string(), v.into()));
        self
    }
    pub fn timestamp(mut self, t: i64) -> Self {
        self.timestamp = Some(t);
        self
    }
}

/// A serialized record: what interceptors see.
#[derive(Clone, Debug)]
pub struct RawRecord {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordMetadata {
    pub topic: String,
    pub partition: i32,
    /// -1 with acks=0: the broker does not answer.
    pub offset: i64,
    pub timestamp: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProduceError {
    /// The broker refused the batch with this error code.
    Broker(i16),
    /// delivery.timeout.ms passed before an acknowledgement.
    Timeout,
    /// buffer.memory stayed full (or metadata unavailable) for max.block.ms.
    Blocked(String),
    Serialization(String),
    Closed,
}

impl std::fmt::Display for ProduceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProduceError::Broker(c) => write!(f, "broker error {} ({c})", error_name(*c)),
            ProduceError::Timeout => write!(f, "delivery timed out"),
            ProduceError::Blocked(m) => write!(f, "blocked: {m}"),
            ProduceError::Serialization(m) => write!(f, "serialization failed: {m}"),
            ProduceError::Closed => write!(f, "producer closed"),
        }
    }
}

impl std::error::Error for ProduceError {}

pub type Delivery = Result<RecordMetadata, ProduceError>;

pub trait Serializer<T: ?Sized>: Send + Sync {
    fn serialize(&self, topic: &str, value: &T) -> Result<Vec<u8>>;
}

pub struct StringSerializer;
impl Serializer<String> for StringSerializer {
    fn serialize(&self, _: &str, v: &String) -> Result<Vec<u8>> {
        Ok(v.as_bytes().to_vec())
    }
}
impl Serializer<str> for StringSerializer {
    fn serialize(&self, _: &str, v: &str) -> Result<Vec<u8>> {
        Ok(v.as_bytes().to_vec())
    }
}

pub struct BytesSerializer;
impl Serializer<Vec<u8>> for BytesSerializer {
    fn serialize(&self, _: &str, v: &Vec<u8>) -> Result<Vec<u8>> {
        Ok(v.clone())
    }
}

/// Sees every record before it is queued and every acknowledgement. An interceptor that fails
/// is logged and skipped; it never stops the send.
pub trait ProducerInterceptor: Send + Sync {
    fn on_send(&self, record: RawRecord) -> Result<RawRecord> {
        Ok(record)
    }
    fn on_acknowledgement(&self, _delivery: &Delivery) -> Result<()> {
        Ok(())
    }
}

type Callback = Box<dyn FnOnce(&Delivery) + Send>;

#[derive(Default)]
struct SlotState {
    result: Option<Delivery>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
}

impl Slot {
    fn complete(&self, d: Delivery) {
        let waker = {
            let mut s = self.state.lock().unwrap();
            s.result = Some(d);
            s.waker.take()
        };
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Who learns a record's outcome: a future (`send`) or a callback (`send_with_callback`, run
/// on the sender thread, with no shared slot to allocate and lock).
enum Completion {
    Future(Arc<Slot>),
    Callback(Callback),
}

/// A record in a batch: what the batch encodes and the outcome reports (its topic is the
/// batch's).
struct QueuedRecord {
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<(String, Vec<u8>)>,
    timestamp: i64,
}

/// The outcome of one send: `.await` it, or block with `get()`.
pub struct DeliveryFuture(Arc<Slot>);

impl DeliveryFuture {
    pub fn get(self) -> Delivery {
        let mut s = self.0.state.lock().unwrap();
        loop {
            if let Some(r) = s.result.clone() {
                return r;
            }
            s = self.0.cv.wait(s).unwrap();
        }
    }
}

impl Future for DeliveryFuture {
    type Output = Delivery;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Delivery> {
        let mut s = self.0.state.lock().unwrap();
        match s.result.clone() {
            Some(r) => Poll::Ready(r),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

type TopicPartition = (String, i32);

struct Batch {
    tp: TopicPartition,
    records: Vec<QueuedRecord>,
    slots: Vec<Completion>,
    bytes: usize,
    created: Instant,
    deadline: Instant,
    /// Assigned when first sent (idempotence), kept across retries.
    sequence: Option<i32>,
    producer: Option<(i64, i16)>,
    attempts: u32,
    retry_at: Option<Instant>,
}

/// One partition's batches, oldest first.
#[derive(Default)]
struct PartitionQueue {
    batches: VecDeque<Batch>,
    /// The batches' bytes: what the partitioner weighs (KIP-794), kept as batches come and go.
    bytes: usize,
    /// At the sender's last drain, the partition leader's connection had
    /// max.in.flight.requests.per.connection requests out: a batch filling up here cannot go
    /// before an answer comes, and the answer wakes the sender, so appends do not.
    leader_busy: bool,
}

impl PartitionQueue {
    fn push_back(&mut self, b: Batch) {
        self.bytes += b.bytes;
        self.batches.push_back(b);
    }
    fn push_front(&mut self, b: Batch) {
        self.bytes += b.bytes;
        self.batches.push_front(b);
    }
    fn insert(&mut self, i: usize, b: Batch) {
        self.bytes += b.bytes;
        self.batches.insert(i, b);
    }
    fn pop_front(&mut self) -> Option<Batch> {
        let b = self.batches.pop_front()?;
        self.bytes -= b.bytes;
        Some(b)
    }
}

struct AccState {
    /// topic -> partition -> queue (looked up by &str: no allocation per record).
    queues: HashMap<String, HashMap<i32, PartitionQueue>>,
    used_bytes: usize,
    flush_requests: u64,
    flushed: u64,
    closing: bool,
    in_flight: usize,
    /// Requests sent and not answered yet (set by the sender).
    requests_in_flight: usize,
}

impl AccState {
    fn queue(&mut self, tp: &TopicPartition) -> &mut PartitionQueue {
        if !self.queues.contains_key(&tp.0) {
            self.queues.insert(tp.0.clone(), HashMap::new());
        }
        self.queues
            .get_mut(&tp.0)
            .expect("inserted")
            .entry(tp.1)
            .or_default()
    }
}

struct Shared {
    cfg: ProducerConfig,
    acc: Mutex<AccState>,
    /// Signalled when buffer space frees up or the producer goes idle.
    space: Condvar,
    wake: Mutex<Sender<Event>>,
    interceptors: Vec<Box<dyn ProducerInterceptor>>,
    partitioner: Partitioner,
    cluster: Mutex<Cluster>,
    meta_conn: Mutex<Option<Conn>>,
}

enum Event {
    Wake,
    Response {
        link: usize,
        correlation: i32,
        response: Result<ProduceResponse, String>,
    },
}

impl Shared {
    /// Bytes queued for a partition, looked up only when the partitioner asks (it does when a
    /// sticky partition is chosen, once per batch); kept per queue, not summed per call.
    fn queue_bytes<'a>(&'a self, topic: &'a str) -> impl Fn(i32) -> usize + 'a {
        move |p| {
            let acc = self.acc.lock().unwrap();
            acc.queues
                .get(topic)
                .and_then(|t| t.get(&p))
                .map_or(0, |q| q.bytes)
        }
    }

    /// Metadata for `topic`, fetched (and the topic auto-created) when unknown.
    fn partitions(&self, topic: &str, deadline: Instant) -> Result<usize, ProduceError> {
        loop {
            if let Ok(n) = self.cluster.lock().unwrap().partitions(topic) {
                return Ok(n);
            }
            let r = self.refresh_metadata(Some(topic));
            if Instant::now() >= deadline {
                return Err(ProduceError::Blocked(format!(
                    "no metadata for topic {topic}: {}",
                    r.err().map(|e| e.to_string()).unwrap_or_default()
                )));
            }
            if let Ok(n) = self.cluster.lock().unwrap().partitions(topic) {
                return Ok(n);
            }
            std::thread::sleep(self.cfg.retry_backoff.min(Duration::from_millis(200)));
        }
    }

    fn refresh_metadata(&self, topic: Option<&str>) -> Result<()> {
        let mut mc = self.meta_conn.lock().unwrap();
        if mc.is_none() {
            *mc = Some(crate::connect_any(
                &self.cfg.bootstrap,
                &self.cfg.client_id,
                self.cfg.request_timeout,
            )?);
        }
        let conn = mc.as_mut().expect("connected");
        let mut topics: Vec<String> = self
            .cluster
            .lock()
            .unwrap()
            .topics
            .keys()
            .cloned()
            .collect();
        if let Some(t) = topic {
            if !topics.iter().any(|x| x == t) {
                topics.push(t.to_string());
            }
        }
        match Cluster::fetch(conn, Some(&topics), true) {
            Ok(c) => {
                *self.cluster.lock().unwrap() = c;
                Ok(())
            }
            Err(e) => {
                *mc = None;
                Err(e)
            }
        }
    }

    fn finish(&self, c: Completion, d: Delivery) {
        for i in &self.interceptors {
            if let Err(e) = i.on_acknowledgement(&d) {
                tracing::warn!("producer interceptor on_acknowledgement failed: {e:#}");
            }
        }
        match c {
            Completion::Future(slot) => slot.complete(d),
            Completion::Callback(cb) => cb(&d),
        }
    }
}

/// The untyped producer: records are already bytes.
pub struct RawProducer {
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
}

impl RawProducer {
    pub fn new(
        mut cfg: ProducerConfig,
        interceptors: Vec<Box<dyn ProducerInterceptor>>,
    ) -> Result<RawProducer> {
        cfg.validate()?;
        let meta = crate::connect_any(&cfg.bootstrap, &cfg.client_id, cfg.request_timeout)?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            partitioner: Partitioner::new(cfg.partitioner),
            cfg,
            acc: Mutex::new(AccState {
                queues: HashMap::new(),
                used_bytes: 0,
                flush_requests: 0,
                flushed: 0,
                closing: false,
                in_flight: 0,
                requests_in_flight: 0,
            }),
            space: Condvar::new(),
            wake: Mutex::new(tx.clone()),
            interceptors,
            cluster: Mutex::new(Cluster::default()),
            meta_conn: Mutex::new(Some(meta)),
        });
        let s2 = shared.clone();
        let sender = std::thread::Builder::new()
            .name("weir-producer-sender".into())
            .spawn(move || {
                let state = Arc::new_cyclic(|me| Mutex::new(SenderLoop::new(s2, tx, me.clone())));
                run_sender(state, rx)
            })?;
        Ok(RawProducer {
            shared,
            sender: Some(sender),
        })
    }

    /// Produce requests sent and not yet answered (Kafka's `requests-in-flight`), as the
    /// sender last counted them.
    pub fn requests_in_flight(&self) -> usize {
        self.shared.acc.lock().unwrap().requests_in_flight
    }

    pub fn send(&self, record: RawRecord) -> Result<DeliveryFuture, ProduceError> {
        let slot = Arc::new(Slot::default());
        self.enqueue(record, Completion::Future(slot.clone()))?;
        Ok(DeliveryFuture(slot))
    }

    pub fn send_with_callback(
        &self,
        record: RawRecord,
        cb: impl FnOnce(&Delivery) + Send + 'static,
    ) -> Result<(), ProduceError> {
        self.enqueue(record, Completion::Callback(Box::new(cb)))
    }

    fn enqueue(&self, mut record: RawRecord, slot: Completion) -> Result<(), ProduceError> {
        let s = &self.shared;
        for i in &s.interceptors {
            match i.on_send(record.clone()) {
                Ok(r) => record = r,
                Err(e) => tracing::warn!("producer interceptor on_send failed: {e:#}"),
            }
        }
        let deadline = Instant::now() + s.cfg.max_block;
        let partitions = s.partitions(&record.topic, deadline)?;
        let partition = match record.partition {
            Some(p) if p >= 0 && (p as usize) < partitions => p,
            Some(p) => {
                return Err(ProduceError::Blocked(format!(
                    "partition {p} of {} does not exist ({partitions} partitions)",
                    record.topic
                )))
            }
            None => s.partitioner.partition(
                &record.topic,
                record.key.as_deref(),
                partitions,
                &s.queue_bytes(&record.topic),
            ),
        };
        let size = 64
            + record.key.as_ref().map_or(0, |k| k.len())
            + record.value.as_ref().map_or(0, |v| v.len())
            + record
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>();
        let RawRecord {
            topic,
            key,
            value,
            headers,
            timestamp,
            ..
        } = record;
        let record = QueuedRecord {
            key,
            value,
            headers,
            timestamp,
        };
        let mut acc = s.acc.lock().unwrap();
        // buffer.memory: wait for the sender to free space, up to max.block.ms.
        while acc.used_bytes + size > s.cfg.buffer_memory && acc.used_bytes > 0 {
            if acc.closing {
                return Err(ProduceError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ProduceError::Blocked(format!(
                    "buffer.memory ({} bytes) full for max.block.ms",
                    s.cfg.buffer_memory
                )));
            }
            acc = s.space.wait_timeout(acc, left).unwrap().0;
        }
        if acc.closing {
            return Err(ProduceError::Closed);
        }
        acc.used_bytes += size;
        let batch_size = s.cfg.batch_size;
        if !acc.queues.contains_key(&topic) {
            acc.queues.insert(topic.clone(), HashMap::new());
        }
        let q = acc
            .queues
            .get_mut(&topic)
            .expect("inserted")
            .entry(partition)
            .or_default();
        let fits = q.batches.back().is_some_and(|b| {
            b.sequence.is_none() && b.attempts == 0 && b.bytes + size <= batch_size
        });
        // The sender is woken when a batch fills or a new one starts its linger clock, unless
        // the partition's connection is full (an answer wakes it then).
        let mut new_batch_topic = None;
        let filled = if fits {
            let b = q.batches.back_mut().expect("checked");
            b.records.push(record);
            b.slots.push(slot);
            b.bytes += size;
            q.bytes += size;
            b.bytes >= batch_size
        } else {
            let now = Instant::now();
            q.push_back(Batch {
                tp: (topic.clone(), partition),
                records: vec![record],
                slots: vec![slot],
                bytes: size,
                created: now,
                deadline: now + s.cfg.delivery_timeout,
                sequence: None,
                producer: None,
                attempts: 0,
                retry_at: None,
            });
            new_batch_topic = Some(topic);
            true
        };
        let wake = filled && !q.leader_busy;
        drop(acc);
        if let Some(topic) = new_batch_topic {
            if !matches!(s.cfg.partitioner, PartitionerKind::RoundRobin) {
                s.partitioner
                    .on_new_batch(&topic, partitions, &s.queue_bytes(&topic));
            }
        }
        if wake {
            let _ = s.wake.lock().unwrap().send(Event::Wake);
        }
        Ok(())
    }

    /// Sends everything queued now and waits until every record has its outcome.
    pub fn flush(&self) {
        let s = &self.shared;
        let mut acc = s.acc.lock().unwrap();
        acc.flush_requests += 1;
        let target = acc.flush_requests;
        let _ = s.wake.lock().unwrap().send(Event::Wake);
        while acc.flushed < target {
            acc = s
                .space
                .wait_timeout(acc, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.flush();
        self.shared.acc.lock().unwrap().closing = true;
        let _ = self.shared.wake.lock().unwrap().send(Event::Wake);
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RawProducer {
    fn drop(&mut self) {
        if self.sender.is_some() {
            self.shutdown();
        }
    }
}

/// The typed producer: serializers in front of a `RawProducer`.
pub struct Producer<K: ?Sized + 'static, V: ?Sized + 'static> {
    raw: RawProducer,
    keys: Box<dyn Serializer<K>>,
    values: Box<dyn Serializer<V>>,
}

impl<K: ?Sized + 'static, V: ?Sized + 'static> Producer<K, V> {
    pub fn new(
        cfg: ProducerConfig,
        keys: impl Serializer<K> + 'static,
        values: impl Serializer<V> + 'static,
        interceptors: Vec<Box<dyn ProducerInterceptor>>,
    ) -> Result<Self> {
        Ok(Producer {
            raw: RawProducer::new(cfg, interceptors)?,
            keys: Box::new(keys),
            values: Box::new(values),
        })
    }

    fn serialize(&self, r: &ProducerRecord<&K, &V>) -> Result<RawRecord, ProduceError> {
        let ser = |e: anyhow::Error| ProduceError::Serialization(format!("{e:#}"));
        Ok(RawRecord {
            topic: r.topic.clone(),
            partition: r.partition,
            key: r
                .key
                .map(|k| self.keys.serialize(&r.topic, k).map(Bytes::from))
                .transpose()
                .map_err(ser)?,
            value: r
                .value
                .map(|v| self.values.serialize(&r.topic, v).map(Bytes::from))
                .transpose()
                .map_err(ser)?,
            headers: r.headers.clone(),
            timestamp: r.timestamp.unwrap_or_else(now_ms),
        })
    }

    pub fn send(&self, r: &ProducerRecord<&K, &V>) -> Result<DeliveryFuture, ProduceError> {
        self.raw.send(self.serialize(r)?)
    }

    pub fn send_with_callback(
        &self,
        r: &ProducerRecord<&K, &V>,
        cb: impl FnOnce(&Delivery) + Send + 'static,
    ) -> Result<(), ProduceError> {
        self.raw.send_with_callback(self.serialize(r)?, cb)
    }

    pub fn flush(&self) {
        self.raw.flush()
    }

    /// Produce requests sent and not yet answered.
    pub fn requests_in_flight(&self) -> usize {
        self.raw.requests_in_flight()
    }

    pub fn close(self) {
        self.raw.close()
    }
}

// ---- the sender ----

struct Link {
    conn: Conn,
    version: i16,
    /// correlation id -> batches it carries
    in_flight: HashMap<i32, Vec<Batch>>,
    broken: bool,
}

/// The sender's state. The sender thread runs it on wake-ups, lingers and flushes; a link's
/// reader thread runs it on each answer, so the request that takes the answered one's place
/// goes out from the reader without a hand-off to the sender thread.
struct SenderLoop {
    s: Arc<Shared>,
    tx: Sender<Event>,
    /// Given to reader threads (which end when the state is gone).
    me: Weak<Mutex<SenderLoop>>,
    /// The sender thread is completing records taken from `acked`, outside the lock: the
    /// producer is not idle (a flush must not end) until it is done.
    completing: bool,
    links: HashMap<String, (usize, Link)>,
    next_link: usize,
    producer: Option<(i64, i16)>,
    sequences: HashMap<TopicPartition, i32>,
    /// Answered batches (base offset and log append time, or the error) whose records are
    /// not completed yet, in answer order; emptied on every turn of the loop, so at most a few
    /// answers' worth.
    acked: Answered,
    refresh_needed: bool,
    /// A connection had max.in.flight requests out: wait for an answer before draining again.
    waiting_for_room: bool,
}

type Answered = Vec<(Batch, Result<(i64, i64), i16>)>;

/// Completes the records of answered batches, in order; true when there were any.
fn complete(s: &Shared, acked: &mut Answered) -> bool {
    if acked.is_empty() {
        return false;
    }
    for (b, outcome) in acked.drain(..) {
        let (base, append_time) = match outcome {
            Ok(o) => o,
            Err(code) => {
                for slot in b.slots {
                    s.finish(slot, Err(ProduceError::Broker(code)));
                }
                continue;
            }
        };
        let Batch {
            tp, records, slots, ..
        } = b;
        for (i, (r, slot)) in records.iter().zip(slots).enumerate() {
            let ts = if append_time >= 0 {
                append_time
            } else {
                r.timestamp
            };
            s.finish(
                slot,
                Ok(RecordMetadata {
                    topic: tp.0.clone(),
                    partition: tp.1,
                    offset: base + i as i64,
                    timestamp: ts,
                }),
            );
        }
    }
    true
}

/// The sender thread: sends what lingered, was flushed or woke it, and completes answered
/// records outside the state's lock (acknowledged records complete after the request that
/// takes their place is out: callbacks are off the path from an answer to the next request).
fn run_sender(state: Arc<Mutex<SenderLoop>>, rx: Receiver<Event>) {
    let s = state.lock().unwrap().s.clone();
    let mut acked = Answered::new();
    loop {
        let next_wake = {
            let mut st = state.lock().unwrap();
            let (next_wake, done) = st.send_ready();
            if done {
                return;
            }
            std::mem::swap(&mut acked, &mut st.acked);
            st.completing = !acked.is_empty();
            next_wake
        };
        let wait = if complete(&s, &mut acked) {
            let mut st = state.lock().unwrap();
            st.completing = false;
            // With nothing in flight, come back at once to see whether the producer is idle
            // (a flush waits for that).
            if st.total_in_flight() == 0 {
                Duration::ZERO
            } else {
                next_wake
            }
        } else {
            next_wake
        };
        // Partitions whose connection is full do not count in next_wake: an answer runs the
        // sender for them.
        match rx.recv_timeout(wait) {
            Ok(ev) => {
                let mut st = state.lock().unwrap();
                st.handle(ev);
                while let Ok(ev) = rx.try_recv() {
                    st.handle(ev);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let refresh = std::mem::take(&mut state.lock().unwrap().refresh_needed);
        if refresh {
            if let Err(e) = s.refresh_metadata(None) {
                tracing::debug!("metadata refresh failed: {e:#}");
            }
        }
    }
}

fn is_retriable(code: i16) -> bool {
    // NOT_LEADER_OR_FOLLOWER, UNKNOWN_TOPIC_OR_PARTITION, REQUEST_TIMED_OUT, NETWORK_EXCEPTION,
    // NOT_ENOUGH_REPLICAS(_AFTER_APPEND), KAFKA_STORAGE_ERROR, OUT_OF_ORDER_SEQUENCE (an earlier
    // batch of the partition failed and is being retried), LEADER_NOT_AVAILABLE.
    matches!(code, 3 | 5 | 6 | 7 | 13 | 19 | 20 | 45 | 56)
}

impl SenderLoop {
    fn new(s: Arc<Shared>, tx: Sender<Event>, me: Weak<Mutex<SenderLoop>>) -> SenderLoop {
        SenderLoop {
            s,
            tx,
            me,
            completing: false,
            links: HashMap::new(),
            next_link: 0,
            producer: None,
            sequences: HashMap::new(),
            acked: Vec::new(),
            refresh_needed: false,
            waiting_for_room: false,
        }
    }

    /// Drains and sends until nothing more can go now; returns the time until the next linger
    /// deadline and whether the producer is closed and idle.
    fn send_ready(&mut self) -> (Duration, bool) {
        loop {
            self.waiting_for_room = false;
            let (ready, next_wake, idle, closing) = self.drain();
            if closing && idle {
                return (next_wake, true);
            }
            if !ready.is_empty() {
                self.send_batches(ready);
                if next_wake.is_zero() {
                    // More batches can go now (several answers came at once): every request
                    // that has room goes out before any callback runs.
                    continue;
                }
            }
            self.s.acc.lock().unwrap().requests_in_flight = self.total_in_flight();
            return (next_wake, false);
        }
    }

    /// Completes the records of acknowledged batches; true when there were any.
    fn complete_acked(&mut self) -> bool {
        complete(&self.s, &mut self.acked)
    }

    fn total_in_flight(&self) -> usize {
        self.links.values().map(|(_, l)| l.in_flight.len()).sum()
    }

    /// Takes the batches that are ready, fails expired ones; returns (ready, time until the
    /// next linger deadline, idle, closing).
    fn drain(&mut self) -> (Vec<Batch>, Duration, bool, bool) {
        let s = self.s.clone();
        let mut acc = s.acc.lock().unwrap();
        // Lock order: acc, then cluster (nothing takes acc while holding cluster).
        let cluster = s.cluster.lock().unwrap();
        let now = Instant::now();
        let flushing = acc.flush_requests > acc.flushed || acc.closing;
        let max_in_flight = self.s.cfg.max_in_flight.max(1);
        let batch_size = self.s.cfg.batch_size;
        let linger = self.s.cfg.linger;
        let mut ready = Vec::new();
        let mut next = Duration::from_millis(50);
        let mut expired = Vec::new();
        let mut freed = 0usize;
        for (topic, parts) in acc.queues.iter_mut() {
            for (&partition, q) in parts.iter_mut() {
                while let Some(b) = q.batches.front() {
                    if now >= b.deadline {
                        let b = q.pop_front().expect("front");
                        freed += b.bytes;
                        expired.push(b);
                    } else {
                        break;
                    }
                }
                // As Kafka's sender drains only nodes that can take a request: a batch for a
                // connection with max.in.flight requests out stays in its queue and keeps
                // filling (taking it and putting it back let appends in between start a new
                // batch).
                q.leader_busy = cluster
                    .leader_addr(topic, partition)
                    .and_then(|a| self.links.get(a))
                    .is_some_and(|(_, l)| !l.broken && l.in_flight.len() >= max_in_flight);
                let Some(b) = q.batches.front() else { continue };
                if q.leader_busy {
                    self.waiting_for_room = true;
                    continue;
                }
                if b.retry_at.is_some_and(|t| t > now) {
                    next = next.min(b.retry_at.expect("some") - now);
                    continue;
                }
                let full = q.batches.len() > 1 || b.bytes >= batch_size;
                let lingered = now.duration_since(b.created) >= linger;
                if full || lingered || flushing {
                    // Its bytes stay in buffer.memory until the batch completes.
                    ready.push(q.pop_front().expect("front"));
                    // One batch per partition per request (as Kafka's sender): a queue with
                    // more sendable batches makes the sender come back at once while it has
                    // room in flight, instead of waiting for the next wake-up.
                    if q.batches.front().is_some_and(|n| {
                        q.batches.len() > 1
                            || n.bytes >= batch_size
                            || now.duration_since(n.created) >= linger
                            || flushing
                    }) {
                        next = Duration::ZERO;
                    }
                } else {
                    next = next.min(linger - now.duration_since(b.created));
                }
            }
        }
        drop(cluster);
        for parts in acc.queues.values_mut() {
            parts.retain(|_, q| !q.batches.is_empty());
        }
        acc.queues.retain(|_, parts| !parts.is_empty());
        acc.used_bytes -= freed;
        let pending = acc
            .queues
            .values()
            .flat_map(|t| t.values())
            .map(|q| q.batches.len())
            .sum::<usize>();
        let idle = pending == 0
            && self.total_in_flight() == 0
            && ready.is_empty()
            && self.acked.is_empty()
            && !self.completing;
        if idle && acc.flushed < acc.flush_requests {
            acc.flushed = acc.flush_requests;
        }
        acc.in_flight = self.total_in_flight() + ready.len();
        let closing = acc.closing;
        drop(acc);
        if freed > 0 || idle {
            s.space.notify_all();
        }
        if !expired.is_empty() {
            // Records of a partition complete in order: answered batches before expired ones.
            self.complete_acked();
        }
        for b in expired {
            self.fail(b, ProduceError::Timeout);
        }
        (ready, next, idle, closing)
    }

    fn fail(&self, b: Batch, e: ProduceError) {
        for slot in b.slots {
            self.s.finish(slot, Err(e.clone()));
        }
    }

    /// A batch completed (acknowledged or failed): its bytes leave buffer.memory.
    fn release(&self, bytes: usize) {
        let mut acc = self.s.acc.lock().unwrap();
        acc.used_bytes = acc.used_bytes.saturating_sub(bytes);
        drop(acc);
        self.s.space.notify_all();
    }

    /// Returns batches taken by `drain` but not sent to the fronts of their queues, in order,
    /// as if they had not been taken.
    fn put_back(&mut self, batches: Vec<Batch>) {
        let mut acc = self.s.acc.lock().unwrap();
        for b in batches.into_iter().rev() {
            acc.queue(&b.tp).push_front(b);
        }
    }

    fn requeue(&mut self, mut batches: Vec<Batch>) {
        let now = Instant::now();
        let mut acc = self.s.acc.lock().unwrap();
        for mut b in batches.drain(..) {
            b.attempts += 1;
            if b.attempts > self.s.cfg.retries || now >= b.deadline {
                acc.used_bytes = acc.used_bytes.saturating_sub(b.bytes);
                drop(acc);
                self.s.space.notify_all();
                self.fail(b, ProduceError::Timeout);
                acc = self.s.acc.lock().unwrap();
                continue;
            }
            b.retry_at = Some(now + self.s.cfg.retry_backoff);
            let q = acc.queue(&b.tp);
            // Keep a partition's batches in sequence order.
            let at = q
                .batches
                .iter()
                .position(|x| match (x.sequence, b.sequence) {
                    (Some(xs), Some(bs)) => xs > bs,
                    (None, _) => true,
                    _ => false,
                });
            match at {
                Some(i) => q.insert(i, b),
                None => q.push_back(b),
            }
        }
        self.refresh_needed = true;
    }

    fn link_for(&mut self, addr: &str) -> Result<usize> {
        if let Some((id, l)) = self.links.get(addr) {
            if !l.broken {
                return Ok(*id);
            }
        }
        if let Some((_, old)) = self.links.remove(addr) {
            let stranded: Vec<Batch> = old.in_flight.into_values().flatten().collect();
            self.requeue(stranded);
        }
        let conn = Conn::connect(addr, &self.s.cfg.client_id, self.s.cfg.request_timeout)?;
        let version = conn.version(ApiKey::Produce, 9)?;
        let id = self.next_link;
        self.next_link += 1;
        let reader = conn_reader(&conn)?;
        let (tx, state) = (self.tx.clone(), self.me.clone());
        std::thread::Builder::new()
            .name("weir-producer-reader".into())
            .spawn(move || read_responses(reader, id, version, state, tx))?;
        self.links.insert(
            addr.to_string(),
            (
                id,
                Link {
                    conn,
                    version,
                    in_flight: HashMap::new(),
                    broken: false,
                },
            ),
        );
        Ok(id)
    }

    fn ensure_producer_id(&mut self) -> Result<()> {
        if !self.s.cfg.enable_idempotence || self.producer.is_some() {
            return Ok(());
        }
        let mut mc = self.s.meta_conn.lock().unwrap();
        if mc.is_none() {
            *mc = Some(crate::connect_any(
                &self.s.cfg.bootstrap,
                &self.s.cfg.client_id,
                self.s.cfg.request_timeout,
            )?);
        }
        let (r, _): (InitProducerIdResponse, i16) = mc.as_mut().expect("connected").call(
            ApiKey::InitProducerId,
            4,
            &InitProducerIdRequest::default().with_transaction_timeout_ms(60_000),
        )?;
        if r.error_code != 0 {
            bail!("InitProducerId failed: {}", error_name(r.error_code));
        }
        self.producer = Some((r.producer_id.0, r.producer_epoch));
        self.sequences.clear();
        Ok(())
    }

    fn send_batches(&mut self, batches: Vec<Batch>) {
        if let Err(e) = self.ensure_producer_id() {
            tracing::warn!("{e:#}");
            self.requeue(batches);
            return;
        }
        let mut by_leader: HashMap<String, Vec<Batch>> = HashMap::new();
        let mut orphans = Vec::new();
        {
            let cluster = self.s.cluster.lock().unwrap();
            for b in batches {
                match cluster.leader_addr(&b.tp.0, b.tp.1) {
                    Some(a) => by_leader.entry(a.to_string()).or_default().push(b),
                    None => orphans.push(b),
                }
            }
        }
        if !orphans.is_empty() {
            self.requeue(orphans);
        }
        for (addr, mut batches) in by_leader {
            let link = match self.link_for(&addr) {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!("connecting to {addr}: {e:#}");
                    self.requeue(batches);
                    continue;
                }
            };
            // max.in.flight.requests.per.connection is a hard limit per connection: batches
            // for a connection that has that many requests out go back to the front of their
            // queues, unchanged, and the sender waits for an answer.
            let busy = self
                .links
                .get(&addr)
                .is_some_and(|(_, l)| l.in_flight.len() >= self.s.cfg.max_in_flight.max(1));
            if busy {
                self.put_back(batches);
                self.waiting_for_room = true;
                continue;
            }
            for b in batches.iter_mut() {
                if self.s.cfg.enable_idempotence && b.sequence.is_none() {
                    let next = self.sequences.entry(b.tp.clone()).or_insert(0);
                    b.sequence = Some(*next);
                    b.producer = self.producer;
                    *next = next.wrapping_add(b.records.len() as i32) & i32::MAX;
                }
            }
            let req = match self.build_request(&batches) {
                Ok(r) => r,
                Err(e) => {
                    for b in batches {
                        self.release(b.bytes);
                        self.fail(b, ProduceError::Serialization(format!("{e:#}")));
                    }
                    continue;
                }
            };
            let (_, l) = self.links.get_mut(&addr).expect("link exists");
            let version = l.version;
            match l.conn.send(ApiKey::Produce, version, &req) {
                Ok(corr) if self.s.cfg.acks == 0 => {
                    let _ = corr;
                    l.conn_forget();
                    let done: usize = batches.iter().map(|b| b.bytes).sum();
                    self.release(done);
                    for b in batches {
                        for (r, slot) in b.records.iter().zip(b.slots) {
                            let ts = r.timestamp;
                            self.s.finish(
                                slot,
                                Ok(RecordMetadata {
                                    topic: b.tp.0.clone(),
                                    partition: b.tp.1,
                                    offset: -1,
                                    timestamp: ts,
                                }),
                            );
                        }
                    }
                }
                Ok(corr) => {
                    l.conn_forget();
                    l.in_flight.insert(corr, batches);
                    let _ = link;
                }
                Err(e) => {
                    tracing::debug!("sending to {addr}: {e:#}");
                    l.broken = true;
                    self.requeue(batches);
                }
            }
        }
    }

    fn build_request(&self, batches: &[Batch]) -> Result<ProduceRequest> {
        let mut topics: IndexMap<String, Vec<PartitionProduceData>> = IndexMap::new();
        for b in batches {
            let (pid, epoch) = b.producer.unwrap_or((-1, -1));
            let base_seq = b.sequence.unwrap_or(-1);
            let records: Vec<Record> = b
                .records
                .iter()
                .enumerate()
                .map(|(i, r)| Record {
                    transactional: false,
                    control: false,
                    partition_leader_epoch: -1,
                    producer_id: pid,
                    producer_epoch: epoch,
                    timestamp_type: TimestampType::Creation,
                    delete_horizon: false,
                    offset: i as i64,
                    // The encoder keeps records in one batch while offset - sequence stays
                    // the same and writes the first record's sequence as the batch's: without
                    // idempotence that is -1 (no sequence) and the next records follow it
                    // (-1 for each split the batch into one batch per record).
                    sequence: base_seq.wrapping_add(i as i32),
                    timestamp: r.timestamp,
                    key: r.key.clone(),
                    value: r.value.clone(),
                    headers: r
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                StrBytes::from_string(k.clone()),
                                Some(Bytes::from(v.clone())),
                            )
                        })
                        .collect(),
                })
                .collect();
            let mut buf = BytesMut::with_capacity(b.bytes + 128);
            RecordBatchEncoder::encode(
                &mut buf,
                &records,
                &RecordEncodeOptions {
                    version: 2,
                    compression: self.s.cfg.compression,
                },
            )?;
            topics.entry(b.tp.0.clone()).or_default().push(
                PartitionProduceData::default()
                    .with_index(b.tp.1)
                    .with_records(Some(buf.freeze())),
            );
        }
        Ok(ProduceRequest::default()
            .with_acks(self.s.cfg.acks)
            .with_timeout_ms(self.s.cfg.request_timeout.as_millis().min(i32::MAX as u128) as i32)
            .with_topic_data(
                topics
                    .into_iter()
                    .map(|(t, parts)| {
                        TopicProduceData::default()
                            .with_name(TopicName(StrBytes::from_string(t)))
                            .with_partition_data(parts)
                    })
                    .collect(),
            ))
    }

    fn handle(&mut self, ev: Event) {
        let Event::Response {
            link,
            correlation,
            response,
        } = ev
        else {
            return;
        };
        let Some(addr) = self
            .links
            .iter()
            .find(|(_, (id, _))| *id == link)
            .map(|(a, _)| a.clone())
        else {
            return;
        };
        match response {
            Err(e) => {
                tracing::debug!("connection to {addr} failed: {e}");
                if let Some((_, l)) = self.links.remove(&addr) {
                    let stranded: Vec<Batch> = l.in_flight.into_values().flatten().collect();
                    self.requeue(stranded);
                }
            }
            Ok(resp) => {
                let Some(batches) = self
                    .links
                    .get_mut(&addr)
                    .and_then(|(_, l)| l.in_flight.remove(&correlation))
                else {
                    return;
                };
                // Counted before any record completes: what the application sees next.
                self.s.acc.lock().unwrap().requests_in_flight = self.total_in_flight();
                let mut codes: HashMap<TopicPartition, (i16, i64, i64)> = HashMap::new();
                for t in &resp.responses {
                    for p in &t.partition_responses {
                        codes.insert(
                            (t.name.0.to_string(), p.index),
                            (p.error_code, p.base_offset, p.log_append_time_ms),
                        );
                    }
                }
                let mut retry = Vec::new();
                let mut released = 0;
                let mut completed = Vec::with_capacity(batches.len());
                for b in batches {
                    let (code, base, append_time) =
                        codes.get(&b.tp).copied().unwrap_or((13, -1, -1));
                    if code == 0 {
                        released += b.bytes;
                        completed.push((b, Ok((base, append_time))));
                    } else if is_retriable(code) {
                        retry.push(b);
                    } else {
                        released += b.bytes;
                        if b.sequence.is_some() {
                            // A gap in this producer's sequence would refuse every later batch:
                            // start over with a new producer id once nothing is in flight.
                            self.producer = None;
                        }
                        completed.push((b, Err(code)));
                    }
                }
                // One release (and one wake-up of blocked senders) per answer.
                if released > 0 {
                    self.release(released);
                }
                self.acked.extend(completed);
                if !retry.is_empty() {
                    self.requeue(retry);
                }
            }
        }
    }
}

impl Link {
    /// Responses are read by the link's reader thread, not through `Conn::recv`.
    fn conn_forget(&mut self) {
        self.conn.forget_in_flight();
    }
}

fn conn_reader(conn: &Conn) -> Result<TcpStream> {
    let s = conn.try_clone_stream()?;
    s.set_read_timeout(None)?;
    Ok(s)
}

/// A link's reader thread: decodes Produce responses in order, applies each to the sender's
/// state and sends what the answer made room for; the sender thread is woken to complete the
/// answered records.
fn read_responses(
    mut stream: TcpStream,
    link: usize,
    version: i16,
    state: Weak<Mutex<SenderLoop>>,
    tx: Sender<Event>,
) {
    loop {
        let r = (|| -> Result<(i32, ProduceResponse)> {
            let mut size = [0u8; 4];
            stream.read_exact(&mut size)?;
            let size = i32::from_be_bytes(size);
            if size < 4 || size as usize > RESPONSE_BYTES_MAX {
                bail!("response of {size} bytes");
            }
            let mut body = vec![0u8; size as usize];
            stream.read_exact(&mut body)?;
            let mut body = Bytes::from(body);
            let h = ResponseHeader::decode(
                &mut body,
                ApiKey::Produce.response_header_version(version),
            )?;
            Ok((
                h.correlation_id,
                ProduceResponse::decode(&mut body, version)?,
            ))
        })();
        let failed = r.is_err();
        let ev = Event::Response {
            link,
            correlation: r.as_ref().map_or(-1, |(c, _)| *c),
            response: r.map(|(_, resp)| resp).map_err(|e| format!("{e:#}")),
        };
        let Some(state) = state.upgrade() else {
            return;
        };
        {
            let mut st = state.lock().unwrap();
            st.handle(ev);
            st.send_ready();
        }
        drop(state);
        if tx.send(Event::Wake).is_err() || failed {
            return;
        }
    }
}
