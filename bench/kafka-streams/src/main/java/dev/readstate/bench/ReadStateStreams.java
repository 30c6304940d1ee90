package dev.readstate.bench;

import java.io.File;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;

import org.apache.avro.Schema;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.state.Stores;

/**
 * The job of readstate's topologies/read_receipts.toml in Kafka Streams, for benchmarks:
 * Confluent-framed Avro read events keyed by conversation, one task per partition, per
 * (conversation, reader) the max pointer with its fields and the event and stale counts in
 * a RocksDB store with a changelog and the record cache, and a coalesced update per
 * advanced key per commit interval to the output topic (Avro, Confluent framing).
 *
 * <p>Arguments: --brokers --source --output --application-id --state-dir --schemas DIR
 * [--guarantee at_least_once|exactly_once_v2] [--commit-interval-ms 1000]
 * [--cache-bytes N]. Runs until SIGTERM.
 */
public final class ReadStateStreams {
    private ReadStateStreams() {}

    public static void main(String[] args) throws Exception {
        Map<String, String> a = parse(args);
        File schemas = new File(a.get("schemas"));
        Schema readEvent = new Schema.Parser().parse(new File(schemas, "read_event.avsc"));
        Schema update = new Schema.Parser().parse(new File(schemas, "receipt_update.avsc"));
        long commitMs = Long.parseLong(a.getOrDefault("commit-interval-ms", "1000"));

        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, a.get("application-id"));
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, a.get("brokers"));
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, a.getOrDefault("guarantee", "at_least_once"));
        p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, commitMs);
        p.put(StreamsConfig.STATE_DIR_CONFIG, a.get("state-dir"));
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
        // The record cache: readstate's default budget is 500,000 entries of ~200 bytes.
        p.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG,
              Long.parseLong(a.getOrDefault("cache-bytes", String.valueOf(100L << 20))));
        p.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");

        Topology t = new Topology();
        t.addSource("read-events", Serdes.ByteArray().deserializer(),
                    Serdes.ByteArray().deserializer(), a.get("source"));
        t.addProcessor("read-state", () -> new ReadStateProcessor(readEvent, update, commitMs),
                       "read-events");
        t.addStateStore(Stores.keyValueStoreBuilder(
                                Stores.persistentKeyValueStore(ReadStateProcessor.STORE),
                                Serdes.Bytes(), Serdes.ByteArray())
                            .withCachingEnabled()
                            .withLoggingEnabled(Map.of()),
                        "read-state");
        t.addSink("receipt-updates", a.get("output"), Serdes.ByteArray().serializer(),
                  Serdes.ByteArray().serializer(), "read-state");

        KafkaStreams streams = new KafkaStreams(t, p);
        CountDownLatch stopped = new CountDownLatch(1);
        // A stream thread that dies takes the whole client down, and the process exits 1,
        // so that whoever waits for it (readstate bench) learns at once instead of hanging.
        streams.setUncaughtExceptionHandler(e -> {
            e.printStackTrace();
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.ERROR) {
                stopped.countDown();
            }
        });
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            streams.close(Duration.ofSeconds(30));
            stopped.countDown();
        }));
        streams.start();
        stopped.await();
        if (streams.state() == KafkaStreams.State.ERROR) {
            System.err.println("kafka streams stopped in state ERROR");
            Runtime.getRuntime().halt(1);
        }
    }

    private static Map<String, String> parse(String[] args) {
        Map<String, String> m = new HashMap<>();
        for (int i = 0; i + 1 < args.length; i += 2) {
            if (!args[i].startsWith("--")) {
                throw new IllegalArgumentException("expected --name value, got " + args[i]);
            }
            m.put(args[i].substring(2), args[i + 1]);
        }
        for (String required : new String[] {"brokers", "source", "output", "application-id",
                                             "state-dir", "schemas"}) {
            if (!m.containsKey(required)) {
                throw new IllegalArgumentException("missing --" + required);
            }
        }
        return m;
    }
}
