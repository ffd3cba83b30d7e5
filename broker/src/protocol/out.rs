//! `OutBuf`: the buffer responses are encoded into. It implements kafka-protocol's
//! `ByteBufMut`, so the crate encodes every field, but when the encoder writes a `records` field
//! that was registered with [`OutBuf::splice`], the stored batches are appended to the output
//! as `Bytes` references instead of being copied. The result is a list of `Bytes` written to the
//! socket with one vectored `sendmsg`.
//!
//! A partition's records may be several cached batches. The response struct needs one `Bytes`
//! of the right length in its `records` field: we give it a *placeholder*, a slice of a
//! reserved, never-touched, read-only zero region whose address identifies the partition, and
//! map that address to the real batches.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::OnceLock;

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::protocol::buf::ByteBufMut;

/// Virtual size of the placeholder region. Reserved with MAP_NORESERVE and never written or
/// read, so it costs address space only.
const PLACEHOLDER_REGION_BYTES: usize = 1 << 30;

fn placeholder_region() -> Option<&'static [u8]> {
    static REGION: OnceLock<Option<usize>> = OnceLock::new();
    let addr = REGION.get_or_init(|| {
        // SAFETY: an anonymous private read-only mapping with no address hint; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PLACEHOLDER_REGION_BYTES,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(p as usize)
    });
    // SAFETY: the mapping lives for the whole process and is only ever read.
    addr.map(|a| unsafe { std::slice::from_raw_parts(a as *const u8, PLACEHOLDER_REGION_BYTES) })
}

pub struct OutBuf {
    done: Vec<Bytes>,
    done_bytes: usize,
    cur: BytesMut,
    /// Placeholder address -> (length, the batches to send in its place).
    splices: HashMap<usize, (usize, Vec<Bytes>)>,
    next_placeholder: usize,
}

impl Default for OutBuf {
    fn default() -> Self {
        OutBuf::new()
    }
}

/// Below this size a batch is copied into the current chunk rather than referenced: a separate
/// iovec costs more than a memcpy of a few hundred bytes.
const SPLICE_BYTES_MIN: usize = 512;

impl OutBuf {
    pub fn new() -> OutBuf {
        OutBuf {
            done: Vec::new(),
            done_bytes: 0,
            cur: BytesMut::with_capacity(4096),
            splices: HashMap::new(),
            next_placeholder: 0,
        }
    }

    /// Registers a partition's batches; returns the `Bytes` to put in the response's `records`
    /// field. Falls back to one concatenated copy when no placeholder is available.
    pub fn splice(&mut self, batches: Vec<Bytes>) -> Bytes {
        let len: usize = batches.iter().map(|b| b.len()).sum();
        if len == 0 {
            return Bytes::new();
        }
        if batches.len() == 1 {
            let b = batches.into_iter().next().expect("one");
            self.splices
                .insert(b.as_ptr() as usize, (len, vec![b.clone()]));
            return b;
        }
        match placeholder_region() {
            Some(region) if self.next_placeholder + len <= region.len() => {
                let slice = &region[self.next_placeholder..self.next_placeholder + len];
                self.next_placeholder += 1;
                self.splices.insert(slice.as_ptr() as usize, (len, batches));
                Bytes::from_static(slice)
            }
            _ => {
                let mut all = BytesMut::with_capacity(len);
                for b in &batches {
                    all.extend_from_slice(b);
                }
                all.freeze()
            }
        }
    }

    fn len(&self) -> usize {
        self.done_bytes + self.cur.len()
    }

    fn seal(&mut self) {
        if !self.cur.is_empty() {
            let chunk = self.cur.split().freeze();
            self.done_bytes += chunk.len();
            self.done.push(chunk);
        }
    }

    /// The encoded frame as a list of buffers.
    pub fn finish(mut self) -> Vec<Bytes> {
        self.seal();
        self.done
    }
}

// SAFETY: every method delegates to the inner BytesMut, which upholds BufMut's contract.
unsafe impl BufMut for OutBuf {
    fn remaining_mut(&self) -> usize {
        self.cur.remaining_mut()
    }
    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: forwarded contract: `cnt` bytes of chunk_mut were initialised by the caller.
        unsafe { self.cur.advance_mut(cnt) }
    }
    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.cur.chunk_mut()
    }
    fn put_slice(&mut self, src: &[u8]) {
        if !self.splices.is_empty() {
            if let Some((len, parts)) = self.splices.remove(&(src.as_ptr() as usize)) {
                if len == src.len() {
                    for p in parts {
                        if p.len() < SPLICE_BYTES_MIN {
                            self.cur.extend_from_slice(&p);
                        } else {
                            self.seal();
                            self.done_bytes += p.len();
                            self.done.push(p);
                        }
                    }
                    return;
                }
                self.splices.insert(src.as_ptr() as usize, (len, parts));
            }
        }
        self.cur.extend_from_slice(src);
    }
}

impl ByteBufMut for OutBuf {
    fn offset(&self) -> usize {
        self.len()
    }
    /// kafka-protocol's message encoders never seek (they compute sizes up front); seeking is
    /// only supported inside the current chunk.
    fn seek(&mut self, offset: usize) {
        assert!(
            offset >= self.done_bytes,
            "OutBuf cannot seek before a spliced batch"
        );
        self.cur.resize(offset - self.done_bytes, 0);
    }
    fn range(&mut self, r: Range<usize>) -> &mut [u8] {
        assert!(
            r.start >= self.done_bytes,
            "OutBuf cannot revisit a spliced batch"
        );
        &mut self.cur[r.start - self.done_bytes..r.end - self.done_bytes]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{
        FetchResponse, FetchableTopicResponse, PartitionData,
    };
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

    #[test]
    fn spliced_records_match_a_plain_encoding() {
        let a = Bytes::from(vec![1u8; 1000]);
        let b = Bytes::from(vec![2u8; 2000]);
        let c = Bytes::from(vec![3u8; 10]);
        let mut out = OutBuf::new();
        let p0 = out.splice(vec![a.clone(), b.clone(), c.clone()]);
        let p1 = out.splice(vec![b.clone()]);
        let resp = |r0: Bytes, r1: Bytes| {
            FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
                .with_topic(StrBytes::from_static_str("t").into())
                .with_partitions(vec![
                    PartitionData::default()
                        .with_partition_index(0)
                        .with_records(Some(r0)),
                    PartitionData::default()
                        .with_partition_index(1)
                        .with_records(Some(r1)),
                ])])
        };
        resp(p0, p1).encode(&mut out, 12).unwrap();
        let parts = out.finish();
        assert!(
            parts.iter().any(|p| p.as_ptr() == a.as_ptr()),
            "batch referenced, not copied"
        );
        let spliced: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let mut concat = BytesMut::new();
        concat.extend_from_slice(&a);
        concat.extend_from_slice(&b);
        concat.extend_from_slice(&c);
        let mut plain = BytesMut::new();
        resp(concat.freeze(), b.clone())
            .encode(&mut plain, 12)
            .unwrap();
        assert_eq!(spliced, plain.to_vec());
        let back = FetchResponse::decode(&mut Bytes::from(spliced), 12).unwrap();
        assert_eq!(
            back.responses[0].partitions[1].records.as_ref().unwrap(),
            &b
        );
    }
}
