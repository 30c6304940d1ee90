//! The RocksDB [`KeyValueStore`]: one database per task, under
//! `<state.dir>/<application.id>/<task>/<store>`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rocksdb::{
    BlockBasedOptions, Cache, DBCompressionType, Options, WriteBatch, WriteBufferManager,
    WriteOptions, DB,
};

use super::{BatchOp, Entry, KeyValueStore, StoreBatch, StoreError, StoreReader};
use crate::ids::StoreName;

/// Tuning of a RocksDB store; every field has a bounded default so memory stays predictable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RocksDbOptions {
    /// LRU block cache per store, bytes.
    pub block_cache_bytes: usize,
    /// Memtable size, bytes.
    pub write_buffer_bytes: usize,
    /// Memtables kept at most (active + immutable).
    pub max_write_buffers: i32,
    /// Skip RocksDB's write-ahead log. Safe because the changelog topic and the checkpoint
    /// written in the same batch make the store rebuildable; costs a longer restore after a
    /// crash.
    pub disable_wal: bool,
}

impl Default for RocksDbOptions {
    fn default() -> Self {
        Self {
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 8 << 20,
            max_write_buffers: 3,
            // A store with a changelog (the default topology) needs no WAL.
            disable_wal: true,
        }
    }
}

/// RocksDB memory shared by every store of an instance, as Kafka Streams'
/// `BoundedMemoryRocksDBConfig`: one LRU block cache, and one write-buffer manager whose
/// memtable budget (`write_buffer_bytes × max_write_buffers`) is charged to that cache. An
/// instance's RocksDB memory is then bounded by `block_cache_bytes` plus that budget,
/// however many tasks (stores) it runs.
#[derive(Clone)]
pub struct RocksDbMemory {
    cache: Cache,
    write_buffers: WriteBufferManager,
}

impl RocksDbMemory {
    pub fn new(opts: &RocksDbOptions) -> Self {
        let budget = opts.write_buffer_bytes * opts.max_write_buffers.max(1) as usize;
        let cache = Cache::new_lru_cache(opts.block_cache_bytes + budget);
        let write_buffers =
            WriteBufferManager::new_write_buffer_manager_with_cache(budget, false, cache.clone());
        Self {
            cache,
            write_buffers,
        }
    }

    /// Bytes in use: blocks cached plus memtables (which are charged to the cache).
    pub fn usage_bytes(&self) -> usize {
        self.cache.get_usage()
    }
}

pub struct RocksDbStore {
    name: StoreName,
    path: PathBuf,
    db: Arc<DB>,
    /// The database as its readers see it: `None` once the store is dropped (the drop
    /// waits for reads in flight, so the database closes with the store).
    readable: Arc<RwLock<Option<Arc<DB>>>>,
    write_opts: WriteOptions,
}

impl Drop for RocksDbStore {
    fn drop(&mut self) {
        *self.readable.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl RocksDbStore {
    /// Open (creating if missing) the store at `path`, with memory of its own.
    pub fn open(name: StoreName, path: &Path, opts: &RocksDbOptions) -> Result<Self, StoreError> {
        Self::open_with(name, path, opts, &RocksDbMemory::new(opts))
    }

    /// Open (creating if missing) the store at `path`, within `memory` shared with the
    /// instance's other stores.
    pub fn open_with(
        name: StoreName,
        path: &Path,
        opts: &RocksDbOptions,
        memory: &RocksDbMemory,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(path).map_err(|source| StoreError::Io {
            store: name.clone(),
            source,
        })?;
        let mut o = Options::default();
        o.create_if_missing(true);
        o.set_write_buffer_size(opts.write_buffer_bytes);
        o.set_max_write_buffer_number(opts.max_write_buffers);
        o.set_compression_type(DBCompressionType::Lz4);
        o.set_bottommost_compression_type(DBCompressionType::Zstd);
        o.set_max_background_jobs(2);
        o.set_keep_log_file_num(3);
        o.set_write_buffer_manager(&memory.write_buffers);
        let mut bb = BlockBasedOptions::default();
        bb.set_block_cache(&memory.cache);
        bb.set_bloom_filter(10.0, false);
        bb.set_cache_index_and_filter_blocks(true);
        bb.set_pin_l0_filter_and_index_blocks_in_cache(true);
        o.set_block_based_table_factory(&bb);
        // Point lookups dominate; whole-key bloom filters plus a 9-byte prefix extractor
        // (tag + conversation) keep prefix scans cheap too. No memtable bloom: it costs
        // 0.1 x write_buffer_size per memtable (26 MiB for 32 stores, heaptrack) and
        // bought nothing measurable in the core figure (the record cache serves hits).
        o.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(9));
        let db = DB::open(&o, path).map_err(|source| StoreError::Rocks {
            store: name.clone(),
            source,
        })?;
        let mut write_opts = WriteOptions::default();
        write_opts.disable_wal(opts.disable_wal);
        let db = Arc::new(db);
        Ok(Self {
            name,
            path: path.to_path_buf(),
            readable: Arc::new(RwLock::new(Some(db.clone()))),
            db,
            write_opts,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            store: self.name.clone(),
            source,
        }
    }
}

impl KeyValueStore for RocksDbStore {
    fn name(&self) -> &StoreName {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get(key).map_err(|e| self.err(e))
    }

    fn multi_get(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.db
            .multi_get(keys)
            .into_iter()
            .map(|r| r.map_err(|e| self.err(e)))
            .collect()
    }

    fn write(&mut self, mut batch: StoreBatch) -> Result<(), StoreError> {
        // Key order makes the memtable inserts sequential (the skip list reuses its last
        // insert position); the sort is stable, so ops on one key keep their order.
        batch.sort();
        // Sized up front: a growing WriteBatch copies itself (memmove, then glibc's free
        // path on the old buffer), which showed in the restore profile. Per record:
        // a type byte and two varint lengths; 12 bytes of header.
        let mut wb = WriteBatch::with_capacity_bytes(batch.byte_len() + batch.len() * 11 + 12);
        for op in batch.iter() {
            match op {
                BatchOp::Put { key, value } => wb.put(key, value),
                BatchOp::Delete { key } => wb.delete(key),
            }
        }
        self.db
            .write_opt(wb, &self.write_opts)
            .map_err(|e| self.err(e))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        scan(&self.db, prefix, usize::MAX).map_err(|e| self.err(e))
    }

    fn approximate_num_keys(&self) -> u64 {
        self.db
            .property_int_value("rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    fn approximate_size_bytes(&self) -> u64 {
        let sst = self
            .db
            .property_int_value("rocksdb.total-sst-files-size")
            .ok()
            .flatten()
            .unwrap_or(0);
        let mem = self
            .db
            .property_int_value("rocksdb.cur-size-all-mem-tables")
            .ok()
            .flatten()
            .unwrap_or(0);
        sst + mem
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.err(e))
    }

    fn reader(&self) -> Arc<dyn StoreReader> {
        Arc::new(RocksDbReader {
            name: self.name.clone(),
            db: self.readable.clone(),
        })
    }
}

/// Up to `limit` entries whose key starts with `prefix`, in key order.
fn scan(db: &DB, prefix: &[u8], limit: usize) -> Result<Vec<Entry>, rocksdb::Error> {
    let mut ro = rocksdb::ReadOptions::default();
    // The fixed prefix extractor covers 9 bytes; shorter prefixes need a total-order scan.
    ro.set_total_order_seek(prefix.len() < 9);
    let mut out = Vec::new();
    let it = db.iterator_opt(
        rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
        ro,
    );
    for item in it.take(limit) {
        let (k, v) = item?;
        if !k.starts_with(prefix) {
            break;
        }
        out.push((k.into_vec(), v.into_vec()));
    }
    Ok(out)
}

/// The [`StoreReader`] of a [`RocksDbStore`]: reads hold the database open (a close waits
/// for them); after the close they answer [`StoreError::Closed`].
struct RocksDbReader {
    name: StoreName,
    db: Arc<RwLock<Option<Arc<DB>>>>,
}

impl RocksDbReader {
    fn with<T>(&self, f: impl FnOnce(&DB) -> Result<T, rocksdb::Error>) -> Result<T, StoreError> {
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        let db = guard.as_ref().ok_or_else(|| StoreError::Closed {
            store: self.name.clone(),
        })?;
        f(db).map_err(|source| StoreError::Rocks {
            store: self.name.clone(),
            source,
        })
    }
}

impl StoreReader for RocksDbReader {
    fn name(&self) -> &StoreName {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|db| db.get(key))
    }

    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<Entry>, StoreError> {
        self.with(|db| scan(db, prefix, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_scans_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let mut s = RocksDbStore::open("s".into(), &path, &RocksDbOptions::default()).unwrap();
            let mut b = StoreBatch::default();
            for i in 0..10u8 {
                let mut k = vec![b's', 0, 0, 0, 0, 0, 0, 0, i % 2];
                k.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, i]);
                b.put(k, vec![i]);
            }
            s.write(b).unwrap();
        }
        let s = RocksDbStore::open("s".into(), &path, &RocksDbOptions::default()).unwrap();
        let odd = s.scan_prefix(&[b's', 0, 0, 0, 0, 0, 0, 0, 1]).unwrap();
        assert_eq!(
            odd.iter().map(|(_, v)| v[0]).collect::<Vec<_>>(),
            vec![1, 3, 5, 7, 9]
        );
        assert_eq!(s.scan_prefix(b"s").unwrap().len(), 10);
    }

    #[test]
    fn a_reader_sees_writes_and_does_not_keep_the_database_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut s = RocksDbStore::open("s".into(), &path, &RocksDbOptions::default()).unwrap();
        let r = s.reader();
        let mut b = StoreBatch::default();
        for i in 0..4u8 {
            b.put([b'k', i], [i]);
        }
        s.write(b).unwrap();
        assert_eq!(r.get(b"k\x02").unwrap(), Some(vec![2]));
        assert_eq!(r.scan_prefix(b"k", 3).unwrap().len(), 3, "limited");
        drop(s);
        assert!(matches!(r.get(b"k\x02"), Err(StoreError::Closed { .. })));
        // Closed with the store, reader or not: it opens again in this process.
        let s = RocksDbStore::open("s".into(), &path, &RocksDbOptions::default()).unwrap();
        assert_eq!(s.get(b"k\x03").unwrap(), Some(vec![3]));
    }
}
