//! One partition's log: a directory of segments named by base offset, written with O_DIRECT
//! through glommio DMA files.
//!
//! Appends are synchronous and in memory: a batch gets its offset, joins the active segment's
//! `pending` list and the shard cache, and is visible to consumers at once. The shard's flusher
//! later writes pending bytes to disk (`write_pending`) and fdatasyncs (`sync`). Disk writes go
//! into space preallocated `PREALLOCATE_STEP_BYTES` at a time, because writes that grow an ext4
//! file serialise on the inode lock; the logical end of each segment is tracked here, and files
//! are truncated to it when a segment rolls and at clean shutdown.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use glommio::io::DmaFile;

use super::file::SegmentFile;
use super::zero_ahead::ZeroAhead;

use super::batch::{self, BatchInfo, Header, ReplicaBatch, Stored};
use super::epochs::EpochCache;
use super::index::SegmentIndex;
use super::producer_state::{self, BatchMeta, Check, ProducerEntry, ProducerStates};
use super::txn::{self, AbortedTxn, Marker};
use crate::config::LogConfig;

/// Disk space is reserved ahead of writes in steps of this many bytes (or segment.bytes when
/// smaller): one fallocate per 16 MiB written instead of an inode-locked extension per write.
pub const PREALLOCATE_STEP_BYTES: u64 = 16 << 20;
/// One DMA write carries at most this many bytes of pending batches (plus one batch).
pub const WRITE_CHUNK_BYTES: usize = 4 << 20;
/// A sealed segment keeps one in-memory offset index entry per this many bytes of log: about
/// 24 bytes per 256 KiB, instead of per indexed batch (see `index::DENSE_TAIL_ENTRIES` for the
/// active segment).
pub const SEALED_INDEX_STRIDE_BYTES: u32 = super::index::THINNED_STRIDE_BYTES;
/// Where recent disk reads ended, so a sequential reader continues at the exact position
/// instead of scanning from a thinned index entry. Kept per log, replaced round-robin.
const READ_HINTS: usize = 4;

/// A disk read that ended at `pos` of segment `segment_base`, where `next_offset` begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReadHint {
    segment_base: i64,
    next_offset: i64,
    pos: u64,
}

const NO_HINT: ReadHint = ReadHint {
    segment_base: -1,
    next_offset: -1,
    pos: 0,
};
/// Recovery reads segments in chunks of this size.
const SCAN_CHUNK_BYTES: usize = 4 << 20;

/// Source of `PartitionLog::instance`.
static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn segment_file_name(base: i64, ext: &str) -> String {
    format!("{base:020}.{ext}")
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// glommio's error type is not `Sync`, so it cannot travel inside `anyhow::Error`; `.io()`
/// turns it into a `std::io::Error` first.
pub trait IoResult<T> {
    fn io(self) -> std::io::Result<T>;
}

impl<T> IoResult<T> for glommio::Result<T, ()> {
    fn io(self) -> std::io::Result<T> {
        self.map_err(std::io::Error::from)
    }
}

/// The shard-wide count of bytes appended but not yet handed to a disk write. Every log of a
/// shard shares one ledger: `append` adds exactly what it queues, `take_write` subtracts exactly
/// what it takes off the queue, and `discard_pending` subtracts what a deleted log still held.
/// So the ledger always equals the sum of the logs' `pending_bytes()`, the invariant the
/// shard's backpressure relies on (a leak here once blocked every append for good).
#[derive(Default)]
pub struct PendingLedger {
    bytes: std::cell::Cell<u64>,
}

impl PendingLedger {
    pub fn get(&self) -> u64 {
        self.bytes.get()
    }
    fn add(&self, n: u64) {
        self.bytes.set(self.bytes.get() + n);
    }
    fn sub(&self, n: u64) {
        let have = self.bytes.get();
        assert!(
            have >= n,
            "pending-bytes ledger underflow: {have} held, {n} released"
        );
        self.bytes.set(have - n);
    }
}

/// Bytes of the probe file that primes glommio's DMA reads on a thread.
pub const PROBE_BYTES: usize = 4096;

/// The first DMA file a glommio thread opens must not be empty: on this kernel an empty first
/// file makes every later DMA read fail with EOPNOTSUPP. Each thread that does DMA I/O opens and
/// reads a non-empty probe file first.
pub async fn prime_dma(dir: &Path, name: &str) -> Result<()> {
    let path = dir.join(name);
    let p = path.clone();
    blocking(move || std::fs::write(&p, vec![0u8; PROBE_BYTES])).await?;
    let probe = DmaFile::open(&path).await.io()?;
    probe.read_at(0, PROBE_BYTES).await.io()?;
    probe.close().await.io()?;
    Ok(())
}

/// Runs a blocking filesystem call off the executor thread.
pub async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    glommio::executor().spawn_blocking(f).await
}

pub struct Segment {
    pub base_offset: i64,
    file: Rc<SegmentFile>,
    path: PathBuf,
    /// Logical bytes in the segment, pending ones included.
    pub size: u64,
    /// Bytes already written to the file.
    written: u64,
    /// Which blocks are reserved and which already written (zeroed ahead of the data).
    zero: Rc<ZeroAhead>,
    /// Bytes of the last, partial block already written: rewritten together with the next data.
    tail_block: Vec<u8>,
    /// Batches appended but not yet written, in order.
    pending: VecDeque<Bytes>,
    pending_bytes: u64,
    pub index: SegmentIndex,
    /// Offset after the last batch of the segment.
    pub next_offset: i64,
    pub max_timestamp: i64,
    created_ms: i64,
    /// Transactions aborted in this segment (its `.txnindex`), in marker order.
    pub aborted: Vec<AbortedTxn>,
}

impl Segment {
    fn rel(&self, offset: i64) -> u32 {
        debug_assert!(offset >= self.base_offset);
        (offset - self.base_offset) as u32
    }
}

/// What `append` needs before it can go on.
#[derive(Debug)]
pub enum AppendError {
    /// The active segment must roll first (size, age or a full index).
    NeedsRoll,
    /// Refused with this Kafka error code (producer epoch or sequence).
    Refused(i16),
}

/// What `check_append` found.
enum Checked {
    /// An idempotent producer's retry of a batch already in the log: the answer.
    Duplicate(Appended),
    /// Append; `control` for a marker or a coordinator's write (no producer sequences).
    Append { control: bool },
}

pub struct Appended {
    pub base_offset: i64,
    pub last_offset: i64,
    /// The stamped batches, to be cached. Empty for a duplicate.
    pub batches: Vec<(i64, i64, Bytes)>,
    /// An idempotent producer's retry of a batch already in the log: nothing was written.
    pub duplicate: bool,
    /// The batch was stamped in its request frame's buffer, not copied (`append_frame`).
    pub in_place: bool,
}

pub struct PartitionLog {
    pub dir: PathBuf,
    pub config: LogConfig,
    segments: BTreeMap<i64, Segment>,
    pub log_start_offset: i64,
    /// Offset the next batch gets (Kafka's LEO). Equals the high watermark on a single node.
    pub log_end_offset: i64,
    /// Every batch below this offset has been written to disk.
    pub written_offset: i64,
    /// Every batch below this offset has been fdatasynced.
    pub durable_offset: i64,
    pub leader_epoch: i32,
    /// (max timestamp, offset of the batch's last record) over the whole log, for ListOffsets -3.
    pub max_timestamp: (i64, i64),
    /// Idempotent producers' sequence state.
    pub producers: ProducerStates,
    /// Leader epoch -> first offset, for a follower's truncation (`storage::epochs`).
    pub epochs: EpochCache,
    /// The shard's count of unwritten bytes, shared by all its logs.
    ledger: Rc<PendingLedger>,
    /// A roll is sealing the active segment: nothing more may be appended to it.
    rolling: bool,
    /// Batch bytes written to disk since the log was opened, and how many of them the last
    /// fdatasync covered (the shard's group-commit size metric).
    pub written_bytes: u64,
    pub synced_bytes: u64,
    /// Open transactions: first offset -> producer id (the oldest holds back the LSO).
    ongoing: BTreeMap<i64, i64>,
    /// Where recent disk reads ended (`READ_HINTS`); cleared when a segment is rewritten.
    read_hints: std::cell::Cell<[ReadHint; READ_HINTS]>,
    read_hint_next: std::cell::Cell<usize>,
    /// Unique per opened log: a truncation or reset reopens the log with a new one, so a sync
    /// that started before it does not move the new log's durable offset.
    pub instance: u64,
    /// Compacted logs: where the part the cleaner has not cleaned yet begins
    /// (`compact::CHECKPOINT_FILE`).
    cleaned_offset: i64,
    /// `discard_pending` ran (the partition is deleted or offline): nothing is queued or written
    /// any more, and a write that was in flight then and fails drops its batches.
    discarded: bool,
}

impl PartitionLog {
    fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("a log always has an active segment")
    }
    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("a log always has an active segment")
    }

    pub fn size_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.size).sum()
    }

    pub fn pending_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.pending_bytes).sum()
    }

    /// Opens the log in `dir`, creating it when absent. `clean` says the broker stopped cleanly:
    /// then the tail is only checked from the last index entry; otherwise the active segment is
    /// scanned batch by batch, truncated at the first torn or corrupt batch, and its indexes
    /// rebuilt.
    pub async fn open(
        dir: PathBuf,
        config: LogConfig,
        leader_epoch: i32,
        clean: bool,
        ledger: Rc<PendingLedger>,
    ) -> Result<PartitionLog> {
        let d = dir.clone();
        let listing: Vec<(i64, u64)> = blocking(move || -> Result<Vec<(i64, u64)>> {
            if !d.exists() {
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                if let Some(parent) = d.parent() {
                    std::fs::File::open(parent)?.sync_all()?;
                }
            }
            let mut v = Vec::new();
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                let name = e.file_name().to_string_lossy().to_string();
                if let Some(stem) = name.strip_suffix(".log") {
                    if let Ok(base) = stem.parse::<i64>() {
                        v.push((base, e.metadata()?.len()));
                    }
                }
                if name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            v.sort();
            Ok(v)
        })
        .await?;

        let mut log = PartitionLog {
            dir: dir.clone(),
            config,
            segments: BTreeMap::new(),
            log_start_offset: 0,
            log_end_offset: 0,
            written_offset: 0,
            durable_offset: 0,
            leader_epoch,
            max_timestamp: (-1, -1),
            producers: ProducerStates::default(),
            epochs: EpochCache::default(),
            ledger,
            rolling: false,
            written_bytes: 0,
            synced_bytes: 0,
            ongoing: BTreeMap::new(),
            cleaned_offset: super::compact::read_checkpoint(&dir).unwrap_or(0),
            discarded: false,
            instance: NEXT_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            read_hints: std::cell::Cell::new([NO_HINT; READ_HINTS]),
            read_hint_next: std::cell::Cell::new(0),
        };
        let count = listing.len();
        for (i, &(base, file_bytes)) in listing.iter().enumerate() {
            let is_last = i + 1 == count;
            let mut seg = open_segment(&dir, base, file_bytes, !is_last || clean).await?;
            if !is_last {
                seg.index.thin(SEALED_INDEX_STRIDE_BYTES);
            }
            if let Some(prev) = log.segments.values().next_back() {
                if seg.base_offset < prev.next_offset {
                    bail!(
                        "{}: segment {} overlaps the previous one (ends at {})",
                        dir.display(),
                        base,
                        prev.next_offset
                    );
                }
            }
            log.segments.insert(base, seg);
        }
        log.drop_lost_ranges().await;
        if log.segments.is_empty() {
            let seg = create_segment(&dir, 0).await?;
            log.segments.insert(0, seg);
        }
        let first = log.segments.values().next().expect("one segment");
        log.log_start_offset = first.base_offset;
        let last = log.active();
        log.log_end_offset = last.next_offset;
        log.written_offset = log.log_end_offset;
        log.durable_offset = log.log_end_offset;
        log.max_timestamp = log
            .segments
            .values()
            .filter(|s| s.size > 0)
            .map(|s| (s.max_timestamp, s.next_offset - 1))
            .max_by_key(|&(t, _)| t)
            .unwrap_or((-1, -1));
        // A log start moved by DeleteRecords inside the first segment is kept in a checkpoint.
        let (d, end) = (dir.clone(), log.log_end_offset);
        if let Some(start) = blocking(move || read_log_start_checkpoint(&d)).await {
            log.log_start_offset = log.log_start_offset.max(start.min(end));
        }
        log.load_producer_state().await?;
        let d = dir.clone();
        let loaded = blocking(move || EpochCache::load(&d)).await?;
        log.epochs = match loaded {
            Some(mut c) => {
                c.truncate_from_end(log.log_end_offset);
                c
            }
            // A log from before replication: its batches count as epoch 0.
            None if log.log_end_offset > log.log_start_offset => {
                let mut c = EpochCache::default();
                c.assign(0, log.log_start_offset);
                c
            }
            None => EpochCache::default(),
        };
        Ok(log)
    }

    /// Where to start looking for the cut before `offset`: (segment base, its file, the index
    /// position at or before `offset`, the written end, the next segment's base).
    fn cut_search(&self, offset: i64) -> Option<(i64, Rc<SegmentFile>, u64, u64, Option<i64>)> {
        let (&base, seg) = self
            .segments
            .range(..=offset)
            .next_back()
            .or_else(|| self.segments.iter().next())?;
        let pos = if offset >= base {
            seg.index.position_for(seg.rel(offset)) as u64
        } else {
            0
        };
        let next = self.segments.range(base + 1..).next().map(|(&b, _)| b);
        Some((base, seg.file.clone(), pos, seg.written.min(seg.size), next))
    }

    /// Truncates the log so that it ends before `offset` (a follower whose log diverged from its
    /// leader's): writes what is pending, cuts the segment holding `offset` at the first batch
    /// reaching it, deletes the segments after it, and reopens the log, which rescans the cut
    /// segment and rebuilds its indexes and the producer state. The caller holds the I/O lock
    /// and appends nothing meanwhile. Never cuts below the log start.
    pub async fn truncate_to(log: &std::cell::RefCell<PartitionLog>, offset: i64) -> Result<()> {
        PartitionLog::write_all(log).await?;
        let offset = offset.max(log.borrow().log_start_offset);
        if offset >= log.borrow().log_end_offset {
            return Ok(());
        }
        let search = log.borrow().cut_search(offset);
        let cut = match search {
            None => None,
            Some((base, file, pos, end, next)) => {
                match cut_in_segment(&file, pos, end, offset).await? {
                    Some(pos) => Some((base, pos)),
                    None => next.map(|b| (b, 0)),
                }
            }
        };
        let Some((base, pos)) = cut else {
            return Ok(());
        };
        PartitionLog::quiesce_zeroing(log).await;
        let (file, later, dir, config, epoch, ledger, start) = {
            let l = log.borrow();
            let later: Vec<PathBuf> = l
                .segments
                .range(base + 1..)
                .map(|(_, s)| s.path.clone())
                .collect();
            (
                l.segments[&base].file.clone(),
                later,
                l.dir.clone(),
                l.config.clone(),
                l.leader_epoch,
                l.ledger.clone(),
                l.log_start_offset,
            )
        };
        file.truncate(pos).await?;
        file.fdatasync().await?;
        let mut epochs = log.borrow().epochs.clone();
        epochs.truncate_from_end(offset);
        let text = epochs.encode();
        let d = dir.clone();
        let index = dir.join(segment_file_name(base, "index"));
        blocking(move || -> std::io::Result<()> {
            for path in later {
                delete_segment_files(&path)?;
            }
            let _ = std::fs::remove_file(&index);
            let _ = std::fs::remove_file(index.with_extension("timeindex"));
            EpochCache::store(&d, &text)?;
            std::fs::File::open(&d)?.sync_all()
        })
        .await?;
        drop(file);
        let mut reopened = PartitionLog::open(dir, config, epoch, false, ledger).await?;
        reopened.log_start_offset = reopened
            .log_start_offset
            .max(start.min(reopened.log_end_offset));
        debug_assert!(reopened.log_end_offset <= offset);
        *log.borrow_mut() = reopened;
        Ok(())
    }

    /// Stops zeroing ahead in every segment and waits for zero writes in flight (before files
    /// are cut or deleted).
    pub async fn quiesce_zeroing(log: &std::cell::RefCell<PartitionLog>) {
        let zeros: Vec<Rc<ZeroAhead>> = log
            .borrow()
            .segments
            .values()
            .map(|s| s.zero.clone())
            .collect();
        for z in zeros {
            z.quiesce().await;
        }
    }

    /// Empties the log and restarts it at `offset` (Kafka's truncate-fully-and-start-at): a
    /// follower whose log end is below its leader's log start (retention or DeleteRecords
    /// removed what it would copy). Deletes every segment, the producer snapshots and the
    /// epoch checkpoint, creates an empty segment based at `offset`, and reopens. The caller
    /// holds the I/O lock and appends nothing meanwhile.
    pub async fn reset_to(log: &std::cell::RefCell<PartitionLog>, offset: i64) -> Result<()> {
        PartitionLog::write_all(log).await?;
        PartitionLog::quiesce_zeroing(log).await;
        let (dir, config, epoch, ledger, paths) = {
            let l = log.borrow();
            (
                l.dir.clone(),
                l.config.clone(),
                l.leader_epoch,
                l.ledger.clone(),
                l.segments
                    .values()
                    .map(|s| s.path.clone())
                    .collect::<Vec<_>>(),
            )
        };
        let d = dir.clone();
        blocking(move || -> std::io::Result<()> {
            for path in paths {
                delete_segment_files(&path)?;
            }
            for e in std::fs::read_dir(&d)?.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(".snapshot") || name == super::epochs::EPOCH_CHECKPOINT {
                    std::fs::remove_file(e.path())?;
                }
            }
            PartitionLog::write_log_start_checkpoint(&d, offset)
        })
        .await?;
        drop(create_segment(&dir, offset).await?);
        let reopened = PartitionLog::open(dir, config, epoch, false, ledger).await?;
        debug_assert_eq!(reopened.log_end_offset, offset);
        *log.borrow_mut() = reopened;
        Ok(())
    }

    /// Appends batches copied from the leader as they are (offsets, epochs, CRCs kept): the
    /// follower's log stays byte-identical to the leader's. The batches continue the log
    /// (`batch::validate_replica` checked that). No I/O happens here.
    pub fn append_replica(&mut self, batches: &[ReplicaBatch]) -> Result<(), AppendError> {
        let Some(first) = batches.first() else {
            return Ok(());
        };
        debug_assert!(first.base >= self.log_end_offset);
        let incoming: u64 = batches.iter().map(|b| b.bytes.len() as u64).sum();
        if self.needs_roll(incoming, now_ms()) {
            return Err(AppendError::NeedsRoll);
        }
        let interval = self.config.index_interval_bytes;
        let ledger = self.ledger.clone();
        let mut max_ts = self.max_timestamp;
        let seg = self.active_mut();
        for b in batches {
            let len = b.bytes.len();
            seg.index.on_append(
                seg.rel(b.base),
                seg.size as u32,
                len as u32,
                b.max_timestamp,
                interval,
            );
            seg.size += len as u64;
            seg.pending_bytes += len as u64;
            ledger.add(len as u64);
            seg.pending.push_back(b.bytes.clone());
            seg.next_offset = b.last + 1;
            seg.max_timestamp = seg.max_timestamp.max(b.max_timestamp);
            if b.max_timestamp > max_ts.0 {
                max_ts = (b.max_timestamp, b.last);
            }
        }
        for b in batches {
            self.epochs.assign(b.leader_epoch, b.base);
            if b.producer_id >= 0 && b.base_sequence >= 0 {
                let meta = BatchMeta {
                    first_seq: b.base_sequence,
                    last_seq: producer_state::last_sequence(
                        b.base_sequence,
                        (b.last - b.base) as i32,
                    ),
                    first_offset: b.base,
                    last_offset: b.last,
                    max_timestamp: b.max_timestamp,
                };
                self.producers.record(b.producer_id, b.producer_epoch, meta);
            }
            self.track_txn(&b.bytes);
        }
        self.max_timestamp = max_ts;
        self.log_end_offset = batches.last().expect("non-empty").last + 1;
        Ok(())
    }

    /// After recovery: says which offsets were lost (a rolled segment truncated short of the
    /// next one's base leaves a hole; readers step over it) and deletes rolled segments that
    /// recovery emptied, so the log start moves past them instead of pointing at nothing.
    async fn drop_lost_ranges(&mut self) {
        let bases: Vec<i64> = self.segments.keys().copied().collect();
        for (i, &base) in bases.iter().enumerate() {
            let Some(&next_base) = bases.get(i + 1) else {
                break;
            };
            let (next_offset, size) = {
                let seg = &self.segments[&base];
                (seg.next_offset, seg.size)
            };
            // A compacted segment ends where its last kept record ends: not a loss.
            if next_offset < next_base && !self.config.compact {
                tracing::error!(
                    dir = %self.dir.display(),
                    segment = base,
                    lost_from = next_offset,
                    lost_to = next_base - 1,
                    "recovery dropped corrupt records of a rolled segment: these offsets are gone"
                );
            }
            if size == 0 {
                let seg = self.segments.remove(&base).expect("listed");
                let path = seg.path.clone();
                drop(seg);
                let r = blocking(move || delete_segment_files(&path)).await;
                tracing::warn!(dir = %self.dir.display(), segment = base, "deleted a rolled segment that recovery emptied ({r:?})");
            }
        }
    }

    /// Loads the newest producer-state snapshot not past the log end (dropping newer ones,
    /// left by a truncated tail) and replays the batch headers after it.
    async fn load_producer_state(&mut self) -> Result<()> {
        let (dir, end) = (self.dir.clone(), self.log_end_offset);
        let loaded = blocking(move || -> Result<Option<(i64, ProducerStates)>> {
            let mut snaps: Vec<(i64, PathBuf)> = std::fs::read_dir(&dir)?
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    name.strip_suffix(".snapshot").and_then(|s| s.parse::<i64>().ok()).map(|o| (o, e.path()))
                })
                .collect();
            snaps.sort();
            while let Some((offset, path)) = snaps.pop() {
                if offset > end {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                match std::fs::read(&path).ok().and_then(|b| ProducerStates::decode(&b)) {
                    Some((o, s)) if o == offset => return Ok(Some((o, s))),
                    _ => {
                        tracing::warn!(snapshot = %path.display(), "ignoring unreadable producer-state snapshot");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            Ok(None)
        })
        .await?;
        let (offset, state) = loaded.unwrap_or((self.log_start_offset, ProducerStates::default()));
        self.producers = state;
        let mut offset = offset.max(self.log_start_offset);
        // Open transactions as of the snapshot; aborts before the replay start from the
        // segments' `.txnindex` files (the replay finds the later ones again).
        self.ongoing = self
            .producers
            .entries
            .iter()
            .filter_map(|(pid, e)| e.txn_first_offset.map(|f| (f, *pid)))
            .collect();
        let (dir, bases): (PathBuf, Vec<i64>) =
            (self.dir.clone(), self.segments.keys().copied().collect());
        let indexes = blocking(move || -> Vec<(i64, Vec<AbortedTxn>)> {
            bases
                .into_iter()
                .filter_map(|b| {
                    let bytes = std::fs::read(dir.join(txn::index_file_name(b))).ok()?;
                    Some((b, txn::decode_index(&bytes)?))
                })
                .collect()
        })
        .await;
        for (base, mut entries) in indexes {
            entries.retain(|e| e.last_offset < offset);
            if let Some(seg) = self.segments.get_mut(&base) {
                seg.aborted = entries;
            }
        }
        // Replay: bounded by the log end; every step moves `offset` past at least one batch.
        while offset < self.log_end_offset {
            let Some(chunk) = self.read_batches(offset, 1 << 20).await? else {
                break;
            };
            let mut at = 0;
            while let Some(h) = Header::new(&chunk[at..]) {
                let Some(total) = h.total_bytes() else { break };
                if h.producer_id() >= 0 && h.last_offset() >= offset {
                    if !h.is_control() {
                        self.producers
                            .record(h.producer_id(), h.producer_epoch(), batch_meta(&h));
                    }
                    let end = (at + total).min(chunk.len());
                    self.track_txn(&chunk[at..end]);
                }
                offset = offset.max(h.last_offset() + 1);
                at += total;
                if at >= chunk.len() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Reads batches from disk from `offset`, stepping over segments that end before it.
    pub async fn read_batches(&self, offset: i64, max_bytes: usize) -> Result<Option<Bytes>> {
        let mut range = self.locate(offset);
        // Bounded by the number of segments.
        while let Some(r) = range {
            if let Some((start, b)) = read_from_disk_at(&r, offset, max_bytes).await? {
                self.note_read(&r, offset, start, &b);
                return Ok(Some(b));
            }
            range = r.next_segment.and_then(|next| self.locate_segment(next));
        }
        Ok(None)
    }

    /// Forgets idle producers and producers whose data retention removed.
    pub fn expire_producers(&mut self, now_ms: i64, expiration_ms: i64) -> usize {
        self.producers
            .expire(now_ms, expiration_ms, self.log_start_offset)
    }

    /// The producer-state snapshot of the whole log, named by the log end offset.
    /// Transaction bookkeeping for a batch just added to the log (leader append, replica
    /// append, replay): a transactional batch opens its producer's transaction here, a marker
    /// ends it (an ABORT goes into its segment's aborted list) and fences older epochs.
    fn track_txn(&mut self, batch: &[u8]) {
        let Some(h) = Header::new(batch) else { return };
        let pid = h.producer_id();
        if !h.is_transactional() || pid < 0 {
            return;
        }
        if !h.is_control() {
            let e = self
                .producers
                .entries
                .entry(pid)
                .or_insert_with(|| ProducerEntry {
                    epoch: h.producer_epoch(),
                    batches: Default::default(),
                    last_timestamp: h.max_timestamp(),
                    txn_first_offset: None,
                });
            if e.txn_first_offset.is_none() {
                e.txn_first_offset = Some(h.base_offset());
                self.ongoing.insert(h.base_offset(), pid);
            }
            return;
        }
        let Some(marker) = txn::marker_of(batch) else {
            return;
        };
        let e = self
            .producers
            .entries
            .entry(pid)
            .or_insert_with(|| ProducerEntry {
                epoch: h.producer_epoch(),
                batches: Default::default(),
                last_timestamp: h.max_timestamp(),
                txn_first_offset: None,
            });
        if h.producer_epoch() > e.epoch {
            e.epoch = h.producer_epoch();
            e.batches.clear();
        }
        e.last_timestamp = e.last_timestamp.max(h.max_timestamp());
        let Some(first) = e.txn_first_offset.take() else {
            return;
        };
        self.ongoing.remove(&first);
        if marker == Marker::Abort {
            let lso = self
                .ongoing
                .keys()
                .next()
                .copied()
                .unwrap_or(h.last_offset() + 1);
            if let Some((_, seg)) = self.segments.range_mut(..=h.base_offset()).next_back() {
                seg.aborted.push(AbortedTxn {
                    producer_id: pid,
                    first_offset: first,
                    last_offset: h.last_offset(),
                    last_stable_offset: lso,
                });
            }
        }
    }

    /// A compacted log's next cleaning pass, when one is due: (first dirty offset, end of the
    /// cleanable dirty part, sealed segments as (base, next base), directory,
    /// delete.retention.ms). Due when the dirty share of the sealed bytes reaches
    /// `min.cleanable.dirty.ratio`, or a dirty segment is older than `max.compaction.lag.ms`;
    /// segments younger than `min.compaction.lag.ms` stay dirty.
    #[allow(clippy::type_complexity)]
    pub fn cleanable(&self, now_ms: i64) -> Option<(i64, i64, Vec<(i64, i64)>, PathBuf, i64)> {
        if !self.config.compact {
            return None;
        }
        let bases: Vec<i64> = self.segments.keys().copied().collect();
        let sealed: Vec<(i64, i64)> = bases.windows(2).map(|w| (w[0], w[1])).collect();
        let first_dirty = self.cleaned_offset.max(self.log_start_offset);
        let mut dirty_end = first_dirty;
        let (mut dirty, mut total, mut overdue) = (0u64, 0u64, false);
        let mut young = false;
        for (base, next) in &sealed {
            let seg = &self.segments[base];
            total += seg.size;
            if *next <= first_dirty || young {
                continue;
            }
            if now_ms - seg.max_timestamp < self.config.min_compaction_lag_ms {
                young = true;
                continue;
            }
            dirty += seg.size;
            dirty_end = *next;
            overdue |= now_ms - seg.max_timestamp > self.config.max_compaction_lag_ms;
        }
        if dirty_end <= first_dirty || total == 0 {
            return None;
        }
        let ratio = dirty as f64 / total as f64;
        (ratio >= self.config.min_cleanable_dirty_ratio || overdue).then(|| {
            (
                first_dirty,
                dirty_end,
                sealed,
                self.dir.clone(),
                self.config.delete_retention_ms,
            )
        })
    }

    pub fn set_cleaned_offset(&mut self, offset: i64) {
        self.cleaned_offset = offset;
    }

    /// Opens sealed segment `base` again after the cleaner replaced its file (`size` bytes),
    /// keeping what the log knows about its range.
    pub async fn reopen_sealed_segment(
        log: &std::cell::RefCell<PartitionLog>,
        base: i64,
        size: u64,
    ) -> Result<()> {
        let dir = log.borrow().dir.clone();
        let mut seg = open_segment(&dir, base, size, false).await?;
        let mut l = log.borrow_mut();
        let old = l
            .segments
            .get_mut(&base)
            .context("a cleaned segment is not removed while the cleaner holds the lock")?;
        seg.next_offset = old.next_offset;
        seg.created_ms = old.created_ms;
        seg.aborted = std::mem::take(&mut old.aborted);
        seg.index.thin(SEALED_INDEX_STRIDE_BYTES);
        *old = seg;
        // Positions in the rewritten segment moved.
        l.read_hints.set([NO_HINT; READ_HINTS]);
        Ok(())
    }

    /// The last stable offset: the first offset of the oldest open transaction, else `hw`.
    pub fn last_stable_offset(&self, hw: i64) -> i64 {
        self.ongoing.keys().next().map_or(hw, |f| (*f).min(hw))
    }

    /// Aborted transactions that overlap [from, to), for a read_committed fetch.
    pub fn aborted_between(&self, from: i64, to: i64) -> Vec<AbortedTxn> {
        let mut out = Vec::new();
        for seg in self.segments.values() {
            out.extend(
                seg.aborted
                    .iter()
                    .filter(|a| a.last_offset >= from && a.first_offset < to),
            );
        }
        out
    }

    /// The producer's open transaction here, if any (its first offset).
    pub fn open_transaction(&self, producer_id: i64) -> Option<i64> {
        self.producers
            .entries
            .get(&producer_id)
            .and_then(|e| e.txn_first_offset)
    }

    pub fn producer_snapshot(&self) -> (i64, Vec<u8>) {
        (
            self.log_end_offset,
            self.producers.encode(self.log_end_offset),
        )
    }

    /// Whether the active segment must roll before `incoming_bytes` more are appended.
    pub fn needs_roll(&self, incoming_bytes: u64, now_ms: i64) -> bool {
        let a = self.active();
        self.rolling
            || a.size > 0
                && (a.size + incoming_bytes > self.config.segment_bytes
                    || now_ms - a.created_ms >= self.config.roll_ms as i64
                    || a.index.is_full()
                    || self.log_end_offset - a.base_offset + 1_000_000 > u32::MAX as i64)
    }

    /// Assigns offsets to validated batches and appends them in memory. No I/O happens here.
    /// Each batch is copied (`batch::stamp`).
    pub fn append(
        &mut self,
        records: &[u8],
        infos: &[BatchInfo],
        now_ms: i64,
    ) -> Result<Appended, AppendError> {
        let control = match self.check_append(records, infos, now_ms)? {
            Checked::Duplicate(dup) => return Ok(dup),
            Checked::Append { control } => control,
        };
        Ok(
            self.commit_append(control, infos, now_ms, |i, base, epoch, append_time| {
                let info = &infos[i];
                batch::stamp(
                    &records[info.start..info.start + info.bytes],
                    base,
                    epoch,
                    append_time,
                )
            }),
        )
    }

    /// As `append`, for a Produce partition's records that may be stamped where they lie
    /// instead of copied: when they are one batch larger than the arena takes
    /// (`arena::ARENA_BATCH_BYTES_MAX`), `whole_frame` says they are all but a few bytes of
    /// their request frame, and nothing else references that frame (the handler dropped its
    /// other views). Then the frame's buffer becomes the cached batch: no copy, no second
    /// allocation of a batch's size. Otherwise (or when `records` is shared) it is `append`.
    /// `records` is left empty when it was taken.
    pub fn append_frame(
        &mut self,
        records: &mut Bytes,
        infos: &[BatchInfo],
        now_ms: i64,
        whole_frame: bool,
    ) -> Result<Appended, AppendError> {
        let one_large = matches!(infos, [i] if i.start == 0
            && i.bytes == records.len()
            && i.bytes > super::arena::ARENA_BATCH_BYTES_MAX);
        if !(whole_frame && one_large) {
            return self.append(records, infos, now_ms);
        }
        let control = match self.check_append(records, infos, now_ms)? {
            Checked::Duplicate(dup) => return Ok(dup),
            Checked::Append { control } => control,
        };
        let mut owned = match std::mem::take(records).try_into_mut() {
            Ok(m) => Some(m),
            Err(shared) => {
                *records = shared;
                None
            }
        };
        let shared = records.clone();
        let mut in_place = false;
        let mut appended =
            self.commit_append(control, infos, now_ms, |i, base, epoch, append_time| {
                debug_assert_eq!(i, 0);
                match owned.take() {
                    Some(mut m) => {
                        batch::stamp_in_place(&mut m, base, epoch, append_time);
                        in_place = true;
                        m.freeze()
                    }
                    None => batch::stamp(&shared, base, epoch, append_time),
                }
            });
        appended.in_place = in_place;
        Ok(appended)
    }

    /// The checks before an append: idempotent sequences and whether the active segment must
    /// roll first. Changes nothing.
    fn check_append(
        &self,
        records: &[u8],
        infos: &[BatchInfo],
        now_ms: i64,
    ) -> Result<Checked, AppendError> {
        // A control batch (a transaction marker, written by the broker itself) carries no
        // sequence: it is not checked against the producer's sequences.
        // Nor is a coordinator's transactional write on a producer's behalf (no sequence).
        let control = infos.len() == 1
            && (Header::new(&records[infos[0].start..]).is_some_and(|h| h.is_control())
                || (infos[0].transactional && infos[0].base_sequence < 0));
        if !control && infos.iter().any(|i| i.producer_id >= 0) {
            // Idempotent producers send one batch per partition.
            let [i] = infos else {
                return Err(AppendError::Refused(crate::kafka::errors::INVALID_RECORD));
            };
            let last_seq =
                producer_state::last_sequence(i.base_sequence, i.offset_count as i32 - 1);
            match self
                .producers
                .check(i.producer_id, i.producer_epoch, i.base_sequence, last_seq)
            {
                Check::Append => {}
                Check::Duplicate {
                    first_offset,
                    last_offset,
                } => {
                    return Ok(Checked::Duplicate(Appended {
                        base_offset: first_offset,
                        last_offset,
                        batches: Vec::new(),
                        duplicate: true,
                        in_place: false,
                    }));
                }
                Check::Refuse(code) => return Err(AppendError::Refused(code)),
            }
        }
        let incoming: u64 = infos.iter().map(|i| i.bytes as u64).sum();
        if self.needs_roll(incoming, now_ms) {
            return Err(AppendError::NeedsRoll);
        }
        Ok(Checked::Append { control })
    }

    /// Assigns offsets to checked batches and appends them in memory; `stamp(i, base offset,
    /// leader epoch, log append time)` gives the stored bytes of `infos[i]`.
    fn commit_append(
        &mut self,
        control: bool,
        infos: &[BatchInfo],
        now_ms: i64,
        mut stamp: impl FnMut(usize, i64, i32, Option<i64>) -> Bytes,
    ) -> Appended {
        let epoch = self.leader_epoch;
        self.epochs.assign(epoch, self.log_end_offset);
        let append_time = self.config.log_append_time.then_some(now_ms);
        let interval = self.config.index_interval_bytes;
        let base_offset = self.log_end_offset;
        let mut batches = Vec::with_capacity(infos.len());
        let mut producer_batches = Vec::new();
        let mut max_ts = self.max_timestamp;
        let mut next = self.log_end_offset;
        let ledger = self.ledger.clone();
        let seg = self.active_mut();
        for (i, info) in infos.iter().enumerate() {
            let stamped = stamp(i, next, epoch, append_time);
            assert_eq!(stamped.len(), info.bytes);
            let last = next + info.offset_count as i64 - 1;
            let ts = append_time.unwrap_or(info.max_timestamp);
            seg.index.on_append(
                seg.rel(next),
                seg.size as u32,
                info.bytes as u32,
                ts,
                interval,
            );
            seg.size += info.bytes as u64;
            seg.pending_bytes += info.bytes as u64;
            ledger.add(info.bytes as u64);
            seg.pending.push_back(stamped.clone());
            seg.next_offset = last + 1;
            seg.max_timestamp = seg.max_timestamp.max(ts);
            if ts > max_ts.0 {
                max_ts = (ts, last);
            }
            if info.producer_id >= 0 && !control {
                let last_seq =
                    producer_state::last_sequence(info.base_sequence, info.offset_count as i32 - 1);
                let meta = BatchMeta {
                    first_seq: info.base_sequence,
                    last_seq,
                    first_offset: next,
                    last_offset: last,
                    max_timestamp: ts,
                };
                producer_batches.push((info.producer_id, info.producer_epoch, meta));
            }
            batches.push((next, last, stamped));
            next = last + 1;
        }
        for (pid, epoch, meta) in producer_batches {
            self.producers.record(pid, epoch, meta);
        }
        for (_, _, b) in &batches {
            self.track_txn(b);
        }
        self.max_timestamp = max_ts;
        self.log_end_offset = next;
        Appended {
            base_offset,
            last_offset: next - 1,
            batches,
            duplicate: false,
            in_place: false,
        }
    }

    /// Takes up to one write's worth of pending batches from the oldest segment that has any.
    /// Returns what to write where; `finish_write` records it once the write completed.
    ///
    /// With `durable`, the write goes through the file's O_DSYNC descriptor; it then also
    /// advances the durable offset, provided the log was durable up to where it starts
    /// (otherwise an fdatasync still covers the earlier writes).
    pub fn take_write(&mut self, durable: bool) -> Option<PendingWrite> {
        if self.discarded {
            return None;
        }
        let durable = durable && self.durable_offset >= self.written_offset;
        let seg = self.segments.values_mut().find(|s| !s.pending.is_empty())?;
        let start = seg.written - seg.tail_block.len() as u64;
        let mut chunks = Vec::new();
        let mut bytes = 0usize;
        while let Some(b) = seg.pending.front() {
            if bytes > 0 && bytes + b.len() > WRITE_CHUNK_BYTES {
                break;
            }
            bytes += b.len();
            chunks.push(seg.pending.pop_front().expect("front exists"));
        }
        seg.pending_bytes -= bytes as u64;
        self.ledger.sub(bytes as u64);
        let end_offset = chunks
            .last()
            .and_then(|b| Header::new(b))
            .map(|h| h.last_offset() + 1)
            .expect("batches");
        Some(PendingWrite {
            segment_base: seg.base_offset,
            file: seg.file.clone(),
            file_pos: start,
            head: std::mem::take(&mut seg.tail_block),
            chunks,
            bytes,
            end_offset,
            segment_bytes: self.config.segment_bytes,
            zero: seg.zero.clone(),
            durable,
        })
    }

    pub fn finish_write(&mut self, w: &PendingWrite, tail_block: Vec<u8>) {
        if let Some(seg) = self.segments.get_mut(&w.segment_base) {
            seg.written += w.bytes as u64;
            self.written_bytes += w.bytes as u64;
            seg.tail_block = tail_block;
            debug_assert!(
                seg.tail_block.len() < 4096 && seg.written >= seg.tail_block.len() as u64
            );
        }
        debug_assert!(w.end_offset > self.written_offset);
        self.written_offset = w.end_offset;
        if w.durable {
            // `take_write` saw the log durable up to this write's start.
            self.durable_offset = self.durable_offset.max(w.end_offset);
            self.synced_bytes = self.synced_bytes.max(self.written_bytes);
        }
    }

    /// Drops every unwritten batch of a log that is being deleted, releasing them from the
    /// shard's ledger. Returns the bytes released.
    pub fn discard_pending(&mut self) -> u64 {
        self.discarded = true;
        let mut released = 0;
        for seg in self.segments.values_mut() {
            released += seg.pending_bytes;
            seg.pending.clear();
            seg.pending_bytes = 0;
        }
        self.ledger.sub(released);
        released
    }

    /// The files with data written since the last sync, for fdatasync.
    pub fn files_to_sync(&self) -> Vec<Rc<SegmentFile>> {
        if self.durable_offset >= self.written_offset {
            return Vec::new();
        }
        self.segments
            .values()
            .filter(|s| s.next_offset > self.durable_offset && s.written > 0)
            .map(|s| s.file.clone())
            .collect()
    }

    /// Writes every pending batch. The caller holds the partition's I/O lock, so no other write
    /// to the same tail block can be in flight.
    ///
    /// A write that fails gives its batches back (`abort_write`): they stay pending, in order,
    /// and the next attempt rewrites the same bytes at the same position. So a full disk loses
    /// nothing that is in memory, and a retry after space returns continues exactly.
    pub async fn write_all(log: &std::cell::RefCell<PartitionLog>) -> Result<()> {
        PartitionLog::write_all_with(log, false).await
    }

    /// `write_all`, each write through the O_DSYNC descriptor: when it returns Ok, the log is
    /// durable up to its written offset (as after `write_all` and an fdatasync of
    /// `files_to_sync`), unless it was not durable before it started (`take_write`).
    pub async fn write_all_durable(log: &std::cell::RefCell<PartitionLog>) -> Result<()> {
        PartitionLog::write_all_with(log, true).await
    }

    async fn write_all_with(log: &std::cell::RefCell<PartitionLog>, durable: bool) -> Result<()> {
        // Bounded: every round takes at least one pending batch, and none is added back
        // without returning.
        loop {
            // A new leader epoch reaches the checkpoint before any of its batches reaches disk.
            let epochs = {
                let mut l = log.borrow_mut();
                let dirty = std::mem::replace(&mut l.epochs.dirty, false);
                dirty.then(|| (l.dir.clone(), l.epochs.encode()))
            };
            if let Some((dir, text)) = epochs {
                if let Err(e) = blocking(move || EpochCache::store(&dir, &text)).await {
                    log.borrow_mut().epochs.dirty = true;
                    return Err(e).context("writing the leader-epoch checkpoint");
                }
                continue;
            }
            let w = log.borrow_mut().take_write(durable);
            let Some(w) = w else { return Ok(()) };
            match w.run().await {
                Ok(tail) => log.borrow_mut().finish_write(&w, tail),
                Err(e) => {
                    log.borrow_mut().abort_write(w);
                    return Err(e);
                }
            }
        }
    }

    /// Puts a failed write's batches back at the front of its segment's pending queue and its
    /// partial block back as the segment's tail, as if `take_write` had not happened.
    fn abort_write(&mut self, w: PendingWrite) {
        let seg = self
            .segments
            .get_mut(&w.segment_base)
            .expect("a segment with a write in flight is not removed");
        debug_assert!(seg.tail_block.is_empty());
        seg.tail_block = w.head;
        if self.discarded {
            // The discard settled this log's share of the ledger; the batches were never
            // acknowledged (acks wait for the write) and go nowhere now.
            return;
        }
        for c in w.chunks.into_iter().rev() {
            seg.pending.push_front(c);
        }
        seg.pending_bytes += w.bytes as u64;
        self.ledger.add(w.bytes as u64);
    }

    /// Closes the active segment (after writing what is pending), opens a new active segment
    /// at the log end. The caller holds the I/O lock. From its first step on, appends see
    /// `needs_roll` and wait for it: the segment being sealed takes nothing more (a batch
    /// queued there during the seal's awaits would never be written, while the new segment
    /// began after its offsets).
    pub async fn roll(log: &std::cell::RefCell<PartitionLog>) -> Result<()> {
        if log.borrow().discarded {
            // Its unwritten batches were dropped: sealing would cut the segment at a size that
            // counts them, and a clean reopen would serve that unwritten range as batches.
            anyhow::bail!("the log was taken offline: not rolled");
        }
        log.borrow_mut().rolling = true;
        let r = PartitionLog::roll_frozen(log).await;
        log.borrow_mut().rolling = false;
        r
    }

    async fn roll_frozen(log: &std::cell::RefCell<PartitionLog>) -> Result<()> {
        // Zeroing stops before the last write, so nothing is in flight when the file is cut.
        let zero = log.borrow().active().zero.clone();
        zero.quiesce().await;
        PartitionLog::write_all(log).await?;
        let (_, dir) = PartitionLog::seal_active(log).await?;
        log.borrow_mut()
            .active_mut()
            .index
            .thin(SEALED_INDEX_STRIDE_BYTES);
        let new_base = log.borrow().log_end_offset;
        let seg = create_segment(&dir, new_base).await?;
        let mut l = log.borrow_mut();
        l.segments.insert(new_base, seg);
        l.durable_offset = l.durable_offset.max(new_base.min(l.written_offset));
        Ok(())
    }

    /// Clean shutdown of a fully written and synced log, so the next start needs no scan.
    pub async fn close(log: &std::cell::RefCell<PartitionLog>) -> Result<()> {
        let zero = log.borrow().active().zero.clone();
        zero.quiesce().await;
        PartitionLog::write_all(log).await?;
        PartitionLog::seal_active(log).await.map(|_| ())
    }

    /// Truncates the active segment to its logical size, fdatasyncs it, and writes its indexes
    /// and a producer-state snapshot. Returns (segment size, partition directory).
    async fn seal_active(log: &std::cell::RefCell<PartitionLog>) -> Result<(u64, PathBuf)> {
        // No await before the check below: appends that fit go on while a roll waits, so the
        // zeroing was stopped by the caller before its last write (`roll`, `close`).
        let (file, size, dir, base, offsets, times) = {
            let l = log.borrow();
            let a = l.active();
            assert!(
                a.pending.is_empty(),
                "sealing a segment with unwritten batches"
            );
            assert!(a.zero.idle(), "sealing a segment that is being zeroed");
            (
                a.file.clone(),
                a.size,
                l.dir.clone(),
                a.base_offset,
                a.index.encode_offsets(),
                a.index.encode_times(),
            )
        };
        file.truncate(size).await?;
        file.fdatasync().await?;
        file.close_durable().await;
        // Indexes and the producer snapshot are rebuilt from the log when missing, so failing
        // to write them (a full disk) must not stop the roll or a clean shutdown.
        let aborted = txn::encode_index(&log.borrow().active().aborted);
        if let Err(e) = write_txn_index(dir.clone(), base, aborted).await {
            tracing::warn!(dir = %dir.display(), base, "transaction index not written (rebuilt from the log at next start): {e:#}");
        }
        if let Err(e) = write_index_files(dir.clone(), base, offsets, times).await {
            tracing::warn!(dir = %dir.display(), base, "index files not written (rebuilt at next start): {e:#}");
        }
        let (snap_offset, snap) = log.borrow().producer_snapshot();
        if let Err(e) = write_producer_snapshot(dir.clone(), snap_offset, snap).await {
            tracing::warn!(dir = %dir.display(), "producer-state snapshot not written (the log is replayed instead): {e:#}");
        }
        Ok((size, dir))
    }

    /// Segments to delete under the retention rules: whole segments, never the active one.
    pub fn expired_segments(&self, now_ms: i64) -> Vec<i64> {
        let mut out = Vec::new();
        if !self.config.delete {
            return out;
        }
        let mut total = self.size_bytes() as i64;
        let active = self.active().base_offset;
        for s in self.segments.values() {
            if s.base_offset == active {
                break;
            }
            let by_size = self.config.retention_bytes >= 0
                && total - s.size as i64 >= self.config.retention_bytes;
            let by_time = self.config.retention_ms >= 0
                && s.size > 0
                && now_ms - s.max_timestamp > self.config.retention_ms;
            if !(by_size || by_time) {
                break;
            }
            total -= s.size as i64;
            out.push(s.base_offset);
        }
        out
    }

    /// DeleteRecords: moves the log start to `offset` (which the caller checked is within
    /// [log start, log end]) and returns the bases of the whole segments now below it, for the
    /// caller to remove with `remove_segment`. The active segment is never among them.
    pub fn advance_log_start(&mut self, offset: i64) -> Vec<i64> {
        debug_assert!(offset >= self.log_start_offset && offset <= self.log_end_offset);
        self.log_start_offset = offset;
        let active = self.active().base_offset;
        let bases: Vec<i64> = self.segments.keys().copied().collect();
        bases
            .windows(2)
            .filter(|w| w[0] != active && w[1] <= offset)
            .map(|w| w[0])
            .collect()
    }

    /// Persists the log start offset (temp file, fsync, rename, fsync dir) so a restart keeps
    /// what DeleteRecords removed hidden. Blocking: call through `blocking`.
    pub fn write_log_start_checkpoint(dir: &Path, offset: i64) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = dir.join(format!("{LOG_START_CHECKPOINT}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{offset}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(LOG_START_CHECKPOINT))?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// Removes a segment from the log (files are deleted by the caller) and advances the start.
    pub fn remove_segment(&mut self, base: i64) -> Option<(Rc<SegmentFile>, PathBuf)> {
        if self.segments.len() <= 1 {
            return None;
        }
        let seg = self.segments.remove(&base)?;
        let first = self.segments.values().next().expect("active remains");
        self.log_start_offset = self.log_start_offset.max(first.base_offset);
        Some((seg.file, seg.path))
    }

    /// Where to read from disk for a fetch at `offset`: the segment holding it and the position
    /// to start scanning at, bounded by what is written. None: nothing written there yet.
    pub fn locate(&self, offset: i64) -> Option<DiskRange> {
        let (_, seg) = self
            .segments
            .range(..=offset)
            .next_back()
            .or_else(|| self.segments.iter().next())?;
        let mut pos = if offset >= seg.base_offset {
            seg.index.position_for(seg.rel(offset)) as u64
        } else {
            0
        };
        let end = seg.written.min(seg.size);
        if let Some(h) =
            self.read_hints.get().iter().find(|h| {
                h.segment_base == seg.base_offset && h.next_offset == offset && h.pos <= end
            })
        {
            pos = pos.max(h.pos);
        }
        // The range may be empty (a segment emptied by recovery, or an offset in a hole left
        // by a truncated one): readers then step on to `next_segment`.
        Some(DiskRange {
            file: seg.file.clone(),
            segment_base: seg.base_offset,
            pos,
            end,
            next_segment: self
                .segments
                .range(seg.base_offset + 1..)
                .next()
                .map(|(b, _)| *b),
        })
    }

    /// Records where a disk read of `range` for `offset` ended (`bytes` read from `start`), so
    /// that a reader asking for the next offset continues there. The hint that led to this
    /// read moves on; otherwise the oldest one is replaced.
    pub fn note_read(&self, range: &DiskRange, offset: i64, start: u64, bytes: &[u8]) {
        let Some(next_offset) = next_offset_after(bytes) else {
            return;
        };
        let hint = ReadHint {
            segment_base: range.segment_base,
            next_offset,
            pos: start + bytes.len() as u64,
        };
        let mut hints = self.read_hints.get();
        if let Some(h) = hints
            .iter_mut()
            .find(|h| h.segment_base == hint.segment_base && h.next_offset == offset)
        {
            *h = hint;
        } else {
            let i = self.read_hint_next.get();
            hints[i % READ_HINTS] = hint;
            self.read_hint_next.set((i + 1) % READ_HINTS);
        }
        self.read_hints.set(hints);
    }

    /// Like `locate`, from the start of a given segment (used to step over empty ranges).
    pub fn locate_segment(&self, base: i64) -> Option<DiskRange> {
        let seg = self.segments.get(&base)?;
        Some(DiskRange {
            file: seg.file.clone(),
            segment_base: base,
            pos: 0,
            end: seg.written.min(seg.size),
            next_segment: self.segments.range(base + 1..).next().map(|(b, _)| *b),
        })
    }

    /// For ListOffsets by timestamp: where to start scanning for the first record with a
    /// timestamp >= `ts`, as an offset. None when no batch reaches `ts`.
    pub fn offset_scan_start_for_time(&self, ts: i64) -> Option<i64> {
        let seg = self
            .segments
            .values()
            .find(|s| s.size > 0 && s.max_timestamp >= ts)?;
        Some(seg.base_offset + seg.index.offset_for_time(ts) as i64)
    }
}

/// The byte position of the first batch in `file[pos..end]` whose last offset is >= `offset`.
async fn cut_in_segment(
    file: &SegmentFile,
    mut pos: u64,
    end: u64,
    offset: i64,
) -> Result<Option<u64>> {
    // Bounded: every step moves past one batch.
    while pos < end {
        let head = file.read_at(pos, batch::HEADER_BYTES).await?;
        let Some(h) = Header::new(&head) else {
            bail!("short batch header at {pos}");
        };
        let Some(total) = h.total_bytes() else {
            bail!("corrupt batch at {pos}");
        };
        if h.last_offset() >= offset {
            return Ok(Some(pos));
        }
        pos += total as u64;
    }
    Ok(None)
}

/// Deletes a removed segment's log file and its index files. Blocking.
pub fn delete_segment_files(log_path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(log_path)?;
    for ext in ["index", "timeindex", "txnindex"] {
        let _ = std::fs::remove_file(log_path.with_extension(ext));
    }
    Ok(())
}

/// A partition's log start offset, when DeleteRecords moved it (one decimal number).
pub const LOG_START_CHECKPOINT: &str = "log-start-offset";

fn read_log_start_checkpoint(dir: &Path) -> Option<i64> {
    std::fs::read_to_string(dir.join(LOG_START_CHECKPOINT))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The producer-state entry of a stored batch.
fn batch_meta(h: &Header<'_>) -> BatchMeta {
    BatchMeta {
        first_seq: h.base_sequence(),
        last_seq: producer_state::last_sequence(h.base_sequence(), h.last_offset_delta()),
        first_offset: h.base_offset(),
        last_offset: h.last_offset(),
        max_timestamp: h.max_timestamp(),
    }
}

pub struct DiskRange {
    pub file: Rc<SegmentFile>,
    pub segment_base: i64,
    pub pos: u64,
    pub end: u64,
    pub next_segment: Option<i64>,
}

pub struct PendingWrite {
    segment_base: i64,
    file: Rc<SegmentFile>,
    file_pos: u64,
    head: Vec<u8>,
    chunks: Vec<Bytes>,
    bytes: usize,
    pub end_offset: i64,
    segment_bytes: u64,
    zero: Rc<ZeroAhead>,
    /// Written through the O_DSYNC descriptor, and everything before it was already durable:
    /// once it completes, the log is durable up to `end_offset` without an fdatasync.
    durable: bool,
}

impl PendingWrite {
    /// Performs the write: one aligned DMA write covering the old partial block and the new
    /// batches, zero-padded to the block size. Returns the new partial tail block.
    pub async fn run(&self) -> Result<Vec<u8>> {
        let align = self.file.alignment() as usize;
        debug_assert_eq!(self.file_pos % align as u64, 0);
        let logical = self.head.len() + self.bytes;
        let padded = logical.div_ceil(align) * align;
        let write_end = self.file_pos + padded as u64;
        // The zeroer reserves space ahead of the data; the write reserves it itself only when
        // it outruns the zeroer (never past the segment's size, rounded up to a block).
        let segment_cap = self.segment_bytes.div_ceil(align as u64) * align as u64;
        let step = PREALLOCATE_STEP_BYTES.min(segment_cap).max(align as u64);
        if write_end > self.zero.reserved() {
            let target = write_end.div_ceil(step) * step;
            self.file.pre_allocate(target).await?;
            self.zero.reserved_to(target);
        }
        self.zero.before_write(self.file_pos, write_end).await;
        let mut buf = self.file.alloc_dma_buffer(padded);
        let dst = buf.as_bytes_mut();
        dst[..self.head.len()].copy_from_slice(&self.head);
        let mut at = self.head.len();
        for c in &self.chunks {
            dst[at..at + c.len()].copy_from_slice(c);
            at += c.len();
        }
        dst[at..].fill(0);
        let tail_len = logical % align;
        let tail = dst[logical - tail_len..logical].to_vec();
        let n = if self.durable {
            self.file.write_durable_at(buf, self.file_pos).await?
        } else {
            self.file.write_at(buf, self.file_pos).await?
        };
        if n == padded {
            self.zero
                .after_write(write_end, segment_cap.max(write_end), step);
        }
        if n < padded {
            // Retryable (`file::is_retryable`): the whole write is redone at the same place.
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short DMA write: {n} of {padded} bytes"),
            )
            .into());
        }
        Ok(tail)
    }
}

async fn open_rw(path: &Path) -> Result<SegmentFile> {
    SegmentFile::open_rw(path)
        .await
        .with_context(|| format!("opening {}", path.display()))
}

async fn create_segment(dir: &Path, base: i64) -> Result<Segment> {
    let path = dir.join(segment_file_name(base, "log"));
    let file = open_rw(&path).await?;
    file.truncate(0).await?;
    // The new file's directory entry must be durable before any batch in it is acknowledged.
    let d = dir.to_path_buf();
    blocking(move || std::fs::File::open(&d)?.sync_all()).await?;
    let file = Rc::new(file);
    Ok(Segment {
        base_offset: base,
        zero: ZeroAhead::new(file.clone(), 0),
        file,
        path,
        size: 0,
        written: 0,
        tail_block: Vec::new(),
        pending: VecDeque::new(),
        pending_bytes: 0,
        index: SegmentIndex::default(),
        next_offset: base,
        max_timestamp: -1,
        created_ms: now_ms(),
        aborted: Vec::new(),
    })
}

/// Writes a producer-state snapshot covering the log below `offset`; keeps the newest two.
async fn write_producer_snapshot(dir: PathBuf, offset: i64, bytes: Vec<u8>) -> Result<()> {
    blocking(move || -> Result<()> {
        let name = producer_state::snapshot_file_name(offset);
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, dir.join(&name))?;
        let mut snaps: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "snapshot"))
            .collect();
        snaps.sort();
        let excess = snaps.len().saturating_sub(2);
        for old in snaps.into_iter().take(excess) {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    })
    .await
}

/// Writes a sealed segment's `.txnindex` (none when nothing was aborted in it).
async fn write_txn_index(dir: PathBuf, base: i64, bytes: Vec<u8>) -> Result<()> {
    blocking(move || -> Result<()> {
        let path = dir.join(txn::index_file_name(base));
        if bytes.is_empty() {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        let tmp = dir.join(format!("{}.tmp", txn::index_file_name(base)));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    })
    .await
}

async fn write_index_files(
    dir: PathBuf,
    base: i64,
    offsets: Vec<u8>,
    times: Vec<u8>,
) -> Result<()> {
    blocking(move || -> Result<()> {
        for (ext, data) in [("index", offsets), ("timeindex", times)] {
            let path = dir.join(segment_file_name(base, ext));
            let tmp = dir.join(format!("{}.tmp", segment_file_name(base, ext)));
            std::fs::write(&tmp, &data)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    })
    .await
}

/// Opens one segment. With `trust_index` the index files are used when consistent and only the
/// bytes after the last index entry are scanned; otherwise the whole file is scanned and the
/// indexes rebuilt. Either way the file ends at the last valid batch afterwards.
async fn open_segment(
    dir: &Path,
    base: i64,
    file_bytes: u64,
    trust_index: bool,
) -> Result<Segment> {
    let path = dir.join(segment_file_name(base, "log"));
    let file = Rc::new(open_rw(&path).await?);
    let index = if trust_index {
        let (d, b) = (dir.to_path_buf(), base);
        let (o, t) = blocking(move || {
            (
                std::fs::read(d.join(segment_file_name(b, "index"))).ok(),
                std::fs::read(d.join(segment_file_name(b, "timeindex"))).ok(),
            )
        })
        .await;
        match (o, t) {
            (Some(o), Some(t)) => SegmentIndex::decode(&o, &t, file_bytes),
            _ => None,
        }
    } else {
        None
    };
    let interval = 4096;
    let (scan_from, scan_offset, mut index, rebuild) = match index {
        Some(idx) if !idx.offsets.is_empty() => {
            let &(rel, pos) = idx.offsets.last().expect("non-empty");
            (pos as u64, base + rel as i64, idx, false)
        }
        Some(idx) if file_bytes == 0 => (0, base, idx, false),
        _ => (0, base, SegmentIndex::default(), true),
    };
    let scan = scan_segment(
        &file,
        scan_from,
        scan_offset,
        file_bytes,
        if rebuild {
            Some((&mut index, interval))
        } else {
            None
        },
    )
    .await?;
    // An index whose last entry does not point at a batch with the right offset is rebuilt.
    let scan = if !rebuild && scan.valid_end == scan_from && file_bytes > scan_from {
        tracing::warn!(segment = %path.display(), "index does not match the log; rebuilding");
        index = SegmentIndex::default();
        scan_segment(&file, 0, base, file_bytes, Some((&mut index, interval))).await?
    } else {
        scan
    };
    if scan.valid_end < file_bytes {
        tracing::warn!(
            segment = %path.display(),
            valid_bytes = scan.valid_end,
            file_bytes,
            "truncating torn or corrupt tail"
        );
    }
    if scan.valid_end != file_bytes {
        file.truncate(scan.valid_end).await?;
        file.fdatasync().await?;
    }
    let mut max_ts = scan.max_timestamp;
    if !rebuild {
        max_ts = max_ts.max(index.times.last().map(|&(t, _)| t).unwrap_or(-1));
    }
    let size = scan.valid_end;
    let align = file.alignment();
    let tail_len = (size % align) as usize;
    let tail_block = if tail_len > 0 {
        file.read_at(size - tail_len as u64, tail_len)
            .await?
            .to_vec()
    } else {
        Vec::new()
    };
    Ok(Segment {
        base_offset: base,
        zero: ZeroAhead::new(file.clone(), size.div_ceil(align) * align),
        file,
        path,
        size,
        written: size,
        tail_block,
        pending: VecDeque::new(),
        pending_bytes: 0,
        index,
        next_offset: scan.next_offset,
        max_timestamp: max_ts,
        created_ms: now_ms(),
        aborted: Vec::new(),
    })
}

pub struct ScanResult {
    pub valid_end: u64,
    pub next_offset: i64,
    pub max_timestamp: i64,
}

/// Walks batches from `pos` (holding offset `expected`) to `end`, checking each one, optionally
/// rebuilding the index. Stops at the first batch that is torn, corrupt or out of sequence.
async fn scan_segment(
    file: &SegmentFile,
    mut pos: u64,
    expected: i64,
    end: u64,
    rebuild: Option<(&mut SegmentIndex, u32)>,
) -> Result<ScanResult> {
    let mut scan = Scan {
        base: expected,
        expected,
        max_ts: -1,
        rebuild,
    };
    let stop = |at: u64, scan: &Scan<'_>| ScanResult {
        valid_end: at,
        next_offset: scan.expected,
        max_timestamp: scan.max_ts,
    };
    while pos < end {
        let want = ((end - pos) as usize).min(SCAN_CHUNK_BYTES);
        let chunk = file.read_at(pos, want).await?;
        let mut at = 0usize;
        while at < chunk.len() {
            match batch::check_stored(&chunk[at..], Some(scan.expected)) {
                Stored::Valid { bytes } => {
                    scan.accept(&chunk[at..], pos + at as u64, bytes);
                    at += bytes;
                }
                Stored::Incomplete => {
                    // The batch may continue past this chunk: read again from its start, unless
                    // the file itself ends here (a torn tail).
                    let needed = Header::new(&chunk[at..])
                        .and_then(|h| h.total_bytes())
                        .unwrap_or(batch::HEADER_BYTES) as u64;
                    if pos + at as u64 + needed > end {
                        return Ok(stop(pos + at as u64, &scan));
                    }
                    if at == 0 {
                        // A single batch larger than the chunk: read it whole.
                        let whole = file.read_at(pos, needed as usize).await?;
                        match batch::check_stored(&whole, Some(scan.expected)) {
                            Stored::Valid { bytes } => {
                                scan.accept(&whole, pos, bytes);
                                at += bytes;
                            }
                            _ => return Ok(stop(pos, &scan)),
                        }
                    }
                    break;
                }
                Stored::Corrupt => return Ok(stop(pos + at as u64, &scan)),
            }
        }
        pos += at as u64;
    }
    Ok(stop(pos, &scan))
}

/// What a recovery scan has learned so far.
struct Scan<'a> {
    base: i64,
    expected: i64,
    max_ts: i64,
    rebuild: Option<(&'a mut SegmentIndex, u32)>,
}

impl Scan<'_> {
    /// Takes in one valid batch found at `file_pos`.
    fn accept(&mut self, b: &[u8], file_pos: u64, bytes: usize) {
        let h = Header::new(b).expect("a valid batch has a header");
        if let Some((idx, interval)) = self.rebuild.as_mut() {
            idx.on_append(
                (self.expected - self.base) as u32,
                file_pos as u32,
                bytes as u32,
                h.max_timestamp(),
                *interval,
            );
        }
        self.max_ts = self.max_ts.max(h.max_timestamp());
        self.expected = h.last_offset() + 1;
    }
}

/// Reads batches from disk for a fetch at `offset`: skips whole batches below it and returns
/// the batches from there (at least one, then up to `max_bytes`), as one contiguous `Bytes`.
pub async fn read_from_disk(
    range: &DiskRange,
    offset: i64,
    max_bytes: usize,
) -> Result<Option<Bytes>> {
    Ok(read_from_disk_at(range, offset, max_bytes)
        .await?
        .map(|(_, b)| b))
}

/// The offset after the last whole batch in `bytes` (batches back to back).
fn next_offset_after(bytes: &[u8]) -> Option<i64> {
    let mut at = 0usize;
    let mut next = None;
    // Bounded: every step moves past one batch of at least a header.
    while at < bytes.len() {
        let h = Header::new(&bytes[at..])?;
        let total = h.total_bytes()?;
        if at + total > bytes.len() {
            break;
        }
        next = Some(h.last_offset() + 1);
        at += total;
    }
    next
}

/// Like `read_from_disk`, also returning the file position the bytes start at.
pub async fn read_from_disk_at(
    range: &DiskRange,
    offset: i64,
    max_bytes: usize,
) -> Result<Option<(u64, Bytes)>> {
    let mut pos = range.pos;
    loop {
        if pos >= range.end {
            return Ok(None);
        }
        let want = ((range.end - pos) as usize).min(max_bytes.max(64 << 10));
        let chunk = range.file.read_at(pos, want).await?;
        let mut at = 0usize;
        let mut start = None;
        while at < chunk.len() {
            let Some(h) = Header::new(&chunk[at..]) else {
                break;
            };
            let Some(total) = h.total_bytes() else {
                bail!("corrupt batch on disk at {}", pos + at as u64)
            };
            if start.is_none() && h.last_offset() < offset {
                if at + total > chunk.len() {
                    break;
                }
                at += total;
                continue;
            }
            let s = *start.get_or_insert(at);
            if at + total > chunk.len() {
                if at == s {
                    // The first batch is larger than what was read: read exactly it.
                    let whole = range.file.read_at(pos + at as u64, total).await?;
                    if whole.len() < total {
                        bail!("short read of a batch on disk");
                    }
                    return Ok(Some((pos + at as u64, Bytes::copy_from_slice(&whole))));
                }
                break;
            }
            if at > s && at + total - s > max_bytes {
                break;
            }
            at += total;
        }
        match start {
            Some(s) if at > s => {
                return Ok(Some((
                    pos + s as u64,
                    Bytes::copy_from_slice(&chunk[s..at]),
                )))
            }
            _ => {
                if at == 0 {
                    bail!("cannot parse batch on disk at {pos}");
                }
                pos += at as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::batch::test_batches::make;
    use std::cell::RefCell;

    fn run<F: std::future::Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let probe_dir = tempfile::tempdir().unwrap();
                prime_dma(probe_dir.path(), "probe").await.unwrap();
                f().await
            })
            .unwrap()
            .join()
            .unwrap();
    }

    async fn open_log(path: &Path, cfg: &LogConfig, clean: bool) -> RefCell<PartitionLog> {
        RefCell::new(
            PartitionLog::open(
                path.to_path_buf(),
                cfg.clone(),
                0,
                clean,
                Default::default(),
            )
            .await
            .unwrap(),
        )
    }

    async fn append_n(log: &RefCell<PartitionLog>, n: usize) {
        for i in 0..n {
            let b = make(4, 100, 1_000 + i as i64);
            let infos = batch::validate_produce(&b, 1 << 20).unwrap();
            loop {
                let r = log.borrow_mut().append(&b, &infos, now_ms());
                match r {
                    Ok(_) => break,
                    Err(AppendError::NeedsRoll) => {
                        PartitionLog::roll(log).await.unwrap();
                    }
                    Err(AppendError::Refused(code)) => panic!("refused with {code}"),
                }
            }
        }
    }

    async fn flush(log: &RefCell<PartitionLog>) {
        PartitionLog::write_all(log).await.unwrap();
        let files = log.borrow().files_to_sync();
        for f in files {
            f.fdatasync().await.unwrap();
        }
        let mut l = log.borrow_mut();
        l.durable_offset = l.written_offset;
    }

    /// Descriptors of this process open on files under `dir` with O_DSYNC set.
    fn dsync_fds_under(dir: &Path) -> usize {
        let dir = std::fs::canonicalize(dir).unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target.starts_with(&dir)))
            .filter(|e| {
                let info = std::fs::read_to_string(format!(
                    "/proc/self/fdinfo/{}",
                    e.file_name().to_string_lossy()
                ))
                .unwrap_or_default();
                info.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
                    .is_some_and(|flags| flags & libc::O_DSYNC as i64 != 0)
            })
            .count()
    }

    /// A durable write goes through an O_DSYNC descriptor and makes the log durable up to its
    /// end, but only when the log was durable up to where it starts: after a plain write, an
    /// fdatasync is still owed. What it wrote reads back after a reopen.
    #[test]
    fn durable_writes_count_only_from_a_durable_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let cfg = LogConfig::default();
            let log = open_log(&path, &cfg, true).await;
            assert_eq!(dsync_fds_under(&path), 0);
            append_n(&log, 3).await;
            PartitionLog::write_all_durable(&log).await.unwrap();
            {
                let l = log.borrow();
                assert_eq!((l.written_offset, l.durable_offset), (12, 12));
                assert_eq!(l.synced_bytes, l.written_bytes);
                assert!(l.files_to_sync().is_empty());
            }
            assert_eq!(dsync_fds_under(&path), 1);
            append_n(&log, 2).await;
            PartitionLog::write_all(&log).await.unwrap();
            append_n(&log, 2).await;
            PartitionLog::write_all_durable(&log).await.unwrap();
            {
                let l = log.borrow();
                assert_eq!((l.written_offset, l.durable_offset), (28, 12));
                assert!(l.synced_bytes < l.written_bytes);
                assert_eq!(l.files_to_sync().len(), 1);
            }
            flush(&log).await;
            // A sealed segment keeps only its ordinary descriptor.
            PartitionLog::roll(&log).await.unwrap();
            assert_eq!(dsync_fds_under(&path), 0);
            drop(log);
            let log = open_log(&path, &cfg, false).await;
            assert_eq!(log.borrow().log_end_offset, 28);
        });
    }

    /// A lone large batch that owns its buffer is stamped there (same memory, no copy); one
    /// whose buffer is shared, or not the whole frame, or small, is copied and the original
    /// bytes stay as they were. Both read back from disk stamped.
    #[test]
    fn append_frame_stamps_in_place_only_what_it_owns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let cfg = LogConfig::default();
            let log = open_log(&path, &cfg, true).await;
            // 300 records of 1 KiB: past the arena's batch limit.
            let large = || Bytes::copy_from_slice(&make(300, 1024, 5_000));
            assert!(large().len() > crate::storage::arena::ARENA_BATCH_BYTES_MAX);
            let mut stamped = Vec::new();
            // (records, whole_frame, keep another view, expect in place)
            let cases = [
                (large(), true, false, true),
                (large(), true, true, false),
                (large(), false, false, false),
                (
                    Bytes::copy_from_slice(&make(3, 100, 5_000)),
                    true,
                    false,
                    false,
                ),
            ];
            for (mut records, whole, keep_view, expect) in cases {
                let infos = batch::validate_produce(&records, 8 << 20).unwrap();
                let ptr = records.as_ptr();
                let view = keep_view.then(|| records.clone());
                let a = log
                    .borrow_mut()
                    .append_frame(&mut records, &infos, now_ms(), whole)
                    .unwrap();
                assert_eq!(a.in_place, expect);
                let (base, _, b) = &a.batches[0];
                assert_eq!(b.as_ptr() == ptr, expect, "same memory iff in place");
                assert_eq!(Header::new(b).unwrap().base_offset(), *base);
                if let Some(v) = view {
                    // The other view still sees the producer's bytes (base offset 0).
                    assert_eq!(Header::new(&v).unwrap().base_offset(), 0);
                    assert!(*base > 0);
                }
                stamped.push((*base, b.clone()));
            }
            flush(&log).await;
            for (base, b) in stamped {
                let range = log.borrow().locate(base).unwrap();
                let got = read_from_disk(&range, base, b.len())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(&got[..b.len()], &b[..]);
            }
        });
    }

    #[test]
    fn append_roll_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let mut cfg = LogConfig::default();
            cfg.segment_bytes = 10_000;
            cfg.index_interval_bytes = 1000;
            let log = open_log(&path, &cfg, true).await;
            append_n(&log, 100).await;
            flush(&log).await;
            assert_eq!(log.borrow().log_end_offset, 400);
            assert!(log.borrow().segments.len() >= 5);
            // Read offset 201 (inside the batch at 200) from disk.
            let range = log.borrow().locate(201).unwrap();
            let got = read_from_disk(&range, 201, 1).await.unwrap().unwrap();
            let h = Header::new(&got).unwrap();
            assert_eq!(h.base_offset(), 200);
            assert_eq!(
                batch::check_stored(&got, Some(200)),
                Stored::Valid { bytes: got.len() }
            );
            PartitionLog::close(&log).await.unwrap();
            drop(log);
            // Clean reopen.
            let log = open_log(&path, &cfg, true).await;
            assert_eq!(log.borrow().log_end_offset, 400);
            // Unclean reopen: everything is scanned again, same result.
            drop(log);
            let log = open_log(&path, &cfg, false).await;
            assert_eq!(log.borrow().log_end_offset, 400);
            assert_eq!(log.borrow().max_timestamp.0, 1_099 + 3);
            // Appending after reopen continues the offsets and the partial tail block.
            append_n(&log, 3).await;
            flush(&log).await;
            drop(log);
            let log = open_log(&path, &cfg, false).await;
            assert_eq!(log.borrow().log_end_offset, 412);
        });
    }

    /// Reads at every 37th offset below `end`: the first batch returned holds the offset.
    async fn reads_start_at_their_batch(log: &RefCell<PartitionLog>, end: i64) {
        for offset in (0..end).step_by(37) {
            let got = log.borrow().read_batches(offset, 1).await.unwrap().unwrap();
            let h = Header::new(&got).unwrap();
            assert!(
                h.base_offset() <= offset && offset <= h.last_offset(),
                "offset {offset}: batch {}-{}",
                h.base_offset(),
                h.last_offset()
            );
        }
    }

    /// Sealed segments keep a thinned in-memory index (one entry per
    /// SEALED_INDEX_STRIDE_BYTES), after a roll and after a reopen. Reads at any offset still
    /// start at the batch holding it, and a sequential reader continues exactly where its last
    /// read ended (the read hint), not at the thinned entry before it.
    #[test]
    fn sealed_indexes_are_thinned_and_reads_stay_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let mut cfg = LogConfig::default();
            cfg.segment_bytes = 1 << 20;
            cfg.index_interval_bytes = 1000;
            let log = open_log(&path, &cfg, true).await;
            append_n(&log, 6000).await;
            flush(&log).await;
            let end = log.borrow().log_end_offset;
            assert_eq!(end, 24_000);
            let check = |log: &RefCell<PartitionLog>| {
                let l = log.borrow();
                let sealed: Vec<&Segment> =
                    l.segments.values().take(l.segments.len() - 1).collect();
                assert!(sealed.len() >= 2, "{} segments", l.segments.len());
                let bound = (1usize << 20) / SEALED_INDEX_STRIDE_BYTES as usize + 1;
                for seg in sealed {
                    assert!(
                        seg.index.offsets.len() <= bound,
                        "segment {}: {} entries",
                        seg.base_offset,
                        seg.index.offsets.len()
                    );
                }
                // The active segment keeps every entry (about one per 1000 bytes).
                assert!(l.active().index.offsets.len() > 100);
            };
            for reopen in [false, true] {
                if reopen {
                    PartitionLog::close(&log).await.unwrap();
                    let reopened = open_log(&path, &cfg, true).await;
                    *log.borrow_mut() = reopened.into_inner();
                }
                check(&log);
                // Any offset: the first batch returned holds it.
                reads_start_at_their_batch(&log, end).await;
                // Sequentially, in reads of a few batches: each read starts exactly where
                // the previous one ended.
                let mut offset = 0;
                let mut ended_at: Option<(i64, u64)> = None;
                while offset < end {
                    let range = log.borrow().locate(offset).unwrap();
                    if let Some((base, pos)) = ended_at {
                        if base == range.segment_base {
                            assert_eq!(range.pos, pos, "offset {offset}");
                        }
                    }
                    let (start, got) = read_from_disk_at(&range, offset, 2000)
                        .await
                        .unwrap()
                        .unwrap();
                    log.borrow().note_read(&range, offset, start, &got);
                    assert_eq!(Header::new(&got).unwrap().base_offset(), offset);
                    ended_at = Some((range.segment_base, start + got.len() as u64));
                    offset = next_offset_after(&got).unwrap();
                }
                assert_eq!(offset, end);
            }
        });
    }

    /// The active segment's in-memory index is bounded too: with an entry per batch
    /// (index.interval.bytes 1) and 10,000 batches in one segment, it keeps its newest
    /// DENSE_TAIL_ENTRIES..2x at full density and the rest thinned, instead of 10,000 entries.
    /// Reads at any offset, and timestamp lookups, still start at or before the right batch,
    /// before and after a clean reopen (whose index files are written from the thinned index).
    #[test]
    fn the_active_segments_index_is_bounded_and_reads_stay_exact() {
        use super::super::index::DENSE_TAIL_ENTRIES;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let mut cfg = LogConfig::default();
            cfg.segment_bytes = 64 << 20;
            cfg.index_interval_bytes = 1;
            let log = open_log(&path, &cfg, true).await;
            append_n(&log, 10_000).await;
            flush(&log).await;
            let end = log.borrow().log_end_offset;
            assert_eq!(end, 40_000);
            for reopen in [false, true] {
                if reopen {
                    PartitionLog::close(&log).await.unwrap();
                    let reopened = open_log(&path, &cfg, true).await;
                    *log.borrow_mut() = reopened.into_inner();
                }
                {
                    let l = log.borrow();
                    assert_eq!(l.segments.len(), 1);
                    let size = l.active().size as usize;
                    let bound =
                        2 * DENSE_TAIL_ENTRIES + size / SEALED_INDEX_STRIDE_BYTES as usize + 1;
                    let n = l.active().index.offsets.len();
                    assert!(n <= bound, "reopen {reopen}: {n} entries > {bound}");
                    assert!(n >= DENSE_TAIL_ENTRIES, "reopen {reopen}: {n} entries");
                    assert!(l.active().index.times.len() <= bound);
                }
                reads_start_at_their_batch(&log, end).await;
                // Batch i has max timestamp 1000 + i and offsets 4i..4i+3.
                for i in (0..10_000i64).step_by(101) {
                    let start = log.borrow().offset_scan_start_for_time(1_000 + i).unwrap();
                    assert!(start <= 4 * i, "ts {}: scan starts at {start}", 1_000 + i);
                }
            }
        });
    }

    /// Reads every batch of `log` from disk, for byte comparisons.
    async fn all_bytes(log: &RefCell<PartitionLog>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut offset = log.borrow().log_start_offset;
        let end = log.borrow().log_end_offset;
        while offset < end {
            // Readers step over segments with nothing at or after `offset` (emptied by the
            // cleaner or by recovery).
            let mut range = log.borrow().locate(offset);
            let mut chunk = None;
            while let Some(r) = range {
                chunk = read_from_disk(&r, offset, 1 << 20).await.unwrap();
                if chunk.is_some() {
                    break;
                }
                range = r.next_segment.and_then(|n| log.borrow().locate_segment(n));
            }
            let Some(chunk) = chunk else { break };
            let mut at = 0;
            while at < chunk.len() {
                let h = Header::new(&chunk[at..]).unwrap();
                offset = h.last_offset() + 1;
                at += h.total_bytes().unwrap();
            }
            out.extend_from_slice(&chunk);
        }
        out
    }

    /// A follower copies a leader's batches byte for byte, keeps their epochs in its epoch
    /// cache (and checkpoint), and after diverging (batches of an epoch the new leader never
    /// had) truncates to the new leader's end of the common epoch, across segments, and
    /// reopens to the same state.
    /// Zero-ahead: reserved space past the data is zeroed in the background, data keeps
    /// landing intact while it runs, and neither a clean close (file cut to its logical size)
    /// nor a reopen without one (recovery scan, every CRC checked) sees the zeros as data.
    #[test]
    fn zeroes_ahead_of_the_data_without_touching_it() {
        use crate::storage::zero_ahead::{zeroed_bytes, ZERO_STEP_BYTES};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let cfg = LogConfig::default();
            let log = open_log(&path, &cfg, true).await;
            for _ in 0..6 {
                append_n(&log, 400).await;
                flush(&log).await;
            }
            let zero = log.borrow().active().zero.clone();
            let data_end = || log.borrow().active().written;
            // Bounded: the zero writes in flight finish within the deadline.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while zero.done() < data_end() + ZERO_STEP_BYTES && std::time::Instant::now() < deadline
            {
                glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            }
            assert!(
                zero.done() >= data_end() + ZERO_STEP_BYTES,
                "zeroed {} of data {}",
                zero.done(),
                data_end()
            );
            assert!(zeroed_bytes() >= ZERO_STEP_BYTES);
            // The blocks past the data hold zeros (the shard's shared zero buffer is written
            // as it was filled).
            let file = log.borrow().active().path.clone();
            let bytes = std::fs::read(&file).unwrap();
            let from = (data_end().div_ceil(4096) * 4096) as usize;
            let to = (zero.done() as usize).min(bytes.len());
            assert!(
                to >= from + ZERO_STEP_BYTES as usize,
                "file {} bytes",
                bytes.len()
            );
            assert!(
                bytes[from..to].iter().all(|&b| b == 0),
                "non-zero byte past the data"
            );
            // More data on the zeroed blocks, while zeroing goes on ahead of it.
            for _ in 0..6 {
                append_n(&log, 400).await;
                flush(&log).await;
            }
            let (end, size, file) = {
                let l = log.borrow();
                (l.log_end_offset, l.active().size, l.active().path.clone())
            };
            assert_eq!(end, 12 * 400 * 4);
            // A reopen without a clean close: recovery stops at the zeros.
            let reopened = open_log(&path, &cfg, false).await;
            assert_eq!(reopened.borrow().log_end_offset, end);
            drop(reopened);
            PartitionLog::close(&log).await.unwrap();
            assert_eq!(std::fs::metadata(&file).unwrap().len(), size);
            let reopened = open_log(&path, &cfg, true).await;
            assert_eq!(reopened.borrow().log_end_offset, end);
        });
    }

    /// A roll while a zero write is in flight, with an append arriving while the roll waits:
    /// the append waits for the roll and lands in the new segment, and survives a reopen. (The
    /// wait for the zero write once came between the roll's last write and the seal, and the
    /// seal found the new batch unwritten and panicked.)
    #[test]
    fn a_roll_during_zeroing_keeps_appends_that_arrive_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let cfg = LogConfig::default();
            let log = Rc::new(open_log(&path, &cfg, true).await);
            append_n(&log, 50).await;
            flush(&log).await;
            // A data write starts the next zero write; it is in flight until the executor runs it.
            append_n(&log, 1).await;
            PartitionLog::write_all(&log).await.unwrap();
            assert!(
                log.borrow().active().zero.writing(),
                "a zero write is in flight"
            );
            let roller = {
                let log = log.clone();
                glommio::spawn_local(async move { PartitionLog::roll(&log).await })
            };
            glommio::yield_if_needed().await;
            glommio::executor().yield_now().await;
            // The roll has begun: an append waits for it (the shard waits on the I/O lock).
            let b = make(4, 100, 9_000);
            let infos = batch::validate_produce(&b, 1 << 20).unwrap();
            let r = log.borrow_mut().append(&b, &infos, now_ms());
            assert!(matches!(r, Err(AppendError::NeedsRoll)));
            roller.await.unwrap();
            append_n(&log, 1).await;
            flush(&log).await;
            let end = log.borrow().log_end_offset;
            assert_eq!(end, 52 * 4);
            PartitionLog::close(&log).await.unwrap();
            let reopened = open_log(&path, &cfg, false).await;
            assert_eq!(reopened.borrow().log_end_offset, end);
        });
    }

    /// Appends keep arriving while a roll seals the old segment (its truncate, fdatasync and
    /// index writes all await): none of them may land in the sealed segment. (They once did:
    /// they were queued there, never written, and the new segment began after them, so
    /// acknowledged offsets were missing from disk; CI's overload soak found it.)
    #[test]
    fn appends_during_a_roll_are_never_left_in_the_sealed_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let cfg = LogConfig::default();
            let log = Rc::new(open_log(&path, &cfg, true).await);
            append_n(&log, 20).await;
            flush(&log).await;
            let done = Rc::new(std::cell::Cell::new(false));
            let roller = {
                let (log, done) = (log.clone(), done.clone());
                glommio::spawn_local(async move {
                    let r = PartitionLog::roll(&log).await;
                    done.set(true);
                    r
                })
            };
            // Bounded: the roll finishes (real I/O), one append per executor turn meanwhile.
            let mut appended = 20;
            let mut during = 0;
            while !done.get() {
                let b = make(4, 100, 5_000 + appended as i64);
                let infos = batch::validate_produce(&b, 1 << 20).unwrap();
                let r = log.borrow_mut().append(&b, &infos, now_ms());
                match r {
                    Ok(_) => {
                        appended += 1;
                        during += 1;
                    }
                    Err(AppendError::NeedsRoll) => {}
                    Err(AppendError::Refused(code)) => panic!("refused with {code}"),
                }
                glommio::executor().yield_now().await;
            }
            roller.await.unwrap();
            append_n(&log, 1).await;
            appended += 1;
            flush(&log).await;
            let end = log.borrow().log_end_offset;
            assert_eq!(end, appended * 4, "{during} appended during the roll");
            assert_eq!(
                log.borrow().ledger.get(),
                0,
                "every pending byte was written"
            );
            let before = all_bytes(&log).await;
            assert_eq!(Header::new(&before).unwrap().base_offset(), 0);
            PartitionLog::close(&log).await.unwrap();
            let reopened = open_log(&path, &cfg, false).await;
            assert_eq!(reopened.borrow().log_end_offset, end);
            let after = all_bytes(&reopened).await;
            assert_eq!(after, before, "every offset is on disk, in one piece");
        });
    }

    /// Open transactions hold back the LSO; markers end them, ABORTs land in the aborted
    /// list; a newer marker epoch fences the old one; all of it survives a clean reopen (from
    /// `.txnindex` files and the snapshot) and an unclean one (replayed from the log).
    #[test]
    fn transactions_markers_lso_and_aborted_index_survive_reopen() {
        use crate::storage::batch::test_batches::make_transactional;
        use crate::storage::txn::{marker_batch, Marker};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let mut cfg = LogConfig::default();
            cfg.segment_bytes = 2_000;
            let log = Rc::new(open_log(&path, &cfg, true).await);
            let put_with = |b: Bytes, infos: Vec<BatchInfo>| {
                let log = log.clone();
                async move {
                    loop {
                        let r = log.borrow_mut().append(&b, &infos, now_ms());
                        match r {
                            Ok(a) => return a.base_offset,
                            Err(AppendError::NeedsRoll) => PartitionLog::roll(&log).await.unwrap(),
                            Err(AppendError::Refused(c)) => panic!("refused {c}"),
                        }
                    }
                }
            };
            let put = |b: Bytes| {
                let infos = batch::validate_produce(&b, 1 << 20).unwrap();
                put_with(b, infos)
            };
            let marker = |pid, epoch, m| {
                let b = marker_batch(pid, epoch, 0, m, 1_000);
                let h = Header::new(&b).unwrap();
                let info = BatchInfo {
                    start: 0,
                    bytes: b.len(),
                    offset_count: 1,
                    max_timestamp: h.max_timestamp(),
                    producer_id: pid,
                    producer_epoch: epoch,
                    base_sequence: -1,
                    transactional: true,
                };
                put_with(b, vec![info])
            };
            append_n(&log, 6).await; // 0..24, no transactions (more than one segment)
            assert_eq!(log.borrow().last_stable_offset(24), 24);
            let a0 = put(make_transactional(5, 1, 0, 0)).await; // pid 1 opens at 24
            assert_eq!(a0, 24);
            let b0 = put(make_transactional(5, 2, 0, 0)).await; // pid 2 opens at 29
            put(make_transactional(5, 1, 0, 5)).await;
            assert_eq!(log.borrow().last_stable_offset(100), 24);
            let m1 = marker(1, 0, Marker::Abort).await; // pid 1 aborts
            assert_eq!(log.borrow().last_stable_offset(100), b0);
            let m2 = marker(2, 0, Marker::Commit).await;
            let end = log.borrow().log_end_offset;
            assert_eq!(log.borrow().last_stable_offset(end), end);
            let aborted = log.borrow().aborted_between(0, end);
            assert_eq!(aborted.len(), 1);
            assert_eq!(
                (
                    aborted[0].producer_id,
                    aborted[0].first_offset,
                    aborted[0].last_offset
                ),
                (1, 24, m1)
            );
            assert_eq!(aborted[0].last_stable_offset, b0, "pid 2 was still open");
            assert!(m2 > m1);
            // pid 1 opens again, then a marker with epoch 1 (a fenced abort) ends it.
            put(make_transactional(3, 1, 0, 10)).await;
            let open_at = log.borrow().open_transaction(1).unwrap();
            marker(1, 1, Marker::Abort).await;
            assert!(log.borrow().open_transaction(1).is_none());
            // The old epoch is now refused.
            let old = make_transactional(1, 1, 0, 13);
            let infos = batch::validate_produce(&old, 1 << 20).unwrap();
            let r = log.borrow_mut().append(&old, &infos, now_ms());
            assert!(matches!(r, Err(AppendError::Refused(47))));
            // pid 2 leaves a transaction open.
            let open2 = put(make_transactional(2, 2, 0, 5)).await;
            flush(&log).await;
            let end = log.borrow().log_end_offset;
            let all_aborted = log.borrow().aborted_between(0, end);
            assert_eq!(all_aborted.len(), 2);
            assert_eq!(all_aborted[1].first_offset, open_at);
            assert!(log.borrow().segments.len() > 1, "several segments");
            // Unclean reopen: replayed.
            let reopened = open_log(&path, &cfg, false).await;
            assert_eq!(reopened.borrow().aborted_between(0, end), all_aborted);
            assert_eq!(reopened.borrow().last_stable_offset(end), open2);
            drop(reopened);
            // Clean reopen: from .txnindex files and the snapshot.
            let log2 = open_log(&path, &cfg, false).await;
            PartitionLog::close(&log2).await.unwrap();
            let reopened = open_log(&path, &cfg, true).await;
            assert_eq!(reopened.borrow().aborted_between(0, end), all_aborted);
            assert_eq!(reopened.borrow().last_stable_offset(end), open2);
            assert_eq!(reopened.borrow().aborted_between(m1 + 1, end).len(), 1);
        });
    }

    /// Compaction keeps the latest record per key in the sealed segments, with offsets
    /// unchanged (gaps where records went), leaves the active segment alone, drops a tombstone
    /// on the pass after the one that made its segment clean (delete.retention.ms 0), and the
    /// cleaned log reads the same after an unclean reopen.
    #[test]
    fn compaction_keeps_the_latest_record_per_key() {
        use bytes::BytesMut;
        use kafka_protocol::records::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let mut cfg = LogConfig::default();
            cfg.segment_bytes = 600;
            cfg.compact = true;
            cfg.delete = false;
            cfg.min_cleanable_dirty_ratio = 0.0;
            cfg.delete_retention_ms = 0;
            let log = Rc::new(open_log(&path, &cfg, true).await);
            let keyed = |key: &str, value: Option<String>| {
                let r = Record {
                    transactional: false,
                    control: false,
                    partition_leader_epoch: 0,
                    producer_id: -1,
                    producer_epoch: -1,
                    timestamp_type: TimestampType::Creation,
                    delete_horizon: false,
                    offset: 0,
                    sequence: -1,
                    timestamp: 1_000,
                    key: Some(Bytes::from(key.to_string())),
                    value: value.map(Bytes::from),
                    headers: Default::default(),
                };
                let mut b = BytesMut::new();
                RecordBatchEncoder::encode(
                    &mut b,
                    &[r],
                    &RecordEncodeOptions {
                        version: 2,
                        compression: Compression::None,
                    },
                )
                .unwrap();
                b.freeze()
            };
            let put = |b: Bytes| {
                let log = log.clone();
                async move {
                    let infos = batch::validate_produce(&b, 1 << 20).unwrap();
                    loop {
                        let r = log.borrow_mut().append(&b, &infos, now_ms());
                        match r {
                            Ok(a) => return a.base_offset,
                            Err(AppendError::NeedsRoll) => PartitionLog::roll(&log).await.unwrap(),
                            Err(AppendError::Refused(c)) => panic!("refused {c}"),
                        }
                    }
                }
            };
            // 8 rounds over 5 keys; k4's last word is a tombstone.
            let mut latest: BTreeMap<String, (i64, Option<String>)> = BTreeMap::new();
            for round in 0..8 {
                for k in 0..5 {
                    let key = format!("k{k}");
                    let value = (!(k == 4 && round == 7)).then(|| format!("{key}-r{round}"));
                    let o = put(keyed(&key, value.clone())).await;
                    latest.insert(key, (o, value));
                }
            }
            flush(&log).await;
            let records = |bytes: Vec<u8>| {
                let mut buf = Bytes::from(bytes);
                let mut out = Vec::new();
                while buf.len() >= batch::HEADER_BYTES {
                    let set = RecordBatchDecoder::decode(&mut buf).unwrap();
                    for r in set.records {
                        out.push((
                            r.offset,
                            String::from_utf8(r.key.unwrap().to_vec()).unwrap(),
                            r.value.map(|v| String::from_utf8(v.to_vec()).unwrap()),
                        ));
                    }
                }
                out
            };
            let before = records(all_bytes(&log).await);
            assert_eq!(before.len(), 40);
            assert!(log.borrow().segments.len() > 3, "several sealed segments");
            let active = log.borrow().active().base_offset;
            let c = crate::storage::compact::clean(&log, now_ms(), 1_000, 0)
                .await
                .unwrap()
                .expect("a pass was due");
            assert_eq!(c.cleaned_to, active);
            assert!(c.records_removed > 0 && c.bytes_after < c.bytes_before);
            let after = records(all_bytes(&log).await);
            // Below the active segment (what the key map covers), only each key's latest
            // record there survives (a tombstone included); the active segment is untouched;
            // offsets never change.
            let mut latest_sealed: BTreeMap<String, i64> = BTreeMap::new();
            for (o, k, _) in before.iter().filter(|(o, ..)| *o < active) {
                latest_sealed.insert(k.clone(), *o);
            }
            let kept: Vec<_> = before
                .iter()
                .filter(|(o, k, _)| *o >= active || latest_sealed[k] == *o)
                .cloned()
                .collect();
            assert_eq!(after, kept);
            assert!(after.len() < before.len() / 2);
            assert!(
                after.iter().any(|(_, k, v)| k == "k4" && v.is_none()),
                "the tombstone stays one pass"
            );
            // More writes make new dirty segments. A tombstone goes in the first pass that finds
            // it in an already clean segment (Kafka's delete horizon, here 0 ms).
            let mut passes = 0;
            while passes < 2 {
                for round in 8..12 {
                    for k in 0..4 {
                        put(keyed(&format!("k{k}"), Some(format!("k{k}-r{round}")))).await;
                    }
                }
                flush(&log).await;
                crate::storage::compact::clean(&log, now_ms(), 1_000, 0)
                    .await
                    .unwrap()
                    .expect("due");
                passes += 1;
            }
            let again = records(all_bytes(&log).await);
            let active = log.borrow().active().base_offset;
            assert!(latest["k4"].0 < active, "the tombstone's segment is sealed");
            assert!(
                !again.iter().any(|(_, k, _)| k == "k4"),
                "the tombstone is gone"
            );
            let end = log.borrow().log_end_offset;
            drop(log);
            let reopened = open_log(&path, &cfg, false).await;
            assert_eq!(reopened.borrow().log_end_offset, end);
            assert_eq!(records(all_bytes(&reopened).await), again);
        });
    }

    #[test]
    fn replica_append_epochs_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let (lp, fp) = (dir.path().join("leader"), dir.path().join("follower"));
        run(move || async move {
            let mut cfg = LogConfig::default();
            cfg.segment_bytes = 3_000;
            cfg.index_interval_bytes = 500;
            let leader = open_log(&lp, &cfg, true).await;
            append_n(&leader, 10).await; // epoch 0: offsets 0..40
            leader.borrow_mut().leader_epoch = 2;
            append_n(&leader, 10).await; // epoch 2: 40..80
            flush(&leader).await;
            assert_eq!(leader.borrow().epochs.entries(), &[(0, 0), (2, 40)]);
            let follower = open_log(&fp, &cfg, true).await;
            // Copy in pieces, as fetches would.
            while follower.borrow().log_end_offset < 80 {
                let next = follower.borrow().log_end_offset;
                let range = leader.borrow().locate(next).unwrap();
                let chunk = read_from_disk(&range, next, 700).await.unwrap().unwrap();
                let batches = batch::validate_replica(&chunk, next).unwrap();
                assert!(!batches.is_empty());
                loop {
                    let r = follower.borrow_mut().append_replica(&batches);
                    match r {
                        Ok(()) => break,
                        Err(AppendError::NeedsRoll) => PartitionLog::roll(&follower).await.unwrap(),
                        Err(AppendError::Refused(c)) => panic!("refused {c}"),
                    }
                }
            }
            flush(&follower).await;
            assert_eq!(all_bytes(&follower).await, all_bytes(&leader).await);
            assert_eq!(follower.borrow().epochs.entries(), &[(0, 0), (2, 40)]);
            // The follower then leads epoch 3 alone for a while (records the others never get).
            follower.borrow_mut().leader_epoch = 3;
            append_n(&follower, 12).await; // 80..128
            flush(&follower).await;
            assert!(follower.borrow().segments.len() > 3);
            // The real new leader (epoch 4) never had epoch 3: it ended epoch 2 at 80.
            assert_eq!(leader.borrow().epochs.end_offset_for(3, 80), (2, 80));
            PartitionLog::truncate_to(&follower, 80).await.unwrap();
            assert_eq!(follower.borrow().log_end_offset, 80);
            assert_eq!(follower.borrow().epochs.entries(), &[(0, 0), (2, 40)]);
            assert_eq!(all_bytes(&follower).await, all_bytes(&leader).await);
            // Truncating mid-batch cuts the whole batch; the log reopens to the same end.
            PartitionLog::truncate_to(&follower, 42).await.unwrap();
            assert_eq!(follower.borrow().log_end_offset, 40);
            assert_eq!(follower.borrow().epochs.entries(), &[(0, 0)]);
            drop(follower);
            let follower = open_log(&fp, &cfg, false).await;
            assert_eq!(follower.borrow().log_end_offset, 40);
            assert_eq!(follower.borrow().epochs.entries(), &[(0, 0)]);
            let lead = all_bytes(&leader).await;
            let got = all_bytes(&follower).await;
            assert_eq!(&lead[..got.len()], &got[..]);
        });
    }

    /// A follower behind its leader's log start empties its log and restarts at that offset;
    /// the log reopens there and takes the leader's batches from it.
    #[test]
    fn reset_to_restarts_an_emptied_log_at_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let mut cfg = LogConfig::default();
            cfg.segment_bytes = 3_000;
            let log = open_log(&path, &cfg, true).await;
            append_n(&log, 12).await;
            flush(&log).await;
            PartitionLog::reset_to(&log, 1_000).await.unwrap();
            {
                let l = log.borrow();
                assert_eq!((l.log_start_offset, l.log_end_offset), (1_000, 1_000));
                assert_eq!(l.segments.len(), 1);
                assert!(l.epochs.entries().is_empty());
            }
            append_n(&log, 2).await;
            flush(&log).await;
            drop(log);
            let log = open_log(&path, &cfg, false).await;
            let l = log.borrow();
            assert_eq!((l.log_start_offset, l.log_end_offset), (1_000, 1_008));
        });
    }

    /// Batches appended while a write is in flight are taken by the same `write_all` loop; the
    /// ledger must come back to exactly zero (it once leaked those bytes and wedged the shard).
    #[test]
    fn pending_ledger_balances_with_appends_during_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let cfg = LogConfig::default();
            let ledger: Rc<PendingLedger> = Default::default();
            let log = Rc::new(RefCell::new(
                PartitionLog::open(path.clone(), cfg, 0, true, ledger.clone())
                    .await
                    .unwrap(),
            ));
            for round in 0..20 {
                append_n(&log, 50).await;
                assert_eq!(ledger.get(), log.borrow().pending_bytes());
                let l2 = log.clone();
                let writer =
                    glommio::spawn_local(async move { PartitionLog::write_all(&l2).await });
                // Appends land while the write is in flight.
                glommio::executor().yield_task_queue_now().await;
                append_n(&log, 10 + round).await;
                writer.await.unwrap();
                PartitionLog::write_all(&log).await.unwrap();
                assert_eq!(log.borrow().pending_bytes(), 0);
                assert_eq!(ledger.get(), 0, "round {round}: ledger leaked");
            }
            log.borrow_mut().discard_pending();
            assert_eq!(ledger.get(), 0);
        });
    }

    /// A write in flight when its log is discarded (the partition deleted, or taken offline by a
    /// failed sync) and that then fails must not put its bytes back in the ledger: the discard
    /// already settled the log's share, and nobody would release them again (the shard's
    /// backpressure budget shrank for good; debug builds failed the ledger check).
    #[test]
    fn a_failed_write_after_a_discard_leaves_the_ledger_balanced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let ledger: Rc<PendingLedger> = Default::default();
            let log = Rc::new(RefCell::new(
                PartitionLog::open(path.clone(), LogConfig::default(), 0, true, ledger.clone())
                    .await
                    .unwrap(),
            ));
            append_n(&log, 50).await;
            // `write_all_with`'s steps, with the discard landing while the write is in flight
            // and the write then failing.
            let w = log.borrow_mut().take_write(false).expect("pending batches");
            append_n(&log, 5).await;
            assert_eq!(ledger.get(), log.borrow().pending_bytes());
            log.borrow_mut().discard_pending();
            assert_eq!(ledger.get(), 0);
            log.borrow_mut().abort_write(w);
            assert_eq!(
                log.borrow().pending_bytes(),
                0,
                "a discarded log took batches back"
            );
            assert_eq!(ledger.get(), 0, "ledger leaked the aborted write's bytes");
            // And nothing is written to a discarded log's files any more.
            assert!(log.borrow_mut().take_write(false).is_none());
            PartitionLog::write_all(&log).await.unwrap();
            assert_eq!(ledger.get(), 0);
            // Nor is it rolled: sealing would cut the segment at a size that counts the
            // dropped batches, and a clean reopen would read that range as batches.
            let segments = log.borrow().segments.len();
            assert!(PartitionLog::roll(&log).await.is_err());
            assert_eq!(log.borrow().segments.len(), segments);
        });
    }

    /// A rolled segment that recovery empties (its first batch corrupt) used to leave the log
    /// start pointing at nothing: reads from the beginning returned no data forever. Now the
    /// empty segment is dropped and the log starts at the next one; a hole inside the log is
    /// stepped over.
    #[test]
    fn emptied_and_truncated_rolled_segments_do_not_hide_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let mut cfg = LogConfig::default();
            cfg.segment_bytes = 2_000;
            let log = open_log(&path, &cfg, true).await;
            append_n(&log, 30).await;
            flush(&log).await;
            PartitionLog::close(&log).await.unwrap();
            let bases: Vec<i64> = log.borrow().segments.keys().copied().collect();
            let end = log.borrow().log_end_offset;
            drop(log);
            assert!(bases.len() >= 4, "{bases:?}");
            let batch_len = make(4, 100, 0).len();
            // Corrupt the first batch of segment 0 and the second batch of segment 2; without
            // their index files recovery rescans them.
            for (base, at) in [(bases[0], 0usize), (bases[2], 1)] {
                let seg = path.join(segment_file_name(base, "log"));
                let mut d = std::fs::read(&seg).unwrap();
                d[at * batch_len + 70] ^= 1;
                std::fs::write(&seg, d).unwrap();
                std::fs::remove_file(path.join(segment_file_name(base, "index"))).unwrap();
            }
            let log = open_log(&path, &cfg, false).await;
            assert_eq!(log.borrow().log_start_offset, bases[1], "log start moved");
            assert!(!path.join(segment_file_name(bases[0], "log")).exists());
            assert_eq!(log.borrow().log_end_offset, end);
            // From the beginning: the first intact batch.
            let got = log.borrow().read_batches(0, 1).await.unwrap().unwrap();
            assert_eq!(Header::new(&got).unwrap().base_offset(), bases[1]);
            // Inside the hole of segment 2 (its batches from offset base+4 are gone): the next
            // segment's first batch.
            let got = log
                .borrow()
                .read_batches(bases[2] + 5, 1)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(Header::new(&got).unwrap().base_offset(), bases[3]);
            // Everything else reads back whole.
            let mut offset = bases[1];
            let mut batches = 0;
            while offset < end {
                let Some(b) = log.borrow().read_batches(offset, 1).await.unwrap() else {
                    break;
                };
                let h = Header::new(&b).unwrap();
                assert!(h.base_offset() >= offset);
                offset = h.last_offset() + 1;
                batches += 1;
            }
            assert_eq!(offset, end);
            // Lost: all of segment 0, and segment 2 from its second batch on (4 offsets each).
            let lost = (bases[1] - bases[0]) / 4 + (bases[3] - bases[2]) / 4 - 1;
            assert_eq!(batches as i64, 30 - lost);
        });
    }

    #[test]
    fn torn_and_flipped_tails_are_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let cfg = LogConfig::default();
            let log = open_log(&path, &cfg, true).await;
            append_n(&log, 10).await;
            flush(&log).await;
            drop(log);
            let seg = path.join(segment_file_name(0, "log"));
            let p2 = seg.clone();
            // The file is preallocated: zeros follow the data. Tear the last batch in half.
            let full = blocking(move || std::fs::read(&p2).unwrap()).await;
            let batch_len = make(4, 100, 0).len();
            let p3 = seg.clone();
            blocking(move || {
                let f = std::fs::OpenOptions::new().write(true).open(&p3).unwrap();
                f.set_len((batch_len * 10 - batch_len / 2) as u64).unwrap();
            })
            .await;
            assert!(full.len() > batch_len * 10);
            let log = open_log(&path, &cfg, false).await;
            assert_eq!(log.borrow().log_end_offset, 36);
            drop(log);
            // Flip one bit inside batch 5: batches 5.. are dropped.
            let p4 = seg.clone();
            blocking(move || {
                let mut d = std::fs::read(&p4).unwrap();
                d[batch_len * 5 + 70] ^= 1;
                std::fs::write(&p4, d).unwrap();
            })
            .await;
            let log = open_log(&path, &cfg, false).await;
            assert_eq!(log.borrow().log_end_offset, 20);
            let size = blocking(move || std::fs::metadata(&seg).unwrap().len()).await;
            assert_eq!(size, (batch_len * 5) as u64);
        });
    }

    fn append_idempotent(
        log: &RefCell<PartitionLog>,
        pid: i64,
        epoch: i16,
        seq: i32,
    ) -> Result<(i64, bool), i16> {
        let b = crate::storage::batch::test_batches::make_idempotent(3, pid, epoch, seq);
        let infos = batch::validate_produce(&b, 1 << 20).unwrap();
        match log.borrow_mut().append(&b, &infos, now_ms()) {
            Ok(a) => Ok((a.base_offset, a.duplicate)),
            Err(AppendError::Refused(c)) => Err(c),
            Err(AppendError::NeedsRoll) => panic!("no roll expected"),
        }
    }

    #[test]
    fn idempotent_producer_state_survives_reopen_with_and_without_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let cfg = LogConfig::default();
            let log = open_log(&path, &cfg, true).await;
            assert_eq!(append_idempotent(&log, 5, 0, 0), Ok((0, false)));
            assert_eq!(append_idempotent(&log, 5, 0, 3), Ok((3, false)));
            assert_eq!(
                append_idempotent(&log, 5, 0, 0),
                Ok((0, true)),
                "duplicate answered with its offset"
            );
            assert_eq!(
                append_idempotent(&log, 5, 0, 9),
                Err(crate::kafka::errors::OUT_OF_ORDER_SEQUENCE_NUMBER)
            );
            assert_eq!(log.borrow().log_end_offset, 6, "nothing written twice");
            flush(&log).await;
            PartitionLog::close(&log).await.unwrap();
            drop(log);
            // With the snapshot written at close.
            let log = open_log(&path, &cfg, true).await;
            assert_eq!(append_idempotent(&log, 5, 0, 3), Ok((3, true)));
            assert_eq!(
                append_idempotent(&log, 5, 1, 0),
                Ok((6, false)),
                "epoch bump from sequence 0"
            );
            assert_eq!(
                append_idempotent(&log, 5, 0, 6),
                Err(crate::kafka::errors::INVALID_PRODUCER_EPOCH)
            );
            flush(&log).await;
            drop(log);
            // Unclean: the snapshot is older than the log; the tail is replayed from the log.
            let log = open_log(&path, &cfg, false).await;
            assert_eq!(append_idempotent(&log, 5, 1, 0), Ok((6, true)));
            drop(log);
            // No snapshot at all: the whole log is replayed.
            for e in std::fs::read_dir(&path).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "snapshot") {
                    std::fs::remove_file(p).unwrap();
                }
            }
            let log = open_log(&path, &cfg, false).await;
            assert_eq!(append_idempotent(&log, 5, 1, 0), Ok((6, true)));
            assert_eq!(append_idempotent(&log, 5, 1, 3), Ok((9, false)));
        });
    }

    #[test]
    fn retention_by_size_keeps_active_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-0");
        run(move || async move {
            let mut cfg = LogConfig::default();
            cfg.segment_bytes = 5_000;
            cfg.retention_bytes = 6_000;
            let log = open_log(&path, &cfg, true).await;
            append_n(&log, 40).await;
            flush(&log).await;
            let expired = log.borrow().expired_segments(now_ms());
            assert!(!expired.is_empty());
            for b in expired {
                log.borrow_mut().remove_segment(b).unwrap();
            }
            let l = log.borrow();
            assert!(l.size_bytes() <= 6_000 + 5_000);
            assert!(l.log_start_offset > 0);
            assert!(l.locate(0).is_some()); // reads below the start land on the first segment
        });
    }
}
