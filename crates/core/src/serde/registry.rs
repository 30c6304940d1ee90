//! Where writer schemas come from: the [`SchemaResolver`] seam.
//!
//! - [`ConfluentRegistry`]: a Confluent-compatible registry over HTTP;
//! - [`LocalRegistry`]: the schemas in `schemas/` with fixed ids (read events `1`, receipt
//!   updates `2`, message events `3`, conversation heads `4`), for running without a registry and for tests. Other schemas can be added
//!   with fixed ids (e.g. an evolved writer).

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;

use super::{
    SerdeError, CONVERSATION_HEAD_SCHEMA, MESSAGE_EVENT_SCHEMA, READ_EVENT_SCHEMA,
    RECEIPT_UPDATE_SCHEMA,
};

/// Looks up writer schemas by id and registers the schemas readstate writes.
pub trait SchemaResolver: Send + Sync {
    /// The schema text for `id`; `Ok(None)` when the registry says it does not exist.
    fn schema_by_id(&self, id: u32) -> BoxFuture<'_, Result<Option<String>, SerdeError>>;
    /// Register `schema` under `subject` (idempotent) and return its id.
    fn register<'a>(
        &'a self,
        subject: &'a str,
        schema: &'a str,
    ) -> BoxFuture<'a, Result<u32, SerdeError>>;
}

/// Fixed id of `schemas/read_event.avsc` in the local registry.
pub const LOCAL_READ_EVENT_ID: u32 = 1;
/// Fixed id of `schemas/receipt_update.avsc` in the local registry.
pub const LOCAL_RECEIPT_UPDATE_ID: u32 = 2;
/// Fixed id of `schemas/message_event.avsc` in the local registry.
pub const LOCAL_MESSAGE_EVENT_ID: u32 = 3;
/// Fixed id of `schemas/conversation_head.avsc` in the local registry.
pub const LOCAL_CONVERSATION_HEAD_ID: u32 = 4;

/// Schemas served from memory with fixed ids.
#[derive(Debug)]
pub struct LocalRegistry {
    schemas: Mutex<HashMap<u32, String>>,
}

impl Default for LocalRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalRegistry {
    pub fn new() -> Self {
        let mut m = HashMap::new();
        m.insert(LOCAL_READ_EVENT_ID, READ_EVENT_SCHEMA.to_owned());
        m.insert(LOCAL_RECEIPT_UPDATE_ID, RECEIPT_UPDATE_SCHEMA.to_owned());
        m.insert(LOCAL_MESSAGE_EVENT_ID, MESSAGE_EVENT_SCHEMA.to_owned());
        m.insert(
            LOCAL_CONVERSATION_HEAD_ID,
            CONVERSATION_HEAD_SCHEMA.to_owned(),
        );
        Self {
            schemas: Mutex::new(m),
        }
    }

    /// Serve `schema` under a fixed `id` (e.g. an evolved writer schema).
    pub fn with_schema(self, id: u32, schema: &str) -> Self {
        self.insert(id, schema);
        self
    }

    /// Serve `schema` under `id` from now on (a schema registered late).
    pub fn insert(&self, id: u32, schema: &str) {
        self.schemas
            .lock()
            .expect("registry lock")
            .insert(id, schema.to_owned());
    }
}

impl SchemaResolver for LocalRegistry {
    fn schema_by_id(&self, id: u32) -> BoxFuture<'_, Result<Option<String>, SerdeError>> {
        let s = self
            .schemas
            .lock()
            .expect("registry lock")
            .get(&id)
            .cloned();
        Box::pin(async move { Ok(s) })
    }

    fn register<'a>(
        &'a self,
        _subject: &'a str,
        schema: &'a str,
    ) -> BoxFuture<'a, Result<u32, SerdeError>> {
        let mut m = self.schemas.lock().expect("registry lock");
        let id = match m.iter().find(|(_, s)| s.as_str() == schema) {
            Some((id, _)) => *id,
            None => {
                let id = m.keys().max().copied().unwrap_or(0) + 1;
                m.insert(id, schema.to_owned());
                id
            }
        };
        Box::pin(async move { Ok(id) })
    }
}

/// A Confluent-compatible schema registry over HTTP (`GET /schemas/ids/{id}`,
/// `POST /subjects/{subject}/versions`). User info in the URL becomes basic auth.
///
/// "Not found" is decided from the answer itself: HTTP 404 with the registry's error code
/// 40403. Anything else that fails (a 404 without that code, 5xx, 401, a timeout, a
/// refused connection) means the registry cannot answer now, never that a record is bad.
pub struct ConfluentRegistry {
    base: reqwest::Url,
    client: reqwest::Client,
}

/// The registry's error body: `{"error_code": 40403, "message": "Schema not found"}`.
#[derive(serde::Deserialize, Default)]
struct RegistryErrorBody {
    #[serde(default)]
    error_code: i64,
    #[serde(default)]
    message: String,
}

/// The registry's error code for an unknown schema id.
pub const SCHEMA_NOT_FOUND: i64 = 40403;
/// The registry's error codes for an unknown subject, and for a subject with no versions.
pub const SUBJECT_NOT_FOUND: i64 = 40401;
pub const VERSION_NOT_FOUND: i64 = 40402;

impl ConfluentRegistry {
    /// `url` is the registry's base URL, e.g. `http://registry:8081`; it must have an
    /// http or https scheme and a host.
    pub fn new(url: &str, timeout: std::time::Duration) -> Result<Self, SerdeError> {
        let base = parse_registry_url(url)?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(std::time::Duration::from_secs(5)))
            // No idle connection is kept. One client serves several threads, each with its
            // own runtime (the stream thread's, every sink's), and a pooled connection is
            // driven by a task on the runtime that opened it: taken from the pool by
            // another runtime while its own is not driven, a request stalled until the
            // timeout. Look-ups are cached per id, so a connection per request costs
            // nothing that matters.
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| SerdeError::Registry(format!("{}: {e}", redacted(&base))))?;
        Ok(Self { base, client })
    }

    /// The text of the latest schema registered under `subject` (`None`: no such subject);
    /// `GET /subjects/{subject}/versions/latest`.
    pub async fn latest(&self, subject: &str) -> Result<Option<String>, SerdeError> {
        let path = format!("subjects/{subject}/versions/latest");
        self.get_schema(&path, &[SUBJECT_NOT_FOUND, VERSION_NOT_FOUND])
            .await
    }

    /// `GET path`: the `schema` of the answer, or `None` on a 404 with one of `not_found`'s
    /// error codes. Anything else means the registry cannot answer now.
    async fn get_schema(
        &self,
        path: &str,
        not_found: &[i64],
    ) -> Result<Option<String>, SerdeError> {
        #[derive(serde::Deserialize)]
        struct Found {
            schema: String,
        }
        let what = format!("GET /{path}");
        let res = self
            .client
            .get(self.endpoint(path))
            .send()
            .await
            .map_err(|e| self.unavailable(&what, describe_reqwest(&e)))?;
        let status = res.status();
        if status.is_success() {
            let found: Found = res
                .json()
                .await
                .map_err(|e| self.unavailable(&what, describe_reqwest(&e)))?;
            return Ok(Some(found.schema));
        }
        let body: RegistryErrorBody = res.json().await.unwrap_or_default();
        match (status.as_u16(), body.error_code) {
            (404, code) if not_found.contains(&code) => Ok(None),
            (404, code) => Err(self.unavailable(
                &what,
                format!("HTTP 404 with error code {code} (not {not_found:?}): is this a schema registry?"),
            )),
            _ => Err(self.unavailable(
                &what,
                format!("HTTP {status}, error code {}: {}", body.error_code, body.message),
            )),
        }
    }

    /// The URL without its password, for messages.
    pub fn url(&self) -> String {
        redacted(&self.base)
    }

    fn endpoint(&self, path: &str) -> reqwest::Url {
        let mut u = self.base.clone();
        let joined = format!("{}/{path}", u.path().trim_end_matches('/'));
        u.set_path(&joined);
        u
    }

    fn unavailable(&self, what: &str, e: impl std::fmt::Display) -> SerdeError {
        SerdeError::RegistryUnavailable(format!("{what} at {}: {e}", self.url()))
    }

    /// Check that the registry answers at all (at start-up): one request that must get an
    /// HTTP answer from a schema registry.
    pub async fn ping(&self) -> Result<(), SerdeError> {
        let res = self
            .client
            .get(self.endpoint("subjects"))
            .send()
            .await
            .map_err(|e| self.unavailable("GET /subjects", describe_reqwest(&e)))?;
        match res.status() {
            s if s.is_success() => Ok(()),
            s => Err(self.unavailable("GET /subjects", format!("HTTP {s}"))),
        }
    }
}

fn parse_registry_url(url: &str) -> Result<reqwest::Url, SerdeError> {
    let bad = |why: &str| SerdeError::Registry(format!("schema registry URL {url:?}: {why}"));
    if !url.contains("://") {
        return Err(bad("no scheme (expected e.g. http://registry:8081)"));
    }
    let u = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(u)
}

/// A URL with its password replaced by `***`.
fn redacted(u: &reqwest::Url) -> String {
    let mut u = u.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    u.to_string().trim_end_matches('/').to_owned()
}

/// reqwest's error with its cause chain (connection refused, timed out, ...).
fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl SchemaResolver for ConfluentRegistry {
    fn schema_by_id(&self, id: u32) -> BoxFuture<'_, Result<Option<String>, SerdeError>> {
        Box::pin(async move {
            self.get_schema(&format!("schemas/ids/{id}"), &[SCHEMA_NOT_FOUND])
                .await
        })
    }

    fn register<'a>(
        &'a self,
        subject: &'a str,
        schema: &'a str,
    ) -> BoxFuture<'a, Result<u32, SerdeError>> {
        Box::pin(async move {
            #[derive(serde::Deserialize)]
            struct Registered {
                id: u32,
            }
            let what = format!("POST /subjects/{subject}/versions");
            let res = self
                .client
                .post(self.endpoint(&format!("subjects/{subject}/versions")))
                .header("Content-Type", "application/vnd.schemaregistry.v1+json")
                .json(&serde_json::json!({ "schema": schema }))
                .send()
                .await
                .map_err(|e| self.unavailable(&what, describe_reqwest(&e)))?;
            let status = res.status();
            if status.is_success() {
                return res
                    .json::<Registered>()
                    .await
                    .map(|r| r.id)
                    .map_err(|e| self.unavailable(&what, describe_reqwest(&e)));
            }
            let body: RegistryErrorBody = res.json().await.unwrap_or_default();
            let detail = format!(
                "HTTP {status}, error code {}: {}",
                body.error_code, body.message
            );
            if status.is_server_error() || status.as_u16() == 429 {
                Err(self.unavailable(&what, detail))
            } else {
                Err(SerdeError::Registry(format!(
                    "{what} at {}: {detail}",
                    self.url()
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::routing::get;

    /// A registry answering ids 1 (found), 2 (404 with 40403), 3 (a 404 from something
    /// that is not a registry) and 4 (500).
    fn serve() -> (tokio::runtime::Runtime, String) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/schemas/ids/{id}",
            get(
                |axum::extract::Path(id): axum::extract::Path<u32>| async move {
                    let json = |code, body: serde_json::Value| (code, axum::Json(body));
                    match id {
                        1 => json(StatusCode::OK, serde_json::json!({"schema": "\"string\""})),
                        2 => json(
                            StatusCode::NOT_FOUND,
                            serde_json::json!({"error_code": 40403, "message": "Schema not found"}),
                        ),
                        3 => json(
                            StatusCode::NOT_FOUND,
                            serde_json::json!({"detail": "no route"}),
                        ),
                        _ => json(StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({})),
                    }
                },
            ),
        );
        rt.spawn(async move { axum::serve(listener, app).await });
        (rt, url)
    }

    #[test]
    fn not_found_is_decided_by_status_and_error_code() {
        let (rt, url) = serve();
        let reg = ConfluentRegistry::new(&url, std::time::Duration::from_secs(5)).unwrap();
        let get = |id| rt.block_on(reg.schema_by_id(id));
        assert_eq!(get(1).unwrap().as_deref(), Some("\"string\""));
        assert_eq!(get(2).unwrap(), None, "404 with 40403");
        for id in [3, 4] {
            match get(id) {
                Err(SerdeError::RegistryUnavailable(m)) => assert!(m.contains(&url), "{m}"),
                other => panic!("id {id}: {other:?}"),
            }
        }
    }

    #[test]
    fn urls_without_a_scheme_or_host_are_refused_and_passwords_hidden() {
        let e = ConfluentRegistry::new("registry:8081", std::time::Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(e.to_string().contains("no scheme"), "{e}");
        assert!(ConfluentRegistry::new("ftp://r", std::time::Duration::from_secs(1)).is_err());
        let r = ConfluentRegistry::new("http://u:pw@r:8081", std::time::Duration::from_secs(1))
            .unwrap();
        assert_eq!(r.url(), "http://u:***@r:8081");
    }
}
