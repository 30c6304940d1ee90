//! The sink's lag per owned partition (`readstate_sink_lag_records`): output records not
//! yet in PostgreSQL, measured by a thread of its own every few seconds, so that it keeps
//! growing while the database is down and never blocks the sink loop.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::SinkError;
use crate::kafka::{KafkaError, KafkaSettings};
use crate::telemetry::series;

const LAG: &str = "readstate_sink_lag_records";

/// What the sink wrote of an owned partition, shared with the probe thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Written {
    /// The stored `next_offset` (-1: nothing written yet).
    pub(super) next: i64,
    /// Every record handed to the sink so far is written.
    pub(super) all: bool,
}

pub(super) type Positions = Arc<Mutex<BTreeMap<i32, Written>>>;

/// Where the sink's consumer stands per partition, from its statistics.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConsumedAt {
    /// The next offset the fetcher asks for (past transaction markers).
    pub(super) next_fetch: i64,
    /// Records fetched and not handed to the sink yet.
    pub(super) queued: i64,
}

pub(super) type Consumed = Arc<Mutex<BTreeMap<i32, ConsumedAt>>>;

/// Records of a partition not written yet: from the stored offset to the log's end,
/// except that a sink which wrote everything it was handed, with a fetcher past the end
/// and nothing queued, is 0 behind (the end may be a transaction's commit marker, which
/// is no record).
fn lag(written: Written, low: i64, high: i64, consumed: Option<&ConsumedAt>) -> i64 {
    let caught_up = written.all && consumed.is_some_and(|c| c.queued == 0 && c.next_fetch >= high);
    match caught_up {
        true => 0,
        false => (high - written.next.max(low)).max(0),
    }
}

/// Measures lag every `interval` until dropped; removes its series when partitions go.
pub(super) struct LagProbe {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LagProbe {
    pub(super) fn start(
        kafka: &KafkaSettings,
        topic: String,
        positions: Positions,
        consumed: Consumed,
        interval: Duration,
    ) -> Result<Self, SinkError> {
        let client: BaseConsumer = kafka
            .restore_consumer("readstate-sink-lag")
            .create()
            .map_err(KafkaError::from)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let owner = series::Owner::new();
        let thread = std::thread::Builder::new()
            .name("sink-lag".into())
            .spawn(move || {
                let mut next = Instant::now();
                while !flag.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        measure(owner, &client, &topic, &positions, &consumed);
                        next = Instant::now() + interval;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                series::retain(owner, LAG, "partition", |_| false);
            })
            .map_err(|e| SinkError::Fatal(format!("starting the sink lag thread: {e}")))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LagProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn measure(
    owner: series::Owner,
    client: &BaseConsumer,
    topic: &str,
    positions: &Positions,
    consumed: &Consumed,
) {
    let owned = positions.lock().expect("positions lock").clone();
    for (p, written) in &owned {
        if let Ok((low, high)) = client.fetch_watermarks(topic, *p, Duration::from_secs(2)) {
            let at = consumed.lock().expect("consumed lock").get(p).copied();
            let lag = lag(*written, low, high, at.as_ref());
            series::set(owner, LAG, &[("partition", &p.to_string())], lag as f64);
        }
    }
    // Partitions given up meanwhile lose their series.
    let owned = positions.lock().expect("positions lock");
    series::retain(owner, LAG, "partition", |p| {
        p.parse().is_ok_and(|p: i32| owned.contains_key(&p))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_that_wrote_everything_up_to_a_commit_marker_is_not_behind() {
        let at = |next_fetch, queued| ConsumedAt { next_fetch, queued };
        let all = |next| Written { next, all: true };
        // The output's last offset (99) is a commit marker: written through 98, fetched past it.
        assert_eq!(lag(all(99), 0, 100, Some(&at(100, 0))), 0);
        // Before: the stored offset alone says 1 behind.
        assert_eq!(lag(all(99), 0, 100, None), 1);
        // Accepted but not written yet (an outage): behind by what is not written.
        let pending = Written {
            next: 60,
            all: false,
        };
        assert_eq!(lag(pending, 0, 100, Some(&at(100, 0))), 40);
        // More arrived since the consumer's last statistics.
        assert_eq!(lag(all(99), 0, 150, Some(&at(100, 0))), 51);
    }
}
