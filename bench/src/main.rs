//! `bench`: measures any Kafka-compatible broker the way users load it.
//!
//!   bench produce --acks all --linger 20ms                 # the canonical first run
//!   bench produce --rate 20000 --duration 30s              # open loop: latency from intended send time
//!   bench produce --sweep linger=0,5,20,100 --sweep batch-size=16k,128k,1m --sweep compression=none,lz4,zstd \
//!                 --json out.json --plot out.svg
//!   bench consume --topic bench                            # from earliest, then tailing
//!   bench e2e --rate 5000                                  # produce-to-consume latency

mod workload;

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use workload::{RunConfig, RunResult};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Throughput and latency of a Kafka-compatible broker"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Produce a workload and measure acknowledgement latency and throughput.
    Produce(ProduceArgs),
    /// Consume a topic from the earliest offset, then tail it.
    Consume(ConsumeArgs),
    /// Produce and consume at once; measure produce-to-consume latency.
    E2e(ProduceArgs),
}

#[derive(Args, Clone)]
pub struct ProduceArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub bootstrap_server: String,
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Partitions of the topic when it has to be created.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Replication factor of the topic when it has to be created (-1: the broker's default).
    #[arg(long, default_value_t = -1)]
    pub replication_factor: i16,
    #[arg(long, default_value_t = 1024)]
    pub record_size: usize,
    /// Replay payloads from a file: one per line, or length-prefixed (u32 BE) with --payload-format binary.
    #[arg(long)]
    pub payload_file: Option<String>,
    #[arg(long, default_value = "lines")]
    pub payload_format: String,
    /// none, random, or N distinct keys.
    #[arg(long, default_value = "none")]
    pub keys: String,
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Records per second in all (open loop). Omit to send as fast as possible.
    #[arg(long)]
    pub rate: Option<u64>,
    #[arg(long)]
    pub duration: Option<String>,
    #[arg(long)]
    pub records: Option<u64>,
    #[arg(long, default_value = "all")]
    pub acks: String,
    #[arg(long, default_value = "5ms")]
    pub linger: String,
    #[arg(long, default_value = "16k")]
    pub batch_size: String,
    #[arg(long, default_value = "none")]
    pub compression: String,
    /// weir (this project's client) or librdkafka.
    #[arg(long, default_value = "weir")]
    pub client: String,
    /// name=v1,v2,... over linger, batch-size, compression, acks, record-size, producers, rate (repeatable).
    #[arg(long)]
    pub sweep: Vec<String>,
    #[arg(long)]
    pub json: Option<String>,
    #[arg(long)]
    pub plot: Option<String>,
}

#[derive(Args)]
struct ConsumeArgs {
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap_server: String,
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Stop after this long with nothing new.
    #[arg(long, default_value = "5s")]
    idle: String,
    #[arg(long)]
    json: Option<String>,
}

pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n * 1000.0,
        "m" | "min" => n * 60_000.0,
        "us" => n / 1000.0,
        _ => bail!("bad duration unit in {s:?} (use ms, s or m)"),
    };
    Ok(Duration::from_micros((ms * 1000.0) as u64))
}

pub fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim().to_lowercase();
    let (num, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1024),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        _ => (s.as_str(), 1),
    };
    Ok(num
        .parse::<usize>()
        .with_context(|| format!("bad size {s:?}"))?
        * mult)
}

/// Every point of the sweep's cross product, as (label, arguments).
fn sweep_points(base: &ProduceArgs) -> Result<Vec<(String, ProduceArgs)>> {
    let mut points = vec![(String::new(), base.clone())];
    for s in &base.sweep {
        let (name, values) = s
            .split_once('=')
            .with_context(|| format!("--sweep {s:?}: expected name=v1,v2"))?;
        let mut next = Vec::new();
        for (label, args) in &points {
            for v in values.split(',') {
                let mut a = args.clone();
                match name {
                    "linger" => {
                        a.linger = if v.chars().all(|c| c.is_ascii_digit()) {
                            format!("{v}ms")
                        } else {
                            v.to_string()
                        }
                    }
                    "batch-size" => a.batch_size = v.to_string(),
                    "compression" => a.compression = v.to_string(),
                    "acks" => a.acks = v.to_string(),
                    "record-size" => a.record_size = parse_size(v)?,
                    "producers" => a.producers = v.parse()?,
                    "rate" => a.rate = Some(v.parse()?),
                    _ => bail!("cannot sweep {name:?}"),
                }
                let l = if label.is_empty() {
                    format!("{name}={v}")
                } else {
                    format!("{label} {name}={v}")
                };
                next.push((l, a));
            }
        }
        points = next;
    }
    Ok(points)
}

#[derive(Serialize)]
struct Report<'a> {
    mode: &'a str,
    results: &'a [RunResult],
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Produce(a) => produce(a, false),
        Cmd::E2e(a) => produce(a, true),
        Cmd::Consume(a) => consume(a),
    };
    if let Err(e) = r {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

fn produce(args: ProduceArgs, e2e: bool) -> Result<()> {
    let points = sweep_points(&args)?;
    let mut results = Vec::new();
    for (label, a) in &points {
        let cfg = RunConfig::from_args(a, label, e2e)?;
        if !label.is_empty() {
            eprintln!("== {label}");
        }
        let r = workload::run_produce(&cfg)?;
        results.push(r);
    }
    print_table(&results);
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&Report {
                mode: if e2e { "e2e" } else { "produce" },
                results: &results,
            })?,
        )?;
        eprintln!("wrote {path}");
    }
    if let Some(path) = &args.plot {
        workload::plot(&results, path)?;
        eprintln!("wrote {path}");
    }
    if results.iter().any(|r| r.errors > 0) {
        bail!(
            "{} sends failed (see the errors column)",
            results.iter().map(|r| r.errors).sum::<u64>()
        );
    }
    Ok(())
}

fn print_table(results: &[RunResult]) {
    println!(
        "{:<44} {:>11} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>7}",
        "point", "records/s", "MB/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    for r in results {
        println!(
            "{:<44} {:>11.0} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>9.2} {:>7}",
            if r.label.is_empty() { "-" } else { &r.label },
            r.records_per_sec,
            r.mb_per_sec,
            r.latency_ms.p50,
            r.latency_ms.p90,
            r.latency_ms.p99,
            r.latency_ms.p999,
            r.latency_ms.max,
            r.errors
        );
    }
}

fn consume(a: ConsumeArgs) -> Result<()> {
    let r = workload::run_consume(&a.bootstrap_server, &a.topic, parse_duration(&a.idle)?)?;
    println!(
        "{:<12} {:>12} {:>10} {:>10}",
        "phase", "records", "records/s", "MB/s"
    );
    for (phase, n, rps, mbps) in &r {
        println!("{phase:<12} {n:>12} {rps:>10.0} {mbps:>10.1}");
    }
    if let Some(path) = a.json {
        let rows: Vec<_> = r.iter().map(|(p, n, rps, mbps)| serde_json::json!({"phase": p, "records": n, "records_per_sec": rps, "mb_per_sec": mbps})).collect();
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_sizes_and_sweeps() {
        assert_eq!(parse_duration("20ms").unwrap(), Duration::from_millis(20));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_size("16k").unwrap(), 16384);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        let mut a = ProduceArgs::parse_from_for_test();
        a.sweep = vec!["linger=0,5".into(), "compression=none,lz4,zstd".into()];
        let pts = sweep_points(&a).unwrap();
        assert_eq!(pts.len(), 6);
        assert_eq!(pts[5].0, "linger=5 compression=zstd");
        assert_eq!(pts[5].1.linger, "5ms");
    }

    impl ProduceArgs {
        fn parse_from_for_test() -> ProduceArgs {
            #[derive(Parser)]
            struct W {
                #[command(flatten)]
                a: ProduceArgs,
            }
            W::parse_from(["x"]).a
        }
    }
}
