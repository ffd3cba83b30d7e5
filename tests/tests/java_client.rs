//! The Java reference client (kafka-clients 3.9.1) with its defaults — idempotent producer,
//! consumer group with commits, AdminClient — against a real broker process.

use std::path::{Path, PathBuf};
use std::process::Command;

use weir_tests::Broker;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Compiles the Java program once; returns the classpath.
fn classpath() -> String {
    static CP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CP.get_or_init(|| {
        let root = root();
        let st = Command::new("bash")
            .arg(root.join("scripts/java-deps.sh"))
            .status()
            .expect("bash");
        assert!(st.success(), "fetching the Java client jars failed");
        let deps = root.join("target/java-deps");
        let jars: Vec<String> = [
            "kafka-clients",
            "lz4-java",
            "snappy-java",
            "zstd-jni",
            "slf4j-api",
        ]
        .iter()
        .map(|j| deps.join(format!("{j}.jar")).display().to_string())
        .collect();
        let classes = root.join("target/java-classes");
        std::fs::create_dir_all(&classes).unwrap();
        let st = Command::new("javac")
            .args(["-cp", &jars.join(":"), "-d"])
            .arg(&classes)
            .arg(root.join("tests/java/WeirJavaClient.java"))
            .status()
            .expect("javac (Java 17)");
        assert!(st.success(), "javac failed");
        format!("{}:{}", classes.display(), jars.join(":"))
    })
    .clone()
}

fn run(b: &Broker, topic: &str, n: usize, compression: &str) {
    let out = Command::new("java")
        .args([
            "-cp",
            &classpath(),
            "WeirJavaClient",
            &b.bootstrap(),
            topic,
            &n.to_string(),
            compression,
        ])
        .output()
        .expect("java");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("OK {n}")),
        "Java client failed ({}):\n{stdout}\n{}\nbroker log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        b.log()
    );
}

#[test]
fn java_client_produces_idempotently_and_consumes_in_a_group() {
    let b = Broker::start(2);
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        run(&b, &format!("java-{codec}"), 5_000, codec);
    }
}
