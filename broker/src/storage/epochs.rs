//! The leader-epoch cache of one partition replica (Kafka's `LeaderEpochFileCache`, KIP-101):
//! for every leader epoch that wrote to this log, the offset of its first batch. A follower
//! whose log diverged from its leader's finds the point to truncate to with it, by epoch
//! rather than by high watermark (KIP-101, KIP-279; carried in Fetch v12's
//! `LastFetchedEpoch`/`DivergingEpoch`, KIP-595).
//!
//! # File `leader-epoch-checkpoint` (in the partition directory)
//!
//! Text, as Kafka writes it: a version line (`0`), a count line, then one `<epoch> <start
//! offset>` line per entry, epochs strictly increasing, start offsets non-decreasing:
//!
//! ```text
//! 0
//! 2
//! 0 0
//! 3 1200
//! ```
//!
//! Written (temp file, fsync, rename) by the log before any batch of a new epoch is written to
//! a segment, so every batch on disk has its epoch in the file. Entries starting at or past the
//! log end are dropped when the log opens (their batches were lost in a crash) and when it is
//! truncated.

use std::path::Path;

pub const EPOCH_CHECKPOINT: &str = "leader-epoch-checkpoint";
/// More epochs than any partition sees in practice; a longer file is refused as corrupt.
pub const EPOCHS_MAX: usize = 1 << 20;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochCache {
    /// (leader epoch, start offset), epochs strictly increasing.
    entries: Vec<(i32, i64)>,
    /// Changed since the file was last written.
    pub dirty: bool,
}

impl EpochCache {
    pub fn entries(&self) -> &[(i32, i64)] {
        &self.entries
    }

    /// The epoch of the newest batch, or -1 for an empty log.
    pub fn latest_epoch(&self) -> i32 {
        self.entries.last().map(|e| e.0).unwrap_or(-1)
    }

    /// Records that batches of `epoch` start at `start_offset`. An epoch already known (or an
    /// older one) changes nothing.
    pub fn assign(&mut self, epoch: i32, start_offset: i64) {
        if epoch < 0 || self.entries.last().is_some_and(|&(e, _)| e >= epoch) {
            return;
        }
        debug_assert!(self.entries.last().is_none_or(|&(_, s)| s <= start_offset));
        self.entries.push((epoch, start_offset));
        self.dirty = true;
    }

    /// Kafka's `endOffsetFor`: the largest epoch <= `epoch` this log has, and the offset where
    /// it ended (the start of the next epoch, or `log_end` for the newest). (-1, -1) when
    /// `epoch` is older than everything here.
    pub fn end_offset_for(&self, epoch: i32, log_end: i64) -> (i32, i64) {
        let i = self.entries.partition_point(|&(e, _)| e <= epoch);
        if i == 0 {
            return (-1, -1);
        }
        let found = self.entries[i - 1].0;
        let end = self.entries.get(i).map(|&(_, s)| s).unwrap_or(log_end);
        (found, end)
    }

    /// OffsetForLeaderEpoch on a leader, answered as Kafka's `endOffsetFor` over the cache Kafka's
    /// leader would hold: entries wholly below `log_start` dropped and the one holding it moved
    /// to start there (Kafka truncates its cache from the start with the log), and the leader's
    /// `current_epoch` starting at `log_end` when no batch of it is written yet (Kafka assigns it
    /// on election, at the log end). Then: the latest epoch ends at `log_end`; an older one at
    /// the start of the next known epoch, answered with the largest known epoch <= it (or the
    /// asked epoch itself when it is older than everything kept); (-1, -1) for epoch -1 or one
    /// newer than every known epoch.
    pub fn leader_end_offset_for(
        &self,
        epoch: i32,
        current_epoch: i32,
        log_start: i64,
        log_end: i64,
    ) -> (i32, i64) {
        if epoch == -1 {
            return (-1, -1);
        }
        // The entry holding the log start, and every later one.
        let first = self
            .entries
            .partition_point(|&(_, s)| s <= log_start)
            .saturating_sub(1);
        let mut view: Vec<(i32, i64)> = self.entries[first.min(self.entries.len())..].to_vec();
        if let Some(e) = view.first_mut() {
            e.1 = e.1.max(log_start);
        }
        if current_epoch >= 0 && view.last().is_none_or(|&(e, _)| e < current_epoch) {
            view.push((current_epoch, log_end));
        }
        if view.last().is_some_and(|&(e, _)| e == epoch) {
            return (epoch, log_end);
        }
        let higher = view.partition_point(|&(e, _)| e <= epoch);
        let Some(&(_, next_start)) = view.get(higher) else {
            return (-1, -1);
        };
        match higher.checked_sub(1).map(|i| view[i]) {
            Some((floor, _)) => (floor, next_start),
            None => (epoch, next_start),
        }
    }

    /// Drops the entries of batches at or past `end` (a truncated log end).
    pub fn truncate_from_end(&mut self, end: i64) {
        let before = self.entries.len();
        self.entries.retain(|&(_, s)| s < end);
        if self.entries.len() != before {
            self.dirty = true;
        }
    }

    pub fn encode(&self) -> String {
        let mut s = format!("0\n{}\n", self.entries.len());
        for (e, o) in &self.entries {
            s.push_str(&format!("{e} {o}\n"));
        }
        s
    }

    pub fn decode(text: &str) -> Option<EpochCache> {
        let mut lines = text.lines();
        if lines.next()?.trim() != "0" {
            return None;
        }
        let n: usize = lines.next()?.trim().parse().ok()?;
        if n > EPOCHS_MAX {
            return None;
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let mut parts = lines.next()?.split_whitespace();
            let e: i32 = parts.next()?.parse().ok()?;
            let o: i64 = parts.next()?.parse().ok()?;
            if entries
                .last()
                .is_some_and(|&(pe, po): &(i32, i64)| pe >= e || po > o)
            {
                return None;
            }
            entries.push((e, o));
        }
        Some(EpochCache {
            entries,
            dirty: false,
        })
    }

    /// Reads the checkpoint in `dir`. Blocking. None: no file (a log from before replication,
    /// or a new one); a corrupt file is an error.
    pub fn load(dir: &Path) -> std::io::Result<Option<EpochCache>> {
        match std::fs::read_to_string(dir.join(EPOCH_CHECKPOINT)) {
            Ok(text) => EpochCache::decode(&text).map(Some).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("corrupt {}", dir.join(EPOCH_CHECKPOINT).display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `text` as the checkpoint in `dir`, durably (temp file, fsync, rename, fsync of the
    /// directory). Blocking.
    pub fn store(dir: &Path, text: &str) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = dir.join(format!("{EPOCH_CHECKPOINT}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(EPOCH_CHECKPOINT))?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_offsets_follow_kafka() {
        let mut c = EpochCache::default();
        assert_eq!(c.end_offset_for(0, 0), (-1, -1));
        c.assign(0, 0);
        c.assign(0, 50);
        c.assign(3, 100);
        c.assign(2, 120);
        c.assign(5, 150);
        assert_eq!(c.entries(), &[(0, 0), (3, 100), (5, 150)]);
        assert_eq!(c.latest_epoch(), 5);
        assert_eq!(c.end_offset_for(0, 200), (0, 100));
        assert_eq!(c.end_offset_for(1, 200), (0, 100));
        assert_eq!(c.end_offset_for(3, 200), (3, 150));
        assert_eq!(c.end_offset_for(4, 200), (3, 150));
        assert_eq!(c.end_offset_for(5, 200), (5, 200));
        assert_eq!(c.end_offset_for(9, 200), (5, 200));
        c.truncate_from_end(150);
        assert_eq!(c.entries(), &[(0, 0), (3, 100)]);
        assert_eq!(c.end_offset_for(5, 120), (3, 120));
    }

    #[test]
    fn leader_end_offsets_follow_kafkas_leader_cache() {
        let mut c = EpochCache::default();
        // An empty log whose leader is in epoch 2: Kafka's cache holds (2, 0).
        assert_eq!(c.leader_end_offset_for(2, 2, 0, 0), (2, 0));
        assert_eq!(c.leader_end_offset_for(1, 2, 0, 0), (1, 0));
        assert_eq!(c.leader_end_offset_for(3, 2, 0, 0), (-1, -1));
        assert_eq!(c.leader_end_offset_for(-1, 2, 0, 0), (-1, -1));
        c.assign(0, 0);
        c.assign(3, 100);
        c.assign(5, 150);
        // Leader in epoch 5 (written): the latest ends at the log end.
        assert_eq!(c.leader_end_offset_for(5, 5, 0, 200), (5, 200));
        assert_eq!(c.leader_end_offset_for(4, 5, 0, 200), (3, 150));
        assert_eq!(c.leader_end_offset_for(0, 5, 0, 200), (0, 100));
        assert_eq!(c.leader_end_offset_for(6, 5, 0, 200), (-1, -1));
        // Leader elected in epoch 7, nothing written in it yet.
        assert_eq!(c.leader_end_offset_for(7, 7, 0, 200), (7, 200));
        assert_eq!(c.leader_end_offset_for(5, 7, 0, 200), (5, 200));
        assert_eq!(c.leader_end_offset_for(6, 7, 0, 200), (5, 200));
        // The log start moved to 120: epoch 0 is gone, epoch 3 starts at 120.
        assert_eq!(c.leader_end_offset_for(0, 5, 120, 200), (0, 120));
        assert_eq!(c.leader_end_offset_for(3, 5, 120, 200), (3, 150));
        // ... and to 150: only epoch 5 is left.
        assert_eq!(c.leader_end_offset_for(3, 5, 150, 200), (3, 150));
        assert_eq!(c.leader_end_offset_for(5, 5, 150, 200), (5, 200));
    }

    #[test]
    fn file_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(EpochCache::load(dir.path()).unwrap(), None);
        let mut c = EpochCache::default();
        c.assign(1, 0);
        c.assign(4, 77);
        EpochCache::store(dir.path(), &c.encode()).unwrap();
        let back = EpochCache::load(dir.path()).unwrap().unwrap();
        assert_eq!(back.entries(), c.entries());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(EPOCH_CHECKPOINT)).unwrap(),
            "0\n2\n1 0\n4 77\n"
        );
        std::fs::write(dir.path().join(EPOCH_CHECKPOINT), "0\n2\n4 0\n1 77\n").unwrap();
        assert!(
            EpochCache::load(dir.path()).is_err(),
            "epochs must increase"
        );
        std::fs::write(dir.path().join(EPOCH_CHECKPOINT), "0\n3\n1 0\n").unwrap();
        assert!(EpochCache::load(dir.path()).is_err(), "short file");
    }
}
