//! Helpers of the unread-count tests: the topology with a co-partitioned message source,
//! producing a chat workload to its two topics.

use rdkafka::producer::BaseRecord;
use readstate::serde::avro::{AvroReadEvent, EventEncoder};
use readstate::serde::message::{AvroMessageEvent, MessageEncoder};
use readstate::serde::registry::{LOCAL_MESSAGE_EVENT_ID, LOCAL_READ_EVENT_ID};
use readstate::serde::{MESSAGE_EVENT_SCHEMA, READ_EVENT_SCHEMA};
use readstate_tools::loadgen::chat::ChatEvent;

use crate::fixtures::Shipped;
use crate::kafka;

/// The internal topics of the chat topologies (`read_state_with_unread.toml`) but the dead
/// letters', after `<application id>-`: what a test makes on a mock cluster, which does
/// not answer CreateTopics.
pub const INTERNAL_TOPICS: [&str; 4] = [
    "read-state-changelog",
    "head-state-changelog",
    "read-events-rerouted",
    "message-events-rerouted",
];

/// The topics of one test.
pub struct ChatTopics {
    pub reads: String,
    pub messages: String,
    pub updates: String,
    pub heads: String,
}

impl ChatTopics {
    pub fn new(suffix: &str) -> Self {
        Self {
            reads: format!("reads-{suffix}"),
            messages: format!("messages-{suffix}"),
            updates: format!("updates-{suffix}"),
            heads: format!("heads-{suffix}"),
        }
    }

    pub fn all(&self) -> [&str; 4] {
        [&self.reads, &self.messages, &self.updates, &self.heads]
    }
}

/// `topologies/read_state_with_unread.toml` on the test's topics: its sources
/// `read-events` and `message-events` read both into one processor (unread_cap 1000), its
/// sinks `receipt-updates` and `conversation-heads` write the receipts and heads; a 200 ms
/// commit interval, no minimum emit interval, and without its PostgreSQL sinks.
pub fn fixture(app: &str, state_dir: &std::path::Path, t: &ChatTopics) -> Shipped {
    Shipped::load("read_state_with_unread.toml")
        .set("application.id", app)
        .set("application.commit_interval", "200ms")
        .set("application.state_dir", state_dir.display().to_string())
        .set("source.read-events.topic", t.reads.as_str())
        .set("source.message-events.topic", t.messages.as_str())
        .set("sink.receipt-updates.topic", t.updates.as_str())
        .set("sink.conversation-heads.topic", t.heads.as_str())
        .set("processor.read-state.min_emit_interval", "0s")
        .without("sink.postgres")
        .without("sink.postgres-heads")
}

/// The text of [`fixture`], with the tables of `extra` added (e.g. postgres sinks).
pub fn topology_text(
    app: &str,
    state_dir: &std::path::Path,
    t: &ChatTopics,
    extra: &str,
) -> String {
    fixture(app, state_dir, t).with_tables(extra).text()
}

/// Produce chat events, each keyed by its conversation to its own topic.
pub fn produce(brokers: &str, t: &ChatTopics, events: &[ChatEvent]) {
    produce_with(brokers, t, events, "murmur2_random");
}

/// The same, the message events placed by librdkafka's `partitioner` (the read events
/// by murmur2, as Java clients).
pub fn produce_with(brokers: &str, t: &ChatTopics, events: &[ChatEvent], partitioner: &str) {
    let p = kafka::producer(brokers);
    let pm = kafka::producer_with(brokers, partitioner);
    let reads = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID).unwrap();
    let messages = MessageEncoder::new(MESSAGE_EVENT_SCHEMA, LOCAL_MESSAGE_EVENT_ID).unwrap();
    for e in events {
        let key = e.conversation().0.to_string();
        let (topic, value) = match e {
            ChatEvent::Read(r) => (&t.reads, reads.encode(&AvroReadEvent::from(r))),
            ChatEvent::Message(m) => (&t.messages, messages.encode(&AvroMessageEvent::from(m))),
        };
        let value = value.unwrap();
        let producer = match e {
            ChatEvent::Read(_) => &p,
            ChatEvent::Message(_) => &pm,
        };
        kafka::send(
            producer,
            BaseRecord::to(topic.as_str())
                .key(key.as_str())
                .payload(value.as_slice()),
        );
    }
    kafka::flush(&p);
    kafka::flush(&pm);
}

/// [`fixture`] with both sources in a service's own JSON shape (see [`produce_json`]),
/// mapped by fields.
pub fn json_fixture(app: &str, state_dir: &std::path::Path, t: &ChatTopics) -> Shipped {
    fixture(app, state_dir, t)
        .set("source.read-events.format", "json")
        .set_toml(
            "source.read-events.fields",
            r#"{ reader = "user", conversation = "conv", position = "seq", device = "device", read_at = "at" }"#,
        )
        .set("source.message-events.format", "json")
        .set_toml(
            "source.message-events.fields",
            r#"{ conversation = "conv", position = "seq", message_id = "id", sender = "from.id", sent_at = "sent_at", mentions = "mentions", mention_everyone = "everyone" }"#,
        )
}

/// The text of [`json_fixture`], with the tables of `extra` added.
pub fn json_topology_text(
    app: &str,
    state_dir: &std::path::Path,
    t: &ChatTopics,
    extra: &str,
) -> String {
    json_fixture(app, state_dir, t).with_tables(extra).text()
}

/// [`json_fixture`] with the reads naming their message by id (`msg`) instead of a seq:
/// `position = "message_id"`, resolved through the message source, each read waiting up
/// to `wait` of message time for its message.
pub fn json_message_id_fixture(
    app: &str,
    state_dir: &std::path::Path,
    t: &ChatTopics,
    wait: &str,
) -> Shipped {
    json_fixture(app, state_dir, t)
        .set("source.read-events.position", "message_id")
        .set_toml(
            "source.read-events.fields",
            r#"{ reader = "user", conversation = "conv", message_id = "msg", device = "device", read_at = "at" }"#,
        )
        .set("processor.read-state.message_wait", wait)
}

/// The text of [`json_message_id_fixture`], with the tables of `extra` added.
pub fn json_message_id_topology_text(
    app: &str,
    state_dir: &std::path::Path,
    t: &ChatTopics,
    wait: &str,
    extra: &str,
) -> String {
    json_message_id_fixture(app, state_dir, t, wait)
        .with_tables(extra)
        .text()
}

/// A chat event in the JSON shape of [`json_topology_text`].
pub fn chat_json(e: &ChatEvent) -> String {
    match e {
        ChatEvent::Read(r) => format!(
            r#"{{"user":{},"conv":"{}","seq":{},"msg":{},"device":{},"at":{}}}"#,
            json_id(&r.reader_id.0),
            r.conversation_id.0,
            r.message_seq,
            json_text(r.message_id.as_deref()),
            json_text(r.device_id.as_deref()),
            r.read_at_ms
        ),
        ChatEvent::Message(m) => {
            let mentions: Vec<String> = m.mentions.iter().map(|u| json_id(&u.0)).collect();
            format!(
                r#"{{"conv":"{}","seq":{},"id":{},"from":{{"id":{},"name":"u"}},"sent_at":{},"mentions":[{}],"everyone":{},"text":"hello, world"}}"#,
                m.conversation_id.0,
                m.message_seq,
                json_text(m.message_id.as_deref()),
                json_id(&m.sender_id.0),
                m.sent_at_ms,
                mentions.join(","),
                m.mention_everyone
            )
        }
    }
}

/// Optional text as JSON: a string, or null.
fn json_text(s: Option<&str>) -> String {
    s.map_or("null".to_owned(), |s| format!("\"{s}\""))
}

/// An id as JSON: a number, or a quoted string.
fn json_id(id: &readstate::ids::Id) -> String {
    serde_json::to_string(id).expect("an id is JSON")
}

/// Produce chat events as JSON ([`chat_json`]), each keyed by its conversation to its own
/// topic (murmur2).
pub fn produce_json(brokers: &str, t: &ChatTopics, events: &[ChatEvent]) {
    let p = kafka::producer(brokers);
    for e in events {
        let key = e.conversation().0.to_string();
        let topic = match e {
            ChatEvent::Read(_) => &t.reads,
            ChatEvent::Message(_) => &t.messages,
        };
        let value = chat_json(e);
        kafka::send(
            &p,
            BaseRecord::to(topic.as_str())
                .key(key.as_str())
                .payload(value.as_bytes()),
        );
    }
    kafka::flush(&p);
}

/// The receipts every sender should hold: per (sender, conversation, reader), the highest
/// of the sender's messages at or below the reader's final pointer (the reader's own
/// messages excluded). Integer ids.
pub fn sender_oracle(
    w: &readstate_tools::loadgen::chat::ChatWorkload,
) -> std::collections::HashMap<(i64, i64, i64), i64> {
    let mut want = std::collections::HashMap::new();
    for (key, pointer) in &w.pointers {
        for m in &w.messages[&key.conversation] {
            if m.message_seq <= *pointer && m.sender_id.0 != key.reader.0 {
                let t = (
                    m.sender_id.as_int().unwrap(),
                    key.conversation.as_int().unwrap(),
                    key.reader.as_int().unwrap(),
                );
                let b = want.entry(t).or_insert(-1);
                *b = (*b).max(m.message_seq);
            }
        }
    }
    want
}
