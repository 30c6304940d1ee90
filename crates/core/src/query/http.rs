//! The read API over HTTP/JSON, served beside `/metrics` (see `docs/openapi.yaml`, served at
//! `/openapi.yaml`):
//!
//! - `GET /v1/conversations/{conversation}/readers/{reader}`: one reader's state;
//! - `GET /v1/conversations/{conversation}/readers?limit=N`: every reader's;
//! - `GET /v1/conversations/{conversation}/read-by?seq=S`: read by N of M at `seq`.
//!
//! Each takes `min_position=topic:partition:offset[,...]` and `timeout_ms` (how long to
//! wait for it; 0, the default, answers at once). Errors are JSON `{"error": ...}` with a
//! status that says what to do: 400 (the request), 404 (no such state at this position),
//! 421 (another instance owns the conversation), 503 (restoring, behind, starting; retry).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::{position_json, Freshness, QueryError, ReadStateQueries, MAX_READERS};
use crate::ids::ConversationId;

/// The API's description, kept in the repository and served as is.
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.yaml");

type Params = Query<HashMap<String, String>>;

/// The routes of the read API over `queries`.
pub fn routes(queries: Arc<ReadStateQueries>) -> Router {
    Router::new()
        .route(
            "/v1/conversations/{conversation}/readers/{reader}",
            get(one),
        )
        .route("/v1/conversations/{conversation}/readers", get(all))
        .route("/v1/conversations/{conversation}/read-by", get(read_by))
        .route("/openapi.yaml", get(openapi))
        .with_state(queries)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}

async fn one(
    State(q): State<Arc<ReadStateQueries>>,
    Path((c, r)): Path<(String, String)>,
    Query(params): Params,
) -> Response {
    let run = async {
        let (c, fresh) = common(&q, &c, &params, &["min_position", "timeout_ms"])?;
        let r = q.reader(&r)?;
        q.reader_state(&c, &r, &fresh).await
    };
    respond(run.await)
}

async fn all(
    State(q): State<Arc<ReadStateQueries>>,
    Path(c): Path<String>,
    Query(params): Params,
) -> Response {
    let run = async {
        let known = ["min_position", "timeout_ms", "limit"];
        let (c, fresh) = common(&q, &c, &params, &known)?;
        let limit = number(&params, "limit", 1000, 1, MAX_READERS as i64)? as usize;
        q.readers(&c, limit, &fresh).await
    };
    respond(run.await)
}

async fn read_by(
    State(q): State<Arc<ReadStateQueries>>,
    Path(c): Path<String>,
    Query(params): Params,
) -> Response {
    let run = async {
        let known = ["min_position", "timeout_ms", "seq"];
        let (c, fresh) = common(&q, &c, &params, &known)?;
        let Some(_) = params.get("seq") else {
            return Err(QueryError::BadRequest("seq is required".into()));
        };
        let seq = number(&params, "seq", 0, -1, i64::MAX)?;
        q.read_by(&c, seq, &fresh).await
    };
    respond(run.await)
}

/// The conversation and the freshness every query takes; unknown parameters are refused.
fn common(
    q: &ReadStateQueries,
    c: &str,
    params: &HashMap<String, String>,
    known: &[&str],
) -> Result<(ConversationId, Freshness), QueryError> {
    if let Some(k) = params.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(QueryError::BadRequest(format!(
            "unknown parameter {k:?}; this endpoint takes {}",
            known.join(", ")
        )));
    }
    let c = q.conversation(c)?;
    let min_position = match params.get("min_position") {
        Some(text) => q.min_position(&c, text)?,
        None => Default::default(),
    };
    let max = super::MAX_WAIT.as_millis() as i64;
    let timeout = Duration::from_millis(number(params, "timeout_ms", 0, 0, max)? as u64);
    let fresh = Freshness {
        min_position,
        timeout,
    };
    Ok((c, fresh))
}

/// An integer parameter within `[min, max]`, `default` when absent.
fn number(
    params: &HashMap<String, String>,
    name: &str,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, QueryError> {
    let Some(text) = params.get(name) else {
        return Ok(default);
    };
    match text.parse::<i64>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(QueryError::BadRequest(format!(
            "{name} must be an integer from {min} to {max}, not {text:?}"
        ))),
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<super::PositionJson>,
}

fn respond<T: Serialize>(r: Result<T, QueryError>) -> Response {
    let e = match r {
        Ok(v) => return Json(v).into_response(),
        Err(e) => e,
    };
    let (status, partition, position) = match &e {
        // The task closed between the lookup and the read (a rebalance): ask again.
        QueryError::Store(crate::state::StoreError::Closed { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, None, None)
        }
        QueryError::BadRequest(_) => (StatusCode::BAD_REQUEST, None, None),
        QueryError::NotFound { position, .. } => (StatusCode::NOT_FOUND, None, Some(position)),
        QueryError::NotOwned { partition, .. } => {
            (StatusCode::MISDIRECTED_REQUEST, Some(*partition), None)
        }
        QueryError::Restoring { partition } => {
            (StatusCode::SERVICE_UNAVAILABLE, Some(*partition), None)
        }
        QueryError::Behind {
            partition,
            position,
            ..
        } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(*partition),
            Some(position),
        ),
        QueryError::Starting => (StatusCode::SERVICE_UNAVAILABLE, None, None),
        QueryError::Store(_) | QueryError::Corrupt { .. } => {
            tracing::error!(error = %e, "query failed");
            (StatusCode::INTERNAL_SERVER_ERROR, None, None)
        }
    };
    let body = ErrorBody {
        error: e.to_string(),
        partition,
        position: position.map(position_json),
    };
    (status, Json(body)).into_response()
}
