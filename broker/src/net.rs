//! Connections: every shard accepts on the same port (SO_REUSEPORT), reads size-prefixed
//! frames with every size checked before anything is allocated, runs stage one of each request
//! in order, and writes responses in order from a separate writer task with vectored writes.
//!
//! Anything malformed (a size out of range, a truncated frame, an undecodable header or body,
//! an unknown API) closes that connection with one log line; other connections are unaffected.
//! Those log lines are rate-limited per shard (a fuzzer makes thousands).
//!
//! A frame body is read as its bytes arrive and only arrived bytes count against request memory
//! (see [`RequestMemory`]): a peer that announces a large frame and then stalls or trickles holds
//! almost nothing, and a partial frame that stops making progress is closed.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use event_listener::Event;
use futures::future::{select, Either};
use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use futures::FutureExt;
use glommio::channels::local_channel;
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::{Semaphore, StaticPermit};

use crate::kafka::{self, Pending};
use crate::metrics::Stage;
use crate::protocol::{parse_frame, FrameError};
use crate::shard::{shard, Shard};

/// Requests of one connection whose responses are not yet written.
const IN_FLIGHT_PER_CONNECTION_MAX: usize = 16;
/// An idle connection is closed after this long (Kafka's connections.max.idle.ms).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A partly received frame is closed when no new byte of it arrives for this long. Progress,
/// not the whole body, is timed: a slow but steady sender (a big produce over a thin link) is
/// fine, a stalled one stops holding memory and a connection slot after 10 s.
const FRAME_PROGRESS_TIMEOUT: Duration = Duration::from_secs(10);
/// A frame that waits this long for request memory (the shard is full of other frames) is
/// closed; the wait does not count as a stall of its sender (we stopped reading, not it).
const MEMORY_WAIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The first buffer of a frame body holds at most this much; it grows by BODY_GROWTH as bytes
/// arrive (never to more than the frame's size).
const BODY_FIRST_BYTES: usize = 64 << 10;
/// Growth factor of a body buffer. Each growth may move (copy) what has arrived: with a factor
/// of 4 that is at most a third of a byte copied per byte, less than the zero fill of the whole
/// frame this replaces (a recv straight into spare capacity needs no zeroing); the buffer is
/// never more than max(BODY_FIRST_BYTES, 4 times what arrived), so an untouched reservation
/// stays small. When the socket already holds more of the frame than that (FIONREAD), the
/// buffer grows to take all of it at once: those bytes have arrived, and a 1 MB frame that is
/// all queued is then one allocation with no copies.
const BODY_GROWTH: usize = 4;
/// Bytes read into the connection's stack buffer when a socket has nothing queued: waiting
/// needs a buffer, and a peer that sends nothing must not make us allocate one on the heap.
const WAIT_READ_BYTES: usize = 512;
/// Frames up to this size do not take partial-frame memory (their few bytes are bounded by the
/// connection count), so small requests such as Metadata never wait behind large partial frames.
const SMALL_FRAME_BYTES: usize = 4 << 10;
/// Bytes of partly received frames a shard holds (besides the one overdraft frame).
const PARTIAL_POOL_BYTES: u64 = 64 << 20;
/// Bytes of partly received frames one connection may take from the pool; beyond that a frame
/// needs the overdraft.
const PARTIAL_SHARE_BYTES: u64 = PARTIAL_POOL_BYTES / 4;
/// Below this much room in the pool a frame asks for the overdraft rather than trickle.
const GRANT_MIN_BYTES: u64 = 64 << 10;
/// Connection-level warnings each shard logs per window; the rest are counted and summarised
/// in one line at the end of the window.
const CONN_WARNS_PER_WINDOW: u32 = 20;
const CONN_WARN_WINDOW: Duration = Duration::from_secs(10);
/// iovecs per sendmsg call (Linux's IOV_MAX is 1024).
const IOVECS_PER_WRITE_MAX: usize = 256;

thread_local! {
    static CONNECTIONS: Cell<usize> = const { Cell::new(0) };
}

pub fn open_connections() -> usize {
    CONNECTIONS.with(|c| c.get())
}

/// A shard's request memory (issue #9). Bytes count only once they have arrived:
///
/// - `complete`: bytes of frames received whole, from the moment the last byte arrived until the
///   response is written: at most max(`socket.request.max.bytes`, 256 MiB). A frame waits for
///   it once, after it is complete; it drains as responses are written and never waits on a
///   partial frame, so that wait always ends.
/// - the partial pool: bytes of partly received frames (above SMALL_FRAME_BYTES), at most
///   PARTIAL_POOL_BYTES per shard and PARTIAL_SHARE_BYTES per connection, so trickling senders
///   can fill neither the complete budget nor the whole pool alone. A frame reads only as many
///   bytes as it was granted (reserved just before a non-blocking recv and settled right
///   after, with no await in between, so nothing unarrived is ever held while waiting).
/// - the overdraft: one partial frame per shard may grow past its share and the pool (up to
///   its size, at most `socket.request.max.bytes`). Without it, frames that each hold part of a
///   full pool and wait for more would wedge; with it, one of them can always finish and free
///   its bytes. That lets frames larger than the share (or the pool) through, one at a time.
///   Its holder is still closed after FRAME_PROGRESS_TIMEOUT without progress.
///
/// Worst case per shard: complete budget + pool + one frame + WAIT_READ_BYTES and small frames
/// per connection.
pub struct RequestMemory {
    complete: Rc<Semaphore>,
    partial_bytes: Cell<u64>,
    overdraft_taken: Cell<bool>,
    /// Notified whenever partial-pool bytes or the overdraft are released.
    freed: Event,
}

impl RequestMemory {
    pub fn new(frame_max_bytes: usize) -> RequestMemory {
        let complete_bytes = (frame_max_bytes as u64).max(256 << 20);
        RequestMemory {
            complete: Rc::new(Semaphore::new(complete_bytes)),
            partial_bytes: Cell::new(0),
            overdraft_taken: Cell::new(false),
            freed: Event::new(),
        }
    }
}

/// The partial-frame memory one frame holds while it is being received; released on drop.
struct PartialHold<'a> {
    mem: &'a RequestMemory,
    /// Small frames take nothing from the pool.
    exempt: bool,
    bytes: u64,
    overdraft: bool,
}

impl<'a> PartialHold<'a> {
    fn new(mem: &'a RequestMemory, size: usize) -> PartialHold<'a> {
        PartialHold {
            mem,
            exempt: size <= SMALL_FRAME_BYTES,
            bytes: 0,
            overdraft: false,
        }
    }

    /// Room left in this frame's share and in the pool.
    fn room(&self) -> u64 {
        let pool_left = PARTIAL_POOL_BYTES - self.mem.partial_bytes.get();
        (PARTIAL_SHARE_BYTES - self.bytes).min(pool_left)
    }

    fn take(&mut self, n: u64) {
        assert!(n <= self.room(), "partial-frame grant over the limits");
        self.bytes += n;
        self.mem.partial_bytes.set(self.mem.partial_bytes.get() + n);
    }

    fn try_overdraft(&mut self) -> bool {
        if self.mem.overdraft_taken.get() {
            return false;
        }
        self.mem.overdraft_taken.set(true);
        self.overdraft = true;
        true
    }

    /// Grants up to `want` bytes now, without waiting; 0 when the frame must wait for memory.
    fn grant(&mut self, want: u64) -> u64 {
        if self.exempt || self.overdraft {
            return want;
        }
        let room = self.room();
        if room < want.min(GRANT_MIN_BYTES) && self.try_overdraft() {
            return want;
        }
        let n = room.min(want);
        self.take(n);
        n
    }

    /// Returns granted bytes that did not arrive (in the same step as the grant, so no waiter
    /// needs a wake-up).
    fn give_back(&mut self, n: u64) {
        if self.exempt || self.overdraft || n == 0 {
            return;
        }
        assert!(n <= self.bytes, "giving back more than granted");
        self.bytes -= n;
        self.mem.partial_bytes.set(self.mem.partial_bytes.get() - n);
    }

    /// Takes exactly `n` bytes that already arrived, if that is possible now.
    fn try_take(&mut self, n: u64) -> bool {
        if self.exempt || self.overdraft {
            return true;
        }
        if self.room() >= n {
            self.take(n);
            return true;
        }
        self.try_overdraft()
    }

    /// Waits until some partial-frame memory or the overdraft is released. Called right after
    /// a failed grant, with no await in between, so no release can be missed. `waiting_since`
    /// spans the retries of one wait: an error once it is MEMORY_WAIT_TIMEOUT old.
    async fn wait_freed(&self, waiting_since: &mut Option<Instant>) -> Result<(), String> {
        let since = *waiting_since.get_or_insert_with(Instant::now);
        let left = MEMORY_WAIT_TIMEOUT.saturating_sub(since.elapsed());
        let freed = self.mem.freed.listen();
        let woke = !left.is_zero()
            && glommio::timer::timeout(left, async {
                freed.await;
                Ok(())
            })
            .await
            .is_ok();
        if woke {
            Ok(())
        } else {
            Err(format!(
                "waited {}s for request memory for a partial frame",
                MEMORY_WAIT_TIMEOUT.as_secs()
            ))
        }
    }
}

impl Drop for PartialHold<'_> {
    fn drop(&mut self) {
        let held = self.mem.partial_bytes.get();
        assert!(self.bytes <= held, "partial-frame memory unbalanced");
        self.mem.partial_bytes.set(held - self.bytes);
        if self.overdraft {
            assert!(self.mem.overdraft_taken.get(), "overdraft unbalanced");
            self.mem.overdraft_taken.set(false);
        }
        if self.bytes > 0 || self.overdraft {
            self.mem.freed.notify(usize::MAX);
        }
    }
}

#[derive(Default)]
struct WarnWindow {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

thread_local! {
    static CONN_WARNS: RefCell<WarnWindow> = RefCell::new(WarnWindow::default());
}

/// Whether a connection-level warning may be logged now: at most CONN_WARNS_PER_WINDOW per
/// CONN_WARN_WINDOW on this shard. The first suppressed one schedules a summary line with the
/// count at the end of the window, so a burst is never silent and never floods the log.
fn conn_warn_allowed() -> bool {
    let now = Instant::now();
    let (allowed, summary_at) = CONN_WARNS.with(|w| {
        let mut w = w.borrow_mut();
        let start = match w.start {
            Some(t) if now.duration_since(t) < CONN_WARN_WINDOW => t,
            _ => {
                w.start = Some(now);
                w.logged = 0;
                now
            }
        };
        if w.logged < CONN_WARNS_PER_WINDOW {
            w.logged += 1;
            return (true, None);
        }
        w.suppressed += 1;
        let first = w.suppressed == 1;
        (false, first.then_some(start + CONN_WARN_WINDOW))
    });
    if let Some(at) = summary_at {
        glommio::spawn_local(async move {
            glommio::timer::sleep(at.saturating_duration_since(Instant::now())).await;
            let suppressed = CONN_WARNS.with(|w| std::mem::take(&mut w.borrow_mut().suppressed));
            if suppressed > 0 {
                tracing::warn!(
                    suppressed,
                    "connection warnings suppressed (at most {CONN_WARNS_PER_WINDOW} per {}s per shard)",
                    CONN_WARN_WINDOW.as_secs()
                );
            }
        })
        .detach();
    }
    allowed
}

/// A connection-level `tracing::warn!`, rate-limited per shard (see [`conn_warn_allowed`]).
macro_rules! conn_warn {
    ($($arg:tt)*) => {
        if conn_warn_allowed() {
            tracing::warn!($($arg)*);
        }
    };
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
                    conn_warn!(
                        limit = s.config.connections_per_shard_max,
                        "connection limit reached; refusing a connection"
                    );
                    drop(stream);
                    continue;
                }
                CONNECTIONS.with(|c| c.set(c.get() + 1));
                crate::metrics::connection_opened();
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
                    crate::metrics::connection_closed();
                })
                .detach();
            }
            Err(e) => {
                conn_warn!("accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

enum Read<T> {
    Done(T),
    Stop,
}

/// Reads exactly `buf.len()` bytes between frames, giving up on shutdown or timeout.
async fn read_exact_or_stop<R: futures::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    s: &Shard,
    timeout: Duration,
) -> io::Result<Read<()>> {
    let stop = s.stopped.listen();
    if s.shutting_down.get() {
        return Ok(Read::Stop);
    }
    let read = glommio::timer::timeout(timeout, async {
        r.read_exact(buf).await.map_err(glommio::GlommioError::from)
    });
    match select(Box::pin(read), stop).await {
        Either::Left((r, _)) => r.map(Read::Done).map_err(io::Error::from),
        Either::Right(_) => Ok(Read::Stop),
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
    // (is a Produce, its response): the writer times Produce responses' writes.
    let (tx, rx) = local_channel::new_bounded::<(bool, Pending)>(IN_FLIGHT_PER_CONNECTION_MAX);
    let writer_task = glommio::spawn_local(async move {
        let mut writer = writer;
        while let Some((produce, pending)) = rx.recv().await {
            if let Some(parts) = pending.await {
                let started = Instant::now();
                if let Err(e) = write_vectored(fd, &mut writer, parts).await {
                    tracing::debug!("write failed: {e}");
                    return;
                }
                if produce {
                    crate::metrics::produce_stage(Stage::ResponseWrite, started.elapsed());
                }
            }
        }
        let _ = writer.close().await;
    });

    let max = s.config.socket_request_bytes_max;
    let result = loop {
        let mut size = [0u8; 4];
        match read_exact_or_stop(&mut reader, &mut size, &s, IDLE_TIMEOUT).await {
            Ok(Read::Done(())) => {}
            Ok(Read::Stop) => break Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let size = i32::from_be_bytes(size);
        if size <= 0 || size as usize > max {
            conn_warn!(
                size,
                max,
                "closing connection: frame size out of range (socket.request.max.bytes)"
            );
            break Ok(());
        }
        let size = size as usize;
        let read_started = Instant::now();
        // Only arrived bytes count against request memory; the whole frame holds its
        // `complete` permit until its response is written.
        let (body, permit) = match read_body(&mut reader, fd, size, &s.request_memory).await {
            Ok(b) => b,
            Err(e) => {
                conn_warn!(size, "closing connection: {e}");
                break Ok(());
            }
        };
        let started = Instant::now();
        let mut api_key = -1i16;
        let pending: Pending = match parse_frame(body) {
            Ok(mut frame) => {
                frame.client_host.clone_from(&client_host);
                let api = frame.api_key;
                api_key = api as i16;
                let produce = api == kafka_protocol::messages::ApiKey::Produce;
                if produce {
                    crate::metrics::produce_stage(Stage::FrameRead, started - read_started);
                }
                match kafka::dispatch(frame).await {
                    Ok(p) => {
                        if produce {
                            crate::metrics::produce_stage(Stage::Append, started.elapsed());
                        }
                        p
                    }
                    Err(e) => {
                        conn_warn!(?api, "closing connection: {e}");
                        break Ok(());
                    }
                }
            }
            Err(FrameError::UnsupportedApiVersions { correlation_id }) => {
                let resp = kafka::metadata::unsupported_api_versions(correlation_id);
                futures::future::ready(Some(resp)).boxed_local()
            }
            Err(FrameError::Close(e)) => {
                conn_warn!("closing connection: {e}");
                break Ok(());
            }
        };
        let pending = async move {
            let r = pending.await;
            drop(permit);
            crate::metrics::request_latency(api_key, started.elapsed());
            r
        }
        .boxed_local();
        if tx.send((api_key == 0, pending)).await.is_err() {
            break Ok(());
        }
    };
    // Responses already queued are still written, then the connection closes.
    drop(tx);
    writer_task.await;
    result
}

/// Reads the `size` bytes of a frame body (its size prefix already read) as they arrive, and
/// returns them with the frame's `complete` request-memory permit. Errors (the peer closed, no
/// progress for FRAME_PROGRESS_TIMEOUT, no memory for MEMORY_WAIT_TIMEOUT) close the connection.
///
/// Bytes queued on the socket are received straight into the buffer's spare capacity with a
/// non-blocking recv (no zero fill); only when nothing is queued does glommio wait for the
/// socket, reading into a small stack buffer. The buffer is allocated when the first bytes are
/// in and grows with them (BODY_GROWTH), never to the announced size up front.
async fn read_body(
    reader: &mut ReadHalf<TcpStream>,
    fd: RawFd,
    size: usize,
    mem: &RequestMemory,
) -> Result<(Bytes, StaticPermit), String> {
    let mut head = [0u8; WAIT_READ_BYTES];
    // A Vec rather than a BytesMut: its reserve_exact keeps the buffer within the frame size.
    let mut body: Vec<u8> = Vec::new();
    let mut hold = PartialHold::new(mem, size);
    let mut waiting_since: Option<Instant> = None;
    // The last recv came back short: the socket is most likely empty, so go straight to
    // waiting (whose read tries the socket first anyway) and spare a recv that would fail.
    let mut drained = false;
    while body.len() < size {
        let left = size - body.len();
        if body.len() == body.capacity() && !body.is_empty() {
            grow(&mut body, size, 1, queued_bytes(fd));
        }
        if body.capacity() > body.len() && !drained {
            let want = (body.capacity() - body.len()).min(left);
            let granted = hold.grant(want as u64) as usize;
            if granted == 0 {
                hold.wait_freed(&mut waiting_since).await?;
                continue;
            }
            waiting_since = None;
            let got = recv_queued(fd, &mut body, granted);
            hold.give_back((granted - got.as_ref().ok().copied().flatten().unwrap_or(0)) as u64);
            match got {
                Ok(Some(0)) => return Err("peer closed mid-frame".into()),
                Ok(Some(n)) => {
                    drained = n < granted;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(format!("reading a frame: {e}")),
            }
        }
        let k = left.min(WAIT_READ_BYTES);
        let read = glommio::timer::timeout(FRAME_PROGRESS_TIMEOUT, async {
            reader
                .read(&mut head[..k])
                .await
                .map_err(glommio::GlommioError::from)
        })
        .await
        .map_err(io::Error::from);
        let n = match read {
            Ok(0) => return Err("peer closed mid-frame".into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(format!(
                    "partial frame made no progress for {}s ({} of {size} bytes arrived)",
                    FRAME_PROGRESS_TIMEOUT.as_secs(),
                    body.len()
                ))
            }
            Err(e) => return Err(format!("reading a frame: {e}")),
        };
        while !hold.try_take(n as u64) {
            hold.wait_freed(&mut waiting_since).await?;
        }
        waiting_since = None;
        if body.capacity() - body.len() < n {
            grow(&mut body, size, n, queued_bytes(fd));
        }
        body.extend_from_slice(&head[..n]);
        drained = false;
    }
    assert_eq!(body.len(), size);
    // Complete: the frame moves from the partial pool to the complete budget (the partial
    // bytes stay held until then, so they are never unaccounted).
    let permit = mem
        .complete
        .acquire_static_permit(size as u64)
        .await
        .map_err(|e| format!("request memory closed: {e}"))?;
    drop(hold);
    Ok((Bytes::from(body), permit))
}

/// Grows `body` to hold at least `need` more bytes: BODY_GROWTH times what it holds, at least
/// BODY_FIRST_BYTES, or room for the `queued` bytes waiting in the socket besides `need` when
/// that is more; never past the frame's `size`.
fn grow(body: &mut Vec<u8>, size: usize, need: usize, queued: usize) {
    let target = (body.len() * BODY_GROWTH)
        .max(BODY_FIRST_BYTES)
        .max(body.len() + need)
        .max(body.len().saturating_add(need).saturating_add(queued))
        .min(size);
    assert!(target >= body.len() + need, "growing past the frame");
    body.reserve_exact(target - body.len());
}

/// Bytes queued on the socket, received and not yet read (FIONREAD); 0 when unknown.
fn queued_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int at the pointer; fd is this connection's socket.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r < 0 {
        return 0;
    }
    n.max(0) as usize
}

/// One non-blocking recv of at most `max` bytes into `buf`'s spare capacity: Some(n) bytes
/// (0 at end of stream), None when nothing is queued.
fn recv_queued(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> io::Result<Option<usize>> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(max);
    let ptr = spare.as_mut_ptr();
    loop {
        // SAFETY: the kernel writes at most `len` bytes at `ptr`, inside `buf`'s spare capacity,
        // which nothing else references; fd is this connection's socket, open while its reader
        // half is alive.
        let n = unsafe { libc::recv(fd, ptr.cast(), len, libc::MSG_DONTWAIT) };
        if n >= 0 {
            let n = n as usize;
            assert!(n <= len);
            // SAFETY: recv initialised those n bytes.
            unsafe { buf.set_len(buf.len() + n) };
            return Ok(Some(n));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
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
