//! The Kafka Streams comparison end to end on the real broker: `readstate bench --only
//! versus` runs readstate and the yardstick of `bench/kafka-streams` (built by
//! `scripts/test`) over one small pre-produced topic and prints both rows and the ratios.
//! Figures are never asserted (the machine is shared); what is checked is that both
//! systems processed the whole topic, readstate with an update for every key.

use std::collections::HashSet;
use std::process::Command;

use readstate_tools::loadgen::{Generated, Generator, WorkloadSpec};

fn env(name: &str, what: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run scripts/test, which {what}"))
}

/// What a `readstate bench` run printed; it must have succeeded.
fn printed(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Output records of one system's row: the last column.
fn outputs(text: &str, system: &str) -> u64 {
    let row = text
        .lines()
        .find(|l| l.starts_with(system))
        .unwrap_or_else(|| panic!("no {system} row in:\n{text}"));
    row.split_whitespace()
        .last()
        .and_then(|v| v.replace(',', "").parse().ok())
        .unwrap_or_else(|| panic!("no output count in {row:?}"))
}

#[test]
fn versus_runs_both_systems_over_the_whole_topic() {
    let brokers = env("READSTATE_TEST_KAFKA", "starts a private Apache Kafka");
    let classpath = env(
        "YARDSTICK_CLASSPATH",
        "builds bench/kafka-streams with Maven",
    );
    let (events, conversations, seed) = (20_000u64, 300u64, 7u64);
    let out = Command::new(env!("CARGO_BIN_EXE_readstate"))
        .args(["bench", "--only", "versus", "--brokers", &brokers])
        .args(["--kafka-streams-classpath", &classpath])
        .args(["--events", &events.to_string()])
        .args(["--conversations", &conversations.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--versus-partitions", "4", "--versus-at-least-once-only"])
        .arg("--kafka-streams-jvm=-Xms128m -Xmx512m")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = printed(&out);
    // The oracle: every (conversation, reader) the generator wrote an event for.
    let spec = WorkloadSpec {
        events,
        conversations,
        seed,
        ..WorkloadSpec::default()
    };
    let keys: HashSet<(readstate::ids::Id, readstate::ids::Id)> = Generator::new(spec)
        .filter_map(|g| match g {
            Generated::Event(e) => Some((e.conversation_id.0, e.reader_id.0)),
            Generated::Poison(_) => None,
        })
        .collect();
    // readstate commits a source offset only after the updates of the records before it
    // are acknowledged: once the whole topic is committed, every key has been emitted.
    let n = outputs(&text, "readstate");
    assert!(
        n >= keys.len() as u64 && n <= events,
        "readstate: {n} outputs for {} keys and {events} events:\n{text}",
        keys.len()
    );
    // The yardstick emits on a wall-clock punctuation, so its run (which ends when its
    // offsets are committed) may end before any emit: never more than one per event.
    let n = outputs(&text, "kafka-streams");
    assert!(n <= events, "kafka-streams: {n} outputs:\n{text}");
    assert!(
        text.contains("the events per CPU-second (target >= 5:")
            && text.contains("the peak RSS (target <= 0.5:"),
        "ratios missing:\n{text}"
    );
    assert!(text.contains("peak RSS, 4 partitions"), "{text}");
}

/// The figures that run for minutes, shortened: `--only latency,sink-outage` on the real
/// broker with the private PostgreSQL. Figures are not asserted; what is checked is that
/// updates reached both the output topic and PostgreSQL (samples counted), that the sink's
/// backlog grew while the database refused connections, and that the sink caught up once
/// it came back.
#[test]
fn latency_and_sink_outage_figures_run_on_the_real_broker() {
    let brokers = env("READSTATE_TEST_KAFKA", "starts a private Apache Kafka");
    let url = env("READSTATE_TEST_DATABASE_URL", "starts a private PostgreSQL");
    let out = Command::new(env!("CARGO_BIN_EXE_readstate"))
        .args([
            "bench",
            "--only",
            "latency,sink-outage",
            "--brokers",
            &brokers,
        ])
        .args(["--latency-rates", "2000", "--latency-seconds", "7"])
        .args(["--outage-rate", "1000", "--outage-seconds", "8"])
        .args(["--outage-margin-seconds", "6", "--conversations", "300"])
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = printed(&out);
    for line in [
        "latency read -> receipt update at 2000/s",
        "latency read -> PostgreSQL row at 2000/s",
    ] {
        let row = text
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no {line:?} in:\n{text}"));
        let samples: u64 = row
            .split(" over ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no sample count in {row:?}"));
        assert!(samples > 0, "{row}");
    }
    let backlog = |phase: &str| -> i64 {
        text.lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(phase))
            .filter_map(|l| l.split_whitespace().nth(3)?.parse().ok())
            .max()
            .unwrap_or_else(|| panic!("no {phase} sample in:\n{text}"))
    };
    assert!(
        backlog("outage") > 0,
        "the backlog grew during the outage:\n{text}"
    );
    let catch_up = text
        .lines()
        .find(|l| l.starts_with("sink outage: catch-up"))
        .unwrap_or_else(|| panic!("no catch-up figure in:\n{text}"));
    assert!(
        catch_up.contains("until the sink's group committed"),
        "the sink caught up after the outage: {catch_up}"
    );
}
