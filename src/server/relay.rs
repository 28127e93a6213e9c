//! The outbox relay: publishes committed command messages to the broker and
//! deletes each outbox row once the broker confirmed its message.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{ServerContext, apply_and_log};
use crate::backoff::backoff_delay;
use crate::broker::{Broker, BrokerError, PublishBatch};
use crate::command::Millis;
use crate::contract::{cancel_message, command_message};
use crate::domain::CommandStatus;
use crate::store::{OUTBOX_CANCEL, OutboxItem, RelayLeadership, StatusChange};

/// Rows taken per round; each round pipelines its publishes.
const BATCH: i64 = 256;
/// How often the relay looks at the outbox when nothing wakes it, which
/// covers rows whose retry time came and rows written by other processes.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// Publishes the broker refused (not merely could not take) before the
/// command ends `failedToSend`.
const MAX_REJECTED_ATTEMPTS: i64 = 5;
/// How often a standby relay checks whether the active one went away.
const STANDBY_POLL: Duration = Duration::from_secs(1);

pub async fn run(context: Arc<ServerContext>, wake: Arc<Notify>, shutdown: CancellationToken) {
    if let Broker::Memory(_) = context.broker {
        republish_unfinished(&context).await;
    }
    let mut outage_attempt = 0u32;
    let mut leadership: Option<RelayLeadership> = None;
    loop {
        // Register for a wake-up before reading, so a commit that lands
        // during the read is not missed.
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();

        let Some(leader) = lead(&context, &mut leadership).await else {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(STANDBY_POLL) => continue,
            }
        };
        let pause = match relay_once(&context).await {
            Ok(0) => {
                outage_attempt = 0;
                IDLE_POLL
            }
            Ok(_) => {
                outage_attempt = 0;
                continue;
            }
            Err(reason) => {
                outage_attempt += 1;
                let delay = backoff_delay(
                    outage_attempt,
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                );
                tracing::warn!(error = %reason, retry_in = ?delay, "outbox relay paused");
                delay
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = &mut woken => {}
            () = leader.notified() => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
    tracing::info!("outbox relay stopped");
}

/// Returns the leadership this relay holds, taking it when free. A process
/// without it stands by and tries again every [`STANDBY_POLL`].
async fn lead<'a>(
    context: &ServerContext,
    leadership: &'a mut Option<RelayLeadership>,
) -> Option<&'a mut RelayLeadership> {
    if let Some(held) = leadership
        && !held.still_held().await
    {
        tracing::warn!("lost the relay leadership; standing by");
        *leadership = None;
    }
    if leadership.is_none() {
        match context.store.try_lead_relay().await {
            Ok(Some(taken)) => {
                tracing::info!("this process now runs the outbox relay");
                *leadership = Some(taken);
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "cannot take the relay leadership"),
        }
    }
    leadership.as_mut()
}

/// Publishes one batch; returns how many rows it handled, or why it stopped.
async fn relay_once(context: &ServerContext) -> Result<usize, String> {
    let now = Millis::now();
    let batch = context
        .store
        .due_outbox(now, BATCH)
        .await
        .map_err(|error| format!("cannot read the outbox: {error}"))?;
    if batch.is_empty() {
        return Ok(0);
    }

    let mut done = Vec::new();
    let mut to_publish = Vec::new();
    for item in batch {
        if item.kind == OUTBOX_CANCEL {
            to_publish.push(item);
        } else if item.command.status != CommandStatus::Queued {
            // Canceled or expired before it was published: nothing to send.
            done.push(item.outbox_id);
        } else if item.command.is_expired_at(now) {
            expire(context, &item).await;
            done.push(item.outbox_id);
        } else {
            to_publish.push(item);
        }
    }

    // Publishes are started in outbox order and the broker keeps the order
    // of one channel, so each device receives its commands in order. The
    // batch keeps them on one channel: after a lost connection the rest of
    // the round fails and goes out again in order next round, instead of
    // overtaking the messages that were lost.
    let topology = context.broker.topology();
    let batch = PublishBatch::default();
    let results = join_all(to_publish.iter().map(|item| async {
        let message = if item.kind == OUTBOX_CANCEL {
            cancel_message(item.command.id, &item.command.device_id)
        } else {
            command_message(&item.command, topology)
        };
        context.broker.publish_in(&message, &batch).await
    }))
    .await;

    let mut outage = None;
    for (item, result) in to_publish.iter().zip(results) {
        match result {
            Ok(()) => done.push(item.outbox_id),
            Err(BrokerError::Unavailable(reason)) => outage = Some(reason),
            Err(error) => handle_rejected(context, item, &error, now).await,
        }
    }
    context
        .store
        .delete_outbox(&done)
        .await
        .map_err(|error| format!("cannot delete published outbox rows: {error}"))?;
    match outage {
        Some(reason) => Err(format!("broker unavailable: {reason}")),
        None => Ok(done.len().max(1)),
    }
}

/// Retries a publish the broker refused a few times, then gives up on the
/// command with `failedToSend`, because retrying cannot fix the message.
async fn handle_rejected(
    context: &ServerContext,
    item: &OutboxItem,
    error: &BrokerError,
    now: Millis,
) {
    let attempts = item.attempts + 1;
    let command_id = item.command.id;
    if attempts >= MAX_REJECTED_ATTEMPTS && item.kind == OUTBOX_CANCEL {
        // The command itself is unaffected; only the notice is lost, and the
        // command then ends as its device reports.
        tracing::error!(%command_id, attempts, %error, "cancel notice rejected for good; dropping it");
        if let Err(store_error) = context.store.delete_outbox(&[item.outbox_id]).await {
            tracing::error!(%command_id, error = %store_error, "cannot delete a rejected cancel notice");
        }
        return;
    }
    if attempts >= MAX_REJECTED_ATTEMPTS {
        tracing::error!(%command_id, attempts, %error, "publish rejected for good; command failed to send");
        let change = StatusChange {
            command_id,
            status: CommandStatus::FailedToSend,
            error: Some(format!(
                "the broker rejected the command message {attempts} times: {error}"
            )),
            response_payload: None,
            source: "relay".into(),
            expected_device: None,
            at: now,
        };
        apply_and_log(context, &change).await;
        if let Err(store_error) = context.store.delete_outbox(&[item.outbox_id]).await {
            tracing::error!(%command_id, error = %store_error, "cannot delete the outbox row of a failed command");
        }
        return;
    }
    let attempt = u32::try_from(attempts).unwrap_or(u32::MAX);
    let retry_at = now.saturating_add(backoff_delay(
        attempt,
        Duration::from_millis(500),
        Duration::from_secs(30),
    ));
    tracing::warn!(%command_id, attempts, %error, "publish rejected; will retry");
    if let Err(store_error) = context
        .store
        .defer_outbox(item.outbox_id, retry_at, &error.to_string())
        .await
    {
        tracing::error!(%command_id, error = %store_error, "cannot schedule the retry of a rejected publish");
    }
}

async fn expire(context: &ServerContext, item: &OutboxItem) {
    let change = StatusChange {
        command_id: item.command.id,
        status: CommandStatus::Expired,
        error: Some("the command expired before it was sent to the device".into()),
        response_payload: None,
        source: "relay".into(),
        expected_device: None,
        at: Millis::now(),
    };
    apply_and_log(context, &change).await;
}

/// Publishes every unfinished command again at start. The in-process broker
/// keeps its queues in memory, so after a restart they are empty; agents
/// recognise commands they already finished by their journal.
async fn republish_unfinished(context: &ServerContext) {
    let commands = match context.store.unfinished_published_commands().await {
        Ok(commands) => commands,
        Err(error) => {
            tracing::error!(%error, "cannot read unfinished commands to publish them again");
            return;
        }
    };
    let topology = context.broker.topology();
    for command in &commands {
        if let Err(error) = context
            .broker
            .publish(&command_message(command, topology))
            .await
        {
            tracing::error!(command_id = %command.id, %error, "cannot publish an unfinished command again");
        }
    }
    if !commands.is_empty() {
        tracing::info!(
            count = commands.len(),
            "published unfinished commands again after start"
        );
    }
}
