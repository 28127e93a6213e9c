//! `dispatcher serve`: the HTTP API plus the server-side workers (outbox
//! relay, report worker, expiry sweeper, idempotency-key sweeper, postback
//! sender), and optionally in-process agents, all stopped by one
//! cancellation token.

mod expiry;
mod idempotency_sweep;
mod postbacks;
mod relay;
mod reports;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use postbacks::{Handoff, SenderSettings};

use crate::api::{self, AppState};
use crate::broker::Broker;
use crate::domain::{CommandStatus, DeviceId};
use crate::postback::client::PostbackClient;
use crate::store::{Applied, StatusChange, Store, StoreError};

/// How long the workers get to finish their current step at a stop.
const WORKER_STOP_BOUND: Duration = Duration::from_secs(20);
/// How long closing the broker connection or the database pools may take.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// What the server-side workers share.
pub struct ServerContext {
    pub store: Store,
    pub broker: Broker,
    /// Woken when a status change created a postback delivery.
    pub postback_wake: Arc<Notify>,
    /// Post back on every status change, not only the final one.
    pub postback_every_transition: bool,
    /// Deliveries the report worker creates leased to the postback sender.
    pub postback_handoff: Handoff,
}

impl ServerContext {
    /// Returns whether a change to `status` creates a postback delivery.
    pub fn posts_back(&self, status: CommandStatus) -> bool {
        self.postback_every_transition || status.is_final()
    }
}

/// Applies a status change and logs what happened. Returns false only when
/// the store failed, so the caller can retry.
pub async fn apply_and_log(context: &ServerContext, change: &StatusChange) -> bool {
    let applied = context
        .store
        .apply_status(change, |status| context.posts_back(status))
        .await;
    if let Ok(Applied::Moved(command)) = &applied
        && command.postback_uri.is_some()
        && context.posts_back(command.status)
    {
        // The delivery waits in the store for the sender's next pass.
        context.postback_wake.notify_one();
    }
    log_applied(change, applied)
}

/// Logs the outcome of a status change. Returns false only when the store
/// failed.
pub fn log_applied(change: &StatusChange, applied: Result<Applied, StoreError>) -> bool {
    match applied {
        Ok(Applied::Moved(command)) => {
            tracing::info!(
                command_id = %command.id,
                device_id = %command.device_id,
                status = %command.status,
                source = %change.source,
                "command status changed"
            );
            true
        }
        Ok(Applied::Ignored { current }) => {
            tracing::debug!(
                command_id = %change.command_id,
                status = %change.status,
                %current,
                "status change ignored: not a forward move"
            );
            true
        }
        Ok(Applied::WrongDevice { actual }) => {
            tracing::warn!(
                command_id = %change.command_id,
                reported_by = ?change.expected_device.as_ref().map(DeviceId::as_str),
                device_id = %actual,
                "status report from another device than the command's dropped"
            );
            true
        }
        Ok(Applied::NotFound) => {
            tracing::warn!(command_id = %change.command_id, status = %change.status, "status change for an unknown command ignored");
            true
        }
        Err(error) => {
            tracing::error!(command_id = %change.command_id, %error, "cannot store a status change");
            false
        }
    }
}

/// The parts of `serve` that the binary builds from its settings.
pub struct Service {
    pub state: AppState,
    pub context: Arc<ServerContext>,
    pub workers: Vec<Worker>,
}

/// A background task the service runs beside the API.
pub type Worker = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Service {
    /// Starts the server-side workers for `state`.
    pub fn server_workers(
        context: &Arc<ServerContext>,
        state: &AppState,
        postbacks: (PostbackClient, SenderSettings),
        shutdown: &CancellationToken,
    ) -> Vec<Worker> {
        let (client, settings) = postbacks;
        vec![
            Box::pin(postbacks::run(
                context.clone(),
                client,
                settings,
                state.postback_wake.clone(),
                shutdown.clone(),
            )),
            Box::pin(relay::run(
                context.clone(),
                state.relay_wake.clone(),
                shutdown.clone(),
            )),
            Box::pin(reports::run(context.clone(), shutdown.clone())),
            Box::pin(expiry::run(context.clone(), shutdown.clone())),
            Box::pin(idempotency_sweep::run(context.clone(), shutdown.clone())),
        ]
    }

    /// Serves the API on `listener` and runs the workers until `shutdown`
    /// fires, then drains: the API stops accepting, in-flight requests and
    /// worker steps finish, and the connections close.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        if let Err(error) = self.state.broker.declare_reports().await {
            // Not fatal: the report worker declares it again when the broker
            // comes back.
            tracing::warn!(%error, "cannot declare the reports queue yet");
        }
        let mut tasks = JoinSet::new();
        for worker in self.workers {
            tasks.spawn(worker);
        }
        let app = api::router(self.state.clone());
        let api_shutdown = shutdown.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { api_shutdown.cancelled().await })
            .await;
        shutdown.cancel();
        // Workers finish their current step, which takes at most one
        // postback attempt's deadline. The bound keeps a stuck step (a publish
        // waiting for an overloaded broker's confirm) from blocking the exit.
        if tokio::time::timeout(WORKER_STOP_BOUND, async {
            while tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(bound = ?WORKER_STOP_BOUND, "workers did not stop in time; exiting anyway");
        }
        // A worker stopped mid-step may hold the broker connection; the
        // work it did not finish is redone after the restart.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if tokio::time::timeout(CLOSE_BOUND, self.state.broker.close())
            .await
            .is_err()
        {
            tracing::warn!(bound = ?CLOSE_BOUND, "the broker did not confirm the close in time");
        }
        if tokio::time::timeout(CLOSE_BOUND, self.state.store.close())
            .await
            .is_err()
        {
            tracing::warn!(bound = ?CLOSE_BOUND, "the database connections did not close in time");
        }
        tracing::info!("dispatcher stopped");
        served.map_err(Into::into)
    }
}
