//! Request ids in error bodies: every 4xx and 5xx body gets Graph's
//! `error.innerError` with the `request-id`, the `client-request-id` the
//! client sent and the date, and `client-request-id` is echoed on every
//! response.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use chrono::{SecondsFormat, Utc};

use super::error::{ErrorBody, ErrorDetail, InnerError};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
pub const CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("client-request-id");

/// Largest error body that is rewritten. The service's own error bodies are
/// well under 2 KiB; a larger one is replaced by a generic body.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Middleware that adds `innerError` to error bodies. It must run inside the
/// layer that sets `request-id`, so that the id is on the request.
pub async fn annotate_errors(request: Request, next: Next) -> Response {
    let request_id = header_text(&request, &REQUEST_ID).unwrap_or_default();
    let client_request_id = request.headers().get(&CLIENT_REQUEST_ID).cloned();
    let mut response = next.run(request).await;
    if let Some(value) = &client_request_id {
        response
            .headers_mut()
            .insert(CLIENT_REQUEST_ID, value.clone());
    }

    let status = response.status();
    if !status.is_client_error() && !status.is_server_error() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY_BYTES)
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read an error body; replacing it");
            Bytes::new()
        });
    // Responses that did not come from `ApiError`, such as a rejection
    // inside axum, get the Graph shape here.
    let mut body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
        error: ErrorDetail {
            code: code_for(status).to_owned(),
            message: fallback_message(status, &bytes),
            inner_error: None,
        },
    });
    body.error.inner_error = Some(InnerError {
        request_id,
        client_request_id: client_request_id
            .as_ref()
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned),
        date: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
    });
    if status.is_client_error() {
        // Lets an operator find the answer a client quotes by request-id,
        // which is a field of the enclosing request span.
        tracing::info!(
            status = status.as_u16(),
            code = %body.error.code,
            message = %body.error.message,
            "request rejected"
        );
    }

    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let bytes = serde_json::to_vec(&body).expect("an error body always serializes");
    Response::from_parts(parts, Body::from(bytes))
}

fn header_text(request: &Request, name: &HeaderName) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// Graph's error code for a status, for errors not made by `ApiError`.
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "badRequest",
        StatusCode::UNAUTHORIZED => "unauthenticated",
        StatusCode::FORBIDDEN => "accessDenied",
        StatusCode::NOT_FOUND => "itemNotFound",
        StatusCode::METHOD_NOT_ALLOWED => "methodNotAllowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "requestEntityTooLarge",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupportedMediaType",
        StatusCode::TOO_MANY_REQUESTS => "tooManyRequests",
        StatusCode::SERVICE_UNAVAILABLE => "serviceNotAvailable",
        status if status.is_server_error() => "generalException",
        _ => "badRequest",
    }
}

/// The original text when it is short plain text, else the status reason.
fn fallback_message(status: StatusCode, bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.trim().is_empty() && text.len() <= 1024 && !status.is_server_error() => {
            text.trim().to_owned()
        }
        _ => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned(),
    }
}
