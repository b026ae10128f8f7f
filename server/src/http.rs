//! The HTTP front door: `POST /v1/sources/{name}/events`, `GET /health`, `GET /ready` and
//! `GET /metrics`.
//!
//! Responses are JSON:
//! - `200 {"accepted": n, "rejected": []}` — every record stored and published;
//! - `422 {"accepted": n, "rejected": [{"line": 3, "reason": "…"}, …], "error": "…"}` — the
//!   good records were stored and published, the listed ones went to the errors zone
//!   (resend only those, fixed);
//! - `400 {"error": "…"}` — the body is not NDJSON or a JSON array (stored in the errors
//!   zone whole);
//! - `404` unknown source, `409` not an `http` source, `413` body over the source's
//!   `max_request_size`, `415` a `Content-Type` other than [`ACCEPTED_TYPES`], `503` the lake
//!   could not store the request (nothing was published; retry), or this server is a standby
//!   (the message names the writer).
//!
//! Only JSON content types are taken: a web page can send `text/plain`, form data or a body
//! without a type to `127.0.0.1` without the browser asking first (a "simple" CORS request),
//! but not `application/json`.
//!
//! A POST with an `Idempotency-Key` header that repeats one seen within the source's
//! `idempotency_window` gets the first answer again, and its body is not stored twice.
//!
//! With a password set (`SLUICE_PASSWORD`), every request needs credentials: HTTP Basic
//! with a Sluice user and password, or `Authorization: Bearer <token>` (`CREATE TOKEN`);
//! without them `401`. Posting events needs `INSERT` on the source (`403` without it).
//! Without a password (the server then listens on loopback only) a request without
//! credentials acts as the superuser.
//!
//! `GET /ready` is 200 on the lake's writer whose sources, streams and sinks all run (or
//! finished); 503 on a standby (naming the writer) and when any of them failed (naming each,
//! with why). `GET /metrics` is the Prometheus exposition ([`crate::metrics`]).

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::json;
use sluice_engine::push::IngestError;

use std::sync::Arc;

use crate::connections::Connections;
use crate::metrics::{Exporter, Vitals};
use crate::node::{IngestRefusal, Node};

/// The HTTP routes of a Sluice server; `/health` shows the listeners' `connections`.
pub fn router(sluice: Node, connections: Connections) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/sources/{name}/events", post(ingest))
        .layer(DefaultBodyLimit::disable())
        .layer(Extension(connections))
        .layer(Extension(Arc::new(Exporter::new())))
        .layer(axum::middleware::from_fn_with_state(
            sluice.clone(),
            authenticate,
        ))
        .with_state(sluice)
}

/// The user a request is made as.
#[derive(Debug, Clone)]
struct User(String);

/// Who the request's `Authorization` names, if its credentials are right.
async fn user_of(node: &Node, headers: &HeaderMap) -> Option<String> {
    use base64::Engine;
    let access = Arc::clone(node.access());
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return (!access.requires_password()).then(|| crate::access::SUPERUSER.to_string());
    };
    let value = value.to_str().ok()?;
    let (scheme, credentials) = value.split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return access.token_user(credentials);
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    let (user, password) = (user.to_string(), password.to_string());
    node.refresh_access().await;
    // A SCRAM verifier costs thousands of hash rounds: off the async workers.
    tokio::task::spawn_blocking(move || access.basic_user(&user, &password))
        .await
        .ok()
        .flatten()
}

/// `401` unless the request carries valid credentials (or none are needed).
async fn authenticate(State(node): State<Node>, mut request: Request, next: Next) -> Response {
    match user_of(&node, request.headers()).await {
        Some(user) => {
            request.extensions_mut().insert(User(user));
            next.run(request).await
        }
        None => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "authentication required: HTTP Basic with a Sluice user and password, or Authorization: Bearer <token> (CREATE TOKEN)",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"sluice\", charset=\"UTF-8\""),
            );
            response
        }
    }
}

/// The Prometheus exposition of this server's figures (a standby has no pipelines: only
/// its process and connections).
async fn metrics(
    State(node): State<Node>,
    Extension(exporter): Extension<Arc<Exporter>>,
    Extension(connections): Extension<Connections>,
) -> Response {
    let vitals = match node.sluice() {
        Some(s) => s.vitals().await,
        None => Vitals::default(),
    };
    let sessions = connections
        .pg
        .open
        .load(std::sync::atomic::Ordering::Relaxed);
    let body = exporter.render(&vitals, sessions);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// 200 while the process serves; with the listeners' connection counters (open, refused
/// for the limit, closed for the timeout).
async fn health(Extension(connections): Extension<Connections>) -> Response {
    axum::Json(json!({"status": "ok", "connections": connections})).into_response()
}

/// 200 on the lake's writer while nothing failed; 503 on a standby, naming the writer, or
/// when a source, stream or sink failed, naming each with why.
async fn ready(State(node): State<Node>) -> Response {
    match node.ready() {
        Ok(()) => {
            let failed = match node.sluice() {
                Some(s) => s.failures().await,
                None => vec![],
            };
            if failed.is_empty() {
                return axum::Json(json!({"status": "ready", "role": "writer"})).into_response();
            }
            let failed: Vec<_> = failed
                .into_iter()
                .map(|(kind, name, reason)| json!({"kind": kind, "name": name, "reason": reason}))
                .collect();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"status": "failed", "role": "writer", "failed": failed})),
            )
                .into_response()
        }
        Err(m) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "standby", "role": "standby", "error": m})),
        )
            .into_response(),
    }
}

/// The `Content-Type`s ingest takes (parameters such as `charset` aside).
pub const ACCEPTED_TYPES: [&str; 3] = [
    "application/json",
    "application/x-ndjson",
    "application/jsonl",
];

/// The refusal, unless `headers` declare one of [`ACCEPTED_TYPES`].
fn content_type_refusal(headers: &HeaderMap) -> Option<Response> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    match declared {
        Some(t) if ACCEPTED_TYPES.contains(&t.as_str()) => None,
        other => Some(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "{}; send the events with Content-Type: application/x-ndjson (one object per line) or application/json",
                match other {
                    Some(t) => format!("Content-Type `{t}` is not taken"),
                    None => "the request has no Content-Type".to_string(),
                }
            ),
        )),
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

/// Takes a POST of events (see the module docs) and counts the answer by source and code
/// (under no source when there is none by that name: a client cannot make series up).
async fn ingest(
    State(sluice): State<Node>,
    Extension(exporter): Extension<Arc<Exporter>>,
    Extension(User(user)): Extension<User>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = ingest_events(sluice.clone(), &user, &name, headers, body).await;
    // Only names of this server's sources label a series (a standby knows none).
    let exists = |n: &str| {
        matches!(
            sluice.push_source(n),
            Ok(Some(_)) | Err(IngestRefusal::Conflict(_))
        )
    };
    let source = if exists(&name) {
        name.clone()
    } else if exists(&name.to_lowercase()) {
        name.to_lowercase()
    } else {
        String::new()
    };
    exporter.http.count(&source, response.status().as_u16());
    response
}

async fn ingest_events(
    sluice: Node,
    user: &str,
    name: &str,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let name = name.to_string();
    let (lookup, resolved) = match sluice.push_source(&name) {
        Ok(None) => (
            sluice.push_source(&name.to_lowercase()),
            name.to_lowercase(),
        ),
        other => (other, name.clone()),
    };
    let source = match lookup {
        Ok(Some(s)) => s,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("source `{name}` does not exist"),
            );
        }
        Err(IngestRefusal::Conflict(m)) => return error(StatusCode::CONFLICT, m),
        Err(IngestRefusal::Unavailable(m)) => return error(StatusCode::SERVICE_UNAVAILABLE, m),
    };
    if let Err(e) = sluice.access().require(
        user,
        sluice_sql::access::Privilege::Insert,
        Some(("source", &resolved)),
    ) {
        return error(StatusCode::FORBIDDEN, e.to_string());
    }
    if let Some(refusal) = content_type_refusal(&headers) {
        return refusal;
    }
    let limit = source.max_request_size() as usize;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is larger than the source's max_request_size ({limit} bytes); split it into several requests"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return too_large();
    }
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) if e.to_string().contains("length limit") => return too_large(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            );
        }
    };
    let origin = format!("http POST /v1/sources/{name}/events");
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) => Some(k.to_string()),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the Idempotency-Key header must be visible ASCII",
            );
        }
    };
    match source.ingest(bytes, &origin, key.as_deref()).await {
        Ok(report) if report.rejected.is_empty() => {
            axum::Json(json!({"accepted": report.accepted, "rejected": []})).into_response()
        }
        Ok(report) => {
            let n = report.rejected.len();
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({
                    "accepted": report.accepted,
                    "rejected": report.rejected,
                    "error": format!(
                        "{n} of {} records rejected (stored in the errors zone with their reasons); {} accepted",
                        n + report.accepted,
                        report.accepted
                    ),
                })),
            )
                .into_response()
        }
        Err(IngestError::Malformed(m) | IngestError::BadKey(m)) => {
            error(StatusCode::BAD_REQUEST, m)
        }
        Err(IngestError::Storage(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
