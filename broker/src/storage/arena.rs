//! The shard's arena for the batches it stamps at append: the copies that the cache, the pending
//! writes and fetch responses share as `Bytes`.
//!
//! Each batch used to be its own heap allocation. The cache frees them in write order while
//! requests, responses and tasks allocate and free around them, so glibc's per-thread heaps
//! kept holes between live batches: about 13 MB of resident memory beyond the live bytes in the
//! overload run (measured with `malloc_trim`, which returned it). Here batches are copied one
//! after another into 512 KiB chunks mapped for the purpose; a chunk is released when the last
//! batch in it is dropped, on whichever thread that happens (kept for reuse, at most
//! POOL_CHUNKS_MAX in the process, else unmapped). Batches are appended and evicted
//! in nearly the same order, so memory tracks the live batches to within a chunk or two, and
//! a copy is a bump of an offset instead of a `malloc`.
//!
//! Limits: a shard maps at most `cap_bytes` of chunks (set from the cache limit plus the
//! shard's unwritten-bytes limit). When that is reached (say every chunk is held by one batch
//! of a stalled partition) or a map fails, or a batch is larger than a quarter chunk, the copy
//! is an ordinary heap allocation, as before. So the arena never holds more than its cap, and
//! what it does not take is bounded as it was before.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

/// Bytes per mapped chunk.
pub const CHUNK_BYTES: usize = 512 << 10;
/// Larger batches get their own heap allocation: at most this much of a chunk's end is left
/// unused when a batch does not fit.
pub const ARENA_BATCH_BYTES_MAX: usize = CHUNK_BYTES / 4;
/// The cap of a shard whose limits were not set (unit tests, tools).
const DEFAULT_CAP_BYTES: usize = 256 << 20;
/// Unmapped chunks kept for reuse, process-wide. A new mapping costs its pages' zeroing and an
/// unmap a TLB shootdown of the other cores: without reuse that was about 6% more broker CPU
/// per record in the canonical run. Kept chunks stay resident, so this is a few MiB at most.
pub const POOL_CHUNKS_MAX: usize = 2;

/// Chunk mappings waiting for reuse (addresses), at most POOL_CHUNKS_MAX.
static POOL: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

thread_local! {
    static ARENA: RefCell<BatchArena> = RefCell::new(BatchArena::new(DEFAULT_CAP_BYTES));
}

/// Copies `src` into this thread's arena, then lets `patch` change the copy in place.
pub fn copy_with(src: &[u8], patch: impl FnOnce(&mut [u8])) -> Bytes {
    ARENA.with(|a| a.borrow_mut().copy_with(src, patch))
}

/// Sets this thread's (shard's) cap on mapped chunk bytes.
pub fn set_cap_bytes(cap_bytes: usize) {
    ARENA.with(|a| a.borrow_mut().cap_bytes = cap_bytes);
}

/// Bytes of chunks this thread's arena holds (for metrics; chunks kept for reuse are not
/// counted: at most POOL_CHUNKS_MAX of them).
pub fn mapped_bytes() -> usize {
    ARENA.with(|a| a.borrow().mapped_bytes())
}

/// One mapped chunk. Its regions are each written once, before any `Bytes` covers them, and
/// only read afterwards.
struct Chunk {
    ptr: NonNull<u8>,
    mapped: Arc<AtomicUsize>,
}

// SAFETY: the chunk owns its mapping. Shared access is to regions that are no longer written
// (a region is filled through the arena's one `&mut` before its `Bytes` exists), and the
// unmap happens once, when the last reference is dropped.
unsafe impl Send for Chunk {}
// SAFETY: as above: concurrent readers only read filled regions.
unsafe impl Sync for Chunk {}

impl Chunk {
    fn map(mapped: Arc<AtomicUsize>) -> Option<Chunk> {
        let reused = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(addr) = reused {
            mapped.fetch_add(CHUNK_BYTES, Ordering::Relaxed);
            return Some(Chunk {
                ptr: NonNull::new(addr as *mut u8)?,
                mapped,
            });
        }
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHUNK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        mapped.fetch_add(CHUNK_BYTES, Ordering::Relaxed);
        Some(Chunk {
            ptr: NonNull::new(p.cast::<u8>())?,
            mapped,
        })
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let kept = {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOL_CHUNKS_MAX {
                pool.push(self.ptr.as_ptr() as usize);
                true
            } else {
                false
            }
        };
        if !kept {
            // SAFETY: the mapping was made by `mmap` with this length; no reference to it
            // remains.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), CHUNK_BYTES) };
        }
        let before = self.mapped.fetch_sub(CHUNK_BYTES, Ordering::Relaxed);
        debug_assert!(before >= CHUNK_BYTES);
    }
}

/// A filled region of a chunk: the owner behind one batch's `Bytes`.
struct Region {
    chunk: Arc<Chunk>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for Region {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: [start, start + len) is inside the mapping, was filled before this region
        // was made, and is never written again.
        unsafe { std::slice::from_raw_parts(self.chunk.ptr.as_ptr().add(self.start), self.len) }
    }
}

pub struct BatchArena {
    current: Option<Arc<Chunk>>,
    /// Bytes of `current` handed out.
    used: usize,
    /// Bytes of chunks mapped and not yet unmapped (chunks are dropped on any thread).
    mapped: Arc<AtomicUsize>,
    pub cap_bytes: usize,
}

impl BatchArena {
    pub fn new(cap_bytes: usize) -> BatchArena {
        BatchArena {
            current: None,
            used: 0,
            mapped: Arc::new(AtomicUsize::new(0)),
            cap_bytes,
        }
    }

    pub fn mapped_bytes(&self) -> usize {
        self.mapped.load(Ordering::Relaxed)
    }

    /// Copies `src` into the arena (or the heap, see the module doc), then lets `patch`
    /// change the copy before anything else can see it.
    pub fn copy_with(&mut self, src: &[u8], patch: impl FnOnce(&mut [u8])) -> Bytes {
        let len = src.len();
        if len == 0 || len > ARENA_BATCH_BYTES_MAX {
            return heap_copy(src, patch);
        }
        if self.current.is_none() || self.used + len > CHUNK_BYTES {
            // The old chunk stays mapped while its batches live.
            self.current = None;
            if self.mapped_bytes() + CHUNK_BYTES > self.cap_bytes {
                return heap_copy(src, patch);
            }
            let Some(chunk) = Chunk::map(self.mapped.clone()) else {
                return heap_copy(src, patch);
            };
            self.current = Some(Arc::new(chunk));
            self.used = 0;
        }
        let chunk = self.current.as_ref().expect("a chunk was just ensured");
        let start = self.used;
        debug_assert!(start + len <= CHUNK_BYTES);
        // SAFETY: [start, start + len) is inside the mapping and no `Bytes` covers it: regions
        // are handed out once, in increasing order, each only after `patch` returned.
        let dst = unsafe { std::slice::from_raw_parts_mut(chunk.ptr.as_ptr().add(start), len) };
        dst.copy_from_slice(src);
        patch(dst);
        self.used += len;
        Bytes::from_owner(Region {
            chunk: chunk.clone(),
            start,
            len,
        })
    }
}

/// A heap copy, not zero-filled first: zeroing a 1 MiB batch before copying over it cost about
/// 3% of the broker's CPU with kcat's 1 MB batches.
fn heap_copy(src: &[u8], patch: impl FnOnce(&mut [u8])) -> Bytes {
    let mut b = BytesMut::from(src);
    patch(&mut b);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of `len` bytes of `v`; the patch marks the first byte, to show it applies.
    fn copy_of(a: &mut BatchArena, len: usize, v: u8) -> Bytes {
        let b = a.copy_with(&vec![v; len], |d| d[0] = d[0].wrapping_add(1));
        assert_eq!(b[0], v.wrapping_add(1));
        b
    }

    /// Copies land intact, chunks are unmapped when their last batch goes (also when that
    /// happens on another thread), and the cap and the size limit send copies to the heap.
    #[test]
    fn chunks_follow_their_batches_and_the_cap_holds() {
        let mut a = BatchArena::new(3 * CHUNK_BYTES);
        let mut held = Vec::new();
        // Batches of a tenth of a chunk: 10 per chunk.
        let len = CHUNK_BYTES / 10;
        for i in 0..25u8 {
            let b = copy_of(&mut a, len, i);
            assert_eq!(b.len(), len);
            held.push(b);
        }
        assert_eq!(a.mapped_bytes(), 3 * CHUNK_BYTES);
        // The cap is reached: more copies come from the heap and map nothing.
        for i in 25..40u8 {
            held.push(copy_of(&mut a, len, i));
        }
        assert_eq!(a.mapped_bytes(), 3 * CHUNK_BYTES);
        for (i, b) in held.iter().enumerate() {
            assert!(b[1..].iter().all(|&x| x == i as u8), "batch {i}");
        }
        // Dropping the first chunk's batches unmaps it; one batch keeps a chunk mapped.
        let rest = held.split_off(10);
        drop(held);
        assert_eq!(a.mapped_bytes(), 2 * CHUNK_BYTES);
        let keep = rest[0].clone();
        let moved = std::thread::spawn(move || {
            drop(rest);
        });
        moved.join().unwrap();
        // The second chunk is held by `keep`. The third went with its batches: the arena let
        // go of it when the cap was reached.
        assert_eq!(a.mapped_bytes(), CHUNK_BYTES);
        assert!(keep[1..].iter().all(|&x| x == 10));
        drop(keep);
        assert_eq!(a.mapped_bytes(), 0);
        // Large batches never map a chunk; below the cap again, small ones do.
        let big = copy_of(&mut a, ARENA_BATCH_BYTES_MAX + 1, 7);
        assert!(big[1..].iter().all(|&x| x == 7));
        assert_eq!(a.mapped_bytes(), 0);
        let small = copy_of(&mut a, 10, 8);
        assert_eq!(a.mapped_bytes(), CHUNK_BYTES);
        drop(a);
        assert_eq!(&small[1..], &[8u8; 9]);
        drop(small);
        assert_eq!(big.len(), ARENA_BATCH_BYTES_MAX + 1);
    }
}
