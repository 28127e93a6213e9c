//! Deletes `Idempotency-Key` records whose time is up, so the table holds
//! only keys that can still be replayed.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::ServerContext;
use crate::command::Millis;

const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

pub async fn run(context: Arc<ServerContext>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        match context.store.purge_idempotency_keys(Millis::now()).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "expired idempotency keys deleted"),
            Err(error) => tracing::warn!(%error, "cannot delete expired idempotency keys"),
        }
    }
}
