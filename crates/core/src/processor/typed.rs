//! The typed processor API, in the spirit of Kafka Streams' `processor.api`: write a
//! [`TypedProcessor`] over typed records, and [`TypedSupplier`] runs it behind the runtime's
//! byte-level [`Processor`] seam.
//!
//! - `init(ctx)`, `process(record, ctx)`, `punctuate(schedule, timestamp, ctx)` and `close`;
//! - a [`Record`] carries a typed key and value, a timestamp and headers; where it was read
//!   from is [`Context::record_metadata`];
//! - [`Context::forward`] (to every sink node) and [`Context::forward_to`] (one, by name);
//!   the sinks' serdes encode the records;
//! - [`Context::store`] opens a named, typed key-value store. Stores are layered as in Kafka
//!   Streams, Caching(Logging(inner)): writes stay in the task's cache until the commit,
//!   then go to the store's changelog and, once acknowledged, to the store (RocksDB or
//!   in-memory) in one atomic batch with its checkpoint. The logging layer is the task's
//!   commit protocol: no processor writes a changelog record or a checkpoint itself;
//! - [`Context::schedule`] registers a punctuation by wall-clock time (checked at each
//!   commit) or by stream time (the largest record timestamp seen, checked after each
//!   record).
//!
//! `examples/last_seen.rs` is a processor written only against this API.

use std::any::Any;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use super::api::{
    CacheBudget, Counter, FlushOutput, InputId, Outputs, Processor, ProcessorContext,
    ProcessorStats, ProcessorSupplier, SinkId,
};
use super::ProcessorError;
use crate::ids::TaskId;
use crate::state::{write_all_flushed, KeyValueStore, StoreBatch};
use crate::task::{DeadLetter, SourceRecord};

/// Turns values of `T` into bytes and back.
pub trait Serde<T>: Send + Sync + 'static {
    fn serialize(&self, value: &T, out: &mut Vec<u8>);
    fn deserialize(&self, bytes: &[u8]) -> Result<T, String>;
}

/// UTF-8 strings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8;

impl Serde<String> for Utf8 {
    fn serialize(&self, value: &String, out: &mut Vec<u8>) {
        out.extend_from_slice(value.as_bytes());
    }

    fn deserialize(&self, bytes: &[u8]) -> Result<String, String> {
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("not UTF-8: {e}"))
    }
}

/// 64-bit integers, 8 bytes big-endian with the sign bit flipped: byte order is numeric
/// order (a store scans them in order).
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderedI64;

impl Serde<i64> for OrderedI64 {
    fn serialize(&self, value: &i64, out: &mut Vec<u8>) {
        out.extend_from_slice(&((*value as u64) ^ (1 << 63)).to_be_bytes());
    }

    fn deserialize(&self, bytes: &[u8]) -> Result<i64, String> {
        let b: [u8; 8] = bytes
            .try_into()
            .map_err(|_| format!("{} bytes, not 8", bytes.len()))?;
        Ok((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
    }
}

/// JSON through serde.
pub struct Json<T>(PhantomData<fn() -> T>);

impl<T> Default for Json<T> {
    fn default() -> Self {
        Json(PhantomData)
    }
}

impl<T: serde::Serialize + serde::de::DeserializeOwned + 'static> Serde<T> for Json<T> {
    fn serialize(&self, value: &T, out: &mut Vec<u8>) {
        serde_json::to_writer(out, value).expect("a serde value serializes to JSON");
    }

    fn deserialize(&self, bytes: &[u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// A typed record: key, value, timestamp (epoch milliseconds) and headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<K, V> {
    pub key: K,
    pub value: V,
    pub timestamp: i64,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl<K, V> Record<K, V> {
    pub fn new(key: K, value: V, timestamp: i64) -> Self {
        Self {
            key,
            value,
            timestamp,
            headers: Vec::new(),
        }
    }
}

/// Where the record being processed was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What a punctuation's time is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PunctuationType {
    /// The wall clock, checked at each commit.
    WallClockTime,
    /// The largest record timestamp seen, checked after each record.
    StreamTime,
}

/// A scheduled punctuation, as [`Context::schedule`] returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScheduleId(pub usize);

#[derive(Debug, Clone, Copy)]
struct Schedule {
    interval_ms: i64,
    kind: PunctuationType,
    /// When it is due next; `None` until the first time it is checked.
    next: Option<i64>,
}

/// A processor over typed records.
pub trait TypedProcessor: Send + 'static {
    type KeyIn: Send + 'static;
    type ValueIn: Send + 'static;
    type KeyOut: Send + 'static;
    type ValueOut: Send + 'static;

    /// Called once per task, before any record (schedule punctuations here).
    fn init(
        &mut self,
        ctx: &mut Context<'_, Self::KeyOut, Self::ValueOut>,
    ) -> Result<(), ProcessorError> {
        let _ = ctx;
        Ok(())
    }

    fn process(
        &mut self,
        record: Record<Self::KeyIn, Self::ValueIn>,
        ctx: &mut Context<'_, Self::KeyOut, Self::ValueOut>,
    ) -> Result<(), ProcessorError>;

    /// A scheduled punctuation is due at `timestamp`.
    fn punctuate(
        &mut self,
        schedule: ScheduleId,
        timestamp: i64,
        ctx: &mut Context<'_, Self::KeyOut, Self::ValueOut>,
    ) -> Result<(), ProcessorError> {
        let _ = (schedule, timestamp, ctx);
        Ok(())
    }

    /// The task closes.
    fn close(&mut self) {}
}

/// The serdes of a typed store.
struct StoreSerdes<K, V> {
    key: Box<dyn Serde<K>>,
    value: Box<dyn Serde<V>>,
}

/// A store of a task, layered: the cache of writes since the last commit over the inner
/// store; at the commit the writes go to the changelog and the store (the logging layer).
struct LayeredStore {
    name: String,
    inner: Box<dyn KeyValueStore>,
    /// Writes since the last flush (`None`: deleted), read before the inner store.
    dirty: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    serdes: Arc<dyn Any + Send + Sync>,
}

/// A typed view of a named store, from [`Context::store`].
pub struct TypedStore<'a, K, V> {
    store: &'a mut LayeredStore,
    serdes: Arc<StoreSerdes<K, V>>,
}

impl<K: 'static, V: 'static> TypedStore<'_, K, V> {
    fn key(&self, key: &K) -> Vec<u8> {
        let mut k = Vec::with_capacity(16);
        self.serdes.key.serialize(key, &mut k);
        k
    }

    /// The value of `key`: written since the last commit, or stored.
    pub fn get(&self, key: &K) -> Result<Option<V>, ProcessorError> {
        let k = self.key(key);
        let bytes = match self.store.dirty.get(&k) {
            Some(v) => v.clone(),
            None => self.store.inner.get(&k)?,
        };
        bytes
            .map(|b| self.serdes.value.deserialize(&b))
            .transpose()
            .map_err(|reason| ProcessorError::StoreValue {
                store: self.store.name.clone(),
                reason,
            })
    }

    pub fn put(&mut self, key: &K, value: &V) {
        let k = self.key(key);
        let mut v = Vec::with_capacity(32);
        self.serdes.value.serialize(value, &mut v);
        self.store.dirty.insert(k, Some(v));
    }

    pub fn delete(&mut self, key: &K) {
        let k = self.key(key);
        self.store.dirty.insert(k, None);
    }

    /// Every (key, value) of the store, in key byte order (written since the last commit
    /// included, deleted ones excluded).
    pub fn all(&self) -> Result<Vec<(K, V)>, ProcessorError> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = self
            .store
            .inner
            .scan_prefix(&[])?
            .into_iter()
            .filter(|(k, _)| !crate::state::is_internal_key(k))
            .map(|(k, v)| (k, Some(v)))
            .collect();
        merged.extend(self.store.dirty.iter().map(|(k, v)| (k.clone(), v.clone())));
        let bad = |reason: String| ProcessorError::StoreValue {
            store: self.store.name.clone(),
            reason,
        };
        let mut out = Vec::with_capacity(merged.len());
        for (k, v) in merged {
            let Some(v) = v else { continue };
            let key = self.serdes.key.deserialize(&k).map_err(bad)?;
            out.push((key, self.serdes.value.deserialize(&v).map_err(bad)?));
        }
        Ok(out)
    }
}

/// A sink node the processor forwards to, with its serdes.
struct Sink<K, V> {
    name: String,
    id: SinkId,
    key: Arc<dyn Serde<K>>,
    value: Arc<dyn Serde<V>>,
}

/// What a typed processor sees of its task: forwarding, stores, schedules.
pub struct Context<'a, K, V> {
    task: TaskId,
    sinks: &'a [Sink<K, V>],
    outputs: &'a mut Outputs,
    stores: &'a mut [LayeredStore],
    schedules: &'a mut Vec<Schedule>,
    metadata: Option<&'a RecordMetadata>,
    stream_time: i64,
    forwarded: &'a mut u64,
}

impl<K: 'static, V: 'static> Context<'_, K, V> {
    pub fn task_id(&self) -> TaskId {
        self.task
    }

    /// Where the record being processed was read (`None` in a punctuation).
    pub fn record_metadata(&self) -> Option<&RecordMetadata> {
        self.metadata
    }

    /// The largest record timestamp this task has seen.
    pub fn stream_time(&self) -> i64 {
        self.stream_time
    }

    /// Forward a record to every sink node of the processor.
    pub fn forward(&mut self, record: &Record<K, V>) {
        for s in self.sinks {
            push(self.outputs, s, record);
        }
        *self.forwarded += self.sinks.len() as u64;
    }

    /// Forward a record to the sink node named `sink`.
    pub fn forward_to(&mut self, sink: &str, record: &Record<K, V>) -> Result<(), ProcessorError> {
        let s = self
            .sinks
            .iter()
            .find(|s| s.name == sink)
            .ok_or_else(|| ProcessorError::NoSuchSink(sink.to_owned()))?;
        push(self.outputs, s, record);
        *self.forwarded += 1;
        Ok(())
    }

    /// The store named `name`, typed as it was declared to the supplier.
    pub fn store<SK: 'static, SV: 'static>(
        &mut self,
        name: &str,
    ) -> Result<TypedStore<'_, SK, SV>, ProcessorError> {
        let store = self
            .stores
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| ProcessorError::NoSuchStore(name.to_owned()))?;
        let serdes = store
            .serdes
            .clone()
            .downcast::<StoreSerdes<SK, SV>>()
            .map_err(|_| ProcessorError::StoreType(name.to_owned()))?;
        Ok(TypedStore { store, serdes })
    }

    /// Call `punctuate` every `interval` of `kind` time from now on.
    pub fn schedule(&mut self, interval: Duration, kind: PunctuationType) -> ScheduleId {
        self.schedules.push(Schedule {
            interval_ms: (interval.as_millis() as i64).max(1),
            kind,
            next: None,
        });
        ScheduleId(self.schedules.len() - 1)
    }
}

fn push<K: 'static, V: 'static>(outputs: &mut Outputs, s: &Sink<K, V>, record: &Record<K, V>) {
    outputs.push(
        s.id,
        |k| s.key.serialize(&record.key, k),
        |v| s.value.serialize(&record.value, v),
    );
}

/// How records of the processor's inputs are decoded.
struct Input<K, V> {
    key: Arc<dyn Serde<K>>,
    value: Arc<dyn Serde<V>>,
}

type Factory<P> = dyn Fn() -> P + Send + Sync;
type StoreSerdesAny = Arc<dyn Any + Send + Sync>;

/// Makes a [`TypedProcessor`] per task and runs it behind the byte-level seam: declare its
/// input serdes, its stores (in the task's store order) and its sinks (in the graph's sink
/// order).
pub struct TypedSupplier<P: TypedProcessor> {
    factory: Box<Factory<P>>,
    input: Input<P::KeyIn, P::ValueIn>,
    stores: Vec<(String, StoreSerdesAny)>,
    sinks: Vec<Sink<P::KeyOut, P::ValueOut>>,
}

impl<P: TypedProcessor> TypedSupplier<P> {
    pub fn new(
        factory: impl Fn() -> P + Send + Sync + 'static,
        key: impl Serde<P::KeyIn>,
        value: impl Serde<P::ValueIn>,
    ) -> Self {
        Self {
            factory: Box::new(factory),
            input: Input {
                key: Arc::new(key),
                value: Arc::new(value),
            },
            stores: Vec::new(),
            sinks: Vec::new(),
        }
    }

    /// Declare the next store of the task (named as in the topology), typed.
    pub fn store<K: 'static, V: 'static>(
        mut self,
        name: &str,
        key: impl Serde<K>,
        value: impl Serde<V>,
    ) -> Self {
        let serdes = StoreSerdes {
            key: Box::new(key),
            value: Box::new(value),
        };
        self.stores.push((name.to_owned(), Arc::new(serdes)));
        self
    }

    /// Declare the next sink node (`SinkId` in declaration order).
    pub fn sink(
        mut self,
        name: &str,
        key: impl Serde<P::KeyOut>,
        value: impl Serde<P::ValueOut>,
    ) -> Self {
        self.sinks.push(Sink {
            name: name.to_owned(),
            id: SinkId(self.sinks.len()),
            key: Arc::new(key),
            value: Arc::new(value),
        });
        self
    }
}

impl<P: TypedProcessor> ProcessorSupplier for TypedSupplier<P> {
    fn init(&self, ctx: ProcessorContext) -> Result<Box<dyn Processor>, ProcessorError> {
        if ctx.stores.len() != self.stores.len() {
            return Err(ProcessorError::StoreCount {
                declared: self.stores.len(),
                given: ctx.stores.len(),
            });
        }
        let stores = ctx
            .stores
            .into_iter()
            .zip(&self.stores)
            .map(|(inner, (name, serdes))| LayeredStore {
                name: name.clone(),
                inner,
                dirty: BTreeMap::new(),
                serdes: serdes.clone(),
            })
            .collect();
        let sinks = self
            .sinks
            .iter()
            .map(|s| Sink {
                name: s.name.clone(),
                id: s.id,
                key: s.key.clone(),
                value: s.value.clone(),
            })
            .collect();
        let mut node = TypedNode {
            task: ctx.task,
            processor: (self.factory)(),
            input: Input {
                key: self.input.key.clone(),
                value: self.input.value.clone(),
            },
            stores,
            sinks,
            outputs: Outputs::default(),
            schedules: Vec::new(),
            stream_time: i64::MIN,
            counts: Counts::default(),
        };
        node.with_context(None, |p, ctx| p.init(ctx))?;
        Ok(Box::new(node))
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    processed: u64,
    forwarded: u64,
    punctuations: u64,
}

type InputRecord<P> = Record<<P as TypedProcessor>::KeyIn, <P as TypedProcessor>::ValueIn>;
type Undecodable = (&'static str, String);

/// A task's typed processor behind the byte-level trait.
struct TypedNode<P: TypedProcessor> {
    task: TaskId,
    processor: P,
    input: Input<P::KeyIn, P::ValueIn>,
    stores: Vec<LayeredStore>,
    sinks: Vec<Sink<P::KeyOut, P::ValueOut>>,
    /// Records forwarded since the last flush.
    outputs: Outputs,
    schedules: Vec<Schedule>,
    stream_time: i64,
    counts: Counts,
}

impl<P: TypedProcessor> TypedNode<P> {
    fn with_context<T>(
        &mut self,
        metadata: Option<&RecordMetadata>,
        f: impl FnOnce(&mut P, &mut Context<'_, P::KeyOut, P::ValueOut>) -> T,
    ) -> T {
        let mut ctx = Context {
            task: self.task,
            sinks: &self.sinks,
            outputs: &mut self.outputs,
            stores: &mut self.stores,
            schedules: &mut self.schedules,
            metadata,
            stream_time: self.stream_time,
            forwarded: &mut self.counts.forwarded,
        };
        f(&mut self.processor, &mut ctx)
    }

    /// Run the punctuations of `kind` due at `now`.
    fn punctuate(&mut self, kind: PunctuationType, now: i64) -> Result<(), ProcessorError> {
        for i in 0..self.schedules.len() {
            let s = self.schedules[i];
            if s.kind != kind {
                continue;
            }
            let next = s.next.unwrap_or(now.saturating_add(s.interval_ms));
            self.schedules[i].next = Some(next);
            if now < next {
                continue;
            }
            // Due: once, however many intervals passed (as Kafka Streams' punctuation).
            self.schedules[i].next = Some(now.saturating_add(s.interval_ms));
            self.counts.punctuations += 1;
            self.with_context(None, |p, ctx| p.punctuate(ScheduleId(i), now, ctx))?;
        }
        Ok(())
    }

    /// The typed record, or why it is a dead letter (reason, error).
    fn decode(&self, r: &SourceRecord<'_>) -> Result<InputRecord<P>, Undecodable> {
        let key = r.key.ok_or(("empty_key", "record has no key".to_owned()))?;
        let value = r
            .value
            .ok_or(("empty_value", "record has no value".to_owned()))?;
        let key = self
            .input
            .key
            .deserialize(key)
            .map_err(|e| ("malformed", e))?;
        let value = self
            .input
            .value
            .deserialize(value)
            .map_err(|e| ("malformed", e))?;
        Ok(Record {
            key,
            value,
            timestamp: r.timestamp.unwrap_or(self.stream_time.max(0)),
            headers: Vec::new(),
        })
    }
}

impl<P: TypedProcessor> Processor for TypedNode<P> {
    fn process(
        &mut self,
        _input: InputId,
        records: &[SourceRecord<'_>],
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), ProcessorError> {
        for r in records {
            let record = match self.decode(r) {
                Ok(rec) => rec,
                Err((reason, error)) => {
                    dead_letters.push(DeadLetter::from_record(r, reason, error, 1 << 20));
                    continue;
                }
            };
            self.stream_time = self.stream_time.max(record.timestamp);
            let metadata = RecordMetadata {
                topic: r.topic.to_owned(),
                partition: r.partition,
                offset: r.offset,
            };
            self.with_context(Some(&metadata), |p, ctx| p.process(record, ctx))?;
            self.counts.processed += 1;
            self.punctuate(PunctuationType::StreamTime, self.stream_time)?;
        }
        Ok(())
    }

    fn flush(&mut self, now_ms: i64) -> FlushOutput {
        if let Err(e) = self.punctuate(PunctuationType::WallClockTime, now_ms) {
            tracing::error!(task = %self.task, error = %e, "wall-clock punctuation failed");
        }
        let mut out = FlushOutput::for_stores(self.stores.len());
        out.outputs = std::mem::take(&mut self.outputs);
        for (store, part) in self.stores.iter_mut().zip(&mut out.stores) {
            for (k, v) in std::mem::take(&mut store.dirty) {
                match v {
                    Some(v) => part.put_logged(&k, |b| b.extend_from_slice(&v)),
                    None => part.delete_logged(&k),
                }
            }
        }
        out
    }

    fn commit(
        &mut self,
        batches: Vec<StoreBatch>,
        checkpoints: &[Option<i64>],
    ) -> Result<(), ProcessorError> {
        let stores = self.stores.iter_mut().map(|s| &mut *s.inner);
        Ok(write_all_flushed(stores, batches, checkpoints)?)
    }

    fn reset(&mut self) -> Result<(), ProcessorError> {
        self.outputs = Outputs::default();
        for s in &mut self.stores {
            s.dirty.clear();
        }
        Ok(())
    }

    fn close(mut self: Box<Self>) -> Vec<Box<dyn KeyValueStore>> {
        self.processor.close();
        self.stores.into_iter().map(|s| s.inner).collect()
    }

    fn stores(&self) -> Vec<&dyn KeyValueStore> {
        self.stores.iter().map(|s| &*s.inner).collect()
    }

    fn stats(&self) -> ProcessorStats {
        let c = |name, value| Counter {
            name,
            label: None,
            value,
        };
        ProcessorStats {
            counters: vec![
                c("readstate_records_processed_total", self.counts.processed),
                c("readstate_records_forwarded_total", self.counts.forwarded),
                c("readstate_punctuations_total", self.counts.punctuations),
            ],
        }
    }

    fn set_cache_budget(&mut self, _budget: CacheBudget) {}

    /// The write cache holds at most this many keys per store before a commit.
    fn needs_flush(&self) -> bool {
        self.stores.iter().any(|s| s.dirty.len() >= 10_000) || self.outputs.len() >= 10_000
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_i64_keeps_numeric_order_in_bytes() {
        let enc = |v: i64| {
            let mut b = Vec::new();
            OrderedI64.serialize(&v, &mut b);
            b
        };
        let values = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for w in values.windows(2) {
            assert!(enc(w[0]) < enc(w[1]), "{} < {}", w[0], w[1]);
        }
        for v in values {
            assert_eq!(OrderedI64.deserialize(&enc(v)), Ok(v));
        }
        assert!(OrderedI64.deserialize(b"short").is_err());
    }
}
