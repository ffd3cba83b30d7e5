//! Partitioners, as the Java client has them.

use std::collections::HashMap;
use std::sync::Mutex;

use rand::Rng;

/// Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), bit for bit, so a key lands
/// on the same partition as with the Java client.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= (tail[2] as u32) << 16;
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner picks for a key.
pub fn partition_for_key(key: &[u8], partitions: usize) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) as usize % partitions.max(1)) as i32
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionerKind {
    /// Explicit partition, else murmur2 of the key, else sticky per batch (adaptive).
    Default,
    /// Ignores keys: sticky per batch, choosing the next partition weighted against queue
    /// length (KIP-794), like `partitioner.ignore.keys=true`.
    UniformSticky,
    /// Cycles through partitions record by record.
    RoundRobin,
}

/// Chooses partitions for records without an explicit one.
pub struct Partitioner {
    kind: PartitionerKind,
    /// topic -> current sticky partition
    sticky: Mutex<HashMap<String, i32>>,
    counters: Mutex<HashMap<String, u64>>,
}

impl Partitioner {
    pub fn new(kind: PartitionerKind) -> Partitioner {
        Partitioner {
            kind,
            sticky: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
        }
    }

    /// `queue_bytes[p]` is what partition p has waiting in the accumulator (KIP-794 weights).
    pub fn partition(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        partitions: usize,
        queue_bytes: &dyn Fn(i32) -> usize,
    ) -> i32 {
        match (self.kind, key) {
            (PartitionerKind::Default, Some(k)) => partition_for_key(k, partitions),
            (PartitionerKind::RoundRobin, _) => {
                let mut c = self.counters.lock().unwrap();
                let n = c.entry(topic.to_string()).or_insert(0);
                let p = (*n % partitions as u64) as i32;
                *n += 1;
                p
            }
            _ => {
                let mut s = self.sticky.lock().unwrap();
                match s.get(topic) {
                    Some(&p) if (p as usize) < partitions => p,
                    _ => {
                        let p = adaptive_choice(partitions, queue_bytes);
                        s.insert(topic.to_string(), p);
                        p
                    }
                }
            }
        }
    }

    /// A batch of `topic` filled up or was sent: the sticky partition moves on.
    pub fn on_new_batch(&self, topic: &str, partitions: usize, queue_bytes: &dyn Fn(i32) -> usize) {
        if self.kind == PartitionerKind::RoundRobin {
            return;
        }
        let p = adaptive_choice(partitions, queue_bytes);
        self.sticky.lock().unwrap().insert(topic.to_string(), p);
    }
}

/// KIP-794: pick a partition at random, weighted by (longest queue + 1 - its queue), so
/// partitions whose leaders drain slowly get fewer new batches.
fn adaptive_choice(partitions: usize, queue_bytes: &dyn Fn(i32) -> usize) -> i32 {
    let n = partitions.max(1);
    let queues: Vec<usize> = (0..n as i32).map(queue_bytes).collect();
    let max = queues.iter().copied().max().unwrap_or(0);
    let weights: Vec<u64> = queues.iter().map(|q| (max - q + 1) as u64).collect();
    let total: u64 = weights.iter().sum();
    let mut r = rand::thread_rng().gen_range(0..total);
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            return i as i32;
        }
        r -= w;
    }
    (n - 1) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (data, want) in cases {
            assert_eq!(murmur2(data), want, "{}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn partitioners() {
        let none = |_| 0usize;
        let d = Partitioner::new(PartitionerKind::Default);
        assert_eq!(
            d.partition("t", Some(b"foobar"), 6, &none),
            partition_for_key(b"foobar", 6)
        );
        let first = d.partition("t", None, 6, &none);
        assert_eq!(
            d.partition("t", None, 6, &none),
            first,
            "sticky until the batch is done"
        );
        let rr = Partitioner::new(PartitionerKind::RoundRobin);
        let ps: Vec<i32> = (0..6)
            .map(|_| rr.partition("t", Some(b"k"), 3, &none))
            .collect();
        assert_eq!(ps, vec![0, 1, 2, 0, 1, 2]);
        // Adaptive: a partition with a long queue is almost never chosen.
        let skewed = |p: i32| if p == 0 { 1_000_000 } else { 0 };
        let zeros = (0..1000)
            .filter(|_| adaptive_choice(3, &skewed) == 0)
            .count();
        assert!(zeros < 5, "{zeros}");
        let u = Partitioner::new(PartitionerKind::UniformSticky);
        let a = u.partition("t", Some(b"foobar"), 6, &none);
        assert_eq!(
            u.partition("t", Some(b"other"), 6, &none),
            a,
            "keys ignored"
        );
    }
}
