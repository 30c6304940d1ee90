package dev.readstate.bench;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.LinkedHashSet;
import java.util.Set;

import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.BinaryEncoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.io.EncoderFactory;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.processor.PunctuationType;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * readstate's fold: a pointer only moves forward (seq greater than the stored one), the
 * version counts advances, every event is counted and the ones that did not advance are
 * stale. State goes through the cached store (the record cache coalesces the RocksDB and
 * changelog writes); the keys that advanced are emitted once per commit interval, as
 * readstate's flush does.
 */
final class ReadStateProcessor implements Processor<byte[], byte[], byte[], byte[]> {
    static final String STORE = "read-state";
    /** The local schema id of receipt_update.avsc (readstate --local-schemas). */
    private static final int UPDATE_SCHEMA_ID = 2;

    private final GenericDatumReader<GenericRecord> reader;
    private final GenericDatumWriter<GenericRecord> writer;
    private final Schema updateSchema;
    private final long commitMs;
    private final Set<Bytes> advanced = new LinkedHashSet<>();
    private final ByteArrayOutputStream out = new ByteArrayOutputStream(256);
    private BinaryDecoder decoder;
    private BinaryEncoder encoder;
    private GenericRecord event;
    private ProcessorContext<byte[], byte[]> context;
    private KeyValueStore<Bytes, byte[]> store;

    ReadStateProcessor(Schema readEvent, Schema update, long commitMs) {
        this.reader = new GenericDatumReader<>(readEvent);
        this.writer = new GenericDatumWriter<>(update);
        this.updateSchema = update;
        this.commitMs = commitMs;
    }

    @Override
    public void init(ProcessorContext<byte[], byte[]> context) {
        this.context = context;
        this.store = context.getStateStore(STORE);
        context.schedule(Duration.ofMillis(commitMs), PunctuationType.WALL_CLOCK_TIME, this::emit);
    }

    @Override
    public void process(Record<byte[], byte[]> r) {
        byte[] v = r.value();
        if (v == null || v.length < 5 || v[0] != 0) {
            return; // readstate dead-letters these; the yardstick skips them
        }
        try {
            decoder = DecoderFactory.get().binaryDecoder(v, 5, v.length - 5, decoder);
            event = reader.read(event, decoder);
        } catch (IOException | RuntimeException e) {
            return;
        }
        long conversation = (Long) event.get("conversation_id");
        long readerId = (Long) event.get("reader_id");
        long seq = (Long) event.get("message_seq");
        if (seq < 0) {
            return;
        }
        Bytes key = Bytes.wrap(ByteBuffer.allocate(16).putLong(conversation).putLong(readerId).array());
        State s = State.decode(store.get(key));
        s.events++;
        s.eventsSince++;
        if (seq > s.seq) {
            s.seq = seq;
            s.version++;
            s.messageId = str(event.get("message_id"));
            Object sender = event.get("sender_id");
            s.sender = sender == null ? Long.MIN_VALUE : (Long) sender;
            s.device = str(event.get("device_id"));
            s.readAt = (Long) event.get("read_at");
            advanced.add(key);
        } else {
            s.stale++;
            s.staleSince++;
        }
        store.put(key, s.encode());
    }

    private static String str(Object o) {
        return o == null ? null : o.toString();
    }

    /** One update per key that advanced since the last emit. */
    private void emit(long now) {
        for (Bytes key : advanced) {
            State s = State.decode(store.get(key));
            ByteBuffer k = ByteBuffer.wrap(key.get());
            long conversation = k.getLong();
            long readerId = k.getLong();
            GenericRecord u = new GenericData.Record(updateSchema);
            u.put("conversation_id", conversation);
            u.put("reader_id", readerId);
            u.put("last_read_seq", s.seq);
            u.put("message_id", s.messageId);
            u.put("sender_id", s.sender == Long.MIN_VALUE ? null : s.sender);
            u.put("device_id", s.device);
            u.put("read_at", s.readAt);
            u.put("version", s.version);
            u.put("events_folded", s.eventsSince);
            u.put("stale_events", s.staleSince);
            u.put("events_total", s.events);
            u.put("stale_total", s.stale);
            u.put("emitted_at", now);
            // As readstate's read_receipts topology: no message source, no counts.
            u.put("unread_count", null);
            u.put("mention_count", null);
            u.put("counts_capped", false);
            byte[] value = encode(u);
            byte[] outKey = Long.toString(conversation).getBytes(StandardCharsets.UTF_8);
            context.forward(new Record<>(outKey, value, now));
            s.eventsSince = 0;
            s.staleSince = 0;
            store.put(key, s.encode());
        }
        advanced.clear();
    }

    private byte[] encode(GenericRecord u) {
        out.reset();
        out.write(0);
        out.write(ByteBuffer.allocate(4).putInt(UPDATE_SCHEMA_ID).array(), 0, 4);
        encoder = EncoderFactory.get().binaryEncoder(out, encoder);
        try {
            writer.write(u, encoder);
            encoder.flush();
        } catch (IOException e) {
            throw new IllegalStateException(e);
        }
        return out.toByteArray();
    }

    /** The stored value: seq, version, counts, then the fields of the max. */
    static final class State {
        long seq = -1;
        long version;
        long events;
        long stale;
        long eventsSince;
        long staleSince;
        long sender = Long.MIN_VALUE;
        long readAt;
        String messageId;
        String device;

        static State decode(byte[] b) {
            State s = new State();
            if (b == null) {
                return s;
            }
            ByteBuffer in = ByteBuffer.wrap(b);
            s.seq = in.getLong();
            s.version = in.getLong();
            s.events = in.getLong();
            s.stale = in.getLong();
            s.eventsSince = in.getLong();
            s.staleSince = in.getLong();
            s.sender = in.getLong();
            s.readAt = in.getLong();
            s.messageId = getString(in);
            s.device = getString(in);
            return s;
        }

        byte[] encode() {
            byte[] m = bytes(messageId);
            byte[] d = bytes(device);
            ByteBuffer b = ByteBuffer.allocate(64 + 8 + len(m) + len(d));
            b.putLong(seq).putLong(version).putLong(events).putLong(stale)
             .putLong(eventsSince).putLong(staleSince).putLong(sender).putLong(readAt);
            putString(b, m);
            putString(b, d);
            return b.array();
        }

        private static byte[] bytes(String s) {
            return s == null ? null : s.getBytes(StandardCharsets.UTF_8);
        }

        private static int len(byte[] b) {
            return b == null ? 0 : b.length;
        }

        private static void putString(ByteBuffer b, byte[] s) {
            b.putInt(s == null ? -1 : s.length);
            if (s != null) {
                b.put(s);
            }
        }

        private static String getString(ByteBuffer in) {
            int n = in.getInt();
            if (n < 0) {
                return null;
            }
            byte[] s = new byte[n];
            in.get(s);
            return new String(s, StandardCharsets.UTF_8);
        }
    }
}
