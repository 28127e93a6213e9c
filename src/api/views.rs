//! Response bodies other than the command itself, and the create request
//! as the OpenAPI document describes it. Each derives its schema, so the
//! document follows the code.

use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::command::Representation;
use crate::store::{AttemptRecord, PostbackRecord, Transition};

/// One page of a command listing.
#[derive(Serialize, ToSchema)]
#[schema(as = CommandCollection)]
pub struct CommandPage<'a> {
    /// Commands, newest first. The `Postback` summary is left out; read it
    /// on the command.
    pub value: Vec<Representation<'a>>,
    /// The URL of the next page, relative to the service's base URL;
    /// absent on the last page.
    #[serde(rename = "@odata.nextLink", skip_serializing_if = "Option::is_none")]
    pub next_link: Option<String>,
}

/// A status the command reached.
#[derive(Serialize, ToSchema)]
pub struct TransitionView {
    #[serde(rename = "Status")]
    pub status: &'static str,
    #[serde(rename = "DateTime")]
    pub at: String,
    /// Who moved the command: `api`, `relay`, `expiry` or `agent:<deviceId>`.
    #[serde(rename = "Source")]
    pub source: String,
    #[serde(rename = "Error")]
    pub error: Option<String>,
}

impl From<&Transition> for TransitionView {
    fn from(transition: &Transition) -> Self {
        Self {
            status: transition.status.as_str(),
            at: transition.at.to_rfc3339(),
            source: transition.source.clone(),
            error: transition.error.clone(),
        }
    }
}

/// The status history of a command, oldest first.
#[derive(Serialize, ToSchema)]
pub struct TransitionCollection {
    pub value: Vec<TransitionView>,
}

/// One attempt to deliver a postback.
#[derive(Serialize, ToSchema)]
pub struct AttemptView {
    #[serde(rename = "Attempt")]
    pub attempt: i64,
    #[serde(rename = "DateTime")]
    pub at: String,
    #[serde(rename = "StatusCode")]
    pub status_code: Option<i64>,
    #[serde(rename = "Outcome")]
    pub outcome: String,
    #[serde(rename = "Error")]
    pub error: Option<String>,
    #[serde(rename = "DurationMs")]
    pub duration_ms: i64,
}

impl From<&AttemptRecord> for AttemptView {
    fn from(attempt: &AttemptRecord) -> Self {
        Self {
            attempt: attempt.attempt,
            at: attempt.at.to_rfc3339(),
            status_code: attempt.status_code,
            outcome: attempt.outcome.clone(),
            error: attempt.error.clone(),
            duration_ms: attempt.duration_ms,
        }
    }
}

/// One webhook delivery to the command's `PostBackUri`.
#[derive(Serialize, ToSchema)]
pub struct PostbackView {
    pub id: Uuid,
    #[serde(rename = "Url")]
    pub url: String,
    #[serde(rename = "Sequence")]
    pub sequence: i64,
    /// `pending`, `delivered` or `failed`.
    #[serde(rename = "State")]
    pub state: String,
    #[serde(rename = "Attempts")]
    pub attempts: i64,
    #[serde(rename = "LastStatusCode")]
    pub last_status: Option<i64>,
    #[serde(rename = "LastError")]
    pub last_error: Option<String>,
    #[serde(rename = "CreatedDateTime")]
    pub created: String,
    #[serde(rename = "FinishedDateTime")]
    pub finished: Option<String>,
    #[serde(rename = "NextAttemptDateTime")]
    pub next_attempt: Option<String>,
    #[serde(rename = "AttemptLog")]
    pub attempt_log: Vec<AttemptView>,
}

impl From<&PostbackRecord> for PostbackView {
    fn from(record: &PostbackRecord) -> Self {
        Self {
            id: record.id,
            url: record.url.clone(),
            sequence: record.sequence,
            state: record.state.clone(),
            attempts: record.attempts,
            last_status: record.last_status,
            last_error: record.last_error.clone(),
            created: record.created_at.to_rfc3339(),
            finished: record.finished_at.map(|at| at.to_rfc3339()),
            next_attempt: record.next_attempt_at.map(|at| at.to_rfc3339()),
            attempt_log: record.attempt_log.iter().map(AttemptView::from).collect(),
        }
    }
}

/// The postback deliveries of a command.
#[derive(Serialize, ToSchema)]
pub struct PostbackCollection {
    pub value: Vec<PostbackView>,
}

/// A postback delivery queued again.
#[derive(Serialize, ToSchema)]
pub struct ResendAccepted {
    pub id: Uuid,
    /// Always `pending`.
    #[serde(rename = "State")]
    pub state: &'static str,
}

/// The create-command request body. Property names match in any letter
/// case; OData annotations such as `@odata.type` are allowed and ignored,
/// and so are the server-owned properties of a command. Any other property
/// is rejected.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)] // describes the body that `body::parse_create` reads
pub struct CreateCommandRequest {
    /// `AppService` or `LaunchUri`.
    #[serde(rename = "Type")]
    #[schema(example = "AppService")]
    command_type: String,
    /// Required when `Type` is `AppService`.
    #[serde(rename = "AppServiceName")]
    app_service_name: Option<String>,
    #[serde(rename = "PackageFamilyName")]
    package_family_name: Option<String>,
    /// Any JSON object, kept byte for byte; for `LaunchUri` it needs a
    /// string `uri`.
    #[serde(rename = "Payload")]
    #[schema(value_type = Option<Object>)]
    payload: Option<serde_json::Value>,
    #[serde(rename = "PermissionTicket")]
    permission_ticket: Option<String>,
    /// Absolute URL that receives the command when it ends. Absent or null:
    /// no postback.
    #[serde(rename = "PostBackUri")]
    postback_uri: Option<String>,
    /// Required on `POST /commands`; elsewhere it must equal the device in
    /// the URL when present.
    #[serde(rename = "DeviceId")]
    device_id: Option<String>,
    /// ISO 8601 date and time with offset, in the future. Absent: the
    /// service's default lifetime applies.
    #[serde(rename = "ExpirationDateTime")]
    #[schema(format = DateTime)]
    expiration_date_time: Option<String>,
}
