//! Internal topics: created if missing, with the right partitions and cleanup policy.
//! A broker that refuses or ignores CreateTopics is tolerated when the topic exists anyway
//! (or is auto-created on first produce); this is checked through metadata.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaError, KafkaSettings};

/// A client for metadata requests, made once and reused (each new client costs a
/// connection and a bootstrap round trip).
pub struct MetadataClient {
    client: BaseConsumer,
}

impl MetadataClient {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        Ok(Self {
            client: settings.restore_consumer("readstate-metadata").create()?,
        })
    }

    /// Partition counts of `topics` (in that order); `None` for a topic that does not exist.
    /// The requests go out at once, one thread each: every one is a round trip.
    pub fn partition_counts(
        &self,
        topics: &[&str],
        timeout: Duration,
    ) -> Result<Vec<Option<i32>>, KafkaError> {
        std::thread::scope(|s| {
            let asks: Vec<_> = topics
                .iter()
                .map(|t| s.spawn(move || topic_partitions(&self.client, t, timeout)))
                .collect();
            asks.into_iter()
                .map(|a| a.join().expect("metadata request thread panicked"))
                .collect()
        })
    }

    /// Wait (at most `timeout`) until every partition of `topics` has a leader: a topic
    /// created a moment ago answers NotLeaderForPartition for a while, and the tasks ask
    /// its watermarks right after. Returns whether they all have one.
    pub fn await_leaders(&self, topics: &[String], timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if topics.iter().all(|t| self.has_leaders(t, timeout)) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn has_leaders(&self, topic: &str, timeout: Duration) -> bool {
        let Ok(md) = self.client.fetch_metadata(Some(topic), timeout) else {
            return false;
        };
        md.topics().iter().any(|t| {
            t.name() == topic
                && t.error().is_none()
                && !t.partitions().is_empty()
                && t.partitions()
                    .iter()
                    .all(|p| p.leader() >= 0 && p.error().is_none())
        })
    }

    /// Whether the cluster's metadata (asked about `topic`) names a controller among its
    /// brokers. librdkafka sends DescribeConfigs of topics to the controller: without one
    /// it can only time out (librdkafka's mock cluster names controller 0, a broker it
    /// does not have). Metadata that cannot be had says nothing: `true`.
    pub fn has_controller(&self, topic: &str, timeout: Duration) -> bool {
        let Ok(md) = self.client.fetch_metadata(Some(topic), timeout) else {
            return true;
        };
        let rk = self.client.client().native_ptr();
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `rk` is the live handle of `self.client`; rd_kafka_controllerid only
        // reads the client's cached metadata (waiting at most `ms` for it).
        let controller = unsafe { rdkafka::bindings::rd_kafka_controllerid(rk, ms) };
        md.brokers().iter().any(|b| b.id() == controller)
    }

    /// Close the client without waiting (see [`super::close_in_background`]).
    pub fn close_in_background(self) {
        super::close_in_background(self.client);
    }
}

fn topic_partitions(
    c: &BaseConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, KafkaError> {
    let md = c.fetch_metadata(Some(topic), timeout)?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| {
            if t.error().is_some() || t.partitions().is_empty() {
                None
            } else {
                Some(t.partitions().len() as i32)
            }
        }))
}

/// An internal topic to make sure of.
#[derive(Debug, Clone)]
pub struct TopicRequest {
    pub name: String,
    pub partitions: i32,
    pub compacted: bool,
    pub replication: i32,
    /// An existing topic must have exactly `partitions` (internal topics a task reads or
    /// restores from).
    pub check_partitions: bool,
}

/// Create every missing topic, and check the ones that exist against `counts` (their
/// partition counts, in the order of `topics`) and `policies` (from
/// [`describe_policies`]): a wrong partition count (where it matters) or a changelog that
/// is not compacted stops the instance with an error naming the topic. If creation fails
/// or times out but the topic exists afterwards, that is fine; otherwise a warning is
/// logged and the topic is left to broker auto-creation.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[TopicRequest],
    counts: &[Option<i32>],
    policies: &Policies,
    timeout: Duration,
) -> Result<Vec<String>, KafkaError> {
    let mut missing: Vec<&TopicRequest> = Vec::new();
    for (t, n) in topics.iter().zip(counts) {
        match *n {
            None => missing.push(t),
            Some(n) if t.check_partitions && n != t.partitions => {
                return Err(KafkaError::InvalidTopic {
                    topic: t.name.clone(),
                    reason: format!(
                        "it has {n} partitions, the source topics have {}; delete it (or reset the application) so it is recreated",
                        t.partitions
                    ),
                })
            }
            Some(_) if t.compacted => policies.check_compacted(&t.name)?,
            Some(_) => {}
        }
    }
    let mut created = Vec::new();
    if missing.is_empty() {
        return Ok(created);
    }
    let admin: AdminClient<DefaultClientContext> = settings.admin("admin").create()?;
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            let nt = NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(t.replication),
            );
            if t.compacted {
                nt.set("cleanup.policy", "compact")
            } else {
                nt
            }
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    match tokio::time::timeout(
        timeout + Duration::from_secs(1),
        admin.create_topics(&new, &opts),
    )
    .await
    {
        Ok(Ok(results)) => {
            for r in results {
                match r {
                    Ok(name) => {
                        tracing::info!(topic = %name, "created internal topic");
                        created.push(name);
                    }
                    Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                        tracing::debug!(topic = %name, "topic exists")
                    }
                    Err((name, code)) => {
                        tracing::warn!(topic = %name, error = %code, "could not create topic")
                    }
                }
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "CreateTopics failed; relying on existing or auto-created topics")
        }
        Err(_) => {
            tracing::warn!("CreateTopics timed out; relying on existing or auto-created topics")
        }
    }
    super::close_in_background(admin);
    Ok(created)
}

/// The `cleanup.policy` of topics, as far as the broker answered.
#[derive(Debug, Default)]
pub struct Policies {
    /// Topic → its policy; a topic missing here was not described.
    known: std::collections::HashMap<String, String>,
}

impl Policies {
    /// A changelog must be compacted; one whose policy is unknown is let through with a
    /// warning (a broker that does not answer DescribeConfigs, like librdkafka's mock).
    fn check_compacted(&self, topic: &str) -> Result<(), KafkaError> {
        let Some(policy) = self.known.get(topic) else {
            tracing::warn!(topic, "cleanup.policy of the changelog not verified");
            return Ok(());
        };
        if policy.split(',').any(|p| p.trim() == "compact") {
            return Ok(());
        }
        Err(KafkaError::InvalidTopic {
            topic: topic.to_owned(),
            reason: format!("it is a changelog but its cleanup.policy is {policy:?}, not compact (a restore would miss deleted segments); set cleanup.policy=compact"),
        })
    }
}

/// DescribeConfigs of `topics` (those that do not exist yet simply have no answer). A
/// broker that does not answer (librdkafka's mock cluster) leaves them all unknown.
pub async fn describe_policies(
    settings: &KafkaSettings,
    topics: &[&str],
    timeout: Duration,
) -> Result<Policies, KafkaError> {
    let mut policies = Policies::default();
    if topics.is_empty() {
        return Ok(policies);
    }
    let admin: AdminClient<DefaultClientContext> = settings.admin("admin").create()?;
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let answer = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        admin.describe_configs(&specs, &opts),
    )
    .await;
    let results = match answer {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, topics = ?topics, "cannot describe topic configs");
            return Ok(policies);
        }
        Err(_) => {
            tracing::debug!(topics = ?topics, "DescribeConfigs timed out");
            return Ok(policies);
        }
    };
    for (topic, r) in topics.iter().zip(results) {
        // A broker that knows the topic always gives its policy (its default, "delete",
        // included); none means the answering broker did not know the topic's config yet
        // (on a cluster, a topic another instance created a moment ago): unknown, not "".
        let policy = r
            .ok()
            .and_then(|res| res.get("cleanup.policy")?.value.clone());
        if let Some(policy) = policy {
            policies.known.insert((*topic).to_owned(), policy);
        }
    }
    super::close_in_background(admin);
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;

    /// librdkafka's mock names a controller it does not have: DescribeConfigs could only
    /// time out there, so it is not waited for (the real broker's side is covered by
    /// the end-to-end tests' refusal of a changelog that is not compacted).
    #[test]
    fn a_cluster_without_its_controller_among_the_brokers_is_told_apart() {
        let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
        mock.create_topic("t", 1, 1).unwrap();
        let md = MetadataClient::new(&KafkaSettings::new(mock.bootstrap_servers())).unwrap();
        let started = std::time::Instant::now();
        assert!(!md.has_controller("t", Duration::from_secs(5)));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered from metadata"
        );
    }
}
