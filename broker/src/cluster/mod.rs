//! The cluster: metadata image, shard table and the controller.

pub mod active;
pub mod agent;
pub mod controller;
pub mod decide;
pub mod metadata;
pub mod quorum;
pub mod rpc;
