//! `readstate run`: End to end: output and state against the oracle, and internal topics created, compacted and checked (a wrong partition count refused).

mod support;

use kafka::suffix;
use rdkafka::mocking::MockCluster;
use readstate::kafka::KafkaSettings;
use readstate::runtime::RunConfig;
use readstate::serde::LocalRegistry;
use readstate::topology::compile;
use readstate_testing::fixtures::*;
use readstate_testing::kafka;
use std::sync::Arc;
use std::time::Duration;
use support::*;

#[test]
fn end_to_end_output_and_state_match_the_oracle() {
    let env = Env::new();
    let events = zipf_workload(1, 20_000);
    let garbage = env.produce(&events, 100);
    let want = oracle(&events);
    let inst = env.start();
    let updates = env.read_updates(&want);
    let summary = inst.stop();
    let last = last_updates(&updates); // asserts versions strictly increase per key
    for (k, x) in &want {
        assert_eq!(last[k].last_read_seq, x.max_seq);
        assert_eq!(last[k].version, x.advances);
    }
    assert!(
        updates.len() < events.len(),
        "coalescing: {} updates for {} events",
        updates.len(),
        events.len()
    );
    assert_eq!(summary.dead_letters as usize, garbage);
    assert_eq!(summary.records_consumed as usize, events.len() + garbage);
    check_final_state(&env, &want);
    // Every poison pill is on the dead-letter topic with its provenance.
    let dlq = env.read_until(
        &format!("{}-dlq", env.app),
        |m| {
            let get = |name: &str| header(m, name);
            (
                get("readstate.source.topic"),
                get("readstate.error.reason"),
                get("readstate.source.offset").is_some(),
            )
        },
        |d| d.len() >= garbage,
    );
    assert_eq!(dlq.len(), garbage);
    assert!(dlq
        .iter()
        .all(|(t, r, o)| t.as_deref() == Some(env.source.as_str())
            && r.as_deref() == Some("unknown_schema")
            && *o));
}

/// An existing changelog with another partition count than the source stops the instance
/// at start with an error naming the topic.
#[test]
fn an_internal_topic_with_the_wrong_partition_count_is_refused() {
    let mock = MockCluster::new(1).unwrap();
    let s = suffix();
    let (app, source) = (format!("app-{s}"), format!("events-{s}"));
    mock.create_topic(&source, 4, 1).unwrap();
    let changelog = format!("{app}-read-state-changelog");
    mock.create_topic(&changelog, 2, 1).unwrap();
    let state = tempfile::tempdir().unwrap();
    let text = topology_text(
        &app,
        "200ms",
        &state.path().display().to_string(),
        &source,
        "out",
        "0s",
    );
    let cfg = RunConfig::new(
        compile(&text).unwrap(),
        KafkaSettings::new(mock.bootstrap_servers()),
        Arc::new(LocalRegistry::new()),
    );
    let err = refused(cfg);
    assert!(
        err.contains(&changelog) && err.contains("2 partitions"),
        "the error names the topic and what is wrong: {err}"
    );
}

/// readstate creates its changelog (compacted, the source's partition count) and its
/// dead-letter topic through the admin API, and refuses an existing changelog that is not
/// compacted, naming it.
#[test]
fn real_broker_internal_topics_are_created_compacted_and_checked() {
    let mut env = Env::real();
    // An output topic that does not exist yet: readstate creates it too.
    env.output = format!("fresh-updates-{}", suffix());
    let events = zipf_workload(32, 3_000);
    let want = oracle(&events);
    let a = env.start();
    wait_for(
        "the output topic was created with {PARTS} partitions",
        Duration::from_secs(30),
        || kafka::end_offsets(&env.brokers(), &env.output).len() == PARTS as usize,
    );
    env.produce(&events, 500);
    env.read_updates(&want);
    a.stop();
    let brokers = env.brokers();
    let changelog = format!("{}-read-state-changelog", env.app);
    assert_eq!(
        kafka::end_offsets(&brokers, &changelog).len(),
        PARTS as usize
    );
    assert_eq!(cleanup_policy(&brokers, &changelog), "compact");
    assert_eq!(
        cleanup_policy(&brokers, &format!("{}-dlq", env.app)),
        "delete"
    );
    check_final_state(&env, &want);

    let other = Env::real();
    let wrong = format!("{}-read-state-changelog", other.app);
    other
        .broker
        .create_topic(&wrong, PARTS, &[("cleanup.policy", "delete")]);
    let cfg = other.config(other.state.path(), Arc::new(LocalRegistry::new()), &[]);
    let err = refused(cfg);
    assert!(
        err.contains(&wrong) && err.contains("cleanup.policy"),
        "names the topic and what is wrong: {err}"
    );
}
