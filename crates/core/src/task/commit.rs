//! The commit protocol of `ARCHITECTURE.md`, written once, over a [`CommitLog`]: the
//! runtime's log is Kafka (its record collector and the group consumer), the test drivers'
//! is [`MemoryLog`] (beside the trait). For a set of tasks:
//!
//! 1. prepare each task's flush (memory only);
//! 2. send the outputs and the dead letters (at-least-once: and wait for their
//!    acknowledgements, so that no changelog record is ahead of an output);
//! 3. send each store's changelog records;
//! 4. complete: at-least-once waits for every acknowledgement, writes each store batch
//!    with its checkpoint (the offset after its changelog records just acknowledged), then
//!    commits the source offsets; exactly_once_v2 commits one transaction holding the
//!    records and the offsets, then writes the store batches, so that a store is never
//!    ahead of what its changelog committed.
//!
//! Step 4 is the only place where the two guarantees differ. A completion the log refuses
//! (offsets refused by the group, a transaction aborted, a fenced producer) is the log's
//! [`CommitLog::Refusal`], returned for the caller to act on; the stores are then not
//! written (exactly_once_v2) or already are (at-least-once: replay marks make the replay
//! harmless).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::processor::{FlushOutput, ProcessorError, SinkId};
use crate::task::{DeadLetter, StreamTask};
use crate::topology::ProcessingGuarantee;

/// Where the commit protocol's records go, and how it completes.
pub trait CommitLog {
    /// A failure: the records or the stores may not be durable (the caller resets the
    /// tasks to their stores).
    type Error: From<ProcessorError>;
    /// Why a completion did not commit, when nothing failed.
    type Refusal;

    /// Step 2: an output record of task `partition` for sink node `sink`.
    fn send_output(&mut self, partition: i32, sink: SinkId, key: &[u8], value: &[u8]);
    /// Step 2: a dead letter.
    fn send_dead_letter(&mut self, letter: &DeadLetter);
    /// Step 3: a changelog record of store `store` of task `partition` (`None`: a
    /// tombstone).
    fn send_changelog(&mut self, store: usize, partition: i32, key: &[u8], value: Option<&[u8]>);
    /// Wait until every record sent is acknowledged; the first failure since the last wait.
    fn flush(&mut self) -> Result<(), Self::Error>;
    /// Forget the changelog offsets acknowledged so far.
    fn clear_changelog_offsets(&mut self);
    /// The highest acknowledged changelog offset per (store, partition) since the last
    /// clear.
    fn take_changelog_offsets(&mut self) -> HashMap<(usize, i32), i64>;
    /// Step 4 under at-least-once, last: commit the source offsets.
    fn commit_offsets(&mut self) -> Result<Result<(), Self::Refusal>, Self::Error>;
    /// Step 4 under exactly_once_v2, first: commit the transaction with the source offsets.
    fn commit_transaction(&mut self) -> Result<Result<(), Self::Refusal>, Self::Error>;
}

/// What a commit did, when nothing failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReport<R> {
    /// Changelog records sent (step 3).
    pub changelog_records: u64,
    /// Tasks flushed (step 1).
    pub tasks: usize,
    /// Why the log refused the completion (`None`: committed).
    pub refused: Option<R>,
}

/// The commit protocol for `tasks` (task partition, task), with `dead_letters` (taken from
/// the tasks' processing since the last commit). `Err`: a record or a store could not be
/// made durable.
pub fn commit<L: CommitLog>(
    log: &mut L,
    guarantee: ProcessingGuarantee,
    tasks: &mut [(i32, &mut StreamTask)],
    dead_letters: &[DeadLetter],
    now_ms: i64,
) -> Result<CommitReport<L::Refusal>, L::Error> {
    let flushed = prepare_all(tasks, now_ms);
    let mut report = CommitReport {
        changelog_records: 0,
        tasks: flushed.len(),
        refused: None,
    };
    for (p, out) in &flushed {
        for (sink, key, value) in out.outputs.iter() {
            log.send_output(*p, sink, key, value);
        }
    }
    dead_letters.iter().for_each(|d| log.send_dead_letter(d));
    let eos = guarantee == ProcessingGuarantee::ExactlyOnceV2;
    if !eos {
        // Outputs (and the records forwarded since the last commit) before changelog.
        log.flush()?;
    }
    log.clear_changelog_offsets();
    report.changelog_records = send_changelog(log, &flushed);
    let done = match guarantee {
        ProcessingGuarantee::AtLeastOnce => {
            log.flush()?;
            store_all(log, tasks, flushed)?;
            log.commit_offsets()?
        }
        ProcessingGuarantee::ExactlyOnceV2 => match log.commit_transaction()? {
            Ok(()) => store_all(log, tasks, flushed).map(Ok)?,
            refused => refused,
        },
    };
    report.refused = done.err();
    Ok(report)
}

/// Step 1 for every task (memory only).
fn prepare_all(tasks: &mut [(i32, &mut StreamTask)], now_ms: i64) -> Vec<(i32, FlushOutput)> {
    let mut flushed = Vec::with_capacity(tasks.len());
    for (p, task) in tasks.iter_mut() {
        let started = Instant::now();
        let out = task.prepare_flush(now_ms);
        metrics::histogram!("readstate_flush_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        flushed.push((*p, out));
    }
    flushed
}

/// Step 3: each store's changelog records (to partition p of its changelog for task p).
fn send_changelog<L: CommitLog>(log: &mut L, flushed: &[(i32, FlushOutput)]) -> u64 {
    let mut sent = 0;
    for (p, out) in flushed {
        for (store, part) in out.stores.iter().enumerate() {
            for (k, v) in part.changelog() {
                log.send_changelog(store, *p, k, v);
            }
            sent += part.changelog_len() as u64;
        }
    }
    metrics::counter!("readstate_changelog_records_written_total").increment(sent);
    sent
}

/// The store batches, each with its checkpoint (the offset after the records just
/// acknowledged on its changelog).
fn store_all<L: CommitLog>(
    log: &mut L,
    tasks: &mut [(i32, &mut StreamTask)],
    flushed: Vec<(i32, FlushOutput)>,
) -> Result<(), L::Error> {
    let highs = log.take_changelog_offsets();
    for ((p, mut out), (tp, task)) in flushed.into_iter().zip(tasks.iter_mut()) {
        debug_assert_eq!(p, *tp, "flushed in the tasks' order");
        let checkpoints: Vec<Option<i64>> = (0..out.stores.len())
            .map(|i| highs.get(&(i, p)).map(|o| o + 1))
            .collect();
        task.commit_flush(out.take_batches(), &checkpoints)?;
    }
    Ok(())
}

/// A changelog record kept in memory (`None`: a tombstone).
pub type ChangelogRecord = (Vec<u8>, Option<Vec<u8>>);

/// Where [`MemoryLog`] fails, to simulate a crash at that point of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the outputs were sent and acknowledged (step 2), before any changelog record
    /// or store write.
    AfterOutputs,
    /// After the stores were written (step 4), before the source offsets were committed.
    AfterStores,
}

/// Why [`MemoryLog`] did not commit.
#[derive(Debug, thiserror::Error)]
pub enum MemoryLogError {
    #[error("crashed {0:?}")]
    Crashed(CrashPoint),
    #[error(transparent)]
    Task(#[from] ProcessorError),
}

/// The test drivers' commit log: every record acknowledged at once; outputs and dead
/// letters kept until taken; each (store, partition) changelog in memory, a record's
/// offset its position; a commit of the offsets counted. A crash can be injected at a
/// [`CrashPoint`] of the next commit.
#[derive(Debug, Default)]
pub struct MemoryLog {
    outputs: Vec<(i32, SinkId, Vec<u8>, Vec<u8>)>,
    dead_letters: Vec<DeadLetter>,
    changelogs: BTreeMap<(usize, i32), Vec<ChangelogRecord>>,
    acknowledged: HashMap<(usize, i32), i64>,
    crash_at: Option<CrashPoint>,
    /// Changelog records sent since the last flush (acknowledged at the flush).
    unflushed: Vec<(usize, i32)>,
    commits: u64,
}

impl MemoryLog {
    /// Fail the next commit at `point` (once).
    pub fn crash_at(&mut self, point: CrashPoint) {
        self.crash_at = Some(point);
    }

    /// Take the outputs (task partition, sink, key, value) sent so far.
    pub fn take_outputs(&mut self) -> Vec<(i32, SinkId, Vec<u8>, Vec<u8>)> {
        std::mem::take(&mut self.outputs)
    }

    pub fn dead_letters(&self) -> &[DeadLetter] {
        &self.dead_letters
    }

    /// The changelog of store `store` for task `partition`.
    pub fn changelog(&self, store: usize, partition: i32) -> &[ChangelogRecord] {
        self.changelogs
            .get(&(store, partition))
            .map_or(&[], Vec::as_slice)
    }

    /// Offset commits completed.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    fn crashes_at(&mut self, point: CrashPoint) -> Result<(), MemoryLogError> {
        match self.crash_at == Some(point) {
            true => {
                self.crash_at = None;
                Err(MemoryLogError::Crashed(point))
            }
            false => Ok(()),
        }
    }
}

impl CommitLog for MemoryLog {
    type Error = MemoryLogError;
    type Refusal = std::convert::Infallible;

    fn send_output(&mut self, partition: i32, sink: SinkId, key: &[u8], value: &[u8]) {
        (self.outputs).push((partition, sink, key.to_vec(), value.to_vec()));
    }

    fn send_dead_letter(&mut self, letter: &DeadLetter) {
        self.dead_letters.push(letter.clone());
    }

    fn send_changelog(&mut self, store: usize, partition: i32, key: &[u8], value: Option<&[u8]>) {
        let log = self.changelogs.entry((store, partition)).or_default();
        log.push((key.to_vec(), value.map(<[u8]>::to_vec)));
        self.unflushed.push((store, partition));
    }

    fn flush(&mut self) -> Result<(), MemoryLogError> {
        if self.unflushed.is_empty() {
            // The first flush of a commit: the outputs are acknowledged.
            self.crashes_at(CrashPoint::AfterOutputs)?;
        }
        for (store, p) in std::mem::take(&mut self.unflushed) {
            let end = self.changelogs[&(store, p)].len() as i64;
            self.acknowledged.insert((store, p), end - 1);
        }
        Ok(())
    }

    fn clear_changelog_offsets(&mut self) {
        self.acknowledged.clear();
    }

    fn take_changelog_offsets(&mut self) -> HashMap<(usize, i32), i64> {
        std::mem::take(&mut self.acknowledged)
    }

    fn commit_offsets(&mut self) -> Result<Result<(), Self::Refusal>, MemoryLogError> {
        self.crashes_at(CrashPoint::AfterStores)?;
        self.commits += 1;
        Ok(Ok(()))
    }

    fn commit_transaction(&mut self) -> Result<Result<(), Self::Refusal>, MemoryLogError> {
        self.flush()?;
        self.commits += 1;
        Ok(Ok(()))
    }
}
