//! The HTTP API in the shape of Microsoft Graph's device command API.

pub mod auth;
mod body;
pub mod commands;
pub mod error;
mod filter;
mod idempotency;
mod listing;
pub mod openapi;
mod query;
mod request_id;
pub mod routes;
mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{Request, StatusCode};
use axum::middleware;
use axum::response::IntoResponse;
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::Notify;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use self::auth::JwtKeys;
use self::error::ApiError;
use self::request_id::{CLIENT_REQUEST_ID, REQUEST_ID};
use crate::broker::Broker;
use crate::net::address::AllowedNetworks;
use crate::store::Store;

/// Everything a request handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub broker: Broker,
    pub keys: JwtKeys,
    pub allowed_networks: AllowedNetworks,
    /// Applied when a create names no `ExpirationDateTime`; `None` means
    /// commands without one never expire.
    pub default_ttl: Option<Duration>,
    /// Woken after each create so the relay publishes at once.
    pub relay_wake: Arc<Notify>,
    /// Woken after an operator re-sends a postback or a cancel creates one.
    pub postback_wake: Arc<Notify>,
    /// Maximum number of unfinished commands per device; creates beyond it get 429.
    pub max_unfinished_per_device: u32,
    /// How long an `Idempotency-Key` is remembered after its create.
    pub idempotency_ttl: Duration,
    /// Time for a request from its headers to the response.
    pub request_timeout: Duration,
}

/// Largest accepted request body in bytes. RabbitMQ 3.10 accepts messages of
/// up to 128 MiB by default, so every accepted body fits in one message.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

pub fn router(state: AppState) -> Router {
    let authenticated = routes::operations_router(true).route_layer(
        middleware::from_fn_with_state(state.clone(), auth::require_token),
    );

    routes::operations_router(false)
        .merge(authenticated)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        .layer(middleware::from_fn(request_id::annotate_errors))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let header = |name| {
                    request
                        .headers()
                        .get(name)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                };
                tracing::info_span!(
                    "request",
                    method = %request.method(),
                    path = %request.uri().path(),
                    request_id = header(&REQUEST_ID),
                    client_request_id = header(&CLIENT_REQUEST_ID),
                )
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// Responds with 408 to a request that is not received and handled within
/// `--request-timeout`, so that a client that stops sending its body does
/// not hold its connection for ever.
// NOTE: a client that stops in the middle of its headers is not reached
// here, because the request only exists once its headers are complete.
async fn deadline(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request<axum::body::Body>,
    next: middleware::Next,
) -> axum::response::Response {
    let limit = state.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(?limit, "request not received and handled in time");
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "requestTimeout",
                format!(
                    "the request was not received and handled within {limit:?}; send the whole body at once and retry"
                ),
            )
            .into_response()
        }
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: the database and the broker both respond now.
async fn ready(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let database = state.store.ping().await.map_err(|error| error.to_string());
    let broker = state
        .broker
        .check_ready()
        .await
        .map_err(|error| error.to_string());
    let failures: Vec<String> = [("database", &database), ("broker", &broker)]
        .into_iter()
        .filter_map(|(part, result)| {
            result
                .as_ref()
                .err()
                .map(|error| format!("{part}: {error}"))
        })
        .collect();
    if !failures.is_empty() {
        // The 503 goes through the error middleware, which keeps only the
        // message, so the message names each part that is down and why.
        let message = format!("not ready: {}", failures.join("; "));
        tracing::warn!(%message, "readiness check failed");
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "serviceNotAvailable",
            message,
        ));
    }
    Ok(Json(json!({
        "status": "ok",
        "database": { "status": "ok" },
        "broker": { "status": "ok" },
    })))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see docs/api.md for the routes this service serves")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "methodNotAllowed",
        "this route does not support the request's method",
    )
}
