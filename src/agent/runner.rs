//! The agent loop: consumes one device's queue, one command at a time, and
//! reports each command's progress to the `reply_to` queue it names.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use chrono::DateTime;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::handlers::{HandlerOutcome, HandlerRequest, Handlers};
use super::journal::{Journal, JournalEntry};
use crate::broker::{Broker, CANCEL_MESSAGE_TYPE, Delivery};
use crate::contract::{CommandMessage, StatusReport, report_message};
use crate::domain::{CommandStatus, CommandType, DeviceId};
use crate::server::backoff_delay;

/// One unacked command at a time: the next command is delivered only after
/// this one is finished, which keeps the device's commands in order.
const PREFETCH: u16 = 1;

pub struct AgentSettings {
    pub device: DeviceId,
    pub handlers: Handlers,
    /// The journal file of finished commands, one per device.
    pub journal_path: PathBuf,
}

/// Runs the agent until `shutdown` fires. A command that is running then
/// finishes and is acked before the agent returns.
pub async fn run(
    broker: Broker,
    settings: AgentSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let journal = Journal::open(&settings.journal_path).map_err(|error| {
        anyhow::anyhow!(
            "cannot open the agent journal {}: {error}",
            settings.journal_path.display()
        )
    })?;
    let agent = Agent {
        broker,
        device: settings.device,
        handlers: settings.handlers,
        journal: Mutex::new(journal),
        shutdown,
    };
    agent.consume_until_shutdown().await;
    Ok(())
}

struct Agent {
    broker: Broker,
    device: DeviceId,
    handlers: Handlers,
    /// Journal calls write a few bytes and fsync; they block the worker
    /// thread briefly, which one command at a time can afford.
    journal: Mutex<Journal>,
    shutdown: CancellationToken,
}

impl Agent {
    async fn consume_until_shutdown(&self) {
        let queue = self.broker.topology().device_queue(&self.device);
        let mut attempt = 0u32;
        tracing::info!(device_id = %self.device, %queue, "agent started");
        while !self.shutdown.is_cancelled() {
            let consumer = tokio::select! {
                () = self.shutdown.cancelled() => break,
                consumer = self.broker.consume(&queue, PREFETCH) => consumer,
            };
            let mut consumer = match consumer {
                Ok(consumer) => {
                    attempt = 0;
                    consumer
                }
                Err(error) => {
                    attempt += 1;
                    let delay =
                        backoff_delay(attempt, Duration::from_millis(200), Duration::from_secs(10));
                    tracing::warn!(device_id = %self.device, %error, retry_in = ?delay, "cannot consume the device queue");
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    () = self.shutdown.cancelled() => break,
                    next = consumer.next() => next,
                };
                match next {
                    Some(Ok(delivery)) => self.handle(delivery).await,
                    Some(Err(error)) => {
                        tracing::warn!(device_id = %self.device, %error, "device queue consumer stopped; reconnecting");
                        break;
                    }
                    None => {
                        tracing::warn!(device_id = %self.device, "device queue consumer closed; reconnecting");
                        break;
                    }
                }
            }
        }
        tracing::info!(device_id = %self.device, "agent stopped");
    }

    async fn handle(&self, delivery: Delivery) {
        if delivery.properties.kind.as_deref() == Some(CANCEL_MESSAGE_TYPE) {
            // A cancel notice for a command that is not running here (the
            // agent runs one at a time, and it would have been seen first):
            // nothing to stop.
            self.ack(&delivery, None).await;
            return;
        }
        let message: CommandMessage = match serde_json::from_slice(&delivery.body) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(
                    device_id = %self.device,
                    message_id = ?delivery.properties.message_id,
                    %error,
                    "dropping a message that is not a command"
                );
                if let Err(error) = delivery.reject().await {
                    tracing::warn!(device_id = %self.device, %error, "cannot reject an invalid message");
                }
                return;
            }
        };
        let reply_to = delivery
            .properties
            .reply_to
            .clone()
            .unwrap_or_else(|| self.broker.topology().reports_queue());

        let known = self.journal_lock().get(&message.id).cloned();
        let final_report = match known {
            Some(JournalEntry::Finished { report }) => {
                tracing::info!(command_id = %message.id, "command already finished; sending its final report again");
                self.send_raw_report(&reply_to, message.id, &report).await;
                self.ack(&delivery, Some(message.id)).await;
                return;
            }
            Some(JournalEntry::Started) => StatusReport {
                command_id: message.id,
                device_id: self.device.to_string(),
                status: CommandStatus::ExecutionFailed.as_str().to_owned(),
                error: Some(
                    "the agent stopped while this command ran; it was not run again, so that it runs at most once"
                        .into(),
                ),
                response_payload: None,
            },
            None => self.execute(&message, &reply_to).await,
        };

        let report_text =
            serde_json::to_string(&final_report).expect("a status report always serializes");
        if let Err(error) = self
            .journal_lock()
            .record_finished(message.id, &report_text)
        {
            tracing::error!(command_id = %message.id, %error, "cannot record a finished command in the journal");
        }
        self.send_report(&reply_to, &final_report).await;
        self.ack(&delivery, Some(message.id)).await;
    }

    /// Runs a command that this agent has not seen before and returns its
    /// final report.
    async fn execute(&self, message: &CommandMessage, reply_to: &str) -> StatusReport {
        let id = message.id;
        if let Some(expiration) = &message.expiration
            && let Ok(at) = DateTime::parse_from_rfc3339(expiration)
            && at <= chrono::Utc::now()
        {
            tracing::info!(command_id = %id, %expiration, "command expired before it ran; not running it");
            return self.report(
                id,
                CommandStatus::Expired,
                Some(format!(
                    "the command expired at {expiration} before the device ran it"
                )),
                None,
            );
        }

        self.send_report(
            reply_to,
            &self.report(id, CommandStatus::SentToTarget, None, None),
        )
        .await;
        if let Err(error) = self.journal_lock().record_started(id) {
            // Without the mark a crash could run the command twice, so the
            // agent does not run it.
            tracing::error!(command_id = %id, %error, "cannot record a started command in the journal");
            return self.report(
                id,
                CommandStatus::ExecutionFailed,
                Some(format!("the device could not write its journal: {error}")),
                None,
            );
        }
        self.send_report(
            reply_to,
            &self.report(id, CommandStatus::Executing, None, None),
        )
        .await;

        let request = match handler_request(message) {
            Ok(request) => request,
            Err(error) => {
                return self.report(id, CommandStatus::ExecutionFailed, Some(error), None);
            }
        };
        tracing::info!(command_id = %id, command_type = %request.command_type, app_service = ?request.app_service_name, "running command");
        // Commands are not interrupted on shutdown: the agent finishes the
        // one it holds (each handler has a timeout), then stops.
        match self.handlers.run(&request, &CancellationToken::new()).await {
            HandlerOutcome::Completed { response } => {
                self.report(id, CommandStatus::Completed, None, response)
            }
            HandlerOutcome::Failed { error, response } => {
                tracing::info!(command_id = %id, %error, "command failed");
                self.report(id, CommandStatus::ExecutionFailed, Some(error), response)
            }
            HandlerOutcome::Canceled => self.report(
                id,
                CommandStatus::Canceled,
                Some("the command was canceled while it ran".into()),
                None,
            ),
        }
    }

    /// Publishes a report, retrying until the broker confirms it or the
    /// agent stops. An unconfirmed final report is not lost: the command
    /// stays unacked, comes back, and the journal sends the report again.
    async fn send_report(&self, reply_to: &str, status_report: &StatusReport) {
        let message = report_message(status_report, reply_to);
        let mut attempt = 0u32;
        loop {
            match self.broker.publish(&message).await {
                Ok(()) => return,
                Err(error) => {
                    attempt += 1;
                    let delay =
                        backoff_delay(attempt, Duration::from_millis(200), Duration::from_secs(10));
                    tracing::warn!(command_id = %status_report.command_id, status = %status_report.status, %error, retry_in = ?delay, "cannot send a status report");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn send_raw_report(&self, reply_to: &str, id: Uuid, text: &str) {
        match serde_json::from_str::<StatusReport>(text) {
            Ok(stored) => self.send_report(reply_to, &stored).await,
            Err(error) => {
                tracing::error!(command_id = %id, %error, "journal holds an unreadable report")
            }
        }
    }

    async fn ack(&self, delivery: &Delivery, id: Option<Uuid>) {
        if let Err(error) = delivery.ack().await {
            // The message comes back; the journal makes the repeat harmless.
            tracing::warn!(device_id = %self.device, command_id = ?id, %error, "cannot ack a command");
        }
    }

    fn journal_lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Agent {
    fn report(
        &self,
        id: Uuid,
        status: CommandStatus,
        error: Option<String>,
        response: Option<serde_json::Value>,
    ) -> StatusReport {
        StatusReport {
            command_id: id,
            device_id: self.device.to_string(),
            status: status.as_str().to_owned(),
            error,
            response_payload: response
                .and_then(|value| serde_json::value::to_raw_value(&value).ok()),
        }
    }
}

fn handler_request(message: &CommandMessage) -> Result<HandlerRequest, String> {
    let command_type: CommandType = message.command_type.parse()?;
    let payload = message
        .payload
        .as_deref()
        .map(|raw: &RawValue| serde_json::from_str(raw.get()))
        .transpose()
        .map_err(|error| format!("the command's Payload is not valid JSON: {error}"))?;
    Ok(HandlerRequest {
        command_id: message.id,
        command_type,
        app_service_name: message.app_service_name.clone(),
        package_family_name: message.package_family_name.clone(),
        payload,
    })
}
