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
    Ok(StatusChange {
        command_id: report.command_id,
        status,
        error: report.error,
        response_payload: report.response_payload.map(|raw| raw.get().to_owned()),
        source: format!("agent:{device}"),
        expected_device: Some(device),
        at: Millis::now(),
    })
}
