//! The processing core through the TopologyTestDriver, against an independent oracle.

use std::time::Duration;

use proptest::prelude::*;
use readstate::model::ReadEvent;
use readstate_testing::fixtures::*;
use readstate_testing::{DriverStores, TopologyTestDriver};

/// Pipe events into partitions by conversation, with consecutive offsets per partition.
fn pipe_all(d: &mut TopologyTestDriver, events: &[ReadEvent], parts: i32, next: &mut [i64]) {
    for e in events {
        let p = partition_of(&e.conversation_id, parts);
        let off = next[p as usize];
        next[p as usize] += 1;
        d.pipe_event(p, off, e);
    }
}

fn assert_matches_oracle(d: &TopologyTestDriver, events: &[ReadEvent]) {
    assert_states_match(&oracle(events), |k| d.state(k));
}

#[test]
fn reordered_events_keep_the_max_and_emit_once_per_flush() {
    let mut d = TopologyTestDriver::new(topology("0s"));
    let seqs = [5, 3, 9, 1, 7, 9, 2];
    for (i, s) in seqs.iter().enumerate() {
        d.pipe_event(0, i as i64, &event(1, 2, *s, "phone"));
    }
    d.advance_wall_clock(Duration::from_secs(1));
    let out = d.read_output();
    assert_eq!(out.len(), 1, "one coalesced update for one key per flush");
    let u = &out[0];
    assert_eq!(u.last_read_seq, 9);
    assert_eq!(u.events_folded, seqs.len() as i64);
    assert_eq!(u.stale_events, 5);
    assert_eq!(u.version, 2, "advances: 5, 9");
    assert_eq!(u.message_id.as_deref(), Some("m-1-9"));
    // A later stale event changes counts but emits nothing.
    d.pipe_event(0, 7, &event(1, 2, 4, "phone"));
    d.advance_wall_clock(Duration::from_secs(1));
    assert!(d.read_output().is_empty());
    assert_eq!(d.state(&key(1, 2)).unwrap().stale_total, 6);
}

#[test]
fn duplicates_are_harmless() {
    let mut d = TopologyTestDriver::new(topology("0s"));
    for i in 0..10 {
        d.pipe_event(0, i, &event(1, 2, 42, "phone"));
    }
    d.flush();
    let out = d.read_output();
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].last_read_seq, out[0].version, out[0].stale_events),
        (42, 1, 9)
    );
}

#[test]
fn multi_device_pointer_is_per_user_and_carries_the_device_of_the_max() {
    let mut d = TopologyTestDriver::new(topology("0s"));
    d.pipe_event(0, 0, &event(1, 2, 10, "phone"));
    d.pipe_event(0, 1, &event(1, 2, 12, "laptop"));
    d.pipe_event(0, 2, &event(1, 2, 11, "tablet"));
    d.flush();
    let out = d.read_output();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].last_read_seq, 12);
    assert_eq!(out[0].device_id.as_deref(), Some("laptop"));
    // Another reader of the same conversation is a different key.
    d.pipe_event(0, 3, &event(1, 3, 1, "phone"));
    d.flush();
    let out = d.read_output();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].reader_id.as_int(), Some(3));
}

#[test]
fn stale_only_flush_emits_nothing_and_counts() {
    let mut d = TopologyTestDriver::new(topology("0s"));
    d.pipe_event(0, 0, &event(1, 2, 10, "a"));
    d.flush();
    assert_eq!(d.read_output().len(), 1);
    for i in 1..=5 {
        d.pipe_event(0, i, &event(1, 2, 10 - i, "a"));
    }
    d.flush();
    assert!(d.read_output().is_empty());
    d.pipe_event(0, 6, &event(1, 2, 11, "a"));
    d.flush();
    let out = d.read_output();
    assert_eq!(
        (
            out[0].events_folded,
            out[0].stale_events,
            out[0].stale_total
        ),
        (6, 5, 5)
    );
}

#[test]
fn min_emit_interval_holds_back_and_never_loses_an_advance() {
    let mut d = TopologyTestDriver::new(topology("30s"));
    d.pipe_event(0, 0, &event(1, 2, 1, "a"));
    d.advance_wall_clock(Duration::from_secs(1));
    assert_eq!(d.read_output().len(), 1, "first advance goes out at once");
    for second in 0..29 {
        d.pipe_event(0, 1 + second, &event(1, 2, 2 + second, "a"));
        d.advance_wall_clock(Duration::from_secs(1));
        assert!(d.read_output().is_empty(), "held back at second {second}");
    }
    assert_eq!(d.pending_len(), 1);
    // No new event: the slot opens and the held-back advance goes out by itself.
    d.advance_wall_clock(Duration::from_secs(1));
    let out = d.read_output();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].last_read_seq, 30);
    assert_eq!(out[0].events_folded, 29);
    assert_eq!(d.pending_len(), 0);
}

#[test]
fn held_back_advance_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t = topology("30s");
    let mut d = TopologyTestDriver::with(
        t,
        DriverStores::RocksDb(dir.path().into()),
        std::sync::Arc::new(readstate::serde::LocalRegistry::new()),
    );
    d.pipe_event(0, 0, &event(1, 2, 1, "a"));
    d.flush();
    d.pipe_event(0, 1, &event(1, 2, 5, "a"));
    d.advance_wall_clock(Duration::from_secs(1));
    assert_eq!(d.read_output().len(), 1);
    assert_eq!(d.pending_len(), 1);
    d.restart();
    assert_eq!(d.pending_len(), 1, "pending index reloaded from RocksDB");
    d.advance_wall_clock(Duration::from_secs(30));
    let out = d.read_output();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].last_read_seq, out[0].version), (5, 2));
}

#[test]
fn replay_after_crash_keeps_counts_exact() {
    let events = workload(7, 60, 20);
    let parts = 3;
    let mut d = TopologyTestDriver::new(topology("0s"));
    // Assign offsets per partition once, as Kafka would.
    let mut by_part: Vec<Vec<(i64, ReadEvent)>> = vec![Vec::new(); parts as usize];
    for e in &events {
        let p = partition_of(&e.conversation_id, parts) as usize;
        let off = by_part[p].len() as i64;
        by_part[p].push((off, e.clone()));
    }
    let pipe_range = |d: &mut TopologyTestDriver, from: &[i64], to_frac: f64| {
        for (p, recs) in by_part.iter().enumerate() {
            let end = (recs.len() as f64 * to_frac) as usize;
            for (off, e) in &recs[from[p] as usize..end.max(from[p] as usize)] {
                d.pipe_event(p as i32, *off, e);
            }
        }
    };
    pipe_range(&mut d, &[0, 0, 0], 0.3);
    d.flush();
    let resume: Vec<i64> = (0..parts).map(|p| d.committed_offset(p)).collect();
    pipe_range(&mut d, &resume, 0.6);
    // Outputs reach Kafka, then the process dies before the store write and the commit.
    d.crash_after_output();
    let resume: Vec<i64> = (0..parts).map(|p| d.committed_offset(p)).collect();
    pipe_range(&mut d, &resume, 0.8);
    // Dies again, this time before any flush.
    d.crash();
    let resume: Vec<i64> = (0..parts).map(|p| d.committed_offset(p)).collect();
    pipe_range(&mut d, &resume, 1.0);
    d.flush();
    // Oracle over the events in the order each partition holds them.
    let ordered: Vec<ReadEvent> = by_part.iter().flatten().map(|(_, e)| e.clone()).collect();
    assert_matches_oracle(&d, &ordered);
    // Output: per key, versions never go backwards (duplicates of one version are allowed
    // after a crash) and the last update equals the oracle.
    let out = d.read_output();
    let mut last: std::collections::HashMap<_, readstate::model::ReceiptUpdate> =
        Default::default();
    for u in &out {
        if let Some(p) = last.get(&u.key()) {
            assert!(u.version >= p.version && u.last_read_seq >= p.last_read_seq);
            if u.version == p.version {
                assert_eq!(
                    u.last_read_seq, p.last_read_seq,
                    "same version, same pointer"
                );
            }
        }
        last.insert(u.key(), u.clone());
    }
    for (k, x) in oracle(&ordered) {
        assert_eq!(last[&k].last_read_seq, x.max_seq);
        assert_eq!(last[&k].version, x.advances);
    }
}

#[test]
fn rocksdb_store_reopened_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let events = workload(11, 90, 10);
    let parts = 2;
    let mk = || {
        TopologyTestDriver::with(
            topology("0s"),
            DriverStores::RocksDb(dir.path().into()),
            std::sync::Arc::new(readstate::serde::LocalRegistry::new()),
        )
    };
    let mut next = vec![0; parts as usize];
    {
        let mut d = mk();
        pipe_all(&mut d, &events[..events.len() / 2], parts, &mut next);
        d.flush();
    }
    // A brand-new driver (new process) over the same directory.
    let mut d = mk();
    pipe_all(&mut d, &events[events.len() / 2..], parts, &mut next);
    d.flush();
    let mut ordered = Vec::new();
    for p in 0..parts {
        ordered.extend(
            events
                .iter()
                .filter(|e| partition_of(&e.conversation_id, parts) == p)
                .cloned(),
        );
    }
    assert_matches_oracle(&d, &ordered);
    // All readers of one conversation are one prefix scan.
    let conv = events[0].conversation_id.clone();
    let p = partition_of(&conv, parts);
    let prefix = readstate::state::StoreKey::conversation_prefix(
        readstate::state::codec::TAG_STATE,
        &conv,
        readstate::ids::IdType::I64,
    );
    let rows = d.store(p).unwrap().scan_prefix(&prefix).unwrap();
    let expected = oracle(&ordered)
        .keys()
        .filter(|k| k.conversation == conv)
        .count();
    assert_eq!(rows.len(), expected);
}

#[test]
fn poison_pills_become_dead_letters_and_the_rest_is_processed() {
    let mut d = TopologyTestDriver::new(topology("0s"));
    d.pipe_event(0, 0, &event(1, 2, 3, "a"));
    d.pipe_raw(0, 1, Some(b"not avro at all"));
    d.pipe_raw(0, 2, None);
    d.pipe_raw(0, 3, Some(&[0, 0, 0, 0, 99, 1, 2]));
    let mut neg = event(1, 2, 0, "a");
    neg.message_seq = -5;
    d.pipe_event(0, 4, &neg);
    d.pipe_event(0, 5, &event(1, 2, 4, "a"));
    d.flush();
    let dl = d.dead_letters();
    let got: Vec<(i64, &str)> = dl.iter().map(|x| (x.offset, x.reason)).collect();
    assert_eq!(
        got,
        vec![
            (1, "not_wire_format"),
            (2, "empty_value"),
            (3, "unknown_schema"),
            (4, "invalid_event")
        ]
    );
    assert!(dl
        .iter()
        .all(|x| x.topic == "read-events" && x.partition == 0 && !x.error.is_empty()));
    assert_eq!(d.read_output()[0].last_read_seq, 4);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any permutation, with duplicates, of a random event set: pointer = max seq per key,
    /// and per key the emitted updates strictly increase.
    #[test]
    fn any_permutation_with_duplicates_converges(
        raw in proptest::collection::vec((0i64..4, 0i64..3, 0i64..50, 0usize..3), 1..120),
        dups in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
        perm_seed in any::<u64>(),
        flush_every in 1usize..20,
    ) {
        let mut events: Vec<ReadEvent> = raw.iter().map(|(c, r, s, d)| event(*c, *r, *s, &format!("d{d}"))).collect();
        for i in &dups {
            let e = events[i.index(events.len())].clone();
            events.push(e);
        }
        use rand::{seq::SliceRandom, SeedableRng};
        events.shuffle(&mut rand::rngs::StdRng::seed_from_u64(perm_seed));
        let mut d = TopologyTestDriver::new(topology("0s"));
        for (i, e) in events.iter().enumerate() {
            d.pipe_event(0, i as i64, e);
            if i % flush_every == 0 {
                d.flush();
            }
        }
        d.flush();
        let last = last_updates(&d.read_output());
        let want = oracle(&events);
        prop_assert_eq!(last.len(), want.len());
        for (k, x) in want {
            prop_assert_eq!(last[&k].last_read_seq, x.max_seq);
            prop_assert_eq!(last[&k].version, x.advances);
            let st = d.state(&k).unwrap();
            prop_assert_eq!(st.last_read_seq, x.max_seq);
            prop_assert_eq!(st.events_total, x.events);
            prop_assert_eq!(st.stale_total, x.events - x.advances);
        }
    }
}

/// With the partition count known (as under `readstate run`), a read event on a partition
/// its source's declared partitioner (here Sarama's FNV-1a) would not pick for its
/// conversation is folded by the task of the partition it belongs on (`on_misrouted =
/// "repartition"`): each key lives in one task, every state equals the oracle over all events,
/// nothing is a dead letter, and a replay of the partitions the misrouted reads were found
/// on folds nothing twice (their origin travels with them).
#[test]
fn misrouted_reads_are_rerouted_to_the_task_that_owns_their_conversation() {
    use readstate::kafka::partitioner::Partitioner;
    let t = Shipped::load("read_receipts.toml")
        .set("source.read-events.partitioner", "fnv1a")
        .set("source.read-events.on_misrouted", "repartition")
        .set("processor.read-state.min_emit_interval", "0s")
        .without("sink.postgres")
        .compile();
    let mut d = TopologyTestDriver::new(t).with_partition_count(8);
    let placed = |c: i64| Partitioner::Fnv1a.partition(c.to_string().as_bytes(), 8);
    let (mut all, mut wrong) = (Vec::new(), Vec::new());
    for c in 0..40i64 {
        let p = placed(c);
        let elsewhere = (p + 1 + (c as i32 % 7)) % 8;
        let here = event(c, 1, 10 + c, "phone");
        // An advance of a key the owning task holds, and a key of its own.
        let misrouted = [event(c, 1, 20 + c, "laptop"), event(c, 2, 5, "phone")];
        d.pipe_event(p, c, &here);
        all.push(here);
        for (i, e) in misrouted.into_iter().enumerate() {
            let offset = 100 + 2 * c + i as i64;
            d.pipe_event(elsewhere, offset, &e);
            wrong.push((elsewhere, offset, e.clone()));
            all.push(e);
        }
    }
    for (p, offset, e) in &wrong {
        d.pipe_event(*p, *offset, e);
    }
    d.flush();
    assert_matches_oracle(&d, &all);
    assert!(d.dead_letters().is_empty(), "{:?}", d.dead_letters());
    for c in 0..40 {
        let owner = d.stores(placed(c)).into_iter().next().expect("owner open");
        for reader in [1, 2] {
            let k = readstate::state::codec::StoreKey::state(&key(c, reader));
            assert!(
                owner.get(k.as_bytes()).unwrap().is_some(),
                "({c}, {reader}) in the task of partition {}",
                placed(c)
            );
        }
    }
}

/// With `on_misrouted = "dead-letter"` (a single source's default), a misrouted read is a
/// `misrouted` dead letter and changes no state; the rest fold.
#[test]
fn misrouted_reads_are_dead_letters_and_fold_nothing() {
    use readstate::kafka::partitioner::Partitioner;
    let t = Shipped::load("read_receipts.toml")
        .set("source.read-events.partitioner", "fnv1a")
        .set("source.read-events.on_misrouted", "dead-letter")
        .set("processor.read-state.min_emit_interval", "0s")
        .without("sink.postgres")
        .compile();
    let mut d = TopologyTestDriver::new(t).with_partition_count(8);
    let placed = |c: i64| Partitioner::Fnv1a.partition(c.to_string().as_bytes(), 8);
    let (mut right, mut wrong) = (Vec::new(), Vec::new());
    for c in 0..40i64 {
        let e = event(c, 1, 10 + c, "phone");
        let p = placed(c);
        d.pipe_event(p, c, &e);
        right.push(e);
        let elsewhere = (p + 1 + (c as i32 % 7)) % 8;
        d.pipe_event(elsewhere, 100 + c, &event(c, 2, 5, "phone"));
        wrong.push((elsewhere, 100 + c));
    }
    d.flush();
    assert_matches_oracle(&d, &right);
    for c in 0..40 {
        assert!(d.state(&key(c, 2)).is_none(), "conversation {c} misrouted");
    }
    let dead: Vec<(i32, i64, &str)> = d
        .dead_letters()
        .iter()
        .map(|l| (l.partition, l.offset, l.reason))
        .collect();
    let want: Vec<(i32, i64, &str)> = wrong.iter().map(|(p, o)| (*p, *o, "misrouted")).collect();
    assert_eq!(dead.len(), want.len());
    for w in &want {
        assert!(dead.contains(w), "{w:?} in {dead:?}");
    }
    assert!(
        d.dead_letters()[0].error.contains("fnv1a"),
        "{:?}",
        d.dead_letters()[0]
    );
}
