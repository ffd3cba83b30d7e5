//! `weir cluster start|stop|status`: N brokers on one machine from one small config, like the
//! scripts that start and stop every broker of a test cluster. Node `i` gets Kafka port
//! `port + i`, controller port `controller_port + i`, and `<dir>/node-<i>/` with its
//! `server.properties`, `data/`, `broker.log` and `broker.pid`. Every node is a broker and a
//! controller voter (combined mode).

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
             log.dirs={data}\n",
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
            "node {i}: started (pid {}), Kafka {}, controller {}, log {}",
            child.id(),
            l.kafka(i),
            l.controller(i),
            nd.join("broker.log").display()
        );
    }
    let deadline = Instant::now() + WAIT;
    for i in 0..l.nodes {
        // Bounded by the deadline: a node serves once a majority of the quorum runs.
        while !listening(&l.kafka(i)) {
            let nd = l.node_dir(i);
            if read_pid(&nd).is_none_or(|p| !alive(p)) {
                bail!("node {i} exited; see {}", nd.join("broker.log").display());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {i} does not serve clients after {WAIT:?}; see {}",
                    nd.join("broker.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let bootstrap: Vec<String> = (0..l.nodes).map(|i| l.kafka(i)).collect();
    println!("cluster up: --bootstrap-server {}", bootstrap.join(","));
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
