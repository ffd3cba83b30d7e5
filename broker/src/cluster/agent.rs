//! The broker's side of the cluster: registration, heartbeats, requests forwarded to the
//! active controller, and the metadata image this broker follows. It runs on its own thread
//! (`cluster-agent`, a tokio current-thread runtime), so heartbeats go out on time whatever the
//! shards are doing. Shards talk to it through [`AgentHandle`] (tokio channels, which need no
//! tokio runtime on the caller's side).
//!
//! How a broker learns of a change: a voter watches its own quorum's committed image; a broker
//! that is not a voter sees a newer version in a heartbeat answer and fetches the image from
//! the active controller. Either way the image lands in a watch channel that shard 0 follows
//! (`controller::follow_cluster`), turning it into the shards' `Image`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::quorum::network::ControllerClient;
use super::quorum::{ClusterImage, QuorumHandle};
use super::rpc::{Request, Response};
use crate::config::Config;

/// Requests queued for the agent, and forwarded at once.
const CALLS_MAX: usize = 64;
/// One controller request (after which the agent tries another voter).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before asking again when no voter knows the active controller.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What this broker knows of the cluster.
#[derive(Clone, Debug, Default)]
pub struct BrokerView {
    pub image: Arc<ClusterImage>,
    /// The active controller's node id, or -1.
    pub controller: i32,
}

#[derive(Clone)]
pub struct AgentHandle {
    calls: mpsc::Sender<(Request, Instant, oneshot::Sender<Result<Response, String>>)>,
    view: watch::Receiver<Arc<BrokerView>>,
    shutdown: mpsc::Sender<oneshot::Sender<()>>,
    /// The metadata version the shards have applied (set by shard 0, sent in heartbeats).
    applied: Arc<AtomicU64>,
}

static AGENT: OnceLock<AgentHandle> = OnceLock::new();

/// This process's agent, when it runs in a cluster.
pub fn agent() -> Option<&'static AgentHandle> {
    AGENT.get()
}

impl AgentHandle {
    /// Asks the active controller, whichever voter that is, retrying until `deadline`.
    pub async fn ask(&self, req: Request, deadline: Instant) -> Result<Response, String> {
        let (tx, rx) = oneshot::channel();
        self.calls
            .send((req, deadline, tx))
            .await
            .map_err(|_| "the cluster agent has stopped".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("the cluster agent has stopped".into()))
    }

    pub fn watch_view(&self) -> watch::Receiver<Arc<BrokerView>> {
        self.view.clone()
    }

    /// The metadata version every shard of this broker has applied.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    pub fn set_applied(&self, version: u64) {
        self.applied.fetch_max(version, Ordering::SeqCst);
    }

    /// Controlled shutdown: asks the controller to fence this broker and move its
    /// leaderships, and stops heartbeating. Blocks up to `timeout` (call it off the shards).
    pub fn controlled_shutdown(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.shutdown.try_send(tx).is_err() {
            return false;
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(rx.blocking_recv().is_ok());
        });
        done_rx.recv_timeout(timeout).unwrap_or(false)
    }
}

/// The running agent thread; stops when dropped.
pub struct Agent {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the agent (once per process) and installs its handle.
pub fn start(cfg: Arc<Config>, quorum: Option<QuorumHandle>) -> anyhow::Result<Agent> {
    let (calls_tx, calls_rx) = mpsc::channel(CALLS_MAX);
    let (shutdown_tx, shutdown_rx) = mpsc::channel(1);
    let initial = Arc::new(BrokerView {
        image: quorum.as_ref().map(|q| q.image()).unwrap_or_default(),
        controller: -1,
    });
    let (view_tx, view_rx) = watch::channel(initial);
    let applied = Arc::new(AtomicU64::new(0));
    let handle = AgentHandle {
        calls: calls_tx,
        view: view_rx,
        shutdown: shutdown_tx,
        applied: applied.clone(),
    };
    AGENT
        .set(handle)
        .map_err(|_| anyhow::anyhow!("the cluster agent runs already"))?;
    let (stop_tx, stop_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("cluster-agent".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building the cluster agent's runtime");
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rt.block_on(async move {
                    tokio::select! {
                        _ = run(cfg, quorum, view_tx, calls_rx, shutdown_rx, applied) => {}
                        _ = stop_rx => {}
                    }
                })
            }));
            if ran.is_err() {
                // A broker whose agent died would keep serving stale leaderships and never
                // heartbeat: stop the process instead (a restart recovers).
                tracing::error!("the cluster agent panicked: aborting");
                std::process::abort();
            }
        })
        .context("starting the cluster agent")?;
    Ok(Agent {
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Which voter the agent believes is the active controller.
struct Voters {
    me: u64,
    cluster: String,
    addrs: BTreeMap<u64, SocketAddr>,
    guess: Mutex<Option<u64>>,
}

impl Voters {
    fn next_after(&self, id: u64) -> u64 {
        self.addrs
            .range(id.saturating_add(1)..)
            .next()
            .or_else(|| self.addrs.iter().next())
            .map(|(&i, _)| i)
            .expect("at least one voter")
    }

    /// Sends `req` to the active controller until one answers or `deadline` passes.
    async fn ask(
        &self,
        client: &mut ControllerClient,
        req: &Request,
        deadline: Instant,
    ) -> Result<Response, String> {
        let body = serde_json::to_value(req).map_err(|e| e.to_string())?;
        let first = if self.addrs.contains_key(&self.me) {
            self.me
        } else {
            *self.addrs.keys().next().expect("at least one voter")
        };
        let mut target = self.guess.lock().expect("guess lock").unwrap_or(first);
        let mut last_error = String::from("no voter answered");
        // Bounded by the deadline; each try by CALL_TIMEOUT.
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("no active controller answered: {last_error}"));
            }
            // Half of what is left at most, so a voter that does not answer (paused, or cut
            // off) leaves time to find the active controller among the others.
            let ttl = CALL_TIMEOUT.min((deadline - now) / 2).max(RETRY_PAUSE);
            let addr = self.addrs[&target];
            match client.call(target, addr, body.clone(), ttl).await {
                Ok(v) => match serde_json::from_value::<Response>(v) {
                    Ok(Response::NotController { leader: Some(l) })
                        if l != target && self.addrs.contains_key(&l) =>
                    {
                        target = l;
                        continue;
                    }
                    Ok(Response::NotController { .. }) => {
                        last_error = format!("voter {target} knows no active controller");
                    }
                    Ok(Response::Unavailable(why)) => {
                        last_error = format!("voter {target}: {why}");
                    }
                    Ok(r) => {
                        *self.guess.lock().expect("guess lock") = Some(target);
                        return Ok(r);
                    }
                    Err(e) => last_error = format!("voter {target} answered garbage: {e}"),
                },
                Err(e) => {
                    last_error = format!("voter {target} at {addr}: {e}");
                    // The next call starts elsewhere too.
                    let mut g = self.guess.lock().expect("guess lock");
                    if *g == Some(target) {
                        *g = None;
                    }
                }
            }
            target = self.next_after(target);
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

async fn run(
    cfg: Arc<Config>,
    quorum: Option<QuorumHandle>,
    view_tx: watch::Sender<Arc<BrokerView>>,
    mut calls_rx: mpsc::Receiver<(Request, Instant, oneshot::Sender<Result<Response, String>>)>,
    mut shutdown_rx: mpsc::Receiver<oneshot::Sender<()>>,
    applied: Arc<AtomicU64>,
) {
    let node = cfg.node_id;
    let voters = Arc::new(Voters {
        me: node as u64,
        cluster: "weir".into(),
        addrs: cfg.cluster.voters.clone(),
        guess: Mutex::new(None),
    });
    let view_tx = Arc::new(view_tx);

    // Forwarded requests: each in its own task, at most CALLS_MAX at once.
    let forwarder = {
        let voters = voters.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(CALLS_MAX));
            while let Some((req, deadline, reply)) = calls_rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let voters = voters.clone();
                tokio::spawn(async move {
                    let mut client = ControllerClient::new(voters.me, &voters.cluster);
                    let _ = reply.send(voters.ask(&mut client, &req, deadline).await);
                    drop(slot);
                });
            }
        })
    };

    // A voter follows its own quorum's committed image.
    let follower = quorum.map(|q| {
        let view_tx = view_tx.clone();
        tokio::spawn(async move {
            let mut rx = q.watch_image();
            loop {
                let image = rx.borrow_and_update().clone();
                view_tx.send_if_modified(|v| {
                    if v.image.version >= image.version {
                        return false;
                    }
                    *v = Arc::new(BrokerView {
                        image,
                        controller: v.controller,
                    });
                    true
                });
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
    });
    let is_voter = follower.is_some();

    let host = cfg.advertised_host.clone();
    let port = u16::try_from(cfg.advertised_port).unwrap_or(0);
    let incarnation = uuid::Uuid::new_v4();
    let interval = Duration::from_millis(cfg.cluster.heartbeat_interval_ms);
    let mut client = ControllerClient::new(node as u64, "weir");
    let mut epoch: Option<u64> = None;
    let mut shutdown_reply: Option<oneshot::Sender<()>> = None;
    let mut warned_at: Option<Instant> = None;
    loop {
        let deadline = Instant::now() + Duration::from_millis(cfg.cluster.session_timeout_ms);
        let result: Result<(), String> = async {
            let e = match epoch {
                Some(e) => e,
                None => {
                    let req = Request::Register {
                        node_id: node,
                        host: host.clone(),
                        port,
                        rack: cfg.cluster.rack.clone(),
                        incarnation,
                    };
                    match voters.ask(&mut client, &req, deadline).await? {
                        Response::Registered { epoch: e } => {
                            tracing::info!(node, epoch = e, "registered with the controller");
                            epoch = Some(e);
                            e
                        }
                        other => return Err(format!("unexpected answer to Register: {other:?}")),
                    }
                }
            };
            let req = Request::Heartbeat {
                node_id: node,
                epoch: e,
                applied_version: applied.load(Ordering::SeqCst),
                want_shutdown: shutdown_reply.is_some(),
            };
            match voters.ask(&mut client, &req, deadline).await? {
                Response::UnknownBroker => {
                    tracing::warn!(
                        node,
                        "the controller does not know this registration: registering again"
                    );
                    epoch = None;
                }
                Response::Beat {
                    version,
                    controller,
                    shutdown_ready,
                    ..
                } => {
                    let controller = controller as i32;
                    let stale = view_tx.borrow().image.version < version;
                    if stale && !is_voter {
                        if let Response::Image(image) = voters
                            .ask(&mut client, &Request::GetImage, deadline)
                            .await?
                        {
                            let image = Arc::new(image);
                            view_tx
                                .send_modify(|v| *v = Arc::new(BrokerView { image, controller }));
                        }
                    }
                    view_tx.send_if_modified(|v| {
                        if v.controller == controller {
                            return false;
                        }
                        *v = Arc::new(BrokerView {
                            image: v.image.clone(),
                            controller,
                        });
                        true
                    });
                    if shutdown_ready {
                        if let Some(r) = shutdown_reply.take() {
                            let _ = r.send(());
                        }
                    }
                }
                other => return Err(format!("unexpected answer to Heartbeat: {other:?}")),
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // One WARN per session timeout at most; the agent keeps trying.
            if warned_at
                .is_none_or(|t| t.elapsed() > Duration::from_millis(cfg.cluster.session_timeout_ms))
            {
                tracing::warn!(node, "cluster heartbeat: {e}");
                warned_at = Some(Instant::now());
            }
        }
        if shutdown_reply.is_some() {
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        }
        tokio::select! {
            r = shutdown_rx.recv() => {
                match r {
                    Some(reply) => shutdown_reply = Some(reply),
                    None => break,
                }
            }
            _ = tokio::time::sleep(interval) => {}
        }
    }
    forwarder.abort();
    if let Some(f) = follower {
        f.abort();
    }
}
