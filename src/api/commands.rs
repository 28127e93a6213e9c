//! Create and read handlers for commands.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::body::{CreateContext, parse_create};
use super::error::ApiError;
use crate::command::Command;
use crate::domain::DeviceId;

/// Which URL family a request came through, which decides what it may see.
#[derive(Clone, Copy, Debug)]
pub enum Route {
    /// `/commands/{id}`: any command.
    Any,
    /// `/devices/{deviceId}/commands/{id}`: commands of that device.
    Device,
    /// `/me/devices/{deviceId}/commands/{id}`: the caller's own commands of that device.
    Me,
}

#[derive(Deserialize)]
pub struct DevicePath {
    device_id: String,
}

#[derive(Deserialize)]
pub struct CommandPath {
    device_id: Option<String>,
    id: String,
}

pub async fn create_any(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    create(state, caller, None, "/commands", &headers, body).await
}

pub async fn create_for_device(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<DevicePath>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let device = parse_device(&path_value(path)?.device_id)?;
    let base = format!("/devices/{device}/commands");
    create(state, caller, Some(device), &base, &headers, body).await
}

pub async fn create_for_my_device(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<DevicePath>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let device = parse_device(&path_value(path)?.device_id)?;
    let base = format!("/me/devices/{device}/commands");
    create(state, caller, Some(device), &base, &headers, body).await
}

async fn create(
    state: AppState,
    caller: Caller,
    path_device: Option<DeviceId>,
    base: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_json_content_type(headers)?;
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "requestEntityTooLarge",
                format!(
                    "request body is larger than {} bytes; send a smaller Payload",
                    super::MAX_BODY_BYTES
                ),
            )
        } else {
            ApiError::bad_request(format!("cannot read the request body: {rejection}"))
        }
    })?;
    let new = parse_create(
        &body,
        CreateContext {
            path_device,
            owner: caller.subject,
            allowed_networks: &state.allowed_networks,
            default_ttl: state.default_ttl,
        },
    )?;
    let command = state.store.insert_command(new).await?;
    state.relay_wake.notify_one();
    tracing::info!(command_id = %command.id, device_id = %command.device_id, "command queued");

    let location = format!("{base}/{}", command.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        json_response(command.to_json(None)),
    )
        .into_response())
}

/// Accepts `application/json` with any parameters, such as a charset.
fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok());
    let is_json = value.is_some_and(|value| {
        let essence = value.split(';').next().unwrap_or_default().trim();
        essence.eq_ignore_ascii_case("application/json")
    });
    if is_json {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupportedMediaType",
            format!(
                "Content-Type {} is not supported; send Content-Type: application/json",
                value.map_or_else(|| "(missing)".to_owned(), |value| format!("{value:?}"))
            ),
        ))
    }
}

/// The read routes under one command URL.
pub fn read_routes(base: &str, route: Route) -> Router<AppState> {
    Router::new()
        .route(
            base,
            get(move |state, caller, path| get_command(state, caller, path, route)),
        )
        .route(
            &format!("{base}/responsePayload"),
            get(move |state, caller, path| get_response_payload(state, caller, path, route)),
        )
        .route(
            &format!("{base}/history"),
            get(move |state, caller, path| get_history(state, caller, path, route)),
        )
        .route(
            &format!("{base}/postbacks"),
            get(move |state, caller, path| get_postbacks(state, caller, path, route)),
        )
        .route(
            &format!("{base}/postbacks/resend"),
            post(move |state, caller, path| resend_postback(state, caller, path, route)),
        )
}

async fn get_command(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<CommandPath>, PathRejection>,
    route: Route,
) -> Result<Response, ApiError> {
    let command = load_visible(&state, &caller, path, route).await?;
    let summary = state.store.postback_summary(command.id).await?;
    Ok(json_response(command.to_json(summary.as_ref())))
}

async fn get_response_payload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<CommandPath>, PathRejection>,
    route: Route,
) -> Result<Response, ApiError> {
    let command = load_visible(&state, &caller, path, route).await?;
    Ok(json_response(
        command
            .response_payload
            .unwrap_or_else(|| "null".to_owned()),
    ))
}

async fn get_history(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<CommandPath>, PathRejection>,
    route: Route,
) -> Result<Json<serde_json::Value>, ApiError> {
    let command = load_visible(&state, &caller, path, route).await?;
    let transitions = state.store.transitions(command.id).await?;
    let value: Vec<_> = transitions
        .iter()
        .map(|transition| {
            json!({
                "Status": transition.status.as_str(),
                "DateTime": transition.at.to_rfc3339(),
                "Source": transition.source,
                "Error": transition.error,
            })
        })
        .collect();
    Ok(Json(json!({ "value": value })))
}

async fn get_postbacks(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<CommandPath>, PathRejection>,
    route: Route,
) -> Result<Json<serde_json::Value>, ApiError> {
    let command = load_visible(&state, &caller, path, route).await?;
    let records = state.store.postbacks_of(command.id).await?;
    let value: Vec<_> = records
        .iter()
        .map(|record| {
            let attempts: Vec<_> = record
                .attempt_log
                .iter()
                .map(|attempt| {
                    json!({
                        "Attempt": attempt.attempt,
                        "DateTime": attempt.at.to_rfc3339(),
                        "StatusCode": attempt.status_code,
                        "Outcome": attempt.outcome,
                        "Error": attempt.error,
                        "DurationMs": attempt.duration_ms,
                    })
                })
                .collect();
            json!({
                "id": record.id,
                "Url": record.url,
                "Sequence": record.sequence,
                "State": record.state,
                "Attempts": record.attempts,
                "LastStatusCode": record.last_status,
                "LastError": record.last_error,
                "CreatedDateTime": record.created_at.to_rfc3339(),
                "FinishedDateTime": record.finished_at.map(|at| at.to_rfc3339()),
                "NextAttemptDateTime": record.next_attempt_at.map(|at| at.to_rfc3339()),
                "AttemptLog": attempts,
            })
        })
        .collect();
    Ok(Json(json!({ "value": value })))
}

async fn resend_postback(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<CommandPath>, PathRejection>,
    route: Route,
) -> Result<Response, ApiError> {
    let command = load_visible(&state, &caller, path, route).await?;
    if !command.status.is_final() {
        return Err(ApiError::conflict(format!(
            "command {} is {}; a postback can be sent again only once the command is final",
            command.id, command.status
        )));
    }
    let Some(id) = state.store.resend_postback(&command).await? else {
        return Err(ApiError::conflict(format!(
            "command {} has no PostBackUri",
            command.id
        )));
    };
    state.postback_wake.notify_one();
    tracing::info!(command_id = %command.id, postback_id = %id, "postback queued again by request");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "State": "pending" })),
    )
        .into_response())
}

/// Loads a command the caller may see through `route`, or answers 404 in
/// every other case, so that ids of other users' commands are not revealed.
async fn load_visible(
    state: &AppState,
    caller: &Caller,
    path: Result<Path<CommandPath>, PathRejection>,
    route: Route,
) -> Result<Command, ApiError> {
    let path = path_value(path)?;
    let device = path.device_id.as_deref().map(parse_device).transpose()?;
    let id = Uuid::parse_str(&path.id).map_err(|_| {
        ApiError::bad_request(format!(
            "command id {:?} is not a UUID; use the id returned by the create",
            path.id
        ))
    })?;
    let not_found = || ApiError::not_found(format!("command {id} was not found"));
    let command = state.store.get_command(id).await?.ok_or_else(not_found)?;
    let visible = match route {
        Route::Any => true,
        Route::Device => device.as_ref() == Some(&command.device_id),
        Route::Me => device.as_ref() == Some(&command.device_id) && command.owner == caller.subject,
    };
    if visible {
        Ok(command)
    } else {
        Err(not_found())
    }
}

fn parse_device(value: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(value)
        .map_err(|error| ApiError::bad_request(format!("deviceId in the URL is invalid: {error}")))
}

fn path_value<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(value)| value).map_err(|rejection| {
        ApiError::bad_request(format!("URL path is invalid: {}", rejection.body_text()))
    })
}

fn json_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
