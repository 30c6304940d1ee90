//! `readstate run` against an in-process Kafka-protocol broker (MockCluster).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use readstate::kafka::KafkaSettings;
use readstate::model::{ReadEvent, ReceiptUpdate, StateKey};
use readstate::runtime::{run, RunConfig, RunSummary};
use readstate::serde::avro::{AvroReadEvent, EventEncoder, UpdateDecoder};
use readstate::serde::registry::LOCAL_READ_EVENT_ID;
use readstate::serde::{LocalRegistry, READ_EVENT_SCHEMA, RECEIPT_UPDATE_SCHEMA};
use readstate::state::rocks::{RocksDbOptions, RocksDbStore};
use readstate::state::{KeyValueStore, ReadState, StoreKey};
use readstate::topology::{compile, Topology};

const PARTS: i32 = 4;

struct Env {
    mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    app: String,
    source: String,
    output: String,
    state: tempfile::TempDir,
}

fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl Env {
    fn new() -> Self {
        let mock = MockCluster::new(1).unwrap();
        let s = suffix();
        let env = Env {
            mock,
            app: format!("app-{s}"),
            source: format!("events-{s}"),
            output: format!("updates-{s}"),
            state: tempfile::tempdir().unwrap(),
        };
        env.mock.create_topic(&env.source, PARTS, 1).unwrap();
        env.mock.create_topic(&env.output, PARTS, 1).unwrap();
        env.mock
            .create_topic(&format!("{}-read-state-changelog", env.app), PARTS, 1)
            .unwrap();
        env.mock
            .create_topic(&format!("{}-dlq", env.app), 1, 1)
            .unwrap();
        env
    }

    fn topology(&self) -> Topology {
        compile(&format!(
            r#"
[application]
id = "{}"
commit_interval = "200ms"
state_dir = "{}"
[[source]]
name = "events"
topic = "{}"
[[store]]
name = "read-state"
[[processor]]
name = "read-state"
kind = "read-state"
inputs = ["events"]
store = "read-state"
[[sink]]
name = "updates"
kind = "kafka"
input = "read-state"
topic = "{}"
"#,
            self.app,
            self.state.path().display(),
            self.source,
            self.output
        ))
        .unwrap()
    }

    fn brokers(&self) -> String {
        self.mock.bootstrap_servers()
    }

    fn start(&self) -> Instance {
        let cfg = RunConfig::new(
            self.topology(),
            KafkaSettings::new(self.brokers()),
            Arc::new(LocalRegistry::new()),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let handle = std::thread::spawn(move || run(cfg, s2).expect("instance runs"));
        Instance { stop, handle }
    }

    fn produce(&self, events: &[ReadEvent], garbage_every: usize) -> usize {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let enc = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID).unwrap();
        let mut garbage = 0;
        for (i, e) in events.iter().enumerate() {
            let key = e.conversation_id.0.to_string();
            let v = enc.encode(&AvroReadEvent::from(e)).unwrap();
            send(
                &p,
                BaseRecord::to(&self.source)
                    .key(key.as_str())
                    .payload(v.as_slice()),
            );
            if garbage_every > 0 && i % garbage_every == 0 {
                send(
                    &p,
                    BaseRecord::to(&self.source)
                        .key(key.as_str())
                        .payload(b"\x00garbage".as_slice()),
                );
                garbage += 1;
            }
        }
        p.flush(Duration::from_secs(30)).unwrap();
        garbage
    }

    /// Read a whole topic from the beginning until `done` holds (bounded in time).
    fn read_until<T>(
        &self,
        topic: &str,
        decode: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> T,
        done: impl Fn(&[T]) -> bool,
    ) -> Vec<T> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", format!("reader-{}", suffix()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        let parts = c
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .unwrap()
            .topics()[0]
            .partitions()
            .len() as i32;
        for p in 0..parts {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut out = Vec::new();
        while Instant::now() < deadline {
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => out.push(decode(&m)),
                Some(Err(e)) => eprintln!("reader: {e}"),
                None => {
                    if done(&out) {
                        return out;
                    }
                }
            }
        }
        panic!("timed out reading {topic}: {} records", out.len());
    }

    fn read_updates(&self, want: &HashMap<StateKey, Expected>) -> Vec<ReceiptUpdate> {
        let reg = Arc::new(LocalRegistry::new());
        let mut dec = UpdateDecoder::new(reg, RECEIPT_UPDATE_SCHEMA).unwrap();
        futures::executor::block_on(dec.prepare(std::iter::once(Some(&[0u8, 0, 0, 0, 2][..]))))
            .unwrap();
        self.read_until(
            &self.output,
            |m| ReceiptUpdate::from(dec.decode(m.payload().unwrap()).unwrap()),
            |us: &[ReceiptUpdate]| {
                let mut last: HashMap<StateKey, i64> = HashMap::new();
                for u in us {
                    let e = last.entry(u.key()).or_insert(-1);
                    *e = (*e).max(u.last_read_seq);
                }
                want.iter().all(|(k, x)| last.get(k) == Some(&x.max_seq))
            },
        )
    }

    /// Final state per key from the RocksDB stores the instance left behind.
    fn stored_states(&self) -> HashMap<StateKey, ReadState> {
        let mut m = HashMap::new();
        for p in 0..PARTS {
            let path = self
                .state
                .path()
                .join(&self.app)
                .join(format!("0_{p}"))
                .join("read-state");
            if !path.exists() {
                continue;
            }
            let s =
                RocksDbStore::open("read-state".into(), &path, &RocksDbOptions::default()).unwrap();
            for (k, v) in s.scan_prefix(b"s").unwrap() {
                let (_, key) = StoreKey::decode(&k).unwrap();
                m.insert(key, ReadState::decode(&v).unwrap());
            }
        }
        m
    }
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, mut r: BaseRecord<'_, str, [u8]>) {
    loop {
        match p.send(r) {
            Ok(()) => return,
            Err((_, back)) => {
                r = back;
                p.flush(Duration::from_millis(100)).ok();
            }
        }
    }
}

struct Instance {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<RunSummary>,
}

impl Instance {
    fn stop(self) -> RunSummary {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// Zipf-distributed conversations, several readers and devices, reordering, duplicates and
/// stale re-reads.
fn zipf_workload(seed: u64, n: usize) -> Vec<ReadEvent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let zipf = Zipf::new(500, 1.1).unwrap();
    let mut head: HashMap<(i64, i64), i64> = HashMap::new();
    let mut out: Vec<ReadEvent> = Vec::with_capacity(n);
    while out.len() < n {
        let conv = zipf.sample(&mut rng) as i64;
        let reader = rng.gen_range(0..4);
        let h = head.entry((conv, reader)).or_insert(0);
        *h += rng.gen_range(1..5);
        let seq = if rng.gen_bool(0.05) {
            (*h - 10).max(0)
        } else {
            *h
        };
        let e = event(conv, reader, seq, &format!("dev-{}", rng.gen_range(0..3)));
        if rng.gen_bool(0.05) {
            out.push(e.clone());
        }
        if rng.gen_bool(0.1) && !out.is_empty() {
            // Reorder: swap with a recent event.
            let j = out.len() - rng.gen_range(1..=out.len().min(20));
            let prev = std::mem::replace(&mut out[j], e);
            out.push(prev);
        } else {
            out.push(e);
        }
    }
    out
}

fn check_final_state(env: &Env, want: &HashMap<StateKey, Expected>) {
    let stored = env.stored_states();
    assert_eq!(stored.len(), want.len());
    for (k, x) in want {
        let s = &stored[k];
        assert_eq!(s.last_read_seq, x.max_seq, "pointer of {k:?}");
        assert_eq!(s.events_total, x.events, "events of {k:?}");
        assert_eq!(s.stale_total, x.events - x.advances, "stale of {k:?}");
        assert_eq!(s.version, x.advances, "version of {k:?}");
    }
}

#[test]
fn end_to_end_output_and_state_match_the_oracle() {
    let env = Env::new();
    let events = zipf_workload(1, 20_000);
    let garbage = env.produce(&events, 100);
    let want = oracle(&events);
    let inst = env.start();
    let updates = env.read_updates(&want);
    let summary = inst.stop();
    let last = last_updates(&updates); // asserts versions strictly increase per key
    for (k, x) in &want {
        assert_eq!(last[k].last_read_seq, x.max_seq);
        assert_eq!(last[k].version, x.advances);
    }
    assert!(
        updates.len() < events.len(),
        "coalescing: {} updates for {} events",
        updates.len(),
        events.len()
    );
    assert_eq!(summary.dead_letters as usize, garbage);
    assert_eq!(summary.records_consumed as usize, events.len() + garbage);
    check_final_state(&env, &want);
    // Every poison pill is on the dead-letter topic with its provenance.
    let dlq = env.read_until(
        &format!("{}-dlq", env.app),
        |m| {
            use rdkafka::message::Headers;
            let h = m.headers().unwrap();
            let get = |name: &str| {
                h.iter()
                    .find(|x| x.key == name)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            (
                get("readstate.source.topic"),
                get("readstate.error.reason"),
                get("readstate.source.offset").is_some(),
            )
        },
        |d| d.len() >= garbage,
    );
    assert_eq!(dlq.len(), garbage);
    assert!(dlq
        .iter()
        .all(|(t, r, o)| t.as_deref() == Some(env.source.as_str())
            && r.as_deref() == Some("unknown_schema")
            && *o));
}

#[test]
fn deleting_the_state_directory_costs_only_a_restore() {
    let env = Env::new();
    let first = zipf_workload(2, 8_000);
    env.produce(&first, 0);
    let inst = env.start();
    env.read_updates(&oracle(&first));
    let s1 = inst.stop();
    assert_eq!(s1.records_consumed as usize, first.len());
    std::fs::remove_dir_all(env.state.path().join(&env.app)).unwrap();

    let second = zipf_workload(3, 4_000);
    env.produce(&second, 0);
    let all: Vec<ReadEvent> = first.iter().chain(second.iter()).cloned().collect();
    let want = oracle(&all);
    let inst = env.start();
    env.read_updates(&want);
    let s2 = inst.stop();
    assert!(
        s2.restored_records > 0,
        "state came back from the changelog"
    );
    assert_eq!(
        s2.records_consumed as usize,
        second.len(),
        "the source was not re-read from the beginning"
    );
    check_final_state(&env, &want);
}
