// The Java reference client (kafka-clients) against Weir, with its defaults: an idempotent
// producer (acks=all, enable.idempotence=true since Kafka 3.0) and a consumer group that
// subscribes, polls and commits. Prints "BROKERS <n> CONTROLLER <id>" as DescribeCluster says,
// "DESCRIBED <partitions>" as describeTopics says, then "OK <records>" on success; exits non-zero otherwise. Arguments: bootstrap topic records
// [compression [replication factor]].
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.*;
import java.util.concurrent.Future;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.clients.consumer.*;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class WeirJavaClient {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        String topic = args[1];
        int n = Integer.parseInt(args[2]);
        String compression = args.length > 3 ? args[3] : "none";
        short replicationFactor = args.length > 4 ? Short.parseShort(args[4]) : 1;

        Properties a = new Properties();
        a.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        try (Admin admin = Admin.create(a)) {
            DescribeClusterResult cluster = admin.describeCluster();
            System.out.println("BROKERS " + cluster.nodes().get().size() + " CONTROLLER " + cluster.controller().get().id());
            admin.createTopics(List.of(new NewTopic(topic, 3, replicationFactor))).all().get();
            Set<String> names = admin.listTopics().names().get();
            check(names.contains(topic) && !names.contains("__consumer_offsets"), "listTopics hides internal topics: " + names);
            // describeTopics goes through DescribeTopicPartitions (KIP-966) on a 3.7+ broker;
            // a limit of 2 partitions a response makes the client follow the cursor. Every
            // broker's image has the new topic soon, not at once: retried for a while.
            TopicDescription d = null;
            long until = System.currentTimeMillis() + 15_000;
            while (true) {
                try {
                    d = admin.describeTopics(List.of(topic), new DescribeTopicsOptions().partitionSizeLimitPerResponse(2))
                        .allTopicNames().get().get(topic);
                    boolean led = d.partitions().stream().allMatch(pi -> pi.leader() != null);
                    if ((d.partitions().size() == 3 && led) || System.currentTimeMillis() > until) break;
                } catch (java.util.concurrent.ExecutionException e) {
                    if (System.currentTimeMillis() > until) throw e;
                }
                Thread.sleep(200);
            }
            check(d.partitions().size() == 3, "describeTopics pages over every partition: " + d);
            for (org.apache.kafka.common.TopicPartitionInfo pi : d.partitions())
                check(pi.leader() != null && pi.replicas().size() == replicationFactor, "partition described: " + pi);
            check(!d.topicId().equals(org.apache.kafka.common.Uuid.ZERO_UUID), "topic id: " + d);
            System.out.println("DESCRIBED " + d.partitions().size());
        }

        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, compression);
        p.put(ProducerConfig.LINGER_MS_CONFIG, "5");
        List<Future<RecordMetadata>> acks = new ArrayList<>();
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(p)) {
            for (int i = 0; i < n; i++) {
                ProducerRecord<String, String> r = new ProducerRecord<>(topic, "key-" + (i % 100), "value-" + i);
                r.headers().add("idx", Integer.toString(i).getBytes(StandardCharsets.UTF_8));
                acks.add(producer.send(r));
            }
            producer.flush();
            for (Future<RecordMetadata> f : acks) f.get();
        }

        Properties c = new Properties();
        c.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        c.put(ConsumerConfig.GROUP_ID_CONFIG, "test");
        c.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        c.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        c.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        c.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        Set<Integer> seen = new HashSet<>();
        Map<Integer, Long> lastOffset = new HashMap<>();
        try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(c)) {
            consumer.subscribe(List.of(topic));
            long deadline = System.currentTimeMillis() + 60_000;
            while (seen.size() < n && System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(200))) {
                    Header h = r.headers().lastHeader("idx");
                    int i = Integer.parseInt(new String(h.value(), StandardCharsets.UTF_8));
                    check(r.value().equals("value-" + i) && r.key().equals("key-" + (i % 100)), "record " + i + " intact");
                    check(seen.add(i), "record " + i + " read once");
                    Long prev = lastOffset.put(r.partition(), r.offset());
                    check(prev == null || prev < r.offset(), "offsets increase within a partition");
                }
            }
            consumer.commitSync();
            Map<org.apache.kafka.common.TopicPartition, OffsetAndMetadata> committed =
                consumer.committed(consumer.assignment());
            long total = 0;
            for (OffsetAndMetadata m : committed.values()) total += m.offset();
            check(total == n, "committed offsets cover every record: " + total);
        }
        check(seen.size() == n, "read " + seen.size() + " of " + n);
        System.out.println("OK " + seen.size());
    }

    static void check(boolean ok, String what) {
        if (!ok) {
            System.out.println("FAILED: " + what);
            System.exit(2);
        }
    }
}
