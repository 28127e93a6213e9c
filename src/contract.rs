//! The AMQP message bodies that devices consume and send, documented for
//! other languages in docs/amqp.md. Property names follow the HTTP API.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::broker::{
    CANCEL_MESSAGE_TYPE, COMMAND_MESSAGE_TYPE, Destination, JSON_CONTENT_TYPE, MessageProperties,
    OutgoingMessage, REPORT_MESSAGE_TYPE, Topology,
};
use crate::command::{Command, Millis};
use crate::domain::DeviceId;

/// The body of a command message on a device queue.
#[derive(Debug, Serialize, Deserialize)]
pub struct CommandMessage {
    pub id: Uuid,
    #[serde(rename = "DeviceId")]
    pub device_id: String,
    #[serde(rename = "Type")]
    pub command_type: String,
    #[serde(rename = "AppServiceName", default)]
    pub app_service_name: Option<String>,
    #[serde(rename = "PackageFamilyName", default)]
    pub package_family_name: Option<String>,
    #[serde(rename = "Payload", default)]
    pub payload: Option<Box<RawValue>>,
    #[serde(rename = "PermissionTicket", default)]
    pub permission_ticket: Option<String>,
    #[serde(rename = "CreatedDateTime")]
    pub created: String,
    /// After this time the device must not run the command; it reports
    /// `expired` instead.
    #[serde(rename = "ExpirationDateTime", default)]
    pub expiration: Option<String>,
}

/// The body of a status report a device sends to the reports queue.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    #[serde(rename = "CommandId")]
    pub command_id: Uuid,
    /// The device that sends the report; a report from any other device
    /// than the command's is dropped.
    #[serde(rename = "DeviceId")]
    pub device_id: String,
    #[serde(rename = "Status")]
    pub status: String,
    #[serde(rename = "Error", default)]
    pub error: Option<String>,
    #[serde(rename = "ResponsePayload", default)]
    pub response_payload: Option<Box<RawValue>>,
}

/// The body of a cancel notice for a command that is running.
#[derive(Debug, Serialize, Deserialize)]
pub struct CancelNotice {
    #[serde(rename = "CommandId")]
    pub command_id: Uuid,
}

/// Builds the message that carries `command` to its device.
pub fn command_message(command: &Command, topology: &Topology) -> OutgoingMessage {
    let body = CommandMessage {
        id: command.id,
        device_id: command.device_id.to_string(),
        command_type: command.command_type.as_str().to_owned(),
        app_service_name: command.app_service_name.clone(),
        package_family_name: command.package_family_name.clone(),
        payload: command
            .payload
            .as_deref()
            .and_then(|text| RawValue::from_string(text.to_owned()).ok()),
        permission_ticket: command.permission_ticket.clone(),
        created: command.created_at.to_rfc3339(),
        expiration: command.expires_at.map(Millis::to_rfc3339),
    };
    OutgoingMessage {
        destination: Destination::Device(command.device_id.clone()),
        properties: MessageProperties {
            message_id: Some(command.id.to_string()),
            correlation_id: Some(command.id.to_string()),
            kind: Some(COMMAND_MESSAGE_TYPE.to_owned()),
            reply_to: Some(topology.reports_queue()),
            timestamp: Some(u64::try_from(command.created_at.0 / 1000).unwrap_or_default()),
            content_type: Some(JSON_CONTENT_TYPE.to_owned()),
        },
        body: serde_json::to_vec(&body).expect("a command message always serializes"),
    }
}

/// Builds a status report addressed to `reply_to`.
pub fn report_message(report: &StatusReport, reply_to: &str) -> OutgoingMessage {
    OutgoingMessage {
        destination: Destination::Queue(reply_to.to_owned()),
        properties: MessageProperties {
            message_id: Some(Uuid::new_v4().to_string()),
            correlation_id: Some(report.command_id.to_string()),
            kind: Some(REPORT_MESSAGE_TYPE.to_owned()),
            reply_to: None,
            timestamp: Some(u64::try_from(Millis::now().0 / 1000).unwrap_or_default()),
            content_type: Some(JSON_CONTENT_TYPE.to_owned()),
        },
        body: serde_json::to_vec(report).expect("a status report always serializes"),
    }
}

/// Builds a cancel notice for `device`'s control queue.
pub fn cancel_message(command_id: Uuid, device: &DeviceId) -> OutgoingMessage {
    OutgoingMessage {
        destination: Destination::Control(device.clone()),
        properties: MessageProperties {
            message_id: Some(Uuid::new_v4().to_string()),
            correlation_id: Some(command_id.to_string()),
            kind: Some(CANCEL_MESSAGE_TYPE.to_owned()),
            reply_to: None,
            timestamp: Some(u64::try_from(Millis::now().0 / 1000).unwrap_or_default()),
            content_type: Some(JSON_CONTENT_TYPE.to_owned()),
        },
        body: serde_json::to_vec(&CancelNotice { command_id })
            .expect("a cancel notice always serializes"),
    }
}
