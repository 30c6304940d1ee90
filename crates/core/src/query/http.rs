//! The read API over HTTP/JSON, served beside `/metrics` (see `docs/openapi.yaml`, served at
//! `/openapi.yaml`):
//!
//! - `GET /v1/conversations/{conversation}/readers/{reader}`: one reader's state;
//! - `GET /v1/conversations/{conversation}/readers?limit=N`: every reader's;
//! - `GET /v1/conversations/{conversation}/read-by?seq=S`: read by N of M at `seq`.
//!
//! Each takes `min_position=topic:partition:offset[,...]` and `timeout_ms` (how long to
//! wait for it; 0, the default, answers at once), and `forward=false` (answer 421 with the
//! owner's address rather than asking the owner; see [`super::directory`]). Errors are JSON `{"error": ...}` with a
//! status that says what to do: 400 (the request), 404 (no such state at this position),
//! 421 (another instance owns the conversation), 503 (restoring, behind, starting; retry).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::directory::InstanceDirectory;
use super::{position_json, Freshness, QueryError, ReadStateQueries, MAX_READERS};
use crate::ids::{ConversationId, IdType, IdTypes};

/// The API's description, kept in the repository; an instance serves it with the id
/// schemas of its topology ([`openapi_for`]).
pub const OPENAPI: &str = include_str!("../../../../docs/openapi.yaml");

/// [`OPENAPI`] with the path ids typed as the topology declares them.
pub fn openapi_for(ids: &IdTypes) -> String {
    let schema = |t: IdType| match t {
        IdType::I64 => "{type: integer, format: int64}",
        IdType::Uuid => "{type: string, format: uuid}",
        IdType::String => "{type: string, minLength: 1, maxLength: 255}",
    };
    OPENAPI
        .replace("{type: string} # ids.user", schema(ids.user))
        .replace(
            "{type: string} # ids.conversation",
            schema(ids.conversation),
        )
}

/// Set on a request one instance forwards to another: the owner answers, never forwards.
pub const FORWARDED: &str = "x-readstate-forwarded";

/// How long a query not owned here waits for the directory to name a reachable owner.
pub const ROUTE_WAIT: Duration = Duration::from_secs(5);

type Params = Query<HashMap<String, String>>;

/// What the handlers share.
#[derive(Clone)]
struct Api {
    queries: Arc<ReadStateQueries>,
    /// Who owns what (none: a query not owned here gets 421).
    directory: Option<Arc<InstanceDirectory>>,
    client: reqwest::Client,
    /// The API's description, typed for this topology.
    openapi: Arc<str>,
}

/// The routes of the read API over `queries`; with a `directory`, a query of a
/// conversation another instance owns is forwarded to it.
pub fn routes(queries: Arc<ReadStateQueries>, directory: Option<Arc<InstanceDirectory>>) -> Router {
    let client = reqwest::Client::builder()
        .timeout(super::MAX_WAIT + Duration::from_secs(5))
        .build()
        .expect("an HTTP client without TLS settings builds");
    let api = Api {
        openapi: openapi_for(&queries.ids).into(),
        queries,
        directory,
        client,
    };
    Router::new()
        .route(
            "/v1/conversations/{conversation}/readers/{reader}",
            get(one),
        )
        .route("/v1/conversations/{conversation}/readers", get(all))
        .route("/v1/conversations/{conversation}/read-by", get(read_by))
        .route("/openapi.yaml", get(openapi))
        .with_state(api)
}

async fn openapi(State(api): State<Api>) -> Response {
    let doc = api.openapi.to_string();
    ([(header::CONTENT_TYPE, "application/yaml")], doc).into_response()
}

/// The request as the router needs it.
struct Asked {
    uri: Uri,
    forwarded: bool,
    forward: bool,
}

impl Asked {
    fn new(uri: Uri, headers: &HeaderMap, params: &HashMap<String, String>) -> Self {
        Self {
            uri,
            forwarded: headers.contains_key(FORWARDED),
            forward: params.get("forward").is_none_or(|v| v != "false"),
        }
    }
}

async fn one(
    State(api): State<Api>,
    Path((c, r)): Path<(String, String)>,
    Query(params): Params,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let q = &api.queries;
    let run = async {
        let (c, fresh) = common(q, &c, &params, &[])?;
        let r = q.reader(&r)?;
        q.reader_state(&c, &r, &fresh).await
    };
    let asked = Asked::new(uri, &headers, &params);
    finish(&api, run.await, asked).await
}

async fn all(
    State(api): State<Api>,
    Path(c): Path<String>,
    Query(params): Params,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let q = &api.queries;
    let run = async {
        let (c, fresh) = common(q, &c, &params, &["limit"])?;
        let limit = number(&params, "limit", 1000, 1, MAX_READERS as i64)? as usize;
        q.readers(&c, limit, &fresh).await
    };
    let asked = Asked::new(uri, &headers, &params);
    finish(&api, run.await, asked).await
}

async fn read_by(
    State(api): State<Api>,
    Path(c): Path<String>,
    Query(params): Params,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let q = &api.queries;
    let run = async {
        let (c, fresh) = common(q, &c, &params, &["seq"])?;
        let Some(_) = params.get("seq") else {
            return Err(QueryError::BadRequest("seq is required".into()));
        };
        let seq = number(&params, "seq", 0, -1, i64::MAX)?;
        q.read_by(&c, seq, &fresh).await
    };
    let asked = Asked::new(uri, &headers, &params);
    finish(&api, run.await, asked).await
}

/// The answer, or for a conversation owned elsewhere, the owner's answer (forwarded) or
/// its address (with `forward=false`).
async fn finish<T: Serialize>(api: &Api, r: Result<T, QueryError>, asked: Asked) -> Response {
    match (&r, &api.directory) {
        (Err(QueryError::NotOwned { partition, .. }), Some(d)) if !asked.forwarded => {
            route(api, d, *partition, &asked).await
        }
        _ => respond(r),
    }
}

/// Ask the owner the directory names, again after each change of the directory while
/// the owner named says it is not (a stale view) or cannot be reached.
async fn route(api: &Api, d: &InstanceDirectory, partition: i32, asked: &Asked) -> Response {
    let mut changes = d.subscribe();
    let deadline = tokio::time::Instant::now() + ROUTE_WAIT;
    let mut tried: Option<String> = None;
    loop {
        changes.mark_unchanged();
        let owner = d.owner_of(partition);
        if let (Some(addr), false) = (&owner, asked.forward) {
            return not_owned(partition, Some(addr), "ask the owner".into());
        }
        if let Some(addr) = &owner {
            match forward(api, addr, &asked.uri).await {
                Ok(resp) if resp.status() != StatusCode::MISDIRECTED_REQUEST => return resp,
                Ok(_) => tried = Some(format!("{addr} does not own it (a stale directory)")),
                Err(e) => tried = Some(format!("{addr} cannot be reached: {e}")),
            }
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            let why = tried.unwrap_or_else(|| "no instance claims it yet".into());
            return not_owned(partition, owner.as_deref(), why);
        }
    }
}

/// The owner's answer to the same request.
async fn forward(api: &Api, addr: &str, uri: &Uri) -> Result<Response, reqwest::Error> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let resp = (api.client.get(format!("http://{addr}{path}")))
        .header(FORWARDED, "1")
        .send()
        .await?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = resp.bytes().await?;
    Ok((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn not_owned(partition: i32, owner: Option<&str>, why: String) -> Response {
    let body = ErrorBody {
        error: format!("partition {partition} is not owned by this instance: {why}"),
        partition: Some(partition),
        position: None,
        owner: owner.map(str::to_owned),
    };
    (StatusCode::MISDIRECTED_REQUEST, Json(body)).into_response()
}

/// The conversation and the freshness every query takes; unknown parameters are refused.
fn common(
    q: &ReadStateQueries,
    c: &str,
    params: &HashMap<String, String>,
    own: &[&str],
) -> Result<(ConversationId, Freshness), QueryError> {
    let mut known = vec!["min_position", "timeout_ms", "forward", "allow_stale"];
    known.extend_from_slice(own);
    if let Some(k) = params.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(QueryError::BadRequest(format!(
            "unknown parameter {k:?}; this endpoint takes {}",
            known.join(", ")
        )));
    }
    for flag in ["forward", "allow_stale"] {
        if let Some(v) = params.get(flag).filter(|v| *v != "true" && *v != "false") {
            return Err(QueryError::BadRequest(format!(
                "{flag} must be true or false, not {v:?}"
            )));
        }
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
        allow_stale: params.get("allow_stale").is_some_and(|v| v == "true"),
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
    /// The owner's address, for a client that asks it directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
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
        QueryError::NotFound {
            partition,
            position,
            ..
        } => (StatusCode::NOT_FOUND, Some(*partition), Some(position)),
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
        owner: None,
    };
    (status, Json(body)).into_response()
}
