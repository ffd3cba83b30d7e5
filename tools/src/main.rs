//! `weir`: Kafka's command-line tools under one name, with the scripts' flags.
//!
//!   weir topics --bootstrap-server H:P --create --topic T --partitions 3 --replication-factor 1
//!   weir console-producer --bootstrap-server H:P --topic T [--property parse.key=true]
//!   weir console-consumer --bootstrap-server H:P --topic T [--from-beginning] [--group G]
//!   weir consumer-groups --bootstrap-server H:P --list | --describe --group G | --reset-offsets ...
//!   weir configs --bootstrap-server H:P --entity-type topics --entity-name T --describe [--all]
//!   weir configs --bootstrap-server H:P --entity-type topics --entity-name T --alter \
//!       [--add-config k=v,k2=[a,b]] [--delete-config k,k2]
//!   weir console --bootstrap-server H:P [--listen 127.0.0.1:8080] [--metrics-url URL]

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use weir_tools::admin::Admin;
use weir_tools::consumer::{Consumer, ConsumerConfig, OffsetReset};
use weir_tools::producer::{ProducerConfig, RawProducer, RawRecord};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Kafka's command-line tools for Weir (and any Kafka broker)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create, delete, alter, list and describe topics (kafka-topics.sh).
    Topics(TopicsArgs),
    /// Send stdin lines as records (kafka-console-producer.sh).
    ConsoleProducer(ProducerArgs),
    /// Print records to stdout (kafka-console-consumer.sh).
    ConsoleConsumer(ConsumerArgs),
    /// List, describe and reset consumer groups (kafka-consumer-groups.sh).
    ConsumerGroups(GroupsArgs),
    /// Describe and alter topic configs (kafka-configs.sh).
    Configs(ConfigsArgs),
    /// Start, stop and show a cluster of brokers on this machine.
    Cluster(ClusterArgs),
    /// Move partition replicas between brokers (kafka-reassign-partitions.sh).
    ReassignPartitions(ReassignArgs),
    /// Each broker's log directory and the replicas in it (kafka-log-dirs.sh).
    LogDirs(LogDirsArgs),
    /// Move leadership back to preferred replicas (kafka-leader-election.sh).
    LeaderElection(LeaderElectionArgs),
    /// Serve a web console: cluster, topics, messages, produce, consumer groups, configs.
    Console(ConsoleArgs),
}

#[derive(Args)]
struct ConsoleArgs {
    #[arg(long)]
    bootstrap_server: String,
    /// Address the console's HTTP server binds (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// The broker's Prometheus endpoint, e.g. http://127.0.0.1:9644/metrics: per-topic
    /// throughput sparklines from `weir_topic_records_in_total`.
    #[arg(long)]
    metrics_url: Option<String>,
}

#[derive(Args)]
struct LogDirsArgs {
    #[arg(long)]
    bootstrap_server: String,
    #[arg(long)]
    describe: bool,
    /// Broker ids separated by commas (default: all).
    #[arg(long)]
    broker_list: Option<String>,
    /// Topics separated by commas (default: all).
    #[arg(long)]
    topic_list: Option<String>,
}

#[derive(Args)]
struct LeaderElectionArgs {
    #[arg(long)]
    bootstrap_server: String,
    /// Only `preferred` (Weir never runs unclean elections).
    #[arg(long)]
    election_type: String,
    #[arg(long)]
    all_topic_partitions: bool,
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    partition: Option<i32>,
}

#[derive(Args)]
struct ReassignArgs {
    #[arg(long)]
    bootstrap_server: String,
    /// With --generate: `{"version":1,"topics":[{"topic":"t"}]}`.
    #[arg(long)]
    topics_to_move_json_file: Option<std::path::PathBuf>,
    /// With --generate: the brokers to spread replicas over, e.g. "0,1,2,3".
    #[arg(long)]
    broker_list: Option<String>,
    /// With --execute, --verify, --cancel: a plan as --generate prints it.
    #[arg(long)]
    reassignment_json_file: Option<std::path::PathBuf>,
    #[arg(long)]
    generate: bool,
    #[arg(long)]
    execute: bool,
    #[arg(long)]
    verify: bool,
    #[arg(long)]
    cancel: bool,
    /// With --execute: limit the moving replicas' catch-up traffic to this many bytes/s
    /// (cleared by --verify once every partition is complete).
    #[arg(long)]
    throttle: Option<u64>,
    /// With --verify: keep the throttles after completion.
    #[arg(long)]
    preserve_throttles: bool,
}

#[derive(Args)]
struct ClusterArgs {
    #[command(subcommand)]
    action: ClusterAction,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Writes each node's server.properties and starts every node (combined broker and
    /// controller); waits until all serve clients.
    Start {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value = "./cluster")]
        dir: std::path::PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Kafka port of node 0 (node i: port + i).
        #[arg(long, default_value_t = 9091)]
        port: u16,
        /// Controller port of node 0 (node i: controller-port + i).
        #[arg(long, default_value_t = 19091)]
        controller_port: u16,
        /// The broker binary [default: next to `weir`, else on PATH].
        #[arg(long)]
        broker: Option<std::path::PathBuf>,
        /// Shards (cores) per broker [default: the broker's, one per core].
        #[arg(long)]
        shards: Option<usize>,
        /// Extra server.properties key=value for every node (repeatable).
        #[arg(long = "override")]
        overrides: Vec<String>,
    },
    /// SIGTERM every node (a controlled shutdown); SIGKILL after 30 s.
    Stop {
        #[arg(long, default_value = "./cluster")]
        dir: std::path::PathBuf,
    },
    /// Each node's process and ports, and the brokers and controller the cluster reports.
    Status {
        #[arg(long, default_value = "./cluster")]
        dir: std::path::PathBuf,
    },
    /// Adds a broker-only node with the next node id and (unless --no-rebalance) spreads every
    /// topic's replicas over all brokers, waiting until the moves complete.
    Commission {
        #[arg(long, default_value = "./cluster")]
        dir: std::path::PathBuf,
        #[arg(long)]
        broker: Option<std::path::PathBuf>,
        #[arg(long)]
        shards: Option<usize>,
        #[arg(long = "override")]
        overrides: Vec<String>,
        /// Only start the broker; move nothing onto it.
        #[arg(long)]
        no_rebalance: bool,
        /// Longest wait for the moves, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    /// Moves every replica off a broker-only node, waits, stops it and unregisters it.
    Decommission {
        #[arg(long, default_value = "./cluster")]
        dir: std::path::PathBuf,
        #[arg(long)]
        node_id: usize,
        /// Longest wait for the moves, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
}

fn cluster(a: ClusterArgs) -> Result<()> {
    use weir_tools::cluster;
    match a.action {
        ClusterAction::Start {
            nodes,
            dir,
            host,
            port,
            controller_port,
            broker,
            shards,
            overrides,
        } => {
            for o in &overrides {
                anyhow::ensure!(o.contains('='), "--override {o:?} is not key=value");
            }
            let layout = cluster::Layout {
                nodes,
                dir,
                host,
                port,
                controller_port,
            };
            let broker = broker.unwrap_or_else(cluster::default_broker);
            cluster::start(&layout, &broker, shards, &overrides)
        }
        ClusterAction::Stop { dir } => cluster::stop(&dir),
        ClusterAction::Status { dir } => cluster::status(&dir),
        ClusterAction::Commission {
            dir,
            broker,
            shards,
            overrides,
            no_rebalance,
            timeout_s,
        } => {
            for o in &overrides {
                anyhow::ensure!(o.contains('='), "--override {o:?} is not key=value");
            }
            let broker = broker.unwrap_or_else(cluster::default_broker);
            cluster::commission(
                &dir,
                &broker,
                shards,
                &overrides,
                !no_rebalance,
                std::time::Duration::from_secs(timeout_s),
            )
            .map(|_| ())
        }
        ClusterAction::Decommission {
            dir,
            node_id,
            timeout_s,
        } => cluster::decommission(&dir, node_id, std::time::Duration::from_secs(timeout_s)),
    }
}

#[derive(Args)]
struct ConfigsArgs {
    #[arg(long)]
    bootstrap_server: String,
    /// `topics` or `brokers` (dynamic broker configs: the replication throttle rates).
    #[arg(long)]
    entity_type: String,
    #[arg(long)]
    entity_name: Option<String>,
    /// With --entity-type brokers: the cluster-wide default instead of one broker.
    #[arg(long)]
    entity_default: bool,
    #[arg(long)]
    describe: bool,
    /// With --describe: every config, not only the overrides.
    #[arg(long)]
    all: bool,
    #[arg(long)]
    alter: bool,
    /// k=v pairs separated by commas; a list value goes in brackets: cleanup.policy=[a,b].
    #[arg(long)]
    add_config: Option<String>,
    /// Keys separated by commas.
    #[arg(long)]
    delete_config: Option<String>,
}

#[derive(Args)]
struct TopicsArgs {
    #[arg(long)]
    bootstrap_server: String,
    #[arg(long)]
    create: bool,
    #[arg(long)]
    delete: bool,
    #[arg(long)]
    alter: bool,
    #[arg(long)]
    list: bool,
    #[arg(long)]
    describe: bool,
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    partitions: Option<i32>,
    #[arg(long)]
    replication_factor: Option<i16>,
    /// Topic config key=value (repeatable).
    #[arg(long)]
    config: Vec<String>,
}

#[derive(Args)]
struct ProducerArgs {
    #[arg(long)]
    bootstrap_server: String,
    #[arg(long)]
    topic: String,
    /// parse.key=true, key.separator=: (repeatable).
    #[arg(long)]
    property: Vec<String>,
    #[arg(long, default_value = "all")]
    acks: String,
    #[arg(long, default_value = "none")]
    compression_type: String,
    #[arg(long, default_value_t = 1000)]
    linger_ms: u64,
    /// Any producer setting key=value (repeatable).
    #[arg(long)]
    producer_property: Vec<String>,
}

#[derive(Args)]
struct ConsumerArgs {
    #[arg(long)]
    bootstrap_server: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    from_beginning: bool,
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    max_messages: Option<usize>,
    /// Exit after this long without a record.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// print.key=true, key.separator=\t, print.partition=true, print.offset=true (repeatable).
    #[arg(long)]
    property: Vec<String>,
}

#[derive(Args)]
struct GroupsArgs {
    #[arg(long)]
    bootstrap_server: String,
    #[arg(long)]
    list: bool,
    #[arg(long)]
    describe: bool,
    #[arg(long)]
    reset_offsets: bool,
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    to_earliest: bool,
    #[arg(long)]
    to_latest: bool,
    #[arg(long)]
    to_offset: Option<i64>,
    #[arg(long)]
    execute: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            // One line, as the Kafka scripts do; --help shows the rest.
            let text = e.to_string();
            eprintln!(
                "{}",
                text.lines()
                    .next()
                    .unwrap_or("invalid arguments")
                    .trim_start_matches("error: ")
                    .trim()
            );
            std::process::exit(2);
        }
    };
    let r = match cli.cmd {
        Cmd::Topics(a) => topics(a),
        Cmd::ConsoleProducer(a) => console_producer(a),
        Cmd::ConsoleConsumer(a) => console_consumer(a),
        Cmd::ConsumerGroups(a) => groups(a),
        Cmd::Configs(a) => configs(a),
        Cmd::ReassignPartitions(a) => reassign_partitions(a),
        Cmd::LogDirs(a) => log_dirs(a),
        Cmd::LeaderElection(a) => leader_election(a),
        Cmd::Cluster(a) => cluster(a),
        Cmd::Console(a) => weir_tools::console::serve(weir_tools::console::ConsoleConfig {
            bootstrap: a.bootstrap_server,
            listen: a.listen,
            metrics_url: a.metrics_url,
        }),
    };
    if let Err(e) = r {
        eprintln!("Error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

/// kafka-configs.sh's --add-config syntax: `k=v,k2=[a,b]` (brackets keep a list's commas).
fn parse_add_config(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    let mut parts = Vec::new();
    for (i, ch) in text.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    for p in parts.into_iter().filter(|p| !p.trim().is_empty()) {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("{p:?} in --add-config is not key=value"))?;
        let v = v.trim();
        let v = v
            .strip_prefix('[')
            .and_then(|x| x.strip_suffix(']'))
            .unwrap_or(v);
        out.push((k.trim().to_string(), v.to_string()));
    }
    Ok(out)
}

fn log_dirs(a: LogDirsArgs) -> Result<()> {
    anyhow::ensure!(a.describe, "--describe is the only action");
    let mut conn = weir_tools::connect_any(
        &a.bootstrap_server,
        "weir-log-dirs",
        std::time::Duration::from_secs(30),
    )?;
    let brokers: Option<Vec<i32>> = a
        .broker_list
        .as_deref()
        .map(|l| {
            l.split(',')
                .map(|b| b.trim().parse().context("--broker-list takes broker ids"))
                .collect::<Result<_>>()
        })
        .transpose()?;
    let topics: Option<Vec<String>> = a
        .topic_list
        .as_deref()
        .map(|l| l.split(',').map(|t| t.trim().to_string()).collect());
    let (ids, json) =
        weir_tools::log_dirs::describe(&mut conn, brokers.as_deref(), topics.as_deref())?;
    println!("Querying brokers for log directories information");
    println!(
        "Received log directory information from brokers {}",
        ids.iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("{json}");
    Ok(())
}

fn leader_election(a: LeaderElectionArgs) -> Result<()> {
    anyhow::ensure!(
        a.election_type.eq_ignore_ascii_case("preferred"),
        "--election-type {} is not supported: Weir elects preferred leaders only (no unclean elections)",
        a.election_type
    );
    let partitions = match (a.all_topic_partitions, &a.topic, a.partition) {
        (true, None, None) => None,
        (false, Some(t), Some(p)) => Some(vec![(t.clone(), p)]),
        _ => anyhow::bail!("give --all-topic-partitions, or --topic and --partition"),
    };
    let mut conn = weir_tools::connect_any(
        &a.bootstrap_server,
        "weir-leader-election",
        std::time::Duration::from_secs(30),
    )?;
    for line in weir_tools::log_dirs::elect_preferred(&mut conn, partitions.as_deref())? {
        println!("{line}");
    }
    Ok(())
}

fn reassign_partitions(a: ReassignArgs) -> Result<()> {
    use weir_tools::reassign;
    let verbs = [a.generate, a.execute, a.verify, a.cancel]
        .iter()
        .filter(|v| **v)
        .count();
    anyhow::ensure!(
        verbs == 1,
        "give exactly one of --generate, --execute, --verify, --cancel"
    );
    anyhow::ensure!(
        a.throttle.is_none() || a.execute,
        "--throttle is only for --execute"
    );
    let mut conn = weir_tools::connect_any(
        &a.bootstrap_server,
        "weir-reassign-partitions",
        std::time::Duration::from_secs(30),
    )?;
    let read = |p: &Option<std::path::PathBuf>, flag: &str| -> Result<String> {
        let p = p
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{flag} is required"))?;
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    if a.generate {
        let topics: reassign::TopicsToMove = serde_json::from_str(&read(
            &a.topics_to_move_json_file,
            "--topics-to-move-json-file",
        )?)
        .context("parsing the topics-to-move file")?;
        let brokers: Vec<i32> = a
            .broker_list
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--broker-list is required"))?
            .split(',')
            .map(|b| b.trim().parse().context("--broker-list takes broker ids"))
            .collect::<Result<_>>()?;
        let (current, proposed) = reassign::generate(&mut conn, &topics, &brokers)?;
        println!("Current partition replica assignment");
        println!("{}", current.json());
        println!();
        println!("Proposed partition reassignment configuration");
        println!("{}", proposed.json());
        return Ok(());
    }
    let mut plan: reassign::Plan = serde_json::from_str(&read(
        &a.reassignment_json_file,
        "--reassignment-json-file",
    )?)
    .context("parsing the reassignment file")?;
    plan.sort();
    if a.execute {
        let current = reassign::current_of(&mut conn, &plan)?;
        println!("Current partition replica assignment");
        println!();
        println!("{}", current.json());
        println!();
        println!("Save this to use as the --reassignment-json-file option during rollback");
        if let Some(rate) = a.throttle {
            reassign::set_throttles(&mut conn, &current, &plan, rate)?;
            println!("Warning: You must run --verify periodically, until the reassignment completes, to ensure the throttle is removed.");
            println!("The inter-broker throttle limit was set to {rate} B/s");
        }
        reassign::alter(&mut conn, &plan, false)?;
        let names = plan.partition_names();
        println!("Successfully started partition reassignments for {}", names);
    } else if a.cancel {
        reassign::alter(&mut conn, &plan, true)?;
        let names = plan.partition_names();
        println!(
            "Successfully cancelled partition reassignments for: {}",
            names
        );
    } else {
        let (done, lines) = reassign::verify(&mut conn, &plan)?;
        for l in lines {
            println!("{l}");
        }
        if done && !a.preserve_throttles {
            println!();
            for l in reassign::clear_throttles(&mut conn, &plan)? {
                println!("{l}");
            }
        }
    }
    Ok(())
}

fn configs(a: ConfigsArgs) -> Result<()> {
    let broker = match a.entity_type.as_str() {
        "topics" => false,
        "brokers" => true,
        other => bail!("--entity-type {other} is not supported: topics or brokers"),
    };
    if a.describe == a.alter {
        bail!("exactly one of --describe, --alter is required");
    }
    let name = match (&a.entity_name, a.entity_default) {
        (Some(n), false) => n.clone(),
        (None, true) if broker => String::new(),
        (None, true) => bail!("--entity-default is only for --entity-type brokers"),
        (Some(_), true) => bail!("give --entity-name or --entity-default, not both"),
        (None, false) => bail!("--entity-name is required"),
    };
    // What kafka-configs.sh calls the entity in its messages.
    let label = match (broker, name.is_empty()) {
        (false, _) => format!("topic {name}"),
        (true, false) => format!("broker {name}"),
        (true, true) => "brokers in the cluster".to_string(),
    };
    let mut admin = Admin::connect(&a.bootstrap_server)?;
    let out = std::io::stdout();
    let mut out = out.lock();
    if a.describe {
        let configs = if broker {
            admin.describe_broker_configs_on(&name)?
        } else {
            admin.describe_topic_configs(&name)?
        };
        let which = match (a.all, broker && name.is_empty()) {
            (_, true) => "Default",
            (true, false) => "All",
            (false, false) => "Dynamic",
        };
        writeln!(out, "{which} configs for {label} are:")?;
        for (k, v, source) in configs {
            let dynamic = source.starts_with("DYNAMIC_");
            if !a.all && !dynamic {
                continue;
            }
            let v = v.unwrap_or_else(|| "null".into());
            writeln!(
                out,
                "  {k}={v} sensitive=false synonyms={{{source}:{k}={v}}}"
            )?;
        }
        return Ok(());
    }
    let set = match &a.add_config {
        Some(t) => parse_add_config(t)?,
        None => Vec::new(),
    };
    let delete: Vec<String> = a
        .delete_config
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .collect();
    if set.is_empty() && delete.is_empty() {
        bail!("--alter needs --add-config or --delete-config");
    }
    if broker {
        admin.alter_broker_configs(&name, &set, &delete)?;
    } else {
        admin.alter_topic_configs(&name, &set, &delete)?;
    }
    if broker && name.is_empty() {
        writeln!(out, "Completed updating default config for {label}.")?;
    } else {
        writeln!(out, "Completed updating config for {label}.")?;
    }
    Ok(())
}

fn props(list: &[String]) -> Result<Vec<(String, String)>> {
    list.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .with_context(|| format!("{p:?} is not key=value"))
        })
        .collect()
}

fn prop<'a>(ps: &'a [(String, String)], k: &str) -> Option<&'a str> {
    ps.iter()
        .rev()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

fn topics(a: TopicsArgs) -> Result<()> {
    let actions = [a.create, a.delete, a.alter, a.list, a.describe]
        .iter()
        .filter(|x| **x)
        .count();
    if actions != 1 {
        bail!("exactly one of --create, --delete, --alter, --list, --describe is required");
    }
    let mut admin = Admin::connect(&a.bootstrap_server)?;
    let topic = || a.topic.clone().context("--topic is required");
    if a.create {
        let t = topic()?;
        admin.create_topic(
            &t,
            a.partitions.unwrap_or(-1),
            a.replication_factor.unwrap_or(-1),
            &props(&a.config)?,
        )?;
        println!("Created topic {t}.");
    } else if a.delete {
        let t = topic()?;
        admin.delete_topic(&t)?;
        println!("Deleted topic {t}.");
    } else if a.alter {
        let t = topic()?;
        let n = a.partitions.context("--alter needs --partitions")?;
        admin.create_partitions(&t, n)?;
        println!("Topic {t} now has {n} partitions.");
    } else if a.list {
        for t in admin.list_topics()? {
            println!("{t}");
        }
    } else {
        let wanted: Option<Vec<String>> = a.topic.clone().map(|t| vec![t]);
        let c = admin.describe(wanted.as_deref())?;
        let mut names: Vec<&String> = c
            .topics
            .iter()
            .filter(|(_, t)| !t.internal || wanted.is_some())
            .map(|(n, _)| n)
            .collect();
        names.sort();
        for n in names {
            let t = &c.topics[n];
            if t.error != 0 {
                bail!("topic {n}: {}", weir_tools::error_name(t.error));
            }
            println!(
                "Topic: {n}\tPartitionCount: {}\tReplicationFactor: {}",
                t.leaders.len(),
                t.replicas.first().map_or(0, |r| r.len())
            );
            for (p, leader) in t.leaders.iter().enumerate() {
                let list = |v: &Vec<i32>| {
                    v.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                println!(
                    "\tTopic: {n}\tPartition: {p}\tLeader: {leader}\tReplicas: {}\tIsr: {}",
                    list(&t.replicas[p]),
                    list(&t.isr[p])
                );
            }
        }
    }
    Ok(())
}

fn console_producer(a: ProducerArgs) -> Result<()> {
    let ps = props(&a.property)?;
    let parse_key = prop(&ps, "parse.key") == Some("true");
    let sep = prop(&ps, "key.separator").unwrap_or("\t").to_string();
    let mut cfg = ProducerConfig::new(&a.bootstrap_server);
    cfg.set("acks", &a.acks)?
        .set("compression.type", &a.compression_type)?
        .set("linger.ms", &a.linger_ms.to_string())?;
    cfg.set("client.id", "console-producer")?;
    for (k, v) in props(&a.producer_property)? {
        cfg.set(&k, &v)?;
    }
    let producer = RawProducer::new(cfg, Vec::new())?;
    let mut pending = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let (key, value) = if parse_key {
            match line.split_once(sep.as_str()) {
                Some((k, v)) => (Some(Bytes::from(k.to_string())), v.to_string()),
                None => bail!("no key separator {sep:?} in line {line:?}"),
            }
        } else {
            (None, line)
        };
        let rec = RawRecord {
            topic: a.topic.clone(),
            partition: None,
            key,
            value: Some(Bytes::from(value)),
            headers: Vec::new(),
            timestamp: weir_tools::now_ms(),
        };
        pending.push(producer.send(rec).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    producer.flush();
    for p in pending {
        p.get().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    producer.close();
    Ok(())
}

fn console_consumer(a: ConsumerArgs) -> Result<()> {
    let ps = props(&a.property)?;
    let print_key = prop(&ps, "print.key") == Some("true");
    let print_partition = prop(&ps, "print.partition") == Some("true");
    let print_offset = prop(&ps, "print.offset") == Some("true");
    let sep = prop(&ps, "key.separator").unwrap_or("\t").to_string();
    let mut cfg = ConsumerConfig::new(&a.bootstrap_server);
    cfg.client_id = "console-consumer".into();
    // Without --from-beginning the console consumer starts at the end, as Kafka's does.
    cfg.auto_offset_reset = if a.from_beginning {
        OffsetReset::Earliest
    } else {
        OffsetReset::Latest
    };
    cfg.fetch_max_wait_ms = 200;
    let mut consumer = match &a.group {
        Some(g) => {
            cfg.group_id = Some(g.clone());
            cfg.session_timeout_ms = 10_000;
            cfg.heartbeat_interval = Duration::from_secs(1);
            let mut c = Consumer::new(cfg)?;
            c.subscribe(&[&a.topic])?;
            c
        }
        None => {
            let mut c = Consumer::new(cfg)?;
            let mut admin = Admin::connect(&a.bootstrap_server)?;
            let n = admin
                .describe(Some(&[a.topic.clone()]))?
                .partitions(&a.topic)?;
            c.assign((0..n as i32).map(|p| (a.topic.clone(), p)).collect())?;
            c
        }
    };
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut n = 0usize;
    let mut last = Instant::now();
    loop {
        let recs = consumer.poll(Duration::from_millis(200))?;
        if !recs.is_empty() {
            last = Instant::now();
        }
        for r in recs {
            let mut line = String::new();
            if print_partition {
                line.push_str(&format!("Partition:{}{sep}", r.partition));
            }
            if print_offset {
                line.push_str(&format!("Offset:{}{sep}", r.offset));
            }
            if print_key {
                line.push_str(
                    &r.key
                        .as_ref()
                        .map(|k| String::from_utf8_lossy(k).to_string())
                        .unwrap_or_else(|| "null".into()),
                );
                line.push_str(&sep);
            }
            line.push_str(
                &r.value
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v).to_string())
                    .unwrap_or_else(|| "null".into()),
            );
            writeln!(out, "{line}")?;
            n += 1;
            if a.max_messages.is_some_and(|m| n >= m) {
                out.flush()?;
                return consumer.close();
            }
        }
        out.flush()?;
        if a.timeout_ms
            .is_some_and(|t| last.elapsed() >= Duration::from_millis(t))
        {
            return consumer.close();
        }
    }
}

fn groups(a: GroupsArgs) -> Result<()> {
    let mut admin = Admin::connect(&a.bootstrap_server)?;
    if a.list {
        for (g, _) in admin.list_groups()? {
            println!("{g}");
        }
        return Ok(());
    }
    let group = a.group.clone().context("--group is required")?;
    if a.describe {
        let d = admin.describe_group(&group)?;
        let lag = admin.group_lag(&group)?;
        if d.state == "Dead" && lag.is_empty() {
            bail!("consumer group {group} does not exist");
        }
        println!("GROUP\tTOPIC\tPARTITION\tCURRENT-OFFSET\tLOG-END-OFFSET\tLAG\tSTATE\tCONSUMER-ID\tHOST\tCLIENT-ID");
        for l in lag {
            let show = |v: Option<i64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
            let none = ("-".to_string(), "-".to_string(), "-".to_string());
            let (member, host, client) = d
                .owners
                .get(&(l.topic.clone(), l.partition))
                .unwrap_or(&none);
            println!(
                "{group}\t{}\t{}\t{}\t{}\t{}\t{}\t{member}\t{host}\t{client}",
                l.topic,
                l.partition,
                show(l.committed),
                l.end,
                show(l.lag),
                d.state
            );
        }
        return Ok(());
    }
    if a.reset_offsets {
        let topic = a.topic.clone().context("--reset-offsets needs --topic")?;
        let n = admin.describe(Some(&[topic.clone()]))?.partitions(&topic)?;
        let tps: Vec<(String, i32)> = (0..n as i32).map(|p| (topic.clone(), p)).collect();
        let targets: Vec<((String, i32), i64)> = if a.to_earliest {
            admin.offsets(&tps, -2)?
        } else if a.to_latest {
            admin.offsets(&tps, -1)?
        } else if let Some(o) = a.to_offset {
            tps.into_iter().map(|tp| (tp, o)).collect()
        } else {
            bail!("--reset-offsets needs --to-earliest, --to-latest or --to-offset N");
        };
        println!("GROUP\tTOPIC\tPARTITION\tNEW-OFFSET");
        for ((t, p), o) in &targets {
            println!("{group}\t{t}\t{p}\t{o}");
        }
        if a.execute {
            admin.reset_offsets(&group, &targets)?;
        } else {
            println!("(dry run: add --execute to apply)");
        }
        return Ok(());
    }
    bail!("one of --list, --describe, --reset-offsets is required")
}
