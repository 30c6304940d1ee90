//! Applying changelog records to a store (restore), keeping the pending-emit index and the
//! checkpoint consistent with the values.

use super::codec::{ReadState, StoreKey, TAG_STATE};
use super::{put_checkpoint, KeyValueStore, StoreBatch, StoreError};

/// Apply a run of changelog records (key, value; `None` is a tombstone) and record
/// `next_offset` as the store's checkpoint, in one atomic batch. Returns records applied.
pub fn apply_changelog<'a>(
    store: &mut dyn KeyValueStore,
    records: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    next_offset: i64,
) -> Result<usize, StoreError> {
    let mut batch = StoreBatch::default();
    let mut n = 0;
    for (key, value) in records {
        let corrupt = |reason: String| StoreError::Corrupt {
            store: store.name().clone(),
            key: key.to_vec(),
            reason,
        };
        let (tag, k) = StoreKey::decode(key)
            .ok_or_else(|| corrupt("changelog key is not a 17-byte store key".into()))?;
        if tag != TAG_STATE {
            return Err(corrupt(format!("changelog key has tag {tag:#x}")));
        }
        let pending = StoreKey::pending(k);
        match value {
            None => {
                batch.delete(key.to_vec());
                batch.delete(pending.as_bytes().to_vec());
            }
            Some(v) => {
                let state = ReadState::decode(v).map_err(corrupt)?;
                batch.put(key.to_vec(), v.to_vec());
                if state.has_unemitted_advance() {
                    batch.put(pending.as_bytes().to_vec(), Vec::new());
                } else {
                    batch.delete(pending.as_bytes().to_vec());
                }
            }
        }
        n += 1;
    }
    put_checkpoint(&mut batch, next_offset);
    store.write(batch)?;
    Ok(n)
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
            conversation: ConversationId(1),
            reader: ReaderId(2),
        };
        let key = StoreKey::state(k);
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
        let mut s = InMemoryStore::new("s".into());
        apply_changelog(&mut s, [(key.as_bytes(), Some(&held[..]))].into_iter(), 1).unwrap();
        assert!(s.get(StoreKey::pending(k).as_bytes()).unwrap().is_some());
        apply_changelog(&mut s, [(key.as_bytes(), Some(&done[..]))].into_iter(), 2).unwrap();
        assert!(s.get(StoreKey::pending(k).as_bytes()).unwrap().is_none());
        assert_eq!(read_checkpoint(&s).unwrap(), Some(2));
        assert!(apply_changelog(&mut s, [(&b"bad"[..], Some(&done[..]))].into_iter(), 3).is_err());
        assert_eq!(
            read_checkpoint(&s).unwrap(),
            Some(2),
            "a failed batch changes nothing"
        );
    }
}
