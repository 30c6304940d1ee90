//! Compile a parsed topology spec into a checked [`Topology`], one function per section
//! (`[application]`, `[[source]]`, `[[store]]`, `[[processor]]`, kafka and postgres
//! `[[sink]]`s); each reports its errors with where they are, and none stops at the first.

use std::path::PathBuf;
use std::time::Duration;

use super::graph::Output;
use super::{
    BadRecords, KafkaSink, KeyedBy, OnBadRecord, Partitioner, PostgresSink, ProcessingGuarantee,
    ReadStateNode, ResolveSpec, Source, SourceFormat, Store, StoreKind, Topology, TopologyError,
    DEFAULT_CACHE_MAX_ENTRIES, READ_STATE_KIND,
};
use crate::config::{self, SinkSpec, TopologySpec};
use crate::ids::{ApplicationId, IdTypes, StoreName, TopicName};
use crate::serde::json::{PositionKind, Role};

/// Compile a parsed spec, section by section; every section reports its errors, and a
/// topology comes back only when each part it needs compiled.
pub(super) fn compile_spec(
    spec: &TopologySpec,
    kinds: &[&str],
    errs: &mut Errors,
) -> Option<Topology> {
    let app = application(spec, errs);
    let ids = super::fields::id_types(spec, errs);
    let (sources, messages) = sources(spec, &app.prefix, &ids, errs);
    let members = members_source(spec, &app.prefix, &sources, messages.as_ref(), errs);
    let stores = stores(spec, &app.prefix, errs);
    let resolving = resolving_source(&sources);
    let processors = processors(spec, kinds, messages.as_ref(), resolving, &stores, errs);
    let sides: Vec<Source> = messages.iter().chain(&members).cloned().collect();
    check_inputs(spec, &processors, &sources, &sides, errs);
    check_custom_sources(spec, &processors, errs);
    let kafka = kafka_sinks(
        spec,
        &processors,
        messages.is_some(),
        members.is_some(),
        errs,
    );
    let pg = postgres_sinks(&kafka, members.as_ref(), &app.prefix, errs);
    let processor = processors.into_iter().next()?;
    let store = stores.iter().find(|s| s.name == processor.store)?.clone();
    let heads_store = match &processor.heads_store {
        Some(h) => Some(stores.iter().find(|s| &s.name == h)?.clone()),
        None => None,
    };
    if stores.len() > 1 + usize::from(heads_store.is_some()) {
        errs.push("store", "stores other than the processor's are not used");
    }
    Some(Topology {
        application_id: ApplicationId(app.id?),
        commit_interval: app.commit_interval,
        guarantee: app.guarantee,
        state_dir: app.state_dir,
        dead_letter_topic: TopicName(app.dead_letter_topic),
        bad_records: app.bad_records,
        sources,
        messages,
        store,
        heads_store,
        processor,
        output: kafka.receipts.into_iter().next()?,
        heads_output: kafka.heads.into_iter().next(),
        sender_receipts_output: kafka.senders.into_iter().next(),
        postgres: pg.receipts,
        heads_postgres: pg.heads,
        senders_postgres: pg.senders,
        members_postgres: pg.members,
        members,
        read_by_output: kafka.read_by.into_iter().next(),
        ids,
    })
}

/// What `[application]` compiles to.
struct Application {
    id: Option<String>,
    /// The id, or a stand-in while it is missing: the prefix of derived topic names.
    prefix: String,
    commit_interval: Duration,
    guarantee: ProcessingGuarantee,
    dead_letter_topic: String,
    bad_records: BadRecords,
    state_dir: PathBuf,
}

fn application(spec: &TopologySpec, errs: &mut Errors) -> Application {
    let app = spec.application.clone().unwrap_or_default();
    if spec.application.is_none() {
        errs.push("application", "section [application] is required");
    }
    let id = errs
        .required("application", "id", &app.id)
        .map(str::to_owned);
    if let Some(id) = &id {
        check_topic(errs, "application.id", id);
    }
    let prefix = id.clone().unwrap_or_else(|| "app".into());
    let commit_interval = errs.duration(
        "application.commit_interval",
        &app.commit_interval,
        Duration::from_secs(1),
    );
    if commit_interval.is_zero() {
        errs.push("application.commit_interval", "must be greater than zero");
    }
    let guarantee = guarantee(&app, errs);
    let dead_letter_topic = app
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{prefix}-dlq"));
    check_topic(errs, "application.dead_letter_topic", &dead_letter_topic);
    Application {
        id,
        prefix,
        commit_interval,
        guarantee,
        dead_letter_topic,
        bad_records: compile_bad_records(&app, errs),
        state_dir: PathBuf::from(app.state_dir.clone().unwrap_or_else(|| "./state".into())),
    }
}

fn guarantee(app: &config::ApplicationSpec, errs: &mut Errors) -> ProcessingGuarantee {
    match app.processing_guarantee.as_deref() {
        None | Some("at_least_once") => ProcessingGuarantee::AtLeastOnce,
        Some("exactly_once_v2") => ProcessingGuarantee::ExactlyOnceV2,
        Some(other) => {
            errs.push(
                "application.processing_guarantee",
                format!("unknown guarantee {other:?}: expected \"at_least_once\" or \"exactly_once_v2\""),
            );
            ProcessingGuarantee::AtLeastOnce
        }
    }
}

/// The read-event sources, and the message source when there is one.
fn sources(
    spec: &TopologySpec,
    app: &str,
    ids: &IdTypes,
    errs: &mut Errors,
) -> (Vec<Source>, Option<Source>) {
    if spec.source.is_empty() {
        errs.push("source", "at least one [[source]] is required");
    }
    let mut sources: Vec<Source> = Vec::new();
    let mut messages: Option<Source> = None;
    for (i, s) in spec.source.iter().enumerate() {
        if s.records.as_deref() == Some(MEMBERS) {
            continue;
        }
        let at = format!("source[{i}]");
        let name = errs.required(&at, "name", &s.name);
        let topic = errs.required(&at, "topic", &s.topic);
        if let Some(t) = topic {
            check_topic(errs, &format!("{at}.topic"), t);
        }
        let (keyed_by, is_messages) = source_roles(&at, s, errs);
        let (Some(name), Some(topic)) = (name, topic) else {
            continue;
        };
        if is_messages && messages.is_some() {
            errs.push(format!("{at}.records"), "at most one message-events source");
        }
        let taken = match is_messages {
            true => sources.iter().any(|x| x.name == name),
            false => sources.iter().chain(&messages).any(|x| x.name == name),
        };
        if taken {
            errs.push(
                format!("{at}.name"),
                format!("duplicate source name {name:?}"),
            );
        }
        let repartitioned = keyed_by != KeyedBy::ConversationId;
        let repartition_topic =
            repartitioned.then(|| TopicName(format!("{app}-{name}-repartition")));
        let source = Source {
            name: name.to_owned(),
            topic: TopicName(topic.to_owned()),
            keyed_by,
            repartition_topic,
            partitioner: partitioner(&at, s, errs),
            rerouted_topic: rerouted_topic(&at, s, app, name, repartitioned, errs),
            format: super::fields::source_format(&at, s, is_messages, ids, errs),
        };
        match is_messages {
            true => messages = Some(source),
            false => sources.push(source),
        }
    }
    if let Some(m) = &messages {
        check_co_partitioning(spec, &sources, m, errs);
        check_positions_meet_seqs(spec, &sources, errs);
    }
    check_message_ids_resolve(spec, &sources, messages.as_ref(), errs);
    (sources, messages)
}

/// `records` of a members source.
const MEMBERS: &str = "members";

/// The members source (`records = "members"`): a compacted table topic keyed by
/// conversation, each value the conversation's member list in JSON, co-partitioned with
/// the reads and the messages (at most one; it needs the message source).
fn members_source(
    spec: &TopologySpec,
    app: &str,
    sources: &[Source],
    messages: Option<&Source>,
    errs: &mut Errors,
) -> Option<Source> {
    let mut found: Option<Source> = None;
    for (i, s) in spec.source.iter().enumerate() {
        if s.records.as_deref() != Some(MEMBERS) {
            continue;
        }
        let at = format!("source[{i}]");
        let name = errs.required(&at, "name", &s.name);
        let topic = errs.required(&at, "topic", &s.topic);
        if let Some(t) = topic {
            check_topic(errs, &format!("{at}.topic"), t);
        }
        if found.is_some() {
            errs.push(format!("{at}.records"), "at most one members source");
        }
        if messages.is_none() {
            errs.push(
                format!("{at}.records"),
                "a members source needs a source with records = \"message-events\" (read by N of M is counted for the senders' messages)",
            );
        }
        if s.keyed_by
            .as_deref()
            .is_some_and(|k| k != "conversation_id")
        {
            errs.push(
                format!("{at}.keyed_by"),
                "members are a table keyed by conversation_id, read co-partitioned with the read events",
            );
        }
        if s.format.as_deref().is_some_and(|f| f != "json") {
            errs.push(
                format!("{at}.format"),
                "members are JSON: a list of member ids, or an object whose \"members\" is one",
            );
        }
        errs.refuse_set(
            &at,
            [
                ("fields", s.fields.is_some()),
                ("position", s.position.is_some()),
            ],
            "does not apply to a members source (its value is the member list)",
        );
        let (Some(name), Some(topic)) = (name, topic) else {
            continue;
        };
        if sources.iter().chain(messages).any(|x| x.name == name) {
            errs.push(
                format!("{at}.name"),
                format!("duplicate source name {name:?}"),
            );
        }
        let source = Source {
            name: name.to_owned(),
            topic: TopicName(topic.to_owned()),
            keyed_by: KeyedBy::ConversationId,
            repartition_topic: None,
            partitioner: partitioner(&at, s, errs),
            rerouted_topic: rerouted_topic(&at, s, app, name, false, errs),
            format: SourceFormat::AvroConfluent,
        };
        check_co_partitioning(spec, sources, &source, errs);
        found = Some(source);
    }
    found
}

/// Reads positioned by message id need the messages that name those ids.
fn check_message_ids_resolve(
    spec: &TopologySpec,
    sources: &[Source],
    messages: Option<&Source>,
    errs: &mut Errors,
) {
    let Some(reads) = resolving_source(sources) else {
        return;
    };
    let at = |name: &str| {
        let i = spec
            .source
            .iter()
            .position(|x| x.name.as_deref() == Some(name));
        format!("source[{}]", i.unwrap_or_default())
    };
    match messages.map(|m| (m, &m.format)) {
        None => errs.push(
            format!("{}.position", at(&reads.name)),
            "message_id positions are resolved through a source with records = \"message-events\" (co-partitioned, mapping message_id): there is none",
        ),
        Some((m, format))
            if format
                .mapping()
                .is_some_and(|mapping| mapping.paths[Role::MessageId as usize].is_none()) =>
        {
            errs.push(
                format!("{}.fields.message_id", at(&m.name)),
                format!("is required: the reads of {:?} name messages by id", reads.name),
            )
        }
        Some(_) => {}
    }
}

fn partitioner(at: &str, s: &config::SourceSpec, errs: &mut Errors) -> Partitioner {
    match s.partitioner.as_deref().map(str::parse::<Partitioner>) {
        None => Partitioner::default(),
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            errs.push(format!("{at}.partitioner"), e);
            Partitioner::default()
        }
    }
}

/// Where the source's misrouted records go (`on_misrouted`): its rerouted topic, or none
/// (dead letters). A repartitioned source is placed by readstate itself: never misrouted.
///
/// The default is dead letters. Rerouting adds a co-partitioned topic to the tasks: a
/// single source's rebalances turn eager (range) instead of cooperative, and in a join and
/// leave test of a message topology (4 co-partitioned topics on the mock broker) one
/// instance sometimes ran its tasks without consuming, a cause not found yet.
fn rerouted_topic(
    at: &str,
    s: &config::SourceSpec,
    app: &str,
    name: &str,
    repartitioned: bool,
    errs: &mut Errors,
) -> Option<TopicName> {
    let reroute = match s.on_misrouted.as_deref() {
        None => false,
        Some("repartition") => true,
        Some("dead-letter") => false,
        Some(other) => {
            errs.push(
                format!("{at}.on_misrouted"),
                format!("unknown value {other:?}: \"repartition\" or \"dead-letter\""),
            );
            false
        }
    };
    if repartitioned && s.on_misrouted.is_some() {
        errs.push(
            format!("{at}.on_misrouted"),
            "does not apply to a repartitioned source (keyed_by is not conversation_id): readstate places its records itself",
        );
    }
    (reroute && !repartitioned).then(|| TopicName(format!("{app}-{name}-rerouted")))
}

/// A conversation's messages and reads meet in one task only if both were placed by one
/// partitioner (a repartitioned source is placed by readstate's own, murmur2).
fn check_co_partitioning(
    spec: &TopologySpec,
    sources: &[Source],
    messages: &Source,
    errs: &mut Errors,
) {
    for s in sources {
        let reads = s.task_input_partitioner();
        if reads == messages.partitioner {
            continue;
        }
        let i = spec
            .source
            .iter()
            .position(|x| x.name.as_deref() == Some(messages.name.as_str()))
            .unwrap_or_default();
        let how = match s.repartition_topic {
            Some(_) => "are repartitioned by readstate with murmur2",
            None => "declare",
        };
        errs.push(
            format!("source[{i}].partitioner"),
            format!("co-partitioned sources need one partitioner: the read events of {:?} {how} {reads}, {:?} declares {}; a conversation's records would meet in different tasks", s.name, messages.name, messages.partitioner),
        );
    }
}

/// With a message source, read positions are compared with message seqs.
fn check_positions_meet_seqs(spec: &TopologySpec, sources: &[Source], errs: &mut Errors) {
    for s in sources {
        let Some(m) = s.format.mapping() else {
            continue;
        };
        if m.position == PositionKind::Timestamp {
            let i = spec
                .source
                .iter()
                .position(|x| x.name.as_deref() == Some(s.name.as_str()))
                .unwrap_or_default();
            errs.push(
                format!("source[{i}].position"),
                "a timestamp position cannot be compared with the message seqs of a message source (unread counts need seq positions)",
            );
        }
    }
}

/// A source's key and whether it carries message events (checked against each other).
fn source_roles(at: &str, s: &config::SourceSpec, errs: &mut Errors) -> (KeyedBy, bool) {
    let keyed_by = match s.keyed_by.as_deref() {
        None => KeyedBy::ConversationId,
        Some(k) => KeyedBy::parse(k).unwrap_or_else(|| {
            errs.push(format!("{at}.keyed_by"), format!("unknown key {k:?} (one of conversation_id, reader_id, sender_id, device_id, other, none)"));
            KeyedBy::ConversationId
        }),
    };
    let is_messages = match s.records.as_deref() {
        None | Some("read-events") => false,
        Some("message-events") => true,
        Some(other) => {
            errs.push(
                format!("{at}.records"),
                format!("unknown records {other:?} (read-events or message-events)"),
            );
            false
        }
    };
    if is_messages && keyed_by != KeyedBy::ConversationId {
        errs.push(
            format!("{at}.keyed_by"),
            "message events must be keyed by conversation_id: they are read co-partitioned with the read events, never repartitioned",
        );
        return (KeyedBy::ConversationId, true);
    }
    (keyed_by, is_messages)
}

fn check_format(errs: &mut Errors, at: &str, format: Option<&str>) {
    if let Some(f) = format {
        if f != "avro-confluent" {
            errs.push(
                format!("{at}.format"),
                format!("unsupported format {f:?} (supported: avro-confluent)"),
            );
        }
    }
}

fn stores(spec: &TopologySpec, app: &str, errs: &mut Errors) -> Vec<Store> {
    let mut stores: Vec<Store> = Vec::new();
    for (i, s) in spec.store.iter().enumerate() {
        let at = format!("store[{i}]");
        let name = errs.required(&at, "name", &s.name);
        let kind = match s.kind.as_deref().unwrap_or("rocksdb") {
            "rocksdb" => StoreKind::RocksDb,
            "memory" => StoreKind::Memory,
            k => {
                errs.push(
                    format!("{at}.kind"),
                    format!("unknown store kind {k:?} (rocksdb or memory)"),
                );
                StoreKind::RocksDb
            }
        };
        let cache_max_entries = errs.positive(
            &format!("{at}.cache_max_entries"),
            s.cache_max_entries,
            DEFAULT_CACHE_MAX_ENTRIES,
            1 << 40,
        );
        let rocksdb = rocksdb_options(&at, s, errs);
        let Some(name) = name else { continue };
        if stores.iter().any(|x| x.name.as_str() == name) {
            errs.push(
                format!("{at}.name"),
                format!("duplicate store name {name:?}"),
            );
        }
        let changelog_topic =
            (s.changelog.unwrap_or(true)).then(|| TopicName(format!("{app}-{name}-changelog")));
        if let Some(t) = &changelog_topic {
            check_topic(errs, &format!("{at}.name"), t.as_str());
        }
        if changelog_topic.is_none() && s.disable_wal == Some(true) {
            errs.push(
                format!("{at}.disable_wal"),
                "disable_wal needs the changelog: without either, a crash loses the store's latest writes",
            );
        }
        let rocksdb = crate::state::rocks::RocksDbOptions {
            // As in Kafka Streams: the changelog (written before the store, with the
            // checkpoint in the same batch) makes the WAL redundant.
            disable_wal: s.disable_wal.unwrap_or(changelog_topic.is_some()),
            ..rocksdb
        };
        stores.push(Store {
            name: StoreName(name.to_owned()),
            kind,
            changelog_topic,
            cache_max_entries,
            rocksdb,
        });
    }
    stores
}

/// A store's RocksDB memory settings (the WAL is decided with its changelog).
fn rocksdb_options(
    at: &str,
    s: &config::StoreSpec,
    errs: &mut Errors,
) -> crate::state::rocks::RocksDbOptions {
    let defaults = crate::state::rocks::RocksDbOptions::default();
    let block_cache_mb = errs.positive(
        &format!("{at}.block_cache_mb"),
        s.block_cache_mb,
        defaults.block_cache_bytes >> 20,
        1 << 20,
    );
    let write_buffer_mb = errs.positive(
        &format!("{at}.write_buffer_mb"),
        s.write_buffer_mb,
        defaults.write_buffer_bytes >> 20,
        1 << 16,
    );
    crate::state::rocks::RocksDbOptions {
        block_cache_bytes: block_cache_mb << 20,
        write_buffer_bytes: write_buffer_mb << 20,
        ..defaults
    }
}

fn processors(
    spec: &TopologySpec,
    kinds: &[&str],
    messages: Option<&Source>,
    resolving: Option<&Source>,
    stores: &[Store],
    errs: &mut Errors,
) -> Vec<ReadStateNode> {
    let mut processors = Vec::new();
    for (i, p) in spec.processor.iter().enumerate() {
        let at = format!("processor[{i}]");
        let inputs = Inputs {
            messages,
            resolving,
        };
        if let Some(node) = processor(spec, &at, p, kinds, inputs, stores, errs) {
            processors.push(node);
        }
    }
    if spec.processor.is_empty() {
        errs.push("processor", "one [[processor]] is required");
    } else if spec.processor.len() > 1 {
        errs.push(
            "processor[1]",
            "only one processor per topology is supported",
        );
    }
    processors
}

/// What a processor's inputs may be: the message source, and the read source whose
/// positions are message ids.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    messages: Option<&'a Source>,
    resolving: Option<&'a Source>,
}

/// The read source whose positions are message ids (at most one read source exists).
fn resolving_source(sources: &[Source]) -> Option<&Source> {
    sources
        .iter()
        .find(|s| matches!(s.format.mapping(), Some(m) if m.position == PositionKind::MessageId))
}

fn processor(
    spec: &TopologySpec,
    at: &str,
    p: &config::ProcessorSpec,
    kinds: &[&str],
    Inputs {
        messages,
        resolving,
    }: Inputs<'_>,
    stores: &[Store],
    errs: &mut Errors,
) -> Option<ReadStateNode> {
    let name = errs.required(at, "name", &p.name);
    let kind = processor_kind(at, p, kinds, errs);
    let inputs = p.inputs.clone().unwrap_or_default();
    if inputs.is_empty() {
        errs.push(format!("{at}.inputs"), "at least one source is required");
    }
    for (j, inp) in inputs.iter().enumerate() {
        let known = (spec.source.iter()).any(|s| s.name.as_deref() == Some(inp.as_str()));
        if !known {
            errs.push(
                format!("{at}.inputs[{j}]"),
                format!("no source named {inp:?}"),
            );
        }
    }
    let reads_messages = messages.is_some_and(|m| inputs.contains(&m.name));
    let unread_cap = unread_cap(at, p, reads_messages, errs);
    let store = errs.required(at, "store", &p.store);
    if let Some(st) = store {
        if !stores.iter().any(|s| s.name.as_str() == st) {
            errs.push(format!("{at}.store"), format!("no store named {st:?}"));
        }
    }
    let heads_store = compile_heads_store(errs, at, p, reads_messages, store, stores);
    let min_emit_interval = errs.duration(
        &format!("{at}.min_emit_interval"),
        &p.min_emit_interval,
        Duration::ZERO,
    );
    let resolving = resolving.filter(|r| inputs.contains(&r.name));
    let resolve = resolve_spec(at, p, resolving, errs);
    let has_members = spec.source.iter().any(|s| {
        s.records.as_deref() == Some(MEMBERS) && s.name.as_ref().is_some_and(|n| inputs.contains(n))
    });
    let large_group_members = match (has_members, p.large_group_members) {
        (false, Some(_)) => {
            errs.push(
                format!("{at}.large_group_members"),
                "only applies with a members source among the inputs",
            );
            None
        }
        (false, None) => None,
        (true, n) => Some(errs.positive(&format!("{at}.large_group_members"), n, 100, 1_000_000)),
    };
    Some(ReadStateNode {
        name: name?.to_owned(),
        kind: kind.to_owned(),
        inputs,
        store: StoreName(store?.to_owned()),
        heads_store,
        min_emit_interval,
        unread_cap,
        resolve,
        large_group_members,
    })
}

/// With a read source whose positions are message ids: how long and how many reads wait
/// for their messages.
fn resolve_spec(
    at: &str,
    p: &config::ProcessorSpec,
    resolving: Option<&Source>,
    errs: &mut Errors,
) -> Option<ResolveSpec> {
    let Some(reads) = resolving else {
        let fields = [
            ("message_wait", p.message_wait.is_some()),
            ("max_waiting_reads", p.max_waiting_reads.is_some()),
        ];
        errs.refuse_set(
            at,
            fields,
            "needs a read source with position = \"message_id\" among the inputs",
        );
        return None;
    };
    let wait = errs.duration(
        &format!("{at}.message_wait"),
        &p.message_wait,
        crate::processor::DEFAULT_MESSAGE_WAIT,
    );
    let max_waiting = errs.positive(
        &format!("{at}.max_waiting_reads"),
        p.max_waiting_reads,
        crate::processor::DEFAULT_MAX_WAITING_READS,
        10_000_000,
    );
    let fallback_to_read_at =
        matches!(reads.format.mapping(), Some(m) if m.paths[Role::ReadAt as usize].is_some());
    Some(ResolveSpec {
        wait,
        max_waiting,
        fallback_to_read_at,
    })
}

/// A processor's kind, one the registry knows; the read-state fields only on read-state.
fn processor_kind<'k>(
    at: &str,
    p: &config::ProcessorSpec,
    kinds: &[&'k str],
    errs: &mut Errors,
) -> &'k str {
    let kind = match p.kind.as_deref() {
        Some(k) => match kinds.iter().find(|known| **known == k) {
            Some(known) => known,
            None => {
                errs.push(
                    format!("{at}.kind"),
                    format!(
                        "unknown processor kind {k:?} (supported: {})",
                        kinds.join(", ")
                    ),
                );
                READ_STATE_KIND
            }
        },
        None => {
            errs.push(
                format!("{at}.kind"),
                format!("is required ({})", kinds.join(", ")),
            );
            READ_STATE_KIND
        }
    };
    if kind != READ_STATE_KIND {
        let only_read_state = [
            ("unread_cap", p.unread_cap.is_some()),
            ("heads_store", p.heads_store.is_some()),
            ("min_emit_interval", p.min_emit_interval.is_some()),
        ];
        errs.refuse_set(at, only_read_state, "only for kind read-state");
    }
    kind
}

fn unread_cap(
    at: &str,
    p: &config::ProcessorSpec,
    reads_messages: bool,
    errs: &mut Errors,
) -> Option<usize> {
    match (reads_messages, p.unread_cap) {
        (true, cap) => Some(errs.positive(
            &format!("{at}.unread_cap"),
            cap,
            crate::processor::DEFAULT_UNREAD_CAP,
            100_000,
        )),
        (false, Some(_)) => {
            errs.push(
                format!("{at}.unread_cap"),
                "needs a source with records = \"message-events\" among the inputs",
            );
            None
        }
        (false, None) => None,
    }
}

/// Every source feeds the processor, and a message source comes with a read-event one.
fn check_inputs(
    spec: &TopologySpec,
    processors: &[ReadStateNode],
    sources: &[Source],
    sides: &[Source],
    errs: &mut Errors,
) {
    let messages = sides.first();
    let inputs_resolve = processors.iter().all(|p| {
        p.inputs
            .iter()
            .all(|i| sources.iter().chain(sides).any(|s| &s.name == i))
    });
    if sources.is_empty() && !spec.source.is_empty() && messages.is_some() {
        errs.push(
            "source",
            "a read-events source is required beside the message-events one",
        );
    }
    if let (Some(p), true) = (processors.first(), inputs_resolve) {
        for s in sources.iter().chain(sides) {
            if !p.inputs.contains(&s.name) {
                errs.push(
                    format!("source {:?}", s.name),
                    "is not an input of any processor",
                );
            }
        }
    }
}

/// A processor of a program's own kind gets its source records as they are, through its
/// own serdes: the read-state source fields (format, key, record kind) do not apply.
fn check_custom_sources(spec: &TopologySpec, processors: &[ReadStateNode], errs: &mut Errors) {
    let custom = processors.iter().filter(|p| p.kind != READ_STATE_KIND);
    for p in custom {
        for (i, s) in spec.source.iter().enumerate() {
            if !s.name.as_ref().is_some_and(|n| p.inputs.contains(n)) {
                continue;
            }
            let fields = [
                ("format", s.format.is_some()),
                ("keyed_by", s.keyed_by.is_some()),
                ("records", s.records.is_some()),
                ("partitioner", s.partitioner.is_some()),
                ("on_misrouted", s.on_misrouted.is_some()),
            ];
            errs.refuse_set(
                &format!("source[{i}]"),
                fields,
                &format!("only for read-state processors: kind {:?} reads its records through its own serdes", p.kind),
            );
        }
    }
}

/// The kafka sinks by output, and the postgres sinks' specs (compiled against them).
struct KafkaSinks<'a> {
    receipts: Vec<KafkaSink>,
    heads: Vec<KafkaSink>,
    senders: Vec<KafkaSink>,
    read_by: Vec<KafkaSink>,
    postgres: Vec<(usize, &'a SinkSpec)>,
}

fn kafka_sinks<'a>(
    spec: &'a TopologySpec,
    processors: &[ReadStateNode],
    has_messages: bool,
    has_members: bool,
    errs: &mut Errors,
) -> KafkaSinks<'a> {
    let mut out = KafkaSinks {
        receipts: Vec::new(),
        heads: Vec::new(),
        senders: Vec::new(),
        read_by: Vec::new(),
        postgres: Vec::new(),
    };
    for (i, s) in spec.sink.iter().enumerate() {
        let at = format!("sink[{i}]");
        let name = errs.required(&at, "name", &s.name);
        let input = errs.required(&at, "input", &s.input);
        match s.kind.as_deref() {
            Some("kafka") => {
                let named = (name, input);
                if let Some((sink, output)) =
                    kafka_sink(&at, s, named, processors, has_messages, errs)
                {
                    if output == Output::ReadBy && !has_members {
                        errs.push(
                            format!("{at}.output"),
                            "read-by needs a source with records = \"members\"",
                        );
                    }
                    match output {
                        Output::ConversationHeads => out.heads.push(sink),
                        Output::SenderReceipts => out.senders.push(sink),
                        Output::ReadBy => out.read_by.push(sink),
                        Output::Receipts => out.receipts.push(sink),
                    }
                }
            }
            Some("postgres") => out.postgres.push((i, s)),
            Some(k) => errs.push(
                format!("{at}.kind"),
                format!("unknown sink kind {k:?} (kafka or postgres)"),
            ),
            None => errs.push(format!("{at}.kind"), "is required (kafka or postgres)"),
        }
    }
    if out.receipts.len() != 1 {
        errs.push(
            "sink",
            format!(
                "exactly one kafka sink (the output topic) is required, found {}",
                out.receipts.len()
            ),
        );
    }
    if out.heads.len() > 1 {
        errs.push(
            "sink",
            "at most one kafka sink with output = \"conversation-heads\"",
        );
    }
    if out.senders.len() > 1 {
        errs.push(
            "sink",
            "at most one kafka sink with output = \"sender-receipts\"",
        );
    }
    if out.read_by.len() > 1 {
        errs.push("sink", "at most one kafka sink with output = \"read-by\"");
    }
    out
}

/// A kafka sink, and what it carries.
fn kafka_sink(
    at: &str,
    s: &SinkSpec,
    (name, input): (Option<&str>, Option<&str>),
    processors: &[ReadStateNode],
    has_messages: bool,
    errs: &mut Errors,
) -> Option<(KafkaSink, Output)> {
    let topic = errs.required(at, "topic", &s.topic);
    if let Some(t) = topic {
        check_topic(errs, &format!("{at}.topic"), t);
    }
    check_format(errs, at, s.format.as_deref());
    let fields = [
        ("table", s.table.is_some()),
        ("batch_size", s.batch_size.is_some()),
        ("linger", s.linger.is_some()),
    ];
    errs.refuse_set(at, fields, "only applies to postgres sinks");
    if let Some(inp) = input {
        if !processors.iter().any(|p| p.name == inp) {
            errs.push(format!("{at}.input"), format!("no processor named {inp:?}"));
        }
    }
    let output = match s.output.as_deref() {
        None | Some("receipts") => Output::Receipts,
        Some("conversation-heads") => Output::ConversationHeads,
        Some("sender-receipts") => Output::SenderReceipts,
        Some("read-by") => Output::ReadBy,
        Some(o) => {
            errs.push(
                format!("{at}.output"),
                format!("unknown output {o:?} (receipts, conversation-heads, sender-receipts or read-by)"),
            );
            Output::Receipts
        }
    };
    if output != Output::Receipts && !has_messages {
        errs.push(
            format!("{at}.output"),
            format!(
                "{} needs a source with records = \"message-events\"",
                s.output.as_deref().unwrap_or_default()
            ),
        );
    }
    let sink = KafkaSink {
        name: name?.into(),
        input: input?.into(),
        topic: TopicName(topic?.into()),
    };
    Some((sink, output))
}

/// What a postgres sink's table holds: the kafka sink it consumes decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgTable {
    Receipts,
    Heads,
    SenderReceipts,
    Members,
}

/// The postgres sinks of a topology, at most one per kind of table.
#[derive(Default)]
struct PostgresSinks {
    receipts: Option<PostgresSink>,
    heads: Option<PostgresSink>,
    senders: Option<PostgresSink>,
    members: Option<PostgresSink>,
}

/// The postgres sinks of receipts, of conversation heads, of sender receipts and of the
/// members source's lists (at most one each).
fn postgres_sinks(
    kafka: &KafkaSinks<'_>,
    members: Option<&Source>,
    app: &str,
    errs: &mut Errors,
) -> PostgresSinks {
    let mut pg = PostgresSinks::default();
    for (i, s) in &kafka.postgres {
        let at = format!("sink[{i}]");
        let input = s.input.as_deref();
        let find = |ks: &[KafkaSink], kind| {
            let k = ks.iter().find(|k| Some(k.name.as_str()) == input)?;
            Some((k.topic.clone(), kind))
        };
        let found = find(&kafka.receipts, PgTable::Receipts)
            .or_else(|| find(&kafka.heads, PgTable::Heads))
            .or_else(|| find(&kafka.senders, PgTable::SenderReceipts))
            .or_else(|| {
                let m = members.filter(|m| Some(m.name.as_str()) == input)?;
                Some((m.topic.clone(), PgTable::Members))
            });
        if let (None, Some(inp)) = (&found, input) {
            errs.push(
                format!("{at}.input"),
                format!(
                    "no kafka sink or members source named {inp:?} (a postgres sink consumes a kafka sink's topic, or the member lists)"
                ),
            );
        }
        let kind = found.as_ref().map_or(PgTable::Receipts, |(_, k)| *k);
        let slot = match kind {
            PgTable::Receipts => &mut pg.receipts,
            PgTable::Heads => &mut pg.heads,
            PgTable::SenderReceipts => &mut pg.senders,
            PgTable::Members => &mut pg.members,
        };
        if slot.is_some() {
            errs.push(at.clone(), "at most one postgres sink per kafka sink");
        }
        let sink = postgres_sink(&at, s, kind, app, errs);
        if let (Some(sink), Some((topic, _))) = (sink, found) {
            *slot = Some(PostgresSink { topic, ..sink });
        }
    }
    if let Some(h) = &mut pg.heads {
        match &pg.receipts {
            Some(r) => h.receipts_table = r.table.clone(),
            None => errs.push(
                "sink",
                "a postgres sink of conversation heads needs the receipts' postgres sink (its unread view joins the receipts table)",
            ),
        }
    }
    let beside = [
        (&mut pg.senders, "sender receipts"),
        (&mut pg.members, "member lists"),
    ];
    for (sink, what) in beside {
        let Some(s) = sink else {
            continue;
        };
        match &pg.receipts {
            Some(r) => s.receipts_table = r.table.clone(),
            None => errs.push(
                "sink",
                format!("a postgres sink of {what} needs the receipts' postgres sink (its offsets live beside the receipts table, and the members' read_by function reads it)"),
            ),
        }
    }
    pg
}

/// One postgres sink's settings (its topic is its input's, filled in by the caller).
fn postgres_sink(
    at: &str,
    s: &SinkSpec,
    kind: PgTable,
    app: &str,
    errs: &mut Errors,
) -> Option<PostgresSink> {
    if s.output.is_some() {
        errs.push(format!("{at}.output"), "only applies to kafka sinks");
    }
    if s.topic.is_some() {
        errs.push(
            format!("{at}.topic"),
            "a postgres sink reads its input's topic; remove topic",
        );
    }
    let batch_size = errs.positive(&format!("{at}.batch_size"), s.batch_size, 500, 100_000);
    let pool_size = errs.positive(&format!("{at}.pool_size"), s.pool_size, 2, 256);
    let linger = errs.duration(&format!("{at}.linger"), &s.linger, Duration::from_secs(1));
    let statement_timeout = errs.duration(
        &format!("{at}.statement_timeout"),
        &s.statement_timeout,
        Duration::from_secs(30),
    );
    let (default_table, group) = match kind {
        PgTable::Heads => ("conversation_heads", format!("{app}-pg-heads-sink")),
        PgTable::Receipts => ("read_receipts", format!("{app}-pg-sink")),
        PgTable::SenderReceipts => ("sender_receipts", format!("{app}-pg-senders-sink")),
        PgTable::Members => ("conversation_members", format!("{app}-pg-members-sink")),
    };
    let table = s.table.clone().unwrap_or_else(|| default_table.into());
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    if table.is_empty() || !table.chars().all(plain) {
        errs.push(
            format!("{at}.table"),
            format!("{table:?} is not a plain SQL identifier"),
        );
    }
    Some(PostgresSink {
        name: s.name.clone()?,
        topic: TopicName(String::new()),
        consumer_group: group,
        receipts_table: table.clone(),
        table,
        batch_size,
        linger,
        pool_size,
        statement_timeout,
        url: s.url.clone(),
        embedded: s.embedded.unwrap_or(true),
    })
}

pub(super) struct Errors(pub(super) Vec<TopologyError>);

impl Errors {
    pub(super) fn push(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.0.push(TopologyError {
            at: at.into(),
            message: message.into(),
        });
    }

    /// Report each field of `at` that is set (`(name, set)`) where it does not apply.
    pub(super) fn refuse_set<const N: usize>(
        &mut self,
        at: &str,
        fields: [(&str, bool); N],
        why: &str,
    ) {
        for (field, set) in fields {
            if set {
                self.push(format!("{at}.{field}"), why);
            }
        }
    }

    fn required<'a>(&mut self, at: &str, field: &str, v: &'a Option<String>) -> Option<&'a str> {
        match v.as_deref() {
            Some(s) if !s.trim().is_empty() => Some(s),
            Some(_) => {
                self.push(format!("{at}.{field}"), "must not be empty");
                None
            }
            None => {
                self.push(format!("{at}.{field}"), "is required");
                None
            }
        }
    }

    fn duration(&mut self, at: &str, v: &Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => {
                match humantime::parse_duration(s) {
                    Ok(d) => d,
                    Err(e) => {
                        self.push(at, format!("invalid duration {s:?}: {e} (examples: \"500ms\", \"1s\", \"30s\")"));
                        default
                    }
                }
            }
        }
    }

    fn positive(&mut self, at: &str, v: Option<i64>, default: usize, max: i64) -> usize {
        match v {
            None => default,
            Some(n) if n > 0 && n <= max => n as usize,
            Some(n) => {
                self.push(at, format!("must be between 1 and {max}, got {n}"));
                default
            }
        }
    }
}

/// Legal Kafka topic names: 1..=249 of [A-Za-z0-9._-].
fn check_topic(errs: &mut Errors, at: &str, t: &str) {
    if t.len() > 249
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        errs.push(
            at,
            format!("{t:?} is not a legal Kafka topic name ([A-Za-z0-9._-], at most 249)"),
        );
    }
}

fn compile_bad_records(app: &config::ApplicationSpec, errs: &mut Errors) -> BadRecords {
    let d = BadRecords::default();
    let on_bad_record = match app.on_bad_record.as_deref() {
        None | Some("dead-letter") => OnBadRecord::DeadLetter,
        Some("fail") => OnBadRecord::Fail,
        Some(other) => {
            errs.push(
                "application.on_bad_record",
                format!("unknown policy {other:?}: expected \"dead-letter\" or \"fail\""),
            );
            d.on_bad_record
        }
    };
    let max_ratio = match app.dead_letter_max_ratio {
        None => d.max_ratio,
        Some(r) if r > 0.0 && r <= 1.0 => r,
        Some(r) => {
            errs.push(
                "application.dead_letter_max_ratio",
                format!("must be in (0, 1], got {r} (1.0 turns the circuit breaker off)"),
            );
            d.max_ratio
        }
    };
    let window = errs.duration(
        "application.dead_letter_window",
        &app.dead_letter_window,
        d.window,
    );
    if window < Duration::from_secs(1) {
        errs.push("application.dead_letter_window", "must be at least 1s");
    }
    BadRecords {
        max_record_bytes: errs.positive(
            "application.max_record_bytes",
            app.max_record_bytes,
            d.max_record_bytes,
            crate::serde::avro::MAX_RECORD_BYTES_CEILING as i64,
        ),
        on_bad_record,
        max_ratio,
        window,
        min_records: errs.positive(
            "application.dead_letter_min_records",
            app.dead_letter_min_records,
            d.min_records as usize,
            1 << 40,
        ) as u64,
    }
}

/// The heads store of a read-state processor: required with a message input, refused
/// without one, distinct from the read-state store.
fn compile_heads_store(
    errs: &mut Errors,
    at: &str,
    p: &config::ProcessorSpec,
    reads_messages: bool,
    store: Option<&str>,
    stores: &[Store],
) -> Option<StoreName> {
    match (reads_messages, p.heads_store.as_deref()) {
        (true, None) => {
            errs.push(
                format!("{at}.heads_store"),
                "is required with a message-events input: the conversation heads live in their own store (and changelog)",
            );
            None
        }
        (false, Some(_)) => {
            errs.push(
                format!("{at}.heads_store"),
                "needs a source with records = \"message-events\" among the inputs",
            );
            None
        }
        (false, None) => None,
        (true, Some(h)) if Some(h) == store => {
            errs.push(
                format!("{at}.heads_store"),
                format!("{h:?} is the read-state store; the heads need a store of their own"),
            );
            None
        }
        (true, Some(h)) if !stores.iter().any(|s| s.name.as_str() == h) => {
            errs.push(format!("{at}.heads_store"), format!("no store named {h:?}"));
            None
        }
        (true, Some(h)) => Some(StoreName(h.to_owned())),
    }
}
