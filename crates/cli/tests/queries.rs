//! The read API (issue 25) against instances started through `App` on the embedded broker:
//! answers equal the oracle at the position they report, `min_position` reads your writes,
//! a conversation is answered only by its owner (421 elsewhere), and bad requests get a
//! 400 naming what is wrong.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use readstate::model::StateKey;
use readstate::serde::LocalRegistry;
use readstate_cli::App;
use readstate_testing::fixtures::*;
use readstate_testing::kafka;
use readstate_testing::process::terminate;
use serde_json::Value;
use support::*;

/// An environment on the embedded broker with the instance directory's topic, which
/// `readstate run` creates on a real broker.
fn env() -> Env {
    let env = Env::new();
    let directory = env.topology().instances_topic();
    env.broker.create_topic(directory.as_str(), PARTS, &[]);
    env
}

/// Start an instance serving the read API on 127.0.0.1:0.
fn start_serving(env: &Env, dir: &std::path::Path) -> (Instance, SocketAddr) {
    serve_config(env.config(dir, Arc::new(LocalRegistry::new()), &env.props))
}

fn serve_config(cfg: readstate::runtime::RunConfig) -> (Instance, SocketAddr) {
    let app = App::new(cfg)
        .with_metrics("127.0.0.1:0".parse().unwrap())
        .start()
        .expect("instance starts");
    let addr = app.metrics_addr().expect("serving");
    (Instance(app), addr)
}

/// GET `path`: the status and the JSON body.
fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let raw = readstate_testing::http_get(addr, path)
        .unwrap_or_else(|e| panic!("{addr}{path}: the instance does not answer: {e}"));
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {raw}"));
    (status, json)
}

/// The last offset of every partition of `topic` that has records.
fn last_offsets(env: &Env) -> BTreeMap<i32, i64> {
    (kafka::end_offsets(&env.brokers(), &env.source)
        .into_iter()
        .enumerate())
    .filter(|(_, end)| *end > 0)
    .map(|(p, end)| (p as i32, end - 1))
    .collect()
}

/// One reader's state as the API gives it, after the source's `last` offsets.
fn reader_at(addr: SocketAddr, env: &Env, k: &StateKey, last: &BTreeMap<i32, i64>) -> (u16, Value) {
    let (c, r) = (&k.conversation, &k.reader);
    let (status, body) = get(
        addr,
        &format!("/v1/conversations/{c}/readers/{r}?timeout_ms=5000"),
    );
    if status != 200 {
        return (status, body);
    }
    let p = body["partition"].as_i64().unwrap() as i32;
    let path = format!(
        "/v1/conversations/{}/readers/{}?min_position={}:{p}:{}&timeout_ms=5000",
        k.conversation, k.reader, env.source, last[&p]
    );
    get(addr, &path)
}

fn check_answer(k: &StateKey, x: &Expected, body: &Value, env: &Env, last: &BTreeMap<i32, i64>) {
    let p = body["partition"].as_i64().unwrap() as i32;
    let at = body["position"][&env.source][p.to_string()]
        .as_i64()
        .unwrap();
    assert!(
        at >= last[&p],
        "{k:?}: position {at} before the asked {}",
        last[&p]
    );
    assert_eq!(
        body["last_read_seq"].as_i64(),
        Some(x.max_seq),
        "{k:?}: {body}"
    );
    assert_eq!(body["version"].as_i64(), Some(x.advances), "{k:?}: {body}");
    assert_eq!(
        body["events_total"].as_i64(),
        Some(x.events),
        "{k:?}: {body}"
    );
    assert_eq!(
        body["device_id"].as_str(),
        x.device_of_max.as_deref(),
        "{k:?}"
    );
}

#[test]
fn answers_equal_the_oracle_at_their_position_and_read_your_writes() {
    let env = env();
    let (inst, addr) = start_serving(&env, env.state.path());
    let mut events = zipf_workload(41, 4_000);
    env.produce(&events, 0);
    let last = last_offsets(&env);
    let want = oracle(&events);
    wait_for(
        "the instance to own every task",
        Duration::from_secs(60),
        || {
            want.keys()
                .all(|k| reader_at(addr, &env, k, &last).0 == 200)
        },
    );
    for (k, x) in &want {
        let (status, body) = reader_at(addr, &env, k, &last);
        assert_eq!(status, 200, "{k:?}: {body}");
        check_answer(k, x, &body, &env, &last);
    }
    // Read your writes: one more advance, asked for at the offset the producer got.
    let k = want.keys().next().unwrap().clone();
    let mut e = events.iter().find(|e| e.key() == k).unwrap().clone();
    e.message_seq = want[&k].max_seq + 1;
    e.device_id = Some("new-device".into());
    env.produce(std::slice::from_ref(&e), 0);
    events.push(e);
    let last = last_offsets(&env);
    let (status, body) = reader_at(addr, &env, &k, &last);
    assert_eq!(status, 200, "{body}");
    check_answer(&k, &oracle(&events)[&k], &body, &env, &last);
    check_conversation_views(addr, &oracle(&events), &k);
    inst.stop();
}

/// Every reader of `k`'s conversation, and read-by counts at a few positions.
fn check_conversation_views(addr: SocketAddr, want: &HashMap<StateKey, Expected>, k: &StateKey) {
    let c = &k.conversation;
    let mut seqs: BTreeMap<String, i64> = (want.iter())
        .filter(|(key, _)| key.conversation == *c)
        .map(|(key, x)| (key.reader.to_string(), x.max_seq))
        .collect();
    let (status, body) = get(addr, &format!("/v1/conversations/{c}/readers"));
    assert_eq!(status, 200, "{body}");
    let got: BTreeMap<String, i64> = (body["readers"].as_array().unwrap().iter())
        .map(|r| {
            (
                r["reader"].to_string(),
                r["last_read_seq"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, seqs);
    for seq in [0, 5, want[k].max_seq] {
        let (status, body) = get(addr, &format!("/v1/conversations/{c}/read-by?seq={seq}"));
        assert_eq!(status, 200, "{body}");
        let n = seqs.values().filter(|s| **s >= seq).count() as i64;
        assert_eq!(body["read_by"].as_i64(), Some(n), "seq {seq}: {body}");
        assert_eq!(body["of"].as_i64(), Some(seqs.len() as i64));
    }
    seqs.clear();
}

/// Every key asked of `addr` is answered (by it, or forwarded to its owner) with the
/// oracle's state.
fn all_answered(
    addr: SocketAddr,
    env: &Env,
    want: &HashMap<StateKey, Expected>,
    last: &BTreeMap<i32, i64>,
) -> bool {
    want.iter().all(|(k, x)| {
        let (status, body) = reader_at(addr, env, k, last);
        if status == 200 {
            check_answer(k, x, &body, env, last);
        }
        status == 200
    })
}

#[test]
fn any_instance_answers_through_the_owner_and_bad_requests_are_named() {
    let env = env();
    let events = zipf_workload(42, 1_000);
    env.produce(&events, 0);
    let last = last_offsets(&env);
    let want = oracle(&events);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, addr_a) = start_serving(&env, dirs[0].path());
    let (b, addr_b) = start_serving(&env, dirs[1].path());
    wait_for(
        "every key answered through either instance",
        Duration::from_secs(90),
        || all_answered(addr_a, &env, &want, &last) && all_answered(addr_b, &env, &want, &last),
    );
    // Without forwarding, a key owned elsewhere is a 421 naming the owner.
    let (mut here, mut there) = (0, 0);
    for k in want.keys() {
        let path = format!(
            "/v1/conversations/{}/readers/{}?forward=false",
            k.conversation, k.reader
        );
        match get(addr_a, &path) {
            (200, _) => here += 1,
            (421, body) => {
                assert_eq!(
                    body["owner"].as_str(),
                    Some(addr_b.to_string().as_str()),
                    "{body}"
                );
                there += 1;
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    assert!(
        here > 0 && there > 0,
        "both own some: {here} here, {there} there"
    );
    // A third instance moves partitions: a view naming the old owner is corrected.
    let (c, addr_c) = start_serving(&env, dirs[2].path());
    wait_for(
        "every key answered again after the rebalance",
        Duration::from_secs(90),
        || {
            [addr_a, addr_b, addr_c]
                .iter()
                .all(|addr| all_answered(*addr, &env, &want, &last))
        },
    );
    for (path, says) in [
        ("/v1/conversations/abc/readers/1", "conversation id"),
        ("/v1/conversations/1/readers/abc", "reader id"),
        ("/v1/conversations/1/readers?limit=0", "limit must be"),
        (
            "/v1/conversations/1/readers?colour=red",
            "unknown parameter",
        ),
        ("/v1/conversations/1/read-by", "seq is required"),
        ("/v1/conversations/1/read-by?seq=x", "seq must be"),
        (
            "/v1/conversations/1/readers/1?timeout_ms=-5",
            "timeout_ms must be",
        ),
        (
            "/v1/conversations/1/readers/1?min_position=x",
            "not topic:partition:offset",
        ),
    ] {
        let (status, body) = get(addr_a, path);
        assert_eq!(status, 400, "{path}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says), "{path}: {error}");
    }
    let doc = readstate_testing::http_get(addr_a, "/openapi.yaml").unwrap();
    assert!(
        doc.starts_with("HTTP/1.1 200") && doc.contains("openapi: 3"),
        "{doc}"
    );
    c.stop();
    b.stop();
    a.stop();
}

/// A partition that restores answers 503, or with `allow_stale` its stores as they are,
/// flagged stale and never ahead of the oracle; once restored, the exact state again.
#[test]
fn a_restoring_partition_answers_stale_only_when_asked() {
    let env = env();
    let events = zipf_workload(45, 1_500);
    env.produce(&events, 0);
    let last = last_offsets(&env);
    let want = oracle(&events);
    let dir = tempfile::tempdir().unwrap();
    let (a, addr) = start_serving(&env, dir.path());
    wait_for("every key answered", Duration::from_secs(60), || {
        all_answered(addr, &env, &want, &last)
    });
    a.stop();
    // The state is gone: the next start restores every store from its changelog, a few
    // records per step.
    std::fs::remove_dir_all(dir.path().join(&env.app)).unwrap();
    let mut cfg = env.config(dir.path(), Arc::new(LocalRegistry::new()), &env.props);
    cfg.restore_batch = 10;
    let (a, addr) = serve_config(cfg);
    let (mut refused, mut stale) = (0, 0);
    wait_for(
        "a refusal and a stale answer while restoring",
        Duration::from_secs(60),
        || {
            for (k, x) in &want {
                let path = format!("/v1/conversations/{}/readers/{}", k.conversation, k.reader);
                let (status, body) = get(addr, &path);
                refused += usize::from(
                    status == 503 && body["error"].as_str().unwrap().contains("restoring"),
                );
                let (status, body) = get(addr, &format!("{path}?allow_stale=true"));
                if status == 200 && body["stale"] == true {
                    let seq = body["last_read_seq"].as_i64().unwrap();
                    assert!(
                        seq <= x.max_seq,
                        "{k:?}: stale seq {seq} ahead of the oracle's {}",
                        x.max_seq
                    );
                    assert!(body["position"].as_object().unwrap().is_empty(), "{body}");
                    stale += 1;
                }
                if refused > 0 && stale > 0 {
                    return true;
                }
            }
            false
        },
    );
    wait_for(
        "every key answered once restored",
        Duration::from_secs(120),
        || all_answered(addr, &env, &want, &last),
    );
    a.stop();
}

/// Schemathesis (from PyPI, installed by `scripts/test`) generates requests from the
/// document the instance serves (`docs/openapi.yaml`, ids typed as the topology declares),
/// valid and not, against a live instance with data: no answer is a 5xx, every answer
/// conforms to the document, and bad input is refused with a 4xx. One check is left out:
/// `positive_data_acceptance`, because a `min_position` the schema allows may name a topic
/// or partition the conversation is not on, which is refused with 400 by design.
#[test]
fn the_openapi_document_holds_under_property_based_testing() {
    let st = std::env::var("READSTATE_SCHEMATHESIS")
        .expect("READSTATE_SCHEMATHESIS is not set: run scripts/test, which installs schemathesis");
    let env = env();
    let events = zipf_workload(43, 500);
    env.produce(&events, 0);
    let last = last_offsets(&env);
    let want = oracle(&events);
    let (inst, addr) = start_serving(&env, env.state.path());
    wait_for(
        "the instance to answer every key",
        Duration::from_secs(60),
        || all_answered(addr, &env, &want, &last),
    );
    let out = std::process::Command::new(&st)
        .args(["run", &format!("http://{addr}/openapi.yaml")])
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--max-examples", "60", "--workers", "1"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--seed", "7", "--no-color"])
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .expect("schemathesis runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    inst.stop();
}

/// Per key, in the order of its partition's offsets: (offset, seq) of every read event
/// the source topic holds (the independent oracle of answers at a position).
fn events_by_offset(env: &Env) -> HashMap<StateKey, Vec<(i64, i64)>> {
    use readstate::serde::avro::EventDecoder;
    let mut decoder = EventDecoder::new(Arc::new(LocalRegistry::new())).unwrap();
    let records = kafka::read_all(&env.brokers(), &env.source, |m| {
        use rdkafka::Message;
        (m.offset(), m.payload().unwrap().to_vec())
    });
    let mut out: HashMap<StateKey, Vec<(i64, i64)>> = HashMap::new();
    for (offset, payload) in records {
        futures::executor::block_on(decoder.prepare(std::iter::once(Some(payload.as_slice()))))
            .unwrap();
        let e = decoder.decode(Some(&payload)).unwrap();
        out.entry(e.key())
            .or_default()
            .push((offset, e.message_seq));
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

/// The oracle's (max seq, advances) of `events` up to `offset` (all with `None`).
fn oracle_at(events: &[(i64, i64)], offset: Option<i64>) -> (i64, i64) {
    let (mut max, mut advances) = (-1, 0);
    for (o, seq) in events {
        if offset.is_some_and(|at| *o > at) {
            break;
        }
        if *seq > max {
            (max, advances) = (*seq, advances + 1);
        }
    }
    (max, advances)
}

/// An answer reflects at least the position it claims, and no more than everything.
fn check_at_position(env: &Env, k: &StateKey, status: u16, body: &Value, events: &[(i64, i64)]) {
    let p = body["partition"].as_i64().map(|p| p.to_string());
    let at = p.and_then(|p| body["position"][&env.source][p].as_i64());
    // No position claimed (no commit yet): nothing is promised but the upper bound.
    let (lo_seq, lo_adv) = at.map_or((-1, 0), |o| oracle_at(events, Some(o)));
    let (hi_seq, hi_adv) = oracle_at(events, None);
    match status {
        200 => {
            let (seq, version) = (
                body["last_read_seq"].as_i64().unwrap(),
                body["version"].as_i64().unwrap(),
            );
            assert!(
                (lo_seq..=hi_seq).contains(&seq) && (lo_adv..=hi_adv).contains(&version),
                "{k:?} at position {at:?}: seq {seq} v{version}, the oracle says at least seq {lo_seq} v{lo_adv}, at most seq {hi_seq} v{hi_adv}"
            );
        }
        404 => assert_eq!(
            lo_seq, -1,
            "{k:?}: not found at position {at:?}, where the oracle has seq {lo_seq}"
        ),
        _ => {}
    }
}

/// On Apache Kafka: two `readstate run` processes serve the read API while events arrive;
/// one is killed with kill -9 and started again. Every answer either of them gives is the
/// oracle's state at or after the position it reports; at the end `min_position` with the
/// last offsets gives the final state through either instance.
#[test]
fn answers_hold_their_position_on_apache_kafka_through_a_kill_9() {
    let env = Env::real();
    let topology = env.state.path().join("topology.toml");
    std::fs::write(&topology, env.topology_text()).unwrap();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let serve = ["--metrics-addr", "127.0.0.1:0"];
    let spawn = |i: usize| {
        let log = dirs[i].path().join("readstate.log");
        let _ = std::fs::remove_file(&log);
        let child = spawn_cli_in(&env, &topology, dirs[i].path(), &serve);
        (child, metrics_addr(&log))
    };
    let (mut a, addr_a) = spawn(0);
    let (mut b, mut addr_b) = spawn(1);
    let events = zipf_workload(44, 8_000);
    let keys: Vec<StateKey> = oracle(&events).into_keys().collect();
    let producer = kafka::produce_paced(env.brokers(), env.source.clone(), events.clone(), 100);
    let mut answers: Vec<(StateKey, u16, Value)> = Vec::new();
    let mut ask = |addr: SocketAddr, k: &StateKey| {
        let path = format!("/v1/conversations/{}/readers/{}", k.conversation, k.reader);
        if let Ok(raw) = readstate_testing::http_get(addr, &path) {
            let status: u16 = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
            let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
            answers.push((k.clone(), status, serde_json::from_str(body).unwrap()));
        }
    };
    // Asked throughout the production (bounded), alternately of each instance.
    for (i, k) in keys.iter().cycle().take(200_000).enumerate() {
        if i > 1_000 && producer.is_finished() {
            break;
        }
        ask(if i % 2 == 0 { addr_a } else { addr_b }, k);
        if i == 500 {
            eprintln!("queries: kill -9 of instance B, then a restart");
            b.0.kill().unwrap();
            b.0.wait().unwrap();
            (b, addr_b) = spawn(1);
        }
    }
    producer.join().unwrap();
    let last = last_offsets(&env);
    let want = oracle(&events);
    wait_for(
        "both instances to answer every key at the end",
        Duration::from_secs(120),
        || all_answered(addr_a, &env, &want, &last) && all_answered(addr_b, &env, &want, &last),
    );
    let by_key = events_by_offset(&env);
    let answered = answers.iter().filter(|(_, s, _)| *s == 200).count();
    for (k, status, body) in &answers {
        check_at_position(&env, k, *status, body, &by_key[k]);
    }
    eprintln!("queries: {} answers during the run ({answered} with a state), each at or after its position", answers.len());
    assert!(answered > 100, "too few answers to judge: {answered}");
    terminate(&mut b);
    terminate(&mut a);
}
