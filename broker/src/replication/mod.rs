//! Replication: one partition replica's view of its leader, its followers, the ISR and the high
//! watermark (this file, pure state kept in each `shard::Partition`), and the follower fetchers
//! that copy leaders' logs (`fetcher.rs`).
//!
//! The model is Kafka's:
//! - The leader tracks each follower's fetch offset (its log end, LEO: a follower only fetches
//!   past what it has fdatasynced) and when it was last caught up.
//! - HW = the smallest LEO over the ISR (the leader's own included; while an ISR expansion is
//!   in flight, over the ISR with the joining replica). It only moves forward. Consumers read
//!   and ListOffsets answers only below it; acks=all producers are answered once it passes
//!   their batch (and the leader's own copy is fdatasynced).
//! - A follower not caught up for `replica.lag.time.max.ms` is dropped from the ISR; one whose
//!   LEO reaches the HW rejoins. Both go to the controller as an AlterPartition (carrying the
//!   leader and partition epochs it is based on, so a stale leader's change is refused).

pub mod checkpoint;
pub mod fetcher;
pub mod throttle;

use std::collections::BTreeMap;

use crate::cluster::metadata::PartitionMeta;

/// Where one follower is, as its leader saw in its fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Follower {
    /// The follower's LEO (its last fetch offset); -1 until it fetched in this leader epoch.
    pub end: i64,
    /// When it was last caught up (ms): when its fetch reached the leader's LEO, or reached
    /// the LEO the leader had at its previous fetch (then as of that previous fetch), as
    /// Kafka's `lastCaughtUpTime` (a follower one batch behind a busy leader keeps up).
    pub caught_up_ms: i64,
    /// Its previous fetch: when, and the leader's LEO then.
    pub last_fetch_ms: i64,
    pub last_fetch_leo: i64,
}

#[derive(Clone, Debug, Default)]
pub struct ReplicaState {
    pub me: i32,
    pub leader: i32,
    pub leader_epoch: i32,
    pub partition_epoch: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
    /// Leader only.
    pub followers: BTreeMap<i32, Follower>,
    pub high_watermark: i64,
    /// Leader only: the ISR of an AlterPartition sent and not yet seen in metadata.
    pub pending_isr: Option<Vec<i32>>,
}

impl ReplicaState {
    pub fn new(me: i32, high_watermark: i64) -> ReplicaState {
        ReplicaState {
            me,
            leader: -1,
            leader_epoch: -1,
            high_watermark,
            ..Default::default()
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader == self.me
    }

    /// Takes the partition's metadata. A new leader epoch starts follower tracking afresh
    /// (every follower gets `replica.lag.time.max.ms` from now to catch up).
    pub fn update(&mut self, pm: &PartitionMeta, now_ms: i64) {
        // Metadata older than what this replica already applied changes nothing.
        if pm.leader_epoch < self.leader_epoch
            || (pm.leader_epoch == self.leader_epoch && pm.partition_epoch < self.partition_epoch)
        {
            return;
        }
        let new_epoch = pm.leader_epoch != self.leader_epoch || pm.leader != self.leader;
        self.leader = pm.leader;
        self.leader_epoch = pm.leader_epoch;
        self.replicas = pm.replicas.clone();
        if pm.partition_epoch != self.partition_epoch || new_epoch {
            self.pending_isr = None;
        }
        self.partition_epoch = pm.partition_epoch;
        self.isr = pm.isr.clone();
        if new_epoch {
            self.followers.clear();
        }
        if self.is_leader() {
            for &r in &self.replicas {
                if r != self.me {
                    self.followers.entry(r).or_insert(Follower {
                        end: -1,
                        caught_up_ms: now_ms,
                        last_fetch_ms: now_ms,
                        last_fetch_leo: i64::MAX,
                    });
                }
            }
            self.followers.retain(|r, _| pm.replicas.contains(r));
        } else {
            self.followers.clear();
        }
    }

    /// The replicas the HW waits for: the ISR, plus a replica joining it.
    fn maximal_isr(&self) -> impl Iterator<Item = i32> + '_ {
        self.isr
            .iter()
            .chain(self.pending_isr.iter().flatten())
            .copied()
    }

    /// A follower fetched at `fetch_offset` while the leader's LEO was `leo`.
    pub fn on_follower_fetch(&mut self, replica: i32, fetch_offset: i64, leo: i64, now_ms: i64) {
        if let Some(f) = self.followers.get_mut(&replica) {
            f.end = fetch_offset;
            if fetch_offset >= leo {
                f.caught_up_ms = now_ms;
            } else if fetch_offset >= f.last_fetch_leo {
                f.caught_up_ms = f.caught_up_ms.max(f.last_fetch_ms);
            }
            f.last_fetch_ms = now_ms;
            f.last_fetch_leo = leo;
        }
    }

    /// Moves the HW forward to the smallest LEO over the (maximal) ISR, `leo` being the
    /// leader's. Returns whether it moved.
    pub fn advance_high_watermark(&mut self, leo: i64) -> bool {
        if !self.is_leader() {
            return false;
        }
        let mut hw = leo;
        for r in self.maximal_isr() {
            if r == self.me {
                continue;
            }
            match self.followers.get(&r) {
                Some(f) if f.end >= 0 => hw = hw.min(f.end),
                // An ISR member that has not fetched in this epoch holds the HW.
                _ => return false,
            }
        }
        if hw > self.high_watermark {
            self.high_watermark = hw;
            true
        } else {
            false
        }
    }

    /// The ISR the leader should ask for now, if it differs: followers not caught up for
    /// `lag_ms` leave, followers whose LEO reached the HW join. None while a change is in flight.
    pub fn isr_proposal(&self, now_ms: i64, lag_ms: u64) -> Option<Vec<i32>> {
        if !self.is_leader() || self.pending_isr.is_some() {
            return None;
        }
        let mut isr: Vec<i32> = self
            .isr
            .iter()
            .copied()
            .filter(|r| {
                *r == self.me
                    || self
                        .followers
                        .get(r)
                        .is_some_and(|f| now_ms - f.caught_up_ms <= lag_ms as i64)
            })
            .collect();
        for (&r, f) in &self.followers {
            if !isr.contains(&r)
                && f.end >= self.high_watermark
                && f.end >= 0
                && now_ms - f.caught_up_ms <= lag_ms as i64
            {
                isr.push(r);
            }
        }
        if !isr.contains(&self.me) {
            isr.push(self.me);
        }
        isr.sort_unstable();
        let mut now = self.isr.clone();
        now.sort_unstable();
        (isr != now).then_some(isr)
    }
}

/// How often a shard's leaders check their ISR (at most; a quarter of the lag time when that
/// is shorter).
const ISR_CHECK_INTERVAL_MS: u64 = 1000;

/// Each shard of a broker in a cluster: its leader replicas propose ISR changes to the
/// controller (one in flight per partition), as `ReplicaState::isr_proposal` says.
pub async fn isr_ticker(s: std::rc::Rc<crate::shard::Shard>) {
    let lag_ms = s.config.cluster.replica_lag_time_max_ms;
    let every = std::time::Duration::from_millis((lag_ms / 4).clamp(50, ISR_CHECK_INTERVAL_MS));
    // Bounded: one pass per interval until shutdown.
    while !s.shutting_down.get() {
        glommio::timer::sleep(every).await;
        let now = crate::storage::log::now_ms();
        for p in s.all_partitions() {
            let op = {
                let mut r = p.repl.borrow_mut();
                let Some(isr) = r.isr_proposal(now, lag_ms) else {
                    continue;
                };
                r.pending_isr = Some(isr.clone());
                crate::shard::ControlOp::AlterPartition {
                    topic: p.topic.clone(),
                    partition: p.index,
                    leader: r.me,
                    leader_epoch: r.leader_epoch,
                    partition_epoch: r.partition_epoch,
                    isr,
                }
            };
            let (s, p) = (s.clone(), p.clone());
            glommio::spawn_local(async move {
                let (was, asked) = {
                    let r = p.repl.borrow();
                    (r.isr.clone(), r.pending_isr.clone())
                };
                let reply = crate::cluster::controller::request(&s, op).await;
                let code = match reply.as_deref() {
                    Some([Ok((_, code))]) => *code,
                    Some([Err(e)]) => {
                        tracing::warn!(topic = %p.topic, partition = p.index, "AlterPartition failed: {e:?}");
                        -1
                    }
                    _ => -1,
                };
                if code == 0 {
                    tracing::info!(topic = %p.topic, partition = p.index, ?was, isr = ?asked, "ISR changed");
                    crate::metrics::isr_changed(asked.as_ref().is_some_and(|a| a.len() < was.len()));
                } else {
                    tracing::info!(topic = %p.topic, partition = p.index, code, "AlterPartition refused");
                }
                // Committed changes clear it when the metadata arrives; a refusal clears it now
                // so the next check asks again against newer metadata.
                // (A forwarded change is answered once this broker applied it.)
                let mut r = p.repl.borrow_mut();
                if r.pending_isr == asked {
                    r.pending_isr = None;
                }
            })
            .detach();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(leader: i32, epoch: i32, isr: &[i32], pe: i32) -> PartitionMeta {
        PartitionMeta {
            shard: 0,
            leader_epoch: epoch,
            replicas: vec![1, 2, 3],
            isr: isr.to_vec(),
            leader,
            partition_epoch: pe,
            adding: Vec::new(),
            removing: Vec::new(),
        }
    }

    #[test]
    fn high_watermark_is_min_leo_over_isr_and_only_grows() {
        let mut s = ReplicaState::new(1, 0);
        s.update(&meta(1, 5, &[1, 2, 3], 7), 0);
        assert!(s.is_leader());
        assert!(
            !s.advance_high_watermark(100),
            "followers have not fetched yet"
        );
        s.on_follower_fetch(2, 60, 100, 1);
        assert!(!s.advance_high_watermark(100));
        s.on_follower_fetch(3, 40, 100, 1);
        assert!(s.advance_high_watermark(100));
        assert_eq!(s.high_watermark, 40);
        s.on_follower_fetch(3, 100, 100, 2);
        assert!(s.advance_high_watermark(100));
        assert_eq!(s.high_watermark, 60);
        // A follower that truncated does not pull the HW back.
        s.on_follower_fetch(2, 10, 100, 3);
        assert!(!s.advance_high_watermark(100));
        assert_eq!(s.high_watermark, 60);
        // Out of the ISR, a follower no longer holds the HW.
        s.update(&meta(1, 5, &[1, 3], 8), 4);
        assert!(s.advance_high_watermark(100));
        assert_eq!(s.high_watermark, 100);
    }

    #[test]
    fn isr_shrinks_after_lag_and_expands_at_hw() {
        let mut s = ReplicaState::new(1, 0);
        s.update(&meta(1, 5, &[1, 2, 3], 7), 0);
        s.on_follower_fetch(2, 50, 50, 100);
        s.on_follower_fetch(3, 20, 50, 100);
        assert_eq!(s.isr_proposal(1_000, 30_000), None);
        // Follower 3 never caught up: out after the lag time; 2 stays.
        assert_eq!(s.isr_proposal(30_001, 30_000), Some(vec![1, 2]));
        s.pending_isr = Some(vec![1, 2]);
        assert_eq!(s.isr_proposal(30_001, 30_000), None, "one change at a time");
        s.update(&meta(1, 5, &[1, 2], 8), 30_002);
        assert_eq!(s.pending_isr, None);
        s.advance_high_watermark(50);
        assert_eq!(s.high_watermark, 50);
        // 3 catches up to the HW: back in.
        s.on_follower_fetch(3, 50, 50, 30_100);
        assert_eq!(s.isr_proposal(30_100, 30_000), Some(vec![1, 2, 3]));
        // Under steady load a follower is always a little behind the leader's LEO, but each
        // fetch reaches the LEO of the one before: it stays in sync.
        s.update(&meta(1, 5, &[1, 2, 3], 9), 30_150);
        let mut leo = 50;
        for t in 0..100 {
            let now = 30_200 + t * 100;
            s.on_follower_fetch(2, leo, leo + 5, now);
            s.on_follower_fetch(3, leo, leo + 5, now);
            leo += 5;
        }
        assert_eq!(s.isr_proposal(30_200 + 100 * 100, 2_000), None);
        // A follower that stops fetching is out after the lag time.
        assert_eq!(
            s.isr_proposal(30_200 + 100 * 100 + 2_200, 2_000),
            Some(vec![1])
        );
        // Older metadata (a late apply) does not roll the state back.
        let isr_now = s.isr.clone();
        s.update(&meta(1, 5, &[1], 8), 40_000);
        assert_eq!(s.isr, isr_now);
        // A follower never leads: no proposals.
        s.update(&meta(2, 6, &[1, 2], 10), 50_000);
        assert_eq!(s.isr_proposal(90_000, 30_000), None);
        assert!(!s.advance_high_watermark(1_000));
    }
}
