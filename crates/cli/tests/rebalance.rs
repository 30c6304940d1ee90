//! `readstate run`: Rebalances: instances joining and leaving mid stream (on the mock and the real broker, with and without a repartitioned source), repartition topics purged below the committed offsets, and per-task series handed over with the tasks.

mod support;

use process::terminate;
use readstate::model::ReadEvent;
use readstate::serde::LocalRegistry;
use readstate_testing::fixtures::*;
use readstate_testing::kafka;
use readstate_testing::process;
use std::sync::Arc;
use std::time::Duration;
use support::*;

#[test]
fn instances_joining_and_leaving_mid_stream_converge() {
    instances_joining_and_leaving(Env::new());
}

/// A source keyed by reader_id: sub-topology 0 re-keys it by conversation through the
/// repartition topic while instances join and leave; state and output equal the oracle and
/// poison pills are caught before the repartition.
#[test]
fn repartitioned_source_with_instances_joining_and_leaving() {
    let env = Env::keyed_by(Some("reader_id"));
    let events = zipf_workload(7, 15_000);
    let want = oracle(&events);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let chunks: Vec<&[ReadEvent]> = events.chunks(5_000).collect();
    let a = env.start_in(dir_a.path());
    let mut garbage = env.produce(chunks[0], 200);
    let b = env.start_in(dir_b.path());
    garbage += env.produce(chunks[1], 200);
    env.read_until(&env.output, |_| (), |d: &[()]| d.len() >= 50);
    let sa = a.stop();
    garbage += env.produce(chunks[2], 200);
    let updates = env.read_updates(&want);
    let sb = b.stop();
    check_output_monotonic(&updates, &want);
    let stored = env.stored_states_in(dir_b.path());
    assert_eq!(stored.len(), want.len());
    assert_states_match(&want, |k| stored.get(k).cloned());
    assert!(
        sa.records_forwarded + sb.records_forwarded >= events.len() as u64,
        "every event went through the repartition topic: {sa:?} {sb:?}"
    );
    // Every poison pill is on the DLQ, and nothing else. Dead letters are at least once: an
    // offset commit refused during a rebalance makes the next owner write one again, so
    // they are counted by provenance (source partition and offset).
    let dlq = env.read_until(
        &format!("{}-dlq", env.app),
        |m| {
            let get = |name: &str| header(m, name);
            (
                get("readstate.source.partition"),
                get("readstate.source.offset"),
            )
        },
        |d| d.iter().collect::<std::collections::HashSet<_>>().len() >= garbage,
    );
    let distinct: std::collections::HashSet<_> = dlq.iter().collect();
    assert_eq!(distinct.len(), garbage);
}

/// A repartitioned event is consumed twice (from its source, then from the repartition
/// topic) but counted once: an instance that consumed N source records says N, so that a
/// wait on the count means the source was read, not half of it.
#[test]
fn a_repartitioned_event_is_counted_once() {
    let env = Env::keyed_by(Some("reader_id"));
    let events = zipf_workload(8, 3_000);
    let want = oracle(&events);
    let dir = tempfile::tempdir().unwrap();
    let a = env.start_in(dir.path());
    let garbage = env.produce(&events, 300);
    env.read_updates(&want);
    // Every poison pill consumed too (each is a dead letter once consumed).
    let dlq = format!("{}-dlq", env.app);
    env.read_until(&dlq, |_| (), |d: &[()]| d.len() >= garbage);
    let s = a.stop();
    assert_eq!(
        s.records_consumed as usize,
        events.len() + garbage,
        "source records, each once: {s:?}"
    );
    assert!(s.records_forwarded >= events.len() as u64, "{s:?}");
}

#[test]
fn real_broker_instances_joining_and_leaving_converge() {
    instances_joining_and_leaving(Env::real());
}

/// The same under the consumer group protocol of KIP-848 (`group.protocol=consumer`).
#[test]
fn real_broker_consumer_protocol_instances_joining_and_leaving_converge() {
    let mut env = Env::real();
    env.props = vec!["group.protocol=consumer"];
    instances_joining_and_leaving(env);
}

/// A repartitioned source on the real broker: readstate creates the repartition topic
/// through the admin API with the source's partition count, and deletes its records below
/// the committed offsets (DeleteRecords), as Kafka Streams does.
#[test]
fn real_broker_repartition_topic_is_created_and_purged_below_the_committed_offsets() {
    let env = Env::on(Broker::real(), Some("reader_id"));
    let events = zipf_workload(35, 8_000);
    let want = oracle(&events);
    let mut cfg = env.config(env.state.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.repartition_purge_interval = Duration::from_millis(500);
    let a = launch(cfg);
    env.produce(&events, 0);
    env.read_updates(&want);
    let repartition = env.repartition_topic();
    let brokers = env.brokers();
    let low = |p: i32| -> (i64, i64) {
        let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        rdkafka::consumer::Consumer::fetch_watermarks(&c, &repartition, p, Duration::from_secs(5))
            .unwrap()
    };
    wait_for(
        "repartition records were never purged",
        Duration::from_secs(60),
        || (0..PARTS).map(|p| low(p).0).sum::<i64>() != 0,
    );
    a.stop();
    assert_eq!(
        kafka::end_offsets(&brokers, &repartition).len(),
        PARTS as usize
    );
    let committed = kafka::committed(&brokers, &env.app, &repartition);
    for p in 0..PARTS {
        let (lo, _) = low(p);
        assert!(
            lo <= committed[p as usize],
            "partition {p}: purged to {lo}, committed {}",
            committed[p as usize]
        );
    }
    check_final_state(&env, &want);
}

/// `/metrics` of `readstate run` passes `promtool check metrics` (every metric described,
/// counters present at zero, `readstate_build_info`); when a second instance takes half
/// the partitions, the first stops exporting the moved tasks' series, so dashboards never
/// count a task twice. Logs written to a file carry no colour codes.
#[test]
fn metrics_pass_promtool_and_moved_tasks_lose_their_series() {
    let env = Env::new();
    let events = zipf_workload(8, 2_000);
    env.produce(&events, 0);
    let topology = env.state.path().join("topology.toml");
    std::fs::write(&topology, env.topology_text()).unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let metrics = ["--metrics-addr", "127.0.0.1:0"];
    let mut a = spawn_cli_in(&env, &topology, dir_a.path(), &metrics);
    let log_a = dir_a.path().join("readstate.log");
    let addr_a = metrics_addr(&log_a);
    let all: std::collections::BTreeSet<String> = (0..PARTS).map(|p| format!("0_{p}")).collect();
    let page = wait_until("A to export all its tasks", Duration::from_secs(60), || {
        Some(scrape(addr_a)).filter(|page| exported_tasks(page) == all)
    });
    assert_eq!(promtool(&page), "", "promtool check metrics");
    for line in [
        "readstate_tasks_lost_total 0",
        "readstate_commits_failed_total 0",
        "readstate_dead_letters_total{reason=\"unknown_schema\"} 0",
        "# HELP readstate_events_consumed_total ",
        "readstate_build_info{version=\"",
    ] {
        assert!(page.contains(line), "no {line:?} in\n{page}");
    }
    let mut b = spawn_cli_in(&env, &topology, dir_b.path(), &metrics);
    let addr_b = metrics_addr(&dir_b.path().join("readstate.log"));
    wait_for(
        "A to hand series over to B (disjoint, all tasks)",
        Duration::from_secs(90),
        || {
            let (ta, tb) = (
                exported_tasks(&scrape(addr_a)),
                exported_tasks(&scrape(addr_b)),
            );
            let union: std::collections::BTreeSet<_> = ta.union(&tb).cloned().collect();
            !tb.is_empty() && ta.is_disjoint(&tb) && union == all
        },
    );
    assert_eq!(promtool(&scrape(addr_a)), "", "after the rebalance");
    terminate(&mut b);
    terminate(&mut a);
    let log = std::fs::read_to_string(&log_a).unwrap();
    assert!(
        log.contains("serving /metrics") && !log.contains('\u{1b}'),
        "colour codes in a log file"
    );
}

/// Commits the group coordinator refuses while the group rebalances (`RebalanceInProgress`,
/// `IllegalGeneration`, injected into the mock's offset commits) are postponed, not lost:
/// no store is wiped or restored again, the next commit covers the offsets, and state and
/// output equal the oracle (issue 26). Before, each refusal lost every task and restored
/// every store from its changelog.
fn refused_commits_are_postponed(mut env: Env, eos: bool) {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    env.eos = eos;
    let events = zipf_workload(11, 8_000);
    let want = oracle(&events);
    let a = env.start();
    env.produce(&events[..4_000], 0);
    env.read_until(&env.output, |_| (), |d: &[()]| d.len() >= 50);
    let api = match eos {
        true => RDKafkaApiKey::TxnOffsetCommit,
        false => RDKafkaApiKey::OffsetCommit,
    };
    use RDKafkaRespErr::{
        RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION as GEN, RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS as REB,
    };
    env.mock().request_errors(api, &[REB, GEN, REB, GEN]);
    env.produce(&events[4_000..], 0);
    let updates = env.read_updates(&want);
    if !eos {
        // (The mock does not keep offsets committed in a transaction.)
        let brokers = env.brokers();
        let end = kafka::end_offsets(&brokers, &env.source);
        wait_for(
            "the offsets to be committed after the refusals",
            Duration::from_secs(60),
            || kafka::committed(&brokers, &env.app, &env.source) == end,
        );
    }
    let s = a.stop();
    assert!(
        s.lifecycle.commits_postponed >= 4,
        "every refusal postponed: {s:?}"
    );
    // librdkafka itself reports the assignment lost after an IllegalGeneration refusal
    // (the member id unchanged): the tasks are closed and assigned again, their stores kept.
    assert_eq!(
        s.lifecycle.restored_records, 0,
        "no store wiped or restored: {s:?}"
    );
    assert_eq!(s.lifecycle.tasks_corrupted, 0, "{s:?}");
    check_output_monotonic(&updates, &want);
    check_final_state(&env, &want);
}

#[test]
fn commits_refused_during_a_rebalance_are_postponed_not_lost() {
    refused_commits_are_postponed(Env::new(), false);
}

#[test]
fn transactions_refused_during_a_rebalance_are_postponed_not_lost() {
    refused_commits_are_postponed(Env::new(), true);
}

/// What a rebalance costs (issue 26): instance B joins A, then A leaves, on the real
/// broker. A's tasks that stay with it restore nothing and no task is lost; B restores
/// only what it takes over. Prints the pause (B started or A stopped, until the group's
/// tasks all run again) and the records restored, for PERFORMANCE.md.
fn rebalance_costs(env: Env, protocol: &str) {
    use readstate::telemetry::Progress;
    let events = zipf_workload(17, 12_000);
    let want = oracle(&events);
    let chunks: Vec<&[ReadEvent]> = events.chunks(4_000).collect();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let start = |dir: &std::path::Path| {
        let cfg = env.config(dir, Arc::new(LocalRegistry::new()), &env.props);
        let progress = cfg.progress.clone();
        (launch(cfg), progress)
    };
    let running = |p: &Arc<Progress>| Progress::get(&p.tasks_running);
    let (a, pa) = start(dir_a.path());
    env.produce(chunks[0], 0);
    wait_consumed(&pa, chunks[0].len());
    let joined = std::time::Instant::now();
    let (b, pb) = start(dir_b.path());
    wait_for(
        "A and B to share the tasks",
        Duration::from_secs(90),
        || running(&pa) > 0 && running(&pb) > 0 && running(&pa) + running(&pb) == PARTS as u64,
    );
    let join_pause = joined.elapsed();
    env.produce(chunks[1], 0);
    env.read_until(&env.output, |_| (), |d: &[()]| d.len() >= 50);
    let left = std::time::Instant::now();
    let sa = a.stop();
    wait_for("B to run every task", Duration::from_secs(90), || {
        running(&pb) == PARTS as u64
    });
    let leave_pause = left.elapsed();
    env.produce(chunks[2], 0);
    let updates = env.read_updates(&want);
    let sb = b.stop();
    eprintln!(
        "rebalance costs ({protocol}): join {join_pause:?} until both run tasks, leave {leave_pause:?} until B runs all; A restored {} records, B {} ({} assignments); tasks lost {}+{}",
        sa.lifecycle.restored_records, sb.lifecycle.restored_records, sb.lifecycle.assignments, sa.lifecycle.tasks_lost, sb.lifecycle.tasks_lost
    );
    assert_eq!(
        sa.lifecycle.restored_records, 0,
        "A's staying tasks restore nothing: {sa:?}"
    );
    assert_eq!(
        (sa.lifecycle.tasks_lost, sb.lifecycle.tasks_lost),
        (0, 0),
        "{sa:?} {sb:?}"
    );
    assert!(
        sb.lifecycle.restored_records > 0,
        "B restored what it took over: {sb:?}"
    );
    check_output_monotonic(&updates, &want);
    let stored = env.stored_states_in(dir_b.path());
    assert_states_match(&want, |k| stored.get(k).cloned());
}

#[test]
fn real_broker_classic_protocol_rebalance_costs() {
    rebalance_costs(Env::real(), "classic, cooperative-sticky");
}

#[test]
fn real_broker_consumer_protocol_rebalance_costs() {
    let mut env = Env::real();
    env.props = vec!["group.protocol=consumer"];
    rebalance_costs(env, "consumer (KIP-848)");
}
