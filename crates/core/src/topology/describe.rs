//! `readstate describe`: the graph in the shape of Kafka Streams' `TopologyDescription`.

use std::fmt::Write;

use super::{Source, StoreKind, Topology};

/// Render the topology: sources → processors → stores → sinks, then internal topics.
pub fn describe(t: &Topology) -> String {
    let mut o = String::new();
    let ms = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let _ = writeln!(
        o,
        "Topology: {} (commit interval {}, {})",
        t.application_id,
        ms(t.commit_interval),
        t.guarantee
    );
    let _ = writeln!(o, "  consumer group: {}", t.application_id);
    let _ = writeln!(
        o,
        "  state dir:      {}/{}/<task>/{}",
        t.state_dir.display(),
        t.application_id,
        match t.stores().as_slice() {
            [one] => one.name.to_string(),
            many => format!(
                "{{{}}}",
                many.iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    );
    let b = &t.bad_records;
    let policy = match b.on_bad_record {
        super::OnBadRecord::DeadLetter if b.max_ratio >= 1.0 => {
            format!("dead-letter to {}", t.dead_letter_topic)
        }
        super::OnBadRecord::DeadLetter => format!(
            "dead-letter to {}; stop above {}% of {} records or more in {}",
            t.dead_letter_topic,
            b.max_ratio * 100.0,
            b.min_records,
            ms(b.window)
        ),
        super::OnBadRecord::Fail => "fail (stop at the first)".to_owned(),
    };
    let _ = writeln!(
        o,
        "  bad records:    {policy}; records over {} bytes are too_large",
        b.max_record_bytes
    );
    let _ = writeln!(
        o,
        "  ids:            conversation {}, user {}, message {} (strings up to {} bytes)",
        t.ids.conversation,
        t.ids.user,
        t.ids.message,
        crate::ids::MAX_ID_BYTES
    );
    let repartitioned: Vec<_> = t
        .sources
        .iter()
        .filter(|s| s.repartition_topic.is_some())
        .collect();
    let mut sub = 0;
    if !repartitioned.is_empty() {
        let _ = writeln!(o, "Sub-topology: {sub} (repartition by conversation_id)");
        for s in &repartitioned {
            let _ = writeln!(
                o,
                "  Source: {} (topics: [{}], keyed by {}, format {}{})",
                s.name,
                s.topic,
                s.keyed_by.as_str(),
                s.format.name(),
                mapping(&s.format)
            );
            let _ = writeln!(o, "    --> {}-repartition-sink", s.name);
            let _ = writeln!(
                o,
                "  Sink: {}-repartition-sink (topic: {}, keyed by conversation_id)",
                s.name,
                s.repartition_topic.as_ref().expect("repartitioned")
            );
            let _ = writeln!(o, "    <-- {}", s.name);
        }
        sub += 1;
    }
    let _ = writeln!(o, "Sub-topology: {sub} (one task per input partition)");
    for s in &t.sources {
        match &s.repartition_topic {
            Some(r) => {
                let _ = writeln!(
                    o,
                    "  Source: {}-repartition-source (topics: [{r}], keyed by conversation_id, placed by murmur2)",
                    s.name
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "  Source: {} (topics: [{}], keyed by conversation_id, placed by {}, {}, format {}{})",
                    s.name,
                    topics(s),
                    s.partitioner,
                    misrouted(s),
                    s.format.name(),
                    mapping(&s.format)
                );
            }
        }
        let _ = writeln!(o, "    --> {}", t.processor.name);
    }
    if let Some(m) = &t.messages {
        let _ = writeln!(
            o,
            "  Source: {} (topics: [{}], message events keyed by conversation_id, placed by {}, {}, co-partitioned: partition p joins task p)",
            m.name, topics(m), m.partitioner, misrouted(m)
        );
        let _ = writeln!(o, "    --> {}", t.processor.name);
    }
    if let Some(m) = &t.members {
        let _ = writeln!(
            o,
            "  Source: {} (topics: [{}], member lists (JSON) keyed by conversation_id, read as a table, placed by {}, {}, co-partitioned: partition p joins task p)",
            m.name, topics(m), m.partitioner, misrouted(m)
        );
        let _ = writeln!(o, "    --> {}", t.processor.name);
    }
    let p = &t.processor;
    let emit = if p.min_emit_interval.is_zero() {
        "one update per key per flush".to_owned()
    } else {
        format!("at most one update per key per {}", ms(p.min_emit_interval))
    };
    let unread = match p.unread_cap {
        Some(cap) => format!(
            ", unread and mention counts exact up to {cap} messages behind the head ({}+ beyond)",
            cap.saturating_sub(1)
        ),
        None => String::new(),
    };
    let resolve = match &p.resolve {
        Some(r) => format!(
            ", reads by message id wait up to {} of message time for their message (at most {} per task), then {}",
            ms(r.wait),
            r.max_waiting,
            match r.fallback_to_read_at {
                true => "stand on read_at",
                false => "are dead letters",
            }
        ),
        None => String::new(),
    };
    let groups = match p.large_group_members {
        Some(n) => format!(", read by N of M per group (groups above {n} members: no per-reader receipts for senders)"),
        None => String::new(),
    };
    let stores: Vec<&str> = t.stores().iter().map(|s| s.name.as_str()).collect();
    let _ = writeln!(
        o,
        "  Processor: {} (kind: read-state, stores: [{}], {emit}{unread}{resolve}{groups})",
        p.name,
        stores.join(", ")
    );
    for s in &t.sources {
        let from = if s.repartition_topic.is_some() {
            format!("{}-repartition-source", s.name)
        } else {
            s.name.clone()
        };
        let _ = writeln!(o, "    <-- {from}");
    }
    for m in t.side_sources() {
        let _ = writeln!(o, "    <-- {}", m.name);
    }
    let _ = writeln!(o, "    --> {}", t.output.name);
    let outputs = t.heads_output.iter().chain(&t.sender_receipts_output);
    for h in outputs.chain(&t.read_by_output) {
        let _ = writeln!(o, "    --> {}", h.name);
    }
    let _ = writeln!(
        o,
        "  Sink: {} (topic: {}, keyed by conversation_id, format avro-confluent)",
        t.output.name, t.output.topic
    );
    let schema = crate::serde::receipt_update_schema(&t.ids);
    let _ = writeln!(
        o,
        "    value schema (subject {}-value): {}",
        t.output.topic,
        id_fields(&schema)
    );
    let _ = writeln!(o, "    <-- {}", p.name);
    if let Some(h) = &t.heads_output {
        let what = "conversation heads keyed by conversation_id";
        let schema = crate::serde::conversation_head_schema(&t.ids);
        output_sink(&mut o, h, what, &schema, &p.name);
    }
    if let Some(h) = &t.sender_receipts_output {
        let what = "read receipts for senders keyed by sender_id, one per sender of the messages an emitted advance passed";
        let schema = crate::serde::sender_receipt_schema(&t.ids);
        output_sink(&mut o, h, what, &schema, &p.name);
    }
    if let Some(h) = &t.read_by_output {
        let what = "read by N of M for each sender's latest message, keyed by sender_id";
        let schema = crate::serde::read_by_schema(&t.ids);
        output_sink(&mut o, h, what, &schema, &p.name);
    }
    let _ = writeln!(o, "Stores:");
    describe_store(&mut o, &t.store, "entries");
    if let Some(h) = &t.heads_store {
        describe_store(&mut o, h, "message positions");
    }
    let pgs = t.postgres.iter().chain(&t.heads_postgres);
    let pgs = pgs.chain(&t.senders_postgres);
    for pg in pgs.chain(&t.members_postgres) {
        let _ = writeln!(
            o,
            "Postgres sink: {} (consumer group {}, reads {})",
            pg.name, pg.consumer_group, pg.topic
        );
        let _ = writeln!(
            o,
            "  table {}: batches of {} rows or {}, pool {}, statement timeout {}, {}",
            pg.table,
            pg.batch_size,
            ms(pg.linger),
            pg.pool_size,
            ms(pg.statement_timeout),
            if pg.embedded {
                "runs inside `readstate run`"
            } else {
                "runs as `readstate sink`"
            }
        );
        if t.senders_postgres
            .as_ref()
            .is_some_and(|h| h.name == pg.name)
        {
            let _ = writeln!(
                o,
                "  catch-up: one row per (sender, conversation, reader), index {}_by_sender_updated (sender_id, updated_at)",
                pg.table
            );
        }
        if t.members_postgres
            .as_ref()
            .is_some_and(|h| h.name == pg.name)
        {
            let _ = writeln!(
                o,
                "  one row per conversation (its member list); read by N of M: function {}_read_by(conversation, position)",
                pg.table
            );
        }
        if t.heads_postgres.as_ref().is_some_and(|h| h.name == pg.name) {
            let _ = writeln!(
                o,
                "  unread and mention counts: view {}_unread, function {}_counts(conversation, reader, pointer)",
                pg.receipts_table, pg.table
            );
        }
    }
    let _ = writeln!(o, "Internal topics:");
    let rerouted = t.rerouted_topics();
    for (topic, compacted) in t.internal_topics() {
        let what = if compacted {
            "compacted changelog"
        } else if topic == t.dead_letter_topic {
            "dead letters"
        } else if rerouted.contains(&topic) {
            "misrouted records, on the partitions they belong on"
        } else {
            "repartition"
        };
        let _ = writeln!(o, "  {topic} ({what})");
    }
    o
}

/// The topics a source node reads: its topic, and its rerouted topic.
fn topics(s: &Source) -> String {
    match &s.rerouted_topic {
        Some(r) => format!("{}, {r}", s.topic),
        None => s.topic.to_string(),
    }
}

/// What happens to a record of `s` on another partition than its conversation's.
fn misrouted(s: &Source) -> &'static str {
    match s.rerouted_topic {
        Some(_) => "misrouted records rerouted",
        None => "misrouted records dead-lettered",
    }
}

/// The record name and id fields of a generated output schema, e.g.
/// `ReceiptUpdate {conversation_id: "string", ...}` (the rest as in `schemas/`).
fn id_fields(schema: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(schema).expect("generated schema");
    let ids: Vec<String> = v["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| {
            let typed = [
                "conversation_id",
                "reader_id",
                "sender_id",
                "message_id",
                "recent_senders",
                "mention_user_ids",
            ];
            typed.contains(&f["name"].as_str().unwrap_or_default())
        })
        .map(|f| format!("{}: {}", f["name"].as_str().unwrap_or_default(), f["type"]))
        .collect();
    format!(
        "{} {{{}, ...}}",
        v["name"].as_str().unwrap_or_default(),
        ids.join(", ")
    )
}

/// A store's memory, cache (`cache_unit`: what its `cache_max_entries` counts) and
/// changelog.
fn describe_store(o: &mut String, store: &super::Store, cache_unit: &str) {
    let r = &store.rocksdb;
    let kind = match store.kind {
        StoreKind::RocksDb => format!(
            "rocksdb, per instance: block cache {} MiB + memtables {} x {} MiB{}",
            r.block_cache_bytes >> 20,
            r.max_write_buffers,
            r.write_buffer_bytes >> 20,
            if r.disable_wal { ", WAL off" } else { "" }
        ),
        StoreKind::Memory => "in-memory".to_owned(),
    };
    let _ = writeln!(
        o,
        "  {}: {kind}; record cache {} {cache_unit} per instance",
        store.name, store.cache_max_entries
    );
    match &store.changelog_topic {
        Some(c) => {
            let _ = writeln!(o, "    changelog: {c} (compacted)");
        }
        None => {
            let _ = writeln!(o, "    changelog: none (state is lost with the node)");
        }
    }
}

/// A second output's sink: what it carries, its value schema's id fields, its processor.
fn output_sink(o: &mut String, h: &super::KafkaSink, what: &str, schema: &str, from: &str) {
    let _ = writeln!(
        o,
        "  Sink: {} (topic: {}, {what}, format avro-confluent)",
        h.name, h.topic
    );
    let _ = writeln!(
        o,
        "    value schema (subject {}-value): {}",
        h.topic,
        id_fields(schema)
    );
    let _ = writeln!(o, "    <-- {from}");
}

/// A JSON source's mapping, as `; reader <- path, ...; position timestamp (s)`.
fn mapping(format: &crate::topology::SourceFormat) -> String {
    use crate::serde::json::{PositionKind, Role};
    let Some(m) = format.mapping() else {
        return String::new();
    };
    let fields: Vec<String> = Role::ALL
        .iter()
        .zip(&m.paths)
        .filter_map(|(r, p)| {
            p.as_ref()
                .map(|p| format!("{} <- {}", r.name(), p.join(".")))
        })
        .collect();
    let position = match m.position {
        PositionKind::Seq => "seq".to_owned(),
        PositionKind::Timestamp => format!("timestamp ({})", m.time_unit.name()),
        PositionKind::MessageId => "message_id (resolved through the message source)".to_owned(),
    };
    format!("; {}; position {position}", fields.join(", "))
}
