//! kafka-python, installed from PyPI into target/python-kafka once (for PYTHONPATH).

use std::path::PathBuf;
use std::process::Command;

pub const KAFKA_PYTHON: &str = "kafka-python==3.0.12";

/// Installs kafka-python into target/python-kafka once; returns that directory.
pub fn kafka_python() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = crate::java::root().join("target/python-kafka");
        let marker = dir.join(format!(".{KAFKA_PYTHON}"));
        if !marker.exists() {
            let st = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--upgrade", "--target"])
                .arg(&dir)
                .arg(KAFKA_PYTHON)
                .status()
                .expect("python3 -m pip");
            assert!(st.success(), "pip install {KAFKA_PYTHON} failed");
            std::fs::write(&marker, "").unwrap();
        }
        dir
    })
    .clone()
}
