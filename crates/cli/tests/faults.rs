//! `readstate run`: Faults of the process: kill -9 mid stream and between forward and commit, SIGSTOP past the session timeout, produces that fail during a commit and during a revoke (on the mock and the real broker).

mod support;

use process::terminate;
use readstate::model::ReadEvent;
use readstate::runtime::RuntimeError;
use readstate::serde::LocalRegistry;
use readstate_testing::fixtures::*;
use readstate_testing::process;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use support::*;

#[test]
fn sigkill_mid_stream_then_restart_keeps_counts_exact() {
    sigkill_mid_stream_then_restart(Env::new(), 4);
}

/// A crash behind a repartition, between forwarding and committing: every source record
/// forwarded before the kill is forwarded again after the restart, and the origin header
/// makes the copies harmless (counts stay exact).
#[test]
fn sigkill_between_forward_and_commit_keeps_counts_exact() {
    let env = Env::keyed_by(Some("reader_id"));
    let events = zipf_workload(6, 12_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = oracle(&events);
    let repartition = env.repartition_topic();
    let file = env.state.path().join("topology.toml");
    // First run: no commit for 10 minutes, so nothing it forwards is committed.
    std::fs::write(&file, env.topology_text_with_commit("10m")).unwrap();
    env.produce(first, 0);
    let mut child = spawn_cli(&env, &file);
    env.read_until(&repartition, |_| (), |d: &[()]| d.len() >= first.len());
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::write(&file, env.topology_text()).unwrap();
    env.produce(second, 0);
    let mut child = spawn_cli(&env, &file);
    let updates = env.read_updates(&want);
    terminate(&mut child);
    let forwarded = env.read_until(
        &repartition,
        |_| (),
        |d: &[()]| d.len() >= first.len() + events.len(),
    );
    assert!(
        forwarded.len() >= first.len() + events.len(),
        "the first half was forwarded twice"
    );
    check_output_monotonic(&updates, &want);
    check_final_state(&env, &want);
}

/// An instance paused (SIGSTOP) longer than its session timeout while another takes over
/// its partitions, then resumed (SIGCONT): it learns of its loss before it commits, closes
/// its tasks dirty and restores whatever it gets back from the changelog. Output and
/// changelog never regress per key, and the state restored from the changelog is exact.
#[test]
fn sigstop_past_the_session_timeout_then_sigcont_never_regresses() {
    sigstop_then_sigcont(Env::new());
}

/// A produce that fails for good during a commit stops the instance with an error and
/// `/health` 503 (no zombie that stays up and does nothing); a restarted instance recovers
/// the exact state.
#[test]
fn failed_produce_during_a_commit_stops_the_instance_then_a_restart_recovers() {
    let env = Env::new();
    let events = zipf_workload(12, 12_000);
    let parts: Vec<&[ReadEvent]> = events.chunks(4_000).collect();
    let want = oracle(&events);
    let health = readstate::telemetry::Health::new();
    let mut cfg = env.config(env.state.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.topology.commit_interval = Duration::from_secs(600);
    cfg.health = health.clone();
    let (progress, commit_now) = (cfg.progress.clone(), cfg.commit_now.clone());
    let a = launch(cfg);
    env.produce(parts[0], 0);
    wait_consumed(&progress, parts[0].len());
    commit_now.store(true, Ordering::Relaxed);
    env.read_updates(&oracle(parts[0]));
    env.produce(parts[1], 0);
    wait_consumed(&progress, parts[0].len() + parts[1].len());
    let err = {
        let _failing = FailingProduces::start(&env);
        commit_now.store(true, Ordering::Relaxed);
        a.failure()
    };
    assert!(
        matches!(err, RuntimeError::Fatal(_)),
        "stopped as fatal: {err}"
    );
    assert!(!health.is_live(), "/health answers 503");
    env.produce(parts[2], 0);
    let b = env.start();
    let updates = env.read_updates(&want);
    b.stop();
    check_output_monotonic(&updates, &want);
    check_final_state(&env, &want);
}

/// The same during a revoke: a second instance joins, the first one's commit on revoke
/// fails; it stops with an error, and the second converges to the exact state.
#[test]
fn failed_produce_during_a_revoke_stops_the_instance_and_the_other_converges() {
    let env = Env::new();
    let events = zipf_workload(13, 12_000);
    let (first, second) = events.split_at(events.len() / 2);
    let want = oracle(&events);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Long commit intervals: A's state is committed on revoke, B's when it stops.
    let config = |dir: &std::path::Path| {
        let mut cfg = env.config(dir, Arc::new(LocalRegistry::new()), &[]);
        cfg.topology.commit_interval = Duration::from_secs(600);
        cfg
    };
    let cfg = config(dir_a.path());
    let progress_a = cfg.progress.clone();
    let a = launch(cfg);
    env.produce(first, 0);
    wait_consumed(&progress_a, first.len());
    let cfg = config(dir_b.path());
    let progress_b = cfg.progress.clone();
    let (err, b) = {
        let _failing = FailingProduces::start(&env);
        let b = launch(cfg);
        (a.failure_beside(Some(&b)), b)
    };
    assert!(matches!(err, RuntimeError::Fatal(_)), "{err}");
    env.produce(second, 0);
    // A committed nothing: B reads everything from the start.
    wait_consumed(&progress_b, events.len());
    b.stop();
    let updates = env.read_updates(&want);
    check_output_monotonic(&updates, &want);
    let stored = env.stored_states_in(dir_b.path());
    assert_states_match(&want, |k| stored.get(k).cloned());
}

// ---- The same against a real Apache Kafka (scripts/test starts one): what the mock broker
// does not do (admin topic creation and configs, compaction, the real group coordinator).

#[test]
fn real_broker_sigkill_mid_stream_then_restart_keeps_counts_exact() {
    sigkill_mid_stream_then_restart(Env::real(), 31);
}

#[test]
fn real_broker_sigstop_past_the_session_timeout_never_regresses() {
    sigstop_then_sigcont(Env::real());
}
