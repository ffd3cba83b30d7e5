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
/// A request of the other kind (topic names before v13, topic ids from v13) in a session.
pub const FETCH_SESSION_TOPIC_ID_ERROR: i16 = 106;

/// How a request names a topic: by name (Fetch v7-12) or by topic id (v13+, KIP-516).
#[derive(Clone, Copy, Debug)]
pub enum TopicRef<'a> {
    Name(&'a str),
    Id(uuid::Uuid),
}

/// What the session remembers of one partition: the position the client last asked for and
/// what it was last told, to decide whether an incremental response must mention it.
#[derive(Clone, Debug)]
pub struct CachedPartition {
    /// The topic's name; in a session by topic id, the name the id had when last resolved
    /// ("" while the id is unknown).
    pub topic: String,
    /// The topic id the client named (v13+), nil in a session by name.
    pub topic_id: uuid::Uuid,
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
            topic_id: uuid::Uuid::nil(),
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
    /// Opened by a v13+ request: partitions are keyed by topic id, and requests of older
    /// versions are refused (FETCH_SESSION_TOPIC_ID_ERROR), as Kafka does.
    pub uses_topic_ids: bool,
    /// In the order partitions were added (responses keep that order).
    pub partitions: Vec<CachedPartition>,
    /// topic -> partition -> position in `partitions`; keyed by topic first so lookups by
    /// `&str` allocate nothing. Used by sessions by name.
    index: HashMap<String, HashMap<i32, usize>>,
    /// The same, by topic id (sessions by topic id).
    index_by_id: HashMap<uuid::Uuid, HashMap<i32, usize>>,
    last_used: Instant,
}

impl Session {
    fn new(id: i32) -> Session {
        Session {
            id,
            next_epoch: 1,
            uses_topic_ids: false,
            partitions: Vec::new(),
            index: HashMap::new(),
            index_by_id: HashMap::new(),
            last_used: Instant::now(),
        }
    }

    /// How this session names the topic of `p`.
    fn key_of<'a>(&self, p: &'a CachedPartition) -> TopicRef<'a> {
        if self.uses_topic_ids {
            TopicRef::Id(p.topic_id)
        } else {
            TopicRef::Name(&p.topic)
        }
    }

    fn slot(&self, topic: TopicRef) -> Option<&HashMap<i32, usize>> {
        match topic {
            TopicRef::Name(n) => self.index.get(n),
            TopicRef::Id(id) => self.index_by_id.get(&id),
        }
    }

    /// Adds or updates a partition from a request. False when the session is full.
    pub fn upsert(&mut self, p: CachedPartition) -> bool {
        let key = self.key_of(&p);
        if let Some(&i) = self.slot(key).and_then(|m| m.get(&p.partition)) {
            let c = &mut self.partitions[i];
            c.topic = p.topic;
            c.fetch_offset = p.fetch_offset;
            c.max_bytes = p.max_bytes;
            c.current_leader_epoch = p.current_leader_epoch;
            c.last_fetched_epoch = p.last_fetched_epoch;
            return true;
        }
        if self.partitions.len() >= SESSION_PARTITIONS_MAX {
            return false;
        }
        let at = self.partitions.len();
        if self.uses_topic_ids {
            self.index_by_id
                .entry(p.topic_id)
                .or_default()
                .insert(p.partition, at);
        } else {
            self.index
                .entry(p.topic.clone())
                .or_default()
                .insert(p.partition, at);
        }
        self.partitions.push(p);
        true
    }

    /// The cached partition, found through the index (not a scan: sessions hold thousands).
    pub fn get_mut(&mut self, topic: TopicRef, partition: i32) -> Option<&mut CachedPartition> {
        let &i = self.slot(topic)?.get(&partition)?;
        self.partitions.get_mut(i)
    }

    pub fn forget(&mut self, topic: TopicRef, partition: i32) {
        let removed = match topic {
            TopicRef::Name(n) => {
                let Some(parts) = self.index.get_mut(n) else {
                    return;
                };
                let i = parts.remove(&partition);
                if parts.is_empty() {
                    self.index.remove(n);
                }
                i
            }
            TopicRef::Id(id) => {
                let Some(parts) = self.index_by_id.get_mut(&id) else {
                    return;
                };
                let i = parts.remove(&partition);
                if parts.is_empty() {
                    self.index_by_id.remove(&id);
                }
                i
            }
        };
        let Some(i) = removed else {
            return;
        };
        self.partitions.remove(i);
        let positions = self
            .index
            .values_mut()
            .chain(self.index_by_id.values_mut())
            .flat_map(|m| m.values_mut());
        for v in positions {
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
/// `uses_topic_ids`: opened by a Fetch v13+ request.
pub fn create(shard_id: usize, shard_count: usize, uses_topic_ids: bool) -> Option<i32> {
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
                let mut s = Session::new(id);
                s.uses_topic_ids = uses_topic_ids;
                c.sessions.insert(id, s);
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
        let id = create(1, 2, false).unwrap();
        assert_eq!(id % 2, 1, "low bits name the shard");
        let again = create(1, 2, false).unwrap();
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
            s.forget(TopicRef::Name("a"), 0);
            assert_eq!(s.partitions.len(), 1);
            assert!(s.upsert(CachedPartition::new("b".into(), 0, 0, 1, -1)));
            assert_eq!(s.index["b"][&0], 1);
            assert_eq!(s.get_mut(TopicRef::Name("a"), 1).unwrap().fetch_offset, 0);
        })
        .unwrap();
        remove(id);
        assert!(with_session(id, |_| ()).is_none());
        remove(again);
    }

    #[test]
    fn a_full_cache_refuses_new_sessions_while_the_old_ones_are_recent() {
        let slots = SESSION_SLOTS_MAX;
        let ids: Vec<i32> = (0..slots).map(|_| create(0, 1, false).unwrap()).collect();
        assert!(create(0, 1, false).is_none());
        for id in ids {
            remove(id);
        }
        assert!(create(0, 1, false).is_some());
    }

    #[test]
    fn sessions_by_topic_id_key_partitions_by_id() {
        let id = create(0, 1, true).unwrap();
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let part = |name: &str, topic_id, p, offset| {
            let mut c = CachedPartition::new(name.into(), p, offset, 100, -1);
            c.topic_id = topic_id;
            c
        };
        with_session(id, |s| {
            assert!(s.uses_topic_ids);
            assert!(s.upsert(part("x", a, 0, 1)));
            // An unknown id is kept with no name, and named once it resolves.
            assert!(s.upsert(part("", b, 0, 2)));
            assert!(s.upsert(part("y", b, 0, 3)));
            assert_eq!(s.partitions.len(), 2);
            assert_eq!(s.partitions[1].topic, "y");
            assert_eq!(s.partitions[1].fetch_offset, 3);
            // A topic recreated under the same name has a new id: another partition.
            let c = uuid::Uuid::from_u128(3);
            assert!(s.upsert(part("x", c, 0, 0)));
            assert_eq!(s.partitions.len(), 3);
            s.forget(TopicRef::Id(a), 0);
            assert_eq!(s.partitions.len(), 2);
            assert_eq!(s.get_mut(TopicRef::Id(c), 0).unwrap().fetch_offset, 0);
            assert_eq!(s.get_mut(TopicRef::Id(b), 0).unwrap().fetch_offset, 3);
            assert!(s.get_mut(TopicRef::Name("y"), 0).is_none());
        })
        .unwrap();
        remove(id);
    }
}
