//! Repeated warnings told once per interval per kind: a broker outage makes the consumer
//! report `AllBrokersDown` on every poll, and a log line per poll says nothing more than
//! the first. The first of a kind is logged at once; repeats within the interval are
//! counted and told with the next line of that kind. Time is passed in (the caller's
//! clock), so the rule is tested without waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often one kind of warning is logged at most.
pub(super) const REPEAT_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(super) struct RepeatLog {
    interval: Duration,
    /// Per kind: when it was last logged, and how many were left out since.
    kinds: HashMap<String, (Instant, u64)>,
}

impl RepeatLog {
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            interval,
            kinds: HashMap::new(),
        }
    }

    /// Whether a warning of `kind` seen at `now` is logged: `Some(n)` with the `n` left
    /// out since the last one, or `None` (counted, left out).
    pub(super) fn admit(&mut self, kind: &str, now: Instant) -> Option<u64> {
        match self.kinds.get_mut(kind) {
            Some((last, left_out)) if now.duration_since(*last) < self.interval => {
                *left_out += 1;
                None
            }
            Some((last, left_out)) => {
                *last = now;
                Some(std::mem::take(left_out))
            }
            None => {
                self.kinds.insert(kind.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_logged_once_per_interval_with_the_count_left_out() {
        let mut log = RepeatLog::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(log.admit("AllBrokersDown", t0), Some(0));
        for i in 1..=20 {
            let at = t0 + Duration::from_secs(i);
            assert_eq!(log.admit("AllBrokersDown", at), None, "{i} s");
        }
        assert_eq!(
            log.admit("BrokerTransportFailure", t0),
            Some(0),
            "another kind"
        );
        assert_eq!(
            log.admit("AllBrokersDown", t0 + Duration::from_secs(30)),
            Some(20)
        );
        assert_eq!(
            log.admit("AllBrokersDown", t0 + Duration::from_secs(31)),
            None
        );
    }
}
