//! Connections: every shard accepts on the same port (SO_REUSEPORT), reads size-prefixed
//! frames with every size checked before anything is allocated, runs stage one of each request
//! in order, and writes responses in order from a separate writer task with vectored writes.
//!
//! Anything malformed (a size out of range, a truncated frame, an undecodable header or body,
//! an unknown API) closes that connection with one log line; other connections are unaffected.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{select, Either};
use futures::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use futures::FutureExt;
use glommio::channels::local_channel;
use glommio::net::{TcpListener, TcpStream};

use crate::kafka::{self, Pending};
use crate::protocol::{parse_frame, FrameError};
use crate::shard::{shard, Shard};

/// Requests of one connection whose responses are not yet written.
const IN_FLIGHT_PER_CONNECTION_MAX: usize = 16;
/// An idle connection is closed after this long (Kafka's connections.max.idle.ms).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A frame's body must arrive within this long once its size was read.
const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// iovecs per sendmsg call (Linux's IOV_MAX is 1024).
const IOVECS_PER_WRITE_MAX: usize = 256;

thread_local! {
    static CONNECTIONS: Cell<usize> = const { Cell::new(0) };
}

pub fn open_connections() -> usize {
    CONNECTIONS.with(|c| c.get())
}

pub async fn accept_loop(listener: TcpListener) {
    let s = shard();
    loop {
        let accepted = {
            let stop = s.stopped.listen();
            if s.shutting_down.get() {
                return;
            }
            match select(Box::pin(listener.accept()), stop).await {
                Either::Left((r, _)) => r,
                Either::Right(_) => return,
            }
        };
        match accepted {
            Ok(stream) => {
                if open_connections() >= s.config.connections_per_shard_max {
                    tracing::warn!(
                        limit = s.config.connections_per_shard_max,
                        "connection limit reached; refusing a connection"
                    );
                    drop(stream);
                    continue;
                }
                CONNECTIONS.with(|c| c.set(c.get() + 1));
                glommio::spawn_local(async move {
                    let peer = stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    // A bug in a handler must cost one connection, not the shard.
                    match std::panic::AssertUnwindSafe(connection(stream))
                        .catch_unwind()
                        .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(%peer, "connection ended: {e}"),
                        Err(_) => {
                            tracing::error!(%peer, "request handler panicked; connection closed")
                        }
                    }
                    CONNECTIONS.with(|c| c.set(c.get() - 1));
                })
                .detach();
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

enum Read<T> {
    Done(T),
    Stop,
}

/// Reads exactly `buf.len()` bytes, giving up on shutdown (only between frames) or timeout.
async fn read_exact_or_stop<R: futures::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    s: &Shard,
    between_frames: bool,
    timeout: Duration,
) -> io::Result<Read<()>> {
    let stop = s.stopped.listen();
    if between_frames && s.shutting_down.get() {
        return Ok(Read::Stop);
    }
    let read = glommio::timer::timeout(timeout, async {
        r.read_exact(buf).await.map_err(glommio::GlommioError::from)
    });
    if between_frames {
        match select(Box::pin(read), stop).await {
            Either::Left((r, _)) => r.map(Read::Done).map_err(io::Error::from),
            Either::Right(_) => Ok(Read::Stop),
        }
    } else {
        read.await.map(Read::Done).map_err(io::Error::from)
    }
}

async fn connection(stream: TcpStream) -> io::Result<()> {
    let s = shard();
    stream.set_nodelay(true)?;
    let fd = stream.as_raw_fd();
    let client_host = stream
        .peer_addr()
        .map(|a| format!("/{}", a.ip()))
        .unwrap_or_default();
    let (mut reader, writer) = stream.split();
    let (tx, rx) = local_channel::new_bounded::<Pending>(IN_FLIGHT_PER_CONNECTION_MAX);
    let writer_task = glommio::spawn_local(async move {
        let mut writer = writer;
        while let Some(pending) = rx.recv().await {
            if let Some(parts) = pending.await {
                if let Err(e) = write_vectored(fd, &mut writer, parts).await {
                    tracing::debug!("write failed: {e}");
                    return;
                }
            }
        }
        let _ = writer.close().await;
    });

    let max = s.config.socket_request_bytes_max;
    let result = loop {
        let mut size = [0u8; 4];
        match read_exact_or_stop(&mut reader, &mut size, &s, true, IDLE_TIMEOUT).await {
            Ok(Read::Done(())) => {}
            Ok(Read::Stop) => break Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let size = i32::from_be_bytes(size);
        if size <= 0 || size as usize > max {
            tracing::warn!(
                size,
                max,
                "closing connection: frame size out of range (socket.request.max.bytes)"
            );
            break Ok(());
        }
        let size = size as usize;
        // The frame's bytes count against the shard's request memory until its response is
        // written: many large requests wait here instead of growing memory.
        let permit = match s.request_memory.acquire_static_permit(size as u64).await {
            Ok(p) => p,
            Err(_) => break Ok(()),
        };
        // Zero-filled before the read (a memset is ~20 µs per MiB); safe code needs
        // initialised memory for read_exact.
        let mut body = vec![0u8; size];
        match read_exact_or_stop(&mut reader, &mut body, &s, false, FRAME_BODY_TIMEOUT).await {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("closing connection: truncated or slow frame ({e})");
                break Ok(());
            }
        }
        let pending: Pending = match parse_frame(Bytes::from(body)) {
            Ok(mut frame) => {
                frame.client_host.clone_from(&client_host);
                let api = frame.api_key;
                match kafka::dispatch(frame).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(?api, "closing connection: {e}");
                        break Ok(());
                    }
                }
            }
            Err(FrameError::UnsupportedApiVersions { correlation_id }) => {
                let resp = kafka::metadata::unsupported_api_versions(correlation_id);
                futures::future::ready(Some(resp)).boxed_local()
            }
            Err(FrameError::Close(e)) => {
                tracing::warn!("closing connection: {e}");
                break Ok(());
            }
        };
        let pending = async move {
            let r = pending.await;
            drop(permit);
            r
        }
        .boxed_local();
        if tx.send(pending).await.is_err() {
            break Ok(());
        }
    };
    // Responses already queued are still written, then the connection closes.
    drop(tx);
    writer_task.await;
    result
}

/// Writes `parts` with as few syscalls as the socket allows: one non-blocking `sendmsg` of up
/// to IOVECS_PER_WRITE_MAX buffers; when the socket is full, glommio's write waits for room.
async fn write_vectored(
    fd: RawFd,
    w: &mut WriteHalf<TcpStream>,
    parts: Vec<Bytes>,
) -> io::Result<()> {
    let mut idx = 0usize;
    let mut off = 0usize;
    while idx < parts.len() {
        let iov: Vec<libc::iovec> = parts[idx..]
            .iter()
            .take(IOVECS_PER_WRITE_MAX)
            .enumerate()
            .map(|(i, p)| {
                let skip = if i == 0 { off } else { 0 };
                libc::iovec {
                    iov_base: p[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: p.len() - skip,
                }
            })
            .collect();
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        // SAFETY: the iovecs point into `parts`, alive for the call; fd is this connection's
        // socket, owned by `w`.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        let mut advanced = if n >= 0 {
            n as usize
        } else {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            // Full socket: let glommio wait for room and write part of the first buffer.
            let n = w.write(&parts[idx][off..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            n
        };
        while advanced > 0 && idx < parts.len() {
            let left = parts[idx].len() - off;
            if advanced >= left {
                advanced -= left;
                idx += 1;
                off = 0;
            } else {
                off += advanced;
                advanced = 0;
            }
        }
        while idx < parts.len() && parts[idx].len() == off {
            idx += 1;
            off = 0;
        }
    }
    Ok(())
}

/// Exposed for the shard's shutdown: waits until this shard's connections are gone or the
/// timeout passes.
pub async fn drain(timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while open_connections() > 0 && std::time::Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
}
