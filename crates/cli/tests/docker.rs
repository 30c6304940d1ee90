//! docker/: the compose stack checked against the Compose specification without a Docker
//! engine (dclint, which `scripts/test` installs), and the settings a platform team relies
//! on: Kafka keeps its data, ports are published on loopback only, no default passwords,
//! readstate services have a health check, the build context leaves `target/` out.

use std::process::Command;

fn root() -> String {
    readstate_testing::fixtures::repo_root()
        .display()
        .to_string()
}

/// Text without ANSI colour sequences (dclint may colour its output even when piped).
fn without_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters, up to the final letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn the_compose_stack_follows_the_compose_specification() {
    let dclint = std::env::var("READSTATE_DCLINT")
        .expect("READSTATE_DCLINT is not set: run scripts/test, which installs dclint");
    let out = Command::new(dclint)
        .arg(format!("{}/docker/compose.yaml", root()))
        .env("NO_COLOR", "1")
        .env("FORCE_COLOR", "0")
        .output()
        .unwrap();
    let said = without_ansi(&String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("(0 errors"),
        "schema errors or unbound ports:\n{said}"
    );
}

#[test]
fn the_compose_stack_is_safe_by_default() {
    let text = std::fs::read_to_string(format!("{}/docker/compose.yaml", root())).unwrap();
    assert!(
        text.contains("\"kafka-data:/var/lib/kafka/data\""),
        "Kafka keeps its data"
    );
    let published: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.starts_with("- \"")
                && l.matches(':').count() >= 1
                && l[3..].starts_with(|c: char| c.is_ascii_digit())
        })
        .filter(|l| !l.contains('/'))
        .collect();
    assert!(published.len() >= 6, "{published:?}");
    for p in &published {
        assert!(
            p.starts_with("- \"127.0.0.1:"),
            "published beyond loopback: {p}"
        );
    }
    assert!(
        !text.contains("POSTGRES_PASSWORD: readstate") && !text.contains("ADMIN_PASSWORD: admin")
    );
    assert!(
        text.contains("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?"),
        "a password is required"
    );
    assert!(text.contains("/dev/tcp/127.0.0.1/9464") && text.contains("GET /health"));
    let ignore = std::fs::read_to_string(format!("{}/.dockerignore", root())).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target"), "{ignore}");
}
