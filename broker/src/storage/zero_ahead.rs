//! Zeroing ahead of the log end, off the write path.
//!
//! Segment space is reserved with fallocate, which on ext4 leaves *unwritten* extents. A data
//! write into an unwritten extent cannot complete inline: io_uring hands it to an io-wq worker,
//! the extent is converted when the write completes, and the next fdatasync must also write
//! the extent tree and the inode (three device writes instead of one). Overwriting blocks that
//! were written before has none of that.
//!
//! So each active segment keeps a zeroed region ahead of its data: a background task writes
//! zeros into the reserved space up to `ZERO_AHEAD_BYTES` past the last data write, one
//! `ZERO_STEP_BYTES` write at a time, and data writes land on written blocks. What it costs is
//! the zero writes themselves, at disk bandwidth the log does not use while it waits on syncs.
//!
//! Rules that keep data safe:
//! - Zeros are written only at or above `done`, and `done` never falls below the end of the
//!   last data write: a zero write starts above every byte of data written so far.
//! - A data write that overlaps the zero write in flight waits for it to finish first, so zeros
//!   never land after data on the same block.
//! - Before a segment file is truncated (seal, replica truncation, reset), `quiesce` waits for
//!   the zero write in flight and stops new ones, so no zero write extends a cut file.
//! - A failed zero write changes nothing the log relies on: those blocks stay unwritten and
//!   data writes there take the slow path.
//!
//! | limit | value |
//! |---|---|
//! | zeroed ahead of the data | `ZERO_AHEAD_BYTES` (8 MiB) |
//! | one zero write | `ZERO_STEP_BYTES` (512 KiB: a data write or fdatasync queued behind it at the disk waits less) |
//! | zero writes in flight per shard | `ZERO_WRITES_PER_SHARD_MAX` (4): at most 2 MiB of zero buffers |
//!
//! The zeroer also reserves the space it zeroes (fallocate, in steps), so the data path
//! reserves space itself only when it outruns the zeroer.

use std::cell::Cell;
use std::rc::Rc;

use super::file::SegmentFile;

pub const ZERO_AHEAD_BYTES: u64 = 8 << 20;
pub const ZERO_STEP_BYTES: u64 = 512 << 10;
pub const ZERO_WRITES_PER_SHARD_MAX: usize = 4;

thread_local! {
    /// Zero writes in flight on this shard (thread).
    static IN_FLIGHT: Cell<usize> = const { Cell::new(0) };
    /// Zero bytes written on this shard (for tests and stats).
    static ZEROED_BYTES: Cell<u64> = const { Cell::new(0) };
}

/// Zero bytes this shard has written ahead of its logs.
pub fn zeroed_bytes() -> u64 {
    ZEROED_BYTES.with(Cell::get)
}

pub struct ZeroAhead {
    file: Rc<SegmentFile>,
    /// File bytes below this are written blocks (data or zeros).
    done: Cell<u64>,
    /// File bytes reserved (fallocated).
    reserved: Cell<u64>,
    /// The zero write in flight: [start, end), or None.
    in_flight: Cell<Option<(u64, u64)>>,
    /// Wakes whoever waits for the zero write in flight.
    finished: event_listener::Event,
    /// No new zero writes (the file is being cut or retired).
    closed: Cell<bool>,
}

impl ZeroAhead {
    /// `written`: bytes of the file known to be written blocks (its data, rounded up).
    pub fn new(file: Rc<SegmentFile>, written: u64) -> Rc<ZeroAhead> {
        Rc::new(ZeroAhead {
            file,
            done: Cell::new(written),
            reserved: Cell::new(written),
            in_flight: Cell::new(None),
            finished: event_listener::Event::new(),
            closed: Cell::new(false),
        })
    }

    /// File bytes known to be written blocks.
    pub fn done(&self) -> u64 {
        self.done.get()
    }

    /// File bytes known to be reserved.
    pub fn reserved(&self) -> u64 {
        self.reserved.get()
    }

    /// The data path reserved space up to `size` itself.
    pub fn reserved_to(&self, size: u64) {
        if size > self.reserved.get() {
            self.reserved.set(size);
        }
    }

    /// Before a data write of [start, end): waits while the zero write in flight overlaps it.
    pub async fn before_write(&self, start: u64, end: u64) {
        // Bounded: one zero write at a time, each finishing or failing.
        loop {
            let listener = self.finished.listen();
            match self.in_flight.get() {
                Some((a, b)) if a < end && start < b => listener.await,
                _ => return,
            }
        }
    }

    /// After a data write that ended at `end`: those blocks are written. Then starts the next
    /// zero write if the zeroed region is short of `ZERO_AHEAD_BYTES` past `end`, within
    /// `cap` (the segment's largest size), reserving space in `step`s first when needed.
    pub fn after_write(self: &Rc<Self>, end: u64, cap: u64, step: u64) {
        if end > self.done.get() {
            self.done.set(end);
        }
        self.kick(end, cap, step);
    }

    fn kick(self: &Rc<Self>, data_end: u64, cap: u64, step: u64) {
        if self.closed.get() || self.in_flight.get().is_some() {
            return;
        }
        let start = self.done.get();
        if start >= data_end + ZERO_AHEAD_BYTES || start >= cap {
            return;
        }
        if IN_FLIGHT.with(Cell::get) >= ZERO_WRITES_PER_SHARD_MAX {
            return;
        }
        let align = self.file.alignment();
        debug_assert_eq!(start % align, 0, "data writes end on block boundaries");
        let end = (start + ZERO_STEP_BYTES).min(cap) / align * align;
        if end <= start {
            return;
        }
        let reserve = (end > self.reserved.get()).then(|| {
            (end.div_ceil(step.max(align)) * step.max(align))
                .min(cap)
                .max(end)
        });
        self.in_flight.set(Some((start, end)));
        IN_FLIGHT.with(|n| n.set(n.get() + 1));
        let me = self.clone();
        glommio::spawn_local(async move {
            let len = (end - start) as usize;
            let r = async {
                if let Some(to) = reserve {
                    me.file.pre_allocate(to).await?;
                    me.reserved_to(to);
                }
                me.file.write_zeros_at(start, len).await
            }
            .await;
            IN_FLIGHT.with(|n| n.set(n.get() - 1));
            match r {
                Ok(n) if n == len => {
                    // Data may have passed `start` meanwhile only by waiting for this write.
                    if end > me.done.get() {
                        me.done.set(end);
                    }
                    ZEROED_BYTES.with(|z| z.set(z.get() + len as u64));
                }
                Ok(n) => {
                    tracing::debug!(file = %me.file.path().display(), n, len, "short zero-ahead write");
                }
                Err(e) => {
                    tracing::warn!(file = %me.file.path().display(), "zero-ahead failed (data writes there reserve and write the slow way): {e}");
                    me.closed.set(true);
                }
            }
            me.in_flight.set(None);
            me.finished.notify(usize::MAX);
        })
        .detach();
    }

    /// A zero write is in flight.
    pub fn writing(&self) -> bool {
        self.in_flight.get().is_some()
    }

    /// Stopped, with no zero write in flight.
    pub fn idle(&self) -> bool {
        self.closed.get() && self.in_flight.get().is_none()
    }

    /// Stops zeroing and waits for the zero write in flight: call before the file is cut, and
    /// before the last data write that precedes the cut.
    pub async fn quiesce(&self) {
        self.closed.set(true);
        // Bounded: at most one write in flight.
        while self.in_flight.get().is_some() {
            let listener = self.finished.listen();
            if self.in_flight.get().is_none() {
                break;
            }
            listener.await;
        }
    }
}
