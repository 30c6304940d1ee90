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
    pub fn partition_counts(
        &self,
        topics: &[&str],
        timeout: Duration,
    ) -> Result<Vec<Option<i32>>, KafkaError> {
        topics
            .iter()
            .map(|t| topic_partitions(&self.client, t, timeout))
            .collect()
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

/// Create every missing topic, and check the ones that exist: a wrong partition count
/// (where it matters) or a changelog that is not compacted stops the instance with an error
/// naming the topic. If creation fails or times out but the topic exists afterwards, that
/// is fine; otherwise a warning is logged and the topic is left to broker auto-creation.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    metadata: &MetadataClient,
    topics: &[TopicRequest],
    timeout: Duration,
) -> Result<(), KafkaError> {
    let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    let counts = metadata.partition_counts(&names, timeout)?;
    let mut missing: Vec<&TopicRequest> = Vec::new();
    let mut compacted: Vec<&str> = Vec::new();
    for (t, n) in topics.iter().zip(counts) {
        match n {
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
            Some(_) if t.compacted => compacted.push(&t.name),
            Some(_) => {}
        }
    }
    check_compacted(settings, &compacted, timeout).await?;
    if missing.is_empty() {
        return Ok(());
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
                    Ok(name) => tracing::info!(topic = %name, "created internal topic"),
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
    Ok(())
}

/// Existing changelog topics must have `cleanup.policy=compact`. A broker that does not
/// answer DescribeConfigs (librdkafka's mock cluster) is tolerated with a warning.
async fn check_compacted(
    settings: &KafkaSettings,
    topics: &[&str],
    timeout: Duration,
) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
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
            tracing::warn!(error = %e, topics = ?topics, "cannot describe topic configs; cleanup.policy of the changelogs not verified");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!(topics = ?topics, "DescribeConfigs timed out; cleanup.policy of the changelogs not verified");
            return Ok(());
        }
    };
    for (topic, r) in topics.iter().zip(results) {
        match r {
            Ok(resource) => {
                let policy = resource
                    .get("cleanup.policy")
                    .and_then(|e| e.value.clone())
                    .unwrap_or_default();
                if !policy.split(',').any(|p| p.trim() == "compact") {
                    return Err(KafkaError::InvalidTopic {
                        topic: (*topic).to_owned(),
                        reason: format!("it is a changelog but its cleanup.policy is {policy:?}, not compact (a restore would miss deleted segments); set cleanup.policy=compact"),
                    });
                }
            }
            Err(code) => {
                tracing::warn!(topic, error = %code, "cannot describe topic config; cleanup.policy not verified")
            }
        }
    }
    Ok(())
}
