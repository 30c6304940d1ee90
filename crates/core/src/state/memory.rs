//! An in-memory [`KeyValueStore`] (a `BTreeMap`), for tests and the `memory` store kind.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{BatchOp, Entry, KeyValueStore, StoreBatch, StoreError, StoreReader};
use crate::ids::StoreName;

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// The map, shared with the store's readers; `None` once the store is dropped.
type Shared = Arc<RwLock<Option<Map>>>;

#[derive(Debug)]
pub struct InMemoryStore {
    name: StoreName,
    map: Shared,
    /// Number of batches written; lets tests see that writes are batched.
    pub batches_written: u64,
}

impl Clone for InMemoryStore {
    /// A copy with a map of its own (readers of the original do not see it).
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            map: Arc::new(RwLock::new(Some(self.read().clone()))),
            batches_written: self.batches_written,
        }
    }
}

impl Drop for InMemoryStore {
    fn drop(&mut self) {
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl InMemoryStore {
    pub fn new(name: StoreName) -> Self {
        Self {
            name,
            map: Arc::new(RwLock::new(Some(Map::new()))),
            batches_written: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> MapRef<'_> {
        MapRef(self.map.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn write_map(&self) -> MapMut<'_> {
        MapMut(self.map.write().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The live map (the store holds it until dropped).
struct MapRef<'a>(RwLockReadGuard<'a, Option<Map>>);

impl std::ops::Deref for MapRef<'_> {
    type Target = Map;
    fn deref(&self) -> &Map {
        self.0
            .as_ref()
            .expect("a store's map lives as long as the store")
    }
}

struct MapMut<'a>(RwLockWriteGuard<'a, Option<Map>>);

impl std::ops::Deref for MapMut<'_> {
    type Target = Map;
    fn deref(&self) -> &Map {
        self.0
            .as_ref()
            .expect("a store's map lives as long as the store")
    }
}

impl std::ops::DerefMut for MapMut<'_> {
    fn deref_mut(&mut self) -> &mut Map {
        self.0
            .as_mut()
            .expect("a store's map lives as long as the store")
    }
}

fn scan(map: &Map, prefix: &[u8], limit: usize) -> Vec<Entry> {
    map.range(prefix.to_vec()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl KeyValueStore for InMemoryStore {
    fn name(&self) -> &StoreName {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read().get(key).cloned())
    }

    fn multi_get(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let map = self.read();
        Ok(keys.iter().map(|k| map.get(*k).cloned()).collect())
    }

    fn write(&mut self, batch: StoreBatch) -> Result<(), StoreError> {
        let mut map = self.write_map();
        for op in batch.iter() {
            match op {
                BatchOp::Put { key, value } => {
                    map.insert(key.to_vec(), value.to_vec());
                }
                BatchOp::Delete { key } => {
                    map.remove(key);
                }
            }
        }
        drop(map);
        self.batches_written += 1;
        Ok(())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        Ok(scan(&self.read(), prefix, usize::MAX))
    }

    fn approximate_num_keys(&self) -> u64 {
        self.read().len() as u64
    }

    fn approximate_size_bytes(&self) -> u64 {
        self.read()
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum()
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn reader(&self) -> Arc<dyn StoreReader> {
        Arc::new(MemoryReader {
            name: self.name.clone(),
            map: self.map.clone(),
        })
    }
}

/// The [`StoreReader`] of an [`InMemoryStore`].
struct MemoryReader {
    name: StoreName,
    map: Shared,
}

impl MemoryReader {
    fn with<T>(&self, f: impl FnOnce(&Map) -> T) -> Result<T, StoreError> {
        let guard = self.map.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(map) => Ok(f(map)),
            None => Err(StoreError::Closed {
                store: self.name.clone(),
            }),
        }
    }
}

impl StoreReader for MemoryReader {
    fn name(&self) -> &StoreName {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|m| m.get(key).cloned())
    }

    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<Entry>, StoreError> {
        self.with(|m| scan(m, prefix, limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_and_prefix_scan() {
        let mut s = InMemoryStore::new("t".into());
        let mut b = StoreBatch::default();
        b.put(b"ab1", b"1");
        b.put(b"ab2", b"2");
        b.put(b"ac1", b"3");
        s.write(b).unwrap();
        let got = s.scan_prefix(b"ab").unwrap();
        assert_eq!(got.len(), 2);
        let mut d = StoreBatch::default();
        d.delete(b"ab1");
        s.write(d).unwrap();
        assert_eq!(s.get(b"ab1").unwrap(), None);
        assert_eq!(
            s.multi_get(&[b"ab2", b"zz"]).unwrap(),
            vec![Some(b"2".to_vec()), None]
        );
        assert_eq!(s.batches_written, 2);
    }

    #[test]
    fn a_reader_sees_writes_and_then_the_close() {
        let mut s = InMemoryStore::new("t".into());
        let r = s.reader();
        let mut b = StoreBatch::default();
        b.put(b"ab1", b"1");
        b.put(b"ab2", b"2");
        s.write(b).unwrap();
        assert_eq!(r.get(b"ab1").unwrap(), Some(b"1".to_vec()));
        assert_eq!(r.scan_prefix(b"ab", 1).unwrap().len(), 1, "limited");
        let copy = s.clone();
        drop(s);
        assert!(matches!(r.get(b"ab1"), Err(StoreError::Closed { .. })));
        assert_eq!(copy.len(), 2, "a clone keeps its own map");
    }
}
