//! A realistic read-event workload, and the oracle of what it must produce.
//!
//! Conversations are Zipf-distributed by activity; 70% are 1:1, the rest groups of 3–40
//! members. Each step posts 0–4 new messages to a conversation and has one member read up
//! to the head (sometimes a little behind), from one of the reader's 1–3 devices. Bursts
//! (one conversation read many times in a row), reordering (an event held back and sent
//! later), duplicates (an event sent twice) and poison pills (bytes that are not Avro) are
//! mixed in at configurable rates. [`Oracle`] keeps, per (conversation, reader), the max
//! `message_seq` and the number of valid events: what readstate's state must equal.

pub mod chat;

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use readstate::ids::{ConversationId, ReaderId, SenderId};
use readstate::model::{ReadEvent, StateKey};

/// The shape of a workload.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub events: u64,
    pub conversations: u64,
    /// Zipf exponent of conversation activity.
    pub zipf: f64,
    pub seed: u64,
    pub duplicate_rate: f64,
    pub reorder_rate: f64,
    pub burst_rate: f64,
    pub poison_rate: f64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            events: 1_000_000,
            conversations: 50_000,
            zipf: 1.05,
            seed: 42,
            duplicate_rate: 0.02,
            reorder_rate: 0.05,
            burst_rate: 0.01,
            poison_rate: 0.0005,
        }
    }
}

/// One record to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generated {
    Event(ReadEvent),
    /// Bytes that are not a valid record (must become a dead letter).
    Poison(Vec<u8>),
}

/// Per key: (max seq, valid events).
#[derive(Debug, Default, Clone)]
pub struct Oracle {
    pub keys: HashMap<StateKey, (i64, i64)>,
    pub events: u64,
    pub poison: u64,
}

impl Oracle {
    pub fn record(&mut self, g: &Generated) {
        match g {
            Generated::Event(e) => {
                self.events += 1;
                let x = self.keys.entry(e.key()).or_insert((-1, 0));
                x.0 = x.0.max(e.message_seq);
                x.1 += 1;
            }
            Generated::Poison(_) => self.poison += 1,
        }
    }
}

/// The generator: an iterator of `spec.events` records (poison included).
pub struct Generator {
    spec: WorkloadSpec,
    rng: StdRng,
    zipf: Zipf<f64>,
    heads: HashMap<u64, i64>,
    held: Option<Generated>,
    released: Option<Generated>,
    burst: Option<(u64, u32)>,
    last: Option<ReadEvent>,
    emitted: u64,
}

impl Generator {
    pub fn new(spec: WorkloadSpec) -> Self {
        let zipf = Zipf::new(spec.conversations.max(1), spec.zipf.max(0.01))
            .expect("valid zipf parameters");
        Self {
            rng: StdRng::seed_from_u64(spec.seed),
            zipf,
            heads: HashMap::new(),
            held: None,
            released: None,
            burst: None,
            last: None,
            emitted: 0,
            spec,
        }
    }

    /// Members of conversation `c` (stable): 2 for 1:1s, 3–40 for groups.
    fn members(c: u64) -> u64 {
        let h = mix(c);
        if h % 10 < 7 {
            2
        } else {
            3 + (h >> 8) % 38
        }
    }

    fn member(c: u64, i: u64) -> i64 {
        (mix(c.wrapping_mul(1_000_003).wrapping_add(i)) % 10_000_000) as i64
    }

    fn step(&mut self) -> Generated {
        if self.rng.gen_bool(self.spec.poison_rate) {
            let n = self.rng.gen_range(1..40);
            let mut b: Vec<u8> = (0..n).map(|_| self.rng.gen()).collect();
            b[0] = 0xff; // never the wire format's magic byte
            return Generated::Poison(b);
        }
        if let Some(e) = self.last.clone() {
            if self.rng.gen_bool(self.spec.duplicate_rate) {
                return Generated::Event(e);
            }
        }
        let conv = match self.burst {
            Some((c, n)) if n > 0 => {
                self.burst = Some((c, n - 1));
                c
            }
            _ => {
                let c = self.zipf.sample(&mut self.rng) as u64;
                if self.rng.gen_bool(self.spec.burst_rate) {
                    self.burst = Some((c, self.rng.gen_range(5..40)));
                }
                c
            }
        };
        let head = self.heads.entry(conv).or_insert(0);
        *head += self.rng.gen_range(0..5);
        let head = *head;
        let members = Self::members(conv);
        let reader = Self::member(conv, self.rng.gen_range(0..members));
        let behind = if self.rng.gen_bool(0.2) {
            self.rng.gen_range(0..4)
        } else {
            0
        };
        let seq = (head - behind).max(0);
        let devices = 1 + (mix(reader as u64) % 3);
        let device = format!("dev-{}", self.rng.gen_range(0..devices));
        let e = ReadEvent {
            reader_id: ReaderId::from(reader),
            conversation_id: ConversationId::from(conv as i64),
            message_seq: seq,
            message_id: Some(format!("{conv}-{seq}")),
            sender_id: Some(SenderId::from(Self::member(conv, seq as u64 % members))),
            device_id: Some(device),
            read_at_ms: 1_760_000_000_000 + self.emitted as i64,
        };
        self.last = Some(e.clone());
        Generated::Event(e)
    }
}

impl Iterator for Generator {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        if let Some(x) = self.released.take() {
            return Some(x);
        }
        loop {
            if self.emitted >= self.spec.events {
                return self.held.take();
            }
            self.emitted += 1;
            let g = self.step();
            match self.held.take() {
                // Hold this one back; it goes out after one or more later events.
                None if self.rng.gen_bool(self.spec.reorder_rate) => self.held = Some(g),
                None => return Some(g),
                Some(h) if self.rng.gen_bool(0.3) => {
                    self.released = Some(h);
                    return Some(g);
                }
                Some(h) => {
                    self.held = Some(h);
                    return Some(g);
                }
            }
        }
    }
}

/// A 64-bit mixer (SplitMix64's finaliser): stable pseudo-random per input.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seconds since the epoch of position 0 in [`go_service_json`]'s `read_at`.
pub const GO_JSON_BASE_S: i64 = 1_700_000_000;

/// `e`, a generated event, in the shape of a Go service's read receipts (the shape of
/// `topologies/json_read_receipts.toml`): string user and conversation ids (`user456`,
/// `conv789`), a UUID message id (one per position), `read_at` in seconds (`GO_JSON_BASE_S`
/// + the event's seq), a device, and a field readstate does not map.
pub fn go_service_json(e: &ReadEvent) -> String {
    let s = go_service_ids(e);
    format!(
        r#"{{"msg_id":"{}","sender_id":"{}","reader_id":"{}","conversation_id":"{}","read_at":{},"device_id":"{}","client":{{"os":"ios","version":"7.1.2"}}}}"#,
        s.message_id.as_deref().unwrap_or_default(),
        go_service_sender(e),
        s.reader_id,
        s.conversation_id,
        GO_JSON_BASE_S + e.message_seq,
        e.device_id.as_deref().unwrap_or("none"),
    )
}

/// `e` with the ids [`go_service_json`] gives it, as readstate decodes them under
/// `[ids] conversation = "string", user = "string", message = "uuid"` (for oracles).
pub fn go_service_ids(e: &ReadEvent) -> ReadEvent {
    let text = |prefix: &str, id: &dyn std::fmt::Display| {
        readstate::ids::Id::text(&format!("{prefix}{id}")).expect("short id")
    };
    ReadEvent {
        reader_id: readstate::ids::ReaderId(text("user", &e.reader_id)),
        conversation_id: readstate::ids::ConversationId(text("conv", &e.conversation_id)),
        sender_id: e
            .sender_id
            .as_ref()
            .map(|s| readstate::ids::SenderId(text("user", s))),
        message_id: Some(format!("550e8400-e29b-41d4-a716-{:012x}", e.message_seq)),
        ..e.clone()
    }
}

/// The `sender_id` [`go_service_json`] writes (the record key of such a topic).
pub fn go_service_sender(e: &ReadEvent) -> String {
    e.sender_id
        .as_ref()
        .map_or("user0".into(), |s| format!("user{s}"))
}

/// The position readstate keeps for [`go_service_json`]'s `read_at` (microseconds).
pub fn go_service_position(seq: i64) -> i64 {
    (GO_JSON_BASE_S + seq) * 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_exactly_the_requested_records_deterministically() {
        let spec = WorkloadSpec {
            events: 20_000,
            conversations: 500,
            poison_rate: 0.01,
            ..Default::default()
        };
        let a: Vec<Generated> = Generator::new(spec.clone()).collect();
        let b: Vec<Generated> = Generator::new(spec).collect();
        assert_eq!(a.len(), 20_000);
        assert_eq!(a, b);
        let mut o = Oracle::default();
        a.iter().for_each(|g| o.record(g));
        assert_eq!(o.events + o.poison, 20_000);
        assert!(o.poison > 100 && o.poison < 400, "poison {}", o.poison);
        // Coalescing has something to do: many more events than keys.
        assert!(o.keys.len() * 3 < o.events as usize);
        assert!(o.keys.values().all(|(max, n)| *max >= 0 && *n >= 1));
    }
}
