//! Weir: a Kafka-compatible event-streaming broker, thread-per-core on io_uring.
//!
//! Layout (see ARCHITECTURE.md): `server` starts one shard per core; `net` reads frames;
//! `kafka` holds one handler per API; `shard` owns partitions, the cache and the flusher;
//! `storage` is the on-disk log; `cluster` is metadata and the controller; `protocol` is
//! framing and zero-copy response encoding; `metrics` is what the shards count and the
//! Prometheus endpoint.

pub mod cluster;
pub mod config;
pub mod group;
pub mod kafka;
pub mod metrics;
pub mod net;
pub mod peer;
pub mod protocol;
pub mod replication;
pub mod server;
pub mod shard;
pub mod storage;
pub mod txn;
