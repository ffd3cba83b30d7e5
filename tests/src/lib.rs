//! Helpers for end-to-end tests: start the real `broker` binary on a free port with a
//! temporary data directory, stop it (SIGTERM or SIGKILL), restart it on the same data, and
//! build librdkafka clients pointed at it.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;

pub use rdkafka;

/// The broker binary, rebuilt once per test process so a test never runs a stale broker
/// (`cargo test -p weir-tests` alone does not rebuild another package's binary).
pub fn broker_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "--bin", "broker"])
                .current_dir(&root)
                .status()
                .expect("running cargo build");
            assert!(status.success(), "building the broker failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            target.join("debug/broker")
        })
        .clone()
}

/// A plain HTTP/1.1 GET (the response is read to its end: the server closes): (status line,
/// body).
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut c =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).expect("an HTTP response in UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head and body");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// A free loopback port for a broker, a metrics endpoint or a controller listener.
///
/// Never the same port twice in one test process: the port is free when this returns, but a
/// broker binds it later (a cluster's brokers only once the quorum runs, a restarted node after
/// its downtime), and in between the kernel would hand it to the next caller too. A test
/// running beside this one could then get it as its metrics port, and this broker's readiness
/// check would be answered by that HTTP server (a Kafka request read EOF, an admin request
/// timed out).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap();
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if given.insert(port) {
            return port;
        }
    }
    panic!("no port left that this test process has not used");
}

pub struct Broker {
    pub port: u16,
    /// The Prometheus endpoint's port (`--metrics-listen`).
    pub metrics_port: u16,
    pub dir: tempfile::TempDir,
    pub shards: usize,
    pub extra_args: Vec<String>,
    child: Option<Child>,
    log_path: PathBuf,
    starts: usize,
    /// "accepting connections" lines in the log before the latest start.
    accepting_before: usize,
}

impl Broker {
    /// Starts a broker with `shards` shards and waits until it accepts connections.
    pub fn start(shards: usize) -> Broker {
        Broker::start_with(shards, &[])
    }

    pub fn start_with(shards: usize, extra: &[&str]) -> Broker {
        Broker::start_in(tempfile::tempdir().unwrap(), shards, extra)
    }

    /// Starts a broker whose data directory is `dir/data`, prepared by the caller (for example
    /// a small filesystem mounted there).
    pub fn start_in(dir: tempfile::TempDir, shards: usize, extra: &[&str]) -> Broker {
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let mut b = Broker::unstarted(dir, free_port(), free_port(), shards, extra);
        b.restart();
        b
    }

    /// A broker not started yet: its ports, directory (the log and `data/` in it), shards
    /// and extra arguments.
    fn unstarted(
        dir: tempfile::TempDir,
        port: u16,
        metrics_port: u16,
        shards: usize,
        extra_args: Vec<String>,
    ) -> Broker {
        Broker {
            port,
            metrics_port,
            log_path: dir.path().join("broker.log"),
            dir,
            shards,
            extra_args,
            child: None,
            starts: 0,
            accepting_before: 0,
        }
    }

    /// A handle on a broker started elsewhere (no process to manage), for its client helpers.
    pub fn attach(port: u16) -> Broker {
        Broker::unstarted(tempfile::tempdir().unwrap(), port, 0, 0, Vec::new())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// How many segment files (`*.log`) partition directory `dir` (e.g. "t-0") holds.
    pub fn segment_count(&self, dir: &str) -> usize {
        std::fs::read_dir(self.data_dir().join(dir))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "log")
            })
            .count()
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `GET /metrics` from the broker's Prometheus endpoint: (HTTP status line, body).
    pub fn scrape(&self) -> (String, String) {
        http_get(&format!("127.0.0.1:{}", self.metrics_port), "/metrics")
    }

    /// The sum of the broker's samples named `name` over all their label sets (0 when there
    /// is none), from one scrape. Panics when the endpoint does not answer 200.
    pub fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.scrape();
        assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
        body.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                (rest.starts_with('{') || rest.starts_with(' ')).then_some(rest)
            })
            .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// (Re)starts the broker process on the same port and data directory.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_listening();
    }

    /// Starts the broker process without waiting for it to listen (a cluster's brokers listen
    /// only once a majority of the controller quorum runs).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        // A killed broker's listening socket can outlive its process by a few milliseconds;
        // wait until nothing accepts on the port, so the readiness check below cannot be
        // answered by the old socket.
        let released = Instant::now() + Duration::from_secs(5);
        while self.starts > 0
            && Instant::now() < released
            && TcpStream::connect(self.bootstrap()).is_ok()
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.starts += 1;
        self.accepting_before = self.accepting_lines();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(broker_binary())
            .arg("--listen")
            .arg(self.bootstrap())
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--shards")
            .arg(self.shards.to_string())
            .arg("--cache-bytes")
            .arg((64 << 20).to_string())
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("WEIR_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting broker");
        self.child = Some(child);
    }

    /// Waits until the started broker accepts connections (panics after 30 s or if it exited).
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            // Something accepting on the port is this broker only once it says so: another
            // process could hold the port (see `free_port`), and a connect can even be answered
            // by itself (TCP simultaneous open) when the kernel picks the port as its source.
            if TcpStream::connect(self.bootstrap()).is_ok() && self.says_it_accepts() {
                // Every shard binds the port; give the last ones a moment after the first.
                std::thread::sleep(Duration::from_millis(200));
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("broker exited at start with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("broker did not start listening:\n{}", self.log());
    }

    /// SIGTERM and wait for a clean exit; returns the exit status success.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush or write the clean-shutdown marker.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGSTOP (true) or SIGCONT (false): the process freezes with its sockets open.
    pub fn pause(&self, stop: bool) {
        if let Some(child) = self.child.as_ref() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc_kill(child.id() as i32, if stop { 19 } else { 18 }) };
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    fn accepting_lines(&self) -> usize {
        self.log().matches("accepting connections").count()
    }

    /// The broker logged that a shard accepts connections since its latest start (always
    /// true when WEIR_TEST_LOG may have turned info lines off).
    fn says_it_accepts(&self) -> bool {
        std::env::var_os("WEIR_TEST_LOG").is_some()
            || self.accepting_lines() > self.accepting_before
    }

    /// Everything the broker logged so far (all starts).
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap());
        c.set("broker.address.family", "v4");
        c
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Waits for `cond` up to `timeout`, polling.
/// One partition as a broker's Metadata reports it (ISR sorted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionView {
    pub leader: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
}

/// How many brokers `b`'s Metadata response lists (0 when it cannot answer).
pub fn brokers_seen(b: &Broker) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let Ok(c) = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .create::<BaseConsumer>()
    else {
        return 0;
    };
    c.fetch_metadata(None, Duration::from_secs(2))
        .map(|m| m.brokers().len())
        .unwrap_or(0)
}

/// `topic`'s partitions in order, as broker `b` (through librdkafka) reports them; None when
/// the broker cannot answer or the topic has an error.
pub fn topic_view(b: &Broker, topic: &str) -> Option<Vec<PartitionView>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .create()
        .ok()?;
    let m = c.fetch_metadata(Some(topic), Duration::from_secs(5)).ok()?;
    let t = m.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() {
        return None;
    }
    let mut v: Vec<_> = t
        .partitions()
        .iter()
        .map(|p| {
            let mut isr = p.isr().to_vec();
            isr.sort_unstable();
            (
                p.id(),
                PartitionView {
                    leader: p.leader(),
                    replicas: p.replicas().to_vec(),
                    isr,
                },
            )
        })
        .collect();
    v.sort_by_key(|(id, _)| *id);
    Some(v.into_iter().map(|(_, x)| x).collect())
}

/// The bytes of every segment of a partition directory, in offset order (after a clean stop,
/// which trims each segment file to its data): replicas compare equal byte for byte.
pub fn log_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap())
        .collect()
}

/// The size of the largest record batch in a segment's bytes (stops at the first zero length:
/// preallocated space). A fetch returns at least one whole batch, so a replication throttle
/// may overshoot by this much.
pub fn largest_batch(log: &[u8]) -> usize {
    let mut at = 0;
    let mut largest = 0;
    while at + 12 <= log.len() {
        let len = i32::from_be_bytes(log[at + 8..at + 12].try_into().expect("4 bytes"));
        if len <= 0 {
            break;
        }
        largest = largest.max(12 + len as usize);
        at += 12 + len as usize;
    }
    largest
}

pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

pub mod java;
pub mod python;
pub mod raw;
pub mod workload;

pub mod admin {
    //! Topic administration through librdkafka's AdminClient.
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::error::RDKafkaErrorCode;

    use super::Broker;

    pub fn client(b: &Broker) -> AdminClient<DefaultClientContext> {
        b.client_config().create().expect("admin client")
    }

    /// An admin request that got no answer: the panic carries the broker's log, so a failure
    /// in CI says what the broker was doing.
    fn failed(b: &Broker, api: &str, e: rdkafka::error::KafkaError) -> ! {
        let log = b.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        panic!(
            "{api} request failed: {e}\nlast lines of the broker's log:\n{}",
            tail.join("\n")
        )
    }

    pub fn opts() -> AdminOptions {
        AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(30)))
    }

    /// Creates a topic; returns the per-topic result code.
    pub fn create(
        b: &Broker,
        name: &str,
        partitions: i32,
        rf: i32,
        configs: &[(&str, &str)],
    ) -> Result<(), RDKafkaErrorCode> {
        let a = client(b);
        let mut t = NewTopic::new(name, partitions, TopicReplication::Fixed(rf));
        for (k, v) in configs {
            t = t.set(k, v);
        }
        let r = futures::executor::block_on(a.create_topics([&t], &opts()))
            .unwrap_or_else(|e| failed(b, "CreateTopics", e));
        r.into_iter()
            .next()
            .expect("one result")
            .map(|_| ())
            .map_err(|(_, e)| e)
    }

    pub fn delete(b: &Broker, name: &str) -> Result<(), RDKafkaErrorCode> {
        let a = client(b);
        let r = futures::executor::block_on(a.delete_topics(&[name], &opts()))
            .unwrap_or_else(|e| failed(b, "DeleteTopics", e));
        r.into_iter()
            .next()
            .expect("one result")
            .map(|_| ())
            .map_err(|(_, e)| e)
    }

    pub fn add_partitions(b: &Broker, name: &str, total: usize) -> Result<(), RDKafkaErrorCode> {
        let a = client(b);
        let p = NewPartitions::new(name, total);
        let r = futures::executor::block_on(a.create_partitions([&p], &opts()))
            .unwrap_or_else(|e| failed(b, "CreatePartitions", e));
        r.into_iter()
            .next()
            .expect("one result")
            .map(|_| ())
            .map_err(|(_, e)| e)
    }
}

/// Several broker processes on loopback forming one cluster: every node is a broker and a
/// controller voter (combined mode), with its own data dir, Kafka port and controller port.
pub struct Cluster {
    pub nodes: Vec<Broker>,
    /// `controller.quorum.voters` of every node.
    voters: String,
    extra: Vec<(String, String)>,
}

impl Cluster {
    /// Starts `n` nodes (session timeout 3 s, heartbeats every 500 ms unless `extra` says
    /// otherwise: `extra` are server.properties key/values for every node) and waits until
    /// each serves clients.
    pub fn start(n: usize, extra: &[(&str, &str)]) -> Cluster {
        Cluster::start_roles(&vec!["broker,controller"; n], extra)
    }

    /// Starts one node per entry of `roles` (`process.roles`: "broker,controller", "broker" or
    /// "controller"); the nodes with the controller role are the voters. Waits until every
    /// node with the broker role serves clients.
    pub fn start_roles(roles: &[&str], extra: &[(&str, &str)]) -> Cluster {
        let ports: Vec<(u16, u16)> = roles.iter().map(|_| (free_port(), free_port())).collect();
        let voters: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(i, _)| roles[*i].contains("controller"))
            .map(|(i, (_, c))| format!("{i}@127.0.0.1:{c}"))
            .collect();
        let mut c = Cluster {
            nodes: Vec::with_capacity(roles.len()),
            voters: voters.join(","),
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        for (i, &(port, cport)) in ports.iter().enumerate() {
            let b = c.spawn_node(i, roles[i], port, cport);
            c.nodes.push(b);
        }
        for (i, b) in c.nodes.iter_mut().enumerate() {
            if roles[i].contains("broker") {
                b.wait_listening();
            }
        }
        // A broker listens before it has registered with the controller: a topic created
        // right away with replication factor 3 could see fewer brokers and fail with
        // INVALID_REPLICATION_FACTOR (seen in CI on a busy machine). Wait until every broker
        // sees all of them (at most 30 s; a test that wants fewer finds out itself).
        let brokers = roles.iter().filter(|r| r.contains("broker")).count();
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, b) in c.nodes.iter().enumerate() {
            if !roles[i].contains("broker") {
                continue;
            }
            while Instant::now() < deadline && brokers_seen(b) < brokers {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        c
    }

    fn spawn_node(&self, i: usize, role: &str, port: u16, cport: u16) -> Broker {
        let listeners = match role {
            "controller" => format!("CONTROLLER://127.0.0.1:{cport}"),
            "broker" => format!("PLAINTEXT://127.0.0.1:{port}"),
            _ => format!("PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}"),
        };
        let mut props: Vec<(String, String)> = vec![
            ("node.id".into(), i.to_string()),
            ("process.roles".into(), role.into()),
            ("listeners".into(), listeners),
            ("controller.listener.names".into(), "CONTROLLER".into()),
            ("controller.quorum.voters".into(), self.voters.clone()),
            ("broker.session.timeout.ms".into(), "3000".into()),
            ("broker.heartbeat.interval.ms".into(), "500".into()),
        ];
        for (k, v) in &self.extra {
            props.retain(|(pk, _)| pk != k);
            props.push((k.clone(), v.clone()));
        }
        let extra_args = props
            .iter()
            .flat_map(|(k, v)| ["--override".to_string(), format!("{k}={v}")])
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let mut b = Broker::unstarted(dir, port, free_port(), 1, extra_args);
        // A controller-only node ignores the --listen every Broker gets: it has no Kafka
        // listener.
        b.spawn();
        b
    }

    /// Commissions a new broker-only node (the next node id) into the running cluster.
    pub fn add_broker(&mut self) -> usize {
        let i = self.nodes.len();
        let mut b = self.spawn_node(i, "broker", free_port(), free_port());
        b.wait_listening();
        self.nodes.push(b);
        i
    }

    pub fn node(&self, i: usize) -> &Broker {
        &self.nodes[i]
    }

    /// Every node's Kafka address, comma separated.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|b| b.bootstrap())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill9();
    }

    /// SIGTERM node `i` and wait for it to exit (a controlled shutdown); true if it exited 0.
    pub fn stop(&mut self, i: usize) -> bool {
        self.nodes[i].stop()
    }

    /// Restarts a stopped node on its ports and data dir; waits until it serves clients.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
    }

    /// Restarts every stopped node at once (a quorum needs a majority before anyone serves).
    pub fn restart_all(&mut self) {
        for b in &mut self.nodes {
            if !b.is_running() {
                b.spawn();
            }
        }
        for b in &mut self.nodes {
            b.wait_listening();
        }
    }

    /// Every node's log, labelled.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, b)| format!("===== node {i} =====\n{}", b.log()))
            .collect()
    }
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    /// The kernel hands a released port out again at random: 3,000 ports from bind(0) on a
    /// 28k-port range repeat about 150 times. `free_port` must not.
    #[test]
    fn free_port_never_repeats_a_port() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3000 {
            let p = free_port();
            assert!(seen.insert(p), "port {p} given out twice");
        }
    }

    /// A port that something else listens on (here an HTTP-like server that hangs up) does not
    /// pass for a started broker.
    #[test]
    fn a_foreign_listener_is_not_a_started_broker() {
        let port = free_port();
        let squatter = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut b = Broker::unstarted(dir, port, free_port(), 1, Vec::new());
        b.spawn();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.wait_listening()));
        let msg = r.expect_err("wait_listening took a foreign listener for the broker");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("address in use"), "{msg}");
        drop(squatter);
    }
}
