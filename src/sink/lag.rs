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

/// Stored `next_offset` per owned partition (-1: nothing written yet), shared with the
/// probe thread.
pub(super) type Positions = Arc<Mutex<BTreeMap<i32, i64>>>;

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
                        measure(owner, &client, &topic, &positions);
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

fn measure(owner: series::Owner, client: &BaseConsumer, topic: &str, positions: &Positions) {
    let owned = positions.lock().expect("positions lock").clone();
    for (p, next) in &owned {
        if let Ok((low, high)) = client.fetch_watermarks(topic, *p, Duration::from_secs(2)) {
            let lag = (high - (*next).max(low)).max(0);
            series::set(owner, LAG, &[("partition", &p.to_string())], lag as f64);
        }
    }
    // Partitions given up meanwhile lose their series.
    let owned = positions.lock().expect("positions lock");
    series::retain(owner, LAG, "partition", |p| {
        p.parse().is_ok_and(|p: i32| owned.contains_key(&p))
    });
}
