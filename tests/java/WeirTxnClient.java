// Kafka transactions through the Java reference client (kafka-clients 3.9.1) against Weir, for
// tests/tests/transactions.rs. One program, several sub-commands; each prints machine-readable
// lines (first word upper case) that the Rust test parses, and exits non-zero on a failed check
// ("FAILED: ...") or an unexpected exception.
//
//   commit-abort <bootstrap> <topic> <transactional.id> <txns> <records per txn>
//       Transactions 0..txns, each of <per> records (record i to partition i % partitions,
//       value "ca-t<t>-i<i>"), committing the even ones and aborting the odd ones (flushed first,
//       so the aborted records are in the log). While each is open: read_committed endOffsets
//       (the last stable offset) is the transaction's first offset in each partition and
//       read_uncommitted endOffsets (the high watermark) is past its last record; between two
//       transactions exactly one offset (the control record). Then reads everything back
//       read_committed (exactly the committed records, each once, at the offsets the producer
//       was told, in order) and read_uncommitted (all records). Prints "OK <committed>
//       <all>".
//   commit <bootstrap> <topic> <transactional.id> <tag> <txns> <per> [transaction.timeout.ms]
//       Commits <txns> transactions of values "<tag>-t<t>-i<i>"; prints "COMMITTED <t>" each.
//   hold <bootstrap> <topic> <transactional.id> <tag> <txns> <per> <transaction.timeout.ms>
//       As commit, then begins transaction <txns>, sends <per> records, flushes them (they are
//       in the log) and prints "OPEN". Then reads standard input: "commit" commits (retrying
//       timeouts for up to 120 s) and prints "COMMIT ok" or "COMMIT failed <exception>"; end of
//       input or anything else leaves the transaction open until the process is killed.
//   transform <bootstrap> <in> <out> <group> <transactional.id> <total> [pause after n txns]
//       Consume-transform-produce: subscribes to <in> read_committed in group <group>; each
//       poll's batch becomes one transaction producing value + "-out" with the same key to
//       <out> and sending the consumed offsets with sendOffsetsToTransaction; prints
//       "COMMITTED <n> <records>" after each commit. A rebalance under a batch
//       (CommitFailedException) aborts it and rewinds to the committed offsets: "REBALANCED". With the pause argument, the transaction
//       after the n-th commit is flushed (records and offsets sent) and left open: "OPEN", then
//       it sleeps until killed. Finishes with "DONE <consumed position sum>" once the positions
//       of all of <in>'s partitions add up to <total>.
//   zombie <bootstrap> <topic>
//       Fencing. A (transactional.id "z") begins and sends A-*; B ("z") initTransactions; A's
//       commitTransaction: "A_COMMIT <outcome>"; B commits B-*. C ("z2") begins and sends C-*
//       to partition 0; D ("z2") initTransactions; C sends once more to partition 0
//       ("C_SEND <outcome>"), then commitTransaction ("C_COMMIT <outcome>") and
//       abortTransaction ("C_ABORT <outcome>"); D commits D-*. An outcome is "ok" or the
//       exception's simple class name (the cause's, for an ExecutionException).
//   read <bootstrap> <topic> <read_committed|read_uncommitted> <timeout ms>
//       Waits (up to the timeout) until every partition's last stable offset equals its high
//       watermark, then reads all partitions from the beginning up to this isolation level's
//       end offsets: "REC <partition> <offset> <key> <value>" per record, then
//       "END <records> <stable: true|false>".
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.time.Duration;
import java.util.*;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Future;
import org.apache.kafka.clients.consumer.*;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.KafkaException;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class WeirTxnClient {
    public static void main(String[] args) throws Exception {
        switch (args[0]) {
            case "commit-abort" -> commitAbort(args[1], args[2], args[3], Integer.parseInt(args[4]), Integer.parseInt(args[5]));
            case "commit" -> commit(args[1], args[2], args[3], args[4], Integer.parseInt(args[5]), Integer.parseInt(args[6]),
                    args.length > 7 ? args[7] : "60000");
            case "hold" -> hold(args[1], args[2], args[3], args[4], Integer.parseInt(args[5]), Integer.parseInt(args[6]), args[7]);
            case "transform" -> transform(args[1], args[2], args[3], args[4], args[5], Long.parseLong(args[6]),
                    args.length > 7 ? Integer.parseInt(args[7]) : -1);
            case "zombie" -> zombie(args[1], args[2]);
            case "read" -> read(args[1], args[2], args[3], Long.parseLong(args[4]));
            default -> check(false, "unknown sub-command " + args[0]);
        }
        System.out.flush();
        // Client threads must not keep the JVM alive.
        System.exit(0);
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            System.out.println("FAILED: " + what);
            System.out.flush();
            System.exit(2);
        }
    }

    static KafkaProducer<String, String> producer(String bootstrap, String txnId, String txnTimeoutMs) {
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, txnId);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        p.put(ProducerConfig.TRANSACTION_TIMEOUT_CONFIG, txnTimeoutMs);
        p.put(ProducerConfig.LINGER_MS_CONFIG, "5");
        p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, "60000");
        p.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, "120000");
        p.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, "30000");
        return new KafkaProducer<>(p);
    }

    static KafkaConsumer<String, String> consumer(String bootstrap, String isolation, String group) {
        Properties c = new Properties();
        c.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        c.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        c.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        c.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, isolation);
        c.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        c.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        c.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, "100");
        if (group != null) {
            c.put(ConsumerConfig.GROUP_ID_CONFIG, group);
            c.put(ConsumerConfig.MAX_POLL_RECORDS_CONFIG, "50");
            // A killed member leaves the group after its session; a rebalance waits at most
            // max.poll.interval.ms for the members.
            c.put(ConsumerConfig.SESSION_TIMEOUT_MS_CONFIG, "6000");
            c.put(ConsumerConfig.HEARTBEAT_INTERVAL_MS_CONFIG, "1000");
            c.put(ConsumerConfig.MAX_POLL_INTERVAL_MS_CONFIG, "20000");
        }
        return new KafkaConsumer<>(c);
    }

    static List<TopicPartition> partitions(KafkaConsumer<String, String> c, String topic) {
        List<TopicPartition> tps = new ArrayList<>();
        for (PartitionInfo p : c.partitionsFor(topic, Duration.ofSeconds(60))) tps.add(new TopicPartition(topic, p.partition()));
        tps.sort(Comparator.comparingInt(TopicPartition::partition));
        return tps;
    }

    static int partitionCount(KafkaProducer<String, String> p, String topic) {
        return p.partitionsFor(topic).size();
    }

    /** Sends <per> records of transaction t (already begun); returns their metadata in order. */
    static List<RecordMetadata> sendTxn(KafkaProducer<String, String> p, String topic, int parts, String tag, int t, int per)
            throws Exception {
        List<Future<RecordMetadata>> fs = new ArrayList<>();
        for (int i = 0; i < per; i++) {
            fs.add(p.send(new ProducerRecord<>(topic, i % parts, "k" + i, tag + "-t" + t + "-i" + i)));
        }
        p.flush();
        List<RecordMetadata> out = new ArrayList<>();
        for (Future<RecordMetadata> f : fs) out.add(f.get());
        return out;
    }

    static String outcome(Throwable e) {
        if (e == null) return "ok";
        if (e instanceof ExecutionException && e.getCause() != null) e = e.getCause();
        String s = e.getClass().getSimpleName();
        if (e.getCause() != null && e.getCause() != e) s += "/" + e.getCause().getClass().getSimpleName();
        return s;
    }

    // ---------------------------------------------------------------- commit-abort

    static void commitAbort(String bootstrap, String topic, String txnId, int txns, int per) throws Exception {
        // expected[p] = (offset, value) of every committed record of partition p, in order.
        Map<Integer, List<Map.Entry<Long, String>>> committed = new TreeMap<>();
        Map<Integer, List<Map.Entry<Long, String>>> all = new TreeMap<>();
        long committedCount = 0, allCount = 0;
        try (KafkaProducer<String, String> p = producer(bootstrap, txnId, "60000");
             KafkaConsumer<String, String> rc = consumer(bootstrap, "read_committed", null);
             KafkaConsumer<String, String> ru = consumer(bootstrap, "read_uncommitted", null)) {
            p.initTransactions();
            int parts = partitionCount(p, topic);
            List<TopicPartition> tps = partitions(rc, topic);
            Map<Integer, Long> lastOffset = new HashMap<>();
            for (int t = 0; t < txns; t++) {
                p.beginTransaction();
                List<RecordMetadata> md = sendTxn(p, topic, parts, "ca", t, per);
                Map<Integer, Long> first = new HashMap<>(), last = new HashMap<>();
                for (int i = 0; i < per; i++) {
                    RecordMetadata m = md.get(i);
                    check(m.partition() == i % parts, "record to its partition");
                    first.putIfAbsent(m.partition(), m.offset());
                    Long prev = last.put(m.partition(), m.offset());
                    check(prev == null || m.offset() == prev + 1, "a transaction's records are consecutive in a partition: " + prev + " then " + m.offset());
                    all.computeIfAbsent(m.partition(), k -> new ArrayList<>()).add(Map.entry(m.offset(), "ca-t" + t + "-i" + i));
                    allCount++;
                    if (t % 2 == 0) {
                        committed.computeIfAbsent(m.partition(), k -> new ArrayList<>()).add(Map.entry(m.offset(), "ca-t" + t + "-i" + i));
                        committedCount++;
                    }
                }
                for (Map.Entry<Integer, Long> e : first.entrySet()) {
                    Long before = lastOffset.get(e.getKey());
                    long want = before == null ? 0 : before + 2;
                    check(e.getValue() == want, "partition " + e.getKey() + ": transaction " + t + " starts at " + e.getValue()
                            + ", expected " + want + " (one control record after the previous transaction)");
                }
                lastOffset.putAll(last);
                // The transaction is open and its records are in the log.
                Map<TopicPartition, Long> lso = rc.endOffsets(tps, Duration.ofSeconds(30));
                Map<TopicPartition, Long> hw = ru.endOffsets(tps, Duration.ofSeconds(30));
                for (TopicPartition tp : tps) {
                    check(lso.get(tp).equals(first.get(tp.partition())), "open transaction " + t + ": " + tp
                            + " last stable offset " + lso.get(tp) + ", expected the transaction's first offset " + first.get(tp.partition()));
                    check(hw.get(tp) == last.get(tp.partition()) + 1, "open transaction " + t + ": " + tp
                            + " high watermark " + hw.get(tp) + ", expected " + (last.get(tp.partition()) + 1));
                }
                if (t % 2 == 0) p.commitTransaction(); else p.abortTransaction();
                System.out.println("TXN " + t + (t % 2 == 0 ? " COMMITTED" : " ABORTED"));
            }
            // Once the markers are written, the last stable offset reaches the high watermark,
            // one past the last transaction's control record.
            long deadline = System.currentTimeMillis() + 60_000;
            Map<TopicPartition, Long> lso, hw;
            while (true) {
                lso = rc.endOffsets(tps, Duration.ofSeconds(30));
                hw = ru.endOffsets(tps, Duration.ofSeconds(30));
                boolean done = true;
                for (TopicPartition tp : tps) done &= lso.get(tp).equals(hw.get(tp)) && hw.get(tp) == lastOffset.get(tp.partition()) + 2;
                if (done || System.currentTimeMillis() > deadline) break;
                Thread.sleep(100);
            }
            for (TopicPartition tp : tps) {
                check(hw.get(tp) == lastOffset.get(tp.partition()) + 2, tp + " high watermark " + hw.get(tp)
                        + " after the last marker, expected " + (lastOffset.get(tp.partition()) + 2));
                check(lso.get(tp).equals(hw.get(tp)), tp + " last stable offset " + lso.get(tp) + " never reached the high watermark " + hw.get(tp));
            }
            System.out.println("STABLE");
        }
        check(readsBack(bootstrap, topic, "read_committed", committed) == committedCount, "read_committed count");
        check(readsBack(bootstrap, topic, "read_uncommitted", all) == allCount, "read_uncommitted count");
        System.out.println("OK " + committedCount + " " + allCount);
    }

    /** Reads every partition from the beginning to its end offset (for this isolation level);
     *  checks the records are exactly `want` (offset and value, in order). */
    static long readsBack(String bootstrap, String topic, String isolation, Map<Integer, List<Map.Entry<Long, String>>> want) {
        Map<Integer, List<Map.Entry<Long, String>>> got = new TreeMap<>();
        long n = 0;
        try (KafkaConsumer<String, String> c = consumer(bootstrap, isolation, null)) {
            List<TopicPartition> tps = partitions(c, topic);
            c.assign(tps);
            c.seekToBeginning(tps);
            Map<TopicPartition, Long> end = c.endOffsets(tps, Duration.ofSeconds(30));
            long deadline = System.currentTimeMillis() + 60_000;
            while (!reached(c, end)) {
                check(System.currentTimeMillis() < deadline, isolation + " consumer did not reach the end offsets " + end);
                for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(200))) {
                    got.computeIfAbsent(r.partition(), k -> new ArrayList<>()).add(Map.entry(r.offset(), r.value()));
                    n++;
                }
            }
            // Nothing beyond: the next poll stays empty.
            check(c.poll(Duration.ofMillis(500)).isEmpty(), isolation + ": records past the end offsets");
        }
        for (int p : union(want.keySet(), got.keySet())) {
            List<Map.Entry<Long, String>> w = want.getOrDefault(p, List.of()), g = got.getOrDefault(p, List.of());
            if (!w.equals(g)) {
                int i = 0;
                while (i < w.size() && i < g.size() && w.get(i).equals(g.get(i))) i++;
                check(false, isolation + " partition " + p + ": read " + g.size() + " records, expected " + w.size()
                        + "; first difference at #" + i + ": got " + (i < g.size() ? g.get(i) : "nothing")
                        + ", expected " + (i < w.size() ? w.get(i) : "nothing"));
            }
        }
        return n;
    }

    static Set<Integer> union(Set<Integer> a, Set<Integer> b) {
        Set<Integer> s = new TreeSet<>(a);
        s.addAll(b);
        return s;
    }

    static boolean reached(KafkaConsumer<String, String> c, Map<TopicPartition, Long> end) {
        for (Map.Entry<TopicPartition, Long> e : end.entrySet()) if (c.position(e.getKey()) < e.getValue()) return false;
        return true;
    }

    // ---------------------------------------------------------------- commit / hold

    static void commitSome(KafkaProducer<String, String> p, String topic, String tag, int txns, int per) throws Exception {
        int parts = partitionCount(p, topic);
        for (int t = 0; t < txns; t++) {
            p.beginTransaction();
            sendTxn(p, topic, parts, tag, t, per);
            p.commitTransaction();
            System.out.println("COMMITTED " + t);
            System.out.flush();
        }
    }

    static void commit(String bootstrap, String topic, String txnId, String tag, int txns, int per, String timeout) throws Exception {
        try (KafkaProducer<String, String> p = producer(bootstrap, txnId, timeout)) {
            p.initTransactions();
            commitSome(p, topic, tag, txns, per);
        }
        System.out.println("OK");
    }

    static void hold(String bootstrap, String topic, String txnId, String tag, int txns, int per, String timeout) throws Exception {
        KafkaProducer<String, String> p = producer(bootstrap, txnId, timeout);
        p.initTransactions();
        commitSome(p, topic, tag, txns, per);
        p.beginTransaction();
        sendTxn(p, topic, partitionCount(p, topic), tag, txns, per);
        System.out.println("OPEN");
        System.out.flush();
        String line = new BufferedReader(new InputStreamReader(System.in)).readLine();
        if (line == null || !line.trim().equals("commit")) {
            Thread.sleep(Long.MAX_VALUE);
        }
        System.out.println("COMMITTING");
        System.out.flush();
        long deadline = System.currentTimeMillis() + 120_000;
        while (true) {
            try {
                p.commitTransaction();
                System.out.println("COMMIT ok");
                break;
            } catch (org.apache.kafka.common.errors.TimeoutException e) {
                // A timed-out commit may be retried (the client resumes it).
                if (System.currentTimeMillis() > deadline) {
                    System.out.println("COMMIT failed " + outcome(e));
                    break;
                }
            } catch (Exception e) {
                System.out.println("COMMIT failed " + outcome(e));
                break;
            }
        }
        System.out.flush();
        p.close(Duration.ofSeconds(5));
    }

    // ---------------------------------------------------------------- transform

    static void transform(String bootstrap, String in, String out, String group, String txnId, long total, int pauseAfter)
            throws Exception {
        KafkaProducer<String, String> p = producer(bootstrap, txnId, "60000");
        // First: fence a previous incarnation and abort its open transaction (with its pending
        // offsets), so the committed offsets read below are stable.
        p.initTransactions();
        System.out.println("INIT");
        System.out.flush();
        KafkaConsumer<String, String> c = consumer(bootstrap, "read_committed", group);
        c.subscribe(List.of(in));
        int committed = 0;
        long deadline = System.currentTimeMillis() + 150_000;
        while (true) {
            check(System.currentTimeMillis() < deadline, "transform did not finish; committed " + committed + " transactions");
            ConsumerRecords<String, String> records = c.poll(Duration.ofMillis(200));
            if (records.isEmpty()) {
                Set<TopicPartition> a = c.assignment();
                if (a.size() == c.partitionsFor(in).size()) {
                    long sum = 0;
                    for (TopicPartition tp : a) sum += c.position(tp);
                    if (sum >= total) {
                        System.out.println("DONE " + sum);
                        break;
                    }
                }
                continue;
            }
            p.beginTransaction();
            try {
                Map<TopicPartition, OffsetAndMetadata> offsets = new HashMap<>();
                for (ConsumerRecord<String, String> r : records) {
                    p.send(new ProducerRecord<>(out, r.key(), r.value() + "-out"));
                    offsets.put(new TopicPartition(r.topic(), r.partition()), new OffsetAndMetadata(r.offset() + 1));
                }
                p.sendOffsetsToTransaction(offsets, c.groupMetadata());
                if (committed == pauseAfter) {
                    p.flush();
                    System.out.println("OPEN " + records.count());
                    System.out.flush();
                    Thread.sleep(Long.MAX_VALUE);
                }
                p.commitTransaction();
            } catch (KafkaException e) {
                // The group rebalanced under this batch (its generation is stale): what an
                // exactly-once application does is abort and go back to the committed offsets.
                // Any other error fails the run.
                if (!(e instanceof CommitFailedException || e.getCause() instanceof CommitFailedException)) throw e;
                p.abortTransaction();
                Set<TopicPartition> a = c.assignment();
                Map<TopicPartition, OffsetAndMetadata> at = c.committed(a);
                for (TopicPartition tp : a) {
                    OffsetAndMetadata o = at.get(tp);
                    if (o == null) c.seekToBeginning(List.of(tp)); else c.seek(tp, o.offset());
                }
                System.out.println("REBALANCED " + outcome(e));
                System.out.flush();
                continue;
            }
            committed++;
            System.out.println("COMMITTED " + committed + " " + records.count());
            System.out.flush();
        }
        c.close(Duration.ofSeconds(5));
        p.close(Duration.ofSeconds(5));
    }

    // ---------------------------------------------------------------- zombie

    static void zombie(String bootstrap, String topic) throws Exception {
        KafkaProducer<String, String> a = producer(bootstrap, "z", "60000");
        a.initTransactions();
        int parts = partitionCount(a, topic);
        a.beginTransaction();
        sendTxn(a, topic, parts, "A", 0, 10);
        KafkaProducer<String, String> b = producer(bootstrap, "z", "60000");
        b.initTransactions();
        Throwable err = null;
        try {
            a.commitTransaction();
        } catch (Exception e) {
            err = e;
        }
        System.out.println("A_COMMIT " + outcome(err));
        a.close(Duration.ZERO);
        b.beginTransaction();
        sendTxn(b, topic, parts, "B", 0, 10);
        b.commitTransaction();
        System.out.println("B_COMMITTED");
        b.close();

        KafkaProducer<String, String> c = producer(bootstrap, "z2", "60000");
        c.initTransactions();
        c.beginTransaction();
        for (int i = 0; i < 5; i++) c.send(new ProducerRecord<>(topic, 0, "k" + i, "C-t0-i" + i));
        c.flush();
        KafkaProducer<String, String> d = producer(bootstrap, "z2", "60000");
        d.initTransactions();
        err = null;
        try {
            c.send(new ProducerRecord<>(topic, 0, "k5", "C-t0-i5")).get();
        } catch (Exception e) {
            err = e;
        }
        System.out.println("C_SEND " + outcome(err));
        err = null;
        try {
            c.commitTransaction();
        } catch (Exception e) {
            err = e;
        }
        System.out.println("C_COMMIT " + outcome(err));
        err = null;
        try {
            c.abortTransaction();
        } catch (Exception e) {
            err = e;
        }
        System.out.println("C_ABORT " + outcome(err));
        c.close(Duration.ZERO);
        d.beginTransaction();
        for (int i = 0; i < 5; i++) d.send(new ProducerRecord<>(topic, 0, "k" + i, "D-t0-i" + i));
        d.commitTransaction();
        System.out.println("D_COMMITTED");
        d.close();
    }

    // ---------------------------------------------------------------- read

    static void read(String bootstrap, String topic, String isolation, long timeoutMs) throws Exception {
        long deadline = System.currentTimeMillis() + timeoutMs;
        try (KafkaConsumer<String, String> rc = consumer(bootstrap, "read_committed", null);
             KafkaConsumer<String, String> ru = consumer(bootstrap, "read_uncommitted", null);
             KafkaConsumer<String, String> c = consumer(bootstrap, isolation, null)) {
            List<TopicPartition> tps = partitions(c, topic);
            boolean stable = false;
            while (true) {
                try {
                    stable = rc.endOffsets(tps, Duration.ofSeconds(10)).equals(ru.endOffsets(tps, Duration.ofSeconds(10)));
                } catch (org.apache.kafka.common.errors.TimeoutException e) {
                    stable = false;
                }
                if (stable || System.currentTimeMillis() > deadline) break;
                Thread.sleep(200);
            }
            c.assign(tps);
            c.seekToBeginning(tps);
            Map<TopicPartition, Long> end = c.endOffsets(tps, Duration.ofSeconds(30));
            long n = 0;
            long readDeadline = System.currentTimeMillis() + 60_000;
            while (!reached(c, end)) {
                check(System.currentTimeMillis() < readDeadline, isolation + " consumer did not reach the end offsets " + end);
                for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(200))) {
                    System.out.println("REC " + r.partition() + " " + r.offset() + " " + r.key() + " " + r.value());
                    n++;
                }
            }
            System.out.println("END " + n + " " + stable);
        }
    }
}
