//! Dead-letter logging: each dead letter is counted in `readstate_dead_letters_total`
//! and kept in the dead-letter topic; log lines are limited per second.

use std::time::{Duration, Instant};

use crate::task::DeadLetter;

/// Dead letters logged one by one per second; beyond that they are counted and summed up
/// (the metric and the DLQ itself have every one).
pub(super) const DEAD_LETTER_LOGS_PER_SECOND: u32 = 10;

pub(super) fn log_dead_letter(d: &DeadLetter, limit: &mut LogLimiter) {
    let (log, suppressed) = limit.admit(Instant::now());
    if suppressed > 0 {
        tracing::warn!(
            suppressed,
            "more dead letters than logged in the last second; readstate_dead_letters_total and the dead-letter topic have them all"
        );
    }
    if log {
        tracing::warn!(topic = %d.topic, partition = d.partition, offset = d.offset, reason = d.reason, error = %d.error, "dead letter");
    }
    metrics::counter!("readstate_dead_letters_total", "reason" => d.reason).increment(1);
}

/// At most `per_second` log lines per one-second window; the rest are counted and
/// reported when the next window opens.
#[derive(Debug)]
pub(super) struct LogLimiter {
    per_second: u32,
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub(super) fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether to log this line, and how many were suppressed in the window that just
    /// closed (to report now).
    fn admit(&mut self, now: Instant) -> (bool, u64) {
        let mut closed = 0;
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            closed = std::mem::take(&mut self.suppressed);
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged < self.per_second {
            self.logged += 1;
            (true, closed)
        } else {
            self.suppressed += 1;
            (false, closed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_logs_are_limited_per_second_and_the_rest_counted() {
        let mut l = LogLimiter::new(3);
        let t0 = Instant::now();
        let first: Vec<(bool, u64)> = (0..5).map(|_| l.admit(t0)).collect();
        assert_eq!(
            first,
            vec![(true, 0), (true, 0), (true, 0), (false, 0), (false, 0)]
        );
        assert_eq!(
            l.admit(t0 + Duration::from_millis(999)),
            (false, 0),
            "same window"
        );
        assert_eq!(
            l.admit(t0 + Duration::from_secs(1)),
            (true, 3),
            "a new window reports the three suppressed"
        );
        assert_eq!(l.admit(t0 + Duration::from_secs(1)), (true, 0));
    }
}
