//! `bench --only ids`: what string and UUID ids (issue 23) cost against 64-bit ids, on the
//! core path (JSON decode → fold → flush to RocksDB, one thread). The same workload is
//! written three times, its user and conversation ids as JSON numbers, as strings
//! (`user123`, `conv45`) and as UUIDs, and read through the same mapping with `[ids]`
//! declaring each type; message ids are the same text in all three. The figure is the
//! process CPU per event (RocksDB's background threads included) relative to i64 ids.

use std::fmt::Write;

use readstate::ids::{IdType, IdTypes};
use readstate::model::ReadEvent;
use readstate::serde::json::{FieldMapping, JsonDecoder, Role};

use super::{fold_and_flush, BenchError, CoreFlush, Figure, Target};
use crate::loadgen::{Generated, Generator, WorkloadSpec};

/// The JSON records of `spec`'s events with ids of type `ty`.
pub fn records(spec: &WorkloadSpec, ty: IdType) -> Vec<Vec<u8>> {
    Generator::new(spec.clone())
        .filter_map(|g| match g {
            Generated::Event(e) => Some(record(&e, ty).into_bytes()),
            Generated::Poison(_) => None,
        })
        .collect()
}

fn record(e: &ReadEvent, ty: IdType) -> String {
    let reader = e.reader_id.as_int().unwrap_or_default();
    let conversation = e.conversation_id.as_int().unwrap_or_default();
    let mut out = String::with_capacity(160);
    out.push_str(r#"{"reader":"#);
    id(&mut out, ty, "user", 1, reader);
    out.push_str(r#","conversation":"#);
    id(&mut out, ty, "conv", 2, conversation);
    let _ = write!(
        out,
        r#","seq":{},"message":"m-{}","device":"{}"}}"#,
        e.message_seq,
        e.message_seq,
        e.device_id.as_deref().unwrap_or("none")
    );
    out
}

/// `n` as an id of type `ty`: a number, `<prefix><n>`, or a UUID made of `kind` and `n`.
fn id(out: &mut String, ty: IdType, prefix: &str, kind: u32, n: i64) {
    let _ = match ty {
        IdType::I64 => write!(out, "{n}"),
        IdType::String => write!(out, r#""{prefix}{n}""#),
        IdType::Uuid => write!(out, r#""{kind:08x}-0000-4000-8000-{:012x}""#, n as u64),
    };
}

fn decoder(ty: IdType) -> JsonDecoder {
    let mut m = FieldMapping::new(&[
        (Role::Reader, "reader"),
        (Role::Conversation, "conversation"),
        (Role::Position, "seq"),
        (Role::MessageId, "message"),
        (Role::Device, "device"),
    ]);
    m.ids = IdTypes {
        conversation: ty,
        user: ty,
        message: IdType::String,
    };
    JsonDecoder::new(m, 65_536)
}

/// One figure per id type: events/s, and for string and UUID ids their CPU per event
/// relative to i64 ids (target: at most 1.5×).
pub fn id_costs(spec: &WorkloadSpec) -> Result<Vec<Figure>, BenchError> {
    let mut figures = Vec::new();
    let mut base_cpu_per_event = None;
    for ty in IdType::ALL {
        let records = records(spec, ty);
        let bytes = records.iter().map(Vec::len).sum::<usize>() / records.len().max(1);
        let d = decoder(ty);
        let mut dead = 0usize;
        let flush = CoreFlush::Interval(std::time::Duration::from_secs(1));
        let run = fold_and_flush(&records, flush, |batch| {
            let mut events = Vec::with_capacity(batch.len());
            for r in batch {
                match d.decode_ref(r.value) {
                    Ok(e) => events.push((e, r.origin)),
                    Err(_) => dead += 1,
                }
            }
            events
        })?;
        if dead > 0 {
            return Err(BenchError::Other(format!(
                "{dead} {ty} id records did not decode"
            )));
        }
        let per_event = run.cpu_secs / records.len() as f64;
        let base = *base_cpu_per_event.get_or_insert(per_event);
        let note = format!(
            "{} events of ~{bytes} bytes, {} flushes, {:.0} ns CPU/event",
            records.len(),
            run.flushes,
            per_event * 1e9
        );
        figures.push(match ty {
            IdType::I64 => Figure {
                name: "ids: i64 (json→fold→flush)".into(),
                value: records.len() as f64 / run.secs,
                unit: "events/s",
                target: None,
                note,
            },
            other => Figure {
                name: format!("ids: {other} CPU/event vs i64"),
                value: per_event / base,
                unit: "x",
                target: Some(Target::AtMost(1.5)),
                note: format!(
                    "{note}; {} events/s",
                    super::fmt_num(records.len() as f64 / run.secs)
                ),
            },
        });
    }
    Ok(figures)
}
