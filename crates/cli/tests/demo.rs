//! `readstate demo` end to end, with `/metrics` scraped during the run. A test binary of its
//! own, so the process-wide metrics recorder counts this run only.

use std::time::Duration;

use readstate::telemetry::{serve, Health};
use readstate_testing::{http_get, wait_for};
use readstate_tools::demo::{run_demo, DemoConfig};
use readstate_tools::loadgen::WorkloadSpec;

/// The value of an unlabelled (or exactly labelled) sample in Prometheus text.
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
        .parse()
        .unwrap()
}

#[test]
fn demo_passes_and_metrics_agree_with_what_was_processed() {
    let admin = std::env::var("READSTATE_TEST_DATABASE_URL").expect(
        "READSTATE_TEST_DATABASE_URL is not set: run scripts/test, which starts a private PostgreSQL",
    );
    let health = Health::new();
    let server = serve("127.0.0.1:0".parse().unwrap(), health).unwrap();
    let addr = server.addr();
    let spec = WorkloadSpec {
        events: 150_000,
        conversations: 10_000,
        poison_rate: 0.001,
        seed: 7,
        ..Default::default()
    };
    let demo = std::thread::spawn(move || {
        run_demo(DemoConfig {
            spec,
            partitions: 8,
            database_url: admin,
            database_name: format!("rs_demo_{:08x}", rand::random::<u32>()),
            metrics_addr: None,
            batch_size: 500,
            progress_every: Duration::from_secs(5),
            brokers: None,
            exactly_once: false,
            json: false,
        })
    });
    // During the run: the counters move.
    let mut seen_running = false;
    wait_for(
        "the demo to finish or its counters to move",
        Duration::from_secs(120),
        || {
            let page = http_get(addr, "/metrics").unwrap();
            seen_running = page.contains("readstate_events_consumed_total ")
                && sample(&page, "readstate_events_consumed_total") > 0.0;
            seen_running || demo.is_finished()
        },
    );
    let report = demo.join().unwrap().expect("demo runs");
    print!("{}", report.render());
    assert!(seen_running, "metrics scraped while the demo ran");
    assert!(report.pass(), "demo FAILED");
    assert!(
        report.sink.statements * 50 <= report.events,
        "statements <= events / 50"
    );

    let page = http_get(addr, "/metrics").unwrap();
    let records = (report.events + report.poison) as f64;
    assert_eq!(sample(&page, "readstate_events_consumed_total"), records);
    assert_eq!(
        sample(&page, "readstate_events_folded_total"),
        report.run.events_folded as f64
    );
    assert_eq!(
        sample(
            &page,
            "readstate_dead_letters_total{reason=\"not_wire_format\"}"
        ),
        report.poison as f64
    );
    assert_eq!(
        sample(&page, "readstate_updates_emitted_total"),
        report.run.updates_emitted as f64
    );
    assert_eq!(
        sample(&page, "readstate_sink_rows_written_total"),
        report.sink.rows_changed as f64
    );
    assert_eq!(
        sample(&page, "readstate_sink_statements_total"),
        report.sink.statements as f64
    );
    assert_eq!(
        sample(&page, "readstate_sink_records_total"),
        report.sink.records as f64
    );
    assert!(page.contains("readstate_commit_duration_seconds_bucket"));
    assert!(page.contains("readstate_flush_duration_seconds_bucket"));
    assert!(page.contains("readstate_build_info{version="));
}
