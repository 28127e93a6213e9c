//! A lapin connection of the benchmark's own, to check consumers and to
//! delete every queue and exchange a phase created.

use std::time::Duration;

use anyhow::Context;
use command_dispatcher::broker::{QueueKind, Topology};
use command_dispatcher::domain::DeviceId;
use futures_util::future::join_all;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::ShortString;
use lapin::{Channel, Connection, ConnectionProperties};

/// Queue deletions in flight at once when a phase cleans up.
const DELETE_WINDOW: usize = 256;

pub struct BrokerAdmin {
    connection: Connection,
    channel: Channel,
    topology: Topology,
}

impl BrokerAdmin {
    pub async fn connect(amqp_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let connection = Connection::connect(
            amqp_url,
            ConnectionProperties::default().with_connection_name("bench admin".into()),
        )
        .await
        .context("cannot connect to RabbitMQ")?;
        let channel = connection.create_channel().await?;
        let topology =
            Topology::new(prefix, QueueKind::Classic).map_err(|error| anyhow::anyhow!(error))?;
        Ok(Self {
            connection,
            channel,
            topology,
        })
    }

    /// Waits until the queue of every device in `devices` has a consumer.
    /// Declares the queues on the way, with the arguments the agents and
    /// the relay use, which is how RabbitMQ reports the consumer count.
    pub async fn wait_for_consumers(
        &self,
        devices: &[String],
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let end = tokio::time::Instant::now() + deadline;
        for device in devices {
            let queue = self.device_queue(device)?;
            loop {
                let declared = self
                    .channel
                    .queue_declare(
                        ShortString::from(queue.as_str()),
                        QueueDeclareOptions {
                            durable: true,
                            ..QueueDeclareOptions::default()
                        },
                        self.topology.device_queue_arguments(),
                    )
                    .await
                    .with_context(|| format!("cannot declare {queue}"))?;
                if declared.consumer_count() > 0 {
                    break;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < end,
                    "no agent consumes {queue} after {deadline:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Deletes the command and control queues of `devices`, the reports
    /// queue and both exchanges, so that the shared broker keeps nothing of
    /// the run.
    pub async fn delete_topology(&self, devices: &[String]) -> anyhow::Result<()> {
        let mut queues = Vec::with_capacity(2 * devices.len() + 1);
        for device in devices {
            let id = parse_device(device)?;
            queues.push(self.topology.device_queue(&id));
            queues.push(self.topology.control_queue(&id));
        }
        queues.push(self.topology.reports_queue());
        for chunk in queues.chunks(DELETE_WINDOW) {
            let deletions = chunk.iter().map(|queue| {
                self.channel.queue_delete(
                    ShortString::from(queue.as_str()),
                    QueueDeleteOptions::default(),
                )
            });
            for (queue, result) in chunk.iter().zip(join_all(deletions).await) {
                result.with_context(|| format!("cannot delete queue {queue}"))?;
            }
        }
        for exchange in [
            self.topology.commands_exchange(),
            self.topology.control_exchange(),
        ] {
            self.channel
                .exchange_delete(
                    ShortString::from(exchange.as_str()),
                    ExchangeDeleteOptions::default(),
                )
                .await
                .with_context(|| format!("cannot delete exchange {exchange}"))?;
        }
        Ok(())
    }

    pub async fn close(self) {
        let _ = self
            .connection
            .close(200, ShortString::from("benchmark done"))
            .await;
    }

    fn device_queue(&self, device: &str) -> anyhow::Result<String> {
        Ok(self.topology.device_queue(&parse_device(device)?))
    }
}

fn parse_device(device: &str) -> anyhow::Result<DeviceId> {
    DeviceId::parse(device)
        .map_err(|error| anyhow::anyhow!("invalid device id {device:?}: {error}"))
}
