//! The bench binary against a real broker process.

use std::process::Command;

use weir_tests::Broker;

fn bench(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[test]
fn produce_sweep_json_plot_librdkafka_consume_and_e2e() {
    let b = Broker::start(2);
    let bs = b.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let svg = dir.path().join("r.svg");
    let (ok, out, err) = bench(&[
        "produce",
        "--bootstrap-server",
        &bs,
        "--topic",
        "sweep",
        "--duration",
        "2s",
        "--acks",
        "all",
        "--sweep",
        "linger=0,20",
        "--sweep",
        "compression=none,lz4",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().count(),
        5,
        "header and one row per sweep point:\n{out}"
    );
    assert!(
        err.contains("records/s") && err.contains("p99"),
        "progress lines:\n{err}"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    for r in results {
        assert!(r["records"].as_u64().unwrap() > 0);
        assert_eq!(r["errors"], 0);
        assert!(
            r["latency_ms"]["p99"].as_f64().unwrap() >= r["latency_ms"]["p50"].as_f64().unwrap()
        );
        assert_eq!(r["config"]["acks"], "all");
    }
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));

    // Open loop at a fixed rate with the librdkafka client.
    let (ok, out, err) = bench(&[
        "produce",
        "--bootstrap-server",
        &bs,
        "--topic",
        "rd",
        "--client",
        "librdkafka",
        "--rate",
        "2000",
        "--duration",
        "2s",
        "--keys",
        "100",
    ]);
    assert!(ok, "{err}");
    let rate: f64 = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .rev()
        .nth(7)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        rate > 1000.0 && rate < 2600.0,
        "about the offered 2000 records/s: {rate}\n{out}"
    );

    let (ok, out, err) = bench(&[
        "consume",
        "--bootstrap-server",
        &bs,
        "--topic",
        "rd",
        "--idle",
        "1s",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("earliest") && out.contains("tailing"), "{out}");

    let (ok, out, err) = bench(&[
        "e2e",
        "--bootstrap-server",
        &bs,
        "--topic",
        "e2e",
        "--rate",
        "1000",
        "--duration",
        "2s",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .any(|x| x.parse::<f64>().is_ok_and(|v| v > 0.0)),
        "{out}"
    );
}

#[test]
fn payload_files_are_replayed_as_lines_and_as_length_prefixed_binary() {
    let b = Broker::start(1);
    let bs = b.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("p.txt");
    std::fs::write(&lines, "alpha\nbeta-beta\ngamma-gamma-gamma\n").unwrap();
    let bin = dir.path().join("p.bin");
    let mut v = Vec::new();
    for p in [&b"one"[..], &[0u8, 1, 2, 255][..]] {
        v.extend_from_slice(&(p.len() as u32).to_be_bytes());
        v.extend_from_slice(p);
    }
    std::fs::write(&bin, v).unwrap();
    for (file, format, topic) in [(&lines, "lines", "replay-l"), (&bin, "binary", "replay-b")] {
        let (ok, out, err) = bench(&[
            "produce",
            "--bootstrap-server",
            &bs,
            "--topic",
            topic,
            "--partitions",
            "1",
            "--records",
            "30",
            "--payload-file",
            file.to_str().unwrap(),
            "--payload-format",
            format,
        ]);
        assert!(ok, "{err}");
        assert!(
            out.lines().nth(1).unwrap().trim_end().ends_with(" 0"),
            "no errors: {out}"
        );
    }
    // What was stored is exactly the replayed payloads, in order.
    let mut cfg = weir_tools::consumer::ConsumerConfig::new(&bs);
    cfg.auto_offset_reset = weir_tools::consumer::OffsetReset::Earliest;
    let mut c = weir_tools::consumer::Consumer::new(cfg).unwrap();
    c.assign(vec![("replay-l".into(), 0)]).unwrap();
    let mut got = Vec::new();
    while got.len() < 30 {
        got.extend(
            c.poll(std::time::Duration::from_millis(200))
                .unwrap()
                .into_iter()
                .map(|r| String::from_utf8(r.value.unwrap().to_vec()).unwrap()),
        );
    }
    assert_eq!(&got[..3], &["alpha", "beta-beta", "gamma-gamma-gamma"]);
    let truncated = dir.path().join("bad.bin");
    std::fs::write(&truncated, [0u8, 0, 0, 9, 1]).unwrap();
    let (ok, _, err) = bench(&[
        "produce",
        "--bootstrap-server",
        &bs,
        "--records",
        "1",
        "--payload-file",
        truncated.to_str().unwrap(),
        "--payload-format",
        "binary",
    ]);
    assert!(!ok && err.contains("truncated"), "{err}");
}

#[test]
fn failed_sends_are_counted_and_fail_the_run() {
    let mut b = Broker::start(1);
    let bs = b.bootstrap();
    let (ok, _, err) = bench(&[
        "produce",
        "--bootstrap-server",
        &bs,
        "--topic",
        "t",
        "--records",
        "100",
    ]);
    assert!(ok, "{err}");
    // Records over the broker's message.max.bytes are refused: counted, shown, non-zero exit.
    let (ok, out, err) = bench(&[
        "produce",
        "--bootstrap-server",
        &bs,
        "--topic",
        "t",
        "--records",
        "20",
        "--record-size",
        "2000000",
        "--batch-size",
        "4m",
    ]);
    assert!(!ok, "a run with failed sends says so");
    assert!(err.contains("sends failed"), "{err}");
    let row = out.lines().nth(1).unwrap();
    assert!(row.trim_end().ends_with("20"), "errors column: {row}");
    b.kill9();
}
