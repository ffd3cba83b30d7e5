//! Running one workload point: producer threads (Weir's client or librdkafka), open-loop
//! pacing, acknowledgement latency into an hdrhistogram, a progress line every second.
//!
//! Open loop: with `--rate`, record n of a producer is due at start + n / rate; its latency is
//! measured from that due time, not from when it was actually sent, so a stalled broker shows
//! up as latency instead of silently lowering the offered load (coordinated omission).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::Rng;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::ClientContext;
use serde::Serialize;
use weir_tools::admin::Admin;
use weir_tools::consumer::{Consumer, ConsumerConfig, OffsetReset};
use weir_tools::producer::{ProducerConfig, RawProducer, RawRecord};

use crate::{parse_duration, parse_size, ProduceArgs};

#[derive(Clone, Debug, Serialize)]
pub struct RunConfig {
    pub bootstrap_server: String,
    pub topic: String,
    pub partitions: i32,
    pub replication_factor: i16,
    pub record_size: usize,
    pub payload_file: Option<String>,
    pub keys: String,
    pub producers: usize,
    pub rate: Option<u64>,
    pub duration_s: Option<f64>,
    pub records: Option<u64>,
    pub acks: String,
    pub linger_ms: u64,
    pub batch_size: usize,
    pub compression: String,
    pub client: String,
    pub e2e: bool,
    #[serde(skip)]
    pub payloads: Vec<Bytes>,
}

impl RunConfig {
    pub fn from_args(a: &ProduceArgs, _label: &str, e2e: bool) -> Result<RunConfig> {
        let payloads = match &a.payload_file {
            Some(p) => load_payloads(p, &a.payload_format)?,
            None => {
                // Random uppercase letters, as Kafka's producer-perf-test: compressible like text.
                // A pool of at most 64 payloads and 64 MiB, cycled through.
                let size = a.record_size.max(8);
                let count = ((64usize << 20) / size).clamp(1, 64);
                let mut rng = rand::thread_rng();
                (0..count)
                    .map(|_| {
                        let mut v = vec![0u8; size];
                        rng.fill(&mut v[..]);
                        v.iter_mut().for_each(|b| *b = b'A' + *b % 26);
                        Bytes::from(v)
                    })
                    .collect()
            }
        };
        if payloads.is_empty() {
            bail!("no payloads");
        }
        let duration = match (&a.duration, a.records) {
            (Some(d), _) => Some(parse_duration(d)?.as_secs_f64()),
            (None, Some(_)) => None,
            (None, None) => Some(30.0),
        };
        if !matches!(a.client.as_str(), "weir" | "librdkafka") {
            bail!("--client must be weir or librdkafka");
        }
        Ok(RunConfig {
            bootstrap_server: a.bootstrap_server.clone(),
            topic: a.topic.clone(),
            partitions: a.partitions,
            replication_factor: a.replication_factor,
            record_size: payloads[0].len(),
            payload_file: a.payload_file.clone(),
            keys: a.keys.clone(),
            producers: a.producers.max(1),
            rate: a.rate,
            duration_s: duration,
            records: a.records,
            acks: a.acks.clone(),
            linger_ms: parse_duration(&a.linger)?.as_millis() as u64,
            batch_size: parse_size(&a.batch_size)?,
            compression: a.compression.clone(),
            client: a.client.clone(),
            e2e,
            payloads,
        })
    }
}

fn load_payloads(path: &str, format: &str) -> Result<Vec<Bytes>> {
    let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    match format {
        "lines" => Ok(data
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(Bytes::copy_from_slice)
            .collect()),
        "binary" => {
            let mut out = Vec::new();
            let mut at = 0;
            while at + 4 <= data.len() {
                let n = u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
                at += 4;
                if at + n > data.len() {
                    bail!("{path}: truncated payload at byte {at}");
                }
                out.push(Bytes::copy_from_slice(&data[at..at + n]));
                at += n;
            }
            Ok(out)
        }
        _ => bail!("--payload-format must be lines or binary"),
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub label: String,
    pub config: RunConfig,
    pub records: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub records_per_sec: f64,
    pub mb_per_sec: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Acknowledgement latency (produce) or produce-to-consume latency (e2e), milliseconds.
    pub latency_ms: Percentiles,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        mean: h.mean() / 1000.0,
    }
}

/// Counters shared by producer threads, delivery callbacks and the progress printer.
#[derive(Default)]
struct Stats {
    acked: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    latency: Mutex<Option<Histogram<u64>>>,
}

impl Stats {
    fn new() -> Arc<Stats> {
        let s = Stats::default();
        *s.latency.lock().unwrap() =
            Some(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds"));
        Arc::new(s)
    }
    fn ok(&self, bytes: usize, latency: Duration) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if let Some(h) = self.latency.lock().unwrap().as_mut() {
            let _ = h.record((latency.as_micros() as u64).max(1));
        }
    }
    fn err(&self, e: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_error.lock().unwrap();
        if f.is_none() {
            *f = Some(e);
        }
    }
    fn snapshot(&self) -> Histogram<u64> {
        self.latency.lock().unwrap().clone().expect("histogram")
    }
}

fn ensure_topic(cfg: &RunConfig) -> Result<()> {
    let mut admin = Admin::connect(&cfg.bootstrap_server)?;
    if admin
        .describe(Some(&[cfg.topic.clone()]))?
        .partitions(&cfg.topic)
        .is_ok()
    {
        return Ok(());
    }
    match admin.create_topic(&cfg.topic, cfg.partitions, cfg.replication_factor, &[]) {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().contains("TOPIC_ALREADY_EXISTS") => Ok(()),
        Err(e) => Err(e),
    }
}

fn key_for(keys: &str, n: u64, rng: &mut impl Rng) -> Option<Bytes> {
    match keys {
        "none" => None,
        "random" => Some(Bytes::from(rng.gen::<u64>().to_string())),
        k => {
            let distinct: u64 = k.parse().unwrap_or(1).max(1);
            Some(Bytes::from(format!("key-{}", n % distinct)))
        }
    }
}

fn epoch_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// For e2e: the payload carries its due time (µs since the epoch) in its first 8 bytes.
fn stamp(payload: &Bytes, due_epoch_us: u64) -> Bytes {
    let mut v = payload.to_vec();
    if v.len() < 8 {
        v.resize(8, b'A');
    }
    v[..8].copy_from_slice(&due_epoch_us.to_be_bytes());
    Bytes::from(v)
}

enum Client {
    Weir(RawProducer),
    Rdkafka(ThreadedProducer<RdCtx>),
}

struct RdCtx(Arc<Stats>);
impl ClientContext for RdCtx {}
impl ProducerContext for RdCtx {
    type DeliveryOpaque = Box<(Instant, usize)>;
    fn delivery(&self, r: &DeliveryResult<'_>, o: Self::DeliveryOpaque) {
        match r {
            Ok(_) => self.0.ok(o.1, o.0.elapsed()),
            Err((e, _)) => self.0.err(e.to_string()),
        }
    }
}

fn make_client(cfg: &RunConfig, stats: &Arc<Stats>) -> Result<Client> {
    Ok(match cfg.client.as_str() {
        "librdkafka" => {
            let mut c = ClientConfig::new();
            c.set("bootstrap.servers", &cfg.bootstrap_server)
                .set("acks", &cfg.acks)
                .set("linger.ms", cfg.linger_ms.to_string())
                .set("batch.size", cfg.batch_size.to_string())
                .set("compression.type", &cfg.compression)
                .set("queue.buffering.max.kbytes", "65536");
            Client::Rdkafka(c.create_with_context(RdCtx(stats.clone()))?)
        }
        _ => {
            let mut p = ProducerConfig::new(&cfg.bootstrap_server);
            p.set("acks", &cfg.acks)?
                .set("linger.ms", &cfg.linger_ms.to_string())?
                .set("batch.size", &cfg.batch_size.to_string())?
                .set("compression.type", &cfg.compression)?
                .set("buffer.memory", &(64usize << 20).to_string())?;
            Client::Weir(RawProducer::new(p, Vec::new())?)
        }
    })
}

pub fn run_produce(cfg: &RunConfig) -> Result<RunResult> {
    ensure_topic(cfg)?;
    let stats = Stats::new();
    let e2e_stats = Stats::new();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = cfg.duration_s.map(|s| start + Duration::from_secs_f64(s));
    let per_producer_records = cfg.records.map(|r| r.div_ceil(cfg.producers as u64));
    let per_producer_rate = cfg
        .rate
        .map(|r| (r as f64 / cfg.producers as f64).max(0.001));

    // e2e: a consumer positioned at the end before anything is sent.
    let consumer = if cfg.e2e {
        let mut cc = ConsumerConfig::new(&cfg.bootstrap_server);
        cc.auto_offset_reset = OffsetReset::Latest;
        cc.fetch_max_wait_ms = 100;
        let mut c = Consumer::new(cc)?;
        let n = Admin::connect(&cfg.bootstrap_server)?
            .describe(Some(&[cfg.topic.clone()]))?
            .partitions(&cfg.topic)?;
        c.assign((0..n as i32).map(|p| (cfg.topic.clone(), p)).collect())?;
        let (st, s2) = (stop.clone(), e2e_stats.clone());
        Some(std::thread::spawn(move || {
            // Runs until the producers are done and two quiet seconds passed.
            let mut quiet_since: Option<Instant> = None;
            loop {
                match c.poll(Duration::from_millis(100)) {
                    Ok(recs) if !recs.is_empty() => {
                        quiet_since = None;
                        let now = epoch_micros();
                        for r in recs {
                            if let Some(v) = r.value.filter(|v| v.len() >= 8) {
                                let due = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
                                s2.ok(v.len(), Duration::from_micros(now.saturating_sub(due)));
                            }
                        }
                    }
                    Ok(_) => {
                        if st.load(Ordering::Relaxed) {
                            let q = *quiet_since.get_or_insert_with(Instant::now);
                            if q.elapsed() > Duration::from_secs(2) {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        s2.err(format!("{e:#}"));
                        return;
                    }
                }
            }
        }))
    } else {
        None
    };

    let progress = {
        let (st, stop2, e2e, es) = (stats.clone(), stop.clone(), cfg.e2e, e2e_stats.clone());
        std::thread::spawn(move || {
            let mut last = (Instant::now(), 0u64, 0u64);
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let (acked, bytes) = (
                    st.acked.load(Ordering::Relaxed),
                    st.bytes.load(Ordering::Relaxed),
                );
                let dt = last.0.elapsed().as_secs_f64();
                let h = if e2e { es.snapshot() } else { st.snapshot() };
                eprintln!(
                    "{:>7.0} records/s {:>8.1} MB/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
                    (acked - last.1) as f64 / dt,
                    (bytes - last.2) as f64 / dt / 1e6,
                    h.value_at_quantile(0.5) as f64 / 1000.0,
                    h.value_at_quantile(0.99) as f64 / 1000.0,
                    st.errors.load(Ordering::Relaxed)
                );
                last = (Instant::now(), acked, bytes);
            }
        })
    };

    let mut threads = Vec::new();
    for t in 0..cfg.producers {
        let (cfg, stats, sent) = (cfg.clone(), stats.clone(), sent.clone());
        let client = make_client(&cfg, &stats)?;
        threads.push(std::thread::spawn(move || -> Result<()> {
            let mut rng = rand::thread_rng();
            let mut n: u64 = 0;
            let t0 = Instant::now();
            let epoch0 = epoch_micros();
            loop {
                if per_producer_records.is_some_and(|r| n >= r)
                    || deadline.is_some_and(|d| Instant::now() >= d)
                {
                    break;
                }
                let due = match per_producer_rate {
                    Some(rate) => {
                        let due = t0 + Duration::from_secs_f64(n as f64 / rate);
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        due
                    }
                    None => Instant::now(),
                };
                let payload = &cfg.payloads[((n as usize) + t * 7) % cfg.payloads.len()];
                let payload = if cfg.e2e {
                    stamp(payload, epoch0 + due.duration_since(t0).as_micros() as u64)
                } else {
                    payload.clone()
                };
                let key = key_for(&cfg.keys, n, &mut rng);
                let size = payload.len() + key.as_ref().map_or(0, |k| k.len());
                match &client {
                    Client::Weir(p) => {
                        let st = stats.clone();
                        let rec = RawRecord {
                            topic: cfg.topic.clone(),
                            partition: None,
                            key,
                            value: Some(payload),
                            headers: Vec::new(),
                            timestamp: weir_tools::now_ms(),
                        };
                        if let Err(e) = p.send_with_callback(rec, move |d| match d {
                            Ok(_) => st.ok(size, due.elapsed()),
                            Err(e) => st.err(e.to_string()),
                        }) {
                            stats.err(e.to_string());
                        }
                    }
                    Client::Rdkafka(p) => {
                        let mut rec = BaseRecord::with_opaque_to(&cfg.topic, Box::new((due, size)))
                            .payload(payload.as_ref());
                        let kb;
                        if let Some(k) = &key {
                            kb = k.clone();
                            rec = rec.key(kb.as_ref());
                        }
                        let mut rec = rec;
                        // Bounded: librdkafka's queue drains as deliveries complete.
                        loop {
                            match p.send(rec) {
                                Ok(()) => break,
                                Err((
                                    rdkafka::error::KafkaError::MessageProduction(
                                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                                    ),
                                    r,
                                )) => {
                                    rec = r;
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                                Err((e, _)) => {
                                    stats.err(e.to_string());
                                    break;
                                }
                            }
                        }
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
            match client {
                Client::Weir(p) => p.close(),
                Client::Rdkafka(p) => {
                    let _ = p.flush(Duration::from_secs(60));
                }
            }
            Ok(())
        }));
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a producer thread panicked"))??;
    }
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(c) = consumer {
        let _ = c.join();
    }
    let _ = progress.join();
    let records = stats.acked.load(Ordering::Relaxed);
    let bytes = stats.bytes.load(Ordering::Relaxed);
    let hist = if cfg.e2e {
        e2e_stats.snapshot()
    } else {
        stats.snapshot()
    };
    let errors = stats.errors.load(Ordering::Relaxed) + e2e_stats.errors.load(Ordering::Relaxed);
    let first_error = stats
        .first_error
        .lock()
        .unwrap()
        .clone()
        .or_else(|| e2e_stats.first_error.lock().unwrap().clone());
    Ok(RunResult {
        label: String::new(),
        config: cfg.clone(),
        records,
        bytes,
        seconds,
        records_per_sec: records as f64 / seconds,
        mb_per_sec: bytes as f64 / seconds / 1e6,
        errors,
        first_error,
        latency_ms: percentiles(&hist),
    })
    .map(|mut r| {
        r.label = label_of(cfg);
        r
    })
}

fn label_of(cfg: &RunConfig) -> String {
    format!(
        "linger={}ms batch={} {} acks={}",
        cfg.linger_ms, cfg.batch_size, cfg.compression, cfg.acks
    )
}

/// Throughput (x) against p99 latency (y), one point per run.
pub fn plot(results: &[RunResult], path: &str) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = results.iter().map(|r| r.mb_per_sec).fold(1.0, f64::max) * 1.15;
    let ymax = results.iter().map(|r| r.latency_ms.p99).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("Weir bench: throughput vs p99 latency", ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("MB/s")
        .y_desc("p99 latency (ms)")
        .draw()?;
    chart.draw_series(
        results
            .iter()
            .map(|r| Circle::new((r.mb_per_sec, r.latency_ms.p99), 5, BLUE.filled())),
    )?;
    chart.draw_series(results.iter().map(|r| {
        Text::new(
            r.label.clone(),
            (r.mb_per_sec, r.latency_ms.p99),
            ("sans-serif", 10).into_font(),
        )
    }))?;
    root.present()?;
    Ok(())
}

/// Reads the topic from its earliest offset to the end seen at start, then tails it until
/// `idle` passes without records. Returns (phase, records, records/s, MB/s).
pub fn run_consume(
    bootstrap: &str,
    topic: &str,
    idle: Duration,
) -> Result<Vec<(String, u64, f64, f64)>> {
    let mut admin = Admin::connect(bootstrap)?;
    let n = admin
        .describe(Some(&[topic.to_string()]))?
        .partitions(topic)?;
    let tps: Vec<(String, i32)> = (0..n as i32).map(|p| (topic.to_string(), p)).collect();
    let ends: std::collections::HashMap<(String, i32), i64> =
        admin.offsets(&tps, -1)?.into_iter().collect();
    let mut cc = ConsumerConfig::new(bootstrap);
    cc.auto_offset_reset = OffsetReset::Earliest;
    cc.max_partition_fetch_bytes = 4 << 20;
    let mut c = Consumer::new(cc)?;
    c.assign(tps.clone())?;
    let mut out = Vec::new();
    let (mut records, mut bytes) = (0u64, 0u64);
    let t0 = Instant::now();
    let caught_up = |c: &Consumer| tps.iter().all(|tp| c.position(tp).unwrap_or(0) >= ends[tp]);
    while !caught_up(&c) {
        for r in c.poll(Duration::from_millis(500))? {
            records += 1;
            bytes += r.value.map_or(0, |v| v.len()) as u64;
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            bail!("catching up took over an hour");
        }
    }
    let s = t0.elapsed().as_secs_f64().max(1e-9);
    out.push((
        "earliest".to_string(),
        records,
        records as f64 / s,
        bytes as f64 / s / 1e6,
    ));
    let (mut records, mut bytes) = (0u64, 0u64);
    let t1 = Instant::now();
    let mut last = Instant::now();
    while last.elapsed() < idle {
        let recs = c.poll(Duration::from_millis(200))?;
        if !recs.is_empty() {
            last = Instant::now();
        }
        for r in recs {
            records += 1;
            bytes += r.value.map_or(0, |v| v.len()) as u64;
        }
    }
    let s = (last - t1).as_secs_f64().max(1e-9);
    out.push((
        "tailing".to_string(),
        records,
        records as f64 / s,
        bytes as f64 / s / 1e6,
    ));
    Ok(out)
}
