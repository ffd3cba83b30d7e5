//! The outcome of a response for the request counters (`weir_requests_total`): its first
//! error code, top level first, then per topic, partition or resource; NONE when all are 0.

use kafka_protocol::messages::*;

pub trait Outcome {
    fn error_code(&self) -> i16;
}

/// The first non-zero code, else 0.
fn first(codes: impl IntoIterator<Item = i16>) -> i16 {
    codes.into_iter().find(|c| *c != 0).unwrap_or(0)
}

macro_rules! top_level {
    ($($t:ty),* $(,)?) => {
        $(impl Outcome for $t {
            fn error_code(&self) -> i16 {
                self.error_code
            }
        })*
    };
}

macro_rules! nested {
    ($($t:ty => |$r:ident| $e:expr),* $(,)?) => {
        $(impl Outcome for $t {
            fn error_code(&self) -> i16 {
                let $r = self;
                first($e)
            }
        })*
    };
}

top_level!(
    ApiVersionsResponse,
    DescribeClusterResponse,
    InitProducerIdResponse,
    JoinGroupResponse,
    SyncGroupResponse,
    HeartbeatResponse,
    ListGroupsResponse,
    AlterPartitionReassignmentsResponse,
    ListPartitionReassignmentsResponse,
    UnregisterBrokerResponse,
    AddOffsetsToTxnResponse,
    EndTxnResponse,
    ListTransactionsResponse,
    ConsumerGroupHeartbeatResponse,
);

nested!(
    ProduceResponse => |r| r.responses.iter().flat_map(|t| t.partition_responses.iter().map(|p| p.error_code)),
    FetchResponse => |r| std::iter::once(r.error_code).chain(r.responses.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code))),
    ListOffsetsResponse => |r| r.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
    MetadataResponse => |r| std::iter::once(r.error_code).chain(r.topics.iter().map(|t| t.error_code)),
    CreateTopicsResponse => |r| r.topics.iter().map(|t| t.error_code),
    DeleteTopicsResponse => |r| r.responses.iter().map(|t| t.error_code),
    CreatePartitionsResponse => |r| r.results.iter().map(|t| t.error_code),
    DescribeConfigsResponse => |r| r.results.iter().map(|t| t.error_code),
    AlterConfigsResponse => |r| r.responses.iter().map(|t| t.error_code),
    IncrementalAlterConfigsResponse => |r| r.responses.iter().map(|t| t.error_code),
    DescribeLogDirsResponse => |r| std::iter::once(r.error_code).chain(r.results.iter().map(|t| t.error_code)),
    FindCoordinatorResponse => |r| std::iter::once(r.error_code).chain(r.coordinators.iter().map(|c| c.error_code)),
    OffsetCommitResponse => |r| r.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
    OffsetFetchResponse => |r| std::iter::once(r.error_code)
        .chain(r.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code)))
        .chain(r.groups.iter().map(|g| g.error_code)),
    DescribeGroupsResponse => |r| r.groups.iter().map(|g| g.error_code),
    ConsumerGroupDescribeResponse => |r| r.groups.iter().map(|g| g.error_code),
    DeleteGroupsResponse => |r| r.results.iter().map(|g| g.error_code),
    DeleteRecordsResponse => |r| r.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
    ElectLeadersResponse => |r| std::iter::once(r.error_code)
        .chain(r.replica_election_results.iter().flat_map(|t| t.partition_result.iter().map(|p| p.error_code))),
    OffsetDeleteResponse => |r| std::iter::once(r.error_code).chain(r.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code))),
    LeaveGroupResponse => |r| std::iter::once(r.error_code).chain(r.members.iter().map(|m| m.error_code)),
    AddPartitionsToTxnResponse => |r| std::iter::once(r.error_code)
        .chain(r.results_by_topic_v3_and_below.iter().flat_map(|t| t.results_by_partition.iter().map(|p| p.partition_error_code))),
    TxnOffsetCommitResponse => |r| r.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
    WriteTxnMarkersResponse => |r| r.markers.iter().flat_map(|m| m.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code))),
    DescribeTransactionsResponse => |r| r.transaction_states.iter().map(|t| t.error_code),
    DescribeTopicPartitionsResponse => |r| r.topics.iter().map(|t| t.error_code),
    OffsetForLeaderEpochResponse => |r| r.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error_code)),
);
