//! The broker starts under this machine's default `ulimit -l` (8 MiB) as an ordinary user,
//! says once what it would need for full buffer registration, and serves clients. It starts
//! from the backup copy of its metadata when `weir-metadata.json` is half written or empty,
//! and refuses to start empty over partition directories when no copy is readable.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use weir_tests::workload::{consume, produce, verify};
use weir_tests::{admin, broker_binary, eventually, free_port, Broker};

#[test]
fn starts_as_an_ordinary_user_under_an_8_mib_memlock_limit() {
    let root = unsafe { geteuid() } == 0;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // A copy of the binary that an unprivileged user can execute wherever the target dir is.
    let bin = dir.path().join("broker");
    std::fs::copy(broker_binary(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut cmd = Command::new("prlimit");
    cmd.arg("--memlock=8388608:8388608");
    if root {
        cmd.args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]);
    }
    cmd.arg(&bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            "2",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(log);
    let mut child = cmd.spawn().expect("prlimit/setpriv (util-linux)");
    let up = eventually(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let text = || std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(up, "broker did not start:\n{}", text());
    std::thread::sleep(Duration::from_millis(200));

    // Serve a real round trip through the helper's clients (same port, same process).
    let b = Broker::attach(port);
    admin::create(&b, "ulimit", 2, 1, &[]).unwrap();
    let acked = produce(&b.client_config(), "ulimit", 0..1000, &[("acks", "all")]);
    let got = consume(
        &b.client_config(),
        "ulimit",
        2,
        1000,
        Duration::from_secs(30),
    );
    weir_tests::workload::verify(&acked, &got);
    let _ = child.kill();
    let _ = child.wait();
    let log = text();
    assert_eq!(
        log.matches("ulimit -l is too low").count(),
        1,
        "said once what it needs:\n{log}"
    );
    assert!(log.contains("accepting connections"));
}

extern "C" {
    fn geteuid() -> u32;
}

fn truncate(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn a_half_written_or_empty_metadata_file_falls_back_to_the_backup_copy() {
    let mut b = Broker::start(2);
    // Two creations: the second is the newest metadata change, the one a fallback must keep.
    admin::create(&b, "first", 2, 1, &[]).unwrap();
    admin::create(&b, "second", 3, 1, &[("retention.ms", "-1")]).unwrap();
    let first = produce(&b.client_config(), "first", 0..500, &[("acks", "all")]);
    let second = produce(&b.client_config(), "second", 0..700, &[("acks", "all")]);
    let path = b.data_dir().join("weir-metadata.json");
    for (round, what) in ["half its length", "0 bytes"].iter().enumerate() {
        assert!(b.stop());
        let len = std::fs::metadata(&path).unwrap().len();
        let cut = if round == 0 { len / 2 } else { 0 };
        truncate(&path, cut);
        b.restart();
        let log = b.log();
        let warned = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("weir-metadata.json cannot be used"))
            .count();
        assert_eq!(
            warned,
            round + 1,
            "a WARN says the primary ({what}) was not used:\n{log}"
        );
        assert!(log.contains("weir-metadata.backup.json"), "{log}");
        // Every topic is there with its records.
        let got = consume(&b.client_config(), "first", 2, 500, Duration::from_secs(30));
        verify(&first, &got);
        let got = consume(
            &b.client_config(),
            "second",
            3,
            700,
            Duration::from_secs(30),
        );
        verify(&second, &got);
        // The primary was rewritten from the backup and is whole again.
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
            .expect("weir-metadata.json parses after the start");
        assert_eq!(
            meta["topics"]["second"]["partitions"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(meta["topics"]["second"]["configs"]["retention.ms"], "-1");
        assert!(b.data_dir().join("weir-metadata.json.unreadable").exists());
    }
    // The broker still changes metadata after a fallback.
    admin::create(&b, "third", 1, 1, &[]).unwrap();
    let third = produce(&b.client_config(), "third", 0..10, &[("acks", "all")]);
    verify(
        &third,
        &consume(&b.client_config(), "third", 1, 10, Duration::from_secs(30)),
    );
    assert!(b.stop());
}

#[test]
fn no_readable_metadata_over_partition_directories_refuses_to_start() {
    let mut b = Broker::start(1);
    admin::create(&b, "kept", 1, 1, &[]).unwrap();
    produce(&b.client_config(), "kept", 0..10, &[("acks", "all")]);
    assert!(b.stop());
    let data = b.data_dir();
    truncate(&data.join("weir-metadata.json"), 7);
    truncate(&data.join("weir-metadata.backup.json"), 0);
    let log_path = b.dir.path().join("refused.log");
    let mut child = Command::new(broker_binary())
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&data)
        .args(["--shards", "1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let exited = eventually(Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        exited && !status.success(),
        "started with no metadata:\n{err}"
    );
    assert!(err.contains("refusing to start"), "{err}");
    assert!(
        err.contains("kept-0"),
        "names the partition directories:\n{err}"
    );
    // Nothing was touched: restoring a copy brings everything back.
    assert_eq!(
        std::fs::metadata(data.join("weir-metadata.json"))
            .unwrap()
            .len(),
        7
    );
    assert!(data.join("kept-0").is_dir());
}
