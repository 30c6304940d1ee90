//! The record cache: read state folded in memory between flushes.
//!
//! Misses are loaded in bulk with one `multi_get` per input batch, never per event. Dirty
//! keys are tracked in a list so a flush touches only what changed. After a flush the cache
//! keeps clean entries as a read cache up to `capacity`, evicting those not touched in the
//! latest flush interval first. Pinned keys (advances waiting for their emit slot) are never
//! evicted.

use std::hash::BuildHasher;

use hashbrown::hash_table::Entry;
use hashbrown::{DefaultHashBuilder, Equivalent, HashSet, HashTable};

use super::codec::{load, ReadState, ReadStates};
use super::{KeyValueStore, StoreError};
use crate::model::{StateKey, StateKeyRef};

#[derive(Debug)]
pub struct CacheEntry {
    key: StateKey,
    pub state: ReadState,
    dirty: bool,
    touched_epoch: u64,
}

pub struct RecordCache {
    /// Boxed entries holding their own keys: a slot of the table is one pointer (8 bytes),
    /// however large the ids, and a lookup touches the slot and the one entry it compares.
    entries: HashTable<Box<CacheEntry>>,
    hasher: DefaultHashBuilder,
    dirty: Vec<StateKey>,
    capacity: usize,
    epoch: u64,
    // Scratch buffers reused across batches.
    miss_keys: Vec<StateKey>,
    miss_seen: HashSet<StateKey>,
}

impl std::fmt::Debug for RecordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordCache")
            .field("entries", &self.entries.len())
            .field("dirty", &self.dirty.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl RecordCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            dirty: Vec::new(),
            capacity: capacity.max(1),
            epoch: 0,
            miss_keys: Vec::new(),
            miss_seen: HashSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Change the capacity; the cache shrinks to it at the next flush.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    #[inline]
    fn find(&self, key: StateKeyRef<'_>) -> Option<&CacheEntry> {
        let h = self.hasher.hash_one(key);
        self.entries
            .find(h, |e| key.equivalent(&e.key))
            .map(|e| &**e)
    }

    #[inline]
    fn find_mut(&mut self, key: StateKeyRef<'_>) -> Option<&mut CacheEntry> {
        let h = self.hasher.hash_one(key);
        self.entries
            .find_mut(h, |e| key.equivalent(&e.key))
            .map(|e| &mut **e)
    }

    /// Insert or replace the entry of `key`, clean.
    fn put(&mut self, key: StateKey, state: ReadState) {
        let entry = CacheEntry {
            key,
            state,
            dirty: false,
            touched_epoch: self.epoch,
        };
        let hasher = &self.hasher;
        let h = hasher.hash_one(entry.key.as_ref());
        match self.entries.entry(
            h,
            |e| e.key == entry.key,
            |e| hasher.hash_one(e.key.as_ref()),
        ) {
            Entry::Occupied(mut o) => **o.get_mut() = entry,
            Entry::Vacant(v) => {
                v.insert(Box::new(entry));
            }
        }
    }

    /// Make sure every key in `keys` has an entry, loading misses from `store` with one
    /// `multi_get`. Keys absent from the store get a fresh default state. Returns the number
    /// of misses loaded.
    pub fn ensure_loaded(
        &mut self,
        keys: impl Iterator<Item = StateKey>,
        store: &dyn KeyValueStore,
    ) -> Result<usize, StoreError> {
        self.miss_keys.clear();
        self.miss_seen.clear();
        for k in keys {
            if self.find(k.as_ref()).is_none() && !self.miss_seen.contains(&k) {
                self.miss_seen.insert(k.clone());
                self.miss_keys.push(k);
            }
        }
        if self.miss_keys.is_empty() {
            return Ok(0);
        }
        let values = load::<ReadStates>(store, &self.miss_keys)?;
        let keys = std::mem::take(&mut self.miss_keys);
        for (k, v) in keys.iter().zip(values) {
            self.put(k.clone(), v.unwrap_or_default());
        }
        let n = keys.len();
        self.miss_keys = keys;
        Ok(n)
    }

    /// Insert a state loaded elsewhere (e.g. pending keys at start-up), clean.
    pub fn insert_clean(&mut self, key: StateKey, state: ReadState) {
        self.put(key, state);
    }

    pub fn get(&self, key: &StateKey) -> Option<&ReadState> {
        self.find(key.as_ref()).map(|e| &e.state)
    }

    /// Mutable access to a loaded key, marking it dirty. `None` if not loaded.
    pub fn get_mut_dirty(&mut self, key: &StateKey) -> Option<&mut ReadState> {
        self.get_mut_dirty_ref(key.as_ref())
    }

    /// [`get_mut_dirty`](Self::get_mut_dirty) by a borrowed key: nothing is cloned unless
    /// the entry becomes dirty now.
    #[inline]
    pub fn get_mut_dirty_ref(&mut self, key: StateKeyRef<'_>) -> Option<&mut ReadState> {
        let epoch = self.epoch;
        let h = self.hasher.hash_one(key);
        let e = self.entries.find_mut(h, |e| key.equivalent(&e.key))?;
        e.touched_epoch = epoch;
        if !e.dirty {
            e.dirty = true;
            self.dirty.push(e.key.clone());
        }
        Some(&mut e.state)
    }

    /// Mutable access without marking dirty (the flush itself writes the entry).
    pub fn get_mut_clean(&mut self, key: &StateKey) -> Option<&mut ReadState> {
        self.find_mut(key.as_ref()).map(|e| &mut e.state)
    }

    /// Take the dirty keys (in the order they first became dirty) and mark them clean.
    pub fn take_dirty(&mut self) -> Vec<StateKey> {
        let dirty = std::mem::take(&mut self.dirty);
        for k in &dirty {
            if let Some(e) = self.find_mut(k.as_ref()) {
                e.dirty = false;
            }
        }
        dirty
    }

    /// Forget everything (a task that must be rebuilt from its store after a failed flush).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.dirty.clear();
    }

    /// Called after a flush: start a new epoch and shrink to capacity, never dropping a
    /// dirty or pinned key.
    pub fn end_flush(&mut self, pinned: impl Fn(&StateKey) -> bool) {
        let current = self.epoch;
        self.epoch += 1;
        if self.entries.len() <= self.capacity {
            return;
        }
        // Down to capacity: first keys not touched in the latest interval, then any clean
        // one; never a dirty or pinned key.
        let mut excess = self.entries.len() - self.capacity;
        for only_untouched in [true, false] {
            if excess == 0 {
                break;
            }
            self.entries.retain(|e| {
                if excess == 0
                    || e.dirty
                    || pinned(&e.key)
                    || (only_untouched && e.touched_epoch == current)
                {
                    return true;
                }
                excess -= 1;
                false
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ConversationId, ReaderId};
    use crate::state::memory::InMemoryStore;
    use crate::state::{StoreBatch, StoreKey};

    fn k(c: i64) -> StateKey {
        StateKey {
            conversation: ConversationId::from(c),
            reader: ReaderId::from(1),
        }
    }

    #[test]
    fn loads_misses_in_one_multi_get_and_tracks_dirty() {
        let mut store = InMemoryStore::new("s".into());
        let st = ReadState {
            last_read_seq: 42,
            ..Default::default()
        };
        let mut b = StoreBatch::default();
        b.put(StoreKey::state(&k(1)).as_bytes(), st.to_bytes());
        store.write(b).unwrap();

        let mut c = RecordCache::new(10);
        let loaded = c
            .ensure_loaded([k(1), k(2), k(1)].into_iter(), &store)
            .unwrap();
        assert_eq!(loaded, 2);
        assert_eq!(c.get(&k(1)).unwrap().last_read_seq, 42);
        assert_eq!(c.get(&k(2)).unwrap().last_read_seq, -1);
        assert_eq!(c.ensure_loaded([k(1)].into_iter(), &store).unwrap(), 0);

        c.get_mut_dirty(&k(2)).unwrap().last_read_seq = 5;
        c.get_mut_dirty(&k(2)).unwrap();
        assert_eq!(c.take_dirty(), vec![k(2)]);
        assert_eq!(c.dirty_len(), 0);
    }

    #[test]
    fn a_smaller_share_applies_at_the_next_flush() {
        let store = InMemoryStore::new("s".into());
        let mut c = RecordCache::new(10);
        c.ensure_loaded((0..8).map(k), &store).unwrap();
        c.end_flush(|_| false);
        assert_eq!(c.len(), 8);
        c.set_capacity(3);
        c.ensure_loaded([k(9)].into_iter(), &store).unwrap();
        c.get_mut_dirty(&k(9)).unwrap();
        c.take_dirty();
        c.end_flush(|_| false);
        assert_eq!(c.len(), 3);
        assert!(c.get(&k(9)).is_some(), "the key touched last stays");
    }

    #[test]
    fn eviction_keeps_pinned_and_recent() {
        let store = InMemoryStore::new("s".into());
        let mut c = RecordCache::new(2);
        let mut pinned = hashbrown::HashMap::new();
        pinned.insert(k(0), 0);
        c.ensure_loaded((0..5).map(k), &store).unwrap();
        c.end_flush(|k| pinned.contains_key(k));
        assert_eq!(c.len(), 2, "shrunk to capacity");
        assert!(c.get(&k(0)).is_some(), "pinned survives");
        // Next interval touches key 4 only: the untouched ones go first.
        c.ensure_loaded([k(4)].into_iter(), &store).unwrap();
        c.get_mut_dirty(&k(4)).unwrap();
        c.take_dirty();
        c.end_flush(|k| pinned.contains_key(k));
        assert_eq!(c.len(), 2);
        assert!(c.get(&k(0)).is_some());
        assert!(c.get(&k(4)).is_some());
    }
}
