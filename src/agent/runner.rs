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
use crate::backoff::backoff_delay;
use crate::broker::{Broker, CANCEL_MESSAGE_TYPE, Delivery};
use crate::contract::{CancelNotice, CommandMessage, StatusReport, report_message};
use crate::domain::{CommandStatus, CommandType, DeviceId};

/// One unacked command at a time: the next command is delivered only after
/// this one is finished, which keeps the device's commands in order.
const PREFETCH: u16 = 1;
/// How often the agent looks for a cancel notice while a command runs.
const CONTROL_POLL: Duration = Duration::from_millis(200);

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
        self.recover().await;
        let queue = self.broker.topology().device_queue(&self.device);
        tracing::info!(device_id = %self.device, %queue, "agent started");
        self.broker
            .consume_until(&queue, PREFETCH, &self.shutdown, |delivery| {
                self.handle(delivery)
            })
            .await;
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
        // Notices may have arrived while the agent was offline or busy; they
        // must be known before this command is looked at.
        self.drain_control(None).await;

        let known = self.journal_lock().get(&message.id).cloned();
        let final_report = match known {
            Some(JournalEntry::Finished { report }) => {
                tracing::info!(command_id = %message.id, "command already finished; sending its final report again");
                self.send_raw_report(&reply_to, message.id, &report).await;
                self.ack(&delivery, Some(message.id)).await;
                return;
            }
            Some(JournalEntry::Started) => self.interrupted_report(message.id),
            None => self.execute(&message, &reply_to, &delivery).await,
        };
        self.finish(&reply_to, &final_report).await;
        // A second ack of a delivery acked at `executing` does nothing.
        self.ack(&delivery, Some(message.id)).await;
    }

    /// The final report of a command that was running when the agent
    /// stopped. It is not run again, so that it runs at most once.
    fn interrupted_report(&self, id: Uuid) -> StatusReport {
        self.report(
            id,
            CommandStatus::ExecutionFailed,
            Some("the agent stopped while this command ran; it was not run again, so that it runs at most once".into()),
            None,
        )
    }

    /// Records a final report in the journal, sends it, and marks it sent
    /// once the broker confirms it. A report that is not confirmed before
    /// the agent stops is sent again at the next start.
    async fn finish(&self, reply_to: &str, final_report: &StatusReport) {
        let id = final_report.command_id;
        let text = serde_json::to_string(final_report).expect("a status report always serializes");
        let recorded = self.journal_lock().record_finished(id, &text);
        if let Err(error) = recorded {
            tracing::error!(command_id = %id, %error, "cannot record a finished command in the journal");
        }
        if self.send_report(reply_to, final_report).await {
            let marked = self.journal_lock().record_reported(id);
            if let Err(error) = marked {
                tracing::warn!(command_id = %id, %error, "cannot mark a report as sent; it will be sent again");
            }
        }
    }

    /// Settles what a previous run of this agent left: commands it started
    /// but did not finish end `executionFailed`, and final reports the broker
    /// did not confirm are sent again.
    async fn recover(&self) {
        let reports_queue = self.broker.topology().reports_queue();
        let interrupted = self.journal_lock().unfinished();
        for id in interrupted {
            tracing::warn!(command_id = %id, "command was running when the agent stopped; reporting it failed");
            let report = self.interrupted_report(id);
            let text = serde_json::to_string(&report).expect("a status report always serializes");
            let recorded = self.journal_lock().record_finished(id, &text);
            if let Err(error) = recorded {
                tracing::error!(command_id = %id, %error, "cannot record an interrupted command in the journal");
            }
        }
        let unreported = self.journal_lock().unreported();
        for (id, text) in unreported {
            if self.shutdown.is_cancelled() {
                return;
            }
            self.send_raw_report(&reports_queue, id, &text).await;
        }
    }

    /// Runs a command that this agent has not seen before and returns its
    /// final report.
    ///
    /// The delivery is acked as soon as `executing` is reported and the
    /// start is in the journal. From then on the journal, not the broker,
    /// guarantees the outcome, so a handler may run longer than RabbitMQ's
    /// `consumer_timeout` without its channel being closed and the command
    /// redelivered.
    async fn execute(
        &self,
        message: &CommandMessage,
        reply_to: &str,
        delivery: &Delivery,
    ) -> StatusReport {
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
        self.ack(delivery, Some(id)).await;

        let request = match handler_request(message) {
            Ok(request) => request,
            Err(error) => {
                return self.report(id, CommandStatus::ExecutionFailed, Some(error), None);
            }
        };
        tracing::info!(command_id = %id, command_type = %request.command_type, app_service = ?request.app_service_name, "running command");
        // Commands are not interrupted on shutdown: the agent finishes the
        // one it holds (each handler has a timeout), then stops. Only a
        // cancel notice for this command stops it early.
        let cancel = CancellationToken::new();
        let run = self.handlers.run(&request, &cancel);
        tokio::pin!(run);
        let outcome = loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                () = tokio::time::sleep(CONTROL_POLL) => self.drain_control(Some((id, &cancel))).await,
            }
        };
        match outcome {
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

    /// Takes every waiting cancel notice from the device's control queue. A
    /// notice for the running command fires its cancel token; a notice for
    /// a command not yet seen is recorded as finished with a `canceled`
    /// report, so that the command is never run when it arrives.
    async fn drain_control(&self, running: Option<(Uuid, &CancellationToken)>) {
        let queue = self.broker.topology().control_queue(&self.device);
        loop {
            let delivery = match self.broker.get(&queue).await {
                Ok(Some(delivery)) => delivery,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(device_id = %self.device, %error, "cannot read cancel notices");
                    return;
                }
            };
            self.handle_notice(&delivery, running).await;
        }
    }

    async fn handle_notice(
        &self,
        delivery: &Delivery,
        running: Option<(Uuid, &CancellationToken)>,
    ) {
        let notice: CancelNotice = match serde_json::from_slice(&delivery.body) {
            Ok(notice) => notice,
            Err(error) => {
                tracing::warn!(device_id = %self.device, %error, "dropping a control message that is not a cancel notice");
                if let Err(error) = delivery.reject().await {
                    tracing::warn!(device_id = %self.device, %error, "cannot reject an invalid control message");
                }
                return;
            }
        };
        let id = notice.command_id;
        match running {
            Some((running_id, token)) if running_id == id => {
                tracing::info!(command_id = %id, "cancel requested; stopping the running command");
                token.cancel();
            }
            _ => {
                let known = self.journal_lock().get(&id).is_some();
                if !known {
                    let report = self.report(
                        id,
                        CommandStatus::Canceled,
                        Some("canceled by request before the device ran it".into()),
                        None,
                    );
                    let text =
                        serde_json::to_string(&report).expect("a status report always serializes");
                    let recorded = self.journal_lock().record_finished(id, &text);
                    if let Err(error) = recorded {
                        // Without the record the command could still run, so
                        // the notice stays on the queue for another try.
                        tracing::error!(command_id = %id, %error, "cannot record a canceled command in the journal");
                        let _ = delivery.requeue().await;
                        return;
                    }
                    tracing::info!(command_id = %id, "command canceled before it arrived; it will not run");
                }
            }
        }
        self.ack(delivery, Some(id)).await;
    }

    /// Publishes a report, retrying until the broker confirms it or the
    /// agent stops. An unconfirmed final report is not lost: the command
    /// stays unacked, comes back, and the journal sends the report again.
    async fn send_report(&self, reply_to: &str, status_report: &StatusReport) -> bool {
        let message = report_message(status_report, reply_to);
        let mut attempt = 0u32;
        loop {
            match self.broker.publish(&message).await {
                Ok(()) => return true,
                Err(error) => {
                    attempt += 1;
                    let delay =
                        backoff_delay(attempt, Duration::from_millis(200), Duration::from_secs(10));
                    tracing::warn!(command_id = %status_report.command_id, status = %status_report.status, %error, retry_in = ?delay, "cannot send a status report");
                    tokio::select! {
                        () = self.shutdown.cancelled() => return false,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Sends a report stored in the journal and marks it sent once confirmed.
    async fn send_raw_report(&self, reply_to: &str, id: Uuid, text: &str) {
        let stored = match serde_json::from_str::<StatusReport>(text) {
            Ok(stored) => stored,
            Err(error) => {
                tracing::error!(command_id = %id, %error, "journal contains an invalid report; it is not sent");
                return;
            }
        };
        if self.send_report(reply_to, &stored).await {
            let marked = self.journal_lock().record_reported(id);
            if let Err(error) = marked {
                tracing::warn!(command_id = %id, %error, "cannot mark a report as sent; it will be sent again");
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
