//! The Java reference client (kafka-clients 3.9.1) with its defaults — idempotent producer,
//! consumer group with commits, AdminClient — against a real broker process.

use std::process::Command;

use weir_tests::Broker;

fn classpath() -> String {
    weir_tests::java::classpath("WeirJavaClient")
}

/// Runs the Java program; returns its standard output.
fn run_java(
    bootstrap: &str,
    topic: &str,
    n: usize,
    compression: &str,
    rf: i16,
    log: impl Fn() -> String,
) -> String {
    let out = Command::new("java")
        .args([
            "-cp",
            &classpath(),
            "WeirJavaClient",
            bootstrap,
            topic,
            &n.to_string(),
            compression,
            &rf.to_string(),
        ])
        .output()
        .expect("java");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success()
            && stdout.contains(&format!("OK {n}"))
            && stdout.contains("DESCRIBED 3"),
        "Java client failed ({}):\n{stdout}\n{}\nbroker log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    stdout
}

fn run(b: &Broker, topic: &str, n: usize, compression: &str) {
    let out = run_java(&b.bootstrap(), topic, n, compression, 1, || b.log());
    assert!(out.contains("BROKERS 1 CONTROLLER 0"), "{out}");
}

/// The Java client against three broker processes: it sees three brokers and the active
/// controller, creates a topic with RF 3 (forwarded to the controller), produces idempotently
/// to the partitions' leaders on different brokers and consumes in a group coordinated by the
/// leader of the group's `__consumer_offsets` partition.
#[test]
fn java_client_on_a_three_broker_cluster() {
    let c = weir_tests::Cluster::start(3, &[]);
    let out = run_java(&c.bootstrap(), "java-cluster", 3_000, "lz4", 3, || c.logs());
    assert!(out.contains("BROKERS 3 CONTROLLER "), "{out}");
}

#[test]
fn java_client_produces_idempotently_and_consumes_in_a_group() {
    let b = Broker::start(2);
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        run(&b, &format!("java-{codec}"), 5_000, codec);
    }
}
