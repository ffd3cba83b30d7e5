//! The durable Raft log of one voter: an append-only file of framed entries, the vote, the
//! purge point and the last known commit point, all in one directory.
//!
//! ```text
//! <dir>/log             frames: u32 BE payload length | u32 BE CRC32C of payload | payload
//!                       payload = JSON of openraft's Entry (log id + blank/normal/membership)
//! <dir>/vote.json       the vote (term, node, committed), replaced atomically and fsynced
//! <dir>/purged.json     the last purged log id, replaced atomically and fsynced
//! <dir>/committed.json  the last committed log id (a hint: openraft allows it to lag)
//! ```
//!
//! Entries are written at the logical end of the file and fdatasynced before openraft's append
//! callback runs, so an acknowledged entry is on disk. Truncation cuts the file at the first
//! removed entry and syncs. Purge records the purge point first, then rewrites the file without
//! the purged entries once they are more than half of it (temp file, fsync, rename, fsync dir).
//! Opening reads every frame: a short or corrupt frame at the end (a write torn by a crash, never
//! acknowledged) is cut off; entries whose indexes do not follow each other refuse the start.
//!
//! All of this is blocking I/O, run on the quorum's own thread (never a glommio shard).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogId, LogState, RaftLogReader, StorageError, StorageIOError, Vote};

use super::{Entry, NodeId, TypeConfig};

/// Bytes of one framed entry's payload. The submitter bounds a batch well below this
/// (`ENTRY_BYTES_MAX`), so a frame past it is corruption, not data.
pub const LOG_FRAME_BYTES_MAX: usize = 4 << 20;
const FRAME_HEADER_BYTES: usize = 8;

pub const LOG_FILE: &str = "log";
const VOTE_FILE: &str = "vote.json";
const PURGED_FILE: &str = "purged.json";
const COMMITTED_FILE: &str = "committed.json";

/// Writes `name` in `dir` atomically: temp file, fsync, rename, fsync of the directory.
pub(super) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn frame(entry: &Entry) -> io::Result<Vec<u8>> {
    let payload = serde_json::to_vec(entry).map_err(io::Error::other)?;
    if payload.len() > LOG_FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "log entry of {} bytes exceeds {LOG_FRAME_BYTES_MAX}",
                payload.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The state behind the mutex: the file and an in-memory copy of every unpurged entry (the
/// metadata log is small and purged behind each snapshot).
pub(super) struct LogInner {
    dir: PathBuf,
    file: File,
    /// Logical end of the file: where the next frame goes.
    end: u64,
    /// Index -> (file position of its frame, entry).
    entries: BTreeMap<u64, (u64, Entry)>,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    /// Bytes of frames at the start of the file that belong to purged entries.
    purged_bytes: u64,
}

/// The log store openraft drives; clones share the same log (one is the reader).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, recovering a torn tail.
    pub fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let last_purged: Option<LogId<NodeId>> = read_json(&dir.join(PURGED_FILE))?;
        let vote = read_json(&dir.join(VOTE_FILE))?;
        let committed: Option<LogId<NodeId>> = read_json(&dir.join(COMMITTED_FILE))?;
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let bytes = std::fs::read(&path)?;
        let mut entries = BTreeMap::new();
        let mut pos = 0usize;
        let mut purged_bytes = 0u64;
        let mut torn = None;
        while pos < bytes.len() {
            let rest = &bytes[pos..];
            if rest.len() < FRAME_HEADER_BYTES {
                torn = Some("short frame header");
                break;
            }
            let len = u32::from_be_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_be_bytes(rest[4..8].try_into().expect("4 bytes"));
            if len > LOG_FRAME_BYTES_MAX {
                torn = Some("frame length past the limit");
                break;
            }
            if rest.len() < FRAME_HEADER_BYTES + len {
                torn = Some("short frame");
                break;
            }
            let payload = &rest[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
            if crc32c::crc32c(payload) != crc {
                torn = Some("CRC mismatch");
                break;
            }
            let entry: Entry = match serde_json::from_slice(payload) {
                Ok(e) => e,
                Err(_) => {
                    torn = Some("undecodable entry");
                    break;
                }
            };
            let index = entry.log_id.index;
            let frame_bytes = (FRAME_HEADER_BYTES + len) as u64;
            if last_purged.is_some_and(|p| index <= p.index) {
                purged_bytes += frame_bytes;
            } else {
                if let Some((&last, _)) = entries.last_key_value() {
                    if index != last + 1 {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{}: entry {index} follows entry {last}", path.display()),
                        ));
                    }
                }
                entries.insert(index, (pos as u64, entry));
            }
            pos += FRAME_HEADER_BYTES + len;
        }
        if let Some(why) = torn {
            tracing::warn!(
                "{}: {why} at byte {pos}; cutting {} bytes of an unacknowledged tail",
                path.display(),
                bytes.len() - pos
            );
            file.set_len(pos as u64)?;
            file.sync_all()?;
        }
        if let (Some(p), Some((&first, _))) = (last_purged, entries.first_key_value()) {
            if first != p.index + 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: first entry {first} does not follow the purge point {}",
                        path.display(),
                        p.index
                    ),
                ));
            }
        }
        let mut inner = LogInner {
            dir: dir.to_path_buf(),
            file,
            end: pos as u64,
            entries,
            last_purged,
            vote,
            committed,
            purged_bytes,
        };
        // The commit point is a hint: never past the entries this log holds.
        let last = inner.last_log_id().map(|l| l.index);
        if inner.committed.is_some_and(|c| Some(c.index) > last) {
            inner.committed = None;
        }
        Ok(LogStore {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LogInner {
    pub(super) fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.entries
            .last_key_value()
            .map(|(_, (_, e))| e.log_id)
            .or(self.last_purged)
    }

    /// Writes entries at the end and fdatasyncs; only then are they in memory (and acked).
    pub(super) fn append_entries(&mut self, entries: Vec<Entry>) -> io::Result<()> {
        let mut expected = self.last_log_id().map(|l| l.index + 1);
        let mut buf = Vec::new();
        let mut placed = Vec::with_capacity(entries.len());
        for e in entries {
            if let Some(x) = expected {
                if e.log_id.index != x {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("appending entry {} where {x} is next", e.log_id.index),
                    ));
                }
            }
            expected = Some(e.log_id.index + 1);
            let pos = self.end + buf.len() as u64;
            buf.extend_from_slice(&frame(&e)?);
            placed.push((pos, e));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&buf, self.end)?;
        self.file.sync_data()?;
        self.end += buf.len() as u64;
        for (pos, e) in placed {
            self.entries.insert(e.log_id.index, (pos, e));
        }
        Ok(())
    }

    /// Removes entries at and after `index` (a conflicting suffix) from file and memory.
    pub(super) fn truncate_from(&mut self, index: u64) -> io::Result<()> {
        let Some((&first_removed, &(pos, _))) = self.entries.range(index..).next() else {
            return Ok(());
        };
        assert!(first_removed >= index);
        self.file.set_len(pos)?;
        self.file.sync_data()?;
        self.end = pos;
        self.entries.split_off(&index);
        Ok(())
    }

    /// Forgets entries up to `log_id` (they are in a snapshot). The purge point is durable
    /// before the file changes; the file is rewritten when purged frames outweigh live ones.
    pub(super) fn purge_upto(&mut self, log_id: LogId<NodeId>) -> io::Result<()> {
        if self.last_purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        write_atomic(
            &self.dir,
            PURGED_FILE,
            &serde_json::to_vec(&log_id).map_err(io::Error::other)?,
        )?;
        self.last_purged = Some(log_id);
        let keep = self.entries.split_off(&(log_id.index + 1));
        let removed = std::mem::replace(&mut self.entries, keep);
        self.purged_bytes = match self.entries.first_key_value() {
            Some((_, (pos, _))) => *pos,
            None => self.end,
        };
        drop(removed);
        let live = self.end - self.purged_bytes;
        if self.purged_bytes > 0 && self.purged_bytes >= live {
            self.rewrite()?;
        }
        Ok(())
    }

    /// Rewrites the log file with only the live entries.
    fn rewrite(&mut self) -> io::Result<()> {
        let tmp = self.dir.join(format!("{LOG_FILE}.tmp"));
        let mut buf = Vec::new();
        let mut positions = Vec::with_capacity(self.entries.len());
        for (&i, (_, e)) in &self.entries {
            positions.push((i, buf.len() as u64));
            buf.extend_from_slice(&frame(e)?);
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(LOG_FILE))?;
        File::open(&self.dir)?.sync_all()?;
        self.file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dir.join(LOG_FILE))?;
        self.end = buf.len() as u64;
        self.purged_bytes = 0;
        for (i, pos) in positions {
            self.entries.get_mut(&i).expect("entry just written").0 = pos;
        }
        Ok(())
    }

    pub(super) fn save_vote(&mut self, vote: &Vote<NodeId>) -> io::Result<()> {
        write_atomic(
            &self.dir,
            VOTE_FILE,
            &serde_json::to_vec(vote).map_err(io::Error::other)?,
        )?;
        self.vote = Some(*vote);
        Ok(())
    }

    pub(super) fn vote(&self) -> Option<Vote<NodeId>> {
        self.vote
    }

    #[cfg(test)]
    pub(super) fn file_bytes(&self) -> u64 {
        self.end
    }
}

fn io_err(e: io::Error) -> StorageError<NodeId> {
    StorageError::from(StorageIOError::write_logs(&e))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let inner = self.lock();
        Ok(inner
            .entries
            .range(range)
            .map(|(_, (_, e))| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.lock();
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: inner.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.lock()
            .save_vote(vote)
            .map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().vote())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.lock();
        inner.committed = committed;
        // A hint (openraft tolerates it lagging): renamed into place but not fsynced.
        let tmp = inner.dir.join(format!("{COMMITTED_FILE}.tmp"));
        let bytes = serde_json::to_vec(&committed).map_err(|e| io_err(io::Error::other(e)))?;
        std::fs::write(&tmp, bytes).map_err(io_err)?;
        std::fs::rename(&tmp, inner.dir.join(COMMITTED_FILE)).map_err(io_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let result = self.lock().append_entries(entries.into_iter().collect());
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = io_err(io::Error::new(e.kind(), e.to_string()));
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.lock().truncate_from(log_id.index).map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.lock().purge_upto(log_id).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(s: &LogStore) -> Vec<u64> {
        s.lock().entries.keys().copied().collect()
    }

    #[test]
    fn append_truncate_purge_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path()).unwrap();
        s.lock()
            .append_entries((1..=10).map(|i| entry(1, i)).collect())
            .unwrap();
        assert!(
            s.lock().append_entries(vec![entry(1, 12)]).is_err(),
            "a gap is refused"
        );
        s.lock().truncate_from(8).unwrap();
        s.lock().append_entries(vec![entry(2, 8)]).unwrap();
        s.lock().save_vote(&Vote::new(2, 3)).unwrap();
        drop(s);

        let s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), (1..=8).collect::<Vec<_>>());
        assert_eq!(s.lock().last_log_id().unwrap().leader_id.term, 2);
        assert_eq!(s.lock().vote(), Some(Vote::new(2, 3)));
        let before = s.lock().file_bytes();
        s.lock()
            .purge_upto(LogId::new(CommittedLeaderId::new(1, 1), 6))
            .unwrap();
        assert!(
            s.lock().file_bytes() < before,
            "purged frames are rewritten away"
        );
        drop(s);

        let s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![7, 8]);
        assert_eq!(s.lock().last_purged.unwrap().index, 6);
        s.lock().append_entries(vec![entry(2, 9)]).unwrap();
        // Purging past the last entry (after a snapshot was installed) empties the log and the
        // next entry follows the purge point.
        s.lock()
            .purge_upto(LogId::new(CommittedLeaderId::new(3, 1), 20))
            .unwrap();
        assert_eq!(s.lock().last_log_id().unwrap().index, 20);
        s.lock().append_entries(vec![entry(3, 21)]).unwrap();
        drop(s);
        let s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![21]);
    }

    #[test]
    fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path()).unwrap();
        s.lock()
            .append_entries((1..=3).map(|i| entry(1, i)).collect())
            .unwrap();
        let good = s.lock().file_bytes();
        drop(s);
        // A crash in the middle of writing entry 4: its header and half its payload.
        let torn = frame(&entry(1, 4)).unwrap();
        let f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_FILE))
            .unwrap();
        (&f).write_all(&torn[..torn.len() / 2]).unwrap();
        drop(f);
        let s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![1, 2, 3]);
        assert_eq!(
            std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len(),
            good
        );
        s.lock().append_entries(vec![entry(1, 4)]).unwrap();
        drop(s);
        // A flipped bit in the last frame: cut as well.
        let path = dir.path().join(LOG_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let s = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![1, 2, 3]);
    }
}
