//! Kafka transactions end to end: transactional producers of three client libraries (the Java
//! reference client kafka-clients 3.9.1, librdkafka, kafka-python), read_committed consumers,
//! consume-transform-produce with sendOffsetsToTransaction, zombie fencing, and kill -9 of a
//! broker or of the transaction coordinator in the middle of a transaction.
//!
//! The Java side is one program with sub-commands, tests/java/WeirTxnClient.java; it prints
//! machine-readable lines parsed here.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_protocol::messages::{ApiKey, FindCoordinatorRequest, FindCoordinatorResponse};
use kafka_protocol::protocol::StrBytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use weir_tests::{admin, eventually, raw, Broker, Cluster};

// ------------------------------------------------------------------------------------------
// The Java program

fn classpath() -> String {
    weir_tests::java::classpath("WeirTxnClient")
}

/// A running `java WeirTxnClient ...`: its standard output collected line by line.
struct Java {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Java {
    fn spawn(args: &[&str]) -> Java {
        let mut child = Command::new("java")
            .args(["-cp", &classpath(), "WeirTxnClient"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("java");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let (o, stdout) = (out.clone(), child.stdout.take().unwrap());
        let (e, stderr) = (err.clone(), child.stderr.take().unwrap());
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    o.lock().unwrap().push(line);
                }
            }),
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut e = e.lock().unwrap();
                    e.push_str(&line);
                    e.push('\n');
                }
            }),
        ];
        Java {
            what: args.join(" "),
            stdin: child.stdin.take(),
            child,
            out,
            err,
            readers,
        }
    }

    fn stdout(&self) -> String {
        self.out.lock().unwrap().join("\n")
    }

    fn describe(&self) -> String {
        format!(
            "java WeirTxnClient {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.stdout(),
            self.err.lock().unwrap()
        )
    }

    /// Waits for a line starting with `prefix`; panics (with `log()`) after `timeout` or if
    /// the program exited first.
    fn wait_line(&mut self, prefix: &str, timeout: Duration, log: impl Fn() -> String) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .out
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(prefix))
            {
                return l.clone();
            }
            let exited = self.child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                // Let the readers drain what is left.
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "no {prefix:?} line from the Java program ({}):\n{}\nbroker log:\n{}",
                    exited.map_or("still running".to_string(), |s| s.to_string()),
                    self.describe(),
                    log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the program to exit (killing it after `timeout`); its exit status (None when
    /// it had to be killed) and standard output.
    fn finish(mut self, timeout: Duration) -> (Option<ExitStatus>, String) {
        self.stdin.take();
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                self.kill9();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        (status, self.stdout())
    }

    /// Runs the program to completion; panics unless it exits 0. Returns its standard output.
    fn run(args: &[&str], timeout: Duration, log: impl Fn() -> String) -> String {
        let j = Java::spawn(args);
        let what = j.what.clone();
        let err = j.err.clone();
        let (status, out) = j.finish(timeout);
        assert!(
            status.is_some_and(|s| s.success()),
            "java WeirTxnClient {what} failed ({status:?}):\n--- stdout ---\n{out}\n--- stderr ---\n{}\nbroker log:\n{}",
            err.lock().unwrap(),
            log()
        );
        out
    }
}

impl Drop for Java {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One record as `WeirTxnClient read` printed it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rec {
    partition: i32,
    offset: i64,
    key: String,
    value: String,
}

struct ReadBack {
    recs: Vec<Rec>,
    /// Every partition's last stable offset reached its high watermark: no transaction open.
    stable: bool,
}

impl ReadBack {
    fn values(&self) -> Vec<String> {
        let mut v: Vec<String> = self.recs.iter().map(|r| r.value.clone()).collect();
        v.sort();
        v
    }
}

/// `WeirTxnClient read`: waits up to `timeout` for no transaction to be open, then reads the
/// whole topic at `isolation` ("read_committed" or "read_uncommitted").
fn java_read(
    bootstrap: &str,
    topic: &str,
    isolation: &str,
    timeout: Duration,
    log: impl Fn() -> String,
) -> ReadBack {
    let ms = timeout.as_millis().to_string();
    let out = Java::run(
        &["read", bootstrap, topic, isolation, &ms],
        timeout + Duration::from_secs(120),
        log,
    );
    let mut recs = Vec::new();
    let mut end = None;
    for l in out.lines() {
        let w: Vec<&str> = l.splitn(5, ' ').collect();
        match w[0] {
            "REC" => recs.push(Rec {
                partition: w[1].parse().unwrap(),
                offset: w[2].parse().unwrap(),
                key: w[3].to_string(),
                value: w[4].to_string(),
            }),
            "END" => end = Some((w[1].parse::<usize>().unwrap(), w[2] == "true")),
            _ => {}
        }
    }
    let (n, stable) = end.unwrap_or_else(|| panic!("no END line:\n{out}"));
    assert_eq!(n, recs.len());
    ReadBack { recs, stable }
}

/// Values "<tag>-t<t>-i<i>" of transactions `txns` with `per` records each, sorted.
fn txn_values(tag: &str, txns: impl IntoIterator<Item = usize>, per: usize) -> Vec<String> {
    let mut v: Vec<String> = txns
        .into_iter()
        .flat_map(|t| (0..per).map(move |i| format!("{tag}-t{t}-i{i}")))
        .collect();
    v.sort();
    v
}

/// (t, i) of a value "<tag>-t<t>-i<i>".
fn txn_and_index(v: &str) -> (usize, usize) {
    let mut parts = v.rsplitn(3, '-');
    let i = parts
        .next()
        .unwrap()
        .trim_start_matches('i')
        .parse()
        .unwrap();
    let t = parts
        .next()
        .unwrap()
        .trim_start_matches('t')
        .parse()
        .unwrap();
    (t, i)
}

/// Records of each partition come back in offset order, which is the order they were sent in
/// (transaction, then index).
fn assert_in_send_order(recs: &[Rec]) {
    let mut by_partition: BTreeMap<i32, Vec<&Rec>> = BTreeMap::new();
    for r in recs {
        by_partition.entry(r.partition).or_default().push(r);
    }
    for (p, rs) in by_partition {
        for w in rs.windows(2) {
            assert!(
                w[0].offset < w[1].offset
                    && txn_and_index(&w[0].value) < txn_and_index(&w[1].value),
                "partition {p}: {:?} then {:?}",
                w[0],
                w[1]
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// librdkafka helpers

/// Reads partitions 0..partitions of `topic` from the beginning at `isolation` through
/// librdkafka until `expected` records came (panics after `timeout`), then for 1.5 s more to
/// catch any extra. Returns (partition, offset, value) in the order read.
fn rd_read(
    cfg: &ClientConfig,
    topic: &str,
    partitions: i32,
    isolation: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<(i32, i64, String)> {
    let mut cfg = cfg.clone();
    cfg.set("group.id", "txn-check")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .set("fetch.wait.max.ms", "100");
    let c: BaseConsumer = cfg.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut quiet_until: Option<Instant> = None;
    loop {
        if got.len() >= expected && quiet_until.is_none() {
            quiet_until = Some(Instant::now() + Duration::from_millis(1500));
        }
        if quiet_until.is_some_and(|q| Instant::now() > q) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{isolation}: read {} of {expected} records: {got:?}",
            got.len()
        );
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => got.push((
                m.partition(),
                m.offset(),
                String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap(),
            )),
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    got
}

fn sorted_values(v: &[(i32, i64, String)]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|x| x.2.clone()).collect();
    v.sort();
    v
}

/// Produces `n` records non-transactionally: key "k<i>", value "in-<i>", partition i % parts.
fn produce_plain(b: &Broker, topic: &str, n: usize, parts: i32) {
    let p: BaseProducer = b
        .client_config()
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for i in 0..n {
        let (k, v) = (format!("k{i}"), format!("in-{i}"));
        p.send(
            BaseRecord::to(topic)
                .partition(i as i32 % parts)
                .key(&k)
                .payload(&v),
        )
        .map_err(|(e, _)| e)
        .expect("send");
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(60)).expect("flush");
}

// ------------------------------------------------------------------------------------------
// 1. Java: commit and abort on one broker

/// The Java transactional producer (transactional.id t1, acks=all, idempotent) writes 20
/// transactions of 50 records over the 3 partitions of `txn`, committing the even ones and
/// aborting the odd ones (each flushed before its end, so aborted records are in the log).
/// Proves, as the Java program checks: while a transaction is open, ListOffsets
/// read_committed (the last stable offset) stops at its first record in each partition while
/// read_uncommitted (the high watermark) is past its last one; each transaction ends with
/// exactly one control record; once the last (aborted) transaction ends, the last stable
/// offset reaches the high watermark; a read_committed consumer (relying on the fetch's
/// aborted_transactions) reads exactly the 500 committed records, each once, at the offsets
/// the producer was told, in order, and finishes; a read_uncommitted one reads all 1000 with
/// the control records skipped. librdkafka's read_committed consumer agrees.
#[test]
fn java_transactions_commit_and_abort_read_committed_sees_only_committed() {
    let b = Broker::start(2);
    admin::create(&b, "txn", 3, 1, &[]).unwrap();
    let out = Java::run(
        &["commit-abort", &b.bootstrap(), "txn", "t1", "20", "50"],
        Duration::from_secs(240),
        || b.log(),
    );
    assert!(out.lines().any(|l| l == "OK 500 1000"), "{out}");

    let got = rd_read(
        &b.client_config(),
        "txn",
        3,
        "read_committed",
        500,
        Duration::from_secs(60),
    );
    assert_eq!(
        sorted_values(&got),
        txn_values("ca", (0..20).step_by(2), 50),
        "librdkafka read_committed: the committed records, each once"
    );
}

// ------------------------------------------------------------------------------------------
// 2. Consume-transform-produce across a kill -9 of the transformer

/// Exactly-once consume-transform-produce (KIP-98/KIP-447): 2000 records produced
/// non-transactionally to `xin`; a Java transformer (group `xform`, read_committed, no auto
/// commit, transactional.id xf) turns each poll's batch into one transaction producing
/// value + "-out" (same key) to `xout` and committing the consumed offsets with
/// sendOffsetsToTransaction. After 5 commits it leaves its 6th transaction open with records
/// and offsets sent, and is killed -9. A new incarnation with the same transactional.id fences
/// it, which aborts the open transaction and its pending offsets, resumes from the committed
/// offsets and finishes. Proves: read_committed of `xout` holds each input's result exactly
/// once (while read_uncommitted also holds the aborted attempt: the test did abort something),
/// and the group's committed offsets cover the input.
#[test]
fn consume_transform_produce_is_exactly_once_across_a_kill_9() {
    let b = Broker::start(2);
    admin::create(&b, "xin", 3, 1, &[]).unwrap();
    admin::create(&b, "xout", 3, 1, &[]).unwrap();
    const N: usize = 2000;
    produce_plain(&b, "xin", N, 3);
    let bs = b.bootstrap();
    let n = N.to_string();

    let mut first = Java::spawn(&["transform", &bs, "xin", "xout", "xform", "xf", &n, "5"]);
    first.wait_line("OPEN", Duration::from_secs(120), || b.log());
    let committed_before = first
        .stdout()
        .lines()
        .filter(|l| l.starts_with("COMMITTED"))
        .count();
    assert_eq!(committed_before, 5, "{}", first.describe());
    first.kill9();

    let out = Java::run(
        &["transform", &bs, "xin", "xout", "xform", "xf", &n],
        Duration::from_secs(240),
        || b.log(),
    );
    let rebalanced = out.lines().filter(|l| l.starts_with("REBALANCED")).count();
    if rebalanced > 0 {
        eprintln!("the restarted transformer aborted {rebalanced} batches on rebalances:\n{out}");
    }
    assert!(
        out.lines().any(|l| l == format!("DONE {N}")),
        "the restarted transformer consumed from the committed offsets to the end:\n{out}"
    );

    let committed = java_read(
        &bs,
        "xout",
        "read_committed",
        Duration::from_secs(60),
        || b.log(),
    );
    assert!(committed.stable, "a transaction stays open on xout");
    let mut want: Vec<String> = (0..N).map(|i| format!("in-{i}-out")).collect();
    want.sort();
    assert_eq!(
        committed.values(),
        want,
        "read_committed: every input's result exactly once"
    );
    for r in &committed.recs {
        let i: usize = r.value["in-".len()..r.value.len() - "-out".len()]
            .parse()
            .unwrap();
        assert_eq!(r.key, format!("k{i}"), "{r:?} keeps its input's key");
    }
    let all = java_read(
        &bs,
        "xout",
        "read_uncommitted",
        Duration::from_secs(10),
        || b.log(),
    );
    assert!(
        all.recs.len() > N,
        "the killed transformer's open transaction had records in the log ({} records)",
        all.recs.len()
    );

    // The group's committed offsets (fetched as stable, KIP-447) cover every input record.
    let c: BaseConsumer = b
        .client_config()
        .set("group.id", "xform")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition("xin", p);
    }
    let offsets = c
        .committed_offsets(tpl, Duration::from_secs(30))
        .expect("OffsetFetch");
    let sum: i64 = offsets
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            other => panic!("partition {} committed {other:?}", e.partition()),
        })
        .sum();
    assert_eq!(sum, N as i64, "committed offsets {offsets:?}");
}

// ------------------------------------------------------------------------------------------
// 3. Zombie fencing

/// Zombie fencing (KIP-98): producer A (transactional.id z) begins a transaction and writes
/// 10 records; B with the same transactional.id calls initTransactions. Proves: A's
/// commitTransaction fails with ProducerFencedException; B's transaction commits. And for the
/// data path, producer C (z2) with an open transaction on partition 0 is fenced by D: C's next
/// send to that partition is refused (InvalidProducerEpochException: the abort marker carried
/// a bumped epoch, so C cannot start a hanging transaction there) and C ends fenced. A
/// read_committed consumer never sees A's or C's records but sees B's and D's; the aborted
/// records are in the log, the refused one is not; no transaction is left open.
#[test]
fn zombie_producer_is_fenced_and_its_transaction_aborted() {
    let b = Broker::start(1);
    admin::create(&b, "zomb", 3, 1, &[]).unwrap();
    let out = Java::run(
        &["zombie", &b.bootstrap(), "zomb"],
        Duration::from_secs(240),
        || b.log(),
    );
    let field = |name: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} line:\n{out}"))
            .to_string()
    };
    assert!(
        field("A_COMMIT").starts_with("ProducerFencedException"),
        "A's commit after B's initTransactions:\n{out}"
    );
    let c_send = field("C_SEND");
    assert!(
        c_send.starts_with("InvalidProducerEpochException")
            || c_send.starts_with("ProducerFencedException"),
        "C's send after D's initTransactions:\n{out}"
    );
    assert_ne!(field("C_COMMIT"), "ok", "{out}");
    assert!(
        field("C_ABORT").starts_with("ProducerFencedException"),
        "C ends fenced:\n{out}"
    );
    assert!(out.lines().any(|l| l == "B_COMMITTED"), "{out}");
    assert!(out.lines().any(|l| l == "D_COMMITTED"), "{out}");

    let committed = java_read(
        &b.bootstrap(),
        "zomb",
        "read_committed",
        Duration::from_secs(60),
        || b.log(),
    );
    assert!(committed.stable, "a fenced transaction stays open");
    let mut want = txn_values("B", [0], 10);
    want.extend(txn_values("D", [0], 5));
    want.sort();
    assert_eq!(committed.values(), want, "read_committed: B's and D's only");

    let all = java_read(
        &b.bootstrap(),
        "zomb",
        "read_uncommitted",
        Duration::from_secs(10),
        || b.log(),
    );
    let mut want_all = want.clone();
    want_all.extend(txn_values("A", [0], 10));
    want_all.extend(txn_values("C", [0], 5));
    want_all.sort();
    assert_eq!(
        all.values(),
        want_all,
        "read_uncommitted: the aborted records too, not C's refused one"
    );
}

// ------------------------------------------------------------------------------------------
// 4. kill -9 of the broker mid-transaction

/// A Java producer (transactional.id t4, transaction.timeout.ms 5000) commits 3 transactions
/// of 30 records, begins a 4th and writes its 30 records (acks=all); the broker is killed -9
/// before the commit (and the producer with it) and restarted. Proves: the coordinator
/// recovers the open transaction from `__transaction_state` and aborts it once its timeout
/// passes, so a read_committed consumer is not stuck (the last stable offset reaches the high
/// watermark) and reads exactly the 3 committed transactions, which survived; the open
/// transaction's records are in the log but never visible. A new producer with the same
/// transactional.id then commits again.
#[test]
fn broker_kill_9_mid_transaction_aborts_it_after_restart() {
    // Kafka checks for timed-out transactions every 10 s by default; Weir may use the key to
    // check sooner (it ignores keys it does not know).
    let mut b = Broker::start_with(
        2,
        &[
            "--override",
            "transaction.abort.timed.out.transaction.cleanup.interval.ms=1000",
        ],
    );
    admin::create(&b, "crash", 3, 1, &[]).unwrap();
    let bs = b.bootstrap();
    let mut j = Java::spawn(&["hold", &bs, "crash", "t4", "k", "3", "30", "5000"]);
    j.wait_line("OPEN", Duration::from_secs(120), || b.log());
    b.kill9();
    j.kill9();
    b.restart();

    let committed = java_read(
        &bs,
        "crash",
        "read_committed",
        Duration::from_secs(90),
        || b.log(),
    );
    assert!(
        committed.stable,
        "the open transaction was never aborted: the last stable offset is stuck"
    );
    assert_eq!(
        committed.values(),
        txn_values("k", 0..3, 30),
        "read_committed: the 3 committed transactions, each record once"
    );
    assert_in_send_order(&committed.recs);
    let all = java_read(
        &bs,
        "crash",
        "read_uncommitted",
        Duration::from_secs(10),
        || b.log(),
    );
    assert_eq!(
        all.values(),
        txn_values("k", 0..4, 30),
        "read_uncommitted: the aborted transaction's records are in the log"
    );

    let out = Java::run(
        &["commit", &bs, "crash", "t4", "after", "1", "30"],
        Duration::from_secs(120),
        || b.log(),
    );
    assert!(out.lines().any(|l| l == "OK"), "{out}");
    let committed = java_read(
        &bs,
        "crash",
        "read_committed",
        Duration::from_secs(60),
        || b.log(),
    );
    assert!(committed.stable);
    let mut want = txn_values("k", 0..3, 30);
    want.extend(txn_values("after", [0], 30));
    want.sort();
    assert_eq!(committed.values(), want);
}

// ------------------------------------------------------------------------------------------
// 5. librdkafka

/// librdkafka's transactional producer (init_transactions, begin/commit/abort_transaction):
/// commits one transaction, aborts one (flushed first, so its records are in the log),
/// commits another. Proves: a read_committed librdkafka consumer reads exactly the two
/// committed transactions, in order per partition, including the one after the aborted one
/// (the last stable offset moved past the abort); read_uncommitted reads all three.
#[test]
fn librdkafka_transactions_commit_and_abort() {
    let b = Broker::start(2);
    admin::create(&b, "rdtxn", 3, 1, &[]).unwrap();
    let p: BaseProducer = b
        .client_config()
        .set("transactional.id", "rd1")
        .set("transaction.timeout.ms", "60000")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let t = Duration::from_secs(60);
    p.init_transactions(t).expect("init_transactions");
    for txn in 0..3usize {
        p.begin_transaction().expect("begin_transaction");
        for i in 0..30usize {
            let (k, v) = (format!("k{i}"), format!("rd-t{txn}-i{i}"));
            p.send(
                BaseRecord::to("rdtxn")
                    .partition(i as i32 % 3)
                    .key(&k)
                    .payload(&v),
            )
            .map_err(|(e, _)| e)
            .expect("send");
        }
        if txn == 1 {
            p.flush(t).expect("flush");
            p.abort_transaction(t).expect("abort_transaction");
        } else {
            p.commit_transaction(t).expect("commit_transaction");
        }
    }

    let got = rd_read(
        &b.client_config(),
        "rdtxn",
        3,
        "read_committed",
        60,
        Duration::from_secs(60),
    );
    assert_eq!(
        sorted_values(&got),
        txn_values("rd", [0, 2], 30),
        "read_committed: the committed records once each"
    );
    let recs: Vec<Rec> = got
        .iter()
        .map(|(p, o, v)| Rec {
            partition: *p,
            offset: *o,
            key: String::new(),
            value: v.clone(),
        })
        .collect();
    assert_in_send_order(&recs);
    let all = rd_read(
        &b.client_config(),
        "rdtxn",
        3,
        "read_uncommitted",
        90,
        Duration::from_secs(60),
    );
    assert_eq!(sorted_values(&all), txn_values("rd", 0..3, 30));
}

// ------------------------------------------------------------------------------------------
// 6. kafka-python

use weir_tests::python::kafka_python;

const PY_TXN: &str = r#"
import sys
from kafka import KafkaProducer
bootstrap, topic = sys.argv[1], sys.argv[2]
p = KafkaProducer(bootstrap_servers=bootstrap, transactional_id="py1", acks="all",
                  enable_idempotence=True, transaction_timeout_ms=60000)
p.init_transactions()
for t in range(3):
    p.begin_transaction()
    for i in range(20):
        p.send(topic, key=b"k%d" % i, value=b"py-t%d-i%d" % (t, i), partition=i % 3)
    if t == 1:
        p.flush()
        p.abort_transaction()
        print("ABORTED", t, flush=True)
    else:
        p.commit_transaction()
        print("COMMITTED", t, flush=True)
p.close()
print("OK", flush=True)
"#;

/// kafka-python's transactional producer (KafkaProducer(transactional_id=...)): commits,
/// aborts (flushed first), commits. Proves: librdkafka's read_committed consumer reads
/// exactly the two committed transactions; read_uncommitted all three.
#[test]
fn kafka_python_transactions_commit_and_abort() {
    let b = Broker::start(2);
    admin::create(&b, "pytxn", 3, 1, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("txn.py");
    std::fs::write(&script, PY_TXN).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(b.bootstrap())
        .arg("pytxn")
        .env("PYTHONPATH", kafka_python())
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "OK"),
        "kafka-python failed ({}):\n{stdout}\n{}\nbroker log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        b.log()
    );

    let got = rd_read(
        &b.client_config(),
        "pytxn",
        3,
        "read_committed",
        40,
        Duration::from_secs(60),
    );
    assert_eq!(sorted_values(&got), txn_values("py", [0, 2], 20));
    let all = rd_read(
        &b.client_config(),
        "pytxn",
        3,
        "read_uncommitted",
        60,
        Duration::from_secs(60),
    );
    assert_eq!(sorted_values(&all), txn_values("py", 0..3, 20));
}

// ------------------------------------------------------------------------------------------
// 7. Three brokers

/// Waits until every node's Metadata names all 3 brokers.
fn wait_brokers(c: &Cluster) {
    let ok = eventually(Duration::from_secs(60), || {
        (0..3).all(|i| {
            let consumer: Option<BaseConsumer> = c.node(i).client_config().create().ok();
            consumer
                .and_then(|k| k.fetch_metadata(None, Duration::from_secs(5)).ok())
                .is_some_and(|m| m.brokers().len() == 3)
        })
    });
    assert!(ok, "the brokers never all registered:\n{}", c.logs());
}

/// Waits until every running node's Metadata names all 3 brokers and shows `topic` with
/// `parts` partitions, each led and fully in sync at RF 3, the same on every node.
fn wait_topic(c: &Cluster, nodes: &[usize], topic: &str, parts: usize) {
    let mut last = Vec::new();
    let ok = eventually(Duration::from_secs(60), || {
        last = nodes
            .iter()
            .map(|&i| weir_tests::topic_view(c.node(i), topic))
            .collect();
        last.iter().all(|v| {
            v.as_ref().is_some_and(|v| {
                v.len() == parts && v.iter().all(|p| p.leader >= 0 && p.isr.len() == 3)
            })
        }) && last.windows(2).all(|w| w[0] == w[1])
    });
    assert!(ok, "{topic}: brokers never agreed: {last:#?}");
}

/// The transaction coordinator of `txn_id` (FindCoordinator, key type 1) as node `via` says.
fn txn_coordinator(c: &Cluster, via: usize, txn_id: &str) -> i32 {
    let mut node = -1;
    let ok = eventually(Duration::from_secs(30), || {
        let mut conn = raw::Conn::new(&c.node(via).bootstrap());
        let r: FindCoordinatorResponse = conn.call(
            ApiKey::FindCoordinator,
            4,
            &FindCoordinatorRequest::default()
                .with_key_type(1)
                .with_coordinator_keys(vec![StrBytes::from_string(txn_id.to_string())]),
        );
        let co = &r.coordinators[0];
        node = co.node_id.0;
        co.error_code == 0 && node >= 0
    });
    assert!(ok, "no transaction coordinator for {txn_id}");
    node
}

/// On three brokers (topics and `__transaction_state` at RF 3): the Java commit/abort run of
/// the single-broker test (10 transactions of 30), all its checks included. Then twice, a
/// producer commits 2 transactions, writes a 3rd's 30 records and is told to commit, while
/// the broker coordinating its transactional.id is killed -9: once just before the commit
/// call (the transaction open), once at a random moment 0-30 ms after it (during the commit
/// protocol). Proves: another broker takes the coordinator over and the transaction ends all
/// or nothing: a read_committed consumer is not stuck and sees the 2 committed transactions
/// and either all or none of the 3rd (all when the producer's commit succeeded), and the
/// same again once the killed broker is back.
#[test]
fn three_brokers_commit_abort_and_coordinator_kill_9() {
    let mut c = Cluster::start(3, &[]);
    wait_brokers(&c);
    admin::create(c.node(0), "ctxn", 3, 3, &[]).unwrap();
    wait_topic(&c, &[0, 1, 2], "ctxn", 3);
    let out = Java::run(
        &["commit-abort", &c.bootstrap(), "ctxn", "ct", "10", "30"],
        Duration::from_secs(240),
        || c.logs(),
    );
    assert!(out.lines().any(|l| l == "OK 150 300"), "{out}");

    // Killed with the transaction open (records written, no commit asked yet), then killed
    // while the commit is under way.
    kill_coordinator_around_commit(&mut c, "ckill", "ck", None);
    let delay = Duration::from_millis(rand::random::<u64>() % 30);
    kill_coordinator_around_commit(&mut c, "ckill2", "ck2", Some(delay));
}

/// On topic `topic` (created here, RF 3): a producer (`txn_id`, transaction timeout 10 s)
/// commits 2 transactions of 30 records and writes a 3rd's; the broker coordinating `txn_id`
/// is killed -9 `after` the producer is told to commit (before, when None). Checks the
/// coordinator moves, the 3rd transaction ends all or nothing (all if the producer's commit
/// succeeded) with the killed broker down and again once it is back (the same outcome).
fn kill_coordinator_around_commit(
    c: &mut Cluster,
    topic: &str,
    txn_id: &str,
    after: Option<Duration>,
) {
    admin::create(c.node(0), topic, 3, 3, &[]).unwrap();
    wait_topic(c, &[0, 1, 2], topic, 3);
    let mut j = Java::spawn(&[
        "hold",
        &c.bootstrap(),
        topic,
        txn_id,
        "c",
        "2",
        "30",
        "10000",
    ]);
    j.wait_line("OPEN", Duration::from_secs(120), || c.logs());
    let coordinator = txn_coordinator(c, 0, txn_id) as usize;
    let what = match after {
        Some(delay) => {
            j.send_line("commit");
            std::thread::sleep(delay);
            c.kill(coordinator);
            format!("{txn_id}: coordinator {coordinator} killed {delay:?} after the commit call")
        }
        None => {
            c.kill(coordinator);
            j.send_line("commit");
            format!("{txn_id}: coordinator {coordinator} killed before the commit call")
        }
    };

    let err = j.err.clone();
    let (status, out) = j.finish(Duration::from_secs(180));
    assert!(
        status.is_some_and(|s| s.success()),
        "{what}: the producer did not finish ({status:?}):\n{out}\n{}\n{}",
        err.lock().unwrap(),
        c.logs()
    );
    let commit_ok = out.lines().any(|l| l == "COMMIT ok");
    let live: Vec<usize> = (0..3).filter(|&i| i != coordinator).collect();
    // Another broker took the transactional id over.
    let mut now = coordinator as i32;
    let moved = eventually(Duration::from_secs(60), || {
        now = txn_coordinator(c, live[0], txn_id);
        now != coordinator as i32
    });
    assert!(moved, "{what}: the coordinator is still {now}");
    let live: Vec<String> = live.iter().map(|&i| c.node(i).bootstrap()).collect();
    let third = all_or_nothing(
        c,
        &live.join(","),
        topic,
        &what,
        "with the coordinator down",
        commit_ok,
    );
    c.restart(coordinator);
    let again = all_or_nothing(
        c,
        &c.bootstrap(),
        topic,
        &what,
        "after it restarted",
        commit_ok,
    );
    eprintln!(
        "{what}: the producer said {:?}; {third} of the 3rd transaction's 30 records visible",
        out.lines().find(|l| l.starts_with("COMMIT "))
    );
    assert_eq!(
        third, again,
        "{what}: the outcome changed when the old coordinator came back"
    );
}

/// Reads `topic` read_committed through `bootstrap`: no transaction open, the 2 committed
/// transactions, and all or none of the 3rd (all if `commit_ok`); returns how many of the 3rd.
fn all_or_nothing(
    c: &Cluster,
    bootstrap: &str,
    topic: &str,
    what: &str,
    when: &str,
    commit_ok: bool,
) -> usize {
    let r = java_read(
        bootstrap,
        topic,
        "read_committed",
        Duration::from_secs(90),
        || c.logs(),
    );
    assert!(r.stable, "{what}, {when}: a transaction stays open");
    let vals = r.values();
    let third = vals.iter().filter(|v| v.starts_with("c-t2-")).count();
    assert!(
        third == 0 || third == 30,
        "{what}, {when}: {third} of the 3rd transaction's 30 records are visible"
    );
    if commit_ok {
        assert_eq!(third, 30, "{what}, {when}: the producer's commit succeeded");
    }
    let want = if third == 30 {
        txn_values("c", 0..3, 30)
    } else {
        txn_values("c", 0..2, 30)
    };
    assert_eq!(vals, want, "{what}, {when}: each record once");
    assert_in_send_order(&r.recs);
    third
}

// ------------------------------------------------------------------------------------------
// 8. The coordinator's admin APIs and its errors, over the raw protocol

/// DescribeTransactions and ListTransactions report an open librdkafka transaction (state,
/// producer, partitions) and then its commit; the coordinator answers Kafka's codes for an
/// unknown id, a fenced epoch, an unknown partition, a timeout above the maximum and an
/// unknown state filter.
#[test]
fn describe_list_transactions_and_coordinator_errors() {
    use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
    use kafka_protocol::messages::*;
    let b = Broker::start(2);
    admin::create(&b, "dl", 2, 1, &[]).unwrap();
    let p: BaseProducer = b
        .client_config()
        .set("transactional.id", "dl1")
        .set("transaction.timeout.ms", "60000")
        .create()
        .expect("producer");
    let t = Duration::from_secs(60);
    p.init_transactions(t).expect("init_transactions");
    p.begin_transaction().unwrap();
    for i in 0..5 {
        p.send(
            BaseRecord::to("dl")
                .partition(1)
                .key("k")
                .payload(&format!("v{i}")),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    }
    p.flush(t).unwrap();

    let mut c = raw::Conn::new(&b.bootstrap());
    let sb = |s: &str| StrBytes::from_string(s.to_string());
    let describe = |c: &mut raw::Conn| -> DescribeTransactionsResponse {
        c.call(
            ApiKey::DescribeTransactions,
            0,
            &DescribeTransactionsRequest::default().with_transactional_ids(vec![
                TransactionalId(sb("dl1")),
                TransactionalId(sb("nope")),
            ]),
        )
    };
    let d = describe(&mut c);
    let (open, unknown) = (&d.transaction_states[0], &d.transaction_states[1]);
    assert_eq!(open.error_code, 0);
    assert_eq!(open.transaction_state.as_str(), "Ongoing");
    assert_eq!(open.transaction_timeout_ms, 60_000);
    assert!(open.producer_id.0 >= 0 && open.transaction_start_time_ms > 0);
    assert_eq!(open.topics.len(), 1);
    assert_eq!(
        (
            open.topics[0].topic.0.as_str(),
            open.topics[0].partitions.clone()
        ),
        ("dl", vec![1])
    );
    assert_eq!(unknown.error_code, 105, "TRANSACTIONAL_ID_NOT_FOUND");
    let (pid, epoch) = (open.producer_id, open.producer_epoch);

    let list = |c: &mut raw::Conn, states: &[&str]| -> ListTransactionsResponse {
        c.call(
            ApiKey::ListTransactions,
            1,
            &ListTransactionsRequest::default()
                .with_state_filters(states.iter().map(|s| sb(s)).collect())
                .with_duration_filter(-1),
        )
    };
    let l = list(&mut c, &["Ongoing"]);
    assert_eq!(l.error_code, 0);
    assert!(l
        .transaction_states
        .iter()
        .any(|s| s.transactional_id.0.as_str() == "dl1" && s.producer_id == pid));
    assert!(list(&mut c, &["CompleteCommit"])
        .transaction_states
        .is_empty());
    assert_eq!(
        list(&mut c, &["Bogus"]).unknown_state_filters,
        vec![sb("Bogus")]
    );

    // A stale epoch is fenced; an unknown partition fails the whole request.
    let end: EndTxnResponse = c.call(
        ApiKey::EndTxn,
        3,
        &EndTxnRequest::default()
            .with_transactional_id(TransactionalId(sb("dl1")))
            .with_producer_id(pid)
            .with_producer_epoch(epoch - 1)
            .with_committed(true),
    );
    assert_eq!(end.error_code, 90, "PRODUCER_FENCED");
    let add: AddPartitionsToTxnResponse = c.call(
        ApiKey::AddPartitionsToTxn,
        3,
        &AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(TransactionalId(sb("dl1")))
            .with_v3_and_below_producer_id(pid)
            .with_v3_and_below_producer_epoch(epoch)
            .with_v3_and_below_topics(vec![
                AddPartitionsToTxnTopic::default()
                    .with_name(TopicName(sb("dl")))
                    .with_partitions(vec![0]),
                AddPartitionsToTxnTopic::default()
                    .with_name(TopicName(sb("no-such-topic")))
                    .with_partitions(vec![0]),
            ]),
    );
    let codes: Vec<(String, i16)> = add
        .results_by_topic_v3_and_below
        .iter()
        .flat_map(|t| {
            t.results_by_partition
                .iter()
                .map(move |p| (t.name.0.to_string(), p.partition_error_code))
        })
        .collect();
    assert_eq!(
        codes,
        vec![("dl".to_string(), 55), ("no-such-topic".to_string(), 3)],
        "OPERATION_NOT_ATTEMPTED beside UNKNOWN_TOPIC_OR_PARTITION"
    );
    let init: InitProducerIdResponse = c.call(
        ApiKey::InitProducerId,
        4,
        &InitProducerIdRequest::default()
            .with_transactional_id(Some(TransactionalId(sb("other"))))
            .with_transaction_timeout_ms(1_000_000)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1),
    );
    assert_eq!(
        init.error_code, 50,
        "INVALID_TRANSACTION_TIMEOUT above transaction.max.timeout.ms"
    );

    p.commit_transaction(t).expect("commit");
    let d = describe(&mut c);
    assert_eq!(
        d.transaction_states[0].transaction_state.as_str(),
        "CompleteCommit"
    );
    assert!(d.transaction_states[0].topics.is_empty());
    assert_eq!(
        list(&mut c, &["CompleteCommit"]).transaction_states.len(),
        1
    );
}
