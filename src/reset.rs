//! `readstate reset`: the application reset tool Kafka Streams users know
//! (`kafka-streams-application-reset`), for a topology.
//!
//! With every instance stopped it moves the group's committed offsets on the source topics
//! (to the earliest, the latest, or the first offset at a time), deletes the internal
//! topics (changelogs, repartition and rerouted topics; they are recreated empty at the
//! next start) and, when asked, the PostgreSQL sink's stored offsets and the local state directory.
//! It refuses while the group (or the sink's group) has members.

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::{KafkaError, KafkaSettings};
use crate::sink::{PostgresTable, SinkError};
use crate::topology::Topology;

/// Errors of the reset tool.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("consumer group {group} still has {members} member(s) ({clients}): stop every instance first")]
    ActiveMembers {
        group: String,
        members: usize,
        clients: String,
    },
    #[error("source topic {0} does not exist")]
    MissingTopic(String),
    #[error("cannot delete topic {topic}: {reason}")]
    DeleteTopic { topic: String, reason: String },
    #[error("cannot delete the local state {path}: {source}")]
    LocalState {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("postgres sink offsets: {0}")]
    Sink(#[from] SinkError),
}

impl From<rdkafka::error::KafkaError> for ResetError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        ResetError::Kafka(KafkaError::from(e))
    }
}

/// Where the committed offsets of the source topics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    Earliest,
    Latest,
    /// The first offset whose timestamp is at or after this (ms since the epoch).
    Timestamp(i64),
}

/// What to reset.
#[derive(Debug, Clone)]
pub struct ResetOptions {
    pub to: ResetTo,
    /// Also delete the sink's stored offsets in PostgreSQL (needs `database_url`).
    pub sink_offsets: bool,
    pub database_url: Option<String>,
    /// Also delete `<state_dir>/<application.id>` on this machine.
    pub local_state: Option<PathBuf>,
    /// Print the plan, change nothing.
    pub dry_run: bool,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Reset the application of `topology`; returns the lines of what was (or, with
/// `dry_run`, would be) done.
pub fn reset(
    topology: &Topology,
    kafka: &KafkaSettings,
    opts: &ResetOptions,
) -> Result<Vec<String>, ResetError> {
    let group = topology.application_id.as_str();
    let consumer: BaseConsumer = kafka.restore_consumer(group).create()?;
    refuse_active_members(&consumer, group)?;
    let sink_group = topology.postgres.as_ref().map(|p| p.consumer_group.clone());
    if let (true, Some(g)) = (opts.sink_offsets, &sink_group) {
        refuse_active_members(&consumer, g)?;
    }
    let verb = |done: &str, would: &str| if opts.dry_run { would } else { done }.to_owned();
    let mut out = Vec::new();
    let (tpl, lines) = target_offsets(&consumer, topology, opts.to)?;
    if !opts.dry_run {
        consumer.commit(&tpl, CommitMode::Sync)?;
    }
    out.push(format!(
        "{} committed offsets of group {group}:",
        verb("moved", "would move")
    ));
    out.extend(lines);
    let internal: Vec<String> = topology
        .internal_topics()
        .into_iter()
        .filter(|(t, _)| *t != topology.dead_letter_topic)
        .map(|(t, _)| t.0)
        .chain(std::iter::once(topology.instances_topic().0))
        .collect();
    let existing = existing_topics(&consumer, &internal)?;
    if !opts.dry_run && !existing.is_empty() {
        delete_topics(kafka, &existing)?;
    }
    for t in &internal {
        let what = match existing.contains(t) {
            true => verb("deleted", "would delete"),
            false => "absent, nothing to delete:".to_owned(),
        };
        out.push(format!("{what} internal topic {t}"));
    }
    if opts.sink_offsets {
        out.push(reset_sink_offsets(topology, opts)?);
    }
    if let Some(root) = &opts.local_state {
        let dir = root.join(topology.application_id.as_str());
        if !opts.dry_run && dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| ResetError::LocalState {
                path: dir.clone(),
                source,
            })?;
        }
        out.push(format!(
            "{} local state {}",
            verb("deleted", "would delete"),
            dir.display()
        ));
    }
    Ok(out)
}

fn refuse_active_members(consumer: &BaseConsumer, group: &str) -> Result<(), ResetError> {
    let list = consumer.fetch_group_list(Some(group), TIMEOUT)?;
    let Some(g) = list.groups().iter().find(|g| g.name() == group) else {
        return Ok(());
    };
    if g.members().is_empty() {
        return Ok(());
    }
    let clients: Vec<String> = g
        .members()
        .iter()
        .map(|m| format!("{} on {}", m.client_id(), m.client_host()))
        .collect();
    Err(ResetError::ActiveMembers {
        group: group.to_owned(),
        members: g.members().len(),
        clients: clients.join(", "),
    })
}

/// The new committed offset of every source partition, and a line per topic saying it.
fn target_offsets(
    consumer: &BaseConsumer,
    topology: &Topology,
    to: ResetTo,
) -> Result<(TopicPartitionList, Vec<String>), ResetError> {
    let mut tpl = TopicPartitionList::new();
    let mut lines = Vec::new();
    for s in &topology.sources {
        let topic = s.topic.as_str();
        let md = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|n| *n > 0)
            .ok_or_else(|| ResetError::MissingTopic(topic.to_owned()))?;
        let mut parts = Vec::new();
        for p in 0..partitions {
            let offset = target_offset(consumer, topic, p, to)?;
            tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
            parts.push(format!("{p}:{offset}"));
        }
        lines.push(format!("  {topic} to {to:?}: {}", parts.join(" ")));
    }
    Ok((tpl, lines))
}

fn target_offset(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    to: ResetTo,
) -> Result<i64, ResetError> {
    let (low, high) = consumer.fetch_watermarks(topic, partition, TIMEOUT)?;
    Ok(match to {
        ResetTo::Earliest => low,
        ResetTo::Latest => high,
        ResetTo::Timestamp(ms) => {
            let mut q = TopicPartitionList::new();
            q.add_partition_offset(topic, partition, Offset::Offset(ms))?;
            let found = consumer.offsets_for_times(q, TIMEOUT)?;
            match found.find_partition(topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= 0 => o,
                // No record at or after the time: the end.
                _ => high,
            }
        }
    })
}

fn existing_topics(consumer: &BaseConsumer, topics: &[String]) -> Result<Vec<String>, ResetError> {
    let md = consumer.fetch_metadata(None, TIMEOUT)?;
    Ok(topics
        .iter()
        .filter(|t| md.topics().iter().any(|m| m.name() == t.as_str()))
        .cloned()
        .collect())
}

fn delete_topics(kafka: &KafkaSettings, topics: &[String]) -> Result<(), ResetError> {
    let admin: AdminClient<DefaultClientContext> = kafka.admin("readstate-reset").create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(TIMEOUT))
        .request_timeout(Some(TIMEOUT));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ResetError::DeleteTopic {
            topic: names.join(", "),
            reason: e.to_string(),
        })?;
    for r in rt.block_on(admin.delete_topics(&names, &opts))? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => {
                return Err(ResetError::DeleteTopic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

fn reset_sink_offsets(topology: &Topology, opts: &ResetOptions) -> Result<String, ResetError> {
    let Some(pg) = &topology.postgres else {
        return Ok("no postgres sink in the topology: no sink offsets to delete".to_owned());
    };
    let url = opts.database_url.as_deref().ok_or_else(|| {
        SinkError::Fatal("--sink-offsets needs DATABASE_URL (or --database-url)".into())
    })?;
    // The stored offsets live beside the receipts table: one connection serves both sinks.
    let table = PostgresTable::connect(url, &pg.table, 1, pg.statement_timeout)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SinkError::Fatal(format!("tokio runtime: {e}")))?;
    let mut lines = Vec::new();
    let sinks = std::iter::once(pg).chain(&topology.heads_postgres);
    let sinks = sinks.chain(&topology.senders_postgres);
    for sink in sinks.chain(&topology.members_postgres) {
        let topic = sink.topic.as_str();
        let group = &sink.consumer_group;
        let n = rt.block_on(table.delete_offsets(group, topic, opts.dry_run))?;
        let verb = if opts.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        lines.push(format!(
            "{verb} {n} stored sink offset(s) of group {group}, topic {topic}, in PostgreSQL"
        ));
    }
    Ok(lines.join("\n"))
}
