//! The broker starts under this machine's default `ulimit -l` (8 MiB) as an ordinary user,
//! says once what it would need for full buffer registration, and serves clients.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use weir_tests::workload::{consume, produce};
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
