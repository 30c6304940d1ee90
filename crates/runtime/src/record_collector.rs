//! RecordCollector (Kafka Streams' `RecordCollectorImpl`): every record an instance
//! produces goes through it: outputs, changelog records, dead letters, repartitioned
//! records. It counts what is in flight, remembers the highest acknowledged offset per
//! changelog partition (the next checkpoint), and surfaces every send error at `flush`:
//! an error is never swallowed, and names the topic and partition it happened on.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::producer::{BaseRecord, Producer, PurgeConfig, ThreadedProducer};
use rdkafka::TopicPartitionList;

use super::delivery_tracker::{is_expiry, DeliveryTracker};
use super::membership::{refusal_of, Refusal};
use crate::kafka::{KafkaError, KafkaSettings, Scope};

/// How long `flush` waits beyond the producer's own message timeout before it reports a
/// failure.
const FLUSH_MARGIN: Duration = Duration::from_secs(10);

/// `call` (a transactional call), again while it fails retriably, at most
/// [`TXN_ATTEMPTS`] times in all.
fn retry_retriable(
    what: &str,
    mut call: impl FnMut() -> Result<(), rdkafka::error::KafkaError>,
) -> Result<(), rdkafka::error::KafkaError> {
    let mut attempt = 1;
    loop {
        match call() {
            Err(rdkafka::error::KafkaError::Transaction(e))
                if e.is_retriable() && attempt < TXN_ATTEMPTS =>
            {
                tracing::info!(error = %e, attempt, "{what} of the transaction failed retriably; calling it again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Why a transaction did not commit.
#[derive(Debug)]
pub enum TxnError {
    /// The producer was fenced (another instance took over its transactional id or the
    /// group moved on): the tasks were migrated; the producer must be created again.
    Fenced(String),
    /// The group coordinator refused the offsets because this member left the group: the
    /// tasks were migrated; the transaction was aborted.
    Migrated(String),
    /// The group coordinator refused the offsets because the group is rebalancing (or its
    /// generation moved on): the transaction was aborted, and the tasks still owned after
    /// the rebalance resume from their stores and the committed offsets.
    Rebalancing(String),
    /// The transaction was aborted (a record failed, a timeout): resume from the stores
    /// and the committed offsets.
    Aborted(String),
}

impl std::fmt::Display for TxnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxnError::Fenced(e) => write!(f, "producer fenced: {e}"),
            TxnError::Migrated(e) => write!(f, "offsets refused by the group: {e}"),
            TxnError::Rebalancing(e) => {
                write!(f, "offsets refused while the group rebalances: {e}")
            }
            TxnError::Aborted(e) => write!(f, "transaction aborted: {e}"),
        }
    }
}

/// What a transactional collector needs to make its producer again.
struct Transactional {
    id: String,
    /// A transaction is open (begun at the first record after the last commit).
    open: Cell<bool>,
    /// Why the producer cannot go on (a begin or an abort that failed): the next commit
    /// reports it as [`TxnError::Fenced`], so that the producer is made again. Seen on a
    /// 3-broker cluster when a leader was killed: an abort that timed out left the
    /// producer refusing every later begin_transaction ("invalid state").
    broken: RefCell<Option<String>>,
}

const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// Commits and aborts retried after a retriable failure (a timeout while a leader moves
/// or the cluster is away): librdkafka keeps such a commit in progress, and refuses
/// every other transactional call until it is called again and completes.
const TXN_ATTEMPTS: u32 = 3;

/// Every produce of one instance.
pub struct RecordCollector {
    producer: ThreadedProducer<DeliveryTracker>,
    flush_timeout: Duration,
    txn: Option<Transactional>,
    settings: KafkaSettings,
    changelog_topics: Vec<Option<String>>,
}

impl RecordCollector {
    /// The collector of an instance of `config`'s topology: transactional under
    /// exactly_once_v2 (`<application.id>-<process id>`), at least once otherwise.
    pub(super) fn for_topology(
        config: &super::RunConfig,
        state: &super::state_manager::StateManager,
        changelogs: Vec<Option<String>>,
    ) -> Result<Self, super::RuntimeError> {
        let t = &config.topology;
        let transactional_id = match t.guarantee {
            crate::topology::ProcessingGuarantee::AtLeastOnce => None,
            crate::topology::ProcessingGuarantee::ExactlyOnceV2 => {
                Some(format!("{}-{}", t.application_id, state.process_id()?))
            }
        };
        Ok(Self::with_transactions(
            &config.kafka,
            changelogs,
            transactional_id,
        )?)
    }

    /// A collector whose records go out in transactions under `transactional_id`
    /// (exactly_once_v2), or at least once without one.
    ///
    /// A record not delivered within the group session timeout is not delivered at all
    /// (`message.timeout.ms` = `session.timeout.ms` unless set): once the session has
    /// expired another instance may own the partition, and a record queued before a pause
    /// must not be written after the new owner's. librdkafka drops expired records before
    /// it sends anything after a pause (its first loop turn scans for timeouts).
    pub fn with_transactions(
        settings: &KafkaSettings,
        changelog_topics: Vec<Option<String>>,
        transactional_id: Option<String>,
    ) -> Result<Self, KafkaError> {
        let mut config = settings.producer();
        let explicit = ["message.timeout.ms", "delivery.timeout.ms"]
            .iter()
            .any(|k| settings.property(Scope::Producer, k).is_some());
        let session_ms = settings.session_timeout().as_millis().max(1000);
        if !explicit {
            config.set("message.timeout.ms", session_ms.to_string());
        }
        if let Some(id) = &transactional_id {
            config.set("transactional.id", id);
            if config.get("transaction.timeout.ms").is_none() {
                // As Kafka Streams (10 s): a crashed instance's open transaction blocks
                // read_committed consumers at most this long.
                config.set("transaction.timeout.ms", session_ms.max(10_000).to_string());
            }
        }
        let message_timeout = config
            .get("message.timeout.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(120), Duration::from_millis);
        let producer: ThreadedProducer<DeliveryTracker> =
            config.create_with_context(DeliveryTracker::new(changelog_topics.clone()))?;
        if transactional_id.is_some() {
            // Fences an earlier incarnation with the same id and aborts its open transaction.
            producer.init_transactions(TXN_TIMEOUT)?;
        }
        Ok(Self {
            producer,
            flush_timeout: message_timeout + FLUSH_MARGIN,
            txn: transactional_id.map(|id| Transactional {
                id,
                open: Cell::new(false),
                broken: RefCell::new(None),
            }),
            settings: settings.clone(),
            changelog_topics,
        })
    }

    /// Make the producer again (after it was fenced): the new one fences the old.
    pub fn recreate(&mut self) -> Result<(), KafkaError> {
        let id = self.txn.as_ref().map(|t| t.id.clone());
        *self = Self::with_transactions(&self.settings, self.changelog_topics.clone(), id)?;
        Ok(())
    }

    fn begin_if_needed(&self) -> Result<(), String> {
        match &self.txn {
            Some(t) if !t.open.get() => {
                if let Some(why) = t.broken.borrow().as_ref() {
                    return Err(why.clone());
                }
                if let Err(e) = self.producer.begin_transaction() {
                    let why = format!("begin transaction: {e}");
                    t.broken.replace(Some(why.clone()));
                    return Err(why);
                }
                t.open.set(true);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Commit the open transaction with the consumer's `offsets` (sent with its group
    /// metadata, so a stale generation is refused); on any failure the transaction is
    /// aborted, or the producer must be recreated (`Fenced`).
    pub fn commit_transaction(
        &self,
        offsets: &TopicPartitionList,
        group: &ConsumerGroupMetadata,
    ) -> Result<(), TxnError> {
        let t = self.txn.as_ref().expect("a transactional collector");
        self.begin_if_needed()
            .map_err(|why| match t.broken.borrow().is_some() {
                true => TxnError::Fenced(format!("producer unusable ({why}): it is made again")),
                false => TxnError::Aborted(why),
            })?;
        let classify = |e: KafkaError, refused: Option<Refusal>| -> TxnError {
            let text = e.to_string();
            match (&e, refused) {
                (KafkaError::Client(rdkafka::error::KafkaError::Transaction(r)), _)
                    if r.is_fatal() =>
                {
                    TxnError::Fenced(text)
                }
                (_, Some(Refusal::Gone)) => TxnError::Migrated(text),
                (_, Some(Refusal::Rebalancing)) => TxnError::Rebalancing(text),
                (_, None) => TxnError::Aborted(text),
            }
        };
        let sent = if offsets.count() > 0 {
            self.producer
                .send_offsets_to_transaction(offsets, group, TXN_TIMEOUT)
                .map_err(|e| {
                    let refused = e.rdkafka_error_code().and_then(refusal_of);
                    classify(KafkaError::from(e), refused)
                })
        } else {
            Ok(())
        };
        let result = sent.and_then(|()| {
            self.commit_open()
                .map_err(|e| classify(KafkaError::from(e), None))
        });
        match result {
            Ok(()) => {
                t.open.set(false);
                // Deliveries of a committed transaction all succeeded.
                self.producer.context().forget_failures_only();
                Ok(())
            }
            Err(e) => {
                if !matches!(e, TxnError::Fenced(_)) {
                    self.abort();
                }
                t.open.set(false);
                match t.broken.borrow().as_ref() {
                    // The abort failed too: the producer is made again.
                    Some(why) if !matches!(e, TxnError::Fenced(_)) => {
                        Err(TxnError::Fenced(format!("{e}; then {why}")))
                    }
                    _ => Err(e),
                }
            }
        }
    }

    /// Abort the open transaction (its records never become visible to read_committed
    /// consumers).
    pub fn abort(&self) {
        if let Some(t) = &self.txn {
            if t.open.get() {
                if let Err(why) = self.abort_open() {
                    tracing::warn!(error = %why, "aborting the transaction failed: the producer is made again at the next commit");
                    t.broken.replace(Some(why));
                }
                t.open.set(false);
            }
            self.producer.context().forget_failures();
        }
    }

    /// Commit the open transaction, again after a retriable failure, at most
    /// [`TXN_ATTEMPTS`] times.
    fn commit_open(&self) -> Result<(), rdkafka::error::KafkaError> {
        retry_retriable("commit", || self.producer.commit_transaction(TXN_TIMEOUT))
    }

    /// Abort the open transaction, again after a retriable failure, at most
    /// [`TXN_ATTEMPTS`] times.
    fn abort_open(&self) -> Result<(), String> {
        retry_retriable("abort", || self.producer.abort_transaction(TXN_TIMEOUT))
            .map_err(|e| format!("abort transaction: {e}"))
    }

    /// Enqueue a record (waiting while the local queue is full). A record the client
    /// refuses is counted as failed: `flush` reports it.
    pub fn send<K, P>(&self, rec: BaseRecord<'_, K, P>)
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        let ctx = self.producer.context();
        if let Err(e) = self.begin_if_needed() {
            ctx.refused(e);
            return;
        }
        ctx.sending();
        // Borrowed: the topic is only formatted if the send fails.
        let (topic, partition) = (rec.topic, rec.partition);
        if let Err(e) = crate::kafka::send_waiting(&self.producer, rec) {
            let at = partition.map_or(String::new(), |p| format!(" [{p}]"));
            ctx.failed(format!("{topic}{at}: {e}"), is_expiry(&e));
        }
    }

    /// Wait until every record sent so far is acknowledged; the first failure since the
    /// last flush is returned.
    pub fn flush(&self) -> Result<(), KafkaError> {
        self.producer.context().wait(self.flush_timeout)
    }

    /// Forget changelog offsets acknowledged before this point.
    pub fn clear_changelog_offsets(&self) {
        self.producer.context().clear_changelog_offsets();
    }

    /// Highest acknowledged changelog offset per (store index, partition) since the last
    /// clear.
    pub fn take_changelog_offsets(&self) -> HashMap<(usize, i32), i64> {
        self.producer.context().take_changelog_offsets()
    }

    /// Close dirty: the open transaction is aborted, or (at least once) records still
    /// queued locally are dropped (they belong to tasks this instance no longer owns);
    /// failures are forgotten.
    pub fn abandon(&self) {
        if self.txn.is_some() {
            self.abort();
            return;
        }
        self.producer.purge(PurgeConfig::default().queue());
        let _ = self.producer.context().wait(Duration::from_secs(10));
        self.producer.context().forget_failures();
    }

    /// Close clean: wait for what is in flight (bounded).
    pub fn close(&self) {
        let _ = self.producer.flush(Duration::from_secs(10));
    }
}
