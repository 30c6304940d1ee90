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
    readstate_testing::fixtures::repo_root()
        .join("topologies/read_receipts.toml")
        .display()
        .to_string()
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
    assert!(err.contains("store[0].compresion: unknown field"), "{err}");
}

/// `validate --schema-registry-url`: `topologies/json_read_receipts.toml` as JSON Schema
/// (`format = "json-schema"`) checked against what a producer registered: a schema it
/// fits passes; one missing a mapped field and typing another wrongly fails with both named;
/// no schema under the subject is named too.
#[test]
fn validate_checks_the_mapping_against_the_registered_json_schema() {
    let registry = readstate_testing::fake_registry::FakeRegistry::start();
    let text = std::fs::read_to_string(
        readstate_testing::fixtures::repo_root().join("topologies/json_read_receipts.toml"),
    )
    .unwrap()
    .replace("format = \"json\"", "format = \"json-schema\"");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("json.toml");
    std::fs::write(&f, text).unwrap();
    let file = f.to_str().unwrap();
    let url = registry.url();
    let validate = || readstate(&["validate", file, "--schema-registry-url", &url]);
    let (code, _, err) = validate();
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no schema is registered under read_receipt_events-value"),
        "{err}"
    );
    let property = |t: &str| serde_json::json!({ "type": t });
    let mut schema = serde_json::json!({
        "type": "object",
        "properties": {
            "msg_id": property("string"), "sender_id": property("string"),
            "reader_id": property("string"), "conversation_id": property("string"),
            "read_at": property("integer"), "device_id": property("string"),
        },
    });
    registry.add("read_receipt_events-value", &schema.to_string());
    let (code, out, err) = validate();
    assert_eq!(code, 0, "{out}{err}");
    let props = schema["properties"].as_object_mut().unwrap();
    props.remove("device_id");
    props.insert("reader_id".into(), property("boolean"));
    registry.add("read_receipt_events-value", &schema.to_string());
    let (code, _, err) = validate();
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("2 error(s)"), "{err}");
    assert!(
        err.contains("source \"read-receipt-events\".fields.reader: \"reader_id\" in the schema of read_receipt_events-value: it is boolean, reader needs integer or string"),
        "{err}"
    );
    assert!(
        err.contains(
            "source \"read-receipt-events\".fields.device: \"device_id\" is not in the schema"
        ),
        "{err}"
    );
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
    for target in [">= 4,000,000", ">= 2,000,000", "<= 512"] {
        assert!(
            text.contains(target),
            "target {target} missing from:\n{text}"
        );
    }
}

/// The shipped topology without its PostgreSQL sink, in `dir`.
fn without_sink(dir: &std::path::Path) -> String {
    let text = std::fs::read_to_string(shipped()).unwrap();
    let cut = text.rfind("[[sink]]").unwrap();
    let file = dir.join("no-sink.toml");
    std::fs::write(&file, &text[..cut]).unwrap();
    file.display().to_string()
}

/// A loopback port nothing listens on (bound to 0, then closed).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn readstate_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_readstate"));
    c.args(args).env("RUST_LOG", "info");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `run --local-schemas --topology <topology> --brokers <brokers>`.
fn run_args<'a>(topology: &'a str, brokers: &'a str) -> [&'a str; 6] {
    [
        "run",
        "--local-schemas",
        "--topology",
        topology,
        "--brokers",
        brokers,
    ]
}

/// `readstate [global…] run` against a closed port: (exit code, stderr, the brokers).
fn run_without_broker(global: &[&str]) -> (i32, String, String) {
    let brokers = format!("127.0.0.1:{}", closed_port());
    let state = tempfile::tempdir().unwrap();
    let topology = without_sink(state.path());
    let args = [global, &run_args(&topology, &brokers)[..]].concat();
    let (code, _, err) = readstate_env(&args, &[("STATE_DIR", state.path().to_str().unwrap())]);
    (code, err, brokers)
}

/// An unreachable broker is named in the error, and the client's own complaint about it is
/// logged once, not once per client and retry.
#[test]
fn an_unreachable_broker_is_named_once() {
    let started = std::time::Instant::now();
    let (code, err, brokers) = run_without_broker(&[]);
    assert_ne!(code, 0);
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(
        err.contains(&format!("cannot reach Kafka at {brokers}")),
        "{err}"
    );
    let refused = err
        .lines()
        .filter(|l| l.contains("Connection refused"))
        .count();
    assert!(
        refused <= 2,
        "{refused} lines about the refused connection:\n{err}"
    );
}

/// A state directory that cannot be created fails at once, naming the path, before the
/// instance contacts Kafka (so a crash loop causes no rebalances).
#[test]
fn an_unusable_state_directory_is_named_before_joining_the_group() {
    let brokers = format!("127.0.0.1:{}", closed_port());
    let file = tempfile::NamedTempFile::new().unwrap();
    let bad = file.path().join("state");
    let started = std::time::Instant::now();
    let shipped = shipped();
    let (code, _, err) = readstate_env(
        &run_args(&shipped, &brokers),
        &[("STATE_DIR", bad.to_str().unwrap())],
    );
    assert_ne!(code, 0);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "no Kafka timeout first"
    );
    assert!(
        err.contains(&format!(
            "state directory {}/read-receipts cannot be created",
            bad.display()
        )),
        "{err}"
    );
    assert!(!err.contains("cannot reach Kafka"), "{err}");
}

/// A registry URL without a scheme, or on a closed port, fails at start naming the URL.
#[test]
fn a_bad_registry_url_fails_at_start_naming_it() {
    let brokers = format!("127.0.0.1:{}", closed_port());
    let run = |url: &str| {
        readstate_env(
            &[
                "run",
                "--topology",
                &shipped(),
                "--brokers",
                &brokers,
                "--schema-registry-url",
                url,
            ],
            &[],
        )
    };
    let (code, _, err) = run("registry:8081");
    assert_ne!(code, 0);
    assert!(
        err.contains("\"registry:8081\"") && err.contains("no scheme"),
        "{err}"
    );
    let url = format!("http://127.0.0.1:{}", closed_port());
    let (code, _, err) = run(&url);
    assert_ne!(code, 0);
    assert!(
        err.contains("does not answer") && err.contains(&url),
        "{err}"
    );
}

/// Database errors name the host, never the password, and do not call an error that ends
/// the process "retriable".
#[test]
fn database_errors_name_the_host_and_hide_the_password() {
    let port = closed_port();
    let url = format!("postgres://reader:s3cret@127.0.0.1:{port}/chat");
    let (code, _, err) = readstate_env(
        &["migrate", "--topology", &shipped()],
        &[("DATABASE_URL", url.as_str())],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("reader@127.0.0.1:{port}/chat")),
        "{err}"
    );
    assert!(
        !err.contains("s3cret") && !err.contains("retriable"),
        "{err}"
    );
}

/// A missing topology file is named; guarded Kafka properties are refused, naming them.
#[test]
fn a_missing_topology_and_guarded_properties_are_named() {
    let (code, _, err) = readstate(&["validate", "/nonexistent/topology.toml"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("/nonexistent/topology.toml: cannot read"),
        "{err}"
    );
    // run prints the error chain: the OS error once.
    let (code, _, err) = readstate(&[
        "run",
        "-t",
        "/nonexistent/topology.toml",
        "--brokers",
        "x:1",
    ]);
    assert_ne!(code, 0);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    let shipped = shipped();
    let guarded = ["-X", "enable.auto.commit=true"];
    let state = tempfile::tempdir().unwrap();
    let (code, _, err) = readstate_env(
        &[&run_args(&shipped, "x:1")[..], &guarded[..]].concat(),
        &[("STATE_DIR", state.path().to_str().unwrap())],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("kafka property enable.auto.commit cannot be set: readstate sets it"),
        "{err}"
    );
}

/// `--log-format json`: every log line is one JSON object (the last line, the command's
/// own error, stays plain text).
#[test]
fn json_logs_are_one_object_per_line() {
    let (code, err, _) = run_without_broker(&["--log-format", "json"]);
    assert_ne!(code, 0);
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("error:")).collect();
    assert!(lines.len() >= 2, "{err}");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
    }
}

#[test]
fn help_never_prints_the_secrets_in_the_environment() {
    for command in ["run", "sink", "migrate", "demo", "bench", "loadgen"] {
        let out = Command::new(env!("CARGO_BIN_EXE_readstate"))
            .args([command, "--help"])
            .env("DATABASE_URL", "postgres://u:hunter2@db.example/app")
            .env(
                "SCHEMA_REGISTRY_URL",
                "https://reg:regsecret@registry.example",
            )
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{command} --help: {text}");
        for secret in ["hunter2", "regsecret", "db.example", "registry.example"] {
            assert!(
                !text.contains(secret),
                "{command} --help shows {secret}:\n{text}"
            );
        }
    }
}
