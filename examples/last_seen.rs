//! "Last seen per device", written only against readstate's public processor API
//! (`readstate::processor::typed`): it keeps, per user and device, when the device was last
//! seen, forwards a presence record when that moves forward, and, on a stream-time
//! punctuation, forgets devices not seen for `ttl` and forwards them as offline.
//!
//! Input: records keyed by user id (UTF-8) whose values are JSON `{"device": …, "at": …}`
//! (epoch milliseconds). Output (sink `presence`): keyed by user id, JSON
//! `{"device": …, "last_seen": …, "online": …}`. Store `last-seen`: `user/device` → the
//! last `at` (an order-preserving i64).
//!
//! `cargo run --release --example last_seen` drives a short scenario through
//! `readstate_testing::TaskDriver` (the same task, flush, changelog and checkpoint path as
//! `readstate run`) and prints what it forwards; its tests check it against an oracle.

use std::time::Duration;

use readstate::processor::typed::{
    Context, Json, OrderedI64, PunctuationType, Record, ScheduleId, TypedProcessor, TypedSupplier,
    Utf8,
};
use readstate::processor::ProcessorError;
use serde::{Deserialize, Serialize};

/// A device of a user was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub device: String,
    pub at: i64,
}

/// What the processor forwards, keyed by user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub device: String,
    pub last_seen: i64,
    pub online: bool,
}

pub const STORE: &str = "last-seen";
pub const SINK: &str = "presence";

pub struct LastSeen {
    ttl_ms: i64,
    sweep: Option<ScheduleId>,
}

impl LastSeen {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl_ms: ttl.as_millis() as i64,
            sweep: None,
        }
    }
}

fn store_key(user: &str, device: &str) -> String {
    format!("{user}/{device}")
}

impl TypedProcessor for LastSeen {
    type KeyIn = String;
    type ValueIn = Seen;
    type KeyOut = String;
    type ValueOut = Presence;

    fn init(&mut self, ctx: &mut Context<'_, String, Presence>) -> Result<(), ProcessorError> {
        let every = Duration::from_millis((self.ttl_ms / 2).max(1) as u64);
        self.sweep = Some(ctx.schedule(every, PunctuationType::StreamTime));
        Ok(())
    }

    fn process(
        &mut self,
        record: Record<String, Seen>,
        ctx: &mut Context<'_, String, Presence>,
    ) -> Result<(), ProcessorError> {
        let key = store_key(&record.key, &record.value.device);
        let at = record.value.at;
        {
            let mut store = ctx.store::<String, i64>(STORE)?;
            if store.get(&key)?.is_some_and(|last| last >= at) {
                return Ok(()); // not newer: nothing moves backwards
            }
            store.put(&key, &at);
        }
        let presence = Presence {
            device: record.value.device,
            last_seen: at,
            online: true,
        };
        ctx.forward(&Record::new(record.key, presence, record.timestamp));
        Ok(())
    }

    fn punctuate(
        &mut self,
        schedule: ScheduleId,
        timestamp: i64,
        ctx: &mut Context<'_, String, Presence>,
    ) -> Result<(), ProcessorError> {
        if Some(schedule) != self.sweep {
            return Ok(());
        }
        let expired: Vec<(String, i64)> = ctx
            .store::<String, i64>(STORE)?
            .all()?
            .into_iter()
            .filter(|(_, at)| *at < timestamp - self.ttl_ms)
            .collect();
        for (key, at) in expired {
            ctx.store::<String, i64>(STORE)?.delete(&key);
            let (user, device) = key.split_once('/').unwrap_or((&key, ""));
            let presence = Presence {
                device: device.to_owned(),
                last_seen: at,
                online: false,
            };
            ctx.forward_to(SINK, &Record::new(user.to_owned(), presence, timestamp))?;
        }
        Ok(())
    }
}

/// The processor with its serdes, its store and its sink.
pub fn supplier(ttl: Duration) -> TypedSupplier<LastSeen> {
    TypedSupplier::new(move || LastSeen::new(ttl), Utf8, Json::<Seen>::default())
        .store(STORE, Utf8, OrderedI64)
        .sink(SINK, Utf8, Json::<Presence>::default())
}

fn main() {
    use readstate::processor::InputId;
    use readstate_testing::TaskDriver;
    let mut d = TaskDriver::new(
        Box::new(supplier(Duration::from_secs(60))),
        &[STORE],
        Duration::from_secs(1),
    );
    let t0 = d.now_ms();
    let seen = [
        ("ana", "phone", 4),
        ("ana", "laptop", 5),
        ("ana", "phone", 3), // older than 4: ignored
        ("bo", "phone", 10),
        ("ana", "phone", 90), // stream time 90 s: what was last seen before 30 s goes offline
    ];
    for (user, device, secs) in seen {
        let at = t0 + secs * 1000;
        let value = serde_json::to_vec(&Seen {
            device: device.into(),
            at,
        })
        .expect("JSON");
        d.pipe(InputId(0), "seen", Some(user.as_bytes()), Some(&value), at);
    }
    d.advance_wall_clock(Duration::from_secs(1));
    for (_, k, v) in d.read_outputs() {
        println!(
            "{} {}",
            String::from_utf8_lossy(&k),
            String::from_utf8_lossy(&v)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use readstate::processor::InputId;
    use readstate_testing::TaskDriver;
    use std::collections::BTreeMap;

    const MIN: i64 = 60_000;

    fn driver(ttl: Duration) -> TaskDriver {
        TaskDriver::new(Box::new(supplier(ttl)), &[STORE], Duration::from_secs(1))
    }

    fn pipe(d: &mut TaskDriver, user: &str, device: &str, at: i64) {
        let v = serde_json::to_vec(&Seen {
            device: device.into(),
            at,
        })
        .unwrap();
        d.pipe(InputId(0), "seen", Some(user.as_bytes()), Some(&v), at);
    }

    fn outputs(d: &mut TaskDriver) -> Vec<(String, Presence)> {
        d.read_outputs()
            .into_iter()
            .map(|(_, k, v)| {
                (
                    String::from_utf8(k).unwrap(),
                    serde_json::from_slice(&v).unwrap(),
                )
            })
            .collect()
    }

    /// The stored last-seen of every (user, device), decoded from the committed store.
    fn stored(d: &TaskDriver) -> BTreeMap<String, i64> {
        d.store(0)
            .scan_prefix(&[])
            .unwrap()
            .into_iter()
            .filter(|(k, _)| !readstate::state::is_internal_key(k))
            .map(|(k, v)| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                let at = (u64::from_be_bytes(b) ^ (1 << 63)) as i64;
                (String::from_utf8(k).unwrap(), at)
            })
            .collect()
    }

    /// Random, reordered and duplicated sightings (no expiry): the store holds each
    /// device's maximum, as an independent oracle computes it; every forwarded presence
    /// moves its device forward; a crash restores the committed state from the changelog.
    #[test]
    fn keeps_the_maximum_per_device_and_forwards_only_advances() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut d = driver(Duration::from_secs(365 * 24 * 3600));
        let mut oracle: BTreeMap<String, i64> = BTreeMap::new();
        let mut last_forwarded: BTreeMap<String, i64> = BTreeMap::new();
        let base = d.now_ms();
        for i in 0..2_000 {
            let user = format!("u{}", rng.gen_range(0..20));
            let device = format!("d{}", rng.gen_range(0..3));
            let at = base + rng.gen_range(0..100_000);
            pipe(&mut d, &user, &device, at);
            let k = store_key(&user, &device);
            let e = oracle.entry(k).or_insert(at);
            *e = (*e).max(at);
            if i % 97 == 0 {
                d.advance_wall_clock(Duration::from_secs(1));
            }
            if i == 1_000 {
                d.commit();
                d.crash_and_restore();
            }
        }
        d.commit();
        for (user, p) in outputs(&mut d) {
            assert!(p.online);
            let k = store_key(&user, &p.device);
            let was = last_forwarded.insert(k.clone(), p.last_seen);
            assert!(was.is_none_or(|w| w < p.last_seen), "{k} moved backwards");
        }
        assert_eq!(stored(&d), oracle);
        assert_eq!(
            last_forwarded, oracle,
            "the last forward of each device is its max"
        );
        assert_eq!(d.checkpoint(0), Some(d.changelog(0).len() as i64));
    }

    /// A stream-time punctuation forgets devices not seen for the ttl: a tombstone on the
    /// changelog, an offline record forwarded, and a restore from the changelog agrees.
    #[test]
    fn devices_not_seen_for_the_ttl_go_offline() {
        let mut d = driver(Duration::from_millis(2 * MIN as u64));
        let t0 = d.now_ms();
        pipe(&mut d, "ana", "phone", t0);
        pipe(&mut d, "ana", "laptop", t0 + MIN);
        pipe(&mut d, "bo", "phone", t0 + MIN);
        d.commit();
        assert_eq!(outputs(&mut d).len(), 3);
        // Stream time moves 3 minutes on: the sweep (every minute) finds ana's phone older
        // than 2 minutes, not the devices seen at 1 minute.
        pipe(&mut d, "bo", "phone", t0 + 3 * MIN);
        d.commit();
        let out = outputs(&mut d);
        let offline: Vec<&(String, Presence)> = out.iter().filter(|(_, p)| !p.online).collect();
        assert_eq!(offline.len(), 1, "{out:?}");
        assert_eq!(offline[0].0, "ana");
        assert_eq!(offline[0].1.device, "phone");
        assert_eq!(offline[0].1.last_seen, t0);
        let tombstones: Vec<&Vec<u8>> = d
            .changelog(0)
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k)
            .collect();
        assert_eq!(tombstones, [&b"ana/phone".to_vec()]);
        let before = stored(&d);
        assert!(!before.contains_key("ana/phone"));
        d.crash_and_restore();
        assert_eq!(stored(&d), before, "the changelog restores the same state");
    }

    /// On the embedded broker, through `readstate::runtime::run` with a registry that knows
    /// this kind: every advance is forwarded once, in order per device; a second instance
    /// with an empty state directory restores the store from its changelog (an older
    /// sighting forwards nothing, a newer one forwards one record).
    #[test]
    fn runs_on_the_embedded_broker_and_restores_from_its_changelog() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let broker = embedded::Broker::new();
        let t0 = 1_700_000_000_000i64;
        let mut sightings: Vec<(String, String, i64)> = (0..400)
            .map(|_| {
                let user = format!("u{}", rng.gen_range(0..30));
                let device = format!("d{}", rng.gen_range(0..2));
                (user, device, t0 + rng.gen_range(0..60_000))
            })
            .collect();
        broker.produce(&sightings);
        // The oracle: per (user, device) in production order (one user, one partition).
        let mut max: BTreeMap<String, i64> = BTreeMap::new();
        let mut advances = 0;
        for (u, d, at) in &sightings {
            let e = max.entry(store_key(u, d)).or_insert(i64::MIN);
            if *at > *e {
                *e = *at;
                advances += 1;
            }
        }
        let first = broker.run_until(advances);
        let mut last: BTreeMap<String, i64> = BTreeMap::new();
        for (user, p) in &first {
            let k = store_key(user, &p.device);
            let was = last.insert(k.clone(), p.last_seen);
            assert!(was.is_none_or(|w| w < p.last_seen), "{k} moved backwards");
        }
        assert_eq!(last, max, "the last forward of each device is its max");
        // A second instance, state directory empty: the store comes back from the changelog.
        let (u, d, _) = sightings[0].clone();
        let newest = max[&store_key(&u, &d)];
        sightings = vec![
            (u.clone(), d.clone(), newest - 1),
            (u.clone(), d.clone(), newest + 1),
        ];
        broker.produce(&sightings);
        let all = broker.run_until(advances + 1);
        let of_device = |at: i64| {
            all.iter()
                .filter(|(user, p)| *user == u && p.device == d && p.last_seen == at)
                .count()
        };
        assert_eq!(of_device(newest + 1), 1, "the newer sighting is forwarded");
        assert_eq!(
            of_device(newest - 1),
            0,
            "the older one is not: the store came back"
        );
    }

    /// A record whose value is not the expected JSON is a dead letter; the rest go on.
    #[test]
    fn a_bad_record_is_a_dead_letter() {
        let mut d = driver(Duration::from_secs(60));
        d.pipe(InputId(0), "seen", Some(b"ana"), Some(b"{not json"), 0);
        pipe(&mut d, "ana", "phone", 1);
        d.commit();
        assert_eq!(d.dead_letters().len(), 1);
        assert_eq!(d.dead_letters()[0].reason, "malformed");
        assert_eq!(outputs(&mut d).len(), 1);
    }
}

/// The embedded broker (librdkafka's mock cluster) for the example's test: topics, a
/// producer, and `readstate::runtime::run` with this example's kind registered.
#[cfg(test)]
mod embedded {
    use super::*;

    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use rdkafka::{ClientConfig, Message};
    use readstate::kafka::KafkaSettings;
    use readstate::processor::ProcessorRegistry;
    use readstate::runtime::{run, RunConfig};
    use readstate::serde::LocalRegistry;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const PARTITIONS: i32 = 2;

    pub struct Broker {
        mock: MockCluster<'static, DefaultProducerContext>,
        app: String,
        input: String,
        output: String,
    }

    impl Broker {
        pub fn new() -> Self {
            let mock = MockCluster::new(1).expect("mock cluster");
            let id = format!("{:08x}", rand::random::<u32>());
            let b = Self {
                mock,
                app: format!("last-seen-{id}"),
                input: format!("seen-{id}"),
                output: format!("presence-{id}"),
            };
            // The mock answers no CreateTopics: readstate's internal topics are made here.
            for t in [&b.input, &b.output, &format!("{}-{STORE}-changelog", b.app)] {
                b.mock.create_topic(t, PARTITIONS, 1).expect("topic");
            }
            b.mock
                .create_topic(&format!("{}-dlq", b.app), 1, 1)
                .expect("topic");
            b
        }

        /// `examples/last_seen.toml` with this broker's names.
        fn topology(&self, state_dir: &std::path::Path) -> String {
            include_str!("last_seen.toml")
                .replace("{app}", &self.app)
                .replace("{state_dir}", &state_dir.display().to_string())
                .replace("{input}", &self.input)
                .replace("{output}", &self.output)
        }

        /// Produce sightings keyed by user, and wait for every acknowledgement.
        pub fn produce(&self, sightings: &[(String, String, i64)]) {
            let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
                .set("bootstrap.servers", self.mock.bootstrap_servers())
                .create()
                .expect("producer");
            for (user, device, at) in sightings {
                let v = serde_json::to_vec(&Seen {
                    device: device.clone(),
                    at: *at,
                })
                .expect("JSON");
                let rec = BaseRecord::to(&self.input)
                    .key(user.as_bytes())
                    .payload(&v)
                    .timestamp(*at);
                p.send(rec).map_err(|(e, _)| e).expect("queued");
            }
            p.flush(Duration::from_secs(30)).expect("acknowledged");
        }

        /// Run an instance (new state directory) until the output topic holds `n` records,
        /// then stop it cleanly; every output record, in partition order.
        pub fn run_until(&self, n: usize) -> Vec<(String, Presence)> {
            let dir = tempfile::tempdir().expect("state dir");
            let mut registry = ProcessorRegistry::default();
            registry.register_supplier("last-seen", |_| {
                Box::new(supplier(Duration::from_secs(3600)))
            });
            let topology = registry
                .compile(&self.topology(dir.path()))
                .expect("the topology compiles");
            let kafka = KafkaSettings::new(self.mock.bootstrap_servers());
            let mut cfg = RunConfig::new(topology, kafka, Arc::new(LocalRegistry::new()));
            cfg.registry = Arc::new(registry);
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let instance = std::thread::spawn(move || run(cfg, flag));
            let out = self.read_output(n);
            stop.store(true, Ordering::Relaxed);
            instance
                .join()
                .expect("instance thread")
                .expect("the instance stops cleanly");
            out
        }

        /// The output topic from the beginning, until it holds `n` records (bounded).
        fn read_output(&self, n: usize) -> Vec<(String, Presence)> {
            let decode = |m: &rdkafka::message::BorrowedMessage<'_>| {
                let user = String::from_utf8(m.key().expect("keyed").to_vec()).expect("UTF-8");
                let p: Presence =
                    serde_json::from_slice(m.payload().expect("a value")).expect("JSON");
                (user, p)
            };
            let bootstrap = self.mock.bootstrap_servers();
            readstate_testing::kafka::read_until(&bootstrap, &self.output, decode, |out| {
                out.len() >= n
            })
        }
    }
}
