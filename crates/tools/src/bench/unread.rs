//! Figures of unread and mention counts: what a message costs in state writes in a large
//! conversation, and the core's events per second with both sources.

use std::sync::Arc;
use std::time::Instant;

use super::{BenchError, Figure, Target};
use crate::loadgen::chat::{generate, ChatEvent, ChatSpec};
use readstate::ids::{ConversationId, Origin, ReaderId, SenderId, StoreName};
use readstate::model::{MessageEvent, ReadEvent};
use readstate::processor::groups::DEFAULT_LARGE_GROUP_MEMBERS;
use readstate::processor::{EmitPolicy, ReadStateProcessor, DEFAULT_UNREAD_CAP};
use readstate::serde::avro::{AvroReadEvent, EventEncoder};
use readstate::serde::members::MemberList;
use readstate::serde::message::{AvroMessageEvent, MessageEncoder};
use readstate::serde::registry::{LocalRegistry, LOCAL_MESSAGE_EVENT_ID, LOCAL_READ_EVENT_ID};
use readstate::serde::{EventDecoder, MessageDecoder, MESSAGE_EVENT_SCHEMA, READ_EVENT_SCHEMA};
use readstate::state::rocks::{RocksDbOptions, RocksDbStore};
use readstate::state::KeyValueStore;
use readstate::task::SourceRecord;

const MEMBERS: i64 = 1_000;
const MENTIONS: usize = 2;

/// A task with the read-state and head-state stores of `read_state_with_unread.toml`.
fn task(dir: &std::path::Path) -> Result<ReadStateProcessor, BenchError> {
    let open = |name: &str| -> Result<Box<dyn KeyValueStore>, BenchError> {
        let store = RocksDbStore::open(
            StoreName::from(name),
            &dir.join(name),
            &RocksDbOptions::default(),
        )?;
        Ok(Box::new(store))
    };
    let cache = readstate::topology::DEFAULT_CACHE_MAX_ENTRIES;
    let mut p = ReadStateProcessor::open(open("read-state")?, EmitPolicy::default(), cache)?;
    p.enable_unread(DEFAULT_UNREAD_CAP, 4 * cache, open("head-state")?)?;
    Ok(p)
}

fn at(offset: i64) -> Origin {
    Origin { source: 1, offset }
}

/// State writes per message in a 1,000-member conversation where every member has a
/// pointer, flushing after every message (no coalescing helps): a per-member fan-out
/// would write 1,000 values per message; readstate writes the conversation's head.
pub fn writes_per_message(messages: i64) -> Result<Figure, BenchError> {
    let dir = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
    let mut task = task(dir.path())?;
    let conv = ConversationId::from(1);
    let reads: Vec<(ReadEvent, Origin)> = (0..MEMBERS)
        .map(|m| {
            let e = ReadEvent {
                reader_id: ReaderId::from(m),
                conversation_id: conv.clone(),
                message_seq: 0,
                ..Default::default()
            };
            (e, at(m))
        })
        .collect();
    let views: Vec<_> = reads.iter().map(|(e, o)| (e.view(), *o)).collect();
    task.process(&views)?;
    let mut out = task.prepare_flush(0);
    task.commit_flush(out.flush.take_batches(), &[])?;
    let (mut writes, mut heads) = (0usize, 0usize);
    let started = Instant::now();
    for i in 1..=messages {
        let m = MessageEvent {
            conversation_id: conv.clone(),
            message_seq: i,
            sender_id: SenderId::from(i % MEMBERS),
            mentions: (0..MENTIONS as i64)
                .map(|k| ReaderId::from((i * 7 + k * 13) % MEMBERS))
                .collect(),
            ..Default::default()
        };
        task.process_messages(&[(m, at(MEMBERS + i))], None, &mut Vec::new())?;
        let mut out = task.prepare_flush(0);
        writes += out.flush.store_writes();
        heads += out.heads.len();
        task.commit_flush(out.flush.take_batches(), &[])?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Figure {
        name: "state writes per message (1,000 members)".into(),
        value: writes as f64 / messages as f64,
        unit: "writes",
        target: Some(Target::AtMost(1.0 + MENTIONS as f64)),
        note: format!(
            "{messages} messages with {MENTIONS} mentions each to one conversation of {MEMBERS} members with pointers, a flush after each: {heads} head updates, {:.0} messages/s; a per-member fan-out would write {MEMBERS}",
            messages as f64 / secs
        ),
    })
}

/// Core with both sources: a chat workload (messages and reads, reordered, duplicated) as
/// wire bytes → decode → fold (reads into pointers, messages into heads) → flush with
/// receipt counts, on one thread, in poll batches of the runtime's size.
pub fn both_sources(conversations: u64) -> Result<Figure, BenchError> {
    core_with_messages(conversations, false)
}

/// The same core figure with receipts for senders and read by N of M on (every
/// conversation's member list applied first, large-group rule at its default), then off,
/// in one run: the cost of the senders' outputs.
pub fn sender_outputs(conversations: u64) -> Result<Vec<Figure>, BenchError> {
    let on = core_with_messages(conversations, true)?;
    let off = core_with_messages(conversations, false)?;
    let ratio = Figure {
        name: "sender receipts and read-by on / off".into(),
        value: on.value / off.value,
        unit: "x events/s",
        target: None,
        note: "measured in one run; below 1 is the cost".into(),
    };
    Ok(vec![on, off, ratio])
}

fn core_with_messages(conversations: u64, senders: bool) -> Result<Figure, BenchError> {
    let w = generate(&ChatSpec {
        seed: 3,
        conversations,
        max_members: 200,
        max_messages: 300,
        ..Default::default()
    });
    let reads_enc = EventEncoder::new(READ_EVENT_SCHEMA, LOCAL_READ_EVENT_ID)?;
    let msgs_enc = MessageEncoder::new(MESSAGE_EVENT_SCHEMA, LOCAL_MESSAGE_EVENT_ID)?;
    let records: Vec<(bool, Vec<u8>)> = w
        .arrivals
        .iter()
        .map(|e| match e {
            ChatEvent::Read(r) => reads_enc
                .encode(&AvroReadEvent::from(r))
                .map(|b| (false, b)),
            ChatEvent::Message(m) => msgs_enc
                .encode(&AvroMessageEvent::from(m))
                .map(|b| (true, b)),
        })
        .collect::<Result<_, _>>()?;
    let messages = records.iter().filter(|(m, _)| *m).count();
    let dir = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
    let mut task = task(dir.path())?;
    if senders {
        task.enable_groups(DEFAULT_LARGE_GROUP_MEMBERS, 4 * DEFAULT_UNREAD_CAP)?;
        task.enable_sender_receipts(readstate::ids::IdTypes::default())?;
        let lists: Vec<MemberList> = (w.members.iter())
            .map(|(c, ms)| {
                let mut members = ms.clone();
                members.sort_unstable();
                MemberList {
                    conversation: c.clone(),
                    members,
                }
            })
            .collect();
        task.process_members(&lists)?;
    }
    let registry = Arc::new(LocalRegistry::new());
    let mut reads_dec = EventDecoder::new(registry.clone())?;
    let mut msgs_dec = MessageDecoder::with_max_record_bytes(registry, 65536)?;
    let first = |m: bool| records.iter().find(|r| r.0 == m).map(|r| Some(&r.1[..]));
    futures::executor::block_on(reads_dec.prepare(first(false).into_iter()))?;
    futures::executor::block_on(msgs_dec.prepare(first(true).into_iter()))?;
    let mut dead = 0usize;
    let (mut updates, mut heads, mut receipts, mut read_by) = (0usize, 0usize, 0usize, 0usize);
    let started = Instant::now();
    for (chunk_no, chunk) in records.chunks(10_000).enumerate() {
        let base = (chunk_no * 10_000) as i64;
        let batch = |want: bool| -> Vec<SourceRecord<'_>> {
            chunk
                .iter()
                .enumerate()
                .filter(|(_, (m, _))| *m == want)
                .map(|(i, (_, b))| SourceRecord {
                    topic: "bench",
                    partition: 0,
                    offset: base + i as i64,
                    key: None,
                    value: Some(b),
                    origin: Origin {
                        source: u32::from(want),
                        offset: base + i as i64,
                    },
                    timestamp: None,
                })
                .collect()
        };
        task.process(&super::decode_reads(&reads_dec, &batch(false), &mut dead))?;
        let messages: Vec<_> = batch(true)
            .iter()
            .filter_map(|r| msgs_dec.decode(r.value).ok().map(|m| (m, r.origin)))
            .collect();
        task.process_messages(&messages, None, &mut Vec::new())?;
        if chunk_no % 10 == 9 || base as usize + chunk.len() == records.len() {
            let mut out = task.prepare_flush(0);
            updates += out.updates.len();
            heads += out.heads.len();
            receipts += out.sender_receipts.len();
            read_by += out.read_by.len();
            task.commit_flush(out.flush.take_batches(), &[])?;
        }
    }
    let name = match senders {
        true => "core with messages and reads, sender receipts and read-by on",
        false => "core with messages and reads",
    };
    let secs = started.elapsed().as_secs_f64();
    Ok(Figure {
        name: name.into(),
        value: records.len() as f64 / secs,
        unit: "events/s",
        target: None,
        note: format!(
            "{} events ({messages} messages, {} reads) in {conversations} conversations of up to 200 members; a flush per 100,000 events: {updates} receipt updates with counts, {heads} head updates, {receipts} sender receipts, {read_by} read-by records; {} dead letters",
            records.len(),
            records.len() - messages,
            dead
        ),
    })
}
