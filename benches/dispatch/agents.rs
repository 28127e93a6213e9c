//! Device agents run inside the benchmark process, with the crate's own
//! agent loop and one AMQP connection each, as separate devices would have.
//!
//! `dispatcher agent` serves one device per process, and `serve --agent`
//! would put the agents' CPU and memory into the server's figures, so the
//! benchmark hosts the fleet itself.

use std::time::Duration;

use command_dispatcher::agent::handlers::Handlers;
use command_dispatcher::agent::runner::{self, AgentSettings};
use command_dispatcher::broker::{Broker, QueueKind, Topology};
use command_dispatcher::domain::DeviceId;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::broker_admin::BrokerAdmin;

pub struct Agents {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Agents {
    /// Starts one agent per device and waits until every device queue has
    /// its consumer.
    pub async fn start(
        amqp_url: &str,
        prefix: &str,
        devices: &[String],
        journal_dir: &std::path::Path,
        admin: &BrokerAdmin,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for device in devices {
            let device = DeviceId::parse(device)
                .map_err(|error| anyhow::anyhow!("invalid device id {device:?}: {error}"))?;
            let topology = Topology::new(prefix, QueueKind::Classic)
                .map_err(|error| anyhow::anyhow!(error))?;
            let broker = Broker::new(Some(amqp_url), topology, &format!("bench agent {device}"))
                .map_err(|error| anyhow::anyhow!("invalid AMQP URL: {error}"))?;
            let settings = AgentSettings {
                journal_path: journal_dir.join(format!("{device}.jsonl")),
                device,
                handlers: Handlers::builtin(),
            };
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                if let Err(error) = runner::run(broker.clone(), settings, shutdown).await {
                    eprintln!("agent failed: {error:#}");
                }
                broker.close().await;
            });
        }
        admin
            .wait_for_consumers(devices, Duration::from_secs(60))
            .await?;
        Ok(Self { shutdown, tasks })
    }

    /// Stops every agent after the command it runs, if any.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
