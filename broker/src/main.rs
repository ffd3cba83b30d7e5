//! The `broker` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use weir_broker::config::{parse_listener, Config};

#[derive(Parser, Debug)]
#[command(
    name = "broker",
    version,
    about = "Weir: a Kafka-compatible event-streaming broker"
)]
struct Args {
    /// Address to accept Kafka clients on.
    #[arg(long, default_value = "127.0.0.1:9092")]
    listen: SocketAddr,
    /// host:port announced to clients in Metadata (default: the listen address).
    #[arg(long)]
    advertised_listener: Option<String>,
    /// Directory for logs and metadata.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Number of shards (one pinned thread each); default: one per core.
    #[arg(long)]
    shards: Option<usize>,
    /// This broker's node id.
    #[arg(long)]
    node_id: Option<i32>,
    /// Bytes of recent record batches each shard caches in memory.
    #[arg(long)]
    cache_bytes: Option<usize>,
    /// A Kafka server.properties file; flags given on the command line win.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run() {
        tracing::error!("{e:#}");
        eprintln!("broker: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    let shards = args.shards.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    anyhow::ensure!(
        (1..=256).contains(&shards),
        "--shards must be between 1 and 256"
    );
    let mut config = Config::new(args.listen, args.data_dir.clone(), shards);
    if let Some(path) = &args.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        config
            .apply_properties(&text)
            .with_context(|| format!("in {}", path.display()))?;
    }
    // Command-line flags override the file.
    if args.listen.to_string() != "127.0.0.1:9092" || args.config.is_none() {
        config.listen = args.listen;
        config.advertised_host = args.listen.ip().to_string();
        config.advertised_port = args.listen.port() as i32;
    }
    if let Some(a) = &args.advertised_listener {
        let (host, port) = parse_listener(a)?;
        config.advertised_host = host;
        config.advertised_port = port;
    }
    if args.data_dir != PathBuf::from("./data") || args.config.is_none() {
        config.data_dir = args.data_dir;
    }
    if let Some(n) = args.node_id {
        config.node_id = n;
    }
    if let Some(c) = args.cache_bytes {
        config.cache_bytes = c;
    }
    if config.advertised_host == "0.0.0.0" || config.advertised_host == "::" {
        config.advertised_host = "127.0.0.1".into();
    }
    tracing::info!(
        listen = %config.listen,
        data_dir = %config.data_dir.display(),
        shards = config.shards,
        cache_bytes = config.cache_bytes,
        "starting Weir"
    );
    weir_broker::server::run(config)
}
