//! The `weir` command end to end against a real broker process.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use weir_tests::Broker;

fn weir(args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    c.wait_with_output().unwrap()
}

fn ok(args: &[&str], stdin: Option<&str>) -> String {
    let o = weir(args, stdin);
    assert!(
        o.status.success(),
        "weir {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = weir(args, None);
    assert!(!o.status.success(), "weir {args:?} should fail");
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "one line: {err:?}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"));
    err
}

#[test]
fn topics_console_round_trip_and_consumer_groups() {
    let conf = tempfile::tempdir().unwrap();
    let path = conf.path().join("server.properties");
    std::fs::write(&path, "group.initial.rebalance.delay.ms=0\n").unwrap();
    let b = Broker::start_with(2, &["--config", path.to_str().unwrap()]);
    let bs = b.bootstrap();
    let bs = bs.as_str();

    assert_eq!(
        ok(
            &[
                "topics",
                "--bootstrap-server",
                bs,
                "--create",
                "--topic",
                "orders",
                "--partitions",
                "3",
                "--replication-factor",
                "1"
            ],
            None
        )
        .trim(),
        "Created topic orders."
    );
    assert!(fails(&[
        "topics",
        "--bootstrap-server",
        bs,
        "--create",
        "--topic",
        "orders",
        "--partitions",
        "3"
    ])
    .contains("TOPIC_ALREADY_EXISTS"));
    assert!(fails(&[
        "topics",
        "--bootstrap-server",
        bs,
        "--create",
        "--topic",
        "bad",
        "--partitions",
        "1",
        "--replication-factor",
        "3"
    ])
    .contains("INVALID_REPLICATION_FACTOR"));
    assert_eq!(
        ok(&["topics", "--bootstrap-server", bs, "--list"], None),
        "orders\n",
        "internal topics hidden"
    );
    let d = ok(
        &[
            "topics",
            "--bootstrap-server",
            bs,
            "--describe",
            "--topic",
            "orders",
        ],
        None,
    );
    assert!(
        d.contains("PartitionCount: 3")
            && d.contains("Partition: 2\tLeader: 0\tReplicas: 0\tIsr: 0"),
        "{d}"
    );
    ok(
        &[
            "topics",
            "--bootstrap-server",
            bs,
            "--alter",
            "--topic",
            "orders",
            "--partitions",
            "4",
        ],
        None,
    );
    assert!(ok(
        &[
            "topics",
            "--bootstrap-server",
            bs,
            "--describe",
            "--topic",
            "orders"
        ],
        None
    )
    .contains("PartitionCount: 4"));
    assert!(fails(&[
        "topics",
        "--bootstrap-server",
        bs,
        "--alter",
        "--topic",
        "orders",
        "--partitions",
        "2"
    ])
    .contains("INVALID_PARTITIONS"));

    // Console producer with keys piped into the console consumer.
    let lines: String = (0..50).map(|i| format!("k{}:value-{i}\n", i % 5)).collect();
    ok(
        &[
            "console-producer",
            "--bootstrap-server",
            bs,
            "--topic",
            "orders",
            "--property",
            "parse.key=true",
            "--property",
            "key.separator=:",
        ],
        Some(&lines),
    );
    let out = ok(
        &[
            "console-consumer",
            "--bootstrap-server",
            bs,
            "--topic",
            "orders",
            "--from-beginning",
            "--max-messages",
            "50",
            "--property",
            "print.key=true",
            "--property",
            "key.separator=:",
        ],
        None,
    );
    let mut got: Vec<&str> = out.lines().collect();
    let mut want: Vec<String> = (0..50).map(|i| format!("k{}:value-{i}", i % 5)).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // Without --from-beginning the consumer starts at the end: nothing old is printed.
    let tail = ok(
        &[
            "console-consumer",
            "--bootstrap-server",
            bs,
            "--topic",
            "orders",
            "--timeout-ms",
            "1500",
        ],
        None,
    );
    assert_eq!(tail, "");

    // A group reads everything, then shows no lag; new records show lag; reset moves it back.
    let g = ok(
        &[
            "console-consumer",
            "--bootstrap-server",
            bs,
            "--topic",
            "orders",
            "--from-beginning",
            "--group",
            "readers",
            "--max-messages",
            "50",
        ],
        None,
    );
    assert_eq!(g.lines().count(), 50);
    assert!(ok(
        &["consumer-groups", "--bootstrap-server", bs, "--list"],
        None
    )
    .lines()
    .any(|l| l == "readers"));
    let group_lag = |bs: &str, g: &str| -> i64 {
        let desc = ok(
            &[
                "consumer-groups",
                "--bootstrap-server",
                bs,
                "--describe",
                "--group",
                g,
            ],
            None,
        );
        desc.lines()
            .skip(1)
            .map(|l| l.split('\t').nth(5).unwrap().parse::<i64>().unwrap())
            .sum()
    };
    assert_eq!(group_lag(bs, "readers"), 0);
    ok(
        &[
            "console-producer",
            "--bootstrap-server",
            bs,
            "--topic",
            "orders",
        ],
        Some("x\ny\nz\n"),
    );
    assert_eq!(group_lag(bs, "readers"), 3);
    ok(
        &[
            "consumer-groups",
            "--bootstrap-server",
            bs,
            "--reset-offsets",
            "--group",
            "readers",
            "--topic",
            "orders",
            "--to-earliest",
            "--execute",
        ],
        None,
    );
    assert_eq!(group_lag(bs, "readers"), 53);
    ok(
        &[
            "consumer-groups",
            "--bootstrap-server",
            bs,
            "--reset-offsets",
            "--group",
            "readers",
            "--topic",
            "orders",
            "--to-latest",
            "--execute",
        ],
        None,
    );
    assert_eq!(group_lag(bs, "readers"), 0);

    ok(
        &[
            "topics",
            "--bootstrap-server",
            bs,
            "--delete",
            "--topic",
            "orders",
        ],
        None,
    );
    assert_eq!(
        ok(&["topics", "--bootstrap-server", bs, "--list"], None),
        ""
    );

    // Clear one-line errors.
    assert!(
        fails(&["topics", "--bootstrap-server", "127.0.0.1:1", "--list"])
            .contains("cannot connect")
    );
    assert!(fails(&[
        "topics",
        "--bootstrap-server",
        bs,
        "--describe",
        "--topic",
        "nope"
    ])
    .contains("UNKNOWN_TOPIC_OR_PARTITION"));
    assert!(fails(&["topics", "--bootstrap-server", bs, "--bogus-flag"]).contains("--bogus-flag"));
    assert!(fails(&[
        "consumer-groups",
        "--bootstrap-server",
        bs,
        "--describe",
        "--group",
        "ghost"
    ])
    .contains("does not exist"));
}

#[test]
fn configs_describe_and_alter_topic_configs() {
    let b = Broker::start(1);
    let bs = b.bootstrap();
    let bs = bs.as_str();
    ok(
        &[
            "topics",
            "--bootstrap-server",
            bs,
            "--create",
            "--topic",
            "cfg",
            "--partitions",
            "1",
            "--replication-factor",
            "1",
        ],
        None,
    );
    // `weir configs --bootstrap-server B --entity-type TYPE --entity-name NAME <rest>`.
    let args = |ty: &'static str, name: &'static str, rest: &[&'static str]| {
        let mut v = vec![
            "configs",
            "--bootstrap-server",
            bs,
            "--entity-type",
            ty,
            "--entity-name",
            name,
        ];
        v.extend_from_slice(rest);
        v
    };
    let describe = |rest: &[&'static str]| ok(&args("topics", "cfg", rest), None);
    assert_eq!(
        describe(&["--describe"]),
        "Dynamic configs for topic cfg are:\n"
    );
    let out = describe(&[
        "--alter",
        "--add-config",
        "retention.ms=5000,segment.bytes=1048576",
    ]);
    assert_eq!(out, "Completed updating config for topic cfg.\n");
    let d = describe(&["--describe"]);
    assert!(
        d.contains(
            "  retention.ms=5000 sensitive=false synonyms={DYNAMIC_TOPIC_CONFIG:retention.ms=5000}"
        ),
        "{d}"
    );
    assert!(d.contains("  segment.bytes=1048576 "), "{d}");
    describe(&["--alter", "--delete-config", "segment.bytes"]);
    let d = describe(&["--describe"]);
    assert!(
        d.contains("retention.ms=5000") && !d.contains("segment.bytes"),
        "{d}"
    );
    let all = describe(&["--describe", "--all"]);
    assert!(all.starts_with("All configs for topic cfg are:\n"));
    assert!(
        all.contains("  segment.bytes=1073741824 sensitive=false synonyms={DEFAULT_CONFIG:"),
        "{all}"
    );
    // Kafka's errors come back as one line with a non-zero exit.
    let err = fails(&args(
        "topics",
        "cfg",
        &["--alter", "--add-config", "retention.ms=soon"],
    ));
    assert!(err.contains("INVALID_CONFIG"), "{err}");
    let err = fails(&args("topics", "nope", &["--describe"]));
    assert!(err.contains("UNKNOWN_TOPIC_OR_PARTITION"), "{err}");
    // A broker id that is not a number is refused before any request.
    let err = fails(&args("brokers", "zero", &["--describe"]));
    assert!(err.contains("a broker id is a number"), "{err}");
}

/// `base..base + n` are all free on loopback.
fn free_port_run(n: u16) -> u16 {
    for _ in 0..100 {
        let base = weir_tests::free_port();
        if base > u16::MAX - 2 * n {
            continue;
        }
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no run of {n} free ports");
}

/// `weir cluster start|status|stop`: three broker processes from one command, a topic with
/// RF 3 spread over them, and nothing left running after stop.
#[test]
fn cluster_start_status_stop() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (port, cport) = (free_port_run(3), free_port_run(3));
    let broker = weir_tests::broker_binary();
    let (p, c) = (port.to_string(), cport.to_string());
    let started = ok(
        &[
            "cluster",
            "start",
            "--nodes",
            "3",
            "--dir",
            d,
            "--port",
            &p,
            "--controller-port",
            &c,
            "--broker",
            broker.to_str().unwrap(),
            "--shards",
            "1",
            "--override",
            "broker.heartbeat.interval.ms=500",
        ],
        None,
    );
    assert!(started.contains("cluster up"), "{started}");
    let status = ok(&["cluster", "status", "--dir", d], None);
    assert_eq!(
        status.matches("serving").count() - status.matches("not serving").count(),
        3,
        "{status}"
    );
    assert!(status.contains("3 live brokers"), "{status}");
    let bs = format!("127.0.0.1:{port}");
    ok(
        &[
            "topics",
            "--bootstrap-server",
            &bs,
            "--create",
            "--topic",
            "c3",
            "--partitions",
            "3",
            "--replication-factor",
            "3",
        ],
        None,
    );
    let described = ok(
        &[
            "topics",
            "--bootstrap-server",
            &bs,
            "--describe",
            "--topic",
            "c3",
        ],
        None,
    );
    assert!(described.contains("ReplicationFactor: 3"), "{described}");
    let pids: Vec<i32> = (0..3)
        .map(|i| {
            std::fs::read_to_string(dir.path().join(format!("node-{i}/broker.pid")))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    let stopped = ok(&["cluster", "stop", "--dir", d], None);
    assert_eq!(stopped.matches(": stopped").count(), 3, "{stopped}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still runs"
        );
    }
    let status = ok(&["cluster", "status", "--dir", d], None);
    assert_eq!(status.matches(": down").count(), 3, "{status}");
}

/// kafka-reassign-partitions.sh's workflow on a 3-broker cluster: generate a plan for a topic
/// over the brokers listed, execute it, verify until complete; the replicas are as planned.
#[test]
fn reassign_partitions_generate_execute_verify() {
    let c = weir_tests::Cluster::start(3, &[("replica.fetch.wait.max.ms", "200")]);
    let b = c.node(0).bootstrap();
    ok(
        &[
            "topics",
            "--bootstrap-server",
            &b,
            "--create",
            "--topic",
            "mv",
            "--partitions",
            "4",
            "--replication-factor",
            "1",
        ],
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let topics = dir.path().join("topics-to-move.json");
    std::fs::write(&topics, r#"{"version":1,"topics":[{"topic":"mv"}]}"#).unwrap();
    // Brokers 1 and 2 only, two replicas each.
    let out = ok(
        &[
            "reassign-partitions",
            "--bootstrap-server",
            &b,
            "--topics-to-move-json-file",
            topics.to_str().unwrap(),
            "--broker-list",
            "1,2",
            "--generate",
        ],
        None,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "Current partition replica assignment");
    assert_eq!(lines[3], "Proposed partition reassignment configuration");
    let proposed = lines[4];
    assert!(
        proposed
            .starts_with(r#"{"version":1,"partitions":[{"topic":"mv","partition":0,"replicas":["#),
        "{proposed}"
    );
    // RF 1 topic: the proposal keeps RF 1, leaders alternating over 1 and 2.
    let plan = dir.path().join("plan.json");
    let want = r#"{"version":1,"partitions":[{"topic":"mv","partition":0,"replicas":[1],"log_dirs":["any"]},{"topic":"mv","partition":1,"replicas":[2],"log_dirs":["any"]},{"topic":"mv","partition":2,"replicas":[1],"log_dirs":["any"]},{"topic":"mv","partition":3,"replicas":[2],"log_dirs":["any"]}]}"#;
    assert_eq!(proposed, want);
    std::fs::write(&plan, proposed).unwrap();
    let out = ok(
        &[
            "reassign-partitions",
            "--bootstrap-server",
            &b,
            "--reassignment-json-file",
            plan.to_str().unwrap(),
            "--execute",
        ],
        None,
    );
    assert!(
        out.contains("Successfully started partition reassignments for mv-0,mv-1,mv-2,mv-3"),
        "{out}"
    );
    let mut last = String::new();
    let done = weir_tests::eventually(std::time::Duration::from_secs(30), || {
        last = ok(
            &[
                "reassign-partitions",
                "--bootstrap-server",
                &b,
                "--reassignment-json-file",
                plan.to_str().unwrap(),
                "--verify",
            ],
            None,
        );
        last.matches("is completed.").count() == 4
    });
    assert!(done, "{last}");
    let described = ok(
        &[
            "topics",
            "--bootstrap-server",
            &b,
            "--describe",
            "--topic",
            "mv",
        ],
        None,
    );
    for (p, r) in [(0, 1), (1, 2), (2, 1), (3, 2)] {
        assert!(
            described.contains(&format!(
                "Partition: {p}\tLeader: {r}\tReplicas: {r}\tIsr: {r}"
            )),
            "{described}"
        );
    }
    // kafka-log-dirs.sh: each broker lists the replicas it now holds, with their sizes.
    let out = ok(
        &[
            "log-dirs",
            "--bootstrap-server",
            &b,
            "--describe",
            "--topic-list",
            "mv",
        ],
        None,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "Querying brokers for log directories information");
    assert_eq!(
        lines[1],
        "Received log directory information from brokers 0,1,2"
    );
    let json: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
    let held = |broker: i64| -> Vec<String> {
        let b = json["brokers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["broker"] == broker)
            .unwrap();
        let mut v: Vec<String> = b["logDirs"][0]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["partition"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(held(0), Vec::<String>::new());
    assert_eq!(held(1), vec!["mv-0", "mv-2"]);
    assert_eq!(held(2), vec!["mv-1", "mv-3"]);
    // kafka-leader-election.sh: every leader is already its preferred replica.
    let out = ok(
        &[
            "leader-election",
            "--bootstrap-server",
            &b,
            "--election-type",
            "preferred",
            "--topic",
            "mv",
            "--partition",
            "1",
        ],
        None,
    );
    assert_eq!(
        out.trim(),
        "Valid replica already elected for partitions mv-1"
    );
    // A throttle belongs to --execute only.
    let err = fails(&[
        "reassign-partitions",
        "--bootstrap-server",
        &b,
        "--reassignment-json-file",
        plan.to_str().unwrap(),
        "--verify",
        "--throttle",
        "1000",
    ]);
    assert!(err.contains("--throttle is only for --execute"), "{err}");
}

/// kafka-reassign-partitions.sh --throttle: the moving replica's catch-up is held to the
/// throttle (measured from the bytes moved and the time taken), in-sync replicas are not
/// throttled, and --verify clears the rates and throttled-replica lists once complete.
#[test]
fn a_throttled_reassignment_moves_no_faster_than_the_throttle() {
    use weir_tests::{admin, eventually, log_bytes, workload};
    // A small fetch size so one fetch's overshoot is small next to the throttle.
    let c = weir_tests::Cluster::start(
        3,
        &[
            ("replica.fetch.wait.max.ms", "200"),
            ("replica.fetch.max.bytes", "65536"),
        ],
    );
    let b = c.node(0).bootstrap();
    let assignment: &[&[i32]] = &[&[0]];
    let t = rdkafka::admin::NewTopic::new(
        "slow",
        1,
        rdkafka::admin::TopicReplication::Variable(assignment),
    );
    let r =
        futures::executor::block_on(admin::client(c.node(0)).create_topics([&t], &admin::opts()))
            .expect("CreateTopics");
    assert!(r[0].is_ok(), "{r:?}");
    let acked = workload::produce(
        &c.node(0).client_config(),
        "slow",
        0..20_000,
        &[("acks", "all")],
    );
    assert_eq!(acked.len(), 20_000);
    // Segment files are preallocated while open: the data is what precedes the zero tail
    // (every batch ends in a record's non-zero bytes).
    let data = |node: usize| {
        let mut v = log_bytes(&c.node(node).data_dir().join("slow-0"));
        while v.last() == Some(&0) {
            v.pop();
        }
        v
    };
    let bytes = data(0).len() as f64;
    assert!(bytes > 2_000_000.0, "{bytes}");

    let rate: u64 = 512 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{"version":1,"partitions":[{"topic":"slow","partition":0,"replicas":[0,1],"log_dirs":["any","any"]}]}"#,
    )
    .unwrap();
    let args = |verb: &'static str| -> Vec<String> {
        vec![
            "reassign-partitions".into(),
            "--bootstrap-server".into(),
            b.clone(),
            "--reassignment-json-file".into(),
            plan.to_str().unwrap().into(),
            verb.into(),
        ]
    };
    let run = |v: &[String]| ok(&v.iter().map(String::as_str).collect::<Vec<_>>(), None);
    let mut execute = args("--execute");
    execute.extend(["--throttle".to_string(), rate.to_string()]);
    let started = std::time::Instant::now();
    let out = run(&execute);
    assert!(
        out.contains(&format!(
            "The inter-broker throttle limit was set to {rate} B/s"
        )),
        "{out}"
    );
    assert!(
        out.contains("Successfully started partition reassignments for slow-0"),
        "{out}"
    );

    // While it moves: the rates are dynamic broker configs on both brokers, the lists are
    // topic configs, and --verify leaves them alone.
    let described = ok(
        &[
            "configs",
            "--bootstrap-server",
            &b,
            "--entity-type",
            "brokers",
            "--entity-name",
            "1",
            "--describe",
        ],
        None,
    );
    assert!(
        described.contains(&format!(
            "follower.replication.throttled.rate={rate} sensitive=false synonyms={{DYNAMIC_BROKER_CONFIG:"
        )),
        "{described}"
    );
    let topic_cfg = ok(
        &[
            "configs",
            "--bootstrap-server",
            &b,
            "--entity-type",
            "topics",
            "--entity-name",
            "slow",
            "--describe",
        ],
        None,
    );
    assert!(
        topic_cfg.contains("leader.replication.throttled.replicas=0:0"),
        "{topic_cfg}"
    );
    assert!(
        topic_cfg.contains("follower.replication.throttled.replicas=0:1"),
        "{topic_cfg}"
    );
    let early = run(&args("--verify"));
    assert!(
        early.contains("Reassignment of partition slow-0 is still in progress."),
        "{early}"
    );
    assert!(!early.contains("Clearing"), "{early}");

    let mut last = String::new();
    let done = eventually(std::time::Duration::from_secs(120), || {
        last = run(&args("--verify"));
        last.contains("Reassignment of partition slow-0 is completed.")
    });
    let elapsed = started.elapsed().as_secs_f64();
    assert!(done, "{last}");
    assert!(data(1) == data(0), "the new replica holds the whole log");
    eprintln!(
        "throttled move: {bytes} bytes in {elapsed:.1} s = {:.0} B/s (throttle {rate} B/s)",
        bytes / elapsed
    );
    // The bucket allows one second of burst plus one fetch beyond the rate; a fetch is at
    // least one whole batch, however small replica.fetch.max.bytes is.
    let overshoot = weir_tests::largest_batch(&data(0)).max(65_536);
    assert!(
        bytes <= rate as f64 * (elapsed + 1.0) + overshoot as f64,
        "moved {bytes} bytes in {elapsed:.1} s: faster than {rate} B/s"
    );
    assert!(
        last.contains("Clearing broker-level throttles on brokers 0,1,2"),
        "{last}"
    );
    assert!(
        last.contains("Clearing topic-level throttles on topic slow"),
        "{last}"
    );
    for broker in ["0", "1"] {
        let d = ok(
            &[
                "configs",
                "--bootstrap-server",
                &b,
                "--entity-type",
                "brokers",
                "--entity-name",
                broker,
                "--describe",
            ],
            None,
        );
        assert_eq!(
            d.trim(),
            format!("Dynamic configs for broker {broker} are:"),
            "{d}"
        );
    }
    let topic_cfg = ok(
        &[
            "configs",
            "--bootstrap-server",
            &b,
            "--entity-type",
            "topics",
            "--entity-name",
            "slow",
            "--describe",
        ],
        None,
    );
    assert!(!topic_cfg.contains("throttled"), "{topic_cfg}");
}

/// kafka-configs.sh --entity-type brokers: dynamic broker configs per broker and as the
/// cluster-wide default, with Kafka's errors for keys that are not dynamic and bad values.
#[test]
fn dynamic_broker_configs_per_broker_and_default() {
    let mut broker = Broker::start(1);
    let b = broker.bootstrap();
    let alter = |entity: &[&str], add: &str| -> Output {
        let mut a = vec![
            "configs",
            "--bootstrap-server",
            &b,
            "--entity-type",
            "brokers",
        ];
        a.extend_from_slice(entity);
        a.extend_from_slice(&["--alter", "--add-config", add]);
        weir(&a, None)
    };
    let o = alter(
        &["--entity-default"],
        "leader.replication.throttled.rate=1000",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "Completed updating default config for brokers in the cluster."
    );
    let o = alter(
        &["--entity-name", "0"],
        "follower.replication.throttled.rate=2000",
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "Completed updating config for broker 0."
    );
    let d = ok(
        &[
            "configs",
            "--bootstrap-server",
            &b,
            "--entity-type",
            "brokers",
            "--entity-name",
            "0",
            "--describe",
        ],
        None,
    );
    assert!(d.contains("follower.replication.throttled.rate=2000 sensitive=false synonyms={DYNAMIC_BROKER_CONFIG:"), "{d}");
    assert!(d.contains("leader.replication.throttled.rate=1000 sensitive=false synonyms={DYNAMIC_DEFAULT_BROKER_CONFIG:"), "{d}");
    let d = ok(
        &[
            "configs",
            "--bootstrap-server",
            &b,
            "--entity-type",
            "brokers",
            "--entity-default",
            "--describe",
        ],
        None,
    );
    assert_eq!(
        d.trim(),
        "Default configs for brokers in the cluster are:\n  leader.replication.throttled.rate=1000 sensitive=false synonyms={DYNAMIC_DEFAULT_BROKER_CONFIG:leader.replication.throttled.rate=1000}"
    );
    // Not dynamic: Kafka's INVALID_REQUEST and message; a bad value: INVALID_CONFIG.
    let o = alter(&["--entity-name", "0"], "log.dirs=/tmp/x");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("INVALID_REQUEST (Cannot update these configs dynamically: Set(log.dirs))"),
        "{err}"
    );
    let o = alter(
        &["--entity-name", "0"],
        "leader.replication.throttled.rate=-5",
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("INVALID_CONFIG"), "{err}");
    // Another broker's resource sent here is refused as Kafka refuses it.
    let o = alter(
        &["--entity-name", "7"],
        "leader.replication.throttled.rate=5",
    );
    assert!(!o.status.success());
    // Survives a restart (persisted in the metadata).
    assert!(broker.stop());
    broker.restart();
    let d = ok(
        &[
            "configs",
            "--bootstrap-server",
            &broker.bootstrap(),
            "--entity-type",
            "brokers",
            "--entity-name",
            "0",
            "--describe",
            "--all",
        ],
        None,
    );
    assert!(d.starts_with("All configs for broker 0 are:"), "{d}");
    assert!(
        d.contains("follower.replication.throttled.rate=2000"),
        "{d}"
    );
    assert!(d.contains("log.dirs="), "{d}");
}

/// `weir cluster commission` adds a broker-only node and moves replicas onto it;
/// `weir cluster decommission` moves them off again, stops and unregisters it. Every
/// acknowledged record reads back after each step; controller voters are refused.
#[test]
fn cluster_commission_and_decommission() {
    use weir_tests::workload;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (port, cport) = (free_port_run(4), free_port_run(3));
    let broker = weir_tests::broker_binary();
    let (p, c) = (port.to_string(), cport.to_string());
    let b = broker.to_str().unwrap();
    let fast = [
        "--override",
        "broker.heartbeat.interval.ms=500",
        "--override",
        "replica.fetch.wait.max.ms=200",
    ];
    let mut start = vec![
        "cluster",
        "start",
        "--nodes",
        "3",
        "--dir",
        d,
        "--port",
        &p,
        "--controller-port",
        &c,
        "--broker",
        b,
        "--shards",
        "1",
    ];
    start.extend_from_slice(&fast);
    assert!(ok(&start, None).contains("cluster up"));
    let bs = format!("127.0.0.1:{port}");
    ok(
        &[
            "topics",
            "--bootstrap-server",
            &bs,
            "--create",
            "--topic",
            "grow",
            "--partitions",
            "6",
            "--replication-factor",
            "2",
        ],
        None,
    );
    let mut cfg = rdkafka::ClientConfig::new();
    cfg.set("bootstrap.servers", &bs)
        .set("broker.address.family", "v4");
    let acked = workload::produce(&cfg, "grow", 0..3000, &[("acks", "all")]);
    assert_eq!(acked.len(), 3000);

    let mut commission = vec![
        "cluster",
        "commission",
        "--dir",
        d,
        "--broker",
        b,
        "--shards",
        "1",
    ];
    commission.extend_from_slice(&fast);
    let out = ok(&commission, None);
    let new_port = port + 3;
    assert!(
        out.contains(&format!(
            "broker 3 joined the cluster at 127.0.0.1:{new_port}"
        )),
        "{out}"
    );
    assert!(out.contains("partitions moved"), "{out}");
    let status = ok(&["cluster", "status", "--dir", d], None);
    assert!(status.contains("4 live brokers"), "{status}");
    let described = ok(
        &[
            "topics",
            "--bootstrap-server",
            &bs,
            "--describe",
            "--topic",
            "grow",
        ],
        None,
    );
    // Kafka's spread over 0-3: broker 3 leads partition 3 and holds 3 replicas in all.
    assert!(
        described.contains("Partition: 3\tLeader: 3\t"),
        "{described}"
    );
    assert_eq!(
        described.matches("Replicas: 3,").count() + described.matches(",3\tIsr").count(),
        3,
        "{described}"
    );
    workload::verify(
        &acked,
        &workload::consume(&cfg, "grow", 6, 3000, std::time::Duration::from_secs(30)),
    );

    // A controller voter cannot go; the new broker can.
    let err = fails(&["cluster", "decommission", "--dir", d, "--node-id", "0"]);
    assert!(err.contains("controller quorum voter"), "{err}");
    let out = ok(
        &["cluster", "decommission", "--dir", d, "--node-id", "3"],
        None,
    );
    assert!(out.contains("broker 3 unregistered"), "{out}");
    assert!(dir.path().join("decommissioned-node-3").exists());
    let status = ok(&["cluster", "status", "--dir", d], None);
    assert!(status.contains("3 live brokers"), "{status}");
    assert!(!status.contains("node 3"), "{status}");
    let described = ok(
        &[
            "topics",
            "--bootstrap-server",
            &bs,
            "--describe",
            "--topic",
            "grow",
        ],
        None,
    );
    assert!(
        !described.contains("3,") && !described.contains(",3"),
        "{described}"
    );
    workload::verify(
        &acked,
        &workload::consume(&cfg, "grow", 6, 3000, std::time::Duration::from_secs(30)),
    );
    let stopped = ok(&["cluster", "stop", "--dir", d], None);
    assert_eq!(stopped.matches(": stopped").count(), 3, "{stopped}");
}
