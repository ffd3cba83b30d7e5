//! Storage: record batches, segmented logs with sparse indexes, and the shard's batch cache.

pub mod arena;
pub mod batch;
pub mod cache;
pub mod compact;
pub mod epochs;
pub mod file;
pub mod index;
pub mod log;
pub mod producer_state;
pub mod reserve;
pub mod txn;
pub mod zero_ahead;
