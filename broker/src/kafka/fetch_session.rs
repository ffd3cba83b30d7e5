//! Incremental fetch sessions (KIP-227). A consumer (or, later, a follower) of many partitions
//! opens a session with a full fetch (session id 0, epoch 0); later requests name only the
//! partitions whose fetch position changed (plus forgotten ones), and responses carry only the
//! partitions with news: records, an error, or a moved high watermark or log start.
//!
//! Sessions live in the shard that serves the connection (a client keeps its session on its
//! connection; after a reconnect to another shard it gets FETCH_SESSION_ID_NOT_FOUND and starts
//! over with a full fetch, as Kafka's clients do). Session ids carry the shard in their low bits,
//! so they are unique across the broker. Each shard holds at most its share of
//! `SESSION_SLOTS_MAX`; a new session takes the least recently used slot only when that one has
//! been idle for `SESSION_EVICTION_IDLE_MS`, otherwise the client is answered without a session
//! (session id 0) and simply keeps sending full fetches.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Kafka's `max.incremental.fetch.session.cache.slots` default, shared by the shards.
pub const SESSION_SLOTS_MAX: usize = 1000;
/// Kafka's `min.incremental.fetch.session.eviction.ms` default.
pub const SESSION_EVICTION_IDLE_MS: u64 = 120_000;
/// Partitions one session may hold (a broker holds at most 50,000).
pub const SESSION_PARTITIONS_MAX: usize = 50_000;

pub const FETCH_SESSION_ID_NOT_FOUND: i16 = 70;
pub const INVALID_FETCH_SESSION_EPOCH: i16 = 71;

/// What the session remembers of one partition: the position the client last asked for and
/// what it was last told, to decide whether an incremental response must mention it.
#[derive(Clone, Debug)]
pub struct CachedPartition {
    pub topic: String,
    pub partition: i32,
    pub fetch_offset: i64,
    pub max_bytes: usize,
    pub current_leader_epoch: i32,
    /// A follower's epoch of its last batch (Fetch v12), kept like the fetch offset: the
    /// leader checks it for divergence on every fetch, named in the request or not.
    pub last_fetched_epoch: i32,
    last_high_watermark: i64,
    last_log_start_offset: i64,
}

impl CachedPartition {
    pub fn new(
        topic: String,
        partition: i32,
        fetch_offset: i64,
        max_bytes: usize,
        current_leader_epoch: i32,
    ) -> CachedPartition {
        CachedPartition {
            topic,
            partition,
            fetch_offset,
            max_bytes,
            current_leader_epoch,
            last_fetched_epoch: -1,
            // Never sent yet: the first response always mentions it.
            last_high_watermark: i64::MIN,
            last_log_start_offset: i64::MIN,
        }
    }

    /// Records what a response says of this partition; true when an incremental response must
    /// include it.
    pub fn must_respond(
        &mut self,
        has_records: bool,
        error: i16,
        high_watermark: i64,
        log_start: i64,
    ) -> bool {
        let moved =
            high_watermark != self.last_high_watermark || log_start != self.last_log_start_offset;
        self.last_high_watermark = high_watermark;
        self.last_log_start_offset = log_start;
        moved || has_records || error != 0
    }
}

pub struct Session {
    pub id: i32,
    /// The epoch the next request must carry.
    pub next_epoch: i32,
    /// In the order partitions were added (responses keep that order).
    pub partitions: Vec<CachedPartition>,
    /// topic -> partition -> position in `partitions`; keyed by topic first so lookups by
    /// `&str` allocate nothing.
    index: HashMap<String, HashMap<i32, usize>>,
    last_used: Instant,
}

impl Session {
    fn new(id: i32) -> Session {
        Session {
            id,
            next_epoch: 1,
            partitions: Vec::new(),
            index: HashMap::new(),
            last_used: Instant::now(),
        }
    }

    /// Adds or updates a partition from a request. False when the session is full.
    pub fn upsert(&mut self, p: CachedPartition) -> bool {
        if let Some(c) = self.get_mut(&p.topic, p.partition) {
            c.fetch_offset = p.fetch_offset;
            c.max_bytes = p.max_bytes;
            c.current_leader_epoch = p.current_leader_epoch;
            c.last_fetched_epoch = p.last_fetched_epoch;
            return true;
        }
        if self.partitions.len() >= SESSION_PARTITIONS_MAX {
            return false;
        }
        self.index
            .entry(p.topic.clone())
            .or_default()
            .insert(p.partition, self.partitions.len());
        self.partitions.push(p);
        true
    }

    /// The cached partition, found through the index (not a scan: sessions hold thousands).
    pub fn get_mut(&mut self, topic: &str, partition: i32) -> Option<&mut CachedPartition> {
        let &i = self.index.get(topic)?.get(&partition)?;
        self.partitions.get_mut(i)
    }

    pub fn forget(&mut self, topic: &str, partition: i32) {
        let Some(parts) = self.index.get_mut(topic) else {
            return;
        };
        let Some(i) = parts.remove(&partition) else {
            return;
        };
        if parts.is_empty() {
            self.index.remove(topic);
        }
        self.partitions.remove(i);
        for v in self.index.values_mut().flat_map(|m| m.values_mut()) {
            if *v > i {
                *v -= 1;
            }
        }
    }
}

#[derive(Default)]
struct Cache {
    sessions: HashMap<i32, Session>,
    next: u32,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// A new session with a fresh id, or None when this shard's slots are all in recent use.
pub fn create(shard_id: usize, shard_count: usize) -> Option<i32> {
    let slots = (SESSION_SLOTS_MAX / shard_count.max(1)).max(1);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.sessions.len() >= slots {
            let idle = Duration::from_millis(SESSION_EVICTION_IDLE_MS);
            let lru = c
                .sessions
                .values()
                .min_by_key(|s| s.last_used)
                .filter(|s| s.last_used.elapsed() >= idle)
                .map(|s| s.id)?;
            c.sessions.remove(&lru);
        }
        // Ids: positive, never 0, low bits = shard, so shards never collide. Bounded: at most
        // `slots + 1` ids are taken, so a free one is found within that many tries.
        let stride = shard_count.max(1) as u64;
        loop {
            c.next = c.next.wrapping_add(1);
            let raw = (c.next as u64 * stride + shard_id as u64) % (i32::MAX as u64);
            let id = raw as i32;
            if id != 0 && !c.sessions.contains_key(&id) {
                c.sessions.insert(id, Session::new(id));
                return Some(id);
            }
        }
    })
}

pub fn remove(id: i32) {
    CACHE.with(|c| c.borrow_mut().sessions.remove(&id));
}

/// Runs `f` on session `id` if it exists. The borrow ends before `with_session` returns, so
/// callers never hold it across an await.
pub fn with_session<R>(id: i32, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let s = c.sessions.get_mut(&id)?;
        s.last_used = Instant::now();
        Some(f(s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_track_partitions_and_changes() {
        let id = create(1, 2).unwrap();
        assert_eq!(id % 2, 1, "low bits name the shard");
        let again = create(1, 2).unwrap();
        assert_ne!(id, again);
        with_session(id, |s| {
            assert!(s.upsert(CachedPartition::new("a".into(), 0, 5, 100, -1)));
            assert!(s.upsert(CachedPartition::new("a".into(), 1, 0, 100, -1)));
            assert!(s.upsert(CachedPartition::new("a".into(), 0, 9, 100, -1)));
            assert_eq!(s.partitions.len(), 2);
            assert_eq!(s.partitions[0].fetch_offset, 9);
            let p = &mut s.partitions[1];
            assert!(p.must_respond(false, 0, 10, 0), "first time");
            assert!(!p.must_respond(false, 0, 10, 0), "nothing new");
            assert!(p.must_respond(false, 0, 11, 0), "high watermark moved");
            assert!(p.must_respond(true, 0, 11, 0), "records");
            assert!(p.must_respond(false, 6, 11, 0), "error");
            s.forget("a", 0);
            assert_eq!(s.partitions.len(), 1);
            assert!(s.upsert(CachedPartition::new("b".into(), 0, 0, 1, -1)));
            assert_eq!(s.index["b"][&0], 1);
            assert_eq!(s.get_mut("a", 1).unwrap().fetch_offset, 0);
        })
        .unwrap();
        remove(id);
        assert!(with_session(id, |_| ()).is_none());
        remove(again);
    }

    #[test]
    fn a_full_cache_refuses_new_sessions_while_the_old_ones_are_recent() {
        let slots = SESSION_SLOTS_MAX;
        let ids: Vec<i32> = (0..slots).map(|_| create(0, 1).unwrap()).collect();
        assert!(create(0, 1).is_none());
        for id in ids {
            remove(id);
        }
        assert!(create(0, 1).is_some());
    }
}
