//! The read-state node's store restorers (supplied through
//! `ProcessorSupplier::restorer`): the generic restore path knows no key layout; these do.

use hashbrown::HashSet;

use super::groups::GroupCodec;
use super::resolve::WaitingRead;
use crate::model::StateKey;
use crate::state::codec::{EntryCodec, Heads, ReadState, ReadStates, StoreKey, TAG_PENDING};
use crate::state::restore::{restore_checked, StoreRestorer};
use crate::state::{put_checkpoint, KeyValueStore, StoreBatch, StoreError};

impl StoreRestorer for ReadStateRestorer {
    fn restore<'a>(
        &mut self,
        store: &mut dyn KeyValueStore,
        records: &mut dyn Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        next_offset: i64,
    ) -> Result<usize, StoreError> {
        self.apply(store, records, next_offset)
    }
}

/// The read-state store's restorer: applies its changelog records batch by batch, keeping
/// its pending-emit index (a key has an entry exactly when its value holds an unemitted
/// advance; the index is derived, never logged) and its checkpoint consistent with the
/// values.
pub struct ReadStateRestorer {
    /// Keys of the pending index that may exist in the store: `None` when the store had
    /// entries before the restore (then every value without one needs a delete), else the
    /// keys this restore gave an entry (only those can need a delete; a new store skips
    /// one write per record).
    pending: Option<HashSet<StateKey>>,
}

impl ReadStateRestorer {
    pub fn new(store: &dyn KeyValueStore) -> Result<Self, StoreError> {
        let had_pending = !StoreKey::scan_tag(store, TAG_PENDING)?.is_empty();
        Ok(Self {
            pending: (!had_pending).then(HashSet::new),
        })
    }

    /// Apply a run of changelog records (key, value; `None` is a tombstone) and record
    /// `next_offset` as the store's checkpoint, in one atomic batch. Values are checked
    /// but not decoded. Returns records applied.
    pub fn apply<'a>(
        &mut self,
        store: &mut dyn KeyValueStore,
        records: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        next_offset: i64,
    ) -> Result<usize, StoreError> {
        // Sized from the records' count where known (changelog values are ~60 bytes, and a
        // record may add a pending-index entry): growing copies the whole batch.
        let hint = records.size_hint().0;
        let mut batch = StoreBatch::with_capacity(hint * 2 + 1, hint * 96);
        let mut added: Vec<StateKey> = Vec::new();
        let mut n = 0;
        for (key, value) in records {
            let corrupt = |reason: String| StoreError::Corrupt {
                store: store.name().clone(),
                key: key.to_vec(),
                reason,
            };
            let Some(k) = ReadStates::decode_key(key) else {
                return Err(corrupt(match StoreKey::decode(key) {
                    None => "changelog key is not a read-state store key".into(),
                    Some((tag, _)) => format!("changelog key has tag {tag:#x}"),
                }));
            };
            let pending = StoreKey::pending(&k);
            let unemitted = match value {
                None => {
                    batch.delete(key);
                    false
                }
                Some(v) => {
                    let unemitted = ReadState::peek_unemitted_advance(v).map_err(corrupt)?;
                    batch.put(key, v);
                    unemitted
                }
            };
            if unemitted {
                batch.put(pending.as_bytes(), b"");
                added.push(k);
            } else if self.pending.as_ref().is_none_or(|p| p.contains(&k)) {
                batch.delete(pending.as_bytes());
            }
            n += 1;
        }
        put_checkpoint(&mut batch, next_offset);
        store.write(batch)?;
        // Only once the batch is written: a failed batch leaves nothing behind.
        if let Some(p) = &mut self.pending {
            p.extend(added);
        }
        Ok(n)
    }
}

/// The conversation-heads store's restorer: every value is checked to decode as a head
/// before it is written (a corrupt changelog fails the restore, naming the key).
#[derive(Debug, Default)]
pub struct HeadsRestorer;

impl StoreRestorer for HeadsRestorer {
    fn restore<'a>(
        &mut self,
        store: &mut dyn KeyValueStore,
        records: &mut dyn Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        next_offset: i64,
    ) -> Result<usize, StoreError> {
        restore_checked(store, records, next_offset, |key, value| {
            if let Some(k) = WaitingRead::decode_key(key) {
                return value.map_or(Ok(()), |v| WaitingRead::decode(k, v).map(|_| ()));
            }
            if GroupCodec::decode_key(key).is_some() {
                return value.map_or(Ok(()), |v| GroupCodec::decode_value(v).map(|_| ()));
            }
            if Heads::decode_key(key).is_none() {
                return Err(
                    "changelog key is not a conversation-head, group or waiting-read key".into(),
                );
            }
            value.map_or(Ok(()), |v| Heads::decode_value(v).map(|_| ()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ConversationId, ReaderId};
    use crate::model::StateKey;
    use crate::state::memory::InMemoryStore;
    use crate::state::read_checkpoint;

    #[test]
    fn restores_values_pending_index_and_checkpoint() {
        let k = StateKey {
            conversation: ConversationId::from(1),
            reader: ReaderId::from(2),
        };
        let key = StoreKey::state(&k);
        let held = ReadState {
            version: 2,
            emitted_version: 1,
            ..Default::default()
        }
        .to_bytes();
        let done = ReadState {
            version: 2,
            emitted_version: 2,
            ..Default::default()
        }
        .to_bytes();
        let pending = |s: &InMemoryStore| s.get(StoreKey::pending(&k).as_bytes()).unwrap();
        let held_rec = || [(key.as_bytes(), Some(&held[..]))].into_iter();
        let done_rec = || [(key.as_bytes(), Some(&done[..]))].into_iter();

        // A new store: the restorer remembers the entries it made, and deletes only those.
        let mut s = InMemoryStore::new("s".into());
        let mut r = ReadStateRestorer::new(&s).unwrap();
        r.apply(&mut s, held_rec(), 1).unwrap();
        assert!(pending(&s).is_some());
        r.apply(&mut s, done_rec(), 2).unwrap();
        assert!(pending(&s).is_none());
        assert_eq!(read_checkpoint(&s).unwrap(), Some(2));

        // A store that had pending entries before the restore: every value without an
        // unemitted advance deletes its entry.
        let mut s = InMemoryStore::new("s".into());
        ReadStateRestorer::new(&s)
            .unwrap()
            .apply(&mut s, held_rec(), 1)
            .unwrap();
        let mut r = ReadStateRestorer::new(&s).unwrap();
        r.apply(&mut s, done_rec(), 2).unwrap();
        assert!(pending(&s).is_none());
        assert_eq!(read_checkpoint(&s).unwrap(), Some(2));

        let bad = [(&b"bad"[..], Some(&done[..]))].into_iter();
        assert!(r.apply(&mut s, bad, 3).is_err());
        assert_eq!(
            read_checkpoint(&s).unwrap(),
            Some(2),
            "a failed batch changes nothing"
        );
    }
}
