//! Where writer schemas come from: the [`SchemaResolver`] seam.
//!
//! - [`ConfluentRegistry`]: a Confluent-compatible registry over HTTP (via
//!   `schema_registry_converter`);
//! - [`LocalRegistry`]: the schemas in `schemas/` with fixed ids (read events `1`, receipt
//!   updates `2`), for running without a registry and for tests. Other schemas can be added
//!   with fixed ids (e.g. an evolved writer).

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use schema_registry_converter::async_impl::schema_registry::{
    get_schema_by_id, post_schema, SrSettings,
};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use super::{SerdeError, READ_EVENT_SCHEMA, RECEIPT_UPDATE_SCHEMA};

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
        Self {
            schemas: Mutex::new(m),
        }
    }

    /// Serve `schema` under a fixed `id` (e.g. an evolved writer schema).
    pub fn with_schema(self, id: u32, schema: &str) -> Self {
        self.schemas
            .lock()
            .expect("registry lock")
            .insert(id, schema.to_owned());
        self
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

/// A Confluent-compatible schema registry over HTTP.
pub struct ConfluentRegistry {
    settings: SrSettings,
}

impl ConfluentRegistry {
    /// `url` is the registry's base URL, e.g. `http://registry:8081`.
    pub fn new(url: &str, timeout: std::time::Duration) -> Result<Self, SerdeError> {
        let settings = SrSettings::new_builder(url.trim_end_matches('/').to_owned())
            .set_timeout(timeout)
            .build()
            .map_err(|e| SerdeError::Registry(e.to_string()))?;
        Ok(Self { settings })
    }
}

impl SchemaResolver for ConfluentRegistry {
    fn schema_by_id(&self, id: u32) -> BoxFuture<'_, Result<Option<String>, SerdeError>> {
        Box::pin(async move {
            match get_schema_by_id(id, &self.settings).await {
                Ok(s) => Ok(Some(s.schema)),
                Err(e) if e.retriable => Err(SerdeError::RegistryUnavailable(e.to_string())),
                Err(e) if is_not_found(&e.to_string()) => Ok(None),
                // Anything else that is not retriable (bad JSON, 5xx turned permanent) is
                // reported as unavailable too: a registry fault must never make a good
                // record a dead letter.
                Err(e) => Err(SerdeError::RegistryUnavailable(e.to_string())),
            }
        })
    }

    fn register<'a>(
        &'a self,
        subject: &'a str,
        schema: &'a str,
    ) -> BoxFuture<'a, Result<u32, SerdeError>> {
        Box::pin(async move {
            let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_owned());
            post_schema(&self.settings, subject.to_owned(), supplied)
                .await
                .map(|r| r.id)
                .map_err(|e| {
                    if e.retriable {
                        SerdeError::RegistryUnavailable(e.to_string())
                    } else {
                        SerdeError::Registry(e.to_string())
                    }
                })
        })
    }
}

/// The registry answers an unknown id with HTTP 404 and error code 40403.
fn is_not_found(msg: &str) -> bool {
    msg.contains("40403") || msg.contains("404")
}
