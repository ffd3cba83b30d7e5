//! Broker -> active controller requests, carried as JSON in the controller listener's frames
//! (`quorum::network`, `Rpc::Controller`), beside the voters' Raft RPCs.
//!
//! | request | sent | answered (by the active controller) |
//! |---|---|---|
//! | `Register` | at start, and when a heartbeat answers `UnknownBroker` | `RegisterBroker` record committed (the broker starts fenced): `Registered { epoch }` |
//! | `Heartbeat` | every `broker.heartbeat.interval.ms` | `Beat`: fences, unfences (once the broker applied metadata up to its registration), or, with `want_shutdown`, fences it and moves its leaderships (controlled shutdown) |
//! | `Control` | a client's CreateTopics, DeleteTopics, CreatePartitions, AlterConfigs on any broker | the change decided against the committed image and committed: `Control { answers, version }` |
//! | `ProducerIds` | when a broker's block of producer ids is used up | a `ProducerIdBlock` record committed: `ProducerIds { start, end }` |
//! | `GetImage` | by brokers that are not voters, when a heartbeat shows a newer version | `Image` |
//!
//! Any request reaching a voter that is not the active controller is answered
//! `NotController { leader }`, and the broker asks that one.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::metadata::TopicError;
use super::quorum::{BrokerId, ClusterImage};
use crate::shard::ControlOp;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    Register {
        node_id: BrokerId,
        host: String,
        port: u16,
        rack: Option<String>,
        incarnation: Uuid,
    },
    Heartbeat {
        node_id: BrokerId,
        epoch: u64,
        /// The metadata version this broker has applied.
        applied_version: u64,
        want_shutdown: bool,
    },
    Control(ControlOp),
    ProducerIds {
        node_id: BrokerId,
    },
    GetImage,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    NotController {
        leader: Option<u64>,
    },
    Registered {
        epoch: u64,
    },
    /// The heartbeat's registration is unknown or superseded: register again.
    UnknownBroker,
    Beat {
        fenced: bool,
        /// The committed metadata version.
        version: u64,
        controller: u64,
        /// With `want_shutdown`: the broker is fenced and leads nothing; it may stop.
        shutdown_ready: bool,
    },
    Control {
        answers: Vec<Result<(i32, i16), TopicError>>,
        /// The version the change committed at (a broker answers its client once it applied it).
        version: u64,
    },
    ProducerIds {
        start: i64,
        end: i64,
    },
    Image(ClusterImage),
    /// The request could not be served now (no quorum, a failed write): try again.
    Unavailable(String),
}
