//! Stand-in for the store's cancel operation until the real one lands on
//! main; it has the same signature and is deleted then.

use uuid::Uuid;

use super::{Applied, StatusChange, Store, StoreError};
use crate::command::{Command, Millis};
use crate::domain::CommandStatus;

/// What a cancel request did.
#[derive(Debug)]
pub enum CancelOutcome {
    /// The command was queued and is now canceled; its postback is created.
    Canceled(Box<Command>),
    /// The command is with its device; a cancel notice goes to the agent and
    /// the final status says what happened.
    Requested(Box<Command>),
    AlreadyFinal(Box<Command>),
    NotFound,
}

impl Store {
    pub async fn request_cancel(&self, id: Uuid, at: Millis) -> Result<CancelOutcome, StoreError> {
        let Some(command) = self.get_command(id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        if command.status.is_final() {
            return Ok(CancelOutcome::AlreadyFinal(Box::new(command)));
        }
        if command.status != CommandStatus::Queued {
            return Ok(CancelOutcome::Requested(Box::new(command)));
        }
        let change = StatusChange {
            command_id: id,
            status: CommandStatus::Canceled,
            error: Some("canceled by request".into()),
            response_payload: None,
            source: "api".into(),
            expected_device: None,
            at,
        };
        Ok(match self.apply_status(&change, |_| true).await? {
            Applied::Moved(command) => CancelOutcome::Canceled(command),
            _ => match self.get_command(id).await? {
                Some(command) => CancelOutcome::AlreadyFinal(Box::new(command)),
                None => CancelOutcome::NotFound,
            },
        })
    }
}
