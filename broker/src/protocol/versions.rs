//! The APIs and versions Weir advertises in ApiVersions. Every version listed is implemented in
//! full by its handler in `kafka/`.
//!
//! Versions that only let the broker answer TRANSACTION_ABORTABLE (KIP-890: Produce 11,
//! FindCoordinator 5, InitProducerId 5, AddOffsetsToTxn 4, EndTxn 4, TxnOffsetCommit 4) are the
//! same on the wire as the version before. Kafka 3.9 gives that error only when its
//! broker-side transaction verification fails, which Weir does not do, so Weir answers them
//! exactly as the older versions.

use kafka_protocol::messages::ApiKey;

/// (API, min version, max version).
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 11),
    (ApiKey::Fetch, 4, 17),
    (ApiKey::ListOffsets, 1, 9),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::Metadata, 1, 12),
    (ApiKey::DescribeTopicPartitions, 0, 0),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DescribeCluster, 0, 1),
    (ApiKey::ElectLeaders, 0, 2),
    (ApiKey::DescribeLogDirs, 1, 4),
    (ApiKey::AlterPartitionReassignments, 0, 1),
    (ApiKey::ListPartitionReassignments, 0, 0),
    (ApiKey::UnregisterBroker, 0, 0),
    (ApiKey::InitProducerId, 0, 5),
    (ApiKey::FindCoordinator, 0, 5),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetFetch, 1, 9),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::AddPartitionsToTxn, 0, 3),
    (ApiKey::AddOffsetsToTxn, 0, 4),
    (ApiKey::EndTxn, 0, 4),
    (ApiKey::WriteTxnMarkers, 1, 1),
    (ApiKey::TxnOffsetCommit, 0, 4),
    (ApiKey::DescribeTransactions, 0, 0),
    (ApiKey::ListTransactions, 0, 1),
    (ApiKey::ConsumerGroupHeartbeat, 0, 0),
    (ApiKey::ConsumerGroupDescribe, 0, 0),
];

pub fn supported(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|&(_, lo, hi)| (lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README's Supported APIs table names exactly what is advertised: rows like
    /// `| A / B | 0-2 / 1 (notes) |`.
    #[test]
    fn the_readme_table_matches() {
        let readme = include_str!("../../../README.md");
        let table = readme
            .split("## Supported APIs")
            .nth(1)
            .and_then(|t| t.split("\n## ").next())
            .expect("README has the table");
        let mut listed = Vec::new();
        for row in table.lines().filter(|l| l.starts_with("| ")).skip(1) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let names = cells[0].trim_start_matches("| ").split(" / ");
            let ranges = cells[1]
                .split(" (")
                .next()
                .unwrap()
                .trim_end_matches(" |")
                .split(" / ");
            let ranges: Vec<&str> = ranges.collect();
            let names: Vec<&str> = names.collect();
            // "0-3 each": one range for every name.
            let each =
                cells[1].starts_with(&format!("{} each", ranges[0].trim_end_matches(" each")));
            for (i, name) in names.iter().enumerate() {
                let r = if each {
                    ranges[0].trim_end_matches(" each")
                } else {
                    ranges[i]
                };
                let (lo, hi) = match r.split_once('-') {
                    Some((lo, hi)) => (lo.parse::<i16>().unwrap(), hi.parse::<i16>().unwrap()),
                    None => (r.parse().unwrap(), r.parse().unwrap()),
                };
                listed.push((name.to_string(), lo, hi));
            }
        }
        let mut advertised: Vec<(String, i16, i16)> = SUPPORTED
            .iter()
            .map(|&(k, lo, hi)| (format!("{k:?}"), lo, hi))
            .collect();
        listed.sort();
        advertised.sort();
        assert_eq!(listed, advertised);
    }

    #[test]
    fn advertised_versions_are_within_what_the_codec_knows() {
        for &(k, lo, hi) in SUPPORTED {
            let codec = k.valid_versions();
            assert!(
                codec.min <= lo && hi <= codec.max,
                "{k:?} {lo}-{hi} outside {codec:?}"
            );
        }
    }
}
