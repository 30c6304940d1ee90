//! Start-up on a real broker: process start to the first record processed, for a new
//! instance (stores created) and for a restart (stores present), with the phases in
//! between read from the instance's own log (the `startup_ms` field of its start-up lines).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::versus::{append, readstate_command, wait_committed, Job};
use super::{create_topic, BenchError, Figure, Target};
use crate::loadgen::WorkloadSpec;

/// Issue 14's target: from process start to the first record processed.
pub const STARTUP_TARGET_MS: f64 = 150.0;

/// The start-up phases of one run, in the order the instance logged them.
#[derive(Debug, Clone, Default)]
pub struct Phases {
    /// (log message, milliseconds since process start).
    pub marks: Vec<(String, u64)>,
}

impl Phases {
    /// Milliseconds to the first record processed.
    pub fn first_record_ms(&self) -> Option<u64> {
        self.marks
            .iter()
            .find(|(m, _)| m == FIRST_RECORD)
            .map(|(_, ms)| *ms)
    }

    /// "starting 21, internal and output topics ready 210, …" with short names.
    pub fn summary(&self) -> String {
        self.marks
            .iter()
            .map(|(m, ms)| format!("{} {ms}", short_name(m)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

const FIRST_RECORD: &str = "first record processed";

fn short_name(message: &str) -> &str {
    match message {
        "internal and output topics ready" => "topics",
        "output schema and producer ready" => "producer",
        "subscribed; joining the consumer group" => "subscribed",
        "checkpoints checked against the changelogs" => "checkpoints",
        FIRST_RECORD => "first record",
        "stores opened" => "stores",
        other => other,
    }
}

/// One start-up log line: its message and `startup_ms`, if it has one.
fn parse_mark(line: &str) -> Option<(String, u64)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    let ms = fields.get("startup_ms")?.as_u64()?;
    let message = fields.get("message")?.as_str()?.to_owned();
    Some((message, ms))
}

/// Start `cmd` with its log as JSON on a pipe, wait (bounded) for its first processed
/// record, then until its group has committed `records` source records; stop it.
fn measure(
    mut cmd: Command,
    brokers: &str,
    job: &Job<'_>,
    partitions: i32,
    records: u64,
) -> Result<Phases, BenchError> {
    // READSTATE_STARTUP_LOG: also write the instance's whole log there (for looking into
    // a phase, with e.g. READSTATE_VERSUS_ARGS="-X consumer.debug=fetch").
    let keep = std::env::var_os("READSTATE_STARTUP_LOG")
        .map(std::fs::File::create)
        .transpose()
        .map_err(|e| BenchError::Other(format!("READSTATE_STARTUP_LOG: {e}")))?;
    let filter = std::env::var("READSTATE_STARTUP_RUST_LOG").unwrap_or_else(|_| {
        "error,readstate_runtime=debug,readstate_core::dead_letter_log=error".into()
    });
    cmd.env("RUST_LOG", filter)
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| BenchError::Other(format!("starting readstate: {e}")))?;
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut keep = keep;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = keep.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
            if let Some(mark) = parse_mark(&line) {
                let _ = tx.send(mark);
            }
        }
    });
    let result = collect_phases(&rx, &mut child).and_then(|phases| {
        wait_committed(
            brokers, job.app, job.source, partitions, records, &mut child,
        )?;
        Ok(phases)
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let _ = reader.join();
    result
}

/// The marks up to the first processed record (at most 60 s).
fn collect_phases(
    rx: &mpsc::Receiver<(String, u64)>,
    child: &mut Child,
) -> Result<Phases, BenchError> {
    let mut phases = Phases::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(mark) => {
                // A phase that repeats (a second assignment) keeps its first time.
                if !phases.marks.iter().any(|(m, _)| *m == mark.0) {
                    phases.marks.push(mark);
                }
                if phases.first_record_ms().is_some() {
                    return Ok(phases);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(BenchError::Other(format!(
                        "readstate exited ({status}) before processing a record"
                    )));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Err(BenchError::Other(format!(
        "no record processed within 60 s; phases so far: {}",
        phases.summary()
    )))
}

/// A new instance over `partitions` partitions, then a restart of it after more records
/// arrived: two figures, process start to the first record processed.
pub fn startup(brokers: &str, partitions: i32) -> Result<Vec<Figure>, BenchError> {
    let first = WorkloadSpec {
        events: 20_000,
        ..WorkloadSpec::default()
    };
    let (source, mut records) = super::versus::produce(brokers, &first, partitions)?;
    let app = format!("startup-{:08x}", rand::random::<u32>());
    let output = format!("{app}.updates");
    create_topic(brokers, &output, partitions)?;
    let state = tempfile::tempdir().map_err(|e| BenchError::Other(e.to_string()))?;
    let job = Job {
        brokers,
        source: &source,
        app: &app,
        output: &output,
        guarantee: "at_least_once",
        state: state.path(),
    };
    let fresh = measure(readstate_command(&job)?, brokers, &job, partitions, records)?;
    let more = WorkloadSpec {
        events: 2_000,
        seed: first.seed + 1,
        ..first
    };
    records += append(brokers, &source, &more)?;
    let restart = measure(readstate_command(&job)?, brokers, &job, partitions, records)?;
    Ok(vec![
        figure(format!("start-up, new, {partitions} partitions"), &fresh),
        figure(format!("start-up, restart, {partitions} part."), &restart),
    ])
}

fn figure(name: String, phases: &Phases) -> Figure {
    Figure {
        name,
        value: phases.first_record_ms().unwrap_or(0) as f64,
        unit: "ms",
        target: Some(Target::AtMost(STARTUP_TARGET_MS)),
        note: format!("process start to first record; {}", phases.summary()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_startup_line_gives_its_message_and_time() {
        let line = r#"{"timestamp":"2026-11-29T17:00:00.000001Z","level":"DEBUG","fields":{"message":"stores opened","tasks":32,"startup_ms":412},"target":"readstate_runtime::task_manager"}"#;
        assert_eq!(parse_mark(line), Some(("stores opened".to_owned(), 412)));
        let other = r#"{"fields":{"message":"committed","tasks":3},"target":"x"}"#;
        assert_eq!(parse_mark(other), None);
        assert_eq!(parse_mark("not json"), None);
    }

    #[test]
    fn the_first_record_mark_ends_the_phases() {
        let p = Phases {
            marks: vec![
                ("starting".into(), 20),
                ("stores opened".into(), 300),
                (FIRST_RECORD.into(), 420),
            ],
        };
        assert_eq!(p.first_record_ms(), Some(420));
        assert_eq!(p.summary(), "starting 20, stores 300, first record 420");
    }
}
