use uuid::Uuid;

use super::{StatusChange, Store, StoreError};
use crate::command::{Command, Millis};
use crate::domain::CommandStatus;

/// Outbox `kind` of a command message.
pub const OUTBOX_COMMAND: &str = "command";
/// Outbox `kind` of a cancel notice to the command's device.
pub const OUTBOX_CANCEL: &str = "cancel";

/// The result of [`Store::request_cancel`].
#[derive(Debug)]
pub enum CancelOutcome {
    /// The command had not reached its device and is now `canceled`. A cancel
    /// notice still goes to the device, in case its message was already on
    /// the device queue, so that the agent never runs it.
    Canceled(Box<Command>),
    /// The device holds the command (`sentToTarget` or `executing`): a cancel
    /// notice asks the agent to stop it, and the final status says whether
    /// it stopped or finished.
    Requested(Box<Command>),
    /// The command is already final; nothing changed.
    AlreadyFinal(Box<Command>),
    NotFound,
}

impl Store {
    /// Cancels a command, or asks its device to, in one transaction that also
    /// queues the cancel notice in the outbox.
    pub async fn request_cancel(&self, id: Uuid, at: Millis) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.writer.begin().await.map_err(|e| self.error(e))?;
        let Some(mut command) = self.lock_command(&mut tx, id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        if command.status.is_final() {
            return Ok(CancelOutcome::AlreadyFinal(Box::new(command)));
        }

        let was_queued = command.status == CommandStatus::Queued;
        if was_queued {
            let change = StatusChange {
                command_id: id,
                status: CommandStatus::Canceled,
                error: Some("canceled by request before the device ran it".into()),
                response_payload: None,
                source: "api".into(),
                expected_device: None,
                at,
            };
            // A final status is always posted back, whatever the setting for
            // intermediate ones.
            Self::move_command(&mut tx, &mut command, &change, &|_| true).await?;
        }
        sqlx::query("INSERT INTO outbox (command_id, device_id, available_at, kind) VALUES ($1, $2, $3, $4)")
            .bind(id.to_string())
            .bind(command.device_id.as_str())
            .bind(at.0)
            .bind(OUTBOX_CANCEL)
            .execute(&mut *tx)
            .await?;
        self.notify_outbox(&mut tx).await?;
        tx.commit().await?;

        let command = Box::new(command);
        Ok(if was_queued {
            CancelOutcome::Canceled(command)
        } else {
            CancelOutcome::Requested(command)
        })
    }
}
