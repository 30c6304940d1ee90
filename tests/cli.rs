//! The command line: validate and describe, run as a user would.

use std::process::Command;

fn readstate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_readstate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn shipped() -> String {
    format!(
        "{}/topologies/read_receipts.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn validate_accepts_the_shipped_topology() {
    let (code, out, err) = readstate(&["validate", &shipped()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok"));
}

#[test]
fn validate_reports_three_mistakes_in_one_run() {
    let text = std::fs::read_to_string(shipped())
        .unwrap()
        .replace("inputs = [\"read-events\"]", "inputs = [\"read-evnts\"]")
        .replace("batch_size = 500", "batch_size = 0")
        .replace(
            "cache_max_entries = 500000",
            "cache_max_entries = 500000\ncompresion = \"lz4\"",
        );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, text).unwrap();
    let (code, _, err) = readstate(&["validate", f.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("3 error(s)"), "{err}");
    assert!(
        err.contains("processor[0].inputs[0]: no source named \"read-evnts\""),
        "{err}"
    );
    assert!(
        err.contains("sink[1].batch_size: must be between 1 and"),
        "{err}"
    );
    assert!(err.contains("compresion: unknown field"), "{err}");
}

#[test]
fn describe_prints_the_graph_and_internal_topics() {
    let (code, out, err) = readstate(&["describe", &shipped()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Source: read-events"));
    assert!(out.contains("read-receipts-read-state-changelog (compacted changelog)"));
    assert!(out.contains("read-receipts-dlq (dead letters)"));
}

#[test]
fn bench_prints_every_figure_with_its_target() {
    let out = Command::new(env!("CARGO_BIN_EXE_readstate"))
        .args([
            "bench",
            "--events",
            "5000",
            "--core-events",
            "5000",
            "--conversations",
            "100",
            "--restore-records",
            "3000",
            "--e2e-events",
            "3000",
            "--keys",
            "20000",
            "--partitions",
            "4",
        ])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for figure in [
        "peak RSS",
        "core: decode",
        "core, frequent flushes",
        "end to end: run",
        "restore: changelog",
        "sink figures skipped",
    ] {
        assert!(text.contains(figure), "{figure} missing from:\n{text}");
    }
    assert!(
        text.contains("2,000,000") && text.contains("1,000,000"),
        "targets printed"
    );
}
