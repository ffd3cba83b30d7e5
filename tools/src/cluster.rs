//! `weir cluster start|stop|status`: N brokers on one machine from one small config, like the
//! scripts that start and stop every broker of a test cluster. Node `i` gets Kafka port
//! `port + i`, controller port `controller_port + i`, and `<dir>/node-<i>/` with its
//! `server.properties`, `data/`, `broker.log` and `broker.pid`. Every node is a broker and a
//! controller voter (combined mode). Node `i` serves its Prometheus metrics on
//! `METRICS_PORT_BASE + i`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::metadata::Cluster as Metadata;

/// Nodes in one `weir cluster` (the quorum is every node).
pub const NODES_MAX: usize = 9;
/// Node `i`'s metrics endpoint (`weir.metrics.listen`) is on this port + i.
pub const METRICS_PORT_BASE: usize = 9644;
/// How long `start` waits for every node to serve clients, and `stop` for each to exit.
const WAIT: Duration = Duration::from_secs(30);

pub struct Layout {
    pub nodes: usize,
    pub dir: PathBuf,
    pub host: String,
    pub port: u16,
    pub controller_port: u16,
}

impl Layout {
    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{i}"))
    }
    fn kafka(&self, i: usize) -> String {
        format!("{}:{}", self.host, self.port as usize + i)
    }
    fn controller(&self, i: usize) -> String {
        format!("{}:{}", self.host, self.controller_port as usize + i)
    }

    /// The server.properties of node `i`, with `overrides` (key=value) last.
    pub fn properties(&self, i: usize, overrides: &[String]) -> String {
        let voters: Vec<String> = (0..self.nodes)
            .map(|n| format!("{n}@{}", self.controller(n)))
            .collect();
        let mut p = format!(
            "# Written by `weir cluster start`.\n\
             node.id={i}\n\
             process.roles=broker,controller\n\
             listeners=PLAINTEXT://{kafka},CONTROLLER://{controller}\n\
             advertised.listeners=PLAINTEXT://{kafka}\n\
             controller.listener.names=CONTROLLER\n\
             controller.quorum.voters={voters}\n\
             log.dirs={data}\n\
             weir.metrics.listen={host}:{metrics}\n",
            host = self.host,
            metrics = METRICS_PORT_BASE + i,
            kafka = self.kafka(i),
            controller = self.controller(i),
            voters = voters.join(","),
            data = self.node_dir(i).join("data").display(),
        );
        for o in overrides {
            p.push_str(o);
            p.push('\n');
        }
        p
    }

    /// Nodes that have a directory under `dir`, in id order.
    pub fn discover(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
        let mut out = Vec::new();
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        for e in entries {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(i) = name
                .strip_prefix("node-")
                .and_then(|n| n.parse::<usize>().ok())
            {
                out.push((i, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }
}

fn read_pid(node_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(node_dir.join("broker.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn listening(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .ok()
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok())
}

/// The `broker` binary next to this executable, else `broker` on PATH.
pub fn default_broker() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("broker")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("broker"))
}

/// Writes each node's properties and starts every node not running yet; waits until all
/// serve clients.
pub fn start(l: &Layout, broker: &Path, shards: Option<usize>, overrides: &[String]) -> Result<()> {
    if l.nodes == 0 || l.nodes > NODES_MAX {
        bail!("--nodes must be 1 to {NODES_MAX}");
    }
    for i in 0..l.nodes {
        let nd = l.node_dir(i);
        std::fs::create_dir_all(nd.join("data"))
            .with_context(|| format!("creating {}", nd.display()))?;
        if let Some(pid) = read_pid(&nd).filter(|&p| alive(p)) {
            println!("node {i}: already running (pid {pid})");
            continue;
        }
        let props = nd.join("server.properties");
        std::fs::write(&props, l.properties(i, overrides))
            .with_context(|| format!("writing {}", props.display()))?;
        spawn_node(i, &nd, broker, shards)?;
    }
    // Brokers added by `commission` keep their own properties; they start with the rest.
    for (i, nd) in Layout::discover(&l.dir)?
        .into_iter()
        .filter(|(i, _)| *i >= l.nodes)
    {
        if read_pid(&nd).filter(|&p| alive(p)).is_none() && nd.join("server.properties").exists() {
            spawn_node(i, &nd, broker, shards)?;
        }
    }
    // A node serves once a majority of the quorum runs.
    let deadline = Instant::now() + WAIT;
    for (i, nd) in Layout::discover(&l.dir)? {
        if let Some(addr) = kafka_addr(&nd).filter(|_| nd.join("broker.pid").exists()) {
            wait_serving(
                i,
                &nd,
                &addr,
                deadline.saturating_duration_since(Instant::now()),
            )?;
        }
    }
    let bootstrap: Vec<String> = (0..l.nodes).map(|i| l.kafka(i)).collect();
    println!("cluster up: --bootstrap-server {}", bootstrap.join(","));
    Ok(())
}

/// Starts node `i` from `<nd>/server.properties`, recording its pid.
fn spawn_node(i: usize, nd: &Path, broker: &Path, shards: Option<usize>) -> Result<()> {
    let props = nd.join("server.properties");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(nd.join("broker.log"))?;
    let mut cmd = Command::new(broker);
    cmd.arg("--config").arg(&props);
    if let Some(s) = shards {
        cmd.arg("--shards").arg(s.to_string());
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the node outlives this command and a Ctrl-C in its
        // terminal.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", broker.display()))?;
    let mut f = std::fs::File::create(nd.join("broker.pid"))?;
    writeln!(f, "{}", child.id())?;
    println!(
        "node {i}: started (pid {}), Kafka {}, log {}",
        child.id(),
        kafka_addr(nd).unwrap_or_default(),
        nd.join("broker.log").display()
    );
    Ok(())
}

/// A node's `key=` line from its server.properties.
fn property(nd: &Path, key: &str) -> Option<String> {
    let props = std::fs::read_to_string(nd.join("server.properties")).ok()?;
    props
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
}

/// A node's client address (its advertised PLAINTEXT listener).
fn kafka_addr(nd: &Path) -> Option<String> {
    property(nd, "advertised.listeners")?
        .split(',')
        .find_map(|l| l.strip_prefix("PLAINTEXT://"))
        .map(str::to_string)
}

/// Waits until node `i` answers on `addr`, or fails when it exits or `wait` passes.
fn wait_serving(i: usize, nd: &Path, addr: &str, wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    // Bounded by the deadline.
    while !listening(addr) {
        if read_pid(nd).is_none_or(|p| !alive(p)) {
            bail!("node {i} exited; see {}", nd.join("broker.log").display());
        }
        if Instant::now() > deadline {
            bail!(
                "node {i} does not serve clients after {wait:?}; see {}",
                nd.join("broker.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// SIGTERM every running node (a controlled shutdown), SIGKILL what is left after the wait.
pub fn stop(dir: &Path) -> Result<()> {
    let nodes = Layout::discover(dir)?;
    if nodes.is_empty() {
        bail!("no nodes under {}", dir.display());
    }
    let mut running = Vec::new();
    for (i, nd) in &nodes {
        match read_pid(nd).filter(|&p| alive(p)) {
            Some(pid) => {
                // SAFETY: kill(2) on a pid this tool started.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                running.push((*i, nd.clone(), pid));
            }
            None => println!("node {i}: not running"),
        }
    }
    let deadline = Instant::now() + WAIT;
    for (i, nd, pid) in running {
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            println!("node {i}: killed (pid {pid}) after {WAIT:?}");
        } else {
            println!("node {i}: stopped (pid {pid})");
        }
        let _ = std::fs::remove_file(nd.join("broker.pid"));
    }
    Ok(())
}

/// Each node's process and ports, and what the cluster reports (brokers, controller).
pub fn status(dir: &Path) -> Result<()> {
    let nodes = Layout::discover(dir)?;
    if nodes.is_empty() {
        bail!("no nodes under {}", dir.display());
    }
    let mut reported = None;
    for (i, nd) in &nodes {
        let props = std::fs::read_to_string(nd.join("server.properties")).unwrap_or_default();
        let kafka = props
            .lines()
            .find_map(|l| l.strip_prefix("advertised.listeners=PLAINTEXT://"))
            .unwrap_or("?")
            .to_string();
        let pid = read_pid(nd).filter(|&p| alive(p));
        let serving = listening(&kafka);
        println!(
            "node {i}: {} Kafka {kafka} {}",
            match pid {
                Some(p) => format!("running (pid {p})"),
                None => "down".to_string(),
            },
            if serving { "serving" } else { "not serving" }
        );
        if serving && reported.is_none() {
            let m = crate::connect_any(&kafka, "weir-cluster-status", Duration::from_secs(5))
                .and_then(|mut c| Metadata::fetch(&mut c, Some(&[]), false));
            if let Ok(m) = m {
                reported = Some((kafka, m));
            }
        }
    }
    match reported {
        Some((from, m)) => {
            let mut brokers: Vec<_> = m.brokers.iter().collect();
            brokers.sort();
            println!(
                "cluster {} (as {from} reports it): controller {}, {} live brokers:",
                m.cluster_id.unwrap_or_default(),
                m.controller,
                brokers.len()
            );
            for (id, addr) in brokers {
                println!("  broker {id} at {addr}");
            }
        }
        None => println!("no node answers Metadata"),
    }
    Ok(())
}

/// The quorum's voters as the cluster's nodes were configured (`controller.quorum.voters`),
/// and their ids.
fn voters(nodes: &[(usize, PathBuf)]) -> Result<(String, Vec<i32>)> {
    let line = nodes
        .iter()
        .find_map(|(_, nd)| property(nd, "controller.quorum.voters"))
        .context("no node has controller.quorum.voters")?;
    let ids = line
        .split(',')
        .filter_map(|v| v.split_once('@')?.0.trim().parse().ok())
        .collect();
    Ok((line, ids))
}

/// A connection to any serving node but `except`.
fn connect_cluster(
    nodes: &[(usize, PathBuf)],
    except: Option<usize>,
) -> Result<crate::client::conn::Conn> {
    let addrs: Vec<String> = nodes
        .iter()
        .filter(|(i, _)| Some(*i) != except)
        .filter_map(|(_, nd)| kafka_addr(nd))
        .collect();
    crate::connect_any(&addrs.join(","), "weir-cluster", Duration::from_secs(10))
}

/// Runs a reassignment plan and waits until `--verify` reports every partition complete.
fn move_and_wait(
    conn: &mut crate::client::conn::Conn,
    current: &crate::reassign::Plan,
    proposed: &crate::reassign::Plan,
    wait: Duration,
) -> Result<()> {
    use crate::reassign;
    let moving: Vec<reassign::PlanPartition> = proposed
        .partitions
        .iter()
        .zip(&current.partitions)
        .filter(|(want, now)| want.replicas != now.replicas)
        .map(|(want, _)| want.clone())
        .collect();
    if moving.is_empty() {
        println!("no replicas to move");
        return Ok(());
    }
    let plan = reassign::Plan {
        version: 1,
        partitions: moving,
    };
    println!(
        "moving {} partitions: {}",
        plan.partitions.len(),
        plan.partition_names()
    );
    reassign::alter(conn, &plan, false)?;
    let deadline = Instant::now() + wait;
    // Bounded by the deadline.
    loop {
        let (done, lines) = reassign::verify(conn, &plan)?;
        if done {
            println!("all {} partitions moved", plan.partitions.len());
            return Ok(());
        }
        if Instant::now() > deadline {
            let left = lines.iter().filter(|l| l.contains("in progress")).count();
            bail!("{left} partitions still moving after {wait:?}; `weir reassign-partitions --verify` shows them");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `weir cluster commission`: adds a broker-only node with the next node id (Kafka port and
/// directory after the existing ones' pattern), waits until the cluster lists it, then (with
/// `rebalance`) spreads every topic's replicas and leaders over all brokers and waits until
/// the moves complete. Returns the new node id.
pub fn commission(
    dir: &Path,
    broker: &Path,
    shards: Option<usize>,
    overrides: &[String],
    rebalance: bool,
    wait: Duration,
) -> Result<usize> {
    let nodes = Layout::discover(dir)?;
    let (first, first_dir) = nodes
        .first()
        .cloned()
        .with_context(|| format!("no nodes under {}", dir.display()))?;
    let (voter_line, _) = voters(&nodes)?;
    let first_addr = kafka_addr(&first_dir).context("node without an advertised listener")?;
    let (host, port) = first_addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<usize>().ok()?)))
        .context("bad advertised listener")?;
    let id = nodes.iter().map(|(i, _)| *i).max().unwrap_or(0) + 1;
    anyhow::ensure!(id < 1000, "node ids up to 999");
    let base = port
        .checked_sub(first)
        .context("ports do not follow node ids")?;
    let kafka = format!("{host}:{}", base + id);
    anyhow::ensure!(base + id <= u16::MAX as usize, "no port for node {id}");
    let nd = dir.join(format!("node-{id}"));
    std::fs::create_dir_all(nd.join("data"))
        .with_context(|| format!("creating {}", nd.display()))?;
    let mut props = format!(
        "# Written by `weir cluster commission`.\n\
         node.id={id}\n\
         process.roles=broker\n\
         listeners=PLAINTEXT://{kafka}\n\
         advertised.listeners=PLAINTEXT://{kafka}\n\
         controller.listener.names=CONTROLLER\n\
         controller.quorum.voters={voter_line}\n\
         log.dirs={data}\n\
         weir.metrics.listen={host}:{metrics}\n",
        data = nd.join("data").display(),
        metrics = METRICS_PORT_BASE + id,
    );
    for o in overrides {
        props.push_str(o);
        props.push('\n');
    }
    std::fs::write(nd.join("server.properties"), props)?;
    spawn_node(id, &nd, broker, shards)?;
    wait_serving(id, &nd, &kafka, WAIT)?;
    let mut conn = connect_cluster(&nodes, None)?;
    let deadline = Instant::now() + WAIT;
    // Bounded by the deadline: the broker is listed once the controller unfenced it.
    let brokers = loop {
        let m = Metadata::fetch(&mut conn, Some(&[]), false)?;
        if m.brokers.contains_key(&(id as i32)) {
            let mut b: Vec<i32> = m.brokers.keys().copied().collect();
            b.sort();
            break b;
        }
        if Instant::now() > deadline {
            bail!("broker {id} serves but the cluster does not list it after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("broker {id} joined the cluster at {kafka}");
    if rebalance {
        let all = Metadata::fetch(&mut conn, None, false)?;
        let mut names: Vec<String> = all.topics.keys().cloned().collect();
        names.sort();
        let topics = crate::reassign::TopicsToMove {
            topics: names
                .into_iter()
                .map(|topic| crate::reassign::TopicName_ { topic })
                .collect(),
        };
        let (current, proposed) = crate::reassign::generate(&mut conn, &topics, &brokers)?;
        move_and_wait(&mut conn, &current, &proposed, wait)?;
        // A reassignment keeps a leader that stays a replica; leaders spread only once the
        // preferred (first) replicas lead.
        let moved: Vec<(String, i32)> = proposed
            .partitions
            .iter()
            .zip(&current.partitions)
            .filter(|(want, now)| want.replicas != now.replicas)
            .map(|(want, _)| (want.topic.clone(), want.partition))
            .collect();
        if !moved.is_empty() {
            for line in crate::log_dirs::elect_preferred(&mut conn, Some(&moved))? {
                println!("{line}");
            }
        }
    }
    Ok(id)
}

/// `weir cluster decommission`: moves every replica off broker `id` (each to the live broker
/// holding the fewest replicas that lacks one of that partition), waits until the moves
/// complete, stops the broker, unregisters it (UnregisterBroker), and renames its directory
/// `decommissioned-node-<id>` so `start` leaves it alone. Controller voters are refused: Weir
/// cannot change the quorum's voters.
pub fn decommission(dir: &Path, id: usize, wait: Duration) -> Result<()> {
    let nodes = Layout::discover(dir)?;
    let nd = nodes
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, nd)| nd.clone())
        .with_context(|| format!("no node-{id} under {}", dir.display()))?;
    let (_, voter_ids) = voters(&nodes)?;
    if voter_ids.contains(&(id as i32)) {
        bail!("node {id} is a controller quorum voter; Weir cannot remove voters, so only broker-only nodes (added by `weir cluster commission`) can be decommissioned");
    }
    let mut conn = connect_cluster(&nodes, Some(id))?;
    let m = Metadata::fetch(&mut conn, None, false)?;
    let me = id as i32;
    let mut load: std::collections::BTreeMap<i32, usize> = m
        .brokers
        .keys()
        .filter(|b| **b != me)
        .map(|b| (*b, 0))
        .collect();
    for t in m.topics.values() {
        for r in &t.replicas {
            for b in r {
                if let Some(n) = load.get_mut(b) {
                    *n += 1;
                }
            }
        }
    }
    let mut names: Vec<&String> = m.topics.keys().collect();
    names.sort();
    let (mut current, mut proposed) = (Vec::new(), Vec::new());
    for name in names {
        for (p, r) in m.topics[name].replicas.iter().enumerate() {
            if !r.contains(&me) {
                continue;
            }
            let to = load
                .iter()
                .filter(|(b, _)| !r.contains(b))
                .min_by_key(|(b, n)| (**n, **b))
                .map(|(b, _)| *b)
                .with_context(|| {
                    format!("no broker can take {name}-{p}'s replica from broker {id}")
                })?;
            *load.get_mut(&to).expect("listed") += 1;
            let part = |replicas: Vec<i32>| crate::reassign::PlanPartition {
                topic: name.clone(),
                partition: p as i32,
                replicas,
                log_dirs: Vec::new(),
            };
            current.push(part(r.clone()));
            proposed.push(part(
                r.iter().map(|&b| if b == me { to } else { b }).collect(),
            ));
        }
    }
    let plan = |v| crate::reassign::Plan {
        version: 1,
        partitions: v,
    };
    move_and_wait(&mut conn, &plan(current), &plan(proposed), wait)?;
    if let Some(pid) = read_pid(&nd).filter(|&p| alive(p)) {
        // SAFETY: kill(2) on a pid this tool started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT;
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        println!("node {id}: stopped (pid {pid})");
    }
    let _ = std::fs::remove_file(nd.join("broker.pid"));
    let deadline = Instant::now() + WAIT;
    // Bounded by the deadline: the controller fences a stopped broker within its session.
    loop {
        match crate::reassign::unregister(&mut conn, me) {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let gone = dir.join(format!("decommissioned-node-{id}"));
    std::fs::rename(&nd, &gone)?;
    println!(
        "broker {id} unregistered; its files are in {}",
        gone.display()
    );
    Ok(())
}
