//! Requests for partitions owned by different shards are served by their owners: the shard
//! table in the metadata file says who owns what, and each shard reports at shutdown which
//! partitions it appended to and served fetches for, and how many operations it received from
//! other shards.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::producer::{BaseRecord, Producer};
use weir_tests::workload::{self, consume};
use weir_tests::{admin, Broker};

/// Parses `shard=N produced=[t-0:3,t-2:1] fetched=[...] remote_in=X remote_out=Y`.
fn stats(log: &str) -> BTreeMap<usize, (Vec<String>, Vec<String>, u64)> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let Some(at) = line.find("shard=") else {
            continue;
        };
        let rest = &line[at..];
        if !rest.contains("produced=[") {
            continue;
        }
        let field = |name: &str| -> String {
            let start = rest.find(&format!("{name}=")).unwrap() + name.len() + 1;
            rest[start..]
                .split(' ')
                .next()
                .unwrap()
                .trim_matches(|c| c == '[' || c == ']')
                .to_string()
        };
        let list = |s: String| {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(|x| x.split(':').next().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let shard: usize = field("shard").parse().unwrap();
        out.insert(
            shard,
            (
                list(field("produced")),
                list(field("fetched")),
                field("remote_in").parse().unwrap(),
            ),
        );
    }
    out
}

#[test]
fn partitions_are_served_by_their_owner_shards() {
    let mut b = Broker::start(2);
    admin::create(&b, "owned", 4, 1, &[]).unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.data_dir().join("weir-metadata.json")).unwrap())
            .unwrap();
    let owners: Vec<usize> = meta["topics"]["owned"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["shard"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(owners.len(), 4);
    assert!(
        owners.contains(&0) && owners.contains(&1),
        "the shard table spreads partitions: {owners:?}"
    );

    // One producer connection lands on one shard; it writes to all four partitions.
    let mut cfg = b.client_config();
    cfg.set("acks", "all").set("linger.ms", "5");
    let (p, acks) = workload::producer(&cfg);
    for i in 0..400usize {
        let v = workload::value(i);
        p.send(
            BaseRecord::<(), _, _>::with_opaque_to("owned", Box::new(i))
                .partition((i % 4) as i32)
                .payload(&v),
        )
        .unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
    assert_eq!(acks.acked.lock().unwrap().len(), 400);
    let got = consume(&b.client_config(), "owned", 4, 400, Duration::from_secs(30));
    assert_eq!(got.values().map(|v| v.len()).sum::<usize>(), 400);

    assert!(b.stop());
    let st = stats(&b.log());
    assert_eq!(st.len(), 2, "both shards reported:\n{}", b.log());
    for (partition, owner) in owners.iter().enumerate() {
        let name = format!("owned-{partition}");
        for (shard, (produced, fetched, _)) in &st {
            assert_eq!(
                produced.contains(&name),
                shard == owner,
                "{name} appended on shard {shard}, owner {owner}"
            );
            assert_eq!(
                fetched.contains(&name),
                shard == owner,
                "{name} fetched on shard {shard}, owner {owner}"
            );
        }
    }
    // Whichever shard held the connections, the other received its share as cross-shard work.
    assert!(
        st.values().any(|(_, _, remote_in)| *remote_in > 0),
        "cross-shard hand-off happened"
    );
}

/// One connection pipelines idempotent produce requests, alternating between a partition of
/// its own shard and one of the other shard, while small segments make the owners roll often
/// (an append waits for the roll). Appends for the other shard go on its produce lane without
/// the connection waiting for them: they must still land in the order the connection read
/// them, or the idempotent sequences would be refused as out of order.
#[test]
fn pipelined_idempotent_produce_across_shards_stays_in_order() {
    use bytes::{BufMut, Bytes, BytesMut};
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, RequestHeader};
    use kafka_protocol::messages::{ResponseHeader, TopicName};
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
    use kafka_protocol::records::Compression;
    use std::io::{Read, Write};
    use weir_tests::raw::{self, Conn};

    let mut b = Broker::start(2);
    admin::create(&b, "lane", 2, 1, &[("segment.bytes", "262144")]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    let (pid, epoch) = c.init_producer_id();
    drop(c);

    const REQUESTS: usize = 600;
    const RECORDS: usize = 20;
    let mut stream = std::net::TcpStream::connect(b.bootstrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let send = std::thread::spawn(move || {
        for i in 0..REQUESTS {
            let partition = (i % 2) as i32;
            let seq = ((i / 2) * RECORDS) as i32;
            let value = Bytes::from(vec![b'x'; 1000]);
            let records = (0..RECORDS).map(|r| (None, Some(value.clone()), 1_000 + r as i64));
            let batch = raw::batch(records, pid, epoch, seq, Compression::None);
            let req = ProduceRequest::default()
                .with_acks(-1)
                .with_timeout_ms(30_000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_static_str("lane")))
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_index(partition)
                        .with_records(Some(batch))])]);
            let mut buf = BytesMut::new();
            RequestHeader::default()
                .with_request_api_key(ApiKey::Produce as i16)
                .with_request_api_version(9)
                .with_correlation_id(i as i32)
                .encode(&mut buf, ApiKey::Produce.request_header_version(9))
                .unwrap();
            req.encode(&mut buf, 9).unwrap();
            let mut framed = BytesMut::new();
            framed.put_i32(buf.len() as i32);
            framed.extend_from_slice(&buf);
            writer.write_all(&framed).unwrap();
        }
    });
    let mut next = [0i64; 2];
    for i in 0..REQUESTS {
        let mut size = [0u8; 4];
        stream.read_exact(&mut size).unwrap();
        let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
        stream.read_exact(&mut body).unwrap();
        let mut body = Bytes::from(body);
        let h =
            ResponseHeader::decode(&mut body, ApiKey::Produce.response_header_version(9)).unwrap();
        assert_eq!(h.correlation_id, i as i32, "responses in request order");
        let r = ProduceResponse::decode(&mut body, 9).unwrap();
        let p = &r.responses[0].partition_responses[0];
        assert_eq!(p.error_code, 0, "request {i} to partition {}", p.index);
        assert_eq!(p.index, (i % 2) as i32);
        let n = &mut next[p.index as usize];
        assert_eq!(p.base_offset, *n, "request {i}: appended in order");
        *n += RECORDS as i64;
    }
    send.join().unwrap();
    assert_eq!(next, [(REQUESTS / 2 * RECORDS) as i64; 2]);
    // Both shards appended, and the other shard's appends came over from this connection's.
    b.stop();
    let st = stats(&b.log());
    assert_eq!(st.len(), 2, "both shards reported:\n{}", b.log());
    let producers: Vec<_> = st.values().filter(|s| !s.0.is_empty()).collect();
    assert_eq!(producers.len(), 2, "{st:?}");
    assert!(st.values().any(|s| s.2 >= (REQUESTS / 2) as u64), "{st:?}");
}
