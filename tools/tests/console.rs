//! `weir console` end to end: a real broker, the real `weir console` process, and a real
//! headless Chromium driven through chromedriver's W3C WebDriver endpoints (plain HTTP from
//! this file). Screenshots go to target/console-screenshots/. Needs `chromium` and
//! `chromium-driver` (scripts/setup.sh installs them).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use weir_tests::{free_port, Broker};
use weir_tools::admin::Admin;
use weir_tools::consumer::{Consumer, ConsumerConfig};
use weir_tools::producer::{ProducerConfig, RawProducer, RawRecord};

/// A child process killed when the test ends (pass or fail).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request: (status, body). The body is read by its Content-Length, chunked
/// encoding, or to the end (chromedriver keeps connections open even when asked to close).
fn http(method: &str, addr: &str, path: &str, body: Option<(&str, &str)>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (ctype, data) = body.unwrap_or(("text/plain", ""));
    // A server may answer (413) and close before reading a large body: ignore write errors.
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{data}",
        data.len()
    );
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let (head_end, status, length, chunked) = loop {
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(
            n > 0,
            "{method} {path}: the connection closed before a response head"
        );
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..i]).to_ascii_lowercase();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .expect("a status code");
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            break (
                i + 4,
                status,
                length,
                head.contains("transfer-encoding: chunked"),
            );
        }
    };
    loop {
        let have = raw.len() - head_end;
        let complete = match length {
            Some(n) => have >= n,
            None if chunked => raw.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let body = String::from_utf8_lossy(&raw[head_end..]).into_owned();
    let body = if chunked { dechunk(&body) } else { body };
    (status, body)
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = b.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        b = &rest[n + 2..];
    }
    out
}

fn wait_http(addr: &str, path: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() && http("GET", addr, path, None).0 == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not answer GET {path} on {addr}");
}

/// A WebDriver session on a chromedriver process.
struct Browser {
    driver: String,
    session: String,
    shots: PathBuf,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    fn start(driver: &str, shots: PathBuf) -> Browser {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"]
            }
        }}});
        let (status, body) = http(
            "POST",
            driver,
            "/session",
            Some(("application/json", &caps.to_string())),
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status, 200, "new session: {body}");
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        // This run's screenshots only.
        let _ = std::fs::remove_dir_all(&shots);
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            driver: driver.to_string(),
            session,
            shots,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let p = format!("/session/{}{path}", self.session);
        let b = body.to_string();
        let (status, text) = http(
            method,
            &self.driver,
            &p,
            (method == "POST").then_some(("application/json", b.as_str())),
        );
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
        assert_eq!(status, 200, "{method} {path} {b}: {text}");
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({ "url": url }));
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    fn count(&self, css: &str) -> usize {
        self.cmd(
            "POST",
            "/elements",
            json!({"using": "css selector", "value": css}),
        )
        .as_array()
        .unwrap()
        .len()
    }

    fn fill(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/clear"), json!({}));
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        );
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), json!({}));
    }

    fn text_of(&self, css: &str) -> String {
        let e = self.find(css);
        self.cmd("GET", &format!("/element/{e}/text"), Value::Null)
            .as_str()
            .unwrap()
            .to_string()
    }

    fn page_text(&self) -> String {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": "return document.body.innerText", "args": []}),
        )
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    /// Waits (up to 20 s) until the page's text contains `needle`; returns the text.
    fn wait_text(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = self.page_text();
            if t.contains(needle) {
                return t;
            }
            if Instant::now() > deadline {
                self.shot("failure");
                panic!("the page never showed {needle:?}; it shows:\n{t}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn shot(&self, name: &str) {
        let b64 = self.cmd("GET", "/screenshot", Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(
            "DELETE",
            &self.driver,
            &format!("/session/{}", self.session),
            None,
        );
    }
}

fn screenshots_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("console-screenshots")
}

fn produce(bs: &str, topic: &str, key: &str, value: Vec<u8>) {
    let mut cfg = ProducerConfig::new(bs);
    cfg.set("linger.ms", "0").unwrap();
    let p = RawProducer::new(cfg, Vec::new()).unwrap();
    let f = p
        .send(RawRecord {
            topic: topic.into(),
            partition: Some(0),
            key: Some(Bytes::from(key.to_string())),
            value: Some(Bytes::from(value)),
            headers: Vec::new(),
            timestamp: weir_tools::now_ms(),
        })
        .unwrap();
    p.flush();
    f.get().unwrap();
    p.close();
}

/// `weir console` on `listen`; waits until it serves its overview.
fn console(bs: &str, listen: &str, metrics_url: &str) -> Proc {
    let p = Proc(
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["console", "--bootstrap-server", bs, "--listen", listen])
            .args(["--metrics-url", metrics_url])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting weir console"),
    );
    wait_http(listen, "/", "weir console");
    p
}

#[test]
fn console_in_a_browser_topics_produce_messages_groups_and_bad_input() {
    let started = Instant::now();
    let conf = tempfile::tempdir().unwrap();
    let props = conf.path().join("server.properties");
    std::fs::write(&props, "group.initial.rebalance.delay.ms=0\n").unwrap();
    let b = Broker::start_with(1, &["--config", props.to_str().unwrap()]);
    let bs = b.bootstrap();
    // Includes rebuilding the broker when its sources changed.
    let broker_ready = started.elapsed();

    let console_addr = format!("127.0.0.1:{}", free_port());
    let metrics = format!("http://127.0.0.1:{}/metrics", b.metrics_port);
    let _console = console(&bs, &console_addr, &metrics);
    eprintln!("broker {bs}, console http://{console_addr}");
    // A second console whose metrics endpoint is down: it says so and serves the page.
    let other_addr = format!("127.0.0.1:{}", free_port());
    let dead = format!("http://127.0.0.1:{}/metrics", free_port());
    let _other = console(&bs, &other_addr, &dead);

    let driver_addr = format!("127.0.0.1:{}", free_port());
    let _driver = Proc(
        Command::new("chromedriver")
            .arg(format!(
                "--port={}",
                driver_addr.rsplit(':').next().unwrap()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver (run scripts/setup.sh to install chromium-driver)"),
    );
    wait_http(&driver_addr, "/status", "chromedriver");
    let w = Browser::start(&driver_addr, screenshots_dir());
    let base = format!("http://{console_addr}");
    let browser_ready = started.elapsed();

    // Cluster overview.
    w.goto(&format!("{base}/"));
    let t = w.wait_text("Controller");
    assert!(t.contains(&bs) && t.contains("controller"), "{t}");
    assert!(t.contains("Fetch v"), "API versions shown: {t}");
    w.shot("01-overview");
    let (s, body) = http("GET", &other_addr, "/topics", None);
    assert_eq!(s, 200);
    assert!(body.contains("metrics unavailable from"), "{body}");

    // Create a topic through the form.
    w.goto(&format!("{base}/topics"));
    w.fill("#create-topic input[name=name]", "ui-orders");
    w.fill("#create-topic input[name=partitions]", "2");
    w.click("#create-topic button");
    let t = w.wait_text("Created topic ui-orders.");
    assert_eq!(w.count("#partitions tbody tr"), 2, "{t}");
    w.shot("02-topic-created");
    w.fill("input[name=count]", "3");
    w.click("form[action=\"/topics/ui-orders/partitions\"] button");
    w.wait_text("Topic ui-orders now has 3 partitions.");
    assert_eq!(w.count("#partitions tbody tr"), 3);
    // Again: the broker's refusal is shown with the form.
    w.goto(&format!("{base}/topics"));
    w.fill("#create-topic input[name=name]", "ui-orders");
    w.click("#create-topic button");
    w.wait_text("TOPIC_ALREADY_EXISTS");

    // Produce a record with a key, a JSON value and a header to partition 0.
    w.goto(&format!("{base}/topics/ui-orders/produce"));
    w.fill("#produce input[name=key]", "order-42");
    w.fill(
        "#produce textarea[name=value]",
        r#"{"item":"widget","qty":3}"#,
    );
    w.fill("#produce textarea[name=headers]", "source: console-test");
    w.fill("#produce input[name=partition]", "0");
    w.click("#produce button");
    w.wait_text("Produced to partition 0 at offset 0.");
    w.shot("03-produced");

    // More records from the library: not UTF-8, 1 MB (cut for display).
    produce(&bs, "ui-orders", "binary", vec![0xff, 0xfe, 0x00, 0x41]);
    std::thread::sleep(Duration::from_millis(5));
    let before_big = weir_tools::now_ms();
    produce(&bs, "ui-orders", "big", vec![b'x'; 1_000_000]);

    // The messages page, pretty JSON: the record with its key, value and header.
    w.goto(&format!("{base}/topics/ui-orders/messages?format=json"));
    let t = w.wait_text("order-42");
    assert!(
        t.contains("\"item\": \"widget\"") && t.contains("\"qty\": 3"),
        "pretty JSON: {t}"
    );
    assert!(t.contains("source") && t.contains("console-test"), "{t}");
    assert!(t.contains("The 3 newest records, newest first"), "{t}");
    assert!(
        t.contains("not UTF-8: shown as hex") && t.contains("ff fe 00 41"),
        "{t}"
    );
    assert!(t.contains("showing the first 4096 of 1000000 bytes"), "{t}");
    assert!(!t.contains(&"x".repeat(4097)), "the 1 MB value is cut");
    // Newest first: the big record's row is above order-42's.
    assert!(t.find("big").unwrap() < t.find("order-42").unwrap(), "{t}");
    w.shot("04-messages");
    // From an offset, as hex.
    w.goto(&format!(
        "{base}/topics/ui-orders/messages?partition=0&from=offset&offset=0&limit=1&format=hex"
    ));
    let t = w.wait_text("1 record from offset 0");
    assert!(t.contains("7b 22 69 74 65 6d"), "hex of {{\"item: {t}");

    // From a time, through the form: only the record produced after it.
    w.goto(&format!("{base}/topics/ui-orders/messages"));
    w.click("select[name=partition] option[value=\"0\"]");
    w.click("select[name=from] option[value=timestamp]");
    w.fill("input[name=timestamp]", &before_big.to_string());
    w.click("#messages-form button");
    let t = w.wait_text("1 record from");
    assert!(t.contains("big") && !t.contains("order-42"), "{t}");

    // Live tail: a record produced after it starts appears without a reload.
    w.goto(&format!("{base}/topics/ui-orders/messages"));
    w.click("#tail-toggle");
    w.wait_text("Live:");
    produce(&bs, "ui-orders", "tail-1", b"fresh".to_vec());
    w.wait_text("tail-1");
    w.shot("05-live-tail");
    w.click("#tail-toggle");

    // A group with a committed offset: partition 0 ends at 4, committed 1, lag 3.
    let mut admin = Admin::connect(&bs).unwrap();
    admin
        .reset_offsets("console-group", &[(("ui-orders".into(), 0), 1)])
        .unwrap();
    w.goto(&format!("{base}/groups"));
    w.click("a[href=\"/groups/console-group\"]");
    w.wait_text("Offsets and lag");
    assert_eq!(w.text_of("#group-state"), "Empty");
    assert_eq!(w.text_of("tr[data-tp=\"ui-orders-0\"] td.committed"), "1");
    assert_eq!(w.text_of("tr[data-tp=\"ui-orders-0\"] td.end"), "4");
    assert_eq!(w.text_of("tr[data-tp=\"ui-orders-0\"] td.lag"), "3");
    assert_eq!(w.text_of("#total-lag"), "3");
    w.shot("06-group-lag");
    // Reset to earliest through the form: every partition committed at 0, lag 4.
    w.click("#reset button");
    w.wait_text("Offsets reset.");
    assert_eq!(w.text_of("tr[data-tp=\"ui-orders-0\"] td.lag"), "4");
    assert_eq!(w.text_of("tr[data-tp=\"ui-orders-1\"] td.committed"), "0");
    assert_eq!(w.text_of("#total-lag"), "4");

    // With a live member the group shows it and its assignment, and a reset is refused.
    let stop = Arc::new(AtomicBool::new(false));
    let member = {
        let (bs, stop) = (bs.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut cfg = ConsumerConfig::new(&bs);
            cfg.group_id = Some("console-group".into());
            cfg.client_id = "console-member".into();
            cfg.enable_auto_commit = false;
            cfg.session_timeout_ms = 10_000;
            cfg.heartbeat_interval = Duration::from_millis(300);
            let mut c = Consumer::new(cfg).unwrap();
            c.subscribe(&["ui-orders"]).unwrap();
            while !stop.load(Ordering::Relaxed) {
                c.poll(Duration::from_millis(100)).unwrap();
            }
            c.close().unwrap();
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        w.goto(&format!("{base}/groups/console-group"));
        if w.text_of("#group-state") == "Stable" {
            break;
        }
        assert!(Instant::now() < deadline, "the group never became Stable");
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = w.wait_text("console-member");
    assert!(t.contains("ui-orders-0, ui-orders-1, ui-orders-2"), "{t}");
    assert!(
        t.contains("Offsets can be reset only while the group has no members"),
        "{t}"
    );
    w.shot("07-group-member");
    w.click("#reset button");
    w.wait_text("NON_EMPTY_GROUP");
    stop.store(true, Ordering::Relaxed);
    member.join().unwrap();

    // The throughput sparkline from the broker's weir_topic_records_in_total (the page
    // script refreshes it every few seconds; the console scrapes every 2 s).
    w.goto(&format!("{base}/topics"));
    w.wait_text("rec/s");
    assert!(w.count("tr[data-topic=\"ui-orders\"] .spark svg polyline") == 1);
    w.shot("08-sparkline");

    // The topic's configs.
    w.goto(&format!("{base}/topics/ui-orders/configs"));
    let t = w.wait_text("retention.ms");
    assert!(
        t.contains("DEFAULT_CONFIG") || t.contains("STATIC_BROKER_CONFIG"),
        "{t}"
    );

    // Bad input: clear messages, never a 500.
    w.goto(&format!("{base}/topics/no-such-topic"));
    w.wait_text("Topic no-such-topic does not exist");
    w.shot("09-missing-topic");
    let a = console_addr.as_str();
    let (s, body) = http("GET", a, "/topics/no-such-topic/messages", None);
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("Topic no-such-topic does not exist"));
    let (s, body) = http(
        "GET",
        a,
        "/topics/ui-orders/messages?partition=0&from=offset&offset=999",
        None,
    );
    assert_eq!(s, 200);
    assert!(body.contains("Offset 999 is past the end of partition 0 (its next offset is 4)"));
    let (s, body) = http("GET", a, "/topics/ui-orders/messages?partition=abc", None);
    assert_eq!(s, 400);
    assert!(
        body.contains("Partition: &quot;abc&quot; is not a number"),
        "{body}"
    );
    let (s, body) = http(
        "GET",
        a,
        "/topics/ui-orders/messages?from=timestamp&timestamp=soon",
        None,
    );
    assert_eq!(s, 400);
    assert!(body.contains("is not YYYY-MM-DDTHH:MM"), "{body}");
    let form = (
        "application/x-www-form-urlencoded",
        "key=k&value=v&partition=7",
    );
    let (s, body) = http("POST", a, "/topics/ui-orders/produce", Some(form));
    assert_eq!(s, 400);
    assert!(body.contains("Partition 7 does not exist"), "{body}");
    let form = ("application/x-www-form-urlencoded", "value=%zz&value_hex=1");
    let (s, body) = http("POST", a, "/topics/ui-orders/produce", Some(form));
    assert_eq!(s, 400);
    assert!(body.contains("hex"), "{body}");
    let form = (
        "application/x-www-form-urlencoded",
        "name=%3Cb%3Ebad+name&partitions=1",
    );
    let (s, body) = http("POST", a, "/topics", Some(form));
    assert_eq!(s, 400);
    assert!(
        body.contains("&lt;b&gt;bad name") && !body.contains("<b>bad"),
        "escaped: {body}"
    );
    let (s, body) = http("GET", a, "/groups/no-such-group", None);
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("Consumer group no-such-group does not exist"));
    let (s, _) = http("GET", a, "/api/topics/no-such-topic/tail", None);
    assert_eq!(s, 404);
    let huge = "v".repeat(weir_tools::console::http::REQUEST_BODY_MAX_BYTES + 1);
    let (s, _) = http(
        "POST",
        a,
        "/topics/ui-orders/produce",
        Some(("application/x-www-form-urlencoded", &huge)),
    );
    assert_eq!(s, 413);
    let reset = |body: &str| {
        http(
            "POST",
            a,
            "/groups/console-group/reset",
            Some(("application/x-www-form-urlencoded", body)),
        )
    };
    let (s, body) = reset("topic=ui-orders&to=offset&offset=99");
    assert_eq!(s, 400);
    assert!(
        body.contains("Offset 99 is outside partition 0 of ui-orders (offsets 0 to 4)"),
        "{body}"
    );
    let (s, body) = reset("topic=ui-orders&to=sideways");
    assert_eq!(s, 400, "{body}");
    assert_eq!(reset("topic=ui-orders&to=latest").0, 303);
    w.goto(&format!("{base}/groups/console-group"));
    assert_eq!(w.text_of("#total-lag"), "0");
    // A form posted from another site's page is refused (cross-site request forgery).
    let mut sock = TcpStream::connect(a).unwrap();
    write!(
        sock,
        "POST /topics/ui-orders/delete HTTP/1.1\r\nHost: {a}\r\nOrigin: http://evil.example\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 17\r\n\
         Connection: close\r\n\r\nconfirm=ui-orders"
    )
    .unwrap();
    let mut answer = String::new();
    sock.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    // Delete with the confirmation step.
    w.goto(&format!("{base}/topics/ui-orders"));
    w.click("a[href=\"/topics/ui-orders/delete\"]");
    w.wait_text("This cannot be undone.");
    w.fill("#delete-topic input[name=confirm]", "ui-orders");
    w.click("#delete-topic button");
    w.wait_text("Topic deleted.");
    assert_eq!(w.count("#topics tbody tr"), 0);
    w.shot("10-deleted");

    eprintln!(
        "console test: broker ready after {broker_ready:?}, browser after {browser_ready:?}, done after {:?}",
        started.elapsed()
    );
}
