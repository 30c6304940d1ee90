//! Applying changelog records to a store (restore). [`StoreRestorer`] is the seam: the
//! runtime's changelog reader knows no store's entries, and this module knows no store's
//! key layout either; a processor node supplies the restorer of each of its stores.
//! [`RawRestorer`] writes records as they are (puts, tombstones as deletes), the default;
//! a store with a derived index restores it in its own restorer (the read-state store's is
//! `processor::restorers::ReadStateRestorer`). Each batch is written atomically with the
//! store's checkpoint.

use super::{put_checkpoint, KeyValueStore, StoreBatch, StoreError};

/// Applies a store's changelog records, batch by batch.
pub trait StoreRestorer: Send {
    /// Apply a run of changelog records (key, value; `None` is a tombstone) and record
    /// `next_offset` as the store's checkpoint, in one atomic batch. Returns records
    /// applied.
    fn restore<'a>(
        &mut self,
        store: &mut dyn KeyValueStore,
        records: &mut dyn Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        next_offset: i64,
    ) -> Result<usize, StoreError>;
}

/// Writes changelog records as they are.
#[derive(Debug, Default)]
pub struct RawRestorer;

impl StoreRestorer for RawRestorer {
    fn restore<'a>(
        &mut self,
        store: &mut dyn KeyValueStore,
        records: &mut dyn Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
        next_offset: i64,
    ) -> Result<usize, StoreError> {
        restore_checked(store, records, next_offset, |_, _| Ok(()))
    }
}

/// Write changelog records as they are, each first passing `check` (an `Err` names what is
/// wrong with the record; nothing of the batch is written then), and the checkpoint, in one
/// atomic batch. Returns records applied.
pub fn restore_checked<'a>(
    store: &mut dyn KeyValueStore,
    records: &mut dyn Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    next_offset: i64,
    check: impl Fn(&[u8], Option<&[u8]>) -> Result<(), String>,
) -> Result<usize, StoreError> {
    let mut batch = StoreBatch::default();
    let mut n = 0;
    for (key, value) in records {
        check(key, value).map_err(|reason| StoreError::Corrupt {
            store: store.name().clone(),
            key: key.to_vec(),
            reason,
        })?;
        match value {
            Some(v) => batch.put(key, v),
            None => batch.delete(key),
        }
        n += 1;
    }
    put_checkpoint(&mut batch, next_offset);
    store.write(batch)?;
    Ok(n)
}
