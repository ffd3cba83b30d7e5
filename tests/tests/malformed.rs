//! Bad input closes only the offending connection: another client keeps producing throughout,
//! and the broker neither panics nor grows without bound. Also raw-protocol checks of answers
//! the librdkafka wrapper hides (KIP-511 ApiVersions fallback, DescribeConfigs error codes).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, DescribeConfigsRequest,
    DescribeConfigsResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rand::{Rng, SeedableRng};
use rdkafka::producer::Producer;
use weir_tests::{admin, workload, Broker};

/// Sends `bytes`, optionally half-closes, and returns true when the broker closes the
/// connection within 10 s.
fn closed_after(b: &Broker, bytes: &[u8], half_close: bool) -> bool {
    let mut s = TcpStream::connect(b.bootstrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
    false
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as i32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn header(key: i16, version: i16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&key.to_be_bytes());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(&42i32.to_be_bytes());
    v.extend_from_slice(&(-1i16).to_be_bytes()); // null client id
    v
}

/// Sends one request encoded with kafka-protocol and decodes the response body.
fn call<Req: Encodable, Resp: Decodable>(b: &Broker, key: ApiKey, version: i16, req: &Req) -> Resp {
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .encode(&mut buf, key.request_header_version(version))
        .unwrap();
    req.encode(&mut buf, version).unwrap();
    let mut s = TcpStream::connect(b.bootstrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&frame(&buf)).unwrap();
    let mut size = [0u8; 4];
    s.read_exact(&mut size).unwrap();
    let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
    s.read_exact(&mut body).unwrap();
    let mut body = Bytes::from(body);
    let h = ResponseHeader::decode(&mut body, key.response_header_version(version)).unwrap();
    assert_eq!(h.correlation_id, 7);
    Resp::decode(&mut body, version).unwrap()
}

#[test]
fn malformed_frames_close_only_their_connection() {
    let b = Broker::start(2);
    admin::create(&b, "steady", 3, 1, &[]).unwrap();
    let mut cfg = b.client_config();
    cfg.set("acks", "1").set("linger.ms", "1");
    let (p, acks) = workload::producer(&cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let sender = std::thread::spawn(move || {
        let mut i = 0usize;
        while !stop2.load(Ordering::Relaxed) {
            workload::send(&p, "steady", i);
            i += 1;
            p.poll(Duration::from_millis(1));
        }
        p.flush(Duration::from_secs(30)).unwrap();
    });
    let acked_now = || acks.acked.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(300));
    let mut progress = vec![acked_now()];

    // Random bytes, several seeds (random sizes, API keys, versions and bodies).
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..20 {
        let n = rng.gen_range(1..2000);
        let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        assert!(
            closed_after(&b, &junk, true),
            "random bytes close the connection"
        );
    }
    // Random bodies behind a valid size prefix.
    for _ in 0..20 {
        let n = rng.gen_range(8..500);
        let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        assert!(
            closed_after(&b, &frame(&junk), false),
            "an undecodable frame closes the connection"
        );
    }
    progress.push(acked_now());
    // Huge and negative size prefixes: closed before anything is allocated or read.
    assert!(closed_after(&b, &i32::MAX.to_be_bytes(), false));
    assert!(closed_after(&b, &(-5i32).to_be_bytes(), false));
    assert!(closed_after(
        &b,
        &(200 * 1024 * 1024i32).to_be_bytes(),
        false
    ));
    // Truncated: a size prefix promising more than arrives, then the client goes away.
    let mut truncated = 100i32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&header(18, 3)[..6]);
    assert!(closed_after(&b, &truncated, true));
    // A whole frame whose body ends mid-field (Metadata v1 with a topic array cut short).
    let mut cut = header(3, 1);
    cut.extend_from_slice(&3i32.to_be_bytes());
    cut.extend_from_slice(&5i16.to_be_bytes());
    cut.extend_from_slice(b"ab");
    assert!(closed_after(&b, &frame(&cut), false));
    // An array count of 2^31-1 in a tiny frame must not make the broker reserve memory for it.
    let mut bomb = header(3, 1);
    bomb.extend_from_slice(&i32::MAX.to_be_bytes());
    assert!(closed_after(&b, &frame(&bomb), false));
    let mut bomb = header(0, 3);
    bomb.extend_from_slice(&(-1i16).to_be_bytes()); // transactional id
    bomb.extend_from_slice(&1i16.to_be_bytes()); // acks
    bomb.extend_from_slice(&1000i32.to_be_bytes()); // timeout
    bomb.extend_from_slice(&0x7fff_fff0i32.to_be_bytes()); // topic count
    assert!(closed_after(&b, &frame(&bomb), false));
    // Unknown API key, and a known API at a version we do not support.
    assert!(closed_after(&b, &frame(&header(9999, 0)), false));
    assert!(closed_after(&b, &frame(&header(0, 99)), false));
    progress.push(acked_now());

    // After all of it, the other client is still producing.
    let after_bad = acked_now();
    assert!(
        weir_tests::eventually(Duration::from_secs(30), || acked_now() > after_bad + 100),
        "the other client kept producing after the bad inputs"
    );
    progress.push(acked_now());
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    assert_eq!(
        acks.failed.load(Ordering::Relaxed),
        0,
        "the other client saw no failure"
    );
    assert!(
        progress.last() > progress.first() && progress[2] > progress[0],
        "the other client kept producing through the bad inputs: {progress:?}"
    );
    let log = b.log();
    assert!(!log.contains("panicked"), "no panic:\n{log}");
    assert!(log.contains("closing connection"), "each close is logged");
}

#[test]
fn api_versions_fallback_and_describe_configs_errors() {
    let b = Broker::start(1);
    // KIP-511: a newer ApiVersions than we know gets UNSUPPORTED_VERSION and our list, as v0.
    let mut raw = header(18, 77);
    raw.extend_from_slice(&[0, 0, 0]);
    let mut s = TcpStream::connect(b.bootstrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&frame(&raw)).unwrap();
    let mut size = [0u8; 4];
    s.read_exact(&mut size).unwrap();
    let mut body = vec![0u8; i32::from_be_bytes(size) as usize];
    s.read_exact(&mut body).unwrap();
    let mut body = Bytes::from(body);
    assert_eq!(
        ResponseHeader::decode(&mut body, 0).unwrap().correlation_id,
        42
    );
    let r = ApiVersionsResponse::decode(&mut body, 0).unwrap();
    assert_eq!(r.error_code, 35);
    let produce = r.api_keys.iter().find(|k| k.api_key == 0).unwrap();
    assert_eq!((produce.min_version, produce.max_version), (3, 11));

    // v3 answers normally and writes no tagged fields at their defaults.
    let r: ApiVersionsResponse = call(&b, ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    assert_eq!(r.error_code, 0);
    assert!(r.supported_features.is_empty() && r.finalized_features_epoch == -1);
    let fetch = r.api_keys.iter().find(|k| k.api_key == 1).unwrap();
    assert_eq!((fetch.min_version, fetch.max_version), (4, 17));

    // DescribeConfigs of a missing topic: UNKNOWN_TOPIC_OR_PARTITION.
    let req =
        DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_static_str("missing"))
            .with_configuration_keys(None)]);
    let r: DescribeConfigsResponse = call(&b, ApiKey::DescribeConfigs, 4, &req);
    assert_eq!(r.results[0].error_code, 3);
}
