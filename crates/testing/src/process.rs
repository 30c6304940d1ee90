//! Child-process helpers of the fault tests: signals, graceful stop, waiting on a log.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use crate::wait::{wait_for, wait_until_explained};

/// Send a signal (`STOP`, `CONT`, `TERM`) to a child process.
pub fn signal(child: &std::process::Child, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig}");
}

/// SIGTERM, and the process exits 0 after its last flush and commit.
pub fn terminate(child: &mut std::process::Child) {
    terminate_logged(child, "the child", String::new);
}

/// SIGTERM, and a clean exit within a bounded time; on failure, the end of its `log` (and
/// the child is killed).
pub fn terminate_logged(child: &mut std::process::Child, what: &str, log: impl Fn() -> String) {
    let status = terminated(child, what, &log);
    assert!(
        status.success(),
        "{what} exited with {status} on SIGTERM; its log ends:\n{}",
        log()
    );
}

/// The assertion librdkafka 2.12.1 (the newest that rdkafka-sys bundles) can abort on when
/// a partition's removal from the assignment is served again before its fetcher stopped:
/// librdkafka#5573, fixed by librdkafka#5574 after 2.15.0, in no rdkafka-sys release yet.
/// Seen after an assignment lost past the session timeout, at a later rebalance or close.
pub const LIBRDKAFKA_5573: &str =
    "rd_kafka_assignment_partition_stopped: Assertion `rktp->rktp_started' failed";

/// [`terminate_logged`] for a test that pauses instances past their session timeout: a
/// clean exit, or the abort of [`LIBRDKAFKA_5573`] named in its log and nothing else (an
/// abort loses nothing a kill -9 would not, which the same tests check). True if it
/// aborted so.
pub fn terminate_logged_past_upstream_abort(
    child: &mut std::process::Child,
    what: &str,
    log: impl Fn() -> String,
) -> bool {
    let status = terminated(child, what, &log);
    if status.success() {
        return false;
    }
    let text = log();
    assert!(
        status.signal() == Some(6) && text.contains(LIBRDKAFKA_5573),
        "{what} exited with {status} on SIGTERM; its log ends:\n{text}"
    );
    eprintln!("{what} aborted in librdkafka (librdkafka#5573), not in readstate");
    true
}

/// SIGTERM, and the exit status within a bounded time (else the child is killed and the
/// test fails with the end of its `log`).
fn terminated(
    child: &mut std::process::Child,
    what: &str,
    log: &impl Fn() -> String,
) -> std::process::ExitStatus {
    signal(child, "TERM");
    let pid = child.id().to_string();
    let status = wait_until_explained(
        &format!("{what} to exit within 60 s of SIGTERM"),
        Duration::from_secs(60),
        || child.try_wait().unwrap(),
        || {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status();
            format!("its log ends:\n{}", log())
        },
    );
    status
}

/// Wait (bounded) until a child's log has `needle`.
pub fn wait_log(path: &std::path::Path, needle: &str) {
    wait_for(
        &format!("{} to say {needle:?}", path.display()),
        Duration::from_secs(60),
        || std::fs::read_to_string(path).is_ok_and(|l| l.contains(needle)),
    );
}

/// A child process killed if the test ends (or panics) while it still runs: a failing
/// test leaves no `readstate run` behind to log into later tests' output. It is used as
/// the child itself (`Deref`).
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;

    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The last `lines` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The end of `dir/readstate.log` (200 lines), as the explanation of a failed wait.
pub fn log_in(dir: &std::path::Path) -> impl Fn() -> String {
    let path = dir.join("readstate.log");
    move || log_tail(&path, 200)
}

/// `Command::spawn` for tests: the child held in a [`KillOnDrop`], a failure to start it
/// naming the program.
pub trait SpawnGuarded {
    fn spawn_guarded(&mut self) -> KillOnDrop;
}

impl SpawnGuarded for std::process::Command {
    fn spawn_guarded(&mut self) -> KillOnDrop {
        match self.spawn() {
            Ok(child) => KillOnDrop(child),
            Err(e) => panic!("starting {:?}: {e}", self.get_program()),
        }
    }
}

/// `readstate run` arguments for a group that notices a killed member within seconds,
/// not librdkafka's default 45 s.
pub const QUICK_FAILOVER: [&str; 4] = [
    "-X",
    "session.timeout.ms=6000",
    "-X",
    "heartbeat.interval.ms=500",
];
