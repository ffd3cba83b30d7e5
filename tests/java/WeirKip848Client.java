// The Java reference client (kafka-clients) with the KIP-848 consumer group protocol
// (group.protocol=consumer) against Weir. Arguments: bootstrap topic records.
//
// Failover mode (a fourth argument "failover", a fifth the replication factor): see failover().
//
// 1. Creates the topic (6 partitions); a producer writes `records` records (header idx) while
//    consumers c1 and c2 of group "<topic>-g" consume; c3 joins after a third of the records,
//    c1 leaves after two thirds. Every consumer commits synchronously after each poll. Checks:
//    no partition is owned by two consumers at once (the assignment callbacks), every record is
//    read exactly once, offsets within a partition have no gaps, and the committed offsets are
//    the log ends. Prints "DUPLICATES <n>", "REBALANCE <consumer> <assigned|revoked> <parts>".
// 2. Three consumers of group "<topic>-range" with group.remote.assignor=range: once stable,
//    sorted by member id they own partitions 0-1, 2-3, 4-5; Admin describes the group as a
//    CONSUMER group, Stable, assignor range, with three members.
// Prints "OK <records>" on success; exits non-zero otherwise.
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.*;
import java.util.concurrent.*;
import java.util.concurrent.atomic.*;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.clients.consumer.*;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.GroupType;
import org.apache.kafka.common.ConsumerGroupState;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class WeirKip848Client {
    static final int PARTITIONS = 6;
    static final Map<Integer, String> owner = new ConcurrentHashMap<>();
    static final Map<Integer, AtomicInteger> reads = new ConcurrentHashMap<>();
    static final Map<Integer, Set<Long>> offsets = new ConcurrentHashMap<>();
    static final AtomicReference<String> failure = new AtomicReference<>();

    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        String topic = args[1];
        int n = Integer.parseInt(args[2]);
        long started = System.currentTimeMillis();

        Properties a = new Properties();
        a.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        short rf = args.length > 4 ? Short.parseShort(args[4]) : 1;
        try (Admin admin = Admin.create(a)) {
            admin.createTopics(List.of(new NewTopic(topic, PARTITIONS, rf))).all().get();
        }
        if (args.length > 3 && args[3].equals("failover")) {
            failover(bootstrap, topic, n, a);
            return;
        }

        String group = topic + "-g";
        AtomicInteger produced = new AtomicInteger();
        Thread producer = new Thread(() -> {
            Properties p = new Properties();
            p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
            p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
            p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
            p.put(ProducerConfig.LINGER_MS_CONFIG, "5");
            try (KafkaProducer<String, String> pr = new KafkaProducer<>(p)) {
                for (int i = 0; i < n; i++) {
                    ProducerRecord<String, String> r = new ProducerRecord<>(topic, "key-" + i, "value-" + i);
                    r.headers().add("idx", Integer.toString(i).getBytes(StandardCharsets.UTF_8));
                    pr.send(r);
                    if (i % 100 == 99) {
                        pr.flush();
                        produced.set(i + 1);
                        Thread.sleep(100);
                    }
                }
                pr.flush();
                produced.set(n);
            } catch (Exception e) {
                failure.compareAndSet(null, "producer: " + e);
            }
        });
        producer.start();

        AtomicInteger total = new AtomicInteger();
        Member c1 = new Member("c1", bootstrap, topic, group, null, total, n);
        Member c2 = new Member("c2", bootstrap, topic, group, null, total, n);
        c1.start();
        c2.start();
        waitFor(() -> produced.get() >= n / 3, 120_000, "a third produced");
        Member c3 = new Member("c3", bootstrap, topic, group, null, total, n);
        c3.start();
        waitFor(() -> produced.get() >= 2 * n / 3, 120_000, "two thirds produced");
        waitFor(() -> !c3.assigned.isEmpty(), 60_000, "c3 gets partitions");
        c1.stop.set(true);
        c1.join();
        producer.join();
        waitFor(() -> reads.size() >= n || failure.get() != null, 120_000, "every record read");
        c2.stop.set(true);
        c3.stop.set(true);
        c2.join();
        c3.join();
        check(failure.get() == null, String.valueOf(failure.get()));
        int dup = 0;
        for (int i = 0; i < n; i++) {
            AtomicInteger c = reads.get(i);
            check(c != null, "record " + i + " read");
            dup += c.get() - 1;
        }
        System.out.println("DUPLICATES " + dup + " STALE_COMMITS_RETRIED " + staleCommits.get());
        check(dup == 0, "no record read twice (commits after every poll and at revocation)");
        // Offsets: each partition read from 0 with no gaps; committed = log end.
        Properties c = consumerProps(bootstrap, group, null);
        try (KafkaConsumer<String, String> probe = new KafkaConsumer<>(c); Admin admin = Admin.create(a)) {
            Set<TopicPartition> tps = new HashSet<>();
            for (int p = 0; p < PARTITIONS; p++) tps.add(new TopicPartition(topic, p));
            Map<TopicPartition, Long> ends = probe.endOffsets(tps);
            Map<TopicPartition, OffsetAndMetadata> committed =
                admin.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata().get();
            long sum = 0;
            for (TopicPartition tp : tps) {
                long end = ends.get(tp);
                sum += end;
                Set<Long> seen = offsets.getOrDefault(tp.partition(), Set.of());
                check(seen.size() == end, "partition " + tp.partition() + " read " + seen.size() + " of " + end);
                OffsetAndMetadata m = committed.get(tp);
                check(m != null && m.offset() == end, "committed " + tp + " = " + m + ", end " + end);
            }
            check(sum == n, "log ends sum to " + n + ": " + sum);
            ConsumerGroupDescription d = admin.describeConsumerGroups(List.of(group)).all().get().get(group);
            System.out.println("DESCRIBED " + d.type() + " " + d.state() + " members " + d.members().size());
        }
        System.out.println("PHASE1 " + (System.currentTimeMillis() - started) + " ms");

        // 2. The range assignor.
        String rgroup = topic + "-range";
        AtomicInteger none = new AtomicInteger();
        List<Member> ms = new ArrayList<>();
        for (String name : List.of("r1", "r2", "r3")) {
            Member m = new Member(name, bootstrap, topic, rgroup, "range", none, Integer.MAX_VALUE);
            m.countReads = false;
            ms.add(m);
            m.start();
        }
        waitFor(() -> ms.stream().allMatch(m -> m.assigned.size() == 2 && m.memberId != null), 60_000, "range: two partitions each");
        ms.sort(Comparator.comparing(m -> m.memberId));
        for (int i = 0; i < 3; i++) {
            Set<Integer> want = Set.of(2 * i, 2 * i + 1);
            check(ms.get(i).assigned.equals(want), "range: member " + i + " owns " + ms.get(i).assigned + ", want " + want);
        }
        try (Admin admin = Admin.create(a)) {
            ConsumerGroupDescription d = admin.describeConsumerGroups(List.of(rgroup)).all().get().get(rgroup);
            System.out.println("DESCRIBED " + d.type() + " " + d.state() + " " + d.partitionAssignor() + " members " + d.members().size());
            check(d.type() == GroupType.CONSUMER && d.state() == ConsumerGroupState.STABLE
                && "range".equals(d.partitionAssignor()) && d.members().size() == 3, "describe of the range group");
        }
        for (Member m : ms) m.stop.set(true);
        for (Member m : ms) m.join();
        check(failure.get() == null, String.valueOf(failure.get()));
        System.out.println("OK " + n);
    }

    // Failover mode: n records are produced, consumers c1 and c2 read half of them (committing
    // after each poll), then pause and print "HALF"; the harness kills the coordinator with -9
    // (and restarts it, or lets another broker take over) and writes "GO" to stdin; the
    // consumers read the rest. Checks every record is
    // read, at most the uncommitted tail twice, and the committed offsets are the log ends.
    static final AtomicBoolean paused = new AtomicBoolean();

    static void failover(String bootstrap, String topic, int n, Properties a) throws Exception {
        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        try (KafkaProducer<String, String> pr = new KafkaProducer<>(p)) {
            for (int i = 0; i < n; i++) {
                ProducerRecord<String, String> r = new ProducerRecord<>(topic, "key-" + i, "value-" + i);
                r.headers().add("idx", Integer.toString(i).getBytes(StandardCharsets.UTF_8));
                pr.send(r);
            }
            pr.flush();
        }
        String group = topic + "-g";
        AtomicInteger total = new AtomicInteger();
        Member c1 = new Member("c1", bootstrap, topic, group, null, total, n);
        Member c2 = new Member("c2", bootstrap, topic, group, null, total, n);
        c1.maxPerPoll = 50;
        c2.maxPerPoll = 50;
        c1.start();
        c2.start();
        waitFor(() -> reads.size() >= n / 2 || failure.get() != null, 120_000, "half read");
        paused.set(true);
        Thread.sleep(500);
        waitFor(() -> !c1.assigned.isEmpty() && !c2.assigned.isEmpty(), 60_000, "both consumers own partitions");
        int before = reads.size();
        System.out.println("HALF " + before + " c1 " + new TreeSet<>(c1.assigned) + " c2 " + new TreeSet<>(c2.assigned));
        System.out.flush();
        String line = new java.io.BufferedReader(new java.io.InputStreamReader(System.in)).readLine();
        check("GO".equals(line), "GO from the harness: " + line);
        long resumed = System.currentTimeMillis();
        paused.set(false);
        waitFor(() -> reads.size() >= n || failure.get() != null, 180_000, "every record read after the restart");
        System.out.println("RESUMED in " + (System.currentTimeMillis() - resumed) + " ms");
        c1.stop.set(true);
        c2.stop.set(true);
        c1.join();
        c2.join();
        check(failure.get() == null, String.valueOf(failure.get()));
        int dup = 0;
        for (int i = 0; i < n; i++) {
            AtomicInteger c = reads.get(i);
            check(c != null, "record " + i + " read");
            dup += c.get() - 1;
        }
        System.out.println("DUPLICATES " + dup + " STALE_COMMITS_RETRIED " + staleCommits.get());
        check(dup <= 2 * 50, "at most the uncommitted polls read twice: " + dup);
        try (KafkaConsumer<String, String> probe = new KafkaConsumer<>(consumerProps(bootstrap, group, null)); Admin admin = Admin.create(a)) {
            Set<TopicPartition> tps = new HashSet<>();
            for (int q = 0; q < PARTITIONS; q++) tps.add(new TopicPartition(topic, q));
            Map<TopicPartition, Long> ends = probe.endOffsets(tps);
            Map<TopicPartition, OffsetAndMetadata> committed =
                admin.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata().get();
            for (TopicPartition tp : tps) {
                OffsetAndMetadata m = committed.get(tp);
                check(m != null && m.offset() == ends.get(tp), "committed " + tp + " = " + m + ", end " + ends.get(tp));
            }
        }
        System.out.println("OK " + n);
    }

    static Properties consumerProps(String bootstrap, String group, String assignor) {
        Properties c = new Properties();
        c.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        c.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        c.put(ConsumerConfig.GROUP_PROTOCOL_CONFIG, "consumer");
        if (assignor != null) c.put(ConsumerConfig.GROUP_REMOTE_ASSIGNOR_CONFIG, assignor);
        c.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        c.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        c.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        c.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        return c;
    }

    static class Member extends Thread {
        final String name;
        final Properties props;
        final String topic;
        final AtomicInteger total;
        final int n;
        final AtomicBoolean stop = new AtomicBoolean();
        final Set<Integer> assigned = ConcurrentHashMap.newKeySet();
        volatile String memberId;
        boolean countReads = true;
        int maxPerPoll = 500;

        Member(String name, String bootstrap, String topic, String group, String assignor, AtomicInteger total, int n) {
            this.name = name;
            this.props = consumerProps(bootstrap, group, assignor);
            this.topic = topic;
            this.total = total;
            this.n = n;
        }

        public void run() {
            props.put(ConsumerConfig.MAX_POLL_RECORDS_CONFIG, Integer.toString(maxPerPoll));
            try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(props)) {
                consumer.subscribe(List.of(topic), new ConsumerRebalanceListener() {
                    public void onPartitionsRevoked(Collection<TopicPartition> ps) {
                        commit(consumer);
                        release(ps, "revoked");
                    }
                    public void onPartitionsLost(Collection<TopicPartition> ps) {
                        release(ps, "lost");
                    }
                    public void onPartitionsAssigned(Collection<TopicPartition> ps) {
                        for (TopicPartition tp : ps) {
                            String prev = owner.putIfAbsent(tp.partition(), name);
                            if (prev != null && !prev.equals(name))
                                failure.compareAndSet(null, name + " got partition " + tp.partition() + " still owned by " + prev);
                            assigned.add(tp.partition());
                        }
                        if (!ps.isEmpty()) System.out.println("REBALANCE " + name + " assigned " + parts(ps));
                    }
                    void release(Collection<TopicPartition> ps, String how) {
                        for (TopicPartition tp : ps) {
                            owner.remove(tp.partition(), name);
                            assigned.remove(tp.partition());
                        }
                        if (!ps.isEmpty()) System.out.println("REBALANCE " + name + " " + how + " " + parts(ps));
                    }
                });
                while (!stop.get()) {
                    if (paused.get()) {
                        Thread.sleep(50);
                        continue;
                    }
                    ConsumerRecords<String, String> rs = consumer.poll(Duration.ofMillis(100));
                    if (memberId == null && !consumer.groupMetadata().memberId().isEmpty())
                        memberId = consumer.groupMetadata().memberId();
                    for (ConsumerRecord<String, String> r : rs) {
                        if (!name.equals(owner.get(r.partition())))
                            failure.compareAndSet(null, name + " read partition " + r.partition() + " owned by " + owner.get(r.partition()));
                        if (!countReads) continue;
                        Header h = r.headers().lastHeader("idx");
                        int i = Integer.parseInt(new String(h.value(), StandardCharsets.UTF_8));
                        if (!r.value().equals("value-" + i)) failure.compareAndSet(null, "record " + i + " intact");
                        reads.computeIfAbsent(i, k -> new AtomicInteger()).incrementAndGet();
                        offsets.computeIfAbsent(r.partition(), k -> ConcurrentHashMap.newKeySet()).add(r.offset());
                    }
                    if (!rs.isEmpty()) commit(consumer);
                }
            } catch (Exception e) {
                failure.compareAndSet(null, name + ": " + e);
                e.printStackTrace(System.out);
            }
            System.out.println("CLOSED " + name);
        }
    }

    static final AtomicInteger staleCommits = new AtomicInteger();

    // A commit racing the heartbeat that bumps the member epoch fails with STALE_MEMBER_EPOCH
    // (CommitFailedException, as against Kafka); the client has the new epoch soon after.
    static void commit(KafkaConsumer<String, String> consumer) {
        for (int attempt = 0; ; attempt++) {
            try {
                consumer.commitSync();
                return;
            } catch (CommitFailedException e) {
                if (attempt >= 20 || !String.valueOf(e.getMessage()).contains("stale member epoch")) throw e;
                staleCommits.incrementAndGet();
                try { Thread.sleep(50); } catch (InterruptedException ie) { throw e; }
            }
        }
    }

    static String parts(Collection<TopicPartition> ps) {
        List<Integer> l = new ArrayList<>();
        for (TopicPartition tp : ps) l.add(tp.partition());
        Collections.sort(l);
        return l.toString();
    }

    interface Cond { boolean ok(); }

    static void waitFor(Cond c, long ms, String what) throws InterruptedException {
        long deadline = System.currentTimeMillis() + ms;
        while (!c.ok()) {
            check(System.currentTimeMillis() < deadline, "timed out waiting: " + what + " (" + failure.get() + ")");
            Thread.sleep(50);
        }
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            System.out.println("FAILED: " + what);
            System.out.flush();
            System.exit(2);
        }
    }
}
