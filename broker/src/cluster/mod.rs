//! The cluster: metadata image, shard table and the controller.

pub mod controller;
pub mod metadata;
pub mod quorum;
