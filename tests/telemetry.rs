//! The telemetry endpoints over a real listener bound to port 0.

use readstate::telemetry::{serve, Health};
use readstate_testing::http_get;

#[test]
fn endpoints_answer_metrics_health_and_readiness() {
    let health = Health::new();
    let server = serve("127.0.0.1:0".parse().unwrap(), health.clone()).unwrap();
    metrics::counter!("readstate_telemetry_selftest_total").increment(3);
    let get = |path: &str| http_get(server.addr(), path).unwrap();
    assert!(get("/ready").starts_with("HTTP/1.1 503"));
    health.set_ready(true);
    assert!(get("/ready").starts_with("HTTP/1.1 200"));
    assert!(get("/health").starts_with("HTTP/1.1 200"));
    assert!(get("/metrics").contains("readstate_telemetry_selftest_total 3"));
}
