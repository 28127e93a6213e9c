//! Create, read and cancel handlers for one command.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::body::{CreateContext, parse_create};
use super::error::ApiError;
use super::idempotency;
use super::views::{
    PostbackCollection, PostbackView, ResendAccepted, TransitionCollection, TransitionView,
};
use crate::command::{Command, Millis};
use crate::domain::DeviceId;
use crate::store::{CancelOutcome, CreateOptions, Created, IdempotencyRecord};

/// Which URL family a request came through, which decides what it may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    pub device_id: String,
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
    check_identity_encoding(headers)?;
    let key = idempotency::key_from(headers)?;
    let body = body.map_err(body_rejection)?;
    let now = Millis::now();
    let idempotency = key.map(|key| IdempotencyRecord {
        key,
        request_hash: idempotency::request_hash(base, &body),
        expires_at: now.saturating_add(state.idempotency_ttl),
    });
    let owner = caller.subject;
    let parsed = parse_create(
        &body,
        CreateContext {
            path_device,
            owner: owner.clone(),
            allowed_networks: &state.allowed_networks,
            default_ttl: state.default_ttl,
        },
    );
    let new = match (parsed, &idempotency) {
        (Ok(new), _) => new,
        // A body that was valid when first sent can fail validation on a
        // retry, such as an ExpirationDateTime that has passed since. The
        // retry still returns the command that the first request created.
        (Err(error), Some(record)) => match state.store.find_idempotent(&owner, record).await? {
            Some(Created::Replayed(command)) => return Ok(created_response(base, &command, true)),
            _ => return Err(error),
        },
        (Err(error), None) => return Err(error),
    };

    let options = CreateOptions {
        max_unfinished_per_device: state.max_unfinished_per_device,
        idempotency,
    };
    match state.store.create_command(new, &options).await? {
        Created::New(command) => {
            state.relay_wake.notify_one();
            tracing::info!(command_id = %command.id, device_id = %command.device_id, "command queued");
            Ok(created_response(base, &command, false))
        }
        Created::Replayed(command) => {
            tracing::info!(command_id = %command.id, "create repeated with the same Idempotency-Key; nothing stored");
            Ok(created_response(base, &command, true))
        }
        Created::KeyReused { key } => Err(ApiError::conflict(format!(
            "Idempotency-Key {key:?} was already used for a different request (another route or body); \
             use a new key for a new request, or resend the first request unchanged"
        ))),
        Created::DeviceFull { device, limit } => Err(ApiError::too_many_requests(format!(
            "device {device} already has {limit} unfinished commands (queued, sentToTarget or executing), \
             the maximum; retry when some have finished, or cancel some"
        ))),
    }
}

/// Builds the 201 response to a create, also when it repeats an earlier
/// request.
fn created_response(base: &str, command: &Command, replayed: bool) -> Response {
    let location = format!("{base}/{}", command.id);
    let mut response = (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        json_response(command.to_json(None)),
    )
        .into_response();
    if replayed {
        response.headers_mut().insert(
            idempotency::IDEMPOTENT_REPLAYED,
            HeaderValue::from_static("true"),
        );
    }
    response
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
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
}

/// Rejects a body sent with a content coding other than `identity`, such as
/// gzip, because the service does not decompress request bodies.
fn check_identity_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let is_identity = value.to_str().is_ok_and(|text| {
            text.split(',')
                .map(str::trim)
                .all(|coding| coding.is_empty() || coding.eq_ignore_ascii_case("identity"))
        });
        if !is_identity {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupportedMediaType",
                format!(
                    "Content-Encoding {value:?} is not supported; send the body uncompressed, \
                     without Content-Encoding or with Content-Encoding: identity"
                ),
            ));
        }
    }
    Ok(())
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

pub async fn get_command(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<CommandPath>, PathRejection>,
    route: Route,
) -> Result<Response, ApiError> {
    let command = load_visible(&state, &caller, path, route).await?;
    let summary = state.store.postback_summary(command.id).await?;
    Ok(json_response(command.to_json(summary.as_ref())))
}

pub async fn get_response_payload(
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

pub async fn get_history(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<CommandPath>, PathRejection>,
    route: Route,
) -> Result<Json<TransitionCollection>, ApiError> {
    let command = load_visible(&state, &caller, path, route).await?;
    let transitions = state.store.transitions(command.id).await?;
    Ok(Json(TransitionCollection {
        value: transitions.iter().map(TransitionView::from).collect(),
    }))
}

pub async fn get_postbacks(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<CommandPath>, PathRejection>,
    route: Route,
) -> Result<Json<PostbackCollection>, ApiError> {
    let command = load_visible(&state, &caller, path, route).await?;
    let records = state.store.postbacks_of(command.id).await?;
    Ok(Json(PostbackCollection {
        value: records.iter().map(PostbackView::from).collect(),
    }))
}

pub async fn resend_postback(
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
        Json(ResendAccepted {
            id,
            state: "pending",
        }),
    )
        .into_response())
}

/// Cancels a queued command at once, or requests that the agent stop one
/// that reached its device.
pub async fn cancel_command(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<CommandPath>, PathRejection>,
    route: Route,
) -> Result<Response, ApiError> {
    let command = load_visible(&state, &caller, path, route).await?;
    let (status, command) = match state
        .store
        .request_cancel(command.id, Millis::now())
        .await?
    {
        CancelOutcome::Canceled(command) => {
            tracing::info!(command_id = %command.id, device_id = %command.device_id, "command canceled by request");
            (StatusCode::OK, command)
        }
        CancelOutcome::Requested(command) => {
            tracing::info!(command_id = %command.id, device_id = %command.device_id, status = %command.status, "cancel requested from the agent");
            (StatusCode::ACCEPTED, command)
        }
        CancelOutcome::AlreadyFinal(command) => {
            return Err(ApiError::conflict(format!(
                "command {} is already {}; only a queued, sentToTarget or executing command can be canceled",
                command.id, command.status
            )));
        }
        CancelOutcome::NotFound => {
            return Err(ApiError::not_found(format!(
                "command {} was not found",
                command.id
            )));
        }
    };
    state.relay_wake.notify_one();
    state.postback_wake.notify_one();
    Ok((status, json_response(command.to_json(None))).into_response())
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

pub fn parse_device(value: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(value)
        .map_err(|error| ApiError::bad_request(format!("deviceId in the URL is invalid: {error}")))
}

pub fn path_value<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(value)| value).map_err(|rejection| {
        ApiError::bad_request(format!("URL path is invalid: {}", rejection.body_text()))
    })
}

pub fn json_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoding_headers(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                header::CONTENT_ENCODING,
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn identity_encoding_is_accepted() {
        let accepted: [&[&[u8]]; 4] = [
            &[],
            &[b"identity"],
            &[b"Identity"],
            &[b"identity, identity"],
        ];
        for values in accepted {
            let result = check_identity_encoding(&encoding_headers(values));
            assert!(result.is_ok(), "{values:?}: {:?}", result.err());
        }
    }

    #[test]
    fn other_encodings_get_415() {
        let rejected: [(&[&[u8]], &str); 4] = [
            (&[b"gzip"], "\"gzip\""),
            (&[b"identity, br"], "\"identity, br\""),
            (&[b"identity", b"deflate"], "\"deflate\""),
            (&[b"gz\xffip"], "\"gz\\xffip\""),
        ];
        for (values, named) in rejected {
            let error = check_identity_encoding(&encoding_headers(values)).unwrap_err();
            assert_eq!(error.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{named}");
            assert_eq!(error.code, "unsupportedMediaType", "{named}");
            assert!(
                error.message.contains(&format!("Content-Encoding {named}")),
                "{named}: {}",
                error.message
            );
            assert!(error.message.contains("uncompressed"), "{}", error.message);
        }
    }
}
