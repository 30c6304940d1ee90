//! Retry pacing and time: one [`Backoff`] for every retry loop, and the [`Clock`] seam that
//! timing decisions read instead of `Instant::now()`, so tests can drive them.
//!
//! A `Backoff` doubles its delay after each failure from `initial` up to `cap`; with jitter
//! each delay is drawn from `[d/2, d)` (half the delay fixed, half random), which spreads the
//! retries of many instances after a shared outage. `reset` after a success.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

/// Exponential backoff with a cap and optional jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    jitter: bool,
    /// The delay the next failure waits (before jitter).
    next: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `initial`, doubles per failure up to `cap`; no jitter.
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Self {
            initial,
            cap: cap.max(initial),
            jitter: false,
            next: initial,
            failures: 0,
        }
    }

    /// The pacing of a remote dependency (schema registry, database): 100 ms doubling to
    /// 10 s, jittered.
    pub fn remote() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10)).with_jitter()
    }

    /// Draw each delay from `[d/2, d)`.
    pub fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// A failure: the delay to wait before the next attempt (the delay then doubles).
    pub fn fail(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        self.failures = self.failures.saturating_add(1);
        if self.jitter {
            let half = d / 2;
            half + half.mul_f64(rand::thread_rng().gen_range(0.0..1.0))
        } else {
            d
        }
    }

    /// The delay the next failure waits, before jitter (for log lines).
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure starts from `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.failures = 0;
    }
}

/// The time seam: timing heuristics ask a clock, so a test can move time by hand.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Instant;
}

/// The process's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to (the test implementation beside [`Clock`]).
#[derive(Debug)]
pub struct ManualClock {
    origin: Instant,
    elapsed_nanos: AtomicU64,
}

impl ManualClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            elapsed_nanos: AtomicU64::new(0),
        })
    }

    pub fn advance(&self, by: Duration) {
        self.elapsed_nanos
            .fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.origin + Duration::from_nanos(self.elapsed_nanos.load(Ordering::SeqCst))
    }
}

/// The clock of production code.
pub fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let delays: Vec<Duration> = (0..5).map(|_| b.fail()).collect();
        assert_eq!(delays, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(b.failures(), 5);
        b.reset();
        assert_eq!((b.fail(), b.failures()), (ms(100), 1));
    }

    #[test]
    fn jitter_stays_within_half_to_the_whole_delay() {
        let mut b = Backoff::new(Duration::from_millis(800), Duration::from_secs(1)).with_jitter();
        let d = b.fail();
        assert!(
            d >= Duration::from_millis(400) && d < Duration::from_millis(800),
            "{d:?}"
        );
        assert_eq!(b.peek(), Duration::from_secs(1), "doubled, then capped");
    }

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = ManualClock::new();
        let t0 = c.now();
        assert_eq!(c.now(), t0);
        c.advance(Duration::from_secs(3));
        assert_eq!(c.now() - t0, Duration::from_secs(3));
    }
}
