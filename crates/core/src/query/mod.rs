//! Interactive queries of the read-state stores (Kafka Streams' interactive queries, IQv2):
//! one reader's state in a conversation, every reader of a conversation, and "read by N of
//! M" at a position, answered from the task that owns the conversation, with that task's
//! position. [`http`] serves them.
//!
//! Consistency: an answer reflects at least the position it reports (the position is read
//! before the store, and stores only move forward). A query may ask for `min_position`
//! (read-your-writes); it waits for the task's next commits up to its timeout.

pub mod directory;
pub mod http;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::ids::{ConversationId, Id, IdType, ReaderId, SenderId};
use crate::kafka::partitioner::Partitioner;
use crate::processor::groups::{GroupCodec, GroupValue};
use crate::state::codec::{EntryCodec, StoreKey, TAG_STATE};
use crate::state::head::ConversationHead;
use crate::state::queryable::{Position, QueryableStores, TaskStatus, TaskView};
use crate::state::{ReadState, StoreError, StoreReader};
use crate::topology::Topology;

/// Why a query has no answer here, by what the client should do.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request itself is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// Nothing stored under the key at this position (404).
    #[error("{what}")]
    NotFound {
        what: String,
        partition: i32,
        position: Position,
    },
    /// Another instance owns the partition, or nobody yet (421: ask the owner).
    #[error("partition {partition} of {topic} is not owned by this instance")]
    NotOwned { topic: String, partition: i32 },
    /// The task restores its stores (503, retry).
    #[error("partition {partition} is restoring its stores from the changelog")]
    Restoring { partition: i32 },
    /// The task did not reach the asked position in time (503, retry).
    #[error("partition {partition} did not reach the asked position within {waited:?}")]
    Behind {
        partition: i32,
        waited: Duration,
        position: Position,
    },
    /// The topics are not checked yet (503).
    #[error("the instance is starting: its partitions are not known yet")]
    Starting,
    /// The store could not be read (500, named).
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("corrupt value in store {store}: {reason}")]
    Corrupt { store: String, reason: String },
}

/// What a query asks for besides its key.
#[derive(Debug, Clone, Default)]
pub struct Freshness {
    /// Per input topic partition, the offset the answer must reflect at least.
    pub min_position: Position,
    /// How long to wait for `min_position`.
    pub timeout: Duration,
    /// A task that restores may answer from its stores as they are (flagged stale),
    /// when no `min_position` is asked.
    pub allow_stale: bool,
}

/// One reader's state in a conversation, as stored.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReaderState {
    pub reader: Id,
    pub last_read_seq: i64,
    pub message_id: Option<String>,
    pub sender_id: Option<Id>,
    pub device_id: Option<String>,
    pub read_at_ms: i64,
    pub version: i64,
    pub events_total: i64,
    pub stale_total: i64,
    /// With a message source: messages after the pointer, not the reader's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unread: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mentions: Option<i64>,
    /// The counts are a lower bound (the pointer is behind the recent-messages window).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capped: Option<bool>,
}

/// An answer: what was read, the partition it was read from, and its position.
#[derive(Debug, Clone, Serialize)]
pub struct Answer<T> {
    pub conversation: Id,
    pub partition: i32,
    /// `{topic: {partition: offset}}`: the last offset of each input the answer reflects.
    pub position: PositionJson,
    /// Read from a task that restores (asked with `allow_stale`): behind the inputs, by an
    /// unknown amount; no position is claimed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
    #[serde(flatten)]
    pub value: T,
}

/// Every reader of a conversation (up to a limit).
#[derive(Debug, Clone, Serialize)]
pub struct Readers {
    pub readers: Vec<ReaderState>,
    /// More readers than the limit.
    pub truncated: bool,
}

/// How many readers have read a position.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReadBy {
    pub seq: i64,
    /// Readers whose pointer is at `seq` or past it.
    pub read_by: i64,
    /// The conversation's members (with a members source), else the readers known.
    pub of: i64,
    /// Whether `of` counts members (a members source) or only readers seen.
    pub of_members: bool,
}

/// A position as JSON: `{topic: {partition: offset}}`.
pub type PositionJson = std::collections::BTreeMap<String, std::collections::BTreeMap<i32, i64>>;

pub fn position_json(p: &Position) -> PositionJson {
    let mut out = PositionJson::new();
    for ((t, part), o) in p {
        out.entry(t.clone()).or_default().insert(*part, *o);
    }
    out
}

/// The most readers one answer lists.
pub const MAX_READERS: usize = 10_000;

/// The longest a query waits for its `min_position`.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The read-state queries of one instance's topology over its queryable stores.
pub struct ReadStateQueries {
    stores: Arc<QueryableStores>,
    pub(crate) ids: crate::ids::IdTypes,
    /// Where producers put a conversation's records (the tasks' partitions).
    partitioner: Partitioner,
    task_topic: String,
    /// Topics whose offsets a position may name (every task input).
    inputs: Vec<String>,
    state_store: String,
    heads_store: Option<String>,
    members: bool,
}

impl ReadStateQueries {
    pub fn new(topology: &Topology, stores: Arc<QueryableStores>) -> Self {
        let source = &topology.sources[0];
        let mut inputs: Vec<String> = (topology.sources.iter())
            .chain(topology.side_sources())
            .map(|s| s.task_input_topic().0.clone())
            .collect();
        inputs.extend(topology.rerouted_topics().into_iter().map(|t| t.0));
        Self {
            stores,
            ids: topology.ids,
            partitioner: source.task_input_partitioner(),
            task_topic: source.task_input_topic().0.clone(),
            inputs,
            state_store: topology.store.name.as_str().to_owned(),
            heads_store: (topology.heads_store.as_ref()).map(|s| s.name.as_str().to_owned()),
            members: topology.members.is_some(),
        }
    }

    /// Parse a conversation id of the topology's type.
    pub fn conversation(&self, text: &str) -> Result<ConversationId, QueryError> {
        parse(self.ids.conversation, text, "conversation").map(ConversationId)
    }

    pub fn reader(&self, text: &str) -> Result<ReaderId, QueryError> {
        parse(self.ids.user, text, "reader").map(ReaderId)
    }

    /// Parse `topic:partition:offset[,...]`, checking each names an input of the task
    /// that owns `conversation`.
    pub fn min_position(&self, c: &ConversationId, text: &str) -> Result<Position, QueryError> {
        let p = self.partition_of(c)?;
        let mut out = Position::new();
        for item in text.split(',') {
            let (topic, partition, offset) = parse_position_item(item)?;
            if !self.inputs.contains(&topic) {
                return Err(QueryError::BadRequest(format!(
                    "min_position names topic {topic}, which no task reads; the task inputs are {}",
                    self.inputs.join(", ")
                )));
            }
            if partition != p {
                return Err(QueryError::BadRequest(format!(
                    "min_position names partition {partition} of {topic}, but conversation {c} is on partition {p}"
                )));
            }
            let at = out.entry((topic, partition)).or_insert(offset);
            *at = (*at).max(offset);
        }
        Ok(out)
    }

    /// The partition (task) of a conversation.
    pub fn partition_of(&self, c: &ConversationId) -> Result<i32, QueryError> {
        let partitions = self.stores.partitions().ok_or(QueryError::Starting)?;
        let mut key = Vec::with_capacity(24);
        c.0.write_key(&mut key);
        Ok(self.partitioner.partition(&key, partitions))
    }

    /// The running task of `c`'s partition, once at `fresh.min_position`.
    pub async fn task_for(
        &self,
        c: &ConversationId,
        fresh: &Freshness,
    ) -> Result<(i32, TaskView), QueryError> {
        let p = self.partition_of(c)?;
        let mut changes = self.stores.subscribe();
        let deadline = tokio::time::Instant::now() + fresh.timeout.min(MAX_WAIT);
        loop {
            changes.mark_unchanged();
            let view = self.stores.task(p).ok_or_else(|| QueryError::NotOwned {
                topic: self.task_topic.clone(),
                partition: p,
            })?;
            let restoring = view.status == TaskStatus::Restoring;
            let stale_ok = fresh.allow_stale && fresh.min_position.is_empty();
            if restoring && stale_ok && !view.stores.is_empty() {
                return Ok((p, view));
            }
            if restoring && fresh.timeout.is_zero() {
                return Err(QueryError::Restoring { partition: p });
            }
            if view.status == TaskStatus::Running && reaches(&view.position, &fresh.min_position) {
                return Ok((p, view));
            }
            let behind = |position| match view.status {
                TaskStatus::Restoring => QueryError::Restoring { partition: p },
                TaskStatus::Running => QueryError::Behind {
                    partition: p,
                    waited: fresh.timeout.min(MAX_WAIT),
                    position,
                },
            };
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(behind(view.position.clone())),
            }
        }
    }

    /// One reader's state in a conversation.
    pub async fn reader_state(
        &self,
        c: &ConversationId,
        r: &ReaderId,
        fresh: &Freshness,
    ) -> Result<Answer<ReaderState>, QueryError> {
        let (p, view) = self.task_for(c, fresh).await?;
        let store = self.store(&view, &self.state_store)?;
        let key = StoreKey::state(&crate::model::StateKey {
            conversation: c.clone(),
            reader: r.clone(),
        });
        let head = self.head(&view, c)?;
        let Some(bytes) = store.get(key.as_bytes())? else {
            return Err(QueryError::NotFound {
                what: format!("no read state of reader {r} in conversation {c}"),
                partition: p,
                position: view.position,
            });
        };
        let st = decode_state(store, &bytes)?;
        Ok(answer(c, p, &view, reader_state(r, &st, head.as_ref())))
    }

    /// Every reader of a conversation, in reader order, up to `limit`.
    pub async fn readers(
        &self,
        c: &ConversationId,
        limit: usize,
        fresh: &Freshness,
    ) -> Result<Answer<Readers>, QueryError> {
        let (p, view) = self.task_for(c, fresh).await?;
        let (readers, truncated) = self.scan_readers(&view, c, limit)?;
        Ok(answer(c, p, &view, Readers { readers, truncated }))
    }

    /// How many readers have read `seq` (of the members, with a members source).
    pub async fn read_by(
        &self,
        c: &ConversationId,
        seq: i64,
        fresh: &Freshness,
    ) -> Result<Answer<ReadBy>, QueryError> {
        let (p, view) = self.task_for(c, fresh).await?;
        let (readers, _) = self.scan_readers(&view, c, usize::MAX)?;
        let group = self.group(&view, c)?;
        let counted = |r: &ReaderState| {
            let member = group
                .as_ref()
                .is_none_or(|g| g.members.contains(&ReaderId(r.reader.clone())));
            member && r.last_read_seq >= seq
        };
        let read_by = readers.iter().filter(|r| counted(r)).count() as i64;
        let of = match &group {
            Some(g) => g.members.len() as i64,
            None => readers.len() as i64,
        };
        let value = ReadBy {
            seq,
            read_by,
            of,
            of_members: group.is_some(),
        };
        Ok(answer(c, p, &view, value))
    }

    fn scan_readers(
        &self,
        view: &TaskView,
        c: &ConversationId,
        limit: usize,
    ) -> Result<(Vec<ReaderState>, bool), QueryError> {
        let store = self.store(view, &self.state_store)?;
        let head = self.head(view, c)?;
        let prefix = StoreKey::conversation_prefix(TAG_STATE, c, self.ids.user);
        let entries = store.scan_prefix(&prefix, limit.saturating_add(1))?;
        let truncated = entries.len() > limit;
        let mut out = Vec::with_capacity(entries.len().min(limit));
        for (k, v) in entries.into_iter().take(limit) {
            let Some((TAG_STATE, key)) = StoreKey::decode(&k) else {
                continue;
            };
            if key.conversation != *c {
                continue;
            }
            let st = decode_state(store, &v)?;
            out.push(reader_state(&key.reader, &st, head.as_ref()));
        }
        Ok((out, truncated))
    }

    fn head(
        &self,
        view: &TaskView,
        c: &ConversationId,
    ) -> Result<Option<ConversationHead>, QueryError> {
        let Some(name) = &self.heads_store else {
            return Ok(None);
        };
        let store = self.store(view, name)?;
        let Some(bytes) = store.get(StoreKey::head(c).as_bytes())? else {
            return Ok(Some(ConversationHead::default()));
        };
        ConversationHead::decode(&bytes)
            .map(Some)
            .map_err(|reason| corrupt(store, reason))
    }

    fn group(&self, view: &TaskView, c: &ConversationId) -> Result<Option<GroupValue>, QueryError> {
        let (true, Some(name)) = (self.members, &self.heads_store) else {
            return Ok(None);
        };
        let store = self.store(view, name)?;
        match store.get(GroupCodec::encode_key(c).as_bytes())? {
            None => Ok(Some(GroupValue::default())),
            Some(b) => GroupCodec::decode_value(&b)
                .map(Some)
                .map_err(|reason| corrupt(store, reason)),
        }
    }

    fn store<'a>(&self, view: &'a TaskView, name: &str) -> Result<&'a dyn StoreReader, QueryError> {
        (view.stores.iter())
            .find(|s| s.name().as_str() == name)
            .map(|s| &**s)
            .ok_or_else(|| QueryError::Corrupt {
                store: name.to_owned(),
                reason: "the task has no such store".into(),
            })
    }
}

fn parse(ty: IdType, text: &str, what: &str) -> Result<Id, QueryError> {
    Id::parse(ty, text).map_err(|e| QueryError::BadRequest(format!("{what} id {text:?}: {e}")))
}

fn parse_position_item(item: &str) -> Result<(String, i32, i64), QueryError> {
    let bad = || {
        QueryError::BadRequest(format!(
            "min_position item {item:?} is not topic:partition:offset"
        ))
    };
    let mut parts = item.rsplitn(3, ':');
    let offset = parts
        .next()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(bad)?;
    let partition = parts
        .next()
        .and_then(|s| s.parse::<i32>().ok())
        .ok_or_else(bad)?;
    let topic = parts.next().filter(|t| !t.is_empty()).ok_or_else(bad)?;
    if offset < 0 || partition < 0 {
        return Err(bad());
    }
    Ok((topic.to_owned(), partition, offset))
}

/// Whether `at` reflects every offset of `min`.
pub fn reaches(at: &Position, min: &Position) -> bool {
    min.iter().all(|(tp, o)| at.get(tp).is_some_and(|a| a >= o))
}

fn answer<T>(c: &ConversationId, p: i32, view: &TaskView, value: T) -> Answer<T> {
    Answer {
        conversation: c.0.clone(),
        partition: p,
        position: position_json(&view.position),
        stale: view.status == TaskStatus::Restoring,
        value,
    }
}

fn decode_state(store: &dyn StoreReader, bytes: &[u8]) -> Result<ReadState, QueryError> {
    ReadState::decode(bytes).map_err(|reason| corrupt(store, reason))
}

fn corrupt(store: &dyn StoreReader, reason: String) -> QueryError {
    QueryError::Corrupt {
        store: store.name().to_string(),
        reason,
    }
}

fn reader_state(r: &ReaderId, st: &ReadState, head: Option<&ConversationHead>) -> ReaderState {
    let counts = head.map(|h| h.counts(r, st.last_read_seq));
    ReaderState {
        reader: r.0.clone(),
        last_read_seq: st.last_read_seq,
        message_id: st.message_id.as_ref().map(|m| m.to_string()),
        sender_id: st.sender_id.as_ref().map(|s: &SenderId| s.0.clone()),
        device_id: st.device_id.as_ref().map(|d| d.to_string()),
        read_at_ms: st.read_at_ms,
        version: st.version,
        events_total: st.events_total,
        stale_total: st.stale_total,
        unread: counts.map(|c| c.unread),
        mentions: counts.map(|c| c.mentions),
        capped: counts.map(|c| c.capped),
    }
}

#[cfg(test)]
mod tests;
