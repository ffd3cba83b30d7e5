//! Provides compression utilities for encoding records.
//!
//! This module has implementations of gzip, Snappy, as well as a noop compression format that
//! allows encoding and decoding records into a [`Record`](crate::records::Record).

use crate::protocol::buf::{ByteBuf, ByteBufMut};
use anyhow::Result;

#[cfg(feature = "gzip")]
mod gzip;
#[cfg(feature = "lz4")]
mod lz4;
mod none;
#[cfg(feature = "snappy")]
mod snappy;
#[cfg(feature = "zstd")]
mod zstd;

#[cfg(feature = "gzip")]
pub use gzip::Gzip;
#[cfg(feature = "lz4")]
pub use lz4::Lz4;
pub use none::None;
#[cfg(feature = "snappy")]
pub use snappy::Snappy;
#[cfg(feature = "zstd")]
pub use zstd::Zstd;

/// The most bytes one compressed record batch may decompress to (Weir's patch: a small
/// compressed batch must not make the decoder allocate without bound). Set once by the
/// application; the default is unlimited.
static DECOMPRESSED_BYTES_MAX: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(usize::MAX);

/// Sets the limit on the decompressed size of one record batch.
pub fn set_decompressed_bytes_max(limit: usize) {
    DECOMPRESSED_BYTES_MAX.store(limit, std::sync::atomic::Ordering::Relaxed);
}

/// The limit on the decompressed size of one record batch.
pub fn decompressed_bytes_max() -> usize {
    DECOMPRESSED_BYTES_MAX.load(std::sync::atomic::Ordering::Relaxed)
}

/// Reads all of `r`, failing once more than `decompressed_bytes_max()` bytes come out.
#[allow(dead_code)]
pub(crate) fn read_capped<R: std::io::Read>(r: R, what: &str) -> Result<bytes::BytesMut> {
    use std::io::Read as _;
    let limit = decompressed_bytes_max();
    let mut out = Vec::new();
    r.take(limit.saturating_add(1) as u64)
        .read_to_end(&mut out)
        .map_err(|e| anyhow::anyhow!("Failed to decompress {what}: {e}"))?;
    if out.len() > limit {
        anyhow::bail!("{what} batch decompresses to more than {limit} bytes");
    }
    Ok(bytes::BytesMut::from(&out[..]))
}

/// A trait for record compression algorithms.
pub trait Compressor<B: ByteBufMut> {
    /// Target buffer type for compression.
    type BufMut: ByteBufMut;
    /// Compresses into provided [`ByteBufMut`], with records encoded by `F` into `R`.
    fn compress<R, F>(buf: &mut B, f: F) -> Result<R>
    where
        F: FnOnce(&mut Self::BufMut) -> Result<R>;
}

/// A trait for record decompression algorithms.
pub trait Decompressor<B: ByteBuf> {
    /// Target buffer type for decompression.
    type Buf: ByteBuf;
    /// Decompress records from `B` mapped using `F` into `R`.
    fn decompress<R, F>(buf: &mut B, f: F) -> Result<R>
    where
        F: FnOnce(&mut Self::Buf) -> Result<R>;
}
