//! Who answers for which partition: every instance serving the read API publishes its
//! address and the partitions it has (running or restoring) to the compacted topic
//! `<application.id>-instances`, keyed by its instance id, and reads everyone's.
//!
//! librdkafka has no custom assignor user data (where Kafka Streams carries
//! `application.server`), so this topic is the directory. Every record goes to partition
//! 0: its offset orders the claims, whatever the hosts' clocks. A partition's owner is the
//! instance whose latest record claims it with the highest offset; an instance that gives a
//! partition up publishes again without it, and one that stops cleanly publishes a
//! tombstone. A view can be stale (a crashed instance's claim stands until the new owner
//! claims the partition): the owner it names answers 421 if it does not own the partition,
//! and the router asks again after the directory changes. An instance reads its own claim
//! back; one not read back in time (a produce lost in a broker outage) is published again,
//! with backoff, rather than left until the instance's tasks next change.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::kafka::KafkaSettings;
use crate::state::queryable::QueryableStores;

/// What an instance publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Where its read API answers (`host:port`).
    pub address: String,
    pub partitions: BTreeSet<i32>,
}

/// The directory as read from the topic.
pub struct InstanceDirectory {
    /// This instance's id (new at each start).
    pub me: String,
    pub address: String,
    /// Per instance: its latest claim and the offset of the record that made it.
    claims: RwLock<HashMap<String, (Claim, i64)>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl InstanceDirectory {
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            me: format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            ),
            address: address.into(),
            claims: RwLock::default(),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The address of the instance the directory says owns `partition` (not this one).
    pub fn owner_of(&self, partition: i32) -> Option<String> {
        let claims = self.claims.read().unwrap_or_else(|e| e.into_inner());
        let (id, (claim, _)) = (claims.iter())
            .filter(|(_, (c, _))| c.partitions.contains(&partition))
            .max_by_key(|(_, (_, offset))| *offset)?;
        (*id != self.me).then(|| claim.address.clone())
    }

    /// The partitions the topic says `instance` claims now.
    pub fn claim_of(&self, instance: &str) -> Option<BTreeSet<i32>> {
        let claims = self.claims.read().unwrap_or_else(|e| e.into_inner());
        claims.get(instance).map(|(c, _)| c.partitions.clone())
    }

    /// Notified at each record read.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A record of the topic: an instance's claim (`None`: it left).
    pub fn apply(&self, instance: &str, claim: Option<Claim>, offset: i64) {
        let mut claims = self.claims.write().unwrap_or_else(|e| e.into_inner());
        match claim {
            Some(c) => claims.insert(instance.to_owned(), (c, offset)),
            None => claims.remove(instance),
        };
        drop(claims);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The thread that publishes this instance's claims and reads everyone's, until
/// `shutdown`; then it publishes a tombstone.
pub struct DirectoryThread {
    pub directory: Arc<InstanceDirectory>,
    pub stores: Arc<QueryableStores>,
    pub topic: String,
    pub kafka: KafkaSettings,
    /// Set once the runtime made the topics (asked for earlier, a broker that creates
    /// topics on demand would make this one uncompacted).
    pub topics_ready: Arc<AtomicBool>,
}

impl DirectoryThread {
    pub fn run(self, shutdown: &AtomicBool) -> Result<(), rdkafka::error::KafkaError> {
        while !self.topics_ready.load(Ordering::Acquire) {
            if shutdown.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::park_timeout(Duration::from_millis(100));
        }
        let consumer: BaseConsumer = (self.kafka)
            .restore_consumer(&format!("{}-reader", self.topic))
            .create()?;
        let producer: BaseProducer = self.kafka.producer().create()?;
        let mut assigned = false;
        let mut published: Option<BTreeSet<i32>> = None;
        let mut confirmation = Confirmation::new();
        let mut changes = self.stores.subscribe();
        while !shutdown.load(Ordering::Relaxed) {
            if !assigned {
                assigned = self.assign(&consumer);
            }
            if published.is_none() || changes.has_changed().unwrap_or(false) {
                changes.mark_unchanged();
                let owned: BTreeSet<i32> = self.stores.owned().into_iter().collect();
                if published.as_ref() != Some(&owned) {
                    self.publish(&producer, Some(&owned));
                    confirmation.published(&owned, Instant::now());
                    published = Some(owned);
                }
            }
            producer.poll(Duration::ZERO);
            self.read(&consumer);
            let read_back = self.directory.claim_of(&self.directory.me);
            if let Some(owned) = &published {
                if confirmation.republish_due(read_back.as_ref(), Instant::now()) {
                    tracing::warn!(topic = %self.topic, partitions = ?owned, "this instance's claim was not read back from the directory: publishing it again");
                    self.publish(&producer, Some(owned));
                    confirmation.published(owned, Instant::now());
                }
            }
        }
        self.publish(&producer, None);
        let _ = producer.flush(Duration::from_secs(5));
        Ok(())
    }

    /// Read every partition of the topic from its start (nothing committed).
    fn assign(&self, consumer: &BaseConsumer) -> bool {
        let md = consumer.fetch_metadata(Some(&self.topic), Duration::from_secs(5));
        let Ok(md) = md else {
            return false;
        };
        let Some(t) = md.topics().first().filter(|t| !t.partitions().is_empty()) else {
            return false;
        };
        let mut tpl = TopicPartitionList::new();
        for p in t.partitions() {
            let _ = tpl.add_partition_offset(&self.topic, p.id(), Offset::Beginning);
        }
        match consumer.assign(&tpl) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "cannot read the instance directory");
                false
            }
        }
    }

    fn read(&self, consumer: &BaseConsumer) {
        let Some(r) = consumer.poll(Duration::from_millis(100)) else {
            return;
        };
        let m = match r {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(topic = %self.topic, error = %e, "instance directory read");
                return;
            }
        };
        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            return;
        };
        let claim = match m.payload() {
            None => None,
            Some(v) => match serde_json::from_slice::<Claim>(v) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(topic = %self.topic, offset = m.offset(), error = %e, "unreadable instance claim skipped");
                    return;
                }
            },
        };
        self.directory.apply(key, claim, m.offset());
    }

    /// Publish what this instance has (`None`: it leaves).
    fn publish(&self, producer: &BaseProducer, owned: Option<&BTreeSet<i32>>) {
        let value = owned.map(|partitions| {
            let claim = Claim {
                address: self.directory.address.clone(),
                partitions: partitions.clone(),
            };
            serde_json::to_vec(&claim).expect("a claim serializes")
        });
        let rec = BaseRecord::to(&self.topic)
            .key(self.directory.me.as_bytes())
            .partition(0);
        let rec = match &value {
            Some(v) => rec.payload(v.as_slice()),
            None => rec,
        };
        if let Err((e, _)) = producer.send(rec) {
            tracing::warn!(topic = %self.topic, error = %e, "cannot publish this instance's partitions");
        }
    }
}

/// How long an instance waits to read its own claim back before publishing it again (then
/// doubling, up to [`CONFIRM_CAP`]).
const CONFIRM_WAIT: Duration = Duration::from_secs(5);
const CONFIRM_CAP: Duration = Duration::from_secs(60);

/// Whether this instance's latest claim has been read back from the topic, and when to
/// publish it again if not. Time is passed in, so the rule is tested without waiting.
#[derive(Debug)]
struct Confirmation {
    /// The partitions last published (`None`: nothing yet).
    claimed: Option<BTreeSet<i32>>,
    confirmed: bool,
    due: Option<Instant>,
    backoff: Backoff,
}

impl Confirmation {
    fn new() -> Self {
        Self {
            claimed: None,
            confirmed: false,
            due: None,
            backoff: Backoff::new(CONFIRM_WAIT, CONFIRM_CAP),
        }
    }

    /// `owned` was published at `now`: a new claim waits [`CONFIRM_WAIT`], the same one
    /// published again waits twice as long as the last time.
    fn published(&mut self, owned: &BTreeSet<i32>, now: Instant) {
        if self.claimed.as_ref() != Some(owned) {
            self.backoff.reset();
            self.claimed = Some(owned.clone());
        }
        self.confirmed = false;
        self.due = Some(now + self.backoff.fail());
    }

    /// Given what the topic says this instance claims, whether to publish again at `now`.
    fn republish_due(&mut self, read_back: Option<&BTreeSet<i32>>, now: Instant) -> bool {
        if self.claimed.is_some() && read_back == self.claimed.as_ref() {
            self.confirmed = true;
        }
        !self.confirmed && self.due.is_some_and(|due| now >= due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_not_read_back_is_published_again_with_backoff() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let owned: BTreeSet<i32> = [0, 2].into();
        let mut c = Confirmation::new();
        assert!(!c.republish_due(None, s(100)), "nothing published yet");
        c.published(&owned, t0);
        assert!(!c.republish_due(None, s(4)), "within the first wait");
        assert!(c.republish_due(None, s(5)), "not read back in 5 s");
        c.published(&owned, s(5));
        assert!(!c.republish_due(None, s(14)), "the wait doubled");
        assert!(c.republish_due(None, s(15)));
        c.published(&owned, s(15));
        // An older claim of other partitions read back is no confirmation.
        let older: BTreeSet<i32> = [0].into();
        assert!(
            !c.republish_due(Some(&older), s(34)),
            "the wait is 20 s now"
        );
        assert!(c.republish_due(Some(&older), s(35)));
        c.published(&owned, s(35));
        // Read back: never published again.
        assert!(!c.republish_due(Some(&owned), s(36)));
        assert!(!c.republish_due(None, s(1000)), "confirmed stays confirmed");
        // A new claim starts from the first wait again.
        let moved: BTreeSet<i32> = [1].into();
        c.published(&moved, s(2000));
        assert!(
            !c.republish_due(Some(&owned), s(2004)),
            "the old claim is no confirmation"
        );
        assert!(c.republish_due(Some(&owned), s(2005)));
    }

    fn claim(address: &str, partitions: &[i32]) -> Option<Claim> {
        Some(Claim {
            address: address.into(),
            partitions: partitions.iter().copied().collect(),
        })
    }

    #[test]
    fn the_latest_claim_owns_a_partition_and_a_tombstone_withdraws() {
        let d = InstanceDirectory::new("me:1");
        d.apply("a", claim("a:1", &[0, 1]), 0);
        d.apply("b", claim("b:1", &[2]), 1);
        assert_eq!(d.owner_of(1).as_deref(), Some("a:1"));
        // b took partition 1 over; a has not published since (crashed, or slower).
        d.apply("b", claim("b:1", &[1, 2]), 2);
        assert_eq!(d.owner_of(1).as_deref(), Some("b:1"));
        assert_eq!(d.owner_of(0).as_deref(), Some("a:1"));
        d.apply("a", None, 3);
        assert_eq!(d.owner_of(0), None);
        let me = d.me.clone();
        d.apply(&me, claim("me:1", &[0]), 4);
        assert_eq!(d.owner_of(0), None, "this instance is not asked over HTTP");
    }
}
