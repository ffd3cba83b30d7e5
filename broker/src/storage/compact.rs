//! Log compaction (`cleanup.policy=compact`): the cleaner keeps the latest record per key.
//!
//! One pass over a partition (its I/O lock held, so no write, roll, truncation or retention
//! runs meanwhile):
//! 1. **Key map.** The dirty sealed segments (from the cleaner checkpoint to the active
//!    segment, stopping at the first segment younger than `min.compaction.lag.ms`) are read
//!    batch by batch; every keyed record puts (128-bit hash of its key -> its offset) into the
//!    map. The map holds at most `key_map_entries_max` keys: when it is full, the pass cleans
//!    only up to the start of the segment it was reading.
//! 2. **Rewrite.** Every sealed segment below that point is read again and a record is kept
//!    when no later record has its key (the map has no entry, or the entry is its own offset or
//!    an earlier one). A tombstone (null value) in a segment that was already clean before this
//!    pass is dropped once its batch is older than `delete.retention.ms`. Control batches and
//!    transactional batches are kept whole. A batch that keeps every record is copied byte for
//!    byte; one that loses some is encoded again with its codec, offsets, timestamps and
//!    producer fields; one that loses all is dropped. Offsets never move: a reader sees gaps.
//! 3. **Swap.** The new segment is written beside the old one (`<base>.cleaned`), fsynced, its
//!    stale index files removed, renamed over `<base>.log`, the directory fsynced, and the
//!    in-memory segment replaced (its index rebuilt by a scan). A reader holding the old file
//!    finishes on the old inode: it sees either the old or the new segment, never a mix.
//! 4. **Checkpoint.** `cleaner-offset-checkpoint` (one decimal offset) records where the
//!    dirty part begins.
//!
//! | limit | value |
//! |---|---|
//! | keys per pass | `log.cleaner.dedupe.buffer.size` / `KEY_MAP_ENTRY_BYTES` per shard |
//! | read size | `READ_CHUNK_BYTES` per read |
//! | cleaner I/O | `log.cleaner.io.max.bytes.per.second` (sleeps after each chunk above it) |

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions};

use super::batch::Header;
use super::log::{blocking, read_from_disk, segment_file_name, PartitionLog};

/// Memory one key-map entry is counted as (hash, offset and the table's overhead).
pub const KEY_MAP_ENTRY_BYTES: usize = 32;
pub const READ_CHUNK_BYTES: usize = 1 << 20;
pub const CHECKPOINT_FILE: &str = "cleaner-offset-checkpoint";

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cleaned {
    pub segments_rewritten: usize,
    pub records_removed: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// The new start of the dirty part.
    pub cleaned_to: i64,
}

fn key_hash(k: &[u8]) -> u128 {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    k.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (k, 0x5eedu16).hash(&mut b);
    ((a.finish() as u128) << 64) | b.finish() as u128
}

pub fn read_checkpoint(dir: &Path) -> Option<i64> {
    std::fs::read_to_string(dir.join(CHECKPOINT_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn write_checkpoint(dir: &Path, offset: i64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
    std::fs::write(&tmp, offset.to_string())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The batches of `log` from `offset` on, up to `READ_CHUNK_BYTES`, stepping over segments
/// that end before it. No borrow is held across the read.
async fn read_at(log: &RefCell<PartitionLog>, offset: i64) -> Result<Option<Bytes>> {
    let mut range = log.borrow().locate(offset);
    // Bounded by the number of segments.
    while let Some(r) = range {
        if let Some(b) = read_from_disk(&r, offset, READ_CHUNK_BYTES).await? {
            return Ok(Some(b));
        }
        range = r
            .next_segment
            .and_then(|next| log.borrow().locate_segment(next));
    }
    Ok(None)
}

/// Calls `f` with every whole batch of `log` in [from, to) (a batch that starts below `from`
/// is skipped). Stops early when `f` returns false. Sleeps to keep to `io_bytes_per_s`.
async fn each_batch(
    log: &RefCell<PartitionLog>,
    from: i64,
    to: i64,
    io_bytes_per_s: u64,
    mut f: impl FnMut(&Header, &Bytes) -> bool,
) -> Result<()> {
    let mut offset = from;
    // Bounded by `to`: every chunk moves `offset` past at least one batch, or ends.
    while offset < to {
        let Some(chunk) = read_at(log, offset).await? else {
            break;
        };
        let mut at = 0;
        let before = offset;
        while let Some(h) = Header::new(&chunk[at..]) {
            let Some(len) = h.total_bytes() else { break };
            if len == 0 || at + len > chunk.len() || h.base_offset() >= to {
                break;
            }
            if h.base_offset() >= offset {
                let b = chunk.slice(at..at + len);
                if !f(&h, &b) {
                    return Ok(());
                }
            }
            offset = offset.max(h.last_offset() + 1);
            at += len;
        }
        if offset == before {
            break;
        }
        if io_bytes_per_s > 0 {
            let secs = chunk.len() as f64 / io_bytes_per_s as f64;
            glommio::timer::sleep(Duration::from_secs_f64(secs)).await;
        }
    }
    Ok(())
}

/// A record is superseded when the map holds a later offset for its key.
fn superseded(map: &HashMap<u128, i64>, key: &Option<Bytes>, offset: i64) -> bool {
    match key {
        Some(k) => map.get(&key_hash(k)).is_some_and(|o| *o > offset),
        None => false,
    }
}

/// One cleaning pass over `log` (the caller holds its I/O lock). None when nothing is due.
pub async fn clean(
    log: &RefCell<PartitionLog>,
    now_ms: i64,
    key_map_entries_max: usize,
    io_bytes_per_s: u64,
) -> Result<Option<Cleaned>> {
    let Some((first_dirty, dirty_end, sealed, dir, delete_retention_ms)) =
        log.borrow().cleanable(now_ms)
    else {
        return Ok(None);
    };
    // 1. The key map over the dirty part.
    let mut map: HashMap<u128, i64> = HashMap::new();
    let mut stopped_at: Option<i64> = None;
    let mut decode_error = None;
    each_batch(log, first_dirty, dirty_end, io_bytes_per_s, |h, b| {
        if h.is_control() || h.is_transactional() {
            return true;
        }
        let mut buf = b.clone();
        let set = match RecordBatchDecoder::decode(&mut buf) {
            Ok(s) => s,
            Err(e) => {
                decode_error = Some(format!("{e:#}"));
                return false;
            }
        };
        if map.len() + set.records.len() > key_map_entries_max {
            stopped_at = Some(h.base_offset());
            return false;
        }
        for r in set.records {
            if let Some(k) = r.key {
                map.insert(key_hash(&k), r.offset);
            }
        }
        true
    })
    .await?;
    if let Some(e) = decode_error {
        anyhow::bail!("decoding a batch for the key map: {e}");
    }
    // Only whole segments are cleaned: up to the start of the one the map stopped in.
    let upto = match stopped_at {
        Some(o) => sealed
            .iter()
            .map(|(base, _)| *base)
            .filter(|b| *b <= o)
            .max()
            .unwrap_or(first_dirty),
        None => dirty_end,
    };
    if upto <= first_dirty && stopped_at.is_some() {
        tracing::warn!(dir = %dir.display(), "log cleaner: the key map cannot hold one segment's keys (raise log.cleaner.dedupe.buffer.size)");
        return Ok(None);
    }
    // 2 and 3. Rewrite the sealed segments below `upto`.
    let mut out = Cleaned {
        cleaned_to: upto,
        ..Cleaned::default()
    };
    for (base, next) in sealed.into_iter().filter(|(base, _)| *base < upto) {
        let was_clean = base < first_dirty;
        let mut kept = BytesMut::new();
        let mut removed = 0u64;
        let mut before = 0u64;
        let mut error = None;
        let tmp = dir.join(format!("{base:020}.cleaned"));
        let _ = std::fs::remove_file(&tmp);
        let mut pending_write: Vec<Bytes> = Vec::new();
        each_batch(log, base, next, io_bytes_per_s, |h, b| {
            before += b.len() as u64;
            if h.is_control() || h.is_transactional() {
                pending_write.push(b.clone());
                return true;
            }
            let mut buf = b.clone();
            let set = match RecordBatchDecoder::decode(&mut buf) {
                Ok(s) => s,
                Err(e) => {
                    error = Some(format!("{e:#}"));
                    return false;
                }
            };
            let expired_tombstones = was_clean && now_ms - h.max_timestamp() > delete_retention_ms;
            let total = set.records.len();
            let records: Vec<_> = set
                .records
                .into_iter()
                .filter(|r| {
                    !superseded(&map, &r.key, r.offset)
                        && !(expired_tombstones && r.value.is_none())
                })
                .collect();
            removed += (total - records.len()) as u64;
            if records.len() == total {
                pending_write.push(b.clone());
            } else if !records.is_empty() {
                kept.clear();
                let r = RecordBatchEncoder::encode(
                    &mut kept,
                    &records,
                    &RecordEncodeOptions {
                        version: 2,
                        compression: set.compression,
                    },
                );
                if let Err(e) = r {
                    error = Some(format!("{e:#}"));
                    return false;
                }
                pending_write.push(kept.split().freeze());
            }
            true
        })
        .await?;
        if let Some(e) = error {
            anyhow::bail!("cleaning segment {base}: {e}");
        }
        out.bytes_before += before;
        if removed == 0 {
            out.bytes_after += before;
            continue;
        }
        let after: u64 = pending_write.iter().map(|b| b.len() as u64).sum();
        let (t, d) = (tmp.clone(), dir.clone());
        blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&t)?;
            for b in &pending_write {
                f.write_all(b)?;
            }
            f.sync_all()?;
            for ext in ["index", "timeindex"] {
                let _ = std::fs::remove_file(d.join(segment_file_name(base, ext)));
            }
            std::fs::rename(&t, d.join(segment_file_name(base, "log")))?;
            std::fs::File::open(&d)?.sync_all()
        })
        .await
        .with_context(|| format!("writing the cleaned segment {base}"))?;
        PartitionLog::reopen_sealed_segment(log, base, after).await?;
        out.segments_rewritten += 1;
        out.records_removed += removed;
        out.bytes_after += after;
    }
    // 4. The checkpoint.
    let d = dir.clone();
    blocking(move || write_checkpoint(&d, upto))
        .await
        .context("writing the cleaner checkpoint")?;
    log.borrow_mut().set_cleaned_offset(upto);
    Ok(Some(out))
}
