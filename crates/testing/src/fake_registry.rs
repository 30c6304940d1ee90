//! A Confluent-compatible schema registry over HTTP on 127.0.0.1:0, for tests: the
//! endpoints readstate uses (`GET /schemas/ids/{id}`, `POST /subjects/{s}/versions`,
//! `GET /subjects/{s}/versions/latest`), with
//! outages on demand (HTTP 503 for the next N requests) and request counters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

#[derive(Default)]
struct Inner {
    /// id → (subject, schema text).
    schemas: Mutex<HashMap<u32, (String, String)>>,
    /// Answer this many more lookups / registrations with 503 (a registry that is down).
    fail_lookups: AtomicU64,
    fail_registrations: AtomicU64,
    failed: AtomicU64,
    /// Answer every lookup with 503 until then (a registry that is down for a while).
    down_until: Mutex<Option<std::time::Instant>>,
}

pub struct FakeRegistry {
    inner: Arc<Inner>,
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

type Reply = (StatusCode, Json<Value>);

fn unavailable(inner: &Inner, budget: &AtomicU64) -> Option<Reply> {
    let left = budget.load(Ordering::SeqCst);
    if left > 0 {
        budget.store(left - 1, Ordering::SeqCst);
        inner.failed.fetch_add(1, Ordering::SeqCst);
        return Some((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error_code": 50301, "message": "registry is down (test)"})),
        ));
    }
    None
}

async fn schema_by_id(State(inner): State<Arc<Inner>>, Path(id): Path<u32>) -> Reply {
    if let Some(r) = unavailable(&inner, &inner.fail_lookups) {
        return r;
    }
    let down = *inner.down_until.lock().unwrap();
    if down.is_some_and(|t| std::time::Instant::now() < t) {
        inner.failed.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error_code": 50301, "message": "registry is down (test)"})),
        );
    }
    match inner.schemas.lock().unwrap().get(&id) {
        Some((_, s)) => (StatusCode::OK, Json(json!({ "schema": s }))),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error_code": 40403, "message": "Schema not found"})),
        ),
    }
}

async fn latest(State(inner): State<Arc<Inner>>, Path(subject): Path<String>) -> Reply {
    let m = inner.schemas.lock().unwrap();
    let latest = m
        .iter()
        .filter(|(_, (s, _))| *s == subject)
        .max_by_key(|(id, _)| **id);
    match latest {
        Some((id, (_, schema))) => (
            StatusCode::OK,
            Json(json!({"subject": subject, "id": id, "schema": schema})),
        ),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error_code": 40401, "message": "Subject not found"})),
        ),
    }
}

async fn register(
    State(inner): State<Arc<Inner>>,
    Path(subject): Path<String>,
    Json(body): Json<Value>,
) -> Reply {
    if let Some(r) = unavailable(&inner, &inner.fail_registrations) {
        return r;
    }
    let Some(schema) = body.get("schema").and_then(Value::as_str) else {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error_code": 42201, "message": "no schema"})),
        );
    };
    let id = insert(&inner, &subject, schema);
    (StatusCode::OK, Json(json!({ "id": id })))
}

fn insert(inner: &Inner, subject: &str, schema: &str) -> u32 {
    let mut m = inner.schemas.lock().unwrap();
    if let Some((id, _)) = m.iter().find(|(_, (_, s))| s == schema) {
        return *id;
    }
    // Ids unlike the local registry's fixed 1 and 2, so a mix-up cannot pass unnoticed.
    let id = 100 + m.len() as u32;
    m.insert(id, (subject.to_owned(), schema.to_owned()));
    id
}

impl FakeRegistry {
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route("/schemas/ids/{id}", get(schema_by_id))
            .route("/subjects/{subject}/versions", post(register))
            .route("/subjects/{subject}/versions/latest", get(latest))
            .with_state(inner.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app).await });
        Self {
            inner,
            addr,
            _runtime: rt,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Register a schema directly (as an upstream producer would) and return its id.
    pub fn add(&self, subject: &str, schema: &str) -> u32 {
        insert(&self.inner, subject, schema)
    }

    /// The id under which `subject` holds a schema, if any.
    pub fn id_of(&self, subject: &str) -> Option<u32> {
        let m = self.inner.schemas.lock().unwrap();
        m.iter().find(|(_, (s, _))| s == subject).map(|(id, _)| *id)
    }

    /// Answer the next `lookups` schema lookups and `registrations` registrations with 503.
    pub fn fail_next(&self, lookups: u64, registrations: u64) {
        self.inner.fail_lookups.store(lookups, Ordering::SeqCst);
        self.inner
            .fail_registrations
            .store(registrations, Ordering::SeqCst);
    }

    /// Answer every schema lookup with 503 for `d` from now.
    pub fn down_for(&self, d: std::time::Duration) {
        *self.inner.down_until.lock().unwrap() = Some(std::time::Instant::now() + d);
    }

    /// Requests answered with 503 so far.
    pub fn failed(&self) -> u64 {
        self.inner.failed.load(Ordering::SeqCst)
    }
}
