//! A due-time queue, as Kafka Streams' `PunctuationQueue`: work scheduled for a time (here,
//! advances held back by the minimum emit interval) is found by popping what is due, not by
//! scanning everything scheduled at every flush.

use std::collections::BTreeSet;
use std::hash::Hash;

use hashbrown::HashMap;

/// Keys, each due at one time; `due(now)` lists those due, earliest first.
#[derive(Debug, Clone)]
pub struct DueQueue<K> {
    by_due: BTreeSet<(i64, K)>,
    due_of: HashMap<K, i64>,
}

impl<K> Default for DueQueue<K> {
    fn default() -> Self {
        Self {
            by_due: BTreeSet::new(),
            due_of: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Clone> DueQueue<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedule `key` at `due` (moving it if scheduled already); true if it was not.
    pub fn insert(&mut self, key: K, due: i64) -> bool {
        match self.due_of.insert(key.clone(), due) {
            Some(old) => {
                let old = self.by_due.take(&(old, key)).expect("scheduled");
                self.by_due.insert((due, old.1));
                false
            }
            None => {
                self.by_due.insert((due, key));
                true
            }
        }
    }

    /// Unschedule `key`; true if it was scheduled.
    pub fn remove(&mut self, key: &K) -> bool {
        match self.due_of.remove(key) {
            Some(due) => self.by_due.remove(&(due, key.clone())),
            None => false,
        }
    }

    /// The keys due at or before `now`, earliest first (they stay scheduled).
    pub fn due(&self, now: i64) -> Vec<K> {
        self.by_due
            .iter()
            .take_while(|(d, _)| *d <= now)
            .map(|(_, k)| k.clone())
            .collect()
    }

    /// The key due first.
    pub fn first(&self) -> Option<&K> {
        self.by_due.first().map(|(_, k)| k)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.due_of.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.due_of.keys()
    }

    pub fn len(&self) -> usize {
        self.due_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due_of.is_empty()
    }

    pub fn clear(&mut self) {
        self.by_due.clear();
        self.due_of.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against a plain map scanned in full (what the queue replaces).
        #[test]
        fn due_keys_equal_a_full_scan(ops in proptest::collection::vec((0u8..3, 0u32..20, 0i64..100), 0..200), now in 0i64..100) {
            let mut q = DueQueue::new();
            let mut m: std::collections::HashMap<u32, i64> = Default::default();
            for (op, k, d) in ops {
                match op {
                    0 | 1 => {
                        prop_assert_eq!(q.insert(k, d), m.insert(k, d).is_none());
                    }
                    _ => {
                        prop_assert_eq!(q.remove(&k), m.remove(&k).is_some());
                    }
                }
            }
            let mut want: Vec<(i64, u32)> = m.iter().filter(|(_, d)| **d <= now).map(|(k, d)| (*d, *k)).collect();
            want.sort();
            let want: Vec<u32> = want.into_iter().map(|(_, k)| k).collect();
            prop_assert_eq!(q.due(now), want);
            prop_assert_eq!(q.len(), m.len());
        }
    }
}
