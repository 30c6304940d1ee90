//! An in-memory [`KeyValueStore`] (a `BTreeMap`), for tests and the `memory` store kind.

use std::collections::BTreeMap;

use super::{BatchOp, Entry, KeyValueStore, StoreBatch, StoreError};
use crate::ids::StoreName;

#[derive(Debug, Clone)]
pub struct InMemoryStore {
    name: StoreName,
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Number of batches written; lets tests see that writes are batched.
    pub batches_written: u64,
}

impl InMemoryStore {
    pub fn new(name: StoreName) -> Self {
        Self {
            name,
            map: BTreeMap::new(),
            batches_written: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl KeyValueStore for InMemoryStore {
    fn name(&self) -> &StoreName {
        &self.name
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.get(key).cloned())
    }

    fn multi_get(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        Ok(keys.iter().map(|k| self.map.get(*k).cloned()).collect())
    }

    fn write(&mut self, batch: StoreBatch) -> Result<(), StoreError> {
        for op in batch.iter() {
            match op {
                BatchOp::Put { key, value } => {
                    self.map.insert(key.to_vec(), value.to_vec());
                }
                BatchOp::Delete { key } => {
                    self.map.remove(key);
                }
            }
        }
        self.batches_written += 1;
        Ok(())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn approximate_num_keys(&self) -> u64 {
        self.map.len() as u64
    }

    fn approximate_size_bytes(&self) -> u64 {
        self.map
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum()
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
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
}
