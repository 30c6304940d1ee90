//! The one bounded wait of the tests: every wait on an outcome polls through here, with a
//! deadline that names what never happened.

use std::time::{Duration, Instant};

/// Poll `probe` until it returns `Some`, at most `within`; panics naming `what` otherwise.
/// Polls back off from 10 ms to 200 ms.
pub fn wait_until<T>(what: &str, within: Duration, probe: impl FnMut() -> Option<T>) -> T {
    wait_until_explained(what, within, probe, String::new)
}

/// As [`wait_until`], adding `explain()` (e.g. the end of a child's log) to the panic.
pub fn wait_until_explained<T>(
    what: &str,
    within: Duration,
    probe: impl FnMut() -> Option<T>,
    explain: impl FnOnce() -> String,
) -> T {
    poll(what, within, Pause::Backoff, probe, explain)
}

/// Poll `cond` until it holds, at most `within`; panics naming `what` otherwise.
pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    wait_until(what, within, || cond().then_some(()))
}

/// As [`wait_for`], polling every `every` without backing off: for a test that must act
/// soon after the outcome (e.g. kill a process right after its first write).
pub fn wait_for_every(
    what: &str,
    within: Duration,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) {
    poll(
        what,
        within,
        Pause::Every(every),
        || cond().then_some(()),
        String::new,
    )
}

enum Pause {
    Backoff,
    Every(Duration),
}

fn poll<T>(
    what: &str,
    within: Duration,
    pause: Pause,
    mut probe: impl FnMut() -> Option<T>,
    explain: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + within;
    let mut next = match pause {
        Pause::Backoff => Duration::from_millis(10),
        Pause::Every(d) => d,
    };
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("waited {within:?} in vain for: {what}\n{}", explain());
        }
        std::thread::sleep(next);
        if let Pause::Backoff = pause {
            next = (next * 2).min(Duration::from_millis(200));
        }
    }
}
