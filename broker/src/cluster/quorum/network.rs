//! Voter-to-voter RPC over TCP on the controller listener.
//!
//! ```text
//! frame    = u32 BE length | JSON   (length <= FRAME_BYTES_MAX, checked before any allocation)
//! request  = {"cluster": name, "from": id, "to": id, "rpc": AppendEntries | Vote | InstallSnapshot}
//! response = {"AppendEntries": Result} | {"Vote": Result} | {"InstallSnapshot": Result}
//!          | {"Refused": reason}        (wrong cluster name or node id: the connection closes)
//! ```
//!
//! A client keeps one connection per target and sends one request at a time (openraft runs
//! one replication stream per follower). Any I/O error or timeout drops the connection; the
//! next call reconnects. Connect failures are `Unreachable`, so openraft backs off before the
//! next try. The server serves each connection in its own task, at most `CONNECTIONS_MAX` at a
//! time, reading a frame body within `FRAME_READ_TIMEOUT` of its header.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::RPCTypes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::{Node, NodeId, Raft, TypeConfig};

/// Bytes of one frame. An AppendEntries carries at most `max_payload_entries` entries of at
/// most `ENTRY_BYTES_MAX` each, and a snapshot chunk `snapshot_max_chunk_size` bytes (JSON
/// spells each byte as up to 4), both well inside this.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// Concurrent inbound connections (two peers need a handful: replication, votes, snapshots).
pub const CONNECTIONS_MAX: usize = 64;
const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Serialize, Deserialize)]
enum Rpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A broker's request to the controller (registration, heartbeat, a forwarded change):
    /// opaque here, answered by the [`Service`] the broker installed.
    Controller(serde_json::Value),
}

/// Answers brokers' controller requests (`from` is the asking node). Installed once the
/// broker's controller logic exists (`QuorumHandle::set_service`); until then such requests
/// are answered `Refused`, and the broker retries.
pub type Service = Arc<
    dyn Fn(
            NodeId,
            serde_json::Value,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = serde_json::Value> + Send>>
        + Send
        + Sync,
>;
pub type ServiceSlot = Arc<std::sync::OnceLock<Service>>;

#[derive(Serialize, Deserialize)]
struct Request {
    cluster: String,
    from: NodeId,
    to: NodeId,
    rpc: Rpc,
}

#[derive(Serialize, Deserialize)]
enum Response {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Controller(serde_json::Value),
    Refused(String),
}

async fn write_frame<T: Serialize>(s: &mut TcpStream, msg: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    if body.len() > FRAME_BYTES_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("frame of {} bytes exceeds {FRAME_BYTES_MAX}", body.len()),
        ));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    s.write_all(&buf).await
}

/// Reads one frame body after its 4-byte header: the length is checked before anything is
/// allocated, and the buffer grows only with bytes that arrived.
async fn read_body(s: &mut TcpStream, header: [u8; 4]) -> std::io::Result<Vec<u8>> {
    let len = u32::from_be_bytes(header) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {FRAME_BYTES_MAX}"),
        ));
    }
    let mut body = Vec::with_capacity(len.min(64 << 10));
    let n = (&mut *s).take(len as u64).read_to_end(&mut body).await?;
    if n != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "frame cut short",
        ));
    }
    Ok(body)
}

// ---- server ----

/// Accepts voter connections until the task is dropped (the quorum runtime shuts down).
pub(super) async fn serve(
    listener: TcpListener,
    raft: Raft,
    id: NodeId,
    cluster: Arc<str>,
    service: ServiceSlot,
) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(node = id, "controller listener accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(node = id, %peer, "refusing a controller connection: {CONNECTIONS_MAX} are open");
            continue;
        };
        let (raft, cluster, service) = (raft.clone(), cluster.clone(), service.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, raft, id, &cluster, &service).await {
                tracing::debug!(node = id, %peer, "controller connection closed: {e}");
            }
            drop(slot);
        });
    }
}

async fn serve_connection(
    mut s: TcpStream,
    raft: Raft,
    id: NodeId,
    cluster: &str,
    service: &ServiceSlot,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    loop {
        let mut header = [0u8; 4];
        match s.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let body = tokio::time::timeout(FRAME_READ_TIMEOUT, read_body(&mut s, header))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "frame body timed out")
            })??;
        let req: Request = serde_json::from_slice(&body)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if req.cluster != cluster || req.to != id {
            let why = format!(
                "request for node {} of cluster {:?} reached node {id} of cluster {cluster:?}",
                req.to, req.cluster
            );
            write_frame(&mut s, &Response::Refused(why.clone())).await?;
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
        }
        let resp = match req.rpc {
            Rpc::AppendEntries(r) => Response::AppendEntries(raft.append_entries(r).await),
            Rpc::Vote(r) => Response::Vote(raft.vote(r).await),
            Rpc::InstallSnapshot(r) => Response::InstallSnapshot(raft.install_snapshot(r).await),
            Rpc::Controller(body) => match service.get() {
                Some(f) => Response::Controller(f(req.from, body).await),
                None => Response::Refused("the controller service is starting".into()),
            },
        };
        write_frame(&mut s, &resp).await?;
    }
}

// ---- broker -> controller client ----

/// A broker's connection to one voter's controller listener, for controller requests. One
/// request at a time; any failure drops the connection and the next call reconnects.
pub struct ControllerClient {
    from: NodeId,
    cluster: Arc<str>,
    conn: Option<(NodeId, TcpStream)>,
}

impl ControllerClient {
    pub fn new(from: NodeId, cluster: &str) -> ControllerClient {
        ControllerClient {
            from,
            cluster: cluster.into(),
            conn: None,
        }
    }

    /// Sends `body` to voter `to` at `addr` and returns its answer, within `ttl`.
    pub async fn call(
        &mut self,
        to: NodeId,
        addr: SocketAddr,
        body: serde_json::Value,
        ttl: Duration,
    ) -> std::io::Result<serde_json::Value> {
        let r = tokio::time::timeout(ttl, self.exchange(to, addr, body))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "controller request timed out",
                ))
            });
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn exchange(
        &mut self,
        to: NodeId,
        addr: SocketAddr,
        body: serde_json::Value,
    ) -> std::io::Result<serde_json::Value> {
        if self.conn.as_ref().is_none_or(|(t, _)| *t != to) {
            let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
            s.set_nodelay(true)?;
            self.conn = Some((to, s));
        }
        let (_, s) = self.conn.as_mut().expect("connected above");
        let req = Request {
            cluster: self.cluster.to_string(),
            from: self.from,
            to,
            rpc: Rpc::Controller(body),
        };
        write_frame(s, &req).await?;
        let mut header = [0u8; 4];
        s.read_exact(&mut header).await?;
        let body = read_body(s, header).await?;
        let resp: Response = serde_json::from_slice(&body)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        match resp {
            Response::Controller(v) => Ok(v),
            Response::Refused(why) => Err(std::io::Error::other(why)),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "unexpected response to a controller request",
            )),
        }
    }
}

// ---- client ----

pub struct NetworkFactory {
    pub(super) id: NodeId,
    pub(super) cluster: Arc<str>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            id: self.id,
            cluster: self.cluster.clone(),
            target,
            addr: node.addr.clone(),
            conn: None,
        }
    }
}

pub struct PeerClient {
    id: NodeId,
    cluster: Arc<str>,
    target: NodeId,
    addr: String,
    conn: Option<TcpStream>,
}

enum CallError {
    Unreachable(std::io::Error),
    Network(std::io::Error),
    Timeout,
}

impl PeerClient {
    async fn connect(&mut self) -> Result<&mut TcpStream, CallError> {
        if self.conn.is_none() {
            let addr: SocketAddr = self.addr.parse().map_err(|e| {
                CallError::Unreachable(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{}: {e}", self.addr),
                ))
            })?;
            let s = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(CallError::Unreachable(e)),
                Err(_) => {
                    return Err(CallError::Unreachable(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    )))
                }
            };
            s.set_nodelay(true).map_err(CallError::Network)?;
            self.conn = Some(s);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    async fn exchange(&mut self, rpc: Rpc) -> Result<Response, CallError> {
        let req = Request {
            cluster: self.cluster.to_string(),
            from: self.id,
            to: self.target,
            rpc,
        };
        let s = self.connect().await?;
        write_frame(s, &req).await.map_err(CallError::Network)?;
        let mut header = [0u8; 4];
        s.read_exact(&mut header)
            .await
            .map_err(CallError::Network)?;
        let body = read_body(s, header).await.map_err(CallError::Network)?;
        let resp: Response = serde_json::from_slice(&body).map_err(|e| {
            CallError::Network(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })?;
        if let Response::Refused(why) = resp {
            return Err(CallError::Unreachable(std::io::Error::other(why)));
        }
        Ok(resp)
    }

    /// One request and its response within `ttl`; any failure drops the connection.
    async fn call(&mut self, rpc: Rpc, ttl: Duration) -> Result<Response, CallError> {
        let result = match tokio::time::timeout(ttl, self.exchange(rpc)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    fn rpc_error<E: std::error::Error>(
        &self,
        e: CallError,
        action: RPCTypes,
        ttl: Duration,
    ) -> RPCError<NodeId, Node, E> {
        match e {
            CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Network(e) => RPCError::Network(NetworkError::new(&e)),
            CallError::Timeout => RPCError::Timeout(Timeout {
                action,
                id: self.id,
                target: self.target,
                timeout: ttl,
            }),
        }
    }

    fn unexpected<E: std::error::Error>(&self) -> RPCError<NodeId, Node, E> {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "response does not match the request",
        );
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let ttl = option.hard_ttl();
        match self.call(Rpc::AppendEntries(rpc), ttl).await {
            Ok(Response::AppendEntries(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => {
                self.conn = None;
                Err(self.unexpected())
            }
            Err(e) => Err(self.rpc_error(e, RPCTypes::AppendEntries, ttl)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let ttl = option.hard_ttl();
        match self.call(Rpc::InstallSnapshot(rpc), ttl).await {
            Ok(Response::InstallSnapshot(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => {
                self.conn = None;
                Err(self.unexpected())
            }
            Err(e) => Err(self.rpc_error(e, RPCTypes::InstallSnapshot, ttl)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let ttl = option.hard_ttl();
        match self.call(Rpc::Vote(rpc), ttl).await {
            Ok(Response::Vote(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => {
                self.conn = None;
                Err(self.unexpected())
            }
            Err(e) => Err(self.rpc_error(e, RPCTypes::Vote, ttl)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // A stopped voter is retried every 200 ms: it catches up soon after it is back.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::{Read, Write};

    use openraft::Vote;

    use super::super::{Quorum, QuorumConfig};
    use super::*;

    fn exchange(s: &mut std::net::TcpStream, req: &Request) -> Option<Response> {
        let body = serde_json::to_vec(req).unwrap();
        s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
        s.write_all(&body).unwrap();
        let mut header = [0u8; 4];
        s.read_exact(&mut header).ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        s.read_exact(&mut body).ok()?;
        Some(serde_json::from_slice(&body).unwrap())
    }

    #[test]
    fn requests_for_another_cluster_or_node_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let q = Quorum::start(QuorumConfig::new(
            1,
            BTreeMap::from([(1, addr)]),
            dir.path().into(),
        ))
        .unwrap();
        let vote = |cluster: &str, to: NodeId| Request {
            cluster: cluster.into(),
            from: 7,
            to,
            rpc: Rpc::Vote(VoteRequest::new(Vote::new(0, 7), None)),
        };
        for (req, what) in [
            (vote("other", 1), "another cluster"),
            (vote("weir", 2), "another node"),
        ] {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            match exchange(&mut s, &req) {
                Some(Response::Refused(_)) => {}
                _ => panic!("a request for {what} was not refused"),
            }
            assert_eq!(
                s.read(&mut [0u8; 8]).unwrap_or(0),
                0,
                "the connection stays open after a refusal"
            );
        }
        // The right cluster and node get an answer: a stale candidate is not granted a vote.
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match exchange(&mut s, &vote("weir", 1)) {
            Some(Response::Vote(Ok(r))) => assert!(!r.vote_granted),
            _ => panic!("no vote response"),
        }
        // Served on the same connection again.
        assert!(matches!(
            exchange(&mut s, &vote("weir", 1)),
            Some(Response::Vote(Ok(_)))
        ));
        q.shutdown();
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "the listener outlived its voter"
        );
    }
}
