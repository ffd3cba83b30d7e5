//! Altering topic configs: AlterConfigs through librdkafka's admin client, IncrementalAlterConfigs
//! over the raw protocol, with Kafka's error codes; changes are persisted, described, and take
//! effect on the partitions already open.

use kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use kafka_protocol::messages::{
    ApiKey, IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
};
use kafka_protocol::protocol::StrBytes;
use rdkafka::admin::{AlterConfig, ResourceSpecifier};
use weir_tests::raw::Conn;
use weir_tests::workload::produce;
use weir_tests::{admin, Broker};

fn describe(b: &Broker, topic: &str) -> std::collections::HashMap<String, (String, bool)> {
    let a = admin::client(b);
    let res = futures::executor::block_on(
        a.describe_configs([&ResourceSpecifier::Topic(topic)], &admin::opts()),
    )
    .unwrap();
    let r = res.into_iter().next().unwrap().unwrap();
    r.entries
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                (
                    e.value.clone().unwrap_or_default(),
                    e.source == rdkafka::admin::ConfigSource::DynamicTopic,
                ),
            )
        })
        .collect()
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

/// One IncrementalAlterConfigs resource: (type, name, [(key, op, value)]); returns its code.
fn incremental(
    c: &mut Conn,
    ty: i8,
    name: &str,
    ops: &[(&str, i8, Option<&str>)],
) -> (i16, String) {
    let req = IncrementalAlterConfigsRequest::default().with_resources(vec![
        AlterConfigsResource::default()
            .with_resource_type(ty)
            .with_resource_name(s(name))
            .with_configs(
                ops.iter()
                    .map(|&(k, op, v)| {
                        AlterableConfig::default()
                            .with_name(s(k))
                            .with_config_operation(op)
                            .with_value(v.map(s))
                    })
                    .collect(),
            ),
    ]);
    let r: IncrementalAlterConfigsResponse = c.call(ApiKey::IncrementalAlterConfigs, 1, &req);
    let x = &r.responses[0];
    (
        x.error_code,
        x.error_message
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default(),
    )
}

#[test]
fn alter_topic_configs_persist_and_apply_to_open_partitions() {
    let mut b = Broker::start(2);
    admin::create(&b, "c", 1, 1, &[("retention.ms", "86400000")]).unwrap();
    produce(&b.client_config(), "c", 0..200, &[("acks", "all")]);
    assert_eq!(b.segment_count("c-0"), 1);

    // AlterConfigs (librdkafka): the given overrides replace all of them.
    let a = admin::client(&b);
    let alter = AlterConfig::new(ResourceSpecifier::Topic("c")).set("segment.bytes", "4096");
    let r = futures::executor::block_on(a.alter_configs([&alter], &admin::opts())).unwrap();
    assert!(r[0].is_ok(), "{r:?}");
    let m = describe(&b, "c");
    assert_eq!(m["segment.bytes"], ("4096".to_string(), true));
    assert_eq!(m["retention.ms"].1, false, "replaced: back to the default");
    // The open partition rolls at the new size.
    produce(
        &b.client_config(),
        "c",
        200..1200,
        &[("acks", "all"), ("batch.num.messages", "20")],
    );
    assert!(
        b.segment_count("c-0") > 5,
        "rolled at 4 KiB: {}",
        b.segment_count("c-0")
    );

    // IncrementalAlterConfigs: SET, DELETE, and Kafka's errors.
    let mut c = Conn::new(&b.bootstrap());
    assert_eq!(
        incremental(&mut c, 2, "c", &[("retention.ms", 0, Some("5000"))]).0,
        0
    );
    assert_eq!(
        describe(&b, "c")["retention.ms"],
        ("5000".to_string(), true)
    );
    assert_eq!(describe(&b, "c")["segment.bytes"].0, "4096", "kept");
    assert_eq!(
        incremental(&mut c, 2, "c", &[("segment.bytes", 1, None)]).0,
        0
    );
    assert_eq!(
        describe(&b, "c")["segment.bytes"].1,
        false,
        "deleted: default again"
    );
    let (code, msg) = incremental(&mut c, 2, "c", &[("retention.ms", 2, Some("1"))]);
    assert_eq!(code, 40, "INVALID_CONFIG: append to a non-list key");
    assert!(msg.contains("append"), "{msg}");
    let (code, msg) = incremental(&mut c, 2, "c", &[("retention.ms", 0, Some("soon"))]);
    assert_eq!(code, 40, "INVALID_CONFIG: {msg}");
    assert_eq!(
        incremental(&mut c, 2, "c", &[("no.such.key", 0, Some("1"))]).0,
        40
    );
    assert_eq!(
        incremental(&mut c, 2, "nope", &[("retention.ms", 0, Some("1"))]).0,
        3
    );
    assert_eq!(
        incremental(
            &mut c,
            2,
            "c",
            &[("retention.ms", 0, Some("1")), ("retention.ms", 1, None)]
        )
        .0,
        42,
        "INVALID_REQUEST: duplicate keys"
    );
    assert_eq!(
        incremental(&mut c, 4, "0", &[("log.retention.ms", 0, Some("1"))]).0,
        42
    );
    assert_eq!(
        describe(&b, "c")["retention.ms"].0,
        "5000",
        "failed edits changed nothing"
    );

    // Persisted across a restart.
    assert!(b.stop());
    b.restart();
    assert_eq!(
        describe(&b, "c")["retention.ms"],
        ("5000".to_string(), true)
    );
}

/// DescribeConfigs of a BROKER resource lists the broker's whole effective config: keys given
/// in server.properties, `--override` or a flag with source STATIC_BROKER_CONFIG, the rest
/// DEFAULT_CONFIG; only the dynamic ones (log defaults, replication throttle rates) writable;
/// with include_synonyms each entry names the values beneath it.
#[test]
fn broker_configs_describe_the_whole_effective_config() {
    use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
    use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};
    use rdkafka::admin::ConfigSource;
    let b = Broker::start_with(1, &["--override", "log.retention.ms=1234"]);
    let a = admin::client(&b);
    let res = futures::executor::block_on(
        a.describe_configs([&ResourceSpecifier::Broker(0)], &admin::opts()),
    )
    .unwrap();
    let r = res.into_iter().next().unwrap().unwrap();
    let get = |k: &str| {
        r.entries
            .iter()
            .find(|e| e.name == k)
            .unwrap_or_else(|| panic!("{k} not listed"))
    };
    let retention = get("log.retention.ms");
    assert_eq!(retention.value.as_deref(), Some("1234"));
    assert_eq!(retention.source, ConfigSource::StaticBroker);
    assert!(!retention.is_read_only, "a cluster-wide dynamic default");
    let listeners = get("listeners");
    assert!(listeners.is_read_only);
    assert_eq!(
        listeners.value.clone().unwrap(),
        format!("PLAINTEXT://{}", b.bootstrap())
    );
    assert_eq!(
        listeners.source,
        ConfigSource::StaticBroker,
        "given as --listen"
    );
    assert_eq!(
        get("advertised.listeners").value.clone().unwrap(),
        format!("PLAINTEXT://{}", b.bootstrap())
    );
    let partitions = get("num.partitions");
    assert_eq!(partitions.value.as_deref(), Some("1"));
    assert_eq!(partitions.source, ConfigSource::Default);
    let rate = get("leader.replication.throttled.rate");
    assert!(!rate.is_read_only);
    assert_eq!(rate.source, ConfigSource::Default);
    assert!(r.entries.len() >= 40, "{} entries", r.entries.len());

    // Synonyms (DescribeConfigs v4, include_synonyms): the static value, then the default.
    let mut c = Conn::new(&b.bootstrap());
    let req = DescribeConfigsRequest::default()
        .with_include_synonyms(true)
        .with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(4)
            .with_resource_name(s("0"))
            .with_configuration_keys(Some(vec![
                s("log.retention.ms"),
                s("num.partitions"),
            ]))]);
    let resp: DescribeConfigsResponse = c.call(ApiKey::DescribeConfigs, 4, &req);
    let res = &resp.results[0];
    assert_eq!(res.error_code, 0);
    assert_eq!(res.configs.len(), 2);
    let syn = |i: usize| {
        res.configs[i]
            .synonyms
            .iter()
            .map(|x| {
                (
                    x.value.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                    x.source,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(res.configs[0].name.as_str(), "num.partitions");
    assert_eq!(syn(0), vec![("1".to_string(), 5)]);
    assert_eq!(res.configs[1].name.as_str(), "log.retention.ms");
    assert_eq!(
        syn(1),
        vec![("1234".to_string(), 4), ("604800000".to_string(), 5)]
    );
    // Another broker's resource is refused, as Kafka refuses it.
    let req =
        DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(4)
            .with_resource_name(s("7"))]);
    let resp: DescribeConfigsResponse = c.call(ApiKey::DescribeConfigs, 4, &req);
    assert_eq!(resp.results[0].error_code, 42);
}

/// Cluster-wide dynamic log defaults (`kafka-configs --entity-type brokers --entity-default`):
/// topics without their own override take the new default at once (a lower
/// `message.max.bytes` refuses a larger batch on an open partition, and deleting it lets the
/// batch in again); DescribeConfigs reports DYNAMIC_DEFAULT_BROKER_CONFIG; a per-broker
/// resource is refused; the default survives a restart.
#[test]
fn cluster_wide_log_defaults_change_at_runtime() {
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ProduceRequest, ProduceResponse, TopicName};
    use rdkafka::admin::ConfigSource;
    let mut b = Broker::start(1);
    admin::create(&b, "dyn", 1, 1, &[]).unwrap();
    admin::create(&b, "own", 1, 1, &[("max.message.bytes", "100000")]).unwrap();
    let mut c = Conn::new(&b.bootstrap());
    let produce = |c: &mut Conn, topic: &str| -> i16 {
        let records = std::iter::once((None, Some(bytes::Bytes::from(vec![b'x'; 3000])), 1_000));
        let batch = weir_tests::raw::batch(
            records,
            -1,
            -1,
            -1,
            kafka_protocol::records::Compression::None,
        );
        let req = ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(TopicName(s(topic)))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(batch))])]);
        let r: ProduceResponse = c.call(ApiKey::Produce, 9, &req);
        r.responses[0].partition_responses[0].error_code
    };
    assert_eq!(produce(&mut c, "dyn"), 0);
    assert_eq!(
        incremental(
            &mut c,
            4,
            "",
            &[
                ("message.max.bytes", 0, Some("2048")),
                ("log.retention.ms", 0, Some("12345"))
            ]
        ),
        (0, String::new())
    );
    assert_eq!(
        produce(&mut c, "dyn"),
        10,
        "MESSAGE_TOO_LARGE under the new default"
    );
    assert_eq!(produce(&mut c, "own"), 0, "a topic override wins");
    let described = describe(&b, "dyn");
    assert_eq!(described["retention.ms"].0, "12345");
    let a = admin::client(&b);
    let res = futures::executor::block_on(
        a.describe_configs([&ResourceSpecifier::Topic("dyn")], &admin::opts()),
    )
    .unwrap();
    let r = res.into_iter().next().unwrap().unwrap();
    let e = r
        .entries
        .iter()
        .find(|e| e.name == "max.message.bytes")
        .unwrap();
    assert_eq!(e.value.as_deref(), Some("2048"));
    assert_eq!(e.source, ConfigSource::DynamicDefaultBroker);
    // One broker's own resource cannot carry them: Weir sets log defaults cluster-wide.
    let (code, msg) = incremental(&mut c, 4, "0", &[("log.retention.ms", 0, Some("1"))]);
    assert_eq!(code, 42, "{msg}");
    // A bad value: INVALID_CONFIG.
    assert_eq!(
        incremental(&mut c, 4, "", &[("log.retention.ms", 0, Some("soon"))]).0,
        40
    );
    // Persisted.
    assert!(b.stop());
    b.restart();
    assert_eq!(describe(&b, "dyn")["retention.ms"].0, "12345");
    let mut c = Conn::new(&b.bootstrap());
    assert_eq!(produce(&mut c, "dyn"), 10);
    // Deleting the default lets the batch in again.
    assert_eq!(
        incremental(&mut c, 4, "", &[("message.max.bytes", 1, None)]).0,
        0
    );
    assert_eq!(produce(&mut c, "dyn"), 0);
}
