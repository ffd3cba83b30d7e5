//! A raw Kafka protocol client built on the kafka-protocol crate, for requests a real client
//! library would never send (duplicates, gaps, stale epochs) and answers it would hide.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, InitProducerIdRequest, InitProducerIdResponse, ListOffsetsRequest, ListOffsetsResponse,
    ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

/// One record of `batch`: key, value, timestamp.
pub type RawRecord = (Option<Bytes>, Option<Bytes>, i64);

/// Encodes one v2 record batch (offsets from 0) of `records`, with producer id, epoch and
/// first sequence (-1, -1, -1 for a producer without idempotence).
pub fn batch(
    records: impl IntoIterator<Item = RawRecord>,
    pid: i64,
    epoch: i16,
    seq: i32,
    compression: Compression,
) -> Bytes {
    let records: Vec<Record> = records
        .into_iter()
        .enumerate()
        .map(|(i, (key, value, timestamp))| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: pid,
            producer_epoch: epoch,
            timestamp_type: TimestampType::Creation,
            delete_horizon: false,
            offset: i as i64,
            sequence: if seq < 0 { -1 } else { seq + i as i32 },
            timestamp,
            key,
            value,
            headers: Default::default(),
        })
        .collect();
    let mut out = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut out,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .unwrap();
    out.freeze()
}

pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as i32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// A connection that sends requests and reads their responses in order.
pub struct Conn(TcpStream, i32);

impl Conn {
    pub fn new(bootstrap: &str) -> Conn {
        let s = TcpStream::connect(bootstrap).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Conn(s, 0)
    }

    pub fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Resp {
        self.1 += 1;
        let mut buf = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.1)
            .with_client_id(Some(StrBytes::from_static_str("raw-test")))
            .encode(&mut buf, key.request_header_version(version))
            .unwrap();
        req.encode(&mut buf, version).unwrap();
        self.0.write_all(&frame(&buf)).unwrap();
        let mut size = [0u8; 4];
        self.0.read_exact(&mut size).unwrap();
        let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
        self.0.read_exact(&mut body).unwrap();
        let mut body = Bytes::from(body);
        let h = ResponseHeader::decode(&mut body, key.response_header_version(version)).unwrap();
        assert_eq!(h.correlation_id, self.1);
        Resp::decode(&mut body, version).unwrap()
    }

    pub fn init_producer_id(&mut self) -> (i64, i16) {
        let r: InitProducerIdResponse = self.call(
            ApiKey::InitProducerId,
            4,
            &InitProducerIdRequest::default().with_transaction_timeout_ms(60_000),
        );
        assert_eq!(r.error_code, 0);
        (r.producer_id.0, r.producer_epoch)
    }

    /// Produces one batch of `n` records (acks=all); returns (error code, base offset).
    pub fn produce(
        &mut self,
        topic: &str,
        partition: i32,
        pid: i64,
        epoch: i16,
        seq: i32,
        n: usize,
    ) -> (i16, i64) {
        let records = (0..n as i32).map(|i| {
            (
                Some(Bytes::from(format!("k{}", seq + i))),
                Some(Bytes::from(format!("v{}", seq + i))),
                1_000 + i as i64,
            )
        });
        let batch = batch(records, pid, epoch, seq, Compression::None);
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(batch))])]);
        let r: ProduceResponse = self.call(ApiKey::Produce, 9, &req);
        let p = &r.responses[0].partition_responses[0];
        (p.error_code, p.base_offset)
    }

    /// Fetch v12 of one partition: (error, high watermark, record bytes).
    pub fn fetch(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_wait_ms: i32,
        min_bytes: i32,
    ) -> (i16, i64, usize) {
        let r = self.fetch_one(topic, partition, offset, max_wait_ms, min_bytes, 1 << 20);
        let p = &r.responses[0].partitions[0];
        (
            p.error_code,
            p.high_watermark,
            p.records.as_ref().map(|b| b.len()).unwrap_or(0),
        )
    }

    fn fetch_one(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_wait_ms: i32,
        min_bytes: i32,
        max_bytes: i32,
    ) -> kafka_protocol::messages::FetchResponse {
        use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
        use kafka_protocol::messages::FetchRequest;
        let req = FetchRequest::default()
            .with_replica_id((-1).into())
            .with_max_wait_ms(max_wait_ms)
            .with_min_bytes(min_bytes)
            .with_max_bytes(max_bytes)
            .with_session_epoch(-1)
            .with_topics(vec![FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(partition)
                    .with_fetch_offset(offset)
                    .with_partition_max_bytes(max_bytes)])]);
        self.call(ApiKey::Fetch, 12, &req)
    }

    /// Fetch v12 of one partition from `offset`: the stored record batches' bytes.
    pub fn fetch_records(&mut self, topic: &str, partition: i32, offset: i64) -> bytes::Bytes {
        let r = self.fetch_one(topic, partition, offset, 0, 1, 8 << 20);
        let p = &r.responses[0].partitions[0];
        assert_eq!(p.error_code, 0, "fetch error");
        p.records.clone().unwrap_or_default()
    }

    /// ListOffsets latest (-1) or earliest (-2).
    pub fn offset(&mut self, topic: &str, partition: i32, which: i64) -> i64 {
        let req = ListOffsetsRequest::default()
            .with_replica_id((-1).into())
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(vec![ListOffsetsPartition::default()
                    .with_partition_index(partition)
                    .with_timestamp(which)])]);
        let r: ListOffsetsResponse = self.call(ApiKey::ListOffsets, 7, &req);
        let p = &r.topics[0].partitions[0];
        assert_eq!(p.error_code, 0);
        p.offset
    }
}
