//! Regression soak tests (issue #9): sustained overload, large records read back through a
//! small fetch limit, a kill -9 loop under an idempotent producer, and a bounded frame fuzzer,
//! each against the real broker process.
//!
//! Every test scales with `WEIR_SOAK_SCALE` (default 1, the CI size: each test under 90 s on
//! two cores, the overload test the longest at 60-80 s; the long run uses e.g. 10). Random choices come from a seed printed at the
//! start of each test; `WEIR_SOAK_SEED=N` replays it. Failures print what was measured (acks per
//! window, probe results, read-back counts) and the tail of the broker's log.

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, FetchRequest, MetadataRequest, ProduceRequest, RequestHeader,
    TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::records::Compression;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use weir_tests::raw::{self, frame};
use weir_tests::workload::{self, Consumed};
use weir_tests::{admin, eventually, Broker};

// ---- shared helpers ----

/// The size multiplier of every soak test: `WEIR_SOAK_SCALE`, default 1.
fn scale() -> u64 {
    match std::env::var("WEIR_SOAK_SCALE") {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&n| n >= 1)
            .expect("WEIR_SOAK_SCALE is a positive integer"),
        Err(_) => 1,
    }
}

/// The seed of this run (`WEIR_SOAK_SEED` or the clock), printed so a failure can be replayed.
fn seed(test: &str) -> u64 {
    let s = std::env::var("WEIR_SOAK_SEED")
        .ok()
        .map(|s| s.trim().parse().expect("WEIR_SOAK_SEED is a u64"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: WEIR_SOAK_SEED={s} WEIR_SOAK_SCALE={}", scale());
    s
}

/// The last `lines` lines of everything the broker logged.
fn log_tail(b: &Broker, lines: usize) -> String {
    let log = b.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The broker's log lines around its first panic and its first errors, if any.
fn log_trouble(b: &Broker) -> String {
    let log = b.log();
    let lines: Vec<&str> = log.lines().collect();
    let mut out = String::new();
    // Every distinct panic site, counted.
    let mut sites: BTreeMap<String, usize> = BTreeMap::new();
    for l in lines.iter().filter(|l| l.contains("panicked at")) {
        let site = l
            .split("panicked at")
            .nth(1)
            .unwrap_or(l)
            .trim()
            .to_string();
        *sites.entry(site).or_default() += 1;
    }
    for (site, n) in &sites {
        out.push_str(&format!("panicked {n} time(s) at {site}\n"));
    }
    let panic_at = lines.iter().position(|l| l.contains("panicked"));
    let errors = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("ERROR"));
    for at in panic_at.into_iter().chain(errors.map(|(i, _)| i).take(3)) {
        out.push_str(&format!("--- broker log from line {at}:\n"));
        out.push_str(&lines[at.saturating_sub(3)..(at + 12).min(lines.len())].join("\n"));
        out.push('\n');
    }
    out
}

/// Fails the test with every problem found, the measurements and the broker's log (its panic
/// and errors, and its tail).
fn fail_if_any(b: &Broker, test: &str, problems: &[String], summary: &str) {
    if problems.is_empty() {
        return;
    }
    panic!(
        "{test}: {} problem(s):\n  - {}\n\n{summary}\n\n{}\nbroker log tail:\n{}",
        problems.len(),
        problems.join("\n  - "),
        log_trouble(b),
        log_tail(b, 60)
    );
}

/// Acks counted per fixed window from per-second samples of a running total.
fn windows(samples: &[u64], window_s: usize) -> Vec<u64> {
    samples
        .windows(2)
        .collect::<Vec<_>>()
        .chunks(window_s)
        .map(|c| c.iter().map(|w| w[1] - w[0]).sum())
        .collect()
}

/// Random filler from which record payloads are cut.
struct Filler(Vec<u8>);

/// Bytes a tagged payload starts with: its tag (u64) and its own length (u32).
const TAG_BYTES: usize = 12;

impl Filler {
    fn new(rng: &mut StdRng) -> Filler {
        Filler((0..(1 << 20)).map(|_| rng.gen()).collect())
    }

    /// A payload of `len` bytes that names itself: tag and length first, then filler, so a
    /// read-back can tell which record sits at an offset and that it arrived whole.
    fn payload(&self, tag: u64, len: usize) -> Vec<u8> {
        assert!((TAG_BYTES..self.0.len()).contains(&len));
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&tag.to_be_bytes());
        v.extend_from_slice(&(len as u32).to_be_bytes());
        let start = (tag as usize).wrapping_mul(7919) % (self.0.len() - len);
        v.extend_from_slice(&self.0[start..start + len - TAG_BYTES]);
        v
    }
}

/// The tag of a payload made by `Filler::payload`, if it is whole.
fn payload_tag(p: &[u8]) -> Option<u64> {
    if p.len() < TAG_BYTES {
        return None;
    }
    let len = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
    (len == p.len()).then(|| u64::from_be_bytes(p[..8].try_into().unwrap()))
}

#[derive(Clone, Debug)]
struct TagAck {
    topic: String,
    partition: i32,
    offset: i64,
    tag: u64,
    bytes: usize,
}

/// Delivery reports of tagged records, with the time of the last acknowledgement.
struct TagAcks {
    epoch: Instant,
    acked: Mutex<Vec<TagAck>>,
    count: AtomicU64,
    last_ack_ms: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl TagAcks {
    fn new() -> Arc<TagAcks> {
        Arc::new(TagAcks {
            epoch: Instant::now(),
            acked: Mutex::new(Vec::new()),
            count: AtomicU64::new(0),
            last_ack_ms: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    /// How long no acknowledgement has arrived, counted from `since` at the earliest.
    fn quiet_for(&self, since: Instant) -> Duration {
        let last = self.epoch + Duration::from_millis(self.last_ack_ms.load(Ordering::Relaxed));
        last.max(since).elapsed()
    }
}

#[derive(Clone)]
struct TagCtx(Arc<TagAcks>);

impl ClientContext for TagCtx {}

impl ProducerContext for TagCtx {
    type DeliveryOpaque = Box<u64>;
    fn delivery(&self, r: &DeliveryResult<'_>, tag: Box<u64>) {
        match r {
            Ok(m) => {
                self.0.acked.lock().unwrap().push(TagAck {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    tag: *tag,
                    bytes: m.payload_len(),
                });
                self.0.count.fetch_add(1, Ordering::Relaxed);
                self.0
                    .last_ack_ms
                    .fetch_max(self.0.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                *self.0.last_error.lock().unwrap() = Some(e.to_string());
            }
        }
    }
}

/// Sends one tagged record, waiting while librdkafka's queue is full. Returns false when
/// `give_up` said so while waiting or the client refused the record (the error is recorded).
fn send_tagged(
    p: &BaseProducer<TagCtx>,
    acks: &TagAcks,
    topic: &str,
    tag: u64,
    payload: &[u8],
    give_up: &dyn Fn() -> bool,
) -> bool {
    let mut rec: BaseRecord<(), [u8], Box<u64>> =
        BaseRecord::with_opaque_to(topic, Box::new(tag)).payload(payload);
    loop {
        match p.send(rec) {
            Ok(()) => return true,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                if give_up() {
                    return false;
                }
                rec = r;
                p.poll(Duration::from_millis(10));
            }
            Err((e, _)) => {
                *acks.last_error.lock().unwrap() = Some(format!("send refused: {e}"));
                return false;
            }
        }
    }
}

/// Tags of probe records: apart from the load's (writer << 48 | sequence).
const PROBE_TAG: u64 = 0xffff << 48;

/// Sends one small tagged record to each target (a topic, and a partition or the
/// partitioner's choice) with acks=all, each from its own producer (its own connection, so one
/// stuck shard does not hold up the answer for another), and reports per target its
/// acknowledgement, or why none came within `timeout`.
fn probe(
    b: &Broker,
    targets: &[(String, Option<i32>)],
    timeout: Duration,
) -> Vec<(String, Result<TagAck, String>)> {
    let mut cfg = b.client_config();
    cfg.set("acks", "all")
        .set("linger.ms", "0")
        .set("message.timeout.ms", timeout.as_millis().to_string());
    let probes: Vec<_> = targets
        .iter()
        .enumerate()
        .map(|(i, (t, partition))| {
            let (cfg, t, partition) = (cfg.clone(), t.clone(), *partition);
            std::thread::spawn(move || {
                let acks = TagAcks::new();
                let p: BaseProducer<TagCtx> =
                    cfg.create_with_context(TagCtx(acks.clone())).unwrap();
                let tag = PROBE_TAG | i as u64;
                let payload = format!("probe-{i}-{t}");
                let mut full = tag.to_be_bytes().to_vec();
                full.extend_from_slice(&((TAG_BYTES + payload.len()) as u32).to_be_bytes());
                full.extend_from_slice(payload.as_bytes());
                let mut rec: BaseRecord<(), [u8], Box<u64>> =
                    BaseRecord::with_opaque_to(&t, Box::new(tag)).payload(&full);
                rec.partition = partition;
                if let Err((e, _)) = p.send(rec) {
                    *acks.last_error.lock().unwrap() = Some(format!("send refused: {e}"));
                }
                let started = Instant::now();
                let _ = p.flush(timeout + Duration::from_secs(2));
                let waited = started.elapsed();
                drop(p); // purges the record if it is still unacknowledged
                let r = match acks.acked.lock().unwrap().first() {
                    Some(a) => Ok(a.clone()),
                    None => Err(format!(
                        "no ack within {:.1} s (client error: {})",
                        waited.as_secs_f64(),
                        acks.last_error
                            .lock()
                            .unwrap()
                            .clone()
                            .unwrap_or_else(|| "none".into())
                    )),
                };
                let name = match partition {
                    Some(n) => format!("{t}-{n}"),
                    None => t,
                };
                (name, r)
            })
        })
        .collect();
    probes.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Probe results, one line each.
fn show_probes(probes: &[(String, Result<TagAck, String>)]) -> String {
    probes
        .iter()
        .map(|(t, r)| match r {
            Ok(a) => format!(
                "  {t}: acked at partition {} offset {}",
                a.partition, a.offset
            ),
            Err(e) => format!("  {t}: {e}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a read-back found in one partition: its log start (low watermark), its high watermark
/// and the tag of every record from the log start on (None for a record that is not a whole
/// tagged payload).
struct PartitionRead {
    low: i64,
    high: i64,
    tags: Vec<Option<u64>>,
}

impl PartitionRead {
    fn next(&self) -> i64 {
        self.low + self.tags.len() as i64
    }

    fn tag_at(&self, offset: i64) -> Option<u64> {
        let i = usize::try_from(offset - self.low).ok()?;
        self.tags.get(i).copied().flatten()
    }
}

/// Reads every partition in `parts` from its log start to its high watermark (both taken
/// first) with `settings` on top of the consumer defaults. Problems (gaps, a stall) are added
/// to `problems`.
fn read_tags(
    b: &Broker,
    parts: &[(String, i32)],
    settings: &[(&str, &str)],
    timeout: Duration,
    problems: &mut Vec<String>,
) -> BTreeMap<(String, i32), PartitionRead> {
    let mut cfg = b.client_config();
    cfg.set("group.id", "weir-soak")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "100");
    for (k, v) in settings {
        cfg.set(*k, *v);
    }
    let c: BaseConsumer = cfg.create().expect("creating consumer");
    let mut out = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for (t, p) in parts {
        let (low, high) = match c.fetch_watermarks(t, *p, Duration::from_secs(20)) {
            Ok(w) => w,
            Err(e) => {
                problems.push(format!("{t}-{p}: no watermarks: {e}"));
                continue;
            }
        };
        out.insert(
            (t.clone(), *p),
            PartitionRead {
                low,
                high,
                tags: Vec::new(),
            },
        );
        if high > low {
            tpl.add_partition_offset(t, *p, Offset::Offset(low))
                .unwrap();
        }
    }
    c.assign(&tpl).unwrap();
    let missing = |out: &BTreeMap<(String, i32), PartitionRead>| -> i64 {
        out.values().map(|r| r.high - r.next()).sum()
    };
    let deadline = Instant::now() + timeout;
    while missing(&out) > 0 && Instant::now() < deadline {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let key = (m.topic().to_string(), m.partition());
                let Some(r) = out.get_mut(&key) else { continue };
                if m.offset() >= r.high {
                    continue;
                }
                if m.offset() != r.next() {
                    problems.push(format!(
                        "{}-{}: read offset {} where {} was next",
                        key.0,
                        key.1,
                        m.offset(),
                        r.next()
                    ));
                    return out;
                }
                r.tags.push(m.payload().and_then(payload_tag));
            }
            Some(Err(e)) => {
                problems.push(format!("consumer error: {e}"));
                return out;
            }
            None => {}
        }
    }
    for ((t, p), r) in &out {
        if r.next() < r.high {
            problems.push(format!(
                "{t}-{p}: only offsets {}..{} of {}..{} readable within {:?}",
                r.low,
                r.next(),
                r.low,
                r.high,
                timeout
            ));
        }
        if let Some(bad) = r.tags.iter().position(|t| t.is_none()) {
            problems.push(format!(
                "{t}-{p}: record at offset {} is not whole",
                r.low + bad as i64
            ));
        }
    }
    out
}

/// Checks every acknowledged record is in the read-back at its acknowledged offset; with
/// `exact`, also that nothing else is in those partitions (count per partition = acks).
/// Records below a partition's log start were removed by retention: allowed only when
/// `retention` (then counted and returned), otherwise a problem.
fn check_acked(
    acked: &[TagAck],
    read: &BTreeMap<(String, i32), PartitionRead>,
    exact: bool,
    retention: bool,
    problems: &mut Vec<String>,
) -> usize {
    let mut per_partition: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut wrong = Vec::new();
    let mut retired = 0;
    for a in acked {
        let key = (a.topic.clone(), a.partition);
        let Some(r) = read.get(&key) else {
            wrong.push(format!("{}-{}: not read at all", a.topic, a.partition));
            continue;
        };
        if a.offset < r.low && retention {
            retired += 1;
            continue;
        }
        *per_partition.entry(key).or_default() += 1;
        let found = r.tag_at(a.offset);
        if found != Some(a.tag) {
            wrong.push(format!(
                "{}-{} offset {} (log {}..{}): acked tag {:#x}, read {:?}",
                a.topic, a.partition, a.offset, r.low, r.high, a.tag, found
            ));
        }
    }
    if !wrong.is_empty() {
        problems.push(format!(
            "{} acknowledged records not readable where acknowledged, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        ));
    }
    if exact {
        for ((t, p), r) in read {
            let n = per_partition.get(&(t.clone(), *p)).copied().unwrap_or(0);
            if n != r.high - r.low {
                problems.push(format!(
                    "{t}-{p}: {} records in the log (offsets {}..{}), {n} acknowledged there",
                    r.high - r.low,
                    r.low,
                    r.high
                ));
            }
        }
    }
    retired
}

// ---- 1. overload ----

/// Issue #9, "writes stop for good under overload": six acks=all producers at full speed with
/// 1-16 KiB records into a 2-shard broker with a 64 MiB cache. On the broken broker the shard's
/// pending-bytes counter leaks until the 64 MiB backpressure wait blocks every append; here
/// acknowledgements must keep arriving in every 5 s window, a probe to an existing and to a new
/// topic must be acknowledged afterwards, and every acknowledged record must be readable.
#[test]
fn overload_writes_keep_flowing() {
    const TEST: &str = "overload_writes_keep_flowing";
    const PRODUCERS: u64 = 6;
    const WINDOW_S: usize = 5;
    const FLUSH_S: u64 = 15;
    const PARTITIONS: i32 = 2;
    const RETENTION_BYTES: usize = 2 << 30;
    const RETENTION_CHECK_MS: u64 = 2_000;
    let seed = seed(TEST);
    // 40 s: on the broken broker (debug build, two busy cores) writes stopped after 14-55 s,
    // about one run in three within 20 s.
    let load_s = 40 * scale() as usize;
    // The harness starts every broker with `--cache-bytes 67108864` (64 MiB), the size the
    // issue was seen with (the flag cannot be given twice). A fixed broker takes ~7 GB in the
    // CI-size run; longer runs would fill the disk, so old segments beyond RETENTION_BYTES per
    // partition are deleted (the read-back then starts at the log start).
    let props = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        props.path(),
        format!("log.retention.check.interval.ms={}\n", RETENTION_CHECK_MS),
    )
    .unwrap();
    let b = Broker::start_with(2, &["--config", props.path().to_str().unwrap()]);
    let topics: Vec<String> = (0..3).map(|i| format!("load-{i}")).collect();
    let retention = RETENTION_BYTES.to_string();
    let topic_config = [
        ("retention.bytes", retention.as_str()),
        ("segment.bytes", "268435456"),
    ];
    for t in &topics {
        admin::create(&b, t, PARTITIONS, 1, &topic_config).unwrap();
    }
    let mut cfg = b.client_config();
    cfg.set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.kbytes", "65536")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "60000");
    let mut rng = StdRng::seed_from_u64(seed);
    let filler = Arc::new(Filler::new(&mut rng));
    let acks = TagAcks::new();
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|w| {
            let (cfg, acks, stop, filler, topics) = (
                cfg.clone(),
                acks.clone(),
                stop.clone(),
                filler.clone(),
                topics.clone(),
            );
            let mut rng = StdRng::seed_from_u64(seed ^ (w + 1).wrapping_mul(0x9e37_79b9));
            std::thread::spawn(move || {
                let p: BaseProducer<TagCtx> =
                    cfg.create_with_context(TagCtx(acks.clone())).unwrap();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let len = rng.gen_range(1024..=16384);
                    let topic = &topics[rng.gen_range(0..topics.len())];
                    let tag = (w << 48) | sent;
                    let payload = filler.payload(tag, len);
                    let give_up = || stop.load(Ordering::Relaxed);
                    if !send_tagged(&p, &acks, topic, tag, &payload, &give_up) {
                        break;
                    }
                    sent += 1;
                    p.poll(Duration::ZERO);
                }
                let flushed = p.flush(Duration::from_secs(FLUSH_S)).is_ok();
                (sent, flushed) // dropping the producer purges what is left
            })
        })
        .collect();

    // The load is timed from the first acknowledgement (connecting and fetching metadata can
    // take seconds on a busy machine); its total is sampled every second.
    let warm = eventually(Duration::from_secs(30), || {
        acks.count.load(Ordering::Relaxed) > 0
    });
    let start = Instant::now();
    let warmup_s = (start - acks.epoch).as_secs_f64();
    let mut samples = vec![acks.count.load(Ordering::Relaxed)];
    for s in 1..=if warm { load_s } else { 0 } {
        let due = start + Duration::from_secs(s as u64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        samples.push(acks.count.load(Ordering::Relaxed));
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<(u64, bool)> = producers.into_iter().map(|h| h.join().unwrap()).collect();
    let sent: u64 = results.iter().map(|r| r.0).sum();
    let unflushed = results.iter().filter(|r| !r.1).count();
    let per_window = windows(&samples, WINDOW_S);
    let mut acked = acks.acked.lock().unwrap().clone();
    let failed = acks.failed.load(Ordering::Relaxed);
    // When the acknowledgements stopped for good (the last one, after the final flush), in
    // seconds from the start of the timed load.
    let last_ack_s = acks.last_ack_ms.load(Ordering::Relaxed) as f64 / 1000.0 - warmup_s;
    let mut problems = Vec::new();
    if !warm {
        problems.push("no acknowledgement within 30 s of the producers' start".into());
    }
    let mut summary = format!(
        "load {load_s} s (timed from the first ack, {warmup_s:.1} s after the producers \
         started), acks per {WINDOW_S} s window: {per_window:?}\n\
         acks per second: {:?}\n\
         {sent} sent, {} acknowledged, {failed} failed (last error: {:?}), \
         {unflushed} producers did not flush within {FLUSH_S} s after the load; \
         the last ack came {last_ack_s:.1} s after the load began",
        samples.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>(),
        acked.len(),
        acks.last_error.lock().unwrap()
    );
    if let Some(w) = per_window.iter().position(|&n| n == 0) {
        problems.push(format!(
            "no acknowledgement in window {w} ({}-{} s of the load); acks stopped {last_ack_s:.1} s into it",
            w * WINDOW_S,
            (w + 1) * WINDOW_S,
        ));
    }
    if unflushed > 0 || failed > 0 {
        problems.push(format!(
            "{failed} records in flight at the end of the load were never acknowledged \
             ({unflushed} producers did not flush within {FLUSH_S} s); acks stopped {last_ack_s:.1} s \
             after the load began"
        ));
    }

    // (b) A probe to every partition of the load (both shards) and to two brand-new topics
    // (auto-created, round-robin over the shards).
    let targets: Vec<(String, Option<i32>)> = topics
        .iter()
        .flat_map(|t| (0..PARTITIONS).map(move |p| (t.clone(), Some(p))))
        .chain((0..2).map(|i| (format!("overload-probe-new-{i}"), None)))
        .collect();
    let probes = probe(&b, &targets, Duration::from_secs(10));
    summary.push_str(&format!(
        "\nprobes after the load:\n{}",
        show_probes(&probes)
    ));
    for (t, r) in probes {
        match r {
            // The probe to a load topic is one more record the read-back must find.
            Ok(a) if topics.contains(&a.topic) => acked.push(a),
            Ok(_) => {}
            Err(e) => problems.push(format!("probe to {t}: {e}")),
        }
    }

    // (c) Every acknowledged record is readable, and (no delivery failed) nothing else is there.
    // When a partition outgrew its retention, let the retention check run before reading.
    let mut partition_bytes: HashMap<(&str, i32), usize> = HashMap::new();
    for a in &acked {
        *partition_bytes.entry((&a.topic, a.partition)).or_default() += a.bytes;
    }
    if partition_bytes.values().any(|&n| n > RETENTION_BYTES) {
        std::thread::sleep(Duration::from_millis(3 * RETENTION_CHECK_MS));
    }
    let parts: Vec<(String, i32)> = topics
        .iter()
        .flat_map(|t| (0..PARTITIONS).map(move |p| (t.clone(), p)))
        .collect();
    let started = Instant::now();
    let read = read_tags(
        &b,
        &parts,
        &[
            ("max.partition.fetch.bytes", "8388608"),
            ("fetch.max.bytes", "67108864"),
        ],
        Duration::from_secs(120 * scale()),
        &mut problems,
    );
    let retired = check_acked(&acked, &read, failed == 0, true, &mut problems);
    summary.push_str(&format!(
        "\nread back {} records in {:.1} s ({retired} acknowledged records were below the log \
         start, removed by retention); partitions (log start, high watermark): {:?}",
        read.values().map(|r| r.tags.len()).sum::<usize>(),
        started.elapsed().as_secs_f64(),
        read.iter()
            .map(|((t, p), r)| (format!("{t}-{p}"), r.low, r.high))
            .collect::<Vec<_>>()
    ));
    eprintln!("{TEST}: {summary}");
    let log = b.log();
    if log.contains("panicked") {
        problems.push("the broker panicked".into());
    }
    fail_if_any(&b, TEST, &problems, &summary);
}

// ---- 2. large records, small fetch limit ----

/// Issue #9, the second trigger: ~500 MB (x scale) of 10-500 KB records into one partition,
/// then a consumer with a 100 KB fetch limit reads it all from the beginning (every batch is
/// larger than the limit, so each fetch must still return one whole batch). Afterwards produce
/// requests to new topics, on both shards, must be acknowledged.
#[test]
fn large_records_then_small_fetch_limit() {
    const TEST: &str = "large_records_then_small_fetch_limit";
    let seed = seed(TEST);
    let total_bytes = 500_000_000 * scale() as usize;
    let b = Broker::start(2);
    admin::create(&b, "large", 1, 1, &[]).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let filler = Filler::new(&mut rng);
    let mut cfg = b.client_config();
    cfg.set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.kbytes", "262144")
        .set("message.timeout.ms", "120000");
    let acks = TagAcks::new();
    let p: BaseProducer<TagCtx> = cfg.create_with_context(TagCtx(acks.clone())).unwrap();
    // A healthy broker acknowledges something every few hundred milliseconds here; 15 s
    // without any acknowledgement while records wait means writes stopped.
    let stall = Duration::from_secs(15);
    let (mut bytes, mut sent, mut lens) = (0usize, 0u64, Vec::new());
    let started = Instant::now();
    let stalled = || acks.quiet_for(started) > stall;
    while bytes < total_bytes {
        let len = rng.gen_range(10 * 1024..=500 * 1024);
        let payload = filler.payload(sent, len);
        if !send_tagged(&p, &acks, "large", sent, &payload, &stalled) {
            break;
        }
        bytes += len;
        lens.push(len);
        sent += 1;
        p.poll(Duration::ZERO);
    }
    let mut flushed = false;
    while !flushed && !stalled() {
        flushed = p.flush(Duration::from_secs(1)).is_ok();
    }
    drop(p); // purges what is left
    let produce_s = started.elapsed().as_secs_f64();
    let acked = acks.acked.lock().unwrap().clone();
    let failed = acks.failed.load(Ordering::Relaxed);
    let acked_bytes: usize = acked.iter().map(|a| lens[a.tag as usize]).sum();
    let mut problems = Vec::new();
    let mut summary = format!(
        "sent {sent} records, {bytes} bytes in {produce_s:.1} s: {} acknowledged ({acked_bytes} \
         bytes), {failed} failed (last error: {:?}), flushed: {flushed}; the last ack came {:.1} s \
         after the first send",
        acked.len(),
        acks.last_error.lock().unwrap(),
        acks.last_ack_ms.load(Ordering::Relaxed) as f64 / 1000.0
    );
    if !flushed || acked.len() as u64 != sent {
        problems.push(format!(
            "writes stopped: {} of {sent} records ({acked_bytes} bytes) acknowledged, then no \
             ack for {} s; the last came {:.1} s after the first send",
            acked.len(),
            stall.as_secs(),
            acks.last_ack_ms.load(Ordering::Relaxed) as f64 / 1000.0
        ));
    }

    let started = Instant::now();
    let read = read_tags(
        &b,
        &[("large".to_string(), 0)],
        &[
            ("max.partition.fetch.bytes", "102400"),
            ("fetch.max.bytes", "102400"),
            ("message.max.bytes", "102400"),
        ],
        Duration::from_secs(120 * scale()),
        &mut problems,
    );
    summary.push_str(&format!(
        "\nread back {} of {} records with a 100 KB fetch limit in {:.1} s",
        read.values().map(|r| r.tags.len()).sum::<usize>(),
        read.values().map(|r| r.high).sum::<i64>(),
        started.elapsed().as_secs_f64()
    ));
    check_acked(&acked, &read, failed == 0, false, &mut problems);

    // New topics are auto-created round-robin over the shards: four of them hit both.
    let mut targets: Vec<(String, Option<i32>)> =
        (0..4).map(|i| (format!("after-large-{i}"), None)).collect();
    targets.push(("large".to_string(), Some(0)));
    let probes = probe(&b, &targets, Duration::from_secs(10));
    summary.push_str(&format!("\nprobes afterwards:\n{}", show_probes(&probes)));
    for (t, r) in &probes {
        if let Err(e) = r {
            problems.push(format!("probe to {t}: {e}"));
        }
    }
    eprintln!("{TEST}: {summary}");
    if b.log().contains("panicked") {
        problems.push("the broker panicked".into());
    }
    fail_if_any(&b, TEST, &problems, &summary);
}

// ---- 3. kill -9 loop ----

/// Record `i` of the keyed workload (`workload::key`, `value`, `timestamp`, headers idx and
/// kind), sent without blocking forever: false when the client refused it for good.
fn send_workload(
    p: &BaseProducer<workload::Ctx>,
    topic: &str,
    i: usize,
    errors: &Mutex<Option<String>>,
) -> bool {
    match workload::try_send(p, topic, i) {
        Ok(()) => true,
        Err(e) => {
            *errors.lock().unwrap() = Some(format!("record {i} refused: {e}"));
            false
        }
    }
}

/// Issue #9: N cycles (5 x scale) of an idempotent acks=all producer streaming into a
/// 6-partition topic while the broker is killed with SIGKILL at a random moment and restarted.
/// The one producer keeps going across every restart. At the end every acknowledged record is
/// at its acknowledged offset, intact, each record exactly once, in send order per partition.
#[test]
fn kill9_loop_loses_nothing() {
    const TEST: &str = "kill9_loop_loses_nothing";
    const TOPIC: &str = "kill-loop";
    // Acks the producer must get after the last restart before the check.
    const PROGRESS: usize = 20_000;
    let seed = seed(TEST);
    let cycles = 5 * scale() as usize;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut b = Broker::start(2);
    admin::create(&b, TOPIC, 6, 1, &[]).unwrap();
    let mut cfg = b.client_config();
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "300000")
        .set("queue.buffering.max.messages", "50000")
        .set("reconnect.backoff.ms", "20")
        .set("reconnect.backoff.max.ms", "200");
    let (p, acks) = workload::producer(&cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(Mutex::new(None));
    let sender = {
        let (stop, refused) = (stop.clone(), refused.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if !send_workload(&p, TOPIC, i, &refused) {
                    break;
                }
                i += 1;
                if i % 200 == 0 {
                    p.poll(Duration::from_millis(1));
                }
            }
            let flushed = p.flush(Duration::from_secs(120)).is_ok();
            (i, flushed)
        })
    };
    let acked_now = || acks.acked.lock().unwrap().len();
    let mut history = Vec::new();
    for cycle in 0..cycles {
        // The producer gets going again (its first new ack), then the broker dies at a random
        // moment: during the retry burst right after the restart or in the steady stream.
        let before = acked_now();
        let started = Instant::now();
        if !eventually(Duration::from_secs(90), || acked_now() > before) {
            stop.store(true, Ordering::Relaxed);
            panic!(
                "{TEST}: cycle {cycle}: no ack within 90 s of the restart ({before} acked; \
                 failed {}, last error {:?}, refused {:?}); history {history:?}\n\
                 broker log tail:\n{}",
                acks.failed.load(Ordering::Relaxed),
                acks.last_error.lock().unwrap(),
                refused.lock().unwrap(),
                log_tail(&b, 60)
            );
        }
        let first_ack_s = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..2000)));
        let at_kill = acked_now();
        b.kill9();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        b.restart();
        history.push(format!(
            "cycle {cycle}: first ack {first_ack_s:.1} s after the (re)start, killed at {at_kill} acks"
        ));
    }
    let before = acked_now();
    let progressed = eventually(Duration::from_secs(90), || acked_now() >= before + PROGRESS);
    stop.store(true, Ordering::Relaxed);
    let (sent, flushed) = sender.join().unwrap();
    let mut acked = acks.acked.lock().unwrap().clone();
    acked.sort_by_key(|a| a.idx);
    let failed = acks.failed.load(Ordering::Relaxed);
    let mut problems = Vec::new();
    let mut summary = format!(
        "{}\n{sent} sent, {} acknowledged, {failed} failed (last error {:?}), refused {:?}, flushed {flushed}",
        history.join("\n"),
        acked.len(),
        acks.last_error.lock().unwrap(),
        refused.lock().unwrap()
    );
    if !progressed {
        problems.push("no progress after the last restart".into());
    }
    if failed > 0 || acked.len() != sent || refused.lock().unwrap().is_some() {
        problems.push(format!(
            "the idempotent producer should get every record acknowledged across restarts: \
             {sent} sent, {} acknowledged, {failed} failed",
            acked.len()
        ));
    }

    let c = workload::consumer(&b.client_config());
    let highs: Vec<i64> = (0..6)
        .map(|p| {
            c.fetch_watermarks(TOPIC, p, Duration::from_secs(20))
                .unwrap()
                .1
        })
        .collect();
    drop(c);
    let total: i64 = highs.iter().sum();
    summary.push_str(&format!("\nhigh watermarks {highs:?} (total {total})"));
    let got = workload::consume(
        &b.client_config(),
        TOPIC,
        6,
        total as usize,
        Duration::from_secs(120 * scale()),
    );
    let mut at: HashMap<usize, (i32, i64)> = HashMap::new();
    let mut duplicates = Vec::new();
    for p in 0..6 {
        let recs: &[Consumed] = got.get(&p).map(|v| v.as_slice()).unwrap_or(&[]);
        if recs.len() as i64 != highs[p as usize] {
            problems.push(format!(
                "partition {p}: {} of {} records readable",
                recs.len(),
                highs[p as usize]
            ));
        }
        for (n, r) in recs.iter().enumerate() {
            assert_eq!(r.offset, n as i64, "partition {p}: offsets dense from 0");
            r.check(); // key, value, timestamp and headers intact
            if at.insert(r.idx(), (p, r.offset)).is_some() {
                duplicates.push(r.idx());
            }
        }
        if let Some(w) = recs.windows(2).find(|w| w[0].idx() >= w[1].idx()) {
            problems.push(format!(
                "partition {p}: record {} at offset {} follows record {} (send order broken)",
                w[1].idx(),
                w[1].offset,
                w[0].idx()
            ));
        }
    }
    if !duplicates.is_empty() {
        problems.push(format!(
            "{} records stored twice, e.g. {:?}",
            duplicates.len(),
            &duplicates[..duplicates.len().min(10)]
        ));
    }
    let lost: Vec<_> = acked
        .iter()
        .filter(|a| at.get(&a.idx) != Some(&(a.partition, a.offset)))
        .collect();
    if !lost.is_empty() {
        problems.push(format!(
            "{} acknowledged records not where acknowledged, e.g. {:?} (found at {:?})",
            lost.len(),
            lost[0],
            at.get(&lost[0].idx)
        ));
    }
    if failed == 0 && total as usize != acked.len() {
        problems.push(format!(
            "{total} records stored, {} acknowledged: every stored record is acknowledged once",
            acked.len()
        ));
    }
    eprintln!("{TEST}: {summary}");
    if b.log().contains("panicked") {
        problems.push("the broker panicked".into());
    }
    fail_if_any(&b, TEST, &problems, &summary);
}

// ---- 4. frame fuzzer ----

/// A request frame body (header and request) encoded by kafka-protocol.
fn encode_request<R: Encodable>(key: ApiKey, version: i16, correlation: i32, req: &R) -> Vec<u8> {
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation)
        .with_client_id(Some(StrBytes::from_static_str("soak-fuzz")))
        .encode(&mut buf, key.request_header_version(version))
        .unwrap();
    req.encode(&mut buf, version)
        .unwrap_or_else(|e| panic!("encoding {key:?} v{version}: {e}"));
    buf.to_vec()
}

fn small_batch(rng: &mut StdRng) -> Bytes {
    let n = rng.gen_range(1..20);
    let records: Vec<raw::RawRecord> = (0..n)
        .map(|i| {
            (
                Some(Bytes::from(format!("fk{i}"))),
                Some(Bytes::from(vec![b'v'; rng.gen_range(0..300)])),
                workload::base_timestamp_ms() + i as i64,
            )
        })
        .collect();
    let compression = [Compression::None, Compression::Gzip, Compression::Lz4][rng.gen_range(0..3)];
    raw::batch(records, -1, -1, -1, compression)
}

/// A valid frame body to mutate, with where its record batches are (Produce only).
struct Template {
    body: Vec<u8>,
    /// (start, length) of every record batch inside `body`.
    batches: Vec<(usize, usize)>,
}

impl Template {
    fn new(body: Vec<u8>) -> Template {
        Template {
            body,
            batches: Vec::new(),
        }
    }

    /// A Produce body: finds each of `batches` (in order) inside it.
    fn produce(body: Vec<u8>, batches: &[Bytes]) -> Template {
        let mut found = Vec::new();
        let mut from = 0;
        for b in batches {
            let at = from
                + body[from..]
                    .windows(b.len())
                    .position(|w| w == &b[..])
                    .expect("the batch is in the encoded request");
            found.push((at, b.len()));
            from = at + b.len();
        }
        Template {
            body,
            batches: found,
        }
    }
}

/// Valid ApiVersions, Metadata, Produce and Fetch frames at every version the broker supports,
/// about the topic `fuzz` (two partitions), to be mutated.
fn templates(rng: &mut StdRng) -> Vec<Template> {
    let topic = || TopicName(StrBytes::from_static_str("fuzz"));
    let mut out = Vec::new();
    for v in 0..=3 {
        let mut r = ApiVersionsRequest::default();
        if v >= 3 {
            r = r
                .with_client_software_name(StrBytes::from_static_str("soak"))
                .with_client_software_version(StrBytes::from_static_str("1.0"));
        }
        out.push(Template::new(encode_request(
            ApiKey::ApiVersions,
            v,
            rng.gen(),
            &r,
        )));
    }
    for v in 1..=12 {
        let r = MetadataRequest::default()
            .with_topics(Some(vec![
                MetadataRequestTopic::default().with_name(Some(topic()))
            ]))
            // Versions before 4 always auto-create (the field does not exist there).
            .with_allow_auto_topic_creation(v < 4 || rng.gen());
        out.push(Template::new(encode_request(
            ApiKey::Metadata,
            v,
            rng.gen(),
            &r,
        )));
        out.push(Template::new(encode_request(
            ApiKey::Metadata,
            v,
            rng.gen(),
            &MetadataRequest::default().with_topics(None),
        )));
    }
    for v in 3..=9 {
        for _ in 0..3 {
            // One or two partitions, each with one or two batches.
            let mut batches = Vec::new();
            let parts = (0..rng.gen_range(1..=2))
                .map(|p| {
                    let mut records = BytesMut::new();
                    for _ in 0..rng.gen_range(1..=2) {
                        let b = small_batch(rng);
                        records.extend_from_slice(&b);
                        batches.push(b);
                    }
                    PartitionProduceData::default()
                        .with_index(p)
                        .with_records(Some(records.freeze()))
                })
                .collect();
            let r = ProduceRequest::default()
                .with_acks([0, 1, -1][rng.gen_range(0..3)])
                .with_timeout_ms(5_000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(topic())
                    .with_partition_data(parts)]);
            let body = encode_request(ApiKey::Produce, v, rng.gen(), &r);
            out.push(Template::produce(body, &batches));
        }
    }
    for v in 4..=12 {
        let r = FetchRequest::default()
            .with_replica_id((-1).into())
            .with_max_wait_ms(rng.gen_range(0..300))
            .with_min_bytes(rng.gen_range(0..2))
            .with_max_bytes(1 << 20)
            .with_session_epoch(-1)
            .with_topics(vec![FetchTopic::default()
                .with_topic(topic())
                .with_partitions(
                    (0..2)
                        .map(|p| {
                            FetchPartition::default()
                                .with_partition(p)
                                .with_fetch_offset(rng.gen_range(0..50))
                                .with_partition_max_bytes(rng.gen_range(1..1 << 20))
                        })
                        .collect(),
                )]);
        out.push(Template::new(encode_request(
            ApiKey::Fetch,
            v,
            rng.gen(),
            &r,
        )));
    }
    out
}

const INTERESTING_I32: [i32; 12] = [
    0,
    1,
    -1,
    -2,
    255,
    256,
    65_536,
    0x0100_0000,
    0x7fff_fff0,
    i32::MAX,
    i32::MIN,
    100 * 1024 * 1024,
];
const INTERESTING_I16: [i16; 8] = [0, 1, -1, -2, 255, 256, 0x7ff0, i16::MAX];

/// One mutation of a frame body: flipped bytes, an array count or length replaced by an
/// extreme value (fixed or varint), a truncation, inserted or deleted bytes, appended junk.
fn mutate(rng: &mut StdRng, body: &mut Vec<u8>) {
    if body.is_empty() {
        body.push(rng.gen());
        return;
    }
    let at = rng.gen_range(0..body.len());
    match rng.gen_range(0..8) {
        0 => {
            for _ in 0..rng.gen_range(1..=8) {
                let i = rng.gen_range(0..body.len());
                body[i] ^= rng.gen_range(1..=255u8);
            }
        }
        1 => {
            let v = if rng.gen_bool(0.8) {
                INTERESTING_I32[rng.gen_range(0..INTERESTING_I32.len())]
            } else {
                rng.gen()
            };
            let end = (at + 4).min(body.len());
            body[at..end].copy_from_slice(&v.to_be_bytes()[..end - at]);
        }
        2 => {
            let v = INTERESTING_I16[rng.gen_range(0..INTERESTING_I16.len())];
            let end = (at + 2).min(body.len());
            body[at..end].copy_from_slice(&v.to_be_bytes()[..end - at]);
        }
        3 => {
            // An unsigned varint of 2^32-1 or 2^31 (compact lengths and counts of flexible
            // versions), overwriting or inserted.
            let v: &[u8] = if rng.gen() {
                &[0xff, 0xff, 0xff, 0xff, 0x0f]
            } else {
                &[0x80, 0x80, 0x80, 0x80, 0x08]
            };
            if rng.gen() {
                let end = (at + v.len()).min(body.len());
                body[at..end].copy_from_slice(&v[..end - at]);
            } else {
                body.splice(at..at, v.iter().copied());
            }
        }
        4 => body.truncate(at),
        5 => {
            let n = rng.gen_range(1..64);
            body.splice(at..at, (0..n).map(|_| rng.gen::<u8>()));
        }
        6 => {
            let end = rng.gen_range(at..=body.len().min(at + 64));
            body.drain(at..end);
        }
        _ => body.extend((0..rng.gen_range(1..256)).map(|_| rng.gen::<u8>())),
    }
}

/// Fields of a record batch header: (offset, width) of base offset, batch length, leader epoch,
/// magic, CRC, attributes, last offset delta, timestamps, producer id, epoch, base sequence,
/// record count.
const BATCH_FIELDS: [(usize, usize); 13] = [
    (0, 8),
    (8, 4),
    (12, 4),
    (16, 1),
    (17, 4),
    (21, 2),
    (23, 4),
    (27, 8),
    (35, 8),
    (43, 8),
    (51, 2),
    (53, 4),
    (57, 4),
];

/// Mutates the broker's own parsing target, a record batch inside a Produce body: one header
/// field gets an extreme value, or a byte of the records is flipped; then, usually, the CRC is
/// recomputed so the mutation gets past the checksum to the checks behind it.
fn mutate_batch(rng: &mut StdRng, body: &mut [u8], (start, len): (usize, usize)) {
    let batch = &mut body[start..start + len];
    if rng.gen_range(0..4) == 0 {
        let i = rng.gen_range(61.min(batch.len() - 1)..batch.len());
        batch[i] ^= rng.gen_range(1..=255u8);
    } else {
        let (at, width) = BATCH_FIELDS[rng.gen_range(0..BATCH_FIELDS.len())];
        let v = INTERESTING_I32[rng.gen_range(0..INTERESTING_I32.len())] as i64;
        let v = if width == 8 && rng.gen() {
            [i64::MAX, i64::MIN, -1][rng.gen_range(0..3)]
        } else {
            v
        };
        let bytes = v.to_be_bytes();
        batch[at..at + width].copy_from_slice(&bytes[8 - width..]);
    }
    if rng.gen_range(0..4) != 0 {
        let crc = crc32c::crc32c(&batch[21..]);
        batch[17..21].copy_from_slice(&crc.to_be_bytes());
    }
}

/// The next fuzz input on the wire: mostly mutated valid frames, some valid, some pure junk
/// (with and without a size prefix), and some with a size prefix that lies.
fn fuzz_input(rng: &mut StdRng, templates: &[Template]) -> Vec<u8> {
    let kind = rng.gen_range(0..100);
    if kind < 5 {
        return frame(&templates[rng.gen_range(0..templates.len())].body);
    }
    if kind < 9 {
        return (0..rng.gen_range(1..64)).map(|_| rng.gen()).collect();
    }
    if kind < 17 {
        let junk: Vec<u8> = (0..rng.gen_range(0..2048)).map(|_| rng.gen()).collect();
        return frame(&junk);
    }
    let t = &templates[rng.gen_range(0..templates.len())];
    let mut body = t.body.clone();
    let mut mutations = rng.gen_range(1..=3);
    if !t.batches.is_empty() && rng.gen_range(0..100) < 40 {
        let batch = t.batches[rng.gen_range(0..t.batches.len())];
        mutate_batch(rng, &mut body, batch);
        mutations -= 1;
    }
    for _ in 0..mutations {
        mutate(rng, &mut body);
    }
    if rng.gen_range(0..100) < 85 {
        return frame(&body);
    }
    let size: i32 = match rng.gen_range(0..5) {
        0 => body.len() as i32 + rng.gen_range(1..100),
        1 => rng.gen_range(0..=body.len() as i32),
        2 => INTERESTING_I32[rng.gen_range(0..INTERESTING_I32.len())],
        3 => -rng.gen_range(1..1000),
        _ => rng.gen(),
    };
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    v
}

#[derive(Default)]
struct FuzzStats {
    frames_written: AtomicUsize,
    write_refused: AtomicUsize,
    connections: AtomicUsize,
    closed_by_broker: AtomicUsize,
    left_open: AtomicUsize,
    response_bytes: AtomicUsize,
}

/// Reads whatever the broker sent without blocking; true when it closed the connection.
fn drain_nonblocking(s: &mut TcpStream, stats: &FuzzStats) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16 * 1024];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => {
                stats.response_bytes.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Sends `frames` fuzz inputs over as many connections as it takes (1-16 inputs each, a new
/// connection when the broker closed one).
fn fuzz_worker(bootstrap: String, seed: u64, frames: usize, stats: Arc<FuzzStats>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let templates = templates(&mut rng);
    let mut left = frames;
    let mut connect_failures = 0;
    while left > 0 {
        let mut s = match TcpStream::connect(&bootstrap) {
            Ok(s) => s,
            Err(e) => {
                connect_failures += 1;
                assert!(
                    connect_failures < 100,
                    "the broker stopped accepting connections: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        s.set_nodelay(true).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = rng.gen_range(1..=16).min(left);
        let mut closed = false;
        for _ in 0..n {
            let input = fuzz_input(&mut rng, &templates);
            left -= 1;
            if s.write_all(&input).is_err() {
                stats.write_refused.fetch_add(1, Ordering::Relaxed);
                closed = true;
                break;
            }
            stats.frames_written.fetch_add(1, Ordering::Relaxed);
            if drain_nonblocking(&mut s, &stats) {
                closed = true;
                break;
            }
        }
        if !closed {
            // Half-close and give the broker a moment to answer or close; then go away
            // (a long poll or a frame still waiting for its body is abandoned mid-way).
            let _ = s.shutdown(Shutdown::Write);
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut buf = [0u8; 16 * 1024];
            closed = loop {
                match s.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(n) => {
                        stats.response_bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break false
                    }
                    Err(_) => break true,
                }
            };
        }
        if closed {
            stats.closed_by_broker.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.left_open.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Issue #9: a bounded fuzz run (20,000 x scale inputs, seed printed) of random bytes and
/// mutated valid ApiVersions/Metadata/Produce/Fetch frames over many connections, while a
/// healthy librdkafka producer keeps getting acks in every 5 s window. Afterwards the broker is
/// alive, never panicked, and a fresh client round-trips records.
#[test]
fn fuzzed_frames_never_panic() {
    const TEST: &str = "fuzzed_frames_never_panic";
    const WORKERS: u64 = 3;
    const WINDOW_S: usize = 5;
    let seed = seed(TEST);
    let inputs = 20_000 * scale() as usize;
    // Small segments: topics the fuzzer auto-creates under mangled names preallocate little.
    let props = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(props.path(), "log.segment.bytes=1048576\n").unwrap();
    let mut b = Broker::start_with(2, &["--config", props.path().to_str().unwrap()]);
    admin::create(&b, "fuzz", 2, 1, &[]).unwrap();
    admin::create(&b, "steady", 3, 1, &[]).unwrap();

    let mut cfg = b.client_config();
    cfg.set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "60000");
    let (p, acks) = workload::producer(&cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(Mutex::new(None));
    let healthy = {
        let (stop, refused) = (stop.clone(), refused.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if !send_workload(&p, "steady", i, &refused) {
                    break;
                }
                i += 1;
                p.poll(Duration::from_millis(1));
            }
            let flushed = p.flush(Duration::from_secs(30)).is_ok();
            (i, flushed)
        })
    };
    let acked_now = || acks.acked.lock().unwrap().len() as u64;
    assert!(
        eventually(Duration::from_secs(30), || acked_now() > 0),
        "the healthy producer got no ack before the fuzzing began:\n{}",
        log_tail(&b, 40)
    );

    let stats = Arc::new(FuzzStats::default());
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (bootstrap, stats) = (b.bootstrap(), stats.clone());
            let n =
                inputs / WORKERS as usize + usize::from((w as usize) < inputs % WORKERS as usize);
            let worker_seed = seed.wrapping_add(w);
            std::thread::spawn(move || fuzz_worker(bootstrap, worker_seed, n, stats))
        })
        .collect();
    let mut samples = vec![acked_now()];
    while !workers.iter().all(|w| w.is_finished()) {
        let due = started + Duration::from_secs(samples.len() as u64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        samples.push(acked_now());
    }
    let fuzz_s = started.elapsed().as_secs_f64();
    let mut problems = Vec::new();
    for (w, h) in workers.into_iter().enumerate() {
        if let Err(e) = h.join() {
            problems.push(format!("fuzz worker {w} failed: {e:?}"));
        }
    }
    // Acks in every whole window of the run (and in the run at all when shorter than one).
    let mut per_window = windows(&samples, WINDOW_S);
    if samples.len() - 1 >= WINDOW_S && (samples.len() - 1) % WINDOW_S != 0 {
        per_window.pop();
    }
    stop.store(true, Ordering::Relaxed);
    let (sent, flushed) = healthy.join().unwrap();
    let failed = acks.failed.load(Ordering::Relaxed);
    let mut summary = format!(
        "{inputs} inputs in {fuzz_s:.1} s: {} written, {} refused by a closed socket, {} connections \
         ({} closed by the broker, {} left open), {} response bytes\n\
         healthy producer: acks per {WINDOW_S} s window {per_window:?} (per second {:?}), \
         {sent} sent, {} acked, \
         {failed} failed (last error {:?}, refused {:?}), flushed {flushed}",
        stats.frames_written.load(Ordering::Relaxed),
        stats.write_refused.load(Ordering::Relaxed),
        stats.connections.load(Ordering::Relaxed),
        stats.closed_by_broker.load(Ordering::Relaxed),
        stats.left_open.load(Ordering::Relaxed),
        stats.response_bytes.load(Ordering::Relaxed),
        samples.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>(),
        acked_now(),
        acks.last_error.lock().unwrap(),
        refused.lock().unwrap()
    );
    if let Some(w) = per_window.iter().position(|&n| n == 0) {
        problems.push(format!(
            "the healthy producer got no ack in window {w} ({}-{} s of the fuzzing)",
            w * WINDOW_S,
            (w + 1) * WINDOW_S
        ));
    }
    if failed > 0 || !flushed || refused.lock().unwrap().is_some() {
        problems.push(format!(
            "the healthy producer lost deliveries: {failed} failed, flushed {flushed}"
        ));
    }
    if !b.is_running() {
        problems.push("the broker process exited".into());
    }
    let log = b.log();
    summary.push_str(&format!(
        "\nbroker log: {} \"closing connection\" warnings, {} errors",
        log.matches("closing connection").count(),
        log.matches("ERROR").count()
    ));
    if log.contains("panicked") {
        problems.push("the broker log says it panicked".into());
    }
    if problems.is_empty() {
        // A fresh client round-trips records, every field intact.
        let acked = workload::produce(
            &b.client_config(),
            "after-fuzz",
            0..2_000,
            &[("acks", "all")],
        );
        let got = workload::consume(
            &b.client_config(),
            "after-fuzz",
            1,
            2_000,
            Duration::from_secs(60),
        );
        workload::verify(&acked, &got);
        let c = workload::consumer(&b.client_config());
        let topics = c
            .fetch_metadata(None, Duration::from_secs(20))
            .map(|m| m.topics().len())
            .unwrap_or(0);
        summary.push_str(&format!(
            "\nafter the fuzzing: 2000 records round-tripped; {topics} topics exist"
        ));
    }
    eprintln!("{TEST}: {summary}");
    fail_if_any(&b, TEST, &problems, &summary);
    assert!(b.stop(), "clean exit on SIGTERM after the fuzzing");
}
