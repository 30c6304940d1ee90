//! An Avro source in a team's own schema (issue 23): `ReadReceiptEvent(userId, channelId,
//! timestamp)` with string ids and a UUID message id, Confluent-framed under its own
//! schema id, read through `[source.fields]` by the TopologyTestDriver (the same task,
//! processor and decoders as `readstate run`): every key's pointer and message id equal
//! the max over its events; records the mapping cannot read are dead letters.

use std::collections::HashMap;

use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use readstate::ids::{ConversationId, Id, ReaderId};
use readstate::model::StateKey;
use readstate::serde::LocalRegistry;
use readstate::topology::compile;
use readstate_testing::{DriverStores, TopologyTestDriver};

const SCHEMA_ID: u32 = 7001;

const SCHEMA: &str = r#"{"type": "record", "name": "ReadReceiptEvent", "namespace": "team.b",
  "fields": [
    {"name": "userId", "type": "string"},
    {"name": "channelId", "type": "string"},
    {"name": "msgId", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}}
  ]}"#;

const TOPOLOGY: &str = r#"
[application]
id = "team-b"
[ids]
conversation = "string"
user = "string"
message = "uuid"
[[source]]
name = "receipts"
topic = "read-receipts"
format = "avro-confluent"
position = "timestamp"
time_unit = "ms"
fields = { reader = "userId", conversation = "channelId", position = "timestamp", message_id = "msgId" }
[[store]]
name = "read-state"
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["receipts"]
store = "read-state"
[[sink]]
name = "updates"
kind = "kafka"
input = "read-state"
topic = "updates"
"#;

fn encode(schema: &Schema, user: &str, channel: &str, msg: &str, ts: i64) -> Vec<u8> {
    let value = Value::Record(vec![
        ("userId".into(), Value::String(user.into())),
        ("channelId".into(), Value::String(channel.into())),
        ("msgId".into(), Value::Uuid(msg.parse().unwrap())),
        ("timestamp".into(), Value::TimestampMillis(ts)),
    ]);
    let mut out = vec![0];
    out.extend_from_slice(&SCHEMA_ID.to_be_bytes());
    let writer = GenericDatumWriter::builder(schema).build().unwrap();
    out.extend(writer.write_value_to_vec(value).unwrap());
    out
}

#[test]
fn a_teams_own_avro_schema_with_string_and_uuid_ids_folds_to_the_max() {
    let registry = LocalRegistry::new().with_schema(SCHEMA_ID, SCHEMA);
    let mut d = TopologyTestDriver::with(
        compile(TOPOLOGY).unwrap(),
        DriverStores::Memory,
        std::sync::Arc::new(registry),
    );
    let schema = Schema::parse_str(SCHEMA).unwrap();
    let mut rng = StdRng::seed_from_u64(23);
    // The oracle: per key, the max (timestamp in µs, message id).
    let mut want: HashMap<StateKey, (i64, String)> = HashMap::new();
    let mut offset = 0;
    for _ in 0..3_000 {
        let (user, channel) = (
            format!("user{}", rng.gen_range(0..40)),
            format!("chan-{}", rng.gen_range(0..25)),
        );
        let ts = 1_704_067_200_000 + rng.gen_range(0..500);
        let msg = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            rng.gen_range(0..4u32),
            rng.gen_range(0..1_000u64)
        );
        d.pipe_raw(0, offset, Some(&encode(&schema, &user, &channel, &msg, ts)));
        offset += 1;
        let key = StateKey {
            conversation: ConversationId(Id::text(&channel).unwrap()),
            reader: ReaderId(Id::text(&user).unwrap()),
        };
        let x = want.entry(key).or_insert((i64::MIN, String::new()));
        if (ts * 1000, &msg) > (x.0, &x.1) {
            *x = (ts * 1000, msg);
        }
        if rng.gen_range(0..100) == 0 {
            d.flush();
        }
    }
    // A record of this schema cut short: a dead letter (malformed), processing goes on.
    d.pipe_raw(0, offset, Some(&[0, 0, 0, 0x1b, 0x59, 0]));
    d.flush();
    for (key, (seq, msg)) in &want {
        let s = d.state(key).unwrap();
        assert_eq!(
            (s.last_read_seq, s.message_id.as_deref()),
            (*seq, Some(msg.as_str())),
            "{key:?}"
        );
    }
    let letters = d.dead_letters();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        (letters[0].offset, letters[0].reason),
        (offset, "malformed")
    );
}
