//! The stored command and its JSON representation in Graph's shape.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::domain::{CommandStatus, CommandType, DeviceId};

/// Graph's type annotation for a command.
pub const ODATA_TYPE: &str = "#microsoft.graph.command";

/// A command as it is stored.
#[derive(Clone, Debug)]
pub struct Command {
    pub id: Uuid,
    pub device_id: DeviceId,
    /// The `sub` of the token that created the command; `/me` routes only
    /// show commands whose owner is the caller.
    pub owner: String,
    pub status: CommandStatus,
    pub command_type: CommandType,
    pub app_service_name: Option<String>,
    pub package_family_name: Option<String>,
    pub error: Option<String>,
    /// JSON text exactly as the client sent it, so numbers and unicode
    /// survive every hop unchanged.
    pub payload: Option<String>,
    pub response_payload: Option<String>,
    pub permission_ticket: Option<String>,
    pub postback_uri: Option<String>,
    pub created_at: Millis,
    pub last_action_at: Millis,
    pub expires_at: Option<Millis>,
}

/// A validated create request.
#[derive(Clone, Debug)]
pub struct NewCommand {
    pub device_id: DeviceId,
    pub owner: String,
    pub command_type: CommandType,
    pub app_service_name: Option<String>,
    pub package_family_name: Option<String>,
    pub payload: Option<String>,
    pub permission_ticket: Option<String>,
    pub postback_uri: Option<String>,
    pub expires_at: Option<Millis>,
}

/// Milliseconds since the Unix epoch, the unit every stored time uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub i64);

impl Millis {
    pub fn now() -> Self {
        Self(Utc::now().timestamp_millis())
    }

    pub fn to_datetime(self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.0)
            .single()
            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
    }

    /// ISO 8601 in UTC with milliseconds, as Graph writes `DateTimeOffset`.
    pub fn to_rfc3339(self) -> String {
        self.to_datetime()
            .to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    pub fn saturating_add(self, duration: std::time::Duration) -> Self {
        let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(millis))
    }
}

/// The delivery state of a command's postback, as shown on the command.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PostbackSummary {
    #[serde(rename = "State")]
    pub state: String,
    #[serde(rename = "Attempts")]
    pub attempts: i64,
    #[serde(rename = "LastError")]
    pub last_error: Option<String>,
}

/// The command in Graph's shape, property names as the Create command page
/// spells them. Absent values serialize as JSON `null`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Command)]
pub struct Representation<'a> {
    #[serde(rename = "@odata.type")]
    odata_type: &'static str,
    id: Uuid,
    #[serde(rename = "Status")]
    status: &'static str,
    #[serde(rename = "Type")]
    command_type: &'static str,
    #[serde(rename = "AppServiceName")]
    app_service_name: Option<&'a str>,
    #[serde(rename = "PackageFamilyName")]
    package_family_name: Option<&'a str>,
    #[serde(rename = "Error")]
    error: Option<&'a str>,
    /// The JSON object the client sent, byte for byte.
    #[serde(rename = "Payload")]
    #[schema(value_type = Option<Object>)]
    payload: Option<&'a RawValue>,
    /// The JSON value the device answered with.
    #[serde(rename = "ResponsePayload")]
    #[schema(value_type = Option<Object>)]
    response_payload: Option<&'a RawValue>,
    #[serde(rename = "PermissionTicket")]
    permission_ticket: Option<&'a str>,
    #[serde(rename = "PostBackUri")]
    postback_uri: Option<&'a str>,
    #[serde(rename = "DeviceId")]
    device_id: &'a str,
    #[serde(rename = "CreatedDateTime")]
    created: String,
    #[serde(rename = "LastActionDateTime")]
    last_action: String,
    #[serde(rename = "ExpirationDateTime")]
    expiration: Option<String>,
    #[serde(rename = "Postback", skip_serializing_if = "Option::is_none")]
    postback: Option<&'a PostbackSummary>,
}

impl Command {
    /// Builds the representation returned by the API and sent in postbacks.
    pub fn representation<'a>(
        &'a self,
        postback: Option<&'a PostbackSummary>,
    ) -> Representation<'a> {
        Representation {
            odata_type: ODATA_TYPE,
            id: self.id,
            status: self.status.as_str(),
            command_type: self.command_type.as_str(),
            app_service_name: self.app_service_name.as_deref(),
            package_family_name: self.package_family_name.as_deref(),
            error: self.error.as_deref(),
            payload: raw_json(self.payload.as_deref()),
            response_payload: raw_json(self.response_payload.as_deref()),
            permission_ticket: self.permission_ticket.as_deref(),
            postback_uri: self.postback_uri.as_deref(),
            device_id: self.device_id.as_str(),
            created: self.created_at.to_rfc3339(),
            last_action: self.last_action_at.to_rfc3339(),
            expiration: self.expires_at.map(Millis::to_rfc3339),
            postback,
        }
    }

    /// Serializes the representation to JSON text.
    pub fn to_json(&self, postback: Option<&PostbackSummary>) -> String {
        serde_json::to_string(&self.representation(postback))
            .expect("a command always serializes: every field is a string or valid JSON text")
    }

    pub fn is_expired_at(&self, now: Millis) -> bool {
        self.expires_at.is_some_and(|expires| expires <= now)
    }
}

/// Borrows stored JSON text as a raw JSON value. The store only ever holds
/// text that was validated as JSON on the way in, so a parse failure means
/// the database was edited by hand; the value then shows as `null`.
fn raw_json(text: Option<&str>) -> Option<&RawValue> {
    let text = text?;
    match serde_json::from_str::<&RawValue>(text) {
        Ok(raw) => Some(raw),
        Err(error) => {
            tracing::error!(%error, "stored JSON is invalid and is shown as null");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Command {
        Command {
            id: Uuid::nil(),
            device_id: DeviceId::parse("kiosk-1").unwrap(),
            owner: "alice".into(),
            status: CommandStatus::Queued,
            command_type: CommandType::AppService,
            app_service_name: Some("echo".into()),
            package_family_name: None,
            error: None,
            payload: Some(r#"{"n": 12345678901234567890123.5, "s": "héllo ✓"}"#.into()),
            response_payload: None,
            permission_ticket: None,
            postback_uri: None,
            created_at: Millis(1_764_000_000_000),
            last_action_at: Millis(1_764_000_000_123),
            expires_at: None,
        }
    }

    #[test]
    fn representation_keeps_payload_text() {
        let json = sample().to_json(None);
        assert!(
            json.contains(r#""Payload":{"n": 12345678901234567890123.5, "s": "héllo ✓"}"#),
            "{json}"
        );
    }

    #[test]
    fn absent_values_are_json_null() {
        let json: serde_json::Value = serde_json::from_str(&sample().to_json(None)).unwrap();
        assert!(json["Error"].is_null());
        assert!(json["ResponsePayload"].is_null());
        assert!(json["PostBackUri"].is_null());
        assert_eq!(json["@odata.type"], ODATA_TYPE);
    }

    #[test]
    fn times_are_iso8601_utc_with_millis() {
        let json: serde_json::Value = serde_json::from_str(&sample().to_json(None)).unwrap();
        assert_eq!(json["LastActionDateTime"], "2025-11-24T16:00:00.123Z");
    }
}
