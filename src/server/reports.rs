//! The report worker: applies status reports from devices to the store.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use super::{ServerContext, apply_and_log, log_applied};
use crate::broker::{Delivery, REPORT_MESSAGE_TYPE};
use crate::command::Millis;
use crate::contract::StatusReport;
use crate::domain::{CommandStatus, DeviceId};
use crate::store::StatusChange;

/// Reports taken from the broker ahead of processing; each is acked only
/// after its status is stored.
const PREFETCH: u16 = 256;
/// Most reports applied in one transaction. Each transaction is a turn of
/// the store's writer, so applying the reports that wait together keeps the
/// worker up with many devices, while a lone report still goes at once.
const MAX_BATCH: usize = 128;
/// Pause before reports that could not be stored go back to the queue, so
/// that a database outage does not turn into a hot redelivery loop.
const STORE_FAILURE_PAUSE: Duration = Duration::from_secs(1);

pub async fn run(context: Arc<ServerContext>, shutdown: CancellationToken) {
    let queue = context.broker.topology().reports_queue();
    context
        .broker
        .consume_batches_until(&queue, PREFETCH, MAX_BATCH, &shutdown, |batch| {
            handle(&context, batch)
        })
        .await;
    tracing::info!("report worker stopped");
}

async fn handle(context: &ServerContext, deliveries: Vec<Delivery>) {
    let mut accepted = Vec::with_capacity(deliveries.len());
    let mut changes = Vec::with_capacity(deliveries.len());
    let mut invalid = Vec::new();
    for delivery in deliveries {
        match parse(&delivery) {
            Ok(change) => {
                accepted.push(delivery);
                changes.push(change);
            }
            Err(reason) => {
                // A report that cannot be read now never can: drop it so that
                // it cannot loop, and log why once.
                tracing::warn!(
                    message_id = ?delivery.properties.message_id,
                    error = %reason,
                    "dropping an invalid status report"
                );
                invalid.push(delivery);
            }
        }
    }
    for result in join_all(invalid.iter().map(Delivery::reject)).await {
        if let Err(error) = result {
            tracing::warn!(%error, "cannot reject an invalid status report");
        }
    }
    if changes.is_empty() {
        return;
    }

    let stored = store(context, &changes).await;
    let (kept, failed): (Vec<_>, Vec<_>) = accepted
        .iter()
        .zip(&changes)
        .zip(stored)
        .partition(|(_, stored)| *stored);
    let acks = join_all(kept.iter().map(|((delivery, _), _)| delivery.ack())).await;
    for (((_, change), _), result) in kept.iter().zip(acks) {
        if let Err(error) = result {
            // The report is stored; a redelivery of it will be ignored.
            tracing::warn!(command_id = %change.command_id, %error, "cannot ack a stored status report");
        }
    }
    if !failed.is_empty() {
        tokio::time::sleep(STORE_FAILURE_PAUSE).await;
        for ((delivery, change), _) in failed {
            if let Err(error) = delivery.requeue().await {
                tracing::warn!(command_id = %change.command_id, %error, "cannot requeue a status report");
            }
        }
    }
}

/// Stores `changes` in one transaction and returns, for each, whether it is
/// stored (applied or deliberately ignored). When the transaction fails, each
/// change is tried alone, so that one change the store cannot take does not
/// hold back the others.
async fn store(context: &ServerContext, changes: &[StatusChange]) -> Vec<bool> {
    let lease_until = context.postback_handoff.lease_until(Millis::now());
    let batch = context
        .store
        .apply_statuses_leased(
            changes,
            |status| context.posts_back(status),
            Some(lease_until),
        )
        .await;
    match batch {
        Ok((outcomes, postbacks)) => {
            context.postback_handoff.hand(postbacks, lease_until);
            changes
                .iter()
                .zip(outcomes)
                .map(|(change, outcome)| log_applied(change, Ok(outcome)))
                .collect()
        }
        Err(error) if changes.len() > 1 => {
            tracing::warn!(
                count = changes.len(),
                %error,
                "cannot store a batch of status reports; storing them one at a time"
            );
            let mut stored = Vec::with_capacity(changes.len());
            for change in changes {
                stored.push(apply_and_log(context, change).await);
            }
            stored
        }
        Err(error) => vec![log_applied(&changes[0], Err(error))],
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
