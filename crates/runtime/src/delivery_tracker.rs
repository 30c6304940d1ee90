//! DeliveryTracker: the record collector's producer context. It counts the records in
//! flight and the failed ones, remembers the highest acknowledged offset per changelog
//! partition (the next checkpoint), and routes librdkafka's log lines.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::message::DeliveryResult;
use rdkafka::producer::ProducerContext;
use rdkafka::{ClientContext, Message};

use crate::kafka::KafkaError;

#[derive(Default)]
struct Deliveries {
    /// Records handed to the producer whose delivery has not been reported yet.
    outstanding: u64,
    failed: u64,
    /// Failures other than a timeout (a refusal by the broker, a local error).
    refused: u64,
    first_error: Option<String>,
    /// Highest offset acknowledged per (store index, changelog partition) since the last
    /// `take`.
    changelog_high: HashMap<(usize, i32), i64>,
}

/// Producer context: counts outstanding and failed deliveries and remembers changelog
/// offsets. Waiting for acknowledgements waits on `drained` (signalled by the last delivery
/// report) rather than `flush`, which polls in 100 ms steps when another thread serves the
/// reports.
pub struct DeliveryTracker {
    /// The changelog topic of each store index (`None`: a store without one).
    changelog_topics: Vec<Option<String>>,
    state: Mutex<Deliveries>,
    drained: Condvar,
}

impl DeliveryTracker {
    pub(super) fn new(changelog_topics: Vec<Option<String>>) -> Self {
        Self {
            changelog_topics,
            state: Mutex::new(Deliveries::default()),
            drained: Condvar::new(),
        }
    }

    pub(super) fn sending(&self) {
        self.state.lock().expect("delivery lock").outstanding += 1;
    }

    /// A record refused before it was sent (`what` says why): `wait` reports it.
    pub(super) fn refused(&self, what: String) {
        let mut s = self.state.lock().expect("delivery lock");
        s.failed += 1;
        s.refused += 1;
        s.first_error.get_or_insert(what);
    }

    /// A record handed to the producer that failed at once.
    pub(super) fn failed(&self, what: String, expired: bool) {
        let mut s = self.state.lock().expect("delivery lock");
        self.settle(&mut s, Err(Failure { what, expired }));
    }

    /// Forget changelog offsets acknowledged before this point.
    pub(super) fn clear_changelog_offsets(&self) {
        self.state
            .lock()
            .expect("delivery lock")
            .changelog_high
            .clear();
    }

    /// Highest acknowledged changelog offset per (store index, partition) since the last
    /// clear.
    pub(super) fn take_changelog_offsets(&self) -> HashMap<(usize, i32), i64> {
        std::mem::take(&mut self.state.lock().expect("delivery lock").changelog_high)
    }

    fn settle(&self, s: &mut Deliveries, outcome: Result<(&str, i32, i64), Failure>) {
        s.outstanding = s.outstanding.saturating_sub(1);
        match outcome {
            Ok((topic, partition, offset)) => {
                let store = self
                    .changelog_topics
                    .iter()
                    .position(|t| t.as_deref() == Some(topic));
                if let Some(store) = store {
                    let e = s.changelog_high.entry((store, partition)).or_insert(offset);
                    *e = (*e).max(offset);
                }
            }
            Err(Failure { what, expired }) => {
                s.failed += 1;
                s.refused += u64::from(!expired);
                s.first_error.get_or_insert(what);
            }
        }
        if s.outstanding == 0 {
            self.drained.notify_all();
        }
    }

    /// Wait until nothing is in flight (or `timeout`), then report the first failure.
    pub(super) fn wait(&self, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().expect("delivery lock");
        while s.outstanding > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KafkaError::Delivery {
                    failed: s.outstanding,
                    last: format!("not acknowledged within {timeout:?}"),
                    expired: s.refused == 0,
                });
            }
            s = self.drained.wait_timeout(s, left).expect("delivery lock").0;
        }
        if s.failed > 0 {
            let err = KafkaError::Delivery {
                failed: s.failed,
                last: s.first_error.take().unwrap_or_default(),
                expired: s.refused == 0,
            };
            s.failed = 0;
            s.refused = 0;
            return Err(err);
        }
        Ok(())
    }

    pub(super) fn forget_failures_only(&self) {
        let mut s = self.state.lock().expect("delivery lock");
        s.failed = 0;
        s.refused = 0;
        s.first_error = None;
    }

    pub(super) fn forget_failures(&self) {
        let mut s = self.state.lock().expect("delivery lock");
        s.failed = 0;
        s.refused = 0;
        s.first_error = None;
        s.changelog_high.clear();
    }
}

/// A record the producer gave up on.
struct Failure {
    what: String,
    /// It timed out rather than being refused.
    expired: bool,
}

/// A delivery failure that only says time ran out (`message.timeout.ms`, a request
/// timeout): what a pause past the timeouts produces, unlike a broker's refusal.
pub(super) fn is_expiry(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::MessageTimedOut | C::OperationTimedOut | C::TimedOutQueue | C::RequestTimedOut)
    )
}

/// librdkafka's log lines and errors, except a fenced producer's: expected under
/// exactly_once_v2 when another instance took over (the task manager says it once, at
/// WARN, in readstate's words: tasks lost, producer recreated), they go to debug.
impl ClientContext for DeliveryTracker {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if is_fencing(message) {
            tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}");
            return;
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}"),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if is_fencing(reason) || is_fencing(&error.to_string()) {
            tracing::debug!(target: "librdkafka", "librdkafka: {error}: {reason}");
        } else {
            tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
        }
    }
}

/// Whether librdkafka's text is about this producer being fenced (its transactional id
/// taken over, or its epoch bumped).
fn is_fencing(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("fenced") || t.contains("old epoch") || t.contains("producer epoch")
}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut s = self.state.lock().expect("delivery lock");
        let outcome = match result {
            Ok(m) => Ok((m.topic(), m.partition(), m.offset())),
            Err((e, m)) => Err(Failure {
                what: format!("{} [{}]: {e}", m.topic(), m.partition()),
                expired: is_expiry(e),
            }),
        };
        self.settle(&mut s, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_changelog_offsets_and_surfaces_the_first_error() {
        let t = DeliveryTracker::new(vec![Some("cl".into()), None, Some("heads-cl".into())]);
        for _ in 0..5 {
            t.sending();
        }
        {
            let mut s = t.state.lock().unwrap();
            t.settle(&mut s, Ok(("cl", 1, 7)));
            t.settle(&mut s, Ok(("cl", 1, 5)));
            t.settle(&mut s, Ok(("heads-cl", 1, 3)));
            t.settle(&mut s, Ok(("out", 1, 99)));
        }
        assert!(
            t.wait(Duration::from_millis(10)).is_err(),
            "one record still in flight"
        );
        let failure = |what: &str, expired| {
            Err(Failure {
                what: what.into(),
                expired,
            })
        };
        t.settle(
            &mut t.state.lock().unwrap(),
            failure("out [2]: too large", false),
        );
        let e = t.wait(Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("out [2]: too large"), "{e}");
        assert!(
            matches!(e, KafkaError::Delivery { expired: false, .. }),
            "{e:?}"
        );
        assert!(t.wait(Duration::from_secs(1)).is_ok(), "reported once");
        // Timeouts only: the failure says so (a pause, not a refusal).
        for _ in 0..2 {
            t.sending();
            t.settle(
                &mut t.state.lock().unwrap(),
                failure("out [1]: timed out", true),
            );
        }
        let e = t.wait(Duration::from_secs(1)).unwrap_err();
        assert!(
            matches!(
                e,
                KafkaError::Delivery {
                    failed: 2,
                    expired: true,
                    ..
                }
            ),
            "{e:?}"
        );
        let high = t.state.lock().unwrap().changelog_high.clone();
        assert_eq!(high.get(&(0, 1)), Some(&7));
        assert_eq!(high.get(&(2, 1)), Some(&3), "per store's changelog");
        assert_eq!(high.len(), 2);
        t.forget_failures();
        assert!(t.state.lock().unwrap().changelog_high.is_empty());
    }
}
