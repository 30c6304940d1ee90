//! State: key-value stores, the read-state value and its encoding, the record cache.
//!
//! Stores are layered like Kafka Streams' `KeyValueStoreBuilder`: the processor talks to a
//! [`cache::RecordCache`] (fold in memory, flush dirty entries in one batch) in front of a
//! [`KeyValueStore`] ([`rocks::RocksDbStore`] in production, [`memory::InMemoryStore`] in
//! tests). The changelog topic (written by the task at each flush) makes a store
//! rebuildable; see `ARCHITECTURE.md` for the commit protocol.

pub mod cache;
pub mod codec;
pub mod head;
pub mod memory;
pub mod order_stats;
pub mod queryable;
pub mod restore;
pub mod rocks;

use crate::ids::StoreName;

pub use codec::{ReadState, StoreKey};
pub use head::ConversationHead;

/// Errors of the state layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {store}: rocksdb: {source}")]
    Rocks {
        store: StoreName,
        #[source]
        source: rocksdb::Error,
    },
    #[error("store {store}: corrupt value for key {key:02x?}: {reason}")]
    Corrupt {
        store: StoreName,
        key: Vec<u8>,
        reason: String,
    },
    #[error("store {store}: io: {source}")]
    Io {
        store: StoreName,
        #[source]
        source: std::io::Error,
    },
    #[error("store {store} is closed")]
    Closed { store: StoreName },
}

/// A key and its value, as returned by scans.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One operation of an atomic write, borrowed from its [`StoreBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOp<'a> {
    Put { key: &'a [u8], value: &'a [u8] },
    Delete { key: &'a [u8] },
}

impl<'a> BatchOp<'a> {
    pub fn key(&self) -> &'a [u8] {
        match self {
            BatchOp::Put { key, .. } | BatchOp::Delete { key } => key,
        }
    }
}

/// Where an operation's bytes are in the batch.
#[derive(Debug, Clone, Copy)]
struct OpSpan {
    key: (u32, u32),
    /// `None`: a delete.
    value: Option<(u32, u32)>,
}

/// An atomic group of writes: all or nothing. Keys and values live in one buffer, so
/// building a batch of many writes allocates a few times, not twice per write.
#[derive(Debug, Default, Clone)]
pub struct StoreBatch {
    bytes: Vec<u8>,
    ops: Vec<OpSpan>,
}

impl StoreBatch {
    fn push_bytes(&mut self, b: &[u8]) -> (u32, u32) {
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(b);
        (start, self.bytes.len() as u32)
    }

    pub fn put(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.put_with(key.as_ref(), |out| out.extend_from_slice(value.as_ref()));
    }

    /// Put `key` with the value `encode` appends to the buffer it is given; returns the
    /// operation's index (see [`op`](Self::op)).
    pub fn put_with(&mut self, key: &[u8], encode: impl FnOnce(&mut Vec<u8>)) -> usize {
        let key = self.push_bytes(key);
        let start = self.bytes.len() as u32;
        encode(&mut self.bytes);
        let value = Some((start, self.bytes.len() as u32));
        self.ops.push(OpSpan { key, value });
        self.ops.len() - 1
    }

    pub fn delete(&mut self, key: impl AsRef<[u8]>) {
        let key = self.push_bytes(key.as_ref());
        self.ops.push(OpSpan { key, value: None });
    }

    fn slice(&self, (start, end): (u32, u32)) -> &[u8] {
        &self.bytes[start as usize..end as usize]
    }

    /// The `i`-th operation, in the order added (or sorted, after [`sort`](Self::sort)).
    pub fn op(&self, i: usize) -> BatchOp<'_> {
        let o = self.ops[i];
        let key = self.slice(o.key);
        match o.value {
            Some(v) => BatchOp::Put {
                key,
                value: self.slice(v),
            },
            None => BatchOp::Delete { key },
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = BatchOp<'_>> + '_ {
        (0..self.ops.len()).map(|i| self.op(i))
    }

    /// Order the operations by key; stable, so the operations on one key keep their order
    /// (and so their effect). Indexes from [`put_with`](Self::put_with) no longer apply.
    pub fn sort(&mut self) {
        let bytes = &self.bytes;
        let key = |o: &OpSpan| &bytes[o.key.0 as usize..o.key.1 as usize];
        self.ops.sort_by(|a, b| key(a).cmp(key(b)));
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Bytes of keys and values held.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// An empty batch with room for `ops` operations of `bytes` key and value bytes.
    pub fn with_capacity(ops: usize, bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            ops: Vec::with_capacity(ops),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A byte-oriented key-value store owned by one task.
///
/// Keys sort bytewise, so a prefix scan returns one conversation's readers in order (see
/// [`codec::StoreKey`]). Writes are atomic batches: the state of many keys plus the
/// changelog checkpoint land together or not at all.
pub trait KeyValueStore: Send {
    fn name(&self) -> &StoreName;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Point lookups of many keys at once (RocksDB `multi_get`); results in key order given.
    fn multi_get(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError>;
    fn write(&mut self, batch: StoreBatch) -> Result<(), StoreError>;
    /// All entries whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError>;
    /// Estimated number of live keys (cheap; for metrics).
    fn approximate_num_keys(&self) -> u64;
    /// Estimated bytes on disk (cheap; for metrics).
    fn approximate_size_bytes(&self) -> u64;
    /// Make everything written so far durable (flush memtables).
    fn flush(&mut self) -> Result<(), StoreError>;
    /// A read-only view of this store for other threads (interactive queries). It sees
    /// every write once written, and answers [`StoreError::Closed`] once the store is
    /// closed (closing waits for the reads in flight).
    fn reader(&self) -> std::sync::Arc<dyn StoreReader>;
}

/// Reads of a store from any thread, while its task owns and writes it (Kafka Streams'
/// `ReadOnlyKeyValueStore`).
pub trait StoreReader: Send + Sync {
    fn name(&self) -> &StoreName;
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// All entries whose key starts with `prefix`, in key order, at most `limit`.
    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<Entry>, StoreError>;
}

/// Key of the store's own metadata: the changelog offset its contents reflect.
pub const CHECKPOINT_KEY: &[u8] = b"m/changelog-offset";

/// Whether `key` is the store's own bookkeeping (the checkpoint), not a processor's entry.
pub fn is_internal_key(key: &[u8]) -> bool {
    key == CHECKPOINT_KEY
}

/// Read the changelog checkpoint recorded in a store: the offset of the next changelog
/// record not yet reflected in it (`None` for a store never written).
pub fn read_checkpoint(store: &dyn KeyValueStore) -> Result<Option<i64>, StoreError> {
    match store.get(CHECKPOINT_KEY)? {
        None => Ok(None),
        Some(v) if v.len() == 8 => Ok(Some(i64::from_be_bytes(v.try_into().unwrap()))),
        Some(v) => Err(StoreError::Corrupt {
            store: store.name().clone(),
            key: CHECKPOINT_KEY.to_vec(),
            reason: format!("checkpoint has {} bytes, expected 8", v.len()),
        }),
    }
}

/// Add the checkpoint write to a batch.
pub fn put_checkpoint(batch: &mut StoreBatch, next_offset: i64) {
    batch.put(CHECKPOINT_KEY, next_offset.to_be_bytes());
}

/// Write each of a flush's batches to its store (`stores` and `checkpoints` indexed as the
/// batches), each with its checkpoint, as [`write_flushed`].
pub fn write_all_flushed<'a>(
    stores: impl IntoIterator<Item = &'a mut (dyn KeyValueStore + 'static)>,
    batches: Vec<StoreBatch>,
    checkpoints: &[Option<i64>],
) -> Result<(), StoreError> {
    for (i, (store, batch)) in stores.into_iter().zip(batches).enumerate() {
        write_flushed(store, batch, checkpoints.get(i).copied().flatten())?;
    }
    Ok(())
}

/// Write a flushed batch with its checkpoint (when its changelog got records) in one
/// atomic write; an empty batch without one writes nothing.
pub fn write_flushed(
    store: &mut dyn KeyValueStore,
    mut batch: StoreBatch,
    checkpoint: Option<i64>,
) -> Result<(), StoreError> {
    if let Some(next_offset) = checkpoint {
        put_checkpoint(&mut batch, next_offset);
    }
    if batch.is_empty() {
        return Ok(());
    }
    store.write(batch)
}
