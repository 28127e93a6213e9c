//! The one error type of the HTTP API, answered in Graph's error shape:
//! `{"error": {"code": "...", "message": "...", "innerError": {...}}}`.
//! The `innerError` object is added by [`super::request_id`], which knows
//! the request.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::StoreError;

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = ErrorResponse)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code, such as `badRequest` or `itemNotFound`.
    pub code: String,
    /// A sentence that names the invalid value and the fix.
    pub message: String,
    #[serde(rename = "innerError", skip_serializing_if = "Option::is_none")]
    pub inner_error: Option<InnerError>,
}

/// Where and when the error happened, to quote when reporting it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InnerError {
    /// The `request-id` response header, also a field of the service's log
    /// lines for this request.
    #[serde(rename = "request-id")]
    pub request_id: String,
    /// The `client-request-id` header the client sent, if any.
    #[serde(
        rename = "client-request-id",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub client_request_id: Option<String>,
    /// When the service answered, in UTC.
    pub date: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable machine-readable code, as Graph uses (`badRequest`, …).
    pub code: &'static str,
    /// A sentence that names the value and the fix.
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "badRequest", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "accessDenied", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "itemNotFound", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn too_many_requests(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "tooManyRequests", message)
    }

    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// A failure of ours: the caller gets an opaque 500 or 503 and the cause
    /// goes to the log.
    pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "generalException",
            "the service failed to handle the request; the cause is in its log",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Exhausted(wait) => {
                tracing::warn!(?wait, "database connection pool exhausted");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "serviceNotAvailable",
                    format!(
                        "the database is busy: no connection became free within {wait:?}; retry later"
                    ),
                )
            }
            StoreError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "serviceNotAvailable",
                "the service is stopping; retry against another instance or after it restarts",
            ),
            other => Self::internal("database operation failed", &other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                inner_error: None,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        match self.status {
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
