//! Connections and cluster metadata.

pub mod conn;
pub mod metadata;
