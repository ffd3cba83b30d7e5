//! The file layer under the log. Every segment file operation (read, write, preallocate,
//! truncate, fdatasync) goes through `SegmentFile`, which asks the process's `FaultInjector`
//! first, so tests can make a real broker process see EIO, ENOSPC, short writes or a crash at a
//! chosen operation, the way redb's and Redpanda's fault-injecting files do.
//!
//! The injector is off unless the broker was started with `WEIR_FAULTS_FILE=<path>`: then a
//! background thread rereads that file every `RULES_RELOAD_MS` and the rules in it apply to the
//! next operations. With no injector the cost is one relaxed atomic load per operation.
//!
//! Rules file, one rule per line (`#` starts a comment):
//!
//! ```text
//! <op> <fault> [<path substring>]
//! op:    write | allocate | sync | truncate | read | any
//! fault: enospc | eio | short (a write that stores only half its bytes)
//!        | crash (abort the process before the operation)
//!        | crash-after (perform the operation, then abort)
//! ```
//!
//! Errors keep their `io::ErrorKind` (`StorageFull` for ENOSPC), which is what the log and the
//! shard look at to tell a full disk (retry later) from a broken one (partition offline).

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

/// How often the rules file is reread.
const RULES_RELOAD_MS: u64 = 100;
/// Rules read from the file at most (the rest are ignored with a warning).
const RULES_MAX: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Allocate,
    Sync,
    Truncate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fail with ENOSPC (`ErrorKind::StorageFull`).
    NoSpace,
    /// Fail with EIO.
    Io,
    /// A write stores only the first half of its bytes and reports that.
    ShortWrite,
    /// Abort the process before the operation (a crash at this exact point).
    CrashBefore,
    /// Perform the operation, then abort.
    CrashAfter,
}

/// Decides, before each file operation, whether it fails and how.
pub trait FaultInjector: Send + Sync {
    fn fault(&self, op: Op, path: &Path) -> Option<Fault>;
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static INJECTOR: OnceLock<Arc<dyn FaultInjector>> = OnceLock::new();

/// Installs the process's fault injector (once). Tests inside the broker crate call this
/// directly; the broker installs `RulesFile` when `WEIR_FAULTS_FILE` is set.
pub fn install(injector: Arc<dyn FaultInjector>) -> bool {
    let ok = INJECTOR.set(injector).is_ok();
    if ok {
        ENABLED.store(true, Ordering::Release);
    }
    ok
}

fn init_from_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Some(path) = std::env::var_os("WEIR_FAULTS_FILE") {
            let rules = RulesFile::watch(PathBuf::from(path));
            tracing::warn!(file = %rules.path.display(), "fault injection is ON (WEIR_FAULTS_FILE)");
            install(rules);
        }
    });
}

fn fault(op: Op, path: &Path) -> Option<Fault> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    INJECTOR.get()?.fault(op, path)
}

/// Rules reread from a file by a background thread.
pub struct RulesFile {
    path: PathBuf,
    rules: RwLock<Vec<Rule>>,
}

#[derive(Clone, Debug, PartialEq)]
struct Rule {
    op: Option<Op>,
    fault: Fault,
    path_contains: Option<String>,
}

impl RulesFile {
    pub fn watch(path: PathBuf) -> Arc<RulesFile> {
        let r = Arc::new(RulesFile {
            path,
            rules: RwLock::new(Vec::new()),
        });
        r.reload();
        let weak = Arc::downgrade(&r);
        std::thread::Builder::new()
            .name("weir-faults".into())
            .spawn(move || {
                while let Some(r) = weak.upgrade() {
                    r.reload();
                    drop(r);
                    std::thread::sleep(Duration::from_millis(RULES_RELOAD_MS));
                }
            })
            .expect("spawning the fault-rules thread");
        r
    }

    fn reload(&self) {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let rules = parse_rules(&text);
        let mut cur = self.rules.write().unwrap_or_else(|e| e.into_inner());
        if *cur != rules {
            tracing::warn!(rules = ?rules, "fault-injection rules changed");
            *cur = rules;
        }
    }
}

impl FaultInjector for RulesFile {
    fn fault(&self, op: Op, path: &Path) -> Option<Fault> {
        let rules = self.rules.read().unwrap_or_else(|e| e.into_inner());
        rules
            .iter()
            .find(|r| {
                r.op.is_none_or(|o| o == op)
                    && r.path_contains
                        .as_deref()
                        .is_none_or(|s| path.to_string_lossy().contains(s))
            })
            .map(|r| r.fault)
    }
}

fn parse_rules(text: &str) -> Vec<Rule> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let op = match words.next() {
            Some("read") => Some(Op::Read),
            Some("write") => Some(Op::Write),
            Some("allocate") => Some(Op::Allocate),
            Some("sync") => Some(Op::Sync),
            Some("truncate") => Some(Op::Truncate),
            Some("any") => None,
            _ => {
                tracing::warn!(line, "fault rule ignored: unknown operation");
                continue;
            }
        };
        let fault = match words.next() {
            Some("enospc") => Fault::NoSpace,
            Some("eio") => Fault::Io,
            Some("short") => Fault::ShortWrite,
            Some("crash") => Fault::CrashBefore,
            Some("crash-after") => Fault::CrashAfter,
            _ => {
                tracing::warn!(line, "fault rule ignored: unknown fault");
                continue;
            }
        };
        if out.len() == RULES_MAX {
            tracing::warn!(
                max = RULES_MAX,
                "too many fault rules; the rest are ignored"
            );
            break;
        }
        out.push(Rule {
            op,
            fault,
            path_contains: words.next().map(str::to_string),
        });
    }
    out
}

/// Whether an error chain says the disk (or quota) is full: a condition that passes when space
/// is freed, unlike EIO.
pub fn is_no_space(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            ) || matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        })
    })
}

/// Whether a failed write may simply be tried again later: a full disk, or a short write
/// (which on an O_DIRECT file means the disk filled up part way).
pub fn is_retryable(e: &anyhow::Error) -> bool {
    is_no_space(e)
        || e.chain().any(|c| {
            c.downcast_ref::<io::Error>()
                .is_some_and(|io| io.kind() == io::ErrorKind::WriteZero)
        })
}

/// glommio's error, turned into an `io::Error` that keeps the OS error's kind.
fn io_err(e: glommio::GlommioError<()>) -> io::Error {
    match e {
        glommio::GlommioError::EnhancedIoError {
            source, op, path, ..
        } => {
            let what = format!(
                "{op} {}",
                path.map(|p| p.display().to_string()).unwrap_or_default()
            );
            match source.raw_os_error() {
                Some(code) => {
                    let os = io::Error::from_raw_os_error(code);
                    io::Error::new(os.kind(), format!("{what}: {os}"))
                }
                None => io::Error::new(source.kind(), format!("{what}: {source}")),
            }
        }
        other => io::Error::from(other),
    }
}

fn injected(f: Fault, op: Op, path: &Path) -> io::Result<()> {
    match f {
        Fault::NoSpace => Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("injected ENOSPC on {op:?} of {}", path.display()),
        )),
        Fault::Io => Err(io::Error::other(format!(
            "injected EIO on {op:?} of {}",
            path.display()
        ))),
        Fault::CrashBefore => {
            eprintln!("fault injection: crash before {op:?} of {}", path.display());
            std::process::abort()
        }
        Fault::ShortWrite | Fault::CrashAfter => Ok(()),
    }
}

fn crash_after(f: Option<Fault>, op: Op, path: &Path) {
    if f == Some(Fault::CrashAfter) {
        eprintln!("fault injection: crash after {op:?} of {}", path.display());
        std::process::abort();
    }
}

/// The size of the zero buffer a shard keeps (`write_zeros_at`).
pub const ZERO_BUFFER_BYTES: usize = super::zero_ahead::ZERO_STEP_BYTES as usize;

thread_local! {
    /// This shard's zeroed DMA buffer, shared by its zero writes; never written after the fill.
    static ZERO_BUFFER: std::cell::RefCell<Option<Rc<DmaBuffer>>> = const { std::cell::RefCell::new(None) };
}

/// A segment file: a glommio DMA (O_DIRECT) file behind the fault injector.
pub struct SegmentFile {
    file: DmaFile,
    path: PathBuf,
    /// The same file opened a second time with O_DSYNC, for writes that must be durable when
    /// they complete (`write_durable_at`); opened on first use.
    dsync: std::cell::RefCell<Option<Rc<DmaFile>>>,
}

impl SegmentFile {
    /// Opens (creating if absent) for reading and writing with O_DIRECT.
    pub async fn open_rw(path: &Path) -> io::Result<SegmentFile> {
        init_from_env();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .dma_open(path)
            .await
            .map_err(io_err)?;
        Ok(SegmentFile {
            file,
            path: path.to_path_buf(),
            dsync: std::cell::RefCell::new(None),
        })
    }

    /// The O_DSYNC descriptor of this file, opened on first use.
    async fn dsync_file(&self) -> io::Result<Rc<DmaFile>> {
        if let Some(f) = self.dsync.borrow().as_ref() {
            return Ok(f.clone());
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .dma_open(&self.path)
            .await
            .map_err(io_err)?;
        let f = Rc::new(f);
        // Another write may have opened it meanwhile (callers hold the partition's I/O lock,
        // so not today); keep the first.
        let mut slot = self.dsync.borrow_mut();
        Ok(slot.get_or_insert(f).clone())
    }

    /// Closes the O_DSYNC descriptor, if open: a sealed segment takes no more writes, so it
    /// holds one descriptor again. A write in flight through it (none when the caller holds
    /// the partition's I/O lock) keeps it open until it ends.
    pub async fn close_durable(&self) {
        let f = self.dsync.borrow_mut().take();
        if let Some(Ok(f)) = f.map(Rc::try_unwrap) {
            if let Err(e) = f.close().await {
                tracing::warn!(file = %self.path.display(), "closing the O_DSYNC descriptor: {e}");
            }
        }
    }

    /// Writes `buf` at `pos` through the O_DSYNC descriptor: when it completes, these bytes,
    /// and the file metadata needed to read them back, are durable, as after a write followed
    /// by fdatasync, in one io_uring operation (the kernel syncs in the write's completion
    /// instead of a separate FSYNC request that waits for an io-wq worker). Returns the bytes
    /// written; a short write made nothing durable that the caller may count on.
    ///
    /// Fault injection sees both operations: a `write` fault applies as to `write_at`; a
    /// `sync` fault applies after a plain write, as it would to the fdatasync that follows.
    ///
    /// If the O_DSYNC descriptor cannot be opened (no descriptors left, say), the write is done
    /// through the ordinary descriptor followed by an fdatasync: slower, same guarantee.
    pub async fn write_durable_at(&self, buf: DmaBuffer, pos: u64) -> io::Result<usize> {
        let faulted =
            fault(Op::Write, &self.path).is_some() || fault(Op::Sync, &self.path).is_some();
        if !faulted {
            match self.dsync_file().await {
                Ok(f) => return f.write_at(buf, pos).await.map_err(io_err),
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), "no O_DSYNC descriptor, writing then fdatasyncing: {e}")
                }
            }
        }
        // The plain write and the fdatasync that makes it stand for a durable one, each with
        // its faults. A failed fdatasync is never retried (the partition goes offline): the
        // kernel may have dropped what it failed to write.
        let n = self.write_at(buf, pos).await?;
        self.fdatasync()
            .await
            .map_err(|e| io::Error::other(format!("fdatasync: {e}")))?;
        Ok(n)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn alignment(&self) -> u64 {
        self.file.alignment()
    }

    pub fn alloc_dma_buffer(&self, size: usize) -> DmaBuffer {
        self.file.alloc_dma_buffer(size)
    }

    pub async fn read_at(&self, pos: u64, size: usize) -> io::Result<ReadResult> {
        let f = fault(Op::Read, &self.path);
        if let Some(f) = f {
            injected(f, Op::Read, &self.path)?;
        }
        let r = self.file.read_at(pos, size).await.map_err(io_err);
        crash_after(f, Op::Read, &self.path);
        r
    }

    /// Writes `buf` at `pos`; returns the bytes written (fewer on a short write).
    pub async fn write_at(&self, buf: DmaBuffer, pos: u64) -> io::Result<usize> {
        self.write_with_fault(fault(Op::Write, &self.path), buf, pos)
            .await
    }

    /// `write_at` with the injector already asked (once per write).
    async fn write_with_fault(
        &self,
        f: Option<Fault>,
        mut buf: DmaBuffer,
        pos: u64,
    ) -> io::Result<usize> {
        if let Some(f) = f {
            injected(f, Op::Write, &self.path)?;
            if f == Fault::ShortWrite {
                // Store a real prefix (whole blocks) and report it, as a short write would.
                let align = self.alignment() as usize;
                let keep = (buf.len() / 2) / align * align;
                buf.trim_to_size(keep);
                if keep == 0 {
                    return Ok(0);
                }
            }
        }
        let r = self.file.write_at(buf, pos).await.map_err(io_err);
        crash_after(f, Op::Write, &self.path);
        r
    }

    /// Writes `len` zero bytes at `pos`; returns the bytes written. A write of the shard's
    /// usual zero-write size reuses one zeroed buffer (the zero-ahead's 512 KiB steps: a fresh
    /// buffer and its memset per step cost about 4% of the broker's CPU at 450 MB/s).
    pub async fn write_zeros_at(&self, pos: u64, len: usize) -> io::Result<usize> {
        let f = fault(Op::Write, &self.path);
        let shared = (f.is_none() && len == ZERO_BUFFER_BYTES).then(|| {
            ZERO_BUFFER.with(|z| {
                z.borrow_mut()
                    .get_or_insert_with(|| {
                        let mut b = self.file.alloc_dma_buffer(ZERO_BUFFER_BYTES);
                        b.as_bytes_mut().fill(0);
                        Rc::new(b)
                    })
                    .clone()
            })
        });
        match shared {
            Some(buf) => self.file.write_rc_at(buf, pos).await.map_err(io_err),
            // Other sizes, and every injected fault, take the ordinary path.
            None => {
                let mut buf = self.file.alloc_dma_buffer(len);
                buf.as_bytes_mut().fill(0);
                self.write_with_fault(f, buf, pos).await
            }
        }
    }

    /// Reserves disk space up to `size` bytes (fallocate mode 0: the file size grows to `size`
    /// if it was smaller).
    pub async fn pre_allocate(&self, size: u64) -> io::Result<()> {
        let f = fault(Op::Allocate, &self.path);
        if let Some(f) = f {
            injected(f, Op::Allocate, &self.path)?;
        }
        let r = self.file.pre_allocate(size, false).await.map_err(io_err);
        crash_after(f, Op::Allocate, &self.path);
        r
    }

    pub async fn truncate(&self, size: u64) -> io::Result<()> {
        let f = fault(Op::Truncate, &self.path);
        if let Some(f) = f {
            injected(f, Op::Truncate, &self.path)?;
        }
        let r = self.file.truncate(size).await.map_err(io_err);
        crash_after(f, Op::Truncate, &self.path);
        r
    }

    pub async fn fdatasync(&self) -> io::Result<()> {
        let f = fault(Op::Sync, &self.path);
        if let Some(f) = f {
            injected(f, Op::Sync, &self.path)?;
        }
        let r = self.file.fdatasync().await.map_err(io_err);
        crash_after(f, Op::Sync, &self.path);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match() {
        let rules = parse_rules(
            "# comment\nwrite enospc t-0\nsync eio\nany short\nbogus eio\nwrite nonsense\n",
        );
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].op, Some(Op::Write));
        assert_eq!(rules[0].fault, Fault::NoSpace);
        assert_eq!(rules[0].path_contains.as_deref(), Some("t-0"));
        assert_eq!(rules[2].op, None);
        let r = RulesFile {
            path: PathBuf::new(),
            rules: RwLock::new(rules),
        };
        assert_eq!(
            r.fault(Op::Write, Path::new("/d/t-0/0.log")),
            Some(Fault::NoSpace)
        );
        assert_eq!(
            r.fault(Op::Write, Path::new("/d/u-1/0.log")),
            Some(Fault::ShortWrite)
        );
        assert_eq!(r.fault(Op::Sync, Path::new("/x")), Some(Fault::Io));
    }

    #[test]
    fn no_space_is_recognised_through_anyhow() {
        let e = anyhow::Error::from(io::Error::new(io::ErrorKind::StorageFull, "full"))
            .context("writing");
        assert!(is_no_space(&e));
        let e = anyhow::Error::from(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(is_no_space(&e));
        let e = anyhow::Error::from(io::Error::from_raw_os_error(libc::EIO));
        assert!(!is_no_space(&e));
    }
}
