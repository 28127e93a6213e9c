//! The report worker: applies status reports from devices to the store.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{ServerContext, apply_and_log};
use crate::broker::{Delivery, REPORT_MESSAGE_TYPE};
use crate::command::Millis;
use crate::contract::StatusReport;
use crate::domain::{CommandStatus, DeviceId};
use crate::store::StatusChange;

/// Reports taken from the broker ahead of processing; each is acked only
/// after its status is stored.
const PREFETCH: u16 = 64;

pub async fn run(context: Arc<ServerContext>, shutdown: CancellationToken) {
    let queue = context.broker.topology().reports_queue();
    context
        .broker
        .consume_until(&queue, PREFETCH, &shutdown, |delivery| {
            handle(&context, delivery)
        })
        .await;
    tracing::info!("report worker stopped");
}

async fn handle(context: &ServerContext, delivery: Delivery) {
    let change = match parse(&delivery) {
        Ok(change) => change,
        Err(reason) => {
            // A report that cannot be read now never can: drop it so that it
            // cannot loop, and log why once.
            tracing::warn!(
                message_id = ?delivery.properties.message_id,
                error = %reason,
                "dropping an invalid status report"
            );
            if let Err(error) = delivery.reject().await {
                tracing::warn!(%error, "cannot reject an invalid status report");
            }
            return;
        }
    };
    if !apply_and_log(context, &change).await {
        // The store failed; hand the report back after a pause, so that a
        // database outage does not turn into a hot redelivery loop.
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Err(error) = delivery.requeue().await {
            tracing::warn!(%error, "cannot requeue a status report");
        }
        return;
    }
    if let Err(error) = delivery.ack().await {
        // The report is stored; a redelivery of it will be ignored.
        tracing::warn!(command_id = %change.command_id, %error, "cannot ack a stored status report");
    }
}

fn parse(delivery: &Delivery) -> Result<StatusChange, String> {
    if let Some(kind) = &delivery.properties.kind
        && kind != REPORT_MESSAGE_TYPE
    {
        return Err(format!(
            "message type {kind:?} is not {REPORT_MESSAGE_TYPE:?}"
        ));
    }
    let report: StatusReport = serde_json::from_slice(&delivery.body)
        .map_err(|error| format!("body is not a status report: {error}"))?;
    let status = CommandStatus::from_str(&report.status)?;
    let device = DeviceId::parse(&report.device_id)
        .map_err(|error| format!("DeviceId of the report is invalid: {error}"))?;
    if status == CommandStatus::Queued || status == CommandStatus::FailedToSend {
        return Err(format!("devices cannot report the status {status}"));
    }
    let (error, response_payload) = bounded(
        report.error,
        report.response_payload.map(|raw| raw.get().to_owned()),
    );
    Ok(StatusChange {
        command_id: report.command_id,
        status,
        error,
        response_payload,
        source: format!("agent:{device}"),
        expected_device: Some(device),
        at: Millis::now(),
    })
}

/// Longest `Error` text stored from a report, in bytes; longer texts keep
/// their beginning.
const MAX_ERROR_BYTES: usize = 4 * 1024;
/// Largest `ResponsePayload` stored from a report, in bytes: the same as the
/// largest request body, so that a command never grows past what the API
/// accepts.
const MAX_RESPONSE_PAYLOAD_BYTES: usize = crate::api::MAX_BODY_BYTES;

/// Keeps a device's report within the sizes the store keeps and the API
/// returns. A payload over the limit is dropped and the `Error` says so, rather
/// than the report being dropped, which would leave the command unfinished.
fn bounded(error: Option<String>, payload: Option<String>) -> (Option<String>, Option<String>) {
    let mut error = error.map(|text| truncate(text, MAX_ERROR_BYTES));
    let payload = match payload {
        Some(text) if text.len() > MAX_RESPONSE_PAYLOAD_BYTES => {
            let note = format!(
                "the device's ResponsePayload of {} bytes exceeds the {MAX_RESPONSE_PAYLOAD_BYTES}-byte limit and was not stored",
                text.len()
            );
            error = Some(match error {
                Some(existing) => format!("{existing}; {note}"),
                None => note,
            });
            None
        }
        other => other,
    };
    (error, payload)
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_error_keeps_its_beginning() {
        let (error, _) = bounded(Some("é".repeat(MAX_ERROR_BYTES)), None);
        let error = error.unwrap();
        assert!(error.len() <= MAX_ERROR_BYTES);
        assert!(error.starts_with("éé"));
    }

    #[test]
    fn oversized_payload_is_replaced_by_a_note() {
        let payload = format!("\"{}\"", "x".repeat(MAX_RESPONSE_PAYLOAD_BYTES));
        let (error, payload) = bounded(Some("failed".into()), Some(payload));
        assert!(payload.is_none());
        assert!(
            error
                .unwrap()
                .starts_with("failed; the device's ResponsePayload")
        );
    }

    #[test]
    fn small_report_is_unchanged() {
        let (error, payload) = bounded(None, Some("{\"a\":1}".into()));
        assert_eq!(error, None);
        assert_eq!(payload.as_deref(), Some("{\"a\":1}"));
    }
}
