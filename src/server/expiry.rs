//! Ends commands whose expiry passed before they ran, including commands
//! whose device is offline and never takes them.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{ServerContext, apply_and_log};
use crate::command::Millis;
use crate::domain::CommandStatus;
use crate::store::StatusChange;

const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
const BATCH: i64 = 500;

pub async fn run(context: Arc<ServerContext>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        let now = Millis::now();
        let ids = match context.store.expired_command_ids(now, BATCH).await {
            Ok(ids) => ids,
            Err(error) => {
                tracing::warn!(%error, "cannot look for expired commands");
                continue;
            }
        };
        for command_id in ids {
            let change = StatusChange {
                command_id,
                status: CommandStatus::Expired,
                error: Some("the command expired before the device ran it".into()),
                response_payload: None,
                source: "expiry".into(),
                expected_device: None,
                at: now,
            };
            apply_and_log(&context, &change).await;
        }
    }
}
