//! Starting and stopping the broker.
//!
//! The main thread locks the data directory (`<data-dir>/.lock`, like Kafka's) and the listen
//! address, so a second broker on the same directory or port fails at once. It then starts one
//! pinned glommio executor per shard, joined into a channel mesh; each opens the partitions it
//! owns. Only when every shard has opened them do the shards bind the port (SO_REUSEPORT, so
//! the kernel spreads connections over them): no client reaches a shard before the partitions
//! it routes to exist.
//!
//! On SIGINT/SIGTERM every shard stops accepting, answers what it already read (long polls
//! return at once), waits for the other shards to do the same, then syncs and closes its logs.
//! The main thread writes the clean-shutdown marker once every shard closed cleanly. The whole
//! shutdown is bounded by [`SHUTDOWN_TIMEOUT`]: past it the process logs what each shard is
//! still doing and exits non-zero without the marker, so the next start recovers.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};

use crate::cluster::metadata::{self, Image};
use crate::config::Config;
use crate::shard::{self, Shard, ShardMsg, PEER_OPS_MAX};
use crate::storage::log::IoResult;

pub const CLEAN_SHUTDOWN_MARKER: &str = ".weir_clean_shutdown";
/// The file in the data directory a broker holds an exclusive flock on while it runs.
pub const LOCK_FILE: &str = ".lock";
/// From SIGTERM to exit, at most; past it the process exits non-zero without the marker.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a shard waits for its connections to answer what they read and close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// From the start of shutdown, how long a shard waits for the others to drain before it
/// closes its logs anyway (and the shutdown counts as unclean).
const PEERS_DRAINED_TIMEOUT: Duration = Duration::from_secs(8);
/// A killed broker's listening sockets can outlive it for a moment (its io_uring is torn down
/// asynchronously); a start waits this long for them to go before reporting the address in
/// use.
const BIND_RETRY: Duration = Duration::from_secs(3);
/// Messages queued per pair of shards before a sender waits.
const MESH_CHANNEL_CAPACITY: usize = 1024;
/// glommio's default io_memory per executor, registered with io_uring when the memlock limit
/// allows.
const IO_MEMORY_BYTES: usize = 10 << 20;
/// Rings per executor that register the io memory (main, latency and poll ring).
const RINGS_PER_EXECUTOR: usize = 3;

/// Decides how much io memory each executor registers, raising RLIMIT_MEMLOCK when allowed.
/// Registration is an optimisation: without it glommio uses ordinary buffers.
fn plan_io_memory(shards: usize) -> usize {
    let need = (IO_MEMORY_BYTES * RINGS_PER_EXECUTOR * shards) as u64 + (1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return IO_MEMORY_BYTES;
    }
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < need {
        let raised = libc::rlimit {
            rlim_cur: need,
            rlim_max: lim.rlim_max.max(need),
        };
        let capped = libc::rlimit {
            rlim_cur: lim.rlim_max.min(need),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct; failure leaves the limit unchanged.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
            tracing::info!(
                from = lim.rlim_cur,
                to = need,
                "raised RLIMIT_MEMLOCK for io_uring buffer registration"
            );
            return IO_MEMORY_BYTES;
        }
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &capped) };
        let have = lim.rlim_max.min(need).max(lim.rlim_cur);
        let per = (have.saturating_sub(1 << 20) / (RINGS_PER_EXECUTOR * shards) as u64) as usize
            / 4096
            * 4096;
        tracing::warn!(
            memlock_bytes = have,
            needed_bytes = need,
            "ulimit -l is too low to register {} MiB of io_uring buffers per shard; registering {} KiB instead \
             (raise it with `ulimit -l {}` for full speed)",
            IO_MEMORY_BYTES >> 20,
            per >> 10,
            need / 1024
        );
        return per.max(64 << 10);
    }
    IO_MEMORY_BYTES
}

fn cpus(shards: usize) -> Vec<usize> {
    let ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    if ids.is_empty() {
        return (0..shards).collect();
    }
    (0..shards).map(|i| ids[i % ids.len()]).collect()
}

/// Takes an exclusive, non-blocking flock on `<dir>/.lock`, held until the process exits, so
/// two brokers never write one data directory.
fn lock_data_dir(dir: &Path) -> Result<()> {
    use std::io::Write;
    static LOCK: OnceLock<std::fs::File> = OnceLock::new();
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "data dir {} is locked by another broker (pid {}): {} is held",
                dir.display(),
                holder.trim(),
                path.display()
            );
        }
        return Err(e).with_context(|| format!("locking {}", path.display()));
    }
    // The pid is for people reading the file; the lock itself is the flock.
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    LOCK.set(file)
        .map_err(|_| anyhow::anyhow!("the data dir is locked twice in one process"))?;
    Ok(())
}

/// Whether a TCP socket listens on an address overlapping `addr` (same port; same IP or
/// either one the wildcard), from the kernel's socket tables. Unlike a test bind, this ignores
/// the TIME_WAIT connections a previous broker on the port leaves behind.
fn someone_listens_on(addr: std::net::SocketAddr) -> std::io::Result<bool> {
    use std::net::IpAddr;
    let parse_ip = |hex: &str| -> Option<IpAddr> {
        // Each 32-bit word is printed as the native-endian value of network-order bytes.
        let words: Vec<[u8; 4]> = (0..hex.len() / 8)
            .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).map(u32::to_ne_bytes))
            .collect::<std::result::Result<_, _>>()
            .ok()?;
        match words.len() {
            1 => Some(IpAddr::from(words[0])),
            4 => {
                let mut b = [0u8; 16];
                for (i, w) in words.iter().enumerate() {
                    b[i * 4..i * 4 + 4].copy_from_slice(w);
                }
                Some(IpAddr::from(b))
            }
            _ => None,
        }
    };
    let overlaps = |ip: IpAddr| {
        let mapped = |ip: IpAddr| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let (ip, ours) = (mapped(ip), mapped(addr.ip()));
        ip == ours
            || (ip.is_unspecified() && (ip.is_ipv6() || ours.is_ipv4()))
            || (ours.is_unspecified() && (ours.is_ipv6() || ip.is_ipv4()))
    };
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace().skip(1);
            let (Some(local), Some(_remote), Some(state)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            const TCP_LISTEN: &str = "0A";
            if state != TCP_LISTEN {
                continue;
            }
            let Some((ip, port)) = local.split_once(':') else {
                continue;
            };
            if u16::from_str_radix(port, 16).ok() != Some(addr.port()) {
                continue;
            }
            if parse_ip(ip).is_some_and(overlaps) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn address_in_use(addr: std::net::SocketAddr, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!("binding {addr}: address in use (another process listens there)")
    } else {
        anyhow::Error::new(e).context(format!("binding {addr}"))
    }
}

/// Makes sure no other broker uses the listen address, for the life of the process.
///
/// The shards bind with SO_REUSEPORT (glommio always sets it, and it lets the kernel spread
/// connections over them), which would let any other process of the same user join the port
/// and take part of its connections. So first this process takes a lock named after the
/// address: an abstract unix socket, which exactly one process can bind and which the kernel
/// releases when the process exits. Then it checks that no socket listens there yet (retried
/// for [`BIND_RETRY`], as the sockets of a broker just killed can linger).
fn lock_listen_address(addr: std::net::SocketAddr) -> Result<()> {
    static LOCK: OnceLock<OwnedFd> = OnceLock::new();
    let name = format!("weir-broker-listen-{addr}");
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("creating the listen-address lock");
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zeroed is a valid empty address.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    anyhow::ensure!(name.len() < sa.sun_path.len(), "listen address too long");
    // sun_path[0] stays 0: an abstract name, no file.
    for (dst, src) in sa.sun_path[1..].iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    // SAFETY: bind reads `len` bytes of `sa`, which lives for the call.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::AddrInUse {
            bail!("binding {addr}: address in use (another Weir broker listens there)");
        }
        return Err(e).context("taking the listen-address lock");
    }
    LOCK.set(fd)
        .map_err(|_| anyhow::anyhow!("the listen address is locked twice in one process"))?;

    let deadline = Instant::now() + BIND_RETRY;
    let mut said = false;
    while someone_listens_on(addr).context("reading the kernel's TCP socket tables")? {
        if Instant::now() >= deadline {
            return Err(address_in_use(addr, std::io::ErrorKind::AddrInUse.into()));
        }
        if !said {
            tracing::warn!(%addr, "address in use; retrying for up to {BIND_RETRY:?}");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// What a shard is doing, for the main thread's report when shutdown overruns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Opening = 0,
    Ready,
    Serving,
    Draining,
    WaitingForShards,
    ClosingLogs,
    Closed,
}

impl Phase {
    fn describe(v: u8) -> &'static str {
        match v {
            0 => "opening its partitions",
            1 => "waiting for the other shards to open theirs",
            2 => "serving",
            3 => "answering in-flight requests",
            4 => "waiting for the other shards to answer theirs",
            5 => "syncing and closing its logs",
            _ => "closed, tearing down its executor",
        }
    }
}

/// State the main thread and the shards share over the process's lifetime.
struct Lifecycle {
    stop: Arc<AtomicBool>,
    /// Shards that opened their partitions.
    ready: AtomicUsize,
    /// Shards whose connections are drained (or timed out).
    drained: AtomicUsize,
    phases: Vec<AtomicU8>,
    /// Connections each shard had open at its last look, for the overrun report.
    connections: Vec<AtomicUsize>,
}

impl Lifecycle {
    fn set_phase(&self, shard: usize, phase: Phase) {
        self.phases[shard].store(phase as u8, Ordering::SeqCst);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// One line per shard: what it is doing.
    fn report(&self, finished: &[bool]) -> String {
        (0..self.phases.len())
            .filter(|i| !finished[*i])
            .map(|i| {
                let phase = self.phases[i].load(Ordering::SeqCst);
                let mut line = format!("shard {i}: {}", Phase::describe(phase));
                if phase == Phase::Draining as u8 {
                    line += &format!(
                        ", {} connections still open",
                        self.connections[i].load(Ordering::SeqCst)
                    );
                }
                line
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

pub fn run(config: Config) -> Result<()> {
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    lock_data_dir(&config.data_dir)?;
    if config.in_cluster() && !config.cluster.roles_broker {
        return run_controller_only(config);
    }
    lock_listen_address(config.listen)?;
    let wanted_id = config
        .in_cluster()
        .then(|| metadata::cluster_id_of_voters(&config.cluster.voters));
    let cluster_id = Arc::new(metadata::cluster_id(
        &config.data_dir,
        config.node_id,
        wanted_id.as_deref(),
    )?);
    let fresh = !config.data_dir.join(metadata::METADATA_FILE).exists();
    let mut image = metadata::load(&config.data_dir, config.shards)?;
    let cluster = if config.in_cluster() {
        Some(start_cluster(&config, &mut image)?)
    } else {
        None
    };
    // The internal topics of committed offsets and group metadata, and of transactions. Never
    // deleted by retention: they hold the only copy of that state.
    for (name, count, segment_bytes) in [
        (
            crate::group::OFFSETS_TOPIC,
            config.group.offsets_partitions,
            config.group.offsets_segment_bytes,
        ),
        (
            crate::txn::TXN_TOPIC,
            config.txn.partitions,
            config.txn.segment_bytes,
        ),
    ] {
        if cluster.is_some() || image.topics.contains_key(name) {
            continue;
        }
        let partitions = metadata::assign_shards(&mut image, count as usize, config.shards);
        let mut configs = std::collections::BTreeMap::new();
        configs.insert("retention.ms".to_string(), "-1".to_string());
        configs.insert("segment.bytes".to_string(), segment_bytes.to_string());
        // Compacted: the cleaner keeps the latest record per key (offsets, groups, transactions).
        configs.insert("cleanup.policy".to_string(), "compact".to_string());
        image.topics.insert(
            name.to_string(),
            metadata::TopicMeta {
                id: uuid::Uuid::new_v4(),
                partitions,
                configs,
                internal: true,
            },
        );
        image.version += 1;
        image.single_node(&config);
        metadata::store(&config.data_dir, &image)?;
    }
    if cluster.is_none() {
        image.single_node(&config);
    }
    let image: Arc<Image> = Arc::new(image);
    let marker = config.data_dir.join(CLEAN_SHUTDOWN_MARKER);
    let clean = marker.exists();
    if clean {
        std::fs::remove_file(&marker)?;
        std::fs::File::open(&config.data_dir)?.sync_all()?;
    } else if !fresh {
        tracing::warn!("no clean-shutdown marker: recovering the tail of every active segment");
    }

    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;

    let metrics = crate::metrics::BrokerMetrics::new(config.node_id, config.shards);
    if let Some(addr) = config.metrics_listen {
        match crate::metrics::exposition::serve(addr, metrics.clone()) {
            Ok(bound) => tracing::info!(listen = %bound, "metrics endpoint: GET /metrics"),
            // The broker serves Kafka clients without it; say so loudly.
            Err(e) => tracing::warn!(
                listen = %addr,
                "metrics endpoint not started (weir.metrics.listen / --metrics-listen): {e}"
            ),
        }
    }
    let io_memory = plan_io_memory(config.shards);
    let mesh: MeshBuilder<ShardMsg, _> = MeshBuilder::full(config.shards, MESH_CHANNEL_CAPACITY);
    // The produce lane: appends from another shard, handled one at a time in arrival order.
    let produce_mesh: MeshBuilder<ShardMsg, _> =
        MeshBuilder::full(config.shards, MESH_CHANNEL_CAPACITY);
    let life = Arc::new(Lifecycle {
        stop: stop.clone(),
        ready: AtomicUsize::new(0),
        drained: AtomicUsize::new(0),
        phases: (0..config.shards).map(|_| AtomicU8::new(0)).collect(),
        connections: (0..config.shards).map(|_| AtomicUsize::new(0)).collect(),
    });
    // Each shard thread is joined by a watcher that reports here, so the main thread can wait
    // for all of them with a deadline.
    let (exited_tx, exited) = mpsc::channel::<(usize, Result<()>)>();
    for (i, cpu) in cpus(config.shards).into_iter().enumerate() {
        let produce_mesh = produce_mesh.clone();
        let (config, cluster_id, image, mesh, life, metrics) = (
            config.clone(),
            cluster_id.clone(),
            image.clone(),
            mesh.clone(),
            life.clone(),
            metrics.clone(),
        );
        let mut builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("weir-shard-{i}"))
            .io_memory(io_memory);
        // For benchmarks only: shards poll this long before parking (REPORT.md, session 13:
        // +9% on the canonical run, +25% broker CPU per record side by side; off by default).
        if let Some(us) = std::env::var("WEIR_SPIN_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            builder = builder.spin_before_park(std::time::Duration::from_micros(us));
        }
        let h = builder
            .spawn(move || async move {
                shard_main(
                    config,
                    cluster_id,
                    image,
                    (mesh, produce_mesh),
                    clean,
                    life,
                    metrics,
                )
                .await
            })
            .io()
            .with_context(|| format!("starting shard {i} on cpu {cpu}"))?;
        let tx = exited_tx.clone();
        std::thread::Builder::new()
            .name(format!("weir-join-{i}"))
            .spawn(move || {
                let r = match h.join() {
                    Ok(r) => r,
                    Err(e) => Err(anyhow::anyhow!("shard thread failed: {e}")),
                };
                let _ = tx.send((i, r));
            })
            .context("starting a shard watcher thread")?;
    }
    drop(exited_tx);

    let count = config.shards;
    let mut finished = vec![false; count];
    let mut first_error: Option<anyhow::Error> = None;
    let mut record = |(i, r): (usize, Result<()>), finished: &mut Vec<bool>| {
        finished[i] = true;
        if let Err(e) = r {
            tracing::error!(shard = i, "shard stopped with an error: {e:#}");
            first_error.get_or_insert(e);
        }
    };

    while !life.stopping() {
        if let Ok(x) = exited.recv_timeout(Duration::from_millis(50)) {
            record(x, &mut finished);
            // A shard only ends on its own when it failed: stop the others.
            stop.store(true, Ordering::SeqCst);
        }
    }
    tracing::info!("shutting down");
    if let Some(agent) = crate::cluster::agent::agent() {
        // Controlled shutdown: leaderships move off this broker while its shards drain.
        let wait = Duration::from_millis(config.cluster.session_timeout_ms)
            .min(CONTROLLED_SHUTDOWN_TIMEOUT);
        if agent.controlled_shutdown(wait) {
            tracing::info!("controlled shutdown: the controller moved this broker's leaderships");
        } else {
            tracing::warn!("controlled shutdown: no answer from the controller within {wait:?}");
        }
    }
    let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
    while finished.iter().any(|f| !f) {
        match exited.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(x) => record(x, &mut finished),
            Err(_) => {
                tracing::error!(
                    "shutdown did not finish within {SHUTDOWN_TIMEOUT:?}: {}; exiting without \
                     the clean-shutdown marker (the next start recovers the logs)",
                    life.report(&finished)
                );
                // SAFETY: _exit ends the process at once; shard threads may still hold locks
                // that an orderly exit would wait for.
                unsafe { libc::_exit(2) }
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e.context("unclean shutdown: the next start will recover the logs"));
    }
    if let Some((agent, quorum)) = cluster {
        drop(agent);
        if let Some(q) = quorum {
            q.shutdown();
        }
    }
    write_marker(&config.data_dir)?;
    tracing::info!("clean shutdown complete");
    Ok(())
}

/// A controller-only node (`process.roles=controller`): a quorum voter and, when elected, the
/// active controller; no Kafka listener, no partitions. Runs until SIGINT or SIGTERM.
fn run_controller_only(config: Arc<Config>) -> Result<()> {
    use crate::cluster::quorum::{metadata_dir, Quorum, QuorumConfig};
    let wanted = metadata::cluster_id_of_voters(&config.cluster.voters);
    metadata::cluster_id(&config.data_dir, config.node_id, Some(&wanted))?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let mut qc = QuorumConfig::new(
        config.node_id as u64,
        config.cluster.voters.clone(),
        metadata_dir(&config.data_dir),
    );
    if let Some(l) = config.cluster.controller_listen {
        qc.listen = l;
    }
    let q = Quorum::start(qc).context("starting the controller quorum")?;
    crate::cluster::active::Active::new(config.clone(), q.handle()).install();
    tracing::info!(
        listen = ?config.cluster.controller_listen,
        "controller-only node running"
    );
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("shutting down");
    q.shutdown();
    tracing::info!("clean shutdown complete");
    Ok(())
}

/// How often a broker waiting for the cluster's metadata says so.
const CATCH_UP_WARN_EVERY: Duration = Duration::from_secs(10);

/// Bound on waiting for the controller to move leaderships at SIGTERM.
const CONTROLLED_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts this node's part of a cluster: its controller quorum voter (with the controller
/// role) and its cluster agent. The stored image's leaderships are forgotten: the broker leads
/// nothing until the controller's current image says so.
fn start_cluster(
    config: &Arc<Config>,
    image: &mut Image,
) -> Result<(
    crate::cluster::agent::Agent,
    Option<crate::cluster::quorum::Quorum>,
)> {
    use crate::cluster::quorum::{metadata_dir, Quorum, QuorumConfig};
    let qdir = metadata_dir(&config.data_dir);
    let user_topics = image
        .topics
        .keys()
        .any(|t| t != crate::group::OFFSETS_TOPIC);
    if user_topics && config.cluster.roles_controller && !qdir.exists() {
        // Never a cluster member before, yet it holds topics: a single node's data dir. Its
        // topics are in no cluster's metadata, and following the cluster would delete them.
        anyhow::bail!(
            "{} holds a single broker's topics; a cluster broker needs a data dir of its own",
            config.data_dir.display()
        );
    }
    image.forget_leaders();
    let quorum = if config.cluster.roles_controller {
        let mut qc = QuorumConfig::new(config.node_id as u64, config.cluster.voters.clone(), qdir);
        if let Some(l) = config.cluster.controller_listen {
            qc.listen = l;
        }
        let q = Quorum::start(qc).context("starting the controller quorum")?;
        crate::cluster::active::Active::new(config.clone(), q.handle()).install();
        Some(q)
    } else {
        None
    };
    let agent = crate::cluster::agent::start(config.clone(), quorum.as_ref().map(|q| q.handle()))?;
    Ok((agent, quorum))
}

fn write_marker(dir: &Path) -> Result<()> {
    std::fs::write(dir.join(CLEAN_SHUTDOWN_MARKER), b"")?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Counts its shard as drained once, when told or when dropped (a shard that fails early).
struct Drained {
    life: Arc<Lifecycle>,
    counted: bool,
}

impl Drained {
    fn count(&mut self) {
        if !std::mem::replace(&mut self.counted, true) {
            self.life.drained.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        self.count();
    }
}

async fn shard_main(
    config: Arc<Config>,
    cluster_id: Arc<String>,
    image: Arc<Image>,
    (mesh, produce_mesh): (
        MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
        MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    ),
    clean: bool,
    life: Arc<Lifecycle>,
    metrics: Arc<crate::metrics::BrokerMetrics>,
) -> Result<()> {
    let (senders, mut receivers) = mesh
        .join()
        .await
        .map_err(|e| anyhow::anyhow!("joining the shard mesh: {e}"))?;
    let (produce_senders, mut produce_receivers) = produce_mesh
        .join()
        .await
        .map_err(|e| anyhow::anyhow!("joining the shard produce lane: {e}"))?;
    let id = senders.peer_id();
    assert_eq!(produce_senders.peer_id(), id);
    crate::metrics::install(metrics, id);
    let count = config.shards;
    life.set_phase(id, Phase::Opening);
    // However this shard ends, it counts as drained, so the others do not wait for it.
    let mut drained = Drained {
        life: life.clone(),
        counted: false,
    };
    crate::storage::log::prime_dma(&config.data_dir, &format!(".probe-{id}")).await?;
    let s: Rc<Shard> = Shard::install(
        id,
        count,
        config.clone(),
        cluster_id,
        image.clone(),
        senders,
        produce_senders,
    );

    for (peer, rx) in receivers.streams() {
        let ops = Rc::new(glommio::sync::Semaphore::new(PEER_OPS_MAX));
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                let Ok(permit) = ops.acquire_static_permit(1).await else {
                    break;
                };
                shard::shard().count_remote_in();
                glommio::spawn_local(async move {
                    shard::handle_msg_guarded(msg).await;
                    drop(permit);
                })
                .detach();
            }
            tracing::debug!(peer, "peer channel closed");
        })
        .detach();
    }
    // Appends from a peer shard, one message at a time: a connection on the peer does not wait
    // for its appends here before reading its next request, so the order they are handled in
    // is the order the connection read them (one channel per shard pair is FIFO). Only the
    // append runs in this loop; the durability wait and the reply's delivery are spawned.
    for (peer, rx) in produce_receivers.streams() {
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                shard::shard().count_remote_in();
                shard::handle_msg_guarded(msg).await;
            }
            tracing::debug!(peer, "peer produce lane closed");
        })
        .detach();
    }

    s.apply_image(image, clean)
        .await
        .with_context(|| format!("shard {id}: opening partitions"))?;
    tracing::info!(
        shard = id,
        partitions = s.partition_count(),
        "partitions open"
    );
    glommio::spawn_local(s.clone().flusher()).detach();
    glommio::spawn_local(s.clone().group_ticker()).detach();
    if config.in_cluster() && id == crate::cluster::controller::CONTROLLER_SHARD {
        glommio::spawn_local(crate::cluster::controller::follow_cluster(s.clone())).detach();
        glommio::spawn_local(crate::replication::fetcher::supervise(s.clone())).detach();
    }
    if config.in_cluster() {
        glommio::spawn_local(crate::replication::isr_ticker(s.clone())).detach();
        glommio::spawn_local(crate::replication::checkpoint::checkpointer(s.clone())).detach();
    }
    glommio::spawn_local(s.clone().retention()).detach();
    glommio::spawn_local(s.clone().metrics_sampler()).detach();
    glommio::spawn_local(crate::txn::ticker(s.clone())).detach();
    glommio::spawn_local(s.clone().cleaner()).detach();

    // Bind the port only when every shard has opened its partitions: a connection may route
    // to any of them.
    life.set_phase(id, Phase::Ready);
    life.ready.fetch_add(1, Ordering::SeqCst);
    while life.ready.load(Ordering::SeqCst) < count && !life.stopping() {
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    // In a cluster, clients are served once this broker follows the cluster's metadata and the
    // controller has unfenced it, as a Kafka broker waits for its initial catch-up and unfence:
    // before that it would answer Metadata without itself and lead nothing.
    let mut waiting_since = Instant::now();
    while config.in_cluster()
        && !life.stopping()
        && !s
            .image()
            .brokers
            .get(&config.node_id)
            .is_some_and(|b| !b.fenced)
    {
        if waiting_since.elapsed() > CATCH_UP_WARN_EVERY {
            tracing::warn!(
                shard = id,
                "waiting for the controller quorum's metadata before serving clients (is a majority of controller.quorum.voters up?)"
            );
            waiting_since = Instant::now();
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if !life.stopping() {
        let listener = glommio::net::TcpListener::bind(config.listen)
            .io()
            .map_err(|e| address_in_use(config.listen, e))?;
        tracing::info!(shard = id, listen = %config.listen, "accepting connections");
        glommio::spawn_local(crate::net::accept_loop(listener)).detach();
        life.set_phase(id, Phase::Serving);
        while !life.stopping() {
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
    }

    let started = Instant::now();
    life.set_phase(id, Phase::Draining);
    tracing::info!(
        shard = id,
        connections = crate::net::open_connections(),
        "shutting down: answering in-flight requests"
    );
    s.shutting_down.set(true);
    s.stopped.notify(usize::MAX);
    let mut clean_stop = true;
    while crate::net::open_connections() > 0 && started.elapsed() < DRAIN_TIMEOUT {
        life.connections[id].store(crate::net::open_connections(), Ordering::SeqCst);
        crate::net::drain(Duration::from_millis(20)).await;
    }
    let open = crate::net::open_connections();
    life.connections[id].store(open, Ordering::SeqCst);
    if open > 0 {
        tracing::warn!(
            shard = id,
            connections = open,
            "connections still open after {DRAIN_TIMEOUT:?}; closing the logs anyway"
        );
        clean_stop = false;
    }
    // Every shard must finish its requests before any closes its logs: a request read on one
    // shard may append on another.
    life.set_phase(id, Phase::WaitingForShards);
    drained.count();
    while life.drained.load(Ordering::SeqCst) < count {
        if started.elapsed() >= PEERS_DRAINED_TIMEOUT {
            tracing::warn!(
                shard = id,
                "other shards still answering requests after {PEERS_DRAINED_TIMEOUT:?}; closing the logs anyway"
            );
            clean_stop = false;
            break;
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    life.set_phase(id, Phase::ClosingLogs);
    let closed = s.close_all().await;
    tracing::info!("{}", s.stats_line());
    life.set_phase(id, Phase::Closed);
    closed?;
    if !clean_stop {
        bail!("shard {id}: requests were still in flight when the logs were closed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_listeners_on_overlapping_addresses_only() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let at = |s: &str| someone_listens_on(s.parse().unwrap()).unwrap();
        assert!(at(&format!("127.0.0.1:{port}")));
        assert!(at(&format!("0.0.0.0:{port}")));
        assert!(at(&format!("[::]:{port}")));
        assert!(!at(&format!("127.0.0.2:{port}")));
        // A connected socket is not a listener.
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let client_port = c.local_addr().unwrap().port();
        assert!(!at(&format!("127.0.0.1:{client_port}")));
        drop(l);
        assert!(!at(&format!("127.0.0.1:{port}")));
    }
}
