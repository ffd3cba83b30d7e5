//! The state machine: committed entries applied into a [`ClusterImage`], published to watchers,
//! and snapshotted to `<dir>/snapshot` so a restart starts from the snapshot instead of entry 1.
//!
//! ```text
//! <dir>/snapshot   "WQS1" | u32 BE CRC32C of the rest | u32 BE meta length | meta JSON | image JSON
//! ```
//!
//! The snapshot is written atomically (temp file, fsync, rename, fsync dir) both when this
//! voter builds one and when it installs one sent by the leader. The image itself is not
//! persisted per entry: after a restart openraft re-applies the log entries that follow the
//! snapshot.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use tokio::sync::watch;

use super::log_store::write_atomic;
use super::record::{ApplyOutcome, ClusterImage};
use super::{Entry, Node, NodeId, TypeConfig};

pub const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_MAGIC: &[u8; 4] = b"WQS1";
/// Bytes of a snapshot file or of one received snapshot; past it is corruption.
pub const SNAPSHOT_BYTES_MAX: usize = 256 << 20;

type Meta = SnapshotMeta<NodeId, Node>;

struct StoredSnapshot {
    meta: Meta,
    /// JSON of the image: what is sent to a follower that is too far behind.
    data: Vec<u8>,
}

struct SmInner {
    dir: PathBuf,
    image: Arc<ClusterImage>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    snapshot: Option<StoredSnapshot>,
    /// Counts snapshots built by this process, to keep snapshot ids unique.
    built: u64,
    image_tx: watch::Sender<Arc<ClusterImage>>,
}

/// The state machine openraft drives; clones share it (one is the snapshot builder).
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<SmInner>>,
}

fn encode_snapshot(meta: &Meta, data: &[u8]) -> io::Result<Vec<u8>> {
    let meta_json = serde_json::to_vec(meta).map_err(io::Error::other)?;
    let mut rest = Vec::with_capacity(4 + meta_json.len() + data.len());
    rest.extend_from_slice(&(meta_json.len() as u32).to_be_bytes());
    rest.extend_from_slice(&meta_json);
    rest.extend_from_slice(data);
    let mut out = Vec::with_capacity(8 + rest.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&crc32c::crc32c(&rest).to_be_bytes());
    out.extend_from_slice(&rest);
    Ok(out)
}

fn decode_snapshot(bytes: &[u8]) -> Result<(Meta, Vec<u8>), String> {
    if bytes.len() < 12 || &bytes[0..4] != SNAPSHOT_MAGIC {
        return Err("not a snapshot file".into());
    }
    let crc = u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let rest = &bytes[8..];
    if crc32c::crc32c(rest) != crc {
        return Err("CRC mismatch".into());
    }
    let meta_len = u32::from_be_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    if meta_len > rest.len() - 4 {
        return Err("meta length past the end".into());
    }
    let meta = serde_json::from_slice(&rest[4..4 + meta_len]).map_err(|e| e.to_string())?;
    Ok((meta, rest[4 + meta_len..].to_vec()))
}

impl StateMachine {
    /// Loads the newest snapshot of `dir`, if any. A snapshot that does not read back refuses
    /// the start: the log before it may be purged, so starting empty would lose metadata.
    pub fn open(dir: &Path) -> io::Result<(StateMachine, watch::Receiver<Arc<ClusterImage>>)> {
        let path = dir.join(SNAPSHOT_FILE);
        let (image, last_applied, membership, snapshot) = match std::fs::read(&path) {
            Ok(bytes) => {
                let bad = |why: String| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {why}", path.display()),
                    )
                };
                let (meta, data) = decode_snapshot(&bytes).map_err(bad)?;
                let image: ClusterImage =
                    serde_json::from_slice(&data).map_err(|e| bad(e.to_string()))?;
                (
                    image,
                    meta.last_log_id,
                    meta.last_membership.clone(),
                    Some(StoredSnapshot { meta, data }),
                )
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (
                ClusterImage::default(),
                None,
                StoredMembership::default(),
                None,
            ),
            Err(e) => return Err(e),
        };
        let image = Arc::new(image);
        let (image_tx, image_rx) = watch::channel(image.clone());
        let inner = SmInner {
            dir: dir.to_path_buf(),
            image,
            last_applied,
            membership,
            snapshot,
            built: 0,
            image_tx,
        };
        Ok((
            StateMachine {
                inner: Arc::new(Mutex::new(inner)),
            },
            image_rx,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, SmInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageError::from(StorageIOError::write_state_machine(&io::Error::other(
        e.to_string(),
    )))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut inner = self.lock();
        let data = serde_json::to_vec(&*inner.image).map_err(sm_err)?;
        inner.built += 1;
        let snapshot_id = match inner.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, inner.built),
            None => format!("0-0-{}", inner.built),
        };
        let meta = Meta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id,
        };
        let file = encode_snapshot(&meta, &data).map_err(sm_err)?;
        write_atomic(&inner.dir, SNAPSHOT_FILE, &file).map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e))
        })?;
        inner.snapshot = Some(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        });
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let inner = self.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyOutcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.lock();
        let mut outcomes = Vec::new();
        let mut image = (*inner.image).clone();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            image.version = entry.log_id.index;
            let outcome = match entry.payload {
                EntryPayload::Blank => ApplyOutcome::default(),
                EntryPayload::Normal(batch) => ApplyOutcome {
                    rejected: image.apply_batch(entry.log_id.index, &batch.records).err(),
                },
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                    ApplyOutcome::default()
                }
            };
            outcomes.push(outcome);
        }
        let image = Arc::new(image);
        inner.image = image.clone();
        inner.image_tx.send_replace(image);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let read_err = |e: String| {
            StorageError::from(StorageIOError::read_snapshot(
                Some(meta.signature()),
                &io::Error::other(e),
            ))
        };
        if data.len() > SNAPSHOT_BYTES_MAX {
            return Err(read_err(format!(
                "snapshot of {} bytes exceeds {SNAPSHOT_BYTES_MAX}",
                data.len()
            )));
        }
        let image: ClusterImage =
            serde_json::from_slice(&data).map_err(|e| read_err(e.to_string()))?;
        let mut inner = self.lock();
        let file = encode_snapshot(meta, &data).map_err(sm_err)?;
        write_atomic(&inner.dir, SNAPSHOT_FILE, &file).map_err(|e| {
            StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e))
        })?;
        let image = Arc::new(image);
        inner.image = image.clone();
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some(StoredSnapshot {
            meta: meta.clone(),
            data,
        });
        inner.image_tx.send_replace(image);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.lock();
        Ok(inner.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}
