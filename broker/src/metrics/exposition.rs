//! The Prometheus endpoint: `GET /metrics` in the text exposition format (0.0.4), on its own
//! thread so a scrape never runs on (or blocks) a shard. Encoding is prometheus-client's; the
//! values come from `BrokerMetrics` (atomics and the samplers' snapshots).
//!
//! One connection is served at a time: a request must arrive whole within `REQUEST_TIMEOUT`
//! and fit in `REQUEST_BYTES_MAX`, so a stuck scraper holds the endpoint for at most that long.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{BrokerMetrics, HistogramSum, API_SLOTS, ERROR_SLOTS};

pub const REQUEST_BYTES_MAX: usize = 8192;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` and serves scrapes on a thread of its own until the process exits.
pub fn serve(addr: SocketAddr, metrics: Arc<BrokerMetrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(metrics)));
    std::thread::Builder::new()
        .name("weir-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Err(e) = answer(conn, &registry) {
                    tracing::debug!("metrics request: {e}");
                }
            }
        })?;
    Ok(local)
}

fn answer(mut conn: TcpStream, registry: &Registry) -> std::io::Result<()> {
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut buf = vec![0u8; REQUEST_BYTES_MAX];
    let mut n = 0;
    // Bounded: at most REQUEST_BYTES_MAX bytes, each read within the timeout.
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
        let k = conn.read(&mut buf[n..])?;
        if k == 0 {
            return Ok(());
        }
        n += k;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let mut body = String::new();
            if prometheus_client::encoding::prometheus_text::encode(&mut body, registry).is_err() {
                return respond(
                    &mut conn,
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n",
                );
            }
            respond(
                &mut conn,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
        }
        ("GET", _) => respond(&mut conn, "404 Not Found", "text/plain", "see /metrics\n"),
        _ => respond(&mut conn, "405 Method Not Allowed", "text/plain", ""),
    }
}

fn respond(conn: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

/// Kafka's name of an error code (UNKNOWN_TOPIC_OR_PARTITION), from kafka-protocol's table.
pub fn error_name(code: i16) -> String {
    use kafka_protocol::error::ParseResponseErrorCode;
    let Some(e) = code.err() else {
        return "NONE".into();
    };
    let camel = format!("{e:?}");
    if camel.starts_with("Unknown(") {
        return format!("UNKNOWN_{code}");
    }
    let mut out = String::with_capacity(camel.len() + 8);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn api_name(api: usize) -> String {
    match kafka_protocol::messages::ApiKey::try_from(api as i16) {
        Ok(k) => format!("{k:?}"),
        Err(_) => format!("api_{api}"),
    }
}

struct Scrape(Arc<BrokerMetrics>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, f64>(&v, None)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, HistogramSum)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        m.encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
    }
    Ok(())
}

fn l(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let node = m.node_id.to_string();
        gauge(
            &mut enc,
            "weir_broker_info",
            "This broker: its node id and Weir version.",
            [(
                l(&[("node_id", &node), ("version", env!("CARGO_PKG_VERSION"))]),
                1,
            )],
        )?;

        // Requests.
        let mut outcomes = Vec::new();
        let mut latency = Vec::new();
        for api in 0..API_SLOTS {
            for e in 0..ERROR_SLOTS {
                let n: u64 = m
                    .shards
                    .iter()
                    .map(|s| s.requests[api * ERROR_SLOTS + e].load(Relaxed))
                    .sum();
                if n > 0 {
                    let error = if e == ERROR_SLOTS - 1 {
                        "OTHER".to_string()
                    } else {
                        error_name(e as i16 - 1)
                    };
                    outcomes.push((vec![("api", api_name(api)), ("error", error)], n));
                }
            }
            if m.shards.iter().any(|s| s.latency[api].count() > 0) {
                let mut h = HistogramSum::default();
                for s in &m.shards {
                    s.latency[api].add_to(&mut h);
                }
                latency.push((vec![("api", api_name(api))], h));
            }
        }
        counter(&mut enc, "weir_requests", "Requests answered, by API and error code (the first error in the response; NONE when there is none).", outcomes)?;
        histogram(&mut enc, "weir_request_duration_seconds", "Request latency by API: from the frame read to the response ready (acks=all produce includes the fdatasync and replication wait).", latency)?;

        // Storage.
        let mut fsync = HistogramSum::default();
        let mut durable = HistogramSum::default();
        let mut commit = HistogramSum::default();
        for s in &m.shards {
            s.fsync.add_to(&mut fsync);
            s.durable_write.add_to(&mut durable);
            s.group_commit_bytes.add_to(&mut commit);
        }
        histogram(
            &mut enc,
            "weir_fdatasync_duration_seconds",
            "fdatasync latency of log segment files.",
            [(Labels::new(), fsync)],
        )?;
        histogram(
            &mut enc,
            "weir_durable_write_duration_seconds",
            "Latency of a partition's writes through O_DSYNC (its write and its sync in one operation each; what acks=all producers wait for instead of a separate fdatasync).",
            [(Labels::new(), durable)],
        )?;
        let mut stages: Vec<(Labels, HistogramSum)> = super::Stage::ALL
            .iter()
            .map(|st| (l(&[("stage", st.name())]), HistogramSum::default()))
            .collect();
        for s in &m.shards {
            for (i, (_, sum)) in stages.iter_mut().enumerate() {
                s.stages[i].add_to(sum);
            }
        }
        histogram(
            &mut enc,
            "weir_produce_stage_seconds",
            "Produce requests by stage: frame_read (body bytes arriving), append (parse, validate, route, append), disk_write (one partition's write round), stored_wait (append to written or fdatasynced), replication_wait (durable to high watermark), response_write.",
            stages,
        )?;
        histogram(
            &mut enc,
            "weir_group_commit_bytes",
            "Bytes made durable by one group-commit round (one fdatasync round of a shard).",
            [(Labels::new(), commit)],
        )?;
        let per_shard = |f: &dyn Fn(&super::ShardMetrics) -> u64| -> Vec<(Labels, u64)> {
            m.shards
                .iter()
                .enumerate()
                .map(|(i, s)| (vec![("shard", i.to_string())], f(s)))
                .collect()
        };
        counter(
            &mut enc,
            "weir_cache_hits",
            "Consumer fetch reads served from the batch cache.",
            per_shard(&|s| s.cache_hits.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "weir_cache_misses",
            "Consumer fetch reads served from disk.",
            per_shard(&|s| s.cache_misses.load(Relaxed)),
        )?;
        gauge(
            &mut enc,
            "weir_cache_bytes",
            "Bytes held by the shard's batch cache.",
            per_shard(&|s| s.cache_bytes.load(Relaxed))
                .into_iter()
                .map(|(k, v)| (k, v as i64)),
        )?;
        gauge(
            &mut enc,
            "weir_batch_arena_bytes",
            "Bytes of chunks mapped for the shard's stamped batches (cache, unwritten queue, and \
             responses still holding them).",
            per_shard(&|s| s.arena_bytes.load(Relaxed))
                .into_iter()
                .map(|(k, v)| (k, v as i64)),
        )?;
        gauge(
            &mut enc,
            "weir_pending_bytes",
            "Bytes appended and not yet written to disk (appends wait above a quarter of the shard's cache share, 8-64 MiB).",
            per_shard(&|s| s.pending_bytes.load(Relaxed))
                .into_iter()
                .map(|(k, v)| (k, v as i64)),
        )?;
        counter(
            &mut enc,
            "weir_backpressure_waits",
            "Appends that waited for the shard's unwritten bytes to drain.",
            per_shard(&|s| s.backpressure_waits.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "weir_produce_batches_in_place",
            "Produced batches cached and written from their request's buffer (one large batch filling the frame) instead of copied.",
            per_shard(&|s| s.batches_in_place.load(Relaxed)),
        )?;
        gauge(
            &mut enc,
            "weir_connections",
            "Open client connections.",
            per_shard(&|s| s.connections.load(Relaxed) as u64)
                .into_iter()
                .map(|(k, v)| (k, v as i64)),
        )?;

        // Partitions and topics.
        let parts: Vec<Arc<super::PartitionMetrics>> = m
            .shards
            .iter()
            .flat_map(|s| s.partitions.lock().map(|v| v.clone()).unwrap_or_default())
            .collect();
        let mut topics: BTreeMap<&str, [u64; 4]> = BTreeMap::new();
        for p in &parts {
            let t = topics.entry(&p.topic).or_default();
            t[0] += p.bytes_in.load(Relaxed);
            t[1] += p.records_in.load(Relaxed);
            t[2] += p.bytes_out.load(Relaxed);
            t[3] += p.records_out.load(Relaxed);
        }
        let by_topic = |i: usize| -> Vec<(Labels, u64)> {
            topics
                .iter()
                .map(|(t, v)| (l(&[("topic", t)]), v[i]))
                .collect()
        };
        counter(
            &mut enc,
            "weir_topic_bytes_in",
            "Record batch bytes appended by producers, per topic (this broker's leader replicas).",
            by_topic(0),
        )?;
        counter(
            &mut enc,
            "weir_topic_records_in",
            "Records appended by producers, per topic.",
            by_topic(1),
        )?;
        counter(
            &mut enc,
            "weir_topic_bytes_out",
            "Record batch bytes sent to consumers, per topic.",
            by_topic(2),
        )?;
        counter(
            &mut enc,
            "weir_topic_records_out",
            "Records sent to consumers, per topic.",
            by_topic(3),
        )?;
        let per_part = |f: &dyn Fn(&super::PartitionMetrics) -> i64| -> Vec<(Labels, i64)> {
            parts
                .iter()
                .map(|p| {
                    (
                        l(&[("topic", &p.topic), ("partition", &p.partition.to_string())]),
                        f(p),
                    )
                })
                .collect()
        };
        gauge(
            &mut enc,
            "weir_partition_log_end_offset",
            "Log end offset of each partition replica on this broker.",
            per_part(&|p| p.log_end_offset.load(Relaxed)),
        )?;
        gauge(
            &mut enc,
            "weir_partition_high_watermark",
            "High watermark of each partition replica.",
            per_part(&|p| p.high_watermark.load(Relaxed)),
        )?;
        gauge(
            &mut enc,
            "weir_partition_log_start_offset",
            "Log start offset of each partition replica.",
            per_part(&|p| p.log_start_offset.load(Relaxed)),
        )?;
        gauge(
            &mut enc,
            "weir_partition_size_bytes",
            "Bytes of each partition replica's segments.",
            per_part(&|p| p.size_bytes.load(Relaxed) as i64),
        )?;
        gauge(
            &mut enc,
            "weir_partition_leader",
            "1 when this broker leads the partition.",
            per_part(&|p| p.leader.load(Relaxed) as i64),
        )?;
        let urp = parts
            .iter()
            .filter(|p| p.leader.load(Relaxed) && p.under_replicated.load(Relaxed))
            .count();
        gauge(
            &mut enc,
            "weir_under_replicated_partitions",
            "Partitions this broker leads whose ISR is smaller than their replica set.",
            [(Labels::new(), urp as i64)],
        )?;
        let (shrinks, expands): (u64, u64) = m.shards.iter().fold((0, 0), |(a, b), s| {
            (
                a + s.isr_shrinks.load(Relaxed),
                b + s.isr_expands.load(Relaxed),
            )
        });
        counter(
            &mut enc,
            "weir_isr_shrinks",
            "ISR shrinks this broker's leader replicas made.",
            [(Labels::new(), shrinks)],
        )?;
        counter(
            &mut enc,
            "weir_isr_expands",
            "ISR expands this broker's leader replicas made.",
            [(Labels::new(), expands)],
        )?;

        // Cluster.
        let c = &m.cluster;
        gauge(
            &mut enc,
            "weir_offline_partitions",
            "Partitions without a leader in this broker's metadata image.",
            [(Labels::new(), c.offline_partitions.load(Relaxed))],
        )?;
        gauge(
            &mut enc,
            "weir_brokers",
            "Brokers registered in the metadata image.",
            [(Labels::new(), c.brokers.load(Relaxed))],
        )?;
        gauge(
            &mut enc,
            "weir_fenced_brokers",
            "Registered brokers that are fenced.",
            [(Labels::new(), c.fenced_brokers.load(Relaxed))],
        )?;
        gauge(
            &mut enc,
            "weir_metadata_version",
            "Version (offset) of the metadata image this broker applied.",
            [(Labels::new(), c.metadata_version.load(Relaxed))],
        )?;
        gauge(
            &mut enc,
            "weir_active_controller",
            "1 when this node is the active controller (a single node always is).",
            [(Labels::new(), c.active_controller.load(Relaxed) as i64)],
        )?;

        // Consumer groups.
        let groups: Vec<super::GroupSample> = m
            .shards
            .iter()
            .flat_map(|s| s.groups.lock().map(|v| v.clone()).unwrap_or_default())
            .collect();
        let mut states: BTreeMap<&str, i64> = [
            "Empty",
            "PreparingRebalance",
            "CompletingRebalance",
            "Stable",
            "Dead",
        ]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
        for g in &groups {
            *states.entry(g.state).or_default() += 1;
        }
        gauge(
            &mut enc,
            "weir_consumer_groups",
            "Consumer groups this broker coordinates, by state.",
            states.iter().map(|(s, n)| (l(&[("state", s)]), *n)),
        )?;
        gauge(
            &mut enc,
            "weir_consumer_group_members",
            "Members of each group this broker coordinates.",
            groups
                .iter()
                .map(|g| (l(&[("group", &g.group)]), g.members as i64)),
        )?;
        let hw: BTreeMap<(&str, i32), i64> = parts
            .iter()
            .filter(|p| p.leader.load(Relaxed))
            .map(|p| {
                (
                    (p.topic.as_str(), p.partition),
                    p.high_watermark.load(Relaxed),
                )
            })
            .collect();
        let mut committed = Vec::new();
        let mut lag = Vec::new();
        for g in &groups {
            for (t, p, off) in &g.offsets {
                let labels = l(&[
                    ("group", &g.group),
                    ("topic", t),
                    ("partition", &p.to_string()),
                ]);
                committed.push((labels.clone(), *off));
                if let Some(h) = hw.get(&(t.as_str(), *p)) {
                    lag.push((labels, (h - off).max(0)));
                }
            }
        }
        gauge(
            &mut enc,
            "weir_consumer_group_committed_offset",
            "Committed offset per group and partition.",
            committed,
        )?;
        gauge(&mut enc, "weir_consumer_group_lag", "High watermark minus committed offset, per group and partition (where this broker leads the partition).", lag)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_are_kafkas() {
        assert_eq!(error_name(0), "NONE");
        assert_eq!(error_name(3), "UNKNOWN_TOPIC_OR_PARTITION");
        assert_eq!(error_name(6), "NOT_LEADER_OR_FOLLOWER");
        assert_eq!(error_name(-1), "UNKNOWN_SERVER_ERROR");
        assert_eq!(api_name(0), "Produce");
        assert_eq!(api_name(1), "Fetch");
    }
}
