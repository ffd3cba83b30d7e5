//! Incremental fetch sessions (KIP-227) against a real broker, over the raw protocol: a session
//! opens with a full fetch, incremental fetches carry only changed partitions and get back only
//! partitions with news, forgotten partitions leave the session, and wrong ids or epochs get
//! Kafka's error codes. (The Java client test runs a consumer that uses sessions by default.)

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ForgottenTopic};
use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use weir_tests::raw::Conn;
use weir_tests::{admin, Broker};

fn name(t: &str) -> TopicName {
    TopicName(StrBytes::from_string(t.to_string()))
}

/// A fetch of `parts` (partition, offset) of topic "s" in session `id` at `epoch`.
fn fetch(
    c: &mut Conn,
    id: i32,
    epoch: i32,
    parts: &[(i32, i64)],
    forget: &[i32],
    max_wait_ms: i32,
) -> FetchResponse {
    let mut req = FetchRequest::default()
        .with_replica_id((-1).into())
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_session_id(id)
        .with_session_epoch(epoch);
    if !parts.is_empty() {
        req.topics = vec![FetchTopic::default().with_topic(name("s")).with_partitions(
            parts
                .iter()
                .map(|&(p, o)| {
                    FetchPartition::default()
                        .with_partition(p)
                        .with_fetch_offset(o)
                        .with_partition_max_bytes(1 << 20)
                })
                .collect(),
        )];
    }
    if !forget.is_empty() {
        req.forgotten_topics_data = vec![ForgottenTopic::default()
            .with_topic(name("s"))
            .with_partitions(forget.to_vec())];
    }
    c.call(ApiKey::Fetch, 12, &req)
}

/// (partition, high watermark, record bytes) of every partition in the response.
fn parts(r: &FetchResponse) -> Vec<(i32, i64, usize)> {
    r.responses
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| {
                (
                    p.partition_index,
                    p.high_watermark,
                    p.records.as_ref().map(|b| b.len()).unwrap_or(0),
                )
            })
        })
        .collect()
}

#[test]
fn incremental_fetch_sessions() {
    let b = Broker::start(2);
    admin::create(&b, "s", 3, 1, &[]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    let mut p = Conn::new(&b.bootstrap());
    assert_eq!(p.produce("s", 0, -1, -1, -1, 5).0, 0);
    assert_eq!(p.produce("s", 1, -1, -1, -1, 5).0, 0);

    // Open: a full response, with a session id.
    let r = fetch(&mut c, 0, 0, &[(0, 0), (1, 0), (2, 0)], &[], 0);
    assert_eq!(r.error_code, 0);
    let id = r.session_id;
    assert_ne!(id, 0, "a session was opened");
    let got = parts(&r);
    assert_eq!(got.len(), 3);
    assert!(got[0].2 > 0 && got[1].2 > 0 && got[2].2 == 0);

    // Incremental: the client moved its positions; nothing new, so no partition is named.
    let r = fetch(&mut c, id, 1, &[(0, 5), (1, 5)], &[], 100);
    assert_eq!((r.error_code, r.session_id), (0, id));
    assert_eq!(parts(&r), vec![], "no news, no partitions");

    // New records on partition 2 only: an empty incremental request gets just partition 2.
    assert_eq!(p.produce("s", 2, -1, -1, -1, 4).0, 0);
    let r = fetch(&mut c, id, 2, &[], &[], 1000);
    let got = parts(&r);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0, got[0].1), (2, 4));
    assert!(got[0].2 > 0);

    // Wrong epoch and unknown session: Kafka's codes.
    assert_eq!(fetch(&mut c, id, 9, &[], &[], 0).error_code, 71);
    assert_eq!(fetch(&mut c, id ^ 0x4000, 1, &[], &[], 0).error_code, 70);

    // Forget partition 2: its news no longer comes.
    let r = fetch(&mut c, id, 3, &[], &[2], 0);
    assert_eq!(r.error_code, 0);
    assert_eq!(p.produce("s", 2, -1, -1, -1, 4).0, 0);
    let r = fetch(&mut c, id, 4, &[], &[], 100);
    assert_eq!(parts(&r), vec![]);
    // But partition 0's news does.
    assert_eq!(p.produce("s", 0, -1, -1, -1, 2).0, 0);
    let r = fetch(&mut c, id, 5, &[], &[], 1000);
    let got = parts(&r);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1), (0, 7));

    // Close with epoch -1: a sessionless full fetch, and the session is gone.
    let r = fetch(&mut c, id, -1, &[(0, 0)], &[], 0);
    assert_eq!((r.error_code, r.session_id), (0, 0));
    assert_eq!(parts(&r).len(), 1);
    assert_eq!(fetch(&mut c, id, 6, &[], &[], 0).error_code, 70);
    // Sessionless fetches keep working as before.
    let r = fetch(&mut c, 0, -1, &[(0, 0), (1, 0)], &[], 0);
    assert_eq!((r.session_id, parts(&r).len()), (0, 2));
}
