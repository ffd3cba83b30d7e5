//! What a Kafka 3.9 broker advertises, against real broker processes (issue #15, item 8):
//! Fetch v13-17 by topic id (KIP-516) with and without sessions, Produce v10-11 and Fetch v16
//! leader discovery from a broker that does not lead (KIP-951), ListOffsets v8-9,
//! DescribeTopicPartitions paging (KIP-966), and kafka-python 3.0.12 inferring a 3.9 broker
//! from ApiVersions and round-tripping records. (The Java client 3.9.1, which now fetches by
//! topic id and describes topics through DescribeTopicPartitions, is in java_client.rs.)

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::describe_topic_partitions_request::{Cursor, TopicRequest};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ForgottenTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::offset_for_leader_epoch_request::{
    OffsetForLeaderPartition, OffsetForLeaderTopic,
};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, CreatePartitionsRequest,
    CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest,
    DeleteTopicsResponse, DescribeClusterRequest, DescribeClusterResponse,
    DescribeTopicPartitionsRequest, DescribeTopicPartitionsResponse, FetchRequest, FetchResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse,
    OffsetForLeaderEpochRequest, OffsetForLeaderEpochResponse, ProduceRequest, ProduceResponse,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{Compression, RecordBatchDecoder};
use weir_tests::raw::{self, Conn};
use weir_tests::{admin, eventually, Broker, Cluster};

const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const NOT_LEADER_OR_FOLLOWER: i16 = 6;
const UNSUPPORTED_VERSION: i16 = 35;
const INVALID_REQUEST: i16 = 42;
const UNKNOWN_TOPIC_ID: i16 = 100;
const FETCH_SESSION_TOPIC_ID_ERROR: i16 = 106;

fn name(t: &str) -> TopicName {
    TopicName(StrBytes::from_string(t.to_string()))
}

/// Metadata v12 of `topics` (never creating them).
fn metadata(c: &mut Conn, topics: &[&str]) -> MetadataResponse {
    let req = MetadataRequest::default()
        .with_allow_auto_topic_creation(false)
        .with_topics(Some(
            topics
                .iter()
                .map(|t| MetadataRequestTopic::default().with_name(Some(name(t))))
                .collect(),
        ));
    c.call(ApiKey::Metadata, 12, &req)
}

fn topic_id(c: &mut Conn, topic: &str) -> uuid::Uuid {
    let r = metadata(c, &[topic]);
    assert_eq!(r.topics[0].error_code, 0);
    let id = r.topics[0].topic_id;
    assert!(!id.is_nil(), "Metadata v12 gives the topic id");
    id
}

/// A fetch by topic id at `version`: `topics` are (topic id, [(partition, offset)]).
fn fetch(
    c: &mut Conn,
    version: i16,
    session: (i32, i32),
    topics: &[(uuid::Uuid, &[(i32, i64)])],
    forget: &[(uuid::Uuid, &[i32])],
    max_wait_ms: i32,
) -> FetchResponse {
    let mut req = FetchRequest::default()
        .with_replica_id((-1).into())
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_session_id(session.0)
        .with_session_epoch(session.1)
        .with_topics(
            topics
                .iter()
                .map(|(id, parts)| {
                    FetchTopic::default().with_topic_id(*id).with_partitions(
                        parts
                            .iter()
                            .map(|&(p, o)| {
                                FetchPartition::default()
                                    .with_partition(p)
                                    .with_fetch_offset(o)
                                    .with_partition_max_bytes(1 << 20)
                                    // v17: a follower's directory id; a consumer's is ignored.
                                    .with_replica_directory_id(uuid::Uuid::from_u128(7))
                            })
                            .collect(),
                    )
                })
                .collect(),
        )
        .with_forgotten_topics_data(
            forget
                .iter()
                .map(|(id, parts)| {
                    ForgottenTopic::default()
                        .with_topic_id(*id)
                        .with_partitions(parts.to_vec())
                })
                .collect(),
        );
    req.replica_state.replica_id = (-1).into();
    c.call(ApiKey::Fetch, version, &req)
}

/// (topic id, partition, error, high watermark, records) of every partition in a response.
fn parts(r: &FetchResponse) -> Vec<(uuid::Uuid, i32, i16, i64, usize)> {
    r.responses
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| {
                let mut records = p.records.clone().unwrap_or_default();
                let mut n = 0;
                while !records.is_empty() {
                    n += RecordBatchDecoder::decode(&mut records)
                        .unwrap()
                        .records
                        .len();
                }
                (
                    t.topic_id,
                    p.partition_index,
                    p.error_code,
                    p.high_watermark,
                    n,
                )
            })
        })
        .collect()
}

/// Fetch v13, v15, v16 and v17 name topics by id: the records of a known id, UNKNOWN_TOPIC_ID
/// for an unknown one. Ids are stable across a restart (persisted with the metadata image).
#[test]
fn fetch_by_topic_id() {
    let mut b = Broker::start(2);
    admin::create(&b, "ids", 2, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    assert_eq!(c.produce("ids", 0, -1, -1, -1, 5).0, 0);
    assert_eq!(c.produce("ids", 1, -1, -1, -1, 3).0, 0);
    let id = topic_id(&mut c, "ids");
    let unknown = uuid::Uuid::from_u128(0x5eed);

    for v in [13, 15, 16, 17] {
        let r = fetch(
            &mut c,
            v,
            (0, -1),
            &[(id, &[(0, 0), (1, 0)]), (unknown, &[(0, 0)])],
            &[],
            0,
        );
        assert_eq!((r.error_code, r.session_id), (0, 0));
        assert_eq!(
            parts(&r),
            vec![
                (id, 0, 0, 5, 5),
                (id, 1, 0, 3, 3),
                (unknown, 0, UNKNOWN_TOPIC_ID, -1, 0),
            ],
            "v{v}"
        );
        assert!(r.node_endpoints.is_empty());
    }

    assert!(b.stop(), "clean stop");
    b.restart();
    let mut c = Conn::new(&b.bootstrap());
    assert_eq!(topic_id(&mut c, "ids"), id, "the id survives a restart");
    let r = fetch(&mut c, 17, (0, -1), &[(id, &[(0, 0)])], &[], 0);
    assert_eq!(parts(&r), vec![(id, 0, 0, 5, 5)]);
}

/// An incremental fetch session by topic id (v13+): partitions keyed by id, forgotten by id,
/// an unknown id kept (and answered UNKNOWN_TOPIC_ID) until forgotten, and a request of the
/// other kind (v12, by name) refused with FETCH_SESSION_TOPIC_ID_ERROR.
#[test]
fn fetch_sessions_by_topic_id() {
    let b = Broker::start(2);
    admin::create(&b, "sid", 2, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    let mut p = Conn::new(&b.bootstrap());
    assert_eq!(p.produce("sid", 0, -1, -1, -1, 4).0, 0);
    let id = topic_id(&mut c, "sid");
    let unknown = uuid::Uuid::from_u128(0x5eed);

    // Open: a full response with a session id.
    let r = fetch(&mut c, 17, (0, 0), &[(id, &[(0, 0), (1, 0)])], &[], 0);
    let sid = r.session_id;
    assert_ne!(sid, 0, "a session was opened");
    assert_eq!(parts(&r), vec![(id, 0, 0, 4, 4), (id, 1, 0, 0, 0)]);

    // Incremental, positions moved, nothing new: no partitions.
    let r = fetch(&mut c, 17, (sid, 1), &[(id, &[(0, 4)])], &[], 100);
    assert_eq!((r.error_code, r.session_id), (0, sid));
    assert_eq!(parts(&r), vec![]);

    // News on partition 1 only: an empty incremental request gets just that, by id.
    assert_eq!(p.produce("sid", 1, -1, -1, -1, 2).0, 0);
    let r = fetch(&mut c, 16, (sid, 2), &[], &[], 1000);
    assert_eq!(parts(&r), vec![(id, 1, 0, 2, 2)]);

    // Forget partition 0 by id, move partition 1 on, add an unknown id: it is answered
    // UNKNOWN_TOPIC_ID.
    let r = fetch(
        &mut c,
        17,
        (sid, 3),
        &[(id, &[(1, 2)]), (unknown, &[(0, 0)])],
        &[(id, &[0])],
        0,
    );
    assert_eq!(r.error_code, 0);
    assert_eq!(parts(&r), vec![(unknown, 0, UNKNOWN_TOPIC_ID, -1, 0)]);
    assert_eq!(p.produce("sid", 0, -1, -1, -1, 1).0, 0);
    let r = fetch(&mut c, 17, (sid, 4), &[], &[(unknown, &[0])], 100);
    assert_eq!(parts(&r), vec![], "partition 0 was forgotten");

    // A request by name in a session by id: refused, the session stays.
    let by_name = FetchRequest::default()
        .with_replica_id((-1).into())
        .with_max_bytes(1 << 20)
        .with_session_id(sid)
        .with_session_epoch(5)
        .with_topics(vec![FetchTopic::default()
            .with_topic(name("sid"))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(0)
                .with_partition_max_bytes(1 << 20)])]);
    let r: FetchResponse = c.call(ApiKey::Fetch, 12, &by_name);
    assert_eq!(r.error_code, FETCH_SESSION_TOPIC_ID_ERROR);
    let r = fetch(&mut c, 17, (sid, 5), &[(id, &[(0, 4)])], &[], 0);
    assert_eq!(r.error_code, 0);
    assert_eq!(parts(&r), vec![(id, 0, 0, 5, 1)]);
}

/// Produces `n` records to partition 0 of `topic` at a leader learned from another broker's
/// metadata. That broker can know the leader before the leader itself has applied its
/// election; until then the leader answers NOT_LEADER_OR_FOLLOWER (6) and appends nothing, and
/// a client retries. Returns the first other answer.
fn produce_to_new_leader(conn: &mut Conn, topic: &str, n: usize) -> i16 {
    let mut code = NOT_LEADER_OR_FOLLOWER;
    let answered = eventually(Duration::from_secs(30), || {
        code = conn.produce(topic, 0, -1, -1, -1, n).0;
        code != NOT_LEADER_OR_FOLLOWER
    });
    assert!(answered, "the leader of {topic} never took the produce");
    code
}

/// OffsetForLeaderEpoch (the check consumers make after a leader change) on a 3-broker
/// cluster: records written under one leader, the leader stopped, more records under the next
/// one. The new leader answers the old epoch with the offset where the new one began, the new
/// epoch with its log end, and refuses a stale current epoch, a non-leader and a missing
/// partition as Kafka.
#[test]
fn offset_for_leader_epoch_across_a_leader_change() {
    let mut c = Cluster::start(3, &[]);
    admin::create(c.node(0), "ofle", 1, 3, &[]).unwrap();
    let leader_of = |c: &Cluster, from: usize| -> Option<(i32, i32, Vec<i32>)> {
        let mut conn = Conn::new(&c.node(from).bootstrap());
        let m = metadata(&mut conn, &["ofle"]);
        let p = m.topics[0].partitions.first()?;
        (m.topics[0].error_code == 0 && p.leader_id.0 >= 0 && p.isr_nodes.len() == 3).then(|| {
            (
                p.leader_id.0,
                p.leader_epoch,
                p.isr_nodes.iter().map(|b| b.0).collect(),
            )
        })
    };
    let mut first = None;
    assert!(eventually(Duration::from_secs(30), || {
        first = leader_of(&c, 0);
        first.is_some()
    }));
    let (old_leader, old_epoch, _) = first.unwrap();
    let mut conn = Conn::new(&c.node(old_leader as usize).bootstrap());
    assert_eq!(produce_to_new_leader(&mut conn, "ofle", 3), 0);

    assert!(c.stop(old_leader as usize), "controlled stop");
    let other = (0..3).find(|&i| i as i32 != old_leader).unwrap();
    let mut next = None;
    assert!(eventually(Duration::from_secs(30), || {
        let mut conn = Conn::new(&c.node(other).bootstrap());
        let m = metadata(&mut conn, &["ofle"]);
        let p = &m.topics[0].partitions[0];
        next = (p.leader_id.0 >= 0 && p.leader_id.0 != old_leader)
            .then_some((p.leader_id.0, p.leader_epoch));
        next.is_some()
    }));
    let (leader, epoch) = next.unwrap();
    assert!(epoch > old_epoch);
    let mut conn = Conn::new(&c.node(leader as usize).bootstrap());
    let ask = |conn: &mut Conn, version: i16, current: i32, asked: i32, partition: i32| {
        let req = OffsetForLeaderEpochRequest::default()
            .with_replica_id((-1).into())
            .with_topics(vec![OffsetForLeaderTopic::default()
                .with_topic(name("ofle"))
                .with_partitions(vec![OffsetForLeaderPartition::default()
                    .with_partition(partition)
                    .with_current_leader_epoch(current)
                    .with_leader_epoch(asked)])]);
        let r: OffsetForLeaderEpochResponse =
            conn.call(ApiKey::OffsetForLeaderEpoch, version, &req);
        let p = &r.topics[0].partitions[0];
        (p.error_code, p.leader_epoch, p.end_offset)
    };
    // Nothing written in the new epoch yet: it ends at the log end, where the old one ended.
    assert_eq!(ask(&mut conn, 4, epoch, epoch, 0), (0, epoch, 3));
    assert_eq!(ask(&mut conn, 3, epoch, old_epoch, 0), (0, old_epoch, 3));
    assert!(eventually(Duration::from_secs(30), || conn
        .produce("ofle", 0, -1, -1, -1, 2)
        .0
        == 0));
    assert_eq!(ask(&mut conn, 4, epoch, epoch, 0), (0, epoch, 5));
    assert_eq!(ask(&mut conn, 2, -1, old_epoch, 0), (0, old_epoch, 3));
    assert_eq!(ask(&mut conn, 4, epoch, -1, 0), (0, -1, -1));
    assert_eq!(
        ask(&mut conn, 4, epoch - 1, epoch, 0).0,
        74,
        "FENCED_LEADER_EPOCH"
    );
    assert_eq!(
        ask(&mut conn, 4, epoch + 1, epoch, 0).0,
        75,
        "UNKNOWN_LEADER_EPOCH"
    );
    assert_eq!(
        ask(&mut conn, 4, -1, epoch, 7).0,
        UNKNOWN_TOPIC_OR_PARTITION
    );
    let follower = (0..3)
        .find(|&i| i as i32 != leader && i as i32 != old_leader)
        .unwrap();
    let mut fc = Conn::new(&c.node(follower).bootstrap());
    assert_eq!(ask(&mut fc, 4, -1, epoch, 0).0, NOT_LEADER_OR_FOLLOWER);
}

/// A topic deleted and created again under the same name has a new id: a session that holds
/// the old id answers it UNKNOWN_TOPIC_ID (never the new topic's records), and the new id
/// fetches the new topic in the same session.
#[test]
fn a_recreated_topic_is_a_new_id_in_a_session() {
    let b = Broker::start(1);
    admin::create(&b, "again", 1, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    assert_eq!(c.produce("again", 0, -1, -1, -1, 3).0, 0);
    let old = topic_id(&mut c, "again");
    let r = fetch(&mut c, 17, (0, 0), &[(old, &[(0, 3)])], &[], 0);
    let sid = r.session_id;
    assert_ne!(sid, 0);
    assert_eq!(parts(&r), vec![(old, 0, 0, 3, 0)]);

    admin::delete(&b, "again").unwrap();
    admin::create(&b, "again", 1, 1, &[]).unwrap();
    assert_eq!(c.produce("again", 0, -1, -1, -1, 5).0, 0);
    let new = topic_id(&mut c, "again");
    assert_ne!(new, old);
    let r = fetch(&mut c, 17, (sid, 1), &[(new, &[(0, 0)])], &[], 0);
    assert_eq!(r.error_code, 0);
    assert_eq!(
        parts(&r),
        vec![(old, 0, UNKNOWN_TOPIC_ID, -1, 0), (new, 0, 0, 5, 5)]
    );
}

/// ListOffsets v8 EARLIEST_LOCAL (-4) is the log start (no tiered storage); v9 LATEST_TIERED
/// (-5) is offset -1 with leader epoch -1, as Kafka without tiering; each needs its version.
#[test]
fn list_offsets_v9() {
    let b = Broker::start(1);
    admin::create(&b, "lo", 1, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    assert_eq!(c.produce("lo", 0, -1, -1, -1, 5).0, 0);
    let list = |c: &mut Conn, version: i16, ts: i64| {
        let req = ListOffsetsRequest::default()
            .with_replica_id((-1).into())
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(name("lo"))
                .with_partitions(vec![ListOffsetsPartition::default()
                    .with_partition_index(0)
                    .with_timestamp(ts)])]);
        let r: ListOffsetsResponse = c.call(ApiKey::ListOffsets, version, &req);
        let p = &r.topics[0].partitions[0];
        (p.error_code, p.offset, p.leader_epoch)
    };
    let earliest = list(&mut c, 9, -2);
    assert_eq!(earliest.0, 0);
    assert_eq!(list(&mut c, 8, -4), earliest);
    assert_eq!(list(&mut c, 9, -5), (0, -1, -1));
    assert_eq!(list(&mut c, 9, -1).1, 5);
    assert_eq!(list(&mut c, 7, -4).0, UNSUPPORTED_VERSION);
    assert_eq!(list(&mut c, 8, -5).0, UNSUPPORTED_VERSION);
    assert_eq!(list(&mut c, 9, -6).0, UNSUPPORTED_VERSION);
}

fn describe(
    c: &mut Conn,
    topics: &[&str],
    limit: i32,
    cursor: Option<(&str, i32)>,
) -> DescribeTopicPartitionsResponse {
    let req = DescribeTopicPartitionsRequest::default()
        .with_topics(
            topics
                .iter()
                .map(|t| TopicRequest::default().with_name(name(t)))
                .collect(),
        )
        .with_response_partition_limit(limit)
        .with_cursor(cursor.map(|(t, p)| {
            Cursor::default()
                .with_topic_name(name(t))
                .with_partition_index(p)
        }));
    c.call(ApiKey::DescribeTopicPartitions, 0, &req)
}

/// (topic, error, [partition indexes]) per topic, and the next cursor.
type Page = (Vec<(String, i16, Vec<i32>)>, Option<(String, i32)>);

fn page(r: &DescribeTopicPartitionsResponse) -> Page {
    (
        r.topics
            .iter()
            .map(|t| {
                (
                    t.name.as_ref().unwrap().0.to_string(),
                    t.error_code,
                    t.partitions.iter().map(|p| p.partition_index).collect(),
                )
            })
            .collect(),
        r.next_cursor
            .as_ref()
            .map(|c| (c.topic_name.0.to_string(), c.partition_index)),
    )
}

/// DescribeTopicPartitions pages over two topics with a limit of 2 partitions per response,
/// following the cursor; partitions carry what Metadata says; a missing topic and a bad
/// cursor get Kafka's errors.
#[test]
fn describe_topic_partitions_pages() {
    let b = Broker::start(1);
    admin::create(&b, "dtp-a", 3, 1, &[]).unwrap();
    admin::create(&b, "dtp-b", 2, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    let topics = ["dtp-b", "missing", "dtp-a"];
    let s = |x: &str| x.to_string();

    let r = describe(&mut c, &topics, 2, None);
    assert_eq!(
        page(&r),
        (vec![(s("dtp-a"), 0, vec![0, 1])], Some((s("dtp-a"), 2)))
    );
    let m = metadata(&mut c, &["dtp-a"]);
    let (t, mt) = (&r.topics[0], &m.topics[0]);
    assert_eq!(t.topic_id, mt.topic_id);
    for (p, mp) in t.partitions.iter().zip(&mt.partitions) {
        assert_eq!(
            (p.leader_id, p.leader_epoch, &p.replica_nodes, &p.isr_nodes),
            (
                mp.leader_id,
                mp.leader_epoch,
                &mp.replica_nodes,
                &mp.isr_nodes
            )
        );
        assert_eq!(p.eligible_leader_replicas, Some(vec![]));
        assert!(p.offline_replicas.is_empty());
    }

    let r = describe(&mut c, &topics, 2, Some(("dtp-a", 2)));
    assert_eq!(
        page(&r),
        (
            vec![(s("dtp-a"), 0, vec![2]), (s("dtp-b"), 0, vec![0])],
            Some((s("dtp-b"), 1))
        )
    );
    let r = describe(&mut c, &topics, 2, Some(("dtp-b", 1)));
    assert_eq!(
        page(&r),
        (
            vec![
                (s("dtp-b"), 0, vec![1]),
                (s("missing"), UNKNOWN_TOPIC_OR_PARTITION, vec![])
            ],
            None
        )
    );

    // All topics (an empty list) in one page; a cursor outside the named topics is invalid.
    let r = describe(&mut c, &[], 2000, None);
    let (got, cursor) = page(&r);
    assert!(cursor.is_none());
    assert!(
        got.contains(&(s("dtp-a"), 0, vec![0, 1, 2])) && got.contains(&(s("dtp-b"), 0, vec![0, 1]))
    );
    let r = describe(&mut c, &["dtp-a"], 2, Some(("dtp-b", 0)));
    assert_eq!(
        page(&r),
        (vec![(s("dtp-a"), INVALID_REQUEST, vec![])], None)
    );
}

/// Produce v11 and Fetch v16 sent to a broker that does not lead the partition: the answer
/// names the current leader and its epoch, and node_endpoints gives its address (KIP-951).
/// Older versions (Produce v9, Fetch v12) carry no endpoints.
#[test]
fn leader_discovery_from_a_broker_that_does_not_lead() {
    let c = Cluster::start(3, &[]);
    admin::create(c.node(0), "kip951", 1, 1, &[]).unwrap();
    // Every broker's image has the topic and its leader.
    let mut leader = -1;
    let mut epoch = -1;
    let mut id = uuid::Uuid::nil();
    assert!(eventually(Duration::from_secs(30), || {
        (0..3).all(|i| {
            let mut conn = Conn::new(&c.node(i).bootstrap());
            let m = metadata(&mut conn, &["kip951"]);
            let t = &m.topics[0];
            if t.error_code != 0 || t.partitions.is_empty() || t.partitions[0].leader_id.0 < 0 {
                return false;
            }
            (leader, epoch, id) = (
                t.partitions[0].leader_id.0,
                t.partitions[0].leader_epoch,
                t.topic_id,
            );
            true
        })
    }));
    let other = (0..3).find(|&i| i as i32 != leader).unwrap();
    let leader_port = c
        .node(leader as usize)
        .bootstrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<i32>()
        .unwrap();
    let mut conn = Conn::new(&c.node(other).bootstrap());

    let batch = raw::batch(
        [(
            Some(Bytes::from_static(b"k")),
            Some(Bytes::from_static(b"v")),
            1_000,
        )],
        -1,
        -1,
        -1,
        Compression::None,
    );
    let produce = ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![TopicProduceData::default()
            .with_name(name("kip951"))
            .with_partition_data(vec![PartitionProduceData::default()
                .with_index(0)
                .with_records(Some(batch))])]);
    let r: ProduceResponse = conn.call(ApiKey::Produce, 11, &produce);
    let p = &r.responses[0].partition_responses[0];
    assert_eq!(p.error_code, NOT_LEADER_OR_FOLLOWER);
    assert_eq!(
        (p.current_leader.leader_id.0, p.current_leader.leader_epoch),
        (leader, epoch)
    );
    assert_eq!(r.node_endpoints.len(), 1);
    let e = &r.node_endpoints[0];
    assert_eq!(
        (e.node_id.0, e.host.as_str(), e.port),
        (leader, "127.0.0.1", leader_port)
    );
    let r: ProduceResponse = conn.call(ApiKey::Produce, 9, &produce);
    assert_eq!(
        r.responses[0].partition_responses[0].error_code,
        NOT_LEADER_OR_FOLLOWER
    );
    assert!(r.node_endpoints.is_empty());

    let r = fetch(&mut conn, 16, (0, -1), &[(id, &[(0, 0)])], &[], 0);
    let p = &r.responses[0].partitions[0];
    assert_eq!(p.error_code, NOT_LEADER_OR_FOLLOWER);
    assert_eq!(
        (p.current_leader.leader_id.0, p.current_leader.leader_epoch),
        (leader, epoch)
    );
    assert_eq!(r.node_endpoints.len(), 1);
    let e = &r.node_endpoints[0];
    assert_eq!((e.node_id.0, e.port), (leader, leader_port));
    let r = fetch(&mut conn, 13, (0, -1), &[(id, &[(0, 0)])], &[], 0);
    assert_eq!(
        r.responses[0].partitions[0].error_code,
        NOT_LEADER_OR_FOLLOWER
    );
    assert!(r.node_endpoints.is_empty());

    // The leader itself serves the record by id.
    let mut lc = Conn::new(&c.node(leader as usize).bootstrap());
    assert_eq!(produce_to_new_leader(&mut lc, "kip951", 3), 0);
    let r = fetch(&mut lc, 17, (0, -1), &[(id, &[(0, 0)])], &[], 0);
    assert_eq!(parts(&r), vec![(id, 0, 0, 3, 3)]);
}

/// The smaller version bumps of Kafka 3.9: DescribeCluster v1 (KIP-919 endpoint types: a
/// broker answers for brokers, MISMATCHED_ENDPOINT_TYPE for controllers,
/// UNSUPPORTED_ENDPOINT_TYPE otherwise) and CreatePartitions v3 (v2 plus a quota error Weir
/// never gives).
#[test]
fn describe_cluster_v1_and_create_partitions_v3() {
    let b = Broker::start(1);
    let mut c = Conn::new(&b.bootstrap());
    let describe = |c: &mut Conn, endpoint_type: i8| -> DescribeClusterResponse {
        c.call(
            ApiKey::DescribeCluster,
            1,
            &DescribeClusterRequest::default()
                .with_endpoint_type(endpoint_type)
                .with_include_cluster_authorized_operations(true),
        )
    };
    let r = describe(&mut c, 1);
    assert_eq!((r.error_code, r.endpoint_type, r.brokers.len()), (0, 1, 1));
    assert_ne!(r.cluster_authorized_operations, i32::MIN, "asked for");
    assert_eq!(describe(&mut c, 2).error_code, 114);
    assert_eq!(describe(&mut c, 7).error_code, 115);

    admin::create(&b, "grow", 1, 1, &[]).unwrap();
    let req = CreatePartitionsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(vec![CreatePartitionsTopic::default()
            .with_name(name("grow"))
            .with_count(3)]);
    let r: CreatePartitionsResponse = c.call(ApiKey::CreatePartitions, 3, &req);
    assert_eq!(r.results[0].error_code, 0);
    assert!(eventually(Duration::from_secs(10), || metadata(
        &mut c,
        &["grow"]
    )
    .topics[0]
        .partitions
        .len()
        == 3));
}

/// CreateTopics v7 returns the new topic's id (the one Metadata gives); DeleteTopics v6 deletes
/// by topic id or by name (answering with both), and refuses as Kafka: an unknown id
/// (UNKNOWN_TOPIC_ID), a name and an id together, an id given twice (INVALID_REQUEST).
#[test]
fn create_topics_v7_and_delete_topics_v6_by_id() {
    let b = Broker::start(1);
    let mut c = Conn::new(&b.bootstrap());
    let create = CreateTopicsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(
            ["byid", "byname"]
                .iter()
                .map(|t| {
                    CreatableTopic::default()
                        .with_name(name(t))
                        .with_num_partitions(2)
                        .with_replication_factor(1)
                })
                .collect(),
        );
    let r: CreateTopicsResponse = c.call(ApiKey::CreateTopics, 7, &create);
    assert!(r.topics.iter().all(|t| t.error_code == 0), "{r:?}");
    let id = r.topics[0].topic_id;
    assert!(!id.is_nil());
    assert_eq!(topic_id(&mut c, "byid"), id);
    let other = topic_id(&mut c, "byname");
    assert_eq!(r.topics[1].topic_id, other);

    let state = |n: Option<&str>, id: uuid::Uuid| {
        DeleteTopicState::default()
            .with_name(n.map(name))
            .with_topic_id(id)
    };
    let unknown = uuid::Uuid::from_u128(0x5eed);
    let req = DeleteTopicsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(vec![
            state(None, unknown),
            state(Some("byid"), id),
            state(None, unknown),
        ]);
    let r: DeleteTopicsResponse = c.call(ApiKey::DeleteTopics, 6, &req);
    let got: Vec<_> = r
        .responses
        .iter()
        .map(|t| (t.topic_id, t.error_code))
        .collect();
    assert_eq!(
        got,
        vec![
            (unknown, INVALID_REQUEST),
            (id, INVALID_REQUEST),
            (unknown, INVALID_REQUEST)
        ],
        "a duplicate id, a name with an id"
    );
    let req = DeleteTopicsRequest::default()
        .with_timeout_ms(30_000)
        .with_topics(vec![
            state(None, unknown),
            state(None, id),
            state(Some("byname"), uuid::Uuid::nil()),
        ]);
    let r: DeleteTopicsResponse = c.call(ApiKey::DeleteTopics, 6, &req);
    let got: Vec<_> = r
        .responses
        .iter()
        .map(|t| {
            (
                t.name.as_ref().map(|n| n.0.to_string()),
                t.topic_id,
                t.error_code,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (None, unknown, UNKNOWN_TOPIC_ID),
            (Some("byid".into()), id, 0),
            (Some("byname".into()), other, 0),
        ]
    );
    assert!(r.responses[0].error_message.is_some());
    assert!(eventually(Duration::from_secs(10), || {
        metadata(&mut c, &["byid", "byname"])
            .topics
            .iter()
            .all(|t| t.error_code == UNKNOWN_TOPIC_OR_PARTITION)
    }));
}

const PY_39: &str = r#"
import sys
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
bootstrap = sys.argv[1]
admin = KafkaAdminClient(bootstrap_servers=bootstrap)
print("ADMIN", admin._manager.broker_version, flush=True)
admin.create_topics([NewTopic("py39", 3, 1), NewTopic("py39b", 2, 1)])
cursor = None
pages = []
while True:
    page = admin.describe_topic_partitions(["py39", "py39b"], response_partition_limit=2, cursor=cursor)
    pages.append([(t["name"], [p["partition_index"] for p in t["partitions"]]) for t in page["topics"]])
    cursor = page["next_cursor"]
    if cursor is None:
        break
print("PAGES", pages, flush=True)
p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
print("PRODUCER", p.config["api_version"], flush=True)
for i in range(30):
    p.send("py39", key=b"k%d" % i, value=b"v%d" % i, partition=i % 3)
p.flush()
p.close()
c = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=20000)
print("CONSUMER", c.config["api_version"], flush=True)
c.assign([TopicPartition("py39", i) for i in range(3)])
got = set()
for m in c:
    got.add(m.value)
    if len(got) == 30:
        break
c.close()
print("GOT", len(got), flush=True)
"#;

/// kafka-python 3.0.12 with api_version unset infers the broker's version from ApiVersions:
/// Weir now reads as Kafka 3.9 (Fetch 17 is its test) to its admin client, producer and
/// consumer, which then create topics, page through DescribeTopicPartitions and round-trip 30
/// records.
#[test]
fn kafka_python_sees_kafka_3_9() {
    let b = Broker::start(2);
    let mut c = Conn::new(&b.bootstrap());
    let v: ApiVersionsResponse = c.call(ApiKey::ApiVersions, 4, &ApiVersionsRequest::default());
    assert_eq!(v.error_code, 0);
    let max = |k: ApiKey| {
        v.api_keys
            .iter()
            .find(|a| a.api_key == k as i16)
            .map(|a| a.max_version)
    };
    assert_eq!(max(ApiKey::Fetch), Some(17));
    assert_eq!(max(ApiKey::Produce), Some(11));
    assert_eq!(max(ApiKey::ListOffsets), Some(9));
    assert_eq!(max(ApiKey::Metadata), Some(12));
    assert_eq!(max(ApiKey::DescribeTopicPartitions), Some(0));
    assert_eq!(max(ApiKey::ApiVersions), Some(4));

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("kafka39.py");
    std::fs::write(&script, PY_39).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(b.bootstrap())
        .env("PYTHONPATH", weir_tests::python::kafka_python())
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fail = || {
        format!(
            "kafka-python ({}):\n{stdout}\n{}\nbroker log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            b.log()
        )
    };
    assert!(out.status.success(), "{}", fail());
    for who in ["ADMIN", "PRODUCER", "CONSUMER"] {
        assert!(
            stdout.lines().any(|l| l == format!("{who} (3, 9)")),
            "{who} infers 3.9: {}",
            fail()
        );
    }
    assert!(
        stdout.lines().any(|l| l
            == "PAGES [[('py39', [0, 1])], [('py39', [2]), ('py39b', [0])], [('py39b', [1])]]"),
        "{}",
        fail()
    );
    assert!(stdout.lines().any(|l| l == "GOT 30"), "{}", fail());
}
