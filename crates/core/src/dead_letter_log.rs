//! Dead letters: logging (each one counted in `readstate_dead_letters_total` and kept in
//! the dead-letter topic; log lines limited per second, the rest summed up on a timer)
//! and the circuit breaker that stops an instance draining its input into the DLQ.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::topology::{BadRecords, OnBadRecord};

use crate::task::DeadLetter;

/// Dead letters logged one by one per second; beyond that they are counted and summed up
/// (the metric and the DLQ itself have every one).
pub const DEAD_LETTER_LOGS_PER_SECOND: u32 = 10;

pub fn log_dead_letter(d: &DeadLetter, limit: &mut LogLimiter) {
    let (log, suppressed) = limit.admit(Instant::now());
    report_suppressed(suppressed);
    if log {
        tracing::warn!(topic = %d.topic, partition = d.partition, offset = d.offset, reason = d.reason, error = %d.error, "dead letter");
    }
    metrics::counter!("readstate_dead_letters_total", "reason" => d.reason).increment(1);
}

fn report_suppressed(suppressed: u64) {
    if suppressed > 0 {
        tracing::warn!(
            suppressed,
            "more dead letters than logged in the last second; readstate_dead_letters_total and the dead-letter topic have them all"
        );
    }
}

/// Called from the poll loop: reports the dead letters not logged in a window that has
/// closed, even when no other dead letter comes.
pub fn flush_dead_letter_log(limit: &mut LogLimiter) {
    report_suppressed(limit.tick(Instant::now()));
}

/// At most `per_second` log lines per one-second window; the rest are counted and
/// reported when the next window opens (or by [`LogLimiter::tick`]).
#[derive(Debug)]
pub struct LogLimiter {
    per_second: u32,
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// How many were suppressed in a window that has closed by `now` (reported once).
    fn tick(&mut self, now: Instant) -> u64 {
        match self.window {
            Some(w) if now.duration_since(w) >= Duration::from_secs(1) => {
                std::mem::take(&mut self.suppressed)
            }
            _ => 0,
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

/// Why the circuit breaker stopped the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tripped {
    pub records: u64,
    pub dead: u64,
}

/// Dead letters against records consumed, over a sliding window of ten buckets.
#[derive(Debug)]
pub struct DeadLetterBreaker {
    policy: BadRecords,
    bucket: Duration,
    /// (bucket start, records, dead letters), oldest first.
    buckets: VecDeque<(Instant, u64, u64)>,
}

impl DeadLetterBreaker {
    const BUCKETS: u32 = 10;

    pub fn new(policy: BadRecords) -> Self {
        Self {
            policy,
            bucket: policy.window / Self::BUCKETS,
            buckets: VecDeque::with_capacity(Self::BUCKETS as usize + 1),
        }
    }

    /// Count a batch; `Some` when the window's share of dead letters is over the limit.
    pub fn record(&mut self, now: Instant, records: u64, dead: u64) -> Option<Tripped> {
        if self.policy.max_ratio >= 1.0 {
            return None;
        }
        while self
            .buckets
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) >= self.policy.window)
        {
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some((t, r, d)) if now.duration_since(*t) < self.bucket => {
                *r += records;
                *d += dead;
            }
            _ => self.buckets.push_back((now, records, dead)),
        }
        let (r, d) = self
            .buckets
            .iter()
            .fold((0, 0), |(r, d), (_, br, bd)| (r + br, d + bd));
        let over = r >= self.policy.min_records && d as f64 > self.policy.max_ratio * r as f64;
        over.then_some(Tripped {
            records: r,
            dead: d,
        })
    }
}

/// The dead letters of the records processed since the last commit: logged as they come,
/// produced with the commit's outputs, and judged against `on_bad_record` and the circuit
/// breaker after each polled batch.
#[derive(Debug)]
pub struct DeadLetterQueue {
    pending: Vec<DeadLetter>,
    log: LogLimiter,
    breaker: DeadLetterBreaker,
    policy: BadRecords,
    /// Where they are produced.
    topic: String,
}

impl DeadLetterQueue {
    pub fn new(policy: BadRecords, topic: String) -> Self {
        Self {
            pending: Vec::new(),
            log: LogLimiter::new(DEAD_LETTER_LOGS_PER_SECOND),
            breaker: DeadLetterBreaker::new(policy),
            policy,
            topic,
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Where a batch's dead letters are added (log them with [`DeadLetterQueue::log_since`]).
    pub fn pending_mut(&mut self) -> &mut Vec<DeadLetter> {
        &mut self.pending
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn push(&mut self, d: DeadLetter) {
        log_dead_letter(&d, &mut self.log);
        self.pending.push(d);
    }

    /// Log the dead letters added since there were `before`.
    pub fn log_since(&mut self, before: usize) {
        for d in &self.pending[before..] {
            log_dead_letter(d, &mut self.log);
        }
    }

    /// Report the lines suppressed in a window that has closed (from the poll loop).
    pub fn tick(&mut self) {
        flush_dead_letter_log(&mut self.log);
    }

    /// The dead letters to produce with this commit.
    pub fn take(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.pending)
    }

    /// Forget them (their records are read again).
    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// After a batch of `records` that added the dead letters from `before` on: why the
    /// instance must stop (`on_bad_record = "fail"`, or the circuit breaker), if it must.
    pub fn judge(&mut self, now: Instant, records: u64, before: usize) -> Option<String> {
        let new = &self.pending[before..];
        let policy = self.policy;
        match (policy.on_bad_record, new.first()) {
            (_, None) if records == 0 => None,
            (OnBadRecord::Fail, Some(d)) => Some(format!(
                "bad record at {} [{}] offset {} ({}: {}); on_bad_record = \"fail\" stops the instance, committing nothing past it",
                d.topic, d.partition, d.offset, d.reason, d.error
            )),
            _ => {
                let t = self.breaker.record(now, records, new.len() as u64)?;
                let last = self.pending.last().expect("dead letters in the window");
                Some(format!(
                    "circuit breaker: {} of the last {} records (within {}) were dead letters, above dead_letter_max_ratio {}; the last one: {} [{}] offset {} ({}: {}). Stopping instead of draining the input into {}; nothing of this batch is committed",
                    t.dead, t.records, humantime::format_duration(policy.window), policy.max_ratio,
                    last.topic, last.partition, last.offset, last.reason, last.error,
                    self.topic
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ratio: f64) -> BadRecords {
        BadRecords {
            max_ratio: ratio,
            window: Duration::from_secs(10),
            min_records: 100,
            ..BadRecords::default()
        }
    }

    #[test]
    fn the_breaker_trips_over_the_ratio_once_the_window_has_enough_records() {
        let mut b = DeadLetterBreaker::new(policy(0.5));
        let t0 = Instant::now();
        assert_eq!(b.record(t0, 60, 60), None, "fewer than min_records");
        let over = Some(Tripped {
            records: 100,
            dead: 60,
        });
        assert_eq!(b.record(t0, 40, 0), over, "60 of 100 is over 0.5");
        let mut b = DeadLetterBreaker::new(policy(0.5));
        assert_eq!(b.record(t0, 50, 10), None);
        assert_eq!(
            b.record(t0 + Duration::from_secs(1), 50, 40),
            None,
            "50 of 100"
        );
        assert!(
            b.record(t0 + Duration::from_secs(2), 1, 1).is_some(),
            "51 of 101"
        );
    }

    #[test]
    fn the_breaker_forgets_what_left_the_window_and_can_be_off() {
        let mut b = DeadLetterBreaker::new(policy(0.5));
        let t0 = Instant::now();
        assert_eq!(b.record(t0, 100, 40), None);
        // 40 + 20 of 100 + 20 would trip; 10 s later the first bucket has left the window.
        assert_eq!(b.record(t0 + Duration::from_secs(10), 100, 20), None);
        assert!(b.record(t0 + Duration::from_secs(11), 100, 90).is_some());
        let mut off = DeadLetterBreaker::new(policy(1.0));
        assert_eq!(off.record(t0, 1000, 1000), None);
    }

    #[test]
    fn a_closed_window_reports_its_suppressed_lines_on_a_tick() {
        let mut l = LogLimiter::new(1);
        let t0 = Instant::now();
        assert_eq!(l.admit(t0), (true, 0));
        assert_eq!(l.admit(t0), (false, 0));
        assert_eq!(l.admit(t0), (false, 0));
        assert_eq!(l.tick(t0 + Duration::from_millis(500)), 0, "window open");
        assert_eq!(l.tick(t0 + Duration::from_secs(1)), 2);
        assert_eq!(l.tick(t0 + Duration::from_secs(2)), 0, "reported once");
    }

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
