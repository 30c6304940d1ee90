//! `readstate run`: Bad input: evolved writers through a registry that is down at first, a registry down longer than max.poll.interval.ms, a record near 1 MiB, the dead-letter circuit breaker, and on_bad_record = "fail".

mod support;

use readstate::telemetry::NotReady;

use rdkafka::Message;
use readstate::serde::registry::{ConfluentRegistry, LOCAL_READ_EVENT_ID};
use readstate::serde::{LocalRegistry, READ_EVENT_SCHEMA};
use readstate_testing::fake_registry;
use readstate_testing::fixtures::*;
use readstate_testing::kafka;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// Writers of three schema versions go through `run` with the Confluent registry over HTTP,
/// which is down (HTTP 503) for the first registration and lookups: every event is
/// decoded with schema resolution and folded; none becomes a dead letter because of the
/// outage; records naming a schema id the registry does not have are dead letters.
#[test]
fn evolved_writers_through_an_http_registry_that_is_down_at_first() {
    let env = Env::new();
    let reg = fake_registry::FakeRegistry::start();
    let subject = format!("{}-value", env.source);
    let v1 = v1_writer_schema();
    let v2 = v2_writer_schema();
    let writers = [
        (v1.as_str(), reg.add(&subject, &v1)),
        (READ_EVENT_SCHEMA, reg.add(&subject, READ_EVENT_SCHEMA)),
        (v2.as_str(), reg.add(&subject, &v2)),
    ];
    let events = zipf_workload(8, 9_000);
    let want = oracle(&events);
    let mut records: Vec<(String, Vec<u8>)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (schema, id) = writers[i % 3];
            (e.conversation_id.0.to_string(), encode_with(schema, id, e))
        })
        .collect();
    let unknown = 10;
    for e in &events[..unknown] {
        let v = encode_with(READ_EVENT_SCHEMA, 999, e);
        records.push(("x".into(), v));
    }
    env.produce_raw(&records);
    reg.fail_next(3, 2);
    let resolver = Arc::new(ConfluentRegistry::new(&reg.url(), Duration::from_secs(5)).unwrap());
    let inst = env.start_with(env.state.path(), resolver);
    let subject = format!("{}-value", env.output);
    let output_id = wait_until(
        "the output schema to be registered",
        Duration::from_secs(60),
        || reg.id_of(&subject),
    );
    let updates = env.read_updates_as(&want, output_id);
    let summary = inst.stop();
    assert_eq!(reg.failed(), 5, "the outage was met and retried");
    check_output_monotonic(&updates, &want);
    check_final_state(&env, &want);
    assert_eq!(summary.records_consumed as usize, records.len());
    assert_eq!(summary.dead_letters as usize, unknown, "{summary:?}");
    for u in last_updates(&updates).values() {
        assert_eq!(
            u.device_id.as_deref(),
            want[&u.key()].device_of_max.as_deref(),
            "device rides along with the max"
        );
    }
}

/// The schema registry is down for longer than max.poll.interval.ms: the partitions that
/// need it are parked, the consumer keeps polling (no rebalance, nothing lost), nothing is
/// dead-lettered, and processing resumes when the registry answers.
#[test]
fn registry_down_longer_than_max_poll_interval_parks_and_resumes() {
    let env = Env::new();
    let reg = fake_registry::FakeRegistry::start();
    let id = reg.add(&format!("{}-value", env.source), READ_EVENT_SCHEMA);
    let events = zipf_workload(15, 6_000);
    let want = oracle(&events);
    let records: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| {
            (
                e.conversation_id.0.to_string(),
                encode_with(READ_EVENT_SCHEMA, id, e),
            )
        })
        .collect();
    let resolver = Arc::new(ConfluentRegistry::new(&reg.url(), Duration::from_secs(2)).unwrap());
    let props = [
        "session.timeout.ms=6000",
        "heartbeat.interval.ms=500",
        "max.poll.interval.ms=7000",
    ];
    let cfg = env.config(env.state.path(), resolver, &props);
    let health = cfg.health.clone();
    let inst = launch(cfg);
    let subject = format!("{}-value", env.output);
    let output_id = wait_until(
        "the output schema to be registered",
        Duration::from_secs(60),
        || reg.id_of(&subject),
    );
    // The outage starts once the instance runs its tasks (the schema is registered while
    // the topics are checked, before the group is joined).
    wait_for("the instance to be ready", Duration::from_secs(60), || {
        health.is_ready()
    });
    let outage = Duration::from_secs(12);
    reg.down_for(outage);
    let down_at = Instant::now();
    env.produce_raw(&records);
    // Every partition waits for the registry: the instance says it is not ready.
    wait_for(
        "/ready to turn 503 while every task waits for the registry",
        outage,
        || health.not_ready() == Some(NotReady::SchemaRegistry),
    );
    let updates = env.read_updates_as(&want, output_id);
    let took = down_at.elapsed();
    wait_for("/ready to turn 200 again", Duration::from_secs(30), || {
        health.is_ready()
    });
    let s = inst.stop();
    assert!(
        took >= outage,
        "nothing was processed while the registry was down"
    );
    assert!(reg.failed() > 1, "the outage was met and retried");
    assert_eq!(s.dead_letters, 0, "{s:?}");
    assert_eq!(s.lifecycle.assignments, 1, "no rebalance: {s:?}");
    assert_eq!(s.lifecycle.tasks_lost, 0, "{s:?}");
    check_output_monotonic(&updates, &want);
    check_final_state(&env, &want);
}

// ---- Bad input never stops processing (issue 15).

/// A record of about 1 MB is a dead letter ("too_large") whose value is capped at
/// max_record_bytes (a header keeps its size): carried whole, it plus the dead-letter
/// headers would exceed the producers' message.max.bytes and stop the instance for good.
/// Processing goes on and every other event arrives.
#[test]
fn a_record_near_one_megabyte_is_dead_lettered_capped_and_processing_goes_on() {
    let env = Env::new();
    let events = zipf_workload(5, 2_000);
    let want = oracle(&events);
    env.produce(&events[..1_000], 0);
    let mut big = vec![0u8, 0, 0, 0, LOCAL_READ_EVENT_ID as u8];
    big.resize(999_850, 7);
    env.produce_raw(&[("big".to_owned(), big.clone())]);
    env.produce(&events[1_000..], 0);
    let inst = env.start();
    let updates = env.read_updates(&want);
    check_output_monotonic(&updates, &want);
    let dlq = format!("{}-dlq", env.app);
    let dead = env.read_until(
        &dlq,
        |m| {
            (
                header(m, "readstate.error.reason"),
                header(m, "readstate.value.truncated"),
                m.payload().map(<[u8]>::to_vec),
            )
        },
        |v| !v.is_empty(),
    );
    let summary = inst.stop();
    assert_eq!(summary.dead_letters, 1);
    assert_eq!(dead.len(), 1);
    let (reason, truncated, payload) = &dead[0];
    assert_eq!(reason.as_deref(), Some("too_large"));
    assert_eq!(truncated.as_deref(), Some("999850"));
    let limit = readstate::serde::avro::MAX_RECORD_BYTES;
    assert_eq!(payload.as_deref(), Some(&big[..limit]));
}

/// Producers use a schema id the registry does not know: every record would be a dead
/// letter. The circuit breaker stops the instance (an error saying why, /health 503)
/// instead of draining the topic into the DLQ: what was committed is exactly what reached
/// the DLQ, and most of the input is neither.
#[test]
fn the_circuit_breaker_stops_an_instance_that_would_dead_letter_everything() {
    let env = Env::new();
    let events = zipf_workload(6, 5_000);
    let raw: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| {
            let v = encode_with(READ_EVENT_SCHEMA, 99, e);
            (e.conversation_id.0.to_string(), v)
        })
        .collect();
    env.produce_raw(&raw);
    let (inst, server) = env.start_observed();
    let err = inst.failure().to_string();
    assert!(
        err.contains("circuit breaker")
            && err.contains("unknown_schema")
            && err.contains("schema id 99"),
        "{err}"
    );
    assert!(http_get(server.addr(), "/health").starts_with("HTTP/1.1 503"));
    let committed: i64 = kafka::committed(&env.brokers(), &env.app, &env.source)
        .iter()
        .map(|o| o.max(&0))
        .sum();
    let dlq = kafka::count_records(&env.brokers(), &format!("{}-dlq", env.app));
    assert_eq!(committed, dlq, "each committed record has its dead letter");
    assert!(dlq < events.len() as i64 / 2, "{dlq} dead letters");
}

/// `on_bad_record = "fail"`: the first bad record stops the instance with an error naming
/// it, and no offset past it is committed.
#[test]
fn on_bad_record_fail_stops_at_the_first_bad_record() {
    let env = Env::new();
    let events = zipf_workload(7, 1_000);
    env.produce(&events, 400);
    let garbage = env.read_until(
        &env.source,
        |m| {
            (
                m.partition(),
                m.offset(),
                m.payload() == Some(b"\x00garbage"),
            )
        },
        |v| v.len() >= events.len() + 3,
    );
    let mut cfg = env.config(env.state.path(), Arc::new(LocalRegistry::new()), &[]);
    cfg.topology.bad_records.on_bad_record = readstate::topology::OnBadRecord::Fail;
    let err = launch(cfg).failure().to_string();
    assert!(
        err.contains("on_bad_record") && err.contains("bad record at"),
        "{err}"
    );
    let committed = kafka::committed(&env.brokers(), &env.app, &env.source);
    for (p, o, bad) in &garbage {
        if *bad {
            assert!(
                committed[*p as usize] <= *o,
                "committed past the bad record at [{p}] {o}"
            );
        }
    }
    assert_eq!(garbage.iter().filter(|(_, _, bad)| *bad).count(), 3);
    assert_eq!(
        kafka::count_records(&env.brokers(), &format!("{}-dlq", env.app)),
        0,
        "fail writes no dead letter"
    );
}

/// One registry client used from two runtimes, as the stream thread and the embedded sink
/// do: a connection that the first runtime opened, left idle in the pool while that
/// runtime is not driven (the stream thread's is only driven inside `block_on`), must not
/// stall the second runtime's look-up (issue 26: the sink's first look-ups timed out after
/// 10 s, once or twice a run).
#[test]
fn registry_lookups_from_another_runtime_do_not_stall() {
    use readstate::serde::registry::SchemaResolver;
    let reg = fake_registry::FakeRegistry::start();
    let id = reg.add("events-value", READ_EVENT_SCHEMA);
    let client = ConfluentRegistry::new(&reg.url(), Duration::from_secs(3)).unwrap();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let stream = runtime();
    assert!(stream.block_on(client.schema_by_id(id)).unwrap().is_some());
    let sink = runtime();
    let started = Instant::now();
    let answer = sink.block_on(client.schema_by_id(id));
    assert!(
        matches!(answer, Ok(Some(_))) && started.elapsed() < Duration::from_secs(2),
        "{answer:?} after {:?}",
        started.elapsed()
    );
    drop(stream);
}
