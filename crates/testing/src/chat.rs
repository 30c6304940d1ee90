//! Helpers of the unread-count tests: the topology with a co-partitioned message source,
//! producing a chat workload to its two topics.

use rdkafka::producer::BaseRecord;
use readstate::serde::avro::{AvroReadEvent, EventEncoder};
use readstate::serde::message::{AvroMessageEvent, MessageEncoder};
use readstate::serde::registry::{LOCAL_MESSAGE_EVENT_ID, LOCAL_READ_EVENT_ID};
use readstate::serde::{MESSAGE_EVENT_SCHEMA, READ_EVENT_SCHEMA};
use readstate_tools::loadgen::chat::ChatEvent;

use crate::kafka;

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

/// A topology reading both topics into one processor (unread_cap 1000), with the receipts
/// and conversation-heads outputs; `extra` is appended (e.g. postgres sinks).
pub fn topology_text(
    app: &str,
    state_dir: &std::path::Path,
    t: &ChatTopics,
    extra: &str,
) -> String {
    format!(
        r#"
[application]
id = "{app}"
commit_interval = "200ms"
state_dir = "{dir}"
[[source]]
name = "reads"
topic = "{reads}"
[[source]]
name = "messages"
topic = "{messages}"
records = "message-events"
[[store]]
name = "read-state"
[[store]]
name = "head-state"
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["reads", "messages"]
store = "read-state"
heads_store = "head-state"
unread_cap = 1000
[[sink]]
name = "updates"
kind = "kafka"
input = "read-state"
topic = "{updates}"
[[sink]]
name = "heads"
kind = "kafka"
input = "read-state"
output = "conversation-heads"
topic = "{heads}"
{extra}"#,
        dir = state_dir.display(),
        reads = t.reads,
        messages = t.messages,
        updates = t.updates,
        heads = t.heads,
    )
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
