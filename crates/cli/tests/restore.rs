//! `readstate run`: Restoring from the changelog: a deleted state directory, a restore longer than one step (polling and membership go on), a checkpoint beyond the changelog, and a restore from a changelog the real broker compacted.

mod support;

use readstate::model::ReadEvent;
use readstate::serde::LocalRegistry;
use readstate::state::rocks::{RocksDbOptions, RocksDbStore};
use readstate::state::KeyValueStore;
use readstate_testing::fixtures::*;
use readstate_testing::kafka;
use std::sync::Arc;
use std::time::Duration;
use support::*;

#[test]
fn deleting_the_state_directory_costs_only_a_restore() {
    // In-process instances of other tests share the process's recorder; each prunes only
    // the per-task series it set (telemetry::series::Owner), so this one's stay.
    let env = Env::new();
    let first = zipf_workload(2, 8_000);
    env.produce(&first, 0);
    let inst = env.start();
    env.read_updates(&oracle(&first));
    let s1 = inst.stop();
    assert_eq!(s1.records_consumed as usize, first.len());
    std::fs::remove_dir_all(env.state.path().join(&env.app)).unwrap();

    let second = zipf_workload(3, 4_000);
    env.produce(&second, 0);
    let all: Vec<ReadEvent> = first.iter().chain(second.iter()).cloned().collect();
    let want = oracle(&all);
    let (inst, server) = env.start_observed();
    // Ready only once every assigned task has restored; the restore is on /metrics.
    wait_for("never ready", Duration::from_secs(60), || {
        http_get(server.addr(), "/ready").starts_with("HTTP/1.1 200")
    });
    env.read_updates(&want);
    let metrics = http_get(server.addr(), "/metrics");
    let s2 = inst.stop();
    assert!(
        metrics.contains("readstate_restore_remaining_records{task=\"0_0\"}"),
        "restore progress is exposed per task"
    );
    let restored: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("readstate_changelog_records_restored_total "))
        .expect("restored counter")
        .parse()
        .unwrap();
    // The recorder is per process (earlier tests counted too): at least this instance's.
    assert!(restored >= s2.lifecycle.restored_records as f64);
    assert!(
        s2.lifecycle.restored_records > 0,
        "state came back from the changelog"
    );
    assert_eq!(
        s2.records_consumed as usize,
        second.len(),
        "the source was not re-read from the beginning"
    );
    check_final_state(&env, &want);
}

/// A restore larger than one restore step runs between polls: the instance keeps its
/// membership (one assignment, nothing lost) and ends with the exact state.
#[test]
fn restore_larger_than_one_step_keeps_polling_and_the_membership() {
    let env = Env::new();
    let events = zipf_workload(14, 20_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = oracle(&events);
    let a = env.start();
    env.produce(first, 0);
    env.read_updates(&oracle(first));
    a.stop();
    let changelog: i64 =
        kafka::end_offsets(&env.brokers(), &format!("{}-read-state-changelog", env.app))
            .iter()
            .sum();
    let fresh = tempfile::tempdir().unwrap();
    let mut cfg = env.config(fresh.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.restore_batch = 50;
    let b = launch(cfg);
    env.produce(second, 0);
    let updates = env.read_updates(&want);
    let s = b.stop();
    assert!(
        changelog > 4 * 50,
        "the restore took many steps ({changelog} records)"
    );
    assert_eq!(s.lifecycle.restored_records as i64, changelog, "{s:?}");
    assert_eq!(
        s.lifecycle.assignments, 1,
        "no rebalance during the restore: {s:?}"
    );
    assert_eq!(s.lifecycle.tasks_lost, 0, "{s:?}");
    check_output_monotonic(&updates, &want);
    let stored = env.stored_states_in(fresh.path());
    assert_states_match(&want, |k| stored.get(k).cloned());
}

/// A store whose checkpoint lies beyond its changelog's end (the changelog was recreated)
/// is wiped and restored instead of trusted.
#[test]
fn a_checkpoint_beyond_the_changelog_end_is_wiped_and_restored() {
    use readstate::state::{put_checkpoint, StoreBatch};
    let env = Env::new();
    let events = zipf_workload(16, 6_000);
    let want = oracle(&events);
    env.produce(&events, 0);
    let a = env.start();
    env.read_updates(&want);
    a.stop();
    // Move every store's checkpoint far beyond the changelog's end.
    for p in 0..PARTS {
        let path = env
            .state
            .path()
            .join(&env.app)
            .join(env.task_dir(p))
            .join("read-state");
        let mut s =
            RocksDbStore::open("read-state".into(), &path, &RocksDbOptions::default()).unwrap();
        let mut b = StoreBatch::default();
        put_checkpoint(&mut b, 1_000_000);
        s.write(b).unwrap();
        s.flush().unwrap();
    }
    let health = readstate::telemetry::Health::new();
    let mut cfg = env.config(env.state.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.health = health.clone();
    let b = launch(cfg);
    wait_for("never restored", Duration::from_secs(60), || {
        health.is_ready()
    });
    let s = b.stop();
    assert_eq!(s.lifecycle.tasks_corrupted, PARTS as u64, "{s:?}");
    check_final_state(&env, &want);
}

/// A changelog the broker has compacted (fewer records than were written, offsets with
/// gaps) restores a fresh instance to the exact state, counts included.
#[test]
fn real_broker_restore_from_a_compacted_changelog_is_exact() {
    let env = Env::real();
    let events = zipf_workload(33, 40_000);
    let want = oracle(&events);
    let a = env.start();
    let mut done = 0;
    for chunk in events.chunks(5_000) {
        env.produce(chunk, 0);
        done += chunk.len();
        env.read_updates(&oracle(&events[..done]));
    }
    let written = a.stop().changelog_records as i64;
    let changelog = format!("{}-read-state-changelog", env.app);
    let kept = wait_until(
        &format!("the broker to compact {changelog} (below {written} records)"),
        Duration::from_secs(120),
        || Some(kafka::count_records(&env.brokers(), &changelog)).filter(|k| *k < written),
    );
    let fresh = tempfile::tempdir().unwrap();
    let health = readstate::telemetry::Health::new();
    let mut cfg = env.config(fresh.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.health = health.clone();
    let b = launch(cfg);
    wait_for("never restored", Duration::from_secs(60), || {
        health.is_ready()
    });
    let s = b.stop();
    eprintln!(
        "compaction kept {kept} of {written} changelog records; restored {}",
        s.lifecycle.restored_records
    );
    assert!(s.lifecycle.restored_records as i64 <= kept, "{s:?}");
    let stored = env.stored_states_in(fresh.path());
    assert_eq!(stored.len(), want.len());
    assert_states_match(&want, |k| stored.get(k).cloned());
}
